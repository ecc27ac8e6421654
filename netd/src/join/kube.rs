//! The Kubernetes side of a join, after discovery: the node's tunnel
//! certificate through a CertificateSigningRequest that kube-controller-
//! manager approves and signs (as kubelet's bootstrap does), then the Node
//! object with join's labels and annotations, under the node's own
//! identity so NodeRestriction applies.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};

use super::discovery::ClusterInfo;
use super::token::BootstrapToken;
use crate::kube::{call, KubeClient, KubeConfig, KubeError};
use crate::tunnel::certs;

/// The signer kubelet's client certificates use: kube-controller-manager
/// approves requests from bootstrap tokens for it (with kubeadm's
/// `nodeclient` binding) and signs them with the cluster CA. Its rules —
/// `CN=system:node:<name>`, `O=system:nodes`, no SANs, client auth — are
/// exactly a tunnel agent's identity.
pub const SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// How long join waits for the certificate by default.
pub const CSR_TIMEOUT: Duration = Duration::from_secs(120);
const CSR_PATH: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
const POLL: Duration = Duration::from_millis(250);

/// Why the Kubernetes steps of a join failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeJoinError {
    /// A request failed.
    #[error(transparent)]
    Api(#[from] KubeError),
    /// The key or request could not be made.
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    /// The request was denied or failed.
    #[error("certificate request {name} was {verdict}: {message}")]
    Denied {
        /// The CSR's name.
        name: String,
        /// `Denied` or `Failed`.
        verdict: String,
        /// Its message.
        message: String,
    },
    /// Nobody signed in time.
    #[error(
        "certificate request {name} was not signed within {timeout:?}: is kube-controller-manager running with \
         --cluster-signing-cert-file, and may system:bootstrappers have their node client CSRs approved?"
    )]
    Timeout {
        /// The CSR's name.
        name: String,
        /// How long join waited.
        timeout: Duration,
    },
    /// The answer was not what the API promises.
    #[error("{0}")]
    Unexpected(String),
    /// A request could not be built.
    #[error("building a request for {path}: {source}")]
    Request {
        /// The request's path.
        path: String,
        /// The request builder's error.
        #[source]
        source: http::Error,
    },
}

/// The node's signed tunnel identity.
pub struct NodeCertificate {
    /// The signed certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM), made on this node.
    pub key_pem: String,
    /// The CSR it came from.
    pub csr_name: String,
}

fn json_request(
    method: http::Method,
    path: &str,
    content_type: &str,
    body: &Value,
) -> Result<http::Request<Vec<u8>>, KubeJoinError> {
    http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(body.to_string().into_bytes())
        .map_err(|source| KubeJoinError::Request { path: path.to_string(), source })
}

/// Asks the cluster to sign `node`'s tunnel identity, authenticated by the
/// bootstrap token, and waits for the signed certificate.
pub async fn request_node_certificate(
    info: &ClusterInfo,
    token: &BootstrapToken,
    node: &str,
    timeout: Duration,
) -> Result<NodeCertificate, KubeJoinError> {
    let client = KubeClient::new(&KubeConfig {
        server: info.server.clone(),
        token: Some(token.bearer()),
        token_file: None,
        ca_cert_pem: Some(info.ca_pem.clone().into_bytes()),
        client_cert: None,
        node_name: node.to_string(),
        network: None,
    })?;
    let csr = certs::node_csr(node)?;
    let body = json!({
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": { "generateName": format!("netd-join-{node}-") },
        "spec": {
            "request": STANDARD.encode(&csr.csr_pem),
            "signerName": SIGNER,
            "usages": ["digital signature", "key encipherment", "client auth"],
        },
    });
    let created: Value = call(
        "creating the node's certificate request",
        client.client().request(json_request(http::Method::POST, CSR_PATH, "application/json", &body)?),
    )
    .await?;
    let name = created
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .ok_or_else(|| KubeJoinError::Unexpected("the created certificate request has no name".into()))?
        .to_string();
    let started = Instant::now();
    loop {
        let path = format!("{CSR_PATH}/{name}");
        let request = http::Request::get(&path)
            .body(Vec::new())
            .map_err(|source| KubeJoinError::Request { path: path.to_string(), source })?;
        let current: Value = call("reading the node's certificate request", client.client().request(request)).await?;
        for condition in current.pointer("/status/conditions").and_then(Value::as_array).into_iter().flatten() {
            let kind = condition.get("type").and_then(Value::as_str).unwrap_or_default();
            if kind == "Denied" || kind == "Failed" {
                let message = condition.get("message").and_then(Value::as_str).unwrap_or("no message").to_string();
                return Err(KubeJoinError::Denied { name, verdict: kind.to_string(), message });
            }
        }
        if let Some(issued) = current.pointer("/status/certificate").and_then(Value::as_str).filter(|c| !c.is_empty()) {
            let pem =
                STANDARD.decode(issued).ok().and_then(|bytes| String::from_utf8(bytes).ok()).ok_or_else(|| {
                    KubeJoinError::Unexpected(format!("{name}: status.certificate is not base64 PEM"))
                })?;
            return Ok(NodeCertificate { cert_pem: pem, key_pem: csr.key_pem, csr_name: name });
        }
        if started.elapsed() >= timeout {
            return Err(KubeJoinError::Timeout { name, timeout });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What [`register_node`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// The Node object was created.
    Created,
    /// It existed (kubelet registered first): its labels and annotations
    /// were merged.
    Updated,
}

/// The Node object of `node`, created or merged with `labels` and
/// `annotations`, as the node itself (its new certificate).
pub async fn register_node(
    info: &ClusterInfo,
    cert: &NodeCertificate,
    node: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Result<Registered, KubeJoinError> {
    let client = KubeClient::with_identity(&info.server, info.ca_pem.as_bytes(), &cert.cert_pem, &cert.key_pem)?;
    let metadata = json!({ "name": node, "labels": labels, "annotations": annotations });
    let object = json!({ "apiVersion": "v1", "kind": "Node", "metadata": metadata });
    let kube = client.client();
    let create = kube.request::<Value>(json_request(http::Method::POST, "/api/v1/nodes", "application/json", &object)?);
    match tokio::time::timeout(crate::kube::REQUEST_TIMEOUT, create).await {
        Ok(Ok(_)) => return Ok(Registered::Created),
        Ok(Err(kube::Error::Api(status))) if status.code == 409 => {}
        Ok(Err(e)) => return Err(KubeError::from_client(&format!("registering node {node}"), e).into()),
        Err(_) => return Err(KubeError::Unreachable(format!("registering node {node}: no answer")).into()),
    }
    let patch = json!({ "metadata": { "labels": labels, "annotations": annotations } });
    let path = format!("/api/v1/nodes/{node}");
    let request = json_request(http::Method::PATCH, &path, "application/merge-patch+json", &patch)?;
    let _: Value = call(&format!("labelling node {node}"), client.client().request(request)).await?;
    Ok(Registered::Updated)
}

/// Deletes the Node object a failed join created (as the node).
pub async fn unregister_node(info: &ClusterInfo, cert: &NodeCertificate, node: &str) -> Result<(), KubeJoinError> {
    let client = KubeClient::with_identity(&info.server, info.ca_pem.as_bytes(), &cert.cert_pem, &cert.key_pem)?;
    let path = format!("/api/v1/nodes/{node}");
    let request = http::Request::delete(&path)
        .body(Vec::new())
        .map_err(|source| KubeJoinError::Request { path: path.to_string(), source })?;
    let _: Value = call(&format!("removing node {node}"), client.client().request(request)).await?;
    Ok(())
}
