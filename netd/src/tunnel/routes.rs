//! Which node owns a destination address: the tunnel server's routing table.
//!
//! Two sources, both trusted, neither the agent's say-so:
//! - the **certificates** of linked agents: a node's IP SANs;
//! - the **registry's leases**: each node's public (node) address and its
//!   pod subnet, so `http://<pod IP>:<port>` reaches the node that runs the
//!   pod.
//!
//! Lookups cost hash probes: an exact address first (leases, then
//! certificates), then one probe per distinct subnet prefix length in use
//! (longest first) — one length in a flannel network, whatever its size.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;

/// What the registry says about one node: where its node address and its
/// pods live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRoute {
    /// The node name (the agent's certificate names the same node).
    pub node: String,
    /// The node's address (the lease's public IP; kubelet listens there).
    pub address: Ipv4Addr,
    /// The node's pod subnet.
    pub subnet: Ipv4Net,
}

/// The routing table; see the module docs.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Certificate IP SANs of linked agents.
    certified: HashMap<IpAddr, String>,
    /// Leases by subnet (the registry's identity of a lease).
    leases: HashMap<Ipv4Net, LeaseRoute>,
    /// Lease node address → the subnet of its lease.
    lease_addresses: HashMap<Ipv4Addr, Ipv4Net>,
    /// Prefix lengths of the leased subnets, with how many use each.
    prefix_lens: BTreeMap<u8, usize>,
}

impl RouteTable {
    /// The node that owns `ip`, if any.
    pub fn node_of(&self, ip: IpAddr) -> Option<&str> {
        let ip4 = match ip {
            IpAddr::V4(ip4) => Some(ip4),
            IpAddr::V6(ip6) => ip6.to_ipv4_mapped(),
        };
        if let Some(route) = ip4.and_then(|ip4| self.lease_addresses.get(&ip4)).and_then(|s| self.leases.get(s)) {
            return Some(&route.node);
        }
        if let Some(node) = self.certified.get(&ip) {
            return Some(node);
        }
        let ip4 = ip4?;
        self.prefix_lens.keys().rev().find_map(|&len| {
            let subnet = Ipv4Net::new(ip4, len).ok()?.trunc();
            self.leases.get(&subnet).map(|route| route.node.as_str())
        })
    }

    /// The node address the registry gives `node` (for `CONNECT <name>:port`
    /// when its agent's certificate carries no IP).
    pub fn lease_address_of(&self, node: &str) -> Option<Ipv4Addr> {
        // Linear in the leases: only CONNECT-by-name takes this path, and
        // only for agents whose certificate has no IP SAN.
        self.leases.values().find(|route| route.node == node).map(|route| route.address)
    }

    /// Routes a linked agent's certificate addresses to its node.
    pub fn certify(&mut self, node: &str, addresses: &[IpAddr]) {
        for address in addresses {
            self.certified.insert(*address, node.to_string());
        }
    }

    /// Drops certificate routes of `node` (its link is gone).
    pub fn uncertify(&mut self, node: &str, addresses: &[IpAddr]) {
        for address in addresses {
            if self.certified.get(address).is_some_and(|owner| owner == node) {
                self.certified.remove(address);
            }
        }
    }

    /// Adds or replaces the lease of `route.subnet`.
    pub fn upsert_lease(&mut self, route: LeaseRoute) {
        self.remove_lease(route.subnet);
        self.lease_addresses.insert(route.address, route.subnet);
        *self.prefix_lens.entry(route.subnet.prefix_len()).or_default() += 1;
        self.leases.insert(route.subnet, route);
    }

    /// Removes the lease of `subnet`, if held.
    pub fn remove_lease(&mut self, subnet: Ipv4Net) {
        let Some(old) = self.leases.remove(&subnet) else { return };
        if self.lease_addresses.get(&old.address) == Some(&subnet) {
            self.lease_addresses.remove(&old.address);
        }
        if let Some(count) = self.prefix_lens.get_mut(&subnet.prefix_len()) {
            *count -= 1;
            if *count == 0 {
                self.prefix_lens.remove(&subnet.prefix_len());
            }
        }
    }

    /// Replaces every lease with `routes` (a registry resync).
    pub fn replace_leases(&mut self, routes: impl IntoIterator<Item = LeaseRoute>) {
        self.leases.clear();
        self.lease_addresses.clear();
        self.prefix_lens.clear();
        for route in routes {
            self.upsert_lease(route);
        }
    }

    /// Leases held (for logs and tests).
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn lease(node: &str, address: &str, subnet: &str) -> LeaseRoute {
        LeaseRoute { node: node.into(), address: address.parse().unwrap(), subnet: subnet.parse().unwrap() }
    }

    fn at<'a>(table: &'a RouteTable, ip: &str) -> Option<&'a str> {
        table.node_of(ip.parse().unwrap())
    }

    #[test]
    fn node_addresses_and_pod_ips_route_to_their_node() {
        let mut table = RouteTable::default();
        table.replace_leases([
            lease("edge-1", "10.0.5.7", "10.244.7.0/24"),
            lease("edge-2", "10.0.5.8", "10.244.8.0/24"),
        ]);
        assert_eq!(at(&table, "10.0.5.7"), Some("edge-1"));
        assert_eq!(at(&table, "10.244.7.19"), Some("edge-1"));
        assert_eq!(at(&table, "10.244.7.0"), Some("edge-1"));
        assert_eq!(at(&table, "10.244.8.255"), Some("edge-2"));
        assert_eq!(at(&table, "::ffff:10.244.8.3"), Some("edge-2"), "v4-mapped");
        assert_eq!(at(&table, "10.244.9.1"), None);
        assert_eq!(at(&table, "10.0.5.9"), None);
        assert_eq!(table.lease_address_of("edge-2"), Some("10.0.5.8".parse().unwrap()));
    }

    #[test]
    fn certificate_addresses_route_and_go_with_their_link() {
        let mut table = RouteTable::default();
        let ips: Vec<IpAddr> = vec!["10.0.5.7".parse().unwrap(), "fd00::7".parse().unwrap()];
        table.certify("edge-1", &ips);
        assert_eq!(at(&table, "fd00::7"), Some("edge-1"));
        // A successor link of another node took one address: the old
        // node's clean-up must not remove it.
        table.certify("edge-9", &ips[..1]);
        table.uncertify("edge-1", &ips);
        assert_eq!(at(&table, "10.0.5.7"), Some("edge-9"));
        assert_eq!(at(&table, "fd00::7"), None);
    }

    #[test]
    fn the_longest_prefix_wins_and_removal_keeps_the_rest() {
        let mut table = RouteTable::default();
        table.upsert_lease(lease("big", "10.0.0.1", "10.244.0.0/16"));
        table.upsert_lease(lease("small", "10.0.0.2", "10.244.3.0/24"));
        assert_eq!(at(&table, "10.244.3.9"), Some("small"));
        assert_eq!(at(&table, "10.244.4.9"), Some("big"));
        table.remove_lease("10.244.3.0/24".parse().unwrap());
        assert_eq!(at(&table, "10.244.3.9"), Some("big"));
        assert_eq!(at(&table, "10.0.0.2"), None, "its node address went with it");
        table.remove_lease("10.244.0.0/16".parse().unwrap());
        assert_eq!(at(&table, "10.244.3.9"), None);
        assert!(table.prefix_lens.is_empty());
    }

    #[test]
    fn a_lease_that_moves_to_a_new_address_leaves_no_stale_route() {
        let mut table = RouteTable::default();
        table.upsert_lease(lease("edge-1", "10.0.5.7", "10.244.7.0/24"));
        table.upsert_lease(lease("edge-1", "10.0.5.70", "10.244.7.0/24"));
        assert_eq!(at(&table, "10.0.5.7"), None);
        assert_eq!(at(&table, "10.0.5.70"), Some("edge-1"));
        assert_eq!(table.lease_count(), 1);
        assert_eq!(table.prefix_lens.get(&24), Some(&1));
    }
}
