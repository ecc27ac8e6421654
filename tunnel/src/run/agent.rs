//! The tunnel agent process: its settings, counters and [`run_agent`].

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ipnet::IpNet;
use rustls_pki_types::ServerName;

use super::{bind, serve_metrics, TunnelError, KUBELET_PORTS};
use crate::agent::{self, AgentConfig, AgentMetrics};
use crate::certs::{self, CertFiles};
use crate::tls;
use netd_model::subnet_env::{SubnetEnv, SubnetEnvError};

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

/// The agent's counters, Prometheus text format.
pub fn agent_metrics(m: &Arc<AgentMetrics>) -> String {
    netd_metrics::render(agent_collector(m.clone()))
}

/// What the agent's `/metrics` serves, read at scrape time.
fn agent_collector(metrics: Arc<AgentMetrics>) -> impl netd_metrics::Collector {
    netd_metrics::from_fn(metrics, encode_agent)
}

fn encode_agent(m: &AgentMetrics, out: &mut netd_metrics::Families<'_>) -> std::fmt::Result {
    out.gauge("netd_tunnel_agent_links_up", "Links to tunnel servers up now.", m.links_up.load(Ordering::Relaxed))?;
    out.gauge("netd_tunnel_agent_streams_open", "Streams open now.", m.streams_open.load(Ordering::Relaxed))?;
    out.counter("netd_tunnel_agent_streams_total", "Streams served.", m.streams_total.load(Ordering::Relaxed))?;
    out.counters(
        "netd_tunnel_agent_refused_total",
        "Streams refused, by reason.",
        [("address", &m.refused_address), ("port", &m.refused_port), ("request", &m.refused_request)]
            .map(|(reason, count)| ([("reason", reason)], count.load(Ordering::Relaxed))),
    )?;
    out.counter(
        "netd_tunnel_agent_dial_failures_total",
        "Local dials that failed.",
        m.dial_failures.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_agent_handshake_failures_total",
        "Links that failed in TLS.",
        m.handshake_failures.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_agent_bytes_in_total",
        "Bytes from servers to local destinations.",
        m.bytes_in.load(Ordering::Relaxed),
    )?;
    let held = m.replicas.held();
    let replicas = m.replicas.replicas();
    out.gauge(
        "netd_tunnel_agent_replicas_linked",
        "Distinct tunnel server replicas linked now, draining ones aside.",
        held.live as u64,
    )?;
    out.gauge(
        "netd_tunnel_agent_replicas_draining",
        "Linked replicas that announced they drain.",
        replicas.iter().filter(|(_, draining)| *draining).count() as u64,
    )?;
    out.gauge(
        "netd_tunnel_agent_replicas_expected",
        "Replicas serving the fleet, per their latest status.",
        u64::from(held.expected),
    )?;
    out.counter(
        "netd_tunnel_agent_duplicate_links_total",
        "Links closed at once because they reached a replica already linked.",
        m.duplicate_links.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_agent_bad_statuses_total",
        "Replica statuses refused as malformed.",
        m.bad_statuses.load(Ordering::Relaxed),
    )?;
    out.counter(
        "netd_tunnel_agent_bytes_out_total",
        "Bytes from local destinations to servers.",
        m.bytes_out.load(Ordering::Relaxed),
    )
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
        tasks.spawn(serve_metrics(bind(addr).await?, agent_collector(metrics)));
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}
