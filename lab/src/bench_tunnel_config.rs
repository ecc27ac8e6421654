//! `cargo xtask bench tunnel-config`: how long a cluster change takes to
//! reach the tunnel DNAT's BPF maps through `netd::controller::tunnel_config`
//! (issue 15; goal ≤ 1 s end to end).
//!
//! A real kube-apiserver (the test harness's, on loopback) holding a
//! cluster of [`EDGE_NODES`] edge and [`CLOUD_NODES`] cloud nodes, the DNAT
//! attached to a bench cgroup, the driver on its own thread as on a cloud
//! node. Each round makes one change with `curl` against the API, as an
//! operator's edit or a join would, and polls the pinned map (a kernel
//! lookup through the loader, not the driver's own bookkeeping) until it
//! shows the change:
//! - **node label**: one node's trusted role label
//!   (`node-restriction.kubernetes.io/netd-role`) removed ↔ set to `cloud`,
//!   as an operator does (its address enters or leaves the edge map);
//! - **ConfigMap**: `dnat-ports-pair` switched between `9100=10264` and
//!   `9101=10264` (one rule leaves, one enters).
//!
//! Timed from the start of the edit command (curl's own start and TLS
//! handshake included: end to end, as an operator sees it); the table also
//! counts the rounds whose map showed the change before curl had even
//! exited, and the map entries written per change (from the driver's
//! counters: proportional to the change, not to the cluster). The
//! anchor is not run: yurt-tunnel rewrites its iptables DNAT chains on a
//! resync period of 15–60 s (SPEC §3), so a change waits up to that long.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netd::controller::tunnel_config::{self, TunnelConfigMetrics, TunnelConfigOptions};
use netd::ebpf::dnat::{AttachOptions, Scope, TunnelDnat};
use netd::kube::{KubeClient, KubeConfig};
use netd::model::roles::{LABEL_ROLE, ROLE_CLOUD};
use netd::testing::{self, Cgroup, KubeApiServer, PinDir};
use serde_json::{json, Value};

use crate::bench::{machine, ms, Scale};

/// Nodes in the cluster besides the one that changes.
const EDGE_NODES: u32 = 500;
const CLOUD_NODES: u32 = 500;

/// [`EDGE_NODES`], or a few in a smoke run.
fn edge_nodes() -> u32 {
    Scale::sized(EDGE_NODES, 10)
}

/// [`CLOUD_NODES`], or a few in a smoke run.
fn cloud_nodes() -> u32 {
    Scale::sized(CLOUD_NODES, 10)
}
/// The node whose label toggles.
const TOGGLED: &str = "edge-toggled";
const TOGGLED_IP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);
/// How long one change may take before the round counts as failed.
const ROUND_LIMIT: Duration = Duration::from_secs(30);
const MERGE: &str = "application/merge-patch+json";
const CM_PATH: &str = "/api/v1/namespaces/kube-system/configmaps/edge-tunnel-server-cfg";

fn nth(base: Ipv4Addr, i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + i)
}

/// The role labels of a merge patch: an edge node's `null` removes the
/// trusted role label (edge is the default), a cloud node's sets it.
fn role_labels(edge: bool) -> Value {
    json!({ LABEL_ROLE: (!edge).then_some(ROLE_CLOUD) })
}

fn node(name: &str, edge: bool, ip: Ipv4Addr, cidr: Option<String>) -> Value {
    let mut node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name, "labels": if edge { json!({}) } else { json!({ LABEL_ROLE: ROLE_CLOUD }) } },
        "status": { "addresses": [{ "type": "InternalIP", "address": ip.to_string() }] },
    });
    if let Some(cidr) = cidr {
        node["spec"] = json!({ "podCIDR": cidr, "podCIDRs": [cidr] });
    }
    node
}

/// The driver on its own thread and runtime, until dropped.
struct Driver {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Driver {
    fn start(config: KubeConfig, dnat: TunnelDnat, metrics: Arc<TunnelConfigMetrics>) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                eprintln!("bench tunnel-config: no runtime for the driver");
                return;
            };
            runtime.block_on(async move {
                let client = match KubeClient::new(&config) {
                    Ok(client) => client,
                    Err(err) => return eprintln!("bench tunnel-config: {err}"),
                };
                tokio::select! {
                    result = tunnel_config::run(client, dnat, TunnelConfigOptions::new("bench-cloud"), metrics) => {
                        eprintln!("bench tunnel-config: the driver ended: {result:?}");
                    }
                    _ = stopped => {}
                }
            });
        });
        Self { stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One round.
#[derive(Debug, Clone, Copy)]
struct Round {
    /// From the start of the edit command to the map showing it.
    from_edit: Duration,
    /// The map showed it already when the edit command returned.
    before_answer: bool,
}

fn api(server: &KubeApiServer, method: &str, path: &str, body: Option<(&str, &str)>) -> Result<()> {
    let (status, text) = server.api(method, path, body)?;
    ensure!((200..300).contains(&status), "{method} {path}: HTTP {status}: {text}");
    Ok(())
}

/// Runs `edit`, then polls `done` until it holds.
fn timed(edit: impl FnOnce() -> Result<()>, done: impl Fn() -> Result<bool>) -> Result<Round> {
    let start = Instant::now();
    edit()?;
    if done()? {
        return Ok(Round { from_edit: start.elapsed(), before_answer: true });
    }
    loop {
        if done()? {
            return Ok(Round { from_edit: start.elapsed(), before_answer: false });
        }
        if start.elapsed() > ROUND_LIMIT {
            bail!("the change did not reach the BPF map within {ROUND_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Waits until `counter` has not moved for 200 ms: the driver counts a
/// write after the kernel has it, so a poll can see the map first.
fn quiet(counter: &std::sync::atomic::AtomicU64) -> u64 {
    let mut last = counter.load(Ordering::Relaxed);
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_millis(200) {
        std::thread::sleep(Duration::from_millis(10));
        let now = counter.load(Ordering::Relaxed);
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    last
}

/// Median, min and max in ms.
fn summary(times: &mut [Duration]) -> String {
    times.sort();
    match (times.first(), times.last()) {
        (Some(min), Some(max)) => format!("{} ({}–{})", ms(times[times.len() / 2]), ms(*min), ms(*max)),
        _ => "-".to_string(),
    }
}

/// Runs `rounds` rounds of each change and prints the table.
pub fn run(rounds: usize) -> Result<()> {
    let Some(_kernel) = testing::privileged()? else { bail!("the tunnel-config benchmark needs root") };
    let server = KubeApiServer::new().context("starting kube-apiserver (cargo xtask setup builds it)")?;
    let pins = PinDir::new()?;
    let cgroup = Cgroup::new()?;
    let options = AttachOptions {
        pin_dir: pins.path().to_path_buf(),
        cgroup: Some(cgroup.path().to_path_buf()),
        original_dst_cgroup: None,
    };
    let (mut dnat, _) = TunnelDnat::load_or_attach(&options)?;
    // Nothing connects in this benchmark: any target will do.
    dnat.set_target(Ipv4Addr::new(192, 168, 70, 1), Scope::HostNetwork)?;

    // The cluster, in one kubectl call.
    let mut items = Vec::new();
    for i in 0..edge_nodes() {
        let cidr = format!("10.{}.{}.0/24", 100 + i / 256, i % 256);
        items.push(node(&format!("edge-{i}"), true, nth(Ipv4Addr::new(10, 99, 0, 1), i), Some(cidr)));
    }
    for i in 0..cloud_nodes() {
        items.push(node(&format!("cloud-{i}"), false, nth(Ipv4Addr::new(10, 98, 0, 1), i), None));
    }
    items.push(node(TOGGLED, false, TOGGLED_IP, None));
    let dir = tempfile::tempdir()?;
    let list = dir.path().join("nodes.json");
    std::fs::write(&list, json!({ "apiVersion": "v1", "kind": "List", "items": items }).to_string())?;
    server.kubectl(&["create", "-f", &list.display().to_string()])?;
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "edge-tunnel-server-cfg", "namespace": "kube-system" },
        "data": { "dnat-ports-pair": "9101=10264" },
    });
    api(&server, "POST", "/api/v1/namespaces/kube-system/configmaps", Some(("application/json", &cm.to_string())))?;

    let config = server.kube_config("bench-cloud")?;
    let metrics = Arc::new(TunnelConfigMetrics::default());
    let maps = TunnelDnat::open(pins.path())?;
    let driver = Driver::start(config, TunnelDnat::open(pins.path())?, metrics.clone());
    let settled = timed(
        || Ok(()),
        || {
            Ok(maps.lookup_port_rule(9101)?.is_some()
                && maps.lookup_edge_node(nth(Ipv4Addr::new(10, 99, 0, 1), edge_nodes() - 1))?)
        },
    )?;
    let initial_writes = quiet(&metrics.map_writes);

    let mut label = Vec::with_capacity(rounds);
    let writes_before = initial_writes;
    for round in 0..rounds {
        let edge = round % 2 == 0;
        // A merge patch: `null` removes the label.
        let patch = json!({ "metadata": { "labels": role_labels(edge) } });
        let path = format!("/api/v1/nodes/{TOGGLED}");
        label.push(timed(
            || api(&server, "PATCH", &path, Some((MERGE, &patch.to_string()))),
            || Ok(maps.lookup_edge_node(TOGGLED_IP)? == edge),
        )?);
    }
    let writes_after = quiet(&metrics.map_writes);
    let label_writes = writes_after - writes_before;

    let mut config_map = Vec::with_capacity(rounds);
    let writes_before = writes_after;
    for round in 0..rounds {
        let (new, old) = if round % 2 == 0 { (9100, 9101) } else { (9101, 9100) };
        let patch = json!({ "data": { "dnat-ports-pair": format!("{new}=10264") } });
        config_map.push(timed(
            || api(&server, "PATCH", CM_PATH, Some((MERGE, &patch.to_string()))),
            || Ok(maps.lookup_port_rule(new)?.is_some() && maps.lookup_port_rule(old)?.is_none()),
        )?);
    }
    let rule_writes = quiet(&metrics.map_writes) - writes_before;
    drop(driver);

    let nodes = edge_nodes() + cloud_nodes() + 1;
    let mut out = String::new();
    let _ = writeln!(out, "\n### Cluster change → tunnel DNAT map ({rounds} rounds each, {nodes} nodes)\n");
    let _ = writeln!(out, "Machine: {}\n", machine());
    let _ = writeln!(
        out,
        "| change | edit start → BPF map, ms median (min–max) | in the map before the edit command returned | \
         map entries written per change | yurt-tunnel (iptables resync, cited, not run), ms |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for (what, times, writes) in [
        ("node label edge ↔ cloud", &label, label_writes),
        ("ConfigMap `dnat-ports-pair` edit", &config_map, rule_writes),
    ] {
        let mut from_edit: Vec<Duration> = times.iter().map(|r| r.from_edit).collect();
        let early = times.iter().filter(|r| r.before_answer).count();
        let _ = writeln!(
            out,
            "| {what} | {} | {early}/{} | {:.1} | up to 15 000–60 000 (next resync) |",
            summary(&mut from_edit),
            times.len(),
            writes as f64 / rounds as f64
        );
    }
    let _ = writeln!(
        out,
        "\nFirst lists of {nodes} nodes and the ConfigMap folded and written ({initial_writes} map entries) {} ms \
         after the driver started.",
        ms(settled.from_edit)
    );
    print!("{out}");
    Ok(())
}
