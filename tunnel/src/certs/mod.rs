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
//! Three jobs, one submodule each: `issue` mints (the CA, signing requests,
//! leaf certificates), `inspect` reads a certificate back (its node, its IP
//! SANs), `files` keeps them on disk and notices when they change; all of
//! it is re-exported here.
//!
//! Files are written by [`netd_model::atomic_file`] (a fresh temporary file in
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

use netd_model::atomic_file::{self, AtomicFileError};

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
    /// A PEM input that does not parse (as the PEM reader reports it).
    #[error("{what}: {source}")]
    PemParse {
        /// The file or input.
        what: String,
        /// The PEM reader's error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// DER contents that are not an X.509 certificate (or request).
    #[error("{what}: not a valid X.509 certificate: {source}")]
    X509 {
        /// The file or input.
        what: String,
        /// The parser's complaint.
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    /// A certificate field the X.509 parser cannot read.
    #[error("{what}: not a valid X.509 certificate: {field}: {source}")]
    X509Field {
        /// The file or input.
        what: String,
        /// Which field, as a message puts it ("its CN is not a string",
        /// "bad subjectAltName").
        field: &'static str,
        /// The parser's complaint.
        #[source]
        source: x509_parser::error::X509Error,
    },
    /// A certificate (or request) rcgen cannot take.
    #[error("{what}: not a valid X.509 certificate: {source}")]
    RcgenCertificate {
        /// The file or input.
        what: String,
        /// rcgen's complaint.
        #[source]
        source: rcgen::Error,
    },
    /// A private key rcgen cannot sign with.
    #[error("{what}: unusable private key: {source}")]
    RcgenKey {
        /// The file or input.
        what: String,
        /// rcgen's complaint.
        #[source]
        source: rcgen::Error,
    },
    /// A private key rustls cannot sign with.
    #[error("{what}: unusable private key: {source}")]
    RustlsKey {
        /// The file or input.
        what: String,
        /// rustls's complaint.
        #[source]
        source: rustls::Error,
    },
    /// A CA certificate rustls will not trust.
    #[error("CA certificate: not a valid X.509 certificate: not usable as a trust anchor: {0}")]
    TrustAnchor(#[source] rustls::Error),
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

mod files;
mod inspect;
mod issue;

pub use files::{write_file, CertFiles, FilesStamp, LoadedCerts};
pub use inspect::{first_san_of, ip_sans_of, node_name_of, validate_node_name};
pub use issue::{node_csr, CertificateAuthority, IssuedCert, NodeCsr};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use super::issue::name;

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
