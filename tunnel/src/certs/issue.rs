//! Issuing: the CA, node signing requests, the certificates it signs, and
//! the subject, SAN and validity rules they follow.

use super::files::{create_dir, parse_key, read_string, single_cert, write_atomic};
use super::inspect::{node_name_of_subject, parse_cert, to_system_time};
use super::*;

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
        let key =
            KeyPair::try_from(&key_der).map_err(|source| CertError::RcgenKey { what: key_what.to_owned(), source })?;
        if key.subject_public_key_info() != cert.public_key().raw {
            return Err(CertError::KeyMismatch { cert: cert_what.to_owned(), key: key_what.to_owned() });
        }
        let not_after = to_system_time(cert.validity().not_after.timestamp());
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|source| CertError::RcgenCertificate { what: cert_what.to_owned(), source })?;
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
            .map_err(|source| CertError::PemParse { what: what.to_owned(), source })?;
        let request = rcgen::CertificateSigningRequestParams::from_der(&der)
            .map_err(|source| CertError::RcgenCertificate { what: what.to_owned(), source })?;
        use x509_parser::prelude::FromDer as _;
        let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
            .map_err(|source| CertError::X509 { what: what.to_owned(), source })?;
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

pub(super) fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    if let Some(organization) = organization {
        name.push(DnType::OrganizationName, organization);
    }
    name.push(DnType::CommonName, common_name);
    name
}

pub(super) fn check_subject(field: &'static str, value: &str) -> Result<(), CertError> {
    if value.trim().is_empty() {
        return Err(CertError::InvalidSubject { field, reason: "it is empty".to_owned() });
    }
    if value.chars().any(char::is_control) {
        return Err(CertError::InvalidSubject { field, reason: format!("{value:?} has control characters") });
    }
    Ok(())
}

pub(super) fn dns_san(dns: &str) -> Result<SanType, CertError> {
    let invalid = |reason: String| CertError::InvalidDnsName { name: dns.to_owned(), reason };
    rustls_pki_types::DnsName::try_from(dns).map_err(|e| invalid(e.to_string()))?;
    Ok(SanType::DnsName(dns.try_into().map_err(|e: rcgen::Error| invalid(e.to_string()))?))
}

pub(super) fn ip_sans(ips: &[IpAddr]) -> Vec<SanType> {
    let mut unique: Vec<IpAddr> = Vec::with_capacity(ips.len());
    for ip in ips {
        if !unique.contains(ip) {
            unique.push(*ip);
        }
    }
    unique.into_iter().map(SanType::IpAddress).collect()
}

pub(super) fn set_validity(
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

pub(super) fn add(now: SystemTime, validity: Duration) -> Result<SystemTime, CertError> {
    now.checked_add(validity).ok_or_else(|| CertError::Validity(format!("{} s is too long", validity.as_secs())))
}

/// X.509 times have whole seconds.
pub(super) fn to_offset(time: SystemTime) -> Result<time::OffsetDateTime, CertError> {
    let seconds = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).ok(),
        Err(before) => i64::try_from(before.duration().as_secs()).ok().map(|s| -s),
    };
    seconds
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .filter(|t| (1950..=9999).contains(&t.year()))
        .ok_or_else(|| CertError::Validity("a time outside the years 1950-9999 X.509 can express".to_owned()))
}
