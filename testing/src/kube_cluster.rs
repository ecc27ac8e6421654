//! A small Kubernetes control plane for join, node lifecycle and rollout
//! tests: the harness's [`KubeApiServer`] with the switches kubeadm turns on
//! (RBAC and the Node authorizer, bootstrap-token authentication), and
//! beside it a real `kube-controller-manager` 1.20.2 (built by `cargo xtask
//! setup` from the same Debian source) that signs CSRs with the cluster CA,
//! approves node client certificates, signs `cluster-info`, watches node
//! health and hands out pod CIDRs.

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde_json::json;

use super::kube::{die_with_parent, kill, kube_binary, tail, ApiServerOptions};
use super::{unique_name, HarnessError, KubeApiServer, ServerHost};
use super::{KUBE_APISERVER_BIN, KUBE_APISERVER_ENV};

/// Where `cargo xtask setup` caches the built `kube-controller-manager`.
pub const KUBE_CONTROLLER_MANAGER_BIN: &str = "/var/cache/netd/kube-controller-manager-1.20.2";
/// Set to another `kube-controller-manager` binary to test against it instead.
pub const KUBE_CONTROLLER_MANAGER_ENV: &str = "NETD_KUBE_CONTROLLER_MANAGER";

/// How long the controller-manager may take to answer `/healthz`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How the [`KubeControllerManager`] runs. The defaults are SPEC §4's: every
/// default controller plus `bootstrapsigner` and `tokencleaner`, pod CIDRs
/// of /24 from 10.244.0.0/16, and a node monitor fast enough for tests
/// (16 s grace, checked every 2 s) instead of 1.20's 40 s / 5 s.
#[derive(Debug, Clone)]
pub struct ControllerManagerOptions {
    /// `--controllers`.
    pub controllers: Vec<String>,
    /// `--cluster-cidr`: where node pod CIDRs come from.
    pub cluster_cidr: Ipv4Net,
    /// `--node-cidr-mask-size`: the prefix length of each node's pod CIDR.
    pub node_cidr_mask_size: u8,
    /// `--node-monitor-grace-period`: how long a node's Lease and Ready
    /// condition may go unrenewed before the node is marked Unknown.
    pub node_monitor_grace_period: Duration,
    /// `--node-monitor-period`: how often the node lifecycle controller looks.
    pub node_monitor_period: Duration,
    /// `--node-startup-grace-period`: how long a new node may stay without a
    /// Ready condition before it counts as unresponsive.
    pub node_startup_grace_period: Duration,
    /// Whole flags appended last, so they override the harness's own.
    pub extra_args: Vec<String>,
}

impl Default for ControllerManagerOptions {
    fn default() -> Self {
        Self {
            controllers: ["*", "bootstrapsigner", "tokencleaner"].map(String::from).to_vec(),
            cluster_cidr: Ipv4Net::new(Ipv4Addr::new(10, 244, 0, 0), 16).unwrap_or_default(),
            node_cidr_mask_size: 24,
            node_monitor_grace_period: Duration::from_secs(16),
            node_monitor_period: Duration::from_secs(2),
            node_startup_grace_period: Duration::from_secs(60),
            extra_args: Vec::new(),
        }
    }
}

/// A running `kube-controller-manager` against a [`KubeApiServer`]; killed
/// and its directory (kubeconfig, serving certificate, log) removed on drop.
///
/// It authenticates with its own static token in `system:masters`
/// (`--use-service-account-credentials=false`, so every controller acts with
/// it), signs with the cluster CA and serves `/healthz` on a free port.
#[derive(Debug)]
pub struct KubeControllerManager {
    host: ServerHost,
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl KubeControllerManager {
    /// Starts the controller-manager for `api` with `options` and waits
    /// until its `/healthz` answers `ok`. Its controllers start after that,
    /// so tests poll for what they should do: 1.20's node IPAM waits 10 s
    /// before its first node list, and the controllers that happen to be
    /// started after it (Go map order: csrsigning, nodelifecycle, …, often)
    /// wait with it, so expect ~10-15 s until CSRs are signed and pod CIDRs
    /// handed out. Like the API server, the process gets SIGKILL when the
    /// calling thread ends: keep the guard on that thread.
    pub fn new(api: &KubeApiServer, options: &ControllerManagerOptions) -> Result<Self, HarnessError> {
        let bin = kube_binary(KUBE_CONTROLLER_MANAGER_ENV, KUBE_CONTROLLER_MANAGER_BIN);
        if !bin.is_file() {
            return Err(missing(&bin, KUBE_CONTROLLER_MANAGER_ENV));
        }
        let dir = std::env::temp_dir().join(format!("{}-kcm", unique_name()));
        std::fs::create_dir_all(&dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let mut manager = Self { host: api.host().clone(), dir, bin, port: 0, args: Vec::new(), child: None };
        // From here on, Drop cleans up.
        let [port] = manager.host.free_ports()?;
        manager.port = port;
        let kubeconfig = manager.dir.join("kubeconfig");
        let (user, token) = api.controller_manager_credentials();
        std::fs::write(&kubeconfig, api.kubeconfig_for(user, token))
            .map_err(|e| HarnessError::io(format!("writing {}", kubeconfig.display()), e))?;
        let kubeconfig = kubeconfig.display();
        let ca = api.ca_cert_path();
        let seconds = |d: Duration| format!("{}ms", d.as_millis());
        manager.args = vec![
            format!("--kubeconfig={kubeconfig}"),
            // Its own /healthz and /metrics authenticate and authorise
            // through the API server, as in a real cluster (/healthz is
            // always allowed).
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            // Tokens only: the API server has no front proxy, so looking up
            // its request-header CA would log an error every few seconds.
            "--authentication-skip-lookup=true".into(),
            format!("--bind-address={}", manager.host.ip()),
            format!("--secure-port={port}"),
            "--port=0".into(),
            // Its self-signed serving certificate; the default is
            // /var/run/kubernetes, shared by every run.
            format!("--cert-dir={}", manager.dir.join("certs").display()),
            format!("--controllers={}", options.controllers.join(",")),
            "--allocate-node-cidrs=true".into(),
            format!("--cluster-cidr={}", options.cluster_cidr),
            format!("--node-cidr-mask-size={}", options.node_cidr_mask_size),
            format!("--service-cluster-ip-range={}", super::kube::SERVICE_CIDR),
            format!("--node-monitor-grace-period={}", seconds(options.node_monitor_grace_period)),
            format!("--node-monitor-period={}", seconds(options.node_monitor_period)),
            format!("--node-startup-grace-period={}", seconds(options.node_startup_grace_period)),
            format!("--cluster-signing-cert-file={}", ca.display()),
            format!("--cluster-signing-key-file={}", api.ca_key_path().display()),
            format!("--service-account-private-key-file={}", api.sa_key_path().display()),
            format!("--root-ca-file={}", ca.display()),
            "--use-service-account-credentials=false".into(),
            "--leader-elect=false".into(),
            "--profiling=false".into(),
            "--logtostderr=true".into(),
        ];
        manager.args.extend(options.extra_args.iter().cloned());
        manager.start()?;
        Ok(manager)
    }

    /// The directory holding the kubeconfig, certificates and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The controller-manager's log so far (all runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("controller-manager.log")).unwrap_or_default()
    }

    /// `https://<address>:<port>/healthz` (a self-signed certificate).
    pub fn healthz_url(&self) -> String {
        format!("https://{}:{}/healthz", self.host.ip(), self.port)
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the controller-manager (SIGKILL): no controller acts until
    /// [`KubeControllerManager::start`]; a no-op when stopped.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        kill(&mut self.child, "kube-controller-manager")
    }

    /// Starts the controller-manager again with the same flags and waits for
    /// `/healthz`; a no-op when running. Dies with the calling thread.
    pub fn start(&mut self) -> Result<(), HarnessError> {
        if self.child.is_some() {
            return Ok(());
        }
        let path = self.dir.join("controller-manager.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| HarnessError::io(format!("opening {}", path.display()), e))?;
        let mut command = Command::new(&self.bin);
        command.args(&self.args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        die_with_parent(&mut command);
        self.child = Some(self.host.spawn(&mut command, &self.bin.display().to_string())?);
        self.wait_healthy()
    }

    fn wait_healthy(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = self.healthz_url();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(HarnessError::Command {
                    command: self.bin.display().to_string(),
                    status,
                    stderr: tail(&self.log()),
                });
            }
            // -k: the serving certificate is the one it generated itself;
            // this only asks whether it is up.
            let answer = self.host.command("curl", &["-sk", "--noproxy", "*", "--max-time", "2", &url]);
            if matches!(answer, Ok(ref out) if String::from_utf8_lossy(&out.stdout).trim() == "ok") {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = tail(&self.log());
                let _ = self.stop();
                return Err(HarnessError::io(
                    format!("waiting for kube-controller-manager at {url} to become healthy; its log ends: {log}"),
                    std::io::ErrorKind::TimedOut.into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for KubeControllerManager {
    fn drop(&mut self) {
        let _ = kill(&mut self.child, "kube-controller-manager");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sets up a [`KubeCluster`]: which API server switches and whether a
/// controller-manager runs. Everything is off by default, which is the
/// plain [`KubeApiServer`].
#[derive(Debug, Clone)]
pub struct KubeClusterBuilder {
    host: ServerHost,
    api: ApiServerOptions,
    controller_manager: Option<ControllerManagerOptions>,
}

impl KubeClusterBuilder {
    /// Where the servers listen (default: 127.0.0.1).
    pub fn host(mut self, host: ServerHost) -> Self {
        self.host = host;
        self
    }

    /// `--authorization-mode=Node,RBAC` instead of `AlwaysAllow`: requests
    /// need RBAC bindings (or, for `system:node:<name>`, the Node
    /// authorizer's rules). The admin token stays in `system:masters`.
    pub fn rbac(mut self, on: bool) -> Self {
        self.api.rbac = on;
        self
    }

    /// `--enable-bootstrap-token-auth`: `<id>.<secret>` bearer tokens from
    /// `kube-system/bootstrap-token-<id>` Secrets authenticate as
    /// `system:bootstrap:<id>` in `system:bootstrappers`.
    pub fn bootstrap_tokens(mut self, on: bool) -> Self {
        self.api.bootstrap_tokens = on;
        self
    }

    /// The `NodeRestriction` admission plugin, as kubeadm runs it with the
    /// Node authorizer: a node may modify only its own Node and pods.
    pub fn node_restriction(mut self, on: bool) -> Self {
        self.api.node_restriction = on;
        self
    }

    /// Reach real kubelets (logs, exec, port-forward) as kubeadm's API
    /// server does: with a client certificate in `system:masters`,
    /// verifying each kubelet's serving certificate with the cluster CA, at
    /// its InternalIP.
    pub fn kubelets(mut self, on: bool) -> Self {
        self.api.kubelets = on;
        self
    }

    /// Whole flags appended to the API server's command line, last, so they
    /// override the harness's own. Files they name must outlive the cluster.
    pub fn apiserver_args(mut self, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.api.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Runs a controller-manager with the default options (or none).
    pub fn controller_manager(mut self, on: bool) -> Self {
        self.controller_manager = on.then(ControllerManagerOptions::default);
        self
    }

    /// Runs a controller-manager with `options`.
    pub fn controller_manager_options(mut self, options: ControllerManagerOptions) -> Self {
        self.controller_manager = Some(options);
        self
    }

    /// Whether the binaries this cluster needs are built. When one is
    /// missing: `Ok(false)` after saying so on stderr, so a plain `cargo
    /// test` skips, or an error when [`REQUIRE_ENV`](crate::REQUIRE_ENV) is set (`cargo xtask
    /// test`), so CI never skips silently.
    pub fn binaries_available(&self) -> Result<bool, HarnessError> {
        let mut needed = vec![(kube_binary(KUBE_APISERVER_ENV, KUBE_APISERVER_BIN), KUBE_APISERVER_ENV)];
        if self.controller_manager.is_some() {
            needed.push((
                kube_binary(KUBE_CONTROLLER_MANAGER_ENV, KUBE_CONTROLLER_MANAGER_BIN),
                KUBE_CONTROLLER_MANAGER_ENV,
            ));
        }
        for (bin, env) in needed {
            if !bin.is_file() {
                let error = missing(&bin, env);
                if super::privileged_required() {
                    return Err(error);
                }
                eprintln!("skipping Kubernetes test: {error}");
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Starts etcd, the API server and, if asked for, the controller-manager,
    /// each waited for. They die with the calling thread.
    pub fn start(self) -> Result<KubeCluster, HarnessError> {
        let api = KubeApiServer::with_options(self.host, self.api)?;
        let controller_manager =
            self.controller_manager.as_ref().map(|options| KubeControllerManager::new(&api, options)).transpose()?;
        Ok(KubeCluster { controller_manager, api })
    }
}

/// A small Kubernetes control plane for join, node lifecycle and rollout
/// tests: an API server (with its etcd), with the switches kubeadm turns on
/// if asked (RBAC and the Node authorizer, bootstrap-token authentication),
/// and optionally a real [`KubeControllerManager`] beside it. Dropping it
/// stops the controller-manager first, then the API server.
///
/// ```no_run
/// use netd_testing as testing;
/// use testing::{KubeCluster};
///
/// # fn main() -> Result<(), testing::HarnessError> {
/// let Some(_kernel) = testing::privileged()? else { return Ok(()) };
/// let builder = KubeCluster::builder().rbac(true).bootstrap_tokens(true).controller_manager(true);
/// if !builder.binaries_available()? {
///     return Ok(());
/// }
/// let cluster = builder.start()?;
/// let (status, _) = cluster.api().api("GET", "/api/v1/nodes", None)?;
/// assert_eq!(status, 200);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct KubeCluster {
    // Declared first: fields drop in order, and the controllers go before
    // the API server they talk to.
    controller_manager: Option<KubeControllerManager>,
    api: KubeApiServer,
}

impl KubeCluster {
    /// A builder with everything off (a plain [`KubeApiServer`] on 127.0.0.1).
    pub fn builder() -> KubeClusterBuilder {
        KubeClusterBuilder { host: ServerHost::loopback(), api: ApiServerOptions::default(), controller_manager: None }
    }

    /// The API server: URL, admin token and kubeconfig, the cluster CA, `api()`.
    pub fn api(&self) -> &KubeApiServer {
        &self.api
    }

    /// The API server, to stop, start or rotate its token.
    pub fn api_mut(&mut self) -> &mut KubeApiServer {
        &mut self.api
    }

    /// The controller-manager, if the cluster runs one.
    pub fn controller_manager(&self) -> Option<&KubeControllerManager> {
        self.controller_manager.as_ref()
    }

    /// The controller-manager, to stop or start it.
    pub fn controller_manager_mut(&mut self) -> Option<&mut KubeControllerManager> {
        self.controller_manager.as_mut()
    }
}

/// A kubeadm-style bootstrap token: `<id>.<secret>`, `[a-z0-9]{6}.[a-z0-9]{16}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    /// The public part; names the Secret and the `jws-kubeconfig-<id>` key.
    pub id: String,
    /// The secret part.
    pub secret: String,
}

impl BootstrapToken {
    /// The group kubeadm puts its join tokens in
    /// (`auth-extra-groups`), which its RBAC bindings name.
    pub const KUBEADM_GROUP: &'static str = "system:bootstrappers:kubeadm:default-node-token";

    /// A random token.
    pub fn generate() -> Result<Self, HarnessError> {
        let mut bytes = [0u8; 22];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(|e| HarnessError::io("reading /dev/urandom", e))?;
        const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        // The modulo bias (256 % 36) is irrelevant for a test token.
        let text: String = bytes.iter().map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()])).collect();
        let (id, secret) = text.split_at(6);
        Ok(Self { id: id.to_owned(), secret: secret.to_owned() })
    }

    /// `<id>.<secret>`: the bearer token.
    pub fn token(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    /// `bootstrap-token-<id>`, in `kube-system`.
    pub fn secret_name(&self) -> String {
        format!("bootstrap-token-{}", self.id)
    }
}

impl KubeApiServer {
    /// Stores `token` as kubeadm does: Secret `kube-system/bootstrap-token-<id>`
    /// of type `bootstrap.kubernetes.io/token`, usable for authentication and
    /// for signing `cluster-info`, without expiry, in `extra_groups` besides
    /// `system:bootstrappers` (kubeadm: [`BootstrapToken::KUBEADM_GROUP`]).
    pub fn create_bootstrap_token(&self, token: &BootstrapToken, extra_groups: &[&str]) -> Result<(), HarnessError> {
        let mut data = json!({
            "token-id": token.id,
            "token-secret": token.secret,
            "usage-bootstrap-authentication": "true",
            "usage-bootstrap-signing": "true",
            "description": "netd test bootstrap token",
        });
        if !extra_groups.is_empty() {
            data["auth-extra-groups"] = json!(extra_groups.join(","));
        }
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": { "name": token.secret_name(), "namespace": "kube-system" },
            "type": "bootstrap.kubernetes.io/token",
            "stringData": data,
        });
        self.create("/api/v1/namespaces/kube-system/secrets", &secret)
    }

    /// The ClusterRoleBindings kubeadm makes so that nodes can join with a
    /// bootstrap token in `group`: creating CSRs (`system:node-bootstrapper`)
    /// and having node client CSRs approved automatically
    /// (`…:certificatesigningrequests:nodeclient`); plus the one that lets
    /// nodes (`system:nodes`) renew their own client certificates.
    pub fn bind_node_bootstrappers(&self, group: &str) -> Result<(), HarnessError> {
        let bindings = [
            ("kubeadm:kubelet-bootstrap", "system:node-bootstrapper", group),
            (
                "kubeadm:node-autoapprove-bootstrap",
                "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
                group,
            ),
            (
                "kubeadm:node-autoapprove-certificate-rotation",
                "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
                "system:nodes",
            ),
        ];
        for (name, role, subject) in bindings {
            let binding = json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": { "name": name },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role },
                "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": subject }],
            });
            self.create("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", &binding)?;
        }
        Ok(())
    }

    /// ConfigMap `kube-public/cluster-info` as kubeadm publishes it: key
    /// `kubeconfig` with this server's URL and the cluster CA, no
    /// credentials. The bootstrapsigner controller adds a
    /// `jws-kubeconfig-<id>` signature per signing token.
    pub fn publish_cluster_info(&self) -> Result<(), HarnessError> {
        let ca = serde_json::to_value(k8s_openapi::ByteString(self.ca_cert_pem()?))
            .map_err(|e| HarnessError::Usage(format!("encoding the CA: {e}")))?;
        let ca = ca.as_str().unwrap_or_default();
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: \"\"\n  cluster:\n    certificate-authority-data: {ca}\n    \
             server: {url}\ncontexts: null\ncurrent-context: \"\"\npreferences: {{}}\nusers: null\n",
            url = self.url(),
        );
        let config_map = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": "cluster-info", "namespace": "kube-public" },
            "data": { "kubeconfig": kubeconfig },
        });
        self.create("/api/v1/namespaces/kube-public/configmaps", &config_map)
    }

    /// POSTs `object` to `path` as admin; anything but 201 is an error.
    fn create(&self, path: &str, object: &serde_json::Value) -> Result<(), HarnessError> {
        let (status, body) = self.api("POST", path, Some(("application/json", &object.to_string())))?;
        if status != 201 {
            return Err(HarnessError::Usage(format!("POST {path}: HTTP {status}: {body}")));
        }
        Ok(())
    }
}

/// The error for a Kubernetes binary that is not built.
fn missing(bin: &Path, env: &str) -> HarnessError {
    HarnessError::Usage(format!(
        "{} is not built: run `sudo cargo xtask setup` (builds it from Debian's source package) or set {env}",
        bin.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_tokens_have_kubeadms_shape() {
        let token = BootstrapToken::generate().unwrap();
        let text = token.token();
        let (id, secret) = text.split_once('.').unwrap();
        assert_eq!((id.len(), secret.len()), (6, 16));
        assert!(text.chars().all(|c| c == '.' || c.is_ascii_lowercase() || c.is_ascii_digit()), "{text}");
        assert_eq!(token.secret_name(), format!("bootstrap-token-{id}"));
        assert_ne!(BootstrapToken::generate().unwrap(), token);
    }

    #[test]
    fn controller_manager_defaults_are_specs() {
        let options = ControllerManagerOptions::default();
        assert_eq!(options.cluster_cidr.to_string(), "10.244.0.0/16");
        assert_eq!(options.controllers, ["*", "bootstrapsigner", "tokencleaner"]);
        assert_eq!(options.node_monitor_grace_period, Duration::from_secs(16));
    }
}
