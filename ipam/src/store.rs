//! The crash-safe, multi-process allocation store (SQLite; see the crate docs
//! for the format and why).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};

use crate::error::{Error, Result};
use crate::pool::RangeSet;
use netd_model::PodRef;

/// `PRAGMA application_id` of netd IPAM stores ("nIPM").
pub const APPLICATION_ID: i64 = 0x6e49_504d;
/// On-disk format version (`PRAGMA user_version`) this build writes and reads.
pub const FORMAT_VERSION: i64 = 1;
/// How long a writer waits for another process's transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Size of the write-ahead log from which a handle that wrote checkpoints
/// it into the database file and truncates it when it is dropped. Every
/// process that opens the store first (no other connection open) rebuilds
/// the log's index by reading the whole log, and every checkpoint costs two
/// fsyncs plus one for the next commit's fresh log header: 256 KiB (~60
/// pages; a checkpoint every 22 calls of the CNI benchmark) kept both small
/// here (2.13 fsyncs and 40 page reads per call over 200 ADD/DEL calls,
/// against 2.50 and 17 at 64 KiB, 2.03 and 125 at 1 MiB).
const WAL_CHECKPOINT_BYTES: u64 = 256 << 10;
/// How long that checkpoint waits for other processes' readers and writers
/// before leaving the log for the next handle: the commits are durable
/// already, so a caller is never held up long for housekeeping.
const CHECKPOINT_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

const SCHEMA_V1: &str = "
CREATE TABLE allocation (
    ip           TEXT PRIMARY KEY NOT NULL,
    family       INTEGER NOT NULL CHECK (family IN (4, 6)),
    pod          TEXT,
    ifname       TEXT NOT NULL,
    container_id TEXT,
    state        TEXT NOT NULL CHECK (state IN ('attached', 'released')),
    since_ms     INTEGER NOT NULL
);
CREATE UNIQUE INDEX allocation_pin ON allocation (pod, ifname, family) WHERE pod IS NOT NULL;
CREATE INDEX allocation_container ON allocation (container_id, ifname);
CREATE TABLE vtep_mac (
    node     TEXT PRIMARY KEY NOT NULL,
    mac      TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    since_ms INTEGER NOT NULL
);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
";

/// Whether an address is in use by a container or only pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A container holds the address (CNI ADD without DEL yet).
    Attached,
    /// The container is gone (CNI DEL); the pod keeps the address pinned.
    Released,
}

impl State {
    /// The stable lowercase name stored in the file (`attached`,
    /// `released`), also fit as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Attached => "attached",
            State::Released => "released",
        }
    }
}

/// One address of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The address.
    pub ip: IpAddr,
    /// The pod it is pinned to; `None` for attachments imported from
    /// host-local, which never recorded pod identity.
    pub pod: Option<PodRef>,
    /// Interface name inside the pod (`eth0`).
    pub ifname: String,
    /// The container (sandbox) that holds or last held it.
    pub container_id: Option<String>,
    /// Attached or released.
    pub state: State,
    /// When the state last changed.
    pub since: SystemTime,
}

/// Who vouches for a list of live pods handed to [`Store::reconcile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authority {
    /// The control plane answered: pods missing from the list are really gone.
    Authoritative,
    /// Local or stale knowledge (node cut off from the cloud): frees nothing.
    Unverified,
}

/// What a reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Pins freed because their pods are gone (and past the grace period).
    pub freed: Vec<(PodRef, IpAddr)>,
    /// Released pins of absent pods kept because they changed state within the grace period.
    pub kept_in_grace: usize,
    /// Released pins of absent pods kept because the list was not authoritative.
    pub kept_unverified: usize,
    /// Pins of absent pods kept because a container still holds them: an
    /// attached address is never freed, whatever the list says (the list may
    /// predate the pod, and freeing it would hand a live pod's IP to another).
    pub kept_attached: usize,
}

/// Why a pin was freed. Each reason has a persistent counter in the store
/// (meta row `freed_total:<name>`), read back by [`Store::stats`], because the
/// CNI plugin that frees under pressure is a short-lived process and the
/// daemon exports the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FreeReason {
    /// The control plane deleted the pod (a watch event, after the grace period).
    Deleted,
    /// The pod is now bound to another node.
    Moved,
    /// An authoritative pod list no longer contains the pod ([`Store::reconcile`]).
    List,
    /// A new pod needed an address, the pool had no free one, and this was
    /// the pin released longest ago ([`Store::allocate_or_reclaim`]).
    Pressure,
}

impl FreeReason {
    /// Every reason, in a stable order (for exporting counters).
    pub const ALL: [FreeReason; 4] = [FreeReason::Deleted, FreeReason::Moved, FreeReason::List, FreeReason::Pressure];

    /// The stable lowercase name (`deleted`, `moved`, `list`, `pressure`),
    /// used in the store's meta rows and as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FreeReason::Deleted => "deleted",
            FreeReason::Moved => "moved",
            FreeReason::List => "list",
            FreeReason::Pressure => "pressure",
        }
    }

    fn meta_key(self) -> String {
        format!("{FREED_KEY_PREFIX}{}", self.as_str())
    }
}

impl std::fmt::Display for FreeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Prefix of the meta rows counting frees by reason.
const FREED_KEY_PREFIX: &str = "freed_total:";

/// Pins freed since the store was created, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FreedTotals {
    /// [`FreeReason::Deleted`].
    pub deleted: u64,
    /// [`FreeReason::Moved`].
    pub moved: u64,
    /// [`FreeReason::List`].
    pub list: u64,
    /// [`FreeReason::Pressure`].
    pub pressure: u64,
}

impl FreedTotals {
    /// The total for one reason.
    pub fn get(&self, reason: FreeReason) -> u64 {
        match reason {
            FreeReason::Deleted => self.deleted,
            FreeReason::Moved => self.moved,
            FreeReason::List => self.list,
            FreeReason::Pressure => self.pressure,
        }
    }

    fn slot(&mut self, reason: FreeReason) -> &mut u64 {
        match reason {
            FreeReason::Deleted => &mut self.deleted,
            FreeReason::Moved => &mut self.moved,
            FreeReason::List => &mut self.list,
            FreeReason::Pressure => &mut self.pressure,
        }
    }

    /// All reasons together.
    pub fn total(&self) -> u64 {
        FreeReason::ALL.iter().fold(0u64, |sum, r| sum.saturating_add(self.get(*r)))
    }
}

/// A snapshot of the store for metrics ([`Store::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PinStats {
    /// Addresses held by a container (state attached), including host-local
    /// imports that do not know their pod yet.
    pub attached: u64,
    /// Addresses pinned to a pod whose container is gone (state released).
    pub released: u64,
    /// Pins freed since the store was created, by reason. [`Store::forget`]
    /// (an explicit operator action) is not counted.
    pub freed: FreedTotals,
}

/// A released pin taken from its pod because the pool was full
/// ([`Store::allocate_or_reclaim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    /// The pod that lost its pin.
    pub pod: PodRef,
    /// The address, now the new pod's.
    pub ip: IpAddr,
    /// The interface the pin was for.
    pub ifname: String,
    /// When its container was released (CNI DEL), or the pin imported.
    pub released_since: SystemTime,
    /// How long it had been released when it was reclaimed.
    pub released_for: Duration,
    /// The full range set it was reclaimed in (its `Display` form).
    pub range_set: String,
}

/// What [`Store::allocate_or_reclaim`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    /// One address per range set, in order (as [`Store::allocate`] returns).
    pub allocations: Vec<Allocation>,
    /// Released pins taken from other pods to make room; empty unless a
    /// range set was full.
    pub reclaimed: Vec<Reclaimed>,
}

/// What to do when a range set has no free address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WhenFull {
    Fail,
    ReclaimOldestReleased,
}

/// The address `pick_free` chose.
enum Pick {
    Free(IpAddr),
    Reclaim(Reclaimed),
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

fn ms_to_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn family_of(ip: IpAddr) -> i64 {
    if ip.is_ipv4() {
        4
    } else {
        6
    }
}

/// Raw row as stored, before parsing.
struct Row {
    ip: String,
    pod: Option<String>,
    ifname: String,
    container_id: Option<String>,
    state: String,
    since_ms: i64,
}

const ROW_COLUMNS: &str = "ip, pod, ifname, container_id, state, since_ms";

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        ip: r.get(0)?,
        pod: r.get(1)?,
        ifname: r.get(2)?,
        container_id: r.get(3)?,
        state: r.get(4)?,
        since_ms: r.get(5)?,
    })
}

/// The allocation store: one SQLite file shared by the daemon and every CNI
/// plugin process on the node. Every mutating call is one `BEGIN IMMEDIATE`
/// transaction, durable when it returns: its pages are appended to the
/// write-ahead log (`<file>-wal`), which is fsynced once at the commit.
/// Dropping a handle that wrote checkpoints the log into the database file
/// once it has grown past 256 KiB ([`Store::checkpoint`]).
///
/// ```
/// use netd_ipam::{Range, RangeSet, Store};
/// # let dir = tempfile::tempdir().unwrap();
/// let mut store = Store::open(dir.path().join("ipam.db"))?;
/// let pool = RangeSet::single(Range::new("10.244.3.0/24".parse().unwrap(), None, None, None)?);
/// let pod = "default/web-0".parse().unwrap();
/// let first = store.allocate(&[pool.clone()], &pod, "c1", "eth0")?;
/// store.release("c1", "eth0")?;
/// // Sandbox re-created (new container ID): same pod, same address.
/// let again = store.allocate(&[pool], &pod, "c2", "eth0")?;
/// assert_eq!(first[0].ip, again[0].ip);
/// # Ok::<(), netd_ipam::Error>(())
/// ```
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Only a handle that wrote: a reader (metrics, a reconcile with
        // nothing to free) must not write. Best effort: every commit is
        // durable already; a checkpoint that fails or finds the log busy
        // leaves it for the next handle that writes.
        if self.conn.total_changes() == 0 {
            return;
        }
        let log = wal_path(&self.path);
        if std::fs::metadata(log).is_ok_and(|m| m.len() >= WAL_CHECKPOINT_BYTES) {
            let _ = self.checkpoint();
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store at `path`. Creates missing parent
    /// directories. Refuses files that are not netd stores or are newer.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let created = !path.exists();
        if created {
            std::fs::create_dir_all(&dir).map_err(|source| Error::Dir {
                path: dir.clone(),
                action: "creating",
                source,
            })?;
        }
        let unreadable = |source| Error::Unreadable { path: path.clone(), source };
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(unreadable)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(unreadable)?;
        let mut store = Self { conn, path };
        store.prepare()?;
        if created {
            // The new file's directory entry must survive a power cut too.
            sync_dir(&dir)?;
        }
        Ok(store)
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Copies the write-ahead log into the database file (fsyncing both)
    /// and truncates the log to zero bytes. `Ok(true)` when done, `Ok(false)`
    /// when another process's reader or writer kept it from finishing within
    /// 100 ms (the next checkpoint finishes it). Commits are durable without
    /// it: this only bounds the log, which every process opening the store
    /// first reads in full. A handle that wrote does it when dropped once the
    /// log has reached 256 KiB; call it to get a self-contained database file
    /// (a backup by copying the file alone).
    pub fn checkpoint(&mut self) -> Result<bool> {
        let sql = self.sql("checkpointing the write-ahead log");
        self.conn.busy_timeout(CHECKPOINT_BUSY_TIMEOUT).map_err(&sql)?;
        let outcome = self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0));
        let restored = self.conn.busy_timeout(BUSY_TIMEOUT);
        let busy = outcome.map_err(&sql)?;
        restored.map_err(&sql)?;
        Ok(busy == 0)
    }

    fn sql(&self, action: &'static str) -> impl Fn(rusqlite::Error) -> Error + '_ {
        move |source| Error::Sql { path: self.path.clone(), action, source }
    }

    fn prepare(&mut self) -> Result<()> {
        let path = self.path.clone();
        let unreadable = |source| Error::Unreadable { path: path.clone(), source };
        // SQLite's default is to checkpoint the write-ahead log and delete it
        // when the last connection closes: every short-lived CNI process
        // would pay two more fsyncs and re-create the log (with a directory
        // fsync) on its next start. The log stays; `Drop` checkpoints it once
        // it is large.
        self.conn
            .set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(unreadable)?;
        // Reading the header first turns a garbage file into a clear error
        // before any write is attempted.
        let app_id: i64 = self.conn.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(unreadable)?;
        let version: i64 = self.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(unreadable)?;
        if app_id != 0 && app_id != APPLICATION_ID {
            return Err(Error::Foreign { path, found: app_id });
        }
        if version > FORMAT_VERSION {
            return Err(Error::NewerFormat { path, found: version, supported: FORMAT_VERSION });
        }
        // Write-ahead log with synchronous=FULL: a commit appends its pages
        // to the log and fsyncs it once, so it is on disk when it returns.
        // The rollback journal (PERSIST, what format version 1 files were
        // first written with) needs five fsyncs per commit under FULL
        // (journal, its directory, journal header, database, the zeroed
        // header that is the commit point); under NORMAL a WAL commit is not
        // durable. The mode is stored in the file, so an older file is
        // converted here, on its first open by this build.
        self.set_journal_mode()?;
        self.conn.pragma_update(None, "synchronous", "FULL").map_err(unreadable)?;
        // What a long-lived handle's automatic checkpoints leave of the log
        // (of the rollback journal, should the file stay in PERSIST).
        self.conn.pragma_update(None, "journal_size_limit", 1 << 20).map_err(unreadable)?;
        if version == FORMAT_VERSION && app_id == APPLICATION_ID {
            return Ok(());
        }
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(unreadable)?;
        // Another process may have initialised the file while we waited.
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(unreadable)?;
        if version == 0 {
            let tables: i64 = tx
                .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table'", [], |r| r.get(0))
                .map_err(unreadable)?;
            if tables != 0 {
                return Err(Error::Foreign { path, found: 0 });
            }
            tx.execute_batch(SCHEMA_V1).map_err(unreadable)?;
            tx.pragma_update(None, "application_id", APPLICATION_ID).map_err(unreadable)?;
            tx.pragma_update(None, "user_version", FORMAT_VERSION).map_err(unreadable)?;
        }
        tx.commit().map_err(unreadable)
    }

    fn set_journal_mode(&self) -> Result<()> {
        if self.try_journal_mode("WAL")?.eq_ignore_ascii_case("wal") {
            return Ok(());
        }
        // SQLite keeps the old mode where its VFS cannot share the log's
        // index (not the case for the unix VFS this crate bundles); the
        // rollback journal is durable too, only slower.
        self.try_journal_mode("PERSIST").map(drop)
    }

    /// Sets the journal mode; the mode the file is in afterwards.
    fn try_journal_mode(&self, mode: &str) -> Result<String> {
        // Changing the mode (a file of an older netd in PERSIST mode, or of
        // another tool) needs a brief exclusive lock that the busy handler
        // does not cover; retry. A file already in the mode needs no lock.
        let mut delay = Duration::from_millis(1);
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        let sql = format!("PRAGMA journal_mode = {mode}");
        loop {
            match self.conn.query_row(&sql, [], |r| r.get::<_, String>(0)) {
                Ok(now) => return Ok(now),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(50));
                }
                Err(source) => return Err(Error::Unreadable { path: self.path.clone(), source }),
            }
        }
    }

    fn begin(&mut self) -> Result<Transaction<'_>> {
        let path = self.path.clone();
        self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|source| Error::Sql {
            path,
            action: "starting a write transaction",
            source,
        })
    }

    fn parse_row(path: &Path, row: Row) -> Result<Allocation> {
        let corrupt = |why: String| Error::Corrupt { path: path.to_path_buf(), row: row.ip.clone(), why };
        let ip: IpAddr = row.ip.parse().map_err(|_| corrupt("not an IP address".into()))?;
        let pod =
            row.pod.as_deref().map(str::parse::<PodRef>).transpose().map_err(|e| corrupt(format!("bad pod: {e}")))?;
        let state = match row.state.as_str() {
            "attached" => State::Attached,
            "released" => State::Released,
            other => return Err(corrupt(format!("unknown state {other:?}"))),
        };
        Ok(Allocation {
            ip,
            pod,
            ifname: row.ifname,
            container_id: row.container_id,
            state,
            since: ms_to_time(row.since_ms),
        })
    }

    /// Gives the pod one address from each range set, all or nothing, and
    /// never takes a pin from another pod: when a set has no free address
    /// this fails with [`Error::Exhausted`], even if released pins hold the
    /// whole pool. The CNI plugin uses [`Store::allocate_or_reclaim`] instead.
    ///
    /// Per set, in order of preference: the address this container already
    /// holds (a retried ADD), the pod's pinned address (same pod, new sandbox
    /// or after a reboot: the old container is taken over), else a free
    /// address after the last one handed out (host-local's round robin). A pin
    /// outside the set (the node's subnet changed) moves to the new address.
    pub fn allocate(
        &mut self,
        sets: &[RangeSet],
        pod: &PodRef,
        container_id: &str,
        ifname: &str,
    ) -> Result<Vec<Allocation>> {
        self.allocate_when_full(sets, pod, container_id, ifname, WhenFull::Fail).map(|done| done.allocations)
    }

    /// [`Store::allocate`], except that a range set with no free address
    /// does not refuse the pod while a released pin exists in it: the pin
    /// released longest ago (oldest `since`; ties by address) is freed and
    /// its address handed to this pod, in the same `BEGIN IMMEDIATE`
    /// transaction, so no other process ever sees the address free or held
    /// twice. An attached pin is never taken. Each reclaim is counted
    /// ([`FreeReason::Pressure`]) and returned so the caller can say which
    /// pod lost its pin.
    ///
    /// This is the one exception to "a pin is never freed by time alone":
    /// without it a node whose workloads create new pod names (Deployments,
    /// Jobs) stops starting pods once every address is pinned by pods that
    /// are long gone, and a cut-off node never learns that they are gone.
    /// It fails with [`Error::Exhausted`] only when every address of a set
    /// is attached.
    pub fn allocate_or_reclaim(
        &mut self,
        sets: &[RangeSet],
        pod: &PodRef,
        container_id: &str,
        ifname: &str,
    ) -> Result<Allocated> {
        self.allocate_when_full(sets, pod, container_id, ifname, WhenFull::ReclaimOldestReleased)
    }

    fn allocate_when_full(
        &mut self,
        sets: &[RangeSet],
        pod: &PodRef,
        container_id: &str,
        ifname: &str,
        when_full: WhenFull,
    ) -> Result<Allocated> {
        check_families(sets)?;
        let path = self.path.clone();
        let pod_text = pod.to_string();
        let now = now_ms();
        let tx = self.begin()?;
        let sql = |action| crate::error::sql_err(&path, action);
        let mut result = Vec::with_capacity(sets.len());
        let mut reclaimed = Vec::new();
        for set in sets {
            let candidates: Vec<Allocation> = {
                let mut stmt = tx
                    .prepare_cached(&format!(
                        "SELECT {ROW_COLUMNS} FROM allocation
                         WHERE ifname = ?1 AND (container_id = ?2 OR pod = ?3)"
                    ))
                    .map_err(sql("looking up the pod's addresses"))?;
                let rows = stmt
                    .query_map(params![ifname, container_id, pod_text], read_row)
                    .map_err(sql("looking up the pod's addresses"))?;
                let mut parsed = Vec::new();
                for row in rows {
                    parsed.push(Self::parse_row(&path, row.map_err(sql("reading a row"))?)?);
                }
                parsed
            };
            let own = candidates.iter().find(|a| a.container_id.as_deref() == Some(container_id) && set.contains(a.ip));
            let pinned = candidates.iter().find(|a| a.pod.as_ref() == Some(pod) && set.contains(a.ip));
            let chosen = match own.or(pinned) {
                Some(existing) => {
                    // A stale pin of the same family elsewhere would violate the
                    // one-pin-per-family rule when `existing` gets the pod.
                    tx.execute(
                        "DELETE FROM allocation WHERE pod = ?1 AND ifname = ?2 AND family = ?3 AND ip <> ?4",
                        params![pod_text, ifname, family_of(existing.ip), existing.ip.to_string()],
                    )
                    .map_err(sql("dropping a superseded pin"))?;
                    tx.execute(
                        "UPDATE allocation SET pod = ?1, container_id = ?2, state = 'attached', since_ms = ?3
                         WHERE ip = ?4",
                        params![pod_text, container_id, now, existing.ip.to_string()],
                    )
                    .map_err(sql("re-attaching a pinned address"))?;
                    existing.ip
                }
                None => {
                    let ip = match Self::pick_free(&tx, &path, set, when_full, now)? {
                        Pick::Free(ip) => ip,
                        Pick::Reclaim(victim) => {
                            // Conditional on the state read in this same
                            // transaction: exactly the released row goes.
                            let gone = tx
                                .execute(
                                    "DELETE FROM allocation WHERE ip = ?1 AND state = 'released'",
                                    params![victim.ip.to_string()],
                                )
                                .map_err(sql("reclaiming a released pin"))?;
                            if gone != 1 {
                                return Err(Error::Corrupt {
                                    path: path.clone(),
                                    row: victim.ip.to_string(),
                                    why: format!(
                                        "the released pin to reclaim vanished inside the transaction ({gone} rows)"
                                    ),
                                });
                            }
                            let ip = victim.ip;
                            reclaimed.push(victim);
                            ip
                        }
                    };
                    // The pod's pin of this family lies outside the pool now: it moves.
                    tx.execute(
                        "DELETE FROM allocation WHERE pod = ?1 AND ifname = ?2 AND family = ?3",
                        params![pod_text, ifname, family_of(ip)],
                    )
                    .map_err(sql("dropping a pin outside the pool"))?;
                    tx.execute(
                        "INSERT INTO allocation (ip, family, pod, ifname, container_id, state, since_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, 'attached', ?6)",
                        params![ip.to_string(), family_of(ip), pod_text, ifname, container_id, now],
                    )
                    .map_err(sql("recording a new address"))?;
                    tx.execute(
                        "INSERT INTO meta (key, value) VALUES (?1, ?2)
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        params![format!("last_reserved:{}", set.key()), ip.to_string()],
                    )
                    .map_err(sql("recording the last reserved address"))?;
                    ip
                }
            };
            result.push(Allocation {
                ip: chosen,
                pod: Some(pod.clone()),
                ifname: ifname.to_string(),
                container_id: Some(container_id.to_string()),
                state: State::Attached,
                since: ms_to_time(now),
            });
        }
        count_freed(&tx, &path, FreeReason::Pressure, reclaimed.len())?;
        tx.commit().map_err(|source| Error::Sql {
            path: self.path.clone(),
            action: "committing an allocation",
            source,
        })?;
        Ok(Allocated { allocations: result, reclaimed })
    }

    fn pick_free(tx: &Transaction<'_>, path: &Path, set: &RangeSet, when_full: WhenFull, now: i64) -> Result<Pick> {
        let sql = |action| crate::error::sql_err(path, action);
        let last: Option<IpAddr> = tx
            .query_row("SELECT value FROM meta WHERE key = ?1", params![format!("last_reserved:{}", set.key())], |r| {
                r.get::<_, String>(0)
            })
            .optional()
            .map_err(sql("reading the last reserved address"))?
            .and_then(|text| text.parse().ok());
        struct Used {
            state: State,
            pod: Option<String>,
            ifname: String,
            since_ms: i64,
        }
        let mut used: HashMap<IpAddr, Used> = HashMap::new();
        {
            let mut stmt = tx
                .prepare_cached("SELECT ip, state, pod, ifname, since_ms FROM allocation")
                .map_err(sql("listing used addresses"))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        Used {
                            state: if r.get::<_, String>(1)? == "attached" { State::Attached } else { State::Released },
                            pod: r.get(2)?,
                            ifname: r.get(3)?,
                            since_ms: r.get(4)?,
                        },
                    ))
                })
                .map_err(sql("listing used addresses"))?;
            for row in rows {
                let (ip, row) = row.map_err(sql("listing used addresses"))?;
                // Unparseable rows cannot be handed out again anyway; they
                // are reported by `allocations()`.
                if let Ok(ip) = ip.parse::<IpAddr>() {
                    used.insert(ip, row);
                }
            }
        }
        if let Some(ip) = set.candidates(last).find(|ip| !used.contains_key(ip)) {
            return Ok(Pick::Free(ip));
        }
        if when_full == WhenFull::ReclaimOldestReleased {
            // The pod gone longest is the least likely to come back; ties
            // (same millisecond) by address, so the choice is deterministic.
            // A row whose pod does not parse is damaged: it is left for
            // `allocations()` to report rather than silently reused.
            let victim = used
                .iter()
                .filter(|(ip, u)| u.state == State::Released && set.contains(**ip))
                .filter_map(|(ip, u)| Some((*ip, u, u.pod.as_deref()?.parse::<PodRef>().ok()?)))
                .min_by_key(|(ip, u, _)| (u.since_ms, *ip));
            if let Some((ip, u, pod)) = victim {
                let released_for = Duration::from_millis(u64::try_from(now.saturating_sub(u.since_ms)).unwrap_or(0));
                return Ok(Pick::Reclaim(Reclaimed {
                    pod,
                    ip,
                    ifname: u.ifname.clone(),
                    released_since: ms_to_time(u.since_ms),
                    released_for,
                    range_set: set.to_string(),
                }));
            }
        }
        let in_set = used.iter().filter(|(ip, _)| set.contains(**ip));
        let (attached, released) = in_set.fold((0, 0), |(a, r), (_, u)| match u.state {
            State::Attached => (a + 1, r),
            State::Released => (a, r + 1),
        });
        Err(Error::Exhausted { range_set: set.to_string(), capacity: set.capacity(), attached, released })
    }

    /// Ends the attachment of `container_id`/`ifname` (CNI DEL). Pinned
    /// addresses stay reserved for their pod (state released); host-local
    /// imports without pod identity are freed. Unknown containers are not an
    /// error (DEL must be idempotent). Returns what was released.
    pub fn release(&mut self, container_id: &str, ifname: &str) -> Result<Vec<Allocation>> {
        let path = self.path.clone();
        let now = now_ms();
        let tx = self.begin()?;
        let sql = |action| crate::error::sql_err(&path, action);
        let mut released = Vec::new();
        {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT {ROW_COLUMNS} FROM allocation
                     WHERE container_id = ?1 AND ifname = ?2 AND state = 'attached'"
                ))
                .map_err(sql("looking up the container"))?;
            let rows =
                stmt.query_map(params![container_id, ifname], read_row).map_err(sql("looking up the container"))?;
            for row in rows {
                let mut allocation = Self::parse_row(&path, row.map_err(sql("reading a row"))?)?;
                allocation.state = State::Released;
                allocation.since = ms_to_time(now);
                released.push(allocation);
            }
        }
        tx.execute(
            "UPDATE allocation SET state = 'released', since_ms = ?3
             WHERE container_id = ?1 AND ifname = ?2 AND state = 'attached' AND pod IS NOT NULL",
            params![container_id, ifname, now],
        )
        .map_err(sql("releasing"))?;
        tx.execute(
            "DELETE FROM allocation WHERE container_id = ?1 AND ifname = ?2 AND pod IS NULL",
            params![container_id, ifname],
        )
        .map_err(sql("freeing unpinned imports"))?;
        tx.commit().map_err(|source| Error::Sql { path: self.path.clone(), action: "committing a release", source })?;
        Ok(released)
    }

    /// Releases every attachment whose `(container_id, ifname)` is not in
    /// `valid` (CNI GC). Pins are kept: a garbage collection says which
    /// sandboxes exist, not which pods are gone.
    pub fn release_all_except(&mut self, valid: &HashSet<(String, String)>) -> Result<Vec<Allocation>> {
        let stale: Vec<(String, String)> = self
            .allocations()?
            .into_iter()
            .filter(|a| a.state == State::Attached)
            .filter_map(|a| a.container_id.map(|c| (c, a.ifname)))
            .filter(|key| !valid.contains(key))
            .collect();
        let mut released = Vec::new();
        for (container_id, ifname) in stale {
            released.extend(self.release(&container_id, &ifname)?);
        }
        Ok(released)
    }

    /// Frees every address pinned to `pod` (the control plane deleted it or
    /// moved it to another node). Returns the freed addresses.
    pub fn forget(&mut self, pod: &PodRef) -> Result<Vec<IpAddr>> {
        let path = self.path.clone();
        let tx = self.begin()?;
        let sql = |action| crate::error::sql_err(&path, action);
        let ips: Vec<String> = {
            let mut stmt = tx
                .prepare_cached("DELETE FROM allocation WHERE pod = ?1 RETURNING ip")
                .map_err(sql("forgetting a pod"))?;
            let rows = stmt.query_map(params![pod.to_string()], |r| r.get(0)).map_err(sql("forgetting a pod"))?;
            rows.collect::<rusqlite::Result<_>>().map_err(sql("forgetting a pod"))?
        };
        tx.commit().map_err(sql("committing a forget"))?;
        Ok(ips.iter().filter_map(|ip| ip.parse().ok()).collect())
    }

    /// Frees the released pins of pods absent from `live_pods`, but only
    /// when the list is [`Authority::Authoritative`] and the pin has not
    /// changed state for `grace`. Frees are counted as [`FreeReason::List`].
    ///
    /// - An unverified list (node cut off) frees nothing: a pod that merely
    ///   looks absent keeps its address.
    /// - An attached pin is never freed, whatever the list says: a container
    ///   holds it, and the list may be older than the pod (counted in
    ///   [`ReconcileReport::kept_attached`]). Its pod's next DEL releases it
    ///   and a later reconcile frees it.
    /// - When there is nothing to free, nothing is written: the store is
    ///   only read, and no write transaction is started (so a periodic
    ///   reconcile neither fsyncs nor contends with CNI plugin processes).
    /// - Race-safe against a concurrent ADD: each pin is deleted only if it
    ///   is still in the released state, with the release time read, inside
    ///   one `BEGIN IMMEDIATE` transaction; a pod re-attached meanwhile keeps
    ///   its address.
    pub fn reconcile(
        &mut self,
        live_pods: &HashSet<PodRef>,
        authority: Authority,
        grace: Duration,
    ) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let now = now_ms();
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let mut doomed: Vec<(PodRef, IpAddr, i64)> = Vec::new();
        {
            let sql = self.sql("listing pins for a reconcile");
            let mut stmt = self
                .conn
                .prepare_cached(&format!("SELECT {ROW_COLUMNS} FROM allocation WHERE pod IS NOT NULL"))
                .map_err(&sql)?;
            let rows = stmt.query_map([], read_row).map_err(&sql)?;
            for row in rows {
                let row = row.map_err(&sql)?;
                let since_ms = row.since_ms;
                let allocation = Self::parse_row(&self.path, row)?;
                let Some(pod) = allocation.pod else { continue };
                if live_pods.contains(&pod) {
                    continue;
                }
                if allocation.state == State::Attached {
                    report.kept_attached += 1;
                } else if authority == Authority::Unverified {
                    report.kept_unverified += 1;
                } else if now.saturating_sub(since_ms) < grace_ms {
                    report.kept_in_grace += 1;
                } else {
                    doomed.push((pod, allocation.ip, since_ms));
                }
            }
        }
        if doomed.is_empty() {
            return Ok(report);
        }
        let path = self.path.clone();
        let sql = |action| crate::error::sql_err(&path, action);
        let tx = self.begin()?;
        for (pod, ip, since_ms) in doomed {
            // Only if unchanged since we read it: a concurrent ADD re-attaching
            // the pod (state attached, new since) wins.
            let deleted = tx
                .execute(
                    "DELETE FROM allocation WHERE ip = ?1 AND pod = ?2 AND state = 'released' AND since_ms = ?3",
                    params![ip.to_string(), pod.to_string(), since_ms],
                )
                .map_err(sql("freeing a pin"))?;
            if deleted == 1 {
                report.freed.push((pod, ip));
            }
        }
        count_freed(&tx, &path, FreeReason::List, report.freed.len())?;
        tx.commit().map_err(sql("committing a reconcile"))?;
        Ok(report)
    }

    /// Frees the released pins of `pod` (the control plane deleted it, or
    /// bound it to another node, and the daemon's grace period is over),
    /// counting them under `reason`. Returns the freed addresses; empty when
    /// the pod has no released pin.
    ///
    /// An attached pin is kept: the pod is running here again (re-created
    /// with the same name on this node) or its old sandbox has not been torn
    /// down yet. The check and the delete are one statement inside one
    /// `BEGIN IMMEDIATE` transaction, so a concurrent ADD that re-attaches
    /// the pod either commits first (its pin is kept) or after (it gets a
    /// fresh address). Nothing is written when the pod has no released pin.
    ///
    /// The caller decides *when*: a pod deleted and re-created within the
    /// grace period, then restarted (DEL, ADD), is released for a moment;
    /// the daemon must cancel its pending free when the watch shows the pod
    /// on this node again.
    pub fn free_released(&mut self, pod: &PodRef, reason: FreeReason) -> Result<Vec<IpAddr>> {
        let pod_text = pod.to_string();
        // Read first: the common "nothing to free" case takes no write lock.
        let pending: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM allocation WHERE pod = ?1 AND state = 'released'",
                params![pod_text],
                |r| r.get(0),
            )
            .map_err(self.sql("looking up a pod's released pins"))?;
        if pending == 0 {
            return Ok(Vec::new());
        }
        let path = self.path.clone();
        let sql = |action| crate::error::sql_err(&path, action);
        let tx = self.begin()?;
        let ips: Vec<String> = {
            let mut stmt = tx
                .prepare_cached("DELETE FROM allocation WHERE pod = ?1 AND state = 'released' RETURNING ip")
                .map_err(sql("freeing a pod's released pins"))?;
            let rows = stmt.query_map(params![pod_text], |r| r.get(0)).map_err(sql("freeing a pod's released pins"))?;
            rows.collect::<rusqlite::Result<_>>().map_err(sql("freeing a pod's released pins"))?
        };
        count_freed(&tx, &path, reason, ips.len())?;
        tx.commit().map_err(sql("committing a free"))?;
        Ok(ips.iter().filter_map(|ip| ip.parse().ok()).collect())
    }

    /// Pins by state and frees by reason, for metrics. Read-only.
    ///
    /// A counter row that does not hold a number (hand-edited store) is a
    /// [`Error::Corrupt`] naming the row; the next free of that reason
    /// rewrites it as a number (SQLite's integer reading of the text, 0 for
    /// words) rather than failing that free.
    pub fn stats(&self) -> Result<PinStats> {
        let sql = self.sql("reading pin statistics");
        let mut stats = PinStats::default();
        {
            let mut stmt =
                self.conn.prepare_cached("SELECT state, count(*) FROM allocation GROUP BY state").map_err(&sql)?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).map_err(&sql)?;
            for row in rows {
                let (state, count) = row.map_err(&sql)?;
                let count = u64::try_from(count).unwrap_or(0);
                match state.as_str() {
                    "attached" => stats.attached = count,
                    "released" => stats.released = count,
                    // The schema's CHECK constraint makes this unreachable.
                    _ => {}
                }
            }
        }
        for reason in FreeReason::ALL {
            let key = reason.meta_key();
            let value: Option<String> = self
                .conn
                .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| r.get(0))
                .optional()
                .map_err(&sql)?;
            if let Some(value) = value {
                *stats.freed.slot(reason) = value.trim().parse::<u64>().map_err(|_| Error::Corrupt {
                    path: self.path.clone(),
                    row: format!("meta {key}"),
                    why: format!(
                        "counter value {:?} is not a non-negative integer",
                        value.chars().take(40).collect::<String>()
                    ),
                })?;
            }
        }
        Ok(stats)
    }

    /// Rows inserted, updated or deleted through this handle since it was
    /// opened (SQLite's `total_changes()`); lets callers and benchmarks
    /// verify that a call wrote nothing.
    pub fn changes(&self) -> u64 {
        self.conn.total_changes()
    }

    /// Every address in the store, ordered by address text.
    pub fn allocations(&self) -> Result<Vec<Allocation>> {
        let sql = self.sql("listing allocations");
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {ROW_COLUMNS} FROM allocation ORDER BY family, ip"))
            .map_err(&sql)?;
        let rows = stmt.query_map([], read_row).map_err(&sql)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(Self::parse_row(&self.path, row.map_err(&sql)?)?);
        }
        Ok(out)
    }

    /// The addresses pinned to `pod`.
    pub fn pins_of(&self, pod: &PodRef) -> Result<Vec<Allocation>> {
        Ok(self.allocations()?.into_iter().filter(|a| a.pod.as_ref() == Some(pod)).collect())
    }

    /// Runs SQLite's full integrity check; `Ok(())` when the file is sound.
    pub fn integrity_check(&self) -> Result<()> {
        let verdict: String =
            self.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(self.sql("integrity check"))?;
        if verdict == "ok" {
            Ok(())
        } else {
            Err(Error::Corrupt { path: self.path.clone(), row: "integrity_check".into(), why: verdict })
        }
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

/// Adds `n` to the persistent counter of `reason`, inside the caller's
/// transaction so the count commits (or rolls back) with the frees.
fn count_freed(tx: &Transaction<'_>, path: &Path, reason: FreeReason, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    // meta.value is TEXT; a value that is not a number counts as 0 (a
    // damaged counter must not make an ADD fail).
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + CAST(excluded.value AS INTEGER) AS TEXT)",
        params![reason.meta_key(), n.to_string()],
    )
    .map_err(crate::error::sql_err(path, "counting freed pins"))?;
    Ok(())
}

fn check_families(sets: &[RangeSet]) -> Result<()> {
    let mut seen = HashSet::new();
    for set in sets {
        if let Some(first) = set.ranges().first() {
            if !seen.insert(first.subnet().addr().is_ipv4()) {
                return Err(Error::DuplicateFamily(set.to_string()));
            }
        }
    }
    Ok(())
}

/// SQLite's write-ahead log of the store at `path`.
fn wal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push("-wal");
    PathBuf::from(name)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|source| Error::Dir {
        path: dir.to_path_buf(),
        action: "fsync",
        source,
    })
}
