//! Tunnel server replicas announce themselves here, and read each other:
//! a replica that has no link to a node forwards the stream to one that
//! has, and the replica count it tells agents is the number alive.
//!
//! A replica's announcement is [`ReplicaRecord`]'s JSON (version 1) and
//! lives until its `expiresAt` (unix seconds): the replica re-announces
//! well before (every [`REPLICA_TTL`] / 3), so a replica killed without a
//! word drops out of everyone's view within [`REPLICA_TTL`]. Readers never
//! return an expired record, whatever the backend still holds.
//!
//! - embedded: table `tunnel_replica(id PK, record, expires_at)`, created by
//!   the first announcement (older netds ignore it);
//! - etcd: key `<prefix>/tunnel-replicas/<id>` on an etcd lease of the
//!   record's remaining lifetime, so etcd drops it by itself;
//! - Kubernetes: a `coordination.k8s.io/v1` Lease
//!   `netd-tunnel-replica-<id>` in `kube-system` (the tunnel server's namespace), labelled
//!   `netd.io/tunnel-replica=true`, `holderIdentity` the id,
//!   `leaseDurationSeconds` the lifetime, the record JSON in annotation
//!   `netd.io/tunnel-replica`.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::RegistryError;

/// The version of [`ReplicaRecord`]'s JSON.
pub const REPLICA_RECORD_VERSION: u32 = 1;

/// How long an announcement lives; replicas re-announce every third of it.
pub const REPLICA_TTL: Duration = Duration::from_secs(15);

/// Kubernetes: the label on every replica Lease, and the annotation that
/// holds the record.
pub const REPLICA_LABEL: &str = "netd.io/tunnel-replica";

/// Kubernetes: the namespace of replica Leases (the tunnel server's).
pub const REPLICA_NAMESPACE: &str = "kube-system";

/// Kubernetes: the name prefix of replica Leases.
pub const REPLICA_LEASE_PREFIX: &str = "netd-tunnel-replica-";

/// A tunnel server replica as it announces itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaRecord {
    /// [`REPLICA_RECORD_VERSION`].
    pub version: u32,
    /// The replica's identity (unique among replicas; 1–253 characters of
    /// `[A-Za-z0-9._-]`).
    pub id: String,
    /// Where its peers reach its CONNECT door, `host:port`.
    pub address: String,
    /// True once it drains: peers forward nothing to it, agents do not
    /// count it.
    pub draining: bool,
    /// Unix seconds after which the record is no longer believed.
    pub expires_at: u64,
}

impl ReplicaRecord {
    /// A record of replica `id` at `address`, alive for `ttl` from `now`.
    pub fn new(id: &str, address: &str, draining: bool, ttl: Duration, now: SystemTime) -> Self {
        Self {
            version: REPLICA_RECORD_VERSION,
            id: id.to_string(),
            address: address.to_string(),
            draining,
            expires_at: unix_seconds(now).saturating_add(ttl.as_secs().max(1)),
        }
    }

    /// Whether it is still believed at `now`.
    pub fn is_live(&self, now: SystemTime) -> bool {
        unix_seconds(now) < self.expires_at
    }

    /// Seconds it still lives at `now` (at least 1, for a backend TTL).
    pub fn remaining(&self, now: SystemTime) -> u64 {
        self.expires_at.saturating_sub(unix_seconds(now)).max(1)
    }

    /// The stored JSON.
    pub fn to_json(&self) -> String {
        // A struct of strings, integers and a bool always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a stored record, which must be version 1 and name replica `id`
    /// (the key it was found under).
    pub fn from_json(id: &str, bytes: &[u8]) -> Result<Self, RegistryError> {
        let bad = |reason: String| RegistryError::Refused {
            what: format!("reading tunnel replica {id:?}"),
            reason: format!("the stored record is unusable: {reason}"),
        };
        let record: Self = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if record.version != REPLICA_RECORD_VERSION {
            return Err(bad(format!(
                "format version {} (this netd reads version {REPLICA_RECORD_VERSION})",
                record.version
            )));
        }
        if record.id != id {
            return Err(bad(format!("it names {}", record.id)));
        }
        check_replica_id(id)?;
        Ok(record)
    }
}

/// A replica identity every backend can hold as a key, a row or a Lease
/// name suffix: 1–253 characters of `[A-Za-z0-9._-]`.
pub fn check_replica_id(id: &str) -> Result<(), RegistryError> {
    let valid = !id.is_empty()
        && id.len() <= 253
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(RegistryError::Refused {
            what: format!("naming tunnel replica {id:?}"),
            reason: "a replica id is 1-253 characters of [A-Za-z0-9._-]".into(),
        })
    }
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Where tunnel server replicas announce themselves and find each other.
pub trait ReplicaStore: Send {
    /// Stores `record` (replacing this replica's previous one) until its
    /// `expires_at`.
    fn announce_replica(&mut self, record: &ReplicaRecord) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Every live record (not expired at `now`), by id; unreadable records
    /// are skipped with a log line.
    fn replicas(&mut self, now: SystemTime) -> impl Future<Output = Result<Vec<ReplicaRecord>, RegistryError>> + Send;

    /// Removes replica `id`'s record (a replica leaving for good); false
    /// when there was none.
    fn withdraw_replica(&mut self, id: &str) -> impl Future<Output = Result<bool, RegistryError>> + Send;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_record_round_trips_and_expires() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let record = ReplicaRecord::new("cloud-1-10262", "10.0.0.5:10265", false, REPLICA_TTL, now);
        let exact =
            r#"{"version":1,"id":"cloud-1-10262","address":"10.0.0.5:10265","draining":false,"expiresAt":1800000015}"#;
        assert_eq!(record.to_json(), exact);
        assert_eq!(ReplicaRecord::from_json("cloud-1-10262", exact.as_bytes()).unwrap(), record);
        assert!(record.is_live(now + Duration::from_secs(14)));
        assert!(!record.is_live(now + Duration::from_secs(15)));
        assert_eq!(record.remaining(now), 15);
        assert_eq!(record.remaining(now + Duration::from_secs(99)), 1);
    }

    #[test]
    fn unusable_records_and_ids_are_named() {
        for (text, reason) in [
            (&b"garbage"[..], "expected value"),
            (br#"{"version":2,"id":"a","address":"x:1","draining":false,"expiresAt":1}"#, "version 2"),
            (br#"{"version":1,"id":"b","address":"x:1","draining":false,"expiresAt":1}"#, "names b"),
            (br#"{"version":1,"id":"a","address":"x:1","draining":"no","expiresAt":1}"#, "invalid type"),
            (br#"{"version":1,"id":"a","address":"x:1""#, "EOF"),
        ] {
            let error = ReplicaRecord::from_json("a", text).unwrap_err().to_string();
            assert!(error.contains("reading tunnel replica \"a\""), "{error}");
            assert!(error.contains(reason), "{error} lacks {reason}");
        }
        for bad in ["", "a/b", "a b", &"x".repeat(254)] {
            assert!(check_replica_id(bad).is_err(), "{bad:?}");
        }
        check_replica_id("cloud-1.example_2-10262").unwrap();
    }
}
