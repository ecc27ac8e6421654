//! `netd-controller`'s command line: the controller and its rollouts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::cmd::LogFormatArgs;
use crate::daemon::config::parse_duration;
use crate::rollout::kubernetes::{DaemonSetRef, DEFAULT_DAEMONSET};

const EXAMPLES: &str = "Examples:
  netd-controller run                                   # in a pod: in-cluster credentials
  netd-controller run --dnat-target 192.168.0.10       # also drive this cloud node's tunnel DNAT
  netd-controller run --kubernetes https://10.0.0.1:6443 --token-file t --ca-file ca.crt \\
      --allocate-node-cidrs --cluster-cidr 10.244.0.0/16
  netd-controller rollout start                          # after a new netd image in the OnDelete DaemonSet
  netd-controller rollout status                         # follow it; pause | resume | cancel";

/// The cloud side of netd.
#[derive(Debug, Parser)]
#[command(name = "netd-controller", version, after_help = EXAMPLES)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// `netd-controller`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (one replica leads; the others wait).
    Run(Box<RunArgs>),
    /// Batched rollouts of netd.
    #[command(subcommand)]
    Rollout(RolloutCommand),
}

/// `netd-controller rollout`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Print the batch sizes of a rollout, one per line: 1, then doubling, never above 10 % of the nodes.
    #[command(
        after_help = "Example:\n  netd-controller rollout plan --nodes 100\n  netd-controller rollout plan --nodes 100 --remaining 20   # after a resume"
    )]
    Plan(PlanArgs),
    /// Pre-check, then start rolling the netd DaemonSet's new template out, batch by batch (the leader executes).
    #[command(
        after_help = "Example:\n  kubectl -n kube-system set image ds/netd netd=netd:v2   # OnDelete: nothing restarts yet\n  netd-controller rollout start\n  netd-controller rollout status"
    )]
    Start(StartArgs),
    /// Show the rollout; by default follow it until it finishes, pauses or is cancelled.
    Status(StatusArgs),
    /// Let the running batch finish, then start nothing new.
    Pause(RequestArgs),
    /// Start a paused rollout again at a batch of one.
    Resume(RequestArgs),
    /// Let the running batch finish, then stop; upgraded nodes stay upgraded.
    Cancel(RequestArgs),
}

/// `netd-controller rollout start`'s options.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The netd DaemonSet, NAMESPACE/NAME (its updateStrategy must be OnDelete).
    #[arg(long, env = "NETD_DAEMONSET", value_name = "NS/NAME", default_value = DEFAULT_DAEMONSET)]
    pub daemonset: DaemonSetRef,
    /// How long each node may take to come back Ready before the rollout pauses.
    #[arg(long, env = "NETD_ROLLOUT_NODE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "5m")]
    pub node_timeout: Duration,
    /// Also require the new image on every online target node (edge nodes that cannot pull while cut off).
    #[arg(long, env = "NETD_ROLLOUT_REQUIRE_IMAGE")]
    pub require_image_present: bool,
    /// How to reach the API server.
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `netd-controller rollout status`'s options.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Follow the rollout until it is over (kubectl's --watch).
    #[arg(short, long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub watch: bool,
    /// Give up following after this long (0: never).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0")]
    pub timeout: Duration,
    /// The rollouts' namespace and the API server.
    #[command(flatten)]
    pub request: RequestArgs,
}

/// What `rollout pause | resume | cancel` (and `status`) need: the rollouts' namespace and the API server.
#[derive(Debug, Args)]
pub struct RequestArgs {
    /// Where rollouts are recorded.
    #[command(flatten)]
    pub rollouts: RolloutNamespace,
    /// How to reach the API server.
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Where rollouts are recorded.
#[derive(Debug, Args)]
pub struct RolloutNamespace {
    /// Where rollouts are recorded (the netd DaemonSet's namespace).
    #[arg(
        long = "rollout-namespace",
        env = "NETD_ROLLOUT_NAMESPACE",
        value_name = "NS",
        default_value = "kube-system"
    )]
    pub namespace: String,
}

/// `netd-controller rollout plan`'s options.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// How many nodes the rollout covers.
    #[arg(long, value_name = "N")]
    pub nodes: usize,
    /// How many are still to upgrade (a resumed rollout starts again at 1); default: all.
    #[arg(long, value_name = "N")]
    pub remaining: Option<usize>,
}

/// How to reach the API server.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The API server (default: in-cluster, from the service account).
    #[arg(long, env = "NETD_KUBERNETES", value_name = "URL")]
    pub kubernetes: Option<String>,
    /// Bearer token file for --kubernetes.
    #[arg(long, env = "NETD_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA bundle for --kubernetes.
    #[arg(long, env = "NETD_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// `netd-controller run`'s options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// How to reach the API server.
    #[command(flatten)]
    pub api: ApiArgs,
    /// This replica's name in leader election (default: $POD_NAME, else host name and pid).
    #[arg(long, env = "NETD_CONTROLLER_IDENTITY", value_name = "NAME")]
    pub identity: Option<String>,
    /// Namespace of the leader Lease.
    #[arg(long, env = "NETD_LEADER_ELECT_NAMESPACE", value_name = "NS", default_value = "kube-system")]
    pub leader_elect_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "NETD_LEADER_ELECT_NAME", value_name = "NAME", default_value = "netd-controller")]
    pub leader_elect_name: String,
    /// How long a silent leader's lease is honoured (e.g. 15, 15s).
    #[arg(long, env = "NETD_LEASE_DURATION", value_name = "DURATION", value_parser = parse_duration, default_value = "15")]
    pub lease_duration: Duration,
    /// How long a leader tries to renew before it stops acting.
    #[arg(long, env = "NETD_RENEW_DEADLINE", value_name = "DURATION", value_parser = parse_duration, default_value = "10")]
    pub renew_deadline: Duration,
    /// How often candidates try and the leader renews.
    #[arg(long, env = "NETD_RETRY_PERIOD", value_name = "DURATION", value_parser = parse_duration, default_value = "2")]
    pub retry_period: Duration,
    /// Assign node pod CIDRs (run kube-controller-manager with --allocate-node-cidrs=false).
    #[arg(long, env = "NETD_ALLOCATE_NODE_CIDRS")]
    pub allocate_node_cidrs: bool,
    /// The network pod CIDRs come from (with --allocate-node-cidrs).
    #[arg(long, env = "NETD_CLUSTER_CIDR", value_name = "CIDR", required_if_eq("allocate_node_cidrs", "true"))]
    pub cluster_cidr: Option<ipnet::Ipv4Net>,
    /// Prefix length of each node's pod CIDR.
    #[arg(long, env = "NETD_NODE_CIDR_MASK_SIZE", value_name = "N", default_value_t = 24)]
    pub node_cidr_mask_size: u8,
    /// VXLAN network identifier (for VTEP MACs given back to re-registered nodes).
    #[arg(long, env = "NETD_VNI", value_name = "N", default_value_t = 1)]
    pub vni: u32,
    /// How long a deleted, non-autonomous node's pod CIDR stays reserved (autonomous: for ever).
    #[arg(long, env = "NETD_RECLAIM_AFTER", value_name = "DURATION", value_parser = parse_duration, default_value = "1h")]
    pub reclaim_after: Duration,
    /// Drive this node's tunnel DNAT, redirecting to the tunnel server at this address (unset: no DNAT here).
    #[arg(long, env = "NETD_DNAT_TARGET", value_name = "IP")]
    pub dnat_target: Option<std::net::Ipv4Addr>,
    /// Where and how the tunnel DNAT's programs attach (with --dnat-target).
    #[command(flatten)]
    pub dnat: crate::dnat::AttachArgs,
    /// Edge node address types redirected, comma-separated (kube-apiserver's --kubelet-preferred-address-types).
    #[arg(
        long,
        env = "NETD_DNAT_ADDRESS_TYPES",
        value_name = "TYPE,...",
        value_delimiter = ',',
        default_value = "InternalIP"
    )]
    pub dnat_address_types: Vec<String>,
    /// This node's name, in the Events of the tunnel configuration and of rollouts (default: $NODE_NAME, else the host name).
    #[arg(long, env = "NETD_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Where /healthz, /readyz and /metrics are served ('' = nowhere).
    #[arg(long, env = "NETD_METRICS_LISTEN", value_name = "ADDR:PORT", default_value = "0.0.0.0:10267",
          value_parser = parse_listen)]
    pub metrics_listen: Listen,
    /// Where rollouts are recorded.
    #[command(flatten)]
    pub rollouts: RolloutNamespace,
    /// A rollout paused this long is closed and its state removed (seed: 15 days).
    #[arg(long, env = "NETD_ROLLOUT_PAUSED_TTL", value_name = "DURATION", value_parser = parse_duration, default_value = "360h")]
    pub rollout_paused_ttl: Duration,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "NETD_LOG", value_name = "LEVEL", default_value = "info")]
    pub log: tracing::Level,
    /// The log line format.
    #[command(flatten)]
    pub log_format: LogFormatArgs,
}

/// A listen address, or none.
#[derive(Debug, Clone, Copy)]
pub struct Listen(pub Option<SocketAddr>);

fn parse_listen(text: &str) -> Result<Listen, String> {
    if text.is_empty() {
        return Ok(Listen(None));
    }
    text.parse().map(|addr| Listen(Some(addr))).map_err(|_| "not ADDR:PORT (or '' for none)".into())
}
