//! Running real CNI plugins (Debian's `bridge`, `host-local`, our
//! `netd-ipam`) the way a container runtime does, inside a test "node"
//! namespace.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::{HarnessError, NetNs};

/// Where Debian's containernetworking-plugins installs the plugins.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// One runtime-style call of a CNI plugin.
#[derive(Debug, Clone)]
pub struct CniCall<'a> {
    /// `ADD`, `DEL`, `CHECK`, ...
    pub command: &'a str,
    /// `CNI_CONTAINERID`.
    pub container_id: &'a str,
    /// The pod's namespace (`CNI_NETNS`).
    pub pod_netns: &'a NetNs,
    /// `CNI_IFNAME`.
    pub ifname: &'a str,
    /// Pod identity for `CNI_ARGS`, `namespace/name`.
    pub pod: Option<&'a str>,
}

/// Runs plugins from `search_path` (`CNI_PATH`) inside a node namespace.
///
/// The plugin is forked from a thread that has entered the node namespace,
/// as a runtime on that node would start it: no `ip netns exec` wrapper (its
/// mount-namespace set-up would add milliseconds to every measured call).
#[derive(Debug)]
pub struct CniRunner<'a> {
    node: &'a NetNs,
    search_path: Vec<PathBuf>,
}

impl<'a> CniRunner<'a> {
    /// A runner whose plugins run in `node` and are found in `search_path`.
    pub fn new(node: &'a NetNs, search_path: Vec<PathBuf>) -> Self {
        Self { node, search_path }
    }

    /// Runs `plugin` (a file name in the search path) with `config` on stdin.
    /// Returns the output whatever the exit status: CNI errors are JSON on
    /// stdout and the caller decides whether failure is expected.
    pub fn call(&self, plugin: &str, call: &CniCall<'_>, config: &str) -> Result<Output, HarnessError> {
        let binary = self.search_path.iter().map(|dir| dir.join(plugin)).find(|p| p.exists()).ok_or_else(|| {
            HarnessError::io(format!("finding CNI plugin {plugin}"), std::io::ErrorKind::NotFound.into())
        })?;
        let cni_path = std::env::join_paths(&self.search_path)
            .map_err(|e| HarnessError::io("joining CNI_PATH", std::io::Error::other(e)))?;
        let mut cmd = Command::new(&binary);
        cmd.env("CNI_COMMAND", call.command)
            .env("CNI_CONTAINERID", call.container_id)
            .env("CNI_NETNS", call.pod_netns.path())
            .env("CNI_IFNAME", call.ifname)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((namespace, name)) = call.pod.and_then(|p| p.split_once('/')) {
            cmd.env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"));
        }
        let command = format!("{} {} ({})", binary.display(), call.command, call.container_id);
        // fork() copies the calling thread's network namespace.
        let mut child = self
            .node
            .run(|| cmd.spawn())?
            .map_err(|source| HarnessError::Spawn { command: command.clone(), source })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(config.as_bytes())
                .map_err(|e| HarnessError::io(format!("writing stdin of {command}"), e))?;
        }
        child.wait_with_output().map_err(|source| HarnessError::Spawn { command, source })
    }

    /// Like [`CniRunner::call`] but a non-zero exit is an error carrying stdout (the CNI error).
    pub fn call_ok(&self, plugin: &str, call: &CniCall<'_>, config: &str) -> Result<Output, HarnessError> {
        let out = self.call(plugin, call, config)?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                command: format!("{plugin} {} {}", call.command, call.container_id),
                status: out.status,
                stderr: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            });
        }
        Ok(out)
    }
}

/// The directory holding this workspace's `netd-ipam` binary, given the path
/// Cargo passes integration tests as `CARGO_BIN_EXE_netd-ipam`.
pub fn plugin_dir_of(binary: &str) -> PathBuf {
    Path::new(binary).parent().map(Path::to_path_buf).unwrap_or_default()
}
