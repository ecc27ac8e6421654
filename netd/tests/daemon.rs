//! The `netd` daemon end to end: three nodes in namespaces, pods across
//! them, registry outages, restarts, cleanup — on the embedded registry and
//! on a real etcd reached over the underlay.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use netd::model::flannel::SUBNETS_PREFIX;
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::NetworkConfig;
use netd::testing::{
    self, Cluster, EmbeddedScenarioRegistry, EtcdScenarioRegistry, EtcdServer, KubeScenarioRegistry, NetdProcess, Node,
    Scenario, ScenarioRegistry, ScenarioReport, CONTROL_PLANE_IP, HEALTH_ADDR,
};
use netd::vxlan::snapshot::Snapshot;

const NETD: &str = env!("CARGO_BIN_EXE_netd");

/// `netd run` for `node` on `registry` (a `--registry` spec), state under
/// `state/<node>`.
struct Daemon(NetdProcess);

impl Daemon {
    fn start(node: &Node, registry: &str, state: &Path) -> Self {
        let dir = state.join(&node.name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = testing::netd_run_args(&node.name, registry, &dir);
        if node.number == 1 {
            args.push("--masquerade".into());
        }
        Self(NetdProcess::spawn(&node.ns, Path::new(NETD), args, &dir.join("netd.log")).unwrap())
    }

    fn sigterm(&mut self) {
        let status = self.0.signal(libc::SIGTERM).unwrap();
        assert!(status.is_some_and(|s| s.success()), "netd exited with {status:?} on SIGTERM:\n{}", self.log());
    }

    fn log(&self) -> String {
        self.0.log()
    }
}

fn http_get(node: &Node, path: &str) -> Option<String> {
    testing::http_get(&node.ns, HEALTH_ADDR, path)
}

fn metric(node: &Node, name: &str) -> Option<f64> {
    testing::metric(&node.ns, name)
}

fn wait_for(what: &str, daemons: &[&Daemon], mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(45);
    while !check() {
        if Instant::now() > deadline {
            let logs: Vec<String> = daemons.iter().map(|d| d.log()).collect();
            panic!("timed out waiting for {what}; logs:\n{}", logs.join("\n----\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts netd on every node in order, each ready before the next starts,
/// then waits until every node programs `peers` peers.
fn start_daemons(cluster: &Cluster, registry: &str, state: &Path, peers: u32) -> Vec<Daemon> {
    let mut daemons = Vec::new();
    for node in &cluster.nodes {
        let daemon = Daemon::start(node, registry, state);
        wait_for("readiness", &[&daemon], || http_get(node, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")));
        daemons.push(daemon);
    }
    for node in &cluster.nodes {
        wait_for(&format!("{peers} peers on every node"), &daemons.iter().collect::<Vec<_>>(), || {
            metric(node, "netd_peers_programmed") == Some(f64::from(peers))
        });
    }
    daemons
}

fn ping(cluster: &Cluster, from: usize, to: usize) -> bool {
    cluster.nodes[from].pods[0].pings(cluster.nodes[to].pods[0].ip)
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn daemons_keep_pods_talking_through_registry_outage_restart_and_bad_data() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let state = tempfile::tempdir().unwrap();
    let registry_path = state.path().join("registry.db");
    let config = NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&registry_path, &config).unwrap();
    let cluster = Cluster::new(3, 1).unwrap();
    let registry_spec = format!("embedded:{}", registry_path.display());
    // Nodes join in order, so node i leases 10.244.i.0/24 (the first free
    // subnet), matching the pods' addresses.
    let mut daemons = start_daemons(&cluster, &registry_spec, state.path(), 2);
    for node in &cluster.nodes {
        let env = std::fs::read_to_string(state.path().join(&node.name).join("subnet.env")).unwrap();
        assert!(env.contains(&format!("FLANNEL_SUBNET=10.244.{}.1/24", node.number)), "{env}");
        assert!(env.contains("FLANNEL_MTU=1450"), "{env}");
    }
    assert!(ping(&cluster, 0, 1) && ping(&cluster, 1, 2) && ping(&cluster, 2, 0));
    // Node 1 runs with --masquerade: flannel's rules in netd's own table.
    let env1 = std::fs::read_to_string(state.path().join("node-1/subnet.env")).unwrap();
    assert!(env1.contains("FLANNEL_IPMASQ=true"), "{env1}");
    let table =
        String::from_utf8(cluster.nodes[0].ns.exec("nft", &["list", "table", "ip", "netd-masq"]).unwrap().stdout)
            .unwrap();
    assert_eq!(table.matches("masquerade").count(), 2, "{table}");
    assert!(
        cluster.nodes[1].ns.exec("nft", &["list", "table", "ip", "netd-masq"]).is_err(),
        "node 2 has no masquerade"
    );
    assert_eq!(metric(&cluster.nodes[0], "netd_registry_connected"), Some(1.0));

    // Bad registry data is skipped; the other peers are unaffected.
    let registry = EmbeddedRegistry::open(&registry_path, Duration::from_millis(100));
    registry.put_raw_lease("10.244.9.0-24", "garbage", "{\"PublicIP\":", Duration::from_secs(3600)).unwrap();
    registry
        .put_raw_lease("10.99.0.0-24", "outside", r#"{"PublicIP":"192.168.50.99","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:99"}}"#, Duration::from_secs(3600))
        .unwrap();
    registry
        .put_raw_lease(
            "10.244.8.0-24",
            "wrong-types",
            r#"{"PublicIP":"192.168.50.98","BackendType":"vxlan","BackendData":{"VNI":"1","VtepMAC":7}}"#,
            Duration::from_secs(3600),
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(metric(&cluster.nodes[0], "netd_peers_programmed"), Some(2.0));
    assert!(ping(&cluster, 0, 1));
    let log = daemons[0].log();
    assert!(log.contains("skipping bad lease") || log.contains("peer refused"), "{log}");

    // Registry outage: traffic continues; a restart restores from snapshot.
    let away = state.path().join("registry.db.away");
    std::fs::rename(&registry_path, &away).unwrap();
    wait_for("registry marked down", &[&daemons[1]], || {
        metric(&cluster.nodes[1], "netd_registry_connected") == Some(0.0)
    });
    assert!(ping(&cluster, 0, 1), "traffic continues while the registry is down");
    daemons[1].sigterm();
    assert!(cluster.nodes[1].ns.ip(&["link", "show", "flannel.1"]).is_ok(), "SIGTERM leaves the device");
    assert!(ping(&cluster, 0, 1), "pods keep talking while netd is stopped");
    daemons[1] = Daemon::start(&cluster.nodes[1], &registry_spec, state.path());
    wait_for("ready from snapshot without registry", &[&daemons[1]], || {
        metric(&cluster.nodes[1], "netd_ready") == Some(1.0)
            && metric(&cluster.nodes[1], "netd_peers_programmed") == Some(2.0)
    });
    assert_eq!(metric(&cluster.nodes[1], "netd_registry_connected"), Some(0.0));
    assert!(ping(&cluster, 1, 2));

    // A change made while node 2 could not see the registry is picked up on return.
    let moved = EmbeddedRegistry::open(&away, Duration::from_millis(100));
    moved.delete_lease("garbage").unwrap();
    moved.delete_lease("outside").unwrap();
    moved.delete_lease("wrong-types").unwrap();
    moved
        .put_raw_lease("10.244.7.0-24", "node-7", r#"{"PublicIP":"192.168.50.77","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:77"}}"#, Duration::from_secs(3600))
        .unwrap();
    std::fs::rename(&away, &registry_path).unwrap();
    wait_for("resync after the registry returns", &[&daemons[1]], || {
        metric(&cluster.nodes[1], "netd_registry_connected") == Some(1.0)
            && metric(&cluster.nodes[1], "netd_peers_programmed") == Some(3.0)
    });
    assert!(cluster.nodes[1].ns.ip(&["route"]).unwrap().contains("10.244.7.0/24"));
    assert!(ping(&cluster, 1, 0));

    // cleanup removes what netd made.
    daemons[2].sigterm();
    let dir = state.path().join("node-3");
    let out = cluster.nodes[2]
        .ns
        .run(|| {
            Command::new(NETD)
                .args(["cleanup", "--state-dir"])
                .arg(&dir)
                .arg("--subnet-env")
                .arg(dir.join("subnet.env"))
                .output()
                .unwrap()
        })
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(cluster.nodes[2].ns.ip(&["link", "show", "flannel.1"]).is_err());
    assert!(!cluster.nodes[2].ns.ip(&["route"]).unwrap().contains("10.244.1.0"));
    assert!(!dir.join("subnet.env").exists());
    daemons[0].sigterm();
    let dir1 = state.path().join("node-1");
    let out = cluster.nodes[0]
        .ns
        .run(|| {
            Command::new(NETD)
                .args(["cleanup", "--state-dir"])
                .arg(&dir1)
                .arg("--subnet-env")
                .arg(dir1.join("subnet.env"))
                .output()
                .unwrap()
        })
        .unwrap();
    assert!(out.status.success());
    assert!(
        cluster.nodes[0].ns.exec("nft", &["list", "table", "ip", "netd-masq"]).is_err(),
        "cleanup removes the table"
    );
    assert!(dir.join("snapshot.json").exists(), "state is kept without --purge-state");
}

/// A lease in flannel's own form, on a 24 h etcd lease, as flanneld writes it.
fn put_flannel_lease(etcd: &EtcdServer, subnet: &str, ip: &str, mac: &str) {
    let granted = etcd.etcdctl(&["lease", "grant", "86400"]).unwrap();
    let id = granted.split_whitespace().nth(1).unwrap().to_string();
    let value = format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    );
    etcd.etcdctl(&["put", "--lease", &id, &format!("{SUBNETS_PREFIX}{subnet}"), &value]).unwrap();
}

fn has_route(node: &Node, dst: &str) -> bool {
    node.ns.ip(&["route", "show", dst]).unwrap().contains(dst)
}

/// Cuts `node` off the control plane (its packets to it are dropped, as on a
/// dead edge link) until the returned table is deleted.
fn cut_off(node: &Node) {
    let rules = format!(
        "table ip netd-test-cut {{\n chain out {{\n type filter hook output priority 0;\n ip daddr {CONTROL_PLANE_IP} drop\n }}\n}}\n"
    );
    node.ns.exec("nft", &[&rules]).unwrap();
}

fn reconnect(node: &Node) {
    node.ns.exec("nft", &["delete", "table", "ip", "netd-test-cut"]).unwrap();
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn etcd_stopped_for_a_while_traffic_continues_restart_restores_changes_are_picked_up() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let state = tempfile::tempdir().unwrap();
    let cluster = Cluster::new(3, 1).unwrap();
    // etcd runs on the underlay ("the cloud"); dropped before the cluster.
    let mut registry = EtcdScenarioRegistry::start_on(&cluster).unwrap();
    let spec = registry.registry_spec();
    // A flanneld node that is already in the cluster (no such host: its
    // routes are programmed, nothing is sent to it).
    put_flannel_lease(&registry.etcd, "10.244.8.0-24", "192.168.50.88", "0e:00:00:00:00:88");
    let mut daemons = start_daemons(&cluster, &spec, state.path(), 3);
    for node in &cluster.nodes {
        assert!(has_route(node, "10.244.8.0/24"));
    }
    assert!(ping(&cluster, 0, 1) && ping(&cluster, 1, 2) && ping(&cluster, 2, 0));
    // Our leases are flannel's: keys by subnet, values flanneld parses.
    let keys = registry.etcd.etcdctl(&["get", "--prefix", "--keys-only", SUBNETS_PREFIX]).unwrap();
    for number in 1..=3 {
        assert!(keys.contains(&format!("{SUBNETS_PREFIX}10.244.{number}.0-24")), "{keys}");
    }

    // etcd goes away for a while: every node notices, traffic continues.
    registry.stop().unwrap();
    for (node, daemon) in cluster.nodes.iter().zip(&daemons) {
        wait_for("registry marked down", &[daemon], || metric(node, "netd_registry_connected") == Some(0.0));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(ping(&cluster, 0, 1) && ping(&cluster, 1, 2) && ping(&cluster, 2, 0), "traffic continues without etcd");

    // netd on node 2 restarts with etcd still down: it restores from its
    // snapshot, the flanneld peer included.
    daemons[1].sigterm();
    daemons[1] = Daemon::start(&cluster.nodes[1], &spec, state.path());
    wait_for("ready from snapshot without etcd", &[&daemons[1]], || {
        metric(&cluster.nodes[1], "netd_ready") == Some(1.0)
            && metric(&cluster.nodes[1], "netd_peers_programmed") == Some(3.0)
    });
    assert_eq!(metric(&cluster.nodes[1], "netd_registry_connected"), Some(0.0));
    assert!(has_route(&cluster.nodes[1], "10.244.8.0/24"));
    assert!(ping(&cluster, 1, 2) && ping(&cluster, 0, 1));

    // etcd comes back, but node 2's link to it is still down while the
    // cluster changes: the flanneld node leaves, another joins.
    cut_off(&cluster.nodes[1]);
    registry.start().unwrap();
    registry.etcd.etcdctl(&["del", &format!("{SUBNETS_PREFIX}10.244.8.0-24")]).unwrap();
    put_flannel_lease(&registry.etcd, "10.244.7.0-24", "192.168.50.77", "0e:00:00:00:00:77");
    for number in [0, 2] {
        let node = &cluster.nodes[number];
        wait_for("the change on a connected node", &[&daemons[number]], || {
            metric(node, "netd_registry_connected") == Some(1.0)
                && has_route(node, "10.244.7.0/24")
                && !has_route(node, "10.244.8.0/24")
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    let node2 = &cluster.nodes[1];
    assert_eq!(metric(node2, "netd_registry_connected"), Some(0.0), "node 2 is cut off");
    assert!(has_route(node2, "10.244.8.0/24"), "a lease gone while we cannot see the registry is kept");
    assert!(!has_route(node2, "10.244.7.0/24"));

    // Node 2's link returns: the changes made meanwhile are picked up.
    reconnect(node2);
    wait_for("node 2 resyncs", &[&daemons[1]], || {
        metric(node2, "netd_registry_connected") == Some(1.0)
            && has_route(node2, "10.244.7.0/24")
            && !has_route(node2, "10.244.8.0/24")
    });
    assert_eq!(metric(node2, "netd_peers_programmed"), Some(3.0));
    assert!(ping(&cluster, 1, 0) && ping(&cluster, 1, 2) && ping(&cluster, 2, 1));
    for daemon in &mut daemons {
        daemon.sigterm();
    }
    drop(registry);
}

/// The demo's scenario (see `netd::testing::Scenario`), with its rollout
/// chapter (a copy of netd rolled over the nodes under a ping loop), on the
/// registry `make` starts on the cluster's control plane.
fn demo_scenario<R: ScenarioRegistry>(make: impl FnOnce(&Cluster) -> R) -> ScenarioReport {
    let state = tempfile::tempdir().unwrap();
    let cluster = Cluster::bare(3).unwrap();
    let registry = make(&cluster);
    let bin_dir = testing::plugin_dir_of(NETD);
    let next = state.path().join("netd-next");
    std::fs::copy(NETD, &next).unwrap();
    let scenario = Scenario::new(cluster, registry, &bin_dir, state.path(), |line| eprintln!("{line}"))
        .unwrap()
        .with_rollout(&next);
    let report = scenario.run().unwrap();
    let rollout = report.rollout.clone().expect("the rollout chapter ran");
    assert_eq!((rollout.pings_lost, rollout.restart_to_ready.len()), (0, 3), "{rollout:?}");
    assert!(rollout.pings_sent > 3 * 200, "pings across the whole rollout: {rollout:?}");
    assert_eq!(report.peers_after_resync, 2.0);
    assert!(report.traffic_back >= report.restored, "{report:?}");
    report
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn demo_scenario_on_the_embedded_registry() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let dir = tempfile::tempdir().unwrap();
    demo_scenario(|_| EmbeddedScenarioRegistry::create(&dir.path().join("registry.db")).unwrap());
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn demo_scenario_on_real_etcd() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    demo_scenario(|cluster| EtcdScenarioRegistry::start_on(cluster).unwrap());
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn demo_scenario_on_real_kube_apiserver() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    demo_scenario(|cluster| KubeScenarioRegistry::start_on(cluster).unwrap());
}

/// Revokes the etcd lease under `key`, as its expiry would.
fn expire_lease(etcd: &EtcdServer, key: &str) {
    let out = etcd.etcdctl(&["get", key, "-w", "json"]).unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = json["kvs"][0]["lease"].as_i64().unwrap_or_else(|| panic!("{key} has no lease: {out}"));
    etcd.etcdctl(&["lease", "revoke", &format!("{id:x}")]).unwrap();
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn an_autonomous_peer_whose_lease_expires_is_kept_also_across_a_restart() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let state = tempfile::tempdir().unwrap();
    let cluster = Cluster::new(3, 1).unwrap();
    let registry = EtcdScenarioRegistry::start_on(&cluster).unwrap();
    let etcd = &registry.etcd;
    let spec = registry.registry_spec();
    put_flannel_lease(etcd, "10.244.8.0-24", "192.168.50.88", "0e:00:00:00:00:88");
    let mut daemons = start_daemons(&cluster, &spec, state.path(), 3);
    // node-3 declares autonomy, then drops off the network for longer than
    // its lease: its netd is gone (kernel state stays, pods keep running)
    // and its lease expires. The flanneld node's lease expires too.
    etcd.etcdctl(&["put", "/coreos.com/network/autonomy/node-3", "true"]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    daemons[2].0.signal(libc::SIGKILL).unwrap();
    expire_lease(etcd, &format!("{SUBNETS_PREFIX}10.244.3.0-24"));
    expire_lease(etcd, &format!("{SUBNETS_PREFIX}10.244.8.0-24"));
    for number in [0, 1] {
        let node = &cluster.nodes[number];
        wait_for("the expired flanneld lease removed", &[&daemons[number]], || !has_route(node, "10.244.8.0/24"));
        assert!(has_route(node, "10.244.3.0/24"), "the autonomous peer is kept");
    }
    assert!(ping(&cluster, 0, 2), "pods on the autonomous node stay reachable");
    // What a restart reads: the snapshot with its journal replayed.
    let snapshot = Snapshot::load(&state.path().join("node-1/snapshot.json")).unwrap().unwrap();
    let snapshot = serde_json::to_string(&snapshot).unwrap();
    assert!(snapshot.contains(r#""autonomous":["10.244.3.0/24"]"#), "{snapshot}");

    // node-1's netd restarts while the lease is still gone: its snapshot
    // remembers the autonomy, so the registry's resync does not drop node-3.
    daemons[0].sigterm();
    daemons[0] = Daemon::start(&cluster.nodes[0], &spec, state.path());
    let node1 = &cluster.nodes[0];
    wait_for("node-1 resynced", &[&daemons[0]], || {
        metric(node1, "netd_registry_connected") == Some(1.0)
            && metric(node1, "netd_seconds_since_last_sync").is_some_and(|s| s < 5.0)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(has_route(node1, "10.244.3.0/24"), "{}", daemons[0].log());
    assert_eq!(metric(node1, "netd_peers_programmed"), Some(2.0));
    assert!(ping(&cluster, 0, 2) && ping(&cluster, 0, 1));

    // node-3 comes back re-imaged, on another subnet (its state is gone,
    // its VTEP MAC is derived from its name again, its subnet.env names
    // 10.244.5.0/24): the neighbours drop the kept entries for the node and
    // program its new lease, which would otherwise clash on the VTEP MAC.
    let node3_dir = state.path().join("node-3");
    std::fs::remove_dir_all(&node3_dir).unwrap();
    std::fs::create_dir_all(&node3_dir).unwrap();
    std::fs::write(
        node3_dir.join("subnet.env"),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    daemons[2] = Daemon::start(&cluster.nodes[2], &spec, state.path());
    wait_for("node-3 back", &[&daemons[2]], || metric(&cluster.nodes[2], "netd_registry_connected") == Some(1.0));
    let env = std::fs::read_to_string(node3_dir.join("subnet.env")).unwrap();
    assert!(env.contains("FLANNEL_SUBNET=10.244.5.1/24"), "{env}");
    for number in [0, 1] {
        let node = &cluster.nodes[number];
        wait_for("node-3's new lease programmed, its old entries gone", &[&daemons[number]], || {
            has_route(node, "10.244.5.0/24")
                && !has_route(node, "10.244.3.0/24")
                && metric(node, "netd_peers_programmed") == Some(2.0)
        });
    }
    let snapshot = Snapshot::load(&state.path().join("node-1/snapshot.json")).unwrap().unwrap();
    let snapshot = serde_json::to_string(&snapshot).unwrap();
    // node-3 still declares autonomy; only its new subnet carries it.
    assert!(snapshot.contains(r#""autonomous":["10.244.5.0/24"]"#), "{snapshot}");
    assert!(!snapshot.contains("10.244.3.0/24"), "{snapshot}");
    for daemon in &mut daemons {
        daemon.sigterm();
    }
}
