//! What a request to the hub asks for: the API path taken apart as
//! kube-apiserver's own request-info parser does (group, version,
//! namespace, resource, name, subresource, verb), its query (selectors,
//! `watch`, `timeoutSeconds`, `continue`), and the label and field
//! selectors evaluated against cached JSON objects.
//!
//! Only what the hub needs to decide is parsed: whether the request is a
//! cacheable read (get, list, watch of a resource in [`CACHED_RESOURCES`],
//! or a discovery document), and which cached objects a list's scope
//! covers. Anything else is forwarded as it is.

use serde_json::Value;

/// Resources whose reads are cached (any API group): what a kubelet 1.20
/// and netd read. Pods are further confined to this node's own.
pub const CACHED_RESOURCES: &[&str] = &[
    "pods",
    "nodes",
    "services",
    "endpoints",
    "endpointslices",
    "configmaps",
    "secrets",
    "namespaces",
    "runtimeclasses",
    "csidrivers",
    "csinodes",
    "leases",
    "persistentvolumeclaims",
    "persistentvolumes",
];

/// The API resource a request is about: `(group, version, resource)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    /// API group, `""` for the core group.
    pub group: String,
    /// API version, e.g. `v1`.
    pub version: String,
    /// Plural resource name, e.g. `pods`.
    pub resource: String,
}

impl ResourceKey {
    /// The directory name of the resource in the cache:
    /// `core_v1_pods`, `coordination.k8s.io_v1_leases`.
    pub fn dir_name(&self) -> String {
        let group = if self.group.is_empty() { "core" } else { &self.group };
        format!("{group}_{}_{}", self.version, self.resource)
    }

    /// `apiVersion` of its objects: `v1`, `coordination.k8s.io/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

impl std::fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.group.is_empty() {
            f.write_str(&self.resource)
        } else {
            write!(f, "{}.{}", self.resource, self.group)
        }
    }
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `GET` of one named object.
    Get,
    /// `GET` of a collection.
    List,
    /// `GET` of a collection with `watch=true` (or the legacy `/watch/` path).
    Watch,
    /// Anything else: writes, subresources, proxies.
    Other,
}

/// A request for an API resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRequest {
    /// Which resource.
    pub key: ResourceKey,
    /// The namespace in the path, if any.
    pub namespace: Option<String>,
    /// The object name in the path, if any.
    pub name: Option<String>,
    /// A subresource (`status`, `log`, …), if any.
    pub subresource: Option<String>,
    /// What it does.
    pub verb: Verb,
    /// Its query.
    pub query: Query,
}

/// What the hub reads of a query string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// `fieldSelector`, parsed.
    pub fields: Selector,
    /// `labelSelector`, parsed.
    pub labels: Selector,
    /// `watch=true|1`.
    pub watch: bool,
    /// `timeoutSeconds`.
    pub timeout_seconds: Option<u64>,
    /// `continue` (a later page of a paginated list).
    pub continue_token: Option<String>,
    /// `sendInitialEvents=true` (a WatchList request).
    pub send_initial_events: bool,
}

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Requirement {
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value`.
    NotEquals(String, String),
    /// `key in (a,b)`.
    In(String, Vec<String>),
    /// `key notin (a,b)`.
    NotIn(String, Vec<String>),
    /// `key` (labels only).
    Exists(String),
    /// `!key` (labels only).
    DoesNotExist(String),
}

/// A parsed label or field selector: all requirements must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// Sorted, so that equal selectors compare and print equal.
    pub requirements: Vec<Requirement>,
}

/// Field selector keys the hub evaluates on cached objects.
pub const FIELD_KEYS: &[&str] = &["metadata.name", "metadata.namespace", "spec.nodeName"];

impl Selector {
    /// True when it selects everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The canonical text (requirements sorted).
    pub fn canonical(&self) -> String {
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match r {
                Requirement::Equals(k, v) => format!("{k}={v}"),
                Requirement::NotEquals(k, v) => format!("{k}!={v}"),
                Requirement::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            })
            .collect();
        parts.join(",")
    }

    /// The value this selector requires `key` to equal, if it does.
    pub fn required(&self, key: &str) -> Option<&str> {
        self.requirements.iter().find_map(|r| match r {
            Requirement::Equals(k, v) if k == key => Some(v.as_str()),
            _ => None,
        })
    }

    /// True when every field key it uses is one of [`FIELD_KEYS`] and it
    /// uses only (in)equality, i.e. the hub can evaluate it.
    pub fn fields_supported(&self) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, _) | Requirement::NotEquals(k, _) => FIELD_KEYS.contains(&k.as_str()),
            _ => false,
        })
    }

    /// True when `lookup(key)` satisfies every requirement.
    fn matches_with<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => lookup(k).unwrap_or("") == v,
            Requirement::NotEquals(k, v) => lookup(k).unwrap_or("") != v,
            Requirement::In(k, vs) => lookup(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => lookup(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            Requirement::Exists(k) => lookup(k).is_some(),
            Requirement::DoesNotExist(k) => lookup(k).is_none(),
        })
    }

    /// As a field selector on `object` (keys of [`FIELD_KEYS`]; a missing
    /// field is the empty string, as the API server takes it).
    pub fn matches_fields(&self, object: &Value) -> bool {
        self.matches_with(|key| match key {
            "metadata.name" => object.pointer("/metadata/name").and_then(Value::as_str),
            "metadata.namespace" => object.pointer("/metadata/namespace").and_then(Value::as_str),
            "spec.nodeName" => object.pointer("/spec/nodeName").and_then(Value::as_str),
            _ => None,
        })
    }

    /// As a label selector on `object`'s `metadata.labels`.
    pub fn matches_labels(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        self.matches_with(|key| labels.and_then(|l| l.get(key)).and_then(Value::as_str))
    }
}

/// Why a request cannot be taken apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A selector that does not parse.
    #[error("{which} {text:?} does not parse: {reason}")]
    Selector {
        /// `fieldSelector` or `labelSelector`.
        which: &'static str,
        /// The selector.
        text: String,
        /// What is wrong.
        reason: String,
    },
}

/// Parses a field selector (`a=b,c!=d`; `\,` `\=` `\\` escapes).
pub fn parse_field_selector(text: &str) -> Result<Selector, RequestError> {
    let bad = |reason: &str| RequestError::Selector {
        which: "fieldSelector",
        text: text.to_string(),
        reason: reason.to_string(),
    };
    let mut requirements = Vec::new();
    for term in split_unescaped(text, ',') {
        let term = term.trim();
        if term.is_empty() {
            continue;
        }
        let (key, value, negated) = if let Some((k, v)) = split_op(term, "!=") {
            (k, v, true)
        } else if let Some((k, v)) = split_op(term, "==") {
            (k, v, false)
        } else if let Some((k, v)) = split_op(term, "=") {
            (k, v, false)
        } else {
            return Err(bad(&format!("{term:?} has no operator (=, ==, !=)")));
        };
        let (key, value) = (unescape(key.trim()), unescape(value.trim()));
        if key.is_empty() {
            return Err(bad("a requirement has no field name"));
        }
        requirements.push(if negated { Requirement::NotEquals(key, value) } else { Requirement::Equals(key, value) });
    }
    requirements.sort();
    requirements.dedup();
    Ok(Selector { requirements })
}

/// Parses a label selector: `a=b`, `a==b`, `a!=b`, `a in (x,y)`,
/// `a notin (x)`, `a`, `!a`, comma-separated.
pub fn parse_label_selector(text: &str) -> Result<Selector, RequestError> {
    let bad = |reason: String| RequestError::Selector { which: "labelSelector", text: text.to_string(), reason };
    let mut requirements = Vec::new();
    for term in split_outside_parens(text) {
        let term = term.trim();
        if term.is_empty() {
            continue;
        }
        let requirement = if let Some(key) = term.strip_prefix('!') {
            Requirement::DoesNotExist(key.trim().to_string())
        } else if let Some((key, values)) = set_term(term, " notin ") {
            Requirement::NotIn(key, values.map_err(bad)?)
        } else if let Some((key, values)) = set_term(term, " in ") {
            Requirement::In(key, values.map_err(bad)?)
        } else if let Some((k, v)) = split_op(term, "!=") {
            Requirement::NotEquals(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = split_op(term, "==").or_else(|| split_op(term, "=")) {
            Requirement::Equals(k.trim().to_string(), v.trim().to_string())
        } else {
            Requirement::Exists(term.to_string())
        };
        let key = match &requirement {
            Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::DoesNotExist(k) => k,
        };
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(bad(format!("{term:?} has no valid label key")));
        }
        requirements.push(requirement);
    }
    requirements.sort();
    requirements.dedup();
    Ok(Selector { requirements })
}

fn split_op<'a>(term: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
    term.split_once(op)
}

fn set_term(term: &str, op: &str) -> Option<(String, Result<Vec<String>, String>)> {
    let (key, rest) = term.split_once(op)?;
    let rest = rest.trim();
    let values = match rest.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        Some(inner) => {
            let mut values: Vec<String> =
                inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect();
            values.sort();
            Ok(values)
        }
        None => Err(format!("{term:?}: the values of{op}must be in parentheses")),
    };
    Some((key.trim().to_string(), values))
}

fn split_outside_parens(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn split_unescaped(text: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0usize, false);
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(&text[start..i]);
            start = i + 1;
        }
    }
    parts.push(&text[start..]);
    parts
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Percent-decodes a query component (`+` is a space, as Go's
/// `url.ParseQuery` reads it).
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query string's parameters, decoded.
pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Parses the query the hub acts on.
pub fn parse_query(query: Option<&str>) -> Result<Query, RequestError> {
    let mut parsed = Query::default();
    for (key, value) in query_pairs(query) {
        match key.as_str() {
            "fieldSelector" => parsed.fields = parse_field_selector(&value)?,
            "labelSelector" => parsed.labels = parse_label_selector(&value)?,
            "watch" => parsed.watch = matches!(value.as_str(), "true" | "1"),
            "timeoutSeconds" => parsed.timeout_seconds = value.parse().ok(),
            "continue" if !value.is_empty() => parsed.continue_token = Some(value),
            "sendInitialEvents" => parsed.send_initial_events = value == "true",
            _ => {}
        }
    }
    Ok(parsed)
}

/// Subresources of a namespace, which its path names like a resource.
const NAMESPACE_SUBRESOURCES: &[&str] = &["status", "finalize"];

/// Takes a request apart; `None` for paths that are not resources
/// (discovery, `/version`, `/healthz`, …) or do not parse.
pub fn parse(method: &http::Method, path: &str, query: Option<&str>) -> Result<Option<ResourceRequest>, RequestError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, version, mut rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => (String::new(), (*version).to_string(), rest),
        ["apis", group, version, rest @ ..] => ((*group).to_string(), (*version).to_string(), rest),
        _ => return Ok(None),
    };
    if rest.is_empty() || rest.iter().any(|s| s.is_empty()) {
        return Ok(None);
    }
    let mut legacy_watch = false;
    if rest[0] == "watch" {
        legacy_watch = true;
        rest = &rest[1..];
    }
    let mut namespace = None;
    // `namespaces/<ns>/<resource>…`, but `namespaces/<name>/status` is the
    // namespace's own subresource.
    if rest.len() >= 3 && rest[0] == "namespaces" && !NAMESPACE_SUBRESOURCES.contains(&rest[2]) {
        namespace = Some(rest[1].to_string());
        rest = &rest[2..];
    }
    let (resource, name, subresource) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some((*name).to_string()), None),
        [resource, name, sub] => (*resource, Some((*name).to_string()), Some((*sub).to_string())),
        _ => return Ok(None),
    };
    let query = parse_query(query)?;
    let verb = if method != http::Method::GET || subresource.is_some() {
        Verb::Other
    } else if legacy_watch || query.watch {
        Verb::Watch
    } else if name.is_some() {
        Verb::Get
    } else {
        Verb::List
    };
    Ok(Some(ResourceRequest {
        key: ResourceKey { group, version, resource: resource.to_string() },
        namespace,
        name,
        subresource,
        verb,
        query,
    }))
}

/// True for a discovery document or `/version` (cached whole, so that
/// kubectl finds its way offline).
pub fn is_discovery(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_start_matches('/').trim_end_matches('/').split('/').collect();
    matches!(segments.as_slice(), ["api"] | ["api", _] | ["apis"] | ["apis", _] | ["apis", _, _] | ["version"])
}

impl ResourceRequest {
    /// True for a read the hub caches.
    pub fn is_cached_read(&self) -> bool {
        matches!(self.verb, Verb::Get | Verb::List | Verb::Watch)
            && CACHED_RESOURCES.contains(&self.key.resource.as_str())
    }

    /// True when `object` is in this list's scope (namespace, field and
    /// label selectors).
    pub fn scope_matches(&self, object: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if object.pointer("/metadata/namespace").and_then(Value::as_str) != Some(ns.as_str()) {
                return false;
            }
        }
        self.query.fields.matches_fields(object) && self.query.labels.matches_labels(object)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn get(path: &str, query: &str) -> ResourceRequest {
        parse(&http::Method::GET, path, Some(query)).unwrap().unwrap()
    }

    #[test]
    fn paths_are_taken_apart_as_the_api_server_does() {
        let r = get("/api/v1/pods", "fieldSelector=spec.nodeName%3Dedge-1&limit=500&resourceVersion=0");
        assert_eq!((r.key.dir_name(), r.verb, r.namespace.clone()), ("core_v1_pods".into(), Verb::List, None));
        assert_eq!(r.query.fields.required("spec.nodeName"), Some("edge-1"));
        let r = get("/api/v1/namespaces/kube-system/configmaps", "fieldSelector=metadata.name%3Dx&watch=true");
        assert_eq!((r.verb, r.namespace.as_deref()), (Verb::Watch, Some("kube-system")));
        let r = get("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/edge-1", "");
        assert_eq!(
            (r.key.api_version(), r.verb, r.name.as_deref()),
            ("coordination.k8s.io/v1".into(), Verb::Get, Some("edge-1"))
        );
        let r = get("/api/v1/namespaces/default", "");
        assert_eq!(
            (r.key.resource.as_str(), r.name.as_deref(), r.namespace.clone()),
            ("namespaces", Some("default"), None)
        );
        let r = get("/api/v1/namespaces/default/status", "");
        assert_eq!(
            (r.key.resource.as_str(), r.subresource.as_deref(), r.verb),
            ("namespaces", Some("status"), Verb::Other)
        );
        let r = get("/api/v1/namespaces/default/pods/p/log", "");
        assert_eq!(r.verb, Verb::Other);
        let r = get("/api/v1/watch/namespaces/default/pods", "");
        assert_eq!((r.verb, r.namespace.as_deref()), (Verb::Watch, Some("default")));
        let r = parse(&http::Method::PUT, "/api/v1/nodes/a", None).unwrap().unwrap();
        assert_eq!(r.verb, Verb::Other);
        assert!(parse(&http::Method::GET, "/version", None).unwrap().is_none());
        assert!(parse(&http::Method::GET, "/api/v1", None).unwrap().is_none());
        assert!(is_discovery("/apis/apps/v1") && is_discovery("/api") && !is_discovery("/api/v1/pods"));
    }

    #[test]
    fn selectors_parse_and_match() {
        let pod = json!({"metadata": {"name": "p", "namespace": "d", "labels": {"app": "web", "tier": "a"}},
                         "spec": {"nodeName": "edge-1"}});
        let fields = parse_field_selector("spec.nodeName=edge-1,metadata.namespace!=kube-system").unwrap();
        assert!(fields.matches_fields(&pod) && fields.fields_supported());
        assert!(!parse_field_selector("spec.nodeName==edge-2").unwrap().matches_fields(&pod));
        assert!(!parse_field_selector("status.phase=Running").unwrap().fields_supported());
        assert!(parse_field_selector("nonsense").is_err());
        assert_eq!(parse_field_selector("metadata.name=a\\,b").unwrap().required("metadata.name"), Some("a,b"));
        for (selector, expected) in [
            ("app=web", true),
            ("app==web,tier!=b", true),
            ("app in (web, api)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing,app", true),
            ("app=api", false),
        ] {
            assert_eq!(parse_label_selector(selector).unwrap().matches_labels(&pod), expected, "{selector}");
        }
        assert_eq!(
            parse_label_selector("b=1,a in (y,x)").unwrap().canonical(),
            parse_label_selector("a in (x,y), b==1").unwrap().canonical()
        );
        assert!(parse_label_selector("a in x").is_err());
        assert_eq!(percent_decode("a%3Db+c%2"), "a=b c%2");
    }
}
