//! flannel's wire formats (SPEC §2): network config, lease attributes, lease
//! keys and node annotations. Output is byte-exact where flannel or its
//! consumers parse by string; input tolerates unknown fields.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{MacAddr, ModelError, NetworkConfig};

/// etcd key of the network configuration.
pub const CONFIG_KEY: &str = "/coreos.com/network/config";
/// etcd prefix of the lease keys.
pub const SUBNETS_PREFIX: &str = "/coreos.com/network/subnets/";
/// Node annotation prefix.
pub const ANNOTATION_PREFIX: &str = "flannel.alpha.coreos.com/";
/// `flannel.alpha.coreos.com/backend-type`.
pub const ANNOTATION_BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
/// `flannel.alpha.coreos.com/backend-data`.
pub const ANNOTATION_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
/// `flannel.alpha.coreos.com/public-ip`.
pub const ANNOTATION_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
/// `flannel.alpha.coreos.com/kube-subnet-manager`.
pub const ANNOTATION_KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";

/// The lease key suffix for a subnet: `10.244.3.0-24`.
pub fn subnet_key(subnet: Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

/// Parses `10.244.3.0-24` (the last path segment of a lease key).
pub fn parse_subnet_key(key: &str) -> Result<Ipv4Net, String> {
    let segment = key.rsplit('/').next().unwrap_or(key);
    let (addr, len) = segment.split_once('-').ok_or_else(|| format!("lease key {key:?} is not <ip>-<prefix>"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| format!("lease key {key:?}: {addr:?} is not an IPv4 address"))?;
    let len: u8 = len.parse().map_err(|_| format!("lease key {key:?}: {len:?} is not a prefix length"))?;
    let net = Ipv4Net::new(addr, len).map_err(|_| format!("lease key {key:?}: prefix /{len} out of range"))?;
    if net.network() != addr {
        return Err(format!("lease key {key:?} has host bits set"));
    }
    Ok(net)
}

/// `{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}`, exactly (field order, no
/// spaces): flannel and tools around it split this string.
pub fn backend_data(vni: u32, mac: MacAddr) -> String {
    format!(r#"{{"VNI":{vni},"VtepMAC":"{mac}"}}"#)
}

/// flannel's vxlan backend data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanBackendData {
    /// VXLAN network identifier.
    #[serde(rename = "VNI")]
    pub vni: u32,
    /// The node's VTEP MAC.
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: MacAddr,
}

/// Parses backend data (the annotation or the lease's `BackendData`).
pub fn parse_backend_data(text: &str) -> Result<VxlanBackendData, String> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| format!("backend data {}: {}", e.path(), e.inner()))
}

/// A lease value as flannel stores it in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    /// The node's public IP.
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    /// `vxlan`.
    #[serde(rename = "BackendType")]
    pub backend_type: String,
    /// VNI and VTEP MAC.
    #[serde(rename = "BackendData")]
    pub backend_data: Option<VxlanBackendData>,
}

impl LeaseAttrs {
    /// Our lease value.
    pub fn vxlan(public_ip: Ipv4Addr, vni: u32, mac: MacAddr) -> Self {
        Self { public_ip, backend_type: "vxlan".into(), backend_data: Some(VxlanBackendData { vni, vtep_mac: mac }) }
    }

    /// `{"PublicIP":"…","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"…"}}`.
    pub fn to_json(&self) -> String {
        match self.backend_data {
            Some(data) => format!(
                r#"{{"PublicIP":"{}","BackendType":"{}","BackendData":{}}}"#,
                self.public_ip,
                self.backend_type,
                backend_data(data.vni, data.vtep_mac)
            ),
            None => format!(r#"{{"PublicIP":"{}","BackendType":"{}"}}"#, self.public_ip, self.backend_type),
        }
    }

    /// Parses a lease value; a precise reason on failure.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let de = &mut serde_json::Deserializer::from_slice(text);
        serde_path_to_error::deserialize(de).map_err(|e| format!("lease value at `{}`: {}", e.path(), e.inner()))
    }

    /// The vxlan data, or why this lease cannot be a vxlan peer.
    pub fn vxlan_data(&self) -> Result<VxlanBackendData, String> {
        if self.backend_type != "vxlan" {
            return Err(format!("backend type {:?} is not vxlan", self.backend_type));
        }
        self.backend_data.ok_or_else(|| "vxlan lease without BackendData".to_string())
    }
}

#[derive(Deserialize)]
struct RawNetworkConfig {
    #[serde(rename = "Network")]
    network: Ipv4Net,
    #[serde(rename = "SubnetLen", default)]
    subnet_len: Option<u8>,
    #[serde(rename = "Backend", default)]
    backend: Option<RawBackend>,
}

#[derive(Deserialize)]
struct RawBackend {
    #[serde(rename = "Type", default)]
    kind: Option<String>,
    #[serde(rename = "VNI", default)]
    vni: Option<u32>,
}

/// Parses `/coreos.com/network/config` with flannel's defaults (SubnetLen
/// 24, or prefix + 2 for networks smaller than /22; VNI 1).
pub fn parse_network_config(text: &[u8]) -> Result<NetworkConfig, ModelError> {
    let de = &mut serde_json::Deserializer::from_slice(text);
    let raw: RawNetworkConfig = serde_path_to_error::deserialize(de)
        .map_err(|e| ModelError::BadNetworkConfig(format!("at `{}`: {}", e.path(), e.inner())))?;
    let backend = raw.backend.unwrap_or(RawBackend { kind: None, vni: None });
    let kind = backend.kind.as_deref().unwrap_or("udp");
    if kind != "vxlan" {
        return Err(ModelError::BadNetworkConfig(format!("Backend.Type {kind:?}: netd implements vxlan only")));
    }
    let network = raw.network.trunc();
    let default_len = if network.prefix_len() <= 22 { 24 } else { (network.prefix_len() + 2).min(30) };
    let config =
        NetworkConfig { network, subnet_len: raw.subnet_len.unwrap_or(default_len), vni: backend.vni.unwrap_or(1) };
    config.check()?;
    Ok(config)
}

/// `{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}`.
pub fn network_config_json(config: &NetworkConfig) -> String {
    format!(
        r#"{{"Network":"{}","SubnetLen":{},"Backend":{{"Type":"vxlan","VNI":{}}}}}"#,
        config.network, config.subnet_len, config.vni
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The string-split parse some flannel-adjacent tools apply to
    /// backend-data: everything between `"VtepMAC":"` and the next quote.
    fn split_parse_mac(text: &str) -> Option<&str> {
        text.split(r#""VtepMAC":""#).nth(1)?.split('"').next()
    }

    #[test]
    fn flannels_own_lease_json_is_read() {
        // As flannel v0.2x writes it (PublicIPv6 and v6 data null).
        let flannel = br#"{"PublicIP":"192.0.2.7","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"ce:11:22:33:44:55"},"BackendV6Data":null}"#;
        let attrs = LeaseAttrs::parse(flannel).unwrap();
        assert_eq!(attrs.public_ip, Ipv4Addr::new(192, 0, 2, 7));
        let data = attrs.vxlan_data().unwrap();
        assert_eq!((data.vni, data.vtep_mac.to_string().as_str()), (1, "ce:11:22:33:44:55"));
        // The SPEC's own example.
        let spec =
            br#"{"PublicIP":"192.0.2.7","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:f0"}}"#;
        assert!(LeaseAttrs::parse(spec).unwrap().vxlan_data().is_ok());
    }

    #[test]
    fn ours_is_byte_exact_and_survives_a_string_split_parse() {
        let mac: MacAddr = "6e:6d:70:09:3e:38".parse().unwrap();
        let attrs = LeaseAttrs::vxlan(Ipv4Addr::new(192, 0, 2, 7), 1, mac);
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"192.0.2.7","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"6e:6d:70:09:3e:38"}}"#
        );
        assert_eq!(LeaseAttrs::parse(attrs.to_json().as_bytes()).unwrap(), attrs);
        let data = backend_data(1, mac);
        assert_eq!(data, r#"{"VNI":1,"VtepMAC":"6e:6d:70:09:3e:38"}"#);
        assert_eq!(split_parse_mac(&data), Some("6e:6d:70:09:3e:38"));
        assert_eq!(parse_backend_data(&data).unwrap().vtep_mac, mac);
    }

    #[test]
    fn bad_lease_data_gets_precise_reasons() {
        let reason = |t: &[u8]| LeaseAttrs::parse(t).unwrap_err();
        assert!(reason(b"{\"PublicIP\":").contains("lease value"));
        assert!(reason(br#"{"PublicIP":7,"BackendType":"vxlan"}"#).contains("PublicIP"));
        assert!(reason(
            br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":"x","VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#
        )
        .contains("BackendData.VNI"));
        let udp = LeaseAttrs::parse(br#"{"PublicIP":"1.2.3.4","BackendType":"udp"}"#).unwrap();
        assert!(udp.vxlan_data().unwrap_err().contains("not vxlan"));
        assert!(parse_backend_data(r#"{"VNI":1,"VtepMAC":"zz"}"#).unwrap_err().contains("VtepMAC"));
    }

    #[test]
    fn keys_and_network_config() {
        let net: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        assert_eq!(subnet_key(net), "10.244.3.0-24");
        assert_eq!(parse_subnet_key("/coreos.com/network/subnets/10.244.3.0-24").unwrap(), net);
        for bad in ["10.244.3.0", "10.244.3.1-24", "10.244.3.0-40", "x-24"] {
            assert!(parse_subnet_key(bad).is_err(), "{bad}");
        }
        let spec = br#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#;
        let config = parse_network_config(spec).unwrap();
        assert_eq!(network_config_json(&config).as_bytes(), spec);
        let defaults =
            parse_network_config(br#"{"Network":"10.9.0.0/16","Backend":{"Type":"vxlan"},"EnableIPv6":false}"#)
                .unwrap();
        assert_eq!((defaults.subnet_len, defaults.vni), (24, 1));
        assert!(parse_network_config(br#"{"Network":"10.9.0.0/16"}"#).unwrap_err().to_string().contains("vxlan only"));
        assert!(parse_network_config(br#"{"Network":"nope"}"#).unwrap_err().to_string().contains("Network"));
    }
}
