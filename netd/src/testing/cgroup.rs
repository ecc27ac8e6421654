//! Temporary cgroup v2 directories for attaching cgroup BPF programs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{unique_name, HarnessError};

/// Finds the cgroup v2 mount (`/sys/fs/cgroup/unified` on hybrid hosts,
/// `/sys/fs/cgroup` on unified ones).
pub(crate) fn cgroup2_root() -> Result<PathBuf, HarnessError> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").map_err(|e| HarnessError::io("reading /proc/self/mounts", e))?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let target = fields.next()?;
            let fstype = fields.next()?;
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .next()
        .ok_or(HarnessError::NoCgroup2)
}

/// Moves any process left in `dir` to `root` and removes `dir`.
pub(crate) fn remove_cgroup_dir(root: &Path, dir: &Path) {
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines() {
            let _ = fs::write(root.join("cgroup.procs"), pid);
        }
    }
    if let Err(err) = fs::remove_dir(dir) {
        eprintln!("netd test harness: could not remove cgroup {}: {err}", dir.display());
    }
}

/// A child cgroup of the v2 root named `netd-t-<pid>-<n>`. Removed on drop
/// (processes still in it are moved back to the root first).
#[derive(Debug)]
pub struct Cgroup {
    root: PathBuf,
    path: PathBuf,
}

impl Cgroup {
    /// Creates the directory.
    pub fn new() -> Result<Self, HarnessError> {
        let root = cgroup2_root()?;
        let path = root.join(unique_name());
        fs::create_dir(&path).map_err(|e| HarnessError::io(format!("mkdir {}", path.display()), e))?;
        Ok(Self { root, path })
    }

    /// The cgroup directory (what cgroup BPF programs attach to).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts `program args…` as a member of this cgroup: a shell writes its
    /// own pid into `cgroup.procs`, then execs the program, so every syscall
    /// of the program already runs inside the cgroup.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Result<Child, HarnessError> {
        let procs = self.path.join("cgroup.procs");
        let script = format!("echo $$ > '{}' && exec \"$@\"", procs.display());
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| HarnessError::Spawn { command: format!("{program} {}", args.join(" ")), source })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup_dir(&self.root, &self.path);
    }
}
