//! Batched rollouts of the netd DaemonSet (`netd-controller rollout ...`)
//! against kube-apiserver + kube-controller-manager 1.20.2: the real
//! DaemonSet controller re-creates each deleted pod on the new template;
//! the test plays the scheduler (binding the pods it makes) and kubelet
//! (renewing node Leases, marking pods Ready, or not, finishing deletes).
//!
//! Over 20 nodes: a pre-check that fails on one unready netd starts
//! nothing; a rollout paused in batch 3 finishes that batch and starts
//! nothing more; resumed, it starts again at one node; its controller
//! killed mid-batch and started again carries on; cancelled, it leaves the
//! upgraded nodes upgraded. A second rollout pauses on a node that never
//! gets Ready, defers an offline node and upgrades it once it is back, and
//! completes. Every node's netd pod is replaced at most once per rollout.
//! A paused rollout is closed after its TTL.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, ServiceAccount};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use netd::kube::KubeClient;
use netd::rollout::{NodeProgress, Phase, RolloutState};
use netd::testing::{self, KubeApiServer, KubeCluster};
use serde_json::json;

const NODES: usize = 20;
const NS: &str = "kube-system";

fn node_name(i: usize) -> String {
    format!("edge-{i:02}")
}

fn stamp(micros: bool) -> String {
    let t = time::OffsetDateTime::now_utc();
    let fraction = if micros { format!(".{:06}", t.microsecond()) } else { String::new() };
    let (year, month, day) = (t.year(), u8::from(t.month()), t.day());
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{fraction}Z", t.hour(), t.minute(), t.second())
}

/// What the test's kubelet and scheduler do, and what they saw.
#[derive(Default)]
struct Fleet {
    /// Nodes whose pods on this image are never marked Ready.
    never_ready: BTreeSet<(String, String)>,
    /// Nodes reporting Ready=False (cut off).
    offline: BTreeSet<String>,
    /// Every netd pod UID seen per node, with its image.
    pods: BTreeMap<String, BTreeMap<String, String>>,
}

/// One pass of scheduler + kubelet over the netd pods and nodes.
async fn play(client: &kube::Client, fleet: &Mutex<Fleet>, heartbeat: bool) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let Ok(list) = pods.list(&ListParams::default().labels("app=netd")).await else { return };
    for pod in list.items {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let image = spec.containers.first().and_then(|c| c.image.clone()).unwrap_or_default();
        let node = spec.node_name.clone().or_else(|| {
            let affinity = serde_json::to_value(&spec.affinity).ok()?;
            affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
                ["matchFields"][0]["values"][0]
                .as_str()
                .map(str::to_string)
        });
        let Some(node) = node else { continue };
        let (ready_never, offline) = {
            let mut f = fleet.lock().unwrap();
            f.pods.entry(node.clone()).or_default().insert(uid.clone(), image.clone());
            (f.never_ready.contains(&(node.clone(), image.clone())), f.offline.contains(&node))
        };
        if pod.metadata.deletion_timestamp.is_some() {
            // The kubelet's final delete once the containers are gone.
            let _ = pods.delete(&name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
            continue;
        }
        if spec.node_name.is_none() {
            let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                                 "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
            let request = http::Request::post(format!("/api/v1/namespaces/{NS}/pods/{name}/binding"))
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&binding).unwrap())
                .unwrap();
            let _ = client.request_text(request).await;
            continue;
        }
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready || ready_never || offline {
            continue;
        }
        let now = stamp(false);
        let status = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now}],
            "containerStatuses": [{"name": "netd", "image": image, "imageID": "", "ready": true, "restartCount": 0,
                                   "state": {"running": {"startedAt": now}}}]}});
        let _ = pods.patch_status(&name, &PatchParams::default(), &Patch::Strategic(&status)).await;
    }
    if heartbeat {
        let offline = fleet.lock().unwrap().offline.clone();
        let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
        let nodes: Api<Node> = Api::all(client.clone());
        for i in 1..=NODES {
            let node = node_name(i);
            let lease = json!({"spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": stamp(true)}});
            let _ = leases.patch(&node, &PatchParams::default(), &Patch::Merge(&lease)).await;
            let (status, reason) = if offline.contains(&node) { ("False", "CutOff") } else { ("True", "KubeletReady") };
            let now = stamp(false);
            let patch = json!({"status": {"conditions": [{"type": "Ready", "status": status, "reason": reason,
                "message": "the test plays kubelet", "lastHeartbeatTime": now, "lastTransitionTime": now}]}});
            let _ = nodes.patch_status(&node, &PatchParams::default(), &Patch::Strategic(&patch)).await;
        }
    }
}

/// A `netd-controller run` process, killed on drop.
struct Controller {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn api_args(api: &KubeApiServer, dir: &std::path::Path) -> Vec<String> {
    let token = dir.join("token");
    std::fs::write(&token, api.token()).unwrap();
    [
        "--kubernetes",
        &api.url(),
        "--token-file",
        token.to_str().unwrap(),
        "--ca-file",
        api.ca_cert_path().to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

impl Controller {
    fn start(api: &KubeApiServer, dir: &std::path::Path, extra: &[&str]) -> Self {
        let log = dir.join(format!("controller-{}.log", std::fs::read_dir(dir).unwrap().count()));
        let child = Command::new(env!("CARGO_BIN_EXE_netd-controller"))
            .arg("run")
            .args(api_args(api, dir))
            .args([
                "--identity",
                "rollout-test",
                "--lease-duration",
                "4",
                "--renew-deadline",
                "3",
                "--retry-period",
                "1",
            ])
            .args(["--metrics-listen", "", "--log", "debug"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `netd-controller rollout <args>`.
fn rollout(api: &KubeApiServer, dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netd-controller"))
        .arg("rollout")
        .args(args)
        .args(api_args(api, dir))
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

async fn state(client: &kube::Client) -> Option<RolloutState> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let cm = cms.get_opt("netd-rollout").await.unwrap()?;
    Some(RolloutState::from_json(&cm.data.unwrap()["rollout.json"]).unwrap())
}

async fn wait_state(
    client: &kube::Client,
    what: &str,
    controller: &Controller,
    mut done: impl FnMut(&RolloutState) -> bool,
) -> RolloutState {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(s) = state(client).await {
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: not within 120 s; state: {s:#?}\n{}", controller.log());
        }
        assert!(Instant::now() < deadline, "{what}: no state within 120 s\n{}", controller.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn set_image(client: &kube::Client, image: &str) {
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "netd", "image": image}]}}}});
    ds.patch("netd", &PatchParams::default(), &Patch::Strategic(&patch)).await.unwrap();
    // The DaemonSet controller records the revision before a rollout may start.
    for _ in 0..100 {
        let d = ds.get("netd").await.unwrap();
        if d.status.and_then(|s| s.observed_generation) == d.metadata.generation {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the DaemonSet controller did not observe the new template");
}

/// Node -> images of its netd pods, in the order seen (UIDs are random:
/// the count per image is what matters).
fn images_per_node(fleet: &Mutex<Fleet>) -> BTreeMap<String, Vec<String>> {
    let f = fleet.lock().unwrap();
    f.pods.iter().map(|(node, pods)| (node.clone(), pods.values().cloned().collect())).collect()
}

fn count(images: &[String], image: &str) -> usize {
    images.iter().filter(|i| *i == image).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn twenty_nodes_pause_resume_cancel_restart_health_gate_and_offline_nodes() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let builder = KubeCluster::builder().controller_manager(true);
    if !builder.binaries_available().unwrap() {
        return;
    }
    let cluster = builder.start().unwrap();
    let api = cluster.api();
    let dir = tempfile::tempdir().unwrap();
    let config = api.kube_config("test").unwrap();
    let kube = KubeClient::new(&config).unwrap().client();
    let nodes: Api<Node> = Api::all(kube.clone());
    let leases: Api<Lease> = Api::namespaced(kube.clone(), "kube-node-lease");
    for i in 1..=NODES {
        let name = node_name(i);
        let node = json!({"metadata": {"name": name, "labels": {"alibabacloud.com/is-edge-worker": "true"},
                                       "annotations": {"node.beta.alibabacloud.com/autonomy": "true"}}});
        nodes.create(&PostParams::default(), &serde_json::from_value(node).unwrap()).await.unwrap();
        let lease = json!({"metadata": {"name": name}, "spec": {"holderIdentity": name, "leaseDurationSeconds": 40}});
        leases.create(&PostParams::default(), &serde_json::from_value(lease).unwrap()).await.unwrap();
    }
    let fleet = Arc::new(Mutex::new(Fleet::default()));
    // edge-05's first netd never gets Ready: the pre-check must name it.
    fleet.lock().unwrap().never_ready.insert((node_name(5), "netd:v1".into()));
    let kubelet = tokio::spawn({
        let (kube, fleet) = (kube.clone(), fleet.clone());
        async move {
            let mut pass = 0u64;
            loop {
                play(&kube, &fleet, pass.is_multiple_of(20)).await;
                pass += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    // The ServiceAccount admission plugin wants `default` (the
    // controller-manager may have made it already).
    let accounts: Api<ServiceAccount> = Api::namespaced(kube.clone(), NS);
    let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
    let _ = accounts.create(&PostParams::default(), &account).await;
    let ds = json!({
        "metadata": {"name": "netd", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "netd"}},
            "updateStrategy": {"type": "OnDelete"},
            "template": {
                "metadata": {"labels": {"app": "netd"}},
                "spec": {"automountServiceAccountToken": false, "hostNetwork": true,
                         "tolerations": [{"operator": "Exists"}],
                         "containers": [{"name": "netd", "image": "netd:v1"}]}}}});
    let daemonsets: Api<DaemonSet> = Api::namespaced(kube.clone(), NS);
    daemonsets.create(&PostParams::default(), &serde_json::from_value(ds).unwrap()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while images_per_node(&fleet).values().filter(|i| i.len() == 1).count() < NODES {
        assert!(
            Instant::now() < deadline,
            "the DaemonSet controller made no pod per node: {:?}",
            images_per_node(&fleet)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut controller = Controller::start(api, dir.path(), &[]);
    set_image(&kube, "netd:v2").await;

    // The pre-check: edge-05's netd is not ready; nothing starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let out = rollout(api, dir.path(), &["start"]);
    assert!(!out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("pre-check failed, nothing started") && said.contains("edge-05: netd is not ready (pod netd-"),
        "{said}"
    );
    assert!(state(&kube).await.is_none(), "a failed pre-check records nothing");
    assert!(images_per_node(&fleet).values().all(|i| i.len() == 1), "no pod was replaced");
    {
        // Batch 3 (edge-04, edge-05) is held until the pause is asked for,
        // so the pause lands inside it.
        let mut f = fleet.lock().unwrap();
        f.never_ready.clear();
        f.never_ready.extend([4, 5].map(|i| (node_name(i), "netd:v2".to_string())));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let out = rollout(api, dir.path(), &["start", "--node-timeout", "30s"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("rollout started: 20 node(s)")
            && text(&out).contains("batches 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1"),
        "{}",
        text(&out)
    );
    let again = rollout(api, dir.path(), &["start"]);
    assert!(!again.status.success() && text(&again).contains("another rollout is running"), "{}", text(&again));

    // Pause while batch 3 runs: it finishes (5 nodes updated), nothing more starts.
    wait_state(&kube, "batch 3", &controller, |s| s.batch.as_ref().is_some_and(|b| b.number == 3)).await;
    let out = rollout(api, dir.path(), &["pause"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("pausing: batch 3 finishes"), "{}", text(&out));
    wait_state(&kube, "pause recorded", &controller, |s| s.request.is_some()).await;
    fleet.lock().unwrap().never_ready.clear();
    let paused = wait_state(&kube, "paused", &controller, |s| s.phase == Phase::Paused).await;
    assert_eq!(paused.updated(), 5, "{paused:#?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let images = images_per_node(&fleet);
    assert_eq!(images.values().filter(|i| count(i, "netd:v2") == 1).count(), 5, "{images:?}");
    let status = rollout(api, dir.path(), &["status"]);
    assert!(!status.status.success(), "status --watch on a paused rollout fails, as kubectl's does");
    assert!(text(&status).contains("rollout paused: 5 of 20 nodes updated (paused by request)"), "{}", text(&status));

    // Resume: a batch of one, then two; the controller is killed while a
    // batch waits on a node, and started again.
    let held = {
        let next = paused.nodes.iter().find(|(_, p)| **p == NodeProgress::Pending).map(|(n, _)| n.clone()).unwrap();
        fleet.lock().unwrap().never_ready.insert((next.clone(), "netd:v2".into()));
        next
    };
    let out = rollout(api, dir.path(), &["resume"]);
    assert!(out.status.success(), "{}", text(&out));
    let resumed =
        wait_state(&kube, "resumed batch", &controller, |s| s.phase == Phase::Running && s.batch.is_some()).await;
    assert_eq!(resumed.batch.as_ref().unwrap().nodes, std::slice::from_ref(&held), "a resume starts at one node");
    wait_state(&kube, "held node's pod replaced", &controller, |_| {
        images_per_node(&fleet).get(&held).is_some_and(|i| count(i, "netd:v2") == 1)
    })
    .await;
    controller.child.kill().unwrap();
    controller.child.wait().unwrap();
    {
        // The held node comes up; the batch after it (two nodes) is held
        // until the cancel is asked for.
        let mut f = fleet.lock().unwrap();
        f.never_ready.clear();
        let after: Vec<String> = resumed
            .nodes
            .iter()
            .filter(|(n, p)| **p == NodeProgress::Pending && **n != held)
            .map(|(n, _)| n.clone())
            .take(2)
            .collect();
        f.never_ready.extend(after.into_iter().map(|n| (n, "netd:v2".to_string())));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    controller = Controller::start(api, dir.path(), &[]);
    let next = wait_state(&kube, "batch after the restart", &controller, |s| {
        s.batch.as_ref().is_some_and(|b| b.nodes.len() == 2) && s.updated() == 6
    })
    .await;
    // Cancel during that batch: it finishes, the rollout stops.
    let out = rollout(api, dir.path(), &["cancel"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_state(&kube, "cancel recorded", &controller, |s| s.request.is_some()).await;
    fleet.lock().unwrap().never_ready.clear();
    let cancelled = wait_state(&kube, "cancelled", &controller, |s| s.phase == Phase::Cancelled).await;
    assert_eq!(cancelled.updated(), 8, "{next:#?}\n{cancelled:#?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let images = images_per_node(&fleet);
    for (node, seen) in &images {
        assert!(count(seen, "netd:v2") <= 1, "{node} replaced twice: {seen:?}");
        assert_eq!(count(seen, "netd:v1"), 1, "{node}: {seen:?}");
    }
    assert_eq!(images.values().filter(|i| count(i, "netd:v2") == 1).count(), 8, "{images:?}");
    let status = rollout(api, dir.path(), &["status", "--watch=false"]);
    assert!(text(&status).contains("rollout cancelled: 8 of 20 nodes on netd:v2"), "{}", text(&status));

    // A second rollout over the 12 left: the first node never gets Ready
    // (pause with its name and reason); edge-20 is offline (deferred).
    let first = cancelled.nodes.iter().find(|(_, p)| **p == NodeProgress::Pending).map(|(n, _)| n.clone()).unwrap();
    {
        let mut f = fleet.lock().unwrap();
        f.never_ready.insert((first.clone(), "netd:v2".into()));
        f.offline.insert(node_name(20));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = rollout(api, dir.path(), &["start", "--node-timeout", "3s"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("rollout started: 12 node(s)"), "{}", text(&out));
    let failed = wait_state(&kube, "paused on the unready node", &controller, |s| s.phase == Phase::Paused).await;
    let reason = failed.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with(&format!("{first}: not Ready on netd:v2 ("))
            && reason.contains(") within 3s: its netd on netd:v2 (")
            && reason.contains(") is not Ready (pod netd-"),
        "{reason}"
    );
    assert_eq!(failed.updated(), 0);
    fleet.lock().unwrap().never_ready.clear();
    let out = rollout(api, dir.path(), &["resume"]);
    assert!(out.status.success(), "{}", text(&out));
    let waiting = wait_state(&kube, "only the offline node left", &controller, |s| s.updated() == 11).await;
    assert_eq!(waiting.phase, Phase::Running);
    assert!(waiting.deferred.contains_key(&node_name(20)), "{waiting:#?}");
    let status = rollout(api, dir.path(), &["status", "--watch=false"]);
    assert!(
        text(&status)
            .contains("Waiting for rollout to finish: 11 of 12 nodes updated... (1 offline node(s) deferred: edge-20)"),
        "{}",
        text(&status)
    );
    fleet.lock().unwrap().offline.clear();
    let out = rollout(api, dir.path(), &["status", "--timeout", "60s"]);
    assert!(out.status.success(), "{}\n{}", text(&out), controller.log());
    assert!(
        text(&out).contains("daemon set \"kube-system/netd\" successfully rolled out (12 of 12 nodes on netd:v2"),
        "{}",
        text(&out)
    );
    let images = images_per_node(&fleet);
    for (node, seen) in &images {
        assert_eq!((count(seen, "netd:v1"), count(seen, "netd:v2")), (1, 1), "{node}: {seen:?}");
    }

    // Its turning points are Events on the DaemonSet (`kubectl describe ds`).
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(kube.clone(), NS);
    let listed = events
        .list(&ListParams::default().fields("involvedObject.kind=DaemonSet,involvedObject.name=netd"))
        .await
        .unwrap();
    let seen: BTreeSet<(String, String)> = listed
        .items
        .iter()
        .filter(|e| e.source.as_ref().and_then(|s| s.component.as_deref()) == Some("netd-controller"))
        .map(|e| (e.type_.clone().unwrap_or_default(), e.reason.clone().unwrap_or_default()))
        .collect();
    for wanted in [
        ("Normal", "RolloutBatchStarted"),
        ("Normal", "RolloutPaused"),
        ("Normal", "RolloutResumed"),
        ("Normal", "RolloutCancelled"),
        ("Warning", "NodeUpgradeFailed"),
        ("Warning", "RolloutPaused"),
        ("Normal", "RolloutComplete"),
    ] {
        assert!(seen.contains(&(wanted.0.to_string(), wanted.1.to_string())), "no {wanted:?} Event: {seen:?}");
    }

    // Nothing left to roll out; then a paused rollout outlives its TTL.
    let out = rollout(api, dir.path(), &["start"]);
    assert!(!out.status.success() && text(&out).contains("nothing to roll out"), "{}", text(&out));
    set_image(&kube, "netd:v3").await;
    drop(controller);
    let out = rollout(api, dir.path(), &["start"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = rollout(api, dir.path(), &["pause"]);
    assert!(out.status.success(), "{}", text(&out));
    let controller = Controller::start(api, dir.path(), &["--rollout-paused-ttl", "2s"]);
    wait_state(&kube, "paused", &controller, |s| s.phase == Phase::Paused).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(&kube).await.is_some() {
        assert!(Instant::now() < deadline, "the paused rollout was not closed\n{}", controller.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(controller.log().contains("closed: paused for"), "{}", controller.log());
    kubelet.abort();
}
