//! `netd`: the per-node data-plane agent.
//!
//! Subcommands:
//! - `netd run …`: the daemon (see `netd::daemon`).
//! - `netd cleanup …`: remove what netd made in this network namespace.
//! - `netd registry init --db PATH --network CIDR`: create an embedded registry.
//! - `netd restore [--snapshot PATH]`: program the overlay from the offline
//!   snapshot (device, peers) and exit — what the daemon does first on every
//!   start, before it talks to any registry; usable on its own from a boot
//!   script when the cloud is unreachable.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use netd::daemon::DaemonConfig;
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::NetworkConfig;
use netd::vxlan::snapshot::{self, Snapshot};
use netd::vxlan::Reconciler;

const USAGE: &str = "\
usage: netd <command> [options]

commands:
  run [options]               the per-node daemon (`netd run --help` for options)
  cleanup [run options] [--purge-state]
                              remove the VXLAN device, its entries, masquerade rules and
                              subnet.env; --purge-state also the snapshot and VTEP MAC store
  registry init --db PATH --network CIDR [--subnet-len N] [--vni N]
                              create an embedded registry file
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

fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", netd::daemon::config::RUN_USAGE);
        return Ok(());
    }
    init_logging();
    let config = DaemonConfig::from_args(args, |k| std::env::var(k).ok()).map_err(anyhow::Error::msg)?;
    netd::daemon::run(config)?;
    Ok(())
}

fn cleanup(args: &[String]) -> Result<()> {
    let purge = args.iter().any(|a| a == "--purge-state");
    let rest: Vec<String> = args.iter().filter(|a| *a != "--purge-state").cloned().collect();
    let config = DaemonConfig::from_args(&rest, |k| std::env::var(k).ok()).map_err(anyhow::Error::msg)?;
    for line in netd::daemon::cleanup(&config, purge).map_err(anyhow::Error::msg)? {
        println!("{line}");
    }
    Ok(())
}

fn registry(args: &[String]) -> Result<()> {
    let Some("init") = args.first().map(String::as_str) else {
        bail!("usage: netd registry init --db PATH --network CIDR")
    };
    let (mut db, mut network, mut subnet_len, mut vni) = (None, None, 24u8, 1u32);
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        let value = rest.next().with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--db" => db = Some(PathBuf::from(value)),
            "--network" => {
                network = Some(value.parse::<ipnet::Ipv4Net>().with_context(|| format!("--network {value:?}"))?)
            }
            "--subnet-len" => subnet_len = value.parse().with_context(|| format!("--subnet-len {value:?}"))?,
            "--vni" => vni = value.parse().with_context(|| format!("--vni {value:?}"))?,
            other => bail!("registry init: unknown option `{other}`"),
        }
    }
    let db = db.context("registry init needs --db PATH")?;
    let network = network.context("registry init needs --network CIDR")?.trunc();
    let config = NetworkConfig { network, subnet_len, vni };
    EmbeddedRegistry::create(&db, &config)?;
    println!("embedded registry {} ready: network {network}, /{subnet_len} subnets, VNI {vni}", db.display());
    Ok(())
}

fn init_logging() {
    let level = match std::env::var("NETD_LOG").as_deref() {
        Ok("debug") => tracing::Level::DEBUG,
        Ok("warn") => tracing::Level::WARN,
        Ok("error") => tracing::Level::ERROR,
        Ok("trace") => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("cleanup") => cleanup(&args[1..]),
        Some("registry") => registry(&args[1..]),
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
