//! Peer validation: bad registry data is refused with a reason and never
//! disturbs the other peers.

use std::collections::{BTreeMap, HashMap};

use netd_model::MacAddr;
use std::fmt;

use ipnet::Ipv4Net;

use super::{Lease, OverlayConfig};

/// The nexthop id netd uses for a peer subnet: its network address as a
/// number. Distinct subnets of one cluster network never share a network
/// address, and the id alone tells which subnet a nexthop belongs to.
pub fn nexthop_id(subnet: Ipv4Net) -> u32 {
    u32::from(subnet.network())
}

/// A peer that was not programmed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The peer as received.
    pub peer: Lease,
    /// Why it was refused.
    pub reason: String,
    /// The programmed peer it conflicts with (overlapping subnet or shared
    /// VtepMAC); `None` when the peer is unusable on its own.
    pub conflict_with: Option<Ipv4Net>,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer {} ({} at {}, VtepMAC {}) refused: {}",
            self.peer.node.as_deref().unwrap_or("?"),
            self.peer.subnet,
            self.peer.public_ip,
            self.peer.vtep_mac,
            self.reason
        )
    }
}

/// The outcome of [`validate`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validated {
    /// Peers to program, keyed by subnet.
    pub accepted: BTreeMap<Ipv4Net, Lease>,
    /// Peers refused, with reasons.
    pub rejected: Vec<Rejected>,
}

/// Why a single peer is unusable on its own, if it is.
pub(super) fn lone_defect(config: &OverlayConfig, peer: &Lease) -> Option<String> {
    let own = &config.own;
    if !config.network.contains(&peer.subnet) {
        return Some(format!("subnet {} is outside the cluster network {}", peer.subnet, config.network));
    }
    if peer.subnet.contains(&own.subnet) || own.subnet.contains(&peer.subnet) {
        return Some(format!("subnet {} overlaps our own subnet {}", peer.subnet, own.subnet));
    }
    if peer.vtep_mac.is_multicast() || peer.vtep_mac.is_zero() {
        return Some(format!("VtepMAC {} is not a unicast address", peer.vtep_mac));
    }
    if peer.vtep_mac == own.vtep_mac {
        return Some(format!("VtepMAC {} is our own", peer.vtep_mac));
    }
    let ip = peer.public_ip;
    let unroutable = if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if u32::from(ip) >> 28 == 0xf {
        Some("reserved (240.0.0.0/4)")
    } else {
        None
    };
    if let Some(kind) = unroutable {
        return Some(format!("public IP {ip} is {kind}, not routable"));
    }
    if config.network.contains(&ip) {
        return Some(format!("public IP {ip} lies inside the pod network {}", config.network));
    }
    if ip == own.public_ip {
        return Some(format!("public IP {ip} is our own"));
    }
    None
}

/// Splits `peers` into the ones to program and the ones refused.
///
/// Per peer: subnet inside the cluster network and not overlapping ours;
/// unicast VtepMAC other than ours; public IP routable, outside the pod
/// network and not ours. Between peers, overlapping subnets and shared
/// VtepMACs cannot both be programmed: the peer already `programmed` wins,
/// then the lower subnet, and the other is refused naming the winner.
/// Exact duplicates are merged silently.
pub fn validate<'a>(
    config: &OverlayConfig,
    peers: impl IntoIterator<Item = &'a Lease>,
    programmed: &BTreeMap<Ipv4Net, Lease>,
) -> Validated {
    let mut out = Validated::default();
    let peers = peers.into_iter();
    let mut candidates: Vec<&Lease> = Vec::with_capacity(peers.size_hint().0);
    for peer in peers {
        match lone_defect(config, peer) {
            Some(reason) => out.rejected.push(Rejected { peer: peer.clone(), reason, conflict_with: None }),
            None => candidates.push(peer),
        }
    }
    // Deterministic precedence: what is in the kernel already, then by subnet.
    candidates.sort_by_key(|p| (programmed.get(&p.subnet) != Some(*p), p.subnet, p.public_ip, p.vtep_mac));
    candidates.dedup();
    let mut by_mac: HashMap<MacAddr, Ipv4Net> = HashMap::with_capacity(candidates.len());
    for peer in candidates {
        if let Some(rejected) = conflict(&out.accepted, &by_mac, peer) {
            out.rejected.push(rejected);
            continue;
        }
        by_mac.insert(peer.vtep_mac, peer.subnet);
        out.accepted.insert(peer.subnet, peer.clone());
    }
    out
}

/// Why `peer` cannot join `accepted` (whose subnets never overlap and whose
/// MACs `by_mac` indexes), if it cannot: O(log n), so one changed peer is
/// checked without looking at the others.
pub(super) fn conflict(
    accepted: &BTreeMap<Ipv4Net, Lease>,
    by_mac: &HashMap<MacAddr, Ipv4Net>,
    peer: &Lease,
) -> Option<Rejected> {
    // Accepted subnets never overlap, so only the neighbours in address
    // order can overlap a newcomer.
    let overlap = accepted
        .range(..=peer.subnet)
        .next_back()
        .map(|(s, _)| *s)
        .filter(|s| s.contains(&peer.subnet.network()))
        .or_else(|| {
            accepted.range(peer.subnet..).next().map(|(s, _)| *s).filter(|s| peer.subnet.contains(&s.network()))
        });
    if let Some(winner) = overlap {
        let reason = format!("subnet {} overlaps peer subnet {winner}", peer.subnet);
        return Some(Rejected { peer: peer.clone(), reason, conflict_with: Some(winner) });
    }
    let winner = *by_mac.get(&peer.vtep_mac)?;
    let reason = format!("VtepMAC {} is already used by the peer with subnet {winner}", peer.vtep_mac);
    Some(Rejected { peer: peer.clone(), reason, conflict_with: Some(winner) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(subnet: &str, ip: &str, mac: &str) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            public_ip: ip.parse().unwrap(),
            vtep_mac: mac.parse().unwrap(),
            node: None,
        }
    }

    fn config() -> OverlayConfig {
        OverlayConfig {
            network: "10.244.0.0/16".parse().unwrap(),
            own: lease("10.244.1.0/24", "192.168.50.11", "6e:00:00:00:00:01"),
            vni: 1,
            port: 8472,
            underlay: "eth0".into(),
            direct_routing: false,
        }
    }

    #[test]
    fn each_bad_peer_is_refused_with_its_reason_and_good_ones_pass() {
        let good = lease("10.244.2.0/24", "192.168.50.12", "6e:00:00:00:00:02");
        let cases = [
            (lease("10.244.1.0/24", "192.168.50.13", "6e:00:00:00:00:03"), "overlaps our own subnet"),
            (lease("10.245.0.0/24", "192.168.50.13", "6e:00:00:00:00:03"), "outside the cluster network"),
            (lease("10.244.3.0/24", "192.168.50.13", "01:00:5e:00:00:01"), "not a unicast"),
            (lease("10.244.3.0/24", "192.168.50.13", "00:00:00:00:00:00"), "not a unicast"),
            (lease("10.244.3.0/24", "192.168.50.13", "6e:00:00:00:00:01"), "is our own"),
            (lease("10.244.3.0/24", "127.0.0.1", "6e:00:00:00:00:03"), "loopback"),
            (lease("10.244.3.0/24", "0.0.0.0", "6e:00:00:00:00:03"), "unspecified"),
            (lease("10.244.3.0/24", "224.0.0.5", "6e:00:00:00:00:03"), "multicast"),
            (lease("10.244.3.0/24", "255.255.255.255", "6e:00:00:00:00:03"), "broadcast"),
            (lease("10.244.3.0/24", "169.254.1.1", "6e:00:00:00:00:03"), "link-local"),
            (lease("10.244.3.0/24", "10.244.9.9", "6e:00:00:00:00:03"), "inside the pod network"),
            (lease("10.244.3.0/24", "192.168.50.11", "6e:00:00:00:00:03"), "public IP 192.168.50.11 is our own"),
        ];
        for (bad, reason) in cases {
            let out = validate(&config(), &[good.clone(), bad.clone()], &BTreeMap::new());
            assert_eq!(out.accepted.len(), 1, "{bad:?}");
            assert_eq!(out.accepted.values().next(), Some(&good));
            assert_eq!(out.rejected.len(), 1);
            assert!(out.rejected[0].reason.contains(reason), "{} lacks {reason}", out.rejected[0].reason);
        }
    }

    #[test]
    fn conflicts_between_peers_keep_the_programmed_one() {
        let a = lease("10.244.2.0/24", "192.168.50.12", "6e:00:00:00:00:02");
        let wider = lease("10.244.0.0/22", "192.168.50.13", "6e:00:00:00:00:03");
        let same_mac = lease("10.244.5.0/24", "192.168.50.14", "6e:00:00:00:00:02");
        let out = validate(&config(), &[wider.clone(), a.clone(), same_mac.clone()], &BTreeMap::new());
        // The /22 overlaps our own subnet; `a` and `same_mac` conflict by MAC: lower subnet wins.
        assert_eq!(out.accepted.keys().copied().collect::<Vec<_>>(), vec![a.subnet]);
        assert_eq!(out.rejected.len(), 2);

        let b = lease("10.244.4.0/23", "192.168.50.15", "6e:00:00:00:00:05");
        let inner = lease("10.244.5.0/24", "192.168.50.16", "6e:00:00:00:00:06");
        let programmed: BTreeMap<_, _> = [(inner.subnet, inner.clone())].into();
        let out = validate(&config(), &[b.clone(), inner.clone(), inner.clone()], &programmed);
        assert_eq!(out.accepted.values().collect::<Vec<_>>(), vec![&inner], "programmed peer wins, dup merged");
        assert!(out.rejected[0].reason.contains("overlaps peer subnet 10.244.5.0/24"));
        let out = validate(&config(), &[b.clone(), inner.clone()], &BTreeMap::new());
        assert_eq!(out.accepted.values().collect::<Vec<_>>(), vec![&b], "else the lower subnet wins");
    }

    #[test]
    fn nexthop_ids_are_subnet_addresses() {
        assert_eq!(nexthop_id("10.244.2.0/24".parse().unwrap()), 0x0af4_0200);
    }
}
