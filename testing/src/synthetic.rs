//! A synthetic cluster of any size for benchmarks: node 0 is us, peers are
//! numbered from 1. Subnets `10.<i/256>.<i%256>.0/24` of `10.0.0.0/8`,
//! public IPs `172.16.0.0/12` from `172.16.0.10 + i`, MACs `0e:00:00:…:i`.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netd_model::MacAddr;

use super::{HarnessError, NetNs};
use netd_dataplane::vxlan::{Lease, OverlayConfig, FLANNEL_VXLAN_PORT};

/// Our public IP in the synthetic cluster.
pub const SYNTHETIC_OWN_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);

/// Peer `i` (1 ≤ i < 65 536).
pub fn synthetic_peer(i: u32) -> Lease {
    Lease {
        subnet: Ipv4Net::new(Ipv4Addr::new(10, (i >> 8) as u8, i as u8, 0), 24).unwrap_or_default(),
        public_ip: Ipv4Addr::from(u32::from(SYNTHETIC_OWN_IP) + 9 + i),
        vtep_mac: MacAddr([0x0e, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
        node: None,
    }
}

/// Our overlay configuration: subnet `10.0.0.0/24`, underlay `eth0`.
pub fn synthetic_config() -> OverlayConfig {
    OverlayConfig {
        network: Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8).unwrap_or_default(),
        own: Lease {
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 24).unwrap_or_default(),
            public_ip: SYNTHETIC_OWN_IP,
            vtep_mac: MacAddr([0x0e, 0xff, 0, 0, 0, 1]),
            node: None,
        },
        vni: 1,
        port: FLANNEL_VXLAN_PORT,
        underlay: "eth0".into(),
        direct_routing: false,
    }
}

/// A fresh namespace whose `eth0` (a veth, peer `eth0p` in the same
/// namespace) holds [`SYNTHETIC_OWN_IP`]`/12`.
pub fn synthetic_node() -> Result<NetNs, HarnessError> {
    let ns = NetNs::new()?;
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"])?;
    ns.ip(&["addr", "add", &format!("{SYNTHETIC_OWN_IP}/12"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["link", "set", "eth0p", "up"])?;
    Ok(ns)
}
