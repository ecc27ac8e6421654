//! The edge tunnel against the kernel, in namespaces this test makes, on
//! the stage of `common/tunnel_stage.rs`: cloud and edge namespaces, and no
//! route from the cloud to the edge node address 10.250.0.2.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/tunnel_stage.rs"]
mod tunnel_stage;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netd::testing;
use netd::tunnel::agent::AgentMetrics;
use netd::tunnel::certs::CertificateAuthority;
use netd::tunnel::server::Router;
use netd::tunnel::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel_stage::{
    connect, metrics_in, plain_http_stand_ins, spawn_netd, spawn_netd_cloud, stand_in_body, wait_for, Background,
    Linked, Stage, AGENT_PORT, CLOUD_IP, CONNECT_PORT, DAY, DNAT_PLAIN_PORT, KUBELET_DNAT_RULES, NODE, NODE_IP,
};

async fn echo_round_trip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: &mut S, payload: &[u8]) {
    stream.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, payload);
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn connect_door_reaches_the_edge_kubelet_and_refuses_what_it_must() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let linked = stage.linked();
    let (router, metrics, client) = (linked.router.clone(), linked.metrics.clone(), linked.client.clone());
    assert_eq!(router.node_of(IpAddr::V4(NODE_IP)).as_deref(), Some(NODE), "routing from the certificate's IP SAN");

    stage.in_cloud(|| async move {
        // The cloud cannot reach the node address itself.
        let direct = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect((NODE_IP, 10250))).await;
        assert!(!matches!(direct, Ok(Ok(_))), "the cloud reached the edge directly: the test proves nothing");

        let (code, stream) = connect(client.clone(), &format!("{NODE_IP}:10250")).await;
        assert_eq!(code, 200);
        echo_round_trip(&mut stream.unwrap(), b"GET /healthz through the tunnel").await;
        // By node name, as kube-apiserver may send it.
        let (code, stream) = connect(client.clone(), &format!("{NODE}:10255")).await;
        assert_eq!(code, 200);
        let mut stream = stream.unwrap();
        let mut hello = [0u8; 6];
        stream.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello\n");
        // A 1 MiB payload both ways.
        let payload: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        echo_round_trip(&mut stream, &payload).await;

        // No agent for that address: 503, at once.
        let started = Instant::now();
        let (code, _) = connect(client.clone(), "10.250.0.9:10250").await;
        assert_eq!(code, 503);
        assert!(started.elapsed() < Duration::from_secs(1), "503 took {:?}", started.elapsed());
        let (code, _) = connect(client.clone(), "edge-unknown:10250").await;
        assert_eq!(code, 503);
        // A port the agent does not allow: refused by the agent.
        let (code, _) = connect(client.clone(), &format!("{NODE_IP}:22")).await;
        assert_eq!(code, 403);
    });
    assert_eq!(metrics.refused_port.load(Ordering::Relaxed), 1);
    assert!(metrics.streams_total.load(Ordering::Relaxed) >= 2);
    // Bytes are counted as they pass (the 1 MiB echo, both ways, both ends).
    for (what, counter) in [
        ("server, to edge", &router.metrics.bytes_to_edge),
        ("server, from edge", &router.metrics.bytes_from_edge),
        ("agent, in", &metrics.bytes_in),
        ("agent, out", &metrics.bytes_out),
    ] {
        wait_for(what, Duration::from_secs(5), || counter.load(Ordering::Relaxed) >= 1 << 20);
    }
}

/// Agents and servers from before `netd-mux/1` speak HTTP/2 with the new
/// ones (ALPN picks it), and two new ones speak `netd-mux/1`; every pair
/// carries a stream both ways and has the agent refuse a port it must.
#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn old_and_new_agents_and_servers_each_link_in_the_protocol_both_speak() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let server_certs = stage.pki.files("server").load().unwrap();
    let h2_agent = || {
        let mut config = stage.agent_config(NODE);
        let mut tls = (*tls::agent(&stage.pki.files(NODE).load().unwrap()).unwrap()).clone();
        tls.alpn_protocols = vec![tls::ALPN_TUNNEL.to_vec()];
        config.tls = tls::fixed(Arc::new(tls));
        config
    };
    let pairs = [
        ("new agent, new server", stage.agent_config(NODE), tls::agents_door(&server_certs).unwrap(), 1),
        ("old agent, new server", h2_agent(), tls::agents_door(&server_certs).unwrap(), 0),
        ("new agent, old server", stage.agent_config(NODE), tls::server(&server_certs, tls::ALPN_TUNNEL).unwrap(), 0),
    ];
    let client = tls::connect_client(&stage.pki.files("client").load().unwrap()).unwrap();
    for (what, agent_config, agents_door, mux_links) in pairs {
        let router = Arc::new(Router::default());
        let _server = stage.server_with(router.clone(), agents_door);
        let _kubelet = stage.kubelet();
        let _agent = stage.agent(agent_config, Arc::new(AgentMetrics::default()));
        wait_for(what, Duration::from_secs(10), || router.nodes() == vec![NODE.to_string()]);
        assert_eq!(router.metrics.mux_links.load(Ordering::Relaxed), mux_links, "{what}: netd-mux/1 links");
        let client = client.clone();
        stage.in_cloud(|| async move {
            let (code, stream) = connect(client.clone(), &format!("{NODE_IP}:10250")).await;
            assert_eq!(code, 200, "{what}");
            let payload: Vec<u8> = (0..256 << 10).map(|i| (i % 253) as u8).collect();
            echo_round_trip(&mut stream.unwrap(), &payload).await;
            let (code, _) = connect(client.clone(), &format!("{NODE_IP}:22")).await;
            assert_eq!(code, 403, "{what}: the agent refuses a port it does not forward");
        });
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn identity_comes_from_the_certificate_and_strangers_are_refused() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let router = Arc::new(Router::default());
    let _server = stage.server(router.clone());
    let _kubelet = stage.kubelet();

    // Another CA's node certificate: refused in the handshake.
    let stranger_ca = CertificateAuthority::generate("some other CA", DAY).unwrap();
    let stranger = stranger_ca.issue_node(NODE, &[IpAddr::V4(NODE_IP)], DAY).unwrap();
    let stranger_agent = stage.agent(stage.agent_config_with(&stranger), Arc::new(AgentMetrics::default()));
    // An expired certificate from the right CA: refused too.
    let now = std::time::SystemTime::now();
    let expired =
        stage.pki.ca.issue_node_with_validity(NODE, &[IpAddr::V4(NODE_IP)], now - 2 * DAY, now - DAY).unwrap();
    let expired_agent = stage.agent(stage.agent_config_with(&expired), Arc::new(AgentMetrics::default()));
    wait_for("two refused handshakes", Duration::from_secs(15), || {
        router.metrics.handshake_failures.load(Ordering::Relaxed) >= 2
    });
    assert!(router.nodes().is_empty(), "a refused agent was linked: {:?}", router.nodes());
    drop((stranger_agent, expired_agent));

    // Node B's agent holds B's certificate: A's address is not routed to it,
    // whatever B would like.
    let node_b = stage.pki.ca.issue_node("edge-2", &[IpAddr::V4(Ipv4Addr::new(10, 250, 0, 3))], DAY).unwrap();
    let _agent_b = stage.agent(stage.agent_config_with(&node_b), Arc::new(AgentMetrics::default()));
    wait_for("node B's link", Duration::from_secs(10), || router.nodes() == vec!["edge-2".to_string()]);
    let client = tls::connect_client(&stage.pki.files("client").load().unwrap()).unwrap();
    stage.in_cloud(|| async move {
        let (code, _) = connect(client.clone(), &format!("{NODE_IP}:10250")).await;
        assert_eq!(code, 503, "A's address went to B's agent");
    });
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn a_stalled_stream_never_slows_the_others() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let router = Arc::new(Router::default());
    let _server = stage.server(router.clone());
    let _kubelet = stage.kubelet();
    // An extra port for a local service that accepts and never reads.
    let mut config = stage.agent_config(NODE);
    config.allowed_ports.insert(10266);
    let _agent = stage.agent(config, Arc::new(AgentMetrics::default()));
    wait_for("the agent's link", Duration::from_secs(10), || !router.nodes().is_empty());
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let _sink = Background::start(&stage.edge.path(), move || async move {
        let listener = TcpListener::bind((NODE_IP, 10266)).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        held_tx.send(()).unwrap();
        // Keep it open, never read.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(stream);
    });
    let client = tls::connect_client(&stage.pki.files("client").load().unwrap()).unwrap();
    let (alone, beside, pushed) = stage.in_cloud(|| async move {
        let payload: Arc<Vec<u8>> = Arc::new((0..1 << 20).map(|i| (i % 253) as u8).collect());
        // 100 streams move 1 MiB each, both ways.
        let hundred = || async {
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..100 {
                let (client, payload) = (client.clone(), payload.clone());
                tasks.spawn(async move {
                    let (code, stream) = connect(client, &format!("{NODE_IP}:10250")).await;
                    assert_eq!(code, 200);
                    echo_round_trip(&mut stream.unwrap(), &payload).await;
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
            started.elapsed()
        };
        let alone = hundred().await;
        let (code, stalled) = connect(client.clone(), &format!("{NODE_IP}:10266")).await;
        assert_eq!(code, 200);
        let mut stalled = stalled.unwrap();
        held_rx.recv().unwrap();
        // Push until the stalled stream stops taking bytes (its window and the buffers are full).
        let chunk = vec![7u8; 1 << 20];
        let mut pushed = 0usize;
        while let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(500), stalled.write_all(&chunk)).await {
            pushed += chunk.len();
            assert!(pushed < 256 << 20, "256 MiB went into a stream nobody reads: no flow control");
        }
        let beside = hundred().await;
        drop(stalled);
        (alone, beside, pushed)
    });
    eprintln!(
        "    100 x 1 MiB echoed in {alone:?} alone, {beside:?} beside a stream stalled after {} MiB",
        pushed >> 20
    );
    // A shared window would stall them for good; a noisy machine may slow them some.
    assert!(beside < alone * 3 + Duration::from_secs(2), "{beside:?} beside a stalled stream vs {alone:?} alone");
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn the_agent_comes_back_after_a_server_restart() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let Linked { agent: _agent, kubelet: _kubelet, server, metrics, .. } = stage.linked();
    drop(server);
    wait_for("the agent to notice", Duration::from_secs(20), || metrics.links_up.load(Ordering::Relaxed) == 0);
    // Down for a while: backoff grows.
    std::thread::sleep(Duration::from_secs(3));
    let router = Arc::new(Router::default());
    let _server = stage.server(router.clone());
    let back = Instant::now();
    wait_for("the agent's link after the restart", Duration::from_secs(35), || !router.nodes().is_empty());
    eprintln!("    relinked {:?} after the server came back", back.elapsed());
    let client = tls::connect_client(&stage.pki.files("client").load().unwrap()).unwrap();
    stage.in_cloud(|| async move {
        let (code, stream) = connect(client, &format!("{NODE_IP}:10250")).await;
        assert_eq!(code, 200);
        echo_round_trip(&mut stream.unwrap(), b"after the restart").await;
    });
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn dnat_door_carries_redirected_connections_to_the_edge() {
    use std::io::{Read, Write};

    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let router = Arc::new(Router::default());
    let _server = stage.server(router.clone());
    let doors = stage.dnat_doors(router.clone(), &KUBELET_DNAT_RULES);
    let _kubelet = stage.kubelet();
    let _agent = stage.agent(stage.agent_config(NODE), Arc::new(AgentMetrics::default()));
    wait_for("the agent's link", Duration::from_secs(10), || !router.nodes().is_empty());

    // A host-network client on the cloud node dials the edge kubelet as if
    // it were reachable; DNAT + tunnel make it so.
    let _in_cgroup = doors.cgroup.join().unwrap();
    let (echoed, hello) = stage
        .cloud
        .run(|| {
            let mut kubelet = std::net::TcpStream::connect((NODE_IP, 10250)).unwrap();
            assert_eq!(kubelet.peer_addr().unwrap(), SocketAddr::from((NODE_IP, 10250)));
            kubelet.write_all(b"kubectl logs").unwrap();
            let mut echoed = [0u8; 12];
            kubelet.read_exact(&mut echoed).unwrap();
            let mut readonly = std::net::TcpStream::connect((NODE_IP, 10255)).unwrap();
            let mut hello = [0u8; 6];
            readonly.read_exact(&mut hello).unwrap();
            (echoed, hello)
        })
        .unwrap();
    assert_eq!(&echoed, b"kubectl logs");
    assert_eq!(&hello, b"hello\n");
    assert_eq!(router.metrics.streams_total.load(Ordering::Relaxed), 2);
    assert_eq!(router.metrics.not_redirected.load(Ordering::Relaxed), 0);
}

/// A node exporter's port, allowed by the agent and DNAT'd to the plain door.
const NODE_EXPORTER_PORT: u16 = 9100;
/// DNAT'd to the plain door too, but not allowed by the agent.
const NOT_ALLOWED_PORT: u16 = 9101;

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn plain_http_reaches_the_read_only_port_and_an_extra_port_through_dnat() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let mut config = stage.agent_config(NODE);
    config.allowed_ports.insert(NODE_EXPORTER_PORT);
    let stand_ins = plain_http_stand_ins(&stage, &[10255, NODE_EXPORTER_PORT]);
    let Linked { router, metrics, agent: _agent, kubelet: _stand_ins, server: _server, .. } =
        stage.linked_with(config, stand_ins);
    // Extra ports go to the plain door, as `dnat-ports-pair` "9100=10264" says.
    let mut rules = KUBELET_DNAT_RULES.to_vec();
    rules.extend([(NODE_EXPORTER_PORT, DNAT_PLAIN_PORT), (NOT_ALLOWED_PORT, DNAT_PLAIN_PORT)]);
    let doors = stage.dnat_doors(router.clone(), &rules);

    // curl, a real client, on the cloud node's host network.
    let curl = |url: &str| doors.run_redirected("curl", &["-sS", "--noproxy", "*", "-m", "10", url]);
    for (port, path) in [(10255, "/stats/summary"), (NODE_EXPORTER_PORT, "/metrics")] {
        let out = curl(&format!("http://{NODE_IP}:{port}{path}"));
        assert!(out.status.success(), "curl to {port}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), stand_in_body(port, path));
        assert_eq!(doors.redirected(port), 1, "the DNAT rule for {port}");
    }
    assert_eq!(router.metrics.streams_total.load(Ordering::Relaxed), 2);
    assert_eq!(metrics.refused_port.load(Ordering::Relaxed), 0);

    // Redirected, but the agent does not dial a port it was not given: the
    // door closes the connection without a byte.
    let out = curl(&format!("http://{NODE_IP}:{NOT_ALLOWED_PORT}/metrics"));
    assert!(
        !out.status.success(),
        "a port the agent does not allow answered: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty());
    assert_eq!(doors.redirected(NOT_ALLOWED_PORT), 1);
    assert_eq!(metrics.refused_port.load(Ordering::Relaxed), 1);
    assert_eq!(router.metrics.refused_by_agent.load(Ordering::Relaxed), 1);
    assert_eq!(router.metrics.streams_total.load(Ordering::Relaxed), 2);
    assert_eq!(router.metrics.not_redirected.load(Ordering::Relaxed), 0);
}

/// `netd tunnel-agent …` for the stage's node, linking to the stage's
/// server, then `extra`; writes the node's files under the stem the
/// command line reads.
fn agent_args(stage: &Stage, extra: &[&str]) -> Vec<String> {
    let dir = stage.pki.dir.path();
    stage.pki.ca.issue_node(NODE, &[IpAddr::V4(NODE_IP)], DAY).unwrap().write(dir, "node").unwrap();
    let fixed = ["tunnel-agent", "--server", &format!("{CLOUD_IP}:{AGENT_PORT}"), "--cert-dir", dir.to_str().unwrap()]
        .map(String::from);
    fixed.into_iter().chain(extra.iter().map(|arg| arg.to_string())).collect()
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn netd_tunnel_server_and_agent_processes_link_and_carry_connections() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let cert_dir = stage.pki.dir.path().to_str().unwrap();
    let _server = spawn_netd_cloud(
        &stage.cloud.path(),
        &[
            "tunnel-server",
            "--cert-dir",
            cert_dir,
            // Bare ports bind the cloud node's address.
            "--address",
            &CLOUD_IP.to_string(),
            "--agents-listen",
            &AGENT_PORT.to_string(),
            "--connect-listen",
            &CONNECT_PORT.to_string(),
            "--dnat-listen",
            "",
            "--metrics-listen",
            "127.0.0.1:10266",
        ],
    );
    let _kubelet = stage.kubelet();
    // No --node-ip: the agent takes its addresses from its certificate.
    let _agent = spawn_netd(&stage.edge.path(), &agent_args(&stage, &["--metrics-listen", "127.0.0.1:10267"]));
    wait_for("the agent linked, per the server's metrics", Duration::from_secs(20), || {
        metrics_in(&stage.cloud, "127.0.0.1:10266").contains("netd_tunnel_agents 1")
    });
    let client = tls::connect_client(&stage.pki.files("client").load().unwrap()).unwrap();
    stage.in_cloud(|| async move {
        let (code, stream) = connect(client.clone(), &format!("{NODE_IP}:10250")).await;
        assert_eq!(code, 200);
        echo_round_trip(&mut stream.unwrap(), b"through two real processes").await;
        let (code, _) = connect(client, &format!("{NODE_IP}:9999")).await;
        assert_eq!(code, 403);
    });
    let agent_metrics = metrics_in(&stage.edge, "127.0.0.1:10267");
    assert!(agent_metrics.contains("netd_tunnel_agent_links_up 1"), "{agent_metrics}");
    assert!(agent_metrics.contains(r#"netd_tunnel_agent_refused_total{reason="port"} 1"#), "{agent_metrics}");
    let server_metrics = metrics_in(&stage.cloud, "127.0.0.1:10266");
    assert!(server_metrics.contains("netd_tunnel_streams_total 1"), "{server_metrics}");
    assert!(server_metrics.contains("netd_tunnel_refused_by_agent_total 1"), "{server_metrics}");
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn a_killed_agent_process_is_dropped_at_once_and_its_restart_carries_traffic() {
    use netd::tunnel::transport::PING_INTERVAL;

    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let command_line = agent_args(&stage, &[]);
    let router = Arc::new(Router::default());
    let _server = stage.server(router.clone());
    let _kubelet = stage.kubelet();
    let linked = || router.nodes() == vec![NODE.to_string()];
    let mut agent = Some(spawn_netd(&stage.edge.path(), &command_line));
    wait_for("the agent process's link", Duration::from_secs(20), linked);
    let client = tls::connect_client(&stage.pki.files("client").load().unwrap()).unwrap();

    let (session_ended, forgotten) = stage.in_cloud(|| async {
        // A session (exec, logs -f) open through the agent when it dies.
        let (code, session) = connect(client.clone(), &format!("{NODE_IP}:10250")).await;
        assert_eq!(code, 200);
        let mut session = session.unwrap();
        echo_round_trip(&mut session, b"before the crash").await;
        let killed = Instant::now();
        // SIGKILL, as a crash or the OOM killer does: no goodbye from the agent.
        drop(agent.take());
        // The kernel closes a dead process's sockets, so the server learns at
        // once, not a ping timeout later, and ends the session rather than
        // leaving it hanging.
        let mut byte = [0u8; 1];
        let end = tokio::time::timeout(PING_INTERVAL, session.read(&mut byte)).await;
        assert!(matches!(end, Ok(Ok(0) | Err(_))), "the session outlived its agent: {end:?}");
        let session_ended = killed.elapsed();
        wait_for("the server to drop the killed agent", PING_INTERVAL, || router.nodes().is_empty());
        let forgotten = killed.elapsed();
        let (code, _) = connect(client.clone(), &format!("{NODE_IP}:10250")).await;
        assert_eq!(code, 503, "no agent: the door must say so at once");
        (session_ended, forgotten)
    });

    let restarted = Instant::now();
    let _agent = spawn_netd(&stage.edge.path(), &command_line);
    wait_for("the restarted agent's link", Duration::from_secs(20), linked);
    let relinked = restarted.elapsed();
    eprintln!(
        "    killed agent: session ended after {session_ended:?}, server dropped it after {forgotten:?}; \
         restarted agent linked after {relinked:?}"
    );
    stage.in_cloud(|| async move {
        let (code, stream) = connect(client, &format!("{NODE_IP}:10250")).await;
        assert_eq!(code, 200);
        echo_round_trip(&mut stream.unwrap(), b"after the restart").await;
    });
    assert_eq!(router.metrics.agents.load(Ordering::Relaxed), 1, "{:?}", router.metrics);
    wait_for("every stream closed", Duration::from_secs(5), || {
        router.metrics.streams_open.load(Ordering::Relaxed) == 0
    });
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn a_thousand_concurrent_streams_through_one_agent() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    // Four descriptors per stream live in this process (client, door, agent, kubelet).
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read or write one rlimit that outlives the call.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert!(limit.rlim_cur >= 4_500, "the descriptor limit {} is too low for 1 000 streams", limit.rlim_cur);
    let stage = Stage::new();
    let linked = stage.linked();
    let (metrics, client) = (linked.metrics.clone(), linked.client.clone());
    let agent_metrics = metrics.clone();
    let server_router = linked.router.clone();
    stage.in_cloud(|| async move {
        // All 1 000 open at once before any byte moves, then each echoes its own tag.
        let mut streams = Vec::with_capacity(1000);
        for _ in 0..1000 {
            let (code, stream) = connect(client.clone(), &format!("{NODE_IP}:10250")).await;
            assert_eq!(code, 200);
            streams.push(stream.unwrap());
        }
        wait_for("1 000 streams open at both ends", Duration::from_secs(10), || {
            server_router.metrics.streams_open.load(Ordering::Relaxed) == 1000
                && agent_metrics.streams_open.load(Ordering::Relaxed) == 1000
        });
        let mut tasks = tokio::task::JoinSet::new();
        for (i, mut stream) in streams.into_iter().enumerate() {
            tasks.spawn(async move {
                let tag = format!("stream {i:04} of 1000");
                echo_round_trip(&mut stream, tag.as_bytes()).await;
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    });
    wait_for("every stream closed at the agent", Duration::from_secs(10), || {
        metrics.streams_open.load(Ordering::Relaxed) == 0
    });
    assert_eq!(metrics.streams_total.load(Ordering::Relaxed), 1000);
}
