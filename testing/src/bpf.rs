//! Private bpffs pin directories for tests that pin BPF links and maps.

use std::path::{Path, PathBuf};

use netd_ebpf::dnat::TunnelDnat;

use super::{unique_name, HarnessError};

/// Test pin directories live here, never in netd's own `/sys/fs/bpf/netd`.
pub(crate) const BPFFS_TEST_ROOT: &str = "/sys/fs/bpf";

/// Detaches whatever tunnel DNAT is pinned in `dir` and removes it.
pub(crate) fn remove_pins(dir: &Path) {
    if let Err(err) = TunnelDnat::detach(dir) {
        eprintln!("netd test harness: could not detach the pins in {}: {err}", dir.display());
    }
    // detach removes only what it knows; a test may have pinned more.
    let _ = std::fs::remove_dir_all(dir);
}

/// A pin directory `/sys/fs/bpf/netd-t-<pid>-<n>` (not yet created: the
/// code under test makes it). On drop, every tunnel DNAT link pinned there
/// is detached and the directory removed, also while a panic unwinds.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// Picks a fresh name.
    pub fn new() -> Result<Self, HarnessError> {
        let path = Path::new(BPFFS_TEST_ROOT).join(unique_name());
        if path.exists() {
            return Err(HarnessError::Usage(format!("{} already exists", path.display())));
        }
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.path.exists() {
            remove_pins(&self.path);
        }
    }
}
