//! The demo's story as one run that works against every registry: three
//! nodes on the underlay, a `netd` per node, pods attached by Debian's
//! `bridge` plugin with `netd-ipam`, cross-node traffic; then the registry is
//! stopped, node 2 loses power (its namespace is destroyed and booted fresh),
//! netd restores the overlay from its snapshot, the re-created pod keeps its
//! IP and the node its VTEP MAC, traffic comes back; then the registry
//! returns and every node resyncs.
//!
//! With [`Scenario::with_rollout`], a last chapter rolls a new netd binary
//! over the three nodes through the rollout state machine
//! ([`netd_cloud::rollout::RolloutState`]: batches, health gate, state saved
//! before each restart) while every pod pings the next one 100 times a
//! second; not one ping may be lost (netd's SIGTERM leaves the data plane,
//! the new netd takes it over from its snapshot).
//!
//! With [`Scenario::with_chapter`], a chapter of the caller's own runs
//! last, on the cluster as the story left it ([`ChapterStage`]): `cargo
//! xtask demo` adds the cloud reaching an edge node's kubelet and a pod's
//! metrics through the tunnel there.
//!
//! `cargo xtask demo` narrates it on the embedded registry; the daemon tests
//! run it against a real etcd and a real kube-apiserver, which live on the
//! cluster's control-plane address ([`Cluster::control_plane`]).

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use netd_model::flannel::{network_config_json, CONFIG_KEY};
use netd_registry::embedded::EmbeddedRegistry;
use netd_registry::NetworkConfig;

use super::{
    http_get, metric, netd_run_args, Cluster, CniCall, CniRunner, EtcdServer, HarnessError, KubeApiServer, NetNs,
    NetdProcess, CLUSTER_NETWORK, DEBIAN_CNI_DIR, HEALTH_ADDR,
};

/// How long the rollout chapter keeps each upgraded node under traffic
/// before the next batch.
const SOAK: Duration = Duration::from_secs(1);

/// How long any one step may take before the run fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(45);

/// The network every scenario registry is configured with: the cluster
/// plan's [`CLUSTER_NETWORK`], /24 node subnets, VNI 1.
pub fn scenario_network() -> NetworkConfig {
    // Checked at compile time; the same network as CLUSTER_NETWORK.
    const NETWORK: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 244, 0, 0), 16);
    NetworkConfig { network: NETWORK, subnet_len: 24, vni: 1 }
}

/// A registry the scenario can point daemons at, stop and start.
pub trait ScenarioRegistry {
    /// One line saying what it is, for the narration.
    fn describe(&self) -> String;
    /// `--registry=…` for `netd run`.
    fn registry_spec(&self) -> String;
    /// Further `netd run` arguments the registry needs (credentials, say).
    fn extra_args(&self) -> Vec<OsString> {
        Vec::new()
    }
    /// Makes the registry unreachable for every node ("the cloud is down").
    fn stop(&mut self) -> Result<(), HarnessError>;
    /// Brings it back with the data it had.
    fn start(&mut self) -> Result<(), HarnessError>;
}

/// The embedded registry (a SQLite file shared by the node processes);
/// "stopped" by moving the file away, as if its disk were unmounted.
#[derive(Debug)]
pub struct EmbeddedScenarioRegistry {
    path: PathBuf,
    away: PathBuf,
}

impl EmbeddedScenarioRegistry {
    /// Creates the registry file at `path` with the scenario's network.
    pub fn create(path: &Path) -> Result<Self, HarnessError> {
        EmbeddedRegistry::create(path, &scenario_network())
            .map_err(|e| HarnessError::Usage(format!("creating the embedded registry {}: {e}", path.display())))?;
        let mut away = path.as_os_str().to_owned();
        away.push(".stopped");
        Ok(Self { path: path.to_path_buf(), away: away.into() })
    }
}

impl ScenarioRegistry for EmbeddedScenarioRegistry {
    fn describe(&self) -> String {
        format!("embedded registry at {}", self.path.display())
    }

    fn registry_spec(&self) -> String {
        format!("embedded:{}", self.path.display())
    }

    fn stop(&mut self) -> Result<(), HarnessError> {
        std::fs::rename(&self.path, &self.away)
            .map_err(|e| HarnessError::io(format!("moving {} away", self.path.display()), e))
    }

    fn start(&mut self) -> Result<(), HarnessError> {
        std::fs::rename(&self.away, &self.path)
            .map_err(|e| HarnessError::io(format!("moving {} back", self.path.display()), e))
    }
}

/// A real etcd holding flannel's network config key; stopped with SIGKILL.
#[derive(Debug)]
pub struct EtcdScenarioRegistry {
    /// The server (for `etcdctl` and further stops).
    pub etcd: EtcdServer,
}

impl EtcdScenarioRegistry {
    /// Starts etcd on the cluster's control plane and writes
    /// `/coreos.com/network/config` with `etcdctl`, as an operator
    /// deploying flannel does. Drop it before the cluster.
    pub fn start_on(cluster: &Cluster) -> Result<Self, HarnessError> {
        let etcd = EtcdServer::new_on(cluster.control_plane())?;
        etcd.etcdctl(&["put", CONFIG_KEY, &network_config_json(&scenario_network())])?;
        Ok(Self { etcd })
    }
}

impl ScenarioRegistry for EtcdScenarioRegistry {
    fn describe(&self) -> String {
        format!("etcd at {}", self.etcd.endpoint())
    }

    fn registry_spec(&self) -> String {
        format!("etcd:{}", self.etcd.endpoint())
    }

    fn stop(&mut self) -> Result<(), HarnessError> {
        self.etcd.stop()
    }

    fn start(&mut self) -> Result<(), HarnessError> {
        self.etcd.start()
    }
}

/// A real kube-apiserver with one Node object per cluster node, each with
/// its pod CIDR assigned (as kube-controller-manager's node IPAM does);
/// stopped with SIGKILL, its etcd kept.
#[derive(Debug)]
pub struct KubeScenarioRegistry {
    /// The API server (for further API calls).
    pub server: KubeApiServer,
    token_file: PathBuf,
    ca_file: PathBuf,
}

impl KubeScenarioRegistry {
    /// Starts the API server on the cluster's control plane and creates a
    /// Node object for every cluster node with its plan subnet as
    /// `spec.podCIDR`. Drop it before the cluster.
    pub fn start_on(cluster: &Cluster) -> Result<Self, HarnessError> {
        let server = KubeApiServer::new_on(cluster.control_plane())?;
        let token_file = server.dir().join("netd.token");
        let ca_file = server.dir().join("netd-ca.pem");
        std::fs::write(&token_file, server.token())
            .map_err(|e| HarnessError::io(format!("writing {}", token_file.display()), e))?;
        std::fs::write(&ca_file, server.ca_cert_pem()?)
            .map_err(|e| HarnessError::io(format!("writing {}", ca_file.display()), e))?;
        for (name, cidr) in cluster.nodes.iter().map(|n| (&n.name, n.subnet().to_string())) {
            let node = serde_json::json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": { "name": name },
                "spec": { "podCIDR": cidr, "podCIDRs": [cidr] },
            });
            let (status, body) = server.api("POST", "/api/v1/nodes", Some(("application/json", &node.to_string())))?;
            if status != 201 {
                return Err(HarnessError::Usage(format!("creating Node {name}: HTTP {status}: {body}")));
            }
        }
        Ok(Self { server, token_file, ca_file })
    }
}

impl ScenarioRegistry for KubeScenarioRegistry {
    fn describe(&self) -> String {
        format!("kube-apiserver at {}", self.server.url())
    }

    fn registry_spec(&self) -> String {
        format!("kubernetes:{}", self.server.url())
    }

    fn extra_args(&self) -> Vec<OsString> {
        vec![
            "--token-file".into(),
            self.token_file.clone().into(),
            "--ca-file".into(),
            self.ca_file.clone().into(),
            "--network".into(),
            CLUSTER_NETWORK.into(),
        ]
    }

    fn stop(&mut self) -> Result<(), HarnessError> {
        self.server.stop()
    }

    fn start(&mut self) -> Result<(), HarnessError> {
        self.server.start()
    }
}

/// What the run measured. Every check the story makes (same IP, same MAC,
/// traffic) is an error when it fails, so a report means they all held.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// Per node: `netd run` start → `/readyz` 200.
    pub node_ready: Vec<Duration>,
    /// Node 2 after the reboot: netd start → ready from its snapshot.
    pub restored: Duration,
    /// Node 2: netd start → the re-created pod attached.
    pub pod_reattached: Duration,
    /// Node 2: netd start → the first cross-node ping that works.
    pub traffic_back: Duration,
    /// How long the registry took to start again (until its own health
    /// check passed).
    pub registry_start: Duration,
    /// Registry started → node 2 connected and freshly synced (a server
    /// may serve node 2 before its start-up check passes).
    pub resynced: Duration,
    /// Peers node 2 programs after the resync.
    pub peers_after_resync: f64,
    /// The rollout chapter, when run.
    pub rollout: Option<RolloutReport>,
}

/// What the rollout chapter measured.
#[derive(Debug, Clone)]
pub struct RolloutReport {
    /// Per node: old netd stopped -> new netd Ready.
    pub restart_to_ready: Vec<Duration>,
    /// Pings sent across the rollout (all pod pairs).
    pub pings_sent: u64,
    /// Pings that got no answer.
    pub pings_lost: u64,
    /// The whole rollout.
    pub took: Duration,
}

/// A run of the story; see the module docs.
pub struct Scenario<'a, R: ScenarioRegistry> {
    // Field order is drop order: daemons, pods, the registry's servers
    // (inside the cluster's underlay namespace), then the cluster.
    daemons: Vec<Option<NetdProcess>>,
    pods: Vec<(String, NetNs, Ipv4Addr)>,
    registry: R,
    cluster: Cluster,
    state: PathBuf,
    bin_dir: PathBuf,
    started: Instant,
    narrate: Box<dyn FnMut(&str) + 'a>,
    /// The new netd of the rollout chapter.
    rollout_to: Option<PathBuf>,
    /// Which binary each node's netd runs.
    running: Vec<PathBuf>,
    /// The caller's chapter, run last.
    chapter: Option<Chapter<'a>>,
}

/// An error a caller's chapter returns (an `anyhow::Error` converts into it
/// with its causes).
pub type ChapterError = Box<dyn std::error::Error + Send + Sync>;

type Chapter<'a> = Box<dyn FnOnce(&mut ChapterStage<'_>) -> Result<(), ChapterError> + 'a>;

/// What a chapter added with [`Scenario::with_chapter`] sees: the cluster
/// with every node's netd running and a pod on each node, the registry up.
pub struct ChapterStage<'s> {
    cluster: &'s Cluster,
    pods: &'s [(String, NetNs, Ipv4Addr)],
    state: &'s Path,
    registry_spec: String,
    started: Instant,
    narrate: &'s mut (dyn FnMut(&str) + 's),
}

impl ChapterStage<'_> {
    /// Node `number` (1-3).
    pub fn node(&self, number: u8) -> Result<&super::Node, HarnessError> {
        self.cluster.node(number).ok_or_else(|| HarnessError::Usage(format!("no node {number}")))
    }

    /// The pod on node `number`: its name, namespace and address.
    pub fn pod(&self, number: u8) -> Result<(&str, &NetNs, Ipv4Addr), HarnessError> {
        let (name, ns, ip) = self
            .pods
            .get(usize::from(number).wrapping_sub(1))
            .ok_or_else(|| HarnessError::Usage(format!("no pod on node {number}")))?;
        Ok((name, ns, *ip))
    }

    /// Node `number`'s netd state directory (its `subnet.env` is there).
    pub fn node_state_dir(&self, number: u8) -> PathBuf {
        self.state.join(format!("node-{number}"))
    }

    /// The registry every node's netd uses (`--registry`), up.
    pub fn registry_spec(&self) -> &str {
        &self.registry_spec
    }

    /// One line of the story, stamped with the time since it began.
    pub fn say(&mut self, text: &str) {
        let line = format!("[{:>6.2}s] {text}", self.started.elapsed().as_secs_f64());
        (self.narrate)(&line);
    }

    /// Lines under the last one, indented past its stamp (command output).
    pub fn show(&mut self, text: &str) {
        for line in text.lines() {
            (self.narrate)(&format!("{:12}{}", "", line.trim_end()));
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn failed(text: String) -> HarnessError {
    HarnessError::Scenario(text)
}

impl<'a, R: ScenarioRegistry> Scenario<'a, R> {
    /// A run on `cluster` (from [`Cluster::bare`], three nodes) with the
    /// `netd` and `netd-ipam` binaries of `bin_dir`, node state under
    /// `state`. `narrate` gets each line of the story as it happens.
    pub fn new(
        cluster: Cluster,
        registry: R,
        bin_dir: &Path,
        state: &Path,
        narrate: impl FnMut(&str) + 'a,
    ) -> Result<Self, HarnessError> {
        if cluster.nodes.len() != 3 {
            return Err(HarnessError::Usage(format!("the scenario needs 3 nodes, got {}", cluster.nodes.len())));
        }
        Ok(Self {
            daemons: vec![None, None, None],
            pods: Vec::new(),
            registry,
            cluster,
            state: state.to_path_buf(),
            bin_dir: bin_dir.to_path_buf(),
            started: Instant::now(),
            narrate: Box::new(narrate),
            rollout_to: None,
            running: vec![bin_dir.join("netd"); 3],
            chapter: None,
        })
    }

    /// Adds the rollout chapter: netd replaced by `new_netd` on every node,
    /// batch by batch, under a ping loop that must lose nothing.
    pub fn with_rollout(mut self, new_netd: &Path) -> Self {
        self.rollout_to = Some(new_netd.to_path_buf());
        self
    }

    /// Adds `chapter` after the others, before the daemons stop: it runs on
    /// the cluster as the story left it and narrates through its stage. An
    /// error it returns fails the run; what it made is its own to remove,
    /// the cluster is removed as on any other failure.
    pub fn with_chapter(
        mut self,
        chapter: impl FnOnce(&mut ChapterStage<'_>) -> Result<(), ChapterError> + 'a,
    ) -> Self {
        self.chapter = Some(Box::new(chapter));
        self
    }

    /// The registry (to inspect it after the run).
    pub fn registry(&self) -> &R {
        &self.registry
    }

    fn say(&mut self, text: &str) {
        let line = format!("[{:>6.2}s] {text}", self.started.elapsed().as_secs_f64());
        (self.narrate)(&line);
    }

    fn node_dir(&self, number: u8) -> PathBuf {
        self.state.join(format!("node-{number}"))
    }

    fn node_ns(&self, number: u8) -> Result<&NetNs, HarnessError> {
        self.cluster.node(number).map(|n| &n.ns).ok_or_else(|| HarnessError::Usage(format!("no node {number}")))
    }

    fn start_daemon(&mut self, number: u8) -> Result<Instant, HarnessError> {
        let node = self.cluster.node(number).ok_or_else(|| HarnessError::Usage(format!("no node {number}")))?;
        let dir = self.node_dir(number);
        std::fs::create_dir_all(&dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let mut args = netd_run_args(&node.name, &self.registry.registry_spec(), &dir);
        args.extend(self.registry.extra_args());
        let started = Instant::now();
        let program = self.running[usize::from(number - 1)].clone();
        let process = NetdProcess::spawn(&node.ns, &program, args, &dir.join("netd.log"))?;
        self.daemons[usize::from(number - 1)] = Some(process);
        Ok(started)
    }

    fn wait(&self, what: &str, number: u8, mut check: impl FnMut(&NetNs) -> bool) -> Result<(), HarnessError> {
        let ns = self.node_ns(number)?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !check(ns) {
            if Instant::now() > deadline {
                let log = self.daemons[usize::from(number - 1)].as_ref().map(NetdProcess::log).unwrap_or_default();
                return Err(failed(format!("node-{number}: timed out waiting for {what}; netd log:\n{log}")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// CNI ADD through Debian's bridge plugin with netd-ipam; the pod's IP.
    fn attach_pod(&self, number: u8, pod: &str, pod_ns: &NetNs, container: &str) -> Result<Ipv4Addr, HarnessError> {
        let dir = self.node_dir(number);
        let config = serde_json::json!({
            "cniVersion": "1.0.0", "name": "netd", "type": "bridge", "bridge": "cni0", "isGateway": true, "mtu": 1450,
            "ipam": { "type": "netd-ipam", "subnetFile": dir.join("subnet.env"), "dataDir": dir.join("cni") },
        });
        let runner = CniRunner::new(self.node_ns(number)?, vec![PathBuf::from(DEBIAN_CNI_DIR), self.bin_dir.clone()]);
        let call =
            CniCall { command: "ADD", container_id: container, pod_netns: pod_ns, ifname: "eth0", pod: Some(pod) };
        let out = runner.call_ok("bridge", &call, &config.to_string())?;
        let result: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| failed(format!("{pod}: CNI result is not JSON: {e}")))?;
        let address =
            result["ips"][0]["address"].as_str().ok_or_else(|| failed(format!("{pod}: CNI result without ips[0]")))?;
        let ip = address.split('/').next().unwrap_or_default();
        ip.parse().map_err(|_| failed(format!("{pod}: CNI result address {address:?}")))
    }

    fn ping(&self, from: usize, to: usize) -> bool {
        let target = self.pods[to].2.to_string();
        self.pods[from].1.exec("ping", &["-c1", "-W1", &target]).is_ok()
    }

    fn vtep_mac(&self, number: u8) -> String {
        self.cluster
            .node(number)
            .and_then(|n| n.ns.ip(&["link", "show", "flannel.1"]).ok())
            .and_then(|text| text.split("link/ether ").nth(1).map(|r| r.chars().take(17).collect()))
            .unwrap_or_else(|| "?".into())
    }

    fn subnet(&self, number: u8) -> String {
        std::fs::read_to_string(self.node_dir(number).join("subnet.env"))
            .ok()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=").map(str::to_string)))
            .unwrap_or_else(|| "?".into())
    }

    /// Runs the story, then stops the daemons (SIGTERM), runs `netd cleanup
    /// --purge-state` on every node and drops everything it made.
    pub fn run(mut self) -> Result<ScenarioReport, HarnessError> {
        self.started = Instant::now();
        let description = self.registry.describe();
        self.say("3 nodes (network namespaces) on an underlay bridge 192.168.50.0/24;");
        self.say(&format!("         {description} (network {CLUSTER_NETWORK}, VXLAN VNI 1)"));
        let mut node_ready = Vec::new();
        for number in 1..=3u8 {
            let started = self.start_daemon(number)?;
            self.wait("readiness", number, |ns| {
                http_get(ns, HEALTH_ADDR, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            })?;
            let took = started.elapsed();
            node_ready.push(took);
            let line = format!(
                "node-{number}: netd up in {}: subnet {}, VTEP MAC {}",
                ms(took),
                self.subnet(number),
                self.vtep_mac(number)
            );
            self.say(&line);
        }
        for number in 1..=3u8 {
            self.wait("2 peers", number, |ns| metric(ns, "netd_peers_programmed") == Some(2.0))?;
        }
        for number in 1..=3u8 {
            let pod = format!("default/web-{number}");
            let ns = NetNs::new()?;
            let ip = self.attach_pod(number, &pod, &ns, &format!("sandbox-{number}-a"))?;
            self.say(&format!("node-{number}: pod {pod} attached by bridge + netd-ipam: {ip}"));
            self.pods.push((pod, ns, ip));
        }
        for (from, to) in [(0, 1), (1, 2), (2, 0)] {
            let started = Instant::now();
            let ok = self.ping(from, to);
            let line = format!(
                "ping {} ({}) -> {} ({}): {} in {}",
                self.pods[from].0,
                self.pods[from].2,
                self.pods[to].0,
                self.pods[to].2,
                if ok { "ok" } else { "FAILED" },
                ms(started.elapsed())
            );
            self.say(&line);
            if !ok {
                return Err(failed("cross-node pod traffic failed".into()));
            }
        }

        (self.narrate)("");
        let mac_before = self.vtep_mac(2);
        let ip_before = self.pods[1].2;
        self.registry.stop()?;
        self.say("registry STOPPED (the cloud is unreachable)");
        self.wait("registry loss", 1, |ns| metric(ns, "netd_registry_connected") == Some(0.0))?;
        let ok = self.ping(0, 1);
        self.say(&format!("ping web-1 -> web-2 with the registry down: {}", if ok { "ok" } else { "FAILED" }));
        if !ok {
            return Err(failed("traffic stopped with the registry".into()));
        }
        if let Some(mut old) = self.daemons[1].take() {
            old.signal(libc::SIGKILL)?;
        }
        self.cluster.reboot(2)?;
        self.say("node-2 REBOOTED: power cut, namespace destroyed with its device, routes and pod veth, booted fresh");
        let booted = self.start_daemon(2)?;
        self.wait("readiness from snapshot", 2, |ns| metric(ns, "netd_ready") == Some(1.0))?;
        let restored = booted.elapsed();
        let ip_after = self.attach_pod(2, "default/web-2", &self.pods[1].1, "sandbox-2-b")?;
        let pod_reattached = booted.elapsed();
        while !self.ping(0, 1) {
            if booted.elapsed() > STEP_TIMEOUT {
                return Err(failed("traffic did not come back after the reboot".into()));
            }
            // An unreachable route fails ping at once; do not spin on it.
            std::thread::sleep(Duration::from_millis(5));
        }
        let traffic_back = booted.elapsed();
        let mac_after = self.vtep_mac(2);
        self.say(&format!(
            "node-2: netd restored the overlay from its snapshot in {} (registry still down)",
            ms(restored)
        ));
        self.say(&format!(
            "node-2: pod web-2 re-created (new sandbox): {ip_after} ({}) after {}",
            if ip_after == ip_before { "same IP" } else { "DIFFERENT IP" },
            ms(pod_reattached)
        ));
        self.say(&format!(
            "node-2: VTEP MAC {mac_after} ({})",
            if mac_after == mac_before { "same as before the reboot" } else { "CHANGED" }
        ));
        self.say(&format!("ping web-1 -> web-2 works again {} after netd started", ms(traffic_back)));
        if ip_after != ip_before || mac_after != mac_before {
            return Err(failed(format!(
                "pinning failed across the reboot: pod IP {ip_before} -> {ip_after}, VTEP MAC {mac_before} -> {mac_after}"
            )));
        }

        (self.narrate)("");
        let returned = Instant::now();
        self.registry.start()?;
        let registry_start = returned.elapsed();
        self.say(&format!("registry BACK (up and serving after {})", ms(registry_start)));
        let mut resynced = Duration::ZERO;
        for number in [2u8, 1, 3] {
            self.wait("resync", number, |ns| {
                metric(ns, "netd_registry_connected") == Some(1.0)
                    && metric(ns, "netd_seconds_since_last_sync").is_some_and(|s| (0.0..5.0).contains(&s))
            })?;
            if number == 2 {
                resynced = returned.elapsed();
                let ns = self.node_ns(2)?;
                let since = metric(ns, "netd_seconds_since_last_sync").unwrap_or(-1.0);
                let peers = metric(ns, "netd_peers_programmed").unwrap_or(-1.0);
                self.say(&format!(
                    "node-2: reconnected and resynced in {} ({peers} peers, last sync {since:.1}s ago)",
                    ms(resynced)
                ));
            }
        }
        let peers_after_resync = metric(self.node_ns(2)?, "netd_peers_programmed").unwrap_or(-1.0);
        for (from, to) in [(0, 1), (1, 2), (2, 0)] {
            if !self.ping(from, to) {
                return Err(failed(format!("traffic pod {} -> pod {} failed after the resync", from + 1, to + 1)));
            }
        }
        self.say("all pods reach each other");
        let rollout = match self.rollout_to.clone() {
            Some(new_netd) => {
                (self.narrate)("");
                Some(self.roll_out(&new_netd)?)
            }
            None => None,
        };
        if let Some(chapter) = self.chapter.take() {
            (self.narrate)("");
            let mut stage = ChapterStage {
                cluster: &self.cluster,
                pods: &self.pods,
                state: &self.state,
                registry_spec: self.registry.registry_spec(),
                started: self.started,
                narrate: &mut *self.narrate,
            };
            chapter(&mut stage).map_err(HarnessError::Chapter)?;
        }

        (self.narrate)("");
        for number in 1..=3u8 {
            if let Some(mut daemon) = self.daemons[usize::from(number - 1)].take() {
                let status = daemon.signal(libc::SIGTERM)?;
                if !status.is_some_and(|s| s.success()) {
                    return Err(failed(format!("node-{number}: netd exited with {status:?} on SIGTERM")));
                }
            }
            self.cleanup(number)?;
        }
        self.say("netd stopped (SIGTERM leaves the data plane), `netd cleanup` removed it, namespaces deleted");
        Ok(ScenarioReport {
            node_ready,
            restored,
            pod_reattached,
            traffic_back,
            registry_start,
            resynced,
            peers_after_resync,
            rollout,
        })
    }

    /// The rollout chapter; see the module docs.
    fn roll_out(&mut self, new_netd: &Path) -> Result<RolloutReport, HarnessError> {
        use netd_cloud::rollout::{Phase, RolloutState};
        let target = new_netd.display().to_string();
        let label = new_netd.file_name().map_or(target.clone(), |n| n.to_string_lossy().into_owned());
        let from = self.running[0].display().to_string();
        let nodes: Vec<String> = (1..=3u8).map(|n| format!("node-{n}")).collect();
        let mut state =
            RolloutState::new(&target, &label, &from, nodes, STEP_TIMEOUT, netd_cloud::rollout::state::unix_now());
        let state_file = self.state.join("rollout.json");
        let save = |state: &RolloutState| {
            std::fs::write(&state_file, state.to_json())
                .map_err(|e| HarnessError::io(format!("writing {}", state_file.display()), e))
        };
        // The pre-check: the new binary runs, every node's netd is ready.
        let version = Command::new(new_netd)
            .arg("--version")
            .output()
            .map_err(|source| HarnessError::Spawn { command: format!("{} --version", new_netd.display()), source })?;
        if !version.status.success() {
            return Err(failed(format!("pre-check: {} --version failed", new_netd.display())));
        }
        for number in 1..=3u8 {
            let ns = self.node_ns(number)?;
            if !http_get(ns, HEALTH_ADDR, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
                return Err(failed(format!("pre-check: node-{number}: netd is not ready; nothing started")));
            }
        }
        self.say(&format!(
            "pre-check: {} runs ({}), netd ready on all 3 nodes",
            label,
            String::from_utf8_lossy(&version.stdout).trim()
        ));
        save(&state)?;
        self.say(&format!(
            "rolling out {label} ({target}) in batches of {:?}; every pod pings the next every 10 ms",
            netd_cloud::rollout::plan(3)
        ));
        let mut pings = Vec::new();
        for (from, to) in [(0, 1), (1, 2), (2, 0)] {
            let target = self.pods[to].2.to_string();
            let child = self.pods[from]
                .1
                .run(|| {
                    Command::new("ping")
                        .args(["-i", "0.01", "-W", "1", "-q", &target])
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                })?
                .map_err(|source| HarnessError::Spawn { command: "ping".into(), source })?;
            pings.push(Pinger(Some(child)));
        }
        std::thread::sleep(Duration::from_millis(500));
        let began = Instant::now();
        let mut restart_to_ready = Vec::new();
        let mut last_line = String::new();
        while state.phase == Phase::Running {
            let mut views = std::collections::BTreeMap::new();
            for number in 1..=3u8 {
                let ns = self.node_ns(number)?;
                let ready = http_get(ns, HEALTH_ADDR, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"));
                let running = self.daemons[usize::from(number - 1)].as_ref().and_then(NetdProcess::pid).is_some();
                let version = running.then(|| self.running[usize::from(number - 1)].display().to_string());
                views.insert(
                    format!("node-{number}"),
                    netd_cloud::rollout::NodeView { version, ready, offline: None, detail: "readyz not 200".into() },
                );
            }
            let step = state.step(
                &views,
                netd_cloud::rollout::state::unix_now(),
                netd_cloud::rollout::state::DEFAULT_PAUSED_TTL,
            );
            if step.changed {
                save(&state)?;
            }
            for line in &step.lines {
                self.say(&format!("rollout: {line}"));
            }
            let status = state.status_line("netd");
            if status != last_line {
                self.say(&status);
                last_line = status;
            }
            for node in &step.upgrade {
                let number: u8 =
                    node.trim_start_matches("node-").parse().map_err(|_| failed(format!("node {node}")))?;
                let index = usize::from(number - 1);
                let stopped = Instant::now();
                if let Some(mut old) = self.daemons[index].take() {
                    let status = old.signal(libc::SIGTERM)?;
                    if !status.is_some_and(|s| s.success()) {
                        return Err(failed(format!("{node}: netd exited with {status:?} on SIGTERM")));
                    }
                }
                self.running[index] = new_netd.to_path_buf();
                self.start_daemon(number)?;
                self.wait("readiness on the new netd", number, |ns| {
                    http_get(ns, HEALTH_ADDR, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
                })?;
                restart_to_ready.push(stopped.elapsed());
                self.say(&format!("{node}: old netd stopped (SIGTERM), new netd Ready in {}", ms(stopped.elapsed())));
                // A second under traffic before the health gate looks again.
                std::thread::sleep(SOAK);
            }
            if step.upgrade.is_empty() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if state.phase != Phase::Complete {
            return Err(failed(format!("the rollout stopped: {}", state.status_line("netd"))));
        }
        std::thread::sleep(Duration::from_millis(500));
        let took = began.elapsed();
        let (mut sent, mut lost) = (0, 0);
        for (pinger, (from, to)) in pings.iter_mut().zip([(0usize, 1usize), (1, 2), (2, 0)]) {
            let (s, received) = pinger.finish()?;
            self.say(&format!(
                "ping {} -> {}: {s} sent, {received} answered, {} lost",
                self.pods[from].0,
                self.pods[to].0,
                s - received
            ));
            sent += s;
            lost += s - received;
        }
        if lost > 0 || sent == 0 {
            return Err(failed(format!("traffic was interrupted by the rollout: {lost} of {sent} pings lost")));
        }
        self.say(&format!("rollout done in {}: {sent} pings, none lost", ms(took)));
        Ok(RolloutReport { restart_to_ready, pings_sent: sent, pings_lost: lost, took })
    }

    fn cleanup(&self, number: u8) -> Result<(), HarnessError> {
        let dir = self.node_dir(number);
        let netd = self.bin_dir.join("netd");
        let out = self.node_ns(number)?.run(|| {
            Command::new(&netd)
                .args(["cleanup", "--purge-state", "--state-dir"])
                .arg(&dir)
                .arg("--subnet-env")
                .arg(dir.join("subnet.env"))
                .output()
        })?;
        let out =
            out.map_err(|source| HarnessError::Spawn { command: format!("{} cleanup", netd.display()), source })?;
        if !out.status.success() {
            return Err(failed(format!("netd cleanup on node-{number}: {}", String::from_utf8_lossy(&out.stderr))));
        }
        Ok(())
    }
}

/// A `ping` running in the background, stopped (SIGINT) and reaped on
/// drop if not finished.
struct Pinger(Option<std::process::Child>);

impl Pinger {
    /// SIGINT, then ping's summary: (transmitted, received).
    fn finish(&mut self) -> Result<(u64, u64), HarnessError> {
        let Some(child) = self.0.take() else { return Err(failed("ping already finished".into())) };
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().map_err(|e| HarnessError::io("waiting for ping", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "N packets transmitted, M received, ..."
        let line = text.lines().find(|l| l.contains("packets transmitted")).unwrap_or_default();
        let number = |word: &str| {
            line.split(", ")
                .find(|part| part.contains(word))
                .and_then(|part| part.split(' ').next()?.parse::<u64>().ok())
        };
        match (number("transmitted"), number("received")) {
            (Some(sent), Some(received)) => Ok((sent, received)),
            _ => Err(failed(format!("ping printed no summary: {text}"))),
        }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
