//! `netd-autonomy set | unset | status NODE`: a node's autonomy in any
//! registry (see `netd::autonomy` for what it implies per registry).
//!
//! Exit status: 0 done, 1 failed, 2 bad command line, 3 unknown node,
//! 4 registry unreachable.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use netd::autonomy::{autonomy_for, run, Action, AutonomyError, Outcome, RegistryKind};
use netd::daemon::config::{parse_command_line, RegistryArgs};
use netd::model::autonomy::{parse_go_duration, Autonomy};
use netd::registry::{embedded, AnyRegistry, OpenSettings, RegistryError, RegistrySpec};

const EXAMPLES: &str = "\
Examples:
  netd-autonomy set edge-1 --registry etcd:http://10.0.0.1:2379
  netd-autonomy set edge-1 --duration 2h --registry kubernetes:https://10.0.0.1:6443 \\
      --token-file /run/token --ca-file /run/ca.crt
  netd-autonomy unset edge-1
  netd-autonomy status edge-1 --json

Autonomy is node.beta.alibabacloud.com/autonomy=true on Kubernetes; node.beta.openyurt.io/autonomy
and node.openyurt.io/autonomy-duration are honoured, and unset clears all three.
Exit status: 0 done, 1 failed, 2 bad command line, 3 unknown node, 4 registry unreachable.";

/// Switch a node's autonomy on or off and show what it implies now: an
/// autonomous node cut off from the cloud keeps its routes at its peers and
/// (on Kubernetes, with netd-controller) its pods.
#[derive(Debug, Parser)]
#[command(name = "netd-autonomy", version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make the node autonomous (with no time limit unless --duration).
    Set {
        #[command(flatten)]
        target: Target,
        /// Bound the autonomy: how long after the node is cut off (a Go duration: 90m, 2h, 1h30m; 0 = no limit).
        #[arg(long, value_name = "DURATION", value_parser = check_duration)]
        duration: Option<String>,
    },
    /// Make the node non-autonomous, whatever switched autonomy on.
    Unset {
        #[command(flatten)]
        target: Target,
    },
    /// Show the node's autonomy, where it comes from and what it implies now.
    Status {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, Args)]
struct Target {
    /// The node's name.
    node: String,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Print JSON (versioned: its "version" field) instead of text.
    #[arg(long)]
    json: bool,
}

/// clap value parser: the value is kept as text, checked here so that a bad
/// one is refused with clap's message, which quotes it.
fn check_duration(text: &str) -> Result<String, String> {
    parse_go_duration(text)
        .map(|_| text.to_string())
        .map_err(|reason| format!("not a Go duration such as 90m, 2h or 0 ({reason})"))
}

fn open_settings(node: &str, args: &RegistryArgs) -> OpenSettings {
    OpenSettings {
        // The Kubernetes backend's own node: here the node worked on.
        node_name: node.to_string(),
        network: args.network,
        token_file: args.token_file.clone(),
        ca_file: args.ca_file.clone(),
        client_cert: args.client_cert_files(),
        poll: embedded::DEFAULT_POLL,
    }
}

async fn execute(command: Command) -> Result<(Outcome, bool)> {
    let (target, action) = match command {
        Command::Set { target, duration } => {
            let autonomy = autonomy_for(duration.as_deref())?;
            let node = target.node.clone();
            (target, Action::Set { node, autonomy })
        }
        Command::Unset { target } => {
            let node = target.node.clone();
            (target, Action::Set { node, autonomy: Autonomy::Off })
        }
        Command::Status { target } => {
            let node = target.node.clone();
            (target, Action::Status { node })
        }
    };
    // netd run's default: the registry on this host.
    let spec =
        target.registry.registry.clone().unwrap_or_else(|| RegistrySpec::Embedded(embedded::DEFAULT_PATH.into()));
    let mut registry = AnyRegistry::open(&spec, &open_settings(&target.node, &target.registry))
        .await
        .with_context(|| format!("opening the registry {spec}"))?;
    let outcome = run(&mut registry, RegistryKind::of(&spec), action).await?;
    Ok((outcome, target.json))
}

fn exit_code(error: &anyhow::Error) -> u8 {
    let registry = error.chain().find_map(|e| {
        e.downcast_ref::<RegistryError>().or_else(|| match e.downcast_ref::<AutonomyError>() {
            Some(AutonomyError::Registry(inner)) => Some(inner),
            _ => None,
        })
    });
    match registry {
        Some(RegistryError::UnknownNode { .. }) => 3,
        Some(RegistryError::Unreachable(_)) => 4,
        _ => 1,
    }
}

fn main() -> ExitCode {
    let cli: Cli = parse_command_line(std::env::args_os()).unwrap_or_else(|error| error.exit());
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(execute(cli.command)));
    match outcome {
        Ok((outcome, json)) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&outcome.json()).unwrap_or_default());
            } else {
                print!("{}", outcome.text());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("netd-autonomy: {error:#}");
            ExitCode::from(exit_code(&error))
        }
    }
}
