//! Several tunnel server replicas, every agent linked to each of them.
//!
//! A replica introduces itself on every new link with a *status* stream
//! (server → agent, like every stream here): its identity, how many replicas
//! serve the fleet, and whether it is draining. The agent answers `200` to
//! keep the link, or `409` when it already holds a live link to that
//! replica (it dialled a load-balanced address and landed on a replica it
//! has): the server then closes the link without ever routing to it, so a
//! duplicate never displaces the link that carries the node's streams.
//! The same stream, sent again, tells linked agents the replica is draining.
//!
//! The agent keeps dialling (with full jitter, no API calls) until it holds
//! as many distinct live replicas as the latest status says there are
//! ([`LinkSet`]); behind one address with nothing to read, that is how it
//! ends up linked to all of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use http::{Method, Request, StatusCode};

/// Path of the status stream.
pub const STATUS_PATH: &str = "/netd/replica";
/// Header naming the replica.
pub const ID_HEADER: &str = "x-netd-replica";
/// Header carrying how many replicas serve the fleet.
pub const COUNT_HEADER: &str = "x-netd-replicas";
/// Header set to `1` while the replica drains.
pub const DRAINING_HEADER: &str = "x-netd-draining";
/// Most replicas an agent links to: a bound on what a status may ask of it.
pub const MAX_REPLICAS: u32 = 64;
/// Longest replica identity (a pod or host name fits).
pub const MAX_ID_LEN: usize = 253;

/// Errors reading or writing a replica status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// The identity is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("replica identity {0:?} must be 1-253 characters of A-Z, a-z, 0-9, '.', '_' or '-'")]
    Id(String),
    /// The replica count is missing, not a number or out of range.
    #[error("replica count {0:?} must be a number from 1 to 64")]
    Count(String),
    /// The draining flag is neither `0` nor `1`.
    #[error("draining flag {0:?} must be 0 or 1")]
    Draining(String),
    /// A header is missing.
    #[error("replica status without its {0} header")]
    Missing(&'static str),
}

/// What a replica says of itself on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Its identity (unique among the replicas: the pod or host name).
    pub id: String,
    /// How many replicas serve the fleet.
    pub replicas: u32,
    /// It takes no new streams and closes once its streams finish.
    pub draining: bool,
}

/// A checked replica identity.
pub fn check_id(id: &str) -> Result<(), ReplicaError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(ReplicaError::Id(id.to_string()))
    }
}

/// A checked replica count.
pub fn check_count(count: u32) -> Result<(), ReplicaError> {
    if (1..=MAX_REPLICAS).contains(&count) {
        Ok(())
    } else {
        Err(ReplicaError::Count(count.to_string()))
    }
}

impl ReplicaStatus {
    /// The status stream's request (no body).
    pub fn to_request(&self) -> Result<Request<()>, ReplicaError> {
        check_id(&self.id)?;
        check_count(self.replicas)?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("https://netd-tunnel{STATUS_PATH}"))
            .header(ID_HEADER, &self.id)
            .header(COUNT_HEADER, self.replicas.to_string())
            .header(DRAINING_HEADER, if self.draining { "1" } else { "0" })
            .body(());
        request.map_err(|_| ReplicaError::Id(self.id.clone()))
    }

    /// Whether a request a server sent is a status stream (anything else on
    /// a link is a `CONNECT`).
    pub fn is_status<B>(request: &Request<B>) -> bool {
        request.method() == Method::POST && request.uri().path() == STATUS_PATH
    }

    /// The status as a [`crate::mux`] OPEN target:
    /// `/netd/replica?x-netd-replica=<id>&x-netd-replicas=<n>&x-netd-draining=<0|1>`,
    /// the request's headers as query pairs (an identity needs no escaping).
    pub fn to_target(&self) -> Result<String, ReplicaError> {
        check_id(&self.id)?;
        check_count(self.replicas)?;
        let draining = if self.draining { "1" } else { "0" };
        Ok(format!(
            "{STATUS_PATH}?{ID_HEADER}={}&{COUNT_HEADER}={}&{DRAINING_HEADER}={draining}",
            self.id, self.replicas
        ))
    }

    /// Whether a [`crate::mux`] OPEN target is a status (anything else is
    /// an `ip:port` to dial).
    pub fn is_status_target(target: &str) -> bool {
        target.starts_with(STATUS_PATH)
    }

    /// Reads a status from its OPEN target, checked as [`Self::from_request`] does.
    pub fn from_target(target: &str) -> Result<Self, ReplicaError> {
        let query = target.strip_prefix(STATUS_PATH).and_then(|rest| rest.strip_prefix('?')).unwrap_or("");
        let value = |name: &'static str| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
                .ok_or(ReplicaError::Missing(name))
        };
        Self::checked(value(ID_HEADER)?, value(COUNT_HEADER)?, value(DRAINING_HEADER)?)
    }

    fn checked(id: &str, count: &str, draining: &str) -> Result<Self, ReplicaError> {
        check_id(id)?;
        let replicas = count.parse::<u32>().map_err(|_| ReplicaError::Count(count.to_string()))?;
        check_count(replicas)?;
        let draining = match draining {
            "0" => false,
            "1" => true,
            other => return Err(ReplicaError::Draining(other.to_string())),
        };
        Ok(Self { id: id.to_string(), replicas, draining })
    }

    /// Reads a status stream's headers.
    pub fn from_request<B>(request: &Request<B>) -> Result<Self, ReplicaError> {
        let header = |name: &'static str| {
            request.headers().get(name).ok_or(ReplicaError::Missing(name)).map(|v| v.to_str().unwrap_or("\u{fffd}"))
        };
        Self::checked(header(ID_HEADER)?, header(COUNT_HEADER)?, header(DRAINING_HEADER)?)
    }
}

/// The agent's answer to a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The link is this agent's link to that replica now.
    Kept,
    /// Another live link already goes to that replica: this one closes.
    Duplicate,
}

impl Claim {
    /// The status code that carries it.
    pub fn status(self) -> StatusCode {
        match self {
            Self::Kept => StatusCode::OK,
            Self::Duplicate => StatusCode::CONFLICT,
        }
    }
}

/// How many replicas the agent holds, and how many there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Distinct replicas with a live link that is not draining.
    pub live: usize,
    /// Replicas the latest status says serve the fleet (1 until one says).
    pub expected: u32,
}

impl Held {
    /// Fewer live replicas than there are: dial for more.
    pub fn short(self) -> bool {
        self.live < self.expected as usize
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    link: u64,
    draining: bool,
}

/// An agent's links by replica: which link goes where, and whether it
/// should dial for more. Links are named by a serial the agent gives them.
#[derive(Debug)]
pub struct LinkSet {
    by_replica: Mutex<HashMap<String, Entry>>,
    held: tokio::sync::watch::Sender<Held>,
    serial: AtomicU64,
}

impl Default for LinkSet {
    fn default() -> Self {
        Self {
            by_replica: Mutex::default(),
            held: tokio::sync::watch::Sender::new(Held { live: 0, expected: 1 }),
            serial: AtomicU64::new(0),
        }
    }
}

impl LinkSet {
    /// A serial for a new link.
    pub fn new_link(&self) -> u64 {
        self.serial.fetch_add(1, Ordering::Relaxed)
    }

    /// Link `link` said `status`: kept, or a duplicate of a live link.
    pub fn claim(&self, link: u64, status: &ReplicaStatus) -> Claim {
        let mut by_replica = self.by_replica.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = by_replica.get(&status.id) {
            // A draining replica closes its listeners first, so a new link
            // reaching it is rare; when one does, the newer link is kept.
            if entry.link != link && !entry.draining {
                return Claim::Duplicate;
            }
        }
        // A link speaks for one replica: whatever it said before is replaced.
        by_replica.retain(|id, entry| entry.link != link || *id == status.id);
        by_replica.insert(status.id.clone(), Entry { link, draining: status.draining });
        let live = by_replica.values().filter(|entry| !entry.draining).count();
        self.held.send_replace(Held { live, expected: status.replicas });
        Claim::Kept
    }

    /// Link `link` is gone.
    pub fn release(&self, link: u64) {
        let mut by_replica = self.by_replica.lock().unwrap_or_else(PoisonError::into_inner);
        by_replica.retain(|_, entry| entry.link != link);
        let live = by_replica.values().filter(|entry| !entry.draining).count();
        self.held.send_modify(|held| held.live = live);
    }

    /// What is held now.
    pub fn held(&self) -> Held {
        *self.held.borrow()
    }

    /// Follows what is held.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<Held> {
        self.held.subscribe()
    }

    /// The replicas linked now, sorted, with their draining flag.
    pub fn replicas(&self) -> Vec<(String, bool)> {
        let by_replica = self.by_replica.lock().unwrap_or_else(PoisonError::into_inner);
        let mut replicas: Vec<_> = by_replica.iter().map(|(id, entry)| (id.clone(), entry.draining)).collect();
        replicas.sort();
        replicas
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn status(id: &str, replicas: u32, draining: bool) -> ReplicaStatus {
        ReplicaStatus { id: id.into(), replicas, draining }
    }

    #[test]
    fn a_status_round_trips_through_its_request() {
        for sent in [status("tunnel-0", 2, false), status("cloud-a.example", 64, true)] {
            let request = sent.to_request().unwrap();
            assert!(ReplicaStatus::is_status(&request));
            assert_eq!(request.headers()[ID_HEADER], sent.id.as_str());
            assert_eq!(ReplicaStatus::from_request(&request).unwrap(), sent);
        }
    }

    #[test]
    fn a_status_round_trips_through_its_mux_target() {
        for sent in [status("tunnel-0", 2, false), status("cloud-a.example", 64, true)] {
            let target = sent.to_target().unwrap();
            assert!(ReplicaStatus::is_status_target(&target));
            assert_eq!(ReplicaStatus::from_target(&target).unwrap(), sent);
        }
        assert_eq!(
            status("tunnel-0", 2, true).to_target().unwrap(),
            "/netd/replica?x-netd-replica=tunnel-0&x-netd-replicas=2&x-netd-draining=1"
        );
        assert!(!ReplicaStatus::is_status_target("10.0.0.1:10250"));
        let from = |target: &str| ReplicaStatus::from_target(target).unwrap_err();
        assert_eq!(from("/netd/replica"), ReplicaError::Missing(ID_HEADER));
        assert_eq!(from("/netd/replica?x-netd-replica=a&x-netd-replicas=2"), ReplicaError::Missing(DRAINING_HEADER));
        assert_eq!(
            from("/netd/replica?x-netd-replica=a b&x-netd-replicas=2&x-netd-draining=0"),
            ReplicaError::Id("a b".into())
        );
        assert_eq!(
            from("/netd/replica?x-netd-replica=a&x-netd-replicas=99&x-netd-draining=0"),
            ReplicaError::Count("99".into())
        );
        assert_eq!(
            from("/netd/replica?x-netd-replica=a&x-netd-replicas=2&x-netd-draining=maybe"),
            ReplicaError::Draining("maybe".into())
        );
    }

    #[test]
    fn bad_statuses_are_refused_with_what_is_wrong() {
        assert_eq!(status("", 1, false).to_request().unwrap_err(), ReplicaError::Id(String::new()));
        assert!(matches!(status("a b", 1, false).to_request(), Err(ReplicaError::Id(_))));
        assert!(matches!(status(&"a".repeat(254), 1, false).to_request(), Err(ReplicaError::Id(_))));
        assert_eq!(status("a", 0, false).to_request().unwrap_err(), ReplicaError::Count("0".into()));
        assert_eq!(status("a", 65, false).to_request().unwrap_err(), ReplicaError::Count("65".into()));
        let with = |count: &str, draining: &str| {
            let mut request = status("a", 1, false).to_request().unwrap();
            request.headers_mut().insert(COUNT_HEADER, count.parse().unwrap());
            request.headers_mut().insert(DRAINING_HEADER, draining.parse().unwrap());
            ReplicaStatus::from_request(&request)
        };
        assert_eq!(with("two", "0").unwrap_err(), ReplicaError::Count("two".into()));
        assert_eq!(with("-1", "0").unwrap_err(), ReplicaError::Count("-1".into()));
        assert_eq!(with("1000", "0").unwrap_err(), ReplicaError::Count("1000".into()));
        assert_eq!(with("2", "yes").unwrap_err(), ReplicaError::Draining("yes".into()));
        let mut request = status("a", 1, false).to_request().unwrap();
        request.headers_mut().remove(COUNT_HEADER);
        assert_eq!(ReplicaStatus::from_request(&request).unwrap_err(), ReplicaError::Missing(COUNT_HEADER));
        let connect = Request::builder().method(Method::CONNECT).uri("10.0.0.1:10250").body(()).unwrap();
        assert!(!ReplicaStatus::is_status(&connect));
    }

    #[test]
    fn one_live_link_per_replica_until_all_are_held() {
        let set = LinkSet::default();
        assert_eq!(set.held(), Held { live: 0, expected: 1 });
        assert_eq!(set.claim(1, &status("a", 2, false)), Claim::Kept);
        assert!(set.held().short(), "one of two");
        // Through the load balancer again, onto the same replica.
        assert_eq!(set.claim(2, &status("a", 2, false)), Claim::Duplicate);
        assert_eq!(set.claim(3, &status("b", 2, false)), Claim::Kept);
        assert_eq!(set.held(), Held { live: 2, expected: 2 });
        // A status again on the same link: not a duplicate of itself.
        assert_eq!(set.claim(1, &status("a", 2, false)), Claim::Kept);
        // b drains: short again, and a new link to b (should one get
        // through) is kept.
        assert_eq!(set.claim(3, &status("b", 2, true)), Claim::Kept);
        assert_eq!(set.held(), Held { live: 1, expected: 2 });
        assert_eq!(set.replicas(), vec![("a".into(), false), ("b".into(), true)]);
        assert_eq!(set.claim(4, &status("b", 2, false)), Claim::Kept);
        assert_eq!(set.held().live, 2);
        // Links go: the old b link's end does not drop the new one's claim.
        set.release(3);
        assert_eq!(set.held().live, 2);
        set.release(1);
        assert_eq!(set.held(), Held { live: 1, expected: 2 });
        // Scaled down to one: the latest status is what counts.
        assert_eq!(set.claim(4, &status("b", 1, false)), Claim::Kept);
        assert!(!set.held().short());
    }
}
