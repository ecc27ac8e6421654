//! `cargo xtask bench rss`: resident memory of `netd run` holding 1 000
//! peers from the embedded registry (goal ≤ 15 MiB).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::flannel::LeaseAttrs;
use netd::registry::NetworkConfig;
use netd::testing::{self, metric, NetNs, NetdProcess};

use crate::bench::machine;
use crate::{cargo, workspace_root};

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .with_context(|| format!("{field} missing from /proc/{pid}/status"))
}

/// Runs the benchmark for `peers` peers.
pub fn run(peers: u32) -> Result<()> {
    cargo(&["build", "--release", "--quiet", "-p", "netd", "--bin", "netd"], &[])?;
    let Some(_kernel) = testing::privileged()? else { bail!("the RSS benchmark needs root") };
    let dir = tempfile::tempdir()?;
    let registry_path = dir.path().join("registry.db");
    let config = NetworkConfig { network: "10.0.0.0/8".parse()?, subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&registry_path, &config)?;
    let registry = EmbeddedRegistry::open(&registry_path, Duration::from_millis(100));
    for i in 1..=peers {
        let ip = std::net::Ipv4Addr::from(0xac10_0000u32 + 10 + i);
        let mac = netd::ipam::MacAddr([0x0e, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        let key = format!("10.{}.{}.0-24", (i >> 8) as u8, i as u8);
        registry.put_raw_lease(
            &key,
            &format!("peer-{i}"),
            &LeaseAttrs::vxlan(ip, 1, mac).to_json(),
            Duration::from_secs(3600),
        )?;
    }
    let ns = NetNs::new()?;
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"])?;
    ns.ip(&["addr", "add", "172.16.0.1/12", "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state)?;
    let args: Vec<std::ffi::OsString> = vec![
        "run".into(),
        "--node-name".into(),
        "bench-node".into(),
        "--iface".into(),
        "eth0".into(),
        format!("--registry=embedded:{}", registry_path.display()).into(),
        "--state-dir".into(),
        state.clone().into(),
        "--subnet-env".into(),
        state.join("subnet.env").into(),
    ];
    let netd = workspace_root().join("target/release/netd");
    let daemon = NetdProcess::spawn(&ns, Path::new(&netd), args, &state.join("netd.log"))?;
    let started = Instant::now();
    while metric(&ns, "netd_peers_programmed") != Some(f64::from(peers)) {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("netd did not program {peers} peers; log:\n{}", daemon.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let programmed = started.elapsed();
    // Let a few watch polls and a periodic pass's worth of work happen.
    std::thread::sleep(Duration::from_secs(3));
    let pid = daemon.pid().context("netd exited")?;
    let rss = status_kib(pid, "VmRSS:")?;
    let hwm = status_kib(pid, "VmHWM:")?;
    println!("machine: {}", machine());
    println!(
        "netd run, embedded registry, {peers} peers programmed in {:.0} ms: RSS {:.1} MiB, peak RSS {:.1} MiB (goal ≤ 15 MiB)",
        programmed.as_secs_f64() * 1000.0,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    Ok(())
}
