//! The embedded registry: leases, watch, bad data, unreachability.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use netd::model::autonomy::Autonomy;
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::{
    LeaseRequest, NetworkConfig, PeerEvent, Registry, RegistryError, ReplicaRecord, ReplicaStore, REPLICA_TTL,
};

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

/// Tunnel server replicas: announced into a table the first announcement
/// creates, listed live and by id, expired and unreadable rows skipped.
#[tokio::test]
async fn tunnel_replicas_announce_expire_and_withdraw() {
    let _ = tracing_subscriber::fmt().with_ansi(false).with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let config = NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&path, &config).unwrap();
    let sql = || rusqlite::Connection::open(&path).unwrap();
    let has_table = || {
        sql()
            .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'tunnel_replica'", [], |r| r.get::<_, i64>(0))
            .unwrap()
            == 1
    };
    let mut r = EmbeddedRegistry::open(&path, Duration::from_millis(20));
    let now = SystemTime::now();
    let unix_now = now.duration_since(UNIX_EPOCH).unwrap().as_secs();

    // A file no replica announced into: nothing, and reading creates nothing.
    assert!(r.replicas(now).await.unwrap().is_empty());
    assert!(!r.withdraw_replica("cloud-a").await.unwrap());
    assert!(!has_table(), "a read created the replica table");

    // Two replicas (b first), from two handles: listed by id, exactly.
    let a = ReplicaRecord::new("cloud-a", "10.0.0.5:10265", false, REPLICA_TTL, now);
    let b = ReplicaRecord::new("cloud-b", "10.0.0.6:10265", false, REPLICA_TTL, now);
    let mut other = EmbeddedRegistry::open(&path, Duration::from_millis(20));
    other.announce_replica(&b).await.unwrap();
    assert!(has_table());
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
    assert_eq!(other.replicas(now).await.unwrap(), listed, "every handle reads the same file");
    // Stored as the record's JSON, its expiry beside it; the format version
    // of the file is unchanged (older netds ignore the table).
    let (stored, expires_at): (String, i64) = sql()
        .query_row("SELECT record, expires_at FROM tunnel_replica WHERE id = 'cloud-a'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((stored, expires_at), (a.to_json(), (unix_now + 15) as i64));
    assert_eq!(sql().pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0)).unwrap(), 2);

    // a drains: its announcement replaces the previous one.
    let a_draining = ReplicaRecord::new("cloud-a", "10.0.0.5:10265", true, REPLICA_TTL, now);
    r.announce_replica(&a_draining).await.unwrap();
    assert_eq!(r.replicas(now).await.unwrap(), vec![a_draining.clone(), b.clone()]);

    // A short-lived announcement: there now, gone for a reader 2 s on.
    let short = ReplicaRecord::new("cloud-c", "10.0.0.7:10265", false, Duration::from_secs(1), now);
    other.announce_replica(&short).await.unwrap();
    assert_eq!(r.replicas(now).await.unwrap(), vec![a_draining.clone(), b.clone(), short.clone()]);
    let later = now + Duration::from_secs(2);
    assert_eq!(r.replicas(later).await.unwrap(), vec![a_draining.clone(), b.clone()]);
    // A replica killed without a word long ago: its row goes with the next
    // announcement.
    sql()
        .execute(
            "INSERT INTO tunnel_replica(id, record, expires_at) VALUES('cloud-dead', ?1, 1)",
            [ReplicaRecord::new("cloud-dead", "10.0.0.9:10265", false, REPLICA_TTL, UNIX_EPOCH).to_json()],
        )
        .unwrap();
    r.announce_replica(&a_draining).await.unwrap();
    let dead: i64 =
        sql().query_row("SELECT count(*) FROM tunnel_replica WHERE id = 'cloud-dead'", [], |r| r.get(0)).unwrap();
    assert_eq!(dead, 0, "expired rows are deleted by an announcement");

    // Garbage written by someone else is skipped; the others still listed.
    let live_until = (unix_now + 60) as i64;
    let conn = sql();
    conn.execute("INSERT INTO tunnel_replica VALUES('cloud-junk', '{not json', ?1)", [live_until]).unwrap();
    conn.execute("INSERT INTO tunnel_replica VALUES('cloud-liar', ?1, ?2)", rusqlite::params![b.to_json(), live_until])
        .unwrap();
    let v2 = a.to_json().replace(r#""version":1"#, r#""version":2"#).replace("cloud-a", "cloud-next");
    conn.execute("INSERT INTO tunnel_replica VALUES('cloud-next', ?1, ?2)", rusqlite::params![v2, live_until]).unwrap();
    drop(conn);
    assert_eq!(r.replicas(later).await.unwrap(), vec![a_draining.clone(), b.clone()]);

    // Withdrawn: true once, then false.
    assert!(r.withdraw_replica("cloud-b").await.unwrap());
    assert!(!r.withdraw_replica("cloud-b").await.unwrap());
    assert_eq!(r.replicas(later).await.unwrap(), vec![a_draining.clone()]);

    // A bad id is refused before anything is written, naming the rule.
    let bad = ReplicaRecord::new("a/b", "10.0.0.8:10265", false, REPLICA_TTL, now);
    for err in [r.announce_replica(&bad).await.unwrap_err(), r.withdraw_replica("a/b").await.unwrap_err()] {
        assert!(matches!(err, RegistryError::Refused { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(r#"naming tunnel replica "a/b""#) && text.contains("[A-Za-z0-9._-]"), "{text}");
    }
    let stored: i64 =
        sql().query_row("SELECT count(*) FROM tunnel_replica WHERE id = 'a/b'", [], |r| r.get(0)).unwrap();
    assert_eq!(stored, 0);

    // The file gone: unreachable, as for leases.
    std::fs::rename(&path, dir.path().join("away")).unwrap();
    assert!(matches!(r.replicas(now).await, Err(RegistryError::Unreachable(_))));
    assert!(matches!(r.announce_replica(&a).await, Err(RegistryError::Unreachable(_))));
}
