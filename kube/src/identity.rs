//! Client-certificate authentication whose files may be rotated in place.
//!
//! netd on a node authenticates as the node (`system:node:<name>`, group
//! `system:nodes`) with the kubelet's own client certificate, so the Node
//! authorizer and NodeRestriction confine its writes to its own Node
//! (the book's "Who is trusted for what", docs/src/concepts/trust.md). The kubelet rotates that
//! certificate in place: it writes `kubelet-client-<time>.pem` (certificate
//! and key in one file) and re-points the symlink
//! `kubelet-client-current.pem` at it. [`IdentitySource`] follows that
//! without a restart:
//!
//! - the files are looked at (`stat`, following symlinks: device, inode,
//!   size, modification time) at most every [`IDENTITY_RECHECK`] before a
//!   request, and right after a 401;
//! - when they changed, they are read and parsed again; a pair that does
//!   not parse or whose key does not match the certificate (a certificate
//!   renamed in before its key, with separate files) keeps the identity in
//!   use and is tried again at the next look;
//! - a new identity bumps a generation number; the client then sends new
//!   requests over a new connection pool (see `Reconnecting` in the parent
//!   module), because the API server authenticates each request by the
//!   certificate its connection was opened with. Requests in flight,
//!   watches included, finish on their old connection.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::KubeError;

/// How long a client certificate is used before its files are looked at
/// again (a `stat` each; kubelet rotates long before expiry, so this only
/// bounds how long the old certificate stays in use).
pub const IDENTITY_RECHECK: Duration = Duration::from_secs(10);

/// The files of a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertFiles {
    /// PEM with the certificate (chain), and the private key too when
    /// [`ClientCertFiles::key`] is `None` (kubelet's
    /// `/var/lib/kubelet/pki/kubelet-client-current.pem` holds both).
    pub cert: PathBuf,
    /// PEM with the private key, when it is a file of its own.
    pub key: Option<PathBuf>,
}

impl ClientCertFiles {
    /// The file holding the key.
    pub fn key_file(&self) -> &Path {
        self.key.as_deref().unwrap_or(&self.cert)
    }
}

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self { dev: metadata.dev(), ino: metadata.ino(), len: metadata.len(), modified: metadata.modified().ok() }
    }
}

/// A parsed identity and the file versions it came from.
struct Loaded {
    key: Arc<CertifiedKey>,
    common_name: String,
    stamps: (Stamp, Stamp),
}

struct State {
    loaded: Loaded,
    /// `None`: look at the files before the next request.
    checked_at: Option<Instant>,
}

/// The client certificate in use, reloaded when its files change; also
/// the TLS client-certificate resolver of the client's connections.
pub(super) struct IdentitySource {
    files: ClientCertFiles,
    state: Mutex<State>,
    generation: AtomicU64,
}

impl std::fmt::Debug for IdentitySource {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentitySource")
            .field("files", &self.files)
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl IdentitySource {
    /// Reads the files now: a certificate that cannot be used at start is a
    /// configuration error (nothing to fall back on).
    pub(super) fn new(files: ClientCertFiles) -> Result<Self, KubeError> {
        // Start-up only: small local files, before the client exists.
        let stamps = (stat_blocking(&files.cert)?, stat_blocking(files.key_file())?);
        let cert = read_blocking(&files.cert)?;
        let key = if files.key.is_some() { read_blocking(files.key_file())? } else { cert.clone() };
        let (key, common_name) = parse(&files, &cert, &key)?;
        let loaded = Loaded { key, common_name, stamps };
        Ok(Self {
            files,
            state: Mutex::new(State { loaded, checked_at: Some(Instant::now()) }),
            generation: AtomicU64::new(0),
        })
    }

    /// Bumped each time another identity is loaded.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The subject common name of the certificate in use (e.g.
    /// `system:node:edge-1`).
    pub(super) fn common_name(&self) -> String {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).loaded.common_name.clone()
    }

    /// A 401: the certificate may have been rotated (or expired); look at
    /// the files before the next request.
    pub(super) fn refused(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).checked_at = None;
    }

    /// Looks at the files when due and loads them when they changed; a
    /// failure keeps the identity in use (logged).
    pub(super) async fn refresh_if_due(&self) {
        let (due, known) = {
            let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let due = state.checked_at.is_none_or(|at| at.elapsed() >= IDENTITY_RECHECK);
            (due, state.loaded.stamps)
        };
        if !due {
            return;
        }
        let result = self.reload_if_changed(known).await;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.checked_at = Some(Instant::now());
        match result {
            Ok(None) => {}
            Ok(Some(loaded)) => {
                tracing::info!(
                    cert = %self.files.cert.display(),
                    identity = %loaded.common_name,
                    "client certificate changed on disk: new connections use the new one"
                );
                state.loaded = loaded;
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
            Err(error) => tracing::warn!(%error, "keeping the client certificate loaded before"),
        }
    }

    async fn reload_if_changed(&self, known: (Stamp, Stamp)) -> Result<Option<Loaded>, KubeError> {
        let stamps = (stat(&self.files.cert).await?, stat(self.files.key_file()).await?);
        if stamps == known {
            return Ok(None);
        }
        let cert = read(&self.files.cert).await?;
        let key = if self.files.key.is_some() { read(self.files.key_file()).await? } else { cert.clone() };
        let (key, common_name) = parse(&self.files, &cert, &key)?;
        Ok(Some(Loaded { key, common_name, stamps }))
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).loaded.key.clone()
    }
}

/// The TLS side of [`IdentitySource`]: hands every new connection the
/// identity loaded last (no file access in the handshake).
#[derive(Debug)]
pub(super) struct Resolver(pub(super) Arc<IdentitySource>);

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn bad(path: &Path, what: impl std::fmt::Display) -> KubeError {
    KubeError::BadConfig(format!("client certificate {}: {what}", path.display()))
}

fn stat_blocking(path: &Path) -> Result<Stamp, KubeError> {
    std::fs::metadata(path).map(|m| Stamp::of(&m)).map_err(|e| bad(path, e))
}

fn read_blocking(path: &Path) -> Result<Vec<u8>, KubeError> {
    std::fs::read(path).map_err(|e| bad(path, e))
}

async fn stat(path: &Path) -> Result<Stamp, KubeError> {
    tokio::fs::metadata(path).await.map(|m| Stamp::of(&m)).map_err(|e| bad(path, e))
}

async fn read(path: &Path) -> Result<Vec<u8>, KubeError> {
    tokio::fs::read(path).await.map_err(|e| bad(path, e))
}

/// The certified key of a certificate PEM and a key PEM, checked to belong
/// together, and the certificate's subject common name.
fn parse(files: &ClientCertFiles, cert_pem: &[u8], key_pem: &[u8]) -> Result<(Arc<CertifiedKey>, String), KubeError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&files.cert, format!("not PEM: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(bad(&files.cert, "holds no certificate"));
    };
    let common_name = common_name(leaf).map_err(|e| bad(&files.cert, e))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(files.key_file(), format!("no private key: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| bad(files.key_file(), format!("the key does not fit the certificate: {e}")))?;
    Ok((Arc::new(certified), common_name))
}

fn common_name(cert: &CertificateDer<'_>) -> Result<String, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| format!("not X.509: {e}"))?;
    let name = parsed.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default();
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn issue(cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[tokio::test]
    async fn one_file_with_both_is_read_and_a_rotation_is_followed_through_the_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = issue("system:node:a");
        let first = dir.path().join("kubelet-client-1.pem");
        std::fs::write(&first, format!("{cert_a}{key_a}")).unwrap();
        let current = dir.path().join("kubelet-client-current.pem");
        std::os::unix::fs::symlink(&first, &current).unwrap();
        let source = IdentitySource::new(ClientCertFiles { cert: current.clone(), key: None }).unwrap();
        assert_eq!((source.common_name(), source.generation()), ("system:node:a".to_string(), 0));

        // Not due yet: nothing is looked at.
        let (cert_b, key_b) = issue("system:node:a-renewed");
        let second = dir.path().join("kubelet-client-2.pem");
        std::fs::write(&second, format!("{cert_b}{key_b}")).unwrap();
        let tmp = dir.path().join("tmp-link");
        std::os::unix::fs::symlink(&second, &tmp).unwrap();
        std::fs::rename(&tmp, &current).unwrap();
        source.refresh_if_due().await;
        assert_eq!(source.generation(), 0);
        // After a 401 (or IDENTITY_RECHECK), the new file is in use.
        source.refused();
        source.refresh_if_due().await;
        assert_eq!((source.common_name(), source.generation()), ("system:node:a-renewed".to_string(), 1));
        source.refused();
        source.refresh_if_due().await;
        assert_eq!(source.generation(), 1, "unchanged files load nothing");
    }

    #[tokio::test]
    async fn a_half_rotated_pair_keeps_the_identity_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = issue("system:node:a");
        let (cert_b, key_b) = issue("system:node:b");
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, &cert_a).unwrap();
        std::fs::write(&key, &key_a).unwrap();
        let files = ClientCertFiles { cert: cert.clone(), key: Some(key.clone()) };
        let source = IdentitySource::new(files.clone()).unwrap();
        // The certificate is renamed in before its key.
        std::fs::write(&cert, &cert_b).unwrap();
        source.refused();
        source.refresh_if_due().await;
        assert_eq!((source.common_name(), source.generation()), ("system:node:a".to_string(), 0));
        std::fs::write(&key, &key_b).unwrap();
        source.refused();
        source.refresh_if_due().await;
        assert_eq!((source.common_name(), source.generation()), ("system:node:b".to_string(), 1));

        // At start, the same mismatch is an error, and so is a file
        // without a key or without a certificate.
        std::fs::write(&key, &key_a).unwrap();
        let err = IdentitySource::new(files).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
        let err = IdentitySource::new(ClientCertFiles { cert: cert.clone(), key: None }).unwrap_err().to_string();
        assert!(err.contains("no private key"), "{err}");
        let err = IdentitySource::new(ClientCertFiles { cert: key, key: None }).unwrap_err().to_string();
        assert!(err.contains("holds no certificate"), "{err}");
        let missing = IdentitySource::new(ClientCertFiles { cert: dir.path().join("none"), key: None });
        assert!(missing.unwrap_err().to_string().contains("none"));
    }
}
