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
//! The command line is declared here with clap; the options shared by `run`
//! and `cleanup` are `netd::daemon::config::RunArgs`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use netd::cmd::{init_logging, until_terminated, LogArgs, LogLevel, TunnelCertArgs};
use netd::daemon::config::{parse_command_line, parse_duration, RunArgs};
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
    /// The edge tunnel's agent on an edge node: dials out to every server, serves its own node.
    #[command(after_help = TUNNEL_AGENT_EXAMPLES)]
    TunnelAgent(TunnelAgentArgs),
    /// Program the overlay from the offline snapshot and exit.
    #[command(after_help = "Example:\n  netd restore --snapshot /var/lib/netd/snapshot.json --json")]
    Restore(RestoreArgs),
    /// Install the IPAM plugin and the CNI conflist on the host (the DaemonSet's init container).
    #[command(after_help = INSTALL_CNI_EXAMPLES)]
    InstallCni(InstallCniArgs),
    /// The edge hub: the kubelet's caching proxy to kube-apiserver, serving from its cache while the cloud is unreachable.
    #[command(after_help = HUB_EXAMPLES)]
    Hub(HubArgs),
}

const HUB_EXAMPLES: &str = "\
The kubelet's kubeconfig names https://127.0.0.1:10261 with the hub's CA
(<cache-dir>/pki/ca.crt) and the kubelet's own client certificate; the hub
accepts only that certificate's identity (system:node:<node>). The kubelet
reads that CA when it starts: `netd hub --init` makes it (and nothing else)
before the kubelet's first start; netd-join does the same.

By default (--cache=auto) the hub follows the node's autonomy annotation
(node.beta.alibabacloud.com/autonomy=true, as netd-autonomy sets it):
autonomous, it caches and answers from its cache while the cloud is away;
not autonomous, it is a plain pass-through and its cache is removed.

Examples:
  netd hub --init --cache-dir /var/lib/netd/hub
  netd hub --node-name edge-1 --server https://10.0.0.1:6443 --ca-file /etc/kubernetes/pki/ca.crt \\
      --client-cert /var/lib/kubelet/pki/kubelet-client-current.pem
  netd hub --node-name edge-1 --server https://10.0.0.1:6443 --ca-file /etc/kubernetes/pki/ca.crt \\
      --client-cert /var/lib/kubelet/pki/kubelet-client-current.pem --cache=false   # never cache: pass-through";

#[derive(Debug, Args)]
struct HubArgs {
    /// Make the hub's CA (<cache-dir>/pki/ca.crt) unless a valid one is there, and exit: before the kubelet first starts.
    #[arg(long, env = "NETD_HUB_INIT", value_parser = netd::model::parse_bool, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    init: bool,
    /// This node's name; clients must present a certificate for system:node:<NAME>.
    #[arg(long, env = "NETD_HUB_NODE_NAME", value_name = "NAME", required_unless_present = "init")]
    node_name: Option<String>,
    /// kube-apiserver's URL.
    #[arg(long, env = "NETD_HUB_SERVER", value_name = "URL", required_unless_present = "init")]
    server: Option<String>,
    /// The cluster CA: kube-apiserver's serving certificate chains to it.
    #[arg(long, env = "NETD_HUB_CA_FILE", value_name = "FILE", required_unless_present = "init")]
    ca_file: Option<PathBuf>,
    /// The CA client certificates must chain to [default: --ca-file].
    #[arg(long, env = "NETD_HUB_CLIENT_CA_FILE", value_name = "FILE")]
    client_ca_file: Option<PathBuf>,
    /// The node's client certificate (with its key when --client-key is not given), re-read when it rotates.
    #[arg(
        long,
        env = "NETD_HUB_CLIENT_CERT",
        value_name = "FILE",
        default_value = "/var/lib/kubelet/pki/kubelet-client-current.pem"
    )]
    client_cert: PathBuf,
    /// The key of --client-cert, when it is a file of its own.
    #[arg(long, env = "NETD_HUB_CLIENT_KEY", value_name = "FILE")]
    client_key: Option<PathBuf>,
    /// Where the kubelet connects (HTTPS, loopback only).
    #[arg(long, env = "NETD_HUB_LISTEN", value_name = "IP:PORT", default_value = netd::hub::DEFAULT_LISTEN)]
    listen: std::net::SocketAddr,
    /// /metrics and /healthz (plain HTTP, loopback only).
    #[arg(long, env = "NETD_HUB_METRICS_LISTEN", value_name = "IP:PORT", default_value = netd::hub::DEFAULT_METRICS_LISTEN)]
    metrics_listen: std::net::SocketAddr,
    /// The cache (0700) and the hub's CA (pki/).
    #[arg(long, env = "NETD_HUB_CACHE_DIR", value_name = "DIR", default_value = netd::hub::DEFAULT_CACHE_DIR)]
    cache_dir: PathBuf,
    /// Cache reads and answer from the cache while the cloud is unreachable: auto (when the node's autonomy annotation is on), true (always), false (never: a plain pass-through).
    #[arg(long, env = "NETD_HUB_CACHE", value_name = "auto|true|false", num_args = 0..=1, default_value = "auto", default_missing_value = "true")]
    cache: netd::hub::CacheMode,
    /// How often kube-apiserver's /readyz is probed.
    #[arg(long, env = "NETD_HUB_PROBE_INTERVAL", value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
    probe_interval: std::time::Duration,
    /// Time for kube-apiserver to send a response head before the cache answers.
    #[arg(long, env = "NETD_HUB_UPSTREAM_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    upstream_timeout: std::time::Duration,
    /// Client connections at once (each kubelet watch is one).
    #[arg(long, env = "NETD_HUB_MAX_CONNECTIONS", value_name = "N", default_value_t = netd::hub::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    #[command(flatten)]
    log: LogArgs,
}

fn hub(args: HubArgs) -> Result<()> {
    init_logging(args.log.log);
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
    until_terminated("edge hub", |stop| async move { Ok::<(), anyhow::Error>(netd::hub::run(config, stop).await?) })
}

const INSTALL_CNI_EXAMPLES: &str = "\
Each file is written beside its target, fsynced and renamed over it; a target
already identical is left alone. The conflist must hold a netd-ipam IPAM, or
nothing is changed. The plugin goes in first, the files to remove go last.

Examples:
  netd install-cni
  netd install-cni --bin-dir /opt/cni/bin --conf-dir /etc/cni/net.d --remove 10-flannel.conflist --remove 99-old.conf
  netd install-cni --remove ''      # remove nothing";

#[derive(Debug, Args)]
struct InstallCniArgs {
    /// The IPAM plugin, installed into --bin-dir under its own file name.
    #[arg(long, env = "NETD_CNI_PLUGIN", value_name = "SRC", default_value = "/usr/local/bin/netd-ipam")]
    plugin: PathBuf,
    /// The host's CNI plugin directory (as mounted in the container).
    #[arg(long, env = "NETD_CNI_BIN_DIR", value_name = "DIR", default_value = "/host/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The conflist to install (the ConfigMap's cni-conf.json).
    #[arg(long, env = "NETD_CNI_CONFLIST", value_name = "SRC", default_value = "/etc/netd/cni-conf.json")]
    conflist: PathBuf,
    /// The host's CNI configuration directory (as mounted in the container).
    #[arg(long, env = "NETD_CNI_CONF_DIR", value_name = "DIR", default_value = "/host/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The conflist's file name in --conf-dir.
    #[arg(long, env = "NETD_CNI_CONF_NAME", value_name = "NAME", default_value = "10-netd.conflist")]
    conf_name: String,
    /// A file in --conf-dir to remove once the conflist is in place; repeatable or comma-separated ('' for none).
    #[arg(
        long,
        env = "NETD_CNI_REMOVE",
        value_name = "NAME",
        value_delimiter = ',',
        default_value = "10-flannel.conflist"
    )]
    remove: Vec<String>,
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

#[derive(Debug, Subcommand)]
enum RegistryCommand {
    /// Create an embedded registry file.
    #[command(after_help = "Example:\n  netd registry init --db /var/lib/netd/registry.db --network 10.244.0.0/16")]
    Init(RegistryInitArgs),
    /// Bootstrap tokens of an embedded or etcd registry, which netd-join checks.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a token; prints it (id.secret) alone on stdout. The registry keeps only its hash.
    #[command(after_help = "Example:\n  netd registry token create --registry etcd:http://10.0.0.2:2379 --ttl 2h")]
    Create(TokenCreateArgs),
    /// List tokens: id, time left, description (never the secret).
    List(TokenRegistryArgs),
    /// Delete a token: nodes can no longer join with it.
    Delete(TokenDeleteArgs),
}

#[derive(Debug, Args)]
struct TokenRegistryArgs {
    #[command(flatten)]
    registry: netd::daemon::config::RegistryArgs,
}

#[derive(Debug, Args)]
struct TokenCreateArgs {
    #[command(flatten)]
    registry: TokenRegistryArgs,
    /// How long the token joins nodes (a Go duration as kubeadm takes it: 24h, 90m; 0 = never expires).
    #[arg(long, env = "NETD_TOKEN_TTL", value_name = "DURATION", default_value = "24h",
          value_parser = |s: &str| netd::model::autonomy::parse_go_duration(s).map_err(|e| e.to_string()))]
    ttl: std::time::Duration,
    /// What the token is for.
    #[arg(long, env = "NETD_TOKEN_DESCRIPTION", value_name = "TEXT", default_value = "")]
    description: String,
}

#[derive(Debug, Args)]
struct TokenDeleteArgs {
    #[command(flatten)]
    registry: TokenRegistryArgs,
    /// The token's id (the part before the '.').
    #[arg(value_name = "ID")]
    id: String,
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

const TUNNEL_AGENT_EXAMPLES: &str = "\
Examples:
  netd-cloud certs node --ca-dir /etc/netd/ca --name edge-1 --ip 10.0.5.7 --out /etc/netd/tunnel
  netd tunnel-agent --server 192.168.0.10:10262 --cert-dir /etc/netd/tunnel
  netd tunnel-agent --server cloud-a:10262,cloud-b:10262 --cert-dir /etc/netd/tunnel \\
      --pod-subnet 10.244.7.0/24 --extra-ports 9100";

#[derive(Debug, Args)]
struct TunnelAgentArgs {
    #[command(flatten)]
    certs: TunnelCertArgs,
    /// Tunnel servers, HOST:PORT, comma-separated; the agent keeps a link to each.
    #[arg(
        long = "server",
        env = "NETD_TUNNEL_SERVERS",
        value_name = "HOST:PORT,...",
        value_delimiter = ',',
        required = true
    )]
    servers: Vec<String>,
    /// The name the servers' certificate carries [default: the first server's host].
    #[arg(long, env = "NETD_TUNNEL_SERVER_NAME", value_name = "NAME")]
    server_name: Option<String>,
    /// This node's addresses, the only ones it dials besides loopback [default: its certificate's IP SANs].
    #[arg(long, env = "NETD_TUNNEL_NODE_IPS", value_name = "IP,...", value_delimiter = ',')]
    node_ip: Vec<std::net::IpAddr>,
    /// This node's pod subnets, also dialled (metrics of pods) [default: the subnet of /run/flannel/subnet.env].
    #[arg(long, env = "NETD_TUNNEL_POD_SUBNETS", value_name = "CIDR,...", value_delimiter = ',')]
    pod_subnet: Vec<ipnet::IpNet>,
    /// Ports it dials besides 10250 and 10255.
    #[arg(long, env = "NETD_TUNNEL_EXTRA_PORTS", value_name = "PORT,...", value_delimiter = ',')]
    extra_ports: Vec<u16>,
    /// Dial loopback destinations too (services bound to 127.0.0.1 or ::1).
    #[arg(long, env = "NETD_TUNNEL_DIAL_LOOPBACK", value_name = "BOOL", value_parser = netd::model::parse_bool, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    dial_loopback: bool,
    /// /metrics and /healthz (plain HTTP).
    #[arg(long, env = "NETD_TUNNEL_METRICS_LISTEN", value_name = "IP:PORT", default_value = "127.0.0.1:10267")]
    metrics_listen: std::net::SocketAddr,
    #[command(flatten)]
    log: LogArgs,
}

fn tunnel_agent(args: TunnelAgentArgs) -> Result<()> {
    init_logging(args.log.log);
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
    until_terminated("tunnel agent", |stop| async move {
        Ok::<(), anyhow::Error>(netd::tunnel::run::run_agent(settings, stop).await?)
    })
}

fn main() -> ExitCode {
    let cli: Cli = parse_command_line(std::env::args_os()).unwrap_or_else(|error| error.exit());
    let outcome = match cli.command {
        Command::Run { args, print_config, log } => run(args, print_config, log),
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
