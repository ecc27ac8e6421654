//! `netd-hotpaths <case>`: one hot path of netd, run once, for Valgrind's
//! callgrind to count its instructions (`cargo xtask instructions`).
//!
//! Everything a case needs is built first; the path itself runs inside
//! [`measured`], the one function callgrind collects
//! (`--collect-atstart=no --toggle-collect=netd_hotpaths::measured*`), so
//! the count is the path's own work: no setup, no process start, no
//! allocator warm-up outside it. Instruction counts do not depend on the
//! machine's load, which is what makes them a CI guard where timings on a
//! shared machine are not.
//!
//! The VXLAN cases program the kernel: they run as root in a network
//! namespace of their own, made and removed by `netd-testing` as the
//! privileged tests' are.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use netd_dataplane::vxlan::{Applied, Lease, PeerChange, Reconciler};
use netd_ebpf::dnat::{AttachOptions, TunnelDnat};
use netd_ipam::{PodRef, Range, RangeSet, Store};
use netd_testing::{synthetic_config, synthetic_node, synthetic_peer, Cgroup, NetNs, PinDir, PrivilegedGuard};
use netd_tunnel::routes::{LeaseRoute, RouteTable};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

/// Every case: name and what it runs inside [`measured`].
const CASES: [(&str, &str); 11] = [
    ("ipam-allocate", "one CNI ADD's allocation: a new pod's address in a store of 100 pods (one durable transaction)"),
    ("ipam-release", "one CNI DEL's release of an attached pod in a store of 100 pods"),
    ("vxlan-noop-reconcile", "a full pass over 1 000 programmed peers that finds nothing to change (dumps + diff)"),
    ("vxlan-peer-event", "one peer added to 1 000 programmed ones, applied incrementally (4 kernel writes)"),
    ("dnat-edge-nodes", "the DNAT's desired edge-node set of 10 000 with one node replaced: diff + 2 map writes"),
    ("tunnel-route-lookup", "1 000 lookups (node address, pod address, unknown) in a table of 10 000 leases"),
    ("tunnel-splice", "1 MiB each way through `transport::splice` between two in-memory pipes"),
    (
        "tunnel-request",
        "100 request/response round trips (120 B up, 400 B down) through a linked server and agent: \
         splice_tunnel, HTTP/2 and TLS 1.3 on both sides",
    ),
    (
        "mux-request",
        "the same round trips through two `splice` relays joined by one stream of a `netd-mux/1` \
         link over TLS 1.3: the lighter link protocol (no pings or timer, as in tunnel-request)",
    ),
    (
        "relay-tls-request",
        "the same round trips through two `splice` relays joined by TLS 1.3 alone: one encrypted \
         connection per relayed one (rathole's shape), netd's TLS settings, no multiplexing",
    ),
    (
        "relay-plain-request",
        "the same round trips through two `splice` relays joined by a plain pipe: the floor of any relay",
    ),
];

/// Peers programmed before the VXLAN cases.
const PEERS: u32 = 1_000;
/// Leases in the route table.
const LEASES: u32 = 10_000;

fn main() -> Result<()> {
    // As netd's processes log (`init_logging` at its default level): with
    // no subscriber at all, `tracing` would hand every span of h2's to the
    // `log` crate instead, a cost no netd process pays.
    tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["list"] => {
            for (name, what) in CASES {
                println!("{name}\t{what}");
            }
            Ok(())
        }
        [name] => run(name),
        _ => bail!("usage: netd-hotpaths <list | case> (cases: {})", names().join(", ")),
    }
}

fn names() -> Vec<&'static str> {
    CASES.iter().map(|(name, _)| *name).collect()
}

fn run(name: &str) -> Result<()> {
    match name {
        "ipam-allocate" => ipam_allocate(),
        "ipam-release" => ipam_release(),
        "vxlan-noop-reconcile" => vxlan_noop_reconcile(),
        "vxlan-peer-event" => vxlan_peer_event(),
        "dnat-edge-nodes" => dnat_edge_nodes(),
        "tunnel-route-lookup" => tunnel_route_lookup(),
        "tunnel-splice" => tunnel_splice(),
        "tunnel-request" => tunnel_request(),
        "mux-request" => mux_request(),
        "relay-tls-request" => relay_request(true),
        "relay-plain-request" => relay_request(false),
        other => bail!("unknown case `{other}` (known: {})", names().join(", ")),
    }
}

/// The one function callgrind counts: runs `path` and keeps its result
/// from being optimised away.
#[inline(never)]
fn measured<R>(path: impl FnOnce() -> R) -> R {
    black_box(path())
}

fn pool() -> Result<Vec<RangeSet>> {
    Ok(vec![RangeSet::single(Range::new("10.128.0.0/16".parse()?, None, None, None)?)])
}

/// A store holding 100 attached pods, like a busy node.
fn populated(dir: &std::path::Path) -> Result<Store> {
    let mut store = Store::open(dir.join("hotpaths.db"))?;
    let sets = pool()?;
    for i in 0..100 {
        let pod: PodRef = format!("default/resident-{i}").parse()?;
        store.allocate(&sets, &pod, &format!("resident-{i}"), "eth0")?;
    }
    Ok(store)
}

fn ipam_allocate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut store = populated(dir.path())?;
    let sets = pool()?;
    let pod: PodRef = "default/new-pod".parse()?;
    let allocated = measured(|| store.allocate(&sets, &pod, "new-container", "eth0"))?;
    ensure!(allocated.len() == 1, "expected one address, got {allocated:?}");
    Ok(())
}

fn ipam_release() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut store = populated(dir.path())?;
    let released = measured(|| store.release("resident-50", "eth0"))?;
    ensure!(released.len() == 1, "expected one address released, got {released:?}");
    Ok(())
}

/// A synthetic node (the criterion and lab benches' layout: a fresh
/// namespace whose `eth0` holds the node's address), entered on this
/// thread, and a reconciler with [`PEERS`] peers programmed in it.
fn programmed_node() -> Result<(PrivilegedGuard, NetNs, Reconciler, Vec<Lease>)> {
    let Some(kernel) = netd_testing::privileged()? else {
        bail!("the VXLAN cases program the kernel in a namespace of their own: run them as root")
    };
    let node = synthetic_node()?;
    let peers: Vec<Lease> = (1..=PEERS).map(synthetic_peer).collect();
    let reconciler = {
        let _inside = node.enter()?;
        let mut reconciler = Reconciler::new(synthetic_config())?;
        let report = reconciler.reconcile(&peers)?;
        ensure!(report.failures.is_empty(), "programming {PEERS} peers failed: {:?}", report.failures);
        reconciler
    };
    Ok((kernel, node, reconciler, peers))
}

fn vxlan_noop_reconcile() -> Result<()> {
    let (_kernel, node, mut reconciler, peers) = programmed_node()?;
    let _inside = node.enter()?;
    let report = measured(|| reconciler.reconcile(&peers))?;
    ensure!(report.writes == 0, "a no-op pass wrote {} changes", report.writes);
    Ok(())
}

fn vxlan_peer_event() -> Result<()> {
    let (_kernel, node, mut reconciler, _) = programmed_node()?;
    let _inside = node.enter()?;
    let change = [PeerChange::Upsert { lease: synthetic_peer(PEERS + 1), autonomous: false }];
    match measured(|| reconciler.apply(&change))? {
        Applied::Done(report) => ensure!(report.writes == 4, "one new peer took {} writes, not 4", report.writes),
        Applied::NeedsFullPass(why) => bail!("one new peer needed a full pass: {why}"),
    }
    Ok(())
}

/// Edge node `i` of the DNAT case: 10.99.0.0/16 upwards.
fn edge_node(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 99, 0, 1)) + i)
}

fn dnat_edge_nodes() -> Result<()> {
    let Some(_kernel) = netd_testing::privileged()? else { bail!("the DNAT case loads BPF programs: run it as root") };
    // Attached to a cgroup no process is in: the maps are real, nothing is redirected.
    let cgroup = Cgroup::new()?;
    let pins = PinDir::new()?;
    let (mut dnat, _) = TunnelDnat::load_or_attach(&AttachOptions {
        pin_dir: pins.path().to_path_buf(),
        cgroup: Some(cgroup.path().to_path_buf()),
        original_dst_cgroup: None,
    })?;
    dnat.set_edge_nodes((0..LEASES).map(edge_node))?;
    // A node left and another joined: what a full resync hands over.
    let wanted: Vec<Ipv4Addr> = (1..=LEASES).map(edge_node).collect();
    let changes = measured(|| dnat.set_edge_nodes(wanted.iter().copied()))?;
    ensure!((changes.added, changes.removed) == (1, 1), "expected one node added and one removed, got {changes:?}");
    Ok(())
}

fn tunnel_route_lookup() -> Result<()> {
    let mut table = RouteTable::default();
    for i in 0..LEASES {
        let lease = synthetic_peer(i + 1);
        table.upsert_lease(LeaseRoute {
            node: format!("edge-{i}"),
            address: lease.public_ip,
            subnet: lease.subnet,
            cloud: false,
        });
    }
    // Node addresses, pod addresses inside leases' subnets, and addresses
    // nobody holds, spread over the table.
    let targets: Vec<IpAddr> = (0..1_000u32)
        .map(|k| {
            let lease = synthetic_peer(k * 7 % LEASES + 1);
            let ip = match k % 3 {
                0 => lease.public_ip,
                1 => Ipv4Addr::from(u32::from(lease.subnet.network()) + 17),
                _ => Ipv4Addr::new(192, 0, 2, k as u8),
            };
            IpAddr::V4(ip)
        })
        .collect();
    let found = measured(|| targets.iter().filter(|ip| table.node_of(**ip).is_some()).count());
    let expected = targets.iter().filter(|ip| !matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 192)).count();
    ensure!(found == expected, "{found} of {} lookups found a node, expected {expected}", targets.len());
    Ok(())
}

async fn send(mut writer: impl AsyncWrite + Unpin, bytes: usize) -> std::io::Result<()> {
    let chunk = [0x5a_u8; 16 * 1024];
    for _ in 0..bytes / chunk.len() {
        writer.write_all(&chunk).await?;
    }
    writer.shutdown().await
}

async fn drain(mut reader: impl AsyncRead + Unpin) -> std::io::Result<usize> {
    let mut buffer = [0_u8; 16 * 1024];
    let mut total = 0;
    loop {
        match reader.read(&mut buffer).await? {
            0 => return Ok(total),
            n => total += n,
        }
    }
}

fn tunnel_splice() -> Result<()> {
    const BYTES: usize = 1 << 20;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    // client <-> a | splice | b <-> server; 64 KiB pipes, as sockets' buffers.
    let (client, mut a) = tokio::io::duplex(64 * 1024);
    let (mut b, server) = tokio::io::duplex(64 * 1024);
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    let (spliced, sent_up, sent_down, got_down, got_up) = measured(|| {
        runtime.block_on(async {
            tokio::join!(
                netd_tunnel::transport::splice(&mut a, &mut b),
                send(client_write, BYTES),
                send(server_write, BYTES),
                drain(client_read),
                drain(server_read),
            )
        })
    });
    spliced.context("splice")?;
    sent_up.context("client's send")?;
    sent_down.context("server's send")?;
    let (got_down, got_up) = (got_down?, got_up?);
    ensure!(got_up == BYTES && got_down == BYTES, "moved {got_up} up and {got_down} down, expected {BYTES} each");
    Ok(())
}

/// Round trips in the request cases.
const ROUND_TRIPS: usize = 100;
/// A small HTTP request and its answer, as `wrk` and its server exchange.
const REQUEST_BYTES: usize = 120;
const RESPONSE_BYTES: usize = 400;

/// The certificates' directory, the agent's end and the server's end.
type TlsPair =
    (tempfile::TempDir, tokio_rustls::client::TlsStream<DuplexStream>, tokio_rustls::server::TlsStream<DuplexStream>);

/// The two ends of one TLS 1.3 connection with the settings and
/// certificates of `netd tunnel-agent` (client) and `netd-cloud
/// tunnel-server` (server), over an in-memory pipe instead of TCP, with
/// the directory holding their certificates (removed when dropped).
async fn tls_pair() -> Result<TlsPair> {
    use netd_tunnel::certs::{CertFiles, CertificateAuthority};
    use netd_tunnel::tls;

    let dir = tempfile::tempdir()?;
    let day = std::time::Duration::from_secs(86_400);
    let ca = CertificateAuthority::generate("hotpaths CA", day)?;
    ca.write_cert(dir.path())?;
    let server_ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    ca.issue_server("tunnel-server", &[], &[server_ip], day)?.write(dir.path(), "server")?;
    ca.issue_node("edge-1", &[], day)?.write(dir.path(), "node")?;
    let server_tls = tls::server(&CertFiles::in_dir(dir.path(), "server").load()?, tls::ALPN_TUNNEL)?;
    let agent_tls = tls::agent(&CertFiles::in_dir(dir.path(), "node").load()?)?;
    // 256 KiB: a loopback TCP connection's buffers.
    let (agent_io, server_io) = tokio::io::duplex(256 << 10);
    let (agent, server) = tokio::try_join!(
        tokio_rustls::TlsConnector::from(agent_tls).connect(server_ip.into(), agent_io),
        tokio_rustls::TlsAcceptor::from(server_tls).accept(server_io),
    )?;
    Ok((dir, agent, server))
}

/// The measured part of the request cases: [`ROUND_TRIPS`] small
/// request/response exchanges between `client` and `service`, one at a
/// time, the per-request path `cargo xtask bench tunnel` times at one
/// connection; then both ends close and every relay task must end cleanly.
fn round_trips(
    runtime: &tokio::runtime::Runtime,
    mut client: DuplexStream,
    mut service: DuplexStream,
    relays: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
) -> Result<()> {
    let exchanged: std::io::Result<usize> = measured(|| {
        runtime.block_on(async {
            let (mut request, mut response) = ([0x47_u8; REQUEST_BYTES], [0x48_u8; RESPONSE_BYTES]);
            for _ in 0..ROUND_TRIPS {
                client.write_all(&request).await?;
                service.read_exact(&mut request).await?;
                service.write_all(&response).await?;
                client.read_exact(&mut response).await?;
            }
            Ok(ROUND_TRIPS)
        })
    });
    ensure!(exchanged? == ROUND_TRIPS, "not every round trip completed");
    runtime.block_on(async {
        client.shutdown().await?;
        service.shutdown().await?;
        for relay in relays {
            relay.await?.context("a relay")?;
        }
        anyhow::Ok(())
    })
}

/// Local ends of a relay: 64 KiB pipes, as sockets' buffers. The first of
/// each pair is the outside party (client, service), the second the
/// relay's end.
fn local_pipe() -> (DuplexStream, DuplexStream) {
    tokio::io::duplex(64 << 10)
}

/// One stream through a real link, spliced on both sides as the server's
/// doors and the agent's dials are (`splice_tunnel`), over HTTP/2 with the
/// roles reversed and the link's TLS.
fn tunnel_request() -> Result<()> {
    use netd_tunnel::transport::{self, splice_tunnel, TunnelStream};

    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let (_certs, client, service, relays) = runtime.block_on(async {
        let (certs, agent_tls, server_tls) = tls_pair().await?;
        // The agent dialled (TLS client) and serves HTTP/2; the server
        // accepted (TLS server) and opens streams as the HTTP/2 client.
        let (agent, server) = tokio::try_join!(
            transport::agent_builder().handshake::<_, Bytes>(agent_tls),
            transport::server_builder().handshake::<_, Bytes>(server_tls),
        )?;
        let (mut link, connection) = server;
        let mut agent = agent;
        tokio::spawn(async move {
            // An error ends the link; the round trips then fail and say so.
            let _ = connection.await;
        });
        let request = http::Request::builder().method("CONNECT").uri("10.0.0.1:80").body(())?;
        let (response, send_up) = link.send_request(request, false)?;
        let (accepted, mut respond) = agent.accept().await.context("the agent saw no stream")??;
        let send_down = respond.send_response(http::Response::new(()), false)?;
        // The agent's connection stays polled while the stream lives.
        tokio::spawn(async move { while let Some(Ok(_)) = agent.accept().await {} });
        let response = response.await?;
        ensure!(response.status() == 200, "the agent answered {}", response.status());
        let ((client, mut front), (service, mut local)) = (local_pipe(), local_pipe());
        let mut up = TunnelStream::new(send_up, response.into_body());
        let mut down = TunnelStream::new(send_down, accepted.into_body());
        let relays = vec![
            tokio::spawn(async move { splice_tunnel(&mut front, &mut up).await }),
            tokio::spawn(async move { splice_tunnel(&mut local, &mut down).await }),
        ];
        anyhow::Ok((certs, client, service, relays))
    })?;
    round_trips(&runtime, client, service, relays)
}

/// One stream of a `netd-mux/1` link over the tunnel's TLS, spliced on
/// both sides by the generic `splice`, as the TLS relay is: the two cases
/// differ by the multiplexer alone.
fn mux_request() -> Result<()> {
    use netd_tunnel::mux::{self, Role};
    use netd_tunnel::transport::splice;

    // No pings, so no timer: tunnel-request's runtime has none either (a
    // pending timer costs each park of the runtime about 1 k instructions).
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let config = mux::Config { ping_interval: None, ..mux::Config::default() };
    let ((client, mut front), (service, mut local)) = (local_pipe(), local_pipe());
    let (_certs, relays) = runtime.block_on(async {
        let (certs, agent_tls, server_tls) = tls_pair().await?;
        let (server, server_driver) = mux::link(server_tls, Role::Opener, config.clone());
        let (agent, agent_driver) = mux::link(agent_tls, Role::Acceptor, config);
        // An error ends the link; the round trips then fail and say so.
        tokio::spawn(async move { drop(server_driver.await) });
        tokio::spawn(async move { drop(agent_driver.await) });
        // The agent answers the OPEN as it arrives; the open waits for that answer.
        let (up, down) =
            tokio::join!(server.open("10.0.0.1:80"), async { agent.accept().await.map(mux::Incoming::accept) });
        let (mut up, mut down) = (up?, down.context("the agent saw no stream")?);
        let relays = vec![
            tokio::spawn(async move { splice(&mut front, &mut up).await }),
            tokio::spawn(async move { splice(&mut down, &mut local).await }),
        ];
        anyhow::Ok((certs, relays))
    })?;
    round_trips(&runtime, client, service, relays)
}

/// Two `splice` relays, as rathole's client and server are: joined by one
/// TLS connection of their own per relayed connection (`tls`), or by a
/// plain pipe.
fn relay_request(tls: bool) -> Result<()> {
    use netd_tunnel::transport::splice;

    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let ((client, mut front), (service, mut local)) = (local_pipe(), local_pipe());
    let (_certs, relays) = runtime.block_on(async {
        if tls {
            let (certs, mut agent_tls, mut server_tls) = tls_pair().await?;
            let relays = vec![
                tokio::spawn(async move { splice(&mut front, &mut server_tls).await }),
                tokio::spawn(async move { splice(&mut agent_tls, &mut local).await }),
            ];
            anyhow::Ok((Some(certs), relays))
        } else {
            let (mut server_end, mut agent_end) = tokio::io::duplex(256 << 10);
            let relays = vec![
                tokio::spawn(async move { splice(&mut front, &mut server_end).await }),
                tokio::spawn(async move { splice(&mut agent_end, &mut local).await }),
            ];
            Ok((None, relays))
        }
    })?;
    round_trips(&runtime, client, service, relays)
}
