//! A rollout's persisted state and the state machine that moves it on.
//!
//! [`RolloutState`] is what the registry keeps (a ConfigMap on Kubernetes,
//! a file in the lab): the target version, each node's progress, the
//! running batch, pending operator requests and a short log. It is the
//! whole truth of a rollout: an executor that restarts reads it back and
//! carries on, and because a node is marked [`NodeProgress::Upgrading`]
//! *before* its old netd is replaced, and replacing only ever touches a
//! netd that is not on the target, no node is upgraded twice.
//!
//! [`RolloutState::step`] is pure: given what the backend sees of every
//! node now ([`NodeView`]) and the time, it updates the state and says
//! which nodes to upgrade. The executors (Kubernetes, the lab) save the
//! state, and only then act.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Batches;
use netd_model::autonomy::format_go_duration;

/// The format of [`RolloutState`] this netd writes and reads.
pub const STATE_FORMAT: u32 = 1;
/// How long a batch's node may take to come back Ready on the target.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(300);
/// A rollout paused this long is closed and its state removed (seed §3.2).
pub const DEFAULT_PAUSED_TTL: Duration = Duration::from_secs(15 * 24 * 3600);
/// Log lines kept in the state (the oldest go first).
const LOG_LINES: usize = 200;

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Batches are being upgraded.
    Running,
    /// Nothing new starts until a resume (by request, or after a failure:
    /// see [`RolloutState::reason`]).
    Paused,
    /// Stopped for good; the nodes upgraded stay upgraded.
    Cancelled,
    /// Every node runs the target.
    Complete,
}

impl Phase {
    /// True while the rollout may still act (another may not start).
    pub fn is_open(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

/// What an operator asked for; the executor carries it out at the next
/// batch boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Request {
    /// Let the running batch finish, start nothing new.
    Pause,
    /// Start again with a batch of one.
    Resume,
    /// Let the running batch finish, then stop for good.
    Cancel,
}

/// One node's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum NodeProgress {
    /// Not started.
    Pending,
    /// In the running batch since `since` (Unix seconds).
    Upgrading {
        /// When the batch started on it.
        since: u64,
    },
    /// Runs the target and is Ready.
    Updated {
        /// Since when (Unix seconds).
        at: u64,
    },
    /// Did not come back Ready, or went unready after its upgrade.
    Failed {
        /// Why, for the operator.
        reason: String,
    },
    /// The node went away during the rollout.
    Gone,
}

/// The running batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    /// 1 for the rollout's first batch, counting on across resumes.
    pub number: u32,
    /// Its nodes.
    pub nodes: Vec<String>,
    /// When it started (Unix seconds).
    pub started: u64,
}

/// The batch plan in force: restarted at one node by every resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Series {
    /// Nodes left when this series began.
    pub remaining: usize,
    /// Batches of it done.
    pub batches: usize,
}

/// What the backend sees of one node's netd now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeView {
    /// The version its netd runs (`None`: none runs, e.g. being replaced).
    pub version: Option<String>,
    /// Its netd reports Ready.
    pub ready: bool,
    /// Why the node counts as offline (cut off from the cloud, NotReady),
    /// or `None` when it is online.
    pub offline: Option<String>,
    /// What is wrong with its netd, when it is not Ready (for messages).
    pub detail: String,
}

/// A rollout, as the registry keeps it; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutState {
    /// [`STATE_FORMAT`].
    pub format: u32,
    /// The version rolled out, as the backend names versions.
    pub target: String,
    /// The target for people (an image, a binary).
    pub target_label: String,
    /// The version the nodes ran before.
    pub from: String,
    /// Where the rollout is.
    pub phase: Phase,
    /// Why it is paused, cancelled or closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// An operator's request not yet carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Request>,
    /// Every node of the rollout.
    pub nodes: BTreeMap<String, NodeProgress>,
    /// Nodes not started because they are offline, and why: upgraded when
    /// they come back, never counted as failed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deferred: BTreeMap<String, String>,
    /// The running batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,
    /// The batch plan in force.
    pub series: Series,
    /// Batches finished so far.
    pub batches_done: u32,
    /// How long a node of a batch may take (seconds).
    pub node_timeout_secs: u64,
    /// When the rollout started (Unix seconds).
    pub started: u64,
    /// When the phase last changed (Unix seconds): a pause's age.
    pub phase_since: u64,
    /// What happened, oldest first.
    #[serde(default)]
    pub log: Vec<String>,
}

/// What [`RolloutState::step`] asks of the executor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// Nodes whose netd must be replaced by the target's (after the state
    /// is saved). Replacing must leave a netd already on the target alone.
    pub upgrade: Vec<String>,
    /// The state changed and must be saved.
    pub changed: bool,
    /// The rollout is closed: remove its state.
    pub close: bool,
    /// Lines for the log (also appended to the state's log).
    pub lines: Vec<String>,
    /// The lines worth an Event on the rolled-out object: batches, pauses,
    /// failures, the end.
    pub events: Vec<Announcement>,
}

/// A line of [`Step::lines`] that is a turning point of the rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// A CamelCase reason, e.g. `RolloutPaused`.
    pub reason: &'static str,
    /// Something went wrong (a `Warning` Event, else `Normal`).
    pub warning: bool,
    /// The line.
    pub message: String,
}

/// Why a stored state cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Not JSON of the right shape.
    #[error("the rollout state is unreadable: {0}")]
    Unreadable(String),
    /// Written by a newer netd.
    #[error(
        "the rollout state has format {found}; this netd reads format {STATE_FORMAT}: upgrade netd-controller first"
    )]
    Format {
        /// The format found.
        found: u32,
    },
    /// A request that does not apply now.
    #[error("{0}")]
    Refused(String),
}

impl RolloutState {
    /// A new rollout of `target` over `nodes` (all on `from`), started at
    /// `now` (Unix seconds).
    pub fn new(
        target: &str,
        target_label: &str,
        from: &str,
        nodes: impl IntoIterator<Item = String>,
        node_timeout: Duration,
        now: u64,
    ) -> Self {
        let nodes: BTreeMap<String, NodeProgress> = nodes.into_iter().map(|n| (n, NodeProgress::Pending)).collect();
        let remaining = nodes.len();
        Self {
            format: STATE_FORMAT,
            target: target.to_string(),
            target_label: target_label.to_string(),
            from: from.to_string(),
            phase: Phase::Running,
            reason: None,
            request: None,
            nodes,
            deferred: BTreeMap::new(),
            batch: None,
            series: Series { remaining, batches: 0 },
            batches_done: 0,
            node_timeout_secs: node_timeout.as_secs().max(1),
            started: now,
            phase_since: now,
            log: Vec::new(),
        }
    }

    /// Decodes a stored state.
    pub fn from_json(text: &str) -> Result<Self, StateError> {
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_str(text).map_err(|e| StateError::Unreadable(e.to_string()))?;
        if head.format != STATE_FORMAT {
            return Err(StateError::Format { found: head.format });
        }
        let mut deserializer = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut deserializer).map_err(|e| StateError::Unreadable(e.to_string()))
    }

    /// The stored form.
    pub fn to_json(&self) -> String {
        // A struct of strings, numbers and maps with string keys: encoding
        // cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Nodes on the target.
    pub fn updated(&self) -> usize {
        self.count(|p| matches!(p, NodeProgress::Updated { .. }))
    }

    /// Nodes the rollout covers (those that went away excluded).
    pub fn total(&self) -> usize {
        self.count(|p| !matches!(p, NodeProgress::Gone))
    }

    fn count(&self, which: impl Fn(&NodeProgress) -> bool) -> usize {
        self.nodes.values().filter(|p| which(p)).count()
    }

    /// Records an operator's request, refusing one that cannot apply.
    pub fn ask(&mut self, request: Request) -> Result<(), StateError> {
        let refuse = |text: String| Err(StateError::Refused(text));
        match (self.phase, request) {
            (Phase::Complete | Phase::Cancelled, _) => {
                return refuse(format!("the rollout to {} is over ({})", self.target_label, phase_name(self.phase)))
            }
            (Phase::Running, Request::Resume) if self.request != Some(Request::Pause) => {
                return refuse(format!("the rollout to {} is running, not paused", self.target_label))
            }
            (Phase::Paused, Request::Pause) => {
                return refuse(format!("the rollout to {} is already paused", self.target_label))
            }
            (Phase::Running, Request::Resume) => {
                // A pause not yet carried out is withdrawn.
                self.request = None;
                return Ok(());
            }
            _ => {}
        }
        self.request = Some(request);
        Ok(())
    }

    fn say(&mut self, step: &mut Step, now: u64, line: String) {
        self.log.push(format!("{} {line}", format_unix(now)));
        if self.log.len() > LOG_LINES {
            let excess = self.log.len() - LOG_LINES;
            self.log.drain(..excess);
        }
        step.lines.push(line);
    }

    fn announce(&mut self, step: &mut Step, now: u64, reason: &'static str, warning: bool, line: String) {
        step.events.push(Announcement { reason, warning, message: line.clone() });
        self.say(step, now, line);
    }

    fn set_phase(&mut self, phase: Phase, reason: Option<String>, now: u64) {
        self.phase = phase;
        self.reason = reason;
        self.phase_since = now;
    }

    /// Moves the rollout on; see the module docs. `views` has every node
    /// the backend knows (a node of the rollout missing from it is gone);
    /// `now` is Unix seconds.
    pub fn step(&mut self, views: &BTreeMap<String, NodeView>, now: u64, paused_ttl: Duration) -> Step {
        let before = self.clone();
        let mut step = Step::default();
        self.take_request(&mut step, now);
        if self.phase == Phase::Paused && now.saturating_sub(self.phase_since) >= paused_ttl.as_secs() {
            let line = format!(
                "closed: paused for {} (longer than {}); {} of {} nodes on {}",
                format_go_duration(Duration::from_secs(now.saturating_sub(self.phase_since))),
                format_go_duration(paused_ttl),
                self.updated(),
                self.total(),
                self.target_label
            );
            self.announce(&mut step, now, "RolloutClosed", false, line);
            step.close = true;
            step.changed = true;
            return step;
        }
        if self.phase == Phase::Running {
            self.observe(views, now, &mut step);
            if !self.nodes.values().any(|p| matches!(p, NodeProgress::Upgrading { .. })) {
                self.end_batch(now, &mut step);
                if self.phase == Phase::Running {
                    self.start_batch(views, now, &mut step);
                }
            }
            // Upgrading nodes not yet on the target: replace their netd (again
            // after a restart of the executor; replacing leaves a netd on the
            // target alone, so this never upgrades a node twice).
            for (name, progress) in &self.nodes {
                if matches!(progress, NodeProgress::Upgrading { .. })
                    && views.get(name).is_some_and(|v| v.version.as_deref() != Some(self.target.as_str()))
                {
                    step.upgrade.push(name.clone());
                }
            }
        }
        step.changed = *self != before;
        step
    }

    fn take_request(&mut self, step: &mut Step, now: u64) {
        let Some(request) = self.request else { return };
        match (self.phase, request) {
            (Phase::Paused, Request::Resume) => {
                self.request = None;
                // Failed nodes are tried again: replacing leaves one already
                // on the target alone, so they are only waited for.
                let mut retried = Vec::new();
                for (name, progress) in self.nodes.iter_mut() {
                    if matches!(progress, NodeProgress::Failed { .. }) {
                        *progress = NodeProgress::Pending;
                        retried.push(name.clone());
                    }
                }
                let remaining = self.count(|p| matches!(p, NodeProgress::Pending));
                self.series = Series { remaining, batches: 0 };
                self.set_phase(Phase::Running, None, now);
                let retry =
                    if retried.is_empty() { String::new() } else { format!(" (again: {})", retried.join(", ")) };
                let line = format!("resumed: {remaining} nodes left, batches start again at 1{retry}");
                self.announce(step, now, "RolloutResumed", false, line);
            }
            (Phase::Paused, Request::Cancel) => {
                self.request = None;
                self.set_phase(Phase::Cancelled, Some("cancelled by request".into()), now);
                let line = self.cancelled_line();
                self.announce(step, now, "RolloutCancelled", false, line);
            }
            (Phase::Running, Request::Pause | Request::Cancel) => {} // at the batch's end
            _ => self.request = None,
        }
    }

    fn cancelled_line(&self) -> String {
        format!(
            "cancelled: {} of {} nodes on {}, {} left on {}",
            self.updated(),
            self.total(),
            self.target_label,
            self.total() - self.updated(),
            self.from
        )
    }

    fn observe(&mut self, views: &BTreeMap<String, NodeView>, now: u64, step: &mut Step) {
        let timeout = self.node_timeout_secs;
        let mut lines = Vec::new();
        for (name, progress) in self.nodes.iter_mut() {
            let view = views.get(name);
            let on_target = view.is_some_and(|v| v.version.as_deref() == Some(self.target.as_str()) && v.ready);
            let next = match (&*progress, view) {
                (NodeProgress::Gone | NodeProgress::Failed { .. }, _) => None,
                (_, None) => {
                    lines.push(format!("{name}: the node is gone; skipped"));
                    Some(NodeProgress::Gone)
                }
                (NodeProgress::Pending, Some(_)) if on_target => {
                    lines.push(format!("{name}: already on {}", self.target_label));
                    Some(NodeProgress::Updated { at: now })
                }
                (NodeProgress::Pending, Some(_)) => None,
                (NodeProgress::Upgrading { since }, Some(_)) if on_target => {
                    lines.push(format!(
                        "{name}: on {} and Ready after {}s",
                        self.target_label,
                        now.saturating_sub(*since)
                    ));
                    Some(NodeProgress::Updated { at: now })
                }
                (NodeProgress::Upgrading { since }, Some(view)) if now.saturating_sub(*since) > timeout => {
                    let running = match &view.version {
                        Some(v) if *v == self.target => format!("its netd on {} is not Ready", self.target_label),
                        Some(v) => format!("its netd runs {v}, not {}", self.target),
                        None => "no netd runs on it".to_string(),
                    };
                    let offline =
                        view.offline.as_ref().map(|o| format!("; the node is offline: {o}")).unwrap_or_default();
                    Some(NodeProgress::Failed {
                        reason: format!(
                            "not Ready on {} within {}: {running} ({}){offline}",
                            self.target_label,
                            format_go_duration(Duration::from_secs(timeout)),
                            detail_or(view)
                        ),
                    })
                }
                (NodeProgress::Upgrading { .. }, Some(_)) => None,
                (NodeProgress::Updated { .. }, Some(_)) if on_target && view.is_some_and(|v| v.offline.is_none()) => {
                    None
                }
                // Offline long after its upgrade: cut off, not the upgrade's doing.
                (NodeProgress::Updated { at }, Some(view))
                    if view.offline.is_some() && now.saturating_sub(*at) > timeout =>
                {
                    None
                }
                (NodeProgress::Updated { .. }, Some(view)) => {
                    let what = match (&view.offline, view.ready) {
                        (Some(offline), _) => format!("the node went offline after its upgrade: {offline}"),
                        (None, false) => format!("its netd went unready after its upgrade ({})", detail_or(view)),
                        (None, true) => format!(
                            "it runs {} after its upgrade to {}",
                            view.version.as_deref().unwrap_or("nothing"),
                            self.target
                        ),
                    };
                    Some(NodeProgress::Failed { reason: what })
                }
            };
            if let Some(next) = next {
                if let NodeProgress::Failed { reason } = &next {
                    lines.push(format!("{name}: FAILED: {reason}"));
                }
                *progress = next;
            }
        }
        for line in lines {
            if line.contains(": FAILED: ") {
                self.announce(step, now, "NodeUpgradeFailed", true, line);
            } else {
                self.say(step, now, line);
            }
        }
        self.deferred = self
            .nodes
            .iter()
            .filter(|(_, p)| matches!(p, NodeProgress::Pending))
            .filter_map(|(name, _)| Some((name.clone(), views.get(name)?.offline.clone()?)))
            .collect();
    }

    fn end_batch(&mut self, now: u64, step: &mut Step) {
        if let Some(batch) = self.batch.take() {
            self.batches_done += 1;
            self.series.batches += 1;
            let line = format!(
                "batch {} done in {}s: {} ({} of {} nodes on {})",
                batch.number,
                now.saturating_sub(batch.started),
                batch.nodes.join(", "),
                self.updated(),
                self.total(),
                self.target_label
            );
            self.say(step, now, line);
        }
        let failed: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|(name, p)| match p {
                NodeProgress::Failed { reason } => Some(format!("{name}: {reason}")),
                _ => None,
            })
            .collect();
        if !failed.is_empty() {
            let reason = failed.join("; ");
            self.announce(step, now, "RolloutPaused", true, format!("paused after a failure: {reason}"));
            self.set_phase(Phase::Paused, Some(reason), now);
        } else if self.request == Some(Request::Pause) {
            self.request = None;
            self.set_phase(Phase::Paused, Some("paused by request".into()), now);
            let line =
                format!("paused by request: {} of {} nodes on {}", self.updated(), self.total(), self.target_label);
            self.announce(step, now, "RolloutPaused", false, line);
        } else if self.request == Some(Request::Cancel) {
            self.request = None;
            self.set_phase(Phase::Cancelled, Some("cancelled by request".into()), now);
            let line = self.cancelled_line();
            self.announce(step, now, "RolloutCancelled", false, line);
        }
    }

    fn start_batch(&mut self, views: &BTreeMap<String, NodeView>, now: u64, step: &mut Step) {
        let candidates: Vec<String> = self
            .nodes
            .iter()
            .filter(|(name, p)| {
                matches!(p, NodeProgress::Pending) && views.get(*name).is_some_and(|v| v.offline.is_none())
            })
            .map(|(name, _)| name.clone())
            .collect();
        if candidates.is_empty() {
            if !self.nodes.values().any(|p| matches!(p, NodeProgress::Pending)) {
                self.set_phase(Phase::Complete, None, now);
                let line = format!(
                    "successfully rolled out: {} of {} nodes on {}",
                    self.updated(),
                    self.total(),
                    self.target_label
                );
                self.announce(step, now, "RolloutComplete", false, line);
            }
            // Otherwise only offline nodes are left: they start when they
            // come back.
            return;
        }
        let size = Batches::new(self.total(), self.series.remaining)
            .nth(self.series.batches)
            .unwrap_or_else(|| super::batch_cap(self.total()));
        let chosen: Vec<String> = candidates.into_iter().take(size).collect();
        for name in &chosen {
            self.nodes.insert(name.clone(), NodeProgress::Upgrading { since: now });
        }
        let number = self.batches_done + 1;
        let line = format!("batch {number}: upgrading {} node(s): {}", chosen.len(), chosen.join(", "));
        self.batch = Some(Batch { number, nodes: chosen, started: now });
        self.announce(step, now, "RolloutBatchStarted", false, line);
    }

    /// The status line, in kubectl's wording.
    pub fn status_line(&self, name: &str) -> String {
        let (updated, total) = (self.updated(), self.total());
        match self.phase {
            Phase::Complete => format!("{name} successfully rolled out ({updated} of {total} nodes on {})", self.target_label),
            Phase::Cancelled => format!("{name} rollout cancelled: {}", self.cancelled_line().trim_start_matches("cancelled: ")),
            Phase::Paused => format!(
                "{name} rollout paused: {updated} of {total} nodes updated ({}); resume with `netd-controller rollout resume`",
                self.reason.as_deref().unwrap_or("paused")
            ),
            Phase::Running => {
                let mut line = format!("Waiting for rollout to finish: {updated} of {total} nodes updated...");
                if let Some(batch) = &self.batch {
                    line.push_str(&format!(" (batch {}: {})", batch.number, batch.nodes.join(", ")));
                }
                match self.request {
                    Some(Request::Pause) => line.push_str(" [pausing after this batch]"),
                    Some(Request::Cancel) => line.push_str(" [cancelling after this batch]"),
                    _ => {}
                }
                if !self.deferred.is_empty() {
                    let names: Vec<&str> = self.deferred.keys().map(String::as_str).collect();
                    line.push_str(&format!(" ({} offline node(s) deferred: {})", names.len(), names.join(", ")));
                }
                line
            }
        }
    }
}

fn detail_or(view: &NodeView) -> &str {
    if view.detail.is_empty() {
        "no detail"
    } else {
        &view.detail
    }
}

/// A phase in words.
pub fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Running => "running",
        Phase::Paused => "paused",
        Phase::Cancelled => "cancelled",
        Phase::Complete => "complete",
    }
}

/// Unix seconds as RFC 3339 UTC.
pub fn format_unix(secs: u64) -> String {
    netd_model::rfc3339::format_unix(secs).unwrap_or_else(|| secs.to_string())
}

pub use netd_model::unix_now;

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = DEFAULT_PAUSED_TTL;

    /// A fleet whose netds come back Ready on the target right after an
    /// upgrade, but for the nodes in `broken` (never Ready) and `offline`.
    struct Fleet {
        views: BTreeMap<String, NodeView>,
        broken: Vec<String>,
        upgrades: BTreeMap<String, u32>,
    }

    impl Fleet {
        fn new(n: usize) -> Self {
            let views = (1..=n)
                .map(|i| {
                    (format!("edge-{i:02}"), NodeView { version: Some("v1".into()), ready: true, ..Default::default() })
                })
                .collect();
            Self { views, broken: Vec::new(), upgrades: BTreeMap::new() }
        }

        fn node(&mut self, name: &str) -> &mut NodeView {
            self.views.get_mut(name).expect("known node")
        }

        fn names(&self) -> Vec<String> {
            self.views.keys().cloned().collect()
        }

        fn act(&mut self, step: &Step) {
            for name in &step.upgrade {
                *self.upgrades.entry(name.clone()).or_default() += 1;
                let view = self.views.get_mut(name).expect("known node");
                assert_ne!(view.version.as_deref(), Some("v2"), "{name} upgraded twice");
                view.version = Some("v2".into());
                view.ready = !self.broken.contains(name);
                view.detail = if view.ready { String::new() } else { "CrashLoopBackOff".into() };
            }
        }
    }

    fn start(fleet: &Fleet) -> RolloutState {
        RolloutState::new("v2", "netd:v2", "v1", fleet.names(), Duration::from_secs(60), 1_000)
    }

    /// Steps until nothing changes; returns the batch sizes started.
    fn run(state: &mut RolloutState, fleet: &mut Fleet, now: &mut u64) -> Vec<usize> {
        let mut sizes = Vec::new();
        for _ in 0..10_000 {
            let step = state.step(&fleet.views, *now, TTL);
            if let Some(batch) = &state.batch {
                if step.upgrade.len() == batch.nodes.len() && !step.upgrade.is_empty() {
                    sizes.push(batch.nodes.len());
                }
            }
            fleet.act(&step);
            *now += 1;
            if !step.changed && step.upgrade.is_empty() {
                return sizes;
            }
        }
        panic!("no end: {state:?}");
    }

    #[test]
    fn a_rollout_follows_the_plan_and_upgrades_each_node_once() {
        let mut fleet = Fleet::new(20);
        let mut state = start(&fleet);
        let mut now = 1_000;
        let sizes = run(&mut state, &mut fleet, &mut now);
        assert_eq!(sizes, super::super::plan(20));
        let mut fresh = start(&fleet);
        let first = fresh.step(&Fleet::new(20).views, 1_000, TTL);
        assert_eq!(
            first.events,
            [Announcement {
                reason: "RolloutBatchStarted",
                warning: false,
                message: "batch 1: upgrading 1 node(s): edge-01".into()
            }]
        );
        assert_eq!(state.phase, Phase::Complete);
        assert_eq!(state.updated(), 20);
        assert!(fleet.upgrades.values().all(|&n| n == 1), "{:?}", fleet.upgrades);
        assert_eq!(
            state.status_line("daemon set \"kube-system/netd\""),
            "daemon set \"kube-system/netd\" successfully rolled out (20 of 20 nodes on netd:v2)"
        );
        assert!(state.log.last().is_some_and(|l| l.ends_with("successfully rolled out: 20 of 20 nodes on netd:v2")));
    }

    #[test]
    fn pause_finishes_the_batch_resume_restarts_at_one_cancel_keeps_what_is_done() {
        let mut fleet = Fleet::new(20);
        let mut state = start(&fleet);
        let mut now = 1_000;
        // Batches 1 and 2, then batch 3 starts.
        let mut started = 0;
        while state.batch.as_ref().map_or(0, |b| b.number) < 3 {
            let step = state.step(&fleet.views, now, TTL);
            if !step.upgrade.is_empty() {
                started += 1;
                if started == 3 {
                    // Paused while batch 3 runs: its nodes are not yet Ready.
                    state.ask(Request::Pause).expect("pause");
                    assert!(
                        state.status_line("x").contains("[pausing after this batch]"),
                        "{}",
                        state.status_line("x")
                    );
                    fleet.act(&step);
                    break;
                }
            }
            fleet.act(&step);
            now += 1;
        }
        now += 1;
        let step = state.step(&fleet.views, now, TTL);
        assert!(step.upgrade.is_empty(), "nothing new starts: {step:?}");
        assert_eq!(state.phase, Phase::Paused);
        assert_eq!(state.updated(), 5, "1 + 2 + 2");
        assert_eq!(state.reason.as_deref(), Some("paused by request"));
        assert!(state.ask(Request::Pause).is_err());
        // Nothing happens while paused.
        let step = state.step(&fleet.views, now + 100, TTL);
        assert!(!step.changed && step.upgrade.is_empty());
        state.ask(Request::Resume).expect("resume");
        let step = state.step(&fleet.views, now + 101, TTL);
        assert_eq!(step.upgrade.len(), 1, "a resume starts at one node");
        fleet.act(&step);
        let step = state.step(&fleet.views, now + 102, TTL);
        assert_eq!(step.upgrade.len(), 2, "then doubles (capped at 2 of 20)");
        fleet.act(&step);
        state.ask(Request::Cancel).expect("cancel");
        let step = state.step(&fleet.views, now + 103, TTL);
        assert!(step.upgrade.is_empty());
        assert_eq!(state.phase, Phase::Cancelled);
        assert_eq!(state.updated(), 8);
        assert_eq!(fleet.views.values().filter(|v| v.version.as_deref() == Some("v2")).count(), 8);
        assert!(state.ask(Request::Resume).is_err(), "a cancelled rollout is over");
        assert_eq!(state.status_line("netd"), "netd rollout cancelled: 8 of 20 nodes on netd:v2, 12 left on v1");
    }

    #[test]
    fn a_node_that_never_gets_ready_pauses_the_rollout_with_its_name_and_reason() {
        let mut fleet = Fleet::new(20);
        fleet.broken.push("edge-02".into());
        let mut state = start(&fleet);
        let mut now = 1_000;
        run(&mut state, &mut fleet, &mut now);
        // Batch 1 (edge-01) went fine; batch 2 (edge-02, edge-03) waits out
        // the timeout on edge-02: a Warning for the node, one for the pause.
        let step = state.step(&fleet.views, now + 61, TTL);
        let warnings: Vec<&str> = step.events.iter().filter(|e| e.warning).map(|e| e.reason).collect();
        assert_eq!(warnings, ["NodeUpgradeFailed", "RolloutPaused"], "{step:?}");
        let step = state.step(&fleet.views, now + 62, TTL);
        assert!(step.events.is_empty(), "announced once: {step:?}");
        assert_eq!(state.phase, Phase::Paused, "{state:?}");
        let reason = state.reason.clone().unwrap_or_default();
        assert!(
            reason.starts_with(
                "edge-02: not Ready on netd:v2 within 1m0s: its netd on netd:v2 is not Ready (CrashLoopBackOff)"
            ),
            "{reason}"
        );
        assert_eq!(state.updated(), 2);
        // Fixed by hand, then resumed: edge-02 is waited for, not upgraded again.
        fleet.node("edge-02").ready = true;
        fleet.broken.clear();
        state.ask(Request::Resume).expect("resume");
        run(&mut state, &mut fleet, &mut now);
        assert_eq!(state.phase, Phase::Complete);
        assert_eq!(fleet.upgrades.get("edge-02"), Some(&1));
    }

    #[test]
    fn offline_nodes_are_deferred_to_the_end_and_reported_not_failed() {
        let mut fleet = Fleet::new(7);
        let node = fleet.node("edge-01");
        node.offline = Some("autonomous, NotReady since 2026-12-01T10:00:00Z".into());
        node.ready = false;
        let mut state = start(&fleet);
        let mut now = 1_000;
        run(&mut state, &mut fleet, &mut now);
        assert_eq!(state.phase, Phase::Running, "waiting for the offline node");
        assert_eq!(state.updated(), 6);
        assert_eq!(state.nodes["edge-01"], NodeProgress::Pending);
        assert!(state.deferred.contains_key("edge-01"));
        let line = state.status_line("netd");
        assert_eq!(
            line,
            "Waiting for rollout to finish: 6 of 7 nodes updated... (1 offline node(s) deferred: edge-01)"
        );
        // Back online: upgraded last.
        let node = fleet.node("edge-01");
        node.offline = None;
        node.ready = true;
        run(&mut state, &mut fleet, &mut now);
        assert_eq!(state.phase, Phase::Complete);
        assert!(state.deferred.is_empty());
    }

    #[test]
    fn a_node_that_goes_unready_after_its_upgrade_pauses_the_rollout() {
        let mut fleet = Fleet::new(10);
        let mut state = start(&fleet);
        let mut now = 1_000;
        let step = state.step(&fleet.views, now, TTL);
        fleet.act(&step);
        now += 1;
        let step = state.step(&fleet.views, now, TTL);
        assert_eq!(state.updated(), 1);
        fleet.act(&step);
        let node = fleet.node("edge-01");
        node.ready = false;
        node.detail = "Readiness probe failed: HTTP 503".into();
        now += 1;
        state.step(&fleet.views, now, TTL);
        assert_eq!(state.phase, Phase::Paused);
        assert_eq!(
            state.reason.as_deref(),
            Some("edge-01: its netd went unready after its upgrade (Readiness probe failed: HTTP 503)")
        );
    }

    #[test]
    fn a_rollout_paused_for_15_days_is_closed() {
        let fleet = Fleet::new(3);
        let mut state = start(&fleet);
        state.ask(Request::Pause).expect("pause");
        let step = state.step(&fleet.views, 1_000, TTL);
        assert!(step.upgrade.is_empty() && state.phase == Phase::Paused);
        let step = state.step(&fleet.views, 1_000 + TTL.as_secs() - 1, TTL);
        assert!(!step.close);
        let step = state.step(&fleet.views, 1_000 + TTL.as_secs(), TTL);
        assert!(step.close);
        assert!(step.lines[0].starts_with("closed: paused for 360h0m0s (longer than 360h0m0s)"), "{:?}", step.lines);
    }

    #[test]
    fn a_restarted_executor_replaces_only_netds_not_yet_on_the_target() {
        let mut fleet = Fleet::new(30);
        let mut state = start(&fleet);
        let mut now = 1_000;
        for _ in 0..3 {
            let step = state.step(&fleet.views, now, TTL);
            fleet.act(&step);
            now += 1;
        }
        // A batch of three started and saved; the executor died after
        // replacing the first node's netd only.
        let step = state.step(&fleet.views, now, TTL);
        assert_eq!(step.upgrade.len(), 3, "1, 2, then 3 (the cap of 30 nodes)");
        let saved = state.to_json();
        fleet.act(&Step { upgrade: step.upgrade[..1].to_vec(), ..Default::default() });
        fleet.node(&step.upgrade[0]).ready = false; // still starting
        let mut restarted = RolloutState::from_json(&saved).expect("state reads back");
        assert_eq!(restarted, state);
        let again = restarted.step(&fleet.views, now + 1, TTL);
        assert_eq!(again.upgrade, step.upgrade[1..], "only the node whose netd was not replaced");
        fleet.act(&again);
        fleet.views.values_mut().for_each(|v| v.ready = true);
        run(&mut restarted, &mut fleet, &mut now);
        assert_eq!(restarted.phase, Phase::Complete);
        assert!(fleet.upgrades.values().all(|&n| n == 1));
    }

    #[test]
    fn stored_states_round_trip_and_bad_ones_are_named() {
        let mut fleet = Fleet::new(3);
        let mut state = start(&fleet);
        let step = state.step(&fleet.views, 1_000, TTL);
        fleet.act(&step);
        state.ask(Request::Pause).expect("pause");
        let text = state.to_json();
        assert!(text.contains("\"format\": 1"), "{text}");
        assert!(
            text.contains("\"edge-01\": {\n      \"state\": \"upgrading\",\n      \"since\": 1000\n    }"),
            "{text}"
        );
        assert!(text.contains("\"request\": \"pause\""), "{text}");
        assert_eq!(RolloutState::from_json(&text).expect("reads"), state);
        assert_eq!(
            RolloutState::from_json(&text.replace("\"format\": 1", "\"format\": 2")),
            Err(StateError::Format { found: 2 })
        );
        for bad in
            ["", "{", "[]", "{\"format\": \"1\"}", &text[..text.len() / 2], &text.replace("\"pause\"", "\"stop\"")]
        {
            let error = RolloutState::from_json(bad).expect_err(bad);
            assert!(matches!(error, StateError::Unreadable(_)), "{bad}: {error}");
        }
        let error = RolloutState::from_json(&text.replace("\"upgrading\"", "\"exploded\"")).expect_err("unknown state");
        assert!(error.to_string().contains("nodes.edge-01"), "{error}");
    }
}
