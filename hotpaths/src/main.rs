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
use netd_dataplane::vxlan::{Applied, Lease, PeerChange, Reconciler};
use netd_ebpf::dnat::{AttachOptions, TunnelDnat};
use netd_ipam::{PodRef, Range, RangeSet, Store};
use netd_testing::{synthetic_config, synthetic_node, synthetic_peer, Cgroup, NetNs, PinDir, PrivilegedGuard};
use netd_tunnel::routes::{LeaseRoute, RouteTable};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Every case: name and what it runs inside [`measured`].
const CASES: [(&str, &str); 7] = [
    ("ipam-allocate", "one CNI ADD's allocation: a new pod's address in a store of 100 pods (one durable transaction)"),
    ("ipam-release", "one CNI DEL's release of an attached pod in a store of 100 pods"),
    ("vxlan-noop-reconcile", "a full pass over 1 000 programmed peers that finds nothing to change (dumps + diff)"),
    ("vxlan-peer-event", "one peer added to 1 000 programmed ones, applied incrementally (4 kernel writes)"),
    ("dnat-edge-nodes", "the DNAT's desired edge-node set of 10 000 with one node replaced: diff + 2 map writes"),
    ("tunnel-route-lookup", "1 000 lookups (node address, pod address, unknown) in a table of 10 000 leases"),
    ("tunnel-splice", "1 MiB each way through `transport::splice` between two in-memory pipes"),
];

/// Peers programmed before the VXLAN cases.
const PEERS: u32 = 1_000;
/// Leases in the route table.
const LEASES: u32 = 10_000;

fn main() -> Result<()> {
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
