//! The hub's cache on disk: one file per object, each with a small
//! versioned header carrying the payload's length and SHA-256, so a
//! truncated or garbled file is detected, logged with its path, counted
//! and skipped: never served.
//!
//! Layout under the cache directory (0700; every file 0600, written
//! through [`netd_model::atomic_file`]):
//!
//! ```text
//! objects/<group|core>_<version>_<resource>/<namespace|@cluster>/<name>.obj
//! lists/<group|core>_<version>_<resource>/<sha256 of the scope>.obj
//! raw/<escaped path>.obj                 discovery documents, /version
//! ```
//!
//! A `lists/` entry records that a list of that scope (namespace, field
//! selector, label selector) was answered by the cloud, with its kind and
//! `resourceVersion`: offline, a list is answered only when such a list
//! covers it, so "never listed" is not mistaken for "empty".
//!
//! Every function here blocks (file I/O): call them through
//! `tokio::task::spawn_blocking`.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::metrics::HubMetrics;
use super::request::{ResourceKey, ResourceRequest};
use netd_model::atomic_file::{self, AtomicFileError};

/// Mode of every cache file.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every cache directory.
pub const DIR_MODE: u32 = 0o700;
/// First word of every cache file's header.
const MAGIC: &str = "netd-hub-cache";
/// Format version in the header.
const FORMAT: u32 = 1;
/// Suffix of cache files (atomic_file's temporary files end in `.tmp`).
const SUFFIX: &str = ".obj";
/// The namespace directory of cluster-scoped objects (`@` is escaped in
/// names, so no namespace is called this).
const CLUSTER_DIR: &str = "@cluster";

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Writing a file (disk full, read-only, permissions).
    #[error(transparent)]
    Write(#[from] AtomicFileError),
    /// Reading, listing or removing a file.
    #[error("{action} {}: {error}", path.display())]
    Io {
        /// What was done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// An object without `metadata.name` cannot be stored.
    #[error("a {resource} object without metadata.name cannot be cached")]
    Unnamed {
        /// Its resource.
        resource: String,
    },
}

/// A list of one scope that the cloud answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListRecord {
    /// Its namespace, `None` for all.
    pub namespace: Option<String>,
    /// Canonical field selector (`""` for none).
    pub field_selector: String,
    /// Canonical label selector (`""` for none).
    pub label_selector: String,
    /// The list's `kind`, e.g. `PodList`.
    pub kind: String,
    /// The list's `metadata.resourceVersion`.
    pub resource_version: String,
}

impl ListRecord {
    /// The record of `request`'s scope.
    pub fn of(request: &ResourceRequest, kind: &str, resource_version: &str) -> Self {
        Self {
            namespace: request.namespace.clone(),
            field_selector: request.query.fields.canonical(),
            label_selector: request.query.labels.canonical(),
            kind: kind.to_string(),
            resource_version: resource_version.to_string(),
        }
    }

    fn scope_text(&self) -> String {
        format!("{}\n{}\n{}", self.namespace.as_deref().unwrap_or(""), self.field_selector, self.label_selector)
    }

    /// True when a list of this scope holds every object `request` asks for.
    pub fn covers(&self, request: &ResourceRequest) -> bool {
        let namespace_ok = self.namespace.is_none() || self.namespace == request.namespace;
        let fields = request.query.fields.canonical();
        let labels = request.query.labels.canonical();
        namespace_ok
            && (self.field_selector.is_empty() || self.field_selector == fields)
            && (self.label_selector.is_empty() || self.label_selector == labels)
    }
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    metrics: Arc<HubMetrics>,
}

/// The header and payload of a cache file.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, payload);
    let mut out = format!("{MAGIC} {FORMAT} {} {}\n", payload.len(), hex(digest.as_ref())).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// The payload of a cache file, or why it cannot be trusted.
pub fn decode(bytes: &[u8]) -> Result<&[u8], String> {
    let newline = bytes.iter().position(|&b| b == b'\n').ok_or("no header line (empty or truncated)")?;
    let header = std::str::from_utf8(&bytes[..newline]).map_err(|_| "the header is not text")?;
    let fields: Vec<&str> = header.split(' ').collect();
    let [magic, format, len, sum] = fields.as_slice() else {
        return Err(format!("the header {header:?} is not \"{MAGIC} <format> <length> <sha256>\""));
    };
    if *magic != MAGIC {
        return Err(format!("not a hub cache file (header {header:?})"));
    }
    if format.parse::<u32>().ok() != Some(FORMAT) {
        return Err(format!("format {format} is not {FORMAT}"));
    }
    let payload = &bytes[newline + 1..];
    let len: usize = len.parse().map_err(|_| format!("length {len:?} is not a number"))?;
    if payload.len() != len {
        return Err(format!("{} bytes of payload, the header says {len} (truncated?)", payload.len()));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, payload);
    if hex(digest.as_ref()) != *sum {
        return Err("the checksum does not match the payload".into());
    }
    Ok(payload)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A file name for an object name, path segment or scope: ASCII letters,
/// digits, `-`, `_` and `.` stay (a leading `.` does not), the rest is
/// `%XX`; never empty, never `.` or `..`.
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, b) in name.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('%');
    }
    out
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |error| StoreError::Io { action, path: path.to_path_buf(), error }
}

/// `metadata.namespace` and `metadata.name` of an object.
pub fn object_id(object: &Value) -> (Option<&str>, Option<&str>) {
    (
        object.pointer("/metadata/namespace").and_then(Value::as_str).filter(|s| !s.is_empty()),
        object.pointer("/metadata/name").and_then(Value::as_str).filter(|s| !s.is_empty()),
    )
}

/// An object's `metadata.resourceVersion` as a number (etcd's revision).
pub fn resource_version(object: &Value) -> Option<u64> {
    object.pointer("/metadata/resourceVersion").and_then(Value::as_str).and_then(|rv| rv.parse().ok())
}

impl Store {
    /// The cache in `root`, which is created 0700 (and set to 0700 if it
    /// exists with another mode).
    pub fn open(root: &Path, metrics: Arc<HubMetrics>) -> Result<Self, StoreError> {
        use std::os::unix::fs::PermissionsExt as _;
        atomic_file::create_dirs(root, DIR_MODE)?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(DIR_MODE))
            .map_err(io_err("setting the mode of", root))?;
        Ok(Self { root: root.to_path_buf(), metrics })
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn object_dir(&self, key: &ResourceKey, namespace: Option<&str>) -> PathBuf {
        self.root.join("objects").join(key.dir_name()).join(namespace.map_or_else(|| CLUSTER_DIR.into(), escape))
    }

    /// The file of one object.
    pub fn object_path(&self, key: &ResourceKey, namespace: Option<&str>, name: &str) -> PathBuf {
        self.object_dir(key, namespace).join(format!("{}{SUFFIX}", escape(name)))
    }

    fn write_file(&self, path: &Path, payload: &[u8]) -> Result<(), StoreError> {
        if let Some(dir) = path.parent() {
            atomic_file::create_dirs(dir, DIR_MODE)?;
        }
        atomic_file::write_unless_same(path, &encode(payload), FILE_MODE)?;
        Ok(())
    }

    /// The payload of `path`; `None` when it does not exist, or is corrupt
    /// (logged with its path and counted).
    fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "cannot read a cache file: skipped");
                return None;
            }
        };
        match decode(&bytes) {
            Ok(payload) => Some(payload.to_vec()),
            Err(reason) => {
                self.corrupt(path, &reason);
                None
            }
        }
    }

    fn corrupt(&self, path: &Path, reason: &str) {
        tracing::warn!(file = %path.display(), reason, "corrupt cache file skipped, never served");
        self.metrics.corrupt_file();
    }

    fn read_json(&self, path: &Path) -> Option<Value> {
        let payload = self.read_file(path)?;
        match serde_json::from_slice(&payload) {
            Ok(value) => Some(value),
            Err(error) => {
                self.corrupt(path, &format!("the payload is not JSON: {error}"));
                None
            }
        }
    }

    /// Stores `object` (with `kind` and `apiVersion`) of `key`.
    pub fn put_object(&self, key: &ResourceKey, object: &Value) -> Result<(), StoreError> {
        let (namespace, name) = object_id(object);
        let name = name.ok_or_else(|| StoreError::Unnamed { resource: key.to_string() })?;
        let path = self.object_path(key, namespace, name);
        let payload = serde_json::to_vec(object).unwrap_or_default();
        self.write_file(&path, &payload)
    }

    /// Removes one object (gone already is fine).
    pub fn delete_object(&self, key: &ResourceKey, namespace: Option<&str>, name: &str) -> Result<(), StoreError> {
        let path = self.object_path(key, namespace, name);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                // The removal is durable only once the directory is on disk.
                if let Some(dir) = path.parent() {
                    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("syncing", dir))?;
                }
                Ok(())
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(StoreError::Io { action: "removing", path, error }),
        }
    }

    /// One cached object.
    pub fn get_object(&self, key: &ResourceKey, namespace: Option<&str>, name: &str) -> Option<Value> {
        self.read_json(&self.object_path(key, namespace, name))
    }

    /// Every cached object of `key` in `namespace` (all when `None`),
    /// sorted by namespace and name as the API server lists them.
    pub fn objects(&self, key: &ResourceKey, namespace: Option<&str>) -> Vec<Value> {
        let base = self.root.join("objects").join(key.dir_name());
        let dirs: Vec<PathBuf> = match namespace {
            Some(ns) => vec![base.join(escape(ns))],
            None => match std::fs::read_dir(&base) {
                Ok(entries) => entries.filter_map(Result::ok).map(|e| e.path()).collect(),
                Err(_) => Vec::new(),
            },
        };
        let mut objects = Vec::new();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.filter_map(Result::ok) {
                let path = entry.path();
                if path.to_string_lossy().ends_with(SUFFIX) {
                    if let Some(object) = self.read_json(&path) {
                        objects.push(object);
                    }
                }
            }
        }
        let id = |o: &Value| {
            let (ns, name) = object_id(o);
            (ns.unwrap_or("").to_string(), name.unwrap_or("").to_string())
        };
        objects.sort_by_key(id);
        objects
    }

    /// A fresh complete list of `request`'s scope from the cloud: cached
    /// objects of that scope missing from `items` are removed, `items`
    /// written, the list recorded. Every step is tried; the first error is
    /// returned (a full disk still lets removals happen).
    pub fn replace_scope(
        &self,
        request: &ResourceRequest,
        items: &[Value],
        record: &ListRecord,
    ) -> Result<(), StoreError> {
        let key = &request.key;
        let fresh: BTreeSet<(Option<&str>, Option<&str>)> = items.iter().map(object_id).collect();
        let mut first_error = None;
        for old in self.objects(key, request.namespace.as_deref()) {
            if !request.scope_matches(&old) {
                continue;
            }
            let (namespace, name) = object_id(&old);
            if let Some(name) = name {
                if !fresh.contains(&(namespace, Some(name))) {
                    if let Err(error) = self.delete_object(key, namespace, name) {
                        first_error.get_or_insert(error);
                    }
                }
            }
        }
        self.merge(key, items, &mut first_error);
        if let Err(error) = self.put_list_record(key, record) {
            first_error.get_or_insert(error);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Writes `items` without removing anything (a page of a paginated list).
    pub fn merge_items(&self, key: &ResourceKey, items: &[Value]) -> Result<(), StoreError> {
        let mut first_error = None;
        self.merge(key, items, &mut first_error);
        first_error.map_or(Ok(()), Err)
    }

    fn merge(&self, key: &ResourceKey, items: &[Value], first_error: &mut Option<StoreError>) {
        for item in items {
            if let Err(error) = self.put_object(key, item) {
                first_error.get_or_insert(error);
            }
        }
    }

    fn list_path(&self, key: &ResourceKey, record: &ListRecord) -> PathBuf {
        let digest = ring::digest::digest(&ring::digest::SHA256, record.scope_text().as_bytes());
        self.root.join("lists").join(key.dir_name()).join(format!("{}{SUFFIX}", hex(digest.as_ref())))
    }

    /// Records a list the cloud answered.
    pub fn put_list_record(&self, key: &ResourceKey, record: &ListRecord) -> Result<(), StoreError> {
        let payload = serde_json::to_vec(record).unwrap_or_default();
        self.write_file(&self.list_path(key, record), &payload)
    }

    /// The lists of `key` the cloud answered.
    pub fn list_records(&self, key: &ResourceKey) -> Vec<ListRecord> {
        let dir = self.root.join("lists").join(key.dir_name());
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        let mut records = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if !path.to_string_lossy().ends_with(SUFFIX) {
                continue;
            }
            if let Some(payload) = self.read_file(&path) {
                match serde_json::from_slice(&payload) {
                    Ok(record) => records.push(record),
                    Err(error) => self.corrupt(&path, &format!("not a list record: {error}")),
                }
            }
        }
        records
    }

    fn raw_path(&self, path: &str) -> PathBuf {
        self.root.join("raw").join(format!("{}{SUFFIX}", escape(path)))
    }

    /// Stores a whole response body (discovery documents).
    pub fn put_raw(&self, path: &str, body: &[u8]) -> Result<(), StoreError> {
        self.write_file(&self.raw_path(path), body)
    }

    /// A whole response body stored by [`Store::put_raw`].
    pub fn get_raw(&self, path: &str) -> Option<Vec<u8>> {
        self.read_file(&self.raw_path(path))
    }

    /// The cached data's top directories (everything but the hub's CA and
    /// its remembered autonomy).
    const DATA_DIRS: [&'static str; 3] = ["objects", "lists", "raw"];

    /// True when anything is cached.
    pub fn has_data(&self) -> bool {
        Self::DATA_DIRS.iter().any(|dir| self.root.join(dir).exists())
    }

    /// Removes everything cached (objects, list records, discovery
    /// documents); the hub's CA and other files in the root stay.
    pub fn clear(&self) -> Result<(), StoreError> {
        for dir in Self::DATA_DIRS {
            let path = self.root.join(dir);
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(StoreError::Io { action: "removing", path, error }),
            }
        }
        Ok(())
    }

    /// Objects cached and the bytes of their files.
    pub fn usage(&self) -> (u64, u64) {
        fn walk(dir: &Path, objects: &mut u64, bytes: &mut u64) {
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            for entry in entries.filter_map(Result::ok) {
                let Ok(kind) = entry.file_type() else { continue };
                if kind.is_dir() {
                    walk(&entry.path(), objects, bytes);
                } else if entry.file_name().to_string_lossy().ends_with(SUFFIX) {
                    *objects += 1;
                    *bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
        }
        let (mut objects, mut bytes) = (0, 0);
        walk(&self.root.join("objects"), &mut objects, &mut bytes);
        (objects, bytes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::request;
    use serde_json::json;

    fn pod(name: &str, node: &str) -> Value {
        json!({"kind": "Pod", "apiVersion": "v1",
               "metadata": {"name": name, "namespace": "default", "resourceVersion": "7"},
               "spec": {"nodeName": node}})
    }

    fn list_request(query: &str) -> ResourceRequest {
        request::parse(&http::Method::GET, "/api/v1/pods", Some(query)).unwrap().unwrap()
    }

    #[test]
    fn headers_catch_truncation_and_garbage() {
        let payload = br#"{"a":1}"#;
        let file = encode(payload);
        assert_eq!(decode(&file).unwrap(), payload);
        assert!(decode(&file[..file.len() - 1]).unwrap_err().contains("truncated"));
        let mut flipped = file.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 1;
        assert!(decode(&flipped).unwrap_err().contains("checksum"));
        assert!(decode(b"garbage").is_err());
        assert!(decode(b"").is_err());
        assert!(decode(b"netd-hub-cache 2 1 00\nx").unwrap_err().contains("format"));
        assert_eq!(escape("../x"), "%2E.%2Fx");
        assert_eq!(escape("system:node:a"), "system%3Anode%3Aa");
        assert_eq!(escape(""), "%");
    }

    #[test]
    fn a_fresh_list_replaces_its_scope_only_and_corrupt_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(HubMetrics::default());
        let store = Store::open(&dir.path().join("cache"), metrics.clone()).unwrap();
        let mine = list_request("fieldSelector=spec.nodeName%3Da");
        let record = ListRecord::of(&mine, "PodList", "10");
        store.replace_scope(&mine, &[pod("p1", "a"), pod("p2", "a")], &record).unwrap();
        // Another node's pod cached by another scope is not this scope's.
        store.put_object(&mine.key, &pod("q", "b")).unwrap();
        store.replace_scope(&mine, &[pod("p2", "a"), pod("p3", "a")], &record).unwrap();
        let names: Vec<String> = store
            .objects(&mine.key, None)
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["p2", "p3", "q"]);
        assert!(!store.object_path(&mine.key, Some("default"), "p1").exists());
        assert!(store.list_records(&mine.key)[0].covers(&mine));
        assert!(!store.list_records(&mine.key)[0].covers(&list_request("fieldSelector=spec.nodeName%3Db")));

        let path = store.object_path(&mine.key, Some("default"), "p2");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(store.get_object(&mine.key, Some("default"), "p2").is_none());
        assert_eq!(store.objects(&mine.key, Some("default")).len(), 2);
        assert_eq!(metrics.corrupt_files(), 2);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let p3 = store.object_path(&mine.key, Some("default"), "p3");
        assert_eq!((mode(store.root()), mode(&p3), mode(p3.parent().unwrap())), (0o700, 0o600, 0o700));
        assert_eq!(store.usage().0, 3);
    }
}
