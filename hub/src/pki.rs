//! The hub's TLS: its own small CA (kept in `<cache-dir>/pki`, 0600), a
//! serving certificate for loopback (`127.0.0.1`, `::1`, `localhost`) it
//! signs, kept in memory only and re-issued every [`SERVING_RENEW`], and
//! the check of clients: a certificate chained to the cluster CA (the
//! handshake fails otherwise, counted), whose subject common name is
//! `system:node:<this node>` (else 403, counted).
//!
//! The kubelet's kubeconfig names `<cache-dir>/pki/ca.crt` as the hub's
//! `certificate-authority`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use super::metrics::{HubMetrics, Refusal};
use super::store::FILE_MODE;
use netd_model::atomic_file;

/// File name of the hub CA's certificate in the PKI directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the hub CA's key.
pub const CA_KEY_FILE: &str = "ca.key";
/// Validity of the hub's CA.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of a serving certificate.
const SERVING_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// How often the serving certificate is re-issued.
pub const SERVING_RENEW: Duration = Duration::from_secs(24 * 3600);
/// Clock skew allowed for at the start of a certificate's validity.
const BACKDATE: Duration = Duration::from_secs(300);

/// Errors of the hub's TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating or signing failed.
    #[error("cannot {action}: {source}")]
    Generate {
        /// What was being done.
        action: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A file could not be read or does not hold what it should.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM bundle does not parse.
    #[error("{}: not PEM: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The PEM error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The CA's key file does not hold a private key.
    #[error("{}: not a private key: {source}", path.display())]
    CaKey {
        /// The key file.
        path: PathBuf,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// The CA's certificate file does not hold a CA certificate.
    #[error("{}: not a CA certificate: {source}", path.display())]
    CaCert {
        /// The certificate file.
        path: PathBuf,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A file could not be written.
    #[error(transparent)]
    Write(#[from] atomic_file::AtomicFileError),
    /// rustls refused the settings.
    #[error("TLS settings: {0}")]
    Rustls(#[source] rustls::Error),
    /// rustls refused a certificate of the client CA.
    #[error("TLS settings: the client CA: {0}")]
    ClientCa(#[source] rustls::Error),
    /// rustls refused the client certificate verifier's settings.
    #[error("TLS settings: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// The hub's CA.
pub struct HubCa {
    issuer: Issuer<'static, KeyPair>,
    cert_path: PathBuf,
}

impl std::fmt::Debug for HubCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubCa").field("cert_path", &self.cert_path).finish_non_exhaustive()
    }
}

fn offset(time: SystemTime) -> time::OffsetDateTime {
    let seconds = time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(seconds).unwrap_or(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn generate(action: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Generate { action, source }
}

/// A hub CA made in memory, not yet written: what [`HubCa::load_or_create`]
/// writes, and what `netd-join` writes inside its own transaction.
#[derive(Clone)]
pub struct CaPem {
    /// The self-signed CA certificate (`ca.crt`).
    pub cert_pem: String,
    /// Its private key (`ca.key`, 0600).
    pub key_pem: String,
}

impl std::fmt::Debug for CaPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key, not even in a debug log.
        f.debug_struct("CaPem").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

/// A fresh hub CA (`CN=netd-hub-ca`, may sign end certificates only,
/// valid ten years).
pub fn generate_ca() -> Result<CaPem, PkiError> {
    let key = KeyPair::generate().map_err(generate("generate the hub CA's key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "netd-hub-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    params.not_before = offset(now.checked_sub(BACKDATE).unwrap_or(now));
    params.not_after = offset(now + CA_VALIDITY);
    let cert = params.self_signed(&key).map_err(generate("self-sign the hub CA"))?;
    Ok(CaPem { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

impl HubCa {
    /// The CA in `dir` (`ca.crt`, `ca.key`), made there first when either
    /// file is missing. `dir` is created 0700. An existing CA is kept; one
    /// that does not load is an error (never silently replaced: the
    /// kubelet's kubeconfig may already trust it).
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        atomic_file::create_dirs(dir, super::store::DIR_MODE)?;
        if let Some(ca) = Self::load(dir)? {
            return Ok(ca);
        }
        let fresh = generate_ca()?;
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        // The key first: a CA certificate without its key is useless.
        atomic_file::write(&key_path, fresh.key_pem.as_bytes(), FILE_MODE)?;
        atomic_file::write(&cert_path, fresh.cert_pem.as_bytes(), FILE_MODE)?;
        tracing::info!(ca = %cert_path.display(), "made the hub's CA");
        Self::load(dir)?.ok_or_else(|| PkiError::File {
            path: cert_path,
            reason: "written, then not found (removed meanwhile?)".into(),
        })
    }

    /// The CA in `dir`; `None` when `ca.crt` or `ca.key` is missing; an
    /// error when they are there but do not hold a CA and its key.
    pub fn load(dir: &Path) -> Result<Option<Self>, PkiError> {
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        if !(cert_path.exists() && key_path.exists()) {
            return Ok(None);
        }
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| PkiError::Read { path: path.to_path_buf(), source })
        };
        let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
        let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::CaKey { path: key_path.clone(), source })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|source| PkiError::CaCert { path: cert_path.clone(), source })?;
        Ok(Some(Self { issuer, cert_path }))
    }

    /// Where the CA certificate is (the kubeconfig's `certificate-authority`).
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// A fresh serving certificate for loopback.
    pub fn issue_serving(&self) -> Result<Arc<CertifiedKey>, PkiError> {
        let key = KeyPair::generate().map_err(generate("generate a serving key"))?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).map_err(generate("name the serving certificate"))?;
        params.distinguished_name.push(DnType::CommonName, "netd-hub");
        for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
            params.subject_alt_names.push(SanType::IpAddress(ip));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = offset(now.checked_sub(BACKDATE).unwrap_or(now));
        params.not_after = offset(now + SERVING_VALIDITY);
        let cert = params.signed_by(&key, &self.issuer).map_err(generate("sign the serving certificate"))?;
        let provider = rustls::crypto::ring::default_provider();
        let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let certified =
            CertifiedKey::from_der(vec![cert.der().clone()], key_der, &provider).map_err(PkiError::Rustls)?;
        Ok(Arc::new(certified))
    }
}

/// The serving certificate in use, replaced by [`ServingCert::renew`].
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServingCert {
    /// Starts with `key`.
    pub fn new(key: Arc<CertifiedKey>) -> Self {
        Self { current: RwLock::new(key) }
    }

    /// New handshakes use `key`.
    pub fn renew(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = key;
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

/// webpki's client verification against the cluster CA, counting the
/// certificates it rejects. A client without a certificate gets through
/// the handshake (and a 403 with a reason, counted, at its request).
#[derive(Debug)]
struct CountingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    metrics: Arc<HubMetrics>,
}

impl ClientCertVerifier for CountingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now);
        if let Err(error) = &verified {
            tracing::info!(%error, "refused a client certificate");
            self.metrics.refused(Refusal::UntrustedCertificate);
        }
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The certificates of a PEM bundle.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bad = |reason: String| PkiError::File { path: path.to_path_buf(), reason };
    let pem = std::fs::read(path).map_err(|source| PkiError::Read { path: path.to_path_buf(), source })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PkiError::Pem { path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(certs)
}

/// The downstream TLS settings: `serving` for the server's certificate,
/// clients verified against `client_ca` (HTTP/1.1 only).
pub fn server_config(
    client_ca: &[CertificateDer<'static>],
    serving: Arc<ServingCert>,
    metrics: Arc<HubMetrics>,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in client_ca {
        roots.add(cert.clone()).map_err(PkiError::ClientCa)?;
    }
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(PkiError::Verifier)?;
    let verifier = Arc::new(CountingVerifier { inner, metrics });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(PkiError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The subject common name of a DER certificate.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let name = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(name)
}
