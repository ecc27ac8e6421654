//! `netd`'s command line: the per-node agent's subcommands and their options.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::cmd::{LogArgs, LogFormatArgs, LogLevel, RuntimeArgs, TunnelCertArgs};
use crate::daemon::config::{parse_duration, RunArgs};
use crate::vxlan::snapshot;

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
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// `netd`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the per-node daemon.
    #[command(after_help = RUN_EXAMPLES, args_override_self = true)]
    Run {
        /// The daemon's settings (flags and NETD_* variables over the config file).
        #[command(flatten)]
        args: RunArgs,
        /// Print the effective configuration as a --config file and exit.
        #[arg(long)]
        print_config: bool,
        /// Log level.
        #[arg(long, env = "NETD_LOG", value_name = "LEVEL", value_enum, ignore_case = true)]
        log: Option<LogLevel>,
        /// The log line format.
        #[command(flatten)]
        log_format: LogFormatArgs,
    },
    /// Remove the VXLAN device, its entries, the masquerade rules and subnet.env.
    #[command(after_help = CLEANUP_EXAMPLES, args_override_self = true)]
    Cleanup {
        /// The daemon's settings (flags and NETD_* variables over the config file).
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

/// `netd hub`'s options.
#[derive(Debug, Args)]
pub struct HubArgs {
    /// Make the hub's CA (<cache-dir>/pki/ca.crt) unless a valid one is there, and exit: before the kubelet first starts.
    #[arg(long, env = "NETD_HUB_INIT", value_parser = crate::model::parse_bool, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub init: bool,
    /// This node's name; clients must present a certificate for system:node:<NAME>.
    #[arg(long, env = "NETD_HUB_NODE_NAME", value_name = "NAME", required_unless_present = "init")]
    pub node_name: Option<String>,
    /// kube-apiserver's URL.
    #[arg(long, env = "NETD_HUB_SERVER", value_name = "URL", required_unless_present = "init")]
    pub server: Option<String>,
    /// The cluster CA: kube-apiserver's serving certificate chains to it.
    #[arg(long, env = "NETD_HUB_CA_FILE", value_name = "FILE", required_unless_present = "init")]
    pub ca_file: Option<PathBuf>,
    /// The CA client certificates must chain to [default: --ca-file].
    #[arg(long, env = "NETD_HUB_CLIENT_CA_FILE", value_name = "FILE")]
    pub client_ca_file: Option<PathBuf>,
    /// The node's client certificate (with its key when --client-key is not given), re-read when it rotates.
    #[arg(
        long,
        env = "NETD_HUB_CLIENT_CERT",
        value_name = "FILE",
        default_value = "/var/lib/kubelet/pki/kubelet-client-current.pem"
    )]
    pub client_cert: PathBuf,
    /// The key of --client-cert, when it is a file of its own.
    #[arg(long, env = "NETD_HUB_CLIENT_KEY", value_name = "FILE")]
    pub client_key: Option<PathBuf>,
    /// Where the kubelet connects (HTTPS, loopback only).
    #[arg(long, env = "NETD_HUB_LISTEN", value_name = "IP:PORT", default_value = crate::hub::DEFAULT_LISTEN)]
    pub listen: std::net::SocketAddr,
    /// /metrics and /healthz (plain HTTP, loopback only).
    #[arg(long, env = "NETD_HUB_METRICS_LISTEN", value_name = "IP:PORT", default_value = crate::hub::DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: std::net::SocketAddr,
    /// The cache (0700) and the hub's CA (pki/).
    #[arg(long, env = "NETD_HUB_CACHE_DIR", value_name = "DIR", default_value = crate::hub::DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Cache reads and answer from the cache while the cloud is unreachable: auto (when the node's autonomy annotation is on), true (always), false (never: a plain pass-through).
    #[arg(long, env = "NETD_HUB_CACHE", value_name = "auto|true|false", num_args = 0..=1, default_value = "auto", default_missing_value = "true")]
    pub cache: crate::hub::CacheMode,
    /// How often kube-apiserver's /readyz is probed.
    #[arg(long, env = "NETD_HUB_PROBE_INTERVAL", value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
    pub probe_interval: std::time::Duration,
    /// Time for kube-apiserver to send a response head before the cache answers.
    #[arg(long, env = "NETD_HUB_UPSTREAM_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub upstream_timeout: std::time::Duration,
    /// Client connections at once (each kubelet watch is one).
    #[arg(long, env = "NETD_HUB_MAX_CONNECTIONS", value_name = "N", default_value_t = crate::hub::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Threads of the async runtime.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Log level and format.
    #[command(flatten)]
    pub log: LogArgs,
}

const INSTALL_CNI_EXAMPLES: &str = "\
Each file is written beside its target, fsynced and renamed over it; a target
already identical is left alone. The conflist must hold a netd-ipam IPAM, or
nothing is changed. The plugin goes in first, the files to remove go last.

Examples:
  netd install-cni
  netd install-cni --bin-dir /opt/cni/bin --conf-dir /etc/cni/net.d --remove 10-flannel.conflist --remove 99-old.conf
  netd install-cni --remove ''      # remove nothing";

/// `netd install-cni`'s options.
#[derive(Debug, Args)]
pub struct InstallCniArgs {
    /// The IPAM plugin, installed into --bin-dir under its own file name.
    #[arg(long, env = "NETD_CNI_PLUGIN", value_name = "SRC", default_value = "/usr/local/bin/netd-ipam")]
    pub plugin: PathBuf,
    /// The host's CNI plugin directory (as mounted in the container).
    #[arg(long, env = "NETD_CNI_BIN_DIR", value_name = "DIR", default_value = "/host/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The conflist to install (the ConfigMap's cni-conf.json).
    #[arg(long, env = "NETD_CNI_CONFLIST", value_name = "SRC", default_value = "/etc/netd/cni-conf.json")]
    pub conflist: PathBuf,
    /// The host's CNI configuration directory (as mounted in the container).
    #[arg(long, env = "NETD_CNI_CONF_DIR", value_name = "DIR", default_value = "/host/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The conflist's file name in --conf-dir.
    #[arg(long, env = "NETD_CNI_CONF_NAME", value_name = "NAME", default_value = "10-netd.conflist")]
    pub conf_name: String,
    /// A file in --conf-dir to remove once the conflist is in place; repeatable or comma-separated ('' for none).
    #[arg(
        long,
        env = "NETD_CNI_REMOVE",
        value_name = "NAME",
        value_delimiter = ',',
        default_value = "10-flannel.conflist"
    )]
    pub remove: Vec<String>,
}

/// `netd registry`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Create an embedded registry file.
    #[command(after_help = "Example:\n  netd registry init --db /var/lib/netd/registry.db --network 10.244.0.0/16")]
    Init(RegistryInitArgs),
    /// Bootstrap tokens of an embedded or etcd registry, which netd-join checks.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `netd registry token`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token; prints it (id.secret) alone on stdout. The registry keeps only its hash.
    #[command(after_help = "Example:\n  netd registry token create --registry etcd:http://10.0.0.2:2379 --ttl 2h")]
    Create(TokenCreateArgs),
    /// List tokens: id, time left, description (never the secret).
    List(TokenRegistryArgs),
    /// Delete a token: nodes can no longer join with it.
    Delete(TokenDeleteArgs),
}

/// The registry holding the bootstrap tokens.
#[derive(Debug, Args)]
pub struct TokenRegistryArgs {
    /// The registry (embedded:PATH or etcd:URL).
    #[command(flatten)]
    pub registry: crate::daemon::config::RegistryArgs,
}

/// `netd registry token create`'s options.
#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// The registry holding the tokens.
    #[command(flatten)]
    pub registry: TokenRegistryArgs,
    /// How long the token joins nodes (a Go duration as kubeadm takes it: 24h, 90m; 0 = never expires).
    #[arg(long, env = "NETD_TOKEN_TTL", value_name = "DURATION", default_value = "24h",
          value_parser = |s: &str| crate::model::autonomy::parse_go_duration(s).map_err(|e| e.to_string()))]
    pub ttl: std::time::Duration,
    /// What the token is for.
    #[arg(long, env = "NETD_TOKEN_DESCRIPTION", value_name = "TEXT", default_value = "")]
    pub description: String,
}

/// `netd registry token delete`'s options.
#[derive(Debug, Args)]
pub struct TokenDeleteArgs {
    /// The registry holding the tokens.
    #[command(flatten)]
    pub registry: TokenRegistryArgs,
    /// The token's id (the part before the '.').
    #[arg(value_name = "ID")]
    pub id: String,
}

/// `netd registry init`'s options.
#[derive(Debug, Args)]
pub struct RegistryInitArgs {
    /// The SQLite file to create.
    #[arg(long, value_name = "PATH")]
    pub db: PathBuf,
    /// Cluster network.
    #[arg(long, value_name = "CIDR")]
    pub network: ipnet::Ipv4Net,
    /// Prefix length of each node's subnet.
    #[arg(long, value_name = "N", default_value_t = 24)]
    pub subnet_len: u8,
    /// VXLAN network identifier.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vni: u32,
}

/// `netd restore`'s options.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot to program.
    #[arg(long, value_name = "PATH", default_value = snapshot::DEFAULT_PATH)]
    pub snapshot: PathBuf,
    /// Print the outcome as one JSON object.
    #[arg(long)]
    pub json: bool,
}

const TUNNEL_AGENT_EXAMPLES: &str = "\
Examples:
  netd-cloud certs node --ca-dir /etc/netd/ca --name edge-1 --ip 10.0.5.7 --out /etc/netd/tunnel
  netd tunnel-agent --server 192.168.0.10:10262 --cert-dir /etc/netd/tunnel
  netd tunnel-agent --server cloud-a:10262,cloud-b:10262 --cert-dir /etc/netd/tunnel \\
      --pod-subnet 10.244.7.0/24 --extra-ports 9100";

/// `netd tunnel-agent`'s options.
#[derive(Debug, Args)]
pub struct TunnelAgentArgs {
    /// The agent's certificate directory.
    #[command(flatten)]
    pub certs: TunnelCertArgs,
    /// Tunnel servers, HOST:PORT, comma-separated; the agent keeps a link to each.
    #[arg(
        long = "server",
        env = "NETD_TUNNEL_SERVERS",
        value_name = "HOST:PORT,...",
        value_delimiter = ',',
        required = true
    )]
    pub servers: Vec<String>,
    /// The name the servers' certificate carries [default: the first server's host].
    #[arg(long, env = "NETD_TUNNEL_SERVER_NAME", value_name = "NAME")]
    pub server_name: Option<String>,
    /// This node's addresses, the only ones it dials besides loopback [default: its certificate's IP SANs].
    #[arg(long, env = "NETD_TUNNEL_NODE_IPS", value_name = "IP,...", value_delimiter = ',')]
    pub node_ip: Vec<std::net::IpAddr>,
    /// This node's pod subnets, also dialled (metrics of pods) [default: the subnet of /run/flannel/subnet.env].
    #[arg(long, env = "NETD_TUNNEL_POD_SUBNETS", value_name = "CIDR,...", value_delimiter = ',')]
    pub pod_subnet: Vec<ipnet::IpNet>,
    /// Ports it dials besides 10250 and 10255.
    #[arg(long, env = "NETD_TUNNEL_EXTRA_PORTS", value_name = "PORT,...", value_delimiter = ',')]
    pub extra_ports: Vec<u16>,
    /// Dial loopback destinations too (services bound to 127.0.0.1 or ::1).
    #[arg(long, env = "NETD_TUNNEL_DIAL_LOOPBACK", value_name = "BOOL", value_parser = crate::model::parse_bool, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub dial_loopback: bool,
    /// /metrics and /healthz (plain HTTP).
    #[arg(long, env = "NETD_TUNNEL_METRICS_LISTEN", value_name = "IP:PORT", default_value = "127.0.0.1:10267")]
    pub metrics_listen: std::net::SocketAddr,
    /// Threads of the async runtime.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Log level and format.
    #[command(flatten)]
    pub log: LogArgs,
}
