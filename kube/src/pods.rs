//! The pods bound to this node, as the control plane sees them: the
//! authority for freeing pinned pod IPs (issue 11).
//!
//! [`PodWatch`] lists and watches pods with the field selector
//! `spec.nodeName=<node>` on the shared [`KubeClient`] and
//! [`ListWatch`] machinery, and yields [`PodEvent`]s:
//! - [`PodEvent::Listed`] after each complete list — the control plane
//!   answered, so a pod missing from it is gone from this node;
//! - [`PodEvent::Applied`] when a pod bound here appears or changes (a pod
//!   re-created under the same name comes back this way);
//! - [`PodEvent::Deleted`] when a pod object leaves this node's view.
//!
//! A pod that disappeared may have been deleted or re-created on another
//! node under the same name (`spec.nodeName` cannot change, so a "move" is
//! always a delete and a create); [`PodWatch::locate`] tells which.
//!
//! While the API server is unreachable the watch retries with backoff and
//! yields nothing, so nothing that frees an IP happens on stale
//! knowledge; once it answers, the first event is a fresh complete list,
//! which carries every deletion that happened meanwhile.
//!
//! A pod object whose identity is unusable (no or a non-string
//! `metadata.name` or `metadata.namespace`, one that is not a valid
//! Kubernetes name — possible only for objects written behind the API
//! server's back) is skipped with a warning naming the object and the rule
//! it breaks, once per object and reason. It could never have been given
//! an IP: the CNI plugin refuses such names too. Any other field may be
//! missing; a pod is identified by namespace and name alone.
//!
//! RBAC needed: `pods`: list, watch, get (cluster-wide; the field selector
//! narrows what is sent, not what may be asked).

use std::collections::BTreeMap;
use std::time::Duration;

use kube::Api;
use netd_model::PodRef;
use serde_json::Value;

use super::object::{Object, PodPlacement};
use super::watch::{ListWatch, WatchEvent};
use super::{call, check_node_name, KubeClient, KubeError};

/// A pod bound to this node, as the API server has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// `namespace/name`: the key its IP is pinned to.
    pub pod: PodRef,
    /// `metadata.uid` (a pod deleted and re-created under the same name
    /// has a new one); `None` when missing.
    pub uid: Option<String>,
    /// `status.phase` (`Pending`, `Running`, `Succeeded`, `Failed`,
    /// `Unknown`); `None` when missing.
    pub phase: Option<String>,
    /// `metadata.deletionTimestamp` is set: the pod is terminating but
    /// still exists.
    pub terminating: bool,
}

/// What the pod watch saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodEvent {
    /// Every pod bound to this node, from a complete list: authoritative
    /// (the control plane answered). The first event and the first after
    /// the API server was unreachable.
    Listed(Vec<PodInfo>),
    /// A pod bound to this node appeared or changed.
    Applied(PodInfo),
    /// The pod object is gone from this node's view (deleted; see
    /// [`PodWatch::locate`] for whether it now exists elsewhere).
    Deleted(PodRef),
}

/// Where a pod of a given name is now ([`PodWatch::locate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodLocation {
    /// Bound to this node (re-created here when its uid is new).
    ThisNode(PodInfo),
    /// Bound to another node: the pod moved.
    OtherNode {
        /// The node it is bound to.
        node: String,
        /// Its `metadata.uid`, when present.
        uid: Option<String>,
    },
    /// It exists but is not bound to any node yet (not scheduled).
    Unbound,
    /// No pod of that name exists: it was deleted.
    Gone,
}

/// List + watch of the pods bound to one node; see the module docs.
#[derive(Debug)]
pub struct PodWatch {
    client: KubeClient,
    node: String,
    watch: ListWatch<Object<PodPlacement>>,
    /// Why an object is skipped, as last logged (each reason once).
    skipped: BTreeMap<String, String>,
}

impl PodWatch {
    /// A watch of the pods bound to `node`, on `client`. Nothing is
    /// contacted until the first event is asked for.
    pub fn new(client: &KubeClient, node: &str) -> Result<Self, KubeError> {
        check_node_name(node)?;
        let watch = ListWatch::new(client, Some(format!("spec.nodeName={node}")), "pod");
        Ok(Self { client: client.clone(), node: node.to_string(), watch, skipped: BTreeMap::new() })
    }

    /// Sets the `timeoutSeconds` of the watches (default 290 s); see
    /// [`ListWatch::set_timeout`].
    pub fn with_watch_timeout(mut self, timeout: Duration) -> Self {
        self.watch.set_timeout(timeout);
        self
    }

    /// The node whose pods are watched.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The next event; retries with backoff while the API server is
    /// unreachable (logging each failure) and never fails. Cancel-safe.
    pub async fn next(&mut self) -> PodEvent {
        loop {
            let event = self.watch.next().await;
            if let Some(event) = self.fold(event) {
                return event;
            }
        }
    }

    /// The next event, or the error that ended the watch (the next call
    /// lists again). Cancel-safe.
    pub async fn try_next(&mut self) -> Result<PodEvent, KubeError> {
        loop {
            let event = self.watch.try_next().await?;
            if let Some(event) = self.fold(event) {
                return Ok(event);
            }
        }
    }

    /// Where the pod named `pod` is now: a GET by name.
    pub async fn locate(&self, pod: &PodRef) -> Result<PodLocation, KubeError> {
        let api: Api<Object<PodPlacement>> = Api::namespaced(self.client.client(), pod.namespace());
        let what = format!("reading pod {pod}");
        let object = match call(&what, api.get(pod.name())).await {
            Ok(object) => object,
            Err(KubeError::NotFound { .. }) => return Ok(PodLocation::Gone),
            Err(error) => return Err(error),
        };
        let node = object.get("/spec/nodeName").and_then(Value::as_str).unwrap_or("");
        if node.is_empty() {
            return Ok(PodLocation::Unbound);
        }
        if node != self.node {
            let uid = object.get("/metadata/uid").and_then(Value::as_str).map(String::from);
            return Ok(PodLocation::OtherNode { node: node.to_string(), uid });
        }
        match pod_info(&object, &self.node) {
            Ok(info) => Ok(PodLocation::ThisNode(info)),
            Err(reason) => Err(KubeError::Refused { what, reason }),
        }
    }

    /// Turns a watch event into a pod event; `None` when nothing usable
    /// is left of it.
    fn fold(&mut self, event: WatchEvent<Object<PodPlacement>>) -> Option<PodEvent> {
        match event {
            WatchEvent::Listed(objects) => {
                let mut pods: Vec<PodInfo> = objects.iter().filter_map(|o| self.usable(o)).collect();
                pods.sort_by(|a, b| a.pod.cmp(&b.pod));
                Some(PodEvent::Listed(pods))
            }
            WatchEvent::Applied(object) => self.usable(&object).map(PodEvent::Applied),
            WatchEvent::Deleted(object) => {
                let key = describe(&object);
                self.skipped.remove(&key);
                match pod_ref(&object) {
                    Ok(pod) => Some(PodEvent::Deleted(pod)),
                    Err(reason) => {
                        tracing::warn!(pod = %key, %reason, "ignoring the deletion of an unusable pod object");
                        None
                    }
                }
            }
        }
    }

    /// The pod, or `None` (logged once per object and reason) when its
    /// identity is unusable.
    fn usable(&mut self, object: &Object<PodPlacement>) -> Option<PodInfo> {
        let key = describe(object);
        match pod_info(object, &self.node) {
            Ok(info) => {
                self.skipped.remove(&key);
                Some(info)
            }
            Err(reason) => {
                if self.skipped.get(&key) != Some(&reason) {
                    tracing::warn!(pod = %key, %reason, node = %self.node, "skipping pod object");
                    self.skipped.insert(key, reason);
                }
                None
            }
        }
    }
}

/// `namespace/name` for logs, whatever the object holds.
fn describe(object: &Object<PodPlacement>) -> String {
    let text = |pointer: &str| match object.get(pointer) {
        Some(Value::String(s)) => format!("{s:?}"),
        Some(other) => other.to_string(),
        None => "<none>".to_string(),
    };
    format!("{}/{}", text("/metadata/namespace"), text("/metadata/name"))
}

/// The pod's identity, or why it has none.
fn pod_ref(object: &Object<PodPlacement>) -> Result<PodRef, String> {
    let text = |pointer: &str, field: &str| match object.get(pointer) {
        None | Some(Value::Null) => Err(format!("no {field}")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{field} is not a string: {other}")),
    };
    let namespace = text("/metadata/namespace", "metadata.namespace")?;
    let name = text("/metadata/name", "metadata.name")?;
    PodRef::new(&namespace, &name).map_err(|e| e.to_string())
}

/// The pod bound to `node`, or why it is unusable.
fn pod_info(object: &Object<PodPlacement>, node: &str) -> Result<PodInfo, String> {
    let pod = pod_ref(object)?;
    match object.get("/spec/nodeName") {
        Some(Value::String(bound)) if bound == node => {}
        Some(Value::String(bound)) => return Err(format!("spec.nodeName is {bound:?}, not this node")),
        None | Some(Value::Null) => return Err("no spec.nodeName".into()),
        Some(other) => return Err(format!("spec.nodeName is not a string: {other}")),
    }
    let text = |pointer: &str| object.get(pointer).and_then(Value::as_str).map(String::from);
    let terminating = object.get("/metadata/deletionTimestamp").is_some_and(|t| !t.is_null());
    Ok(PodInfo { pod, uid: text("/metadata/uid"), phase: text("/status/phase"), terminating })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Object<PodPlacement> {
        Object::from_value(value)
    }

    #[test]
    fn pods_are_judged_by_identity_and_node() {
        let good = object(json!({
            "metadata": { "namespace": "default", "name": "web-1", "uid": "u1", "deletionTimestamp": "2026-01-01T00:00:00Z" },
            "spec": { "nodeName": "edge-1", "containers": [] },
            "status": { "phase": "Running" },
        }));
        let info = pod_info(&good, "edge-1").unwrap();
        assert_eq!(info.pod.to_string(), "default/web-1");
        assert_eq!((info.uid.as_deref(), info.phase.as_deref(), info.terminating), (Some("u1"), Some("Running"), true));
        // Missing fields other than identity and node are fine.
        let bare =
            object(json!({ "metadata": { "namespace": "default", "name": "b" }, "spec": { "nodeName": "edge-1" } }));
        assert_eq!(pod_info(&bare, "edge-1").unwrap().uid, None);

        let reason = |value: Value| pod_info(&object(value), "edge-1").unwrap_err();
        assert!(reason(json!({ "metadata": { "name": "x" }, "spec": { "nodeName": "edge-1" } }))
            .contains("no metadata.namespace"));
        assert!(reason(json!({ "metadata": { "namespace": "default", "name": 7 }, "spec": { "nodeName": "edge-1" } }))
            .contains("metadata.name is not a string: 7"));
        let bad_name = reason(
            json!({ "metadata": { "namespace": "default", "name": "Bad_Name" }, "spec": { "nodeName": "edge-1" } }),
        );
        assert!(bad_name.contains("\"Bad_Name\" is not a valid DNS-1123 subdomain"), "{bad_name}");
        assert!(reason(json!({ "metadata": { "namespace": "default", "name": "x" }, "spec": {} }))
            .contains("no spec.nodeName"));
        assert!(reason(
            json!({ "metadata": { "namespace": "default", "name": "x" }, "spec": { "nodeName": "other" } })
        )
        .contains("not this node"));
        assert_eq!(describe(&object(json!({ "metadata": { "name": 7 } }))), "<none>/7");
    }
}
