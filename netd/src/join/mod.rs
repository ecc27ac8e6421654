//! `netd-join`: turning a machine into a netd edge node (SPEC §4).
//!
//! Trust before change: [`spec`] validates the node-spec and [`token`] the
//! bootstrap token before anything is contacted; [`discovery`] then
//! establishes the cluster's CA from the token and the operator's pin, as
//! kubeadm does, before anything on the node changes.

pub mod discovery;
pub mod hub;
pub mod kube;
pub mod local;
pub mod spec;
pub mod token;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

pub use discovery::{CaPin, ClusterInfo, DiscoveryError};
pub use hub::{HubWiring, HubWiringError};
pub use local::{JoinPaths, JoinRecord, LocalError};
pub use spec::{NodeNameRule, NodeSpec, SpecError};
pub use token::{BootstrapToken, TokenError};

use crate::registry::{AnyTokenStore, RegistryError, RegistrySpec, TokenRefused};
use crate::tunnel::certs;

/// Container runtime sockets `manageRuntime` looks for, with their names.
pub const RUNTIME_SOCKETS: [(&str, &str); 3] = [
    ("containerd", "/run/containerd/containerd.sock"),
    ("CRI-O", "/var/run/crio/crio.sock"),
    ("Docker (cri-dockerd)", "/var/run/cri-dockerd.sock"),
];

/// Why a join stopped. Everything before [`JoinError::Kube`] happens before
/// anything is contacted or changed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The node-spec.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The node name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// `flannelface` names no interface here.
    #[error("node-spec: flannelface: no interface {0:?} on this machine")]
    NoInterface(String),
    /// `manageRuntime` found no container runtime answering.
    #[error(
        "node-spec: manageRuntime: no container runtime answers ({0}); install and start one, or name its socket \
         with --cri-socket"
    )]
    NoRuntime(String),
    /// Joined before with another spec or registry.
    #[error("already joined as {node} with {what}; re-run with --force to join again with the new one")]
    Changed {
        /// The node name of the earlier join.
        node: String,
        /// What differs.
        what: String,
    },
    /// A registry join cannot use.
    #[error("{0}")]
    Registry(String),
    /// The node's tunnel key and certificate request could not be made.
    #[error("the node's key: {0}")]
    NodeKey(#[source] certs::CertError),
    /// Trust could not be established.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The registry refused the token.
    #[error("{0} (nothing was changed)")]
    Token(#[from] TokenRefused),
    /// The registry could not check the token.
    #[error("checking the bootstrap token: {0}")]
    Store(#[from] RegistryError),
    /// Asked, the operator said no (or could not be asked).
    #[error("{0}")]
    NotConfirmed(String),
    /// The Kubernetes steps.
    #[error(transparent)]
    Kube(#[from] kube::KubeJoinError),
    /// The node's files.
    #[error(transparent)]
    Local(#[from] LocalError),
    /// The edge hub's files.
    #[error(transparent)]
    Hub(#[from] HubWiringError),
}

/// What a join is asked to do.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The bootstrap token.
    pub token: BootstrapToken,
    /// Where the cluster is.
    pub registry: RegistrySpec,
    /// The node-spec, as given.
    pub spec_text: String,
    /// `--discovery-token-ca-cert-hash`.
    pub pins: Vec<CaPin>,
    /// Stop after the checks and print the plan.
    pub dry_run: bool,
    /// Join again although an earlier join used another spec.
    pub force: bool,
    /// Where files go.
    pub paths: JoinPaths,
    /// This machine's host name.
    pub hostname: String,
    /// Where interfaces are listed (`/sys/class/net`).
    pub sys_class_net: PathBuf,
    /// How long to wait for the certificate.
    pub csr_timeout: Duration,
    /// The container runtime's socket (`--cri-socket`, as kubeadm's);
    /// `None`: the usual ones, [`RUNTIME_SOCKETS`].
    pub cri_socket: Option<PathBuf>,
    /// Wire the kubelet through the edge hub (a Kubernetes join only;
    /// `None`: `--hub=false`). See [`hub`].
    pub hub: Option<HubWiring>,
}

/// `manageRuntime`: the first of `candidates` that is a socket something
/// listens on, by name; otherwise, for each, what is wrong with it (absent,
/// not a socket, nobody answering).
pub async fn check_runtime(candidates: &[(String, PathBuf)]) -> Result<String, JoinError> {
    use std::os::unix::fs::FileTypeExt as _;
    let mut found = Vec::new();
    for (name, path) in candidates {
        let state = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "absent".to_string(),
            Err(e) => format!("unreadable: {e}"),
            Ok(meta) if !meta.file_type().is_socket() => "not a socket".to_string(),
            Ok(_) => match tokio::net::UnixStream::connect(path).await {
                Ok(_) => return Ok(format!("{name} at {}", path.display())),
                Err(e) => format!("nothing answers: {e}"),
            },
        };
        found.push(format!("{name} at {}: {state}", path.display()));
    }
    Err(JoinError::NoRuntime(found.join("; ")))
}

/// Who vouched for the token, and so for the cluster.
#[derive(Debug, Clone)]
pub enum Trust {
    /// kube-apiserver, through kubeadm's discovery: the cluster's CA is
    /// pinned.
    Kubernetes(ClusterInfo),
    /// An embedded or etcd registry that holds the token (see
    /// [`crate::registry::tokens`]).
    Registry(String),
}

/// What join found it must do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The node's name.
    pub node: String,
    /// The validated spec.
    pub spec: NodeSpec,
    /// How the token was checked.
    pub trust: Trust,
    /// The edge hub's wiring, when a Kubernetes join writes it.
    pub hub: Option<HubWiring>,
}

impl Plan {
    /// For people: what join will change.
    pub fn describe(&self, paths: &JoinPaths) -> String {
        let Trust::Kubernetes(cluster) = &self.trust else {
            return self.describe_registry_join(paths);
        };
        let labels: Vec<String> = self.spec.node_labels().iter().map(|(k, v)| format!("{k}={v}")).collect();
        let annotations: Vec<String> = self.spec.node_annotations().keys().cloned().collect();
        let hub = match &self.hub {
            None => String::new(),
            Some(hub) => {
                let files: Vec<String> = hub
                    .files(&self.node, &cluster.server, &paths.tunnel_dir().join("ca.crt"))
                    .iter()
                    .map(|f| format!("{} ({:o})", f.path.display(), f.mode))
                    .collect();
                format!("\n- the kubelet through the edge hub: {}", files.join(", "))
            }
        };
        format!(
            "join node {node} to {server} (CA pinned)\n\
             - certificate request for CN=system:node:{node}, O=system:nodes ({signer}); key and certificate in {tunnel}\n\
             - netd settings in {config}: iface {iface}, masquerade {masq}\n\
             - Node {node} labelled {labels}{annotations}{hub}\n\
             - record in {record}",
            node = self.node,
            server = cluster.server,
            signer = kube::SIGNER,
            tunnel = paths.tunnel_dir().display(),
            config = paths.netd_config().display(),
            iface = self.spec.flannel_iface.as_deref().unwrap_or("(the default-route interface)"),
            masq = self.spec.enable_iptables,
            labels = labels.join(","),
            annotations = if annotations.is_empty() { String::new() } else { format!(", annotated {}", annotations.join(",")) },
            record = paths.record().display(),
        )
    }

    /// The edge hub's files in full (the CA's key never), for `--dry-run`;
    /// empty without the hub.
    pub fn describe_hub_files(&self, paths: &JoinPaths) -> String {
        let (Some(hub), Trust::Kubernetes(cluster)) = (&self.hub, &self.trust) else {
            return String::new();
        };
        hub.files(&self.node, &cluster.server, &paths.tunnel_dir().join("ca.crt"))
            .iter()
            .map(|f| format!("--- {} ({:o})\n{}", f.path.display(), f.mode, f.contents.trim_end()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn describe_registry_join(&self, paths: &JoinPaths) -> String {
        let registry = match &self.trust {
            Trust::Registry(registry) => registry.as_str(),
            Trust::Kubernetes(cluster) => cluster.server.as_str(),
        };
        format!(
            "join node {node} to {registry} (token checked by the registry)\n\
             - a key and a certificate signing request for CN=system:node:{node}, O=system:nodes in {tunnel} \
             (the tunnel CA signs it: {sign})\n\
             - netd settings in {config}: iface {iface}, masquerade {masq}\n\
             - no node object: the node appears with its lease when netd runs\n\
             - record in {record}",
            node = self.node,
            tunnel = paths.tunnel_dir().display(),
            sign = sign_command(paths),
            config = paths.netd_config().display(),
            iface = self.spec.flannel_iface.as_deref().unwrap_or("(the default-route interface)"),
            masq = self.spec.enable_iptables,
            record = paths.record().display(),
        )
    }
}

/// The documented way a node certificate is made for a registry without a
/// signer: on a machine holding the tunnel CA (see `netd-cloud certs`).
pub fn sign_command(paths: &JoinPaths) -> String {
    format!(
        "netd-cloud certs node --ca-dir <tunnel CA dir> --csr {csr} --out <dir>, then put node.crt and ca.crt from <dir> into {tunnel}",
        csr = paths.tunnel_csr().display(),
        tunnel = paths.tunnel_dir().display()
    )
}

/// How a join ended.
#[derive(Debug)]
pub enum Outcome {
    /// Joined before with the same spec: nothing changed.
    AlreadyJoined {
        /// The node's name.
        node: String,
    },
    /// `--dry-run`: checked, nothing changed.
    DryRun(Plan),
    /// Joined.
    Joined {
        /// The plan carried out.
        plan: Plan,
        /// Whether the Node object was created or merged (`None`: the
        /// registry has no node objects; the node appears with its lease
        /// when netd runs).
        registered: Option<kube::Registered>,
        /// Files created.
        files: Vec<PathBuf>,
    },
}

/// Runs a join: checks (no contact), trust, then — if `confirm` agrees —
/// the changes, taken back if one fails.
pub async fn join(
    options: &JoinOptions,
    confirm: impl FnOnce(&Plan) -> Result<bool, JoinError>,
) -> Result<Outcome, JoinError> {
    let spec = NodeSpec::parse(&options.spec_text)?;
    let registry = options.registry.to_string();
    let previous = local::read_record(&options.paths)?;
    if let Some(record) = &previous {
        let same_spec = record.node_spec().as_ref() == Some(&spec);
        if same_spec && record.registry == registry {
            return Ok(Outcome::AlreadyJoined { node: record.node_name.clone() });
        }
        if !options.force {
            let what = if same_spec { format!("registry {}", record.registry) } else { "another node-spec".into() };
            return Err(JoinError::Changed { node: record.node_name.clone(), what });
        }
    }
    let node = node_name(&spec.node_name, &options.hostname, previous.as_ref().map(|r| r.node_name.as_str()))?;
    if let Some(iface) = &spec.flannel_iface {
        if !options.sys_class_net.join(iface).exists() {
            return Err(JoinError::NoInterface(iface.clone()));
        }
    }
    if spec.manage_runtime {
        let candidates: Vec<(String, PathBuf)> = match &options.cri_socket {
            Some(path) => vec![("the --cri-socket runtime".to_string(), path.clone())],
            None => RUNTIME_SOCKETS.iter().map(|(name, path)| (name.to_string(), PathBuf::from(path))).collect(),
        };
        let runtime = check_runtime(&candidates).await?;
        tracing::info!(%runtime, "manageRuntime: the container runtime answers");
    }
    let server = match &options.registry {
        RegistrySpec::Kubernetes(Some(server)) => server.clone(),
        RegistrySpec::Kubernetes(None) => {
            return Err(JoinError::Registry(
                "join needs the API server's URL: --registry kubernetes:https://HOST:PORT".into(),
            ))
        }
        RegistrySpec::Embedded(_) | RegistrySpec::Etcd(_) => {
            return join_registry(options, spec, node, registry, confirm).await
        }
    };
    if options.pins.is_empty() {
        return Err(DiscoveryError::NoPin.into());
    }
    let cluster = discovery::discover(&server, &options.token, &options.pins).await?;
    let plan = Plan { node, spec, trust: Trust::Kubernetes(cluster.clone()), hub: options.hub.clone() };
    if options.dry_run {
        return Ok(Outcome::DryRun(plan));
    }
    if !plan.spec.quiet && !confirm(&plan)? {
        return Err(JoinError::NotConfirmed("join cancelled: nothing was changed".into()));
    }
    let cert = kube::request_node_certificate(&cluster, &options.token, &plan.node, options.csr_timeout).await?;
    let mut written = local::Written::default();
    let tunnel = options.paths.tunnel_dir();
    written.write(&tunnel.join("ca.crt"), cluster.ca_pem.as_bytes(), 0o644)?;
    written.write(&tunnel.join("node.key"), cert.key_pem.as_bytes(), 0o600)?;
    written.write(&tunnel.join("node.crt"), cert.cert_pem.as_bytes(), 0o644)?;
    write_netd_config(&mut written, options, &plan, &registry)?;
    if let Some(hub) = &plan.hub {
        hub.write(&mut written, &plan.node, &cluster.server, &tunnel.join("ca.crt"))?;
    }
    let labels = plan.spec.node_labels();
    let annotations = plan.spec.node_annotations();
    let registered = kube::register_node(&cluster, &cert, &plan.node, &labels, &annotations).await?;
    if let Err(err) = write_record(&mut written, options, &plan, registry, Some(cluster.server.clone())) {
        if registered == kube::Registered::Created {
            if let Err(undo) = kube::unregister_node(&cluster, &cert, &plan.node).await {
                tracing::warn!("join: could not remove node {} after the failure: {undo}", plan.node);
            }
        }
        return Err(err);
    }
    Ok(Outcome::Joined { plan, registered: Some(registered), files: written.commit() })
}

/// A join through an embedded or etcd registry: the token is checked
/// against the tokens the registry holds; the node makes its key and a
/// certificate signing request for the tunnel CA to sign (no signer runs
/// in these registries); there is no node object to register.
async fn join_registry(
    options: &JoinOptions,
    spec: NodeSpec,
    node: String,
    registry: String,
    confirm: impl FnOnce(&Plan) -> Result<bool, JoinError>,
) -> Result<Outcome, JoinError> {
    if !options.pins.is_empty() {
        return Err(JoinError::Registry(format!(
            "--discovery-token-ca-cert-hash pins a Kubernetes API server's CA; the {registry} registry has none"
        )));
    }
    let mut node_metadata = Vec::new();
    for (field, given) in [
        ("labels", !spec.labels.is_empty()),
        ("annotations", !spec.annotations.is_empty()),
        ("gpuVersion", spec.gpu.is_some()),
        ("allowedClusterAddons", !spec.allowed_cluster_addons.is_empty()),
    ] {
        if given {
            node_metadata.push(field);
        }
    }
    if !node_metadata.is_empty() {
        return Err(JoinError::Registry(format!(
            "node-spec: {}: the {registry} registry keeps no node labels or annotations; join through \
             kubernetes:URL, or leave them out",
            node_metadata.join(", ")
        )));
    }
    let mut store = AnyTokenStore::open(&options.registry).await?;
    crate::registry::tokens::verify_token(&mut store, options.token.id(), options.token.secret(), SystemTime::now())
        .await??;
    // No kubelet is joined through these registries: no hub to wire.
    let plan = Plan { node, spec, trust: Trust::Registry(registry.clone()), hub: None };
    if options.dry_run {
        return Ok(Outcome::DryRun(plan));
    }
    if !plan.spec.quiet && !confirm(&plan)? {
        return Err(JoinError::NotConfirmed("join cancelled: nothing was changed".into()));
    }
    let request = certs::node_csr(&plan.node).map_err(JoinError::NodeKey)?;
    let mut written = local::Written::default();
    written.write(&options.paths.tunnel_dir().join("node.key"), request.key_pem.as_bytes(), 0o600)?;
    written.write(&options.paths.tunnel_csr(), request.csr_pem.as_bytes(), 0o644)?;
    write_netd_config(&mut written, options, &plan, &registry)?;
    write_record(&mut written, options, &plan, registry, None)?;
    Ok(Outcome::Joined { plan, registered: None, files: written.commit() })
}

/// `config.json`: what `netd run --config` reads.
fn write_netd_config(
    written: &mut local::Written,
    options: &JoinOptions,
    plan: &Plan,
    registry: &str,
) -> Result<(), JoinError> {
    let netd_config = serde_json::json!({
        "nodeName": plan.node,
        "registry": registry,
        "iface": plan.spec.flannel_iface,
        "masquerade": plan.spec.enable_iptables,
    });
    written.write(&options.paths.netd_config(), format!("{netd_config:#}\n").as_bytes(), 0o644)?;
    Ok(())
}

/// `join.json`, last: its presence means "joined".
fn write_record(
    written: &mut local::Written,
    options: &JoinOptions,
    plan: &Plan,
    registry: String,
    server: Option<String>,
) -> Result<(), JoinError> {
    let spec: serde_json::Value =
        serde_json::from_str(&options.spec_text).map_err(|e| SpecError::NotJson(e.to_string()))?;
    let record = JoinRecord { version: local::RECORD_VERSION, node_name: plan.node.clone(), registry, server, spec };
    let record_text = serde_json::to_vec_pretty(&record)
        .map_err(|source| LocalError::RecordJson { path: options.paths.record(), source })?;
    written.write(&options.paths.record(), &record_text, 0o644)?;
    Ok(())
}

/// Characters of a drawn node name (`nodeNameOverride: "*"`): lowercase
/// letters and digits, valid anywhere in a node name.
const NAME_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Why no node name could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    /// The host name is no valid node name.
    #[error("the host name {0:?} is not a valid node name (lowercase, digits, '-' and '.'): set nodeNameOverride")]
    BadHostname(String),
    /// The system's random source failed.
    #[error("drawing a random node name failed (no system randomness)")]
    Random,
}

/// The node name `rule` gives on this machine. A drawn name is drawn once:
/// `previous` (what an earlier join chose under the same rule) is kept, so a
/// re-run names the node the same.
pub fn node_name(rule: &NodeNameRule, hostname: &str, previous: Option<&str>) -> Result<String, NameError> {
    match rule {
        NodeNameRule::Exact(name) => Ok(name.clone()),
        NodeNameRule::Hostname => {
            let name = hostname.trim().to_ascii_lowercase();
            if spec::is_dns_subdomain(&name) {
                Ok(name)
            } else {
                Err(NameError::BadHostname(hostname.to_string()))
            }
        }
        NodeNameRule::Random { suffix } => {
            let drawn_before = |p: &&str| {
                p.strip_suffix(suffix.as_str())
                    .is_some_and(|head| head.len() == 6 && head.bytes().all(|b| NAME_ALPHABET.contains(&b)))
            };
            if let Some(previous) = previous.filter(drawn_before) {
                return Ok(previous.to_string());
            }
            let mut bytes = [0u8; 6];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .map_err(|_| NameError::Random)?;
            // 36 does not divide 256: the first 4 letters are a hair likelier, which a name can afford.
            let drawn: String = bytes.iter().map(|b| char::from(NAME_ALPHABET[usize::from(*b) % 36])).collect();
            Ok(format!("{drawn}{suffix}"))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_from_the_host_a_draw_or_the_spec_and_a_rerun_keeps_a_drawn_one() {
        assert_eq!(node_name(&NodeNameRule::Hostname, "Shop-17\n", None).unwrap(), "shop-17");
        assert!(node_name(&NodeNameRule::Hostname, "shop_17", None).is_err());
        assert_eq!(node_name(&NodeNameRule::Exact("edge-a".into()), "h", None).unwrap(), "edge-a");
        let rule = NodeNameRule::Random { suffix: ".edge".into() };
        let first = node_name(&rule, "h", None).unwrap();
        assert_eq!(first.len(), 11);
        assert!(first.ends_with(".edge") && spec::is_dns_subdomain(&first), "{first}");
        assert_eq!(node_name(&rule, "h", Some(&first)).unwrap(), first, "a re-run keeps it");
        let draws: std::collections::HashSet<String> = (0..20).map(|_| node_name(&rule, "h", None).unwrap()).collect();
        assert!(draws.len() > 15, "{draws:?}");
        // A name from another rule is not kept.
        assert_ne!(node_name(&NodeNameRule::Random { suffix: String::new() }, "h", Some("edge-a")).unwrap(), "edge-a");
    }
}
