//! The Kubernetes registry against a real kube-apiserver (1.20, built by
//! `cargo xtask setup`): flannel's annotations byte for byte, the node
//! condition, flannel-written peers, the watch, bad data, autonomy and an
//! API server that goes away; tunnel server replicas as Leases, under RBAC
//! with `deploy/10-rbac.yaml` applied.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use netd::model::autonomy::Autonomy;
use netd::registry::kubernetes::replicas::replica_lease_name;
use netd::registry::kubernetes::{KubeConfig, KubernetesRegistry};
use netd::registry::{
    LeaseRequest, PeerEvent, PeerLease, Registry, RegistryError, ReplicaRecord, ReplicaStore, REPLICA_TTL,
};
use netd::testing::{KubeApiServer, KubeCluster};
use serde_json::{json, Value};

const NETWORK: &str = "10.244.0.0/16";
const MERGE: &str = "application/merge-patch+json";
const STRATEGIC: &str = "application/strategic-merge-patch+json";

fn config(server: &KubeApiServer, node: &str) -> KubeConfig {
    KubeConfig {
        server: server.url(),
        token: Some(server.token().to_string()),
        token_file: None,
        ca_cert_pem: Some(server.ca_cert_pem().unwrap()),
        client_cert: None,
        node_name: node.into(),
        network: Some(NETWORK.parse().unwrap()),
    }
}

fn registry(server: &KubeApiServer, node: &str) -> KubernetesRegistry {
    KubernetesRegistry::new(config(server, node)).unwrap()
}

fn request(node: &str, ip: &str, mac_last: u8) -> LeaseRequest {
    LeaseRequest {
        node: node.into(),
        public_ip: ip.parse().unwrap(),
        vtep_mac: netd::ipam::MacAddr([0x0e, 0, 0, 0, 0, mac_last]),
        previous_subnet: None,
    }
}

/// Checks the status and returns the body.
fn api(server: &KubeApiServer, method: &str, path: &str, body: Option<(&str, &str)>) -> String {
    let (status, text) = server.api(method, path, body).unwrap();
    assert!((200..300).contains(&status), "{method} {path}: HTTP {status}: {text}");
    text
}

fn create_node(server: &KubeApiServer, name: &str, cidr: Option<&str>, annotations: Value) {
    let spec = match cidr {
        Some(cidr) => json!({ "podCIDR": cidr, "podCIDRs": [cidr] }),
        None => json!({}),
    };
    let node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "annotations": annotations },
        "spec": spec,
    });
    api(server, "POST", "/api/v1/nodes", Some(("application/json", &node.to_string())));
}

/// The node's JSON as the API server sends it (not pretty-printed, which it
/// does for curl unless told otherwise).
fn node_text(server: &KubeApiServer, name: &str) -> String {
    api(server, "GET", &format!("/api/v1/nodes/{name}?pretty=false"), None)
}

fn node(server: &KubeApiServer, name: &str) -> Value {
    serde_json::from_str(&node_text(server, name)).unwrap()
}

fn annotation(node: &Value, key: &str) -> Option<String> {
    node["metadata"]["annotations"][key].as_str().map(String::from)
}

fn annotate(server: &KubeApiServer, name: &str, annotations: Value) {
    let patch = json!({ "metadata": { "annotations": annotations } }).to_string();
    api(server, "PATCH", &format!("/api/v1/nodes/{name}"), Some((MERGE, &patch)));
}

fn delete_node(server: &KubeApiServer, name: &str) {
    api(server, "DELETE", &format!("/api/v1/nodes/{name}"), None);
}

/// Annotations exactly as flannel's kube subnet manager writes them.
fn flannel_annotations(ip: &str, mac: &str) -> Value {
    json!({
        "flannel.alpha.coreos.com/backend-data": format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
        "flannel.alpha.coreos.com/backend-type": "vxlan",
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
        "flannel.alpha.coreos.com/public-ip": ip,
        "node.alpha.kubernetes.io/ttl": "0",
        "volumes.kubernetes.io/controller-managed-attach-detach": "true",
    })
}

/// The string-split parse flannel-adjacent tools apply to backend-data:
/// everything between `"VtepMAC":"` and the next quote.
fn split_parse_mac(text: &str) -> Option<&str> {
    text.split(r#""VtepMAC":""#).nth(1)?.split('"').next()
}

fn net(text: &str) -> Ipv4Net {
    text.parse().unwrap()
}

async fn next(registry: &mut KubernetesRegistry, own: Ipv4Net) -> PeerEvent {
    tokio::time::timeout(Duration::from_secs(20), registry.next_event(own))
        .await
        .expect("no registry event within 20 s")
        .unwrap()
}

/// Asserts no event arrives for `wait` (the call is cancelled, which must
/// lose nothing).
async fn quiet(registry: &mut KubernetesRegistry, own: Ipv4Net, wait: Duration) {
    if let Ok(event) = tokio::time::timeout(wait, registry.next_event(own)).await {
        panic!("expected no event, got {event:?}");
    }
}

fn resync(event: PeerEvent) -> Vec<PeerLease> {
    match event {
        PeerEvent::Resync(peers) => peers,
        other => panic!("expected a resync, got {other:?}"),
    }
}

fn upsert(event: PeerEvent) -> PeerLease {
    match event {
        PeerEvent::Upsert(peer) => peer,
        other => panic!("expected an upsert, got {other:?}"),
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn acquire_publishes_flannels_annotations_and_the_condition() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    let server = KubeApiServer::new().unwrap();
    let mut reg = registry(&server, "edge-a");
    assert!(reg.describe().contains(&server.url()));
    let network = reg.network_config().await.unwrap();
    assert_eq!((network.network, network.subnet_len, network.vni), (net(NETWORK), 24, 1));
    let req = request("edge-a", "192.0.2.10", 0x0a);

    // No Node object yet, then one without a pod CIDR: clear errors, nothing invented.
    let err = reg.acquire_lease(&network, &req).await.unwrap_err().to_string();
    assert!(err.contains("no such Node"), "{err}");
    create_node(&server, "edge-a", None, json!({}));
    let err = reg.acquire_lease(&network, &req).await.unwrap_err().to_string();
    assert!(err.contains("podCIDR") && err.contains("not assigned"), "{err}");
    assert!(annotation(&node(&server, "edge-a"), "flannel.alpha.coreos.com/backend-type").is_none());

    // The controller-manager assigns the CIDR; kubelet reports a condition.
    let spec = json!({ "spec": { "podCIDR": "10.244.7.0/24", "podCIDRs": ["10.244.7.0/24"] } }).to_string();
    api(&server, "PATCH", "/api/v1/nodes/edge-a", Some((STRATEGIC, &spec)));
    let ready = json!({ "status": { "conditions": [{ "type": "Ready", "status": "Unknown", "reason": "Test" }] } });
    api(&server, "PATCH", "/api/v1/nodes/edge-a/status", Some((STRATEGIC, &ready.to_string())));

    let own = reg.acquire_lease(&network, &req).await.unwrap();
    assert_eq!(own.lease.subnet, net("10.244.7.0/24"));
    assert_eq!(own.lease.public_ip.to_string(), "192.0.2.10");
    assert_eq!(own.lease.node.as_deref(), Some("edge-a"));
    assert!(own.expires_at.is_some());

    // The annotations, compared as strings, and in the raw JSON text.
    let text = node_text(&server, "edge-a");
    let object: Value = serde_json::from_str(&text).unwrap();
    let data = r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:0a"}"#;
    assert_eq!(annotation(&object, "flannel.alpha.coreos.com/backend-type").as_deref(), Some("vxlan"));
    assert_eq!(annotation(&object, "flannel.alpha.coreos.com/backend-data").as_deref(), Some(data));
    assert_eq!(annotation(&object, "flannel.alpha.coreos.com/public-ip").as_deref(), Some("192.0.2.10"));
    assert_eq!(annotation(&object, "flannel.alpha.coreos.com/kube-subnet-manager").as_deref(), Some("true"));
    assert!(
        text.contains(r#""flannel.alpha.coreos.com/backend-data":"{\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:00:0a\"}""#),
        "{text}"
    );
    assert_eq!(
        split_parse_mac(&annotation(&object, "flannel.alpha.coreos.com/backend-data").unwrap()),
        Some("0e:00:00:00:00:0a")
    );

    // NetworkUnavailable=False, and kubelet's condition still there.
    let conditions = object["status"]["conditions"].as_array().unwrap();
    let find =
        |kind: &str| conditions.iter().find(|c| c["type"] == kind).unwrap_or_else(|| panic!("no {kind}: {text}"));
    let unavailable = find("NetworkUnavailable");
    assert_eq!((unavailable["status"].as_str(), unavailable["reason"].as_str()), (Some("False"), Some("NetdIsUp")));
    assert!(unavailable["lastTransitionTime"].as_str().unwrap().ends_with('Z'));
    assert_eq!(find("Ready")["status"], "Unknown");

    // Renewing writes nothing when everything is in place...
    let version = object["metadata"]["resourceVersion"].clone();
    let renewed = reg.renew_lease(&own).await.unwrap();
    assert_eq!(renewed.lease, own.lease);
    assert_eq!(node(&server, "edge-a")["metadata"]["resourceVersion"], version, "renewal wrote to an unchanged node");
    // ...and re-publishes what someone removed.
    annotate(&server, "edge-a", json!({ "flannel.alpha.coreos.com/public-ip": null }));
    reg.renew_lease(&own).await.unwrap();
    assert_eq!(
        annotation(&node(&server, "edge-a"), "flannel.alpha.coreos.com/public-ip").as_deref(),
        Some("192.0.2.10")
    );

    // Autonomy: the Alibaba annotation; switching off also clears OpenYurt's.
    reg.set_autonomy("edge-a", Autonomy::Forever).await.unwrap();
    assert_eq!(annotation(&node(&server, "edge-a"), "node.beta.alibabacloud.com/autonomy").as_deref(), Some("true"));
    annotate(&server, "edge-a", json!({ "node.beta.openyurt.io/autonomy": "true" }));
    reg.set_autonomy("edge-a", Autonomy::Off).await.unwrap();
    let object = node(&server, "edge-a");
    assert_eq!(annotation(&object, "node.beta.alibabacloud.com/autonomy").as_deref(), Some("false"));
    assert_eq!(annotation(&object, "node.beta.openyurt.io/autonomy").as_deref(), Some("false"));
    let err = reg.set_autonomy("nobody", Autonomy::Forever).await.unwrap_err().to_string();
    assert!(err.contains("no such Node"), "{err}");

    // A pod CIDR outside the configured network is a configuration error.
    let mut other = config(&server, "edge-a");
    other.network = Some(net("10.9.0.0/16"));
    let mut wrong = KubernetesRegistry::new(other).unwrap();
    let wrong_net = wrong.network_config().await.unwrap();
    let err = wrong.acquire_lease(&wrong_net, &req).await.unwrap_err();
    assert!(matches!(err, RegistryError::BadConfig(ref m) if m.contains("outside")), "{err}");
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn watch_reads_flannel_peers_and_skips_bad_ones() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    let server = KubeApiServer::new().unwrap();
    create_node(&server, "me", Some("10.244.1.0/24"), json!({}));
    // A peer exactly as flannel annotates it.
    create_node(&server, "flannel-b", Some("10.244.2.0/24"), flannel_annotations("192.0.2.2", "62:a4:3c:2f:18:d1"));
    // Bad ones: garbage backend-data, wrong JSON types, a CIDR outside the network.
    let mut garbage = flannel_annotations("192.0.2.3", "0e:00:00:00:00:03");
    garbage["flannel.alpha.coreos.com/backend-data"] = json!("{\"VNI\":1,\"VtepMAC\":");
    create_node(&server, "garbage", Some("10.244.3.0/24"), garbage);
    let mut wrong = flannel_annotations("192.0.2.4", "0e:00:00:00:00:04");
    wrong["flannel.alpha.coreos.com/backend-data"] = json!(r#"{"VNI":"1","VtepMAC":17}"#);
    create_node(&server, "wrong-types", Some("10.244.4.0/24"), wrong);
    create_node(&server, "outside", Some("10.9.5.0/24"), flannel_annotations("192.0.2.5", "0e:00:00:00:00:05"));
    let mut bad_ip = flannel_annotations("not-an-ip", "0e:00:00:00:00:06");
    bad_ip["flannel.alpha.coreos.com/backend-type"] = json!("vxlan");
    create_node(&server, "bad-ip", Some("10.244.6.0/24"), bad_ip);
    // Not a flannel node at all.
    create_node(&server, "plain", Some("10.244.8.0/24"), json!({}));
    // Autonomous peers, by either annotation.
    let mut yurt = flannel_annotations("192.0.2.9", "0e:00:00:00:00:09");
    yurt["node.beta.openyurt.io/autonomy"] = json!("true");
    create_node(&server, "yurt", Some("10.244.9.0/24"), yurt);
    let mut ali = flannel_annotations("192.0.2.10", "0e:00:00:00:00:10");
    ali["node.beta.alibabacloud.com/autonomy"] = json!("true");
    create_node(&server, "ali", Some("10.244.10.0/24"), ali);

    let mut reg = registry(&server, "me");
    let network = reg.network_config().await.unwrap();
    let own = reg.acquire_lease(&network, &request("me", "192.0.2.1", 1)).await.unwrap().lease.subnet;
    assert_eq!(own, net("10.244.1.0/24"));

    // Our own backend-data passes the string-split parse peers apply.
    let ours = annotation(&node(&server, "me"), "flannel.alpha.coreos.com/backend-data").unwrap();
    assert_eq!(split_parse_mac(&ours), Some("0e:00:00:00:00:01"));

    let peers = resync(next(&mut reg, own).await);
    let summary: Vec<(String, String, String, bool)> = peers
        .iter()
        .map(|p| {
            (
                p.lease.node.clone().unwrap(),
                p.lease.subnet.to_string(),
                format!("{} {}", p.lease.public_ip, p.lease.vtep_mac),
                p.autonomous,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("flannel-b".into(), "10.244.2.0/24".into(), "192.0.2.2 62:a4:3c:2f:18:d1".into(), false),
            ("yurt".into(), "10.244.9.0/24".into(), "192.0.2.9 0e:00:00:00:00:09".into(), true),
            ("ali".into(), "10.244.10.0/24".into(), "192.0.2.10 0e:00:00:00:00:10".into(), true),
        ]
    );

    // A peer's annotation changes: an upsert.
    annotate(&server, "flannel-b", json!({ "flannel.alpha.coreos.com/public-ip": "192.0.2.22" }));
    let peer = upsert(next(&mut reg, own).await);
    assert_eq!((peer.lease.subnet, peer.lease.public_ip.to_string()), (net("10.244.2.0/24"), "192.0.2.22".into()));

    // Changes that do not touch the lease (labels, status) give no event;
    // the cancelled waits lose nothing.
    let labels = json!({ "metadata": { "labels": { "x": "y" } } }).to_string();
    api(&server, "PATCH", "/api/v1/nodes/flannel-b", Some((MERGE, &labels)));
    annotate(&server, "garbage", json!({ "unrelated": "1" }));
    quiet(&mut reg, own, Duration::from_millis(1500)).await;

    // A bad node fixed: it appears; a good node broken: it goes.
    annotate(
        &server,
        "garbage",
        json!({ "flannel.alpha.coreos.com/backend-data": r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:33"}"# }),
    );
    let peer = upsert(next(&mut reg, own).await);
    assert_eq!(
        (peer.lease.node.as_deref(), peer.lease.vtep_mac.to_string()),
        (Some("garbage"), "0e:00:00:00:00:33".into())
    );
    annotate(&server, "garbage", json!({ "flannel.alpha.coreos.com/backend-data": "nope" }));
    assert_eq!(next(&mut reg, own).await, PeerEvent::Remove(net("10.244.3.0/24")));

    // Autonomy switched through the registry shows in the peer.
    reg.set_autonomy("flannel-b", Autonomy::Forever).await.unwrap();
    let peer = upsert(next(&mut reg, own).await);
    assert!(peer.autonomous && peer.lease.subnet == net("10.244.2.0/24"));

    // A node deleted: its subnet removed. A new flannel node: upserted.
    delete_node(&server, "yurt");
    assert_eq!(next(&mut reg, own).await, PeerEvent::Remove(net("10.244.9.0/24")));
    create_node(&server, "late", Some("10.244.11.0/24"), flannel_annotations("192.0.2.11", "0e:00:00:00:00:11"));
    let peer = upsert(next(&mut reg, own).await);
    assert_eq!(peer.lease.node.as_deref(), Some("late"));
    // Bad and non-flannel nodes never produced an event.
    delete_node(&server, "plain");
    delete_node(&server, "wrong-types");
    quiet(&mut reg, own, Duration::from_millis(1000)).await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn renewed_watches_and_an_api_server_that_goes_away() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    let mut server = KubeApiServer::new().unwrap();
    create_node(&server, "me", Some("10.244.1.0/24"), json!({}));
    create_node(&server, "b", Some("10.244.2.0/24"), flannel_annotations("192.0.2.2", "0e:00:00:00:00:02"));
    let mut reg = KubernetesRegistry::new(config(&server, "me")).unwrap().with_watch_timeout(Duration::from_secs(1));
    let network = reg.network_config().await.unwrap();
    let own = reg.acquire_lease(&network, &request("me", "192.0.2.1", 1)).await.unwrap().lease.subnet;
    assert_eq!(resync(next(&mut reg, own).await).len(), 1);

    // The server ends each watch after 1 s; it is renewed without an event
    // or an error, and changes still arrive as upserts.
    quiet(&mut reg, own, Duration::from_millis(3500)).await;
    annotate(&server, "b", json!({ "flannel.alpha.coreos.com/public-ip": "192.0.2.20" }));
    assert_eq!(upsert(next(&mut reg, own).await).lease.public_ip.to_string(), "192.0.2.20");

    // The API server goes away mid-watch: an Unreachable error, then more
    // while it is down.
    quiet(&mut reg, own, Duration::from_millis(300)).await;
    server.stop().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), reg.next_event(own)).await.unwrap().unwrap_err();
    assert!(matches!(err, RegistryError::Unreachable(_)) && err.is_transient(), "{err}");
    let err = reg.next_event(own).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unreachable(_)), "{err}");
    let err = reg.acquire_lease(&network, &request("me", "192.0.2.1", 1)).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unreachable(_)), "{err}");

    // Back: the first event is a full resync, then the watch goes on.
    server.start().unwrap();
    let peers = resync(next(&mut reg, own).await);
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].lease.public_ip.to_string(), "192.0.2.20");
    delete_node(&server, "b");
    assert_eq!(next(&mut reg, own).await, PeerEvent::Remove(net("10.244.2.0/24")));

    // HTTP errors carry status and message; a wrong CA fails TLS.
    let mut bad_token = config(&server, "me");
    bad_token.token = Some("wrong".into());
    let err = KubernetesRegistry::new(bad_token).unwrap().next_event(own).await.unwrap_err().to_string();
    assert!(err.contains("401"), "{err}");
    let mut no_ca = config(&server, "me");
    no_ca.ca_cert_pem = None;
    let err = KubernetesRegistry::new(no_ca).unwrap().next_event(own).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unreachable(ref m) if m.to_lowercase().contains("certificate")), "{err}");
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn a_rotated_token_file_is_read_again_after_a_401() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    let mut server = KubeApiServer::new().unwrap();
    create_node(&server, "me", Some("10.244.1.0/24"), json!({}));
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{}\n", server.token())).unwrap();
    let with_file = KubeConfig { token: None, token_file: Some(token_file.clone()), ..config(&server, "me") };
    let mut reg = KubernetesRegistry::new(with_file.clone()).unwrap();
    let network = reg.network_config().await.unwrap();
    let me = request("me", "192.0.2.1", 1);
    reg.acquire_lease(&network, &me).await.unwrap();

    // The credential is rotated: the server takes only the new token, which
    // the kubelet writes over the old file, well before the minute is up.
    let new = server.rotate_token().unwrap();
    std::fs::write(&token_file, &new).unwrap();
    // The first request may also meet the pooled connection the restart
    // closed; the 401 must make the next one read the file again.
    let mut errors = Vec::new();
    while let Err(err) = reg.acquire_lease(&network, &me).await {
        errors.push(err.to_string());
        assert!(errors.len() < 3, "the rotated token is not picked up: {errors:#?}");
    }
    assert!(errors.iter().any(|e| e.contains("401")), "{errors:#?}");

    // A token file that is empty or missing at start is a precise error.
    std::fs::write(&token_file, " \n").unwrap();
    let err = KubernetesRegistry::new(with_file.clone()).unwrap_err().to_string();
    assert!(err.contains("is empty"), "{err}");
    std::fs::remove_file(&token_file).unwrap();
    let err = KubernetesRegistry::new(with_file).unwrap_err().to_string();
    assert!(err.contains("reading the bearer token"), "{err}");
}

const RBAC_MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/10-rbac.yaml");
const REPLICA_LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases";
const REPLICA_SELECTOR: &str = "netd.io/tunnel-replica=true";

/// A token of ServiceAccount kube-system/`account` (TokenRequest).
fn service_account_token(server: &KubeApiServer, account: &str) -> String {
    let request = json!({ "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                          "spec": { "expirationSeconds": 3600 } });
    let path = format!("/api/v1/namespaces/kube-system/serviceaccounts/{account}/token");
    let reply: Value =
        serde_json::from_str(&api(server, "POST", &path, Some(("application/json", &request.to_string())))).unwrap();
    reply["status"]["token"].as_str().unwrap().to_string()
}

/// A registry authenticating with `token` instead of the admin's.
fn registry_as(server: &KubeApiServer, token: String) -> KubernetesRegistry {
    KubernetesRegistry::new(KubeConfig { token: Some(token), ..config(server, "cloud-1") }).unwrap()
}

/// The Lease `name` in kube-system as the API server holds it.
fn replica_lease(server: &KubeApiServer, name: &str) -> Value {
    serde_json::from_str(&api(server, "GET", &format!("{REPLICA_LEASES}/{name}"), None)).unwrap()
}

/// `kubectl get leases -n kube-system -l netd.io/tunnel-replica=true -o name`.
fn labelled_leases(server: &KubeApiServer) -> Vec<String> {
    let out = server.kubectl(&["get", "leases", "-n", "kube-system", "-l", REPLICA_SELECTOR, "-o", "name"]).unwrap();
    String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect()
}

fn record(id: &str, address: &str, draining: bool, ttl: Duration, now: SystemTime) -> ReplicaRecord {
    ReplicaRecord::new(id, address, draining, ttl, now)
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn tunnel_replicas_are_leases_in_kube_system_under_the_deployed_rbac() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    // RBAC on, as kubeadm runs it: the tunnel server's ServiceAccount has
    // only what deploy/10-rbac.yaml grants it.
    let builder = KubeCluster::builder().rbac(true);
    if !builder.binaries_available().unwrap() {
        return;
    }
    let cluster = builder.start().unwrap();
    let server = cluster.api();
    server.kubectl(&["apply", "-f", RBAC_MANIFEST]).unwrap();
    let mut reg = registry_as(server, service_account_token(server, "netd-tunnel-server"));
    let now = SystemTime::now();

    // Two replicas announce: both listed, by id, exactly as announced.
    let a = record("cloud-1-10262", "192.0.2.1:10265", false, REPLICA_TTL, now);
    let b = record("cloud-2-10262", "192.0.2.2:10265", false, REPLICA_TTL, now);
    reg.announce_replica(&b).await.unwrap();
    reg.announce_replica(&a).await.unwrap();
    assert_eq!(reg.replicas(now).await.unwrap(), vec![a.clone(), b.clone()]);
    // The Lease as any Lease holder writes it.
    let lease = replica_lease(server, "netd-tunnel-replica-cloud-1-10262");
    assert_eq!(lease["metadata"]["labels"]["netd.io/tunnel-replica"], "true");
    assert_eq!(lease["metadata"]["annotations"]["netd.io/tunnel-replica"].as_str(), Some(a.to_json().as_str()));
    assert_eq!(lease["spec"]["holderIdentity"], "cloud-1-10262");
    let duration = lease["spec"]["leaseDurationSeconds"].as_u64().unwrap();
    assert!((13..=15).contains(&duration), "{lease}");
    let renewed = lease["spec"]["renewTime"].as_str().unwrap();
    assert_eq!(renewed.split_once('.').map(|(_, fraction)| fraction.len()), Some(7), "MicroTime: {renewed}");
    let acquired = lease["spec"]["acquireTime"].clone();
    assert!(acquired.is_string(), "{lease}");

    // Re-announced draining: seen so, still one Lease per replica, the
    // first acquisition kept.
    let a_draining = record("cloud-1-10262", "192.0.2.1:10265", true, REPLICA_TTL, now);
    reg.announce_replica(&a_draining).await.unwrap();
    assert_eq!(reg.replicas(now).await.unwrap(), vec![a_draining.clone(), b.clone()]);
    assert_eq!(
        labelled_leases(server),
        [
            "lease.coordination.k8s.io/netd-tunnel-replica-cloud-1-10262",
            "lease.coordination.k8s.io/netd-tunnel-replica-cloud-2-10262"
        ]
    );
    assert_eq!(replica_lease(server, "netd-tunnel-replica-cloud-1-10262")["spec"]["acquireTime"], acquired);

    // A 1 s record: listed now, not 2 s later (the others still are).
    let short = record("cloud-3-10262", "192.0.2.3:10265", false, Duration::from_secs(1), now);
    reg.announce_replica(&short).await.unwrap();
    assert_eq!(replica_lease(server, "netd-tunnel-replica-cloud-3-10262")["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(reg.replicas(now).await.unwrap(), vec![a_draining.clone(), b.clone(), short.clone()]);
    let later = now + Duration::from_secs(2);
    assert_eq!(reg.replicas(later).await.unwrap(), vec![a_draining.clone(), b.clone()]);

    // Leases made by hand: a garbage annotation, another replica's record
    // copied into a Lease of its own, and an unlabelled Lease (the
    // controller's leader Lease, say). Skipped or never listed; the rest is.
    let by_hand = |name: &str, labelled: bool, holder: &str, annotation: &str| {
        let labels = if labelled { json!({ "netd.io/tunnel-replica": "true" }) } else { json!({}) };
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": name, "labels": labels, "annotations": { "netd.io/tunnel-replica": annotation } },
            "spec": { "holderIdentity": holder, "leaseDurationSeconds": 15 },
        });
        api(server, "POST", REPLICA_LEASES, Some(("application/json", &lease.to_string())));
    };
    by_hand("netd-tunnel-replica-garbage", true, "garbage", "{\"version\":1,\"id\":");
    by_hand("netd-tunnel-replica-impostor", true, "impostor", &b.to_json());
    by_hand("netd-controller", false, "cloud-9", &b.to_json());
    assert_eq!(reg.replicas(now).await.unwrap(), vec![a_draining.clone(), b.clone(), short.clone()]);

    // An id that is no Lease name as it is: mapped to a valid one, its
    // exact id kept.
    let odd = record("Cloud_4.Example", "192.0.2.4:10265", false, REPLICA_TTL, now);
    reg.announce_replica(&odd).await.unwrap();
    let name = replica_lease_name("Cloud_4.Example").unwrap();
    assert!(name.starts_with("netd-tunnel-replica-cloud-4-example-"), "{name}");
    let lease = replica_lease(server, &name);
    assert_eq!(lease["spec"]["holderIdentity"], "Cloud_4.Example");
    let listed = reg.replicas(now).await.unwrap();
    assert_eq!(listed, vec![odd.clone(), a_draining.clone(), b.clone(), short.clone()]);
    assert!(reg.withdraw_replica("Cloud_4.Example").await.unwrap());

    // Withdrawn: gone; a second time, there was nothing.
    assert!(reg.withdraw_replica("cloud-1-10262").await.unwrap());
    assert!(!reg.withdraw_replica("cloud-1-10262").await.unwrap());
    let (status, _) = server.api("GET", &format!("{REPLICA_LEASES}/netd-tunnel-replica-cloud-1-10262"), None).unwrap();
    assert_eq!(status, 404);
    assert_eq!(reg.replicas(now).await.unwrap(), vec![b.clone(), short.clone()]);

    // Ids no backend can hold are refused before any request.
    let err = reg.announce_replica(&record("a/b", "x:1", false, REPLICA_TTL, now)).await.unwrap_err();
    assert!(matches!(err, RegistryError::Refused { .. }) && err.to_string().contains("1-253 characters"), "{err}");
    assert!(reg.withdraw_replica("").await.is_err());

    // The wrong party: netd's own ServiceAccount (bound to nothing) and the
    // controller's (which may create and update Leases in kube-system for
    // its election, but not patch, list or delete them) are refused with
    // the API server's 403 and what the tunnel server's account needs.
    for account in ["netd", "netd-controller"] {
        let mut other = registry_as(server, service_account_token(server, account));
        let stolen = record("cloud-2-10262", "203.0.113.9:10265", false, REPLICA_TTL, now);
        let err = other.announce_replica(&stolen).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, RegistryError::Refused { .. }), "{account}: {err:?}");
        assert!(text.contains("HTTP 403") && text.contains("forbidden"), "{account}: {text}");
        assert!(text.contains(&format!("system:serviceaccount:kube-system:{account}")), "{account}: {text}");
        assert!(text.contains("Role netd-tunnel-server of deploy/10-rbac.yaml"), "{account}: {text}");
        let err = other.replicas(now).await.unwrap_err().to_string();
        assert!(err.contains("HTTP 403") && err.contains("cannot list"), "{account}: {err}");
        let err = other.withdraw_replica("cloud-2-10262").await.unwrap_err().to_string();
        assert!(err.contains("HTTP 403") && err.contains("cannot delete"), "{account}: {err}");
    }
    assert_eq!(reg.replicas(now).await.unwrap(), vec![b, short], "the refused writes changed nothing");
}
