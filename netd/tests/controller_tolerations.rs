//! The toleration controller (`netd::controller::tolerations`) against a
//! real kube-apiserver and kube-controller-manager 1.20.2, the test playing
//! kubelet (renewing each node's Lease and Ready condition, or not).
//!
//! An edge node stops renewing: the pods of a non-autonomous one are evicted
//! by the real node lifecycle controller after their toleration; those of
//! an autonomous one stay; once autonomy is unset their tolerations are back
//! exactly (300 s from admission, a user's 5 s, forever), and eviction
//! resumes as those tolerations say. DaemonSet pods and a cloud node's pods
//! are not touched; pods created, or bound, after autonomy is set are covered.
//!
//! Without the controller-manager: two controllers racing on the same pods
//! (conflicts) patch each pod once; a restarted one restores; a pod with a
//! garbage annotation is left alone until the annotation is removed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use netd::controller::tolerations::{self, TolerationMetrics, ANNOTATION_SAVED, TAINT_NOT_READY, TAINT_UNREACHABLE};
use netd::kube::{KubeClient, KubeConfig};
use netd::model::autonomy::ANNOTATION_AUTONOMY;
use netd::registry::kubernetes::KubernetesRegistry;
use netd::registry::{PeerEvent, Registry as _};
use netd::testing::{self, ControllerManagerOptions, KubeCluster};
use serde_json::{json, Value};

const AUTO: &str = "edge-auto";
const PLAIN: &str = "edge-plain";
const CLOUD: &str = "cloud-1";
const EDGE_LABEL: &str = "alibabacloud.com/is-edge-worker";
/// The trusted role label: what makes a cloud node (the seed's label is
/// only an output).
const CLOUD_LABEL: &str = netd::model::roles::LABEL_ROLE;

/// `2006-01-02T15:04:05Z`, or with microseconds (a Lease's MicroTime).
fn stamp(micros: bool) -> String {
    let t = time::OffsetDateTime::now_utc();
    let fraction = if micros { format!(".{:06}", t.microsecond()) } else { String::new() };
    let (year, month, day) = (t.year(), u8::from(t.month()), t.day());
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{fraction}Z", t.hour(), t.minute(), t.second())
}

/// The API server's admin credentials, as node `node` (`network`: the
/// cluster network a registry needs).
fn admin(api: &netd::testing::KubeApiServer, node: &str, network: Option<ipnet::Ipv4Net>) -> KubeConfig {
    KubeConfig { network, ..api.kube_config(node).unwrap() }
}

async fn create<K>(api: &Api<K>, object: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let typed: K = serde_json::from_value(object).unwrap();
    api.create(&PostParams::default(), &typed).await.unwrap()
}

/// What the kubelet does to look alive: renew the Lease, report Ready.
async fn renew(client: &kube::Client, node: &str) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = json!({ "spec": { "holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": stamp(true) } });
    leases.patch(node, &PatchParams::default(), &Patch::Merge(&lease)).await.unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    let now = stamp(false);
    let status = json!({ "status": { "conditions": [{
        "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "the test plays kubelet",
        "lastHeartbeatTime": now, "lastTransitionTime": now,
    }]}});
    nodes.patch_status(node, &PatchParams::default(), &Patch::Strategic(&status)).await.unwrap();
}

async fn create_node(client: &kube::Client, name: &str, edge: bool, annotations: Value) {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels = if edge { json!({ EDGE_LABEL: "true" }) } else { json!({ CLOUD_LABEL: "cloud" }) };
    create(&nodes, json!({ "metadata": { "name": name, "labels": labels, "annotations": annotations } })).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    create(
        &leases,
        json!({ "metadata": { "name": name }, "spec": { "holderIdentity": name, "leaseDurationSeconds": 40 } }),
    )
    .await;
    renew(client, name).await;
}

/// A pod (bound to `node` unless `None`) with these tolerations and owners.
async fn create_pod(pods: &Api<Pod>, name: &str, node: Option<&str>, tolerations: Value, owners: Value) -> Pod {
    let mut spec = json!({
        "automountServiceAccountToken": false,
        "containers": [{ "name": "c", "image": "registry.invalid/pause:3" }],
        "tolerations": tolerations,
    });
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    let labels = json!({ "app": name });
    create(pods, json!({ "metadata": { "name": name, "labels": labels, "ownerReferences": owners }, "spec": spec }))
        .await
}

fn tolerations_of(pod: &Pod) -> Value {
    serde_json::to_value(pod.spec.as_ref().and_then(|s| s.tolerations.clone()).unwrap_or_default()).unwrap()
}

fn saved(pod: &Pod) -> Option<String> {
    pod.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_SAVED).cloned())
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// As the taint manager decides for `taint`: `None` evicted at once,
/// `Some(None)` never, `Some(Some(s))` after s seconds.
fn eviction(tolerations: &Value, taint: &str) -> Option<Option<i64>> {
    let first = tolerations.as_array().unwrap().iter().find(|t| {
        let field = |f: &str| t.get(f).and_then(Value::as_str).unwrap_or("").to_string();
        let (effect, key, operator) = (field("effect"), field("key"), field("operator"));
        (effect.is_empty() || effect == "NoExecute")
            && (key.is_empty() || key == taint)
            && (operator == "Exists" || field("value").is_empty())
    })?;
    Some(first.get("tolerationSeconds").and_then(Value::as_i64))
}

async fn wait_for<T, F: Future<Output = Option<T>>>(what: &str, limit: Duration, mut probe: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn get(pods: &Api<Pod>, name: &str) -> Pod {
    pods.get(name).await.unwrap()
}

fn has_taint(node: &Node, key: &str) -> bool {
    node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| t.iter().any(|t| t.key == key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn autonomous_pods_stay_and_get_their_tolerations_back() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let _ = tracing_subscriber::fmt().with_ansi(false).with_test_writer().try_init();
    let options = ControllerManagerOptions {
        // The DaemonSet controller would delete the test's DaemonSet pod
        // (no node matches it); its owner must exist for the garbage
        // collector.
        controllers: ["*", "-daemonset", "bootstrapsigner", "tokencleaner"].map(String::from).to_vec(),
        node_monitor_grace_period: Duration::from_secs(16),
        node_monitor_period: Duration::from_secs(2),
        // Both edge nodes are tainted at once (the default 0.1/s would
        // taint the second 10 s after the first).
        extra_args: vec!["--node-eviction-rate=10".into()],
        ..ControllerManagerOptions::default()
    };
    let builder = KubeCluster::builder().controller_manager_options(options);
    if !builder.binaries_available().unwrap() {
        return;
    }
    let started = Instant::now();
    let cluster = builder.start().unwrap();
    let api = cluster.api();
    let client = KubeClient::new(&admin(api, "controller", None)).unwrap();
    let kube = client.client();

    // The nodes, kept alive by the "kubelet" below; the cloud node asks for
    // autonomy, which a cloud node does not get.
    // edge-auto is a netd node (flannel's annotations): its peers' registry
    // sees it as a peer, and keeps it while it is silent.
    let flannel = json!({
        "flannel.alpha.coreos.com/backend-type": "vxlan",
        "flannel.alpha.coreos.com/backend-data": r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:0a"}"#,
        "flannel.alpha.coreos.com/public-ip": "192.0.2.10",
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
    });
    create_node(&kube, AUTO, true, flannel).await;
    create_node(&kube, PLAIN, true, json!({})).await;
    create_node(&kube, CLOUD, false, json!({ ANNOTATION_AUTONOMY: "true" })).await;
    let alive = Arc::new(Mutex::new(HashSet::from([AUTO, PLAIN, CLOUD])));
    let kubelet = tokio::spawn({
        let (kube, alive) = (kube.clone(), alive.clone());
        async move {
            loop {
                let nodes: Vec<&str> = alive.lock().unwrap().iter().copied().collect();
                for node in nodes {
                    renew(&kube, node).await;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    });

    let nodes_api: Api<Node> = Api::all(kube.clone());
    let auto_cidr = wait_for("edge-auto's pod CIDR", Duration::from_secs(30), || async {
        nodes_api.get(AUTO).await.ok()?.spec?.pod_cidr
    })
    .await;

    // The ServiceAccount admission plugin wants `default` (the
    // controller-manager may have made it already).
    let accounts: Api<ServiceAccount> = Api::namespaced(kube.clone(), "default");
    let account: ServiceAccount = serde_json::from_value(json!({ "metadata": { "name": "default" } })).unwrap();
    let _ = accounts.create(&PostParams::default(), &account).await;
    let daemonsets: Api<k8s_openapi::api::apps::v1::DaemonSet> = Api::namespaced(kube.clone(), "default");
    let ds = create(
        &daemonsets,
        json!({ "metadata": { "name": "agent" }, "spec": {
            "selector": { "matchLabels": { "app": "auto-ds" } },
            "template": { "metadata": { "labels": { "app": "auto-ds" } },
                          "spec": { "containers": [{ "name": "c", "image": "registry.invalid/agent:1" }] } },
        }}),
    )
    .await;
    let ds_owner = json!([{ "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent",
                            "uid": ds.metadata.uid.unwrap(), "controller": true }]);

    let pods: Api<Pod> = Api::namespaced(kube.clone(), "default");
    let user = |seconds: i64| json!([{ "key": TAINT_UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds }]);
    let forever = json!([{ "operator": "Exists" }]);
    // Admission tolerates not-ready for it (key and effect), but the taint
    // manager does not (value "x"): the controller must add one.
    let odd = json!([
        { "key": TAINT_NOT_READY, "operator": "Equal", "value": "x", "effect": "NoExecute", "tolerationSeconds": 5 },
        { "key": TAINT_UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5 },
    ]);
    let mut originals = BTreeMap::new();
    for (name, node, tolerations, owners) in [
        ("auto-default", Some(AUTO), json!([]), json!([])),
        ("auto-user", Some(AUTO), user(5), json!([])),
        ("auto-forever", Some(AUTO), forever.clone(), json!([])),
        ("auto-odd", Some(AUTO), odd, json!([])),
        ("auto-ds", Some(AUTO), json!([]), ds_owner),
        ("auto-bound-later", None, user(5), json!([])),
        ("plain-user", Some(PLAIN), user(5), json!([])),
        ("plain-forever", Some(PLAIN), forever, json!([])),
        ("cloud-user", Some(CLOUD), user(5), json!([])),
    ] {
        let pod = create_pod(&pods, name, node, tolerations, owners).await;
        originals.insert(name, tolerations_of(&pod));
    }
    // DefaultTolerationSeconds: 300 s for both taints.
    assert_eq!(eviction(&originals["auto-default"], TAINT_UNREACHABLE), Some(Some(300)));
    assert_eq!(eviction(&originals["auto-user"], TAINT_NOT_READY), Some(Some(300)));
    assert_eq!(eviction(&originals["auto-odd"], TAINT_NOT_READY), None, "{}", originals["auto-odd"]);

    let metrics = Arc::new(TolerationMetrics::default());
    let controller = tokio::spawn(tolerations::run(client.clone(), metrics.clone()));

    // Autonomy on: every pod of the node tolerates both taints forever.
    let nodes: Api<Node> = Api::all(kube.clone());
    let autonomy = |on: Option<&str>| json!({ "metadata": { "annotations": { ANNOTATION_AUTONOMY: on } } });
    nodes.patch(AUTO, &PatchParams::default(), &Patch::Merge(&autonomy(Some("true")))).await.unwrap();
    let later = create_pod(&pods, "auto-created-later", Some(AUTO), user(5), json!([])).await;
    originals.insert("auto-created-later", tolerations_of(&later));
    let binding = json!({ "apiVersion": "v1", "kind": "Binding", "metadata": { "name": "auto-bound-later" },
                          "target": { "apiVersion": "v1", "kind": "Node", "name": AUTO } });
    let (status, body) = api
        .api(
            "POST",
            "/api/v1/namespaces/default/pods/auto-bound-later/binding",
            Some(("application/json", &binding.to_string())),
        )
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let protected = ["auto-default", "auto-user", "auto-odd", "auto-created-later", "auto-bound-later"];
    for name in protected {
        let pod = wait_for(&format!("{name} rewritten"), Duration::from_secs(20), || async {
            let pod = get(&pods, name).await;
            saved(&pod).is_some().then_some(pod)
        })
        .await;
        let now = tolerations_of(&pod);
        for taint in [TAINT_NOT_READY, TAINT_UNREACHABLE] {
            assert_eq!(eviction(&now, taint), Some(None), "{name} {taint}: {now}");
        }
    }
    for name in ["auto-forever", "auto-ds", "plain-user", "plain-forever", "cloud-user"] {
        let pod = get(&pods, name).await;
        assert_eq!((saved(&pod), tolerations_of(&pod)), (None, originals[name].clone()), "{name} was touched");
    }

    // The controllers are running once node IPAM has handed out pod CIDRs
    // (node lifecycle starts with it); then both edge nodes go silent.
    wait_for("pod CIDRs", Duration::from_secs(60), || async {
        let list = nodes.list(&Default::default()).await.unwrap();
        list.items.iter().all(|n| n.spec.as_ref().is_some_and(|s| s.pod_cidr.is_some())).then_some(())
    })
    .await;
    alive.lock().unwrap().retain(|n| *n == CLOUD);
    let silent = Instant::now();

    // Non-autonomous: evicted after its 5 s toleration by the real node
    // lifecycle controller; the pod tolerating forever stays.
    wait_for("plain-user evicted", Duration::from_secs(60), || async {
        terminating(&get(&pods, "plain-user").await).then_some(())
    })
    .await;
    eprintln!("plain-user evicted {:?} after its node went silent", silent.elapsed());
    let tainted = wait_for("edge-auto tainted unreachable", Duration::from_secs(30), || async {
        has_taint(&nodes.get(AUTO).await.unwrap(), TAINT_UNREACHABLE).then_some(Instant::now())
    })
    .await;
    // Autonomous: well past the 5 s its pods had, nothing is evicted.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(tainted.elapsed())).await;
    assert!(!terminating(&get(&pods, "plain-forever").await));
    for name in protected.iter().chain(&["auto-forever", "auto-ds", "cloud-user"]) {
        assert!(!terminating(&get(&pods, name).await), "{name} was evicted");
    }
    // Its subnet stays, and a peer netd (its registry, what the daemon
    // programs routes from) still has it, autonomous, with that subnet.
    assert_eq!(nodes.get(AUTO).await.unwrap().spec.unwrap().pod_cidr, Some(auto_cidr.clone()));
    let mut peer = KubernetesRegistry::new(admin(api, PLAIN, Some("10.244.0.0/16".parse().unwrap()))).unwrap();
    let PeerEvent::Resync(peers) = peer.next_event("10.244.250.0/24".parse().unwrap()).await.unwrap() else {
        panic!("the first event is a resync")
    };
    assert!(
        peers
            .iter()
            .any(|p| p.lease.node.as_deref() == Some(AUTO) && p.autonomous && p.lease.subnet.to_string() == auto_cidr),
        "a peer keeps the silent autonomous node: {peers:?}"
    );

    // Autonomy off: the originals are back exactly (the appended
    // not-ready toleration of auto-odd stays, at 0 s).
    nodes.patch(AUTO, &PatchParams::default(), &Patch::Merge(&autonomy(None))).await.unwrap();
    let restored_at = Instant::now();
    for name in protected {
        let pod = wait_for(&format!("{name} restored"), Duration::from_secs(20), || async {
            let pod = get(&pods, name).await;
            saved(&pod).is_none().then_some(pod)
        })
        .await;
        let now = tolerations_of(&pod);
        let original = originals[name].as_array().unwrap();
        if name == "auto-odd" {
            assert_eq!(&now.as_array().unwrap()[..original.len()], original.as_slice());
            assert_eq!(
                now[original.len()],
                json!({ "key": TAINT_NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 0 })
            );
        } else {
            assert_eq!(now, originals[name], "{name} not restored exactly");
        }
    }
    let ds_pod = get(&pods, "auto-ds").await;
    assert_eq!((saved(&ds_pod), tolerations_of(&ds_pod)), (None, originals["auto-ds"].clone()));

    // The node is still silent: eviction resumes as the originals say.
    wait_for("auto-user evicted after autonomy ended", Duration::from_secs(30), || async {
        terminating(&get(&pods, "auto-user").await).then_some(())
    })
    .await;
    eprintln!("auto-user evicted {:?} after autonomy was unset", restored_at.elapsed());
    assert!(!terminating(&get(&pods, "auto-default").await), "300 s have not passed");
    assert!(!terminating(&get(&pods, "auto-forever").await));

    assert_eq!((metrics.rewritten(), metrics.restored()), (5, 5), "{}", metrics.render_prometheus());
    assert!(metrics.skipped() >= 1 && metrics.errors() == 0, "{}", metrics.render_prometheus());
    assert_eq!(metrics.autonomous_nodes(), 0);
    controller.abort();
    kubelet.abort();
    eprintln!("test took {:?}", started.elapsed());
}

/// Two controllers at once (a leadership hand-over where both briefly run)
/// race on the same pods: conflicts are read again and planned again, and
/// the pods end up rewritten once, not twice. Then one is aborted, autonomy
/// is unset and a fresh one (the next leader) gives everything back. A pod
/// with a garbage annotation is left alone throughout, with an error
/// counted, until the annotation is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn racing_and_restarted_controllers_converge_and_garbage_is_left_alone() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let builder = KubeCluster::builder();
    if !builder.binaries_available().unwrap() {
        return;
    }
    let cluster = builder.start().unwrap();
    let api = cluster.api();
    let client = KubeClient::new(&admin(api, "controller", None)).unwrap();
    let kube = client.client();
    let nodes: Api<Node> = Api::all(kube.clone());
    create(&nodes, json!({ "metadata": { "name": AUTO, "annotations": { ANNOTATION_AUTONOMY: "true" } } })).await;
    let accounts: Api<ServiceAccount> = Api::namespaced(kube.clone(), "default");
    create(&accounts, json!({ "metadata": { "name": "default" } })).await;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), "default");
    let count = 60;
    let mut originals = BTreeMap::new();
    for i in 0..count {
        let name = format!("app-{i:02}");
        let pod = create_pod(&pods, &name, Some(AUTO), json!([]), json!([])).await;
        originals.insert(name, tolerations_of(&pod));
    }
    let garbage = create_pod(&pods, "garbage", Some(AUTO), json!([]), json!([])).await;
    let annotate =
        json!({ "metadata": { "annotations": { ANNOTATION_SAVED: "{\"version\": 1, \"tolerations\": [oops" } } });
    pods.patch("garbage", &PatchParams::default(), &Patch::Merge(&annotate)).await.unwrap();

    let (first, second) = (Arc::new(TolerationMetrics::default()), Arc::new(TolerationMetrics::default()));
    let a = tokio::spawn(tolerations::run(client.clone(), first.clone()));
    let b = tokio::spawn(tolerations::run(client.clone(), second.clone()));
    let all_saved = |want: bool| {
        let (pods, originals) = (pods.clone(), originals.clone());
        async move {
            for name in originals.keys() {
                if saved(&get(&pods, name).await).is_some() != want {
                    return None;
                }
            }
            Some(())
        }
    };
    wait_for("every pod rewritten", Duration::from_secs(30), || all_saved(true)).await;
    // Give the slower one time to finish what it started.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(first.rewritten() + second.rewritten(), count as u64, "a pod was patched twice");
    for name in originals.keys() {
        let now = tolerations_of(&get(&pods, name).await);
        assert_eq!(eviction(&now, TAINT_UNREACHABLE), Some(None), "{name}: {now}");
    }
    let untouched = get(&pods, "garbage").await;
    assert_eq!(tolerations_of(&untouched), tolerations_of(&garbage), "the garbage pod was rewritten");
    assert!(saved(&untouched).unwrap().ends_with("[oops"), "the garbage annotation was changed");
    assert_eq!((first.errors(), second.errors()), (1, 1));

    // The leader goes; autonomy ends; the next leader gives it all back.
    a.abort();
    b.abort();
    let off = json!({ "metadata": { "annotations": { ANNOTATION_AUTONOMY: null } } });
    nodes.patch(AUTO, &PatchParams::default(), &Patch::Merge(&off)).await.unwrap();
    let next = Arc::new(TolerationMetrics::default());
    let c = tokio::spawn(tolerations::run(client.clone(), next.clone()));
    wait_for("every pod restored", Duration::from_secs(30), || all_saved(false)).await;
    for (name, original) in &originals {
        assert_eq!(&tolerations_of(&get(&pods, name).await), original, "{name}");
    }
    assert_eq!(next.restored(), count as u64);
    assert!(saved(&get(&pods, "garbage").await).is_some());

    // Removing the garbage makes the current tolerations the originals.
    let clear = json!({ "metadata": { "annotations": { ANNOTATION_SAVED: null } } });
    pods.patch("garbage", &PatchParams::default(), &Patch::Merge(&clear)).await.unwrap();
    let on = json!({ "metadata": { "annotations": { ANNOTATION_AUTONOMY: "true" } } });
    nodes.patch(AUTO, &PatchParams::default(), &Patch::Merge(&on)).await.unwrap();
    wait_for("the cleaned pod rewritten", Duration::from_secs(30), || async {
        saved(&get(&pods, "garbage").await).map(|_| ())
    })
    .await;
    c.abort();
}
