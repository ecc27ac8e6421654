//! The daemon's peer set and its policy: registry events folded in, with
//! autonomous peers outliving their leases until their node is back.
//!
//! An edge pool may be all autonomous nodes, so nothing here scans the
//! autonomous peers for each live one or the reverse: the kept entries are
//! indexed by VTEP MAC, public IP and node name, and subnets are ordered, so
//! one event costs lookups in proportion to what it touches.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::vxlan::PeerChange;
use netd_model::{overlaps, Lease, MacAddr};
use netd_registry::{PeerEvent, PeerLease};

/// What folding one event did to the set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Folded {
    /// The whole set was replaced (a resync): program it with a full pass.
    Replaced,
    /// These per-peer changes (possibly none).
    Changed(Vec<PeerChange>),
}

/// A multimap from a key to the subnets of the kept entries that have it.
#[derive(Debug, Clone)]
struct Index<K>(HashMap<K, BTreeSet<Ipv4Net>>);

impl<K> Default for Index<K> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<K: Hash + Eq> Index<K> {
    fn insert(&mut self, key: K, subnet: Ipv4Net) {
        self.0.entry(key).or_default().insert(subnet);
    }

    fn remove(&mut self, key: &K, subnet: &Ipv4Net) {
        if let Some(set) = self.0.get_mut(key) {
            set.remove(subnet);
            if set.is_empty() {
                self.0.remove(key);
            }
        }
    }

    fn get(&self, key: &K) -> impl Iterator<Item = Ipv4Net> + '_ {
        self.0.get(key).into_iter().flatten().copied()
    }
}

/// The peers the overlay should program, keyed by subnet.
#[derive(Debug, Default, Clone)]
pub struct PeerSet {
    peers: BTreeMap<Ipv4Net, PeerLease>,
    kept_by_mac: Index<MacAddr>,
    kept_by_ip: Index<Ipv4Addr>,
    kept_by_node: Index<String>,
}

impl PeerSet {
    /// A set holding `peers`.
    pub fn new(peers: impl IntoIterator<Item = PeerLease>) -> Self {
        let mut set = Self::default();
        for peer in peers {
            set.insert(peer);
        }
        set
    }

    /// The peers, by subnet.
    pub fn iter(&self) -> impl Iterator<Item = &PeerLease> {
        self.peers.values()
    }

    /// How many peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True when there is no peer.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The subnets, in order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        self.peers.keys().copied()
    }

    /// The leases, for the overlay.
    pub fn leases(&self) -> Vec<Lease> {
        self.peers.values().map(|p| p.lease.clone()).collect()
    }

    /// The subnets of the autonomous peers, for the snapshot.
    pub fn autonomous_subnets(&self) -> Vec<Ipv4Net> {
        self.peers.values().filter(|p| p.autonomous).map(|p| p.lease.subnet).collect()
    }

    /// Drops the peers overlapping `subnet` (our own, once leased).
    pub fn without_overlapping(mut self, subnet: Ipv4Net) -> Self {
        let gone: Vec<Ipv4Net> = self.overlapping(subnet).collect();
        for subnet in gone {
            self.remove(&subnet);
        }
        self
    }

    fn insert(&mut self, peer: PeerLease) -> Option<PeerLease> {
        let old = self.remove(&peer.lease.subnet);
        if peer.autonomous {
            let (subnet, lease) = (peer.lease.subnet, &peer.lease);
            self.kept_by_mac.insert(lease.vtep_mac, subnet);
            self.kept_by_ip.insert(lease.public_ip, subnet);
            if let Some(node) = &lease.node {
                self.kept_by_node.insert(node.clone(), subnet);
            }
        }
        self.peers.insert(peer.lease.subnet, peer);
        old
    }

    fn remove(&mut self, subnet: &Ipv4Net) -> Option<PeerLease> {
        let old = self.peers.remove(subnet)?;
        if old.autonomous {
            self.kept_by_mac.remove(&old.lease.vtep_mac, subnet);
            self.kept_by_ip.remove(&old.lease.public_ip, subnet);
            if let Some(node) = &old.lease.node {
                self.kept_by_node.remove(node, subnet);
            }
        }
        Some(old)
    }

    /// The subnets of this set that overlap `subnet`: the ones inside it
    /// (a range of the ordered map) and the ones containing it (one lookup
    /// per shorter prefix length).
    fn overlapping(&self, subnet: Ipv4Net) -> impl Iterator<Item = Ipv4Net> + '_ {
        let inside = self.peers.range(subnet..).map(|(s, _)| *s).take_while(move |s| subnet.contains(&s.network()));
        let containing = (0..subnet.prefix_len())
            .filter_map(move |len| Ipv4Net::new(subnet.network(), len).ok().map(|n| n.trunc()))
            .filter(|n| self.peers.contains_key(n));
        inside.chain(containing).filter(move |s| overlaps(*s, subnet))
    }

    /// The autonomous entries `live` supersedes (see [`supersedes`]), by
    /// lookup: same VTEP MAC, public IP or node name, or overlapping subnet.
    fn superseded_by(&self, live: &Lease) -> BTreeSet<Ipv4Net> {
        let mut found: BTreeSet<Ipv4Net> = self.kept_by_mac.get(&live.vtep_mac).collect();
        found.extend(self.kept_by_ip.get(&live.public_ip));
        if let Some(node) = &live.node {
            found.extend(self.kept_by_node.get(node));
        }
        found.extend(self.overlapping(live.subnet).filter(|s| self.peers.get(s).is_some_and(|p| p.autonomous)));
        found
    }

    /// Folds a registry event in. Autonomous peers survive the loss of
    /// their lease; a live lease for the same node or addresses supersedes
    /// what was kept for it.
    pub fn apply(&mut self, event: PeerEvent) -> Folded {
        match event {
            PeerEvent::Resync(list) => {
                // Indexes every live lease as if kept, to look kept entries up in it.
                let live = Self::new(list.iter().map(|p| PeerLease { autonomous: true, ..p.clone() }));
                let mut next = Self::new(list);
                for kept in self.peers.values().filter(|p| p.autonomous) {
                    let subnet = kept.lease.subnet;
                    match live.superseding(&kept.lease) {
                        None => {
                            tracing::info!(%subnet, "keeping autonomous peer whose lease is gone");
                            next.insert(kept.clone());
                        }
                        Some(by) if by != subnet => {
                            tracing::info!(%subnet, %by, "autonomous peer's entries superseded")
                        }
                        Some(_) => {}
                    }
                }
                *self = next;
                Folded::Replaced
            }
            PeerEvent::Upsert(peer) => {
                let mut changes = Vec::new();
                for subnet in self.superseded_by(&peer.lease) {
                    if subnet != peer.lease.subnet {
                        tracing::info!(%subnet, by = %peer.lease.subnet, "autonomous peer's entries superseded");
                        self.remove(&subnet);
                        changes.push(PeerChange::Remove(subnet));
                    }
                }
                let change = PeerChange::Upsert { lease: peer.lease.clone(), autonomous: peer.autonomous };
                if self.insert(peer.clone()).as_ref() != Some(&peer) {
                    changes.push(change);
                }
                Folded::Changed(changes)
            }
            PeerEvent::Remove(subnet) => match self.peers.get(&subnet) {
                Some(peer) if peer.autonomous => {
                    tracing::info!(%subnet, "lease of autonomous peer gone; entries kept");
                    Folded::Changed(Vec::new())
                }
                Some(_) => {
                    self.remove(&subnet);
                    Folded::Changed(vec![PeerChange::Remove(subnet)])
                }
                None => Folded::Changed(Vec::new()),
            },
        }
    }

    /// The subnet of a lease in this set that supersedes `kept`, if any,
    /// found by lookups in this set's own indexes (built over every peer by
    /// treating them all as kept).
    fn superseding(&self, kept: &Lease) -> Option<Ipv4Net> {
        let mut candidates = self.kept_by_mac.get(&kept.vtep_mac).chain(self.kept_by_ip.get(&kept.public_ip));
        let by_key = candidates.next();
        by_key
            .or_else(|| kept.node.as_ref().and_then(|node| self.kept_by_node.get(node).next()))
            .or_else(|| self.overlapping(kept.subnet).next())
    }
}

/// Whether `live`, a lease the registry holds, replaces the entries kept
/// for an autonomous peer: it covers the same addresses, or it is the same
/// node (name, VTEP MAC or public IP) back, possibly on another subnet —
/// an edge node that rebooted without its subnet.env, say.
pub fn supersedes(live: &Lease, kept: &Lease) -> bool {
    overlaps(live.subnet, kept.subnet)
        || live.vtep_mac == kept.vtep_mac
        || live.public_ip == kept.public_ip
        || (live.node.is_some() && live.node == kept.node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(subnet: &str, ip: &str, mac_last: u8, node: &str, autonomous: bool) -> PeerLease {
        PeerLease {
            lease: Lease {
                subnet: subnet.parse().unwrap(),
                public_ip: ip.parse().unwrap(),
                vtep_mac: MacAddr([0x0e, 0, 0, 0, 0, mac_last]),
                node: Some(node.into()),
            },
            autonomous,
            cloud: false,
        }
    }

    fn subnets(peers: &PeerSet) -> Vec<String> {
        peers.subnets().map(|s| s.to_string()).collect()
    }

    #[test]
    fn autonomous_peers_outlive_their_lease_until_the_node_is_back() {
        let mut peers = PeerSet::default();
        let edge = peer("10.244.3.0/24", "192.168.50.13", 3, "edge-3", true);
        let other = peer("10.244.2.0/24", "192.168.50.12", 2, "edge-2", false);
        assert_eq!(peers.apply(PeerEvent::Resync(vec![edge.clone(), other.clone()])), Folded::Replaced);
        // Both leases gone: only the autonomous peer is kept.
        peers.apply(PeerEvent::Remove("10.244.3.0/24".parse().unwrap()));
        let removed = peers.apply(PeerEvent::Remove("10.244.2.0/24".parse().unwrap()));
        assert_eq!(removed, Folded::Changed(vec![PeerChange::Remove("10.244.2.0/24".parse().unwrap())]));
        assert_eq!(subnets(&peers), ["10.244.3.0/24"]);
        peers.apply(PeerEvent::Resync(Vec::new()));
        assert_eq!(subnets(&peers), ["10.244.3.0/24"]);

        // The node comes back on another subnet (same name, MAC and IP):
        // its old entries go, in a watch event as in a resync.
        let back = peer("10.244.5.0/24", "192.168.50.13", 3, "edge-3", false);
        let mut watched = peers.clone();
        let changes = watched.apply(PeerEvent::Upsert(back.clone()));
        assert_eq!(subnets(&watched), ["10.244.5.0/24"]);
        assert_eq!(
            changes,
            Folded::Changed(vec![
                PeerChange::Remove("10.244.3.0/24".parse().unwrap()),
                PeerChange::Upsert { lease: back.lease.clone(), autonomous: false },
            ])
        );
        peers.apply(PeerEvent::Resync(vec![back]));
        assert_eq!(subnets(&peers), ["10.244.5.0/24"]);
    }

    #[test]
    fn a_lease_for_the_same_node_or_addresses_supersedes_a_kept_entry() {
        let kept = peer("10.244.3.0/24", "192.168.50.13", 3, "edge-3", true).lease;
        let unrelated = peer("10.244.4.0/24", "192.168.50.14", 4, "edge-4", false).lease;
        assert!(!supersedes(&unrelated, &kept));
        let by_subnet = Lease { subnet: "10.244.3.0/25".parse().unwrap(), ..unrelated.clone() };
        let by_mac = Lease { vtep_mac: kept.vtep_mac, ..unrelated.clone() };
        let by_ip = Lease { public_ip: kept.public_ip, ..unrelated.clone() };
        let by_name = Lease { node: kept.node.clone(), ..unrelated.clone() };
        for live in [by_subnet, by_mac, by_ip, by_name] {
            assert!(supersedes(&live, &kept), "{live:?}");
            // The indexed lookups agree with the rule, in both directions.
            let set = PeerSet::new([PeerLease { lease: kept.clone(), autonomous: true, cloud: false }]);
            assert_eq!(set.superseded_by(&live).into_iter().collect::<Vec<_>>(), vec![kept.subnet], "{live:?}");
            let live_set = PeerSet::new([PeerLease { lease: live.clone(), autonomous: true, cloud: false }]);
            assert_eq!(live_set.superseding(&kept), Some(live.subnet), "{live:?}");
        }
        // Unknown names never match each other.
        let nameless = Lease { node: None, ..unrelated };
        assert!(!supersedes(&nameless, &Lease { node: None, ..kept.clone() }));
        let set = PeerSet::new([PeerLease { lease: Lease { node: None, ..kept }, autonomous: true, cloud: false }]);
        assert!(set.superseded_by(&nameless).is_empty());
    }

    #[test]
    fn overlapping_finds_wider_and_narrower_subnets_only() {
        let set = PeerSet::new([
            peer("10.244.0.0/22", "192.168.50.20", 20, "wide", false),
            peer("10.244.8.0/25", "192.168.50.21", 21, "narrow", false),
            peer("10.244.9.0/24", "192.168.50.22", 22, "apart", false),
        ]);
        let found = |s: &str| set.overlapping(s.parse().unwrap()).map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(found("10.244.2.0/24"), ["10.244.0.0/22"]);
        assert_eq!(found("10.244.8.0/24"), ["10.244.8.0/25"]);
        assert!(found("10.244.10.0/24").is_empty());
    }

    #[test]
    fn repeated_upserts_and_unknown_removals_change_nothing() {
        let mut set = PeerSet::default();
        let a = peer("10.244.2.0/24", "192.168.50.12", 2, "edge-2", false);
        assert_eq!(
            set.apply(PeerEvent::Upsert(a.clone())).clone(),
            Folded::Changed(vec![PeerChange::Upsert { lease: a.lease.clone(), autonomous: false }])
        );
        assert_eq!(set.apply(PeerEvent::Upsert(a)), Folded::Changed(Vec::new()));
        assert_eq!(set.apply(PeerEvent::Remove("10.244.7.0/24".parse().unwrap())), Folded::Changed(Vec::new()));
        assert_eq!(set.len(), 1);
    }
}
