//! The two filesystems cgroup BPF needs: cgroup v2 (where programs attach)
//! and bpffs (where links and maps outlive the process that made them).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where a cgroup v2 hierarchy is mounted when the host has none.
pub const FALLBACK_CGROUP2_MOUNT: &str = "/run/netd/cgroup2";
/// The conventional bpffs mount.
pub const BPFFS: &str = "/sys/fs/bpf";

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: statfs fills the zeroed struct it is given; the path is a valid C string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86-64, c_long elsewhere.
    Ok(stat.f_type as i64)
}

fn mount(fstype: &str, target: &Path) -> io::Result<()> {
    let source = CString::new(fstype).map_err(|_| io::Error::other("NUL in fstype"))?;
    let target_c = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: all strings are valid C strings that outlive the call; no data argument.
    let rc = unsafe { libc::mount(source.as_ptr(), target_c.as_ptr(), source.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The cgroup v2 root: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified`
/// on hybrid ones; when neither is cgroup v2, one is mounted at
/// [`FALLBACK_CGROUP2_MOUNT`] (cgroup v2 always exists in the kernel, even
/// where systemd mounts only v1).
pub fn cgroup2_root() -> io::Result<PathBuf> {
    for candidate in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified", FALLBACK_CGROUP2_MOUNT] {
        if fs_magic(Path::new(candidate)).ok() == Some(CGROUP2_SUPER_MAGIC) {
            return Ok(PathBuf::from(candidate));
        }
    }
    let target = Path::new(FALLBACK_CGROUP2_MOUNT);
    fs::create_dir_all(target)?;
    mount("cgroup2", target)?;
    Ok(target.to_path_buf())
}

/// Makes sure `dir` can hold pins: it must lie on bpffs. When it lies under
/// [`BPFFS`] and nothing is mounted there yet, bpffs is mounted. Creates `dir`.
pub fn ensure_bpffs(dir: &Path) -> io::Result<()> {
    let mut existing = dir;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    if fs_magic(existing)? != BPF_FS_MAGIC {
        if dir.starts_with(BPFFS) && fs_magic(Path::new(BPFFS))? != BPF_FS_MAGIC {
            fs::create_dir_all(BPFFS)?;
            mount("bpf", Path::new(BPFFS))?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not on a bpf filesystem (mount -t bpf bpf {BPFFS})", existing.display()),
            ));
        }
    }
    fs::create_dir_all(dir)
}
