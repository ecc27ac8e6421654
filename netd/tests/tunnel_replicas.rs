//! Two tunnel server replicas behind one address (a round-robin TCP
//! balancer in the cloud namespace, as an SLB or a Service would be) and
//! three edge nodes' agents, all real `netd-cloud tunnel-server` and
//! `netd tunnel-agent` processes on the stage of `common/tunnel_stage.rs`.
//! Every agent ends up linked to both replicas; a replica killed leaves
//! every node reachable through the other, and the agents re-link when it
//! returns; a replica stopped with SIGTERM drains: its doors close, running
//! streams finish, agents hear it and the other replica takes new streams;
//! replicas meeting in a registry count each other and tell the agents; a
//! replica without a node's link forwards DNAT'd and CONNECT streams to the
//! one that has it (in process, with the real eBPF DNAT).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/tunnel_stage.rs"]
mod tunnel_stage;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netd::testing;
use netd::tunnel::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel_stage::{
    connect_at, metrics_in, spawn_netd, spawn_netd_cloud, wait_for, Background, NetdChild, Stage, AGENT_PORT, CLOUD_IP,
    DAY,
};

/// The edge nodes: name and address (each agent's certificate names it).
const NODES: [(&str, Ipv4Addr); 3] = [
    ("edge-1", Ipv4Addr::new(10, 250, 0, 2)),
    ("edge-2", Ipv4Addr::new(10, 250, 0, 3)),
    ("edge-3", Ipv4Addr::new(10, 250, 0, 4)),
];

/// A replica: identity, agents' port (behind the balancer, on loopback),
/// CONNECT door and metrics port.
struct Replica {
    id: &'static str,
    agents: u16,
    connect: u16,
    metrics: u16,
}

const REPLICAS: [Replica; 2] = [
    Replica { id: "tunnel-a", agents: 10301, connect: 10311, metrics: 10321 },
    Replica { id: "tunnel-b", agents: 10302, connect: 10312, metrics: 10322 },
];

/// How long a draining replica lets streams finish, in these tests.
const GRACE: Duration = Duration::from_secs(15);

/// A replica told the fleet has two replicas (`--replicas 2`): nothing to
/// read them from.
fn start_replica(stage: &Stage, replica: &Replica) -> NetdChild {
    start_replica_with(stage, replica, &["--replicas".into(), "2".into()])
}

/// A replica that announces itself in the embedded registry `db` and
/// counts the live replicas there (no `--replicas`).
fn start_replica_in(stage: &Stage, replica: &Replica, db: &std::path::Path) -> NetdChild {
    // Records renewed every second: the test waits for reads, not for 5 s ticks.
    let registry = format!("embedded:{}", db.display());
    start_replica_with(stage, replica, &["--registry".into(), registry, "--replica-ttl".into(), "3s".into()])
}

fn start_replica_with(stage: &Stage, replica: &Replica, extra: &[String]) -> NetdChild {
    let cert_dir = stage.pki.dir.path().to_str().unwrap().to_string();
    let mut args = vec![
        "tunnel-server".to_string(),
        "--cert-dir".into(),
        cert_dir,
        "--agents-listen".into(),
        format!("127.0.0.1:{}", replica.agents),
        "--connect-listen".into(),
        format!("{CLOUD_IP}:{}", replica.connect),
        "--dnat-listen".into(),
        String::new(),
        "--http-listen".into(),
        String::new(),
        "--metrics-listen".into(),
        format!("127.0.0.1:{}", replica.metrics),
        "--replica-id".into(),
        replica.id.into(),
        "--drain-grace".into(),
        format!("{}s", GRACE.as_secs()),
    ];
    args.extend_from_slice(extra);
    spawn_netd_cloud(&stage.cloud.path(), &args)
}

/// An embedded registry the replicas share.
fn registry() -> (tempfile::TempDir, std::path::PathBuf) {
    use netd::registry::embedded::EmbeddedRegistry;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("registry.db");
    let network = netd::registry::NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&db, &network).unwrap();
    (dir, db)
}

/// A node whose agent reaches one replica only (`tunnel-b`, through
/// [`PINNED_PORT`]): the others reach it by forwarding.
const PINNED: (&str, Ipv4Addr) = ("edge-4", Ipv4Addr::new(10, 250, 0, 5));
const PINNED_PORT: u16 = AGENT_PORT + 1;

/// A round-robin TCP balancer on the agents' address in front of the
/// replicas: a backend that refuses is skipped, as an SLB's health check or
/// a Service's endpoint removal would, eventually.
fn balancer(stage: &Stage) -> Background {
    relay(stage, AGENT_PORT, REPLICAS.iter().map(|r| r.agents).collect())
}

/// [`balancer`] on `port` over the replicas' agent ports `backends`.
fn relay(stage: &Stage, port: u16, backends: Vec<u16>) -> Background {
    Background::start(&stage.cloud.path(), move || async move {
        let listener = TcpListener::bind((CLOUD_IP, port)).await.unwrap();
        let next = Arc::new(AtomicUsize::new(0));
        let backends = Arc::new(backends);
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            let first = next.fetch_add(1, Ordering::Relaxed);
            let backends = backends.clone();
            tokio::spawn(async move {
                for turn in 0..backends.len() {
                    let port = backends[(first + turn) % backends.len()];
                    if let Ok(mut backend) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                        return;
                    }
                }
            });
        }
    })
}

/// Kubelet stand-ins on every node address ([`PINNED`]'s too): port 10250 echoes.
fn kubelets(stage: &Stage) -> Background {
    for (_, ip) in NODES[1..].iter().chain([&PINNED]) {
        stage.edge.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]).unwrap();
    }
    Background::start(&stage.edge.path(), || async {
        let mut serving = tokio::task::JoinSet::new();
        for (_, ip) in NODES.into_iter().chain([PINNED]) {
            let listener = TcpListener::bind((ip, 10250)).await.unwrap();
            serving.spawn(async move {
                loop {
                    let (mut stream, _) = listener.accept().await.unwrap();
                    tokio::spawn(async move {
                        let (mut read, mut write) = stream.split();
                        let _ = tokio::io::copy(&mut read, &mut write).await;
                    });
                }
            });
        }
        while serving.join_next().await.is_some() {}
    })
}

/// One agent process per node, each with its own certificate directory,
/// dialling the balancer's one address. Returns them with their metrics
/// addresses.
fn agents(stage: &Stage) -> Vec<(NetdChild, String, tempfile::TempDir)> {
    NODES.iter().enumerate().map(|(i, node)| agent(stage, *node, AGENT_PORT, 10330 + i as u16)).collect()
}

/// `node`'s agent process, dialling the cloud's `port`, its metrics on `metrics_port`.
fn agent(
    stage: &Stage,
    (node, ip): (&str, Ipv4Addr),
    port: u16,
    metrics_port: u16,
) -> (NetdChild, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    stage.pki.ca.write_cert(dir.path()).unwrap();
    stage.pki.ca.issue_node(node, &[IpAddr::V4(ip)], DAY).unwrap().write(dir.path(), "node").unwrap();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let args = [
        "tunnel-agent",
        "--server",
        &format!("{CLOUD_IP}:{port}"),
        "--cert-dir",
        dir.path().to_str().unwrap(),
        "--metrics-listen",
        &metrics,
    ];
    (spawn_netd(&stage.edge.path(), &args), metrics, dir)
}

/// A sample's value in a scrape (`name` with its labels, if any).
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn replica_metric(stage: &Stage, replica: &Replica, name: &str) -> Option<f64> {
    value(&metrics_in(&stage.cloud, &format!("127.0.0.1:{}", replica.metrics)), name)
}

fn agent_metric(stage: &Stage, addr: &str, name: &str) -> Option<f64> {
    value(&metrics_in(&stage.edge, addr), name)
}

/// CONNECT through `replica`'s door to `node`'s kubelet: the status code,
/// and an echo round trip when it is 200.
fn reach(stage: &Stage, client: &Arc<rustls::ClientConfig>, replica: &Replica, node: Ipv4Addr) -> u16 {
    let (client, port) = (client.clone(), replica.connect);
    stage.in_cloud(|| async move {
        let (code, stream) = connect_at(client, port, &format!("{node}:10250")).await;
        if let Some(mut stream) = stream {
            stream.write_all(b"ping").await.unwrap();
            let mut echoed = [0u8; 4];
            stream.read_exact(&mut echoed).await.unwrap();
            assert_eq!(&echoed, b"ping");
        }
        code
    })
}

fn all_linked(stage: &Stage, replica: &Replica) -> bool {
    linked(stage, replica, NODES.len())
}

/// Whether `replica` holds exactly `links` agent links.
fn linked(stage: &Stage, replica: &Replica, links: usize) -> bool {
    replica_metric(stage, replica, "netd_tunnel_agents") == Some(links as f64)
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn every_agent_links_to_both_replicas_behind_one_address_and_survives_losing_one() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let _kubelets = kubelets(&stage);
    let mut replicas: Vec<Option<NetdChild>> = REPLICAS.iter().map(|r| Some(start_replica(&stage, r))).collect();
    let _balancer = balancer(&stage);
    let agents = agents(&stage);
    let client = tls::connect_client(&stage.pki.files("client").load().unwrap()).unwrap();

    // One address, two replicas: every agent keeps dialling until it holds both.
    let started = Instant::now();
    for replica in &REPLICAS {
        wait_for(&format!("every agent linked to {}", replica.id), Duration::from_secs(30), || {
            all_linked(&stage, replica)
        });
    }
    eprintln!("    3 agents linked to both replicas behind one address after {:?}", started.elapsed());
    for (_, metrics, _) in &agents {
        assert_eq!(agent_metric(&stage, metrics, "netd_tunnel_agent_replicas_linked"), Some(2.0));
        assert_eq!(agent_metric(&stage, metrics, "netd_tunnel_agent_replicas_expected"), Some(2.0));
        assert_eq!(agent_metric(&stage, metrics, "netd_tunnel_agent_links_up"), Some(2.0));
    }
    for replica in &REPLICAS {
        for (_, ip) in NODES {
            assert_eq!(reach(&stage, &client, replica, ip), 200, "{ip} through {}", replica.id);
        }
    }

    // The second replica dies without a word: the first serves every node
    // at once, never saying "no agent".
    drop(replicas[1].take());
    for (_, ip) in NODES {
        assert_eq!(reach(&stage, &client, &REPLICAS[0], ip), 200, "{ip} right after the other replica died");
    }
    for (_, metrics, _) in &agents {
        wait_for("the agents see one replica left", Duration::from_secs(10), || {
            agent_metric(&stage, metrics, "netd_tunnel_agent_replicas_linked") == Some(1.0)
        });
    }
    // The agents keep dialling the shared address for the missing replica:
    // what they reach is the one they hold, closed as a duplicate.
    wait_for("a duplicate link refused", Duration::from_secs(20), || {
        replica_metric(&stage, &REPLICAS[0], "netd_tunnel_duplicate_links_total").is_some_and(|n| n >= 1.0)
    });
    assert!(all_linked(&stage, &REPLICAS[0]), "a duplicate displaced a live link");
    for (_, ip) in NODES {
        assert_eq!(reach(&stage, &client, &REPLICAS[0], ip), 200, "{ip} while the other replica is down");
    }

    // Back: every agent links to it again, through the same address.
    let restarted = Instant::now();
    replicas[1] = Some(start_replica(&stage, &REPLICAS[1]));
    wait_for("every agent linked to the restarted replica", Duration::from_secs(60), || {
        all_linked(&stage, &REPLICAS[1])
    });
    eprintln!("    restarted replica: all 3 agents linked again after {:?}", restarted.elapsed());
    for (_, ip) in NODES {
        assert_eq!(reach(&stage, &client, &REPLICAS[1], ip), 200, "{ip} through the restarted replica");
    }
    assert_eq!(replica_metric(&stage, &REPLICAS[0], "netd_tunnel_no_agent_total"), Some(0.0));
    assert_eq!(replica_metric(&stage, &REPLICAS[1], "netd_tunnel_no_agent_total"), Some(0.0));
    assert!(all_linked(&stage, &REPLICAS[0]));
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn a_replica_stopped_with_sigterm_drains_its_streams_and_the_other_takes_new_ones() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let _kubelets = kubelets(&stage);
    // The replicas meet in the registry: each learns the other (its peer)
    // and how many are live, which is what the agents are told.
    let (_registry_dir, db) = registry();
    let mut replicas: Vec<NetdChild> = REPLICAS.iter().map(|r| start_replica_in(&stage, r, &db)).collect();
    let _balancer = balancer(&stage);
    let agents = agents(&stage);
    // edge-4 reaches tunnel-b only: the other serves it by forwarding.
    let _pinned_relay = relay(&stage, PINNED_PORT, vec![REPLICAS[1].agents]);
    let _pinned = agent(&stage, PINNED, PINNED_PORT, 10339);
    let client = tls::connect_client(&stage.pki.files("client").load().unwrap()).unwrap();
    for (replica, links) in REPLICAS.iter().zip([3, 4]) {
        wait_for(&format!("every agent linked to {}", replica.id), Duration::from_secs(30), || {
            linked(&stage, replica, links)
        });
        // Each reads the registry every second here: the first to start
        // may still count one for a moment.
        wait_for(&format!("{} counts two live replicas", replica.id), Duration::from_secs(15), || {
            replica_metric(&stage, replica, "netd_tunnel_replicas_live") == Some(2.0)
                && replica_metric(&stage, replica, "netd_tunnel_peers") == Some(1.0)
        });
    }
    for (_, metrics, _) in &agents {
        assert_eq!(agent_metric(&stage, metrics, "netd_tunnel_agent_replicas_expected"), Some(2.0));
    }
    let announced = || {
        stage.in_cloud(|| async {
            use netd::registry::replicas::ReplicaStore;
            let mut store = netd::registry::embedded::EmbeddedRegistry::open(&db, Duration::from_millis(50));
            let records = store.replicas(std::time::SystemTime::now()).await.unwrap();
            records.into_iter().map(|r| (r.id, r.address, r.draining)).collect::<Vec<_>>()
        })
    };
    let address = |replica: &Replica| format!("{CLOUD_IP}:{}", replica.connect);
    assert_eq!(
        announced(),
        vec![("tunnel-a".into(), address(&REPLICAS[0]), false), ("tunnel-b".into(), address(&REPLICAS[1]), false)]
    );
    // tunnel-a holds no link of edge-4: it forwards to tunnel-b, which does.
    assert_eq!(reach(&stage, &client, &REPLICAS[0], PINNED.1), 200);
    assert_eq!(replica_metric(&stage, &REPLICAS[0], "netd_tunnel_forwarded_total"), Some(1.0));
    assert_eq!(replica_metric(&stage, &REPLICAS[1], "netd_tunnel_from_peers_total"), Some(1.0));
    let (draining, other) = (&REPLICAS[0], &REPLICAS[1]);
    let node = NODES[0].1;

    let (session_bytes, stopped_after) = stage.in_cloud(|| async {
        // A long session (`kubectl logs -f`, exec) through the replica that
        // is about to stop.
        let (code, session) = connect_at(client.clone(), draining.connect, &format!("{node}:10250")).await;
        assert_eq!(code, 200);
        let mut session = session.unwrap();
        session.write_all(b"before").await.unwrap();
        let mut buf = [0u8; 6];
        session.read_exact(&mut buf).await.unwrap();

        replicas[0].terminate();
        let terminated = Instant::now();
        // Its doors close at once: new connections go elsewhere.
        let refused = async {
            loop {
                if TcpStream::connect((CLOUD_IP, draining.connect)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), refused).await.expect("the draining replica's door still accepts");
        // The agents heard it: they count it as draining, and stay linked
        // to the other.
        for (_, metrics, _) in &agents {
            wait_for("the agents hear the replica drains", Duration::from_secs(5), || {
                agent_metric(&stage, metrics, "netd_tunnel_agent_replicas_draining") == Some(1.0)
            });
        }
        assert_eq!(replica_metric(&stage, draining, "netd_tunnel_draining"), Some(1.0));
        assert!(announced().contains(&("tunnel-a".into(), address(draining), true)), "the drain is announced");
        // New streams: the other replica carries them.
        for (_, ip) in NODES {
            let (code, stream) = connect_at(client.clone(), other.connect, &format!("{ip}:10250")).await;
            assert_eq!(code, 200, "{ip} through the other replica during the drain");
            drop(stream);
        }
        // The running session goes on during the drain, well past the
        // moment the signal arrived.
        let mut carried = 0usize;
        for round in 0..10u8 {
            let message = [round; 64];
            session.write_all(&message).await.unwrap();
            let mut echoed = [0u8; 64];
            session.read_exact(&mut echoed).await.unwrap();
            assert_eq!(echoed, message);
            carried += echoed.len();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(terminated.elapsed() < GRACE);
        // The session ends: nothing is left, and the replica stops.
        drop(session);
        (carried, terminated)
    });
    let status = replicas[0].wait_timeout(GRACE).expect("the drained replica did not exit within its grace");
    let exited = stopped_after.elapsed();
    assert!(status.success(), "{status}");
    assert!(exited < GRACE, "exited after {exited:?}: it waited for the grace, not for its streams");
    eprintln!(
        "    drain: a running session carried {session_bytes} bytes after SIGTERM; replica exited {exited:?} after it"
    );

    // Drained, it withdrew: the other counts one live replica and tells
    // the agents, which hold it alone and stop dialling for a second.
    assert_eq!(announced(), vec![("tunnel-b".into(), address(other), false)]);
    wait_for("the other replica counts itself alone", Duration::from_secs(15), || {
        replica_metric(&stage, other, "netd_tunnel_replicas_live") == Some(1.0)
    });
    for (_, metrics, _) in &agents {
        wait_for("the agents hold the other replica only", Duration::from_secs(10), || {
            agent_metric(&stage, metrics, "netd_tunnel_agent_replicas_linked") == Some(1.0)
                && agent_metric(&stage, metrics, "netd_tunnel_agent_replicas_expected") == Some(1.0)
        });
    }
    assert!(linked(&stage, other, 4));
    // A rolling restart's second half: it comes back, announces itself, the
    // other tells the agents there are two again, and they return.
    replicas[0] = start_replica_in(&stage, draining, &db);
    wait_for("every agent linked to the restarted replica", Duration::from_secs(60), || all_linked(&stage, draining));
    assert_eq!(reach(&stage, &client, draining, node), 200);
    assert_eq!(replica_metric(&stage, other, "netd_tunnel_replicas_live"), Some(2.0));
    // It reads its peer at once and forwards edge-4's streams again; no
    // replica ever answered "no agent".
    wait_for("the restarted replica knows its peer", Duration::from_secs(15), || {
        replica_metric(&stage, draining, "netd_tunnel_peers") == Some(1.0)
    });
    assert_eq!(reach(&stage, &client, draining, PINNED.1), 200);
    for replica in &REPLICAS {
        assert_eq!(replica_metric(&stage, replica, "netd_tunnel_no_agent_total"), Some(0.0), "{}", replica.id);
    }
}

/// Open descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap()
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn a_thousand_link_cycles_leak_no_task_socket_or_memory() {
    use netd::tunnel::agent::AgentMetrics;
    use netd::tunnel::server::{self, Router};
    use tunnel_stage::NODE;

    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let router = Arc::new(Router::default());
    // The server on its own runtime, whose live tasks are sampled.
    let tasks = Arc::new(AtomicUsize::new(0));
    let certs = stage.pki.files("server").load().unwrap();
    let agents_tls = tls::fixed(tls::agents_door(&certs).unwrap());
    let (serving, sampled) = (router.clone(), tasks.clone());
    let _server = Background::start(&stage.cloud.path(), move || async move {
        tokio::spawn(async move {
            loop {
                sampled.store(tokio::runtime::Handle::current().metrics().num_alive_tasks(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let agents = TcpListener::bind((CLOUD_IP, AGENT_PORT)).await.unwrap();
        server::serve_agents(agents, agents_tls, serving).await;
    });
    let config = stage.agent_config(NODE);
    let cycle = || {
        let agent = stage.agent(config.clone(), Arc::new(AgentMetrics::default()));
        wait_for("the agent linked", Duration::from_secs(10), || router.nodes().len() == 1);
        drop(agent);
        wait_for("the link gone", Duration::from_secs(10), || router.nodes().is_empty());
    };
    // Warm up (allocator arenas, the first handshakes' caches), then count.
    for _ in 0..20 {
        cycle();
    }
    let settle = || std::thread::sleep(Duration::from_millis(200));
    settle();
    let idle_tasks = tasks.load(Ordering::Relaxed);
    // The count sees links: one more task while the agent is linked.
    let agent = stage.agent(config.clone(), Arc::new(AgentMetrics::default()));
    wait_for("the link's task counted", Duration::from_secs(10), || tasks.load(Ordering::Relaxed) > idle_tasks);
    drop(agent);
    wait_for("the link gone", Duration::from_secs(10), || router.nodes().is_empty());
    settle();
    let before = (tasks.load(Ordering::Relaxed), open_fds(), vm_rss_kib());
    let started = Instant::now();
    for _ in 0..1_000 {
        cycle();
    }
    settle();
    let after = (tasks.load(Ordering::Relaxed), open_fds(), vm_rss_kib());
    eprintln!(
        "    1 000 link up/down cycles in {:?}: server tasks {} → {}, descriptors {} → {}, VmRSS {} → {} KiB",
        started.elapsed(),
        before.0,
        after.0,
        before.1,
        after.1,
        before.2,
        after.2
    );
    assert_eq!(after.0, before.0, "server tasks leaked");
    assert_eq!(after.1, before.1, "descriptors leaked");
    // A leak of even 2 KiB per cycle would show as 2 MiB.
    assert!(after.2 < before.2 + 2_048, "memory grew {} KiB over 1 000 cycles", after.2 - before.2);
    assert_eq!(router.metrics.agents.load(Ordering::Relaxed), 0);
    assert_eq!(router.metrics.links_replaced.load(Ordering::Relaxed), 0);
}

/// An in-process replica's peers: the others' CONNECT doors, dialled with
/// the stage's server certificate.
fn peers_of(stage: &Stage, id: &str, others: &[(&str, u16)]) -> Arc<netd::tunnel::peers::Peers> {
    use netd::tunnel::peers::{Peer, Peers};
    let certs = stage.pki.files("server").load().unwrap();
    let dialer = tls::fixed(tls::connect_client(&certs).unwrap());
    let peers = Peers::new(id, certs.chain[0].as_ref(), dialer, Duration::from_secs(5)).unwrap();
    peers.replace(
        others.iter().map(|(id, port)| Peer { id: id.to_string(), address: format!("{CLOUD_IP}:{port}") }).collect(),
    );
    Arc::new(peers)
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn a_replica_without_the_nodes_link_forwards_dnat_and_connect_streams_to_the_one_that_has_it() {
    use netd::tunnel::server::{self, ReplicaIdentity, Router, ServerPolicy};
    use tunnel_stage::{curl_in, plain_http_stand_ins, stand_in_body, CONNECT_PORT, KUBELET_DNAT_RULES, NODE, NODE_IP};

    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    const A_CONNECT: u16 = 10275;
    let policy =
        |id: &str| ServerPolicy { replica: ReplicaIdentity { id: id.into(), replicas: 2 }, ..ServerPolicy::default() };
    // Replica b holds the node's link (agents' door and CONNECT door on the
    // stage's ports); replica a has no link, a CONNECT door of its own and
    // the cloud node's DNAT doors. Each knows the other.
    let b = Arc::new(Router::new(policy("b")).with_peers(peers_of(&stage, "b", &[("a", A_CONNECT)])));
    let a = Arc::new(Router::new(policy("a")).with_peers(peers_of(&stage, "a", &[("b", CONNECT_PORT)])));
    let _b_doors = stage.server(b.clone());
    let certs = stage.pki.files("server").load().unwrap();
    let connect_tls = tls::fixed(tls::server(&certs, tls::ALPN_HTTP1).unwrap());
    let a_door = a.clone();
    let _a_connect = Background::start(&stage.cloud.path(), move || async move {
        let listener = TcpListener::bind((CLOUD_IP, A_CONNECT)).await.unwrap();
        server::serve_connect(listener, connect_tls, a_door).await;
    });
    let _stand_ins = plain_http_stand_ins(&stage, &[10255]);
    let _agent = stage.agent(stage.agent_config(NODE), Arc::new(netd::tunnel::agent::AgentMetrics::default()));
    wait_for("the agent linked to b", Duration::from_secs(10), || b.nodes() == vec![NODE.to_string()]);
    assert!(a.nodes().is_empty());
    let doors = stage.dnat_doors(a.clone(), &KUBELET_DNAT_RULES);

    // A cloud-node client's connection, redirected by the eBPF DNAT to a's
    // door: a forwards it to b, which holds the node.
    let (ok, code, body) = curl_in(Some(&doors.cgroup), &stage.cloud, &[&format!("http://{NODE_IP}:10255/pods")]);
    assert!(ok && code == "200", "{code} {body}");
    assert_eq!(body, stand_in_body(10255, "/pods"));
    let forwarded = |router: &Router| router.peers().unwrap().metrics.forwarded.load(Ordering::Relaxed);
    let from_peers = |router: &Router| router.peers().unwrap().metrics.from_peers.load(Ordering::Relaxed);
    assert_eq!((forwarded(&a), from_peers(&b)), (1, 1));

    // kube-apiserver's CONNECT at a's door, by node address and by node
    // name: forwarded too.
    let client = tls::connect_client(&stage.pki.files("client").load().unwrap()).unwrap();
    for authority in [format!("{NODE_IP}:10255"), format!("{NODE}:10255")] {
        let code = stage.in_cloud(|| {
            let client = client.clone();
            async move {
                let (code, stream) = connect_at(client, A_CONNECT, &authority).await;
                let mut stream = stream.unwrap();
                stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
                let mut answer = String::new();
                stream.read_to_string(&mut answer).await.unwrap();
                assert!(answer.ends_with(&stand_in_body(10255, "/healthz")), "{answer}");
                code
            }
        });
        assert_eq!(code, 200);
    }
    assert_eq!((forwarded(&a), from_peers(&b)), (3, 3));
    assert_eq!(a.metrics.no_agent.load(Ordering::Relaxed) + b.metrics.no_agent.load(Ordering::Relaxed), 0);

    // A node no replica holds: a asks b, b (asked by a peer) asks nobody,
    // and a answers 503 at once. One hop, no loop.
    let started = Instant::now();
    let code = stage.in_cloud(|| connect_at(client.clone(), A_CONNECT, "10.250.0.99:10250")).0;
    assert_eq!(code, 503);
    assert!(started.elapsed() < Duration::from_secs(2), "503 took {:?}", started.elapsed());
    assert_eq!((a.metrics.no_agent.load(Ordering::Relaxed), b.metrics.no_agent.load(Ordering::Relaxed)), (1, 1));
    assert_eq!((forwarded(&a), forwarded(&b), from_peers(&a)), (3, 0, 0));

    // Who may ask as a peer: the replicas' own certificate only. A peer's
    // request is served from the replica's own links, never sent on.
    const KUBELET: &str = "10.250.0.2:10255";
    let peer_client = tls::connect_client(&certs).unwrap();
    assert_eq!(stage.in_cloud(|| connect_at(peer_client.clone(), CONNECT_PORT, KUBELET)).0, 200);
    assert_eq!(stage.in_cloud(|| connect_at(peer_client.clone(), A_CONNECT, KUBELET)).0, 503);
    assert_eq!(forwarded(&a), 3, "a sent a peer's request on");
    // A node's certificate never passes for a replica, nor does a client
    // certificate naming the server from another CA.
    let node_client = tls::connect_client(&stage.pki.files(NODE).load().unwrap()).unwrap();
    assert_eq!(stage.in_cloud(|| connect_at(node_client.clone(), A_CONNECT, KUBELET)).0, 403);
    let stranger = netd::tunnel::certs::CertificateAuthority::generate("another CA", DAY).unwrap();
    let forged = stranger.issue_client("tunnel-server", None, DAY).unwrap();
    let mut forged_certs = stage.pki.files("client").load().unwrap();
    forged_certs.chain = vec![forged.cert_der().clone()];
    forged_certs.key = forged.key_der();
    let forged_client = tls::connect_client(&forged_certs).unwrap();
    let refused = stage.in_cloud(|| async move {
        let tcp = TcpStream::connect((CLOUD_IP, A_CONNECT)).await.unwrap();
        let name = rustls_pki_types::ServerName::IpAddress(IpAddr::V4(CLOUD_IP).into());
        let mut tls = tokio_rustls::TlsConnector::from(forged_client).connect(name, tcp).await.unwrap();
        // TLS 1.3: the server's verdict on the client certificate arrives
        // with the first read.
        let _ = tls.write_all(format!("CONNECT {KUBELET} HTTP/1.1\r\n\r\n").as_bytes()).await;
        let mut buf = [0u8; 64];
        tls.read(&mut buf).await.map(|n| n == 0).unwrap_or(true)
    });
    assert!(refused, "a forged peer certificate got an answer");
    assert_eq!(forwarded(&a), 3);
}
