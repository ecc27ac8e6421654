//! `netd tunnel-server` and `netd tunnel-agent`: the long-running processes
//! around [`server`] and [`agent`], with
//! certificates that follow their files and a `/metrics` endpoint (hyper).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::StatusCode;
use ipnet::IpNet;
use rustls_pki_types::ServerName;
use tokio::net::TcpListener;

use super::agent::{self, AgentConfig, AgentMetrics};
use super::certs::{self, CertError, CertFiles};
use super::limits::{Door, Refusal};
use super::routes::LeaseRefusal;
use super::routes::LeaseRoute;
use super::server::{self, Router, ServerPolicy};
use super::tls::{self, TlsError};
use netd_ebpf::dnat::{DnatError, TunnelDnat};
use netd_model::subnet_env::{SubnetEnv, SubnetEnvError};
use netd_registry::{AnyRegistry, OpenSettings, PeerEvent, PeerLease, Registry, RegistrySpec};

/// The ports an agent always allows: kubelet's API and its read-only port.
pub const KUBELET_PORTS: [u16; 2] = [10250, 10255];

/// Errors starting the tunnel processes.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// Certificates.
    #[error(transparent)]
    Certs(#[from] CertError),
    /// TLS settings.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A listener could not be bound.
    #[error("listening on {addr} failed")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The tunnel DNAT's maps could not be opened.
    #[error(transparent)]
    Dnat(#[from] DnatError),
    /// The registry settings can never work.
    #[error("tunnel server: the registry")]
    Registry(#[source] netd_registry::RegistryError),
    /// The agent was given no server.
    #[error("no tunnel server given (--server HOST:PORT)")]
    NoServers,
    /// A server name that is neither a DNS name nor an IP address.
    #[error("{0:?} is not a name the server's certificate can carry")]
    ServerName(String),
}

/// A listener as the command line names it: `IP:PORT`, or a bare `PORT` on
/// the server's own address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// A whole socket address.
    At(SocketAddr),
    /// A port on the server's address.
    Port(u16),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(port) = text.parse::<u16>() {
            return Ok(Self::Port(port));
        }
        text.parse().map(Self::At).map_err(|_| format!("{text:?} is neither IP:PORT nor PORT"))
    }
}

impl Listen {
    /// The socket address, bare ports on `address`.
    pub fn on(self, address: IpAddr) -> SocketAddr {
        match self {
            Self::At(addr) => addr,
            Self::Port(port) => SocketAddr::new(address, port),
        }
    }

    /// Whether it needs the server's address.
    pub fn is_port_only(self) -> bool {
        matches!(self, Self::Port(_))
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, TunnelError> {
    TcpListener::bind(addr).await.map_err(|source| TunnelError::Bind { addr, source })
}

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
    /// Who the doors admit, what never routes, timeouts and caps.
    pub policy: ServerPolicy,
}

/// What a tunnel agent runs.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Tunnel servers, `host:port`.
    pub servers: Vec<String>,
    /// The name the servers' certificate carries; default: the first server's host.
    pub server_name: Option<String>,
    /// The node's certificate, key and CA.
    pub certs: CertFiles,
    /// The node's addresses; default: its certificate's IP SANs.
    pub node_addresses: Vec<IpAddr>,
    /// The node's pod subnets (pulling pod metrics through the tunnel);
    /// default: the subnet in `subnet_env`, followed as netd rewrites it.
    pub pod_subnets: Vec<IpNet>,
    /// flannel's `subnet.env`, which netd writes on this node.
    pub subnet_env: PathBuf,
    /// Ports allowed besides 10250 and 10255.
    pub extra_ports: Vec<u16>,
    /// Dial loopback destinations too (off: only the node's own addresses
    /// and pod subnets).
    pub dial_loopback: bool,
    /// `/metrics` and `/healthz` (plain HTTP).
    pub metrics_listen: Option<SocketAddr>,
}

fn counter(out: &mut String, name: &str, kind: &str, help: &str, value: &AtomicU64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", value.load(Ordering::Relaxed));
}

/// The server's counters, Prometheus text format.
pub fn server_metrics(router: &Router) -> String {
    let m = &router.metrics;
    let mut out = String::new();
    counter(&mut out, "netd_tunnel_agents", "gauge", "Agents linked now.", &m.agents);
    counter(&mut out, "netd_tunnel_streams_open", "gauge", "Tunnelled connections open now.", &m.streams_open);
    counter(&mut out, "netd_tunnel_streams_total", "counter", "Tunnelled connections opened.", &m.streams_total);
    counter(
        &mut out,
        "netd_tunnel_no_agent_total",
        "counter",
        "Connections with no agent for their destination.",
        &m.no_agent,
    );
    counter(
        &mut out,
        "netd_tunnel_refused_by_agent_total",
        "counter",
        "Streams the agent refused.",
        &m.refused_by_agent,
    );
    counter(
        &mut out,
        "netd_tunnel_handshake_failures_total",
        "counter",
        "Agent links refused in TLS or for want of a node identity.",
        &m.handshake_failures,
    );
    counter(
        &mut out,
        "netd_tunnel_not_redirected_total",
        "counter",
        "DNAT-door connections without an original destination.",
        &m.not_redirected,
    );
    counter(
        &mut out,
        "netd_tunnel_stream_cap_total",
        "counter",
        "Stream opens refused: the agent's link carried its maximum.",
        &m.stream_cap,
    );
    counter(
        &mut out,
        "netd_tunnel_open_timeouts_total",
        "counter",
        "Stream opens an agent did not answer in time.",
        &m.open_timeouts,
    );
    counter(
        &mut out,
        "netd_tunnel_links_replaced_total",
        "counter",
        "Agent links replaced by a newer link of the same node.",
        &m.links_replaced,
    );
    counter(
        &mut out,
        "netd_tunnel_certificate_addresses_refused_total",
        "counter",
        "Certificate addresses not routed (special, reserved, another linked node's).",
        &m.certificate_addresses_refused,
    );
    let _ = writeln!(
        out,
        "# HELP netd_tunnel_lease_refused_total Leases (or their addresses) refused, by reason.\n\
         # TYPE netd_tunnel_lease_refused_total counter"
    );
    for why in LeaseRefusal::ALL {
        let _ = writeln!(out, "netd_tunnel_lease_refused_total{{reason=\"{}\"}} {}", why.name(), m.lease_refusals(why));
    }
    let _ = writeln!(
        out,
        "# HELP netd_tunnel_door_refused_total Connections a door turned away, by door and reason.\n\
         # TYPE netd_tunnel_door_refused_total counter"
    );
    for door in Door::ALL {
        for why in Refusal::ALL {
            let _ = writeln!(
                out,
                "netd_tunnel_door_refused_total{{door=\"{}\",reason=\"{}\"}} {}",
                door.name(),
                why.name(),
                m.doors.refused(door, why)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP netd_tunnel_door_connections Connections a door holds now.\n# TYPE netd_tunnel_door_connections gauge"
    );
    for door in Door::ALL {
        let _ = writeln!(out, "netd_tunnel_door_connections{{door=\"{}\"}} {}", door.name(), m.doors.open(door));
    }
    counter(&mut out, "netd_tunnel_bytes_to_edge_total", "counter", "Bytes sent towards edge nodes.", &m.bytes_to_edge);
    counter(
        &mut out,
        "netd_tunnel_bytes_from_edge_total",
        "counter",
        "Bytes received from edge nodes.",
        &m.bytes_from_edge,
    );
    out
}

/// The agent's counters, Prometheus text format.
pub fn agent_metrics(m: &AgentMetrics) -> String {
    let mut out = String::new();
    counter(&mut out, "netd_tunnel_agent_links_up", "gauge", "Links to tunnel servers up now.", &m.links_up);
    counter(&mut out, "netd_tunnel_agent_streams_open", "gauge", "Streams open now.", &m.streams_open);
    counter(&mut out, "netd_tunnel_agent_streams_total", "counter", "Streams served.", &m.streams_total);
    let _ = writeln!(
        out,
        "# HELP netd_tunnel_agent_refused_total Streams refused, by reason.\n# TYPE netd_tunnel_agent_refused_total counter\n\
         netd_tunnel_agent_refused_total{{reason=\"address\"}} {}\n\
         netd_tunnel_agent_refused_total{{reason=\"port\"}} {}\n\
         netd_tunnel_agent_refused_total{{reason=\"request\"}} {}",
        m.refused_address.load(Ordering::Relaxed),
        m.refused_port.load(Ordering::Relaxed),
        m.refused_request.load(Ordering::Relaxed)
    );
    counter(&mut out, "netd_tunnel_agent_dial_failures_total", "counter", "Local dials that failed.", &m.dial_failures);
    counter(
        &mut out,
        "netd_tunnel_agent_handshake_failures_total",
        "counter",
        "Links that failed in TLS.",
        &m.handshake_failures,
    );
    counter(
        &mut out,
        "netd_tunnel_agent_bytes_in_total",
        "counter",
        "Bytes from servers to local destinations.",
        &m.bytes_in,
    );
    counter(
        &mut out,
        "netd_tunnel_agent_bytes_out_total",
        "counter",
        "Bytes from local destinations to servers.",
        &m.bytes_out,
    );
    out
}

/// `/metrics` and `/healthz`, until the task is dropped.
async fn serve_metrics(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    netd_metrics::serve_text(listener, move |path| {
        let render = render.clone();
        async move {
            match path.as_str() {
                "/metrics" => (StatusCode::OK, render()),
                "/healthz" => (StatusCode::OK, "ok\n".to_string()),
                _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
            }
        }
    })
    .await
}

/// Runs a tunnel server on the caller's runtime until `shutdown` completes
/// (or the future is dropped): listeners close and every link and stream
/// task is aborted. No runtime is built and no signal handler installed;
/// the `netd tunnel-server` binary passes a future of SIGTERM/SIGINT.
pub async fn run_server(settings: ServerSettings, shutdown: impl Future<Output = ()>) -> Result<(), TunnelError> {
    tokio::select! {
        outcome = serve(settings) => outcome,
        () = shutdown => Ok(()),
    }
}

async fn serve(settings: ServerSettings) -> Result<(), TunnelError> {
    let (agents_tls, reload_agents) =
        tls::follow(settings.certs.clone(), tls::RELOAD_POLL, |c| tls::server(c, tls::ALPN_TUNNEL))?;
    let (connect_tls, reload_connect) =
        tls::follow(settings.certs.clone(), tls::RELOAD_POLL, |c| tls::server(c, tls::ALPN_HTTP1))?;
    let router = Arc::new(Router::new(settings.policy.clone()));
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
                "tunnel server: no tunnel DNAT pinned under {} yet (netd dnat apply, or the controller): \
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
    if let Some(addr) = settings.metrics_listen {
        let metrics_router = router.clone();
        tasks.spawn(serve_metrics(bind(addr).await?, Arc::new(move || server_metrics(&metrics_router))));
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
                let wait = agent::backoff(failures);
                failures = failures.saturating_add(1);
                tracing::warn!("tunnel server: registry {}: {err}; retrying in {wait:?}", registry.describe());
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// This node's pod subnet from the `subnet.env` netd writes: none when the
/// node has no netd (no file), a warning when the file is unusable.
/// This node's pod subnet from `path` (flannel's subnet.env, which netd
/// writes): `Ok(None)` while the file is not there.
fn own_pod_subnet(path: &std::path::Path) -> Result<Option<IpNet>, SubnetEnvError> {
    match SubnetEnv::read(path) {
        Ok(env) => Ok(Some(env.subnet.trunc())),
        Err(SubnetEnvError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// How often the agent looks at subnet.env again.
const SUBNET_ENV_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps `subnets` equal to the pod subnet in `path`, forever. The agent
/// and netd start together on a fresh node, and netd writes subnet.env only
/// once it holds its lease: read once at start, the agent would refuse the
/// node's pods until restarted. A file that cannot be read keeps what was
/// known, said once per distinct error.
async fn follow_pod_subnet(path: PathBuf, subnets: tokio::sync::watch::Sender<Arc<Vec<IpNet>>>) {
    let mut last_error = None;
    loop {
        match own_pod_subnet(&path) {
            Ok(subnet) => {
                last_error = None;
                let wanted: Vec<IpNet> = subnet.into_iter().collect();
                if **subnets.borrow() != wanted {
                    tracing::info!("tunnel agent: pod subnets now {wanted:?} (from {})", path.display());
                    subnets.send_replace(Arc::new(wanted));
                }
            }
            Err(err) => {
                let text = err.to_string();
                if last_error.as_ref() != Some(&text) {
                    tracing::warn!("tunnel agent: pod subnet unknown, keeping {:?}: {text}", **subnets.borrow());
                    last_error = Some(text);
                }
            }
        }
        tokio::time::sleep(SUBNET_ENV_POLL).await;
    }
}

/// Runs a tunnel agent on the caller's runtime until `shutdown` completes
/// (or the future is dropped): its links to the servers close and every
/// stream is aborted. No runtime is built and no signal handler installed.
///
/// ```no_run
/// # async fn demo(settings: netd_tunnel::run::AgentSettings) -> Result<(), netd_tunnel::run::TunnelError> {
/// // Until the host application says stop:
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// # drop(stop);
/// netd_tunnel::run::run_agent(settings, async { let _ = stopped.await; }).await
/// # }
/// ```
pub async fn run_agent(settings: AgentSettings, shutdown: impl Future<Output = ()>) -> Result<(), TunnelError> {
    tokio::select! {
        outcome = dial(settings) => outcome,
        () = shutdown => Ok(()),
    }
}

async fn dial(settings: AgentSettings) -> Result<(), TunnelError> {
    let first = settings.servers.first().ok_or(TunnelError::NoServers)?;
    let name = match &settings.server_name {
        Some(name) => name.clone(),
        None => first.rsplit_once(':').map_or(first.as_str(), |(host, _)| host).trim_matches(['[', ']']).to_string(),
    };
    let server_name = ServerName::try_from(name.clone()).map_err(|_| TunnelError::ServerName(name))?;
    let loaded = settings.certs.load()?;
    let node_addresses = if settings.node_addresses.is_empty() {
        let leaf = loaded.chain.first().map(|c| c.as_ref()).unwrap_or_default();
        certs::ip_sans_of(leaf)?
    } else {
        settings.node_addresses.clone()
    };
    let (subnets_tx, pod_subnets) = tokio::sync::watch::channel(Arc::new(settings.pod_subnets.clone()));
    let (tls, reload) = tls::follow(settings.certs.clone(), tls::RELOAD_POLL, tls::agent)?;
    let mut allowed_ports: BTreeSet<u16> = KUBELET_PORTS.into_iter().collect();
    allowed_ports.extend(&settings.extra_ports);
    let subnets_from = if settings.pod_subnets.is_empty() {
        format!("the pod subnet of {}", settings.subnet_env.display())
    } else {
        format!("{:?}", settings.pod_subnets)
    };
    tracing::info!(
        "tunnel agent: servers {:?}, dialling {node_addresses:?} and {subnets_from} on ports {allowed_ports:?}",
        settings.servers,
    );
    let config = AgentConfig {
        servers: settings.servers.clone(),
        server_name,
        tls,
        own_addresses: node_addresses,
        pod_subnets,
        allowed_ports,
        dial_loopback: settings.dial_loopback,
    };
    let metrics = Arc::new(AgentMetrics::default());
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(reload);
    if settings.pod_subnets.is_empty() {
        tasks.spawn(follow_pod_subnet(settings.subnet_env.clone(), subnets_tx));
    }
    tasks.spawn(agent::run(config, metrics.clone()));
    if let Some(addr) = settings.metrics_listen {
        tasks.spawn(serve_metrics(bind(addr).await?, Arc::new(move || agent_metrics(&metrics))));
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}
