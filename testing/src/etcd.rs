//! A throw-away etcd (Debian's `/usr/bin/etcd`, 3.4) for registry tests: one
//! member on 127.0.0.1 (or on an address inside a harness namespace, see
//! [`ServerHost`]) only, free client and peer ports, its data in a fresh
//! directory. It can be stopped and started again on the same ports and data
//! (etcd "away for a while"); dropping it kills the process and removes the
//! directory.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{unique_name, HarnessError, ServerHost};

/// Debian's etcd server binary (package `etcd-server`).
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// Debian's etcd client binary (package `etcd-client`).
pub const ETCDCTL_BIN: &str = "/usr/bin/etcdctl";

/// How long a start may take until etcd reports healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// An etcd server process; killed and its data removed on drop.
#[derive(Debug)]
pub struct EtcdServer {
    host: ServerHost,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    name: String,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts a new single-member etcd on free 127.0.0.1 ports with an empty
    /// data directory and waits until it is healthy.
    ///
    /// The server gets SIGKILL if the thread that started it ends (so a
    /// killed test leaves no etcd behind): keep it on that thread.
    pub fn new() -> Result<Self, HarnessError> {
        Self::new_on(ServerHost::loopback())
    }

    /// Like [`EtcdServer::new`], listening on `host` instead of 127.0.0.1.
    pub fn new_on(host: ServerHost) -> Result<Self, HarnessError> {
        let name = unique_name();
        let dir = std::env::temp_dir().join(format!("{name}-etcd"));
        std::fs::create_dir_all(&dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let (client_port, peer_port) = match host.free_ports() {
            Ok([client, peer]) => (client, peer),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // From here on, Drop cleans up.
        let mut server = Self { host, dir, client_port, peer_port, name, child: None };
        server.start()?;
        Ok(server)
    }

    /// `http://<address>:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host.ip(), self.client_port)
    }

    /// Where the server listens.
    pub fn host(&self) -> &ServerHost {
        &self.host
    }

    /// The data directory (`<dir>/data`) and log (`<dir>/etcd.log`) live here.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process id while it runs (to freeze it with SIGSTOP, say).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the process (SIGKILL, as a crash or power loss would) and keeps
    /// its data; a no-op when stopped.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        child.kill().map_err(|e| HarnessError::io("killing etcd", e))?;
        child.wait().map_err(|e| HarnessError::io("waiting for etcd", e))?;
        Ok(())
    }

    /// Starts the process again on the same ports and data directory and
    /// waits until it is healthy; a no-op when running. Like [`new`], the
    /// process gets SIGKILL when the calling thread ends: call it from the
    /// thread that owns the guard.
    ///
    /// [`new`]: EtcdServer::new
    pub fn start(&mut self) -> Result<(), HarnessError> {
        if self.child.is_some() {
            return Ok(());
        }
        let log_path = self.dir.join("etcd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| HarnessError::io(format!("opening {}", log_path.display()), e))?;
        let client_url = self.endpoint();
        let peer_url = format!("http://{}:{}", self.host.ip(), self.peer_port);
        let member = "netd-test";
        let mut command = Command::new(ETCD_BIN);
        command
            .arg(format!("--name={member}"))
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={member}={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg(format!("--initial-cluster-token={}", self.name))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // The caller's etcd settings must not leak into the test server.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(key);
            }
        }
        if cfg!(target_arch = "aarch64") {
            // etcd 3.4 refuses to start on arm64 without it.
            command.env("ETCD_UNSUPPORTED_ARCH", "arm64");
        }
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.child = Some(self.host.spawn(&mut command, ETCD_BIN)?);
        self.wait_healthy()
    }

    fn wait_healthy(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from((self.host.ip(), self.client_port));
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(HarnessError::Command { command: ETCD_BIN.into(), status, stderr: self.log_tail() });
                }
            }
            if self.host.run(|| health(addr)).ok().flatten().is_some_and(|body| body.contains(r#""health":"true""#)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let tail = self.log_tail();
                let _ = self.stop();
                return Err(HarnessError::io(
                    format!("waiting for etcd at {} to become healthy; its log ends: {tail}", self.endpoint()),
                    std::io::ErrorKind::TimedOut.into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `etcdctl --endpoints=<endpoint> args…` (API v3) and returns its
    /// stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, HarnessError> {
        // etcdctl 3.4 speaks API v3 by default.
        let endpoints = format!("--endpoints={}", self.endpoint());
        let full: Vec<&str> = std::iter::once(endpoints.as_str()).chain(args.iter().copied()).collect();
        let output = self.host.command(ETCDCTL_BIN, &full)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Everything etcd logged so far (all runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GET /health` on etcd's client port: the raw response.
fn health(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}
