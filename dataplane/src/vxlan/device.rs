//! The `flannel.<VNI>` device: create it as flannel does, and repair drift.

use ipnet::Ipv4Net;

use netd_model::MacAddr;

use netd_netlink::{Address, Change, Handle, Link, LinkUpdate, VxlanLink};

use super::{OverlayConfig, VxlanError, VXLAN_OVERHEAD};

/// The device after `ensure`: present, configured and up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Interface index of the VXLAN device.
    pub index: u32,
    /// Interface index of the underlay.
    pub underlay_index: u32,
    /// The device MTU (underlay MTU − 50).
    pub mtu: u32,
    /// The device was created (or re-created) by this call: it holds no
    /// peer entries yet.
    pub created: bool,
    /// What was found wrong and fixed, in words, for the log.
    pub repairs: Vec<String>,
}

fn mismatches(found: &Link, want: &VxlanLink) -> Option<String> {
    let Some(v) = found.vxlan.filter(|_| found.kind.as_deref() == Some("vxlan")) else {
        return Some(format!("is a {} link, not vxlan", found.kind.as_deref().unwrap_or("plain")));
    };
    let mut wrong = Vec::new();
    if v.vni != want.vni {
        wrong.push(format!("VNI {} (want {})", v.vni, want.vni));
    }
    if v.local != Some(want.local) {
        wrong.push(format!("local {:?} (want {})", v.local, want.local));
    }
    if v.link != Some(want.link) {
        wrong.push(format!("underlay #{:?} (want #{})", v.link, want.link));
    }
    if v.port != want.port {
        wrong.push(format!("port {} (want {})", v.port, want.port));
    }
    if v.learning != want.learning {
        wrong.push(format!("learning {} (want {})", v.learning, want.learning));
    }
    (!wrong.is_empty()).then(|| wrong.join(", "))
}

/// Makes `flannel.<VNI>` exactly as SPEC §2 says, with our pinned VTEP MAC:
/// VNI, port, learning off, local IP and underlay link (re-created when
/// any of these differ, since the kernel cannot change them in place);
/// MAC, MTU and up state corrected in place; the one address
/// `<subnet>.0/32`, other IPv4 addresses removed.
pub fn ensure(handle: &mut Handle, config: &OverlayConfig) -> Result<Device, VxlanError> {
    let name = config.device_name();
    let device_err = |source| VxlanError::Device { device: name.clone(), source };
    let underlay =
        handle.link().get(&config.underlay)?.ok_or_else(|| VxlanError::UnderlayMissing(config.underlay.clone()))?;
    if underlay.mtu <= VXLAN_OVERHEAD + 68 {
        return Err(VxlanError::UnderlayMtu { name: underlay.name, mtu: underlay.mtu });
    }
    let want = VxlanLink {
        name: name.clone(),
        vni: config.vni,
        local: config.own.public_ip,
        link: underlay.index,
        port: config.port,
        learning: false,
        mac: config.own.vtep_mac.0,
        mtu: underlay.mtu - VXLAN_OVERHEAD,
    };
    let mut repairs = Vec::new();
    let mut existing = handle.link().get(&name)?;
    if let Some(found) = &existing {
        if let Some(wrong) = mismatches(found, &want) {
            repairs.push(format!("{name} re-created: {wrong}"));
            handle.link().delete(found.index).execute().map_err(device_err)?;
            existing = None;
        }
    }
    let created = existing.is_none();
    let found = match existing {
        Some(found) => found,
        None => {
            if !repairs.is_empty() || !created {
                // re-creation already noted
            } else {
                repairs.push(format!("{name} created"));
            }
            handle.link().add_vxlan(want.clone()).execute().map_err(device_err)?;
            handle.link().get(&name).map_err(device_err)?.ok_or_else(|| {
                device_err(netd_netlink::NetlinkError::Malformed(format!("{name} vanished right after creation")))
            })?
        }
    };

    let mut update = LinkUpdate { index: found.index, mac: None, mtu: None, up: None };
    if found.mac != Some(want.mac) {
        if !created {
            let was = found.mac.map(|m| MacAddr(m).to_string()).unwrap_or_default();
            repairs.push(format!("{name} MAC {was} restored to {}", MacAddr(want.mac)));
        }
        update.mac = Some(want.mac);
    }
    if found.mtu != want.mtu {
        if !created {
            repairs.push(format!("{name} MTU {} set to {}", found.mtu, want.mtu));
        }
        update.mtu = Some(want.mtu);
    }

    let want_addr = Address {
        index: found.index,
        local: config.own.subnet.network(),
        prefix_len: Ipv4Net::new(config.own.subnet.network(), 32).map(|n| n.prefix_len()).unwrap_or(32),
    };
    let mut changes = Vec::new();
    let mut have_addr = false;
    for addr in handle.address().list(found.index).map_err(device_err)? {
        if addr == want_addr {
            have_addr = true;
        } else {
            repairs.push(format!("{name} stray address {}/{} removed", addr.local, addr.prefix_len));
            changes.push(Change::DeleteAddress(addr));
        }
    }
    if !have_addr {
        if !created {
            repairs.push(format!("{name} address {}/32 restored", want_addr.local));
        }
        changes.push(Change::AddAddress(want_addr));
    }
    if !found.up {
        if !created {
            repairs.push(format!("{name} brought back up"));
        }
        update.up = Some(true);
    }
    if update.mac.is_some() || update.mtu.is_some() || update.up.is_some() {
        changes.push(Change::SetLink(update));
    }
    if let Some((_, error)) = handle.apply(&changes)?.into_iter().next() {
        return Err(device_err(error));
    }
    Ok(Device { index: found.index, underlay_index: underlay.index, mtu: want.mtu, created, repairs })
}
