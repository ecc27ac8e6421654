//! rtnetlink wire format: constants, a message writer that appends many
//! messages to one buffer, and zero-copy readers for messages and attributes.
//!
//! Only what netd programs is encoded (links, addresses, neighbours, FDB,
//! nexthops, routes), straight from the kernel UAPI headers
//! (`linux/netlink.h`, `linux/rtnetlink.h`, `linux/neighbour.h`,
//! `linux/nexthop.h`, `linux/if_link.h`). Integers are host order except
//! where the kernel says `__be16` (the VXLAN port).

use std::net::Ipv4Addr;

use super::NetlinkError;

pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const NLA_HDRLEN: usize = 4;
const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);
const NLA_F_NESTED: u16 = 0x8000;

pub(crate) const NLM_F_REQUEST: u16 = 0x01;
pub(crate) const NLM_F_ACK: u16 = 0x04;
pub(crate) const NLM_F_DUMP_INTR: u16 = 0x10;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_REPLACE: u16 = 0x100;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
/// In an error ack: TLVs (extended ack) follow the original header.
pub(crate) const NLM_F_ACK_TLVS: u16 = 0x200;
/// In an error ack: the original message was capped to its header.
pub(crate) const NLM_F_CAPPED: u16 = 0x100;
pub(crate) const NLMSGERR_ATTR_MSG: u16 = 1;

pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;

pub(crate) const RTM_NEWLINK: u16 = 16;
pub(crate) const RTM_DELLINK: u16 = 17;
pub(crate) const RTM_GETLINK: u16 = 18;
pub(crate) const RTM_NEWADDR: u16 = 20;
pub(crate) const RTM_DELADDR: u16 = 21;
pub(crate) const RTM_GETADDR: u16 = 22;
pub(crate) const RTM_NEWROUTE: u16 = 24;
pub(crate) const RTM_DELROUTE: u16 = 25;
pub(crate) const RTM_GETROUTE: u16 = 26;
pub(crate) const RTM_NEWNEIGH: u16 = 28;
pub(crate) const RTM_DELNEIGH: u16 = 29;
pub(crate) const RTM_GETNEIGH: u16 = 30;
pub(crate) const RTM_NEWNEXTHOP: u16 = 104;
pub(crate) const RTM_DELNEXTHOP: u16 = 105;
pub(crate) const RTM_GETNEXTHOP: u16 = 106;

pub(crate) const AF_UNSPEC: u8 = 0;
pub(crate) const AF_INET: u8 = 2;
pub(crate) const AF_BRIDGE: u8 = 7;

// Link attributes (IFLA_*), link info and VXLAN data.
pub(crate) const IFLA_ADDRESS: u16 = 1;
pub(crate) const IFLA_IFNAME: u16 = 3;
pub(crate) const IFLA_MTU: u16 = 4;
pub(crate) const IFLA_LINKINFO: u16 = 18;
pub(crate) const IFLA_INFO_KIND: u16 = 1;
pub(crate) const IFLA_INFO_DATA: u16 = 2;
pub(crate) const IFLA_VXLAN_ID: u16 = 1;
pub(crate) const IFLA_VXLAN_LINK: u16 = 3;
pub(crate) const IFLA_VXLAN_LOCAL: u16 = 4;
pub(crate) const IFLA_VXLAN_LEARNING: u16 = 7;
pub(crate) const IFLA_VXLAN_PORT: u16 = 15;
pub(crate) const IFF_UP: u32 = 0x1;

// Address attributes.
pub(crate) const IFA_ADDRESS: u16 = 1;
pub(crate) const IFA_LOCAL: u16 = 2;

// Neighbour attributes, states and flags.
pub(crate) const NDA_DST: u16 = 1;
pub(crate) const NDA_LLADDR: u16 = 2;
pub(crate) const NDA_IFINDEX: u16 = 8;
pub(crate) const NUD_NOARP: u16 = 0x40;
pub(crate) const NUD_PERMANENT: u16 = 0x80;
pub(crate) const NTF_SELF: u8 = 0x02;

// Route message fields and attributes.
pub(crate) const RT_TABLE_MAIN: u8 = 254;
pub(crate) const RTPROT_BOOT: u8 = 3;
pub(crate) const RT_SCOPE_UNIVERSE: u8 = 0;
pub(crate) const RTN_UNICAST: u8 = 1;
pub(crate) const RTNH_F_ONLINK: u32 = 4;
pub(crate) const RTA_DST: u16 = 1;
pub(crate) const RTA_OIF: u16 = 4;
pub(crate) const RTA_GATEWAY: u16 = 5;
pub(crate) const RTA_TABLE: u16 = 15;
pub(crate) const RTA_NH_ID: u16 = 30;

// Nexthop attributes.
pub(crate) const NHA_ID: u16 = 1;
pub(crate) const NHA_OIF: u16 = 5;
pub(crate) const NHA_GATEWAY: u16 = 6;

// Multicast groups (RTNLGRP_*) for the monitor.
pub(crate) const RTNLGRP_LINK: u32 = 1;
pub(crate) const RTNLGRP_NEIGH: u32 = 3;
pub(crate) const RTNLGRP_IPV4_IFADDR: u32 = 5;
pub(crate) const RTNLGRP_IPV4_ROUTE: u32 = 7;
pub(crate) const RTNLGRP_NEXTHOP: u32 = 32;

/// Rounds up to the 4-byte netlink alignment.
pub(crate) const fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// Appends netlink messages to a buffer. Each message is opened with
/// [`Writer::begin`], filled with its fixed header and attributes, and closed
/// with [`Writer::end`], which patches the length fields.
#[derive(Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// Starts a message; returns its offset for [`Writer::end`].
    pub(crate) fn begin(&mut self, msg_type: u16, flags: u16, seq: u32) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&msg_type.to_ne_bytes());
        self.buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        start
    }

    pub(crate) fn end(&mut self, start: usize) {
        self.pad();
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn pad(&mut self) {
        let padded = align(self.buf.len());
        self.buf.resize(padded, 0);
    }

    pub(crate) fn attr(&mut self, attr_type: u16, payload: &[u8]) {
        self.pad();
        let len = (NLA_HDRLEN + payload.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&attr_type.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    pub(crate) fn attr_u32(&mut self, attr_type: u16, value: u32) {
        self.attr(attr_type, &value.to_ne_bytes());
    }

    pub(crate) fn attr_u8(&mut self, attr_type: u16, value: u8) {
        self.attr(attr_type, &[value]);
    }

    pub(crate) fn attr_ipv4(&mut self, attr_type: u16, addr: Ipv4Addr) {
        self.attr(attr_type, &addr.octets());
    }

    /// A NUL-terminated string attribute (interface names, link kinds).
    pub(crate) fn attr_str(&mut self, attr_type: u16, value: &str) {
        self.pad();
        let len = (NLA_HDRLEN + value.len() + 1) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&attr_type.to_ne_bytes());
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    /// Opens a nested attribute; close it with [`Writer::nest_end`].
    pub(crate) fn nest_begin(&mut self, attr_type: u16) -> usize {
        self.pad();
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(attr_type | NLA_F_NESTED).to_ne_bytes());
        start
    }

    pub(crate) fn nest_end(&mut self, start: usize) {
        self.pad();
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// One received netlink message.
pub(crate) struct Message<'a> {
    pub(crate) msg_type: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
    /// Everything after the 16-byte header.
    pub(crate) payload: &'a [u8],
}

/// Iterates over the messages of one datagram.
pub(crate) struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    pub(crate) fn new(datagram: &'a [u8]) -> Self {
        Self { rest: datagram }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, NetlinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32_at(self.rest, 0) as usize;
        if len < NLMSG_HDRLEN || len > self.rest.len() {
            self.rest = &[];
            return Some(Err(NetlinkError::Malformed(format!("message length {len} out of bounds"))));
        }
        let msg = Message {
            msg_type: u16_at(self.rest, 4),
            flags: u16_at(self.rest, 6),
            seq: u32_at(self.rest, 8),
            payload: &self.rest[NLMSG_HDRLEN..len],
        };
        self.rest = self.rest.get(align(len)..).unwrap_or(&[]);
        Some(Ok(msg))
    }
}

/// Iterates over `(type, payload)` of a run of attributes; the nested and
/// byte-order flag bits are masked off the type.
pub(crate) struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Attrs<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.len() < NLA_HDRLEN {
            return None;
        }
        let len = u16_at(self.rest, 0) as usize;
        if len < NLA_HDRLEN || len > self.rest.len() {
            // A malformed tail: stop rather than read garbage.
            self.rest = &[];
            return None;
        }
        let attr_type = u16_at(self.rest, 2) & NLA_TYPE_MASK;
        let payload = &self.rest[NLA_HDRLEN..len];
        self.rest = self.rest.get(align(len)..).unwrap_or(&[]);
        Some((attr_type, payload))
    }
}

pub(crate) fn u16_at(bytes: &[u8], at: usize) -> u16 {
    let mut raw = [0u8; 2];
    if let Some(src) = bytes.get(at..at + 2) {
        raw.copy_from_slice(src);
    }
    u16::from_ne_bytes(raw)
}

pub(crate) fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        raw.copy_from_slice(src);
    }
    u32::from_ne_bytes(raw)
}

pub(crate) fn i32_at(bytes: &[u8], at: usize) -> i32 {
    u32_at(bytes, at) as i32
}

/// An attribute payload as an IPv4 address, if it is one.
pub(crate) fn ipv4(payload: &[u8]) -> Option<Ipv4Addr> {
    <[u8; 4]>::try_from(payload).ok().map(Ipv4Addr::from)
}

/// An attribute payload as a MAC address, if it is one.
pub(crate) fn mac(payload: &[u8]) -> Option<[u8; 6]> {
    <[u8; 6]>::try_from(payload).ok()
}

/// A NUL-terminated string attribute.
pub(crate) fn string(payload: &[u8]) -> String {
    let end = payload.iter().position(|&b| b == 0).unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_output_parses_back_with_alignment_and_nesting() {
        let mut w = Writer::default();
        let start = w.begin(RTM_NEWLINK, NLM_F_CREATE, 7);
        w.bytes(&[0u8; 16]);
        w.attr_str(IFLA_IFNAME, "flannel.1");
        let nest = w.nest_begin(IFLA_LINKINFO);
        w.attr_str(IFLA_INFO_KIND, "vxlan");
        w.nest_end(nest);
        w.attr_u8(99, 1);
        w.end(start);
        let second = w.begin(RTM_GETLINK, NLM_F_DUMP, 8);
        w.bytes(&[0u8; 16]);
        w.end(second);
        assert_eq!(w.len() % 4, 0);

        let msgs: Vec<_> = Messages::new(&w.buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].msg_type, msgs[0].seq), (RTM_NEWLINK, 7));
        assert_eq!(msgs[0].flags, NLM_F_CREATE | NLM_F_REQUEST);
        let attrs: Vec<_> = Attrs::new(&msgs[0].payload[16..]).collect();
        assert_eq!(attrs.len(), 3);
        assert_eq!(string(attrs[0].1), "flannel.1");
        assert_eq!(attrs[1].0, IFLA_LINKINFO, "nested flag is masked off");
        let inner: Vec<_> = Attrs::new(attrs[1].1).collect();
        assert_eq!(string(inner[0].1), "vxlan");
        assert_eq!(attrs[2], (99, &[1u8][..]));
        assert_eq!(msgs[1].seq, 8);
    }

    #[test]
    fn truncated_input_is_reported_not_overread() {
        let mut w = Writer::default();
        let start = w.begin(RTM_NEWNEIGH, 0, 1);
        w.bytes(&[0u8; 12]);
        w.end(start);
        let cut = &w.buf[..w.buf.len() - 4];
        let first = Messages::new(cut).next().unwrap();
        assert!(first.is_err());
        // An attribute claiming more bytes than exist ends the iteration.
        let bogus = [40u8, 0, 1, 0, 1, 2, 3, 4];
        assert_eq!(Attrs::new(&bogus).count(), 0);
    }
}
