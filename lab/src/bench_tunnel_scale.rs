//! `cargo xtask bench tunnel-scale` (issue 27): one real `netd-cloud
//! tunnel-server` and thousands of edge agents, each with its own node
//! certificate and its own TLS link, all run by this process in an "edge"
//! namespace (`netd_tunnel::agent::run` per node, one current-thread
//! runtime): what a link and a stream cost the server, what it does idle,
//! how long a stream takes to open among that many links, and how long the
//! fleet takes to come back after the server restarts.
//!
//! Each node has its own address (10.201.x.y on the edge's `lo`, its
//! certificate's IP SAN) and one listener on the edge answers every node's
//! 10250, holding what it accepts. Streams are opened through the CONNECT
//! door (TLS, kube-apiserver's client certificate), so "per stream" counts
//! what a kube-apiserver session costs the server: its front connection
//! and the tunnel stream. Stream opens are also timed through a second
//! replica that holds no link and forwards each to the first (a CONNECT to
//! its door); the second finds the first in an embedded registry where the
//! bench announces the first (the first runs without a registry, so its
//! agents keep counting one replica and nothing else moves). Memory is the
//! server's VmRSS (`/proc/<pid>/status`);
//! nobody publishes these figures for the anchors (apiserver-network-proxy,
//! yurt-tunnel), so there is no side-by-side run to quote.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netd::testing::{NetNs, VethPair};
use netd::tunnel::agent::{self, AgentConfig, AgentMetrics};
use netd::tunnel::certs::CertificateAuthority;
use netd::tunnel::tls;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bench::{machine, median, Scale};
use crate::bench_rss::status_kib;
use crate::tunnel_lab::{cpu_seconds, raise_fd_limit, start, strings};

const CLOUD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 71, 1);
const EDGE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 71, 2);
const AGENTS_PORT: u16 = 10262;
const CONNECT_PORT: u16 = 10265;
const METRICS: &str = "127.0.0.1:10266";
/// The forwarding replica's doors and metrics.
const FORWARDER_AGENTS_PORT: u16 = 10272;
const FORWARDER_CONNECT_PORT: u16 = 10275;
const FORWARDER_METRICS: &str = "127.0.0.1:10276";
const DAY: Duration = Duration::from_secs(86_400);
/// Stream opens timed one after another.
const LATENCY_OPENS: usize = 500;

/// [`LATENCY_OPENS`], or a few in a smoke run.
fn latency_opens() -> usize {
    Scale::sized(LATENCY_OPENS, 10)
}
/// Seconds the server is watched while idle.
const IDLE_SECONDS: u64 = 10;

/// Node `i`'s address.
fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn node_name(i: usize) -> String {
    format!("edge-{i:05}")
}

/// `GET /metrics` on the server, from inside the cloud namespace.
fn server_metric(cloud: &NetNs, name: &str) -> Option<f64> {
    metric_at(cloud, METRICS, name)
}

fn metric_at(cloud: &NetNs, addr: &str, name: &str) -> Option<f64> {
    let text = cloud
        .run(|| -> std::io::Result<String> {
            let mut stream = std::net::TcpStream::connect(addr)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")?;
            let mut body = String::new();
            stream.read_to_string(&mut body)?;
            Ok(body)
        })
        .ok()?
        .ok()?;
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn wait_linked(cloud: &NetNs, agents: usize, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    while server_metric(cloud, "netd_tunnel_agents") != Some(agents as f64) {
        if started.elapsed() > limit {
            let linked = server_metric(cloud, "netd_tunnel_agents");
            bail!("only {linked:?} of {agents} agents linked after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(started.elapsed())
}

/// A thread in `ns` running `make`'s future on a current-thread runtime
/// until the returned sender is dropped.
fn background<F, Fut>(ns: &NetNs, make: F) -> Result<(tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>)>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let netns = std::fs::File::open(ns.path()).context("opening the namespace")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready, entered) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace file this thread holds open; only
        // this thread moves, and it stays there until it ends.
        let moved = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } == 0;
        let _ = ready.send(if moved { Ok(()) } else { Err(std::io::Error::last_os_error().to_string()) });
        if !moved {
            return;
        }
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        runtime.block_on(async move {
            tokio::select! {
                () = make() => {}
                _ = stopped => {}
            }
        });
    });
    entered.recv().context("the background thread died")?.map_err(anyhow::Error::msg)?;
    Ok((stop, thread))
}

type Opened = (Duration, Duration, tokio_rustls::client::TlsStream<tokio::net::TcpStream>);

/// One CONNECT through the door: (time to the TLS session, time to `200`).
async fn open(client: Arc<rustls::ClientConfig>, dest: SocketAddr) -> Result<Opened> {
    open_at(client, CONNECT_PORT, dest).await
}

/// [`open`] through the CONNECT door on `port`.
async fn open_at(client: Arc<rustls::ClientConfig>, port: u16, dest: SocketAddr) -> Result<Opened> {
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect((CLOUD_IP, port)).await?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::IpAddress(IpAddr::V4(CLOUD_IP).into());
    let mut tls = tokio_rustls::TlsConnector::from(client).connect(name, tcp).await?;
    let handshake = started.elapsed();
    tls.write_all(format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n").as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        ensure!(tls.read(&mut byte).await? == 1, "the door closed the CONNECT to {dest}");
        head.push(byte[0]);
    }
    ensure!(head.starts_with(b"HTTP/1.1 200"), "CONNECT {dest}: {}", String::from_utf8_lossy(&head));
    Ok((handshake, started.elapsed(), tls))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted.get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// The benchmark: `agents` links, then `streams` idle streams.
pub fn run(agents: usize, streams: usize, bin_dir: &Path) -> Result<()> {
    ensure!(agents <= 250 * 250 && streams <= agents, "at most 62 500 agents, one stream each");
    // This process holds a link per agent and, per stream, the agent's
    // local dial, the socket the edge listener accepted and the CONNECT
    // client: as many streams as the open-file limit leaves room for.
    let wanted = (agents + 3 * streams + 1_000) as u64;
    let fds = raise_fd_limit(wanted)?;
    let room = (fds.saturating_sub(agents as u64 + 1_000) / 3) as usize;
    ensure!(room >= streams.min(100), "open-file limit {fds}: no room for the agents and their streams");
    let streams = streams.min(room);
    println!("\n== tunnel at scale: {agents} agents on one server, {streams} idle streams ({}) ==", machine());
    let dir = tempfile::tempdir()?;
    let netd_cloud = bin_dir.join("netd-cloud").to_string_lossy().into_owned();

    let cloud = NetNs::new()?;
    let edge = NetNs::new()?;
    let _veth = VethPair::new((Some(&cloud), "eth0"), (Some(&edge), "eth0"))?;
    cloud.ip(&["addr", "add", &format!("{CLOUD_IP}/24"), "dev", "eth0"])?;
    edge.ip(&["addr", "add", &format!("{EDGE_IP}/24"), "dev", "eth0"])?;
    let batch = dir.path().join("addresses");
    let lines: String = (0..agents).map(|i| format!("addr add {}/32 dev lo\n", node_ip(i))).collect();
    std::fs::write(&batch, lines)?;
    edge.ip(&["-batch", &batch.to_string_lossy()])?;

    // Certificates: the CA, the server's, kube-apiserver's client, and one
    // per node, made here (the agents' TLS settings are built from them).
    let made = Instant::now();
    let ca = CertificateAuthority::generate("netd bench tunnel CA", DAY)?;
    let server_dir = dir.path().join("server");
    ca.write_cert(&server_dir)?;
    ca.issue_server("tunnel-server", &[], &[IpAddr::V4(CLOUD_IP)], DAY)?.write(&server_dir, "server")?;
    ca.issue_client("kube-apiserver", None, DAY)?.write(&server_dir, "client")?;
    ca.issue_node(&node_name(0), &[IpAddr::V4(node_ip(0))], DAY)?.write(&server_dir, "node")?;
    let client = tls::connect_client(&netd::tunnel::certs::CertFiles::in_dir(&server_dir, "client").load()?)?;
    let mut configs = Vec::with_capacity(agents);
    for i in 0..agents {
        let leaf = ca.issue_node(&node_name(i), &[IpAddr::V4(node_ip(i))], DAY)?;
        let mut certs = netd::tunnel::certs::CertFiles::in_dir(&server_dir, "node").load()?;
        certs.chain = vec![leaf.cert_der().clone()];
        certs.key = leaf.key_der();
        configs.push(AgentConfig {
            servers: vec![format!("{CLOUD_IP}:{AGENTS_PORT}")],
            server_name: ServerName::IpAddress(IpAddr::V4(CLOUD_IP).into()),
            tls: tls::fixed(tls::agent(&certs)?),
            own_addresses: vec![IpAddr::V4(node_ip(i))],
            pod_subnets: tls::fixed(Arc::new(Vec::new())),
            allowed_ports: [10250].into_iter().collect(),
            dial_loopback: false,
        });
    }
    println!("  {agents} node certificates made in {:.1} s", made.elapsed().as_secs_f64());

    let cap = (2 * agents + streams + 100).to_string();
    let server_args = strings(&[
        "tunnel-server",
        "--cert-dir",
        &server_dir.to_string_lossy(),
        "--agents-listen",
        &format!("{CLOUD_IP}:{AGENTS_PORT}"),
        "--connect-listen",
        &format!("{CLOUD_IP}:{CONNECT_PORT}"),
        "--dnat-listen",
        "",
        "--http-listen",
        "",
        "--metrics-listen",
        METRICS,
        "--max-connections",
        &cap,
        "--max-connections-per-source",
        &cap,
        "--log",
        "warn",
    ]);
    let mut server = start(&cloud, None, dir.path(), "tunnel-server", &netd_cloud, &server_args)?;
    let mut pid = server.pid().context("the server exited at once")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while server_metric(&cloud, "netd_tunnel_agents").is_none() {
        ensure!(Instant::now() < deadline, "the server's /metrics never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss_empty = status_kib(pid, "VmRSS:")?;
    let lab_before = status_kib(std::process::id(), "VmRSS:")?;

    // The edge: every node's 10250 answered and held, and the agents.
    let held: Arc<Mutex<Vec<tokio::net::TcpStream>>> = Arc::default();
    let holder = held.clone();
    let agent_metrics: Vec<Arc<AgentMetrics>> = (0..agents).map(|_| Arc::new(AgentMetrics::default())).collect();
    let for_agents = agent_metrics.clone();
    let (stop_edge, edge_thread) = background(&edge, move || async move {
        let Ok(listener) = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 10250)).await else { return };
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                holder.lock().unwrap_or_else(PoisonError::into_inner).push(stream);
            }
        });
        for (config, metrics) in configs.into_iter().zip(for_agents) {
            tasks.spawn(agent::run(config, metrics));
        }
        while tasks.join_next().await.is_some() {}
    })?;
    let cpu_before = cpu_seconds(pid)?;
    let linked_in = wait_linked(&cloud, agents, Duration::from_secs(300))?;
    let link_cpu = cpu_seconds(pid)? - cpu_before;
    std::thread::sleep(Duration::from_secs(2));
    let rss_linked = status_kib(pid, "VmRSS:")?;
    let lab_linked = status_kib(std::process::id(), "VmRSS:")?;
    let idle_start = cpu_seconds(pid)?;
    let idle_seconds = Scale::sized(IDLE_SECONDS, 1);
    std::thread::sleep(Duration::from_secs(idle_seconds));
    let idle_cpu = (cpu_seconds(pid)? - idle_start) / idle_seconds as f64;

    // Stream opens among all those links, one after another, then the idle
    // streams, held open from the cloud.
    let opens = timed_opens(&cloud, &client, CONNECT_PORT, agents)?;
    let forwarded = forwarded_opens(&cloud, dir.path(), &server_dir, &netd_cloud, &client, agents)?;
    // The timed opens' far ends, closed on the cloud side already: their
    // descriptors go back to the idle streams' budget.
    held.lock().unwrap_or_else(PoisonError::into_inner).clear();
    let held_streams: Arc<Mutex<Vec<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>> = Arc::default();
    let keeper = held_streams.clone();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let (stop_cloud, cloud_thread) = background(&cloud, move || async move {
        let mut failed = None;
        for n in 0..streams {
            match open(client.clone(), SocketAddr::new(IpAddr::V4(node_ip(n)), 10250)).await {
                Ok((_, _, stream)) => keeper.lock().unwrap_or_else(PoisonError::into_inner).push(stream),
                Err(err) => {
                    failed = Some(err.to_string());
                    break;
                }
            }
        }
        let _ = opened_tx.send(failed);
        std::future::pending::<()>().await;
    })?;
    if let Some(err) = opened_rx.recv()? {
        bail!("opening the idle streams: {err}");
    }
    let open_deadline = Instant::now() + Duration::from_secs(60);
    while server_metric(&cloud, "netd_tunnel_streams_open") != Some(streams as f64) {
        ensure!(Instant::now() < open_deadline, "the server never counted {streams} open streams");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss_streams = status_kib(pid, "VmRSS:")?;
    drop(stop_cloud);
    let _ = cloud_thread.join();
    drop(held_streams);

    // The server restarts (SIGKILL, then the same command): every agent
    // links again by itself; no registry, so no API request at all.
    drop(server);
    let restarted = Instant::now();
    server = start(&cloud, None, dir.path(), "tunnel-server-2", &netd_cloud, &server_args)?;
    pid = server.pid().context("the restarted server exited at once")?;
    let relinked_in = wait_linked(&cloud, agents, Duration::from_secs(300))?;
    let relink_cpu = cpu_seconds(pid)?;
    let relinked_total = restarted.elapsed();
    drop(stop_edge);
    let _ = edge_thread.join();
    drop(held);
    drop(server);

    let kib_per = |delta: u64, n: usize| delta as f64 / n.max(1) as f64;
    let mut totals: Vec<Duration> = opens.iter().map(|(_, total)| *total).collect();
    let mut overheads: Vec<Duration> =
        opens.iter().map(|(handshake, total)| total.saturating_sub(*handshake)).collect();
    totals.sort();
    overheads.sort();
    let handshakes: Vec<f64> = opens.iter().map(|(handshake, _)| handshake.as_secs_f64()).collect();
    println!("  | measure | value |");
    println!("  | --- | ---: |");
    println!("  | server VmRSS, no agents | {:.1} MiB |", rss_empty as f64 / 1024.0);
    println!(
        "  | server VmRSS, {agents} agents linked | {:.1} MiB (**{:.1} KiB per idle link**) |",
        rss_linked as f64 / 1024.0,
        kib_per(rss_linked.saturating_sub(rss_empty), agents)
    );
    println!(
        "  | server VmRSS, + {streams} idle CONNECT streams | {:.1} MiB (**{:.1} KiB per idle stream**, front TLS connection included) |",
        rss_streams as f64 / 1024.0,
        kib_per(rss_streams.saturating_sub(rss_linked), streams)
    );
    println!("  | server CPU while idle with {agents} links | {:.2} % of a core |", idle_cpu * 100.0);
    println!("  | all {agents} linked after start | {:.1} s (server CPU {:.1} s) |", linked_in.as_secs_f64(), link_cpu);
    println!(
        "  | all {agents} re-linked after a server restart (SIGKILL) | {:.1} s (server CPU {relink_cpu:.1} s; API requests: 0, no registry) |",
        relinked_total.as_secs_f64().max(relinked_in.as_secs_f64())
    );
    println!(
        "  | CONNECT → 200, p50 / p99 ({} opens) | {} / {} (TLS to the door alone: p50 {}) |",
        latency_opens(),
        ms(percentile(&totals, 0.5)),
        ms(percentile(&totals, 0.99)),
        ms(Duration::from_secs_f64(median(&handshakes)))
    );
    println!(
        "  | of which the tunnel (after the door's TLS), p50 / p99 | {} / {} |",
        ms(percentile(&overheads, 0.5)),
        ms(percentile(&overheads, 0.99))
    );
    let mut through: Vec<Duration> = forwarded.iter().map(|(_, total)| *total).collect();
    through.sort();
    println!(
        "  | CONNECT → 200 through a replica forwarding to the one with the links, p50 / p99 ({} opens) | {} / {} ({:.1}× direct at p50) |",
        latency_opens(),
        ms(percentile(&through, 0.5)),
        ms(percentile(&through, 0.99)),
        percentile(&through, 0.5).as_secs_f64() / percentile(&totals, 0.5).as_secs_f64().max(1e-9)
    );
    println!(
        "  | agents' side (this process), per link | {:.1} KiB |",
        kib_per(lab_linked.saturating_sub(lab_before), agents)
    );
    Ok(())
}

/// Stream opens through a second replica with no links: it finds the first
/// in an embedded registry (the bench announces the first there, which
/// runs without one) and forwards every CONNECT to it.
fn forwarded_opens(
    cloud: &NetNs,
    dir: &Path,
    server_dir: &Path,
    netd_cloud: &str,
    client: &Arc<rustls::ClientConfig>,
    agents: usize,
) -> Result<Vec<(Duration, Duration)>> {
    use netd::registry::embedded::EmbeddedRegistry;
    use netd::registry::replicas::{ReplicaRecord, ReplicaStore};

    let db = dir.join("registry.db");
    let network = netd::registry::NetworkConfig { network: "10.244.0.0/16".parse()?, subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&db, &network)?;
    let first = ReplicaRecord::new(
        "tunnel-first",
        &format!("{CLOUD_IP}:{CONNECT_PORT}"),
        false,
        Duration::from_secs(3600),
        std::time::SystemTime::now(),
    );
    let mut store = EmbeddedRegistry::open(&db, Duration::from_millis(50));
    cloud.block_on(|| async move { store.announce_replica(&first).await })??;
    let args = strings(&[
        "tunnel-server",
        "--cert-dir",
        &server_dir.to_string_lossy(),
        "--agents-listen",
        &format!("{CLOUD_IP}:{FORWARDER_AGENTS_PORT}"),
        "--connect-listen",
        &format!("{CLOUD_IP}:{FORWARDER_CONNECT_PORT}"),
        "--dnat-listen",
        "",
        "--http-listen",
        "",
        "--metrics-listen",
        FORWARDER_METRICS,
        "--replica-id",
        "tunnel-forwarder",
        "--registry",
        &format!("embedded:{}", db.display()),
        "--log",
        "warn",
    ]);
    let forwarder = start(cloud, None, dir, "tunnel-forwarder", netd_cloud, &args)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric_at(cloud, FORWARDER_METRICS, "netd_tunnel_peers") != Some(1.0) {
        ensure!(Instant::now() < deadline, "the forwarding replica never read its peer from the registry");
        std::thread::sleep(Duration::from_millis(50));
    }
    let times = timed_opens(cloud, client, FORWARDER_CONNECT_PORT, agents)?;
    let forwarded = metric_at(cloud, FORWARDER_METRICS, "netd_tunnel_forwarded_total");
    let opens = latency_opens();
    ensure!(forwarded == Some(opens as f64), "the replica forwarded {forwarded:?} of {opens} opens");
    drop(forwarder);
    Ok(times)
}

/// [`LATENCY_OPENS`] CONNECTs through the door on `port`, one after another,
/// to nodes spread over the `agents`: (time to the TLS session, time to `200`)
/// of each.
fn timed_opens(
    cloud: &NetNs,
    client: &Arc<rustls::ClientConfig>,
    port: u16,
    agents: usize,
) -> Result<Vec<(Duration, Duration)>> {
    let client = client.clone();
    cloud.block_on(move || async move {
        let mut times = Vec::with_capacity(latency_opens());
        for n in 0..latency_opens() {
            let dest = SocketAddr::new(IpAddr::V4(node_ip((n * 7919) % agents)), 10250);
            let (handshake, total, stream) = open_at(client.clone(), port, dest).await?;
            drop(stream);
            times.push((handshake, total));
        }
        anyhow::Ok(times)
    })?
}
