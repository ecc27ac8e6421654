//! `netd-join`: turning a machine into a netd edge node (SPEC §4).
//!
//! Trust before change: [`spec`] validates the node-spec and [`token`] the
//! bootstrap token before anything is contacted; [`discovery`] then
//! establishes the cluster's CA from the token and the operator's pin, as
//! kubeadm does, before anything on the node changes.

pub mod discovery;
pub mod spec;
pub mod token;

pub use discovery::{CaPin, ClusterInfo, DiscoveryError};
pub use spec::{NodeNameRule, NodeSpec, SpecError};
pub use token::{BootstrapToken, TokenError};

/// Characters of a drawn node name (`nodeNameOverride: "*"`): lowercase
/// letters and digits, valid anywhere in a node name.
const NAME_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Why no node name could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    /// The host name is no valid node name.
    #[error("the host name {0:?} is not a valid node name (lowercase, digits, '-' and '.'): set nodeNameOverride")]
    BadHostname(String),
    /// The system's random source failed.
    #[error("drawing a random node name failed (no system randomness)")]
    Random,
}

/// The node name `rule` gives on this machine. A drawn name is drawn once:
/// `previous` (what an earlier join chose under the same rule) is kept, so a
/// re-run names the node the same.
pub fn node_name(rule: &NodeNameRule, hostname: &str, previous: Option<&str>) -> Result<String, NameError> {
    match rule {
        NodeNameRule::Exact(name) => Ok(name.clone()),
        NodeNameRule::Hostname => {
            let name = hostname.trim().to_ascii_lowercase();
            if spec::is_dns_subdomain(&name) {
                Ok(name)
            } else {
                Err(NameError::BadHostname(hostname.to_string()))
            }
        }
        NodeNameRule::Random { suffix } => {
            let drawn_before = |p: &&str| {
                p.strip_suffix(suffix.as_str())
                    .is_some_and(|head| head.len() == 6 && head.bytes().all(|b| NAME_ALPHABET.contains(&b)))
            };
            if let Some(previous) = previous.filter(drawn_before) {
                return Ok(previous.to_string());
            }
            let mut bytes = [0u8; 6];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .map_err(|_| NameError::Random)?;
            // 36 does not divide 256: the first 4 letters are a hair likelier, which a name can afford.
            let drawn: String = bytes.iter().map(|b| char::from(NAME_ALPHABET[usize::from(*b) % 36])).collect();
            Ok(format!("{drawn}{suffix}"))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_from_the_host_a_draw_or_the_spec_and_a_rerun_keeps_a_drawn_one() {
        assert_eq!(node_name(&NodeNameRule::Hostname, "Shop-17\n", None).unwrap(), "shop-17");
        assert!(node_name(&NodeNameRule::Hostname, "shop_17", None).is_err());
        assert_eq!(node_name(&NodeNameRule::Exact("edge-a".into()), "h", None).unwrap(), "edge-a");
        let rule = NodeNameRule::Random { suffix: ".edge".into() };
        let first = node_name(&rule, "h", None).unwrap();
        assert_eq!(first.len(), 11);
        assert!(first.ends_with(".edge") && spec::is_dns_subdomain(&first), "{first}");
        assert_eq!(node_name(&rule, "h", Some(&first)).unwrap(), first, "a re-run keeps it");
        let draws: std::collections::HashSet<String> = (0..20).map(|_| node_name(&rule, "h", None).unwrap()).collect();
        assert!(draws.len() > 15, "{draws:?}");
        // A name from another rule is not kept.
        assert_ne!(node_name(&NodeNameRule::Random { suffix: String::new() }, "h", Some("edge-a")).unwrap(), "edge-a");
    }
}
