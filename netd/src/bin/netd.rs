//! `netd`: the per-node data-plane agent.
//!
//! Subcommands:
//! - `netd restore [--snapshot PATH]`: program the overlay from the offline
//!   snapshot (device, peers) and exit — what the daemon does first on every
//!   start, before it talks to any registry; usable on its own from a boot
//!   script when the cloud is unreachable.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use netd::snapshot::{self, Snapshot};
use netd::vxlan::Reconciler;

const USAGE: &str = "\
usage: netd <command> [options]

commands:
  restore [--snapshot PATH] [--json]
                              program the overlay from the offline snapshot and exit
                              (default PATH: /var/lib/netd/snapshot.json; --json: print
                              the outcome as one JSON object)
";

fn restore(args: &[String]) -> Result<()> {
    let mut path = PathBuf::from(snapshot::DEFAULT_PATH);
    let mut json = false;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--json" => json = true,
            "--snapshot" => path = rest.next().context("--snapshot needs a path")?.into(),
            other => bail!("restore: unknown option `{other}`\n{USAGE}"),
        }
    }
    let Some(snapshot) = Snapshot::load(&path)? else {
        bail!("no snapshot at {}: nothing to restore (the daemon writes one once it has a lease)", path.display());
    };
    let device = snapshot.config.device_name();
    let mut reconciler = Reconciler::new(snapshot.config)?;
    let report = reconciler.reconcile(&snapshot.peers)?;
    for rejected in &report.rejected {
        eprintln!("netd: {rejected}");
    }
    for failure in &report.failures {
        eprintln!("netd: {failure}");
    }
    if json {
        let outcome = serde_json::json!({
            "device": device,
            "peers": report.peers,
            "rejected": report.rejected.len(),
            "writes": report.writes,
            "removed": report.removed,
            "failures": report.failures.len(),
            "elapsed_ms": report.elapsed.as_secs_f64() * 1000.0,
        });
        println!("{outcome}");
    } else {
        println!(
            "restored {device} from {}: {} peers, {} writes, {:.1} ms",
            path.display(),
            report.peers,
            report.writes,
            report.elapsed.as_secs_f64() * 1000.0
        );
    }
    if !report.failures.is_empty() {
        bail!("{} kernel writes failed", report.failures.len());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("restore") => restore(&args[1..]),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown command `{other}`\n{USAGE}")),
        None => Err(anyhow::anyhow!("no command given\n{USAGE}")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("netd: {error:#}");
            ExitCode::FAILURE
        }
    }
}
