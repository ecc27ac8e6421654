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
//! - `netd dnat apply | show | detach`: the eBPF tunnel DNAT on a cloud node
//!   (see `netd::dnat`).
//! - `netd certs ca | node | server | client`: edge tunnel certificates as
//!   PEM files (see `netd::tunnel::certs`).
//! - `netd install-cni`: the IPAM plugin and the CNI conflist onto the host,
//!   atomically (see `netd::cni::install`).
//!
//! The command line is declared here with clap; the options shared by `run`
//! and `cleanup` are `netd::daemon::config::RunArgs`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use netd::daemon::config::{parse_command_line, parse_duration, RunArgs};
use netd::dnat::config::PortRules;
use netd::ebpf::dnat::{TunnelDnat, DEFAULT_PIN_DIR};
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::NetworkConfig;
use netd::tunnel::run::Listen;
use netd::vxlan::snapshot::{self, Snapshot};
use netd::vxlan::Reconciler;

const EXAMPLES: &str = "\
Examples:
  netd run --registry etcd:http://10.0.0.1:2379 --iface eth0
  NETD_CONFIG=/etc/netd.json netd run --masquerade
  netd restore --json
  netd cleanup --purge-state
  netd registry init --db /var/lib/netd/registry.db --network 10.244.0.0/16
  netd dnat apply --target 192.168.0.10 --edge-nodes 10.0.5.7,10.0.5.8

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
    /// The eBPF tunnel DNAT of a cloud node.
    #[command(subcommand)]
    Dnat(DnatCommand),
    /// Edge tunnel certificates: a CA, and node, server and client certificates it issues.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// The edge tunnel's server on a cloud node: agents link in, kube-apiserver and DNAT'd clients reach kubelets.
    #[command(after_help = TUNNEL_SERVER_EXAMPLES)]
    TunnelServer(TunnelServerArgs),
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
    until_terminated("edge hub", |stop| netd::hub::run(config, stop))
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

const DNAT_APPLY_EXAMPLES: &str = "\
Makes the kernel state exactly this: rules and edge nodes not named are removed.
Idempotent; only differences are written; live links get the new program code
atomically, so redirection never pauses.

Examples:
  netd dnat apply --target 192.168.0.10 --edge-nodes 10.0.5.7,10.0.5.8
  netd dnat apply --target 192.168.0.10 --edge-nodes 10.0.5.7 \\
      --ports 10250=10263,10255=10264,8080=10264 --pod-namespaces
  kubectl -n kube-system get cm edge-tunnel-server-cfg -o json > cfg.json
  netd dnat apply --target 192.168.0.10 --edge-nodes \"$EDGES\" --tunnel-config cfg.json \\
      --original-dst-cgroup /sys/fs/cgroup/system.slice/tunnel-server.service";

#[derive(Debug, Subcommand)]
enum DnatCommand {
    /// Attach (or upgrade) the programs; make target, rules and edge nodes exactly these.
    #[command(after_help = DNAT_APPLY_EXAMPLES)]
    Apply(DnatApplyArgs),
    /// Target, rules, edge nodes, counters and links.
    #[command(after_help = "Examples:\n  netd dnat show\n  netd dnat show --json\n  netd dnat show --prometheus")]
    Show(DnatShowArgs),
    /// Detach the programs and remove their pins: nothing is redirected any more.
    Detach(DnatPinArgs),
}

type DnatPinArgs = netd::dnat::PinArgs;

/// Comma-separated values; "" is none.
#[derive(Debug, Clone)]
struct CommaList<T>(Vec<T>);

/// What a [`CommaList`] token must be, for its error message.
trait Noun {
    const NOUN: &'static str;
}

impl Noun for Ipv4Addr {
    const NOUN: &'static str = "an IPv4 address";
}

impl Noun for ipnet::Ipv4Net {
    const NOUN: &'static str = "an IPv4 CIDR";
}

impl Noun for std::net::SocketAddr {
    const NOUN: &'static str = "an IP:PORT address";
}

impl Noun for Listen {
    const NOUN: &'static str = "IP:PORT or PORT";
}

impl Noun for ipnet::IpNet {
    const NOUN: &'static str = "a CIDR";
}

impl<T: FromStr + Noun> FromStr for CommaList<T> {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(Self(Vec::new()));
        }
        s.split(',')
            .enumerate()
            .map(|(i, token)| {
                let token = token.trim();
                token.parse().map_err(|_| format!("token {} {token:?} is not {}", i + 1, T::NOUN))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

#[derive(Debug, Args)]
struct DnatApplyArgs {
    #[command(flatten)]
    attach: netd::dnat::AttachArgs,
    /// Tunnel server address redirected connections go to.
    #[arg(long, env = "NETD_DNAT_TARGET", value_name = "IP")]
    target: Ipv4Addr,
    /// Edge node addresses, comma-separated ("" for none).
    #[arg(long, env = "NETD_DNAT_EDGE_NODES", value_name = "IP,...")]
    edge_nodes: CommaList<Ipv4Addr>,
    /// Edge pod subnets, comma-separated: connects to pod IPs inside them are redirected too.
    #[arg(long, env = "NETD_DNAT_EDGE_SUBNETS", value_name = "CIDR,...", default_value = "")]
    edge_subnets: CommaList<ipnet::Ipv4Net>,
    /// Port rules, dialled=tunnel, comma-separated [default: 10250=10263,10255=10264].
    #[arg(long, env = "NETD_DNAT_PORTS", value_name = "RULES", conflicts_with = "tunnel_config")]
    ports: Option<PortRules>,
    /// The rules from ConfigMap edge-tunnel-server-cfg (`kubectl get -o json`, or its data).
    #[arg(long, env = "NETD_DNAT_TUNNEL_CONFIG", value_name = "FILE")]
    tunnel_config: Option<PathBuf>,
    /// Print the outcome as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DnatShowArgs {
    #[command(flatten)]
    pins: DnatPinArgs,
    /// One JSON object.
    #[arg(long, conflicts_with = "prometheus")]
    json: bool,
    /// The counters in Prometheus' text format.
    #[arg(long)]
    prometheus: bool,
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
    // Blocking calls are few and sequential (one registry, one overlay):
    // a handful of threads, not tokio's default of 512.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(4).build()?;
    let outcome = runtime.block_on(async {
        let stop = stop_signal("netd")?;
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
    tunnel_runtime()?.block_on(async {
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

fn dnat_apply(args: DnatApplyArgs) -> Result<()> {
    let rules = match (&args.ports, &args.tunnel_config) {
        (Some(rules), _) => rules.clone(),
        (None, Some(file)) => netd::dnat::rules_from_config_map_file(file)?,
        (None, None) => netd::dnat::config::from_tunnel_config(&Default::default())?,
    };
    let options = args.attach.attach_options();
    let desired = netd::dnat::Desired {
        target: args.target,
        scope: args.attach.scope(),
        edge_nodes: args.edge_nodes.0,
        edge_subnets: args.edge_subnets.0,
        rules,
    };
    let applied = netd::dnat::apply(&options, &desired)?;
    let changes = |c: netd::ebpf::dnat::Changes| format!("+{} ~{} -{}", c.added, c.updated, c.removed);
    if args.json {
        let outcome = serde_json::json!({
            "links": applied.links.iter().map(|l| serde_json::json!({
                "program": l.program, "action": l.action.as_str(), "id": l.link_id,
            })).collect::<Vec<_>>(),
            "rules": { "added": applied.rules.added, "updated": applied.rules.updated, "removed": applied.rules.removed },
            "edgeNodes": {
                "added": applied.edge_nodes.added, "updated": applied.edge_nodes.updated,
                "removed": applied.edge_nodes.removed,
            },
            "edgeSubnets": {
                "added": applied.edge_subnets.added, "updated": applied.edge_subnets.updated,
                "removed": applied.edge_subnets.removed,
            },
        });
        println!("{outcome}");
    } else {
        for link in &applied.links {
            println!("{}: {:?} (link {})", link.program, link.action, link.link_id);
        }
        println!(
            "rules {} ({}), edge nodes {} ({}), edge subnets {} ({}), target {} ({})",
            desired.rules,
            changes(applied.rules),
            desired.edge_nodes.len(),
            changes(applied.edge_nodes),
            desired.edge_subnets.len(),
            changes(applied.edge_subnets),
            desired.target,
            if args.attach.pod_namespaces { "all namespaces" } else { "host network" }
        );
    }
    Ok(())
}

fn dnat_show(args: DnatShowArgs) -> Result<()> {
    let dnat = TunnelDnat::open(&args.pins.pin_dir)?;
    let stats = dnat.stats()?;
    if args.prometheus {
        print!("{}", stats.render_prometheus());
    } else if args.json {
        println!("{}", netd::dnat::render_json(dnat.pin_dir(), &stats, &dnat.links()?));
    } else {
        print!("{}", netd::dnat::render_text(dnat.pin_dir(), &stats, &dnat.links()?));
    }
    Ok(())
}

fn dnat_detach(args: DnatPinArgs) -> Result<()> {
    let removed = TunnelDnat::detach(&args.pin_dir)?;
    if removed.is_empty() {
        println!("nothing pinned at {}", args.pin_dir.display());
    } else {
        println!("detached {} programs; {} removed", removed.len(), args.pin_dir.display());
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Make a new CA: DIR/ca.crt and DIR/ca.key (0600).
    #[command(after_help = "Example:\n  netd certs ca --out /etc/netd/tunnel-ca --cn netd-tunnel-ca --days 3650")]
    Ca(CertsCaArgs),
    /// An edge node's tunnel agent certificate: CN=system:node:NAME, O=system:nodes, IP SANs.
    #[command(after_help = "Writes DIR/node.crt, DIR/node.key (0600) and DIR/ca.crt.\n\nExample:\n  \
        netd certs node --ca-dir /etc/netd/tunnel-ca --name edge-1 --ip 10.0.5.7 --out /etc/netd/tunnel")]
    Node(CertsNodeArgs),
    /// The tunnel server's certificate, with DNS and IP SANs.
    #[command(after_help = "Writes DIR/server.crt, DIR/server.key (0600) and DIR/ca.crt.\n\nExample:\n  \
        netd certs server --ca-dir /etc/netd/tunnel-ca --dns tunnel.kube-system.svc --ip 192.168.0.10 --out srv")]
    Server(CertsServerArgs),
    /// A client certificate, such as kube-apiserver's for its egress selector.
    #[command(after_help = "Writes DIR/client.crt, DIR/client.key (0600) and DIR/ca.crt.\n\nExample:\n  \
        netd certs client --ca-dir /etc/netd/tunnel-ca --cn kube-apiserver --out /etc/kubernetes/tunnel")]
    Client(CertsClientArgs),
}

#[derive(Debug, Args)]
struct CertsCaArgs {
    /// Directory to write ca.crt and ca.key to; an existing CA there is not replaced.
    #[arg(long, env = "NETD_CERTS_OUT", value_name = "DIR")]
    out: PathBuf,
    /// The CA's common name.
    #[arg(long, env = "NETD_CERTS_CN", value_name = "NAME", default_value = "netd-tunnel-ca")]
    cn: String,
    /// Validity in days.
    #[arg(long, env = "NETD_CERTS_DAYS", value_name = "N", default_value_t = 3650)]
    days: u32,
}

#[derive(Debug, Args)]
struct CertsIssueArgs {
    /// Directory holding the CA's ca.crt and ca.key.
    #[arg(long, env = "NETD_CERTS_CA_DIR", value_name = "DIR")]
    ca_dir: PathBuf,
    /// Directory to write the certificate, its key and ca.crt to.
    #[arg(long, env = "NETD_CERTS_OUT", value_name = "DIR")]
    out: PathBuf,
    /// Validity in days (never beyond the CA's).
    #[arg(long, env = "NETD_CERTS_DAYS", value_name = "N", default_value_t = 365)]
    days: u32,
}

#[derive(Debug, Args)]
struct CertsNodeArgs {
    #[command(flatten)]
    issue: CertsIssueArgs,
    /// The Kubernetes node name (with --csr: taken from the request, and checked if given).
    #[arg(long, env = "NETD_CERTS_NODE", value_name = "NODE", required_unless_present = "csr")]
    name: Option<String>,
    /// The node's addresses, comma-separated (optional with --csr: the tunnel server also routes by lease).
    #[arg(long, env = "NETD_CERTS_IP", value_name = "IP,...", value_delimiter = ',', required_unless_present = "csr")]
    ip: Vec<std::net::IpAddr>,
    /// Sign this node's certificate signing request (netd-join writes it to
    /// /etc/netd/tunnel/node.csr) instead of making a key: writes only
    /// node.crt and ca.crt, the key stays on the node.
    #[arg(long, env = "NETD_CERTS_CSR", value_name = "FILE")]
    csr: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CertsServerArgs {
    #[command(flatten)]
    issue: CertsIssueArgs,
    /// The server's common name.
    #[arg(long, env = "NETD_CERTS_CN", value_name = "NAME", default_value = "netd-tunnel-server")]
    cn: String,
    /// DNS names clients dial it by, comma-separated.
    #[arg(long, env = "NETD_CERTS_DNS", value_name = "NAME,...", value_delimiter = ',')]
    dns: Vec<String>,
    /// Addresses clients dial it by, comma-separated.
    #[arg(long, env = "NETD_CERTS_IP", value_name = "IP,...", value_delimiter = ',')]
    ip: Vec<std::net::IpAddr>,
}

#[derive(Debug, Args)]
struct CertsClientArgs {
    #[command(flatten)]
    issue: CertsIssueArgs,
    /// The client's common name (its user name to Kubernetes).
    #[arg(long, env = "NETD_CERTS_CN", value_name = "NAME")]
    cn: String,
    /// Its organization (its group to Kubernetes).
    #[arg(long, env = "NETD_CERTS_ORG", value_name = "ORG")]
    org: Option<String>,
}

fn certs(command: CertsCommand) -> Result<()> {
    use netd::tunnel::certs::{CertificateAuthority, CA_KEY_FILE};
    let days = |n: u32| std::time::Duration::from_secs(u64::from(n) * 86_400);
    let (issue, stem, ca, cert) = match command {
        CertsCommand::Ca(args) => {
            if args.out.join(CA_KEY_FILE).exists() {
                bail!(
                    "{} exists: not replacing a CA (what it issued would stop verifying); remove it first",
                    args.out.join(CA_KEY_FILE).display()
                );
            }
            CertificateAuthority::generate(&args.cn, days(args.days))?.write(&args.out)?;
            println!("wrote {0}/ca.crt and {0}/ca.key: CN={1}, {2} days", args.out.display(), args.cn, args.days);
            return Ok(());
        }
        CertsCommand::Node(a) => {
            let ca = CertificateAuthority::load_dir(&a.issue.ca_dir)?;
            if let Some(csr) = &a.csr {
                return sign_node_csr(&ca, csr, &a, days(a.issue.days));
            }
            let Some(name) = &a.name else { bail!("--name is required without --csr") };
            let cert = ca.issue_node(name, &a.ip, days(a.issue.days))?;
            (a.issue, "node", ca, cert)
        }
        CertsCommand::Server(a) => {
            let ca = CertificateAuthority::load_dir(&a.issue.ca_dir)?;
            let cert = ca.issue_server(&a.cn, &a.dns, &a.ip, days(a.issue.days))?;
            (a.issue, "server", ca, cert)
        }
        CertsCommand::Client(a) => {
            let ca = CertificateAuthority::load_dir(&a.issue.ca_dir)?;
            let cert = ca.issue_client(&a.cn, a.org.as_deref(), days(a.issue.days))?;
            (a.issue, "client", ca, cert)
        }
    };
    let (cert_path, key_path) = cert.write(&issue.out, stem)?;
    ca.write_cert(&issue.out)?;
    println!("wrote {}, {} and {}/ca.crt", cert_path.display(), key_path.display(), issue.out.display());
    Ok(())
}

/// `netd certs node --csr`: signs what the node asked for; the key stays there.
fn sign_node_csr(
    ca: &netd::tunnel::certs::CertificateAuthority,
    csr: &std::path::Path,
    args: &CertsNodeArgs,
    validity: std::time::Duration,
) -> Result<()> {
    let text = std::fs::read_to_string(csr).with_context(|| format!("reading {}", csr.display()))?;
    let (node, cert_pem) = ca.sign_node_csr(&text, &args.ip, validity).with_context(|| csr.display().to_string())?;
    if let Some(name) = args.name.as_deref().filter(|name| *name != node) {
        bail!("{} asks for node {node:?}, not {name:?}: nothing written", csr.display());
    }
    let cert_path = args.issue.out.join("node.crt");
    netd::tunnel::certs::write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
    ca.write_cert(&args.issue.out)?;
    println!(
        "signed {} for node {node}: wrote {} and {}/ca.crt",
        csr.display(),
        cert_path.display(),
        args.issue.out.display()
    );
    Ok(())
}

const TUNNEL_SERVER_EXAMPLES: &str = "\
Examples:
  netd certs server --ca-dir /etc/netd/ca --ip 192.168.0.10 --out /etc/netd/tunnel
  netd tunnel-server --cert-dir /etc/netd/tunnel --address 192.168.0.10
  netd tunnel-server --cert-dir /etc/netd/tunnel --connect-clients kube-apiserver,konnectivity-client \\
      --host-routing-sources 192.168.0.0/24 --dnat-listen ''";

const TUNNEL_AGENT_EXAMPLES: &str = "\
Examples:
  netd certs node --ca-dir /etc/netd/ca --name edge-1 --ip 10.0.5.7 --out /etc/netd/tunnel
  netd tunnel-agent --server 192.168.0.10:10262 --cert-dir /etc/netd/tunnel
  netd tunnel-agent --server cloud-a:10262,cloud-b:10262 --cert-dir /etc/netd/tunnel \\
      --pod-subnet 10.244.7.0/24 --extra-ports 9100";

#[derive(Debug, Args)]
struct LogArgs {
    /// Log level.
    #[arg(long, env = "NETD_LOG", value_name = "LEVEL", value_enum, ignore_case = true, default_value = "info")]
    log: LogLevel,
}

#[derive(Debug, Args)]
struct TunnelCertArgs {
    /// Directory with <stem>.crt, <stem>.key and ca.crt (as `netd certs` writes them); re-read when they change.
    #[arg(long, env = "NETD_TUNNEL_CERT_DIR", value_name = "DIR", default_value = "/etc/netd/tunnel")]
    cert_dir: PathBuf,
}

#[derive(Debug, Args)]
struct TunnelServerArgs {
    #[command(flatten)]
    certs: TunnelCertArgs,
    /// The cloud node's address, which listeners given as a bare PORT bind [default: the default-route interface's].
    #[arg(long, env = "NETD_TUNNEL_ADDRESS", value_name = "IP")]
    address: Option<std::net::IpAddr>,
    /// Where agents link in (mutual TLS 1.3): IP:PORT, or PORT on --address.
    #[arg(long, env = "NETD_TUNNEL_AGENTS_LISTEN", value_name = "[IP:]PORT", default_value = "10262")]
    agents_listen: Listen,
    /// The HTTP CONNECT door for kube-apiserver's egress selector (TLS, a client certificate of --connect-clients).
    #[arg(long, env = "NETD_TUNNEL_CONNECT_LISTEN", value_name = "[IP:]PORT", default_value = "10265")]
    connect_listen: Listen,
    /// Common names of the client certificates the CONNECT door admits (never a node's: O=system:nodes is refused).
    #[arg(
        long,
        env = "NETD_TUNNEL_CONNECT_CLIENTS",
        value_name = "CN,...",
        value_delimiter = ',',
        default_value = netd::tunnel::identity::DEFAULT_CONNECT_CLIENT
    )]
    connect_clients: Vec<String>,
    /// The DNAT doors for kubelet's TLS, opened when a tunnel DNAT is pinned ("" for none).
    #[arg(long, env = "NETD_TUNNEL_DNAT_LISTEN", value_name = "[IP:]PORT,...", default_value = "10263")]
    dnat_listen: CommaList<Listen>,
    /// The HTTP door: DNAT'd connections (when pinned), and plain HTTP by Host from --host-routing-sources ("" for none).
    #[arg(long, env = "NETD_TUNNEL_HTTP_LISTEN", value_name = "[IP:]PORT", default_value = "10264")]
    http_listen: CommaList<Listen>,
    /// Source CIDRs whose plain HTTP the HTTP door routes by Host or absolute URI [default: none: off].
    #[arg(long, env = "NETD_TUNNEL_HOST_ROUTING_SOURCES", value_name = "CIDR,...", default_value = "")]
    host_routing_sources: CommaList<ipnet::IpNet>,
    /// Addresses never routed to an agent whatever a lease or certificate claims (cloud nodes), besides this host's own.
    #[arg(long, env = "NETD_TUNNEL_RESERVED", value_name = "CIDR,...", default_value = "")]
    reserved: CommaList<ipnet::IpNet>,
    /// Time a client has to finish its TLS handshake.
    #[arg(long, env = "NETD_TUNNEL_HANDSHAKE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    handshake_timeout: std::time::Duration,
    /// Time a client has to send a whole request head (CONNECT and HTTP doors).
    #[arg(long, env = "NETD_TUNNEL_HEADER_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    header_timeout: std::time::Duration,
    /// Connections one door holds at once.
    #[arg(long, env = "NETD_TUNNEL_MAX_CONNECTIONS", value_name = "N", default_value_t = netd::tunnel::limits::DEFAULT_MAX_CONNECTIONS_PER_DOOR)]
    max_connections: usize,
    /// Connections one source address holds on one door at once.
    #[arg(long, env = "NETD_TUNNEL_MAX_CONNECTIONS_PER_SOURCE", value_name = "N", default_value_t = netd::tunnel::limits::DEFAULT_MAX_CONNECTIONS_PER_SOURCE)]
    max_connections_per_source: usize,
    /// Tunnelled connections one agent link carries at once.
    #[arg(long, env = "NETD_TUNNEL_MAX_STREAMS_PER_AGENT", value_name = "N", default_value_t = netd::tunnel::limits::DEFAULT_MAX_STREAMS_PER_AGENT)]
    max_streams_per_agent: usize,
    /// Time an agent has to accept or refuse a stream before the client gets 504.
    #[arg(long, env = "NETD_TUNNEL_OPEN_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    open_timeout: std::time::Duration,
    /// Where the tunnel DNAT is pinned.
    #[arg(long, env = "NETD_DNAT_PIN_DIR", value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    dnat_pin_dir: PathBuf,
    /// /metrics and /healthz (plain HTTP).
    #[arg(long, env = "NETD_TUNNEL_METRICS_LISTEN", value_name = "IP:PORT", default_value = "127.0.0.1:10266")]
    metrics_listen: std::net::SocketAddr,
    /// The registry whose leases route node addresses and pod IPs (none: the agents' certificate IPs only).
    #[command(flatten)]
    registry: netd::daemon::config::RegistryArgs,
    #[command(flatten)]
    log: LogArgs,
}

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

/// The tunnel processes: a multi-thread runtime (streams are many and independent) of two workers.
fn tunnel_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Runs a tunnel process's `work` on [`tunnel_runtime`], handing it a
/// future that completes at SIGTERM or SIGINT ([`stop_signal`]), until it
/// ends: its error is the process's.
fn until_terminated<F, Fut, E>(what: &'static str, work: F) -> Result<()>
where
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    anyhow::Error: From<E>,
{
    let runtime = tunnel_runtime()?;
    let outcome = runtime.block_on(async {
        let stop = stop_signal(what)?;
        Ok(work(Box::pin(stop)).await?)
    });
    // Dropping a runtime waits for every blocking task without limit; a
    // stop the kubelet is waiting on should not (the kernel closes what is
    // left when the process exits).
    runtime.shutdown_timeout(STOP_TIMEOUT);
    outcome
}

/// A future that completes at the first SIGTERM or SIGINT, saying which
/// in the log. Both handlers are installed before it returns, so a signal
/// that arrives once the process says it is up is never lost to the
/// default action. Must be called on a runtime.
///
/// SIGTERM is what a pod deletion sends, and in a container the process is
/// PID 1, for which the kernel ignores a signal without a handler: without
/// one the kubelet would wait out the whole grace period and SIGKILL it.
fn stop_signal(what: &'static str) -> Result<impl std::future::Future<Output = ()> + Send> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("{what}: SIGTERM, stopping"),
            _ = sigint.recv() => tracing::info!("{what}: SIGINT, stopping"),
        }
    })
}

/// How long a stopping tunnel process waits for its runtime's blocking tasks.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

fn tunnel_server(args: TunnelServerArgs) -> Result<()> {
    init_logging(args.log.log);
    raise_open_files_limit();
    let mut listens = vec![args.agents_listen, args.connect_listen];
    listens.extend(&args.dnat_listen.0);
    listens.extend(&args.http_listen.0);
    let address = match args.address {
        Some(address) => address,
        None if listens.iter().any(|l| l.is_port_only()) => {
            let underlay = netd::daemon::underlay::resolve_underlay(None, None).context(
                "the doors bind the cloud node's address, which comes from the default-route interface: \
                 there is none usable, so name it (--address IP) or give every listener as IP:PORT",
            )?;
            std::net::IpAddr::V4(underlay.public_ip)
        }
        // Every listener names its own address: this one is never used.
        None => std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    // This host's own addresses are never an edge node's, whatever a lease says.
    let mut reserved = args.reserved.0;
    let own = netd::netlink::Handle::new()
        .and_then(|mut handle| handle.address().list_all())
        .context("listing this host's addresses (they are never routed to an agent)")?;
    reserved.extend(own.into_iter().map(|a| ipnet::IpNet::from(std::net::IpAddr::V4(a.local))));
    let policy = netd::tunnel::server::ServerPolicy {
        connect_clients: netd::tunnel::identity::ConnectClients::new(args.connect_clients),
        host_routing_sources: args.host_routing_sources.0,
        reserved,
        limits: netd::tunnel::limits::Limits {
            handshake_timeout: args.handshake_timeout,
            header_timeout: args.header_timeout,
            max_connections_per_door: args.max_connections,
            max_connections_per_source: args.max_connections_per_source,
            max_streams_per_agent: args.max_streams_per_agent,
            open_timeout: args.open_timeout,
        },
    };
    let settings = netd::tunnel::run::ServerSettings {
        agents_listen: args.agents_listen.on(address),
        connect_listen: Some(args.connect_listen.on(address)),
        dnat_listen: args.dnat_listen.0.iter().map(|l| l.on(address)).collect(),
        http_listen: match args.http_listen.0.as_slice() {
            [] => None,
            [listen] => Some(listen.on(address)),
            more => bail!("--http-listen takes one [IP:]PORT, not {}", more.len()),
        },
        dnat_pin_dir: args.dnat_pin_dir,
        certs: netd::tunnel::certs::CertFiles::in_dir(&args.certs.cert_dir, "server"),
        metrics_listen: Some(args.metrics_listen),
        registry: tunnel_registry(args.registry)?,
        policy,
    };
    until_terminated("tunnel server", |stop| netd::tunnel::run::run_server(settings, stop))
}

/// Raises this process's open-file limit to its hard limit: every door
/// connection and every agent link is a descriptor, and the doors' own caps
/// (not a default soft limit of 1 024) should be what bounds them.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 || limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit reads the struct we pass; raising the soft limit up
    // to the hard one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::warn!("could not raise the open-file limit to {}", limit.rlim_max);
    }
}

/// The tunnel server's registry, if one is named.
fn tunnel_registry(
    args: netd::daemon::config::RegistryArgs,
) -> Result<Option<(netd::registry::RegistrySpec, netd::registry::OpenSettings)>> {
    let Some(spec) = args.registry else { return Ok(None) };
    if matches!(spec, netd::registry::RegistrySpec::Kubernetes(_)) && args.network.is_none() {
        netd::daemon::config::kubernetes_network_source().map_err(anyhow::Error::msg)?;
    }
    // The Kubernetes registry needs a node name (its own Node is never a
    // route); in a pod it is NODE_NAME, as for `netd run`, else the host name.
    let node_name = std::env::var("NODE_NAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_lowercase())
        .unwrap_or_default();
    let open = netd::registry::OpenSettings {
        node_name,
        network: args.network,
        client_cert: args.client_cert.map(|cert| netd::kube::ClientCertFiles { cert, key: args.client_key }),
        token_file: args.token_file,
        ca_file: args.ca_file,
        poll: netd::registry::embedded::DEFAULT_POLL,
    };
    Ok(Some((spec, open)))
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
    until_terminated("tunnel agent", |stop| netd::tunnel::run::run_agent(settings, stop))
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
        Command::Registry(RegistryCommand::Token(command)) => registry_token(command),
        Command::Restore(args) => restore(args),
        Command::Dnat(DnatCommand::Apply(args)) => dnat_apply(args),
        Command::Dnat(DnatCommand::Show(args)) => dnat_show(args),
        Command::Dnat(DnatCommand::Detach(args)) => dnat_detach(args),
        Command::Certs(command) => certs(command),
        Command::TunnelServer(args) => tunnel_server(args),
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
