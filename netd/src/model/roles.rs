//! How nodes are told apart (SPEC §4): edge workers carry
//! `alibabacloud.com/is-edge-worker=true`; cloud control nodes carry it as
//! `false` and the taint `node-role.alibabacloud.com/addon:NoSchedule`, so
//! only workloads that tolerate it (the tunnel server, the controller,
//! addons) run there.

/// The node label that tells edge workers (`true`) from cloud nodes (`false`).
pub const LABEL_EDGE_WORKER: &str = "alibabacloud.com/is-edge-worker";
/// The taint key of cloud nodes.
pub const TAINT_ADDON_KEY: &str = "node-role.alibabacloud.com/addon";
/// The taint effect of cloud nodes.
pub const TAINT_ADDON_EFFECT: &str = "NoSchedule";
