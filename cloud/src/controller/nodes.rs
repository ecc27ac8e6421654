//! The leader's node work: cloud and edge roles, and node pod CIDRs that
//! outlive the Node object.
//!
//! **Roles** (SPEC §3b, §4; [`netd_model::roles`]). The role is read from
//! one label only, `node-restriction.kubernetes.io/netd-role`, which
//! kubelets cannot set (NodeRestriction): `cloud` makes a cloud node, and
//! every other node is an edge node. The controller publishes the role in
//! the seed's vocabulary: `alibabacloud.com/is-edge-worker=false` and the
//! taint `node-role.alibabacloud.com/addon:NoSchedule` on cloud nodes,
//! `alibabacloud.com/is-edge-worker=true` on edge nodes, overwriting what a
//! node wrote there itself (a kubelet may set that label on its own Node;
//! it grants nothing). The controller records that it added the taint
//! ([`ANNOTATION_TAINTED`]); should the node later be an edge node (the
//! trusted label removed), that taint — and only one it added — is taken
//! away.
//!
//! **Pod CIDRs** (`--allocate-node-cidrs`, with kube-controller-manager's
//! node IPAM off). kube-controller-manager forgets a node's pod CIDR when
//! the Node is deleted and hands the re-registered node the next free one,
//! so the node's pods, its routes on every peer and its lease all change —
//! and an autonomous edge node whose Node object was deleted while it was
//! cut off comes back under another subnet than the one it kept serving.
//! netd-controller assigns instead, and remembers each node's CIDR and VTEP
//! MAC in the ConfigMap `kube-system/netd-node-subnets` (one key per node,
//! [`SubnetRecord`] JSON, written before the Node is patched, so a crash
//! never gives one subnet twice):
//! - a node without a pod CIDR gets its remembered one if no other node holds
//!   it, else the first subnet neither a node nor a record holds;
//! - a re-registered node without flannel's `backend-data` gets its
//!   remembered VTEP MAC back at once (its netd publishes the same one, as
//!   the MAC derives from the node name), so peers' FDB entries stay right;
//! - a deleted node's record is kept for `reclaim_after` and then dropped —
//!   never when the node was autonomous: its subnet is its, while it serves
//!   from local state, until an operator deletes the record.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::node_watch::{NodeWatch, SlimNode};
use netd_kube::watch::WatchEvent;
use netd_kube::{call, KubeClient, KubeError};
use netd_model::autonomy::AutonomyStatus;
use netd_model::flannel;
use netd_model::roles::{NodeRole, LABEL_EDGE_WORKER, LABEL_ROLE, TAINT_ADDON_EFFECT, TAINT_ADDON_KEY};
use netd_registry::{pick_subnet, NetworkConfig, RegistryError};

/// Annotation the controller puts on a node it tainted as a cloud node.
pub const ANNOTATION_TAINTED: &str = "netd.alibabacloud.com/addon-taint-added";
/// Namespace of the subnet memory.
pub const SUBNETS_NAMESPACE: &str = "kube-system";
/// Name of the subnet memory ConfigMap.
pub const SUBNETS_CONFIG_MAP: &str = "netd-node-subnets";
/// The version of [`SubnetRecord`]'s JSON.
pub const SUBNET_RECORD_VERSION: u32 = 1;
/// Default time a deleted non-autonomous node's subnet stays reserved.
pub const DEFAULT_RECLAIM_AFTER: Duration = Duration::from_secs(3600);

/// Why the node controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodesError {
    /// The network settings.
    #[error("node pod CIDRs: {0}")]
    Network(#[from] RegistryError),
    /// The API server refused something retrying will not fix.
    #[error(transparent)]
    Kube(#[from] KubeError),
}

/// What the node controller does besides roles.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Assign pod CIDRs from this network (`None`: leave them to
    /// kube-controller-manager).
    pub allocate: Option<NetworkConfig>,
    /// How long a deleted non-autonomous node's subnet stays reserved.
    pub reclaim_after: Duration,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    /// Nodes labelled or tainted as cloud nodes.
    pub cloud_marked: AtomicU64,
    /// Nodes labelled as edge nodes (`alibabacloud.com/is-edge-worker=true`).
    pub edge_marked: AtomicU64,
    /// Taints taken back from nodes that turned out to be edge nodes.
    pub taints_removed: AtomicU64,
    /// Pod CIDRs given to nodes.
    pub cidrs_assigned: AtomicU64,
    /// Of those, a node's remembered CIDR given back.
    pub cidrs_restored: AtomicU64,
    /// VTEP MACs given back to re-registered nodes.
    pub macs_restored: AtomicU64,
    /// Records of deleted nodes dropped after the grace.
    pub records_reclaimed: AtomicU64,
    /// API writes that failed (retried later).
    pub errors: AtomicU64,
}

/// Read at scrape time (`/metrics` registers the controller's).
impl netd_metrics::Collector for NodeMetrics {
    fn encode(&self, encoder: netd_metrics::DescriptorEncoder) -> std::fmt::Result {
        let mut out = netd_metrics::Families::new(encoder);
        for (name, help, value) in [
            (
                "netd_controller_cloud_nodes_marked_total",
                "Nodes labelled or tainted as cloud nodes.",
                &self.cloud_marked,
            ),
            (
                "netd_controller_edge_nodes_marked_total",
                "Nodes labelled as edge nodes (the trusted role label absent).",
                &self.edge_marked,
            ),
            (
                "netd_controller_addon_taints_removed_total",
                "Cloud taints taken back from edge nodes.",
                &self.taints_removed,
            ),
            ("netd_controller_pod_cidrs_assigned_total", "Pod CIDRs given to nodes.", &self.cidrs_assigned),
            ("netd_controller_pod_cidrs_restored_total", "Remembered pod CIDRs given back.", &self.cidrs_restored),
            (
                "netd_controller_vtep_macs_restored_total",
                "VTEP MACs given back to re-registered nodes.",
                &self.macs_restored,
            ),
            (
                "netd_controller_subnet_records_reclaimed_total",
                "Deleted nodes' subnets released.",
                &self.records_reclaimed,
            ),
            ("netd_controller_node_errors_total", "Node writes that failed.", &self.errors),
        ] {
            out.counter(name, help, value.load(Ordering::Relaxed))?;
        }
        Ok(())
    }
}

/// A node's remembered subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubnetRecord {
    /// [`SUBNET_RECORD_VERSION`].
    pub version: u32,
    /// The node's pod CIDR.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Ipv4Net,
    /// The VTEP MAC it published, if seen.
    #[serde(rename = "vtepMAC", default)]
    pub vtep_mac: Option<String>,
    /// Whether it was autonomous when last seen.
    #[serde(default)]
    pub autonomous: bool,
    /// Unix seconds when its Node was deleted (`None`: it exists).
    #[serde(default)]
    pub deleted_at: Option<u64>,
}

/// The cloud/edge patch a node needs, if any, from its trusted role label
/// alone (a merge patch; one that changes the taints carries the node's
/// `resourceVersion`, so a concurrent change to them makes it fail and be
/// planned again).
pub fn role_patch(node: &SlimNode) -> Option<Value> {
    let (role, _) = node_role(node);
    let label = node.edge_worker_label().map(|edge| if edge { "true" } else { "false" });
    let taints: Vec<Value> = node.taints().iter().map(|t| json!(t)).collect();
    let is_addon = |t: &Value| t.get("key").and_then(Value::as_str) == Some(TAINT_ADDON_KEY);
    let has_taint = node.has_addon_taint();
    let tainted_by_us = node.tainted_by_us();
    let version = node.resource_version().map(str::to_string);
    let mut patch = json!({});
    let published = role.edge_worker_label();
    if label != Some(published) {
        patch["metadata"] = json!({ "labels": { LABEL_EDGE_WORKER: published } });
    }
    match role {
        NodeRole::Cloud if !has_taint => {
            let mut with = taints;
            with.push(json!({ "key": TAINT_ADDON_KEY, "effect": TAINT_ADDON_EFFECT }));
            patch["metadata"]["resourceVersion"] = json!(version);
            patch["metadata"]["annotations"] = json!({ ANNOTATION_TAINTED: "true" });
            patch["spec"] = json!({ "taints": with });
        }
        // Only a taint this controller added is taken back: one an operator
        // put there by hand is theirs.
        NodeRole::Edge if has_taint && tainted_by_us => {
            let kept: Vec<Value> = taints.into_iter().filter(|t| !is_addon(t)).collect();
            patch["metadata"]["resourceVersion"] = json!(version);
            patch["metadata"]["annotations"] = json!({ ANNOTATION_TAINTED: null });
            patch["spec"] = json!({ "taints": kept });
        }
        NodeRole::Cloud | NodeRole::Edge => {}
    }
    (patch != json!({})).then_some(patch)
}

/// A node's role from the trusted label, and why an odd value was read as
/// edge.
pub fn node_role(node: &SlimNode) -> (NodeRole, Option<String>) {
    NodeRole::from_label(node.role_label())
}

/// The pod CIDR memory: records by node name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubnetMemory {
    /// By node name.
    pub records: BTreeMap<String, SubnetRecord>,
}

impl SubnetMemory {
    /// Reads the ConfigMap's data; unusable entries are skipped with a log
    /// line (and kept out of the write-back only once overwritten).
    pub fn from_data(data: &BTreeMap<String, String>) -> Self {
        let mut records = BTreeMap::new();
        for (node, text) in data {
            match serde_json::from_str::<SubnetRecord>(text) {
                Ok(record) if record.version == SUBNET_RECORD_VERSION => {
                    records.insert(node.clone(), record);
                }
                Ok(record) => tracing::warn!(
                    "{SUBNETS_NAMESPACE}/{SUBNETS_CONFIG_MAP}: {node}: version {}, this netd reads {SUBNET_RECORD_VERSION}; skipped",
                    record.version
                ),
                Err(error) => tracing::warn!("{SUBNETS_NAMESPACE}/{SUBNETS_CONFIG_MAP}: {node}: {error}; skipped"),
            }
        }
        Self { records }
    }

    /// The ConfigMap data.
    pub fn to_data(&self) -> BTreeMap<String, String> {
        self.records.iter().map(|(node, r)| (node.clone(), serde_json::to_string(r).unwrap_or_default())).collect()
    }

    /// The subnet for `node`, which has none: its remembered one when no
    /// other node (`live`: pod CIDRs of existing nodes by name) or record
    /// holds it, else the first free one. Returns it and whether it was the
    /// remembered one.
    pub fn assign(
        &self,
        config: &NetworkConfig,
        node: &str,
        live: &BTreeMap<String, Ipv4Net>,
    ) -> Result<(Ipv4Net, bool), RegistryError> {
        let mut taken: BTreeSet<Ipv4Net> = live.iter().filter(|(n, _)| n.as_str() != node).map(|(_, c)| *c).collect();
        taken.extend(self.records.iter().filter(|(n, _)| n.as_str() != node).map(|(_, r)| r.pod_cidr));
        let remembered = self.records.get(node).map(|r| r.pod_cidr);
        let subnet = pick_subnet(config, &taken, remembered)?;
        Ok((subnet, Some(subnet) == remembered))
    }

    /// Records of nodes deleted longer than `grace` ago and not autonomous.
    pub fn reclaimable(&self, now: u64, grace: Duration) -> Vec<String> {
        self.records
            .iter()
            .filter(|(_, r)| !r.autonomous && r.deleted_at.is_some_and(|at| now.saturating_sub(at) >= grace.as_secs()))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// The node controller: runs until an error retrying cannot fix; the
/// caller aborts it when leadership is lost (every write is idempotent).
pub async fn run(client: KubeClient, options: NodeOptions, metrics: Arc<NodeMetrics>) -> Result<(), NodesError> {
    let nodes = NodeWatch::new(&client);
    run_on(client, nodes, options, metrics).await
}

/// [`run`] on a shared Node list+watch (the controller's one).
pub async fn run_on(
    client: KubeClient,
    nodes: NodeWatch,
    options: NodeOptions,
    metrics: Arc<NodeMetrics>,
) -> Result<(), NodesError> {
    let mut controller = NodeController::new(client, options, metrics);
    if controller.options.allocate.is_some() {
        controller.load_memory().await?;
    }
    let mut watch = nodes.subscribe();
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            event = watch.next() => controller.handle(event).await,
            _ = sweep.tick() => controller.sweep().await,
        }
    }
}

struct NodeController {
    nodes: Api<Node>,
    config_maps: Api<ConfigMap>,
    options: NodeOptions,
    metrics: Arc<NodeMetrics>,
    memory: SubnetMemory,
    /// The memory ConfigMap's resourceVersion (`None`: not created yet).
    memory_version: Option<String>,
    /// Pod CIDRs of existing nodes.
    live: BTreeMap<String, Ipv4Net>,
    /// Records changed but not yet written: only records of what nodes
    /// already hold wait (a whole list's worth goes in one write); a
    /// reservation is written before the node is patched.
    dirty: bool,
}

impl NodeController {
    fn new(client: KubeClient, options: NodeOptions, metrics: Arc<NodeMetrics>) -> Self {
        let nodes = Api::all(client.client());
        let config_maps = Api::namespaced(client.client(), SUBNETS_NAMESPACE);
        Self {
            nodes,
            config_maps,
            options,
            metrics,
            memory: SubnetMemory::default(),
            memory_version: None,
            live: BTreeMap::new(),
            dirty: false,
        }
    }

    async fn load_memory(&mut self) -> Result<(), KubeError> {
        let what = format!("reading {SUBNETS_NAMESPACE}/{SUBNETS_CONFIG_MAP}");
        let mut backoff = netd_kube::watch::Backoff::default();
        loop {
            match call(&what, self.config_maps.get(SUBNETS_CONFIG_MAP)).await {
                Ok(cm) => {
                    self.memory = SubnetMemory::from_data(&cm.data.unwrap_or_default());
                    self.memory_version = cm.metadata.resource_version;
                    return Ok(());
                }
                Err(KubeError::NotFound { .. }) => {
                    self.memory = SubnetMemory::default();
                    self.memory_version = None;
                    return Ok(());
                }
                Err(error) if error.is_transient() => {
                    tracing::warn!("{error}; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Writes the memory back (create or update with its resourceVersion);
    /// on a conflict the memory is re-read and the caller plans again.
    async fn store_memory(&mut self) -> Result<(), KubeError> {
        let what = format!("writing {SUBNETS_NAMESPACE}/{SUBNETS_CONFIG_MAP}");
        let mut cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(SUBNETS_CONFIG_MAP.into()),
                namespace: Some(SUBNETS_NAMESPACE.into()),
                resource_version: self.memory_version.clone(),
                ..Default::default()
            },
            data: Some(self.memory.to_data()),
            ..Default::default()
        };
        let result = match &self.memory_version {
            None => call(&what, self.config_maps.create(&PostParams::default(), &cm)).await,
            Some(_) => call(&what, self.config_maps.replace(SUBNETS_CONFIG_MAP, &PostParams::default(), &cm)).await,
        };
        match result {
            Ok(stored) => {
                self.memory_version = stored.metadata.resource_version;
                Ok(())
            }
            Err(error) => {
                cm.data = None;
                if let Err(reload) = self.load_memory().await {
                    tracing::warn!("{reload}");
                }
                Err(error)
            }
        }
    }

    async fn handle(&mut self, event: WatchEvent<Arc<SlimNode>>) {
        self.apply(event).await;
        if self.dirty {
            match self.store_memory().await {
                Ok(()) => self.dirty = false,
                Err(error) => self.failed(&error),
            }
        }
    }

    async fn apply(&mut self, event: WatchEvent<Arc<SlimNode>>) {
        match event {
            WatchEvent::Listed(nodes) => {
                self.live = nodes.iter().filter_map(|n| Some((n.name()?.to_string(), n.pod_cidr()?))).collect();
                let names: BTreeSet<String> = nodes.iter().filter_map(|n| n.name().map(str::to_string)).collect();
                let gone: Vec<String> = self
                    .memory
                    .records
                    .iter()
                    .filter(|(n, r)| r.deleted_at.is_none() && !names.contains(*n))
                    .map(|(n, _)| n.clone())
                    .collect();
                for node in gone {
                    self.forget(&node, None).await;
                }
                for node in &nodes {
                    self.reconcile(node).await;
                }
            }
            WatchEvent::Applied(node) => self.reconcile(&node).await,
            WatchEvent::Deleted(node) => {
                if let Some(name) = node.name() {
                    self.live.remove(name);
                    let autonomous = AutonomyStatus::from_annotations(|k| node.autonomy_annotation(k)).autonomy.is_on();
                    self.forget(name, Some(autonomous)).await;
                }
            }
        }
    }

    fn failed(&self, error: &KubeError) {
        self.metrics.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("node controller: {error}");
    }

    async fn reconcile(&mut self, node: &SlimNode) {
        let Some(name) = node.name().map(str::to_string) else { return };
        if let Some(patch) = role_patch(node) {
            let (role, odd) = node_role(node);
            if let Some(why) = odd {
                tracing::warn!(node = %name, "{why}");
            }
            let removing = patch["metadata"]["annotations"].get(ANNOTATION_TAINTED).is_some_and(Value::is_null);
            let claimed_cloud = node.edge_worker_label() == Some(false);
            match self.patch_node(&name, patch).await {
                Ok(()) => {
                    if removing {
                        self.metrics.taints_removed.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(node = %name, "edge node: took back the cloud taint netd-controller had added");
                    }
                    match role {
                        NodeRole::Cloud => {
                            self.metrics.cloud_marked.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(node = %name, "cloud node ({LABEL_ROLE}=cloud): labelled {LABEL_EDGE_WORKER}=false, tainted {TAINT_ADDON_KEY}:{TAINT_ADDON_EFFECT}");
                        }
                        NodeRole::Edge => {
                            self.metrics.edge_marked.fetch_add(1, Ordering::Relaxed);
                            // Loud: either a node claimed the cloud role for
                            // itself, or an operator has not labelled a real
                            // cloud node yet (the book's "Who is trusted for what", docs/src/concepts/trust.md).
                            if claimed_cloud {
                                tracing::warn!(node = %name, "labelled {LABEL_EDGE_WORKER}=false without {LABEL_ROLE}=cloud: an edge node, relabelled {LABEL_EDGE_WORKER}=true (if it is a cloud node, an operator labels it {LABEL_ROLE}=cloud)");
                            } else {
                                tracing::info!(node = %name, "edge node: labelled {LABEL_EDGE_WORKER}=true");
                            }
                        }
                    }
                }
                // A conflict: the node changed; its next event plans again.
                Err(error) => self.failed(&error),
            }
        }
        let Some(config) = self.options.allocate else { return };
        let autonomous = AutonomyStatus::from_annotations(|k| node.autonomy_annotation(k)).autonomy.is_on();
        let mac = node.vtep_mac().map(|mac| mac.to_string());
        match node.pod_cidr() {
            Some(cidr) => {
                self.live.insert(name.clone(), cidr);
                let record = SubnetRecord {
                    version: SUBNET_RECORD_VERSION,
                    pod_cidr: cidr,
                    vtep_mac: mac.clone().or_else(|| self.memory.records.get(&name).and_then(|r| r.vtep_mac.clone())),
                    autonomous,
                    deleted_at: None,
                };
                if self.memory.records.get(&name) != Some(&record) {
                    self.memory.records.insert(name.clone(), record);
                    self.dirty = true;
                }
                if mac.is_none() {
                    self.restore_mac(&name, config.vni).await;
                }
            }
            // An event from before our own patch landed: it is assigned.
            None if self.live.contains_key(&name) => {}
            None => self.assign(&name, &config, autonomous).await,
        }
    }

    async fn assign(&mut self, name: &str, config: &NetworkConfig, autonomous: bool) {
        let (cidr, restored) = match self.memory.assign(config, name, &self.live) {
            Ok(found) => found,
            Err(error) => {
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(node = %name, "no pod CIDR to give: {error}");
                return;
            }
        };
        let previous = self.memory.records.get(name).cloned();
        let record = SubnetRecord {
            version: SUBNET_RECORD_VERSION,
            pod_cidr: cidr,
            vtep_mac: previous.as_ref().and_then(|r| r.vtep_mac.clone()),
            autonomous,
            deleted_at: None,
        };
        self.memory.records.insert(name.to_string(), record);
        // Reserved first: a crash after this never hands the subnet to another node.
        if let Err(error) = self.store_memory().await {
            return self.failed(&error);
        }
        let cidr_text = cidr.to_string();
        let patch = json!({ "spec": { "podCIDR": cidr_text, "podCIDRs": [cidr_text] } });
        match self.patch_node(name, patch).await {
            Ok(()) => {
                self.live.insert(name.to_string(), cidr);
                self.metrics.cidrs_assigned.fetch_add(1, Ordering::Relaxed);
                if restored {
                    self.metrics.cidrs_restored.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(node = %name, %cidr, restored, "pod CIDR assigned");
            }
            Err(error) => self.failed(&error),
        }
        self.restore_mac(name, config.vni).await;
    }

    /// Puts the remembered VTEP MAC back on a node that has none published.
    async fn restore_mac(&mut self, name: &str, vni: u32) {
        let Some(mac) = self.memory.records.get(name).and_then(|r| r.vtep_mac.clone()) else { return };
        let Ok(parsed) = mac.parse() else { return };
        let patch = json!({ "metadata": { "annotations": {
            flannel::ANNOTATION_BACKEND_TYPE: "vxlan",
            flannel::ANNOTATION_BACKEND_DATA: flannel::backend_data(vni, parsed),
        } } });
        match self.patch_node(name, patch).await {
            Ok(()) => {
                self.metrics.macs_restored.fetch_add(1, Ordering::Relaxed);
                tracing::info!(node = %name, %mac, "VTEP MAC given back to the re-registered node");
            }
            Err(error) => self.failed(&error),
        }
    }

    /// A node is gone: its record stays, marked deleted.
    async fn forget(&mut self, name: &str, autonomous: Option<bool>) {
        let Some(record) = self.memory.records.get_mut(name) else { return };
        if record.deleted_at.is_some() {
            return;
        }
        record.deleted_at = Some(netd_model::unix_now());
        if let Some(autonomous) = autonomous {
            record.autonomous = autonomous;
        }
        tracing::info!(node = %name, cidr = %record.pod_cidr, autonomous = record.autonomous, "node deleted: its pod CIDR stays reserved");
        self.dirty = true;
    }

    async fn sweep(&mut self) {
        if self.options.allocate.is_none() {
            return;
        }
        let reclaim = self.memory.reclaimable(netd_model::unix_now(), self.options.reclaim_after);
        if reclaim.is_empty() {
            return;
        }
        for node in &reclaim {
            if let Some(record) = self.memory.records.remove(node) {
                tracing::info!(node = %node, cidr = %record.pod_cidr, "deleted node's pod CIDR released after the grace");
            }
        }
        match self.store_memory().await {
            Ok(()) => {
                self.dirty = false;
                self.metrics.records_reclaimed.fetch_add(reclaim.len() as u64, Ordering::Relaxed);
            }
            Err(error) => self.failed(&error),
        }
    }

    async fn patch_node(&self, name: &str, patch: Value) -> Result<(), KubeError> {
        let what = format!("patching node {name}");
        call(&what, self.nodes.patch(name, &PatchParams::default(), &Patch::Merge(&patch))).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn node(value: Value) -> SlimNode {
        SlimNode::from_value(value)
    }

    #[test]
    fn cloud_nodes_are_labelled_and_tainted_once_and_edge_nodes_lose_only_our_taint() {
        let cloud = json!({ LABEL_ROLE: "cloud" });
        let bare = node(json!({"metadata":{"name":"c1","resourceVersion":"7","labels":cloud},"spec":{}}));
        let patch = role_patch(&bare).unwrap();
        assert_eq!(patch["metadata"]["labels"][LABEL_EDGE_WORKER], "false");
        assert_eq!(patch["metadata"]["resourceVersion"], "7");
        assert_eq!(patch["spec"]["taints"], json!([{"key": TAINT_ADDON_KEY, "effect": "NoSchedule"}]));
        assert_eq!(patch["metadata"]["annotations"][ANNOTATION_TAINTED], "true");
        // Other taints are kept.
        let other =
            node(json!({"metadata":{"name":"c1","labels":cloud},"spec":{"taints":[{"key":"x","effect":"NoExecute"}]}}));
        assert_eq!(role_patch(&other).unwrap()["spec"]["taints"].as_array().unwrap().len(), 2);
        // Done: nothing more.
        let done = node(json!({"metadata":{"name":"c1","labels":{LABEL_ROLE:"cloud",LABEL_EDGE_WORKER:"false"}},
            "spec":{"taints":[{"key":TAINT_ADDON_KEY,"effect":"NoSchedule"}]}}));
        assert_eq!(role_patch(&done), None);
        // Tainted by hand, output label missing: only the label is added.
        let by_hand = node(json!({"metadata":{"name":"c1","labels":cloud},
            "spec":{"taints":[{"key":TAINT_ADDON_KEY,"effect":"NoSchedule"}]}}));
        assert_eq!(role_patch(&by_hand).unwrap(), json!({"metadata":{"labels":{LABEL_EDGE_WORKER:"false"}}}));

        // Edge nodes: labelled true, never tainted.
        let edge = node(json!({"metadata":{"name":"e1","labels":{LABEL_EDGE_WORKER:"true"}},"spec":{}}));
        assert_eq!(role_patch(&edge), None);
        let unlabelled = node(json!({"metadata":{"name":"n1"},"spec":{}}));
        assert_eq!(role_patch(&unlabelled).unwrap(), json!({"metadata":{"labels":{LABEL_EDGE_WORKER:"true"}}}));
        let hand_tainted_edge = node(json!({"metadata":{"name":"e1","labels":{LABEL_EDGE_WORKER:"true"}},
            "spec":{"taints":[{"key":TAINT_ADDON_KEY,"effect":"NoSchedule"}]}}));
        assert_eq!(role_patch(&hand_tainted_edge), None, "a taint someone else put there stays");
        let ours = node(json!({"metadata":{"name":"e1","labels":{LABEL_EDGE_WORKER:"true"},
            "annotations":{ANNOTATION_TAINTED:"true"}},
            "spec":{"taints":[{"key":TAINT_ADDON_KEY,"effect":"NoSchedule"},{"key":"x","effect":"NoExecute"}]}}));
        let patch = role_patch(&ours).unwrap();
        assert_eq!(patch["spec"]["taints"], json!([{"key":"x","effect":"NoExecute"}]));
        assert_eq!(patch["metadata"]["annotations"][ANNOTATION_TAINTED], Value::Null);
        assert!(patch["metadata"].get("labels").is_none(), "the label was right already");
    }

    #[test]
    fn the_seed_label_a_node_may_write_itself_grants_nothing() {
        // What a kubelet may write on its own Node (NodeRestriction allows
        // it): the old role label, even with a taint to look the part.
        let claims = node(json!({"metadata":{"name":"e1","resourceVersion":"3","labels":{LABEL_EDGE_WORKER:"false"}},
            "spec":{"taints":[{"key":TAINT_ADDON_KEY,"effect":"NoSchedule"}]}}));
        assert_eq!(node_role(&claims).0, NodeRole::Edge);
        assert_eq!(role_patch(&claims).unwrap(), json!({"metadata":{"labels":{LABEL_EDGE_WORKER:"true"}}}));
        // The trusted label, which only an operator can set, is what counts;
        // an odd value is edge, with a reason to log.
        let operator = node(json!({"metadata":{"name":"c1","labels":{LABEL_ROLE:"cloud",LABEL_EDGE_WORKER:"true"}}}));
        assert_eq!(node_role(&operator).0, NodeRole::Cloud);
        assert_eq!(role_patch(&operator).unwrap()["metadata"]["labels"][LABEL_EDGE_WORKER], "false");
        let odd = node(json!({"metadata":{"name":"o1","labels":{LABEL_ROLE:"yes"}}}));
        let (role, why) = node_role(&odd);
        assert_eq!(role, NodeRole::Edge);
        assert!(why.unwrap().contains("counted as an edge node"));
    }

    #[test]
    fn the_view_keeps_the_labels_read_here() {
        use super::super::node_watch::{EDGE_WORKER_POINTER, READ};
        use netd_model::roles::LABEL_ROLE_POINTER;
        assert!(READ.contains(&LABEL_ROLE_POINTER));
        assert!(READ.contains(&EDGE_WORKER_POINTER));
        assert_eq!(EDGE_WORKER_POINTER, format!("/metadata/labels/{}", LABEL_EDGE_WORKER.replace('/', "~1")));
        for key in [ANNOTATION_TAINTED, flannel::ANNOTATION_BACKEND_DATA] {
            let pointer = format!("/metadata/annotations/{}", key.replace('/', "~1"));
            assert!(READ.contains(&pointer.as_str()), "{key}");
        }
        // What is read, read into the typed node.
        let read = node(json!({"metadata":{"name":"n","labels":{LABEL_ROLE:"cloud",LABEL_EDGE_WORKER:"true"},
            "annotations":{ANNOTATION_TAINTED:"true"}},"spec":{"podCIDR":"10.244.3.0/24"}}));
        assert_eq!(
            (node_role(&read).0, read.edge_worker_label(), read.tainted_by_us()),
            (NodeRole::Cloud, Some(true), true)
        );
        assert_eq!(read.pod_cidr(), Some("10.244.3.0/24".parse().unwrap()));
    }

    #[test]
    fn a_node_gets_its_remembered_subnet_unless_another_holds_it_and_records_round_trip() {
        let config = NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 };
        let record = |cidr: &str| SubnetRecord {
            version: 1,
            pod_cidr: cidr.parse().unwrap(),
            vtep_mac: Some("0e:00:00:00:00:01".into()),
            autonomous: false,
            deleted_at: Some(100),
        };
        let mut memory = SubnetMemory::default();
        memory.records.insert("edge-a".into(), record("10.244.7.0/24"));
        memory.records.insert("edge-b".into(), record("10.244.1.0/24"));
        let live: BTreeMap<String, Ipv4Net> = [("cloud".to_string(), "10.244.2.0/24".parse().unwrap())].into();
        assert_eq!(memory.assign(&config, "edge-a", &live).unwrap(), ("10.244.7.0/24".parse().unwrap(), true));
        // A new node gets neither a live node's nor a remembered subnet.
        assert_eq!(memory.assign(&config, "new", &live).unwrap(), ("10.244.3.0/24".parse().unwrap(), false));
        // Someone else holds edge-a's subnet now: it gets a free one.
        let taken: BTreeMap<String, Ipv4Net> = [("other".to_string(), "10.244.7.0/24".parse().unwrap())].into();
        assert!(!memory.assign(&config, "edge-a", &taken).unwrap().1);

        let data = memory.to_data();
        assert_eq!(
            data["edge-a"],
            r#"{"version":1,"podCIDR":"10.244.7.0/24","vtepMAC":"0e:00:00:00:00:01","autonomous":false,"deletedAt":100}"#
        );
        assert_eq!(SubnetMemory::from_data(&data), memory);
        let mut bad = data.clone();
        bad.insert("junk".into(), "{".into());
        bad.insert("future".into(), r#"{"version":9,"podCIDR":"10.244.9.0/24"}"#.into());
        assert_eq!(SubnetMemory::from_data(&bad), memory, "unusable entries are skipped");

        // Reclaim: deleted and past the grace, never autonomous.
        memory.records.get_mut("edge-b").unwrap().autonomous = true;
        assert_eq!(memory.reclaimable(100 + 3600, Duration::from_secs(3600)), ["edge-a"]);
        assert!(memory.reclaimable(100 + 3599, Duration::from_secs(3600)).is_empty());
    }
}
