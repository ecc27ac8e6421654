//! The one way netd writes a file it owns: whole, atomically, durably and
//! with its final permissions from the first byte.
//!
//! [`write()`] puts the contents in a fresh temporary file beside the target,
//! fsyncs it, renames it over the target and fsyncs the directory, so a
//! reader (or a node after a power cut) sees the old file or the new one,
//! never a mix or a prefix. The temporary file is created with
//! `O_CREAT|O_EXCL` under a name no other writer shares (process id, a
//! process-wide counter and a random part) and with the target's mode, then
//! set to exactly that mode: a leftover temporary file from a crashed
//! writer, whatever its name and permissions, is never opened again, so it
//! cannot lend its mode (or its owner, or a hard link) to a key. A key
//! written with mode 0600 is 0600 from its first byte to its rename.
//!
//! Every file netd writes whole goes through here: `subnet.env`, the
//! overlay snapshot (and the creation of its journal), the tunnel
//! certificates and keys, what `netd-join` leaves on the node, and the CNI
//! plugin and conflist `netd install-cni` puts on the host
//! ([`write_unless_same`]: an identical file is left alone). Appends
//! to an existing file (the snapshot journal) and SQLite databases, which
//! manage their own files, do not.
//!
//! This module knows nothing of netlink, BPF or Kubernetes.

use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::hash::{BuildHasher as _, Hasher as _};
use std::io::{self, Read as _, Write as _};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The permission bits a mode may carry (`chmod`'s); anything above is not
/// a permission and is dropped.
const PERMISSION_BITS: u32 = 0o7777;

/// How many fresh temporary names [`write()`] tries before giving up. Names
/// collide only with a file someone planted under a name they guessed (the
/// random part makes that a guess of 64 bits), so a handful is plenty.
const NAME_ATTEMPTS: u32 = 16;

/// Bytes of the target's name kept in the temporary name, so that the
/// temporary name (with its own ~60 bytes) stays under `NAME_MAX` (255).
const NAME_PREFIX_MAX: usize = 160;

/// Temporary files made by this process so far; part of every temporary
/// name, so two threads of one process never share one.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Why a file could not be written. The target is then unchanged (except
/// for [`AtomicFileError::Write`] with step `"syncing its directory"`, where
/// the new file is in place but may not survive a power cut) and no
/// temporary file is left behind.
///
/// Messages carry the OS error's text themselves rather than as a
/// [`std::error::Error::source`], because netd logs these with `%error`
/// (which would drop a source) and binaries print chains with `{:#}`
/// (which would print it twice); [`AtomicFileError::io_error`] gives the
/// error itself to code that needs its kind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AtomicFileError {
    /// The path names no file: it is empty, `/`, or ends in `..`.
    #[error("cannot write {}: the path names no file", path.display())]
    NoFileName {
        /// The path given.
        path: PathBuf,
    },
    /// A directory could not be created.
    #[error("cannot create directory {}: {error}", dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// One step of writing `path` failed.
    #[error("cannot write {}: {step} failed: {error}", path.display())]
    Write {
        /// The file being written.
        path: PathBuf,
        /// What failed: "creating a temporary file beside it", "setting the
        /// temporary file's mode", "writing the temporary file", "syncing the
        /// temporary file", "renaming the temporary file over it" or
        /// "syncing its directory".
        step: &'static str,
        /// The OS error.
        error: io::Error,
    },
}

impl AtomicFileError {
    /// The file or directory the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::NoFileName { path } | Self::Write { path, .. } => path,
            Self::CreateDir { dir, .. } => dir,
        }
    }

    /// The OS error, if one caused this.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Self::NoFileName { .. } => None,
            Self::CreateDir { error, .. } | Self::Write { error, .. } => Some(error),
        }
    }
}

/// Replaces `path` with a file holding exactly `contents` and permissions
/// exactly `mode` (e.g. `0o600` for a key), atomically and durably: a
/// temporary file in the same directory, made with `mode` under a name no
/// other writer uses, written and fsynced, renamed over `path`, then the
/// directory fsynced. `path`'s directory must exist (see [`create_dirs`]).
///
/// Whatever `path` was before (another mode, another owner, a symlink) is
/// replaced, not written through. On error the temporary file is removed.
pub fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), AtomicFileError> {
    let name = path.file_name().ok_or_else(|| AtomicFileError::NoFileName { path: path.to_path_buf() })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let failed = |step, error| AtomicFileError::Write { path: path.to_path_buf(), step, error };
    let mode = mode & PERMISSION_BITS;
    let prefix = &name.as_bytes()[..name.len().min(NAME_PREFIX_MAX)];
    let (file, temp) =
        create_temp(dir, mode, || temp_name(prefix)).map_err(|e| failed("creating a temporary file beside it", e))?;
    // Removes the temporary file on every error path below; disarmed once
    // the rename has consumed it.
    let mut guard = TempGuard(Some(temp.clone()));
    fill(file, contents, mode).map_err(|(step, e)| failed(step, e))?;
    fs::rename(&temp, path).map_err(|e| failed("renaming the temporary file over it", e))?;
    guard.disarm();
    // The rename is only durable once the directory entry is on disk.
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| failed("syncing its directory", e))
}

/// Creates `dir` and any missing parents with permissions `mode` (before
/// the umask, as `mkdir -p -m` does for the last one; here for all of
/// them). Directories that already exist are left as they are.
pub fn create_dirs(dir: &Path, mode: u32) -> Result<(), AtomicFileError> {
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(mode & PERMISSION_BITS)
        .create(dir)
        .map_err(|error| AtomicFileError::CreateDir { dir: dir.to_path_buf(), error })
}

/// [`create_dirs`] for `path`'s directory with `dir_mode`, then [`write()`].
pub fn write_creating_dirs(path: &Path, contents: &[u8], mode: u32, dir_mode: u32) -> Result<(), AtomicFileError> {
    if let Some(dir) = path.parent() {
        create_dirs(dir, dir_mode)?;
    }
    write(path, contents, mode)
}

/// [`write()`], unless `path` already is a regular file (not a symlink)
/// holding exactly `contents` with permissions exactly `mode`: then nothing
/// is touched (same inode, same mtime), so an installer re-run on a node
/// whose files are current changes nothing under a running runtime.
/// Returns whether it wrote. A target that cannot be read or compared is
/// replaced, which is always safe.
pub fn write_unless_same(path: &Path, contents: &[u8], mode: u32) -> Result<bool, AtomicFileError> {
    if holds(path, contents, mode & PERMISSION_BITS) {
        return Ok(false);
    }
    write(path, contents, mode).map(|()| true)
}

/// Whether `path` is a regular file with exactly `contents` and `mode`.
fn holds(path: &Path, contents: &[u8], mode: u32) -> bool {
    // O_NOFOLLOW: a symlink is never "the same file", whatever it points
    // to; O_NONBLOCK: a FIFO planted at the target cannot stall the open.
    let opened = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path);
    let Ok(mut file) = opened else { return false };
    let Ok(meta) = file.metadata() else { return false };
    if !meta.is_file() || meta.permissions().mode() & PERMISSION_BITS != mode || meta.len() != contents.len() as u64 {
        return false;
    }
    let mut current = Vec::with_capacity(contents.len());
    file.read_to_end(&mut current).is_ok() && current == contents
}

/// Creates a new temporary file in `dir` with `mode`, under the first of
/// `names` nobody has taken: `O_EXCL` refuses any file already there (a
/// leftover, or something planted, even a symlink), so one is never
/// reused; its name is skipped for the next one.
fn create_temp(dir: &Path, mode: u32, mut names: impl FnMut() -> OsString) -> io::Result<(File, PathBuf)> {
    let mut last = None;
    for _ in 0..NAME_ATTEMPTS {
        let temp = dir.join(names());
        match OpenOptions::new().write(true).create_new(true).mode(mode).open(&temp) {
            Ok(file) => return Ok((file, temp)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)))
}

/// `.<name>.<pid>.<counter>.<random>.tmp`: the pid and counter keep this
/// process's writers apart, the random part keeps other processes (and a
/// reused pid after a crash) from guessing it.
fn temp_name(prefix: &[u8]) -> OsString {
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    // RandomState is seeded from the OS's randomness once per thread and
    // differs on every call; hashing the counter with it gives 64
    // unpredictable bits without another dependency.
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(count);
    hasher.write_u32(pid);
    let random = hasher.finish();
    let mut temp = Vec::with_capacity(prefix.len() + 64);
    temp.push(b'.');
    temp.extend_from_slice(prefix);
    temp.extend_from_slice(format!(".{pid}.{count}.{random:016x}.tmp").as_bytes());
    OsString::from_vec(temp)
}

/// Sets the new file's mode exactly, writes `contents` and syncs it.
fn fill(mut file: File, contents: &[u8], mode: u32) -> Result<(), (&'static str, io::Error)> {
    // The umask may have narrowed the mode `open` applied; fchmod makes it
    // exactly what the caller asked (the file is ours and still empty).
    file.set_permissions(Permissions::from_mode(mode)).map_err(|e| ("setting the temporary file's mode", e))?;
    file.write_all(contents).map_err(|e| ("writing the temporary file", e))?;
    file.sync_all().map_err(|e| ("syncing the temporary file", e))
}

/// Removes the temporary file when dropped, unless disarmed.
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(temp) = self.0.take() {
            let _ = fs::remove_file(temp);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// A world-readable file planted where a temporary file might go.
    fn plant(path: &Path, contents: &str) -> u64 {
        fs::write(path, contents).unwrap();
        fs::set_permissions(path, Permissions::from_mode(0o644)).unwrap();
        fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn a_key_is_0600_even_with_world_readable_leftover_temporaries_of_every_old_name() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("node.key");
        let pid = std::process::id();
        // The names netd's writers used before this module, with this
        // process's pid (the case where the old code reused the leftover).
        let leftovers = [
            format!(".node.key.{pid}.tmp"),  // tunnel::certs
            format!(".node.key.tmp-{pid}"),  // subnet_env
            format!("node.key.tmp.{pid}"),   // vxlan::snapshot
            "node.tmp-netd-join".to_owned(), // join::local
        ];
        let inodes: Vec<u64> = leftovers.iter().map(|n| plant(&dir.path().join(n), "stale")).collect();
        write(&key, b"-----BEGIN PRIVATE KEY-----\n", 0o600).unwrap();
        assert_eq!(mode_of(&key), 0o600);
        assert_eq!(fs::read(&key).unwrap(), b"-----BEGIN PRIVATE KEY-----\n");
        let key_inode = fs::metadata(&key).unwrap().ino();
        for (name, inode) in leftovers.iter().zip(&inodes) {
            let leftover = dir.path().join(name);
            assert_eq!(fs::read_to_string(&leftover).unwrap(), "stale", "{name} was written to");
            assert_eq!(mode_of(&leftover), 0o644, "{name}'s mode changed");
            assert_ne!(key_inode, *inode, "{name} became the key");
        }
        let mut expected: Vec<String> = leftovers.to_vec();
        expected.push("node.key".to_owned());
        expected.sort();
        assert_eq!(names_in(dir.path()), expected, "nothing else is left behind");
    }

    #[test]
    fn a_world_readable_target_is_replaced_by_a_0600_file_and_the_mode_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ca.key");
        let old_inode = plant(&key, "old key");
        write(&key, b"new key", 0o600).unwrap();
        assert_eq!(mode_of(&key), 0o600);
        assert_eq!(fs::read_to_string(&key).unwrap(), "new key");
        assert_ne!(fs::metadata(&key).unwrap().ino(), old_inode, "a new inode, not the old one rewritten");
        // Exactly the mode asked for, whatever the umask allows: wider…
        let cert = dir.path().join("ca.crt");
        write(&cert, b"cert", 0o644).unwrap();
        assert_eq!(mode_of(&cert), 0o644);
        // …and narrower, and non-permission bits dropped.
        write(&cert, b"cert", 0o100_400).unwrap();
        assert_eq!(mode_of(&cert), 0o400);
        assert_eq!(names_in(dir.path()), ["ca.crt", "ca.key"]);
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, "theirs").unwrap();
        let key = dir.path().join("node.key");
        std::os::unix::fs::symlink(&elsewhere, &key).unwrap();
        write(&key, b"ours", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&elsewhere).unwrap(), "theirs");
        assert!(fs::symlink_metadata(&key).unwrap().is_file());
        assert_eq!(mode_of(&key), 0o600);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        // The rename fails: the target is a non-empty directory.
        let target = dir.path().join("busy");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), "x").unwrap();
        let err = write(&target, b"new", 0o644).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&target.display().to_string()) && text.contains("renaming"), "{text}");
        assert!(err.io_error().is_some());
        assert_eq!(names_in(dir.path()), ["busy"], "the temporary file is gone");
        assert_eq!(fs::read_to_string(target.join("inside")).unwrap(), "x");
        // The temporary file cannot be created: its directory is missing.
        let missing = dir.path().join("missing/file");
        let err = write(&missing, b"new", 0o644).unwrap_err();
        assert!(err.to_string().contains("creating a temporary file"), "{err}");
        assert_eq!(err.path(), missing);
        // No file name at all.
        assert!(matches!(write(Path::new("/"), b"", 0o644), Err(AtomicFileError::NoFileName { .. })));
        assert!(matches!(write(&dir.path().join(".."), b"", 0o644), Err(AtomicFileError::NoFileName { .. })));
    }

    #[test]
    fn content_is_replaced_whole_and_readers_never_see_a_mix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        let old = vec![b'a'; 256 * 1024];
        let new = vec![b'b'; 64 * 1024];
        write(&path, &old, 0o644).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(Ordering::Relaxed) {
                    let seen = fs::read(&path).unwrap();
                    assert!(
                        seen.len() == 256 * 1024 && seen.iter().all(|&b| b == b'a')
                            || seen.len() == 64 * 1024 && seen.iter().all(|&b| b == b'b'),
                        "a reader saw {} bytes of a mix",
                        seen.len()
                    );
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..50 {
            write(&path, if i % 2 == 0 { &new } else { &old }, 0o644).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        write(&path, &new, 0o644).unwrap();
        assert_eq!(fs::read(&path).unwrap(), new);
        assert_eq!(names_in(dir.path()), ["subnet.env"]);
    }

    #[test]
    fn a_temporary_name_someone_took_is_skipped_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let taken = dir.path().join(".node.key.1.0.0000000000000000.tmp");
        let inode = plant(&taken, "planted");
        let mut names = [".node.key.1.0.0000000000000000.tmp", ".node.key.1.1.0000000000000001.tmp"].into_iter();
        let (file, temp) = create_temp(dir.path(), 0o600, || names.next().unwrap_or("unused").into()).unwrap();
        assert_eq!(temp, dir.path().join(".node.key.1.1.0000000000000001.tmp"));
        assert_ne!(file.metadata().unwrap().ino(), inode);
        assert_eq!(fs::read_to_string(&taken).unwrap(), "planted");
        assert_eq!(mode_of(&taken), 0o644);
        // Every name taken: an error, nothing opened.
        let err = create_temp(dir.path(), 0o600, || ".node.key.1.0.0000000000000000.tmp".into()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        // A symlink planted at the name is not followed either.
        let target = dir.path().join("target");
        std::os::unix::fs::symlink(&target, dir.path().join("link")).unwrap();
        let err = create_temp(dir.path(), 0o600, || "link".into()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(!target.exists());
    }

    #[test]
    fn temporary_names_are_never_shared_and_long_names_fit() {
        let a = temp_name(b"node.key");
        let b = temp_name(b"node.key");
        assert_ne!(a, b);
        assert!(a.to_string_lossy().starts_with(&format!(".node.key.{}.", std::process::id())));
        let dir = tempfile::tempdir().unwrap();
        let long = dir.path().join("k".repeat(255));
        write(&long, b"x", 0o600).unwrap();
        assert_eq!(mode_of(&long), 0o600);
    }

    #[test]
    fn write_unless_same_leaves_an_identical_file_alone_and_replaces_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10-netd.conflist");
        assert!(write_unless_same(&path, b"conf", 0o644).unwrap(), "a missing file is written");
        let before = fs::metadata(&path).unwrap();
        assert!(!write_unless_same(&path, b"conf", 0o644).unwrap(), "an identical file is not");
        let after = fs::metadata(&path).unwrap();
        assert_eq!(
            (after.ino(), after.mtime(), after.mtime_nsec()),
            (before.ino(), before.mtime(), before.mtime_nsec())
        );
        // Other contents, other length, other mode: replaced.
        assert!(write_unless_same(&path, b"cong", 0o644).unwrap());
        assert!(write_unless_same(&path, b"longer", 0o644).unwrap());
        assert!(write_unless_same(&path, b"longer", 0o600).unwrap());
        assert_eq!(mode_of(&path), 0o600);
        // A symlink to an identical file is replaced by a file, not trusted.
        let real = dir.path().join("real");
        fs::write(&real, "same").unwrap();
        fs::set_permissions(&real, Permissions::from_mode(0o644)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(write_unless_same(&link, b"same", 0o644).unwrap());
        assert!(fs::symlink_metadata(&link).unwrap().is_file());
        // A FIFO at the target does not block the comparison; it is replaced.
        let fifo = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        assert!(write_unless_same(&fifo, b"x", 0o644).unwrap());
        assert!(fs::symlink_metadata(&fifo).unwrap().is_file());
    }

    #[test]
    fn create_dirs_makes_missing_directories_with_the_mode_and_leaves_existing_ones() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), Permissions::from_mode(0o755)).unwrap();
        let nested = dir.path().join("a/b");
        write_creating_dirs(&nested.join("key"), b"k", 0o600, 0o700).unwrap();
        assert_eq!(mode_of(&dir.path().join("a")), 0o700);
        assert_eq!(mode_of(&nested), 0o700);
        assert_eq!(mode_of(dir.path()), 0o755, "an existing directory keeps its mode");
        assert_eq!(mode_of(&nested.join("key")), 0o600);
        create_dirs(&nested, 0o755).unwrap();
        assert_eq!(mode_of(&nested), 0o700);
        fs::write(dir.path().join("file"), "").unwrap();
        let err = create_dirs(&dir.path().join("file/sub"), 0o700).unwrap_err();
        assert!(err.to_string().starts_with("cannot create directory"), "{err}");
    }
}
