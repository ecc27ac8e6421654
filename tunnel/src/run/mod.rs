//! `netd-cloud tunnel-server` and `netd tunnel-agent`: the long-running processes
//! around [`crate::server`] and [`crate::agent`], with certificates that
//! follow their files and a `/metrics` endpoint (hyper). The agent's half
//! ([`run_agent`], feature `agent`) and the server's ([`run_server`],
//! feature `server`) are separate submodules, so an edge binary links no
//! server code.

// Without either half only the error and listener types remain.
#![cfg_attr(not(any(feature = "agent", feature = "server")), allow(unused_imports))]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::StatusCode;
use tokio::net::TcpListener;

use crate::certs::CertError;
use crate::tls::TlsError;
#[cfg(feature = "server")]
use netd_ebpf::dnat::DnatError;

#[cfg(feature = "agent")]
mod agent;
#[cfg(feature = "server")]
mod server;

#[cfg(feature = "agent")]
pub use agent::{agent_metrics, run_agent, AgentSettings};
#[cfg(feature = "server")]
pub use server::{run_server, server_metrics, ServerSettings, DEFAULT_DRAIN_GRACE, MIN_REPLICA_TTL};

/// The ports an agent always allows: kubelet's API and its read-only port.
pub const KUBELET_PORTS: [u16; 2] = [10250, 10255];

/// Errors starting the tunnel processes.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// Certificates.
    #[error(transparent)]
    Certs(#[from] CertError),
    /// TLS settings.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A listener could not be bound.
    #[error("listening on {addr} failed")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The tunnel DNAT's maps could not be opened.
    #[cfg(feature = "server")]
    #[error(transparent)]
    Dnat(#[from] DnatError),
    /// The registry settings can never work.
    #[cfg(feature = "server")]
    #[error("tunnel server: the registry")]
    Registry(#[source] netd_registry::RegistryError),
    /// The replica identity or count can never work.
    #[error("tunnel server replica settings")]
    Replica(#[source] crate::replica::ReplicaError),
    /// A replica record lifetime too short to renew in time.
    #[error("replica TTL {0:?}: at least 3 s (records are renewed every third of it, in whole seconds)")]
    ReplicaTtl(std::time::Duration),
    /// The agent was given no server.
    #[error("no tunnel server given (--server HOST:PORT)")]
    NoServers,
    /// A server name that is neither a DNS name nor an IP address.
    #[error("{0:?} is not a name the server's certificate can carry")]
    ServerName(String),
}

/// A listener as the command line names it: `IP:PORT`, or a bare `PORT` on
/// the server's own address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// A whole socket address.
    At(SocketAddr),
    /// A port on the server's address.
    Port(u16),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(port) = text.parse::<u16>() {
            return Ok(Self::Port(port));
        }
        text.parse().map(Self::At).map_err(|_| format!("{text:?} is neither IP:PORT nor PORT"))
    }
}

impl Listen {
    /// The socket address, bare ports on `address`.
    pub fn on(self, address: IpAddr) -> SocketAddr {
        match self {
            Self::At(addr) => addr,
            Self::Port(port) => SocketAddr::new(address, port),
        }
    }

    /// Whether it needs the server's address.
    pub fn is_port_only(self) -> bool {
        matches!(self, Self::Port(_))
    }
}

#[cfg(any(feature = "agent", feature = "server"))]
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, TunnelError> {
    TcpListener::bind(addr).await.map_err(|source| TunnelError::Bind { addr, source })
}

#[cfg(any(feature = "agent", feature = "server"))]
/// `/metrics` (what `collector` writes) and `/healthz`, until the task is dropped.
pub(crate) async fn serve_metrics(listener: TcpListener, collector: impl netd_metrics::Collector) {
    let mut registry = netd_metrics::Registry::default();
    registry.register_collector(Box::new(collector));
    let registry = Arc::new(registry);
    netd_metrics::serve_text(listener, move |path| {
        let registry = registry.clone();
        async move {
            match path.as_str() {
                "/metrics" => (StatusCode::OK, netd_metrics::encode(&registry)),
                "/healthz" => (StatusCode::OK, "ok\n".to_string()),
                _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
            }
        }
    })
    .await
}
