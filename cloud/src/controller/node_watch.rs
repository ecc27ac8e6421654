//! The controller's one list+watch of Nodes, shared by every part that
//! reads Nodes: role labelling ([`super::nodes`]), autonomy tolerations
//! ([`super::tolerations`]), the tunnel DNAT configuration
//! ([`super::tunnel_config`]) and rollouts ([`crate::rollout::kubernetes`]).
//!
//! One [`ListWatch`] (netd-kube's list+watch: paginated consistent lists,
//! bookmarks, a fresh list after any error) feeds one store of
//! [`SlimNode`]s: the union of the fields those parts read ([`READ`]) and
//! nothing else, decoded straight from the JSON into plain typed values
//! (no JSON tree, no `ObjectMeta` kept) — in the spirit of Cilium's
//! operator, whose one slim node store keeps only what its consumers read
//! as typed fields, and of kube-runtime's
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

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;
use tokio::task::AbortHandle;

use netd_kube::watch::{Backoff, ListWatch, WatchEvent};
use netd_kube::{KubeClient, KubeError};
use netd_model::autonomy::ANNOTATIONS as AUTONOMY_ANNOTATIONS;
use netd_model::roles::{LABEL_ROLE_POINTER, TAINT_ADDON_KEY};
use netd_model::{flannel, MacAddr};

/// Changes a subscriber may fall behind by before it is given the whole
/// store again instead.
pub const BUFFER: usize = 512;

/// The JSON pointer of the seed's edge-worker label (an output of role
/// labelling, read to write it only when it differs).
pub const EDGE_WORKER_POINTER: &str = "/metadata/labels/alibabacloud.com~1is-edge-worker";

/// The annotation role labelling puts on a node it tainted as a cloud node
/// (`controller::nodes::ANNOTATION_TAINTED`; checked by a test there).
const TAINTED_POINTER: &str = "/metadata/annotations/netd.alibabacloud.com~1addon-taint-added";
const BACKEND_DATA_POINTER: &str = "/metadata/annotations/flannel.alpha.coreos.com~1backend-data";
const CONDITIONS_POINTER: &str = "/status/conditions";

/// The Node fields any part of the controller reads, as JSON pointers
/// (RFC 6901): what role labelling, tolerations, the tunnel configuration
/// and rollouts read (checked by a test against the views they used to
/// keep). Only these are decoded, each straight into a typed field of
/// [`SlimNode`]; everything else (`status.images`, `managedFields`, the
/// other labels and annotations, the other conditions) is skipped as the
/// JSON is read, never held.
pub const READ: &[&str] = &[
    "/metadata/name",
    "/metadata/resourceVersion",
    LABEL_ROLE_POINTER,
    EDGE_WORKER_POINTER,
    TAINTED_POINTER,
    BACKEND_DATA_POINTER,
    "/metadata/annotations/node.beta.alibabacloud.com~1autonomy",
    "/metadata/annotations/node.beta.openyurt.io~1autonomy",
    "/metadata/annotations/node.openyurt.io~1autonomy-duration",
    "/spec/podCIDR",
    "/spec/podCIDRs",
    "/spec/taints",
    "/status/addresses",
    CONDITIONS_POINTER,
];

/// A Node as the controller keeps it: plain typed values of the fields in
/// [`READ`], no JSON and no `ObjectMeta` (Cilium's operator keeps its
/// slim nodes the same way): 144 bytes plus about 250 on the heap for a
/// node with two addresses and one pod CIDR, against 3–4 KiB for the same
/// fields as JSON objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlimNode {
    name: Option<Box<str>>,
    resource_version: Option<Box<str>>,
    /// `node-restriction.kubernetes.io/netd-role`.
    role_label: Option<LabelValue>,
    /// `alibabacloud.com/is-edge-worker`: `Some` when `"true"`/`"false"`.
    edge_worker: Option<bool>,
    /// `netd.alibabacloud.com/addon-taint-added` is `"true"`.
    tainted_by_us: bool,
    /// The VTEP MAC of flannel's `backend-data`, when that parses.
    vtep_mac: Option<MacAddr>,
    /// The autonomy annotations that are strings, in
    /// [`netd_model::autonomy::ANNOTATIONS`]' order (`None`: none is).
    autonomy: Option<Box<[Option<Box<str>>; 3]>>,
    /// `spec.podCIDR`, when it is an IPv4 CIDR.
    pod_cidr: Option<Ipv4Net>,
    /// `spec.podCIDRs`' entries, then `spec.podCIDR`, each distinct value once.
    pod_cidrs: Box<[PodCidr]>,
    taints: Box<[Taint]>,
    /// `status.addresses` whose type is a string.
    addresses: Box<[NodeAddress]>,
    ready: Ready,
}

/// A label's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelValue {
    /// A string, as every API server writes.
    Text(Box<str>),
    /// Anything else (an object written behind the API server's back), as
    /// JSON text.
    NotText(Box<str>),
}

/// One of a node's pod CIDRs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodCidr {
    /// A CIDR (host bits as written).
    Net(IpNet),
    /// Not one: the value as JSON text, for the log.
    NotCidr(Box<str>),
}

/// A taint, as written back when role labelling adds or takes away its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Taint {
    /// `key` (each field as written, when a string).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<Box<str>>,
    /// `value`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Box<str>>,
    /// `effect`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effect: Option<Box<str>>,
    /// `timeAdded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_added: Option<Box<str>>,
}

/// `status.addresses[].type`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs, clippy::upper_case_acronyms)]
pub enum AddressType {
    InternalIP,
    ExternalIP,
    Hostname,
    InternalDNS,
    ExternalDNS,
    /// A type Kubernetes does not define.
    Other(Box<str>),
}

impl AddressType {
    fn from_text(text: &str) -> Self {
        match text {
            "InternalIP" => Self::InternalIP,
            "ExternalIP" => Self::ExternalIP,
            "Hostname" => Self::Hostname,
            "InternalDNS" => Self::InternalDNS,
            "ExternalDNS" => Self::ExternalDNS,
            other => Self::Other(other.into()),
        }
    }

    /// As the API writes it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::InternalIP => "InternalIP",
            Self::ExternalIP => "ExternalIP",
            Self::Hostname => "Hostname",
            Self::InternalDNS => "InternalDNS",
            Self::ExternalDNS => "ExternalDNS",
            Self::Other(text) => text,
        }
    }
}

/// One of `status.addresses`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    /// `type`.
    pub kind: AddressType,
    /// `address`.
    pub address: Address,
}

/// `status.addresses[].address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// An IP address.
    Ip(IpAddr),
    /// Not an IP address (a `Hostname`, or garbage): the whole entry as
    /// JSON text, for the log.
    NotIp(Box<str>),
}

/// The node's Ready condition (the first of that type), as far as a
/// rollout reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Ready {
    /// No Ready condition (no kubelet has reported), or no conditions list.
    #[default]
    Unreported,
    /// `status` is `"True"`.
    True,
    /// Anything else, with what a rollout says about it.
    Not(Box<NotReady>),
}

/// A Ready condition that is not True.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    /// `status`.
    pub status: ConditionStatus,
    /// `lastTransitionTime`, as written.
    pub since: Option<Box<str>>,
    /// `message`, when a non-empty string.
    pub message: Option<Box<str>>,
}

/// A condition's `status` other than `"True"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionStatus {
    /// `"False"`.
    False,
    /// `"Unknown"` (the node controller's word for a silent kubelet).
    Unknown,
    /// Another string.
    Other(Box<str>),
    /// Missing or not a string.
    Missing,
}

impl fmt::Display for ConditionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::False => "False",
            Self::Unknown => "Unknown",
            Self::Other(text) => text,
            Self::Missing => "?",
        })
    }
}

fn boxed(value: Option<&Value>) -> Option<Box<str>> {
    value.and_then(Value::as_str).map(Box::from)
}

impl SlimNode {
    /// The node from the values [`Pick`] found, by pointer (the last of a
    /// key given twice wins, as in a JSON object).
    fn from_fields(fields: &[(&'static str, Value)]) -> Self {
        let get = |pointer: &str| fields.iter().rev().find(|(p, _)| *p == pointer).map(|(_, v)| v);
        let annotation = |key: &str| {
            let pointer = format!("/metadata/annotations/{}", key.replace('~', "~0").replace('/', "~1"));
            boxed(get(&pointer))
        };
        let autonomy = AUTONOMY_ANNOTATIONS.map(annotation);
        let role_label = match get(LABEL_ROLE_POINTER) {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(LabelValue::Text(text.as_str().into())),
            Some(other) => Some(LabelValue::NotText(other.to_string().into())),
        };
        let mut pod_cidrs: Vec<&Value> = Vec::new();
        if let Some(Value::Array(list)) = get("/spec/podCIDRs") {
            pod_cidrs.extend(list);
        }
        pod_cidrs.extend(get("/spec/podCIDR"));
        let mut distinct: Vec<&Value> = Vec::new();
        for value in pod_cidrs {
            if !distinct.contains(&value) {
                distinct.push(value);
            }
        }
        let pod_cidrs = distinct
            .into_iter()
            .map(|value| match value.as_str().unwrap_or_default().parse::<IpNet>() {
                Ok(net) => PodCidr::Net(net),
                Err(_) => PodCidr::NotCidr(value.to_string().into()),
            })
            .collect();
        let taints = match get("/spec/taints") {
            Some(Value::Array(list)) => list
                .iter()
                .map(|t| Taint {
                    key: boxed(t.get("key")),
                    value: boxed(t.get("value")),
                    effect: boxed(t.get("effect")),
                    time_added: boxed(t.get("timeAdded")),
                })
                .collect(),
            _ => Box::default(),
        };
        let addresses = match get("/status/addresses") {
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(|entry| {
                    let kind = AddressType::from_text(entry.get("type")?.as_str()?);
                    let text = entry.get("address").and_then(Value::as_str).unwrap_or_default();
                    let address = match text.parse::<IpAddr>() {
                        Ok(ip) => Address::Ip(ip),
                        Err(_) => Address::NotIp(entry.to_string().into()),
                    };
                    Some(NodeAddress { kind, address })
                })
                .collect(),
            _ => Box::default(),
        };
        let conditions = get(CONDITIONS_POINTER).and_then(Value::as_array);
        let ready = match conditions.and_then(|c| c.iter().find(|c| c["type"] == "Ready")) {
            None => Ready::Unreported,
            Some(ready) if ready["status"] == "True" => Ready::True,
            Some(ready) => Ready::Not(Box::new(NotReady {
                status: match ready["status"].as_str() {
                    Some("False") => ConditionStatus::False,
                    Some("Unknown") => ConditionStatus::Unknown,
                    Some(other) => ConditionStatus::Other(other.into()),
                    None => ConditionStatus::Missing,
                },
                since: boxed(ready.get("lastTransitionTime")),
                message: ready["message"].as_str().filter(|m| !m.is_empty()).map(Box::from),
            })),
        };
        Self {
            name: boxed(get("/metadata/name")),
            resource_version: boxed(get("/metadata/resourceVersion")),
            role_label,
            edge_worker: match get(EDGE_WORKER_POINTER).and_then(Value::as_str) {
                Some("true") => Some(true),
                Some("false") => Some(false),
                _ => None,
            },
            tainted_by_us: get(TAINTED_POINTER).and_then(Value::as_str) == Some("true"),
            vtep_mac: get(BACKEND_DATA_POINTER)
                .and_then(Value::as_str)
                .and_then(|text| flannel::parse_backend_data(text).ok())
                .map(|data| data.vtep_mac),
            autonomy: autonomy.iter().any(Option::is_some).then(|| Box::new(autonomy)),
            pod_cidr: get("/spec/podCIDR").and_then(Value::as_str).and_then(|s| s.parse().ok()),
            pod_cidrs,
            taints,
            addresses,
            ready,
        }
    }

    /// The node from its JSON (any JSON: what is not a Node reads as an
    /// empty one, and the parts judge what they find).
    pub fn from_value(value: Value) -> Self {
        NodeWire::deserialize(value).map(|wire| wire.node).unwrap_or_default()
    }

    /// `metadata.name`, when it is a string.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// `metadata.resourceVersion`, when it is a string.
    pub fn resource_version(&self) -> Option<&str> {
        self.resource_version.as_deref()
    }

    /// The trusted role label, when it is a string.
    pub fn role_label(&self) -> Option<&str> {
        match &self.role_label {
            Some(LabelValue::Text(text)) => Some(text),
            Some(LabelValue::NotText(_)) | None => None,
        }
    }

    /// The trusted role label as it is (a value that is not a string as
    /// its JSON text).
    pub fn role_label_value(&self) -> Option<&LabelValue> {
        self.role_label.as_ref()
    }

    /// The seed's edge-worker label: `Some(true)` for `"true"`,
    /// `Some(false)` for `"false"`, `None` for anything else or none.
    pub fn edge_worker_label(&self) -> Option<bool> {
        self.edge_worker
    }

    /// Whether role labelling recorded that it added the cloud taint.
    pub fn tainted_by_us(&self) -> bool {
        self.tainted_by_us
    }

    /// The VTEP MAC flannel's `backend-data` annotation publishes.
    pub fn vtep_mac(&self) -> Option<MacAddr> {
        self.vtep_mac
    }

    /// One of the autonomy annotations ([`netd_model::autonomy::ANNOTATIONS`]),
    /// when it is a string; `None` for any other key.
    pub fn autonomy_annotation(&self, key: &str) -> Option<&str> {
        let index = AUTONOMY_ANNOTATIONS.iter().position(|k| *k == key)?;
        self.autonomy.as_ref()?[index].as_deref()
    }

    /// `spec.podCIDR`, when it is an IPv4 CIDR.
    pub fn pod_cidr(&self) -> Option<Ipv4Net> {
        self.pod_cidr
    }

    /// `spec.podCIDRs`' entries, then `spec.podCIDR`, each value once.
    pub fn pod_cidrs(&self) -> &[PodCidr] {
        &self.pod_cidrs
    }

    /// `spec.taints`.
    pub fn taints(&self) -> &[Taint] {
        &self.taints
    }

    /// Whether one of the taints is the cloud taint.
    pub fn has_addon_taint(&self) -> bool {
        self.taints.iter().any(|t| t.key.as_deref() == Some(TAINT_ADDON_KEY))
    }

    /// `status.addresses` (those with a type).
    pub fn addresses(&self) -> &[NodeAddress] {
        &self.addresses
    }

    /// The Ready condition.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }
}

/// [`READ`], each pointer split into its (unescaped) keys.
static READ_KEYS: LazyLock<Vec<(&'static str, Vec<String>)>> = LazyLock::new(|| {
    READ.iter()
        .map(|pointer| {
            let keys = pointer.split('/').skip(1).map(|k| k.replace("~1", "/").replace("~0", "~")).collect();
            (*pointer, keys)
        })
        .collect()
});

/// A map key, borrowed from the input when it can be.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Reads a JSON value keeping, as [`Value`]s, only the fields under
/// `wanted` (pointers of [`READ_KEYS`] whose first `depth` keys led here);
/// the rest is skipped without being built. Any JSON reads: what is not an
/// object where one is looked into has none of the fields.
struct Pick<'a> {
    wanted: Vec<&'static (&'static str, Vec<String>)>,
    depth: usize,
    out: &'a mut Vec<(&'static str, Value)>,
}

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Pick<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let mut exact = None;
            let mut deeper = Vec::new();
            for want in &self.wanted {
                if want.1.get(self.depth).map(String::as_str) == Some(&*key) {
                    if want.1.len() == self.depth + 1 {
                        exact = Some(want.0);
                    } else {
                        deeper.push(*want);
                    }
                }
            }
            if let Some(pointer) = exact {
                let value: Value = map.next_value()?;
                self.out.push((pointer, value));
            } else if deeper.is_empty() {
                map.next_value::<IgnoredAny>()?;
            } else {
                map.next_value_seed(Pick { wanted: deeper, depth: self.depth + 1, out: &mut *self.out })?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// A Node as it comes off the wire: the [`SlimNode`], and the name and
/// `resourceVersion` again as the `ObjectMeta` kube-runtime's watcher
/// reads (to resume watches). Lives from the list page or watch event to
/// the store, where only the [`SlimNode`] is kept.
#[derive(Debug, Clone)]
pub struct NodeWire {
    meta: ObjectMeta,
    node: SlimNode,
}

impl NodeWire {
    /// What the store keeps.
    pub fn into_slim(self) -> SlimNode {
        self.node
    }
}

impl<'de> Deserialize<'de> for NodeWire {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut fields = Vec::new();
        Pick { wanted: READ_KEYS.iter().collect(), depth: 0, out: &mut fields }.deserialize(deserializer)?;
        let node = SlimNode::from_fields(&fields);
        let meta = ObjectMeta {
            name: node.name().map(str::to_string),
            resource_version: node.resource_version().map(str::to_string),
            ..ObjectMeta::default()
        };
        Ok(Self { meta, node })
    }
}

impl kube::Resource for NodeWire {
    type DynamicType = ();
    type Scope = <Node as k8s_openapi::Resource>::Scope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<Node as k8s_openapi::Resource>::KIND)
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<Node as k8s_openapi::Resource>::GROUP)
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<Node as k8s_openapi::Resource>::VERSION)
    }

    fn api_version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<Node as k8s_openapi::Resource>::API_VERSION)
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<Node as k8s_openapi::Resource>::URL_PATH_SEGMENT)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
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
                let watch: ListWatch<NodeWire> = ListWatch::new(&self.shared.client, None, "node");
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
async fn drive(mut watch: ListWatch<NodeWire>, shared: std::sync::Weak<Shared>) {
    let mut backoff = Backoff::default();
    loop {
        let result = watch.try_next().await;
        let Some(shared) = shared.upgrade() else { return };
        match result {
            Ok(event) => {
                backoff.reset();
                shared.hub.publish(match event {
                    WatchEvent::Listed(all) => WatchEvent::Listed(all.into_iter().map(NodeWire::into_slim).collect()),
                    WatchEvent::Applied(node) => WatchEvent::Applied(node.into_slim()),
                    WatchEvent::Deleted(node) => WatchEvent::Deleted(node.into_slim()),
                });
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
        use netd_kube::object::Kind;
        let pointers = |keep: &[&'static str]| keep.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        // What the parts' own views kept before they shared this store.
        let role_labelling = [
            "/metadata/name",
            LABEL_ROLE_POINTER,
            EDGE_WORKER_POINTER,
            "/metadata/annotations/netd.alibabacloud.com~1addon-taint-added",
            "/metadata/annotations/flannel.alpha.coreos.com~1backend-data",
            "/metadata/annotations/node.beta.alibabacloud.com~1autonomy",
            "/metadata/annotations/node.beta.openyurt.io~1autonomy",
            "/metadata/annotations/node.openyurt.io~1autonomy-duration",
            "/spec/podCIDR",
            "/spec/taints",
        ];
        for (part, keep) in [
            ("role labelling", pointers(&role_labelling)),
            ("tolerations", pointers(netd_kube::object::NodeAutonomy::KEEP)),
            ("tunnel configuration", pointers(netd_kube::object::NodeEdgeRole::KEEP)),
            ("rollouts", pointers(netd_kube::object::NodeReadiness::KEEP)),
        ] {
            for pointer in keep {
                assert!(READ.contains(&pointer.as_str()), "{part} reads {pointer}");
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
            node.ready(),
            &Ready::Not(Box::new(NotReady {
                status: ConditionStatus::False,
                since: Some("t0".into()),
                message: Some("down".into())
            }))
        );
        let kept = format!("{node:?}");
        for dropped in ["big", "other", "KubeletHasSufficientMemory", "KubeletNotReady", "t1"] {
            assert!(!kept.contains(dropped), "{dropped} is not kept: {kept}");
        }
        assert_eq!(<NodeWire as kube::Resource>::plural(&()), "nodes");
        let odd = SlimNode::from_value(json!({ "status": { "conditions": "none" } }));
        assert_eq!(odd.ready(), &Ready::Unreported, "judged as no Ready condition");
    }

    #[test]
    fn a_node_decodes_into_typed_fields_and_anything_decodes() {
        let text = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": "edge-1", "resourceVersion": "42", "uid": "u",
                "labels": { "node-restriction.kubernetes.io/netd-role": "cloud",
                            "alibabacloud.com/is-edge-worker": "false", "kubernetes.io/os": "linux" },
                "annotations": {
                    "netd.alibabacloud.com/addon-taint-added": "true",
                    "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:00:01\"}",
                    "node.openyurt.io/autonomy-duration": "90s",
                    "node.alpha.kubernetes.io/ttl": "0",
                },
                "managedFields": [{ "manager": "kubelet", "fieldsV1": { "f:status": {} } }],
            },
            "spec": { "podCIDR": "10.244.7.0/24", "podCIDRs": ["10.244.7.0/24", "fd00::/64", 7],
                      "taints": [{ "key": "x", "effect": "NoExecute", "timeAdded": "t" }] },
            "status": {
                "addresses": [{ "type": "InternalIP", "address": "10.0.5.7" }, { "type": "Hostname", "address": "edge-1" },
                              { "address": "10.0.0.9" }],
                "conditions": [{ "type": "Ready", "status": "True", "message": "kubelet is posting ready status" }],
                "images": [{ "names": ["x"], "sizeBytes": 1 }],
            },
        })
        .to_string();
        let wire: NodeWire = serde_json::from_str(&text).unwrap();
        assert_eq!(kube::ResourceExt::resource_version(&wire).as_deref(), Some("42"), "what the watcher resumes from");
        let node = wire.into_slim();
        assert_eq!(
            (node.name(), node.resource_version(), node.role_label()),
            (Some("edge-1"), Some("42"), Some("cloud"))
        );
        assert_eq!((node.edge_worker_label(), node.tainted_by_us()), (Some(false), true));
        assert_eq!(node.vtep_mac(), Some("0e:00:00:00:00:01".parse().unwrap()));
        assert_eq!(node.autonomy_annotation("node.openyurt.io/autonomy-duration"), Some("90s"));
        assert_eq!(node.autonomy_annotation("node.alpha.kubernetes.io/ttl"), None);
        assert_eq!(node.pod_cidr(), Some("10.244.7.0/24".parse().unwrap()));
        assert_eq!(
            node.pod_cidrs(),
            [
                PodCidr::Net("10.244.7.0/24".parse().unwrap()),
                PodCidr::Net("fd00::/64".parse().unwrap()),
                PodCidr::NotCidr("7".into())
            ]
        );
        assert_eq!(
            serde_json::to_value(node.taints()).unwrap(),
            json!([{ "key": "x", "effect": "NoExecute", "timeAdded": "t" }])
        );
        assert!(!node.has_addon_taint());
        assert_eq!(
            node.addresses(),
            [
                NodeAddress { kind: AddressType::InternalIP, address: Address::Ip("10.0.5.7".parse().unwrap()) },
                NodeAddress {
                    kind: AddressType::Hostname,
                    address: Address::NotIp(r#"{"address":"edge-1","type":"Hostname"}"#.into())
                },
            ],
            "an address without a type is never read"
        );
        assert_eq!(node.ready(), &Ready::True);
        // Any JSON decodes (an object written behind the API server's
        // back must not fail a whole list page).
        for odd in ["7", "[]", "null", r#"{"metadata":{"name":7,"labels":"x"},"spec":[]}"#] {
            let node = serde_json::from_str::<NodeWire>(odd).unwrap().into_slim();
            assert_eq!(node, SlimNode::default(), "{odd}");
        }
        let odd_label = SlimNode::from_value(
            json!({ "metadata": { "labels": { "node-restriction.kubernetes.io/netd-role": 1 } } }),
        );
        assert_eq!(
            (odd_label.role_label(), odd_label.role_label_value()),
            (None, Some(&LabelValue::NotText("1".into())))
        );
    }

    #[test]
    fn the_slim_node_stays_small() {
        // A bench node (two addresses, one pod CIDR, Ready) is this plus
        // about 250 bytes on the heap; as JSON objects it was 3–4 KiB.
        assert!(std::mem::size_of::<SlimNode>() <= 144, "{}", std::mem::size_of::<SlimNode>());
        assert!(std::mem::size_of::<NodeAddress>() <= 48);
        assert!(std::mem::size_of::<Ready>() <= 16, "the details of a Ready that is not True are boxed");
    }
}
