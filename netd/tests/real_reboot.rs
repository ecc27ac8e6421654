//! A real edge node rebooted (issue 25), on real kubelets 1.20.2 and
//! Debian's containerd with `deploy/` applied (`netd::testing::RealCluster`).
//! A power cut kills the kubelet, containerd, netd and every container at
//! once and takes what lives in memory with it: the pods' network
//! namespaces and veths, `cni0`, `flannel.1` and its routes, the node's
//! rules and `/run`. Then containerd and the kubelet start again.
//!
//! 1. The cloud up (the floor of issue 25's benchmark): the kubelet reads
//!    its pods from kube-apiserver and starts them; the workload pod is back
//!    with the same address and answers across flannel.1 from the other
//!    edge node. Times from the kubelet's start are printed.
//! 2. The cloud unreachable, the kubelet talking to kube-apiserver
//!    directly (no edge hub): it starts nothing, not netd and not the
//!    workload, for as long as it is cut off — what the edge hub is for.
//!    Once the cloud is back, everything comes back by itself.
//! 3. The edge hub (`netd hub`, a host service) between the kubelet and
//!    kube-apiserver, the cloud unreachable again: the kubelet reads its
//!    pods, netd's among them, from the hub's cache and starts them; netd
//!    restores the overlay from its snapshot, the workload pod gets its
//!    address back and answers edge-2 across flannel.1. The hub counts what
//!    it served offline. Times from the kubelet's start are printed beside
//!    the cloud-up ones.
//! 4. Back online: a pod deleted in the API while the node was cut off is
//!    stopped on the node and gone from the API and the hub's cache; a pod
//!    created for the node meanwhile starts.
//! 5. Eviction: both edge nodes cut off for three times the node monitor
//!    grace period, each running a pod that tolerates an unreachable node
//!    for 5 s only. The real node lifecycle controller marks both nodes
//!    unreachable and taints them; it evicts the pod of edge-2 (not
//!    autonomous), while the pod of edge-1 (autonomous: netd-controller made
//!    its tolerations last) stays, keeps running and keeps answering edge-2
//!    the whole time. Reconnected, edge-2's kubelet stops the evicted pod.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use netd::controller::tolerations::{TAINT_NOT_READY, TAINT_UNREACHABLE};
use netd::model::autonomy::ANNOTATION_AUTONOMY;
use netd::testing::{self, edge_statefulset, ControllerManagerOptions, RealCluster, WORKLOAD_IMAGE};
use serde_json::{json, Value};

/// Long enough for a first start of every pod on two shared cores.
const SLOW: Duration = Duration::from_secs(240);
/// How long (at least) the kubelet is watched doing nothing with the cloud
/// away: more than twice what the same boot takes with the cloud up (8 s
/// here), so a kubelet that could start the pods would have.
const CUT_OFF_WATCH: Duration = Duration::from_secs(20);

/// Whether `to` answers one ping from edge-2's own network namespace
/// (through its flannel.1 route to edge-1's pod subnet).
fn answers(cluster: &RealCluster, to: IpAddr) -> bool {
    cluster.node("edge-2").unwrap().pings(to)
}

/// A pod bound to `node` directly (no scheduler: the node may be cut off).
fn pod_on(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": name, "image": WORKLOAD_IMAGE, "imagePullPolicy": "Never",
                            "command": ["/bin/sleep", "3600"]}]
        }
    })
}

/// [`pod_on`], tolerating a not-ready or unreachable node for `seconds`
/// only (instead of the 300 s the API server gives by default).
fn short_lived_pod_on(name: &str, node: &str, seconds: u64) -> Value {
    let mut pod = pod_on(name, node);
    pod["spec"]["tolerations"] = [TAINT_NOT_READY, TAINT_UNREACHABLE]
        .iter()
        .map(|key| json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}))
        .collect();
    pod
}

/// Pod `name`'s toleration of an unreachable node: `Some(None)` forever,
/// `Some(Some(s))` for `s` seconds, `None` when it has none.
fn unreachable_toleration(cluster: &RealCluster, name: &str) -> Option<Option<u64>> {
    let pod = cluster.kubectl_json(&["get", "pod", name]).ok()?;
    let tolerations = pod["spec"]["tolerations"].as_array()?.clone();
    let first = tolerations.iter().find(|t| t["key"] == TAINT_UNREACHABLE)?;
    Some(first["tolerationSeconds"].as_u64())
}

/// Whether pod `name` exists and is being deleted (an eviction deletes it;
/// the pod stays, Terminating, until its kubelet confirms).
fn being_deleted(cluster: &RealCluster, name: &str) -> bool {
    cluster.kubectl_json(&["get", "pod", name]).is_ok_and(|pod| pod["metadata"].get("deletionTimestamp").is_some())
}

/// Whether Node `name` carries the `node.kubernetes.io/unreachable:NoExecute`
/// taint of the node lifecycle controller.
fn tainted_unreachable(cluster: &RealCluster, name: &str) -> bool {
    cluster.kubectl_json(&["get", "node", name]).is_ok_and(|node| {
        node["spec"]["taints"]
            .as_array()
            .is_some_and(|taints| taints.iter().any(|t| t["key"] == TAINT_UNREACHABLE && t["effect"] == "NoExecute"))
    })
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn a_rebooted_edge_node_gets_its_pods_back_from_the_cloud_and_nothing_without_it() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let builder = RealCluster::builder();
    if !builder.available().unwrap() {
        return;
    }
    let mut cluster = builder.start().unwrap();
    cluster.deploy(&[], SLOW).unwrap();
    cluster.apply(&edge_statefulset("web", 2)).unwrap();
    let pods = cluster.wait_pods_ready("app=web", 2, SLOW).unwrap();
    let (pod, (node_name, ip)) =
        pods.iter().find(|(_, (node, _))| node == "edge-1").map(|(n, v)| (n.clone(), v.clone())).unwrap();
    assert_eq!(node_name, "edge-1");
    assert!(answers(&cluster, ip), "{pod} at {ip} answers edge-2 before the reboot");

    // 1. A reboot with the cloud up.
    let node = cluster.nodes().iter().position(|n| n.name == "edge-1").unwrap();
    cluster.nodes_mut()[node].power_cut().unwrap();
    assert_eq!(cluster.nodes()[node].running_containers(&pod), 0, "the power cut stopped {pod}");
    assert!(!answers(&cluster, ip), "{pod} still answers after the power cut");
    let links = cluster.nodes()[node].netns().exec("ip", &["-o", "link", "show"]).unwrap();
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    assert!(!links.contains("flannel.1") && !links.contains("cni0"), "the power cut left devices: {links}");
    let booted = Instant::now();
    cluster.nodes_mut()[node].boot().unwrap();
    let edge1 = &cluster.nodes()[node];
    let running = cluster
        .wait_for(&format!("{pod} running again on edge-1"), SLOW, || {
            Ok((edge1.running_containers(&pod) == 1).then(|| booted.elapsed()))
        })
        .unwrap_or_else(|err| panic!("{err}\n{}", cluster.diagnostics()));
    let replied = cluster
        .wait_for(&format!("{pod} at {ip} answering edge-2"), SLOW, || {
            Ok(answers(&cluster, ip).then(|| booted.elapsed()))
        })
        .unwrap_or_else(|err| panic!("{err}\n{}", cluster.diagnostics()));
    let after = cluster.wait_pods_ready("app=web", 2, SLOW).unwrap();
    assert_eq!(after[&pod].1, ip, "{pod} keeps its address across the reboot");
    println!(
        "reboot, cloud up: kubelet start → {pod} running {:.1} s, → first reply across nodes {:.1} s",
        running.as_secs_f64(),
        replied.as_secs_f64()
    );

    // 2. A reboot with the cloud unreachable, and no edge hub.
    cluster.isolate_from_cloud("edge-1").unwrap();
    let edge1 = &cluster.nodes()[node];
    let healthz = format!("{}/healthz", cluster.kube().unwrap().api().url());
    let direct = edge1.exec("curl", &["-sk", "--max-time", "3", &healthz]);
    assert!(direct.is_err(), "edge-1 still reaches the cloud node: {direct:?}");
    cluster.nodes_mut()[node].power_cut().unwrap();
    cluster.nodes_mut()[node].boot().unwrap();
    let edge1 = &cluster.nodes()[node];
    let watched = Instant::now();
    // Longer on a slow run: the cloud-up boot above is the yardstick.
    let cut_off_watch = CUT_OFF_WATCH.max(running.mul_f64(2.5));
    while watched.elapsed() < cut_off_watch {
        assert!(edge1.kubelet_running(), "the kubelet of edge-1 exited:\n{}", edge1.kubelet_log());
        assert_eq!(edge1.running_containers(&pod), 0, "the kubelet started {pod} without the cloud");
        let netd = edge1.ctr(&["containers", "list", "-q", "labels.\"io.kubernetes.container.name\"==netd"]).unwrap();
        let netd_running = netd.lines().filter(|l| !l.is_empty()).any(|id| {
            edge1
                .ctr(&["tasks", "list"])
                .unwrap_or_default()
                .lines()
                .any(|t| t.starts_with(id) && t.contains("RUNNING"))
        });
        assert!(!netd_running, "the kubelet started netd without the cloud");
        std::thread::sleep(Duration::from_secs(3));
    }
    assert!(!answers(&cluster, ip), "{pod} answers with its node cut off and nothing started");

    // The cloud back: everything comes back by itself.
    cluster.reconnect_to_cloud("edge-1").unwrap();
    let edge1 = &cluster.nodes()[node];
    cluster
        .wait_for(&format!("{pod} answering edge-2 once the cloud is back"), SLOW, || {
            Ok((edge1.running_containers(&pod) == 1 && answers(&cluster, ip)).then_some(()))
        })
        .unwrap_or_else(|err| panic!("{err}\n{}", cluster.diagnostics()));
    let after = cluster.wait_pods_ready("app=web", 2, SLOW).unwrap();
    assert_eq!(after[&pod].1, ip, "{pod} keeps its address");

    // 3. The edge hub between the kubelet and the cloud; once it has
    // cached what the kubelet reads, a reboot with the cloud away.
    // Autonomous, as `netd-autonomy set` makes it: the hub caches and
    // answers offline only for an autonomous node (else a pass-through).
    cluster.kubectl(&["annotate", "node", "edge-1", &format!("{ANNOTATION_AUTONOMY}=true"), "--overwrite"]).unwrap();
    cluster.apply(&pod_on("doomed", "edge-1")).unwrap();
    cluster.wait_pods_ready("app=doomed", 1, SLOW).unwrap();
    let server = cluster.kube().unwrap().api().url();
    cluster.nodes_mut()[node].use_hub(Path::new(env!("CARGO_BIN_EXE_netd")), &server).unwrap();
    let edge1 = &cluster.nodes()[node];
    cluster
        .wait_hub_holds_boot_reads("edge-1", &[&pod, "doomed"], SLOW)
        .unwrap_or_else(|err| panic!("{err}\n{}", edge1.hub_log()));
    cluster.isolate_from_cloud("edge-1").unwrap();
    cluster.nodes_mut()[node].power_cut().unwrap();
    assert!(!answers(&cluster, ip), "{pod} still answers after the power cut");
    let booted = Instant::now();
    cluster.nodes_mut()[node].boot().unwrap();
    let edge1 = &cluster.nodes()[node];
    let running_offline = cluster
        .wait_for(&format!("{pod} running again on edge-1 with the cloud away"), SLOW, || {
            Ok((edge1.running_containers(&pod) == 1).then(|| booted.elapsed()))
        })
        .unwrap_or_else(|err| panic!("{err}\n--- hub:\n{}\n{}", edge1.hub_log(), cluster.diagnostics()));
    let replied_offline = cluster
        .wait_for(&format!("{pod} at {ip} answering edge-2 with the cloud away"), SLOW, || {
            Ok(answers(&cluster, ip).then(|| booted.elapsed()))
        })
        .unwrap_or_else(|err| panic!("{err}\n--- hub:\n{}\n{}", edge1.hub_log(), cluster.diagnostics()));
    assert_eq!(edge1.hub_metric("netd_hub_cloud_reachable"), Some(0.0), "the hub saw the cloud away");
    let offline = edge1.hub_metric("netd_hub_requests_served_offline_total").unwrap_or_default();
    assert!(offline > 0.0, "the kubelet read through the hub's cache ({offline} requests served offline)");
    println!(
        "reboot, cloud away, edge hub: kubelet start → {pod} running {:.1} s, → first reply across nodes {:.1} s \
         ({offline} requests served offline); cloud up, no hub: {:.1} s, {:.1} s",
        running_offline.as_secs_f64(),
        replied_offline.as_secs_f64(),
        running.as_secs_f64(),
        replied.as_secs_f64()
    );

    // 4. While it is cut off, the API changes under the node: a pod of
    // the node deleted, another created for it.
    cluster
        .wait_for("doomed running again from the cache", SLOW, || {
            Ok((edge1.running_containers("doomed") == 1).then_some(()))
        })
        .unwrap();
    cluster.kubectl(&["delete", "pod", "doomed", "--wait=false"]).unwrap();
    cluster.apply(&pod_on("newcomer", "edge-1")).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(edge1.running_containers("doomed"), 1, "the node cannot know of the deletion yet");
    cluster.reconnect_to_cloud("edge-1").unwrap();
    let after = cluster.wait_pods_ready("app=web", 2, SLOW).unwrap();
    assert_eq!(after[&pod].1, ip, "{pod} keeps its address once the cloud is back");
    cluster
        .wait_for("doomed stopped on edge-1 and gone from the API", SLOW, || {
            let gone = cluster.pods("app=doomed")?.is_empty();
            Ok((gone && edge1.running_containers("doomed") == 0).then_some(()))
        })
        .unwrap_or_else(|err| panic!("{err}\n--- hub:\n{}\n{}", edge1.hub_log(), cluster.diagnostics()));
    cluster
        .wait_for("the hub's cache without doomed", SLOW, || {
            Ok((!edge1.hub_caches("pods", "default", "doomed")).then_some(()))
        })
        .unwrap();
    cluster.wait_pods_ready("app=newcomer", 1, SLOW).unwrap();
    assert_eq!(edge1.running_containers("newcomer"), 1, "newcomer runs on edge-1");

    // 5. Eviction. Both edge nodes cut off for three times the grace
    // period after which the node lifecycle controller gives up on a
    // silent node. Two nodes of three down is no zone disruption (that
    // takes more than two), so it evicts at its normal rate.
    let grace = ControllerManagerOptions::default().node_monitor_grace_period;
    const TOLERATED: u64 = 5;
    cluster.apply(&short_lived_pod_on("stays", "edge-1", TOLERATED)).unwrap();
    cluster.apply(&short_lived_pod_on("evicted", "edge-2", TOLERATED)).unwrap();
    let stays_ip = cluster.wait_pods_ready("app=stays", 1, SLOW).unwrap()["stays"].1;
    cluster.wait_pods_ready("app=evicted", 1, SLOW).unwrap();
    cluster
        .wait_for("netd-controller making the autonomous node's pod tolerate forever", SLOW, || {
            Ok((unreachable_toleration(&cluster, "stays") == Some(None)).then_some(()))
        })
        .unwrap();
    assert_eq!(
        unreachable_toleration(&cluster, "evicted"),
        Some(Some(TOLERATED)),
        "the pod of the node that is not autonomous keeps its toleration"
    );
    // Edge-1 went NotReady and Ready again in the reboots above, which
    // stalls 1.20.2's taint queue for good (see the method): a restart, as
    // an operator of 1.20.2 would do.
    cluster.restart_controller_manager().unwrap();
    // Its first passes see every node Ready.
    std::thread::sleep(ControllerManagerOptions::default().node_monitor_period * 3);
    for edge in ["edge-1", "edge-2"] {
        cluster.isolate_from_cloud(edge).unwrap();
    }
    let cut = Instant::now();
    let edge1 = &cluster.nodes()[node];
    let mut evicted_after = None;
    let mut tainted_after = None;
    let mut probes = 0;
    while cut.elapsed() < grace * 3 || evicted_after.is_none() {
        assert!(cut.elapsed() < grace * 3 + SLOW, "edge-2's pod not evicted\n{}", cluster.diagnostics());
        // ping -c 2: one lost echo on a busy machine is not a pod that
        // stopped serving.
        let edge2 = cluster.node("edge-2").unwrap();
        let ping = edge2.netns().exec("ping", &["-c", "2", "-W", "2", &stays_ip.to_string()]);
        assert!(ping.is_ok(), "stays at {stays_ip} stopped answering edge-2 {:?} after the cut", cut.elapsed());
        probes += 1;
        assert_eq!(edge1.running_containers("stays"), 1, "stays stopped on edge-1");
        assert!(!being_deleted(&cluster, "stays"), "the autonomous node's pod was evicted after {:?}", cut.elapsed());
        if tainted_after.is_none() && tainted_unreachable(&cluster, "edge-2") {
            tainted_after = Some(cut.elapsed());
        }
        if evicted_after.is_none() && being_deleted(&cluster, "evicted") {
            evicted_after = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(tainted_unreachable(&cluster, "edge-1"), "edge-1 is unreachable to the node lifecycle controller too");
    assert!(!being_deleted(&cluster, "stays"), "stays is not evicted after {:?}", cut.elapsed());
    println!(
        "eviction, both edge nodes cut off {:.0} s (3 × the {} s grace): edge-2 tainted unreachable after {:.1} s, \
         its pod evicted after {:.1} s; edge-1's (autonomous) pod stayed, answering {probes} probes from edge-2",
        cut.elapsed().as_secs_f64(),
        grace.as_secs(),
        tainted_after.unwrap_or_default().as_secs_f64(),
        evicted_after.unwrap_or_default().as_secs_f64()
    );
    for edge in ["edge-1", "edge-2"] {
        cluster.reconnect_to_cloud(edge).unwrap();
    }
    let edge2 = cluster.node("edge-2").unwrap();
    cluster
        .wait_for("the evicted pod stopped on edge-2 and gone from the API", SLOW, || {
            let gone = cluster.pods("app=evicted")?.is_empty();
            Ok((gone && edge2.running_containers("evicted") == 0).then_some(()))
        })
        .unwrap_or_else(|err| panic!("{err}\n{}", cluster.diagnostics()));
    let stays = cluster.wait_pods_ready("app=stays", 1, SLOW).unwrap();
    assert_eq!(stays["stays"].1, stays_ip, "stays keeps its address");
    let pod = cluster.kubectl_json(&["get", "pod", "stays"]).unwrap();
    assert_eq!(pod["status"]["containerStatuses"][0]["restartCount"], 0, "stays was never restarted");
}
