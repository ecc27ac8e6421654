//! Certificates as files: PEM in and out, written atomically, and the
//! stamps that tell an endpoint when to load them again.

use super::inspect::{parse_cert, to_system_time};
use super::*;

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
            store.add(root.clone()).map_err(CertError::TrustAnchor)?;
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
            .map_err(|source| CertError::RustlsKey { what: key_what.clone(), source })?;
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

pub(super) fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Read { path: path.to_owned(), source })
}

pub(super) fn read_string(path: &Path) -> Result<String, CertError> {
    String::from_utf8(read(path)?)
        .map_err(|_| CertError::Pem { what: path.display().to_string(), reason: "not text, so not PEM".to_owned() })
}

/// Every CERTIFICATE block, each checked to be X.509.
pub(super) fn parse_certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
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

pub(super) fn single_cert(what: &str, pem: &[u8]) -> Result<CertificateDer<'static>, CertError> {
    let mut certs = parse_certs(what, pem)?;
    if certs.len() > 1 {
        return Err(CertError::Pem {
            what: what.to_owned(),
            reason: format!("{} certificates; a CA file for signing holds exactly one", certs.len()),
        });
    }
    certs.pop().ok_or_else(|| no_block(what, "CERTIFICATE"))
}

pub(super) fn parse_key(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, CertError> {
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) if CertificateDer::from_pem_slice(pem).is_ok() => Err(CertError::Pem {
            what: what.to_owned(),
            reason: "holds a certificate, not a private key (files swapped?)".to_owned(),
        }),
        Err(e) => Err(pem_error(what, "PRIVATE KEY", e)),
    }
}

pub(super) fn no_block(what: &str, kind: &str) -> CertError {
    CertError::Pem { what: what.to_owned(), reason: format!("no {kind} PEM block (empty, not PEM, or another kind)") }
}

pub(super) fn pem_error(what: &str, kind: &str, error: pem::Error) -> CertError {
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
/// exactly `mode` from its first byte ([`netd_model::atomic_file`]).
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dir(dir)?;
    }
    write_atomic(path, contents, mode)
}

/// Certificate directories hold keys: only their owner may list them.
pub(super) fn create_dir(dir: &Path) -> Result<(), CertError> {
    Ok(atomic_file::create_dirs(dir, 0o700)?)
}

pub(super) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    Ok(atomic_file::write(path, contents, mode)?)
}
