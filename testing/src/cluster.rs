//! A small cluster in network namespaces: "nodes" joined by an underlay
//! bridge, each with a `cni0` bridge and "pods" (namespaces with a veth into
//! it). Addresses follow one plan so tests, benchmarks and the demo agree:
//!
//! - underlay `192.168.50.0/24`, node *i* (1-based) at `192.168.50.(10+i)`
//!   on its `eth0`; the underlay bridge itself holds `192.168.50.1`, the
//!   "cloud" where registry servers run ([`Cluster::control_plane`]);
//! - cluster network `10.244.0.0/16`, node *i* owns `10.244.i.0/24`, its
//!   `cni0` holds `10.244.i.1`, pod *j* on it gets `10.244.i.(1+j)`.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use netd_dataplane::vxlan::{Lease, OverlayConfig, FLANNEL_VXLAN_PORT};

use super::{Bridge, HarnessError, NetNs, ServerHost, VethPair};

/// The underlay address of the control plane (registry servers).
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);

/// The cluster network of the plan.
pub const CLUSTER_NETWORK: &str = "10.244.0.0/16";

/// A pod: its namespace and address.
pub struct Pod {
    /// The pod's namespace.
    pub ns: NetNs,
    /// Its address on `eth0`.
    pub ip: Ipv4Addr,
    _veth: Option<VethPair>,
}

impl Pod {
    /// Whether one ping from this pod to `to` is answered within 2 s.
    pub fn pings(&self, to: Ipv4Addr) -> bool {
        self.ns.exec("ping", &["-c1", "-W2", &to.to_string()]).is_ok()
    }
}

/// A node: its namespace with `eth0` on the underlay and `cni0`.
pub struct Node {
    /// 1-based node number.
    pub number: u8,
    /// Node name, `node-<number>`.
    pub name: String,
    /// The node's namespace.
    pub ns: NetNs,
    /// Pods attached to `cni0`.
    pub pods: Vec<Pod>,
    _uplink: VethPair,
}

/// Underlay namespace and bridge plus the nodes.
pub struct Cluster {
    /// Nodes, in number order.
    pub nodes: Vec<Node>,
    underlay: NetNs,
    bridge: Bridge,
    /// Nodes get a pre-made `cni0` (else a CNI bridge plugin makes it).
    cni0: bool,
}

impl Node {
    /// The node's public (underlay) IP.
    pub fn public_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 50, 10 + self.number)
    }

    /// The node's pod subnet.
    pub fn subnet(&self) -> Ipv4Net {
        Ipv4Net::new(Ipv4Addr::new(10, 244, self.number, 0), 24).unwrap_or_default()
    }

    /// The lease this node would hold with `vtep_mac`.
    pub fn lease(&self, vtep_mac: netd_model::MacAddr) -> Lease {
        Lease { subnet: self.subnet(), public_ip: self.public_ip(), vtep_mac, node: Some(self.name.clone()) }
    }

    /// The overlay configuration of this node (VNI 1, underlay `eth0`).
    pub fn overlay_config(&self, vtep_mac: netd_model::MacAddr) -> OverlayConfig {
        OverlayConfig {
            network: CLUSTER_NETWORK.parse().unwrap_or_default(),
            own: self.lease(vtep_mac),
            vni: 1,
            port: FLANNEL_VXLAN_PORT,
            underlay: "eth0".into(),
            direct_routing: false,
        }
    }

    /// Adds a pod with the next address of the node's subnet, unless
    /// `ip` is given.
    pub fn add_pod(&mut self, ip: Option<Ipv4Addr>) -> Result<&Pod, HarnessError> {
        let ns = NetNs::new()?;
        let ip = ip.unwrap_or(Ipv4Addr::new(10, 244, self.number, 2 + self.pods.len() as u8));
        let host_end = format!("veth{}", self.pods.len());
        let veth = VethPair::new((Some(&self.ns), &host_end), (Some(&ns), "eth0"))?;
        self.ns.ip(&["link", "set", &host_end, "master", "cni0"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["route", "add", "default", "via", &format!("10.244.{}.1", self.number)])?;
        self.pods.push(Pod { ns, ip, _veth: Some(veth) });
        self.pods.last().ok_or_else(|| HarnessError::Usage("pod list empty after push".into()))
    }
}

impl Cluster {
    /// `nodes` nodes with `pods_per_node` pods each; no overlay yet.
    pub fn new(nodes: u8, pods_per_node: usize) -> Result<Self, HarnessError> {
        let underlay = NetNs::new()?;
        let bridge = Self::underlay_bridge(&underlay)?;
        let mut cluster = Self { nodes: Vec::new(), underlay, bridge, cni0: true };
        for number in 1..=nodes {
            let node = cluster.boot_node(number)?;
            cluster.nodes.push(node);
            for _ in 0..pods_per_node {
                cluster.nodes[usize::from(number - 1)].add_pod(None)?;
            }
        }
        Ok(cluster)
    }

    /// `nodes` nodes with only their underlay `eth0`: no `cni0`, no pods;
    /// pods are attached with a CNI plugin, which creates the bridge.
    pub fn bare(nodes: u8) -> Result<Self, HarnessError> {
        let underlay = NetNs::new()?;
        let bridge = Self::underlay_bridge(&underlay)?;
        let mut cluster = Self { nodes: Vec::new(), underlay, bridge, cni0: false };
        for number in 1..=nodes {
            let node = cluster.boot_node(number)?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    fn underlay_bridge(underlay: &NetNs) -> Result<Bridge, HarnessError> {
        let bridge = Bridge::new(Some(underlay), "br-underlay")?;
        // A bridge without a set MAC takes its lowest port's, so a node
        // reboot (its port re-created) would change the control plane's MAC
        // under the other nodes' ARP caches, as no real switch does.
        underlay.ip(&["link", "set", "br-underlay", "address", "02:50:00:00:00:fe"])?;
        underlay.ip(&["addr", "add", &format!("{CONTROL_PLANE_IP}/24"), "dev", "br-underlay"])?;
        Ok(bridge)
    }

    /// Where registry servers run so that every node reaches them over the
    /// underlay: [`CONTROL_PLANE_IP`] inside the underlay namespace. Servers
    /// started there must be dropped before the cluster.
    pub fn control_plane(&self) -> ServerHost {
        ServerHost::in_netns(&self.underlay, CONTROL_PLANE_IP)
    }

    fn boot_node(&self, number: u8) -> Result<Node, HarnessError> {
        let ns = NetNs::new()?;
        let port = format!("port{number}");
        let uplink = VethPair::new((Some(&self.underlay), &port), (Some(&ns), "eth0"))?;
        self.bridge.attach(&port)?;
        // A NIC keeps its MAC across reboots; peers' ARP caches rely on it.
        ns.ip(&["link", "set", "eth0", "address", &format!("02:50:00:00:00:{number:02x}")])?;
        ns.ip(&["addr", "add", &format!("192.168.50.{}/24", 10 + number), "dev", "eth0"])?;
        if self.cni0 {
            ns.ip(&["link", "add", "cni0", "type", "bridge"])?;
            ns.ip(&["addr", "add", &format!("10.244.{number}.1/24"), "dev", "cni0"])?;
            ns.ip(&["link", "set", "cni0", "up"])?;
        }
        ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        Ok(Node { number, name: format!("node-{number}"), ns, pods: Vec::new(), _uplink: uplink })
    }

    /// "Reboots" node `number`: its namespace is destroyed (with everything
    /// the kernel held for it) and a fresh one is booted with the same
    /// underlay address and `cni0`; its pods come back with the same IPs.
    pub fn reboot(&mut self, number: u8) -> Result<&mut Node, HarnessError> {
        let index = self
            .nodes
            .iter()
            .position(|n| n.number == number)
            .ok_or_else(|| HarnessError::Usage(format!("no node {number}")))?;
        let old = self.nodes.remove(index);
        let pod_ips: Vec<Ipv4Addr> = old.pods.iter().map(|p| p.ip).collect();
        drop(old);
        let mut node = self.boot_node(number)?;
        for ip in pod_ips {
            node.add_pod(Some(ip))?;
        }
        self.nodes.insert(index, node);
        Ok(&mut self.nodes[index])
    }

    /// The node with this number.
    pub fn node(&self, number: u8) -> Option<&Node> {
        self.nodes.iter().find(|n| n.number == number)
    }
}
