//! `cargo xtask bench dnat`: the tunnel DNAT (`netd::ebpf::dnat`) against
//! nftables DNAT in the shape comparable edge tunnels write, and against no
//! redirection at all.
//!
//! Three "cloud node" namespaces built alike (veth to an underlay namespace,
//! default route through it, node IP 10.80.0.1 on eth0, listeners on the node
//! IP): **ours** with `TunnelDnat` attached to a bench cgroup, **anchor**
//! with an nftables nat ruleset, **floor** with nothing. The client is one
//! thread doing connect → (the server's thread accepts and closes) → read
//! EOF → close with `SO_LINGER 0` (RST: no TIME_WAIT on either side, so
//! ephemeral ports never run out), a fixed number of connections per round;
//! the variants alternate within every round, in rotating order, so a slow
//! patch of this shared machine hits all of them alike. Each acceptor counts
//! what it accepted, and every round checks that all its connections landed
//! on the listener they should have.
//!
//! Everything is made before the first timed round and torn down after the
//! last (namespace teardown is asynchronous and holds RTNL).

use std::fmt::Write as _;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netd::ebpf::dnat::{AttachOptions, Scope, TunnelDnat};
use netd::testing::{self, Cgroup, NetNs, PinDir, VethPair};

use crate::bench::{machine, percentile, set_option, Listener, Scale};
use crate::bench_vxlan::Settle;

/// The cloud node's own address (the tunnel server listens here).
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 1);
/// The underlay end of the veth, the default gateway.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 2);
/// Cloud nodes: the RETURN rules of the nft chain (the first is this node).
const CLOUD_NODES: [Ipv4Addr; 3] = [NODE_IP, Ipv4Addr::new(10, 80, 0, 3), Ipv4Addr::new(10, 80, 0, 4)];
const KUBELET_PORT: u16 = 10250;
const TLS_PORT: u16 = 10263;
const HTTP_PORT: u16 = 10264;
/// What SPEC §3 redirects by default: kubelet TLS and read-only ports.
const RULES: [(u16, u16); 2] = [(KUBELET_PORT, TLS_PORT), (10255, HTTP_PORT)];
/// A port no rule names, for the unrelated connects.
const OTHER_PORT: u16 = 8000;
const SIZES: [u32; 3] = [10, 1_000, 10_000];
/// Edge-node counts of a smoke run.
const SMOKE_SIZES: [u32; 2] = [10, 100];
const NFT_TABLE: &str = "netd_bench";
const NFT_CHAIN: &str = "edge_tunnel";

/// The i-th edge node (0-based): 10.99.0.1 upwards. None of them exists:
/// a redirected connect never leaves the node.
fn edge(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 99, 0, 1)) + i)
}

/// Nodes that join during the node-set-change trials: 10.98.0.1 upwards.
fn joining_edge(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 98, 0, 1)) + i)
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// A cloud node namespace and the underlay its default route points into.
struct Node {
    // Field order is drop order: the veth before its namespaces.
    _veth: VethPair,
    ns: NetNs,
    _underlay: NetNs,
}

impl Node {
    fn new() -> Result<Self> {
        let ns = NetNs::new()?;
        let underlay = NetNs::new()?;
        let veth = VethPair::new((Some(&ns), "eth0"), (Some(&underlay), "eth0"))?;
        ns.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
        underlay.ip(&["addr", "add", &format!("{GATEWAY}/24"), "dev", "eth0"])?;
        // Edge addresses need a route for connect() to start at all (nft
        // rewrites only after the first routing decision).
        ns.ip(&["route", "add", "default", "via", &GATEWAY.to_string()])?;
        Ok(Self { _veth: veth, ns, _underlay: underlay })
    }
}

/// A listener bound in `ns` from inside `cgroup` (accepted sockets belong
/// to their listener's cgroup, which decides whether sockops sees them);
/// each accepted connection is dropped at once: the close is part of the
/// cycle measured.
fn acceptor(ns: &NetNs, cgroup: &Cgroup, addr: SocketAddr) -> Result<Listener> {
    let _in_cgroup = cgroup.join()?;
    Listener::start(ns, addr, drop)
}

/// One connection as the benchmark client makes it: connect, wait for the
/// server's close (so the accept is inside the cycle), close with an RST.
fn cycle(addr: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    set_option(&stream, libc::SOL_SOCKET, libc::SO_LINGER, &linger).context("SO_LINGER")?;
    let mut byte = [0u8; 1];
    let n = stream.read(&mut byte).with_context(|| format!("waiting for the server's close ({addr})"))?;
    ensure!(n == 0, "{addr} sent data; expected only the server's close");
    Ok(())
}

/// The first connect of a phase: with a timeout, so a redirection that does
/// not work fails the run instead of hanging in SYN retries.
fn probe(ns: &NetNs, cgroup: &Cgroup, addr: SocketAddr, lands_on: &Listener) -> Result<()> {
    let before = lands_on.count();
    let _in_cgroup = cgroup.join()?;
    ns.run(|| -> Result<()> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("probe connect to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        ensure!(stream.read(&mut [0u8; 1])? == 0, "probe to {addr}: data instead of a close");
        Ok(())
    })??;
    wait_accepted(lands_on, before + 1, addr)
}

/// The acceptor thread counts after accept() returns, a moment after the
/// client saw the close: wait for it briefly.
fn wait_accepted(acceptor: &Listener, want: u64, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while acceptor.count() < want {
        ensure!(Instant::now() < deadline, "connects to {addr} did not all land where expected");
        std::thread::yield_now();
    }
    ensure!(acceptor.count() == want, "{} more accepts than connects to {addr}", acceptor.count() - want);
    Ok(())
}

/// CPU time (user + system) this process has used, all threads: the client,
/// the acceptors, and the loopback softirq work done on their behalf.
fn process_cpu() -> Duration {
    // SAFETY: rusage is plain integers; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into `usage`, which outlives the call.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// `count` cycles from a socket made in `cgroup`, on one thread inside `ns`;
/// returns connections per second and CPU time per connection.
fn round(
    ns: &NetNs,
    cgroup: &Cgroup,
    count: usize,
    target: &(dyn Fn(usize) -> SocketAddr + Sync),
) -> Result<(f64, Duration)> {
    let _in_cgroup = cgroup.join()?;
    let (took, cpu) = ns.run(|| -> Result<(Duration, Duration)> {
        let (started, cpu) = (Instant::now(), process_cpu());
        for i in 0..count {
            cycle(target(i))?;
        }
        Ok((started.elapsed(), process_cpu().saturating_sub(cpu)))
    })??;
    Ok((count as f64 / took.as_secs_f64(), cpu / count as u32))
}

/// Where connection *i* of a round goes.
type Target<'a> = Box<dyn Fn(usize) -> SocketAddr + Sync + 'a>;

/// One way of reaching the tunnel listener (or an unrelated one).
struct Way<'a> {
    node: &'a Node,
    client: &'a Cgroup,
    lands_on: &'a Listener,
    target: Target<'a>,
    rates: Vec<f64>,
    /// CPU time per connection, per round: the shared machine's other load
    /// moves it far less than the rate.
    cpu: Vec<Duration>,
}

impl Way<'_> {
    fn run_round(&mut self, count: usize, timed: bool) -> Result<()> {
        let before = self.lands_on.count();
        let (rate, cpu) = round(&self.node.ns, self.client, count, &*self.target)?;
        wait_accepted(self.lands_on, before + count as u64, (self.target)(0))?;
        if timed {
            self.rates.push(rate);
            self.cpu.push(cpu);
        }
        Ok(())
    }

    fn probe(&self) -> Result<()> {
        probe(&self.node.ns, self.client, (self.target)(0), self.lands_on)
    }

    /// Median, min, max connections/s.
    fn spread(&self) -> (f64, f64, f64) {
        let mut rates = self.rates.clone();
        rates.sort_by(f64::total_cmp);
        (median(&rates), rates.first().copied().unwrap_or(0.0), rates.last().copied().unwrap_or(0.0))
    }

    fn cell(&self) -> String {
        let (median, min, max) = self.spread();
        format!("{} ({}–{})", thousands(median), thousands(min), thousands(max))
    }

    /// This way's rate over `other`'s, round by round (they ran moments
    /// apart, so a slow patch of the machine mostly cancels): median, min, max.
    fn paired(&self, other: &Way<'_>) -> String {
        let mut ratios: Vec<f64> = self.rates.iter().zip(&other.rates).map(|(a, b)| a / b.max(f64::EPSILON)).collect();
        ratios.sort_by(f64::total_cmp);
        match (ratios.first(), ratios.last()) {
            (Some(min), Some(max)) => format!("{:.3}× ({min:.2}–{max:.2})", median(&ratios)),
            _ => "-".into(),
        }
    }

    /// [`Way::spread`] for the chart.
    fn stat(&self) -> crate::plot::Stat {
        let (median, min, max) = self.spread();
        crate::plot::Stat { median, min, max }
    }

    /// Median CPU µs per connection.
    fn cpu_us(&self) -> f64 {
        let mut cpu = self.cpu.clone();
        cpu.sort();
        percentile(&cpu, 0.5).as_secs_f64() * 1e6
    }
}

fn median(sorted: &[f64]) -> f64 {
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// Runs every way `rounds` times (after one untimed warm-up round each),
/// rotating who goes first in each round.
fn interleave(ways: &mut [Way<'_>], rounds: usize, count: usize) -> Result<()> {
    for way in ways.iter() {
        way.probe()?;
    }
    for way in ways.iter_mut() {
        way.run_round(count, false)?;
    }
    for r in 0..rounds {
        for k in 0..ways.len() {
            let at = (r + k) % ways.len();
            ways[at].run_round(count, true)?;
        }
    }
    Ok(())
}

fn thousands(rate: f64) -> String {
    let n = rate.round() as u64;
    if n >= 1_000 {
        format!("{} {:03}", n / 1_000, n % 1_000)
    } else {
        n.to_string()
    }
}

fn us(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn spread_ms(sorted: &[Duration]) -> String {
    match (sorted.first(), sorted.last()) {
        (Some(min), Some(max)) => format!("{} ({}–{})", us(percentile(sorted, 0.5)), us(*min), us(*max)),
        _ => "-".into(),
    }
}

/// The nft ruleset for `n` edge nodes, in the shape of the comparable
/// systems' iptables managers: nat OUTPUT sends TCP to one chain; there, one
/// RETURN per cloud node, then one DNAT per edge node per port, a linear list.
fn nft_ruleset(n: u32) -> Result<String> {
    let mut text = String::new();
    // Declaring then deleting makes the file replace the table atomically whether or not it exists.
    writeln!(text, "table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\ntable ip {NFT_TABLE} {{")?;
    writeln!(
        text,
        "  chain output {{ type nat hook output priority -100; policy accept; meta l4proto tcp jump {NFT_CHAIN}; }}"
    )?;
    writeln!(text, "  chain {NFT_CHAIN} {{")?;
    for cloud in CLOUD_NODES {
        writeln!(text, "    ip daddr {cloud} return")?;
    }
    for i in 0..n {
        let node = edge(i);
        for (port, tunnel) in RULES {
            writeln!(text, "    ip daddr {node} tcp dport {port} dnat to {NODE_IP}:{tunnel}")?;
        }
    }
    writeln!(text, "  }}\n}}")?;
    Ok(text)
}

/// `nft -f` the ruleset for `n` nodes inside `ns`; returns how long it took.
fn load_nft(ns: &NetNs, dir: &Path, n: u32) -> Result<Duration> {
    let file = dir.join(format!("nft-{n}"));
    std::fs::write(&file, nft_ruleset(n)?)?;
    let started = Instant::now();
    ns.exec("nft", &["-f", &file.to_string_lossy()])?;
    Ok(started.elapsed())
}

/// Number of entries the conntrack table of `ns` holds.
fn conntrack_count(ns: &NetNs) -> Result<u64> {
    let text = ns.run(|| std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count"))??;
    Ok(text.trim().parse()?)
}

/// What the node-set-change trials measured at one size.
struct Change {
    /// `add_edge_nodes` of one node.
    call: Vec<Duration>,
    /// From the call's start to the new node's connect accepted on the tunnel port.
    landed: Vec<Duration>,
    /// nft anchor: one `nft add rule` process, then the connect accepted.
    nft_landed: Vec<Duration>,
}

/// Adds one new node per trial, times until a connect to it lands on the
/// tunnel listener, then takes it out again (untimed).
fn node_set_changes(stage: &Stage<'_>, dnat: &mut TunnelDnat, trials: u32, nft_trials: u32) -> Result<Change> {
    let mut change = Change { call: Vec::new(), landed: Vec::new(), nft_landed: Vec::new() };
    let before = stage.ours_tunnel.count();
    {
        // One thread in the namespace for all trials: no thread start inside a timing.
        let _in_client = stage.ours_client.join()?;
        stage.ours.ns.run(|| -> Result<()> {
            for t in 0..trials {
                let joining = joining_edge(t);
                let started = Instant::now();
                let written = dnat.add_edge_nodes([joining])?;
                let call = started.elapsed();
                cycle(v4(joining, KUBELET_PORT))?;
                let landed = started.elapsed();
                ensure!((written.added, written.removed) == (1, 0), "adding one node wrote {written:?}");
                change.call.push(call);
                change.landed.push(landed);
                dnat.remove_edge_nodes([joining])?;
            }
            Ok(())
        })??;
    }
    wait_accepted(stage.ours_tunnel, before + u64::from(trials), v4(joining_edge(0), KUBELET_PORT))?;

    let before = stage.anchor_tunnel.count();
    {
        let _in_client = stage.plain.join()?;
        stage.anchor.ns.run(|| -> Result<()> {
            for t in 0..nft_trials {
                let joining = joining_edge(t);
                let started = Instant::now();
                // A child forked from this thread starts in its namespace.
                let out = Command::new("nft")
                    .args(["--echo", "--handle", "add", "rule", "ip", NFT_TABLE, NFT_CHAIN, "ip", "daddr"])
                    .arg(joining.to_string())
                    .args(["tcp", "dport", &KUBELET_PORT.to_string(), "dnat", "to"])
                    .arg(format!("{NODE_IP}:{TLS_PORT}"))
                    .output()
                    .context("running nft add rule")?;
                ensure!(out.status.success(), "nft add rule: {}", String::from_utf8_lossy(&out.stderr));
                cycle(v4(joining, KUBELET_PORT))?;
                change.nft_landed.push(started.elapsed());
                let echoed = String::from_utf8_lossy(&out.stdout);
                let handle = echoed
                    .split("# handle ")
                    .nth(1)
                    .map(str::trim)
                    .with_context(|| format!("no handle in nft's echo: {echoed}"))?;
                let out = Command::new("nft")
                    .args(["delete", "rule", "ip", NFT_TABLE, NFT_CHAIN, "handle", handle])
                    .output()
                    .context("running nft delete rule")?;
                ensure!(out.status.success(), "nft delete rule: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        })??;
    }
    wait_accepted(stage.anchor_tunnel, before + u64::from(nft_trials), v4(joining_edge(0), KUBELET_PORT))?;
    for samples in [&mut change.call, &mut change.landed, &mut change.nft_landed] {
        samples.sort();
    }
    Ok(change)
}

/// The nodes, cgroups and listeners every phase uses.
struct Stage<'a> {
    ours: &'a Node,
    anchor: &'a Node,
    /// Under the attached cgroup: the client's sockets are redirected.
    ours_client: &'a Cgroup,
    /// No programs anywhere: the anchor's and the floor's clients and listeners.
    plain: &'a Cgroup,
    ours_tunnel: &'a Listener,
    anchor_tunnel: &'a Listener,
}

/// The chart of the redirection table: connect rate per way against the
/// number of edge nodes.
fn dnat_chart(rates: [Vec<(f64, crate::plot::Stat)>; 3], rounds: usize, per_round: usize) -> Result<()> {
    use crate::plot::{Chart, Kind, Series};
    let [ours, anchor, floor] = rates;
    let chart = Chart {
        title: format!(
            "DNAT: connect → accept → close, redirected to :{TLS_PORT} (median of {rounds} rounds × {per_round}, whiskers min–max)"
        ),
        x_label: "edge nodes (log scale)".into(),
        y_label: "connections/s, one client thread".into(),
        kind: Kind::Lines { log_x: true, log_y: false },
        series: vec![
            Series { name: "ours: eBPF TunnelDnat".into(), points: ours },
            Series { name: "anchor: nftables DNAT, per-node rules".into(), points: anchor },
            Series { name: format!("floor: direct to :{TLS_PORT}"), points: floor },
        ],
        footnote: crate::plot::footnote(),
    };
    crate::plot::write(&crate::plot::file("dnat", "edge-nodes"), &chart)
}

/// Runs the DNAT benchmark and prints the book's tables.
/// Each program's run count and run time so far (the kernel's counters,
/// kept while stats are enabled), by program name.
fn program_counters(dnat: &TunnelDnat) -> Result<Vec<(&'static str, u64, Duration)>> {
    // One walk over the kernel's programs (one that unloads meanwhile is
    // skipped: none of ours can while its link is pinned).
    let loaded: std::collections::HashMap<u32, aya::programs::ProgramInfo> =
        aya::programs::loaded_programs().filter_map(Result::ok).map(|p| (p.id(), p)).collect();
    dnat.links()?
        .into_iter()
        .map(|link| {
            let info = loaded
                .get(&link.info.prog_id)
                .with_context(|| format!("program {} (id {}) is not loaded", link.program, link.info.prog_id))?;
            Ok((link.program, info.run_count(), info.run_time()))
        })
        .collect()
}

/// Where the programs' time goes, per connection: `count` untimed cycles
/// of `way` with the kernel's run-time accounting on (`BPF_ENABLE_STATS`,
/// what `sysctl kernel.bpf_stats_enabled=1` does, held only while the fd
/// lives; each run then also pays two clock reads, ~30 ns here). By program:
/// runs per connection and ns per connection.
fn program_time(dnat: &TunnelDnat, way: &mut Way<'_>, count: usize) -> Result<Vec<(&'static str, f64, f64)>> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let before = program_counters(dnat)?;
    way.run_round(count, false)?;
    let after = program_counters(dnat)?;
    Ok(before
        .iter()
        .zip(&after)
        .map(|((name, runs0, time0), (_, runs1, time1))| {
            let runs = runs1.saturating_sub(*runs0) as f64 / count as f64;
            let ns = time1.saturating_sub(*time0).as_nanos() as f64 / count as f64;
            (*name, runs, ns)
        })
        .collect())
}

pub fn run(rounds: usize, per_round: usize) -> Result<()> {
    let Some(_kernel) = testing::privileged()? else { bail!("the DNAT benchmark needs root") };
    let dir = tempfile::tempdir()?;
    println!("machine: {}", machine());

    // Everything first (see the module docs).
    let (ours, anchor, floor) = (Node::new()?, Node::new()?, Node::new()?);
    let attached = Cgroup::new()?;
    let ours_server = attached.child("server")?;
    let ours_client = attached.child("client")?;
    let plain = Cgroup::new()?;
    let pins = PinDir::new()?;
    let (mut dnat, _) = TunnelDnat::load_or_attach(&AttachOptions {
        pin_dir: pins.path().to_path_buf(),
        cgroup: Some(attached.path().to_path_buf()),
        original_dst_cgroup: Some(ours_server.path().to_path_buf()),
    })?;
    ours.ns.run(|| dnat.set_target(NODE_IP, Scope::HostNetwork))??;
    dnat.set_port_rules(RULES)?;
    let listen = |node: &Node, cgroup: &Cgroup, port: u16| acceptor(&node.ns, cgroup, v4(NODE_IP, port));
    let ours_tunnel = listen(&ours, &ours_server, TLS_PORT)?;
    let anchor_tunnel = listen(&anchor, &plain, TLS_PORT)?;
    let floor_tunnel = listen(&floor, &plain, TLS_PORT)?;
    // Unrelated destinations: a port no rule names, and a rule's port on a
    // cloud node (this node's own kubelet), which is not an edge node.
    let mut unrelated = Vec::new();
    for port in [OTHER_PORT, KUBELET_PORT] {
        unrelated.push((
            port,
            listen(&ours, &ours_server, port)?,
            listen(&anchor, &plain, port)?,
            listen(&floor, &plain, port)?,
        ));
    }
    let stage = Stage {
        ours: &ours,
        anchor: &anchor,
        ours_client: &ours_client,
        plain: &plain,
        ours_tunnel: &ours_tunnel,
        anchor_tunnel: &anchor_tunnel,
    };
    let mut settle = Settle::new()?;

    println!(
        "\nconnect → accept → close to edge-IP:{KUBELET_PORT}, redirected to {NODE_IP}:{TLS_PORT}; connections/s, \
         median (min–max) of {rounds} rounds × {per_round} connections, one client thread, variants alternating:\n"
    );
    println!(
        "| edge nodes | ours: eBPF TunnelDnat | anchor: nftables DNAT, per-node rules | floor: direct to :{TLS_PORT} | ours ÷ floor | anchor ÷ floor | ours ÷ anchor | CPU µs/conn ours / anchor / floor | floor ÷ ours CPU |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut notes = Vec::new();
    let mut changes = Vec::new();
    let sizes = Scale::sized(&SIZES[..], &SMOKE_SIZES[..]);
    // The chart's lines: ours, anchor, floor; (edge nodes, rate).
    let mut rates: [Vec<(f64, crate::plot::Stat)>; 3] = Default::default();
    for &n in sizes {
        dnat.set_edge_nodes((0..n).map(edge))?;
        let loaded = load_nft(&anchor.ns, dir.path(), n)?;
        notes.push(format!(
            "{n} edge nodes: `nft -f` of the anchor's ruleset ({} rules) took {} ms",
            CLOUD_NODES.len() as u32 + n * RULES.len() as u32,
            us(loaded)
        ));
        settle.wait()?;
        let edge_target = move |i: usize| v4(edge(i as u32 % n), KUBELET_PORT);
        let mut ways = [
            Way {
                node: &ours,
                client: &ours_client,
                lands_on: &ours_tunnel,
                target: Box::new(edge_target),
                rates: vec![],
                cpu: vec![],
            },
            Way {
                node: &anchor,
                client: &plain,
                lands_on: &anchor_tunnel,
                target: Box::new(edge_target),
                rates: vec![],
                cpu: vec![],
            },
            Way {
                node: &floor,
                client: &plain,
                lands_on: &floor_tunnel,
                target: Box::new(|_| v4(NODE_IP, TLS_PORT)),
                rates: vec![],
                cpu: vec![],
            },
        ];
        interleave(&mut ways, rounds, per_round)?;
        println!(
            "| {n} | {} | {} | {} | **{}** | {} | {} | {:.1} / {:.1} / {:.1} | {:.3}× |",
            ways[0].cell(),
            ways[1].cell(),
            ways[2].cell(),
            ways[0].paired(&ways[2]),
            ways[1].paired(&ways[2]),
            ways[0].paired(&ways[1]),
            ways[0].cpu_us(),
            ways[1].cpu_us(),
            ways[2].cpu_us(),
            ways[2].cpu_us() / ways[0].cpu_us().max(f64::EPSILON),
        );
        for (series, way) in rates.iter_mut().zip(&ways) {
            series.push((f64::from(n), way.stat()));
        }
        notes.push(format!(
            "{n} edge nodes: the anchor namespace's conntrack table held {} entries after its rounds",
            conntrack_count(&anchor.ns)?
        ));
        settle.wait()?;
        changes.push((n, node_set_changes(&stage, &mut dnat, Scale::sized(200, 2), Scale::sized(20, 2))?));
    }

    dnat_chart(rates, rounds, per_round)?;

    // With the largest node set still in place.
    let n = sizes[sizes.len() - 1];
    println!(
        "\nunrelated connects (no redirection), {n} edge nodes in place; connections/s, median (min–max) of {rounds} \
         rounds × {per_round}:\n"
    );
    println!("| destination | programs attached | no programs (floor namespace) | anchor namespace (nft chain + conntrack) | attached ÷ none | anchor ÷ none | CPU µs/conn attached / none / anchor |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (port, ours_l, anchor_l, floor_l) in &unrelated {
        let port = *port;
        settle.wait()?;
        let to = move |_: usize| v4(NODE_IP, port);
        let mut ways = [
            Way {
                node: &ours,
                client: &ours_client,
                lands_on: ours_l,
                target: Box::new(to),
                rates: vec![],
                cpu: vec![],
            },
            Way { node: &floor, client: &plain, lands_on: floor_l, target: Box::new(to), rates: vec![], cpu: vec![] },
            Way { node: &anchor, client: &plain, lands_on: anchor_l, target: Box::new(to), rates: vec![], cpu: vec![] },
        ];
        interleave(&mut ways, rounds, per_round)?;
        let what = if port == OTHER_PORT { "port in no rule" } else { "a rule's port, cloud node (not an edge)" };
        println!(
            "| {NODE_IP}:{port} ({what}) | {} | {} | {} | **{}** | {} | {:.1} / {:.1} / {:.1} |",
            ways[0].cell(),
            ways[1].cell(),
            ways[2].cell(),
            ways[0].paired(&ways[1]),
            ways[2].paired(&ways[1]),
            ways[0].cpu_us(),
            ways[1].cpu_us(),
            ways[2].cpu_us(),
        );
    }

    // Where the programs' time goes: the kernel's own accounting, which
    // this shared machine's other load moves far less than any rate.
    let costed = Scale::sized(20_000, 5_000);
    let mut columns = Vec::new();
    let edge_target = move |i: usize| v4(edge(i as u32 % n), KUBELET_PORT);
    let targets: [(&str, Target<'_>, &Listener); 3] = [
        ("redirected (edge node :10250)", Box::new(edge_target), &ours_tunnel),
        ("unrelated :8000", Box::new(|_| v4(NODE_IP, OTHER_PORT)), &unrelated[0].1),
        ("unrelated cloud node :10250", Box::new(|_| v4(NODE_IP, KUBELET_PORT)), &unrelated[1].1),
    ];
    for (what, target, lands_on) in targets {
        settle.wait()?;
        let mut way = Way { node: &ours, client: &ours_client, lands_on, target, rates: vec![], cpu: vec![] };
        columns.push((what, program_time(&dnat, &mut way, costed)?));
    }
    println!(
        "\nprogram time per connection (BPF_ENABLE_STATS: run_time ÷ connections, each run including two clock \
         reads), {costed} connections each, {n} edge nodes; runs per connection · ns per connection:\n"
    );
    let mut header = "| program |".to_string();
    let mut rule = "| --- |".to_string();
    for (what, _) in &columns {
        let _ = write!(header, " {what} |");
        rule.push_str(" ---: |");
    }
    println!("{header}\n{rule}");
    let programs: Vec<&str> = columns.first().map(|(_, c)| c.iter().map(|(p, _, _)| *p).collect()).unwrap_or_default();
    for (i, program) in programs.iter().enumerate() {
        let mut line = format!("| `{program}` |");
        for (_, column) in &columns {
            let (_, runs, ns) = column[i];
            let _ = write!(line, " {runs:.2} · {ns:.0} |");
        }
        println!("{line}");
    }
    let mut total = "| **all** |".to_string();
    for (_, column) in &columns {
        let (runs, ns) = column.iter().fold((0.0, 0.0), |(r, t), (_, runs, ns)| (r + runs, t + ns));
        let _ = write!(total, " {runs:.2} · **{ns:.0}** |");
    }
    println!("{total}");

    println!("\nnode-set change → next connect redirected, ms, median (min–max):\n");
    println!("| edge nodes | `add_edge_nodes` (1 node) | ours: call start → connect to the new node accepted on :{TLS_PORT} | anchor: one `nft add rule` process → accepted |");
    println!("| ---: | ---: | ---: | ---: |");
    for (n, change) in &changes {
        println!(
            "| {n} | {} | **{}** | {} |",
            spread_ms(&change.call),
            spread_ms(&change.landed),
            spread_ms(&change.nft_landed)
        );
    }
    let (trials, nft_trials) = changes.first().map(|(_, c)| (c.landed.len(), c.nft_landed.len())).unwrap_or_default();
    notes.push(format!("node-set changes: {trials} trials per size for ours, {nft_trials} for the anchor"));
    let stats = dnat.stats()?;
    notes.push(format!(
        "TunnelDnat counters: {} redirected, {} accepted with their original destination, {} without socket storage, {} handshakes pending",
        stats.rules.iter().map(|r| r.redirected).sum::<u64>(),
        stats.accepted_with_origin,
        stats.no_storage,
        stats.handshakes_pending
    ));
    println!();
    for note in notes {
        println!("- {note}");
    }
    // Locals drop in reverse order of declaration: listeners, then the
    // links (PinDir), then the cgroups (children first), namespaces last.
    Ok(())
}
