//! A throw-away Kubernetes API server for registry tests: its own etcd
//! (an [`EtcdServer`] guard) and the `kube-apiserver` that `cargo xtask
//! setup` builds from Debian's source package, both on 127.0.0.1 only (or
//! on an address inside a harness namespace, see [`ServerHost`]), on free
//! ports, with their data in a fresh directory.
//!
//! The harness mints a cluster CA per server, as kubeadm does: it signs the
//! API server's serving certificate (so clients given
//! [`KubeApiServer::ca_cert_pem`] verify the server for real) and is its
//! `--client-ca-file` (so client certificates it signs, such as those
//! kube-controller-manager issues for approved CSRs, authenticate). The API
//! server authenticates one static token for tests (user `admin`, group
//! `system:masters`, full power whatever the authorizer) and one for
//! kube-controller-manager, and authorises everything (`AlwaysAllow`) unless
//! started through [`KubeCluster::builder`] with RBAC. Service-account
//! tokens are signed with a harness key, so `TokenRequest` works. Dropping
//! the guard kills both processes and removes the directory.
//!
//! [`KubeCluster::builder`]: super::KubeCluster::builder

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{run_command, unique_name, EtcdServer, HarnessError, ServerHost};
use netd_tunnel::certs::{CertificateAuthority, CA_CERT_FILE, CA_KEY_FILE};

/// Kubernetes version of the test API server (Debian 12's `kubernetes` source).
pub const KUBE_APISERVER_VERSION: &str = "1.20.2";
/// Where `cargo xtask setup` caches the built `kube-apiserver`.
pub const KUBE_APISERVER_BIN: &str = "/var/cache/netd/kube-apiserver-1.20.2";
/// Set to another `kube-apiserver` binary to test against it instead.
pub const KUBE_APISERVER_ENV: &str = "NETD_KUBE_APISERVER";

/// The service-account issuer the server is started with.
const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The Service range; its first address is the `kubernetes` Service, which
/// the serving certificate names as kubeadm's does.
pub(crate) const SERVICE_CIDR: &str = "10.96.0.0/16";
const KUBERNETES_SERVICE_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 1);
/// How long a start may take until the server reports ready.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Validity of the cluster CA and the serving certificate: far beyond any
/// test, and beyond kube-controller-manager's default signing duration (a
/// year), which it clamps to the CA's expiry.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const SERVING_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// The kube-controller-manager's static-token user; its token is never
/// rotated, so [`KubeApiServer::rotate_token`] does not cut the controllers off.
const CONTROLLER_MANAGER_USER: &str = "system:kube-controller-manager";

/// Switches of the API server beyond the harness defaults, set through
/// [`KubeCluster::builder`](super::KubeCluster::builder).
#[derive(Debug, Clone, Default)]
pub(crate) struct ApiServerOptions {
    /// `--authorization-mode=Node,RBAC` instead of `AlwaysAllow`.
    pub(crate) rbac: bool,
    /// `--enable-bootstrap-token-auth`.
    pub(crate) bootstrap_tokens: bool,
    /// The `NodeRestriction` admission plugin (kubeadm enables it with RBAC).
    pub(crate) node_restriction: bool,
    /// Talk to real kubelets as kubeadm sets it up: a client certificate in
    /// `system:masters` (`--kubelet-client-certificate`), their serving
    /// certificates verified with the cluster CA
    /// (`--kubelet-certificate-authority`), by their InternalIP (the test
    /// nodes have no DNS names).
    pub(crate) kubelets: bool,
    /// Whole flags appended last, so they override the harness's own.
    pub(crate) extra_args: Vec<String>,
}

/// The stem of the API server's kubelet client certificate in `pki/`.
const KUBELET_CLIENT_STEM: &str = "apiserver-kubelet-client";

/// Who a request made with [`KubeApiServer::api_as`] authenticates as.
#[derive(Debug, Clone, Copy)]
pub enum ApiAuth<'a> {
    /// `Authorization: Bearer <token>`: a static, bootstrap
    /// (`<id>.<secret>`) or service-account token.
    Bearer(&'a str),
    /// A TLS client certificate and its private key, PEM files.
    ClientCert {
        /// The certificate (chain).
        cert: &'a Path,
        /// Its private key.
        key: &'a Path,
    },
    /// No credentials: `system:anonymous`.
    Anonymous,
}

/// A running etcd + kube-apiserver pair; both killed and their data removed
/// on drop.
#[derive(Debug)]
pub struct KubeApiServer {
    host: ServerHost,
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    token: String,
    /// kube-controller-manager's token, fixed for the guard's life.
    controller_manager_token: String,
    options: ApiServerOptions,
    /// The cluster CA: serving certificate, client certificates, CSR signing.
    ca: CertificateAuthority,
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
        Self::with_options(host, ApiServerOptions { extra_args: extra_args.to_vec(), ..ApiServerOptions::default() })
    }

    pub(crate) fn with_options(host: ServerHost, options: ApiServerOptions) -> Result<Self, HarnessError> {
        let bin = kube_binary(KUBE_APISERVER_ENV, KUBE_APISERVER_BIN);
        if !bin.is_file() {
            return Err(HarnessError::Usage(format!(
                "kube-apiserver {KUBE_APISERVER_VERSION} is not built at {}: run `sudo cargo xtask setup` \
                 (builds it from Debian's source package, about 6 minutes) or set {KUBE_APISERVER_ENV}",
                bin.display()
            )));
        }
        let name = unique_name();
        let dir = std::env::temp_dir().join(format!("{name}-kube"));
        std::fs::create_dir_all(&dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let mut server = Self {
            host,
            dir,
            bin,
            port: 0,
            token: String::new(),
            controller_manager_token: random_hex(16)?,
            options,
            ca: CertificateAuthority::generate("netd-test-cluster-ca", CA_VALIDITY)?,
            etcd: None,
            apiserver: None,
        };
        // From here on, Drop cleans up.
        let [port] = server.host.free_ports()?;
        server.port = port;
        server.write_pki()?;
        server.write_new_token()?;
        let key = server.sa_key_path();
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

    /// The cluster CA, to issue client or server certificates the cluster
    /// trusts (the API server takes client certificates it signed).
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The cluster CA certificate file (PEM): what clients verify the API
    /// server with, and `--client-ca-file`.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("pki").join(CA_CERT_FILE)
    }

    /// The cluster CA's private key file (PEM, PKCS#8 ECDSA P-256): what
    /// kube-controller-manager signs CSRs with.
    pub fn ca_key_path(&self) -> PathBuf {
        self.dir.join("pki").join(CA_KEY_FILE)
    }

    /// The RSA key that signs and verifies service-account tokens
    /// (kube-controller-manager's `--service-account-private-key-file`).
    pub fn sa_key_path(&self) -> PathBuf {
        self.dir.join("sa.key")
    }

    /// A kubeconfig file for `admin` (server URL, cluster CA, the current
    /// token), for kubectl and other real clients. Rewritten by
    /// [`KubeApiServer::rotate_token`].
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// Runs `kubectl --kubeconfig <admin> args…` where the server lives;
    /// a non-zero exit is an error carrying stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<std::process::Output, HarnessError> {
        let kubeconfig = format!("--kubeconfig={}", self.admin_kubeconfig().display());
        let mut all = vec![kubeconfig.as_str()];
        all.extend_from_slice(args);
        self.host.command("kubectl", &all)
    }

    /// A kubeconfig for `user` authenticating with `token` against this
    /// server, verifying it with the cluster CA.
    pub(crate) fn kubeconfig_for(&self, user: &str, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: netd-test\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\n\
             users:\n- name: {user}\n  user:\n    token: {token}\n\
             contexts:\n- name: {user}@netd-test\n  context:\n    cluster: netd-test\n    user: {user}\n\
             current-context: {user}@netd-test\n",
            url = self.url(),
            ca = self.ca_cert_path().display(),
        )
    }

    /// kube-controller-manager's credentials: user and token.
    pub(crate) fn controller_manager_credentials(&self) -> (&str, &str) {
        (CONTROLLER_MANAGER_USER, &self.controller_manager_token)
    }

    /// The cluster CA and a serving certificate it signs for every name
    /// clients use: the listen address, loopback and the `kubernetes`
    /// Service's names and address, as kubeadm's has.
    fn write_pki(&self) -> Result<(), HarnessError> {
        let pki = self.dir.join("pki");
        self.ca.write(&pki)?;
        let dns: Vec<String> = [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .map(String::from)
        .to_vec();
        let mut ips = vec![std::net::IpAddr::V4(self.host.ip()), std::net::IpAddr::V4(KUBERNETES_SERVICE_IP)];
        if !self.host.ip().is_loopback() {
            ips.push(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        }
        self.ca.issue_server("kube-apiserver", &dns, &ips, SERVING_VALIDITY)?.write(&pki, "apiserver")?;
        if self.options.kubelets {
            // kubeadm's name and group for it.
            self.ca
                .issue_client("kube-apiserver-kubelet-client", Some("system:masters"), SERVING_VALIDITY)?
                .write(&pki, KUBELET_CLIENT_STEM)?;
        }
        Ok(())
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

    /// A new admin token in the token file (kube-controller-manager's
    /// stays) and in the admin kubeconfig.
    fn write_new_token(&mut self) -> Result<(), HarnessError> {
        self.token = random_hex(16)?;
        let tokens = self.dir.join("tokens.csv");
        let lines = format!(
            "{},admin,admin,\"system:masters\"\n{token},{user},{user},\"system:masters\"\n",
            self.token,
            token = self.controller_manager_token,
            user = CONTROLLER_MANAGER_USER,
        );
        std::fs::write(&tokens, lines).map_err(|e| HarnessError::io(format!("writing {}", tokens.display()), e))?;
        let kubeconfig = self.admin_kubeconfig();
        std::fs::write(&kubeconfig, self.kubeconfig_for("admin", &self.token))
            .map_err(|e| HarnessError::io(format!("writing {}", kubeconfig.display()), e))
    }

    /// PEM of the cluster CA, which signed the serving certificate.
    pub fn ca_cert_pem(&self) -> Result<Vec<u8>, HarnessError> {
        Ok(self.ca.cert_pem().as_bytes().to_vec())
    }

    /// Settings for netd's Kubernetes client with the admin token, acting
    /// for node `node_name` (no cluster network: set `network` for a
    /// registry that needs one).
    pub fn kube_config(&self, node_name: &str) -> Result<netd_kube::KubeConfig, HarnessError> {
        Ok(netd_kube::KubeConfig {
            server: self.url(),
            token: Some(self.token().to_string()),
            token_file: None,
            ca_cert_pem: Some(self.ca_cert_pem()?),
            client_cert: None,
            node_name: node_name.into(),
            network: None,
        })
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
        let options = &self.options;
        let mut command = Command::new(&self.bin);
        command
            .arg(format!("--etcd-servers={}", self.etcd.as_ref().map(EtcdServer::endpoint).unwrap_or_default()))
            .arg(format!("--bind-address={}", self.host.ip()))
            .arg(format!("--advertise-address={}", self.host.ip()))
            .arg(format!("--secure-port={}", self.port))
            .arg("--insecure-port=0")
            .arg(format!("--tls-cert-file={}", path("pki/apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", path("pki/apiserver.key")))
            .arg(format!("--client-ca-file={}", self.ca_cert_path().display()))
            .arg(format!("--token-auth-file={}", path("tokens.csv")))
            .arg(if options.rbac { "--authorization-mode=Node,RBAC" } else { "--authorization-mode=AlwaysAllow" })
            .arg(format!("--enable-bootstrap-token-auth={}", options.bootstrap_tokens))
            .arg(format!("--service-account-issuer={SA_ISSUER}"))
            .arg(format!("--service-account-key-file={}", self.sa_key_path().display()))
            .arg(format!("--service-account-signing-key-file={}", self.sa_key_path().display()))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg("--profiling=false")
            .arg("--logtostderr=true");
        if options.node_restriction {
            command.arg("--enable-admission-plugins=NodeRestriction");
        }
        if options.kubelets {
            command
                .arg(format!("--kubelet-client-certificate={}", path(&format!("pki/{KUBELET_CLIENT_STEM}.crt"))))
                .arg(format!("--kubelet-client-key={}", path(&format!("pki/{KUBELET_CLIENT_STEM}.key"))))
                .arg(format!("--kubelet-certificate-authority={}", self.ca_cert_path().display()))
                .arg("--kubelet-preferred-address-types=InternalIP");
        }
        command.args(&options.extra_args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        die_with_parent(&mut command);
        self.apiserver = Some(self.host.spawn(&mut command, &self.bin.display().to_string())?);
        self.wait_ready()
    }

    /// Restarts the API server with `extra_args` in place of the flags
    /// appended so far (as [`KubeApiServer::new_with`] takes them), e.g. to
    /// add or drop `--egress-selector-config-file`. Same port, etcd and
    /// certificates; dies with the calling thread like [`KubeApiServer::start`].
    pub fn restart_with(&mut self, extra_args: &[String]) -> Result<(), HarnessError> {
        self.stop()?;
        self.options.extra_args = extra_args.to_vec();
        self.start()
    }

    /// The API server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.apiserver.as_ref().map(Child::id)
    }

    /// Calls the API with `curl` as `admin`: `method` on `path` (e.g.
    /// `/api/v1/nodes`) with an optional body sent as `content_type`
    /// (`(content_type, body)`). Returns the HTTP status and the body.
    pub fn api(&self, method: &str, path: &str, body: Option<(&str, &str)>) -> Result<(u16, String), HarnessError> {
        self.api_as(ApiAuth::Bearer(&self.token), method, path, body)
    }

    /// [`KubeApiServer::api`] authenticating as `auth` instead of `admin`:
    /// what a bootstrapping node, a node with its issued certificate or a
    /// service account gets, 401 and 403 included.
    pub fn api_as(
        &self,
        auth: ApiAuth<'_>,
        method: &str,
        path: &str,
        body: Option<(&str, &str)>,
    ) -> Result<(u16, String), HarnessError> {
        let url = format!("{}{path}", self.url());
        let ca_arg = self.ca_cert_path().to_string_lossy().into_owned();
        let mut args = vec!["-sS", "--noproxy", "*", "--cacert", &ca_arg, "-X", method];
        let (header, cert, key);
        match auth {
            ApiAuth::Bearer(token) => {
                header = format!("Authorization: Bearer {token}");
                args.extend(["-H", &header]);
            }
            ApiAuth::ClientCert { cert: cert_path, key: key_path } => {
                cert = cert_path.to_string_lossy().into_owned();
                key = key_path.to_string_lossy().into_owned();
                args.extend(["--cert", &cert, "--key", &key]);
            }
            ApiAuth::Anonymous => {}
        }
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
            // Ready, and the `default` namespace made: the API server creates
            // it shortly after it starts serving, and tests post into it.
            if matches!(self.api("GET", "/readyz", None), Ok((200, ref body)) if body.trim() == "ok")
                && matches!(self.api("GET", "/api/v1/namespaces/default", None), Ok((200, _)))
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

pub(crate) fn kill(child: &mut Option<Child>, what: &str) -> Result<(), HarnessError> {
    let Some(mut child) = child.take() else { return Ok(()) };
    child.kill().map_err(|e| HarnessError::io(format!("killing {what}"), e))?;
    child.wait().map_err(|e| HarnessError::io(format!("waiting for {what}"), e))?;
    Ok(())
}

/// The binary named by environment variable `env`, else `default`.
pub(crate) fn kube_binary(env: &str, default: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| default.into())
}

/// SIGKILL for the child when the spawning thread ends.
pub(crate) fn die_with_parent(command: &mut Command) {
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
pub(crate) fn random_hex(bytes: usize) -> Result<String, HarnessError> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| HarnessError::io("reading /dev/urandom", e))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

pub(crate) fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}
