//! The tunnel server's doors tried by the wrong parties (SPEC §3b, issue 23):
//! node certificates and strangers' certificates on the CONNECT door, plain
//! HTTP from sources not named for Host routing, an agent that never answers,
//! a second link of one node, and clients that hold connections without
//! finishing their handshake or request head — on the stage of
//! `common/tunnel_stage.rs` (no route from the cloud to the edge, only the
//! agent's link).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/tunnel_stage.rs"]
mod tunnel_stage;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use ipnet::IpNet;
use netd::testing::{self, NetNs, VethPair};
use netd::tunnel::certs::IssuedCert;
use netd::tunnel::limits::{Door, Limits, Refusal};
use netd::tunnel::replica::ReplicaStatus;
use netd::tunnel::server::{self, Router, ServerPolicy};
use netd::tunnel::{tls, transport};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel_stage::{
    connect, curl, wait_for, Background, Linked, Stage, AGENT_PORT, CLOUD_IP, CONNECT_PORT, DAY, DNAT_PLAIN_PORT, NODE,
    NODE_IP,
};

/// A CONNECT-door client presenting `leaf` (issued by the stage's CA).
fn client_with(stage: &Stage, leaf: &IssuedCert) -> Arc<rustls::ClientConfig> {
    let mut certs = stage.pki.files("client").load().unwrap();
    certs.chain = vec![leaf.cert_der().clone()];
    certs.key = leaf.key_der();
    tls::connect_client(&certs).unwrap()
}

/// kubelet's read-only port on the node address, over HTTP: answers with the path.
fn kubelet_http(stage: &Stage) -> Background {
    Background::start(&stage.edge.path(), || async {
        let listener = TcpListener::bind((NODE_IP, 10255)).await.unwrap();
        netd::http::serve_text(listener, |path| async move { (StatusCode::OK, format!("kubelet {path}\n")) }).await;
    })
}

fn streams(linked: &Linked) -> (u64, u64) {
    (linked.router.metrics.streams_total.load(Ordering::Relaxed), linked.metrics.streams_total.load(Ordering::Relaxed))
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn the_connect_door_admits_kube_apiservers_identity_and_no_node_or_stranger() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let linked = stage.linked();
    let target = format!("{NODE_IP}:10250");
    let ca = &stage.pki.ca;
    let refused_clients = [
        (
            "edge-1's own agent certificate",
            client_with(&stage, &ca.issue_node(NODE, &[IpAddr::V4(NODE_IP)], DAY).unwrap()),
        ),
        ("another edge node's certificate", client_with(&stage, &ca.issue_node("edge-2", &[], DAY).unwrap())),
        (
            "a kubelet-style client of the CA",
            client_with(&stage, &ca.issue_client("system:node:edge-9", None, DAY).unwrap()),
        ),
        ("a user of the CA", client_with(&stage, &ca.issue_client("prometheus", None, DAY).unwrap())),
        (
            "the admitted name in the nodes' group",
            client_with(&stage, &ca.issue_client("kube-apiserver", Some("system:nodes"), DAY).unwrap()),
        ),
    ];
    for (who, client) in &refused_clients {
        let (code, stream) = stage.in_cloud(|| connect(client.clone(), &target));
        assert_eq!(code, 403, "{who}");
        assert!(stream.is_none(), "{who}");
    }
    assert_eq!(streams(&linked), (0, 0), "no refused client opened a stream on the agent");
    let doors = &linked.router.metrics.doors;
    assert_eq!(doors.refused(Door::Connect, Refusal::Identity), refused_clients.len() as u64);

    // kube-apiserver's egress client certificate still reaches the kubelet.
    let client = linked.client.clone();
    let echo = stage.in_cloud(|| async move {
        let (code, stream) = connect(client, &format!("{NODE_IP}:10250")).await;
        assert_eq!(code, 200);
        let mut stream = stream.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).await.unwrap();
        echo
    });
    assert_eq!(&echo, b"ping");
    assert_eq!(streams(&linked), (1, 1));

    // An operator who lists another client admits it, and still no node.
    drop(linked);
    let clients = netd::tunnel::identity::ConnectClients::new(["prometheus".to_string(), "system:node:edge-9".into()]);
    let policy = ServerPolicy { connect_clients: clients, ..Default::default() };
    let linked = stage.linked_under(policy, stage.agent_config(NODE), stage.kubelet());
    assert_eq!(stage.in_cloud(|| connect(refused_clients[3].1.clone(), &target)).0, 200, "listed: prometheus");
    assert_eq!(stage.in_cloud(|| connect(refused_clients[2].1.clone(), &target)).0, 403, "a node, even listed");
    assert_eq!(stage.in_cloud(|| connect(linked.client.clone(), &target)).0, 403, "kube-apiserver is no longer listed");
}

/// The HTTP door on every cloud address (no DNAT here: plain HTTP only).
fn http_door(stage: &Stage, router: Arc<Router>) -> Background {
    Background::start(&stage.cloud.path(), move || async move {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, DNAT_PLAIN_PORT)).await.unwrap();
        server::serve_http_door(listener, server::DnatCell::default(), router).await;
    })
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn plain_http_by_host_is_off_by_default_and_then_only_for_the_named_sources() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    // A stranger: another network namespace that reaches the cloud node's
    // door (a pod, another host).
    let stranger = NetNs::new().unwrap();
    let _link = VethPair::new((Some(&stage.cloud), "str0"), (Some(&stranger), "eth0")).unwrap();
    stage.cloud.ip(&["addr", "add", "10.70.0.1/24", "dev", "str0"]).unwrap();
    stage.cloud.ip(&["link", "set", "str0", "up"]).unwrap();
    stranger.ip(&["addr", "add", "10.70.0.2/24", "dev", "eth0"]).unwrap();
    stranger.ip(&["link", "set", "eth0", "up"]).unwrap();
    let host = format!("Host: {NODE_IP}:10255");
    let from_stranger = || curl(&stranger, &["-H", &host, &format!("http://10.70.0.1:{DNAT_PLAIN_PORT}/pods")]);
    let from_cloud = || curl(&stage.cloud, &["-H", &host, &format!("http://{CLOUD_IP}:{DNAT_PLAIN_PORT}/pods")]);
    let proxied = || {
        curl(&stranger, &["-x", &format!("http://10.70.0.1:{DNAT_PLAIN_PORT}"), &format!("http://{NODE_IP}:10255/x")])
    };

    // Default settings: nobody's plain HTTP is routed; no agent sees a stream.
    let linked = stage.linked_with(stage.agent_config(NODE), kubelet_http(&stage));
    let _door = http_door(&stage, linked.router.clone());
    for (who, (_, code, body)) in [("stranger", from_stranger()), ("cloud", from_cloud()), ("proxy form", proxied())] {
        assert_eq!(code, "403", "{who}: {body}");
    }
    assert_eq!(streams(&linked), (0, 0));
    assert_eq!(linked.router.metrics.doors.refused(Door::Http, Refusal::HostRouting), 3);
    drop(_door);
    drop(linked);

    // Host routing for the stranger's network: served from inside it,
    // refused from outside (the cloud's own address, the edge).
    let policy = ServerPolicy { host_routing_sources: vec!["10.70.0.0/24".parse().unwrap()], ..Default::default() };
    let linked = stage.linked_under(policy, stage.agent_config(NODE), kubelet_http(&stage));
    let _door = http_door(&stage, linked.router.clone());
    let (_, code, body) = from_stranger();
    assert_eq!((code.as_str(), body.as_str()), ("200", "kubelet /pods\n"));
    assert_eq!(proxied().1, "200");
    assert_eq!(from_cloud().1, "403");
    let (_, code, _) = curl(&stage.edge, &["-H", &host, &format!("http://{CLOUD_IP}:{DNAT_PLAIN_PORT}/pods")]);
    assert_eq!(code, "403", "the edge's own address is outside the named sources");
    assert_eq!(streams(&linked), (2, 2));
}

/// An agent link of `leaf`'s node that accepts the server's stream opens
/// and never answers them (nor, unless `introduced`, the replica's status
/// that opens every link); `ended` is set when the server closes the link.
fn silent_agent(
    stage: &Stage,
    leaf: &IssuedCert,
    introduced: bool,
    ended: Arc<std::sync::atomic::AtomicBool>,
) -> Background {
    let mut certs = stage.pki.files(NODE).load().unwrap();
    certs.chain = vec![leaf.cert_der().clone()];
    certs.key = leaf.key_der();
    // It speaks HTTP/2, as agents from before netd-mux/1 do.
    let mut config = (*tls::agent(&certs).unwrap()).clone();
    config.alpn_protocols = vec![tls::ALPN_TUNNEL.to_vec()];
    let config = Arc::new(config);
    Background::start(&stage.edge.path(), move || async move {
        let tcp = TcpStream::connect((CLOUD_IP, AGENT_PORT)).await.unwrap();
        let name = ServerName::IpAddress(IpAddr::V4(CLOUD_IP).into());
        let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
        let mut connection = transport::agent_builder().handshake::<_, Bytes>(tls).await.unwrap();
        let mut held = Vec::new();
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            if introduced && ReplicaStatus::is_status(&request) {
                respond.send_response(http::Response::new(()), true).unwrap();
            } else {
                held.push((request, respond));
            }
        }
        ended.store(true, Ordering::Relaxed);
        std::future::pending::<()>().await;
    })
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn an_agent_that_never_answers_costs_its_clients_a_bounded_wait_and_nobody_else_anything() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let open_timeout = Duration::from_secs(2);
    let policy = ServerPolicy { limits: Limits { open_timeout, ..Limits::default() }, ..Default::default() };
    let linked = stage.linked_under(policy, stage.agent_config(NODE), stage.kubelet());
    let silent_ip = Ipv4Addr::new(10, 250, 0, 3);
    let silent = stage.pki.ca.issue_node("edge-2", &[IpAddr::V4(silent_ip)], DAY).unwrap();
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _silent = silent_agent(&stage, &silent, true, ended.clone());
    wait_for("the silent agent's link", Duration::from_secs(10), || linked.router.nodes().len() == 2);

    let client = linked.client.clone();
    let (waited, code, other) = stage.in_cloud(|| async move {
        let started = Instant::now();
        let silent_client = client.clone();
        let silent = tokio::spawn(async move { connect(silent_client, &format!("{silent_ip}:10250")).await });
        // While that open waits, the good agent's node is served at once.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (other, stream) = connect(client, &format!("{NODE_IP}:10250")).await;
        let mut stream = stream.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).await.unwrap();
        assert!(started.elapsed() < open_timeout, "the other node waited for the silent one");
        let (code, _) = silent.await.unwrap();
        (started.elapsed(), code, other)
    });
    assert_eq!(other, 200);
    assert_eq!(code, 504, "Gateway Timeout once the bound ran out");
    assert!(waited >= open_timeout && waited < open_timeout * 3, "{waited:?}");
    assert_eq!(linked.router.metrics.open_timeouts.load(Ordering::Relaxed), 1);

    // A second link of a node replaces the first, which the server closes.
    let dup_ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _dup = silent_agent(&stage, &silent, true, dup_ended.clone());
    wait_for("the first link closed", Duration::from_secs(10), || ended.load(Ordering::Relaxed));
    assert_eq!(linked.router.metrics.links_replaced.load(Ordering::Relaxed), 1);
    assert_eq!(linked.router.nodes(), vec![NODE.to_string(), "edge-2".to_string()]);
    assert!(!dup_ended.load(Ordering::Relaxed));

    // A link that never answers the replica's status is closed after the
    // same bound, never routed, and displaces nobody.
    let mute = stage.pki.ca.issue_node("edge-3", &[IpAddr::V4(Ipv4Addr::new(10, 250, 0, 4))], DAY).unwrap();
    let mute_ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let linked_at = Instant::now();
    let _mute = silent_agent(&stage, &mute, false, mute_ended.clone());
    wait_for("the mute link closed", open_timeout * 3, || mute_ended.load(Ordering::Relaxed));
    assert!(linked_at.elapsed() >= open_timeout, "closed before its bound: {:?}", linked_at.elapsed());
    assert_eq!(linked.router.nodes(), vec![NODE.to_string(), "edge-2".to_string()]);
    let mute_again = silent_agent(&stage, &silent, false, Arc::default());
    std::thread::sleep(open_timeout * 2);
    drop(mute_again);
    assert!(!dup_ended.load(Ordering::Relaxed), "an unintroduced link displaced the node's live one");
    assert_eq!(linked.router.metrics.links_replaced.load(Ordering::Relaxed), 1);
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn doors_bound_streams_handshakes_request_heads_and_connections_per_source() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let limits = Limits {
        handshake_timeout: Duration::from_secs(1),
        header_timeout: Duration::from_secs(1),
        max_connections_per_source: 3,
        max_streams_per_agent: 2,
        ..Limits::default()
    };
    let policy =
        ServerPolicy { limits, host_routing_sources: vec![IpNet::from(IpAddr::V4(CLOUD_IP))], ..Default::default() };
    let linked = stage.linked_under(policy, stage.agent_config(NODE), stage.kubelet());
    let _door = http_door(&stage, linked.router.clone());
    let client = linked.client.clone();
    let router = linked.router.clone();
    stage.in_cloud(|| async move {
        // Stream cap: two streams held, the third is refused at once.
        let target = format!("{NODE_IP}:10250");
        let (first, held_1) = connect(client.clone(), &target).await;
        let (second, held_2) = connect(client.clone(), &target).await;
        assert_eq!((first, second), (200, 200));
        assert_eq!(connect(client.clone(), &target).await.0, 503);
        assert_eq!(router.metrics.stream_cap.load(Ordering::Relaxed), 1);
        drop(held_1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while connect(client.clone(), &target).await.0 != 200 {
            assert!(Instant::now() < deadline, "the place of a closed stream never came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(held_2);

        // A client that never starts its TLS handshake, and one that never
        // finishes its request head: closed once their time is up.
        let closed_within = |mut stream: TcpStream| async move {
            let started = Instant::now();
            let mut buf = [0u8; 256];
            loop {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                    Ok(Ok(_)) => continue,
                    Err(_) => panic!("still open after 5 s"),
                }
            }
        };
        let idle = TcpStream::connect((CLOUD_IP, CONNECT_PORT)).await.unwrap();
        let took = closed_within(idle).await;
        assert!(took >= Duration::from_millis(900), "closed before the handshake timeout: {took:?}");
        let mut slow = TcpStream::connect((CLOUD_IP, DNAT_PLAIN_PORT)).await.unwrap();
        slow.write_all(b"GET /pods HTTP/1.1\r\nHost: 10.250.0.2:10255\r\n").await.unwrap();
        let took = closed_within(slow).await;
        assert!(took >= Duration::from_millis(900), "closed before the header timeout: {took:?}");
        let doors = &router.metrics.doors;
        assert_eq!(doors.refused(Door::Connect, Refusal::HandshakeTimeout), 1);

        let deadline = Instant::now() + Duration::from_secs(5);
        while doors.open(Door::Connect) != 0 {
            assert!(Instant::now() < deadline, "the closed connections' places never came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Three connections from one source are held; the fourth is closed
        // at once, before any TLS; the others' sources are unaffected.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(TcpStream::connect((CLOUD_IP, CONNECT_PORT)).await.unwrap());
        }
        let fourth = TcpStream::connect((CLOUD_IP, CONNECT_PORT)).await.unwrap();
        let took = closed_within(fourth).await;
        assert!(took < Duration::from_millis(900), "the fourth waited for a timeout: {took:?}");
        assert_eq!(doors.refused(Door::Connect, Refusal::SourceFull), 1);
        assert_eq!(doors.open(Door::Connect), 3);
        drop(held);
    });
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn strangers_filling_the_http_door_never_turn_away_a_dnat_redirected_client() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    // Room for two plain connections on the HTTP door, two per source.
    let limits = Limits { max_connections_per_door: 2, max_connections_per_source: 2, ..Limits::default() };
    let policy = ServerPolicy { limits, ..Default::default() };
    let linked = stage.linked_under(policy, stage.agent_config(NODE), kubelet_http(&stage));
    let doors = stage.dnat_doors(linked.router.clone(), &tunnel_stage::KUBELET_DNAT_RULES);
    // Two idle plain connections from the cloud (not redirected) fill it…
    let held =
        stage.cloud.run(|| [0; 2].map(|_| std::net::TcpStream::connect((CLOUD_IP, DNAT_PLAIN_PORT)).unwrap())).unwrap();
    let router = linked.router.clone();
    wait_for("the plain connections held", Duration::from_secs(5), || router.metrics.doors.open(Door::Http) == 2);
    let (_, code, _) = curl(
        &stage.cloud,
        &["-H", &format!("Host: {NODE_IP}:10255"), &format!("http://{CLOUD_IP}:{DNAT_PLAIN_PORT}/x")],
    );
    assert_eq!(code, "000", "a third plain connection is closed at once");
    assert_eq!(router.metrics.doors.refused(Door::Http, Refusal::DoorFull), 1);
    // …and a cloud client the kernel redirected is still served: it counts
    // against the DNAT doors' caps, not the plain HTTP door's.
    let out =
        doors.run_redirected("curl", &["-sS", "--noproxy", "*", "-m", "10", &format!("http://{NODE_IP}:10255/pods")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kubelet /pods\n");
    assert_eq!(doors.redirected(10255), 1);
    drop(held);
}
