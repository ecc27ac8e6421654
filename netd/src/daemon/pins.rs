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

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use netd_ipam::PodRef;

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
