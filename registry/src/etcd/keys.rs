//! The key layout under the prefix (see the table in the parent module):
//! the name of every key netd reads or writes, and what a key read back
//! is. Kept apart because every other job builds keys here and the watch
//! and the acquire listing both classify what they read, so the layout is
//! written down once.

use ipnet::Ipv4Net;
use netd_model::flannel::{self, CONFIG_KEY, SUBNETS_PREFIX};

use crate::replicas::check_replica_id;
use crate::RegistryError;

/// flannel's default etcd prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

/// The keys of one prefix.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    pub(super) prefix: String,
    /// `<prefix>/`: everything the watch covers.
    pub(super) root: String,
    pub(super) config: String,
    pub(super) subnets: String,
    pub(super) nodes: String,
    pub(super) autonomy: String,
    autonomy_duration: String,
    reserved: String,
    pub(super) tokens: String,
    /// `<prefix>/tunnel-replicas/`: tunnel server replicas' announcements.
    pub(super) replicas: String,
}

/// What a key under the prefix is.
pub(super) enum KeyKind<'k> {
    Config,
    Subnet(&'k str),
    Node(&'k str),
    Autonomy(&'k str),
    AutonomyDuration(&'k str),
    Reserved(&'k str),
    Other,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        let prefix = prefix.trim_end_matches('/').to_string();
        // flannel's constants, moved under another prefix.
        let rebase = |key: &str| format!("{prefix}{}", key.strip_prefix(DEFAULT_PREFIX).unwrap_or(key));
        Self {
            root: format!("{prefix}/"),
            config: rebase(CONFIG_KEY),
            subnets: rebase(SUBNETS_PREFIX),
            nodes: format!("{prefix}/nodes/"),
            autonomy: format!("{prefix}/autonomy/"),
            autonomy_duration: format!("{prefix}/autonomy-duration/"),
            reserved: format!("{prefix}/reserved/"),
            tokens: format!("{prefix}/bootstrap-tokens/"),
            replicas: format!("{prefix}/tunnel-replicas/"),
            prefix,
        }
    }

    pub(super) fn subnet(&self, subnet: Ipv4Net) -> String {
        format!("{}{}", self.subnets, flannel::subnet_key(subnet))
    }

    pub(super) fn node(&self, subnet: Ipv4Net) -> String {
        format!("{}{}", self.nodes, flannel::subnet_key(subnet))
    }

    pub(super) fn autonomy(&self, node: &str) -> String {
        format!("{}{node}", self.autonomy)
    }

    pub(super) fn autonomy_duration(&self, node: &str) -> String {
        format!("{}{node}", self.autonomy_duration)
    }

    pub(super) fn reserved(&self, node: &str) -> String {
        format!("{}{node}", self.reserved)
    }

    /// The key of replica `id`, which must be a valid replica id: a `/`
    /// would put the key in another directory, so no key is built without
    /// the check.
    pub(super) fn replica(&self, id: &str) -> Result<String, RegistryError> {
        check_replica_id(id)?;
        Ok(format!("{}{id}", self.replicas))
    }

    pub(super) fn classify<'k>(&self, key: &'k str) -> KeyKind<'k> {
        if key == self.config {
            KeyKind::Config
        } else if let Some(rest) = key.strip_prefix(&self.subnets) {
            KeyKind::Subnet(rest)
        } else if let Some(rest) = key.strip_prefix(&self.nodes) {
            KeyKind::Node(rest)
        } else if let Some(rest) = key.strip_prefix(&self.autonomy) {
            KeyKind::Autonomy(rest)
        } else if let Some(rest) = key.strip_prefix(&self.autonomy_duration) {
            KeyKind::AutonomyDuration(rest)
        } else if let Some(rest) = key.strip_prefix(&self.reserved) {
            KeyKind::Reserved(rest)
        } else {
            KeyKind::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_flannels_layout_under_any_prefix() {
        let keys = Keys::new(DEFAULT_PREFIX);
        let subnet: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        assert_eq!(keys.config, CONFIG_KEY);
        assert_eq!(keys.subnet(subnet), "/coreos.com/network/subnets/10.244.3.0-24");
        assert_eq!(keys.node(subnet), "/coreos.com/network/nodes/10.244.3.0-24");
        assert_eq!(keys.autonomy("edge-1"), "/coreos.com/network/autonomy/edge-1");
        let other = Keys::new("/acme/net/");
        assert_eq!(other.config, "/acme/net/config");
        assert_eq!(other.subnet(subnet), "/acme/net/subnets/10.244.3.0-24");
        assert!(matches!(other.classify("/acme/net/subnets/x"), KeyKind::Subnet("x")));
        assert!(matches!(other.classify("/acme/net/autonomy/n"), KeyKind::Autonomy("n")));
        assert!(matches!(other.classify("/coreos.com/network/config"), KeyKind::Other));
    }

    #[test]
    fn replica_keys_are_built_from_valid_ids_only() {
        let keys = Keys::new(DEFAULT_PREFIX);
        assert_eq!(keys.replicas, "/coreos.com/network/tunnel-replicas/");
        assert_eq!(keys.replica("cloud-1.x_2-10262").unwrap(), "/coreos.com/network/tunnel-replicas/cloud-1.x_2-10262");
        assert_eq!(Keys::new("/acme/net/").replica("r").unwrap(), "/acme/net/tunnel-replicas/r");
        for bad in ["", "a/b", "../config", "a b"] {
            let err = keys.replica(bad).unwrap_err();
            assert!(matches!(err, RegistryError::Refused { .. }), "{bad:?}: {err}");
        }
        // Not a key the peer view or the lease listing reads.
        assert!(matches!(keys.classify("/coreos.com/network/tunnel-replicas/r"), KeyKind::Other));
    }
}
