//! The edge tunnel (SPEC §3): certificates for now; transport, server and
//! agent to come. An edge node's tunnel agent dials out to the tunnel server
//! over mutually authenticated TLS; its certificate names the node the way
//! kubelet client certificates do (`CN=system:node:<name>`, `O=system:nodes`),
//! so the server routes by the identity it verified, never by what an agent
//! claims. [`certs`] mints, loads and reads back those certificates.

pub mod certs;
