//! The `netd` daemon end to end on the embedded registry: three nodes in
//! namespaces, pods across them, registry outages, restarts, cleanup.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::NetworkConfig;
use netd::testing::{self, Cluster, NetdProcess, Node, HEALTH_ADDR};

const NETD: &str = env!("CARGO_BIN_EXE_netd");

/// `netd run` for `node` on the embedded registry, state under `state/<node>`.
struct Daemon(NetdProcess);

impl Daemon {
    fn start(node: &Node, registry: &Path, state: &Path) -> Self {
        let dir = state.join(&node.name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = testing::netd_run_args(&node.name, &format!("embedded:{}", registry.display()), &dir);
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        if Instant::now() > deadline {
            let logs: Vec<String> = daemons.iter().map(|d| d.log()).collect();
            panic!("timed out waiting for {what}; logs:\n{}", logs.join("\n----\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ping(cluster: &Cluster, from: usize, to: usize) -> bool {
    let target = cluster.nodes[to].pods[0].ip.to_string();
    cluster.nodes[from].pods[0].ns.exec("ping", &["-c1", "-W2", &target]).is_ok()
}

#[test]
fn daemons_keep_pods_talking_through_registry_outage_restart_and_bad_data() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let state = tempfile::tempdir().unwrap();
    let registry_path = state.path().join("registry.db");
    let config = NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&registry_path, &config).unwrap();
    let cluster = Cluster::new(3, 1).unwrap();
    let mut daemons = Vec::new();
    // Nodes join in order, so node i leases 10.244.i.0/24 (the first free
    // subnet), matching the pods' addresses.
    for node in &cluster.nodes {
        let daemon = Daemon::start(node, &registry_path, state.path());
        wait_for("readiness", &[&daemon], || http_get(node, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")));
        daemons.push(daemon);
    }
    for node in &cluster.nodes {
        wait_for("2 peers on every node", &daemons.iter().collect::<Vec<_>>(), || {
            metric(node, "netd_peers_programmed") == Some(2.0)
        });
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
    daemons[1] = Daemon::start(&cluster.nodes[1], &registry_path, state.path());
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
