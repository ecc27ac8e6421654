//! The tunnel server process: its settings, counters and [`run_server`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;

use super::{bind, serve_metrics, TunnelError};
use crate::certs::CertFiles;
use crate::limits::{Door, Refusal};
use crate::peers::Peers;
use crate::routes::{LeaseRefusal, LeaseRoute};
use crate::server::{self, Router, ServerMetrics, ServerPolicy};
use crate::tls;
use netd_ebpf::dnat::{DnatError, TunnelDnat};
use netd_registry::{AnyRegistry, OpenSettings, PeerEvent, PeerLease, Registry, RegistrySpec};

/// What a tunnel server runs.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Where agents link in (mutual TLS, HTTP/2).
    pub agents_listen: SocketAddr,
    /// The HTTP CONNECT door (TLS, client certificates from the CA).
    pub connect_listen: Option<SocketAddr>,
    /// The DNAT doors for byte streams (10263, kubelet's TLS): opened when
    /// a tunnel DNAT is pinned.
    pub dnat_listen: Vec<SocketAddr>,
    /// The HTTP door (10264): DNAT'd connections when a tunnel DNAT is
    /// pinned, and plain HTTP routed by `Host`.
    pub http_listen: Option<SocketAddr>,
    /// Where the tunnel DNAT is pinned.
    pub dnat_pin_dir: PathBuf,
    /// The server's certificate, key and CA.
    pub certs: CertFiles,
    /// `/metrics` and `/healthz` (plain HTTP).
    pub metrics_listen: Option<SocketAddr>,
    /// Where node addresses and pod subnets come from (the leases); without
    /// one, only the agents' certificate addresses route.
    pub registry: Option<(RegistrySpec, OpenSettings)>,
    /// Who the doors admit, what never routes, timeouts and caps, and
    /// which replica this is.
    pub policy: ServerPolicy,
    /// How long running streams may take to finish once shutdown starts.
    pub drain_grace: std::time::Duration,
    /// Where peer replicas reach this one's CONNECT door (`host:port`),
    /// announced in the registry; `None`: the CONNECT door's listen address
    /// when it is a specific one. Without a registry, a CONNECT door and an
    /// address, replicas do not forward to each other.
    pub peer_address: Option<String>,
    /// How long this replica's registry record lives unless renewed (it
    /// is renewed every third of it): how soon peers forget a replica
    /// killed without a word.
    pub replica_ttl: std::time::Duration,
}

/// The shortest replica record lifetime: etcd leases last at least 2 s,
/// and records count whole seconds.
pub const MIN_REPLICA_TTL: std::time::Duration = std::time::Duration::from_secs(3);

/// The drain grace's default: under Kubernetes' default termination grace
/// period (30 s), so the links close before the kubelet's SIGKILL.
pub const DEFAULT_DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(25);

/// The server's counters, Prometheus text format.
pub fn server_metrics(router: &Arc<Router>) -> String {
    netd_metrics::render(server_collector(router.clone()))
}

/// What the server's `/metrics` serves, read at scrape time.
fn server_collector(router: Arc<Router>) -> impl netd_metrics::Collector {
    netd_metrics::from_fn(router, |router, out| {
        encode_server(&router.metrics, out)?;
        encode_peers(router, out)
    })
}

fn encode_peers(router: &Router, out: &mut netd_metrics::Families<'_>) -> std::fmt::Result {
    out.gauge(
        "netd_tunnel_replicas_live",
        "Replicas agents are told serve the fleet (the registry's live count, else --replicas).",
        u64::from(router.replica_status().replicas),
    )?;
    let Some(peers) = router.peers() else { return Ok(()) };
    let m = &peers.metrics;
    out.gauge("netd_tunnel_peers", "Other live replicas this one forwards to.", m.known.load(Ordering::Relaxed))?;
    out.counter(
        "netd_tunnel_forwarded_total",
        "Streams sent on to the peer replica holding their node.",
        m.forwarded.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_forward_failures_total",
        "Streams no peer replica could serve.",
        m.forward_failures.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_from_peers_total",
        "Streams a peer replica forwarded here.",
        m.from_peers.load(Ordering::Relaxed),
    )
}

fn encode_server(m: &ServerMetrics, out: &mut netd_metrics::Families<'_>) -> std::fmt::Result {
    out.gauge("netd_tunnel_agents", "Agents linked now.", m.agents.load(Ordering::Relaxed))?;
    out.gauge("netd_tunnel_draining", "1 while this replica drains.", m.draining.load(Ordering::Relaxed))?;
    out.counter(
        "netd_tunnel_duplicate_links_total",
        "Agent links closed at once: the agent already held a link to this replica.",
        m.duplicate_links.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_mux_links_total",
        "Agent links routed that speak netd-mux/1 (the others speak HTTP/2).",
        m.mux_links.load(Ordering::Relaxed),
    )?;
    out.gauge("netd_tunnel_streams_open", "Tunnelled connections open now.", m.streams_open.load(Ordering::Relaxed))?;
    out.counter("netd_tunnel_streams_total", "Tunnelled connections opened.", m.streams_total.load(Ordering::Relaxed))?;
    out.counter(
        "netd_tunnel_no_agent_total",
        "Connections with no agent for their destination.",
        m.no_agent.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_refused_by_agent_total",
        "Streams the agent refused.",
        m.refused_by_agent.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_handshake_failures_total",
        "Agent links refused in TLS or for want of a node identity.",
        m.handshake_failures.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_not_redirected_total",
        "DNAT-door connections without an original destination.",
        m.not_redirected.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_stream_cap_total",
        "Stream opens refused: the agent's link carried its maximum.",
        m.stream_cap.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_open_timeouts_total",
        "Stream opens an agent did not answer in time.",
        m.open_timeouts.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_links_replaced_total",
        "Agent links replaced by a newer link of the same node.",
        m.links_replaced.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_certificate_addresses_refused_total",
        "Certificate addresses not routed (special, reserved, another linked node's).",
        m.certificate_addresses_refused.load(Ordering::Relaxed),
    )?;
    out.counters(
        "netd_tunnel_lease_refused_total",
        "Leases (or their addresses) refused, by reason.",
        LeaseRefusal::ALL.map(|why| ([("reason", why.name())], m.lease_refusals(why))),
    )?;
    out.counters(
        "netd_tunnel_door_refused_total",
        "Connections a door turned away, by door and reason.",
        Door::ALL.into_iter().flat_map(|door| {
            Refusal::ALL.map(|why| ([("door", door.name()), ("reason", why.name())], m.doors.refused(door, why)))
        }),
    )?;
    out.gauges(
        "netd_tunnel_door_connections",
        "Connections a door holds now.",
        Door::ALL.map(|door| ([("door", door.name())], m.doors.open(door))),
    )?;
    out.counter(
        "netd_tunnel_bytes_to_edge_total",
        "Bytes sent towards edge nodes.",
        m.bytes_to_edge.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_bytes_from_edge_total",
        "Bytes received from edge nodes.",
        m.bytes_from_edge.load(Ordering::Relaxed),
    )
}

/// Runs a tunnel server on the caller's runtime until `shutdown` completes,
/// then drains: every listener closes at once (a load balancer or client
/// retrying lands on another replica), linked agents hear that this replica
/// drains (they link to the others), no new stream is opened, and running
/// streams get up to `settings.drain_grace` to finish before the links
/// close. Dropping the future stops at once instead. No runtime is built
/// and no signal handler installed; the `netd-cloud tunnel-server` binary
/// passes a future of SIGTERM/SIGINT.
pub async fn run_server(settings: ServerSettings, shutdown: impl Future<Output = ()>) -> Result<(), TunnelError> {
    crate::replica::check_id(&settings.policy.replica.id).map_err(TunnelError::Replica)?;
    crate::replica::check_count(settings.policy.replica.replicas).map_err(TunnelError::Replica)?;
    if settings.replica_ttl < MIN_REPLICA_TTL {
        return Err(TunnelError::ReplicaTtl(settings.replica_ttl));
    }
    let mut router = Router::new(settings.policy.clone());
    let mut kept = tokio::task::JoinSet::new();
    let announce = match peer_settings(&settings)? {
        Some((peers, address, reload)) => {
            kept.spawn(reload);
            router = router.with_peers(peers.clone());
            address.map(|address| (peers, address))
        }
        None => None,
    };
    let router = Arc::new(router);
    let grace = settings.drain_grace;
    // `/metrics` outlives the doors: a drain is watched through it.
    if let Some(addr) = settings.metrics_listen {
        kept.spawn(serve_metrics(bind(addr).await?, server_collector(router.clone())));
    }
    // The replica's own record: announced and read until the drain, then
    // marked draining and, once drained, withdrawn.
    let mut announcer = tokio::task::JoinSet::new();
    let mut own_record = None;
    if let (Some((peers, address)), Some((spec, open))) = (announce, &settings.registry) {
        let registry = AnyRegistry::open(spec, open).await.map_err(TunnelError::Registry)?;
        tracing::info!(
            "tunnel server: replica {} announces its CONNECT door {address} in {}; peers are clients named {:?}",
            settings.policy.replica.id,
            registry.describe(),
            peers.common_name()
        );
        announcer.spawn(crate::peers::announce::follow(
            registry,
            peers,
            router.clone(),
            address.clone(),
            settings.replica_ttl,
        ));
        own_record = Some((AnyRegistry::open(spec, open).await.map_err(TunnelError::Registry)?, address));
    }
    let ttl = settings.replica_ttl;
    tokio::select! {
        outcome = serve(settings, router.clone()) => return outcome,
        () = shutdown => {}
    }
    announcer.abort_all();
    let id = router.policy().replica.id.clone();
    if let Some((registry, address)) = own_record.as_mut() {
        crate::peers::announce::draining(registry, &id, address, ttl).await;
    }
    drain(&router, grace).await;
    if let Some((registry, _)) = own_record.as_mut() {
        crate::peers::announce::withdraw(registry, &id).await;
    }
    Ok(())
}

/// Forwarding between replicas: a server with a CONNECT door and a
/// certificate whose common name and subjectAltName peers can check admits
/// peers there (a replica with a registry forwards to it, whether or not
/// this one has a registry); with a registry and an address peers reach it
/// at (`Some` second member), it also announces itself and forwards.
/// Without a CONNECT door or such a certificate it serves alone (logged).
#[allow(clippy::type_complexity)]
fn peer_settings(
    settings: &ServerSettings,
) -> Result<Option<(Arc<Peers>, Option<String>, impl Future<Output = ()> + Send + 'static)>, TunnelError> {
    let Some(connect) = settings.connect_listen else {
        tracing::info!("tunnel server: no CONNECT door, so no forwarding between replicas");
        return Ok(None);
    };
    let address = match &settings.peer_address {
        _ if settings.registry.is_none() => None,
        Some(address) => Some(address.clone()),
        None if !connect.ip().is_unspecified() => Some(connect.to_string()),
        None => {
            tracing::warn!(
                "tunnel server: the CONNECT door listens on {connect}: this replica does not announce itself \
                 nor forward without --peer-address (its reachable HOST:PORT)"
            );
            None
        }
    };
    let (dialer, reload) = tls::follow(settings.certs.clone(), tls::RELOAD_POLL, tls::connect_client)?;
    let leaf = settings.certs.load()?.chain.into_iter().next();
    let peers = leaf.and_then(|leaf| {
        Peers::new(&settings.policy.replica.id, leaf.as_ref(), dialer, settings.policy.limits.open_timeout)
    });
    let Some(peers) = peers else {
        tracing::warn!(
            "tunnel server: the server certificate {} carries no single common name and subjectAltName \
             peers could check: no forwarding between replicas",
            settings.certs.cert.display()
        );
        return Ok(None);
    };
    Ok(Some((Arc::new(peers), address, reload)))
}

/// How often a drain looks at the streams still open.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(100);

async fn drain(router: &Router, grace: std::time::Duration) {
    let started = std::time::Instant::now();
    let open = || router.metrics.streams_open.load(Ordering::Relaxed);
    tracing::info!(streams = open(), ?grace, "tunnel server draining: listeners closed, agents told");
    router.drain().await;
    while open() > 0 && started.elapsed() < grace {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    match open() {
        0 => tracing::info!(after = ?started.elapsed(), "tunnel server drained: every stream finished"),
        left => tracing::warn!(
            streams = left,
            ?grace,
            "tunnel server drained: streams still open at the end of the grace are cut"
        ),
    }
    router.close_links();
}

async fn serve(settings: ServerSettings, router: Arc<Router>) -> Result<(), TunnelError> {
    let (agents_tls, reload_agents) = tls::follow(settings.certs.clone(), tls::RELOAD_POLL, tls::agents_door)?;
    let (connect_tls, reload_connect) =
        tls::follow(settings.certs.clone(), tls::RELOAD_POLL, |c| tls::server(c, tls::ALPN_HTTP1))?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(reload_agents);
    tasks.spawn(reload_connect);
    tasks.spawn(server::serve_agents(bind(settings.agents_listen).await?, agents_tls, router.clone()));
    tracing::info!("tunnel server: agents link in on {}", settings.agents_listen);
    if let Some(addr) = settings.connect_listen {
        tasks.spawn(server::serve_connect(bind(addr).await?, connect_tls, router.clone()));
        tracing::info!(
            "tunnel server: HTTP CONNECT door on {addr} for clients {:?}",
            settings.policy.connect_clients.common_names()
        );
    }
    let dnat = server::DnatCell::default();
    if !settings.dnat_listen.is_empty() || settings.http_listen.is_some() {
        match TunnelDnat::open(&settings.dnat_pin_dir) {
            Ok(pinned) => dnat.set(Arc::new(pinned)),
            Err(DnatError::NotAttached { pin_dir }) => tracing::warn!(
                "tunnel server: no tunnel DNAT pinned under {} yet (netd-cloud dnat apply, or the controller): \
                 DNAT doors open when it is",
                pin_dir.display()
            ),
            Err(err) => return Err(err.into()),
        }
        // Bound now, served once the DNAT is there: a port taken shows at start.
        let mut doors = Vec::with_capacity(settings.dnat_listen.len());
        for addr in &settings.dnat_listen {
            doors.push((*addr, bind(*addr).await?));
        }
        tasks.spawn(serve_dnat_doors(doors, dnat.clone(), settings.dnat_pin_dir.clone(), router.clone()));
    }
    if let Some(addr) = settings.http_listen {
        tasks.spawn(server::serve_http_door(bind(addr).await?, dnat.clone(), router.clone()));
        let redirected = if dnat.get().is_some() { "DNAT'd connections" } else { "DNAT'd connections once pinned" };
        let sources = &settings.policy.host_routing_sources;
        let by_host = if sources.is_empty() {
            "plain HTTP by Host off".to_string()
        } else {
            format!("plain HTTP by Host from {sources:?}")
        };
        tracing::info!("tunnel server: HTTP door on {addr} ({redirected}; {by_host})");
    }
    if let Some((spec, open)) = &settings.registry {
        let registry = AnyRegistry::open(spec, open).await.map_err(TunnelError::Registry)?;
        tracing::info!("tunnel server: routes node addresses and pod subnets by the leases of {}", registry.describe());
        tasks.spawn(follow_leases(registry, router.clone()));
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// How often a server started before its tunnel DNAT was pinned looks again.
const DNAT_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves the DNAT doors (already bound) once the tunnel DNAT is pinned,
/// looking every [`DNAT_POLL`] until then; a pin directory that is there but
/// cannot be opened is logged and looked at again.
async fn serve_dnat_doors(
    doors: Vec<(SocketAddr, TcpListener)>,
    dnat: server::DnatCell,
    pin_dir: PathBuf,
    router: Arc<Router>,
) {
    let pinned = loop {
        if let Some(pinned) = dnat.get() {
            break pinned.clone();
        }
        tokio::time::sleep(DNAT_POLL).await;
        match TunnelDnat::open(&pin_dir) {
            Ok(pinned) => {
                tracing::info!("tunnel server: tunnel DNAT pinned under {} now", pin_dir.display());
                dnat.set(Arc::new(pinned));
            }
            Err(DnatError::NotAttached { .. }) => {}
            Err(err) => tracing::warn!("tunnel server: opening the tunnel DNAT under {}: {err}", pin_dir.display()),
        }
    };
    let mut served = tokio::task::JoinSet::new();
    for (addr, listener) in doors {
        served.spawn(server::serve_dnat(listener, pinned.clone(), router.clone()));
        tracing::info!("tunnel server: DNAT door on {addr}");
    }
    while served.join_next().await.is_some() {}
}

/// The route a peer lease gives, when it names its node (agents are known
/// by node name).
fn lease_route(peer: &PeerLease) -> Option<LeaseRoute> {
    let lease = &peer.lease;
    let node = lease.node.clone().filter(|node| !node.is_empty());
    if node.is_none() {
        tracing::debug!("lease {} names no node: not routed", lease.subnet);
    }
    Some(LeaseRoute { node: node?, address: lease.public_ip, subnet: lease.subnet, cloud: peer.cloud })
}

/// Keeps the router's lease routes equal to the registry's leases, forever;
/// a registry that fails is retried with backoff, and what was known keeps
/// routing meanwhile.
async fn follow_leases(mut registry: AnyRegistry, router: Arc<Router>) {
    // The server holds no lease: a /32 no lease has excludes nothing.
    let no_own_subnet = ipnet::Ipv4Net::from(std::net::Ipv4Addr::UNSPECIFIED);
    let mut failures = 0u32;
    loop {
        match registry.next_event(no_own_subnet).await {
            Ok(event) => {
                failures = 0;
                match event {
                    PeerEvent::Resync(peers) => {
                        let routes: Vec<LeaseRoute> = peers.iter().filter_map(lease_route).collect();
                        tracing::info!("tunnel server: {} leased nodes routable", routes.len());
                        router.replace_leases(routes);
                    }
                    PeerEvent::Upsert(peer) => {
                        if let Some(route) = lease_route(&peer) {
                            router.upsert_lease(route);
                        }
                    }
                    PeerEvent::Remove(subnet) => router.remove_lease(subnet),
                }
            }
            Err(err) => {
                let wait = crate::transport::backoff(failures);
                failures = failures.saturating_add(1);
                tracing::warn!("tunnel server: registry {}: {err}; retrying in {wait:?}", registry.describe());
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn a_replica_ttl_too_short_to_renew_is_refused_before_anything_starts() {
        let unused = SocketAddr::from(([127, 0, 0, 1], 0));
        let settings = ServerSettings {
            agents_listen: unused,
            connect_listen: None,
            dnat_listen: Vec::new(),
            http_listen: None,
            dnat_pin_dir: PathBuf::from("/nonexistent"),
            certs: CertFiles::in_dir(std::path::Path::new("/nonexistent"), "server"),
            metrics_listen: None,
            registry: None,
            policy: ServerPolicy::default(),
            drain_grace: DEFAULT_DRAIN_GRACE,
            peer_address: None,
            replica_ttl: std::time::Duration::from_millis(2_999),
        };
        let error = run_server(settings, std::future::pending()).await.unwrap_err();
        assert!(matches!(error, TunnelError::ReplicaTtl(_)), "{error}");
        assert!(error.to_string().contains("at least 3 s"), "{error}");
    }
}
