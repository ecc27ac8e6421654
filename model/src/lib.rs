//! The vocabulary every layer shares: a node's subnet lease, the cluster
//! network settings, the VTEP MAC, flannel's wire formats (the etcd and
//! annotation values, [`subnet_env`]) and the autonomy annotations; and the
//! one way netd writes a file whole ([`atomic_file`]).
//!
//! It sits below everything else in netd: the data plane
//! (`netd-dataplane`) and the control-plane side (`netd-registry`) both
//! depend on it and not on each other. It depends on nothing in netd, on no async runtime and
//! on no Kubernetes client, so an agent that only reads or writes flannel's
//! formats takes this crate alone. The allocation crate (`netd-ipam`), which
//! pins [`MacAddr`] to the node name, builds on it too. `netd` re-exports it
//! as `netd::model`.

pub mod atomic_file;
pub mod autonomy;
pub mod flannel;
mod mac;
mod pod;
pub mod rfc3339;
pub mod roles;
pub mod subnet_env;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub use mac::{MacAddr, MacParseError};
pub use pod::{PodRef, PodRefError};

/// A node's subnet lease as the data plane needs it: ours or a peer's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The node's pod subnet, e.g. `10.244.3.0/24`.
    pub subnet: Ipv4Net,
    /// The node's public (underlay) IP: VXLAN packets go there.
    pub public_ip: Ipv4Addr,
    /// The node's VTEP MAC.
    pub vtep_mac: MacAddr,
    /// Node name, when known (logs and diagnostics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// The cluster network settings (flannel's `/coreos.com/network/config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The cluster network, e.g. `10.244.0.0/16`.
    pub network: Ipv4Net,
    /// Prefix length of node subnets (flannel default 24).
    pub subnet_len: u8,
    /// VXLAN network identifier (flannel default 1).
    pub vni: u32,
}

/// Errors of the shared vocabulary: settings that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The network configuration is unusable (the reason names the field).
    #[error("{0}")]
    BadNetworkConfig(String),
}

impl NetworkConfig {
    /// Checks the settings are usable.
    pub fn check(&self) -> Result<(), ModelError> {
        if self.subnet_len < self.network.prefix_len() || self.subnet_len > 30 {
            return Err(ModelError::BadNetworkConfig(format!(
                "SubnetLen {} must lie between the network prefix /{} and 30",
                self.subnet_len,
                self.network.prefix_len()
            )));
        }
        if self.vni == 0 || self.vni > 0x00ff_ffff {
            return Err(ModelError::BadNetworkConfig(format!("VNI {} is outside 1..=16777215", self.vni)));
        }
        Ok(())
    }
}

/// Now, in Unix seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Whether two subnets share addresses (one contains the other).
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A boolean as operators write it in flags, environment variables and
/// annotations: true|false|1|0|yes|no. The error says what is wrong, not
/// what was given: clap's message already quotes the value and names the
/// flag.
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err("not a boolean (true|false|1|0|yes|no)".into()),
    }
}
