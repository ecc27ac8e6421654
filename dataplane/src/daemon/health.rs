//! `/healthz`, `/readyz` and Prometheus `/metrics` over plain HTTP/1.1 (hyper, [`netd_metrics`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use http::StatusCode;
use tokio::net::TcpListener;

use crate::vxlan::StatusHandle;

/// What the daemon shares with the health endpoint.
#[derive(Default)]
pub struct Shared {
    /// The running overlay's status, once started (a handle: reading it
    /// never waits for the overlay thread).
    pub overlay: Mutex<Option<StatusHandle>>,
    /// Registry reachable and our lease held.
    pub registry_connected: Mutex<bool>,
    /// Last full resync from the registry.
    pub last_sync: Mutex<Option<Instant>>,
    /// Peers refused by the registry layer or validation, last pass.
    pub registry_errors: Mutex<u64>,
    /// The IPAM stores' pins, once the pin keeper runs.
    pub pins: Mutex<Option<super::pins::PinMetrics>>,
    /// Where a tunnel DNAT would be pinned: its counters join /metrics
    /// whenever one is (on cloud nodes; whoever applied it), in builds
    /// with the `dnat` feature.
    pub dnat_pin_dir: Mutex<Option<std::path::PathBuf>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Ready: the overlay has been programmed once without error.
    pub fn ready(&self) -> bool {
        lock(&self.overlay).as_ref().is_some_and(|o| {
            let status = o.get();
            status.last.is_some() && status.last_error.is_none()
        })
    }

    /// The Prometheus text exposition of [`Shared`]'s collector.
    pub fn metrics(self: &Arc<Self>) -> String {
        netd_metrics::render(self.clone())
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("ready", &self.ready()).finish_non_exhaustive()
    }
}

/// The daemon's families, read at scrape time: the overlay's status handle
/// (never waits for the overlay thread), the registry state, the pins.
impl netd_metrics::Collector for Shared {
    fn encode(&self, encoder: netd_metrics::DescriptorEncoder) -> std::fmt::Result {
        let status = lock(&self.overlay).as_ref().map(StatusHandle::get).unwrap_or_default();
        let connected = *lock(&self.registry_connected);
        let since_sync = lock(&self.last_sync).map(|t| t.elapsed().as_secs_f64()).unwrap_or(-1.0);
        let last = status.last.as_ref();
        let mut out = netd_metrics::Families::new(encoder);
        out.gauge("netd_peers_programmed", "Peers programmed on the VXLAN device.", status.peers as u64)?;
        out.gauge(
            "netd_peers_rejected",
            "Peers refused by validation in the last pass.",
            last.map_or(0, |r| r.rejected.len()) as u64,
        )?;
        out.gauge(
            "netd_reconcile_seconds",
            "Duration of the last reconcile pass.",
            last.map_or(0.0, |r| r.elapsed.as_secs_f64()),
        )?;
        out.counter("netd_reconciles_total", "Full reconcile passes run.", status.reconciles)?;
        out.counter(
            "netd_peer_changes_applied_total",
            "Batches of registry changes applied without a full pass.",
            status.applies,
        )?;
        out.gauge(
            "netd_peer_change_apply_seconds",
            "Duration of the last batch of registry changes (journal excluded).",
            status.last_apply.as_ref().map_or(0.0, |r| r.elapsed.as_secs_f64()),
        )?;
        out.counter(
            "netd_snapshot_bytes_written_total",
            "Bytes written to the offline snapshot and its journal.",
            status.snapshot_bytes_written,
        )?;
        out.counter("netd_netlink_errors_total", "Kernel writes refused.", status.netlink_errors)?;
        out.counter("netd_device_repairs_total", "VXLAN device drift repairs.", status.repairs)?;
        out.gauge("netd_registry_connected", "1 when the registry is reachable.", u64::from(connected))?;
        out.gauge(
            "netd_seconds_since_last_sync",
            "Seconds since the last full registry resync (-1: never).",
            since_sync,
        )?;
        out.gauge("netd_ready", "1 once the overlay is programmed.", u64::from(self.ready()))?;
        let Some(pins) = lock(&self.pins).clone() else { return Ok(()) };
        let stats = pins.stats;
        out.gauges(
            "netd_ipam_pins",
            "Pinned pod IPs in the node's IPAM stores, by state.",
            [([("state", "attached")], stats.attached), ([("state", "released")], stats.released)],
        )?;
        out.counters(
            "netd_ipam_pins_freed_total",
            "Pinned pod IPs freed, by reason.",
            netd_ipam::FreeReason::ALL.map(|reason| ([("reason", reason.as_str())], stats.freed.get(reason))),
        )?;
        out.gauge("netd_ipam_stores", "IPAM stores kept tidy.", pins.stores as u64)?;
        out.gauge("netd_pods_bound", "Pods bound to this node, per the pod watch.", pins.pods as u64)?;
        out.gauge("netd_pods_synced", "1 while the pod view is authoritative.", u64::from(pins.synced))
    }
}

/// The tunnel DNAT's counters in Prometheus' text format, or nothing when
/// no DNAT is pinned under `pin_dir` (the common case: edge nodes). Reads
/// the pinned maps: a few bpf(2) calls, one per edge node to count them.
/// Feature `dnat`; without it the daemon links no BPF loader and
/// `netd-controller`, which attaches the DNAT, is where its counters are.
#[cfg(feature = "dnat")]
pub fn dnat_metrics(pin_dir: &std::path::Path) -> String {
    match netd_ebpf::dnat::TunnelDnat::open(pin_dir).and_then(|dnat| dnat.stats()) {
        Ok(stats) => stats.render_prometheus(),
        Err(netd_ebpf::dnat::DnatError::NotAttached { .. }) => String::new(),
        Err(err) => {
            tracing::debug!("tunnel DNAT counters unavailable: {err}");
            String::new()
        }
    }
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    netd_metrics::serve_text(listener, move |path| {
        let shared = shared.clone();
        async move {
            match path.as_str() {
                "/healthz" => (StatusCode::OK, "ok\n".to_string()),
                "/readyz" if shared.ready() => (StatusCode::OK, "ready\n".to_string()),
                "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "overlay not programmed yet\n".to_string()),
                "/metrics" => {
                    #[cfg_attr(not(feature = "dnat"), allow(unused_mut))]
                    let mut text = shared.metrics();
                    #[cfg(feature = "dnat")]
                    let dnat_pins = lock(&shared.dnat_pin_dir).clone();
                    #[cfg(feature = "dnat")]
                    if let Some(dir) = dnat_pins {
                        // bpf(2) calls, proportional to the edge nodes: off the runtime threads.
                        text.push_str(
                            &tokio::task::spawn_blocking(move || dnat_metrics(&dir)).await.unwrap_or_default(),
                        );
                    }
                    (StatusCode::OK, text)
                }
                _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
            }
        }
    })
    .await
}

/// Binds the health listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
