//! The edge tunnel's test stage, shared by the tunnel test binaries
//! (`#[path]`-included by each): a "cloud" namespace (the tunnel server)
//! and an "edge" namespace (the agent and a kubelet stand-in on the node
//! address 10.250.0.2, on the edge's `lo`). They share a veth link, but the
//! cloud has no route to 10.250.0.0/16: the only way from cloud to kubelet
//! is the link the agent dials out.

// Each test binary compiles its own copy and uses only part of it.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netd::ebpf::dnat::{AttachOptions, Scope, TunnelDnat};
use netd::testing::{Cgroup, NetNs, PinDir, VethPair};
use netd::tunnel::agent::{self, AgentConfig, AgentMetrics};
use netd::tunnel::certs::{CertFiles, CertificateAuthority, IssuedCert, LoadedCerts};
use netd::tunnel::server::{self, Router, ServerPolicy};
use netd::tunnel::tls;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const CLOUD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
pub const EDGE_LINK_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
pub const NODE: &str = "edge-1";
pub const AGENT_PORT: u16 = 10262;
pub const CONNECT_PORT: u16 = 10265;
/// The DNAT doors: where the tunnel DNAT sends kubelet's TLS port (and
/// other TLS ports), and its read-only port (and other plain ones).
pub const DNAT_TLS_PORT: u16 = 10263;
pub const DNAT_PLAIN_PORT: u16 = 10264;
/// The tunnel DNAT's default rules (SPEC §3).
pub const KUBELET_DNAT_RULES: [(u16, u16); 2] = [(10250, DNAT_TLS_PORT), (10255, DNAT_PLAIN_PORT)];
pub const DAY: Duration = Duration::from_secs(86_400);

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: CertificateAuthority,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("netd test tunnel CA", DAY).unwrap();
        ca.write_cert(dir.path()).unwrap();
        let server = ca.issue_server("tunnel-server", &[], &[IpAddr::V4(CLOUD_IP)], DAY).unwrap();
        server.write(dir.path(), "server").unwrap();
        let node = ca.issue_node(NODE, &[IpAddr::V4(NODE_IP)], DAY).unwrap();
        node.write(dir.path(), NODE).unwrap();
        let client = ca.issue_client("kube-apiserver", None, DAY).unwrap();
        client.write(dir.path(), "client").unwrap();
        Self { dir, ca }
    }

    pub fn files(&self, stem: &str) -> CertFiles {
        CertFiles::in_dir(self.dir.path(), stem)
    }
}

/// A tokio runtime on its own thread, inside a namespace, until dropped.
pub struct Background {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    pub fn start<F, Fut>(netns: &Path, make: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let netns = std::fs::File::open(netns).unwrap();
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a namespace file we hold open; only this thread moves.
            assert_eq!(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                tokio::select! {
                    () = make() => {}
                    _ = stopped => {}
                }
            });
        });
        Self { stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A server, a kubelet stand-in and a linked agent, as most tests want them.
/// Fields drop in order: the agent first, the server last.
pub struct Linked {
    pub agent: Background,
    pub kubelet: Background,
    pub server: Background,
    pub router: Arc<Router>,
    pub metrics: Arc<AgentMetrics>,
    /// A CONNECT-door client with the stage's client certificate.
    pub client: Arc<rustls::ClientConfig>,
}

pub struct Stage {
    pub cloud: NetNs,
    pub edge: NetNs,
    _link: VethPair,
    pub pki: Pki,
}

impl Stage {
    pub fn new() -> Self {
        let cloud = NetNs::new().unwrap();
        let edge = NetNs::new().unwrap();
        let link = VethPair::new((Some(&cloud), "eth0"), (Some(&edge), "eth0")).unwrap();
        cloud.ip(&["addr", "add", &format!("{CLOUD_IP}/24"), "dev", "eth0"]).unwrap();
        cloud.ip(&["link", "set", "eth0", "up"]).unwrap();
        edge.ip(&["addr", "add", &format!("{EDGE_LINK_IP}/24"), "dev", "eth0"]).unwrap();
        edge.ip(&["link", "set", "eth0", "up"]).unwrap();
        edge.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]).unwrap();
        Self { cloud, edge, _link: link, pki: Pki::new() }
    }

    /// The tunnel server in the cloud namespace: agent door and CONNECT door.
    pub fn server(&self, router: Arc<Router>) -> Background {
        let certs = self.pki.files("server").load().unwrap();
        self.server_with(router, tls::agents_door(&certs).unwrap())
    }

    /// [`Stage::server`] with the agents' door's TLS settings `agents_tls`
    /// (a server from before `netd-mux/1` speaks HTTP/2 alone).
    #[allow(dead_code)] // not every test binary has an old server
    pub fn server_with(&self, router: Arc<Router>, agents_tls: Arc<rustls::ServerConfig>) -> Background {
        let certs = self.pki.files("server").load().unwrap();
        let agents_tls = tls::fixed(agents_tls);
        let connect_tls = tls::fixed(tls::server(&certs, tls::ALPN_HTTP1).unwrap());
        Background::start(&self.cloud.path(), move || async move {
            let agents = TcpListener::bind((CLOUD_IP, AGENT_PORT)).await.unwrap();
            let connect = TcpListener::bind((CLOUD_IP, CONNECT_PORT)).await.unwrap();
            tokio::join!(
                server::serve_agents(agents, agents_tls, router.clone()),
                server::serve_connect(connect, connect_tls, router),
            );
        })
    }

    /// Server, kubelet stand-in and the node's agent, waited on until linked.
    pub fn linked(&self) -> Linked {
        self.linked_with(self.agent_config(NODE), self.kubelet())
    }

    /// [`Stage::linked`] with the agent's `config` and whatever stands in
    /// for the node's services (`kubelet`, running in the edge namespace).
    pub fn linked_with(&self, config: AgentConfig, kubelet: Background) -> Linked {
        self.linked_under(ServerPolicy::default(), config, kubelet)
    }

    /// [`Stage::linked_with`], the server under `policy`.
    pub fn linked_under(&self, policy: ServerPolicy, config: AgentConfig, kubelet: Background) -> Linked {
        let router = Arc::new(Router::new(policy));
        let server = self.server(router.clone());
        let metrics = Arc::new(AgentMetrics::default());
        let agent = self.agent(config, metrics.clone());
        wait_for("the agent's link", Duration::from_secs(10), || router.nodes() == vec![NODE.to_string()]);
        let client = tls::connect_client(&self.pki.files("client").load().unwrap()).unwrap();
        Linked { agent, kubelet, server, router, metrics, client }
    }

    pub fn agent_config(&self, stem: &str) -> AgentConfig {
        self.agent_config_from(self.pki.files(stem).load().unwrap())
    }

    /// An agent presenting `leaf` (whoever issued it), trusting our CA.
    pub fn agent_config_with(&self, leaf: &IssuedCert) -> AgentConfig {
        let mut certs = self.pki.files(NODE).load().unwrap();
        certs.chain = vec![leaf.cert_der().clone()];
        certs.key = leaf.key_der();
        self.agent_config_from(certs)
    }

    pub fn agent_config_from(&self, certs: LoadedCerts) -> AgentConfig {
        AgentConfig {
            servers: vec![format!("{CLOUD_IP}:{AGENT_PORT}")],
            server_name: ServerName::IpAddress(IpAddr::V4(CLOUD_IP).into()),
            tls: tls::fixed(tls::agent(&certs).unwrap()),
            own_addresses: vec![IpAddr::V4(NODE_IP)],
            pod_subnets: netd::tunnel::tls::fixed(std::sync::Arc::new(Vec::new())),
            allowed_ports: [10250, 10255].into_iter().collect(),
            dial_loopback: false,
        }
    }

    pub fn agent(&self, config: AgentConfig, metrics: Arc<AgentMetrics>) -> Background {
        Background::start(&self.edge.path(), move || agent::run(config, metrics))
    }

    /// Kubelet stand-ins on the node address: 10250 echoes, 10255 says
    /// hello then echoes.
    pub fn kubelet(&self) -> Background {
        Background::start(&self.edge.path(), || async {
            let echo = TcpListener::bind((NODE_IP, 10250)).await.unwrap();
            let hello = TcpListener::bind((NODE_IP, 10255)).await.unwrap();
            let serve = |listener: TcpListener, greeting: &'static [u8]| async move {
                loop {
                    let (mut stream, _) = listener.accept().await.unwrap();
                    tokio::spawn(async move {
                        let _ = stream.write_all(greeting).await;
                        let (mut read, mut write) = stream.split();
                        let _ = tokio::io::copy(&mut read, &mut write).await;
                    });
                }
            };
            tokio::join!(serve(echo, b""), serve(hello, b"hello\n"));
        })
    }

    /// The eBPF tunnel DNAT for the cloud's host network, redirecting
    /// `rules` (dialled port → door port) for the node address, and the
    /// server's DNAT doors serving `router`. Only sockets made by members of
    /// [`DnatDoors::cgroup`] are redirected.
    pub fn dnat_doors(&self, router: Arc<Router>, rules: &[(u16, u16)]) -> DnatDoors {
        self.dnat_doors_for(router, rules, Scope::HostNetwork)
    }

    /// [`Stage::dnat_doors`] redirecting the sockets `scope` names (pods'
    /// too with [`Scope::AllNamespaces`]).
    pub fn dnat_doors_for(&self, router: Arc<Router>, rules: &[(u16, u16)], scope: Scope) -> DnatDoors {
        let pins = PinDir::new().unwrap();
        let cgroup = Cgroup::new().unwrap();
        let options = AttachOptions {
            pin_dir: pins.path().to_path_buf(),
            cgroup: Some(cgroup.path().to_path_buf()),
            original_dst_cgroup: None,
        };
        let (mut dnat, _) = TunnelDnat::load_or_attach(&options).unwrap();
        // The network namespace that sets the target is the "host network".
        self.cloud.run(|| dnat.set_target(CLOUD_IP, scope)).unwrap().unwrap();
        dnat.set_port_rules(rules.iter().copied()).unwrap();
        dnat.set_edge_nodes([NODE_IP]).unwrap();
        let dnat = Arc::new(dnat);
        // The door listeners belong to the attached cgroup (a socket's is its
        // creator's), so sockops hands each accepted socket its original
        // destination.
        let listeners = {
            let _in_cgroup = cgroup.join().unwrap();
            self.cloud
                .run(|| {
                    [DNAT_TLS_PORT, DNAT_PLAIN_PORT].map(|port| {
                        let listener = std::net::TcpListener::bind((CLOUD_IP, port)).unwrap();
                        listener.set_nonblocking(true).unwrap();
                        listener
                    })
                })
                .unwrap()
        };
        let reader = dnat.clone();
        let doors = Background::start(&self.cloud.path(), move || async move {
            let [tls_door, plain_door] = listeners.map(|l| TcpListener::from_std(l).unwrap());
            tokio::join!(
                server::serve_dnat(tls_door, reader.clone(), router.clone()),
                server::serve_http_door(plain_door, server::DnatCell::attached(reader), router),
            );
        });
        DnatDoors { _doors: doors, dnat, cgroup, cloud: self.cloud.path(), _pins: pins }
    }

    /// Blackholes the link between cloud and edge until the guard drops:
    /// each side drops every packet that arrives on its `eth0`, without a
    /// reset or an ICMP error, as a dead uplink or a NAT that lost its
    /// mapping does. Neither side's own sends fail, so only the tunnel's
    /// pings can tell.
    pub fn cut_link(&self) -> LinkCut<'_> {
        for ns in [&self.cloud, &self.edge] {
            ns.exec("nft", &["add", "table", "inet", CUT_TABLE]).unwrap();
            ns.exec("nft", &["add", "chain", "inet", CUT_TABLE, "input", "{ type filter hook input priority 0; }"])
                .unwrap();
            ns.exec("nft", &["add", "rule", "inet", CUT_TABLE, "input", "iifname", "eth0", "drop"]).unwrap();
        }
        LinkCut { stage: self }
    }

    /// Runs `f` on a fresh current-thread runtime in the cloud namespace.
    pub fn in_cloud<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: std::future::Future<Output = T>,
        T: Send,
    {
        self.cloud.block_on(f).unwrap()
    }
}

/// The tunnel DNAT and the server's DNAT doors; see [`Stage::dnat_doors`].
/// Fields drop in order: the doors close, then the cgroup goes, then the
/// programs are detached.
pub struct DnatDoors {
    _doors: Background,
    /// Its maps: rules, counters.
    pub dnat: Arc<TunnelDnat>,
    /// Sockets its members make in the cloud namespace are redirected.
    pub cgroup: Cgroup,
    cloud: std::path::PathBuf,
    _pins: PinDir,
}

impl DnatDoors {
    /// Runs `program args…` to its end in the cloud namespace as a member of
    /// the DNAT cgroup from its first syscall on: a cloud-node client whose
    /// connections to the node address are redirected.
    pub fn run_redirected(&self, program: &str, args: &[&str]) -> std::process::Output {
        let net = format!("--net={}", self.cloud.display());
        let mut full = vec![net.as_str(), program];
        full.extend_from_slice(args);
        self.cgroup.spawn("nsenter", &full).unwrap().wait_with_output().unwrap()
    }

    /// The maps again, writable (rules, edge nodes and subnets).
    pub fn maps(&self) -> TunnelDnat {
        TunnelDnat::open(self._pins.path()).unwrap()
    }

    /// Connections the rule for `port` redirected so far.
    pub fn redirected(&self, port: u16) -> u64 {
        let stats = self.dnat.stats().unwrap();
        stats.rules.iter().find(|rule| rule.port == port).map_or(0, |rule| rule.redirected)
    }
}

const CUT_TABLE: &str = "netd_test_link_cut";

/// The link is cut until this drops; see [`Stage::cut_link`].
pub struct LinkCut<'a> {
    stage: &'a Stage,
}

impl Drop for LinkCut<'_> {
    fn drop(&mut self) {
        for ns in [&self.stage.cloud, &self.stage.edge] {
            if let Err(err) = ns.exec("nft", &["delete", "table", "inet", CUT_TABLE]) {
                eprintln!("could not restore the link in {}: {err}", ns.name());
            }
        }
    }
}

/// A `netd` process, killed on drop.
pub struct NetdChild(std::process::Child);

impl NetdChild {
    /// Sends SIGTERM (nsenter execs the binary: the child is the process).
    pub fn terminate(&self) {
        // SAFETY: kill(2) on our own child's pid; it is not reaped until wait.
        assert_eq!(unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) }, 0);
    }

    /// Waits at most `timeout` for the process to end: its status, or
    /// `None` while it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NetdChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the `netd` binary under test (the edge side: `tunnel-agent`)
/// with `args` in the namespace `netns`.
pub fn spawn_netd(netns: &Path, args: &[impl AsRef<std::ffi::OsStr>]) -> NetdChild {
    spawn(env!("CARGO_BIN_EXE_netd"), netns, args)
}

/// Starts the `netd-cloud` binary under test (`tunnel-server`) with `args`
/// in the namespace `netns`.
pub fn spawn_netd_cloud(netns: &Path, args: &[impl AsRef<std::ffi::OsStr>]) -> NetdChild {
    spawn(env!("CARGO_BIN_EXE_netd-cloud"), netns, args)
}

/// Plain HTTP stand-ins on the node address, one per port, each answering
/// every request with [`stand_in_body`].
pub fn plain_http_stand_ins(stage: &Stage, ports: &'static [u16]) -> Background {
    use std::convert::Infallible;

    Background::start(&stage.edge.path(), move || async move {
        let mut servers = tokio::task::JoinSet::new();
        for &port in ports {
            let listener = TcpListener::bind((NODE_IP, port)).await.unwrap();
            servers.spawn(async move {
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let body = bytes::Bytes::from(stand_in_body(port, request.uri().path()));
                        async move { Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(body))) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
                    tokio::spawn(connection);
                }
            });
        }
        while servers.join_next().await.is_some() {}
    })
}

/// What the stand-in on `port` answers for `path`: both named, so that a
/// request which reached another port or path shows.
pub fn stand_in_body(port: u16, path: &str) -> String {
    format!("stand-in on {NODE_IP}:{port} served {path}\n")
}

/// Children's logs go nowhere, or (at debug level) to a file per process
/// under `$NETD_TEST_LOG_DIR` when that is set, to debug a failed run.
fn spawn(program: &str, netns: &Path, args: &[impl AsRef<std::ffi::OsStr>]) -> NetdChild {
    let mut command = std::process::Command::new("nsenter");
    command.arg(format!("--net={}", netns.display())).arg(program).args(args).stdout(std::process::Stdio::null());
    match std::env::var_os("NETD_TEST_LOG_DIR") {
        Some(dir) => {
            static SEQUENCE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = Path::new(program).file_name().unwrap().to_string_lossy().into_owned();
            let path = Path::new(&dir).join(format!("{}-{n}-{name}.log", std::process::id()));
            command.env("NETD_LOG", "debug").stderr(std::fs::File::create(path).unwrap());
        }
        None => {
            command.stderr(std::process::Stdio::null());
        }
    }
    NetdChild(command.spawn().unwrap())
}

/// `GET /metrics` on `addr` inside a namespace, with curl ("" when it
/// does not answer).
pub fn metrics_in(ns: &NetNs, addr: &str) -> String {
    let out = ns.exec("curl", &["-sS", "--noproxy", "*", "-m", "5", &format!("http://{addr}/metrics")]);
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

pub fn wait_for(what: &str, timeout: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `curl` in `ns`: (exit success, HTTP code as curl saw it, body).
pub fn curl(ns: &NetNs, args: &[&str]) -> (bool, String, String) {
    curl_in(None, ns, args)
}

/// [`curl`], run as a member of `cgroup` when one is given (so the tunnel
/// DNAT attached there redirects its connects). Only the proxy a test names
/// with `-x` is used.
pub fn curl_in(cgroup: Option<&Cgroup>, ns: &NetNs, args: &[&str]) -> (bool, String, String) {
    let net = format!("--net={}", ns.path().display());
    let mut full =
        vec![net.as_str(), "env", "-u", "http_proxy", "-u", "HTTP_PROXY", "-u", "all_proxy", "-u", "ALL_PROXY"];
    full.extend(["curl", "-sS", "-m", "10", "-w", "\n%{http_code}"]);
    full.extend_from_slice(args);
    // Not NetNs::exec: a failed transfer is an outcome here, not an error.
    let out = match cgroup {
        Some(cgroup) => cgroup.spawn("nsenter", &full).unwrap().wait_with_output().unwrap(),
        None => std::process::Command::new("nsenter").args(&full).output().unwrap(),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (out.status.success(), code.to_string(), body.to_string())
}

/// Sends `CONNECT authority` over TLS to the front door; the status line's
/// code, and the stream when it is 200.
pub async fn connect(
    client: Arc<rustls::ClientConfig>,
    authority: &str,
) -> (u16, Option<tokio_rustls::client::TlsStream<TcpStream>>) {
    connect_at(client, CONNECT_PORT, authority).await
}

/// [`connect`] to the CONNECT door on `port` of the cloud address.
pub async fn connect_at(
    client: Arc<rustls::ClientConfig>,
    port: u16,
    authority: &str,
) -> (u16, Option<tokio_rustls::client::TlsStream<TcpStream>>) {
    let tcp = TcpStream::connect((CLOUD_IP, port)).await.unwrap();
    let name = ServerName::IpAddress(IpAddr::V4(CLOUD_IP).into());
    let mut tls = tokio_rustls::TlsConnector::from(client).connect(name, tcp).await.unwrap();
    tls.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await.unwrap();
    // Read the response head byte by byte: nothing after it may be eaten.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if tls.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let code: u16 = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, (code == 200).then_some(tls))
}
