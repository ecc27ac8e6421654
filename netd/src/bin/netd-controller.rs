//! `netd-controller`: the cloud side of netd's node lifecycle — cloud and
//! edge node roles, pod CIDRs that survive a node's re-registration, leader
//! election among replicas. The logic is `netd::controller`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use netd::controller::leader::ElectionConfig;
use netd::controller::nodes::NodeOptions;
use netd::controller::{ControllerMetrics, ControllerOptions};
use netd::daemon::config::{parse_command_line, parse_duration};
use netd::kube::KubeClient;
use netd::registry::{NetworkConfig, OpenSettings};
use netd::rollout::kubernetes::{self as rollouts, DaemonSetRef, ExecutorOptions, StartOptions, DEFAULT_DAEMONSET};
use netd::rollout::{Phase, Request};

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
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller (one replica leads; the others wait).
    Run(Box<RunArgs>),
    /// Batched rollouts of netd.
    #[command(subcommand)]
    Rollout(RolloutCommand),
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
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

#[derive(Debug, Args)]
struct StartArgs {
    /// The netd DaemonSet, NAMESPACE/NAME (its updateStrategy must be OnDelete).
    #[arg(long, env = "NETD_DAEMONSET", value_name = "NS/NAME", default_value = DEFAULT_DAEMONSET)]
    daemonset: DaemonSetRef,
    /// How long each node may take to come back Ready before the rollout pauses.
    #[arg(long, env = "NETD_ROLLOUT_NODE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "5m")]
    node_timeout: Duration,
    /// Also require the new image on every online target node (edge nodes that cannot pull while cut off).
    #[arg(long, env = "NETD_ROLLOUT_REQUIRE_IMAGE")]
    require_image_present: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Follow the rollout until it is over (kubectl's --watch).
    #[arg(short, long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    watch: bool,
    /// Give up following after this long (0: never).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0")]
    timeout: Duration,
    #[command(flatten)]
    request: RequestArgs,
}

#[derive(Debug, Args)]
struct RequestArgs {
    #[command(flatten)]
    rollouts: RolloutNamespace,
    #[command(flatten)]
    api: ApiArgs,
}

/// Where rollouts are recorded.
#[derive(Debug, Args)]
struct RolloutNamespace {
    /// Where rollouts are recorded (the netd DaemonSet's namespace).
    #[arg(
        long = "rollout-namespace",
        env = "NETD_ROLLOUT_NAMESPACE",
        value_name = "NS",
        default_value = "kube-system"
    )]
    namespace: String,
}

#[derive(Debug, Args)]
struct PlanArgs {
    /// How many nodes the rollout covers.
    #[arg(long, value_name = "N")]
    nodes: usize,
    /// How many are still to upgrade (a resumed rollout starts again at 1); default: all.
    #[arg(long, value_name = "N")]
    remaining: Option<usize>,
}

/// How to reach the API server.
#[derive(Debug, Args)]
struct ApiArgs {
    /// The API server (default: in-cluster, from the service account).
    #[arg(long, env = "NETD_KUBERNETES", value_name = "URL")]
    kubernetes: Option<String>,
    /// Bearer token file for --kubernetes.
    #[arg(long, env = "NETD_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// CA bundle for --kubernetes.
    #[arg(long, env = "NETD_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
}

impl ApiArgs {
    fn client(&self) -> Result<KubeClient> {
        let settings =
            OpenSettings { token_file: self.token_file.clone(), ca_file: self.ca_file.clone(), ..Default::default() };
        let config = netd::registry::kube_config(self.kubernetes.as_deref(), &settings)?;
        KubeClient::new(&config).context("the API server settings")
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// This replica's name in leader election (default: $POD_NAME, else host name and pid).
    #[arg(long, env = "NETD_CONTROLLER_IDENTITY", value_name = "NAME")]
    identity: Option<String>,
    /// Namespace of the leader Lease.
    #[arg(long, env = "NETD_LEADER_ELECT_NAMESPACE", value_name = "NS", default_value = "kube-system")]
    leader_elect_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "NETD_LEADER_ELECT_NAME", value_name = "NAME", default_value = "netd-controller")]
    leader_elect_name: String,
    /// How long a silent leader's lease is honoured (e.g. 15, 15s).
    #[arg(long, env = "NETD_LEASE_DURATION", value_name = "DURATION", value_parser = parse_duration, default_value = "15")]
    lease_duration: Duration,
    /// How long a leader tries to renew before it stops acting.
    #[arg(long, env = "NETD_RENEW_DEADLINE", value_name = "DURATION", value_parser = parse_duration, default_value = "10")]
    renew_deadline: Duration,
    /// How often candidates try and the leader renews.
    #[arg(long, env = "NETD_RETRY_PERIOD", value_name = "DURATION", value_parser = parse_duration, default_value = "2")]
    retry_period: Duration,
    /// Assign node pod CIDRs (run kube-controller-manager with --allocate-node-cidrs=false).
    #[arg(long, env = "NETD_ALLOCATE_NODE_CIDRS")]
    allocate_node_cidrs: bool,
    /// The network pod CIDRs come from (with --allocate-node-cidrs).
    #[arg(long, env = "NETD_CLUSTER_CIDR", value_name = "CIDR", required_if_eq("allocate_node_cidrs", "true"))]
    cluster_cidr: Option<ipnet::Ipv4Net>,
    /// Prefix length of each node's pod CIDR.
    #[arg(long, env = "NETD_NODE_CIDR_MASK_SIZE", value_name = "N", default_value_t = 24)]
    node_cidr_mask_size: u8,
    /// VXLAN network identifier (for VTEP MACs given back to re-registered nodes).
    #[arg(long, env = "NETD_VNI", value_name = "N", default_value_t = 1)]
    vni: u32,
    /// How long a deleted, non-autonomous node's pod CIDR stays reserved (autonomous: for ever).
    #[arg(long, env = "NETD_RECLAIM_AFTER", value_name = "DURATION", value_parser = parse_duration, default_value = "1h")]
    reclaim_after: Duration,
    /// Drive this node's tunnel DNAT, redirecting to the tunnel server at this address (unset: no DNAT here).
    #[arg(long, env = "NETD_DNAT_TARGET", value_name = "IP")]
    dnat_target: Option<std::net::Ipv4Addr>,
    #[command(flatten)]
    dnat: netd::dnat::AttachArgs,
    /// Edge node address types redirected, comma-separated (kube-apiserver's --kubelet-preferred-address-types).
    #[arg(
        long,
        env = "NETD_DNAT_ADDRESS_TYPES",
        value_name = "TYPE,...",
        value_delimiter = ',',
        default_value = "InternalIP"
    )]
    dnat_address_types: Vec<String>,
    /// This node's name, in the Events of the tunnel configuration and of rollouts (default: $NODE_NAME, else the host name).
    #[arg(long, env = "NETD_NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
    /// Where /healthz, /readyz and /metrics are served ('' = nowhere).
    #[arg(long, env = "NETD_METRICS_LISTEN", value_name = "ADDR:PORT", default_value = "0.0.0.0:10267",
          value_parser = parse_listen)]
    metrics_listen: Listen,
    #[command(flatten)]
    rollouts: RolloutNamespace,
    /// A rollout paused this long is closed and its state removed (seed: 15 days).
    #[arg(long, env = "NETD_ROLLOUT_PAUSED_TTL", value_name = "DURATION", value_parser = parse_duration, default_value = "360h")]
    rollout_paused_ttl: Duration,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "NETD_LOG", value_name = "LEVEL", default_value = "info")]
    log: tracing::Level,
}

/// A listen address, or none.
#[derive(Debug, Clone, Copy)]
struct Listen(Option<SocketAddr>);

fn parse_listen(text: &str) -> Result<Listen, String> {
    if text.is_empty() {
        return Ok(Listen(None));
    }
    text.parse().map(|addr| Listen(Some(addr))).map_err(|_| "not ADDR:PORT (or '' for none)".into())
}

fn identity(given: Option<String>) -> String {
    given.or_else(|| std::env::var("POD_NAME").ok().filter(|n| !n.is_empty())).unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}_{}", host.trim(), std::process::id())
    })
}

fn run(args: RunArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_max_level(args.log)
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let client = args.api.client()?;
    let election = ElectionConfig {
        lease_duration: args.lease_duration,
        renew_deadline: args.renew_deadline,
        retry_period: args.retry_period,
        ..ElectionConfig::new(&args.leader_elect_namespace, &args.leader_elect_name, &identity(args.identity))
    };
    election.check()?;
    let allocate = match (args.allocate_node_cidrs, args.cluster_cidr) {
        (true, Some(network)) => {
            let config =
                NetworkConfig { network: network.trunc(), subnet_len: args.node_cidr_mask_size, vni: args.vni };
            config.check()?;
            Some(config)
        }
        (true, None) => bail!("--allocate-node-cidrs needs --cluster-cidr"),
        (false, _) => None,
    };
    let node =
        args.node_name.clone().or_else(|| std::env::var("NODE_NAME").ok()).unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string()
        });
    let tunnel = match args.dnat_target {
        None => None,
        Some(target) => {
            let (mut dnat, links) = netd::ebpf::dnat::TunnelDnat::load_or_attach(&args.dnat.attach_options())
                .context("attaching the tunnel DNAT")?;
            for link in links {
                tracing::info!("tunnel DNAT: {link:?}");
            }
            dnat.set_target(target, args.dnat.scope()).context("setting the tunnel DNAT's target")?;
            let mut options = netd::controller::tunnel_config::TunnelConfigOptions::new(node.clone());
            options.address_types = args.dnat_address_types.clone();
            Some(netd::controller::TunnelPart { dnat, options })
        }
    };
    let options = ControllerOptions {
        client,
        election,
        nodes: NodeOptions { allocate, reclaim_after: args.reclaim_after },
        metrics_listen: args.metrics_listen.0,
        tunnel,
        rollout: ExecutorOptions {
            namespace: args.rollouts.namespace.clone(),
            paused_ttl: args.rollout_paused_ttl,
            host: node,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let metrics = Arc::new(ControllerMetrics::default());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        netd::controller::run(options, metrics, shutdown).await?;
        Ok(())
    })
}

fn plan(args: PlanArgs) -> ExitCode {
    if args.remaining.is_some_and(|left| left > args.nodes) {
        eprintln!("netd-controller: --remaining {} is more than --nodes {}", args.remaining.unwrap_or(0), args.nodes);
        return ExitCode::from(2);
    }
    for size in netd::rollout::Batches::new(args.nodes, args.remaining.unwrap_or(args.nodes)) {
        println!("{size}");
    }
    ExitCode::SUCCESS
}

/// A one-shot command's runtime: one thread is plenty.
fn block_on<T>(work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(work)
}

fn rollout_start(args: StartArgs) -> Result<()> {
    let client = args.api.client()?;
    let options = StartOptions {
        daemonset: args.daemonset.clone(),
        node_timeout: args.node_timeout,
        require_image: args.require_image_present,
    };
    let state = block_on(async { Ok(rollouts::start(&client, &options).await?) })?;
    let sizes: Vec<String> = netd::rollout::plan(state.total()).iter().map(usize::to_string).collect();
    println!(
        "daemon set \"{}\" rollout started: {} node(s) from {} to {}; batches {}",
        args.daemonset,
        state.total(),
        state.from,
        state.target_label,
        sizes.join(", ")
    );
    if !state.deferred.is_empty() {
        println!("offline nodes are deferred until they come back");
    }
    Ok(())
}

/// Prints the status (each new line once); with `watch`, until the
/// rollout is over: exit 0 when complete, 1 when paused or cancelled (as
/// kubectl fails on a paused Deployment).
fn rollout_status(args: StatusArgs) -> Result<ExitCode> {
    let client = args.request.api.client()?;
    let namespace = args.request.rollouts.namespace.clone();
    block_on(async move {
        let started = std::time::Instant::now();
        let mut last = String::new();
        loop {
            let Some((state, _, target)) = rollouts::load(&client, &namespace).await? else {
                bail!("no rollout is recorded in {namespace}/{}", rollouts::STATE_CONFIG_MAP);
            };
            let line = state.status_line(&format!("daemon set \"{}\"", target.daemonset));
            if line != last {
                println!("{line}");
                last = line;
            }
            match state.phase {
                _ if !args.watch => return Ok(ExitCode::SUCCESS),
                Phase::Complete => return Ok(ExitCode::SUCCESS),
                Phase::Paused | Phase::Cancelled => return Ok(ExitCode::FAILURE),
                Phase::Running => {}
            }
            if !args.timeout.is_zero() && started.elapsed() > args.timeout {
                bail!("timed out after {:?} following the rollout", args.timeout);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

fn rollout_request(args: RequestArgs, request: Request) -> Result<()> {
    let client = args.api.client()?;
    let state = block_on(async { Ok(rollouts::ask(&client, &args.rollouts.namespace, request).await?) })?;
    let batch = state.batch.as_ref().map(|b| b.number);
    let text = match (request, batch) {
        (Request::Pause, Some(n)) => format!("pausing: batch {n} finishes, then nothing new starts"),
        (Request::Cancel, Some(n)) => format!("cancelling: batch {n} finishes, then the rollout stops"),
        (Request::Pause, None) => "pausing: nothing new starts".into(),
        (Request::Cancel, None) => "cancelling".into(),
        (Request::Resume, _) => "resuming: batches start again at one node".into(),
    };
    println!("rollout to {}: {text}", state.target_label);
    Ok(())
}

fn main() -> ExitCode {
    let cli: Cli = parse_command_line(std::env::args_os()).unwrap_or_else(|error| error.exit());
    let outcome = match cli.command {
        Command::Run(args) => run(*args).map(|()| ExitCode::SUCCESS),
        Command::Rollout(RolloutCommand::Plan(args)) => return plan(args),
        Command::Rollout(RolloutCommand::Start(args)) => rollout_start(args).map(|()| ExitCode::SUCCESS),
        Command::Rollout(RolloutCommand::Status(args)) => rollout_status(args),
        Command::Rollout(RolloutCommand::Pause(args)) => {
            rollout_request(args, Request::Pause).map(|()| ExitCode::SUCCESS)
        }
        Command::Rollout(RolloutCommand::Resume(args)) => {
            rollout_request(args, Request::Resume).map(|()| ExitCode::SUCCESS)
        }
        Command::Rollout(RolloutCommand::Cancel(args)) => {
            rollout_request(args, Request::Cancel).map(|()| ExitCode::SUCCESS)
        }
    };
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("netd-controller: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netd::controller::leader;
    use netd::controller::nodes::DEFAULT_RECLAIM_AFTER;

    #[test]
    fn defaults_are_the_library_s() {
        let cli = Cli::try_parse_from(["netd-controller", "run"]).unwrap_or_else(|e| panic!("{e}"));
        let Command::Run(args) = cli.command else { panic!("run") };
        assert_eq!(args.reclaim_after, DEFAULT_RECLAIM_AFTER);
        assert_eq!(args.lease_duration, leader::DEFAULT_LEASE_DURATION);
        assert_eq!(args.renew_deadline, leader::DEFAULT_RENEW_DEADLINE);
        assert_eq!(args.retry_period, leader::DEFAULT_RETRY_PERIOD);
        let error = Cli::try_parse_from(["netd-controller", "run", "--allocate-node-cidrs"]).unwrap_err().to_string();
        assert!(error.contains("--cluster-cidr"), "{error}");
        assert_eq!(args.rollout_paused_ttl, netd::rollout::state::DEFAULT_PAUSED_TTL);
        assert_eq!(args.rollouts.namespace, "kube-system");
    }

    #[test]
    fn rollout_commands_share_the_api_and_namespace_options() {
        let parse = |args: &[&str]| Cli::try_parse_from(["netd-controller", "rollout"].iter().chain(args));
        let cli = parse(&["start"]).unwrap_or_else(|e| panic!("{e}"));
        let Command::Rollout(RolloutCommand::Start(start)) = cli.command else { panic!("start") };
        assert_eq!(start.daemonset.to_string(), DEFAULT_DAEMONSET);
        assert_eq!(start.node_timeout, netd::rollout::state::DEFAULT_NODE_TIMEOUT);
        let cli = parse(&[
            "status",
            "--watch=false",
            "--rollout-namespace",
            "netd",
            "--kubernetes",
            "https://127.0.0.1:6443",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Rollout(RolloutCommand::Status(status)) = cli.command else { panic!("status") };
        assert!(!status.watch);
        assert_eq!(status.request.rollouts.namespace, "netd");
        assert_eq!(status.request.api.kubernetes.as_deref(), Some("https://127.0.0.1:6443"));
        let error = parse(&["start", "--daemonset", "netd"]).unwrap_err().to_string();
        assert!(error.contains("expected NAMESPACE/NAME"), "{error}");
    }
}
