//! Address pools: host-local's `ranges` model (a range set per interface
//! address, a range per subnet), with network, broadcast and gateway reserved.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Why a range or range set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The subnet has host bits set (`10.0.0.5/24` instead of `10.0.0.0/24`).
    #[error("subnet {subnet} has host bits set; the network address is {network}")]
    HostBitsSet {
        /// The subnet as written.
        subnet: IpNet,
        /// Its network address.
        network: IpAddr,
    },
    /// /31, /32 (or /127, /128) subnets hold no address besides network and broadcast.
    #[error("subnet {0} is too small to allocate from (need a prefix of /30 or shorter for IPv4, /126 for IPv6)")]
    TooSmall(IpNet),
    /// rangeStart/rangeEnd/gateway of another family than the subnet.
    #[error("{field} {addr} is not of the same IP family as subnet {subnet}")]
    FamilyMismatch {
        /// Which setting.
        field: &'static str,
        /// Its value.
        addr: IpAddr,
        /// The subnet.
        subnet: IpNet,
    },
    /// rangeStart/rangeEnd outside the subnet, or on its network/broadcast address.
    #[error("{field} {addr} is not a usable address of subnet {subnet}")]
    OutsideSubnet {
        /// Which setting.
        field: &'static str,
        /// Its value.
        addr: IpAddr,
        /// The subnet.
        subnet: IpNet,
    },
    /// rangeStart after rangeEnd.
    #[error("rangeStart {start} is after rangeEnd {end}")]
    StartAfterEnd {
        /// rangeStart.
        start: IpAddr,
        /// rangeEnd.
        end: IpAddr,
    },
    /// After reserving the gateway, nothing is left.
    #[error("range {0} has no allocatable address once network, broadcast and gateway are reserved")]
    Empty(String),
    /// A range set with no range.
    #[error("a range set needs at least one range")]
    NoRanges,
    /// Two ranges of one set overlap.
    #[error("ranges {0} and {1} overlap")]
    Overlap(String, String),
    /// Ranges of one set mix IPv4 and IPv6.
    #[error("range set mixes IPv4 and IPv6 ranges ({0} and {1})")]
    MixedFamilies(String, String),
}

/// Numeric form of an address: IPv4 and IPv6 share one arithmetic.
pub(crate) fn to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub(crate) fn from_u128(value: u128, v4: bool) -> IpAddr {
    if v4 {
        // Values of IPv4 ranges never exceed u32::MAX: they come from to_u128 of v4 addresses.
        IpAddr::V4(Ipv4Addr::from(u32::try_from(value).unwrap_or(u32::MAX)))
    } else {
        IpAddr::V6(Ipv6Addr::from(value))
    }
}

/// One contiguous range inside a subnet (host-local's `range` object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    subnet: IpNet,
    start: u128,
    end: u128,
    gateway: Option<IpAddr>,
}

impl Range {
    /// Validates a range the way host-local does, but stricter about the
    /// reserved addresses: the network address, the IPv4 broadcast address and
    /// the gateway are never handed out.
    ///
    /// Defaults: `range_start` = network + 1, `range_end` = last address
    /// (broadcast − 1 for IPv4), `gateway` = network + 1 (pass `Some` to move it).
    ///
    /// ```
    /// use netd_ipam::Range;
    /// let range = Range::new("10.244.3.0/24".parse().unwrap(), None, None, None).unwrap();
    /// assert_eq!(range.gateway().unwrap().to_string(), "10.244.3.1");
    /// assert_eq!(range.capacity(), 253);
    /// ```
    pub fn new(
        subnet: IpNet,
        range_start: Option<IpAddr>,
        range_end: Option<IpAddr>,
        gateway: Option<IpAddr>,
    ) -> Result<Self, PoolError> {
        if subnet.addr() != subnet.network() {
            return Err(PoolError::HostBitsSet { subnet, network: subnet.network() });
        }
        if subnet.prefix_len() + 2 > subnet.max_prefix_len() {
            return Err(PoolError::TooSmall(subnet));
        }
        let v4 = matches!(subnet, IpNet::V4(_));
        let network = to_u128(subnet.network());
        let last = to_u128(subnet.broadcast()) - u128::from(v4);
        let check = |field: &'static str, addr: IpAddr| -> Result<u128, PoolError> {
            if addr.is_ipv4() != v4 {
                return Err(PoolError::FamilyMismatch { field, addr, subnet });
            }
            let value = to_u128(addr);
            if value <= network || value > last {
                return Err(PoolError::OutsideSubnet { field, addr, subnet });
            }
            Ok(value)
        };
        let start = range_start.map(|a| check("rangeStart", a)).transpose()?.unwrap_or(network + 1);
        let end = range_end.map(|a| check("rangeEnd", a)).transpose()?.unwrap_or(last);
        if start > end {
            return Err(PoolError::StartAfterEnd { start: from_u128(start, v4), end: from_u128(end, v4) });
        }
        let gateway = match gateway {
            Some(gw) if gw.is_ipv4() != v4 => {
                return Err(PoolError::FamilyMismatch { field: "gateway", addr: gw, subnet })
            }
            Some(gw) => Some(gw),
            None => Some(from_u128(network + 1, v4)),
        };
        let range = Self { subnet, start, end, gateway };
        if range.capacity() == 0 {
            return Err(PoolError::Empty(range.to_string()));
        }
        Ok(range)
    }

    /// The subnet (`10.244.3.0/24`).
    pub fn subnet(&self) -> IpNet {
        self.subnet
    }

    /// The gateway handed out with addresses of this range.
    pub fn gateway(&self) -> Option<IpAddr> {
        self.gateway
    }

    /// First address of the range.
    pub fn start(&self) -> IpAddr {
        from_u128(self.start, self.is_v4())
    }

    /// Last address of the range.
    pub fn end(&self) -> IpAddr {
        from_u128(self.end, self.is_v4())
    }

    fn is_v4(&self) -> bool {
        matches!(self.subnet, IpNet::V4(_))
    }

    fn gateway_value(&self) -> Option<u128> {
        self.gateway.map(to_u128).filter(|gw| (self.start..=self.end).contains(gw))
    }

    /// Whether `addr` can be handed out from this range.
    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.is_v4() && {
            let value = to_u128(addr);
            (self.start..=self.end).contains(&value) && Some(value) != self.gateway_value()
        }
    }

    /// How many addresses can be handed out (saturating for huge IPv6 ranges).
    pub fn capacity(&self) -> u128 {
        let span = (self.end - self.start).saturating_add(1);
        span - u128::from(self.gateway_value().is_some())
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.is_v4() == other.is_v4() && self.start <= other.end && other.start <= self.end
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}-{})", self.subnet, self.start(), self.end())
    }
}

/// A set of ranges one address is taken from (host-local's inner `ranges`
/// array). Dual-stack configurations use one set per family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<Range>,
}

impl RangeSet {
    /// Validates that the ranges share a family and do not overlap.
    pub fn new(ranges: Vec<Range>) -> Result<Self, PoolError> {
        let Some(first) = ranges.first() else {
            return Err(PoolError::NoRanges);
        };
        for (i, a) in ranges.iter().enumerate() {
            if a.is_v4() != first.is_v4() {
                return Err(PoolError::MixedFamilies(first.to_string(), a.to_string()));
            }
            for b in &ranges[i + 1..] {
                if a.overlaps(b) {
                    return Err(PoolError::Overlap(a.to_string(), b.to_string()));
                }
            }
        }
        Ok(Self { ranges })
    }

    /// A set with a single range.
    pub fn single(range: Range) -> Self {
        Self { ranges: vec![range] }
    }

    /// The ranges, in configuration order.
    pub fn ranges(&self) -> &[Range] {
        &self.ranges
    }

    /// The range `addr` belongs to, if any.
    pub fn range_of(&self, addr: IpAddr) -> Option<&Range> {
        self.ranges.iter().find(|r| r.contains(addr))
    }

    /// Whether `addr` can be handed out from this set.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.range_of(addr).is_some()
    }

    /// Total allocatable addresses (saturating).
    pub fn capacity(&self) -> u128 {
        self.ranges.iter().fold(0u128, |sum, r| sum.saturating_add(r.capacity()))
    }

    /// Stable key naming this set in the store (its ranges, in order).
    pub fn key(&self) -> String {
        self.ranges.iter().map(|r| format!("{}-{}", r.start(), r.end())).collect::<Vec<_>>().join(",")
    }

    /// Candidate addresses in host-local's order: starting right after `last`
    /// (the previously reserved address) when it is in the set, else at the
    /// first range's start; through every range; wrapping around once.
    pub fn candidates(&self, last: Option<IpAddr>) -> impl Iterator<Item = IpAddr> + '_ {
        let (first_range, skip_to) = last
            .and_then(|addr| {
                let value = to_u128(addr);
                self.ranges
                    .iter()
                    .position(|r| addr.is_ipv4() == r.is_v4() && (r.start..=r.end).contains(&value))
                    .map(|i| (i, Some(value)))
            })
            .unwrap_or((0, None));
        let count = self.ranges.len();
        // Visit ranges first_range.., then 0..=first_range (the part before `last`).
        (0..=count).flat_map(move |step| {
            let index = (first_range + step) % count;
            let range = &self.ranges[index];
            let (lo, hi) = match (step, skip_to) {
                (0, Some(after)) => (after.saturating_add(1), range.end),
                (s, Some(after)) if s == count => (range.start, after),
                (s, None) if s == count => (1, 0), // nothing: every range was already visited
                _ => (range.start, range.end),
            };
            let v4 = range.is_v4();
            let gateway = range.gateway_value();
            (lo..=hi).filter(move |v| Some(*v) != gateway).map(move |v| from_u128(v, v4))
        })
    }
}

impl fmt::Display for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.ranges.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(subnet: &str) -> Range {
        Range::new(subnet.parse().unwrap(), None, None, None).unwrap()
    }

    #[test]
    fn defaults_reserve_network_gateway_and_broadcast() {
        let r = range("10.244.1.0/24");
        assert_eq!(r.start().to_string(), "10.244.1.1");
        assert_eq!(r.end().to_string(), "10.244.1.254");
        assert!(!r.contains("10.244.1.0".parse().unwrap()));
        assert!(!r.contains("10.244.1.1".parse().unwrap()), "gateway");
        assert!(r.contains("10.244.1.2".parse().unwrap()));
        assert!(!r.contains("10.244.1.255".parse().unwrap()));
        assert_eq!(r.capacity(), 253);
    }

    #[test]
    fn tiny_and_misaligned_subnets_are_refused() {
        for s in ["10.0.0.5/32", "10.0.0.4/31", "fd00::1/128", "fd00::/127"] {
            assert!(
                matches!(
                    Range::new(s.parse().unwrap(), None, None, None),
                    Err(PoolError::TooSmall(_)) | Err(PoolError::HostBitsSet { .. })
                ),
                "{s}"
            );
        }
        assert_eq!(
            Range::new("10.0.0.5/24".parse().unwrap(), None, None, None),
            Err(PoolError::HostBitsSet {
                subnet: "10.0.0.5/24".parse().unwrap(),
                network: "10.0.0.0".parse().unwrap()
            })
        );
        // /30: .1 is the gateway, .2 the only address.
        let r = range("10.0.0.0/30");
        assert_eq!(r.capacity(), 1);
        assert_eq!(
            RangeSet::single(r).candidates(None).collect::<Vec<_>>(),
            vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn range_bounds_are_checked() {
        let subnet: IpNet = "10.0.0.0/24".parse().unwrap();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert!(matches!(
            Range::new(subnet, ip("10.0.1.5"), None, None),
            Err(PoolError::OutsideSubnet { field: "rangeStart", .. })
        ));
        assert!(matches!(
            Range::new(subnet, None, ip("10.0.0.255"), None),
            Err(PoolError::OutsideSubnet { field: "rangeEnd", .. })
        ));
        assert!(matches!(
            Range::new(subnet, ip("10.0.0.9"), ip("10.0.0.5"), None),
            Err(PoolError::StartAfterEnd { .. })
        ));
        assert!(matches!(Range::new(subnet, ip("fd00::1"), None, None), Err(PoolError::FamilyMismatch { .. })));
        assert!(matches!(Range::new(subnet, ip("10.0.0.1"), ip("10.0.0.1"), None), Err(PoolError::Empty(_))));
        let r = Range::new(subnet, ip("10.0.0.10"), ip("10.0.0.20"), ip("10.0.0.254")).unwrap();
        assert_eq!(r.capacity(), 11);
    }

    #[test]
    fn candidates_start_after_last_and_wrap() {
        let subnet: IpNet = "10.0.0.0/29".parse().unwrap(); // .1 gw, .2-.6
        let set = RangeSet::single(Range::new(subnet, None, None, None).unwrap());
        let order: Vec<String> = set.candidates("10.0.0.4".parse().ok()).map(|a| a.to_string()).collect();
        assert_eq!(order, ["10.0.0.5", "10.0.0.6", "10.0.0.2", "10.0.0.3", "10.0.0.4"]);
        let order: Vec<String> = set.candidates(None).map(|a| a.to_string()).collect();
        assert_eq!(order, ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]);
    }

    #[test]
    fn multi_range_sets_visit_every_range_once() {
        let a = Range::new("10.0.0.0/29".parse().unwrap(), None, None, None).unwrap();
        let b = Range::new("10.0.1.0/30".parse().unwrap(), None, None, None).unwrap();
        let set = RangeSet::new(vec![a.clone(), b.clone()]).unwrap();
        let all: Vec<String> = set.candidates("10.0.1.2".parse().ok()).map(|x| x.to_string()).collect();
        assert_eq!(all, ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.1.2"]);
        assert!(matches!(RangeSet::new(vec![a.clone(), a]), Err(PoolError::Overlap(..))));
        let v6 = Range::new("fd00::/120".parse().unwrap(), None, None, None).unwrap();
        assert!(matches!(RangeSet::new(vec![b, v6.clone()]), Err(PoolError::MixedFamilies(..))));
        assert_eq!(v6.end().to_string(), "fd00::ff");
        assert_eq!(RangeSet::new(vec![]), Err(PoolError::NoRanges));
    }
}
