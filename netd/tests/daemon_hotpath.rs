//! The daemon's hot path on real kernels: registry events become per-peer
//! kernel writes (no full pass), journaled so an acknowledged peer survives
//! `kill -9`; and a registry that blocks (a locked SQLite file) never stalls
//! the health endpoint or SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::NetworkConfig;
use netd::testing::{self, Cluster, NetdProcess, Node, HEALTH_ADDR};
use netd::vxlan::snapshot::{journal_path, Snapshot};

const NETD: &str = env!("CARGO_BIN_EXE_netd");

/// A one-node cluster whose netd runs on a fresh embedded registry.
struct Setup {
    dir: tempfile::TempDir,
    registry: PathBuf,
    state: PathBuf,
    cluster: Cluster,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("registry.db");
        let config = NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 };
        EmbeddedRegistry::create(&registry, &config).unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        Self { dir, registry, state, cluster: Cluster::new(1, 0).unwrap() }
    }

    fn node(&self) -> &Node {
        &self.cluster.nodes[0]
    }

    /// Starts netd and waits until it is ready.
    fn start(&self) -> NetdProcess {
        let netd = start(self.node(), &self.registry, &self.state);
        wait_for("ready", &netd, || testing::metric(&self.node().ns, "netd_ready") == Some(1.0));
        netd
    }
}

fn start(node: &Node, registry: &Path, state: &Path) -> NetdProcess {
    let args = testing::netd_run_args(&node.name, &format!("embedded:{}", registry.display()), state);
    NetdProcess::spawn(&node.ns, Path::new(NETD), args, &state.join("netd.log")).unwrap()
}

fn wait_for(what: &str, netd: &NetdProcess, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; log:\n{}", netd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A lease in flannel's JSON for peer `i` (subnet 10.244.(20+i).0/24).
fn put_peer(registry: &EmbeddedRegistry, i: u8) {
    let attrs = format!(
        r#"{{"PublicIP":"192.168.50.{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:00:00:00:01:{i:02x}"}}}}"#,
        100 + i
    );
    registry
        .put_raw_lease(&format!("10.244.{}.0-24", 20 + i), &format!("peer-{i}"), &attrs, Duration::from_secs(3600))
        .unwrap();
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn registry_events_are_applied_per_peer_and_survive_kill_9() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let setup = Setup::new();
    let (node, path, state, dir) = (setup.node(), &setup.registry, &setup.state, setup.dir.path());
    let mut netd = setup.start();
    let metric = |name: &str| testing::metric(&node.ns, name);
    // Start-up settles: the first resync, and the pass that confirms the
    // device creation its own link events announced.
    wait_for("first resync", &netd, || metric("netd_seconds_since_last_sync").is_some_and(|s| s >= 0.0));
    let mut passes = metric("netd_reconciles_total").unwrap();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = metric("netd_reconciles_total").unwrap();
        if now == passes {
            break;
        }
        passes = now;
    }
    let written = metric("netd_snapshot_bytes_written_total").unwrap();
    let registry = EmbeddedRegistry::open(path, Duration::from_millis(100));
    for i in 1..=8u8 {
        put_peer(&registry, i);
        // Acknowledged: the kernel holds it (netd reports it programmed).
        wait_for("peer programmed", &netd, || metric("netd_peers_programmed") == Some(f64::from(i)));
    }
    registry.delete_lease("peer-3").unwrap();
    wait_for("peer removed", &netd, || metric("netd_peers_programmed") == Some(7.0));
    let routes = node.ns.ip(&["route"]).unwrap();
    assert!(routes.contains("10.244.28.0/24") && !routes.contains("10.244.23.0/24"), "{routes}");
    // Every event took the incremental path: no full pass, and the
    // snapshot grew by journal lines, not a rewrite per event.
    assert_eq!(metric("netd_reconciles_total"), Some(passes), "{}", netd.log());
    assert!(metric("netd_peer_changes_applied_total").unwrap() >= 1.0);
    let per_event = (metric("netd_snapshot_bytes_written_total").unwrap() - written) / 9.0;
    assert!(per_event < 400.0, "{per_event} bytes per event");

    netd.signal(libc::SIGKILL).unwrap();
    let snapshot_path = state.join("snapshot.json");
    let base = Snapshot::parse(&std::fs::read(&snapshot_path).unwrap(), &snapshot_path).unwrap();
    assert!(base.peers.len() < 7, "the events were journaled, not rewritten into the snapshot");
    assert!(std::fs::metadata(journal_path(&snapshot_path)).unwrap().len() > 0);
    let loaded = Snapshot::load(&snapshot_path).unwrap().unwrap();
    let subnets: Vec<String> = loaded.peers.iter().map(|p| p.subnet.to_string()).collect();
    assert_eq!(subnets.len(), 7, "{subnets:?}");
    assert!(!subnets.contains(&"10.244.23.0/24".to_string()), "{subnets:?}");

    // A reboot with the registry unreachable: the kernel state is gone, the
    // journal brings back every acknowledged peer.
    std::fs::rename(path, dir.join("away.db")).unwrap();
    node.ns.ip(&["link", "del", "flannel.1"]).unwrap();
    let netd = start(node, path, state);
    wait_for("restored from snapshot and journal", &netd, || metric("netd_peers_programmed") == Some(7.0));
    assert!(node.ns.ip(&["route"]).unwrap().contains("10.244.28.0/24"));
    assert_eq!(metric("netd_registry_connected"), Some(0.0));
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn a_locked_registry_file_never_stalls_health_or_sigterm() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let setup = Setup::new();
    let (node, path) = (setup.node(), setup.registry.clone());
    let mut netd = setup.start();

    // Another process (this test, to netd) holds the database's exclusive
    // lock for 5 s: netd's watch poll waits in SQLite's 10 s busy timeout.
    let locker = std::thread::spawn({
        let path = path.clone();
        move || {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
            std::thread::sleep(Duration::from_secs(5));
            conn.execute_batch("ROLLBACK").unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(600));
    let mut slowest = Duration::ZERO;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let started = Instant::now();
        let response = testing::http_get(&node.ns, HEALTH_ADDR, "/healthz").unwrap_or_default();
        slowest = slowest.max(started.elapsed());
        assert!(response.starts_with("HTTP/1.1 200"), "{response:?}\n{}", netd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(slowest < Duration::from_millis(100), "/healthz took {slowest:?} while the registry was locked");
    let metrics = testing::http_get(&node.ns, HEALTH_ADDR, "/metrics").unwrap_or_default();
    assert!(metrics.contains("netd_ready 1"), "{metrics}");

    let started = Instant::now();
    let status = netd.signal(libc::SIGTERM).unwrap();
    let took = started.elapsed();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(took < Duration::from_secs(1), "SIGTERM took {took:?} with the registry locked");
    assert!(node.ns.ip(&["link", "show", "flannel.1"]).is_ok(), "SIGTERM leaves the device");
    locker.join().unwrap();
}
