//! `netd-join`: turning a machine into a netd edge node (SPEC §4).
//!
//! Trust before change: [`spec`] validates the node-spec and [`token`] the
//! bootstrap token before anything is contacted; [`discovery`] then
//! establishes the cluster's CA from the token and the operator's pin, as
//! kubeadm does, before anything on the node changes.

pub mod discovery;
pub mod kube;
pub mod local;
pub mod spec;
pub mod token;

use std::path::PathBuf;
use std::time::Duration;

pub use discovery::{CaPin, ClusterInfo, DiscoveryError};
pub use local::{JoinPaths, JoinRecord, LocalError};
pub use spec::{NodeNameRule, NodeSpec, SpecError};
pub use token::{BootstrapToken, TokenError};

use crate::registry::RegistrySpec;

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
    /// `manageRuntime` found no container runtime.
    #[error("node-spec: manageRuntime: no container runtime socket found (looked for {0}); install and start one")]
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
    /// Trust could not be established.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// Asked, the operator said no (or could not be asked).
    #[error("{0}")]
    NotConfirmed(String),
    /// The Kubernetes steps.
    #[error(transparent)]
    Kube(#[from] kube::KubeJoinError),
    /// The node's files.
    #[error(transparent)]
    Local(#[from] LocalError),
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
}

/// What join found it must do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The node's name.
    pub node: String,
    /// The validated spec.
    pub spec: NodeSpec,
    /// The trusted cluster (a Kubernetes join).
    pub cluster: ClusterInfo,
}

impl Plan {
    /// For people: what join will change.
    pub fn describe(&self, paths: &JoinPaths) -> String {
        let labels: Vec<String> = self.spec.node_labels().iter().map(|(k, v)| format!("{k}={v}")).collect();
        let annotations: Vec<String> = self.spec.node_annotations().keys().cloned().collect();
        format!(
            "join node {node} to {server} (CA pinned)\n\
             - certificate request for CN=system:node:{node}, O=system:nodes ({signer}); key and certificate in {tunnel}\n\
             - netd settings in {config}: iface {iface}, masquerade {masq}\n\
             - Node {node} labelled {labels}{annotations}\n\
             - record in {record}",
            node = self.node,
            server = self.cluster.server,
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
        /// Whether the Node object was created or merged.
        registered: kube::Registered,
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
    if spec.manage_runtime && !RUNTIME_SOCKETS.iter().any(|(_, path)| std::path::Path::new(path).exists()) {
        let looked: Vec<String> = RUNTIME_SOCKETS.iter().map(|(name, path)| format!("{name} at {path}")).collect();
        return Err(JoinError::NoRuntime(looked.join(", ")));
    }
    let server = match &options.registry {
        RegistrySpec::Kubernetes(Some(server)) => server.clone(),
        RegistrySpec::Kubernetes(None) => {
            return Err(JoinError::Registry(
                "join needs the API server's URL: --registry kubernetes:https://HOST:PORT".into(),
            ))
        }
        other => {
            return Err(JoinError::Registry(format!(
                "joining through the {other} registry is not built yet: only kubernetes:URL joins; for the \
                 embedded and etcd registries write netd's settings with `netd run --print-config`"
            )))
        }
    };
    if options.pins.is_empty() {
        return Err(DiscoveryError::NoPin.into());
    }
    let cluster = discovery::discover(&server, &options.token, &options.pins).await?;
    let plan = Plan { node, spec, cluster };
    if options.dry_run {
        return Ok(Outcome::DryRun(plan));
    }
    if !plan.spec.quiet && !confirm(&plan)? {
        return Err(JoinError::NotConfirmed("join cancelled: nothing was changed".into()));
    }
    let cert = kube::request_node_certificate(&plan.cluster, &options.token, &plan.node, options.csr_timeout).await?;
    let mut written = local::Written::default();
    let tunnel = options.paths.tunnel_dir();
    written.write(&tunnel.join("ca.crt"), plan.cluster.ca_pem.as_bytes(), 0o644)?;
    written.write(&tunnel.join("node.key"), cert.key_pem.as_bytes(), 0o600)?;
    written.write(&tunnel.join("node.crt"), cert.cert_pem.as_bytes(), 0o644)?;
    let netd_config = serde_json::json!({
        "nodeName": plan.node,
        "registry": registry,
        "iface": plan.spec.flannel_iface,
        "masquerade": plan.spec.enable_iptables,
    });
    written.write(&options.paths.netd_config(), format!("{netd_config:#}\n").as_bytes(), 0o644)?;
    let labels = plan.spec.node_labels();
    let annotations = plan.spec.node_annotations();
    let registered = kube::register_node(&plan.cluster, &cert, &plan.node, &labels, &annotations).await?;
    let spec_value: serde_json::Value =
        serde_json::from_str(&options.spec_text).map_err(|e| SpecError::NotJson(e.to_string()))?;
    let record = JoinRecord {
        version: local::RECORD_VERSION,
        node_name: plan.node.clone(),
        registry,
        server: Some(plan.cluster.server.clone()),
        spec: spec_value,
    };
    let record_text = serde_json::to_vec_pretty(&record)
        .map_err(|e| LocalError::BadRecord { path: options.paths.record(), reason: e.to_string() })?;
    if let Err(err) = written.write(&options.paths.record(), &record_text, 0o644) {
        if registered == kube::Registered::Created {
            if let Err(undo) = kube::unregister_node(&plan.cluster, &cert, &plan.node).await {
                tracing::warn!("join: could not remove node {} after the failure: {undo}", plan.node);
            }
        }
        return Err(err.into());
    }
    Ok(Outcome::Joined { plan, registered, files: written.commit() })
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
