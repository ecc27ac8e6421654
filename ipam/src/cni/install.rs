//! `netd install-cni`: puts the IPAM plugin and the CNI configuration on the
//! host, as the DaemonSet's init container does on every node start.
//!
//! Each file goes through [`atomic_file::write_unless_same`]: written to a
//! fresh temporary file beside its target (`O_EXCL`, so nothing planted at
//! a temporary name is followed or reused), fsynced, given its mode (0755
//! for the plugin, 0644 for the conflist) and renamed over the target; the
//! kubelet and the runtime see the old file or the new one, never a
//! half-copied plugin or a half-written conflist. A target that already
//! holds exactly the new bytes with the right mode is left alone, so a
//! restart does not touch a running node's files.
//!
//! Everything that can be checked is checked before anything is written:
//! both sources are read, and the conflist must be a CNI network
//! configuration list whose plugins include a `netd-ipam` IPAM, so a broken
//! ConfigMap never replaces a working conflist. The plugin is installed
//! before the conflist that names it, and conflicting conflists (flannel's
//! `10-flannel.conflist`, which sorts first and would win) are removed last,
//! so at every moment the runtime has a usable configuration.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::discover::PLUGIN_TYPE;
use netd_model::atomic_file::{self, AtomicFileError};

/// The plugin's permissions on the host.
pub const PLUGIN_MODE: u32 = 0o755;

/// The conflist's permissions on the host.
pub const CONFLIST_MODE: u32 = 0o644;

/// Permissions of a target directory `install` has to create.
const DIR_MODE: u32 = 0o755;

/// What to install where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallPlan {
    /// The IPAM plugin; installed into `bin_dir` under its own file name.
    pub plugin: PathBuf,
    /// The host's CNI plugin directory.
    pub bin_dir: PathBuf,
    /// The network configuration list to install.
    pub conflist: PathBuf,
    /// The host's CNI configuration directory.
    pub conf_dir: PathBuf,
    /// The conflist's file name in `conf_dir`.
    pub conf_name: String,
    /// File names in `conf_dir` to remove once the conflist is in place.
    pub remove: Vec<String>,
}

/// One thing [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `target` now holds `source`'s bytes with `mode`.
    Installed {
        /// The file installed.
        target: PathBuf,
        /// Where its bytes came from.
        source: PathBuf,
        /// Its permissions.
        mode: u32,
        /// Its size in bytes.
        bytes: usize,
    },
    /// `target` already held `source`'s bytes with the right mode: untouched.
    Unchanged {
        /// The file left alone.
        target: PathBuf,
    },
    /// A conflicting file was removed.
    Removed {
        /// The file removed.
        path: PathBuf,
    },
    /// A conflicting file was not there: nothing to remove.
    Absent {
        /// The file looked for.
        path: PathBuf,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Installed { target, source, mode, bytes } => {
                write!(f, "installed {} ({mode:04o}, {bytes} bytes) from {}", target.display(), source.display())
            }
            Self::Unchanged { target } => write!(f, "unchanged {}: already identical", target.display()),
            Self::Removed { path } => write!(f, "removed {}", path.display()),
            Self::Absent { path } => write!(f, "absent {}: nothing to remove", path.display()),
        }
    }
}

/// Why a conflist is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConflistProblem {
    /// Not JSON at all.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("not a JSON object")]
    NotObject,
    /// `name` missing or not a non-empty string (the runtime needs it).
    #[error("no \"name\" string")]
    NoName,
    /// `cniVersion` missing or not a string.
    #[error("no \"cniVersion\" string")]
    NoCniVersion,
    /// `plugins` missing or not an array: a lone plugin config, not a list.
    #[error("no \"plugins\" array (a .conflist holds a list of plugin configurations)")]
    NoPlugins,
    /// No plugin has `ipam.type` `netd-ipam`.
    #[error("no plugin has \"ipam\": {{\"type\": \"netd-ipam\"}} (IPAM types found: {found})")]
    NoNetdIpam {
        /// The IPAM types the plugins name, comma-separated, or "none".
        found: String,
    },
}

/// Why [`install`] failed. Nothing is half-written: every target holds
/// its old file or its new one, and no temporary file is left behind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// A source could not be read (missing, a directory, not permitted).
    #[error("cannot read {what} {}: {error}", path.display())]
    ReadSource {
        /// "plugin" or "conflist".
        what: &'static str,
        /// The source.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// The plugin source names no file (it ends in `/` or `..`).
    #[error("plugin {} names no file", path.display())]
    NoPluginName {
        /// The path given.
        path: PathBuf,
    },
    /// The conflist source is not one to install; nothing was changed.
    #[error("refusing to install {}: {problem}; the installed conflist is left as it is", path.display())]
    InvalidConflist {
        /// The source.
        path: PathBuf,
        /// What is wrong with it.
        problem: ConflistProblem,
    },
    /// A conflist file name (to install or to remove) is not a plain name.
    #[error("{what} {name:?} is not a plain file name (no '/', not empty, '.' or '..')")]
    BadName {
        /// "conflist name" or "file to remove".
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// The conflist to install is also named for removal.
    #[error("{name:?} is both the conflist to install and a file to remove")]
    RemovesItself {
        /// The name.
        name: String,
    },
    /// Writing a target failed (the target is unchanged).
    #[error(transparent)]
    Write(#[from] AtomicFileError),
    /// A conflicting file could not be removed.
    #[error("cannot remove {}: {error}", path.display())]
    Remove {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
}

/// Checks that `bytes` is a conflist [`install`] may put in place: a JSON
/// object with `name`, `cniVersion` and a `plugins` array one of whose
/// entries has `ipam.type` `netd-ipam`.
pub fn validate_conflist(bytes: &[u8]) -> Result<(), ConflistProblem> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| ConflistProblem::NotJson(e.to_string()))?;
    let object = value.as_object().ok_or(ConflistProblem::NotObject)?;
    if object.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
        return Err(ConflistProblem::NoName);
    }
    if !object.get("cniVersion").is_some_and(Value::is_string) {
        return Err(ConflistProblem::NoCniVersion);
    }
    let plugins = object.get("plugins").and_then(Value::as_array).ok_or(ConflistProblem::NoPlugins)?;
    let ipam_types: Vec<&str> = plugins.iter().filter_map(|plugin| plugin.get("ipam")?.get("type")?.as_str()).collect();
    if ipam_types.contains(&PLUGIN_TYPE) {
        return Ok(());
    }
    let found = if ipam_types.is_empty() { "none".to_owned() } else { ipam_types.join(", ") };
    Err(ConflistProblem::NoNetdIpam { found })
}

/// Installs `plan`'s plugin, then its conflist, then removes the files it
/// names for removal; returns what it did, in order. Sources and names
/// are all checked before anything on the host changes.
pub fn install(plan: &InstallPlan) -> Result<Vec<Action>, InstallError> {
    plain_name("conflist name", &plan.conf_name)?;
    for name in &plan.remove {
        plain_name("file to remove", name)?;
        if *name == plan.conf_name {
            return Err(InstallError::RemovesItself { name: name.clone() });
        }
    }
    let plugin_name =
        plan.plugin.file_name().ok_or_else(|| InstallError::NoPluginName { path: plan.plugin.clone() })?;
    let plugin = read_source("plugin", &plan.plugin)?;
    let conflist = read_source("conflist", &plan.conflist)?;
    validate_conflist(&conflist)
        .map_err(|problem| InstallError::InvalidConflist { path: plan.conflist.clone(), problem })?;

    let mut actions = Vec::new();
    actions.push(put(&plan.bin_dir.join(plugin_name), &plan.plugin, &plugin, PLUGIN_MODE)?);
    actions.push(put(&plan.conf_dir.join(&plan.conf_name), &plan.conflist, &conflist, CONFLIST_MODE)?);
    for name in &plan.remove {
        actions.push(remove(&plan.conf_dir.join(name))?);
    }
    Ok(actions)
}

fn plain_name(what: &'static str, name: &str) -> Result<(), InstallError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(InstallError::BadName { what, name: name.to_owned() });
    }
    Ok(())
}

fn read_source(what: &'static str, path: &Path) -> Result<Vec<u8>, InstallError> {
    std::fs::read(path).map_err(|error| InstallError::ReadSource { what, path: path.to_path_buf(), error })
}

/// Writes `bytes` to `target` unless it already holds them.
fn put(target: &Path, source: &Path, bytes: &[u8], mode: u32) -> Result<Action, InstallError> {
    if let Some(dir) = target.parent() {
        atomic_file::create_dirs(dir, DIR_MODE)?;
    }
    Ok(if atomic_file::write_unless_same(target, bytes, mode)? {
        Action::Installed { target: target.to_path_buf(), source: source.to_path_buf(), mode, bytes: bytes.len() }
    } else {
        Action::Unchanged { target: target.to_path_buf() }
    })
}

/// Removes `path` (a file or a symlink, never what a symlink points to)
/// and makes the removal durable.
fn remove(path: &Path) -> Result<Action, InstallError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Action::Absent { path: path.to_path_buf() }),
        Err(error) => return Err(InstallError::Remove { path: path.to_path_buf(), error }),
    }
    // Without this a power cut could bring flannel's conflist back beside ours.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|error| InstallError::Remove { path: path.to_path_buf(), error })?;
    }
    Ok(Action::Removed { path: path.to_path_buf() })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const GOOD: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[
        {"type":"bridge","bridge":"cni0","ipam":{"type":"netd-ipam","dataDir":"/var/lib/cni/networks"}},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    /// A container's sources and a host's directories, in one temp dir.
    struct Node {
        dir: tempfile::TempDir,
        plan: InstallPlan,
    }

    impl Node {
        fn new() -> Result<Self, Box<dyn std::error::Error>> {
            let dir = tempfile::tempdir()?;
            let src = dir.path().join("src");
            fs::create_dir(&src)?;
            fs::write(src.join("netd-ipam"), b"\x7fELF plugin v1")?;
            fs::write(src.join("cni-conf.json"), GOOD)?;
            let plan = InstallPlan {
                plugin: src.join("netd-ipam"),
                bin_dir: dir.path().join("host/opt/cni/bin"),
                conflist: src.join("cni-conf.json"),
                conf_dir: dir.path().join("host/etc/cni/net.d"),
                conf_name: "10-netd.conflist".into(),
                remove: vec!["10-flannel.conflist".into()],
            };
            Ok(Self { dir, plan })
        }

        fn plugin(&self) -> PathBuf {
            self.plan.bin_dir.join("netd-ipam")
        }

        fn conflist(&self) -> PathBuf {
            self.plan.conf_dir.join("10-netd.conflist")
        }

        fn flannel(&self) -> PathBuf {
            self.plan.conf_dir.join("10-flannel.conflist")
        }

        /// Every name in the host's two directories, sorted.
        fn host_names(&self) -> Result<Vec<String>, io::Error> {
            let mut names = Vec::new();
            for dir in [&self.plan.bin_dir, &self.plan.conf_dir] {
                if dir.exists() {
                    for entry in fs::read_dir(dir)? {
                        names.push(entry?.file_name().to_string_lossy().into_owned());
                    }
                }
            }
            names.sort();
            Ok(names)
        }
    }

    fn mode_of(path: &Path) -> Result<u32, io::Error> {
        Ok(fs::symlink_metadata(path)?.permissions().mode() & 0o7777)
    }

    #[test]
    fn a_fresh_install_writes_both_with_their_modes_and_removes_flannels() -> TestResult {
        let node = Node::new()?;
        fs::create_dir_all(&node.plan.conf_dir)?;
        fs::write(node.flannel(), r#"{"name":"cbr0","plugins":[{"type":"flannel"}]}"#)?;
        let actions = install(&node.plan)?;
        assert_eq!(
            actions,
            [
                Action::Installed { target: node.plugin(), source: node.plan.plugin.clone(), mode: 0o755, bytes: 14 },
                Action::Installed {
                    target: node.conflist(),
                    source: node.plan.conflist.clone(),
                    mode: 0o644,
                    bytes: GOOD.len()
                },
                Action::Removed { path: node.flannel() },
            ]
        );
        assert_eq!(fs::read(node.plugin())?, b"\x7fELF plugin v1");
        assert_eq!(fs::read_to_string(node.conflist())?, GOOD);
        assert_eq!(mode_of(&node.plugin())?, 0o755);
        assert_eq!(mode_of(&node.conflist())?, 0o644);
        assert_eq!(node.host_names()?, ["10-netd.conflist", "netd-ipam"], "flannel's gone, no temporary left");
        assert!(actions[0]
            .to_string()
            .starts_with(&format!("installed {} (0755, 14 bytes) from", node.plugin().display())));
        assert_eq!(actions[2].to_string(), format!("removed {}", node.flannel().display()));
        Ok(())
    }

    #[test]
    fn a_second_run_touches_nothing() -> TestResult {
        let node = Node::new()?;
        install(&node.plan)?;
        let stamp = |path: &Path| -> Result<(u64, i64, i64), io::Error> {
            let meta = fs::metadata(path)?;
            Ok((meta.ino(), meta.mtime(), meta.mtime_nsec()))
        };
        let before = (stamp(&node.plugin())?, stamp(&node.conflist())?);
        let actions = install(&node.plan)?;
        assert_eq!(
            actions,
            [
                Action::Unchanged { target: node.plugin() },
                Action::Unchanged { target: node.conflist() },
                Action::Absent { path: node.flannel() },
            ]
        );
        assert_eq!((stamp(&node.plugin())?, stamp(&node.conflist())?), before);
        assert!(actions[0].to_string().ends_with("already identical"));
        Ok(())
    }

    #[test]
    fn changed_sources_or_modes_are_replaced() -> TestResult {
        let node = Node::new()?;
        install(&node.plan)?;
        let old_inode = fs::metadata(node.plugin())?.ino();
        fs::write(&node.plan.plugin, b"\x7fELF plugin v2")?;
        // Someone chmodded the conflist: its mode is restored.
        fs::set_permissions(node.conflist(), fs::Permissions::from_mode(0o600))?;
        let actions = install(&node.plan)?;
        assert!(matches!(actions[0], Action::Installed { .. }), "{actions:?}");
        assert!(matches!(actions[1], Action::Installed { .. }), "{actions:?}");
        assert_eq!(fs::read(node.plugin())?, b"\x7fELF plugin v2");
        assert_ne!(fs::metadata(node.plugin())?.ino(), old_inode, "replaced by rename, not rewritten in place");
        assert_eq!(mode_of(&node.conflist())?, 0o644);
        Ok(())
    }

    #[test]
    fn an_invalid_conflist_is_refused_and_the_old_one_stays() -> TestResult {
        let node = Node::new()?;
        install(&node.plan)?;
        fs::write(node.flannel(), "flannel's")?;
        let cases = [
            ("{\"name\":", "not JSON: EOF while parsing"),
            ("[]", "not a JSON object"),
            (r#"{"cniVersion":"1.0.0","plugins":[]}"#, "no \"name\" string"),
            (r#"{"name":"cbr0","plugins":[]}"#, "no \"cniVersion\" string"),
            (r#"{"name":"cbr0","cniVersion":"1.0.0","type":"bridge"}"#, "no \"plugins\" array"),
            (
                r#"{"name":"cbr0","cniVersion":"1.0.0","plugins":[{"type":"bridge","ipam":{"type":"host-local"}},{"type":"portmap"}]}"#,
                "no plugin has \"ipam\": {\"type\": \"netd-ipam\"} (IPAM types found: host-local)",
            ),
            (r#"{"name":"cbr0","cniVersion":"1.0.0","plugins":[]}"#, "(IPAM types found: none)"),
        ];
        fs::write(&node.plan.plugin, b"\x7fELF plugin v2")?;
        for (bad, expected) in cases {
            fs::write(&node.plan.conflist, bad)?;
            let err = install(&node.plan).err().ok_or("an invalid conflist was installed")?;
            let text = err.to_string();
            assert!(matches!(err, InstallError::InvalidConflist { .. }), "{text}");
            assert!(text.starts_with(&format!("refusing to install {}: ", node.plan.conflist.display())), "{text}");
            assert!(text.contains(expected), "{expected:?} not in {text:?}");
            assert!(text.ends_with("the installed conflist is left as it is"), "{text}");
        }
        // Nothing changed: not the conflist, not the plugin (checked first), not flannel's.
        assert_eq!(fs::read_to_string(node.conflist())?, GOOD);
        assert_eq!(fs::read(node.plugin())?, b"\x7fELF plugin v1");
        assert_eq!(fs::read_to_string(node.flannel())?, "flannel's");
        Ok(())
    }

    #[test]
    fn a_missing_source_is_named_and_nothing_changes() -> TestResult {
        let node = Node::new()?;
        let mut plan = node.plan.clone();
        plan.plugin = node.dir.path().join("src/no-such-plugin");
        let err = install(&plan).err().ok_or("a missing plugin installed")?;
        assert_eq!(
            err.to_string(),
            format!("cannot read plugin {}: No such file or directory (os error 2)", plan.plugin.display())
        );
        let mut plan = node.plan.clone();
        plan.conflist = node.dir.path().join("src/no-such.json");
        let err = install(&plan).err().ok_or("a missing conflist installed")?;
        assert_eq!(
            err.to_string(),
            format!("cannot read conflist {}: No such file or directory (os error 2)", plan.conflist.display())
        );
        assert!(node.host_names()?.is_empty(), "the plugin was not installed before the conflist was checked");
        Ok(())
    }

    #[test]
    fn names_are_plain_and_the_conflist_is_never_removed() -> TestResult {
        let node = Node::new()?;
        for bad in ["", ".", "..", "../10-netd.conflist", "a/b"] {
            let mut plan = node.plan.clone();
            plan.remove = vec![bad.into()];
            let err = install(&plan).err().ok_or("a bad name was taken")?;
            assert!(matches!(err, InstallError::BadName { what: "file to remove", .. }), "{bad}: {err}");
            let mut plan = node.plan.clone();
            plan.conf_name = bad.into();
            assert!(matches!(install(&plan), Err(InstallError::BadName { what: "conflist name", .. })), "{bad}");
        }
        let mut plan = node.plan.clone();
        plan.remove.push("10-netd.conflist".into());
        let err = install(&plan).err().ok_or("removing itself was taken")?;
        assert_eq!(err.to_string(), "\"10-netd.conflist\" is both the conflist to install and a file to remove");
        assert!(node.host_names()?.is_empty());
        Ok(())
    }

    #[test]
    fn symlinks_at_temporary_names_and_at_the_target_are_never_followed() -> TestResult {
        let node = Node::new()?;
        fs::create_dir_all(&node.plan.bin_dir)?;
        fs::create_dir_all(&node.plan.conf_dir)?;
        let victim = node.dir.path().join("victim");
        fs::write(&victim, "do not touch")?;
        // The names a temporary file might have had: the old init
        // container's, and `.<name>.tmp-<pid>`.
        let pid = std::process::id();
        let planted = [
            node.plan.bin_dir.join(".netd-ipam.tmp"),
            node.plan.bin_dir.join(format!(".netd-ipam.tmp-{pid}")),
            node.plan.conf_dir.join(".10-netd.conflist.tmp"),
            node.plan.conf_dir.join(format!(".10-netd.conflist.tmp-{pid}")),
        ];
        for link in &planted {
            std::os::unix::fs::symlink(&victim, link)?;
        }
        // A symlink at the target itself is replaced, not written through.
        std::os::unix::fs::symlink(&victim, node.plugin())?;
        install(&node.plan)?;
        assert_eq!(fs::read_to_string(&victim)?, "do not touch");
        assert!(fs::symlink_metadata(node.plugin())?.is_file());
        assert_eq!(fs::read(node.plugin())?, b"\x7fELF plugin v1");
        for link in &planted {
            assert!(fs::symlink_metadata(link)?.file_type().is_symlink(), "{} was replaced", link.display());
        }
        // A symlink named for removal is removed, not what it points to.
        std::os::unix::fs::symlink(&victim, node.flannel())?;
        install(&node.plan)?;
        assert!(fs::symlink_metadata(node.flannel()).is_err());
        assert_eq!(fs::read_to_string(&victim)?, "do not touch");
        Ok(())
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_nothing_else() -> TestResult {
        let node = Node::new()?;
        install(&node.plan)?;
        // The conflist's rename fails: a non-empty directory stands at its name.
        fs::remove_file(node.conflist())?;
        fs::create_dir(node.conflist())?;
        fs::write(node.conflist().join("inside"), "x")?;
        fs::write(&node.plan.plugin, b"\x7fELF plugin v2")?;
        let err = install(&node.plan).err().ok_or("the write succeeded")?;
        let text = err.to_string();
        assert!(matches!(err, InstallError::Write(_)), "{text}");
        assert!(text.contains(&node.conflist().display().to_string()) && text.contains("renaming"), "{text}");
        // The plugin went in first (it is complete and names nothing); no
        // temporary file is left in either directory.
        assert_eq!(fs::read(node.plugin())?, b"\x7fELF plugin v2");
        assert_eq!(node.host_names()?, ["10-netd.conflist", "netd-ipam"]);
        assert_eq!(fs::read_to_string(node.conflist().join("inside"))?, "x");
        Ok(())
    }
}
