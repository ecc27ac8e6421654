//! `netd-controller`: the cloud side of node lifecycle (SPEC §4).
//!
//! - [`tolerations`]: pods on autonomous edge nodes are not evicted: their
//!   `not-ready`/`unreachable` tolerations are lengthened while the node is
//!   autonomous and given back exactly when it is not.
//! - [`tunnel_config`]: the edge/cloud node sets and the
//!   `edge-tunnel-server-cfg` ConfigMap drive this cloud node's eBPF DNAT.
//!
//! Cluster-wide writers run only on the elected leader; the DNAT of a cloud
//! node is that node's own, so every replica drives its own.

pub mod tolerations;
pub mod tunnel_config;
