//! Which IPAM stores the node's CNI configurations use: the daemon keeps
//! those stores tidy while the plugin stays a short-lived process.
//!
//! A network configuration (a `*.conflist`'s `plugins`, or a lone `*.conf`
//! / `*.json` plugin config) whose `ipam.type` is `netd-ipam` keeps its
//! store at `<ipam.dataDir>/<name>/netd-ipam.db` (default `dataDir`
//! [`DEFAULT_DATA_DIR`](super::config::DEFAULT_DATA_DIR)), exactly as the plugin
//! resolves it. Files that are not JSON, configurations of other IPAM
//! plugins and unusable `dataDir`s are reported, never fatal: one broken
//! file must not stop the others' stores from being kept.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::config::STORE_FILE;

/// The plugin's `type`.
pub const PLUGIN_TYPE: &str = "netd-ipam";

/// What a configuration directory yields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovered {
    /// Store files, deduplicated and sorted (they may not exist yet: the
    /// first ADD creates them).
    pub stores: BTreeSet<PathBuf>,
    /// Files skipped, with why.
    pub problems: Vec<String>,
}

/// Reads every `*.conflist`, `*.conf` and `*.json` in `dir` (as the
/// container runtime does) and collects the stores of `netd-ipam`
/// configurations. A missing directory yields nothing.
pub fn discover(dir: &Path) -> Discovered {
    let mut found = Discovered::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return found,
        Err(e) => {
            found.problems.push(format!("{}: cannot list: {e}", dir.display()));
            return found;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist" || x == "conf" || x == "json"))
        .collect();
    files.sort();
    for file in files {
        match std::fs::read(&file) {
            Ok(bytes) => stores_of(&bytes, &file, &mut found),
            Err(e) => found.problems.push(format!("{}: cannot read: {e}", file.display())),
        }
    }
    found
}

/// The stores one configuration file names.
fn stores_of(bytes: &[u8], file: &Path, found: &mut Discovered) {
    let shown = file.display();
    let conf: Value = match serde_json::from_slice(bytes) {
        Ok(conf) => conf,
        Err(e) => return found.problems.push(format!("{shown}: not JSON: {e}")),
    };
    let Some(name) = conf.get("name").and_then(Value::as_str) else {
        return found.problems.push(format!("{shown}: no string `name`"));
    };
    let plugins: Vec<&Value> = match conf.get("plugins") {
        Some(Value::Array(list)) => list.iter().collect(),
        Some(_) => return found.problems.push(format!("{shown}: `plugins` is not a list")),
        None => vec![&conf],
    };
    for (i, plugin) in plugins.iter().enumerate() {
        let Some(ipam) = plugin.get("ipam") else { continue };
        if ipam.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE) {
            continue;
        }
        match store_path(name, ipam.get("dataDir")) {
            Ok(path) => {
                found.stores.insert(path);
            }
            Err(reason) => found.problems.push(format!("{shown}: plugins[{i}].ipam: {reason}")),
        }
    }
}

/// `<dataDir>/<name>/netd-ipam.db`, refusing what the plugin refuses.
fn store_path(name: &str, data_dir: Option<&Value>) -> Result<PathBuf, String> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(format!("network name {name:?} cannot name a directory"));
    }
    let dir = match data_dir {
        None | Some(Value::Null) => super::config::data_dir(None),
        Some(Value::String(dir)) => super::config::data_dir(Some(dir)),
        Some(other) => return Err(format!("ipam.dataDir is {other}, not a path")),
    }
    .map_err(|e| e.msg)?;
    Ok(dir.join(name).join(STORE_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_netd_ipam_stores_in_conflists_and_lone_configs_and_reports_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write(
            "10-flannel.conflist",
            r#"{"cniVersion":"1.0.0","name":"cbr0","plugins":[
                {"type":"bridge","ipam":{"type":"netd-ipam","dataDir":"/var/lib/netd/ipam"}},
                {"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        );
        write("20-lone.conf", r#"{"cniVersion":"0.4.0","name":"lone","type":"bridge","ipam":{"type":"netd-ipam"}}"#);
        write("30-other.conflist", r#"{"name":"other","plugins":[{"type":"bridge","ipam":{"type":"host-local"}}]}"#);
        write("40-relative.conflist", r#"{"name":"rel","plugins":[{"ipam":{"type":"netd-ipam","dataDir":""}}]}"#);
        write("50-garbage.conf", "{not json");
        write("60-nameless.conflist", r#"{"plugins":[]}"#);
        write("README.md", "not a config");
        let found = discover(dir.path());
        let stores: Vec<String> = found.stores.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(stores, ["/var/lib/cni/networks/lone/netd-ipam.db", "/var/lib/netd/ipam/cbr0/netd-ipam.db"]);
        assert_eq!(found.problems.len(), 3, "{:?}", found.problems);
        assert!(found.problems[0].contains("40-relative.conflist: plugins[0].ipam: ipam.dataDir: \"\" is empty"));
        assert!(found.problems[1].contains("50-garbage.conf: not JSON"));
        assert!(found.problems[2].contains("60-nameless.conflist: no string `name`"));
        assert_eq!(discover(&dir.path().join("missing")), Discovered::default());
    }
}
