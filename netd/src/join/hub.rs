//! What a Kubernetes join leaves on the node so that its kubelet talks to
//! kube-apiserver through netd's edge hub (`netd hub`, [`crate::hub`]):
//!
//! - the hub's CA (`<hub cache dir>/pki/ca.crt`, `ca.key`; directories
//!   0700, files 0600), unless a valid one is there: the kubelet reads its
//!   kubeconfig's CA when it starts, so it must exist before either runs;
//! - the kubelet's kubeconfig naming the hub ([`HubWiring::kubelet_kubeconfig`],
//!   default `/etc/kubernetes/kubelet-hub.conf`, beside kubeadm's
//!   `kubelet.conf`, 0600 as kubeadm writes it), with the kubelet's own
//!   rotating client certificate;
//! - a systemd unit for the hub (`netd-hub.service`), ordered before the
//!   kubelet, restarted always;
//! - a kubelet drop-in (`kubelet.service.d/20-netd-hub.conf`): systemd reads
//!   drop-ins in name order, so its `KUBELET_KUBECONFIG_ARGS` replaces the
//!   one of kubeadm's `10-kubeadm.conf` (which its `ExecStart` expands), and
//!   it makes the kubelet pull the hub in (`Wants=`, `After=`), so the hub
//!   starts with the kubelet whether or not it is enabled itself.
//!
//! Join writes these files only; it does not talk to systemd. The
//! operator runs [`NEXT_STEPS`]. Everything is written through the join's
//! transaction ([`super::local::Written`]): a join that fails later takes
//! back the files it created.

use std::path::{Path, PathBuf};

use super::local::{LocalError, Written};
use crate::hub::pki::{self, PkiError};

/// What the operator runs after a join that wired the hub.
pub const NEXT_STEPS: &str =
    "systemctl daemon-reload && systemctl enable netd-hub && systemctl restart netd-hub kubelet";

/// The hub's unit name.
pub const UNIT_NAME: &str = "netd-hub.service";
/// The kubelet drop-in's name: after kubeadm's `10-kubeadm.conf`.
pub const DROPIN_NAME: &str = "20-netd-hub.conf";
/// Where kubeadm keeps the kubelet's bootstrap kubeconfig: the drop-in
/// keeps passing it, so a kubelet without a client certificate can still
/// get one.
pub const BOOTSTRAP_KUBECONFIG: &str = "/etc/kubernetes/bootstrap-kubelet.conf";

/// Why the hub could not be wired in.
#[derive(Debug, thiserror::Error)]
pub enum HubWiringError {
    /// The hub's CA: making it, or one there that does not load.
    #[error("the edge hub's CA: {0} (move a broken CA away, or join with --hub=false)")]
    Pki(#[from] PkiError),
    /// A file could not be written.
    #[error(transparent)]
    Local(#[from] LocalError),
}

/// Where the hub's files go and what they name (`netd-join`'s `--hub-*`
/// flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubWiring {
    /// The netd binary on this host (`--netd-bin`).
    pub netd_bin: PathBuf,
    /// The hub's cache directory, its CA in `pki/` (`--hub-cache-dir`).
    pub cache_dir: PathBuf,
    /// The kubelet's kubeconfig naming the hub (`--kubelet-kubeconfig`).
    pub kubelet_kubeconfig: PathBuf,
    /// systemd's directory for local units (`--systemd-dir`).
    pub systemd_dir: PathBuf,
    /// The kubelet's client certificate and key, one file, rotated by the
    /// kubelet (`--kubelet-client-cert`): the hub's identity upstream and
    /// the kubelet's towards the hub.
    pub kubelet_client_cert: PathBuf,
}

impl Default for HubWiring {
    fn default() -> Self {
        Self {
            netd_bin: "/usr/local/bin/netd".into(),
            cache_dir: crate::hub::DEFAULT_CACHE_DIR.into(),
            kubelet_kubeconfig: "/etc/kubernetes/kubelet-hub.conf".into(),
            systemd_dir: "/etc/systemd/system".into(),
            kubelet_client_cert: "/var/lib/kubelet/pki/kubelet-client-current.pem".into(),
        }
    }
}

/// One file the wiring writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WiredFile {
    /// Where.
    pub path: PathBuf,
    /// What (the hub CA's key is never shown: see [`HubWiring::files`]).
    pub contents: String,
    /// Its mode.
    pub mode: u32,
}

/// An argument on a systemd `ExecStart=` line: `%` doubled (systemd's
/// specifiers), quoted when it holds white space, quotes or backslashes.
fn unit_arg(arg: &str) -> String {
    let arg = arg.replace('%', "%%");
    if arg.chars().any(|c| c.is_whitespace() || c == '"' || c == '\\' || c == '\'') {
        format!("\"{}\"", arg.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        arg
    }
}

impl HubWiring {
    /// `<systemd dir>/netd-hub.service`.
    pub fn unit_path(&self) -> PathBuf {
        self.systemd_dir.join(UNIT_NAME)
    }

    /// `<systemd dir>/kubelet.service.d/20-netd-hub.conf`.
    pub fn dropin_path(&self) -> PathBuf {
        self.systemd_dir.join("kubelet.service.d").join(DROPIN_NAME)
    }

    /// The hub CA's certificate (the kubeconfig's `certificate-authority`).
    pub fn hub_ca(&self) -> PathBuf {
        crate::hub::pki_dir(&self.cache_dir).join(pki::CA_CERT_FILE)
    }

    /// The kubelet's kubeconfig: the hub at its default address, its CA,
    /// the kubelet's own client certificate.
    pub fn kubeconfig(&self) -> String {
        let cert = self.kubelet_client_cert.display();
        format!(
            "# Written by netd-join: the kubelet reaches kube-apiserver through netd's edge hub (netd hub).\n\
             apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: netd-hub\n  cluster:\n    server: https://{listen}\n    certificate-authority: {ca}\n\
             users:\n\
             - name: kubelet\n  user:\n    client-certificate: {cert}\n    client-key: {cert}\n\
             contexts:\n\
             - name: kubelet@netd-hub\n  context:\n    cluster: netd-hub\n    user: kubelet\n\
             current-context: kubelet@netd-hub\n",
            listen = crate::hub::DEFAULT_LISTEN,
            ca = self.hub_ca().display(),
        )
    }

    /// The hub's unit for `node`, forwarding to `server`, whose serving
    /// certificate (and the kubelet's client certificate) chain to
    /// `cluster_ca`.
    pub fn unit(&self, node: &str, server: &str, cluster_ca: &Path) -> String {
        let path = |p: &Path| unit_arg(&p.display().to_string());
        format!(
            "# Written by netd-join: netd's edge hub, the kubelet's way to kube-apiserver (netd's book: docs/src/concepts/hub.md).\n\
             [Unit]\n\
             Description=netd edge hub: the kubelet's caching proxy to kube-apiserver\n\
             Wants=network-online.target\n\
             After=network-online.target\n\
             Before=kubelet.service\n\
             \n\
             [Service]\n\
             ExecStart={bin} hub --node-name {node} --server {server} --ca-file {ca} --client-cert {cert} --cache-dir {cache}\n\
             Restart=always\n\
             RestartSec=2\n\
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n",
            bin = path(&self.netd_bin),
            node = unit_arg(node),
            server = unit_arg(server),
            ca = path(cluster_ca),
            cert = path(&self.kubelet_client_cert),
            cache = path(&self.cache_dir),
        )
    }

    /// The kubelet drop-in.
    pub fn dropin(&self) -> String {
        format!(
            "# Written by netd-join: the kubelet talks to kube-apiserver through netd's edge hub.\n\
             # Read after kubeadm's 10-kubeadm.conf: this KUBELET_KUBECONFIG_ARGS replaces that one.\n\
             [Unit]\n\
             Wants={UNIT_NAME}\n\
             After={UNIT_NAME}\n\
             \n\
             [Service]\n\
             Environment=\"KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig={BOOTSTRAP_KUBECONFIG} --kubeconfig={}\"\n",
            self.kubelet_kubeconfig.display(),
        )
    }

    /// The files as a join would write them, for `--dry-run` and the
    /// confirmation: the hub's CA only by its certificate's path (made at
    /// the join, or kept when a valid one is there).
    pub fn files(&self, node: &str, server: &str, cluster_ca: &Path) -> Vec<WiredFile> {
        vec![
            WiredFile {
                path: self.hub_ca(),
                contents: "(the hub's CA, made unless a valid one is there; ca.key beside it, 0600)".into(),
                mode: pki_mode(),
            },
            WiredFile { path: self.kubelet_kubeconfig.clone(), contents: self.kubeconfig(), mode: 0o600 },
            WiredFile { path: self.unit_path(), contents: self.unit(node, server, cluster_ca), mode: 0o644 },
            WiredFile { path: self.dropin_path(), contents: self.dropin(), mode: 0o644 },
        ]
    }

    /// Writes the wiring through `written` (taken back with the join):
    /// the hub's CA unless a valid one is there, then the kubeconfig, the
    /// unit and the drop-in. Blocks briefly (small files, one key).
    pub fn write(
        &self,
        written: &mut Written,
        node: &str,
        server: &str,
        cluster_ca: &Path,
    ) -> Result<(), HubWiringError> {
        let pki_dir = crate::hub::pki_dir(&self.cache_dir);
        if pki::HubCa::load(&pki_dir)?.is_none() {
            let ca = pki::generate_ca()?;
            let dir_mode = crate::hub::store::DIR_MODE;
            // The key first: a CA certificate without its key is useless.
            written.write_private(&pki_dir.join(pki::CA_KEY_FILE), ca.key_pem.as_bytes(), pki_mode(), dir_mode)?;
            written.write_private(&pki_dir.join(pki::CA_CERT_FILE), ca.cert_pem.as_bytes(), pki_mode(), dir_mode)?;
        }
        for file in self.files(node, server, cluster_ca).into_iter().skip(1) {
            written.write(&file.path, file.contents.as_bytes(), file.mode)?;
        }
        Ok(())
    }
}

/// The hub's CA files are the hub cache's own (0600).
fn pki_mode() -> u32 {
    crate::hub::store::FILE_MODE
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn wiring(root: &Path) -> HubWiring {
        HubWiring {
            netd_bin: "/usr/local/bin/netd".into(),
            cache_dir: root.join("var/lib/netd/hub"),
            kubelet_kubeconfig: root.join("etc/kubernetes/kubelet-hub.conf"),
            systemd_dir: root.join("etc/systemd/system"),
            kubelet_client_cert: "/var/lib/kubelet/pki/kubelet-client-current.pem".into(),
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_kubeconfig_names_the_hub_its_ca_and_the_kubelets_certificate() {
        let hub = HubWiring::default();
        let parsed: serde_yaml::Value = serde_yaml::from_str(&hub.kubeconfig()).unwrap();
        let expected: serde_yaml::Value = serde_yaml::from_str(
            "apiVersion: v1
kind: Config
clusters:
- name: netd-hub
  cluster:
    server: https://127.0.0.1:10261
    certificate-authority: /var/lib/netd/hub/pki/ca.crt
users:
- name: kubelet
  user:
    client-certificate: /var/lib/kubelet/pki/kubelet-client-current.pem
    client-key: /var/lib/kubelet/pki/kubelet-client-current.pem
contexts:
- name: kubelet@netd-hub
  context:
    cluster: netd-hub
    user: kubelet
current-context: kubelet@netd-hub
",
        )
        .unwrap();
        assert_eq!(parsed, expected);
    }

    #[test]
    fn the_unit_runs_the_hub_before_the_kubelet_and_the_dropin_points_the_kubelet_at_it() {
        let hub = HubWiring::default();
        let unit = hub.unit("edge-1", "https://10.0.0.1:6443", Path::new("/etc/netd/tunnel/ca.crt"));
        assert_eq!(
            unit,
            "# Written by netd-join: netd's edge hub, the kubelet's way to kube-apiserver (netd's book: docs/src/concepts/hub.md).
[Unit]
Description=netd edge hub: the kubelet's caching proxy to kube-apiserver
Wants=network-online.target
After=network-online.target
Before=kubelet.service

[Service]
ExecStart=/usr/local/bin/netd hub --node-name edge-1 --server https://10.0.0.1:6443 --ca-file /etc/netd/tunnel/ca.crt \
--client-cert /var/lib/kubelet/pki/kubelet-client-current.pem --cache-dir /var/lib/netd/hub
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"
        );
        assert_eq!(
            hub.dropin(),
            "# Written by netd-join: the kubelet talks to kube-apiserver through netd's edge hub.
# Read after kubeadm's 10-kubeadm.conf: this KUBELET_KUBECONFIG_ARGS replaces that one.
[Unit]
Wants=netd-hub.service
After=netd-hub.service

[Service]
Environment=\"KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf \
--kubeconfig=/etc/kubernetes/kubelet-hub.conf\"
"
        );
        // systemd's specifiers and quoting.
        assert_eq!(unit_arg("https://h:6443/a%20b"), "https://h:6443/a%%20b");
        assert_eq!(unit_arg("/opt/my netd/netd"), "\"/opt/my netd/netd\"");
    }

    #[test]
    fn written_with_their_modes_an_existing_ca_kept_and_taken_back_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let hub = wiring(dir.path());
        let ca = Path::new("/etc/netd/tunnel/ca.crt");
        {
            let mut written = Written::default();
            hub.write(&mut written, "edge-1", "https://10.0.0.1:6443", ca).unwrap();
            assert_eq!(mode(&hub.cache_dir), 0o700);
            assert_eq!(mode(&hub.cache_dir.join("pki")), 0o700);
            assert_eq!(mode(&hub.hub_ca()), 0o600);
            assert_eq!(mode(&hub.cache_dir.join("pki/ca.key")), 0o600);
            assert_eq!(mode(&hub.kubelet_kubeconfig), 0o600);
            assert_eq!((mode(&hub.unit_path()), mode(&hub.dropin_path())), (0o644, 0o644));
            assert!(pki::HubCa::load(&hub.cache_dir.join("pki")).unwrap().is_some(), "a CA the hub loads");
            // Not committed: dropped as a failed join is.
        }
        assert!(!dir.path().join("var").exists() && !dir.path().join("etc").exists(), "all taken back");

        // A valid CA already there (`netd hub --init`) is kept.
        let made = crate::hub::init_pki(&hub.cache_dir).unwrap();
        let before = std::fs::read(made.ca_cert()).unwrap();
        let mut written = Written::default();
        hub.write(&mut written, "edge-1", "https://10.0.0.1:6443", ca).unwrap();
        let files = written.commit();
        assert_eq!(std::fs::read(hub.hub_ca()).unwrap(), before);
        assert_eq!(files, [hub.kubelet_kubeconfig.clone(), hub.unit_path(), hub.dropin_path()]);
        // A broken one is an error, not replaced.
        std::fs::write(hub.cache_dir.join("pki/ca.key"), "garbage").unwrap();
        let err = hub.write(&mut Written::default(), "edge-1", "https://x", ca).unwrap_err();
        assert!(err.to_string().contains("not a private key"), "{err}");
    }
}
