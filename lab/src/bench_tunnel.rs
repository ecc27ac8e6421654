//! `cargo xtask bench tunnel`: the edge tunnel (`netd-cloud tunnel-server` +
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
//! - netd ([`NetdLab`]): a cloud client in the DNAT cgroup dials
//!   `10.250.0.2:port`; connect4 sends it to the server's DNAT byte-stream
//!   door (:10263), the server opens an HTTP/2 stream to the agent, which
//!   dials the service.
//! - rathole / ssh: the cloud client dials the listener they open on the
//!   cloud's loopback (one port range each).
//!
//! Measured: single-stream iperf3 throughput (loopback = the veth without
//! any qdisc; WAN = the same addresses routed through [`DelayLine`], 25 ms
//! each way (50 ms RTT) at 1 Gbit/s, as netem `delay 25ms rate 1gbit` would
//! on both veth ends: this kernel has no netem), wrk latency at one connection and requests/s at 16 connections to
//! a small HTTP server on the edge (in this process), what each tunnel's two processes spend per request at one
//! connection (CPU in user space and in the kernel, sleeps: where added latency comes from), resident memory of
//! each tunnel's two processes with 0 and 1 000 idle streams, and
//! the time from a cut link coming back to traffic flowing through netd.
//!
//! Everything is built before the first timed round and torn down after
//! the last; variants alternate within every round in rotating order.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netd::testing::{self, run_command, Cgroup, NetNs, NetdProcess};

use crate::bench::{machine, paired, spread, Scale};
use crate::bench_rss::status_kib;
use crate::delay_line::{DelayLine, Shape};
use crate::plot::{Chart, Kind, Series, Stat};
use crate::tunnel_lab::{
    client, http_ok, iperf3, load_average, pressure_mark, pressure_since, raise_fd_limit, start, strings, v4, wait_get,
    NetdLab, Service, CLOUD_IP, EDGE_LINK_IP, NODE_IP, SERVICES,
};

/// What one run measures: the book's sizes ([`FULL`]) or a smoke run's.
#[derive(Clone, Copy)]
struct Plan {
    /// iperf3 rounds per variant and network, seconds per run.
    iperf_rounds: usize,
    iperf_seconds: u32,
    /// wrk rounds per variant; seconds at one connection (latency) and at
    /// `wrk_connections` (requests/s).
    wrk_rounds: usize,
    wrk_latency_seconds: u32,
    wrk_rate_seconds: u32,
    wrk_connections: u32,
    /// Idle streams held open for the memory figures.
    idle_streams: usize,
    /// Link cuts timed (each takes up to 15 s for the agent to notice).
    relink_trials: usize,
}

/// The figures: `-t 4`, two rounds; 1 000 idle streams; three link cuts.
const FULL: Plan = Plan {
    iperf_rounds: 2,
    iperf_seconds: 4,
    wrk_rounds: 2,
    wrk_latency_seconds: 4,
    wrk_rate_seconds: 2,
    wrk_connections: 16,
    idle_streams: 1_000,
    relink_trials: 3,
};

/// Every step once, briefly.
const SMOKE: Plan = Plan {
    iperf_rounds: 1,
    iperf_seconds: 1,
    wrk_rounds: 1,
    wrk_latency_seconds: 1,
    wrk_rate_seconds: 1,
    wrk_connections: 4,
    idle_streams: 20,
    relink_trials: 1,
};

fn plan() -> Plan {
    Scale::sized(FULL, SMOKE)
}

/// How long Linux's BBR keeps a minimum RTT before it probes again (its
/// `bbr_min_rtt_win_sec`, 10 s), and a margin.
const BBR_MIN_RTT_WINDOW: Duration = Duration::from_secs(12);

/// The longest the idle streams may take to reach the edge.
const IDLE_WAIT: Duration = Duration::from_secs(30);
/// The emulated WAN: 25 ms each way (50 ms RTT) at 1 Gbit/s; the queue
/// holds well over one bandwidth-delay product (1 Gbit/s × 50 ms ≈ 6 MB,
/// ~100 of the relay's 64 KiB segments or ~4 200 full-size packets), so the
/// emulator itself drops nothing.
const WAN: Shape = Shape { delay: Duration::from_millis(25), rate: 1_000_000_000, limit: 20_000 };

const RATHOLE_TCP_PORT: u16 = 2333;
const RATHOLE_NOISE_PORT: u16 = 2334;
const SSH_PORT: u16 = 2222;
const RATHOLE_TOKEN: &str = "netd-bench";

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
            Way::Netd => "**netd tunnel** (DNAT → TLS 1.3 + netd-mux/1)",
            Way::RatholeTcp => "rathole 0.5, plain TCP",
            Way::RatholeNoise => "rathole 0.5, noise",
            Way::Ssh => "OpenSSH `ssh -R`",
        }
    }

    /// The label without markdown, for the charts' legends.
    fn name(self) -> &'static str {
        match self {
            Way::Direct => "direct (floor)",
            Way::Netd => "netd tunnel (DNAT → TLS 1.3 + netd-mux/1)",
            Way::RatholeTcp => "rathole 0.5, plain TCP",
            Way::RatholeNoise => "rathole 0.5, noise",
            Way::Ssh => "OpenSSH ssh -R",
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
            Way::Netd => NetdLab::addr(service),
            _ => v4(Ipv4Addr::LOCALHOST, service.port() + self.offset()),
        }
    }
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

/// Waits until a GET through `way` works (its tunnel is up end to end).
fn wait_ready(stage: &Stage, way: Way, limit: Duration) -> Result<()> {
    wait_get(&stage.lab.cloud, stage.cgroup_of(way), way.addr(Service::Http), limit, way.label())
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

/// The fields of a /proc/PID/stat line from field 3 (state) on: the
/// command before them may hold spaces and parentheses, so they start after
/// the last ')'. Field n of proc(5) is at index n - 3.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default()
}

/// `pid` and all its descendants (sshd forks a session process per login).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.filter_map(|e| e.ok()) {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            let ppid = stat_fields(&stat).get(1).and_then(|f| f.parse().ok());
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

/// What the kernel has accounted to a process so far, all its threads:
/// CPU time in user space and in the kernel, and voluntary context
/// switches (each time a thread went to sleep waiting for something).
#[derive(Clone, Copy, Default, Debug)]
struct ProcessCost {
    user: Duration,
    system: Duration,
    sleeps: u64,
}

impl ProcessCost {
    /// `pid`'s totals: `utime`/`stime` of /proc/PID/stat (the whole thread
    /// group; the kernel splits the exact run time between the two by
    /// its tick samples) and every thread's `voluntary_ctxt_switches`.
    fn of(pid: u32) -> Result<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let fields = stat_fields(&stat);
        let ticks = |n: usize| -> Result<u64> {
            fields.get(n - 3).and_then(|f| f.parse().ok()).with_context(|| format!("field {n} of /proc/{pid}/stat"))
        };
        // SAFETY: sysconf reads a constant and has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let from_ticks = |t: u64| Duration::from_nanos(t * 1_000_000_000 / hz);
        let mut sleeps = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.filter_map(|e| e.ok()) {
            // A thread that exits meanwhile takes its count with it.
            if let Ok(status) = std::fs::read_to_string(task.path().join("status")) {
                sleeps += status
                    .lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:")?.trim().parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        Ok(Self { user: from_ticks(ticks(14)?), system: from_ticks(ticks(15)?), sleeps })
    }

    /// The summed costs of `pid`'s process tree (sshd forks a process per
    /// session). A child that exits between the listing and the reading
    /// is left out; `pid` itself must be there.
    fn of_tree(pid: u32) -> Result<Self> {
        let mut sum = Self::of(pid)?;
        for child in process_tree(pid).into_iter().filter(|&p| p != pid) {
            if let Ok(cost) = Self::of(child) {
                sum = sum.plus(cost);
            }
        }
        Ok(sum)
    }

    fn plus(self, other: Self) -> Self {
        Self { user: self.user + other.user, system: self.system + other.system, sleeps: self.sleeps + other.sleeps }
    }

    /// What was accounted between `before` and `self`.
    fn since(self, before: Self) -> Self {
        Self {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
            sleeps: self.sleeps.saturating_sub(before.sleeps),
        }
    }
}

/// A tunnel's cost per request of one wrk round at one connection, for
/// its cloud side and its edge side: µs of user CPU, µs of kernel CPU,
/// sleeps.
#[derive(Clone, Copy, Default)]
struct PerRequest {
    cloud: (f64, f64, f64),
    edge: (f64, f64, f64),
}

impl PerRequest {
    fn new((cloud, edge): (ProcessCost, ProcessCost), requests: u64) -> Self {
        let n = requests.max(1) as f64;
        let per =
            |c: ProcessCost| (c.user.as_secs_f64() * 1e6 / n, c.system.as_secs_f64() * 1e6 / n, c.sleeps as f64 / n);
        Self { cloud: per(cloud), edge: per(edge) }
    }
}

/// Everything the runs use; fields drop in order (the other tunnels'
/// processes first, then netd's stage, namespaces last).
struct Stage {
    _processes: Vec<NetdProcess>,
    rathole_pids: [(u32, u32); 2],
    sshd_pid: u32,
    ssh_pid: u32,
    ssh_cipher: String,
    lab: NetdLab,
}

impl Stage {
    fn cgroup_of(&self, way: Way) -> &Cgroup {
        if way == Way::Netd {
            &self.lab.netd_client
        } else {
            &self.lab.plain
        }
    }

    fn new(bin_dir: &Path) -> Result<Self> {
        let rathole = rathole_binary()?;
        let lab = NetdLab::new(bin_dir, &[], &[])?;
        let (cloud, edge, d) = (&lab.cloud, &lab.edge, lab.dir.path());
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let pid = |p: &NetdProcess| p.pid().context("a process exited at once");
        let mut processes = Vec::new();

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
                cloud,
                None,
                d,
                &format!("rathole-server-{i}"),
                &rathole,
                &strings(&["-s", &path(&server_file)]),
            )?;
            let client =
                start(edge, None, d, &format!("rathole-client-{i}"), &rathole, &strings(&["-c", &path(&client_file)]))?;
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
            cloud,
            None,
            d,
            "sshd",
            "/usr/sbin/sshd",
            &strings(&["-D", "-e", "-f", &path(&d.join("sshd_config"))]),
        )?;
        // ssh tries once: start it only when sshd listens.
        wait_listening(cloud, v4(CLOUD_IP, SSH_PORT)).with_context(|| sshd_log(d))?;
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
        let ssh = start(edge, None, d, "ssh", "ssh", &ssh_args)?;
        let (sshd_pid, ssh_pid) = (pid(&sshd)?, pid(&ssh)?);
        processes.extend([sshd, ssh]);

        let mut stage = Self { _processes: processes, rathole_pids, sshd_pid, ssh_pid, ssh_cipher: String::new(), lab };
        for way in WAYS {
            wait_ready(&stage, way, Duration::from_secs(30)).map_err(|e| e.context(stage.lab.logs()))?;
        }
        let ssh_log = std::fs::read_to_string(stage.lab.dir.path().join("ssh.log")).unwrap_or_default();
        stage.ssh_cipher = ssh_log
            .lines()
            .find_map(|l| l.split("server->client cipher: ").nth(1))
            .map(|rest| rest.split_whitespace().next().unwrap_or(rest).to_string())
            .unwrap_or_else(|| "(not found in ssh -v output)".into());
        Ok(stage)
    }

    /// What the kernel has accounted so far to a tunnel's cloud side and
    /// edge side (the same processes as [`rss`](Self::rss)).
    fn cost(&self, way: Way) -> Result<(ProcessCost, ProcessCost)> {
        Ok(match way {
            Way::Direct => Default::default(),
            Way::Netd => (ProcessCost::of(self.lab.server_pid)?, ProcessCost::of(self.lab.agent_pid)?),
            Way::RatholeTcp | Way::RatholeNoise => {
                let (server, client) = self.rathole_pids[usize::from(way == Way::RatholeNoise)];
                (ProcessCost::of(server)?, ProcessCost::of(client)?)
            }
            Way::Ssh => (ProcessCost::of_tree(self.sshd_pid)?, ProcessCost::of(self.ssh_pid)?),
        })
    }

    /// Server and agent (or sshd tree and ssh) resident KiB of a tunnel.
    fn rss(&self, way: Way) -> Result<(u64, u64)> {
        Ok(match way {
            Way::Direct => (0, 0),
            Way::Netd => (status_kib(self.lab.server_pid, "VmRSS:")?, status_kib(self.lab.agent_pid, "VmRSS:")?),
            Way::RatholeTcp | Way::RatholeNoise => {
                let (server, client) = self.rathole_pids[usize::from(way == Way::RatholeNoise)];
                (status_kib(server, "VmRSS:")?, status_kib(client, "VmRSS:")?)
            }
            Way::Ssh => (tree_rss(self.sshd_pid)?, status_kib(self.ssh_pid, "VmRSS:")?),
        })
    }
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
    iperf3(&stage.lab.cloud, stage.cgroup_of(way), way.addr(Service::Iperf), plan().iperf_seconds, way.label())
}

/// What wrk reports: p50 and p99 latency in µs, requests/s, requests completed.
struct WrkRun {
    p50_us: f64,
    p99_us: f64,
    rate: f64,
    requests: u64,
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
    let out = client(&stage.lab.cloud, stage.cgroup_of(way), "wrk", &args).with_context(|| way.label())?;
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
    // "  12345 requests in 4.00s, 1.2MB read"
    let requests = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.trim().parse().ok()))
        .with_context(|| format!("no request count in wrk's output:\n{out}"))?;
    Ok(WrkRun { p50_us: percentile("50%")?, p99_us: percentile("99%")?, rate, requests })
}

/// Opens `n` connections through `way` to the edge's idle listener and
/// waits until all are accepted there (so the tunnel holds `n` streams), at
/// most [`IDLE_WAIT`]: the streams, how many reached the edge, and how long
/// that took.
fn open_idle(stage: &Stage, way: Way, n: usize) -> Result<(Vec<TcpStream>, u64, Duration)> {
    let before = stage.lab.idle.count();
    let addr = way.addr(Service::Idle);
    let started = Instant::now();
    let streams = {
        let _in_cgroup = stage.cgroup_of(way).join()?;
        stage.lab.cloud.run(|| (0..n).map(|_| TcpStream::connect(addr)).collect::<std::io::Result<Vec<_>>>())??
    };
    while stage.lab.idle.count() < before + n as u64 && started.elapsed() < IDLE_WAIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((streams, stage.lab.idle.count() - before, started.elapsed()))
}

/// The non-zero refusal and failure counters in a `/metrics` text.
fn failure_counters(metrics: Option<String>) -> String {
    let Some(text) = metrics else { return "no /metrics answer".into() };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && (l.contains("refused") || l.contains("fail") || l.contains("timeout")))
        .filter(|l| l.rsplit(' ').next().is_some_and(|v| v.parse::<f64>().is_ok_and(|v| v > 0.0)))
        .collect();
    if lines.is_empty() {
        "no refusal or failure counted".into()
    } else {
        format!("`{}`", lines.join("`, `"))
    }
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
    ensure!(stage.lab.agent_links_up() == Some(1), "the agent is not linked before the cut");
    // The edge's uplink goes down: its route to the cloud goes with it, so
    // the agent's redials fail at once (ENETUNREACH) while it is down.
    stage.lab.edge.ip(&["link", "set", "eth0", "down"])?;
    let cut = Instant::now();
    while stage.lab.agent_links_up() != Some(0) {
        ensure!(cut.elapsed() < Duration::from_secs(30), "the agent did not notice the cut within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let noticed = cut.elapsed();
    stage.lab.edge.ip(&["link", "set", "eth0", "up"])?;
    let back = Instant::now();
    let _in_cgroup = stage.lab.netd_client.join()?;
    while !http_ok(&stage.lab.cloud, Way::Netd.addr(Service::Http)) {
        ensure!(
            back.elapsed() < Duration::from_secs(60),
            "no traffic through the tunnel 60 s after the link came back"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((noticed.as_secs_f64(), back.elapsed().as_secs_f64() * 1e3))
}

/// Runs the tunnel benchmark and prints the book's tables.
pub fn run(bin_dir: &Path) -> Result<()> {
    let Some(_kernel) = testing::privileged()? else { bail!("the tunnel benchmark needs root") };
    let Plan {
        iperf_rounds,
        iperf_seconds,
        wrk_rounds,
        wrk_latency_seconds,
        wrk_rate_seconds,
        wrk_connections,
        idle_streams,
        relink_trials,
    } = plan();
    let fds = raise_fd_limit(3 * idle_streams as u64 + 500)?;
    ensure!(fds as usize >= 3 * idle_streams + 500, "the open-file limit {fds} is too low for {idle_streams} streams");
    println!("machine: {}", machine());
    println!("load average at start: {}", load_average());
    let started = Instant::now();
    let stage = Stage::new(bin_dir)?;
    {
        // Proof that the tunnel ways cannot take the direct path.
        let _in_plain = stage.lab.plain.join()?;
        let direct = stage
            .lab
            .cloud
            .run(|| TcpStream::connect_timeout(&v4(NODE_IP, Service::Http.port()), Duration::from_secs(1)))?;
        ensure!(direct.is_err(), "the cloud reached {NODE_IP} without a tunnel: the stage proves nothing");
    }
    println!("stage up in {:.1} s; ssh negotiated cipher {}", started.elapsed().as_secs_f64(), stage.ssh_cipher);
    let timed_from = pressure_mark();

    let mut memory = [Memory::default(); 5];
    for (i, way) in WAYS.into_iter().enumerate() {
        memory[i].fresh = stage.rss(way)?;
    }

    // Idle streams first, on fresh processes: one tunnel at a time, closed before the next.
    let mut idle_notes = Vec::new();
    for (i, way) in WAYS.into_iter().enumerate().skip(1) {
        let (streams, reached, took) = open_idle(&stage, way, idle_streams)?;
        if way == Way::Netd && reached < idle_streams as u64 {
            // Where the missing streams went, from both processes' counters.
            idle_notes.push(format!(
                "netd's idle streams that did not reach the edge: agent {}; server {}",
                failure_counters(stage.lab.agent_metrics()),
                failure_counters(stage.lab.server_metrics())
            ));
        }
        // Let every stream's state settle (buffers handed out, tasks parked).
        std::thread::sleep(Duration::from_millis(500));
        memory[i].streams = stage.rss(way)?;
        (memory[i].reached, memory[i].took) = (reached, took);
        drop(streams);
        stage.lab.idle_held.lock().unwrap_or_else(PoisonError::into_inner).clear();
        // A tunnel still choking on the burst would spoil the runs after it.
        wait_ready(&stage, way, Duration::from_secs(60))?;
    }
    // Throughput, loopback then WAN.
    let mut gbits = [[Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()], Default::default()];
    let mut retransmits = [[0u64; 5]; 2];
    let mut wan_dropped = 0;
    for (net, wan) in [false, true].into_iter().enumerate() {
        let line = if wan {
            Some(DelayLine::start(&stage.lab.cloud, CLOUD_IP, &stage.lab.edge, EDGE_LINK_IP, WAN)?)
        } else {
            None
        };
        if wan {
            // The tunnels' links are long-lived connections: they see the new path at their next packet.
            for way in WAYS {
                wait_ready(&stage, way, Duration::from_secs(10))?;
            }
            // A link that lived on the veth carries its congestion control's
            // picture of it onto the WAN: BBR (this kernel's default) keeps
            // the minimum RTT it saw for 10 s, the veth's ~15 µs, and caps
            // the link's window at twice bandwidth × that RTT, so a round
            // right after the switch crawled (one at 0.02 Gbit/s). A real
            // edge link is made on its WAN: wait out that window.
            std::thread::sleep(Scale::sized(BBR_MIN_RTT_WINDOW, Duration::ZERO));
        }
        interleave(iperf_rounds, |way| {
            let i = WAYS.iter().position(|w| *w == way).unwrap_or(0);
            let (rate, lost) = iperf(&stage, way)?;
            gbits[net][i].push(rate);
            retransmits[net][i] += lost;
            Ok(())
        })?;
        wan_dropped += line.as_ref().map_or(0, DelayLine::dropped);
    }
    println!(
        "\niperf3 single stream towards the edge, -t {iperf_seconds}, Gbit/s, median (min–max) of {iperf_rounds} rounds, \
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
    let series = |of: &dyn Fn(usize) -> [Vec<f64>; 2]| -> Vec<Series> {
        WAYS.into_iter()
            .enumerate()
            .map(|(i, way)| Series {
                name: way.name().into(),
                points: of(i).iter().enumerate().map(|(at, samples)| (at as f64, Stat::of(samples))).collect(),
            })
            .collect()
    };
    crate::plot::write(
        &crate::plot::file("tunnel", "throughput"),
        &Chart {
            title: format!(
                "Tunnel throughput: one iperf3 stream towards the edge (median of {iperf_rounds} rounds, whiskers min–max)"
            ),
            x_label: "link".into(),
            y_label: "throughput, Gbit/s".into(),
            kind: Kind::Bars {
                categories: vec!["loopback (veth, no qdisc)".into(), "WAN (25 ms each way, 1 Gbit/s)".into()],
            },
            series: series(&|i| [gbits[0][i].clone(), gbits[1][i].clone()]),
            footnote: crate::plot::footnote(),
        },
    )?;

    // HTTP through each way, loopback.
    let mut latency: [Vec<WrkRun>; 5] = Default::default();
    // What each tunnel's processes spent in the one-connection rounds.
    let mut costs: [Vec<PerRequest>; 5] = Default::default();
    let mut rates: [Vec<f64>; 5] = Default::default();
    interleave(wrk_rounds, |way| {
        let i = WAYS.iter().position(|w| *w == way).unwrap_or(0);
        let before = stage.cost(way)?;
        let run = wrk(&stage, way, 1, wrk_latency_seconds)?;
        let after = stage.cost(way)?;
        costs[i].push(PerRequest::new((after.0.since(before.0), after.1.since(before.1)), run.requests));
        latency[i].push(run);
        rates[i].push(wrk(&stage, way, wrk_connections, wrk_rate_seconds)?.rate);
        Ok(())
    })?;
    println!(
        "\nwrk to a small HTTP server on the edge, loopback, {wrk_rounds} rounds: one connection for {wrk_latency_seconds} s \
         (latency), {wrk_connections} connections for {wrk_rate_seconds} s (requests/s); median (min–max); added = \
         minus direct's in the same round:\n"
    );
    println!(
        "| way | p50 µs, 1 conn | p99 µs, 1 conn | added p50 µs | added p99 µs | requests/s, 1 conn | requests/s, {wrk_connections} conns | ÷ direct |"
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
    println!(
        "\nwhere a request's time goes in those one-connection rounds: per request, CPU µs the tunnel's processes \
         spent in user space + in the kernel (the kernel's accounting: exact totals, split by its tick samples) and \
         sleeps (voluntary context switches, all threads), cloud side and edge side; median (min–max) of the rounds:\n"
    );
    println!("| way | cloud side, user + kernel µs | edge side, user + kernel µs | user µs, both sides | kernel µs, both sides | sleeps per request, cloud / edge |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (i, way) in WAYS.into_iter().enumerate().skip(1) {
        let of = |pick: &dyn Fn(&PerRequest) -> f64| costs[i].iter().map(pick).collect::<Vec<f64>>();
        let median = |pick: &dyn Fn(&PerRequest) -> f64| crate::bench::median(&of(pick));
        println!(
            "| {} | {:.1} + {:.1} | {:.1} + {:.1} | {} | {} | {:.2} / {:.2} |",
            way.label(),
            median(&|c| c.cloud.0),
            median(&|c| c.cloud.1),
            median(&|c| c.edge.0),
            median(&|c| c.edge.1),
            spread(&of(&|c| c.cloud.0 + c.edge.0), 1),
            spread(&of(&|c| c.cloud.1 + c.edge.1), 1),
            median(&|c| c.cloud.2),
            median(&|c| c.edge.2),
        );
    }
    let added_p50 = |i: usize| -> Vec<f64> { p50(i).iter().zip(p50(0)).map(|(a, b)| a - b).collect() };
    crate::plot::write(
        &crate::plot::file("tunnel", "latency"),
        &Chart {
            title: format!(
                "Tunnel latency: wrk, one connection, loopback (median of {wrk_rounds} rounds, whiskers min–max)"
            ),
            x_label: "request latency".into(),
            y_label: "latency, µs".into(),
            kind: Kind::Bars { categories: vec!["p50".into(), "added p50 (minus direct, same round)".into()] },
            series: series(&|i| [p50(i), added_p50(i)]),
            footnote: crate::plot::footnote(),
        },
    )?;

    std::thread::sleep(Duration::from_secs(1));
    for (i, way) in WAYS.into_iter().enumerate() {
        memory[i].after = stage.rss(way)?;
    }
    println!(
        "\nresident memory (VmRSS, MiB) of the cloud side / the edge side; {idle_streams} idle streams opened at once \
         through one tunnel at a time:\n"
    );
    println!(
        "| way | processes | idle, before any run | {idle_streams} idle streams | KiB per stream (both sides) | idle, after the runs | all {idle_streams} at the edge after |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    let mib = |(a, b): (u64, u64)| format!("{:.1} / {:.1}", a as f64 / 1024.0, b as f64 / 1024.0);
    for (i, way) in WAYS.into_iter().enumerate().skip(1) {
        let m = memory[i];
        let grown = (m.streams.0 + m.streams.1).saturating_sub(m.fresh.0 + m.fresh.1);
        let processes = match way {
            Way::Netd => "`netd-cloud tunnel-server` / `netd tunnel-agent`",
            Way::RatholeTcp | Way::RatholeNoise => "`rathole -s` / `rathole -c`",
            _ => "sshd (listener + session processes, summed) / ssh",
        };
        let reached = if m.reached >= idle_streams as u64 {
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
    for note in &idle_notes {
        println!("\n- {note}");
    }
    let pressure = pressure_since(timed_from);

    // Link cuts, last: they leave the agent's backoff state behind.
    let mut noticed = Vec::new();
    let mut back = Vec::new();
    for _ in 0..relink_trials {
        let (n, b) = relink(&stage)?;
        noticed.push(n);
        back.push(b);
    }
    println!(
        "\nlink cut (edge's veth end down) → agent noticed → link up at once → first GET through netd, {relink_trials} trials, \
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
