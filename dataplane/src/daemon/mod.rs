//! The per-node daemon behind `netd run`.
//!
//! Start-up order is what makes a node autonomous: VTEP MAC from the local
//! store, then the offline snapshot programmed (device, peers, subnet.env,
//! masquerade), then — only then — the registry, contacted with backoff
//! forever. The daemon never exits because the registry is unreachable. Every
//! reconnect starts with a full resync; peers whose leases vanish are
//! removed except autonomous ones, whose entries are kept (their node may be
//! cut off, not gone). SIGTERM stops the daemon and leaves the kernel state
//! in place, so pods keep talking through restarts and upgrades; `netd
//! cleanup` removes what netd made.

//!
//! The async runtime (one thread) only waits: every call that can block —
//! SQLite behind its busy timeout, the `nft` child, the overlay thread's
//! join, fsyncs — runs on the blocking pool, so `/healthz`, `/metrics` and
//! SIGTERM always answer. Registry events become per-peer changes for the
//! overlay's incremental path; a resync is a full pass.
//!
//! Layout: this file is the start-up order and the registry loop;
//! [`peers`] the peer-set policy, [`underlay`] the underlay discovery,
//! `cleanup` `netd cleanup` ([`cleanup()`](fn@cleanup)), [`config`] the settings, [`health`] the
//! HTTP endpoints. Registry construction is [`netd_registry::AnyRegistry`].

mod cleanup;
pub mod config;
pub mod health;
pub mod peers;
pub mod pins;
pub mod underlay;

use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use ipnet::{IpNet, Ipv4Net};
use netd_ipam::Store;

use crate::masquerade::{Masquerade, MasqueradeError};
use crate::vxlan::snapshot::Snapshot;
use crate::vxlan::{Lease, Overlay, OverlayConfig, OverlayOptions, FLANNEL_VXLAN_PORT, VXLAN_OVERHEAD};
use netd_kube::pods::PodWatch;
use netd_kube::{KubeClient, KubeConfig, KubeError};
use netd_model::subnet_env::SubnetEnv;
use netd_model::MacAddr;
use netd_registry::{
    AnyRegistry, LeaseRequest, NetworkConfig, OpenSettings, OwnLease, PeerEvent, PeerLease, Registry, RegistryError,
    RENEW_MARGIN,
};

pub use cleanup::{cleanup, CleanupError};
pub use config::{DaemonConfig, PodSource, RegistrySpec};
use health::Shared;
use peers::{Folded, PeerSet};
use pins::{PinKeeper, Stores};
pub use underlay::{resolve_underlay, Underlay, UnderlayError};

/// Errors that stop the daemon (configuration and local state only; never
/// the registry).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The settings cannot work ([`DaemonConfig::check`] says why).
    #[error("configuration: {0}")]
    Config(String),
    /// The VTEP MAC store failed.
    #[error("VTEP MAC store: {0}")]
    MacStore(#[from] netd_ipam::Error),
    /// The health listener could not bind.
    #[error("cannot listen on {addr} for health and metrics: {source}")]
    Health {
        /// The address.
        addr: std::net::SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// The configured registry cannot be set up (bad settings or files).
    #[error("cannot set up the registry: {0}")]
    Unsupported(#[source] RegistryError),
    /// The pod source cannot be set up (bad settings or files).
    #[error("cannot set up the pod source: {0}")]
    Pods(#[source] KubeError),
    /// The pod source's CA file cannot be read.
    #[error("cannot set up the pod source: reading the CA file {}: {source}", path.display())]
    PodsCaFile {
        /// The CA file.
        path: std::path::PathBuf,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// An `nft` transaction (masquerade rules) failed.
    #[error(transparent)]
    Masquerade(#[from] MasqueradeError),
    /// A blocking task died (it panicked or the runtime is shutting down).
    #[error("blocking task `{what}` did not finish: {source}")]
    Task {
        /// What the task was doing.
        what: &'static str,
        /// Why it ended.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Runs `f` on the blocking pool and waits for it without blocking the
/// runtime thread.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, DaemonError> {
    tokio::task::spawn_blocking(f).await.map_err(|source| DaemonError::Task { what, source })
}

struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: Duration::from_millis(500) }
    }

    fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(15));
        now
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(500);
    }
}

/// Runs the daemon on the caller's tokio runtime until `shutdown`
/// completes, then stops the overlay thread and returns; the kernel state
/// (VXLAN device, routes, neighbours, FDB entries) is left in place, so pod
/// traffic keeps flowing while the daemon is away.
///
/// It builds no runtime, installs no signal handler and changes no
/// process-wide setting: the caller owns those (the `netd run` binary
/// passes a future that completes on SIGTERM or SIGINT). Its blocking work
/// (SQLite, netlink dumps) goes to the runtime's blocking pool. It works on
/// a current-thread runtime as well as a multi-thread one; whichever
/// network namespace the runtime's threads are in is the one it programs.
///
/// ```no_run
/// # async fn demo(config: netd_dataplane::daemon::DaemonConfig) -> Result<(), netd_dataplane::daemon::DaemonError> {
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let daemon = tokio::spawn(netd_dataplane::daemon::run(config, async move { let _ = stopped.await; }));
/// // … the host application runs; when it winds down:
/// let _ = stop.send(());
/// daemon.await.ok();
/// # Ok(()) }
/// ```
pub async fn run(config: DaemonConfig, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    config.check().map_err(DaemonError::Config)?;
    Daemon::new(config).main(shutdown).await
}

/// How long a process that ran [`run`] should let its runtime's blocking
/// calls still running (a SQLite call inside its 10 s busy timeout, say)
/// finish before exiting anyway (`Runtime::shutdown_timeout`): dropping a
/// runtime would wait for every one of them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(300);

struct Daemon {
    config: DaemonConfig,
    shared: Arc<Shared>,
    overlay: Option<Overlay>,
    /// What `overlay` was started with.
    running: Option<OverlayConfig>,
    underlay: Option<Underlay>,
    mac: Option<MacAddr>,
    masquerade_applied: Option<(Ipv4Net, Ipv4Net)>,
    /// The snapshot's peers with their autonomy: the peer set until the
    /// registry's first resync replaces it (autonomous ones may survive it,
    /// as the registry may no longer hold their leases).
    restored_peers: PeerSet,
}

impl Daemon {
    fn new(config: DaemonConfig) -> Self {
        let shared = Shared::default();
        #[cfg(feature = "dnat")]
        {
            *shared.dnat_pin_dir.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(netd_ebpf::dnat::DEFAULT_PIN_DIR.into());
        }
        Self {
            config,
            shared: Arc::new(shared),
            overlay: None,
            running: None,
            underlay: None,
            mac: None,
            masquerade_applied: None,
            restored_peers: PeerSet::default(),
        }
    }

    async fn main(mut self, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
        let listener = health::bind(self.config.health_addr)
            .await
            .map_err(|source| DaemonError::Health { addr: self.config.health_addr, source })?;
        tokio::spawn(health::serve(listener, self.shared.clone()));
        let (store, node) = (self.config.mac_store_path(), self.config.node_name.clone());
        let mac = blocking("opening the VTEP MAC store", move || Store::open(store)?.vtep_mac(&node, &[])).await??;
        tracing::info!(node = %self.config.node_name, vtep_mac = %mac.mac, from_store = mac.from_store, "VTEP MAC pinned");
        self.mac = Some(mac.mac);

        let work = async {
            self.restore_snapshot().await;
            self.registry_loop().await
        };
        let outcome = tokio::select! {
            result = work => result,
            () = shutdown => { tracing::info!("stopping: kernel state left in place"); Ok(()) }
        };
        if let Some(overlay) = self.overlay.take() {
            blocking("stopping the overlay thread", move || overlay.stop()).await?;
        }
        outcome
    }

    /// Resolves the underlay, retrying until it exists (it may come up late
    /// after a reboot).
    async fn underlay(&mut self) -> Underlay {
        if let Some(u) = &self.underlay {
            return u.clone();
        }
        let mut backoff = Backoff::new();
        loop {
            match resolve_underlay(self.config.iface.as_deref(), self.config.public_ip) {
                Ok(u) => {
                    tracing::info!(iface = %u.name, public_ip = %u.public_ip, mtu = u.mtu, "underlay");
                    self.underlay = Some(u.clone());
                    return u;
                }
                Err(reason) => {
                    tracing::warn!(%reason, "underlay not usable yet; retrying");
                    tokio::time::sleep(backoff.step()).await;
                }
            }
        }
    }

    /// Programs the snapshot, if any, before any registry is contacted.
    async fn restore_snapshot(&mut self) {
        let path = self.config.snapshot_path();
        let read = path.clone();
        let snapshot = match blocking("reading the snapshot", move || Snapshot::load(&read)).await {
            Ok(Ok(Some(s))) => s,
            Ok(Ok(None)) => {
                tracing::info!(path = %path.display(), "no snapshot yet: waiting for the registry");
                return;
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "snapshot unusable: waiting for the registry");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "snapshot unreadable: waiting for the registry");
                return;
            }
        };
        if snapshot.config.own.node.as_deref().is_some_and(|n| n != self.config.node_name) {
            tracing::warn!(path = %path.display(), "snapshot belongs to another node name; ignored");
            return;
        }
        let underlay = self.underlay().await;
        let mut overlay_config = snapshot.config.clone();
        overlay_config.underlay = underlay.name.clone();
        overlay_config.own.public_ip = underlay.public_ip;
        if let Some(mac) = self.mac {
            overlay_config.own.vtep_mac = mac;
        }
        let autonomous: std::collections::HashSet<Ipv4Net> = snapshot.autonomous.iter().copied().collect();
        self.restored_peers = PeerSet::new(snapshot.peers.iter().map(|lease| PeerLease {
            lease: lease.clone(),
            autonomous: autonomous.contains(&lease.subnet),
            cloud: false,
        }));
        tracing::info!(
            peers = snapshot.peers.len(),
            autonomous = snapshot.autonomous.len(),
            subnet = %overlay_config.own.subnet,
            "restoring from snapshot"
        );
        self.apply_overlay(overlay_config, snapshot.peers, snapshot.autonomous, &underlay).await;
    }

    /// Starts (or restarts, when the configuration changed) the overlay and
    /// writes subnet.env and masquerade to match.
    async fn apply_overlay(
        &mut self,
        overlay_config: OverlayConfig,
        peers: Vec<Lease>,
        autonomous: Vec<Ipv4Net>,
        underlay: &Underlay,
    ) {
        let options =
            OverlayOptions { snapshot: Some(self.config.snapshot_path()), autonomous, ..OverlayOptions::default() };
        if let Some(old) = self.overlay.take() {
            *self.shared.overlay.lock().unwrap_or_else(PoisonError::into_inner) = None;
            if let Err(error) = blocking("stopping the overlay thread", move || old.stop()).await {
                tracing::warn!(%error, "the old overlay thread did not stop cleanly");
            }
        }
        self.running = None;
        match Overlay::start(overlay_config.clone(), peers, options) {
            Ok(overlay) => {
                *self.shared.overlay.lock().unwrap_or_else(PoisonError::into_inner) = Some(overlay.status_handle());
                self.overlay = Some(overlay);
                self.running = Some(overlay_config.clone());
            }
            Err(error) => tracing::error!(%error, "cannot start the overlay"),
        }
        let env = SubnetEnv {
            network: IpNet::V4(overlay_config.network),
            subnet: IpNet::V4(
                Ipv4Net::new(
                    Ipv4Addr::from(u32::from(overlay_config.own.subnet.network()) + 1),
                    overlay_config.own.subnet.prefix_len(),
                )
                .unwrap_or(overlay_config.own.subnet),
            ),
            mtu: underlay.mtu.saturating_sub(VXLAN_OVERHEAD),
            ipmasq: self.config.masquerade,
        };
        let path = self.config.subnet_env.clone();
        match blocking("writing subnet.env", move || env.write(&path)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "cannot write subnet.env"),
            Err(error) => tracing::warn!(%error, "cannot write subnet.env"),
        }
        self.apply_masquerade(overlay_config.network, overlay_config.own.subnet).await;
    }

    async fn apply_masquerade(&mut self, network: Ipv4Net, subnet: Ipv4Net) {
        if !self.config.masquerade {
            if let Err(error) = nft("removing masquerade rules", Masquerade::remove).await {
                tracing::warn!(%error, "cannot remove masquerade rules");
            }
            return;
        }
        if self.masquerade_applied == Some((network, subnet)) {
            return;
        }
        match nft("installing masquerade rules", move || Masquerade::new(network, subnet)?.apply()).await {
            Ok(()) => self.masquerade_applied = Some((network, subnet)),
            Err(error) => tracing::warn!(%error, "cannot install masquerade rules"),
        }
    }

    /// Someone flushed or edited our nftables table: put it back.
    async fn repair_masquerade(&mut self) {
        let Some((network, subnet)) = self.masquerade_applied else { return };
        match nft("checking masquerade rules", move || Masquerade::new(network, subnet)?.ensure()).await {
            Ok(true) => tracing::warn!("masquerade rules had drifted; re-applied"),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "cannot check masquerade rules"),
        }
    }

    async fn registry_loop(&mut self) -> Result<(), DaemonError> {
        let settings = OpenSettings {
            node_name: self.config.node_name.clone(),
            network: self.config.network,
            token_file: self.config.token_file.clone(),
            ca_file: self.config.ca_file.clone(),
            client_cert: self.config.client_cert.clone(),
            poll: netd_registry::embedded::DEFAULT_POLL,
        };
        let registry = AnyRegistry::open(&self.config.registry, &settings).await.map_err(DaemonError::Unsupported)?;
        self.start_pin_keeper(&registry)?;
        self.drive(registry).await
    }

    /// Starts freeing the pinned IPs of pods that are gone, when a pod
    /// source is configured: the Kubernetes registry's own client (one
    /// client for nodes and pods), or a separate API server.
    fn start_pin_keeper(&self, registry: &AnyRegistry) -> Result<(), DaemonError> {
        let client = match (&self.config.pods, registry) {
            (PodSource::Registry, AnyRegistry::Kubernetes(kube)) => kube.client().clone(),
            // The embedded and etcd registries know no pods.
            (PodSource::None, _) | (PodSource::Registry, _) => {
                tracing::info!("no pod source: pinned IPs are freed only by the plugin's pressure reclaim");
                return Ok(());
            }
            (PodSource::Kubernetes(server), _) => {
                let config = match server {
                    None => match &self.config.client_cert {
                        Some(files) => KubeConfig::in_cluster_with_cert(
                            files.clone(),
                            self.config.ca_file.as_deref(),
                            &self.config.node_name,
                        ),
                        None => KubeConfig::in_cluster(),
                    }
                    .map_err(DaemonError::Pods)?,
                    Some(server) => KubeConfig {
                        server: server.clone(),
                        token: None,
                        token_file: self.config.token_file.clone(),
                        ca_cert_pem: match &self.config.ca_file {
                            Some(path) => Some(
                                std::fs::read(path)
                                    .map_err(|source| DaemonError::PodsCaFile { path: path.clone(), source })?,
                            ),
                            None => None,
                        },
                        client_cert: self.config.client_cert.clone(),
                        node_name: self.config.node_name.clone(),
                        network: None,
                    },
                };
                KubeClient::new(&config).map_err(DaemonError::Pods)?
            }
        };
        let watch = PodWatch::new(&client, &self.config.node_name).map_err(DaemonError::Pods)?;
        let stores = if self.config.ipam_stores.is_empty() {
            Stores::Discover(self.config.cni_conf_dir.clone())
        } else {
            Stores::Given(self.config.ipam_stores.clone())
        };
        tracing::info!(server = %client.server(), grace = ?self.config.pin_grace, ?stores, "keeping IPAM stores tidy from the pod watch");
        let keeper = PinKeeper { stores, grace: self.config.pin_grace };
        tokio::spawn(keeper.run(watch, self.shared.clone()));
        Ok(())
    }

    fn set_connected(&self, connected: bool) {
        *self.shared.registry_connected.lock().unwrap_or_else(PoisonError::into_inner) = connected;
    }

    /// Hands what an event did to the overlay: a whole set for a full pass,
    /// per-peer changes for the incremental path.
    fn push(&self, folded: Folded, peers: &PeerSet) {
        let Some(overlay) = &self.overlay else { return };
        let sent = match folded {
            Folded::Replaced => overlay.set_peers_marking(peers.leases(), peers.autonomous_subnets()),
            Folded::Changed(changes) if changes.is_empty() => Ok(()),
            Folded::Changed(changes) => overlay.apply(changes),
        };
        if let Err(error) = sent {
            tracing::error!(%error, "overlay thread gone");
        }
    }

    /// Lease, then watch forever; every failure is retried with backoff.
    async fn drive(&mut self, mut registry: AnyRegistry) -> Result<(), DaemonError> {
        let underlay = self.underlay().await;
        let mac = self.mac.unwrap_or(MacAddr([0x02, 0, 0, 0, 0, 1]));
        let previous_subnet = SubnetEnv::read(&self.config.subnet_env).ok().and_then(|e| match e.subnet {
            IpNet::V4(s) => Some(s.trunc()),
            IpNet::V6(_) => None,
        });
        let request = LeaseRequest {
            node: self.config.node_name.clone(),
            public_ip: underlay.public_ip,
            vtep_mac: mac,
            previous_subnet,
        };
        let mut backoff = Backoff::new();
        let (network, mut own) = loop {
            match lease(&mut registry, &request).await {
                Ok(got) => break got,
                Err(error) => {
                    self.set_connected(false);
                    tracing::warn!(registry = %registry.describe(), %error, "registry not usable; running from local state");
                    tokio::time::sleep(backoff.step()).await;
                }
            }
        };
        backoff.reset();
        self.set_connected(true);
        tracing::info!(registry = %registry.describe(), subnet = %own.lease.subnet, "lease acquired");

        // The snapshot's peers stay until the registry's first resync, which
        // keeps only the autonomous ones whose leases are gone.
        let mut peers = std::mem::take(&mut self.restored_peers).without_overlapping(own.lease.subnet);
        self.configure(&network, &own, &peers, &underlay).await;
        let mut renew = tokio::time::interval(Duration::from_secs(30));
        renew.tick().await;
        loop {
            tokio::select! {
                event = registry.next_event(own.lease.subnet) => match event {
                    Ok(event) => {
                        if !*self.shared.registry_connected.lock().unwrap_or_else(PoisonError::into_inner) {
                            tracing::info!(registry = %registry.describe(), "registry reachable again");
                        }
                        self.set_connected(true);
                        backoff.reset();
                        let resync = matches!(event, PeerEvent::Resync(_));
                        let folded = peers.apply(event);
                        if resync {
                            *self.shared.last_sync.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
                        }
                        self.push(folded, &peers);
                    }
                    Err(error) => {
                        self.set_connected(false);
                        tracing::warn!(registry = %registry.describe(), %error, "registry lost; keeping every peer");
                        tokio::time::sleep(backoff.step()).await;
                    }
                },
                _ = renew.tick() => {
                    self.repair_masquerade().await;
                    let due = own.expires_at.is_some_and(|t| t.duration_since(SystemTime::now()).unwrap_or_default() < RENEW_MARGIN);
                    if due {
                        match registry.renew_lease(&own).await {
                            Ok(renewed) => {
                                if renewed.lease.subnet != own.lease.subnet {
                                    tracing::warn!(old = %own.lease.subnet, new = %renewed.lease.subnet, "lease moved");
                                    own = renewed;
                                    self.configure(&network, &own, &peers, &underlay).await;
                                } else {
                                    own = renewed;
                                }
                            }
                            Err(error) => tracing::warn!(%error, "lease renewal failed; will retry"),
                        }
                    }
                }
            }
        }
    }

    async fn configure(&mut self, network: &NetworkConfig, own: &OwnLease, peers: &PeerSet, underlay: &Underlay) {
        let overlay_config = OverlayConfig {
            network: network.network,
            own: own.lease.clone(),
            vni: network.vni,
            port: FLANNEL_VXLAN_PORT,
            underlay: underlay.name.clone(),
            direct_routing: self.config.direct_routing,
        };
        if self.running.as_ref() == Some(&overlay_config) {
            // Snapshot restore already runs this exact configuration: keep
            // its peers until the registry's resync replaces them.
            return;
        }
        self.apply_overlay(overlay_config, peers.leases(), peers.autonomous_subnets(), underlay).await;
    }
}

/// Runs an `nft` transaction (a child process) on the blocking pool.
async fn nft<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, MasqueradeError> + Send + 'static,
) -> Result<T, DaemonError> {
    Ok(blocking(what, f).await??)
}

async fn lease<R: Registry>(
    registry: &mut R,
    request: &LeaseRequest,
) -> Result<(NetworkConfig, OwnLease), RegistryError> {
    let network = registry.network_config().await?;
    let own = registry.acquire_lease(&network, request).await?;
    Ok((network, own))
}
