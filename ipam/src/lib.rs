//! Persistent IP address management for netd: pod IPs pinned to pod names,
//! VTEP MACs pinned to node names.
//!
//! This crate knows nothing of netlink or CNI; netd's CNI plugin
//! (`netd-ipam`) and its daemon embed it, and so can other node agents.
//!
//! # Semantics
//! - [`Store::allocate`] gives a pod (`namespace/name`) its pinned address if
//!   it has one, else a free one; [`Store::release`] (CNI DEL) ends the
//!   attachment but keeps the pin (state `released`, with its time).
//! - A pin is freed only on the control plane's word — [`Store::reconcile`]
//!   with [`Authority::Authoritative`] (the pod is missing from a complete
//!   list), [`Store::free_released`] (the pod was deleted or moved to another
//!   node), or an explicit [`Store::forget`] — never by time alone, so a node
//!   cut off from the cloud does not give a pod's address away. An optional
//!   grace period delays even authoritative frees.
//! - The one exception is pressure: [`Store::allocate_or_reclaim`] (what the
//!   CNI plugin calls), finding a range set with no free address, takes the
//!   pin released longest ago rather than refusing a new pod, and reports
//!   which pod lost it. Only when every address is attached does it fail.
//! - An attached address (a container holds it) is never freed or
//!   reclaimed by any of these; only [`Store::forget`] drops it.
//! - Frees are counted persistently by [`FreeReason`]; [`Store::stats`]
//!   reads pins by state and the counters.
//! - [`Store::vtep_mac`] derives a node's VTEP MAC from its name (SHA-256,
//!   locally administered unicast), persists it, and settles clashes with
//!   known peers deterministically.
//! - [`Store::import_host_local`] adopts host-local's directory and
//!   OpenYurt's `<ip>_<namespace>_<name>` pin markers.
//!
//! # Storage: why SQLite, and the format
//! The store must be durable when a call returns, survive `kill -9` or a
//! power cut at any instant without ever yielding two pods with one address
//! or losing a pin, and be shared by the daemon and many concurrent CNI
//! plugin processes. SQLite (bundled, via `rusqlite`) gives exactly that with
//! decades of crash testing: every mutation is one `BEGIN IMMEDIATE`
//! transaction (writers serialise across processes through SQLite's file
//! locks, with a 30 s busy timeout), committed through a write-ahead log
//! (`journal_mode=WAL`) with `synchronous=FULL`: a commit appends its pages
//! to the log and fsyncs the log once, so it is on disk when it returns. (A
//! rollback journal needs five fsyncs per commit under FULL; under
//! `synchronous=NORMAL` a WAL commit is not durable.) The log is not
//! checkpointed and deleted when a connection closes
//! (`SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE`), so the short-lived plugin processes
//! neither create nor delete files per call; a handle that wrote checkpoints
//! it into the database file and truncates it when dropped once it has
//! reached 256 KiB ([`Store::checkpoint`]), which bounds what every process
//! opening the store first reads to rebuild the log's index. Invariants are
//! schema constraints rather than code: the address is the primary key, and
//! a unique index allows one pin per pod, interface and address family.
//! Pure-Rust embedded stores were ruled out because they lock the file for a
//! single process; a hand-rolled file format would need its own crash proof.
//!
//! On disk: one SQLite 3 file in WAL mode (plus its `-wal` log and `-shm`
//! index, kept between processes; copy the three together, or call
//! [`Store::checkpoint`] first, to copy a store), `PRAGMA application_id = 0x6e49504d` ("nIPM") and
//! `PRAGMA user_version` = [`FORMAT_VERSION`] (1). Tables, version 1:
//!
//! | table | columns |
//! | --- | --- |
//! | `allocation` | `ip` TEXT primary key (canonical text), `family` 4/6, `pod` `namespace/name` or NULL (host-local import), `ifname`, `container_id`, `state` `attached`/`released`, `since_ms` (Unix ms of the last state change) |
//! | `vtep_mac` | `node` primary key, `mac` `aa:bb:cc:dd:ee:ff`, `attempt` (derivation attempt), `since_ms` |
//! | `meta` | `key`, `value`: `last_reserved:<range set>` → the last address handed out; `host_local_imported` → Unix ms of the one-time import; `freed_total:<reason>` → pins freed for [`FreeReason`] `<reason>` (decimal text) |
//!
//! The counters were added without a format change: version 1 files
//! written before them simply have no `freed_total:*` rows (all zero), and
//! older builds ignore the rows.
//!
//! Files of builds before the write-ahead log (the same format in
//! `journal_mode=PERSIST`, with a persistent `-journal`) are converted on
//! their first open (SQLite removes the old journal); an older build opening
//! a converted file converts it back, so nodes can be upgraded and rolled
//! back with their stores. The `-shm` index is a shared memory mapping
//! between processes, so the store belongs on a local file system (as
//! SQLite's locking always required).
//!
//! A file with another application id, or a newer version, is refused with a
//! precise error and left untouched.
//!
//! # Example
//! ```
//! use netd_ipam::{Authority, Range, RangeSet, Store};
//! use std::collections::HashSet;
//! use std::time::Duration;
//!
//! # let dir = tempfile::tempdir().unwrap();
//! let mut store = Store::open(dir.path().join("ipam.db"))?;
//! let pool = [RangeSet::single(Range::new("10.244.3.0/24".parse().unwrap(), None, None, None)?)];
//! let web = "default/web-0".parse().unwrap();
//! let ip = store.allocate(&pool, &web, "container-1", "eth0")?[0].ip;
//! store.release("container-1", "eth0")?;
//!
//! // Cut off from the cloud: an empty pod list frees nothing.
//! store.reconcile(&HashSet::new(), Authority::Unverified, Duration::ZERO)?;
//! assert_eq!(store.allocate(&pool, &web, "container-2", "eth0")?[0].ip, ip);
//!
//! // The control plane says the pod is gone: its address is freed.
//! store.release("container-2", "eth0")?;
//! let report = store.reconcile(&HashSet::new(), Authority::Authoritative, Duration::ZERO)?;
//! assert_eq!(report.freed.len(), 1);
//! # Ok::<(), netd_ipam::Error>(())
//! ```

pub mod cni;
mod error;
mod import;
mod mac;
mod pool;
mod store;

pub use error::{Error, Result};
pub use import::ImportReport;
pub use mac::{derive_vtep_mac, MacAddr, MacCollision, MacParseError, VtepMac};
pub use netd_model::{PodRef, PodRefError};
pub use pool::{PoolError, Range, RangeSet};
pub use store::{
    Allocated, Allocation, Authority, FreeReason, FreedTotals, PinStats, Reclaimed, ReconcileReport, State, Store,
    APPLICATION_ID, FORMAT_VERSION,
};
