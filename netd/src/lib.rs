//! netd: an edge-networking data plane.
//!
//! netd keeps pod networking alive on edge Kubernetes nodes whose link to the
//! cloud is weak or down: pod IPs stay pinned to pod names, the VXLAN VTEP MAC
//! stays pinned to the node name, the overlay is flannel-compatible and comes
//! back by itself after a reboot without the cloud, and the cloud reaches edge
//! kubelets through a reverse tunnel whose DNAT runs in eBPF.
//!
//! This crate is both the per-node daemon and a library other node agents
//! embed. Persistent allocation lives in [`netd_ipam`]; BPF programs and their
//! loader in [`netd_ebpf`]; the vocabulary every layer shares (leases,
//! flannel's formats, autonomy keys, roles) in [`netd_model`], re-exported as
//! [`model`].
//!
//! Every file netd writes whole goes through [`atomic_file`]: temporary
//! file made with its final mode, fsync, rename, directory fsync; a key is
//! never visible with a mode wider than 0600.
//!
//! With the `test-harness` feature, [`testing`] provides RAII guards for
//! network namespaces, veth pairs, bridges and cgroups for privileged tests.

pub use netd_cloud::autonomy;
pub mod cli;
pub mod cmd;
pub use netd_cloud::controller;
pub use netd_cloud::dnat;
pub use netd_dataplane::daemon;
pub use netd_hub as hub;
pub use netd_ipam::cni;
pub use netd_metrics as http;
pub mod join;
pub use netd_cloud::rollout;
pub use netd_dataplane::masquerade;
pub use netd_dataplane::vxlan;
pub use netd_kube as kube;
pub use netd_model as model;
pub use netd_model::{atomic_file, subnet_env};
pub use netd_netlink as netlink;
pub use netd_registry as registry;
pub use netd_tunnel as tunnel;

pub use netd_ebpf as ebpf;
pub use netd_ipam as ipam;

#[cfg(feature = "test-harness")]
pub use netd_testing as testing;
