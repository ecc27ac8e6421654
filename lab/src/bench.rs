//! `netd-lab bench` (`cargo xtask bench`): side-by-side runs that need namespaces or external
//! tools. Each prints a markdown table (medians, p99, ratios) for the book's
//! benchmark pages (docs/src/benchmarks/).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netd::testing::{self, CniCall, CniRunner, NetNs, DEBIAN_CNI_DIR};

/// DNAT benchmark rounds per variant and size, and connections per round.
const DNAT_ROUNDS: usize = 31;
const DNAT_PER_ROUND: usize = 1_000;
/// Autonomy benchmark: timed rounds, and pods on the node.
const AUTONOMY_ROUNDS: usize = 5;
const AUTONOMY_PODS: usize = 1_000;
/// Door-bounds benchmark rounds (each a baseline and a flood).
const DOORS_ROUNDS: usize = 5;
/// Agents (and idle streams) of `bench tunnel-scale` (issue 27).
const TUNNEL_SCALE_AGENTS: usize = 5_000;
/// Real-cluster pod benchmark: mirrored triples of rounds (netd-ipam, host-local, hostNetwork; ABC CBA).
const POD_ROUND_PAIRS: usize = 2;
/// Hub benchmark: rounds per way to the API, and lists per round.
const HUB_ROUNDS: usize = 5;
const HUB_LISTS_PER_ROUND: usize = 200;
/// Real-cluster reboot benchmark: mirrored pairs of reboots (floor, hub with the cloud away).
const REBOOT_ROUND_PAIRS: usize = 2;

/// How much a benchmark run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// The book's figures: every size, every round.
    Full,
    /// Every step of every benchmark once, at tiny sizes: what CI runs so
    /// that a broken benchmark fails there. Its figures mean nothing and are
    /// not quoted.
    Smoke,
}

static SCALE: std::sync::OnceLock<Scale> = std::sync::OnceLock::new();

impl Scale {
    /// The scale of this process's run ([`Scale::Full`] unless
    /// [`Scale::set`] said otherwise).
    pub(crate) fn current() -> Scale {
        SCALE.get().copied().unwrap_or(Scale::Full)
    }

    /// Fixes this process's scale; only the first call counts.
    pub fn set(scale: Scale) {
        let _ = SCALE.set(scale);
    }

    /// Its name on a command line.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scale::Full => "full",
            Scale::Smoke => "smoke",
        }
    }

    /// The scale a command line names.
    pub(crate) fn named(name: &str) -> Option<Scale> {
        [Scale::Full, Scale::Smoke].into_iter().find(|s| s.name() == name)
    }

    /// `full` in a measuring run, `smoke` in a smoke run.
    pub(crate) fn pick<T>(self, full: T, smoke: T) -> T {
        match self {
            Scale::Full => full,
            Scale::Smoke => smoke,
        }
    }

    /// [`Scale::pick`] on this process's scale.
    pub(crate) fn sized<T>(full: T, smoke: T) -> T {
        Scale::current().pick(full, smoke)
    }
}

/// Every benchmark `run` knows, in the order `all` and `smoke` run them.
pub const NAMES: [&str; 14] = [
    "cni",
    "vxlan",
    "events",
    "rss",
    "scenario",
    "dnat",
    "tunnel",
    "tunnel-scale",
    "doors",
    "tunnel-config",
    "autonomy",
    "hub",
    "pods",
    "reboot",
];

/// The benchmarks `all` runs: every one but the real-cluster ones (`pods`
/// and `reboot`, which need netd's image and take minutes each) and the
/// 5 000-agent `tunnel-scale`.
const ALL: [&str; 11] =
    ["cni", "vxlan", "events", "rss", "scenario", "dnat", "tunnel", "doors", "tunnel-config", "autonomy", "hub"];

/// Runs the named benchmark with the binaries in `bin_dir`: one of
/// [`NAMES`], `all` ([`ALL`]) or `smoke` (every one of [`NAMES`] at
/// [`Scale::Smoke`]).
pub fn run(which: &str, bin_dir: &Path) -> Result<()> {
    match which {
        "all" => ALL.iter().try_for_each(|name| one(name, bin_dir)),
        "smoke" => smoke(&NAMES, bin_dir),
        name => one(name, bin_dir),
    }
}

/// Runs `names` at [`Scale::Smoke`], drawing and checking their charts, so
/// a broken benchmark or plot fails CI.
pub fn smoke(names: &[&str], bin_dir: &Path) -> Result<()> {
    Scale::set(Scale::Smoke);
    ensure!(Scale::current() == Scale::Smoke, "a full run was already chosen in this process");
    // Into a directory of their own unless --plot named one (the first
    // directory set counts).
    let charts = tempfile::tempdir().context("creating a directory for the charts")?;
    crate::plot::set_dir(charts.path().to_path_buf());
    for &name in names {
        let started = Instant::now();
        println!("\n==> smoke: bench {name}");
        one(name, bin_dir).with_context(|| format!("smoke run of `bench {name}`"))?;
        let written = crate::plot::take_written();
        ensure!(!PLOTTED.contains(&name) || !written.is_empty(), "smoke run of `bench {name}` drew no chart");
        for chart in &written {
            crate::plot::check(chart).with_context(|| format!("the chart of `bench {name}`"))?;
        }
        println!("<== smoke: bench {name} ran in {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// The benchmarks that draw charts with `--plot DIR` (crate::plot).
const PLOTTED: [&str; 4] = ["cni", "vxlan", "dnat", "tunnel"];

/// One benchmark at this process's [`Scale`].
fn one(which: &str, bin_dir: &Path) -> Result<()> {
    crate::plot::running(which);
    match which {
        "cni" => cni(Scale::sized(200, 3), bin_dir),
        "vxlan" => crate::bench_vxlan::run(Scale::sized(5, 1), bin_dir),
        "events" => crate::bench_events::run(Scale::sized(200, 2)),
        "rss" => crate::bench_rss::run(Scale::sized(1_000, 20), bin_dir),
        "scenario" => crate::bench_scenario::run(Scale::sized(5, 1), bin_dir),
        "dnat" => crate::bench_dnat::run(Scale::sized(DNAT_ROUNDS, 1), Scale::sized(DNAT_PER_ROUND, 20)),
        "tunnel" => crate::bench_tunnel::run(bin_dir),
        "tunnel-scale" => {
            let agents = Scale::sized(TUNNEL_SCALE_AGENTS, 20);
            crate::bench_tunnel_scale::run(agents, agents, bin_dir)
        }
        "doors" => crate::bench_doors::run(Scale::sized(DOORS_ROUNDS, 1), bin_dir),
        "tunnel-config" => crate::bench_tunnel_config::run(Scale::sized(20, 2)),
        "autonomy" => {
            crate::bench_autonomy::run(Scale::sized(AUTONOMY_ROUNDS, 1), Scale::sized(AUTONOMY_PODS, 10), bin_dir)
        }
        "pods" => crate::bench_pods::run(Scale::sized(POD_ROUND_PAIRS, 1)),
        "hub" => crate::bench_hub::run(Scale::sized(HUB_ROUNDS, 1), Scale::sized(HUB_LISTS_PER_ROUND, 5), bin_dir),
        "reboot" => crate::bench_reboot::run(Scale::sized(REBOOT_ROUND_PAIRS, 1), bin_dir),
        other => bail!("unknown benchmark `{other}` (known: {}, all, smoke)", NAMES.join(", ")),
    }
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// What a real service's listener asks for (the kernel caps it at
/// `net.core.somaxconn`, 4096 by default).
const LISTEN_BACKLOG: libc::c_int = 4096;

/// A listener bound in a namespace whose accepted connections go to
/// `handle`, on a thread of its own; stopped on drop.
pub(crate) struct Listener {
    listener: Arc<TcpListener>,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Binds `addr` in `ns` (in the cgroup the process is in now: accepted
    /// sockets belong to their listener's cgroup).
    pub(crate) fn start(ns: &NetNs, addr: SocketAddr, handle: impl Fn(TcpStream) + Send + 'static) -> Result<Self> {
        let listener = ns.run(|| TcpListener::bind(addr))?.with_context(|| format!("binding {addr}"))?;
        // std listens with a backlog of 128, which a burst can overflow (the
        // tunnel bench opens 1 000 idle streams at once; a dropped SYN comes
        // back 1, 3 and 7 s later, past the tunnel agent's 5 s dial
        // timeout). Real services ask for `net.core.somaxconn` (Go's
        // net.Listen does); listen() on a listening socket only changes its
        // backlog.
        // SAFETY: the descriptor is the listening socket `listener` owns,
        // open for this whole call.
        if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("raising {addr}'s listen backlog"));
        }
        let (listener, accepted, stop) =
            (Arc::new(listener), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (listener, accepted, stop) = (listener.clone(), accepted.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((stream, _)) = listener.accept() {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        handle(stream);
                    }
                }
            })
        };
        Ok(Self { listener, accepted, stop, thread: Some(thread) })
    }

    /// Connections accepted so far.
    pub(crate) fn count(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // shutdown() on a listening socket wakes a blocked accept() (EINVAL).
        // SAFETY: shutdown on a descriptor the Arc keeps open; no memory involved.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `setsockopt(socket, level, name, value)` for one plain value.
pub(crate) fn set_option<T>(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<T>()` bytes of `value`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Median of unsorted samples (the mean of the middle two for an even count).
pub(crate) fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

pub(crate) fn min_max(samples: &[f64]) -> (f64, f64) {
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// `median (min–max)` with `digits` decimals.
pub(crate) fn spread(samples: &[f64], digits: usize) -> String {
    let (min, max) = min_max(samples);
    format!("{:.digits$} ({min:.digits$}–{max:.digits$})", median(samples))
}

/// Per-round ratios of `a` to `b` (they ran moments apart): median (min–max).
pub(crate) fn paired(a: &[f64], b: &[f64]) -> String {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b.max(f64::EPSILON)).collect();
    let (min, max) = min_max(&ratios);
    format!("{:.2}× ({min:.2}–{max:.2})", median(&ratios))
}

struct Variant {
    label: &'static str,
    bridge: &'static str,
    ipam: String,
    /// Pod name per cycle: `None` = a new pod each cycle.
    fixed_pod: Option<&'static str>,
    add: Vec<Duration>,
    del: Vec<Duration>,
    cycle: Vec<Duration>,
}

impl Variant {
    fn ipam_type(&self) -> &'static str {
        ["static", "host-local", "netd-ipam"]
            .into_iter()
            .find(|t| self.ipam.contains(&format!(r#""type":"{t}""#)))
            .unwrap_or("static")
    }

    fn config(&self) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"bench-{}","type":"bridge","bridge":"{}","isGateway":true,"ipam":{}}}"#,
            self.bridge, self.bridge, self.ipam
        )
    }
}

/// CNI ADD+DEL through Debian's `bridge` plugin, IPAM = static (floor),
/// host-local (anchor), netd-ipam (new pod each cycle; same pod each cycle).
/// Cycles are interleaved across variants so machine noise hits all alike.
fn cni(cycles: usize, bin_dir: &Path) -> Result<()> {
    let Some(_kernel) = testing::privileged()? else { bail!("the CNI benchmark needs root") };
    println!("machine: {}", machine());
    cni_table(cycles, true, bin_dir)?;
    cni_table(cycles, false, bin_dir)
}

/// One table: through `bridge` (what a runtime does) or the IPAM plugin
/// alone (isolates what netd-ipam changes).
fn cni_table(cycles: usize, through_bridge: bool, our_dir: &Path) -> Result<()> {
    let data = tempfile::tempdir().context("creating a data directory")?;
    let d = data.path().display();
    let mut variants = vec![
        Variant {
            label: "static (floor: no state)",
            bridge: "cni-static",
            ipam: r#"{"type":"static","addresses":[{"address":"10.73.0.5/16"}]}"#.into(),
            fixed_pod: Some("bench/static"),
            add: vec![],
            del: vec![],
            cycle: vec![],
        },
        Variant {
            label: "host-local (anchor)",
            bridge: "cni-hl",
            ipam: format!(r#"{{"type":"host-local","subnet":"10.70.0.0/16","dataDir":"{d}/hl"}}"#),
            fixed_pod: None,
            add: vec![],
            del: vec![],
            cycle: vec![],
        },
        Variant {
            label: "netd-ipam, new pod each cycle",
            bridge: "cni-nd",
            ipam: format!(r#"{{"type":"netd-ipam","subnet":"10.71.0.0/16","dataDir":"{d}/nd"}}"#),
            fixed_pod: None,
            add: vec![],
            del: vec![],
            cycle: vec![],
        },
        Variant {
            label: "netd-ipam, same pod (pin hit)",
            bridge: "cni-pin",
            ipam: format!(r#"{{"type":"netd-ipam","subnet":"10.72.0.0/16","dataDir":"{d}/pin"}}"#),
            fixed_pod: Some("bench/pinned"),
            add: vec![],
            del: vec![],
            cycle: vec![],
        },
    ];
    let node = NetNs::new()?;
    let pod_ns = NetNs::new()?;
    let runner = CniRunner::new(&node, vec![PathBuf::from(DEBIAN_CNI_DIR), our_dir.to_path_buf()]);
    let what = if through_bridge { "through Debian's bridge plugin 1.1.1" } else { "IPAM plugin alone" };
    println!("\nrunning {cycles} ADD+DEL cycles per IPAM, {what}, interleaved…");
    for i in 0..cycles {
        for v in &mut variants {
            let config = v.config();
            let container = format!("bench-{}-{i}", v.bridge);
            let pod = v.fixed_pod.map(str::to_string).unwrap_or_else(|| format!("bench/p{i}"));
            let add = CniCall {
                command: "ADD",
                container_id: &container,
                pod_netns: &pod_ns,
                ifname: "eth0",
                pod: Some(&pod),
            };
            let plugin = if through_bridge { "bridge" } else { v.ipam_type() };
            let started = Instant::now();
            runner.call_ok(plugin, &add, &config).with_context(|| format!("{} ADD", v.label))?;
            let added = started.elapsed();
            let del = CniCall { command: "DEL", ..add };
            let started = Instant::now();
            runner.call_ok(plugin, &del, &config).with_context(|| format!("{} DEL", v.label))?;
            let deleted = started.elapsed();
            v.add.push(added);
            v.del.push(deleted);
            v.cycle.push(added + deleted);
        }
    }
    for v in &mut variants {
        v.add.sort();
        v.del.sort();
        v.cycle.sort();
    }
    let anchor = percentile(&variants[1].cycle, 0.5);
    println!("\nCNI ADD+DEL, {what}, {cycles} cycles each, {}", machine());
    println!("\n| IPAM | ADD p50 ms | DEL p50 ms | ADD+DEL p50 ms | ADD+DEL p99 ms | p50 vs host-local |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for v in &variants {
        let p50 = percentile(&v.cycle, 0.5);
        println!(
            "| {} | {} | {} | {} | {} | {:.2}× |",
            v.label,
            ms(percentile(&v.add, 0.5)),
            ms(percentile(&v.del, 0.5)),
            ms(p50),
            ms(percentile(&v.cycle, 0.99)),
            p50.as_secs_f64() / anchor.as_secs_f64().max(f64::EPSILON)
        );
    }
    cni_chart(&variants, cycles, through_bridge)
}

/// The chart of one CNI table: ADD, DEL and ADD+DEL per IPAM, the table's
/// p50 with min–max whiskers.
fn cni_chart(variants: &[Variant], cycles: usize, through_bridge: bool) -> Result<()> {
    use crate::plot::{Chart, Kind, Series, Stat};
    // The samples are sorted: p50 as the table takes it, then the extremes.
    let stat = |sorted: &[Duration]| {
        let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        Stat { median: ms(Some(&percentile(sorted, 0.5))), min: ms(sorted.first()), max: ms(sorted.last()) }
    };
    let what = if through_bridge { "through Debian's bridge plugin" } else { "IPAM plugin alone" };
    let chart = Chart {
        title: format!("CNI ADD/DEL, {what}: p50 of {cycles} cycles, whiskers min–max"),
        x_label: "CNI call".into(),
        y_label: "time per call, ms".into(),
        kind: Kind::Bars { categories: vec!["ADD".into(), "DEL".into(), "ADD+DEL".into()] },
        series: variants
            .iter()
            .map(|v| Series {
                name: v.label.to_string(),
                points: vec![(0.0, stat(&v.add)), (1.0, stat(&v.del)), (2.0, stat(&v.cycle))],
            })
            .collect(),
        footnote: crate::plot::footnote(),
    };
    crate::plot::write(&crate::plot::file("cni", if through_bridge { "bridge" } else { "ipam-alone" }), &chart)
}
