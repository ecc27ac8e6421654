//! Harness for privileged tests: network namespaces, veth pairs, bridges and
//! cgroup v2 directories as RAII guards that clean up on drop, also while a
//! panic unwinds.
//!
//! Rules it enforces:
//! - every object it makes has a unique name (`netd-t-<pid>-<n>` for
//!   namespaces and cgroups, `nt<pid>x<n>` for root-namespace links, which the
//!   kernel limits to 15 bytes), and leftovers of killed test processes are
//!   swept by the next [`privileged`] call;
//! - `setns(2)` is per thread, so code runs inside a namespace on a dedicated
//!   thread ([`NetNs::run`]), async code on that thread's own current-thread
//!   runtime ([`NetNs::block_on`]); a namespace is never held across an
//!   `.await` of a multi-thread runtime;
//! - kernel-touching tests are serialised across threads and processes by the
//!   lock [`privileged`] returns.
//!
//! ```no_run
//! use netd_testing as testing;
//! use testing::{NetNs, VethPair};
//!
//! # fn main() -> Result<(), testing::HarnessError> {
//! let Some(_kernel) = testing::privileged()? else { return Ok(()) };
//! let a = NetNs::new()?;
//! let b = NetNs::new()?;
//! let _link = VethPair::new((Some(&a), "eth0"), (Some(&b), "eth0"))?;
//! a.ip(&["addr", "add", "10.99.0.1/24", "dev", "eth0"])?;
//! a.ip(&["link", "set", "eth0", "up"])?;
//! # Ok(())
//! # }
//! ```

mod bpf;
mod cgroup;
mod cluster;
mod cni;
mod etcd;
mod kube;
mod kube_cluster;
mod links;
mod netns;
mod process;
mod real_cluster;
mod real_workload;
mod scenario;
mod server;
mod synthetic;

pub use bpf::PinDir;
pub use cgroup::{Cgroup, CgroupMembership};
pub use cluster::{Cluster, Node, Pod, CLUSTER_NETWORK, CONTROL_PLANE_IP};
pub use cni::{plugin_dir_of, CniCall, CniRunner, DEBIAN_CNI_DIR};
pub use etcd::EtcdServer;
pub use kube::{ApiAuth, KubeApiServer, KUBE_APISERVER_BIN, KUBE_APISERVER_ENV, KUBE_APISERVER_VERSION};
pub use kube_cluster::{
    BootstrapToken, ControllerManagerOptions, KubeCluster, KubeClusterBuilder, KubeControllerManager,
    KUBE_CONTROLLER_MANAGER_BIN, KUBE_CONTROLLER_MANAGER_ENV,
};
pub use links::{unique_ifname, Bridge, VethPair};
pub use netns::{NetNs, NetNsGuard};
pub use process::{http_get, metric, netd_run_args, NetdProcess, HEALTH_ADDR};
pub use real_cluster::{
    netd_cloud_image_path, netd_image_path, RealCluster, RealClusterBuilder, RealNode, Role, CLOUD_NODE_IP,
    CLOUD_ROLE_LABEL, IMAGE_DIR, KUBELET_BIN, KUBELET_ENV, KUBE_SCHEDULER_BIN, KUBE_SCHEDULER_ENV, NETD_IMAGE_ENV,
    PAUSE_IMAGE, WORKLOAD_IMAGE,
};
pub use real_workload::{edge_statefulset, read_line_until, PodStatus, DEPLOY_DIR, WORKLOAD_METRICS_PORT};
pub use scenario::{
    scenario_network, ChapterError, ChapterStage, EmbeddedScenarioRegistry, EtcdScenarioRegistry, KubeScenarioRegistry,
    Scenario, ScenarioRegistry, ScenarioReport,
};
pub use server::ServerHost;
pub use synthetic::{synthetic_config, synthetic_node, synthetic_peer, SYNTHETIC_OWN_IP};

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace and cgroup the harness creates.
pub const NAME_PREFIX: &str = "netd-t-";

/// Set (to anything) to make privileged tests fail instead of skip when not
/// root. `cargo xtask test` sets it so CI never silently skips them.
pub const REQUIRE_ENV: &str = "NETD_REQUIRE_PRIVILEGED";

const LOCK_PATH: &str = "/run/lock/netd-privileged-tests.lock";

/// Errors of the test harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Privileged tests were required but the process is not root.
    #[error("privileged tests need root (euid 0); run them with `sudo -E cargo xtask test`")]
    NotRoot,
    /// A command could not be started.
    #[error("could not run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A file-system or syscall operation failed.
    #[error("{what} failed")]
    Io {
        /// What was attempted, with the path.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A harness object was used in a way its setup does not allow.
    #[error("test harness misuse: {0}")]
    Usage(String),
    /// A step of a [`Scenario`] did not turn out as the story says.
    #[error("scenario failed: {0}")]
    Scenario(String),
    /// A chapter added with [`Scenario::with_chapter`] failed.
    #[error("a chapter of the scenario failed")]
    Chapter(#[source] ChapterError),
    /// A test certificate or key could not be minted or written.
    #[error("test certificate")]
    Cert(#[from] netd_tunnel::certs::CertError),
    /// No cgroup v2 hierarchy is mounted.
    #[error("no cgroup v2 mount found in /proc/self/mounts")]
    NoCgroup2,
}

impl HarnessError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io { what: what.into(), source }
    }
}

/// Holds the privileged-test lock; kernel-touching tests run one at a time.
#[derive(Debug)]
pub struct PrivilegedGuard {
    // Closing the file releases the flock.
    _lock: File,
}

/// Whether a privileged test that cannot run must fail rather than skip:
/// [`REQUIRE_ENV`] is set, or this crate's `require-privileged` feature is
/// on (netd's `privileged-tests`, which `cargo xtask test` enables).
pub fn privileged_required() -> bool {
    cfg!(feature = "require-privileged") || std::env::var_os(REQUIRE_ENV).is_some()
}

/// Entry point of every privileged test.
///
/// Returns `Ok(None)` (after saying so on stderr) when not root and
/// [`REQUIRE_ENV`] is unset, so a plain `cargo test` as a user still runs the
/// rest; returns [`HarnessError::NotRoot`] when it is set. As root it takes
/// the cross-process lock and sweeps what killed test processes left behind.
pub fn privileged() -> Result<Option<PrivilegedGuard>, HarnessError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        if privileged_required() {
            return Err(HarnessError::NotRoot);
        }
        eprintln!("skipping privileged test: not root (set {REQUIRE_ENV}=1 to make this an error)");
        return Ok(None);
    }
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_PATH)
        .map_err(|e| HarnessError::io(format!("opening {LOCK_PATH}"), e))?;
    // SAFETY: flock on an fd we own; it blocks until the lock is ours.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(HarnessError::io(format!("flock {LOCK_PATH}"), io::Error::last_os_error()));
    }
    sweep_leftovers();
    Ok(Some(PrivilegedGuard { _lock: lock }))
}

/// A unique `netd-t-<pid>-<n>` name.
pub(crate) fn unique_name() -> String {
    format!("{NAME_PREFIX}{}-{}", std::process::id(), next_serial())
}

pub(crate) fn next_serial() -> u32 {
    static SERIAL: AtomicU32 = AtomicU32::new(0);
    SERIAL.fetch_add(1, Ordering::Relaxed)
}

/// Runs a command and returns its output; a non-zero exit is an error
/// carrying stderr.
pub fn run_command(program: &str, args: &[&str]) -> Result<Output, HarnessError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| HarnessError::Spawn { command: command.clone(), source })?;
    if !output.status.success() {
        return Err(HarnessError::Command {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output)
}

/// Pid embedded in a harness name (`netd-t-<pid>-<n>` or `nt<pid>x<n>`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix(NAME_PREFIX)
        .map(|r| r.split('-').next())
        .or_else(|| name.strip_prefix("nt").map(|r| r.split('x').next()))??;
    rest.parse().ok()
}

fn owner_is_dead(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !process_is_running(pid))
}

/// Whether `pid` names a process that has not exited. A zombie (exited,
/// not yet reaped by its parent, e.g. a test binary cargo has not waited
/// for yet) still has its `/proc` entry but runs nothing: its leftovers are
/// to be swept, or the sweep skips its nodes' processes and then fails to
/// remove their busy cgroups.
fn process_is_running(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": comm may hold spaces and parentheses, so the
    // state is the first field after the last ')'.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// Removes namespaces, root-namespace links and cgroups whose creating test
/// process is gone (it was killed before its guards could drop).
fn sweep_leftovers() {
    // First: a dead test's real nodes hold network namespaces (pods') and
    // mounts that the sweeps below would otherwise race with.
    real_cluster::sweep_leftovers(owner_is_dead);
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for name in entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()) {
            if name.starts_with(NAME_PREFIX) && owner_is_dead(&name) {
                let _ = run_command("ip", &["netns", "del", &name]);
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/sys/class/net") {
        for name in entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()) {
            if name.starts_with("nt") && owner_is_dead(&name) {
                let _ = run_command("ip", &["link", "del", &name]);
            }
        }
    }
    if let Ok(root) = cgroup::cgroup2_root() {
        if let Ok(entries) = fs::read_dir(&root) {
            for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if name.starts_with(NAME_PREFIX) && owner_is_dead(&name) {
                    cgroup::remove_cgroup_tree(&root, &path);
                }
            }
        }
    }
    if let Ok(entries) = fs::read_dir(bpf::BPFFS_TEST_ROOT) {
        for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if name.starts_with(NAME_PREFIX) && owner_is_dead(&name) {
                bpf::remove_pins(&path);
            }
        }
    }
}

/// What the harness made for this process and has not removed yet:
/// network namespaces, root-namespace links, cgroups and bpffs pin
/// directories, by name. Empty once every guard has dropped; a demo or
/// test checks it after its run.
pub fn leftovers() -> Vec<String> {
    let ours = |name: &str| owner_pid(name) == Some(std::process::id());
    let names = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .map(|entries| {
                entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
            })
            .unwrap_or_default()
    };
    let mut left = Vec::new();
    let kinds = [
        ("network namespace", Some(PathBuf::from("/run/netns")), NAME_PREFIX),
        ("link", Some(PathBuf::from("/sys/class/net")), "nt"),
        ("cgroup", cgroup::cgroup2_root().ok(), NAME_PREFIX),
        ("BPF pin directory", Some(PathBuf::from(bpf::BPFFS_TEST_ROOT)), NAME_PREFIX),
    ];
    for (kind, dir, prefix) in kinds {
        let Some(dir) = dir else { continue };
        for name in names(&dir) {
            if name.starts_with(prefix) && ours(&name) {
                left.push(format!("{kind} {}", dir.join(&name).display()));
            }
        }
    }
    left
}

/// Path of a named network namespace as `ip netns` creates it.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_both_name_forms() {
        assert_eq!(owner_pid("netd-t-1234-7"), Some(1234));
        assert_eq!(owner_pid("nt99x3"), Some(99));
        assert_eq!(owner_pid("eth0"), None);
        assert_eq!(owner_pid("netd-t-abc-1"), None);
    }

    #[test]
    fn a_zombie_owner_is_dead_and_a_running_one_is_not() {
        assert!(process_is_running(std::process::id()));
        let child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        // Not waited for: once `true` exits it stays a zombie until reaped.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while process_is_running(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!process_is_running(pid), "exited, unreaped child {pid} still counts as running");
        assert!(Path::new(&format!("/proc/{pid}")).exists(), "the zombie's /proc entry is there");
        drop(child);
    }

    #[test]
    fn leftovers_names_what_is_alive_and_forgets_what_dropped() {
        let Some(_kernel) = privileged().expect("privileged") else { return };
        let ns = NetNs::new().expect("a namespace");
        let cgroup = Cgroup::new().expect("a cgroup");
        let ns_entry = format!("network namespace /run/netns/{}", ns.name());
        let cgroup_name = cgroup.path().file_name().map(|n| n.to_string_lossy().into_owned()).expect("a name");
        let left = leftovers();
        assert!(left.contains(&ns_entry), "{ns_entry} missing from {left:?}");
        assert!(left.iter().any(|l| l.starts_with("cgroup ") && l.ends_with(&cgroup_name)), "{cgroup_name}: {left:?}");
        drop((ns, cgroup));
        let left = leftovers();
        assert!(!left.contains(&ns_entry), "{ns_entry} still listed after its drop: {left:?}");
        assert!(!left.iter().any(|l| l.ends_with(&cgroup_name)), "{cgroup_name} still listed: {left:?}");
    }

    #[test]
    fn unique_names_differ_and_fit() {
        let a = unique_name();
        let b = unique_name();
        assert_ne!(a, b);
        assert!(a.starts_with(NAME_PREFIX));
        let ifname = unique_ifname();
        assert!(ifname.len() <= 15, "{ifname} exceeds IFNAMSIZ");
    }
}
