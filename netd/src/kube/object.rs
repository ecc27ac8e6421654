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
//! one is unusable) is left to the consumer. Keeping only those fields is
//! also what keeps memory flat: a Node's `status.images` and any object's
//! `managedFields` are dropped as each object is decoded.

use std::borrow::Cow;
use std::fmt::Debug;
use std::marker::PhantomData;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::{Map, Value};

/// Which API resource an [`Object`] is and which fields of it are kept.
pub trait Kind: Clone + Debug + Send + Sync + 'static {
    /// The k8s-openapi type whose API identity (group, version, kind,
    /// resource, scope) the objects have.
    type Api: k8s_openapi::Resource;
    /// JSON pointers of the fields kept (e.g. `/spec/podCIDR`); `""` keeps
    /// the whole object.
    const KEEP: &'static [&'static str];
}

/// Node fields the peer watch reads: name, annotations and pod CIDRs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLease;

impl Kind for NodeLease {
    type Api = k8s_openapi::api::core::v1::Node;
    const KEEP: &'static [&'static str] =
        &["/metadata/name", "/metadata/annotations", "/spec/podCIDR", "/spec/podCIDRs"];
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

/// An object of kind `K`, decoded from any JSON; see the module docs.
#[derive(Clone, Debug)]
pub struct Object<K: Kind> {
    metadata: ObjectMeta,
    fields: Value,
    kind: PhantomData<K>,
}

impl<K: Kind> Object<K> {
    /// The object from its JSON, keeping `K::KEEP`.
    pub fn from_value(value: Value) -> Self {
        let text = |pointer: &str| value.pointer(pointer).and_then(Value::as_str).map(String::from);
        // Only what the watcher and logs use, and only when it is a string.
        let metadata = ObjectMeta {
            name: text("/metadata/name"),
            namespace: text("/metadata/namespace"),
            uid: text("/metadata/uid"),
            resource_version: text("/metadata/resourceVersion"),
            ..ObjectMeta::default()
        };
        let fields = if K::KEEP.contains(&"") { value } else { project(&value, K::KEEP) };
        Self { metadata, fields, kind: PhantomData }
    }

    /// The kept fields, at their places in the object (absent ones absent).
    pub fn value(&self) -> &Value {
        &self.fields
    }

    /// A kept field by JSON pointer.
    pub fn pointer(&self, pointer: &str) -> Option<&Value> {
        self.fields.pointer(pointer)
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
}

/// A copy of `value` holding only the fields at `pointers`.
fn project(value: &Value, pointers: &[&str]) -> Value {
    let mut out = Value::Object(Map::new());
    for pointer in pointers {
        let Some(found) = value.pointer(pointer) else { continue };
        let mut at = &mut out;
        let mut parts = pointer.split('/').skip(1).peekable();
        while let Some(part) = parts.next() {
            // JSON pointer escapes (`~1` is `/`, `~0` is `~`).
            let key = part.replace("~1", "/").replace("~0", "~");
            let Value::Object(map) = at else { break };
            if parts.peek().is_none() {
                map.insert(key, found.clone());
                break;
            }
            at = map.entry(key).or_insert_with(|| Value::Object(Map::new()));
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_only_the_named_fields_and_decodes_anything() {
        let node: Object<NodeLease> = serde_json::from_value(json!({
            "metadata": { "name": "a", "resourceVersion": "7", "annotations": { "x": "y" },
                          "managedFields": [{ "manager": "kubelet" }] },
            "spec": { "podCIDR": "10.244.1.0/24", "taints": [] },
            "status": { "images": [{ "names": ["big"] }] },
        }))
        .unwrap();
        assert_eq!(node.name(), Some("a"));
        assert_eq!(node.resource_version(), Some("7"));
        assert_eq!(
            node.value(),
            &json!({ "metadata": { "name": "a", "annotations": { "x": "y" } }, "spec": { "podCIDR": "10.244.1.0/24" } })
        );
        // Wrong types and non-objects still decode; nothing is kept of them.
        let odd: Object<PodPlacement> =
            serde_json::from_value(json!({ "metadata": { "name": 5 }, "spec": 3 })).unwrap();
        assert_eq!((odd.name(), odd.pointer("/spec/nodeName")), (None, None));
        let scalar: Object<PodPlacement> = serde_json::from_value(json!("garbage")).unwrap();
        assert_eq!(scalar.value(), &json!({}));
        assert_eq!(<Object<PodPlacement> as kube::Resource>::plural(&()), "pods");
    }
}
