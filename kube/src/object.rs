//! Objects as netd reads them: decoded leniently and cut down to the
//! fields it uses.
//!
//! `kube_runtime::watcher` decodes each list page and each watch event
//! into the watched type. With k8s-openapi's `Node` or `Pod` a single
//! object whose fields do not fit (a required field missing, a wrong type
//! — possible with an object written to etcd behind the API server's back,
//! which the API server serves without validating it) fails the whole page,
//! the watcher retries the same list forever and the peer set or pod list
//! is never seen again. An [`Object`] decodes from any JSON object: the
//! API's identity for the object (`kind`, `apiVersion`, resource path)
//! comes from the k8s-openapi type named by its [`Kind`], the metadata the
//! watcher needs is taken when it has the right type, and only the JSON
//! fields the [`Kind`] names are kept, so judging them (and logging why
//! one is unusable) is left to the consumer.
//!
//! Keeping only those fields, flat, is also what keeps memory flat with
//! 1 000 nodes: a Node's `status.images`, its other annotations and any
//! object's `managedFields` are dropped as each object is decoded, and the
//! kept fields are a short list of (pointer, value) pairs rather than a
//! JSON tree (each JSON object level is a B-tree node of ~0.6 KiB).

use std::borrow::Cow;
use std::fmt::Debug;
use std::marker::PhantomData;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::Value;

/// Which API resource an [`Object`] is and which fields of it are kept.
pub trait Kind: Clone + Debug + Send + Sync + 'static {
    /// The k8s-openapi type whose API identity (group, version, kind,
    /// resource, scope) the objects have.
    type Api: k8s_openapi::Resource;
    /// JSON pointers (RFC 6901: `/` in a key is `~1`) of the fields kept,
    /// e.g. `/spec/podCIDR`; none may lie inside another.
    const KEEP: &'static [&'static str];
}

/// Node fields the peer watch reads: name, flannel's and the autonomy
/// annotations, pod CIDRs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLease;

impl Kind for NodeLease {
    type Api = k8s_openapi::api::core::v1::Node;
    // The annotation keys of `model::flannel` and `model::autonomy`
    // (checked by a test).
    const KEEP: &'static [&'static str] = &[
        "/metadata/name",
        "/metadata/annotations/flannel.alpha.coreos.com~1backend-type",
        "/metadata/annotations/flannel.alpha.coreos.com~1backend-data",
        "/metadata/annotations/flannel.alpha.coreos.com~1public-ip",
        "/metadata/annotations/flannel.alpha.coreos.com~1kube-subnet-manager",
        "/metadata/annotations/node.beta.alibabacloud.com~1autonomy",
        "/metadata/annotations/node.beta.openyurt.io~1autonomy",
        "/metadata/annotations/node.openyurt.io~1autonomy-duration",
        // `model::roles::LABEL_ROLE`: the tunnel server never routes a
        // cloud node's address or subnet to an agent.
        "/metadata/labels/node-restriction.kubernetes.io~1netd-role",
        "/spec/podCIDR",
        "/spec/podCIDRs",
    ];
}

/// Node fields publishing our own lease reads: [`NodeLease`]'s and the
/// node's conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeWithConditions;

impl Kind for NodeWithConditions {
    type Api = k8s_openapi::api::core::v1::Node;
    const KEEP: &'static [&'static str] =
        &["/metadata/name", "/metadata/annotations", "/spec/podCIDR", "/spec/podCIDRs", "/status/conditions"];
}

/// Pod fields the pod watch reads: identity, node, phase, deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodPlacement;

impl Kind for PodPlacement {
    type Api = k8s_openapi::api::core::v1::Pod;
    const KEEP: &'static [&'static str] = &[
        "/metadata/name",
        "/metadata/namespace",
        "/metadata/uid",
        "/metadata/deletionTimestamp",
        "/spec/nodeName",
        "/status/phase",
    ];
}

/// Node fields the tunnel DNAT configuration reads: name, the trusted role
/// label (SPEC §3b, [`netd_model::roles`]), pod CIDRs and addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeEdgeRole;

impl Kind for NodeEdgeRole {
    type Api = k8s_openapi::api::core::v1::Node;
    // The label key is `model::roles::LABEL_ROLE` (checked by a test in
    // `controller::tunnel_config`).
    const KEEP: &'static [&'static str] = &[
        "/metadata/name",
        "/metadata/labels/node-restriction.kubernetes.io~1netd-role",
        "/spec/podCIDR",
        "/spec/podCIDRs",
        "/status/addresses",
    ];
}

/// ConfigMap fields a configuration watch reads: identity and `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigMapData;

impl Kind for ConfigMapData {
    type Api = k8s_openapi::api::core::v1::ConfigMap;
    const KEEP: &'static [&'static str] = &["/metadata/name", "/metadata/namespace", "/data"];
}

/// Node fields the toleration controller reads: name, the autonomy
/// annotations and the trusted role label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAutonomy;

impl Kind for NodeAutonomy {
    type Api = k8s_openapi::api::core::v1::Node;
    // The keys of `model::autonomy` and `model::roles::LABEL_ROLE` (checked
    // by a test).
    const KEEP: &'static [&'static str] = &[
        "/metadata/name",
        "/metadata/labels/node-restriction.kubernetes.io~1netd-role",
        "/metadata/annotations/node.beta.alibabacloud.com~1autonomy",
        "/metadata/annotations/node.beta.openyurt.io~1autonomy",
        "/metadata/annotations/node.openyurt.io~1autonomy-duration",
    ];
}

/// Pod fields the toleration controller reads: identity, owners, the
/// mirror-pod annotation and netd's saved tolerations, node, tolerations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodTolerations;

impl Kind for PodTolerations {
    type Api = k8s_openapi::api::core::v1::Pod;
    // The annotation keys of `controller::tolerations` (checked by a test).
    const KEEP: &'static [&'static str] = &[
        "/metadata/name",
        "/metadata/namespace",
        "/metadata/uid",
        "/metadata/deletionTimestamp",
        "/metadata/ownerReferences",
        "/metadata/annotations/kubernetes.io~1config.mirror",
        "/metadata/annotations/netd.io~1saved-tolerations",
        "/spec/nodeName",
        "/spec/tolerations",
    ];
}

/// Pod fields a rollout reads: identity, owners, the DaemonSet revision
/// label, node (or, before it is bound, the node its affinity names), and
/// readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRevision;

impl Kind for PodRevision {
    type Api = k8s_openapi::api::core::v1::Pod;
    const KEEP: &'static [&'static str] = &[
        "/metadata/name",
        "/metadata/namespace",
        "/metadata/uid",
        "/metadata/deletionTimestamp",
        "/metadata/ownerReferences",
        "/metadata/labels/controller-revision-hash",
        "/spec/nodeName",
        "/spec/affinity/nodeAffinity",
        "/status/phase",
        "/status/conditions",
        "/status/containerStatuses",
    ];
}

/// Node fields a rollout reads: name, the autonomy annotations, conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeReadiness;

impl Kind for NodeReadiness {
    type Api = k8s_openapi::api::core::v1::Node;
    const KEEP: &'static [&'static str] = &[
        "/metadata/name",
        "/metadata/annotations/node.beta.alibabacloud.com~1autonomy",
        "/metadata/annotations/node.beta.openyurt.io~1autonomy",
        "/metadata/annotations/node.openyurt.io~1autonomy-duration",
        "/status/conditions",
    ];
}

/// Node fields the rollout pre-check reads: name and the images the
/// kubelet reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeImages;

impl Kind for NodeImages {
    type Api = k8s_openapi::api::core::v1::Node;
    const KEEP: &'static [&'static str] = &["/metadata/name", "/status/images"];
}

/// An object of kind `K`, decoded from any JSON; see the module docs.
#[derive(Clone, Debug)]
pub struct Object<K: Kind> {
    metadata: ObjectMeta,
    /// The fields of `K::KEEP` that the object has, by pointer.
    fields: Box<[(&'static str, Value)]>,
    kind: PhantomData<K>,
}

impl<K: Kind> Object<K> {
    /// The object from its JSON, keeping `K::KEEP`.
    pub fn from_value(mut value: Value) -> Self {
        let text = |pointer: &str| value.pointer(pointer).and_then(Value::as_str).map(String::from);
        // Only what the watcher and logs use, and only when it is a string.
        let metadata = ObjectMeta {
            name: text("/metadata/name"),
            namespace: text("/metadata/namespace"),
            uid: text("/metadata/uid"),
            resource_version: text("/metadata/resourceVersion"),
            ..ObjectMeta::default()
        };
        let fields = K::KEEP
            .iter()
            .filter_map(|pointer| value.pointer_mut(pointer).map(|found| (*pointer, found.take())))
            .collect();
        Self { metadata, fields, kind: PhantomData }
    }

    /// A kept field by JSON pointer: one of `K::KEEP`, or a pointer inside
    /// one (`/metadata/annotations/<key>` when the annotations are kept).
    pub fn get(&self, pointer: &str) -> Option<&Value> {
        self.fields.iter().find_map(|(kept, value)| {
            let rest = pointer.strip_prefix(kept)?;
            if rest.is_empty() {
                Some(value)
            } else if rest.starts_with('/') {
                value.pointer(rest)
            } else {
                None
            }
        })
    }

    /// Annotation `key` (unescaped, e.g. `flannel.alpha.coreos.com/public-ip`),
    /// when kept.
    pub fn annotation(&self, key: &str) -> Option<&Value> {
        self.get(&format!("/metadata/annotations/{}", key.replace('~', "~0").replace('/', "~1")))
    }

    /// `metadata.name`, when it is a string.
    pub fn name(&self) -> Option<&str> {
        self.metadata.name.as_deref()
    }

    /// `metadata.namespace`, when it is a string.
    pub fn namespace(&self) -> Option<&str> {
        self.metadata.namespace.as_deref()
    }

    /// `metadata.resourceVersion`, when it is a string.
    pub fn resource_version(&self) -> Option<&str> {
        self.metadata.resource_version.as_deref()
    }

    /// `metadata.uid`, when it is a string.
    pub fn uid(&self) -> Option<&str> {
        self.metadata.uid.as_deref()
    }
}

impl<'de, K: Kind> Deserialize<'de> for Object<K> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Any JSON value decodes; judging it is the consumer's job.
        Value::deserialize(deserializer).map(Self::from_value)
    }
}

impl<K: Kind> kube::Resource for Object<K> {
    type DynamicType = ();
    type Scope = <K::Api as k8s_openapi::Resource>::Scope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<K::Api as k8s_openapi::Resource>::KIND)
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<K::Api as k8s_openapi::Resource>::GROUP)
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<K::Api as k8s_openapi::Resource>::VERSION)
    }

    fn api_version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<K::Api as k8s_openapi::Resource>::API_VERSION)
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<K::Api as k8s_openapi::Resource>::URL_PATH_SEGMENT)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Fields of a node's heartbeat, the Lease `kube-node-lease/<node>` its
/// kubelet renews: what `netd-autonomy status` reports of the node's
/// silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeHeartbeatLease;

impl Kind for NodeHeartbeatLease {
    type Api = k8s_openapi::api::coordination::v1::Lease;
    const KEEP: &'static [&'static str] = &["/metadata/name", "/spec/renewTime", "/spec/leaseDurationSeconds"];
}

/// Fields of a tunnel server replica's announcement, a Lease
/// `kube-system/netd-tunnel-replica-<id>` (`netd_registry::replicas`):
/// its name, its holder (the exact replica id) and the record JSON in
/// annotation `netd.io/tunnel-replica`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaLease;

impl Kind for ReplicaLease {
    type Api = k8s_openapi::api::coordination::v1::Lease;
    // The annotation key is `netd_registry::replicas::REPLICA_LABEL` (this
    // crate sits below the registry; a registry test checks they agree).
    const KEEP: &'static [&'static str] =
        &["/metadata/name", "/metadata/annotations/netd.io~1tunnel-replica", "/spec/holderIdentity"];
}

#[cfg(test)]
mod tests {
    use super::*;
    use netd_model::{autonomy, flannel};
    use serde_json::json;

    #[test]
    fn keeps_only_the_named_fields_and_decodes_anything() {
        let node: Object<NodeLease> = serde_json::from_value(json!({
            "metadata": { "name": "a", "resourceVersion": "7",
                          "annotations": { "flannel.alpha.coreos.com/public-ip": "192.0.2.1", "x": "y" },
                          "managedFields": [{ "manager": "kubelet" }] },
            "spec": { "podCIDR": "10.244.1.0/24", "taints": [] },
            "status": { "images": [{ "names": ["big"] }] },
        }))
        .unwrap();
        assert_eq!(node.name(), Some("a"));
        assert_eq!(node.resource_version(), Some("7"));
        assert_eq!(node.annotation(flannel::ANNOTATION_PUBLIC_IP), Some(&json!("192.0.2.1")));
        assert_eq!(node.annotation("x"), None, "annotations netd does not read are dropped");
        assert_eq!(node.get("/spec/podCIDR"), Some(&json!("10.244.1.0/24")));
        assert_eq!(
            (node.get("/spec/taints"), node.get("/status/images"), node.get("/spec/podCIDRs")),
            (None, None, None)
        );
        let kept: Vec<&str> = node.fields.iter().map(|(p, _)| *p).collect();
        assert_eq!(kept.len(), 3, "{kept:?}");

        // Whole subtrees are kept where the kind says so, and read inside.
        let full: Object<NodeWithConditions> = serde_json::from_value(json!({
            "metadata": { "annotations": { "a/b": "1" } }, "status": { "conditions": [{ "type": "Ready" }] },
        }))
        .unwrap();
        assert_eq!(full.annotation("a/b"), Some(&json!("1")));
        assert_eq!(full.get("/status/conditions/0/type"), Some(&json!("Ready")));
        assert_eq!(full.get("/status/conditionsX"), None);

        // Wrong types and non-objects still decode; nothing is kept of them.
        let odd: Object<PodPlacement> =
            serde_json::from_value(json!({ "metadata": { "name": 5 }, "spec": 3 })).unwrap();
        assert_eq!((odd.name(), odd.get("/metadata/name"), odd.get("/spec/nodeName")), (None, Some(&json!(5)), None));
        let scalar: Object<PodPlacement> = serde_json::from_value(json!("garbage")).unwrap();
        assert!(scalar.fields.is_empty());
        assert_eq!(<Object<PodPlacement> as kube::Resource>::plural(&()), "pods");
    }

    #[test]
    fn the_node_lease_keeps_exactly_the_annotations_netd_reads() {
        let keys = [
            flannel::ANNOTATION_BACKEND_TYPE,
            flannel::ANNOTATION_BACKEND_DATA,
            flannel::ANNOTATION_PUBLIC_IP,
            flannel::ANNOTATION_KUBE_SUBNET_MANAGER,
            autonomy::ANNOTATION_AUTONOMY,
            autonomy::ANNOTATION_AUTONOMY_OPENYURT,
            autonomy::ANNOTATION_AUTONOMY_DURATION,
        ];
        let annotations: serde_json::Map<String, Value> = keys.iter().map(|k| (k.to_string(), json!(k))).collect();
        let node = Object::<NodeLease>::from_value(json!({ "metadata": { "annotations": annotations } }));
        for key in keys {
            assert_eq!(node.annotation(key), Some(&json!(key)), "{key}");
        }
    }
}
