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
//!   (JSON merge patch) with `flannel.alpha.coreos.com/backend-type: vxlan`,
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
//!   logged reason. `node.beta.alibabacloud.com/autonomy=true` or
//!   `node.beta.openyurt.io/autonomy=true` marks a peer autonomous.
//! - **events**: a paginated list of the nodes gives the
//!   [`PeerEvent::Resync`]; a watch from the list's `resourceVersion` then
//!   gives [`PeerEvent::Upsert`] / [`PeerEvent::Remove`] (a deleted node,
//!   or one that stops being a valid peer, removes its subnet). The watch is
//!   renewed from the last seen `resourceVersion` when the server ends it
//!   normally (`timeoutSeconds`); an expired version (`410 Gone`), a broken
//!   or silent connection end the call with an error, and the next call
//!   lists again.
//! - **autonomy**: [`Registry::set_autonomy`] patches
//!   `node.beta.alibabacloud.com/autonomy`.
//!
//! RBAC needed (the same as flannel's ClusterRole): `nodes`: get, list,
//! watch, patch; `nodes/status`: patch.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::model::MacAddr;
use ipnet::{IpNet, Ipv4Net};
use reqwest::header::CONTENT_TYPE;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::{LeaseRequest, NetworkConfig, OwnLease, PeerEvent, PeerLease, Registry, RegistryError, LEASE_TTL};
use crate::model::autonomy;
use crate::model::flannel;
use crate::model::Lease;

/// Where flannel's DaemonSet mounts `net-conf.json` from its ConfigMap.
pub const NET_CONF_PATH: &str = "/etc/kube-flannel/net-conf.json";
/// The service-account files of a pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The node condition netd sets to `False` once it runs.
pub const CONDITION_NETWORK_UNAVAILABLE: &str = "NetworkUnavailable";
/// The reason netd gives on that condition.
pub const CONDITION_REASON: &str = "NetdIsUp";

/// Default `timeoutSeconds` of a node watch; it is renewed transparently.
pub const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(290);
/// A watch that delivers nothing for its timeout plus this is presumed dead.
const WATCH_GRACE: Duration = Duration::from_secs(30);
/// How long a token read from [`KubeConfig::token_file`] is used before the
/// file is read again (client-go's cached token source uses a minute too).
pub const TOKEN_RELOAD: Duration = Duration::from_secs(60);
/// Time limit of every request but the watch.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Page size of the node list.
const LIST_LIMIT: usize = 500;
const MERGE_PATCH: &str = "application/merge-patch+json";
const STRATEGIC_MERGE_PATCH: &str = "application/strategic-merge-patch+json";

/// How to reach the API server and who this node is.
#[derive(Clone, PartialEq, Eq)]
pub struct KubeConfig {
    /// API server URL, e.g. `https://10.96.0.1:443`.
    pub server: String,
    /// Bearer token, when given literally.
    pub token: Option<String>,
    /// File holding the bearer token (a service-account token in a
    /// cluster); takes precedence over `token`. Re-read every
    /// [`TOKEN_RELOAD`] and after a 401, because the kubelet rotates
    /// projected service-account tokens in place.
    pub token_file: Option<PathBuf>,
    /// PEM of the CA(s) to trust for the server's certificate; `None`
    /// trusts the public web roots.
    pub ca_cert_pem: Option<Vec<u8>>,
    /// This node's name (`metadata.name` of its Node object).
    pub node_name: String,
    /// The cluster network (flannel's `Network`); `None` reads
    /// [`NET_CONF_PATH`].
    pub network: Option<Ipv4Net>,
}

impl std::fmt::Debug for KubeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeConfig")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("ca_cert_pem", &self.ca_cert_pem.as_ref().map(|pem| format!("<{} bytes>", pem.len())))
            .field("node_name", &self.node_name)
            .field("network", &self.network)
            .finish()
    }
}

impl KubeConfig {
    /// The configuration of a pod in the cluster: `KUBERNETES_SERVICE_HOST`
    /// and `KUBERNETES_SERVICE_PORT`, the service-account token and CA in
    /// [`SERVICE_ACCOUNT_DIR`], the node name from `NODE_NAME` (flannel's
    /// DaemonSet sets it from `spec.nodeName`) or else the host name. The
    /// network is left unset.
    pub fn in_cluster() -> Result<Self, RegistryError> {
        Self::in_cluster_from(Path::new(SERVICE_ACCOUNT_DIR), |key| std::env::var(key).ok())
    }

    fn in_cluster_from(dir: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Self, RegistryError> {
        let var = |key: &str| {
            env(key)
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| RegistryError::BadConfig(format!("{key} is not set: not running in a Kubernetes pod?")))
        };
        let host = var("KUBERNETES_SERVICE_HOST")?;
        let port = var("KUBERNETES_SERVICE_PORT")?;
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path)
                .map_err(|e| RegistryError::BadConfig(format!("reading the service account's {}: {e}", path.display())))
        };
        let token = String::from_utf8_lossy(&read("token")?).trim().to_string();
        let token_file = Some(dir.join("token"));
        let ca = read("ca.crt")?;
        let node_name =
            match env("NODE_NAME").filter(|n| !n.trim().is_empty()) {
                Some(name) => name.trim().to_string(),
                None => std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_lowercase()).map_err(
                    |e| RegistryError::BadConfig(format!("NODE_NAME is not set and the host name is unreadable: {e}")),
                )?,
            };
        Ok(Self {
            server: format!("https://{host}:{}", port.trim()),
            token: Some(token),
            token_file,
            ca_cert_pem: Some(ca),
            node_name,
            network: None,
        })
    }
}

/// A registry on the Kubernetes API (node objects with flannel's
/// annotations); see the module docs for the mapping.
pub struct KubernetesRegistry {
    config: KubeConfig,
    base: String,
    client: reqwest::Client,
    token: Mutex<BearerToken>,
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
    resource_version: Option<String>,
    watch: Option<Watch>,
}

impl std::fmt::Debug for KubernetesRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesRegistry")
            .field("config", &self.config)
            .field("own_node", &self.own_node)
            .field("resource_version", &self.resource_version)
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

/// The bearer token in use and when it was read from its file.
#[derive(Default)]
struct BearerToken {
    token: Option<String>,
    /// `None`: read the file before the next request.
    read_at: Option<Instant>,
}

/// An open node watch.
struct Watch {
    response: reqwest::Response,
    buf: Vec<u8>,
    started: Instant,
    events: u64,
}

impl KubernetesRegistry {
    /// A registry talking to `config.server`; nothing is contacted until
    /// used.
    pub fn new(config: KubeConfig) -> Result<Self, RegistryError> {
        let base = config.server.trim_end_matches('/').to_string();
        let host = base
            .strip_prefix("https://")
            .or_else(|| base.strip_prefix("http://"))
            .ok_or_else(|| RegistryError::BadConfig(format!("API server {:?} is not an http(s) URL", config.server)))?;
        check_node_name(&config.node_name)?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(Duration::from_secs(30))
            .http1_only();
        if let Some(pem) = &config.ca_cert_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| RegistryError::BadConfig(format!("CA certificate PEM: {}", error_chain(&e))))?;
            if certs.is_empty() {
                return Err(RegistryError::BadConfig("CA certificate PEM holds no certificate".into()));
            }
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let host_only = host.split(['/', '?']).next().unwrap_or(host);
        let host_only = host_only.rsplit_once(':').map(|(h, _)| h).unwrap_or(host_only);
        if matches!(host_only, "127.0.0.1" | "localhost" | "[::1]") {
            // Proxies from the environment must not catch loopback traffic.
            builder = builder.no_proxy();
        }
        let client =
            builder.build().map_err(|e| RegistryError::BadConfig(format!("HTTP client: {}", error_chain(&e))))?;
        let mut token = BearerToken { token: config.token.clone(), read_at: None };
        if let Some(path) = &config.token_file {
            // A file that is missing at start is a configuration error; later
            // read failures keep the token already read.
            token.token = Some(read_token(path)?);
            token.read_at = Some(Instant::now());
        }
        Ok(Self {
            own_node: config.node_name.clone(),
            token: Mutex::new(token),
            config,
            base,
            client,
            watch_timeout: DEFAULT_WATCH_TIMEOUT,
            network: None,
            own_subnet: None,
            known: None,
            skipped: BTreeMap::new(),
            pending: VecDeque::new(),
            resource_version: None,
            watch: None,
        })
    }

    /// Sets the `timeoutSeconds` of node watches (at least one second;
    /// default [`DEFAULT_WATCH_TIMEOUT`]). A watch silent for longer than
    /// this plus 30 s counts as a dead connection.
    pub fn with_watch_timeout(mut self, timeout: Duration) -> Self {
        self.watch_timeout = timeout.max(Duration::from_secs(1));
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

    /// The bearer token for the next request: from the token file when it
    /// was read more than [`TOKEN_RELOAD`] ago or the last one was refused.
    /// The read is synchronous: a token file is a few hundred bytes on a
    /// local file system (a projected tmpfs volume in a pod), read at most
    /// once a minute.
    fn bearer(&self) -> Option<String> {
        let mut cache = self.token.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(path) = &self.config.token_file {
            if cache.read_at.is_none_or(|at| at.elapsed() >= TOKEN_RELOAD) {
                match read_token(path) {
                    Ok(token) => cache.token = Some(token),
                    Err(error) => tracing::warn!(%error, "keeping the bearer token read before"),
                }
                cache.read_at = Some(Instant::now());
            }
        }
        cache.token.clone()
    }

    /// A 401: the token may have been rotated; read the file again before
    /// the next request.
    fn note_status(&self, status: StatusCode) {
        if status == StatusCode::UNAUTHORIZED && self.config.token_file.is_some() {
            self.token.lock().unwrap_or_else(PoisonError::into_inner).read_at = None;
        }
    }

    /// One request; transport failures are [`RegistryError::Unreachable`].
    /// Returns the status and the body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, String)>,
    ) -> Result<(StatusCode, Vec<u8>), RegistryError> {
        let what = format!("{method} {}{path}", self.base);
        let mut request = self.client.request(method, format!("{}{path}", self.base)).timeout(REQUEST_TIMEOUT);
        if let Some(token) = self.bearer() {
            request = request.bearer_auth(token);
        }
        if let Some((content_type, body)) = body {
            request = request.header(CONTENT_TYPE, content_type).body(body);
        }
        let response =
            request.send().await.map_err(|e| RegistryError::Unreachable(format!("{what}: {}", error_chain(&e))))?;
        let status = response.status();
        self.note_status(status);
        let bytes = response
            .bytes()
            .await
            .map_err(|e| RegistryError::Unreachable(format!("{what}: reading the response: {}", error_chain(&e))))?;
        Ok((status, bytes.to_vec()))
    }

    /// A request that must succeed with a JSON body.
    async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, String)>,
    ) -> Result<Value, RegistryError> {
        let what = format!("{method} {path}");
        let (status, bytes) = self.call(method, path, body).await?;
        if !status.is_success() {
            return Err(http_error(&what, status, &bytes));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| RegistryError::Refused { what, reason: format!("the response is not JSON: {e}") })
    }

    async fn get_node(&self, name: &str) -> Result<Value, RegistryError> {
        let path = format!("/api/v1/nodes/{name}");
        let (status, bytes) = self.call(Method::GET, &path, None).await?;
        if status == StatusCode::NOT_FOUND {
            return Err(RegistryError::Refused {
                what: format!("reading node {name}"),
                reason: "there is no such Node object (has its kubelet registered it?)".into(),
            });
        }
        if !status.is_success() {
            return Err(http_error(&format!("GET {path}"), status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| RegistryError::Refused {
            what: format!("reading node {name}"),
            reason: format!("the response is not JSON: {e}"),
        })
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
        let annotations = object.pointer("/metadata/annotations");
        let stale: serde_json::Map<String, Value> = wanted
            .iter()
            .filter(|(key, value)| annotations.and_then(|a| a.get(*key)).and_then(Value::as_str) != Some(value))
            .map(|(key, value)| (key.to_string(), Value::String(value.clone())))
            .collect();
        if !stale.is_empty() {
            let patch = json!({ "metadata": { "annotations": stale } });
            self.json(Method::PATCH, &format!("/api/v1/nodes/{node}"), Some((MERGE_PATCH, patch.to_string()))).await?;
            tracing::info!(%node, %subnet, "published lease annotations");
        }

        let condition_ok = object
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|list| {
                list.iter().find(|c| c.get("type").and_then(Value::as_str) == Some(CONDITION_NETWORK_UNAVAILABLE))
            })
            .is_some_and(|c| c.get("status").and_then(Value::as_str) == Some("False"));
        if !condition_ok {
            let now = rfc3339(SystemTime::now());
            let patch = json!({ "status": { "conditions": [{
                "type": CONDITION_NETWORK_UNAVAILABLE,
                "status": "False",
                "reason": CONDITION_REASON,
                "message": "netd is running on this node",
                "lastTransitionTime": now,
                "lastHeartbeatTime": now,
            }]}});
            self.json(
                Method::PATCH,
                &format!("/api/v1/nodes/{node}/status"),
                Some((STRATEGIC_MERGE_PATCH, patch.to_string())),
            )
            .await?;
            tracing::info!(%node, "set node condition NetworkUnavailable=False");
        }
        Ok(subnet)
    }

    /// What `node` is to us, for the network and own subnet given.
    fn view(&self, node: &Value, network: &NetworkConfig, own_subnet: Ipv4Net) -> NodeView {
        let Some(name) = node.pointer("/metadata/name").and_then(Value::as_str) else {
            return NodeView::Bad("no metadata.name".into());
        };
        if name == self.own_node {
            return NodeView::Own;
        }
        let annotations = node.pointer("/metadata/annotations");
        let annotation = |key: &str| annotations.and_then(|a| a.get(key));
        if annotation(flannel::ANNOTATION_KUBE_SUBNET_MANAGER).and_then(Value::as_str) != Some("true") {
            return NodeView::NotFlannel;
        }
        match peer_of(name, node, network, own_subnet) {
            Ok(lease) => {
                let on = |key: &str| autonomy::autonomy_on(annotation(key).and_then(Value::as_str));
                let autonomous = on(autonomy::ANNOTATION_AUTONOMY) || on(autonomy::ANNOTATION_AUTONOMY_OPENYURT);
                NodeView::Peer(PeerLease { lease, autonomous })
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

    /// Lists every node (paginated): the full peer set and the version to
    /// watch from.
    async fn resync(&mut self, own_subnet: Ipv4Net) -> Result<PeerEvent, RegistryError> {
        let network = self.network()?;
        let mut peers: BTreeMap<String, PeerLease> = BTreeMap::new();
        let mut next: Option<String> = None;
        let version = loop {
            let mut path = format!("/api/v1/nodes?limit={LIST_LIMIT}");
            if let Some(token) = &next {
                path.push_str("&continue=");
                path.push_str(&percent_encode(token));
            }
            let page = self.json(Method::GET, &path, None).await?;
            for item in page.get("items").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
                let name = item.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("?").to_string();
                let mut view = self.view(item, &network, own_subnet);
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
            next =
                page.pointer("/metadata/continue").and_then(Value::as_str).filter(|c| !c.is_empty()).map(String::from);
            if next.is_none() {
                break page.pointer("/metadata/resourceVersion").and_then(Value::as_str).map(String::from);
            }
        };
        let mut list: Vec<PeerLease> = peers.values().cloned().collect();
        list.sort_by_key(|p| p.lease.subnet);
        self.resource_version = version;
        self.known = Some(peers);
        self.own_subnet = Some(own_subnet);
        self.watch = None;
        Ok(PeerEvent::Resync(list))
    }

    /// Opens a watch from the last seen resource version.
    async fn open_watch(&self) -> Result<Watch, RegistryError> {
        let mut path = format!(
            "/api/v1/nodes?watch=true&allowWatchBookmarks=true&timeoutSeconds={}",
            self.watch_timeout.as_secs()
        );
        if let Some(version) = &self.resource_version {
            path.push_str("&resourceVersion=");
            path.push_str(&percent_encode(version));
        }
        let what = format!("GET {}{path}", self.base);
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(token) = self.bearer() {
            request = request.bearer_auth(token);
        }
        let response =
            request.send().await.map_err(|e| RegistryError::Unreachable(format!("{what}: {}", error_chain(&e))))?;
        let status = response.status();
        self.note_status(status);
        if status == StatusCode::GONE {
            return Err(RegistryError::Unreachable(
                "node watch: resource version expired (410 Gone); the next event is a full resync".into(),
            ));
        }
        if !status.is_success() {
            let bytes = response.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            return Err(http_error(&what, status, &bytes));
        }
        Ok(Watch { response, buf: Vec::new(), started: Instant::now(), events: 0 })
    }

    /// Folds one watch event into the peer set; queues what changed.
    fn apply_watch_event(&mut self, line: &[u8], own_subnet: Ipv4Net) -> Result<(), RegistryError> {
        let event: Value = match serde_json::from_slice(line) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(reason = %e, "skipping undecodable node watch event");
                return Ok(());
            }
        };
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        let Some(object) = event.get("object") else {
            tracing::warn!(%kind, "skipping node watch event without an object");
            return Ok(());
        };
        if kind == "ERROR" {
            let code = object.get("code").and_then(Value::as_u64).unwrap_or(0);
            let message = object.get("message").and_then(Value::as_str).unwrap_or("");
            return Err(RegistryError::Unreachable(if code == 410 {
                format!("node watch: resource version expired (410 Gone: {message}); the next event is a full resync")
            } else {
                format!("node watch error {code}: {message}")
            }));
        }
        if let Some(version) = object.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
            self.resource_version = Some(version.to_string());
        }
        if kind == "BOOKMARK" {
            return Ok(());
        }
        let Some(name) = object.pointer("/metadata/name").and_then(Value::as_str).map(String::from) else {
            tracing::warn!(%kind, "skipping node watch event without metadata.name");
            return Ok(());
        };
        let network = self.network()?;
        let view = match kind {
            "ADDED" | "MODIFIED" => self.view(object, &network, own_subnet),
            "DELETED" => NodeView::NotFlannel,
            other => {
                tracing::warn!(kind = %other, node = %name, "skipping node watch event of unknown type");
                return Ok(());
            }
        };
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
        if kind == "DELETED" {
            self.skipped.remove(&name);
        } else {
            self.note_skipped(&name, &view);
        }
        Ok(())
    }

    /// Forgets the peer set and the watch: the next event is a resync.
    fn reset(&mut self) {
        self.known = None;
        self.watch = None;
        self.pending.clear();
    }

    async fn next_event_inner(&mut self, own_subnet: Ipv4Net) -> Result<PeerEvent, RegistryError> {
        if self.own_subnet != Some(own_subnet) {
            self.reset();
        }
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            if self.known.is_none() {
                return self.resync(own_subnet).await;
            }
            if self.watch.is_none() {
                self.watch = Some(self.open_watch().await?);
            }
            let idle = self.watch_timeout + WATCH_GRACE;
            // The watch stays in `self` while awaiting: a caller that drops
            // this future (a `select!`) loses nothing and keeps the stream.
            let Some(watch) = self.watch.as_mut() else { continue };
            match watch.next_line(idle).await? {
                Some(line) => {
                    watch.events += 1;
                    self.apply_watch_event(&line, own_subnet)?;
                }
                None => {
                    // The server ended the watch (timeoutSeconds): watch
                    // again from the last seen version, unless it ended at
                    // once, which would spin.
                    let ended = self.watch.take();
                    let too_soon = (self.watch_timeout / 2).min(Duration::from_secs(1));
                    if ended.is_some_and(|w| w.events == 0 && w.started.elapsed() < too_soon) {
                        return Err(RegistryError::Unreachable("node watch ended at once without any event".into()));
                    }
                }
            }
        }
    }
}

impl Watch {
    /// The next non-empty line of the event stream; `None` when the server
    /// ended the stream.
    async fn next_line(&mut self, idle: Duration) -> Result<Option<Vec<u8>>, RegistryError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(line));
            }
            match tokio::time::timeout(idle, self.response.chunk()).await {
                Err(_) => {
                    return Err(RegistryError::Unreachable(format!(
                        "node watch silent for {}s: connection presumed dead",
                        idle.as_secs()
                    )))
                }
                Ok(Err(e)) => return Err(RegistryError::Unreachable(format!("node watch broke: {}", error_chain(&e)))),
                Ok(Ok(Some(bytes))) => self.buf.extend_from_slice(&bytes),
                Ok(Ok(None)) => {
                    if self.buf.iter().all(u8::is_ascii_whitespace) {
                        return Ok(None);
                    }
                    return Ok(Some(std::mem::take(&mut self.buf)));
                }
            }
        }
    }
}

impl Registry for KubernetesRegistry {
    fn describe(&self) -> String {
        format!("kubernetes {} (node {})", self.base, self.own_node)
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

    async fn set_autonomy(&mut self, node: &str, autonomous: bool) -> Result<(), RegistryError> {
        check_node_name(node)?;
        let value = if autonomous { "true" } else { "false" };
        let mut annotations = serde_json::Map::new();
        annotations.insert(autonomy::ANNOTATION_AUTONOMY.into(), Value::String(value.into()));
        if !autonomous {
            // The OpenYurt flag would keep the node autonomous: clear it too.
            let object = self.get_node(node).await?;
            let openyurt = object
                .pointer("/metadata/annotations")
                .and_then(|a| a.get(autonomy::ANNOTATION_AUTONOMY_OPENYURT))
                .and_then(Value::as_str);
            if autonomy::autonomy_on(openyurt) {
                annotations.insert(autonomy::ANNOTATION_AUTONOMY_OPENYURT.into(), Value::String(value.into()));
            }
        }
        let path = format!("/api/v1/nodes/{node}");
        let (status, bytes) = self
            .call(
                Method::PATCH,
                &path,
                Some((MERGE_PATCH, json!({ "metadata": { "annotations": annotations } }).to_string())),
            )
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Err(RegistryError::Refused {
                what: format!("setting autonomy of node {node}"),
                reason: "there is no such Node object".into(),
            });
        }
        if !status.is_success() {
            return Err(http_error(&format!("PATCH {path}"), status, &bytes));
        }
        Ok(())
    }
}

/// The peer lease a flannel node publishes, or why it is unusable.
fn peer_of(name: &str, node: &Value, network: &NetworkConfig, own_subnet: Ipv4Net) -> Result<Lease, String> {
    let subnet = pod_cidr(node)?.ok_or_else(|| "no spec.podCIDR(s)".to_string())?;
    if subnet == own_subnet {
        return Err(format!("pod CIDR {subnet} is our own subnet"));
    }
    if !network.network.contains(&subnet) {
        return Err(format!("pod CIDR {subnet} lies outside the network {}", network.network));
    }
    let annotations = node.pointer("/metadata/annotations");
    let text = |key: &str| -> Result<&str, String> {
        match annotations.and_then(|a| a.get(key)) {
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
fn pod_cidr(node: &Value) -> Result<Option<Ipv4Net>, String> {
    let parse = |field: &str, text: &str| -> Result<Option<Ipv4Net>, String> {
        match text.trim().parse::<IpNet>() {
            Ok(IpNet::V4(net)) => Ok(Some(net.trunc())),
            Ok(IpNet::V6(_)) => Ok(None),
            Err(_) => Err(format!("{field} {text:?} is not a CIDR")),
        }
    };
    if let Some(list) = node.pointer("/spec/podCIDRs").and_then(Value::as_array) {
        for (i, item) in list.iter().enumerate() {
            let field = format!("spec.podCIDRs[{i}]");
            let text = item.as_str().ok_or_else(|| format!("{field} is not a string: {item}"))?;
            if let Some(net) = parse(&field, text)? {
                return Ok(Some(net));
            }
        }
    }
    match node.pointer("/spec/podCIDR") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if text.is_empty() => Ok(None),
        Some(Value::String(text)) => parse("spec.podCIDR", text),
        Some(other) => Err(format!("spec.podCIDR is not a string: {other}")),
    }
}

/// Node names are DNS subdomains (RFC 1123): safe in a URL path as they are.
fn check_node_name(name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadConfig(format!("node name {name:?} is not a valid Kubernetes node name")))
    }
}

/// An HTTP error status as a registry error: 5xx and 429 are transient.
fn http_error(what: &str, status: StatusCode, body: &[u8]) -> RegistryError {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(String::from))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect());
    let reason = format!("HTTP {status}: {}", message.trim());
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        RegistryError::Unreachable(format!("{what}: {reason}"))
    } else {
        RegistryError::Refused { what: what.to_string(), reason }
    }
}

/// The token in `path`, trimmed; an empty file is an error.
fn read_token(path: &Path) -> Result<String, RegistryError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RegistryError::BadConfig(format!("reading the bearer token {}: {e}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(RegistryError::BadConfig(format!("the bearer token file {} is empty", path.display())));
    }
    Ok(token.to_string())
}

/// An error and its sources, `: `-joined (reqwest's own text is terse).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let next = inner.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = inner.source();
    }
    text
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `2024-05-01T12:00:00Z`.
fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
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
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661)), "2000-02-29T01:01:01Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_735_689_599)), "2024-12-31T23:59:59Z");
    }

    #[test]
    fn nodes_map_to_peers_or_reasons() {
        let reg = registry();
        let network = reg.resolve_network().unwrap();
        assert_eq!((network.subnet_len, network.vni), (24, 1));
        let own: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let view = |n: &Value| reg.view(n, &network, own);

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
        let own: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        reg.known = Some(BTreeMap::new());
        let mut feed = |kind: &str, object: Value| {
            let line = json!({ "type": kind, "object": object }).to_string();
            let result = reg.apply_watch_event(line.as_bytes(), own);
            (result.map_err(|e| e.to_string()), reg.pending.drain(..).collect::<Vec<_>>())
        };
        let mut b = node("b", "10.244.2.0/24", flannel_annotations("aa:bb:cc:dd:ee:02"));
        b["metadata"]["resourceVersion"] = json!("7");
        let (ok, events) = feed("ADDED", b.clone());
        assert!(
            ok.is_ok()
                && matches!(events.as_slice(), [PeerEvent::Upsert(p)] if p.lease.subnet.to_string() == "10.244.2.0/24")
        );
        assert_eq!(feed("MODIFIED", b.clone()).1, vec![], "unchanged lease, no event");
        // Moved to another subnet: the old one goes first.
        b["spec"] = json!({ "podCIDR": "10.244.3.0/24" });
        let (_, events) = feed("MODIFIED", b.clone());
        assert!(matches!(events.as_slice(), [PeerEvent::Remove(old), PeerEvent::Upsert(new)]
            if old.to_string() == "10.244.2.0/24" && new.lease.subnet.to_string() == "10.244.3.0/24"));
        // Another node claiming the same subnet is skipped.
        let (_, events) = feed("ADDED", node("c", "10.244.3.0/24", flannel_annotations("aa:bb:cc:dd:ee:03")));
        assert_eq!(events, vec![]);
        assert!(reg.skipped.get("c").is_some_and(|r| r.contains("already node b's")));
        let mut feed = |kind: &str, object: Value| {
            let line = json!({ "type": kind, "object": object }).to_string();
            let result = reg.apply_watch_event(line.as_bytes(), own);
            (result.map_err(|e| e.to_string()), reg.pending.drain(..).collect::<Vec<_>>())
        };
        assert_eq!(feed("DELETED", b).1, vec![PeerEvent::Remove("10.244.3.0/24".parse().unwrap())]);
        assert_eq!(feed("BOOKMARK", json!({ "metadata": { "resourceVersion": "42" } })).1, vec![]);
        let (err, _) = feed("ERROR", json!({ "kind": "Status", "code": 410, "message": "too old resource version" }));
        assert!(err.unwrap_err().contains("410 Gone"));
        assert_eq!(reg.resource_version.as_deref(), Some("42"));
        assert!(reg.apply_watch_event(b"not json", own).is_ok(), "undecodable lines are skipped");
    }

    #[test]
    fn in_cluster_reads_the_service_account() {
        let dir = std::env::temp_dir().join(format!("netd-kube-sa-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "abc\n").unwrap();
        std::fs::write(dir.join("ca.crt"), "PEM").unwrap();
        let env = |key: &str| match key {
            "KUBERNETES_SERVICE_HOST" => Some("fd00::1".to_string()),
            "KUBERNETES_SERVICE_PORT" => Some("443".to_string()),
            "NODE_NAME" => Some("edge-1".to_string()),
            _ => None,
        };
        let config = KubeConfig::in_cluster_from(&dir, env).unwrap();
        assert_eq!(config.server, "https://[fd00::1]:443");
        assert_eq!(config.token.as_deref(), Some("abc"));
        assert_eq!(config.node_name, "edge-1");
        assert!(!format!("{config:?}").contains("abc"), "token leaks into Debug");
        let err = KubeConfig::in_cluster_from(&dir, |_| None).unwrap_err().to_string();
        assert!(err.contains("KUBERNETES_SERVICE_HOST"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_settings_are_refused() {
        let config = |server: &str, node: &str| KubeConfig {
            server: server.into(),
            token: None,
            token_file: None,
            ca_cert_pem: None,
            node_name: node.into(),
            network: None,
        };
        assert!(KubernetesRegistry::new(config("ftp://x", "a")).is_err());
        assert!(KubernetesRegistry::new(config("https://x", "A/../b")).is_err());
        let mut with_ca = config("https://x", "a");
        with_ca.ca_cert_pem = Some(b"not a pem".to_vec());
        assert!(KubernetesRegistry::new(with_ca).is_err());
        assert_eq!(percent_encode("a+b/c=="), "a%2Bb%2Fc%3D%3D");
    }
}
