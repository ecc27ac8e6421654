//! Choosing a backend: [`RegistrySpec`] names one, [`AnyRegistry::open`]
//! builds it, and [`AnyRegistry`] drives whichever it is.

use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;

use super::embedded::EmbeddedRegistry;
#[cfg(feature = "etcd")]
use super::etcd::EtcdRegistry;
use super::kubernetes::{KubeConfig, KubernetesRegistry};
use super::{AutonomyChange, LeaseRequest, NetworkConfig, NodeAutonomy, OwnLease, PeerEvent, Registry, RegistryError};
use netd_kube::ClientCertFiles;
use netd_model::autonomy::Autonomy;

/// Which registry to talk to, as `--registry` spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrySpec {
    /// `embedded:<path>`: the local SQLite registry.
    Embedded(PathBuf),
    /// `etcd:<endpoint>[,<endpoint>…]`.
    Etcd(Vec<String>),
    /// `kubernetes` (in-cluster) or `kubernetes:<https://server>` (token from
    /// `token_file`, CA from `ca_file`).
    Kubernetes(Option<String>),
}

impl std::str::FromStr for RegistrySpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "embedded" if rest.is_empty() => Ok(Self::Embedded(super::embedded::DEFAULT_PATH.into())),
            "embedded" => Ok(Self::Embedded(rest.into())),
            "etcd" if rest.is_empty() => Err("etcd registry needs endpoints: etcd:http://127.0.0.1:2379".into()),
            "etcd" => Ok(Self::Etcd(rest.split(',').map(str::to_string).collect())),
            "kubernetes" | "k8s" if rest.is_empty() => Ok(Self::Kubernetes(None)),
            "kubernetes" | "k8s" => Ok(Self::Kubernetes(Some(rest.to_string()))),
            _ => Err(format!("unknown registry {s:?} (embedded[:PATH], etcd:URL[,URL…], kubernetes[:URL])")),
        }
    }
}

impl std::fmt::Display for RegistrySpec {
    /// The spec [`RegistrySpec::from_str`](std::str::FromStr::from_str) reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedded(path) => write!(f, "embedded:{}", path.display()),
            Self::Etcd(endpoints) => write!(f, "etcd:{}", endpoints.join(",")),
            Self::Kubernetes(None) => f.write_str("kubernetes"),
            Self::Kubernetes(Some(server)) => write!(f, "kubernetes:{server}"),
        }
    }
}

/// What opening a registry needs beyond its [`RegistrySpec`].
#[derive(Debug, Clone, Default)]
pub struct OpenSettings {
    /// This node's name (the Kubernetes backend's Node object).
    pub node_name: String,
    /// The cluster network, where the backend does not hold it (Kubernetes).
    pub network: Option<Ipv4Net>,
    /// Bearer token file for `kubernetes:<URL>`.
    pub token_file: Option<PathBuf>,
    /// CA bundle for `kubernetes:<URL>`, and for in-cluster `kubernetes`
    /// with a client certificate.
    pub ca_file: Option<PathBuf>,
    /// Authenticate with this client certificate (the node's own, so the
    /// Node authorizer and NodeRestriction confine writes to its Node)
    /// instead of a bearer token.
    pub client_cert: Option<ClientCertFiles>,
    /// How often the embedded registry looks for changes.
    pub poll: Duration,
}

/// One of the backends; lets the daemon drive any of them with one code path.
pub enum AnyRegistry {
    /// [`EmbeddedRegistry`].
    Embedded(EmbeddedRegistry),
    /// [`EtcdRegistry`] (feature `etcd`).
    #[cfg(feature = "etcd")]
    Etcd(Box<EtcdRegistry>),
    /// [`KubernetesRegistry`].
    Kubernetes(Box<KubernetesRegistry>),
}

/// How to reach the API server of `kubernetes[:server]`: in-cluster
/// (`KUBERNETES_SERVICE_HOST`; the service account's token, or `settings`'
/// client certificate) without a server, else the server with `settings`'
/// token or client certificate and CA file.
pub fn kube_config(server: Option<&str>, settings: &OpenSettings) -> Result<KubeConfig, RegistryError> {
    let Some(server) = server else {
        return Ok(match &settings.client_cert {
            Some(files) => {
                KubeConfig::in_cluster_with_cert(files.clone(), settings.ca_file.as_deref(), &settings.node_name)?
            }
            None => KubeConfig::in_cluster()?,
        });
    };
    let ca_cert_pem = match &settings.ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|source| RegistryError::CaFile { path: path.clone(), source })?),
        None => None,
    };
    Ok(KubeConfig {
        server: server.to_string(),
        token: None,
        token_file: settings.token_file.clone(),
        ca_cert_pem,
        client_cert: settings.client_cert.clone(),
        node_name: settings.node_name.clone(),
        network: None,
    })
}

impl AnyRegistry {
    /// Builds the backend `spec` names. Nothing is contacted yet: a registry
    /// that is down now is just unreachable, retried by the caller; only
    /// settings that can never work (unreadable CA file, no in-cluster
    /// environment) are errors.
    pub async fn open(spec: &RegistrySpec, settings: &OpenSettings) -> Result<Self, RegistryError> {
        match spec {
            RegistrySpec::Embedded(path) => Ok(Self::Embedded(EmbeddedRegistry::open(path.clone(), settings.poll))),
            #[cfg(feature = "etcd")]
            RegistrySpec::Etcd(endpoints) => Ok(Self::Etcd(Box::new(EtcdRegistry::connect_lazy(endpoints).await?))),
            #[cfg(not(feature = "etcd"))]
            RegistrySpec::Etcd(_) => Err(super::without_etcd()),
            RegistrySpec::Kubernetes(server) => {
                let config = kube_config(server.as_deref(), settings)?;
                // The daemon's node name wins over in-cluster discovery's
                // (NODE_NAME or the host name), so `--node-name` means the
                // same with every registry.
                let node_name =
                    if settings.node_name.is_empty() { config.node_name.clone() } else { settings.node_name.clone() };
                let config = KubeConfig { network: settings.network, node_name, ..config };
                Ok(Self::Kubernetes(Box::new(KubernetesRegistry::new(config)?)))
            }
        }
    }
}

impl Registry for AnyRegistry {
    fn describe(&self) -> String {
        match self {
            Self::Embedded(r) => r.describe(),
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.describe(),
            Self::Kubernetes(r) => r.describe(),
        }
    }

    async fn network_config(&mut self) -> Result<NetworkConfig, RegistryError> {
        match self {
            Self::Embedded(r) => r.network_config().await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.network_config().await,
            Self::Kubernetes(r) => r.network_config().await,
        }
    }

    async fn acquire_lease(
        &mut self,
        config: &NetworkConfig,
        request: &LeaseRequest,
    ) -> Result<OwnLease, RegistryError> {
        match self {
            Self::Embedded(r) => r.acquire_lease(config, request).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.acquire_lease(config, request).await,
            Self::Kubernetes(r) => r.acquire_lease(config, request).await,
        }
    }

    async fn renew_lease(&mut self, lease: &OwnLease) -> Result<OwnLease, RegistryError> {
        match self {
            Self::Embedded(r) => r.renew_lease(lease).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.renew_lease(lease).await,
            Self::Kubernetes(r) => r.renew_lease(lease).await,
        }
    }

    async fn next_event(&mut self, own_subnet: Ipv4Net) -> Result<PeerEvent, RegistryError> {
        match self {
            Self::Embedded(r) => r.next_event(own_subnet).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.next_event(own_subnet).await,
            Self::Kubernetes(r) => r.next_event(own_subnet).await,
        }
    }

    async fn set_autonomy(&mut self, node: &str, autonomy: Autonomy) -> Result<Vec<AutonomyChange>, RegistryError> {
        match self {
            Self::Embedded(r) => r.set_autonomy(node, autonomy).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.set_autonomy(node, autonomy).await,
            Self::Kubernetes(r) => r.set_autonomy(node, autonomy).await,
        }
    }

    async fn node_autonomy(&mut self, node: &str) -> Result<NodeAutonomy, RegistryError> {
        match self {
            Self::Embedded(r) => r.node_autonomy(node).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.node_autonomy(node).await,
            Self::Kubernetes(r) => r.node_autonomy(node).await,
        }
    }
}

impl crate::ReplicaStore for AnyRegistry {
    async fn announce_replica(&mut self, record: &crate::ReplicaRecord) -> Result<(), RegistryError> {
        match self {
            Self::Embedded(r) => r.announce_replica(record).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.announce_replica(record).await,
            Self::Kubernetes(r) => r.announce_replica(record).await,
        }
    }

    async fn replicas(&mut self, now: std::time::SystemTime) -> Result<Vec<crate::ReplicaRecord>, RegistryError> {
        match self {
            Self::Embedded(r) => r.replicas(now).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.replicas(now).await,
            Self::Kubernetes(r) => r.replicas(now).await,
        }
    }

    async fn withdraw_replica(&mut self, id: &str) -> Result<bool, RegistryError> {
        match self {
            Self::Embedded(r) => r.withdraw_replica(id).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.withdraw_replica(id).await,
            Self::Kubernetes(r) => r.withdraw_replica(id).await,
        }
    }
}
