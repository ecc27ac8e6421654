//! Who is trusted for what (SPEC §3b; issue 23), against the real
//! kube-apiserver 1.20.2 with `--authorization-mode=Node,RBAC` and the
//! NodeRestriction admission plugin, as kubeadm runs it:
//!
//! - the cloud role comes from what kubelets cannot write: a node's own
//!   credential cannot set `node-restriction.kubernetes.io/netd-role=cloud`
//!   (on update or at registration), while the seed's
//!   `alibabacloud.com/is-edge-worker=false`, which it may set, grants
//!   nothing — the real node controller writes it back to `true`; the
//!   label set by an admin makes a cloud node;
//! - netd on a node writes only its own Node: the Kubernetes registry with
//!   node A's certificate (a kubelet-style `kubelet-client-current.pem`
//!   symlink, rotated without a restart) publishes A's lease, and writes
//!   to node B's status, annotations or public IP with A's credential are
//!   refused (403).
//!
//! One cluster for the whole story (clusters are slow to start).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, ListParams, Patch, PatchParams};
use netd::controller::nodes::{self, NodeMetrics, NodeOptions};
use netd::kube::{ClientCertFiles, KubeClient, KubeConfig};
use netd::model::roles::{LABEL_EDGE_WORKER, LABEL_ROLE, TAINT_ADDON_KEY};
use netd::registry::{AnyRegistry, LeaseRequest, OpenSettings, Registry as _, RegistrySpec};
use netd::testing::{ApiAuth, KubeApiServer, KubeCluster};
use netd::tunnel::certs::CertificateAuthority;
use serde_json::{json, Value};

const MERGE: &str = "application/merge-patch+json";
const NETWORK: &str = "10.244.0.0/16";
const DAY: Duration = Duration::from_secs(24 * 3600);

/// A node's credential, as files: the certificate and key apart (for curl)
/// and together, as kubelet keeps its client certificate.
struct NodeCred {
    cert: PathBuf,
    key: PathBuf,
    combined: PathBuf,
}

impl NodeCred {
    fn issue(ca: &CertificateAuthority, node: &str, dir: &Path) -> Self {
        let issued = ca.issue_node(node, &[], DAY).unwrap();
        let (cert, key, combined) =
            (dir.join(format!("{node}.crt")), dir.join(format!("{node}.key")), dir.join(format!("{node}.pem")));
        std::fs::write(&cert, issued.cert_pem()).unwrap();
        std::fs::write(&key, issued.key_pem()).unwrap();
        std::fs::write(&combined, format!("{}{}", issued.cert_pem(), issued.key_pem())).unwrap();
        Self { cert, key, combined }
    }

    fn auth(&self) -> ApiAuth<'_> {
        ApiAuth::ClientCert { cert: &self.cert, key: &self.key }
    }
}

fn admin(api: &KubeApiServer, method: &str, path: &str, body: Option<Value>) -> Value {
    let text = body.map(|b| b.to_string());
    let kind = if method == "PATCH" { MERGE } else { "application/json" };
    let (status, reply) = api.api(method, path, text.as_deref().map(|t| (kind, t))).unwrap();
    assert!((200..300).contains(&status), "{method} {path}: HTTP {status}: {reply}");
    serde_json::from_str(&reply).unwrap()
}

/// `PATCH path` (a merge patch) as `who`: the status and the body.
fn patch_as(api: &KubeApiServer, who: &NodeCred, path: &str, patch: Value) -> (u16, String) {
    api.api_as(who.auth(), "PATCH", path, Some((MERGE, &patch.to_string()))).unwrap()
}

fn node(api: &KubeApiServer, name: &str) -> Value {
    admin(api, "GET", &format!("/api/v1/nodes/{name}"), None)
}

fn create_node(api: &KubeApiServer, name: &str, cidr: &str, annotations: Value) {
    admin(
        api,
        "POST",
        "/api/v1/nodes",
        Some(json!({
            "metadata": { "name": name, "annotations": annotations },
            "spec": { "podCIDR": cidr, "podCIDRs": [cidr] },
        })),
    );
}

fn has_addon_taint(node: &Value) -> bool {
    node["spec"]["taints"].as_array().is_some_and(|t| t.iter().any(|t| t["key"] == TAINT_ADDON_KEY))
}

fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Points `link` at `target` in one rename, as kubelet's certificate
/// manager re-points `kubelet-client-current.pem`.
fn repoint(link: &Path, target: &Path) {
    let tmp = link.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

#[test]
fn a_node_credential_writes_only_its_own_node_and_never_makes_it_a_cloud_node() {
    let builder = KubeCluster::builder().rbac(true).node_restriction(true);
    if !builder.binaries_available().unwrap() {
        eprintln!("skipped: kube-apiserver is not built (`cargo xtask setup` builds it)");
        return;
    }
    let cluster = builder.start().unwrap();
    let api = cluster.api();
    let dir = tempfile::tempdir().unwrap();
    let edge1 = NodeCred::issue(api.ca(), "edge-1", dir.path());
    let edge3 = NodeCred::issue(api.ca(), "edge-3", dir.path());
    create_node(api, "edge-1", "10.244.1.0/24", json!({}));
    // edge-2: a flannel peer whose lease is what an attacker would rewrite.
    let edge2_annotations = json!({
        "flannel.alpha.coreos.com/backend-type": "vxlan",
        "flannel.alpha.coreos.com/backend-data": r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}"#,
        "flannel.alpha.coreos.com/public-ip": "192.168.50.2",
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
    });
    create_node(api, "edge-2", "10.244.2.0/24", edge2_annotations.clone());
    create_node(api, "cloud-1", "10.244.3.0/24", json!({}));

    // (a) The trusted label is out of a node's reach: on its Node, through
    // the status subresource too, and when it registers itself.
    let claim = json!({ "metadata": { "labels": { LABEL_ROLE: "cloud" } } });
    for path in ["/api/v1/nodes/edge-1", "/api/v1/nodes/edge-1/status"] {
        let (status, body) = patch_as(api, &edge1, path, claim.clone());
        assert_eq!(status, 403, "PATCH {path} as system:node:edge-1: {body}");
        assert!(
            body.contains("is not allowed to modify labels") && body.contains(LABEL_ROLE),
            "NodeRestriction refuses, naming the label: {body}"
        );
    }
    let register = |labels: Value| {
        let object = json!({ "metadata": { "name": "edge-3", "labels": labels } }).to_string();
        api.api_as(edge3.auth(), "POST", "/api/v1/nodes", Some(("application/json", &object))).unwrap()
    };
    let (status, body) = register(json!({ LABEL_ROLE: "cloud" }));
    assert_eq!(status, 403, "a node registering itself as cloud: {body}");
    assert!(body.contains("is not allowed to set the following labels") && body.contains(LABEL_ROLE), "{body}");
    let (status, body) = register(json!({ LABEL_EDGE_WORKER: "true" }));
    assert_eq!(status, 201, "the same registration without the trusted label: {body}");
    assert!(node(api, "edge-1")["metadata"]["labels"].get(LABEL_ROLE).is_none());
    // The seed's label is the node's to write: allowed, and it grants nothing.
    let (status, body) = patch_as(
        api,
        &edge1,
        "/api/v1/nodes/edge-1",
        json!({ "metadata": { "labels": { LABEL_EDGE_WORKER: "false" } } }),
    );
    assert_eq!(status, 200, "{body}");

    // The real node controller, as the cloud side runs it (admin here).
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let admin_client = KubeClient::new(&api.kube_config("cloud-1").unwrap()).unwrap();
    let metrics = Arc::new(NodeMetrics::default());
    let options = NodeOptions { allocate: None, reclaim_after: nodes::DEFAULT_RECLAIM_AFTER };
    let controller = runtime.spawn(nodes::run(admin_client, options, metrics.clone()));
    let edge = wait_for("edge-1's claim undone", || {
        Some(node(api, "edge-1")).filter(|n| n["metadata"]["labels"][LABEL_EDGE_WORKER] == "true")
    });
    assert!(!has_addon_taint(&edge), "{edge}");
    // An operator's label makes a cloud node.
    admin(api, "PATCH", "/api/v1/nodes/cloud-1", Some(claim.clone()));
    let cloud = wait_for("cloud-1 marked", || Some(node(api, "cloud-1")).filter(has_addon_taint));
    assert_eq!(cloud["metadata"]["labels"][LABEL_EDGE_WORKER], "false");
    assert_eq!(node(api, "edge-3")["metadata"]["labels"][LABEL_EDGE_WORKER], "true");
    assert!(!has_addon_taint(&node(api, "edge-1")) && !has_addon_taint(&node(api, "edge-2")));

    // (b) netd run's Kubernetes registry as node edge-1, with a kubelet-style
    // certificate file. First the link points at a certificate the cluster
    // does not trust (same name, another CA): refused, 401.
    let foreign =
        CertificateAuthority::generate("not the cluster CA", DAY).unwrap().issue_node("edge-1", &[], DAY).unwrap();
    let foreign_pem = dir.path().join("kubelet-client-foreign.pem");
    std::fs::write(&foreign_pem, format!("{}{}", foreign.cert_pem(), foreign.key_pem())).unwrap();
    let current = dir.path().join("kubelet-client-current.pem");
    repoint(&current, &foreign_pem);
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, api.ca_cert_pem().unwrap()).unwrap();
    let settings = |node: &str| OpenSettings {
        node_name: node.into(),
        network: Some(NETWORK.parse().unwrap()),
        token_file: None,
        ca_file: Some(ca_file.clone()),
        client_cert: Some(ClientCertFiles { cert: current.clone(), key: None }),
        poll: Duration::from_secs(1),
    };
    let spec = RegistrySpec::Kubernetes(Some(api.url()));
    let request = |node: &str, ip: &str| LeaseRequest {
        node: node.into(),
        public_ip: ip.parse().unwrap(),
        vtep_mac: netd::ipam::MacAddr([0x0e, 0, 0, 0, 0, 1]),
        previous_subnet: None,
    };
    runtime.block_on(async {
        let mut registry = AnyRegistry::open(&spec, &settings("edge-1")).await.unwrap();
        let network = registry.network_config().await.unwrap();
        let refused = registry.acquire_lease(&network, &request("edge-1", "192.168.50.1")).await.unwrap_err();
        assert!(refused.to_string().contains("401"), "{refused}");
        // kubelet rotates: the link now points at the cluster-issued
        // certificate. The same registry (no restart) is edge-1.
        repoint(&current, &edge1.combined);
        let lease = registry.acquire_lease(&network, &request("edge-1", "192.168.50.1")).await.unwrap();
        assert_eq!(lease.lease.subnet.to_string(), "10.244.1.0/24");
        // It reads the peers (nodes list + watch) as the node.
        match registry.next_event(lease.lease.subnet).await.unwrap() {
            netd::registry::PeerEvent::Resync(peers) => {
                assert!(peers.iter().any(|p| p.lease.node.as_deref() == Some("edge-2")), "{peers:?}")
            }
            other => panic!("the first event is the peer list: {other:?}"),
        }
        // Its own code path pointed at another node (a lease requested for
        // edge-2): the API server refuses, nothing is written.
        let refused = registry.acquire_lease(&network, &request("edge-2", "192.168.50.66")).await.unwrap_err();
        assert!(refused.to_string().contains("403") || refused.to_string().contains("Forbidden"), "{refused}");

        // A registry for another node with edge-1's certificate does not
        // even start.
        let error = AnyRegistry::open(&spec, &settings("edge-2")).await.err().unwrap();
        assert!(error.to_string().contains("system:node:edge-1"), "{error}");

        // The pod list of the pin keeper (field selector on the node) is
        // the node's to read.
        let client = KubeClient::new(&KubeConfig {
            server: api.url(),
            token: None,
            token_file: None,
            ca_cert_pem: Some(api.ca_cert_pem().unwrap()),
            client_cert: Some(ClientCertFiles { cert: edge1.cert.clone(), key: Some(edge1.key.clone()) }),
            node_name: "edge-1".into(),
            network: None,
        })
        .unwrap();
        assert_eq!(client.certificate_identity().as_deref(), Some("system:node:edge-1"));
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(client.client());
        pods.list(&ListParams::default().fields("spec.nodeName=edge-1")).await.unwrap();
        // netd's own client patching edge-2's status as edge-1: 403.
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.client());
        let hijack =
            json!({ "metadata": { "annotations": { "flannel.alpha.coreos.com/public-ip": "192.168.50.66" } } });
        let error = nodes.patch_status("edge-2", &PatchParams::default(), &Patch::Merge(&hijack)).await.unwrap_err();
        assert!(matches!(&error, kube::Error::Api(status) if status.code == 403), "{error}");
    });
    let own = node(api, "edge-1");
    assert_eq!(own["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip"], "192.168.50.1");
    assert_eq!(own["metadata"]["annotations"]["flannel.alpha.coreos.com/kube-subnet-manager"], "true");
    let condition = own["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "NetworkUnavailable");
    assert_eq!(condition.map(|c| c["status"].clone()), Some(json!("False")), "{own}");

    // The same with curl, every way of writing node B: status, metadata,
    // spec, and deleting it.
    for (path, patch) in [
        (
            "/api/v1/nodes/edge-2/status",
            json!({ "metadata": { "annotations": { "flannel.alpha.coreos.com/public-ip": "192.168.50.66" } } }),
        ),
        (
            "/api/v1/nodes/edge-2/status",
            json!({ "metadata": { "annotations": { "flannel.alpha.coreos.com/backend-data": r#"{"VNI":1,"VtepMAC":"0e:66:66:66:66:66"}"# } } }),
        ),
        (
            "/api/v1/nodes/edge-2",
            json!({ "metadata": { "annotations": { "node.beta.alibabacloud.com/autonomy": "true" } } }),
        ),
        ("/api/v1/nodes/edge-2", json!({ "metadata": { "labels": { LABEL_EDGE_WORKER: "false" } } })),
        ("/api/v1/nodes/edge-2", json!({ "spec": { "unschedulable": true } })),
    ] {
        let (status, body) = patch_as(api, &edge1, path, patch.clone());
        assert_eq!(status, 403, "PATCH {path} {patch} as edge-1: {body}");
        assert!(body.contains(r#"node \"edge-1\" is not allowed to modify node \"edge-2\""#), "{body}");
    }
    let (status, body) = api.api_as(edge1.auth(), "DELETE", "/api/v1/nodes/edge-2", None).unwrap();
    assert_eq!(status, 403, "{body}");
    let after = node(api, "edge-2");
    assert_eq!(after["metadata"]["annotations"], edge2_annotations, "edge-2's lease is untouched");
    assert!(after["spec"].get("unschedulable").is_none());
    // And its own Node stays its own to write.
    let (status, body) = patch_as(
        api,
        &edge1,
        "/api/v1/nodes/edge-1/status",
        json!({ "metadata": { "annotations": { "example.com/x": "1" } } }),
    );
    assert_eq!(status, 200, "{body}");

    controller.abort();
    assert!(metrics.edge_marked.load(std::sync::atomic::Ordering::Relaxed) >= 2, "edge-1 and edge-3 (and edge-2)");
    assert!(metrics.cloud_marked.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}
