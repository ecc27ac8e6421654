//! The stage the tunnel benchmarks share (`cargo xtask bench tunnel` and
//! `cargo xtask bench doors`): a "cloud" and an "edge" namespace joined by
//! one veth (192.168.61.1 ↔ 192.168.61.2), the edge node's services, the
//! eBPF tunnel DNAT, and the real `netd-cloud tunnel-server` and `netd
//! tunnel-agent` release binaries; with the helpers both measure with.
//!
//! The edge node address 10.250.0.2 sits on the edge's `lo` and the cloud
//! has no route to it, so a cloud client reaches it only through a
//! connection the edge dialled out. netd's agent dials the server's agents
//! door; a cloud client in the DNAT cgroup dials `10.250.0.2:port`, connect4
//! sends it to the server's DNAT byte-stream door (:10263), and the server
//! opens an HTTP/2 stream to the agent, which dials the service.
//!
//! The server runs with all four doors on the cloud's veth address (agents
//! 10262, DNAT 10263, HTTP 10264, CONNECT 10265) and its `/metrics` on the
//! cloud's loopback.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netd::ebpf::dnat::{AttachOptions, Scope, TunnelDnat};
use netd::testing::{http_get, run_command, Cgroup, NetNs, NetdProcess, PinDir, VethPair};

use crate::bench::Listener;
use crate::bench_vxlan::cpu_pressure_us;

/// TCP buffer limits in both namespaces: the defaults' maxima (6 MiB
/// receive, 4 MiB send) would cap one connection near 0.5 Gbit/s at 50 ms
/// before an emulated 1 Gbit/s link does; 32 MiB leaves the link (and each
/// tunnel's own windows) as the limit, as on a host tuned for long fat links.
const SOCKET_BUFFERS: [(&str, &str); 2] =
    [("/proc/sys/net/ipv4/tcp_rmem", "4096 131072 33554432"), ("/proc/sys/net/ipv4/tcp_wmem", "4096 16384 33554432")];

pub(crate) const CLOUD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 61, 1);
pub(crate) const EDGE_LINK_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 61, 2);
/// The edge node's address, on the edge's `lo`; the cloud has no route to it.
pub(crate) const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
const NODE: &str = "edge-1";
/// The server's doors, all on [`CLOUD_IP`] (the CLI's default ports).
pub(crate) const AGENTS_PORT: u16 = 10262;
/// The DNAT byte-stream door: it carries any TCP, which is what the services speak.
pub(crate) const DNAT_PORT: u16 = 10263;
pub(crate) const HTTP_PORT: u16 = 10264;
pub(crate) const CONNECT_PORT: u16 = 10265;
pub(crate) const SERVER_METRICS: &str = "127.0.0.1:10266";
pub(crate) const AGENT_METRICS: &str = "127.0.0.1:10267";
/// What the edge HTTP server answers to every request.
pub(crate) const HTTP_BODY: &str = "hello from the edge\n";

pub(crate) fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// The services on the edge node, on all its addresses.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Service {
    Iperf,
    Http,
    Idle,
}

pub(crate) const SERVICES: [Service; 3] = [Service::Iperf, Service::Http, Service::Idle];

impl Service {
    pub(crate) fn port(self) -> u16 {
        match self {
            Service::Iperf => 5201,
            Service::Http => 8080,
            Service::Idle => 9000,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Service::Iperf => "iperf",
            Service::Http => "http",
            Service::Idle => "idle",
        }
    }
}

/// A listener on all the edge's addresses whose accepted connections go to `handle`.
pub(crate) fn edge_listener(edge: &NetNs, port: u16, handle: impl Fn(TcpStream) + Send + 'static) -> Result<Listener> {
    Listener::start(edge, v4(Ipv4Addr::UNSPECIFIED, port), handle).context("a listener on the edge")
}

/// HTTP/1.1 keep-alive: one fixed response per request head, a thread per
/// connection, until the client closes.
pub(crate) fn serve_http(mut stream: TcpStream) {
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
pub(crate) fn start(
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
pub(crate) fn client(ns: &NetNs, cgroup: &Cgroup, program: &str, args: &[String]) -> Result<String> {
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

pub(crate) fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// One single-stream `iperf3 -c addr -t seconds` from `ns` in `cgroup`;
/// Gbit/s received and the sender's retransmits.
pub(crate) fn iperf3(ns: &NetNs, cgroup: &Cgroup, addr: SocketAddr, seconds: u32, label: &str) -> Result<(f64, u64)> {
    let args =
        strings(&["-c", &addr.ip().to_string(), "-p", &addr.port().to_string(), "-t", &seconds.to_string(), "-J"]);
    // iperf3's server takes a moment after a test to accept the next one
    // (longer when the last close crosses a tunnel): "busy" is retried.
    let (mut tries, mut resets) = (0, 0);
    let json: serde_json::Value = loop {
        let run = client(ns, cgroup, "iperf3", &args);
        let text = match &run {
            Ok(out) => out.clone(),
            Err(err) => err.to_string(),
        };
        if text.contains("server is busy") && tries < 20 {
            tries += 1;
            std::thread::sleep(Duration::from_millis(250));
            continue;
        }
        // The control connection reset before the test began (no stream
        // connected, no interval): the run measured nothing, so it is run
        // again, said aloud. Twice in a row fails the benchmark.
        let reset_at_start = serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|json| {
            json["error"].as_str().is_some_and(|e| e.contains("unable to receive control message"))
                && json["start"]["connected"].as_array().is_some_and(Vec::is_empty)
        });
        if reset_at_start && resets < 1 {
            resets += 1;
            eprintln!("note: iperf3 through {label}: the control connection was reset before the test began; again");
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        let out = run.with_context(|| label.to_string())?;
        break serde_json::from_str(&out).with_context(|| format!("iperf3 -J output through {label}"))?;
    };
    let out = json.to_string();
    let bits = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("through {label}: no end.sum_received in iperf3's output: {out}"))?;
    let retransmits = json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bits / 1e9, retransmits))
}

/// One GET through `addr` from `ns`; true on a 200 with the edge's body.
pub(crate) fn http_ok(ns: &NetNs, addr: SocketAddr) -> bool {
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

/// Waits until a GET through `addr` from `ns` in `cgroup` works (`what`'s
/// path is up end to end).
pub(crate) fn wait_get(ns: &NetNs, cgroup: &Cgroup, addr: SocketAddr, limit: Duration, what: &str) -> Result<()> {
    let started = Instant::now();
    let _in_cgroup = cgroup.join()?;
    while !http_ok(ns, addr) {
        if started.elapsed() > limit {
            bail!("{what} did not carry a GET within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Raises the open-file limit: the hard one to `wanted` when it is lower
/// (root may, up to `fs.nr_open`), the soft one to the hard one. Processes
/// started afterwards (the tunnel's) inherit it. Returns the limit now in
/// force, which may be below `wanted` when the hard limit could not move.
pub(crate) fn raise_fd_limit(wanted: u64) -> Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit, which outlives the call.
    ensure!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0, "getrlimit");
    if limit.rlim_max < wanted {
        let raised = libc::rlimit { rlim_cur: wanted, rlim_max: wanted };
        // SAFETY: setrlimit reads one rlimit, which outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(wanted);
        }
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads one rlimit, which outlives the call.
    ensure!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0, "setrlimit");
    Ok(limit.rlim_cur)
}

/// Share of wall time some task waited for a CPU (system-wide) since `since`.
pub(crate) fn pressure_since(since: (Instant, Option<u64>)) -> String {
    match (since.1, cpu_pressure_us()) {
        (Some(before), Some(now)) => {
            format!("{:.0} %", (now - before) as f64 / since.0.elapsed().as_micros().max(1) as f64 * 100.0)
        }
        _ => "unknown".into(),
    }
}

/// Now and the CPU pressure counter, for [`pressure_since`].
pub(crate) fn pressure_mark() -> (Instant, Option<u64>) {
    (Instant::now(), cpu_pressure_us())
}

/// CPU time (user + system) `pid` has used so far, seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |at: usize| fields.get(at).and_then(|f| f.parse::<u64>().ok()).context("/proc/<pid>/stat");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // utime and stime: fields 14 and 15, the 12th and 13th after the command.
    Ok((ticks(11)? + ticks(12)?) as f64 / hz)
}

/// The machine's load average, as `/proc/loadavg` gives it (1, 5, 15 min).
pub(crate) fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The eBPF tunnel DNAT of a cloud namespace, as bench_dnat attaches it:
/// programs on `attached`, the tunnel server (whose DNAT door must see the
/// original destination) in its child `server`, the redirected clients in
/// its child `client`. Fields drop in order: programs, pins, then the
/// cgroups, children first.
pub(crate) struct CloudDnat {
    pub(crate) dnat: TunnelDnat,
    pub(crate) pins: PinDir,
    /// Clients whose connections to the edge are redirected.
    pub(crate) client: Cgroup,
    /// Where the tunnel server runs.
    pub(crate) server: Cgroup,
    pub(crate) attached: Cgroup,
}

impl CloudDnat {
    /// Attaches the programs with [`CLOUD_IP`] as the target and the
    /// cloud's network as the "host network"; `rules` are (dialled port,
    /// door port). Pod subnets: `dnat.set_edge_subnets`.
    pub(crate) fn attach(
        cloud: &NetNs,
        rules: impl IntoIterator<Item = (u16, u16)>,
        edge_nodes: impl IntoIterator<Item = Ipv4Addr>,
    ) -> Result<Self> {
        let attached = Cgroup::new()?;
        let server = attached.child("server")?;
        let client = attached.child("client")?;
        let pins = PinDir::new()?;
        let (mut dnat, _) = TunnelDnat::load_or_attach(&AttachOptions {
            pin_dir: pins.path().to_path_buf(),
            cgroup: Some(attached.path().to_path_buf()),
            original_dst_cgroup: Some(server.path().to_path_buf()),
        })?;
        cloud.run(|| dnat.set_target(CLOUD_IP, Scope::HostNetwork))??;
        dnat.set_port_rules(rules)?;
        dnat.set_edge_nodes(edge_nodes)?;
        Ok(Self { dnat, pins, client, server, attached })
    }
}

/// The tunnel's certificates under `dir`, made by the real `netd-cloud
/// certs`: a CA, the server's (IP SAN [`CLOUD_IP`]) and one edge node's.
pub(crate) struct TunnelCerts {
    pub(crate) ca: PathBuf,
    pub(crate) server: PathBuf,
    pub(crate) node: PathBuf,
}

impl TunnelCerts {
    pub(crate) fn issue(netd_cloud: &str, dir: &Path, node: &str, node_ip: Ipv4Addr) -> Result<Self> {
        let certs = Self { ca: dir.join("ca"), server: dir.join("server"), node: dir.join("node") };
        let path = |p: &Path| p.to_string_lossy().into_owned();
        run_command(netd_cloud, &["certs", "ca", "--out", &path(&certs.ca)])?;
        let cloud_ip = CLOUD_IP.to_string();
        run_command(
            netd_cloud,
            &["certs", "server", "--ca-dir", &path(&certs.ca), "--ip", &cloud_ip, "--out", &path(&certs.server)],
        )?;
        let node_ip = node_ip.to_string();
        run_command(
            netd_cloud,
            &[
                "certs",
                "node",
                "--ca-dir",
                &path(&certs.ca),
                "--name",
                node,
                "--ip",
                &node_ip,
                "--out",
                &path(&certs.node),
            ],
        )?;
        Ok(certs)
    }
}

/// `netd-cloud tunnel-server` with all four doors on [`CLOUD_IP`], the
/// DNAT pinned under `pins`, its `/metrics` on [`SERVER_METRICS`].
pub(crate) fn server_args_for(certs: &TunnelCerts, pins: &PinDir) -> Vec<String> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    strings(&[
        "tunnel-server",
        "--cert-dir",
        &path(&certs.server),
        "--address",
        &CLOUD_IP.to_string(),
        "--agents-listen",
        &v4(CLOUD_IP, AGENTS_PORT).to_string(),
        "--connect-listen",
        &v4(CLOUD_IP, CONNECT_PORT).to_string(),
        "--dnat-listen",
        &v4(CLOUD_IP, DNAT_PORT).to_string(),
        "--http-listen",
        &v4(CLOUD_IP, HTTP_PORT).to_string(),
        "--dnat-pin-dir",
        &path(pins.path()),
        "--metrics-listen",
        SERVER_METRICS,
        "--log",
        "warn",
    ])
}

/// `netd tunnel-agent` dialling the server on [`CLOUD_IP`], allowed
/// `extra_ports` besides the kubelet's, its `/metrics` on [`AGENT_METRICS`].
pub(crate) fn agent_args_for(certs: &TunnelCerts, extra_ports: &[u16]) -> Vec<String> {
    let extra_ports: Vec<String> = extra_ports.iter().map(u16::to_string).collect();
    strings(&[
        "tunnel-agent",
        "--server",
        &v4(CLOUD_IP, AGENTS_PORT).to_string(),
        "--cert-dir",
        &certs.node.to_string_lossy(),
        "--extra-ports",
        &extra_ports.join(","),
        "--metrics-listen",
        AGENT_METRICS,
        "--log",
        "warn",
    ])
}

/// Everything netd's tunnel needs; fields drop in order (processes first,
/// namespaces last).
pub(crate) struct NetdLab {
    _processes: Vec<NetdProcess>,
    pub(crate) server_pid: u32,
    pub(crate) agent_pid: u32,
    _http: Listener,
    pub(crate) idle: Listener,
    pub(crate) idle_held: Arc<Mutex<Vec<TcpStream>>>,
    _dnat: TunnelDnat,
    _pins: PinDir,
    /// Under the attached cgroup: clients whose connections to the edge are redirected.
    pub(crate) netd_client: Cgroup,
    _netd_server: Cgroup,
    _attached: Cgroup,
    /// No programs: clients the DNAT leaves alone.
    pub(crate) plain: Cgroup,
    _veth: VethPair,
    pub(crate) edge: NetNs,
    pub(crate) cloud: NetNs,
    pub(crate) dir: tempfile::TempDir,
}

impl NetdLab {
    /// Builds the stage and waits until a GET through the tunnel works.
    /// `server_args` are added to the server's command line; `port_rules`
    /// (edge port → door port) to the DNAT's, which sends every service's
    /// port to the DNAT byte-stream door.
    pub(crate) fn new(bin_dir: &Path, server_args: &[String], port_rules: &[(u16, u16)]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let netd = bin_dir.join("netd").to_string_lossy().into_owned();
        let netd_cloud = bin_dir.join("netd-cloud").to_string_lossy().into_owned();

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

        let rules = SERVICES.map(|s| (s.port(), DNAT_PORT)).into_iter().chain(port_rules.iter().copied());
        let CloudDnat { dnat, pins, attached, server: netd_server, client: netd_client } =
            CloudDnat::attach(&cloud, rules, [NODE_IP])?;
        let plain = Cgroup::new()?;

        let http = edge_listener(&edge, Service::Http.port(), serve_http)?;
        let idle_held = Arc::new(Mutex::new(Vec::new()));
        let idle = {
            let held = idle_held.clone();
            edge_listener(&edge, Service::Idle.port(), move |stream| {
                held.lock().unwrap_or_else(PoisonError::into_inner).push(stream);
            })?
        };
        let iperf_port = Service::Iperf.port().to_string();
        let iperf_server = start(&edge, None, d, "iperf3-server", "iperf3", &strings(&["-s", "-p", &iperf_port]))?;

        // Certificates, then the server in its cgroup, the agent on the edge.
        let certs = TunnelCerts::issue(&netd_cloud, d, NODE, NODE_IP)?;
        let mut args = server_args_for(&certs, &pins);
        args.extend_from_slice(server_args);
        let server = start(&cloud, Some(&netd_server), d, "netd-tunnel-server", &netd_cloud, &args)?;
        let extra_ports: Vec<u16> = SERVICES.map(|s| s.port()).into();
        let agent = start(&edge, None, d, "netd-tunnel-agent", &netd, &agent_args_for(&certs, &extra_ports))?;
        let pid = |p: &NetdProcess| p.pid().context("a process exited at once");
        let (server_pid, agent_pid) = (pid(&server)?, pid(&agent)?);

        let lab = Self {
            _processes: vec![server, agent, iperf_server],
            server_pid,
            agent_pid,
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
        lab.wait_ready(Duration::from_secs(30)).map_err(|e| e.context(lab.logs()))?;
        Ok(lab)
    }

    /// Where a cloud client in [`NetdLab::netd_client`] dials `service`
    /// through the tunnel.
    pub(crate) fn addr(service: Service) -> SocketAddr {
        v4(NODE_IP, service.port())
    }

    /// Waits until a GET through the tunnel works.
    pub(crate) fn wait_ready(&self, limit: Duration) -> Result<()> {
        wait_get(&self.cloud, &self.netd_client, Self::addr(Service::Http), limit, "the netd tunnel")
    }

    /// The processes' logs (last lines of each), for an error message.
    pub(crate) fn logs(&self) -> String {
        let mut out = String::from("logs:");
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for entry in entries.filter_map(|e| e.ok()) {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    out.push_str(&format!("\n--- {}:", entry.file_name().to_string_lossy()));
                    for line in tail.into_iter().rev() {
                        out.push('\n');
                        out.push_str(line);
                    }
                }
            }
        }
        out
    }

    /// The agent's links up now, per its metrics.
    pub(crate) fn agent_links_up(&self) -> Option<u64> {
        let body = http_get(&self.edge, AGENT_METRICS, "/metrics")?;
        body.lines().find_map(|l| l.strip_prefix("netd_tunnel_agent_links_up ")?.trim().parse().ok())
    }

    /// The agent's `/metrics` text, or `None` when it does not answer.
    pub(crate) fn agent_metrics(&self) -> Option<String> {
        http_get(&self.edge, AGENT_METRICS, "/metrics")
    }

    /// The server's `/metrics` text, or `None` when it does not answer.
    pub(crate) fn server_metrics(&self) -> Option<String> {
        http_get(&self.cloud, SERVER_METRICS, "/metrics")
    }
}
