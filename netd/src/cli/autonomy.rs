//! `netd-autonomy`'s command line.

use clap::{Args, Parser, Subcommand};

use crate::daemon::config::RegistryArgs;
use crate::model::autonomy::parse_go_duration;

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
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// `netd-autonomy`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make the node autonomous (with no time limit unless --duration).
    Set {
        /// The node and its registry.
        #[command(flatten)]
        target: Target,
        /// Bound the autonomy: how long after the node is cut off (a Go duration: 90m, 2h, 1h30m; 0 = no limit).
        #[arg(long, value_name = "DURATION", value_parser = check_duration)]
        duration: Option<String>,
    },
    /// Make the node non-autonomous, whatever switched autonomy on.
    Unset {
        /// The node and its registry.
        #[command(flatten)]
        target: Target,
    },
    /// Show the node's autonomy, where it comes from and what it implies now.
    Status {
        /// The node and its registry.
        #[command(flatten)]
        target: Target,
    },
}

/// The node a subcommand works on, its registry and the output form.
#[derive(Debug, Args)]
pub struct Target {
    /// The node's name.
    pub node: String,
    /// The registry holding the node.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print JSON (versioned: its "version" field) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// clap value parser: the value is kept as text, checked here so that a bad
/// one is refused with clap's message, which quotes it.
fn check_duration(text: &str) -> Result<String, String> {
    parse_go_duration(text)
        .map(|_| text.to_string())
        .map_err(|reason| format!("not a Go duration such as 90m, 2h or 0 ({reason})"))
}
