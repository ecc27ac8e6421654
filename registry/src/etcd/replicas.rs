//! Tunnel server replicas in etcd (`tunnel-replicas/<id>`): the
//! [`ReplicaStore`] of this backend. Each announcement is put on an etcd
//! lease of the record's remaining lifetime, so etcd drops the key of a
//! replica that stopped announcing by itself. Readers still check
//! `expiresAt`: etcd rounds a lease up (to whole seconds, and to its
//! minimum TTL) and expires it a little late. Apart from the subnet
//! registry, as it shares only the client and the prefix.
//!
//! [`ReplicaStore`]: crate::ReplicaStore

use std::time::SystemTime;

use etcd_client::{GetOptions, PutOptions};

use super::rpc::rpc;
use super::EtcdRegistry;
use crate::{RegistryError, ReplicaRecord};

impl crate::ReplicaStore for EtcdRegistry {
    async fn announce_replica(&mut self, record: &ReplicaRecord) -> Result<(), RegistryError> {
        let key = self.keys.replica(&record.id)?;
        let what = format!("writing {key}");
        let ttl = i64::try_from(record.remaining(SystemTime::now())).unwrap_or(i64::MAX);
        // A fresh etcd lease per announcement rather than keep-alives of
        // one: the key moves to the new lease, and the old one, holding
        // nothing any more, ends by itself within one lifetime. No lease
        // id has to survive between calls (or a restart of the replica).
        let lease = rpc(&self.endpoints, &what, self.leases.grant(ttl, None)).await?;
        let options = PutOptions::new().with_lease(lease.id());
        rpc(&self.endpoints, &what, self.kv.put(key.clone(), record.to_json(), Some(options))).await?;
        Ok(())
    }

    async fn replicas(&mut self, now: SystemTime) -> Result<Vec<ReplicaRecord>, RegistryError> {
        let prefix = self.keys.replicas.clone();
        let what = format!("listing {prefix}");
        let response =
            rpc(&self.endpoints, &what, self.kv.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let listed = response.kvs().iter().map(|kv| (kv.key(), kv.value()));
        Ok(live_records(&prefix, listed, now, &self.endpoints))
    }

    async fn withdraw_replica(&mut self, id: &str) -> Result<bool, RegistryError> {
        let key = self.keys.replica(id)?;
        let what = format!("deleting {key}");
        let response = rpc(&self.endpoints, &what, self.kv.delete(key.clone(), None)).await?;
        Ok(response.deleted() > 0)
    }
}

/// The records live at `now` among the `(key, value)` pairs listed under
/// `prefix`, by id. Unreadable ones (not JSON, another version, naming
/// another replica than their key) are skipped with a warning naming the
/// key: one broken writer must not hide every other replica.
fn live_records<'kv>(
    prefix: &str,
    listed: impl IntoIterator<Item = (&'kv [u8], &'kv [u8])>,
    now: SystemTime,
    endpoints: &str,
) -> Vec<ReplicaRecord> {
    let mut records = Vec::new();
    for (key, value) in listed {
        let key = String::from_utf8_lossy(key);
        // A key outside the prefix cannot be listed; if it were, the empty
        // id is refused like any other bad one.
        let id = key.strip_prefix(prefix).unwrap_or_default();
        match ReplicaRecord::from_json(id, value) {
            Ok(record) if record.is_live(now) => records.push(record),
            Ok(_) => {}
            Err(error) => tracing::warn!("etcd at {endpoints}: skipping {key}: {error}"),
        }
    }
    // etcd lists keys in byte order, which is id order already; the sort
    // keeps the trait's promise without relying on that.
    records.sort_by(|a, b| a.id.cmp(&b.id));
    records
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::REPLICA_TTL;

    #[test]
    fn only_live_readable_records_are_listed_by_id() {
        const PREFIX: &str = "/coreos.com/network/tunnel-replicas/";
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = ReplicaRecord::new("a", "10.0.0.5:10265", false, REPLICA_TTL, now);
        let b = ReplicaRecord::new("b", "10.0.0.6:10265", true, REPLICA_TTL, now);
        let old = ReplicaRecord::new("old", "10.0.0.7:10265", false, Duration::from_secs(1), now);
        let key = |id: &str| format!("{PREFIX}{id}");
        let listed = [
            (key("b"), b.to_json()),
            (key("old"), old.to_json()),
            (key("junk"), "{not json".to_string()),
            (key("liar"), a.to_json()),
            (key("x/y"), ReplicaRecord::new("x/y", "h:1", false, REPLICA_TTL, now).to_json()),
            (key("a"), a.to_json()),
        ];
        let pairs = || listed.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes()));
        assert_eq!(live_records(PREFIX, pairs(), now, "http://test"), vec![a.clone(), b.clone(), old.clone()]);
        // One second on, `old` is over whatever etcd still holds.
        let later = now + Duration::from_secs(1);
        assert_eq!(live_records(PREFIX, pairs(), later, "http://test"), vec![a, b]);
        let past_all = now + REPLICA_TTL;
        assert!(live_records(PREFIX, pairs(), past_all, "http://test").is_empty());
    }
}
