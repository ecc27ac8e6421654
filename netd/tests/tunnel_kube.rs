//! The edge tunnel under the real kube-apiserver 1.20.2 (SPEC §3, issue
//! 13), both ways it reaches kubelets: its egress selector sends `CONNECT
//! 10.250.0.2:10250` to the tunnel server's CONNECT door; or, without one,
//! it dials 10.250.0.2:10250 itself and the eBPF tunnel DNAT sends the
//! connection to the server's DNAT door. Either way, through the agent it
//! speaks TLS to a kubelet stand-in on the edge, verifying the stand-in's
//! certificate (`--kubelet-certificate-authority`) end to end. The stage is
//! `common/tunnel_stage.rs`: the cloud namespace (tunnel server, etcd,
//! kube-apiserver, kubectl) has no route to the edge node address.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/tunnel_stage.rs"]
mod tunnel_stage;

use std::convert::Infallible;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use netd::testing::{self, KubeApiServer, ServerHost};
use netd::tunnel::agent::AgentMetrics;
use netd::tunnel::certs::{CertificateAuthority, IssuedCert, CA_CERT_FILE};
use netd::tunnel::server::Router;
use serde_json::json;
use tokio::net::TcpListener;
use tunnel_stage::{
    wait_for, Background, DnatDoors, Stage, CLOUD_IP, CONNECT_PORT, DAY, KUBELET_DNAT_RULES, NODE, NODE_IP,
};

const KUBELET_PORT: u16 = 10250;
const POD: &str = "edge-pod";
const CONTAINER: &str = "c";
const LOG_LINES: &str = "2024-01-01T00:00:00Z started on the edge\n2024-01-01T00:00:01Z still here\n";
const METRICS: &str = "# TYPE edge_stand_in_up gauge\nedge_stand_in_up 1\n";

/// Request paths the kubelet stand-in served, in order.
type Seen = Arc<Mutex<Vec<String>>>;

/// A kubelet stand-in on `NODE_IP:10250` in the edge namespace: TLS with
/// `cert` (no client certificate asked: kube-apiserver has none configured
/// for kubelets), HTTP/1.1 on hyper.
fn kubelet(stage: &Stage, cert: &IssuedCert, seen: Seen) -> Background {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert_der().clone()], cert.key_der())
        .unwrap();
    // kube-apiserver's transport offers h2 as well; the stand-in speaks
    // HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    Background::start(&stage.edge.path(), move || async move {
        let listener = TcpListener::bind((NODE_IP, KUBELET_PORT)).await.unwrap();
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                // A refused handshake (the other-CA case) just ends here.
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                    let path = request.uri().path().to_string();
                    seen.lock().unwrap().push(path.clone());
                    let (status, body) = match path.as_str() {
                        "/healthz" => (200, "ok"),
                        "/metrics" => (200, METRICS),
                        p if p.starts_with("/containerLogs/") => (200, LOG_LINES),
                        _ => (404, "404 page not found\n"),
                    };
                    let response =
                        hyper::Response::builder().status(status).body(Full::new(Bytes::from_static(body.as_bytes())));
                    async move { Ok::<_, Infallible>(response.unwrap()) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
            });
        }
    })
}

/// How kube-apiserver reaches the kubelet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KubeletRoute {
    /// Its egress selector sends `CONNECT` to the tunnel server's CONNECT door.
    EgressSelector,
    /// It dials the node address as it would without a tunnel, from inside
    /// the tunnel DNAT's cgroup: the DNAT sends it to a DNAT door.
    Dnat,
}

/// The API server, kubectl's files and what runs on the stage. Fields drop
/// in order: the API server before the tunnel, the stage (namespaces and
/// the certificate files) last.
struct KubeStage {
    server: KubeApiServer,
    kubeconfig: PathBuf,
    agent: Option<Background>,
    _kubelet: Background,
    /// With [`KubeletRoute::Dnat`].
    dnat: Option<DnatDoors>,
    _tunnel: Background,
    router: Arc<Router>,
    seen: Seen,
    files: tempfile::TempDir,
    stage: Stage,
}

impl KubeStage {
    /// The whole stage, with the kubelet stand-in presenting `kubelet_cert`
    /// (`None`: one from the stage's CA for the node address) and
    /// kube-apiserver reaching it by `route`.
    fn new(kubelet_cert: Option<IssuedCert>, route: KubeletRoute) -> Self {
        let stage = Stage::new();
        let router = Arc::new(Router::default());
        let tunnel = stage.server(router.clone());
        let kubelet_cert =
            kubelet_cert.unwrap_or_else(|| stage.pki.ca.issue_server(NODE, &[], &[IpAddr::V4(NODE_IP)], DAY).unwrap());
        let seen = Seen::default();
        let kubelet = kubelet(&stage, &kubelet_cert, seen.clone());
        let agent = stage.agent(stage.agent_config(NODE), Arc::new(AgentMetrics::default()));

        let files = tempfile::tempdir().unwrap();
        let ca = stage.pki.dir.path().join(CA_CERT_FILE);
        let mut flags = vec![
            format!("--kubelet-certificate-authority={}", ca.display()),
            "--kubelet-preferred-address-types=InternalIP".to_string(),
        ];
        let host = ServerHost::in_netns(&stage.cloud, CLOUD_IP);
        let (server, dnat) = match route {
            KubeletRoute::EgressSelector => {
                flags.push(format!("--egress-selector-config-file={}", egress_selector(&stage, &files).display()));
                (KubeApiServer::new_with(host, &flags).unwrap(), None)
            }
            KubeletRoute::Dnat => {
                let doors = stage.dnat_doors(router.clone(), &KUBELET_DNAT_RULES);
                // kube-apiserver is forked while this process is a member of
                // the DNAT cgroup, so it is one too (etcd as well, which dials
                // no node address) and its kubelet connections are redirected.
                let server = {
                    let _in_cgroup = doors.cgroup.join().unwrap();
                    KubeApiServer::new_with(host, &flags).unwrap()
                };
                (server, Some(doors))
            }
        };

        // Node and pod as kubelet and the scheduler would leave them.
        let account = json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "default" } });
        api(&server, "POST", "/api/v1/namespaces/default/serviceaccounts", "application/json", &account);
        let node = json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": NODE } });
        api(&server, "POST", "/api/v1/nodes", "application/json", &node);
        let status = json!({ "status": {
            "addresses": [{ "type": "InternalIP", "address": NODE_IP.to_string() }],
            "daemonEndpoints": { "kubeletEndpoint": { "Port": KUBELET_PORT } } } });
        api(&server, "PATCH", &format!("/api/v1/nodes/{NODE}/status"), "application/merge-patch+json", &status);
        let pod = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": POD },
            "spec": { "nodeName": NODE, "automountServiceAccountToken": false,
                      "containers": [{ "name": CONTAINER, "image": "registry.invalid/pause:3" }] } });
        api(&server, "POST", "/api/v1/namespaces/default/pods", "application/json", &pod);

        let kubeconfig = server.admin_kubeconfig();

        wait_for("the agent's link", Duration::from_secs(10), || router.nodes() == vec![NODE.to_string()]);
        Self {
            server,
            kubeconfig,
            agent: Some(agent),
            _kubelet: kubelet,
            dnat,
            _tunnel: tunnel,
            router,
            seen,
            files,
            stage,
        }
    }

    /// `kubectl args…` in the cloud namespace with the test's kubeconfig;
    /// the output and how long it took.
    fn kubectl(&self, args: &[&str]) -> (Output, Duration) {
        let started = Instant::now();
        let output = Command::new("nsenter")
            // --net only: `ip netns exec` would remount /sys, which nothing here needs.
            .arg(format!("--net={}", self.stage.cloud.path().display()))
            .arg("kubectl")
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--cache-dir={}", self.files.path().join("kube-cache").display()))
            .args(args)
            // A proxy from the environment would take kubectl's requests elsewhere.
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .output()
            .unwrap();
        (output, started.elapsed())
    }

    /// Like [`KubeStage::kubectl`], which must succeed: its stdout.
    fn kubectl_ok(&self, args: &[&str]) -> (String, Duration) {
        let (output, took) = self.kubectl(args);
        assert!(
            output.status.success(),
            "kubectl {args:?} failed: {}\nkube-apiserver log ends:\n{}",
            String::from_utf8_lossy(&output.stderr),
            log_tail(&self.server, 15)
        );
        (String::from_utf8_lossy(&output.stdout).into_owned(), took)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// The egress selector configuration (in `files`) that sends kube-apiserver's
/// `cluster` traffic to the CONNECT door with the stage's `client`
/// certificate (issued by the test CA, which the CONNECT door requires).
fn egress_selector(stage: &Stage, files: &tempfile::TempDir) -> PathBuf {
    let pki = stage.pki.dir.path();
    let egress = files.path().join("egress.yaml");
    std::fs::write(
        &egress,
        format!(
            "apiVersion: apiserver.k8s.io/v1beta1\n\
             kind: EgressSelectorConfiguration\n\
             egressSelections:\n\
             - name: cluster\n  \
               connection:\n    \
                 proxyProtocol: HTTPConnect\n    \
                 transport:\n      \
                   tcp:\n        \
                     url: https://{CLOUD_IP}:{CONNECT_PORT}\n        \
                     tlsConfig:\n          \
                       caBundle: {ca}\n          \
                       clientKey: {key}\n          \
                       clientCert: {cert}\n",
            ca = pki.join(CA_CERT_FILE).display(),
            key = pki.join("client.key").display(),
            cert = pki.join("client.crt").display(),
        ),
    )
    .unwrap();
    egress
}

fn api(server: &KubeApiServer, method: &str, path: &str, content_type: &str, body: &serde_json::Value) {
    let (status, text) = server.api(method, path, Some((content_type, &body.to_string()))).unwrap();
    assert!((200..300).contains(&status), "{method} {path}: HTTP {status}: {text}");
}

fn log_tail(server: &KubeApiServer, lines: usize) -> String {
    let log = server.log();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn kube_apiserver_egress_selector_reaches_the_edge_kubelet_through_the_tunnel() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let started = Instant::now();
    let mut kube = KubeStage::new(None, KubeletRoute::EgressSelector);
    eprintln!("    stage, etcd, kube-apiserver, node and pod up in {:?}", started.elapsed());

    let (healthz, took) = kube.kubectl_ok(&["get", "--raw", &format!("/api/v1/nodes/{NODE}/proxy/healthz")]);
    assert_eq!(healthz.trim(), "ok");
    eprintln!("    kubectl get --raw …/proxy/healthz: {took:?}");
    let (metrics, _) = kube.kubectl_ok(&["get", "--raw", &format!("/api/v1/nodes/{NODE}/proxy/metrics")]);
    assert!(metrics.contains("edge_stand_in_up 1"), "{metrics}");
    let (logs, took) = kube.kubectl_ok(&["logs", POD]);
    assert_eq!(logs, LOG_LINES);
    eprintln!("    kubectl logs: {took:?}");

    let seen = kube.seen();
    let log_path = format!("/containerLogs/default/{POD}/{CONTAINER}");
    for path in ["/healthz", "/metrics", log_path.as_str()] {
        assert!(seen.iter().any(|p| p == path), "the kubelet stand-in never served {path}: {seen:?}");
    }
    // kube-apiserver keeps its kubelet connection alive: three requests may
    // share one CONNECT stream, which is still open; its bytes are counted
    // as they pass all the same.
    let metrics = &kube.router.metrics;
    eprintln!("    tunnel server after the three requests: {metrics:?}");
    assert!(metrics.streams_total.load(Ordering::Relaxed) >= 1, "{metrics:?}");
    assert!(metrics.streams_open.load(Ordering::Relaxed) >= 1, "{metrics:?}");
    assert!(metrics.bytes_to_edge.load(Ordering::Relaxed) > 0, "{metrics:?}");
    assert!(metrics.bytes_from_edge.load(Ordering::Relaxed) > 0, "{metrics:?}");
    assert_eq!(metrics.no_agent.load(Ordering::Relaxed), 0, "{metrics:?}");

    // No agent: the CONNECT door answers 503 at once, so kubectl fails at
    // once too (1.20 ignores the dial context: a hanging door would hang it).
    drop(kube.agent.take());
    wait_for("the link to go", Duration::from_secs(20), || kube.router.nodes().is_empty());
    let (output, took) = kube.kubectl(&["get", "--raw", &format!("/api/v1/nodes/{NODE}/proxy/healthz")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("    without the agent, after {took:?}, kubectl says: {}", stderr.trim());
    assert!(
        !output.status.success(),
        "kubectl succeeded without an agent: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    // kube-apiserver passes the door's status on in its message
    // ("… while dialing 10.250.0.2:10250, code 503: 503 Service Unavailable").
    assert!(stderr.contains(&format!("while dialing {NODE_IP}:{KUBELET_PORT}, code 503")), "{stderr}");
    assert!(took < Duration::from_secs(5), "kubectl took {took:?} to fail without an agent");
    // The API itself turns the door's 503 into a 500 (InternalError)
    // Status carrying the same message: what kubectl printed above.
    let started = Instant::now();
    let (status, body) = kube.server.api("GET", &format!("/api/v1/nodes/{NODE}/proxy/healthz"), None).unwrap();
    eprintln!("    the API itself: HTTP {status} after {:?}", started.elapsed());
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("code 503: 503 Service Unavailable"), "{body}");
    let metrics = &kube.router.metrics;
    eprintln!("    tunnel server after the agent left: {metrics:?}");
    assert!(metrics.no_agent.load(Ordering::Relaxed) >= 1, "{metrics:?}");
    assert_eq!(metrics.streams_open.load(Ordering::Relaxed), 0, "a stream outlived its agent: {metrics:?}");
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn kube_apiserver_refuses_a_kubelet_certificate_from_another_ca_through_the_tunnel() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    // Right node address, wrong issuer: only a TLS session that runs from
    // kube-apiserver to the stand-in itself can tell.
    let stranger = CertificateAuthority::generate("some other CA", DAY).unwrap();
    let cert = stranger.issue_server(NODE, &[], &[IpAddr::V4(NODE_IP)], DAY).unwrap();
    let started = Instant::now();
    let kube = KubeStage::new(Some(cert), KubeletRoute::EgressSelector);
    eprintln!("    stage, etcd, kube-apiserver, node and pod up in {:?}", started.elapsed());

    let (output, _) = kube.kubectl(&["get", "--raw", &format!("/api/v1/nodes/{NODE}/proxy/healthz")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("    kubectl says: {}", stderr.trim());
    assert!(!output.status.success(), "kube-apiserver accepted another CA's kubelet certificate");
    let (output, _) = kube.kubectl(&["logs", POD]);
    assert!(!output.status.success(), "kubectl logs went through another CA's kubelet certificate");
    let both = format!("{stderr}\n{}\n{}", String::from_utf8_lossy(&output.stderr), kube.server.log());
    assert!(both.contains("x509: certificate signed by unknown authority"), "{both}");
    // The stream did go through the tunnel; it is TLS that refused it.
    assert!(kube.router.metrics.streams_total.load(Ordering::Relaxed) >= 1);
    assert!(kube.seen().is_empty(), "the stand-in served a request: {:?}", kube.seen());
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root: cargo xtask test, or --features privileged-tests as root"
)]
fn kube_apiserver_without_egress_selector_reaches_the_edge_kubelet_through_the_dnat() {
    let Some(_kernel) = testing::privileged().unwrap() else { return };
    let started = Instant::now();
    let kube = KubeStage::new(None, KubeletRoute::Dnat);
    eprintln!("    stage, DNAT, etcd, kube-apiserver, node and pod up in {:?}", started.elapsed());

    let (metrics, took) = kube.kubectl_ok(&["get", "--raw", &format!("/api/v1/nodes/{NODE}/proxy/metrics")]);
    assert!(metrics.contains("edge_stand_in_up 1"), "{metrics}");
    eprintln!("    kubectl get --raw …/proxy/metrics: {took:?}");
    let (logs, took) = kube.kubectl_ok(&["logs", POD]);
    assert_eq!(logs, LOG_LINES);
    eprintln!("    kubectl logs: {took:?}");

    let seen = kube.seen();
    let log_path = format!("/containerLogs/default/{POD}/{CONTAINER}");
    for path in ["/metrics", log_path.as_str()] {
        assert!(seen.iter().any(|p| p == path), "the kubelet stand-in never served {path}: {seen:?}");
    }
    // kube-apiserver dialled the node address itself: the DNAT redirected
    // each of its kubelet connections, and each became one tunnel stream
    // to the node that address belongs to.
    let doors = kube.dnat.as_ref().unwrap();
    let redirected = doors.redirected(KUBELET_PORT);
    let metrics = &kube.router.metrics;
    eprintln!("    {redirected} connection(s) redirected; tunnel server: {metrics:?}");
    assert!(redirected >= 1, "no kubelet connection was redirected");
    wait_for("a tunnel stream per redirected connection", Duration::from_secs(5), || {
        metrics.streams_total.load(Ordering::Relaxed) == redirected
    });
    assert!(doors.dnat.stats().unwrap().accepted_with_origin >= redirected);
    assert_eq!(metrics.not_redirected.load(Ordering::Relaxed), 0, "{metrics:?}");
    assert_eq!(metrics.no_agent.load(Ordering::Relaxed), 0, "{metrics:?}");
    assert_eq!(doors.redirected(10255), 0, "kube-apiserver dialled the read-only port");
}
