//! The underlay: the interface VXLAN packets leave by, and our public IP.

use std::net::Ipv4Addr;

use netd_netlink::{Handle, NetlinkError, RouteVia};

/// The underlay as resolved from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// Interface name.
    pub name: String,
    /// Public IP.
    pub public_ip: Ipv4Addr,
    /// Interface MTU.
    pub mtu: u32,
}

/// Why the underlay cannot be resolved (yet: after a reboot the interface
/// may come up late, so the daemon retries).
#[derive(Debug, thiserror::Error)]
pub enum UnderlayError {
    /// Talking to the kernel failed.
    #[error("cannot read interfaces, addresses or routes: {0}")]
    Netlink(#[from] NetlinkError),
    /// The configured interface does not exist.
    #[error("interface {0} not found")]
    NoSuchInterface(String),
    /// No interface given and no default route to pick one from.
    #[error("no default route to pick the interface from; set --iface")]
    NoDefaultRoute,
    /// The default route names no interface.
    #[error("default route has no interface; set --iface")]
    DefaultRouteWithoutInterface,
    /// The default route's interface disappeared while being looked up.
    #[error("default-route interface (index {0}) vanished")]
    InterfaceVanished(u32),
    /// No public IP given and the interface has no IPv4 address.
    #[error("interface {0} has no IPv4 address; set --public-ip")]
    NoAddress(String),
}

/// Finds the underlay: `iface` or the default-route interface (flannel's
/// choice), and `ip` or the interface's first IPv4 address.
pub fn resolve_underlay(iface: Option<&str>, ip: Option<Ipv4Addr>) -> Result<Underlay, UnderlayError> {
    let mut handle = Handle::new()?;
    let link = match iface {
        Some(name) => handle.link().get(name)?.ok_or_else(|| UnderlayError::NoSuchInterface(name.into()))?,
        None => {
            let routes = handle.route().list()?;
            let default = routes.iter().find(|r| r.dst.prefix_len() == 0).ok_or(UnderlayError::NoDefaultRoute)?;
            let index = match default.via {
                RouteVia::Gateway { oif, .. } | RouteVia::Link { oif } => oif,
                RouteVia::Nexthop(_) => default.oif.ok_or(UnderlayError::DefaultRouteWithoutInterface)?,
            };
            handle.link().get_by_index(index)?.ok_or(UnderlayError::InterfaceVanished(index))?
        }
    };
    let public_ip = match ip {
        Some(ip) => ip,
        None => handle
            .address()
            .list(link.index)?
            .first()
            .map(|a| a.local)
            .ok_or_else(|| UnderlayError::NoAddress(link.name.clone()))?,
    };
    Ok(Underlay { name: link.name, public_ip, mtu: link.mtu })
}
