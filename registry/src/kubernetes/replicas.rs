//! Tunnel server replicas on the Kubernetes API ([`crate::replicas`]): one
//! `coordination.k8s.io/v1` Lease per replica in [`REPLICA_NAMESPACE`].
//!
//! - **name**: [`replica_lease_name`]: [`REPLICA_LEASE_PREFIX`] + the id when
//!   that is a valid object name (a DNS subdomain: lowercase, at most 253
//!   characters, dot-separated parts that begin and end alphanumeric);
//!   otherwise (uppercase, `_`, `..`, a leading or trailing `.`/`-`, too
//!   long) the prefix, the id lowercased with every `.`, `_` and `-` turned
//!   into `-` (cut to fit), `-` and the first 10 hex digits of the SHA-256
//!   of the exact id, so ids that differ only in case or punctuation still
//!   get distinct Leases (two ids share one only by sharing 40 bits of
//!   SHA-256, or by one being chosen as the other's mapped form). The exact
//!   id stays in `spec.holderIdentity` and in the record.
//! - **object**: label [`REPLICA_LABEL`]`=true`, annotation
//!   [`REPLICA_LABEL`] = the record's JSON, `spec.holderIdentity` = the id,
//!   `spec.leaseDurationSeconds` = its remaining lifetime, `spec.renewTime`
//!   = now (`spec.acquireTime` too when created), as any Lease holder
//!   writes them, so `kubectl get leases -n kube-system -l
//!   netd.io/tunnel-replica=true` shows who is there and since when.
//! - **announce**: a JSON merge patch of those fields (one request in the
//!   steady state, a replica re-announces every few seconds); when there is
//!   no such Lease yet (404), a create; when a create finds one made
//!   meanwhile (409), the patch once more. Other annotations and labels on
//!   the Lease are left alone.
//! - **read**: one list of the labelled Leases. A Lease is believed only
//!   when its name is the one its holder's id maps to and the annotation is
//!   a readable record of that id ([`ReplicaRecord::from_json`]); anything
//!   else is skipped with a warning. Expired records are not returned; the
//!   Lease of a replica that died stays (harmless, expired) until a replica
//!   of the same id announces again or it is withdrawn or deleted.
//! - **withdraw**: delete; a missing Lease is `false`.
//!
//! RBAC: `leases` in `coordination.k8s.io`, in [`REPLICA_NAMESPACE`] only:
//! list, create, patch, delete (the Role `netd-tunnel-server` of
//! `deploy/10-rbac.yaml`).

use std::time::SystemTime;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject};
use kube::Api;
use serde_json::{json, Value};

use super::KubernetesRegistry;
use crate::replicas::{check_replica_id, ReplicaRecord, ReplicaStore};
use crate::replicas::{REPLICA_LABEL, REPLICA_LEASE_PREFIX, REPLICA_NAMESPACE};
use crate::RegistryError;
use netd_kube::object::{Object, ReplicaLease};
use netd_kube::{call, KubeError};
use netd_model::rfc3339;

/// Longest object name the API server takes (a DNS subdomain).
const MAX_NAME: usize = 253;
/// Hex digits of the SHA-256 of the id that make a mapped name unique.
const HASH_DIGITS: usize = 10;

/// The Lease name of replica `id` (see the module docs): the prefix and
/// the id itself when that is a valid object name, else a lowercase form
/// with a hash of the exact id.
pub fn replica_lease_name(id: &str) -> Result<String, RegistryError> {
    check_replica_id(id)?;
    let direct = format!("{REPLICA_LEASE_PREFIX}{id}");
    if is_dns_subdomain(&direct) {
        return Ok(direct);
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let room = MAX_NAME - REPLICA_LEASE_PREFIX.len() - 1 - HASH_DIGITS;
    // Only [a-z0-9-] between a prefix that begins with a letter and a hex
    // hash: valid whatever the id's dots and dashes were.
    let readable: String =
        id.chars().take(room).map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    Ok(format!("{REPLICA_LEASE_PREFIX}{readable}-{}", &hash[..HASH_DIGITS]))
}

/// RFC 1123 subdomain, as the API server checks object names.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= MAX_NAME
        && name.split('.').all(|part| {
            !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// `spec.renewTime` and `spec.acquireTime` are `MicroTime`s, which the API
/// server parses with exactly six fractional digits.
fn micro_time(at: SystemTime) -> String {
    let micros = at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_micros()).unwrap_or(0);
    let whole = rfc3339::format(at);
    format!("{}.{micros:06}Z", whole.trim_end_matches('Z'))
}

/// A Kubernetes error of a replica request, with what to grant when the
/// API server said 403.
fn replica_error(error: KubeError) -> RegistryError {
    match error {
        KubeError::Refused { what, reason } if reason.starts_with("HTTP 403") => RegistryError::Refused {
            what,
            reason: format!(
                "{reason} (the tunnel server's ServiceAccount needs list, create, patch and delete on \
                 coordination.k8s.io leases in {REPLICA_NAMESPACE}: the Role netd-tunnel-server of \
                 deploy/10-rbac.yaml)"
            ),
        },
        other => other.into(),
    }
}

/// The record of one listed Lease, or why it is not believed.
fn record_of(lease: &Object<ReplicaLease>) -> Result<ReplicaRecord, String> {
    let name = lease.name().ok_or("no metadata.name")?;
    // The exact id is the holder's; a Lease made by hand may lack one, and
    // then the name (of an id that needs no mapping) says it.
    let id = match lease.get("/spec/holderIdentity") {
        Some(Value::String(holder)) => holder.clone(),
        None | Some(Value::Null) => name.strip_prefix(REPLICA_LEASE_PREFIX).unwrap_or(name).to_string(),
        Some(other) => return Err(format!("spec.holderIdentity is not a string: {other}")),
    };
    // A record copied to another replica's Lease, or a holder changed by
    // hand, must not be taken for that replica.
    let expected = replica_lease_name(&id).map_err(|e| e.to_string())?;
    if expected != name {
        return Err(format!("replica {id:?} would be announced in Lease {expected}, not in this one"));
    }
    let text = match lease.annotation(REPLICA_LABEL) {
        Some(Value::String(text)) => text,
        None => return Err(format!("no {REPLICA_LABEL} annotation")),
        Some(other) => return Err(format!("annotation {REPLICA_LABEL} is not a string: {other}")),
    };
    ReplicaRecord::from_json(&id, text.as_bytes()).map_err(|e| e.to_string())
}

impl KubernetesRegistry {
    fn replica_leases(&self) -> Api<Object<ReplicaLease>> {
        Api::namespaced(self.client.client(), REPLICA_NAMESPACE)
    }
}

impl ReplicaStore for KubernetesRegistry {
    async fn announce_replica(&mut self, record: &ReplicaRecord) -> Result<(), RegistryError> {
        let name = replica_lease_name(&record.id)?;
        let what = format!("announcing tunnel replica {:?} in Lease {REPLICA_NAMESPACE}/{name}", record.id);
        let now = SystemTime::now();
        let renewed = micro_time(now);
        let duration = i32::try_from(record.remaining(now)).unwrap_or(i32::MAX);
        let labels = json!({ REPLICA_LABEL: "true" });
        let annotations = json!({ REPLICA_LABEL: record.to_json() });
        let patch = json!({
            "metadata": { "labels": labels, "annotations": annotations },
            "spec": { "holderIdentity": record.id, "leaseDurationSeconds": duration, "renewTime": renewed },
        });
        let api = self.replica_leases();
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        let patch_it = || call(&what, api.patch(&name, &params, &patch));
        match patch_it().await {
            Ok(_) => return Ok(()),
            Err(KubeError::NotFound { .. }) => {}
            Err(error) => return Err(replica_error(error)),
        }
        // First announcement: the Lease is made whole (Object keeps only the
        // fields netd reads, so the create goes through a dynamic object of
        // the same resource).
        let resource = ApiResource::erase::<Object<ReplicaLease>>(&());
        let created: Api<DynamicObject> = Api::namespaced_with(self.client.client(), REPLICA_NAMESPACE, &resource);
        let mut lease = DynamicObject::new(&name, &resource).within(REPLICA_NAMESPACE).data(json!({
            "spec": {
                "holderIdentity": record.id,
                "leaseDurationSeconds": duration,
                "acquireTime": renewed,
                "renewTime": renewed,
            },
        }));
        lease.metadata.labels = Some([(REPLICA_LABEL.to_string(), "true".to_string())].into());
        lease.metadata.annotations = Some([(REPLICA_LABEL.to_string(), record.to_json())].into());
        match call(&what, created.create(&PostParams::default(), &lease)).await {
            Ok(_) => Ok(()),
            // Made between our patch and create (this replica's previous
            // process, still announcing): ours is the newer record.
            Err(KubeError::Conflict { .. }) => patch_it().await.map(|_| ()).map_err(replica_error),
            Err(error) => Err(replica_error(error)),
        }
    }

    async fn replicas(&mut self, now: SystemTime) -> Result<Vec<ReplicaRecord>, RegistryError> {
        let what = format!("listing tunnel replica Leases in {REPLICA_NAMESPACE}");
        let params = ListParams::default().labels(&format!("{REPLICA_LABEL}=true"));
        let list = call(&what, self.replica_leases().list(&params)).await.map_err(replica_error)?;
        let mut records = Vec::new();
        for lease in &list.items {
            match record_of(lease) {
                Ok(record) if record.is_live(now) => records.push(record),
                Ok(_) => {}
                Err(reason) => {
                    let name = lease.name().unwrap_or("?");
                    tracing::warn!(lease = %name, namespace = REPLICA_NAMESPACE, %reason, "skipping tunnel replica Lease");
                }
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    async fn withdraw_replica(&mut self, id: &str) -> Result<bool, RegistryError> {
        let name = replica_lease_name(id)?;
        let what = format!("withdrawing tunnel replica {id:?}: deleting Lease {REPLICA_NAMESPACE}/{name}");
        match call(&what, self.replica_leases().delete(&name, &DeleteParams::default())).await {
            Ok(_) => Ok(true),
            Err(KubeError::NotFound { .. }) => Ok(false),
            Err(error) => Err(replica_error(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn ids_map_to_valid_distinct_lease_names() {
        assert_eq!(replica_lease_name("cloud-1.example-10262").unwrap(), "netd-tunnel-replica-cloud-1.example-10262");
        let mapped = replica_lease_name("Cloud_1.example").unwrap();
        assert!(mapped.starts_with("netd-tunnel-replica-cloud-1-example-"), "{mapped}");
        assert_eq!(mapped.len(), "netd-tunnel-replica-cloud-1-example-".len() + HASH_DIGITS);
        assert_eq!(replica_lease_name("Cloud_1.example").unwrap(), mapped, "deterministic");
        // Differing only in case or punctuation: still distinct Leases.
        let names: std::collections::BTreeSet<String> = ["cloud_1", "Cloud_1", "CLOUD-1", "cloud-1", "cloud.1"]
            .iter()
            .map(|id| replica_lease_name(id).unwrap())
            .collect();
        assert_eq!(names.len(), 5, "{names:?}");
        for id in ["a..b", ".a", "a.", "-a", "a-", "a.-b", "_", "X", &"x".repeat(253), &"Y_".repeat(126)] {
            let name = replica_lease_name(id).unwrap();
            assert!(is_dns_subdomain(&name), "{id:?} -> {name:?}");
            assert!(name.starts_with(REPLICA_LEASE_PREFIX));
        }
        for bad in ["", "a/b", "a b"] {
            assert!(replica_lease_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn micro_times_have_six_digits() {
        let at = UNIX_EPOCH + Duration::from_micros(1_714_564_800_000_042);
        assert_eq!(micro_time(at), "2024-05-01T12:00:00.000042Z");
        assert_eq!(rfc3339::parse(&micro_time(at)), Some(at));
    }

    #[test]
    fn listed_leases_are_believed_only_when_consistent() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let record = ReplicaRecord::new("Edge_A", "10.0.0.1:10265", false, Duration::from_secs(15), now);
        let name = replica_lease_name("Edge_A").unwrap();
        let lease = |name: &str, holder: Value, annotation: Value| {
            Object::<ReplicaLease>::from_value(json!({
                "metadata": { "name": name, "annotations": { REPLICA_LABEL: annotation, "other": "x" } },
                "spec": { "holderIdentity": holder },
            }))
        };
        assert_eq!(record_of(&lease(&name, json!("Edge_A"), json!(record.to_json()))), Ok(record.clone()));
        // The kept annotation is the one the registry writes.
        assert!(lease(&name, json!("Edge_A"), json!("t")).annotation(REPLICA_LABEL).is_some());
        let skipped = |lease: Object<ReplicaLease>| record_of(&lease).unwrap_err();
        assert!(skipped(lease(&name, json!("Edge_A"), json!("{garbage"))).contains("unusable"));
        assert!(skipped(lease(&name, json!("Edge_A"), json!(7))).contains("not a string"));
        assert!(skipped(lease("netd-tunnel-replica-other", json!("Edge_A"), json!(record.to_json())))
            .contains("would be announced in Lease"));
        assert!(skipped(lease(&name, json!("edge-b"), json!(record.to_json()))).contains("would be announced"));
        // Without a holder, a plain name gives the id.
        let plain = ReplicaRecord::new("edge-b", "10.0.0.2:10265", true, Duration::from_secs(15), now);
        assert_eq!(record_of(&lease("netd-tunnel-replica-edge-b", Value::Null, json!(plain.to_json()))), Ok(plain));
    }
}
