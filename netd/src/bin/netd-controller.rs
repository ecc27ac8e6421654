//! `netd-controller`: the cloud side of netd's node lifecycle — cloud and
//! edge node roles, pod CIDRs that survive a node's re-registration, leader
//! election among replicas. The logic is `netd::controller`; the command
//! line is `netd::cli::controller`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use netd::cli::controller::{
    ApiArgs, Cli, Command, PlanArgs, RequestArgs, RolloutCommand, RunArgs, StartArgs, StatusArgs,
};
use netd::cmd::init_logging;
use netd::controller::leader::ElectionConfig;
use netd::controller::nodes::NodeOptions;
use netd::controller::{ControllerMetrics, ControllerOptions};
use netd::daemon::config::parse_command_line;
use netd::kube::KubeClient;
use netd::registry::{NetworkConfig, OpenSettings};
use netd::rollout::kubernetes::{self as rollouts, ExecutorOptions, StartOptions};
use netd::rollout::{Phase, Request};

/// A client of the API server `api` names.
fn api_client(api: &ApiArgs) -> Result<KubeClient> {
    let settings =
        OpenSettings { token_file: api.token_file.clone(), ca_file: api.ca_file.clone(), ..Default::default() };
    let config = netd::registry::kube_config(api.kubernetes.as_deref(), &settings)?;
    KubeClient::new(&config).context("the API server settings")
}

fn identity(given: Option<String>) -> String {
    given.or_else(|| std::env::var("POD_NAME").ok().filter(|n| !n.is_empty())).unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}_{}", host.trim(), std::process::id())
    })
}

fn run(args: RunArgs) -> Result<()> {
    init_logging(args.log, args.log_format.log_format);
    let client = api_client(&args.api)?;
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
    let client = api_client(&args.api)?;
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
    let client = api_client(&args.request.api)?;
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
    let client = api_client(&args.api)?;
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
    use clap::Parser as _;
    use netd::controller::leader;
    use netd::controller::nodes::DEFAULT_RECLAIM_AFTER;
    use netd::rollout::kubernetes::DEFAULT_DAEMONSET;

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
