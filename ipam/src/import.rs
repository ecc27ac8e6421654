//! Importing host-local's directory and OpenYurt's pin markers, so a node
//! migrates without renumbering a single pod.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use crate::error::{Error, Result};
use crate::pool::RangeSet;
use crate::store::{now_ms, Store};
use netd_model::PodRef;

/// `meta` key set once host-local's directory has been imported.
const IMPORTED_KEY: &str = "host_local_imported";

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// host-local reservations imported as attachments.
    pub attached: usize,
    /// OpenYurt markers imported as pins.
    pub pinned: usize,
    /// `last_reserved_ip.<n>` cursors carried over.
    pub cursors: usize,
    /// Entries left alone, with the reason (the store's own data always wins).
    pub skipped: Vec<(PathBuf, String)>,
}

/// An OpenYurt marker `<ip>_<namespace>_<name>`; neither namespace nor name
/// can contain '_', so the split is unambiguous.
fn parse_marker(file_name: &str) -> Option<(IpAddr, PodRef)> {
    let mut parts = file_name.splitn(3, '_');
    let ip = parts.next()?.parse().ok()?;
    let namespace = parts.next()?;
    let name = parts.next()?;
    Some((ip, PodRef::new(namespace, name).ok()?))
}

/// host-local's reservation file body: `containerID\r\nifname` (CNI ≥ 0.7) or
/// just `containerID` (older releases, interface `eth0`).
fn parse_reservation(body: &str) -> Option<(String, String)> {
    let mut lines = body.lines().map(str::trim);
    let container = lines.next().filter(|c| !c.is_empty())?.to_string();
    let ifname = lines.next().filter(|i| !i.is_empty()).unwrap_or("eth0").to_string();
    Some((container, ifname))
}

impl Store {
    /// Imports host-local's data directory (`/var/lib/cni/networks/<net>`):
    /// every `<ip>` reservation becomes an attachment of its container (pod
    /// unknown until that container's next ADD names it), every OpenYurt
    /// marker `<ip>_<namespace>_<name>` a pin, and `last_reserved_ip.<n>`
    /// the round-robin cursor of `sets[n]`. Idempotent; anything that clashes
    /// with the store's own entries is skipped and reported, never overwritten.
    pub fn import_host_local(&mut self, dir: &Path, sets: &[RangeSet]) -> Result<ImportReport> {
        self.import(dir, sets, false).map(Option::unwrap_or_default)
    }

    /// [`Store::import_host_local`] unless this store already did it once
    /// (`meta.host_local_imported`); `None` when skipped. This is what lets
    /// the CNI plugin migrate a node on its first ADD at the cost of one
    /// lookup on every later one.
    pub fn import_host_local_once(&mut self, dir: &Path, sets: &[RangeSet]) -> Result<Option<ImportReport>> {
        if self.meta(IMPORTED_KEY)?.is_some() {
            return Ok(None);
        }
        self.import(dir, sets, true)
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        let path = self.path().to_path_buf();
        self.conn()
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| r.get(0))
            .optional()
            .map_err(crate::error::sql_err(&path, "reading meta"))
    }

    fn import(&mut self, dir: &Path, sets: &[RangeSet], once: bool) -> Result<Option<ImportReport>> {
        let mut report = ImportReport::default();
        let entries = fs::read_dir(dir).map_err(|source| Error::Dir {
            path: dir.to_path_buf(),
            action: "reading host-local directory",
            source,
        })?;
        let mut reservations = Vec::new();
        let mut markers = Vec::new();
        let mut cursors = Vec::new();
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.file_type().map(|t| t.is_file()).unwrap_or(false)
                || name == "lock"
                || name.ends_with(".db")
                || name.ends_with(".db-journal")
                || name.ends_with(".db-wal")
                || name.ends_with(".db-shm")
            {
                continue;
            }
            let body = fs::read_to_string(&path).unwrap_or_default();
            if let Some(index) = name.strip_prefix("last_reserved_ip.") {
                match (index.parse::<usize>().ok().and_then(|i| sets.get(i)), body.trim().parse::<IpAddr>()) {
                    (Some(set), Ok(ip)) => cursors.push((set.key(), ip)),
                    _ => report.skipped.push((path, "cursor for an unknown range set or not an address".into())),
                }
            } else if let Ok(ip) = name.parse::<IpAddr>() {
                match parse_reservation(&body) {
                    Some((container, ifname)) => reservations.push((path, ip, container, ifname)),
                    None => report.skipped.push((path, "empty reservation file".into())),
                }
            } else if let Some((ip, pod)) = parse_marker(&name) {
                markers.push((path, ip, pod));
            } else {
                report.skipped.push((path, "not a host-local or OpenYurt file".into()));
            }
        }
        let db_path = self.path().to_path_buf();
        let sql = |action| crate::error::sql_err(&db_path, action);
        let now = now_ms();
        let tx = self
            .conn_mut()
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("starting a write transaction"))?;
        if once {
            // Another process may have imported while we read the directory.
            let done: Option<String> = tx
                .query_row("SELECT value FROM meta WHERE key = ?1", params![IMPORTED_KEY], |r| r.get(0))
                .optional()
                .map_err(sql("reading meta"))?;
            if done.is_some() {
                return Ok(None);
            }
            tx.execute("INSERT INTO meta (key, value) VALUES (?1, ?2)", params![IMPORTED_KEY, now.to_string()])
                .map_err(sql("marking the import done"))?;
        }
        let owner_of = |ip: IpAddr| -> Result<Option<(Option<String>, Option<String>)>> {
            tx.query_row("SELECT pod, container_id FROM allocation WHERE ip = ?1", params![ip.to_string()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(sql("reading an existing entry"))
        };
        for (path, ip, container, ifname) in reservations {
            match owner_of(ip)? {
                None => {
                    tx.execute(
                        "INSERT INTO allocation (ip, family, pod, ifname, container_id, state, since_ms)
                         VALUES (?1, ?2, NULL, ?3, ?4, 'attached', ?5)",
                        params![ip.to_string(), if ip.is_ipv4() { 4 } else { 6 }, ifname, container, now],
                    )
                    .map_err(sql("importing a reservation"))?;
                    report.attached += 1;
                }
                Some((_, Some(existing))) if existing == container => report.attached += 1,
                Some(_) => report.skipped.push((path, format!("{ip} is already allocated in the store"))),
            }
        }
        for (path, ip, pod) in markers {
            let pod_text = pod.to_string();
            let family = if ip.is_ipv4() { 4 } else { 6 };
            let other_pin: Option<String> = tx
                .query_row(
                    "SELECT ip FROM allocation WHERE pod = ?1 AND family = ?2 AND ip <> ?3",
                    params![pod_text, family, ip.to_string()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql("reading an existing pin"))?;
            if let Some(other) = other_pin {
                report.skipped.push((path, format!("{pod} is already pinned to {other}")));
                continue;
            }
            match owner_of(ip)? {
                None => {
                    tx.execute(
                        "INSERT INTO allocation (ip, family, pod, ifname, container_id, state, since_ms)
                         VALUES (?1, ?2, ?3, 'eth0', NULL, 'released', ?4)",
                        params![ip.to_string(), family, pod_text, now],
                    )
                    .map_err(sql("importing a pin"))?;
                    report.pinned += 1;
                }
                Some((None, _)) => {
                    // A host-local reservation of that address: it now knows its pod.
                    tx.execute("UPDATE allocation SET pod = ?1 WHERE ip = ?2", params![pod_text, ip.to_string()])
                        .map_err(sql("naming an imported reservation's pod"))?;
                    report.pinned += 1;
                }
                Some((Some(owner), _)) if owner == pod_text => report.pinned += 1,
                Some((Some(owner), _)) => {
                    report.skipped.push((path, format!("{ip} is pinned to {owner} in the store")))
                }
            }
        }
        for (key, ip) in cursors {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
                params![format!("last_reserved:{key}"), ip.to_string()],
            )
            .map_err(sql("importing a cursor"))?;
            report.cursors += 1;
        }
        tx.commit().map_err(sql("committing the import"))?;
        Ok(Some(report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_reservations_parse() {
        let (ip, pod) = parse_marker("10.244.1.7_default_web-0").unwrap();
        assert_eq!(ip.to_string(), "10.244.1.7");
        assert_eq!(pod.to_string(), "default/web-0");
        assert!(parse_marker("10.244.1.7").is_none());
        assert!(parse_marker("10.244.1.7_default_Bad_Name").is_none());
        assert_eq!(parse_reservation("abc\r\neth1"), Some(("abc".into(), "eth1".into())));
        assert_eq!(parse_reservation("abc"), Some(("abc".into(), "eth0".into())));
        assert_eq!(parse_reservation(""), None);
    }
}
