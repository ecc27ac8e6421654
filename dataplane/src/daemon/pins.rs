//! Keeping the node's IPAM stores tidy: a pod's pinned IP is freed when the
//! control plane says the pod is gone, never while the node is cut off.
//!
//! The CNI plugin stays a short-lived process; the daemon finds the stores
//! it uses (`cni::discover`, or `--ipam-store`) and drives them from the
//! pod watch (`kube::PodWatch`, pods with `spec.nodeName=<node>`):
//! - a **complete list** makes the view authoritative: pins of pods absent
//!   from it are freed once they have been released for the grace period
//!   (reason `list`) — this is how deletions made while netd or the API
//!   server was down are applied after they return;
//! - a **delete** starts the grace period for that pod; when it ends and the
//!   pod has not come back, its released pins are freed (reason `moved` when
//!   a pod of that name is now bound to another node, else `deleted`);
//! - while the API server is unreachable nothing is freed at all.
//!
//! Attached pins are never freed (the store refuses), so a pod that came
//! back and was attached again keeps its address whatever the timers say.
//! The grace default (10 minutes) is long enough that a StatefulSet pod
//! deleted and re-created on the same node — the controller re-creates it
//! within seconds, but image pulls, a slow kubelet or the controller's own
//! backoff can stretch that to minutes — gets its old address back.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use netd_ipam::{Authority, FreeReason, PinStats, PodRef, Store};

use super::health::Shared;
use netd_ipam::cni::discover::discover;
use netd_kube::pods::{PodEvent, PodLocation, PodWatch};
use netd_kube::watch::Backoff;

/// The grace period's default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);

/// What the daemon knows of the pods bound to this node.
#[derive(Debug, Default)]
pub struct PodView {
    /// Pods bound here, as of the last complete list plus the watch since.
    live: HashSet<PodRef>,
    /// Pods whose deletion the watch reported, with when.
    gone: HashMap<PodRef, Instant>,
    /// A complete list arrived and the watch has not failed since.
    synced: bool,
}

impl PodView {
    /// A complete list: the view is authoritative again.
    pub fn listed(&mut self, pods: impl IntoIterator<Item = PodRef>) {
        self.live = pods.into_iter().collect();
        self.gone.retain(|pod, _| !self.live.contains(pod));
        self.synced = true;
    }

    /// A pod bound here appeared or changed: it is not gone.
    pub fn applied(&mut self, pod: PodRef) {
        self.gone.remove(&pod);
        self.live.insert(pod);
    }

    /// The watch saw `pod` deleted at `when`.
    pub fn deleted(&mut self, pod: PodRef, when: Instant) {
        self.live.remove(&pod);
        self.gone.entry(pod).or_insert(when);
    }

    /// The watch failed: until the next complete list, nothing is known
    /// for sure, so nothing may be freed.
    pub fn lost(&mut self) {
        self.synced = false;
    }

    /// True when frees are allowed.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The deleted pods whose grace has run out by `now` (empty when not
    /// synced); they leave the view's timers.
    pub fn due(&mut self, now: Instant, grace: Duration) -> Vec<PodRef> {
        if !self.synced {
            return Vec::new();
        }
        let due: Vec<PodRef> =
            self.gone.iter().filter(|(_, when)| now.duration_since(**when) >= grace).map(|(p, _)| p.clone()).collect();
        for pod in &due {
            self.gone.remove(pod);
        }
        due
    }

    /// The pods whose pins a list reconcile must keep: the live ones and the
    /// deleted ones still in their grace (their timers decide, with the
    /// reason the watch saw).
    pub fn keep(&self) -> HashSet<PodRef> {
        self.live.iter().chain(self.gone.keys()).cloned().collect()
    }

    /// Pods bound here.
    pub fn live(&self) -> usize {
        self.live.len()
    }
}

/// Where the stores are: given, or what the CNI configurations name.
#[derive(Debug, Clone)]
pub enum Stores {
    /// `--ipam-store` files.
    Given(Vec<PathBuf>),
    /// The `netd-ipam` stores of this CNI configuration directory, looked
    /// up again on every tick (the configuration may be installed later).
    Discover(PathBuf),
}

/// The pin keeper's settings.
#[derive(Debug, Clone)]
pub struct PinKeeper {
    /// The stores.
    pub stores: Stores,
    /// How long a deleted pod keeps its pin.
    pub grace: Duration,
}

/// Stores whose file exists (the plugin creates a store on its first ADD;
/// the keeper never creates one).
fn existing(stores: &Stores, reported: &mut BTreeSet<String>) -> Vec<PathBuf> {
    let paths = match stores {
        Stores::Given(paths) => paths.clone(),
        Stores::Discover(dir) => {
            let found = discover(dir);
            for problem in found.problems {
                if reported.insert(problem.clone()) {
                    tracing::warn!(%problem, "CNI configuration skipped when looking for IPAM stores");
                }
            }
            found.stores.into_iter().collect()
        }
    };
    paths
        .into_iter()
        .filter(|path| {
            let exists = path.exists();
            if !exists && reported.insert(format!("missing:{}", path.display())) {
                tracing::info!(store = %path.display(), "IPAM store not there yet (the plugin creates it on its first ADD)");
            }
            exists
        })
        .collect()
}

/// Runs SQLite work on the blocking pool (a store may be locked by a plugin
/// for up to its busy timeout).
async fn on_store<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce(&mut Store) -> netd_ipam::Result<T> + Send + 'static,
) -> Result<T, String> {
    let owned = path.to_path_buf();
    let work = move || Store::open(&owned).and_then(|mut store| f(&mut store));
    match super::blocking("working on an IPAM store", work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(format!("{}: {error}", path.display())),
        Err(error) => Err(format!("{}: {error}", path.display())),
    }
}

/// Sums the stores' pin counts for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PinMetrics {
    /// Stores kept.
    pub stores: usize,
    /// Their pins and frees, summed.
    pub stats: PinStats,
    /// Pods bound to this node, per the watch.
    pub pods: usize,
    /// The pod view is authoritative (a complete list, no error since).
    pub synced: bool,
}

impl PinKeeper {
    /// How often deleted pods' timers are checked and a list reconcile runs.
    fn tick(&self) -> Duration {
        (self.grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    /// The pin keeper on its own, for an agent that embeds it without the
    /// overlay: runs on the caller's runtime until `shutdown` completes. Its
    /// counters go to `shared` (serve them with [`super::health::serve`],
    /// or read [`Shared::metrics`]).
    ///
    /// Stopping is safe at any point: a store write in flight is one SQLite
    /// transaction on the blocking pool, which finishes or rolls back on its
    /// own; nothing is freed that the next start would not free too.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// use netd_dataplane::daemon::health::Shared;
    /// use netd_dataplane::daemon::pins::{PinKeeper, Stores, DEFAULT_GRACE};
    /// use netd_kube::{pods::PodWatch, KubeClient, KubeConfig};
    ///
    /// let client = KubeClient::new(&KubeConfig::in_cluster()?)?;
    /// let watch = PodWatch::new(&client, "edge-1")?;
    /// let keeper = PinKeeper { stores: Stores::Discover("/etc/cni/net.d".into()), grace: DEFAULT_GRACE };
    /// let shared = Arc::new(Shared::default());
    /// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    /// let task = tokio::spawn(keeper.run_until(watch, shared.clone(), async move { let _ = stopped.await; }));
    /// // … later, when the host application winds down:
    /// let _ = stop.send(());
    /// task.await?;
    /// # Ok(()) }
    /// ```
    pub async fn run_until(
        self,
        watch: PodWatch,
        shared: Arc<Shared>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::select! {
            () = self.run(watch, shared) => {}
            () = shutdown => tracing::info!("pin keeper stopped"),
        }
    }

    /// Watches the pods bound to this node forever and frees the pins of
    /// the ones that are gone (see the module docs).
    pub async fn run(self, mut watch: PodWatch, shared: Arc<Shared>) {
        let mut view = PodView::default();
        let mut backoff = Backoff::default();
        let mut reported = BTreeSet::new();
        let mut tick = tokio::time::interval(self.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = watch.try_next() => match event {
                    Ok(PodEvent::Listed(pods)) => {
                        backoff.reset();
                        view.listed(pods.into_iter().map(|p| p.pod));
                        tracing::info!(pods = view.live(), node = %watch.node(), "pods bound to this node listed");
                        self.reconcile(&view, &existing(&self.stores, &mut reported)).await;
                    }
                    Ok(PodEvent::Applied(info)) => view.applied(info.pod),
                    Ok(PodEvent::Deleted(pod)) => view.deleted(pod, Instant::now()),
                    Err(error) => {
                        view.lost();
                        let delay = backoff.next_delay();
                        tracing::warn!(%error, retry_in = ?delay, "pod watch lost; no pinned IP is freed until a fresh list");
                        tokio::time::sleep(delay).await;
                    }
                },
                _ = tick.tick() => {
                    let stores = existing(&self.stores, &mut reported);
                    for pod in view.due(Instant::now(), self.grace) {
                        self.free_gone(&watch, &mut view, pod, &stores).await;
                    }
                    self.reconcile(&view, &stores).await;
                    self.publish(&view, &shared, &stores).await;
                }
            }
        }
    }

    /// A deleted pod whose grace ran out: moved, deleted, or back.
    async fn free_gone(&self, watch: &PodWatch, view: &mut PodView, pod: PodRef, stores: &[PathBuf]) {
        let reason = match watch.locate(&pod).await {
            Ok(PodLocation::Gone) => FreeReason::Deleted,
            Ok(PodLocation::OtherNode { node, .. }) => {
                tracing::info!(%pod, %node, "pod moved to another node");
                FreeReason::Moved
            }
            Ok(PodLocation::ThisNode(info)) => return view.applied(info.pod),
            // Re-created and not scheduled yet: it may come back here.
            Ok(PodLocation::Unbound) => return view.deleted(pod, Instant::now()),
            Err(error) => {
                tracing::warn!(%pod, %error, "cannot tell where a deleted pod went; its pin stays for now");
                view.lost();
                return view.deleted(pod, Instant::now().checked_sub(self.grace).unwrap_or_else(Instant::now));
            }
        };
        for store in stores {
            let who = pod.clone();
            match on_store(store, move |s| s.free_released(&who, reason)).await {
                Ok(ips) if !ips.is_empty() => {
                    tracing::info!(%pod, reason = reason.as_str(), ?ips, store = %store.display(), "pinned IP freed")
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, %pod, "cannot free a pinned IP"),
            }
        }
    }

    /// Frees the pins of pods absent from an authoritative view, past the
    /// grace (reason `list`).
    async fn reconcile(&self, view: &PodView, stores: &[PathBuf]) {
        if !view.synced() {
            return;
        }
        let keep = view.keep();
        let grace = self.grace;
        for store in stores {
            let live = keep.clone();
            match on_store(store, move |s| s.reconcile(&live, Authority::Authoritative, grace)).await {
                Ok(report) => {
                    for (pod, ip) in &report.freed {
                        tracing::info!(%pod, %ip, reason = "list", store = %store.display(), "pinned IP freed");
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot reconcile an IPAM store"),
            }
        }
    }

    async fn publish(&self, view: &PodView, shared: &Shared, stores: &[PathBuf]) {
        let mut metrics = PinMetrics { pods: view.live(), synced: view.synced(), ..PinMetrics::default() };
        for store in stores {
            match on_store(store, |s| s.stats()).await {
                Ok(stats) => {
                    metrics.stores += 1;
                    metrics.stats.attached += stats.attached;
                    metrics.stats.released += stats.released;
                    let (sum, add) = (&mut metrics.stats.freed, stats.freed);
                    sum.deleted += add.deleted;
                    sum.moved += add.moved;
                    sum.list += add.list;
                    sum.pressure += add.pressure;
                }
                Err(error) => tracing::warn!(%error, "cannot read an IPAM store's counters"),
            }
        }
        *shared.pins.lock().unwrap_or_else(PoisonError::into_inner) = Some(metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodRef {
        format!("default/{name}").parse().unwrap()
    }

    #[test]
    fn deleted_pods_are_due_after_the_grace_only_while_synced() {
        let grace = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut view = PodView::default();
        view.deleted(pod("early"), t0);
        assert!(view.due(t0 + grace * 2, grace).is_empty(), "nothing is freed before a complete list");
        view.listed([pod("web-0"), pod("web-1")]);
        assert!(view.synced());
        view.deleted(pod("web-0"), t0);
        assert_eq!(view.keep(), HashSet::from([pod("web-1"), pod("web-0"), pod("early")]));
        assert!(view.due(t0 + grace / 2, grace).is_empty(), "still in its grace");
        // Re-created within the grace: the timer is cancelled.
        view.applied(pod("web-0"));
        view.deleted(pod("web-1"), t0 + grace / 2);
        // Cut off: no frees, even past the grace.
        view.lost();
        assert!(view.due(t0 + grace * 10, grace).is_empty());
        // Back: a fresh list; web-1 was re-created meanwhile, early never was.
        view.listed([pod("web-0"), pod("web-1")]);
        let mut due = view.due(t0 + grace * 10, grace);
        due.sort_by_key(ToString::to_string);
        assert_eq!(due, vec![pod("early")]);
        assert_eq!(view.keep(), HashSet::from([pod("web-0"), pod("web-1")]));
        assert_eq!(view.live(), 2);
    }
}
