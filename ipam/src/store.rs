//! The crash-safe, multi-process allocation store (SQLite; see the crate docs
//! for the format and why).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};

use crate::error::{Error, Result};
use crate::pod::PodRef;
use crate::pool::RangeSet;

/// `PRAGMA application_id` of netd IPAM stores ("nIPM").
pub const APPLICATION_ID: i64 = 0x6e49_504d;
/// On-disk format version (`PRAGMA user_version`) this build writes and reads.
pub const FORMAT_VERSION: i64 = 1;
/// How long a writer waits for another process's transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

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
    fn as_str(self) -> &'static str {
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
    /// Pins of absent pods kept because they changed state within the grace period.
    pub kept_in_grace: usize,
    /// Pins of absent pods kept because the list was not authoritative.
    pub kept_unverified: usize,
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
/// transaction, durable (journal and database fsynced) when it returns.
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

    fn sql(&self, action: &'static str) -> impl Fn(rusqlite::Error) -> Error + '_ {
        move |source| Error::Sql { path: self.path.clone(), action, source }
    }

    fn prepare(&mut self) -> Result<()> {
        let path = self.path.clone();
        let unreadable = |source| Error::Unreadable { path: path.clone(), source };
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
        // Rollback journal kept between transactions (PERSIST) with
        // synchronous=FULL: a commit is on disk when it returns, and the
        // short-lived CNI processes neither create nor delete files per call.
        // Measured against WAL here: WAL makes every process create, recover
        // and delete `-wal`/`-shm` files, costing ~1 ms more per call.
        self.set_journal_mode()?;
        self.conn.pragma_update(None, "synchronous", "FULL").map_err(unreadable)?;
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
        // Leaving WAL mode (a file written by another tool) needs a brief
        // exclusive lock that the busy handler does not cover; retry.
        let mut delay = Duration::from_millis(1);
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            match self.conn.query_row("PRAGMA journal_mode = PERSIST", [], |r| r.get::<_, String>(0)) {
                Ok(_) => return Ok(()),
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

    /// Gives the pod one address from each range set, all or nothing.
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
        check_families(sets)?;
        let path = self.path.clone();
        let pod_text = pod.to_string();
        let now = now_ms();
        let tx = self.begin()?;
        let sql = |action| crate::error::sql_err(&path, action);
        let mut result = Vec::with_capacity(sets.len());
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
                    let ip = Self::pick_free(&tx, &path, set)?;
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
        tx.commit().map_err(|source| Error::Sql {
            path: self.path.clone(),
            action: "committing an allocation",
            source,
        })?;
        Ok(result)
    }

    fn pick_free(tx: &Transaction<'_>, path: &Path, set: &RangeSet) -> Result<IpAddr> {
        let sql = |action| crate::error::sql_err(path, action);
        let last: Option<IpAddr> = tx
            .query_row("SELECT value FROM meta WHERE key = ?1", params![format!("last_reserved:{}", set.key())], |r| {
                r.get::<_, String>(0)
            })
            .optional()
            .map_err(sql("reading the last reserved address"))?
            .and_then(|text| text.parse().ok());
        let mut used: HashMap<IpAddr, State> = HashMap::new();
        {
            let mut stmt =
                tx.prepare_cached("SELECT ip, state FROM allocation").map_err(sql("listing used addresses"))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(sql("listing used addresses"))?;
            for row in rows {
                let (ip, state) = row.map_err(sql("listing used addresses"))?;
                // Unparseable rows cannot be handed out again anyway; they
                // are reported by `allocations()`.
                if let Ok(ip) = ip.parse::<IpAddr>() {
                    used.insert(ip, if state == "attached" { State::Attached } else { State::Released });
                }
            }
        }
        if let Some(ip) = set.candidates(last).find(|ip| !used.contains_key(ip)) {
            return Ok(ip);
        }
        let in_set = used.iter().filter(|(ip, _)| set.contains(**ip));
        let (attached, released) = in_set.fold((0, 0), |(a, r), (_, state)| match state {
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

    /// Frees the pins of pods absent from `live_pods`, but only when the
    /// list is [`Authority::Authoritative`] and the pin has not changed state
    /// for `grace`. An unverified list (node cut off) frees nothing: a pod
    /// that merely looks absent keeps its address.
    pub fn reconcile(
        &mut self,
        live_pods: &HashSet<PodRef>,
        authority: Authority,
        grace: Duration,
    ) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let absent: Vec<Allocation> = self
            .allocations()?
            .into_iter()
            .filter(|a| a.pod.as_ref().is_some_and(|p| !live_pods.contains(p)))
            .collect();
        if authority == Authority::Unverified {
            report.kept_unverified = absent.len();
            return Ok(report);
        }
        let now = SystemTime::now();
        let path = self.path.clone();
        let tx = self.begin()?;
        for allocation in absent {
            let age = now.duration_since(allocation.since).unwrap_or_default();
            if age < grace {
                report.kept_in_grace += 1;
                continue;
            }
            // Only if unchanged since we read it: a concurrent ADD re-attaching
            // the pod wins.
            let deleted = tx
                .execute(
                    "DELETE FROM allocation WHERE ip = ?1 AND pod = ?2 AND state = ?3 AND since_ms = ?4",
                    params![
                        allocation.ip.to_string(),
                        allocation.pod.as_ref().map(ToString::to_string),
                        allocation.state.as_str(),
                        allocation.since.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
                    ],
                )
                .map_err(|source| Error::Sql { path: path.clone(), action: "freeing a pin", source })?;
            if deleted == 1 {
                if let Some(pod) = allocation.pod {
                    report.freed.push((pod, allocation.ip));
                }
            }
        }
        tx.commit().map_err(|source| Error::Sql { path, action: "committing a reconcile", source })?;
        Ok(report)
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

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|source| Error::Dir {
        path: dir.to_path_buf(),
        action: "fsync",
        source,
    })
}
