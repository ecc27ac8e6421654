//! Pod identity: `namespace/name`, validated as Kubernetes does.

use std::fmt;
use std::str::FromStr;

/// Why a pod identity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodRefError {
    /// Not of the form `namespace/name`.
    #[error("pod reference {0:?} is not of the form namespace/name")]
    Malformed(String),
    /// The namespace is not a DNS-1123 label (≤ 63 chars, `[a-z0-9-]`, alphanumeric ends).
    #[error("pod namespace {value:?} is not a valid DNS-1123 label: {why}")]
    Namespace {
        /// The namespace as given (truncated to 80 characters).
        value: String,
        /// What rule it breaks.
        why: &'static str,
    },
    /// The name is not a DNS-1123 subdomain (≤ 253 chars, `[a-z0-9.-]`).
    #[error("pod name {value:?} is not a valid DNS-1123 subdomain: {why}")]
    Name {
        /// The name as given (truncated to 80 characters).
        value: String,
        /// What rule it breaks.
        why: &'static str,
    },
}

/// A pod's identity, the key an IP is pinned to.
///
/// ```
/// let pod: netd_model::PodRef = "kube-system/coredns-7db6d8ff4d-x2x9q".parse().unwrap();
/// assert_eq!(pod.namespace(), "kube-system");
/// assert!("default/Not_Valid".parse::<netd_model::PodRef>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    namespace: String,
    name: String,
}

fn shorten(value: &str) -> String {
    value.chars().take(80).collect()
}

fn check_dns_chars(value: &str, max: usize, dots: bool) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("it is empty");
    }
    if value.len() > max {
        return Err(if max == 63 { "it is longer than 63 characters" } else { "it is longer than 253 characters" });
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    if !value.chars().all(allowed) {
        return Err("only lowercase letters, digits, '-' (and '.' in names) are allowed");
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !alnum(value.chars().next()) || !alnum(value.chars().last()) {
        return Err("it must start and end with a lowercase letter or digit");
    }
    Ok(())
}

impl PodRef {
    /// Validates and builds a pod identity.
    pub fn new(namespace: &str, name: &str) -> Result<Self, PodRefError> {
        check_dns_chars(namespace, 63, false)
            .map_err(|why| PodRefError::Namespace { value: shorten(namespace), why })?;
        check_dns_chars(name, 253, true).map_err(|why| PodRefError::Name { value: shorten(name), why })?;
        Ok(Self { namespace: namespace.to_string(), name: name.to_string() })
    }

    /// The pod's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The pod's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl FromStr for PodRef {
    type Err = PodRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (namespace, name) = s.split_once('/').ok_or_else(|| PodRefError::Malformed(shorten(s)))?;
        Self::new(namespace, name)
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubernetes_names() {
        let pod = PodRef::new("default", "web-0.shard.a").unwrap();
        assert_eq!(pod.to_string(), "default/web-0.shard.a");
        assert_eq!("default/web-0.shard.a".parse::<PodRef>().unwrap(), pod);
    }

    #[test]
    fn refuses_bad_names_precisely() {
        let huge = "a".repeat(254);
        assert!(matches!(
            PodRef::new("default", &huge),
            Err(PodRefError::Name { why: "it is longer than 253 characters", .. })
        ));
        assert!(matches!(PodRef::new(&"n".repeat(64), "x"), Err(PodRefError::Namespace { .. })));
        assert!(matches!(PodRef::new("default", ""), Err(PodRefError::Name { why: "it is empty", .. })));
        assert!(matches!(PodRef::new("default", "-x"), Err(PodRefError::Name { .. })));
        assert!(matches!(PodRef::new("a.b", "x"), Err(PodRefError::Namespace { .. })));
        assert!(matches!("noslash".parse::<PodRef>(), Err(PodRefError::Malformed(_))));
        assert!(matches!("default/a/b".parse::<PodRef>(), Err(PodRefError::Name { .. })));
        // The error never echoes a huge value back in full.
        let msg = PodRef::new("default", &huge).unwrap_err().to_string();
        assert!(msg.len() < 200, "{msg}");
    }
}
