//! `cargo xtask bench hub`: the edge hub (`netd hub`, release binary) between a
//! node's kubelet and a real kube-apiserver 1.20.2 (Node,RBAC authorization and
//! NodeRestriction, on loopback, same machine), the client holding the node's
//! own certificate (`system:node:edge-1`). One run measures, side by side:
//!
//! 1. **Memory and disk with 100 pods' objects.** The Node `edge-1` and 100
//!    pods bound to it (in 4 namespaces), each mounting a ConfigMap (~1 KiB)
//!    and a Secret of its own and holding a Running status as a kubelet would
//!    have written it; 100 more pods on `edge-2`, with their own ConfigMaps
//!    and Secrets, as noise the hub must not cache; 2 Services with their
//!    Endpoints per namespace. The hub (`--cache=true`) is driven the way a
//!    kubelet 1.20 reads at start (kube-rs through the hub, as the node):
//!    list (`resourceVersion=0`) + watch of its pods
//!    (`fieldSelector=spec.nodeName=edge-1`), get and list + watch of its
//!    Node, list + watch of all Services, and for every pod list + watch of
//!    its ConfigMap and its Secret by `fieldSelector=metadata.name=<name>` in
//!    the pod's namespace (the kubelet's default `Watch` strategy): 203
//!    watches held open, as the kubelet holds them. Once
//!    `netd_hub_cached_objects` reaches the expected count and
//!    `netd_hub_cached_bytes` stops moving: the hub's VmRSS and VmHWM
//!    (`/proc/<pid>/status`) idle before any object, with the objects cached
//!    and the watches open, and after the watches closed; the cache on disk
//!    per resource (files, bytes, blocks allocated, directories included)
//!    beside the floor: the same objects as compact JSON as kube-apiserver
//!    lists them (re-serialised by serde_json, as the hub writes them).
//!    The caching hub's VmRSS is sampled after every round of part 2 and 3
//!    too, to tell a plateau from growth.
//! 2. **Proxy overhead on a kubelet's list of its pods** (the 100): the
//!    kubelet's request (`fieldSelector=spec.nodeName=edge-1&limit=500&
//!    resourceVersion=0`) straight to kube-apiserver, through the caching
//!    hub, and through a second hub with `--cache=false` (pass-through). One
//!    curl per side and round keeps its connection alive and times every
//!    transfer; the first of each round pays the TLS handshake and is
//!    dropped. Rounds rotate the order of the sides so drift hits all alike;
//!    the table gives the median over rounds of each round's p50 and p99
//!    with the min–max, and the per-round ratio to the direct answer.
//! 3. **Offline**: kube-apiserver stopped (SIGKILL); once the hub's
//!    `netd_hub_cloud_reachable` is 0 the same list is answered from its
//!    cache, timed the same way: what the kubelet gets after a reboot without
//!    the cloud. Then the hub is restarted with the cloud still away (a
//!    reboot): how long until it serves, its first list (TLS included), and
//!    its memory after a round of lists.
//!
//! The hub's cache is in a temporary directory on the file system named in
//! the output (fsync costs what that disk costs). There is no anchor run
//! here (yurthub is not built in this tree): the floors are the direct
//! answer and the objects' own JSON.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures_util::StreamExt as _;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, WatchParams};
use netd::kube::KubeClient;
use netd::testing::{KubeApiServer, KubeCluster};
use serde_json::{json, Value};

use crate::bench::{machine, ms, paired, percentile, spread};
use crate::bench_rss::status_kib;

/// The node the hub serves, and the node whose objects are noise.
const NODE: &str = "edge-1";
const OTHER_NODE: &str = "edge-2";
/// Pods per node (each with a ConfigMap and a Secret of its own).
const PODS: usize = 100;
/// Namespaces the pods are spread over.
const NAMESPACES: usize = 4;
/// Services (each with its Endpoints) per namespace.
const SERVICES_PER_NAMESPACE: usize = 2;
/// The kubelet's list of its pods, as kubelet 1.20's reflector sends it.
const MY_PODS: &str = "/api/v1/pods?fieldSelector=spec.nodeName%3Dedge-1&limit=500&resourceVersion=0";
/// The node's client certificate's validity.
const DAY: Duration = Duration::from_secs(24 * 3600);
/// Requests in flight at once while setting up and driving (a kubelet
/// starts its pods' reflectors as it admits them, a few at a time).
const DRIVE_CONCURRENCY: usize = 8;
/// The longest one wait may take before the benchmark gives up.
const STEP_LIMIT: Duration = Duration::from_secs(120);

/// Runs the benchmark: `rounds` rounds of `per_round` lists per side, the
/// release `netd` from `bin_dir`.
pub fn run(rounds: usize, per_round: usize, bin_dir: &Path) -> Result<()> {
    let builder = KubeCluster::builder().rbac(true).node_restriction(true);
    if !builder.binaries_available()? {
        bail!("the hub benchmark needs kube-apiserver (`cargo xtask setup` builds it)");
    }
    for tool in ["curl", "kubectl"] {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output()?;
        ensure!(found.status.success(), "the hub benchmark needs {tool}");
    }
    ensure!(rounds >= 1 && per_round >= 2, "at least one round of two lists");
    println!("machine: {}", machine());
    // The machine may be shared (builds beside the run): its load, said.
    let load_at_start = load_average();
    let netd = bin_dir.join("netd");
    let mut cluster = builder.start()?;
    let dir = tempfile::tempdir()?;
    let cred = Cred::issue(cluster.api(), NODE, dir.path())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;

    // Both hubs before any object exists: their idle memory.
    let cache_dir = dir.path().join("hub-cache");
    let hub = HubProcess::start(&netd, cluster.api(), &cred, &cache_dir, "true", &dir.path().join("hub.log"))?;
    let plain = HubProcess::start(
        &netd,
        cluster.api(),
        &cred,
        &dir.path().join("plain-cache"),
        "false",
        &dir.path().join("plain.log"),
    )?;
    hub.wait_metric("netd_hub_cloud_reachable", 1.0)?;
    plain.wait_metric("netd_hub_cloud_reachable", 1.0)?;
    std::thread::sleep(Duration::from_secs(2));
    let hub_idle = hub.memory()?;
    let plain_idle = plain.memory()?;

    let started = Instant::now();
    let pods = populate(cluster.api())?;
    runtime.block_on(set_running(cluster.api(), &pods))?;
    println!(
        "created {} namespaces, 2 Nodes, 2 × {PODS} pods with a ConfigMap and a Secret each, {} Services and \
         Endpoints in {:.1} s",
        NAMESPACES,
        NAMESPACES * SERVICES_PER_NAMESPACE,
        started.elapsed().as_secs_f64()
    );

    // 1. The kubelet's first reads through the caching hub.
    let client = runtime.block_on(async {
        KubeClient::with_identity(&hub.url(""), &std::fs::read(hub.ca())?, &cred.cert_pem, &cred.key_pem)
            .context("a client as the node, through the hub")
    })?;
    let open = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    // kube-rs wants its client made inside the runtime.
    let watches = runtime.block_on(async { drive(client.client(), &pods, open.clone()).await })?;
    let drive_took = started.elapsed();
    let floor = Floor::read(cluster.api())?;
    let expected = floor.objects.len() as f64;
    hub.wait_settled(expected)?;
    let watching = open.load(Ordering::SeqCst);
    let hub_loaded = hub.memory()?;
    let disk = Disk::read(&cache_dir)?;
    ensure!(!disk.noise, "the hub cached an object of {OTHER_NODE}'s pods");
    for watch in &watches {
        watch.abort();
    }
    drop(watches);
    runtime.block_on(async { tokio::time::sleep(Duration::from_secs(3)).await });
    let hub_closed = hub.memory()?;
    println!(
        "the kubelet-like reads through the hub took {:.1} s ({} watches held open); cache settled at {expected} \
         objects",
        drive_took.as_secs_f64(),
        watching
    );

    // 2. The list of its pods: direct, caching hub, pass-through hub.
    let direct = Side::new("direct to kube-apiserver", cluster.api().url(), cluster.api().ca_cert_path());
    let caching = Side::new("through the hub, caching (`--cache=true`)", hub.url(""), hub.ca());
    let passing = Side::new("through the hub, `--cache=false` (pass-through)", plain.url(""), plain.ca());
    let mut sides = [direct, caching, passing];
    for side in &sides {
        side.check(&cred, PODS)?;
    }
    // The caching hub's memory after each round: whether lists keep adding to it.
    let mut online_rss = Vec::new();
    for round in 0..rounds {
        for i in 0..sides.len() {
            let side = &mut sides[(round + i) % 3];
            side.round(&cred, per_round)?;
        }
        online_rss.push(hub.memory()?.rss);
    }
    let hub_online = hub.memory()?;
    let plain_loaded = plain.memory()?;

    // 3. The cloud away: kube-apiserver stopped.
    cluster.api_mut().stop()?;
    hub.wait_metric("netd_hub_cloud_reachable", 0.0)?;
    let served_before = hub.metric("netd_hub_requests_served_offline_total")?;
    let mut offline = Side::new("through the hub, cloud away (from its cache)", hub.url(""), hub.ca());
    offline.check(&cred, PODS)?;
    let mut offline_rss = Vec::new();
    for _ in 0..rounds {
        offline.round(&cred, per_round)?;
        offline_rss.push(hub.memory()?.rss);
    }
    let served = hub.metric("netd_hub_requests_served_offline_total")? - served_before;
    ensure!(
        served >= (rounds * per_round) as f64,
        "only {served} of {} lists were answered offline",
        rounds * per_round
    );
    let hub_offline = hub.memory()?;
    let hub_log = dir.path().join("hub.log");
    drop(hub);
    // A reboot with the cloud away: the same cache, a new process.
    let started = Instant::now();
    let rebooted = HubProcess::start(&netd, cluster.api(), &cred, &cache_dir, "true", &hub_log)?;
    let serving_after = started.elapsed();
    let mut after_reboot = Side::new("restarted, cloud away", rebooted.url(""), rebooted.ca());
    let first = after_reboot.first_list(&cred)?;
    after_reboot.round(&cred, per_round)?;
    let rebooted_memory = rebooted.memory()?;

    let lists = rounds * per_round;
    let rows = [
        ("caching", "idle, nothing cached (started, cloud reachable)".to_string(), hub_idle),
        ("caching", format!("{PODS} pods' objects cached, the kubelet's {watching} watches open"), hub_loaded),
        ("caching", "the same, watches closed".to_string(), hub_closed),
        ("caching", format!("after {lists} timed lists of the pods online"), hub_online),
        ("caching", format!("after {lists} more offline (from its cache)"), hub_offline),
        ("caching", format!("restarted with the cloud away, after {per_round} lists"), rebooted_memory),
        ("`--cache=false`", "idle".to_string(), plain_idle),
        ("`--cache=false`", format!("after {lists} timed lists"), plain_loaded),
    ];
    report_memory(&rows, hub_idle, hub_loaded, hub_closed, watching);
    let list_mib = |rss: &[u64]| rss.iter().map(|kib| format!("{:.1}", mib(*kib))).collect::<Vec<_>>().join(", ");
    println!(
        "\nThe caching hub's VmRSS after each round of {per_round} lists, MiB: online {}; offline {}.",
        list_mib(&online_rss),
        list_mib(&offline_rss)
    );
    report_disk(&disk, &floor, &cache_dir);
    let [direct, caching, passing] = &sides;
    report_latency(&[direct, caching, passing, &offline], rounds, per_round);
    println!(
        "\nThe hub restarted with the cloud away (a reboot): serving (metrics up) {} ms after its start; \
         its first list of the {PODS} pods {} ms including the TLS handshake; then {} lists p50 {} ms, p99 {} \
         ms.",
        serving_after.as_millis(),
        ms(first),
        per_round - 1,
        ms(percentile(&after_reboot.rounds[0], 0.5)),
        ms(percentile(&after_reboot.rounds[0], 0.99)),
    );
    println!("\nLoad average (1, 5, 15 min) at the start: {load_at_start}; at the end: {}.", load_average());
    Ok(())
}

fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The node's client certificate: apart (curl) and as PEM (kube-rs).
struct Cred {
    cert: PathBuf,
    key: PathBuf,
    /// Certificate and key in one file, as the kubelet keeps them and the hub reads them.
    combined: PathBuf,
    cert_pem: String,
    key_pem: String,
}

impl Cred {
    fn issue(api: &KubeApiServer, node: &str, dir: &Path) -> Result<Self> {
        let issued = api.ca().issue_node(node, &[], DAY)?;
        let (cert_pem, key_pem) = (issued.cert_pem().to_string(), issued.key_pem().to_string());
        let (cert, key, combined) =
            (dir.join(format!("{node}.crt")), dir.join(format!("{node}.key")), dir.join(format!("{node}.pem")));
        std::fs::write(&cert, &cert_pem)?;
        std::fs::write(&key, &key_pem)?;
        std::fs::write(&combined, format!("{cert_pem}{key_pem}"))?;
        Ok(Self { cert, key, combined, cert_pem, key_pem })
    }
}

/// Loopback ports nothing listens on, all different (held until all are chosen).
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners: Vec<TcpListener> = (0..N).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// VmRSS and VmHWM, KiB.
#[derive(Clone, Copy)]
struct Memory {
    rss: u64,
    hwm: u64,
}

/// A `netd hub` process for edge-1; killed on drop.
struct HubProcess {
    child: Child,
    port: u16,
    metrics_port: u16,
    cache: PathBuf,
    log: PathBuf,
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HubProcess {
    /// Starts `netd hub` with `--cache=<cache>` and its cache in `cache_dir`,
    /// its log appended to `log`; waits for its metrics port.
    fn start(netd: &Path, api: &KubeApiServer, cred: &Cred, cache_dir: &Path, cache: &str, log: &Path) -> Result<Self> {
        let [port, metrics_port] = free_ports()?;
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = Command::new(netd)
            .arg("hub")
            .arg(format!("--node-name={NODE}"))
            .arg(format!("--server={}", api.url()))
            .arg(format!("--ca-file={}", api.ca_cert_path().display()))
            .arg(format!("--client-cert={}", cred.combined.display()))
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!("--metrics-listen=127.0.0.1:{metrics_port}"))
            .arg(format!("--cache-dir={}", cache_dir.display()))
            // Offline within a second of the API server's end, as the tests run it.
            .arg("--probe-interval=1s")
            .arg("--upstream-timeout=3s")
            .arg(format!("--cache={cache}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", netd.display()))?;
        let mut hub = Self { child, port, metrics_port, cache: cache_dir.to_path_buf(), log: log.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while hub.metrics().is_err() {
            if let Some(status) = hub.child.try_wait()? {
                bail!("netd hub exited with {status}: {}", hub.log_text());
            }
            ensure!(Instant::now() < deadline, "netd hub did not start: {}", hub.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(hub)
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// The hub's CA (its serving certificate's issuer).
    fn ca(&self) -> PathBuf {
        self.cache.join("pki/ca.crt")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn memory(&self) -> Result<Memory> {
        let pid = self.child.id();
        Ok(Memory { rss: status_kib(pid, "VmRSS:")?, hwm: status_kib(pid, "VmHWM:")? })
    }

    fn metrics(&self) -> Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.metrics_port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let (_, body) = text.split_once("\r\n\r\n").context("a metrics answer without a body")?;
        Ok(body.to_string())
    }

    /// The sample named exactly `name` (labels included); 0 when absent.
    fn metric(&self, name: &str) -> Result<f64> {
        let text = self.metrics()?;
        let value = text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' '));
        value.map_or(Ok(0.0), |v| v.trim().parse().with_context(|| format!("{name} {v:?}")))
    }

    fn wait_metric(&self, name: &str, want: f64) -> Result<()> {
        let started = Instant::now();
        while self.metric(name)? != want {
            ensure!(started.elapsed() < STEP_LIMIT, "{name} never became {want}:\n{}", self.metrics()?);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Waits until the cache holds `objects` objects and its bytes have not
    /// moved for a second (watch events of the last status writes applied).
    fn wait_settled(&self, objects: f64) -> Result<()> {
        let started = Instant::now();
        let mut last = (-1.0, -1.0);
        loop {
            let now = (self.metric("netd_hub_cached_objects")?, self.metric("netd_hub_cached_bytes")?);
            if now.0 == objects && now == last {
                return Ok(());
            }
            ensure!(
                started.elapsed() < STEP_LIMIT,
                "the cache did not settle at {objects} objects: {now:?}; log:\n{}",
                self.log_text()
            );
            last = now;
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// The namespace of pod `i` of either node.
fn namespace(i: usize) -> String {
    format!("edge-ns-{}", i % NAMESPACES)
}

/// A ConfigMap of about 1 KiB: an application's settings file.
fn config_map(ns: &str, name: &str, i: usize) -> Value {
    let settings: String = (0..24).map(|k| format!("  setting_{k:02}: value-{i:03}-{k:02}-abcdefghijklmn\n")).collect();
    json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": name, "namespace": ns },
            "data": { "app.yaml": format!("app:\n{settings}"), "mode": "edge" } })
}

/// A Secret with a password and a token.
fn secret(ns: &str, name: &str, i: usize) -> Value {
    json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": name, "namespace": ns }, "type": "Opaque",
            "stringData": { "password": format!("s3cret-{i:03}-xxxxxxxxxxxx"),
                            "token": format!("{i:064x}") } })
}

fn pod(ns: &str, name: &str, node: &str, config: &str, secret: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "labels": { "app": name, "tier": "edge" } },
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "app", "image": "registry.example/edge/app:1.4.2",
                "ports": [{ "containerPort": 8080, "name": "http" }],
                "env": [{ "name": "PASSWORD", "valueFrom": { "secretKeyRef": { "name": secret, "key": "password" } } }],
                "resources": { "requests": { "cpu": "50m", "memory": "64Mi" }, "limits": { "memory": "128Mi" } },
                "readinessProbe": { "httpGet": { "path": "/healthz", "port": 8080 }, "periodSeconds": 10 },
                "volumeMounts": [
                    { "name": "config", "mountPath": "/etc/app" },
                    { "name": "credentials", "mountPath": "/etc/credentials", "readOnly": true },
                ],
            }],
            "volumes": [
                { "name": "config", "configMap": { "name": config } },
                { "name": "credentials", "secret": { "secretName": secret } },
            ],
        },
    })
}

/// Creates everything (one `kubectl create` of a List); returns edge-1's
/// pods as (namespace, name).
fn populate(api: &KubeApiServer) -> Result<Vec<(String, String)>> {
    let mut items = Vec::new();
    for n in 0..NAMESPACES {
        let ns = namespace(n);
        items.push(json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } }));
        // ServiceAccount admission needs the pods' service account (no
        // controller-manager makes it here).
        items.push(json!({ "apiVersion": "v1", "kind": "ServiceAccount",
                           "metadata": { "name": "default", "namespace": ns } }));
        for s in 0..SERVICES_PER_NAMESPACE {
            let name = format!("svc-{s}");
            items.push(json!({ "apiVersion": "v1", "kind": "Service", "metadata": { "name": name, "namespace": ns },
                "spec": { "selector": { "tier": "edge" }, "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] } }));
            items.push(json!({ "apiVersion": "v1", "kind": "Endpoints", "metadata": { "name": name, "namespace": ns },
                "subsets": [{ "addresses": [{ "ip": format!("10.244.1.{}", 2 + s) }, { "ip": format!("10.244.2.{}", 2 + s) }],
                              "ports": [{ "name": "http", "port": 8080 }] }] }));
        }
    }
    for node in [NODE, OTHER_NODE] {
        items.push(json!({ "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": node, "labels": { "kubernetes.io/hostname": node, "kubernetes.io/os": "linux" } } }));
    }
    let mut mine = Vec::new();
    for (node, prefix) in [(NODE, "app"), (OTHER_NODE, "noise")] {
        for i in 0..PODS {
            let (ns, name) = (namespace(i), format!("{prefix}-{i:03}"));
            let (config, credentials) = (format!("{name}-config"), format!("{name}-secret"));
            items.push(config_map(&ns, &config, i));
            items.push(secret(&ns, &credentials, i));
            items.push(pod(&ns, &name, node, &config, &credentials));
            if node == NODE {
                mine.push((ns, name));
            }
        }
    }
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("objects.json");
    std::fs::write(&file, json!({ "apiVersion": "v1", "kind": "List", "items": items }).to_string())?;
    let out = api.kubectl(&["create", "-f", &file.display().to_string()])?;
    ensure!(out.status.success(), "kubectl create: {}", String::from_utf8_lossy(&out.stderr));
    Ok(mine)
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: String::new(),
        version: "v1".into(),
        api_version: "v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Gives edge-1's pods the status their kubelet would have written
/// (Running, addresses, conditions, a container status): the pods the hub
/// caches are then the size they are on a live node.
async fn set_running(api: &KubeApiServer, pods: &[(String, String)]) -> Result<()> {
    let client = KubeClient::new(&api.kube_config("bench-admin")?)?.client();
    let ar = resource("Pod", "pods");
    let at = "2024-05-01T10:00:00Z";
    let patches = pods.iter().enumerate().map(|(i, (ns, name))| {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        let condition = |kind: &str| json!({ "type": kind, "status": "True", "lastProbeTime": null, "lastTransitionTime": at });
        let status = json!({ "status": {
            "phase": "Running",
            "hostIP": "192.168.10.11",
            "podIP": format!("10.244.1.{}", 10 + i),
            "podIPs": [{ "ip": format!("10.244.1.{}", 10 + i) }],
            "startTime": at,
            "conditions": [condition("Initialized"), condition("Ready"), condition("ContainersReady"), condition("PodScheduled")],
            "containerStatuses": [{
                "name": "app", "ready": true, "started": true, "restartCount": 0,
                "image": "registry.example/edge/app:1.4.2",
                "imageID": format!("registry.example/edge/app@sha256:{:064x}", 7),
                "containerID": format!("containerd://{:064x}", i),
                "state": { "running": { "startedAt": at } }, "lastState": {},
            }],
        }});
        async move {
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .with_context(|| format!("the status of pod {ns}/{name}"))
                .map(|_| ())
        }
    });
    let results: Vec<Result<()>> =
        futures_util::stream::iter(patches).buffer_unordered(DRIVE_CONCURRENCY).collect().await;
    results.into_iter().collect()
}

/// A client-go reflector's start: a list (`resourceVersion=0`) of `api`'s
/// scope with `fields`, then a watch from the list's resourceVersion, held
/// open on a task of its own (counted in `open` while it lasts).
async fn reflect(
    api: Api<DynamicObject>,
    fields: Option<String>,
    open: Arc<AtomicUsize>,
) -> Result<tokio::task::JoinHandle<()>> {
    let mut list = ListParams::default().at("0");
    let mut watch = WatchParams::default().timeout(290);
    if let Some(fields) = &fields {
        list = list.fields(fields);
        watch = watch.fields(fields);
    }
    let listed = api.list(&list).await.with_context(|| format!("list {fields:?} through the hub"))?;
    let version = listed.metadata.resource_version.unwrap_or_default();
    let events = api.watch(&watch, &version).await.with_context(|| format!("watch {fields:?} through the hub"))?;
    open.fetch_add(1, Ordering::SeqCst);
    Ok(tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while events.next().await.is_some() {}
        open.fetch_sub(1, Ordering::SeqCst);
    }))
}

/// A kubelet's first reads through the hub, as the node: its Node, its
/// pods, the Services, and each pod's ConfigMap and Secret; the watches'
/// tasks (abort them to close the watches).
async fn drive(
    client: kube::Client,
    pods: &[(String, String)],
    open: Arc<AtomicUsize>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let nodes: Api<DynamicObject> = Api::all_with(client.clone(), &resource("Node", "nodes"));
    nodes.get(NODE).await.context("get of the Node through the hub")?;
    let mut watches = vec![
        reflect(nodes, Some(format!("metadata.name={NODE}")), open.clone()).await?,
        reflect(
            Api::all_with(client.clone(), &resource("Pod", "pods")),
            Some(format!("spec.nodeName={NODE}")),
            open.clone(),
        )
        .await?,
        reflect(Api::all_with(client.clone(), &resource("Service", "services")), None, open.clone()).await?,
    ];
    let (configs, secrets) = (resource("ConfigMap", "configmaps"), resource("Secret", "secrets"));
    let per_pod = pods.iter().flat_map(|(ns, name)| {
        [(&configs, format!("{name}-config")), (&secrets, format!("{name}-secret"))].map(|(ar, object)| {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, ar);
            reflect(api, Some(format!("metadata.name={object}")), open.clone())
        })
    });
    let started: Vec<Result<_>> =
        futures_util::stream::iter(per_pod).buffer_unordered(DRIVE_CONCURRENCY).collect().await;
    for watch in started {
        watches.push(watch?);
    }
    Ok(watches)
}

/// The objects the hub should hold, as kube-apiserver lists them to the
/// admin: (cache directory, namespace, name) → bytes of compact JSON.
struct Floor {
    objects: BTreeMap<(String, String, String), u64>,
}

impl Floor {
    fn read(api: &KubeApiServer) -> Result<Self> {
        let mut objects = BTreeMap::new();
        // ConfigMaps and Secrets: only those of edge-1's pods (`app-*`), not the noise pods'.
        let mine =
            |o: &Value| o.pointer("/metadata/name").and_then(Value::as_str).is_some_and(|n| n.starts_with("app-"));
        let lists = [
            ("core_v1_pods", "/api/v1/pods?fieldSelector=spec.nodeName%3Dedge-1", false),
            ("core_v1_configmaps", "/api/v1/configmaps", true),
            ("core_v1_secrets", "/api/v1/secrets", true),
            ("core_v1_nodes", "/api/v1/nodes?fieldSelector=metadata.name%3Dedge-1", false),
            ("core_v1_services", "/api/v1/services", false),
        ];
        for (dir, path, only_mine) in lists {
            let (status, body) = api.api("GET", path, None)?;
            ensure!(status == 200, "GET {path}: HTTP {status}: {body}");
            let list: Value = serde_json::from_str(&body)?;
            let items = list["items"].as_array().map(Vec::as_slice).unwrap_or_default();
            for item in items.iter().filter(|o| !only_mine || mine(o)) {
                objects.insert(identity(dir, item), serde_json::to_vec(item)?.len() as u64);
            }
        }
        ensure!(
            objects.len() == 1 + 3 * PODS + NAMESPACES * SERVICES_PER_NAMESPACE + 1,
            "{} objects to cache, not the Node, {PODS} pods with a ConfigMap and a Secret each, and the Services",
            objects.len()
        );
        Ok(Self { objects })
    }

    /// The floor's bytes of the objects in `dir` (all when `None`).
    fn bytes(&self, dir: Option<&str>) -> u64 {
        self.objects.iter().filter(|((d, _, _), _)| dir.is_none_or(|want| d == want)).map(|(_, bytes)| bytes).sum()
    }
}

fn identity(dir: &str, object: &Value) -> (String, String, String) {
    let field = |pointer: &str| object.pointer(pointer).and_then(Value::as_str).unwrap_or("").to_string();
    (dir.to_string(), field("/metadata/namespace"), field("/metadata/name"))
}

/// Files, bytes and allocated bytes of a tree.
#[derive(Default, Clone, Copy)]
struct Usage {
    files: u64,
    bytes: u64,
    /// `st_blocks × 512` of the files and of the directories (the tree's own included).
    allocated: u64,
}

impl Usage {
    fn of(path: &Path) -> Result<Self> {
        let mut usage = Self::default();
        let meta = std::fs::symlink_metadata(path)?;
        usage.allocated += meta.blocks() * 512;
        if meta.is_dir() {
            for entry in std::fs::read_dir(path)? {
                let inner = Self::of(&entry?.path())?;
                usage.files += inner.files;
                usage.bytes += inner.bytes;
                usage.allocated += inner.allocated;
            }
        } else {
            usage.files += 1;
            usage.bytes += meta.len();
        }
        Ok(usage)
    }

    fn add(self, other: Self) -> Self {
        Self {
            files: self.files + other.files,
            bytes: self.bytes + other.bytes,
            allocated: self.allocated + other.allocated,
        }
    }
}

/// The hub's cache on disk, per resource directory of `objects/`.
struct Disk {
    resources: BTreeMap<String, Usage>,
    objects: Usage,
    lists: Usage,
    raw: Usage,
    /// The cached objects' identities, to match against the floor.
    cached: Vec<(String, String, String)>,
    /// An object of the noise pods (or their ConfigMaps and Secrets) was cached.
    noise: bool,
}

impl Disk {
    fn read(cache: &Path) -> Result<Self> {
        let objects_dir = cache.join("objects");
        let mut resources = BTreeMap::new();
        let mut cached = Vec::new();
        let mut noise = false;
        for entry in std::fs::read_dir(&objects_dir)? {
            let dir = entry?.path();
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            resources.insert(name.clone(), Usage::of(&dir)?);
            for ns in std::fs::read_dir(&dir)? {
                for file in std::fs::read_dir(ns?.path())? {
                    let path = file?.path();
                    let bytes = std::fs::read(&path)?;
                    let payload =
                        netd::hub::store::decode(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    let object: Value = serde_json::from_slice(payload)?;
                    let id = identity(&name, &object);
                    noise |= id.2.starts_with("noise-");
                    cached.push(id);
                }
            }
        }
        let optional = |dir: &str| -> Result<Usage> {
            let path = cache.join(dir);
            if path.exists() {
                Usage::of(&path)
            } else {
                Ok(Usage::default())
            }
        };
        Ok(Self {
            resources,
            objects: Usage::of(&objects_dir)?,
            lists: optional("lists")?,
            raw: optional("raw")?,
            cached,
            noise,
        })
    }
}

/// The file system a path is on, as `stat -f` names it.
fn file_system(path: &Path) -> String {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// One way to the API and its timed lists, per round (sorted).
struct Side {
    label: &'static str,
    base: String,
    ca: PathBuf,
    rounds: Vec<Vec<Duration>>,
}

impl Side {
    fn new(label: &'static str, base: String, ca: PathBuf) -> Self {
        Self { label, base, ca, rounds: Vec::new() }
    }

    fn curl(&self, cred: &Cred) -> Command {
        let mut command = Command::new("curl");
        command.args(["-sS", "--noproxy", "*", "--max-time", "20", "--cacert"]).arg(&self.ca);
        command.arg("--cert").arg(&cred.cert).arg("--key").arg(&cred.key);
        command
    }

    /// One list, read: it holds exactly edge-1's `pods` pods.
    fn check(&self, cred: &Cred, pods: usize) -> Result<()> {
        let output = self.curl(cred).arg(format!("{}{MY_PODS}", self.base)).output()?;
        ensure!(output.status.success(), "{}: {}", self.label, String::from_utf8_lossy(&output.stderr));
        let list: Value = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("{}: {}", self.label, String::from_utf8_lossy(&output.stdout)))?;
        let items = list["items"].as_array().map(Vec::as_slice).unwrap_or_default();
        let on_node =
            items.iter().filter(|p| p.pointer("/spec/nodeName").and_then(Value::as_str) == Some(NODE)).count();
        ensure!(
            items.len() == pods && on_node == pods,
            "{}: {} pods listed, {on_node} of {NODE}; {pods} expected",
            self.label,
            items.len()
        );
        Ok(())
    }

    /// `count` lists over one kept-alive connection: each transfer's time,
    /// the first's included.
    fn times(&self, cred: &Cred, count: usize) -> Result<Vec<Duration>> {
        let mut command = self.curl(cred);
        command.args(["-w", "%{http_code} %{time_total}\n"]);
        let url = format!("{}{MY_PODS}", self.base);
        for _ in 0..count {
            command.args(["-o", "/dev/null"]).arg(&url);
        }
        let output = command.output()?;
        ensure!(output.status.success(), "{}: {}", self.label, String::from_utf8_lossy(&output.stderr));
        let text = String::from_utf8_lossy(&output.stdout);
        let mut times = Vec::with_capacity(count);
        for line in text.lines() {
            let (code, seconds) = line.split_once(' ').with_context(|| format!("curl printed {line:?}"))?;
            ensure!(code == "200", "{}: HTTP {code}", self.label);
            times.push(Duration::from_secs_f64(seconds.trim().parse()?));
        }
        ensure!(times.len() == count, "{}: {} transfers timed of {count}", self.label, times.len());
        Ok(times)
    }

    /// A round: `count` lists, the first (the TLS handshake's) dropped.
    fn round(&mut self, cred: &Cred, count: usize) -> Result<()> {
        let mut times = self.times(cred, count)?;
        times.remove(0);
        times.sort();
        self.rounds.push(times);
        Ok(())
    }

    /// The first list on a new connection, TLS handshake included.
    fn first_list(&self, cred: &Cred) -> Result<Duration> {
        Ok(self.times(cred, 1)?[0])
    }

    /// Each round's percentile `p`, in ms.
    fn per_round(&self, p: f64) -> Vec<f64> {
        self.rounds.iter().map(|times| percentile(times, p).as_secs_f64() * 1000.0).collect()
    }
}

fn report_memory(rows: &[(&str, String, Memory)], idle: Memory, loaded: Memory, closed: Memory, watching: usize) {
    println!("\n`netd hub` (release) memory, {NODE} with {PODS} pods ({PODS} more on {OTHER_NODE}), {}:\n", machine());
    println!("| hub | state | VmRSS MiB | VmHWM MiB |");
    println!("| --- | --- | ---: | ---: |");
    for (hub, state, m) in rows {
        println!("| {hub} | {state} | {:.1} | {:.1} |", mib(m.rss), mib(m.hwm));
    }
    // The hub keeps no object in memory (the cache is on disk): what the
    // objects add is what reading and writing them left in the heap.
    println!(
        "\nPer pod, (cached − idle) ÷ {PODS}: VmRSS {:.1} KiB with the {watching} watches open, {:.1} KiB once \
         they closed.",
        (loaded.rss as f64 - idle.rss as f64) / PODS as f64,
        (closed.rss as f64 - idle.rss as f64) / PODS as f64,
    );
}

fn report_disk(disk: &Disk, floor: &Floor, cache: &Path) {
    let kib = |bytes: u64| bytes as f64 / 1024.0;
    let ratio = |a: u64, b: u64| a as f64 / (b.max(1)) as f64;
    let missing = floor.objects.keys().filter(|id| !disk.cached.contains(id)).count();
    let extra = disk.cached.iter().filter(|id| !floor.objects.contains_key(*id)).count();
    println!(
        "\nThe hub's cache on disk ({} at {}), against the floor: the same objects as compact JSON as \
         kube-apiserver lists them ({} objects; {missing} of them not in the cache, {extra} cached objects not \
         among them):\n",
        file_system(cache),
        cache.display(),
        floor.objects.len()
    );
    println!(
        "| cache directory | files | bytes KiB | allocated KiB | JSON floor KiB | bytes ÷ floor | allocated ÷ floor |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (dir, usage) in &disk.resources {
        let floor_bytes = floor.bytes(Some(dir));
        println!(
            "| `objects/{dir}` | {} | {:.1} | {:.1} | {:.1} | {:.2}× | {:.2}× |",
            usage.files,
            kib(usage.bytes),
            kib(usage.allocated),
            kib(floor_bytes),
            ratio(usage.bytes, floor_bytes),
            ratio(usage.allocated, floor_bytes)
        );
    }
    let all = floor.bytes(None);
    let o = disk.objects;
    println!(
        "| `objects/` (directories included) | {} | {:.1} | {:.1} | {:.1} | {:.2}× | {:.2}× |",
        o.files,
        kib(o.bytes),
        kib(o.allocated),
        kib(all),
        ratio(o.bytes, all),
        ratio(o.allocated, all)
    );
    println!(
        "| `lists/` (one record per listed scope) | {} | {:.1} | {:.1} | | | |",
        disk.lists.files,
        kib(disk.lists.bytes),
        kib(disk.lists.allocated)
    );
    let data = o.add(disk.lists).add(disk.raw);
    println!(
        "| `objects/` + `lists/` + `raw/` | {} | {:.1} | {:.1} | {:.1} | {:.2}× | {:.2}× |",
        data.files,
        kib(data.bytes),
        kib(data.allocated),
        kib(all),
        ratio(data.bytes, all),
        ratio(data.allocated, all)
    );
    let per_pod_dirs = ["core_v1_pods", "core_v1_configmaps", "core_v1_secrets"];
    let per_pod =
        per_pod_dirs.iter().filter_map(|d| disk.resources.get(*d)).fold(Usage::default(), |sum, u| sum.add(*u));
    let per_pod_floor: u64 = per_pod_dirs.iter().map(|d| floor.bytes(Some(d))).sum();
    println!(
        "\nPer pod (its Pod, ConfigMap and Secret): {:.2} KiB of JSON, {:.2} KiB in cache files, {:.2} KiB \
         allocated; plus two list records ({:.2} KiB allocated per pod in `lists/`).",
        kib(per_pod_floor) / PODS as f64,
        kib(per_pod.bytes) / PODS as f64,
        kib(per_pod.allocated) / PODS as f64,
        kib(disk.lists.allocated) / PODS as f64,
    );
}

fn report_latency(sides: &[&Side], rounds: usize, per_round: usize) {
    println!(
        "\nThe kubelet's list of its {PODS} pods (`{MY_PODS}`; {PODS} more on {OTHER_NODE}), curl over one \
         kept-alive connection per side and round, {rounds} rounds × {per_round} lists (the first of each, \
         TLS, dropped), in ms, median over rounds (min–max), {}:\n",
        machine()
    );
    println!("| way | p50 ms | p99 ms | p50 ÷ direct | p99 ÷ direct |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let (direct_p50, direct_p99) = (sides[0].per_round(0.5), sides[0].per_round(0.99));
    for side in sides {
        let (p50, p99) = (side.per_round(0.5), side.per_round(0.99));
        println!(
            "| {} | {} | {} | {} | {} |",
            side.label,
            spread(&p50, 2),
            spread(&p99, 2),
            paired(&p50, &direct_p50),
            paired(&p99, &direct_p99)
        );
    }
    println!(
        "\nRatios pair round i of a side with round i of the direct way (the offline rounds ran after the online \
         ones, kube-apiserver stopped)."
    );
}
