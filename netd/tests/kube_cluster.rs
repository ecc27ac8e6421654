//! The Kubernetes control plane of the join, node lifecycle and rollout
//! tests (`netd::testing::KubeCluster`): kube-apiserver 1.20.2 with RBAC and
//! bootstrap-token authentication, and a real kube-controller-manager
//! 1.20.2 beside it. What kubeadm's join relies on, end to end: a bootstrap
//! token gets a node client certificate approved and signed by the cluster
//! CA, and that certificate authenticates as the node; the bootstrapsigner
//! signs `cluster-info`; RBAC refuses what it should; node IPAM hands out
//! pod CIDRs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use netd::testing::{self, ApiAuth, BootstrapToken, ControllerManagerOptions, KubeApiServer, KubeCluster};
use serde_json::{json, Value};

const NODE: &str = "edge-1";

/// Starts the cluster, or `None` to skip (not root, or binaries not built
/// outside `cargo xtask test`).
fn start(builder: netd::testing::KubeClusterBuilder) -> Option<KubeCluster> {
    builder.binaries_available().unwrap().then(|| builder.start().unwrap())
}

fn get(api: &KubeApiServer, auth: ApiAuth<'_>, path: &str) -> (u16, Value) {
    let (status, body) = api.api_as(auth, "GET", path, None).unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

fn post(api: &KubeApiServer, auth: ApiAuth<'_>, path: &str, object: &Value) -> (u16, Value) {
    let (status, body) = api.api_as(auth, "POST", path, Some(("application/json", &object.to_string()))).unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

/// Polls `probe` every 200 ms until it returns something, for at most `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn base64(bytes: &[u8]) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec())).unwrap()
}

fn unbase64(text: &Value) -> Vec<u8> {
    serde_json::from_value::<k8s_openapi::ByteString>(text.clone()).unwrap().0
}

/// A P-256 key and a CSR for `CN=system:node:<node>, O=system:nodes`, as a
/// kubelet's bootstrap makes them; returns the CSR's PEM.
fn node_csr(dir: &Path, node: &str) -> Vec<u8> {
    let (key, csr) = (dir.join("node.key"), dir.join("node.csr"));
    let subject = format!("/O=system:nodes/CN=system:node:{node}");
    testing::run_command(
        "openssl",
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
            "-subj",
            &subject,
        ],
    )
    .unwrap();
    std::fs::read(csr).unwrap()
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn a_bootstrap_token_gets_a_node_certificate_and_signs_cluster_info() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let Some(cluster) = start(KubeCluster::builder().rbac(true).bootstrap_tokens(true).controller_manager(true)) else {
        return;
    };
    let api = cluster.api();
    let token = BootstrapToken::generate().unwrap();
    api.create_bootstrap_token(&token, &[BootstrapToken::KUBEADM_GROUP]).unwrap();
    api.bind_node_bootstrappers(BootstrapToken::KUBEADM_GROUP).unwrap();
    api.publish_cluster_info().unwrap();
    let bearer = token.token();
    let as_bootstrap = ApiAuth::Bearer(&bearer);

    // The bootstrap token alone may create a CSR, nothing more.
    let (status, body) = get(api, as_bootstrap, "/api/v1/nodes");
    assert_eq!(status, 403, "{body}");
    let user = format!("system:bootstrap:{}", token.id);
    assert!(body["message"].as_str().unwrap().contains(&user), "{body}");

    let files = tempfile::tempdir().unwrap();
    let csr = json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": { "name": format!("node-csr-{NODE}") },
        "spec": {
            "request": base64(&node_csr(files.path(), NODE)),
            "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
            "usages": ["digital signature", "key encipherment", "client auth"],
        },
    });
    let csrs = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
    let (status, body) = post(api, as_bootstrap, csrs, &csr);
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["spec"]["username"], json!(user), "{body}");

    // The controller-manager approves it (the nodeclient binding) and
    // signs it with the cluster CA.
    let path = format!("{csrs}/node-csr-{NODE}");
    let issued = wait_for("the CSR approved and signed", Duration::from_secs(30), || {
        let (status, body) = get(api, as_bootstrap, &path);
        assert_eq!(status, 200, "{body}");
        body["status"].get("certificate").map(|cert| (body["status"]["conditions"].clone(), unbase64(cert)))
    });
    let (conditions, cert) = issued;
    assert_eq!(conditions[0]["type"], "Approved", "{conditions}");
    assert_eq!(conditions[0]["reason"], "AutoApproved", "{conditions}");
    let cert_path = files.path().join("node.crt");
    std::fs::write(&cert_path, &cert).unwrap();
    let ca = api.ca_cert_path();
    let verified =
        testing::run_command("openssl", &["verify", "-CAfile", ca.to_str().unwrap(), cert_path.to_str().unwrap()])
            .unwrap();
    assert!(String::from_utf8_lossy(&verified.stdout).trim().ends_with("OK"));

    // The issued certificate authenticates as the node: the Node authorizer
    // lets it read nodes and names it when refusing secrets.
    let key_path = files.path().join("node.key");
    let as_node = ApiAuth::ClientCert { cert: &cert_path, key: &key_path };
    let (status, body) = get(api, as_node, "/api/v1/nodes");
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(api, as_node, "/api/v1/secrets");
    assert_eq!(status, 403, "{body}");
    assert!(body["message"].as_str().unwrap().contains(&format!("User \"system:node:{NODE}\"")), "{body}");

    // The bootstrapsigner signed cluster-info with the token: a detached
    // JWS, `header..signature`.
    let key = format!("jws-kubeconfig-{}", token.id);
    let jws = wait_for("cluster-info signed", Duration::from_secs(30), || {
        let (status, body) =
            get(api, ApiAuth::Bearer(api.token()), "/api/v1/namespaces/kube-public/configmaps/cluster-info");
        assert_eq!(status, 200, "{body}");
        body["data"][&key].as_str().map(str::to_owned)
    });
    let parts: Vec<&str> = jws.split('.').collect();
    assert!(parts.len() == 3 && !parts[0].is_empty() && parts[1].is_empty() && !parts[2].is_empty(), "{jws}");
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn rbac_refuses_bad_tokens_and_unbound_service_accounts() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let Some(cluster) = start(KubeCluster::builder().rbac(true).bootstrap_tokens(true)) else { return };
    let api = cluster.api();

    // Unknown tokens, static or bootstrap-shaped, do not authenticate.
    for bad in ["not-a-token", "abcdef.0123456789abcdef"] {
        let (status, body) = get(api, ApiAuth::Bearer(bad), "/api/v1/nodes");
        assert_eq!(status, 401, "{bad}: {body}");
    }
    // The admin token is in system:masters, whatever RBAC says.
    assert_eq!(get(api, ApiAuth::Bearer(api.token()), "/api/v1/nodes").0, 200);

    // A service account's token (TokenRequest) authenticates, but without
    // bindings RBAC forbids listing nodes.
    let admin = ApiAuth::Bearer(api.token());
    let account = json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "reader" } });
    let (status, body) = post(api, admin, "/api/v1/namespaces/default/serviceaccounts", &account);
    assert_eq!(status, 201, "{body}");
    let request = json!({ "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {} });
    let (status, body) = post(api, admin, "/api/v1/namespaces/default/serviceaccounts/reader/token", &request);
    assert_eq!(status, 201, "{body}");
    let sa_token = body["status"]["token"].as_str().unwrap().to_owned();
    let (status, body) = get(api, ApiAuth::Bearer(&sa_token), "/api/v1/nodes");
    assert_eq!(status, 403, "{body}");
    assert!(body["message"].as_str().unwrap().contains("system:serviceaccount:default:reader"), "{body}");
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn new_nodes_get_a_pod_cidr_from_node_ipam() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let options = ControllerManagerOptions {
        cluster_cidr: "10.77.0.0/16".parse().unwrap(),
        node_cidr_mask_size: 26,
        ..ControllerManagerOptions::default()
    };
    let Some(cluster) = start(KubeCluster::builder().controller_manager_options(options)) else { return };
    let api = cluster.api();
    let node = json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": NODE } });
    let (status, body) = post(api, ApiAuth::Bearer(api.token()), "/api/v1/nodes", &node);
    assert_eq!(status, 201, "{body}");

    // Read with kubectl 1.32 through the admin kubeconfig: a real client.
    let cidr = wait_for("a pod CIDR", Duration::from_secs(30), || {
        let out = api.kubectl(&["get", "node", NODE, "-o", "jsonpath={.spec.podCIDR}"]).unwrap();
        let cidr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (!cidr.is_empty()).then_some(cidr)
    });
    let cidr: ipnet::Ipv4Net = cidr.parse().unwrap();
    assert_eq!(cidr.prefix_len(), 26, "{cidr}");
    assert!("10.77.0.0/16".parse::<ipnet::Ipv4Net>().unwrap().contains(&cidr), "{cidr}");
    assert!(cluster.controller_manager().unwrap().is_running());
}
