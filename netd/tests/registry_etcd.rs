//! The etcd registry against a real etcd 3.4 (Debian's `etcd-server`):
//! flannel's layout byte for byte, leases on 24 h etcd leases, the watch,
//! bad data, and etcd going away and coming back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime};

use etcd_client::{Client, PutOptions};
use ipnet::Ipv4Net;
use netd::model::autonomy::Autonomy;
use netd::model::flannel::CONFIG_KEY;
use netd::registry::etcd::EtcdRegistry;
use netd::registry::{
    LeaseRequest, NetworkConfig, PeerEvent, PeerLease, Registry, RegistryError, ReplicaRecord, ReplicaStore,
    REPLICA_TTL,
};
use netd::testing::EtcdServer;

/// flannel's network config, exactly as operators write it.
const CONFIG_JSON: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#;
const SUBNETS: &str = "/coreos.com/network/subnets/";

fn config() -> NetworkConfig {
    NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 }
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn request(node: &str, ip: &str, mac_last: u8) -> LeaseRequest {
    LeaseRequest {
        node: node.into(),
        public_ip: ip.parse().unwrap(),
        vtep_mac: netd::ipam::MacAddr([0x0e, 0, 0, 0, 0, mac_last]),
        previous_subnet: None,
    }
}

/// A lease value in flannel's own (v0.2x) JSON form.
fn flannel_value(ip: &str, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}},"BackendV6Data":null}}"#
    )
}

/// Logs (the skipped-data warnings) go to the test's captured output.
fn init_logs() {
    let _ = tracing_subscriber::fmt().with_ansi(false).with_test_writer().try_init();
}

/// An etcd with the network config written by `etcdctl`, as flannel's
/// operators do.
fn configured_etcd() -> EtcdServer {
    let etcd = EtcdServer::new().unwrap();
    etcd.etcdctl(&["put", CONFIG_KEY, CONFIG_JSON]).unwrap();
    etcd
}

async fn registry(etcd: &EtcdServer) -> EtcdRegistry {
    EtcdRegistry::connect(&[etcd.endpoint()]).await.unwrap()
}

async fn client(etcd: &EtcdServer) -> Client {
    Client::connect([etcd.endpoint()], None).await.unwrap()
}

/// Writes `value` at `key` on a fresh etcd lease of `ttl` seconds, as
/// another node (flannel) would.
async fn put_leased(client: &mut Client, key: &str, value: &str, ttl: i64) -> i64 {
    let lease = client.lease_grant(ttl, None).await.unwrap().id();
    client.put(key, value, Some(PutOptions::new().with_lease(lease))).await.unwrap();
    lease
}

async fn value_of(client: &mut Client, key: &str) -> Option<(Vec<u8>, i64)> {
    let response = client.get(key, None).await.unwrap();
    response.kvs().first().map(|kv| (kv.value().to_vec(), kv.lease()))
}

async fn next(registry: &mut EtcdRegistry, own: Ipv4Net) -> PeerEvent {
    tokio::time::timeout(Duration::from_secs(15), registry.next_event(own))
        .await
        .expect("no registry event within 15 s")
        .unwrap()
}

fn resync_subnets(event: PeerEvent) -> Vec<PeerLease> {
    match event {
        PeerEvent::Resync(mut peers) => {
            peers.sort_by_key(|p| p.lease.subnet);
            peers
        }
        other => panic!("expected a resync, got {other:?}"),
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn leases_are_flannels_on_24h_etcd_leases() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    init_logs();
    let etcd = EtcdServer::new().unwrap();
    let mut a = registry(&etcd).await;

    // No config yet: a precise, non-transient error.
    let err = a.network_config().await.unwrap_err();
    assert!(matches!(err, RegistryError::BadConfig(_)) && !err.is_transient(), "{err}");
    assert!(err.to_string().contains("holds no /coreos.com/network/config"), "{err}");
    etcd.etcdctl(&["put", CONFIG_KEY, CONFIG_JSON]).unwrap();
    let config = config();
    assert_eq!(a.network_config().await.unwrap(), config);
    a.put_network_config(&config).await.unwrap();
    let other = NetworkConfig { network: net("10.9.0.0/16"), ..config };
    let err = a.put_network_config(&other).await.unwrap_err().to_string();
    assert!(err.contains("already holds"), "{err}");
    let mut c = client(&etcd).await;
    assert_eq!(value_of(&mut c, CONFIG_KEY).await.unwrap().0, CONFIG_JSON.as_bytes());

    // Two nodes: distinct subnets, the second keeps its previous one.
    let lease_a = a.acquire_lease(&config, &request("a", "192.168.50.11", 1)).await.unwrap();
    assert_eq!(lease_a.lease.subnet, net("10.244.1.0/24"));
    assert_eq!(lease_a.lease.node.as_deref(), Some("a"));
    let mut b = registry(&etcd).await;
    let mut req_b = request("b", "192.168.50.12", 2);
    req_b.previous_subnet = Some(net("10.244.7.0/24"));
    let lease_b = b.acquire_lease(&config, &req_b).await.unwrap();
    assert_eq!(lease_b.lease.subnet, net("10.244.7.0/24"), "previous subnet kept");

    // Values byte-exact as flannel writes them; the node name beside them.
    let (value, lease_id) = value_of(&mut c, "/coreos.com/network/subnets/10.244.1.0-24").await.unwrap();
    assert_eq!(
        String::from_utf8(value).unwrap(),
        r#"{"PublicIP":"192.168.50.11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}}"#
    );
    let (name, name_lease) = value_of(&mut c, "/coreos.com/network/nodes/10.244.1.0-24").await.unwrap();
    assert_eq!((name.as_slice(), name_lease), (b"a".as_slice(), lease_id), "name key on the same etcd lease");
    let (value_b, _) = value_of(&mut c, "/coreos.com/network/subnets/10.244.7.0-24").await.unwrap();
    assert_eq!(
        value_b,
        br#"{"PublicIP":"192.168.50.12","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}}"#
    );

    // The etcd lease: 24 h, as etcd itself and etcdctl report it.
    assert_ne!(lease_id, 0, "lease key without an etcd lease");
    let ttl = c.lease_time_to_live(lease_id, None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 24 * 3600);
    assert!(ttl.ttl() > 24 * 3600 - 60, "remaining TTL {}", ttl.ttl());
    let shown = etcd.etcdctl(&["lease", "timetolive", &format!("{lease_id:x}")]).unwrap();
    assert!(shown.contains("granted with TTL(86400s)"), "{shown}");
    let expires = lease_a.expires_at.unwrap();
    assert!(expires > SystemTime::now() + Duration::from_secs(23 * 3600 + 3500), "{expires:?}");

    // Same public IP under another name (a reinstalled node, or a node
    // claiming a's address): a's named lease is a's alone. The claimant gets
    // its own subnet; a's value, name and etcd lease stay.
    let claimant = a.acquire_lease(&config, &request("a2", "192.168.50.11", 9)).await.unwrap();
    assert_ne!(claimant.lease.subnet, lease_a.lease.subnet);
    let (value, lease_again) = value_of(&mut c, "/coreos.com/network/subnets/10.244.1.0-24").await.unwrap();
    assert!(String::from_utf8(value).unwrap().contains(r#""VtepMAC":"0e:00:00:00:00:01""#));
    assert_eq!(lease_again, lease_id);
    assert_eq!(value_of(&mut c, "/coreos.com/network/nodes/10.244.1.0-24").await.unwrap().0, b"a");
    let claimant_key = format!("{SUBNETS}{}", claimant.lease.subnet.to_string().replace('/', "-"));
    let (_, claimant_lease) = value_of(&mut c, &claimant_key).await.unwrap();
    c.lease_revoke(claimant_lease).await.unwrap();
    // A lease flannel wrote (no name beside it) is found by its public IP,
    // as flannel finds it: a node taking over from flannel keeps its subnet.
    put_leased(&mut c, &format!("{SUBNETS}10.244.30.0-24"), &flannel_value("192.168.50.30", "ce:00:00:00:00:30"), 3600)
        .await;
    let taken_over = a.acquire_lease(&config, &request("f", "192.168.50.30", 30)).await.unwrap();
    assert_eq!(taken_over.lease.subnet, net("10.244.30.0/24"));
    assert_eq!(value_of(&mut c, "/coreos.com/network/nodes/10.244.30.0-24").await.unwrap().0, b"f");

    // Renew keeps the subnet and the 24 h.
    let renewed = b.renew_lease(&lease_b).await.unwrap();
    assert_eq!(renewed.lease, lease_b.lease);
    assert!(renewed.expires_at >= lease_b.expires_at);
    // The key vanished (expired while the node was cut off): renewing takes
    // the same subnet again, on a fresh 24 h etcd lease.
    let (_, old_b) = value_of(&mut c, "/coreos.com/network/subnets/10.244.7.0-24").await.unwrap();
    c.lease_revoke(old_b).await.unwrap();
    assert!(value_of(&mut c, "/coreos.com/network/subnets/10.244.7.0-24").await.is_none());
    assert!(value_of(&mut c, "/coreos.com/network/nodes/10.244.7.0-24").await.is_none(), "name key expires along");
    let back = b.renew_lease(&lease_b).await.unwrap();
    assert_eq!(back.lease.subnet, lease_b.lease.subnet);
    let (_, new_b) = value_of(&mut c, "/coreos.com/network/subnets/10.244.7.0-24").await.unwrap();
    assert_eq!(c.lease_time_to_live(new_b, None).await.unwrap().granted_ttl(), 24 * 3600);

    // A previous subnet someone else holds is not taken.
    let mut req_x = request("x", "192.168.50.13", 3);
    req_x.previous_subnet = Some(lease_b.lease.subnet);
    let lease_x = a.acquire_lease(&config, &req_x).await.unwrap();
    assert!(![lease_a.lease.subnet, lease_b.lease.subnet].contains(&lease_x.lease.subnet));

    // Many nodes at once: the compare-and-swap gives each its own subnet.
    let mut tasks = Vec::new();
    for i in 0..6u8 {
        let mut r = registry(&etcd).await;
        tasks.push(tokio::spawn(async move {
            r.acquire_lease(&config, &request(&format!("n{i}"), &format!("192.168.51.{}", 10 + i), 20 + i)).await
        }));
    }
    let mut subnets = vec![lease_a.lease.subnet, lease_b.lease.subnet, lease_x.lease.subnet];
    for task in tasks {
        subnets.push(task.await.unwrap().unwrap().lease.subnet);
    }
    let distinct: std::collections::BTreeSet<_> = subnets.iter().collect();
    assert_eq!(distinct.len(), subnets.len(), "{subnets:?}");

    // Another prefix (flannel's -etcd-prefix), and exhaustion as a precise error.
    let tiny = NetworkConfig { network: net("10.244.0.0/23"), subnet_len: 24, vni: 1 };
    let mut t = registry(&etcd).await.with_prefix("/netd-test/tiny");
    t.put_network_config(&tiny).await.unwrap();
    assert_eq!(t.network_config().await.unwrap(), tiny);
    t.acquire_lease(&tiny, &request("t1", "192.168.52.1", 30)).await.unwrap();
    assert!(value_of(&mut c, "/netd-test/tiny/subnets/10.244.1.0-24").await.is_some());
    let err = t.acquire_lease(&tiny, &request("t2", "192.168.52.2", 31)).await.unwrap_err();
    assert!(matches!(err, RegistryError::NoFreeSubnet { .. }), "{err}");
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn watch_delivers_resync_then_changes_and_skips_bad_data() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    init_logs();
    let etcd = configured_etcd();
    let config = config();
    let mut a = registry(&etcd).await;
    let mut b = registry(&etcd).await;
    let lease_a = a.acquire_lease(&config, &request("a", "192.168.50.11", 1)).await.unwrap();
    let own = b.acquire_lease(&config, &request("b", "192.168.50.12", 2)).await.unwrap().lease.subnet;
    let mut c = client(&etcd).await;
    // A flannel node's lease, in flannel's own JSON.
    put_leased(&mut c, &format!("{SUBNETS}10.244.3.0-24"), &flannel_value("192.168.50.13", "ce:11:22:33:44:55"), 3600)
        .await;

    let peers = resync_subnets(next(&mut b, own).await);
    assert_eq!(peers.len(), 2, "a and the flannel node, never b itself: {peers:?}");
    assert_eq!(peers[0].lease, lease_a.lease);
    assert!(!peers[0].autonomous);
    assert_eq!(peers[1].lease.subnet, net("10.244.3.0/24"));
    assert_eq!(peers[1].lease.public_ip.to_string(), "192.168.50.13");
    assert_eq!(peers[1].lease.vtep_mac.to_string(), "ce:11:22:33:44:55");
    assert_eq!(peers[1].lease.node, None, "flannel leases carry no node name");

    // Dropping a pending next_event (as the daemon's select! does) loses nothing.
    for _ in 0..3 {
        assert!(tokio::time::timeout(Duration::from_millis(50), b.next_event(own)).await.is_err());
    }
    put_leased(&mut c, &format!("{SUBNETS}10.244.4.0-24"), &flannel_value("192.168.50.14", "ce:00:00:00:00:04"), 3600)
        .await;
    match next(&mut b, own).await {
        PeerEvent::Upsert(peer) => {
            assert_eq!(peer.lease.subnet, net("10.244.4.0/24"));
            assert_eq!(peer.lease.vtep_mac.to_string(), "ce:00:00:00:00:04");
        }
        other => panic!("expected an upsert, got {other:?}"),
    }

    // Bad data is skipped; the watch goes on and the next good lease arrives.
    let bad = [
        ("10.244.20.0-24", "{\"PublicIP\":".to_string()),
        ("10.244.21.0-24", r#"{"PublicIP":7,"BackendType":"vxlan"}"#.to_string()),
        (
            "10.244.22.0-24",
            r#"{"PublicIP":"192.168.50.22","BackendType":"vxlan","BackendData":{"VNI":"x","VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#
                .to_string(),
        ),
        ("10.244.23.0-24", r#"{"PublicIP":"192.168.50.23","BackendType":"udp"}"#.to_string()),
        ("10.9.0.0-24", flannel_value("192.168.50.24", "ce:00:00:00:00:24")),
        ("10.244.25.0-25", flannel_value("192.168.50.25", "ce:00:00:00:00:25")),
        ("10.244.26.1-24", flannel_value("192.168.50.26", "ce:00:00:00:00:26")),
        ("garbage", flannel_value("192.168.50.27", "ce:00:00:00:00:27")),
    ];
    for (key, value) in &bad {
        put_leased(&mut c, &format!("{SUBNETS}{key}"), value, 3600).await;
    }
    put_leased(&mut c, &format!("{SUBNETS}10.244.5.0-24"), &flannel_value("192.168.50.15", "ce:00:00:00:00:05"), 3600)
        .await;
    match next(&mut b, own).await {
        PeerEvent::Upsert(peer) => assert_eq!(peer.lease.subnet, net("10.244.5.0/24"), "bad leases reported"),
        other => panic!("expected the good lease only, got {other:?}"),
    }
    // A fresh resync skips them too, the other peers unaffected.
    let mut fresh = registry(&etcd).await;
    let subnets: Vec<_> = resync_subnets(next(&mut fresh, own).await).iter().map(|p| p.lease.subnet).collect();
    assert_eq!(subnets, [lease_a.lease.subnet, net("10.244.3.0/24"), net("10.244.4.0/24"), net("10.244.5.0/24")]);

    // Autonomy: stored beside flannel's keys, read into the peer.
    b.set_autonomy("a", Autonomy::Forever).await.unwrap();
    assert_eq!(value_of(&mut c, "/coreos.com/network/autonomy/a").await.unwrap().0, b"true");
    match next(&mut b, own).await {
        PeerEvent::Upsert(peer) => assert!(peer.autonomous && peer.lease.subnet == lease_a.lease.subnet),
        other => panic!("expected a's autonomy, got {other:?}"),
    }
    assert!(b.set_autonomy("", Autonomy::Forever).await.is_err());

    // Delete, and a value that turns bad: both remove the peer.
    c.delete(format!("{SUBNETS}10.244.4.0-24"), None).await.unwrap();
    assert_eq!(next(&mut b, own).await, PeerEvent::Remove(net("10.244.4.0/24")));
    c.put(format!("{SUBNETS}10.244.5.0-24"), "not json", None).await.unwrap();
    assert_eq!(next(&mut b, own).await, PeerEvent::Remove(net("10.244.5.0/24")));

    // Expiry of the etcd lease is a removal too.
    put_leased(&mut c, &format!("{SUBNETS}10.244.6.0-24"), &flannel_value("192.168.50.16", "ce:00:00:00:00:06"), 2)
        .await;
    assert!(matches!(next(&mut b, own).await, PeerEvent::Upsert(p) if p.lease.subnet == net("10.244.6.0/24")));
    assert_eq!(next(&mut b, own).await, PeerEvent::Remove(net("10.244.6.0/24")));

    // Our own subnet changing under us never shows up as a peer.
    b.acquire_lease(&config, &request("b", "192.168.50.12", 3)).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(500), b.next_event(own)).await.is_err());
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn etcd_away_then_back_resyncs_and_keeps_subnets() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    init_logs();
    let mut etcd = configured_etcd();
    let config = config();
    let mut a = registry(&etcd).await;
    let mut b = registry(&etcd).await;
    let lease_a = a.acquire_lease(&config, &request("a", "192.168.50.11", 1)).await.unwrap();
    let lease_b = b.acquire_lease(&config, &request("b", "192.168.50.12", 2)).await.unwrap();
    let own = lease_b.lease.subnet;
    assert_eq!(resync_subnets(next(&mut b, own).await).len(), 1);

    etcd.stop().unwrap();
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), b.next_event(own)).await.unwrap().unwrap_err();
    assert!(matches!(err, RegistryError::Unreachable(_)) && err.is_transient(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15), "noticed only after {:?}", started.elapsed());
    eprintln!("watch lost after {:?}: {err}", started.elapsed());
    // Still away: every call says so, within the request deadline.
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), b.next_event(own)).await.unwrap().unwrap_err();
    assert!(matches!(err, RegistryError::Unreachable(_)), "{err}");
    eprintln!("resync refused after {:?}: {err}", started.elapsed());
    let err = a.acquire_lease(&config, &request("a", "192.168.50.11", 1)).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    let endpoint = [etcd.endpoint()];
    assert!(matches!(EtcdRegistry::connect(&endpoint).await, Err(RegistryError::Unreachable(_))));
    let mut lazy = EtcdRegistry::connect_lazy(&endpoint).await.unwrap();
    assert!(lazy.network_config().await.unwrap_err().is_transient());
    assert!(matches!(
        EtcdRegistry::connect_lazy(&["http://[nope".to_string()]).await,
        Err(RegistryError::BadConfig(_))
    ));

    etcd.start().unwrap();
    // Changes the watcher missed: a left, a flannel node joined.
    let mut c = client(&etcd).await;
    c.delete(format!("{SUBNETS}10.244.1.0-24"), None).await.unwrap();
    put_leased(&mut c, &format!("{SUBNETS}10.244.9.0-24"), &flannel_value("192.168.50.19", "ce:00:00:00:00:19"), 3600)
        .await;
    let peers = resync_subnets(next(&mut b, own).await);
    let subnets: Vec<_> = peers.iter().map(|p| p.lease.subnet).collect();
    assert_eq!(subnets, [net("10.244.9.0/24")], "resync after the outage");
    // And the watch runs again.
    put_leased(&mut c, &format!("{SUBNETS}10.244.10.0-24"), &flannel_value("192.168.50.20", "ce:00:00:00:00:20"), 3600)
        .await;
    assert!(matches!(next(&mut b, own).await, PeerEvent::Upsert(p) if p.lease.subnet == net("10.244.10.0/24")));

    // A node restarted after the outage, knowing nothing but its public IP,
    // gets its subnet back; the lease a lost is taken again the same way.
    let mut rebooted = registry(&etcd).await;
    let again = rebooted.acquire_lease(&config, &request("b", "192.168.50.12", 2)).await.unwrap();
    assert_eq!(again.lease.subnet, lease_b.lease.subnet);
    let mut req_a = request("a", "192.168.50.11", 1);
    req_a.previous_subnet = Some(lease_a.lease.subnet);
    assert_eq!(a.acquire_lease(&config, &req_a).await.unwrap().lease.subnet, lease_a.lease.subnet);
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn a_silent_etcd_is_noticed_by_keepalive() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    init_logs();
    let etcd = configured_etcd();
    let mut b = registry(&etcd).await;
    let own = b.acquire_lease(&config(), &request("b", "192.168.50.12", 2)).await.unwrap().lease.subnet;
    assert!(resync_subnets(next(&mut b, own).await).is_empty());
    // A frozen etcd keeps its sockets open: only the HTTP/2 pings notice.
    let pid = etcd.pid().unwrap() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(60), b.next_event(own)).await;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let err = outcome.expect("a frozen etcd went unnoticed for 60 s").unwrap_err();
    eprintln!("frozen etcd noticed after {:?}: {err}", started.elapsed());
    assert!(err.is_transient(), "{err}");
    assert!(resync_subnets(next(&mut b, own).await).is_empty());
}

/// SPEC §4: an autonomous node's subnet is never given to another node, even
/// after etcd has dropped its lease key (24 h of silence, here a revoke);
/// bounded autonomy keeps it for the bound after the last renewal only.
#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn an_autonomous_nodes_subnet_outlives_its_lease_key() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    init_logs();
    let etcd = configured_etcd();
    let mut c = client(&etcd).await;
    const RESERVED_A: &str = "/coreos.com/network/reserved/a";
    let mut a = registry(&etcd).await;
    let subnet = a.acquire_lease(&config(), &request("a", "192.0.2.1", 1)).await.unwrap().lease.subnet;
    let key = format!("{SUBNETS}{}", netd::model::flannel::subnet_key(subnet));
    assert!(value_of(&mut c, RESERVED_A).await.is_none(), "a node that is not autonomous reserves nothing");

    let changes = a.set_autonomy("a", Autonomy::Forever).await.unwrap();
    assert!(changes.iter().any(|c| c.field == RESERVED_A), "{changes:?}");
    let (value, etcd_lease) = value_of(&mut c, RESERVED_A).await.unwrap();
    assert_eq!(etcd_lease, 0, "the reservation must outlive the node's silence");
    let value: serde_json::Value = serde_json::from_slice(&value).unwrap();
    assert_eq!((value["version"].as_u64(), value["subnet"].as_str()), (Some(1), Some(subnet.to_string().as_str())));
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let renewed = value["renewedAt"].as_u64().unwrap();
    assert!(now.abs_diff(renewed) <= 5, "renewedAt {renewed} is the lease's last renewal, now {now}");

    // The lease lapses: etcd drops the key with its etcd lease.
    let (_, id) = value_of(&mut c, &key).await.unwrap();
    c.lease_revoke(id).await.unwrap();
    assert!(value_of(&mut c, &key).await.is_none());
    // A new node asking for exactly that subnet gets another one.
    let mut b = registry(&etcd).await;
    let mut wants = request("b", "192.0.2.2", 2);
    wants.previous_subnet = Some(subnet);
    let b_subnet = b.acquire_lease(&config(), &wants).await.unwrap().lease.subnet;
    assert_ne!(b_subnet, subnet, "a lapsed autonomous node's subnet was given away");
    let report = b.node_autonomy("a").await.unwrap();
    let lease = report.lease.clone().expect("the reserved subnet is reported");
    assert!(lease.subnet == subnet && lease.kept_while_autonomous, "{lease:?}");
    let report = netd::autonomy::Report {
        kind: netd::autonomy::RegistryKind::Etcd,
        registry: b.describe(),
        node: report,
        now: SystemTime::now(),
    };
    let lease_line = report.implications().lease;
    assert!(lease_line.contains("lapsed") && lease_line.contains("no other node gets this subnet"), "{lease_line}");

    // a, back after a reboot that lost its snapshot, gets its own subnet.
    let back = a.acquire_lease(&config(), &request("a", "192.0.2.1", 1)).await.unwrap();
    assert_eq!(back.lease.subnet, subnet);

    // Bounded: once the bound has run from the last renewal, the subnet is
    // free for others again.
    a.set_autonomy("a", Autonomy::For(Duration::from_secs(5))).await.unwrap();
    let (_, id) = value_of(&mut c, &key).await.unwrap();
    c.lease_revoke(id).await.unwrap();
    let mut wants = request("c", "192.0.2.3", 3);
    wants.previous_subnet = Some(subnet);
    let mut other = registry(&etcd).await;
    assert_ne!(other.acquire_lease(&config(), &wants).await.unwrap().lease.subnet, subnet, "within the bound");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut d = registry(&etcd).await;
    let mut wants = request("d", "192.0.2.4", 4);
    wants.previous_subnet = Some(subnet);
    assert_eq!(d.acquire_lease(&config(), &wants).await.unwrap().lease.subnet, subnet, "after the bound");

    // Off: the reservation goes with the flag.
    a.set_autonomy("a", Autonomy::Off).await.unwrap();
    assert!(value_of(&mut c, RESERVED_A).await.is_none());

    // An unreadable reservation is skipped (with a warning) and blocks nothing;
    // a newer format is not guessed at.
    c.put("/coreos.com/network/reserved/x", "{not json", None).await.unwrap();
    c.put("/coreos.com/network/reserved/y", r#"{"version":2,"subnet":"10.244.9.0/24","renewedAt":1}"#, None)
        .await
        .unwrap();
    c.put("/coreos.com/network/autonomy/y", "true", None).await.unwrap();
    let mut e = registry(&etcd).await;
    let mut wants = request("e", "192.0.2.5", 5);
    wants.previous_subnet = Some(net("10.244.9.0/24"));
    assert_eq!(e.acquire_lease(&config(), &wants).await.unwrap().lease.subnet, net("10.244.9.0/24"));
}

/// Tunnel server replicas under `tunnel-replicas/<id>`, each on an etcd
/// lease of its record's lifetime: etcd drops a replica that stops
/// announcing by itself; unreadable values are skipped.
#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn tunnel_replicas_live_on_etcd_leases() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    init_logs();
    const REPLICAS: &str = "/coreos.com/network/tunnel-replicas/";
    let etcd = configured_etcd();
    let mut c = client(&etcd).await;
    let mut r = registry(&etcd).await;
    let now = SystemTime::now();
    let unix_now = now.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    assert!(r.replicas(now).await.unwrap().is_empty());

    // Two replicas (b first), from two clients: listed by id, exactly.
    let a = ReplicaRecord::new("cloud-a", "10.0.0.5:10265", false, REPLICA_TTL, now);
    let b = ReplicaRecord::new("cloud-b", "10.0.0.6:10265", false, REPLICA_TTL, now);
    let mut other = registry(&etcd).await;
    other.announce_replica(&b).await.unwrap();
    r.announce_replica(&a).await.unwrap();
    let listed = r.replicas(now).await.unwrap();
    assert_eq!(listed, vec![a.clone(), b.clone()]);
    let expected_a = ReplicaRecord {
        version: 1,
        id: "cloud-a".into(),
        address: "10.0.0.5:10265".into(),
        draining: false,
        expires_at: unix_now + 15,
    };
    assert_eq!(listed[0], expected_a);
    assert_eq!(other.replicas(now).await.unwrap(), listed);
    // The value is the record's JSON, on an etcd lease of its lifetime.
    let (value, lease) = value_of(&mut c, &format!("{REPLICAS}cloud-a")).await.unwrap();
    assert_eq!(String::from_utf8(value).unwrap(), a.to_json());
    assert_ne!(lease, 0, "a replica key without an etcd lease outlives its replica");
    let granted = c.lease_time_to_live(lease, None).await.unwrap().granted_ttl();
    assert!((14..=15).contains(&granted), "granted TTL {granted}");

    // a drains: its announcement replaces the previous one.
    let a_draining = ReplicaRecord::new("cloud-a", "10.0.0.5:10265", true, REPLICA_TTL, now);
    r.announce_replica(&a_draining).await.unwrap();
    assert_eq!(r.replicas(now).await.unwrap(), vec![a_draining.clone(), b.clone()]);

    // A short-lived announcement: listed now, then etcd itself drops it
    // with its lease (etcd's minimum lease TTL is 2 s; give it a few more).
    let short = ReplicaRecord::new("cloud-c", "10.0.0.7:10265", false, Duration::from_secs(1), SystemTime::now());
    other.announce_replica(&short).await.unwrap();
    let short_key = format!("{REPLICAS}cloud-c");
    assert!(value_of(&mut c, &short_key).await.is_some());
    assert!(r.replicas(SystemTime::now()).await.unwrap().contains(&short));
    let announced = std::time::Instant::now();
    while value_of(&mut c, &short_key).await.is_some() {
        assert!(announced.elapsed() < Duration::from_secs(6), "etcd kept {short_key} past its lease");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("etcd dropped the 1 s announcement after {:?}", announced.elapsed());
    assert_eq!(r.replicas(SystemTime::now()).await.unwrap(), vec![a_draining.clone(), b.clone()]);

    // Garbage written by someone else is skipped; the others still listed.
    c.put(format!("{REPLICAS}cloud-junk"), "{not json", None).await.unwrap();
    c.put(format!("{REPLICAS}cloud-liar"), b.to_json(), None).await.unwrap();
    c.put(format!("{REPLICAS}nested/cloud-x"), a.to_json().replace("cloud-a", "nested/cloud-x"), None).await.unwrap();
    assert_eq!(r.replicas(now).await.unwrap(), vec![a_draining.clone(), b.clone()]);
    // Another prefix holds no replicas.
    let mut elsewhere = registry(&etcd).await.with_prefix("/netd-test/other");
    assert!(elsewhere.replicas(now).await.unwrap().is_empty());

    // Withdrawn: true once, then false; the key is gone from etcd.
    assert!(r.withdraw_replica("cloud-b").await.unwrap());
    assert!(!r.withdraw_replica("cloud-b").await.unwrap());
    assert!(value_of(&mut c, &format!("{REPLICAS}cloud-b")).await.is_none());
    assert_eq!(r.replicas(now).await.unwrap(), vec![a_draining.clone()]);

    // A bad id is refused before any key is built, naming the rule.
    let bad = ReplicaRecord::new("a/b", "10.0.0.8:10265", false, REPLICA_TTL, now);
    for err in [r.announce_replica(&bad).await.unwrap_err(), r.withdraw_replica("a/b").await.unwrap_err()] {
        assert!(matches!(err, RegistryError::Refused { .. }) && !err.is_transient(), "{err}");
        let text = err.to_string();
        assert!(text.contains(r#"naming tunnel replica "a/b""#) && text.contains("[A-Za-z0-9._-]"), "{text}");
    }
    assert!(value_of(&mut c, &format!("{REPLICAS}a/b")).await.is_none());
}
