//! `cargo xtask bench pods` (issue 24): how long a pod takes from its
//! creation to Running, and to its first successful ping across nodes,
//! with netd-ipam behind Debian's `bridge` plugin against `bridge` +
//! `host-local` (the anchor), on the same real kubelets; the netd pod's
//! memory on every node with the pods running; the image's size.
//!
//! One [`RealCluster`] (a cloud node and two edge nodes, real kubelets
//! 1.20.2 and Debian's containerd, see `netd::testing`), `deploy/` applied
//! as the book's install steps say (tunnel credentials first), every
//! DaemonSet and node Ready. A target pod runs on edge-2; every round
//! creates [`PODS`] pods on edge-1 at once (one `kubectl create` of a List;
//! the scheduler places them by `nodeSelector`), each pinging the target
//! in a loop until one reply comes back, then logging when (and when its
//! shell started, and how many pings went unanswered). Rounds run in
//! mirrored triples, ABC CBA (netd-ipam, host-local, hostNetwork, then
//! back): in the first runs, alternating ABAB, later rounds came out
//! slower, which plain alternation charges to the variant that goes second.
//!
//! - **netd-ipam**: the conflist the netd DaemonSet installed
//!   (`10-netd.conflist`: `bridge` cni0 + `netd-ipam`, then `portmap`).
//! - **host-local**: a conflist that sorts before it
//!   ([`HOST_LOCAL_CONFLIST`]) with the same plugins and settings, IPAM
//!   `host-local` on edge-1's pod CIDR restricted to `.150`–`.250` (netd-ipam
//!   hands out addresses round robin from the bottom, so the two never meet)
//!   and its own data directory; containerd uses the first conflist in name
//!   order and reloads when the directory changes. Written before the round,
//!   removed after it.
//! - **hostNetwork** (the floor): the same pods with `hostNetwork: true`,
//!   so containerd calls no CNI plugin at all; they ping the target from
//!   edge-1's own network namespace, over the same flannel.1 route. What
//!   is left is the kubelet and containerd starting 20 containers.
//!
//! Which configuration served each pod is checked, not assumed: libcni's
//! result cache on the node (`/var/lib/cni/results`) names the network of
//! every pod's ADD (`cbr0` or [`HOST_LOCAL_NETWORK`]), and the address must
//! lie in the range that network hands out. A probe pod before each round
//! also waits out containerd's reload.
//!
//! Clocks: create → Running is the time from just before `kubectl create`
//! starts to the first watch event (`kubectl get -w`, one process for the
//! round) showing the pod Running; millisecond resolution, but the kubelet
//! itself notices a started container with its 1 s PLEG relist, in both
//! rounds alike. Create → ping compares the pod's `/proc/uptime` when its
//! ping succeeded (busybox's `date` has no `%N`: whole seconds only) with
//! `CLOCK_BOOTTIME` here before the create: the same kernel clock, 10 ms
//! resolution.
//!
//! What the figures mostly show: create → Running climbs evenly, about
//! 0.4 s a pod, in both rounds alike: the pace of the kubelet's API
//! client writing pod statuses (default `--kube-api-qps` 5; two status
//! patches a pod would make 20 pods ≈ 8 s, as measured), not of the CNI
//! call. The first ping comes seconds earlier, within tens of milliseconds
//! of the container's shell starting and without an unanswered ping: the
//! network is ready when the container starts, so create → ping is the
//! sandbox and container start (CNI ADD included) of 20 pods at once. Its
//! medians move by a second and more from round to round of one variant,
//! far above the IPAM's few milliseconds (`cargo xtask bench cni`).

use std::collections::BTreeMap;
use std::io::BufReader;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netd::testing::{self, RealCluster, RealNode, NETD_IMAGE_ENV, WORKLOAD_IMAGE};
use serde_json::{json, Value};

use crate::bench::{machine, percentile, Scale};

/// Pods created at once per round.
pub const PODS: usize = 20;

/// [`PODS`], or a few in a smoke run.
fn pods() -> usize {
    Scale::sized(PODS, 3)
}
/// The node every round's pods run on, and the node of the target they ping.
const NODE: &str = "edge-1";
const TARGET_NODE: &str = "edge-2";
const NS: &str = "kube-system";
/// The anchor's conflist: sorts before `10-netd.conflist`, so containerd
/// takes it while it is there.
const HOST_LOCAL_CONFLIST: &str = "05-bench-host-local.conflist";
const HOST_LOCAL_NETWORK: &str = "bench-host-local";
/// The network name of netd's conflist (flannel's).
const NETD_NETWORK: &str = "cbr0";
/// The anchor's addresses: `.150`–`.250` of the node's pod CIDR.
const HOST_LOCAL_RANGE: (u32, u32) = (150, 250);
/// Long enough for a first start of every DaemonSet on two shared cores.
const SLOW: Duration = Duration::from_secs(180);
/// The longest one round's pods may take to run and ping.
const ROUND_LIMIT: Duration = Duration::from_secs(180);
/// Quiet time between rounds, so one round's teardown does not load the
/// next one's start.
const SETTLE: Duration = Duration::from_secs(5);

/// The two CNI configurations compared, and the floor without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    NetdIpam,
    HostLocal,
    HostNetwork,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::NetdIpam => "netd-ipam",
            Variant::HostLocal => "host-local",
            Variant::HostNetwork => "hostNetwork",
        }
    }

    /// The network name libcni caches each ADD under (none for
    /// hostNetwork pods: no CNI call).
    fn network(self) -> &'static str {
        match self {
            Variant::NetdIpam => NETD_NETWORK,
            Variant::HostLocal => HOST_LOCAL_NETWORK,
            Variant::HostNetwork => "none",
        }
    }
}

/// What one round measured.
struct Round {
    variant: Variant,
    /// Per pod: create → first seen Running.
    running: Vec<Duration>,
    /// Per pod: create → its shell started, create → first ping reply, and
    /// how many pings went unanswered before it.
    started: Vec<Duration>,
    pinged: Vec<Duration>,
    failed: Vec<u32>,
}

/// What one pod logged once its ping was answered.
struct Pinged {
    /// Since the create: its shell started, its ping was answered.
    started: Duration,
    replied: Duration,
    /// Pings without an answer before that.
    failed: u32,
}

/// The netd container's memory on one node (bytes).
struct Memory {
    node: String,
    /// `workingSetBytes` of the kubelet's summary API, if it has it.
    summary: Option<u64>,
    /// The working set from the container's memory cgroup.
    cgroup: u64,
    /// The process's resident set (file pages of the binary included,
    /// which the cgroup may not be charged for).
    rss: u64,
}

/// Runs `pairs` mirrored triples of rounds (netd-ipam, host-local and
/// hostNetwork, ABC CBA) on one real cluster and prints the side-by-side
/// table.
pub fn run(pairs: usize) -> Result<()> {
    let Some(_kernel) = testing::privileged()? else { bail!("the pods benchmark needs root") };
    let builder = RealCluster::builder();
    if !builder.available()? {
        bail!("the pods benchmark needs kubelet, kube-scheduler, containerd and the images (see above)");
    }
    println!("machine: {}", machine());
    let image = testing::netd_image_path();
    let image_size = std::fs::metadata(&image)
        .with_context(|| format!("{} (set {NETD_IMAGE_ENV} or run `cargo xtask image`)", image.display()))?
        .len();
    let started = Instant::now();
    let cluster = builder.start()?;
    println!("cluster up (cloud-1, edge-1, edge-2) in {:.1} s", started.elapsed().as_secs_f64());
    let deployed = Instant::now();
    cluster.deploy(&[], SLOW)?;
    println!("deploy/ applied, every DaemonSet and node Ready in {:.1} s", deployed.elapsed().as_secs_f64());

    let cidr = pod_cidr(&cluster, NODE)?;
    let target = start_target(&cluster)?;
    println!("{NODE}'s pod CIDR {}/{}; target pod on {TARGET_NODE} at {target}", cidr.0, cidr.1);
    let node = cluster.node(NODE)?;
    let intruders = Intruders::start();
    let mut rounds = Vec::new();
    let mut memory = None;
    let mut serial = 0;
    let mut noisy = false;
    for pair in 0..pairs {
        // ABBA: a drift over the run weighs on both variants alike (see
        // the module documentation).
        let order = if pair % 2 == 0 {
            [Variant::NetdIpam, Variant::HostLocal, Variant::HostNetwork]
        } else {
            [Variant::HostNetwork, Variant::HostLocal, Variant::NetdIpam]
        };
        for variant in order {
            serial += 1;
            if variant == Variant::HostLocal {
                write_host_local_conflist(node, cidr)?;
            }
            intruders.clear();
            let result = round(&cluster, node, variant, serial, cidr, target, &mut memory);
            let seen = intruders.seen();
            if !seen.is_empty() {
                noisy = true;
                println!("round {serial}: NOT ON A QUIET MACHINE: {} ran during it", seen.join(", "));
            }
            if variant == Variant::HostLocal {
                let path = node.host_path("/etc/cni/net.d").join(HOST_LOCAL_CONFLIST);
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
            rounds.push(result?);
            std::thread::sleep(SETTLE);
        }
    }
    report(&rounds, memory.as_deref().unwrap_or_default(), image_size, &image);
    if noisy {
        println!("\nWARNING: compilers ran beside some rounds (see above): rerun on a quiet machine");
    }
    println!("\nwhole run (cluster included) {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// One round: a probe pod (the configuration in force checked), then
/// [`PODS`] pods created at once and timed, the memory read while they run
/// (once, in the first netd-ipam round), and everything deleted again.
fn round(
    cluster: &RealCluster,
    node: &RealNode,
    variant: Variant,
    serial: usize,
    cidr: (Ipv4Addr, u8),
    target: Ipv4Addr,
    memory: &mut Option<Vec<Memory>>,
) -> Result<Round> {
    let tag = format!("r{serial}");
    let label = variant.label();
    // The probe: containerd has reloaded and this configuration serves.
    let probe = format!("bench-probe-{tag}");
    let probe_selector = format!("bench-probe={tag}");
    kubectl_create(
        cluster,
        &json!({"apiVersion": "v1", "kind": "List", "items": [pod(&probe, &[("bench-probe", &tag)], NODE, variant, "exec sleep 3600")]}),
    )?;
    let ip = wait_until(&format!("probe {probe} Running"), ROUND_LIMIT, || {
        Ok(pods_running(cluster, &probe_selector)?.remove(&probe))
    })?;
    check_network(node, &probe, ip, variant, cidr)?;
    delete_and_wait(cluster, node, &probe_selector)?;

    let selector = format!("bench-round={tag}");
    let names: Vec<String> = (0..pods()).map(|i| format!("bench-{tag}-{i:02}")).collect();
    // The loop ends at the first reply; /proc/uptime (read by the shell,
    // no fork) is the kernel's CLOCK_BOOTTIME in centiseconds. When the
    // shell started and how many pings went unanswered tell the container's
    // start apart from the network's readiness.
    let script = format!(
        "read s _ </proc/uptime; n=0; until ping -c1 -W1 {target} >/dev/null; do n=$((n+1)); done; \
         read up _ </proc/uptime; echo PINGED $up STARTED $s FAILED $n; exec sleep 3600"
    );
    let list: Vec<Value> = names.iter().map(|n| pod(n, &[("bench-round", &tag)], NODE, variant, &script)).collect();
    let mut watch = Watch::start(cluster, &selector)?;
    // kubectl's own start-up out of the timed window (the watch lists, then
    // watches from that list: nothing is missed either way).
    std::thread::sleep(Duration::from_secs(1));
    let created = boottime()?;
    kubectl_create(cluster, &json!({"apiVersion": "v1", "kind": "List", "items": list}))?;
    let running = watch.until_running(&names, created, ROUND_LIMIT);
    watch.stop();
    let running = running.with_context(|| format!("round {serial} ({label})"))?;
    let ips = pods_running(cluster, &selector)?;
    let pods = pods();
    ensure!(ips.len() == pods, "round {serial} ({label}): {} of {pods} pods Running", ips.len());
    for (name, ip) in &ips {
        check_network(node, name, *ip, variant, cidr)?;
    }
    let pinged = wait_pinged(node, &names, created)?;
    if variant == Variant::NetdIpam && memory.is_none() {
        *memory = Some(netd_memory(cluster)?);
    }
    let (low, high) = (ips.values().min().copied(), ips.values().max().copied());
    delete_and_wait(cluster, node, &selector)?;
    let running: Vec<Duration> = names.iter().map(|n| running[n]).collect();
    let started: Vec<Duration> = names.iter().map(|n| pinged[n].started).collect();
    let failed: Vec<u32> = names.iter().map(|n| pinged[n].failed).collect();
    let pinged: Vec<Duration> = names.iter().map(|n| pinged[n].replied).collect();
    println!(
        "round {serial} {label}: {pods} pods, addresses {}–{} ({} network); → Running p50 {} ms [{}–{}], \
         → shell started p50 {} ms [{}–{}], → ping p50 {} ms [{}–{}]; {} pods had unanswered pings ({} in all)",
        low.map(|ip| ip.to_string()).unwrap_or_default(),
        high.map(|ip| ip.to_string()).unwrap_or_default(),
        variant.network(),
        ms(median(&running)),
        ms(min(&running)),
        ms(max(&running)),
        ms(median(&started)),
        ms(min(&started)),
        ms(max(&started)),
        ms(median(&pinged)),
        ms(min(&pinged)),
        ms(max(&pinged)),
        failed.iter().filter(|&&n| n > 0).count(),
        failed.iter().sum::<u32>(),
    );
    Ok(Round { variant, running, started, pinged, failed })
}

/// Compilers (another build sharing the two cores) and another test
/// cluster's processes (a killed test's pods live on until a sweep kills
/// them) seen while the rounds run, sampled every 250 ms on a thread of
/// their own: a run that shares the machine says so instead of passing off
/// their load as the cluster's.
pub(crate) struct Intruders {
    /// The most processes of each name seen at once since the last clear.
    seen: std::sync::Arc<std::sync::Mutex<BTreeMap<String, usize>>>,
}

impl Intruders {
    /// The prefix of the harness's names (cgroups, namespaces): `netd-t-<pid>-`.
    const NAME_PREFIX: &'static str = "netd-t-";

    /// Process names that mean a build is running.
    const NAMES: [&'static str; 6] = ["rustc", "cc1", "cc1plus", "ld", "compile", "link"];

    pub(crate) fn start() -> Self {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let shared = std::sync::Arc::downgrade(&seen);
        // Ends once the benchmark drops its handle.
        std::thread::spawn(move || {
            while let Some(seen) = shared.upgrade() {
                let now = Self::running();
                if let Ok(mut seen) = seen.lock() {
                    for (name, count) in now {
                        let most = seen.entry(name).or_insert(0);
                        *most = (*most).max(count);
                    }
                }
                drop(seen);
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        Self { seen }
    }

    /// Compiler processes running now by name, and processes in another
    /// test's node cgroups (`netd-t-<its pid>-…`) by that test.
    fn running() -> BTreeMap<String, usize> {
        let mut found = BTreeMap::new();
        let ours = format!("{}{}-", Self::NAME_PREFIX, std::process::id());
        for entry in std::fs::read_dir("/sys/fs/cgroup/pids").into_iter().flatten().filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(owner) = name.strip_prefix(Self::NAME_PREFIX).and_then(|rest| rest.split('-').next()) else {
                continue;
            };
            if name.starts_with(&ours) {
                continue;
            }
            let count: usize = std::fs::read_to_string(entry.path().join("pids.current"))
                .ok()
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
            if count > 0 {
                *found.entry(format!("processes of test {owner}'s cluster")).or_insert(0) += count;
            }
        }
        for entry in std::fs::read_dir("/proc").into_iter().flatten().filter_map(|e| e.ok()) {
            let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else { continue };
            let comm = comm.trim();
            if Self::NAMES.contains(&comm) {
                *found.entry(comm.to_string()).or_insert(0) += 1;
            }
        }
        found
    }

    pub(crate) fn clear(&self) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.clear();
        }
    }

    /// What ran since [`Intruders::clear`]: `name ×most at once`.
    pub(crate) fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.iter().map(|(name, n)| format!("{name} ×{n}")).collect()).unwrap_or_default()
    }
}

/// A pod pinned to `node` by `nodeSelector` (the scheduler still places
/// it), running `script` in the workload image; no token, 0 s grace; in
/// the node's own network namespace for [`Variant::HostNetwork`].
fn pod(name: &str, labels: &[(&str, &str)], node: &str, variant: Variant, script: &str) -> Value {
    let labels: serde_json::Map<String, Value> = labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 0,
            "nodeSelector": {"kubernetes.io/hostname": node},
            "containers": [{
                "name": "bench",
                "image": WORKLOAD_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", script]
            }]
        }
    });
    if variant == Variant::HostNetwork {
        pod["spec"]["hostNetwork"] = json!(true);
    }
    pod
}

/// The pod on [`TARGET_NODE`] every round pings; its address.
fn start_target(cluster: &RealCluster) -> Result<Ipv4Addr> {
    let target = pod("bench-target", &[("bench-target", "yes")], TARGET_NODE, Variant::NetdIpam, "exec sleep 36000");
    kubectl_create(cluster, &json!({"apiVersion": "v1", "kind": "List", "items": [target]}))?;
    wait_until("the target pod Running", SLOW, || Ok(pods_running(cluster, "bench-target=yes")?.remove("bench-target")))
}

/// `kubectl get pods -w -o json` for one round's pods, its objects read on
/// a thread of their own and stamped with [`boottime`] as they arrive.
struct Watch {
    child: Child,
    events: mpsc::Receiver<(Duration, Value)>,
}

impl Watch {
    fn start(cluster: &RealCluster, selector: &str) -> Result<Self> {
        // Spawned on this thread: it dies with the thread that owns the
        // cluster, as the harness's children do.
        let mut child = cluster.kubectl_spawn(&["get", "pods", "-l", selector, "--watch", "-o", "json"])?;
        let stdout = child.stdout.take().context("kubectl's stdout")?;
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            let stream = serde_json::Deserializer::from_reader(BufReader::new(stdout)).into_iter::<Value>();
            for value in stream {
                let Ok(value) = value else { break };
                let Ok(now) = boottime() else { break };
                if tx.send((now, value)).is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, events })
    }

    /// Per pod of `names`: the time from `created` to the first event that
    /// shows it Running.
    fn until_running(
        &mut self,
        names: &[String],
        created: Duration,
        limit: Duration,
    ) -> Result<BTreeMap<String, Duration>> {
        let deadline = Instant::now() + limit;
        let mut running = BTreeMap::new();
        while running.len() < names.len() {
            let left = deadline.checked_duration_since(Instant::now()).unwrap_or_default();
            let (at, value) = match self.events.recv_timeout(left) {
                Ok(event) => event,
                Err(_) => bail!(
                    "{} of {} pods seen Running within {limit:?} (kubectl watch: {:?})",
                    running.len(),
                    names.len(),
                    self.child.try_wait()
                ),
            };
            // The first answer of a watch may be the initial list.
            let objects = if value.get("items").is_some() { items(&value).to_vec() } else { vec![value] };
            for object in objects {
                let name = object["metadata"]["name"].as_str().unwrap_or_default();
                if object["status"]["phase"] == "Running" && names.iter().any(|n| n == name) {
                    running.entry(name.to_string()).or_insert(at.saturating_sub(created));
                }
            }
        }
        Ok(running)
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Per pod of `names`: its line `PINGED <uptime> STARTED <uptime> FAILED
/// <n>`, times since `created`, from its container log on `node` (read from
/// the node's `/var/log/pods`, no kubectl per pod).
fn wait_pinged(node: &RealNode, names: &[String], created: Duration) -> Result<BTreeMap<String, Pinged>> {
    let logs = node.host_path("/var/log/pods");
    wait_until("every pod's first ping reply", ROUND_LIMIT, || {
        let mut pinged = BTreeMap::new();
        for entry in std::fs::read_dir(&logs)?.filter_map(|e| e.ok()) {
            let dir = entry.file_name().to_string_lossy().into_owned();
            // <namespace>_<pod>_<uid>/<container>/<restart>.log
            let Some(name) = dir.strip_prefix("default_").and_then(|rest| rest.rsplit_once('_')).map(|(n, _)| n) else {
                continue;
            };
            if !names.iter().any(|n| n == name) {
                continue;
            }
            let text = std::fs::read_to_string(entry.path().join("bench/0.log")).unwrap_or_default();
            if let Some(line) = text.lines().find_map(|l| l.split("PINGED ").nth(1)) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let [replied, "STARTED", started, "FAILED", failed] = fields.as_slice() else {
                    bail!("{name} logged {line:?}");
                };
                let since = |uptime: &str| -> Result<Duration> {
                    Ok(Duration::from_secs_f64(uptime.parse::<f64>()?).saturating_sub(created))
                };
                pinged.insert(
                    name.to_string(),
                    Pinged { started: since(started)?, replied: since(replied)?, failed: failed.parse()? },
                );
            }
        }
        Ok((pinged.len() == names.len()).then_some(pinged))
    })
}

/// Checks that libcni's result cache on `node` says `variant`'s network
/// served pod `name`'s ADD and that `ip` is in that network's range; for
/// a hostNetwork pod, that no network did and `ip` is the node's.
fn check_network(node: &RealNode, name: &str, ip: Ipv4Addr, variant: Variant, cidr: (Ipv4Addr, u8)) -> Result<()> {
    let results = node.host_path("/var/lib/cni/results");
    let mut networks = Vec::new();
    for entry in std::fs::read_dir(&results).with_context(|| format!("reading {}", results.display()))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else { continue };
        let Ok(cached) = serde_json::from_str::<Value>(&text) else { continue };
        let of_pod =
            cached["cniArgs"].as_array().into_iter().flatten().any(|arg| arg[0] == "K8S_POD_NAME" && arg[1] == name);
        // containerd sets up each sandbox's loopback through libcni too.
        if of_pod && cached["networkName"] != "cni-loopback" {
            networks.push(cached["networkName"].as_str().unwrap_or_default().to_string());
        }
    }
    let (low, high) = host_local_range(cidr);
    let in_anchor_range = (low..=high).contains(&ip);
    let in_cidr = u32::from(ip) >> (32 - cidr.1) == u32::from(cidr.0) >> (32 - cidr.1);
    let (range_ok, expected) = match variant {
        Variant::HostLocal => (in_anchor_range, vec![variant.network()]),
        Variant::NetdIpam => (in_cidr && !in_anchor_range, vec![variant.network()]),
        Variant::HostNetwork => (ip == node.ip, vec![]),
    };
    if networks != expected || !range_ok {
        bail!(
            "pod {name} should have been set up by the {} conflist (network {}): libcni's cache on {} says {networks:?}, \
             address {ip} ({} range {low}–{high}); containerd did not switch configurations",
            variant.label(),
            variant.network(),
            node.name,
            if in_anchor_range { "inside" } else { "outside" }
        );
    }
    Ok(())
}

/// The anchor's conflist on `node`: netd's conflist with host-local for
/// netd-ipam, written beside it and renamed into place (containerd loads
/// only `*.conflist`, never the half-written temporary).
fn write_host_local_conflist(node: &RealNode, cidr: (Ipv4Addr, u8)) -> Result<()> {
    let (start, end) = host_local_range(cidr);
    let gateway = Ipv4Addr::from(u32::from(cidr.0) + 1);
    let conflist = json!({
        "name": HOST_LOCAL_NETWORK,
        "cniVersion": "0.3.1",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "isDefaultGateway": true,
                "hairpinMode": true,
                "ipMasq": false,
                "mtu": 1450,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("{}/{}", cidr.0, cidr.1), "rangeStart": start.to_string(),
                                 "rangeEnd": end.to_string(), "gateway": gateway.to_string()}]],
                    "dataDir": "/var/lib/cni/networks-bench"
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    });
    let dir = node.host_path("/etc/cni/net.d");
    let temporary = dir.join(format!(".{HOST_LOCAL_CONFLIST}.tmp"));
    std::fs::write(&temporary, serde_json::to_vec_pretty(&conflist)?)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, dir.join(HOST_LOCAL_CONFLIST)).context("renaming the host-local conflist")?;
    Ok(())
}

/// `.150` and `.250` of a pod CIDR of at least 256 addresses.
fn host_local_range(cidr: (Ipv4Addr, u8)) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(cidr.0);
    (Ipv4Addr::from(base + HOST_LOCAL_RANGE.0), Ipv4Addr::from(base + HOST_LOCAL_RANGE.1))
}

fn pod_cidr(cluster: &RealCluster, node: &str) -> Result<(Ipv4Addr, u8)> {
    let cidr = cluster.pod_cidr(node)?;
    let std::net::IpAddr::V4(network) = cidr.network() else { bail!("pod CIDR {cidr}: not IPv4") };
    let len = cidr.prefix_len();
    ensure!((8..=24).contains(&len), "pod CIDR {cidr}: not between /8 and /24 (host-local's .150–.250 need a /24)");
    Ok((network, len))
}

/// Pods of `selector` in `default` that are Running with an address.
fn pods_running(cluster: &RealCluster, selector: &str) -> Result<BTreeMap<String, Ipv4Addr>> {
    let list = cluster.kubectl_json(&["get", "pods", "-l", selector])?;
    Ok(items(&list)
        .iter()
        .filter(|p| p["status"]["phase"] == "Running")
        .filter_map(|p| {
            let ip = p["status"]["podIP"].as_str()?.parse().ok()?;
            Some((p["metadata"]["name"].as_str()?.to_string(), ip))
        })
        .collect())
}

/// Deletes the pods of `selector` and waits until the API has none left
/// and no container of the `default` namespace runs on `node` any more
/// (the sandboxes stopped, so their CNI DEL ran). Grace 1 s, not a forced
/// 0: a forced delete drops the API objects at once and leaves the
/// teardown running into the next round.
fn delete_and_wait(cluster: &RealCluster, node: &RealNode, selector: &str) -> Result<()> {
    cluster.kubectl(&["delete", "pods", "-l", selector, "--grace-period=1", "--wait=false"])?;
    wait_until(&format!("pods {selector} gone"), ROUND_LIMIT, || {
        let gone = items(&cluster.kubectl_json(&["get", "pods", "-l", selector])?).is_empty();
        Ok((gone && default_tasks_running(node)? == 0).then_some(()))
    })
}

/// Running containerd tasks on `node` of pods in `default` (only the
/// benchmark's pods: the target runs on another node).
fn default_tasks_running(node: &RealNode) -> Result<usize> {
    let ours = node.ctr(&["containers", "list", "-q", "labels.\"io.kubernetes.pod.namespace\"==default"])?;
    let ours: Vec<&str> = ours.lines().filter(|l| !l.is_empty()).collect();
    let tasks = node.ctr(&["tasks", "list"])?;
    Ok(tasks
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.get(2) == Some(&"RUNNING")).then(|| fields[0])
        })
        .filter(|id| ours.contains(id))
        .count())
}

/// The netd container's memory on every node: the kubelet's summary API
/// (`stats/summary`, what `kubectl top` reads), the same computed here from
/// the container's memory cgroup as cAdvisor does (`memory.usage_in_bytes`
/// − `total_inactive_file`), and the process's VmRSS.
fn netd_memory(cluster: &RealCluster) -> Result<Vec<Memory>> {
    let pods = cluster.kubectl_json(&["-n", NS, "get", "pods", "-l", "app.kubernetes.io/name=netd"])?;
    let mut memory = Vec::new();
    for node in cluster.nodes() {
        let pod = items(&pods)
            .iter()
            .find(|p| p["spec"]["nodeName"] == node.name.as_str())
            .with_context(|| format!("no netd pod on {}", node.name))?;
        let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let summary = cluster.kubectl(&["get", "--raw", &format!("/api/v1/nodes/{}/proxy/stats/summary", node.name)]);
        let summary = summary.ok().and_then(|text| {
            let summary: Value = serde_json::from_str(&text).ok()?;
            let pod = summary["pods"].as_array()?.iter().find(|p| p["podRef"]["name"] == pod_name)?;
            let container = pod["containers"].as_array()?.iter().find(|c| c["name"] == "netd")?;
            container["memory"]["workingSetBytes"].as_u64()
        });
        let cgroup = container_memory_cgroup(node, pod)?;
        let usage: u64 = std::fs::read_to_string(cgroup.join("memory.usage_in_bytes"))?.trim().parse()?;
        let stat = std::fs::read_to_string(cgroup.join("memory.stat"))?;
        let inactive = stat
            .lines()
            .find_map(|l| l.strip_prefix("total_inactive_file "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let mut rss_kib = 0;
        for pid in std::fs::read_to_string(cgroup.join("cgroup.procs"))?.lines() {
            let pid: u32 = pid.trim().parse()?;
            rss_kib += crate::bench_rss::status_kib(pid, "VmRSS:")?;
        }
        memory.push(Memory {
            node: node.name.clone(),
            summary,
            cgroup: usage.saturating_sub(inactive),
            rss: rss_kib * 1024,
        });
    }
    Ok(memory)
}

/// The netd container's memory cgroup (v1) under the node's cgroup, found
/// by the container id.
fn container_memory_cgroup(node: &RealNode, pod: &Value) -> Result<std::path::PathBuf> {
    let id = pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "netd")
        .and_then(|c| c["containerID"].as_str())
        .and_then(|id| id.rsplit("://").next())
        .context("the netd pod has no container id")?
        .to_string();
    // The harness names a node's cgroup <netd-t-<pid>-<n>>-<node>, with
    // this process's pid.
    let prefix = format!("netd-t-{}-", std::process::id());
    let suffix = format!("-{}", node.name);
    let root = Path::new("/sys/fs/cgroup/memory");
    let own = std::fs::read_dir(root)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.starts_with(&prefix) && name.ends_with(&suffix)
        })
        .with_context(|| format!("no memory cgroup of {} under {}", node.name, root.display()))?;
    find_dir(&own, &id).with_context(|| format!("no cgroup {id} under {}", own.display()))
}

fn find_dir(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()) {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        if entry.file_name().to_string_lossy() == name {
            return Some(path);
        }
        if let Some(found) = find_dir(&path, name) {
            return Some(found);
        }
    }
    None
}

/// The side-by-side table, the memory and the image.
fn report(rounds: &[Round], memory: &[Memory], image_size: u64, image: &Path) {
    let pooled = |variant: Variant, pick: fn(&Round) -> &Vec<Duration>| -> Vec<Duration> {
        let mut all: Vec<Duration> =
            rounds.iter().filter(|r| r.variant == variant).flat_map(|r| pick(r).clone()).collect();
        all.sort();
        all
    };
    let order: Vec<&str> = rounds.iter().map(|r| r.variant.label()).collect();
    let samples = pooled(Variant::NetdIpam, |r| &r.running).len();
    let pods = pods();
    println!(
        "\n{pods} pods at once on {NODE} per round, rounds in this order: {}; {samples} samples per variant pooled. \
         Same kubelets, same bridge plugin settings (cni0, mtu 1450, hairpin, portmap after it); only the IPAM differs; \
         the hostNetwork pods (the floor) use no CNI at all. \
         Times from just before `kubectl create` (ms); p99 of {samples} samples is their maximum.\n",
        order.join(", ")
    );
    println!(
        "| metric | netd-ipam p50 [min–max] | host-local (anchor) p50 [min–max] | hostNetwork (floor) p50 [min–max] | netd ÷ host-local | netd ÷ floor |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    let spread = |samples: &[Duration]| format!("{} [{}–{}]", ms(median(samples)), ms(min(samples)), ms(max(samples)));
    for (metric, pick) in [
        ("pod create → Running", (|r: &Round| &r.running) as fn(&Round) -> &Vec<Duration>),
        ("pod create → its shell started (pod's /proc/uptime)", |r: &Round| &r.started),
        ("pod create → first cross-node ping", |r: &Round| &r.pinged),
    ] {
        let (ours, anchor, floor) =
            (pooled(Variant::NetdIpam, pick), pooled(Variant::HostLocal, pick), pooled(Variant::HostNetwork, pick));
        println!(
            "| {metric} | {} | {} | {} | {:.2}× | {:.2}× |",
            spread(&ours),
            spread(&anchor),
            spread(&floor),
            ratio(median(&ours), median(&anchor)),
            ratio(median(&ours), median(&floor))
        );
        let p99 = |samples: &[Duration]| percentile(samples, 0.99);
        println!(
            "| {metric}, p99 | {} | {} | {} | {:.2}× | {:.2}× |",
            ms(p99(&ours)),
            ms(p99(&anchor)),
            ms(p99(&floor)),
            ratio(p99(&ours), p99(&anchor)),
            ratio(p99(&ours), p99(&floor))
        );
    }
    // Shell start → first reply per pod: the network's share, without the
    // container's start.
    let gap = |variant: Variant| -> Vec<Duration> {
        let mut gaps: Vec<Duration> = rounds
            .iter()
            .filter(|r| r.variant == variant)
            .flat_map(|r| r.pinged.iter().zip(&r.started).map(|(p, s)| p.saturating_sub(*s)))
            .collect();
        gaps.sort();
        gaps
    };
    let (ours, anchor, floor) = (gap(Variant::NetdIpam), gap(Variant::HostLocal), gap(Variant::HostNetwork));
    println!(
        "| shell started → first cross-node ping | {} | {} | {} | {:.2}× | {:.2}× |",
        spread(&ours),
        spread(&anchor),
        spread(&floor),
        ratio(median(&ours), median(&anchor)),
        ratio(median(&ours), median(&floor))
    );
    let unanswered = |variant: Variant| {
        let failed: Vec<u32> = rounds.iter().filter(|r| r.variant == variant).flat_map(|r| r.failed.clone()).collect();
        format!(
            "{} of {} pods ({} pings)",
            failed.iter().filter(|&&n| n > 0).count(),
            failed.len(),
            failed.iter().sum::<u32>()
        )
    };
    println!(
        "| pods with unanswered pings before the first reply | {} | {} | {} | | |",
        unanswered(Variant::NetdIpam),
        unanswered(Variant::HostLocal),
        unanswered(Variant::HostNetwork)
    );
    let by_round: Vec<String> =
        rounds.iter().map(|r| format!("{} {}", r.variant.label(), ms(median(&r.pinged)))).collect();
    println!(
        "
first-ping p50 by round, in order (ms): {}",
        by_round.join(", ")
    );
    let mib = |bytes: u64| format!("{:.1}", bytes as f64 / (1024.0 * 1024.0));
    println!(
        "\ncreate → Running rises evenly (≈0.4 s a pod) in every round, as the kubelet's API client \
         (default --kube-api-qps 5) paces its status writes; the first ping shows the network path earlier."
    );
    println!("\nnetd pod (container `netd`) with {pods} pods running on {NODE} (MiB):\n");
    println!("| node | working set, kubelet stats/summary | working set, memory cgroup (usage − inactive_file) | VmRSS of the process |");
    println!("| --- | ---: | ---: | ---: |");
    for m in memory {
        let summary = m.summary.map(mib).unwrap_or_else(|| "— (no container stats)".into());
        println!("| {} | {summary} | {} | {} |", m.node, mib(m.cgroup), mib(m.rss));
    }
    println!(
        "\nimage {}: {:.1} MiB (docker-save archive, uncompressed)",
        image.display(),
        image_size as f64 / (1024.0 * 1024.0)
    );
    println!("machine: {}", machine());
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after
/// `limit` naming `what` and the last error.
fn wait_until<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        let last = match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => String::new(),
            Err(err) => format!(" (last error: {err:#})"),
        };
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}{last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `kubectl create -f` of `object` (a List: one kubectl, one request per item).
fn kubectl_create(cluster: &RealCluster, object: &Value) -> Result<()> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), object.to_string())?;
    cluster.kubectl(&["create", "-f", &file.path().to_string_lossy()])?;
    Ok(())
}

fn items(list: &Value) -> &[Value] {
    list["items"].as_array().map(Vec::as_slice).unwrap_or_default()
}

/// The kernel's `CLOCK_BOOTTIME`: what `/proc/uptime` shows inside pods.
fn boottime() -> Result<Duration> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `ts`, which outlives the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ensure!(rc == 0, "clock_gettime(CLOCK_BOOTTIME): {}", std::io::Error::last_os_error());
    Ok(Duration::new(u64::try_from(ts.tv_sec)?, u32::try_from(ts.tv_nsec)?))
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    percentile(&sorted, 0.5)
}

fn min(samples: &[Duration]) -> Duration {
    samples.iter().copied().min().unwrap_or_default()
}

fn max(samples: &[Duration]) -> Duration {
    samples.iter().copied().max().unwrap_or_default()
}

/// Whole milliseconds: the clocks here resolve 10 ms at best.
fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}
