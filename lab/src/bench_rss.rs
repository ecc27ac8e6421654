//! `cargo xtask bench rss`: resident memory of `netd run` holding 1 000
//! peers (goal ≤ 15 MiB), from the embedded registry and from a real
//! kube-apiserver (1 000 flannel-annotated Node objects, so the Kubernetes
//! client, its list and its watch are part of what is measured).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd::model::flannel::{subnet_key, LeaseAttrs};
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::NetworkConfig;
use netd::testing::{
    self, metric, netd_run_args, synthetic_node, synthetic_peer, KubeApiServer, NetNs, NetdProcess, ServerHost,
    SYNTHETIC_OWN_IP,
};

use crate::bench::machine;

/// A `kB` field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:` …).
pub(crate) fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .with_context(|| format!("{field} missing from /proc/{pid}/status"))
}

struct Resident {
    programmed: Duration,
    rss: u64,
    anon: u64,
    file: u64,
    peak: u64,
}

/// `netd run` on the embedded registry holding `peers` synthetic peers:
/// its memory once they are programmed and a few watch polls have passed.
fn measure(peers: u32, bin_dir: &Path) -> Result<Resident> {
    let dir = tempfile::tempdir()?;
    let registry_path = dir.path().join("registry.db");
    let config = NetworkConfig { network: "10.0.0.0/8".parse()?, subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&registry_path, &config)?;
    let registry = EmbeddedRegistry::open(&registry_path, Duration::from_millis(100));
    for i in 1..=peers {
        let p = synthetic_peer(i);
        let attrs = LeaseAttrs::vxlan(p.public_ip, 1, p.vtep_mac).to_json();
        registry.put_raw_lease(&subnet_key(p.subnet), &format!("peer-{i}"), &attrs, Duration::from_secs(3600))?;
    }
    let ns = synthetic_node()?;
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state)?;
    let args = netd_run_args("bench-node", &format!("embedded:{}", registry_path.display()), &state);
    sample(&ns, peers, &bin_dir.join("netd"), args, &state)
}

/// `netd run` on a kube-apiserver (in the node's namespace, on its
/// `eth0` address) holding our Node and `peers` flannel peers.
fn measure_kube(peers: u32, bin_dir: &Path) -> Result<Resident> {
    let ns = synthetic_node()?;
    let server = KubeApiServer::new_on(ServerHost::in_netns(&ns, SYNTHETIC_OWN_IP))?;
    let create = |name: String, cidr: String, annotations: serde_json::Value| -> Result<()> {
        let node = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": name, "annotations": annotations },
            "spec": { "podCIDR": cidr, "podCIDRs": [cidr] },
        });
        let (status, body) = server.api("POST", "/api/v1/nodes", Some(("application/json", &node.to_string())))?;
        if status != 201 {
            bail!("creating Node {name}: HTTP {status}: {body}");
        }
        Ok(())
    };
    create("bench-node".into(), "10.0.0.0/24".into(), serde_json::json!({}))?;
    // Two creators at a time: one curl per object.
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..2u32)
            .map(|w| {
                let create = &create;
                scope.spawn(move || -> Result<()> {
                    for i in (1..=peers).filter(|i| i % 2 == w) {
                        let p = synthetic_peer(i);
                        let annotations = serde_json::json!({
                            "flannel.alpha.coreos.com/backend-data":
                                format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, p.vtep_mac),
                            "flannel.alpha.coreos.com/backend-type": "vxlan",
                            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                            "flannel.alpha.coreos.com/public-ip": p.public_ip.to_string(),
                        });
                        create(format!("peer-{i}"), p.subnet.to_string(), annotations)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| anyhow::anyhow!("a Node creator panicked"))??;
        }
        Ok(())
    })?;
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state)?;
    let token_file = dir.path().join("token");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&token_file, server.token())?;
    std::fs::write(&ca_file, server.ca_cert_pem()?)?;
    let mut args = netd_run_args("bench-node", &format!("kubernetes:{}", server.url()), &state);
    args.extend(["--token-file".into(), token_file.into(), "--ca-file".into(), ca_file.into()]);
    args.extend(["--network".into(), "10.0.0.0/8".into()]);
    sample(&ns, peers, &bin_dir.join("netd"), args, &state)
}

/// Starts netd with `args` in `ns` and samples its memory once it has
/// programmed `peers` peers.
fn sample(ns: &NetNs, peers: u32, netd: &Path, args: Vec<std::ffi::OsString>, state: &Path) -> Result<Resident> {
    let daemon = NetdProcess::spawn(ns, netd, args, &state.join("netd.log"))?;
    let started = Instant::now();
    while metric(ns, "netd_ready") != Some(1.0) || metric(ns, "netd_peers_programmed") != Some(f64::from(peers)) {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("netd did not program {peers} peers; log:\n{}", daemon.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let programmed = started.elapsed();
    // Let a few watch polls and a periodic pass's worth of work happen.
    std::thread::sleep(Duration::from_secs(3));
    let pid = daemon.pid().context("netd exited")?;
    Ok(Resident {
        programmed,
        rss: status_kib(pid, "VmRSS:")?,
        anon: status_kib(pid, "RssAnon:")?,
        file: status_kib(pid, "RssFile:")?,
        peak: status_kib(pid, "VmHWM:")?,
    })
}

/// Runs the benchmark for `peers` peers beside the floor (the same daemon
/// holding no peer), on the embedded registry and on a kube-apiserver.
pub fn run(peers: u32, bin_dir: &Path) -> Result<()> {
    let Some(_kernel) = testing::privileged()? else { bail!("the RSS benchmark needs root") };
    println!("machine: {}", machine());
    let floor = measure(0, bin_dir)?;
    let loaded = measure(peers, bin_dir)?;
    report("embedded registry", peers, &floor, &loaded);
    let floor = measure_kube(0, bin_dir)?;
    let loaded = measure_kube(peers, bin_dir)?;
    report("kube-apiserver 1.20.2", peers, &floor, &loaded);
    Ok(())
}

fn report(registry: &str, peers: u32, floor: &Resident, loaded: &Resident) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!("\n| `netd run`, {registry} | peers programmed after | RSS | anonymous | file-backed | peak RSS |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (label, r) in [("no peer (floor)".to_string(), floor), (format!("{peers} peers"), loaded)] {
        println!(
            "| {label} | {:.0} ms | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
            r.programmed.as_secs_f64() * 1000.0,
            mib(r.rss),
            mib(r.anon),
            mib(r.file),
            mib(r.peak)
        );
    }
    println!(
        "\n{peers} peers ÷ floor: RSS {:.2}×, anonymous {:.2}×; RSS is {:.2}× the 15 MiB goal",
        loaded.rss as f64 / floor.rss as f64,
        loaded.anon as f64 / floor.anon as f64,
        mib(loaded.rss) / 15.0
    );
}
