//! `netd` processes inside harness namespaces, and their HTTP endpoints.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::{HarnessError, NetNs};

/// The daemon's default health/metrics address.
pub const HEALTH_ADDR: &str = "127.0.0.1:9617";

/// A process started inside a namespace with its stderr in a log file;
/// killed (SIGKILL) on drop unless already stopped.
#[derive(Debug)]
pub struct NetdProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl NetdProcess {
    /// Spawns `program args…` from a thread inside `ns` (the child inherits
    /// the namespace), appending stderr to `log`.
    pub fn spawn<I, S>(ns: &NetNs, program: &Path, args: I, log: &Path) -> Result<Self, HarnessError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| HarnessError::io(format!("opening {}", log.display()), e))?;
        let mut command = Command::new(program);
        command.args(args).stdout(Stdio::null()).stderr(log_file);
        let child = ns
            .run(|| command.spawn())?
            .map_err(|source| HarnessError::Spawn { command: program.display().to_string(), source })?;
        Ok(Self { child: Some(child), log: log.to_path_buf() })
    }

    /// Sends `signal` and waits for the exit; `None` if already stopped.
    pub fn signal(&mut self, signal: i32) -> Result<Option<ExitStatus>, HarnessError> {
        let Some(mut child) = self.child.take() else { return Ok(None) };
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().map(Some).map_err(|e| HarnessError::io("waiting for a child", e))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NetdProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Arguments of `netd run` for a test node: `--iface eth0`, the registry
/// spec, state and subnet.env under `state_dir`.
pub fn netd_run_args(node: &str, registry: &str, state_dir: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "run".into(),
        "--node-name".into(),
        node.into(),
        "--iface".into(),
        "eth0".into(),
        format!("--registry={registry}").into(),
        "--state-dir".into(),
        state_dir.into(),
        "--subnet-env".into(),
        state_dir.join("subnet.env").into(),
    ]
}

/// `GET path` on `addr` inside `ns`; the raw response, or `None` when
/// nothing answers.
pub fn http_get(ns: &NetNs, addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().ok()?;
    ns.run(|| {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        // One write: the request must not arrive in pieces.
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    })
    .ok()
    .flatten()
}

/// One Prometheus sample from the daemon's `/metrics` inside `ns`.
pub fn metric(ns: &NetNs, name: &str) -> Option<f64> {
    let body = http_get(ns, HEALTH_ADDR, "/metrics")?;
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
