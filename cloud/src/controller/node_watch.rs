//! The controller's one list+watch of Nodes, shared by every part that
//! reads Nodes: role labelling ([`super::nodes`]), autonomy tolerations
//! ([`super::tolerations`]), the tunnel DNAT configuration
//! ([`super::tunnel_config`]) and rollouts ([`crate::rollout::kubernetes`]).
//!
//! One [`ListWatch`] (netd-kube's list+watch: paginated consistent lists,
//! bookmarks, a fresh list after any error) feeds one store of
//! [`SlimNode`]s, the union of the fields those parts read and nothing
//! else — in the spirit of Cilium's operator, whose one slim node store
//! keeps only what its consumers read, and of kube-runtime's
//! `reflector::store_shared`, which shares one watch between controllers
//! "to keep memory overheads smaller". So with four parts running, the API
//! server serves one Node list and one Node watch, and after an API blip
//! (the watch broken, the API server restarted) the Nodes are listed once,
//! not once per part.
//!
//! Each part [`subscribe`](NodeWatch::subscribe)s and reads
//! [`WatchEvent`]s exactly as from its own list+watch: a
//! [`WatchEvent::Listed`] first (the whole store), then
//! [`WatchEvent::Applied`] and [`WatchEvent::Deleted`], and a `Listed`
//! again after every relist. The objects are shared (`Arc`), not copied.
//! A part that falls behind by more than [`BUFFER`] changes (a part that
//! patches nodes one by one while a list of 1 000 comes in) is not waited
//! for: its next event is a `Listed` of the store as it is then, which
//! every part already treats as "replace what you knew", so a slow part
//! never holds the others back (kube-runtime's shared reflector would) and
//! never misses a deletion.
//!
//! Why not kube-runtime's `store_shared` itself: its subscribers get only
//! the objects that were applied (no deletions, no "this is a complete
//! list" boundary, which the tunnel DNAT and the subnet memory need), it
//! waits for the slowest subscriber, and it sits behind kube-runtime's
//! `unstable-runtime-subscribe` feature. The store and the fan-out here are
//! a few dozen lines over the list+watch netd already has.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio::task::AbortHandle;

use netd_kube::object::{Kind, Object};
use netd_kube::watch::{Backoff, ListWatch, WatchEvent};
use netd_kube::{KubeClient, KubeError};

/// Changes a subscriber may fall behind by before it is given the whole
/// store again instead.
pub const BUFFER: usize = 512;

/// The Node fields any part of the controller reads: the union of
/// [`NodeRoleView`](super::nodes::NodeRoleView),
/// [`NodeAutonomy`](netd_kube::object::NodeAutonomy),
/// [`NodeEdgeRole`](netd_kube::object::NodeEdgeRole) and
/// [`NodeReadiness`](netd_kube::object::NodeReadiness) (checked by a test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerNode;

impl Kind for ControllerNode {
    type Api = Node;
    const KEEP: &'static [&'static str] = &[
        "/metadata/name",
        "/metadata/labels/node-restriction.kubernetes.io~1netd-role",
        "/metadata/labels/alibabacloud.com~1is-edge-worker",
        "/metadata/annotations/netd.alibabacloud.com~1addon-taint-added",
        "/metadata/annotations/flannel.alpha.coreos.com~1backend-data",
        "/metadata/annotations/node.beta.alibabacloud.com~1autonomy",
        "/metadata/annotations/node.beta.openyurt.io~1autonomy",
        "/metadata/annotations/node.openyurt.io~1autonomy-duration",
        "/spec/podCIDR",
        "/spec/podCIDRs",
        "/spec/taints",
        "/status/addresses",
        "/status/conditions",
    ];
}

/// The fields of the Ready condition kept (a rollout reports them); the
/// other conditions, and Ready's heartbeat and reason, are dropped.
const READY_FIELDS: [&str; 4] = ["type", "status", "lastTransitionTime", "message"];

/// A Node as the controller keeps it: the fields of [`ControllerNode`],
/// with `status.conditions` cut down to the Ready condition's
/// [`READY_FIELDS`]. Reads like an `Object<ControllerNode>` (it derefs to
/// one).
#[derive(Debug, Clone)]
pub struct SlimNode(Object<ControllerNode>);

impl SlimNode {
    /// The node from its JSON.
    pub fn from_value(mut value: Value) -> Self {
        if let Some(Value::Array(conditions)) = value.pointer_mut("/status/conditions") {
            let is_ready = |c: &Value| c.get("type").and_then(Value::as_str) == Some("Ready");
            let ready = std::mem::take(conditions).into_iter().find(is_ready);
            *conditions = ready
                .map(|mut ready| {
                    let mut kept = serde_json::Map::new();
                    for field in READY_FIELDS {
                        if let Some(value) = ready.get_mut(field).map(Value::take) {
                            kept.insert(field.to_string(), value);
                        }
                    }
                    Value::Object(kept)
                })
                .into_iter()
                .collect();
        }
        Self(Object::from_value(value))
    }
}

impl SlimNode {
    /// The node as an [`Object`] of [`ControllerNode`] (what the parts'
    /// pure functions take).
    pub fn object(&self) -> &Object<ControllerNode> {
        &self.0
    }
}

impl Deref for SlimNode {
    type Target = Object<ControllerNode>;

    fn deref(&self) -> &Object<ControllerNode> {
        &self.0
    }
}

impl<'de> Deserialize<'de> for SlimNode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(Self::from_value)
    }
}

impl kube::Resource for SlimNode {
    type DynamicType = ();
    type Scope = <Object<ControllerNode> as kube::Resource>::Scope;

    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        <Object<ControllerNode> as kube::Resource>::kind(dt)
    }

    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        <Object<ControllerNode> as kube::Resource>::group(dt)
    }

    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        <Object<ControllerNode> as kube::Resource>::version(dt)
    }

    fn api_version(dt: &()) -> std::borrow::Cow<'_, str> {
        <Object<ControllerNode> as kube::Resource>::api_version(dt)
    }

    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        <Object<ControllerNode> as kube::Resource>::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        self.0.meta()
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0.meta_mut()
    }
}

/// What the store tells its subscribers, numbered.
#[derive(Debug, Clone)]
enum Change {
    /// A complete list replaced the store.
    Listed,
    Applied(Arc<SlimNode>),
    Deleted(Arc<SlimNode>),
    /// The API server refused the list or watch (RBAC?); it is tried again.
    Refused(KubeError),
}

#[derive(Debug, Default)]
struct State {
    nodes: HashMap<String, Arc<SlimNode>>,
    /// The number of the last change.
    seq: u64,
    /// A complete list is in.
    listed: bool,
}

/// The store and its fan-out.
#[derive(Debug)]
struct Hub {
    state: Mutex<State>,
    changes: broadcast::Sender<(u64, Change)>,
}

impl Hub {
    fn new() -> Self {
        Self { state: Mutex::default(), changes: broadcast::channel(BUFFER).0 }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Folds one event of the list+watch into the store and tells every
    /// subscriber (under the lock, so numbers and store agree).
    fn publish(&self, event: WatchEvent<SlimNode>) {
        let mut state = self.lock();
        let change = match event {
            WatchEvent::Listed(all) => {
                state.nodes = all.into_iter().filter_map(|n| Some((n.name()?.to_string(), Arc::new(n)))).collect();
                state.listed = true;
                Change::Listed
            }
            WatchEvent::Applied(node) => {
                let Some(name) = node.name().map(str::to_string) else { return };
                let node = Arc::new(node);
                state.nodes.insert(name, node.clone());
                Change::Applied(node)
            }
            WatchEvent::Deleted(node) => {
                let Some(name) = node.name() else { return };
                state.nodes.remove(name);
                Change::Deleted(Arc::new(node))
            }
        };
        state.seq += 1;
        // No subscriber yet is fine: each starts from the store.
        let _ = self.changes.send((state.seq, change));
    }

    fn refuse(&self, error: KubeError) {
        let mut state = self.lock();
        state.seq += 1;
        let _ = self.changes.send((state.seq, Change::Refused(error)));
    }

    /// The whole store and the number of its last change.
    fn snapshot(&self) -> (u64, Vec<Arc<SlimNode>>) {
        let state = self.lock();
        (state.seq, state.nodes.values().cloned().collect())
    }
}

/// Ends the list+watch when the last handle goes.
#[derive(Debug)]
struct Shared {
    hub: Hub,
    client: KubeClient,
    driver: Mutex<Option<AbortHandle>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(driver) = self.driver.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            driver.abort();
        }
    }
}

/// The shared Node list+watch: cheap to clone; the API server is contacted
/// from the first [`NodeWatch::subscribe`] on, and the watch ends when the
/// last `NodeWatch` and [`NodeEvents`] are dropped.
#[derive(Debug, Clone)]
pub struct NodeWatch {
    shared: Arc<Shared>,
}

impl NodeWatch {
    /// The Nodes of the cluster `client` talks to; nothing is contacted yet.
    pub fn new(client: &KubeClient) -> Self {
        Self { shared: Arc::new(Shared { hub: Hub::new(), client: client.clone(), driver: Mutex::new(None) }) }
    }

    /// A reader of the Nodes, from a [`WatchEvent::Listed`] of the store on
    /// (at once if a list is in). Starts the list+watch (on the current
    /// Tokio runtime) if it is not running.
    pub fn subscribe(&self) -> NodeEvents {
        {
            let mut driver = self.shared.driver.lock().unwrap_or_else(PoisonError::into_inner);
            if driver.is_none() {
                let watch = ListWatch::new(&self.shared.client, None, "node");
                let shared = Arc::downgrade(&self.shared);
                *driver = Some(tokio::spawn(drive(watch, shared)).abort_handle());
            }
        }
        subscriber(&self.shared)
    }

    /// The Nodes as last listed and watched (none before the first list).
    pub fn nodes(&self) -> Vec<Arc<SlimNode>> {
        self.shared.hub.snapshot().1
    }
}

/// A reader of `shared`'s store, from its state now.
fn subscriber(shared: &Arc<Shared>) -> NodeEvents {
    let state = shared.hub.lock();
    NodeEvents {
        changes: shared.hub.changes.subscribe(),
        resync: state.listed,
        since: state.seq,
        shared: shared.clone(),
    }
}

/// The one list+watch, folded into the hub; refusals are told to the
/// subscribers and, like everything else, retried with backoff.
async fn drive(mut watch: ListWatch<SlimNode>, shared: std::sync::Weak<Shared>) {
    let mut backoff = Backoff::default();
    loop {
        let result = watch.try_next().await;
        let Some(shared) = shared.upgrade() else { return };
        match result {
            Ok(event) => {
                backoff.reset();
                shared.hub.publish(event);
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(watch = "node", %error, retry_in_ms = delay.as_millis() as u64, "watch failed; listing again after the delay");
                if matches!(error, KubeError::Refused { .. } | KubeError::BadConfig(_)) {
                    shared.hub.refuse(error);
                }
                drop(shared);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One part's view of the shared Nodes; cancel-safe.
#[derive(Debug)]
pub struct NodeEvents {
    shared: Arc<Shared>,
    changes: broadcast::Receiver<(u64, Change)>,
    /// The next event is the whole store.
    resync: bool,
    /// Changes up to this number are in what was handed out.
    since: u64,
}

impl NodeEvents {
    /// The next event; an error when the API server refused the Node list
    /// or watch (it is tried again: the next call waits for the result).
    pub async fn try_next(&mut self) -> Result<WatchEvent<Arc<SlimNode>>, KubeError> {
        loop {
            if self.resync {
                let (seq, nodes) = self.shared.hub.snapshot();
                self.resync = false;
                self.since = seq;
                return Ok(WatchEvent::Listed(nodes));
            }
            match self.changes.recv().await {
                Ok((seq, _)) if seq <= self.since => {}
                Ok((_, Change::Listed)) => self.resync = true,
                Ok((_, Change::Applied(node))) => return Ok(WatchEvent::Applied(node)),
                Ok((_, Change::Deleted(node))) => return Ok(WatchEvent::Deleted(node)),
                Ok((_, Change::Refused(error))) => return Err(error),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "node watch: a part fell behind; it is given the whole store");
                    self.resync = true;
                }
                // The hub lives as long as `self`: never.
                Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    }

    /// The next event, refusals skipped (they are logged where the watch
    /// runs).
    pub async fn next(&mut self) -> WatchEvent<Arc<SlimNode>> {
        loop {
            if let Ok(event) = self.try_next().await {
                return event;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;
    use futures_util::FutureExt as _;
    use serde_json::json;

    fn node(name: &str, version: &str) -> SlimNode {
        SlimNode::from_value(json!({ "metadata": { "name": name, "resourceVersion": version } }))
    }

    fn names(event: &WatchEvent<Arc<SlimNode>>) -> (&'static str, Vec<String>) {
        let name = |n: &Arc<SlimNode>| format!("{}@{}", n.name().unwrap(), n.resource_version().unwrap());
        match event {
            WatchEvent::Listed(all) => {
                let mut all: Vec<String> = all.iter().map(name).collect();
                all.sort();
                ("listed", all)
            }
            WatchEvent::Applied(n) => ("applied", vec![name(n)]),
            WatchEvent::Deleted(n) => ("deleted", vec![name(n)]),
        }
    }

    fn ready(events: &mut NodeEvents) -> Option<(&'static str, Vec<String>)> {
        events.try_next().now_or_never().map(|e| names(&e.unwrap()))
    }

    fn shared() -> Arc<Shared> {
        let client = KubeClient::for_discovery("https://127.0.0.1:1", None).unwrap();
        Arc::new(Shared { hub: Hub::new(), client, driver: Mutex::new(None) })
    }

    #[test]
    fn every_subscriber_sees_one_list_then_changes_and_the_list_again_after_a_relist() {
        let shared = shared();
        let mut early = subscriber(&shared);
        assert_eq!(ready(&mut early), None, "nothing before the first list");
        shared.hub.publish(WatchEvent::Listed(vec![node("a", "1"), node("b", "1")]));
        // Four parts, one list: each reads it from the store.
        let mut late: Vec<NodeEvents> = (0..3).map(|_| subscriber(&shared)).collect();
        for events in std::iter::once(&mut early).chain(late.iter_mut()) {
            assert_eq!(ready(events), Some(("listed", vec!["a@1".into(), "b@1".into()])));
        }
        shared.hub.publish(WatchEvent::Applied(node("a", "2")));
        shared.hub.publish(WatchEvent::Deleted(node("b", "1")));
        for events in std::iter::once(&mut early).chain(late.iter_mut()) {
            assert_eq!(ready(events), Some(("applied", vec!["a@2".into()])));
            assert_eq!(ready(events), Some(("deleted", vec!["b@1".into()])));
            assert_eq!(ready(events), None);
        }
        // A relist (after an API blip): one list in, each part sees it once.
        shared.hub.publish(WatchEvent::Listed(vec![node("a", "3"), node("c", "1")]));
        for events in std::iter::once(&mut early).chain(late.iter_mut()) {
            assert_eq!(ready(events), Some(("listed", vec!["a@3".into(), "c@1".into()])));
            assert_eq!(ready(events), None);
        }
    }

    #[test]
    fn changes_already_in_a_snapshot_are_not_handed_out_again() {
        let shared = shared();
        let mut events = subscriber(&shared);
        shared.hub.publish(WatchEvent::Listed(vec![node("a", "1")]));
        shared.hub.publish(WatchEvent::Applied(node("a", "2")));
        // The snapshot taken for the list already holds a@2.
        assert_eq!(ready(&mut events), Some(("listed", vec!["a@2".into()])));
        assert_eq!(ready(&mut events), None, "a@2 is not handed out a second time (stale or not)");
    }

    #[test]
    fn a_part_that_falls_behind_gets_the_whole_store_with_deletions_gone() {
        let shared = shared();
        shared.hub.publish(WatchEvent::Listed(vec![node("gone", "1")]));
        let mut slow = subscriber(&shared);
        assert_eq!(ready(&mut slow), Some(("listed", vec!["gone@1".into()])));
        shared.hub.publish(WatchEvent::Deleted(node("gone", "1")));
        for i in 0..BUFFER + 10 {
            shared.hub.publish(WatchEvent::Applied(node("busy", &i.to_string())));
        }
        let last = format!("busy@{}", BUFFER + 9);
        assert_eq!(ready(&mut slow), Some(("listed", vec![last])), "the deletion is in the store it is given");
        assert_eq!(ready(&mut slow), None);
    }

    #[test]
    fn refusals_reach_every_subscriber_and_next_skips_them() {
        let shared = shared();
        let mut events = subscriber(&shared);
        shared.hub.refuse(KubeError::Refused { what: "listing nodes".into(), reason: "HTTP 403".into() });
        assert!(matches!(events.try_next().now_or_never(), Some(Err(KubeError::Refused { .. }))));
        shared.hub.refuse(KubeError::Refused { what: "listing nodes".into(), reason: "HTTP 403".into() });
        shared.hub.publish(WatchEvent::Listed(vec![node("a", "1")]));
        let event = events.next().now_or_never().unwrap();
        assert_eq!(names(&event), ("listed", vec!["a@1".into()]));
    }

    #[test]
    fn the_slim_node_keeps_what_every_part_reads_and_only_the_ready_condition() {
        let pointers = |keep: &[&'static str]| keep.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        for (part, keep) in [
            ("role labelling", pointers(super::super::nodes::NodeRoleView::KEEP)),
            ("tolerations", pointers(netd_kube::object::NodeAutonomy::KEEP)),
            ("tunnel configuration", pointers(netd_kube::object::NodeEdgeRole::KEEP)),
            ("rollouts", pointers(netd_kube::object::NodeReadiness::KEEP)),
        ] {
            for pointer in keep {
                assert!(ControllerNode::KEEP.contains(&pointer.as_str()), "{part} reads {pointer}");
            }
        }
        let node = SlimNode::from_value(json!({
            "metadata": { "name": "n", "annotations": { "other": "x" }, "managedFields": [{}] },
            "status": { "images": [{ "names": ["big"] }], "conditions": [
                { "type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory" },
                { "type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "down",
                  "lastHeartbeatTime": "t1", "lastTransitionTime": "t0" },
            ] },
        }));
        assert_eq!(
            node.get("/status/conditions"),
            Some(&json!([{ "type": "Ready", "status": "False", "message": "down", "lastTransitionTime": "t0" }]))
        );
        assert_eq!((node.get("/status/images"), node.annotation("other")), (None, None));
        assert_eq!(<SlimNode as kube::Resource>::plural(&()), "nodes");
        let odd = SlimNode::from_value(json!({ "status": { "conditions": "none" } }));
        assert_eq!(odd.get("/status/conditions"), Some(&json!("none")), "kept as it is, judged by the reader");
    }
}
