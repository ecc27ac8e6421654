//! The tunnel server on a cloud node: holds the agents' links, and sends
//! each connection to the agent of the node that owns its destination.
//!
//! Identity binds routing: an agent's node name and addresses come from its
//! certificate (`CN=system:node:<name>`, `O=system:nodes`, IP SANs), never
//! from anything the agent says. Front doors, all ending in the same byte
//! stream (kubelet's TLS passes untouched):
//! - the DNAT ports (10263/10264): connections the eBPF tunnel DNAT
//!   redirected; the destination is their original one;
//! - HTTP `CONNECT host:port` on a TLS listener, what kube-apiserver's
//!   egress selector sends; no agent for the host: 503 at once;
//! - plain HTTP on the HTTP door (10264), by `Host`, for clients the DNAT
//!   does not cover (Prometheus on another machine, `curl` by hand).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use ipnet::Ipv4Net;
use tokio::net::TcpListener;

use super::certs;
use super::routes::{LeaseRoute, RouteTable};
use super::tls::Live;
use super::transport::{self, Counted, TunnelStream};
use netd_ebpf::dnat::TunnelDnat;

/// Why a connection could not be tunnelled.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// No agent holds this address.
    #[error("no tunnel agent serves {0}")]
    NoAgent(IpAddr),
    /// No agent for this node name.
    #[error("no tunnel agent for node {0}")]
    NoNode(String),
    /// The agent refused (port or address not allowed there).
    #[error("the agent of node {node} refused {dest}: {reason}")]
    Refused {
        /// Node.
        node: String,
        /// Destination.
        dest: SocketAddr,
        /// The agent's reason.
        reason: String,
    },
    /// The link failed while opening the stream.
    #[error("tunnel link to node {node} failed")]
    Link {
        /// Node.
        node: String,
        /// What h2 reported.
        #[source]
        source: h2::Error,
    },
}

/// Counters the server keeps.
#[derive(Debug, Default)]
pub struct ServerMetrics {
    /// Agents linked now.
    pub agents: AtomicU64,
    /// Streams open now.
    pub streams_open: AtomicU64,
    /// Streams opened in all.
    pub streams_total: AtomicU64,
    /// Connections with no agent for their destination.
    pub no_agent: AtomicU64,
    /// Streams the agent refused.
    pub refused_by_agent: AtomicU64,
    /// Agent links that failed the TLS handshake or carried no node identity.
    pub handshake_failures: AtomicU64,
    /// DNAT front-door connections that carried no original destination.
    pub not_redirected: AtomicU64,
    /// Bytes towards the edge.
    pub bytes_to_edge: AtomicU64,
    /// Bytes from the edge.
    pub bytes_from_edge: AtomicU64,
}

struct Agent {
    link: h2::client::SendRequest<Bytes>,
    addresses: Vec<IpAddr>,
    /// Tells a replaced link's clean-up not to remove its successor.
    serial: u64,
}

/// Node name → its agent's link, and who owns which address ([`RouteTable`]).
#[derive(Default)]
pub struct Router {
    agents: Mutex<HashMap<String, Agent>>,
    routes: Mutex<RouteTable>,
    serial: AtomicU64,
    /// Counters.
    pub metrics: ServerMetrics,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Router {
    fn insert(&self, node: &str, addresses: Vec<IpAddr>, link: h2::client::SendRequest<Bytes>) -> u64 {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        lock(&self.routes).certify(node, &addresses);
        let previous = lock(&self.agents).insert(node.to_string(), Agent { link, addresses, serial });
        if previous.is_none() {
            self.metrics.agents.fetch_add(1, Ordering::Relaxed);
        }
        serial
    }

    fn remove(&self, node: &str, serial: u64) {
        let mut agents = lock(&self.agents);
        if agents.get(node).is_some_and(|agent| agent.serial == serial) {
            if let Some(agent) = agents.remove(node) {
                lock(&self.routes).uncertify(node, &agent.addresses);
            }
            self.metrics.agents.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Nodes with a link now.
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = lock(&self.agents).keys().cloned().collect();
        nodes.sort();
        nodes
    }

    /// The node that owns `ip`: its node address or pod IP, by the
    /// registry's leases or an agent's certificate.
    pub fn node_of(&self, ip: IpAddr) -> Option<String> {
        lock(&self.routes).node_of(ip).map(str::to_string)
    }

    /// A node's address for `CONNECT <node name>:port`: its agent's first
    /// certificate IP, else its lease's.
    pub fn address_of(&self, node: &str) -> Option<IpAddr> {
        let certified = lock(&self.agents).get(node).and_then(|agent| agent.addresses.first().copied());
        certified.or_else(|| lock(&self.routes).lease_address_of(node).map(IpAddr::V4))
    }

    /// The registry's whole lease set (a resync) replaces what was known.
    pub fn replace_leases(&self, routes: impl IntoIterator<Item = LeaseRoute>) {
        lock(&self.routes).replace_leases(routes);
    }

    /// A lease appeared or changed.
    pub fn upsert_lease(&self, route: LeaseRoute) {
        lock(&self.routes).upsert_lease(route);
    }

    /// The lease of `subnet` is gone.
    pub fn remove_lease(&self, subnet: Ipv4Net) {
        lock(&self.routes).remove_lease(subnet);
    }

    /// Opens a tunnelled connection to `dest` through the agent that owns it.
    pub async fn open(&self, dest: SocketAddr) -> Result<TunnelStream, RouteError> {
        let (node, link) = {
            let node = self.node_of(dest.ip());
            let agents = lock(&self.agents);
            match node.and_then(|node| agents.get(&node).map(|agent| (node, agent.link.clone()))) {
                Some(found) => found,
                None => {
                    self.metrics.no_agent.fetch_add(1, Ordering::Relaxed);
                    return Err(RouteError::NoAgent(dest.ip()));
                }
            }
        };
        let link_err = |source| RouteError::Link { node: node.clone(), source };
        let mut link = link.ready().await.map_err(link_err)?;
        let mut request = Request::new(());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() =
            http::Uri::builder().authority(dest.to_string()).build().map_err(|_| RouteError::NoAgent(dest.ip()))?;
        let (response, send) = link.send_request(request, false).map_err(link_err)?;
        let response = response.await.map_err(link_err)?;
        if response.status() != StatusCode::OK {
            self.metrics.refused_by_agent.fetch_add(1, Ordering::Relaxed);
            let reason = response
                .headers()
                .get(super::agent::REFUSAL_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("unknown")
                .to_string();
            return Err(RouteError::Refused { node, dest, reason: format!("{reason} ({})", response.status()) });
        }
        self.metrics.streams_total.fetch_add(1, Ordering::Relaxed);
        Ok(TunnelStream::new(send, response.into_body()))
    }

    /// Copies between a front-door connection and its tunnel stream.
    async fn splice<S>(&self, mut front: S, mut tunnel: TunnelStream)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.metrics.streams_open.fetch_add(1, Ordering::Relaxed);
        // Read from the front door: towards the edge; written to it: from the edge.
        let mut front = Counted::new(&mut front, &self.metrics.bytes_to_edge, &self.metrics.bytes_from_edge);
        let _ = tokio::io::copy_bidirectional(&mut front, &mut tunnel).await;
        self.metrics.streams_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts agents' links forever: mutual TLS (the config must verify
/// client certificates against the CA), the node identity from the
/// certificate, then HTTP/2 as the client.
pub async fn serve_agents(listener: TcpListener, tls: Live<rustls::ServerConfig>, router: Arc<Router>) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else { continue };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
        let router = router.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(err) => {
                    router.metrics.handshake_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("agent link from {peer} refused in the TLS handshake: {err}");
                    return;
                }
            };
            let identity = {
                let (_, session) = tls.get_ref();
                session
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .ok_or_else(|| "no client certificate".to_string())
                    .and_then(|leaf| {
                        let node = certs::node_name_of(leaf.as_ref()).map_err(|e| e.to_string())?;
                        let ips = certs::ip_sans_of(leaf.as_ref()).map_err(|e| e.to_string())?;
                        Ok((node, ips))
                    })
            };
            let (node, addresses) = match identity {
                Ok(identity) => identity,
                Err(reason) => {
                    router.metrics.handshake_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("agent link from {peer} refused: {reason}");
                    return;
                }
            };
            let (link, mut connection) = match transport::server_builder().handshake::<_, Bytes>(tls).await {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!("agent link from {peer} (node {node}) failed to start HTTP/2: {err}");
                    return;
                }
            };
            let serial = router.insert(&node, addresses.clone(), link);
            tracing::info!("tunnel agent of node {node} linked from {peer} (addresses {addresses:?})");
            let mut pings = connection.ping_pong();
            let keepalive = async move {
                loop {
                    tokio::time::sleep(transport::PING_INTERVAL).await;
                    let Some(pinger) = pings.as_mut() else { return };
                    if !matches!(
                        tokio::time::timeout(transport::PING_TIMEOUT, pinger.ping(h2::Ping::opaque())).await,
                        Ok(Ok(_))
                    ) {
                        return;
                    }
                }
            };
            tokio::select! {
                result = connection => if let Err(err) = result {
                    tracing::warn!("tunnel link of node {node} failed: {err}");
                },
                () = keepalive => tracing::warn!("tunnel link of node {node} is dead: no pong"),
            }
            router.remove(&node, serial);
            tracing::info!("tunnel agent of node {node} gone");
        });
    }
}

/// Tunnels one front-door connection to `dest`, for as long as it lasts.
async fn tunnel_to<S>(router: &Router, front: S, dest: SocketAddr, peer: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match router.open(dest).await {
        Ok(tunnel) => router.splice(front, tunnel).await,
        Err(err) => tracing::info!("connection from {peer} to {dest}: {err}"),
    }
}

/// The original destination of a connection the DNAT redirected; `None`
/// when it was not redirected (or its record cannot be read).
fn redirected_to(dnat: &TunnelDnat, front: &tokio::net::TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
    match dnat.original_dst(front) {
        Ok(dest) => dest.map(SocketAddr::V4),
        Err(err) => {
            tracing::warn!("original destination of a connection from {peer}: {err}");
            None
        }
    }
}

/// The DNAT front door: connections the eBPF tunnel DNAT redirected to this
/// listener, tunnelled to their original destination.
pub async fn serve_dnat(listener: TcpListener, dnat: Arc<TunnelDnat>, router: Arc<Router>) {
    loop {
        let Ok((front, peer)) = listener.accept().await else { continue };
        let (dnat, router) = (dnat.clone(), router.clone());
        tokio::spawn(async move {
            let _ = front.set_nodelay(true);
            match redirected_to(&dnat, &front, peer) {
                Some(dest) => tunnel_to(&router, front, dest, peer).await,
                None => {
                    router.metrics.not_redirected.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("connection from {peer} was not redirected by the tunnel DNAT: closed");
                }
            }
        });
    }
}

/// The plain-HTTP door (10264). A connection the DNAT redirected is
/// tunnelled to its original destination as it is. Any other connection
/// is HTTP/1.1 (hyper), each request sent on its own tunnel stream to the
/// node its absolute URI or `Host` names (`node-ip:port`, `node-name:port`,
/// a pod IP; port 80 when none): `curl -H 'Host: 10.0.5.7:10255' …/metrics`,
/// or this door as an HTTP proxy (`curl -x http://door:10264 http://10.0.5.7:10255/…`).
pub async fn serve_http_door(listener: TcpListener, dnat: Option<Arc<TunnelDnat>>, router: Arc<Router>) {
    loop {
        let Ok((front, peer)) = listener.accept().await else { continue };
        let (dnat, router) = (dnat.clone(), router.clone());
        tokio::spawn(async move {
            let _ = front.set_nodelay(true);
            if let Some(dest) = dnat.as_deref().and_then(|dnat| redirected_to(dnat, &front, peer)) {
                return tunnel_to(&router, front, dest, peer).await;
            }
            let metrics = &router.metrics;
            let front = Counted::new(front, &metrics.bytes_to_edge, &metrics.bytes_from_edge);
            let service_router = router.clone();
            let service = hyper::service::service_fn(move |request| proxy_by_host(service_router.clone(), request));
            let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(front), service);
            if let Err(err) = connection.await {
                tracing::debug!("HTTP door client {peer}: {err}");
            }
        });
    }
}

type ProxyBody = http_body_util::Either<Incoming, Empty<Bytes>>;

fn proxy_status(status: StatusCode) -> Response<ProxyBody> {
    let mut response = Response::new(http_body_util::Either::Right(Empty::new()));
    *response.status_mut() = status;
    response
}

/// Where a plain-HTTP request goes, `host:port`: its absolute URI's
/// authority, else its `Host` (port 80 when it names none); `None` when
/// neither is a valid authority.
fn request_authority(request: &Request<Incoming>) -> Option<String> {
    let authority: http::uri::Authority = match request.uri().authority() {
        Some(authority) => authority.clone(),
        None => request.headers().get(http::header::HOST)?.to_str().ok()?.parse().ok()?,
    };
    Some(format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80)))
}

async fn proxy_by_host(
    router: Arc<Router>,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, hyper::Error> {
    let Some(authority) = request_authority(&request) else {
        return Ok(proxy_status(StatusCode::BAD_REQUEST));
    };
    let dest = match connect_target(&router, &authority) {
        Ok(dest) => dest,
        Err(err) => {
            router.metrics.no_agent.fetch_add(1, Ordering::Relaxed);
            tracing::info!("HTTP to {authority}: {err}");
            return Ok(proxy_status(StatusCode::SERVICE_UNAVAILABLE));
        }
    };
    let tunnel = match router.open(dest).await {
        Ok(tunnel) => tunnel,
        Err(err) => {
            tracing::info!("HTTP to {authority}: {err}");
            return Ok(proxy_status(route_status(&err)));
        }
    };
    let (mut sender, connection) = match hyper::client::conn::http1::handshake(TokioIo::new(tunnel)).await {
        Ok(pair) => pair,
        Err(err) => {
            tracing::info!("HTTP to {authority}: {err}");
            return Ok(proxy_status(StatusCode::BAD_GATEWAY));
        }
    };
    let open_router = router.clone();
    tokio::spawn(async move {
        open_router.metrics.streams_open.fetch_add(1, Ordering::Relaxed);
        let _ = connection.await;
        open_router.metrics.streams_open.fetch_sub(1, Ordering::Relaxed);
    });
    // Upstream in origin form, whichever form the client used.
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    *request.uri_mut() = path.parse().unwrap_or_default();
    match sender.send_request(request).await {
        Ok(response) => Ok(response.map(http_body_util::Either::Left)),
        Err(err) => {
            tracing::info!("HTTP to {authority}: {err}");
            Ok(proxy_status(StatusCode::BAD_GATEWAY))
        }
    }
}

fn route_status(err: &RouteError) -> StatusCode {
    match err {
        RouteError::NoAgent(_) | RouteError::NoNode(_) => StatusCode::SERVICE_UNAVAILABLE,
        RouteError::Refused { .. } => StatusCode::FORBIDDEN,
        RouteError::Link { .. } => StatusCode::BAD_GATEWAY,
    }
}

fn plain(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = status;
    response
}

/// `CONNECT host:port` → the destination, by node address or node name.
fn connect_target(router: &Router, authority: &str) -> Result<SocketAddr, RouteError> {
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = authority.rsplit_once(':').ok_or_else(|| RouteError::NoNode(authority.to_string()))?;
    let port: u16 = port.parse().map_err(|_| RouteError::NoNode(authority.to_string()))?;
    let ip = router.address_of(host).ok_or_else(|| RouteError::NoNode(host.to_string()))?;
    Ok(SocketAddr::new(ip, port))
}

async fn handle_connect(
    router: Arc<Router>,
    request: Request<Incoming>,
) -> Result<Response<Empty<Bytes>>, hyper::Error> {
    if request.method() != Method::CONNECT {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED));
    }
    let Some(authority) = request.uri().authority().map(|a| a.as_str().to_string()) else {
        return Ok(plain(StatusCode::BAD_REQUEST));
    };
    let dest = match connect_target(&router, &authority) {
        Ok(dest) => dest,
        Err(err) => {
            router.metrics.no_agent.fetch_add(1, Ordering::Relaxed);
            tracing::info!("CONNECT {authority}: {err}");
            return Ok(plain(StatusCode::SERVICE_UNAVAILABLE));
        }
    };
    // Opened before answering: a refusal is an HTTP status, not a 200 then a reset.
    let tunnel = match router.open(dest).await {
        Ok(tunnel) => tunnel,
        Err(err) => {
            tracing::info!("CONNECT {authority}: {err}");
            return Ok(plain(route_status(&err)));
        }
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(request).await {
            Ok(upgraded) => router.splice(TokioIo::new(upgraded), tunnel).await,
            Err(err) => tracing::info!("CONNECT {authority}: upgrade failed: {err}"),
        }
    });
    Ok(plain(StatusCode::OK))
}

/// The HTTP CONNECT front door on TLS (kube-apiserver's egress selector with
/// `proxyProtocol: HTTPConnect`).
pub async fn serve_connect(listener: TcpListener, tls: Live<rustls::ServerConfig>, router: Arc<Router>) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else { continue };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
        let router = router.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(err) => {
                    tracing::warn!("CONNECT client {peer} refused in the TLS handshake: {err}");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |request| handle_connect(router.clone(), request));
            let connection =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).with_upgrades();
            if let Err(err) = connection.await {
                tracing::debug!("CONNECT client {peer}: {err}");
            }
        });
    }
}
