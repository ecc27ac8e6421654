//! The VXLAN data plane on real kernels: three "nodes" in namespaces joined
//! by an underlay bridge, "pods" behind each node's cni0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netd::ipam::{derive_vtep_mac, MacAddr, Store};
use netd::testing::{self, Cluster, Node};
use netd::vxlan::snapshot::Snapshot;
use netd::vxlan::{Lease, Overlay, OverlayOptions, ReconcileReport, Reconciler};

fn mac_of(node: &Node) -> MacAddr {
    derive_vtep_mac(&node.name, 0)
}

fn leases(cluster: &Cluster) -> Vec<Lease> {
    cluster.nodes.iter().map(|n| n.lease(mac_of(n))).collect()
}

fn peers_of(cluster: &Cluster, node: &Node) -> Vec<Lease> {
    leases(cluster).into_iter().filter(|l| l.subnet != node.subnet()).collect()
}

/// One reconcile pass inside the node's namespace.
fn program(node: &Node, peers: &[Lease]) -> ReconcileReport {
    let config = node.overlay_config(mac_of(node));
    node.ns.run(|| Reconciler::new(config)?.reconcile(peers)).unwrap().unwrap()
}

fn ping(from: &testing::Pod, to: std::net::Ipv4Addr) -> bool {
    from.pings(to)
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn three_nodes_talk_over_vxlan_with_flannels_layout() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let cluster = Cluster::new(3, 1).unwrap();
    for node in &cluster.nodes {
        let report = program(node, &peers_of(&cluster, node));
        assert!(report.device_created);
        assert_eq!(report.peers, 2);
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        assert!(report.rejected.is_empty());
    }
    for (from, to) in [(0, 1), (0, 2), (2, 1), (1, 0)] {
        let pod = &cluster.nodes[from].pods[0];
        let target = cluster.nodes[to].pods[0].ip;
        assert!(ping(pod, target), "pod {} cannot reach {target}", pod.ip);
    }

    let node = &cluster.nodes[0];
    let peer = &cluster.nodes[1];
    let link = node.ns.ip(&["-d", "link", "show", "flannel.1"]).unwrap();
    for want in [
        "mtu 1450",
        &format!("link/ether {}", mac_of(node)),
        "vxlan id 1 local 192.168.50.11 dev eth0",
        "dstport 8472",
        "nolearning",
        "state UNKNOWN",
    ] {
        assert!(link.contains(want), "`ip -d link` lacks {want:?}:\n{link}");
    }
    let addr = node.ns.ip(&["-4", "addr", "show", "dev", "flannel.1"]).unwrap();
    assert!(addr.contains("inet 10.244.1.0/32 scope global flannel.1"), "{addr}");
    assert_eq!(addr.matches("inet ").count(), 1);
    let neigh = node.ns.ip(&["neigh", "show", "dev", "flannel.1"]).unwrap();
    assert!(neigh.contains(&format!("10.244.2.0 lladdr {} PERMANENT", mac_of(peer))), "{neigh}");
    assert_eq!(neigh.lines().count(), 2, "{neigh}");
    let fdb = String::from_utf8(node.ns.exec("bridge", &["fdb", "show", "dev", "flannel.1"]).unwrap().stdout).unwrap();
    assert!(fdb.contains(&format!("{} dst 192.168.50.12 self permanent", mac_of(peer))), "{fdb}");
    assert_eq!(fdb.lines().filter(|l| l.contains(" dst ")).count(), 2, "{fdb}");
    let routes = node.ns.ip(&["route", "show"]).unwrap();
    let route = routes.lines().find(|l| l.starts_with("10.244.2.0/24")).unwrap_or_default();
    assert!(route.contains("via 10.244.2.0 dev flannel.1") && route.contains("onlink"), "{routes}");
    assert!(route.contains(&format!("nhid {}", u32::from(std::net::Ipv4Addr::new(10, 244, 2, 0)))), "{route}");
}

/// Collects `ip monitor` output in `node` while `f` runs.
fn monitor_during(node: &Node, f: impl FnOnce()) -> String {
    let mut child = Command::new("ip")
        .args(["-n", node.ns.name(), "-o", "monitor", "link", "address", "neigh", "route", "nexthop"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    f();
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.wait().unwrap();
    out
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn restart_changes_nothing_and_drift_is_repaired() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let cluster = Cluster::new(3, 1).unwrap();
    for node in &cluster.nodes {
        program(node, &peers_of(&cluster, node));
    }
    let node = &cluster.nodes[0];
    let peers = peers_of(&cluster, node);
    // Flannel left a route of a node deleted while it was down.
    node.ns.ip(&["route", "add", "10.244.9.0/24", "via", "10.244.9.0", "dev", "flannel.1", "onlink"]).unwrap();
    let report = program(node, &peers);
    assert_eq!((report.writes, report.removed), (1, 1), "only the stale route goes");
    assert!(!node.ns.ip(&["route"]).unwrap().contains("10.244.9.0"));

    // A restarted programmer (fresh reconciler, same state) writes nothing
    // and the kernel emits no event.
    let state = |n: &Node| {
        let fdb = n.ns.exec("bridge", &["fdb", "show", "dev", "flannel.1"]).unwrap().stdout;
        (
            n.ns.ip(&["neigh"]).unwrap(),
            fdb,
            n.ns.ip(&["route"]).unwrap(),
            n.ns.ip(&["-d", "link", "show", "flannel.1"]).unwrap(),
        )
    };
    let before = state(node);
    let mut writes = usize::MAX;
    let events = monitor_during(node, || writes = program(node, &peers).writes);
    assert_eq!(writes, 0);
    assert_eq!(events.trim(), "", "a no-op restart made the kernel announce changes");
    assert_eq!(state(node), before);

    // Overlay thread: drift is repaired from notifications.
    let config = node.overlay_config(mac_of(node));
    let overlay = node.ns.run(|| Overlay::start(config, peers.clone(), OverlayOptions::default())).unwrap().unwrap();
    overlay.reconcile_now().unwrap();

    node.ns.ip(&["link", "set", "flannel.1", "address", "02:00:00:00:00:99"]).unwrap();
    let mac = mac_of(node).to_string();
    wait_until("MAC restored", || node.ns.ip(&["link", "show", "flannel.1"]).unwrap().contains(&mac));

    node.ns.ip(&["link", "del", "flannel.1"]).unwrap();
    wait_until("device re-created with peers", || {
        node.ns.ip(&["route"]).map(|r| r.contains("10.244.2.0/24") && r.contains("10.244.3.0/24")).unwrap_or(false)
    });
    assert!(ping(&node.pods[0], cluster.nodes[2].pods[0].ip), "traffic after device re-creation");

    node.ns.ip(&["neigh", "del", "10.244.3.0", "dev", "flannel.1"]).unwrap();
    wait_until("neighbour restored", || node.ns.ip(&["neigh"]).unwrap().contains("10.244.3.0"));

    // A removed peer leaves nothing behind.
    let report = overlay.set_peers_and_wait(peers[..1].to_vec()).unwrap();
    assert_eq!(report.removed, 4, "route, nexthop, fdb, neighbour of the removed peer");
    let (neigh, fdb, routes, _) = state(node);
    let gone = mac_of(&cluster.nodes[2]).to_string();
    assert!(!neigh.contains("10.244.3.0") && !routes.contains("10.244.3.0"), "{neigh}\n{routes}");
    assert!(!String::from_utf8_lossy(&fdb).contains(&gone));
    assert!(!node.ns.ip(&["nexthop"]).unwrap().contains("10.244.3.0"));
    let status = overlay.status();
    assert!(status.repairs >= 2, "{status:?}");
    overlay.stop();
    // Stopping leaves the kernel state: pods keep talking.
    assert!(ping(&node.pods[0], cluster.nodes[1].pods[0].ip));
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn rebooted_node_restores_from_snapshot_without_registry() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let state_dir = tempfile::tempdir().unwrap();
    let snapshot_path = state_dir.path().join("snapshot.json");
    let store_path = state_dir.path().join("ipam.db");
    let mut cluster = Cluster::new(3, 1).unwrap();
    for node in &cluster.nodes[..1] {
        program(node, &peers_of(&cluster, node));
    }
    for node in &cluster.nodes[2..] {
        program(node, &peers_of(&cluster, node));
    }
    // Node 2 takes its MAC from the persistent store and runs the overlay
    // thread with a snapshot.
    let node2_mac = Store::open(&store_path).unwrap().vtep_mac("node-2", &[]).unwrap().mac;
    assert_eq!(node2_mac, mac_of(&cluster.nodes[1]));
    {
        let node = &cluster.nodes[1];
        let peers = peers_of(&cluster, node);
        let options = OverlayOptions { snapshot: Some(snapshot_path.clone()), ..OverlayOptions::default() };
        let config = node.overlay_config(node2_mac);
        let overlay = node.ns.run(|| Overlay::start(config, peers, options)).unwrap().unwrap();
        overlay.reconcile_now().unwrap();
        overlay.stop();
    }
    assert!(ping(&cluster.nodes[0].pods[0], cluster.nodes[1].pods[0].ip));

    // Reboot: namespace destroyed, everything the kernel held is gone.
    let node = cluster.reboot(2).unwrap();
    assert!(node.ns.ip(&["link", "show", "flannel.1"]).is_err());
    // Start: store and snapshot only, no registry anywhere.
    let mac = Store::open(&store_path).unwrap().vtep_mac("node-2", &[]).unwrap();
    assert!(mac.from_store);
    let snapshot = Snapshot::load(&snapshot_path).unwrap().unwrap();
    assert_eq!(snapshot.config.own.vtep_mac, mac.mac);
    let report = node.ns.run(|| Reconciler::new(snapshot.config)?.reconcile(&snapshot.peers)).unwrap().unwrap();
    assert_eq!(report.peers, 2);
    assert!(node.ns.ip(&["link", "show", "flannel.1"]).unwrap().contains(&mac.mac.to_string()));
    let node2_pod = cluster.nodes[1].pods[0].ip;
    assert!(ping(&cluster.nodes[0].pods[0], node2_pod), "node 1 -> rebooted node 2");
    assert!(ping(&cluster.nodes[1].pods[0], cluster.nodes[2].pods[0].ip), "rebooted node 2 -> node 3");
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn bad_peer_data_is_refused_and_never_disturbs_good_peers() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let cluster = Cluster::new(2, 1).unwrap();
    program(&cluster.nodes[1], &peers_of(&cluster, &cluster.nodes[1]));
    let node = &cluster.nodes[0];
    let good = peers_of(&cluster, node);
    let mut peers = good.clone();
    let bad = |subnet: &str, ip: &str, mac: &str| Lease {
        subnet: subnet.parse().unwrap(),
        public_ip: ip.parse().unwrap(),
        vtep_mac: mac.parse().unwrap(),
        node: Some("hostile".into()),
    };
    peers.extend([
        bad("10.244.1.0/24", "192.168.50.40", "6e:00:00:00:00:41"), // claims our subnet
        bad("10.244.2.128/25", "192.168.50.41", "6e:00:00:00:00:42"), // overlaps node 2
        bad("10.244.7.0/24", "192.168.50.42", "ff:ff:ff:ff:ff:ff"), // invalid MAC
        bad("10.244.8.0/24", "127.0.0.1", "6e:00:00:00:00:44"),     // unroutable
        bad("10.244.9.0/24", "224.0.0.9", "6e:00:00:00:00:45"),     // unroutable
    ]);
    let report = program(node, &peers);
    assert_eq!(report.peers, 1);
    assert_eq!(report.rejected.len(), 5, "{:?}", report.rejected);
    let reasons: Vec<String> = report.rejected.iter().map(|r| r.to_string()).collect();
    for want in
        ["overlaps our own subnet", "overlaps peer subnet 10.244.2.0/24", "not a unicast", "loopback", "multicast"]
    {
        assert!(reasons.iter().any(|r| r.contains(want)), "no rejection says {want:?}: {reasons:#?}");
    }
    assert!(report.failures.is_empty());
    assert!(ping(&node.pods[0], cluster.nodes[1].pods[0].ip));
    let routes = node.ns.ip(&["route"]).unwrap();
    for absent in ["10.244.7.0", "10.244.8.0", "10.244.9.0", "10.244.2.128"] {
        assert!(!routes.contains(absent), "{routes}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn direct_routing_uses_the_underlay_for_peers_on_the_same_l2() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let cluster = Cluster::new(2, 1).unwrap();
    for node in &cluster.nodes {
        let mut config = node.overlay_config(mac_of(node));
        config.direct_routing = true;
        let peers = peers_of(&cluster, node);
        let report = node.ns.run(|| Reconciler::new(config)?.reconcile(&peers)).unwrap().unwrap();
        assert_eq!((report.peers, report.writes), (1, 2), "nexthop + route only");
    }
    let node = &cluster.nodes[0];
    let routes = node.ns.ip(&["route"]).unwrap();
    assert!(routes.contains("10.244.2.0/24 nhid") && routes.contains("via 192.168.50.12 dev eth0"), "{routes}");
    assert_eq!(node.ns.ip(&["neigh", "show", "dev", "flannel.1"]).unwrap().trim(), "");
    let fdb = node.ns.exec("bridge", &["fdb", "show", "dev", "flannel.1"]).unwrap().stdout;
    assert!(!String::from_utf8_lossy(&fdb).contains(" dst "));
    assert!(ping(&node.pods[0], cluster.nodes[1].pods[0].ip));
    // Turning direct routing off moves the peer onto VXLAN in place.
    let config = node.overlay_config(mac_of(node));
    let peers = peers_of(&cluster, node);
    let report = node.ns.run(|| Reconciler::new(config)?.reconcile(&peers)).unwrap().unwrap();
    assert_eq!(report.writes, 3, "neighbour, FDB, nexthop replaced; the route keeps its nhid");
    assert!(node.ns.ip(&["route"]).unwrap().contains("via 10.244.2.0 dev flannel.1 onlink"));
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn incremental_changes_write_only_what_changed_and_agree_with_a_full_pass() {
    use netd::vxlan::{Applied, PeerChange};
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let cluster = Cluster::new(3, 1).unwrap();
    program(&cluster.nodes[1], &peers_of(&cluster, &cluster.nodes[1]));
    program(&cluster.nodes[2], &peers_of(&cluster, &cluster.nodes[2]));
    let node = &cluster.nodes[0];
    let config = node.overlay_config(mac_of(node));
    let upsert = |lease: &Lease| PeerChange::Upsert { lease: lease.clone(), autonomous: false };
    let applied = |outcome: Applied| match outcome {
        Applied::Done(report) => {
            assert!(report.failures.is_empty(), "{:?}", report.failures);
            report
        }
        Applied::NeedsFullPass(why) => panic!("unexpected full pass: {why}"),
    };
    node.ns
        .run(|| {
            let mut reconciler = Reconciler::new(config).unwrap();
            // Before any pass there is no device state to build on.
            assert!(matches!(reconciler.apply(&[]).unwrap(), Applied::NeedsFullPass(_)));
            let peers = peers_of(&cluster, node);
            reconciler.reconcile(&peers[..1]).unwrap();

            // A new peer: neighbour, FDB, nexthop, route — nothing else.
            let report = applied(reconciler.apply(&[upsert(&peers[1])]).unwrap());
            assert_eq!((report.writes, report.removed, report.peers), (4, 0, 2));
            assert!(ping(&node.pods[0], cluster.nodes[2].pods[0].ip), "new peer reachable at once");

            // The same lease again writes nothing.
            assert_eq!(applied(reconciler.apply(&[upsert(&peers[1])]).unwrap()).writes, 0);

            // Moved to another public IP: only the FDB entry changes.
            let moved = Lease { public_ip: "192.168.50.99".parse().unwrap(), ..peers[1].clone() };
            assert_eq!(applied(reconciler.apply(&[upsert(&moved)]).unwrap()).writes, 1);
            let fdb = String::from_utf8(
                Command::new("bridge").args(["fdb", "show", "dev", "flannel.1"]).output().unwrap().stdout,
            )
            .unwrap();
            assert!(fdb.contains("dst 192.168.50.99") && !fdb.contains("dst 192.168.50.13"), "{fdb}");

            // A new VTEP MAC: neighbour replaced, new FDB entry, old one removed.
            let remac = Lease { vtep_mac: "0e:aa:00:00:00:03".parse().unwrap(), ..peers[1].clone() };
            let report = applied(reconciler.apply(&[upsert(&remac)]).unwrap());
            assert_eq!((report.writes, report.removed), (3, 1));

            // A newcomer with a programmed peer's MAC is refused, nothing written.
            let clash = Lease {
                subnet: "10.244.9.0/24".parse().unwrap(),
                public_ip: "192.168.50.98".parse().unwrap(),
                ..remac.clone()
            };
            let report = applied(reconciler.apply(&[upsert(&clash)]).unwrap());
            assert_eq!(report.writes, 0);
            assert!(
                report.rejected[0].reason.contains("already used by the peer with subnet 10.244.3.0/24"),
                "{:?}",
                report.rejected
            );
            // While it waits, removing the winner needs a full pass (it may fit now).
            assert!(matches!(
                reconciler.apply(&[PeerChange::Remove(remac.subnet)]).unwrap(),
                Applied::NeedsFullPass(_)
            ));

            // The full pass finds the kernel exactly as the changes left it.
            let wanted = vec![peers[0].clone(), remac.clone(), clash.clone()];
            let report = reconciler.reconcile(&wanted).unwrap();
            assert_eq!(report.writes, 0, "incremental writes left the kernel as a full pass wants it");

            // Removal in reverse order, four writes, the route gone.
            let report = applied(reconciler.apply(&[PeerChange::Remove(clash.subnet)]).unwrap());
            assert_eq!(report.writes, 0, "a refused peer was never programmed");
            let report = applied(reconciler.apply(&[PeerChange::Remove(remac.subnet)]).unwrap());
            assert_eq!((report.writes, report.removed, report.peers), (4, 4, 1));
            let routes = String::from_utf8(Command::new("ip").args(["route"]).output().unwrap().stdout).unwrap();
            assert!(!routes.contains("10.244.3.0/24") && routes.contains("10.244.2.0/24"), "{routes}");
            assert_eq!(reconciler.reconcile(&peers[..1]).unwrap().writes, 0);

            // Drift: an entry removed behind our back makes the write fail, visibly.
            Command::new("ip").args(["route", "del", "10.244.2.0/24"]).status().unwrap();
            match reconciler.apply(&[PeerChange::Remove(peers[0].subnet)]).unwrap() {
                Applied::Done(report) => assert!(!report.failures.is_empty(), "the missing route shows"),
                Applied::NeedsFullPass(why) => panic!("{why}"),
            }
        })
        .unwrap();
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn the_overlay_thread_applies_changes_without_full_passes() {
    use netd::vxlan::PeerChange;
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let cluster = Cluster::new(3, 1).unwrap();
    program(&cluster.nodes[2], &peers_of(&cluster, &cluster.nodes[2]));
    let node = &cluster.nodes[0];
    let peers = peers_of(&cluster, node);
    let dir = tempfile::tempdir().unwrap();
    let options = OverlayOptions { snapshot: Some(dir.path().join("snapshot.json")), ..OverlayOptions::default() };
    let config = node.overlay_config(mac_of(node));
    let overlay = node.ns.run(|| Overlay::start(config, peers[..1].to_vec(), options)).unwrap().unwrap();
    overlay.reconcile_now().unwrap();
    // Creating the device makes the kernel announce link changes, some of
    // them later (carrier): they get a confirming pass. Count from after it.
    let mut passes = overlay.status().reconciles;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = overlay.status().reconciles;
        if now == passes {
            break;
        }
        passes = now;
    }
    let report =
        overlay.apply_and_wait(vec![PeerChange::Upsert { lease: peers[1].clone(), autonomous: true }]).unwrap();
    assert_eq!(report.writes, 4);
    assert!(ping(&node.pods[0], cluster.nodes[2].pods[0].ip));
    // The kernel's notifications of our own writes start no pass.
    std::thread::sleep(Duration::from_millis(300));
    let status = overlay.status();
    assert_eq!((status.reconciles, status.applies), (passes, 1), "{status:?}");
    // Journaled, not rewritten: the snapshot on disk still has one peer,
    // the journal the second, and loading replays it.
    let base = std::fs::read(dir.path().join("snapshot.json")).unwrap();
    assert_eq!(Snapshot::parse(&base, dir.path()).unwrap().peers.len(), 1);
    let loaded = Snapshot::load(&dir.path().join("snapshot.json")).unwrap().unwrap();
    assert_eq!(loaded.peers.len(), 2);
    assert_eq!(loaded.autonomous, vec![peers[1].subnet]);
    // Someone else's change is still drift: repaired by a full pass.
    node.ns.ip(&["route", "del", &peers[1].subnet.to_string()]).unwrap();
    wait_until("route repaired", || node.ns.ip(&["route"]).unwrap().contains(&peers[1].subnet.to_string()));
    assert!(overlay.status().reconciles > passes);
    overlay.stop();
}
