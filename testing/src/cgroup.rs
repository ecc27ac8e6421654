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

/// [`remove_cgroup_dir`] for a directory and its child cgroups, deepest first.
pub(crate) fn remove_cgroup_tree(root: &Path, dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for child in entries.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()) {
            remove_cgroup_tree(root, &child.path());
        }
    }
    remove_cgroup_dir(root, dir);
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

    /// Creates `name` inside this cgroup; drop it before its parent.
    pub fn child(&self, name: &str) -> Result<Self, HarnessError> {
        let path = self.path.join(name);
        fs::create_dir(&path).map_err(|e| HarnessError::io(format!("mkdir {}", path.display()), e))?;
        Ok(Self { root: self.root.clone(), path })
    }

    /// Moves this whole process (every thread) into the cgroup until the
    /// guard drops, then back to where it was. A socket belongs for good to
    /// the cgroup its creator was in at `socket()` (accepted sockets to
    /// their listener's), and cgroup BPF hooks go by the socket's cgroup: so
    /// sockets made while joined act as if a program in this cgroup made
    /// them, whichever thread uses them later.
    pub fn join(&self) -> Result<CgroupMembership, HarnessError> {
        let own =
            fs::read_to_string("/proc/self/cgroup").map_err(|e| HarnessError::io("reading /proc/self/cgroup", e))?;
        let relative = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .ok_or_else(|| HarnessError::Usage("no cgroup v2 entry in /proc/self/cgroup".into()))?;
        let home = self.root.join(relative.trim_start_matches('/'));
        move_process(&self.path)?;
        Ok(CgroupMembership { home })
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

fn move_process(dir: &Path) -> Result<(), HarnessError> {
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .map_err(|e| HarnessError::io(format!("writing {}", procs.display()), e))
}

/// The process is in a [`Cgroup`] until this drops; see [`Cgroup::join`].
#[derive(Debug)]
pub struct CgroupMembership {
    home: PathBuf,
}

impl Drop for CgroupMembership {
    fn drop(&mut self) {
        if let Err(err) = move_process(&self.home) {
            eprintln!("netd test harness: could not return to cgroup {}: {err}", self.home.display());
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup_dir(&self.root, &self.path);
    }
}
