//! Links (`ip link`), with the VXLAN attributes flannel sets.

use std::net::Ipv4Addr;

use super::wire::{self, Attrs, Message, Writer};
use super::{Change, EthAddr, Handle, NetlinkError, Request};

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address, when the link has one.
    pub mac: Option<EthAddr>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// `IFLA_INFO_KIND` (`vxlan`, `veth`, `bridge`, …).
    pub kind: Option<String>,
    /// The VXLAN attributes of a `vxlan` link.
    pub vxlan: Option<VxlanAttrs>,
}

/// The VXLAN attributes netd cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanAttrs {
    /// VXLAN network identifier.
    pub vni: u32,
    /// Local (source) address.
    pub local: Option<Ipv4Addr>,
    /// Index of the underlay link.
    pub link: Option<u32>,
    /// UDP destination port.
    pub port: u16,
    /// MAC learning enabled.
    pub learning: bool,
}

/// A VXLAN link to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanLink {
    /// Name, e.g. `flannel.1`.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Local (source) address: the node's public IP.
    pub local: Ipv4Addr,
    /// Index of the underlay link.
    pub link: u32,
    /// UDP destination port (flannel: 8472).
    pub port: u16,
    /// MAC learning (flannel: off).
    pub learning: bool,
    /// Hardware address.
    pub mac: EthAddr,
    /// MTU.
    pub mtu: u32,
}

/// Attributes to change on an existing link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkUpdate {
    /// Interface index.
    pub index: u32,
    /// New hardware address.
    pub mac: Option<EthAddr>,
    /// New MTU.
    pub mtu: Option<u32>,
    /// Bring up or down.
    pub up: Option<bool>,
}

fn ifinfomsg(w: &mut Writer, index: u32, flags: u32, change: u32) {
    w.bytes(&[wire::AF_UNSPEC, 0, 0, 0]);
    w.bytes(&(index as i32).to_ne_bytes());
    w.bytes(&flags.to_ne_bytes());
    w.bytes(&change.to_ne_bytes());
}

impl VxlanLink {
    pub(super) fn encode_create(&self, w: &mut Writer, seq: u32) {
        let start = w.begin(wire::RTM_NEWLINK, wire::NLM_F_CREATE | wire::NLM_F_EXCL, seq);
        ifinfomsg(w, 0, 0, 0);
        w.attr_str(wire::IFLA_IFNAME, &self.name);
        w.attr_u32(wire::IFLA_MTU, self.mtu);
        w.attr(wire::IFLA_ADDRESS, &self.mac);
        let info = w.nest_begin(wire::IFLA_LINKINFO);
        w.attr_str(wire::IFLA_INFO_KIND, "vxlan");
        let data = w.nest_begin(wire::IFLA_INFO_DATA);
        w.attr_u32(wire::IFLA_VXLAN_ID, self.vni);
        w.attr_u32(wire::IFLA_VXLAN_LINK, self.link);
        w.attr_ipv4(wire::IFLA_VXLAN_LOCAL, self.local);
        w.attr(wire::IFLA_VXLAN_PORT, &self.port.to_be_bytes());
        w.attr_u8(wire::IFLA_VXLAN_LEARNING, u8::from(self.learning));
        w.nest_end(data);
        w.nest_end(info);
        w.end(start);
    }
}

impl LinkUpdate {
    pub(super) fn encode(&self, w: &mut Writer, seq: u32) {
        let start = w.begin(wire::RTM_NEWLINK, 0, seq);
        let (flags, change) = match self.up {
            Some(true) => (wire::IFF_UP, wire::IFF_UP),
            Some(false) => (0, wire::IFF_UP),
            None => (0, 0),
        };
        ifinfomsg(w, self.index, flags, change);
        if let Some(mac) = self.mac {
            w.attr(wire::IFLA_ADDRESS, &mac);
        }
        if let Some(mtu) = self.mtu {
            w.attr_u32(wire::IFLA_MTU, mtu);
        }
        w.end(start);
    }
}

pub(super) fn encode_delete(w: &mut Writer, seq: u32, index: u32) {
    let start = w.begin(wire::RTM_DELLINK, 0, seq);
    ifinfomsg(w, index, 0, 0);
    w.end(start);
}

fn parse(msg: &Message<'_>) -> Result<Option<Link>, NetlinkError> {
    if msg.msg_type != wire::RTM_NEWLINK {
        return Ok(None);
    }
    if msg.payload.len() < 16 {
        return Err(NetlinkError::Malformed("link message shorter than ifinfomsg".into()));
    }
    let mut link = Link {
        index: wire::u32_at(msg.payload, 4),
        name: String::new(),
        mac: None,
        mtu: 0,
        up: wire::u32_at(msg.payload, 8) & wire::IFF_UP != 0,
        kind: None,
        vxlan: None,
    };
    for (attr, payload) in Attrs::new(&msg.payload[16..]) {
        match attr {
            wire::IFLA_IFNAME => link.name = wire::string(payload),
            wire::IFLA_ADDRESS => link.mac = wire::mac(payload),
            wire::IFLA_MTU => link.mtu = wire::u32_at(payload, 0),
            wire::IFLA_LINKINFO => {
                for (info, data) in Attrs::new(payload) {
                    match info {
                        wire::IFLA_INFO_KIND => link.kind = Some(wire::string(data)),
                        wire::IFLA_INFO_DATA => link.vxlan = Some(parse_vxlan(data)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if link.kind.as_deref() != Some("vxlan") {
        link.vxlan = None;
    }
    Ok(Some(link))
}

fn parse_vxlan(data: &[u8]) -> VxlanAttrs {
    let mut vxlan = VxlanAttrs { vni: 0, local: None, link: None, port: 0, learning: false };
    for (attr, payload) in Attrs::new(data) {
        match attr {
            wire::IFLA_VXLAN_ID => vxlan.vni = wire::u32_at(payload, 0),
            wire::IFLA_VXLAN_LOCAL => vxlan.local = wire::ipv4(payload),
            wire::IFLA_VXLAN_LINK => vxlan.link = Some(wire::u32_at(payload, 0)),
            wire::IFLA_VXLAN_PORT => vxlan.port = u16::from_be(wire::u16_at(payload, 0)),
            wire::IFLA_VXLAN_LEARNING => vxlan.learning = payload.first().is_some_and(|&b| b != 0),
            _ => {}
        }
    }
    vxlan
}

/// Link operations (`ip link`).
pub struct LinkHandle<'h>(pub(super) &'h mut Handle);

impl<'h> LinkHandle<'h> {
    /// `ip -d link show NAME`; `None` when no such link exists.
    pub fn get(self, name: &str) -> Result<Option<Link>, NetlinkError> {
        self.0.get(
            &format!("ip link show {name}"),
            |w, seq| {
                let start = w.begin(wire::RTM_GETLINK, 0, seq);
                ifinfomsg(w, 0, 0, 0);
                w.attr_str(wire::IFLA_IFNAME, name);
                w.end(start);
            },
            |errno| errno == libc::ENODEV,
            parse,
        )
    }

    /// `ip -d link show` by index; `None` when no such link exists.
    pub fn get_by_index(self, index: u32) -> Result<Option<Link>, NetlinkError> {
        self.0.get(
            &format!("ip link show dev #{index}"),
            |w, seq| {
                let start = w.begin(wire::RTM_GETLINK, 0, seq);
                ifinfomsg(w, index, 0, 0);
                w.end(start);
            },
            |errno| errno == libc::ENODEV,
            parse,
        )
    }

    /// `ip -d link show`: every link.
    pub fn list(self) -> Result<Vec<Link>, NetlinkError> {
        self.0.dump(
            "links",
            |w, seq| {
                let start = w.begin(wire::RTM_GETLINK, wire::NLM_F_DUMP, seq);
                ifinfomsg(w, 0, 0, 0);
                w.end(start);
            },
            parse,
        )
    }

    /// `ip link add NAME type vxlan id VNI local IP dev LINK dstport PORT nolearning`.
    pub fn add_vxlan(self, link: VxlanLink) -> Request<'h> {
        Request { handle: self.0, change: Change::CreateVxlan(link) }
    }

    /// `ip link set dev … address/mtu/up`.
    pub fn set(self, update: LinkUpdate) -> Request<'h> {
        Request { handle: self.0, change: Change::SetLink(update) }
    }

    /// `ip link del dev …`.
    pub fn delete(self, index: u32) -> Request<'h> {
        Request { handle: self.0, change: Change::DeleteLink { index } }
    }
}
