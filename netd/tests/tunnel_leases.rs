//! A lease is a claim, not a credential (SPEC §3b, issue 23): on each
//! registry (embedded, etcd, Kubernetes), the real `netd-cloud tunnel-server`
//! follows the leases, node B's lease naming node A's address leaves A's
//! traffic with A's agent and is counted, and leases naming loopback or the
//! unspecified address route nothing — on the stage of
//! `common/tunnel_stage.rs` (no route from the cloud to the edge, only the
//! agents' links).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/tunnel_stage.rs"]
mod tunnel_stage;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use netd::kube::KubeConfig;
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::etcd::EtcdRegistry;
use netd::registry::kubernetes::KubernetesRegistry;
use netd::registry::{LeaseRequest, NetworkConfig, Registry};
use netd::testing::{self, EtcdServer, KubeApiServer, NetNs, ServerHost};
use netd::tunnel::agent::AgentMetrics;
use serde_json::json;
use tunnel_stage::{connect, spawn_netd_cloud, wait_for, Background, Stage, AGENT_PORT, CLOUD_IP, DAY, NODE_IP};

const NETWORK: &str = "10.244.0.0/16";
const CONFIG_JSON: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#;
const METRICS: &str = "127.0.0.1:10266";

fn net(text: &str) -> Ipv4Net {
    text.parse().unwrap()
}

/// Where the leases live; registry servers run in the cloud namespace, where
/// the tunnel server reaches them.
enum Backend {
    Embedded(PathBuf),
    Etcd(EtcdServer),
    Kubernetes { server: Box<KubeApiServer>, token: PathBuf, ca: PathBuf },
}

impl Backend {
    fn registry_args(&self) -> Vec<String> {
        match self {
            Backend::Embedded(db) => vec!["--registry".into(), format!("embedded:{}", db.display())],
            Backend::Etcd(etcd) => vec!["--registry".into(), format!("etcd:{}", etcd.endpoint())],
            Backend::Kubernetes { server, token, ca } => vec![
                "--registry".into(),
                format!("kubernetes:{}", server.url()),
                "--network".into(),
                NETWORK.into(),
                "--token-file".into(),
                token.display().to_string(),
                "--ca-file".into(),
                ca.display().to_string(),
            ],
        }
    }

    /// What `node`'s netd does: takes its lease, claiming `public_ip`.
    fn lease(&self, cloud: &NetNs, node: &str, public_ip: Ipv4Addr, subnet: &str) {
        self.lease_labelled(cloud, node, json!({}), public_ip, subnet);
    }

    /// [`Backend::lease`], the Node (Kubernetes) created with `labels`.
    fn lease_labelled(&self, cloud: &NetNs, node: &str, labels: serde_json::Value, public_ip: Ipv4Addr, subnet: &str) {
        let request = LeaseRequest {
            node: node.into(),
            public_ip,
            vtep_mac: netd::model::MacAddr([0x0e, 0, 0, 0, 0, public_ip.octets()[3]]),
            previous_subnet: Some(net(subnet)),
        };
        if let Backend::Kubernetes { server, .. } = self {
            let spec = json!({ "podCIDR": subnet, "podCIDRs": [subnet] });
            let metadata = json!({ "name": node, "labels": labels });
            let body = json!({ "apiVersion": "v1", "kind": "Node", "metadata": metadata, "spec": spec });
            let (status, text) =
                server.api("POST", "/api/v1/nodes", Some(("application/json", &body.to_string()))).unwrap();
            assert!((200..300).contains(&status), "creating node {node}: {status} {text}");
        }
        let granted = cloud
            .block_on(|| async {
                let network = NetworkConfig { network: net(NETWORK), subnet_len: 24, vni: 1 };
                match self {
                    Backend::Embedded(db) => {
                        let mut registry = EmbeddedRegistry::open(db, Duration::from_millis(50));
                        registry.acquire_lease(&network, &request).await
                    }
                    Backend::Etcd(etcd) => {
                        let mut registry = EtcdRegistry::connect(&[etcd.endpoint()]).await.unwrap();
                        registry.acquire_lease(&network, &request).await
                    }
                    Backend::Kubernetes { server, .. } => {
                        let config = KubeConfig { network: Some(net(NETWORK)), ..server.kube_config(node).unwrap() };
                        KubernetesRegistry::new(config).unwrap().acquire_lease(&network, &request).await
                    }
                }
            })
            .unwrap()
            .unwrap();
        assert_eq!(granted.lease.subnet, net(subnet), "{node}");
    }
}

/// The server's `/metrics`, from inside the cloud namespace.
fn server_metrics(stage: &Stage) -> String {
    let out = stage.cloud.exec("curl", &["-sS", "--noproxy", "*", "-m", "5", &format!("http://{METRICS}/metrics")]);
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

fn refused(stage: &Stage, reason: &str) -> bool {
    server_metrics(stage).contains(&format!("netd_tunnel_lease_refused_total{{reason=\"{reason}\"}}"))
}

fn refusals(stage: &Stage, reason: &str) -> u64 {
    let text = server_metrics(stage);
    let key = format!("netd_tunnel_lease_refused_total{{reason=\"{reason}\"}} ");
    text.lines().find_map(|line| line.strip_prefix(&key)).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

/// The story, the same on every registry.
fn a_lease_cannot_take_another_nodes_address(stage: &Stage, backend: &Backend) {
    // Node A's netd takes its lease; the server follows the registry.
    backend.lease(&stage.cloud, "edge-a", NODE_IP, "10.244.7.0/24");
    let dir = stage.pki.dir.path().to_str().unwrap().to_string();
    let mut args: Vec<String> = [
        "tunnel-server",
        "--cert-dir",
        &dir,
        "--address",
        &CLOUD_IP.to_string(),
        "--dnat-listen",
        "",
        "--http-listen",
        "",
        "--metrics-listen",
        METRICS,
    ]
    .map(String::from)
    .to_vec();
    args.extend(backend.registry_args());
    let _server = spawn_netd_cloud(&stage.cloud.path(), &args);

    // Both agents' certificates carry no address: routing is the leases'.
    // Both claim the node address (B is the compromised one); the kubelet
    // stand-in on it answers whichever dials.
    let agent = |node: &str| {
        let mut config = stage.agent_config_with(&stage.pki.ca.issue_node(node, &[], DAY).unwrap());
        config.servers = vec![format!("{CLOUD_IP}:{AGENT_PORT}")];
        let metrics = Arc::new(AgentMetrics::default());
        (stage.agent(config, metrics.clone()), metrics)
    };
    let (_a, a_metrics) = agent("edge-a");
    let (_b, b_metrics) = agent("edge-b");
    let _kubelet: Background = stage.kubelet();
    let client = netd::tunnel::tls::connect_client(&stage.pki.files("client").load().unwrap()).unwrap();
    let reach = |target: String| {
        let client = client.clone();
        stage.in_cloud(|| async move { connect(client, &target).await.0 })
    };
    let kubelet = format!("{NODE_IP}:10250");
    wait_for("the server up with both agents linked", Duration::from_secs(30), || {
        server_metrics(stage).contains("netd_tunnel_agents 2")
    });
    wait_for("A's lease routed", Duration::from_secs(30), || reach(kubelet.clone()) == 200);
    let served_by_a = a_metrics.streams_total.load(Ordering::Relaxed);
    assert!(served_by_a >= 1);

    // Node B's lease claims A's address: refused, counted, A keeps it.
    backend.lease(&stage.cloud, "edge-b", NODE_IP, "10.244.8.0/24");
    wait_for("the conflict counted", Duration::from_secs(30), || refusals(stage, "held") >= 1);
    for _ in 0..3 {
        assert_eq!(reach(kubelet.clone()), 200);
    }
    assert_eq!(a_metrics.streams_total.load(Ordering::Relaxed), served_by_a + 3, "A's traffic reached A's agent");
    assert_eq!(b_metrics.streams_total.load(Ordering::Relaxed), 0, "B's agent saw none of it");

    // Leases naming loopback and the unspecified address route nothing.
    backend.lease(&stage.cloud, "edge-c", Ipv4Addr::LOCALHOST, "10.244.9.0/24");
    backend.lease(&stage.cloud, "edge-d", Ipv4Addr::UNSPECIFIED, "10.244.10.0/24");
    wait_for("both refused", Duration::from_secs(30), || refused(stage, "special") && refusals(stage, "special") >= 2);
    assert_eq!(reach("127.0.0.1:10250".into()), 503);
    assert_eq!(reach("0.0.0.0:10250".into()), 503);
    assert_eq!(b_metrics.streams_total.load(Ordering::Relaxed), 0);
    let text = server_metrics(stage);
    assert!(text.contains("netd_tunnel_agents 2"), "{text}");

    // The Kubernetes registry knows roles: a cloud node's lease reserves its
    // address, which an edge node's lease then cannot claim.
    if matches!(backend, Backend::Kubernetes { .. }) {
        let cloud_ip = Ipv4Addr::new(10, 250, 0, 9);
        let role = json!({ netd::model::roles::LABEL_ROLE: netd::model::roles::ROLE_CLOUD });
        backend.lease_labelled(&stage.cloud, "cloud-1", role, cloud_ip, "10.244.11.0/24");
        backend.lease(&stage.cloud, "edge-e", cloud_ip, "10.244.12.0/24");
        wait_for("the claim refused", Duration::from_secs(30), || refusals(stage, "reserved") >= 1);
        assert_eq!(reach(format!("{cloud_ip}:10250")), 503, "a cloud node's address reaches no agent");
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn embedded_registry_leases_cannot_take_another_nodes_address() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let db = stage.pki.dir.path().join("registry.db");
    let config = NetworkConfig { network: net(NETWORK), subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&db, &config).unwrap();
    a_lease_cannot_take_another_nodes_address(&stage, &Backend::Embedded(db));
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn etcd_registry_leases_cannot_take_another_nodes_address() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let etcd = EtcdServer::new_on(ServerHost::in_netns(&stage.cloud, CLOUD_IP)).unwrap();
    etcd.etcdctl(&["put", netd::model::flannel::CONFIG_KEY, CONFIG_JSON]).unwrap();
    a_lease_cannot_take_another_nodes_address(&stage, &Backend::Etcd(etcd));
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn kubernetes_registry_leases_cannot_take_another_nodes_address() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let server = KubeApiServer::new_on(ServerHost::in_netns(&stage.cloud, CLOUD_IP)).unwrap();
    let token = stage.pki.dir.path().join("kube.token");
    std::fs::write(&token, server.token()).unwrap();
    let ca = server.ca_cert_path();
    a_lease_cannot_take_another_nodes_address(&stage, &Backend::Kubernetes { server: Box::new(server), token, ca });
}
