//! What a join leaves on the node, and how it is taken back when a later
//! step fails: files are written whole ([`crate::atomic_file`]) and
//! each one written is remembered until the join commits; the join record
//! (`join.json`) is written last, so its presence means "joined".

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::spec::NodeSpec;
use crate::atomic_file::{self, AtomicFileError};

/// The version of [`JoinRecord`]'s layout.
pub const RECORD_VERSION: u32 = 1;

/// Where a join writes (default `/etc/netd`).
#[derive(Debug, Clone)]
pub struct JoinPaths {
    /// The directory.
    pub config_dir: PathBuf,
}

impl JoinPaths {
    /// `join.json`: what was joined, with which spec.
    pub fn record(&self) -> PathBuf {
        self.config_dir.join("join.json")
    }

    /// `config.json`: `netd run --config`.
    pub fn netd_config(&self) -> PathBuf {
        self.config_dir.join("config.json")
    }

    /// `tunnel/`: the tunnel agent's `--cert-dir` (`node.crt`, `node.key`, `ca.crt`).
    pub fn tunnel_dir(&self) -> PathBuf {
        self.config_dir.join("tunnel")
    }

    /// `tunnel/node.csr`: the node's certificate signing request, for
    /// registries without a signer.
    pub fn tunnel_csr(&self) -> PathBuf {
        self.tunnel_dir().join("node.csr")
    }
}

/// Why the node's files could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A file or directory could not be read or created.
    #[error("{action} {path}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error(transparent)]
    Write(#[from] AtomicFileError),
    /// The join record is not JSON of a join record (or could not be
    /// made into JSON).
    #[error("{path} is not a netd join record ({source}); move it away to join again")]
    RecordJson {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The join record is not one this netd reads.
    #[error("{path} is not a netd join record ({reason}); move it away to join again")]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// `join.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The node's name (a drawn one is kept across re-runs).
    pub node_name: String,
    /// The registry spec joined.
    pub registry: String,
    /// The API server, for a Kubernetes join.
    pub server: Option<String>,
    /// The node-spec as given.
    pub spec: serde_json::Value,
}

impl JoinRecord {
    /// The node-spec it was made with.
    pub fn node_spec(&self) -> Option<NodeSpec> {
        NodeSpec::parse(&self.spec.to_string()).ok()
    }
}

/// The record of an earlier join, if any.
pub fn read_record(paths: &JoinPaths) -> Result<Option<JoinRecord>, LocalError> {
    let path = paths.record();
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LocalError::Io { action: "reading", path, source }),
    };
    let record: JoinRecord =
        serde_json::from_slice(&text).map_err(|source| LocalError::RecordJson { path: path.clone(), source })?;
    if record.version != RECORD_VERSION {
        return Err(LocalError::BadRecord { path, reason: format!("layout version {}", record.version) });
    }
    Ok(Some(record))
}

/// Files written so far; removed on drop unless [`Written::commit`]ted, so
/// a join that fails midway leaves the node as it was.
#[derive(Debug, Default)]
pub struct Written {
    created: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    committed: bool,
}

impl Written {
    /// Writes `contents` to `path` whole with [`crate::atomic_file`]
    /// (a fresh temporary file made with `mode`, fsync, rename, directory
    /// fsync), so a key is never visible with a mode wider than `mode`;
    /// creates missing parent directories.
    pub fn write(&mut self, path: &Path, contents: &[u8], mode: u32) -> Result<(), LocalError> {
        if let Some(parent) = path.parent() {
            self.create_dirs(parent, None)?;
        }
        self.write_file(path, contents, mode)
    }

    /// [`Written::write`], with the directories it creates made with
    /// exactly `dir_mode` (whatever the umask): for files under a private
    /// directory (the edge hub's cache, 0700).
    pub fn write_private(&mut self, path: &Path, contents: &[u8], mode: u32, dir_mode: u32) -> Result<(), LocalError> {
        if let Some(parent) = path.parent() {
            self.create_dirs(parent, Some(dir_mode))?;
        }
        self.write_file(path, contents, mode)
    }

    fn write_file(&mut self, path: &Path, contents: &[u8], mode: u32) -> Result<(), LocalError> {
        let existed = path.exists();
        atomic_file::write(path, contents, mode)?;
        if !existed {
            self.created.push(path.to_path_buf());
        }
        Ok(())
    }

    fn create_dirs(&mut self, dir: &Path, mode: Option<u32>) -> Result<(), LocalError> {
        if dir.as_os_str().is_empty() || dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            self.create_dirs(parent, mode)?;
        }
        std::fs::create_dir(dir).map_err(|source| LocalError::Io { action: "creating", path: dir.into(), source })?;
        self.dirs.push(dir.to_path_buf());
        if let Some(mode) = mode {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(|source| LocalError::Io {
                action: "setting the mode of",
                path: dir.into(),
                source,
            })?;
        }
        Ok(())
    }

    /// The join succeeded: keep everything.
    pub fn commit(mut self) -> Vec<PathBuf> {
        self.committed = true;
        std::mem::take(&mut self.created)
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for path in self.created.iter().rev() {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("join: could not remove {} after the failure: {e}", path.display());
            }
        }
        for dir in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Issue 23: the old writer opened `node.tmp-netd-join` (one name for
    /// every file of the directory) with `create(true)`, so a leftover 0644
    /// one kept its mode and was renamed into place as a 0644 `node.key`.
    #[test]
    fn a_world_readable_leftover_temporary_never_becomes_a_wider_key() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

        let dir = tempfile::tempdir().unwrap();
        let paths = JoinPaths { config_dir: dir.path().join("etc/netd") };
        let tunnel = paths.tunnel_dir();
        std::fs::create_dir_all(&tunnel).unwrap();
        let leftover = tunnel.join("node.tmp-netd-join");
        std::fs::write(&leftover, "stale").unwrap();
        std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o644)).unwrap();
        let leftover_inode = std::fs::metadata(&leftover).unwrap().ino();

        let key_pem = b"-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n";
        let mut written = Written::default();
        written.write(&tunnel.join("node.key"), key_pem, 0o600).unwrap();
        written.write(&paths.tunnel_csr(), b"-----BEGIN CERTIFICATE REQUEST-----\n", 0o644).unwrap();
        let files = written.commit();

        let key = std::fs::metadata(tunnel.join("node.key")).unwrap();
        assert_eq!(key.permissions().mode() & 0o7777, 0o600);
        assert_ne!(key.ino(), leftover_inode, "the leftover was renamed into place");
        assert_eq!(std::fs::read(tunnel.join("node.key")).unwrap(), key_pem);
        assert_eq!(std::fs::read_to_string(&leftover).unwrap(), "stale", "the leftover was written to");
        assert_eq!(files, [tunnel.join("node.key"), paths.tunnel_csr()]);
        // No file in the directory holds the key with a wider mode, and
        // nothing but the leftover is left beside what was written.
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&tunnel).unwrap() {
            let entry = entry.unwrap();
            let mode = entry.metadata().unwrap().permissions().mode() & 0o7777;
            let text = std::fs::read(entry.path()).unwrap();
            if text.windows(6).any(|w| w == b"secret") {
                assert_eq!(mode & 0o077, 0, "{} holds the key with mode {mode:o}", entry.path().display());
            }
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        assert_eq!(names, ["node.csr", "node.key", "node.tmp-netd-join"]);
    }

    #[test]
    fn an_uncommitted_join_takes_back_only_what_it_created() {
        let dir = tempfile::tempdir().unwrap();
        let paths = JoinPaths { config_dir: dir.path().join("etc/netd") };
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        let kept = dir.path().join("etc/kept.conf");
        std::fs::write(&kept, "theirs").unwrap();
        {
            let mut written = Written::default();
            written.write(&paths.tunnel_dir().join("node.key"), b"key", 0o600).unwrap();
            written.write(&paths.netd_config(), b"{}", 0o644).unwrap();
            written.write(&kept, b"ours", 0o644).unwrap();
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(paths.tunnel_dir().join("node.key")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!paths.config_dir.exists(), "the directories it made are gone too");
        assert!(dir.path().join("etc").is_dir(), "what was there before stays");
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), "ours", "an existing file is replaced, not deleted");
        let mut written = Written::default();
        written
            .write(
                &paths.record(),
                br#"{"version":1,"nodeName":"edge-a","registry":"kubernetes:https://x","server":null,"spec":{}}"#,
                0o644,
            )
            .unwrap();
        assert_eq!(written.commit(), vec![paths.record()]);
        let record = read_record(&paths).unwrap().unwrap();
        assert_eq!(record.node_name, "edge-a");
        assert_eq!(record.node_spec(), Some(NodeSpec::default()));
        std::fs::write(paths.record(), r#"{"version":2}"#).unwrap();
        assert!(read_record(&paths).unwrap_err().to_string().contains("is not a netd join record"));
    }
}
