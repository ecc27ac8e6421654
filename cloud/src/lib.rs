//! netd's cloud side: the controller that labels edge nodes, keeps the
//! pods of autonomous nodes from being evicted and configures the tunnel
//! DNAT ([`controller`]), node-by-node rollouts of the netd DaemonSet
//! ([`rollout`]), the autonomy switch operators flip ([`autonomy`]) and
//! the eBPF tunnel DNAT's desired state ([`dnat`]).
//!
//! Nothing here runs on edge nodes: edge binaries do not link this crate.

pub mod autonomy;
pub mod controller;
pub mod dnat;
pub mod rollout;
