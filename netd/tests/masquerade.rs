//! flannel's masquerade rule set in `table ip netd-masq`, programmed with
//! `nft -j` inside fresh network namespaces (never the root namespace):
//! content, idempotence, drift detection and repair, removal, isolation from
//! other tables, and real traffic being masqueraded (or not).

// Test helpers outside #[test] fns fail the test the same way an assertion would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use netd::masquerade::{Action, Masquerade, MasqueradeError, CHAIN, TABLE};
use netd::testing::{self, NetNs, VethPair};

fn masq() -> Masquerade {
    Masquerade::new("10.244.0.0/16".parse().unwrap(), "10.244.1.0/24".parse().unwrap()).unwrap()
}

/// `nft <args…>` inside `ns`; stdout.
fn nft(ns: &NetNs, args: &[&str]) -> String {
    String::from_utf8(ns.exec("nft", args).unwrap().stdout).unwrap()
}

/// `nft list table ip netd-masq` inside `ns`.
fn listing(ns: &NetNs) -> String {
    nft(ns, &["list", "table", "ip", TABLE])
}

/// How many tables called netd-masq exist in `ns`, any family.
fn masq_tables(ns: &NetNs) -> usize {
    nft(ns, &["list", "tables"]).lines().filter(|l| l.trim().ends_with(&format!(" {TABLE}"))).count()
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn apply_installs_flannels_six_rules() {
    let Some(_kernel) = testing::privileged().unwrap() else {
        return;
    };
    let root_before = Masquerade::installed().unwrap();
    let ns = NetNs::new().unwrap();
    let m = masq();
    ns.run(|| m.apply()).unwrap().unwrap();

    let text = listing(&ns);
    let rules: Vec<&str> = text.lines().map(str::trim).filter(|l| l.contains("counter packets")).collect();
    assert_eq!(rules.len(), 6, "{text}");
    assert!(text.contains("type nat hook postrouting priority srcnat; policy accept;"), "{text}");
    let expected = [
        "meta mark & 0x00004000 == 0x00004000 counter packets 0 bytes 0 return",
        "ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 counter packets 0 bytes 0 return",
        "ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 counter packets 0 bytes 0 return",
        "ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 counter packets 0 bytes 0 return",
        "ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 counter packets 0 bytes 0 masquerade fully-random",
        "ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 counter packets 0 bytes 0 masquerade fully-random",
    ];
    assert_eq!(rules, expected, "{text}");
    assert_eq!(text.matches("masquerade fully-random").count(), 2, "{text}");

    let installed = ns.run(Masquerade::installed).unwrap().unwrap().expect("table is installed");
    assert_eq!(installed.rule_count(), 6);
    let chain = installed.chain(CHAIN).unwrap();
    assert_eq!(chain.base.as_ref().unwrap().priority, 100);
    let actions: Vec<Action> = chain.rules.iter().map(|r| r.rule.as_ref().unwrap().action).collect();
    assert_eq!(actions.iter().filter(|a| **a == Action::MasqueradeFullyRandom).count(), 2);
    assert!(m.matches(&installed));
    assert!(ns.run(|| m.is_current()).unwrap().unwrap());
    // Only the namespace got it: the root namespace's table (normally absent) is as it was.
    assert_eq!(Masquerade::installed().unwrap(), root_before, "root namespace touched");
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn apply_twice_is_idempotent_and_leaves_other_tables_alone() {
    let Some(_kernel) = testing::privileged().unwrap() else {
        return;
    };
    let ns = NetNs::new().unwrap();
    nft(&ns, &["add", "table", "ip", "someone-else"]);
    nft(&ns, &["add", "chain", "ip", "someone-else", "c", "{ type filter hook forward priority 0; }"]);
    nft(&ns, &["add", "rule", "ip", "someone-else", "c", "ip daddr 10.244.9.9 drop"]);
    let other_before = nft(&ns, &["list", "table", "ip", "someone-else"]);

    let m = masq();
    ns.run(|| m.apply()).unwrap().unwrap();
    let first = listing(&ns);
    ns.run(|| m.apply()).unwrap().unwrap();
    let second = listing(&ns);
    assert_eq!(first, second);
    assert_eq!(masq_tables(&ns), 1);
    assert!(ns.run(|| m.is_current()).unwrap().unwrap());
    // ensure() on a current table does nothing.
    assert!(!ns.run(|| m.ensure()).unwrap().unwrap());

    // A different subnet replaces the rule set whole.
    let other = Masquerade::new("10.244.0.0/16".parse().unwrap(), "10.244.2.0/24".parse().unwrap()).unwrap();
    assert!(!ns.run(|| other.is_current()).unwrap().unwrap());
    ns.run(|| other.apply()).unwrap().unwrap();
    let replaced = listing(&ns);
    assert!(!replaced.contains("10.244.1.0/24"), "{replaced}");
    assert_eq!(replaced.matches("10.244.2.0/24").count(), 3, "{replaced}");
    assert!(!ns.run(|| m.is_current()).unwrap().unwrap());

    ns.run(Masquerade::remove).unwrap().unwrap();
    assert_eq!(nft(&ns, &["list", "table", "ip", "someone-else"]), other_before);
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn drift_is_detected_and_repaired() {
    let Some(_kernel) = testing::privileged().unwrap() else {
        return;
    };
    let ns = NetNs::new().unwrap();
    let m = masq();
    ns.run(|| m.apply()).unwrap().unwrap();

    // Someone deletes the first masquerade rule.
    let installed = ns.run(Masquerade::installed).unwrap().unwrap().unwrap();
    let handle = installed.chain(CHAIN).unwrap().rules[4].handle.to_string();
    nft(&ns, &["delete", "rule", "ip", TABLE, CHAIN, "handle", &handle]);
    assert_eq!(listing(&ns).matches("masquerade").count(), 1);
    assert!(!ns.run(|| m.is_current()).unwrap().unwrap());
    ns.run(|| m.apply()).unwrap().unwrap();
    assert!(ns.run(|| m.is_current()).unwrap().unwrap());
    assert_eq!(ns.run(Masquerade::installed).unwrap().unwrap().unwrap().rule_count(), 6);

    // Someone flushes the chain; ensure() repairs it.
    nft(&ns, &["flush", "chain", "ip", TABLE, CHAIN]);
    assert_eq!(ns.run(Masquerade::installed).unwrap().unwrap().unwrap().rule_count(), 0);
    assert!(!ns.run(|| m.is_current()).unwrap().unwrap());
    assert!(ns.run(|| m.ensure()).unwrap().unwrap());
    assert!(ns.run(|| m.is_current()).unwrap().unwrap());

    // Someone appends a rule of their own.
    nft(&ns, &["add", "rule", "ip", TABLE, CHAIN, "ip daddr 10.244.9.9 return"]);
    assert!(!ns.run(|| m.is_current()).unwrap().unwrap());
    assert!(ns.run(|| m.ensure()).unwrap().unwrap());
    assert!(!listing(&ns).contains("10.244.9.9"));

    // Someone makes the table dormant (every rule off); nft 1.0.6 lists that
    // table as broken JSON, which is_current reports as drift too.
    nft(&ns, &["add", "table", "ip", TABLE, "{ flags dormant; }"]);
    assert!(listing(&ns).contains("dormant"));
    assert!(!ns.run(|| m.is_current()).unwrap().unwrap());
    assert!(ns.run(|| m.ensure()).unwrap().unwrap());
    assert!(!listing(&ns).contains("dormant"));
    assert!(ns.run(|| m.is_current()).unwrap().unwrap());

    // Someone deletes the table.
    nft(&ns, &["delete", "table", "ip", TABLE]);
    assert!(ns.run(Masquerade::installed).unwrap().unwrap().is_none());
    assert!(!ns.run(|| m.is_current()).unwrap().unwrap());
    assert!(ns.run(|| m.ensure()).unwrap().unwrap());
    assert!(ns.run(|| m.is_current()).unwrap().unwrap());
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn remove_deletes_the_table_and_tolerates_absence() {
    let Some(_kernel) = testing::privileged().unwrap() else {
        return;
    };
    let ns = NetNs::new().unwrap();
    // Absent from the start: fine.
    ns.run(Masquerade::remove).unwrap().unwrap();
    assert!(ns.run(Masquerade::installed).unwrap().unwrap().is_none());

    ns.run(|| masq().apply()).unwrap().unwrap();
    assert_eq!(masq_tables(&ns), 1);
    ns.run(Masquerade::remove).unwrap().unwrap();
    assert_eq!(masq_tables(&ns), 0);
    assert!(ns.exec("nft", &["list", "table", "ip", TABLE]).is_err());
    assert!(ns.run(Masquerade::installed).unwrap().unwrap().is_none());
    ns.run(Masquerade::remove).unwrap().unwrap();
    assert!(!ns.run(|| masq().is_current()).unwrap().unwrap());
}

#[test]
fn subnet_outside_network_is_a_precise_error() {
    let err = Masquerade::new("10.244.0.0/16".parse().unwrap(), "10.96.1.0/24".parse().unwrap()).unwrap_err();
    assert!(
        matches!(err, MasqueradeError::SubnetOutsideNetwork { network, subnet }
            if network.to_string() == "10.244.0.0/16" && subnet.to_string() == "10.96.1.0/24"),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("10.96.1.0/24") && message.contains("10.244.0.0/16"), "{message}");
}

/// Sends one TCP connection from `from` to `to_ip:port` (a listener in
/// `server`) and returns the source address the server saw.
fn peer_seen(from: &NetNs, server: &NetNs, to_ip: &str) -> String {
    let bind = format!("{to_ip}:0");
    let listener = server.run(move || TcpListener::bind(bind).unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    let accept = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(b"pong").unwrap();
        peer.ip().to_string()
    });
    let target = format!("{to_ip}:{port}");
    let reply = from
        .run(move || {
            let mut stream = TcpStream::connect(target.as_str()).unwrap();
            stream.write_all(b"ping").unwrap();
            let mut reply = [0u8; 4];
            stream.read_exact(&mut reply).unwrap();
            reply
        })
        .unwrap();
    assert_eq!(&reply, b"pong");
    accept.join().unwrap()
}

/// pod (10.244.1.2) — node (10.244.1.1 | 198.51.100.1, forwarding, netd-masq)
/// — outside (198.51.100.2, also holding 10.244.2.1 as a pod of another node).
#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn pod_traffic_leaving_the_cluster_is_masqueraded_and_cluster_traffic_is_not() {
    let Some(_kernel) = testing::privileged().unwrap() else {
        return;
    };
    let pod = NetNs::new().unwrap();
    let node = NetNs::new().unwrap();
    let outside = NetNs::new().unwrap();
    let _pod_link = VethPair::new((Some(&pod), "eth0"), (Some(&node), "pod0")).unwrap();
    let _uplink = VethPair::new((Some(&node), "eth0"), (Some(&outside), "eth0")).unwrap();
    pod.ip(&["addr", "add", "10.244.1.2/24", "dev", "eth0"]).unwrap();
    pod.ip(&["link", "set", "eth0", "up"]).unwrap();
    pod.ip(&["route", "add", "default", "via", "10.244.1.1"]).unwrap();
    node.ip(&["addr", "add", "10.244.1.1/24", "dev", "pod0"]).unwrap();
    node.ip(&["addr", "add", "198.51.100.1/24", "dev", "eth0"]).unwrap();
    node.ip(&["link", "set", "pod0", "up"]).unwrap();
    node.ip(&["link", "set", "eth0", "up"]).unwrap();
    node.ip(&["route", "add", "10.244.2.0/24", "via", "198.51.100.2"]).unwrap();
    node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).unwrap();
    outside.ip(&["addr", "add", "198.51.100.2/24", "dev", "eth0"]).unwrap();
    outside.ip(&["addr", "add", "10.244.2.1/32", "dev", "lo"]).unwrap();
    outside.ip(&["link", "set", "eth0", "up"]).unwrap();
    // Other nodes route cluster subnets to their node; that route also lets the
    // control connection at the end work without masquerade.
    outside.ip(&["route", "add", "10.244.1.0/24", "via", "198.51.100.1"]).unwrap();

    let m = masq();
    node.run(|| m.apply()).unwrap().unwrap();

    // Pod -> outside the cluster: masqueraded to the node's address by rule 5.
    assert_eq!(peer_seen(&pod, &outside, "198.51.100.2"), "198.51.100.1");
    // Pod -> pod on another node: source kept (rule 2 returns).
    assert_eq!(peer_seen(&pod, &outside, "10.244.2.1"), "10.244.1.2");

    let installed = node.run(Masquerade::installed).unwrap().unwrap().unwrap();
    let packets: Vec<u64> = installed.chain(CHAIN).unwrap().rules.iter().map(|r| r.counter.unwrap().packets).collect();
    // A nat chain sees the first packet of each connection only.
    assert_eq!(packets[1], 1, "rule 2 (S -> N return): {packets:?}");
    assert_eq!(packets[4], 1, "rule 5 (N -> !multicast masquerade): {packets:?}");
    assert_eq!(packets[5], 0, "rule 6: {packets:?}");

    // Control: without the table the same connection arrives from the pod
    // address, so the rewrite above is netd's doing.
    node.run(Masquerade::remove).unwrap().unwrap();
    assert_eq!(peer_seen(&pod, &outside, "198.51.100.2"), "10.244.1.2");
}
