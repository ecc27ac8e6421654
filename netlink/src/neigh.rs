//! IPv4 neighbours (`ip neigh`) and VXLAN forwarding entries (`bridge fdb`).

use std::net::Ipv4Addr;

use super::wire::{self, Attrs, Message, Writer};
use super::{Change, EthAddr, Handle, NetlinkError, Request};

/// An IPv4 neighbour entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    /// Interface index.
    pub ifindex: u32,
    /// Neighbour address.
    pub ip: Ipv4Addr,
    /// Link-layer address (absent on incomplete entries).
    pub mac: Option<EthAddr>,
    /// `NUD_*` state bits.
    pub state: u16,
}

impl Neighbour {
    /// A permanent entry, as flannel writes for each peer's VTEP.
    pub fn permanent(ifindex: u32, ip: Ipv4Addr, mac: EthAddr) -> Self {
        Self { ifindex, ip, mac: Some(mac), state: wire::NUD_PERMANENT }
    }

    /// True for entries nobody but an administrator or agent writes.
    pub fn is_permanent(&self) -> bool {
        self.state & (wire::NUD_PERMANENT | wire::NUD_NOARP) != 0
    }

    pub(super) fn encode(&self, w: &mut Writer, seq: u32, set: bool) {
        let (msg_type, flags) =
            if set { (wire::RTM_NEWNEIGH, wire::NLM_F_CREATE | wire::NLM_F_REPLACE) } else { (wire::RTM_DELNEIGH, 0) };
        let start = w.begin(msg_type, flags, seq);
        ndmsg(w, wire::AF_INET, self.ifindex, if set { wire::NUD_PERMANENT } else { 0 }, 0);
        w.attr_ipv4(wire::NDA_DST, self.ip);
        if let (true, Some(mac)) = (set, self.mac) {
            w.attr(wire::NDA_LLADDR, &mac);
        }
        w.end(start);
    }
}

/// A VXLAN FDB entry: frames for `mac` go to the VTEP at `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbEntry {
    /// Interface index of the VXLAN device.
    pub ifindex: u32,
    /// Peer VTEP MAC.
    pub mac: EthAddr,
    /// Peer public IP.
    pub dst: Ipv4Addr,
}

impl FdbEntry {
    pub(super) fn encode(&self, w: &mut Writer, seq: u32, set: bool) {
        let (msg_type, flags) =
            if set { (wire::RTM_NEWNEIGH, wire::NLM_F_CREATE | wire::NLM_F_REPLACE) } else { (wire::RTM_DELNEIGH, 0) };
        let start = w.begin(msg_type, flags, seq);
        ndmsg(w, wire::AF_BRIDGE, self.ifindex, if set { wire::NUD_PERMANENT } else { 0 }, wire::NTF_SELF);
        w.attr(wire::NDA_LLADDR, &self.mac);
        w.attr_ipv4(wire::NDA_DST, self.dst);
        w.end(start);
    }
}

fn ndmsg(w: &mut Writer, family: u8, ifindex: u32, state: u16, flags: u8) {
    w.bytes(&[family, 0, 0, 0]);
    w.bytes(&(ifindex as i32).to_ne_bytes());
    w.bytes(&state.to_ne_bytes());
    w.bytes(&[flags, 0]);
}

struct RawNeigh {
    family: u8,
    ifindex: u32,
    state: u16,
    dst: Option<Ipv4Addr>,
    lladdr: Option<EthAddr>,
}

fn parse(msg: &Message<'_>) -> Result<Option<RawNeigh>, NetlinkError> {
    if msg.msg_type != wire::RTM_NEWNEIGH {
        return Ok(None);
    }
    if msg.payload.len() < 12 {
        return Err(NetlinkError::Malformed("neighbour message shorter than ndmsg".into()));
    }
    let mut raw = RawNeigh {
        family: msg.payload[0],
        ifindex: wire::u32_at(msg.payload, 4),
        state: wire::u16_at(msg.payload, 8),
        dst: None,
        lladdr: None,
    };
    for (attr, payload) in Attrs::new(&msg.payload[12..]) {
        match attr {
            wire::NDA_DST => raw.dst = wire::ipv4(payload),
            wire::NDA_LLADDR => raw.lladdr = wire::mac(payload),
            _ => {}
        }
    }
    Ok(Some(raw))
}

fn dump_request(w: &mut Writer, seq: u32, family: u8, ifindex: u32) {
    let start = w.begin(wire::RTM_GETNEIGH, wire::NLM_F_DUMP, seq);
    ndmsg(w, family, 0, 0, 0);
    if family == wire::AF_INET {
        // Lets the kernel filter by device instead of sending every entry.
        w.attr_u32(wire::NDA_IFINDEX, ifindex);
    }
    w.end(start);
}

/// Neighbour operations (`ip neigh`).
pub struct NeighbourHandle<'h>(pub(super) &'h mut Handle);

impl<'h> NeighbourHandle<'h> {
    /// `ip -4 neigh show dev …`.
    pub fn list(self, ifindex: u32) -> Result<Vec<Neighbour>, NetlinkError> {
        let raw = self.0.dump("IPv4 neighbours", |w, seq| dump_request(w, seq, wire::AF_INET, ifindex), parse)?;
        Ok(raw
            .into_iter()
            .filter(|n| n.family == wire::AF_INET && n.ifindex == ifindex)
            .filter_map(|n| n.dst.map(|ip| Neighbour { ifindex, ip, mac: n.lladdr, state: n.state }))
            .collect())
    }

    /// `ip neigh replace IP lladdr MAC nud permanent dev …`.
    pub fn set(self, neighbour: Neighbour) -> Request<'h> {
        Request { handle: self.0, change: Change::SetNeighbour(neighbour) }
    }

    /// `ip neigh del IP dev …`.
    pub fn delete(self, neighbour: Neighbour) -> Request<'h> {
        Request { handle: self.0, change: Change::DeleteNeighbour(neighbour) }
    }
}

/// FDB operations on VXLAN devices (`bridge fdb … self`).
pub struct FdbHandle<'h>(pub(super) &'h mut Handle);

impl<'h> FdbHandle<'h> {
    /// `bridge fdb show dev …`: the entries with a remote IPv4 destination.
    pub fn list(self, ifindex: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        let raw = self.0.dump("bridge FDB", |w, seq| dump_request(w, seq, wire::AF_BRIDGE, ifindex), parse)?;
        Ok(raw
            .into_iter()
            .filter(|n| n.family == wire::AF_BRIDGE && n.ifindex == ifindex)
            .filter_map(|n| Some(FdbEntry { ifindex, mac: n.lladdr?, dst: n.dst? }))
            .collect())
    }

    /// `bridge fdb replace MAC dev … dst IP self permanent`.
    pub fn set(self, entry: FdbEntry) -> Request<'h> {
        Request { handle: self.0, change: Change::SetFdb(entry) }
    }

    /// `bridge fdb del MAC dev … dst IP self`.
    pub fn delete(self, entry: FdbEntry) -> Request<'h> {
        Request { handle: self.0, change: Change::DeleteFdb(entry) }
    }
}
