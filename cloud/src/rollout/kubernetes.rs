//! Rollouts on Kubernetes: the netd DaemonSet with `updateStrategy:
//! OnDelete`, whose pods netd-controller deletes batch by batch; the real
//! DaemonSet controller re-creates each on the new template, and a node
//! counts as upgraded when its new pod is Ready.
//!
//! - **Versions** are DaemonSet revisions: the `controller-revision-hash`
//!   of the newest ControllerRevision the DaemonSet owns is the target, and
//!   a pod's label of that name is what it runs. The image of the template
//!   names the target for people.
//! - **State** is the ConfigMap `<namespace>/netd-rollout` (key
//!   `rollout.json`, a [`RolloutState`]; key `daemonset`, the DaemonSet's
//!   `namespace/name`). Every write carries the resourceVersion it read, so
//!   an operator's request and the executor never overwrite each other.
//! - **The executor** ([`run`]) is a leader task of `netd-controller run`:
//!   it watches the ConfigMap and the namespace's pods through
//!   [`ListWatch`] (pods only while a rollout is open) and reads the nodes
//!   from the controller's one shared Node list+watch
//!   ([`crate::controller::node_watch`]), steps the
//!   state on every change and every second, saves it, and only then
//!   deletes old pods — each with a UID precondition, and never one on the
//!   target revision.
//! - **Commands** ([`start`], [`load`], [`ask`]) are what `netd-controller
//!   rollout start|status|pause|resume|cancel` do, from any machine with API
//!   access.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use serde_json::Value;

use super::state::{phase_name, unix_now, NodeView, Phase, Request, RolloutState, StateError};
use crate::controller::node_watch::{NodeEvents, NodeWatch, NodeWire, Ready, SlimNode};
use netd_kube::events::{self, Regarding, Reporter};
use netd_kube::object::{NodeImages, Object, PodRevision};
use netd_kube::watch::{ListWatch, WatchEvent};
use netd_kube::{call, KubeClient, KubeError};
use netd_model::autonomy::AutonomyStatus;

/// Name of the rollout's ConfigMap (in the DaemonSet's namespace).
pub const STATE_CONFIG_MAP: &str = "netd-rollout";
/// Its key holding the [`RolloutState`].
pub const STATE_KEY: &str = "rollout.json";
/// Its key naming the DaemonSet (`namespace/name`).
pub const DAEMONSET_KEY: &str = "daemonset";
/// Its key holding the DaemonSet's UID (a DaemonSet deleted and made again
/// is another one).
pub const DAEMONSET_UID_KEY: &str = "daemonsetUID";
/// Its key holding the DaemonSet's pod label selector.
pub const SELECTOR_KEY: &str = "selector";
/// The netd DaemonSet of deploy/.
pub const DEFAULT_DAEMONSET: &str = "kube-system/netd";
/// The label a DaemonSet's pods and ControllerRevisions carry.
const REVISION_LABEL: &str = "controller-revision-hash";
/// How often the executor steps when nothing changes (timeouts, TTL).
const TICK: Duration = Duration::from_secs(1);
/// Events folded in at most before a step.
const BURST: usize = 1000;

/// Errors of rollouts on Kubernetes.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The API server failed or refused.
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// The stored state cannot be used, or a request does not apply.
    #[error(transparent)]
    State(#[from] StateError),
    /// A DaemonSet name that is not `namespace/name`.
    #[error("--daemonset {0:?}: expected NAMESPACE/NAME")]
    BadName(String),
    /// The DaemonSet cannot be rolled out by netd.
    #[error("daemon set {daemonset}: {reason}")]
    DaemonSet {
        /// `namespace/name`.
        daemonset: String,
        /// Why.
        reason: String,
    },
    /// The pre-check failed: nothing was started.
    #[error("pre-check failed, nothing started:\n{}", .0.join("\n"))]
    PreCheck(Vec<String>),
    /// No rollout is recorded.
    #[error("no rollout is recorded in {0}")]
    NoRollout(String),
}

/// A DaemonSet by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSetRef {
    /// Its namespace (the rollout state lives there too).
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl std::str::FromStr for DaemonSetRef {
    type Err = RolloutError;

    fn from_str(text: &str) -> Result<Self, RolloutError> {
        match text.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self { namespace: namespace.into(), name: name.into() })
            }
            _ => Err(RolloutError::BadName(text.into())),
        }
    }
}

impl std::fmt::Display for DaemonSetRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How a rollout starts.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The DaemonSet.
    pub daemonset: DaemonSetRef,
    /// How long each node may take to come back Ready.
    pub node_timeout: Duration,
    /// Also require the target image on every online target node (edge
    /// nodes that cannot pull while cut off).
    pub require_image: bool,
}

/// A pod of the DaemonSet, as a rollout sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NetdPod {
    name: String,
    uid: String,
    node: Option<String>,
    revision: Option<String>,
    terminating: bool,
    ready: bool,
    detail: String,
}

impl NetdPod {
    /// The pod when `owner` (a DaemonSet UID) controls it.
    fn from_object(pod: &Object<PodRevision>, owner: &str) -> Option<Self> {
        let owned = pod
            .get("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(owner)));
        if !owned {
            return None;
        }
        let text = |pointer: &str| pod.get(pointer).and_then(Value::as_str).map(str::to_string);
        // A DaemonSet pod is created bound by node affinity; the scheduler
        // sets nodeName later.
        let node = text("/spec/nodeName").or_else(|| {
            pod.get("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")?
                .as_array()?
                .iter()
                .flat_map(|term| term["matchFields"].as_array().cloned().unwrap_or_default())
                .find(|field| field["key"] == "metadata.name")?["values"][0]
                .as_str()
                .map(str::to_string)
        });
        let conditions = pod.get("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
        let ready_condition = conditions.iter().find(|c| c["type"] == "Ready");
        let ready = ready_condition.is_some_and(|c| c["status"] == "True");
        let mut detail = Vec::new();
        if let Some(phase) = text("/status/phase") {
            detail.push(format!("pod {} {phase}", pod.name().unwrap_or("?")));
        } else {
            detail.push(format!("pod {} not started", pod.name().unwrap_or("?")));
        }
        for status in pod.get("/status/containerStatuses").and_then(Value::as_array).into_iter().flatten() {
            if let Some(waiting) = status["state"]["waiting"].as_object() {
                let reason = waiting.get("reason").and_then(Value::as_str).unwrap_or("waiting");
                detail.push(format!("{}: {reason}", status["name"].as_str().unwrap_or("container")));
            }
        }
        if let Some(c) = ready_condition.filter(|_| !ready) {
            let why = [c["reason"].as_str(), c["message"].as_str()].into_iter().flatten().collect::<Vec<_>>();
            if !why.is_empty() {
                detail.push(format!("Ready=False: {}", why.join(": ")));
            }
        }
        Some(Self {
            name: pod.name()?.to_string(),
            uid: pod.uid()?.to_string(),
            node,
            revision: text("/metadata/labels/controller-revision-hash"),
            terminating: pod.get("/metadata/deletionTimestamp").is_some_and(|t| !t.is_null()),
            ready,
            detail: detail.join(", "),
        })
    }
}

/// Why a node counts as offline, or `None` when its Ready condition is True.
fn offline_reason(node: &SlimNode) -> Option<String> {
    let ready = match node.ready() {
        Ready::Unreported => return Some("no Ready condition (no kubelet has reported)".into()),
        Ready::True => return None,
        Ready::Not(ready) => ready,
    };
    let autonomy = AutonomyStatus::from_annotations(|key| node.autonomy_annotation(key)).autonomy;
    let mut reason = format!("Ready={} since {}", ready.status, ready.since.as_deref().unwrap_or("?"));
    if let Some(message) = &ready.message {
        reason.push_str(&format!(" ({message})"));
    }
    if autonomy.is_on() {
        reason.push_str(&format!(", autonomous: {autonomy}"));
    }
    Some(reason)
}

/// Every node with what its netd runs: the DaemonSet's live (not
/// terminating) pod on it, preferring one on `target`.
fn views<'a>(
    pods: &[NetdPod],
    nodes: impl IntoIterator<Item = &'a SlimNode>,
    target: &str,
) -> BTreeMap<String, NodeView> {
    let mut out: BTreeMap<String, NodeView> = BTreeMap::new();
    for node in nodes {
        let Some(name) = node.name() else { continue };
        out.insert(name.to_string(), NodeView { offline: offline_reason(node), ..NodeView::default() });
    }
    for pod in pods.iter().filter(|p| !p.terminating) {
        let Some(view) = pod.node.as_ref().and_then(|n| out.get_mut(n)) else { continue };
        let better = view.version.as_deref() != Some(target);
        if view.version.is_none() || better {
            view.version = pod.revision.clone();
            view.ready = pod.ready;
            view.detail = pod.detail.clone();
        }
    }
    out
}

/// What a rollout of the DaemonSet would do now.
struct Observed {
    uid: String,
    selector: String,
    target: String,
    image: String,
    pods: Vec<NetdPod>,
}

async fn observe(client: &KubeClient, ds: &DaemonSetRef) -> Result<Observed, RolloutError> {
    let refuse = |reason: String| RolloutError::DaemonSet { daemonset: ds.to_string(), reason };
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.client(), &ds.namespace);
    let daemonset = call(&format!("reading daemon set {ds}"), daemonsets.get(&ds.name)).await?;
    let uid = daemonset.metadata.uid.clone().ok_or_else(|| refuse("it has no UID".into()))?;
    let spec = daemonset.spec.as_ref().ok_or_else(|| refuse("it has no spec".into()))?;
    let strategy =
        spec.update_strategy.as_ref().and_then(|s| s.type_.clone()).unwrap_or_else(|| "RollingUpdate".into());
    if strategy != "OnDelete" {
        return Err(refuse(format!(
            "its updateStrategy is {strategy}: the DaemonSet controller would replace pods itself; set `updateStrategy: {{type: OnDelete}}` (deploy/30-daemonset.yaml has it)"
        )));
    }
    let generation = daemonset.metadata.generation.unwrap_or(0);
    let observed = daemonset.status.as_ref().and_then(|s| s.observed_generation).unwrap_or(0);
    if observed < generation {
        return Err(refuse(format!(
            "the DaemonSet controller has not yet seen generation {generation} (it has seen {observed}); try again in a moment"
        )));
    }
    let selector = spec
        .selector
        .match_labels
        .as_ref()
        .map(|labels| labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
        .unwrap_or_default();
    let revisions: Api<ControllerRevision> = Api::namespaced(client.client(), &ds.namespace);
    let listed =
        call(&format!("listing the revisions of {ds}"), revisions.list(&ListParams::default().labels(&selector)))
            .await?;
    let newest = listed
        .items
        .iter()
        .filter(|r| r.metadata.owner_references.iter().flatten().any(|o| o.uid == uid))
        .max_by_key(|r| r.revision)
        .ok_or_else(|| refuse("it owns no ControllerRevision yet".into()))?;
    let target = newest
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(REVISION_LABEL))
        .cloned()
        .ok_or_else(|| refuse(format!("its newest revision has no {REVISION_LABEL} label")))?;
    let containers = spec.template.spec.as_ref().map(|s| s.containers.clone()).unwrap_or_default();
    let image = containers
        .iter()
        .find(|c| c.name == "netd")
        .or(containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    let pods: Api<Object<PodRevision>> = Api::namespaced(client.client(), &ds.namespace);
    let listed =
        call(&format!("listing the pods of {ds}"), pods.list(&ListParams::default().labels(&selector))).await?;
    let pods = listed.items.iter().filter_map(|p| NetdPod::from_object(p, &uid)).collect();
    Ok(Observed { uid, selector, target, image, pods })
}

fn config_maps(client: &KubeClient, namespace: &str) -> Api<ConfigMap> {
    Api::namespaced(client.client(), namespace)
}

/// The DaemonSet a rollout is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its name.
    pub daemonset: DaemonSetRef,
    /// Its UID (a DaemonSet deleted and made again is another one).
    pub uid: String,
    /// Its pod label selector (`app=netd`), so only its pods are watched.
    pub selector: String,
}

/// A rollout as recorded: its state, the ConfigMap's resourceVersion and
/// the DaemonSet.
pub type Recorded = (RolloutState, String, Target);

/// The recorded rollout of `namespace`, if any.
pub async fn load(client: &KubeClient, namespace: &str) -> Result<Option<Recorded>, RolloutError> {
    let what = format!("reading {namespace}/{STATE_CONFIG_MAP}");
    match call(&what, config_maps(client, namespace).get(STATE_CONFIG_MAP)).await {
        Ok(cm) => decode(&cm).map(Some),
        Err(KubeError::NotFound { .. }) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

fn decode(cm: &ConfigMap) -> Result<Recorded, RolloutError> {
    let data = cm.data.clone().unwrap_or_default();
    let key = |key: &str| data.get(key).ok_or_else(|| StateError::Unreadable(format!("no key {key}")));
    let state = RolloutState::from_json(key(STATE_KEY)?)?;
    let target = Target {
        daemonset: key(DAEMONSET_KEY)?.parse()?,
        uid: key(DAEMONSET_UID_KEY)?.clone(),
        selector: key(SELECTOR_KEY)?.clone(),
    };
    Ok((state, cm.metadata.resource_version.clone().unwrap_or_default(), target))
}

fn encode(state: &RolloutState, target: &Target, version: Option<String>) -> ConfigMap {
    let ds = &target.daemonset;
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(STATE_CONFIG_MAP.into()),
            namespace: Some(ds.namespace.clone()),
            resource_version: version,
            labels: Some([("app.kubernetes.io/managed-by".to_string(), "netd-controller".to_string())].into()),
            ..Default::default()
        },
        data: Some(
            [
                (STATE_KEY.to_string(), state.to_json()),
                (DAEMONSET_KEY.to_string(), ds.to_string()),
                (DAEMONSET_UID_KEY.to_string(), target.uid.clone()),
                (SELECTOR_KEY.to_string(), target.selector.clone()),
            ]
            .into_iter()
            .collect(),
        ),
        ..Default::default()
    }
}

/// Writes `state` over the version read (`None`: creates it); the new
/// resourceVersion. A concurrent writer makes this fail with
/// [`KubeError::Conflict`].
async fn save(
    client: &KubeClient,
    state: &RolloutState,
    target: &Target,
    version: Option<String>,
) -> Result<String, KubeError> {
    let namespace = &target.daemonset.namespace;
    let what = format!("writing {namespace}/{STATE_CONFIG_MAP}");
    let api = config_maps(client, namespace);
    let cm = encode(state, target, version.clone());
    let stored = match version {
        None => call(&what, api.create(&PostParams::default(), &cm)).await?,
        Some(_) => call(&what, api.replace(STATE_CONFIG_MAP, &PostParams::default(), &cm)).await?,
    };
    Ok(stored.metadata.resource_version.unwrap_or_default())
}

/// The pre-check and the start of a rollout: every target node's netd
/// ready and on one version, the registry reachable, no other rollout open,
/// a new version to roll out (and with `require_image`, its image on each
/// online target node). A failure names every failing node and reason and
/// starts nothing.
pub async fn start(client: &KubeClient, options: &StartOptions) -> Result<RolloutState, RolloutError> {
    let ds = &options.daemonset;
    let existing = load(client, &ds.namespace).await;
    let version = match &existing {
        Ok(Some((state, _, other))) if state.phase.is_open() => {
            return Err(RolloutError::PreCheck(vec![format!(
                "another rollout is {} (daemon set {}, to {}, started {}): cancel it first",
                phase_name(state.phase),
                other.daemonset,
                state.target_label,
                super::state::format_unix(state.started)
            )]));
        }
        Ok(Some((_, version, _))) => Some(version.clone()),
        Ok(None) => None,
        // A state this netd cannot read is not overwritten blindly.
        Err(error) => return Err(RolloutError::PreCheck(vec![format!("the recorded rollout: {error}")])),
    };
    let observed = observe(client, ds).await?;
    let nodes: Api<NodeWire> = Api::all(client.client());
    let nodes: Vec<SlimNode> = call("listing nodes", nodes.list(&ListParams::default()))
        .await?
        .items
        .into_iter()
        .map(NodeWire::into_slim)
        .collect();
    let views = views(&observed.pods, &nodes, &observed.target);
    let images = if options.require_image {
        let api: Api<Object<NodeImages>> = Api::all(client.client());
        call("listing node images", api.list(&ListParams::default())).await?.items
    } else {
        Vec::new()
    };
    let with_pods: BTreeSet<&str> = observed.pods.iter().filter_map(|p| p.node.as_deref()).collect();
    let mut problems = Vec::new();
    let mut from: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut targets = Vec::new();
    for (name, view) in &views {
        if !with_pods.contains(name.as_str()) || view.version.as_deref() == Some(observed.target.as_str()) {
            continue;
        }
        targets.push(name.clone());
        match &view.version {
            Some(version) => from.entry(version.clone()).or_default().push(name.clone()),
            None => problems.push(format!("{name}: no running netd pod (one is being replaced?)")),
        }
        if view.offline.is_some() {
            continue; // deferred, not a failure
        }
        if !view.ready {
            problems.push(format!("{name}: netd is not ready ({})", view.detail));
        }
        if options.require_image {
            let has = images.iter().find(|n| n.name() == Some(name.as_str())).is_some_and(|n| {
                n.get("/status/images").and_then(Value::as_array).into_iter().flatten().any(|image| {
                    image["names"].as_array().into_iter().flatten().any(|n| n.as_str() == Some(observed.image.as_str()))
                })
            });
            if !has {
                problems.push(format!("{name}: image {} is not on the node (pull it there first)", observed.image));
            }
        }
    }
    if targets.is_empty() {
        return Err(RolloutError::PreCheck(vec![format!(
            "nothing to roll out: every netd pod of {ds} runs revision {} ({})",
            observed.target, observed.image
        )]));
    }
    if from.len() > 1 {
        let versions: Vec<String> =
            from.iter().map(|(v, nodes)| format!("{v} on {} node(s): {}", nodes.len(), nodes.join(", "))).collect();
        problems.push(format!("the target nodes run more than one version: {}", versions.join("; ")));
    }
    if !problems.is_empty() {
        return Err(RolloutError::PreCheck(problems));
    }
    let from = from.into_keys().next().unwrap_or_default();
    let label = format!("{} ({})", observed.image, observed.target);
    let state = RolloutState::new(&observed.target, &label, &from, targets, options.node_timeout, unix_now());
    let recorded = Target { daemonset: ds.clone(), uid: observed.uid.clone(), selector: observed.selector.clone() };
    save(client, &state, &recorded, version).await.map_err(|error| match error {
        KubeError::Conflict { .. } => {
            RolloutError::PreCheck(vec!["another rollout was recorded meanwhile: see `rollout status`".into()])
        }
        other => other.into(),
    })?;
    Ok(state)
}

/// Records an operator's request (pause, resume, cancel), retrying when the
/// executor writes meanwhile; the state as saved.
pub async fn ask(client: &KubeClient, namespace: &str, request: Request) -> Result<RolloutState, RolloutError> {
    loop {
        let (mut state, version, target) = load(client, namespace)
            .await?
            .ok_or_else(|| RolloutError::NoRollout(format!("{namespace}/{STATE_CONFIG_MAP}")))?;
        state.ask(request)?;
        match save(client, &state, &target, Some(version)).await {
            Ok(_) => return Ok(state),
            Err(KubeError::Conflict { .. }) => continue,
            Err(error) => return Err(error.into()),
        }
    }
}

/// Counters of the executor, for `/metrics`.
#[derive(Debug, Default)]
pub struct RolloutMetrics {
    /// Nodes of the open rollout on the target.
    pub nodes_updated: AtomicU64,
    /// Nodes the open rollout covers.
    pub nodes_total: AtomicU64,
    /// 0 none open, 1 running, 2 paused.
    pub phase: AtomicU64,
    /// Old netd pods deleted.
    pub pods_deleted: AtomicU64,
}

/// Read at scrape time (`/metrics` registers the controller's).
impl netd_metrics::Collector for RolloutMetrics {
    fn encode(&self, encoder: netd_metrics::DescriptorEncoder) -> std::fmt::Result {
        let mut out = netd_metrics::Families::new(encoder);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.gauge("netd_rollout_phase", "Open rollout: 0 none, 1 running, 2 paused.", get(&self.phase))?;
        out.gauge("netd_rollout_nodes_updated", "Nodes of the open rollout on its target.", get(&self.nodes_updated))?;
        out.gauge("netd_rollout_nodes_total", "Nodes the open rollout covers.", get(&self.nodes_total))?;
        out.counter("netd_rollout_pods_deleted_total", "Old netd pods deleted by rollouts.", get(&self.pods_deleted))
    }
}

/// How the executor runs.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// Where the rollout ConfigMap (and the DaemonSet) lives.
    pub namespace: String,
    /// A rollout paused this long is closed.
    pub paused_ttl: Duration,
    /// Who posts the rollout's Events (the controller's node).
    pub host: String,
}

impl Default for ExecutorOptions {
    fn default() -> Self {
        Self { namespace: "kube-system".into(), paused_ttl: super::state::DEFAULT_PAUSED_TTL, host: String::new() }
    }
}

/// The component name on the rollout's Events.
pub const COMPONENT: &str = "netd-controller";

/// Posts the step's turning points as Events on the DaemonSet (what
/// `kubectl describe ds` shows), in the background.
fn post_events(client: &KubeClient, target: &Target, host: &str, step: &super::Step) {
    let regarding = Regarding {
        api_version: "apps/v1".into(),
        kind: "DaemonSet".into(),
        namespace: target.daemonset.namespace.clone(),
        name: target.daemonset.name.clone(),
        uid: Some(target.uid.clone()),
        resource_version: None,
    };
    for note in &step.events {
        let kind = if note.warning { "Warning" } else { "Normal" };
        let event =
            events::event(&regarding, Reporter { component: COMPONENT, host }, kind, note.reason, &note.message);
        let client = client.clone();
        tokio::spawn(async move {
            if let Err(error) = events::post(&client, &event).await {
                tracing::warn!("rollout: {error}");
            }
        });
    }
}

/// The watches of an open rollout.
struct Open {
    target: Target,
    pods: ListWatch<Object<PodRevision>>,
    nodes: NodeEvents,
    pod_cache: BTreeMap<String, Object<PodRevision>>,
    node_cache: BTreeMap<String, Arc<SlimNode>>,
    pods_listed: bool,
    nodes_listed: bool,
    /// Pods already deleted, so a watch that lags does not delete twice.
    deleted: BTreeSet<String>,
}

impl Open {
    fn new(client: &KubeClient, nodes: &NodeWatch, target: &Target) -> Self {
        let pods = ListWatch::namespaced(client, target.daemonset.namespace.clone(), None, "netd pod");
        Self {
            target: target.clone(),
            pods: if target.selector.is_empty() { pods } else { pods.with_labels(target.selector.clone()) },
            nodes: nodes.subscribe(),
            pod_cache: BTreeMap::new(),
            node_cache: BTreeMap::new(),
            pods_listed: false,
            nodes_listed: false,
            deleted: BTreeSet::new(),
        }
    }

    /// Waits for the next pod or node event and folds it in (cancel-safe:
    /// both watches are).
    async fn next(&mut self) {
        tokio::select! {
            event = self.pods.next() => {
                self.pods_listed |= matches!(event, WatchEvent::Listed(_));
                fold(&mut self.pod_cache, event, |o| format!("{}/{}", o.namespace().unwrap_or(""), o.name().unwrap_or("")));
            }
            event = self.nodes.next() => {
                self.nodes_listed |= matches!(event, WatchEvent::Listed(_));
                fold(&mut self.node_cache, event, |o| o.name().unwrap_or("").to_string());
            }
        }
    }
}

fn fold<T>(cache: &mut BTreeMap<String, T>, event: WatchEvent<T>, key: impl Fn(&T) -> String) {
    match event {
        WatchEvent::Listed(all) => *cache = all.into_iter().map(|o| (key(&o), o)).collect(),
        WatchEvent::Applied(o) => {
            cache.insert(key(&o), o);
        }
        WatchEvent::Deleted(o) => {
            cache.remove(&key(&o));
        }
    }
}

/// Runs the executor (on the leader) for ever; see the module docs.
pub async fn run(client: KubeClient, options: ExecutorOptions, metrics: Arc<RolloutMetrics>) -> Result<(), KubeError> {
    let nodes = NodeWatch::new(&client);
    run_on(client, nodes, options, metrics).await
}

/// [`run`] on a shared Node list+watch (the controller's one): subscribed
/// to while a rollout is open.
pub async fn run_on(
    client: KubeClient,
    nodes: NodeWatch,
    options: ExecutorOptions,
    metrics: Arc<RolloutMetrics>,
) -> Result<(), KubeError> {
    let field = format!("metadata.name={STATE_CONFIG_MAP}");
    let mut state_watch: ListWatch<ConfigMap> =
        ListWatch::namespaced(&client, options.namespace.clone(), Some(field), "rollout state");
    let mut recorded: Option<ConfigMap> = None;
    let mut open: Option<Open> = None;
    let mut unreadable: Option<String> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = state_watch.next() => match event {
                WatchEvent::Listed(all) => recorded = all.into_iter().next(),
                WatchEvent::Applied(cm) => recorded = Some(cm),
                WatchEvent::Deleted(_) => recorded = None,
            },
            () = async {
                match open.as_mut() {
                    Some(o) => o.next().await,
                    None => std::future::pending().await,
                }
            } => {
                // Fold in what has already arrived too, so a burst (a relist,
                // a batch's pods being replaced) costs one step, not one each.
                if let Some(o) = open.as_mut() {
                    for _ in 0..BURST {
                        if o.next().now_or_never().is_none() {
                            break;
                        }
                    }
                }
            }
            _ = tick.tick() => {}
        }
        let decoded = match recorded.as_ref().map(decode) {
            None => None,
            Some(Ok(found)) => {
                unreadable = None;
                Some(found)
            }
            Some(Err(error)) => {
                let text = error.to_string();
                if unreadable.as_ref() != Some(&text) {
                    tracing::warn!("rollout: {text}; nothing is done until it is fixed or removed");
                    unreadable = Some(text);
                }
                None
            }
        };
        let Some((mut state, version, target)) = decoded.filter(|(state, ..)| state.phase.is_open()) else {
            open = None;
            metrics.phase.store(0, Ordering::Relaxed);
            continue;
        };
        // A paused rollout observes nothing (it only ages, or is resumed or
        // cancelled): no watches for the days it may stay paused.
        let observing = state.phase == Phase::Running || state.request == Some(Request::Resume);
        if !observing {
            open = None;
        } else if open.as_ref().is_none_or(|o| o.target != target) {
            open = Some(Open::new(&client, &nodes, &target));
        }
        let (ds, uid) = (&target.daemonset, &target.uid);
        let (pods, seen) = match open.as_ref() {
            None => (Vec::new(), BTreeMap::new()),
            Some(o) if o.pods_listed && o.nodes_listed => {
                let pods: Vec<NetdPod> = o.pod_cache.values().filter_map(|p| NetdPod::from_object(p, uid)).collect();
                let seen = views(&pods, o.node_cache.values().map(|n| &**n), &state.target);
                (pods, seen)
            }
            // Not a complete picture yet: a node missing from it would count as gone.
            Some(_) => continue,
        };
        let step = state.step(&seen, unix_now(), options.paused_ttl);
        for line in &step.lines {
            tracing::info!(daemonset = %ds, "rollout: {line}");
        }
        if step.close {
            post_events(&client, &target, &options.host, &step);
            let what = format!("removing {}/{STATE_CONFIG_MAP}", ds.namespace);
            let params = DeleteParams {
                preconditions: Some(Preconditions { resource_version: Some(version), uid: None }),
                ..Default::default()
            };
            match call(&what, config_maps(&client, &ds.namespace).delete(STATE_CONFIG_MAP, &params)).await {
                Ok(_) | Err(KubeError::NotFound { .. }) => recorded = None,
                Err(error) => tracing::warn!("rollout: {error}"),
            }
            continue;
        }
        if step.changed {
            match save(&client, &state, &target, Some(version)).await {
                Ok(version) => {
                    recorded = Some(encode(&state, &target, Some(version)));
                    post_events(&client, &target, &options.host, &step);
                }
                Err(error) => {
                    // Someone (an operator's request) wrote first: read it
                    // again and step on that; nothing is acted on.
                    tracing::info!("rollout: {error}; reading the state again");
                    match call("reading the rollout state", config_maps(&client, &ds.namespace).get(STATE_CONFIG_MAP))
                        .await
                    {
                        Ok(cm) => recorded = Some(cm),
                        Err(KubeError::NotFound { .. }) => recorded = None,
                        Err(error) => tracing::warn!("rollout: {error}"),
                    }
                    continue;
                }
            }
        }
        let phase = match state.phase {
            Phase::Running => 1,
            Phase::Paused => 2,
            Phase::Cancelled | Phase::Complete => 0,
        };
        metrics.phase.store(phase, Ordering::Relaxed);
        metrics.nodes_updated.store(state.updated() as u64, Ordering::Relaxed);
        metrics.nodes_total.store(state.total() as u64, Ordering::Relaxed);
        let Some(o) = open.as_mut() else { continue };
        for node in &step.upgrade {
            for pod in pods.iter().filter(|p| p.node.as_ref() == Some(node)) {
                if pod.terminating
                    || pod.revision.as_deref() == Some(state.target.as_str())
                    || o.deleted.contains(&pod.uid)
                {
                    continue;
                }
                let what = format!("deleting netd pod {}/{} on {node}", ds.namespace, pod.name);
                let params = DeleteParams {
                    preconditions: Some(Preconditions { uid: Some(pod.uid.clone()), resource_version: None }),
                    ..Default::default()
                };
                let api: Api<Object<PodRevision>> = Api::namespaced(client.client(), &ds.namespace);
                match call(&what, api.delete(&pod.name, &params)).await {
                    Ok(_) | Err(KubeError::NotFound { .. }) => {
                        o.deleted.insert(pod.uid.clone());
                        metrics.pods_deleted.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            "rollout: {node}: deleted netd pod {} (revision {}); the DaemonSet controller makes one on {}",
                            pod.name,
                            pod.revision.as_deref().unwrap_or("?"),
                            state.target
                        );
                    }
                    Err(error) => tracing::warn!("rollout: {error}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn daemon_set_names_are_namespace_slash_name() {
        let ds: DaemonSetRef = "kube-system/netd".parse().expect("valid");
        assert_eq!(ds, DaemonSetRef { namespace: "kube-system".into(), name: "netd".into() });
        for bad in ["netd", "/netd", "kube-system/", "a/b/c", ""] {
            let error = bad.parse::<DaemonSetRef>().expect_err(bad);
            assert!(error.to_string().contains("expected NAMESPACE/NAME"), "{error}");
        }
    }

    #[test]
    fn the_state_config_map_round_trips_and_missing_keys_are_named() {
        let target = Target {
            daemonset: DaemonSetRef { namespace: "kube-system".into(), name: "netd".into() },
            uid: "0b6e1b6c-1d2e-4f5a-9b8c-7d6e5f4a3b2c".into(),
            selector: "app=netd".into(),
        };
        let state = RolloutState::new(
            "6b9d4c5f7",
            "netd:v2 (6b9d4c5f7)",
            "5d4f8b7c9",
            ["edge-1".to_string()],
            Duration::from_secs(300),
            1_764_590_400,
        );
        let mut cm = encode(&state, &target, Some("42".into()));
        let (read, version, read_target) = decode(&cm).expect("decodes");
        assert_eq!((read, version.as_str(), read_target), (state, "42", target));
        cm.data.as_mut().map(|d| d.remove(DAEMONSET_UID_KEY));
        let error = decode(&cm).expect_err("no UID");
        assert_eq!(error.to_string(), "the rollout state is unreadable: no key daemonsetUID");
    }

    fn pod(value: Value) -> Object<PodRevision> {
        Object::from_value(value)
    }

    #[test]
    fn pods_are_read_with_their_node_revision_and_readiness() {
        let bound = pod(json!({
            "metadata": {"name": "netd-a", "uid": "u1", "labels": {"controller-revision-hash": "r1"},
                         "ownerReferences": [{"uid": "ds-uid", "kind": "DaemonSet"}]},
            "spec": {"nodeName": "edge-1"},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        }));
        let read = NetdPod::from_object(&bound, "ds-uid").expect("owned");
        assert_eq!((read.node.as_deref(), read.revision.as_deref(), read.ready), (Some("edge-1"), Some("r1"), true));
        assert!(NetdPod::from_object(&bound, "other-ds").is_none(), "another owner's pod is not ours");
        let unbound = pod(json!({
            "metadata": {"name": "netd-b", "uid": "u2", "labels": {"controller-revision-hash": "r2"},
                         "ownerReferences": [{"uid": "ds-uid"}], "deletionTimestamp": null},
            "spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["edge-2"]}]}]}}}},
            "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady", "message": "containers with unready status: [netd]"}],
                       "containerStatuses": [{"name": "netd", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}
        }));
        let read = NetdPod::from_object(&unbound, "ds-uid").expect("owned");
        assert_eq!(read.node.as_deref(), Some("edge-2"), "the node its affinity names");
        assert!(!read.ready && !read.terminating);
        assert_eq!(
            read.detail,
            "pod netd-b Pending, netd: CrashLoopBackOff, Ready=False: ContainersNotReady: containers with unready status: [netd]"
        );
    }

    #[test]
    fn nodes_are_offline_unless_ready_and_say_why() {
        let node = |conditions: Value, annotations: Value| {
            SlimNode::from_value(
                json!({"metadata": {"name": "edge-1", "annotations": annotations}, "status": {"conditions": conditions}}),
            )
        };
        assert_eq!(offline_reason(&node(json!([{"type": "Ready", "status": "True"}]), json!({}))), None);
        assert_eq!(
            offline_reason(&node(json!([]), json!({}))).as_deref(),
            Some("no Ready condition (no kubelet has reported)")
        );
        let cut_off = node(
            json!([{"type": "Ready", "status": "Unknown", "lastTransitionTime": "2026-12-01T10:00:00Z", "message": "Kubelet stopped posting node status."}]),
            json!({"node.beta.alibabacloud.com/autonomy": "true"}),
        );
        assert_eq!(
            offline_reason(&cut_off).as_deref(),
            Some("Ready=Unknown since 2026-12-01T10:00:00Z (Kubelet stopped posting node status.), autonomous: on (no time limit)")
        );
    }

    #[test]
    fn a_node_s_view_prefers_its_live_pod_on_the_target() {
        let nodes = vec![SlimNode::from_value(
            json!({"metadata": {"name": "edge-1"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        )];
        let netd = |uid: &str, revision: &str, terminating: bool, ready: bool| NetdPod {
            name: format!("netd-{uid}"),
            uid: uid.into(),
            node: Some("edge-1".into()),
            revision: Some(revision.into()),
            terminating,
            ready,
            detail: String::new(),
        };
        let pods = [netd("old", "r1", true, true), netd("new", "r2", false, false)];
        let view = &views(&pods, &nodes, "r2")["edge-1"];
        assert_eq!((view.version.as_deref(), view.ready), (Some("r2"), false), "a terminating pod does not count");
        let view = &views(&pods[..1], &nodes, "r2")["edge-1"];
        assert_eq!(view.version, None, "only a terminating pod: nothing runs");
    }
}
