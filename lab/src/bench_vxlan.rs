//! `cargo xtask bench vxlan`: programming N peers from empty, side by side in
//! fresh namespaces — flannel's commands through `ip -batch`/`bridge -batch`
//! (the anchor), the same objects netd writes (nexthops) through `ip -batch`
//! (the kernel floor for iproute2), and `netd restore` (release build, from a
//! snapshot: process start, JSON parse, netlink batches) — plus the no-op
//! reconcile and the snapshot-restore time.
//!
//! Runs are isolated from each other (see [`Settle`]): what a run made is
//! deleted synchronously after it, outside the timer, and the next timed run
//! starts only once an RTNL round trip is quick again. The three variants
//! alternate within each repetition, so a slow patch of this shared machine
//! hits all of them alike.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netd::netlink::{Handle, LinkUpdate};
use netd::testing::{
    self, synthetic_config as config, synthetic_node as fresh_node, synthetic_peer as peer, NetNs,
    SYNTHETIC_OWN_IP as OWN_IP,
};
use netd::vxlan::snapshot::Snapshot;

use crate::bench::{machine, percentile, Scale};

/// flannel's device, made with `ip` as the baselines' starting point.
pub(crate) fn flannel_device(ns: &NetNs) -> Result<()> {
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &OWN_IP.to_string(),
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ])?;
    ns.ip(&["addr", "add", "10.0.0.0/32", "dev", "flannel.1"])?;
    ns.ip(&["link", "set", "flannel.1", "mtu", "1450", "up"])?;
    Ok(())
}

struct BatchFiles {
    neigh: PathBuf,
    fdb: PathBuf,
    routes: PathBuf,
    nexthop_routes: PathBuf,
}

fn write_batches(dir: &Path, n: u32) -> Result<BatchFiles> {
    let (mut neigh, mut fdb, mut routes, mut nh) = (String::new(), String::new(), String::new(), String::new());
    for i in 1..=n {
        let p = peer(i);
        let gw = p.subnet.network();
        writeln!(neigh, "neigh replace {gw} lladdr {} dev flannel.1 nud permanent", p.vtep_mac)?;
        writeln!(fdb, "fdb replace {} dev flannel.1 dst {} self permanent", p.vtep_mac, p.public_ip)?;
        writeln!(routes, "route replace {} via {gw} dev flannel.1 onlink", p.subnet)?;
        writeln!(nh, "nexthop replace id {} via {gw} dev flannel.1 onlink", u32::from(gw))?;
        writeln!(nh, "route replace {} nhid {}", p.subnet, u32::from(gw))?;
    }
    let files = BatchFiles {
        neigh: dir.join(format!("neigh-{n}")),
        fdb: dir.join(format!("fdb-{n}")),
        routes: dir.join(format!("routes-{n}")),
        nexthop_routes: dir.join(format!("nh-{n}")),
    };
    std::fs::write(&files.neigh, neigh)?;
    std::fs::write(&files.fdb, fdb)?;
    std::fs::write(&files.routes, routes)?;
    std::fs::write(&files.nexthop_routes, nh)?;
    Ok(files)
}

fn run_tool(ns: &NetNs, tool: &str, file: &Path) -> Result<()> {
    let out = Command::new(tool)
        .args(["-n", ns.name(), "-batch"])
        .arg(file)
        .output()
        .with_context(|| format!("running {tool} -batch"))?;
    ensure!(out.status.success(), "{tool} -batch {} failed: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn count_routes(ns: &NetNs) -> Result<usize> {
    Ok(ns.ip(&["route", "show", "dev", "flannel.1"])?.lines().count())
}

/// One RTNL round trip counts as quick below this. An idle `ip link set lo
/// up` over netlink takes tens of microseconds here; while a namespace
/// teardown holds the lock it waits for milliseconds to seconds.
const QUICK_PROBE: Duration = Duration::from_millis(1);
/// Quick probes in a row that count as settled.
const QUICK_IN_A_ROW: usize = 3;
/// Pause between probes.
const PROBE_EVERY: Duration = Duration::from_millis(5);
/// Longest wait before warning and carrying on.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// Keeps one timed run from overlapping the clean-up of the one before.
///
/// Why: dropping a namespace returns at once, and the kernel tears its
/// devices, neighbours, nexthops and thousands of routes down later, from a
/// workqueue, holding the RTNL lock. Every netlink write of the next run
/// waits on that lock, so a run timed right after a 10 000-peer run measured
/// its predecessor's teardown (10k/5k went from 2.0× to 3.2×, and netd fell
/// behind the floor). A fixed pause is a guess that is wrong on a slower or
/// busier machine, so instead:
/// 1. after each run, outside the timer, `ip link del flannel.1` (which takes
///    the device's neighbours, FDB entries, nexthops and routes with it) and
///    the veth underlay: the netlink delete is acknowledged only after the
///    kernel has processed it, so the expensive part of the teardown happens
///    here, synchronously, and only an empty namespace is left to drop
///    (measured here at 10 000 peers, nexthop form: dropping the namespace
///    as it was left RTNL writes stalling for up to 0.9 s afterwards; after
///    the synchronous delete, itself 0.7–0.8 s, the next write took 0.2 ms);
/// 2. before each timed run, probe RTNL with a trivial write in a namespace
///    of our own (`ip link set lo up`) until [`QUICK_IN_A_ROW`] probes in a
///    row take less than [`QUICK_PROBE`]: whatever teardown is still pending
///    (the empty namespace, RCU frees, IPv6 and link-watch work of the new
///    namespace's set-up) has finished. The waits are reported, so a run can
///    show that it was isolated.
///
/// What isolation cannot remove on a shared machine is other tenants' CPU
/// use, so the CPU pressure during the timed runs is reported beside them.
pub(crate) struct Settle {
    handle: Handle,
    _probe_ns: NetNs,
    deletes: Vec<Duration>,
    waits: Vec<Duration>,
    slowest_probe: Duration,
    unsettled: usize,
    /// Per timed run: N and the share of it during which some task waited
    /// for a CPU (`/proc/pressure/cpu`, system-wide).
    pressure: Vec<(u32, f64)>,
}

/// Total microseconds some task has waited for a CPU since boot.
pub(crate) fn cpu_pressure_us() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    text.lines().find(|l| l.starts_with("some"))?.split("total=").nth(1)?.trim().parse().ok()
}

impl Settle {
    pub(crate) fn new() -> Result<Self> {
        let ns = NetNs::new()?;
        let handle = ns.run(Handle::new)?.context("opening a netlink socket in the probe namespace")?;
        Ok(Self {
            handle,
            _probe_ns: ns,
            deletes: Vec::new(),
            waits: Vec::new(),
            slowest_probe: Duration::ZERO,
            unsettled: 0,
            pressure: Vec::new(),
        })
    }

    /// One trivial RTNL write: `ip link set lo up` in the probe namespace.
    fn probe(&mut self) -> Result<Duration> {
        let started = Instant::now();
        // lo is index 1 in every namespace.
        self.handle.link().set(LinkUpdate { index: 1, mac: None, mtu: None, up: Some(true) }).execute()?;
        let took = started.elapsed();
        self.slowest_probe = self.slowest_probe.max(took);
        Ok(took)
    }

    /// Returns once RTNL round trips are quick again.
    pub(crate) fn wait(&mut self) -> Result<()> {
        let started = Instant::now();
        let mut quick = 0;
        while quick < QUICK_IN_A_ROW {
            if started.elapsed() > SETTLE_LIMIT {
                eprintln!("warning: RTNL still slow after {SETTLE_LIMIT:?}; timing anyway");
                self.unsettled += 1;
                break;
            }
            quick = if self.probe()? < QUICK_PROBE { quick + 1 } else { 0 };
            if quick < QUICK_IN_A_ROW {
                std::thread::sleep(PROBE_EVERY);
            }
        }
        self.waits.push(started.elapsed());
        Ok(())
    }

    /// Deletes what a run made in `ns`, synchronously, then drops it.
    pub(crate) fn clear(&mut self, ns: NetNs) -> Result<()> {
        let started = Instant::now();
        ns.ip(&["link", "del", "flannel.1"])?;
        ns.ip(&["link", "del", "eth0"])?;
        self.deletes.push(started.elapsed());
        let left = ns.ip(&["-o", "link", "show"])?;
        ensure!(left.lines().count() == 1, "devices left in {} after the clean-up:\n{left}", ns.name());
        drop(ns);
        Ok(())
    }

    /// Times `f` as one run with `n` peers and notes the CPU pressure during it.
    fn timed<T>(&mut self, n: u32, f: impl FnOnce() -> Result<T>) -> Result<(Duration, T)> {
        let before = cpu_pressure_us();
        let started = Instant::now();
        let out = f()?;
        let took = started.elapsed();
        if let (Some(before), Some(after)) = (before, cpu_pressure_us()) {
            let share = after.saturating_sub(before) as f64 / (took.as_secs_f64() * 1e6).max(1.0);
            self.pressure.push((n, share.min(1.0)));
        }
        Ok((took, out))
    }

    /// Median and max CPU pressure of the timed runs with `n` peers.
    fn pressure_at(&self, n: u32) -> Option<(f64, f64)> {
        let mut shares: Vec<f64> = self.pressure.iter().filter(|(m, _)| *m == n).map(|(_, s)| *s).collect();
        shares.sort_by(f64::total_cmp);
        Some((*shares.get(shares.len() / 2)?, *shares.last()?))
    }

    fn summary(&self) -> String {
        let mut waits = self.waits.clone();
        waits.sort();
        let mut deletes = self.deletes.clone();
        deletes.sort();
        let mut line = format!(
            "isolation: {} runs; synchronous device deletes after each run {} ms (median, min–max); \
             RTNL quick again before each timed run after {} ms; slowest probe {:.1} ms",
            waits.len(),
            spread(&deletes),
            spread(&waits),
            self.slowest_probe.as_secs_f64() * 1000.0,
        );
        if self.unsettled > 0 {
            let _ = write!(line, "; {} runs timed without settling", self.unsettled);
        }
        line
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Anchor,
    Floor,
    Ours,
}

struct Runs {
    anchor: Vec<Duration>,
    floor: Vec<Duration>,
    wall: Vec<Duration>,
    inproc: Vec<Duration>,
}

struct Sizes<'a> {
    netd: &'a Path,
    files: &'a BatchFiles,
    snapshot: &'a Path,
    n: u32,
}

/// One timed run of `variant` in a fresh namespace, cleared afterwards.
fn run_one(variant: Variant, at: &Sizes<'_>, settle: &mut Settle, runs: &mut Runs) -> Result<()> {
    let Sizes { netd, files, snapshot, n } = *at;
    let ns = fresh_node()?;
    if variant != Variant::Ours {
        flannel_device(&ns)?;
    }
    settle.wait()?;
    match variant {
        Variant::Anchor => {
            // flannel's commands: neighbours, FDB, gateway routes.
            let (took, ()) = settle.timed(n, || {
                run_tool(&ns, "ip", &files.neigh)?;
                run_tool(&ns, "bridge", &files.fdb)?;
                run_tool(&ns, "ip", &files.routes)
            })?;
            runs.anchor.push(took);
        }
        Variant::Floor => {
            // The objects netd writes (nexthops + nhid routes) through iproute2.
            let (took, ()) = settle.timed(n, || {
                run_tool(&ns, "ip", &files.neigh)?;
                run_tool(&ns, "bridge", &files.fdb)?;
                run_tool(&ns, "ip", &files.nexthop_routes)
            })?;
            runs.floor.push(took);
        }
        Variant::Ours => {
            let (_, run) = settle.timed(n, || netd_restore(netd, &ns, snapshot))?;
            ensure!(run.writes == 4 * u64::from(n), "netd wrote {} changes for {n} peers", run.writes);
            runs.wall.push(run.wall);
            runs.inproc.push(run.reconcile);
        }
    }
    ensure!(count_routes(&ns)? == n as usize, "{} programmed a wrong route count", variant.name());
    settle.clear(ns)
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Anchor => "ip -batch (flannel's commands)",
            Variant::Floor => "ip -batch (nexthops)",
            Variant::Ours => "netd restore",
        }
    }
}

struct RestoreRun {
    wall: Duration,
    reconcile: Duration,
    writes: u64,
}

/// `netd restore` in `ns` from `snapshot`, spawned from a thread inside the
/// namespace so no `ip netns exec` start-up is timed.
fn netd_restore(netd: &Path, ns: &NetNs, snapshot: &Path) -> Result<RestoreRun> {
    let (wall, out) = ns.run(|| {
        let started = Instant::now();
        let out = Command::new(netd).args(["restore", "--json", "--snapshot"]).arg(snapshot).output();
        (started.elapsed(), out)
    })?;
    let out = out.context("spawning netd restore")?;
    ensure!(out.status.success(), "netd restore failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing netd restore --json")?;
    ensure!(report["failures"] == 0 && report["rejected"] == 0, "netd restore reported problems: {report}");
    Ok(RestoreRun {
        wall,
        reconcile: Duration::from_secs_f64(report["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0),
        writes: report["writes"].as_u64().unwrap_or(0),
    })
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    percentile(&v, 0.5)
}

/// Milliseconds with one decimal and a space between thousands, as the book
/// writes them: `2 185.3`.
fn millis(d: Duration) -> String {
    let tenths = (d.as_secs_f64() * 10_000.0).round() as u64;
    format!("{}.{}", grouped(tenths / 10), tenths % 10)
}

fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// `median (min–max)` in milliseconds.
fn spread(v: &[Duration]) -> String {
    let (Some(min), Some(max)) = (v.iter().min(), v.iter().max()) else { return "–".into() };
    format!("{} ({}–{})", millis(median(v)), millis(*min), millis(*max))
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(f64::EPSILON)
}

/// The chart of the table: time to program N peers, median with min–max
/// whiskers, per variant.
fn vxlan_chart(by_n: &[(u32, Runs)]) -> Result<()> {
    use crate::plot::{Chart, Kind, Series, Stat};
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let line = |name: &str, of: fn(&Runs) -> &Vec<Duration>| Series {
        name: name.into(),
        points: by_n
            .iter()
            .map(|(n, runs)| {
                let samples = of(runs);
                let stat = Stat {
                    median: ms(&median(samples)),
                    min: samples.iter().min().map_or(0.0, ms),
                    max: samples.iter().max().map_or(0.0, ms),
                };
                (f64::from(*n), stat)
            })
            .collect(),
    };
    let chart = Chart {
        title: "VXLAN: programming N peers from empty (median, whiskers min–max)".into(),
        x_label: "peers (N)".into(),
        y_label: "time, ms (log scale)".into(),
        // Log: the anchor's quadratic routes and ours differ by 4–14×.
        kind: Kind::Lines { log_x: false, log_y: true },
        series: vec![
            line("anchor: flannel's commands (ip -batch + bridge -batch)", |r| &r.anchor),
            line("floor: netd's objects via iproute2 (ip -batch)", |r| &r.floor),
            line("ours: netd restore (process start → programmed)", |r| &r.wall),
            line("ours in-process", |r| &r.inproc),
        ],
        footnote: crate::plot::footnote(),
    };
    crate::plot::write(&crate::plot::file("vxlan", "peers"), &chart)
}

/// Runs the VXLAN benchmark and prints the book's tables.
pub fn run(reps: usize, bin_dir: &Path) -> Result<()> {
    let netd = bin_dir.join("netd");
    let Some(_kernel) = testing::privileged()? else { bail!("the VXLAN benchmark needs root") };
    let dir = tempfile::tempdir()?;
    let mut settle = Settle::new()?;
    println!("machine: {}", machine());
    println!(
        "\nprogramming N peers from empty, {reps} runs each, variants alternating within each repetition, \
         each run in a fresh namespace started once the previous one's devices are deleted and RTNL is quick \
         again (one untimed warm-up round first):\n"
    );
    println!("| N peers | anchor: flannel's commands via `ip -batch` + `bridge -batch`, ms | floor via iproute2: the same objects netd writes (nexthops) via `ip -batch`, ms | ours: `netd restore` (process start → all programmed), ms | ours in-process, ms | anchor ÷ ours | floor ÷ ours |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    const ORDER: [Variant; 3] = [Variant::Anchor, Variant::Floor, Variant::Ours];
    let mut by_n = Vec::new();
    // Smoke runs keep the shape (three sizes, each double the one before
    // at the top) at a fiftieth.
    let sizes: [u32; 3] = Scale::sized([1_000, 5_000, 10_000], [20, 100, 200]);
    for n in sizes {
        let files = write_batches(dir.path(), n)?;
        let snapshot = dir.path().join(format!("snapshot-{n}.json"));
        Snapshot::new(config(), (1..=n).map(peer).collect()).save(&snapshot)?;
        let at = Sizes { netd: &netd, files: &files, snapshot: &snapshot, n };
        if n == sizes[0] {
            // Warm-up: binaries, page cache, the kernel's slab caches.
            let mut discard = Runs { anchor: vec![], floor: vec![], wall: vec![], inproc: vec![] };
            for variant in ORDER {
                run_one(variant, &at, &mut settle, &mut discard)?;
            }
            settle.pressure.clear();
        }
        let mut runs = Runs { anchor: vec![], floor: vec![], wall: vec![], inproc: vec![] };
        for rep in 0..reps {
            // rep 0: anchor, floor, ours; rep 1: floor, ours, anchor; …
            for k in 0..ORDER.len() {
                run_one(ORDER[(rep + k) % ORDER.len()], &at, &mut settle, &mut runs)?;
            }
        }
        let (anchor, floor, wall) = (median(&runs.anchor), median(&runs.floor), median(&runs.wall));
        println!(
            "| {} | {} | {} | {} | {} | {:.1}× | {:.1}× |",
            grouped(u64::from(n)),
            spread(&runs.anchor),
            spread(&runs.floor),
            spread(&runs.wall),
            spread(&runs.inproc),
            ratio(anchor, wall),
            ratio(floor, wall),
        );
        by_n.push((n, runs));
    }
    vxlan_chart(&by_n)?;
    if let [_, (_, five), (_, ten)] = &by_n[..] {
        let linear = |f: fn(&Runs) -> &Vec<Duration>| ratio(median(f(ten)), median(f(five)));
        println!(
            "\n{} / {} peers (medians): ours {:.2}× (goal ≤ 2.2×), ours in-process {:.2}×, floor {:.2}×, anchor {:.2}×",
            grouped(u64::from(sizes[2])),
            grouped(u64::from(sizes[1])),
            linear(|r| &r.wall),
            linear(|r| &r.inproc),
            linear(|r| &r.floor),
            linear(|r| &r.anchor),
        );
    }

    // No-op reconcile of 5 000 programmed peers: a second `netd restore` on
    // a programmed namespace dumps everything and writes nothing.
    let snapshot = dir.path().join(format!("snapshot-{}.json", sizes[1]));
    let ns = fresh_node()?;
    settle.wait()?;
    netd_restore(&netd, &ns, &snapshot)?;
    let mut noop = Vec::new();
    for _ in 0..Scale::sized(reps.max(5) * 2, 1) {
        let run = netd_restore(&netd, &ns, &snapshot)?;
        ensure!(run.writes == 0, "no-op reconcile wrote {} changes", run.writes);
        noop.push(run.reconcile);
    }
    settle.clear(ns)?;
    println!(
        "\nno-op reconcile, {} programmed peers: {} ms (median, min–max), 0 writes (goal ≤ 20 ms)",
        grouped(u64::from(sizes[1])),
        spread(&noop)
    );

    // Snapshot restore, 1 000 peers: process start to all programmed.
    let snapshot = dir.path().join(format!("snapshot-{}.json", sizes[0]));
    let mut restore = Vec::new();
    for _ in 0..Scale::sized(reps.max(5), 1) {
        let ns = fresh_node()?;
        settle.wait()?;
        restore.push(netd_restore(&netd, &ns, &snapshot)?.wall);
        settle.clear(ns)?;
    }
    println!(
        "snapshot restore, {} peers, process start → programmed: {} ms (median, min–max; goal ≤ 100 ms)",
        grouped(u64::from(sizes[0])),
        spread(&restore)
    );
    println!("{}", settle.summary());
    let pressure: Vec<String> = sizes
        .into_iter()
        .filter_map(|n| {
            let (median, max) = settle.pressure_at(n)?;
            Some(format!("{}: {:.0}% (max {:.0}%)", grouped(u64::from(n)), median * 100.0, max * 100.0))
        })
        .collect();
    if !pressure.is_empty() {
        println!(
            "CPU pressure during the timed runs (share of the run some task waited for a CPU, system-wide; \
             our own threads count too), median by N: {}",
            pressure.join(", ")
        );
    }
    Ok(())
}
