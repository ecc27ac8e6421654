//! Bootstrap tokens: `[a-z0-9]{6}.[a-z0-9]{16}` (id.secret), as kubeadm
//! mints them (SPEC §4). The secret never appears in a message or a log.

use std::fmt;

/// A token that is not `[a-z0-9]{6}.[a-z0-9]{16}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the bootstrap token must be [a-z0-9]{{6}}.[a-z0-9]{{16}} (id.secret): {0}")]
pub struct TokenError(String);

/// A well-formed bootstrap token.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    id: String,
    secret: String,
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BootstrapToken({}.<secret>)", self.id)
    }
}

impl fmt::Display for BootstrapToken {
    /// `id.<secret>`: safe for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.<secret>", self.id)
    }
}

fn token_chars(part: &str) -> bool {
    part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl std::str::FromStr for BootstrapToken {
    type Err = TokenError;

    fn from_str(text: &str) -> Result<Self, TokenError> {
        // Say what is wrong without echoing what may be a real secret.
        let Some((id, secret)) = text.split_once('.') else {
            return Err(TokenError(format!("no '.' in the {} characters given", text.len())));
        };
        if id.len() != 6 || !token_chars(id) {
            return Err(TokenError(format!("the id {id:?} is not 6 of [a-z0-9]")));
        }
        if secret.len() != 16 || !token_chars(secret) {
            return Err(TokenError(format!("the secret ({} characters) is not 16 of [a-z0-9]", secret.len())));
        }
        Ok(Self { id: id.to_string(), secret: secret.to_string() })
    }
}

impl BootstrapToken {
    /// The public half (`bootstrap-token-<id>`, `system:bootstrap:<id>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The secret half: the HMAC key of cluster-info's signature.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// `id.secret`, for `Authorization: Bearer`.
    pub fn bearer(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_kubeadm_format_and_nothing_else() {
        let token: BootstrapToken = "abcdef.0123456789abcdef".parse().unwrap();
        assert_eq!((token.id(), token.secret()), ("abcdef", "0123456789abcdef"));
        assert_eq!(token.to_string(), "abcdef.<secret>");
        assert_eq!(format!("{token:?}"), "BootstrapToken(abcdef.<secret>)");
        for bad in [
            "abcdef0123456789abcdef",
            "abcde.0123456789abcdef",
            "ABCDEF.0123456789abcdef",
            "abcdef.0123456789abcde",
            "abcdef.0123456789ABCDEF",
            "abcdef.0123456789abcdef.x",
            "",
        ] {
            let err = bad.parse::<BootstrapToken>().unwrap_err().to_string();
            assert!(err.starts_with("the bootstrap token must be"), "{bad}: {err}");
            assert!(!err.contains("0123456789"), "the secret leaked: {err}");
        }
    }
}
