//! `netd-join`'s command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Parser};

use crate::daemon::config::parse_duration;
use crate::join::CaPin;
use crate::registry::RegistrySpec;

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
pub struct Cli {
    // A String, checked by `run`: clap would quote a bad value (a secret) in its error.
    // The help is not a doc comment: rustdoc would read its brackets as links.
    #[allow(missing_docs)]
    #[arg(
        long,
        env = "NETD_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        help = "The bootstrap token, id.secret ([a-z0-9]{6}.[a-z0-9]{16})"
    )]
    pub token: String,
    /// The registry to join: kubernetes:https://HOST:PORT, or embedded:PATH / etcd:URL (tokens from `netd registry token create`).
    #[arg(long, env = "NETD_REGISTRY", value_name = "SPEC")]
    pub registry: RegistrySpec,
    /// The node-spec JSON, as edgeadm takes it.
    #[arg(long, env = "NETD_JOIN_NODE_SPEC", value_name = "JSON")]
    pub node_spec: Option<String>,
    /// A file holding the node-spec JSON.
    #[arg(long, env = "NETD_JOIN_NODE_SPEC_FILE", value_name = "FILE")]
    pub node_spec_file: Option<PathBuf>,
    /// The cluster CA's pin: `sha256:` and the hex SHA-256 of its SubjectPublicKeyInfo (repeatable).
    #[arg(
        long = "discovery-token-ca-cert-hash",
        env = "NETD_JOIN_CA_CERT_HASH",
        value_name = "sha256:HEX",
        value_delimiter = ','
    )]
    pub pins: Vec<CaPin>,
    /// Check everything and print what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Join again although an earlier join used another node-spec or registry.
    #[arg(long)]
    pub force: bool,
    /// Where netd's settings, the tunnel certificate and the join record go.
    #[arg(long, env = "NETD_CONFIG_DIR", value_name = "DIR", default_value = "/etc/netd")]
    pub config_dir: PathBuf,
    /// How long to wait for the cluster to sign the node's certificate (e.g. 120, 2m).
    #[arg(long, env = "NETD_JOIN_CSR_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "120")]
    pub csr_timeout: Duration,
    /// The container runtime's socket that `manageRuntime` checks (default: containerd's, CRI-O's, cri-dockerd's); `unix://` optional, as kubeadm's --cri-socket.
    #[arg(long, env = "NETD_CRI_SOCKET", value_name = "PATH", value_parser = parse_cri_socket)]
    pub cri_socket: Option<PathBuf>,
    /// Kubernetes joins: wire the kubelet through netd's edge hub (its CA, the kubelet's kubeconfig, a systemd unit and a kubelet drop-in); false: leave the kubelet as it is.
    #[arg(long, env = "NETD_JOIN_HUB", value_name = "BOOL", value_parser = crate::model::parse_bool, num_args = 0..=1, default_value = "true", default_missing_value = "true")]
    pub hub: bool,
    /// The netd binary on this host, as the hub's unit runs it.
    #[arg(long, env = "NETD_JOIN_NETD_BIN", value_name = "FILE", default_value = "/usr/local/bin/netd")]
    pub netd_bin: PathBuf,
    /// The hub's cache directory (its CA in pki/).
    #[arg(long, env = "NETD_JOIN_HUB_CACHE_DIR", value_name = "DIR", default_value = crate::hub::DEFAULT_CACHE_DIR)]
    pub hub_cache_dir: PathBuf,
    /// The kubelet's kubeconfig naming the hub (the kubelet drop-in passes it as --kubeconfig).
    #[arg(
        long,
        env = "NETD_JOIN_KUBELET_KUBECONFIG",
        value_name = "FILE",
        default_value = "/etc/kubernetes/kubelet-hub.conf"
    )]
    pub kubelet_kubeconfig: PathBuf,
    /// Where the hub's unit (netd-hub.service) and the kubelet drop-in (kubelet.service.d/20-netd-hub.conf) go.
    #[arg(long, env = "NETD_JOIN_SYSTEMD_DIR", value_name = "DIR", default_value = "/etc/systemd/system")]
    pub systemd_dir: PathBuf,
    /// The kubelet's client certificate and key (one file, rotated by the kubelet): the hub's identity and the kubelet's.
    #[arg(
        long,
        env = "NETD_JOIN_KUBELET_CLIENT_CERT",
        value_name = "FILE",
        default_value = "/var/lib/kubelet/pki/kubelet-client-current.pem"
    )]
    pub kubelet_client_cert: PathBuf,
}

/// kubeadm writes the socket as `unix:///run/…`; a plain path is the same.
fn parse_cri_socket(text: &str) -> Result<PathBuf, String> {
    let path = text.strip_prefix("unix://").unwrap_or(text);
    if !path.starts_with('/') {
        return Err(format!("{text:?} is not an absolute path (or unix:///path)"));
    }
    Ok(PathBuf::from(path))
}
