//! A real cluster on one machine: a cloud node and edge nodes, each a
//! network namespace on an underlay bridge plus its own mount namespace,
//! running Debian's containerd and a real kubelet 1.20.2; etcd,
//! kube-apiserver (`Node,RBAC`, NodeRestriction, kubelet TLS verified with
//! the cluster CA), kube-controller-manager and kube-scheduler run in the
//! cloud node's network namespace. Pods are real: containerd calls the CNI
//! plugins the node has in its `/opt/cni/bin` with the conflist in its
//! `/etc/cni/net.d`, both node-private, so a DaemonSet's hostPaths land on
//! the node that runs it, as on separate machines.
//!
//! Address plan (as [`Cluster`](super::Cluster)'s): underlay
//! `192.168.50.0/24`, its bridge holds `.1` (every node's default route,
//! leading nowhere), the cloud node `.10`, edge node *i* `.(10+i)`; pod CIDRs
//! come from kube-controller-manager (`10.244.0.0/16`, /24 each).
//!
//! Per node, the harness stands in for what a machine's installer would
//! have done: Debian's CNI plugins in `/opt/cni/bin` (as the
//! `containernetworking-plugins` package or kubeadm's `kubernetes-cni`
//! would put them), the kubelet's client certificate
//! (`system:node:<name>`, as TLS bootstrap would leave it in
//! `/var/lib/kubelet/pki/kubelet-client-current.pem`) and a serving
//! certificate signed by the cluster CA, and the one kube-proxy rule a
//! hostNetwork pod needs: the `kubernetes` Service address (10.96.0.1:443)
//! DNAT'd to the API server, because no kube-proxy runs here.
//!
//! Everything goes on drop, also while a panic unwinds: the kubelets and
//! containerds, every process of a node's cgroup (shims and containers,
//! whose PID 1 ignores SIGTERM), the cgroups in every hierarchy, the mount
//! namespaces (and with them the shm, overlay and `/run/netns/cni-*` mounts
//! made inside), the network namespaces and the directories. A test process
//! killed outright leaves them to the next [`privileged`](super::privileged)
//! call's sweep.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::kube::{die_with_parent, kill, kube_binary, tail};
use super::{
    run_command, unique_name, Bridge, ControllerManagerOptions, HarnessError, KubeCluster, NetNs, ServerHost, VethPair,
    DEBIAN_CNI_DIR, KUBE_APISERVER_BIN, KUBE_APISERVER_ENV, KUBE_CONTROLLER_MANAGER_BIN, KUBE_CONTROLLER_MANAGER_ENV,
};

/// Where `cargo xtask setup` caches the built kubelet.
pub const KUBELET_BIN: &str = "/var/cache/netd/kubelet-1.20.2";
/// Set to another kubelet binary to test with it instead.
pub const KUBELET_ENV: &str = "NETD_KUBELET";
/// Where `cargo xtask setup` caches the built kube-scheduler.
pub const KUBE_SCHEDULER_BIN: &str = "/var/cache/netd/kube-scheduler-1.20.2";
/// Set to another kube-scheduler binary to test with it instead.
pub const KUBE_SCHEDULER_ENV: &str = "NETD_KUBE_SCHEDULER";
/// Where `cargo xtask setup` writes the pause and workload image archives.
pub const IMAGE_DIR: &str = "/var/cache/netd/images";
/// The sandbox image every node's containerd and kubelet use (a static
/// `pause`, built by `cargo xtask setup`).
pub const PAUSE_IMAGE: &str = "netd.test/pause:1";
/// The workload image of the tests (Debian's static busybox: sh, ping,
/// httpd, nc, wget), built by `cargo xtask setup`.
pub const WORKLOAD_IMAGE: &str = "netd.test/busybox:1";
/// Set to the archive `cargo xtask image` wrote (default
/// `target/image/netd.tar` of this workspace).
pub const NETD_IMAGE_ENV: &str = "NETD_IMAGE";
/// The underlay address of the cloud node.
pub const CLOUD_NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
/// The label the cloud node carries (set by the admin; kubelets cannot).
pub const CLOUD_ROLE_LABEL: (&str, &str) = ("node-restriction.kubernetes.io/netd-role", "cloud");

/// The underlay bridge's address: every node's default gateway.
const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
/// Where the per-node mount namespaces are pinned (bind mounts of
/// `/proc/<pid>/ns/mnt`); itself a private mount, which `unshare --mount=`
/// requires.
const MOUNT_NS_DIR: &str = "/run/netd-t-mnt";
/// The `kubernetes` Service of the API server's `--service-cluster-ip-range`.
const KUBERNETES_SERVICE: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 1), 443);
/// Host paths each node gets its own copy of (the DaemonSets' hostPaths,
/// the kubelet's and containerd's state, the CNI network namespaces).
const NODE_PRIVATE_PATHS: [&str; 11] = [
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/run/flannel",
    "/var/lib/netd",
    "/etc/netd",
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/run/netns",
    "/run/containerd",
];
/// The CNI plugins a node has before netd installs its own.
const BASE_CNI_PLUGINS: [&str; 4] = ["bridge", "host-local", "loopback", "portmap"];
/// How long a node may take to register.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(90);

/// Which side of the cloud/edge split a node is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs the control plane; labelled [`CLOUD_ROLE_LABEL`].
    Cloud,
    /// An edge node.
    Edge,
}

/// Sets up a [`RealCluster`].
#[derive(Debug, Clone)]
pub struct RealClusterBuilder {
    edges: u8,
    netd_image: bool,
    controller_manager: ControllerManagerOptions,
}

impl RealClusterBuilder {
    /// How many edge nodes (default 2).
    pub fn edges(mut self, edges: u8) -> Self {
        self.edges = edges;
        self
    }

    /// Import netd's image (from `cargo xtask image`) into every node
    /// (default: yes).
    pub fn netd_image(mut self, on: bool) -> Self {
        self.netd_image = on;
        self
    }

    /// kube-controller-manager's options (default:
    /// [`ControllerManagerOptions::default`]).
    pub fn controller_manager_options(mut self, options: ControllerManagerOptions) -> Self {
        self.controller_manager = options;
        self
    }

    /// Every binary and image this cluster needs, with the variable that
    /// overrides its path.
    fn needed(&self) -> Vec<(PathBuf, String)> {
        let mut needed = vec![
            (kube_binary(KUBE_APISERVER_ENV, KUBE_APISERVER_BIN), format!("set {KUBE_APISERVER_ENV}")),
            (
                kube_binary(KUBE_CONTROLLER_MANAGER_ENV, KUBE_CONTROLLER_MANAGER_BIN),
                format!("set {KUBE_CONTROLLER_MANAGER_ENV}"),
            ),
            (kube_binary(KUBELET_ENV, KUBELET_BIN), format!("set {KUBELET_ENV}")),
            (kube_binary(KUBE_SCHEDULER_ENV, KUBE_SCHEDULER_BIN), format!("set {KUBE_SCHEDULER_ENV}")),
            (PathBuf::from("/usr/bin/containerd"), "Debian's containerd".into()),
            (PathBuf::from("/usr/sbin/runc"), "Debian's runc".into()),
            (Path::new(IMAGE_DIR).join("pause.tar"), "the pause image".into()),
            (Path::new(IMAGE_DIR).join("busybox.tar"), "the workload image".into()),
        ];
        if self.netd_image {
            needed.push((netd_image_path(), format!("`cargo xtask image`, or set {NETD_IMAGE_ENV}")));
            needed.push((netd_cloud_image_path(), format!("`cargo xtask image` (beside {NETD_IMAGE_ENV})")));
        }
        needed
    }

    /// Whether everything this cluster needs is there. When something is
    /// missing: `Ok(false)` after saying so on stderr (a plain `cargo test`
    /// skips), or an error when [`REQUIRE_ENV`](crate::REQUIRE_ENV) is set (`cargo xtask test`
    /// never skips silently).
    pub fn available(&self) -> Result<bool, HarnessError> {
        for (path, remedy) in self.needed() {
            if !path.is_file() {
                let error = HarnessError::Usage(format!(
                    "{} is missing: run `sudo cargo xtask setup` ({remedy})",
                    path.display()
                ));
                if super::privileged_required() {
                    return Err(error);
                }
                eprintln!("skipping real-cluster test: {error}");
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Starts the control plane on the cloud node, then containerd and the
    /// kubelet on every node, and waits until every node has registered
    /// (not Ready: that takes a CNI configuration, which netd's DaemonSet
    /// installs). Everything dies with the calling thread: keep the guard
    /// on it.
    pub fn start(self) -> Result<RealCluster, HarnessError> {
        let dir = std::env::temp_dir().join(format!("{}-real", unique_name()));
        fs::create_dir_all(&dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let underlay = NetNs::new()?;
        let bridge = Bridge::new(Some(&underlay), "br0")?;
        underlay.ip(&["addr", "add", &format!("{UNDERLAY_GATEWAY}/24"), "dev", "br0"])?;
        let mut cluster =
            RealCluster { nodes: Vec::new(), scheduler: None, kube: None, _bridge: bridge, underlay, dir };
        // From here on, Drop cleans up whatever was made.
        let cloud_ns = cluster.add_netns("cloud-1", CLOUD_NODE_IP)?;
        let kube = KubeCluster::builder()
            .host(ServerHost::in_netns(&cloud_ns.0, CLOUD_NODE_IP))
            .rbac(true)
            .node_restriction(true)
            .kubelets(true)
            .controller_manager_options(self.controller_manager.clone())
            .start()?;
        cluster.kube = Some(kube);
        cluster.scheduler = Some(cluster.start_scheduler()?);
        let mut images = vec![Path::new(IMAGE_DIR).join("pause.tar"), Path::new(IMAGE_DIR).join("busybox.tar")];
        if self.netd_image {
            images.push(netd_image_path());
        }
        // The cloud's image (tunnel server, controller) goes to the cloud
        // node only, as its DaemonSets' node selector would have it: an edge
        // node that tried to run them would fail to find the image.
        let cloud_images: Vec<PathBuf> =
            images.iter().cloned().chain(self.netd_image.then(netd_cloud_image_path)).collect();
        let cloud = cluster.boot_node("cloud-1", CLOUD_NODE_IP, Role::Cloud, cloud_ns, &cloud_images)?;
        cluster.nodes.push(cloud);
        for i in 1..=self.edges {
            let ip = Ipv4Addr::new(192, 168, 50, 10 + i);
            let name = format!("edge-{i}");
            let netns = cluster.add_netns(&name, ip)?;
            let node = cluster.boot_node(&name, ip, Role::Edge, netns, &images)?;
            cluster.nodes.push(node);
        }
        for node in &cluster.nodes {
            cluster.wait_registered(node)?;
        }
        let (key, value) = CLOUD_ROLE_LABEL;
        cluster.kubectl(&["label", "node", "cloud-1", &format!("{key}={value}"), "--overwrite"])?;
        Ok(cluster)
    }
}

/// The node image's archive `cargo xtask image` wrote (`netd.tar`), or
/// [`NETD_IMAGE_ENV`].
pub fn netd_image_path() -> PathBuf {
    std::env::var_os(NETD_IMAGE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/image/netd.tar"))
}

/// The cloud image's archive (`netd-cloud.tar`), which `cargo xtask image`
/// writes beside [`netd_image_path`].
pub fn netd_cloud_image_path() -> PathBuf {
    netd_image_path().with_file_name("netd-cloud.tar")
}

/// A network namespace with its uplink, before a node runs in it.
type NodeNetns = (NetNs, VethPair);

/// A cloud node and edge nodes running real kubelets and containerd, with
/// their control plane; built by [`RealCluster::builder`]. Nodes, address
/// plan and clean-up as the `testing` module's documentation describes.
#[derive(Debug)]
pub struct RealCluster {
    // Fields drop in order: nodes (kubelets, containerds, pods) first, then
    // the scheduler and the control plane, then the underlay.
    nodes: Vec<RealNode>,
    scheduler: Option<Child>,
    kube: Option<KubeCluster>,
    _bridge: Bridge,
    underlay: NetNs,
    dir: PathBuf,
}

impl RealCluster {
    /// A cluster of one cloud node and two edge nodes, netd's image imported.
    pub fn builder() -> RealClusterBuilder {
        RealClusterBuilder { edges: 2, netd_image: true, controller_manager: ControllerManagerOptions::default() }
    }

    /// The control plane.
    pub fn kube(&self) -> Result<&KubeCluster, HarnessError> {
        self.kube.as_ref().ok_or_else(|| HarnessError::Usage("the control plane is not running".into()))
    }

    /// The control plane, to restart the API server with other flags.
    pub fn kube_mut(&mut self) -> Result<&mut KubeCluster, HarnessError> {
        self.kube.as_mut().ok_or_else(|| HarnessError::Usage("the control plane is not running".into()))
    }

    /// Cuts the cloud off from the edge as NAT and firewalls do: the cloud
    /// node can no longer open a connection to an edge node (replies to
    /// connections the edge opened still pass: kubelets reach the API
    /// server, agents their tunnel server), and no VXLAN crosses between
    /// them either way. From here on the cloud reaches edge kubelets and
    /// pods only through the tunnel.
    pub fn cut_cloud_from_edges(&self) -> Result<(), HarnessError> {
        let edges: Vec<String> = self.nodes.iter().filter(|n| n.role == Role::Edge).map(|n| n.ip.to_string()).collect();
        let set = format!("{{ {} }}", edges.join(", "));
        let rules = format!(
            "table inet netd-t-wan {{\n\
             \tchain output {{ type filter hook output priority 0; \
             ip daddr {set} udp dport {vxlan} drop; ip daddr {set} ct state new drop; }}\n\
             \tchain input {{ type filter hook input priority 0; ip saddr {set} udp dport {vxlan} drop; }}\n}}\n",
            vxlan = netd_dataplane::vxlan::FLANNEL_VXLAN_PORT,
        );
        let cloud = self
            .nodes
            .iter()
            .find(|n| n.role == Role::Cloud)
            .ok_or_else(|| HarnessError::Usage("no cloud node".into()))?;
        let file = self.dir.join("wan.nft");
        write(&file, rules)?;
        cloud.ns.exec("nft", &["-f", &file.to_string_lossy()]).map(|_| ())
    }

    /// Cuts edge node `name` off from the cloud entirely, as a link that
    /// goes down does: nothing passes between it and the cloud node (the
    /// API server, the tunnel server, VXLAN) either way; its links to other
    /// edge nodes stay. The rules live in the cloud node, so they outlast a
    /// [`RealNode::power_cut`] of the edge node. Undone by
    /// [`reconnect_to_cloud`](Self::reconnect_to_cloud).
    pub fn isolate_from_cloud(&self, name: &str) -> Result<(), HarnessError> {
        let edge = self.node(name)?.ip;
        let table = isolation_table(name);
        let rules = format!(
            "table inet {table} {{\n\
             \tchain output {{ type filter hook output priority -10; ip daddr {edge} drop; }}\n\
             \tchain input {{ type filter hook input priority -10; ip saddr {edge} drop; }}\n}}\n"
        );
        let file = self.dir.join(format!("{table}.nft"));
        write(&file, rules)?;
        self.cloud_node()?.ns.exec("nft", &["-f", &file.to_string_lossy()]).map(|_| ())
    }

    /// Ends [`isolate_from_cloud`](Self::isolate_from_cloud) for `name`.
    pub fn reconnect_to_cloud(&self, name: &str) -> Result<(), HarnessError> {
        self.node(name)?;
        self.cloud_node()?.ns.exec("nft", &["delete", "table", "inet", &isolation_table(name)]).map(|_| ())
    }

    fn cloud_node(&self) -> Result<&RealNode, HarnessError> {
        self.nodes.iter().find(|n| n.role == Role::Cloud).ok_or_else(|| HarnessError::Usage("no cloud node".into()))
    }

    /// `kubectl <args…> -o json`, parsed.
    pub fn kubectl_json(&self, args: &[&str]) -> Result<serde_json::Value, HarnessError> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.kubectl(&all)?;
        serde_json::from_str(&text)
            .map_err(|e| HarnessError::Scenario(format!("kubectl {} printed no JSON ({e}): {text}", args.join(" "))))
    }

    /// The tunnel's credentials and settings, as the book's install steps
    /// make them before `kubectl apply -f deploy/`: the servers'
    /// certificate (for the cloud node's address) in Secret
    /// `kube-system/netd-tunnel-server`, each edge node's certificate in its
    /// `/etc/netd/tunnel`, and ConfigMap `kube-system/netd-tunnel-agent`
    /// naming the cloud node's agent door and `extra_ports`. The cluster CA
    /// signs them, as `netd-join` on Kubernetes does.
    pub fn install_tunnel_credentials(&self, extra_ports: &[u16]) -> Result<(), HarnessError> {
        let ca = self.kube()?.api().ca();
        let year = Duration::from_secs(365 * 24 * 3600);
        let secret = self.dir.join("tunnel-server");
        ca.issue_server("netd-tunnel-server", &[], &[IpAddr::V4(CLOUD_NODE_IP)], year)?.write(&secret, "server")?;
        ca.write_cert(&secret)?;
        let from = |name: &str| format!("--from-file={name}={}", secret.join(name).display());
        let (cert, key, ca_file) = (from("server.crt"), from("server.key"), from("ca.crt"));
        self.kubectl(&[
            "-n",
            "kube-system",
            "create",
            "secret",
            "generic",
            "netd-tunnel-server",
            &cert,
            &key,
            &ca_file,
        ])?;
        for node in self.nodes.iter().filter(|n| n.role == Role::Edge) {
            let tunnel = node.host_path("/etc/netd").join("tunnel");
            ca.issue_node(&node.name, &[IpAddr::V4(node.ip)], year)?.write(&tunnel, "node")?;
            ca.write_cert(&tunnel)?;
        }
        let servers = format!("--from-literal=servers={CLOUD_NODE_IP}:10262");
        let ports: Vec<String> = extra_ports.iter().map(u16::to_string).collect();
        let ports = format!("--from-literal=extra-ports={}", ports.join(","));
        let mut args = vec!["-n", "kube-system", "create", "configmap", "netd-tunnel-agent", servers.as_str()];
        if !extra_ports.is_empty() {
            args.push(&ports);
        }
        self.kubectl(&args).map(|_| ())
    }

    /// Waits until DaemonSet `kube-system/<name>` runs a Ready, up-to-date
    /// pod on exactly `nodes` nodes. On timeout the error carries the pods,
    /// their description and logs, and the nodes' logs.
    pub fn wait_daemonset(&self, name: &str, nodes: u64, timeout: Duration) -> Result<(), HarnessError> {
        let result = self.wait_for(&format!("DaemonSet {name} Ready on {nodes} nodes"), timeout, || {
            let ds = self.kubectl_json(&["-n", "kube-system", "get", "daemonset", name])?;
            let status = &ds["status"];
            let count = |key: &str| status[key].as_u64();
            let ready = count("desiredNumberScheduled") == Some(nodes)
                && count("numberReady") == Some(nodes)
                && count("updatedNumberScheduled") == Some(nodes);
            Ok(ready.then_some(()))
        });
        result.map_err(|err| {
            let selector = format!("app.kubernetes.io/name={name}");
            let text = |args: &[&str]| {
                self.kubectl_output(args)
                    .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
                    .unwrap_or_default()
            };
            HarnessError::Scenario(format!(
                "{err}\n{}\n{}\n--- logs (previous):\n{}\n--- logs:\n{}\n{}",
                text(&["-n", "kube-system", "get", "pods", "-o", "wide"]),
                text(&["-n", "kube-system", "describe", "pods", "-l", &selector]),
                text(&["-n", "kube-system", "logs", "-l", &selector, "--all-containers", "--previous", "--tail=20"]),
                text(&["-n", "kube-system", "logs", "-l", &selector, "--all-containers", "--tail=20"]),
                self.diagnostics()
            ))
        })
    }

    /// The nodes: the cloud node first, then the edge nodes in order.
    pub fn nodes(&self) -> &[RealNode] {
        &self.nodes
    }

    /// The nodes, to power one off and on ([`RealNode::power_cut`]).
    pub fn nodes_mut(&mut self) -> &mut [RealNode] {
        &mut self.nodes
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&RealNode, HarnessError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| HarnessError::Usage(format!("no node {name} in this cluster")))
    }

    /// `kubectl` as the cluster admin; a non-zero exit is an error. Returns
    /// stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, HarnessError> {
        let out = self.kube()?.api().kubectl(args)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl` as the cluster admin, its output whatever the exit status.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<Output, HarnessError> {
        let api = self.kube()?.api();
        let kubeconfig = format!("--kubeconfig={}", api.admin_kubeconfig().display());
        let mut all = vec![kubeconfig.as_str()];
        all.extend_from_slice(args);
        api.host().run(|| {
            Command::new("kubectl")
                .args(&all)
                .output()
                .map_err(|source| HarnessError::Spawn { command: format!("kubectl {}", args.join(" ")), source })
        })?
    }

    /// `kubectl` started as a child (for `logs -f`, `exec -i`,
    /// `port-forward`) with piped stdin, stdout and stderr, in the cloud
    /// node's network namespace. It dies with the calling thread.
    pub fn kubectl_spawn(&self, args: &[&str]) -> Result<Child, HarnessError> {
        let api = self.kube()?.api();
        let mut command = Command::new("kubectl");
        command
            .arg(format!("--kubeconfig={}", api.admin_kubeconfig().display()))
            .args(args)
            // kubectl 1.32 tries WebSockets first for exec, attach and
            // port-forward and falls back to SPDY on a 1.20 API server,
            // which has none for them: SPDY from the start, as a 1.20
            // kubectl speaks, one round trip less.
            .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        api.host().spawn(&mut command, &format!("kubectl {}", args.join(" ")))
    }

    /// Polls `check` every half second until it returns `Some`, or fails
    /// after `timeout` with `what` and the last state `check` reported.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Result<Option<T>, HarnessError>,
    ) -> Result<T, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match check() {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => String::new(),
                Err(err) => format!(" (last error: {err})"),
            };
            if Instant::now() > deadline {
                return Err(HarnessError::Scenario(format!("timed out after {timeout:?} waiting for {what}{last}")));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// A fresh path in the cluster's own directory (gone with the cluster).
    pub(crate) fn scratch_file(&self, name: &str) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dir.join(format!("{n}-{name}"))
    }

    /// The kubelet and containerd logs of every node (their last lines),
    /// and the scheduler's, for a failure message.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out.push_str(&format!(
                "--- {} kubelet:\n{}\n--- {} containerd:\n{}\n",
                node.name,
                tail_lines(&read(&node.dir.join("kubelet.log")), 15),
                node.name,
                tail_lines(&read(&node.dir.join("containerd.log")), 8),
            ));
        }
        out.push_str(&format!("--- scheduler:\n{}\n", tail_lines(&read(&self.dir.join("scheduler.log")), 8)));
        out
    }

    /// A network namespace for node `name` at `ip` on the underlay.
    fn add_netns(&self, name: &str, ip: Ipv4Addr) -> Result<NodeNetns, HarnessError> {
        let ns = NetNs::new()?;
        let host_end = format!("v-{name}");
        let uplink = VethPair::new((Some(&self.underlay), &host_end), (Some(&ns), "eth0"))?;
        self.underlay.ip(&["link", "set", &host_end, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &UNDERLAY_GATEWAY.to_string()])?;
        // What a node's programs try to reach beyond the underlay fails at
        // once instead of after a timeout: the kubelet's cloud probes (the
        // metadata address 169.254.169.254, DNS names through the machine's
        // resolvers) cost it 11 s a start while their packets died unanswered
        // on the underlay.
        ns.ip(&["route", "add", "unreachable", "169.254.0.0/16"])?;
        for server in machine_nameservers() {
            ns.ip(&["route", "add", "unreachable", &format!("{server}/32")])?;
        }
        Ok((ns, uplink))
    }

    fn start_scheduler(&self) -> Result<Child, HarnessError> {
        let api = self.kube()?.api();
        let bin = kube_binary(KUBE_SCHEDULER_ENV, KUBE_SCHEDULER_BIN);
        let kubeconfig = api.admin_kubeconfig();
        let log = log_file(&self.dir.join("scheduler.log"))?;
        let [port] = api.host().free_ports()?;
        let mut command = Command::new(&bin);
        command
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--authentication-kubeconfig={}", kubeconfig.display()))
            .arg(format!("--authorization-kubeconfig={}", kubeconfig.display()))
            .arg("--authentication-skip-lookup=true")
            .arg(format!("--bind-address={CLOUD_NODE_IP}"))
            .arg(format!("--secure-port={port}"))
            .arg("--port=0")
            .arg(format!("--cert-dir={}", self.dir.join("scheduler-certs").display()))
            .arg("--leader-elect=false")
            .arg("--logtostderr=true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        die_with_parent(&mut command);
        api.host().spawn(&mut command, &bin.display().to_string())
    }

    /// Brings node `name` up in `netns`: its directories and mount
    /// namespace, cgroups, credentials, containerd with `images`, kubelet.
    fn boot_node(
        &self,
        name: &str,
        ip: Ipv4Addr,
        role: Role,
        netns: NodeNetns,
        images: &[PathBuf],
    ) -> Result<RealNode, HarnessError> {
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let (ns, uplink) = netns;
        let mut node = RealNode {
            name: name.to_string(),
            ip,
            role,
            kubelet: None,
            containerd: None,
            hub: None,
            hub_setup: None,
            mount_ns: None,
            cgroups: Vec::new(),
            cgroup_name: format!("{}-{name}", unique_name()),
            ns,
            _uplink: uplink,
            dir,
        };
        // From here on, the node's Drop cleans up.
        node.make_cgroups()?;
        node.make_mount_namespace()?;
        node.install_base_cni()?;
        node.write_credentials(self.kube()?)?;
        node.redirect_kubernetes_service(self.kube()?)?;
        node.start_containerd()?;
        for image in images {
            node.ctr(&["images", "import", &image.to_string_lossy()])?;
        }
        node.start_kubelet()?;
        Ok(node)
    }

    fn wait_registered(&self, node: &RealNode) -> Result<(), HarnessError> {
        let api = self.kube()?.api();
        let path = format!("/api/v1/nodes/{}", node.name);
        let result = self.wait_for(&format!("node {} to register", node.name), REGISTER_TIMEOUT, || {
            if let Some(status) = node.kubelet_exit() {
                return Err(HarnessError::Scenario(format!("the kubelet of {} exited ({status})", node.name)));
            }
            Ok(matches!(api.api("GET", &path, None)?, (200, _)).then_some(()))
        });
        result.map_err(|err| HarnessError::Scenario(format!("{err}\n{}", self.diagnostics())))
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = kill(&mut self.scheduler, "kube-scheduler");
        self.kube = None;
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One node: its namespaces, cgroups, containerd and kubelet.
#[derive(Debug)]
pub struct RealNode {
    /// The node's name (`cloud-1`, `edge-<i>`).
    pub name: String,
    /// Its underlay address (`--node-ip`).
    pub ip: Ipv4Addr,
    /// Cloud or edge.
    pub role: Role,
    // Drop kills these first.
    kubelet: Option<Child>,
    containerd: Option<Child>,
    /// The edge hub the kubelet talks to, once [`RealNode::use_hub`] set it.
    hub: Option<Child>,
    /// The `netd` binary the hub runs from, and kube-apiserver's URL.
    hub_setup: Option<(PathBuf, String)>,
    /// The pinned mount namespace (a file under [`MOUNT_NS_DIR`]).
    mount_ns: Option<PathBuf>,
    /// The node's cgroup directory in every hierarchy.
    cgroups: Vec<PathBuf>,
    cgroup_name: String,
    ns: NetNs,
    _uplink: VethPair,
    dir: PathBuf,
}

impl RealNode {
    /// The node's network namespace (for `ping`, `curl`, `ip`).
    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// Where this node's own copy of host path `path` (one of the
    /// node-private paths, such as `/etc/cni/net.d`) lives on the machine.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.dir.join("root").join(path.trim_start_matches('/'))
    }

    /// The containerd socket.
    pub fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    /// `ctr -n k8s.io <args…>` against this node's containerd; returns stdout.
    pub fn ctr(&self, args: &[&str]) -> Result<String, HarnessError> {
        let socket = self.containerd_socket().to_string_lossy().into_owned();
        let mut all = vec!["--address", socket.as_str(), "--namespace", "k8s.io"];
        all.extend_from_slice(args);
        let out = run_command("ctr", &all)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The last lines of the kubelet's log.
    pub fn kubelet_log(&self) -> String {
        tail(&read(&self.dir.join("kubelet.log")))
    }

    /// The exit status of the kubelet if it is no longer running.
    fn kubelet_exit(&self) -> Option<String> {
        let pid = self.kubelet.as_ref()?.id();
        // Not waited for here (that needs &mut): a zombie or a missing
        // /proc entry both mean it ended.
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        match stat {
            None => Some("gone".into()),
            Some(stat) if stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')) => {
                Some(format!("exited; its log ends:\n{}", self.kubelet_log()))
            }
            Some(_) => None,
        }
    }

    /// Runs `program args…` inside the node: its mount and network
    /// namespaces (`nsenter`, not `ip netns exec`, which remounts /sys and
    /// hides the cgroup mounts). A non-zero exit is an error.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, HarnessError> {
        let (mount, net) = self.nsenter_args()?;
        let mut all = vec![mount.as_str(), net.as_str(), program];
        all.extend_from_slice(args);
        run_command("nsenter", &all)
    }

    fn nsenter_args(&self) -> Result<(String, String), HarnessError> {
        let mount = self.mount_ns.as_ref().ok_or_else(|| HarnessError::Usage("node has no mount namespace".into()))?;
        Ok((format!("--mount={}", mount.display()), format!("--net={}", self.ns.path().display())))
    }

    /// A persistent mount namespace with the node's own directories bound
    /// over [`NODE_PRIVATE_PATHS`].
    fn make_mount_namespace(&mut self) -> Result<(), HarnessError> {
        let root = Path::new(MOUNT_NS_DIR);
        fs::create_dir_all(root).map_err(|e| HarnessError::io(format!("creating {MOUNT_NS_DIR}"), e))?;
        if run_command("mountpoint", &["-q", MOUNT_NS_DIR]).is_err() {
            run_command("mount", &["--bind", MOUNT_NS_DIR, MOUNT_NS_DIR])?;
        }
        run_command("mount", &["--make-private", MOUNT_NS_DIR])?;
        let pin = root.join(&self.cgroup_name);
        fs::write(&pin, b"").map_err(|e| HarnessError::io(format!("creating {}", pin.display()), e))?;
        run_command("unshare", &[&format!("--mount={}", pin.display()), "--propagation", "private", "true"])?;
        self.mount_ns = Some(pin.clone());
        for path in NODE_PRIVATE_PATHS {
            let own = self.host_path(path);
            for dir in [Path::new(path), own.as_path()] {
                fs::create_dir_all(dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
            }
            run_command(
                "nsenter",
                &[&format!("--mount={}", pin.display()), "mount", "--bind", &own.to_string_lossy(), path],
            )?;
        }
        let enter = format!("--mount={}", pin.display());
        // The node's own bpffs, as systemd mounts one on every machine: the
        // controller's DNAT pins stay the node's.
        run_command("nsenter", &[&enter, "mount", "-t", "bpf", "bpf", "/sys/fs/bpf"])?;
        // Inside the node, its own cgroup is the cgroup v2 root: what the
        // DNAT attaches to "at the root" covers this node's processes (and
        // its pods') only, as on a machine of its own.
        let unified = cgroup2_mount()?;
        if let Some(own) = self.cgroups.iter().find(|dir| dir.parent() == Some(unified.as_path())) {
            run_command("nsenter", &[&enter, "mount", "--bind", &own.to_string_lossy(), &unified.to_string_lossy()])?;
        }
        Ok(())
    }

    /// Moves process `pid` (and its later sockets) into this node's
    /// cgroups, as if it ran on the node: what the node's cgroup BPF
    /// programs (the tunnel DNAT) act on.
    pub fn adopt_process(&self, pid: u32) -> Result<(), HarnessError> {
        for dir in &self.cgroups {
            let procs = dir.join("cgroup.procs");
            write(&procs, pid.to_string())?;
        }
        Ok(())
    }

    /// The node's cgroup in every mounted hierarchy (kubelet's
    /// `--cgroup-root` must exist in each v1 one), cpuset's `cpus` and
    /// `mems` copied from the parent so tasks may join it.
    fn make_cgroups(&mut self) -> Result<(), HarnessError> {
        for mount in cgroup_mounts()? {
            let dir = mount.join(&self.cgroup_name);
            fs::create_dir(&dir).map_err(|e| HarnessError::io(format!("mkdir {}", dir.display()), e))?;
            self.cgroups.push(dir.clone());
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = fs::read_to_string(mount.join(file)) {
                    fs::write(dir.join(file), value.trim())
                        .map_err(|e| HarnessError::io(format!("writing {}", dir.join(file).display()), e))?;
                }
            }
        }
        Ok(())
    }

    /// Debian's reference plugins in the node's `/opt/cni/bin`.
    fn install_base_cni(&self) -> Result<(), HarnessError> {
        let bin = self.host_path("/opt/cni/bin");
        for plugin in BASE_CNI_PLUGINS {
            let from = Path::new(DEBIAN_CNI_DIR).join(plugin);
            fs::copy(&from, bin.join(plugin))
                .map_err(|e| HarnessError::io(format!("copying {} into {}", from.display(), bin.display()), e))?;
        }
        Ok(())
    }

    /// The kubelet's client certificate and key in one file where TLS
    /// bootstrap leaves them, its kubeconfig, and a serving certificate for
    /// its address signed by the cluster CA (kube-apiserver verifies it).
    fn write_credentials(&self, kube: &KubeCluster) -> Result<(), HarnessError> {
        let api = kube.api();
        let ca = api.ca();
        let validity = Duration::from_secs(365 * 24 * 3600);
        let pki = self.host_path("/var/lib/kubelet/pki");
        fs::create_dir_all(&pki).map_err(|e| HarnessError::io(format!("creating {}", pki.display()), e))?;
        let client = ca.issue_node(&self.name, &[], validity)?;
        let combined = pki.join("kubelet-client-current.pem");
        write(&combined, format!("{}{}", client.cert_pem(), client.key_pem()))?;
        let ips = [IpAddr::V4(self.ip)];
        ca.issue_server(&self.name, std::slice::from_ref(&self.name), &ips, validity)?.write(&pki, "kubelet")?;
        ca.write_cert(&pki)?;
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: netd-test\n  cluster:\n    server: {url}\n    certificate-authority: /var/lib/kubelet/pki/ca.crt\n\
             users:\n- name: node\n  user:\n    client-certificate: /var/lib/kubelet/pki/kubelet-client-current.pem\n    client-key: /var/lib/kubelet/pki/kubelet-client-current.pem\n\
             contexts:\n- name: node@netd-test\n  context:\n    cluster: netd-test\n    user: node\n\
             current-context: node@netd-test\n",
            url = api.url(),
        );
        write(&self.dir.join("kubelet.kubeconfig"), kubeconfig)
    }

    /// What kube-proxy would do for the `kubernetes` Service: in-cluster
    /// clients (hostNetwork pods dial it from the node, others from their
    /// pod) reach the API server.
    fn redirect_kubernetes_service(&self, kube: &KubeCluster) -> Result<(), HarnessError> {
        let api = kube.api();
        let port = api.url().rsplit(':').next().unwrap_or_default().to_string();
        let (service_ip, service_port) = KUBERNETES_SERVICE;
        let rule = format!("ip daddr {service_ip} tcp dport {service_port} dnat to {CLOUD_NODE_IP}:{port}");
        let rules = format!(
            "table ip netd-t-kube-proxy {{\n\
             \tchain output {{ type nat hook output priority -100; {rule}; }}\n\
             \tchain prerouting {{ type nat hook prerouting priority -100; {rule}; }}\n}}\n"
        );
        let file = self.dir.join("kube-proxy.nft");
        write(&file, rules)?;
        self.ns.exec("nft", &["-f", &file.to_string_lossy()]).map(|_| ())
    }

    /// Starts `program args…` inside the node, in its cgroups, logging to
    /// `log`; it dies with the calling thread.
    fn spawn_inside(&self, program: &Path, args: &[String], log: &str) -> Result<Child, HarnessError> {
        let (mount, net) = self.nsenter_args()?;
        // The shell joins every hierarchy, then becomes nsenter, which
        // becomes the program: all it and its children (shims, containers)
        // start in the node's cgroups, where Drop finds them.
        let procs: Vec<String> =
            self.cgroups.iter().map(|dir| format!("'{}'", dir.join("cgroup.procs").display())).collect();
        let script = format!("set -e; for f in {}; do echo $$ > \"$f\"; done; exec \"$@\"", procs.join(" "));
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg("nsenter")
            .arg(mount)
            .arg(net)
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir.join(log))?);
        die_with_parent(&mut command);
        command.spawn().map_err(|source| HarnessError::Spawn { command: program.display().to_string(), source })
    }

    fn start_containerd(&mut self) -> Result<(), HarnessError> {
        let dir = self.dir.join("containerd");
        let config = format!(
            "version = 2\n\
             root = \"{dir}/root\"\n\
             state = \"{dir}/state\"\n\
             [grpc]\n  address = \"{dir}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{dir}/containerd.sock.ttrpc\"\n\
             [debug]\n  address = \"\"\n\
             [metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{dir}/opt\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\"]\n\
             \x20 sandbox_image = \"{PAUSE_IMAGE}\"\n\
             \x20 restrict_oom_score_adj = true\n\
             \x20 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
             \x20   bin_dir = \"/opt/cni/bin\"\n\
             \x20   conf_dir = \"/etc/cni/net.d\"\n",
            dir = dir.display(),
        );
        fs::create_dir_all(&dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let config_path = dir.join("config.toml");
        write(&config_path, config)?;
        let args = vec!["--config".to_string(), config_path.to_string_lossy().into_owned()];
        self.containerd = Some(self.spawn_inside(Path::new("/usr/bin/containerd"), &args, "containerd.log")?);
        let socket = self.containerd_socket();
        let deadline = Instant::now() + Duration::from_secs(30);
        while run_command("ctr", &["--address", &socket.to_string_lossy(), "version"]).is_err() {
            if Instant::now() > deadline {
                return Err(HarnessError::Scenario(format!(
                    "containerd of {} did not answer on {} within 30 s; its log ends:\n{}",
                    self.name,
                    socket.display(),
                    tail(&read(&self.dir.join("containerd.log")))
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    fn start_kubelet(&mut self) -> Result<(), HarnessError> {
        let bin = kube_binary(KUBELET_ENV, KUBELET_BIN);
        let pki = "/var/lib/kubelet/pki";
        let args: Vec<String> = vec![
            format!("--kubeconfig={}", self.dir.join("kubelet.kubeconfig").display()),
            "--container-runtime=remote".into(),
            format!("--container-runtime-endpoint=unix://{}", self.containerd_socket().display()),
            "--root-dir=/var/lib/kubelet".into(),
            format!("--cert-dir={pki}"),
            format!("--tls-cert-file={pki}/kubelet.crt"),
            format!("--tls-private-key-file={pki}/kubelet.key"),
            // Who may call the kubelet: clients of the cluster CA
            // (kube-apiserver's kubelet client), authorised by the API
            // server (SubjectAccessReview), as kubeadm configures it.
            format!("--client-ca-file={pki}/ca.crt"),
            "--anonymous-auth=false".into(),
            "--authentication-token-webhook=true".into(),
            "--authorization-mode=Webhook".into(),
            "--read-only-port=0".into(),
            format!("--cgroup-root=/{}", self.cgroup_name),
            "--cgroup-driver=cgroupfs".into(),
            "--fail-swap-on=false".into(),
            format!("--hostname-override={}", self.name),
            format!("--node-ip={}", self.ip),
            format!("--pod-infra-container-image={PAUSE_IMAGE}"),
            // The machine's disk is shared and may be fuller than a real
            // node's thresholds: no image GC, no eviction, no reservations.
            "--image-gc-high-threshold=100".into(),
            "--eviction-hard=".into(),
            "--enforce-node-allocatable=".into(),
            // The test images are imported, never pulled.
            "--serialize-image-pulls=false".into(),
            "--v=1".into(),
            "--logtostderr=true".into(),
        ];
        self.kubelet = Some(self.spawn_inside(&bin, &args, "kubelet.log")?);
        Ok(())
    }

    /// Pulls the node's plug, as a power cut does: the kubelet, containerd
    /// and every process of the node (shims, containers, netd's pods) die
    /// at once; what lives in memory goes (the pods' network namespaces and
    /// veths, `cni0`, `flannel.1` and every route through them, the node's
    /// nftables rules, its bpffs pins, the contents of `/run` and
    /// containerd's state); what is on disk stays (`/var/lib`, `/etc`,
    /// containerd's images and its record of containers). [`boot`](Self::boot)
    /// starts it again.
    pub fn power_cut(&mut self) -> Result<(), HarnessError> {
        let _ = kill(&mut self.kubelet, "kubelet");
        let _ = kill(&mut self.hub, "netd hub");
        let _ = kill(&mut self.containerd, "containerd");
        self.kill_cgroup_processes();
        let (mount, _) = self.nsenter_args()?;
        // Every mount the node's processes made in its namespace under its
        // tmpfs-like paths (pod network namespace pins, shm, rootfs
        // overlays) and the pods' volumes (tmpfs for secrets), deepest
        // first, then the tmpfs-like paths emptied.
        let state = self.dir.join("containerd/state");
        let volatile = [
            self.host_path("/run/netns"),
            self.host_path("/run/flannel"),
            self.host_path("/run/containerd"),
            state.clone(),
        ];
        let inside = ["/run/netns", "/run/flannel", "/run/containerd", "/var/lib/kubelet/pods"];
        let mounts = run_command("nsenter", &[&mount, "cat", "/proc/self/mounts"])?;
        let mut targets: Vec<String> = String::from_utf8_lossy(&mounts.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1).map(|m| m.replace("\\040", " ")))
            .filter(|target| {
                inside.iter().any(|dir| target.starts_with(&format!("{dir}/")))
                    || target.starts_with(&format!("{}/", state.display()))
            })
            .collect();
        targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
        for target in &targets {
            // Mounts the node's namespace copied from the machine at its
            // creation (other tests' network namespace pins) lie under the
            // node's own binds and cannot be reached: not the node's.
            let _ = run_command("nsenter", &[&mount, "umount", "-l", target]);
        }
        for dir in &volatile {
            empty_dir(dir)?;
        }
        // The kernel's state of the node: links other than its uplink, the
        // rules, the BPF pins.
        let links = self.ns.exec("ip", &["-o", "link", "show"])?;
        for name in String::from_utf8_lossy(&links.stdout)
            .lines()
            .filter_map(|line| line.split(':').nth(1))
            .map(|name| name.trim().split('@').next().unwrap_or_default().to_string())
            .filter(|name| name != "lo" && name != "eth0")
        {
            // A veth's peer goes with it: "Cannot find device" is fine.
            let _ = self.ns.exec("ip", &["link", "del", &name]);
        }
        self.ns.exec("nft", &["flush", "ruleset"])?;
        run_command("nsenter", &[&mount, "umount", "/sys/fs/bpf"])?;
        run_command("nsenter", &[&mount, "mount", "-t", "bpf", "bpf", "/sys/fs/bpf"])?;
        Ok(())
    }

    /// Powers the node on after [`power_cut`](Self::power_cut): what its
    /// installer set up at boot (the `kubernetes` Service rule kube-proxy
    /// would restore), then containerd and the kubelet, as systemd starts
    /// them. Returns when containerd answers; the kubelet starts in the
    /// background.
    pub fn boot(&mut self) -> Result<(), HarnessError> {
        let rules = self.dir.join("kube-proxy.nft");
        self.ns.exec("nft", &["-f", &rules.to_string_lossy()])?;
        self.start_containerd()?;
        if self.hub_setup.is_some() {
            // A host service ordered before the kubelet, as netd-join sets
            // it up.
            self.start_hub()?;
        }
        self.start_kubelet()
    }

    /// Puts netd's edge hub (`<netd> hub`, a host service of the node)
    /// between the kubelet and kube-apiserver at `server`, as the book's
    /// edge hub page (docs/src/concepts/hub.md) configures it: the hub
    /// dials kube-apiserver with the kubelet's own client certificate, and
    /// the kubelet, restarted with a kubeconfig naming
    /// `https://127.0.0.1:10261` and the hub's CA, talks to the hub.
    /// From here on [`boot`](Self::boot) starts the hub before the kubelet.
    pub fn use_hub(&mut self, netd: &Path, server: &str) -> Result<(), HarnessError> {
        self.hub_setup = Some((netd.to_path_buf(), server.to_string()));
        self.start_hub()?;
        let own = self.dir.join("kubelet.kubeconfig");
        let direct = self.dir.join(DIRECT_KUBECONFIG);
        if !direct.exists() {
            fs::copy(&own, &direct).map_err(|e| HarnessError::io(format!("keeping {}", own.display()), e))?;
        }
        let kubeconfig = "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: hub\n  cluster:\n    server: https://127.0.0.1:10261\n    certificate-authority: /var/lib/netd/hub/pki/ca.crt\n\
             users:\n- name: node\n  user:\n    client-certificate: /var/lib/kubelet/pki/kubelet-client-current.pem\n    client-key: /var/lib/kubelet/pki/kubelet-client-current.pem\n\
             contexts:\n- name: node@hub\n  context:\n    cluster: hub\n    user: node\n\
             current-context: node@hub\n";
        write(&self.dir.join("kubelet.kubeconfig"), kubeconfig)?;
        let _ = kill(&mut self.kubelet, "kubelet");
        self.start_kubelet()
    }

    /// Undoes [`use_hub`](Self::use_hub): the hub stops, and the kubelet,
    /// restarted with its own kubeconfig, talks to kube-apiserver directly
    /// again. The hub's cache stays on disk, as an uninstalled service's
    /// state does.
    pub fn stop_using_hub(&mut self) -> Result<(), HarnessError> {
        let direct = self.dir.join(DIRECT_KUBECONFIG);
        if self.hub_setup.take().is_none() || !direct.exists() {
            return Err(HarnessError::Usage(format!("{} does not use a hub", self.name)));
        }
        let _ = kill(&mut self.hub, "netd hub");
        let own = self.dir.join("kubelet.kubeconfig");
        fs::copy(&direct, &own).map_err(|e| HarnessError::io(format!("restoring {}", own.display()), e))?;
        let _ = kill(&mut self.kubelet, "kubelet");
        self.start_kubelet()
    }

    /// Whether the hub's cache holds object `name` of core/v1 `resource`
    /// (`pods`, `nodes`, `configmaps`…) in `namespace` (`@cluster` for
    /// cluster-scoped objects): the file its store keeps for it.
    pub fn hub_caches(&self, resource: &str, namespace: &str, name: &str) -> bool {
        let dir = self.host_path("/var/lib/netd/hub/objects").join(format!("core_v1_{resource}"));
        dir.join(namespace).join(format!("{name}.obj")).is_file()
    }

    /// Running containers of pod `pod` on this node (the sandbox excluded),
    /// as containerd reports them: the node's own truth, which the API
    /// cannot tell while the node is cut off.
    pub fn running_containers(&self, pod: &str) -> usize {
        let ids = self
            .ctr(&[
                "containers",
                "list",
                "-q",
                &format!("labels.\"io.kubernetes.pod.name\"=={pod},labels.\"io.cri-containerd.kind\"==container"),
            ])
            .unwrap_or_default();
        let tasks = self.ctr(&["tasks", "list"]).unwrap_or_default();
        ids.lines()
            .filter(|id| !id.is_empty())
            .filter(|id| tasks.lines().any(|t| t.starts_with(*id) && t.contains("RUNNING")))
            .count()
    }

    /// Whether `to` answers one ping (1 s) from the node's own network
    /// namespace.
    pub fn pings(&self, to: IpAddr) -> bool {
        self.ns.exec("ping", &["-c", "1", "-W", "1", &to.to_string()]).is_ok()
    }

    /// A counter or gauge of the hub's `/metrics` (every label set summed);
    /// `None` when the hub does not answer.
    pub fn hub_metric(&self, name: &str) -> Option<f64> {
        let text = super::http_get(&self.ns, "127.0.0.1:10269", "/metrics")?;
        Some(super::real_workload::metric_sum(&text, name))
    }

    /// The last lines of the hub's log.
    pub fn hub_log(&self) -> String {
        tail(&read(&self.dir.join("hub.log")))
    }

    /// Starts the hub and waits until its CA is written and it answers.
    fn start_hub(&mut self) -> Result<(), HarnessError> {
        let Some((netd, server)) = self.hub_setup.clone() else {
            return Err(HarnessError::Usage("the node has no hub set up".into()));
        };
        let _ = kill(&mut self.hub, "netd hub");
        let pki = "/var/lib/kubelet/pki";
        let args: Vec<String> = vec![
            "hub".into(),
            format!("--node-name={}", self.name),
            format!("--server={server}"),
            format!("--ca-file={pki}/ca.crt"),
            format!("--client-cert={pki}/kubelet-client-current.pem"),
        ];
        self.hub = Some(self.spawn_inside(&netd, &args, "hub.log")?);
        let ca = self.host_path("/var/lib/netd/hub/pki/ca.crt");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(ca.is_file() && self.hub_metric("netd_hub_cloud_reachable").is_some()) {
            if Instant::now() > deadline {
                return Err(HarnessError::Scenario(format!(
                    "the hub of {} did not come up within 30 s; its log ends:\n{}",
                    self.name,
                    self.hub_log()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Whether the kubelet process is running.
    pub fn kubelet_running(&self) -> bool {
        self.kubelet.is_some() && self.kubelet_exit().is_none()
    }

    /// SIGKILL to every process in the node's cgroups until none is left.
    fn kill_cgroup_processes(&self) {
        for _ in 0..100 {
            let mut pids = Vec::new();
            for dir in &self.cgroups {
                collect_pids(dir, &mut pids);
            }
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // SAFETY: kill(2) with a pid read from cgroup.procs; at worst
                // the process is already gone (ESRCH).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("netd test harness: processes of node {} survived 10 s of SIGKILL", self.name);
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        let _ = kill(&mut self.kubelet, "kubelet");
        let _ = kill(&mut self.hub, "netd hub");
        let _ = kill(&mut self.containerd, "containerd");
        self.kill_cgroup_processes();
        if let Some(pin) = self.mount_ns.take() {
            // The last reference: the namespace and every mount made in it
            // (binds, overlays, shm, bpffs, network namespace pins) go with
            // it, before the cgroup it binds is removed.
            let _ = run_command("umount", &[&pin.to_string_lossy()]);
            let _ = fs::remove_file(&pin);
        }
        for dir in &self.cgroups {
            remove_tree(dir);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The nftables table that isolates edge node `name` from the cloud.
fn isolation_table(name: &str) -> String {
    format!("netd-t-isolate-{name}")
}

/// Removes everything inside `dir` (which stays).
fn empty_dir(dir: &Path) -> Result<(), HarnessError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(HarnessError::io(format!("reading {}", dir.display()), e)),
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| HarnessError::io(format!("removing {}", path.display()), e))?;
    }
    Ok(())
}

/// The cgroup v2 mount point.
fn cgroup2_mount() -> Result<PathBuf, HarnessError> {
    super::cgroup::cgroup2_root()
}

/// Where [`RealNode::use_hub`] keeps the kubelet's own kubeconfig.
const DIRECT_KUBECONFIG: &str = "kubelet-direct.kubeconfig";

/// Mount points of every cgroup hierarchy (v1 controllers and v2).
fn cgroup_mounts() -> Result<Vec<PathBuf>, HarnessError> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").map_err(|e| HarnessError::io("reading /proc/self/mounts", e))?;
    Ok(mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            matches!(fields.get(2), Some(&"cgroup") | Some(&"cgroup2")).then(|| fields.get(1).map(PathBuf::from))?
        })
        .collect())
}

fn collect_pids(dir: &Path, pids: &mut Vec<i32>) {
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for child in entries.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()) {
            collect_pids(&child.path(), pids);
        }
    }
}

/// Removes a cgroup directory and its children, deepest first.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for child in entries.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()) {
            remove_tree(&child.path());
        }
    }
    if let Err(err) = fs::remove_dir(dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            eprintln!("netd test harness: could not remove cgroup {}: {err}", dir.display());
        }
    }
}

/// Sweeps what a killed test process's real cluster left: its nodes'
/// processes and cgroups in every hierarchy, and its pinned mount
/// namespaces. Called by [`privileged`](super::privileged).
pub(crate) fn sweep_leftovers(owner_is_dead: impl Fn(&str) -> bool) {
    let Ok(mounts) = cgroup_mounts() else { return };
    for mount in &mounts {
        let Ok(entries) = fs::read_dir(mount) else { continue };
        for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if name.starts_with(super::NAME_PREFIX) && owner_is_dead(&name) {
                let mut pids = Vec::new();
                collect_pids(&path, &mut pids);
                for pid in pids {
                    // SAFETY: as in kill_cgroup_processes.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    for mount in &mounts {
        let Ok(entries) = fs::read_dir(mount) else { continue };
        for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if name.starts_with(super::NAME_PREFIX) && owner_is_dead(&name) {
                remove_tree(&path);
            }
        }
    }
    if let Ok(entries) = fs::read_dir(MOUNT_NS_DIR) {
        for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if name.starts_with(super::NAME_PREFIX) && owner_is_dead(&name) {
                let _ = run_command("umount", &[&path.to_string_lossy()]);
                let _ = fs::remove_file(&path);
            }
        }
    }
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), HarnessError> {
    fs::write(path, contents).map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))
}

/// The IPv4 resolvers of the machine's `/etc/resolv.conf`, which the nodes'
/// mount namespaces share (loopback ones aside: a node's own loopback).
/// Each once: a second route to the same address would fail.
fn machine_nameservers() -> std::collections::BTreeSet<Ipv4Addr> {
    read(Path::new("/etc/resolv.conf"))
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|server| server.trim().parse::<Ipv4Addr>().ok())
        .filter(|server| !server.is_loopback() && !server.is_link_local())
        .collect()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

fn log_file(path: &Path) -> Result<fs::File, HarnessError> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| HarnessError::io(format!("opening {}", path.display()), e))
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
