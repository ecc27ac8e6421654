//! The embedding example end to end: two nodes in network namespaces each
//! run `embed-overlay` (netd's data plane inside the application's own
//! runtime); their pods talk over VXLAN; SIGTERM stops each application
//! cleanly through its own handler, and the overlay it programmed keeps
//! carrying the pods' traffic afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use netd_registry::embedded::EmbeddedRegistry;
use netd_registry::NetworkConfig;
use netd_testing::{self as testing, Cluster, NetdProcess};

const EMBED_OVERLAY: &str = env!("CARGO_BIN_EXE_embed-overlay");

fn wait_for(what: &str, apps: &[&NetdProcess], mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(45);
    while !check() {
        if Instant::now() > deadline {
            let logs: Vec<String> = apps.iter().map(|a| a.log()).collect();
            panic!("timed out waiting for {what}; logs:\n{}", logs.join("\n----\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ping(cluster: &Cluster, from: usize, to: usize) -> bool {
    cluster.nodes[from].pods[0].pings(cluster.nodes[to].pods[0].ip)
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn an_application_embedding_the_overlay_connects_pods_and_stops_on_its_own_signal() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let state = tempfile::tempdir().unwrap();
    let registry_path = state.path().join("registry.db");
    let config = NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&registry_path, &config).unwrap();
    let cluster = Cluster::new(2, 1).unwrap();
    let mut apps = Vec::new();
    // Nodes join in order, so node i leases 10.244.i.0/24 (the first free
    // subnet), matching the pods' addresses.
    for node in &cluster.nodes {
        let dir = state.path().join(&node.name);
        std::fs::create_dir_all(&dir).unwrap();
        let args = [
            "--node-name".into(),
            node.name.clone(),
            format!("--registry=embedded:{}", registry_path.display()),
            "--state-dir".into(),
            dir.display().to_string(),
            "--iface".into(),
            "eth0".into(),
        ];
        // The application and netd log to stderr: one log.
        let app = NetdProcess::spawn(&node.ns, EMBED_OVERLAY.as_ref(), args, &dir.join("app.log")).unwrap();
        wait_for("the application to report the overlay ready", &[&app], || app.log().contains("app: overlay ready"));
        apps.push(app);
    }
    let refs: Vec<&NetdProcess> = apps.iter().collect();
    wait_for("pods on both nodes to talk over the embedded overlay", &refs, || {
        ping(&cluster, 0, 1) && ping(&cluster, 1, 0)
    });

    for (app, node) in apps.iter_mut().zip(&cluster.nodes) {
        let status = app.signal(libc::SIGTERM).unwrap();
        let log = app.log();
        assert!(status.is_some_and(|s| s.success()), "{} exited with {status:?} on SIGTERM:\n{log}", node.name);
        assert!(log.contains("app: SIGTERM"), "the application's own handler saw the signal:\n{log}");
        assert!(log.contains("app: overlay stopped, kernel state left in place"), "{log}");
    }
    // Both applications are gone; what the overlay programmed is not.
    assert!(ping(&cluster, 0, 1) && ping(&cluster, 1, 0), "pods stopped talking once the applications stopped");
}
