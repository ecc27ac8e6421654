//! `cargo xtask bench events`: one registry event's cost with N peers
//! already programmed — a peer added, its public IP changed, then removed —
//! from the event handed to the data plane to the kernel's acknowledgement.
//!
//! Side by side, alternating in every repetition, each in its own
//! namespace holding N programmed peers:
//! - **ours**: the overlay thread's incremental path (`Overlay::apply_and_wait`):
//!   journal line fsynced, then only that peer's netlink writes;
//! - **floor**: the same netlink writes from `Reconciler::apply` in the
//!   calling thread (no thread hop, no journal);
//! - **anchor**: flannel's per-event work spelled as `ip`/`bridge` commands
//!   on flannel's own layout (neighbour, FDB entry, gateway route);
//! - **full pass** (netd before the incremental path, fewer repetitions):
//!   the whole peer set handed over, four dumps, a diff, a snapshot rewrite.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netd::testing::{self, synthetic_config as config, synthetic_node as fresh_node, synthetic_peer as peer, NetNs};
use netd::vxlan::{Applied, Lease, Overlay, OverlayOptions, PeerChange, Reconciler};

use crate::bench::{machine, percentile, Scale};
use crate::bench_vxlan::{flannel_device, Settle};

const KINDS: [&str; 3] = ["add", "change", "remove"];

/// Latencies per event kind.
#[derive(Default)]
struct Samples([Vec<Duration>; 3]);

impl Samples {
    fn cell(&mut self, kind: usize) -> String {
        let v = &mut self.0[kind];
        v.sort();
        format!("{} / {} ms", us_ms(percentile(v, 0.5)), us_ms(percentile(v, 0.99)))
    }

    fn median(&mut self, kind: usize) -> Duration {
        self.0[kind].sort();
        percentile(&self.0[kind], 0.5)
    }
}

fn us_ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// The peer that comes and goes, and its moved form.
fn event_peer(n: u32) -> (Lease, Lease) {
    let lease = peer(n + 1);
    let moved = Lease { public_ip: std::net::Ipv4Addr::new(172, 31, 255, 254), ..lease.clone() };
    (lease, moved)
}

fn upsert(lease: &Lease) -> PeerChange {
    PeerChange::Upsert { lease: lease.clone(), autonomous: false }
}

/// Runs `ip`/`bridge` commands one after the other inside `ns`, as
/// flannel's per-event path does its netlink calls one by one.
fn commands(ns: &NetNs, list: &[(&str, Vec<String>)]) -> Result<Duration> {
    ns.run(|| -> Result<Duration> {
        let started = Instant::now();
        for (tool, args) in list {
            let out = Command::new(tool).args(args).output().with_context(|| format!("running {tool}"))?;
            ensure!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(started.elapsed())
    })?
}

fn anchor_events(ns: &NetNs, n: u32) -> Result<[Duration; 3]> {
    let (lease, moved) = event_peer(n);
    let (gw, mac, subnet) = (lease.subnet.network().to_string(), lease.vtep_mac.to_string(), lease.subnet.to_string());
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let add = commands(
        ns,
        &[
            ("ip", s(&["neigh", "replace", &gw, "lladdr", &mac, "dev", "flannel.1", "nud", "permanent"])),
            (
                "bridge",
                s(&[
                    "fdb",
                    "replace",
                    &mac,
                    "dev",
                    "flannel.1",
                    "dst",
                    &lease.public_ip.to_string(),
                    "self",
                    "permanent",
                ]),
            ),
            ("ip", s(&["route", "replace", &subnet, "via", &gw, "dev", "flannel.1", "onlink"])),
        ],
    )?;
    let change = commands(
        ns,
        &[(
            "bridge",
            s(&["fdb", "replace", &mac, "dev", "flannel.1", "dst", &moved.public_ip.to_string(), "self", "permanent"]),
        )],
    )?;
    let remove = commands(
        ns,
        &[
            ("ip", s(&["route", "del", &subnet, "via", &gw, "dev", "flannel.1", "onlink"])),
            ("bridge", s(&["fdb", "del", &mac, "dev", "flannel.1", "dst", &moved.public_ip.to_string(), "self"])),
            ("ip", s(&["neigh", "del", &gw, "dev", "flannel.1"])),
        ],
    )?;
    Ok([add, change, remove])
}

fn ours_events(overlay: &Overlay, n: u32) -> Result<[Duration; 3]> {
    let (lease, moved) = event_peer(n);
    let mut out = [Duration::ZERO; 3];
    for (slot, (change, writes)) in
        out.iter_mut().zip([(upsert(&lease), 4), (upsert(&moved), 1), (PeerChange::Remove(lease.subnet), 4)])
    {
        let started = Instant::now();
        let report = overlay.apply_and_wait(vec![change])?;
        *slot = started.elapsed();
        ensure!(report.writes == writes && report.failures.is_empty(), "overlay wrote {report:?}");
    }
    Ok(out)
}

fn floor_events(ns: &NetNs, reconciler: &mut Reconciler, n: u32) -> Result<[Duration; 3]> {
    let (lease, moved) = event_peer(n);
    // The reconciler's socket is bound to its namespace: no setns needed.
    let _ = ns;
    let mut out = [Duration::ZERO; 3];
    for (slot, change) in out.iter_mut().zip([upsert(&lease), upsert(&moved), PeerChange::Remove(lease.subnet)]) {
        let started = Instant::now();
        let applied = reconciler.apply(&[change])?;
        *slot = started.elapsed();
        match applied {
            Applied::Done(report) if report.failures.is_empty() => {}
            other => bail!("floor apply: {other:?}"),
        }
    }
    Ok(out)
}

/// flannel's layout for N peers, through `ip -batch`/`bridge -batch`.
fn flannel_layout(ns: &NetNs, dir: &Path, n: u32) -> Result<()> {
    use std::fmt::Write as _;
    flannel_device(ns)?;
    let (mut ip, mut fdb) = (String::new(), String::new());
    for i in 1..=n {
        let p = peer(i);
        let gw = p.subnet.network();
        writeln!(ip, "neigh replace {gw} lladdr {} dev flannel.1 nud permanent", p.vtep_mac)?;
        writeln!(ip, "route replace {} via {gw} dev flannel.1 onlink", p.subnet)?;
        writeln!(fdb, "fdb replace {} dev flannel.1 dst {} self permanent", p.vtep_mac, p.public_ip)?;
    }
    let (ip_file, fdb_file) = (dir.join("anchor-ip"), dir.join("anchor-fdb"));
    std::fs::write(&ip_file, ip)?;
    std::fs::write(&fdb_file, fdb)?;
    for (tool, file) in [("bridge", &fdb_file), ("ip", &ip_file)] {
        let out = Command::new(tool).args(["-n", ns.name(), "-batch"]).arg(file).output()?;
        ensure!(out.status.success(), "{tool} -batch: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Runs the per-event benchmark and prints the book's table.
pub fn run(reps: usize) -> Result<()> {
    let Some(_kernel) = testing::privileged()? else { bail!("the event benchmark needs root") };
    let dir = tempfile::tempdir()?;
    println!("machine: {}", machine());
    println!(
        "\none peer added, its public IP changed, then removed, with N peers programmed; event handed over → \
         kernel acknowledged, median / p99 of {reps} events per kind, variants alternating:\n"
    );
    println!("| N | event | netd (journal fsync + writes) | floor: same writes, no journal, no thread | anchor: flannel's `ip`/`bridge` commands | netd ÷ anchor | netd ÷ floor |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: |");
    let mut notes = Vec::new();
    // Each N starts once the previous one's namespaces are gone (see Settle).
    let mut settle = Settle::new()?;
    for n in Scale::sized([1_000u32, 10_000], [20, 100]) {
        let peers: Vec<Lease> = (1..=n).map(peer).collect();
        let ours_ns = fresh_node()?;
        let snapshot = dir.path().join(format!("snapshot-{n}.json"));
        let options = OverlayOptions {
            snapshot: Some(snapshot.clone()),
            // No periodic pass inside the measurement.
            resync_period: Duration::from_secs(3600),
            ..OverlayOptions::default()
        };
        let overlay = ours_ns.run(|| Overlay::start(config(), peers.clone(), options))??;
        overlay.reconcile_now()?;
        let floor_ns = fresh_node()?;
        let mut reconciler = floor_ns.run(|| -> Result<Reconciler> {
            let mut r = Reconciler::new(config())?;
            r.reconcile(&peers)?;
            Ok(r)
        })??;
        let anchor_ns = fresh_node()?;
        flannel_layout(&anchor_ns, dir.path(), n)?;

        settle.wait()?;
        let (mut ours, mut floor, mut anchor) = (Samples::default(), Samples::default(), Samples::default());
        // Let start-up settle (the device creation's own link events get
        // one confirming pass), then count passes from here.
        std::thread::sleep(Duration::from_millis(200));
        let settled = overlay.status();
        let bytes_before = settled.snapshot_bytes_written;
        for rep in 0..reps {
            // Rotate who goes first, so no variant always runs right after another.
            for variant in 0..3 {
                match (rep + variant) % 3 {
                    0 => push(&mut ours, ours_events(&overlay, n)?),
                    1 => push(&mut floor, floor_events(&floor_ns, &mut reconciler, n)?),
                    _ => push(&mut anchor, anchor_events(&anchor_ns, n)?),
                }
            }
        }
        let status = overlay.status();
        ensure!(status.reconciles == settled.reconciles, "a full pass ran during the events: {status:?}");
        ensure!(status.applies == settled.applies + 3 * reps as u64, "events not applied one by one: {status:?}");
        let bytes = (status.snapshot_bytes_written - bytes_before) as f64 / (3 * reps) as f64;
        let snapshot_size = std::fs::metadata(&snapshot)?.len();

        // netd before the incremental path: every event a full pass and a
        // snapshot rewrite.
        let full_reps = reps.clamp(1, 20);
        let mut full = Vec::new();
        let before = overlay.status().snapshot_bytes_written;
        let (lease, _) = event_peer(n);
        for _ in 0..full_reps {
            let mut with = peers.clone();
            with.push(lease.clone());
            let started = Instant::now();
            overlay.set_peers_and_wait(with)?;
            full.push(started.elapsed());
            overlay.set_peers_and_wait(peers.clone())?;
        }
        full.sort();
        let full_bytes = (overlay.status().snapshot_bytes_written - before) as f64 / (2 * full_reps) as f64;
        overlay.stop();

        for (kind, name) in KINDS.iter().enumerate() {
            let (o, f, a) = (ours.median(kind), floor.median(kind), anchor.median(kind));
            println!(
                "| {n} | {name} | {} | {} | {} | {:.2}× | {:.2}× |",
                ours.cell(kind),
                floor.cell(kind),
                anchor.cell(kind),
                o.as_secs_f64() / a.as_secs_f64(),
                o.as_secs_f64() / f.as_secs_f64()
            );
        }
        notes.push(format!(
            "N = {n}: netd wrote {bytes:.0} bytes to disk per event (one journal line; the snapshot itself is {} KB and is \
             rewritten only by compaction: on the 30 s periodic pass, or after N journal lines); before the incremental \
             path an add took {} / {} ms (median / p99 of {full_reps}: full pass + snapshot rewrite) and wrote {full_bytes:.0} bytes",
            snapshot_size / 1024,
            us_ms(percentile(&full, 0.5)),
            us_ms(percentile(&full, 0.99)),
        ));
        for ns in [ours_ns, floor_ns, anchor_ns] {
            settle.clear(ns)?;
        }
    }
    println!();
    for note in notes {
        println!("- {note}");
    }
    Ok(())
}

fn push(samples: &mut Samples, events: [Duration; 3]) {
    for (kind, d) in events.into_iter().enumerate() {
        samples.0[kind].push(d);
    }
}
