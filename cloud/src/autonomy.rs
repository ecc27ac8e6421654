//! `netd-autonomy`: switch a node's autonomy on or off in any registry, and
//! say what it means for the node now (SPEC §4).
//!
//! [`run`] does one [`Action`] against a [`Registry`] and returns an
//! [`Outcome`]: what was written, and a [`Report`] of the node as the
//! registry holds it afterwards. The report is text for people
//! ([`Outcome::text`]) or JSON for tools ([`Outcome::json`], versioned by
//! [`JSON_VERSION`]).
//!
//! What autonomy implies differs by registry, and the report says so rather
//! than promising the same everywhere:
//!
//! - **lease**: on Kubernetes the lease is the node's pod CIDR, which stays
//!   with the Node object (kube-controller-manager frees it only when the
//!   Node is deleted), autonomous or not (with `netd-controller
//!   --allocate-node-cidrs` it outlives the Node). On etcd the lease key
//!   lapses 24 h after its last renewal (etcd deletes it with its etcd
//!   lease), but an autonomous node's subnet is reserved for it
//!   (`reserved/<node>`), so no netd node takes it. The embedded registry
//!   keeps an autonomous node's lapsed lease. Both keep the subnet for ever,
//!   or for the bound after the last renewal. A non-autonomous node's lapsed
//!   lease goes (etcd: with its key; embedded: when the next node takes a
//!   lease).
//! - **eviction**: only Kubernetes has pods. There `netd-controller`, while
//!   it runs, lengthens the `not-ready`/`unreachable` tolerations of the pods
//!   of an autonomous node (to the bound, or with no limit); without it the
//!   cluster's defaults apply (300 s after the taint).
//! - **peers**: netd peers keep an autonomous node's routes after its lease
//!   is gone, until the node is back or another node takes its subnet; they
//!   do not apply a time bound. flannel peers do not read autonomy.

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use netd_model::autonomy::{format_go_duration, parse_go_duration, Autonomy, DurationError};
use netd_model::rfc3339;
use netd_registry::{
    AutonomyChange, NodeAutonomy, NodeHeartbeat, NodeLeaseState, Registry, RegistryError, RegistrySpec,
};

/// The version of [`Outcome::json`]'s layout; a change that removes or
/// retypes a field bumps it.
pub const JSON_VERSION: u32 = 1;

/// kube-controller-manager's default `--node-monitor-grace-period`: a node
/// whose heartbeat is older is taken as cut off.
pub const NODE_MONITOR_GRACE: Duration = Duration::from_secs(40);

/// Errors of the command.
#[derive(Debug, thiserror::Error)]
pub enum AutonomyError {
    /// The registry refused or failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A `--duration` that is not a Go duration.
    #[error("bad duration {text:?}: {reason}")]
    BadDuration {
        /// The text given.
        text: String,
        /// Why it does not parse.
        reason: DurationError,
    },
}

/// Which kind of registry, for what autonomy implies there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryKind {
    /// The embedded SQLite registry.
    Embedded,
    /// etcd in flannel's layout.
    Etcd,
    /// Node objects of a Kubernetes cluster.
    Kubernetes,
}

impl RegistryKind {
    /// The kind `spec` names.
    pub fn of(spec: &RegistrySpec) -> Self {
        match spec {
            RegistrySpec::Embedded(_) => Self::Embedded,
            RegistrySpec::Etcd(_) => Self::Etcd,
            RegistrySpec::Kubernetes(_) => Self::Kubernetes,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Etcd => "etcd",
            Self::Kubernetes => "kubernetes",
        }
    }
}

/// The autonomy `--duration` asks for: none or `0` is no time limit, else
/// a Go duration (`90m`, `2h`, `1h30m`).
pub fn autonomy_for(duration: Option<&str>) -> Result<Autonomy, AutonomyError> {
    let Some(text) = duration else { return Ok(Autonomy::Forever) };
    match parse_go_duration(text) {
        Ok(d) if d.is_zero() => Ok(Autonomy::Forever),
        Ok(d) => Ok(Autonomy::For(d)),
        Err(reason) => Err(AutonomyError::BadDuration { text: text.to_string(), reason }),
    }
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Set the node's autonomy ([`Autonomy::Off`] is `unset`).
    Set {
        /// The node.
        node: String,
        /// What to set.
        autonomy: Autonomy,
    },
    /// Only read it.
    Status {
        /// The node.
        node: String,
    },
}

/// What [`run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// What was written (`None` for [`Action::Status`]).
    pub changes: Option<Vec<AutonomyChange>>,
    /// The node afterwards.
    pub report: Report,
}

/// Does `action` against `registry` (of kind `kind`), then reads the node
/// back for the report.
pub async fn run<R: Registry>(registry: &mut R, kind: RegistryKind, action: Action) -> Result<Outcome, AutonomyError> {
    let (node, changes) = match action {
        Action::Set { node, autonomy } => {
            let changes = registry.set_autonomy(&node, autonomy).await?;
            (node, Some(changes))
        }
        Action::Status { node } => (node, None),
    };
    let state = registry.node_autonomy(&node).await?;
    let report = Report { kind, registry: registry.describe(), node: state, now: SystemTime::now() };
    Ok(Outcome { changes, report })
}

impl Outcome {
    /// For people: the changes, one a line, then the report.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for change in self.changes.iter().flatten() {
            match &change.value {
                Some(value) => text.push_str(&format!("wrote {}={value}\n", change.field)),
                None => text.push_str(&format!("removed {}\n", change.field)),
            }
        }
        text.push_str(&self.report.text());
        text
    }

    /// For tools: the report's JSON with `changes` (`null` for a status).
    pub fn json(&self) -> Value {
        let mut value = self.report.json();
        value["changes"] = match &self.changes {
            None => Value::Null,
            Some(changes) => changes.iter().map(|c| json!({ "field": c.field, "value": c.value })).collect(),
        };
        value
    }
}

/// A node's autonomy and what it implies now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The registry's kind.
    pub kind: RegistryKind,
    /// The registry, as [`Registry::describe`] gives it.
    pub registry: String,
    /// What the registry holds.
    pub node: NodeAutonomy,
    /// When it was read: ages and deadlines are reckoned from here.
    pub now: SystemTime,
}

/// What the autonomy implies, one sentence each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Implications {
    /// The node's health as the registry sees it (Kubernetes only).
    pub node: Option<String>,
    /// What happens to the lease while the node is silent.
    pub lease: String,
    /// What happens to its pods.
    pub eviction: String,
    /// What its peers do with its routes.
    pub peers: String,
}

/// `d` to whole seconds, Go-style (`1h2m3s`).
fn span(d: Duration) -> String {
    format_go_duration(Duration::from_secs(d.as_secs()))
}

/// `at 2026-12-01T18:00:00Z (in 2h0m0s)` or `(5m0s ago)`.
fn when(at: SystemTime, now: SystemTime) -> String {
    let relative = match at.duration_since(now) {
        Ok(ahead) => format!("in {}", span(ahead)),
        Err(behind) => format!("{} ago", span(behind.duration())),
    };
    format!("{} ({relative})", rfc3339::format(at))
}

impl Report {
    /// How long the node has been silent by its kubelet heartbeat, when it
    /// is older than [`NODE_MONITOR_GRACE`] (Kubernetes only).
    pub fn silent_since(&self) -> Option<SystemTime> {
        let state = self.node.kubernetes.as_ref()?;
        let renewed = match &state.heartbeat {
            NodeHeartbeat::Renewed { renewed: Some(at), .. } => *at,
            // Never renewed: the Ready heartbeat is the best there is.
            _ => state.ready.as_ref()?.heartbeat?,
        };
        let age = self.now.duration_since(renewed).unwrap_or_default();
        (age > NODE_MONITOR_GRACE).then_some(renewed)
    }

    /// What the autonomy implies now; see the module docs.
    pub fn implications(&self) -> Implications {
        Implications {
            node: self.health(),
            lease: self.lease_line(),
            eviction: self.eviction_line(),
            peers: self.peers_line(),
        }
    }

    fn health(&self) -> Option<String> {
        let state = self.node.kubernetes.as_ref()?;
        let mut parts = Vec::new();
        match &state.ready {
            Some(ready) => {
                let mut text = format!("Ready={}", ready.status);
                if let Some(reason) = &ready.reason {
                    text.push_str(&format!(" ({reason})"));
                }
                if let Some(since) = ready.since {
                    text.push_str(&format!(" since {}", when(since, self.now)));
                }
                parts.push(text);
            }
            None => parts.push("no Ready condition reported".into()),
        }
        let lease = format!("kube-node-lease/{}", self.node.node);
        parts.push(match &state.heartbeat {
            NodeHeartbeat::Renewed { renewed: Some(at), .. } => {
                format!("heartbeat {lease} renewed {}", when(*at, self.now))
            }
            NodeHeartbeat::Renewed { renewed: None, .. } => format!("heartbeat {lease} never renewed"),
            NodeHeartbeat::Missing => format!("no heartbeat Lease {lease} (no kubelet has run there)"),
            NodeHeartbeat::Unreadable(reason) => format!("heartbeat {lease} unreadable: {reason}"),
        });
        parts.push(match (self.silent_since(), self.node.autonomy) {
            (None, _) => "connected".into(),
            (Some(at), Autonomy::For(bound)) => {
                let end = at + bound;
                let verdict = if end > self.now { "ends" } else { "ended" };
                format!(
                    "cut off since {}; the {} bound {verdict} {}",
                    rfc3339::format(at),
                    span(bound),
                    when(end, self.now)
                )
            }
            (Some(at), _) => format!("cut off since {}", when(at, self.now)),
        });
        Some(parts.join("; "))
    }

    fn lease_line(&self) -> String {
        let on = self.node.autonomy.is_on();
        let Some(NodeLeaseState { subnet, public_ip, expires_at, kept_while_autonomous }) = &self.node.lease else {
            return match self.kind {
                RegistryKind::Kubernetes => {
                    "none: the Node has no pod CIDR (kube-controller-manager assigns one)".into()
                }
                _ => "none held (the node has not joined, or its lease lapsed and was removed)".into(),
            };
        };
        let ip = public_ip.map(|ip| format!(" (public IP {ip})")).unwrap_or_default();
        match (self.kind, expires_at) {
            (RegistryKind::Kubernetes, _) => format!(
                "pod CIDR {subnet}{ip}: it stays with the Node object while the node is silent \
                 (kube-controller-manager frees it only when the Node is deleted), autonomous or not"
            ),
            (RegistryKind::Etcd, None) => {
                format!("{subnet}{ip}: its key has no etcd lease, so it does not lapse")
            }
            (kind, Some(at)) if on && *kept_while_autonomous => {
                let lapse = if *at > self.now { "lapses" } else { "lapsed" };
                let flannel = match kind {
                    RegistryKind::Etcd => {
                        " (etcd drops the key, netd's reservation keeps the subnet; flannel nodes \
                                           do not read it)"
                    }
                    _ => "",
                };
                format!(
                    "{subnet}{ip} {lapse} {} unless the node renews it, and is kept while the node is \
                     autonomous: no other node gets this subnet{flannel}",
                    when(*at, self.now)
                )
            }
            (kind, Some(at)) => {
                let lapse = if *at > self.now { "lapses" } else { "lapsed" };
                let removal = match kind {
                    RegistryKind::Etcd => "etcd then deletes the key with its etcd lease",
                    _ => "the next node to take a lease then deletes it",
                };
                let autonomy = match (on, kind) {
                    (false, _) => "",
                    (true, RegistryKind::Etcd) => {
                        "; autonomy does not keep it yet: the node's next renewal (or netd-autonomy set) reserves it"
                    }
                    (true, _) => "; autonomy does not extend it",
                };
                format!(
                    "{subnet}{ip} {lapse} {} unless the node renews it; {removal} and the subnet may go \
                     to a new node (the node, back, takes a subnet again, its old one first){autonomy}",
                    when(*at, self.now)
                )
            }
            (_, None) => format!("{subnet}{ip}: it does not lapse"),
        }
    }

    fn eviction_line(&self) -> String {
        if self.kind != RegistryKind::Kubernetes {
            return format!(
                "none from this registry: the {} registry has no pods (a Kubernetes cluster the node is also in \
                 goes by the node's annotations there)",
                self.kind.name()
            );
        }
        match self.node.autonomy {
            Autonomy::Off => "once the node is NotReady or unreachable (40 s of silence by default), its pods are \
                              evicted after their not-ready/unreachable tolerations (300 s by default; DaemonSet \
                              pods stay)"
                .into(),
            Autonomy::Forever => "netd-controller, while it runs, lengthens the not-ready/unreachable tolerations of \
                                  this node's pods to no limit, so they are not evicted while it is cut off; \
                                  without netd-controller the tolerations the pods have apply (300 s by default)"
                .into(),
            Autonomy::For(bound) => format!(
                "netd-controller, while it runs, lengthens the not-ready/unreachable tolerations of this node's \
                 pods to {}, so they are evicted that long after the node is tainted, not sooner; without \
                 netd-controller the tolerations the pods have apply (300 s by default)",
                span(bound)
            ),
        }
    }

    fn peers_line(&self) -> String {
        let gone = match self.kind {
            RegistryKind::Kubernetes => "the Node is deleted or its flannel annotations go",
            RegistryKind::Etcd => "its lease lapses or is deleted",
            RegistryKind::Embedded => "its lease lapses or is deleted",
        };
        let flannel = match self.kind {
            RegistryKind::Embedded => "",
            _ => "; flannel peers do not read autonomy and drop them with the lease",
        };
        match self.node.autonomy {
            Autonomy::Off => format!("netd peers remove this node's routes when {gone}{flannel}"),
            Autonomy::Forever => format!(
                "netd peers keep this node's routes after {gone}, until the node is back or another node takes \
                 its subnet{flannel}"
            ),
            Autonomy::For(bound) => format!(
                "netd peers keep this node's routes after {gone}, until the node is back or another node takes \
                 its subnet; the {} bound does not apply to routes{flannel}",
                span(bound)
            ),
        }
    }

    /// For people: the autonomy and where it came from, then one line per
    /// implication.
    pub fn text(&self) -> String {
        let node = &self.node;
        let mut text = format!("node {} in {}\n", node.node, self.registry);
        text.push_str(&format!("autonomy: {}", node.autonomy));
        if !node.sources.is_empty() {
            text.push_str(&format!(", from {}", node.sources.join(" and ")));
        }
        text.push('\n');
        if let Some(problem) = &node.problem {
            text.push_str(&format!("problem: {problem}\n"));
        }
        let implications = self.implications();
        if let Some(health) = implications.node {
            text.push_str(&format!("node: {health}\n"));
        }
        text.push_str(&format!("lease: {}\n", implications.lease));
        text.push_str(&format!("eviction: {}\n", implications.eviction));
        text.push_str(&format!("peers: {}\n", implications.peers));
        text
    }

    /// For tools: `version` ([`JSON_VERSION`]), the node, the registry, the
    /// autonomy (`on`, `limit` as a Go duration or `null`, `limitSeconds`,
    /// `sources`, `problem`), the `lease`, the `kubernetes` health and the
    /// `implies` sentences. Times are RFC 3339, durations seconds.
    pub fn json(&self) -> Value {
        let node = &self.node;
        let limit = match node.autonomy {
            Autonomy::For(bound) => Some(bound),
            Autonomy::Off | Autonomy::Forever => None,
        };
        let time = |t: Option<SystemTime>| t.map(rfc3339::format);
        let lease = node.lease.as_ref().map(|l| {
            json!({
                "subnet": l.subnet.to_string(),
                "publicIP": l.public_ip.map(|ip| ip.to_string()),
                "expiresAt": time(l.expires_at),
                "keptWhileAutonomous": l.kept_while_autonomous,
            })
        });
        let kubernetes = node.kubernetes.as_ref().map(|k| {
            let heartbeat = match &k.heartbeat {
                NodeHeartbeat::Renewed { renewed, duration } => json!({
                    "state": "renewed",
                    "renewedAt": time(*renewed),
                    "durationSeconds": duration.map(|d| d.as_secs()),
                }),
                NodeHeartbeat::Missing => json!({ "state": "missing" }),
                NodeHeartbeat::Unreadable(reason) => json!({ "state": "unreadable", "reason": reason }),
            };
            json!({
                "ready": k.ready.as_ref().map(|r| json!({
                    "status": r.status,
                    "reason": r.reason,
                    "since": time(r.since),
                    "heartbeat": time(r.heartbeat),
                })),
                "heartbeat": heartbeat,
                "silentSince": time(self.silent_since()),
            })
        });
        let implications = self.implications();
        json!({
            "version": JSON_VERSION,
            "node": node.node,
            "registry": { "kind": self.kind.name(), "describe": self.registry },
            "autonomy": {
                "on": node.autonomy.is_on(),
                "limit": limit.map(format_go_duration),
                "limitSeconds": limit.map(|d| d.as_secs_f64()),
                "sources": node.sources,
                "problem": node.problem,
            },
            "lease": lease,
            "kubernetes": kubernetes,
            "implies": {
                "node": implications.node,
                "lease": implications.lease,
                "eviction": implications.eviction,
                "peers": implications.peers,
            },
            "readAt": rfc3339::format(self.now),
        })
    }
}

/// Writes a time as [`Report::json`] does (RFC 3339, UTC, whole seconds).
pub fn format_time(time: SystemTime) -> String {
    rfc3339::format(time)
}

/// Reads an RFC 3339 time as [`Report::json`] writes them.
pub fn parse_time(text: &str) -> Option<SystemTime> {
    rfc3339::parse(text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use netd_model::autonomy::{ANNOTATION_AUTONOMY, ANNOTATION_AUTONOMY_DURATION, ANNOTATION_AUTONOMY_OPENYURT};
    use netd_registry::{KubeNodeState, NodeCondition};
    use std::time::UNIX_EPOCH;

    const NOW: u64 = 1_800_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn report(kind: RegistryKind, autonomy: Autonomy, sources: &[&str]) -> Report {
        Report {
            kind,
            registry: "test registry".into(),
            node: NodeAutonomy {
                node: "edge-1".into(),
                autonomy,
                sources: sources.iter().map(|s| s.to_string()).collect(),
                problem: None,
                lease: Some(NodeLeaseState {
                    subnet: "10.244.3.0/24".parse().unwrap(),
                    public_ip: Some("192.0.2.7".parse().unwrap()),
                    expires_at: Some(at(NOW + 7200)),
                    kept_while_autonomous: false,
                }),
                kubernetes: None,
            },
            now: at(NOW),
        }
    }

    fn kube(mut report: Report, renewed_ago: u64) -> Report {
        report.node.lease.as_mut().unwrap().expires_at = None;
        report.node.kubernetes = Some(KubeNodeState {
            ready: Some(NodeCondition {
                status: "Unknown".into(),
                reason: Some("NodeStatusUnknown".into()),
                since: Some(at(NOW - 60)),
                heartbeat: Some(at(NOW - renewed_ago)),
            }),
            heartbeat: NodeHeartbeat::Renewed {
                renewed: Some(at(NOW - renewed_ago)),
                duration: Some(Duration::from_secs(40)),
            },
        });
        report
    }

    #[test]
    fn durations_are_go_durations_and_zero_is_forever() {
        assert_eq!(autonomy_for(None).unwrap(), Autonomy::Forever);
        assert_eq!(autonomy_for(Some("0")).unwrap(), Autonomy::Forever);
        assert_eq!(autonomy_for(Some("1h30m")).unwrap(), Autonomy::For(Duration::from_secs(5400)));
        let err = autonomy_for(Some("2 days")).unwrap_err().to_string();
        assert!(err.starts_with("bad duration \"2 days\": expected number+unit pairs"), "{err}");
        assert!(autonomy_for(Some("-5m")).unwrap_err().to_string().contains("negative"));
    }

    #[test]
    fn embedded_and_etcd_reports_say_the_lease_lapses_and_nothing_is_evicted() {
        let mut on = report(RegistryKind::Embedded, Autonomy::Forever, &["the autonomy row of edge-1 in /x.db"]);
        on.node.lease.as_mut().unwrap().kept_while_autonomous = true;
        let text = on.text();
        assert!(text.starts_with("node edge-1 in test registry\n"), "{text}");
        assert!(text.contains("autonomy: on (no time limit), from the autonomy row of edge-1 in /x.db\n"), "{text}");
        assert!(
            text.contains("lease: 10.244.3.0/24 (public IP 192.0.2.7) lapses 2027-01-15T10:00:00Z (in 2h0m0s) unless"),
            "{text}"
        );
        assert!(text.contains("kept while the node is autonomous: no other node gets this subnet"), "{text}");
        assert!(text.contains("eviction: none from this registry: the embedded registry has no pods"), "{text}");
        assert!(text.contains("peers: netd peers keep this node's routes after its lease lapses"), "{text}");
        assert!(!text.contains("node: "), "no health line without Kubernetes: {text}");
        assert!(!text.contains("flannel peers"), "no flannel peers share an embedded registry: {text}");

        let mut off = report(RegistryKind::Etcd, Autonomy::Off, &[]);
        off.node.lease.as_mut().unwrap().expires_at = Some(at(NOW - 30));
        let text = off.text();
        assert!(text.contains("autonomy: off\n"), "{text}");
        assert!(text.contains("lapsed 2027-01-15T07:59:30Z (30s ago)"), "{text}");
        assert!(text.contains("etcd then deletes the key"), "{text}");
        assert!(!text.contains("does not extend"), "{text}");
        assert!(text.contains("peers: netd peers remove this node's routes when its lease lapses"), "{text}");
        assert!(text.contains("flannel peers do not read autonomy"), "{text}");
        off.node.lease = None;
        assert!(off.text().contains("lease: none held"));

        // etcd: kept by netd's reservation, or not yet reserved.
        let mut reserved = report(RegistryKind::Etcd, Autonomy::Forever, &["/coreos.com/network/autonomy/edge-1"]);
        reserved.node.lease.as_mut().unwrap().kept_while_autonomous = true;
        let text = reserved.text();
        assert!(text.contains("no other node gets this subnet (etcd drops the key, netd's reservation"), "{text}");
        reserved.node.lease.as_mut().unwrap().kept_while_autonomous = false;
        let text = reserved.text();
        assert!(text.contains("the subnet may go to a new node"), "{text}");
        assert!(text.contains("the node's next renewal (or netd-autonomy set) reserves it"), "{text}");
    }

    #[test]
    fn kubernetes_reports_health_the_bound_and_who_keeps_the_pods() {
        let sources = [ANNOTATION_AUTONOMY_OPENYURT, ANNOTATION_AUTONOMY_DURATION];
        let bounded = kube(report(RegistryKind::Kubernetes, Autonomy::For(Duration::from_secs(7200)), &sources), 600);
        let text = bounded.text();
        assert!(
            text.contains(
                "autonomy: on for 2h0m0s after the node is cut off, from node.beta.openyurt.io/autonomy and \
                 node.openyurt.io/autonomy-duration\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("node: Ready=Unknown (NodeStatusUnknown) since 2027-01-15T07:59:00Z (1m0s ago)"),
            "{text}"
        );
        assert!(text.contains("heartbeat kube-node-lease/edge-1 renewed 2027-01-15T07:50:00Z (10m0s ago)"), "{text}");
        assert!(
            text.contains(
                "cut off since 2027-01-15T07:50:00Z; the 2h0m0s bound ends 2027-01-15T09:50:00Z (in 1h50m0s)"
            ),
            "{text}"
        );
        assert!(text.contains("lease: pod CIDR 10.244.3.0/24 (public IP 192.0.2.7): it stays with the Node"), "{text}");
        assert!(
            text.contains("eviction: netd-controller, while it runs, lengthens") && text.contains("pods to 2h0m0s")
        );
        assert!(text.contains("the 2h0m0s bound does not apply to routes"), "{text}");

        let json = bounded.json();
        assert_eq!(json["version"], JSON_VERSION);
        assert_eq!(json["autonomy"]["on"], true);
        assert_eq!(json["autonomy"]["limit"], "2h0m0s");
        assert_eq!(json["autonomy"]["limitSeconds"], 7200.0);
        assert_eq!(json["autonomy"]["sources"], json!(sources));
        assert_eq!(json["lease"]["subnet"], "10.244.3.0/24");
        assert_eq!(json["lease"]["expiresAt"], Value::Null);
        assert_eq!(json["lease"]["keptWhileAutonomous"], false);
        assert_eq!(json["kubernetes"]["heartbeat"]["state"], "renewed");
        assert_eq!(json["kubernetes"]["heartbeat"]["durationSeconds"], 40);
        assert_eq!(json["kubernetes"]["silentSince"], "2027-01-15T07:50:00Z");
        assert_eq!(parse_time(json["kubernetes"]["silentSince"].as_str().unwrap()), Some(at(NOW - 600)));
        assert_eq!(json["registry"]["kind"], "kubernetes");
        assert!(json["implies"]["eviction"].as_str().unwrap().contains("netd-controller"));

        // Long cut off: the bound has run out.
        let expired = kube(report(RegistryKind::Kubernetes, Autonomy::For(Duration::from_secs(300)), &sources), 600);
        assert!(expired.text().contains("the 5m0s bound ended 2027-01-15T07:55:00Z (5m0s ago)"));
        // Connected: nothing is cut off.
        let live = kube(report(RegistryKind::Kubernetes, Autonomy::Forever, &[ANNOTATION_AUTONOMY]), 5);
        assert_eq!(live.silent_since(), None);
        assert!(live.text().contains("; connected\n"), "{}", live.text());
        assert!(live.text().contains("to no limit"));
        // Off: the cluster's eviction applies.
        let mut off = kube(report(RegistryKind::Kubernetes, Autonomy::Off, &[]), 5);
        assert!(off.text().contains("eviction: once the node is NotReady or unreachable"));
        off.node.kubernetes.as_mut().unwrap().heartbeat = NodeHeartbeat::Missing;
        assert!(off.text().contains("no heartbeat Lease kube-node-lease/edge-1"));
        off.node.problem = Some("bad".into());
        assert!(off.text().contains("\nproblem: bad\n"));
    }

    #[test]
    fn outcomes_list_what_was_written() {
        let outcome = Outcome {
            changes: Some(vec![
                AutonomyChange { field: ANNOTATION_AUTONOMY.into(), value: Some("false".into()) },
                AutonomyChange { field: ANNOTATION_AUTONOMY_DURATION.into(), value: None },
            ]),
            report: report(RegistryKind::Kubernetes, Autonomy::Off, &[]),
        };
        let text = outcome.text();
        assert!(
            text.starts_with(
                "wrote node.beta.alibabacloud.com/autonomy=false\nremoved node.openyurt.io/autonomy-duration\nnode edge-1"
            ),
            "{text}"
        );
        let json = outcome.json();
        assert_eq!(json["changes"][1], json!({ "field": ANNOTATION_AUTONOMY_DURATION, "value": null }));
        let status = Outcome { changes: None, ..outcome };
        assert_eq!(status.json()["changes"], Value::Null);
    }
}
