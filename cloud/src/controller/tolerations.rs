//! Pods of autonomous nodes are not evicted (SPEC §4, issue 15).
//!
//! When a node goes silent, the node lifecycle controller taints it
//! `node.kubernetes.io/unreachable:NoExecute` (or `not-ready` when Ready is
//! False) and the taint manager evicts each pod once its toleration of that
//! taint runs out (`tolerationSeconds`; 300 s from the DefaultTolerationSeconds
//! admission plugin unless the pod says otherwise). For the pods of an
//! autonomous node, this controller makes those two tolerations last forever
//! (or, under `node.openyurt.io/autonomy-duration`, at least that long) and
//! gives the originals back, exactly, when autonomy is turned off.
//!
//! # What is changed, and how it is given back
//!
//! The taint manager uses, for each taint, the **first** toleration that
//! tolerates it (empty or `NoExecute` effect, empty or matching key,
//! `Exists`, or `Equal` with the taint's empty value); the pod is evicted
//! after the shortest `tolerationSeconds` among those, at once without one,
//! never when none has seconds. So for each of the two taints:
//! - its first toleration gets no `tolerationSeconds` (autonomy with no time
//!   limit) or `max(original, bound)` (bounded autonomy: a longer or
//!   unlimited original is never shortened);
//! - a pod with no toleration for it gets one appended:
//!   `{key: <taint>, operator: Exists, effect: NoExecute}`.
//!
//! A pod update may only change `tolerationSeconds` of an existing
//! toleration or add tolerations (Kubernetes' `validateOnlyAddedTolerations`),
//! and every change here stays within that: restoring sets each changed
//! toleration's `tolerationSeconds` back to what it was (a number, or none),
//! and an appended toleration, which cannot be removed, gets
//! `tolerationSeconds: 0`. A `NoExecute` toleration of 0 s evicts as soon as
//! the taint is there, exactly as no toleration does, so the restored pod is
//! evicted as the original would have been; its spec carries the extra
//! toleration, and a later autonomy period reuses it.
//!
//! A toleration that matches every taint (`operator: Exists`, empty key)
//! already tolerates forever and is left alone; one that matches every
//! `NoExecute` taint but with seconds is lengthened like any other first
//! match, which lengthens it for the node's other `NoExecute` taints too
//! while the node is autonomous.
//!
//! # The saved originals
//!
//! Every changed and every appended toleration is recorded, in the same
//! patch as the change (a pod is never rewritten without its originals
//! saved), in the pod annotation [`ANNOTATION_SAVED`], versioned JSON:
//!
//! ```json
//! {"version":1,"tolerations":[
//!   {"index":2,"toleration":{"effect":"NoExecute","key":"node.kubernetes.io/unreachable","operator":"Exists"},"seconds":300},
//!   {"index":3,"toleration":{"effect":"NoExecute","key":"node.kubernetes.io/not-ready","operator":"Exists"},"added":true}]}
//! ```
//!
//! `toleration` is the toleration as it is on the pod without
//! `tolerationSeconds` (how it is found again: by `index` if it is still
//! there, else the first unclaimed equal one), `seconds` its original
//! `tolerationSeconds` (absent: none), `added` marks one this controller
//! appended. The annotation is removed once everything is given back.
//! Planning is idempotent: on an already rewritten (or restored) pod it
//! yields nothing.
//!
//! An annotation that cannot be read (not JSON, another version, unknown
//! fields) leaves the pod as it is, rewritten or not, with a warning saying
//! why, until someone fixes or removes it (removing it makes the current
//! tolerations the originals); a saved entry whose toleration is no longer
//! on the pod is kept in the annotation and reported. Nothing saved is ever
//! dropped unless it was given back.
//!
//! # Which pods, which nodes
//!
//! Pods owned by a DaemonSet (they tolerate both taints forever already, and
//! their controller owns their tolerations) and mirror pods (annotation
//! `kubernetes.io/config.mirror`: the kubelet's own static pods) are never
//! rewritten; neither are terminating ones. A saved annotation on any pod is
//! still given back when its node is not autonomous. Pods not bound to a
//! node yet are covered when they are bound; pods created later on an
//! autonomous node are covered when they appear. Pods of a node that does
//! not exist are left alone.
//!
//! Autonomy is read from the node's annotations
//! ([`AutonomyStatus::from_annotations`]) on every node, edge-labelled or not
//! (an OpenYurt node carries its own label), **except** a cloud node, one
//! labelled `node-restriction.kubernetes.io/netd-role=cloud`
//! ([`netd_model::roles`]): a cloud node's pods are the ones that must be
//! rescheduled when it dies, so its autonomy annotation is ignored (with a
//! warning). The role comes from that label alone, which kubelets cannot
//! set; `alibabacloud.com/is-edge-worker`, which they can, is not read.
//!
//! # The loop
//!
//! [`run`] reads the nodes (name, label, autonomy annotations) from the
//! controller's one shared Node list+watch ([`super::node_watch`]; its own
//! when run alone), list-watches the pods that are not finished (all
//! namespaces, only the fields above), and
//! reconciles a pod whenever it appears or changes or its node's autonomy
//! changes, with at most [`CONCURRENCY`] patches in flight. Each patch is a
//! JSON merge patch carrying the `resourceVersion` it was planned from: on a
//! conflict the pod is read again and planned again; transient errors are
//! retried with backoff, and a pod that still failed is tried again
//! [`RETRY_AFTER`] later (one the API server refuses, on its next change). It is
//! cancel-safe: the caller aborts it when it loses leadership, and because
//! every patch changes tolerations and annotation together, whatever was in
//! flight was applied whole or not at all; the next leader plans from
//! what the API server has.
//!
//! RBAC needed: `nodes`: list, watch; `pods`: list, watch, get, patch.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::Api;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::node_watch::{NodeWatch, SlimNode};
use netd_kube::object::{Object, PodTolerations};
use netd_kube::watch::{Backoff, ListWatch, WatchEvent};
use netd_kube::{error_chain, KubeClient, KubeError, REQUEST_TIMEOUT};
use netd_model::autonomy::{Autonomy, AutonomyStatus};
use netd_model::roles::{NodeRole, LABEL_ROLE};

/// The pod annotation holding the originals of the tolerations this
/// controller changed or added (versioned JSON, see the module docs).
pub const ANNOTATION_SAVED: &str = "netd.io/saved-tolerations";
/// The version of [`ANNOTATION_SAVED`] written and read.
pub const SAVED_VERSION: u64 = 1;
/// The annotation the kubelet puts on mirror pods.
pub const ANNOTATION_MIRROR: &str = "kubernetes.io/config.mirror";
/// The taint of a node whose Ready condition is False.
pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
/// The taint of a node whose Ready condition is Unknown (silent).
pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// The two taints whose tolerations are rewritten.
pub const TAINTS: [&str; 2] = [TAINT_NOT_READY, TAINT_UNREACHABLE];
/// Patches in flight at once.
pub const CONCURRENCY: usize = 32;
/// The field manager of the patches.
pub const FIELD_MANAGER: &str = "netd-controller";
/// Attempts per pod and event (conflicts and transient errors).
const ATTEMPTS: usize = 5;
/// When a pod whose patch kept failing for a transient reason (conflicts,
/// an unreachable API server) is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// Pods that can no longer be evicted are not watched.
const POD_FIELDS: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// Errors of the toleration controller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TolerationError {
    /// [`ANNOTATION_SAVED`] cannot be read: the pod is left as it is.
    #[error(
        "annotation {ANNOTATION_SAVED} cannot be read ({0}); the pod is left as it is until the annotation is fixed or removed"
    )]
    UnreadableSaved(String),
    /// `spec.tolerations` is not a list (only possible for an object
    /// written behind the API server's back).
    #[error("spec.tolerations is not a list but {0}; the pod is left as it is")]
    BadTolerations(String),
    /// The API server refused to list or watch (RBAC?).
    #[error("the API server refused the {what} watch (netd-controller needs list and watch on {what}s): {error}")]
    Refused {
        /// `node` or `pod`.
        what: &'static str,
        /// The refusal.
        error: KubeError,
    },
}

// ---------------------------------------------------------------------------
// Planning (pure)

/// What planning needs to know of a pod.
#[derive(Debug, Clone, Copy)]
pub struct PodFacts<'a> {
    /// `spec.tolerations` as the API server has them.
    pub tolerations: &'a [Value],
    /// The value of [`ANNOTATION_SAVED`], if any.
    pub saved: Option<&'a str>,
    /// Owned by a DaemonSet (an owner reference of kind `DaemonSet`).
    pub daemonset: bool,
    /// A mirror pod ([`ANNOTATION_MIRROR`]).
    pub mirror: bool,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
}

impl<'a> PodFacts<'a> {
    /// The facts of a watched pod.
    pub fn of(pod: &'a Object<PodTolerations>) -> Result<Self, TolerationError> {
        let tolerations = match pod.get("/spec/tolerations") {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(list)) => list.as_slice(),
            Some(other) => return Err(TolerationError::BadTolerations(other.to_string())),
        };
        let daemonset = pod
            .get("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .is_some_and(|owners| owners.iter().any(|o| o.get("kind").and_then(Value::as_str) == Some("DaemonSet")));
        Ok(Self {
            tolerations,
            saved: pod.annotation(ANNOTATION_SAVED).and_then(Value::as_str),
            daemonset,
            mirror: pod.annotation(ANNOTATION_MIRROR).is_some(),
            terminating: pod.get("/metadata/deletionTimestamp").is_some_and(|t| !t.is_null()),
        })
    }
}

/// Why a pod of an autonomous node is not rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Owned by a DaemonSet.
    DaemonSet,
    /// A mirror pod.
    Mirror,
    /// Being deleted.
    Terminating,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::DaemonSet => "owned by a DaemonSet",
            Self::Mirror => "a mirror pod",
            Self::Terminating => "terminating",
        })
    }
}

/// Which way a patch goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The node is autonomous: tolerations lengthened, originals saved.
    Rewrite,
    /// The node is not autonomous: originals given back.
    Restore,
}

/// What happens to [`ANNOTATION_SAVED`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SavedChange {
    /// Left as it is.
    Keep,
    /// Set to this JSON.
    Set(String),
    /// Removed: everything was given back.
    Remove,
}

/// A change to send for one pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodPatch {
    /// Rewrite or restore.
    pub direction: Direction,
    /// The whole new `spec.tolerations`, when it changes.
    pub tolerations: Option<Vec<Value>>,
    /// The new [`ANNOTATION_SAVED`].
    pub saved: SavedChange,
}

impl PodPatch {
    /// The JSON merge patch; with `resource_version` the API server refuses
    /// it (409) if the pod changed since it was read.
    pub fn to_merge_patch(&self, resource_version: Option<&str>) -> Value {
        let mut metadata = Map::new();
        if let Some(version) = resource_version {
            metadata.insert("resourceVersion".into(), json!(version));
        }
        match &self.saved {
            SavedChange::Keep => {}
            SavedChange::Set(text) => {
                metadata.insert("annotations".into(), json!({ ANNOTATION_SAVED: text }));
            }
            SavedChange::Remove => {
                metadata.insert("annotations".into(), json!({ ANNOTATION_SAVED: null }));
            }
        }
        let mut patch = json!({ "metadata": metadata });
        if let Some(tolerations) = &self.tolerations {
            patch["spec"] = json!({ "tolerations": tolerations });
        }
        patch
    }
}

/// The outcome of planning one pod.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// The change to send, if any.
    pub patch: Option<PodPatch>,
    /// Set when the pod is on an autonomous node but not rewritten.
    pub skipped: Option<Skip>,
    /// Saved entries that no longer match the pod (kept), worded for a log.
    pub problems: Vec<String>,
}

/// One saved toleration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedToleration {
    index: usize,
    /// As on the pod, without `tolerationSeconds`.
    toleration: Map<String, Value>,
    /// The original `tolerationSeconds`; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seconds: Option<i64>,
    /// Appended by this controller (there was no original).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    added: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    version: u64,
    tolerations: Vec<SavedToleration>,
}

/// What a toleration was before this controller touched it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Original {
    /// It existed, with these `tolerationSeconds` (`None`: forever).
    Seconds(Option<i64>),
    /// It did not exist: appended here.
    Added,
}

impl Original {
    /// The closest to the original a pod update can get: an appended
    /// toleration gets 0 s, which evicts as if it were not there.
    fn restored(self) -> Option<i64> {
        match self {
            Self::Seconds(seconds) => seconds,
            Self::Added => Some(0),
        }
    }

    /// The seconds under `autonomy`.
    fn under(self, autonomy: Autonomy) -> Option<i64> {
        match (autonomy, self) {
            (Autonomy::Off, original) => original.restored(),
            (Autonomy::Forever, _) => None,
            (Autonomy::For(bound), Self::Added) => Some(bound_seconds(bound)),
            (Autonomy::For(_), Self::Seconds(None)) => None,
            (Autonomy::For(bound), Self::Seconds(Some(seconds))) => Some(seconds.max(bound_seconds(bound))),
        }
    }
}

/// A bound in whole seconds, rounded up, at least 1.
fn bound_seconds(bound: Duration) -> i64 {
    let whole = bound.as_secs().saturating_add(u64::from(bound.subsec_nanos() > 0)).max(1);
    i64::try_from(whole).unwrap_or(i64::MAX)
}

/// Parses [`ANNOTATION_SAVED`].
fn parse_saved(text: &str) -> Result<Vec<SavedToleration>, TolerationError> {
    let bad = |reason: String| TolerationError::UnreadableSaved(reason);
    let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    match value.get("version").and_then(Value::as_u64) {
        Some(SAVED_VERSION) => {}
        Some(other) => {
            return Err(bad(format!(
                "version {other}; this netd reads version {SAVED_VERSION} (written by a newer one?)"
            )))
        }
        None => return Err(bad("no numeric \"version\"".into())),
    }
    let saved: Saved =
        serde_path_to_error::deserialize(value).map_err(|e| bad(format!("at {}: {}", e.path(), e.inner())))?;
    let mut indexes = HashSet::new();
    for entry in &saved.tolerations {
        if entry.toleration.contains_key("tolerationSeconds") {
            return Err(bad(format!("entry for index {} holds tolerationSeconds inside \"toleration\"", entry.index)));
        }
        if entry.added && entry.seconds.is_some() {
            return Err(bad(format!("entry for index {} is both added and has original seconds", entry.index)));
        }
        if !indexes.insert(entry.index) {
            return Err(bad(format!("two entries for index {}", entry.index)));
        }
    }
    Ok(saved.tolerations)
}

fn text<'a>(toleration: &'a Value, field: &str) -> &'a str {
    toleration.get(field).and_then(Value::as_str).unwrap_or("")
}

/// Whether `toleration` tolerates `taint` with effect `NoExecute` and an
/// empty value, as Kubernetes' `Toleration.ToleratesTaint` decides.
fn tolerates(toleration: &Value, taint: &str) -> bool {
    if !toleration.is_object() {
        return false;
    }
    let effect = text(toleration, "effect");
    let key = text(toleration, "key");
    (effect.is_empty() || effect == "NoExecute")
        && (key.is_empty() || key == taint)
        && match text(toleration, "operator") {
            "" | "Equal" => text(toleration, "value").is_empty(),
            "Exists" => true,
            _ => false,
        }
}

fn seconds(toleration: &Value) -> Option<i64> {
    toleration.get("tolerationSeconds").and_then(Value::as_i64)
}

fn set_seconds(toleration: &mut Value, seconds: Option<i64>) {
    if let Some(fields) = toleration.as_object_mut() {
        match seconds {
            Some(s) => fields.insert("tolerationSeconds".into(), json!(s)),
            None => fields.remove("tolerationSeconds"),
        };
    }
}

fn without_seconds(toleration: &Value) -> Map<String, Value> {
    let mut fields = toleration.as_object().cloned().unwrap_or_default();
    fields.remove("tolerationSeconds");
    fields
}

/// Where a saved entry's toleration is now: its index if still equal, else
/// the first unclaimed equal one.
fn resolve(tolerations: &[Value], entry: &SavedToleration, claimed: &BTreeMap<usize, Original>) -> Option<usize> {
    let fits = |i: usize| {
        !claimed.contains_key(&i)
            && tolerations.get(i).is_some_and(|t| t.is_object() && without_seconds(t) == entry.toleration)
    };
    let index = if fits(entry.index) { Some(entry.index) } else { (0..tolerations.len()).find(|&i| fits(i)) }?;
    // Seconds go only on NoExecute tolerations (API validation).
    let needs_seconds = entry.added || entry.seconds.is_some();
    (!needs_seconds || text(&tolerations[index], "effect") == "NoExecute").then_some(index)
}

/// The change that brings `pod` to what `autonomy` asks for; see the
/// module docs. An unreadable [`ANNOTATION_SAVED`] is an error (the pod is
/// to be left alone).
pub fn plan(pod: &PodFacts<'_>, autonomy: Autonomy) -> Result<Plan, TolerationError> {
    let saved = pod.saved.map(parse_saved).transpose()?.unwrap_or_default();
    let on = autonomy.is_on();
    let skip = if pod.daemonset {
        Some(Skip::DaemonSet)
    } else if pod.mirror {
        Some(Skip::Mirror)
    } else if pod.terminating {
        Some(Skip::Terminating)
    } else {
        None
    };
    if on && skip.is_some() {
        return Ok(Plan { patch: None, skipped: skip, problems: Vec::new() });
    }

    let current = pod.tolerations;
    let mut originals = BTreeMap::new();
    let mut unresolved = Vec::new();
    let mut problems = Vec::new();
    for entry in &saved {
        match resolve(current, entry, &originals) {
            Some(index) => {
                let original = if entry.added { Original::Added } else { Original::Seconds(entry.seconds) };
                originals.insert(index, original);
            }
            None => {
                problems.push(format!(
                    "saved toleration {} (index {}) is not on the pod as a toleration netd could have changed; kept in {ANNOTATION_SAVED}",
                    Value::Object(entry.toleration.clone()),
                    entry.index
                ));
                unresolved.push(entry.clone());
            }
        }
    }

    // Everything as it was, then (when autonomous) each taint's first
    // toleration as autonomy wants it.
    let mut desired = current.to_vec();
    for (&index, original) in &originals {
        set_seconds(&mut desired[index], original.restored());
    }
    let mut entries = Vec::new();
    if on {
        let mut used = BTreeMap::new();
        for taint in TAINTS {
            let (index, original) = match desired.iter().position(|t| tolerates(t, taint)) {
                Some(index) => {
                    let original = used.get(&index).or_else(|| originals.get(&index)).copied();
                    (index, original.unwrap_or_else(|| Original::Seconds(current.get(index).and_then(seconds))))
                }
                None => {
                    desired.push(json!({ "key": taint, "operator": "Exists", "effect": "NoExecute" }));
                    (desired.len() - 1, Original::Added)
                }
            };
            set_seconds(&mut desired[index], original.under(autonomy));
            used.insert(index, original);
        }
        for (index, original) in used {
            if seconds(&desired[index]) != original.restored() || original == Original::Added {
                let (seconds, added) = match original {
                    Original::Seconds(seconds) => (seconds, false),
                    Original::Added => (None, true),
                };
                entries.push(SavedToleration { index, toleration: without_seconds(&desired[index]), seconds, added });
            }
        }
    }
    entries.extend(unresolved);

    let saved_change = if entries.is_empty() {
        if pod.saved.is_some() {
            SavedChange::Remove
        } else {
            SavedChange::Keep
        }
    } else if pod.saved.is_some() && entries == saved {
        SavedChange::Keep
    } else {
        SavedChange::Set(
            serde_json::to_string(&Saved { version: SAVED_VERSION, tolerations: entries })
                .unwrap_or_else(|_| unreachable_json()),
        )
    };
    let tolerations = (desired.as_slice() != current).then_some(desired);
    let changed = tolerations.is_some() || saved_change != SavedChange::Keep;
    let direction = if on { Direction::Rewrite } else { Direction::Restore };
    let patch = changed.then_some(PodPatch { direction, tolerations, saved: saved_change });
    Ok(Plan { patch, skipped: None, problems })
}

/// Serialising plain structs of strings and numbers cannot fail; should it
/// ever, an empty record is the harmless thing to write instead.
fn unreachable_json() -> String {
    format!("{{\"version\":{SAVED_VERSION},\"tolerations\":[]}}")
}

/// A node's effective autonomy and, when its annotations are not taken as
/// they are, why (for a log).
pub fn node_autonomy(node: &SlimNode) -> (Autonomy, Option<String>) {
    let status = AutonomyStatus::from_annotations(|key| node.autonomy_annotation(key));
    let (role, _) = NodeRole::from_label(node.role_label());
    if status.autonomy.is_on() && role == NodeRole::Cloud {
        let why = format!(
            "{} ask for autonomy, but the node is labelled {LABEL_ROLE}=cloud (a cloud node): ignored",
            status.sources.join(", ")
        );
        return (Autonomy::Off, Some(why));
    }
    (status.autonomy, status.problem)
}

// ---------------------------------------------------------------------------
// Metrics

/// Counters of the controller, rendered for Prometheus by
/// [`TolerationMetrics::render_prometheus`].
#[derive(Debug, Default)]
pub struct TolerationMetrics {
    rewritten: AtomicU64,
    restored: AtomicU64,
    skipped: AtomicU64,
    errors: AtomicU64,
    autonomous_nodes: AtomicU64,
}

impl TolerationMetrics {
    /// Pods patched to tolerate (longer) because their node is autonomous.
    pub fn rewritten(&self) -> u64 {
        self.rewritten.load(Ordering::Relaxed)
    }

    /// Pods whose saved tolerations were given back.
    pub fn restored(&self) -> u64 {
        self.restored.load(Ordering::Relaxed)
    }

    /// Looks at pods of autonomous nodes that were not rewritten
    /// (DaemonSet, mirror, terminating); counted each time such a pod
    /// changes or its node's autonomy does.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Pods left as they are because of an error (an unreadable annotation,
    /// a refused patch, retries exhausted).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Nodes that are autonomous now.
    pub fn autonomous_nodes(&self) -> u64 {
        self.autonomous_nodes.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of the counters (what `/metrics`
    /// serves of them, for logs and tests).
    pub fn render_prometheus(self: &Arc<Self>) -> String {
        netd_metrics::render(self.clone())
    }
}

/// Read at scrape time (`/metrics` registers the controller's).
impl netd_metrics::Collector for TolerationMetrics {
    fn encode(&self, encoder: netd_metrics::DescriptorEncoder) -> std::fmt::Result {
        let mut out = netd_metrics::Families::new(encoder);
        out.counter(
            "netd_controller_tolerations_rewritten_total",
            "Pods of autonomous nodes whose not-ready/unreachable tolerations were lengthened.",
            self.rewritten(),
        )?;
        out.counter(
            "netd_controller_tolerations_restored_total",
            "Pods whose saved tolerations were given back after autonomy ended.",
            self.restored(),
        )?;
        out.counter(
            "netd_controller_tolerations_skipped_total",
            "Looks at pods of autonomous nodes left alone (DaemonSet, mirror or terminating pods).",
            self.skipped(),
        )?;
        out.counter(
            "netd_controller_tolerations_errors_total",
            "Pods left as they are because of an error (unreadable annotation, refused patch, retries exhausted).",
            self.errors(),
        )?;
        out.gauge("netd_controller_autonomous_nodes", "Nodes that are autonomous now.", self.autonomous_nodes())
    }
}

// ---------------------------------------------------------------------------
// The controller loop

/// `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PodKey {
    namespace: String,
    name: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn pod_key(pod: &Object<PodTolerations>) -> Option<PodKey> {
    Some(PodKey { namespace: pod.namespace()?.to_string(), name: pod.name()?.to_string() })
}

fn pod_node(pod: &Object<PodTolerations>) -> Option<&str> {
    pod.get("/spec/nodeName").and_then(Value::as_str).filter(|n| !n.is_empty())
}

/// A list+watch that ends on a refusal and retries anything else with
/// backoff; cancel-safe like [`ListWatch`].
struct Watch<K: 'static> {
    what: &'static str,
    inner: ListWatch<K>,
    backoff: Backoff,
    retry_at: Option<Instant>,
}

impl<K> Watch<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    fn new(client: &KubeClient, fields: Option<String>, what: &'static str) -> Self {
        Self { what, inner: ListWatch::new(client, fields, what), backoff: Backoff::default(), retry_at: None }
    }

    async fn next(&mut self) -> Result<WatchEvent<K>, TolerationError> {
        loop {
            if let Some(at) = self.retry_at {
                tokio::time::sleep_until(at).await;
                self.retry_at = None;
            }
            match self.inner.try_next().await {
                Ok(event) => {
                    self.backoff.reset();
                    return Ok(event);
                }
                Err(error) if matches!(error, KubeError::Refused { .. } | KubeError::BadConfig(_)) => {
                    return Err(TolerationError::Refused { what: self.what, error });
                }
                Err(error) => {
                    let delay = self.backoff.next_delay();
                    tracing::warn!(watch = self.what, %error, retry_in_ms = delay.as_millis() as u64, "watch failed; listing again after the delay");
                    self.retry_at = Some(Instant::now() + delay);
                }
            }
        }
    }
}

/// How one pod's reconcile ended.
enum Outcome {
    /// Patched; the pod as the API server returned it.
    Patched { direction: Direction, pod: Box<Object<PodTolerations>>, planned_from: Option<String> },
    /// Nothing (left) to do.
    Unchanged,
    /// The pod is gone.
    Gone,
    /// Given up; why, and whether trying again later may help.
    Failed { reason: String, transient: bool },
}

struct Controller {
    client: KubeClient,
    metrics: Arc<TolerationMetrics>,
    nodes: HashMap<String, Autonomy>,
    pods: HashMap<PodKey, Object<PodTolerations>>,
    by_node: HashMap<String, HashSet<PodKey>>,
    queue: VecDeque<PodKey>,
    queued: HashSet<PodKey>,
    /// Pods being patched, and whether they changed meanwhile.
    in_flight: HashMap<PodKey, bool>,
    tasks: JoinSet<(PodKey, Outcome)>,
    /// What was last logged per pod (problems, unreadable annotations), so
    /// a pod's status updates do not repeat it.
    logged: HashMap<PodKey, String>,
    /// Pods to try again, by when.
    retries: BTreeMap<Instant, Vec<PodKey>>,
}

/// Runs the controller until aborted; see the module docs. Returns only
/// when the API server refuses the node or pod watch (missing RBAC).
pub async fn run(client: KubeClient, metrics: Arc<TolerationMetrics>) -> Result<(), TolerationError> {
    let nodes = NodeWatch::new(&client);
    run_on(client, nodes, metrics).await
}

/// [`run`] on a shared Node list+watch (the controller's one).
pub async fn run_on(
    client: KubeClient,
    nodes: NodeWatch,
    metrics: Arc<TolerationMetrics>,
) -> Result<(), TolerationError> {
    let mut node_watch = nodes.subscribe();
    let mut pod_watch: Watch<Object<PodTolerations>> = Watch::new(&client, Some(POD_FIELDS.into()), "pod");
    let mut controller = Controller {
        client,
        metrics,
        nodes: HashMap::new(),
        pods: HashMap::new(),
        by_node: HashMap::new(),
        queue: VecDeque::new(),
        queued: HashSet::new(),
        in_flight: HashMap::new(),
        tasks: JoinSet::new(),
        logged: HashMap::new(),
        retries: BTreeMap::new(),
    };
    loop {
        controller.dispatch();
        let retry_at = controller.retries.keys().next().copied();
        tokio::select! {
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => controller.retry_due(),
            event = node_watch.try_next() => {
                controller.on_nodes(event.map_err(|error| TolerationError::Refused { what: "node", error })?)
            }
            event = pod_watch.next() => controller.on_pods(event?),
            Some(done) = controller.tasks.join_next(), if !controller.tasks.is_empty() => match done {
                Ok((key, outcome)) => controller.finished(key, outcome),
                Err(error) => tracing::error!(%error, "a pod reconcile task failed"),
            },
        }
    }
}

impl Controller {
    fn on_nodes(&mut self, event: WatchEvent<Arc<SlimNode>>) {
        match event {
            WatchEvent::Listed(nodes) => {
                let mut seen = HashMap::new();
                for node in &nodes {
                    if let Some(name) = node.name() {
                        seen.insert(name.to_string(), self.judge_node(name, node));
                    }
                }
                self.nodes.retain(|name, _| seen.contains_key(name));
                for (name, autonomy) in seen {
                    if self.nodes.get(&name) != Some(&autonomy) {
                        self.set_node(name, autonomy);
                    }
                }
            }
            WatchEvent::Applied(node) => {
                if let Some(name) = node.name() {
                    let autonomy = self.judge_node(name, &node);
                    if self.nodes.get(name) != Some(&autonomy) {
                        self.set_node(name.to_string(), autonomy);
                    }
                }
            }
            WatchEvent::Deleted(node) => {
                // Its pods go with it (pod GC); nothing to give back to.
                if let Some(name) = node.name() {
                    self.nodes.remove(name);
                }
            }
        }
        let on = self.nodes.values().filter(|a| a.is_on()).count();
        self.metrics.autonomous_nodes.store(on as u64, Ordering::Relaxed);
    }

    fn judge_node(&self, name: &str, node: &SlimNode) -> Autonomy {
        let (autonomy, note) = node_autonomy(node);
        if let Some(note) = note {
            if self.nodes.get(name) != Some(&autonomy) {
                tracing::warn!(node = name, "{note}");
            }
        }
        autonomy
    }

    fn set_node(&mut self, name: String, autonomy: Autonomy) {
        let pods: Vec<PodKey> = self.by_node.get(&name).map(|p| p.iter().cloned().collect()).unwrap_or_default();
        if self.nodes.contains_key(&name) || autonomy.is_on() {
            let what = if autonomy.is_on() { "making their tolerations last" } else { "giving back saved tolerations" };
            tracing::info!(node = %name, %autonomy, pods = pods.len(), "node autonomy changed: {what}");
        } else {
            tracing::debug!(node = %name, pods = pods.len(), "node seen, not autonomous");
        }
        self.nodes.insert(name, autonomy);
        for key in pods {
            self.consider(key);
        }
    }

    fn on_pods(&mut self, event: WatchEvent<Object<PodTolerations>>) {
        match event {
            WatchEvent::Listed(pods) => {
                self.pods.clear();
                self.by_node.clear();
                let mut keys = Vec::with_capacity(pods.len());
                for pod in pods {
                    if let Some(key) = self.store(pod) {
                        keys.push(key);
                    }
                }
                self.logged.retain(|key, _| self.pods.contains_key(key));
                for key in keys {
                    self.consider(key);
                }
            }
            WatchEvent::Applied(pod) => {
                if let Some(key) = self.store(pod) {
                    self.consider(key);
                }
            }
            WatchEvent::Deleted(pod) => {
                if let Some(key) = pod_key(&pod) {
                    self.forget(&key);
                    self.logged.remove(&key);
                }
            }
        }
    }

    fn store(&mut self, pod: Object<PodTolerations>) -> Option<PodKey> {
        let key = pod_key(&pod)?;
        self.forget(&key);
        if let Some(node) = pod_node(&pod) {
            self.by_node.entry(node.to_string()).or_default().insert(key.clone());
        }
        self.pods.insert(key.clone(), pod);
        Some(key)
    }

    fn forget(&mut self, key: &PodKey) {
        if let Some(old) = self.pods.remove(key) {
            if let Some(node) = pod_node(&old) {
                if let Some(set) = self.by_node.get_mut(node) {
                    set.remove(key);
                    if set.is_empty() {
                        self.by_node.remove(node);
                    }
                }
            }
        }
    }

    /// The plan for a cached pod, `None` when its node is unknown.
    fn plan_for(&self, key: &PodKey) -> Option<(Result<Plan, TolerationError>, Autonomy)> {
        let pod = self.pods.get(key)?;
        let autonomy = *self.nodes.get(pod_node(pod)?)?;
        Some((PodFacts::of(pod).and_then(|facts| plan(&facts, autonomy)), autonomy))
    }

    /// Queues the pod if it needs a patch; logs what is wrong with it.
    fn consider(&mut self, key: PodKey) {
        if let Some(dirty) = self.in_flight.get_mut(&key) {
            *dirty = true;
            return;
        }
        let Some((planned, _)) = self.plan_for(&key) else { return };
        let note = match planned {
            Ok(plan) => {
                if plan.skipped.is_some() {
                    self.metrics.skipped.fetch_add(1, Ordering::Relaxed);
                }
                if plan.patch.is_some() && self.queued.insert(key.clone()) {
                    self.queue.push_back(key.clone());
                }
                (!plan.problems.is_empty()).then(|| (false, plan.problems.join("; ")))
            }
            Err(error) => Some((true, error.to_string())),
        };
        match note {
            Some((error, text)) if self.logged.get(&key) != Some(&text) => {
                if error {
                    self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(pod = %key, "{text}");
                self.logged.insert(key, text);
            }
            Some(_) => {}
            None => {
                self.logged.remove(&key);
            }
        }
    }

    /// Starts patches up to [`CONCURRENCY`].
    fn dispatch(&mut self) {
        while self.tasks.len() < CONCURRENCY {
            let Some(key) = self.queue.pop_front() else { return };
            self.queued.remove(&key);
            let Some((Ok(Plan { patch: Some(_), .. }), autonomy)) = self.plan_for(&key) else { continue };
            let Some(pod) = self.pods.get(&key).cloned() else {
                continue;
            };
            self.in_flight.insert(key.clone(), false);
            let client = self.client.client();
            self.tasks.spawn(async move {
                let outcome = reconcile(client, &key, pod, autonomy).await;
                (key, outcome)
            });
        }
    }

    fn retry_due(&mut self) {
        let now = Instant::now();
        while let Some(entry) = self.retries.first_entry() {
            if *entry.key() > now {
                return;
            }
            for key in entry.remove() {
                self.consider(key);
            }
        }
    }

    fn finished(&mut self, key: PodKey, outcome: Outcome) {
        let dirty = self.in_flight.remove(&key).unwrap_or(false);
        match outcome {
            Outcome::Patched { direction, pod, planned_from } => {
                let counter = match direction {
                    Direction::Rewrite => &self.metrics.rewritten,
                    Direction::Restore => &self.metrics.restored,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(pod = %key, ?direction, "tolerations patched");
                // The answer is newer than the cache unless an event came in
                // meanwhile (then that event is the one to plan from).
                let cached = self.pods.get(&key).map(|p| p.resource_version().map(String::from));
                if cached == Some(planned_from) {
                    self.store(*pod);
                }
            }
            Outcome::Unchanged | Outcome::Gone => {}
            Outcome::Failed { reason, transient } => {
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                if transient {
                    let secs = RETRY_AFTER.as_secs();
                    tracing::warn!(pod = %key, %reason, "tolerations not patched; trying again in {secs} s");
                    self.retries.entry(Instant::now() + RETRY_AFTER).or_default().push(key.clone());
                } else {
                    tracing::warn!(pod = %key, %reason, "tolerations not patched; trying again on the pod's next change");
                }
            }
        }
        if dirty {
            self.consider(key);
        }
    }
}

/// Why a patch did not go through.
enum SendError {
    Conflict,
    Other(KubeError),
}

async fn send(
    api: &Api<Object<PodTolerations>>,
    key: &PodKey,
    patch: &Value,
) -> Result<Object<PodTolerations>, SendError> {
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
    let what = format!("patching the tolerations of pod {key}");
    match tokio::time::timeout(REQUEST_TIMEOUT, api.patch(&key.name, &params, &Patch::Merge(patch))).await {
        Ok(Ok(pod)) => Ok(pod),
        Ok(Err(kube::Error::Api(status))) if status.code == 409 => Err(SendError::Conflict),
        Ok(Err(error)) => Err(SendError::Other(KubeError::from_client(&what, error))),
        Err(_) => Err(SendError::Other(KubeError::Unreachable(format!(
            "{what}: no answer within {}s",
            REQUEST_TIMEOUT.as_secs()
        )))),
    }
}

/// Plans and patches one pod: on a conflict it reads the pod again and
/// plans again; transient errors are retried with backoff.
async fn reconcile(client: kube::Client, key: &PodKey, mut pod: Object<PodTolerations>, autonomy: Autonomy) -> Outcome {
    let api: Api<Object<PodTolerations>> = Api::namespaced(client, &key.namespace);
    let mut backoff = Backoff::default();
    let mut last = String::new();
    for _ in 0..ATTEMPTS {
        let planned = PodFacts::of(&pod).and_then(|facts| plan(&facts, autonomy));
        let patch = match planned {
            Ok(Plan { patch: Some(patch), .. }) => patch,
            Ok(_) => return Outcome::Unchanged,
            Err(error) => return Outcome::Failed { reason: error.to_string(), transient: false },
        };
        let planned_from = pod.resource_version().map(String::from);
        match send(&api, key, &patch.to_merge_patch(planned_from.as_deref())).await {
            Ok(patched) => {
                return Outcome::Patched { direction: patch.direction, pod: Box::new(patched), planned_from };
            }
            Err(SendError::Conflict) => {
                let what = format!("reading pod {key} again after a conflict");
                match tokio::time::timeout(REQUEST_TIMEOUT, api.get(&key.name)).await {
                    Ok(Ok(fresh)) => pod = fresh,
                    Ok(Err(kube::Error::Api(status))) if status.code == 404 => return Outcome::Gone,
                    Ok(Err(error)) => {
                        last = format!("{what}: {}", error_chain(&error));
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Err(_) => {
                        last = format!("{what}: no answer within {}s", REQUEST_TIMEOUT.as_secs());
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
            Err(SendError::Other(KubeError::NotFound { .. })) => return Outcome::Gone,
            Err(SendError::Other(error)) if error.is_transient() => {
                last = error.to_string();
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(SendError::Other(error)) => return Outcome::Failed { reason: error.to_string(), transient: false },
        }
    }
    Outcome::Failed { reason: format!("gave up after {ATTEMPTS} attempts; last: {last}"), transient: true }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn tol(key: &str, operator: &str, effect: &str, seconds: Option<i64>) -> Value {
        let mut t = json!({});
        for (field, value) in [("key", key), ("operator", operator), ("effect", effect)] {
            if !value.is_empty() {
                t[field] = json!(value);
            }
        }
        set_seconds(&mut t, seconds);
        t
    }

    fn facts<'a>(tolerations: &'a [Value], saved: Option<&'a str>) -> PodFacts<'a> {
        PodFacts { tolerations, saved, daemonset: false, mirror: false, terminating: false }
    }

    /// What the taint manager does for `taint`: `None` evict at once,
    /// `Some(None)` never, `Some(Some(s))` after s seconds.
    fn eviction(tolerations: &[Value], taint: &str) -> Option<Option<i64>> {
        let first = tolerations.iter().find(|t| tolerates(t, taint))?;
        Some(seconds(first).map(|s| s.max(0)))
    }

    /// Eviction delay with "not tolerated" and "0 s" the same thing.
    fn delay(tolerations: &[Value], taint: &str) -> Option<i64> {
        eviction(tolerations, taint).unwrap_or(Some(0))
    }

    /// Applies a plan's patch to (tolerations, annotation).
    fn apply(tolerations: &mut Vec<Value>, saved: &mut Option<String>, patch: &PodPatch) {
        // The API server's own rule: only seconds change, or additions.
        if let Some(new) = &patch.tolerations {
            assert!(new.len() >= tolerations.len(), "tolerations removed: {tolerations:?} -> {new:?}");
            for (old, new) in tolerations.iter().zip(new) {
                assert_eq!(without_seconds(old), without_seconds(new), "toleration modified beyond seconds");
            }
            for t in new {
                assert!(seconds(t).is_none() || text(t, "effect") == "NoExecute", "seconds without NoExecute: {t}");
            }
            *tolerations = new.clone();
        }
        match &patch.saved {
            SavedChange::Keep => {}
            SavedChange::Set(text) => *saved = Some(text.clone()),
            SavedChange::Remove => *saved = None,
        }
    }

    /// Plans and applies; asserts planning again changes nothing.
    fn step(tolerations: &mut Vec<Value>, saved: &mut Option<String>, autonomy: Autonomy) -> Option<Direction> {
        let planned = plan(&facts(tolerations, saved.as_deref()), autonomy).unwrap();
        assert!(planned.problems.is_empty(), "{:?}", planned.problems);
        let direction = planned.patch.as_ref().map(|p| p.direction);
        if let Some(patch) = &planned.patch {
            apply(tolerations, saved, patch);
        }
        let again = plan(&facts(tolerations, saved.as_deref()), autonomy).unwrap();
        assert_eq!(again.patch, None, "not idempotent: {tolerations:?} {saved:?}");
        direction
    }

    fn candidates() -> Vec<Value> {
        let mut all = Vec::new();
        for key in [TAINT_NOT_READY, TAINT_UNREACHABLE] {
            for seconds in [Some(300), Some(5), Some(0), None] {
                all.push(tol(key, "Exists", "NoExecute", seconds));
            }
            all.push(tol(key, "Exists", "", None));
            all.push(
                json!({ "key": key, "operator": "Equal", "value": "x", "effect": "NoExecute", "tolerationSeconds": 9 }),
            );
        }
        all.push(tol("", "Exists", "", None));
        all.push(tol("", "Exists", "NoExecute", Some(60)));
        all.push(json!({ "key": TAINT_UNREACHABLE, "effect": "NoExecute", "tolerationSeconds": 30 }));
        all.push(tol("example.com/other", "Exists", "NoExecute", Some(10)));
        all.push(tol("example.com/other", "Exists", "NoSchedule", None));
        all
    }

    /// Every list of up to three candidate tolerations, through autonomy
    /// on, changed bounds and off: tolerated as long as autonomy asks while
    /// on, exactly as before once off, idempotent throughout.
    #[test]
    fn every_combination_is_protected_then_given_back_exactly() {
        let pool = candidates();
        let mut lists: Vec<Vec<Value>> = vec![vec![]];
        for _ in 0..3 {
            let longer: Vec<Vec<Value>> = lists
                .iter()
                .filter(|l| l.len() == lists.last().map_or(0, Vec::len))
                .flat_map(|l| pool.iter().map(move |t| [l.clone(), vec![t.clone()]].concat()))
                .collect();
            lists.extend(longer);
        }
        assert!(lists.len() > 1500, "{}", lists.len());
        let sequences = [
            vec![Autonomy::Forever],
            vec![Autonomy::For(Duration::from_secs(100))],
            vec![
                Autonomy::For(Duration::from_millis(1500)),
                Autonomy::Forever,
                Autonomy::For(Duration::from_secs(600)),
            ],
            vec![Autonomy::Forever, Autonomy::Off, Autonomy::For(Duration::from_secs(7))],
        ];
        for original in &lists {
            let before: Vec<Option<i64>> = TAINTS.iter().map(|t| delay(original, t)).collect();
            for sequence in &sequences {
                let (mut tolerations, mut saved) = (original.clone(), None);
                for &autonomy in sequence {
                    step(&mut tolerations, &mut saved, autonomy);
                    for (i, taint) in TAINTS.iter().enumerate() {
                        let now = eviction(&tolerations, taint);
                        match autonomy {
                            Autonomy::Forever => {
                                assert_eq!(now, Some(None), "{taint}: {original:?} -> {tolerations:?}")
                            }
                            Autonomy::For(bound) => {
                                let bound = bound_seconds(bound);
                                let ok = match (before[i], now) {
                                    (_, Some(None)) => true,
                                    (Some(b), Some(Some(s))) => s == b.max(bound),
                                    (None, Some(Some(_))) => false,
                                    (_, None) => false,
                                };
                                assert!(ok, "{taint} bounded {bound}: {original:?} -> {tolerations:?}");
                                if before[i].is_none() {
                                    assert_eq!(now, Some(None), "a forever original stays forever");
                                }
                            }
                            Autonomy::Off => {}
                        }
                    }
                }
                step(&mut tolerations, &mut saved, Autonomy::Off);
                assert_eq!(saved, None, "annotation left after restore: {original:?}");
                let after: Vec<Option<i64>> = TAINTS.iter().map(|t| delay(&tolerations, t)).collect();
                assert_eq!(after, before, "eviction changed: {original:?} -> {tolerations:?}");
                // Exactly the original list, plus only appended 0 s tolerations.
                assert_eq!(&tolerations[..original.len()], original.as_slice());
                for extra in &tolerations[original.len()..] {
                    assert_eq!(seconds(extra), Some(0), "{extra}");
                    assert!(TAINTS.contains(&text(extra, "key")), "{extra}");
                }
            }
        }
    }

    #[test]
    fn the_default_tolerations_are_saved_and_restored() {
        let original = vec![
            tol("example.com/dedicated", "Exists", "NoSchedule", None),
            tol(TAINT_NOT_READY, "Exists", "NoExecute", Some(300)),
            tol(TAINT_UNREACHABLE, "Exists", "NoExecute", Some(300)),
        ];
        let (mut tolerations, mut saved) = (original.clone(), None);
        assert_eq!(step(&mut tolerations, &mut saved, Autonomy::Forever), Some(Direction::Rewrite));
        assert_eq!(seconds(&tolerations[1]), None);
        assert_eq!(seconds(&tolerations[2]), None);
        let record: Value = serde_json::from_str(saved.as_deref().unwrap()).unwrap();
        assert_eq!(
            record,
            json!({ "version": 1, "tolerations": [
                { "index": 1, "toleration": { "key": TAINT_NOT_READY, "operator": "Exists", "effect": "NoExecute" }, "seconds": 300 },
                { "index": 2, "toleration": { "key": TAINT_UNREACHABLE, "operator": "Exists", "effect": "NoExecute" }, "seconds": 300 },
            ]})
        );
        // A bound longer than the originals, then back to forever.
        assert_eq!(
            step(&mut tolerations, &mut saved, Autonomy::For(Duration::from_secs(3600))),
            Some(Direction::Rewrite)
        );
        assert_eq!(seconds(&tolerations[2]), Some(3600));
        assert_eq!(step(&mut tolerations, &mut saved, Autonomy::Off), Some(Direction::Restore));
        assert_eq!((&tolerations, &saved), (&original, &None));
        // A bound shorter than the originals changes nothing: never shortened.
        assert_eq!(step(&mut tolerations, &mut saved, Autonomy::For(Duration::from_secs(60))), None);
        // From a shorter bound to none: saved, then given back.
        step(&mut tolerations, &mut saved, Autonomy::For(Duration::from_secs(400)));
        step(&mut tolerations, &mut saved, Autonomy::For(Duration::from_secs(60)));
        assert_eq!((&tolerations, &saved), (&original, &None), "back at the originals, nothing left saved");
    }

    #[test]
    fn a_pod_that_tolerates_forever_needs_nothing() {
        for list in [
            vec![tol("", "Exists", "", None)],
            vec![tol(TAINT_NOT_READY, "Exists", "NoExecute", None), tol(TAINT_UNREACHABLE, "Exists", "", None)],
            vec![tol("", "Exists", "", None), tol(TAINT_UNREACHABLE, "Exists", "NoExecute", Some(300))],
        ] {
            for autonomy in [Autonomy::Forever, Autonomy::For(Duration::from_secs(10)), Autonomy::Off] {
                assert_eq!(plan(&facts(&list, None), autonomy).unwrap(), Plan::default(), "{list:?}");
            }
        }
    }

    #[test]
    fn a_missing_toleration_is_added_and_restored_to_zero() {
        let original = vec![tol(TAINT_UNREACHABLE, "Exists", "NoExecute", Some(20))];
        let (mut tolerations, mut saved) = (original.clone(), None);
        step(&mut tolerations, &mut saved, Autonomy::For(Duration::from_secs(90)));
        assert_eq!(tolerations.len(), 2);
        assert_eq!(tolerations[1], tol(TAINT_NOT_READY, "Exists", "NoExecute", Some(90)));
        assert_eq!(seconds(&tolerations[0]), Some(90));
        assert!(saved.as_deref().unwrap().contains(r#""added":true"#), "{saved:?}");
        step(&mut tolerations, &mut saved, Autonomy::Off);
        assert_eq!(tolerations[0], original[0]);
        assert_eq!(tolerations[1], tol(TAINT_NOT_READY, "Exists", "NoExecute", Some(0)));
        // The next autonomy period reuses the appended one.
        step(&mut tolerations, &mut saved, Autonomy::Forever);
        assert_eq!(tolerations.len(), 2);
        assert_eq!(seconds(&tolerations[1]), None);
        step(&mut tolerations, &mut saved, Autonomy::Off);
        assert_eq!(seconds(&tolerations[1]), Some(0));
    }

    #[test]
    fn daemonset_mirror_and_terminating_pods_are_not_rewritten_but_are_restored() {
        let list = vec![tol(TAINT_UNREACHABLE, "Exists", "NoExecute", Some(300))];
        let base = facts(&list, None);
        for (pod, skip) in [
            (PodFacts { daemonset: true, ..base }, Skip::DaemonSet),
            (PodFacts { mirror: true, ..base }, Skip::Mirror),
            (PodFacts { terminating: true, ..base }, Skip::Terminating),
        ] {
            let planned = plan(&pod, Autonomy::Forever).unwrap();
            assert_eq!((planned.patch, planned.skipped), (None, Some(skip)));
            assert_eq!(plan(&pod, Autonomy::Off).unwrap(), Plan::default());
        }
        // Saved tolerations on a pod adopted by a DaemonSet still go back.
        let list = vec![list[0].clone(), tol(TAINT_NOT_READY, "Exists", "NoExecute", Some(300))];
        let (mut tolerations, mut saved) = (list.clone(), None);
        step(&mut tolerations, &mut saved, Autonomy::Forever);
        let adopted = PodFacts { daemonset: true, ..facts(&tolerations, saved.as_deref()) };
        let patch = plan(&adopted, Autonomy::Off).unwrap().patch.unwrap();
        assert_eq!((patch.tolerations, patch.saved), (Some(list), SavedChange::Remove));
    }

    #[test]
    fn an_unreadable_annotation_leaves_the_pod_alone() {
        let list = vec![tol(TAINT_UNREACHABLE, "Exists", "NoExecute", None)];
        let cases = [
            ("not json", "not JSON"),
            (r#"{"version":2,"tolerations":[]}"#, "version 2; this netd reads version 1"),
            (r#"{"tolerations":[]}"#, "no numeric \"version\""),
            (r#"{"version":1,"tolerations":[],"extra":1}"#, "unknown field `extra`"),
            (r#"{"version":1,"tolerations":[{"index":"a","toleration":{}}]}"#, "at tolerations[0].index"),
            (
                r#"{"version":1,"tolerations":[{"index":0,"toleration":{},"seconds":3},{"index":0,"toleration":{}}]}"#,
                "two entries for index 0",
            ),
            (r#"{"version":1,"tolerations":[{"index":0,"toleration":{},"seconds":3,"added":true}]}"#, "both added"),
            (r#"{"version":1,"tolerations":[{"index":0,"toleration":{"tolerationSeconds":1}}]}"#, "inside"),
        ];
        for (text, expected) in cases {
            for autonomy in [Autonomy::Forever, Autonomy::Off] {
                let error = plan(&facts(&list, Some(text)), autonomy).unwrap_err().to_string();
                assert!(error.contains(expected) && error.contains(ANNOTATION_SAVED), "{text}: {error}");
            }
        }
    }

    #[test]
    fn a_saved_entry_that_no_longer_matches_is_kept_and_reported() {
        let (mut tolerations, mut saved) = (vec![tol(TAINT_UNREACHABLE, "Exists", "NoExecute", Some(300))], None);
        step(&mut tolerations, &mut saved, Autonomy::Forever);
        // A hand-edited entry for a toleration that is not there.
        let mut record: Value = serde_json::from_str(saved.as_deref().unwrap()).unwrap();
        record["tolerations"].as_array_mut().unwrap().push(json!({
            "index": 7, "toleration": { "key": "example.com/gone", "operator": "Exists", "effect": "NoExecute" }, "seconds": 1,
        }));
        let edited = record.to_string();
        let planned = plan(&facts(&tolerations, Some(&edited)), Autonomy::Off).unwrap();
        assert_eq!(planned.problems.len(), 1);
        assert!(planned.problems[0].contains("example.com/gone"), "{:?}", planned.problems);
        let patch = planned.patch.unwrap();
        assert_eq!(seconds(&patch.tolerations.unwrap()[0]), Some(300), "the matching entry is restored");
        let SavedChange::Set(left) = patch.saved else { panic!("the unmatched entry must be kept") };
        let left: Value = serde_json::from_str(&left).unwrap();
        assert_eq!(left["tolerations"].as_array().unwrap().len(), 1);
        assert_eq!(left["tolerations"][0]["index"], 7);
    }

    #[test]
    fn a_reordered_list_is_followed_by_content() {
        let a = tol(TAINT_NOT_READY, "Exists", "NoExecute", Some(30));
        let b = tol(TAINT_UNREACHABLE, "Exists", "NoExecute", Some(40));
        let (mut tolerations, mut saved) = (vec![a.clone(), b.clone()], None);
        step(&mut tolerations, &mut saved, Autonomy::Forever);
        tolerations.reverse();
        step(&mut tolerations, &mut saved, Autonomy::Off);
        assert_eq!(tolerations, vec![b, a]);
        assert_eq!(saved, None);
    }

    #[test]
    fn the_merge_patch_carries_the_resource_version() {
        let list = vec![tol(TAINT_UNREACHABLE, "Exists", "NoExecute", Some(300))];
        let patch = plan(&facts(&list, None), Autonomy::Forever).unwrap().patch.unwrap();
        let body = patch.to_merge_patch(Some("42"));
        assert_eq!(body["metadata"]["resourceVersion"], "42");
        assert!(body["metadata"]["annotations"][ANNOTATION_SAVED].is_string());
        assert_eq!(body["spec"]["tolerations"][0], tol(TAINT_UNREACHABLE, "Exists", "NoExecute", None));
        assert_eq!(body["spec"]["tolerations"][1]["key"], TAINT_NOT_READY);
        let restore = PodPatch { direction: Direction::Restore, tolerations: None, saved: SavedChange::Remove };
        assert_eq!(restore.to_merge_patch(None), json!({ "metadata": { "annotations": { ANNOTATION_SAVED: null } } }));
    }

    #[test]
    fn pod_and_node_objects_are_read_leniently() {
        let pod = Object::<PodTolerations>::from_value(json!({
            "metadata": { "name": "p", "namespace": "d", "deletionTimestamp": "2026-01-01T00:00:00Z",
                          "ownerReferences": [{ "kind": "DaemonSet", "name": "ds" }],
                          "annotations": { ANNOTATION_MIRROR: "x", ANNOTATION_SAVED: "{}", "other": "y" } },
            "spec": { "nodeName": "n", "tolerations": [tol("", "Exists", "", None)], "containers": [] },
        }));
        let facts = PodFacts::of(&pod).unwrap();
        assert!(facts.daemonset && facts.mirror && facts.terminating);
        assert_eq!((facts.saved, facts.tolerations.len()), (Some("{}"), 1));
        assert_eq!(pod_node(&pod), Some("n"));
        let odd = Object::<PodTolerations>::from_value(json!({ "spec": { "tolerations": "all" } }));
        assert!(PodFacts::of(&odd).unwrap_err().to_string().contains("not a list"));

        let node = |labels: Value, annotations: Value| {
            SlimNode::from_value(json!({ "metadata": { "name": "n", "labels": labels, "annotations": annotations } }))
        };
        let on = json!({ netd_model::autonomy::ANNOTATION_AUTONOMY: "true" });
        let edge_worker = netd_model::roles::LABEL_EDGE_WORKER;
        assert_eq!(node_autonomy(&node(json!({ edge_worker: "true" }), on.clone())).0, Autonomy::Forever);
        assert_eq!(node_autonomy(&node(json!({}), on.clone())).0, Autonomy::Forever);
        // The seed's label, which a kubelet may write itself, is not a role.
        assert_eq!(node_autonomy(&node(json!({ edge_worker: "false" }), on.clone())).0, Autonomy::Forever);
        let (cloud, why) = node_autonomy(&node(json!({ LABEL_ROLE: "cloud" }), on));
        assert_eq!(cloud, Autonomy::Off);
        assert!(why.unwrap().contains("cloud node"));
        let bounded = json!({ netd_model::autonomy::ANNOTATION_AUTONOMY_DURATION: "90s" });
        assert_eq!(node_autonomy(&node(json!({}), bounded)).0, Autonomy::For(Duration::from_secs(90)));
    }

    #[test]
    fn the_kinds_keep_the_fields_read_here() {
        use netd_kube::object::Kind;
        let escaped = |prefix: &str, key: &str| format!("{prefix}{}", key.replace('/', "~1"));
        for key in [ANNOTATION_SAVED, ANNOTATION_MIRROR] {
            assert!(PodTolerations::KEEP.contains(&escaped("/metadata/annotations/", key).as_str()), "{key}");
        }
        use netd_kube::object::NodeAutonomy;
        for key in netd_model::autonomy::ANNOTATIONS {
            assert!(NodeAutonomy::KEEP.contains(&escaped("/metadata/annotations/", key).as_str()), "{key}");
        }
        assert!(NodeAutonomy::KEEP.contains(&escaped("/metadata/labels/", LABEL_ROLE).as_str()));
        // The shared Node store reads them too.
        use super::super::node_watch::READ;
        for key in netd_model::autonomy::ANNOTATIONS {
            assert!(READ.contains(&escaped("/metadata/annotations/", key).as_str()), "{key}");
        }
        assert!(READ.contains(&escaped("/metadata/labels/", LABEL_ROLE).as_str()));
    }

    #[test]
    fn metrics_render_as_prometheus_text() {
        let metrics = Arc::new(TolerationMetrics::default());
        metrics.rewritten.fetch_add(3, Ordering::Relaxed);
        let text = metrics.render_prometheus();
        assert!(text.contains("# TYPE netd_controller_tolerations_rewritten_total counter\nnetd_controller_tolerations_rewritten_total 3\n"));
        assert!(text.contains("netd_controller_tolerations_restored_total 0\n"));
        assert!(text.contains("# TYPE netd_controller_autonomous_nodes gauge\n"));
    }

    #[test]
    fn bounds_round_up_to_whole_seconds() {
        assert_eq!(bound_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(bound_seconds(Duration::from_millis(1)), 1);
        assert_eq!(bound_seconds(Duration::from_secs(60)), 60);
    }
}
