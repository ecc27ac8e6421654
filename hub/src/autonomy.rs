//! The hub follows its node's autonomy (SPEC §4): an autonomous node's hub
//! caches and answers from its cache while the cloud is away; a node that
//! is not autonomous gets a plain pass-through (nothing cached, nothing
//! answered offline), as with `--cache=false`.
//!
//! - **Where the switch is read**: the node's own Node object, read by the
//!   hub with the node's credentials every probe interval while the cloud
//!   answers (the node authorizer lets a node get its own Node). The
//!   annotations are those `netd-autonomy` sets ([`netd_model::autonomy`]):
//!   any of them meaning "on", bounded or not, is autonomous for the hub
//!   (the bound limits how long the cloud keeps the node's pods, not what
//!   the node itself may serve). A Node that does not exist (404) is not
//!   autonomous: new edge nodes start non-autonomous.
//! - **Remembered across restarts**: the last answer is kept in
//!   `<cache-dir>/autonomous` ([`STATE_FILE`], 0600, through
//!   [`netd_model::atomic_file`]), so a node rebooted with the cloud away knows
//!   whether it may serve from its cache before it can ask. Without the
//!   file the hub starts as not autonomous.
//! - **Autonomy off removes the cache** (objects, list records, discovery
//!   documents; the hub's CA stays): a node that is not autonomous has no
//!   use for Secrets on its disk, and a cache kept but not served would only
//!   grow stale; should autonomy come back, nothing stale can be served.
//! - **A flip ends every open watch** through the hub, so each client
//!   (the kubelet) watches again in the new mode. A reflector that listed
//!   while the hub was a pass-through watches again from its list's
//!   `resourceVersion`, and objects that do not change would never reach
//!   the cache: a watch of a scope no list recorded is answered 410
//!   Expired, once per scope after the cache is turned on, and the client
//!   lists again, through the hub.
//! - `--cache=true` and `--cache=false` ([`CacheMode::Always`],
//!   [`CacheMode::Never`]) override the annotation.

use std::path::{Path, PathBuf};

use serde_json::Value;

use netd_model::atomic_file::{self, AtomicFileError};
use netd_model::autonomy::{Autonomy, AutonomyStatus};

/// The file (in the cache directory) holding the last autonomy seen.
pub const STATE_FILE: &str = "autonomous";

/// Errors of the remembered autonomy.
#[derive(Debug, thiserror::Error)]
pub enum AutonomyStateError {
    /// The state file could not be written.
    #[error("remembering the node's autonomy: {0}")]
    Write(#[from] AtomicFileError),
    /// `--cache` got something else than `auto`, `true` or `false`.
    #[error(
        "{0:?} is not a cache mode: auto (follow the node's autonomy annotation), true (always cache) or false (never)"
    )]
    BadMode(String),
}

/// When the hub caches and answers offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// As the node's autonomy annotation says (`--cache=auto`, the default).
    #[default]
    Auto,
    /// Always (`--cache=true`).
    Always,
    /// Never: a plain pass-through (`--cache=false`).
    Never,
}

impl std::str::FromStr for CacheMode {
    type Err = AutonomyStateError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "auto" {
            return Ok(Self::Auto);
        }
        match netd_model::parse_bool(text) {
            Ok(true) => Ok(Self::Always),
            Ok(false) => Ok(Self::Never),
            Err(_) => Err(AutonomyStateError::BadMode(text.to_string())),
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Always => "true",
            Self::Never => "false",
        })
    }
}

/// Whether a Node object (as kube-apiserver sends it) is autonomous.
pub fn node_is_autonomous(node: &Value) -> bool {
    let annotations = node.pointer("/metadata/annotations").and_then(Value::as_object);
    let status = AutonomyStatus::from_annotations(|key| annotations?.get(key)?.as_str());
    status.autonomy != Autonomy::Off
}

fn state_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join(STATE_FILE)
}

/// The autonomy remembered in `cache_dir`; `false` when none is (or the
/// file does not say `true`/`false`: logged). Blocks (a small read).
pub fn read_state(cache_dir: &Path) -> bool {
    let path = state_path(cache_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim() {
            "true" => true,
            "false" => false,
            other => {
                tracing::warn!(file = %path.display(), content = other, "not true or false: taken as not autonomous");
                false
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "unreadable: taken as not autonomous");
            false
        }
    }
}

/// Remembers `autonomous` in `cache_dir` (0600). Blocks (a small write).
pub fn write_state(cache_dir: &Path, autonomous: bool) -> Result<(), AutonomyStateError> {
    atomic_file::write(&state_path(cache_dir), format!("{autonomous}\n").as_bytes(), super::store::FILE_MODE)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    #[test]
    fn modes_parse_and_annotations_decide() {
        assert_eq!("auto".parse::<CacheMode>().unwrap(), CacheMode::Auto);
        assert_eq!("true".parse::<CacheMode>().unwrap(), CacheMode::Always);
        assert_eq!("0".parse::<CacheMode>().unwrap(), CacheMode::Never);
        assert!("maybe".parse::<CacheMode>().unwrap_err().to_string().contains("not a cache mode"));
        let node = |annotations: Value| json!({"metadata": {"name": "n", "annotations": annotations}});
        assert!(!node_is_autonomous(&json!({"metadata": {"name": "n"}})));
        assert!(!node_is_autonomous(&node(json!({"node.beta.alibabacloud.com/autonomy": "false"}))));
        assert!(node_is_autonomous(&node(json!({"node.beta.alibabacloud.com/autonomy": "true"}))));
        assert!(node_is_autonomous(&node(json!({"node.beta.openyurt.io/autonomy": "true"}))));
        assert!(node_is_autonomous(&node(json!({"node.openyurt.io/autonomy-duration": "10m"}))));
    }

    #[test]
    fn the_state_survives_a_restart_and_defaults_to_off() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        assert!(!read_state(dir.path()));
        write_state(dir.path(), true).unwrap();
        assert!(read_state(dir.path()));
        let mode = std::fs::metadata(dir.path().join(STATE_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        write_state(dir.path(), false).unwrap();
        assert!(!read_state(dir.path()));
        std::fs::write(dir.path().join(STATE_FILE), "yes please").unwrap();
        assert!(!read_state(dir.path()));
    }
}
