//! Where nodes publish their subnet leases and learn their peers: one
//! [`Registry`] trait, one file per backend.
//!
//! - [`embedded`]: a SQLite file shared by the netd processes of one host
//!   (single-host installs, the demo's multi-node cluster); no server.
//! - [`etcd`] (feature `etcd`, on by default): flannel's v3 layout
//!   (`/coreos.com/network/…`) exactly.
//! - `kubernetes`: node objects with flannel's annotations.
//!
//! The wire formats flannel peers parse live in [`netd_model::flannel`].
//!
//! Contract every backend keeps:
//! - the first [`Registry::next_event`] and the first after any error yield
//!   [`PeerEvent::Resync`] with the full peer set (so the daemon does a full
//!   resync on every reconnect);
//! - bad data (garbage JSON, wrong types, a subnet outside the network) is
//!   skipped with a logged reason and never ends the watch;
//! - our own lease never appears among the peers.

mod any;
pub mod embedded;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod kubernetes;
pub mod replicas;
pub mod tokens;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use netd_model::autonomy::Autonomy;
use netd_model::{Lease, MacAddr, ModelError};

pub use any::{kube_config, AnyRegistry, OpenSettings, RegistrySpec};
pub use netd_model::NetworkConfig;
pub use replicas::{ReplicaRecord, ReplicaStore, REPLICA_TTL};
pub use tokens::{AnyTokenStore, TokenRecord, TokenRefused, TokenStore};

/// Lease lifetime, as flannel uses: 24 h, renewed ahead of expiry.
pub const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Renew when less than this is left.
pub const RENEW_MARGIN: std::time::Duration = std::time::Duration::from_secs(3600);

/// What a node asks for when it acquires its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    /// Node name.
    pub node: String,
    /// The node's public IP.
    pub public_ip: Ipv4Addr,
    /// The node's pinned VTEP MAC.
    pub vtep_mac: MacAddr,
    /// The subnet the node had before (subnet.env or snapshot), to keep.
    pub previous_subnet: Option<Ipv4Net>,
}

impl LeaseRequest {
    /// The lease this request describes once `subnet` is granted.
    pub fn lease_for(&self, subnet: Ipv4Net) -> Lease {
        Lease {
            subnet,
            public_ip: self.public_ip,
            vtep_mac: self.vtep_mac,
            node: Some(self.node.clone()).filter(|n| !n.is_empty()),
        }
    }
}

/// Our lease as granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnLease {
    /// Subnet, public IP, VTEP MAC, node name.
    pub lease: Lease,
    /// When it lapses unless renewed (`None`: it does not expire).
    pub expires_at: Option<SystemTime>,
}

/// A peer's lease as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLease {
    /// Subnet, public IP, VTEP MAC and node name.
    pub lease: Lease,
    /// The peer is autonomous: keep its entries even when its lease lapses.
    pub autonomous: bool,
    /// The peer is a cloud node by a label kubelets cannot set
    /// ([`netd_model::roles`]; only the Kubernetes registry knows roles).
    /// The tunnel server never routes its address or subnet to an agent.
    pub cloud: bool,
}

/// One field a registry wrote when setting a node's autonomy: an
/// annotation, an etcd key or a database column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutonomyChange {
    /// What was written, e.g. `node.openyurt.io/autonomy-duration`.
    pub field: String,
    /// The new value; `None`: removed.
    pub value: Option<String>,
}

/// A node's lease as a registry holds it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLeaseState {
    /// The node's subnet.
    pub subnet: Ipv4Net,
    /// The public IP it publishes, when readable.
    pub public_ip: Option<Ipv4Addr>,
    /// When it lapses unless renewed (`None`: it does not expire, as a
    /// Kubernetes pod CIDR).
    pub expires_at: Option<SystemTime>,
    /// The registry keeps this subnet for the node while it is autonomous,
    /// lapsed or not, so no other node is given it.
    pub kept_while_autonomous: bool,
}

/// A node condition as the API server reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCondition {
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// The reason given, if any.
    pub reason: Option<String>,
    /// `lastTransitionTime`.
    pub since: Option<SystemTime>,
    /// `lastHeartbeatTime`.
    pub heartbeat: Option<SystemTime>,
}

/// The node's `kube-node-lease` Lease, which the kubelet renews.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeHeartbeat {
    /// Last renewed at `renewed` (`None`: no `spec.renewTime`).
    Renewed {
        /// `spec.renewTime`.
        renewed: Option<SystemTime>,
        /// `spec.leaseDurationSeconds`.
        duration: Option<Duration>,
    },
    /// There is no such Lease (no kubelet ever ran there).
    Missing,
    /// It could not be read (permission, a broken object); why.
    Unreadable(String),
}

/// What the Kubernetes API knows of a node's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeNodeState {
    /// The `Ready` condition, if reported.
    pub ready: Option<NodeCondition>,
    /// The kubelet's heartbeat.
    pub heartbeat: NodeHeartbeat,
}

/// A node's autonomy as a registry holds it, and what the registry knows
/// of the node now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAutonomy {
    /// The node.
    pub node: String,
    /// The effect.
    pub autonomy: Autonomy,
    /// Where it came from: the annotations (Kubernetes), the etcd keys or
    /// the database row that switched it on or bound it; empty when off.
    pub sources: Vec<String>,
    /// A stored value that is unusable, and how it was taken.
    pub problem: Option<String>,
    /// The node's lease, if it holds one.
    pub lease: Option<NodeLeaseState>,
    /// Health as the API server reports it (Kubernetes only).
    pub kubernetes: Option<KubeNodeState>,
}

/// A change to the peer set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// The whole peer set: replaces what the daemon knew.
    Resync(Vec<PeerLease>),
    /// A peer appeared or changed.
    Upsert(PeerLease),
    /// The lease for this subnet is gone (deleted or expired).
    Remove(Ipv4Net),
}

/// Errors of the registries.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry cannot be reached now; retry with backoff.
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    /// The network configuration is missing or invalid.
    #[error("invalid network configuration: {0}")]
    BadConfig(String),
    /// Every subnet of the network is leased.
    #[error("no free subnet of /{subnet_len} left in {network}")]
    NoFreeSubnet {
        /// The cluster network.
        network: Ipv4Net,
        /// The subnet size.
        subnet_len: u8,
    },
    /// The registry refused a write (conflict, permission) after retries.
    #[error("registry refused {what}: {reason}")]
    Refused {
        /// What was attempted.
        what: String,
        /// Why.
        reason: String,
    },
    /// The registry knows no such node.
    #[error("unknown node {node:?} in {registry}: {reason}")]
    UnknownNode {
        /// The node asked for.
        node: String,
        /// The registry, as [`Registry::describe`] gives it.
        registry: String,
        /// What was looked for, and what is there instead.
        reason: String,
    },
    /// Local storage of the embedded registry is unusable (a format
    /// version this netd does not read).
    #[error("embedded registry {path}: {reason}")]
    Store {
        /// The database file.
        path: std::path::PathBuf,
        /// What failed.
        reason: String,
    },
    /// SQLite failed on the embedded registry's file.
    #[error("embedded registry {path}: {source}")]
    Sqlite {
        /// The database file.
        path: std::path::PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The embedded registry's directory could not be created.
    #[error("embedded registry {path}: creating {dir}: {source}")]
    StoreDir {
        /// The database file.
        path: std::path::PathBuf,
        /// The directory.
        dir: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The blocking task doing the embedded registry's database work did
    /// not finish (it panicked or the runtime is shutting down).
    #[error("embedded registry {path}: the database task did not finish: {source}")]
    StoreTask {
        /// The database file.
        path: std::path::PathBuf,
        /// Why it ended.
        #[source]
        source: tokio::task::JoinError,
    },
    /// A stored bootstrap token record is not one this netd reads.
    #[error("registry refused reading a bootstrap token: {0}")]
    BadTokenRecord(#[source] tokens::TokenRefused),
    /// The CA file given for the API server cannot be read.
    #[error("invalid network configuration: reading the CA file {path}: {source}")]
    CaFile {
        /// The CA file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl From<ModelError> for RegistryError {
    fn from(error: ModelError) -> Self {
        match error {
            ModelError::BadNetworkConfig(reason) => Self::BadConfig(reason),
        }
    }
}

/// What opening an etcd registry says in a build without the `etcd`
/// feature: the spec parses (it is still a valid `--registry`), the backend
/// is not there.
#[cfg(not(feature = "etcd"))]
fn without_etcd() -> RegistryError {
    RegistryError::BadConfig("this build has no etcd registry (netd-registry's `etcd` feature is off)".into())
}

impl RegistryError {
    /// True when retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unreachable(_)
                | Self::Store { .. }
                | Self::Sqlite { .. }
                | Self::StoreDir { .. }
                | Self::StoreTask { .. }
        )
    }
}

/// A registry backend. Methods are async so network backends can wait on
/// I/O; the daemon drives one backend from a single task.
pub trait Registry: Send {
    /// For logs: kind and address.
    fn describe(&self) -> String;

    /// The cluster network settings.
    fn network_config(&mut self) -> impl Future<Output = Result<NetworkConfig, RegistryError>> + Send;

    /// Acquires this node's lease: the one already held for this node or
    /// public IP, else `previous_subnet` if free, else a free subnet.
    /// Publishes public IP and `{"VNI":…,"VtepMAC":…}`.
    fn acquire_lease(
        &mut self,
        config: &NetworkConfig,
        request: &LeaseRequest,
    ) -> impl Future<Output = Result<OwnLease, RegistryError>> + Send;

    /// Extends the lease (and re-publishes its attributes).
    fn renew_lease(&mut self, lease: &OwnLease) -> impl Future<Output = Result<OwnLease, RegistryError>> + Send;

    /// Waits for the next change to the peer set (see the module contract).
    fn next_event(&mut self, own_subnet: Ipv4Net) -> impl Future<Output = Result<PeerEvent, RegistryError>> + Send;

    /// Sets a node's autonomy ([`Autonomy::Off`] turns it off whatever
    /// switched it on) and returns what was written. A node the registry
    /// does not know is [`RegistryError::UnknownNode`].
    fn set_autonomy(
        &mut self,
        node: &str,
        autonomy: Autonomy,
    ) -> impl Future<Output = Result<Vec<AutonomyChange>, RegistryError>> + Send;

    /// Reads a node's autonomy, where it came from, and the node's lease
    /// (and, on Kubernetes, its health). A node the registry does not know
    /// is [`RegistryError::UnknownNode`].
    fn node_autonomy(&mut self, node: &str) -> impl Future<Output = Result<NodeAutonomy, RegistryError>> + Send;
}

/// The subnet to lease: `preferred` if it is a valid free subnet, else the
/// first free one. Like flannel, the network's first subnet is never
/// handed out (it holds the network address).
pub fn pick_subnet(
    config: &NetworkConfig,
    taken: &BTreeSet<Ipv4Net>,
    preferred: Option<Ipv4Net>,
) -> Result<Ipv4Net, RegistryError> {
    let first = config.network.network();
    let valid = |s: &Ipv4Net| {
        s.prefix_len() == config.subnet_len && config.network.contains(s) && s.network() != first && !overlaps(taken, s)
    };
    if let Some(p) = preferred.map(|p| p.trunc()).filter(valid) {
        return Ok(p);
    }
    let no_free = || RegistryError::NoFreeSubnet { network: config.network, subnet_len: config.subnet_len };
    config.network.subnets(config.subnet_len).map_err(|_| no_free())?.find(valid).ok_or_else(no_free)
}

/// How many node names an unknown-node error lists.
pub(crate) const NAMES_SHOWN: usize = 10;

/// `what` and the names that are there instead (at most [`NAMES_SHOWN`]).
pub(crate) fn known_names(what: &str, names: &[String]) -> String {
    match names {
        [] => format!("{what} (no node is registered)"),
        names if names.len() > NAMES_SHOWN => format!("{what} (nodes: {}, …)", names[..NAMES_SHOWN].join(", ")),
        names => format!("{what} (nodes: {})", names.join(", ")),
    }
}

fn overlaps(taken: &BTreeSet<Ipv4Net>, s: &Ipv4Net) -> bool {
    taken.iter().any(|t| netd_model::overlaps(*t, *s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_preferred_then_first_free_never_the_network_subnet() {
        let config = NetworkConfig { network: "10.244.0.0/22".parse().unwrap(), subnet_len: 24, vni: 1 };
        let mut taken = BTreeSet::new();
        assert_eq!(pick_subnet(&config, &taken, None).unwrap().to_string(), "10.244.1.0/24");
        let pref = "10.244.3.7/24".parse().ok();
        assert_eq!(pick_subnet(&config, &taken, pref).unwrap().to_string(), "10.244.3.0/24");
        taken.insert("10.244.1.0/24".parse().unwrap());
        taken.insert("10.244.3.0/24".parse().unwrap());
        assert_eq!(pick_subnet(&config, &taken, pref).unwrap().to_string(), "10.244.2.0/24");
        taken.insert("10.244.2.0/24".parse().unwrap());
        let err = pick_subnet(&config, &taken, None).unwrap_err().to_string();
        assert!(err.contains("no free subnet of /24 left in 10.244.0.0/22"), "{err}");
        let bad = NetworkConfig { subnet_len: 20, ..config };
        assert!(bad.check().is_err());
    }
}
