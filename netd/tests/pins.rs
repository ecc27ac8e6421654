//! Pinned pod IPs freed on the control plane's word, against a real
//! kube-apiserver 1.20 (pods created with `spec.nodeName`, no scheduler):
//!
//! - the daemon's pin keeper (`netd::daemon::pins`) watching the pods bound
//!   to this node, on the store `netd-ipam` keeps as the IPAM of Debian's
//!   `bridge` plugin (pods in namespaces), found from a CNI configuration
//!   directory. The pod watch reaches the API server through a TCP relay the
//!   test can cut, so "the node is cut off" happens while the API server
//!   keeps serving everybody else (deletions made meanwhile are applied on
//!   return);
//! - the real `netd run` daemon SIGKILLed at random moments while plugin
//!   processes ADD and DEL and pods come and go.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netd::daemon::health::Shared;
use netd::daemon::pins::{PinKeeper, Stores};
use netd::ipam::Store;
use netd::kube::pods::PodWatch;
use netd::kube::{KubeClient, KubeConfig};
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::NetworkConfig;
use netd::testing::{
    self, plugin_dir_of, Cluster, CniCall, CniRunner, KubeApiServer, NetNs, NetdProcess, DEBIAN_CNI_DIR, HEALTH_ADDR,
};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

const NODE: &str = "edge-a";
const GRACE: Duration = Duration::from_secs(2);

fn api(server: &KubeApiServer, method: &str, path: &str, body: Option<&str>) {
    let (status, text) = server.api(method, path, body.map(|b| ("application/json", b))).unwrap();
    assert!((200..300).contains(&status), "{method} {path}: HTTP {status}: {text}");
}

/// A pod bound to `node` by its spec, as no scheduler runs.
fn pod_json(name: &str, node: &str) -> String {
    let pod = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name },
        "spec": { "nodeName": node, "automountServiceAccountToken": false,
                  "containers": [{ "name": "c", "image": "registry.invalid/pause:3" }] } });
    pod.to_string()
}

fn create_pod(server: &KubeApiServer, name: &str, node: &str) {
    api(server, "POST", "/api/v1/namespaces/default/pods", Some(&pod_json(name, node)));
}

fn delete_pod(server: &KubeApiServer, name: &str) {
    api(server, "DELETE", &format!("/api/v1/namespaces/default/pods/{name}?gracePeriodSeconds=0"), None);
}

/// A relay to the API server that can be cut (connections reset, new
/// ones refused) and restored.
struct Relay {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let gate = open.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { continue };
                let gate = gate.clone();
                tokio::spawn(async move {
                    if !gate.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut server) = TcpStream::connect(target).await else { return };
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                    tokio::pin!(copy);
                    loop {
                        tokio::select! {
                            _ = &mut copy => return,
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                                if !gate.load(Ordering::SeqCst) {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Self { addr, open }
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }
}

const PLUGIN: &str = env!("CARGO_BIN_EXE_netd-ipam");
const NETD: &str = env!("CARGO_BIN_EXE_netd");

/// The network configuration, as a runtime would hand it to the plugin: a
/// three-address pool, so a freed pin is visibly the one address left.
fn network(data_dir: &Path) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"cbr0","type":"bridge","bridge":"cni0","isGateway":true,
            "ipam":{{"type":"netd-ipam","dataDir":"{}",
            "ranges":[[{{"subnet":"10.244.3.0/24","rangeStart":"10.244.3.10","rangeEnd":"10.244.3.12"}}]]}}}}"#,
        data_dir.display()
    )
}

/// `CNI_PATH`: Debian's plugins, then this workspace's `netd-ipam`.
fn cni_path() -> Vec<PathBuf> {
    vec![PathBuf::from(DEBIAN_CNI_DIR), plugin_dir_of(PLUGIN)]
}

/// A node's container runtime: Debian's `bridge` plugin with `netd-ipam` as
/// its IPAM, one namespace per sandbox, the plugins run in the node's
/// namespace.
struct Runtime {
    node: NetNs,
    conf: String,
    sandboxes: HashMap<String, NetNs>,
}

impl Runtime {
    fn new(data_dir: &Path) -> Self {
        Self { node: NetNs::new().unwrap(), conf: network(data_dir), sandboxes: HashMap::new() }
    }

    fn call(&self, command: &str, container: &str, sandbox: &NetNs, pod: Option<&str>) -> std::process::Output {
        let pod = pod.map(|name| format!("default/{name}"));
        let call =
            CniCall { command, container_id: container, pod_netns: sandbox, ifname: "eth0", pod: pod.as_deref() };
        CniRunner::new(&self.node, cni_path()).call_ok("bridge", &call, &self.conf).unwrap()
    }

    /// CNI ADD of pod `name` in a new sandbox `container`; the pod's
    /// address, checked to be the one the bridge configured in the sandbox.
    fn add(&mut self, name: &str, container: &str) -> IpAddr {
        let sandbox = NetNs::new().unwrap();
        let out = self.call("ADD", container, &sandbox, Some(name));
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let cidr = result["ips"][0]["address"].as_str().unwrap().to_string();
        let configured = sandbox.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]).unwrap();
        assert!(configured.contains(&format!("inet {cidr} ")), "{name}: {cidr} not on eth0: {configured}");
        self.sandboxes.insert(container.to_string(), sandbox);
        cidr.split('/').next().unwrap().parse().unwrap()
    }

    /// CNI DEL of sandbox `container`, which then goes away.
    fn del(&mut self, container: &str) {
        let sandbox = self.sandboxes.remove(container).unwrap();
        self.call("DEL", container, &sandbox, None);
    }
}

fn pins(store: &Path) -> HashMap<String, IpAddr> {
    let allocations = Store::open(store).unwrap().allocations().unwrap();
    allocations.into_iter().filter_map(|a| Some((a.pod?.to_string(), a.ip))).collect()
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn pins_of_pods_that_are_gone_are_freed_on_the_control_planes_word_only() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    let server = KubeApiServer::new().unwrap();
    let account = json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "default" } });
    api(&server, "POST", "/api/v1/namespaces/default/serviceaccounts", Some(&account.to_string()));
    let url: url_parts::Url = server.url().parse().unwrap();
    let relay = Relay::start(url.addr).await;
    let client = KubeClient::new(&KubeConfig {
        server: format!("https://{}", relay.addr),
        token: Some(server.token().to_string()),
        token_file: None,
        ca_cert_pem: Some(server.ca_cert_pem().unwrap()),
        client_cert: None,
        node_name: NODE.into(),
        network: None,
    })
    .unwrap();

    // The stores are found as the daemon finds them: from the CNI
    // configuration directory.
    let dir = tempfile::tempdir().unwrap();
    let data = &dir.path().join("ipam");
    let conf_dir = dir.path().join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let conflist = format!(r#"{{"cniVersion":"1.0.0","name":"cbr0","plugins":[{}]}}"#, network(data));
    std::fs::write(conf_dir.join("10-cbr0.conflist"), conflist).unwrap();
    let store = data.join("cbr0/netd-ipam.db");
    let mut runtime = Runtime::new(data);
    for name in ["web-0", "web-1"] {
        create_pod(&server, name, NODE);
    }
    let web0 = runtime.add("web-0", "c0");
    let web1 = runtime.add("web-1", "c1");
    // A pod the API server never heard of, its container long gone.
    let ghost = runtime.add("ghost", "cg");
    runtime.del("cg");

    let watch = PodWatch::new(&client, NODE).unwrap().with_watch_timeout(Duration::from_secs(2));
    let shared = Arc::new(Shared::default());
    let keeper = PinKeeper { stores: Stores::Discover(conf_dir.clone()), grace: GRACE };
    // Embedded as an agent would: on this runtime, stopped by its owner.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(keeper.run_until(watch, shared.clone(), async move {
        let _ = stopped.await;
    }));
    let freed = |reason: netd::ipam::FreeReason| Store::open(&store).unwrap().stats().unwrap().freed.get(reason);

    // The first complete list: the ghost is absent, released past the grace.
    wait_for("the ghost's pin freed (list)", || !pins(&store).contains_key("default/ghost")).await;
    assert_eq!(freed(netd::ipam::FreeReason::List), 1);
    // A listed, attached pod keeps its pin.
    assert_eq!(pins(&store)["default/web-0"], web0);
    // A pod that stays takes the ghost's address: the pool is full now.
    create_pod(&server, "filler", NODE);
    assert_eq!(runtime.add("filler", "cf"), ghost);

    // web-0 deleted (its container gone first): freed after the grace, and
    // its address is the one a new pod gets. The pool is full, so it could
    // only be web-0's, and no pressure reclaim made room: the keeper did.
    runtime.del("c0");
    delete_pod(&server, "web-0");
    let deleted_at = Instant::now();
    wait_for("web-0's pin freed (deleted)", || !pins(&store).contains_key("default/web-0")).await;
    assert!(deleted_at.elapsed() >= GRACE, "freed before the grace ran out");
    assert_eq!(freed(netd::ipam::FreeReason::Deleted), 1);
    create_pod(&server, "new-0", NODE);
    assert_eq!(runtime.add("new-0", "cn"), web0, "the freed address is reused");
    assert_eq!(freed(netd::ipam::FreeReason::Pressure), 0);

    // web-1 deleted and re-created on this node within the grace: same IP.
    runtime.del("c1");
    delete_pod(&server, "web-1");
    tokio::time::sleep(GRACE / 4).await;
    create_pod(&server, "web-1", NODE);
    tokio::time::sleep(GRACE * 3).await;
    assert_eq!(pins(&store).get("default/web-1"), Some(&web1), "kept across a re-creation within the grace");
    assert_eq!(runtime.add("web-1", "c1b"), web1);

    // new-0 moves: deleted here, re-created bound to another node.
    runtime.del("cn");
    delete_pod(&server, "new-0");
    create_pod(&server, "new-0", "edge-b");
    wait_for("new-0's pin freed (moved)", || !pins(&store).contains_key("default/new-0")).await;
    assert_eq!(freed(netd::ipam::FreeReason::Moved), 1);

    // Cut off from the API server: web-1 goes (container, then pod) while
    // netd cannot see it; nothing is freed however long it takes. The
    // deletion waits until the keeper has lost its watch: the CNI and API
    // calls block this test's one runtime thread, so without the wait the
    // relay could still pass the DELETED event before it closes.
    relay.set_open(false);
    wait_for("the keeper notices the cut", || shared.metrics().contains("netd_pods_synced 0")).await;
    runtime.del("c1b");
    delete_pod(&server, "web-1");
    tokio::time::sleep(GRACE * 4).await;
    assert_eq!(pins(&store).get("default/web-1"), Some(&web1), "nothing is freed while cut off");
    let metrics = shared.metrics();
    assert!(metrics.contains("netd_pods_synced 0"), "{metrics}");
    // Back: the fresh list applies the deletion made meanwhile.
    relay.set_open(true);
    wait_for("web-1's pin freed after the link returns", || !pins(&store).contains_key("default/web-1")).await;
    assert_eq!(freed(netd::ipam::FreeReason::List), 2);
    wait_for("metrics published", || shared.metrics().contains("netd_pods_synced 1")).await;
    let metrics = shared.metrics();
    assert!(metrics.contains(r#"netd_ipam_pins_freed_total{reason="moved"} 1"#), "{metrics}");
    // Only the filler is still attached.
    assert!(metrics.contains(r#"netd_ipam_pins{state="attached"} 1"#), "{metrics}");
    Store::open(&store).unwrap().integrity_check().unwrap();
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("the keeper stops when told").unwrap();
    Store::open(&store).unwrap().integrity_check().unwrap();
}

/// Plugin processes, pods and the daemon's pin keeper sharing one store
/// while the daemon is SIGKILLed: what the churn workers acknowledged, and
/// how they are paused so the test can look at a quiet store.
#[derive(Default)]
struct Churn {
    stop: AtomicBool,
    pause: AtomicBool,
    parked: AtomicUsize,
    /// Pods whose ADD was acknowledged and not yet DEL'd, with that ADD's address.
    attached: Mutex<HashMap<String, IpAddr>>,
    /// Every failed step (an ADD or DEL error, an API call refused).
    failures: Mutex<Vec<String>>,
    adds: AtomicUsize,
}

impl Churn {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn check_failures(&self) {
        let failures = self.failures.lock().unwrap();
        assert!(failures.is_empty(), "churn failed: {failures:?}");
    }

    /// Parks every worker between two pods (none mid-ADD or mid-DEL).
    fn quiesce(&self, workers: usize) {
        self.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.parked.load(Ordering::SeqCst) < workers {
            self.check_failures();
            assert!(Instant::now() < deadline, "churn workers did not park");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }
}

/// Stops the churn workers when dropped, also while a panic unwinds, so the
/// scope joining them does not wait forever.
struct StopOnDrop<'a>(&'a Churn);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::SeqCst);
    }
}

/// A xorshift generator: random enough for kill moments, seeded so a
/// failing run can be replayed (the seed is printed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One churn worker: pods `w<id>-<n>`, each created in the API server,
/// attached (a `netd-ipam` ADD process), held a moment, DEL'd and deleted,
/// as kubelet does; never more than one attached per worker.
fn churn_worker(id: usize, churn: &Churn, server: &KubeApiServer, runner: &CniRunner<'_>, conf: &str, seed: u64) {
    // netd-ipam does not enter the sandbox; one namespace per worker suffices.
    let sandbox = NetNs::new().unwrap();
    let mut rng = Rng(seed);
    let api = |method: &str, path: &str, body: Option<String>| -> Result<(), String> {
        match server.api(method, path, body.as_deref().map(|b| ("application/json", b))) {
            Ok((status, _)) if (200..300).contains(&status) => Ok(()),
            Ok((status, text)) => Err(format!("{method} {path}: HTTP {status}: {text}")),
            Err(e) => Err(format!("{method} {path}: {e}")),
        }
    };
    for n in 0.. {
        if churn.stop.load(Ordering::SeqCst) {
            return;
        }
        if churn.pause.load(Ordering::SeqCst) {
            churn.parked.fetch_add(1, Ordering::SeqCst);
            while churn.pause.load(Ordering::SeqCst) && !churn.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            churn.parked.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let name = format!("w{id}-{n}");
        let container = format!("c-{name}");
        if let Err(e) = api("POST", "/api/v1/namespaces/default/pods", Some(pod_json(&name, KILL_NODE))) {
            return churn.fail(e);
        }
        let call = |command| {
            let pod = format!("default/{name}");
            let call =
                CniCall { command, container_id: &container, pod_netns: &sandbox, ifname: "eth0", pod: Some(&pod) };
            runner.call("netd-ipam", &call, conf).unwrap()
        };
        let out = call("ADD");
        let ip = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|result| result["ips"][0]["address"].as_str()?.split('/').next()?.parse::<IpAddr>().ok());
        let Some(ip) = ip.filter(|_| out.status.success()) else {
            return churn.fail(format!("ADD {name}: {}", String::from_utf8_lossy(&out.stdout)));
        };
        churn.adds.fetch_add(1, Ordering::SeqCst);
        churn.attached.lock().unwrap().insert(name.clone(), ip);
        std::thread::sleep(Duration::from_millis(50 + rng.below(250)));
        churn.attached.lock().unwrap().remove(&name);
        let out = call("DEL");
        if !out.status.success() {
            return churn.fail(format!("DEL {name}: {}", String::from_utf8_lossy(&out.stdout)));
        }
        let path = format!("/api/v1/namespaces/default/pods/{name}?gracePeriodSeconds=0");
        if let Err(e) = api("DELETE", &path, None) {
            return churn.fail(e);
        }
        // Gaps between pods, so the daemon frees some pins before pressure
        // reclaims them.
        std::thread::sleep(Duration::from_millis(rng.below(400)));
    }
}

/// The node of the SIGKILL test (the cluster's first).
const KILL_NODE: &str = "node-1";

/// The invariants on a quiet store: it passes SQLite's integrity check, no
/// address and no pod is held twice, and every attached pod holds, attached,
/// exactly the address its ADD returned.
fn assert_store_invariants(store: &Path, attached: &HashMap<String, IpAddr>, when: &str) {
    let store = Store::open(store).unwrap();
    store.integrity_check().unwrap_or_else(|e| panic!("{when}: integrity check: {e}"));
    let rows = store.allocations().unwrap();
    let ips: HashSet<IpAddr> = rows.iter().map(|a| a.ip).collect();
    assert_eq!(ips.len(), rows.len(), "{when}: an address is held twice: {rows:?}");
    let pods: HashSet<_> = rows.iter().map(|a| a.pod.clone()).collect();
    assert_eq!(pods.len(), rows.len(), "{when}: a pod holds two addresses: {rows:?}");
    for (name, ip) in attached {
        let pod = format!("default/{name}");
        let row = rows.iter().find(|a| a.pod.as_ref().map(ToString::to_string).as_deref() == Some(pod.as_str()));
        let row = row.unwrap_or_else(|| panic!("{when}: attached pod {pod} lost its pin {ip}: {rows:?}"));
        assert_eq!((row.ip, row.state), (*ip, netd::ipam::State::Attached), "{when}: attached pod {pod}");
    }
}

/// `kill -9` of the daemon at random moments, under concurrent plugin
/// processes and pod churn: an attached pod's address is never freed or
/// reclaimed, no address is ever held twice, the store stays intact, no ADD
/// fails (a small pool: pressure reclaims while the daemon is dead), and the
/// daemon left running frees the pins of the pods deleted meanwhile.
#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn daemon_sigkilled_at_random_moments_never_frees_an_attached_pin() {
    const WORKERS: usize = 3;
    const ROUNDS: usize = 8;
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let state = tempfile::tempdir().unwrap();
    // The API server runs on the underlay ("the cloud"), where the daemon
    // in the node's namespace reaches it; dropped before the cluster.
    let cluster = Cluster::bare(1).unwrap();
    let node = &cluster.nodes[0];
    assert_eq!(node.name, KILL_NODE);
    let server = KubeApiServer::new_on(cluster.control_plane()).unwrap();
    let account = json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "default" } });
    api(&server, "POST", "/api/v1/namespaces/default/serviceaccounts", Some(&account.to_string()));
    let token_file = state.path().join("token");
    let ca_file = state.path().join("ca.pem");
    std::fs::write(&token_file, server.token()).unwrap();
    std::fs::write(&ca_file, server.ca_cert_pem().unwrap()).unwrap();
    let registry = state.path().join("registry.db");
    let network = NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&registry, &network).unwrap();

    // Eight addresses for at most four attached pods and a stream of new
    // names: the pool is full of released pins whenever the daemon is down.
    let data = state.path().join("ipam");
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"churn","type":"bridge","ipam":{{"type":"netd-ipam","dataDir":"{}",
            "ranges":[[{{"subnet":"10.244.1.0/24","rangeStart":"10.244.1.10","rangeEnd":"10.244.1.17"}}]]}}}}"#,
        data.display()
    );
    let conf_dir = state.path().join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let conflist = format!(r#"{{"cniVersion":"1.0.0","name":"churn","plugins":[{conf}]}}"#);
    std::fs::write(conf_dir.join("10-churn.conflist"), conflist).unwrap();
    let store = data.join("churn/netd-ipam.db");
    let daemon_dir = state.path().join("daemon");
    std::fs::create_dir_all(&daemon_dir).unwrap();
    let mut args = testing::netd_run_args(KILL_NODE, &format!("embedded:{}", registry.display()), &daemon_dir);
    args.extend([
        format!("--pods=kubernetes:{}", server.url()).into(),
        "--token-file".into(),
        token_file.clone().into(),
        "--ca-file".into(),
        ca_file.clone().into(),
        "--pin-grace=1s".into(),
        "--cni-conf-dir".into(),
        conf_dir.clone().into(),
    ]);
    let log = daemon_dir.join("netd.log");
    let start = || NetdProcess::spawn(&node.ns, Path::new(NETD), &args, &log).unwrap();
    let runner = CniRunner::new(&node.ns, cni_path());
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("seed {seed:#x}");
    let mut rng = Rng(seed);

    // A resident pod attached before the first round and never DEL'd.
    create_pod(&server, "resident", KILL_NODE);
    let resident_sandbox = NetNs::new().unwrap();
    let resident_call = CniCall {
        command: "ADD",
        container_id: "c-resident",
        pod_netns: &resident_sandbox,
        ifname: "eth0",
        pod: Some("default/resident"),
    };
    let out = runner.call_ok("netd-ipam", &resident_call, &conf).unwrap();
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let resident: IpAddr = result["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().parse().unwrap();

    let churn = Churn::default();
    std::thread::scope(|scope| {
        let _stop = StopOnDrop(&churn);
        for id in 0..WORKERS {
            let (churn, server, runner, conf) = (&churn, &server, &runner, conf.as_str());
            let seed = seed.rotate_left(8 * id as u32 + 8) | 1;
            scope.spawn(move || churn_worker(id, churn, server, runner, conf, seed));
        }
        let mut kills = Vec::new();
        for round in 0..ROUNDS {
            let mut daemon = start();
            // Half the kills during start-up and the first list, half while
            // frees of deleted pods are under way.
            let delay = Duration::from_millis(if round % 2 == 0 { rng.below(400) } else { 400 + rng.below(3600) });
            std::thread::sleep(delay);
            let ready =
                testing::http_get(&node.ns, HEALTH_ADDR, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"));
            let status = daemon.signal(libc::SIGKILL).unwrap();
            assert!(
                status.is_some_and(|s| s.code().is_none()),
                "netd was not running at the kill ({status:?}):\n{}",
                daemon.log()
            );
            kills.push((delay, ready));
            churn.quiesce(WORKERS);
            let mut attached = churn.attached.lock().unwrap().clone();
            attached.insert("resident".into(), resident);
            assert_store_invariants(&store, &attached, &format!("round {round} (killed after {delay:?})"));
            churn.check_failures();
            churn.resume();
            // Down for a while (a crash-looping daemon): the churn goes on,
            // the restart's list applies the deletions made meanwhile.
            std::thread::sleep(Duration::from_millis(rng.below(1500)));
        }
        eprintln!("kills (after, ready): {kills:?}");
        // The daemon left running through more churn, then the churn stops
        // with every churn pod DEL'd and deleted from the API server.
        let daemon = start();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !testing::http_get(&node.ns, HEALTH_ADDR, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            assert!(Instant::now() < deadline, "netd not ready:\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(2));
        churn.quiesce(WORKERS);
        churn.stop.store(true, Ordering::SeqCst);
        churn.check_failures();
        assert!(churn.attached.lock().unwrap().is_empty());
        let adds = churn.adds.load(Ordering::SeqCst);
        assert!(adds >= 30, "too few ADDs to prove anything: {adds}");

        // Every pin but the resident's belongs to a pod deleted from the
        // API server: the running daemon frees them all.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = pins(&store);
            if left.len() == 1 {
                assert_eq!(left.get("default/resident"), Some(&resident));
                break;
            }
            assert!(Instant::now() < deadline, "pins of deleted pods not freed: {left:?}\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_store_invariants(&store, &HashMap::from([("resident".to_string(), resident)]), "the end");
        let stats = Store::open(&store).unwrap().stats().unwrap();
        eprintln!("{adds} ADDs; freed: {:?}", stats.freed);
        assert!(stats.freed.get(netd::ipam::FreeReason::Deleted) + stats.freed.get(netd::ipam::FreeReason::List) > 0);
        let log = daemon.log();
        assert!(!log.contains("panicked"), "{log}");
    });
}

/// `https://IP:PORT` split for the relay.
mod url_parts {
    use std::net::SocketAddr;

    pub struct Url {
        pub addr: SocketAddr,
    }

    impl std::str::FromStr for Url {
        type Err = String;

        fn from_str(s: &str) -> Result<Self, String> {
            let rest = s.strip_prefix("https://").ok_or("not https")?;
            Ok(Self { addr: rest.trim_end_matches('/').parse().map_err(|e| format!("{rest}: {e}"))? })
        }
    }
}
