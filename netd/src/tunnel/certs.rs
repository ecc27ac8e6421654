//! Certificates for the edge tunnel: a CA, node certificates that name
//! edge nodes as kubelet client certificates do, the tunnel server's
//! certificate and client certificates (kube-apiserver's egress selector),
//! all as PEM files; and the read-back side the transport needs: which node
//! a verified peer certificate names, its IP SANs, and loading certificate
//! files again when they change.
//!
//! Keys are ECDSA P-256 (rcgen's default, signed with ring like the rest of
//! netd's TLS). The CA is constrained to path length 0: it signs leaves only.
//! Certificates minted with a `Duration` start 5 minutes in the past, as
//! Kubernetes' own signer does, so an edge box whose clock lags a little
//! still accepts them, and never outlive the CA.
//!
//! Files are written by [`crate::atomic_file`] (a fresh temporary file in
//! the target directory, renamed into place), so a reader sees the old file
//! or the new one, never half of one; private keys are mode 0600 from their
//! first byte.

use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::atomic_file::{self, AtomicFileError};

/// The organization every node certificate carries, as kubelet's do; the
/// Node authorizer keys on it.
pub const NODES_ORGANIZATION: &str = "system:nodes";

/// The common-name prefix of node certificates: `system:node:<name>`.
pub const NODE_CN_PREFIX: &str = "system:node:";

/// The CA certificate's file name in a certificate directory.
pub const CA_CERT_FILE: &str = "ca.crt";

/// The CA key's file name in a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// How far into the past certificates minted with a `Duration` start:
/// tolerance for verifiers whose clock lags the issuer's (Kubernetes'
/// certificate signer uses the same 5 minutes).
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// What went wrong with a certificate or key, and in which file or input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file or directory could not be written.
    #[error(transparent)]
    File(#[from] AtomicFileError),
    /// The input is not the PEM it should be: garbage, empty, truncated, or
    /// the wrong kind of block.
    #[error("{what}: {reason}")]
    Pem {
        /// The file or input.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A CERTIFICATE block whose contents are not an X.509 certificate.
    #[error("{what}: not a valid X.509 certificate: {reason}")]
    Certificate {
        /// The file or input.
        what: String,
        /// The parser's complaint.
        reason: String,
    },
    /// A private key that cannot be used.
    #[error("{what}: unusable private key: {reason}")]
    Key {
        /// The file or input.
        what: String,
        /// Why.
        reason: String,
    },
    /// A private key that belongs to another certificate.
    #[error("{key} does not belong to {cert}: their public keys differ")]
    KeyMismatch {
        /// The certificate's file or input.
        cert: String,
        /// The key's file or input.
        key: String,
    },
    /// A certificate used as a CA that is not one.
    #[error("{what}: not a CA certificate (no basicConstraints CA:TRUE)")]
    NotCa {
        /// The file or input.
        what: String,
    },
    /// A certificate its supposed CA did not sign.
    #[error("{what} was not issued by {ca}")]
    NotIssuedBy {
        /// The certificate's file.
        what: String,
        /// The CA file.
        ca: String,
    },
    /// A node name that is not a valid Kubernetes node name.
    #[error("invalid node name {name:?}: {reason}")]
    InvalidNodeName {
        /// The name.
        name: String,
        /// The rule it breaks.
        reason: String,
    },
    /// A DNS name that cannot go into a subjectAltName.
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidDnsName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A subject field that cannot be used.
    #[error("invalid {field}: {reason}")]
    InvalidSubject {
        /// Which field ("common name", "organization").
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A validity period that cannot be issued.
    #[error("invalid validity: {0}")]
    Validity(String),
    /// A certificate request with nothing a peer could verify it by.
    #[error("{0}")]
    MissingNames(String),
    /// A peer certificate without a common name.
    #[error("certificate has no CN, so it names no node")]
    MissingCommonName,
    /// A peer certificate with more than one common name.
    #[error("certificate has {0} CNs; a node certificate has exactly one")]
    MultipleCommonNames(usize),
    /// A peer certificate whose common name is not a node's.
    #[error("certificate CN {0:?} is not system:node:<name>")]
    NotNodeCommonName(String),
    /// A peer certificate outside the nodes group.
    #[error("certificate lacks O=system:nodes")]
    NotSystemNodes,
    /// rcgen refused to build or sign a certificate.
    #[error("cannot {action}: {source}")]
    Generate {
        /// What was being done.
        action: &'static str,
        /// rcgen's error.
        source: rcgen::Error,
    },
}

/// A certificate authority: its certificate and the key that signs with it.
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    // The key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA named `common_name`, valid from 5 minutes ago
    /// for `validity`, with a fresh P-256 key.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self, CertError> {
        check_subject("common name", common_name)?;
        let now = SystemTime::now();
        let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
        let not_after = add(now, validity)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, not_before, not_after)?;
        let key = KeyPair::generate().map_err(|source| CertError::Generate { action: "generate a key", source })?;
        let cert = params
            .self_signed(&key)
            .map_err(|source| CertError::Generate { action: "self-sign the CA certificate", source })?;
        // Through PEM and back: a generated CA and a loaded one are built the
        // same way, so what it signs does not depend on where it came from.
        Self::from_pem_named(&cert.pem(), &key.serialize_pem(), "generated CA certificate", "generated CA key")
    }

    /// A CA from its PEM certificate and PEM (PKCS#8) key; checks that the
    /// certificate is a CA and that the key is its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        Self::from_pem_named(cert_pem, key_pem, "CA certificate", "CA key")
    }

    /// A CA from its certificate and key files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        let cert = read_string(cert_path)?;
        let key = read_string(key_path)?;
        Self::from_pem_named(&cert, &key, &cert_path.display().to_string(), &key_path.display().to_string())
    }

    /// The CA in `dir`: `ca.crt` and `ca.key`, as [`CertificateAuthority::write`] leaves them.
    pub fn load_dir(dir: &Path) -> Result<Self, CertError> {
        Self::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE))
    }

    fn from_pem_named(cert_pem: &str, key_pem: &str, cert_what: &str, key_what: &str) -> Result<Self, CertError> {
        let cert_der = single_cert(cert_what, cert_pem.as_bytes())?;
        let cert = parse_cert(cert_what, &cert_der)?;
        if !cert.is_ca() {
            return Err(CertError::NotCa { what: cert_what.to_owned() });
        }
        let key_der = parse_key(key_what, key_pem.as_bytes())?;
        if !matches!(key_der, PrivateKeyDer::Pkcs8(_)) {
            return Err(CertError::Key {
                what: key_what.to_owned(),
                reason: "not PKCS#8 (\"BEGIN PRIVATE KEY\"); ring signs only with PKCS#8 keys: \
                         convert it with `openssl pkcs8 -topk8 -nocrypt`"
                    .to_owned(),
            });
        }
        let key = KeyPair::try_from(&key_der)
            .map_err(|e| CertError::Key { what: key_what.to_owned(), reason: e.to_string() })?;
        if key.subject_public_key_info() != cert.public_key().raw {
            return Err(CertError::KeyMismatch { cert: cert_what.to_owned(), key: key_what.to_owned() });
        }
        let not_after = to_system_time(cert.validity().not_after.timestamp());
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| CertError::Certificate { what: cert_what.to_owned(), reason: e.to_string() })?;
        Ok(Self { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned(), cert_der, not_after, issuer })
    }

    /// The CA certificate, PEM: what peers trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key, PEM. Secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// When the CA certificate expires; nothing it issues outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`, creating it
    /// (0700) if needed, each atomically. Replaces an existing CA.
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        create_dir(dir)?;
        write_atomic(&dir.join(CA_KEY_FILE), self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)
    }

    /// Writes only `ca.crt` into `dir`: the trust anchor that goes next to
    /// each certificate this CA issues.
    pub fn write_cert(&self, dir: &Path) -> Result<(), CertError> {
        create_dir(dir)?;
        write_atomic(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)
    }

    /// A certificate for edge node `node_name`'s tunnel agent, named as
    /// kubelet client certificates name nodes (`CN=system:node:<name>`,
    /// `O=system:nodes`), for client and server authentication, with the
    /// node's addresses as IP SANs.
    pub fn issue_node(&self, node_name: &str, ips: &[IpAddr], validity: Duration) -> Result<IssuedCert, CertError> {
        let (not_before, not_after) = self.window(validity)?;
        self.issue_node_with_validity(node_name, ips, not_before, not_after)
    }

    /// [`CertificateAuthority::issue_node`] with an explicit validity
    /// period, not clamped to the CA's: for tests and drills that need an
    /// expired or not-yet-valid certificate.
    pub fn issue_node_with_validity(
        &self,
        node_name: &str,
        ips: &[IpAddr],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, CertError> {
        validate_node_name(node_name)?;
        let cn = format!("{NODE_CN_PREFIX}{node_name}");
        let sans = ip_sans(ips);
        self.sign(name(&cn, Some(NODES_ORGANIZATION)), sans, not_before, not_after)
    }

    /// The tunnel server's certificate: `CN=<common_name>`, for server and
    /// client authentication, with these DNS and IP SANs (at least one:
    /// clients verify the server by them).
    pub fn issue_server(
        &self,
        common_name: &str,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<IssuedCert, CertError> {
        check_subject("common name", common_name)?;
        if dns_names.is_empty() && ips.is_empty() {
            return Err(CertError::MissingNames(
                "a server certificate needs at least one DNS name or IP address: clients verify the server by them"
                    .to_owned(),
            ));
        }
        let mut sans = Vec::with_capacity(dns_names.len() + ips.len());
        for dns in dns_names {
            sans.push(dns_san(dns)?);
        }
        sans.extend(ip_sans(ips));
        let (not_before, not_after) = self.window(validity)?;
        self.sign(name(common_name, None), sans, not_before, not_after)
    }

    /// A client certificate `CN=<common_name>[, O=<organization>]`, such as
    /// kube-apiserver's for the egress selector's `tlsConfig`.
    pub fn issue_client(
        &self,
        common_name: &str,
        organization: Option<&str>,
        validity: Duration,
    ) -> Result<IssuedCert, CertError> {
        check_subject("common name", common_name)?;
        if let Some(organization) = organization {
            check_subject("organization", organization)?;
        }
        let (not_before, not_after) = self.window(validity)?;
        self.sign(name(common_name, organization), Vec::new(), not_before, not_after)
    }

    /// From 5 minutes ago for `validity`, ending no later than the CA.
    fn window(&self, validity: Duration) -> Result<(SystemTime, SystemTime), CertError> {
        if validity.is_zero() {
            return Err(CertError::Validity("the validity is zero".to_owned()));
        }
        let now = SystemTime::now();
        if self.not_after <= now {
            return Err(CertError::Validity(format!(
                "the CA expired {} s ago; make a new one",
                now.duration_since(self.not_after).unwrap_or_default().as_secs()
            )));
        }
        let not_after = add(now, validity).map_or(self.not_after, |end| end.min(self.not_after));
        Ok((now.checked_sub(BACKDATE).unwrap_or(now), not_after))
    }

    /// Signs a node's certificate signing request (as [`node_csr`] makes
    /// on the node, so the private key never leaves it): the request must
    /// name a node (`CN=system:node:<name>`, `O=system:nodes`) and carry a
    /// valid signature; only its subject and public key are taken — the
    /// extensions, usages and SANs are this CA's own (`ips` as IP SANs), as
    /// for [`CertificateAuthority::issue_node`]. Returns the node's name and
    /// the certificate (PEM).
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<(String, String), CertError> {
        let what = "certificate signing request";
        let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| CertError::Pem { what: what.to_owned(), reason: e.to_string() })?;
        let request = rcgen::CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| CertError::Certificate { what: what.to_owned(), reason: e.to_string() })?;
        use x509_parser::prelude::FromDer as _;
        let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
            .map_err(|e| CertError::Certificate { what: what.to_owned(), reason: e.to_string() })?;
        let node = node_name_of_subject(what, parsed.certification_request_info.subject.clone())?;
        let (not_before, not_after) = self.window(validity)?;
        let subject = name(&format!("{NODE_CN_PREFIX}{node}"), Some(NODES_ORGANIZATION));
        let cert = self.sign_key(subject, ip_sans(ips), not_before, not_after, &request.public_key)?;
        Ok((node, cert.pem()))
    }

    /// Every leaf is client and server capable: one certificate serves an
    /// endpoint whichever side of the TLS connection it ends up on.
    fn sign(
        &self,
        subject: DistinguishedName,
        sans: Vec<SanType>,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, CertError> {
        let key = KeyPair::generate().map_err(|source| CertError::Generate { action: "generate a key", source })?;
        let cert = self.sign_key(subject, sans, not_before, not_after, &key)?;
        let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem(), cert_der: cert.der().clone(), key_der })
    }

    /// A leaf certificate for `public_key`.
    fn sign_key(
        &self,
        subject: DistinguishedName,
        sans: Vec<SanType>,
        not_before: SystemTime,
        not_after: SystemTime,
        public_key: &impl PublicKeyData,
    ) -> Result<rcgen::Certificate, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, not_before, not_after)?;
        params
            .signed_by(public_key, &self.issuer)
            .map_err(|source| CertError::Generate { action: "sign the certificate", source })
    }
}

/// A node's certificate signing request and the key it is for.
pub struct NodeCsr {
    /// `-----BEGIN CERTIFICATE REQUEST-----`.
    pub csr_pem: String,
    /// The private key (PKCS#8 PEM): stays on the node.
    pub key_pem: String,
}

/// A request for a node's tunnel identity, shaped as kubelet's client CSR
/// (`CN=system:node:<name>`, `O=system:nodes`, no SANs) so that
/// Kubernetes' `kubernetes.io/kube-apiserver-client-kubelet` signer, which
/// forbids SANs, signs it. The tunnel server then routes by the node's
/// lease rather than by IP SANs.
pub fn node_csr(node_name: &str) -> Result<NodeCsr, CertError> {
    validate_node_name(node_name)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("{NODE_CN_PREFIX}{node_name}"), Some(NODES_ORGANIZATION));
    let key = KeyPair::generate().map_err(|source| CertError::Generate { action: "generate a key", source })?;
    let csr = params
        .serialize_request(&key)
        .map_err(|source| CertError::Generate { action: "make the signing request", source })?;
    let csr_pem = csr.pem().map_err(|source| CertError::Generate { action: "encode the signing request", source })?;
    Ok(NodeCsr { csr_pem, key_pem: key.serialize_pem() })
}

/// A certificate and its private key, as a CA issued them.
pub struct IssuedCert {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: PrivateKeyDer<'static>,
}

impl fmt::Debug for IssuedCert {
    // The key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// The certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, PEM (PKCS#8). Secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The private key, DER (PKCS#8). Secret.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        self.key_der.clone_key()
    }

    /// Writes `<stem>.key` (0600) and `<stem>.crt` (0644) into `dir`,
    /// creating it (0700) if needed, each atomically; returns the
    /// certificate's and the key's paths. The key goes first: a reader that
    /// sees the new certificate already finds its key (see [`CertFiles`]).
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), CertError> {
        create_dir(dir)?;
        let (cert, key) = (dir.join(format!("{stem}.crt")), dir.join(format!("{stem}.key")));
        write_atomic(&key, self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&cert, self.cert_pem.as_bytes(), 0o644)?;
        Ok((cert, key))
    }
}

/// Checks `name` as Kubernetes checks node names: a lowercase RFC 1123
/// subdomain (labels of a-z, 0-9 and '-', starting and ending with a letter
/// or digit, joined by '.'), at most 253 characters.
pub fn validate_node_name(name: &str) -> Result<(), CertError> {
    let fail = |reason: String| Err(CertError::InvalidNodeName { name: name.to_owned(), reason });
    if name.is_empty() {
        return fail("it is empty".to_owned());
    }
    if name.len() > 253 {
        return fail(format!("it is {} characters long; at most 253", name.len()));
    }
    if let Some((at, c)) = name.char_indices().find(|(_, c)| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '.')) {
        let rule = if c.is_ascii_uppercase() { "node names are lower case" } else { "only a-z, 0-9, '-' and '.'" };
        return fail(format!("character {} {c:?} is not allowed: {rule}", at + 1));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return fail("it has an empty label (a leading, trailing or doubled '.')".to_owned());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return fail(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

/// The node a peer certificate names: `<name>` iff its subject is
/// `CN=system:node:<name>` (exactly one CN, `<name>` a valid node name) and
/// includes `O=system:nodes`. Only meaningful for a certificate the TLS
/// layer has verified against the tunnel CA.
pub fn node_name_of(cert_der: &[u8]) -> Result<String, CertError> {
    let what = "peer certificate";
    let cert = parse_cert(what, cert_der)?;
    node_name_of_subject(what, cert.subject().clone())
}

/// The node `subject` names (see [`node_name_of`]); `what` for errors.
fn node_name_of_subject(what: &str, subject: x509_parser::x509::X509Name<'_>) -> Result<String, CertError> {
    let mut common_names = Vec::new();
    for attribute in subject.iter_common_name() {
        let cn = attribute.as_str().map_err(|e| CertError::Certificate {
            what: what.to_owned(),
            reason: format!("its CN is not a string: {e}"),
        })?;
        common_names.push(cn);
    }
    let cn = match common_names.as_slice() {
        [] => return Err(CertError::MissingCommonName),
        [cn] => *cn,
        many => return Err(CertError::MultipleCommonNames(many.len())),
    };
    let Some(node) = cn.strip_prefix(NODE_CN_PREFIX) else {
        return Err(CertError::NotNodeCommonName(cn.to_owned()));
    };
    validate_node_name(node)?;
    if !subject.iter_organization().any(|o| o.as_str() == Ok(NODES_ORGANIZATION)) {
        return Err(CertError::NotSystemNodes);
    }
    Ok(node.to_owned())
}

/// The IP addresses among a certificate's subjectAltNames, in order; empty
/// when it has none.
pub fn ip_sans_of(cert_der: &[u8]) -> Result<Vec<IpAddr>, CertError> {
    let what = "peer certificate";
    let cert = parse_cert(what, cert_der)?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Certificate { what: what.to_owned(), reason: format!("bad subjectAltName: {e}") })?;
    let Some(sans) = sans else { return Ok(Vec::new()) };
    let mut ips = Vec::new();
    for general_name in &sans.value.general_names {
        if let GeneralName::IPAddress(bytes) = general_name {
            let ip = if let Ok(octets) = <[u8; 4]>::try_from(*bytes) {
                IpAddr::V4(Ipv4Addr::from(octets))
            } else if let Ok(octets) = <[u8; 16]>::try_from(*bytes) {
                IpAddr::V6(Ipv6Addr::from(octets))
            } else {
                return Err(CertError::Certificate {
                    what: what.to_owned(),
                    reason: format!("an IP subjectAltName of {} bytes", bytes.len()),
                });
            };
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// Where an endpoint's certificate, key and trusted CA live.
///
/// The contract with the transport: call [`CertFiles::load`] at start and
/// keep its [`LoadedCerts::stamp`]; poll [`CertFiles::changed_since`] with
/// that stamp (every few seconds); when it says so, load again and, on
/// success, use the new certificates for new connections. On an error keep
/// the previous ones and retry at the next poll: a certificate and its key
/// are replaced by two renames, so a reader can catch one new and the other
/// old for an instant ([`CertError::KeyMismatch`]). The stamp is taken
/// before the files are read, so a change during a load is seen at the next
/// poll, never lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The endpoint's certificate (PEM, leaf first, then any intermediates).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates peers are verified against (PEM).
    pub ca: PathBuf,
}

/// One file's identity and version: changes when it is rewritten in place
/// or replaced by a rename (a new inode), or appears or disappears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// The state of a [`CertFiles`]' three files at one moment, for
/// [`CertFiles::changed_since`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilesStamp([Option<FileStamp>; 3]);

/// What [`CertFiles::load`] read: ready for rustls.
#[derive(Debug)]
pub struct LoadedCerts {
    /// The endpoint's certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// The trusted CA certificates.
    pub roots: Vec<CertificateDer<'static>>,
    /// When the leaf expires.
    pub not_after: SystemTime,
    /// The files' state just before they were read.
    pub stamp: FilesStamp,
}

impl LoadedCerts {
    /// The roots as a rustls trust store.
    pub fn root_store(&self) -> Result<rustls::RootCertStore, CertError> {
        let mut store = rustls::RootCertStore::empty();
        for root in &self.roots {
            store.add(root.clone()).map_err(|e| CertError::Certificate {
                what: "CA certificate".to_owned(),
                reason: format!("not usable as a trust anchor: {e}"),
            })?;
        }
        Ok(store)
    }
}

impl CertFiles {
    /// `<stem>.crt`, `<stem>.key` and `ca.crt` in `dir`: the layout
    /// [`IssuedCert::write`] and [`CertificateAuthority::write_cert`] make.
    pub fn in_dir(dir: &Path, stem: &str) -> Self {
        Self { cert: dir.join(format!("{stem}.crt")), key: dir.join(format!("{stem}.key")), ca: dir.join(CA_CERT_FILE) }
    }

    /// The files' current state.
    pub fn stamp(&self) -> FilesStamp {
        FilesStamp([&self.cert, &self.key, &self.ca].map(|path| {
            // fs::metadata follows symlinks, so a Kubernetes secret volume's
            // `..data` link swap shows as a new inode.
            fs::metadata(path).ok().map(|m| FileStamp {
                dev: m.dev(),
                ino: m.ino(),
                len: m.len(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
            })
        }))
    }

    /// Whether any of the files changed (was rewritten, replaced, removed or
    /// created) since `stamp` was taken. Also true while a file is missing,
    /// so the caller's reload reports why.
    pub fn changed_since(&self, stamp: &FilesStamp) -> bool {
        let now = self.stamp();
        now != *stamp || now.0.iter().any(Option::is_none)
    }

    /// Reads and checks the three files: PEM, a certificate chain, a key
    /// that matches the leaf, CA certificates that issued the chain.
    pub fn load(&self) -> Result<LoadedCerts, CertError> {
        let stamp = self.stamp();
        let (cert_what, key_what, ca_what) =
            (self.cert.display().to_string(), self.key.display().to_string(), self.ca.display().to_string());
        let chain = parse_certs(&cert_what, &read(&self.cert)?)?;
        let key = parse_key(&key_what, &read(&self.key)?)?;
        let roots = parse_certs(&ca_what, &read(&self.ca)?)?;

        let leaf = chain.first().ok_or_else(|| no_block(&cert_what, "CERTIFICATE"))?;
        let leaf = parse_cert(&cert_what, leaf)?;
        let provider = rustls::crypto::ring::default_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| CertError::Key { what: key_what.clone(), reason: e.to_string() })?;
        if let Some(public) = signing_key.public_key() {
            if public.as_ref() != leaf.public_key().raw {
                return Err(CertError::KeyMismatch { cert: cert_what, key: key_what });
            }
        }

        let top = chain.last().map(|top| parse_cert(&cert_what, top)).transpose()?;
        let top = top.as_ref().unwrap_or(&leaf);
        let mut issued = false;
        for root in &roots {
            let root = parse_cert(&ca_what, root)?;
            if top.issuer().as_raw() == root.subject().as_raw() && top.verify_signature(Some(root.public_key())).is_ok()
            {
                issued = true;
                break;
            }
        }
        if !issued {
            return Err(CertError::NotIssuedBy { what: cert_what, ca: ca_what });
        }
        let not_after = to_system_time(leaf.validity().not_after.timestamp());
        Ok(LoadedCerts { chain, key, roots, not_after, stamp })
    }
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    if let Some(organization) = organization {
        name.push(DnType::OrganizationName, organization);
    }
    name.push(DnType::CommonName, common_name);
    name
}

fn check_subject(field: &'static str, value: &str) -> Result<(), CertError> {
    if value.trim().is_empty() {
        return Err(CertError::InvalidSubject { field, reason: "it is empty".to_owned() });
    }
    if value.chars().any(char::is_control) {
        return Err(CertError::InvalidSubject { field, reason: format!("{value:?} has control characters") });
    }
    Ok(())
}

fn dns_san(dns: &str) -> Result<SanType, CertError> {
    let invalid = |reason: String| CertError::InvalidDnsName { name: dns.to_owned(), reason };
    rustls_pki_types::DnsName::try_from(dns).map_err(|e| invalid(e.to_string()))?;
    Ok(SanType::DnsName(dns.try_into().map_err(|e: rcgen::Error| invalid(e.to_string()))?))
}

fn ip_sans(ips: &[IpAddr]) -> Vec<SanType> {
    let mut unique: Vec<IpAddr> = Vec::with_capacity(ips.len());
    for ip in ips {
        if !unique.contains(ip) {
            unique.push(*ip);
        }
    }
    unique.into_iter().map(SanType::IpAddress).collect()
}

fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), CertError> {
    if not_after <= not_before {
        return Err(CertError::Validity("it ends before it starts".to_owned()));
    }
    params.not_before = to_offset(not_before)?;
    params.not_after = to_offset(not_after)?;
    Ok(())
}

fn add(now: SystemTime, validity: Duration) -> Result<SystemTime, CertError> {
    now.checked_add(validity).ok_or_else(|| CertError::Validity(format!("{} s is too long", validity.as_secs())))
}

/// X.509 times have whole seconds.
fn to_offset(time: SystemTime) -> Result<time::OffsetDateTime, CertError> {
    let seconds = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).ok(),
        Err(before) => i64::try_from(before.duration().as_secs()).ok().map(|s| -s),
    };
    seconds
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .filter(|t| (1950..=9999).contains(&t.year()))
        .ok_or_else(|| CertError::Validity("a time outside the years 1950-9999 X.509 can express".to_owned()))
}

fn to_system_time(unix_seconds: i64) -> SystemTime {
    let magnitude = Duration::from_secs(unix_seconds.unsigned_abs());
    let time = if unix_seconds >= 0 { UNIX_EPOCH.checked_add(magnitude) } else { UNIX_EPOCH.checked_sub(magnitude) };
    time.unwrap_or(UNIX_EPOCH)
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Read { path: path.to_owned(), source })
}

fn read_string(path: &Path) -> Result<String, CertError> {
    String::from_utf8(read(path)?)
        .map_err(|_| CertError::Pem { what: path.display().to_string(), reason: "not text, so not PEM".to_owned() })
}

fn parse_cert<'a>(what: &str, der: &'a [u8]) -> Result<X509Certificate<'a>, CertError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| CertError::Certificate { what: what.to_owned(), reason: e.to_string() })
}

/// Every CERTIFICATE block, each checked to be X.509.
fn parse_certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| pem_error(what, "CERTIFICATE", e))?;
        parse_cert(what, &cert)?;
        certs.push(cert);
    }
    if certs.is_empty() {
        if PrivateKeyDer::from_pem_slice(pem).is_ok() {
            return Err(CertError::Pem {
                what: what.to_owned(),
                reason: "holds a private key, not a certificate (files swapped?)".to_owned(),
            });
        }
        return Err(no_block(what, "CERTIFICATE"));
    }
    Ok(certs)
}

fn single_cert(what: &str, pem: &[u8]) -> Result<CertificateDer<'static>, CertError> {
    let mut certs = parse_certs(what, pem)?;
    if certs.len() > 1 {
        return Err(CertError::Pem {
            what: what.to_owned(),
            reason: format!("{} certificates; a CA file for signing holds exactly one", certs.len()),
        });
    }
    certs.pop().ok_or_else(|| no_block(what, "CERTIFICATE"))
}

fn parse_key(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, CertError> {
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) if CertificateDer::from_pem_slice(pem).is_ok() => Err(CertError::Pem {
            what: what.to_owned(),
            reason: "holds a certificate, not a private key (files swapped?)".to_owned(),
        }),
        Err(e) => Err(pem_error(what, "PRIVATE KEY", e)),
    }
}

fn no_block(what: &str, kind: &str) -> CertError {
    CertError::Pem { what: what.to_owned(), reason: format!("no {kind} PEM block (empty, not PEM, or another kind)") }
}

fn pem_error(what: &str, kind: &str, error: pem::Error) -> CertError {
    let reason = match error {
        pem::Error::NoItemsFound => return no_block(what, kind),
        pem::Error::MissingSectionEnd { end_marker } => {
            format!("truncated: no \"-----END {}-----\" line", String::from_utf8_lossy(&end_marker))
        }
        pem::Error::IllegalSectionStart { line } => {
            format!("malformed BEGIN line {:?}", String::from_utf8_lossy(&line))
        }
        pem::Error::Base64Decode(e) => format!("bad base64 in a PEM block: {e}"),
        other => other.to_string(),
    };
    CertError::Pem { what: what.to_owned(), reason }
}

/// Writes one certificate file as this module writes its own: its
/// directory created (0700) if needed, the file replaced atomically with
/// exactly `mode` from its first byte ([`crate::atomic_file`]).
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dir(dir)?;
    }
    write_atomic(path, contents, mode)
}

/// Certificate directories hold keys: only their owner may list them.
fn create_dir(dir: &Path) -> Result<(), CertError> {
    Ok(atomic_file::create_dirs(dir, 0o700)?)
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    Ok(atomic_file::write(path, contents, mode)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use rustls::client::ClientConnection;
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::ServerName;
    use rustls::server::{ServerConnection, WebPkiClientVerifier};
    use rustls::{CertificateError, ClientConfig, Connection, ServerConfig};

    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ca() -> CertificateAuthority {
        CertificateAuthority::generate("netd test CA", 30 * DAY).unwrap()
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(ca: &CertificateDer<'static>) -> Arc<rustls::RootCertStore> {
        let mut store = rustls::RootCertStore::empty();
        store.add(ca.clone()).unwrap();
        Arc::new(store)
    }

    /// A TLS 1.3 server that requires a client certificate from `ca`.
    fn server_config(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: Arc<rustls::RootCertStore>,
    ) -> Arc<ServerConfig> {
        let verifier = WebPkiClientVerifier::builder_with_provider(ca, provider()).build().unwrap();
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        Arc::new(config)
    }

    fn client_config(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: Arc<rustls::RootCertStore>,
    ) -> Arc<ClientConfig> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(ca)
            .with_client_auth_cert(chain, key)
            .unwrap();
        Arc::new(config)
    }

    #[derive(Debug)]
    enum Refused {
        ByServer(rustls::Error),
        ByClient(rustls::Error),
    }

    /// Moves every pending TLS record from one side to the other.
    fn pump(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
        let mut bytes = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut bytes).unwrap();
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets()?;
        }
        Ok(())
    }

    /// A handshake in memory; then "ping" from client to server. Returns
    /// the server side, for its view of the peer.
    fn connect(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
        server_name: &str,
    ) -> Result<ServerConnection, Refused> {
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        let mut client = Connection::Client(ClientConnection::new(client, name).unwrap());
        let mut server = Connection::Server(ServerConnection::new(server).unwrap());
        for _ in 0..10 {
            pump(&mut client, &mut server).map_err(Refused::ByServer)?;
            pump(&mut server, &mut client).map_err(Refused::ByClient)?;
            if !client.is_handshaking() && !server.is_handshaking() {
                client.writer().write_all(b"ping").unwrap();
                pump(&mut client, &mut server).map_err(Refused::ByServer)?;
                let mut got = [0; 4];
                server.reader().read_exact(&mut got).unwrap();
                assert_eq!(&got, b"ping");
                let Connection::Server(server) = server else { unreachable!() };
                return Ok(server);
            }
        }
        panic!("the handshake did not finish");
    }

    /// The server certificate and its key from `ca`, for "tunnel.example" and 127.0.0.1.
    fn server_cert(ca: &CertificateAuthority) -> IssuedCert {
        ca.issue_server("netd-tunnel-server", &["tunnel.example".to_owned()], &[ip("127.0.0.1")], DAY).unwrap()
    }

    fn unix(time: SystemTime) -> i64 {
        time.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    #[test]
    fn a_node_certificate_names_the_node_with_its_addresses() {
        let ca = ca();
        let ips = [ip("10.0.5.7"), ip("fd00::7"), ip("10.0.5.7")];
        let before = SystemTime::now();
        let node = ca.issue_node("edge-1", &ips, 7 * DAY).unwrap();

        assert_eq!(node_name_of(node.cert_der()).unwrap(), "edge-1");
        assert_eq!(ip_sans_of(node.cert_der()).unwrap(), [ip("10.0.5.7"), ip("fd00::7")], "deduplicated, in order");
        let (_, cert) = x509_parser::parse_x509_certificate(node.cert_der()).unwrap();
        assert_eq!(cert.subject().to_string(), "O=system:nodes, CN=system:node:edge-1");
        assert_eq!(cert.issuer().to_string(), "CN=netd test CA");
        let validity = cert.validity();
        assert!((validity.not_before.timestamp() - (unix(before) - 300)).abs() <= 2, "backdated 5 minutes");
        assert!((validity.not_after.timestamp() - unix(before + 7 * DAY)).abs() <= 2);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && eku.server_auth);
        assert!(!cert.is_ca());
        cert.verify_signature(Some(x509_parser::parse_x509_certificate(ca.cert_der()).unwrap().1.public_key()))
            .unwrap();

        // The PEM and DER forms are the same certificate and key.
        assert_eq!(CertificateDer::from_pem_slice(node.cert_pem().as_bytes()).unwrap(), *node.cert_der());
        assert_eq!(
            PrivateKeyDer::from_pem_slice(node.key_pem().as_bytes()).unwrap().secret_der(),
            node.key_der().secret_der()
        );
    }

    #[test]
    fn leaves_never_outlive_the_ca() {
        let ca = CertificateAuthority::generate("short CA", DAY).unwrap();
        let node = ca.issue_node("edge-1", &[], 365 * DAY).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(node.cert_der()).unwrap();
        assert_eq!(cert.validity().not_after.timestamp(), unix(ca.not_after()));
        assert_eq!(ip_sans_of(node.cert_der()).unwrap(), Vec::<IpAddr>::new());
    }

    #[test]
    fn server_and_client_certificates() {
        let ca = ca();
        let server = server_cert(&ca);
        let (_, cert) = x509_parser::parse_x509_certificate(server.cert_der()).unwrap();
        assert_eq!(cert.subject().to_string(), "CN=netd-tunnel-server");
        assert_eq!(ip_sans_of(server.cert_der()).unwrap(), [ip("127.0.0.1")]);
        let sans = cert.subject_alternative_name().unwrap().unwrap().value;
        assert!(sans.general_names.contains(&GeneralName::DNSName("tunnel.example")));

        let client = ca.issue_client("kube-apiserver", Some("system:masters"), DAY).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(client.cert_der()).unwrap();
        assert_eq!(cert.subject().to_string(), "O=system:masters, CN=kube-apiserver");

        let error = ca.issue_server("s", &[], &[], DAY).unwrap_err();
        assert!(error.to_string().contains("at least one DNS name or IP address"), "{error}");
        let error = ca.issue_server("s", &["bad name!".to_owned()], &[], DAY).unwrap_err();
        assert!(error.to_string().starts_with("invalid DNS name \"bad name!\""), "{error}");
        let error = ca.issue_client("", None, DAY).unwrap_err();
        assert_eq!(error.to_string(), "invalid common name: it is empty");
        let error = ca.issue_client("c", None, Duration::ZERO).unwrap_err();
        assert_eq!(error.to_string(), "invalid validity: the validity is zero");
        let now = SystemTime::now();
        let error = ca.issue_node_with_validity("edge-1", &[], now, now - DAY).unwrap_err();
        assert_eq!(error.to_string(), "invalid validity: it ends before it starts");
    }

    #[test]
    fn mutual_tls_between_a_server_and_a_node_verified_by_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca();
        ca.write(&dir.path().join("ca")).unwrap();
        let ca = CertificateAuthority::load_dir(&dir.path().join("ca")).unwrap();
        for (stem, issued) in
            [("server", server_cert(&ca)), ("node", ca.issue_node("edge-1", &[ip("10.0.5.7")], DAY).unwrap())]
        {
            let out = dir.path().join(stem);
            issued.write(&out, stem).unwrap();
            ca.write_cert(&out).unwrap();
        }
        let server = CertFiles::in_dir(&dir.path().join("server"), "server").load().unwrap();
        let node = CertFiles::in_dir(&dir.path().join("node"), "node").load().unwrap();
        let server_roots = Arc::new(server.root_store().unwrap());
        let node_roots = Arc::new(node.root_store().unwrap());
        let server_config = server_config(server.chain, server.key, server_roots);
        let client_config = client_config(node.chain, node.key, node_roots);

        for name in ["tunnel.example", "127.0.0.1"] {
            let accepted = connect(client_config.clone(), server_config.clone(), name).unwrap();
            // What the tunnel server routes by: the node the verified certificate names.
            let peer = &accepted.peer_certificates().unwrap()[0];
            assert_eq!(node_name_of(peer).unwrap(), "edge-1");
            assert_eq!(ip_sans_of(peer).unwrap(), [ip("10.0.5.7")]);
        }
        let refused = connect(client_config, server_config, "other.example").unwrap_err();
        assert!(
            matches!(refused, Refused::ByClient(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)))
                || matches!(
                    refused,
                    Refused::ByClient(rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForNameContext { .. }
                    ))
                ),
            "{refused:?}"
        );
    }

    #[test]
    fn certificates_of_another_ca_are_refused_both_ways() {
        let (ca, other) = (ca(), CertificateAuthority::generate("another CA", DAY).unwrap());
        let server = server_cert(&ca);
        let accepting = server_config(vec![server.cert_der().clone()], server.key_der(), roots(ca.cert_der()));

        let stranger = other.issue_node("edge-1", &[], DAY).unwrap();
        let client = client_config(vec![stranger.cert_der().clone()], stranger.key_der(), roots(ca.cert_der()));
        let refused = connect(client, accepting, "tunnel.example").unwrap_err();
        assert!(
            matches!(refused, Refused::ByServer(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))),
            "{refused:?}"
        );

        let fake_server = server_cert(&other);
        let node = ca.issue_node("edge-1", &[], DAY).unwrap();
        let fake = server_config(vec![fake_server.cert_der().clone()], fake_server.key_der(), roots(ca.cert_der()));
        let client = client_config(vec![node.cert_der().clone()], node.key_der(), roots(ca.cert_der()));
        let refused = connect(client, fake, "tunnel.example").unwrap_err();
        assert!(
            matches!(refused, Refused::ByClient(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))),
            "{refused:?}"
        );
    }

    #[test]
    fn expired_and_not_yet_valid_node_certificates_are_refused() {
        let ca = ca();
        let server = server_cert(&ca);
        let server_config = server_config(vec![server.cert_der().clone()], server.key_der(), roots(ca.cert_der()));
        let now = SystemTime::now();
        let expired = ca.issue_node_with_validity("edge-1", &[], now - 2 * DAY, now - DAY).unwrap();
        let future = ca.issue_node_with_validity("edge-1", &[], now + DAY, now + 2 * DAY).unwrap();
        for (cert, expired) in [(expired, true), (future, false)] {
            let client = client_config(vec![cert.cert_der().clone()], cert.key_der(), roots(ca.cert_der()));
            let refused = connect(client, server_config.clone(), "tunnel.example").unwrap_err();
            let Refused::ByServer(rustls::Error::InvalidCertificate(error)) = &refused else {
                panic!("{refused:?}");
            };
            if expired {
                assert!(
                    matches!(error, CertificateError::Expired | CertificateError::ExpiredContext { .. }),
                    "{error:?}"
                );
            } else {
                assert!(
                    matches!(error, CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }),
                    "{error:?}"
                );
            }
        }
    }

    #[test]
    fn node_names_are_kubernetes_node_names() {
        let ca = ca();
        for valid in ["edge-1", "edge-1.zone-a.example", "0", &"a".repeat(253)] {
            validate_node_name(valid).unwrap();
        }
        let long = "a".repeat(254);
        let cases = [
            ("", "it is empty"),
            (long.as_str(), "it is 254 characters long; at most 253"),
            ("Edge-1", "character 1 'E' is not allowed: node names are lower case"),
            ("edge_1", "character 5 '_' is not allowed: only a-z, 0-9, '-' and '.'"),
            ("edge 1", "character 5 ' ' is not allowed"),
            ("-edge", "label \"-edge\" starts or ends with '-'"),
            ("edge.-a", "label \"-a\" starts or ends with '-'"),
            ("edge.", "empty label"),
            ("a..b", "empty label"),
        ];
        for (name, expected) in cases {
            let error = ca.issue_node(name, &[], DAY).unwrap_err();
            let message = error.to_string();
            assert!(matches!(error, CertError::InvalidNodeName { .. }), "{name:?}: {message}");
            assert!(message.starts_with(&format!("invalid node name {name:?}: ")), "{message}");
            assert!(message.contains(expected), "{name:?}: {message}");
        }
    }

    #[test]
    fn node_name_of_wants_the_kubelet_subject() {
        let ca = ca();
        let without_o = ca.issue_client("system:node:edge-1", None, DAY).unwrap();
        assert_eq!(node_name_of(without_o.cert_der()).unwrap_err().to_string(), "certificate lacks O=system:nodes");
        let other_o = ca.issue_client("system:node:edge-1", Some("system:masters"), DAY).unwrap();
        assert!(matches!(node_name_of(other_o.cert_der()), Err(CertError::NotSystemNodes)));
        let not_a_node = ca.issue_client("foo", Some(NODES_ORGANIZATION), DAY).unwrap();
        assert_eq!(
            node_name_of(not_a_node.cert_der()).unwrap_err().to_string(),
            "certificate CN \"foo\" is not system:node:<name>"
        );
        let bad_name = ca.issue_client("system:node:Edge_1", Some(NODES_ORGANIZATION), DAY).unwrap();
        assert!(matches!(node_name_of(bad_name.cert_der()), Err(CertError::InvalidNodeName { .. })));
        let error = node_name_of(b"garbage").unwrap_err().to_string();
        assert!(error.starts_with("peer certificate: not a valid X.509 certificate"), "{error}");
        assert!(ip_sans_of(b"garbage").is_err());
    }

    #[test]
    fn a_node_csr_is_signed_for_its_own_key_and_only_for_a_node() {
        let ca = ca();
        let request = node_csr("edge-9").unwrap();
        let (node, cert_pem) = ca.sign_node_csr(&request.csr_pem, &[ip("10.0.5.9")], DAY).unwrap();
        assert_eq!(node, "edge-9");
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        assert_eq!(node_name_of(&der).unwrap(), "edge-9");
        assert_eq!(ip_sans_of(&der).unwrap(), [ip("10.0.5.9")]);
        // The certificate is for the node's key: the pair loads as one identity.
        let key = KeyPair::from_pem(&request.key_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(cert.public_key().raw, key.subject_public_key_info().as_slice());

        // A request for anything but a node is refused, as is garbage.
        let mut params = CertificateParams::default();
        params.distinguished_name = name("kube-apiserver", Some("system:masters"));
        let other = params.serialize_request(&KeyPair::generate().unwrap()).unwrap().pem().unwrap();
        let error = ca.sign_node_csr(&other, &[], DAY).unwrap_err().to_string();
        assert_eq!(error, "certificate CN \"kube-apiserver\" is not system:node:<name>");
        let error = ca.sign_node_csr("garbage", &[], DAY).unwrap_err().to_string();
        assert!(error.starts_with("certificate signing request:"), "{error}");
        let mut truncated = request.csr_pem.clone();
        truncated.truncate(truncated.len() / 2);
        assert!(ca.sign_node_csr(&truncated, &[], DAY).is_err());
    }

    #[test]
    fn bad_files_get_precise_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca();
        ca.write(dir.path()).unwrap();
        let node = ca.issue_node("edge-1", &[], DAY).unwrap();
        node.write(dir.path(), "node").unwrap();
        let files = CertFiles::in_dir(dir.path(), "node");
        files.load().unwrap();
        let at = |name: &str| dir.path().join(name);
        let show = |name: &str| at(name).display().to_string();
        let put = |name: &str, contents: &str| fs::write(at(name), contents).unwrap();
        let expect = |files: &CertFiles, expected: String| {
            let error = files.load().unwrap_err().to_string();
            assert_eq!(error, expected);
        };

        put("bad.crt", "hello, world\n");
        let bad_cert = CertFiles { cert: at("bad.crt"), ..files.clone() };
        expect(&bad_cert, format!("{}: no CERTIFICATE PEM block (empty, not PEM, or another kind)", show("bad.crt")));
        put("bad.crt", "");
        expect(&bad_cert, format!("{}: no CERTIFICATE PEM block (empty, not PEM, or another kind)", show("bad.crt")));
        let pem = node.cert_pem();
        put("bad.crt", &pem[..pem.len() / 2]);
        expect(&bad_cert, format!("{}: truncated: no \"-----END CERTIFICATE-----\" line", show("bad.crt")));
        put("bad.crt", &pem.replacen("MII", "MIA", 1));
        let error = bad_cert.load().unwrap_err().to_string();
        assert!(error.starts_with(&format!("{}: not a valid X.509 certificate", show("bad.crt"))), "{error}");
        put("bad.crt", node.key_pem());
        expect(&bad_cert, format!("{}: holds a private key, not a certificate (files swapped?)", show("bad.crt")));

        let key = node.key_pem();
        put("bad.key", &key[..key.len() - 10]);
        let bad_key = CertFiles { key: at("bad.key"), ..files.clone() };
        expect(&bad_key, format!("{}: truncated: no \"-----END PRIVATE KEY-----\" line", show("bad.key")));
        put("bad.key", node.cert_pem());
        expect(&bad_key, format!("{}: holds a certificate, not a private key (files swapped?)", show("bad.key")));
        put("bad.key", ca.issue_node("edge-2", &[], DAY).unwrap().key_pem());
        expect(
            &bad_key,
            format!("{} does not belong to {}: their public keys differ", show("bad.key"), show("node.crt")),
        );
        put("bad.key", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        let error = bad_key.load().unwrap_err().to_string();
        assert!(error.starts_with(&format!("{}: unusable private key", show("bad.key"))), "{error}");

        let other = CertificateAuthority::generate("another CA", DAY).unwrap();
        put("other.crt", other.cert_pem());
        let other_ca = CertFiles { ca: at("other.crt"), ..files.clone() };
        expect(&other_ca, format!("{} was not issued by {}", show("node.crt"), show("other.crt")));
        let missing = CertFiles { ca: at("missing.crt"), ..files.clone() };
        expect(&missing, format!("cannot read {}: No such file or directory (os error 2)", show("missing.crt")));

        // The CA itself.
        let error = CertificateAuthority::load(&at("node.crt"), &at("node.key")).unwrap_err().to_string();
        assert_eq!(error, format!("{}: not a CA certificate (no basicConstraints CA:TRUE)", show("node.crt")));
        let error = CertificateAuthority::from_pem(ca.cert_pem(), other.key_pem()).unwrap_err().to_string();
        assert_eq!(error, "CA key does not belong to CA certificate: their public keys differ");
        let error = CertificateAuthority::from_pem("junk", ca.key_pem()).unwrap_err().to_string();
        assert_eq!(error, "CA certificate: no CERTIFICATE PEM block (empty, not PEM, or another kind)");
        let ca_key = ca.key_pem();
        let error = CertificateAuthority::from_pem(ca.cert_pem(), &ca_key[..ca_key.len() / 2]).unwrap_err();
        assert_eq!(error.to_string(), "CA key: truncated: no \"-----END PRIVATE KEY-----\" line");
        let two = format!("{}{}", ca.cert_pem(), other.cert_pem());
        let error = CertificateAuthority::from_pem(&two, ca.key_pem()).unwrap_err().to_string();
        assert_eq!(error, "CA certificate: 2 certificates; a CA file for signing holds exactly one");
    }

    #[test]
    fn writes_are_atomic_with_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("fresh/ca");
        let ca = ca();
        ca.write(&out).unwrap();
        let mode = |path: PathBuf| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(out.join("ca.key")), 0o600);
        assert_eq!(mode(out.join("ca.crt")), 0o644);
        assert_eq!(mode(out.clone()), 0o700);
        let (cert, key) = ca.issue_client("c", None, DAY).unwrap().write(&out, "client").unwrap();
        assert_eq!((cert.clone(), key.clone()), (out.join("client.crt"), out.join("client.key")));
        assert_eq!(mode(key), 0o600);
        assert_eq!(mode(cert), 0o644);
        let mut names: Vec<_> = fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["ca.crt", "ca.key", "client.crt", "client.key"], "no temporary files left");

        let loaded = CertificateAuthority::load_dir(&out).unwrap();
        assert_eq!((loaded.cert_pem(), loaded.key_pem()), (ca.cert_pem(), ca.key_pem()));
        assert_eq!(loaded.not_after(), ca.not_after());
        let error = CertificateAuthority::load_dir(&dir.path().join("nowhere")).unwrap_err();
        assert!(matches!(error, CertError::Read { .. }), "{error}");
    }

    #[test]
    fn changed_since_sees_every_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca();
        ca.write_cert(dir.path()).unwrap();
        ca.issue_node("edge-1", &[], DAY).unwrap().write(dir.path(), "node").unwrap();
        let files = CertFiles::in_dir(dir.path(), "node");
        let loaded = files.load().unwrap();
        assert!(!files.changed_since(&loaded.stamp));

        // Replaced by rename at once, within the same mtime tick: a new inode.
        ca.issue_node("edge-1", &[], DAY).unwrap().write(dir.path(), "node").unwrap();
        assert!(files.changed_since(&loaded.stamp));
        let reloaded = files.load().unwrap();
        assert_ne!(reloaded.chain, loaded.chain);
        assert!(!files.changed_since(&reloaded.stamp));

        fs::remove_file(&files.ca).unwrap();
        assert!(files.changed_since(&reloaded.stamp));
        assert!(matches!(files.load(), Err(CertError::Read { .. })));
    }
}
