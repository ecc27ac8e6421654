//! The embedded registry: leases, watch, bad data, unreachability.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use netd::model::autonomy::Autonomy;
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::{LeaseRequest, NetworkConfig, PeerEvent, Registry, RegistryError};

fn request(node: &str, ip: &str, mac_last: u8) -> LeaseRequest {
    LeaseRequest {
        node: node.into(),
        public_ip: ip.parse().unwrap(),
        vtep_mac: netd::ipam::MacAddr([0x0e, 0, 0, 0, 0, mac_last]),
        previous_subnet: None,
    }
}

#[tokio::test]
async fn leases_watch_and_bad_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let mut a = EmbeddedRegistry::open(&path, Duration::from_millis(20));
    // Not created yet: unreachable, and nothing was created implicitly.
    assert!(matches!(a.network_config().await, Err(RegistryError::Unreachable(_))));
    assert!(!path.exists());

    let config = NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&path, &config).unwrap();
    EmbeddedRegistry::create(&path, &config).unwrap();
    let other = NetworkConfig { network: "10.9.0.0/16".parse().unwrap(), ..config };
    assert!(EmbeddedRegistry::create(&path, &other).unwrap_err().to_string().contains("already holds"));
    assert_eq!(a.network_config().await.unwrap(), config);

    let lease_a = a.acquire_lease(&config, &request("a", "192.168.50.11", 1)).await.unwrap();
    assert_eq!(lease_a.lease.subnet.to_string(), "10.244.1.0/24");
    let mut b = EmbeddedRegistry::open(&path, Duration::from_millis(20));
    let mut req_b = request("b", "192.168.50.12", 2);
    req_b.previous_subnet = Some("10.244.7.0/24".parse().unwrap());
    let lease_b = b.acquire_lease(&config, &req_b).await.unwrap();
    assert_eq!(lease_b.lease.subnet.to_string(), "10.244.7.0/24", "previous subnet kept");
    // Same node again: same subnet. Another name claiming a's public IP
    // (a renamed host, or a node lying about its address) does not take
    // a's lease: it gets its own subnet, and a keeps its own.
    assert_eq!(
        a.acquire_lease(&config, &request("a", "192.168.50.11", 1)).await.unwrap().lease.subnet,
        lease_a.lease.subnet
    );
    let claimant = a.acquire_lease(&config, &request("a2", "192.168.50.11", 1)).await.unwrap();
    assert_ne!(claimant.lease.subnet, lease_a.lease.subnet);
    assert_eq!(
        a.acquire_lease(&config, &request("a", "192.168.50.11", 1)).await.unwrap().lease.subnet,
        lease_a.lease.subnet
    );
    assert!(a.delete_lease("a2").unwrap());
    let renewed = b.renew_lease(&lease_b).await.unwrap();
    assert_eq!(renewed.lease.subnet, lease_b.lease.subnet);
    assert!(renewed.expires_at.unwrap() > std::time::SystemTime::now() + Duration::from_secs(23 * 3600));

    // Watch from b: a resync with a only (never itself), then changes.
    match b.next_event(lease_b.lease.subnet).await.unwrap() {
        PeerEvent::Resync(peers) => {
            assert_eq!(peers.len(), 1);
            assert_eq!(peers[0].lease.subnet, lease_a.lease.subnet);
            assert_eq!(peers[0].lease.vtep_mac.to_string(), "0e:00:00:00:00:01");
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    b.put_raw_lease("10.244.9.0-24", "garbage", "{\"PublicIP\":", Duration::from_secs(60)).unwrap();
    b.put_raw_lease("10.244.10.1-24", "hostbits", "{}", Duration::from_secs(60)).unwrap();
    b.put_raw_lease(
        "10.244.3.0-24",
        "c",
        r#"{"PublicIP":"192.168.50.13","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:03"},"BackendV6Data":null}"#,
        Duration::from_secs(60),
    )
    .unwrap();
    b.set_autonomy("c", Autonomy::Forever).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), b.next_event(lease_b.lease.subnet)).await.unwrap().unwrap() {
        PeerEvent::Upsert(peer) => {
            assert_eq!(peer.lease.subnet.to_string(), "10.244.3.0/24");
            assert!(peer.autonomous);
        }
        other => panic!("expected the valid lease only, got {other:?}"),
    }
    assert!(b.delete_lease("c").unwrap());
    let event =
        tokio::time::timeout(Duration::from_secs(5), b.next_event(lease_b.lease.subnet)).await.unwrap().unwrap();
    assert_eq!(event, PeerEvent::Remove("10.244.3.0/24".parse().unwrap()));

    // The file goes away: an error, then a resync once it is back.
    std::fs::rename(&path, dir.path().join("away")).unwrap();
    assert!(matches!(b.next_event(lease_b.lease.subnet).await, Err(RegistryError::Unreachable(_))));
    std::fs::rename(dir.path().join("away"), &path).unwrap();
    assert!(matches!(b.next_event(lease_b.lease.subnet).await.unwrap(), PeerEvent::Resync(_)));

    // Exhaustion is a precise error.
    let tiny = NetworkConfig { network: "10.244.0.0/23".parse().unwrap(), subnet_len: 24, vni: 1 };
    let dir2 = tempfile::tempdir().unwrap();
    let path2 = dir2.path().join("r.db");
    EmbeddedRegistry::create(&path2, &tiny).unwrap();
    let mut r = EmbeddedRegistry::open(&path2, Duration::from_millis(20));
    r.acquire_lease(&tiny, &request("x", "192.168.50.21", 9)).await.unwrap();
    let err = r.acquire_lease(&tiny, &request("y", "192.168.50.22", 10)).await.unwrap_err();
    assert!(matches!(err, RegistryError::NoFreeSubnet { .. }), "{err}");
}

#[tokio::test]
async fn an_autonomous_nodes_lapsed_lease_is_never_given_to_another_node() {
    use netd::model::flannel::LeaseAttrs;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let config = NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&path, &config).unwrap();
    let mut registry = EmbeddedRegistry::open(&path, Duration::from_millis(20));
    let attrs = |ip: &str, last: u8| {
        LeaseAttrs::vxlan(ip.parse().unwrap(), 1, netd::ipam::MacAddr([0x0e, 0, 0, 0, 0, last])).to_json()
    };
    // Three nodes whose leases lapsed (cut off for more than a day).
    registry.put_raw_lease("10.244.5.0-24", "auto", &attrs("192.168.50.15", 5), Duration::ZERO).unwrap();
    registry.put_raw_lease("10.244.6.0-24", "plain", &attrs("192.168.50.16", 6), Duration::ZERO).unwrap();
    registry.put_raw_lease("10.244.7.0-24", "bounded", &attrs("192.168.50.17", 7), Duration::ZERO).unwrap();
    registry.set_autonomy("auto", Autonomy::Forever).await.unwrap();
    // Autonomous for an hour after it was cut off: that hour is long over.
    registry.set_autonomy("bounded", Autonomy::For(Duration::from_secs(3600))).await.unwrap();

    let ask = |node: &str, last: u8, subnet: &str| {
        let mut request = request(node, &format!("192.168.50.{}", 100 + last), last);
        request.previous_subnet = Some(subnet.parse().unwrap());
        request
    };
    let granted = |lease: netd::registry::OwnLease| lease.lease.subnet.to_string();
    let newcomer = registry.acquire_lease(&config, &ask("new-1", 1, "10.244.5.0/24")).await.unwrap();
    assert_ne!(granted(newcomer), "10.244.5.0/24", "the autonomous node's subnet went to another node");
    let reclaimed = registry.acquire_lease(&config, &ask("new-2", 2, "10.244.6.0/24")).await.unwrap();
    assert_eq!(granted(reclaimed), "10.244.6.0/24", "a non-autonomous node's lapsed lease is reclaimed");
    let past_bound = registry.acquire_lease(&config, &ask("new-3", 3, "10.244.7.0/24")).await.unwrap();
    assert_eq!(granted(past_bound), "10.244.7.0/24", "past its bound, a bounded node's lease is reclaimed");
    // The autonomous node is back: its own subnet.
    let back = registry.acquire_lease(&config, &request("auto", "192.168.50.15", 5)).await.unwrap();
    assert_eq!(granted(back), "10.244.5.0/24");
}
