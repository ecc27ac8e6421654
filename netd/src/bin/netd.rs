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
//!
//! The command line is declared here with clap; the options shared by `run`
//! and `cleanup` are `netd::daemon::config::RunArgs`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use netd::daemon::config::{parse_command_line, RunArgs};
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::NetworkConfig;
use netd::vxlan::snapshot::{self, Snapshot};
use netd::vxlan::Reconciler;

const EXAMPLES: &str = "\
Examples:
  netd run --registry etcd:http://10.0.0.1:2379 --iface eth0
  NETD_CONFIG=/etc/netd.json netd run --masquerade
  netd restore --json
  netd cleanup --purge-state
  netd registry init --db /var/lib/netd/registry.db --network 10.244.0.0/16

Settings: defaults < --config FILE (JSON, camelCase keys) < NETD_* variables < flags.
`netd <COMMAND> --help` for a command's options.";

const RUN_EXAMPLES: &str = "\
Settings: defaults < --config FILE (JSON, camelCase keys) < NETD_* variables < flags.

Examples:
  netd run --registry embedded:/var/lib/netd/registry.db --iface eth0
  netd run --registry kubernetes:https://10.0.0.1:6443 --token-file /run/token \\
      --ca-file /run/ca.crt --network 10.244.0.0/16
  NETD_IFACE=eth1 netd run --config /etc/netd.json --masquerade=false
  netd run --config /etc/netd.json --print-config > effective.json";

const CLEANUP_EXAMPLES: &str = "\
Examples:
  netd cleanup                      # keep the snapshot and VTEP MAC store for a re-install
  netd cleanup --purge-state --state-dir /var/lib/netd";

/// The per-node edge-networking agent: flannel-compatible VXLAN with pinned
/// VTEP MACs that comes back from its snapshot without the cloud.
#[derive(Debug, Parser)]
#[command(name = "netd", version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the per-node daemon.
    #[command(after_help = RUN_EXAMPLES, args_override_self = true)]
    Run {
        #[command(flatten)]
        args: RunArgs,
        /// Print the effective configuration as a --config file and exit.
        #[arg(long)]
        print_config: bool,
        /// Log level.
        #[arg(long, env = "NETD_LOG", value_name = "LEVEL", value_enum, ignore_case = true)]
        log: Option<LogLevel>,
    },
    /// Remove the VXLAN device, its entries, the masquerade rules and subnet.env.
    #[command(after_help = CLEANUP_EXAMPLES, args_override_self = true)]
    Cleanup {
        #[command(flatten)]
        args: RunArgs,
        /// Also remove the snapshot and the VTEP MAC store.
        #[arg(long)]
        purge_state: bool,
    },
    /// The embedded registry.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Program the overlay from the offline snapshot and exit.
    #[command(after_help = "Example:\n  netd restore --snapshot /var/lib/netd/snapshot.json --json")]
    Restore(RestoreArgs),
}

#[derive(Debug, Subcommand)]
enum RegistryCommand {
    /// Create an embedded registry file.
    #[command(after_help = "Example:\n  netd registry init --db /var/lib/netd/registry.db --network 10.244.0.0/16")]
    Init(RegistryInitArgs),
}

#[derive(Debug, Args)]
struct RegistryInitArgs {
    /// The SQLite file to create.
    #[arg(long, value_name = "PATH")]
    db: PathBuf,
    /// Cluster network.
    #[arg(long, value_name = "CIDR")]
    network: ipnet::Ipv4Net,
    /// Prefix length of each node's subnet.
    #[arg(long, value_name = "N", default_value_t = 24)]
    subnet_len: u8,
    /// VXLAN network identifier.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vni: u32,
}

#[derive(Debug, Args)]
struct RestoreArgs {
    /// The snapshot to program.
    #[arg(long, value_name = "PATH", default_value = snapshot::DEFAULT_PATH)]
    snapshot: PathBuf,
    /// Print the outcome as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

fn restore(args: RestoreArgs) -> Result<()> {
    let RestoreArgs { snapshot: path, json } = args;
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

fn run(args: RunArgs, print_config: bool, log: Option<LogLevel>) -> Result<()> {
    let config = args.resolve().map_err(anyhow::Error::msg)?;
    if print_config {
        println!("{}", config.to_config_file().map_err(anyhow::Error::msg)?);
        return Ok(());
    }
    init_logging(log.unwrap_or(LogLevel::Info));
    limit_malloc_arenas();
    netd::daemon::run(config)?;
    Ok(())
}

/// glibc gives every thread that allocates its own malloc arena; the
/// daemon's few mostly idle threads (overlay, dumps, the blocking pool)
/// then hold ~0.7 MiB of arenas, a third of its anonymous memory with
/// 1 000 peers. Two arenas are plenty for them; edge boxes are small.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; it is called before the
    // daemon starts any thread, and M_ARENA_MAX takes any positive count.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn cleanup(args: RunArgs, purge_state: bool) -> Result<()> {
    let config = args.resolve().map_err(anyhow::Error::msg)?;
    for line in netd::daemon::cleanup(&config, purge_state).map_err(anyhow::Error::msg)? {
        println!("{line}");
    }
    Ok(())
}

fn registry_init(args: RegistryInitArgs) -> Result<()> {
    let RegistryInitArgs { db, network, subnet_len, vni } = args;
    let network = network.trunc();
    let config = NetworkConfig { network, subnet_len, vni };
    EmbeddedRegistry::create(&db, &config)?;
    println!("embedded registry {} ready: network {network}, /{subnet_len} subnets, VNI {vni}", db.display());
    Ok(())
}

fn init_logging(level: LogLevel) {
    let level = match level {
        LogLevel::Error => tracing::Level::ERROR,
        LogLevel::Warn => tracing::Level::WARN,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Trace => tracing::Level::TRACE,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli: Cli = parse_command_line(std::env::args_os()).unwrap_or_else(|error| error.exit());
    let outcome = match cli.command {
        Command::Run { args, print_config, log } => run(args, print_config, log),
        Command::Cleanup { args, purge_state } => cleanup(args, purge_state),
        Command::Registry(RegistryCommand::Init(args)) => registry_init(args),
        Command::Restore(args) => restore(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("netd: {error:#}");
            ExitCode::FAILURE
        }
    }
}
