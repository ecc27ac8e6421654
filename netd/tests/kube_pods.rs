//! The pod watch (`netd::kube::pods`) against a real kube-apiserver 1.20:
//! pods bound to this node by `spec.nodeName` (no scheduler, no kubelet),
//! deletions, a pod re-created on another node, an API server that goes
//! away while a pod is deleted, and pod objects with garbage in them; the
//! node registry on the same client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netd::ipam::PodRef;
use netd::kube::pods::{PodEvent, PodInfo, PodLocation, PodWatch};
use netd::kube::{KubeClient, KubeConfig};
use netd::registry::kubernetes::KubernetesRegistry;
use netd::registry::{LeaseRequest, PeerEvent, Registry};
use netd::testing::KubeApiServer;
use serde_json::json;

const NODE: &str = "edge-a";

fn kube_config(server: &KubeApiServer) -> KubeConfig {
    server.kube_config(NODE).unwrap()
}

fn client(server: &KubeApiServer) -> KubeClient {
    KubeClient::new(&kube_config(server)).unwrap()
}

fn api(server: &KubeApiServer, method: &str, path: &str, body: Option<&str>) -> String {
    let (status, text) = server.api(method, path, body.map(|b| ("application/json", b))).unwrap();
    assert!((200..300).contains(&status), "{method} {path}: HTTP {status}: {text}");
    text
}

/// Without kube-controller-manager the `default` ServiceAccount does not
/// exist; the ServiceAccount admission plugin wants it (SPEC §4).
fn prepare(server: &KubeApiServer) {
    let account = json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "default" } });
    api(server, "POST", "/api/v1/namespaces/default/serviceaccounts", Some(&account.to_string()));
}

/// A pod bound to `node` (or unbound), as a scheduler would have left it.
fn create_pod(server: &KubeApiServer, name: &str, node: Option<&str>) {
    let mut spec = json!({
        "automountServiceAccountToken": false,
        "containers": [{ "name": "c", "image": "registry.invalid/pause:3" }],
    });
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    let pod = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name }, "spec": spec });
    api(server, "POST", "/api/v1/namespaces/default/pods", Some(&pod.to_string()));
}

/// Deletes at once (no kubelet would ever confirm a graceful delete).
fn force_delete(server: &KubeApiServer, name: &str) {
    api(server, "DELETE", &format!("/api/v1/namespaces/default/pods/{name}?gracePeriodSeconds=0"), None);
}

fn pod(name: &str) -> PodRef {
    PodRef::new("default", name).unwrap()
}

fn names(pods: &[PodInfo]) -> Vec<String> {
    pods.iter().map(|p| p.pod.to_string()).collect()
}

async fn next(watch: &mut PodWatch) -> PodEvent {
    tokio::time::timeout(Duration::from_secs(30), watch.next()).await.expect("no pod event within 30 s")
}

async fn listed(watch: &mut PodWatch) -> Vec<PodInfo> {
    match next(watch).await {
        PodEvent::Listed(pods) => pods,
        other => panic!("expected a complete list, got {other:?}"),
    }
}

async fn applied(watch: &mut PodWatch) -> PodInfo {
    match next(watch).await {
        PodEvent::Applied(info) => info,
        other => panic!("expected an applied pod, got {other:?}"),
    }
}

/// The deletion of `name`; a forced delete may first mark it terminating.
async fn deleted(watch: &mut PodWatch, name: &str) {
    loop {
        match next(watch).await {
            PodEvent::Deleted(gone) if gone == pod(name) => return,
            PodEvent::Applied(info) if info.pod == pod(name) && info.terminating => continue,
            other => panic!("expected {name} deleted, got {other:?}"),
        }
    }
}

/// Asserts nothing arrives for `wait` (the cancelled call must lose nothing).
async fn quiet(watch: &mut PodWatch, wait: Duration) {
    if let Ok(event) = tokio::time::timeout(wait, watch.next()).await {
        panic!("expected no pod event, got {event:?}");
    }
}

/// What the watch logs, captured.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
async fn pods_bound_to_this_node_are_listed_watched_and_located() {
    let Some(_kernel) = netd::testing::privileged().unwrap() else { return };
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let mut server = KubeApiServer::new().unwrap();
    prepare(&server);
    create_pod(&server, "web-1", Some(NODE));
    create_pod(&server, "web-2", Some(NODE));
    create_pod(&server, "elsewhere", Some("edge-b"));
    create_pod(&server, "pending", None);

    let client = client(&server);
    let mut watch = PodWatch::new(&client, NODE).unwrap().with_watch_timeout(Duration::from_secs(2));
    assert_eq!(watch.node(), NODE);
    assert!(PodWatch::new(&client, "Not/A/Node").is_err());

    // The first event: every pod bound here, nothing else.
    let pods = listed(&mut watch).await;
    assert_eq!(names(&pods), ["default/web-1", "default/web-2"]);
    assert!(pods.iter().all(|p| p.uid.is_some() && p.phase.as_deref() == Some("Pending") && !p.terminating));

    // The node registry shares the client (one connection pool, one token).
    let node = json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": NODE },
                       "spec": { "podCIDR": "10.244.3.0/24", "podCIDRs": ["10.244.3.0/24"] } });
    api(&server, "POST", "/api/v1/nodes", Some(&node.to_string()));
    let config = KubeConfig { network: Some("10.244.0.0/16".parse().unwrap()), ..kube_config(&server) };
    let mut registry = KubernetesRegistry::with_client(config, client.clone());
    let network = registry.network_config().await.unwrap();
    let request = LeaseRequest {
        node: NODE.into(),
        public_ip: "192.0.2.3".parse().unwrap(),
        vtep_mac: netd::ipam::MacAddr([0x0e, 0, 0, 0, 0, 3]),
        previous_subnet: None,
    };
    let lease = registry.acquire_lease(&network, &request).await.unwrap();
    assert_eq!(lease.lease.subnet.to_string(), "10.244.3.0/24");
    assert!(matches!(registry.next_event(lease.lease.subnet).await.unwrap(), PeerEvent::Resync(ref p) if p.is_empty()));

    // Watches renewed by the server (every 2 s) yield nothing.
    quiet(&mut watch, Duration::from_millis(4500)).await;

    // A pod deleted: gone from this node's view, and gone for good.
    force_delete(&server, "web-1");
    deleted(&mut watch, "web-1").await;
    assert_eq!(watch.locate(&pod("web-1")).await.unwrap(), PodLocation::Gone);

    // Re-created under the same name on another node: not ours; moved.
    create_pod(&server, "web-1", Some("edge-b"));
    quiet(&mut watch, Duration::from_millis(1000)).await;
    assert!(matches!(
        watch.locate(&pod("web-1")).await.unwrap(),
        PodLocation::OtherNode { ref node, uid: Some(_) } if node == "edge-b"
    ));
    assert_eq!(watch.locate(&pod("pending")).await.unwrap(), PodLocation::Unbound);
    assert!(
        matches!(watch.locate(&pod("web-2")).await.unwrap(), PodLocation::ThisNode(ref p) if p.pod == pod("web-2"))
    );

    // A graceful delete without a kubelet only marks the pod terminating:
    // it still exists, so it is applied, not deleted.
    api(&server, "DELETE", "/api/v1/namespaces/default/pods/web-2", None);
    let info = applied(&mut watch).await;
    assert!(info.pod == pod("web-2") && info.terminating, "{info:?}");
    force_delete(&server, "web-2");
    deleted(&mut watch, "web-2").await;

    // A new pod bound here, and one re-created here under an old name.
    create_pod(&server, "web-3", Some(NODE));
    assert_eq!(applied(&mut watch).await.pod, pod("web-3"));
    create_pod(&server, "web-2", Some(NODE));
    assert_eq!(applied(&mut watch).await.pod, pod("web-2"));

    // The API server goes away: nothing is yielded (so nothing that frees
    // an IP), however long it stays away.
    server.stop().unwrap();
    quiet(&mut watch, Duration::from_secs(3)).await;
    // Meanwhile web-3 is deleted (by whatever still reaches etcd).
    let etcd = server.etcd().unwrap();
    assert_eq!(etcd.etcdctl(&["del", "/registry/pods/default/web-3"]).unwrap().trim(), "1");
    quiet(&mut watch, Duration::from_secs(2)).await;
    let err = tokio::time::timeout(Duration::from_secs(20), watch.try_next()).await.unwrap().unwrap_err();
    assert!(err.is_transient(), "{err}");
    // Back: a fresh complete list, which carries the deletion.
    server.start().unwrap();
    let pods = listed(&mut watch).await;
    assert_eq!(names(&pods), ["default/web-2"]);
    assert!(log.text().contains("watch failed; listing again after the delay"), "{}", log.text());

    // Pod objects with garbage, written behind the API server's back:
    // skipped with a precise reason; a pod missing only optional fields is
    // a pod; the watch goes on.
    let etcd = server.etcd().unwrap();
    let raw = |key: &str, object: serde_json::Value| {
        etcd.etcdctl(&["put", &format!("/registry/pods/default/{key}"), &object.to_string()]).unwrap();
    };
    raw(
        "Bad_Name",
        json!({ "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": "Bad_Name", "namespace": "default", "uid": "bad-1" },
                "spec": { "nodeName": NODE } }),
    );
    let long = "x".repeat(300);
    raw(
        &long,
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": long, "namespace": "default" },
                "spec": { "nodeName": NODE } }),
    );
    raw(
        "bare",
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "bare", "namespace": "default" },
                "spec": { "nodeName": NODE } }),
    );
    let info = applied(&mut watch).await;
    assert_eq!((info.pod.clone(), info.uid.clone(), info.phase.clone()), (pod("bare"), None, None));
    quiet(&mut watch, Duration::from_millis(1000)).await;
    let text = log.text();
    assert!(
        text.contains(r#"pod name \"Bad_Name\" is not a valid DNS-1123 subdomain"#)
            || text.contains(r#"pod name "Bad_Name" is not a valid DNS-1123 subdomain"#),
        "{text}"
    );
    assert!(text.contains("it is longer than 253 characters"), "{text}");

    // A relist (after the API server restarts) skips them again, quietly.
    server.stop().unwrap();
    quiet(&mut watch, Duration::from_secs(1)).await;
    server.start().unwrap();
    let pods = listed(&mut watch).await;
    assert_eq!(names(&pods), ["default/bare", "default/web-2"]);
    assert_eq!(log.text().matches("Bad_Name").count(), text.matches("Bad_Name").count(), "logged once per reason");

    // Deleting a garbage object is ignored with a reason; a good one is a deletion.
    let etcd = server.etcd().unwrap();
    etcd.etcdctl(&["del", "/registry/pods/default/Bad_Name"]).unwrap();
    etcd.etcdctl(&["del", &format!("/registry/pods/default/{long}")]).unwrap();
    etcd.etcdctl(&["del", "/registry/pods/default/bare"]).unwrap();
    deleted(&mut watch, "bare").await;
    assert!(log.text().contains("ignoring the deletion of an unusable pod object"), "{}", log.text());
}
