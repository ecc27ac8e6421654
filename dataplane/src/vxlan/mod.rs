//! The flannel-compatible VXLAN data plane.
//!
//! What the kernel holds for a node with subnet `10.244.1.0/24`, VNI 1 and a
//! peer `10.244.2.0/24` at public IP `192.168.50.12` with VTEP MAC `M`
//! (SPEC §2, the layout flannel's vxlan backend programs):
//!
//! ```text
//! ip -d link:   flannel.1 vxlan id 1 local <our public IP> dev <iface> dstport 8472 nolearning,
//!               MTU = <iface MTU> - 50, address = our pinned VTEP MAC, up
//! ip addr:      inet 10.244.1.0/32 scope global flannel.1
//! ip neigh:     10.244.2.0 dev flannel.1 lladdr M PERMANENT
//! bridge fdb:   M dev flannel.1 dst 192.168.50.12 self permanent
//! ip route:     10.244.2.0/24 nhid 183763456 via 10.244.2.0 dev flannel.1 onlink
//! ```
//!
//! One difference from flannel, on purpose: the route goes through a nexthop
//! object (`ip nexthop`: `id 183763456 via 10.244.2.0 dev flannel.1 onlink`)
//! whose id is the subnet's network address as a number. Forwarding is
//! identical, `ip route` still shows `via … dev flannel.1 onlink`, but
//! inserting thousands of such routes is linear instead of quadratic in the
//! kernel. The id being a function of the subnet makes ownership
//! self-describing: restarts need no id table.
//!
//! Peers on the same L2 segment get `<subnet> via <public IP> dev <iface>`
//! (also through a nexthop) and no neighbour/FDB entry when direct routing
//! is enabled.
//!
//! [`Reconciler::reconcile`] compares the wanted peer set with what the
//! kernel holds on the device and writes only the difference, batched;
//! [`Reconciler::apply`] writes per-peer [`PeerChange`]s without reading the
//! kernel at all. [`Overlay`] runs both on its own thread: changes from the
//! registry take the incremental path, journaled in the [`snapshot`] first;
//! full passes run for whole peer sets, for drift netlink notifications
//! report, and on a slow periodic timer.

mod device;
mod overlay;
mod peers;
mod reconcile;
pub mod snapshot;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use netd_netlink::NetlinkError;

pub use netd_model::Lease;

pub use device::Device;
pub use overlay::{Overlay, OverlayOptions, OverlayStatus, StatusHandle};
pub use peers::{nexthop_id, validate, Rejected, Validated};
pub use reconcile::{Applied, ReconcileReport, Reconciler};

/// One peer's change, as a registry event makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    /// The peer appeared or changed.
    Upsert {
        /// Its lease.
        lease: Lease,
        /// Its node declared autonomy (recorded in the snapshot).
        autonomous: bool,
    },
    /// The peer of this subnet is gone.
    Remove(Ipv4Net),
}

impl PeerChange {
    /// The subnet the change is about.
    pub fn subnet(&self) -> Ipv4Net {
        match self {
            Self::Upsert { lease, .. } => lease.subnet,
            Self::Remove(subnet) => *subnet,
        }
    }
}

/// flannel's VXLAN UDP port.
pub const FLANNEL_VXLAN_PORT: u16 = 8472;
/// VXLAN encapsulation overhead subtracted from the underlay MTU.
pub const VXLAN_OVERHEAD: u32 = 50;

/// What the overlay is programmed from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayConfig {
    /// The cluster network, e.g. `10.244.0.0/16`.
    pub network: Ipv4Net,
    /// This node's lease.
    pub own: Lease,
    /// VXLAN network identifier (flannel default 1).
    pub vni: u32,
    /// VXLAN UDP port (flannel: 8472).
    pub port: u16,
    /// Underlay interface (flannel's `--iface`).
    pub underlay: String,
    /// Route peers on the same L2 segment directly, without VXLAN.
    #[serde(default)]
    pub direct_routing: bool,
}

impl OverlayConfig {
    /// `flannel.<VNI>`.
    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }
}

/// Errors of the VXLAN data plane.
#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    /// The underlay interface does not exist.
    #[error("underlay interface `{0}` does not exist (set --iface to an existing interface)")]
    UnderlayMissing(String),
    /// The underlay interface's MTU leaves no room for VXLAN.
    #[error("underlay interface `{name}` has MTU {mtu}, too small for VXLAN's {VXLAN_OVERHEAD}-byte overhead")]
    UnderlayMtu {
        /// Interface name.
        name: String,
        /// Its MTU.
        mtu: u32,
    },
    /// The configuration is inconsistent.
    #[error("invalid overlay configuration: {0}")]
    Config(String),
    /// Programming the device failed.
    #[error("cannot set up VXLAN device `{device}`: {source}")]
    Device {
        /// Device name.
        device: String,
        /// The netlink failure.
        #[source]
        source: NetlinkError,
    },
    /// Reading kernel state failed.
    #[error("cannot read kernel state of `{device}`: {source}")]
    Dump {
        /// Device name.
        device: String,
        /// The netlink failure.
        #[source]
        source: NetlinkError,
    },
    /// The thread dumping the device's neighbours and FDB panicked.
    #[error("the thread reading the neighbours and FDB of `{device}` panicked")]
    DumpThreadPanicked {
        /// Device name.
        device: String,
    },
    /// The netlink socket failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The overlay thread or its wake-up pipe could not be created.
    #[error("cannot start the overlay thread: {what}: {source}")]
    Thread {
        /// What failed (the thread, the wake-up pipe).
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The snapshot could not be written; the kernel was not changed.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// A pass of the overlay thread failed (the thread keeps running).
    #[error("overlay pass failed: {0}")]
    Pass(#[source] std::sync::Arc<VxlanError>),
    /// The overlay thread is gone.
    #[error("the overlay thread has stopped")]
    Stopped,
}

impl OverlayConfig {
    /// Checks what can be checked without the kernel.
    pub fn check(&self) -> Result<(), VxlanError> {
        if !self.network.contains(&self.own.subnet) {
            return Err(VxlanError::Config(format!(
                "own subnet {} is outside the cluster network {}",
                self.own.subnet, self.network
            )));
        }
        if self.vni == 0 || self.vni > 0x00ff_ffff {
            return Err(VxlanError::Config(format!("VNI {} is outside 1..=16777215", self.vni)));
        }
        if self.port == 0 {
            return Err(VxlanError::Config("VXLAN port 0".into()));
        }
        if self.own.vtep_mac.is_multicast() || self.own.vtep_mac.is_zero() {
            return Err(VxlanError::Config(format!("own VTEP MAC {} is not unicast", self.own.vtep_mac)));
        }
        if self.underlay.is_empty() || self.underlay.len() > 15 {
            return Err(VxlanError::Config(format!("interface name {:?} is not 1-15 bytes", self.underlay)));
        }
        Ok(())
    }
}
