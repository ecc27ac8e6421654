//! How nodes are told apart (SPEC §3b, §4), and who may say so.
//!
//! **The one input.** A node is a cloud node if and only if it carries the
//! label [`LABEL_ROLE`]` = `[`ROLE_CLOUD`]
//! (`node-restriction.kubernetes.io/netd-role=cloud`); every other node is
//! an edge node. The label is under the `node-restriction.kubernetes.io/`
//! prefix, which the NodeRestriction admission plugin forbids kubelets (and
//! anything else authenticating as `system:node:<name>`) to set on their own
//! Node, at registration and on every later update: only an operator, or a
//! controller with cluster-wide `nodes: patch`, can make a node a cloud
//! node. A node that joined through `netd-join` never can. Deny by default:
//! an unlabelled node, or one whose value is not understood, is an edge
//! node — the role that grants nothing (no cloud workloads scheduled there,
//! no autonomy overridden, its addresses sent through the tunnel).
//!
//! **The outputs.** The seed's vocabulary stays for compatibility with
//! what already reads it: netd-controller writes
//! [`LABEL_EDGE_WORKER`]` = true|false` and, on cloud nodes, the taint
//! [`TAINT_ADDON_KEY`]`:`[`TAINT_ADDON_EFFECT`] from the role above. They
//! are never read back as a role: a kubelet may set
//! `alibabacloud.com/is-edge-worker=false` on its own Node (NodeRestriction
//! allows labels outside `kubernetes.io`/`k8s.io`), and the controller
//! simply writes `true` again.

/// The trusted role label: only [`ROLE_CLOUD`] means anything (a cloud
/// node); kubelets cannot set labels under this prefix (NodeRestriction).
pub const LABEL_ROLE: &str = "node-restriction.kubernetes.io/netd-role";
/// [`LABEL_ROLE`]'s value for a cloud node.
pub const ROLE_CLOUD: &str = "cloud";
/// [`LABEL_ROLE`]'s value an operator may set to say "edge" explicitly (the
/// same as no label).
pub const ROLE_EDGE: &str = "edge";
/// [`LABEL_ROLE`] as a JSON pointer into a Node object (`/` escaped as
/// `~1`), for the views that keep only the fields they read.
pub const LABEL_ROLE_POINTER: &str = "/metadata/labels/node-restriction.kubernetes.io~1netd-role";

/// The seed's node label telling edge workers (`true`) from cloud nodes
/// (`false`): an **output** of netd-controller, never read as a role (a
/// kubelet may write it on its own Node).
pub const LABEL_EDGE_WORKER: &str = "alibabacloud.com/is-edge-worker";
/// The taint key of cloud nodes (an output, like [`LABEL_EDGE_WORKER`]).
pub const TAINT_ADDON_KEY: &str = "node-role.alibabacloud.com/addon";
/// The taint effect of cloud nodes.
pub const TAINT_ADDON_EFFECT: &str = "NoSchedule";

/// A node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    /// Labelled [`LABEL_ROLE`]`=`[`ROLE_CLOUD`] by someone a kubelet is not.
    Cloud,
    /// Every other node.
    Edge,
}

impl NodeRole {
    /// The role the value of [`LABEL_ROLE`] gives (`None`: no such label),
    /// and, for a value that is neither [`ROLE_CLOUD`] nor [`ROLE_EDGE`],
    /// why it was read as edge (for a log).
    pub fn from_label(value: Option<&str>) -> (Self, Option<String>) {
        match value {
            Some(ROLE_CLOUD) => (Self::Cloud, None),
            None | Some(ROLE_EDGE) => (Self::Edge, None),
            Some(other) => (
                Self::Edge,
                Some(format!(
                    "label {LABEL_ROLE}={other:?} is neither {ROLE_CLOUD:?} nor {ROLE_EDGE:?}: counted as an edge node"
                )),
            ),
        }
    }

    /// The value of [`LABEL_EDGE_WORKER`] this role is published as.
    pub fn edge_worker_label(self) -> &'static str {
        match self {
            Self::Cloud => "false",
            Self::Edge => "true",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_trusted_label_makes_a_cloud_node() {
        assert_eq!(NodeRole::from_label(Some("cloud")), (NodeRole::Cloud, None));
        assert_eq!(NodeRole::from_label(None), (NodeRole::Edge, None));
        assert_eq!(NodeRole::from_label(Some("edge")), (NodeRole::Edge, None));
        let (role, why) = NodeRole::from_label(Some("Cloud"));
        assert_eq!(role, NodeRole::Edge, "no case folding: the exact value only");
        assert!(why.is_some_and(|w| w.contains("counted as an edge node")));
        assert_eq!(NodeRole::Cloud.edge_worker_label(), "false");
        assert_eq!(NodeRole::Edge.edge_worker_label(), "true");
    }

    #[test]
    fn the_pointer_is_the_label_and_the_prefix_is_the_restricted_one() {
        assert_eq!(LABEL_ROLE_POINTER, format!("/metadata/labels/{}", LABEL_ROLE.replace('/', "~1")));
        // NodeRestriction forbids kubelets exactly this prefix (and
        // kubernetes.io/k8s.io outside its allowlist).
        assert!(LABEL_ROLE.starts_with("node-restriction.kubernetes.io/"));
        assert!(!LABEL_EDGE_WORKER.contains("kubernetes.io") && !LABEL_EDGE_WORKER.contains("k8s.io"));
    }
}
