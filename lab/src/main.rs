//! `netd-lab`: the demo and the side-by-side benchmarks, in network
//! namespaces, on the release binaries `cargo xtask demo|bench` builds.
//!
//! ```text
//! netd-lab demo --bin-dir target/release
//! netd-lab demo cluster --bin-dir target/release
//! netd-lab bench <cni|vxlan|events|rss|scenario|dnat|tunnel|tunnel-scale|doors|tunnel-config|autonomy|pods|hub|reboot|all|smoke> --bin-dir target/release [--plot DIR]
//! ```

mod bench;
mod bench_autonomy;
mod bench_dnat;
mod bench_doors;
mod bench_events;
mod bench_hub;
mod bench_pods;
mod bench_reboot;
mod bench_rss;
mod bench_scenario;
mod bench_tunnel;
mod bench_tunnel_config;
mod bench_tunnel_scale;
mod bench_vxlan;
mod delay_line;
mod demo;
mod demo_cluster;
mod plot;
mod tunnel_lab;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

const USAGE: &str =
    "usage: netd-lab <demo [cluster] | bench <cni|vxlan|events|rss|scenario|dnat|tunnel|tunnel-scale|doors|tunnel-config|autonomy|pods|hub|reboot|all|smoke [name]> [--plot DIR]> --bin-dir DIR (run through `cargo xtask`)";

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == bench_doors::WORKER) {
        return bench_doors::worker(&args[1..]);
    }
    let Some(at) = args.iter().position(|a| a == "--bin-dir") else { bail!("--bin-dir is required\n{USAGE}") };
    let bin_dir = PathBuf::from(args.get(at + 1).context("--bin-dir needs a directory")?);
    // Absolute: programs started in other namespaces (nsenter) or working
    // directories find the binaries too.
    let bin_dir = bin_dir.canonicalize().with_context(|| format!("--bin-dir {}", bin_dir.display()))?;
    args.drain(at..at + 2);
    // SVG charts of the cni, vxlan, dnat and tunnel tables (crate::plot).
    if let Some(at) = args.iter().position(|a| a == "--plot") {
        let dir = PathBuf::from(args.get(at + 1).context("--plot needs a directory")?);
        plot::set_dir(plot::absolute(&dir)?);
        args.drain(at..at + 2);
    }
    for binary in ["netd", "netd-ipam", "netd-cloud"] {
        if !bin_dir.join(binary).is_file() {
            bail!("{} is missing: build it first (`cargo xtask` does)", bin_dir.join(binary).display());
        }
    }
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["demo"] => demo::run(&bin_dir),
        ["demo", "cluster"] => demo_cluster::run(),
        ["bench", "smoke", which] => bench::smoke(&[which], &bin_dir),
        ["bench", which] => bench::run(which, &bin_dir),
        ["bench"] => bench::run("all", &bin_dir),
        _ => bail!("{USAGE}"),
    }
}
