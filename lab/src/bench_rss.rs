//! `cargo xtask bench rss`: resident memory of `netd run` holding 1 000
//! peers from the embedded registry (goal ≤ 15 MiB).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netd::model::flannel::{subnet_key, LeaseAttrs};
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::NetworkConfig;
use netd::testing::{self, metric, netd_run_args, synthetic_node, synthetic_peer, NetdProcess};

use crate::bench::machine;

fn status_kib(pid: u32, field: &str) -> Result<u64> {
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
    let daemon = NetdProcess::spawn(&ns, &bin_dir.join("netd"), args, &state.join("netd.log"))?;
    let started = Instant::now();
    while metric(&ns, "netd_ready") != Some(1.0) || metric(&ns, "netd_peers_programmed") != Some(f64::from(peers)) {
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

/// Runs the benchmark for `peers` peers beside the floor: the same daemon
/// holding no peer.
pub fn run(peers: u32, bin_dir: &Path) -> Result<()> {
    let Some(_kernel) = testing::privileged()? else { bail!("the RSS benchmark needs root") };
    println!("machine: {}", machine());
    let floor = measure(0, bin_dir)?;
    let loaded = measure(peers, bin_dir)?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!("\n| `netd run`, embedded registry | peers programmed after | RSS | anonymous | file-backed | peak RSS |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (label, r) in [("no peer (floor)".to_string(), &floor), (format!("{peers} peers"), &loaded)] {
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
    Ok(())
}
