//! The tunnel DNAT configuration of one cloud node, from the cluster
//! (SPEC §3, §4; issue 15): which addresses are edge nodes, which subnets
//! are edge pods, and which ports go to which tunnel-server door.
//!
//! [`run`] reads and list-watches
//! - the Nodes (from the controller's one shared Node list+watch,
//!   [`super::node_watch`]; its own when run alone), reading only the trusted role label
//!   (`node-restriction.kubernetes.io/netd-role`, [`netd_model::roles`]),
//!   the addresses and the pod CIDRs (typed, in the store's [`SlimNode`]s), and
//! - ConfigMap `kube-system/edge-tunnel-server-cfg` (field selector
//!   `metadata.name=…` in that one namespace),
//!
//! and folds each watch event into the desired edge set and port rules,
//! writing only the difference to the pinned BPF maps: a node event costs
//! the map writes of that node's addresses and subnets that changed
//! membership, whatever the cluster's size; a ConfigMap event, the rules
//! that changed. The next `connect()` after the write sees it: there is no
//! resync period (yurt-tunnel rewrites its iptables chains every 15–60 s).
//!
//! # What is redirected
//!
//! - **Edge node addresses**: the IPv4 `status.addresses` of the types in
//!   [`TunnelConfigOptions::address_types`] (default `InternalIP`) of every
//!   edge node: every node not labelled
//!   `node-restriction.kubernetes.io/netd-role=cloud`, a label kubelets
//!   cannot set (the seed's `alibabacloud.com/is-edge-worker`, which they
//!   can, is not read). kube-apiserver
//!   dials the first address of its `--kubelet-preferred-address-types`,
//!   which in edge clusters is `InternalIP` (it is what the kubelet reports
//!   as its node IP, what the tunnel agent's certificate names and so what
//!   the tunnel server routes by; yurt-tunnel redirects the same). A
//!   cluster whose kube-apiserver prefers another type sets the same list
//!   here.
//! - **Edge pod subnets**: `spec.podCIDRs` (and `spec.podCIDR`) of edge
//!   nodes, IPv4 only (the DNAT is IPv4; IPv6 entries are skipped).
//! - **Never**: an address that any cloud node also has (a shared or moved
//!   address stays with the cloud, and an edge node that reports a cloud
//!   node's address does not pull it into the tunnel), loopback,
//!   unspecified, multicast and broadcast addresses, and a pod CIDR of
//!   prefix length 0 or one that covers loopback (it would redirect
//!   everything). A role label value other than `cloud`/`edge` counts as
//!   edge, with a warning: edge is the role that grants nothing (its
//!   traffic goes through the tunnel, to the agent whose certificate names
//!   the address).
//!
//! # Port rules
//!
//! [`config::from_tunnel_config`] of the ConfigMap's data: the kubelet
//! rules (10250→10263, 10255→10264) plus the extras of `dnat-ports-pair`,
//! `http-proxy-ports`, `https-proxy-ports`. A ConfigMap that does not parse
//! is **refused**: the rules in force stay, the reason is logged and posted
//! as a `Warning` Event `InvalidTunnelConfig` on the ConfigMap (once per
//! distinct reason, not on every relist; a fixed ConfigMap then gets a
//! `Normal` `TunnelConfigApplied`). A deleted or absent ConfigMap means the
//! kubelet rules only: it is optional in ACK@Edge and OpenYurt alike, and
//! deleting it is how an operator drops the extras. A refused ConfigMap at
//! start keeps the rules pinned by the previous run, or sets the kubelet
//! rules when none are pinned.
//!
//! # Where it runs
//!
//! On every controller replica, on every cloud node, leader or not: the
//! DNAT is node-local, each replica drives its own node's maps. It writes
//! nothing to the cluster but Events. RBAC: `nodes` list/watch
//! (cluster-wide); `configmaps` list/watch in `kube-system`; `events`
//! create in `kube-system`. While it runs, the DNAT's own counters
//! (`netd_dnat_*`) are in its [`TunnelConfigMetrics`]
//! ([`TunnelConfigMetrics::render_dnat`]), which netd-controller's
//! `/metrics` serves: the node binary links no BPF loader.
//!
//! # The tunnel server's routing
//!
//! Needs no driver: `netd tunnel-server` routes each connection by its
//! original destination to the agent whose certificate names that address,
//! or whose node's registry lease holds it (`tunnel::run::follow_leases`
//! keeps the leases current), so it follows nodes by itself. Extra ports
//! must also be allowed by the edge agents (`--extra-ports`).
//!
//! [`config::from_tunnel_config`]: crate::dnat::config::from_tunnel_config

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Event;
use netd_ebpf::dnat::{Changes, DnatError, TunnelDnat, MAX_PORT_RULES};
use serde_json::Value;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::node_watch::{Address, LabelValue, NodeWatch, PodCidr, SlimNode};
use crate::dnat::config::{self, PortRules, CONFIG_MAP_NAME, CONFIG_MAP_NAMESPACE};
use netd_kube::events::{self, Regarding, Reporter};
use netd_kube::object::{ConfigMapData, Object};
use netd_kube::watch::{Backoff, ListWatch, WatchEvent};
use netd_kube::KubeClient;
use netd_model::roles::NodeRole;

/// `reason` of the Warning Event posted on a refused ConfigMap.
pub const REASON_REFUSED: &str = "InvalidTunnelConfig";
/// `reason` of the Normal Event posted when a ConfigMap is applied after a
/// refused one.
pub const REASON_APPLIED: &str = "TunnelConfigApplied";
/// The Events' `source.component` and `reportingComponent`.
pub const COMPONENT: &str = "netd-controller";

/// Errors of the tunnel configuration driver: only at its start; once
/// running it retries whatever fails.
#[derive(Debug, thiserror::Error)]
pub enum TunnelConfigError {
    /// The DNAT's maps could not be read.
    #[error("reading the tunnel DNAT's maps")]
    Dnat(#[from] DnatError),
    /// The DNAT has no target: nothing would be redirected whatever the
    /// configuration.
    #[error(
        "the tunnel DNAT under {pin_dir} has no target (run `netd dnat apply --target …` or set it \
         before starting the configuration driver)"
    )]
    NoTarget {
        /// The pin directory.
        pin_dir: std::path::PathBuf,
    },
    /// No address type to redirect.
    #[error("no node address type to redirect: give at least one (InternalIP, ExternalIP, …)")]
    NoAddressTypes,
}

/// How [`run`] reads the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelConfigOptions {
    /// This node's name: the Events' `source.host` and `reportingInstance`,
    /// so an operator sees which cloud node refused what.
    pub node_name: String,
    /// `status.addresses[].type`s of edge nodes that are redirected; the
    /// same list as kube-apiserver's `--kubelet-preferred-address-types`
    /// (IP types only). Default `["InternalIP"]`.
    pub address_types: Vec<String>,
}

impl TunnelConfigOptions {
    /// The defaults for node `node_name`.
    pub fn new(node_name: impl Into<String>) -> Self {
        Self { node_name: node_name.into(), address_types: vec!["InternalIP".to_string()] }
    }
}

/// Counters of [`run`], rendered by [`TunnelConfigMetrics::render_prometheus`].
#[derive(Debug, Default)]
pub struct TunnelConfigMetrics {
    /// Node watch events folded (complete lists included).
    pub node_events: AtomicU64,
    /// ConfigMap watch events folded.
    pub config_map_events: AtomicU64,
    /// Complete lists folded (start, and after every watch error).
    pub resyncs: AtomicU64,
    /// Edge node addresses redirected now.
    pub edge_nodes: AtomicU64,
    /// Edge pod subnets redirected now.
    pub edge_subnets: AtomicU64,
    /// Port rules in force now.
    pub port_rules: AtomicU64,
    /// 1 while the ConfigMap as it is now is in force, 0 while it is refused.
    pub config_valid: AtomicU64,
    /// ConfigMap versions refused.
    pub config_refused: AtomicU64,
    /// BPF map entries added, changed or removed.
    pub map_writes: AtomicU64,
    /// Map write batches that failed (retried with backoff).
    pub map_errors: AtomicU64,
    /// Events posted.
    pub events_posted: AtomicU64,
    /// Events the API server did not take.
    pub event_errors: AtomicU64,
    /// The DNAT [`run`] drives, while it runs: its own counters
    /// (`netd_dnat_*`) are read from its maps for `/metrics`.
    dnat: Mutex<Option<Arc<Mutex<TunnelDnat>>>>,
}

/// Shows a driven DNAT's counters in its metrics until dropped.
struct ShownIn(Arc<TunnelConfigMetrics>);

impl ShownIn {
    fn new(metrics: &Arc<TunnelConfigMetrics>, dnat: &Arc<Mutex<TunnelDnat>>) -> Self {
        *metrics.dnat.lock().unwrap_or_else(PoisonError::into_inner) = Some(dnat.clone());
        Self(metrics.clone())
    }
}

impl Drop for ShownIn {
    fn drop(&mut self) {
        *self.0.dnat.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl TunnelConfigMetrics {
    /// The counters in Prometheus' text format (without the DNAT's own,
    /// [`Self::render_dnat`]).
    pub fn render_prometheus(self: &Arc<Self>) -> String {
        netd_metrics::render(self.clone())
    }

    /// The driven DNAT's own counters (`netd_dnat_*`,
    /// [`netd_ebpf::dnat::DnatStats::render_prometheus`]), read from its
    /// maps now; empty while no DNAT is driven. It makes bpf(2) calls (a
    /// lookup per rule, one per pending handshake) and waits for a map
    /// write in progress (a complete list of a large cluster): call it off
    /// the async runtime's threads, as [`Self::render_dnat`] does.
    pub fn render_dnat_blocking(&self) -> String {
        let Some(dnat) = self.dnat.lock().unwrap_or_else(PoisonError::into_inner).clone() else {
            return String::new();
        };
        let stats = dnat.lock().unwrap_or_else(PoisonError::into_inner).stats();
        match stats {
            Ok(stats) => stats.render_prometheus(),
            Err(error) => {
                let error = netd_kube::error_chain(&error);
                tracing::warn!("tunnel config: the DNAT's counters for /metrics: {error}");
                format!("# netd_dnat_* unavailable: {}\n", error.replace('\n', " "))
            }
        }
    }

    /// [`Self::render_dnat_blocking`] on Tokio's blocking pool.
    pub async fn render_dnat(self: Arc<Self>) -> String {
        match tokio::task::spawn_blocking(move || self.render_dnat_blocking()).await {
            Ok(text) => text,
            Err(join) => format!("# netd_dnat_* unavailable: {}\n", join.to_string().replace('\n', " ")),
        }
    }

    fn add(counter: &AtomicU64, changes: Changes) {
        counter.fetch_add((changes.added + changes.updated + changes.removed) as u64, Ordering::Relaxed);
    }
}

/// The counters, read at scrape time (`/metrics` registers the
/// controller's); the DNAT's own are [`TunnelConfigMetrics::render_dnat`]'s.
impl netd_metrics::Collector for TunnelConfigMetrics {
    fn encode(&self, encoder: netd_metrics::DescriptorEncoder) -> std::fmt::Result {
        let mut out = netd_metrics::Families::new(encoder);
        let get = |value: &AtomicU64| value.load(Ordering::Relaxed);
        out.counter("netd_tunnel_config_node_events_total", "Node watch events folded.", get(&self.node_events))?;
        out.counter(
            "netd_tunnel_config_configmap_events_total",
            "edge-tunnel-server-cfg watch events folded.",
            get(&self.config_map_events),
        )?;
        out.counter("netd_tunnel_config_resyncs_total", "Complete lists folded.", get(&self.resyncs))?;
        out.gauge("netd_tunnel_config_edge_nodes", "Edge node addresses redirected.", get(&self.edge_nodes))?;
        out.gauge("netd_tunnel_config_edge_subnets", "Edge pod subnets redirected.", get(&self.edge_subnets))?;
        out.gauge("netd_tunnel_config_port_rules", "Port rules in force.", get(&self.port_rules))?;
        out.gauge(
            "netd_tunnel_config_valid",
            "1 while the ConfigMap is in force, 0 while it is refused and older rules stay.",
            get(&self.config_valid),
        )?;
        out.counter("netd_tunnel_config_refused_total", "ConfigMap versions refused.", get(&self.config_refused))?;
        out.counter(
            "netd_tunnel_config_map_writes_total",
            "BPF map entries added, changed or removed.",
            get(&self.map_writes),
        )?;
        out.counter(
            "netd_tunnel_config_map_errors_total",
            "BPF map write batches that failed and were retried.",
            get(&self.map_errors),
        )?;
        out.counter("netd_tunnel_config_events_posted_total", "Kubernetes Events posted.", get(&self.events_posted))?;
        out.counter(
            "netd_tunnel_config_event_errors_total",
            "Kubernetes Events the API server did not take.",
            get(&self.event_errors),
        )
    }
}

/// What one node contributes, as read from its object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NodeFacts {
    /// Not labelled `node-restriction.kubernetes.io/netd-role=cloud`.
    edge: bool,
    /// Its addresses of the redirected types, redirectable ones only, each once.
    addresses: Vec<Ipv4Addr>,
    /// Its pod subnets (edge nodes only), each once.
    subnets: Vec<Ipv4Net>,
    /// What was unusable in the object; logged when it changes.
    problems: Vec<String>,
}

/// Whether an address may ever be redirected.
fn redirectable(addr: Ipv4Addr) -> bool {
    !(addr.is_loopback() || addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast())
}

/// The facts of a node object; `None` for one without a usable name.
fn node_facts(node: &SlimNode, address_types: &[String]) -> Option<(String, NodeFacts)> {
    let name = node.name()?.to_string();
    let mut facts = NodeFacts::default();
    // Not a string: not "cloud" either.
    let label = node.role_label_value().map(|value| match value {
        LabelValue::Text(text) | LabelValue::NotText(text) => &**text,
    });
    let (role, odd) = NodeRole::from_label(label);
    facts.edge = role == NodeRole::Edge;
    facts.problems.extend(odd);
    for entry in node.addresses() {
        if !address_types.iter().any(|t| t == entry.kind.as_str()) {
            continue;
        }
        match &entry.address {
            Address::Ip(std::net::IpAddr::V4(addr)) if redirectable(*addr) => {
                if !facts.addresses.contains(addr) {
                    facts.addresses.push(*addr);
                }
            }
            Address::Ip(std::net::IpAddr::V4(addr)) => {
                facts.problems.push(format!("address {addr} is never redirected (loopback, multicast, …)"));
            }
            // The DNAT is IPv4: a dual-stack node's IPv6 address is not its concern.
            Address::Ip(std::net::IpAddr::V6(_)) => {}
            Address::NotIp(entry) => facts.problems.push(format!("address {entry} is not an IP address")),
        }
    }
    if facts.edge {
        // podCIDR is podCIDRs' first entry: each value is there once.
        for cidr in node.pod_cidrs() {
            match cidr {
                PodCidr::Net(ipnet::IpNet::V4(net)) => {
                    let net = net.trunc();
                    if net.prefix_len() == 0 || net.contains(&Ipv4Addr::LOCALHOST) {
                        facts.problems.push(format!("pod CIDR {net} would redirect loopback or everything: ignored"));
                    } else if !facts.subnets.contains(&net) {
                        facts.subnets.push(net);
                    }
                }
                PodCidr::Net(ipnet::IpNet::V6(_)) => {}
                PodCidr::NotCidr(value) => facts.problems.push(format!("pod CIDR {value} is not a CIDR: ignored")),
            }
        }
    }
    Some((name, facts))
}

/// What to write to the maps for one change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Delta {
    add_nodes: Vec<Ipv4Addr>,
    remove_nodes: Vec<Ipv4Addr>,
    add_subnets: Vec<Ipv4Net>,
    remove_subnets: Vec<Ipv4Net>,
}

impl Delta {
    fn is_empty(&self) -> bool {
        self.add_nodes.is_empty()
            && self.remove_nodes.is_empty()
            && self.add_subnets.is_empty()
            && self.remove_subnets.is_empty()
    }
}

/// The desired edge set, kept as reference counts so that one node's
/// change is decided by looking at that node's entries only.
#[derive(Debug, Default)]
struct EdgeSet {
    nodes: HashMap<String, NodeFacts>,
    /// Address → how many edge nodes have it.
    edge_addresses: HashMap<Ipv4Addr, u32>,
    /// Address → how many other nodes have it; any makes it not redirected.
    other_addresses: HashMap<Ipv4Addr, u32>,
    /// Subnet → how many edge nodes have it.
    subnets: HashMap<Ipv4Net, u32>,
}

fn bump<K: std::hash::Hash + Eq + Copy>(counts: &mut HashMap<K, u32>, key: K, up: bool) {
    if up {
        *counts.entry(key).or_insert(0) += 1;
    } else if let Some(count) = counts.get_mut(&key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(&key);
        }
    }
}

impl EdgeSet {
    fn redirected(&self, addr: Ipv4Addr) -> bool {
        self.edge_addresses.contains_key(&addr) && !self.other_addresses.contains_key(&addr)
    }

    /// Adds (`up`) or takes away one node's counts.
    fn count(&mut self, facts: &NodeFacts, up: bool) {
        let addresses = if facts.edge { &mut self.edge_addresses } else { &mut self.other_addresses };
        for &addr in &facts.addresses {
            bump(addresses, addr, up);
        }
        for &net in &facts.subnets {
            bump(&mut self.subnets, net, up);
        }
    }

    /// Node `name` is now `facts` (`None`: gone); what changes in the maps.
    fn update(&mut self, name: &str, facts: Option<NodeFacts>) -> Delta {
        let old = match &facts {
            Some(facts) => self.nodes.insert(name.to_string(), facts.clone()),
            None => self.nodes.remove(name),
        };
        if old == facts {
            return Delta::default();
        }
        let (old, new) = (old.unwrap_or_default(), facts.unwrap_or_default());
        let mut touched: Vec<Ipv4Addr> = old.addresses.iter().chain(&new.addresses).copied().collect();
        touched.sort_unstable();
        touched.dedup();
        let mut nets: Vec<Ipv4Net> = old.subnets.iter().chain(&new.subnets).copied().collect();
        nets.sort_unstable();
        nets.dedup();
        let before: Vec<bool> = touched.iter().map(|&a| self.redirected(a)).collect();
        let nets_before: Vec<bool> = nets.iter().map(|n| self.subnets.contains_key(n)).collect();
        self.count(&old, false);
        self.count(&new, true);
        let mut delta = Delta::default();
        for (&addr, was) in touched.iter().zip(before) {
            match (was, self.redirected(addr)) {
                (false, true) => delta.add_nodes.push(addr),
                (true, false) => delta.remove_nodes.push(addr),
                _ => {}
            }
        }
        for (&net, was) in nets.iter().zip(nets_before) {
            match (was, self.subnets.contains_key(&net)) {
                (false, true) => delta.add_subnets.push(net),
                (true, false) => delta.remove_subnets.push(net),
                _ => {}
            }
        }
        delta
    }

    /// Replaces every node (a complete list).
    fn replace(&mut self, nodes: impl IntoIterator<Item = (String, NodeFacts)>) {
        *self = Self::default();
        for (name, facts) in nodes {
            // A name listed twice (not from a real API server): the last wins.
            self.update(&name, Some(facts));
        }
    }

    fn addresses(&self) -> Vec<Ipv4Addr> {
        self.edge_addresses.keys().copied().filter(|&a| self.redirected(a)).collect()
    }

    fn subnets(&self) -> Vec<Ipv4Net> {
        self.subnets.keys().copied().collect()
    }
}

/// The port rules of a ConfigMap object, or why it is refused.
fn config_map_rules(config_map: &Object<ConfigMapData>) -> Result<PortRules, String> {
    let mut data = BTreeMap::new();
    match config_map.get("/data") {
        None | Some(Value::Null) => {}
        Some(Value::Object(object)) => {
            for (key, value) in object {
                let text = value.as_str().ok_or_else(|| format!("data.{key} is not a string"))?;
                data.insert(key.clone(), text.to_string());
            }
        }
        Some(_) => return Err("data is not an object".to_string()),
    }
    config::from_tunnel_config(&data).map_err(|e| e.to_string())
}

/// Which ConfigMap an Event is about.
#[derive(Debug, Clone)]
struct ConfigMapRef {
    uid: Option<String>,
    resource_version: Option<String>,
}

/// One batch of map writes.
#[derive(Debug)]
enum Write {
    /// One node's change.
    Delta(Delta),
    /// Everything (a complete list, or a retry after a failure).
    Exactly { nodes: Vec<Ipv4Addr>, subnets: Vec<Ipv4Net> },
    /// The port rules.
    Rules(PortRules),
}

/// What the maps hold after a write: edge nodes, edge subnets, rules.
type Sizes = (usize, usize, usize);

/// Runs `write` on the blocking pool: a complete list of a large cluster
/// is tens of thousands of map syscalls, which must not hold a runtime
/// thread.
async fn write_maps(dnat: &Arc<Mutex<TunnelDnat>>, write: Write) -> Result<(Changes, Sizes), DnatError> {
    let dnat = dnat.clone();
    let job = tokio::task::spawn_blocking(move || {
        let mut dnat = dnat.lock().unwrap_or_else(PoisonError::into_inner);
        let mut total = Changes::default();
        let mut sum = |c: Changes| {
            total.added += c.added;
            total.updated += c.updated;
            total.removed += c.removed;
        };
        match write {
            Write::Delta(delta) => {
                // Removals first: a full map has room for the additions.
                sum(dnat.remove_edge_nodes(delta.remove_nodes)?);
                sum(dnat.remove_edge_subnets(delta.remove_subnets)?);
                sum(dnat.add_edge_nodes(delta.add_nodes)?);
                sum(dnat.add_edge_subnets(delta.add_subnets)?);
            }
            Write::Exactly { nodes, subnets } => {
                sum(dnat.set_edge_nodes(nodes)?);
                sum(dnat.set_edge_subnets(subnets)?);
            }
            Write::Rules(rules) => sum(dnat.set_port_rules(rules.iter())?),
        }
        let stats = dnat.stats()?;
        Ok((total, (stats.edge_nodes.len(), stats.edge_subnets.len(), stats.rules.len())))
    });
    match job.await {
        Ok(result) => result,
        // A panic inside the loader: the maps are as far as it got; the
        // caller retries the whole state.
        Err(join) => Err(DnatError::Filesystem {
            what: "writing the tunnel DNAT maps (the writer task died)".to_string(),
            source: std::io::Error::other(join.to_string()),
        }),
    }
}

/// The driver's state between events.
struct Driver {
    client: KubeClient,
    options: TunnelConfigOptions,
    metrics: Arc<TunnelConfigMetrics>,
    dnat: Arc<Mutex<TunnelDnat>>,
    edges: EdgeSet,
    /// Whether the first node list is in (the edge set means something).
    nodes_known: bool,
    /// The rules in force, once written by this run.
    rules: Option<PortRules>,
    /// The rules to be in force (differs from `rules` while a write is
    /// pending or failed).
    wanted_rules: Option<PortRules>,
    /// How many rules were pinned when this run started.
    pinned_rules: usize,
    /// The ConfigMap last seen, for Events about it.
    config_ref: Option<ConfigMapRef>,
    /// The reason last posted for the ConfigMap as refused, while it is.
    refused: Option<String>,
    /// Set after a failed write: write everything again at this instant.
    retry_at: Option<Instant>,
    backoff: Backoff,
    events: JoinSet<()>,
}

impl Driver {
    fn fold_node(&mut self, event: WatchEvent<Arc<SlimNode>>) -> Option<Write> {
        self.metrics.node_events.fetch_add(1, Ordering::Relaxed);
        let types = &self.options.address_types;
        match event {
            WatchEvent::Listed(nodes) => {
                self.metrics.resyncs.fetch_add(1, Ordering::Relaxed);
                let facts: Vec<(String, NodeFacts)> = nodes.iter().filter_map(|n| node_facts(n, types)).collect();
                for (name, facts) in &facts {
                    self.log_problems(name, facts, None);
                }
                self.edges.replace(facts);
                self.nodes_known = true;
                tracing::info!(
                    nodes = nodes.len(),
                    edge_addresses = self.edges.addresses().len(),
                    edge_subnets = self.edges.subnets.len(),
                    "tunnel config: node list folded"
                );
                Some(self.everything())
            }
            WatchEvent::Applied(node) => {
                let (name, facts) = node_facts(&node, types)?;
                let old = self.edges.nodes.get(&name).map(|f| f.problems.clone());
                self.log_problems(&name, &facts, old.as_deref());
                let delta = self.edges.update(&name, Some(facts));
                self.delta(&name, delta)
            }
            WatchEvent::Deleted(node) => {
                let name = node.name()?.to_string();
                let delta = self.edges.update(&name, None);
                self.delta(&name, delta)
            }
        }
    }

    fn log_problems(&self, name: &str, facts: &NodeFacts, before: Option<&[String]>) {
        if before == Some(facts.problems.as_slice()) {
            return;
        }
        for problem in &facts.problems {
            tracing::warn!(node = name, "tunnel config: {problem}");
        }
    }

    fn delta(&self, name: &str, delta: Delta) -> Option<Write> {
        if delta.is_empty() || !self.nodes_known {
            return None;
        }
        tracing::info!(
            node = name,
            added = ?delta.add_nodes, removed = ?delta.remove_nodes,
            subnets_added = ?delta.add_subnets, subnets_removed = ?delta.remove_subnets,
            "tunnel config: edge set changes"
        );
        Some(Write::Delta(delta))
    }

    fn everything(&self) -> Write {
        Write::Exactly { nodes: self.edges.addresses(), subnets: self.edges.subnets() }
    }

    /// The rules a ConfigMap event calls for; refusals are reported here.
    fn fold_config_map(&mut self, event: WatchEvent<Object<ConfigMapData>>) -> Option<Write> {
        self.metrics.config_map_events.fetch_add(1, Ordering::Relaxed);
        let ours = |cm: &Object<ConfigMapData>| {
            cm.name() == Some(CONFIG_MAP_NAME) && cm.namespace().is_none_or(|ns| ns == CONFIG_MAP_NAMESPACE)
        };
        let current = match event {
            WatchEvent::Listed(list) => {
                self.metrics.resyncs.fetch_add(1, Ordering::Relaxed);
                list.into_iter().find(ours)
            }
            WatchEvent::Applied(cm) if ours(&cm) => Some(cm),
            WatchEvent::Deleted(cm) if ours(&cm) => None,
            WatchEvent::Applied(_) | WatchEvent::Deleted(_) => return None,
        };
        let Some(cm) = current else {
            self.refused = None;
            self.metrics.config_valid.store(1, Ordering::Relaxed);
            let write = self.set_rules(config::from_tunnel_config(&BTreeMap::new()).ok()?);
            if write.is_some() {
                tracing::info!(
                    "tunnel config: no ConfigMap {CONFIG_MAP_NAMESPACE}/{CONFIG_MAP_NAME}: kubelet rules only"
                );
            }
            return write;
        };
        let reference = ConfigMapRef {
            uid: cm.uid().map(str::to_string),
            resource_version: cm.resource_version().map(str::to_string),
        };
        self.config_ref = Some(reference.clone());
        match config_map_rules(&cm) {
            Ok(rules) => {
                self.metrics.config_valid.store(1, Ordering::Relaxed);
                if self.refused.take().is_some() {
                    let message = format!("port rules {rules} in force on node {}", self.options.node_name);
                    self.post_event(reference, "Normal", REASON_APPLIED, message);
                }
                self.set_rules(rules)
            }
            Err(reason) => self.refuse(reference, reason),
        }
    }

    fn refuse(&mut self, reference: ConfigMapRef, reason: String) -> Option<Write> {
        self.metrics.config_valid.store(0, Ordering::Relaxed);
        let kept = match &self.rules {
            Some(rules) => format!("keeping {rules}"),
            None if self.pinned_rules > 0 => "keeping the rules pinned before this start".to_string(),
            None => "setting the kubelet rules meanwhile (none were pinned)".to_string(),
        };
        if self.refused.as_deref() != Some(reason.as_str()) {
            self.metrics.config_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "tunnel config: ConfigMap {CONFIG_MAP_NAMESPACE}/{CONFIG_MAP_NAME} refused: {reason}; {kept}"
            );
            let message = format!("refused: {reason}; node {} is {kept}", self.options.node_name);
            self.post_event(reference, "Warning", REASON_REFUSED, message);
            self.refused = Some(reason);
        }
        if self.wanted_rules.is_some() || self.pinned_rules > 0 {
            return None;
        }
        // Refused before anything was in force, and nothing is pinned: the
        // kubelet rules are better than no redirection at all.
        self.set_rules(config::from_tunnel_config(&BTreeMap::new()).ok()?)
    }

    fn set_rules(&mut self, rules: PortRules) -> Option<Write> {
        if self.wanted_rules.as_ref() == Some(&rules) {
            return None;
        }
        self.wanted_rules = Some(rules.clone());
        Some(Write::Rules(rules))
    }

    /// Posts an Event about the ConfigMap, in the background: a slow API
    /// server must not delay the next map write.
    fn post_event(&mut self, reference: ConfigMapRef, kind: &str, reason: &str, message: String) {
        let event = config_map_event(&self.options.node_name, &reference, kind, reason, &message);
        let (client, metrics) = (self.client.clone(), self.metrics.clone());
        self.events.spawn(async move {
            match events::post(&client, &event).await {
                Ok(_) => {
                    metrics.events_posted.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => {
                    metrics.event_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("tunnel config: {err}");
                }
            }
        });
    }

    async fn apply(&mut self, write: Write) {
        let rules = match &write {
            Write::Rules(rules) => Some(rules.clone()),
            Write::Delta(_) | Write::Exactly { .. } => None,
        };
        match write_maps(&self.dnat, write).await {
            Ok((changes, (nodes, subnets, rule_count))) => {
                TunnelConfigMetrics::add(&self.metrics.map_writes, changes);
                self.metrics.edge_nodes.store(nodes as u64, Ordering::Relaxed);
                self.metrics.edge_subnets.store(subnets as u64, Ordering::Relaxed);
                self.metrics.port_rules.store(rule_count as u64, Ordering::Relaxed);
                self.backoff.reset();
                if let Some(rules) = rules {
                    tracing::info!("tunnel config: port rules {rules}");
                    self.rules = Some(rules);
                }
            }
            Err(DnatError::TooManyPortRules { count }) if rules.is_some() => {
                // Checked before any write: a configuration problem, refused
                // as such; what was in force stays wanted.
                self.wanted_rules = self.rules.clone();
                let reason = format!("{count} port rules, but the tunnel DNAT holds at most {MAX_PORT_RULES}");
                let reference = self.config_ref.clone().unwrap_or(ConfigMapRef { uid: None, resource_version: None });
                let _ = self.refuse(reference, reason);
            }
            Err(err) => {
                self.metrics.map_errors.fetch_add(1, Ordering::Relaxed);
                let delay = self.backoff.next_delay();
                tracing::warn!(
                    "tunnel config: writing the DNAT maps failed: {}; writing everything again in {delay:?}",
                    netd_kube::error_chain(&err)
                );
                self.retry_at = Some(Instant::now() + delay);
            }
        }
    }

    /// After a failed write: the whole desired state again (the loader
    /// knows what the maps hold, so only differences are written).
    async fn retry(&mut self) {
        self.retry_at = None;
        if self.nodes_known {
            self.apply(self.everything()).await;
        }
        if let Some(rules) = self.wanted_rules.clone() {
            if self.retry_at.is_none() {
                self.apply(Write::Rules(rules)).await;
            }
        }
    }
}

/// A core/v1 Event about the ConfigMap.
fn config_map_event(node: &str, reference: &ConfigMapRef, kind: &str, reason: &str, message: &str) -> Event {
    let regarding = Regarding {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        namespace: CONFIG_MAP_NAMESPACE.into(),
        name: CONFIG_MAP_NAME.into(),
        uid: reference.uid.clone(),
        resource_version: reference.resource_version.clone(),
    };
    events::event(&regarding, Reporter { component: COMPONENT, host: node }, kind, reason, message)
}

/// Drives `dnat` (attached and targeted: `netd dnat apply`, or
/// [`crate::dnat::apply`] at the controller's start) from the cluster until
/// the future is dropped; see the module docs. The API server being away
/// is retried with backoff, and the maps keep what they have meanwhile.
///
/// # Errors
///
/// Only before it starts watching: no address types, or a DNAT without a
/// target.
pub async fn run(
    client: KubeClient,
    dnat: TunnelDnat,
    options: TunnelConfigOptions,
    metrics: Arc<TunnelConfigMetrics>,
) -> Result<(), TunnelConfigError> {
    let nodes = NodeWatch::new(&client);
    run_on(client, nodes, dnat, options, metrics).await
}

/// [`run`] on a shared Node list+watch (the controller's one).
///
/// # Errors
///
/// As [`run`].
pub async fn run_on(
    client: KubeClient,
    nodes: NodeWatch,
    dnat: TunnelDnat,
    options: TunnelConfigOptions,
    metrics: Arc<TunnelConfigMetrics>,
) -> Result<(), TunnelConfigError> {
    if options.address_types.is_empty() {
        return Err(TunnelConfigError::NoAddressTypes);
    }
    let stats = dnat.stats()?;
    if stats.target.is_none() {
        return Err(TunnelConfigError::NoTarget { pin_dir: dnat.pin_dir().to_path_buf() });
    }
    metrics.edge_nodes.store(stats.edge_nodes.len() as u64, Ordering::Relaxed);
    metrics.edge_subnets.store(stats.edge_subnets.len() as u64, Ordering::Relaxed);
    metrics.port_rules.store(stats.rules.len() as u64, Ordering::Relaxed);
    metrics.config_valid.store(1, Ordering::Relaxed);
    let mut nodes = nodes.subscribe();
    let mut config_maps: ListWatch<Object<ConfigMapData>> = ListWatch::namespaced(
        &client,
        CONFIG_MAP_NAMESPACE,
        Some(format!("metadata.name={CONFIG_MAP_NAME}")),
        "tunnel ConfigMap",
    );
    let dnat = Arc::new(Mutex::new(dnat));
    let _shown = ShownIn::new(&metrics, &dnat);
    let mut driver = Driver {
        client,
        options,
        metrics,
        dnat,
        edges: EdgeSet::default(),
        nodes_known: false,
        rules: None,
        wanted_rules: None,
        pinned_rules: stats.rules.len(),
        config_ref: None,
        refused: None,
        retry_at: None,
        backoff: Backoff::default(),
        events: JoinSet::new(),
    };
    loop {
        let retry_at = driver.retry_at;
        let write = tokio::select! {
            event = nodes.next() => driver.fold_node(event),
            event = config_maps.next() => driver.fold_config_map(event),
            () = async { if let Some(at) = retry_at { tokio::time::sleep_until(at).await } }, if retry_at.is_some() => {
                driver.retry().await;
                None
            }
            Some(_) = driver.events.join_next(), if !driver.events.is_empty() => None,
        };
        if let Some(write) = write {
            if driver.retry_at.is_some() {
                // A failed write is pending: the retry writes the whole
                // state, which includes this change.
                continue;
            }
            driver.apply(write).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netd_kube::object::NodeEdgeRole;
    use netd_model::roles::{LABEL_EDGE_WORKER, LABEL_ROLE, LABEL_ROLE_POINTER};
    use serde_json::json;

    /// A node; `role` is the value of the trusted role label, if any.
    fn node(name: &str, role: Option<&str>, addresses: &[(&str, &str)], cidrs: &[&str]) -> SlimNode {
        SlimNode::from_value(node_json(name, role, addresses, cidrs))
    }

    fn node_json(name: &str, role: Option<&str>, addresses: &[(&str, &str)], cidrs: &[&str]) -> Value {
        let labels = match role {
            Some(value) => json!({ LABEL_ROLE: value }),
            None => json!({}),
        };
        let addresses: Vec<Value> = addresses.iter().map(|(t, a)| json!({ "type": t, "address": a })).collect();
        json!({
            "metadata": { "name": name, "labels": labels },
            "spec": { "podCIDR": cidrs.first(), "podCIDRs": cidrs },
            "status": { "addresses": addresses },
        })
    }

    fn facts(node: &SlimNode) -> NodeFacts {
        node_facts(node, &["InternalIP".to_string()]).unwrap().1
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    fn net(text: &str) -> Ipv4Net {
        text.parse().unwrap()
    }

    #[test]
    fn the_view_keeps_the_trusted_label_and_only_it_makes_a_cloud_node() {
        use netd_kube::object::Kind;
        let cloud = node("a", Some("cloud"), &[], &[]);
        let view = Object::<NodeEdgeRole>::from_value(node_json("a", Some("cloud"), &[], &[]));
        assert_eq!(view.get(LABEL_ROLE_POINTER), Some(&json!("cloud")), "NodeEdgeRole keeps the role label");
        assert!(NodeEdgeRole::KEEP.contains(&LABEL_ROLE_POINTER));
        assert_eq!(cloud.role_label(), Some("cloud"), "the slim node keeps the role label");
        assert!(super::super::node_watch::READ.contains(&LABEL_ROLE_POINTER));
        assert!(!facts(&cloud).edge);
        // The seed's label, which a kubelet may set on its own Node, is
        // not even kept: claiming "false" there leaves the node edge.
        let claims = SlimNode::from_value(json!({
            "metadata": { "name": "e", "labels": { LABEL_EDGE_WORKER: "false" } },
        }));
        assert!(facts(&claims).edge);
        assert!(facts(&node("u", None, &[], &[])).edge, "unlabelled: edge (deny by default)");
    }

    #[test]
    fn facts_take_internal_ipv4_addresses_and_edge_pod_cidrs() {
        let edge = node(
            "e",
            None,
            &[
                ("Hostname", "e"),
                ("InternalIP", "10.0.5.7"),
                ("InternalIP", "fd00::7"),
                ("ExternalIP", "203.0.113.7"),
                ("InternalIP", "10.0.5.7"),
                ("InternalIP", "127.0.0.1"),
                ("InternalIP", "garbage"),
            ],
            &["10.244.7.0/24", "fd00:244::/64", "10.244.7.5/24"],
        );
        let got = facts(&edge);
        assert!(got.edge);
        assert_eq!(got.addresses, [ip("10.0.5.7")]);
        assert_eq!(got.subnets, [net("10.244.7.0/24")], "host bits dropped, each once, IPv6 skipped");
        assert_eq!(got.problems.len(), 2, "{:?}", got.problems);
        assert!(got.problems[0].contains("127.0.0.1 is never redirected"), "{:?}", got.problems);
        assert!(got.problems[1].contains("\"garbage\"") && got.problems[1].contains("not an IP"), "{:?}", got.problems);

        let both = node_facts(&edge, &["InternalIP".to_string(), "ExternalIP".to_string()]).unwrap().1;
        assert_eq!(both.addresses, [ip("10.0.5.7"), ip("203.0.113.7")]);

        let cloud = facts(&node("c", Some("cloud"), &[("InternalIP", "10.0.0.1")], &["10.244.0.0/24"]));
        assert!(!cloud.edge);
        assert_eq!((cloud.addresses, cloud.subnets), (vec![ip("10.0.0.1")], vec![]), "a cloud pod CIDR is not edge");

        let odd = facts(&node("o", Some("yes"), &[("InternalIP", "10.0.0.2")], &[]));
        assert!(odd.edge, "an odd role value grants nothing");
        assert!(odd.problems[0].contains("=\"yes\" is neither"), "{:?}", odd.problems);

        let wide = facts(&node("w", Some("edge"), &[], &["0.0.0.0/0", "127.0.0.0/8", "x/24"]));
        assert!(wide.subnets.is_empty());
        assert_eq!(wide.problems.len(), 3, "{:?}", wide.problems);
        assert!(wide.problems[0].contains("0.0.0.0/0 would redirect"), "{:?}", wide.problems);

        let nameless = SlimNode::from_value(json!({ "metadata": { "name": 7 } }));
        assert!(node_facts(&nameless, &["InternalIP".to_string()]).is_none());
    }

    #[test]
    fn one_node_change_touches_only_its_entries() {
        let mut set = EdgeSet::default();
        set.replace([
            ("e1".to_string(), facts(&node("e1", None, &[("InternalIP", "10.0.5.1")], &["10.244.1.0/24"]))),
            ("c1".to_string(), facts(&node("c1", Some("cloud"), &[("InternalIP", "10.0.0.1")], &[]))),
        ]);
        assert_eq!(set.addresses(), [ip("10.0.5.1")]);

        // An edge node: its address and pod CIDR come in.
        let e2 = facts(&node("e2", None, &[("InternalIP", "10.0.5.2")], &["10.244.2.0/24"]));
        let delta = set.update("e2", Some(e2.clone()));
        assert_eq!(delta.add_nodes, [ip("10.0.5.2")]);
        assert_eq!(delta.add_subnets, [net("10.244.2.0/24")]);
        assert!(delta.remove_nodes.is_empty() && delta.remove_subnets.is_empty());
        // The same object again (a status heartbeat): nothing to write.
        assert!(set.update("e2", Some(e2)).is_empty());

        // Labelled cloud by an operator: both go.
        let e2_cloud = facts(&node("e2", Some("cloud"), &[("InternalIP", "10.0.5.2")], &["10.244.2.0/24"]));
        let delta = set.update("e2", Some(e2_cloud));
        assert_eq!((delta.remove_nodes, delta.remove_subnets), (vec![ip("10.0.5.2")], vec![net("10.244.2.0/24")]));
        assert!(delta.add_nodes.is_empty());

        // A cloud node claiming an edge address takes it out of the DNAT;
        // when it lets go, the edge node has it back.
        let c2 = facts(&node("c2", Some("cloud"), &[("InternalIP", "10.0.5.1")], &[]));
        assert_eq!(set.update("c2", Some(c2)).remove_nodes, [ip("10.0.5.1")]);
        assert_eq!(set.update("c2", None).add_nodes, [ip("10.0.5.1")]);

        // Two edge nodes sharing an address (a re-used IP mid-move): it
        // stays until both are gone.
        let e3 = facts(&node("e3", Some("edge"), &[("InternalIP", "10.0.5.1")], &["10.244.1.0/24"]));
        assert!(set.update("e3", Some(e3)).is_empty());
        assert!(set.update("e1", None).is_empty());
        let delta = set.update("e3", None);
        assert_eq!((delta.remove_nodes, delta.remove_subnets), (vec![ip("10.0.5.1")], vec![net("10.244.1.0/24")]));
        assert!(set.addresses().is_empty() && set.subnets().is_empty());
        assert!(set.edge_addresses.is_empty() && set.subnets.is_empty(), "counts go back to nothing");
        assert_eq!(set.other_addresses.len(), 2, "c1 and e2, now cloud");
    }

    #[test]
    fn a_random_history_agrees_with_recomputing_from_scratch() {
        // splitmix64: a failure reproduces.
        let mut state = 0x7475_6e63_6667u64;
        let mut next = move |n: u64| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % n
        };
        let mut set = EdgeSet::default();
        let mut maps: std::collections::HashSet<Ipv4Addr> = Default::default();
        let mut nets: std::collections::HashSet<Ipv4Net> = Default::default();
        for _ in 0..5_000 {
            let name = format!("n{}", next(20));
            let delta = if next(5) == 0 {
                set.update(&name, None)
            } else {
                let role = [None, Some("cloud"), Some("edge")][next(3) as usize];
                let addr = format!("10.0.0.{}", next(12));
                let cidr = format!("10.244.{}.0/24", next(6));
                set.update(&name, Some(facts(&node(&name, role, &[("InternalIP", &addr)], &[&cidr]))))
            };
            for a in &delta.add_nodes {
                assert!(maps.insert(*a), "added twice: {a}");
            }
            for a in &delta.remove_nodes {
                assert!(maps.remove(a), "removed absent: {a}");
            }
            for n in &delta.add_subnets {
                assert!(nets.insert(*n));
            }
            for n in &delta.remove_subnets {
                assert!(nets.remove(n));
            }
            // From scratch: edge addresses no other node has.
            let mut want: std::collections::HashSet<Ipv4Addr> = Default::default();
            for facts in set.nodes.values().filter(|f| f.edge) {
                want.extend(
                    facts
                        .addresses
                        .iter()
                        .filter(|a| !set.nodes.values().any(|other| !other.edge && other.addresses.contains(a))),
                );
            }
            assert_eq!(maps, want);
            let want_nets: std::collections::HashSet<Ipv4Net> =
                set.nodes.values().filter(|f| f.edge).flat_map(|f| f.subnets.iter().copied()).collect();
            assert_eq!(nets, want_nets);
        }
    }

    #[test]
    fn config_maps_parse_or_say_why() {
        let cm = |data: Value| {
            Object::<ConfigMapData>::from_value(json!({ "metadata": { "name": CONFIG_MAP_NAME }, "data": data }))
        };
        assert_eq!(
            config_map_rules(&cm(json!({ "dnat-ports-pair": "9100=10264" }))).unwrap().to_string(),
            "9100=10264,10250=10263,10255=10264"
        );
        assert_eq!(config_map_rules(&cm(Value::Null)).unwrap().len(), 2);
        assert_eq!(
            config_map_rules(&cm(json!({ "dnat-ports-pair": "10250=10264" }))).unwrap_err(),
            r#"dnat-ports-pair: token 1 "10250=10264": 10250 is the kubelet port, always redirected to 10263, never an extra"#
        );
        assert_eq!(
            config_map_rules(&cm(json!({ "http-proxy-ports": 9100 }))).unwrap_err(),
            "data.http-proxy-ports is not a string"
        );
        assert_eq!(config_map_rules(&cm(json!(["x"]))).unwrap_err(), "data is not an object");
    }

    #[test]
    fn events_name_the_config_map_and_the_node() {
        let reference = ConfigMapRef { uid: Some("u-1".into()), resource_version: Some("42".into()) };
        let event = config_map_event("cloud-1", &reference, "Warning", REASON_REFUSED, "refused: x");
        let value = serde_json::to_value(&event).unwrap();
        assert_eq!(
            value["involvedObject"],
            json!({
                "apiVersion": "v1", "kind": "ConfigMap", "namespace": "kube-system",
                "name": CONFIG_MAP_NAME, "uid": "u-1", "resourceVersion": "42",
            })
        );
        assert_eq!((value["type"].as_str(), value["reason"].as_str()), (Some("Warning"), Some("InvalidTunnelConfig")));
        assert_eq!(value["source"], json!({ "component": "netd-controller", "host": "cloud-1" }));
        assert!(value["metadata"]["name"].as_str().unwrap().starts_with("edge-tunnel-server-cfg."));
    }

    #[test]
    fn metrics_render_as_prometheus_text() {
        let metrics = Arc::new(TunnelConfigMetrics::default());
        metrics.edge_nodes.store(3, Ordering::Relaxed);
        metrics.config_refused.fetch_add(1, Ordering::Relaxed);
        let text = metrics.render_prometheus();
        assert!(
            text.contains("# TYPE netd_tunnel_config_edge_nodes gauge\nnetd_tunnel_config_edge_nodes 3\n"),
            "{text}"
        );
        assert!(text.contains("netd_tunnel_config_refused_total 1\n"), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("# TYPE")).count(), 12);
        assert_eq!(metrics.render_dnat_blocking(), "", "no DNAT driven: no netd_dnat_* series");
    }
}
