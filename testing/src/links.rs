//! veth pairs and bridges, in the root namespace or in harness namespaces.

use super::{next_serial, run_command, HarnessError, NetNs};

/// A unique root-namespace interface name, `nt<pid>x<n>` (at most 15 bytes,
/// the kernel's IFNAMSIZ limit). Names inside harness namespaces need no
/// uniqueness: the namespace is private to the test.
pub fn unique_ifname() -> String {
    format!("nt{}x{}", std::process::id(), next_serial() % 100_000)
}

/// One end of a link: the namespace it lives in (`None` = root) and its name.
pub type LinkEnd<'a> = (Option<&'a NetNs>, &'a str);

fn ip_in(ns: Option<&str>, args: &[&str]) -> Result<(), HarnessError> {
    let mut full = Vec::with_capacity(args.len() + 2);
    if let Some(ns) = ns {
        full.extend_from_slice(&["-n", ns]);
    }
    full.extend_from_slice(args);
    run_command("ip", &full).map(|_| ())
}

/// Deletes a link unless it (or its namespace) is already gone; deleting
/// either end of a veth pair removes both.
fn delete_link(ns: Option<&str>, name: &str) {
    let exists = match ns {
        Some(ns) => super::netns_path(ns).exists() && ip_in(Some(ns), &["link", "show", "dev", name]).is_ok(),
        None => std::path::Path::new("/sys/class/net").join(name).exists(),
    };
    if exists {
        if let Err(err) = ip_in(ns, &["link", "del", "dev", name]) {
            eprintln!("netd test harness: could not delete link {name}: {err}");
        }
    }
}

/// A veth pair whose ends may sit in different namespaces, both brought up.
/// Deleted on drop (if its namespaces have not taken it with them already).
#[derive(Debug)]
pub struct VethPair {
    ns: Option<String>,
    name: String,
    peer_ns: Option<String>,
    peer_name: String,
}

impl VethPair {
    /// `ip [-n A] link add <a> type veth peer name <b> [netns B]`, then both up.
    pub fn new(a: LinkEnd<'_>, b: LinkEnd<'_>) -> Result<Self, HarnessError> {
        let (a_ns, a_name) = a;
        let (b_ns, b_name) = b;
        let a_ns_name = a_ns.map(|ns| ns.name().to_string());
        let b_ns_name = b_ns.map(|ns| ns.name().to_string());
        let mut add = vec!["link", "add", a_name, "type", "veth", "peer", "name", b_name];
        if let Some(ns) = b_ns {
            add.extend_from_slice(&["netns", ns.name()]);
        }
        ip_in(a_ns_name.as_deref(), &add)?;
        let pair = Self { ns: a_ns_name, name: a_name.to_string(), peer_ns: b_ns_name, peer_name: b_name.to_string() };
        ip_in(pair.ns.as_deref(), &["link", "set", a_name, "up"])?;
        ip_in(pair.peer_ns.as_deref(), &["link", "set", b_name, "up"])?;
        Ok(pair)
    }

    /// Name of the first end.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Name of the second end.
    pub fn peer_name(&self) -> &str {
        &self.peer_name
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        delete_link(self.ns.as_deref(), &self.name);
        delete_link(self.peer_ns.as_deref(), &self.peer_name);
    }
}

/// A Linux bridge, up. Deleted on drop.
#[derive(Debug)]
pub struct Bridge {
    ns: Option<String>,
    name: String,
}

impl Bridge {
    /// `ip [-n NS] link add <name> type bridge && ip link set <name> up`.
    pub fn new(ns: Option<&NetNs>, name: &str) -> Result<Self, HarnessError> {
        let ns_name = ns.map(|ns| ns.name().to_string());
        ip_in(ns_name.as_deref(), &["link", "add", name, "type", "bridge"])?;
        let bridge = Self { ns: ns_name, name: name.to_string() };
        ip_in(bridge.ns.as_deref(), &["link", "set", name, "up"])?;
        Ok(bridge)
    }

    /// The bridge's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Enslaves `port` (in the bridge's namespace) to this bridge.
    pub fn attach(&self, port: &str) -> Result<(), HarnessError> {
        ip_in(self.ns.as_deref(), &["link", "set", port, "master", &self.name])
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        delete_link(self.ns.as_deref(), &self.name);
    }
}
