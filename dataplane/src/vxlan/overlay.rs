//! The overlay thread: keeps the kernel matching the wanted peers.
//!
//! Two paths. A registry event arrives as per-peer [`PeerChange`]s, which
//! are journaled and then written with only the netlink requests for those
//! peers (no dumps): the hot path. Full passes (four dumps, a diff, the
//! difference written) run for whole peer sets (a registry resync), for
//! kernel drift the netlink monitor reports, when an incremental write
//! fails, and on a slow periodic timer (anything notifications cannot tell).
//!
//! The monitor also hears the notifications of our own writes. The kernel
//! queues them before it acknowledges the request, so right after a batch
//! the thread drains the monitor and discards the events naming objects it
//! just wrote; anything else is somebody else's change and gets a pass.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use super::snapshot::{Snapshot, SnapshotError, SnapshotWriter};
use super::{Applied, Lease, OverlayConfig, PeerChange, ReconcileReport, Reconciler, VxlanError};
use netd_netlink::{Change, EthAddr, Event, Monitor};

/// Journals shorter than this are only compacted by the periodic pass.
const JOURNAL_MIN_COMPACT: usize = 1024;

/// How the overlay thread runs.
#[derive(Debug, Clone)]
pub struct OverlayOptions {
    /// Full pass at least this often, even without notifications; the
    /// snapshot's journal is compacted then too.
    pub resync_period: Duration,
    /// After a notification, wait this long for more before reconciling, so
    /// a burst (someone deleting many entries) costs one pass.
    pub debounce: Duration,
    /// Persist config and peers here (a snapshot plus its journal).
    pub snapshot: Option<PathBuf>,
    /// Subnets of the starting peers to record as autonomous in the
    /// snapshot (see [`Snapshot::autonomous`]).
    pub autonomous: Vec<Ipv4Net>,
}

impl Default for OverlayOptions {
    fn default() -> Self {
        Self {
            resync_period: Duration::from_secs(30),
            debounce: Duration::from_millis(10),
            snapshot: None,
            autonomous: Vec::new(),
        }
    }
}

/// Counters and the last outcome, for health checks and metrics.
#[derive(Debug, Clone, Default)]
pub struct OverlayStatus {
    /// Full passes run.
    pub reconciles: u64,
    /// Incremental batches applied (registry events without a full pass).
    pub applies: u64,
    /// Peers programmed after the last pass or batch.
    pub peers: usize,
    /// Kernel writes refused, in total.
    pub netlink_errors: u64,
    /// Device repairs made, in total.
    pub repairs: u64,
    /// The last successful full pass.
    pub last: Option<ReconcileReport>,
    /// The last incremental batch.
    pub last_apply: Option<ReconcileReport>,
    /// Bytes written to the snapshot and its journal, in total.
    pub snapshot_bytes_written: u64,
    /// The last failure (pass or snapshot), cleared by a successful pass.
    pub last_error: Option<String>,
}

/// A cheap handle on a running overlay's [`OverlayStatus`], for readers
/// that must never wait on the overlay itself (health checks).
#[derive(Debug, Clone, Default)]
pub struct StatusHandle(Arc<Mutex<OverlayStatus>>);

impl StatusHandle {
    /// The current status.
    pub fn get(&self) -> OverlayStatus {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn update(&self, f: impl FnOnce(&mut OverlayStatus)) {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

type Reply = Sender<Result<ReconcileReport, Arc<VxlanError>>>;

enum Command {
    /// A whole new peer set and the subnets among it marked autonomous.
    Replace(Vec<Lease>, Vec<Ipv4Net>, Option<Reply>),
    /// Per-peer changes.
    Apply(Vec<PeerChange>, Option<Reply>),
    Reconcile(Reply),
    Stop,
}

/// A running overlay; dropping or [`Overlay::stop`] ends the thread and
/// leaves the kernel state in place (pods keep talking across restarts).
pub struct Overlay {
    commands: Sender<Command>,
    wake: UnixStream,
    status: StatusHandle,
    thread: Option<JoinHandle<()>>,
}

impl Overlay {
    /// Starts the overlay thread in the calling thread's network namespace
    /// (threads inherit it) and programs `peers` right away. One lease per
    /// subnet: a later lease for a subnet replaces an earlier one.
    pub fn start(config: OverlayConfig, peers: Vec<Lease>, options: OverlayOptions) -> Result<Self, VxlanError> {
        let reconciler = Reconciler::new(config)?;
        let monitor = Monitor::new()?;
        let pipe_err = |source| VxlanError::Thread { what: "creating its wake-up pipe", source };
        let (wake, wake_rx) = UnixStream::pair().map_err(pipe_err)?;
        wake_rx.set_nonblocking(true).map_err(pipe_err)?;
        let (commands, rx) = mpsc::channel();
        let status = StatusHandle::default();
        let wanted: BTreeMap<Ipv4Net, Lease> = peers.into_iter().map(|p| (p.subnet, p)).collect();
        let autonomous = marked(&wanted, options.autonomous.clone());
        let snapshot = options.snapshot.clone().map(SnapshotWriter::new);
        let worker = Worker {
            reconciler,
            monitor,
            options,
            wanted,
            autonomous,
            snapshot,
            status: status.clone(),
            wake: wake_rx,
        };
        let thread = std::thread::Builder::new()
            .name("netd-overlay".into())
            .spawn(move || worker.run(rx))
            .map_err(|source| VxlanError::Thread { what: "spawning it", source })?;
        Ok(Self { commands, wake, status, thread: Some(thread) })
    }

    fn send(&self, command: Command) -> Result<(), VxlanError> {
        self.commands.send(command).map_err(|_| VxlanError::Stopped)?;
        // A full wake pipe already guarantees a wake-up.
        let _ = (&self.wake).write(&[1]);
        Ok(())
    }

    fn wait(reply: Receiver<Result<ReconcileReport, Arc<VxlanError>>>) -> Result<ReconcileReport, VxlanError> {
        match reply.recv() {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(error)) => Err(VxlanError::Pass(error)),
            Err(_) => Err(VxlanError::Stopped),
        }
    }

    /// Replaces the wanted peers (snapshot rewritten first, then a full
    /// pass); returns at once. None of them is marked autonomous.
    pub fn set_peers(&self, peers: Vec<Lease>) -> Result<(), VxlanError> {
        self.send(Command::Replace(peers, Vec::new(), None))
    }

    /// Like [`Overlay::set_peers`], and records the peers of `autonomous`
    /// as autonomous in the snapshot.
    pub fn set_peers_marking(&self, peers: Vec<Lease>, autonomous: Vec<Ipv4Net>) -> Result<(), VxlanError> {
        self.send(Command::Replace(peers, autonomous, None))
    }

    /// Replaces the wanted peers and waits for the pass that programs them.
    pub fn set_peers_and_wait(&self, peers: Vec<Lease>) -> Result<ReconcileReport, VxlanError> {
        let (reply, rx) = mpsc::channel();
        self.send(Command::Replace(peers, Vec::new(), Some(reply)))?;
        Self::wait(rx)
    }

    /// Applies per-peer changes: journaled, then only their kernel writes
    /// (the hot path); returns at once.
    pub fn apply(&self, changes: Vec<PeerChange>) -> Result<(), VxlanError> {
        self.send(Command::Apply(changes, None))
    }

    /// Like [`Overlay::apply`], and waits until the kernel holds the
    /// changes; the report counts the writes they took (or, when they
    /// needed one, the full pass's).
    pub fn apply_and_wait(&self, changes: Vec<PeerChange>) -> Result<ReconcileReport, VxlanError> {
        let (reply, rx) = mpsc::channel();
        self.send(Command::Apply(changes, Some(reply)))?;
        Self::wait(rx)
    }

    /// Runs a full pass now and returns its report.
    pub fn reconcile_now(&self) -> Result<ReconcileReport, VxlanError> {
        let (reply, rx) = mpsc::channel();
        self.send(Command::Reconcile(reply))?;
        Self::wait(rx)
    }

    /// Counters and the last outcome.
    pub fn status(&self) -> OverlayStatus {
        self.status.get()
    }

    /// A handle that reads the status without touching the overlay.
    pub fn status_handle(&self) -> StatusHandle {
        self.status.clone()
    }

    /// Stops the thread (it finishes the pass it is in); kernel state stays.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The marks that name one of `peers`.
fn marked(peers: &BTreeMap<Ipv4Net, Lease>, autonomous: Vec<Ipv4Net>) -> HashSet<Ipv4Net> {
    autonomous.into_iter().filter(|s| peers.contains_key(s)).collect()
}

/// A kernel object netd writes, as its notifications name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ObjectKey {
    Neighbour(Ipv4Addr),
    Fdb(EthAddr),
    Route(Ipv4Net),
    Nexthop(u32),
}

impl ObjectKey {
    fn of_change(change: &Change) -> Option<Self> {
        match change {
            Change::SetNeighbour(n) | Change::DeleteNeighbour(n) => Some(Self::Neighbour(n.ip)),
            Change::SetFdb(e) | Change::DeleteFdb(e) => Some(Self::Fdb(e.mac)),
            Change::SetRoute(r) | Change::DeleteRoute(r) => Some(Self::Route(r.dst)),
            Change::SetNexthop(n) | Change::DeleteNexthop(n) => Some(Self::Nexthop(n.id)),
            _ => None,
        }
    }

    fn of_event(event: &Event) -> Option<Self> {
        match event {
            Event::Neighbour { ip, .. } => ip.map(Self::Neighbour),
            Event::Fdb { mac, .. } => mac.map(Self::Fdb),
            Event::Route { dst, .. } => dst.map(Self::Route),
            Event::Nexthop { id } => id.map(Self::Nexthop),
            _ => None,
        }
    }
}

struct Worker {
    reconciler: Reconciler,
    monitor: Monitor,
    options: OverlayOptions,
    wanted: BTreeMap<Ipv4Net, Lease>,
    autonomous: HashSet<Ipv4Net>,
    snapshot: Option<SnapshotWriter>,
    status: StatusHandle,
    wake: UnixStream,
}

impl Worker {
    fn run(mut self, commands: Receiver<Command>) {
        self.write_snapshot();
        let mut full_pass = true;
        let mut changes: Vec<PeerChange> = Vec::new();
        let mut waiting: Vec<Reply> = Vec::new();
        let mut next_resync = Instant::now() + self.options.resync_period;
        loop {
            loop {
                match commands.try_recv() {
                    Ok(Command::Replace(peers, autonomous, reply)) => {
                        self.replace(peers, autonomous);
                        // The full pass covers whatever was pending too.
                        changes.clear();
                        waiting.extend(reply);
                        full_pass = true;
                    }
                    Ok(Command::Apply(batch, reply)) => {
                        let effective = self.fold(batch);
                        self.journal(&effective);
                        changes.extend(effective);
                        waiting.extend(reply);
                    }
                    Ok(Command::Reconcile(reply)) => {
                        waiting.push(reply);
                        full_pass = true;
                    }
                    Ok(Command::Stop) | Err(TryRecvError::Disconnected) => return,
                    Err(TryRecvError::Empty) => break,
                }
            }
            let periodic = Instant::now() >= next_resync;
            let outcome = if full_pass || periodic {
                changes.clear();
                if periodic {
                    self.compact();
                }
                next_resync = Instant::now() + self.options.resync_period;
                Some(self.pass())
            } else if !changes.is_empty() {
                Some(self.apply(std::mem::take(&mut changes)))
            } else {
                None
            };
            if let Some(outcome) = outcome {
                for reply in waiting.drain(..) {
                    let _ = reply.send(outcome.clone());
                }
                full_pass = self.drain_own_echoes();
                if full_pass {
                    continue;
                }
            }
            let timeout = next_resync.saturating_duration_since(Instant::now());
            match self.monitor.wait_or_wake(timeout, Some(self.wake.as_fd())) {
                Ok(events) => {
                    self.drain_wake();
                    if events.iter().any(|e| self.relevant(e)) {
                        // Let a burst settle, then one pass for all of it.
                        std::thread::sleep(self.options.debounce);
                        let _ = self.monitor.wait(Duration::ZERO);
                        full_pass = true;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "netlink monitor failed; relying on the periodic pass");
                    std::thread::sleep(Duration::from_millis(200));
                    full_pass = true;
                }
            }
        }
    }

    fn replace(&mut self, peers: Vec<Lease>, autonomous: Vec<Ipv4Net>) {
        let wanted: BTreeMap<Ipv4Net, Lease> = peers.into_iter().map(|p| (p.subnet, p)).collect();
        let autonomous = marked(&wanted, autonomous);
        if wanted != self.wanted || autonomous != self.autonomous {
            self.wanted = wanted;
            self.autonomous = autonomous;
            self.write_snapshot();
        }
    }

    /// Folds `batch` into the wanted set; returns the changes that changed it.
    fn fold(&mut self, batch: Vec<PeerChange>) -> Vec<PeerChange> {
        let mut effective = Vec::with_capacity(batch.len());
        for change in batch {
            match &change {
                PeerChange::Upsert { lease, autonomous } => {
                    let same = self.wanted.get(&lease.subnet) == Some(lease)
                        && self.autonomous.contains(&lease.subnet) == *autonomous;
                    if same {
                        continue;
                    }
                    if *autonomous {
                        self.autonomous.insert(lease.subnet);
                    } else {
                        self.autonomous.remove(&lease.subnet);
                    }
                    self.wanted.insert(lease.subnet, lease.clone());
                }
                PeerChange::Remove(subnet) => {
                    self.autonomous.remove(subnet);
                    if self.wanted.remove(subnet).is_none() {
                        continue;
                    }
                }
            }
            effective.push(change);
        }
        effective
    }

    /// Incremental writes for `changes`; a full pass when they need one or
    /// the kernel refused a write (drift).
    fn apply(&mut self, changes: Vec<PeerChange>) -> Result<ReconcileReport, Arc<VxlanError>> {
        match self.reconciler.apply(&changes) {
            Ok(Applied::Done(report)) if report.failures.is_empty() => {
                if !report.rejected.is_empty() {
                    for rejected in &report.rejected {
                        tracing::warn!(reason = %rejected.reason, subnet = %rejected.peer.subnet, "peer refused");
                    }
                }
                if report.writes > 0 {
                    tracing::debug!(
                        changes = changes.len(),
                        writes = report.writes,
                        elapsed_us = report.elapsed.as_micros() as u64,
                        "peer changes applied"
                    );
                }
                self.status.update(|status| {
                    status.applies += 1;
                    status.peers = report.peers;
                    status.last_apply = Some(report.clone());
                });
                Ok(report)
            }
            Ok(Applied::Done(report)) => {
                for failure in &report.failures {
                    tracing::warn!(%failure, "kernel refused an incremental write; running a full pass");
                }
                let refused = report.failures.len() as u64;
                self.status.update(|status| status.netlink_errors += refused);
                self.pass()
            }
            Ok(Applied::NeedsFullPass(reason)) => {
                tracing::debug!(reason, "peer changes need a full pass");
                self.pass()
            }
            Err(error) => {
                tracing::warn!(%error, "incremental write failed; running a full pass");
                self.pass()
            }
        }
    }

    /// Reads what our last writes made the kernel announce and drops it;
    /// true when something else changed meanwhile (worth a full pass).
    fn drain_own_echoes(&mut self) -> bool {
        let writes = self.reconciler.take_last_writes();
        let events = match self.monitor.wait(Duration::ZERO) {
            Ok(events) => events,
            Err(_) => return true,
        };
        if events.is_empty() {
            return false;
        }
        let written: HashSet<ObjectKey> = writes.iter().filter_map(ObjectKey::of_change).collect();
        drop(writes);
        events.iter().any(|event| {
            let ours = ObjectKey::of_event(event).is_some_and(|key| written.contains(&key));
            !ours && self.relevant(event)
        })
    }

    fn drain_wake(&mut self) {
        let mut buf = [0u8; 64];
        while matches!(self.wake.read(&mut buf), Ok(n) if n > 0) {}
    }

    fn relevant(&self, event: &Event) -> bool {
        let Some(device) = self.reconciler.device() else { return true };
        match event {
            Event::Link { index, name, .. } => {
                *index == device.index
                    || *index == device.underlay_index
                    || name.as_deref() == Some(self.reconciler.config().device_name().as_str())
            }
            // Direct routing decides per peer from the underlay's networks.
            Event::Address { index } => {
                *index == device.index || (self.reconciler.config().direct_routing && *index == device.underlay_index)
            }
            Event::Neighbour { ifindex, .. } | Event::Fdb { ifindex, .. } => *ifindex == device.index,
            Event::Route { oif, .. } => oif.is_none_or(|oif| oif == device.index || oif == device.underlay_index),
            Event::Nexthop { .. } | Event::Overflow => true,
        }
    }

    fn pass(&mut self) -> Result<ReconcileReport, Arc<VxlanError>> {
        let outcome = self.reconciler.reconcile(self.wanted.values());
        let status = self.status.clone();
        match outcome {
            Ok(report) => {
                for repair in &report.repairs {
                    tracing::warn!(repair = %repair, "VXLAN device drift repaired");
                }
                for rejected in &report.rejected {
                    tracing::warn!(reason = %rejected.reason, subnet = %rejected.peer.subnet, "peer refused");
                }
                for failure in &report.failures {
                    tracing::warn!(%failure, "kernel refused a write");
                }
                if report.writes > 0 {
                    tracing::info!(
                        writes = report.writes,
                        removed = report.removed,
                        peers = report.peers,
                        elapsed_ms = report.elapsed.as_secs_f64() * 1000.0,
                        "overlay reconciled"
                    );
                }
                status.update(|status| {
                    status.reconciles += 1;
                    status.peers = report.peers;
                    status.netlink_errors += report.failures.len() as u64;
                    status.repairs += report.repairs.len() as u64;
                    status.last = Some(report.clone());
                    status.last_error = None;
                });
                Ok(report)
            }
            Err(error) => {
                tracing::warn!(%error, "overlay pass failed; will retry");
                status.update(|status| {
                    status.reconciles += 1;
                    status.last_error = Some(error.to_string());
                });
                Err(Arc::new(error))
            }
        }
    }

    fn current_snapshot(&self) -> Snapshot {
        let autonomous = self.wanted.keys().filter(|s| self.autonomous.contains(s)).copied().collect();
        Snapshot::new(self.reconciler.config().clone(), self.wanted.values().cloned().collect())
            .with_autonomous(autonomous)
    }

    /// Rewrites the whole snapshot (and empties the journal).
    fn write_snapshot(&mut self) {
        let snapshot = match &self.snapshot {
            Some(_) => self.current_snapshot(),
            None => return,
        };
        let Some(writer) = &mut self.snapshot else { return };
        let outcome = writer.write(&snapshot);
        self.record_snapshot_outcome(outcome);
    }

    /// Journals effective changes before the kernel sees them; a journal
    /// grown as long as the peer set is folded into a fresh snapshot at
    /// once, so replay never costs more than reading two snapshots.
    fn journal(&mut self, changes: &[PeerChange]) {
        let Some(writer) = &mut self.snapshot else { return };
        let outcome = writer.append(changes);
        let full = writer.journal_records() > self.wanted.len().max(JOURNAL_MIN_COMPACT);
        self.record_snapshot_outcome(outcome);
        if full {
            self.write_snapshot();
        }
    }

    /// Folds the journal into a fresh snapshot when it holds anything.
    fn compact(&mut self) {
        if self.snapshot.as_ref().is_some_and(|w| w.journal_records() > 0) {
            self.write_snapshot();
        }
    }

    fn record_snapshot_outcome(&mut self, outcome: Result<(), SnapshotError>) {
        let written = self.snapshot.as_ref().map_or(0, SnapshotWriter::bytes_written);
        if let Err(error) = &outcome {
            tracing::warn!(%error, "cannot persist the overlay snapshot");
        }
        self.status.update(|status| {
            status.snapshot_bytes_written = written;
            if let Err(error) = outcome {
                status.last_error = Some(error.to_string());
            }
        });
    }
}
