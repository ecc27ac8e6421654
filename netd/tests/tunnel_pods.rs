//! Beyond node addresses: plain HTTP routed by `Host` on the tunnel
//! server's HTTP door, pod IPs routed by the registry's leases, and a
//! Prometheus-style pull of an edge pod's metrics from a cloud pod through
//! the eBPF DNAT and the tunnel — on the stage of `common/tunnel_stage.rs`
//! (no route from the cloud to the edge, only the agent's link).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/tunnel_stage.rs"]
mod tunnel_stage;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use ipnet::{IpNet, Ipv4Net};
use netd::ebpf::dnat::Scope;
use netd::registry::embedded::EmbeddedRegistry;
use netd::registry::{LeaseRequest, NetworkConfig, Registry};
use netd::testing::{self, NetNs, VethPair};
use netd::tunnel::agent::{AgentConfig, AgentMetrics};
use netd::tunnel::routes::LeaseRoute;
use netd::tunnel::server::{self, Router, ServerPolicy};
use tokio::net::TcpListener;
use tunnel_stage::{
    curl, curl_in, spawn_netd, spawn_netd_cloud, wait_for, Background, Stage, AGENT_PORT, CLOUD_IP, DAY,
    DNAT_PLAIN_PORT, DNAT_TLS_PORT, NODE, NODE_IP,
};

/// A pod on the edge node, inside the node's pod subnet.
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 19);
const POD_SUBNET: &str = "10.244.7.0/24";
/// Another node's pod subnet, and a pod in it.
const OTHER_SUBNET: &str = "10.244.8.0/24";
const OTHER_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 8, 19);
const METRICS_PORT: u16 = 9100;

fn net(text: &str) -> Ipv4Net {
    text.parse().unwrap()
}

/// The edge's HTTP servers: kubelet's read-only port on the node address
/// and a pod's metrics port on the pod IP; each answers with who it is and
/// the path it was asked for.
fn edge_http(stage: &Stage) -> Background {
    stage.edge.ip(&["addr", "add", &format!("{POD_IP}/32"), "dev", "lo"]).unwrap();
    Background::start(&stage.edge.path(), || async {
        let kubelet = TcpListener::bind((NODE_IP, 10255)).await.unwrap();
        let pod = TcpListener::bind((POD_IP, METRICS_PORT)).await.unwrap();
        tokio::join!(
            netd::http::serve_text(kubelet, |path| async move { (StatusCode::OK, format!("kubelet {path}\n")) }),
            netd::http::serve_text(pod, |path| async move { (StatusCode::OK, format!("pod metrics {path}\n")) }),
        );
    })
}

/// The agent of this node's pod subnet, allowing the metrics port too.
fn pod_agent_config(stage: &Stage) -> AgentConfig {
    let mut config = stage.agent_config(NODE);
    config.pod_subnets = netd::tunnel::tls::fixed(Arc::new(vec![IpNet::V4(net(POD_SUBNET))]));
    config.allowed_ports.insert(METRICS_PORT);
    config
}

/// The HTTP door (plain HTTP by `Host`, no DNAT) on the cloud address.
fn http_door(stage: &Stage, router: Arc<Router>) -> Background {
    Background::start(&stage.cloud.path(), move || async move {
        let listener = TcpListener::bind((CLOUD_IP, DNAT_PLAIN_PORT)).await.unwrap();
        server::serve_http_door(listener, server::DnatCell::default(), router).await;
    })
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn plain_http_on_the_http_door_is_routed_by_host_and_pod_ips_by_the_leases() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let _edge_http = edge_http(&stage);
    // Host routing is off by default: this test's client (in the cloud
    // namespace) is the one source named for it.
    let policy = ServerPolicy { host_routing_sources: vec![IpNet::from(IpAddr::V4(CLOUD_IP))], ..Default::default() };
    let router = Arc::new(Router::new(policy));
    let _server = stage.server(router.clone());
    let _door = http_door(&stage, router.clone());
    let metrics = Arc::new(AgentMetrics::default());
    let _agent = stage.agent(pod_agent_config(&stage), metrics.clone());
    wait_for("the agent's link", Duration::from_secs(10), || router.nodes() == vec![NODE.to_string()]);
    let door = format!("http://{CLOUD_IP}:{DNAT_PLAIN_PORT}");

    // Origin form with Host: two requests on one kept-alive connection,
    // each its own tunnel stream.
    let host = format!("Host: {NODE_IP}:10255");
    let (ok, code, body) =
        curl(&stage.cloud, &["-H", &host, &format!("{door}/stats/summary"), &format!("{door}/pods")]);
    assert!(ok, "{code} {body}");
    assert_eq!(body, "kubelet /stats/summary\n\n200kubelet /pods\n", "both answers, in order");
    assert_eq!(router.metrics.streams_total.load(Ordering::Relaxed), 2);
    // Proxy form, by node name (the certificate's address).
    let (_, code, body) = curl(&stage.cloud, &["-x", &door, &format!("http://{NODE}:10255/healthz")]);
    assert_eq!((code.as_str(), body.as_str()), ("200", "kubelet /healthz\n"));

    // A pod IP: nothing routes it until the registry's lease says whose it is.
    let pod_url = format!("http://{POD_IP}:{METRICS_PORT}/metrics");
    let (_, code, _) = curl(&stage.cloud, &["-x", &door, &pod_url]);
    assert_eq!(code, "503", "no lease holds the pod IP yet");
    router.upsert_lease(LeaseRoute { node: NODE.into(), address: NODE_IP, subnet: net(POD_SUBNET), cloud: false });
    let (_, code, body) = curl(&stage.cloud, &["-x", &door, &pod_url]);
    assert_eq!((code.as_str(), body.as_str()), ("200", "pod metrics /metrics\n"));

    // Refusals: a port the agent does not allow (no port: 80), a node nobody
    // serves, a Host that is no address at all.
    for (host, want) in [
        (format!("{NODE_IP}:22"), "403"),
        (NODE_IP.to_string(), "403"),
        ("edge-9:10255".to_string(), "503"),
        ("[::1".to_string(), "400"),
    ] {
        let (_, code, body) = curl(&stage.cloud, &["-H", &format!("Host: {host}"), &format!("{door}/x")]);
        assert_eq!(code, want, "Host {host}: {body}");
    }
    assert_eq!(metrics.refused_port.load(Ordering::Relaxed), 2);
    // The lease is gone: so is the route.
    router.remove_lease(net(POD_SUBNET));
    assert_eq!(curl(&stage.cloud, &["-x", &door, &pod_url]).1, "503");
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn a_cloud_pod_pulls_an_edge_pods_metrics_through_dnat_and_the_tunnel() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    // A pod on the cloud node (Prometheus), routed through the cloud node.
    let prometheus = NetNs::new().unwrap();
    let _pod_link = VethPair::new((Some(&stage.cloud), "pod0"), (Some(&prometheus), "eth0")).unwrap();
    stage.cloud.ip(&["addr", "add", "10.60.0.1/24", "dev", "pod0"]).unwrap();
    stage.cloud.ip(&["link", "set", "pod0", "up"]).unwrap();
    prometheus.ip(&["addr", "add", "10.60.0.2/24", "dev", "eth0"]).unwrap();
    prometheus.ip(&["link", "set", "eth0", "up"]).unwrap();
    prometheus.ip(&["route", "add", "default", "via", "10.60.0.1"]).unwrap();

    let router = Arc::new(Router::default());
    router.upsert_lease(LeaseRoute { node: NODE.into(), address: NODE_IP, subnet: net(POD_SUBNET), cloud: false });
    // A registry that wrongly gives this node another node's subnet (stale
    // or forged): the agent, which knows its own subnet, is the last word.
    router.upsert_lease(LeaseRoute { node: NODE.into(), address: NODE_IP, subnet: net(OTHER_SUBNET), cloud: false });
    let _server = stage.server(router.clone());
    let rules = [(10250, DNAT_TLS_PORT), (10255, DNAT_PLAIN_PORT), (METRICS_PORT, DNAT_PLAIN_PORT)];
    let doors = stage.dnat_doors_for(router.clone(), &rules, Scope::AllNamespaces);
    doors.maps().set_edge_subnets([net(POD_SUBNET), net(OTHER_SUBNET)]).unwrap();
    let _edge_http = edge_http(&stage);
    let metrics = Arc::new(AgentMetrics::default());
    let _agent = stage.agent(pod_agent_config(&stage), metrics.clone());
    wait_for("the agent's link", Duration::from_secs(10), || !router.nodes().is_empty());

    // curl runs in the pod's namespace, in the DNAT cgroup. (Not this whole
    // process: the agent's own dials, in the edge namespace here, would be
    // redirected too — on a real edge node no DNAT is attached.)
    let pull = |url: &str| curl_in(Some(&doors.cgroup), &prometheus, &[url]);
    let (_, code, body) = pull(&format!("http://{POD_IP}:{METRICS_PORT}/metrics"));
    assert_eq!((code.as_str(), body.as_str()), ("200", "pod metrics /metrics\n"));
    let (_, code, body) = pull(&format!("http://{NODE_IP}:10255/metrics/cadvisor"));
    assert_eq!((code.as_str(), body.as_str()), ("200", "kubelet /metrics/cadvisor\n"), "kubelet's read-only port");
    // The other node's pod: the server sends it to this node's agent (per
    // the bad lease), which refuses it; the client gets no answer.
    let (ok, code, _) = pull(&format!("http://{OTHER_POD}:{METRICS_PORT}/metrics"));
    assert!(!ok && code == "000", "{code}");
    assert_eq!(metrics.refused_address.load(Ordering::Relaxed), 1);
    assert_eq!((doors.redirected(METRICS_PORT), doors.redirected(10255)), (2, 1));
}

/// Grants `node` its lease in the embedded registry at `db` (what its netd
/// would do), the subnet it asks for.
fn lease_in(db: &Path, node: &str, public_ip: Ipv4Addr, subnet: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut registry = EmbeddedRegistry::open(db, Duration::from_millis(50));
        let config = registry.network_config().await.unwrap();
        let request = LeaseRequest {
            node: node.into(),
            public_ip,
            vtep_mac: netd::model::MacAddr([0x0e, 0, 0, 0, 0, 7]),
            previous_subnet: Some(net(subnet)),
        };
        let lease = registry.acquire_lease(&config, &request).await.unwrap();
        assert_eq!(lease.lease.subnet, net(subnet));
    });
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn the_tunnel_server_process_routes_pod_ips_by_the_registrys_leases() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let stage = Stage::new();
    let db = stage.pki.dir.path().join("registry.db");
    let config = NetworkConfig { network: net("10.244.0.0/16"), subnet_len: 24, vni: 1 };
    EmbeddedRegistry::create(&db, &config).unwrap();
    lease_in(&db, NODE, NODE_IP, POD_SUBNET);
    let dir = stage.pki.dir.path();
    // A node certificate with no IP SAN: routing comes from the lease alone.
    stage.pki.ca.issue_node(NODE, &[], DAY).unwrap().write(dir, "node").unwrap();
    let (cert_dir, agents) = (dir.to_str().unwrap(), format!("{CLOUD_IP}:{AGENT_PORT}"));
    let door_addr = format!("{CLOUD_IP}:{DNAT_PLAIN_PORT}");
    let registry = format!("embedded:{}", db.display());
    let _server = spawn_netd_cloud(
        &stage.cloud.path(),
        &[
            "tunnel-server",
            "--cert-dir",
            cert_dir,
            "--agents-listen",
            &agents,
            "--connect-listen",
            &format!("{CLOUD_IP}:10265"),
            "--dnat-listen",
            "",
            "--http-listen",
            &door_addr,
            "--host-routing-sources",
            &format!("{CLOUD_IP}/32"),
            "--metrics-listen",
            "127.0.0.1:10266",
            "--registry",
            &registry,
        ],
    );
    let _edge_http = edge_http(&stage);
    let node_ip = NODE_IP.to_string();
    let _agent = spawn_netd(
        &stage.edge.path(),
        &[
            "tunnel-agent",
            "--server",
            &agents,
            "--cert-dir",
            cert_dir,
            "--node-ip",
            &node_ip,
            "--pod-subnet",
            POD_SUBNET,
            "--extra-ports",
            &METRICS_PORT.to_string(),
        ],
    );
    let door = format!("http://{door_addr}");
    let pod_url = format!("http://{POD_IP}:{METRICS_PORT}/metrics");
    wait_for("the pod reachable through the door", Duration::from_secs(20), || {
        curl(&stage.cloud, &["-x", &door, &pod_url]).1 == "200"
    });
    let (_, code, body) = curl(&stage.cloud, &["-x", &door, &format!("http://{NODE_IP}:10255/pods")]);
    assert_eq!((code.as_str(), body.as_str()), ("200", "kubelet /pods\n"), "the node address from the lease");
    // The node leaves the registry: its routes go within a poll or two.
    assert!(EmbeddedRegistry::open(&db, Duration::from_millis(50)).delete_lease(NODE).unwrap());
    wait_for("the route gone with the lease", Duration::from_secs(10), || {
        curl(&stage.cloud, &["-x", &door, &pod_url]).1 == "503"
    });
}
