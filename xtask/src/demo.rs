//! `cargo xtask demo`: a 3-node cluster in network namespaces on the
//! embedded registry, pods attached through Debian's `bridge` plugin with
//! netd-ipam, then a node reboot with the registry stopped.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::NetworkConfig;
use netd::testing::{
    self, metric, netd_run_args, Cluster, CniCall, CniRunner, NetNs, NetdProcess, DEBIAN_CNI_DIR, HEALTH_ADDR,
};

use crate::{cargo, setup, workspace_root};

struct Demo {
    state: PathBuf,
    registry: PathBuf,
    bin: PathBuf,
    cluster: Cluster,
    daemons: Vec<Option<NetdProcess>>,
    pods: Vec<(String, NetNs, Ipv4Addr)>,
    started: Instant,
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

impl Demo {
    fn say(&self, text: &str) {
        println!("[{:>6.2}s] {text}", self.started.elapsed().as_secs_f64());
    }

    fn node_dir(&self, number: u8) -> PathBuf {
        self.state.join(format!("node-{number}"))
    }

    fn start_daemon(&mut self, number: u8) -> Result<Instant> {
        let node = self.cluster.node(number).context("no such node")?;
        let dir = self.node_dir(number);
        std::fs::create_dir_all(&dir)?;
        let args = netd_run_args(&node.name, &format!("embedded:{}", self.registry.display()), &dir);
        let started = Instant::now();
        let process = NetdProcess::spawn(&node.ns, &self.bin.join("netd"), args, &dir.join("netd.log"))?;
        self.daemons[usize::from(number - 1)] = Some(process);
        Ok(started)
    }

    fn wait(&self, what: &str, number: u8, timeout: Duration, mut check: impl FnMut(&NetNs) -> bool) -> Result<()> {
        let node = self.cluster.node(number).context("no such node")?;
        let deadline = Instant::now() + timeout;
        while !check(&node.ns) {
            if Instant::now() > deadline {
                let log = self.daemons[usize::from(number - 1)].as_ref().map(NetdProcess::log).unwrap_or_default();
                bail!("node-{number}: timed out waiting for {what}; netd log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// CNI ADD through Debian's bridge plugin with netd-ipam; the pod's IP.
    fn attach_pod(&self, number: u8, pod: &str, pod_ns: &NetNs, container: &str) -> Result<Ipv4Addr> {
        let node = self.cluster.node(number).context("no such node")?;
        let dir = self.node_dir(number);
        let config = format!(
            r#"{{"cniVersion":"1.0.0","name":"netd","type":"bridge","bridge":"cni0","isGateway":true,"mtu":1450,
                "ipam":{{"type":"netd-ipam","subnetFile":"{}","dataDir":"{}"}}}}"#,
            dir.join("subnet.env").display(),
            dir.join("cni").display()
        );
        let runner = CniRunner::new(&node.ns, vec![PathBuf::from(DEBIAN_CNI_DIR), self.bin.clone()]);
        let call =
            CniCall { command: "ADD", container_id: container, pod_netns: pod_ns, ifname: "eth0", pod: Some(pod) };
        let out = runner.call_ok("bridge", &call, &config)?;
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).context("CNI result")?;
        let address = result["ips"][0]["address"].as_str().context("CNI result without ips[0]")?;
        let ip = address.split('/').next().unwrap_or_default();
        ip.parse().with_context(|| format!("CNI result address {address:?}"))
    }

    fn ping(&self, from: usize, to: usize) -> bool {
        let target = self.pods[to].2.to_string();
        self.pods[from].1.exec("ping", &["-c1", "-W1", &target]).is_ok()
    }

    fn vtep_mac(&self, number: u8) -> String {
        self.cluster
            .node(number)
            .and_then(|n| n.ns.ip(&["link", "show", "flannel.1"]).ok())
            .and_then(|text| text.split("link/ether ").nth(1).map(|r| r.chars().take(17).collect()))
            .unwrap_or_else(|| "?".into())
    }

    fn subnet(&self, number: u8) -> String {
        std::fs::read_to_string(self.node_dir(number).join("subnet.env"))
            .ok()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=").map(str::to_string)))
            .unwrap_or_else(|| "?".into())
    }
}

/// Runs the demo.
pub fn run() -> Result<()> {
    setup::packages()?;
    println!("building netd and netd-ipam (release)…");
    cargo(&["build", "--release", "--quiet", "-p", "netd", "--bin", "netd", "--bin", "netd-ipam"], &[])?;
    let Some(_kernel) = testing::privileged()? else { bail!("the demo needs root (network namespaces)") };
    let state = tempfile::Builder::new().prefix("netd-demo-").tempdir()?;
    let registry = state.path().join("registry.db");
    let config = NetworkConfig { network: "10.244.0.0/16".parse()?, subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&registry, &config)?;
    let mut demo = Demo {
        state: state.path().to_path_buf(),
        registry: registry.clone(),
        bin: workspace_root().join("target/release"),
        cluster: Cluster::bare(3)?,
        daemons: vec![None, None, None],
        pods: Vec::new(),
        started: Instant::now(),
    };
    println!();
    demo.say("3 nodes (network namespaces) on an underlay bridge 192.168.50.0/24; embedded registry at");
    demo.say(&format!("         {} (network 10.244.0.0/16, VXLAN VNI 1)", registry.display()));
    for number in 1..=3u8 {
        let started = demo.start_daemon(number)?;
        demo.wait("readiness", number, Duration::from_secs(30), |ns| {
            testing::http_get(ns, HEALTH_ADDR, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        })?;
        let took = started.elapsed();
        demo.say(&format!(
            "node-{number}: netd up in {}: subnet {}, VTEP MAC {}",
            ms(took),
            demo.subnet(number),
            demo.vtep_mac(number)
        ));
    }
    for number in 1..=3u8 {
        demo.wait("2 peers", number, Duration::from_secs(30), |ns| metric(ns, "netd_peers_programmed") == Some(2.0))?;
    }
    for number in 1..=3u8 {
        let pod = format!("default/web-{number}");
        let ns = NetNs::new()?;
        let ip = demo.attach_pod(number, &pod, &ns, &format!("sandbox-{number}-a"))?;
        demo.say(&format!("node-{number}: pod {pod} attached by bridge + netd-ipam: {ip}"));
        demo.pods.push((pod, ns, ip));
    }
    for (from, to) in [(0, 1), (1, 2), (2, 0)] {
        let started = Instant::now();
        let ok = demo.ping(from, to);
        demo.say(&format!(
            "ping {} ({}) -> {} ({}): {} in {}",
            demo.pods[from].0,
            demo.pods[from].2,
            demo.pods[to].0,
            demo.pods[to].2,
            if ok { "ok" } else { "FAILED" },
            ms(started.elapsed())
        ));
        if !ok {
            bail!("cross-node pod traffic failed");
        }
    }

    println!();
    let mac_before = demo.vtep_mac(2);
    let ip_before = demo.pods[1].2;
    std::fs::rename(&registry, state.path().join("registry.db.stopped"))?;
    demo.say("registry STOPPED (the cloud is unreachable)");
    demo.wait("registry loss", 1, Duration::from_secs(10), |ns| metric(ns, "netd_registry_connected") == Some(0.0))?;
    demo.say(&format!("ping web-1 -> web-2 with the registry down: {}", if demo.ping(0, 1) { "ok" } else { "FAILED" }));
    if let Some(mut old) = demo.daemons[1].take() {
        old.signal(libc::SIGKILL)?;
    }
    demo.cluster.reboot(2)?;
    demo.say("node-2 REBOOTED: power cut, namespace destroyed with its device, routes and pod veth, booted fresh");
    let booted = demo.start_daemon(2)?;
    demo.wait("readiness from snapshot", 2, Duration::from_secs(30), |ns| metric(ns, "netd_ready") == Some(1.0))?;
    let ready = booted.elapsed();
    let pod_ns = &demo.pods[1].1;
    let ip_after = demo.attach_pod(2, "default/web-2", pod_ns, "sandbox-2-b")?;
    let attached = booted.elapsed();
    while !demo.ping(0, 1) {
        if booted.elapsed() > Duration::from_secs(30) {
            bail!("traffic did not come back after the reboot");
        }
    }
    let back = booted.elapsed();
    let mac_after = demo.vtep_mac(2);
    demo.say(&format!("node-2: netd restored the overlay from its snapshot in {} (registry still down)", ms(ready)));
    demo.say(&format!(
        "node-2: pod web-2 re-created (new sandbox): {ip_after} ({}) after {}",
        if ip_after == ip_before { "same IP" } else { "DIFFERENT IP" },
        ms(attached)
    ));
    demo.say(&format!(
        "node-2: VTEP MAC {mac_after} ({})",
        if mac_after == mac_before { "same as before the reboot" } else { "CHANGED" }
    ));
    demo.say(&format!("ping web-1 -> web-2 works again {} after netd started", ms(back)));
    if ip_after != ip_before || mac_after != mac_before {
        bail!("pinning failed across the reboot");
    }

    println!();
    std::fs::rename(state.path().join("registry.db.stopped"), &registry)?;
    let returned = Instant::now();
    demo.say("registry BACK");
    demo.wait("resync", 2, Duration::from_secs(30), |ns| {
        metric(ns, "netd_registry_connected") == Some(1.0)
            && metric(ns, "netd_seconds_since_last_sync").is_some_and(|s| (0.0..5.0).contains(&s))
    })?;
    let node2 = demo.cluster.node(2).context("node-2")?;
    let since = metric(&node2.ns, "netd_seconds_since_last_sync").unwrap_or(-1.0);
    let peers = metric(&node2.ns, "netd_peers_programmed").unwrap_or(-1.0);
    demo.say(&format!(
        "node-2: reconnected and resynced in {} ({} peers, last sync {:.1}s ago)",
        ms(returned.elapsed()),
        peers,
        since
    ));
    for (from, to) in [(0, 1), (1, 2), (2, 0)] {
        if !demo.ping(from, to) {
            bail!("traffic failed after the resync");
        }
    }
    demo.say("all pods reach each other");

    println!();
    for number in 1..=3u8 {
        if let Some(mut daemon) = demo.daemons[usize::from(number - 1)].take() {
            daemon.signal(libc::SIGTERM)?;
        }
        cleanup(&demo, number)?;
    }
    demo.say("netd stopped (SIGTERM leaves the data plane), `netd cleanup` removed it, namespaces deleted");
    drop(demo);
    Ok(())
}

fn cleanup(demo: &Demo, number: u8) -> Result<()> {
    let node = demo.cluster.node(number).context("no such node")?;
    let dir = demo.node_dir(number);
    let netd: &Path = &demo.bin.join("netd");
    let out = node.ns.run(|| {
        std::process::Command::new(netd)
            .args(["cleanup", "--purge-state", "--state-dir"])
            .arg(&dir)
            .arg("--subnet-env")
            .arg(dir.join("subnet.env"))
            .output()
    })??;
    if !out.status.success() {
        bail!("netd cleanup on node-{number}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
