//! The overlay thread: keeps the kernel matching the wanted peers, woken by
//! netlink notifications on the device (drift repair within milliseconds)
//! and by a slow periodic pass (anything notifications cannot tell).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::snapshot::Snapshot;
use crate::netlink::{Event, Monitor};

use ipnet::Ipv4Net;

use super::{Lease, OverlayConfig, ReconcileReport, Reconciler, VxlanError};

/// How the overlay thread runs.
#[derive(Debug, Clone)]
pub struct OverlayOptions {
    /// Full pass at least this often, even without notifications.
    pub resync_period: Duration,
    /// After a notification, wait this long for more before reconciling, so
    /// a burst (someone deleting many entries) costs one pass.
    pub debounce: Duration,
    /// Persist config and peers here on every change.
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
    /// Passes run.
    pub reconciles: u64,
    /// Peers programmed after the last successful pass.
    pub peers: usize,
    /// Kernel writes refused, in total.
    pub netlink_errors: u64,
    /// Device repairs made, in total.
    pub repairs: u64,
    /// The last successful pass.
    pub last: Option<ReconcileReport>,
    /// The last failure (pass or snapshot), cleared by a successful pass.
    pub last_error: Option<String>,
}

type Reply = Sender<Result<ReconcileReport, String>>;

enum Command {
    /// New peers and the subnets among them marked autonomous.
    Peers(Vec<Lease>, Vec<Ipv4Net>, Option<Reply>),
    Reconcile(Reply),
    Stop,
}

/// A running overlay; dropping or [`Overlay::stop`] ends the thread and
/// leaves the kernel state in place (pods keep talking across restarts).
pub struct Overlay {
    commands: Sender<Command>,
    wake: UnixStream,
    status: Arc<Mutex<OverlayStatus>>,
    thread: Option<JoinHandle<()>>,
}

impl Overlay {
    /// Starts the overlay thread in the calling thread's network namespace
    /// (threads inherit it) and programs `peers` right away.
    pub fn start(config: OverlayConfig, peers: Vec<Lease>, options: OverlayOptions) -> Result<Self, VxlanError> {
        let reconciler = Reconciler::new(config)?;
        let monitor = Monitor::new()?;
        let (wake, wake_rx) =
            UnixStream::pair().map_err(|e| VxlanError::Netlink(crate::netlink::NetlinkError::Socket(e)))?;
        wake_rx.set_nonblocking(true).map_err(|e| VxlanError::Netlink(crate::netlink::NetlinkError::Socket(e)))?;
        let (commands, rx) = mpsc::channel();
        let status = Arc::new(Mutex::new(OverlayStatus::default()));
        let autonomous = marked(&peers, options.autonomous.clone());
        let worker = Worker { reconciler, monitor, options, peers, autonomous, status: status.clone(), wake: wake_rx };
        let thread = std::thread::Builder::new()
            .name("netd-overlay".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| VxlanError::Netlink(crate::netlink::NetlinkError::Socket(e)))?;
        Ok(Self { commands, wake, status, thread: Some(thread) })
    }

    fn send(&self, command: Command) -> Result<(), VxlanError> {
        self.commands.send(command).map_err(|_| VxlanError::Stopped)?;
        // A full wake pipe already guarantees a wake-up.
        let _ = (&self.wake).write(&[1]);
        Ok(())
    }

    fn wait(reply: Receiver<Result<ReconcileReport, String>>) -> Result<ReconcileReport, VxlanError> {
        match reply.recv() {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(message)) => Err(VxlanError::Pass(message)),
            Err(_) => Err(VxlanError::Stopped),
        }
    }

    /// Replaces the wanted peers (snapshot written first); returns at once.
    /// None of them is marked autonomous.
    pub fn set_peers(&self, peers: Vec<Lease>) -> Result<(), VxlanError> {
        self.send(Command::Peers(peers, Vec::new(), None))
    }

    /// Like [`Overlay::set_peers`], and records the peers of `autonomous`
    /// as autonomous in the snapshot.
    pub fn set_peers_marking(&self, peers: Vec<Lease>, autonomous: Vec<Ipv4Net>) -> Result<(), VxlanError> {
        self.send(Command::Peers(peers, autonomous, None))
    }

    /// Replaces the wanted peers and waits for the pass that programs them.
    pub fn set_peers_and_wait(&self, peers: Vec<Lease>) -> Result<ReconcileReport, VxlanError> {
        let (reply, rx) = mpsc::channel();
        self.send(Command::Peers(peers, Vec::new(), Some(reply)))?;
        Self::wait(rx)
    }

    /// Runs a pass now and returns its report.
    pub fn reconcile_now(&self) -> Result<ReconcileReport, VxlanError> {
        let (reply, rx) = mpsc::channel();
        self.send(Command::Reconcile(reply))?;
        Self::wait(rx)
    }

    /// Counters and the last outcome.
    pub fn status(&self) -> OverlayStatus {
        self.status.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Stops the thread; kernel state stays.
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

/// The marks that name one of `peers` (in an edge pool every peer may be
/// marked, so no peers × marks scan on each update).
fn marked(peers: &[Lease], autonomous: Vec<Ipv4Net>) -> Vec<Ipv4Net> {
    if autonomous.is_empty() {
        return autonomous;
    }
    let present: std::collections::HashSet<Ipv4Net> = peers.iter().map(|p| p.subnet).collect();
    autonomous.into_iter().filter(|s| present.contains(s)).collect()
}

struct Worker {
    reconciler: Reconciler,
    monitor: Monitor,
    options: OverlayOptions,
    peers: Vec<Lease>,
    autonomous: Vec<Ipv4Net>,
    status: Arc<Mutex<OverlayStatus>>,
    wake: UnixStream,
}

impl Worker {
    fn run(mut self, commands: Receiver<Command>) {
        self.save_snapshot();
        let mut dirty = true;
        let mut waiting: Vec<Reply> = Vec::new();
        let mut next_resync = Instant::now() + self.options.resync_period;
        loop {
            loop {
                match commands.try_recv() {
                    Ok(Command::Peers(peers, autonomous, reply)) => {
                        let autonomous = marked(&peers, autonomous);
                        if peers != self.peers || autonomous != self.autonomous {
                            self.peers = peers;
                            self.autonomous = autonomous;
                            self.save_snapshot();
                        }
                        waiting.extend(reply);
                        dirty = true;
                    }
                    Ok(Command::Reconcile(reply)) => {
                        waiting.push(reply);
                        dirty = true;
                    }
                    Ok(Command::Stop) | Err(TryRecvError::Disconnected) => return,
                    Err(TryRecvError::Empty) => break,
                }
            }
            if dirty || Instant::now() >= next_resync {
                let outcome = self.pass();
                for reply in waiting.drain(..) {
                    let _ = reply.send(outcome.clone());
                }
                dirty = false;
                next_resync = Instant::now() + self.options.resync_period;
            }
            let timeout = next_resync.saturating_duration_since(Instant::now());
            match self.monitor.wait_or_wake(timeout, Some(self.wake.as_fd())) {
                Ok(events) => {
                    self.drain_wake();
                    if events.iter().any(|e| self.relevant(e)) {
                        // Let a burst settle, then one pass for all of it.
                        std::thread::sleep(self.options.debounce);
                        let _ = self.monitor.wait(Duration::ZERO);
                        dirty = true;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "netlink monitor failed; relying on the periodic pass");
                    std::thread::sleep(Duration::from_millis(200));
                    dirty = true;
                }
            }
        }
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
            Event::Address { index } => *index == device.index,
            Event::Neighbour { ifindex } => *ifindex == device.index,
            Event::Route { oif } => oif.is_none_or(|oif| oif == device.index || oif == device.underlay_index),
            Event::Nexthop | Event::Overflow => true,
        }
    }

    fn pass(&mut self) -> Result<ReconcileReport, String> {
        let outcome = self.reconciler.reconcile(&self.peers);
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        status.reconciles += 1;
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
                status.peers = report.peers;
                status.netlink_errors += report.failures.len() as u64;
                status.repairs += report.repairs.len() as u64;
                status.last = Some(report.clone());
                status.last_error = None;
                Ok(report)
            }
            Err(error) => {
                tracing::warn!(%error, "overlay pass failed; will retry");
                status.last_error = Some(error.to_string());
                Err(error.to_string())
            }
        }
    }

    fn save_snapshot(&mut self) {
        let Some(path) = &self.options.snapshot else { return };
        let snapshot = Snapshot::new(self.reconciler.config().clone(), self.peers.clone())
            .with_autonomous(self.autonomous.clone());
        if let Err(error) = snapshot.save(path) {
            tracing::warn!(%error, "cannot persist the overlay snapshot");
            self.status.lock().unwrap_or_else(PoisonError::into_inner).last_error = Some(error.to_string());
        }
    }
}
