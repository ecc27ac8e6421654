//! The tunnel DNAT configuration driver (`netd::controller::tunnel_config`,
//! issue 15) against a real kube-apiserver and the real kernel: node labels,
//! pod CIDRs and ConfigMap `kube-system/edge-tunnel-server-cfg` change what
//! the next `connect()` does.
//!
//! The stage: a "cloud node" namespace with the tunnel server's two doors
//! (listeners on 192.168.60.1:10263 and :10264 that answer with the
//! destination the DNAT says was dialled) and stand-ins for everything a
//! client could dial (the node and pod addresses on its `lo`, listeners that
//! answer `direct`), so a connect that is not redirected says so instead of
//! leaving the namespace. The DNAT is attached to a test cgroup; clients are
//! processes spawned into it (`Cgroup::spawn`), so only they are redirected.
//! The driver runs in the test process, on the API server's loopback.
//!
//! One test function: the doors' listeners are made while the whole process
//! sits in the DNAT cgroup (`Cgroup::join`), which parallel tests would trip
//! over, and one API server serves the whole story.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netd::controller::tunnel_config::{self, TunnelConfigMetrics, TunnelConfigOptions};
use netd::controller::ControllerMetrics;
use netd::ebpf::dnat::{AttachOptions, Scope, TunnelDnat};
use netd::kube::{KubeClient, KubeConfig};
use netd::testing::{self, Cgroup, KubeApiServer, NetNs, PinDir};
use serde_json::{json, Value};

/// The tunnel server's address on the cloud node (the DNAT target).
/// The trusted role label (only `cloud` makes a cloud node).
const ROLE_LABEL: &str = netd::model::roles::LABEL_ROLE;
const CLOUD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 1);
/// The other cloud node's InternalIP: never redirected.
const CLOUD_NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The edge node's InternalIP.
const EDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 5);
/// Its ExternalIP: not a redirected address type by default.
const EDGE_EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 5);
/// A pod of the edge node, once its pod CIDR is 10.244.7.0/24.
const EDGE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 19);
const EDGE_CIDR: &str = "10.244.7.0/24";
const TLS_DOOR: u16 = 10263;
const PLAIN_DOOR: u16 = 10264;
/// Ports the stand-ins listen on: the kubelet's, and extras the ConfigMap names.
const PORTS: [u16; 4] = [10250, 10255, 9100, 8080];
const WAIT: Duration = Duration::from_secs(15);
const MERGE: &str = "application/merge-patch+json";
const CM_PATH: &str = "/api/v1/namespaces/kube-system/configmaps";

/// What a client's connect came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Landed {
    /// Not redirected: the stand-in at the dialled address answered.
    Direct(SocketAddrV4),
    /// Redirected to this door, which learned this original destination.
    Door { door: u16, original: Option<SocketAddrV4> },
}

fn door(door: u16, ip: Ipv4Addr, port: u16) -> Landed {
    Landed::Door { door, original: Some(SocketAddrV4::new(ip, port)) }
}

fn direct(ip: Ipv4Addr, port: u16) -> Landed {
    Landed::Direct(SocketAddrV4::new(ip, port))
}

/// Accepts on every listener and answers each connection with one line:
/// `direct <local>` from a stand-in, `door <port> <original|->` from a door.
struct Answerer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Answerer {
    fn start(doors: Vec<TcpListener>, stand_ins: Vec<TcpListener>, dnat: TunnelDnat) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let listeners: Vec<(bool, TcpListener)> =
            doors.into_iter().map(|l| (true, l)).chain(stand_ins.into_iter().map(|l| (false, l))).collect();
        for (_, listener) in &listeners {
            listener.set_nonblocking(true).unwrap();
        }
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let mut idle = true;
                for (is_door, listener) in &listeners {
                    while let Ok((mut stream, _)) = listener.accept() {
                        idle = false;
                        let local = stream.local_addr().unwrap();
                        let line = if *is_door {
                            let original = dnat.original_dst(&stream).unwrap();
                            format!("door {} {}\n", local.port(), original.map_or("-".into(), |o| o.to_string()))
                        } else {
                            format!("direct {local}\n")
                        };
                        let _ = stream.write_all(line.as_bytes());
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for Answerer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The driver on its own thread and runtime, until dropped.
struct Driver {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Option<String>>>,
}

impl Driver {
    fn start(client_config: KubeConfig, dnat: TunnelDnat, metrics: Arc<TunnelConfigMetrics>) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let client = KubeClient::new(&client_config).unwrap();
                let options = TunnelConfigOptions::new("cloud-0");
                tokio::select! {
                    result = tunnel_config::run(client, dnat, options, metrics) => {
                        Some(format!("the driver ended: {result:?}"))
                    }
                    _ = stopped => None,
                }
            })
        });
        Self { stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if let Ok(Some(ended)) = thread.join() {
                eprintln!("{ended}");
            }
        }
    }
}

/// Everything the driver logs, for asserting on its reasons.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Stage {
    // Field order is drop order: the driver and answerer before the
    // cgroup and the pins, the API server last but one, the namespace last.
    driver: Option<Driver>,
    _answerer: Answerer,
    /// The DNAT's maps as the kernel has them (lookups, not a cache).
    maps: TunnelDnat,
    metrics: Arc<TunnelConfigMetrics>,
    cgroup: Cgroup,
    _pins: PinDir,
    server: KubeApiServer,
    cloud: NetNs,
}

impl Stage {
    fn new() -> Self {
        let server = KubeApiServer::new().unwrap();
        let cloud = NetNs::new().unwrap();
        for ip in [CLOUD_IP, CLOUD_NODE_IP, EDGE_IP, EDGE_EXTERNAL_IP, EDGE_POD] {
            cloud.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]).unwrap();
        }
        let pins = PinDir::new().unwrap();
        let cgroup = Cgroup::new().unwrap();
        let options = AttachOptions {
            pin_dir: pins.path().to_path_buf(),
            cgroup: Some(cgroup.path().to_path_buf()),
            original_dst_cgroup: None,
        };
        let (mut dnat, _) = TunnelDnat::load_or_attach(&options).unwrap();
        // The namespace that sets the target is the redirected "host network".
        cloud.run(|| dnat.set_target(CLOUD_IP, Scope::HostNetwork)).unwrap().unwrap();
        assert!(dnat.stats().unwrap().rules.is_empty(), "nothing is redirected before the driver runs");
        // The doors belong to the DNAT cgroup (sockops hands an accepted
        // socket its original destination only there); the stand-ins do not.
        let doors = {
            let _inside = cgroup.join().unwrap();
            cloud
                .run(|| {
                    [TLS_DOOR, PLAIN_DOOR]
                        .map(|p| TcpListener::bind((CLOUD_IP, p)).unwrap())
                        .into_iter()
                        .collect::<Vec<_>>()
                })
                .unwrap()
        };
        let stand_ins = cloud
            .run(|| {
                let mut all = Vec::new();
                for ip in [CLOUD_NODE_IP, EDGE_IP, EDGE_EXTERNAL_IP, EDGE_POD, Ipv4Addr::LOCALHOST] {
                    for port in PORTS {
                        all.push(TcpListener::bind((ip, port)).unwrap());
                    }
                }
                all
            })
            .unwrap();
        let answerer = Answerer::start(doors, stand_ins, TunnelDnat::open(pins.path()).unwrap());
        let maps = TunnelDnat::open(pins.path()).unwrap();
        let metrics = Arc::new(TunnelConfigMetrics::default());
        Self { driver: None, _answerer: answerer, maps, metrics, cgroup, _pins: pins, server, cloud }
    }

    fn start_driver(&mut self) {
        let config = KubeConfig {
            server: self.server.url(),
            token: Some(self.server.token().to_string()),
            token_file: None,
            ca_cert_pem: Some(self.server.ca_cert_pem().unwrap()),
            client_cert: None,
            node_name: "cloud-0".into(),
            network: None,
        };
        let dnat = TunnelDnat::open(self._pins.path()).unwrap();
        self.driver = Some(Driver::start(config, dnat, self.metrics.clone()));
    }

    /// A connect from a cloud-node client in the DNAT cgroup, and where it landed.
    fn dial(&self, ip: Ipv4Addr, port: u16) -> Landed {
        let net = format!("--net={}", self.cloud.path().display());
        let script = format!("exec 3<>/dev/tcp/{ip}/{port} && timeout 5 head -n 1 <&3");
        let output = self.cgroup.spawn("nsenter", &[&net, "bash", "-c", &script]).unwrap().wait_with_output().unwrap();
        let line = String::from_utf8_lossy(&output.stdout).trim().to_string();
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["direct", local] => Landed::Direct(local.parse().unwrap()),
            ["door", port, original] => Landed::Door { door: port.parse().unwrap(), original: original.parse().ok() },
            _ => panic!("connect to {ip}:{port}: {line:?}, stderr {}", String::from_utf8_lossy(&output.stderr)),
        }
    }

    fn api(&self, method: &str, path: &str, body: Option<(&str, &str)>) -> Value {
        let (status, text) = self.server.api(method, path, body).unwrap();
        assert!((200..300).contains(&status), "{method} {path}: HTTP {status}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// A node; `role`: the trusted role label's value, if any.
    fn create_node(&self, name: &str, role: Option<&str>, addresses: &[(&str, Ipv4Addr)]) {
        let labels = role.map_or(json!({}), |v| json!({ ROLE_LABEL: v }));
        let addresses: Vec<Value> =
            addresses.iter().map(|(kind, ip)| json!({ "type": kind, "address": ip.to_string() })).collect();
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": name, "labels": labels },
            // Nodes may carry their status on create.
            "status": { "addresses": addresses },
        });
        self.api("POST", "/api/v1/nodes", Some(("application/json", &node.to_string())));
    }

    fn patch_node(&self, name: &str, patch: Value) {
        self.api("PATCH", &format!("/api/v1/nodes/{name}"), Some((MERGE, &patch.to_string())));
    }

    /// Sets (or, with `None`, removes) the trusted role label, as an
    /// operator does.
    fn set_role(&self, name: &str, value: Option<&str>) {
        self.patch_node(name, json!({ "metadata": { "labels": { ROLE_LABEL: value } } }));
    }

    /// Creates or replaces the ConfigMap with `data`, in one write as an
    /// operator's edit is.
    fn put_config(&self, data: Value) {
        let cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": "edge-tunnel-server-cfg", "namespace": "kube-system" },
            "data": data,
        })
        .to_string();
        let path = format!("{CM_PATH}/edge-tunnel-server-cfg");
        let (status, _) = self.server.api("GET", &path, None).unwrap();
        if status == 404 {
            self.api("POST", CM_PATH, Some(("application/json", &cm)));
        } else {
            // No resourceVersion: ConfigMaps take unconditional updates.
            self.api("PUT", &path, Some(("application/json", &cm)));
        }
    }

    /// Events about the ConfigMap with `reason`, oldest first.
    fn events(&self, reason: &str) -> Vec<Value> {
        let path = format!(
            "/api/v1/namespaces/kube-system/events?fieldSelector=involvedObject.name%3Dedge-tunnel-server-cfg,reason%3D{reason}"
        );
        let mut items = self.api("GET", &path, None)["items"].as_array().cloned().unwrap_or_default();
        items.sort_by_key(|e| e["metadata"]["creationTimestamp"].as_str().unwrap_or_default().to_string());
        items
    }

    fn rule(&self, port: u16) -> Option<u16> {
        self.maps.lookup_port_rule(port).unwrap()
    }

    fn is_edge(&self, ip: Ipv4Addr) -> bool {
        self.maps.lookup_edge_node(ip).unwrap()
    }

    fn counter(&self, read: impl Fn(&TunnelConfigMetrics) -> u64) -> u64 {
        read(&self.metrics)
    }

    /// What netd-controller's `/metrics` serves with this driver as its
    /// tunnel part (`ControllerMetrics::render`, its DNAT read on the
    /// blocking pool).
    fn controller_metrics(&self) -> String {
        let metrics = ControllerMetrics { tunnel: self.metrics.clone(), ..ControllerMetrics::default() };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(metrics.render())
    }
}

fn wait_for(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {WAIT:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn nodes_and_the_config_map_drive_the_next_connect() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let log = Log::default();
    let writer = log.clone();
    tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).init();
    let mut stage = Stage::new();

    // A cloud node, a node still labelled cloud by an operator (edge-1, to
    // become an edge node), and an edge node whose only address is
    // loopback.
    stage.create_node("cloud-1", Some("cloud"), &[("InternalIP", CLOUD_NODE_IP)]);
    stage.create_node("edge-1", Some("cloud"), &[("InternalIP", EDGE_IP), ("ExternalIP", EDGE_EXTERNAL_IP)]);
    stage.create_node("edge-lo", None, &[("InternalIP", Ipv4Addr::LOCALHOST)]);
    stage.start_driver();

    // No ConfigMap: the kubelet rules; no edge node with a usable address.
    wait_for("the kubelet rules", || stage.rule(10250) == Some(TLS_DOOR) && stage.rule(10255) == Some(PLAIN_DOOR));
    wait_for("both lists", || stage.counter(|m| m.resyncs.load(Ordering::Relaxed)) >= 2);
    assert_eq!(stage.maps.stats().unwrap().edge_nodes, Vec::<Ipv4Addr>::new());
    assert_eq!(stage.dial(EDGE_IP, 10250), direct(EDGE_IP, 10250));
    assert_eq!(stage.dial(Ipv4Addr::LOCALHOST, 10250), direct(Ipv4Addr::LOCALHOST, 10250));
    assert!(log.text().contains("127.0.0.1 is never redirected"), "the loopback node is reported");

    // The cloud label removed, so an edge node: its InternalIP is
    // redirected, with the original destination; its ExternalIP and the
    // cloud node are not.
    stage.set_role("edge-1", None);
    wait_for("edge-1 in the DNAT", || stage.is_edge(EDGE_IP));
    assert_eq!(stage.dial(EDGE_IP, 10250), door(TLS_DOOR, EDGE_IP, 10250));
    assert_eq!(stage.dial(EDGE_IP, 10255), door(PLAIN_DOOR, EDGE_IP, 10255));
    // The DNAT's own counters are served where it is attached: in the
    // controller's /metrics (the node binary links no BPF loader).
    let text = stage.controller_metrics();
    assert!(text.contains("# TYPE netd_dnat_edge_nodes gauge\nnetd_dnat_edge_nodes 1\n"), "{text}");
    assert!(text.contains("netd_dnat_edge_subnets 0\n"), "{text}");
    assert!(text.contains("netd_dnat_redirected_total{port=\"10250\",target_port=\"10263\"} "), "{text}");
    assert!(!text.contains("netd_dnat_redirected_total{port=\"10250\",target_port=\"10263\"} 0\n"), "{text}");
    assert!(text.contains("netd_tunnel_config_edge_nodes 1\n"), "{text}");
    assert_eq!(stage.dial(EDGE_EXTERNAL_IP, 10250), direct(EDGE_EXTERNAL_IP, 10250));
    assert_eq!(stage.dial(CLOUD_NODE_IP, 10250), direct(CLOUD_NODE_IP, 10250));
    assert_eq!(stage.dial(EDGE_IP, 9100), direct(EDGE_IP, 9100), "9100 is no rule yet");
    assert_eq!(stage.dial(EDGE_POD, 10250), direct(EDGE_POD, 10250), "no pod CIDR yet");

    // Its pod CIDR: its pods are redirected too.
    stage.patch_node("edge-1", json!({ "spec": { "podCIDR": EDGE_CIDR, "podCIDRs": [EDGE_CIDR] } }));
    wait_for("the pod CIDR", || stage.counter(|m| m.edge_subnets.load(Ordering::Relaxed)) == 1);
    assert_eq!(stage.dial(EDGE_POD, 10250), door(TLS_DOOR, EDGE_POD, 10250));

    // The ConfigMap adds 9100: the next connect to :9100 is redirected.
    stage.put_config(json!({ "dnat-ports-pair": "9100=10264" }));
    wait_for("rule 9100", || stage.rule(9100) == Some(PLAIN_DOOR));
    assert_eq!(stage.dial(EDGE_IP, 9100), door(PLAIN_DOOR, EDGE_IP, 9100));
    assert_eq!(stage.dial(EDGE_IP, 8080), direct(EDGE_IP, 8080));

    // A bad value is refused: an Event and a log line say why, and the old
    // rules still redirect.
    stage.put_config(json!({ "dnat-ports-pair": "10250=10264" }));
    let why = r#"dnat-ports-pair: token 1 "10250=10264": 10250 is the kubelet port, always redirected to 10263, never an extra"#;
    wait_for("the Warning Event", || !stage.events("InvalidTunnelConfig").is_empty());
    let events = stage.events("InvalidTunnelConfig");
    assert_eq!(events.len(), 1, "{events:#?}");
    let event = &events[0];
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["involvedObject"]["kind"], "ConfigMap");
    assert_eq!(event["involvedObject"]["namespace"], "kube-system");
    assert_eq!(event["source"]["host"], "cloud-0");
    let message = event["message"].as_str().unwrap();
    assert!(message.contains(why), "{message}");
    assert!(message.contains("keeping 9100=10264,10250=10263,10255=10264"), "{message}");
    assert!(log.text().contains(why), "the log says why too");
    assert_eq!(stage.counter(|m| m.config_valid.load(Ordering::Relaxed)), 0);
    assert_eq!(stage.dial(EDGE_IP, 9100), door(PLAIN_DOOR, EDGE_IP, 9100), "old rules stay");
    assert_eq!(stage.dial(EDGE_IP, 10250), door(TLS_DOOR, EDGE_IP, 10250));

    // The same bad value again (any edit that leaves data alone) is not
    // reported again; another bad value is.
    let folded = stage.counter(|m| m.config_map_events.load(Ordering::Relaxed));
    let path = format!("{CM_PATH}/edge-tunnel-server-cfg");
    stage.api("PATCH", &path, Some((MERGE, &json!({ "metadata": { "labels": { "touched": "1" } } }).to_string())));
    wait_for("the touch", || stage.counter(|m| m.config_map_events.load(Ordering::Relaxed)) > folded);
    assert_eq!(stage.counter(|m| m.config_refused.load(Ordering::Relaxed)), 1, "one report per reason");
    stage.put_config(json!({ "https-proxy-ports": "abc" }));
    wait_for("the second Warning", || stage.events("InvalidTunnelConfig").len() == 2);
    let second = stage.events("InvalidTunnelConfig")[1]["message"].as_str().unwrap().to_string();
    assert!(second.contains(r#"https-proxy-ports: token 1 "abc": "abc" is not a port (1-65535)"#), "{second}");
    assert_eq!(stage.dial(EDGE_IP, 9100), door(PLAIN_DOOR, EDGE_IP, 9100));

    // Fixed: applied (with a Normal Event), 9100 gone, 8080 in.
    stage.put_config(json!({ "http-proxy-ports": "8080" }));
    wait_for("rule 8080", || stage.rule(8080) == Some(PLAIN_DOOR) && stage.rule(9100).is_none());
    assert_eq!(stage.counter(|m| m.config_valid.load(Ordering::Relaxed)), 1);
    assert_eq!(stage.dial(EDGE_IP, 8080), door(PLAIN_DOOR, EDGE_IP, 8080));
    assert_eq!(stage.dial(EDGE_IP, 9100), direct(EDGE_IP, 9100));
    wait_for("the Normal Event", || !stage.events("TunnelConfigApplied").is_empty());

    // Labelled cloud again: neither the node nor its pods are redirected.
    stage.set_role("edge-1", Some("cloud"));
    wait_for("edge-1 out of the DNAT", || !stage.is_edge(EDGE_IP));
    assert!(stage.controller_metrics().contains("\nnetd_dnat_edge_nodes 0\n"), "the DNAT counts none now");
    assert_eq!(stage.dial(EDGE_IP, 10250), direct(EDGE_IP, 10250));
    wait_for("its pod CIDR out", || stage.counter(|m| m.edge_subnets.load(Ordering::Relaxed)) == 0);
    assert_eq!(stage.dial(EDGE_POD, 10250), direct(EDGE_POD, 10250));

    // The ConfigMap deleted: the kubelet rules only.
    stage.api("DELETE", &path, None);
    wait_for("the extras gone", || stage.rule(8080).is_none());
    assert_eq!(stage.rule(10250), Some(TLS_DOOR));

    let text = stage.metrics.render_prometheus();
    assert!(text.contains("netd_tunnel_config_refused_total 2\n"), "{text}");
    assert!(text.contains("netd_tunnel_config_events_posted_total 3\n"), "{text}");

    // A restart that finds a bad ConfigMap keeps the rules the last run
    // pinned, and says so.
    stage.put_config(json!({ "dnat-ports-pair": "9100=10264" }));
    wait_for("rule 9100 again", || stage.rule(9100) == Some(PLAIN_DOOR));
    drop(stage.driver.take());
    stage.put_config(json!({ "http-proxy-ports": "9100," }));
    stage.metrics = Arc::new(TunnelConfigMetrics::default());
    stage.start_driver();
    wait_for("the restart's refusal", || stage.counter(|m| m.config_refused.load(Ordering::Relaxed)) == 1);
    wait_for("its Event", || stage.events("InvalidTunnelConfig").len() == 3);
    let third = stage.events("InvalidTunnelConfig")[2]["message"].as_str().unwrap().to_string();
    assert!(third.contains(r#"http-proxy-ports: token 2 "": empty token"#), "{third}");
    assert!(third.contains("keeping the rules pinned before this start"), "{third}");
    assert_eq!(stage.rule(9100), Some(PLAIN_DOOR));
    assert_eq!(stage.dial(EDGE_IP, 9100), direct(EDGE_IP, 9100), "edge-1 is a cloud node now");
    stage.set_role("edge-1", Some("edge"));
    wait_for("edge-1 back", || stage.is_edge(EDGE_IP));
    assert!(stage.controller_metrics().contains("\nnetd_dnat_edge_nodes 1\n"), "after the restart too");
    assert_eq!(stage.dial(EDGE_IP, 9100), door(PLAIN_DOOR, EDGE_IP, 9100), "the pinned rules still redirect");
    drop(stage.driver.take());
    assert!(!stage.controller_metrics().contains("netd_dnat_"), "no DNAT driven, none shown");
}
