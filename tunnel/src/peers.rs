//! Replicas forwarding to each other: a connection reaching a replica with
//! no link to its node goes on to a replica that has one, so "no agent" is
//! answered only when no replica holds the node.
//!
//! Replicas find each other in the registry ([`netd_registry::replicas`]):
//! each announces where its CONNECT door is, whether it drains, and reads
//! the others. A forward is an ordinary `CONNECT host:port` to a peer's
//! CONNECT door, made with this replica's own server certificate as the
//! client certificate: a peer admits a client presenting the tunnel
//! server's common name, which only the replicas' shared key can prove, and
//! checks the peer's certificate against the CA under the name the
//! certificate itself carries (its first subjectAltName), so replicas
//! reached at their pod addresses still verify. A request that arrived from
//! a peer is never forwarded again: one hop, no loops.
//!
//! Why a CONNECT to the peer's door rather than a standing link between
//! replicas: the door, its caps, its timeouts and its metrics exist already,
//! a forward costs one TLS handshake on a path that is taken only while an
//! agent is not yet linked everywhere (every agent links to every replica),
//! and a peer that is gone costs nothing to forget.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

use super::identity::ClientIdentity;
use super::tls::Live;

/// The header a forwarding replica names itself in (for the peer's logs).
pub const FORWARDED_BY_HEADER: &str = "x-netd-forwarded-by";

/// A peer replica as the registry announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its identity.
    pub id: String,
    /// Its CONNECT door, `host:port`.
    pub address: String,
}

/// Why a forward failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No peer to ask (none announced, or all draining).
    #[error("no other tunnel server replica is known")]
    NoPeer,
    /// Every peer answered that it holds no link to the node (or could not
    /// be reached).
    #[error("no replica of {asked} holds a link for it")]
    NotHeld {
        /// How many peers were asked.
        asked: usize,
    },
    /// A peer holds the node but the stream failed there (the agent
    /// refused, or did not answer in time).
    #[error("replica {peer} answered {status}")]
    Failed {
        /// The peer.
        peer: String,
        /// Its answer.
        status: StatusCode,
    },
}

/// Counters of forwarding.
#[derive(Debug, Default)]
pub struct PeerMetrics {
    /// Streams this replica sent on to a peer.
    pub forwarded: AtomicU64,
    /// Forwards no peer could serve.
    pub forward_failures: AtomicU64,
    /// Streams a peer forwarded here.
    pub from_peers: AtomicU64,
    /// Live peers known now (this replica not counted).
    pub known: AtomicU64,
}

/// The replicas this one forwards to, and how it dials them.
pub struct Peers {
    own_id: String,
    /// The common name a peer's client certificate carries: this
    /// replica's own.
    common_name: String,
    server_name: ServerName<'static>,
    dialer: Live<rustls::ClientConfig>,
    open_timeout: Duration,
    known: Mutex<Vec<Peer>>,
    /// Where the next forward starts in `known`, so forwards spread.
    next: AtomicU64,
    /// Counters.
    pub metrics: PeerMetrics,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("own_id", &self.own_id).field("common_name", &self.common_name).finish()
    }
}

impl Peers {
    /// Peers of replica `own_id` whose certificate (`own_leaf`, shared by
    /// every replica) names `common_name` and `server_name`; `dialer` is
    /// the CONNECT-client TLS settings built from that certificate.
    pub fn new(
        own_id: &str,
        own_leaf: &[u8],
        dialer: Live<rustls::ClientConfig>,
        open_timeout: Duration,
    ) -> Option<Self> {
        let identity = ClientIdentity::of(own_leaf)?;
        let [common_name] = identity.common_names.as_slice() else { return None };
        if identity.is_node() {
            return None;
        }
        let server_name = super::certs::first_san_of(own_leaf).ok()??;
        Some(Self {
            own_id: own_id.to_string(),
            common_name: common_name.clone(),
            server_name,
            dialer,
            open_timeout,
            known: Mutex::default(),
            next: AtomicU64::new(0),
            metrics: PeerMetrics::default(),
        })
    }

    /// Whether a CONNECT-door client is a peer replica: exactly this
    /// replica's own common name, not a node.
    pub fn is_peer(&self, identity: &ClientIdentity) -> bool {
        !identity.is_node() && matches!(identity.common_names.as_slice(), [cn] if *cn == self.common_name)
    }

    /// The peers' common name (for logs).
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// The registry's view: live, not draining, not this replica.
    pub fn replace(&self, peers: Vec<Peer>) {
        let peers: Vec<Peer> = peers.into_iter().filter(|peer| peer.id != self.own_id).collect();
        self.metrics.known.store(peers.len() as u64, Ordering::Relaxed);
        *self.known.lock().unwrap_or_else(PoisonError::into_inner) = peers;
    }

    /// The peers known now.
    pub fn known(&self) -> Vec<Peer> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Opens `authority` (`host:port`, as the front door named it) through
    /// the first peer that holds its node, asking each at most the open
    /// timeout. A peer answering 503 holds no link for it (or drains): the
    /// next is asked.
    pub async fn forward(&self, authority: &str) -> Result<TokioIo<hyper::upgrade::Upgraded>, ForwardError> {
        let mut peers = self.known();
        if peers.is_empty() {
            return Err(ForwardError::NoPeer);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) as usize % peers.len();
        peers.rotate_left(start);
        let asked = peers.len();
        for peer in peers {
            match tokio::time::timeout(self.open_timeout, self.ask(&peer, authority)).await {
                Ok(Ok(stream)) => {
                    self.metrics.forwarded.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("CONNECT {authority}: forwarded to replica {}", peer.id);
                    return Ok(stream);
                }
                Ok(Err(Asked::NotHeld(why))) => {
                    tracing::debug!("CONNECT {authority}: replica {} does not serve it: {why}", peer.id);
                }
                Ok(Err(Asked::Failed(status))) => {
                    self.metrics.forward_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(ForwardError::Failed { peer: peer.id, status });
                }
                Err(_) => tracing::info!("CONNECT {authority}: replica {} did not answer in time", peer.id),
            }
        }
        self.metrics.forward_failures.fetch_add(1, Ordering::Relaxed);
        Err(ForwardError::NotHeld { asked })
    }

    async fn ask(&self, peer: &Peer, authority: &str) -> Result<TokioIo<hyper::upgrade::Upgraded>, Asked> {
        let not_held = |why: String| Asked::NotHeld(why);
        let tcp = tokio::net::TcpStream::connect(&peer.address)
            .await
            .map_err(|e| not_held(format!("connecting to {}: {e}", peer.address)))?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(self.dialer.borrow().clone());
        let tls = connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| not_held(format!("TLS with {}: {e}", peer.address)))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(|e| not_held(e.to_string()))?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .header(http::header::HOST, authority)
            .header(FORWARDED_BY_HEADER, self.own_id.as_str())
            .body(Empty::new())
            .map_err(|e| not_held(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| not_held(e.to_string()))?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::SERVICE_UNAVAILABLE => return Err(not_held("503".into())),
            status => return Err(Asked::Failed(status)),
        }
        let upgraded = hyper::upgrade::on(response).await.map_err(|e| not_held(e.to_string()))?;
        Ok(TokioIo::new(upgraded))
    }
}

enum Asked {
    NotHeld(String),
    Failed(StatusCode),
}

/// The replica's record in the registry: announced every third of its
/// lifetime (default [`netd_registry::REPLICA_TTL`]) with the peers read
/// back, marked draining when the drain starts, withdrawn when it ends.
pub(crate) mod announce {
    use std::sync::Arc;
    use std::time::SystemTime;

    use std::time::Duration;

    use netd_registry::replicas::{ReplicaRecord, ReplicaStore};
    use netd_registry::{AnyRegistry, Registry as _};

    use super::{Peer, Peers};
    use crate::server::Router;

    /// Announces and reads until the task is dropped; a failing registry
    /// is retried, what was known is kept meanwhile (a peer that vanished
    /// meanwhile costs a refused connection, no more).
    pub(crate) async fn follow(
        mut registry: AnyRegistry,
        peers: Arc<Peers>,
        router: Arc<Router>,
        address: String,
        ttl: Duration,
    ) {
        let every = ttl / 3;
        let id = router.policy().replica.id.clone();
        let mut failures = 0u32;
        loop {
            let now = SystemTime::now();
            let record = ReplicaRecord::new(&id, &address, router.is_draining(), ttl, now);
            let outcome = async {
                registry.announce_replica(&record).await?;
                registry.replicas(now).await
            }
            .await;
            match outcome {
                Ok(records) => {
                    failures = 0;
                    let live = records.iter().filter(|r| !r.draining).count().max(1);
                    peers.replace(
                        records
                            .into_iter()
                            .filter(|r| !r.draining)
                            .map(|r| Peer { id: r.id, address: r.address })
                            .collect(),
                    );
                    router.set_live_replicas(u32::try_from(live).unwrap_or(u32::MAX)).await;
                    tokio::time::sleep(every).await;
                }
                Err(err) => {
                    let wait = crate::transport::backoff(failures).min(every);
                    failures = failures.saturating_add(1);
                    tracing::warn!(
                        "tunnel replica {id}: registry {}: {err}; retrying in {wait:?}",
                        registry.describe()
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Tells the registry this replica drains (peers stop forwarding to it
    /// at their next read), best effort.
    pub(crate) async fn draining(registry: &mut AnyRegistry, id: &str, address: &str, ttl: Duration) {
        let record = ReplicaRecord::new(id, address, true, ttl, SystemTime::now());
        if let Err(err) = registry.announce_replica(&record).await {
            tracing::warn!("tunnel replica {id}: announcing the drain: {err}");
        }
    }

    /// Removes this replica's record at the end of a drain, best effort
    /// (it expires by itself otherwise).
    pub(crate) async fn withdraw(registry: &mut AnyRegistry, id: &str) {
        if let Err(err) = registry.withdraw_replica(id).await {
            tracing::warn!("tunnel replica {id}: withdrawing: {err}");
        }
    }
}
