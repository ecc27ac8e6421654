//! `cargo xtask bench autonomy`: how long `netd::controller::tolerations`
//! takes to rewrite the tolerations of every pod of a node once its
//! autonomy annotation is set, and to give them all back once it is
//! removed, with 1 000 pods on the node and a real kube-apiserver 1.20.2 on
//! loopback (same machine, so the API server's own work is in the figures).
//!
//! Each round: the annotation is patched onto the Node (the clock starts
//! before the request) and the clock stops when the controller has counted
//! every pod patched (the API server accepted each patch); a list then
//! checks that every pod carries (or no longer carries) the saved
//! tolerations. A first round warms up (watches listed, connections open)
//! and is not counted.
//!
//! The floor, interleaved with those rounds on the same API server: a plain
//! client sending the very patches the controller plans
//! (`tolerations::plan`, the same bodies without the resourceVersion
//! precondition), [`CONCURRENCY`] in flight, no watch, no Node patch, to
//! another 1 000 pods bound to a node name that has no Node object — pods
//! the running controller sees in its watch but never patches (it plans
//! only for pods of known nodes). Our time ÷ the floor's is what watching,
//! planning and the Node patch add to the writes themselves. The anchor
//! (OpenYurt's toleration rewrite) is not run here.
//!
//! Last, the memory of the real `netd-controller run` (release binary,
//! leader of its own Lease) on the same cluster, with [`EXTRA_NODES`] more
//! Node objects (1 000 in all; made through the API, no kubelets, each
//! with the status a kubelet reports: conditions, addresses, images):
//! VmRSS once it has listed the nodes and the 2 000 pods, after it has
//! rewritten the node's 1 000, and its peak; and, from kube-apiserver's
//! `/metrics`, how many Node LIST requests (pages of 100) its start cost
//! and how many Node watches it holds. Then an API blip: kube-apiserver is
//! killed and started again, and the Node LISTs and watches the controller
//! makes to recover are counted the same way (one list+watch of Nodes is
//! 10 pages and one watch).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;
use netd::controller::tolerations::{self, PodFacts, TolerationMetrics, ANNOTATION_SAVED, CONCURRENCY};
use netd::kube::object::{NodeAutonomy, Object, PodTolerations};
use netd::kube::KubeClient;
use netd::model::autonomy::{Autonomy, ANNOTATION_AUTONOMY};
use netd::testing::{KubeApiServer, KubeCluster};
use serde_json::{json, Value};

use crate::bench::{machine, ms, percentile, Scale};
use crate::bench_rss::status_kib;

const NODE: &str = "bench-edge";
/// Node objects made besides [`NODE`] for the memory measurement.
const EXTRA_NODES: usize = 999;
/// The floor's pods are bound to this name; no Node object has it.
const FLOOR_NODE: &str = "bench-floor";
/// CPU time of this process (the controller, and the bench's 1 ms polling
/// loop) so far, from `/proc/self/stat` (clock ticks of 10 ms).
fn own_cpu() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // utime and stime are the 14th and 15th fields of the whole line, the
    // 12th and 13th after the parenthesised command name.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).context("/proc/self/stat has no command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> { Ok(fields.get(i).context("short /proc/self/stat")?.parse()?) };
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// The longest one step may take before the benchmark gives up.
const STEP_LIMIT: Duration = Duration::from_secs(120);

/// Runs `rounds` timed rounds with `pods` pods on one node, then measures
/// the memory of `bin_dir`'s `netd-controller`.
pub fn run(rounds: usize, pods: usize, bin_dir: &Path) -> Result<()> {
    if !KubeCluster::builder().binaries_available()? {
        bail!("the autonomy benchmark needs kube-apiserver (`cargo xtask setup` builds it)");
    }
    println!("machine: {}", machine());
    let mut server = KubeApiServer::new()?;
    populate(&server, pods)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let [rewrite, restore, floor_rewrite, floor_restore] = runtime.block_on(measure(&server, rounds, pods))?;
    println!("\n{pods} pods on one node, {CONCURRENCY} patches in flight, kube-apiserver 1.20.2 on loopback; {rounds} rounds each (ms):\n");
    println!("| step | netd-controller median (min–max) | floor: the same patches, plain client, median (min–max) | netd ÷ floor | netd pods/s | netd CPU (median) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let summary = |samples: Vec<(Duration, Duration)>| {
        let (mut times, mut cpu): (Vec<Duration>, Vec<Duration>) = samples.into_iter().unzip();
        times.sort();
        cpu.sort();
        (percentile(&times, 0.5), times[0], times[times.len() - 1], percentile(&cpu, 0.5))
    };
    for (label, ours, floor) in [
        ("autonomy set → all pods rewritten", rewrite, floor_rewrite),
        ("autonomy unset → all pods restored", restore, floor_restore),
    ] {
        let (median, min, max, cpu) = summary(ours);
        let (floor_median, floor_min, floor_max, _) = summary(floor);
        let rate = pods as f64 / median.as_secs_f64().max(1e-9);
        let ratio = median.as_secs_f64() / floor_median.as_secs_f64().max(1e-9);
        println!(
            "| {label} | {} ({}–{}) | {} ({}–{}) | {ratio:.2}× | {rate:.0} | {} |",
            ms(median),
            ms(min),
            ms(max),
            ms(floor_median),
            ms(floor_min),
            ms(floor_max),
            ms(cpu)
        );
    }
    let extra_nodes = Scale::sized(EXTRA_NODES, 9);
    add_nodes(&server, extra_nodes)?;
    let memory = controller_memory(&runtime, &mut server, pods, bin_dir)?;
    println!(
        "\nnetd-controller run (release), leader, {} nodes + {} pods watched: VmRSS {:.1} MiB listed and idle, \
         {:.1} MiB after rewriting {pods} pods' tolerations, peak (VmHWM) {:.1} MiB",
        extra_nodes + 1,
        2 * pods,
        memory.rss[0] as f64 / 1024.0,
        memory.rss[1] as f64 / 1024.0,
        memory.rss[2] as f64 / 1024.0
    );
    println!(
        "Node requests of its start (kube-apiserver /metrics): {} LIST (pages of 100), {} WATCH open; \
         after kube-apiserver was killed and started again: {} LIST, {} WATCH open",
        memory.start.lists, memory.start.watches, memory.blip.lists, memory.blip.watches
    );
    Ok(())
}

/// What kube-apiserver's `/metrics` says of the Node requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct NodeRequests {
    /// `apiserver_request_total{resource="nodes",verb="LIST"}`, all codes
    /// (one per page).
    lists: u64,
    /// `apiserver_longrunning_gauge{resource="nodes",verb="WATCH"}`: open.
    watches: u64,
}

fn node_requests(server: &KubeApiServer) -> Result<NodeRequests> {
    let (status, text) = server.api("GET", "/metrics", None)?;
    ensure!(status == 200, "kube-apiserver /metrics: HTTP {status}");
    let mut out = NodeRequests::default();
    for line in text.lines().filter(|l| l.contains("resource=\"nodes\"") && l.contains("subresource=\"\"")) {
        let value = || line.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
        if line.starts_with("apiserver_request_total{") && line.contains("verb=\"LIST\"") {
            out.lists += value();
        } else if line.starts_with("apiserver_longrunning_gauge{") && line.contains("verb=\"WATCH\"") {
            out.watches += value();
        }
    }
    Ok(out)
}

/// `count` more nodes, labelled edge as the controller leaves them, each
/// with what a kubelet reports in its status (created with kubectl from
/// one list, in lists of 250).
fn add_nodes(server: &KubeApiServer, count: usize) -> Result<()> {
    let node = |i: usize| {
        let name = format!("bench-node-{i:04}");
        let ip = format!("10.{}.{}.{}", 200 + i / 65536, (i / 256) % 256, i % 256);
        let condition = |kind: &str, status: &str, reason: &str, message: &str| {
            json!({ "type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z" })
        };
        json!({ "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": name,
                "labels": { "alibabacloud.com/is-edge-worker": "true", "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                            "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64" },
                "annotations": { "flannel.alpha.coreos.com/backend-type": "vxlan",
                                 "flannel.alpha.coreos.com/backend-data": format!("{{\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:{:02x}:{:02x}\"}}", i / 256, i % 256),
                                 "flannel.alpha.coreos.com/public-ip": ip,
                                 "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                                 "node.alpha.kubernetes.io/ttl": "0",
                                 "volumes.kubernetes.io/controller-managed-attach-detach": "true" } },
            "spec": { "podCIDR": format!("10.244.{}.0/24", i % 256), "podCIDRs": [format!("10.244.{}.0/24", i % 256)] },
            "status": {
                "conditions": [
                    condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                    condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                    condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                    condition("NetworkUnavailable", "False", "FlannelIsUp", "Flannel is running on this node"),
                    condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
                ],
                "addresses": [{ "type": "InternalIP", "address": ip }, { "type": "Hostname", "address": name }],
                "capacity": { "cpu": "4", "memory": "8141664Ki", "pods": "110", "ephemeral-storage": "61255492Ki" },
                "allocatable": { "cpu": "4", "memory": "8039264Ki", "pods": "110", "ephemeral-storage": "56453061334" },
                "daemonEndpoints": { "kubeletEndpoint": { "Port": 10250 } },
                "nodeInfo": { "machineID": format!("{i:032x}"), "systemUUID": format!("{i:032x}"), "bootID": format!("{i:032x}"),
                              "kernelVersion": "6.1.0", "osImage": "Debian GNU/Linux 12 (bookworm)",
                              "containerRuntimeVersion": "containerd://1.6.20", "kubeletVersion": "v1.20.2",
                              "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux", "architecture": "amd64" },
                "images": (0..8).map(|k| json!({ "names": [format!("registry.invalid/app-{k}@sha256:{:064x}", k), format!("registry.invalid/app-{k}:v1")],
                                                 "sizeBytes": 10_000_000 + k })).collect::<Vec<_>>(),
            } })
    };
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let items: Vec<Value> = (1..=count).map(node).collect();
    for (n, chunk) in items.chunks(250).enumerate() {
        let file = dir.path().join(format!("nodes-{n}.json"));
        std::fs::write(&file, json!({ "apiVersion": "v1", "kind": "List", "items": chunk }).to_string())?;
        let out = server.kubectl(&["create", "-f", &file.display().to_string()])?;
        ensure!(out.status.success(), "kubectl create: {}", String::from_utf8_lossy(&out.stderr));
    }
    println!("created {count} more nodes in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// What [`controller_memory`] measured.
struct ControllerMemory {
    /// VmRSS (KiB) idle after the first lists, VmRSS after the rewrite,
    /// VmHWM then.
    rss: [u64; 3],
    /// The Node requests of its start.
    start: NodeRequests,
    /// The Node requests it made after kube-apiserver came back.
    blip: NodeRequests,
}

/// The real `netd-controller run` on `server`: VmRSS (KiB) once it is idle
/// after its first lists, VmRSS once it has rewritten every pod of [`NODE`]
/// (autonomy set), and VmHWM then; then kube-apiserver is killed and
/// started again, and the Node requests of the controller's recovery are
/// counted. It is stopped after that.
fn controller_memory(
    runtime: &tokio::runtime::Runtime,
    server: &mut KubeApiServer,
    pods: usize,
    bin_dir: &Path,
) -> Result<ControllerMemory> {
    let before = node_requests(server)?;
    let dir = tempfile::tempdir()?;
    let (token, ca) = (dir.path().join("token"), dir.path().join("ca.pem"));
    std::fs::write(&token, server.token())?;
    std::fs::write(&ca, server.ca_cert_pem()?)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let binary = bin_dir.join("netd-controller");
    let mut child = Command::new(&binary)
        .arg("run")
        .args(["--kubernetes", &server.url()])
        .arg("--token-file")
        .arg(&token)
        .arg("--ca-file")
        .arg(&ca)
        .args(["--identity", "bench", "--metrics-listen", &format!("127.0.0.1:{port}")])
        // Leader through the blip: kube-apiserver is away for a few seconds.
        .args(["--lease-duration", "120", "--renew-deadline", "90"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("controller.log"))?)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let result = runtime
        .block_on(async {
            let client = KubeClient::new(&server.kube_config("bench-controller")?)?;
            let nodes: Api<Object<NodeAutonomy>> = Api::all(client.client());
            let all_pods: Api<Object<PodTolerations>> = Api::namespaced(client.client(), "default");
            let on_node = ListParams::default().fields(&format!("spec.nodeName={NODE}"));
            // Leader, lists done and settled: the resident size no longer moves.
            let started = Instant::now();
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                ensure!(child.try_wait()?.is_none(), "netd-controller exited: see its log");
                let rss = status_kib(child.id(), "VmRSS:")?;
                if rss == last || started.elapsed() > STEP_LIMIT {
                    break;
                }
                last = rss;
            }
            let idle = status_kib(child.id(), "VmRSS:")?;
            for on in [true, false] {
                let value = if on { json!("true") } else { json!(null) };
                let patch = json!({ "metadata": { "annotations": { ANNOTATION_AUTONOMY: value } } });
                nodes.patch(NODE, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                let step = Instant::now();
                loop {
                    let listed = all_pods.list(&on_node).await?;
                    let saved = listed.items.iter().filter(|p| p.annotation(ANNOTATION_SAVED).is_some()).count();
                    if saved == if on { pods } else { 0 } {
                        break;
                    }
                    ensure!(step.elapsed() < STEP_LIMIT, "netd-controller patched {saved} of {pods} pods");
                    ensure!(child.try_wait()?.is_none(), "netd-controller exited: see its log");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if on {
                    last = status_kib(child.id(), "VmRSS:")?;
                }
            }
            Ok([idle, last, status_kib(child.id(), "VmHWM:")?])
        })
        .and_then(|rss| {
            let after = node_requests(server)?;
            let start = NodeRequests { lists: after.lists - before.lists, watches: after.watches };
            // The blip: every watch breaks, every list must be made again.
            server.stop()?;
            std::thread::sleep(Duration::from_secs(2));
            server.start()?;
            let back = Instant::now();
            let mut seen = Vec::new();
            loop {
                std::thread::sleep(Duration::from_secs(1));
                ensure!(child.try_wait()?.is_none(), "netd-controller exited after the blip: see its log");
                let now = node_requests(server)?;
                seen.push(now);
                // Watching again as before, and nothing new for 5 s.
                let settled = seen.len() > 5 && seen[seen.len() - 6..].iter().all(|s| *s == now);
                if (now.watches >= start.watches && settled) || back.elapsed() > STEP_LIMIT {
                    break Ok(ControllerMemory { rss, start, blip: now });
                }
            }
        });
    let _ = child.kill();
    let _ = child.wait();
    if result.is_err() {
        eprintln!("{}", std::fs::read_to_string(dir.path().join("controller.log")).unwrap_or_default());
    }
    result
}

/// The two patches the controller plans for a pod, as merge patches
/// without a precondition: the rewrite from its state now, and the restore
/// from the state the rewrite leaves.
fn planned_patches(pod: &Object<PodTolerations>) -> Result<[Value; 2]> {
    let facts = PodFacts::of(pod)?;
    let rewrite = tolerations::plan(&facts, Autonomy::Forever)?.patch.context("nothing to rewrite")?;
    let rewritten = rewrite.tolerations.clone().context("the rewrite leaves the tolerations")?;
    let saved = match &rewrite.saved {
        tolerations::SavedChange::Set(text) => text.clone(),
        other => bail!("the rewrite does not save the originals: {other:?}"),
    };
    let after = PodFacts { tolerations: &rewritten, saved: Some(&saved), ..facts };
    let restore = tolerations::plan(&after, Autonomy::Off)?.patch.context("nothing to restore")?;
    Ok([rewrite.to_merge_patch(None), restore.to_merge_patch(None)])
}

/// The floor: every pod patched with `patches[direction]`, [`CONCURRENCY`]
/// workers each taking every CONCURRENCY-th pod; the wall time.
async fn floor_step(
    pods: &Api<Object<PodTolerations>>,
    patches: &Arc<Vec<(String, [Value; 2])>>,
    direction: usize,
) -> Result<Duration> {
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..CONCURRENCY {
        let (pods, patches) = (pods.clone(), patches.clone());
        workers.spawn(async move {
            for (name, patch) in patches.iter().skip(worker).step_by(CONCURRENCY) {
                pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch[direction])).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done.context("a floor worker panicked")??;
    }
    Ok(started.elapsed())
}

/// The node and `pods` pods bound to it, and `pods` more bound to
/// [`FLOOR_NODE`] (DefaultTolerationSeconds gives each 300 s for both
/// taints), created with kubectl from one list.
fn populate(server: &KubeApiServer, pods: usize) -> Result<()> {
    let items: Vec<_> = std::iter::once(json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "default" } }))
        .chain(std::iter::once(json!({ "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": NODE, "labels": { "alibabacloud.com/is-edge-worker": "true" } } })))
        .chain([(NODE, "app"), (FLOOR_NODE, "floor")].into_iter().flat_map(|(node, prefix)| {
            (0..pods).map(move |i| {
                json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": format!("{prefix}-{i:04}"), "namespace": "default" },
                    "spec": { "nodeName": node, "automountServiceAccountToken": false,
                              "containers": [{ "name": "c", "image": "registry.invalid/pause:3" }] } })
            })
        }))
        .collect();
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("objects.json");
    std::fs::write(&file, json!({ "apiVersion": "v1", "kind": "List", "items": items }).to_string())?;
    let started = Instant::now();
    let out = server.kubectl(&["create", "-f", &file.display().to_string()])?;
    ensure!(out.status.success(), "kubectl create: {}", String::from_utf8_lossy(&out.stderr));
    println!("created 2 × {pods} pods in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Per timed round, the wall time and this process's CPU time of the
/// rewrite, of the restore, and of the floor's rewrite and restore.
async fn measure(server: &KubeApiServer, rounds: usize, pods: usize) -> Result<[Vec<(Duration, Duration)>; 4]> {
    let client = KubeClient::new(&server.kube_config("bench-controller")?)?;
    let metrics = Arc::new(TolerationMetrics::default());
    let controller = tokio::spawn(tolerations::run(client.clone(), metrics.clone()));
    let nodes: Api<Object<NodeAutonomy>> = Api::all(client.client());
    let all_pods: Api<Object<PodTolerations>> = Api::namespaced(client.client(), "default");
    let on_node = |node: &str| ListParams::default().fields(&format!("spec.nodeName={node}"));
    let saved_on = |listed: &kube::api::ObjectList<Object<PodTolerations>>| {
        listed.items.iter().filter(|p| p.annotation(ANNOTATION_SAVED).is_some()).count()
    };
    let floor_pods = all_pods.list(&on_node(FLOOR_NODE)).await?;
    let patches: Vec<(String, [Value; 2])> = floor_pods
        .items
        .iter()
        .map(|pod| Ok((pod.name().context("a pod without a name")?.to_string(), planned_patches(pod)?)))
        .collect::<Result<_>>()?;
    ensure!(patches.len() == pods, "{} floor pods listed, {pods} expected", patches.len());
    let patches = Arc::new(patches);
    let mut samples = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for round in 0..=rounds {
        for on in [true, false] {
            let counter = || if on { metrics.rewritten() } else { metrics.restored() };
            let before = counter();
            let value = if on { json!("true") } else { json!(null) };
            let patch = json!({ "metadata": { "annotations": { ANNOTATION_AUTONOMY: value } } });
            let cpu_before = own_cpu()?;
            let started = Instant::now();
            nodes.patch(NODE, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            while counter() < before + pods as u64 {
                ensure!(!controller.is_finished(), "the controller stopped");
                ensure!(
                    started.elapsed() < STEP_LIMIT,
                    "not all pods patched within {STEP_LIMIT:?}: {}",
                    metrics.render_prometheus()
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let took = started.elapsed();
            let cpu = own_cpu()?.saturating_sub(cpu_before);
            let saved = saved_on(&all_pods.list(&on_node(NODE)).await?);
            ensure!(
                saved == if on { pods } else { 0 },
                "{saved} of {pods} pods carry {ANNOTATION_SAVED} after autonomy {}",
                if on { "set" } else { "unset" }
            );
            if round > 0 {
                samples[usize::from(!on)].push((took, cpu));
            }
            println!(
                "round {round}: autonomy {} → {} pods {} in {} ms ({} ms CPU here)",
                if on { "set" } else { "unset" },
                pods,
                if on { "rewritten" } else { "restored" },
                ms(took),
                ms(cpu)
            );
        }
        for direction in [0, 1] {
            let cpu_before = own_cpu()?;
            let took = floor_step(&all_pods, &patches, direction).await?;
            let cpu = own_cpu()?.saturating_sub(cpu_before);
            let saved = saved_on(&all_pods.list(&on_node(FLOOR_NODE)).await?);
            ensure!(saved == if direction == 0 { pods } else { 0 }, "the floor left {saved} of {pods} pods saved");
            if round > 0 {
                samples[2 + direction].push((took, cpu));
            }
            println!(
                "round {round}: floor, {pods} plain patches ({}) in {} ms",
                if direction == 0 { "rewrite" } else { "restore" },
                ms(took)
            );
        }
    }
    ensure!(metrics.errors() == 0, "errors: {}", metrics.render_prometheus());
    let expected = ((rounds + 1) * pods) as u64;
    ensure!(
        metrics.rewritten() == expected && metrics.restored() == expected,
        "the controller patched pods it should not have (the floor's?): {}",
        metrics.render_prometheus()
    );
    controller.abort();
    Ok(samples)
}
