//! `cargo xtask bench vxlan`: programming N peers from empty, side by side in
//! fresh namespaces — flannel's commands through `ip -batch`/`bridge -batch`
//! (the anchor), the same objects netd writes (nexthops) through `ip -batch`
//! (the kernel floor for iproute2), and `netd restore` (release build, from a
//! snapshot: process start, JSON parse, netlink batches) — plus the no-op
//! reconcile and the snapshot-restore time.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netd::testing::{
    self, synthetic_config as config, synthetic_node as fresh_node, synthetic_peer as peer, NetNs,
    SYNTHETIC_OWN_IP as OWN_IP,
};
use netd::vxlan::snapshot::Snapshot;

use crate::bench::{machine, ms, percentile};

/// flannel's device, made with `ip` as the baselines' starting point.
fn flannel_device(ns: &NetNs) -> Result<()> {
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &OWN_IP.to_string(),
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ])?;
    ns.ip(&["addr", "add", "10.0.0.0/32", "dev", "flannel.1"])?;
    ns.ip(&["link", "set", "flannel.1", "mtu", "1450", "up"])?;
    Ok(())
}

struct BatchFiles {
    neigh: PathBuf,
    fdb: PathBuf,
    routes: PathBuf,
    nexthop_routes: PathBuf,
}

fn write_batches(dir: &Path, n: u32) -> Result<BatchFiles> {
    let (mut neigh, mut fdb, mut routes, mut nh) = (String::new(), String::new(), String::new(), String::new());
    for i in 1..=n {
        let p = peer(i);
        let gw = p.subnet.network();
        writeln!(neigh, "neigh replace {gw} lladdr {} dev flannel.1 nud permanent", p.vtep_mac)?;
        writeln!(fdb, "fdb replace {} dev flannel.1 dst {} self permanent", p.vtep_mac, p.public_ip)?;
        writeln!(routes, "route replace {} via {gw} dev flannel.1 onlink", p.subnet)?;
        writeln!(nh, "nexthop replace id {} via {gw} dev flannel.1 onlink", u32::from(gw))?;
        writeln!(nh, "route replace {} nhid {}", p.subnet, u32::from(gw))?;
    }
    let files = BatchFiles {
        neigh: dir.join(format!("neigh-{n}")),
        fdb: dir.join(format!("fdb-{n}")),
        routes: dir.join(format!("routes-{n}")),
        nexthop_routes: dir.join(format!("nh-{n}")),
    };
    std::fs::write(&files.neigh, neigh)?;
    std::fs::write(&files.fdb, fdb)?;
    std::fs::write(&files.routes, routes)?;
    std::fs::write(&files.nexthop_routes, nh)?;
    Ok(files)
}

fn run_tool(ns: &NetNs, tool: &str, file: &Path) -> Result<()> {
    let out = Command::new(tool)
        .args(["-n", ns.name(), "-batch"])
        .arg(file)
        .output()
        .with_context(|| format!("running {tool} -batch"))?;
    ensure!(out.status.success(), "{tool} -batch {} failed: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn count_routes(ns: &NetNs) -> Result<usize> {
    Ok(ns.ip(&["route", "show", "dev", "flannel.1"])?.lines().count())
}

/// flannel's commands: neighbours, FDB, gateway routes.
fn iproute_flannel(files: &BatchFiles, n: u32) -> Result<Duration> {
    let ns = fresh_node()?;
    flannel_device(&ns)?;
    let started = Instant::now();
    run_tool(&ns, "ip", &files.neigh)?;
    run_tool(&ns, "bridge", &files.fdb)?;
    run_tool(&ns, "ip", &files.routes)?;
    let took = started.elapsed();
    ensure!(count_routes(&ns)? == n as usize, "ip -batch programmed a wrong route count");
    Ok(took)
}

/// The objects netd writes (nexthops + nhid routes) through iproute2.
fn iproute_nexthops(files: &BatchFiles, n: u32) -> Result<Duration> {
    let ns = fresh_node()?;
    flannel_device(&ns)?;
    let started = Instant::now();
    run_tool(&ns, "ip", &files.neigh)?;
    run_tool(&ns, "bridge", &files.fdb)?;
    run_tool(&ns, "ip", &files.nexthop_routes)?;
    let took = started.elapsed();
    ensure!(count_routes(&ns)? == n as usize, "ip -batch (nexthops) programmed a wrong route count");
    Ok(took)
}

struct RestoreRun {
    wall: Duration,
    reconcile: Duration,
    writes: u64,
}

/// `netd restore` in `ns` from `snapshot`, spawned from a thread inside the
/// namespace so no `ip netns exec` start-up is timed.
fn netd_restore(netd: &Path, ns: &NetNs, snapshot: &Path) -> Result<RestoreRun> {
    let (wall, out) = ns.run(|| {
        let started = Instant::now();
        let out = Command::new(netd).args(["restore", "--json", "--snapshot"]).arg(snapshot).output();
        (started.elapsed(), out)
    })?;
    let out = out.context("spawning netd restore")?;
    ensure!(out.status.success(), "netd restore failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing netd restore --json")?;
    ensure!(report["failures"] == 0 && report["rejected"] == 0, "netd restore reported problems: {report}");
    Ok(RestoreRun {
        wall,
        reconcile: Duration::from_secs_f64(report["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0),
        writes: report["writes"].as_u64().unwrap_or(0),
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    percentile(&v, 0.5)
}

/// Runs the VXLAN benchmark and prints README tables.
pub fn run(reps: usize, bin_dir: &Path) -> Result<()> {
    let netd = bin_dir.join("netd");
    let Some(_kernel) = testing::privileged()? else { bail!("the VXLAN benchmark needs root") };
    let dir = tempfile::tempdir()?;
    println!("machine: {}", machine());
    println!("\nprogramming N peers from empty, median of {reps} runs, each in a fresh namespace:\n");
    println!("| N | `ip`/`bridge -batch`, flannel's commands | `ip -batch` with nexthops (kernel floor via iproute2) | `netd restore` wall (process start → done) | netd reconcile in-process | speed-up vs flannel's commands |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut wall_by_n = Vec::new();
    for n in [1_000u32, 5_000, 10_000] {
        let files = write_batches(dir.path(), n)?;
        let snapshot = dir.path().join(format!("snapshot-{n}.json"));
        Snapshot::new(config(), (1..=n).map(peer).collect()).save(&snapshot)?;
        let (mut flannel, mut floor, mut wall, mut inproc) = (vec![], vec![], vec![], vec![]);
        for _ in 0..reps {
            flannel.push(iproute_flannel(&files, n)?);
            floor.push(iproute_nexthops(&files, n)?);
            let ns = fresh_node()?;
            let run = netd_restore(&netd, &ns, &snapshot)?;
            ensure!(run.writes == 4 * u64::from(n), "netd wrote {} changes for {n} peers", run.writes);
            ensure!(count_routes(&ns)? == n as usize, "netd programmed a wrong route count");
            wall.push(run.wall);
            inproc.push(run.reconcile);
        }
        let (flannel, floor, wall, inproc) = (median(flannel), median(floor), median(wall), median(inproc));
        println!(
            "| {n} | {} ms | {} ms | {} ms | {} ms | {:.1}× |",
            ms(flannel),
            ms(floor),
            ms(wall),
            ms(inproc),
            flannel.as_secs_f64() / wall.as_secs_f64()
        );
        wall_by_n.push((n, wall));
    }
    if let [_, (_, five), (_, ten)] = wall_by_n[..] {
        println!("\nlinearity: 10 000 / 5 000 peers = {:.2}× (goal ≤ 2.2×)", ten.as_secs_f64() / five.as_secs_f64());
    }

    // No-op reconcile of 5 000 programmed peers: a second `netd restore` on
    // a programmed namespace dumps everything and writes nothing.
    let snapshot = dir.path().join("snapshot-5000.json");
    let ns = fresh_node()?;
    netd_restore(&netd, &ns, &snapshot)?;
    let mut noop = Vec::new();
    for _ in 0..reps.max(5) * 2 {
        let run = netd_restore(&netd, &ns, &snapshot)?;
        ensure!(run.writes == 0, "no-op reconcile wrote {} changes", run.writes);
        noop.push(run.reconcile);
    }
    println!("\nno-op reconcile, 5 000 programmed peers: median {} ms, 0 writes (goal ≤ 20 ms)", ms(median(noop)));

    // Snapshot restore, 1 000 peers: process start to all programmed.
    let snapshot = dir.path().join("snapshot-1000.json");
    let mut restore = Vec::new();
    for _ in 0..reps.max(5) {
        let ns = fresh_node()?;
        restore.push(netd_restore(&netd, &ns, &snapshot)?.wall);
    }
    println!(
        "snapshot restore, 1 000 peers, process start → programmed: median {} ms (goal ≤ 100 ms)",
        ms(median(restore))
    );
    Ok(())
}
