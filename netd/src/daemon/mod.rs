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

pub mod config;
pub mod health;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use ipnet::{IpNet, Ipv4Net};
use netd_ipam::Store;

use crate::model::MacAddr;

use crate::masquerade::Masquerade;
use crate::netlink::{Handle, RouteVia};
use crate::registry::embedded::EmbeddedRegistry;
use crate::registry::{LeaseRequest, NetworkConfig, OwnLease, PeerEvent, PeerLease, Registry, RENEW_MARGIN};
use crate::subnet_env::SubnetEnv;
use crate::vxlan::snapshot::Snapshot;
use crate::vxlan::{Lease, Overlay, OverlayConfig, OverlayOptions, FLANNEL_VXLAN_PORT, VXLAN_OVERHEAD};

pub use config::{DaemonConfig, RegistrySpec};
use health::Shared;

/// Errors that stop the daemon (configuration and local state only; never
/// the registry).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The tokio runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
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
    Unsupported(String),
    /// Waiting for signals failed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// The underlay as resolved from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// Interface name.
    pub name: String,
    /// Public IP.
    pub public_ip: Ipv4Addr,
    /// Interface MTU.
    pub mtu: u32,
}

/// Finds the underlay: `iface` or the default-route interface, and `ip` or
/// the interface's first IPv4 address.
pub fn resolve_underlay(iface: Option<&str>, ip: Option<Ipv4Addr>) -> Result<Underlay, String> {
    let mut handle = Handle::new().map_err(|e| e.to_string())?;
    let link = match iface {
        Some(name) => {
            handle.link().get(name).map_err(|e| e.to_string())?.ok_or(format!("interface {name} not found"))?
        }
        None => {
            let routes = handle.route().list().map_err(|e| e.to_string())?;
            let default = routes
                .iter()
                .find(|r| r.dst.prefix_len() == 0)
                .ok_or("no default route to pick the interface from; set --iface")?;
            let index = match default.via {
                RouteVia::Gateway { oif, .. } | RouteVia::Link { oif } => oif,
                RouteVia::Nexthop(_) => default.oif.ok_or("default route has no interface; set --iface")?,
            };
            handle.link().get_by_index(index).map_err(|e| e.to_string())?.ok_or("default-route interface vanished")?
        }
    };
    let public_ip = match ip {
        Some(ip) => ip,
        None => handle
            .address()
            .list(link.index)
            .map_err(|e| e.to_string())?
            .first()
            .map(|a| a.local)
            .ok_or(format!("interface {} has no IPv4 address; set --public-ip", link.name))?,
    };
    Ok(Underlay { name: link.name, public_ip, mtu: link.mtu })
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

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(DaemonError::Runtime)?;
    runtime.block_on(Daemon::new(config).main())
}

struct Daemon {
    config: DaemonConfig,
    shared: Arc<Shared>,
    underlay: Option<Underlay>,
    mac: Option<MacAddr>,
    masquerade_applied: Option<(Ipv4Net, Ipv4Net)>,
    /// The snapshot's peers with their autonomy: the peer set until the
    /// registry's first resync replaces it (autonomous ones may survive it,
    /// as the registry may no longer hold their leases).
    restored_peers: Vec<PeerLease>,
}

impl Daemon {
    fn new(config: DaemonConfig) -> Self {
        Self {
            config,
            shared: Arc::new(Shared::default()),
            underlay: None,
            mac: None,
            masquerade_applied: None,
            restored_peers: Vec::new(),
        }
    }

    async fn main(mut self) -> Result<(), DaemonError> {
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(DaemonError::Signals)?;
        let mut sigint =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(DaemonError::Signals)?;
        let listener = health::bind(self.config.health_addr)
            .await
            .map_err(|source| DaemonError::Health { addr: self.config.health_addr, source })?;
        tokio::spawn(health::serve(listener, self.shared.clone()));
        let mac = Store::open(self.config.mac_store_path())?.vtep_mac(&self.config.node_name, &[])?;
        tracing::info!(node = %self.config.node_name, vtep_mac = %mac.mac, from_store = mac.from_store, "VTEP MAC pinned");
        self.mac = Some(mac.mac);

        let work = async {
            self.restore_snapshot().await;
            self.registry_loop().await
        };
        tokio::select! {
            result = work => result?,
            _ = sigterm.recv() => tracing::info!("SIGTERM: stopping, kernel state left in place"),
            _ = sigint.recv() => tracing::info!("SIGINT: stopping, kernel state left in place"),
        }
        if let Some(overlay) = self.shared.overlay.lock().unwrap_or_else(PoisonError::into_inner).take() {
            overlay.stop();
        }
        Ok(())
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
        let snapshot = match Snapshot::load(&path) {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::info!(path = %path.display(), "no snapshot yet: waiting for the registry");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "snapshot unusable: waiting for the registry");
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
        self.restored_peers = snapshot
            .peers
            .iter()
            .map(|lease| PeerLease { lease: lease.clone(), autonomous: autonomous.contains(&lease.subnet) })
            .collect();
        tracing::info!(
            peers = snapshot.peers.len(),
            autonomous = snapshot.autonomous.len(),
            subnet = %overlay_config.own.subnet,
            "restoring from snapshot"
        );
        self.apply_overlay(overlay_config, snapshot.peers, snapshot.autonomous, &underlay);
    }

    /// Starts (or restarts, when the configuration changed) the overlay and
    /// writes subnet.env and masquerade to match.
    fn apply_overlay(
        &mut self,
        overlay_config: OverlayConfig,
        peers: Vec<Lease>,
        autonomous: Vec<Ipv4Net>,
        underlay: &Underlay,
    ) {
        let mut slot = self.shared.overlay.lock().unwrap_or_else(PoisonError::into_inner);
        let options =
            OverlayOptions { snapshot: Some(self.config.snapshot_path()), autonomous, ..OverlayOptions::default() };
        if let Some(old) = slot.take() {
            old.stop();
        }
        match Overlay::start(overlay_config.clone(), peers, options) {
            Ok(overlay) => *slot = Some(overlay),
            Err(error) => tracing::error!(%error, "cannot start the overlay"),
        }
        drop(slot);
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
        if let Err(error) = env.write(&self.config.subnet_env) {
            tracing::warn!(%error, "cannot write subnet.env");
        }
        self.apply_masquerade(overlay_config.network, overlay_config.own.subnet);
    }

    fn apply_masquerade(&mut self, network: Ipv4Net, subnet: Ipv4Net) {
        if !self.config.masquerade {
            if let Err(error) = Masquerade::remove() {
                tracing::warn!(%error, "cannot remove masquerade rules");
            }
            return;
        }
        if self.masquerade_applied == Some((network, subnet)) {
            return;
        }
        match Masquerade::new(network, subnet).and_then(|m| m.apply()) {
            Ok(()) => self.masquerade_applied = Some((network, subnet)),
            Err(error) => tracing::warn!(%error, "cannot install masquerade rules"),
        }
    }

    /// Someone flushed or edited our nftables table: put it back.
    fn repair_masquerade(&mut self) {
        let Some((network, subnet)) = self.masquerade_applied else { return };
        match Masquerade::new(network, subnet).and_then(|m| m.ensure()) {
            Ok(true) => tracing::warn!("masquerade rules had drifted; re-applied"),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "cannot check masquerade rules"),
        }
    }

    async fn registry_loop(&mut self) -> Result<(), DaemonError> {
        match self.config.registry.clone() {
            RegistrySpec::Embedded(path) => {
                let registry = EmbeddedRegistry::open(path, Duration::from_millis(250));
                self.drive(registry).await
            }
            RegistrySpec::Etcd(endpoints) => {
                // Lazy: no request until first use, so an etcd that is down
                // at start is just an unreachable registry, retried forever.
                let registry = crate::registry::etcd::EtcdRegistry::connect_lazy(&endpoints)
                    .await
                    .map_err(|e| DaemonError::Unsupported(format!("etcd {endpoints:?}: {e}")))?;
                self.drive(registry).await
            }
            RegistrySpec::Kubernetes(server) => {
                let config = match server {
                    None => crate::registry::kubernetes::KubeConfig::in_cluster()
                        .map_err(|e| DaemonError::Unsupported(format!("kubernetes in-cluster config: {e}")))?,
                    Some(server) => {
                        let read = |p: &Option<std::path::PathBuf>| -> Result<Option<Vec<u8>>, DaemonError> {
                            p.as_ref()
                                .map(|p| {
                                    std::fs::read(p)
                                        .map_err(|e| DaemonError::Unsupported(format!("reading {}: {e}", p.display())))
                                })
                                .transpose()
                        };
                        crate::registry::kubernetes::KubeConfig {
                            server,
                            token: None,
                            token_file: self.config.token_file.clone(),
                            ca_cert_pem: read(&self.config.ca_file)?,
                            node_name: self.config.node_name.clone(),
                            network: self.config.network,
                        }
                    }
                };
                let config = crate::registry::kubernetes::KubeConfig { network: self.config.network, ..config };
                let registry = crate::registry::kubernetes::KubernetesRegistry::new(config)
                    .map_err(|e| DaemonError::Unsupported(format!("kubernetes: {e}")))?;
                self.drive(registry).await
            }
        }
    }

    fn set_connected(&self, connected: bool) {
        *self.shared.registry_connected.lock().unwrap_or_else(PoisonError::into_inner) = connected;
    }

    fn push_peers(&self, peers: &BTreeMap<Ipv4Net, PeerLease>) {
        let list = peers.values().map(|p| p.lease.clone()).collect();
        if let Some(overlay) = self.shared.overlay.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            if let Err(error) = overlay.set_peers_marking(list, autonomous_subnets(peers)) {
                tracing::error!(%error, "overlay thread gone");
            }
        }
    }

    /// Lease, then watch forever; every failure is retried with backoff.
    async fn drive<R: Registry>(&mut self, mut registry: R) -> Result<(), DaemonError> {
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
        let mut peers: BTreeMap<Ipv4Net, PeerLease> = std::mem::take(&mut self.restored_peers)
            .into_iter()
            .filter(|peer| !overlaps(peer.lease.subnet, own.lease.subnet))
            .map(|peer| (peer.lease.subnet, peer))
            .collect();
        self.configure(&network, &own, &peers, &underlay);
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
                        apply_event(&mut peers, event, &self.shared);
                        self.push_peers(&peers);
                    }
                    Err(error) => {
                        self.set_connected(false);
                        tracing::warn!(registry = %registry.describe(), %error, "registry lost; keeping every peer");
                        tokio::time::sleep(backoff.step()).await;
                    }
                },
                _ = renew.tick() => {
                    self.repair_masquerade();
                    let due = own.expires_at.is_some_and(|t| t.duration_since(SystemTime::now()).unwrap_or_default() < RENEW_MARGIN);
                    if due {
                        match registry.renew_lease(&own).await {
                            Ok(renewed) => {
                                if renewed.lease.subnet != own.lease.subnet {
                                    tracing::warn!(old = %own.lease.subnet, new = %renewed.lease.subnet, "lease moved");
                                    own = renewed;
                                    self.configure(&network, &own, &peers, &underlay);
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

    fn configure(
        &mut self,
        network: &NetworkConfig,
        own: &OwnLease,
        peers: &BTreeMap<Ipv4Net, PeerLease>,
        underlay: &Underlay,
    ) {
        let overlay_config = OverlayConfig {
            network: network.network,
            own: own.lease.clone(),
            vni: network.vni,
            port: FLANNEL_VXLAN_PORT,
            underlay: underlay.name.clone(),
            direct_routing: self.config.direct_routing,
        };
        let running = self.shared.overlay.lock().unwrap_or_else(PoisonError::into_inner).is_some();
        let same = running
            && Snapshot::load(&self.config.snapshot_path()).ok().flatten().is_some_and(|s| s.config == overlay_config);
        if same {
            // Snapshot restore already runs this exact configuration: keep
            // its peers until the registry's resync replaces them.
            return;
        }
        let list = peers.values().map(|p| p.lease.clone()).collect();
        self.apply_overlay(overlay_config, list, autonomous_subnets(peers), underlay);
    }
}

/// The subnets of the autonomous peers, for the snapshot.
fn autonomous_subnets(peers: &BTreeMap<Ipv4Net, PeerLease>) -> Vec<Ipv4Net> {
    peers.values().filter(|p| p.autonomous).map(|p| p.lease.subnet).collect()
}

async fn lease<R: Registry>(
    registry: &mut R,
    request: &LeaseRequest,
) -> Result<(NetworkConfig, OwnLease), crate::registry::RegistryError> {
    let network = registry.network_config().await?;
    let own = registry.acquire_lease(&network, request).await?;
    Ok((network, own))
}

/// Folds a registry event into the peer set. Autonomous peers survive the
/// loss of their lease.
fn apply_event(peers: &mut BTreeMap<Ipv4Net, PeerLease>, event: PeerEvent, shared: &Shared) {
    match event {
        PeerEvent::Resync(list) => {
            let mut next: BTreeMap<Ipv4Net, PeerLease> = list.into_iter().map(|p| (p.lease.subnet, p)).collect();
            for (subnet, peer) in peers.iter().filter(|(_, p)| p.autonomous) {
                match next.values().find(|live| supersedes(&live.lease, &peer.lease)) {
                    None => {
                        tracing::info!(%subnet, "keeping autonomous peer whose lease is gone");
                        next.insert(*subnet, peer.clone());
                    }
                    Some(live) if live.lease.subnet != *subnet => {
                        tracing::info!(%subnet, by = %live.lease.subnet, "autonomous peer's entries superseded")
                    }
                    Some(_) => {}
                }
            }
            *peers = next;
            *shared.last_sync.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        }
        PeerEvent::Upsert(peer) => {
            peers.retain(|subnet, kept| {
                let superseded =
                    kept.autonomous && *subnet != peer.lease.subnet && supersedes(&peer.lease, &kept.lease);
                if superseded {
                    tracing::info!(%subnet, by = %peer.lease.subnet, "autonomous peer's entries superseded");
                }
                !superseded
            });
            peers.insert(peer.lease.subnet, peer);
        }
        PeerEvent::Remove(subnet) => match peers.get(&subnet) {
            Some(peer) if peer.autonomous => tracing::info!(%subnet, "lease of autonomous peer gone; entries kept"),
            _ => {
                peers.remove(&subnet);
            }
        },
    }
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Whether `live`, a lease the registry holds, replaces the entries kept
/// for an autonomous peer: it covers the same addresses, or it is the same
/// node (name, VTEP MAC or public IP) back, possibly on another subnet —
/// an edge node that rebooted without its subnet.env, say.
fn supersedes(live: &Lease, kept: &Lease) -> bool {
    overlaps(live.subnet, kept.subnet)
        || live.vtep_mac == kept.vtep_mac
        || live.public_ip == kept.public_ip
        || (live.node.is_some() && live.node == kept.node)
}

/// Removes everything netd made in this network namespace: the VXLAN
/// device (its neighbours, FDB entries, nexthops and routes go with it),
/// direct-routing nexthops and routes to cluster subnets, the masquerade
/// table and subnet.env. The snapshot and the VTEP MAC store are kept
/// unless `purge_state` (they are what makes a re-install keep its MAC).
pub fn cleanup(config: &DaemonConfig, purge_state: bool) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    let snapshot = Snapshot::load(&config.snapshot_path()).ok().flatten();
    let vni = snapshot.as_ref().map_or(1, |s| s.config.vni);
    let mut handle = Handle::new().map_err(|e| e.to_string())?;
    let device = format!("flannel.{vni}");
    if let Some(link) = handle.link().get(&device).map_err(|e| e.to_string())? {
        handle.link().delete(link.index).execute().map_err(|e| e.to_string())?;
        done.push(format!("deleted {device} with its neighbours, FDB entries, nexthops and routes"));
    }
    if let Some(network) = snapshot.as_ref().map(|s| s.config.network) {
        let ours: Vec<_> = handle
            .nexthop()
            .list()
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|nh| network.contains(&Ipv4Addr::from(nh.id)))
            .collect();
        for nh in &ours {
            handle.nexthop().delete(*nh).execute().map_err(|e| e.to_string())?;
        }
        if !ours.is_empty() {
            done.push(format!("deleted {} direct-routing nexthops and their routes", ours.len()));
        }
    }
    match Masquerade::remove() {
        Ok(()) => done.push("removed nftables table ip netd-masq (if present)".into()),
        Err(e) => done.push(format!("masquerade not removed: {e}")),
    }
    remove_file(&config.subnet_env, &mut done);
    if purge_state {
        remove_file(&config.snapshot_path(), &mut done);
        remove_file(&config.mac_store_path(), &mut done);
    }
    Ok(done)
}

fn remove_file(path: &Path, done: &mut Vec<String>) {
    if std::fs::remove_file(path).is_ok() {
        done.push(format!("removed {}", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(subnet: &str, ip: &str, mac_last: u8, node: &str, autonomous: bool) -> PeerLease {
        PeerLease {
            lease: Lease {
                subnet: subnet.parse().unwrap(),
                public_ip: ip.parse().unwrap(),
                vtep_mac: MacAddr([0x0e, 0, 0, 0, 0, mac_last]),
                node: Some(node.into()),
            },
            autonomous,
        }
    }

    fn subnets(peers: &BTreeMap<Ipv4Net, PeerLease>) -> Vec<String> {
        peers.keys().map(ToString::to_string).collect()
    }

    #[test]
    fn autonomous_peers_outlive_their_lease_until_the_node_is_back() {
        let shared = Shared::default();
        let mut peers = BTreeMap::new();
        let edge = peer("10.244.3.0/24", "192.168.50.13", 3, "edge-3", true);
        let other = peer("10.244.2.0/24", "192.168.50.12", 2, "edge-2", false);
        apply_event(&mut peers, PeerEvent::Resync(vec![edge.clone(), other.clone()]), &shared);
        // Both leases gone: only the autonomous peer is kept.
        apply_event(&mut peers, PeerEvent::Remove("10.244.3.0/24".parse().unwrap()), &shared);
        apply_event(&mut peers, PeerEvent::Remove("10.244.2.0/24".parse().unwrap()), &shared);
        assert_eq!(subnets(&peers), ["10.244.3.0/24"]);
        apply_event(&mut peers, PeerEvent::Resync(Vec::new()), &shared);
        assert_eq!(subnets(&peers), ["10.244.3.0/24"]);
        assert!(shared.last_sync.lock().unwrap().is_some());

        // The node comes back on another subnet (same name, MAC and IP):
        // its old entries go, in a watch event as in a resync.
        let back = peer("10.244.5.0/24", "192.168.50.13", 3, "edge-3", false);
        let mut watched = peers.clone();
        apply_event(&mut watched, PeerEvent::Upsert(back.clone()), &shared);
        assert_eq!(subnets(&watched), ["10.244.5.0/24"]);
        apply_event(&mut peers, PeerEvent::Resync(vec![back]), &shared);
        assert_eq!(subnets(&peers), ["10.244.5.0/24"]);
    }

    #[test]
    fn a_lease_for_the_same_node_or_addresses_supersedes_a_kept_entry() {
        let kept = peer("10.244.3.0/24", "192.168.50.13", 3, "edge-3", true).lease;
        let unrelated = peer("10.244.4.0/24", "192.168.50.14", 4, "edge-4", false).lease;
        assert!(!supersedes(&unrelated, &kept));
        let by_subnet = Lease { subnet: "10.244.3.0/25".parse().unwrap(), ..unrelated.clone() };
        let by_mac = Lease { vtep_mac: kept.vtep_mac, ..unrelated.clone() };
        let by_ip = Lease { public_ip: kept.public_ip, ..unrelated.clone() };
        let by_name = Lease { node: kept.node.clone(), ..unrelated.clone() };
        for live in [by_subnet, by_mac, by_ip, by_name] {
            assert!(supersedes(&live, &kept), "{live:?}");
        }
        // Unknown names never match each other.
        let nameless = Lease { node: None, ..unrelated };
        assert!(!supersedes(&nameless, &Lease { node: None, ..kept }));
    }
}
