//! Pinned pod IPs freed on the control plane's word, against a real
//! kube-apiserver 1.20: the daemon's pin keeper (`netd::daemon::pins`)
//! watching the pods bound to this node, on the store the real `netd-ipam`
//! plugin keeps, found from a CNI configuration directory.
//!
//! The pod watch reaches the API server through a TCP relay the test can
//! cut, so "the node is cut off" happens while the API server keeps
//! serving everybody else (deletions made meanwhile are applied on return).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netd::daemon::health::Shared;
use netd::daemon::pins::{PinKeeper, Stores};
use netd::ipam::Store;
use netd::kube::pods::PodWatch;
use netd::kube::{KubeClient, KubeConfig};
use netd::testing::KubeApiServer;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

const NODE: &str = "edge-a";
const GRACE: Duration = Duration::from_secs(2);

fn api(server: &KubeApiServer, method: &str, path: &str, body: Option<&str>) {
    let (status, text) = server.api(method, path, body.map(|b| ("application/json", b))).unwrap();
    assert!((200..300).contains(&status), "{method} {path}: HTTP {status}: {text}");
}

fn create_pod(server: &KubeApiServer, name: &str, node: &str) {
    let pod = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name },
        "spec": { "nodeName": node, "automountServiceAccountToken": false,
                  "containers": [{ "name": "c", "image": "registry.invalid/pause:3" }] } });
    api(server, "POST", "/api/v1/namespaces/default/pods", Some(&pod.to_string()));
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

/// The network configuration, as a runtime would hand it to the plugin: a
/// three-address pool, so a freed pin is visibly the one address left.
fn network(data_dir: &Path) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"cbr0","type":"bridge","ipam":{{"type":"netd-ipam","dataDir":"{}",
            "ranges":[[{{"subnet":"10.244.3.0/24","rangeStart":"10.244.3.10","rangeEnd":"10.244.3.12"}}]]}}}}"#,
        data_dir.display()
    )
}

/// The real `netd-ipam` binary, one process per command.
fn plugin(command: &str, data_dir: &Path, name: &str, container: &str) -> serde_json::Value {
    use std::io::Write as _;
    let mut child = std::process::Command::new(PLUGIN)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", "/var/run/netns/unused")
        .env("CNI_PATH", "/usr/lib/cni")
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(network(data_dir).as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{command} {name}: {}", String::from_utf8_lossy(&out.stdout));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// CNI ADD; the pod's address.
fn add(data_dir: &Path, name: &str, container: &str) -> IpAddr {
    let result = plugin("ADD", data_dir, name, container);
    let cidr = result["ips"][0]["address"].as_str().unwrap();
    cidr.split('/').next().unwrap().parse().unwrap()
}

/// CNI DEL.
fn del(data_dir: &Path, name: &str, container: &str) {
    plugin("DEL", data_dir, name, container);
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
    for name in ["web-0", "web-1"] {
        create_pod(&server, name, NODE);
    }
    let web0 = add(data, "web-0", "c0");
    let web1 = add(data, "web-1", "c1");
    // A pod the API server never heard of, its container long gone.
    let ghost = add(data, "ghost", "cg");
    del(data, "ghost", "cg");

    let watch = PodWatch::new(&client, NODE).unwrap().with_watch_timeout(Duration::from_secs(2));
    let shared = Arc::new(Shared::default());
    let keeper = PinKeeper { stores: Stores::Discover(conf_dir.clone()), grace: GRACE };
    let task = tokio::spawn(keeper.run(watch, shared.clone()));
    let freed = |reason: netd::ipam::FreeReason| Store::open(&store).unwrap().stats().unwrap().freed.get(reason);

    // The first complete list: the ghost is absent, released past the grace.
    wait_for("the ghost's pin freed (list)", || !pins(&store).contains_key("default/ghost")).await;
    assert_eq!(freed(netd::ipam::FreeReason::List), 1);
    // A listed, attached pod keeps its pin.
    assert_eq!(pins(&store)["default/web-0"], web0);

    // web-0 deleted (its container gone first): freed after the grace, and
    // its address is the one a new pod gets.
    del(data, "web-0", "c0");
    delete_pod(&server, "web-0");
    let deleted_at = Instant::now();
    wait_for("web-0's pin freed (deleted)", || !pins(&store).contains_key("default/web-0")).await;
    assert!(deleted_at.elapsed() >= GRACE, "freed before the grace ran out");
    assert_eq!(freed(netd::ipam::FreeReason::Deleted), 1);
    create_pod(&server, "new-0", NODE);
    let reused = add(data, "new-0", "cn");
    assert!(reused == web0 || reused == ghost, "a freed address is reused: {reused}");

    // web-1 deleted and re-created on this node within the grace: same IP.
    del(data, "web-1", "c1");
    delete_pod(&server, "web-1");
    tokio::time::sleep(GRACE / 4).await;
    create_pod(&server, "web-1", NODE);
    tokio::time::sleep(GRACE * 3).await;
    assert_eq!(pins(&store).get("default/web-1"), Some(&web1), "kept across a re-creation within the grace");
    assert_eq!(add(data, "web-1", "c1b"), web1);

    // new-0 moves: deleted here, re-created bound to another node.
    del(data, "new-0", "cn");
    delete_pod(&server, "new-0");
    create_pod(&server, "new-0", "edge-b");
    wait_for("new-0's pin freed (moved)", || !pins(&store).contains_key("default/new-0")).await;
    assert_eq!(freed(netd::ipam::FreeReason::Moved), 1);

    // Cut off from the API server: web-1 goes (container, then pod) while
    // netd cannot see it; nothing is freed however long it takes.
    relay.set_open(false);
    del(data, "web-1", "c1b");
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
    assert!(metrics.contains(r#"netd_ipam_pins{state="attached"} 0"#), "{metrics}");
    Store::open(&store).unwrap().integrity_check().unwrap();
    task.abort();
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
