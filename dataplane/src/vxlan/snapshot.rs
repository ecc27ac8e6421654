//! The offline snapshot: the overlay's desired state (own lease, network,
//! device settings, peers), persisted atomically on every change and
//! programmed on start before any registry is contacted, so a node that
//! reboots with the cloud unreachable gets its overlay back by itself.
//!
//! Format: one JSON document, version 1:
//!
//! ```json
//! {"version":1,"saved_at":1764331200,
//!  "config":{"network":"10.244.0.0/16",
//!            "own":{"subnet":"10.244.1.0/24","public_ip":"192.168.50.11","vtep_mac":"6e:6d:70:09:3e:38","node":"edge-1"},
//!            "vni":1,"port":8472,"underlay":"eth0","direct_routing":false},
//!  "peers":[{"subnet":"10.244.2.0/24","public_ip":"192.168.50.12","vtep_mac":"6e:2f:…","node":"edge-2"}],
//!  "autonomous":["10.244.2.0/24"]}
//! ```
//!
//! `autonomous` (optional, absent when empty) lists the peers whose node
//! declared autonomy: a restarted netd keeps them even when the registry no
//! longer holds their lease (an edge node offline for longer than its lease).
//!
//! Unknown fields are ignored (a newer netd may add some); a higher
//! `version` is refused rather than misread. Writes go through
//! [`netd_model::atomic_file`] (a fresh temporary file in the same directory,
//! fsynced, renamed over the old file, the directory fsynced): a crash
//! leaves the old or the new snapshot, never a torn one.
//!
//! ## The journal
//!
//! Rewriting every peer for each registry event would cost ~1 MB of writes
//! per event at 10 000 peers. Changes between rewrites go to an append-only
//! journal beside the snapshot (`snapshot.json.journal`), one JSON line per
//! change, fsynced before the kernel is changed, so an acknowledged peer
//! survives `kill -9` and power loss:
//!
//! ```text
//! {"journal":1}
//! {"op":"upsert","lease":{"subnet":"10.244.4.0/24","public_ip":"192.168.50.14","vtep_mac":"6e:2f:10:00:00:04","node":"edge-4"}}
//! {"op":"upsert","lease":{"subnet":"10.244.3.0/24","public_ip":"192.168.50.13","vtep_mac":"6e:2f:10:00:00:03","node":"edge-3"},"autonomous":true}
//! {"op":"remove","subnet":"10.244.2.0/24"}
//! ```
//!
//! [`Snapshot::load`] replays the journal over the snapshot. Compaction
//! writes a new snapshot, then empties the journal; a crash in between
//! replays records the snapshot already holds, which changes nothing (each
//! record sets one subnet's state outright). A torn last line (a crash
//! mid-append, before the fsync that would have acknowledged it) is
//! ignored; a bad line before the end stops the replay with a warning.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{Lease, OverlayConfig, PeerChange};
use netd_model::atomic_file::{self, AtomicFileError};

/// Where the daemon keeps its snapshot unless told otherwise.
pub const DEFAULT_PATH: &str = "/var/lib/netd/snapshot.json";

/// The snapshot format version this build writes and reads.
pub const VERSION: u32 = 1;

/// The permissions of the snapshot and its journal: world-readable, as
/// they always were under the usual umask (they hold the overlay's
/// addresses, nothing secret).
pub const MODE: u32 = 0o644;

/// Errors reading or writing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// I/O on the snapshot or its directory failed.
    #[error("snapshot {path}: {action}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file (or a journal record being written) is not valid JSON of
    /// a snapshot.
    #[error("snapshot {path} is not valid: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A field of the snapshot does not parse.
    #[error("snapshot {path} is not valid: at `{}`: {}", source.path(), source.inner())]
    Field {
        /// The file.
        path: PathBuf,
        /// The JSON error, with the JSON path of the bad field.
        #[source]
        source: serde_path_to_error::Error<serde_json::Error>,
    },
    /// The journal's header line is not valid.
    #[error("snapshot {path} is not valid: header: {source}")]
    Header {
        /// The journal.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The overlay configuration it holds is inconsistent.
    #[error("snapshot {path} is not valid: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with the configuration (boxed: a
        /// [`VxlanError`](super::VxlanError) can hold a `SnapshotError`).
        #[source]
        source: Box<super::VxlanError>,
    },
    /// The snapshot, or a new journal, could not be written.
    #[error(transparent)]
    Write(#[from] AtomicFileError),
    /// Written by a newer netd.
    #[error(
        "snapshot {path} has format version {found}; this netd reads version {VERSION} (written by a newer netd?)"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
}

/// The persisted desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// Unix seconds when written.
    #[serde(default)]
    pub saved_at: u64,
    /// Device settings and our own lease.
    pub config: OverlayConfig,
    /// The peers, as last received (validated again when programmed).
    #[serde(default)]
    pub peers: Vec<Lease>,
    /// Subnets of the peers that are autonomous (kept without a lease).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub autonomous: Vec<Ipv4Net>,
}

impl Snapshot {
    /// A snapshot of `config` and `peers`, stamped now.
    pub fn new(config: OverlayConfig, peers: Vec<Lease>) -> Self {
        let saved_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Self { version: VERSION, saved_at, config, peers, autonomous: Vec::new() }
    }

    /// Marks the peers of these subnets autonomous.
    pub fn with_autonomous(mut self, autonomous: Vec<Ipv4Net>) -> Self {
        self.autonomous = autonomous;
        self
    }

    /// Parses a snapshot document.
    pub fn parse(text: &[u8], path: &Path) -> Result<Self, SnapshotError> {
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        let probe: VersionOnly =
            serde_json::from_slice(text).map_err(|source| SnapshotError::Json { path: path.to_path_buf(), source })?;
        if probe.version != VERSION {
            return Err(SnapshotError::Version { path: path.to_path_buf(), found: probe.version });
        }
        let de = &mut serde_json::Deserializer::from_slice(text);
        let snapshot: Self = serde_path_to_error::deserialize(de)
            .map_err(|source| SnapshotError::Field { path: path.to_path_buf(), source })?;
        snapshot.config.check().map_err(|e| SnapshotError::Config { path: path.to_path_buf(), source: Box::new(e) })?;
        Ok(snapshot)
    }

    /// Reads the snapshot at `path` and replays its journal over it;
    /// `Ok(None)` when there is no snapshot yet.
    pub fn load(path: &Path) -> Result<Option<Self>, SnapshotError> {
        let mut snapshot = match fs::read(path) {
            Ok(bytes) => Self::parse(&bytes, path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SnapshotError::Io { path: path.to_path_buf(), action: "reading", source }),
        };
        let journal = journal_path(path);
        match fs::read(&journal) {
            Ok(bytes) => snapshot.replay(&bytes, &journal)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(SnapshotError::Io { path: journal, action: "reading", source }),
        }
        Ok(Some(snapshot))
    }

    /// Applies journal records (see the module docs) to this snapshot.
    pub fn replay(&mut self, journal: &[u8], path: &Path) -> Result<(), SnapshotError> {
        let mut lines = journal.split_inclusive(|b| *b == b'\n');
        let Some(header) = lines.next() else { return Ok(()) };
        let header: JournalHeader = match serde_json::from_slice(header) {
            Ok(header) => header,
            // A crash while the header itself was being written.
            Err(_) if !header.ends_with(b"\n") => return Ok(()),
            Err(source) => return Err(SnapshotError::Header { path: path.to_path_buf(), source }),
        };
        if header.journal != JOURNAL_VERSION {
            return Err(SnapshotError::Version { path: path.to_path_buf(), found: header.journal });
        }
        let mut peers: BTreeMap<Ipv4Net, Lease> = self.peers.drain(..).map(|p| (p.subnet, p)).collect();
        let mut autonomous: HashSet<Ipv4Net> = self.autonomous.drain(..).collect();
        for (number, line) in lines.enumerate() {
            let record: Record = match serde_json::from_slice(line) {
                Ok(record) => record,
                Err(_) if !line.ends_with(b"\n") => break,
                Err(e) => {
                    tracing::warn!(journal = %path.display(), line = number + 2, error = %e, "bad journal line; later changes not replayed");
                    break;
                }
            };
            match record {
                Record::Upsert { lease, autonomous: marked } => {
                    if marked {
                        autonomous.insert(lease.subnet);
                    } else {
                        autonomous.remove(&lease.subnet);
                    }
                    peers.insert(lease.subnet, lease);
                }
                Record::Remove { subnet } => {
                    autonomous.remove(&subnet);
                    peers.remove(&subnet);
                }
            }
        }
        self.peers = peers.into_values().collect();
        self.autonomous = self.peers.iter().map(|p| p.subnet).filter(|s| autonomous.contains(s)).collect();
        Ok(())
    }

    /// Writes atomically and durably to `path` with [`netd_model::atomic_file`]
    /// (mode [`MODE`], creating its directory);
    /// returns the bytes written. Leaves any journal beside it alone (see
    /// [`SnapshotWriter`]).
    pub fn save(&self, path: &Path) -> Result<u64, SnapshotError> {
        let bytes =
            serde_json::to_vec(self).map_err(|source| SnapshotError::Json { path: path.to_path_buf(), source })?;
        atomic_file::write_creating_dirs(path, &bytes, MODE, 0o755)?;
        Ok(bytes.len() as u64)
    }
}

/// The journal format version this build writes and reads.
pub const JOURNAL_VERSION: u32 = 1;

/// The journal of the snapshot at `snapshot`: `<snapshot>.journal`.
pub fn journal_path(snapshot: &Path) -> PathBuf {
    let mut name = snapshot.as_os_str().to_os_string();
    name.push(".journal");
    PathBuf::from(name)
}

#[derive(Serialize, Deserialize)]
struct JournalHeader {
    journal: u32,
}

/// One journal line.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Record {
    Upsert {
        lease: Lease,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        autonomous: bool,
    },
    Remove {
        subnet: Ipv4Net,
    },
}

/// Keeps a snapshot and its journal on disk: [`SnapshotWriter::write`]
/// rewrites the whole state, [`SnapshotWriter::append`] records changes.
pub struct SnapshotWriter {
    path: PathBuf,
    journal_path: PathBuf,
    journal: Option<File>,
    records: usize,
    bytes_written: u64,
}

impl SnapshotWriter {
    /// A writer for the snapshot at `path` (nothing is touched yet).
    pub fn new(path: PathBuf) -> Self {
        let journal_path = journal_path(&path);
        Self { path, journal_path, journal: None, records: 0, bytes_written: 0 }
    }

    /// The snapshot's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes recorded since the last [`SnapshotWriter::write`].
    pub fn journal_records(&self) -> usize {
        self.records
    }

    /// Bytes written to disk so far (snapshots and journal lines).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Writes `snapshot` atomically, then empties the journal (whose
    /// records it now holds).
    pub fn write(&mut self, snapshot: &Snapshot) -> Result<(), SnapshotError> {
        self.bytes_written += snapshot.save(&self.path)?;
        let io_err = |action, source| SnapshotError::Io { path: self.journal_path.clone(), action, source };
        match self.journal.take() {
            Some(file) => {
                file.set_len(0).map_err(|e| io_err("emptying", e))?;
                file.sync_all().map_err(|e| io_err("syncing", e))?;
            }
            None => match fs::remove_file(&self.journal_path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", e)),
            },
        }
        self.records = 0;
        Ok(())
    }

    /// Appends `changes` to the journal and syncs it: once this returns,
    /// they survive a crash. Needs a snapshot written by
    /// [`SnapshotWriter::write`] first (the journal is replayed over it).
    pub fn append(&mut self, changes: &[PeerChange]) -> Result<(), SnapshotError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(160 * changes.len() + 16);
        let encode_err = |source: serde_json::Error| SnapshotError::Json { path: self.journal_path.clone(), source };
        if self.records == 0 {
            serde_json::to_writer(&mut buf, &JournalHeader { journal: JOURNAL_VERSION }).map_err(encode_err)?;
            buf.push(b'\n');
        }
        for change in changes {
            let record = match change {
                PeerChange::Upsert { lease, autonomous } => {
                    Record::Upsert { lease: lease.clone(), autonomous: *autonomous }
                }
                PeerChange::Remove(subnet) => Record::Remove { subnet: *subnet },
            };
            serde_json::to_writer(&mut buf, &record).map_err(encode_err)?;
            buf.push(b'\n');
        }
        let io_err = |action, source| SnapshotError::Io { path: self.journal_path.clone(), action, source };
        let file = match &mut self.journal {
            Some(file) => file,
            None => {
                let file = match OpenOptions::new().append(true).open(&self.journal_path) {
                    Ok(file) => file,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        // A new journal is created by the one atomic writer
                        // (exact mode, no leftover reused, its directory
                        // entry fsynced) and only then opened for appending.
                        atomic_file::write(&self.journal_path, b"", MODE)?;
                        OpenOptions::new().append(true).open(&self.journal_path).map_err(|e| io_err("opening", e))?
                    }
                    // An existing journal (emptied by the last compaction)
                    // is appended to as it is: its entry was made durable
                    // when it was created.
                    Err(e) => return Err(io_err("opening", e)),
                };
                self.journal.insert(file)
            }
        };
        file.write_all(&buf).map_err(|e| io_err("appending", e))?;
        file.sync_data().map_err(|e| io_err("syncing", e))?;
        self.records += changes.len();
        self.bytes_written += buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"version":1,"saved_at":1764331200,
        "config":{"network":"10.244.0.0/16",
                  "own":{"subnet":"10.244.1.0/24","public_ip":"192.168.50.11","vtep_mac":"6e:6d:70:09:3e:38","node":"edge-1"},
                  "vni":1,"port":8472,"underlay":"eth0","direct_routing":false,"future_knob":true},
        "peers":[{"subnet":"10.244.2.0/24","public_ip":"192.168.50.12","vtep_mac":"6e:2f:10:00:00:02","node":"edge-2"},
                 {"subnet":"10.244.3.0/24","public_ip":"192.168.50.13","vtep_mac":"6e:2f:10:00:00:03","node":"edge-3"}],
        "autonomous":["10.244.3.0/24"],
        "added_later":{"x":1}}"#;

    #[test]
    fn example_parses_tolerating_unknown_fields_and_round_trips() {
        let path = Path::new("example.json");
        let snap = Snapshot::parse(EXAMPLE.as_bytes(), path).unwrap();
        assert_eq!(snap.config.own.node.as_deref(), Some("edge-1"));
        assert_eq!(snap.peers[0].vtep_mac.to_string(), "6e:2f:10:00:00:02");
        let autonomous: Vec<_> =
            snap.peers.iter().filter(|p| snap.autonomous.contains(&p.subnet)).map(|p| p.node.as_deref()).collect();
        assert_eq!(autonomous, [Some("edge-3")]);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nested/snapshot.json");
        snap.save(&file).unwrap();
        assert_eq!(Snapshot::load(&file).unwrap(), Some(snap.clone()));
        // Overwrite leaves no temporary files behind.
        snap.save(&file).unwrap();
        assert_eq!(fs::read_dir(file.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn bad_snapshots_get_precise_errors() {
        let path = Path::new("s.json");
        let err = |text: &str| Snapshot::parse(text.as_bytes(), path).unwrap_err().to_string();
        assert!(err(&EXAMPLE[..40]).contains("not valid"));
        assert!(err(&EXAMPLE.replace(r#""version":1"#, r#""version":2"#)).contains("format version 2"));
        let e = err(&EXAMPLE.replace(r#""vni":1"#, r#""vni":"one""#));
        assert!(e.contains("config.vni"), "{e}");
        let e = err(&EXAMPLE.replace("6e:2f:10:00:00:02", "6e:2f"));
        assert!(e.contains("peers[0].vtep_mac"), "{e}");
        let e = err(&EXAMPLE.replace(r#""network":"10.244.0.0/16""#, r#""network":"10.9.0.0/16""#));
        assert!(e.contains("outside the cluster network"), "{e}");
        assert!(Snapshot::load(Path::new("/nonexistent/netd/snapshot.json")).unwrap().is_none());
        let e = err(&EXAMPLE.replace(r#""autonomous":["10.244.3.0/24"]"#, r#""autonomous":"10.244.3.0/24""#));
        assert!(e.contains("autonomous"), "{e}");
    }

    #[test]
    fn snapshots_without_autonomous_peers_omit_the_field_and_older_ones_read() {
        let snap = Snapshot::parse(EXAMPLE.as_bytes(), Path::new("e.json")).unwrap().with_autonomous(Vec::new());
        let text = serde_json::to_string(&snap).unwrap();
        assert!(!text.contains("autonomous"), "{text}");
        // What netd wrote before the field existed.
        let old = EXAMPLE.replace(r#""autonomous":["10.244.3.0/24"],"#, "");
        let parsed = Snapshot::parse(old.as_bytes(), Path::new("old.json")).unwrap();
        assert!(parsed.autonomous.is_empty() && parsed.peers.len() == 2);
    }

    fn lease(i: u8) -> Lease {
        Lease {
            subnet: format!("10.244.{i}.0/24").parse().unwrap(),
            public_ip: format!("192.168.50.{i}").parse().unwrap(),
            vtep_mac: format!("6e:2f:10:00:00:{i:02x}").parse().unwrap(),
            node: Some(format!("edge-{i}")),
        }
    }

    fn upsert(i: u8, autonomous: bool) -> PeerChange {
        PeerChange::Upsert { lease: lease(i), autonomous }
    }

    fn subnets(snapshot: &Snapshot) -> Vec<String> {
        snapshot.peers.iter().map(|p| p.subnet.to_string()).collect()
    }

    #[test]
    fn the_journal_is_replayed_over_the_snapshot_and_emptied_by_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.json");
        let base = Snapshot::parse(EXAMPLE.as_bytes(), &path).unwrap();
        let mut writer = SnapshotWriter::new(path.clone());
        writer.write(&base).unwrap();
        writer.append(&[upsert(4, false), upsert(2, true)]).unwrap();
        writer.append(&[PeerChange::Remove("10.244.3.0/24".parse().unwrap())]).unwrap();
        assert_eq!(writer.journal_records(), 3);
        let journal = fs::read_to_string(journal_path(&path)).unwrap();
        assert_eq!(journal.lines().count(), 4, "header + one line per change: {journal}");
        assert!(journal.starts_with("{\"journal\":1}\n"), "{journal}");
        use std::os::unix::fs::PermissionsExt as _;
        for file in [path.clone(), journal_path(&path)] {
            assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o7777, MODE, "{}", file.display());
        }
        assert!(journal.contains(r#"{"op":"remove","subnet":"10.244.3.0/24"}"#), "{journal}");
        let loaded = Snapshot::load(&path).unwrap().unwrap();
        assert_eq!(subnets(&loaded), ["10.244.2.0/24", "10.244.4.0/24"]);
        assert_eq!(loaded.peers[0], lease(2), "the upsert replaced the snapshot's lease");
        assert_eq!(loaded.autonomous, ["10.244.2.0/24".parse::<Ipv4Net>().unwrap()]);

        // Compaction: the state moves into the snapshot, the journal empties,
        // and what loads is the same.
        writer.write(&loaded).unwrap();
        assert_eq!(fs::metadata(journal_path(&path)).unwrap().len(), 0);
        assert_eq!(Snapshot::load(&path).unwrap(), Some(loaded.clone()));
        // A crash between the two steps of a compaction replays records the
        // snapshot already holds: nothing changes.
        writer
            .append(&[upsert(5, false), PeerChange::Remove("10.244.5.0/24".parse().unwrap()), upsert(6, true)])
            .unwrap();
        let after = Snapshot::load(&path).unwrap().unwrap();
        after.save(&path).unwrap();
        assert_eq!(Snapshot::load(&path).unwrap(), Some(after));
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_a_bad_journal_is_refused_precisely() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.json");
        let base = Snapshot::parse(EXAMPLE.as_bytes(), &path).unwrap();
        let mut writer = SnapshotWriter::new(path.clone());
        writer.write(&base).unwrap();
        writer.append(&[upsert(7, false)]).unwrap();
        // A crash mid-append: half a line, never acknowledged.
        let mut file = OpenOptions::new().append(true).open(journal_path(&path)).unwrap();
        file.write_all(br#"{"op":"upsert","lease":{"subnet":"10.244.8"#).unwrap();
        drop(file);
        let loaded = Snapshot::load(&path).unwrap().unwrap();
        assert_eq!(subnets(&loaded), ["10.244.2.0/24", "10.244.3.0/24", "10.244.7.0/24"]);

        let journal = journal_path(&path);
        let mut snap = base.clone();
        // A complete bad line stops the replay there; earlier records hold.
        let text = "{\"journal\":1}\n{\"op\":\"remove\",\"subnet\":\"10.244.2.0/24\"}\n{\"op\":\"upsert\",\"lease\":7}\n{\"op\":\"remove\",\"subnet\":\"10.244.3.0/24\"}\n";
        snap.replay(text.as_bytes(), &journal).unwrap();
        assert_eq!(subnets(&snap), ["10.244.3.0/24"]);
        // A journal from a newer netd, or garbage, is refused, naming the file.
        let e = base.clone().replay(b"{\"journal\":2}\n", &journal).unwrap_err().to_string();
        assert!(e.contains("format version 2") && e.contains("journal"), "{e}");
        let e = base.clone().replay(b"garbage\n", &journal).unwrap_err().to_string();
        assert!(e.contains("not valid") && e.contains("header"), "{e}");
        // An empty journal, or one torn inside its header, changes nothing.
        let mut same = base.clone();
        same.replay(b"", &journal).unwrap();
        same.replay(b"{\"jour", &journal).unwrap();
        assert_eq!(same, base);
    }
}
