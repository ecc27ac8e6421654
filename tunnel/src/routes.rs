//! Which node owns a destination address: the tunnel server's routing table.
//!
//! Two sources, neither the agent's say-so, and not equally trusted:
//! - the **certificates** of agents that linked: a node's IP SANs, which the
//!   CA vouched for;
//! - the **registry's leases**: each node's public (node) address and its
//!   pod subnet, so `http://<pod IP>:<port>` reaches the node that runs the
//!   pod. A node writes its own lease, so a lease is a claim, checked before
//!   it routes anything.
//!
//! Certificates outrank leases: an address a certificate names routes to
//! that certificate's node, whatever any lease says, and stays its after the
//! link drops (the node is then unreachable, not someone else's). A lease is
//! refused, counted and logged — never silently taken — when its address is
//! another node's (by certificate or by an earlier lease: the first holder
//! keeps it, the claimant waits and takes it only once the holder's lease
//! is gone), when its address or subnet is one nothing may be tunnelled to
//! (loopback, unspecified, link-local, multicast, broadcast), when either
//! covers an address the server keeps for itself (its own, `--reserved`,
//! and the addresses and subnets of cloud nodes' leases), or when its
//! subnet overlaps another node's. A lease whose address alone is refused
//! still routes its pod subnet.
//!
//! Lookups cost hash probes for exact addresses (certificates first, then
//! lease addresses), then one ordered-map probe per distinct subnet prefix
//! length in use (longest first) — one length in a flannel network,
//! whatever its size.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

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
    /// A cloud node's lease (by a label kubelets cannot set): its address
    /// and subnet are reserved, never routed to an agent.
    pub cloud: bool,
}

/// Why (part of) a lease does not route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseRefusal {
    /// Its address is named by another node's certificate.
    Certified,
    /// Its address is held by another node's earlier lease.
    Held,
    /// Its address or subnet is one nothing is tunnelled to (loopback,
    /// unspecified, link-local, multicast, broadcast).
    Special,
    /// Its address or subnet covers an address the server keeps (a cloud node's).
    Reserved,
    /// Its subnet overlaps another node's.
    Overlap,
}

impl LeaseRefusal {
    /// Every reason, in metrics order.
    pub const ALL: [LeaseRefusal; 5] = [
        LeaseRefusal::Certified,
        LeaseRefusal::Held,
        LeaseRefusal::Special,
        LeaseRefusal::Reserved,
        LeaseRefusal::Overlap,
    ];

    /// The reason's name in logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            LeaseRefusal::Certified => "certified",
            LeaseRefusal::Held => "held",
            LeaseRefusal::Special => "special",
            LeaseRefusal::Reserved => "reserved",
            LeaseRefusal::Overlap => "overlap",
        }
    }
}

/// What became of a lease given to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseVerdict {
    /// Its address and subnet route to its node.
    Routed,
    /// A cloud node's: its address and subnet are reserved from now on.
    Cloud,
    /// Its subnet routes; its address does not (it waits while another holds it).
    AddressRefused(LeaseRefusal),
    /// Nothing of it routes.
    Refused(LeaseRefusal),
}

/// A certificate's claim on an address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Certified {
    node: String,
    /// Its link is up: a linked holder is never displaced by another certificate.
    linked: bool,
}

/// The routing table; see the module docs.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Certificate IP SANs of agents that linked.
    certified: HashMap<IpAddr, Certified>,
    /// Leases that route (at least their subnet), by subnet.
    leases: BTreeMap<Ipv4Net, LeaseRoute>,
    /// Lease node address → the subnet of the lease that holds it.
    lease_addresses: HashMap<Ipv4Addr, Ipv4Net>,
    /// Address → subnets of routed leases that claim it but wait.
    waiting: HashMap<Ipv4Addr, BTreeSet<Ipv4Net>>,
    /// Prefix lengths of the routed subnets, with how many use each.
    prefix_lens: BTreeMap<u8, usize>,
    /// Addresses never routed to an agent (the cloud's own).
    reserved: Vec<IpNet>,
    /// Cloud nodes' leases: subnet → address, both reserved.
    cloud: HashMap<Ipv4Net, Ipv4Addr>,
}

/// Ranges nothing is tunnelled to, whoever claims them.
fn special_v4() -> [Ipv4Net; 5] {
    [
        Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 8),
        Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8),
        Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16),
        Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4),
        Ipv4Net::new_assert(Ipv4Addr::BROADCAST, 32),
    ]
}

/// Whether `ip` is an address nothing is tunnelled to.
pub fn is_special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => special_v4().iter().any(|net| net.contains(&v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_special(IpAddr::V4(v4)),
            None => v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || v6.is_unicast_link_local(),
        },
    }
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

impl RouteTable {
    /// A table that never routes `reserved` (cloud nodes' addresses, the
    /// server's own) to an agent.
    pub fn with_reserved(reserved: Vec<IpNet>) -> Self {
        Self { reserved, ..Self::default() }
    }

    /// The node that owns `ip`, if any.
    pub fn node_of(&self, ip: IpAddr) -> Option<&str> {
        let ip4 = match ip {
            IpAddr::V4(ip4) => Some(ip4),
            IpAddr::V6(ip6) => ip6.to_ipv4_mapped(),
        };
        if let Some(claim) = self.certified.get(&ip).or_else(|| self.certified.get(&IpAddr::V4(ip4?))) {
            return Some(&claim.node);
        }
        let ip4 = ip4?;
        if let Some(route) = self.lease_addresses.get(&ip4).and_then(|s| self.leases.get(s)) {
            return Some(&route.node);
        }
        self.prefix_lens.keys().rev().find_map(|&len| {
            let subnet = Ipv4Net::new(ip4, len).ok()?.trunc();
            self.leases.get(&subnet).map(|route| route.node.as_str())
        })
    }

    /// The node address the registry gives `node` (for `CONNECT <name>:port`
    /// when its agent's certificate carries no IP); only an address its
    /// lease holds.
    pub fn lease_address_of(&self, node: &str) -> Option<Ipv4Addr> {
        // Linear in the leases: only CONNECT-by-name takes this path, and
        // only for agents whose certificate has no IP SAN.
        self.leases
            .values()
            .find(|route| route.node == node && self.lease_addresses.get(&route.address) == Some(&route.subnet))
            .map(|route| route.address)
    }

    /// Routes a linked agent's certificate addresses to its node. Returns
    /// the addresses it could not take: special or reserved ones, and those
    /// another *linked* node's certificate holds (the first keeps them). An
    /// address an unlinked node's certificate held goes to the newcomer. A
    /// lease of another node holding one of them loses it (and waits).
    pub fn certify(&mut self, node: &str, addresses: &[IpAddr]) -> Vec<IpAddr> {
        let mut refused = Vec::new();
        for &address in addresses {
            let taken = self.certified.get(&address).is_some_and(|c| c.linked && c.node != node);
            if is_special(address) || self.is_reserved(address) || taken {
                refused.push(address);
                continue;
            }
            self.certified.insert(address, Certified { node: node.to_string(), linked: true });
            if let IpAddr::V4(v4) = address {
                self.demote_other_holder(v4, node);
            }
        }
        refused
    }

    /// `node`'s link is gone: its certificate addresses stay its (unlinked),
    /// so they reach no one else.
    pub fn unlink(&mut self, node: &str, addresses: &[IpAddr]) {
        for address in addresses {
            if let Some(claim) = self.certified.get_mut(address).filter(|claim| claim.node == node) {
                claim.linked = false;
            }
        }
    }

    /// A lease holding `address` for another node than `node` lets it go
    /// and waits for it.
    fn demote_other_holder(&mut self, address: Ipv4Addr, node: &str) {
        let Some(&subnet) = self.lease_addresses.get(&address) else { return };
        if self.leases.get(&subnet).is_some_and(|route| route.node != node) {
            self.lease_addresses.remove(&address);
            self.waiting.entry(address).or_default().insert(subnet);
        }
    }

    fn is_reserved(&self, ip: IpAddr) -> bool {
        let ip4 = match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        };
        self.reserved.iter().any(|net| net.contains(&ip))
            || ip4.is_some_and(|v4| self.cloud.iter().any(|(subnet, address)| *address == v4 || subnet.contains(&v4)))
    }

    /// Why `route`'s subnet may not route, if it may not.
    fn subnet_refusal(&self, route: &LeaseRoute) -> Option<LeaseRefusal> {
        let subnet = route.subnet;
        if special_v4().iter().any(|net| overlaps(*net, subnet)) {
            return Some(LeaseRefusal::Special);
        }
        let reserved = self.reserved.iter().any(|net| match net {
            IpNet::V4(net) => overlaps(*net, subnet),
            IpNet::V6(_) => false,
        });
        let cloud = self
            .cloud
            .iter()
            .any(|(cloud_subnet, address)| overlaps(*cloud_subnet, subnet) || subnet.contains(address));
        if reserved || cloud {
            return Some(LeaseRefusal::Reserved);
        }
        // Another node's subnet inside this one, or this one inside another's.
        let inside = Ipv4Net::new(subnet.network(), 0).ok()?..=Ipv4Net::new(subnet.broadcast(), 32).ok()?;
        let covered = self.leases.range(inside).any(|(_, other)| other.node != route.node);
        let covering = self.prefix_lens.keys().filter(|&&len| len < subnet.prefix_len()).any(|&len| {
            Ipv4Net::new(subnet.network(), len)
                .ok()
                .and_then(|outer| self.leases.get(&outer.trunc()))
                .is_some_and(|other| other.node != route.node)
        });
        (covered || covering).then_some(LeaseRefusal::Overlap)
    }

    /// Why `route`'s address may not route to its node, if it may not.
    fn address_refusal(&self, route: &LeaseRoute) -> Option<LeaseRefusal> {
        let address = IpAddr::V4(route.address);
        if is_special(address) {
            return Some(LeaseRefusal::Special);
        }
        if self.is_reserved(address) {
            return Some(LeaseRefusal::Reserved);
        }
        if self.certified.get(&address).is_some_and(|claim| claim.node != route.node) {
            return Some(LeaseRefusal::Certified);
        }
        let held_by_other = self
            .lease_addresses
            .get(&route.address)
            .filter(|&&subnet| subnet != route.subnet)
            .and_then(|subnet| self.leases.get(subnet))
            .is_some_and(|holder| holder.node != route.node);
        held_by_other.then_some(LeaseRefusal::Held)
    }

    /// Adds or replaces the lease of `route.subnet`, and says what routes.
    pub fn upsert_lease(&mut self, route: LeaseRoute) -> LeaseVerdict {
        if route.cloud {
            return self.reserve_cloud(route);
        }
        let previous_holder = self.lease_addresses.get(&route.address) == Some(&route.subnet);
        self.remove_lease_keeping(route.subnet, previous_holder.then_some(route.address));
        if let Some(why) = self.subnet_refusal(&route) {
            return LeaseVerdict::Refused(why);
        }
        let verdict = match self.address_refusal(&route) {
            None => {
                self.lease_addresses.insert(route.address, route.subnet);
                LeaseVerdict::Routed
            }
            Some(why) => {
                // Holders and cloud nodes may go; loopback never does.
                if why != LeaseRefusal::Special {
                    self.waiting.entry(route.address).or_default().insert(route.subnet);
                }
                LeaseVerdict::AddressRefused(why)
            }
        };
        *self.prefix_lens.entry(route.subnet.prefix_len()).or_default() += 1;
        self.leases.insert(route.subnet, route);
        verdict
    }

    /// A cloud node's lease: its address and subnet route nowhere from now
    /// on; an edge lease holding its address lets it go (and waits).
    fn reserve_cloud(&mut self, route: LeaseRoute) -> LeaseVerdict {
        self.remove_lease_keeping(route.subnet, None);
        if let Some(&holder) = self.lease_addresses.get(&route.address) {
            self.lease_addresses.remove(&route.address);
            self.waiting.entry(route.address).or_default().insert(holder);
        }
        self.cloud.insert(route.subnet, route.address);
        LeaseVerdict::Cloud
    }

    /// Removes the lease of `subnet`, if held; a lease waiting for its
    /// address takes it.
    pub fn remove_lease(&mut self, subnet: Ipv4Net) {
        self.remove_lease_keeping(subnet, None);
    }

    /// [`RouteTable::remove_lease`], except that `keep` (the address of a
    /// lease being replaced by its own update) is not handed to a waiter.
    fn remove_lease_keeping(&mut self, subnet: Ipv4Net, keep: Option<Ipv4Addr>) {
        if let Some(address) = self.cloud.remove(&subnet) {
            if !self.lease_addresses.contains_key(&address) {
                self.promote_waiter(address);
            }
            return;
        }
        let Some(old) = self.leases.remove(&subnet) else { return };
        if let Some(count) = self.prefix_lens.get_mut(&subnet.prefix_len()) {
            *count -= 1;
            if *count == 0 {
                self.prefix_lens.remove(&subnet.prefix_len());
            }
        }
        if let Some(waiters) = self.waiting.get_mut(&old.address) {
            waiters.remove(&subnet);
            if waiters.is_empty() {
                self.waiting.remove(&old.address);
            }
        }
        if self.lease_addresses.get(&old.address) == Some(&subnet) {
            self.lease_addresses.remove(&old.address);
            if keep != Some(old.address) {
                self.promote_waiter(old.address);
            }
        }
    }

    /// The first waiting lease that may now hold `address` takes it.
    fn promote_waiter(&mut self, address: Ipv4Addr) {
        let Some(waiters) = self.waiting.get(&address).cloned() else { return };
        for subnet in waiters {
            let Some(route) = self.leases.get(&subnet).cloned() else { continue };
            if self.address_refusal(&route).is_none() {
                self.lease_addresses.insert(address, subnet);
                if let Some(left) = self.waiting.get_mut(&address) {
                    left.remove(&subnet);
                    if left.is_empty() {
                        self.waiting.remove(&address);
                    }
                }
                tracing::info!("tunnel routes: {address} now routes to node {} (its holder is gone)", route.node);
                return;
            }
        }
    }

    /// Replaces every lease with `routes` (a registry resync). Holders keep
    /// their addresses: a lease that held its address before the resync is
    /// placed first. Returns each refused lease (or address) with its reason.
    pub fn replace_leases(&mut self, routes: impl IntoIterator<Item = LeaseRoute>) -> Vec<(LeaseRoute, LeaseVerdict)> {
        let held = std::mem::take(&mut self.lease_addresses);
        self.leases.clear();
        self.waiting.clear();
        self.prefix_lens.clear();
        self.cloud.clear();
        // Cloud nodes' reservations first, then the holders, then the rest.
        let (mut first, rest): (Vec<LeaseRoute>, Vec<LeaseRoute>) =
            routes.into_iter().partition(|route| route.cloud || held.get(&route.address) == Some(&route.subnet));
        first.sort_by_key(|route| !route.cloud);
        first.extend(rest);
        let mut refused = Vec::new();
        for route in first {
            let verdict = self.upsert_lease(route.clone());
            if !matches!(verdict, LeaseVerdict::Routed | LeaseVerdict::Cloud) {
                refused.push((route, verdict));
            }
        }
        refused
    }

    /// Leases routing at least their subnet (for logs and tests).
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn lease(node: &str, address: &str, subnet: &str) -> LeaseRoute {
        LeaseRoute {
            node: node.into(),
            address: address.parse().unwrap(),
            subnet: subnet.parse().unwrap(),
            cloud: false,
        }
    }

    fn at<'a>(table: &'a RouteTable, ip: &str) -> Option<&'a str> {
        table.node_of(ip.parse().unwrap())
    }

    #[test]
    fn node_addresses_and_pod_ips_route_to_their_node() {
        let mut table = RouteTable::default();
        let refused = table.replace_leases([
            lease("edge-1", "10.0.5.7", "10.244.7.0/24"),
            lease("edge-2", "10.0.5.8", "10.244.8.0/24"),
        ]);
        assert!(refused.is_empty());
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
    fn certificate_addresses_route_and_stay_their_nodes_after_the_link() {
        let mut table = RouteTable::default();
        let ips: Vec<IpAddr> = vec!["10.0.5.7".parse().unwrap(), "fd00::7".parse().unwrap()];
        assert!(table.certify("edge-1", &ips).is_empty());
        assert_eq!(at(&table, "fd00::7"), Some("edge-1"));
        assert_eq!(at(&table, "::ffff:10.0.5.7"), Some("edge-1"));
        // Another node's certificate naming the same address, while edge-1
        // is linked: refused.
        assert_eq!(table.certify("edge-9", &ips[..1]), ips[..1].to_vec());
        assert_eq!(at(&table, "10.0.5.7"), Some("edge-1"));
        // Unlinked, edge-1 keeps its addresses: nobody else receives its traffic…
        table.unlink("edge-1", &ips);
        assert_eq!(at(&table, "fd00::7"), Some("edge-1"));
        // …until another certificate (the CA's word) names them.
        assert!(table.certify("edge-9", &ips[..1]).is_empty());
        assert_eq!(at(&table, "10.0.5.7"), Some("edge-9"));
        // Loopback in a certificate routes nowhere.
        assert_eq!(
            table.certify("edge-9", &["127.0.0.1".parse().unwrap()]),
            vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(at(&table, "127.0.0.1"), None);
    }

    #[test]
    fn a_lease_naming_another_nodes_address_is_refused_and_waits() {
        let mut table = RouteTable::default();
        assert_eq!(table.upsert_lease(lease("edge-1", "10.0.5.7", "10.244.7.0/24")), LeaseVerdict::Routed);
        // edge-2 claims edge-1's address: refused, its subnet still routes.
        let verdict = table.upsert_lease(lease("edge-2", "10.0.5.7", "10.244.8.0/24"));
        assert_eq!(verdict, LeaseVerdict::AddressRefused(LeaseRefusal::Held));
        assert_eq!(at(&table, "10.0.5.7"), Some("edge-1"));
        assert_eq!(at(&table, "10.244.8.1"), Some("edge-2"));
        // edge-1's own update keeps its address (no waiter jumps in).
        assert_eq!(table.upsert_lease(lease("edge-1", "10.0.5.7", "10.244.7.0/24")), LeaseVerdict::Routed);
        assert_eq!(at(&table, "10.0.5.7"), Some("edge-1"));
        // A resync in the claimant's favour of order keeps the holder.
        let refused = table.replace_leases([
            lease("edge-2", "10.0.5.7", "10.244.8.0/24"),
            lease("edge-1", "10.0.5.7", "10.244.7.0/24"),
        ]);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0.node, "edge-2");
        assert_eq!(at(&table, "10.0.5.7"), Some("edge-1"));
        // The holder's lease goes: the waiter takes the address.
        table.remove_lease("10.244.7.0/24".parse().unwrap());
        assert_eq!(at(&table, "10.0.5.7"), Some("edge-2"));
    }

    #[test]
    fn certificates_outrank_leases() {
        let mut table = RouteTable::default();
        // edge-2's lease came first, naming edge-1's certified address.
        assert_eq!(table.upsert_lease(lease("edge-2", "10.0.5.7", "10.244.8.0/24")), LeaseVerdict::Routed);
        assert!(table.certify("edge-1", &["10.0.5.7".parse().unwrap()]).is_empty());
        assert_eq!(at(&table, "10.0.5.7"), Some("edge-1"));
        // The lease's update is refused now, and the unlinked certificate
        // still outranks it.
        let verdict = table.upsert_lease(lease("edge-2", "10.0.5.7", "10.244.8.0/24"));
        assert_eq!(verdict, LeaseVerdict::AddressRefused(LeaseRefusal::Certified));
        table.unlink("edge-1", &["10.0.5.7".parse().unwrap()]);
        table.remove_lease("10.244.99.0/24".parse().unwrap());
        assert_eq!(at(&table, "10.0.5.7"), Some("edge-1"));
        assert_eq!(table.lease_address_of("edge-2"), None);
        // edge-1's own lease with its certified address routes.
        assert_eq!(table.upsert_lease(lease("edge-1", "10.0.5.7", "10.244.7.0/24")), LeaseVerdict::Routed);
    }

    #[test]
    fn special_reserved_and_overlapping_leases_are_refused() {
        let mut table = RouteTable::with_reserved(vec!["192.168.0.10/32".parse().unwrap()]);
        let refused = |table: &mut RouteTable, l: LeaseRoute| table.upsert_lease(l);
        use LeaseRefusal::*;
        use LeaseVerdict::*;
        assert_eq!(refused(&mut table, lease("a", "127.0.0.1", "10.244.1.0/24")), AddressRefused(Special));
        assert_eq!(refused(&mut table, lease("b", "0.0.0.0", "10.244.2.0/24")), AddressRefused(Special));
        assert_eq!(refused(&mut table, lease("c", "169.254.1.1", "10.244.3.0/24")), AddressRefused(Special));
        assert_eq!(refused(&mut table, lease("d", "224.0.0.1", "10.244.4.0/24")), AddressRefused(Special));
        assert_eq!(refused(&mut table, lease("e", "192.168.0.10", "10.244.5.0/24")), AddressRefused(Reserved));
        assert_eq!(refused(&mut table, lease("f", "10.0.5.6", "127.0.0.0/24")), Refused(Special));
        assert_eq!(refused(&mut table, lease("g", "10.0.5.7", "192.168.0.0/24")), Refused(Reserved));
        assert_eq!(refused(&mut table, lease("h", "10.0.5.8", "10.244.0.0/16")), Refused(Overlap));
        assert_eq!(refused(&mut table, lease("i", "10.0.5.9", "10.244.1.128/25")), Refused(Overlap));
        for ip in ["127.0.0.1", "0.0.0.0", "192.168.0.10", "192.168.0.1", "10.244.0.1", "10.244.1.200"] {
            assert_ne!(at(&table, ip), Some("f"), "{ip}");
        }
        assert_eq!(at(&table, "127.0.0.1"), None);
        assert_eq!(at(&table, "192.168.0.10"), None);
        assert_eq!(at(&table, "10.244.1.200"), Some("a"), "the subnet of a lease with a refused address routes");
        assert_eq!(at(&table, "10.244.0.1"), None);
        assert_eq!(table.lease_count(), 5);
        assert!(is_special("::1".parse().unwrap()) && is_special("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_special("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn a_cloud_nodes_lease_reserves_its_address_and_subnet() {
        let mut table = RouteTable::default();
        // An edge lease got there first with the cloud node's address.
        assert_eq!(table.upsert_lease(lease("edge-2", "192.168.0.10", "10.244.8.0/24")), LeaseVerdict::Routed);
        let cloud = LeaseRoute { cloud: true, ..lease("cloud-1", "192.168.0.10", "10.244.1.0/24") };
        assert_eq!(table.upsert_lease(cloud.clone()), LeaseVerdict::Cloud);
        assert_eq!(at(&table, "192.168.0.10"), None, "the cloud's address is nobody's");
        assert_eq!(at(&table, "10.244.1.7"), None, "nor its pods'");
        assert_eq!(at(&table, "10.244.8.7"), Some("edge-2"), "the edge lease keeps its subnet");
        use LeaseRefusal::Reserved;
        let claim = lease("edge-3", "192.168.0.10", "10.244.9.0/24");
        assert_eq!(table.upsert_lease(claim), LeaseVerdict::AddressRefused(Reserved));
        assert_eq!(table.upsert_lease(lease("edge-4", "10.0.5.4", "10.244.1.0/25")), LeaseVerdict::Refused(Reserved));
        // A resync keeps the reservation whatever the order.
        let refused = table.replace_leases([lease("edge-2", "192.168.0.10", "10.244.8.0/24"), cloud]);
        assert_eq!(refused.len(), 1);
        assert_eq!(at(&table, "192.168.0.10"), None);
        // The cloud node's lease goes: a waiting claimant takes the address.
        table.remove_lease("10.244.1.0/24".parse().unwrap());
        assert_eq!(at(&table, "192.168.0.10"), Some("edge-2"));
    }

    #[test]
    fn the_longest_prefix_wins_within_a_node_and_removal_keeps_the_rest() {
        let mut table = RouteTable::default();
        table.upsert_lease(lease("big", "10.0.0.1", "10.244.0.0/16"));
        assert_eq!(table.upsert_lease(lease("big", "10.0.0.1", "10.244.3.0/24")), LeaseVerdict::Routed);
        assert_eq!(at(&table, "10.244.3.9"), Some("big"));
        table.remove_lease("10.244.3.0/24".parse().unwrap());
        assert_eq!(at(&table, "10.244.3.9"), Some("big"));
        table.remove_lease("10.244.0.0/16".parse().unwrap());
        assert_eq!(at(&table, "10.244.3.9"), None);
        assert!(table.prefix_lens.is_empty());
        assert!(table.lease_addresses.is_empty() && table.waiting.is_empty());
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
