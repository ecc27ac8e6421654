//! The tunnel agent on an edge node: dials out to every tunnel server it is
//! given, keeps each link up, and serves the server's `CONNECT` streams by
//! dialling its own node — only its own addresses and pod subnets (loopback
//! only when configured), only the allowed ports.
//!
//! Several server replicas may answer one address (a load balancer): each
//! link learns which replica it reached from the replica's status stream
//! ([`super::replica`]), and the agent dials each address again, with
//! jitter, until it holds a live link to as many distinct replicas as they
//! say there are; a link that lands on a replica it already holds is
//! closed at once.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use ipnet::IpNet;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use super::mux::{self, MuxError};
use super::readahead::ReadAhead;
use super::replica::{Claim, LinkSet, ReplicaStatus};
use super::tls::Live;
use super::transport::{self, backoff, Counted, TunnelStream, REFUSAL_HEADER};
pub use super::transport::{BACKOFF_BASE, BACKOFF_CAP};

/// A link that stayed up this long resets the backoff.
const STABLE_LINK: Duration = Duration::from_secs(10);
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Dialling a local destination: well under the server's wait for an
/// answer ([`super::limits::DEFAULT_OPEN_TIMEOUT`]), so the server hears
/// why instead of timing out.
const LOCAL_DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of one agent link.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// TCP to the server failed.
    #[error("dialling tunnel server {server} failed")]
    Dial {
        /// The server.
        server: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (certificate refused either way, protocol).
    #[error("TLS handshake with tunnel server {server} failed")]
    Tls {
        /// The server.
        server: String,
        /// What rustls reported.
        #[source]
        source: std::io::Error,
    },
    /// HTTP/2 failed on the link.
    #[error("tunnel link to {server} failed")]
    Link {
        /// The server.
        server: String,
        /// What h2 reported.
        #[source]
        source: h2::Error,
    },
    /// `netd-mux/1` failed on the link.
    #[error("tunnel link to {server} failed")]
    Mux {
        /// The server.
        server: String,
        /// What the link reported.
        #[source]
        source: MuxError,
    },
    /// The link reached a replica this agent already holds a link to.
    #[error("tunnel link to {server} reached replica {replica}, which this agent is already linked to")]
    Duplicate {
        /// The server.
        server: String,
        /// The replica.
        replica: String,
    },
    /// No pong within the timeout.
    #[error("tunnel link to {server} is dead: no pong within {timeout:?}")]
    DeadLink {
        /// The server.
        server: String,
        /// The timeout.
        timeout: Duration,
    },
}

/// What an agent does.
#[derive(Clone)]
pub struct AgentConfig {
    /// Tunnel servers, `host:port`; the agent keeps a link to each.
    pub servers: Vec<String>,
    /// The name the servers' certificate must carry.
    pub server_name: ServerName<'static>,
    /// TLS client settings: this node's certificate and the CA (each new
    /// link takes the current ones).
    pub tls: Live<rustls::ClientConfig>,
    /// This node's addresses: the only non-loopback destinations it dials.
    pub own_addresses: Vec<IpAddr>,
    /// Pod subnets of this node, also dialled (pulling pod metrics); live,
    /// because netd may write the node's subnet after the agent started.
    pub pod_subnets: Live<Vec<IpNet>>,
    /// Ports it dials (10250, 10255 and the configured extras).
    pub allowed_ports: BTreeSet<u16>,
    /// Whether it dials loopback destinations too. Off by default: services
    /// bound to loopback chose not to be reachable from outside, and the
    /// server never routes loopback to an agent anyway.
    pub dial_loopback: bool,
}

/// Counters an agent keeps.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// Links up now.
    pub links_up: AtomicU64,
    /// Streams open now.
    pub streams_open: AtomicU64,
    /// Streams served in all.
    pub streams_total: AtomicU64,
    /// Refused: destination not this node's.
    pub refused_address: AtomicU64,
    /// Refused: port not allowed.
    pub refused_port: AtomicU64,
    /// Refused: not a CONNECT, or an authority that is no IP:port.
    pub refused_request: AtomicU64,
    /// Local dials that failed.
    pub dial_failures: AtomicU64,
    /// Links that failed before or during the TLS handshake.
    pub handshake_failures: AtomicU64,
    /// Bytes from the servers to local destinations.
    pub bytes_in: AtomicU64,
    /// Bytes from local destinations to the servers.
    pub bytes_out: AtomicU64,
    /// Links closed at once: their replica was already linked.
    pub duplicate_links: AtomicU64,
    /// Replica statuses refused as malformed.
    pub bad_statuses: AtomicU64,
    /// The replicas linked now (what `/metrics` reports of them, and what
    /// tells the dialers whether to look for more).
    pub replicas: LinkSet,
}

/// Why a destination is refused, or `None` when the agent dials it.
pub fn refusal(config: &AgentConfig, dest: SocketAddr) -> Option<&'static str> {
    if !config.allowed_ports.contains(&dest.port()) {
        return Some("port");
    }
    let ip = dest.ip();
    let own = (config.dial_loopback && ip.is_loopback())
        || config.own_addresses.contains(&ip)
        || config.pod_subnets.borrow().iter().any(|net| net.contains(&ip));
    (!own).then_some("address")
}

/// Runs the agent: links to every server address, each reconnecting
/// forever, more than one per address while it holds fewer replicas than
/// there are.
pub async fn run(config: AgentConfig, metrics: Arc<AgentMetrics>) {
    let mut addresses = tokio::task::JoinSet::new();
    for server in config.servers.clone() {
        addresses.spawn(keep_address(config.clone(), server, metrics.clone()));
    }
    while addresses.join_next().await.is_some() {}
}

/// The links through one address: the first always kept up, one more slot
/// for each further replica the statuses announce. A slot past the first
/// dials only while the agent is short of replicas, so addresses that each
/// reach one replica settle at one link each.
async fn keep_address(config: AgentConfig, server: String, metrics: Arc<AgentMetrics>) {
    let mut slots = tokio::task::JoinSet::new();
    let mut held = metrics.replicas.watch();
    let mut opened = 0u32;
    loop {
        let expected = held.borrow_and_update().expected.max(1);
        while opened < expected {
            slots.spawn(keep_linked(config.clone(), server.clone(), metrics.clone(), opened));
            opened += 1;
        }
        if held.changed().await.is_err() {
            break;
        }
    }
    while slots.join_next().await.is_some() {}
}

async fn keep_linked(config: AgentConfig, server: String, metrics: Arc<AgentMetrics>, slot: u32) {
    let mut attempt = 0u32;
    let mut held = metrics.replicas.watch();
    loop {
        if slot > 0 && held.wait_for(|held| held.short()).await.is_err() {
            return;
        }
        let started = Instant::now();
        match link(&config, &server, &metrics).await {
            Ok(()) => tracing::info!("tunnel link to {server} closed by the server"),
            Err(err @ AgentError::Duplicate { .. }) => tracing::debug!("{err}: dialling again"),
            Err(err) => tracing::warn!("{err}: {}", error_chain(&err)),
        }
        if started.elapsed() >= STABLE_LINK {
            attempt = 0;
        }
        let wait = backoff(attempt);
        attempt = attempt.saturating_add(1);
        tracing::debug!("reconnecting to {server} in {wait:?}");
        tokio::time::sleep(wait).await;
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push(cause.to_string());
        source = cause.source();
    }
    out.join(": ")
}

/// One link's life: dial, TLS, HTTP/2, serve streams until it breaks.
async fn link(config: &AgentConfig, server: &str, metrics: &Arc<AgentMetrics>) -> Result<(), AgentError> {
    let dial = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(server)).await;
    let tcp = match dial {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(source)) => return Err(AgentError::Dial { server: server.into(), source }),
        Err(_) => {
            let source = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
            return Err(AgentError::Dial { server: server.into(), source });
        }
    };
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(config.tls.borrow().clone());
    // rustls reads 4 KiB per call: a read-ahead saves 15 of every 16 reads of a bulk stream.
    let tls = match connector.connect(config.server_name.clone(), ReadAhead::new(tcp)).await {
        Ok(tls) => tls,
        Err(source) => {
            metrics.handshake_failures.fetch_add(1, Ordering::Relaxed);
            return Err(AgentError::Tls { server: server.into(), source });
        }
    };
    if super::tls::speaks_mux(tls.get_ref().1.alpn_protocol()) {
        return link_mux(config, server, metrics, tls).await;
    }
    let link_err = |source| AgentError::Link { server: server.into(), source };
    let mut connection = transport::agent_builder().handshake::<_, Bytes>(tls).await.map_err(link_err)?;
    tracing::info!("tunnel link to {server} up");
    metrics.links_up.fetch_add(1, Ordering::Relaxed);
    let _down = Decrement(&metrics.links_up);
    let serial = metrics.replicas.new_link();
    let _released = Released(&metrics.replicas, serial);
    let mut pings = connection.ping_pong();
    let keepalive = async move {
        loop {
            tokio::time::sleep(transport::PING_INTERVAL).await;
            let Some(pinger) = pings.as_mut() else { return };
            match tokio::time::timeout(transport::PING_TIMEOUT, pinger.ping(h2::Ping::opaque())).await {
                Ok(Ok(_pong)) => {}
                _ => return,
            }
        }
    };
    tokio::pin!(keepalive);
    loop {
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((request, mut respond))) if ReplicaStatus::is_status(&request) => {
                    match ReplicaStatus::from_request(&request) {
                        Ok(status) => {
                            let claim = metrics.replicas.claim(serial, &status);
                            answer(&mut respond, claim.status(), if claim == Claim::Duplicate { "duplicate" } else { "" });
                            if claim == Claim::Duplicate {
                                metrics.duplicate_links.fetch_add(1, Ordering::Relaxed);
                                // Let the answer leave before the link does, so
                                // the server knows why it closed.
                                connection.graceful_shutdown();
                                let flushed = async { while let Some(Ok(_)) = connection.accept().await {} };
                                let _ = tokio::time::timeout(Duration::from_secs(1), flushed).await;
                                return Err(AgentError::Duplicate { server: server.into(), replica: status.id });
                            }
                            let held = metrics.replicas.held();
                            if status.draining {
                                tracing::info!("tunnel server replica {} (via {server}) drains: linking to the others", status.id);
                            } else {
                                tracing::info!(
                                    "tunnel link to {server} reached replica {}: {} of {} replicas linked",
                                    status.id, held.live, held.expected
                                );
                            }
                        }
                        Err(err) => {
                            metrics.bad_statuses.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("tunnel server {server} sent a replica status this agent refuses: {err}");
                            answer(&mut respond, StatusCode::BAD_REQUEST, "status");
                        }
                    }
                }
                Some(Ok((request, respond))) => {
                    let (config, metrics) = (config.clone(), metrics.clone());
                    tokio::spawn(async move { serve(config, metrics, request, respond).await });
                }
                Some(Err(source)) => return Err(link_err(source)),
                None => return Ok(()),
            },
            () = &mut keepalive => {
                return Err(AgentError::DeadLink { server: server.into(), timeout: transport::PING_TIMEOUT });
            }
        }
    }
}

/// One `netd-mux/1` link's life, as [`link`]'s over HTTP/2: statuses are
/// answered, every other stream is served, pings are the link's own.
async fn link_mux<T>(config: &AgentConfig, server: &str, metrics: &Arc<AgentMetrics>, tls: T) -> Result<(), AgentError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let link_err = |source| match source {
        MuxError::PingTimeout(timeout) => AgentError::DeadLink { server: server.into(), timeout },
        source => AgentError::Mux { server: server.into(), source },
    };
    let (link, driver) = mux::link(tls, mux::Role::Acceptor, mux::Config::default());
    tokio::pin!(driver);
    tracing::info!("tunnel link to {server} up (netd-mux/1)");
    metrics.links_up.fetch_add(1, Ordering::Relaxed);
    let _down = Decrement(&metrics.links_up);
    let serial = metrics.replicas.new_link();
    let _released = Released(&metrics.replicas, serial);
    loop {
        let incoming = tokio::select! {
            incoming = link.accept() => incoming,
            ended = &mut driver => return ended.map_err(link_err),
        };
        let Some(incoming) = incoming else {
            // The server is going away: its streams finish, then it closes.
            return (&mut driver).await.map_err(link_err);
        };
        if !ReplicaStatus::is_status_target(incoming.target()) {
            let (config, metrics) = (config.clone(), metrics.clone());
            tokio::spawn(async move { serve_mux(config, metrics, incoming).await });
            continue;
        }
        let status = match ReplicaStatus::from_target(incoming.target()) {
            Ok(status) => status,
            Err(err) => {
                metrics.bad_statuses.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("tunnel server {server} sent a replica status this agent refuses: {err}");
                incoming.answer(StatusCode::BAD_REQUEST.as_u16(), "status");
                continue;
            }
        };
        let claim = metrics.replicas.claim(serial, &status);
        incoming.answer(claim.status().as_u16(), if claim == Claim::Duplicate { "duplicate" } else { "" });
        if claim == Claim::Duplicate {
            metrics.duplicate_links.fetch_add(1, Ordering::Relaxed);
            // Let the answer leave before the link does, so the server
            // knows why it closed.
            let flushed = async {
                tokio::select! {
                    () = link.flushed() => {}
                    _ = &mut driver => {}
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), flushed).await;
            return Err(AgentError::Duplicate { server: server.into(), replica: status.id });
        }
        let held = metrics.replicas.held();
        if status.draining {
            tracing::info!("tunnel server replica {} (via {server}) drains: linking to the others", status.id);
        } else {
            tracing::info!(
                "tunnel link to {server} reached replica {}: {} of {} replicas linked",
                status.id,
                held.live,
                held.expected
            );
        }
    }
}

/// One `netd-mux/1` stream: check, dial, splice.
async fn serve_mux(config: AgentConfig, metrics: Arc<AgentMetrics>, incoming: mux::Incoming) {
    let Ok(dest) = incoming.target().parse::<SocketAddr>() else {
        metrics.refused_request.fetch_add(1, Ordering::Relaxed);
        incoming.refuse(StatusCode::BAD_REQUEST.as_u16(), "request");
        return;
    };
    if let Some(reason) = refusal(&config, dest) {
        let counter = if reason == "port" { &metrics.refused_port } else { &metrics.refused_address };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("refused a stream to {dest}: {reason} not allowed on this node");
        incoming.refuse(StatusCode::FORBIDDEN.as_u16(), reason);
        return;
    }
    let mut local = match tokio::time::timeout(LOCAL_DIAL_TIMEOUT, TcpStream::connect(dest)).await {
        Ok(Ok(stream)) => stream,
        _ => {
            metrics.dial_failures.fetch_add(1, Ordering::Relaxed);
            incoming.refuse(StatusCode::BAD_GATEWAY.as_u16(), "dial");
            return;
        }
    };
    let _ = local.set_nodelay(true);
    let mut tunnel = incoming.accept();
    metrics.streams_total.fetch_add(1, Ordering::Relaxed);
    metrics.streams_open.fetch_add(1, Ordering::Relaxed);
    let _open = Decrement(&metrics.streams_open);
    // Written to the local end: in from the server; read from it: out.
    let mut local = Counted::new(&mut local, &metrics.bytes_out, &metrics.bytes_in);
    let _ = transport::splice(&mut local, &mut tunnel).await;
}

/// Gives a link's replica claim back when the link ends.
struct Released<'a>(&'a LinkSet, u64);

impl Drop for Released<'_> {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

struct Decrement<'a>(&'a AtomicU64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn answer(respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode, reason: &str) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    match http::HeaderValue::from_str(reason) {
        Ok(value) if !reason.is_empty() => {
            response.headers_mut().insert(REFUSAL_HEADER, value);
        }
        _ => {}
    }
    let _ = respond.send_response(response, true);
}

/// One `CONNECT ip:port` stream: check, dial, splice.
async fn serve(
    config: AgentConfig,
    metrics: Arc<AgentMetrics>,
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let dest = (request.method() == Method::CONNECT)
        .then(|| request.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok()))
        .flatten();
    let Some(dest) = dest else {
        metrics.refused_request.fetch_add(1, Ordering::Relaxed);
        answer(&mut respond, StatusCode::BAD_REQUEST, "request");
        return;
    };
    if let Some(reason) = refusal(&config, dest) {
        let counter = if reason == "port" { &metrics.refused_port } else { &metrics.refused_address };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("refused a stream to {dest}: {reason} not allowed on this node");
        answer(&mut respond, StatusCode::FORBIDDEN, reason);
        return;
    }
    let mut local = match tokio::time::timeout(LOCAL_DIAL_TIMEOUT, TcpStream::connect(dest)).await {
        Ok(Ok(stream)) => stream,
        _ => {
            metrics.dial_failures.fetch_add(1, Ordering::Relaxed);
            answer(&mut respond, StatusCode::BAD_GATEWAY, "dial");
            return;
        }
    };
    let _ = local.set_nodelay(true);
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(_) => return,
    };
    metrics.streams_total.fetch_add(1, Ordering::Relaxed);
    metrics.streams_open.fetch_add(1, Ordering::Relaxed);
    let _open = Decrement(&metrics.streams_open);
    let mut tunnel = TunnelStream::new(send, request.into_body());
    // Written to the local end: in from the server; read from it: out.
    let mut local = Counted::new(&mut local, &metrics.bytes_out, &metrics.bytes_in);
    let _ = transport::splice_tunnel(&mut local, &mut tunnel).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config() -> AgentConfig {
        let roots = rustls::RootCertStore::empty();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        AgentConfig {
            servers: vec!["192.0.2.1:10262".into()],
            server_name: ServerName::try_from("tunnel").unwrap(),
            tls: super::super::tls::fixed(Arc::new(tls)),
            own_addresses: vec!["10.0.5.7".parse().unwrap()],
            pod_subnets: crate::tls::fixed(Arc::new(vec!["10.244.7.0/24".parse().unwrap()])),
            allowed_ports: [10250, 10255, 9100].into_iter().collect(),
            dial_loopback: false,
        }
    }

    #[test]
    fn only_this_nodes_addresses_pods_and_configured_loopback_on_allowed_ports() {
        let mut config = config();
        let at = |config: &AgentConfig, s: &str| refusal(config, s.parse().unwrap());
        assert_eq!(at(&config, "127.0.0.1:10255"), Some("address"), "loopback only when configured");
        config.dial_loopback = true;
        assert_eq!(at(&config, "127.0.0.1:10255"), None);
        assert_eq!(at(&config, "[::1]:10250"), None);
        let at = |s: &str| refusal(&config, s.parse().unwrap());
        assert_eq!(at("10.0.5.7:10250"), None);
        assert_eq!(at("10.244.7.19:9100"), None, "a pod of this node, metrics port");
        // Another node's pod subnet, another node's address: refused.
        assert_eq!(at("10.244.8.19:9100"), Some("address"));
        assert_eq!(at("10.0.5.8:10250"), Some("address"));
        // Any address on a port not allowed: the port is named first.
        assert_eq!(at("10.0.5.7:22"), Some("port"));
        assert_eq!(at("10.0.5.8:22"), Some("port"));
    }
}
