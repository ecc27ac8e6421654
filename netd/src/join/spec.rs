//! The node-spec `netd-join` takes, exactly as `edgeadm join --node-spec`
//! takes it (SPEC §4), decoded the way Go's `encoding/json` matches keys
//! (case-insensitively: the product's own docs write both `enableIptables`
//! and `enableiptables`) — but strict where edgeadm is lax: an unknown key
//! is an error naming it and the nearest known key; a wrong type or value
//! names the field, what was expected and what came.

use std::collections::BTreeMap;

use serde_json::Value;

/// The keys, as edgeadm spells them.
pub const KEYS: [&str; 9] = [
    "flannelface",
    "enableIptables",
    "quiet",
    "manageRuntime",
    "nodeNameOverride",
    "allowedClusterAddons",
    "gpuVersion",
    "labels",
    "annotations",
];

/// Node label every joined edge node carries (SPEC §4).
pub use crate::model::roles::LABEL_EDGE_WORKER;
/// Node label carrying `gpuVersion`.
pub const LABEL_GPU_VERSION: &str = "alibabacloud.com/gpu-version";
/// Node annotation recording `allowedClusterAddons` for the addon installer
/// (comma-separated).
pub const ANNOTATION_ADDONS: &str = "alibabacloud.com/allowed-cluster-addons";

/// A node-spec that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Not JSON, or not an object.
    #[error("node-spec is not a JSON object: {0}")]
    NotJson(String),
    /// A key no node-spec has.
    #[error("node-spec: unknown key {key:?}{}", suggestion_text(.suggestion))]
    UnknownKey {
        /// The key as given.
        key: String,
        /// The nearest known key, when one is near.
        suggestion: Option<&'static str>,
    },
    /// The same key twice (spellings differing in case count as one).
    #[error("node-spec: {field} is given twice (as {first:?} and {second:?})")]
    Duplicate {
        /// The field.
        field: &'static str,
        /// First spelling.
        first: String,
        /// Second spelling.
        second: String,
    },
    /// A value of the wrong type or out of range.
    #[error("node-spec: {field}: expected {expected}, got {got}")]
    Invalid {
        /// The field (with the entry for maps and lists: `labels["a/b"]`).
        field: String,
        /// What it must be.
        expected: String,
        /// What came (JSON, shortened).
        got: String,
    },
}

fn suggestion_text(suggestion: &Option<&'static str>) -> String {
    suggestion.map(|s| format!(" (did you mean {s:?}?)")).unwrap_or_default()
}

/// How the node's name is chosen (`nodeNameOverride`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NodeNameRule {
    /// `""`: the host name.
    #[default]
    Hostname,
    /// `"*"` or `"*.sfx"`: 6 random characters, then the suffix (with its
    /// dot) if any. Drawn once; a re-run keeps the name it drew.
    Random {
        /// `.sfx`, or empty.
        suffix: String,
    },
    /// Any other value: exactly this name.
    Exact(String),
}

/// The GPU models edgeadm knows (`gpuVersion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuVersion {
    /// `Nvidia_Tesla_T4`.
    NvidiaTeslaT4,
    /// `Nvidia_Tesla_P4`.
    NvidiaTeslaP4,
    /// `Nvidia_Tesla_P100`.
    NvidiaTeslaP100,
}

const GPU_VERSIONS: [(&str, GpuVersion); 3] = [
    ("Nvidia_Tesla_T4", GpuVersion::NvidiaTeslaT4),
    ("Nvidia_Tesla_P4", GpuVersion::NvidiaTeslaP4),
    ("Nvidia_Tesla_P100", GpuVersion::NvidiaTeslaP100),
];

impl GpuVersion {
    /// As edgeadm spells it (also the label value).
    pub fn as_str(self) -> &'static str {
        GPU_VERSIONS.iter().find(|(_, v)| *v == self).map_or("", |(name, _)| name)
    }
}

/// A validated node-spec.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeSpec {
    /// `flannelface`: the VXLAN underlay interface; `None` = the
    /// default-route interface.
    pub flannel_iface: Option<String>,
    /// `enableIptables`: flannel's masquerade rules.
    pub enable_iptables: bool,
    /// `quiet`: never prompt.
    pub quiet: bool,
    /// `manageRuntime`: check the container runtime and say what is missing.
    pub manage_runtime: bool,
    /// `nodeNameOverride`.
    pub node_name: NodeNameRule,
    /// `allowedClusterAddons`, in the order given.
    pub allowed_cluster_addons: Vec<String>,
    /// `gpuVersion`; `None` for `""`.
    pub gpu: Option<GpuVersion>,
    /// `labels`, added to the node.
    pub labels: BTreeMap<String, String>,
    /// `annotations`, added to the node.
    pub annotations: BTreeMap<String, String>,
}

fn shown(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 60 {
        format!("{}…", text.chars().take(60).collect::<String>())
    } else {
        text
    }
}

fn invalid(field: impl Into<String>, expected: impl Into<String>, got: &Value) -> SpecError {
    SpecError::Invalid { field: field.into(), expected: expected.into(), got: shown(got) }
}

/// Levenshtein distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substituted = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

fn nearest<'a>(given: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let given = given.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (distance(&given, &c.to_ascii_lowercase()), *c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// A DNS-1123 subdomain (a Kubernetes node name, a label prefix).
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// A DNS-1123 label.
pub fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// A label value, or the name part of a label/annotation key: ≤ 63
/// characters of `[A-Za-z0-9_.-]`, alphanumeric at both ends.
fn is_qualified_part(name: &str, allow_empty: bool) -> bool {
    if name.is_empty() {
        return allow_empty;
    }
    let bytes = name.as_bytes();
    name.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn is_qualified_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_qualified_part(name, false),
        None => is_qualified_part(key, false),
    }
}

/// Label prefixes a node may not set on itself: the NodeRestriction
/// admission plugin refuses them, so a join that tried would fail halfway.
fn restricted_by_node_restriction(key: &str) -> bool {
    let Some((prefix, _)) = key.split_once('/') else { return false };
    let reserved = prefix == "kubernetes.io"
        || prefix.ends_with(".kubernetes.io")
        || prefix == "k8s.io"
        || prefix.ends_with(".k8s.io");
    let kubelet_may = [
        "kubernetes.io/hostname",
        "kubernetes.io/arch",
        "kubernetes.io/os",
        "beta.kubernetes.io/arch",
        "beta.kubernetes.io/os",
        "beta.kubernetes.io/instance-type",
        "node.kubernetes.io/instance-type",
        "failure-domain.beta.kubernetes.io/region",
        "failure-domain.beta.kubernetes.io/zone",
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
    ];
    let allowed_prefix = matches!(prefix, "kubelet.kubernetes.io" | "node.kubernetes.io")
        || prefix.ends_with(".kubelet.kubernetes.io")
        || prefix.ends_with(".node.kubernetes.io");
    reserved && !allowed_prefix && !kubelet_may.contains(&key)
}

fn boolean(field: &str, value: &Value) -> Result<bool, SpecError> {
    value.as_bool().ok_or_else(|| invalid(field, "true or false", value))
}

fn string<'a>(field: &str, value: &'a Value) -> Result<&'a str, SpecError> {
    value.as_str().ok_or_else(|| invalid(field, "a string", value))
}

fn iface(value: &Value) -> Result<Option<String>, SpecError> {
    let name = string("flannelface", value)?;
    if name.is_empty() {
        return Ok(None);
    }
    let ok = name.len() <= 15 && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if !ok || name == "." || name == ".." {
        return Err(invalid("flannelface", "an interface name (1-15 bytes, no '/', ':' or spaces)", value));
    }
    Ok(Some(name.to_string()))
}

fn node_name(value: &Value) -> Result<NodeNameRule, SpecError> {
    const EXPECTED: &str = "\"\" (the host name), \"*\" (6 random characters), \"*.suffix\" or a node name \
                            (lowercase letters, digits, '-' and '.', at most 253)";
    let text = string("nodeNameOverride", value)?;
    let rule = match text {
        "" => return Ok(NodeNameRule::Hostname),
        "*" => NodeNameRule::Random { suffix: String::new() },
        _ => match text.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => NodeNameRule::Random { suffix: suffix.to_string() },
            Some(_) => return Err(invalid("nodeNameOverride", EXPECTED, value)),
            None => NodeNameRule::Exact(text.to_string()),
        },
    };
    // The name this rule can give must be valid: check it with a stand-in draw.
    let sample = match &rule {
        NodeNameRule::Random { suffix } => format!("abc123{suffix}"),
        NodeNameRule::Exact(name) => name.clone(),
        NodeNameRule::Hostname => String::new(),
    };
    if !is_dns_subdomain(&sample) {
        return Err(invalid("nodeNameOverride", EXPECTED, value));
    }
    Ok(rule)
}

fn addons(value: &Value) -> Result<Vec<String>, SpecError> {
    let items = value.as_array().ok_or_else(|| invalid("allowedClusterAddons", "a list of addon names", value))?;
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("allowedClusterAddons[{i}]");
        let name = string(&field, item)?;
        if !is_dns_label(name) {
            return Err(invalid(field, "an addon name such as \"kube-proxy\", \"flannel\" or \"coredns\"", item));
        }
        if out.iter().any(|seen| seen == name) {
            return Err(invalid(field, "each addon once", item));
        }
        out.push(name.to_string());
    }
    Ok(out)
}

fn gpu(value: &Value) -> Result<Option<GpuVersion>, SpecError> {
    let text = string("gpuVersion", value)?;
    if text.is_empty() {
        return Ok(None);
    }
    if let Some((_, version)) = GPU_VERSIONS.iter().find(|(name, _)| *name == text) {
        return Ok(Some(*version));
    }
    let names: Vec<&str> = GPU_VERSIONS.iter().map(|(name, _)| *name).collect();
    let hint = nearest(text, &names).map(|n| format!(" (did you mean {n:?}?)")).unwrap_or_default();
    Err(invalid("gpuVersion", format!("\"\" or one of {}{hint}", names.join(", ")), value))
}

/// Keys that join itself sets: a spec may not set them another way.
const JOIN_OWNED: [&str; 3] = [LABEL_EDGE_WORKER, LABEL_GPU_VERSION, ANNOTATION_ADDONS];

fn string_map(field: &str, value: &Value, labels: bool) -> Result<BTreeMap<String, String>, SpecError> {
    let object = value.as_object().ok_or_else(|| invalid(field, "an object of string keys to string values", value))?;
    let mut out = BTreeMap::new();
    for (key, item) in object {
        let entry = format!("{field}[{key:?}]");
        if !is_qualified_key(key) {
            let expected = "a key [prefix/]name: prefix a DNS subdomain, name at most 63 of [A-Za-z0-9_.-] \
                            starting and ending alphanumeric";
            return Err(invalid(entry, expected, &Value::String(key.clone())));
        }
        if JOIN_OWNED.contains(&key.as_str()) {
            return Err(invalid(entry, "a key netd-join does not set itself", &Value::String(key.clone())));
        }
        if labels && restricted_by_node_restriction(key) {
            let expected = "a label a node may set on itself (NodeRestriction refuses kubernetes.io and k8s.io \
                            prefixes other than kubelet's own)";
            return Err(invalid(entry, expected, &Value::String(key.clone())));
        }
        let text = string(&entry, item)?;
        if labels && !is_qualified_part(text, true) {
            return Err(invalid(entry, "a label value: at most 63 of [A-Za-z0-9_.-], alphanumeric at both ends", item));
        }
        out.insert(key.clone(), text.to_string());
    }
    Ok(out)
}

impl NodeSpec {
    /// Parses and checks a node-spec. `null` for a key means "not given",
    /// as Go's decoder treats it.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let value: Value = serde_json::from_str(text).map_err(|e| SpecError::NotJson(e.to_string()))?;
        let Value::Object(object) = value else {
            return Err(SpecError::NotJson(format!("the top level is {}", shown(&value))));
        };
        let mut seen: BTreeMap<&'static str, String> = BTreeMap::new();
        let mut spec = NodeSpec::default();
        for (key, value) in &object {
            let Some(field) = KEYS.iter().copied().find(|k| k.eq_ignore_ascii_case(key)) else {
                return Err(SpecError::UnknownKey { key: key.clone(), suggestion: nearest(key, &KEYS) });
            };
            if let Some(first) = seen.insert(field, key.clone()) {
                return Err(SpecError::Duplicate { field, first, second: key.clone() });
            }
            if value.is_null() {
                continue;
            }
            match field {
                "flannelface" => spec.flannel_iface = iface(value)?,
                "enableIptables" => spec.enable_iptables = boolean(field, value)?,
                "quiet" => spec.quiet = boolean(field, value)?,
                "manageRuntime" => spec.manage_runtime = boolean(field, value)?,
                "nodeNameOverride" => spec.node_name = node_name(value)?,
                "allowedClusterAddons" => spec.allowed_cluster_addons = addons(value)?,
                "gpuVersion" => spec.gpu = gpu(value)?,
                "labels" => spec.labels = string_map(field, value, true)?,
                _ => spec.annotations = string_map(field, value, false)?,
            }
        }
        Ok(spec)
    }

    /// The labels join puts on the node: the spec's, the edge-worker label
    /// and the GPU label.
    pub fn node_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        labels.insert(LABEL_EDGE_WORKER.into(), "true".into());
        if let Some(gpu) = self.gpu {
            labels.insert(LABEL_GPU_VERSION.into(), gpu.as_str().into());
        }
        labels
    }

    /// The annotations join puts on the node: the spec's and the allowed
    /// addons (when any).
    pub fn node_annotations(&self) -> BTreeMap<String, String> {
        let mut annotations = self.annotations.clone();
        if !self.allowed_cluster_addons.is_empty() {
            annotations.insert(ANNOTATION_ADDONS.into(), self.allowed_cluster_addons.join(","));
        }
        annotations
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_field_as_edgeadms_docs_write_it_with_either_casing() {
        let spec = NodeSpec::parse(
            r#"{"flannelface":"eth1","enableiptables":true,"Quiet":true,"manageRuntime":false,
                "nodeNameOverride":"*.edge","allowedClusterAddons":["kube-proxy","flannel","coredns"],
                "gpuVersion":"Nvidia_Tesla_T4","labels":{"site":"shop-17","example.com/rack":"r2"},
                "annotations":{"example.com/owner":"ops team: 24/7"}}"#,
        )
        .unwrap();
        assert_eq!(spec.flannel_iface.as_deref(), Some("eth1"));
        assert!(spec.enable_iptables && spec.quiet && !spec.manage_runtime);
        assert_eq!(spec.node_name, NodeNameRule::Random { suffix: ".edge".into() });
        assert_eq!(spec.allowed_cluster_addons, ["kube-proxy", "flannel", "coredns"]);
        assert_eq!(spec.gpu, Some(GpuVersion::NvidiaTeslaT4));
        let labels = spec.node_labels();
        assert_eq!(labels[LABEL_EDGE_WORKER], "true");
        assert_eq!(labels[LABEL_GPU_VERSION], "Nvidia_Tesla_T4");
        assert_eq!(labels["site"], "shop-17");
        assert_eq!(spec.node_annotations()[ANNOTATION_ADDONS], "kube-proxy,flannel,coredns");
        assert_eq!(spec.node_annotations()["example.com/owner"], "ops team: 24/7");
    }

    #[test]
    fn an_empty_spec_and_nulls_are_the_defaults() {
        let defaults = NodeSpec::parse("{}").unwrap();
        assert_eq!(defaults, NodeSpec::default());
        assert_eq!(defaults.node_name, NodeNameRule::Hostname);
        assert_eq!(NodeSpec::parse(r#"{"gpuVersion":null,"labels":null,"flannelface":""}"#).unwrap(), defaults);
        assert_eq!(
            NodeSpec::parse(r#"{"nodeNameOverride":"shop-17.edge"}"#).unwrap().node_name,
            NodeNameRule::Exact("shop-17.edge".into())
        );
        assert_eq!(
            NodeSpec::parse(r#"{"nodeNameOverride":"*"}"#).unwrap().node_name,
            NodeNameRule::Random { suffix: String::new() }
        );
    }

    /// Twenty malformed specs: each refused, the message naming the field
    /// (or key) and saying what was wrong.
    #[test]
    fn twenty_malformed_specs_each_name_their_field() {
        let cases: [(&str, &str); 20] = [
            (r#"{"flannelface":"eth0""#, "not a JSON object"),
            (r#"["eth0"]"#, "the top level is [\"eth0\"]"),
            (r#"{"flanelface":"eth0"}"#, r#"unknown key "flanelface" (did you mean "flannelface"?)"#),
            (r#"{"enableIpTable":true}"#, r#"unknown key "enableIpTable" (did you mean "enableIptables"?)"#),
            (r#"{"gpu":"x"}"#, r#"unknown key "gpu""#),
            (r#"{"quiet":true,"QUIET":false}"#, r#"quiet is given twice (as "QUIET" and "quiet")"#),
            (r#"{"enableIptables":"yes"}"#, r#"enableIptables: expected true or false, got "yes""#),
            (r#"{"quiet":1}"#, "quiet: expected true or false, got 1"),
            (r#"{"flannelface":7}"#, "flannelface: expected a string, got 7"),
            (r#"{"flannelface":"a-very-long-interface0"}"#, "flannelface: expected an interface name"),
            (r#"{"nodeNameOverride":"Shop_17"}"#, r#"nodeNameOverride: expected "" (the host name)"#),
            (r#"{"nodeNameOverride":"*edge"}"#, r#"got "*edge""#),
            (r#"{"nodeNameOverride":"*.Edge"}"#, r#"nodeNameOverride: expected"#),
            (r#"{"allowedClusterAddons":"coredns"}"#, "allowedClusterAddons: expected a list of addon names"),
            (r#"{"allowedClusterAddons":["coredns",3]}"#, "allowedClusterAddons[1]: expected a string, got 3"),
            (r#"{"allowedClusterAddons":["coredns","coredns"]}"#, "allowedClusterAddons[1]: expected each addon once"),
            (r#"{"gpuVersion":"Nvidia_Tesla_T5"}"#, r#"(did you mean "Nvidia_Tesla_T4"?), got "Nvidia_Tesla_T5""#),
            (r#"{"labels":{"site":7}}"#, r#"labels["site"]: expected a string, got 7"#),
            (r#"{"labels":{"node-role.kubernetes.io/master":""}}"#, "NodeRestriction refuses"),
            (r#"{"annotations":{"bad key!":"x"}}"#, r#"annotations["bad key!"]: expected a key [prefix/]name"#),
        ];
        for (spec, wanted) in cases {
            let err = NodeSpec::parse(spec).unwrap_err().to_string();
            assert!(err.contains(wanted), "{spec}\n  gave  {err}\n  wanted {wanted}");
        }
        // And what join sets itself cannot be set another way.
        let err = NodeSpec::parse(r#"{"labels":{"alibabacloud.com/is-edge-worker":"false"}}"#).unwrap_err();
        assert!(err.to_string().contains("a key netd-join does not set itself"), "{err}");
        // Nor the cloud role: NodeRestriction would refuse it, so join does first.
        let role = format!(r#"{{"labels":{{"{}":"cloud"}}}}"#, crate::model::roles::LABEL_ROLE);
        let err = NodeSpec::parse(&role).unwrap_err();
        assert!(err.to_string().contains("a label a node may set on itself"), "{err}");
        let err = NodeSpec::parse(r#"{"labels":{"site":"a value that is far too long for a label, over 63 chars!"}}"#);
        assert!(err.unwrap_err().to_string().contains("a label value"));
    }

    #[test]
    fn kubelets_own_labels_pass_node_restriction() {
        let spec = NodeSpec::parse(
            r#"{"labels":{"topology.kubernetes.io/zone":"z1","node.kubernetes.io/exclude-from-external-load-balancers":"true"}}"#,
        )
        .unwrap();
        assert_eq!(spec.labels.len(), 2);
    }
}
