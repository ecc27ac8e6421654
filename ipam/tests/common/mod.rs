//! Helpers shared by the store's integration tests.

#![allow(clippy::unwrap_used, dead_code)]

use std::net::IpAddr;

use netd_ipam::{PodRef, Range, RangeSet};

/// One range set covering `subnet`.
pub fn pool(subnet: &str) -> Vec<RangeSet> {
    vec![RangeSet::single(Range::new(subnet.parse().unwrap(), None, None, None).unwrap())]
}

/// `namespace/name`.
pub fn pod(s: &str) -> PodRef {
    s.parse().unwrap()
}

/// An address.
pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
