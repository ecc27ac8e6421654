//! `netd-autonomy` as an operator runs it, against each registry: the
//! embedded SQLite file, a real etcd and a real kube-apiserver. Set (with
//! and without a bound), status as text and JSON, flags written by hand
//! (OpenYurt's annotations, version 1 values and files) read back with
//! their source, unset clearing whatever switched autonomy on, and the
//! errors: unknown node, bad duration, registry unreachable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, SystemTime};

use netd::autonomy::{format_time, parse_time};
use netd::model::flannel::CONFIG_KEY;
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::etcd::EtcdRegistry;
use netd::registry::{LeaseRequest, NetworkConfig, OwnLease, PeerEvent, Registry};
use netd::testing::{EtcdServer, KubeApiServer};
use serde_json::{json, Value};

const STRATEGIC: &str = "application/strategic-merge-patch+json";

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> String {
        assert_eq!(self.code, Some(0), "stdout: {}\nstderr: {}", self.stdout, self.stderr);
        self.stdout
    }

    fn json(self) -> Value {
        let text = self.ok();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    fn fails(self, code: i32) -> String {
        assert_eq!(self.code, Some(code), "stdout: {}\nstderr: {}", self.stdout, self.stderr);
        assert!(self.stdout.is_empty(), "a failure printed {}", self.stdout);
        self.stderr
    }
}

fn autonomy(registry: &[&str], args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_netd-autonomy"))
        .args(args)
        .args(registry)
        .env_remove("NETD_REGISTRY")
        .env_remove("NETD_TOKEN_FILE")
        .env_remove("NETD_CA_FILE")
        .output()
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn config() -> NetworkConfig {
    NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 }
}

fn request(node: &str, ip: &str, mac_last: u8) -> LeaseRequest {
    LeaseRequest {
        node: node.into(),
        public_ip: ip.parse().unwrap(),
        vtep_mac: netd::ipam::MacAddr([0x0e, 0, 0, 0, 0, mac_last]),
        previous_subnet: None,
    }
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn strings(value: &Value) -> Vec<&str> {
    value.as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect()
}

/// The lease expiry the JSON reports, checked to be about 24 h ahead.
fn assert_lease(json: &Value, own: &OwnLease) {
    assert_eq!(json["lease"]["subnet"], own.lease.subnet.to_string());
    assert_eq!(json["lease"]["publicIP"], own.lease.public_ip.to_string());
    let expires = parse_time(json["lease"]["expiresAt"].as_str().unwrap()).unwrap();
    let ahead = expires.duration_since(SystemTime::now()).unwrap();
    assert!(ahead > Duration::from_secs(23 * 3600) && ahead <= Duration::from_secs(24 * 3600), "{ahead:?}");
}

async fn autonomous_peer(registry: &mut impl Registry, own: &OwnLease) -> bool {
    match registry.next_event(own.lease.subnet).await.unwrap() {
        PeerEvent::Resync(peers) => {
            peers.iter().find(|p| p.lease.node.as_deref() == Some("edge-1")).unwrap().autonomous
        }
        other => panic!("expected a resync, got {other:?}"),
    }
}

#[tokio::test]
async fn embedded_registry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    EmbeddedRegistry::create(&path, &config()).unwrap();
    let spec = format!("embedded:{}", path.display());
    let reg = ["--registry", spec.as_str()];
    let mut edge = EmbeddedRegistry::open(&path, Duration::from_millis(20));
    let own = edge.acquire_lease(&config(), &request("edge-1", "192.0.2.1", 1)).await.unwrap();
    let mut other = EmbeddedRegistry::open(&path, Duration::from_millis(20));
    let other_own = other.acquire_lease(&config(), &request("edge-2", "192.0.2.2", 2)).await.unwrap();

    // A new node is not autonomous.
    let text = autonomy(&reg, &["status", "edge-1"]).ok();
    assert!(text.starts_with(&format!("node edge-1 in embedded {}\nautonomy: off\n", path.display())), "{text}");
    assert!(text.contains(&format!("lease: {} (public IP 192.0.2.1) lapses", own.lease.subnet)), "{text}");
    assert!(text.contains("eviction: none from this registry"), "{text}");

    // Set: no time limit, from the database row; peers see it.
    let text = autonomy(&reg, &["set", "edge-1"]).ok();
    assert!(
        text.starts_with("wrote autonomy row of edge-1: autonomous=1\nwrote autonomy row of edge-1: bound_ns=NULL\n")
    );
    assert!(text.contains("autonomy: on (no time limit), from the autonomy row of edge-1 in"), "{text}");
    assert!(text.contains("is kept while the node is autonomous: no other node gets this subnet"), "{text}");
    assert!(text.contains("peers: netd peers keep this node's routes"), "{text}");
    let json = autonomy(&reg, &["status", "edge-1", "--json"]).json();
    assert_eq!(json["version"], 1);
    assert_eq!(json["changes"], Value::Null);
    assert_eq!((json["autonomy"]["on"].as_bool(), json["autonomy"]["limit"].as_str()), (Some(true), None));
    assert_eq!(strings(&json["autonomy"]["sources"]), [format!("the autonomy row of edge-1 in {}", path.display())]);
    assert_eq!(json["registry"]["kind"], "embedded");
    assert_eq!(json["kubernetes"], Value::Null);
    assert_lease(&json, &own);
    assert!(autonomous_peer(&mut other, &other_own).await);

    // Bounded, then unbounded again with 0.
    let json = autonomy(&reg, &["set", "edge-1", "--duration", "90m", "--json"]).json();
    assert_eq!(json["changes"][1], json!({ "field": "autonomy row of edge-1: bound_ns", "value": "5400000000000" }));
    assert_eq!(
        (json["autonomy"]["limit"].as_str(), json["autonomy"]["limitSeconds"].as_f64()),
        (Some("1h30m0s"), Some(5400.0))
    );
    assert!(json["implies"]["peers"].as_str().unwrap().contains("the 1h30m0s bound does not apply to routes"));
    let json = autonomy(&reg, &["set", "edge-1", "--duration", "0", "--json"]).json();
    assert_eq!((json["autonomy"]["on"].as_bool(), json["autonomy"]["limit"].as_str()), (Some(true), None));

    // Unset: off, and the peers drop the routes with the lease.
    let text = autonomy(&reg, &["unset", "edge-1"]).ok();
    assert!(text.starts_with("wrote autonomy row of edge-1: autonomous=0\n"), "{text}");
    assert!(text.contains("\nautonomy: off\n") && text.contains("netd peers remove this node's routes"), "{text}");
    let mut fresh = EmbeddedRegistry::open(&path, Duration::from_millis(20));
    assert!(!autonomous_peer(&mut fresh, &other_own).await);

    // Errors: a node nobody registered (the known ones listed), a bad
    // duration (quoted, before anything is opened), no registry file.
    let err = autonomy(&reg, &["set", "edge-9"]).fails(3);
    assert!(err.contains("unknown node \"edge-9\" in embedded") && err.contains("(nodes: edge-1, edge-2)"), "{err}");
    let err = autonomy(&reg, &["status", "edge-9", "--json"]).fails(3);
    assert!(err.contains("no lease and no autonomy row"), "{err}");
    let err =
        autonomy(&["--registry", "embedded:/nonexistent/registry.db"], &["set", "edge-1", "--duration", "2 days"])
            .fails(2);
    assert!(err.contains("'2 days'") && err.contains("--duration") && err.contains("not a Go duration"), "{err}");
    let err = autonomy(&reg, &["set", "edge-1", "--duration=-5m"]).fails(2);
    assert!(err.contains("'-5m'") && err.contains("negative"), "{err}");
    let err = autonomy(&["--registry", "embedded:/nonexistent/registry.db"], &["status", "edge-1"]).fails(4);
    assert!(err.contains("registry unreachable") && err.contains("/nonexistent/registry.db is not there"), "{err}");
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn embedded_format_1_files_are_upgraded_and_their_flags_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    // A file as netd with format version 1 wrote it.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(&format!(
        "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE lease(subnet TEXT PRIMARY KEY, node TEXT NOT NULL UNIQUE, attrs TEXT NOT NULL,
                            expires_at INTEGER NOT NULL);
         CREATE TABLE autonomy(node TEXT PRIMARY KEY, autonomous INTEGER NOT NULL);
         INSERT INTO meta VALUES('config', '{}');
         INSERT INTO autonomy VALUES('old-edge', 1), ('old-cloud', 0);
         PRAGMA user_version = 1;",
        netd::model::flannel::network_config_json(&config())
    ))
    .unwrap();
    drop(conn);
    let spec = format!("embedded:{}", path.display());
    let reg = ["--registry", spec.as_str()];
    let text = autonomy(&reg, &["status", "old-edge"]).ok();
    assert!(text.contains("autonomy: on (no time limit), from the autonomy row of old-edge"), "{text}");
    assert!(text.contains("lease: none held"), "{text}");
    assert!(autonomy(&reg, &["status", "old-cloud"]).ok().contains("autonomy: off\n"));
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!(version, 2);
    // The upgraded file takes a bound, and `netd registry init` accepts it as is.
    autonomy(&reg, &["set", "old-edge", "--duration", "2h"]).ok();
    let bound: Option<i64> =
        conn.query_row("SELECT bound_ns FROM autonomy WHERE node = 'old-edge'", [], |r| r.get(0)).unwrap();
    assert_eq!(bound, Some(7_200_000_000_000));
    EmbeddedRegistry::create(&path, &config()).unwrap();
    // A file from a later netd is refused, not downgraded.
    conn.pragma_update(None, "user_version", 3).unwrap();
    let err = autonomy(&reg, &["status", "old-edge"]).fails(1);
    assert!(err.contains("format version 3, this netd reads 2"), "{err}");
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn etcd_registry() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    let etcd = EtcdServer::new().unwrap();
    etcd.etcdctl(&["put", CONFIG_KEY, &netd::model::flannel::network_config_json(&config())]).unwrap();
    let spec = format!("etcd:{}", etcd.endpoint());
    let reg = ["--registry", spec.as_str()];
    let mut edge = EtcdRegistry::connect(&[etcd.endpoint()]).await.unwrap();
    let own = edge.acquire_lease(&config(), &request("edge-1", "192.0.2.1", 1)).await.unwrap();
    let mut other = EtcdRegistry::connect(&[etcd.endpoint()]).await.unwrap();
    let other_own = other.acquire_lease(&config(), &request("edge-2", "192.0.2.2", 2)).await.unwrap();
    let get = |key: &str| etcd.etcdctl(&["get", "--print-value-only", key]).unwrap().trim_end().to_string();

    let json = autonomy(&reg, &["status", "edge-1", "--json"]).json();
    assert_eq!(json["autonomy"]["on"], false);
    assert_lease(&json, &own);
    assert!(json["implies"]["lease"].as_str().unwrap().contains("etcd then deletes the key with its etcd lease"));
    assert!(json["implies"]["peers"].as_str().unwrap().contains("flannel peers do not read autonomy"));

    // A version 1 value written by hand reads, with its key as the source.
    etcd.etcdctl(&["put", "/coreos.com/network/autonomy/edge-1", "true"]).unwrap();
    let text = autonomy(&reg, &["status", "edge-1"]).ok();
    assert!(text.contains("autonomy: on (no time limit), from /coreos.com/network/autonomy/edge-1\n"), "{text}");

    // Bounded: the flag stays `true` (older readers keep reading it) and the
    // bound is a Go duration beside it.
    let text = autonomy(&reg, &["set", "edge-1", "--duration", "2h"]).ok();
    assert!(
        text.starts_with(
            "wrote /coreos.com/network/autonomy/edge-1=true\nwrote /coreos.com/network/autonomy-duration/edge-1=2h0m0s\n"
        ),
        "{text}"
    );
    assert_eq!(
        (get("/coreos.com/network/autonomy/edge-1"), get("/coreos.com/network/autonomy-duration/edge-1")),
        ("true".into(), "2h0m0s".into())
    );
    // The subnet edge-1 holds is reserved beside it, so it outlives the lease key.
    assert!(text.contains("wrote /coreos.com/network/reserved/edge-1={\"version\":1,\"subnet\":"), "{text}");
    let json = autonomy(&reg, &["status", "edge-1", "--json"]).json();
    assert!(json["implies"]["lease"].as_str().unwrap().contains("no other node gets this subnet"), "{json}");
    assert_eq!(json["lease"]["keptWhileAutonomous"], true);
    assert_eq!(json["autonomy"]["limit"], "2h0m0s");
    assert_eq!(
        strings(&json["autonomy"]["sources"]),
        ["/coreos.com/network/autonomy/edge-1", "/coreos.com/network/autonomy-duration/edge-1"]
    );
    assert!(autonomous_peer(&mut other, &other_own).await);

    // A bound that does not parse is reported and taken as no limit.
    etcd.etcdctl(&["put", "/coreos.com/network/autonomy-duration/edge-1", "2 days"]).unwrap();
    let json = autonomy(&reg, &["status", "edge-1", "--json"]).json();
    assert_eq!((json["autonomy"]["on"].as_bool(), json["autonomy"]["limit"].as_str()), (Some(true), None));
    assert!(json["autonomy"]["problem"].as_str().unwrap().contains("\"2 days\" is not a duration"), "{json}");

    // Unset: `false`, the bound deleted, in one transaction.
    let text = autonomy(&reg, &["unset", "edge-1"]).ok();
    assert!(text.contains("removed /coreos.com/network/autonomy-duration/edge-1\n"), "{text}");
    assert!(text.contains("removed /coreos.com/network/reserved/edge-1\n"), "{text}");
    assert_eq!(get("/coreos.com/network/reserved/edge-1"), "");
    assert!(text.contains("\nautonomy: off\n"), "{text}");
    assert_eq!(get("/coreos.com/network/autonomy/edge-1"), "false");
    assert_eq!(get("/coreos.com/network/autonomy-duration/edge-1"), "");
    let mut fresh = EtcdRegistry::connect(&[etcd.endpoint()]).await.unwrap();
    assert!(!autonomous_peer(&mut fresh, &other_own).await);

    // Errors.
    let err = autonomy(&reg, &["set", "edge-9"]).fails(3);
    assert!(err.contains("unknown node \"edge-9\" in etcd") && err.contains("(nodes: edge-1, edge-2)"), "{err}");
    assert!(err.contains("only netd nodes are known by name"), "{err}");
    assert_eq!(get("/coreos.com/network/autonomy/edge-9"), "", "nothing written for an unknown node");
    let err = autonomy(&reg, &["set", "edge/1"]).fails(1);
    assert!(err.contains("without '/'"), "{err}");
    let down = format!("etcd:http://127.0.0.1:{}", closed_port());
    let err = autonomy(&["--registry", &down], &["status", "edge-1"]).fails(4);
    assert!(err.contains("registry unreachable") && err.contains("etcd"), "{err}");
}

fn api(server: &KubeApiServer, method: &str, path: &str, body: Option<(&str, &str)>) -> String {
    let (status, text) = server.api(method, path, body).unwrap();
    assert!((200..300).contains(&status), "{method} {path}: HTTP {status}: {text}");
    text
}

fn annotations(server: &KubeApiServer, node: &str) -> Value {
    let node: Value = serde_json::from_str(&api(server, "GET", &format!("/api/v1/nodes/{node}"), None)).unwrap();
    node["metadata"]["annotations"].clone()
}

fn kubectl(server: &KubeApiServer, args: &[&str]) {
    server.kubectl(args).unwrap();
}

/// Writes the kubelet's side of a node: Ready and its heartbeat Lease,
/// both `age` old.
fn heartbeat(server: &KubeApiServer, node: &str, ready: &str, age: Duration) {
    let at = format_time(SystemTime::now() - age);
    let micro = at.replace('Z', ".000000Z");
    let condition = json!({ "status": { "conditions": [{
        "type": "Ready", "status": ready, "reason": "Test",
        "lastHeartbeatTime": at, "lastTransitionTime": at,
    }]}});
    api(server, "PATCH", &format!("/api/v1/nodes/{node}/status"), Some((STRATEGIC, &condition.to_string())));
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": node, "namespace": "kube-node-lease" },
        "spec": { "holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": micro },
    });
    let path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases";
    api(server, "POST", path, Some(("application/json", &lease.to_string())));
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn kubernetes_registry() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    let server = KubeApiServer::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, server.token()).unwrap();
    let spec = format!("kubernetes:{}", server.url());
    let ca = server.ca_cert_path();
    let reg = ["--registry", spec.as_str(), "--token-file", token.to_str().unwrap(), "--ca-file", ca.to_str().unwrap()];
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": "edge-1", "annotations": {
            "flannel.alpha.coreos.com/public-ip": "192.0.2.1",
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
        }},
        "spec": { "podCIDR": "10.244.7.0/24", "podCIDRs": ["10.244.7.0/24"] },
    });
    api(&server, "POST", "/api/v1/nodes", Some(("application/json", &node.to_string())));
    // Cut off ten minutes ago, as the node lifecycle controller sees it.
    heartbeat(&server, "edge-1", "Unknown", Duration::from_secs(600));

    let text = autonomy(&reg, &["status", "edge-1"]).ok();
    assert!(text.contains("\nautonomy: off\n"), "{text}");
    assert!(text.contains("node: Ready=Unknown (Test) since"), "{text}");
    assert!(
        text.contains("heartbeat kube-node-lease/edge-1 renewed") && text.contains("ago); cut off since"),
        "{text}"
    );
    assert!(text.contains("; cut off since"), "{text}");
    assert!(
        text.contains("lease: pod CIDR 10.244.7.0/24 (public IP 192.0.2.1): it stays with the Node object"),
        "{text}"
    );
    assert!(text.contains("eviction: once the node is NotReady or unreachable"), "{text}");

    // Set with a bound: Alibaba's flag and OpenYurt's duration.
    let text = autonomy(&reg, &["set", "edge-1", "--duration", "2h"]).ok();
    assert!(
        text.starts_with(
            "wrote node.beta.alibabacloud.com/autonomy=true\nwrote node.openyurt.io/autonomy-duration=2h0m0s\n"
        ),
        "{text}"
    );
    assert!(text.contains("; the 2h0m0s bound ends") && text.contains("(in 1h4"), "{text}");
    assert!(text.contains("netd-controller, while it runs, lengthens") && text.contains("pods to 2h0m0s"), "{text}");
    let on = annotations(&server, "edge-1");
    assert_eq!(
        (on["node.beta.alibabacloud.com/autonomy"].as_str(), on["node.openyurt.io/autonomy-duration"].as_str()),
        (Some("true"), Some("2h0m0s"))
    );
    let json = autonomy(&reg, &["status", "edge-1", "--json"]).json();
    assert_eq!(
        strings(&json["autonomy"]["sources"]),
        ["node.beta.alibabacloud.com/autonomy", "node.openyurt.io/autonomy-duration"]
    );
    // A pod CIDR stays with the Node anyway: not something autonomy keeps.
    assert_eq!(
        json["lease"],
        json!({ "subnet": "10.244.7.0/24", "publicIP": "192.0.2.1", "expiresAt": null, "keptWhileAutonomous": false })
    );
    assert_eq!(json["kubernetes"]["ready"]["status"], "Unknown");
    assert_eq!(json["kubernetes"]["heartbeat"]["state"], "renewed");
    assert_eq!(json["kubernetes"]["heartbeat"]["durationSeconds"], 40);
    let silent = parse_time(json["kubernetes"]["silentSince"].as_str().unwrap()).unwrap();
    let age = SystemTime::now().duration_since(silent).unwrap();
    assert!(age >= Duration::from_secs(600) && age < Duration::from_secs(660), "{age:?}");

    // OpenYurt's flags, written by hand, read back with their source.
    kubectl(
        &server,
        &["annotate", "node", "edge-1", "node.beta.alibabacloud.com/autonomy-", "node.beta.openyurt.io/autonomy=true"],
    );
    let json = autonomy(&reg, &["status", "edge-1", "--json"]).json();
    assert_eq!(
        strings(&json["autonomy"]["sources"]),
        ["node.beta.openyurt.io/autonomy", "node.openyurt.io/autonomy-duration"]
    );
    assert_eq!(json["autonomy"]["limit"], "2h0m0s");

    // Unset clears all three, and says so.
    let text = autonomy(&reg, &["unset", "edge-1"]).ok();
    assert!(
        text.starts_with(
            "wrote node.beta.alibabacloud.com/autonomy=false\nwrote node.beta.openyurt.io/autonomy=false\n\
             removed node.openyurt.io/autonomy-duration\n"
        ),
        "{text}"
    );
    assert!(text.contains("\nautonomy: off\n"), "{text}");
    let off = annotations(&server, "edge-1");
    assert_eq!(off["node.beta.alibabacloud.com/autonomy"], "false");
    assert_eq!(off["node.beta.openyurt.io/autonomy"], "false");
    assert_eq!(off.get("node.openyurt.io/autonomy-duration"), None);

    // The duration alone switches it on; `0` is no time limit. Set without
    // a bound then drops it.
    kubectl(&server, &["annotate", "node", "edge-1", "node.openyurt.io/autonomy-duration=0"]);
    let text = autonomy(&reg, &["status", "edge-1"]).ok();
    assert!(text.contains("autonomy: on (no time limit), from node.openyurt.io/autonomy-duration\n"), "{text}");
    let text = autonomy(&reg, &["set", "edge-1"]).ok();
    assert!(
        text.starts_with(
            "wrote node.beta.alibabacloud.com/autonomy=true\nremoved node.openyurt.io/autonomy-duration\n"
        ),
        "{text}"
    );
    assert!(text.contains("autonomy: on (no time limit), from node.beta.alibabacloud.com/autonomy\n"), "{text}");

    // A node no kubelet ran on: no heartbeat, and said so.
    let bare = json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "bare" } });
    api(&server, "POST", "/api/v1/nodes", Some(("application/json", &bare.to_string())));
    let text = autonomy(&reg, &["status", "bare"]).ok();
    assert!(text.contains("no Ready condition reported; no heartbeat Lease kube-node-lease/bare"), "{text}");
    assert!(text.contains("lease: none: the Node has no pod CIDR"), "{text}");

    // Errors.
    let err = autonomy(&reg, &["set", "edge-9"]).fails(3);
    assert!(err.contains("unknown node \"edge-9\" in kubernetes") && err.contains("no such Node object"), "{err}");
    let err = autonomy(&reg, &["status", "Edge_1"]).fails(1);
    assert!(err.contains("not a valid Kubernetes node name"), "{err}");
    let down = format!("kubernetes:https://127.0.0.1:{}", closed_port());
    let mut unreachable = reg;
    unreachable[1] = &down;
    let err = autonomy(&unreachable, &["status", "edge-1"]).fails(4);
    assert!(err.contains("registry unreachable"), "{err}");
    // Reading a node never changes it.
    let version = |server: &KubeApiServer| {
        let node: Value = serde_json::from_str(&api(server, "GET", "/api/v1/nodes/edge-1", None)).unwrap();
        node["metadata"]["resourceVersion"].clone()
    };
    let before = version(&server);
    autonomy(&reg, &["status", "edge-1", "--json"]).ok();
    assert_eq!(version(&server), before);
}

#[test]
fn help_names_the_commands_and_the_registry_comes_from_the_environment_too() {
    let help = autonomy(&[], &["--help"]).ok();
    for word in ["set", "unset", "status", "--duration", "Exit status: 0 done"] {
        assert!(help.contains(word), "{word} missing from:\n{help}");
    }
    let set = autonomy(&[], &["set", "--help"]).ok();
    assert!(set.contains("--registry <SPEC>") && set.contains("[env: NETD_REGISTRY=]"), "{set}");
    assert!(autonomy(&[], &["status"]).fails(2).contains("<NODE>"));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    EmbeddedRegistry::create(&path, &config()).unwrap();
    let raw = r#"{"PublicIP":"192.0.2.5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:05"}}"#;
    EmbeddedRegistry::open(&path, Duration::from_secs(1))
        .put_raw_lease("10.244.5.0-24", "edge-5", raw, Duration::from_secs(3600))
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_netd-autonomy"))
        .args(["set", "edge-5", "--duration", "1h"])
        .env("NETD_REGISTRY", format!("embedded:{}", path.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("autonomy: on for 1h0m0s after the node is cut off"), "{text}");
    assert!(text.contains("lease: 10.244.5.0/24 (public IP 192.0.2.5) lapses"), "{text}");
}
