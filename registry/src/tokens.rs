//! Bootstrap tokens held by the registries that have no API server to
//! check them (embedded, etcd): what `netd-join` verifies before it changes
//! anything on a node, as kubeadm's tokens are checked by kube-apiserver.
//!
//! A token is `id.secret` (`[a-z0-9]{6}.[a-z0-9]{16}`, SPEC §4). The
//! registry keeps only the id, the SHA-256 of the secret, an optional
//! expiry and a description, so whoever can read the registry (every node's
//! daemon can read etcd) cannot join with what it reads. The secret has 82
//! bits of entropy, far beyond guessing a SHA-256 preimage.
//!
//! Stored as [`TokenRecord`]'s JSON (version 1): etcd key
//! `<prefix>/bootstrap-tokens/<id>` (with an etcd lease that ends with the
//! token, so etcd drops expired ones as Kubernetes' token cleaner does);
//! embedded table `bootstrap_token(id PK, record)`.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::RegistryError;

/// The version of [`TokenRecord`]'s JSON.
pub const TOKEN_RECORD_VERSION: u32 = 1;

/// A bootstrap token as a registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    /// [`TOKEN_RECORD_VERSION`].
    pub version: u32,
    /// The token's public half.
    pub id: String,
    /// Lowercase hex SHA-256 of the secret half.
    pub secret_sha256: String,
    /// Unix seconds after which the token no longer joins (`None`: never expires).
    pub expires_at: Option<u64>,
    /// What the token is for, for `netd registry token list`.
    #[serde(default)]
    pub description: String,
}

/// Why a token was refused. The secret never appears in a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefused {
    /// No token with this id.
    #[error("the registry holds no bootstrap token {0} (create one with `netd registry token create`)")]
    Unknown(String),
    /// The id is known, the secret is not its secret.
    #[error("bootstrap token {0}: the secret does not match")]
    WrongSecret(String),
    /// The token expired.
    #[error("bootstrap token {id} expired {ago} s ago")]
    Expired {
        /// The token's id.
        id: String,
        /// Seconds since it expired.
        ago: u64,
    },
    /// The stored record is not one this netd reads.
    #[error("bootstrap token {id}: the stored record is unusable ({reason})")]
    BadRecord {
        /// The token's id.
        id: String,
        /// Why.
        reason: String,
    },
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Lowercase hex SHA-256 of `secret`.
pub fn secret_digest(secret: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl TokenRecord {
    /// The record of token `id.secret`, valid for `ttl` from `now`
    /// (`None`: forever).
    pub fn new(id: &str, secret: &str, ttl: Option<Duration>, description: &str, now: SystemTime) -> Self {
        Self {
            version: TOKEN_RECORD_VERSION,
            id: id.to_string(),
            secret_sha256: secret_digest(secret),
            expires_at: ttl.map(|ttl| unix(now).saturating_add(ttl.as_secs())),
            description: description.to_string(),
        }
    }

    /// Reads a stored record of token `id`.
    pub fn from_json(id: &str, text: &[u8]) -> Result<Self, TokenRefused> {
        let bad = |reason: String| TokenRefused::BadRecord { id: id.to_string(), reason };
        let record: Self = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
        if record.version != TOKEN_RECORD_VERSION {
            return Err(bad(format!("version {}, this netd reads {TOKEN_RECORD_VERSION}", record.version)));
        }
        if record.id != id {
            return Err(bad(format!("it is stored as {id} but names {}", record.id)));
        }
        Ok(record)
    }

    /// The record as stored.
    pub fn to_json(&self) -> String {
        // A struct of strings and numbers always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks `secret` (the token's secret half) at `now`. Comparing
    /// digests leaks nothing usable through timing: an attacker learns at
    /// most a prefix of a hash whose preimage is out of reach.
    pub fn check(&self, secret: &str, now: SystemTime) -> Result<(), TokenRefused> {
        if secret_digest(secret) != self.secret_sha256 {
            return Err(TokenRefused::WrongSecret(self.id.clone()));
        }
        match self.expires_at {
            Some(at) if unix(now) >= at => Err(TokenRefused::Expired { id: self.id.clone(), ago: unix(now) - at }),
            _ => Ok(()),
        }
    }

    /// Seconds left before it expires (`None`: never), 0 once expired.
    pub fn remaining(&self, now: SystemTime) -> Option<u64> {
        self.expires_at.map(|at| at.saturating_sub(unix(now)))
    }
}

/// A registry that holds bootstrap tokens (embedded and etcd; on
/// Kubernetes they are `bootstrap-token-<id>` Secrets, made with
/// `kubeadm token create`).
pub trait TokenStore: Send {
    /// Stores `record`, replacing a token with the same id.
    fn put_token(&mut self, record: &TokenRecord) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// The stored record of token `id`, if any (a record that does not
    /// read is an error naming it).
    fn token(&mut self, id: &str) -> impl Future<Output = Result<Option<TokenRecord>, RegistryError>> + Send;

    /// Every stored token, by id; unreadable records are skipped with a log line.
    fn tokens(&mut self) -> impl Future<Output = Result<Vec<TokenRecord>, RegistryError>> + Send;

    /// Deletes token `id`; false when there was none.
    fn delete_token(&mut self, id: &str) -> impl Future<Output = Result<bool, RegistryError>> + Send;
}

/// Checks token `id.secret` against `store` at `now`: the step of a join
/// that must pass before anything on the node changes.
pub async fn verify_token(
    store: &mut impl TokenStore,
    id: &str,
    secret: &str,
    now: SystemTime,
) -> Result<Result<(), TokenRefused>, RegistryError> {
    Ok(match store.token(id).await? {
        None => Err(TokenRefused::Unknown(id.to_string())),
        Some(record) => record.check(secret, now),
    })
}

/// A refused read of a stored token record, as a registry error.
pub(crate) fn bad_record(error: TokenRefused) -> RegistryError {
    RegistryError::BadTokenRecord(error)
}

/// Characters of token ids and secrets.
const TOKEN_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A new random token `(id, secret)`, as `kubeadm token generate` makes
/// them.
pub fn generate_token() -> Result<(String, String), RegistryError> {
    let mut bytes = [0u8; 22];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| RegistryError::Refused { what: "making a token".into(), reason: "no system randomness".into() })?;
    // 36 does not divide 256: a 0.4 % bias towards the first four
    // characters costs well under a bit of the secret's 82.
    let text: String = bytes.iter().map(|b| char::from(TOKEN_ALPHABET[usize::from(*b) % 36])).collect();
    let (id, secret) = text.split_at(6);
    Ok((id.to_string(), secret.to_string()))
}

/// The token store of a registry spec: embedded and etcd hold tokens;
/// Kubernetes keeps them as Secrets, which `kubeadm token` manages.
pub enum AnyTokenStore {
    /// The SQLite registry.
    Embedded(super::embedded::EmbeddedRegistry),
    /// etcd (feature `etcd`).
    #[cfg(feature = "etcd")]
    Etcd(Box<super::etcd::EtcdRegistry>),
}

impl AnyTokenStore {
    /// Opens the token store of `spec` (nothing is created: an embedded
    /// file must exist, made by `netd registry init`).
    pub async fn open(spec: &super::RegistrySpec) -> Result<Self, RegistryError> {
        match spec {
            super::RegistrySpec::Embedded(path) => {
                Ok(Self::Embedded(super::embedded::EmbeddedRegistry::open(path, super::embedded::DEFAULT_POLL)))
            }
            #[cfg(feature = "etcd")]
            super::RegistrySpec::Etcd(endpoints) => {
                Ok(Self::Etcd(Box::new(super::etcd::EtcdRegistry::connect(endpoints).await?)))
            }
            #[cfg(not(feature = "etcd"))]
            super::RegistrySpec::Etcd(_) => Err(super::without_etcd()),
            super::RegistrySpec::Kubernetes(_) => Err(RegistryError::Refused {
                what: "opening the token store".into(),
                reason: "on Kubernetes bootstrap tokens are kube-system/bootstrap-token-<id> Secrets: \
                         make them with `kubeadm token create`"
                    .into(),
            }),
        }
    }
}

impl TokenStore for AnyTokenStore {
    async fn put_token(&mut self, record: &TokenRecord) -> Result<(), RegistryError> {
        match self {
            Self::Embedded(r) => r.put_token(record).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.put_token(record).await,
        }
    }

    async fn token(&mut self, id: &str) -> Result<Option<TokenRecord>, RegistryError> {
        match self {
            Self::Embedded(r) => r.token(id).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.token(id).await,
        }
    }

    async fn tokens(&mut self) -> Result<Vec<TokenRecord>, RegistryError> {
        match self {
            Self::Embedded(r) => r.tokens().await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.tokens().await,
        }
    }

    async fn delete_token(&mut self, id: &str) -> Result<bool, RegistryError> {
        match self {
            Self::Embedded(r) => r.delete_token(id).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(r) => r.delete_token(id).await,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_record_checks_its_secret_and_expiry_and_round_trips() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let record = TokenRecord::new("abcdef", "0123456789abcdef", Some(Duration::from_secs(3600)), "edge", now);
        assert_eq!(record.secret_sha256.len(), 64);
        assert!(!record.to_json().contains("0123456789abcdef"), "the secret is not stored");
        assert_eq!(record.check("0123456789abcdef", now), Ok(()));
        assert_eq!(record.check("0123456789abcdeg", now), Err(TokenRefused::WrongSecret("abcdef".into())));
        let later = now + Duration::from_secs(3601);
        assert_eq!(record.check("0123456789abcdef", later), Err(TokenRefused::Expired { id: "abcdef".into(), ago: 1 }));
        assert_eq!(record.remaining(now), Some(3600));
        assert_eq!(TokenRecord::from_json("abcdef", record.to_json().as_bytes()).unwrap(), record);
        let exact = r#"{"version":1,"id":"abcdef","secretSha256":"00","expiresAt":null,"description":""}"#;
        assert_eq!(TokenRecord::from_json("abcdef", exact.as_bytes()).unwrap().to_json(), exact);
        let forever = TokenRecord::new("abcdef", "0123456789abcdef", None, "", now);
        assert_eq!(forever.check("0123456789abcdef", later + Duration::from_secs(1 << 40)), Ok(()));
    }

    #[test]
    fn generated_tokens_are_well_formed_and_differ() {
        let (id, secret) = generate_token().unwrap();
        assert_eq!((id.len(), secret.len()), (6, 16));
        assert!(format!("{id}{secret}").bytes().all(|b| TOKEN_ALPHABET.contains(&b)));
        assert_ne!(generate_token().unwrap(), (id, secret));
    }

    #[test]
    fn unusable_records_are_named() {
        for (text, reason) in [
            (&b"garbage"[..], "expected value"),
            (br#"{"version":2,"id":"abcdef","secretSha256":"00","expiresAt":null}"#, "version 2"),
            (br#"{"version":1,"id":"zzzzzz","secretSha256":"00","expiresAt":null}"#, "names zzzzzz"),
            (br#"{"version":1,"id":"abcdef","secretSha256":7,"expiresAt":null}"#, "invalid type"),
            (br#"{"version":1,"id":"abcdef""#, "EOF"),
        ] {
            let error = TokenRecord::from_json("abcdef", text).unwrap_err().to_string();
            assert!(error.starts_with("bootstrap token abcdef: the stored record is unusable"), "{error}");
            assert!(error.contains(reason), "{error} lacks {reason}");
        }
    }
}
