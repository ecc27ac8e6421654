//! Where the harness's servers (etcd, kube-apiserver) live: the host's
//! loopback, or an address inside a harness namespace, which is how daemons
//! in node namespaces reach them over the underlay (as edge nodes reach a
//! cloud control plane) and how a test cuts one node off from them.

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Output};

use super::netns::{enter_path, run_in};
use super::{run_command, HarnessError, NetNs};

/// The network namespace and address a harness server listens on.
#[derive(Debug, Clone)]
pub struct ServerHost {
    netns: Option<PathBuf>,
    ip: Ipv4Addr,
}

impl ServerHost {
    /// 127.0.0.1 in the test process's own namespace.
    pub fn loopback() -> Self {
        Self { netns: None, ip: Ipv4Addr::LOCALHOST }
    }

    /// `ip` (which must be on an interface inside `ns`) in namespace `ns`.
    /// The namespace must outlive the servers started there.
    pub fn in_netns(ns: &NetNs, ip: Ipv4Addr) -> Self {
        Self { netns: Some(ns.path()), ip }
    }

    /// The address servers listen on.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Runs `f` where the servers live: directly, or on a thread inside the
    /// namespace.
    pub fn run<F, T>(&self, f: F) -> Result<T, HarnessError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        match &self.netns {
            None => Ok(f()),
            Some(path) => run_in(path, f),
        }
    }

    /// Runs `program args…` where the servers live; a non-zero exit is an
    /// error carrying stderr.
    pub fn command(&self, program: &str, args: &[&str]) -> Result<Output, HarnessError> {
        self.run(|| run_command(program, args))?
    }

    /// Spawns `command` inside the namespace *from the calling thread*, so
    /// that a parent-death signal set in `pre_exec` is tied to that thread
    /// and not to a short-lived helper thread.
    pub(crate) fn spawn(&self, command: &mut Command, what: &str) -> Result<Child, HarnessError> {
        let spawn = |command: &mut Command| {
            command.spawn().map_err(|source| HarnessError::Spawn { command: what.to_string(), source })
        };
        match &self.netns {
            None => spawn(command),
            Some(path) => {
                // fork(2) copies the calling thread's namespace; the guard
                // puts this thread back right after.
                let _inside = enter_path(path)?;
                spawn(command)
            }
        }
    }

    /// `N` distinct free TCP ports on the address, held together while chosen.
    pub(crate) fn free_ports<const N: usize>(&self) -> Result<[u16; N], HarnessError> {
        let ip = self.ip;
        self.run(move || {
            let mut listeners = Vec::with_capacity(N);
            let mut ports = [0u16; N];
            for port in &mut ports {
                let listener =
                    TcpListener::bind((ip, 0)).map_err(|e| HarnessError::io(format!("binding {ip}:0"), e))?;
                *port = listener.local_addr().map_err(|e| HarnessError::io("local_addr", e))?.port();
                listeners.push(listener);
            }
            Ok(ports)
        })?
    }
}
