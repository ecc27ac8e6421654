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
//! - `netd install-cni`: the IPAM plugin and the CNI conflist onto the host,
//!   atomically (see `netd::cni::install`).
//! - `netd hub …`: the kubelet's caching proxy (see `netd::hub`).
//! - `netd tunnel-agent …`: the edge tunnel's agent (see `netd::tunnel`).
//!
//! What only cloud nodes run (the tunnel server, the eBPF DNAT, the
//! certificate authority) is `netd-cloud`; this binary links none of it.
//!
//! The command line is `netd::cli::netd` (clap; the CLI reference and man
//! pages are generated from it); the options shared by `run` and `cleanup`
//! are `netd::daemon::config::RunArgs`.

use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use netd::cli::netd::{
    Cli, Command, HubArgs, InstallCniArgs, RegistryCommand, RegistryInitArgs, RestoreArgs, TokenCommand,
    TokenRegistryArgs, TunnelAgentArgs,
};
use netd::cmd::{init_logging, until_terminated, LogFormat, LogLevel};
use netd::daemon::config::{parse_command_line, RunArgs};
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::NetworkConfig;
use netd::vxlan::snapshot::Snapshot;
use netd::vxlan::Reconciler;

fn hub(args: HubArgs) -> Result<()> {
    init_logging(args.log.log, args.log.format.log_format);
    if args.init {
        let done = netd::hub::init_pki(&args.cache_dir)?;
        match &done {
            netd::hub::PkiInit::Kept(ca) => println!("the hub's CA is there: kept {}", ca.display()),
            netd::hub::PkiInit::Created(ca) => println!("made the hub's CA: {}", ca.display()),
        }
        return Ok(());
    }
    // clap requires the three unless --init.
    let (Some(node_name), Some(server), Some(ca_file)) = (args.node_name, args.server, args.ca_file) else {
        bail!("netd hub needs --node-name, --server and --ca-file (or --init)");
    };
    let config = netd::hub::HubConfig {
        node_name,
        server,
        ca_file,
        client_ca_file: args.client_ca_file,
        client_cert: netd::kube::ClientCertFiles { cert: args.client_cert, key: args.client_key },
        listen: args.listen,
        metrics_listen: Some(args.metrics_listen),
        cache_dir: args.cache_dir,
        cache: args.cache,
        probe_interval: args.probe_interval,
        upstream_timeout: args.upstream_timeout,
        max_connections: args.max_connections,
    };
    limit_malloc_arenas();
    until_terminated("edge hub", args.runtime, |stop| async move {
        Ok::<(), anyhow::Error>(netd::hub::run(config, stop).await?)
    })
}

fn install_cni(args: InstallCniArgs) -> Result<()> {
    let plan = netd::cni::install::InstallPlan {
        plugin: args.plugin,
        bin_dir: args.bin_dir,
        conflist: args.conflist,
        conf_dir: args.conf_dir,
        conf_name: args.conf_name,
        // `--remove ''` (or NETD_CNI_REMOVE=) is how one asks for none.
        remove: args.remove.into_iter().filter(|name| !name.is_empty()).collect(),
    };
    for action in netd::cni::install::install(&plan)? {
        println!("{action}");
    }
    Ok(())
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

fn run(args: RunArgs, print_config: bool, log: Option<LogLevel>, log_format: LogFormat) -> Result<()> {
    let config = args.resolve().map_err(anyhow::Error::msg)?;
    if print_config {
        println!("{}", config.to_config_file().map_err(anyhow::Error::msg)?);
        return Ok(());
    }
    init_logging(log.unwrap_or(LogLevel::Info), log_format);
    limit_malloc_arenas();
    // Blocking calls are few and sequential (one registry, one overlay):
    // a handful of threads, not tokio's default of 512.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(4).build()?;
    let outcome = runtime.block_on(async {
        let stop = netd::cmd::stop_signal("netd")?;
        Ok::<_, anyhow::Error>(netd::daemon::run(config, stop).await?)
    });
    runtime.shutdown_timeout(netd::daemon::SHUTDOWN_GRACE);
    outcome
}

/// glibc gives every thread that allocates its own malloc arena; the
/// daemon's few mostly idle threads (overlay, dumps, the blocking pool)
/// then hold ~0.7 MiB of arenas, a third of its anonymous memory with
/// 1 000 peers. Two arenas are plenty for them; edge boxes are small. The
/// hub parses lists on the blocking pool's threads: with an arena each,
/// 1 000 lists of 100 pods left it at 90–140 MiB (`cargo xtask bench hub`).
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

fn registry_token(command: TokenCommand) -> Result<()> {
    use netd::registry::{AnyTokenStore, TokenRecord, TokenStore as _};
    let spec = |args: &TokenRegistryArgs| {
        args.registry.registry.clone().context("--registry is required: embedded:PATH or etcd:URL")
    };
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        match command {
            TokenCommand::Create(args) => {
                let mut store = AnyTokenStore::open(&spec(&args.registry)?).await?;
                let (id, secret) = netd::registry::tokens::generate_token()?;
                let ttl = Some(args.ttl).filter(|ttl| !ttl.is_zero());
                let record = TokenRecord::new(&id, &secret, ttl, &args.description, std::time::SystemTime::now());
                store.put_token(&record).await?;
                println!("{id}.{secret}");
            }
            TokenCommand::List(args) => {
                let mut store = AnyTokenStore::open(&spec(&args)?).await?;
                println!("{:<8} {:<12} DESCRIPTION", "ID", "TTL");
                for record in store.tokens().await? {
                    let ttl = match record.remaining(std::time::SystemTime::now()) {
                        None => "<forever>".to_string(),
                        Some(0) => "<expired>".to_string(),
                        Some(secs) => netd::model::autonomy::format_go_duration(std::time::Duration::from_secs(secs)),
                    };
                    println!("{:<8} {ttl:<12} {}", record.id, record.description);
                }
            }
            TokenCommand::Delete(args) => {
                let mut store = AnyTokenStore::open(&spec(&args.registry)?).await?;
                if !store.delete_token(&args.id).await? {
                    bail!("no bootstrap token {} in the registry", args.id);
                }
                println!("bootstrap token {} deleted", args.id);
            }
        }
        Ok(())
    })
}

fn tunnel_agent(args: TunnelAgentArgs) -> Result<()> {
    init_logging(args.log.log, args.log.format.log_format);
    let settings = netd::tunnel::run::AgentSettings {
        servers: args.servers,
        server_name: args.server_name,
        certs: netd::tunnel::certs::CertFiles::in_dir(&args.certs.cert_dir, "node"),
        node_addresses: args.node_ip,
        pod_subnets: args.pod_subnet,
        subnet_env: netd::subnet_env::DEFAULT_PATH.into(),
        extra_ports: args.extra_ports,
        dial_loopback: args.dial_loopback,
        metrics_listen: Some(args.metrics_listen),
    };
    until_terminated("tunnel agent", args.runtime, |stop| async move {
        Ok::<(), anyhow::Error>(netd::tunnel::run::run_agent(settings, stop).await?)
    })
}

fn main() -> ExitCode {
    let cli: Cli = parse_command_line(std::env::args_os()).unwrap_or_else(|error| error.exit());
    let outcome = match cli.command {
        Command::Run { args, print_config, log, log_format } => run(args, print_config, log, log_format.log_format),
        Command::Cleanup { args, purge_state } => cleanup(args, purge_state),
        Command::Registry(RegistryCommand::Init(args)) => registry_init(args),
        Command::Registry(RegistryCommand::Token(command)) => registry_token(command),
        Command::Restore(args) => restore(args),
        Command::TunnelAgent(args) => tunnel_agent(args),
        Command::InstallCni(args) => install_cni(args),
        Command::Hub(args) => hub(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("netd: {error:#}");
            ExitCode::FAILURE
        }
    }
}
