//! Reading certificates back: the node a certificate names, its IP SANs,
//! and what a node name may be.

use super::*;

/// Checks `name` as Kubernetes checks node names: a lowercase RFC 1123
/// subdomain (labels of a-z, 0-9 and '-', starting and ending with a letter
/// or digit, joined by '.'), at most 253 characters.
pub fn validate_node_name(name: &str) -> Result<(), CertError> {
    let fail = |reason: String| Err(CertError::InvalidNodeName { name: name.to_owned(), reason });
    if name.is_empty() {
        return fail("it is empty".to_owned());
    }
    if name.len() > 253 {
        return fail(format!("it is {} characters long; at most 253", name.len()));
    }
    if let Some((at, c)) = name.char_indices().find(|(_, c)| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '.')) {
        let rule = if c.is_ascii_uppercase() { "node names are lower case" } else { "only a-z, 0-9, '-' and '.'" };
        return fail(format!("character {} {c:?} is not allowed: {rule}", at + 1));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return fail("it has an empty label (a leading, trailing or doubled '.')".to_owned());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return fail(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

/// The node a peer certificate names: `<name>` iff its subject is
/// `CN=system:node:<name>` (exactly one CN, `<name>` a valid node name) and
/// includes `O=system:nodes`. Only meaningful for a certificate the TLS
/// layer has verified against the tunnel CA.
pub fn node_name_of(cert_der: &[u8]) -> Result<String, CertError> {
    let what = "peer certificate";
    let cert = parse_cert(what, cert_der)?;
    node_name_of_subject(what, cert.subject().clone())
}

/// The node `subject` names (see [`node_name_of`]); `what` for errors.
pub(super) fn node_name_of_subject(what: &str, subject: x509_parser::x509::X509Name<'_>) -> Result<String, CertError> {
    let mut common_names = Vec::new();
    for attribute in subject.iter_common_name() {
        let cn = attribute.as_str().map_err(|source| CertError::X509Field {
            what: what.to_owned(),
            field: "its CN is not a string",
            source,
        })?;
        common_names.push(cn);
    }
    let cn = match common_names.as_slice() {
        [] => return Err(CertError::MissingCommonName),
        [cn] => *cn,
        many => return Err(CertError::MultipleCommonNames(many.len())),
    };
    let Some(node) = cn.strip_prefix(NODE_CN_PREFIX) else {
        return Err(CertError::NotNodeCommonName(cn.to_owned()));
    };
    validate_node_name(node)?;
    if !subject.iter_organization().any(|o| o.as_str() == Ok(NODES_ORGANIZATION)) {
        return Err(CertError::NotSystemNodes);
    }
    Ok(node.to_owned())
}

/// The IP addresses among a certificate's subjectAltNames, in order; empty
/// when it has none.
pub fn ip_sans_of(cert_der: &[u8]) -> Result<Vec<IpAddr>, CertError> {
    with_sans("peer certificate", cert_der, ip_sans)
}

/// Calls `read` with a certificate's subjectAltNames (none when it has no
/// such extension); `what` names the certificate in errors.
fn with_sans<T>(
    what: &str,
    cert_der: &[u8],
    read: impl FnOnce(&[GeneralName<'_>]) -> Result<T, CertError>,
) -> Result<T, CertError> {
    let cert = parse_cert(what, cert_der)?;
    let sans = cert.subject_alternative_name().map_err(|source| CertError::X509Field {
        what: what.to_owned(),
        field: "bad subjectAltName",
        source,
    })?;
    read(sans.map_or(&[][..], |sans| sans.value.general_names.as_slice()))
}

fn ip_sans(names: &[GeneralName<'_>]) -> Result<Vec<IpAddr>, CertError> {
    let what = "peer certificate";
    let mut ips = Vec::new();
    for general_name in names {
        if let GeneralName::IPAddress(bytes) = general_name {
            let ip = if let Ok(octets) = <[u8; 4]>::try_from(*bytes) {
                IpAddr::V4(Ipv4Addr::from(octets))
            } else if let Ok(octets) = <[u8; 16]>::try_from(*bytes) {
                IpAddr::V6(Ipv6Addr::from(octets))
            } else {
                return Err(CertError::Certificate {
                    what: what.to_owned(),
                    reason: format!("an IP subjectAltName of {} bytes", bytes.len()),
                });
            };
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// The name a client checks this certificate against: its first DNS
/// subjectAltName, else its first IP one; `None` when it has neither.
/// Replicas sharing one server certificate dial each other by it, whatever
/// address each one is reached at.
pub fn first_san_of(cert_der: &[u8]) -> Result<Option<rustls_pki_types::ServerName<'static>>, CertError> {
    with_sans("own certificate", cert_der, |names| {
        let dns = names.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) => rustls_pki_types::ServerName::try_from(dns.to_string()).ok(),
            _ => None,
        });
        Ok(dns.or(ip_sans(names)?.first().map(|ip| rustls_pki_types::ServerName::from(*ip))))
    })
}

pub(super) fn to_system_time(unix_seconds: i64) -> SystemTime {
    let magnitude = Duration::from_secs(unix_seconds.unsigned_abs());
    let time = if unix_seconds >= 0 { UNIX_EPOCH.checked_add(magnitude) } else { UNIX_EPOCH.checked_sub(magnitude) };
    time.unwrap_or(UNIX_EPOCH)
}

pub(super) fn parse_cert<'a>(what: &str, der: &'a [u8]) -> Result<X509Certificate<'a>, CertError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|source| CertError::X509 { what: what.to_owned(), source })
}
