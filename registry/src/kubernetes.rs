//! The Kubernetes registry: node objects carry the leases, exactly as
//! flannel's kube subnet manager (`--kube-subnet-mgr`) keeps them, so netd
//! and flannel nodes can share one cluster.
//!
//! The mapping:
//! - **network config**: [`KubeConfig::network`] (flannel reads it from the
//!   `net-conf.json` of its ConfigMap); when unset, flannel's mounted file
//!   [`NET_CONF_PATH`] is read. SubnetLen and VNI take flannel's defaults
//!   (24 and 1) unless that file says otherwise.
//! - **own lease**: this node's `spec.podCIDRs` (first IPv4 entry) or
//!   `spec.podCIDR`, assigned by the controller-manager; netd never invents
//!   one. Acquiring publishes the lease by patching the node's annotations
//!   (JSON merge patch, on the `status` subresource as flannel does) with `flannel.alpha.coreos.com/backend-type: vxlan`,
//!   `…/backend-data: {"VNI":1,"VtepMAC":"…"}` (byte-exact, see
//!   [`flannel::backend_data`]), `…/public-ip` and
//!   `…/kube-subnet-manager: "true"`, and sets the node condition
//!   `NetworkUnavailable=False` (reason `NetdIsUp`) through the `status`
//!   subresource (strategic merge patch, so other conditions stay). Nothing
//!   is written when the node already says all of that, so renewing is
//!   idempotent. The lease does not expire; it is reported with a 24 h
//!   lifetime so the daemon re-publishes once a day.
//! - **peers**: every other node with `kube-subnet-manager: "true"` (nodes
//!   without it are not flannel nodes and are ignored, as flannel does), a
//!   pod CIDR inside the network and valid `backend-type`, `backend-data`
//!   and `public-ip` annotations. A node failing any check is skipped with a
//!   logged reason. `node.beta.alibabacloud.com/autonomy=true`,
//!   `node.beta.openyurt.io/autonomy=true` or
//!   `node.openyurt.io/autonomy-duration` marks a peer autonomous.
//! - **events**: a paginated list of the nodes gives the
//!   [`PeerEvent::Resync`]; a watch from the list's `resourceVersion` then
//!   gives [`PeerEvent::Upsert`] / [`PeerEvent::Remove`] (a deleted node,
//!   or one that stops being a valid peer, removes its subnet). The list
//!   and watch are [`netd_kube::watch::ListWatch`], shared with the pod
//!   watch: the watch is renewed from the last seen `resourceVersion` when
//!   the server ends it normally (`timeoutSeconds`); an expired version
//!   (`410 Gone`), a broken or silent connection end the call with an
//!   error, and the next call lists again.
//! - **client**: the shared [`KubeClient`] (kube-rs on hyper + rustls),
//!   with its bearer token re-read every minute and right after a 401.
//! - **autonomy**: [`Registry::set_autonomy`] patches the node's
//!   annotations (a JSON merge patch with the node's `resourceVersion`, read
//!   again and retried on a conflict): on is
//!   `node.beta.alibabacloud.com/autonomy=true`, bounded or not by
//!   `node.openyurt.io/autonomy-duration` (a bound is written as a Go
//!   duration; no bound removes it); off writes `false` to both flags (the
//!   OpenYurt one only when present) and removes the duration, whose
//!   presence alone would switch autonomy on. [`Registry::node_autonomy`]
//!   reads the three annotations ([`autonomy::AutonomyStatus`]), the pod
//!   CIDR, the `Ready` condition and the kubelet's heartbeat Lease
//!   `kube-node-lease/<node>`.
//!
//! RBAC needed (the same as flannel's ClusterRole): `nodes`: get, list,
//! watch; `nodes/status`: patch (the annotations and the condition both
//! go through the status subresource). All of it is what the Node
//! authorizer grants `system:node:<name>`, and NodeRestriction confines the
//! patch to the node's own Node: the deployed DaemonSet authenticates with
//! the kubelet's client certificate ([`KubeConfig::client_cert`]) and needs
//! no RBAC binding at all; [`KubernetesRegistry::new`] refuses a node
//! certificate of another node than [`KubeConfig::node_name`]. [`Registry::set_autonomy`], which
//! the daemon never calls, patches the node itself: `nodes`: patch;
//! [`Registry::node_autonomy`] reads `leases` in `kube-node-lease` (get),
//! and reports the heartbeat as unreadable without it.
//!
//! Tunnel server replicas ([`crate::ReplicaStore`]) are Leases
//! `kube-system/netd-tunnel-replica-<id>`; see [`replicas`] for the mapping
//! and the RBAC it needs.

pub mod replicas;

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use ipnet::{IpNet, Ipv4Net};
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::{json, Value};

use super::{
    AutonomyChange, KubeNodeState, LeaseRequest, NetworkConfig, NodeAutonomy, NodeCondition, NodeHeartbeat,
    NodeLeaseState, OwnLease, PeerEvent, PeerLease, Registry, RegistryError, LEASE_TTL,
};
use netd_kube::object::{Kind, NodeHeartbeatLease, NodeLease, NodeWithConditions, Object};
use netd_kube::watch::{ListWatch, WatchEvent};
use netd_kube::{call, check_node_name, KubeClient, KubeError, REQUEST_TIMEOUT};
use netd_model::autonomy::{self, Autonomy};
use netd_model::{flannel, rfc3339, roles};
use netd_model::{Lease, MacAddr};

pub use netd_kube::watch::DEFAULT_WATCH_TIMEOUT;
pub use netd_kube::{KubeConfig, SERVICE_ACCOUNT_DIR, TOKEN_RELOAD};

/// Where flannel's DaemonSet mounts `net-conf.json` from its ConfigMap.
pub const NET_CONF_PATH: &str = "/etc/kube-flannel/net-conf.json";
/// Where kubelets keep their heartbeat Leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// Conflicting writers an autonomy change outlasts before giving up.
const CONFLICT_ATTEMPTS: usize = 5;
/// The node condition netd sets to `False` once it runs.
pub const CONDITION_NETWORK_UNAVAILABLE: &str = "NetworkUnavailable";
/// The reason netd gives on that condition.
pub const CONDITION_REASON: &str = "NetdIsUp";

/// A registry on the Kubernetes API (node objects with flannel's
/// annotations); see the module docs for the mapping.
pub struct KubernetesRegistry {
    config: KubeConfig,
    client: KubeClient,
    watch_timeout: Duration,
    /// The network in use: the one the lease was acquired for, else resolved.
    network: Option<NetworkConfig>,
    /// The node whose lease we hold (never a peer).
    own_node: String,
    /// The own subnet the peer set was computed for.
    own_subnet: Option<Ipv4Net>,
    /// Peers by node name as last reported; `None` until a resync was delivered.
    known: Option<BTreeMap<String, PeerLease>>,
    /// Why a node is skipped, as last logged (to log each reason once).
    skipped: BTreeMap<String, String>,
    pending: VecDeque<PeerEvent>,
    /// The node list+watch; made on first use (the client needs the
    /// async runtime).
    watch: Option<ListWatch<Object<NodeLease>>>,
}

impl std::fmt::Debug for KubernetesRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesRegistry")
            .field("config", &self.config)
            .field("own_node", &self.own_node)
            .field("watch", &self.watch)
            .finish_non_exhaustive()
    }
}

/// What a node object is to us.
#[derive(Debug, PartialEq, Eq)]
enum NodeView {
    /// A valid peer.
    Peer(PeerLease),
    /// Our own node.
    Own,
    /// Not a flannel node (no `kube-subnet-manager: "true"`).
    NotFlannel,
    /// Claims to be a flannel node but fails a check.
    Bad(String),
}

impl From<KubeError> for RegistryError {
    fn from(error: KubeError) -> Self {
        match error {
            KubeError::BadConfig(reason) => Self::BadConfig(reason),
            KubeError::Unreachable(reason) => Self::Unreachable(reason),
            KubeError::Refused { what, reason } => Self::Refused { what, reason },
            KubeError::NotFound { what } => Self::Refused { what, reason: "there is no such object".into() },
            KubeError::Conflict { what, message } => {
                Self::Refused { what, reason: format!("HTTP 409 Conflict: {message}") }
            }
        }
    }
}

impl KubernetesRegistry {
    /// A registry talking to `config.server`; nothing is contacted until
    /// used.
    pub fn new(config: KubeConfig) -> Result<Self, RegistryError> {
        check_node_name(&config.node_name)?;
        let client = KubeClient::new(&config)?;
        // A node certificate of another node would be refused every write
        // to this Node (NodeRestriction): say so at start, not as 403s.
        if let Some(identity) = client.certificate_identity() {
            if identity.strip_prefix("system:node:").is_some_and(|node| node != config.node_name) {
                return Err(RegistryError::BadConfig(format!(
                    "the client certificate is {identity:?}, but this node is {:?}: the API server lets a node \
                     change only its own Node",
                    config.node_name
                )));
            }
        }
        Ok(Self::with_client(config, client))
    }

    /// A registry on a client shared with other users (the pod watch);
    /// `config` gives the node name and the network.
    pub fn with_client(config: KubeConfig, client: KubeClient) -> Self {
        Self {
            own_node: config.node_name.clone(),
            config,
            client,
            watch_timeout: DEFAULT_WATCH_TIMEOUT,
            network: None,
            own_subnet: None,
            known: None,
            skipped: BTreeMap::new(),
            pending: VecDeque::new(),
            watch: None,
        }
    }

    /// The client this registry uses, to share with the pod watch.
    pub fn client(&self) -> &KubeClient {
        &self.client
    }

    /// Sets the `timeoutSeconds` of node watches (at least one second;
    /// default [`DEFAULT_WATCH_TIMEOUT`]). A watch silent for longer than
    /// this plus 5 s counts as a dead connection.
    pub fn with_watch_timeout(mut self, timeout: Duration) -> Self {
        self.watch_timeout = timeout.max(Duration::from_secs(1));
        if let Some(watch) = &mut self.watch {
            watch.set_timeout(self.watch_timeout);
        }
        self
    }

    /// The network settings: [`KubeConfig::network`] with flannel's
    /// defaults, else [`NET_CONF_PATH`].
    fn resolve_network(&self) -> Result<NetworkConfig, RegistryError> {
        if let Some(net) = self.config.network {
            let text = format!(r#"{{"Network":"{net}","Backend":{{"Type":"vxlan"}}}}"#);
            return Ok(flannel::parse_network_config(text.as_bytes())?);
        }
        let text = std::fs::read(NET_CONF_PATH).map_err(|e| {
            RegistryError::BadConfig(format!(
                "no cluster network: set it (flannel's `Network`) or provide flannel's {NET_CONF_PATH} ({e})"
            ))
        })?;
        flannel::parse_network_config(&text).map_err(|e| RegistryError::BadConfig(format!("{NET_CONF_PATH}: {e}")))
    }

    fn network(&mut self) -> Result<NetworkConfig, RegistryError> {
        match self.network {
            Some(network) => Ok(network),
            None => {
                let network = self.resolve_network()?;
                self.network = Some(network);
                Ok(network)
            }
        }
    }

    fn nodes<K: Kind>(&self) -> Api<Object<K>> {
        Api::all(self.client.client())
    }

    async fn get_node(&self, name: &str) -> Result<Object<NodeWithConditions>, RegistryError> {
        let what = format!("reading node {name}");
        match call(&what, self.nodes::<NodeWithConditions>().get(name)).await {
            Ok(node) => Ok(node),
            Err(KubeError::NotFound { what }) => Err(RegistryError::Refused {
                what,
                reason: "there is no such Node object (has its kubelet registered it?)".into(),
            }),
            Err(error) => Err(error.into()),
        }
    }

    /// Publishes our lease on `node` (annotations, then the condition),
    /// writing only what differs. Returns the node's pod CIDR.
    async fn publish(
        &mut self,
        node: &str,
        public_ip: Ipv4Addr,
        vtep_mac: MacAddr,
        config: &NetworkConfig,
    ) -> Result<Ipv4Net, RegistryError> {
        check_node_name(node)?;
        let object = self.get_node(node).await?;
        let what = format!("lease for node {node}");
        let subnet = match pod_cidr(&object) {
            Ok(Some(subnet)) => subnet,
            Ok(None) => {
                return Err(RegistryError::Refused {
                    what,
                    reason: "spec.podCIDR(s) not assigned yet: the controller-manager assigns them \
                             (--allocate-node-cidrs); netd never invents one"
                        .into(),
                })
            }
            Err(reason) => return Err(RegistryError::Refused { what, reason }),
        };
        if !config.network.contains(&subnet) {
            return Err(RegistryError::BadConfig(format!(
                "node {node}'s pod CIDR {subnet} lies outside the cluster network {}",
                config.network
            )));
        }
        if subnet.prefix_len() != config.subnet_len {
            tracing::warn!(%node, %subnet, subnet_len = config.subnet_len, "pod CIDR size differs from SubnetLen; using the pod CIDR");
        }

        let wanted = [
            (flannel::ANNOTATION_BACKEND_TYPE, "vxlan".to_string()),
            (flannel::ANNOTATION_BACKEND_DATA, flannel::backend_data(config.vni, vtep_mac)),
            (flannel::ANNOTATION_PUBLIC_IP, public_ip.to_string()),
            (flannel::ANNOTATION_KUBE_SUBNET_MANAGER, "true".to_string()),
        ];
        let stale: serde_json::Map<String, Value> = wanted
            .iter()
            .filter(|(key, value)| object.annotation(key).and_then(Value::as_str) != Some(value))
            .map(|(key, value)| (key.to_string(), Value::String(value.clone())))
            .collect();
        if !stale.is_empty() {
            // A JSON merge patch of string values: the API server stores
            // each annotation exactly as given (flannel's byte-exact
            // backend-data included). Sent to the `status` subresource,
            // as flannel does: the node status strategy keeps metadata
            // changes and drops spec changes, so RBAC can grant
            // `nodes/status: patch` and never `nodes: patch` (which would
            // let netd change taints, unschedulable, podCIDR…).
            let patch = json!({ "metadata": { "annotations": stale } });
            let api = self.nodes::<NodeLease>();
            call(
                &format!("PATCH /api/v1/nodes/{node}/status"),
                api.patch_status(node, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await?;
            tracing::info!(%node, %subnet, "published lease annotations");
        }

        let condition_ok = object
            .get("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|list| {
                list.iter().find(|c| c.get("type").and_then(Value::as_str) == Some(CONDITION_NETWORK_UNAVAILABLE))
            })
            .is_some_and(|c| c.get("status").and_then(Value::as_str) == Some("False"));
        if !condition_ok {
            let now = rfc3339::format(SystemTime::now());
            // Strategic merge on the status subresource: conditions merge
            // by type, so the kubelet's own conditions stay.
            let patch = json!({ "status": { "conditions": [{
                "type": CONDITION_NETWORK_UNAVAILABLE,
                "status": "False",
                "reason": CONDITION_REASON,
                "message": "netd is running on this node",
                "lastTransitionTime": now,
                "lastHeartbeatTime": now,
            }]}});
            let api = self.nodes::<NodeLease>();
            call(
                &format!("PATCH /api/v1/nodes/{node}/status"),
                api.patch_status(node, &PatchParams::default(), &Patch::Strategic(&patch)),
            )
            .await?;
            tracing::info!(%node, "set node condition NetworkUnavailable=False");
        }
        Ok(subnet)
    }

    /// What `node` is to us, for the network and own subnet given.
    fn view<K: Kind>(&self, node: &Object<K>, network: &NetworkConfig, own_subnet: Ipv4Net) -> NodeView {
        let Some(name) = node.get("/metadata/name").and_then(Value::as_str) else {
            return NodeView::Bad("no metadata.name".into());
        };
        if name == self.own_node {
            return NodeView::Own;
        }
        let annotation = |key: &str| node.annotation(key);
        if annotation(flannel::ANNOTATION_KUBE_SUBNET_MANAGER).and_then(Value::as_str) != Some("true") {
            return NodeView::NotFlannel;
        }
        match peer_of(name, node, network, own_subnet) {
            Ok(lease) => {
                let status = autonomy::AutonomyStatus::from_annotations(|key| annotation(key).and_then(Value::as_str));
                let autonomous = status.autonomy.is_on();
                let label = node.get(roles::LABEL_ROLE_POINTER).and_then(Value::as_str);
                let cloud = roles::NodeRole::from_label(label).0 == roles::NodeRole::Cloud;
                NodeView::Peer(PeerLease { lease, autonomous, cloud })
            }
            Err(reason) => NodeView::Bad(reason),
        }
    }

    /// Logs why a node is skipped, once per reason.
    fn note_skipped(&mut self, name: &str, view: &NodeView) {
        match view {
            NodeView::Bad(reason) => {
                if self.skipped.get(name) != Some(reason) {
                    tracing::warn!(node = %name, %reason, "skipping node: bad flannel lease");
                    self.skipped.insert(name.to_string(), reason.clone());
                }
            }
            NodeView::NotFlannel => {
                if self.skipped.get(name).map(String::as_str) != Some("") {
                    tracing::debug!(node = %name, "node is not a flannel node (no kube-subnet-manager annotation)");
                    self.skipped.insert(name.to_string(), String::new());
                }
            }
            NodeView::Peer(_) | NodeView::Own => {
                self.skipped.remove(name);
            }
        }
    }

    /// The full peer set from a complete list of the nodes.
    fn resync(&mut self, nodes: &[Object<NodeLease>], network: &NetworkConfig, own_subnet: Ipv4Net) -> PeerEvent {
        let mut peers: BTreeMap<String, PeerLease> = BTreeMap::new();
        for node in nodes {
            let name = node.get("/metadata/name").and_then(Value::as_str).unwrap_or("?").to_string();
            let mut view = self.view(node, network, own_subnet);
            if let NodeView::Peer(peer) = &view {
                if let Some((other, _)) = peers.iter().find(|(_, p)| p.lease.subnet == peer.lease.subnet) {
                    view = NodeView::Bad(format!("pod CIDR {} is already node {other}'s", peer.lease.subnet));
                }
            }
            self.note_skipped(&name, &view);
            if let NodeView::Peer(peer) = view {
                peers.insert(name, peer);
            }
        }
        let mut list: Vec<PeerLease> = peers.values().cloned().collect();
        list.sort_by_key(|p| p.lease.subnet);
        self.known = Some(peers);
        self.own_subnet = Some(own_subnet);
        PeerEvent::Resync(list)
    }

    /// Folds one watch event (`deleted`: the node is gone) into the peer
    /// set; queues what changed.
    fn apply_watch_event(
        &mut self,
        node: &Object<NodeLease>,
        deleted: bool,
        network: &NetworkConfig,
        own_subnet: Ipv4Net,
    ) {
        let Some(name) = node.get("/metadata/name").and_then(Value::as_str).map(String::from) else {
            tracing::warn!(deleted, "skipping node watch event without metadata.name");
            return;
        };
        let view = if deleted { NodeView::NotFlannel } else { self.view(node, network, own_subnet) };
        let known = self.known.get_or_insert_with(BTreeMap::new);
        let view = match view {
            NodeView::Peer(peer) => {
                match known.iter().find(|(n, p)| **n != name && p.lease.subnet == peer.lease.subnet) {
                    Some((other, _)) => {
                        NodeView::Bad(format!("pod CIDR {} is already node {other}'s", peer.lease.subnet))
                    }
                    None => NodeView::Peer(peer),
                }
            }
            other => other,
        };
        let previous = known.get(&name).cloned();
        match &view {
            NodeView::Peer(peer) => {
                if previous.as_ref() != Some(peer) {
                    if let Some(old) = previous.filter(|old| old.lease.subnet != peer.lease.subnet) {
                        self.pending.push_back(PeerEvent::Remove(old.lease.subnet));
                    }
                    known.insert(name.clone(), peer.clone());
                    self.pending.push_back(PeerEvent::Upsert(peer.clone()));
                }
            }
            NodeView::Own | NodeView::NotFlannel | NodeView::Bad(_) => {
                if let Some(old) = known.remove(&name) {
                    self.pending.push_back(PeerEvent::Remove(old.lease.subnet));
                }
            }
        }
        if deleted {
            self.skipped.remove(&name);
        } else {
            self.note_skipped(&name, &view);
        }
    }

    /// Forgets the peer set and the watch: the next event is a resync.
    fn reset(&mut self) {
        self.known = None;
        self.pending.clear();
        if let Some(watch) = &mut self.watch {
            watch.restart();
        }
    }

    async fn next_event_inner(&mut self, own_subnet: Ipv4Net) -> Result<PeerEvent, RegistryError> {
        if self.own_subnet != Some(own_subnet) {
            self.reset();
        }
        let network = self.network()?;
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let watch = match &mut self.watch {
                Some(watch) => watch,
                None => {
                    let mut watch = ListWatch::new(&self.client, None, "node");
                    watch.set_timeout(self.watch_timeout);
                    self.watch.insert(watch)
                }
            };
            // The watch and any list in progress stay in `self` while
            // awaiting: a caller that drops this future (a `select!`)
            // loses nothing.
            match watch.try_next().await? {
                WatchEvent::Listed(nodes) => return Ok(self.resync(&nodes, &network, own_subnet)),
                WatchEvent::Applied(node) => self.apply_watch_event(&node, false, &network, own_subnet),
                WatchEvent::Deleted(node) => self.apply_watch_event(&node, true, &network, own_subnet),
            }
        }
    }
}

impl Registry for KubernetesRegistry {
    fn describe(&self) -> String {
        format!("kubernetes {} (node {})", self.client.server(), self.own_node)
    }

    async fn network_config(&mut self) -> Result<NetworkConfig, RegistryError> {
        let network = self.resolve_network()?;
        self.network = Some(network);
        Ok(network)
    }

    async fn acquire_lease(
        &mut self,
        config: &NetworkConfig,
        request: &LeaseRequest,
    ) -> Result<OwnLease, RegistryError> {
        config.check()?;
        if request.node != self.config.node_name {
            tracing::warn!(configured = %self.config.node_name, requested = %request.node, "lease requested for another node name; using the request's");
        }
        self.network = Some(*config);
        self.own_node = request.node.clone();
        let subnet = self.publish(&request.node, request.public_ip, request.vtep_mac, config).await?;
        Ok(OwnLease { lease: request.lease_for(subnet), expires_at: Some(SystemTime::now() + LEASE_TTL) })
    }

    async fn renew_lease(&mut self, lease: &OwnLease) -> Result<OwnLease, RegistryError> {
        let config = self.network()?;
        let node = lease.lease.node.clone().unwrap_or_else(|| self.own_node.clone());
        let subnet = self.publish(&node, lease.lease.public_ip, lease.lease.vtep_mac, &config).await?;
        Ok(OwnLease { lease: Lease { subnet, ..lease.lease.clone() }, expires_at: Some(SystemTime::now() + LEASE_TTL) })
    }

    async fn next_event(&mut self, own_subnet: Ipv4Net) -> Result<PeerEvent, RegistryError> {
        let result = self.next_event_inner(own_subnet).await;
        if result.is_err() {
            // The next success must be a full resync.
            self.reset();
        }
        result
    }

    async fn set_autonomy(&mut self, node: &str, autonomy: Autonomy) -> Result<Vec<AutonomyChange>, RegistryError> {
        check_node_name(node)?;
        let what = format!("setting the autonomy of node {node}");
        for _ in 0..CONFLICT_ATTEMPTS {
            let object = self.known_node(node).await?;
            let changes = autonomy_changes(|key| object.annotation(key).and_then(Value::as_str), autonomy);
            let annotations: serde_json::Map<String, Value> = changes
                .iter()
                .map(|c| (c.field.clone(), c.value.clone().map(Value::String).unwrap_or(Value::Null)))
                .collect();
            // The version read: a writer in between (a yurt tool flipping
            // the same annotations) makes this a conflict, and the change
            // is worked out again from what it wrote.
            let mut metadata = json!({ "annotations": annotations });
            if let Some(version) = object.resource_version() {
                metadata["resourceVersion"] = Value::String(version.to_string());
            }
            let patch = json!({ "metadata": metadata });
            let api = self.nodes::<NodeLease>();
            match tokio::time::timeout(REQUEST_TIMEOUT, api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)))
                .await
            {
                Ok(Ok(_)) => return Ok(changes),
                Ok(Err(kube::Error::Api(status))) if status.code == 409 => {
                    tracing::debug!(%node, "node changed while setting its autonomy; reading it again");
                }
                Ok(Err(error)) => return Err(self.node_error(node, KubeError::from_client(&what, error))),
                Err(_) => {
                    return Err(RegistryError::Unreachable(format!(
                        "{what}: no answer within {}s",
                        REQUEST_TIMEOUT.as_secs()
                    )))
                }
            }
        }
        Err(RegistryError::Refused {
            what,
            reason: format!("the node changed under every one of {CONFLICT_ATTEMPTS} attempts"),
        })
    }

    async fn node_autonomy(&mut self, node: &str) -> Result<NodeAutonomy, RegistryError> {
        check_node_name(node)?;
        let object = self.known_node(node).await?;
        let status = autonomy::AutonomyStatus::from_annotations(|key| object.annotation(key).and_then(Value::as_str));
        let lease = match pod_cidr(&object) {
            Ok(Some(subnet)) => Some(NodeLeaseState {
                subnet,
                public_ip: object
                    .annotation(flannel::ANNOTATION_PUBLIC_IP)
                    .and_then(Value::as_str)
                    .and_then(|ip| ip.trim().parse().ok()),
                expires_at: None,
                kept_while_autonomous: false,
            }),
            Ok(None) => None,
            Err(reason) => {
                tracing::warn!(%node, %reason, "the node's pod CIDR is unreadable");
                None
            }
        };
        let ready = object
            .get("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|list| list.iter().find(|c| c.get("type").and_then(Value::as_str) == Some("Ready")))
            .map(|c| {
                let time = |key: &str| c.get(key).and_then(Value::as_str).and_then(rfc3339::parse);
                NodeCondition {
                    status: c.get("status").and_then(Value::as_str).unwrap_or("Unknown").to_string(),
                    reason: c.get("reason").and_then(Value::as_str).map(String::from),
                    since: time("lastTransitionTime"),
                    heartbeat: time("lastHeartbeatTime"),
                }
            });
        let heartbeat = self.heartbeat(node).await?;
        Ok(NodeAutonomy {
            node: node.to_string(),
            autonomy: status.autonomy,
            sources: status.sources.iter().map(|s| s.to_string()).collect(),
            problem: status.problem,
            lease,
            kubernetes: Some(KubeNodeState { ready, heartbeat }),
        })
    }
}

impl KubernetesRegistry {
    /// The node object; its absence is [`RegistryError::UnknownNode`].
    async fn known_node(&self, node: &str) -> Result<Object<NodeWithConditions>, RegistryError> {
        let what = format!("reading node {node}");
        call(&what, self.nodes::<NodeWithConditions>().get(node)).await.map_err(|e| self.node_error(node, e))
    }

    fn node_error(&self, node: &str, error: KubeError) -> RegistryError {
        match error {
            KubeError::NotFound { .. } => RegistryError::UnknownNode {
                node: node.to_string(),
                registry: format!("kubernetes {}", self.client.server()),
                reason: "there is no such Node object (has its kubelet registered it?)".into(),
            },
            other => other.into(),
        }
    }

    /// The kubelet's heartbeat Lease; read errors other than the API server
    /// being away are reported in it rather than failing the whole read.
    async fn heartbeat(&self, node: &str) -> Result<NodeHeartbeat, RegistryError> {
        let api: Api<Object<NodeHeartbeatLease>> = Api::namespaced(self.client.client(), NODE_LEASE_NAMESPACE);
        let what = format!("reading Lease {NODE_LEASE_NAMESPACE}/{node}");
        match call(&what, api.get(node)).await {
            Ok(lease) => Ok(NodeHeartbeat::Renewed {
                renewed: lease.get("/spec/renewTime").and_then(Value::as_str).and_then(rfc3339::parse),
                duration: lease.get("/spec/leaseDurationSeconds").and_then(Value::as_u64).map(Duration::from_secs),
            }),
            Err(KubeError::NotFound { .. }) => Ok(NodeHeartbeat::Missing),
            Err(KubeError::Unreachable(reason)) => Err(RegistryError::Unreachable(reason)),
            Err(other) => Ok(NodeHeartbeat::Unreadable(other.to_string())),
        }
    }
}

/// The annotation changes that give a node with annotations `get`
/// the autonomy `want` (see the module docs).
fn autonomy_changes<'a>(get: impl Fn(&str) -> Option<&'a str>, want: Autonomy) -> Vec<AutonomyChange> {
    let set = |key: &str, value: &str| AutonomyChange { field: key.to_string(), value: Some(value.to_string()) };
    let remove = |key: &str| AutonomyChange { field: key.to_string(), value: None };
    let mut changes = Vec::new();
    match want {
        Autonomy::Off => {
            changes.push(set(autonomy::ANNOTATION_AUTONOMY, "false"));
            if get(autonomy::ANNOTATION_AUTONOMY_OPENYURT).is_some_and(|v| v != "false") {
                changes.push(set(autonomy::ANNOTATION_AUTONOMY_OPENYURT, "false"));
            }
            if get(autonomy::ANNOTATION_AUTONOMY_DURATION).is_some() {
                changes.push(remove(autonomy::ANNOTATION_AUTONOMY_DURATION));
            }
        }
        Autonomy::Forever => {
            changes.push(set(autonomy::ANNOTATION_AUTONOMY, "true"));
            if get(autonomy::ANNOTATION_AUTONOMY_DURATION).is_some() {
                changes.push(remove(autonomy::ANNOTATION_AUTONOMY_DURATION));
            }
        }
        Autonomy::For(bound) => {
            changes.push(set(autonomy::ANNOTATION_AUTONOMY, "true"));
            changes.push(set(autonomy::ANNOTATION_AUTONOMY_DURATION, &autonomy::format_go_duration(bound)));
        }
    }
    changes
}

/// The peer lease a flannel node publishes, or why it is unusable.
fn peer_of<K: Kind>(
    name: &str,
    node: &Object<K>,
    network: &NetworkConfig,
    own_subnet: Ipv4Net,
) -> Result<Lease, String> {
    let subnet = pod_cidr(node)?.ok_or_else(|| "no spec.podCIDR(s)".to_string())?;
    if subnet == own_subnet {
        return Err(format!("pod CIDR {subnet} is our own subnet"));
    }
    if !network.network.contains(&subnet) {
        return Err(format!("pod CIDR {subnet} lies outside the network {}", network.network));
    }
    let text = |key: &str| -> Result<&str, String> {
        match node.annotation(key) {
            None => Err(format!("no {key} annotation")),
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(other) => Err(format!("annotation {key} is not a string: {other}")),
        }
    };
    let kind = text(flannel::ANNOTATION_BACKEND_TYPE)?;
    if kind != "vxlan" {
        return Err(format!("backend-type {kind:?} is not vxlan"));
    }
    let data = flannel::parse_backend_data(text(flannel::ANNOTATION_BACKEND_DATA)?)?;
    let ip = text(flannel::ANNOTATION_PUBLIC_IP)?;
    let public_ip: Ipv4Addr = ip.trim().parse().map_err(|_| format!("public-ip {ip:?} is not an IPv4 address"))?;
    Ok(Lease { subnet, public_ip, vtep_mac: data.vtep_mac, node: Some(name.to_string()) })
}

/// The node's IPv4 pod CIDR: the first IPv4 entry of `spec.podCIDRs`, else
/// `spec.podCIDR`; `None` when unassigned.
fn pod_cidr<K: Kind>(node: &Object<K>) -> Result<Option<Ipv4Net>, String> {
    let parse = |field: &str, text: &str| -> Result<Option<Ipv4Net>, String> {
        match text.trim().parse::<IpNet>() {
            Ok(IpNet::V4(net)) => Ok(Some(net.trunc())),
            Ok(IpNet::V6(_)) => Ok(None),
            Err(_) => Err(format!("{field} {text:?} is not a CIDR")),
        }
    };
    if let Some(list) = node.get("/spec/podCIDRs").and_then(Value::as_array) {
        for (i, item) in list.iter().enumerate() {
            let field = format!("spec.podCIDRs[{i}]");
            let text = item.as_str().ok_or_else(|| format!("{field} is not a string: {item}"))?;
            if let Some(net) = parse(&field, text)? {
                return Ok(Some(net));
            }
        }
    }
    match node.get("/spec/podCIDR") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if text.is_empty() => Ok(None),
        Some(Value::String(text)) => parse("spec.podCIDR", text),
        Some(other) => Err(format!("spec.podCIDR is not a string: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> KubernetesRegistry {
        KubernetesRegistry::new(KubeConfig {
            server: "https://127.0.0.1:6443".into(),
            token: None,
            token_file: None,
            ca_cert_pem: None,
            client_cert: None,
            node_name: "me".into(),
            network: Some("10.244.0.0/16".parse().unwrap()),
        })
        .unwrap()
    }

    fn node(name: &str, cidr: &str, annotations: Value) -> Value {
        json!({ "metadata": { "name": name, "annotations": annotations }, "spec": { "podCIDRs": [cidr] } })
    }

    fn flannel_annotations(mac: &str) -> Value {
        json!({
            "flannel.alpha.coreos.com/backend-type": "vxlan",
            "flannel.alpha.coreos.com/backend-data": format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
            "flannel.alpha.coreos.com/public-ip": "192.0.2.7",
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
        })
    }

    #[test]
    fn autonomy_changes_clear_whatever_switched_it_on() {
        let node = |pairs: &'static [(&'static str, &'static str)]| {
            move |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
        };
        let fields = |changes: Vec<AutonomyChange>| changes.into_iter().map(|c| (c.field, c.value)).collect::<Vec<_>>();
        let yurt =
            node(&[(autonomy::ANNOTATION_AUTONOMY_OPENYURT, "true"), (autonomy::ANNOTATION_AUTONOMY_DURATION, "2h")]);
        assert_eq!(
            fields(autonomy_changes(yurt, Autonomy::Off)),
            vec![
                (autonomy::ANNOTATION_AUTONOMY.to_string(), Some("false".to_string())),
                (autonomy::ANNOTATION_AUTONOMY_OPENYURT.to_string(), Some("false".to_string())),
                (autonomy::ANNOTATION_AUTONOMY_DURATION.to_string(), None),
            ]
        );
        assert_eq!(fields(autonomy_changes(node(&[]), Autonomy::Off)).len(), 1, "nothing else to clear");
        assert_eq!(
            fields(autonomy_changes(yurt, Autonomy::Forever))[1],
            (autonomy::ANNOTATION_AUTONOMY_DURATION.to_string(), None),
            "no time limit drops the bound"
        );
        assert_eq!(
            fields(autonomy_changes(node(&[]), Autonomy::For(Duration::from_secs(5400))))[1],
            (autonomy::ANNOTATION_AUTONOMY_DURATION.to_string(), Some("1h30m0s".to_string()))
        );
    }

    #[test]
    fn nodes_map_to_peers_or_reasons() {
        let reg = registry();
        let network = reg.resolve_network().unwrap();
        assert_eq!((network.subnet_len, network.vni), (24, 1));
        let own: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        // Through the lenient object, as the watch hands nodes over.
        let view = |n: &Value| reg.view(&Object::<NodeLease>::from_value(n.clone()), &network, own);

        let good = node("b", "10.244.2.0/24", flannel_annotations("aa:bb:cc:dd:ee:02"));
        let NodeView::Peer(peer) = view(&good) else { panic!("{:?}", view(&good)) };
        assert_eq!(peer.lease.subnet.to_string(), "10.244.2.0/24");
        assert_eq!(peer.lease.vtep_mac.to_string(), "aa:bb:cc:dd:ee:02");
        assert!(!peer.autonomous);

        let mut autonomous = good.clone();
        autonomous["metadata"]["annotations"]["node.beta.openyurt.io/autonomy"] = json!("TRUE");
        assert!(matches!(view(&autonomous), NodeView::Peer(p) if p.autonomous));

        assert_eq!(view(&node("me", "10.244.9.0/24", flannel_annotations("aa:bb:cc:dd:ee:09"))), NodeView::Own);
        assert_eq!(view(&node("c", "10.244.3.0/24", json!({}))), NodeView::NotFlannel);
        let bad = |n: &Value| match view(n) {
            NodeView::Bad(reason) => reason,
            other => panic!("{other:?}"),
        };
        assert!(bad(&node("d", "10.9.0.0/24", flannel_annotations("aa:bb:cc:dd:ee:04"))).contains("outside"));
        assert!(bad(&node("d", "10.244.1.0/24", flannel_annotations("aa:bb:cc:dd:ee:04"))).contains("own subnet"));
        assert!(bad(&node("d", "nope", flannel_annotations("aa:bb:cc:dd:ee:04"))).contains("not a CIDR"));
        let mut garbage = good.clone();
        garbage["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"] = json!("{\"VNI\":");
        assert!(bad(&garbage).contains("backend data"));
        let mut wrong = good.clone();
        wrong["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"] =
            json!(r#"{"VNI":"1","VtepMAC":"aa:bb:cc:dd:ee:02"}"#);
        assert!(bad(&wrong).contains("VNI"));
        let mut not_text = good.clone();
        not_text["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip"] = json!(7);
        assert!(bad(&not_text).contains("not a string"));
        let mut no_cidr = good.clone();
        no_cidr["spec"] = json!({});
        assert!(bad(&no_cidr).contains("podCIDR"));
        // Dual stack: the IPv4 entry counts wherever it is.
        let mut dual = good;
        dual["spec"] = json!({ "podCIDRs": ["fd00:1::/64", "10.244.5.0/24"] });
        assert!(matches!(view(&dual), NodeView::Peer(p) if p.lease.subnet.to_string() == "10.244.5.0/24"));
    }

    #[test]
    fn watch_events_fold_into_the_peer_set() {
        let mut reg = registry();
        let network = reg.resolve_network().unwrap();
        let own: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let listed = [Object::<NodeLease>::from_value(node("x", "10.244.8.0/24", json!({})))];
        assert_eq!(reg.resync(&listed, &network, own), PeerEvent::Resync(vec![]));
        let mut feed = |object: &Value, deleted: bool| {
            reg.apply_watch_event(&Object::from_value(object.clone()), deleted, &network, own);
            reg.pending.drain(..).collect::<Vec<_>>()
        };
        let mut b = node("b", "10.244.2.0/24", flannel_annotations("aa:bb:cc:dd:ee:02"));
        let events = feed(&b, false);
        assert!(matches!(events.as_slice(), [PeerEvent::Upsert(p)] if p.lease.subnet.to_string() == "10.244.2.0/24"));
        assert_eq!(feed(&b, false), vec![], "unchanged lease, no event");
        // Moved to another subnet: the old one goes first.
        b["spec"] = json!({ "podCIDR": "10.244.3.0/24" });
        let events = feed(&b, false);
        assert!(matches!(events.as_slice(), [PeerEvent::Remove(old), PeerEvent::Upsert(new)]
            if old.to_string() == "10.244.2.0/24" && new.lease.subnet.to_string() == "10.244.3.0/24"));
        // Another node claiming the same subnet is skipped.
        let events = feed(&node("c", "10.244.3.0/24", flannel_annotations("aa:bb:cc:dd:ee:03")), false);
        assert_eq!(events, vec![]);
        let mut feed = |object: &Value, deleted: bool| {
            reg.apply_watch_event(&Object::from_value(object.clone()), deleted, &network, own);
            reg.pending.drain(..).collect::<Vec<_>>()
        };
        assert_eq!(feed(&b, true), vec![PeerEvent::Remove("10.244.3.0/24".parse().unwrap())]);
        assert_eq!(feed(&json!({ "metadata": {} }), false), vec![], "nameless objects are skipped");
        assert!(reg.skipped.get("c").is_some_and(|r| r.contains("already node b's")));
    }

    #[test]
    fn bad_settings_are_refused() {
        let config = |server: &str, node: &str| KubeConfig {
            server: server.into(),
            token: None,
            token_file: None,
            ca_cert_pem: None,
            client_cert: None,
            node_name: node.into(),
            network: None,
        };
        assert!(KubernetesRegistry::new(config("ftp://x", "a")).is_err());
        assert!(KubernetesRegistry::new(config("https://x", "A/../b")).is_err());
        let mut with_ca = config("https://x", "a");
        with_ca.ca_cert_pem = Some(b"not a pem".to_vec());
        assert!(KubernetesRegistry::new(with_ca).is_err());
    }
}
