//! Nexthop objects (`ip nexthop`) and IPv4 routes of the main table
//! (`ip route`).
//!
//! Routes through nexthop objects are what keeps programming linear in the
//! number of peers: the kernel shares one `fib_info` per gateway route of a
//! device, and inserting thousands of `via X dev flannel.1 onlink` routes
//! costs quadratic time in its hash, while `route … nhid N` does not (see the
//! kernel facts in SPEC).

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::wire::{self, Attrs, Message, Writer};
use super::{Change, Handle, NetlinkError, Request};

/// A nexthop object with one IPv4 gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nexthop {
    /// Nexthop id (non-zero).
    pub id: u32,
    /// Gateway address.
    pub gateway: Ipv4Addr,
    /// Output interface index.
    pub oif: u32,
    /// Gateway reachable on the link without a covering route.
    pub onlink: bool,
}

impl Nexthop {
    pub(super) fn encode(&self, w: &mut Writer, seq: u32, set: bool) {
        if set {
            let start = w.begin(wire::RTM_NEWNEXTHOP, wire::NLM_F_CREATE | wire::NLM_F_REPLACE, seq);
            let flags = if self.onlink { wire::RTNH_F_ONLINK } else { 0 };
            w.bytes(&[wire::AF_INET, wire::RT_SCOPE_UNIVERSE, wire::RTPROT_BOOT, 0]);
            w.bytes(&flags.to_ne_bytes());
            w.attr_u32(wire::NHA_ID, self.id);
            w.attr_u32(wire::NHA_OIF, self.oif);
            w.attr_ipv4(wire::NHA_GATEWAY, self.gateway);
            w.end(start);
        } else {
            let start = w.begin(wire::RTM_DELNEXTHOP, 0, seq);
            w.bytes(&[wire::AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0]);
            w.attr_u32(wire::NHA_ID, self.id);
            w.end(start);
        }
    }
}

/// How a route forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteVia {
    /// Through a nexthop object (`nhid ID`).
    Nexthop(u32),
    /// Through a gateway on a device (`via GW dev N [onlink]`).
    Gateway {
        /// Gateway address.
        gateway: Ipv4Addr,
        /// Output interface index.
        oif: u32,
        /// `onlink`.
        onlink: bool,
    },
    /// Directly on a device (`dev N`).
    Link {
        /// Output interface index.
        oif: u32,
    },
}

/// A unicast route of the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Destination prefix.
    pub dst: Ipv4Net,
    /// How it forwards.
    pub via: RouteVia,
    /// The output interface the kernel reports (also for nexthop routes).
    pub oif: Option<u32>,
}

impl Route {
    /// A route through nexthop object `id`.
    pub fn via_nexthop(dst: Ipv4Net, id: u32) -> Self {
        Self { dst, via: RouteVia::Nexthop(id), oif: None }
    }

    pub(super) fn encode(&self, w: &mut Writer, seq: u32, set: bool) {
        let (msg_type, flags) =
            if set { (wire::RTM_NEWROUTE, wire::NLM_F_CREATE | wire::NLM_F_REPLACE) } else { (wire::RTM_DELROUTE, 0) };
        let start = w.begin(msg_type, flags, seq);
        let (protocol, scope, kind) = if set {
            let scope = if matches!(self.via, RouteVia::Link { .. }) { 253 } else { wire::RT_SCOPE_UNIVERSE };
            (wire::RTPROT_BOOT, scope, wire::RTN_UNICAST)
        } else {
            // RT_SCOPE_NOWHERE and zeroes: delete whatever route has this prefix.
            (0, 255, 0)
        };
        let rtm_flags = match self.via {
            RouteVia::Gateway { onlink: true, .. } if set => wire::RTNH_F_ONLINK,
            _ => 0,
        };
        w.bytes(&[wire::AF_INET, self.dst.prefix_len(), 0, 0, wire::RT_TABLE_MAIN, protocol, scope, kind]);
        w.bytes(&rtm_flags.to_ne_bytes());
        w.attr_ipv4(wire::RTA_DST, self.dst.network());
        if set {
            match self.via {
                RouteVia::Nexthop(id) => w.attr_u32(wire::RTA_NH_ID, id),
                RouteVia::Gateway { gateway, oif, .. } => {
                    w.attr_ipv4(wire::RTA_GATEWAY, gateway);
                    w.attr_u32(wire::RTA_OIF, oif);
                }
                RouteVia::Link { oif } => w.attr_u32(wire::RTA_OIF, oif),
            }
        }
        w.end(start);
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.via {
            RouteVia::Nexthop(id) => write!(f, "{} nhid {id}", self.dst),
            RouteVia::Gateway { gateway, oif, onlink } => {
                write!(f, "{} via {gateway} dev #{oif}{}", self.dst, if onlink { " onlink" } else { "" })
            }
            RouteVia::Link { oif } => write!(f, "{} dev #{oif}", self.dst),
        }
    }
}

fn parse_nexthop(msg: &Message<'_>) -> Result<Option<Nexthop>, NetlinkError> {
    if msg.msg_type != wire::RTM_NEWNEXTHOP {
        return Ok(None);
    }
    if msg.payload.len() < 8 {
        return Err(NetlinkError::Malformed("nexthop message shorter than nhmsg".into()));
    }
    let onlink = wire::u32_at(msg.payload, 4) & wire::RTNH_F_ONLINK != 0;
    let (mut id, mut oif, mut gateway) = (None, None, None);
    for (attr, payload) in Attrs::new(&msg.payload[8..]) {
        match attr {
            wire::NHA_ID => id = Some(wire::u32_at(payload, 0)),
            wire::NHA_OIF => oif = Some(wire::u32_at(payload, 0)),
            wire::NHA_GATEWAY => gateway = wire::ipv4(payload),
            _ => {}
        }
    }
    // Groups, blackholes and IPv6 nexthops are not ours to manage.
    Ok(match (id, oif, gateway) {
        (Some(id), Some(oif), Some(gateway)) => Some(Nexthop { id, gateway, oif, onlink }),
        _ => None,
    })
}

fn parse_route(msg: &Message<'_>) -> Result<Option<Route>, NetlinkError> {
    if msg.msg_type != wire::RTM_NEWROUTE {
        return Ok(None);
    }
    let p = msg.payload;
    if p.len() < 12 {
        return Err(NetlinkError::Malformed("route message shorter than rtmsg".into()));
    }
    let (family, dst_len, mut table, kind) = (p[0], p[1], u32::from(p[4]), p[7]);
    let onlink = wire::u32_at(p, 8) & wire::RTNH_F_ONLINK != 0;
    let (mut dst, mut oif, mut gateway, mut nhid) = (Ipv4Addr::UNSPECIFIED, None, None, None);
    for (attr, payload) in Attrs::new(&p[12..]) {
        match attr {
            wire::RTA_DST => dst = wire::ipv4(payload).unwrap_or(dst),
            wire::RTA_OIF => oif = Some(wire::u32_at(payload, 0)),
            wire::RTA_GATEWAY => gateway = wire::ipv4(payload),
            wire::RTA_NH_ID => nhid = Some(wire::u32_at(payload, 0)),
            wire::RTA_TABLE => table = wire::u32_at(payload, 0),
            _ => {}
        }
    }
    if family != wire::AF_INET || table != u32::from(wire::RT_TABLE_MAIN) || kind != wire::RTN_UNICAST {
        return Ok(None);
    }
    let Ok(dst) = Ipv4Net::new(dst, dst_len) else {
        return Err(NetlinkError::Malformed(format!("route prefix length {dst_len}")));
    };
    let via = match (nhid, gateway, oif) {
        (Some(id), _, _) => RouteVia::Nexthop(id),
        (None, Some(gateway), Some(oif)) => RouteVia::Gateway { gateway, oif, onlink },
        (None, None, Some(oif)) => RouteVia::Link { oif },
        // Multipath routes: not something netd writes.
        _ => return Ok(None),
    };
    Ok(Some(Route { dst, via, oif }))
}

/// Nexthop operations (`ip nexthop`).
pub struct NexthopHandle<'h>(pub(super) &'h mut Handle);

impl<'h> NexthopHandle<'h> {
    /// `ip nexthop show`: every single-gateway IPv4 nexthop.
    pub fn list(self) -> Result<Vec<Nexthop>, NetlinkError> {
        self.0.dump(
            "nexthops",
            |w, seq| {
                let start = w.begin(wire::RTM_GETNEXTHOP, wire::NLM_F_DUMP, seq);
                w.bytes(&[wire::AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0]);
                w.end(start);
            },
            parse_nexthop,
        )
    }

    /// `ip nexthop replace id ID via GW dev … onlink`.
    pub fn set(self, nexthop: Nexthop) -> Request<'h> {
        Request { handle: self.0, change: Change::SetNexthop(nexthop) }
    }

    /// `ip nexthop del id ID`.
    pub fn delete(self, nexthop: Nexthop) -> Request<'h> {
        Request { handle: self.0, change: Change::DeleteNexthop(nexthop) }
    }
}

/// Route operations on the main table (`ip route`).
pub struct RouteHandle<'h>(pub(super) &'h mut Handle);

impl<'h> RouteHandle<'h> {
    /// `ip -4 route show table main`: unicast routes.
    pub fn list(self) -> Result<Vec<Route>, NetlinkError> {
        self.0.dump(
            "IPv4 routes",
            |w, seq| {
                let start = w.begin(wire::RTM_GETROUTE, wire::NLM_F_DUMP, seq);
                w.bytes(&[wire::AF_INET, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
                w.end(start);
            },
            parse_route,
        )
    }

    /// `ip route replace DST nhid ID` (or `via GW dev … onlink`).
    pub fn set(self, route: Route) -> Request<'h> {
        Request { handle: self.0, change: Change::SetRoute(route) }
    }

    /// `ip route del DST`.
    pub fn delete(self, route: Route) -> Request<'h> {
        Request { handle: self.0, change: Change::DeleteRoute(route) }
    }
}
