//! Trust before change: finding the cluster's CA the way kubeadm's
//! token discovery does (SPEC §4), before anything on the node changes.
//!
//! ConfigMap `kube-public/cluster-info` holds a kubeconfig (server URL and
//! CA) readable by anyone, and, per bootstrap token, `jws-kubeconfig-<id>`:
//! a detached HS256 JWS of that kubeconfig keyed by the token's secret
//! (kube-controller-manager's bootstrapsigner writes it). A joining node
//! 1. fetches cluster-info without trusting the server's certificate yet,
//! 2. checks the signature with its token — only someone holding the token
//!    could have signed it,
//! 3. checks that the CA's public key matches a pin the operator gave
//!    (`sha256:<hex of its SubjectPublicKeyInfo>`, what `kubeadm token create
//!    --print-join-command` prints) — so a stolen token alone cannot steer it,
//! 4. fetches cluster-info again trusting only that CA, and requires the
//!    same kubeconfig.

use std::collections::BTreeMap;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

use super::token::BootstrapToken;
use crate::kube::KubeClient;

/// Where the discovery data lives.
pub const CLUSTER_INFO_PATH: &str = "/api/v1/namespaces/kube-public/configmaps/cluster-info";

/// Why the cluster could not be trusted.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// A pin that is not `sha256:<64 hex>`.
    #[error("CA pin {0:?} is not sha256:<64 hex digits> (as kubeadm prints it)")]
    BadPin(String),
    /// No pin given.
    #[error(
        "no --discovery-token-ca-cert-hash: without a pin, whoever answers at the server address could \
         impersonate the cluster (kubeadm token create --print-join-command prints the hash)"
    )]
    NoPin,
    /// cluster-info could not be fetched.
    #[error("fetching cluster-info from {server}: {reason}")]
    Fetch {
        /// The API server URL.
        server: String,
        /// What failed.
        reason: String,
    },
    /// The API server client for cluster-info could not be set up, or its
    /// request failed.
    #[error("fetching cluster-info from {server}: {source}")]
    FetchKube {
        /// The API server URL.
        server: String,
        /// The client's error.
        #[source]
        source: crate::kube::KubeError,
    },
    /// The request for cluster-info could not be built.
    #[error("fetching cluster-info from {server}: {source}")]
    FetchRequest {
        /// The API server URL.
        server: String,
        /// The request builder's error.
        #[source]
        source: http::Error,
    },
    /// cluster-info's `data` is not a string map.
    #[error("fetching cluster-info from {server}: cluster-info's data: {source}")]
    FetchData {
        /// The API server URL.
        server: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// cluster-info lacks a key.
    #[error("cluster-info has no {0:?} (is kube-controller-manager's bootstrapsigner running, and the token valid?)")]
    Missing(String),
    /// The signature is malformed or does not verify with this token.
    #[error("cluster-info's signature for token {token_id} does not verify: {reason}")]
    BadSignature {
        /// The token id.
        token_id: String,
        /// Why.
        reason: &'static str,
    },
    /// The kubeconfig in cluster-info is unusable.
    #[error("cluster-info's kubeconfig: {0}")]
    BadKubeconfig(String),
    /// The kubeconfig in cluster-info does not parse.
    #[error("cluster-info's kubeconfig: not a kubeconfig: {0}")]
    NotKubeconfig(#[source] kube::config::KubeconfigError),
    /// The kubeconfig's `certificate-authority-data` is not PEM.
    #[error("cluster-info's kubeconfig: certificate-authority-data: {0}")]
    CaPem(#[source] rustls::pki_types::pem::Error),
    /// A CA certificate in the kubeconfig is not X.509.
    #[error("cluster-info's kubeconfig: a CA certificate does not parse: {0}")]
    CaCert(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The CA's key matches no pin.
    #[error("the cluster CA's public key is {found}, which matches no --discovery-token-ca-cert-hash given")]
    PinMismatch {
        /// The CA's pin.
        found: String,
    },
    /// The second, verified fetch gave another kubeconfig.
    #[error("cluster-info changed between the unverified and the verified fetch")]
    Changed,
}

/// `sha256:` of a certificate's SubjectPublicKeyInfo (kubeadm's pin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaPin([u8; 32]);

impl std::str::FromStr for CaPin {
    type Err = DiscoveryError;

    fn from_str(text: &str) -> Result<Self, DiscoveryError> {
        let bad = || DiscoveryError::BadPin(text.to_string());
        let hex = text.strip_prefix("sha256:").ok_or_else(bad)?;
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut pin = [0u8; 32];
        for (i, byte) in pin.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
        }
        Ok(Self(pin))
    }
}

impl std::fmt::Display for CaPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl CaPin {
    /// The pin of a DER certificate.
    pub fn of_cert(der: &[u8]) -> Result<Self, DiscoveryError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(DiscoveryError::CaCert)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
        let mut pin = [0u8; 32];
        pin.copy_from_slice(digest.as_ref());
        Ok(Self(pin))
    }
}

/// What discovery establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterInfo {
    /// The API server URL the kubeconfig names.
    pub server: String,
    /// The cluster CA certificates (DER), pinned.
    pub ca_certs: Vec<Vec<u8>>,
    /// The same, PEM.
    pub ca_pem: String,
    /// The kubeconfig as cluster-info holds it.
    pub kubeconfig: String,
}

/// Checks a detached JWS (`header..signature`) of `content` made with
/// `token`'s secret, as the bootstrapsigner makes it.
pub fn verify_jws(content: &str, jws: &str, token: &BootstrapToken) -> Result<(), DiscoveryError> {
    let bad = |reason| DiscoveryError::BadSignature { token_id: token.id().to_string(), reason };
    let mut parts = jws.split('.');
    let (Some(header), Some(""), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("not a detached JWS (header..signature)"));
    };
    let header_json = URL_SAFE_NO_PAD.decode(header).map_err(|_| bad("its header is not base64url"))?;
    let header_value: serde_json::Value =
        serde_json::from_slice(&header_json).map_err(|_| bad("its header is not JSON"))?;
    if header_value.get("alg").and_then(|v| v.as_str()) != Some("HS256") {
        return Err(bad("its algorithm is not HS256"));
    }
    if header_value.get("kid").and_then(|v| v.as_str()) != Some(token.id()) {
        return Err(bad("it names another token id"));
    }
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| bad("its signature is not base64url"))?;
    let signing_input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(content));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.secret().as_bytes());
    // Constant time: the comparison says nothing about how close a forgery was.
    ring::hmac::verify(&key, signing_input.as_bytes(), &signature).map_err(|_| bad("wrong token secret or content"))
}

/// Verifies cluster-info's `data` with `token` and `pins`: the signature,
/// then the CA. Pure: no network (see [`discover`]).
pub fn verify_cluster_info(
    data: &BTreeMap<String, String>,
    token: &BootstrapToken,
    pins: &[CaPin],
) -> Result<ClusterInfo, DiscoveryError> {
    if pins.is_empty() {
        return Err(DiscoveryError::NoPin);
    }
    let kubeconfig = data.get("kubeconfig").ok_or_else(|| DiscoveryError::Missing("kubeconfig".into()))?;
    let jws_key = format!("jws-kubeconfig-{}", token.id());
    let jws = data.get(&jws_key).ok_or(DiscoveryError::Missing(jws_key))?;
    verify_jws(kubeconfig, jws, token)?;
    let parsed = kube::config::Kubeconfig::from_yaml(kubeconfig).map_err(DiscoveryError::NotKubeconfig)?;
    let cluster = parsed
        .clusters
        .first()
        .and_then(|named| named.cluster.as_ref())
        .ok_or_else(|| DiscoveryError::BadKubeconfig("no cluster".into()))?;
    let server = cluster.server.clone().ok_or_else(|| DiscoveryError::BadKubeconfig("no server".into()))?;
    let ca_data = cluster
        .certificate_authority_data
        .as_ref()
        .ok_or_else(|| DiscoveryError::BadKubeconfig("no certificate-authority-data".into()))?;
    let ca_pem_bytes = STANDARD
        .decode(ca_data.trim())
        .map_err(|_| DiscoveryError::BadKubeconfig("certificate-authority-data is not base64".into()))?;
    let ca_pem = String::from_utf8(ca_pem_bytes)
        .map_err(|_| DiscoveryError::BadKubeconfig("certificate-authority-data is not PEM".into()))?;
    let ca_certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .map(|cert| cert.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(DiscoveryError::CaPem)?;
    let first = ca_certs.first().ok_or_else(|| DiscoveryError::BadKubeconfig("no CA certificate".into()))?;
    let mut found = None;
    for der in &ca_certs {
        let pin = CaPin::of_cert(der)?;
        if pins.contains(&pin) {
            return Ok(ClusterInfo { server, ca_certs: ca_certs.clone(), ca_pem, kubeconfig: kubeconfig.clone() });
        }
        found.get_or_insert(pin);
    }
    let found = found.map_or_else(|| CaPin::of_cert(first).map(|p| p.to_string()), |p| Ok(p.to_string()))?;
    Err(DiscoveryError::PinMismatch { found })
}

fn fetch_err(server: &str, reason: impl std::fmt::Display) -> DiscoveryError {
    DiscoveryError::Fetch { server: server.to_string(), reason: reason.to_string() }
}

/// GET cluster-info's `data` from `server`, trusting `ca_pem` (or, for the
/// first read, nothing: see [`KubeClient::for_discovery`]).
async fn fetch(server: &str, ca_pem: Option<&[u8]>) -> Result<BTreeMap<String, String>, DiscoveryError> {
    if !server.starts_with("https://") {
        return Err(fetch_err(server, "the API server URL must be https://"));
    }
    let kube_err = |source| DiscoveryError::FetchKube { server: server.to_string(), source };
    let client = KubeClient::for_discovery(server, ca_pem).map_err(kube_err)?;
    let request = http::Request::get(CLUSTER_INFO_PATH)
        .body(Vec::new())
        .map_err(|source| DiscoveryError::FetchRequest { server: server.to_string(), source })?;
    let object: serde_json::Value =
        crate::kube::call("reading cluster-info", client.client().request(request)).await.map_err(kube_err)?;
    serde_json::from_value(object.get("data").cloned().unwrap_or_default())
        .map_err(|source| DiscoveryError::FetchData { server: server.to_string(), source })
}

/// Token discovery against `server`: unverified fetch, signature and pin
/// checks, verified re-fetch (see the module docs).
pub async fn discover(server: &str, token: &BootstrapToken, pins: &[CaPin]) -> Result<ClusterInfo, DiscoveryError> {
    if pins.is_empty() {
        return Err(DiscoveryError::NoPin);
    }
    let info = verify_cluster_info(&fetch(server, None).await?, token, pins)?;
    let again = fetch(server, Some(info.ca_pem.as_bytes())).await?;
    if again.get("kubeconfig") != Some(&info.kubeconfig) {
        return Err(DiscoveryError::Changed);
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const KUBECONFIG: &str = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: CADATA\n    \
                              server: https://10.0.0.1:6443\n  name: \"\"\ncontexts: null\ncurrent-context: \"\"\n\
                              kind: Config\npreferences: {}\nusers: null\n";
    /// Made independently (Python's hmac) for token abcdef.0123456789abcdef,
    /// header `{"alg":"HS256","kid":"abcdef"}` as go-jose writes it.
    const JWS: &str = "eyJhbGciOiJIUzI1NiIsImtpZCI6ImFiY2RlZiJ9..J-ooYVbbSQcjSCqT0_d-uh8vMwNMWb3Q7jhklPb5YDQ";

    fn token(text: &str) -> BootstrapToken {
        text.parse().unwrap()
    }

    #[test]
    fn the_detached_signature_verifies_with_the_token_only() {
        verify_jws(KUBECONFIG, JWS, &token("abcdef.0123456789abcdef")).unwrap();
        let wrong_secret = verify_jws(KUBECONFIG, JWS, &token("abcdef.0123456789abcdee")).unwrap_err();
        assert!(wrong_secret.to_string().contains("wrong token secret"), "{wrong_secret}");
        let other_id = verify_jws(KUBECONFIG, JWS, &token("abcdeg.0123456789abcdef")).unwrap_err();
        assert!(other_id.to_string().contains("another token id"), "{other_id}");
        let tampered = verify_jws(&KUBECONFIG.replace("10.0.0.1", "10.6.6.6"), JWS, &token("abcdef.0123456789abcdef"));
        assert!(tampered.is_err());
        for bad in ["", "a.b.c", "eyJhbGciOiJub25lIiwia2lkIjoiYWJjZGVmIn0..", &JWS.replace("..", ".x.")] {
            assert!(verify_jws(KUBECONFIG, bad, &token("abcdef.0123456789abcdef")).is_err(), "{bad}");
        }
    }

    #[test]
    fn pins_parse_print_and_match_openssls_spki_digest() {
        let ca = crate::tunnel::certs::CertificateAuthority::generate("pin test", std::time::Duration::from_secs(3600))
            .unwrap();
        let pin = CaPin::of_cert(ca.cert_der()).unwrap();
        assert_eq!(pin.to_string().parse::<CaPin>().unwrap(), pin);
        // kubeadm's documented way to compute the hash, with openssl.
        let dir = tempfile::tempdir().unwrap();
        ca.write_cert(dir.path()).unwrap();
        let script = format!(
            "openssl x509 -pubkey -noout -in {}/ca.crt | openssl pkey -pubin -outform der | sha256sum",
            dir.path().display()
        );
        let out = std::process::Command::new("sh").arg("-c").arg(script).output().unwrap();
        let hex = String::from_utf8(out.stdout).unwrap();
        assert_eq!(pin.to_string(), format!("sha256:{}", hex.split_whitespace().next().unwrap()));
        for bad in ["sha1:00", "sha256:zz", "00ab", &format!("{pin}0")] {
            assert!(bad.parse::<CaPin>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cluster_info_needs_the_signature_and_a_matching_pin() {
        let ca = crate::tunnel::certs::CertificateAuthority::generate("cluster", std::time::Duration::from_secs(3600))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        ca.write_cert(dir.path()).unwrap();
        let pem = std::fs::read_to_string(dir.path().join("ca.crt")).unwrap();
        let kubeconfig = KUBECONFIG.replace("CADATA", &STANDARD.encode(&pem));
        let token = token("abcdef.0123456789abcdef");
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"abcdef"}"#);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.secret().as_bytes());
        let signature = ring::hmac::sign(&key, format!("{header}.{}", URL_SAFE_NO_PAD.encode(&kubeconfig)).as_bytes());
        let jws = format!("{header}..{}", URL_SAFE_NO_PAD.encode(signature.as_ref()));
        let data: BTreeMap<String, String> =
            [("kubeconfig".to_string(), kubeconfig.clone()), ("jws-kubeconfig-abcdef".to_string(), jws)].into();
        let pin = CaPin::of_cert(ca.cert_der()).unwrap();
        let info = verify_cluster_info(&data, &token, &[pin]).unwrap();
        assert_eq!(info.server, "https://10.0.0.1:6443");
        assert_eq!(info.ca_certs, vec![ca.cert_der().to_vec()]);
        let other = "sha256:0000000000000000000000000000000000000000000000000000000000000000".parse().unwrap();
        let mismatch = verify_cluster_info(&data, &token, &[other]).unwrap_err().to_string();
        assert!(mismatch.contains(&pin.to_string()), "{mismatch}");
        assert!(matches!(verify_cluster_info(&data, &token, &[]), Err(DiscoveryError::NoPin)));
        let unsigned = verify_cluster_info(&data, &"zzzzzz.0123456789abcdef".parse().unwrap(), &[pin]).unwrap_err();
        assert!(unsigned.to_string().contains("no \"jws-kubeconfig-zzzzzz\""), "{unsigned}");
    }
}
