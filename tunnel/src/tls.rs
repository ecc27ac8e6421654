//! rustls settings for the tunnel's two sides: TLS 1.3 only, mutual
//! authentication against one CA, ALPN naming the protocol inside.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use tokio::sync::watch;

use super::certs::{CertError, CertFiles, LoadedCerts};

/// TLS settings that follow their certificate files: each new connection
/// takes the current value; live connections keep the one they began with.
pub type Live<T> = watch::Receiver<Arc<T>>;

/// Settings that never change (tests, one-off tools).
pub fn fixed<T>(config: Arc<T>) -> Live<T> {
    watch::channel(config).1
}

/// How often [`follow`] looks at the files.
pub const RELOAD_POLL: Duration = Duration::from_secs(5);

/// Loads `files` and builds settings now (an error here is fatal: nothing
/// to fall back on), then returns them as [`Live`] with the future that
/// keeps them current: every `every`, when the files changed, it loads and
/// builds again; a failed reload (a certificate renamed in before its key,
/// say) keeps the previous settings, logs why and retries at the next poll.
pub fn follow<T, B>(
    files: CertFiles,
    every: Duration,
    build: B,
) -> Result<(Live<T>, impl Future<Output = ()>), TlsError>
where
    T: Send + Sync + 'static,
    B: Fn(&LoadedCerts) -> Result<Arc<T>, TlsError> + Send + 'static,
{
    let loaded = files.load()?;
    let (sender, receiver) = watch::channel(build(&loaded)?);
    let mut stamp = loaded.stamp;
    let keep_current = async move {
        loop {
            tokio::time::sleep(every).await;
            if sender.is_closed() {
                return;
            }
            if !files.changed_since(&stamp) {
                continue;
            }
            match files.load().map_err(TlsError::from).and_then(|loaded| Ok((build(&loaded)?, loaded.stamp))) {
                Ok((config, new_stamp)) => {
                    stamp = new_stamp;
                    let _ = sender.send(config);
                    tracing::info!("reloaded certificate {}", files.cert.display());
                }
                Err(err) => {
                    tracing::warn!("certificate {} changed but cannot be used yet: {err}", files.cert.display())
                }
            }
        }
    };
    Ok((receiver, keep_current))
}

/// ALPN of an agent link (HTTP/2 with the roles reversed).
pub const ALPN_TUNNEL: &[u8] = b"h2";
/// ALPN of an agent link speaking [`crate::mux`]: agents offer it first,
/// the agents' door prefers it; either side from before it speaks
/// [`ALPN_TUNNEL`] with the other.
pub const ALPN_MUX: &[u8] = crate::mux::ALPN;
/// ALPN of the CONNECT front door.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Errors building TLS settings.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificates themselves.
    #[error(transparent)]
    Certs(#[from] CertError),
    /// rustls refused the combination.
    #[error("TLS settings for {what}: {source}")]
    Rustls {
        /// Which side.
        what: &'static str,
        /// What rustls reported.
        #[source]
        source: rustls::Error,
    },
    /// The client verifier could not be built.
    #[error("verifying clients against the CA: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// ring's suites, TLS 1.3's AES-128-GCM first (ring puts AES-256-GCM
/// first): every tunnelled byte is sealed on one side and opened on the
/// other, and AES-128 does 10 rounds a block to AES-256's 14. The client's
/// order decides (rustls servers follow it), so both ends use this.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The agent's client settings: its node certificate, the CA for the
/// server; it offers [`ALPN_MUX`], then [`ALPN_TUNNEL`].
pub fn agent(certs: &LoadedCerts) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client(certs, &[ALPN_MUX, ALPN_TUNNEL], "the agent")
}

/// A client of the CONNECT front door (kube-apiserver's egress, tests).
pub fn connect_client(certs: &LoadedCerts) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client(certs, &[ALPN_HTTP1], "a CONNECT client")
}

fn client(certs: &LoadedCerts, alpn: &[&[u8]], what: &'static str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let rustls_err = |source| TlsError::Rustls { what, source };
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err)?
        .with_root_certificates(certs.root_store()?)
        .with_client_auth_cert(certs.chain.clone(), certs.key.clone_key())
        .map_err(rustls_err)?;
    config.alpn_protocols = alpn.iter().map(|name| name.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The agents' door: [`server`] speaking [`ALPN_MUX`] to agents that offer
/// it and [`ALPN_TUNNEL`] to the others.
pub fn agents_door(certs: &LoadedCerts) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = Arc::unwrap_or_clone(server(certs, ALPN_MUX)?);
    config.alpn_protocols.push(ALPN_TUNNEL.to_vec());
    Ok(Arc::new(config))
}

/// Whether a link's negotiated ALPN is [`ALPN_MUX`] (anything else, or
/// nothing, is HTTP/2 as before).
pub fn speaks_mux(alpn: Option<&[u8]>) -> bool {
    alpn == Some(ALPN_MUX)
}

/// The server's settings for one listener: its certificate, and clients
/// must present one the CA issued. `alpn`: [`ALPN_TUNNEL`] for agents,
/// [`ALPN_HTTP1`] for the CONNECT door.
pub fn server(certs: &LoadedCerts, alpn: &[u8]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let rustls_err = |source| TlsError::Rustls { what: "the server", source };
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(certs.root_store()?), provider())
        .build()
        .map_err(TlsError::Verifier)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.chain.clone(), certs.key.clone_key())
        .map_err(rustls_err)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::certs::CertificateAuthority;

    #[test]
    fn agent_and_server_agree_on_aes_128_gcm() {
        let dir = tempfile::tempdir().unwrap();
        let day = Duration::from_secs(86_400);
        let ca = CertificateAuthority::generate("test CA", day).unwrap();
        ca.write_cert(dir.path()).unwrap();
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        ca.issue_server("tunnel-server", &[], &[ip], day).unwrap().write(dir.path(), "server").unwrap();
        ca.issue_node("edge-1", &[], day).unwrap().write(dir.path(), "node").unwrap();
        let server_config = server(&CertFiles::in_dir(dir.path(), "server").load().unwrap(), ALPN_TUNNEL).unwrap();
        let agent_config = agent(&CertFiles::in_dir(dir.path(), "node").load().unwrap()).unwrap();
        let mut server = rustls::ServerConnection::new(server_config).unwrap();
        let mut agent = rustls::ClientConnection::new(agent_config, ip.into()).unwrap();
        while agent.is_handshaking() || server.is_handshaking() {
            let mut records = Vec::new();
            while agent.wants_write() {
                agent.write_tls(&mut records).unwrap();
            }
            server.read_tls(&mut records.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut records = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut records).unwrap();
            }
            agent.read_tls(&mut records.as_slice()).unwrap();
            agent.process_new_packets().unwrap();
        }
        let negotiated = |suite: Option<rustls::SupportedCipherSuite>| suite.map(|s| s.suite());
        assert_eq!(negotiated(agent.negotiated_cipher_suite()), Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
        assert_eq!(negotiated(server.negotiated_cipher_suite()), Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
    }
}
