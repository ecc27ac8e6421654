//! A throw-away Kubernetes API server for registry tests: its own etcd
//! (an [`EtcdServer`] guard) and the `kube-apiserver` that `cargo xtask
//! setup` builds from Debian's source package, both on 127.0.0.1 only (or
//! on an address inside a harness namespace, see [`ServerHost`]), on free
//! ports, with their data in a fresh directory.
//!
//! The API server authenticates one static token (user `admin`, group
//! `system:masters`), authorises everything (`AlwaysAllow`) and serves TLS
//! with a certificate it generates itself into `--cert-dir`: a serving
//! certificate for its address followed by the CA that signed it, which
//! [`KubeApiServer::ca_cert_pem`] hands to clients so they verify the server
//! for real. Dropping the guard kills both processes and removes the
//! directory.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{run_command, unique_name, EtcdServer, HarnessError, ServerHost};

/// Kubernetes version of the test API server (Debian 12's `kubernetes` source).
pub const KUBE_APISERVER_VERSION: &str = "1.20.2";
/// Where `cargo xtask setup` caches the built `kube-apiserver`.
pub const KUBE_APISERVER_BIN: &str = "/var/cache/netd/kube-apiserver-1.20.2";
/// Set to another `kube-apiserver` binary to test against it instead.
pub const KUBE_APISERVER_ENV: &str = "NETD_KUBE_APISERVER";

/// The service-account issuer the server is started with.
const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// How long a start may take until the server reports ready.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// A running etcd + kube-apiserver pair; both killed and their data removed
/// on drop.
#[derive(Debug)]
pub struct KubeApiServer {
    host: ServerHost,
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    token: String,
    /// Flags appended to the API server's own, see [`KubeApiServer::new_with`].
    extra_args: Vec<String>,
    /// The API server's storage: the harness's own etcd guard.
    etcd: Option<EtcdServer>,
    apiserver: Option<Child>,
}

impl KubeApiServer {
    /// Starts etcd and the API server and waits until `/readyz` answers
    /// `ok`.
    ///
    /// Both processes get SIGKILL when the thread that started them ends
    /// (so a killed test leaves nothing behind): keep the guard on that
    /// thread.
    pub fn new() -> Result<Self, HarnessError> {
        Self::new_on(ServerHost::loopback())
    }

    /// Like [`KubeApiServer::new`], both servers listening on `host`
    /// instead of 127.0.0.1.
    pub fn new_on(host: ServerHost) -> Result<Self, HarnessError> {
        Self::new_with(host, &[])
    }

    /// Like [`KubeApiServer::new_on`], with `extra_args` (whole flags such
    /// as `--egress-selector-config-file=/path`) appended to the API
    /// server's command line on every start. Appended last, so that a flag
    /// given here overrides the harness's own (the last occurrence wins).
    /// Files they name must outlive the guard.
    pub fn new_with(host: ServerHost, extra_args: &[String]) -> Result<Self, HarnessError> {
        let bin = std::env::var_os(KUBE_APISERVER_ENV).map(PathBuf::from).unwrap_or_else(|| KUBE_APISERVER_BIN.into());
        if !bin.is_file() {
            return Err(HarnessError::Usage(format!(
                "kube-apiserver {KUBE_APISERVER_VERSION} is not built at {}: run `sudo cargo xtask setup` \
                 (builds it from Debian's source package, about 6 minutes) or set {KUBE_APISERVER_ENV}",
                bin.display()
            )));
        }
        let name = unique_name();
        let dir = std::env::temp_dir().join(format!("{name}-kube"));
        std::fs::create_dir_all(dir.join("certs"))
            .map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let mut server = Self {
            host,
            dir,
            bin,
            port: 0,
            token: String::new(),
            extra_args: extra_args.to_vec(),
            etcd: None,
            apiserver: None,
        };
        // From here on, Drop cleans up.
        let [port] = server.host.free_ports()?;
        server.port = port;
        server.write_new_token()?;
        let key = server.dir.join("sa.key");
        let key_arg = key.to_string_lossy().into_owned();
        run_command("openssl", &["genrsa", "-out", &key_arg, "2048"])?;
        server.etcd = Some(EtcdServer::new_on(server.host.clone())?);
        server.start()?;
        Ok(server)
    }

    /// `https://<address>:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.host.ip(), self.port)
    }

    /// Where the servers listen.
    pub fn host(&self) -> &ServerHost {
        &self.host
    }

    /// The bearer token of user `admin` (group `system:masters`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Replaces the token with a new one (the old one stops working) and
    /// restarts the API server with it, as a credential rotation does.
    /// Returns the new token. The restarted server dies with the calling
    /// thread, as in [`KubeApiServer::start`].
    pub fn rotate_token(&mut self) -> Result<String, HarnessError> {
        self.write_new_token()?;
        self.stop()?;
        self.start()?;
        Ok(self.token.clone())
    }

    fn write_new_token(&mut self) -> Result<(), HarnessError> {
        self.token = random_hex(16)?;
        let tokens = self.dir.join("tokens.csv");
        std::fs::write(&tokens, format!("{},admin,admin,\"system:masters\"\n", self.token))
            .map_err(|e| HarnessError::io(format!("writing {}", tokens.display()), e))
    }

    /// PEM of the CA that signed the serving certificate (the last
    /// certificate of the server's self-generated `apiserver.crt`).
    pub fn ca_cert_pem(&self) -> Result<Vec<u8>, HarnessError> {
        let path = self.cert_path();
        let text =
            std::fs::read_to_string(&path).map_err(|e| HarnessError::io(format!("reading {}", path.display()), e))?;
        let begin = "-----BEGIN CERTIFICATE-----";
        let start =
            text.rfind(begin).ok_or_else(|| HarnessError::Usage(format!("{} holds no certificate", path.display())))?;
        Ok(text[start..].trim_end().as_bytes().iter().copied().chain(*b"\n").collect())
    }

    /// The API server's etcd, for writing objects behind the API server's
    /// back (under `/registry/…`, as JSON it decodes without validating):
    /// what a broken controller or an old backup could leave.
    pub fn etcd(&self) -> Option<&EtcdServer> {
        self.etcd.as_ref()
    }

    /// The directory holding the data, certificates and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The API server's log so far (all runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("apiserver.log")).unwrap_or_default()
    }

    /// True while the API server process runs.
    pub fn is_running(&self) -> bool {
        self.apiserver.is_some()
    }

    /// Kills the API server (SIGKILL) and keeps etcd and the certificates:
    /// the cluster "goes away"; a no-op when stopped.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        kill(&mut self.apiserver, "kube-apiserver")
    }

    /// Starts the API server again on the same port, etcd and certificates
    /// and waits until it is ready; a no-op when running. Like [`new`],
    /// the process gets SIGKILL when the calling thread ends: call it from
    /// the thread that owns the guard.
    ///
    /// [`new`]: KubeApiServer::new
    pub fn start(&mut self) -> Result<(), HarnessError> {
        if self.apiserver.is_some() {
            return Ok(());
        }
        let log = self.log_file("apiserver.log")?;
        let path = |name: &str| self.dir.join(name).to_string_lossy().into_owned();
        let mut command = Command::new(&self.bin);
        command
            .arg(format!("--etcd-servers={}", self.etcd.as_ref().map(EtcdServer::endpoint).unwrap_or_default()))
            .arg(format!("--bind-address={}", self.host.ip()))
            .arg(format!("--advertise-address={}", self.host.ip()))
            .arg(format!("--secure-port={}", self.port))
            .arg("--insecure-port=0")
            .arg(format!("--cert-dir={}", path("certs")))
            .arg(format!("--token-auth-file={}", path("tokens.csv")))
            .arg("--authorization-mode=AlwaysAllow")
            .arg(format!("--service-account-issuer={SA_ISSUER}"))
            .arg(format!("--service-account-key-file={}", path("sa.key")))
            .arg(format!("--service-account-signing-key-file={}", path("sa.key")))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--profiling=false")
            .arg("--logtostderr=true")
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        die_with_parent(&mut command);
        self.apiserver = Some(self.host.spawn(&mut command, &self.bin.display().to_string())?);
        self.wait_ready()
    }

    /// Calls the API with `curl` as `admin`: `method` on `path` (e.g.
    /// `/api/v1/nodes`) with an optional JSON body sent as `content_type`.
    /// Returns the HTTP status and the body.
    pub fn api(&self, method: &str, path: &str, body: Option<(&str, &str)>) -> Result<(u16, String), HarnessError> {
        let ca = self.dir.join("ca.pem");
        if !ca.exists() {
            std::fs::write(&ca, self.ca_cert_pem()?)
                .map_err(|e| HarnessError::io(format!("writing {}", ca.display()), e))?;
        }
        let auth = format!("Authorization: Bearer {}", self.token);
        let url = format!("{}{path}", self.url());
        let ca_arg = ca.to_string_lossy().into_owned();
        let mut args = vec!["-sS", "--noproxy", "*", "--cacert", &ca_arg, "-H", &auth, "-X", method];
        let content_type;
        if let Some((kind, _)) = body {
            content_type = format!("Content-Type: {kind}");
            args.extend(["-H", &content_type, "--data-binary", "@-"]);
        }
        args.extend(["-w", "\n%{http_code}", &url]);
        let command = format!("curl {}", args.join(" "));
        let output = self.host.run(|| {
            let mut child = Command::new("curl")
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|source| HarnessError::Spawn { command: command.clone(), source })?;
            if let Some(mut stdin) = child.stdin.take() {
                let text = body.map(|(_, text)| text).unwrap_or("");
                stdin.write_all(text.as_bytes()).map_err(|e| HarnessError::io("writing curl's stdin", e))?;
            }
            child.wait_with_output().map_err(|e| HarnessError::io("waiting for curl", e))
        })??;
        if !output.status.success() {
            return Err(HarnessError::Command {
                command,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code =
            code.trim().parse().map_err(|_| HarnessError::Usage(format!("curl printed no HTTP status: {text}")))?;
        Ok((code, body.to_string()))
    }

    fn cert_path(&self) -> PathBuf {
        self.dir.join("certs").join("apiserver.crt")
    }

    fn log_file(&self, name: &str) -> Result<std::fs::File, HarnessError> {
        let path = self.dir.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| HarnessError::io(format!("opening {}", path.display()), e))
    }

    fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.apiserver.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.apiserver = None;
                return Err(HarnessError::Command {
                    command: self.bin.display().to_string(),
                    status,
                    stderr: tail(&self.log()),
                });
            }
            if self.cert_path().exists()
                && matches!(self.api("GET", "/readyz", None), Ok((200, ref body)) if body.trim() == "ok")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = tail(&self.log());
                let _ = self.stop();
                return Err(HarnessError::io(
                    format!("waiting for kube-apiserver at {} to become ready; its log ends: {log}", self.url()),
                    std::io::ErrorKind::TimedOut.into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        let _ = kill(&mut self.apiserver, "kube-apiserver");
        // Dropping the etcd guard kills it and removes its data.
        self.etcd = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn kill(child: &mut Option<Child>, what: &str) -> Result<(), HarnessError> {
    let Some(mut child) = child.take() else { return Ok(()) };
    child.kill().map_err(|e| HarnessError::io(format!("killing {what}"), e))?;
    child.wait().map_err(|e| HarnessError::io(format!("waiting for {what}"), e))?;
    Ok(())
}

/// SIGKILL for the child when the spawning thread ends.
fn die_with_parent(command: &mut Command) {
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
}

/// `bytes` random bytes from the kernel, hex-encoded.
fn random_hex(bytes: usize) -> Result<String, HarnessError> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| HarnessError::io("reading /dev/urandom", e))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}
