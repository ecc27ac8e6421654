//! IPv4 addresses (`ip addr`).

use std::net::Ipv4Addr;

use super::wire::{self, Attrs, Message, Writer};
use super::{Change, Handle, NetlinkError, Request};

/// An IPv4 address on a link (scope global).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Address {
    /// Interface index.
    pub index: u32,
    /// The address.
    pub local: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
}

impl Address {
    pub(super) fn encode(&self, w: &mut Writer, seq: u32, add: bool) {
        let (msg_type, flags) =
            if add { (wire::RTM_NEWADDR, wire::NLM_F_CREATE | wire::NLM_F_REPLACE) } else { (wire::RTM_DELADDR, 0) };
        let start = w.begin(msg_type, flags, seq);
        w.bytes(&[wire::AF_INET, self.prefix_len, 0, wire::RT_SCOPE_UNIVERSE]);
        w.bytes(&self.index.to_ne_bytes());
        w.attr_ipv4(wire::IFA_LOCAL, self.local);
        w.attr_ipv4(wire::IFA_ADDRESS, self.local);
        w.end(start);
    }
}

fn parse(msg: &Message<'_>) -> Result<Option<Address>, NetlinkError> {
    if msg.msg_type != wire::RTM_NEWADDR || msg.payload.first() != Some(&wire::AF_INET) {
        return Ok(None);
    }
    if msg.payload.len() < 8 {
        return Err(NetlinkError::Malformed("address message shorter than ifaddrmsg".into()));
    }
    let prefix_len = msg.payload[1];
    let index = wire::u32_at(msg.payload, 4);
    let mut local = None;
    let mut address = None;
    for (attr, payload) in Attrs::new(&msg.payload[8..]) {
        match attr {
            wire::IFA_LOCAL => local = wire::ipv4(payload),
            wire::IFA_ADDRESS => address = wire::ipv4(payload),
            _ => {}
        }
    }
    Ok(local.or(address).map(|local| Address { index, local, prefix_len }))
}

/// Address operations (`ip addr`).
pub struct AddressHandle<'h>(pub(super) &'h mut Handle);

impl<'h> AddressHandle<'h> {
    /// `ip -4 addr show dev …`.
    pub fn list(self, index: u32) -> Result<Vec<Address>, NetlinkError> {
        Ok(self.list_all()?.into_iter().filter(|a| a.index == index).collect())
    }

    /// `ip -4 addr show`: every interface's.
    pub fn list_all(self) -> Result<Vec<Address>, NetlinkError> {
        self.0.dump(
            "IPv4 addresses",
            |w, seq| {
                let start = w.begin(wire::RTM_GETADDR, wire::NLM_F_DUMP, seq);
                w.bytes(&[wire::AF_INET, 0, 0, 0, 0, 0, 0, 0]);
                w.end(start);
            },
            parse,
        )
    }

    /// `ip addr replace A/P dev …`.
    pub fn replace(self, address: Address) -> Request<'h> {
        Request { handle: self.0, change: Change::AddAddress(address) }
    }

    /// `ip addr del A/P dev …`.
    pub fn delete(self, address: Address) -> Request<'h> {
        Request { handle: self.0, change: Change::DeleteAddress(address) }
    }
}
