//! `cargo xtask bench tunnel`: the edge tunnel (`netd tunnel-server` +
//! `netd tunnel-agent`, reached through the eBPF tunnel DNAT) against
//! rathole 0.5 (plain TCP and its encrypted noise transport) and OpenSSH
//! `ssh -R`, with a direct connection as the floor.
//!
//! Stage: a "cloud" and an "edge" namespace joined by one veth
//! (192.168.61.1 ↔ 192.168.61.2). The edge node address 10.250.0.2 sits on
//! the edge's `lo` and the cloud has no route to it, so every tunnel variant
//! can only get there through a connection the edge dialled out: netd's
//! agent, rathole's client and `ssh -R` all run in the edge and dial the
//! cloud's veth address. Only the floor dials the edge's veth address
//! (services listen on all edge addresses), over the same veth and qdiscs.
//!
//! - netd: a cloud client in the DNAT cgroup dials `10.250.0.2:port`;
//!   connect4 sends it to the server's plain DNAT door (:10264), the server
//!   opens an HTTP/2 stream to the agent, which dials the service.
//! - rathole / ssh: the cloud client dials the listener they open on the
//!   cloud's loopback (one port range each).
//!
//! Measured: single-stream iperf3 throughput (loopback = the veth without
//! any qdisc; WAN = the same addresses routed through [`DelayLine`], 25 ms
//! each way (50 ms RTT) at 1 Gbit/s, as netem `delay 25ms rate 1gbit` would
//! on both veth ends: this kernel has no netem), wrk latency at one connection and requests/s at 16 connections to
//! a small HTTP server on the edge (in this process), resident memory of
//! each tunnel's two processes with 0 and [`IDLE_STREAMS`] idle streams, and
//! the time from a cut link coming back to traffic flowing through netd.
//!
//! Everything is built before the first timed round and torn down after
//! the last; variants alternate within every round in rotating order.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netd::ebpf::dnat::{AttachOptions, Scope, TunnelDnat};
use netd::testing::{self, http_get, run_command, Cgroup, NetNs, NetdProcess, PinDir, VethPair};

use crate::bench::machine;
use crate::bench_rss::status_kib;
use crate::bench_vxlan::cpu_pressure_us;
use crate::delay_line::{DelayLine, Shape};

/// iperf3 rounds per variant and network, seconds per run (the figures: `-t 4`, two rounds).
const IPERF_ROUNDS: usize = 2;
const IPERF_SECONDS: u32 = 4;
/// wrk rounds per variant; seconds at one connection (latency) and at 16 (requests/s).
const WRK_ROUNDS: usize = 2;
const WRK_LATENCY_SECONDS: u32 = 4;
const WRK_RATE_SECONDS: u32 = 2;
const WRK_CONNECTIONS: u32 = 16;
/// Idle streams held open for the memory figures.
const IDLE_STREAMS: usize = 1_000;
/// The longest the idle streams may take to reach the edge.
const IDLE_WAIT: Duration = Duration::from_secs(30);
/// Link cuts timed (each takes up to 15 s for the agent to notice).
const RELINK_TRIALS: usize = 3;

/// The emulated WAN: 25 ms each way (50 ms RTT) at 1 Gbit/s; the queue
/// holds well over one bandwidth-delay product (1 Gbit/s × 50 ms ≈ 6 MB,
/// ~100 of the relay's 64 KiB segments or ~4 200 full-size packets), so the
/// emulator itself drops nothing.
const WAN: Shape = Shape { delay: Duration::from_millis(25), rate: 1_000_000_000, limit: 20_000 };

/// TCP buffer limits in both namespaces: the defaults' maxima (6 MiB
/// receive, 4 MiB send) would cap one connection near 0.5 Gbit/s at 50 ms
/// before the emulated 1 Gbit/s link does; 32 MiB leaves the link (and each
/// tunnel's own windows) as the limit, as on a host tuned for long fat links.
const SOCKET_BUFFERS: [(&str, &str); 2] =
    [("/proc/sys/net/ipv4/tcp_rmem", "4096 131072 33554432"), ("/proc/sys/net/ipv4/tcp_wmem", "4096 16384 33554432")];

const CLOUD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 61, 1);
const EDGE_LINK_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 61, 2);
/// The edge node's address, on the edge's `lo`; the cloud has no route to it.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
const NODE: &str = "edge-1";
const AGENTS_PORT: u16 = 10262;
/// The plain-TCP DNAT door: it carries any TCP, which is what these services speak.
const DOOR_PORT: u16 = 10264;
const CONNECT_PORT: u16 = 10265;
const SERVER_METRICS: &str = "127.0.0.1:10266";
const AGENT_METRICS: &str = "127.0.0.1:10267";
const RATHOLE_TCP_PORT: u16 = 2333;
const RATHOLE_NOISE_PORT: u16 = 2334;
const SSH_PORT: u16 = 2222;
const RATHOLE_TOKEN: &str = "netd-bench";
/// What the edge HTTP server answers to every request.
const HTTP_BODY: &str = "hello from the edge\n";

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// The services on the edge node, on all its addresses.
#[derive(Debug, Clone, Copy)]
enum Service {
    Iperf,
    Http,
    Idle,
}

const SERVICES: [Service; 3] = [Service::Iperf, Service::Http, Service::Idle];

impl Service {
    fn port(self) -> u16 {
        match self {
            Service::Iperf => 5201,
            Service::Http => 8080,
            Service::Idle => 9000,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Service::Iperf => "iperf",
            Service::Http => "http",
            Service::Idle => "idle",
        }
    }
}

/// One way from the cloud to the edge services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Direct,
    Netd,
    RatholeTcp,
    RatholeNoise,
    Ssh,
}

const WAYS: [Way; 5] = [Way::Direct, Way::Netd, Way::RatholeTcp, Way::RatholeNoise, Way::Ssh];

impl Way {
    fn label(self) -> &'static str {
        match self {
            Way::Direct => "direct (floor)",
            Way::Netd => "**netd tunnel** (DNAT → TLS 1.3 + HTTP/2)",
            Way::RatholeTcp => "rathole 0.5, plain TCP",
            Way::RatholeNoise => "rathole 0.5, noise",
            Way::Ssh => "OpenSSH `ssh -R`",
        }
    }

    /// The cloud-side port offset of the tunnels that listen in the cloud.
    fn offset(self) -> u16 {
        match self {
            Way::Direct | Way::Netd => 0,
            Way::RatholeTcp => 10_000,
            Way::RatholeNoise => 20_000,
            Way::Ssh => 30_000,
        }
    }

    /// Where a cloud client dials `service` this way.
    fn addr(self, service: Service) -> SocketAddr {
        match self {
            Way::Direct => v4(EDGE_LINK_IP, service.port()),
            Way::Netd => v4(NODE_IP, service.port()),
            _ => v4(Ipv4Addr::LOCALHOST, service.port() + self.offset()),
        }
    }
}

/// A listener on the edge whose accepted connections go to `handle`.
struct EdgeListener {
    listener: Arc<TcpListener>,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EdgeListener {
    fn start(ns: &NetNs, port: u16, handle: impl Fn(TcpStream) + Send + 'static) -> Result<Self> {
        let addr = v4(Ipv4Addr::UNSPECIFIED, port);
        let listener = ns.run(|| TcpListener::bind(addr))?.with_context(|| format!("binding {addr} on the edge"))?;
        let (listener, accepted, stop) =
            (Arc::new(listener), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (listener, accepted, stop) = (listener.clone(), accepted.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((stream, _)) = listener.accept() {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        handle(stream);
                    }
                }
            })
        };
        Ok(Self { listener, accepted, stop, thread: Some(thread) })
    }

    fn count(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for EdgeListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // shutdown() on a listening socket wakes a blocked accept() (EINVAL).
        // SAFETY: shutdown on a descriptor the Arc keeps open; no memory involved.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// HTTP/1.1 keep-alive: one fixed response per request head, a thread per
/// connection (at most [`WRK_CONNECTIONS`] at a time), until the client closes.
fn serve_http(mut stream: TcpStream) {
    std::thread::spawn(move || {
        let _ = stream.set_nodelay(true);
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{HTTP_BODY}",
            HTTP_BODY.len()
        );
        let (mut pending, mut chunk) = (Vec::with_capacity(4096), [0u8; 4096]);
        loop {
            let n = match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            pending.extend_from_slice(&chunk[..n]);
            let mut answers = 0;
            while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                pending.drain(..end + 4);
                answers += 1;
            }
            // wrk pipelines nothing: one request, one response, but answer all heads seen.
            if answers > 0 && stream.write_all(response.repeat(answers).as_bytes()).is_err() {
                return;
            }
        }
    });
}

/// `program args…` inside `ns`, a member of `cgroup` from its first
/// syscall: a shell writes its own pid into `cgroup.procs`, then execs it.
fn in_cgroup(cgroup: &Cgroup, program: &str, args: &[String]) -> (String, Vec<String>) {
    let script = format!("echo $$ > '{}' && exec \"$@\"", cgroup.path().join("cgroup.procs").display());
    let mut full = vec!["-c".to_string(), script, "sh".into(), program.into()];
    full.extend_from_slice(args);
    ("sh".into(), full)
}

/// Starts a long-running process in `ns` (and `cgroup`), its output in `dir/<name>.log`.
fn start(
    ns: &NetNs,
    cgroup: Option<&Cgroup>,
    dir: &Path,
    name: &str,
    program: &str,
    args: &[String],
) -> Result<NetdProcess> {
    let (program, args) = match cgroup {
        Some(cgroup) => in_cgroup(cgroup, program, args),
        None => (program.to_string(), args.to_vec()),
    };
    let log = dir.join(format!("{name}.log"));
    NetdProcess::spawn(ns, Path::new(&program), &args, &log).with_context(|| format!("starting {name}"))
}

/// Runs a client to completion in `ns` and `cgroup`; its stdout.
fn client(ns: &NetNs, cgroup: &Cgroup, program: &str, args: &[String]) -> Result<String> {
    let (sh, full) = in_cgroup(cgroup, program, args);
    let out = ns.run(|| Command::new(&sh).args(&full).output())?.with_context(|| format!("running {program}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "{program} {} failed ({}): {stdout}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `rathole` on PATH or in cargo's bin directory (`cargo xtask setup` installs it there).
fn rathole_binary() -> Result<String> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join("rathole")).collect::<Vec<_>>())
        .unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")));
    let found = on_path.into_iter().chain(cargo_home.map(|home| home.join("bin/rathole"))).find(|p| p.is_file());
    let found = found.context("rathole is not installed: run `cargo xtask setup` (cargo install rathole)")?;
    Ok(found.to_string_lossy().into_owned())
}

/// rathole's noise keys: `rathole --genkey` prints a private and a public key.
fn rathole_keys(rathole: &str) -> Result<(String, String)> {
    let out = Command::new(rathole).arg("--genkey").output().context("rathole --genkey")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut keys = Vec::new();
    while let Some(line) = lines.next() {
        if line.ends_with("Key:") {
            keys.push(lines.next().context("rathole --genkey: a key heading without a key")?.to_string());
        }
    }
    match keys.as_slice() {
        [private, public] => Ok((private.clone(), public.clone())),
        _ => bail!("unexpected `rathole --genkey` output: {text}"),
    }
}

/// rathole server and client configurations for one transport.
fn rathole_configs(way: Way, keys: &(String, String)) -> (String, String) {
    let (port, transport) = match way {
        Way::RatholeNoise => (
            RATHOLE_NOISE_PORT,
            ("noise", format!("local_private_key = \"{}\"", keys.0), format!("remote_public_key = \"{}\"", keys.1)),
        ),
        _ => (RATHOLE_TCP_PORT, ("tcp", String::new(), String::new())),
    };
    let (kind, server_key, client_key) = transport;
    let mut server = format!("[server]\nbind_addr = \"{CLOUD_IP}:{port}\"\n[server.transport]\ntype = \"{kind}\"\n");
    let mut client = format!("[client]\nremote_addr = \"{CLOUD_IP}:{port}\"\n[client.transport]\ntype = \"{kind}\"\n");
    if kind == "noise" {
        let _ = writeln!(server, "[server.transport.noise]\n{server_key}");
        let _ = writeln!(client, "[client.transport.noise]\n{client_key}");
    }
    for service in SERVICES {
        let name = service.name();
        let _ = writeln!(
            server,
            "[server.services.{name}]\ntoken = \"{RATHOLE_TOKEN}\"\nbind_addr = \"{}\"",
            way.addr(service)
        );
        let _ = writeln!(
            client,
            "[client.services.{name}]\ntoken = \"{RATHOLE_TOKEN}\"\nlocal_addr = \"{}\"",
            v4(NODE_IP, service.port())
        );
    }
    (server, client)
}

/// A private sshd for `ssh -R`: its own host key, one authorized key, root by key only.
fn sshd_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "Port {SSH_PORT}\nListenAddress {CLOUD_IP}\nHostKey {d}/host_ed25519\nAuthorizedKeysFile {d}/authorized_keys\n\
         PidFile none\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nLogLevel ERROR\n"
    )
}

fn keygen(path: &Path) -> Result<()> {
    let path = path.to_string_lossy();
    run_command("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-C", "netd-bench", "-f", &path])?;
    Ok(())
}

/// One GET through `addr` from `ns` (sockets made in `cgroup`); true on a 200 with the body.
fn http_ok(ns: &NetNs, addr: SocketAddr) -> bool {
    ns.run(|| -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: edge\r\n\r\n")?;
        let mut got = Vec::new();
        let mut chunk = [0u8; 512];
        while !got.ends_with(HTTP_BODY.as_bytes()) {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(false);
            }
            got.extend_from_slice(&chunk[..n]);
        }
        Ok(got.starts_with(b"HTTP/1.1 200"))
    })
    .map(|r| r.unwrap_or(false))
    .unwrap_or(false)
}

/// Waits until a GET through `way` works (its tunnel is up end to end).
fn wait_ready(stage: &Stage, way: Way, limit: Duration) -> Result<()> {
    let started = Instant::now();
    let _in_cgroup = stage.cgroup_of(way).join()?;
    while !http_ok(&stage.cloud, way.addr(Service::Http)) {
        if started.elapsed() > limit {
            bail!("{} did not carry a GET within {limit:?}", way.label());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Waits up to 10 s until `addr` in `ns` accepts a connection.
fn wait_listening(ns: &NetNs, addr: SocketAddr) -> Result<()> {
    let started = Instant::now();
    while ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)))?.is_err() {
        ensure!(started.elapsed() < Duration::from_secs(10), "nothing listens on {addr} after 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn sshd_log(dir: &Path) -> String {
    format!("sshd: {}", std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default())
}

/// `pid` and all its descendants (sshd forks a session process per login).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.filter_map(|e| e.ok()) {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // The command may hold spaces and parentheses: fields start after the last ')'.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
            if let Some(ppid) = ppid {
                parents.push((child, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut at = 0;
    while at < tree.len() {
        let parent = tree[at];
        tree.extend(parents.iter().filter(|(_, ppid)| *ppid == parent).map(|(child, _)| *child));
        at += 1;
    }
    tree
}

/// Summed VmRSS of `pid`'s process tree, KiB.
fn tree_rss(pid: u32) -> Result<u64> {
    process_tree(pid).into_iter().map(|p| status_kib(p, "VmRSS:")).sum()
}

/// Everything the runs use; fields drop in order (processes first, namespaces last).
struct Stage {
    _processes: Vec<NetdProcess>,
    server_pid: u32,
    agent_pid: u32,
    rathole_pids: [(u32, u32); 2],
    sshd_pid: u32,
    ssh_pid: u32,
    ssh_cipher: String,
    _iperf_server: NetdProcess,
    _http: EdgeListener,
    idle: EdgeListener,
    idle_held: Arc<Mutex<Vec<TcpStream>>>,
    _dnat: TunnelDnat,
    _pins: PinDir,
    /// Under the attached cgroup: clients of the netd way (redirected).
    netd_client: Cgroup,
    _netd_server: Cgroup,
    _attached: Cgroup,
    /// No programs: every other way's clients.
    plain: Cgroup,
    _veth: VethPair,
    edge: NetNs,
    cloud: NetNs,
    dir: tempfile::TempDir,
}

impl Stage {
    fn cgroup_of(&self, way: Way) -> &Cgroup {
        if way == Way::Netd {
            &self.netd_client
        } else {
            &self.plain
        }
    }

    fn new(bin_dir: &Path) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let netd = bin_dir.join("netd").to_string_lossy().into_owned();
        let rathole = rathole_binary()?;

        let cloud = NetNs::new()?;
        let edge = NetNs::new()?;
        let veth = VethPair::new((Some(&cloud), "eth0"), (Some(&edge), "eth0"))?;
        cloud.ip(&["addr", "add", &format!("{CLOUD_IP}/24"), "dev", "eth0"])?;
        edge.ip(&["addr", "add", &format!("{EDGE_LINK_IP}/24"), "dev", "eth0"])?;
        edge.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        for ns in [&cloud, &edge] {
            ns.run(|| -> Result<()> {
                for (file, value) in SOCKET_BUFFERS {
                    std::fs::write(file, value).with_context(|| format!("writing {file}"))?;
                }
                Ok(())
            })??;
        }

        // The tunnel DNAT, as bench_dnat attaches it: programs on `attached`,
        // the server (whose DNAT door must see the original destination) in
        // one child cgroup, the netd way's clients in another.
        let attached = Cgroup::new()?;
        let netd_server = attached.child("server")?;
        let netd_client = attached.child("client")?;
        let plain = Cgroup::new()?;
        let pins = PinDir::new()?;
        let (mut dnat, _) = TunnelDnat::load_or_attach(&AttachOptions {
            pin_dir: pins.path().to_path_buf(),
            cgroup: Some(attached.path().to_path_buf()),
            original_dst_cgroup: Some(netd_server.path().to_path_buf()),
        })?;
        cloud.run(|| dnat.set_target(CLOUD_IP, Scope::HostNetwork))??;
        dnat.set_port_rules(SERVICES.map(|s| (s.port(), DOOR_PORT)))?;
        dnat.set_edge_nodes([NODE_IP])?;

        let http = EdgeListener::start(&edge, Service::Http.port(), serve_http)?;
        let idle_held = Arc::new(Mutex::new(Vec::new()));
        let idle = {
            let held = idle_held.clone();
            EdgeListener::start(&edge, Service::Idle.port(), move |stream| {
                held.lock().unwrap_or_else(PoisonError::into_inner).push(stream);
            })?
        };
        let iperf_port = Service::Iperf.port().to_string();
        let iperf_server = start(&edge, None, d, "iperf3-server", "iperf3", &strings(&["-s", "-p", &iperf_port]))?;

        let mut processes = Vec::new();
        // netd: certificates, then the server in its cgroup, the agent on the edge.
        let (ca, server_certs, node_certs) = (d.join("ca"), d.join("server"), d.join("node"));
        let path = |p: &Path| p.to_string_lossy().into_owned();
        run_command(&netd, &["certs", "ca", "--out", &path(&ca)])?;
        let cloud_ip = CLOUD_IP.to_string();
        run_command(
            &netd,
            &["certs", "server", "--ca-dir", &path(&ca), "--ip", &cloud_ip, "--out", &path(&server_certs)],
        )?;
        let node_ip = NODE_IP.to_string();
        run_command(
            &netd,
            &["certs", "node", "--ca-dir", &path(&ca), "--name", NODE, "--ip", &node_ip, "--out", &path(&node_certs)],
        )?;
        let server_args = strings(&[
            "tunnel-server",
            "--cert-dir",
            &path(&server_certs),
            "--address",
            &CLOUD_IP.to_string(),
            "--agents-listen",
            &v4(CLOUD_IP, AGENTS_PORT).to_string(),
            "--connect-listen",
            &v4(CLOUD_IP, CONNECT_PORT).to_string(),
            "--dnat-listen",
            &v4(CLOUD_IP, DOOR_PORT).to_string(),
            "--dnat-pin-dir",
            &path(pins.path()),
            "--metrics-listen",
            SERVER_METRICS,
            "--log",
            "warn",
        ]);
        let server = start(&cloud, Some(&netd_server), d, "netd-tunnel-server", &netd, &server_args)?;
        let extra_ports = SERVICES.map(|s| s.port().to_string()).join(",");
        let agent_args = strings(&[
            "tunnel-agent",
            "--server",
            &v4(CLOUD_IP, AGENTS_PORT).to_string(),
            "--cert-dir",
            &path(&node_certs),
            "--extra-ports",
            &extra_ports,
            "--metrics-listen",
            AGENT_METRICS,
            "--log",
            "warn",
        ]);
        let agent = start(&edge, None, d, "netd-tunnel-agent", &netd, &agent_args)?;
        let pid = |p: &NetdProcess| p.pid().context("a process exited at once");
        let (server_pid, agent_pid) = (pid(&server)?, pid(&agent)?);
        processes.extend([server, agent]);

        // rathole: one server and one client per transport.
        let keys = rathole_keys(&rathole)?;
        let mut rathole_pids = [(0, 0); 2];
        for (i, way) in [Way::RatholeTcp, Way::RatholeNoise].into_iter().enumerate() {
            let (server_toml, client_toml) = rathole_configs(way, &keys);
            let (server_file, client_file) =
                (d.join(format!("rathole-server-{i}.toml")), d.join(format!("rathole-client-{i}.toml")));
            std::fs::write(&server_file, server_toml)?;
            std::fs::write(&client_file, client_toml)?;
            let server = start(
                &cloud,
                None,
                d,
                &format!("rathole-server-{i}"),
                &rathole,
                &strings(&["-s", &path(&server_file)]),
            )?;
            let client = start(
                &edge,
                None,
                d,
                &format!("rathole-client-{i}"),
                &rathole,
                &strings(&["-c", &path(&client_file)]),
            )?;
            rathole_pids[i] = (pid(&server)?, pid(&client)?);
            processes.extend([server, client]);
        }

        // ssh -R: a private sshd in the cloud, the edge logs in with a throwaway key.
        keygen(&d.join("host_ed25519"))?;
        keygen(&d.join("client_ed25519"))?;
        std::fs::copy(d.join("client_ed25519.pub"), d.join("authorized_keys"))?;
        std::fs::write(d.join("sshd_config"), sshd_config(d))?;
        // sshd refuses to start without its privilege separation directory.
        std::fs::create_dir_all("/run/sshd")?;
        let sshd = start(
            &cloud,
            None,
            d,
            "sshd",
            "/usr/sbin/sshd",
            &strings(&["-D", "-e", "-f", &path(&d.join("sshd_config"))]),
        )?;
        // ssh tries once: start it only when sshd listens.
        wait_listening(&cloud, v4(CLOUD_IP, SSH_PORT)).with_context(|| sshd_log(d))?;
        let mut ssh_args = strings(&[
            "-N",
            "-v",
            "-F",
            "/dev/null",
            "-p",
            &SSH_PORT.to_string(),
            "-i",
            &path(&d.join("client_ed25519")),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "BatchMode=yes",
        ]);
        for service in SERVICES {
            let listen = Way::Ssh.addr(service);
            ssh_args.push("-R".into());
            ssh_args.push(format!("{}:{}:{NODE_IP}:{}", listen.ip(), listen.port(), service.port()));
        }
        ssh_args.push(format!("root@{CLOUD_IP}"));
        let ssh = start(&edge, None, d, "ssh", "ssh", &ssh_args)?;
        let (sshd_pid, ssh_pid) = (pid(&sshd)?, pid(&ssh)?);
        processes.extend([sshd, ssh]);

        let mut stage = Self {
            _processes: processes,
            server_pid,
            agent_pid,
            rathole_pids,
            sshd_pid,
            ssh_pid,
            ssh_cipher: String::new(),
            _iperf_server: iperf_server,
            _http: http,
            idle,
            idle_held,
            _dnat: dnat,
            _pins: pins,
            netd_client,
            _netd_server: netd_server,
            _attached: attached,
            plain,
            _veth: veth,
            edge,
            cloud,
            dir,
        };
        for way in WAYS {
            wait_ready(&stage, way, Duration::from_secs(30)).map_err(|e| e.context(stage.logs()))?;
        }
        let ssh_log = std::fs::read_to_string(stage.dir.path().join("ssh.log")).unwrap_or_default();
        stage.ssh_cipher = ssh_log
            .lines()
            .find_map(|l| l.split("server->client cipher: ").nth(1))
            .map(|rest| rest.split_whitespace().next().unwrap_or(rest).to_string())
            .unwrap_or_else(|| "(not found in ssh -v output)".into());
        Ok(stage)
    }

    /// The processes' logs, for an error message.
    fn logs(&self) -> String {
        let mut out = String::from("logs:");
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for entry in entries.filter_map(|e| e.ok()) {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    let _ = write!(out, "\n--- {}:", entry.file_name().to_string_lossy());
                    for line in tail.into_iter().rev() {
                        let _ = write!(out, "\n{line}");
                    }
                }
            }
        }
        out
    }

    /// The agent's links up now, per its metrics.
    fn agent_links_up(&self) -> Option<u64> {
        let body = http_get(&self.edge, AGENT_METRICS, "/metrics")?;
        body.lines().find_map(|l| l.strip_prefix("netd_tunnel_agent_links_up ")?.trim().parse().ok())
    }

    /// Server and agent (or sshd tree and ssh) resident KiB of a tunnel.
    fn rss(&self, way: Way) -> Result<(u64, u64)> {
        Ok(match way {
            Way::Direct => (0, 0),
            Way::Netd => (status_kib(self.server_pid, "VmRSS:")?, status_kib(self.agent_pid, "VmRSS:")?),
            Way::RatholeTcp | Way::RatholeNoise => {
                let (server, client) = self.rathole_pids[usize::from(way == Way::RatholeNoise)];
                (status_kib(server, "VmRSS:")?, status_kib(client, "VmRSS:")?)
            }
            Way::Ssh => (tree_rss(self.sshd_pid)?, status_kib(self.ssh_pid, "VmRSS:")?),
        })
    }
}

/// Median of unsorted samples (the mean of the middle two for an even count).
fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn min_max(samples: &[f64]) -> (f64, f64) {
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// `median (min–max)` with `digits` decimals.
fn spread(samples: &[f64], digits: usize) -> String {
    let (min, max) = min_max(samples);
    format!("{:.digits$} ({min:.digits$}–{max:.digits$})", median(samples))
}

/// Per-round ratios of `a` to `b` (they ran moments apart): median (min–max).
fn paired(a: &[f64], b: &[f64]) -> String {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b.max(f64::EPSILON)).collect();
    let (min, max) = min_max(&ratios);
    format!("{:.2}× ({min:.2}–{max:.2})", median(&ratios))
}

/// Runs `measure` for every way `rounds` times, rotating who goes first.
fn interleave(rounds: usize, mut measure: impl FnMut(Way) -> Result<()>) -> Result<()> {
    for r in 0..rounds {
        for k in 0..WAYS.len() {
            measure(WAYS[(r + k) % WAYS.len()])?;
        }
    }
    Ok(())
}

/// One single-stream iperf3 run towards the edge; Gbit/s received and the sender's retransmits.
fn iperf(stage: &Stage, way: Way) -> Result<(f64, u64)> {
    let addr = way.addr(Service::Iperf);
    let args = strings(&[
        "-c",
        &addr.ip().to_string(),
        "-p",
        &addr.port().to_string(),
        "-t",
        &IPERF_SECONDS.to_string(),
        "-J",
    ]);
    // iperf3's server takes a moment after a test to accept the next one
    // (longer when the last close crosses a tunnel): "busy" is retried.
    let mut tries = 0;
    let json: serde_json::Value = loop {
        let run = client(&stage.cloud, stage.cgroup_of(way), "iperf3", &args);
        let busy = match &run {
            Ok(out) => out.contains("server is busy"),
            Err(err) => err.to_string().contains("server is busy"),
        };
        if busy && tries < 20 {
            tries += 1;
            std::thread::sleep(Duration::from_millis(250));
            continue;
        }
        let out = run.with_context(|| way.label())?;
        break serde_json::from_str(&out).context("iperf3 -J output")?;
    };
    let out = json.to_string();
    let bits = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received in iperf3's output: {out}"))?;
    let retransmits = json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bits / 1e9, retransmits))
}

/// What wrk reports: p50 and p99 latency in µs, requests/s.
struct WrkRun {
    p50_us: f64,
    p99_us: f64,
    rate: f64,
}

fn wrk_duration_us(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

fn wrk(stage: &Stage, way: Way, connections: u32, seconds: u32) -> Result<WrkRun> {
    let url = format!("http://{}/", way.addr(Service::Http));
    let args = strings(&["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency", &url]);
    let out = client(&stage.cloud, stage.cgroup_of(way), "wrk", &args).with_context(|| way.label())?;
    ensure!(!out.contains("Socket errors") && !out.contains("Non-2xx"), "{}: wrk saw errors:\n{out}", way.label());
    let percentile = |p: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(p).map(str::trim))
            .and_then(wrk_duration_us)
            .with_context(|| format!("no {p} latency in wrk's output:\n{out}"))
    };
    let rate = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:").map(str::trim))
        .and_then(|r| r.parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))?;
    ensure!(rate > 0.0, "{}: wrk completed no request:\n{out}", way.label());
    Ok(WrkRun { p50_us: percentile("50%")?, p99_us: percentile("99%")?, rate })
}

/// Opens `n` connections through `way` to the edge's idle listener and
/// waits until all are accepted there (so the tunnel holds `n` streams), at
/// most [`IDLE_WAIT`]: the streams, how many reached the edge, and how long
/// that took.
fn open_idle(stage: &Stage, way: Way, n: usize) -> Result<(Vec<TcpStream>, u64, Duration)> {
    let before = stage.idle.count();
    let addr = way.addr(Service::Idle);
    let started = Instant::now();
    let streams = {
        let _in_cgroup = stage.cgroup_of(way).join()?;
        stage.cloud.run(|| (0..n).map(|_| TcpStream::connect(addr)).collect::<std::io::Result<Vec<_>>>())??
    };
    while stage.idle.count() < before + n as u64 && started.elapsed() < IDLE_WAIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((streams, stage.idle.count() - before, started.elapsed()))
}

/// Memory of one tunnel: idle at start, with the idle streams, idle after the runs.
#[derive(Default, Clone, Copy)]
struct Memory {
    fresh: (u64, u64),
    streams: (u64, u64),
    after: (u64, u64),
    /// Idle streams that reached the edge, and how long they took.
    reached: u64,
    took: Duration,
}

/// One link cut: seconds until the agent noticed, and ms from the link
/// back up until a GET through the tunnel succeeded.
fn relink(stage: &Stage) -> Result<(f64, f64)> {
    ensure!(stage.agent_links_up() == Some(1), "the agent is not linked before the cut");
    // The edge's uplink goes down: its route to the cloud goes with it, so
    // the agent's redials fail at once (ENETUNREACH) while it is down.
    stage.edge.ip(&["link", "set", "eth0", "down"])?;
    let cut = Instant::now();
    while stage.agent_links_up() != Some(0) {
        ensure!(cut.elapsed() < Duration::from_secs(30), "the agent did not notice the cut within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let noticed = cut.elapsed();
    stage.edge.ip(&["link", "set", "eth0", "up"])?;
    let back = Instant::now();
    let _in_cgroup = stage.netd_client.join()?;
    while !http_ok(&stage.cloud, Way::Netd.addr(Service::Http)) {
        ensure!(
            back.elapsed() < Duration::from_secs(60),
            "no traffic through the tunnel 60 s after the link came back"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((noticed.as_secs_f64(), back.elapsed().as_secs_f64() * 1e3))
}

/// Raises the open-file soft limit to the hard one: the idle streams need
/// a few thousand descriptors here and in the tunnel processes, which
/// inherit the limit.
fn raise_fd_limit() -> Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit, which outlives the call.
    ensure!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0, "getrlimit");
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads one rlimit, which outlives the call.
    ensure!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0, "setrlimit");
    Ok(limit.rlim_cur)
}

/// Share of wall time some task waited for a CPU (system-wide) since `since`.
fn pressure_since(since: (Instant, Option<u64>)) -> String {
    match (since.1, cpu_pressure_us()) {
        (Some(before), Some(now)) => {
            format!("{:.0} %", (now - before) as f64 / since.0.elapsed().as_micros().max(1) as f64 * 100.0)
        }
        _ => "unknown".into(),
    }
}

/// Runs the tunnel benchmark and prints README's tables.
pub fn run(bin_dir: &Path) -> Result<()> {
    let Some(_kernel) = testing::privileged()? else { bail!("the tunnel benchmark needs root") };
    let fds = raise_fd_limit()?;
    ensure!(fds as usize >= 3 * IDLE_STREAMS + 500, "the open-file limit {fds} is too low for {IDLE_STREAMS} streams");
    println!("machine: {}", machine());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    let started = Instant::now();
    let stage = Stage::new(bin_dir)?;
    {
        // Proof that the tunnel ways cannot take the direct path.
        let _in_plain = stage.plain.join()?;
        let direct = stage
            .cloud
            .run(|| TcpStream::connect_timeout(&v4(NODE_IP, Service::Http.port()), Duration::from_secs(1)))?;
        ensure!(direct.is_err(), "the cloud reached {NODE_IP} without a tunnel: the stage proves nothing");
    }
    println!("stage up in {:.1} s; ssh negotiated cipher {}", started.elapsed().as_secs_f64(), stage.ssh_cipher);
    let timed_from = (Instant::now(), cpu_pressure_us());

    let mut memory = [Memory::default(); 5];
    for (i, way) in WAYS.into_iter().enumerate() {
        memory[i].fresh = stage.rss(way)?;
    }

    // Idle streams first, on fresh processes: one tunnel at a time, closed before the next.
    for (i, way) in WAYS.into_iter().enumerate().skip(1) {
        let (streams, reached, took) = open_idle(&stage, way, IDLE_STREAMS)?;
        // Let every stream's state settle (buffers handed out, tasks parked).
        std::thread::sleep(Duration::from_millis(500));
        memory[i].streams = stage.rss(way)?;
        (memory[i].reached, memory[i].took) = (reached, took);
        drop(streams);
        stage.idle_held.lock().unwrap_or_else(PoisonError::into_inner).clear();
        // A tunnel still choking on the burst would spoil the runs after it.
        wait_ready(&stage, way, Duration::from_secs(60))?;
    }
    // Throughput, loopback then WAN.
    let mut gbits = [[Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()], Default::default()];
    let mut retransmits = [[0u64; 5]; 2];
    let mut wan_dropped = 0;
    for (net, wan) in [false, true].into_iter().enumerate() {
        let line =
            if wan { Some(DelayLine::start(&stage.cloud, CLOUD_IP, &stage.edge, EDGE_LINK_IP, WAN)?) } else { None };
        if wan {
            // The tunnels' links are long-lived connections: they see the new path at their next packet.
            for way in WAYS {
                wait_ready(&stage, way, Duration::from_secs(10))?;
            }
        }
        interleave(IPERF_ROUNDS, |way| {
            let i = WAYS.iter().position(|w| *w == way).unwrap_or(0);
            let (rate, lost) = iperf(&stage, way)?;
            gbits[net][i].push(rate);
            retransmits[net][i] += lost;
            Ok(())
        })?;
        wan_dropped += line.as_ref().map_or(0, DelayLine::dropped);
    }
    println!(
        "\niperf3 single stream towards the edge, -t {IPERF_SECONDS}, Gbit/s, median (min–max) of {IPERF_ROUNDS} rounds, \
         ways alternating; ratios per round:\n"
    );
    println!(
        "| way | loopback (veth, no qdisc) | ÷ direct | WAN (25 ms each way, 1 Gbit/s) | ÷ direct | retransmits loopback / WAN |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (i, way) in WAYS.into_iter().enumerate() {
        println!(
            "| {} | {} | {} | {} | {} | {} / {} |",
            way.label(),
            spread(&gbits[0][i], 2),
            paired(&gbits[0][i], &gbits[0][0]),
            spread(&gbits[1][i], 3),
            paired(&gbits[1][i], &gbits[1][0]),
            retransmits[0][i],
            retransmits[1][i]
        );
    }
    println!("\n(packets the WAN emulator dropped, queue full: {wan_dropped})");

    // HTTP through each way, loopback.
    let mut latency: [Vec<WrkRun>; 5] = Default::default();
    let mut rates: [Vec<f64>; 5] = Default::default();
    interleave(WRK_ROUNDS, |way| {
        let i = WAYS.iter().position(|w| *w == way).unwrap_or(0);
        latency[i].push(wrk(&stage, way, 1, WRK_LATENCY_SECONDS)?);
        rates[i].push(wrk(&stage, way, WRK_CONNECTIONS, WRK_RATE_SECONDS)?.rate);
        Ok(())
    })?;
    println!(
        "\nwrk to a small HTTP server on the edge, loopback, {WRK_ROUNDS} rounds: one connection for {WRK_LATENCY_SECONDS} s \
         (latency), {WRK_CONNECTIONS} connections for {WRK_RATE_SECONDS} s (requests/s); median (min–max); added = \
         minus direct's in the same round:\n"
    );
    println!(
        "| way | p50 µs, 1 conn | p99 µs, 1 conn | added p50 µs | added p99 µs | requests/s, 1 conn | requests/s, {WRK_CONNECTIONS} conns | ÷ direct |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let p50 = |i: usize| latency[i].iter().map(|r| r.p50_us).collect::<Vec<_>>();
    let p99 = |i: usize| latency[i].iter().map(|r| r.p99_us).collect::<Vec<_>>();
    for (i, way) in WAYS.into_iter().enumerate() {
        let added = |of: &dyn Fn(usize) -> Vec<f64>| {
            let ours: Vec<f64> = of(i).iter().zip(of(0)).map(|(a, b)| a - b).collect();
            spread(&ours, 0)
        };
        let one: Vec<f64> = latency[i].iter().map(|r| r.rate).collect();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            way.label(),
            spread(&p50(i), 0),
            spread(&p99(i), 0),
            added(&p50),
            added(&p99),
            spread(&one, 0),
            spread(&rates[i], 0),
            paired(&rates[i], &rates[0])
        );
    }

    std::thread::sleep(Duration::from_secs(1));
    for (i, way) in WAYS.into_iter().enumerate() {
        memory[i].after = stage.rss(way)?;
    }
    println!(
        "\nresident memory (VmRSS, MiB) of the cloud side / the edge side; {IDLE_STREAMS} idle streams opened at once \
         through one tunnel at a time:\n"
    );
    println!(
        "| way | processes | idle, before any run | {IDLE_STREAMS} idle streams | KiB per stream (both sides) | idle, after the runs | all {IDLE_STREAMS} at the edge after |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    let mib = |(a, b): (u64, u64)| format!("{:.1} / {:.1}", a as f64 / 1024.0, b as f64 / 1024.0);
    for (i, way) in WAYS.into_iter().enumerate().skip(1) {
        let m = memory[i];
        let grown = (m.streams.0 + m.streams.1).saturating_sub(m.fresh.0 + m.fresh.1);
        let processes = match way {
            Way::Netd => "`netd tunnel-server` / `netd tunnel-agent`",
            Way::RatholeTcp | Way::RatholeNoise => "`rathole -s` / `rathole -c`",
            _ => "sshd (listener + session processes, summed) / ssh",
        };
        let reached = if m.reached >= IDLE_STREAMS as u64 {
            format!("{:.2} s", m.took.as_secs_f64())
        } else {
            format!("only {} within {} s", m.reached, IDLE_WAIT.as_secs())
        };
        println!(
            "| {} | {processes} | {} | {} | {:.1} | {} | {reached} |",
            way.label(),
            mib(m.fresh),
            mib(m.streams),
            grown as f64 / m.reached.max(1) as f64,
            mib(m.after)
        );
    }
    let pressure = pressure_since(timed_from);

    // Link cuts, last: they leave the agent's backoff state behind.
    let mut noticed = Vec::new();
    let mut back = Vec::new();
    for _ in 0..RELINK_TRIALS {
        let (n, b) = relink(&stage)?;
        noticed.push(n);
        back.push(b);
    }
    println!(
        "\nlink cut (edge's veth end down) → agent noticed → link up at once → first GET through netd, {RELINK_TRIALS} trials, \
         median (min–max):\n"
    );
    println!("| cut → agent noticed, s | link up → GET through the tunnel, ms |");
    println!("| ---: | ---: |");
    println!("| {} | **{}** |", spread(&noticed, 1), spread(&back, 0));

    println!(
        "\n- CPU pressure (some task waiting for a CPU, system-wide) during the throughput, HTTP and memory runs: {pressure}"
    );
    println!("- the whole run took {:.0} s", started.elapsed().as_secs_f64());
    drop(stage);
    Ok(())
}
