//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's
//! `leaderelection` does it, so that of several `netd-controller` replicas
//! exactly one writes cluster state.
//!
//! - A candidate takes the Lease when it does not exist, when it is its own,
//!   or when the holder's record has not changed for `lease_duration` **as
//!   measured on the candidate's own clock** (the time it first saw that
//!   record): clocks of different machines are never compared, only the
//!   record's identity (holder, renew time, resource version).
//! - Every write is an update with the `resourceVersion` read, so two
//!   candidates that both find the Lease expired cannot both take it: one
//!   update wins, the other gets a conflict and stays a follower.
//! - The leader renews every `retry_period`; when it has not renewed for
//!   `renew_deadline` (less than `lease_duration`, so it stops before anybody
//!   else may start) it has lost the lease and must stop writing —
//!   [`LeaderElector::hold`] returns, and `netd-controller` exits so its
//!   restart starts clean.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::time::Instant;

use netd_kube::{call, KubeClient, KubeError};

/// client-go's defaults (kube-controller-manager's `--leader-elect-*`).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// How long a leader keeps trying to renew before it gives up.
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often candidates try and leaders renew.
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Why leader election cannot run.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// Durations that would let two leaders overlap.
    #[error("leader election: {0}")]
    BadTiming(String),
    /// The Lease could not be read or written, for a reason retrying will not fix.
    #[error("leader election: {0}")]
    Kube(#[from] KubeError),
}

/// The election's settings.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (unique among candidates: pod name, host + pid).
    pub identity: String,
    /// How long a silent leader's record is honoured.
    pub lease_duration: Duration,
    /// How long a leader tries to renew before it stops acting.
    pub renew_deadline: Duration,
    /// Attempt interval.
    pub retry_period: Duration,
}

impl ElectionConfig {
    /// The settings with client-go's default timing.
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    /// client-go's rule: lease duration > renew deadline > retry period
    /// (with a margin for the retry's jitter).
    pub fn check(&self) -> Result<(), LeaderError> {
        if self.identity.is_empty() {
            return Err(LeaderError::BadTiming("the identity is empty".into()));
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(LeaderError::BadTiming(format!(
                "the lease duration ({:?}) must be longer than the renew deadline ({:?})",
                self.lease_duration, self.renew_deadline
            )));
        }
        if self.renew_deadline.as_secs_f64() <= 1.2 * self.retry_period.as_secs_f64() {
            return Err(LeaderError::BadTiming(format!(
                "the renew deadline ({:?}) must be longer than 1.2 x the retry period ({:?})",
                self.renew_deadline, self.retry_period
            )));
        }
        Ok(())
    }
}

/// What a candidate last saw of the Lease, and when (its own clock).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<String>,
    resource_version: Option<String>,
}

/// One replica's side of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    config: ElectionConfig,
    observed: Option<(Observed, Instant)>,
    what: String,
}

impl LeaderElector {
    /// An elector on `client` (nothing contacted yet).
    pub fn new(client: &KubeClient, config: ElectionConfig) -> Result<Self, LeaderError> {
        config.check()?;
        let what = format!("lease {}/{}", config.namespace, config.name);
        Ok(Self { api: Api::namespaced(client.client(), &config.namespace), config, observed: None, what })
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// Waits until this replica holds the Lease. Transient API errors are
    /// retried every retry period.
    pub async fn acquire(&mut self) -> Result<(), LeaderError> {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.config.identity, "leader election: became the leader ({})", self.what);
                    return Ok(());
                }
                Ok(false) => {}
                Err(error)
                    if error.is_transient()
                        || matches!(error, KubeError::Refused { .. } | KubeError::Conflict { .. }) =>
                {
                    tracing::warn!("leader election: {error}; retrying");
                }
                Err(error) => return Err(error.into()),
            }
            tokio::time::sleep(jittered(self.config.retry_period)).await;
        }
    }

    /// Renews the Lease every retry period while this replica leads;
    /// returns when it could not renew within the renew deadline (or
    /// another replica holds it): from then on this replica must not write.
    pub async fn hold(&mut self) -> LeaderLost {
        let mut last_renewed = Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = Instant::now(),
                Ok(false) => return LeaderLost(format!("another replica holds {}", self.what)),
                Err(error) => tracing::warn!("leader election: renewing: {error}"),
            }
            if last_renewed.elapsed() >= self.config.renew_deadline {
                return LeaderLost(format!(
                    "{} not renewed for {:?} (the renew deadline)",
                    self.what, self.config.renew_deadline
                ));
            }
        }
    }

    /// Gives the Lease up (on a clean shutdown), so another replica takes
    /// over at once instead of after the lease duration.
    pub async fn release(&mut self) -> Result<(), KubeError> {
        let mut lease = call(&self.what, self.api.get(&self.config.name)).await?;
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        call(&self.what, self.api.replace(&self.config.name, &PostParams::default(), &lease)).await?;
        Ok(())
    }

    /// One round: true when this replica holds the Lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, KubeError> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let duration_secs = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let existing = match call(&self.what, self.api.get(&self.config.name)).await {
            Ok(lease) => Some(lease),
            Err(KubeError::NotFound { .. }) => None,
            Err(error) => return Err(error),
        };
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match call(&self.what, self.api.create(&PostParams::default(), &lease)).await {
                Ok(_) => Ok(true),
                // Someone else created it first.
                Err(KubeError::Conflict { .. }) => Ok(false),
                Err(error) => Err(error),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let observed = Observed {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            resource_version: lease.metadata.resource_version.clone(),
        };
        let ours = observed.holder.as_deref() == Some(self.config.identity.as_str());
        if !ours {
            let first_seen = match &self.observed {
                Some((seen, at)) if *seen == observed => *at,
                _ => Instant::now(),
            };
            self.observed = Some((observed.clone(), first_seen));
            // The holder's own duration, as client-go honours it.
            let holder_duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.config.lease_duration, Duration::from_secs);
            if observed.holder.is_some() && first_seen.elapsed() < holder_duration {
                return Ok(false);
            }
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(self.config.identity.clone());
        spec.lease_duration_seconds = Some(duration_secs);
        spec.renew_time = Some(now);
        match call(&self.what, self.api.replace(&self.config.name, &PostParams::default(), &lease)).await {
            Ok(_) => {
                self.observed = None;
                Ok(true)
            }
            // The resourceVersion moved: another replica wrote first.
            Err(KubeError::Conflict { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }
}

/// Why a leader stopped leading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderLost(pub String);

impl std::fmt::Display for LeaderLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lost leadership: {}", self.0)
    }
}

/// `period` plus up to 20 % (client-go's jitter factor 1.2), so candidates
/// that started together do not keep colliding.
fn jittered(period: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    period.mul_f64(1.0 + 0.2 * f64::from(byte[0]) / 255.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_that_lets_leaders_overlap_is_refused() {
        let good = ElectionConfig::new("kube-system", "netd-controller", "a");
        assert!(good.check().is_ok());
        let overlap = ElectionConfig { renew_deadline: Duration::from_secs(15), ..good.clone() };
        assert!(overlap.check().unwrap_err().to_string().contains("longer than the renew deadline"));
        let tight = ElectionConfig { retry_period: Duration::from_secs(9), ..good.clone() };
        assert!(tight.check().unwrap_err().to_string().contains("1.2 x the retry period"));
        assert!(ElectionConfig { identity: String::new(), ..good }.check().is_err());
    }
}
