//! `netd-join`: makes this machine a netd edge node of a cluster, with
//! edgeadm's node-spec. The logic is `netd::join`; the command line is
//! `netd::cli::join`.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use netd::cli::join::Cli;
use netd::daemon::config::parse_command_line;
use netd::join::{BootstrapToken, JoinError, JoinOptions, JoinPaths, Outcome, Plan};

/// Without `quiet`, join asks before it changes anything — and refuses to
/// ask when nobody can answer.
fn ask(plan: &Plan, paths: &JoinPaths) -> Result<bool, JoinError> {
    if !std::io::stdin().is_terminal() {
        return Err(JoinError::NotConfirmed(
            "join would ask before changing this node, but stdin is not a terminal: set \"quiet\": true in the \
             node-spec to join without asking (nothing was changed)"
                .into(),
        ));
    }
    println!("{}", plan.describe(paths));
    print!("Go ahead? [y/N] ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

fn run(cli: Cli) -> Result<()> {
    let token: BootstrapToken = cli.token.parse()?;
    // clap's group gives exactly one of the two.
    let spec_text = match &cli.node_spec_file {
        Some(file) => {
            std::fs::read_to_string(file).with_context(|| format!("reading the node-spec {}", file.display()))?
        }
        None => cli.node_spec.clone().unwrap_or_default(),
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let paths = JoinPaths { config_dir: cli.config_dir };
    let options = JoinOptions {
        token,
        registry: cli.registry,
        spec_text,
        pins: cli.pins,
        dry_run: cli.dry_run,
        force: cli.force,
        paths: paths.clone(),
        hostname,
        sys_class_net: "/sys/class/net".into(),
        csr_timeout: cli.csr_timeout,
        cri_socket: cli.cri_socket,
        hub: cli.hub.then_some(netd::join::HubWiring {
            netd_bin: cli.netd_bin,
            cache_dir: cli.hub_cache_dir,
            kubelet_kubeconfig: cli.kubelet_kubeconfig,
            systemd_dir: cli.systemd_dir,
            kubelet_client_cert: cli.kubelet_client_cert,
        }),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match runtime.block_on(netd::join::join(&options, |plan| ask(plan, &paths)))? {
        Outcome::AlreadyJoined { node } => {
            println!("already joined as node {node} with this node-spec: nothing changed")
        }
        Outcome::DryRun(plan) => {
            println!("{}", plan.describe(&paths));
            let hub_files = plan.describe_hub_files(&paths);
            if !hub_files.is_empty() {
                println!("{hub_files}");
            }
            println!("(dry run: nothing changed)");
        }
        Outcome::Joined { plan, registered, files } => {
            println!("{}", plan.describe(&paths));
            match registered {
                Some(registered) => println!("joined: node {} {registered:?}; wrote {} files", plan.node, files.len()),
                None => println!("joined: node {}; wrote {} files", plan.node, files.len()),
            }
            for file in files {
                println!("  {}", file.display());
            }
            if registered.is_none() {
                println!("next: sign the node's tunnel certificate: {}", netd::join::sign_command(&paths));
            }
            if plan.hub.is_some() {
                println!(
                    "next: start the edge hub and restart the kubelet through it: {}",
                    netd::join::hub::NEXT_STEPS
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli: Cli = parse_command_line(std::env::args_os()).unwrap_or_else(|error| error.exit());
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("netd-join: {err:#}");
            ExitCode::FAILURE
        }
    }
}
