//! `netd-join` against the real kube-apiserver 1.20.2 (RBAC with the Node
//! authorizer, NodeRestriction, bootstrap-token authentication) and the
//! real kube-controller-manager 1.20.2, whose bootstrapsigner signs
//! cluster-info and whose csrapproving/csrsigning controllers approve and
//! sign the node's certificate request.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use netd::join::CaPin;
use netd::testing::{self, BootstrapToken, KubeApiServer, KubeCluster};
use serde_json::{json, Value};

fn join(api: &KubeApiServer, config_dir: &Path, token: &str, pin: &str, spec: &str) -> (bool, String) {
    join_with(api, config_dir, token, pin, spec, &[])
}

/// Where the edge hub's files go for a join whose `--config-dir` is
/// `config_dir`: beside it, never the host's /etc or /var.
struct HubPaths {
    cache: PathBuf,
    kubeconfig: PathBuf,
    systemd: PathBuf,
}

impl HubPaths {
    fn of(config_dir: &Path) -> Self {
        let root =
            config_dir.parent().unwrap().join(format!("{}-host", config_dir.file_name().unwrap().to_str().unwrap()));
        Self {
            cache: root.join("var/lib/netd/hub"),
            kubeconfig: root.join("etc/kubernetes/kubelet-hub.conf"),
            systemd: root.join("etc/systemd/system"),
        }
    }

    fn unit(&self) -> PathBuf {
        self.systemd.join("netd-hub.service")
    }

    fn dropin(&self) -> PathBuf {
        self.systemd.join("kubelet.service.d/20-netd-hub.conf")
    }

    /// None of the hub's files (nor the directories made for them) is there.
    fn none_there(&self) -> bool {
        [&self.cache, &self.kubeconfig, &self.systemd].iter().all(|p| !p.exists())
    }
}

fn join_with(
    api: &KubeApiServer,
    config_dir: &Path,
    token: &str,
    pin: &str,
    spec: &str,
    extra: &[&str],
) -> (bool, String) {
    let hub = HubPaths::of(config_dir);
    let out = Command::new(env!("CARGO_BIN_EXE_netd-join"))
        .args(["--token", token, "--registry", &format!("kubernetes:{}", api.url())])
        .args(["--discovery-token-ca-cert-hash", pin, "--node-spec", spec])
        .args(["--config-dir", config_dir.to_str().unwrap(), "--csr-timeout", "60"])
        .arg("--hub-cache-dir")
        .arg(&hub.cache)
        .arg("--kubelet-kubeconfig")
        .arg(&hub.kubeconfig)
        .arg("--systemd-dir")
        .arg(&hub.systemd)
        .args(extra)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn get(api: &KubeApiServer, path: &str) -> Value {
    let (status, body) = api.api("GET", path, None).unwrap();
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// What kubeadm sets up for token discovery: anonymous may read
/// cluster-info, and nothing else.
fn allow_anonymous_cluster_info(api: &KubeApiServer) {
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": { "name": "kubeadm:bootstrap-signer-clusterinfo", "namespace": "kube-public" },
        "rules": [{ "apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["cluster-info"], "verbs": ["get"] }],
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": { "name": "kubeadm:bootstrap-signer-clusterinfo", "namespace": "kube-public" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubeadm:bootstrap-signer-clusterinfo" },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:anonymous" }],
    });
    for (path, object) in [
        ("/apis/rbac.authorization.k8s.io/v1/namespaces/kube-public/roles", role),
        ("/apis/rbac.authorization.k8s.io/v1/namespaces/kube-public/rolebindings", binding),
    ] {
        let (status, body) = api.api("POST", path, Some(("application/json", &object.to_string()))).unwrap();
        assert_eq!(status, 201, "{path}: {body}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn a_node_joins_with_its_bootstrap_token_and_pinned_ca_and_bad_ones_change_nothing() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let builder =
        KubeCluster::builder().rbac(true).bootstrap_tokens(true).node_restriction(true).controller_manager(true);
    if !builder.binaries_available().unwrap() {
        return;
    }
    let cluster = builder.start().unwrap();
    let api = cluster.api();
    let token = BootstrapToken::generate().unwrap();
    api.create_bootstrap_token(&token, &[BootstrapToken::KUBEADM_GROUP]).unwrap();
    api.bind_node_bootstrappers(BootstrapToken::KUBEADM_GROUP).unwrap();
    api.publish_cluster_info().unwrap();
    allow_anonymous_cluster_info(api);
    let signed = format!("jws-kubeconfig-{}", token.id);
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(api, "/api/v1/namespaces/kube-public/configmaps/cluster-info")["data"].get(&signed).is_none() {
        assert!(Instant::now() < deadline, "the bootstrapsigner never signed cluster-info");
        std::thread::sleep(Duration::from_millis(250));
    }
    let ca_pem = api.ca_cert_pem().unwrap();
    let ca_der = rustls_pki_types::pem::PemObject::from_pem_slice(&ca_pem)
        .map(|der: rustls_pki_types::CertificateDer<'static>| der.to_vec())
        .unwrap();
    let pin = CaPin::of_cert(&ca_der).unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("etc-netd");
    let spec = r#"{"flannelface":"lo","enableIptables":true,"quiet":true,"nodeNameOverride":"*.edge",
                  "allowedClusterAddons":["kube-proxy","coredns"],"gpuVersion":"Nvidia_Tesla_P4",
                  "labels":{"site":"shop-17"},"annotations":{"example.com/owner":"ops"}}"#;

    // A token the cluster does not know: no signature for its id.
    let (ok, text) = join(api, &config_dir, "zzzzzz.0123456789abcdef", &pin, spec);
    assert!(!ok && text.contains("no \"jws-kubeconfig-zzzzzz\""), "{text}");
    assert!(!config_dir.exists(), "a refused join wrote something");
    // The right token, the wrong CA pin: refused before any change.
    let wrong = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    let (ok, text) = join(api, &config_dir, &token.token(), wrong, spec);
    assert!(!ok && text.contains("matches no --discovery-token-ca-cert-hash"), "{text}");
    assert!(text.contains(&pin), "the error names the CA's real pin: {text}");
    assert!(!config_dir.exists());
    assert_eq!(get(api, "/api/v1/nodes")["items"].as_array().unwrap().len(), 0, "nothing registered");

    // Without "quiet" join would ask, and nobody can answer here (stdin is
    // not a terminal): refused after the checks, before any change.
    let asking = spec.replace(r#""quiet":true"#, r#""quiet":false"#);
    let (ok, text) = join(api, &config_dir, &token.token(), &pin, &asking);
    assert!(!ok && text.contains("stdin is not a terminal"), "{text}");
    assert!(!config_dir.exists());
    // A token the cluster knows but that may not request node certificates
    // (not in the group the bootstrap bindings name): the join fails
    // midway, after discovery, and leaves nothing behind.
    let stranger = BootstrapToken::generate().unwrap();
    api.create_bootstrap_token(&stranger, &[]).unwrap();
    let signed_too = format!("jws-kubeconfig-{}", stranger.id);
    while get(api, "/api/v1/namespaces/kube-public/configmaps/cluster-info")["data"].get(&signed_too).is_none() {
        assert!(
            Instant::now() < deadline + Duration::from_secs(60),
            "the bootstrapsigner never signed for the second token"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let (ok, text) = join(api, &config_dir, &stranger.token(), &pin, spec);
    assert!(!ok && text.contains("creating the node's certificate request"), "{text}");
    assert!(!config_dir.exists(), "a join that failed midway left files");
    assert_eq!(get(api, "/api/v1/nodes")["items"].as_array().unwrap().len(), 0, "nothing half-registered");

    // --dry-run: the plan with the edge hub's files in full; nothing written.
    let hub = HubPaths::of(&config_dir);
    let (ok, text) = join_with(api, &config_dir, &token.token(), &pin, spec, &["--dry-run"]);
    assert!(ok && text.contains("(dry run: nothing changed)"), "{text}");
    for shown in [
        format!("--- {} (600)", hub.kubeconfig.display()),
        "server: https://127.0.0.1:10261".to_string(),
        format!("--- {} (644)", hub.unit().display()),
        "ExecStart=/usr/local/bin/netd hub --node-name ".to_string(),
        "Before=kubelet.service".to_string(),
        format!("--- {} (644)", hub.dropin().display()),
        format!("--kubeconfig={}", hub.kubeconfig.display()),
        format!("{}/pki/ca.crt", hub.cache.display()),
    ] {
        assert!(text.contains(&shown), "the dry run shows {shown:?}:\n{text}");
    }
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    assert!(!config_dir.exists() && hub.none_there(), "a dry run wrote something");

    // A join that fails after the hub's files were written (the drop-in's
    // directory is a file): everything it wrote is taken back.
    std::fs::create_dir_all(&hub.systemd).unwrap();
    std::fs::write(hub.systemd.join("kubelet.service.d"), "in the way").unwrap();
    let (ok, text) = join(api, &config_dir, &token.token(), &pin, spec);
    assert!(!ok && text.contains("kubelet.service.d"), "{text}");
    assert!(!config_dir.exists(), "a failed join left netd's files");
    assert!(!hub.cache.exists() && !hub.kubeconfig.exists() && !hub.unit().exists(), "a failed join left the hub's");
    assert!(!hub.kubeconfig.parent().unwrap().exists(), "and the directories it made");
    assert_eq!(get(api, "/api/v1/nodes")["items"].as_array().unwrap().len(), 0, "nothing registered");
    std::fs::remove_dir_all(hub.systemd.parent().unwrap().parent().unwrap()).unwrap();
    let csrs_before =
        get(api, "/apis/certificates.k8s.io/v1/certificatesigningrequests")["items"].as_array().unwrap().len();

    // A good join.
    let (ok, text) = join(api, &config_dir, &token.token(), &pin, spec);
    assert!(ok, "{text}");
    let record: Value = serde_json::from_slice(&std::fs::read(config_dir.join("join.json")).unwrap()).unwrap();
    let node = record["nodeName"].as_str().unwrap().to_string();
    assert!(node.ends_with(".edge") && node.len() == 11, "{node}");
    // The certificate: the cluster CA signed CN=system:node:<name>, O=system:nodes for this key.
    let tunnel = config_dir.join("tunnel");
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(tunnel.join("ca.crt"))
        .arg(tunnel.join("node.crt"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let loaded = netd::tunnel::certs::CertFiles::in_dir(&tunnel, "node").load().unwrap();
    assert_eq!(netd::tunnel::certs::node_name_of(loaded.chain[0].as_ref()).unwrap(), node);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(tunnel.join("node.key")).unwrap().permissions().mode() & 0o777, 0o600);
    let csrs = get(api, "/apis/certificates.k8s.io/v1/certificatesigningrequests");
    let csr = csrs["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["spec"]["username"] == json!(format!("system:bootstrap:{}", token.id)))
        .unwrap();
    assert_eq!(csr["spec"]["signerName"], "kubernetes.io/kube-apiserver-client-kubelet");
    assert!(csr["status"]["conditions"].to_string().contains("AutoApproved"), "{csr}");
    // netd's settings from the spec.
    let settings: Value = serde_json::from_slice(&std::fs::read(config_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!((settings["nodeName"].as_str(), settings["iface"].as_str()), (Some(node.as_str()), Some("lo")));
    assert_eq!(settings["masquerade"], json!(true));
    // The Node, registered by the node itself, with every label and annotation.
    let object = get(api, &format!("/api/v1/nodes/{node}"));
    let labels = &object["metadata"]["labels"];
    assert_eq!(labels["alibabacloud.com/is-edge-worker"], "true");
    assert_eq!(labels["alibabacloud.com/gpu-version"], "Nvidia_Tesla_P4");
    assert_eq!(labels["site"], "shop-17");
    let annotations = &object["metadata"]["annotations"];
    assert_eq!(annotations["alibabacloud.com/allowed-cluster-addons"], "kube-proxy,coredns");
    assert_eq!(annotations["example.com/owner"], "ops");
    assert!(annotations.get("node.beta.alibabacloud.com/autonomy").is_none(), "new nodes start non-autonomous");
    // The edge hub wired in: its CA, the kubelet's kubeconfig naming it,
    // its unit and the kubelet's drop-in; what to run next.
    assert!(text.contains("systemctl daemon-reload && systemctl enable netd-hub && systemctl restart netd-hub kubelet"));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let hub_ca = hub.cache.join("pki/ca.crt");
    assert_eq!((mode(&hub.cache), mode(&hub.cache.join("pki"))), (0o700, 0o700));
    assert_eq!((mode(&hub_ca), mode(&hub.cache.join("pki/ca.key"))), (0o600, 0o600));
    assert!(netd::hub::pki::HubCa::load(&hub.cache.join("pki")).unwrap().is_some(), "a CA the hub loads");
    assert_eq!((mode(&hub.kubeconfig), mode(&hub.unit()), mode(&hub.dropin())), (0o600, 0o644, 0o644));
    let kubeconfig: serde_yaml::Value = serde_yaml::from_slice(&std::fs::read(&hub.kubeconfig).unwrap()).unwrap();
    let cluster = &kubeconfig["clusters"][0]["cluster"];
    assert_eq!(cluster["server"].as_str(), Some("https://127.0.0.1:10261"));
    assert_eq!(cluster["certificate-authority"].as_str(), hub_ca.to_str());
    let user = &kubeconfig["users"][0]["user"];
    let kubelet_cert = "/var/lib/kubelet/pki/kubelet-client-current.pem";
    assert_eq!(
        (user["client-certificate"].as_str(), user["client-key"].as_str()),
        (Some(kubelet_cert), Some(kubelet_cert))
    );
    assert_eq!(kubeconfig["current-context"].as_str(), Some("kubelet@netd-hub"));
    let unit = std::fs::read_to_string(hub.unit()).unwrap();
    let exec = format!(
        "ExecStart=/usr/local/bin/netd hub --node-name {node} --server {server} --ca-file {ca} --client-cert {kubelet_cert} \
         --cache-dir {cache}\n",
        server = record["server"].as_str().unwrap(),
        ca = tunnel.join("ca.crt").display(),
        cache = hub.cache.display(),
    );
    assert!(unit.contains(&exec) && unit.contains("Restart=always\n"), "{unit}");
    let dropin = std::fs::read_to_string(hub.dropin()).unwrap();
    assert!(dropin.contains(&format!("--kubeconfig={}\"", hub.kubeconfig.display())), "{dropin}");

    // Again with the same spec: nothing changes, and it says so.
    let before = std::fs::read(config_dir.join("tunnel/node.crt")).unwrap();
    let (ok, text) = join(api, &config_dir, &token.token(), &pin, spec);
    assert!(ok && text.contains(&format!("already joined as node {node}")), "{text}");
    assert_eq!(std::fs::read(config_dir.join("tunnel/node.crt")).unwrap(), before);
    assert_eq!(
        get(api, "/apis/certificates.k8s.io/v1/certificatesigningrequests")["items"].as_array().unwrap().len(),
        csrs_before + 1
    );

    // --hub=false: a node joined without the hub: none of its files.
    let plain_dir = dir.path().join("plain-etc-netd");
    let (ok, text) = join_with(api, &plain_dir, &token.token(), &pin, spec, &["--hub=false"]);
    assert!(ok && !text.contains("systemctl"), "{text}");
    assert!(plain_dir.join("join.json").is_file());
    assert!(HubPaths::of(&plain_dir).none_there(), "--hub=false wrote the hub's files");
}
