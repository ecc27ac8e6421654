//! Daemon settings: defaults, then a JSON config file, then `NETD_*`
//! environment variables, then command-line flags (later wins).
//!
//! clap reads the flags and the environment into [`RunArgs`], whose fields
//! are all optional: a clap default would hide the config file beneath it.
//! [`RunArgs::resolve`] then fills the gaps from the file and the defaults
//! into a [`DaemonConfig`]. [`parse_command_line`] is clap's parser with
//! netd's wording for a few errors, for every netd binary.

#[cfg(feature = "clap")]
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[cfg(feature = "clap")]
use clap::error::{ContextKind, ContextValue, ErrorKind};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub use netd_registry::RegistrySpec;

/// Everything the daemon needs to run.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// This node's name.
    pub node_name: String,
    /// The registry.
    pub registry: RegistrySpec,
    /// Underlay interface; `None`: the default-route interface.
    pub iface: Option<String>,
    /// Public IP; `None`: the first IPv4 address of the interface.
    pub public_ip: Option<Ipv4Addr>,
    /// Cluster network, required for the Kubernetes registry (flannel's
    /// net-conf) and for creating an embedded registry.
    pub network: Option<Ipv4Net>,
    /// Install flannel's masquerade rules.
    pub masquerade: bool,
    /// Route peers on the same L2 directly.
    pub direct_routing: bool,
    /// Directory for the snapshot and the VTEP MAC store.
    pub state_dir: PathBuf,
    /// Where to write flannel's subnet.env.
    pub subnet_env: PathBuf,
    /// Health, readiness and metrics listener.
    pub health_addr: SocketAddr,
    /// Bearer token file for the Kubernetes registry.
    pub token_file: Option<PathBuf>,
    /// CA bundle for the Kubernetes registry.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (e.g. the kubelet's, to act as this node) for the
    /// Kubernetes registry and the pod watch, instead of a bearer token.
    pub client_cert: Option<netd_kube::ClientCertFiles>,
    /// Where the daemon learns which pods are bound to this node, to free
    /// the pinned IPs of pods that are gone.
    pub pods: PodSource,
    /// How long a deleted pod's pin waits before it is freed.
    pub pin_grace: Duration,
    /// CNI configuration directory whose `netd-ipam` stores are kept tidy.
    pub cni_conf_dir: PathBuf,
    /// IPAM stores to keep tidy instead of the discovered ones.
    pub ipam_stores: Vec<PathBuf>,
}

/// Where pod authority comes from (`--pods`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodSource {
    /// `none`: nothing frees pins but the plugin's pressure reclaim.
    None,
    /// `kubernetes` (in-cluster) or `kubernetes:<https://server>` (with
    /// `--token-file`/`--ca-file`); `registry`, the default, means the
    /// Kubernetes registry's own client, or `none` with other registries.
    Kubernetes(Option<String>),
    /// `registry`: follow the registry.
    Registry,
}

impl std::str::FromStr for PodSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "none" => Ok(Self::None),
            None if s == "registry" => Ok(Self::Registry),
            None if s == "kubernetes" => Ok(Self::Kubernetes(None)),
            Some(("kubernetes", url)) if !url.is_empty() => Ok(Self::Kubernetes(Some(url.to_string()))),
            _ => Err(format!("unknown pod source {s:?} (registry, none, kubernetes[:URL])")),
        }
    }
}

impl std::fmt::Display for PodSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Registry => f.write_str("registry"),
            Self::Kubernetes(None) => f.write_str("kubernetes"),
            Self::Kubernetes(Some(url)) => write!(f, "kubernetes:{url}"),
        }
    }
}

/// The options of `netd run` and `netd cleanup` as clap read them from the
/// command line and the `NETD_*` environment; `None` where neither set one.
///
/// Flatten it into a subcommand (`#[cfg_attr(feature = "clap", command(flatten))]`) and turn it into a
/// [`DaemonConfig`] with [`RunArgs::resolve`].
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct RunArgs {
    /// JSON file with any of these settings, keys in camelCase (nodeName,
    /// publicIp, …); environment variables and flags override it.
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_CONFIG", value_name = "FILE"))]
    pub config: Option<PathBuf>,
    /// This node's name (default: $NODE_NAME, else the hostname).
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_NODE_NAME", value_name = "NAME"))]
    pub node_name: Option<String>,
    /// The registry and how to reach it.
    #[cfg_attr(feature = "clap", command(flatten))]
    pub registry: RegistryArgs,
    /// Underlay interface (default: the default-route interface).
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_IFACE", value_name = "NAME"))]
    pub iface: Option<String>,
    /// Public IP (default: the interface's first IPv4 address).
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_PUBLIC_IP", value_name = "IP", value_parser = parse_ipv4))]
    pub public_ip: Option<Ipv4Addr>,
    /// Install flannel's masquerade rules (nftables); also =true|false|1|0|yes|no.
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_MASQUERADE", value_name = "BOOL", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_missing_value = "true"))]
    pub masquerade: Option<bool>,
    /// Route peers on the same L2 without VXLAN; also =true|false|1|0|yes|no.
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_DIRECT_ROUTING", value_name = "BOOL", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_missing_value = "true"))]
    pub direct_routing: Option<bool>,
    /// Directory for the snapshot and the VTEP MAC store (default: /var/lib/netd).
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_STATE_DIR", value_name = "DIR"))]
    pub state_dir: Option<PathBuf>,
    /// Where to write flannel's subnet.env (default: /run/flannel/subnet.env).
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_SUBNET_ENV", value_name = "FILE"))]
    pub subnet_env: Option<PathBuf>,
    /// Listener for /healthz, /readyz and /metrics (default: 127.0.0.1:9617).
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_HEALTH_ADDR", value_name = "ADDR", value_parser = parse_socket_addr))]
    pub health_addr: Option<SocketAddr>,
    /// Where to learn the pods bound to this node, to free the pinned IPs of
    /// pods that are gone: registry (default: the Kubernetes registry's
    /// client, else none), none, kubernetes or kubernetes:URL.
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_PODS", value_name = "SOURCE"))]
    pub pods: Option<PodSource>,
    /// How long a deleted pod keeps its pinned IP before it is freed (e.g.
    /// 600, 90s, 10m, 1h; default 10m).
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_PIN_GRACE", value_name = "DURATION", value_parser = parse_duration))]
    pub pin_grace: Option<Duration>,
    /// CNI configuration directory whose netd-ipam stores are kept tidy
    /// (default: /etc/cni/net.d).
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_CNI_CONF_DIR", value_name = "DIR"))]
    pub cni_conf_dir: Option<PathBuf>,
    /// An IPAM store to keep tidy, instead of those the CNI configurations
    /// name (repeatable; comma-separated in the variable).
    #[cfg_attr(
        feature = "clap",
        arg(long = "ipam-store", env = "NETD_IPAM_STORE", value_name = "FILE", value_delimiter = ',')
    )]
    pub ipam_stores: Vec<PathBuf>,
}

/// Which registry, and what reaching it takes: the options every command
/// that reads the registry shares (`netd run`, `netd-cloud tunnel-server`, …).
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct RegistryArgs {
    /// The registry (see [`RegistrySpec`] for the spec's forms).
    // The help is not the doc comment: rustdoc would read its brackets as links.
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            env = "NETD_REGISTRY",
            value_name = "SPEC",
            help = "The registry: embedded[:PATH], etcd:URL[,URL…] or kubernetes[:URL] \
                  (netd run's default: embedded:/var/lib/netd/registry.db)"
        )
    )]
    pub registry: Option<RegistrySpec>,
    /// Cluster network (flannel's net-conf Network); with kubernetes, required
    /// unless flannel's /etc/kube-flannel/net-conf.json is there (then read
    /// with its SubnetLen and VNI; this option overrides the whole file).
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_NETWORK", value_name = "CIDR", value_parser = parse_cidr))]
    pub network: Option<Ipv4Net>,
    /// Bearer token file for kubernetes:URL.
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_TOKEN_FILE", value_name = "FILE"))]
    pub token_file: Option<PathBuf>,
    /// CA bundle for kubernetes:URL; with --client-cert, also for the
    /// in-cluster kubernetes (default there: the service account's ca.crt).
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_CA_FILE", value_name = "FILE"))]
    pub ca_file: Option<PathBuf>,
    /// Authenticate to the API server with this client certificate instead
    /// of a bearer token: PEM, with the private key too unless --client-key
    /// is given. netd run uses the kubelet's
    /// (/var/lib/kubelet/pki/kubelet-client-current.pem) to act as its node,
    /// which may change only its own Node; a rotated file is picked up
    /// without a restart.
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_CLIENT_CERT", value_name = "FILE"))]
    pub client_cert: Option<PathBuf>,
    /// The private key of --client-cert, when it is a file of its own.
    #[cfg_attr(feature = "clap", arg(long, env = "NETD_CLIENT_KEY", value_name = "FILE", requires = "client_cert"))]
    pub client_key: Option<PathBuf>,
}

impl RegistryArgs {
    /// The client certificate these options name, if any.
    pub fn client_cert_files(&self) -> Option<netd_kube::ClientCertFiles> {
        self.client_cert.clone().map(|cert| netd_kube::ClientCertFiles { cert, key: self.client_key.clone() })
    }
}

const DEFAULT_STATE_DIR: &str = "/var/lib/netd";
const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
const DEFAULT_HEALTH_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9617);

// The value parsers say what is wrong, not what was given: clap's message
// already quotes the value and names the flag.

pub use netd_model::parse_bool;

#[cfg(feature = "clap")]
fn parse_ipv4(text: &str) -> Result<Ipv4Addr, String> {
    text.parse().map_err(|_| "not an IPv4 address".into())
}

#[cfg(feature = "clap")]
fn parse_cidr(text: &str) -> Result<Ipv4Net, String> {
    text.parse().map_err(|_| "not an IPv4 CIDR".into())
}

/// `600`, `90s`, `10m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err("not a duration (e.g. 600, 90s, 10m, 1h)".into()),
    };
    let n: u64 = number.parse().map_err(|_| "not a duration (e.g. 600, 90s, 10m, 1h)".to_string())?;
    n.checked_mul(scale).map(Duration::from_secs).ok_or_else(|| "duration too long".into())
}

#[cfg(feature = "clap")]
fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| "not ADDR:PORT".into())
}

impl RunArgs {
    /// The effective configuration: these settings over the config file
    /// over the defaults, the node name falling back to `NODE_NAME` and then
    /// the hostname. Checked: a configuration that cannot work is an error.
    pub fn resolve(self) -> Result<DaemonConfig, String> {
        self.resolve_with(|name| std::env::var(name).ok())
    }

    /// [`RunArgs::resolve`] with `env` instead of the process environment
    /// for the one variable clap does not read (`NODE_NAME`, a fallback that
    /// ranks below the config file).
    pub fn resolve_with(self, env: impl Fn(&str) -> Option<String>) -> Result<DaemonConfig, String> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let node_name = [self.node_name, file.node_name]
            .into_iter()
            .flatten()
            .chain(env("NODE_NAME"))
            .find(|name| !name.is_empty())
            .unwrap_or_else(hostname);
        // The flags' certificate and key go together, and so do the file's:
        // a key from one with a certificate from the other is no pair.
        let client_cert = match (self.registry.client_cert_files(), file.client_cert) {
            (Some(files), _) => Some(files),
            (None, Some(cert)) => Some(netd_kube::ClientCertFiles { cert, key: file.client_key }),
            (None, None) if file.client_key.is_some() => return Err("config file: clientKey needs clientCert".into()),
            (None, None) => None,
        };
        let defaults =
            DaemonConfig::new(node_name, self.registry.registry.or(file.registry).unwrap_or_else(default_registry));
        let config = DaemonConfig {
            iface: self.iface.or(file.iface),
            public_ip: self.public_ip.or(file.public_ip),
            network: self.registry.network.or(file.network),
            masquerade: self.masquerade.or(file.masquerade).unwrap_or(defaults.masquerade),
            direct_routing: self.direct_routing.or(file.direct_routing).unwrap_or(defaults.direct_routing),
            state_dir: self.state_dir.or(file.state_dir).unwrap_or(defaults.state_dir),
            subnet_env: self.subnet_env.or(file.subnet_env).unwrap_or(defaults.subnet_env),
            health_addr: self.health_addr.or(file.health_addr).unwrap_or(defaults.health_addr),
            token_file: self.registry.token_file.or(file.token_file),
            ca_file: self.registry.ca_file.or(file.ca_file),
            client_cert,
            pods: self.pods.or(file.pods).unwrap_or(defaults.pods),
            pin_grace: match (self.pin_grace, file.pin_grace) {
                (Some(grace), _) => grace,
                (None, Some(text)) => parse_duration(&text).map_err(|e| format!("config file: pinGrace: {e}"))?,
                (None, None) => defaults.pin_grace,
            },
            cni_conf_dir: self.cni_conf_dir.or(file.cni_conf_dir).unwrap_or(defaults.cni_conf_dir),
            ipam_stores: if self.ipam_stores.is_empty() {
                file.ipam_stores.unwrap_or_default()
            } else {
                self.ipam_stores
            },
            ..defaults
        };
        config.check()?;
        Ok(config)
    }
}

/// The config file: every key optional, unknown keys ignored (a newer
/// netd's file still starts an older one).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct FileConfig {
    node_name: Option<String>,
    #[serde(default, with = "spec_text")]
    registry: Option<RegistrySpec>,
    iface: Option<String>,
    public_ip: Option<Ipv4Addr>,
    network: Option<Ipv4Net>,
    masquerade: Option<bool>,
    direct_routing: Option<bool>,
    state_dir: Option<PathBuf>,
    subnet_env: Option<PathBuf>,
    health_addr: Option<SocketAddr>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(default, with = "spec_text")]
    pods: Option<PodSource>,
    pin_grace: Option<String>,
    cni_conf_dir: Option<PathBuf>,
    ipam_stores: Option<Vec<PathBuf>>,
}

/// A spec in the config file: its command-line text.
mod spec_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, T: std::fmt::Display>(spec: &Option<T>, serializer: S) -> Result<S::Ok, S::Error> {
        match spec {
            Some(spec) => serializer.serialize_some(&spec.to_string()),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: std::str::FromStr<Err = String>,
    {
        let text = Option::<String>::deserialize(deserializer)?;
        text.map(|text| text.parse().map_err(serde::de::Error::custom)).transpose()
    }
}

/// `netd run`'s registry when none is given: the embedded one at its
/// default path.
fn default_registry() -> RegistrySpec {
    RegistrySpec::Embedded(netd_registry::embedded::DEFAULT_PATH.into())
}

impl DaemonConfig {
    /// The settings `netd run` starts from, for `node_name` on `registry`:
    /// underlay found from the default route, no masquerading, state in
    /// `/var/lib/netd`, flannel's `/run/flannel/subnet.env`, health and
    /// metrics on `127.0.0.1:9617`, pods from the registry, the default pin
    /// grace, CNI configuration in `/etc/cni/net.d`. An embedder sets the
    /// fields it wants different, then hands it to [`super::run`], which
    /// [checks](DaemonConfig::check) it first.
    ///
    /// ```
    /// use netd_dataplane::daemon::DaemonConfig;
    /// use netd_registry::RegistrySpec;
    ///
    /// let mut config = DaemonConfig::new("edge-1", RegistrySpec::Embedded("/var/lib/app/registry.db".into()));
    /// config.iface = Some("eth0".into());
    /// config.state_dir = "/var/lib/app/netd".into();
    /// assert!(config.check().is_ok());
    /// ```
    pub fn new(node_name: impl Into<String>, registry: RegistrySpec) -> Self {
        Self {
            node_name: node_name.into(),
            registry,
            iface: None,
            public_ip: None,
            network: None,
            masquerade: false,
            direct_routing: false,
            state_dir: DEFAULT_STATE_DIR.into(),
            subnet_env: netd_model::subnet_env::DEFAULT_PATH.into(),
            health_addr: DEFAULT_HEALTH_ADDR,
            token_file: None,
            ca_file: None,
            client_cert: None,
            pods: PodSource::Registry,
            pin_grace: super::pins::DEFAULT_GRACE,
            cni_conf_dir: DEFAULT_CNI_CONF_DIR.into(),
            ipam_stores: Vec::new(),
        }
    }

    /// Whether the settings can work: a node name of 1–253 characters, an
    /// interface name of 1–15 bytes, and for the Kubernetes registry a
    /// source of the cluster network. The error says which and why.
    pub fn check(&self) -> Result<(), String> {
        if self.node_name.is_empty() || self.node_name.len() > 253 {
            return Err(format!("node name {:?} must be 1-253 characters", self.node_name));
        }
        if let Some(iface) = &self.iface {
            if iface.is_empty() || iface.len() > 15 {
                return Err(format!("interface name {iface:?} must be 1-15 bytes"));
            }
        }
        if matches!(self.registry, RegistrySpec::Kubernetes(_)) && self.network.is_none() {
            kubernetes_network_source()?;
        }
        Ok(())
    }

    /// The offline snapshot's path.
    pub fn snapshot_path(&self) -> PathBuf {
        self.state_dir.join("snapshot.json")
    }

    /// The VTEP MAC store's path.
    pub fn mac_store_path(&self) -> PathBuf {
        self.state_dir.join("vtep-mac.db")
    }

    /// This configuration as a `--config` file (pretty JSON, every key,
    /// `null` for a setting left unset, such as the interface that is then
    /// found at start-up): what `netd run --print-config` prints.
    pub fn to_config_file(&self) -> Result<String, String> {
        let file = FileConfig {
            node_name: Some(self.node_name.clone()),
            registry: Some(self.registry.clone()),
            iface: self.iface.clone(),
            public_ip: self.public_ip,
            network: self.network,
            masquerade: Some(self.masquerade),
            direct_routing: Some(self.direct_routing),
            state_dir: Some(self.state_dir.clone()),
            subnet_env: Some(self.subnet_env.clone()),
            health_addr: Some(self.health_addr),
            token_file: self.token_file.clone(),
            ca_file: self.ca_file.clone(),
            client_cert: self.client_cert.as_ref().map(|files| files.cert.clone()),
            client_key: self.client_cert.as_ref().and_then(|files| files.key.clone()),
            pods: Some(self.pods.clone()),
            pin_grace: Some(format!("{}s", self.pin_grace.as_secs())),
            cni_conf_dir: Some(self.cni_conf_dir.clone()),
            ipam_stores: Some(self.ipam_stores.clone()),
        };
        serde_json::to_string_pretty(&file).map_err(|e| format!("configuration as JSON: {e}"))
    }
}

/// Without `--network`, the Kubernetes registry reads flannel's
/// `net-conf.json` where flannel's DaemonSet mounts it
/// ([`NET_CONF_PATH`](netd_registry::kubernetes::NET_CONF_PATH)), with its
/// `SubnetLen` and `Backend.VNI`; `Err` when that file is not there either.
pub fn kubernetes_network_source() -> Result<(), String> {
    let path = Path::new(netd_registry::kubernetes::NET_CONF_PATH);
    if path.is_file() {
        Ok(())
    } else {
        Err(format!("the kubernetes registry needs --network or flannel's {} (net-conf Network)", path.display()))
    }
}

fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read(path).map_err(|e| format!("config file {}: {e}", path.display()))?;
    let de = &mut serde_json::Deserializer::from_slice(&text);
    serde_path_to_error::deserialize(de)
        .map_err(|e| format!("config file {}: at `{}`: {}", path.display(), e.path(), e.inner()))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

#[cfg(feature = "clap")]
/// Parses `args` (the program name first, as from [`std::env::args_os`])
/// into `P` with clap, reading `NETD_*` variables from the process
/// environment; `Err` holds clap's error, for
/// [`clap::Error::exit`](clap::error::Error::exit) (help and version
/// included). Some errors are in netd's words, each with clap's tips and
/// usage kept: "unknown option --x" (with the nearest option), "--x needs a
/// value", and a bad value from the environment names its variable.
pub fn parse_command_line<P, I, T>(args: I) -> Result<P, clap::Error>
where
    P: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    parse_with(P::command(), args)
}

#[cfg(feature = "clap")]
fn parse_with<P, I, T>(mut command: clap::Command, args: I) -> Result<P, clap::Error>
where
    P: clap::FromArgMatches,
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let matches = command.try_get_matches_from_mut(args.iter()).map_err(|e| reword(e, &command, &args))?;
    P::from_arg_matches(&matches).map_err(|e| e.format(&mut command))
}

#[cfg(feature = "clap")]
fn reword(error: clap::Error, command: &clap::Command, args: &[OsString]) -> clap::Error {
    let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else {
        return error;
    };
    let kind = error.kind();
    let empty_value = matches!(error.get(ContextKind::InvalidValue), Some(ContextValue::String(v)) if v.is_empty());
    let headline = match kind {
        ErrorKind::UnknownArgument if arg.starts_with('-') => Some(format!("unknown option {arg}")),
        ErrorKind::InvalidValue if empty_value => Some(format!("{arg} needs a value")),
        _ => None,
    };
    let variable = match kind {
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => env_source(arg, command, args),
        _ => None,
    };
    if headline.is_none() && variable.is_none() {
        return error;
    }
    // clap's own rendering minus its first line keeps its tips (the nearest
    // option), usage and help pointer without re-implementing them.
    let rendered = error.render().to_string();
    let body = rendered.strip_prefix("error: ").unwrap_or(&rendered);
    let (first_line, rest) = body.split_once('\n').unwrap_or((body, "\n"));
    let headline = headline.unwrap_or_else(|| first_line.to_string());
    let headline = match variable {
        Some(variable) => format!("{variable}: {headline}"),
        None => headline,
    };
    let mut reworded = clap::Error::raw(kind, format!("{headline}\n{rest}"));
    for (context, value) in error.context() {
        reworded.insert(context, value.clone());
    }
    reworded.with_cmd(command)
}

#[cfg(feature = "clap")]
/// The environment variable a bad value came from: the option's own, when
/// the option is not on the command line.
fn env_source(arg: &str, command: &clap::Command, args: &[OsString]) -> Option<String> {
    let long = arg.strip_prefix("--")?.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).next()?;
    let flag = format!("--{long}");
    let on_command_line = args
        .iter()
        .filter_map(|a| a.to_str())
        .any(|a| a == flag || a.strip_prefix(flag.as_str()).is_some_and(|value| value.starts_with('=')));
    if on_command_line {
        return None;
    }
    find_env(command, long)
}

#[cfg(feature = "clap")]
fn find_env(command: &clap::Command, long: &str) -> Option<String> {
    command
        .get_arguments()
        .filter(|a| a.get_long() == Some(long))
        .find_map(|a| a.get_env())
        .map(|name| name.to_string_lossy().into_owned())
        .or_else(|| command.get_subcommands().find_map(|sub| find_env(sub, long)))
}

#[cfg(all(test, feature = "clap"))]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[derive(Debug, clap::Parser)]
    #[command(args_override_self = true)]
    struct Run {
        #[command(flatten)]
        args: RunArgs,
    }

    /// `netd run`'s arguments through clap with `env` as the whole
    /// environment: each variable becomes its option's clap default, which
    /// ranks where the environment does (below flags), so no test touches the
    /// process environment.
    fn config_in(args: &[&str], env: &[(&str, &str)]) -> Result<DaemonConfig, String> {
        let command = Run::command().mut_args(|arg| {
            let value =
                arg.get_env().and_then(|name| env.iter().find(|(k, _)| name == std::ffi::OsStr::new(k))).map(|e| e.1);
            let arg = arg.env(None);
            match value {
                Some(value) => arg.default_value(&*String::leak(value.to_string())),
                None => arg,
            }
        });
        let run: Run =
            parse_with(command, std::iter::once("run").chain(args.iter().copied())).map_err(|e| e.to_string())?;
        run.args.resolve_with(|k| env.iter().find(|(name, _)| *name == k).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn flags_override_env_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("netd.json");
        std::fs::write(&file, r#"{"nodeName":"from-file","iface":"eth9","masquerade":true,"futureKey":1}"#).unwrap();
        let file = file.display().to_string();
        let env = [("NETD_IFACE", "eth1"), ("NETD_CONFIG", file.as_str())];
        let c = config_in(&["--iface", "eth2", "--registry=etcd:http://127.0.0.1:2379"], &env).unwrap();
        assert_eq!(c.node_name, "from-file");
        assert_eq!(c.iface.as_deref(), Some("eth2"));
        assert!(c.masquerade);
        assert_eq!(c.registry, RegistrySpec::Etcd(vec!["http://127.0.0.1:2379".into()]));
        let c = config_in(&[], &env).unwrap();
        assert_eq!(c.iface.as_deref(), Some("eth1"));
    }

    #[test]
    fn bad_settings_get_precise_errors() {
        let err = |a: &[&str]| config_in(a, &[]).unwrap_err();
        assert!(err(&["--bogus", "1"]).contains("unknown option --bogus"));
        assert!(err(&["--public-ip", "300.1.1.1"]).contains("not an IPv4 address"));
        assert!(err(&["--registry", "zookeeper:x"]).contains("unknown registry"));
        assert!(err(&["--registry", "kubernetes"]).contains("needs --network"));
        assert!(err(&["--iface"]).contains("needs a value"));
        assert!(err(&["--masquerade=maybe"]).contains("not a boolean"));
        assert!(err(&["--iface", "a-very-long-interface-name"]).contains("1-15 bytes"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.json");
        std::fs::write(&file, r#"{"masquerade":"yes"}"#).unwrap();
        assert!(err(&["--config", file.to_str().unwrap()]).contains("at `masquerade`"));
        std::fs::write(&file, r#"{"registry":"zookeeper:x"}"#).unwrap();
        let message = err(&["--config", file.to_str().unwrap()]);
        assert!(message.contains("at `registry`: unknown registry"), "{message}");
    }

    #[test]
    fn a_client_certificate_comes_with_its_own_key_or_none() {
        let pem = "/var/lib/kubelet/pki/kubelet-client-current.pem";
        let env = [("NETD_CLIENT_CERT", pem)];
        let c = config_in(&[], &env).unwrap();
        let files = c.client_cert.clone().unwrap();
        assert_eq!((files.cert.to_str(), files.key.as_deref()), (Some(pem), None));
        assert_eq!(files.key_file().to_str(), Some(pem), "kubelet's file holds the key too");
        let c = config_in(&["--client-cert", "/c.pem", "--client-key", "/k.pem"], &env).unwrap();
        let files = c.client_cert.clone().unwrap();
        assert_eq!((files.cert.to_str(), files.key_file().to_str()), (Some("/c.pem"), Some("/k.pem")));
        // It round-trips through --print-config's file.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("printed.json");
        std::fs::write(&file, c.to_config_file().unwrap()).unwrap();
        assert_eq!(config_in(&["--config", file.to_str().unwrap()], &[]).unwrap().client_cert, c.client_cert);
        // A key alone is refused, on the command line and in the file.
        let err = config_in(&["--client-key", "/k.pem"], &[]).unwrap_err();
        assert!(err.contains("--client-cert"), "{err}");
        std::fs::write(&file, r#"{"clientKey":"/k.pem"}"#).unwrap();
        let err = config_in(&["--config", file.to_str().unwrap()], &[]).unwrap_err();
        assert!(err.contains("clientKey needs clientCert"), "{err}");
    }

    #[test]
    fn an_unknown_option_names_the_nearest() {
        let err = config_in(&["--ifaec", "eth0"], &[]).unwrap_err();
        assert!(err.contains("unknown option --ifaec"), "{err}");
        assert!(err.contains("'--iface'"), "{err}");
        assert!(err.contains("Usage:"), "{err}");
    }

    #[test]
    fn switches_take_a_value_only_after_equals() {
        let node = [("NODE_NAME", "n1")];
        assert!(config_in(&["--masquerade", "--direct-routing"], &node).unwrap().masquerade);
        assert!(config_in(&["--direct-routing=yes"], &node).unwrap().direct_routing);
        assert!(!config_in(&["--masquerade=0"], &node).unwrap().masquerade);
        let off = [("NODE_NAME", "n1"), ("NETD_MASQUERADE", "false")];
        assert!(!config_in(&[], &off).unwrap().masquerade);
        assert!(config_in(&["--masquerade"], &off).unwrap().masquerade);
        // A separate word after a switch is not its value.
        assert!(config_in(&["--masquerade", "false"], &node).is_err());
    }

    #[test]
    fn defaults_and_node_name_fallbacks() {
        let c = config_in(&[], &[("NODE_NAME", "from-env")]).unwrap();
        assert_eq!(c.node_name, "from-env");
        assert_eq!(c.registry, RegistrySpec::Embedded(netd_registry::embedded::DEFAULT_PATH.into()));
        assert_eq!(c.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(c.subnet_env, Path::new(netd_model::subnet_env::DEFAULT_PATH));
        assert_eq!(c.health_addr, DEFAULT_HEALTH_ADDR);
        assert!(!c.masquerade && !c.direct_routing);
        let c = config_in(&["--node-name", "from-flag", "--iface=eth0", "--iface", "eth1"], &[("NODE_NAME", "x")]);
        let c = c.unwrap();
        assert_eq!(c.node_name, "from-flag");
        assert_eq!(c.iface.as_deref(), Some("eth1"), "the last of a repeated option wins");
    }

    #[test]
    fn printed_config_reads_back_as_the_same_config() {
        let args = [
            "--node-name=n1",
            "--registry",
            "kubernetes:https://10.0.0.1:6443",
            "--network",
            "10.244.0.0/16",
            "--iface",
            "eth3",
            "--public-ip",
            "192.0.2.7",
            "--masquerade",
            "--state-dir",
            "/tmp/netd-state",
            "--health-addr",
            "127.0.0.1:19617",
            "--token-file",
            "/run/token",
        ];
        let c = config_in(&args, &[]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("printed.json");
        std::fs::write(&file, c.to_config_file().unwrap()).unwrap();
        let read_back = config_in(&["--config", file.to_str().unwrap()], &[]).unwrap();
        assert_eq!(read_back, c);
        for spec in ["embedded:/x/r.db", "etcd:http://a:2379,http://b:2379", "kubernetes", "k8s:https://s"] {
            let spec: RegistrySpec = spec.parse().unwrap();
            assert_eq!(spec.to_string().parse::<RegistrySpec>().unwrap(), spec);
        }
    }

    #[test]
    fn help_names_every_variable_and_the_real_defaults() {
        let help = Run::command().render_long_help().to_string();
        for variable in ["NETD_CONFIG", "NETD_IFACE", "NETD_MASQUERADE", "NETD_HEALTH_ADDR", "NETD_CA_FILE"] {
            assert!(help.contains(&format!("[env: {variable}")), "{variable} missing from\n{help}");
        }
        // The registry's default is netd run's; the tunnel server shares the option and has none.
        let registry_default = format!("(netd run's default: embedded:{})", netd_registry::embedded::DEFAULT_PATH);
        assert!(help.contains(&registry_default), "{registry_default} missing from\n{help}");
        let defaults = [
            netd_model::subnet_env::DEFAULT_PATH.to_string(),
            DEFAULT_STATE_DIR.to_string(),
            DEFAULT_HEALTH_ADDR.to_string(),
        ];
        for default in defaults {
            assert!(help.contains(&format!("(default: {default})")), "{default} missing from\n{help}");
        }
    }
}
