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
//! `version` is refused rather than misread. Writes go to a temporary file
//! in the same directory, are fsynced, renamed over the old file and the
//! directory is fsynced: a crash leaves the old or the new snapshot, never a
//! torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{Lease, OverlayConfig};

/// Where the daemon keeps its snapshot unless told otherwise.
pub const DEFAULT_PATH: &str = "/var/lib/netd/snapshot.json";

/// The snapshot format version this build writes and reads.
pub const VERSION: u32 = 1;

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
    /// The file is not a valid snapshot.
    #[error("snapshot {path} is not valid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why, with the JSON path of the bad field.
        reason: String,
    },
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
        let invalid = |reason: String| SnapshotError::Invalid { path: path.to_path_buf(), reason };
        let probe: VersionOnly = serde_json::from_slice(text).map_err(|e| invalid(e.to_string()))?;
        if probe.version != VERSION {
            return Err(SnapshotError::Version { path: path.to_path_buf(), found: probe.version });
        }
        let de = &mut serde_json::Deserializer::from_slice(text);
        let snapshot: Self =
            serde_path_to_error::deserialize(de).map_err(|e| invalid(format!("at `{}`: {}", e.path(), e.inner())))?;
        snapshot.config.check().map_err(|e| invalid(e.to_string()))?;
        Ok(snapshot)
    }

    /// Reads the snapshot at `path`; `Ok(None)` when there is none yet.
    pub fn load(path: &Path) -> Result<Option<Self>, SnapshotError> {
        match fs::read(path) {
            Ok(bytes) => Self::parse(&bytes, path).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SnapshotError::Io { path: path.to_path_buf(), action: "reading", source }),
        }
    }

    /// Writes atomically and durably to `path` (creating its directory).
    pub fn save(&self, path: &Path) -> Result<(), SnapshotError> {
        let io_err = |action, source| SnapshotError::Io { path: path.to_path_buf(), action, source };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(|e| io_err("creating its directory", e))?;
        let bytes = serde_json::to_vec(self)
            .map_err(|e| SnapshotError::Invalid { path: path.to_path_buf(), reason: e.to_string() })?;
        let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "snapshot".into());
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = dir.join(tmp_name);
        let write = || -> io::Result<()> {
            let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&tmp, path)?;
            File::open(&dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err("writing", e)
        })
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
}
