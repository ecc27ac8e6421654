//! `netd-lab demo cluster` (`cargo xtask demo cluster`): netd as it is
//! deployed, for a person to watch. A cloud node and two edge nodes with
//! real kubelets 1.20.2 and Debian's containerd (`netd::testing::
//! RealCluster`), `kubectl apply -f deploy/` with netd's own image, a
//! StatefulSet across the edge nodes pinging over flannel.1, a pod that
//! comes back with its address, then the cloud cut off from the edge and
//! `kubectl logs` / `exec` / `port-forward` reaching the edge pod through
//! the tunnel only.

use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd::testing::{self, edge_statefulset, read_line_until, RealCluster, WORKLOAD_METRICS_PORT};

/// Long enough for a first start of every pod on two shared cores.
const SLOW: Duration = Duration::from_secs(240);

/// Prints what happens, each line stamped with the time since the start.
struct Narrator {
    started: Instant,
}

impl Narrator {
    fn step(&self, text: &str) {
        println!("\n[{:>4.0}s] ==> {text}", self.started.elapsed().as_secs_f64());
    }

    fn say(&self, text: &str) {
        println!("[{:>4.0}s]     {text}", self.started.elapsed().as_secs_f64());
    }

    /// Command output, indented under its step.
    fn show(&self, command: &str, output: &str) {
        println!("        $ {command}");
        for line in output.lines() {
            println!("        {line}");
        }
        let _ = std::io::stdout().flush();
    }
}

/// Runs the cluster demo (netd's image from `cargo xtask image`).
pub fn run() -> Result<()> {
    let Some(_kernel) = testing::privileged()? else { bail!("the cluster demo needs root (namespaces, cgroups)") };
    let builder = RealCluster::builder();
    if !builder.available()? {
        bail!("the cluster demo needs the kubelet, containerd and the images: `cargo xtask demo cluster` builds them");
    }
    let say = Narrator { started: Instant::now() };
    say.step("starting a cluster: cloud-1 (etcd, kube-apiserver, kube-controller-manager, kube-scheduler 1.20.2) and edge-1, edge-2, each a network and mount namespace with its own containerd and kubelet");
    let mut cluster = builder.start()?;
    say.show("kubectl get nodes -o wide", &cluster.kubectl(&["get", "nodes", "-o", "wide"])?);

    say.step("kubectl apply -f deploy/ (netd's image, imported into each node's containerd; tunnel certificates from the cluster CA)");
    cluster.deploy(&[WORKLOAD_METRICS_PORT], SLOW)?;
    say.say("every DaemonSet Ready; netd's init container installed the CNI plugin and conflist on each node");
    say.show(
        "kubectl -n kube-system get pods -o wide",
        &cluster.kubectl(&["-n", "kube-system", "get", "pods", "-o", "wide"])?,
    );

    say.step("a StatefulSet with a pod on each edge node; addresses from netd-ipam, pinned to the pod names");
    cluster.apply(&edge_statefulset("web", 2))?;
    let pods = cluster.wait_pods_ready("app=web", 2, SLOW)?;
    say.show("kubectl get pods -o wide", &cluster.kubectl(&["get", "pods", "-o", "wide"])?);
    let ip_of = |name: &str| -> Result<IpAddr> { Ok(pods.get(name).with_context(|| format!("no pod {name}"))?.1) };
    let (web0, web1) = (ip_of("web-0")?, ip_of("web-1")?);
    let ping = format!("kubectl exec web-0 -- ping -c 3 {web1}");
    say.show(&ping, &cluster.kubectl(&["exec", "web-0", "--", "ping", "-c", "3", "-W", "2", &web1.to_string()])?);
    let edge1 = cluster.node("edge-1")?;
    let fdb = edge1.exec("bridge", &["fdb", "show", "dev", "flannel.1"])?;
    say.show("bridge fdb show dev flannel.1   (on edge-1: edge-2's VTEP)", &String::from_utf8_lossy(&fdb.stdout));

    say.step("web-0 deleted: the StatefulSet makes it again, and netd-ipam gives it its address back");
    cluster.kubectl(&["delete", "pod", "web-0", "--wait=true"])?;
    let again = cluster.wait_pods_ready("app=web", 2, SLOW)?;
    let back = again.get("web-0").map(|(_, ip)| *ip).context("web-0 did not come back")?;
    say.say(&format!("web-0 had {web0}, has {back}{}", if back == web0 { " (same)" } else { " (DIFFERENT)" }));
    if back != web0 {
        bail!("web-0 came back with {back}, not {web0}");
    }

    say.step("the cloud cut off from the edge nodes, as NAT does (no connection from the cloud in, no VXLAN across)");
    cluster.cut_cloud_from_edges()?;
    let edge_ip = cluster.node(&again["web-0"].0)?.ip;
    let cloud = cluster.node("cloud-1")?;
    let direct = cloud.exec("curl", &["-sk", "--max-time", "3", &format!("https://{edge_ip}:10250/healthz")]);
    say.say(&format!(
        "curl from cloud-1 to {edge_ip}:10250 (the kubelet): {}",
        if direct.is_err() { "no answer" } else { "ANSWERED" }
    ));
    say.say("kube-apiserver restarted on cloud-1's network: its dials to edge kubelets meet netd's eBPF DNAT");
    cluster.restart_api_server_on_cloud_node(&[])?;
    let streams = cluster.tunnel_server_metric("netd_tunnel_streams_total")?;
    let logs = cluster.wait_for("kubectl logs through the tunnel", SLOW, || {
        let out = cluster.kubectl_output(&["logs", "--tail=3", "web-0"])?;
        Ok(out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
    })?;
    say.show("kubectl logs --tail=3 web-0", &logs);
    let exec = cluster.kubectl(&["exec", "web-0", "--", "sh", "-c", "hostname; ip -4 addr show eth0"])?;
    say.show("kubectl exec web-0 -- sh -c 'hostname; ip -4 addr show eth0'", &exec);
    let mut forward = cluster.kubectl_spawn(&["port-forward", "pod/web-0", &format!(":{WORKLOAD_METRICS_PORT}")])?;
    let line = read_line_until(&mut forward, Duration::from_secs(30), |l| l.starts_with("Forwarding from 127.0.0.1:"))?;
    let local = line.trim_start_matches("Forwarding from ").split(' ').next().unwrap_or_default().to_string();
    let fetched = cluster
        .node("cloud-1")?
        .exec("curl", &["-sS", "--max-time", "20", "--retry", "3", &format!("http://{local}/metrics")]);
    let _ = (forward.kill(), forward.wait());
    say.show(
        &format!("kubectl port-forward pod/web-0 :{WORKLOAD_METRICS_PORT}; curl http://{local}/metrics"),
        &String::from_utf8_lossy(&fetched?.stdout),
    );
    let grown = cluster.tunnel_server_metric("netd_tunnel_streams_total")? - streams;
    say.say(&format!("the tunnel server carried {grown} new streams for them (netd_tunnel_streams_total)"));

    say.step("done: removing the cluster (kubelets, containerds, pods, namespaces, cgroups)");
    drop(cluster);
    // The harness names what it makes after this process.
    let ours = format!("netd-t-{}-", std::process::id());
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let left: Vec<&String> = left.iter().filter(|name| name.starts_with(&ours)).collect();
    if !left.is_empty() {
        bail!("network namespaces left behind: {left:?}");
    }
    say.say("no network namespace of the demo is left");
    Ok(())
}
