//! The edge tunnel (SPEC §3). An edge node's tunnel agent dials out to the
//! tunnel server over mutually authenticated TLS 1.3 ([`tls`]); its
//! certificate names the node the way kubelet client certificates do
//! (`CN=system:node:<name>`, `O=system:nodes`), so the server routes by the
//! identity it verified, never by what an agent claims ([`certs`] mints,
//! loads and reads those certificates). Over that one connection,
//! `netd-mux/1` ([`mux`]) carries one stream per tunnelled TCP connection,
//! each with its own flow control; with an agent or server from before it,
//! HTTP/2 with the roles reversed does ([`transport`]; ALPN decides). [`agent`] is the edge
//! side; [`server`] the cloud side with its front doors (DNAT'd connections,
//! HTTP CONNECT, plain HTTP by Host), routing by [`routes`] (certificate
//! addresses and the registry's leases: node addresses and pod subnets);
//! [`run`] the two long-running processes; [`replica`] how an agent links
//! to every server replica and hears that one drains. Who may use which door is
//! [`identity`]'s concern; how long and how many, [`limits`]'.
//!
//! Features: `agent` (the edge side) and `server` (the cloud side: front
//! doors, routing, the DNAT hand-over from `netd-ebpf`, leases from
//! `netd-registry`); both by default. An edge binary takes `agent` alone
//! and links none of the server, the BPF loader or the registries.
//! Certificates, TLS and both link protocols are common to both.

#[cfg(feature = "agent")]
pub mod agent;
pub mod certs;
#[cfg(feature = "server")]
pub mod identity;
#[cfg(feature = "server")]
pub mod limits;
pub mod mux;
#[cfg(feature = "server")]
pub mod peers;
pub mod readahead;
pub mod replica;
#[cfg(feature = "server")]
pub mod routes;
pub mod run;
#[cfg(feature = "server")]
pub mod server;
pub mod tls;
pub mod transport;
