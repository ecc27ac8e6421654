//! The one Kubernetes client netd has, and the one list+watch machinery on
//! it: the Kubernetes registry's node watch
//! (`netd_registry::kubernetes`) and the pod watch ([`pods`]) both use
//! [`KubeClient`] and [`watch::ListWatch`].
//!
//! - **Client**: kube-rs (`kube::Client`) on hyper + rustls (ring), the
//!   HTTP/TLS stack tonic already brings. [`KubeClient`] builds it from a
//!   [`KubeConfig`] (in-cluster or `kubernetes:<URL>` with a token file and
//!   a CA file), with its own bearer-token layer: the token file is read
//!   again every [`TOKEN_RELOAD`] and right after a 401, because the kubelet
//!   rotates projected service-account tokens in place. Instead of a token,
//!   a client certificate ([`ClientCertFiles`], e.g. the kubelet's own, so
//!   netd acts as its node): its files are looked at every
//!   [`IDENTITY_RECHECK`] and after a 401, and a rotated certificate is used
//!   on a fresh connection pool, without TLS session resumption (the
//!   private `identity` module). Every request but a watch is limited to
//!   30 s; connections time out after 10 s and use TCP keepalive.
//! - **Objects** ([`object`]): decoded leniently ([`object::Object`]): any
//!   JSON an API server sends decodes, keeping only the fields netd reads.
//!   With k8s-openapi's strict types one undecodable object would fail its
//!   whole list page and so stop the watch for good; and a Node's
//!   `status.images` or any object's `managedFields` would be held for
//!   nothing. Bad data is the consumer's to judge, with a precise reason.
//! - **Watch** ([`watch`]): `kube_runtime::watcher` (paginated list with a
//!   consistent read, then a watch from its `resourceVersion`, renewed when
//!   the server ends it, relisted after `410 Gone`), folded into
//!   [`watch::WatchEvent`]s: a complete list, an object applied, an object
//!   deleted. After any error the next event is a fresh complete list.
//!
//! Layering: this crate imports only [`netd_model`] of netd (no SQLite, no
//! netlink, no BPF); `netd-registry` and `netd-dataplane` build on it.

pub mod events;
mod identity;
pub mod object;
pub mod pods;
mod token;
pub mod watch;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::client::ConfigExt;
use tower::ServiceBuilder;

pub use identity::{ClientCertFiles, IDENTITY_RECHECK};
pub use token::TOKEN_RELOAD;

/// The service-account files of a pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Time limit of every request but a watch.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Errors of the Kubernetes client and its watches.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KubeError {
    /// Settings that can never work (URL, CA, token file, node name).
    #[error("{0}")]
    BadConfig(String),
    /// The API server cannot be reached or did not answer in time, or
    /// answered 5xx/429, or a watch broke; retrying later may succeed.
    #[error("{0}")]
    Unreachable(String),
    /// The API server refused the request (4xx other than 404 and 429), or
    /// sent something that is not JSON.
    #[error("{what}: {reason}")]
    Refused {
        /// What was attempted.
        what: String,
        /// Why it failed: `HTTP <status>: <message>`.
        reason: String,
    },
    /// The object changed since it was read (409): read it again.
    #[error("{what}: the object changed meanwhile (HTTP 409 Conflict: {message})")]
    Conflict {
        /// What was attempted.
        what: String,
        /// The API server's message.
        message: String,
    },
    /// The object does not exist (404).
    #[error("{what}: there is no such object")]
    NotFound {
        /// What was looked up.
        what: String,
    },
}

impl KubeError {
    /// True when retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable(_))
    }

    /// The error of a client call: `what` names the request.
    pub fn from_client(what: &str, error: kube::Error) -> Self {
        match error {
            kube::Error::Api(status) => {
                let code = status.code;
                let name = http::StatusCode::from_u16(code).map(|s| s.to_string()).unwrap_or_else(|_| code.to_string());
                let message = status.message.trim();
                let reason = format!("HTTP {name}: {message}");
                if code == 404 {
                    Self::NotFound { what: what.to_string() }
                } else if code == 409 {
                    Self::Conflict { what: what.to_string(), message: message.to_string() }
                } else if code >= 500 || code == 429 {
                    Self::Unreachable(format!("{what}: {reason}"))
                } else {
                    Self::Refused { what: what.to_string(), reason }
                }
            }
            kube::Error::SerdeError(e) => {
                Self::Refused { what: what.to_string(), reason: format!("the response is not JSON: {e}") }
            }
            other => Self::Unreachable(format!("{what}: {}", error_chain(&other))),
        }
    }
}

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
    /// trusts the system's roots.
    pub ca_cert_pem: Option<Vec<u8>>,
    /// Authenticate with this client certificate (re-read when its files
    /// change) instead of a bearer token; `token` and `token_file` are then
    /// not used.
    pub client_cert: Option<ClientCertFiles>,
    /// This node's name (`metadata.name` of its Node object).
    pub node_name: String,
    /// The cluster network (flannel's `Network`); `None` reads flannel's
    /// `net-conf.json` (the Kubernetes registry's concern).
    pub network: Option<ipnet::Ipv4Net>,
}

impl std::fmt::Debug for KubeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeConfig")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("ca_cert_pem", &self.ca_cert_pem.as_ref().map(|pem| format!("<{} bytes>", pem.len())))
            .field("client_cert", &self.client_cert)
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
    pub fn in_cluster() -> Result<Self, KubeError> {
        Self::in_cluster_from(Path::new(SERVICE_ACCOUNT_DIR), |key| std::env::var(key).ok())
    }

    /// [`KubeConfig::in_cluster`] with the service-account directory and
    /// the environment given.
    pub fn in_cluster_from(dir: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Self, KubeError> {
        let server = in_cluster_server(&env)?;
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path)
                .map_err(|e| KubeError::BadConfig(format!("reading the service account's {}: {e}", path.display())))
        };
        let token = String::from_utf8_lossy(&read("token")?).trim().to_string();
        let token_file = Some(dir.join("token"));
        let ca = read("ca.crt")?;
        let node_name =
            match env("NODE_NAME").filter(|n| !n.trim().is_empty()) {
                Some(name) => name.trim().to_string(),
                None => std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_lowercase()).map_err(
                    |e| KubeError::BadConfig(format!("NODE_NAME is not set and the host name is unreadable: {e}")),
                )?,
            };
        Ok(Self {
            server,
            token: Some(token),
            token_file,
            ca_cert_pem: Some(ca),
            client_cert: None,
            node_name,
            network: None,
        })
    }

    /// In-cluster as a node: the API server from `KUBERNETES_SERVICE_HOST`
    /// and `KUBERNETES_SERVICE_PORT`, authenticating with `client_cert`
    /// (no service-account token is read or needed), trusting `ca_file`,
    /// or else the service account's `ca.crt` when one is mounted.
    pub fn in_cluster_with_cert(
        client_cert: ClientCertFiles,
        ca_file: Option<&Path>,
        node_name: &str,
    ) -> Result<Self, KubeError> {
        Self::in_cluster_with_cert_from(client_cert, ca_file, node_name, Path::new(SERVICE_ACCOUNT_DIR), |key| {
            std::env::var(key).ok()
        })
    }

    /// [`KubeConfig::in_cluster_with_cert`] with the service-account
    /// directory and the environment given.
    pub fn in_cluster_with_cert_from(
        client_cert: ClientCertFiles,
        ca_file: Option<&Path>,
        node_name: &str,
        dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, KubeError> {
        let server = in_cluster_server(&env)?;
        let service_account_ca = dir.join("ca.crt");
        let ca_path = ca_file.unwrap_or(&service_account_ca);
        let ca = std::fs::read(ca_path).map_err(|e| {
            KubeError::BadConfig(format!(
                "reading the CA {}: {e} (with a client certificate in a pod, give the cluster CA with --ca-file)",
                ca_path.display()
            ))
        })?;
        Ok(Self {
            server,
            token: None,
            token_file: None,
            ca_cert_pem: Some(ca),
            client_cert: Some(client_cert),
            node_name: node_name.to_string(),
            network: None,
        })
    }
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// The shared Kubernetes client: cheap to clone, every clone uses the same
/// connection pool and bearer token.
///
/// Building it checks the settings and reads the token file; the
/// underlying `kube::Client` is made on first use, inside the async
/// runtime (its request queue is a task on that runtime, so use a client
/// from one runtime only), and [`KubeClient::new`] works anywhere.
#[derive(Clone)]
pub struct KubeClient {
    inner: Arc<Inner>,
}

struct Inner {
    server: String,
    config: kube::Config,
    https: Https,
    token: Arc<token::TokenSource>,
    identity: Option<Arc<identity::IdentitySource>>,
    client: OnceLock<kube::Client>,
}

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeClient").field("server", &self.inner.server).finish_non_exhaustive()
    }
}

impl KubeClient {
    /// A client for `config.server`: checks the URL and the CA PEM and
    /// reads the token file or the client certificate (a missing or empty
    /// one is an error); nothing is contacted.
    pub fn new(config: &KubeConfig) -> Result<Self, KubeError> {
        let root_cert = config.ca_cert_pem.as_deref().map(parse_ca_pem).transpose()?;
        if let Some(files) = &config.client_cert {
            // One identity per client: a token beside the certificate would
            // be a second credential on the wire (the API server takes the
            // certificate first), so it is not sent.
            let identity = Arc::new(identity::IdentitySource::new(files.clone())?);
            return Self::build_with(
                &config.server,
                root_cert,
                false,
                token::TokenSource::new(None, None)?,
                None,
                Some(identity),
            );
        }
        let token = token::TokenSource::new(config.token.clone(), config.token_file.clone())?;
        Self::build(&config.server, root_cert, false, token, None)
    }

    /// The subject common name of the client certificate in use, when the
    /// client authenticates with one (`system:node:<name>` for a node).
    pub fn certificate_identity(&self) -> Option<String> {
        self.inner.identity.as_ref().map(|identity| identity.common_name())
    }

    /// An anonymous client for a joining node's discovery of the cluster
    /// (`kube-public/cluster-info`, which anyone may read). With `ca_pem`,
    /// the server must chain to it. Without, **any** server certificate is
    /// accepted: only for the first read of cluster-info, whose content the
    /// caller trusts by its token signature and CA pin, never by the
    /// connection (`netd::join::discovery`).
    pub fn for_discovery(server: &str, ca_pem: Option<&[u8]>) -> Result<Self, KubeError> {
        let root_cert = ca_pem.map(parse_ca_pem).transpose()?;
        let accept_any = root_cert.is_none();
        Self::build(server, root_cert, accept_any, token::TokenSource::new(None, None)?, None)
    }

    /// A client that authenticates with a client certificate (a joined
    /// node's `system:node:<name>` identity), trusting `ca_pem`.
    pub fn with_identity(server: &str, ca_pem: &[u8], cert_pem: &str, key_pem: &str) -> Result<Self, KubeError> {
        use base64::Engine as _;
        let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
        // Through the kubeconfig's own fields: kube-rs builds the TLS
        // identity from them, and the key stays a secret string there.
        let auth_info: kube::config::AuthInfo = serde_json::from_value(serde_json::json!({
            "client-certificate-data": b64(cert_pem),
            "client-key-data": b64(key_pem),
        }))
        .map_err(|e| KubeError::BadConfig(format!("client certificate: {e}")))?;
        let root_cert = Some(parse_ca_pem(ca_pem)?);
        Self::build(server, root_cert, false, token::TokenSource::new(None, None)?, Some(auth_info))
    }

    fn build(
        server: &str,
        root_cert: Option<Vec<Vec<u8>>>,
        accept_invalid_certs: bool,
        token: token::TokenSource,
        auth_info: Option<kube::config::AuthInfo>,
    ) -> Result<Self, KubeError> {
        Self::build_with(server, root_cert, accept_invalid_certs, token, auth_info, None)
    }

    fn build_with(
        server: &str,
        root_cert: Option<Vec<Vec<u8>>>,
        accept_invalid_certs: bool,
        token: token::TokenSource,
        auth_info: Option<kube::config::AuthInfo>,
        identity: Option<Arc<identity::IdentitySource>>,
    ) -> Result<Self, KubeError> {
        let trimmed = server.trim_end_matches('/').to_string();
        if !(trimmed.starts_with("https://") || trimmed.starts_with("http://")) {
            return Err(KubeError::BadConfig(format!("API server {server:?} is not an http(s) URL")));
        }
        let uri: http::Uri = trimmed
            .parse()
            .map_err(|e| KubeError::BadConfig(format!("API server {server:?} is not a valid URL: {e}")))?;
        let mut kube_config = kube::Config::new(uri);
        kube_config.root_cert = root_cert;
        kube_config.accept_invalid_certs = accept_invalid_certs;
        if let Some(auth_info) = auth_info {
            kube_config.auth_info = auth_info;
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_keepalive(Some(TCP_KEEPALIVE));
        http.set_nodelay(true);
        let https = match &identity {
            None => kube_config
                .rustls_https_connector_with_connector(http)
                .map_err(|e| KubeError::BadConfig(format!("TLS settings: {}", error_chain(&e))))?,
            Some(identity) => {
                // kube-rs's TLS settings (roots, verification), with the
                // client certificate chosen per handshake from the files.
                let mut tls = kube_config
                    .rustls_client_config()
                    .map_err(|e| KubeError::BadConfig(format!("TLS settings: {}", error_chain(&e))))?;
                tls.client_auth_cert_resolver = Arc::new(identity::Resolver(identity.clone()));
                // No TLS session resumption: a resumed session keeps the
                // client certificate of the handshake that made it, so a
                // new connection after a rotation would still be the old
                // identity. Connections are pooled: full handshakes are rare.
                tls.resumption = rustls::client::Resumption::disabled();
                hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(http)
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                server: trimmed,
                config: kube_config,
                https,
                token: Arc::new(token),
                identity,
                client: OnceLock::new(),
            }),
        })
    }

    /// The API server URL, without a trailing slash.
    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// The kube-rs client (made on first call; call it from within the
    /// async runtime).
    pub fn client(&self) -> kube::Client {
        self.inner
            .client
            .get_or_init(|| {
                let http = Reconnecting::new(self.inner.https.clone(), self.inner.identity.clone());
                let service = ServiceBuilder::new()
                    .layer(self.inner.config.base_uri_layer())
                    .layer(token::BearerLayer::new(self.inner.token.clone()))
                    .service(http);
                kube::Client::new(service, self.inner.config.default_namespace.clone())
            })
            .clone()
    }
}

type Hyper = hyper_util::client::legacy::Client<Https, kube::client::Body>;

/// The HTTP client under kube-rs: one hyper connection pool, replaced by a
/// new one when the client certificate changed (the API server
/// authenticates a request by the certificate its connection was opened
/// with, so pooled connections would go on as the old identity). Without a
/// client certificate it is the one pool for good.
#[derive(Clone)]
struct Reconnecting {
    https: Https,
    identity: Option<Arc<identity::IdentitySource>>,
    /// The identity generation the pool was made for, and the pool.
    pool: Arc<std::sync::Mutex<(u64, Hyper)>>,
}

impl Reconnecting {
    fn new(https: Https, identity: Option<Arc<identity::IdentitySource>>) -> Self {
        let generation = identity.as_ref().map_or(0, |i| i.generation());
        let pool = Self::pool(&https);
        Self { https, identity, pool: Arc::new(std::sync::Mutex::new((generation, pool))) }
    }

    fn pool(https: &Https) -> Hyper {
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https.clone())
    }

    /// The pool for the identity in use, after looking at its files when due.
    async fn current(&self) -> Hyper {
        let Some(identity) = &self.identity else {
            return self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner).1.clone();
        };
        identity.refresh_if_due().await;
        let generation = identity.generation();
        let mut pool = self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if pool.0 != generation {
            // The old pool's idle connections close when its last request
            // (a watch, say) ends.
            *pool = (generation, Self::pool(&self.https));
        }
        pool.1.clone()
    }
}

impl tower::Service<http::Request<kube::client::Body>> for Reconnecting {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = tower::BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        // hyper's legacy client is always ready: it queues per connection.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let pool = this.current().await;
            let response = pool.request(request).await?;
            if response.status() == http::StatusCode::UNAUTHORIZED {
                if let Some(identity) = &this.identity {
                    identity.refused();
                }
            }
            Ok(response)
        })
    }
}

/// Runs a client call with [`REQUEST_TIMEOUT`]; `what` names it in errors.
pub async fn call<T>(
    what: &str,
    request: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, KubeError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(result) => result.map_err(|e| KubeError::from_client(what, e)),
        Err(_) => Err(KubeError::Unreachable(format!("{what}: no answer within {}s", REQUEST_TIMEOUT.as_secs()))),
    }
}

/// The DER certificates of a PEM bundle; none, or a broken one, is an error.
fn parse_ca_pem(pem: &[u8]) -> Result<Vec<Vec<u8>>, KubeError> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .map(|cert| cert.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| KubeError::BadConfig(format!("CA certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(KubeError::BadConfig("CA certificate PEM holds no certificate".into()));
    }
    Ok(certs)
}

/// Node names are DNS subdomains (RFC 1123): safe in a URL path as they are.
pub fn check_node_name(name: &str) -> Result<(), KubeError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(KubeError::BadConfig(format!("node name {name:?} is not a valid Kubernetes node name")))
    }
}

/// An error and its sources, `: `-joined (hyper's and rustls's own texts
/// are terse; the cause is in the sources).
pub fn error_chain(error: &dyn std::error::Error) -> String {
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

/// The API server in a pod: `https://KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT`.
fn in_cluster_server(env: &impl Fn(&str) -> Option<String>) -> Result<String, KubeError> {
    let var = |key: &str| {
        env(key)
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| KubeError::BadConfig(format!("{key} is not set: not running in a Kubernetes pod?")))
    };
    let host = var("KUBERNETES_SERVICE_HOST")?;
    let port = var("KUBERNETES_SERVICE_PORT")?;
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    Ok(format!("https://{host}:{}", port.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let config = |server: &str| KubeConfig {
            server: server.into(),
            token: None,
            token_file: None,
            ca_cert_pem: None,
            client_cert: None,
            node_name: "a".into(),
            network: None,
        };
        assert!(KubeClient::new(&config("ftp://x")).unwrap_err().to_string().contains("not an http(s) URL"));
        assert!(KubeClient::new(&config("https://bad host")).is_err());
        let mut with_ca = config("https://x");
        with_ca.ca_cert_pem = Some(b"not a pem".to_vec());
        assert!(KubeClient::new(&with_ca).unwrap_err().to_string().contains("no certificate"));
        assert!(check_node_name("A/../b").is_err());
        assert!(check_node_name("edge-1.example").is_ok());
        let client = KubeClient::new(&config("https://127.0.0.1:6443/")).unwrap();
        assert_eq!(client.server(), "https://127.0.0.1:6443");
    }

    #[test]
    fn api_errors_are_sorted_by_what_retrying_can_do() {
        let api = |code: u16, message: &str| {
            let status = kube::core::Status::failure(message, "Test").with_code(code);
            KubeError::from_client("GET /api/v1/nodes/x", kube::Error::Api(status.boxed()))
        };
        let err = api(401, "Unauthorized");
        assert_eq!(err.to_string(), "GET /api/v1/nodes/x: HTTP 401 Unauthorized: Unauthorized");
        assert!(!err.is_transient());
        assert!(matches!(api(404, "nodes \"x\" not found"), KubeError::NotFound { .. }));
        assert!(api(503, "etcd down").is_transient());
        assert!(api(429, "slow down").is_transient());
    }
}
