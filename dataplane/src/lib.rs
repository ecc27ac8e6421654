//! netd's node data plane: the flannel-compatible VXLAN overlay
//! ([`vxlan`]), outbound masquerading ([`masquerade`]) and the per-node
//! daemon that ties them to a registry and keeps pod IPs pinned
//! ([`daemon`]).
//!
//! Everything here runs on the caller's tokio runtime and is configured by
//! plain structs; netlink comes from [`netd_netlink`], leases from
//! [`netd_registry`], pinned allocations from [`netd_ipam`].

pub mod daemon;
pub mod masquerade;
pub mod vxlan;
