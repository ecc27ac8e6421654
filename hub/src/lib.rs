//! The edge hub: a caching proxy between a node's kubelet (and netd) and
//! kube-apiserver, so that an autonomous node rebooted while the cloud is
//! unreachable still gets its pods, their ConfigMaps and Secrets, its Node
//! and Services from a local cache, and its kubelet starts its pods.
//! OpenYurt's yurthub is the reference; the differences are said below.
//!
//! # Shape
//!
//! - **Its own process** (`netd hub`): after a reboot with the cloud down
//!   the kubelet can start only static pods, so the hub must not be a pod
//!   the kubelet has to fetch from the API first; it runs as a host
//!   service or a static pod (written by `netd-join`). The entry point is
//!   [`run`] on the caller's runtime.
//! - **Loopback only**: [`HubConfig::listen`] must be a loopback address
//!   (default `127.0.0.1:10261`), and so must the metrics port
//!   (default `127.0.0.1:10269`).
//! - **Upstream as the node**: requests go to kube-apiserver with the
//!   node's client certificate ([`netd_kube::ClientCertFiles`], the
//!   kubelet's `kubelet-client-current.pem`, followed through rotations by
//!   [`KubeClient`]); the client's own `Authorization` and `Impersonate-*`
//!   headers are dropped.
//! - **Downstream authenticated** (yurthub serves plain HTTP to any local
//!   process): HTTPS with a serving certificate from the hub's own CA
//!   (`<cache-dir>/pki/ca.crt`, see [`pki`]), and a client certificate
//!   chained to the cluster CA whose common name is
//!   `system:node:<this node>`: the kubelet's own. A certificate from
//!   another CA fails the handshake; no certificate or another identity
//!   gets 403. All are counted (`netd_hub_refused_total{reason}`).
//! - **Only this node's data**: a list or watch of pods without
//!   `fieldSelector=spec.nodeName=<this node>`, or a get of a pod bound
//!   elsewhere, is refused (403) and nothing of it is cached. Other
//!   resources are what the node authorizer lets the node read.
//!
//! # Cache
//!
//! Reads (get, list, watch) of the resources in
//! [`request::CACHED_RESOURCES`] are cached, one file per object with a
//! checksummed header ([`store`]); discovery documents and `/version` are
//! cached whole (kubectl needs them). The hub asks kube-apiserver for JSON
//! whatever the client accepts: the kubelet prefers protobuf, but accepts
//! JSON and decodes by the response's content type; reading protobuf would
//! need the Kubernetes schemas. Requests for a `Table` (kubectl's default
//! output) are forwarded as they are and not cached.
//!
//! - A complete list from the cloud (no `continue` in the request or the
//!   answer) **replaces** the cached objects of its scope (namespace,
//!   field and label selectors): objects deleted meanwhile disappear. A page
//!   of a paginated list, or a list whose field selector the hub cannot
//!   evaluate, only adds (yurthub learnt both the hard way: an empty
//!   `metadata.name=` list or one page must not prune a whole collection).
//! - Watch events are applied in order as they are streamed to the client
//!   (`ADDED`/`MODIFIED` written, `DELETED` removed); a 404 to a get
//!   removes the object.
//! - A failed cache write (disk full) is logged and counted
//!   (`netd_hub_cache_write_failures_total`); the response still goes to
//!   the client and what is cached keeps being served.
//!
//! # Offline
//!
//! The cloud is unreachable when a request to it fails to connect, gets no
//! response head within [`HubConfig::upstream_timeout`], or gets a 5xx; and
//! a background probe of `/readyz` every [`HubConfig::probe_interval`]
//! flips the `netd_hub_cloud_reachable` gauge back (at once after a failed
//! request). While unreachable:
//!
//! - a get is answered from the cache; a list too, rebuilt from the cached
//!   objects honouring namespace, `fieldSelector` (`metadata.name`,
//!   `metadata.namespace`, `spec.nodeName`) and `labelSelector`, with the
//!   newest `resourceVersion` the hub saw for it, in the JSON shape
//!   kube-apiserver sends, but only when a list the cloud answered covers
//!   that scope ("never listed" is a 503, not an empty list);
//! - a watch is accepted and sends nothing: the list the client just got
//!   is the whole state. It ends when its `timeoutSeconds` pass or when the
//!   cloud is back; the client (client-go's reflector, kubelet 1.20 included)
//!   then watches again from its last `resourceVersion`, now through the
//!   cloud, which replays what happened meanwhile or answers 410 Gone, upon
//!   which the reflector lists again (through the hub: the cache is
//!   replaced). A `sendInitialEvents` watch is refused (400) so that newer
//!   clients fall back to list+watch;
//! - writes and uncached reads get 503 with a `Status` body; the kubelet
//!   retries.
//!
//! # Autonomy
//!
//! By default ([`CacheMode::Auto`]) the hub follows its node's autonomy
//! annotation ([`autonomy`]): autonomous, it caches and answers offline as
//! above; not autonomous, it is a plain pass-through (authenticated and
//! confined as above, nothing cached, nothing answered offline) and its
//! cache is removed. `--cache=true` / `--cache=false` override the
//! annotation ([`HubConfig::cache`]).
//!
//! # Before the kubelet
//!
//! The kubelet reads its kubeconfig's CA file when it starts, so the hub's
//! CA must exist first: [`init_pki`] (`netd hub --init`, and `netd-join`
//! in its own transaction) makes it and nothing else.

pub mod autonomy;
pub mod metrics;
pub mod pki;
pub mod proxy;
pub mod request;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Notify, Semaphore};
use tokio::task::JoinSet;

use netd_kube::{ClientCertFiles, KubeClient, KubeConfig, KubeError};

pub use autonomy::CacheMode;
pub use metrics::HubMetrics;

/// Default downstream address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10261";
/// Default metrics address.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:10269";
/// Default cache directory.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/netd/hub";
/// Default interval of the health probe.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Default time for kube-apiserver to send a response head.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on downstream connections (each kubelet watch is one).
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Time for a client to finish its TLS handshake, and to send a request head.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// This node's name: clients must be `system:node:<node_name>`.
    pub node_name: String,
    /// kube-apiserver's URL.
    pub server: String,
    /// The CA that signs kube-apiserver's serving certificate.
    pub ca_file: PathBuf,
    /// The CA clients' certificates must chain to; `None`: [`HubConfig::ca_file`].
    pub client_ca_file: Option<PathBuf>,
    /// The node's client certificate (and key) towards kube-apiserver.
    pub client_cert: ClientCertFiles,
    /// Where clients connect (loopback only).
    pub listen: SocketAddr,
    /// `/metrics` (loopback only); `None`: none.
    pub metrics_listen: Option<SocketAddr>,
    /// The cache and the hub's CA (`pki/`).
    pub cache_dir: PathBuf,
    /// When to cache and serve offline (default: as the node's autonomy
    /// annotation says).
    pub cache: CacheMode,
    /// Interval of the `/readyz` probe.
    pub probe_interval: Duration,
    /// Time for kube-apiserver to send a response head.
    pub upstream_timeout: Duration,
    /// Downstream connections at once.
    pub max_connections: usize,
}

impl HubConfig {
    /// The defaults, for `node_name` talking to `server` with `ca_file` and `client_cert`.
    pub fn new(node_name: &str, server: &str, ca_file: PathBuf, client_cert: ClientCertFiles) -> Self {
        Self {
            node_name: node_name.to_string(),
            server: server.to_string(),
            ca_file,
            client_ca_file: None,
            client_cert,
            listen: SocketAddr::from(([127, 0, 0, 1], 10261)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 10269))),
            cache_dir: PathBuf::from(DEFAULT_CACHE_DIR),
            cache: CacheMode::Auto,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Errors that stop the hub.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Settings that cannot work.
    #[error("{0}")]
    BadConfig(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        error: std::io::Error,
    },
    /// The cache directory's mode could not be set.
    #[error("setting the mode of the hub's cache directory {}: {source}", dir.display())]
    CacheMode {
        /// The cache directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// kube-apiserver's CA file cannot be read.
    #[error("reading kube-apiserver's CA {}: {source}", path.display())]
    UpstreamCa {
        /// The CA file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The hub's CA or TLS settings.
    #[error("the hub's TLS: {0}")]
    Pki(#[from] pki::PkiError),
    /// The cache directory.
    #[error("the hub's cache: {0}")]
    Store(#[from] store::StoreError),
    /// The upstream client's settings.
    #[error("the upstream client: {0}")]
    Kube(#[from] KubeError),
    /// Start-up work on a blocking thread did not finish.
    #[error("start-up was interrupted: {0}")]
    Interrupted(#[source] tokio::task::JoinError),
}

/// The directory of the hub's CA in its cache directory.
pub fn pki_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("pki")
}

/// What [`init_pki`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PkiInit {
    /// A valid CA was there and is kept.
    Kept(PathBuf),
    /// A new CA was made.
    Created(PathBuf),
}

impl PkiInit {
    /// The CA certificate's path (the kubelet's kubeconfig names it).
    pub fn ca_cert(&self) -> &Path {
        match self {
            Self::Kept(path) | Self::Created(path) => path,
        }
    }
}

/// Makes the hub's CA (`<cache_dir>/pki/ca.crt`, `ca.key`; the cache
/// directory 0700, the key 0600) unless a valid one is there, which is
/// kept; a CA that is there but does not load is an error, never replaced
/// (a kubelet may trust it already). Blocks (file I/O, key generation):
/// for start-up and `netd hub --init`.
pub fn init_pki(cache_dir: &Path) -> Result<PkiInit, HubError> {
    use std::os::unix::fs::PermissionsExt as _;
    netd_model::atomic_file::create_dirs(cache_dir, store::DIR_MODE).map_err(pki::PkiError::from)?;
    // create_dirs leaves an existing directory's mode as it is; the cache
    // holds Secrets.
    std::fs::set_permissions(cache_dir, std::fs::Permissions::from_mode(store::DIR_MODE))
        .map_err(|source| HubError::CacheMode { dir: cache_dir.to_path_buf(), source })?;
    let dir = pki_dir(cache_dir);
    if let Some(ca) = pki::HubCa::load(&dir)? {
        return Ok(PkiInit::Kept(ca.cert_path().to_path_buf()));
    }
    let ca = pki::HubCa::load_or_create(&dir)?;
    Ok(PkiInit::Created(ca.cert_path().to_path_buf()))
}

fn check_loopback(what: &str, addr: SocketAddr) -> Result<(), HubError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(HubError::BadConfig(format!(
            "{what} {addr} is not a loopback address: the hub serves only this node's own clients \
             (use 127.0.0.1 or ::1)"
        )))
    }
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, HubError> {
    tokio::task::spawn_blocking(work).await.map_err(HubError::Interrupted)
}

/// Aborts its tasks when dropped (the hub's own background work).
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Runs the hub until `shutdown` completes (then it stops accepting and
/// drops every connection) or it cannot go on. Uses the caller's runtime;
/// installs no signal handler.
///
/// ```no_run
/// # async fn example() -> Result<(), netd_hub::HubError> {
/// use netd_hub::{run, HubConfig};
/// use netd_kube::ClientCertFiles;
/// let cert = ClientCertFiles { cert: "/var/lib/kubelet/pki/kubelet-client-current.pem".into(), key: None };
/// let config = HubConfig::new("edge-1", "https://10.0.0.1:6443", "/etc/kubernetes/pki/ca.crt".into(), cert);
/// run(config, async { let _ = tokio::signal::ctrl_c().await; }).await
/// # }
/// ```
pub async fn run(config: HubConfig, shutdown: impl Future<Output = ()>) -> Result<(), HubError> {
    check_loopback("--listen", config.listen)?;
    if let Some(addr) = config.metrics_listen {
        check_loopback("--metrics-listen", addr)?;
    }
    netd_kube::check_node_name(&config.node_name)?;
    let metrics = Arc::new(HubMetrics::default());

    // Start-up file work (small files, once) off the runtime's threads.
    let (store, ca, client_ca, client, autonomous) = {
        let config = config.clone();
        let metrics = metrics.clone();
        blocking(move || -> Result<_, HubError> {
            let store = store::Store::open(&config.cache_dir, metrics)?;
            let ca = pki::HubCa::load_or_create(&pki_dir(&config.cache_dir))?;
            let client_ca = pki::read_certs(config.client_ca_file.as_ref().unwrap_or(&config.ca_file))?;
            let ca_pem = std::fs::read(&config.ca_file)
                .map_err(|source| HubError::UpstreamCa { path: config.ca_file.clone(), source })?;
            let client = KubeClient::new(&KubeConfig {
                server: config.server.clone(),
                token: None,
                token_file: None,
                ca_cert_pem: Some(ca_pem),
                client_cert: Some(config.client_cert.clone()),
                node_name: config.node_name.clone(),
                network: None,
            })?;
            let autonomous = match config.cache {
                CacheMode::Always => true,
                CacheMode::Never => false,
                // What the Node said last; asked again at once (see FIRST_LOOK).
                CacheMode::Auto => autonomy::read_state(&config.cache_dir),
            };
            Ok((store, ca, client_ca, client, autonomous))
        })
        .await??
    };
    let expected = format!("system:node:{}", config.node_name);
    match client.certificate_identity() {
        Some(identity) if identity == expected => {}
        other => tracing::warn!(
            certificate = other.as_deref().unwrap_or(""),
            expected,
            "the client certificate is not this node's: kube-apiserver will see another identity"
        ),
    }
    let ca = Arc::new(ca);
    let serving = Arc::new(pki::ServingCert::new(ca.issue_serving()?));
    let tls = pki::server_config(&client_ca, serving.clone(), metrics.clone())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);

    let (reachable, _) = watch::channel(false);
    let (caching, _) = watch::channel(false);
    let hub = Arc::new(proxy::Hub {
        node: config.node_name.clone(),
        identity: expected,
        client,
        store: (config.cache != CacheMode::Never).then_some(store.clone()),
        caching,
        relisted: std::sync::Mutex::default(),
        metrics: metrics.clone(),
        reachable,
        probe_now: Notify::new(),
        upstream_timeout: config.upstream_timeout,
    });

    let listener =
        TcpListener::bind(config.listen).await.map_err(|error| HubError::Listen { addr: config.listen, error })?;
    let mut tasks = Tasks(Vec::new());
    if let Some(addr) = config.metrics_listen {
        let metrics_listener = TcpListener::bind(addr).await.map_err(|error| HubError::Listen { addr, error })?;
        let (metrics, store) = (metrics.clone(), store.clone());
        tasks.0.push(tokio::spawn(netd_metrics::serve_text(metrics_listener, move |path| {
            let (metrics, store) = (metrics.clone(), store.clone());
            async move {
                match path.as_str() {
                    "/metrics" => {
                        let (objects, bytes) =
                            tokio::task::spawn_blocking(move || store.usage()).await.unwrap_or((0, 0));
                        (http::StatusCode::OK, metrics.render(objects, bytes))
                    }
                    "/healthz" => (http::StatusCode::OK, "ok\n".to_string()),
                    _ => (http::StatusCode::NOT_FOUND, "not found\n".to_string()),
                }
            }
        })));
    }
    // A first look at the cloud and at the node's autonomy before serving,
    // both at once: a kubelet's first list should not be answered from the
    // cache only because nobody looked yet, and should land in the cache of
    // a node just made autonomous. A cloud that does not answer is not
    // waited out (two probe timeouts, 10 s of a reboot with the cloud
    // away): after FIRST_LOOK the hub serves in the remembered mode, its
    // look still under way.
    hub.set_caching(autonomous, "as at start");
    let (probed_tx, probed) = oneshot::channel::<()>();
    tasks.0.push(tokio::spawn({
        let (hub, interval) = (hub.clone(), config.probe_interval);
        async move {
            probe_once(&hub, interval).await;
            let _ = probed_tx.send(());
            probe_loop(hub, interval).await;
        }
    }));
    let (checked_tx, checked) = oneshot::channel::<()>();
    if config.cache == CacheMode::Auto {
        let (hub, cache_dir, interval) = (hub.clone(), config.cache_dir.clone(), config.probe_interval);
        tasks.0.push(tokio::spawn(async move {
            check_autonomy(&hub, &cache_dir, interval).await;
            let _ = checked_tx.send(());
            follow_autonomy(hub, cache_dir, interval).await;
        }));
    } else {
        drop(checked_tx);
    }
    let first_look = async {
        let _ = probed.await;
        let _ = checked.await;
    };
    if tokio::time::timeout(FIRST_LOOK, first_look).await.is_err() {
        tracing::info!(
            waited = ?FIRST_LOOK,
            autonomous = hub.metrics.autonomous(),
            "the cloud has not answered yet: serving in the remembered mode while the probe goes on"
        );
    }
    tasks.0.push(tokio::spawn(renew_serving(ca.clone(), serving)));
    tracing::info!(
        listen = %config.listen,
        server = %config.server,
        cache = %config.cache_dir.display(),
        cache_mode = %config.cache,
        autonomous = hub.metrics.autonomous(),
        hub_ca = %ca.cert_path().display(),
        "edge hub serving"
    );

    let limit = Arc::new(Semaphore::new(config.max_connections));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next() => continue,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, _)) = accepted else { continue };
        // A streamed answer ends in a small last chunk: without this, Nagle
        // holds it for the client's delayed ACK (40 ms a request).
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!("too many connections ({}): one refused", config.max_connections);
            continue;
        };
        let (hub, acceptor) = (hub.clone(), acceptor.clone());
        connections.spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let peer: Option<Arc<str>> = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| pki::common_name(leaf).unwrap_or_default().into());
            let service = hyper::service::service_fn(move |request| {
                let (hub, peer) = (hub.clone(), peer.clone());
                async move { Ok::<_, std::convert::Infallible>(hub.handle(peer, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
    connections.shutdown().await;
    drop(tasks);
    tracing::info!("edge hub stopped");
    Ok(())
}

/// How long the hub waits, before serving, for its first look at the cloud
/// and the node's autonomy: a cloud that answers does so well within it.
const FIRST_LOOK: Duration = Duration::from_secs(1);

/// Asks `/readyz`: any answer below 500 within the interval is a reachable cloud.
async fn probe_once(hub: &proxy::Hub, interval: Duration) {
    let timeout = interval.clamp(Duration::from_secs(1), Duration::from_secs(5));
    let mut request = http::Request::new(kube::client::Body::from(Vec::new()));
    *request.uri_mut() = http::Uri::from_static("/readyz");
    let outcome = tokio::time::timeout(timeout, hub.client.client().send(request)).await;
    match outcome {
        Ok(Ok(response)) if !response.status().is_server_error() => {
            use http_body_util::BodyExt as _;
            let _ = tokio::time::timeout(timeout, response.into_body().collect()).await;
            hub.set_reachable(true, "");
        }
        Ok(Ok(response)) => hub.set_reachable(false, &format!("/readyz answered {}", response.status())),
        Ok(Err(error)) => hub.set_reachable(false, &netd_kube::error_chain(&error)),
        Err(_) => hub.set_reachable(false, &format!("/readyz did not answer within {timeout:?}")),
    }
}

async fn probe_loop(hub: Arc<proxy::Hub>, interval: Duration) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = hub.probe_now.notified() => {
                // A failed request just flipped the gauge: give the cloud
                // a moment before asking again.
                tokio::time::sleep(interval.min(Duration::from_secs(1))).await;
            }
        }
        probe_once(&hub, interval).await;
    }
}

/// Reads the node's Node and sets the hub's mode from its autonomy
/// annotation; remembers it on disk; removes the cache when not
/// autonomous. While the cloud does not answer, the mode stays.
async fn check_autonomy(hub: &proxy::Hub, cache_dir: &Path, interval: Duration) {
    let timeout = interval.clamp(Duration::from_secs(1), Duration::from_secs(5));
    let path = format!("/api/v1/nodes/{}", hub.node);
    let request = match http::Request::get(path.as_str()).body(Vec::new()) {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(%error, path, "cannot build the request for the node's autonomy");
            return;
        }
    };
    let client = hub.client.client();
    let autonomous = match tokio::time::timeout(timeout, client.request::<serde_json::Value>(request)).await {
        Ok(Ok(node)) => autonomy::node_is_autonomous(&node),
        // No Node (yet): a new edge node, not autonomous (SPEC §4).
        Ok(Err(kube::Error::Api(status))) if status.code == 404 => false,
        Ok(Err(error)) => {
            tracing::debug!(error = %netd_kube::error_chain(&error), "the node's autonomy is unknown: mode kept");
            return;
        }
        Err(_) => {
            tracing::debug!("the node's autonomy is unknown (no answer in time): mode kept");
            return;
        }
    };
    let why = if autonomous { "the Node's autonomy annotation is on" } else { "the Node is not annotated autonomous" };
    hub.set_caching(autonomous, why);
    let Some(store) = hub.store.clone() else { return };
    let dir = cache_dir.to_path_buf();
    let done = tokio::task::spawn_blocking(move || -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if autonomy::read_state(&dir) != autonomous || !dir.join(autonomy::STATE_FILE).exists() {
            autonomy::write_state(&dir, autonomous)?;
        }
        // Each time, not only at the flip: an answer that was on its way
        // at the flip may have written one object after the removal.
        if !autonomous && store.has_data() {
            store.clear()?;
            tracing::info!(cache = %dir.display(), "not autonomous: the hub's cache is removed");
        }
        Ok(())
    })
    .await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "following the node's autonomy on disk failed (retried)"),
        Err(error) => tracing::warn!(%error, "following the node's autonomy on disk was interrupted"),
    }
}

async fn follow_autonomy(hub: Arc<proxy::Hub>, cache_dir: PathBuf, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        check_autonomy(&hub, &cache_dir, interval).await;
    }
}

async fn renew_serving(ca: Arc<pki::HubCa>, serving: Arc<pki::ServingCert>) {
    loop {
        tokio::time::sleep(pki::SERVING_RENEW).await;
        let ca = ca.clone();
        match tokio::task::spawn_blocking(move || ca.issue_serving()).await {
            Ok(Ok(key)) => serving.renew(key),
            Ok(Err(error)) => tracing::warn!(%error, "cannot renew the hub's serving certificate (kept the old one)"),
            Err(_) => {}
        }
    }
}
