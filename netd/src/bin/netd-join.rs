//! `netd-join`: makes this machine a netd edge node of a cluster, with
//! edgeadm's node-spec. The logic is `netd::join`.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{ArgGroup, Parser};
use netd::daemon::config::{parse_command_line, parse_duration};
use netd::join::{BootstrapToken, CaPin, JoinError, JoinOptions, JoinPaths, Outcome, Plan};
use netd::registry::RegistrySpec;

const EXAMPLES: &str = "Examples:
  netd-join --token abcdef.0123456789abcdef --registry kubernetes:https://192.168.0.10:6443 \\
      --discovery-token-ca-cert-hash sha256:<hex> \\
      --node-spec '{\"flannelface\":\"eth1\",\"enableIptables\":true,\"quiet\":true,\"nodeNameOverride\":\"*.edge\"}'
  netd-join ... --node-spec-file /etc/netd/node-spec.json --dry-run
  netd-join ... --hub=false       # leave the kubelet talking to kube-apiserver directly
  netd-join --token \"$(netd registry token create --registry etcd:http://10.0.0.2:2379)\" \\
      --registry etcd:http://10.0.0.2:2379 --node-spec '{\"quiet\":true}'";

/// Joins this machine to a cluster as a netd edge node.
#[derive(Debug, Parser)]
#[command(name = "netd-join", version, after_help = EXAMPLES)]
#[command(group(ArgGroup::new("spec").required(true).args(["node_spec", "node_spec_file"])))]
struct Cli {
    // A String, checked by `run`: clap would quote a bad value (a secret) in its error.
    // The help is not a doc comment: rustdoc would read its brackets as links.
    #[arg(
        long,
        env = "NETD_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        help = "The bootstrap token, id.secret ([a-z0-9]{6}.[a-z0-9]{16})"
    )]
    token: String,
    /// The registry to join: kubernetes:https://HOST:PORT, or embedded:PATH / etcd:URL (tokens from `netd registry token create`).
    #[arg(long, env = "NETD_REGISTRY", value_name = "SPEC")]
    registry: RegistrySpec,
    /// The node-spec JSON, as edgeadm takes it.
    #[arg(long, env = "NETD_JOIN_NODE_SPEC", value_name = "JSON")]
    node_spec: Option<String>,
    /// A file holding the node-spec JSON.
    #[arg(long, env = "NETD_JOIN_NODE_SPEC_FILE", value_name = "FILE")]
    node_spec_file: Option<PathBuf>,
    /// The cluster CA's pin: `sha256:` and the hex SHA-256 of its SubjectPublicKeyInfo (repeatable).
    #[arg(
        long = "discovery-token-ca-cert-hash",
        env = "NETD_JOIN_CA_CERT_HASH",
        value_name = "sha256:HEX",
        value_delimiter = ','
    )]
    pins: Vec<CaPin>,
    /// Check everything and print what would change; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Join again although an earlier join used another node-spec or registry.
    #[arg(long)]
    force: bool,
    /// Where netd's settings, the tunnel certificate and the join record go.
    #[arg(long, env = "NETD_CONFIG_DIR", value_name = "DIR", default_value = "/etc/netd")]
    config_dir: PathBuf,
    /// How long to wait for the cluster to sign the node's certificate (e.g. 120, 2m).
    #[arg(long, env = "NETD_JOIN_CSR_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "120")]
    csr_timeout: Duration,
    /// The container runtime's socket that `manageRuntime` checks (default: containerd's, CRI-O's, cri-dockerd's); `unix://` optional, as kubeadm's --cri-socket.
    #[arg(long, env = "NETD_CRI_SOCKET", value_name = "PATH", value_parser = parse_cri_socket)]
    cri_socket: Option<PathBuf>,
    /// Kubernetes joins: wire the kubelet through netd's edge hub (its CA, the kubelet's kubeconfig, a systemd unit and a kubelet drop-in); false: leave the kubelet as it is.
    #[arg(long, env = "NETD_JOIN_HUB", value_name = "BOOL", value_parser = netd::model::parse_bool, num_args = 0..=1, default_value = "true", default_missing_value = "true")]
    hub: bool,
    /// The netd binary on this host, as the hub's unit runs it.
    #[arg(long, env = "NETD_JOIN_NETD_BIN", value_name = "FILE", default_value = "/usr/local/bin/netd")]
    netd_bin: PathBuf,
    /// The hub's cache directory (its CA in pki/).
    #[arg(long, env = "NETD_JOIN_HUB_CACHE_DIR", value_name = "DIR", default_value = netd::hub::DEFAULT_CACHE_DIR)]
    hub_cache_dir: PathBuf,
    /// The kubelet's kubeconfig naming the hub (the kubelet drop-in passes it as --kubeconfig).
    #[arg(
        long,
        env = "NETD_JOIN_KUBELET_KUBECONFIG",
        value_name = "FILE",
        default_value = "/etc/kubernetes/kubelet-hub.conf"
    )]
    kubelet_kubeconfig: PathBuf,
    /// Where the hub's unit (netd-hub.service) and the kubelet drop-in (kubelet.service.d/20-netd-hub.conf) go.
    #[arg(long, env = "NETD_JOIN_SYSTEMD_DIR", value_name = "DIR", default_value = "/etc/systemd/system")]
    systemd_dir: PathBuf,
    /// The kubelet's client certificate and key (one file, rotated by the kubelet): the hub's identity and the kubelet's.
    #[arg(
        long,
        env = "NETD_JOIN_KUBELET_CLIENT_CERT",
        value_name = "FILE",
        default_value = "/var/lib/kubelet/pki/kubelet-client-current.pem"
    )]
    kubelet_client_cert: PathBuf,
}

/// kubeadm writes the socket as `unix:///run/…`; a plain path is the same.
fn parse_cri_socket(text: &str) -> Result<PathBuf, String> {
    let path = text.strip_prefix("unix://").unwrap_or(text);
    if !path.starts_with('/') {
        return Err(format!("{text:?} is not an absolute path (or unix:///path)"));
    }
    Ok(PathBuf::from(path))
}

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
