//! `netd-controller`: the cloud side of node lifecycle (SPEC §4).
//!
//! - [`tolerations`]: pods on autonomous edge nodes are not evicted: their
//!   `not-ready`/`unreachable` tolerations are lengthened while the node is
//!   autonomous and given back exactly when it is not.
//! - [`leader`]: leader election on a Lease, so of several replicas one
//!   writes cluster state.
//! - [`node_watch`]: the one list+watch of Nodes (a slim store) that role
//!   labelling, tolerations, the tunnel configuration and rollouts share:
//!   one Node list and one Node watch per process, one relist after an API
//!   blip.
//! - [`tunnel_config`]: the edge/cloud node sets and the
//!   `edge-tunnel-server-cfg` ConfigMap drive this cloud node's eBPF DNAT.
//! - The rollout executor ([`crate::rollout::kubernetes`]): batched
//!   upgrades of the netd DaemonSet.
//!
//! Cluster-wide writers run only on the elected leader; the DNAT of a cloud
//! node is that node's own, so every replica drives its own.

pub mod leader;
pub mod node_watch;
pub mod nodes;
pub mod tolerations;
pub mod tunnel_config;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use netd_kube::KubeClient;

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// Leader election could not run, or this replica lost the lease.
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
    /// This replica stopped leading: it must not write any more.
    #[error("{0}")]
    LostLeadership(leader::LeaderLost),
    /// The node controller stopped.
    #[error(transparent)]
    Nodes(#[from] nodes::NodesError),
    /// The tunnel configuration driver stopped.
    #[error(transparent)]
    Tunnel(#[from] tunnel_config::TunnelConfigError),
    /// A part ended that should run for ever.
    #[error("{0} stopped: {1}")]
    PartStopped(&'static str, String),
    /// The health/metrics listener.
    #[error("listening on {addr} for health and metrics: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// This cloud node's tunnel DNAT, driven on every replica.
pub struct TunnelPart {
    /// The attached DNAT, its target set.
    pub dnat: netd_ebpf::dnat::TunnelDnat,
    /// Which addresses and whose Events.
    pub options: tunnel_config::TunnelConfigOptions,
}

/// What `netd-controller run` runs.
pub struct ControllerOptions {
    /// The API server.
    pub client: KubeClient,
    /// Who leads.
    pub election: leader::ElectionConfig,
    /// Roles and pod CIDRs.
    pub nodes: nodes::NodeOptions,
    /// `/healthz`, `/readyz` and `/metrics` (`None`: not served).
    pub metrics_listen: Option<SocketAddr>,
    /// The tunnel DNAT of this node (`None`: not driven here).
    pub tunnel: Option<TunnelPart>,
    /// The rollout executor.
    pub rollout: crate::rollout::kubernetes::ExecutorOptions,
}

/// Every part's counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct ControllerMetrics {
    /// This replica leads.
    pub leader: AtomicBool,
    /// The node controller's.
    pub nodes: Arc<nodes::NodeMetrics>,
    /// The tunnel configuration's.
    pub tunnel: Arc<tunnel_config::TunnelConfigMetrics>,
    /// The toleration controller's.
    pub tolerations: Arc<tolerations::TolerationMetrics>,
    /// The rollout executor's.
    pub rollout: Arc<crate::rollout::kubernetes::RolloutMetrics>,
}

impl ControllerMetrics {
    /// Every part's counters in Prometheus' text format: one registry
    /// holding each part's collector, encoded once.
    pub fn render_prometheus(&self) -> String {
        let mut registry = netd_metrics::Registry::default();
        registry.register_collector(Box::new(Leader(self.leader.load(Ordering::Relaxed))));
        registry.register_collector(Box::new(self.nodes.clone()));
        registry.register_collector(Box::new(self.tunnel.clone()));
        registry.register_collector(Box::new(self.tolerations.clone()));
        registry.register_collector(Box::new(self.rollout.clone()));
        netd_metrics::encode(&registry)
    }

    /// What `/metrics` serves: [`Self::render_prometheus`], and the
    /// counters of the tunnel DNAT this replica drives (`netd_dnat_*`; the
    /// node binary links no BPF loader, so they are served here, where the
    /// DNAT is attached), read from its maps on the blocking pool.
    pub async fn render(&self) -> String {
        let mut out = self.render_prometheus();
        out.push_str(&self.tunnel.clone().render_dnat().await);
        out
    }
}

/// `netd_controller_leader`, as it was when the scrape began.
#[derive(Debug)]
struct Leader(bool);

impl netd_metrics::Collector for Leader {
    fn encode(&self, encoder: netd_metrics::DescriptorEncoder) -> std::fmt::Result {
        netd_metrics::Families::new(encoder).gauge(
            "netd_controller_leader",
            "1 while this replica holds the leader lease.",
            u64::from(self.0),
        )
    }
}

/// Runs the controller until `shutdown` completes (then the lease is given
/// up, so another replica takes over at once) or this replica loses the
/// lease (an error: the process should exit and be restarted, as
/// kube-controller-manager does, so nothing of the old term lingers).
pub async fn run(
    options: ControllerOptions,
    metrics: Arc<ControllerMetrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ControllerError> {
    if let Some(addr) = options.metrics_listen {
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| ControllerError::Listen { addr, source })?;
        let served = metrics.clone();
        tokio::spawn(netd_metrics::serve_text(listener, move |path| {
            let metrics = served.clone();
            async move {
                match path.as_str() {
                    "/healthz" | "/readyz" => (http::StatusCode::OK, "ok\n".to_string()),
                    "/metrics" => (http::StatusCode::OK, metrics.render().await),
                    _ => (http::StatusCode::NOT_FOUND, "not found\n".to_string()),
                }
            }
        }));
    }
    let mut elector = leader::LeaderElector::new(&options.client, options.election.clone())?;
    // Every part reads the Nodes from this one list+watch, started by the
    // first part that subscribes (a follower without a DNAT watches none).
    let nodes = node_watch::NodeWatch::new(&options.client);
    // Node-local: every replica drives its own node's DNAT, leader or not.
    let mut everywhere = tokio::task::JoinSet::new();
    if let Some(TunnelPart { dnat, options: tunnel }) = options.tunnel {
        let (client, nodes, counters) = (options.client.clone(), nodes.clone(), metrics.tunnel.clone());
        everywhere.spawn(async move { tunnel_config::run_on(client, nodes, dnat, tunnel, counters).await });
    }
    let stopped =
        |ended: Option<Result<Result<(), tunnel_config::TunnelConfigError>, tokio::task::JoinError>>| match ended {
            Some(Ok(Err(error))) => ControllerError::Tunnel(error),
            Some(Ok(Ok(()))) => ControllerError::PartStopped("the tunnel configuration", "it returned".into()),
            Some(Err(join)) => ControllerError::PartStopped("the tunnel configuration", join.to_string()),
            None => ControllerError::PartStopped("the tunnel configuration", "not running".into()),
        };
    tokio::pin!(shutdown);
    tokio::select! {
        acquired = elector.acquire() => acquired?,
        ended = everywhere.join_next(), if !everywhere.is_empty() => return Err(stopped(ended)),
        () = &mut shutdown => return Ok(()),
    }
    metrics.leader.store(true, Ordering::Relaxed);
    let mut leading = tokio::task::JoinSet::new();
    leading.spawn({
        let (client, watch) = (options.client.clone(), nodes.clone());
        let (settings, counters) = (options.nodes.clone(), metrics.nodes.clone());
        async move {
            ("node controller", nodes::run_on(client, watch, settings, counters).await.map_err(|e| e.to_string()))
        }
    });
    leading.spawn({
        let (client, watch, counters) = (options.client.clone(), nodes.clone(), metrics.tolerations.clone());
        async move {
            ("toleration controller", tolerations::run_on(client, watch, counters).await.map_err(|e| e.to_string()))
        }
    });
    leading.spawn({
        let (client, watch) = (options.client.clone(), nodes.clone());
        let (rollout, counters) = (options.rollout.clone(), metrics.rollout.clone());
        async move {
            (
                "rollout executor",
                crate::rollout::kubernetes::run_on(client, watch, rollout, counters).await.map_err(|e| e.to_string()),
            )
        }
    });
    let outcome = tokio::select! {
        lost = elector.hold() => Err(ControllerError::LostLeadership(lost)),
        ended = leading.join_next() => Err(match ended {
            Some(Ok((part, Err(error)))) => ControllerError::PartStopped(part, error),
            Some(Ok((part, Ok(())))) => ControllerError::PartStopped(part, "it returned".into()),
            Some(Err(join)) => ControllerError::PartStopped("a leader task", join.to_string()),
            None => ControllerError::PartStopped("the leader tasks", "none ran".into()),
        }),
        ended = everywhere.join_next(), if !everywhere.is_empty() => Err(stopped(ended)),
        () = &mut shutdown => Ok(()),
    };
    // Stop writing before anyone else may start.
    leading.abort_all();
    while leading.join_next().await.is_some() {}
    metrics.leader.store(false, Ordering::Relaxed);
    if outcome.is_ok() {
        if let Err(error) = elector.release().await {
            tracing::warn!("leader election: giving up the lease: {error}");
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_every_part_once_leader_first() {
        let metrics = ControllerMetrics::default();
        metrics.leader.store(true, Ordering::Relaxed);
        metrics.rollout.phase.store(2, Ordering::Relaxed);
        let text = metrics.render_prometheus();
        assert!(
            text.starts_with(
                "# HELP netd_controller_leader 1 while this replica holds the leader lease.\n\
                 # TYPE netd_controller_leader gauge\nnetd_controller_leader 1\n"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE netd_rollout_phase gauge\nnetd_rollout_phase 2\n"), "{text}");
        let families: Vec<_> = text.lines().filter_map(|line| line.strip_prefix("# TYPE ")).collect();
        assert_eq!(families.len(), 1 + 8 + 12 + 5 + 4, "{text}");
        let first = |prefix: &str| families.iter().position(|f| f.starts_with(prefix)).unwrap();
        let order = ["netd_controller_leader", "netd_controller_cloud", "netd_tunnel_config_", "netd_controller_tol"];
        assert!(order.windows(2).all(|w| first(w[0]) < first(w[1])) && first(order[3]) < first("netd_rollout_"));
    }
}
