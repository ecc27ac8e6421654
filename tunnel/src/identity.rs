//! Who may use the CONNECT door: not anyone with a certificate of the CA.
//!
//! The tunnel CA signs the agents' node certificates, and with `netd-join`
//! on Kubernetes it is the cluster CA, which also signs every kubelet's and
//! every user's client certificate. Admitting the CA would make each of them
//! a key to every edge node's kubelet. The door admits only the client
//! common names the operator lists (default: [`DEFAULT_CONNECT_CLIENT`],
//! what `netd-cloud certs client --cn kube-apiserver` issues for kube-apiserver's
//! egress selector), and never a node identity (`O=system:nodes` or
//! `CN=system:node:…`), even when listed.

use x509_parser::prelude::FromDer as _;

use super::certs::{NODES_ORGANIZATION, NODE_CN_PREFIX};

/// The client the CONNECT door admits by default: kube-apiserver's egress client.
pub const DEFAULT_CONNECT_CLIENT: &str = "kube-apiserver";

/// The subject of a verified client certificate, as far as admission reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Its common names (one, for anything our tools issue).
    pub common_names: Vec<String>,
    /// Its organizations (Kubernetes groups).
    pub organizations: Vec<String>,
}

impl ClientIdentity {
    /// Reads the subject of a DER certificate; `None` when it does not
    /// parse or a name is not a string (refused).
    pub fn of(cert_der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der).ok()?;
        let subject = cert.subject();
        let common_names: Option<Vec<String>> =
            subject.iter_common_name().map(|a| a.as_str().map(str::to_string).ok()).collect();
        let organizations: Option<Vec<String>> =
            subject.iter_organization().map(|a| a.as_str().map(str::to_string).ok()).collect();
        Some(Self { common_names: common_names?, organizations: organizations? })
    }

    /// Whether this names a node (a kubelet's or an agent's certificate).
    pub fn is_node(&self) -> bool {
        self.organizations.iter().any(|o| o == NODES_ORGANIZATION)
            || self.common_names.iter().any(|cn| cn.starts_with(NODE_CN_PREFIX))
    }

    /// For logs: `CN=…, O=…`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self.common_names.iter().map(|cn| format!("CN={cn}")).collect();
        parts.extend(self.organizations.iter().map(|o| format!("O={o}")));
        parts.join(", ")
    }
}

/// The CONNECT door's admission list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectClients {
    common_names: Vec<String>,
}

impl Default for ConnectClients {
    fn default() -> Self {
        Self { common_names: vec![DEFAULT_CONNECT_CLIENT.to_string()] }
    }
}

impl ConnectClients {
    /// Admits exactly these common names (an empty list admits nobody).
    pub fn new(common_names: impl IntoIterator<Item = String>) -> Self {
        Self { common_names: common_names.into_iter().collect() }
    }

    /// The common names admitted.
    pub fn common_names(&self) -> &[String] {
        &self.common_names
    }

    /// Whether `identity` may use the door: exactly one common name, listed,
    /// and not a node.
    pub fn admits(&self, identity: &ClientIdentity) -> bool {
        match identity.common_names.as_slice() {
            [cn] => !identity.is_node() && self.common_names.iter().any(|allowed| allowed == cn),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;
    use crate::certs::CertificateAuthority;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn only_listed_non_node_clients_are_admitted() {
        let ca = CertificateAuthority::generate("test CA", DAY).unwrap();
        let identity = |der: &[u8]| ClientIdentity::of(der).unwrap();
        let apiserver = identity(ca.issue_client("kube-apiserver", None, DAY).unwrap().cert_der());
        let other = identity(ca.issue_client("prometheus", None, DAY).unwrap().cert_der());
        let node = identity(ca.issue_node("edge-2", &[], DAY).unwrap().cert_der());
        let disguised = identity(ca.issue_client("kube-apiserver", Some(NODES_ORGANIZATION), DAY).unwrap().cert_der());
        let clients = ConnectClients::default();
        assert!(clients.admits(&apiserver));
        assert!(!clients.admits(&other));
        assert!(!clients.admits(&node));
        assert!(node.is_node());
        assert!(!clients.admits(&disguised), "O=system:nodes is refused even with a listed CN");
        let listed = ConnectClients::new(["system:node:edge-2".to_string(), "prometheus".to_string()]);
        assert!(!listed.admits(&node), "a node identity is refused even when listed");
        assert!(listed.admits(&other));
        assert!(!ConnectClients::new([]).admits(&apiserver));
        assert_eq!(disguised.describe(), "CN=kube-apiserver, O=system:nodes");
        assert_eq!(ClientIdentity::of(b"garbage"), None);
    }
}
