//! `netd-autonomy set | unset | status NODE`: a node's autonomy in any
//! registry (see `netd::autonomy` for what it implies per registry).
//!
//! Exit status: 0 done, 1 failed, 2 bad command line, 3 unknown node,
//! 4 registry unreachable.
//!
//! The command line is `netd::cli::autonomy`.

use std::process::ExitCode;

use anyhow::{Context, Result};
use netd::autonomy::{autonomy_for, run, Action, AutonomyError, Outcome, RegistryKind};
use netd::cli::autonomy::{Cli, Command};
use netd::daemon::config::{parse_command_line, RegistryArgs};
use netd::model::autonomy::Autonomy;
use netd::registry::{embedded, AnyRegistry, OpenSettings, RegistryError, RegistrySpec};

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
