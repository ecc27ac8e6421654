//! The edge hub (`netd hub`, issue 25) against the real kube-apiserver
//! 1.20.2 with `--authorization-mode=Node,RBAC` and NodeRestriction, the
//! real `kubectl` as its client with the node's own client certificate,
//! the hub as the real binary:
//!
//! 1. online: get, list and watch through the hub equal the direct
//!    answers; objects land in the cache (0600 files, 0700 directories);
//!    misses are counted;
//! 2. offline (kube-apiserver stopped): the node's pods, its Node, the
//!    ConfigMap and Secret its pod uses come from the cache, identical to
//!    the online answers, kubectl's discovery too; a write gets 503; the
//!    gauges and counters say so;
//! 3. back online: a pod deleted and one created while the hub was cut off
//!    (a relay the test cuts, the API server still up) → the next list has
//!    exactly the new set, the deleted pod's file is gone; a watch held
//!    open offline ends when the cloud is back;
//! 4. the wrong party: another node's certificate, another CA's, none, a
//!    request for another node's pods → refused, counted, nothing cached;
//!    a non-loopback --listen is refused at start;
//! 5. bad input: a truncated and a garbage cache file are skipped (the log
//!    names them), never served; a hub whose cache is on a full tmpfs (in a
//!    mount namespace of its own) keeps serving and counts failed writes.
//!
//! One cluster for the whole story (clusters are slow to start).
//!
//! A second test: the hub follows the node's autonomy annotation
//! (`--cache=auto`): a pass-through until the Node is annotated, then
//! caching and answering offline within a bounded time, across a restart
//! with the cloud away, and back to a pass-through with its cache removed
//! when the annotation goes; `--cache=false` overrides the annotation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netd::testing::{KubeApiServer, KubeCluster};
use netd::tunnel::certs::CertificateAuthority;
use serde_json::{json, Value};

const NODE: &str = "edge-1";
const DAY: Duration = Duration::from_secs(24 * 3600);
const MY_PODS: &str = "/api/v1/pods?fieldSelector=spec.nodeName%3Dedge-1";

/// A node credential: certificate and key apart (kubectl, curl) and
/// together (as the kubelet keeps it; what the hub reads).
struct Cred {
    cert: PathBuf,
    key: PathBuf,
    combined: PathBuf,
}

impl Cred {
    fn issue(ca: &CertificateAuthority, node: &str, dir: &Path, stem: &str) -> Self {
        let issued = ca.issue_node(node, &[], DAY).unwrap();
        let (cert, key, combined) =
            (dir.join(format!("{stem}.crt")), dir.join(format!("{stem}.key")), dir.join(format!("{stem}.pem")));
        std::fs::write(&cert, issued.cert_pem()).unwrap();
        std::fs::write(&key, issued.key_pem()).unwrap();
        std::fs::write(&combined, format!("{}{}", issued.cert_pem(), issued.key_pem())).unwrap();
        Self { cert, key, combined }
    }
}

/// A TCP relay to kube-apiserver the test can cut: the hub's "link to the
/// cloud". While cut, connections are closed at once and live ones are
/// shut down.
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Mutex::new(Vec::new()));
        let (cut2, live2) = (cut.clone(), live.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if cut2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else { continue };
                {
                    let mut live = live2.lock().unwrap();
                    live.push(client.try_clone().unwrap());
                    live.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { port, cut, live }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for stream in self.live.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `netd hub` process; killed on drop.
struct Hub {
    child: Child,
    port: u16,
    metrics_port: u16,
    /// The cache directory as this process sees it (through
    /// `/proc/<pid>/root` when the hub has a mount namespace of its own).
    cache: PathBuf,
    log: PathBuf,
    kubeconfig: PathBuf,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Hub {
    /// Starts `netd hub` for edge-1 through `server`; with `tmpfs_size`,
    /// inside `unshare --mount` with its cache dir on a tmpfs of that size.
    fn start(dir: &Path, name: &str, server: &str, api: &KubeApiServer, cred: &Cred, tmpfs: Option<&str>) -> Self {
        Self::start_with(dir, name, server, api, cred, tmpfs, "true")
    }

    fn start_with(
        dir: &Path,
        name: &str,
        server: &str,
        api: &KubeApiServer,
        cred: &Cred,
        tmpfs: Option<&str>,
        caching: &str,
    ) -> Self {
        let (port, metrics_port) = (free_port(), free_port());
        let cache = dir.join(format!("{name}-cache"));
        let log = dir.join(format!("{name}.log"));
        let netd = env!("CARGO_BIN_EXE_netd");
        let args = [
            "hub".to_string(),
            format!("--node-name={NODE}"),
            format!("--server={server}"),
            format!("--ca-file={}", api.ca_cert_path().display()),
            format!("--client-cert={}", cred.combined.display()),
            format!("--listen=127.0.0.1:{port}"),
            format!("--metrics-listen=127.0.0.1:{metrics_port}"),
            format!("--cache-dir={}", cache.display()),
            "--probe-interval=1s".to_string(),
            "--upstream-timeout=3s".to_string(),
            "--log=debug".to_string(),
            format!("--cache={caching}"),
        ];
        let mut command = match tmpfs {
            None => {
                let mut c = Command::new(netd);
                c.args(&args);
                c
            }
            Some(size) => {
                std::fs::create_dir_all(&cache).unwrap();
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(format!("mount -t tmpfs -o size={size},mode=0700 netd-hub-test \"$0\" && exec \"$@\""))
                    .arg(&cache)
                    .arg(netd)
                    .args(&args);
                c
            }
        };
        let log_file = std::fs::File::create(&log).unwrap();
        let child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file).spawn().unwrap();
        let pid = child.id();
        let mut hub = Self {
            child,
            port,
            metrics_port,
            cache: cache.clone(),
            log,
            kubeconfig: dir.join(format!("{name}.kubeconfig")),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while get_metrics(metrics_port).is_none() {
            if let Ok(Some(status)) = hub.child.try_wait() {
                panic!("netd hub exited with {status}: {}", hub.log_text());
            }
            assert!(Instant::now() < deadline, "netd hub did not start: {}", hub.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
        if tmpfs.is_some() {
            hub.cache = PathBuf::from(format!("/proc/{pid}/root{}", cache.display()));
        }
        // The hub's CA, outside any namespace of the hub's, for kubectl.
        let hub_ca = dir.join(format!("{name}-ca.crt"));
        std::fs::copy(hub.cache.join("pki/ca.crt"), &hub_ca).unwrap();
        std::fs::write(&hub.kubeconfig, kubeconfig(&format!("https://127.0.0.1:{port}"), &hub_ca, cred)).unwrap();
        hub
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    fn ca(&self) -> PathBuf {
        self.cache.join("pki/ca.crt")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        get_metrics(self.metrics_port).expect("the hub's metrics answer")
    }

    fn metric(&self, name: &str) -> f64 {
        metric(&self.metrics(), name)
    }

    fn wait_metric(&self, name: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.metric(name) != want {
            assert!(Instant::now() < deadline, "{name} never became {want}:\n{}", self.metrics());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn object(&self, resource_dir: &str, namespace: &str, name: &str) -> PathBuf {
        self.cache.join("objects").join(resource_dir).join(namespace).join(format!("{name}.obj"))
    }
}

fn get_metrics(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// The value of the sample named exactly `name` (labels included); 0 when absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn kubeconfig(server: &str, ca: &Path, cred: &Cred) -> String {
    format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n- name: node\n  user:\n    client-certificate: {cert}\n    client-key: {key}\n\
         contexts:\n- name: node@c\n  context:\n    cluster: c\n    user: node\n    namespace: default\n\
         current-context: node@c\n",
        ca = ca.display(),
        cert = cred.cert.display(),
        key = cred.key.display(),
    )
}

/// `kubectl --kubeconfig <kubeconfig> args…` with its own discovery cache
/// directory (so discovery goes through the hub): stdout, or stderr as the error.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String, String> {
    let cache = kubeconfig.with_extension("kubectl-cache");
    let output = Command::new("kubectl")
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--cache-dir={}", cache.display()))
        .arg("--request-timeout=20s")
        .args(args)
        .output()
        .unwrap();
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn raw(kubeconfig: &Path, path: &str) -> Value {
    let text = kubectl(kubeconfig, &["get", "--raw", path]).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// curl against the hub: HTTP status and body, or curl's error.
fn curl(url: &str, ca: &Path, cred: Option<&Cred>, method: &str, body: Option<&str>) -> Result<(u16, String), String> {
    let mut command = Command::new("curl");
    command.args(["-sS", "--noproxy", "*", "--max-time", "20", "--cacert"]).arg(ca).args(["-X", method]);
    if let Some(cred) = cred {
        command.arg("--cert").arg(&cred.cert).arg("--key").arg(&cred.key);
    }
    if let Some(body) = body {
        command.args(["-H", "Content-Type: application/json", "--data-binary", body]);
    }
    let output = command.args(["-w", "\n%{http_code}", url]).output().unwrap();
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    Ok((code.trim().parse().unwrap(), body.to_string()))
}

fn admin(api: &KubeApiServer, method: &str, path: &str, body: Option<Value>) -> Value {
    let text = body.map(|b| b.to_string());
    let kind = if method == "PATCH" { "application/merge-patch+json" } else { "application/json" };
    let (status, reply) = api.api(method, path, text.as_deref().map(|t| (kind, t))).unwrap();
    assert!((200..300).contains(&status), "{method} {path}: HTTP {status}: {reply}");
    serde_json::from_str(&reply).unwrap()
}

/// The Node edge-1, the default ServiceAccount, and the ConfigMap and
/// Secret its pods use.
fn create_node_and_its_objects(api: &KubeApiServer) {
    admin(api, "POST", "/api/v1/nodes", Some(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})));
    admin(
        api,
        "POST",
        "/api/v1/namespaces/default/serviceaccounts",
        Some(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}})),
    );
    admin(
        api,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        Some(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app-config"}, "data": {"mode": "edge"}}),
        ),
    );
    admin(
        api,
        "POST",
        "/api/v1/namespaces/default/secrets",
        Some(
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app-secret"}, "stringData": {"password": "s3cret"}}),
        ),
    );
}

fn create_pod(api: &KubeApiServer, name: &str, node: &str) {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": "web" } },
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "c", "image": "busybox",
                "env": [{ "name": "PASSWORD", "valueFrom": { "secretKeyRef": { "name": "app-secret", "key": "password" } } }],
                "volumeMounts": [{ "name": "config", "mountPath": "/etc/app" }],
            }],
            "volumes": [{ "name": "config", "configMap": { "name": "app-config" } }],
        },
    });
    admin(api, "POST", "/api/v1/namespaces/default/pods", Some(pod));
}

fn names(list: &Value) -> Vec<String> {
    list["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap().to_string()).collect()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn has_tools() -> Option<&'static str> {
    for tool in ["kubectl", "curl", "unshare", "nsenter"] {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().unwrap();
        if !found.status.success() {
            return Some(tool);
        }
    }
    None
}

#[test]
fn the_hub_serves_the_node_from_its_cache_while_the_cloud_is_away() {
    let builder = KubeCluster::builder().rbac(true).node_restriction(true);
    if !builder.binaries_available().unwrap() {
        eprintln!("skipped: kube-apiserver is not built (`cargo xtask setup` builds it)");
        return;
    }
    if let Some(tool) = has_tools() {
        eprintln!("skipped: {tool} is not installed");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the full-disk case mounts a tmpfs (needs root)");
        return;
    }
    let mut cluster = builder.start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cred = Cred::issue(cluster.api().ca(), NODE, dir.path(), "edge-1");
    let target: SocketAddr = cluster.api().url().trim_start_matches("https://").parse().unwrap();
    let relay = Relay::start(target);

    {
        let api = cluster.api();
        create_node_and_its_objects(api);
        create_pod(api, "web-1", NODE);
        create_pod(api, "web-2", NODE);
        create_pod(api, "other-1", "edge-2");
    }
    let hub = Hub::start(dir.path(), "hub", &relay.url(), cluster.api(), &cred, None);
    let direct = dir.path().join("direct.kubeconfig");
    std::fs::write(&direct, kubeconfig(&cluster.api().url(), &cluster.api().ca_cert_path(), &cred)).unwrap();
    hub.wait_metric("netd_hub_cloud_reachable", 1.0);

    // 1. Online: the hub answers what kube-apiserver answers.
    let reads = [
        MY_PODS.to_string(),
        format!("/api/v1/nodes/{NODE}"),
        "/api/v1/namespaces/default/configmaps/app-config".to_string(),
        "/api/v1/namespaces/default/secrets/app-secret".to_string(),
        "/api/v1/namespaces/default/pods/web-1".to_string(),
        "/api/v1/namespaces/default/configmaps?fieldSelector=metadata.name%3Dapp-config".to_string(),
        "/api/v1/services".to_string(),
    ];
    for path in &reads {
        let (through, straight) = (raw(&hub.kubeconfig, path), raw(&direct, path));
        assert_eq!(through, straight, "GET {path} through the hub differs from the direct answer");
    }
    let pods = raw(&hub.kubeconfig, MY_PODS);
    assert_eq!(names(&pods), ["web-1", "web-2"]);
    // A watch from the list's resourceVersion sees what kube-apiserver reports.
    admin(
        cluster.api(),
        "PATCH",
        "/api/v1/namespaces/default/pods/web-2",
        Some(json!({"metadata": {"labels": {"v": "2"}}})),
    );
    let watch = format!(
        "{MY_PODS}&watch=true&timeoutSeconds=2&resourceVersion={}",
        pods["metadata"]["resourceVersion"].as_str().unwrap()
    );
    let events = |kubeconfig: &Path| -> Vec<(String, String, String)> {
        let text = kubectl(kubeconfig, &["get", "--raw", &watch]).unwrap();
        serde_json::Deserializer::from_str(&text)
            .into_iter::<Value>()
            .map(|e| {
                let e = e.unwrap();
                let name = e["object"]["metadata"]["name"].as_str().unwrap_or("").to_string();
                let rv = e["object"]["metadata"]["resourceVersion"].as_str().unwrap_or("").to_string();
                (e["type"].as_str().unwrap().to_string(), name, rv)
            })
            .collect()
    };
    let (through, straight) = (events(&hub.kubeconfig), events(&direct));
    assert_eq!(through, straight);
    assert_eq!(through.len(), 1, "{through:?}");
    assert_eq!((through[0].0.as_str(), through[0].1.as_str()), ("MODIFIED", "web-2"));
    let web2 = hub.object("core_v1_pods", "default", "web-2");
    let cached: String = std::fs::read_to_string(&web2).unwrap();
    assert!(cached.contains(r#""v":"2""#), "the watch event reached the cache: {cached}");
    // kubectl's own way (discovery, then a list) through the hub.
    let listed =
        kubectl(&hub.kubeconfig, &["get", "pods", "-o", "json", "--field-selector", "spec.nodeName=edge-1"]).unwrap();
    assert_eq!(names(&serde_json::from_str(&listed).unwrap()), ["web-1", "web-2"]);
    // The cache: one file per object, 0600 in 0700 directories.
    for path in [
        hub.object("core_v1_pods", "default", "web-1"),
        hub.object("core_v1_nodes", "@cluster", NODE),
        hub.object("core_v1_configmaps", "default", "app-config"),
        hub.object("core_v1_secrets", "default", "app-secret"),
    ] {
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        assert_eq!(mode(path.parent().unwrap()), 0o700, "{}", path.display());
    }
    assert_eq!(mode(&hub.cache), 0o700);
    assert_eq!(mode(&hub.cache.join("pki/ca.key")), 0o600);
    assert!(!hub.object("core_v1_pods", "default", "other-1").exists(), "another node's pod is never cached");
    assert!(hub.metric("netd_hub_cache_misses_total{resource=\"pods\"}") >= 3.0);
    assert_eq!(hub.metric("netd_hub_cache_hits_total{resource=\"pods\"}"), 0.0);
    assert!(hub.metric("netd_hub_cached_objects") >= 6.0);
    assert!(hub.metric("netd_hub_cached_bytes") > 1000.0);
    eprintln!("1. online: reads through the hub equal direct ones; cached with 0600/0700");

    // 2. Offline: kube-apiserver stopped.
    let online: Vec<Value> = reads.iter().map(|path| raw(&hub.kubeconfig, path)).collect();
    cluster.api_mut().stop().unwrap();
    let started = Instant::now();
    for (path, answer) in reads.iter().zip(&online) {
        assert_eq!(&raw(&hub.kubeconfig, path), answer, "offline GET {path} differs from the online answer");
    }
    eprintln!("   the first offline answers took {:?}", started.elapsed());
    hub.wait_metric("netd_hub_cloud_reachable", 0.0);
    let listed = kubectl(&hub.kubeconfig, &["get", "pods", "-o", "json", "--field-selector", "spec.nodeName=edge-1"])
        .expect("kubectl (discovery and list) works offline through the hub");
    assert_eq!(names(&serde_json::from_str(&listed).unwrap()), ["web-1", "web-2"]);
    let (code, body) = curl(
        &hub.url("/api/v1/namespaces/default/configmaps"),
        &hub.ca(),
        Some(&cred),
        "POST",
        Some(r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"}}"#),
    )
    .unwrap();
    assert_eq!(code, 503, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["kind"], "Status");
    // An offline watch is accepted, sends nothing, ends at its timeout.
    let started = Instant::now();
    let text = kubectl(&hub.kubeconfig, &["get", "--raw", &format!("{MY_PODS}&watch=true&timeoutSeconds=2")]).unwrap();
    assert!(text.trim().is_empty() && started.elapsed() >= Duration::from_secs(2), "{text:?}");
    // Never listed: not answered as if empty.
    let (code, _) =
        curl(&hub.url("/api/v1/namespaces/kube-system/configmaps"), &hub.ca(), Some(&cred), "GET", None).unwrap();
    assert_eq!(code, 503);
    assert!(hub.metric("netd_hub_requests_served_offline_total") >= 8.0, "{}", hub.metrics());
    assert!(hub.metric("netd_hub_cache_hits_total{resource=\"pods\"}") >= 2.0);
    eprintln!("2. offline: pods, Node, ConfigMap, Secret from the cache, identical; writes 503");

    // 3. Back online, after changes the hub did not see: the API server
    // comes back, the hub's link is cut, pods change, the link is back.
    cluster.api_mut().start().unwrap();
    hub.wait_metric("netd_hub_cloud_reachable", 1.0);
    relay.cut();
    hub.wait_metric("netd_hub_cloud_reachable", 0.0);
    admin(cluster.api(), "DELETE", "/api/v1/namespaces/default/pods/web-2?gracePeriodSeconds=0", None);
    create_pod(cluster.api(), "web-3", NODE);
    assert_eq!(names(&raw(&hub.kubeconfig, MY_PODS)), ["web-1", "web-2"], "offline: the cache as it was");
    // A watch held open offline ends when the cloud is back.
    let held = {
        let kubeconfig = hub.kubeconfig.clone();
        let path = format!("{MY_PODS}&watch=true&timeoutSeconds=60");
        std::thread::spawn(move || {
            let started = Instant::now();
            let _ = kubectl(&kubeconfig, &["get", "--raw", &path]);
            started.elapsed()
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    relay.restore();
    hub.wait_metric("netd_hub_cloud_reachable", 1.0);
    let held_for = held.join().unwrap();
    assert!(held_for < Duration::from_secs(20), "the offline watch ended with the cloud's return: {held_for:?}");
    assert_eq!(names(&raw(&hub.kubeconfig, MY_PODS)), ["web-1", "web-3"], "exactly the new set");
    assert!(!hub.object("core_v1_pods", "default", "web-2").exists(), "the deleted pod's file is gone");
    assert!(hub.object("core_v1_pods", "default", "web-3").exists());
    eprintln!("3. back online: deleted pod gone, new pod listed; the held watch ended after {held_for:?}");

    // 4. The wrong party.
    let refused = hub.metric("netd_hub_refused_total{reason=\"wrong_identity\"}");
    let edge2 = Cred::issue(cluster.api().ca(), "edge-2", dir.path(), "edge-2");
    let (code, body) = curl(&hub.url(MY_PODS), &hub.ca(), Some(&edge2), "GET", None).unwrap();
    assert_eq!(code, 403, "{body}");
    assert_eq!(hub.metric("netd_hub_refused_total{reason=\"wrong_identity\"}"), refused + 1.0);
    let stranger_ca = CertificateAuthority::generate("stranger", DAY).unwrap();
    let stranger = Cred::issue(&stranger_ca, NODE, dir.path(), "stranger");
    let outcome = curl(&hub.url(MY_PODS), &hub.ca(), Some(&stranger), "GET", None);
    assert!(!matches!(outcome, Ok((200, _))), "another CA's certificate: {outcome:?}");
    assert!(hub.metric("netd_hub_refused_total{reason=\"untrusted_certificate\"}") >= 1.0);
    let (code, _) = curl(&hub.url(MY_PODS), &hub.ca(), None, "GET", None).unwrap();
    assert_eq!(code, 403);
    assert_eq!(hub.metric("netd_hub_refused_total{reason=\"no_certificate\"}"), 1.0);
    for path in [
        "/api/v1/pods?fieldSelector=spec.nodeName%3Dedge-2".to_string(),
        "/api/v1/pods".to_string(),
        "/api/v1/namespaces/default/pods/other-1".to_string(),
    ] {
        let (code, body) = curl(&hub.url(&path), &hub.ca(), Some(&cred), "GET", None).unwrap();
        assert_eq!(code, 403, "{path}: {body}");
    }
    assert_eq!(hub.metric("netd_hub_refused_total{reason=\"other_nodes_data\"}"), 3.0);
    assert!(!hub.object("core_v1_pods", "default", "other-1").exists(), "nothing of another node is cached");
    let output = Command::new(env!("CARGO_BIN_EXE_netd"))
        .args(["hub", "--node-name=edge-1", "--server=https://127.0.0.1:1", "--ca-file=/nonexistent"])
        .args(["--listen=0.0.0.0:10261", "--cache-dir"])
        .arg(dir.path().join("never"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("not a loopback address"), "{stderr}");
    eprintln!("4. the wrong party: refused and counted, nothing cached; non-loopback --listen refused");

    // 5a. Corrupt files: skipped, named in the log, never served.
    let web1 = hub.object("core_v1_pods", "default", "web-1");
    let bytes = std::fs::read(&web1).unwrap();
    std::fs::write(&web1, &bytes[..bytes.len() - 20]).unwrap();
    let config = hub.object("core_v1_configmaps", "default", "app-config");
    std::fs::write(&config, b"\x00\x13garbage, not a cache file").unwrap();
    relay.cut();
    hub.wait_metric("netd_hub_cloud_reachable", 0.0);
    let corrupt = hub.metric("netd_hub_corrupt_files_skipped_total");
    assert_eq!(names(&raw(&hub.kubeconfig, MY_PODS)), ["web-3"], "the truncated pod is not served");
    let (code, body) =
        curl(&hub.url("/api/v1/namespaces/default/configmaps/app-config"), &hub.ca(), Some(&cred), "GET", None)
            .unwrap();
    assert_eq!(code, 503, "the garbled ConfigMap is not served: {body}");
    assert!(hub.metric("netd_hub_corrupt_files_skipped_total") >= corrupt + 2.0);
    let log = hub.log_text();
    for file in [&web1, &config] {
        assert!(log.contains(&file.display().to_string()), "the log names {}:\n{log}", file.display());
    }
    relay.restore();
    hub.wait_metric("netd_hub_cloud_reachable", 1.0);
    raw(&hub.kubeconfig, MY_PODS);
    raw(&hub.kubeconfig, "/api/v1/namespaces/default/configmaps/app-config");
    assert!(store_decodes(&web1) && store_decodes(&config), "the next answers from the cloud repair the files");
    eprintln!("5a. truncated and garbage files skipped, named in the log, repaired online");

    // 5b. A full disk: a second hub with its cache on a 512 KiB tmpfs in
    // its own mount namespace, filled up after its first answers.
    let full = Hub::start(dir.path(), "full", &relay.url(), cluster.api(), &cred, Some("512k"));
    full.wait_metric("netd_hub_cloud_reachable", 1.0);
    assert_eq!(names(&raw(&full.kubeconfig, MY_PODS)), ["web-1", "web-3"]);
    raw(&full.kubeconfig, "/api/v1/namespaces/default/configmaps/app-config");
    let filler = full.cache.join("filler");
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", filler.display()))
        .args(["bs=4k", "status=none"])
        .status()
        .unwrap();
    create_pod(cluster.api(), "web-4", NODE);
    let before = full.metric("netd_hub_cache_write_failures_total");
    assert_eq!(names(&raw(&full.kubeconfig, MY_PODS)), ["web-1", "web-3", "web-4"], "served with the disk full");
    assert!(full.metric("netd_hub_cache_write_failures_total") > before, "{}", full.metrics());
    assert!(!full.object("core_v1_pods", "default", "web-4").exists());
    relay.cut();
    full.wait_metric("netd_hub_cloud_reachable", 0.0);
    assert_eq!(names(&raw(&full.kubeconfig, MY_PODS)), ["web-1", "web-3"], "offline: what it had");
    assert_eq!(raw(&full.kubeconfig, "/api/v1/namespaces/default/configmaps/app-config")["data"]["mode"], "edge");
    relay.restore();
    eprintln!("5b. disk full: answers still sent, failed writes counted, the cache kept serving offline");
}

fn store_decodes(path: &Path) -> bool {
    netd::hub::store::decode(&std::fs::read(path).unwrap()).is_ok()
}

/// Sets (`Some`) or removes (`None`) the node's autonomy annotation, as
/// `netd-autonomy` does.
fn annotate_autonomy(api: &KubeApiServer, value: Option<&str>) {
    admin(
        api,
        "PATCH",
        &format!("/api/v1/nodes/{NODE}"),
        Some(json!({"metadata": {"annotations": {"node.beta.alibabacloud.com/autonomy": value}}})),
    );
}

/// Waits until the hub's `netd_hub_autonomous` is `want`; how long it took.
fn wait_autonomous(hub: &Hub, want: f64, bound: Duration) -> Duration {
    let started = Instant::now();
    while hub.metric("netd_hub_autonomous") != want {
        assert!(
            started.elapsed() < bound,
            "netd_hub_autonomous never became {want} within {bound:?}:\n{}",
            hub.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

#[test]
fn the_hub_follows_the_nodes_autonomy() {
    let builder = KubeCluster::builder().rbac(true).node_restriction(true);
    if !builder.binaries_available().unwrap() {
        eprintln!("skipped: kube-apiserver is not built (`cargo xtask setup` builds it)");
        return;
    }
    if let Some(tool) = has_tools() {
        eprintln!("skipped: {tool} is not installed");
        return;
    }
    let cluster = builder.start().unwrap();
    let api = cluster.api();
    let dir = tempfile::tempdir().unwrap();
    let cred = Cred::issue(api.ca(), NODE, dir.path(), "edge-1");
    let target: SocketAddr = api.url().trim_start_matches("https://").parse().unwrap();
    let relay = Relay::start(target);
    create_node_and_its_objects(api);
    create_pod(api, "web-1", NODE);
    // The hub probes every second (--probe-interval=1s): it must follow
    // the annotation within a few of them.
    let bound = Duration::from_secs(5);

    // Not annotated: a pass-through. Answers, caches nothing, no offline answers.
    let hub = Hub::start_with(dir.path(), "auto", &relay.url(), api, &cred, None, "auto");
    hub.wait_metric("netd_hub_cloud_reachable", 1.0);
    assert_eq!(hub.metric("netd_hub_autonomous"), 0.0, "a new node is not autonomous");
    let listed = raw(&hub.kubeconfig, MY_PODS);
    assert_eq!(names(&listed), ["web-1"]);
    let listed_rv = listed["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    raw(&hub.kubeconfig, "/api/v1/namespaces/default/secrets/app-secret");
    assert!(!hub.cache.join("objects").exists(), "a pass-through caches nothing");
    assert_eq!(std::fs::read_to_string(hub.cache.join("autonomous")).unwrap(), "false\n");
    assert!(hub.ca().is_file(), "the hub's CA is made either way");
    relay.cut();
    hub.wait_metric("netd_hub_cloud_reachable", 0.0);
    let (code, body) = curl(&hub.url(MY_PODS), &hub.ca(), Some(&cred), "GET", None).unwrap();
    assert_eq!(code, 503, "no offline answers when not autonomous: {body}");
    assert_eq!(hub.metric("netd_hub_requests_served_offline_total"), 0.0);
    relay.restore();
    hub.wait_metric("netd_hub_cloud_reachable", 1.0);
    eprintln!("1. not autonomous: a pass-through, nothing cached, 503 offline");

    // Annotated: caching within the bound; a watch held through the
    // pass-through ends at the flip (its client watches again, cached).
    let held = {
        let kubeconfig = hub.kubeconfig.clone();
        let path = format!("{MY_PODS}&watch=true&timeoutSeconds=60");
        std::thread::spawn(move || {
            let started = Instant::now();
            let _ = kubectl(&kubeconfig, &["get", "--raw", &path]);
            started.elapsed()
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    annotate_autonomy(api, Some("true"));
    let took = wait_autonomous(&hub, 1.0, bound);
    let held_for = held.join().unwrap();
    assert!(held_for < Duration::from_secs(20), "the pass-through watch ended at the flip: {held_for:?}");
    assert_eq!(std::fs::read_to_string(hub.cache.join("autonomous")).unwrap(), "true\n");
    // A reflector that listed through the pass-through watches again from
    // that list's resourceVersion: sent back to list, once, so that the
    // scope gets into the cache.
    let rewatch = hub.url(&format!("{MY_PODS}&watch=true&timeoutSeconds=1&resourceVersion={listed_rv}"));
    let (code, body) = curl(&rewatch, &hub.ca(), Some(&cred), "GET", None).unwrap();
    assert!(code == 410 && body.contains("Expired"), "{code}: {body}");
    let (code, body) = curl(&rewatch, &hub.ca(), Some(&cred), "GET", None).unwrap();
    assert_eq!(code, 200, "only once per scope: {body}");
    assert_eq!(names(&raw(&hub.kubeconfig, MY_PODS)), ["web-1"]);
    raw(&hub.kubeconfig, "/api/v1/namespaces/default/secrets/app-secret");
    raw(&hub.kubeconfig, "/api/v1/namespaces/default/configmaps/app-config");
    assert!(hub.object("core_v1_pods", "default", "web-1").is_file(), "autonomous: cached");
    relay.cut();
    hub.wait_metric("netd_hub_cloud_reachable", 0.0);
    assert_eq!(names(&raw(&hub.kubeconfig, MY_PODS)), ["web-1"], "answered offline");
    assert!(hub.metric("netd_hub_requests_served_offline_total") >= 1.0);
    eprintln!(
        "2. annotated: autonomous after {took:?}, cached, answered offline; the held watch ended after {held_for:?}"
    );

    // A restart with the cloud away (a reboot): the remembered autonomy
    // lets it serve from the cache at once.
    drop(hub);
    let hub = Hub::start_with(dir.path(), "auto", &relay.url(), api, &cred, None, "auto");
    assert_eq!(hub.metric("netd_hub_cloud_reachable"), 0.0);
    assert_eq!(hub.metric("netd_hub_autonomous"), 1.0, "remembered across the restart");
    assert_eq!(names(&raw(&hub.kubeconfig, MY_PODS)), ["web-1"], "a rebooted autonomous node gets its pods");
    assert_eq!(raw(&hub.kubeconfig, "/api/v1/namespaces/default/configmaps/app-config")["data"]["mode"], "edge");
    relay.restore();
    hub.wait_metric("netd_hub_cloud_reachable", 1.0);
    eprintln!("3. restarted with the cloud away: autonomous from its memory, answered from the cache");

    // Autonomy off: a pass-through again within the bound, the cache removed.
    annotate_autonomy(api, None);
    let took = wait_autonomous(&hub, 0.0, bound);
    let deadline = Instant::now() + bound;
    // The hub removes objects, lists and raw one after the other: wait for
    // all three, not the first.
    let cached =
        |hub: &Hub| ["objects", "lists", "raw"].into_iter().filter(|d| hub.cache.join(d).exists()).collect::<Vec<_>>();
    while !cached(&hub).is_empty() {
        assert!(Instant::now() < deadline, "the cache was not removed: {:?} remain", cached(&hub));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(hub.ca().is_file() && hub.cache.join("pki/ca.key").is_file(), "the hub's CA stays");
    assert_eq!(std::fs::read_to_string(hub.cache.join("autonomous")).unwrap(), "false\n");
    assert_eq!(hub.metric("netd_hub_cached_objects"), 0.0);
    assert_eq!(names(&raw(&hub.kubeconfig, MY_PODS)), ["web-1"], "still answered, through");
    assert!(!hub.cache.join("objects").exists(), "and not cached again");
    relay.cut();
    hub.wait_metric("netd_hub_cloud_reachable", 0.0);
    let (code, _) = curl(&hub.url(MY_PODS), &hub.ca(), Some(&cred), "GET", None).unwrap();
    assert_eq!(code, 503, "no offline answers once autonomy is off");
    relay.restore();
    eprintln!("4. annotation removed: pass-through after {took:?}, cache removed, CA kept");

    // --cache=false is a hard override of the annotation.
    annotate_autonomy(api, Some("true"));
    let never = Hub::start_with(dir.path(), "never", &api.url(), api, &cred, None, "false");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(never.metric("netd_hub_autonomous"), 0.0);
    assert_eq!(names(&raw(&never.kubeconfig, MY_PODS)), ["web-1"]);
    assert!(!never.cache.join("objects").exists());
    eprintln!("5. --cache=false: a pass-through although the node is autonomous");
}

/// `netd hub --init`: the hub's CA before the kubelet's first start, made
/// once (0700 directories, 0600 files), kept when valid, never replaced
/// when broken; the other flags are not needed.
#[test]
fn hub_init_makes_the_ca_once_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("var/lib/netd/hub");
    let init = || {
        let output = Command::new(env!("CARGO_BIN_EXE_netd"))
            .args(["hub", "--init", "--cache-dir"])
            .arg(&cache)
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output.status.success(), text)
    };
    let (ok, text) = init();
    assert!(ok && text.contains("made the hub's CA"), "{text}");
    let (cert, key) = (cache.join("pki/ca.crt"), cache.join("pki/ca.key"));
    assert_eq!((mode(&cache), mode(&cache.join("pki")), mode(&cert), mode(&key)), (0o700, 0o700, 0o600, 0o600));
    let first = std::fs::read(&cert).unwrap();
    assert!(netd::hub::pki::read_certs(&cert).is_ok());
    let (ok, text) = init();
    assert!(ok && text.contains("kept"), "{text}");
    assert_eq!(std::fs::read(&cert).unwrap(), first, "a valid CA is kept");
    std::fs::write(&key, "not a key").unwrap();
    let (ok, text) = init();
    assert!(!ok && text.contains("not a private key"), "{text}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "not a key", "a broken CA is reported, not replaced");
}
