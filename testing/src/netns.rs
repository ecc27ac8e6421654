//! Named network namespaces and running code inside them.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Output;

use super::{netns_path, run_command, unique_name, HarnessError};

/// A named network namespace (`ip netns add netd-t-<pid>-<n>`) with `lo` up.
/// Deleted on drop, which also destroys every interface inside it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a fresh namespace with a unique name and brings `lo` up.
    pub fn new() -> Result<Self, HarnessError> {
        let name = unique_name();
        run_command("ip", &["netns", "add", &name])?;
        // From here on, drop cleans up even if bringing lo up fails.
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace name, as `ip netns` and `ip -n` take it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file (`/run/netns/<name>`).
    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// `ip -n <name> <args…>`; returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, HarnessError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        let out = run_command("ip", &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip netns exec <name> <program> <args…>`; a non-zero exit is an error.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, HarnessError> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run_command("ip", &full)
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns
    /// its result. The calling thread's namespace is never changed. A panic in
    /// `f` is resumed on the caller, so test assertions inside work as usual.
    pub fn run<F, T>(&self, f: F) -> Result<T, HarnessError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        run_in(&self.path(), f)
    }

    /// Moves the *calling* thread into this namespace until the guard drops
    /// (then it returns to the namespace it was in). For code that cannot be
    /// moved to another thread, such as a benchmark harness; prefer
    /// [`NetNs::run`]. Never hold the guard across an `.await`.
    pub fn enter(&self) -> Result<NetNsGuard<'_>, HarnessError> {
        enter_path(&self.path())
    }

    /// Runs the future made by `make` to completion inside this namespace, on
    /// a current-thread tokio runtime owned by the namespace's thread: every
    /// `.await` stays on that thread, so every socket and netlink request it
    /// opens belongs to this namespace.
    pub fn block_on<F, Fut>(&self, make: F) -> Result<Fut::Output, HarnessError>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future,
        Fut::Output: Send,
    {
        self.run(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| HarnessError::io("building a current-thread tokio runtime", e))?;
            Ok(runtime.block_on(make()))
        })?
    }
}

/// The calling thread is inside a [`NetNs`] until this drops. Not `Send`:
/// the namespace belongs to the thread that entered it.
#[derive(Debug)]
pub struct NetNsGuard<'ns> {
    home: File,
    _ns: std::marker::PhantomData<(&'ns NetNs, *const ())>,
}

/// Runs `f` on a new thread inside the namespace bound at `path` (see
/// [`NetNs::run`]).
pub(crate) fn run_in<F, T>(path: &Path, f: F) -> Result<T, HarnessError>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let ns_file = File::open(path).map_err(|e| HarnessError::io(format!("opening {}", path.display()), e))?;
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            // SAFETY: setns on a valid namespace fd; it only affects this
            // thread, which ends when the scope does.
            let rc = unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(HarnessError::io("setns(CLONE_NEWNET)", io::Error::last_os_error()));
            }
            Ok(f())
        });
        match worker.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Moves the calling thread into the namespace bound at `path` until the
/// guard drops (see [`NetNs::enter`]).
pub(crate) fn enter_path<'ns>(path: &Path) -> Result<NetNsGuard<'ns>, HarnessError> {
    let home =
        File::open("/proc/thread-self/ns/net").map_err(|e| HarnessError::io("opening /proc/thread-self/ns/net", e))?;
    let target = File::open(path).map_err(|e| HarnessError::io(format!("opening {}", path.display()), e))?;
    // SAFETY: setns on a valid namespace fd; it changes only this thread's
    // network namespace, which the guard restores.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(HarnessError::io("setns(CLONE_NEWNET)", io::Error::last_os_error()));
    }
    Ok(NetNsGuard { home, _ns: std::marker::PhantomData })
}

impl Drop for NetNsGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: setns back to the namespace this thread came from, through
        // the fd opened before leaving it.
        if unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            // Carrying on would run the rest of the test (namespace and link
            // set-up included) in the wrong namespace.
            eprintln!(
                "netd test harness: cannot return to the original network namespace: {}; aborting",
                io::Error::last_os_error()
            );
            std::process::abort();
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(err) = run_command("ip", &["netns", "del", &self.name]) {
            eprintln!("netd test harness: could not delete namespace {}: {err}", self.name);
        }
    }
}
