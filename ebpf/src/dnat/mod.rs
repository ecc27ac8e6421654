//! Tunnel DNAT: TCP connections to an edge node's redirected ports are sent
//! to the tunnel server at `connect()`, and the tunnel server learns what
//! was dialled. No iptables chain, no conntrack entry, no resync timer.
//!
//! Six programs, one object each (`bpf/dnat_*.bpf.c`), share their maps
//! through bpffs:
//!
//! | program | hook | what it does |
//! |---|---|---|
//! | `dnat_connect4` / `dnat_connect6` | `cgroup/connect4`, `cgroup/connect6` (v4-mapped) | port lookup, then edge-node lookup; on a hit rewrites the destination and keeps the dialled one under the socket's cookie |
//! | `dnat_getpeername4` / `6` | `cgroup/getpeername4`, `6` | the client sees the address it dialled |
//! | `dnat_sockops` | `sockops` | hands the dialled address from the client socket to the server's accepted socket, by 4-tuple; drops each record when its socket closes |
//! | `dnat_getsockopt` | `cgroup/getsockopt` | answers `SO_ORIGINAL_DST`; attached only to the tunnel server's cgroup |
//!
//! Links and maps are pinned under one directory ([`DEFAULT_PIN_DIR`]), so
//! redirection survives the process that set it up; [`TunnelDnat::load_or_attach`]
//! run again swaps new program code into the live links with
//! `BPF_LINK_UPDATE`, which never leaves a moment without a program.
//!
//! ```no_run
//! # fn main() -> Result<(), netd_ebpf::dnat::DnatError> {
//! use netd_ebpf::dnat::{AttachOptions, Scope, TunnelDnat};
//! use std::net::Ipv4Addr;
//!
//! let (mut dnat, _report) = TunnelDnat::load_or_attach(&AttachOptions::default())?;
//! dnat.set_target(Ipv4Addr::new(192, 168, 0, 10), Scope::HostNetwork)?;
//! dnat.set_port_rules([(10250, 10263), (10255, 10264)])?;
//! dnat.set_edge_nodes([Ipv4Addr::new(10, 0, 5, 7)])?;
//! # Ok(())
//! # }
//! ```

pub mod abi;

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues};
use aya::programs::{CgroupSockAddr, CgroupSockopt, ProgramError, SockOps};
use aya::{EbpfError, EbpfLoader};
use ipnet::Ipv4Net;

use crate::fs::{cgroup2_root, ensure_bpffs};
use crate::objects;
use crate::sys::{self, AttachType};

/// Where links and maps are pinned unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/netd";
/// Most edge nodes one map holds (`dnat_edges_v1`'s `max_entries`).
pub const MAX_EDGE_NODES: usize = 65_536;
/// Most edge subnets one map holds (`dnat_edge_nets_v1`'s `max_entries`).
pub const MAX_EDGE_SUBNETS: usize = 65_536;
/// Most port rules (`dnat_ports_v1`'s `max_entries`).
pub const MAX_PORT_RULES: usize = 1_024;

const MAP_PORTS: &str = "dnat_ports_v1";
const MAP_TARGET_PORTS: &str = "dnat_target_ports_v1";
const MAP_EDGES: &str = "dnat_edges_v1";
const MAP_EDGE_NETS: &str = "dnat_edge_nets_v1";
const MAP_CONF: &str = "dnat_conf_v1";
const MAP_HITS: &str = "dnat_hits_v1";
const MAP_STAT: &str = "dnat_stat_v1";
const MAP_DIALLED: &str = "dnat_dialled_v1";
const MAP_CONNS: &str = "dnat_conns_v1";
/// Every map with the key and value sizes this build's programs use.
const MAPS: [(&str, usize, usize); 9] = [
    (MAP_PORTS, 2, std::mem::size_of::<abi::Rule>()),
    (MAP_TARGET_PORTS, 4, 8),
    (MAP_EDGES, 4, 1),
    (MAP_EDGE_NETS, abi::NET_KEY_SIZE, 1),
    (MAP_CONF, 4, std::mem::size_of::<abi::Config>()),
    (MAP_HITS, 2, 8),
    (MAP_STAT, 4, 8),
    (MAP_DIALLED, 8, std::mem::size_of::<abi::Orig>()),
    (MAP_CONNS, std::mem::size_of::<abi::Tuple>(), std::mem::size_of::<abi::Orig>()),
];
/// Maps of earlier layouts no program of this build uses (the socket-storage
/// hand-over): unpinned once the links run this build's programs.
const OBSOLETE_MAPS: [&str; 2] = ["dnat_orig_v1", "dnat_shake_v1"];
/// Words of the target-port bitmap (`DNAT_TARGET_PORT_WORDS`): one bit per port.
const TARGET_PORT_WORDS: u32 = 1024;
/// Links live in this subdirectory of the pin directory.
const LINK_DIR: &str = "links";

/// `BPF_NOEXIST` (linux/bpf.h): create only.
const BPF_NOEXIST: u64 = 1;

/// `SO_NETNS_COOKIE` (asm-generic/socket.h; Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Errors from the tunnel DNAT.
#[derive(Debug, thiserror::Error)]
pub enum DnatError {
    /// This thread may not load or attach BPF programs.
    #[error(
        "tunnel DNAT needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN); this thread lacks {}",
        missing.join(" and ")
    )]
    MissingCapability {
        /// The capabilities that are missing.
        missing: Vec<&'static str>,
    },
    /// A filesystem the programs need (cgroup v2, bpffs, the pin directory).
    #[error("{what}")]
    Filesystem {
        /// What was being done, with the path.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel refused an object.
    #[error("loading BPF object `{object}` failed")]
    Load {
        /// Object name, e.g. `dnat_connect4`.
        object: &'static str,
        /// What aya reported.
        #[source]
        source: Box<EbpfError>,
    },
    /// The verifier refused a program, or the object lacks it.
    #[error("BPF program `{program}`: {what}")]
    Program {
        /// Program name.
        program: &'static str,
        /// What failed.
        what: String,
        /// What aya reported, when it did.
        #[source]
        source: Option<ProgramError>,
    },
    /// Creating, updating, pinning or detaching a link failed.
    #[error("BPF link of `{program}` ({path}): {action} failed")]
    Link {
        /// Program name.
        program: &'static str,
        /// Its pin.
        path: PathBuf,
        /// What was attempted.
        action: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A map operation failed.
    #[error("BPF map `{map}`: {action} failed")]
    Map {
        /// Map name.
        map: &'static str,
        /// What was attempted.
        action: &'static str,
        /// What aya reported.
        #[source]
        source: Box<MapError>,
    },
    /// A pinned map has another layout than this build expects: pinned by
    /// a different netd whose layout kept the version suffix.
    #[error(
        "pinned BPF map {path} has key/value sizes {found_key}/{found_value}, this build needs \
         {key}/{value}; run `netd-cloud dnat detach` to remove the old maps"
    )]
    MapLayout {
        /// The pin.
        path: PathBuf,
        /// Expected key size.
        key: u32,
        /// Expected value size.
        value: u32,
        /// Pinned key size.
        found_key: u32,
        /// Pinned value size.
        found_value: u32,
    },
    /// Nothing is attached under this pin directory.
    #[error("no tunnel DNAT is pinned under {pin_dir} (run `netd-cloud dnat apply` first)")]
    NotAttached {
        /// The pin directory.
        pin_dir: PathBuf,
    },
    /// More edge nodes than the map holds.
    #[error("{count} edge nodes, but the tunnel DNAT holds at most {MAX_EDGE_NODES}; nothing was changed")]
    TooManyEdgeNodes {
        /// How many were given.
        count: usize,
    },
    /// More edge subnets than the map holds.
    #[error("{count} edge subnets, but the tunnel DNAT holds at most {MAX_EDGE_SUBNETS}; nothing was changed")]
    TooManyEdgeSubnets {
        /// How many were given.
        count: usize,
    },
    /// More port rules than the map holds.
    #[error("{count} port rules, but the tunnel DNAT holds at most {MAX_PORT_RULES}; nothing was changed")]
    TooManyPortRules {
        /// How many were given.
        count: usize,
    },
    /// A port rule with port 0.
    #[error("port rule {port}={target_port}: ports are 1-65535")]
    PortZero {
        /// Dialled port.
        port: u16,
        /// Tunnel port.
        target_port: u16,
    },
    /// A target pod sockets cannot reach.
    #[error(
        "target {target} is a loopback address: sockets in pod namespaces would dial their own \
         loopback; give a node address the pods can reach"
    )]
    LoopbackTargetForPods {
        /// The refused target.
        target: Ipv4Addr,
    },
    /// The kernel cannot name this network namespace to the programs.
    #[error(
        "host-network scope needs SO_NETNS_COOKIE (Linux >= 5.14) to tell host sockets from pod sockets; \
         this kernel refused it: use all-namespaces scope (--pod-namespaces) with a node address as target"
    )]
    NetnsCookieUnsupported,
    /// An unspecified (0.0.0.0) target.
    #[error("target 0.0.0.0 is not an address the tunnel server can listen on")]
    UnspecifiedTarget,
}

impl DnatError {
    fn map(map: &'static str, action: &'static str) -> impl FnOnce(MapError) -> Self {
        move |source| Self::Map { map, action, source: Box::new(source) }
    }

    fn fs(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| Self::Filesystem { what, source }
    }
}

/// Which sockets are redirected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only sockets in the host network namespace (the one that called
    /// [`TunnelDnat::set_target`]): kube-apiserver, metrics-server and
    /// Prometheus on host network.
    HostNetwork,
    /// Sockets of every network namespace, pods included; the target must
    /// then be an address pods reach (a node IP, not loopback).
    AllNamespaces,
}

/// Where the programs go and where they are pinned.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// Pin directory on bpffs.
    pub pin_dir: PathBuf,
    /// The cgroup v2 directory whose sockets are redirected; `None`: the
    /// cgroup v2 root (all of them), mounting one if the host has none.
    pub cgroup: Option<PathBuf>,
    /// The cgroup of the process that reads `SO_ORIGINAL_DST` (the tunnel
    /// server); `None`: no getsockopt program, and any pinned one is detached.
    pub original_dst_cgroup: Option<PathBuf>,
}

impl Default for AttachOptions {
    fn default() -> Self {
        Self { pin_dir: PathBuf::from(DEFAULT_PIN_DIR), cgroup: None, original_dst_cgroup: None }
    }
}

/// What [`TunnelDnat::load_or_attach`] did to one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkAction {
    /// No link was pinned: attached and pinned.
    Created,
    /// A live link was pinned: its program swapped atomically.
    Updated,
    /// The pinned link's cgroup was gone or another one: attached anew.
    Recreated,
    /// Pinned but no longer wanted: detached.
    Removed,
}

impl LinkAction {
    /// The action's name in machine-readable output (`netd-cloud dnat apply
    /// --json`): `created`, `updated`, `recreated`, `removed`.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkAction::Created => "created",
            LinkAction::Updated => "updated",
            LinkAction::Recreated => "recreated",
            LinkAction::Removed => "removed",
        }
    }
}

/// One program's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkOutcome {
    /// Program name.
    pub program: &'static str,
    /// What happened.
    pub action: LinkAction,
    /// The kernel's link id (`bpftool link show id N`); 0 when removed.
    pub link_id: u32,
}

/// A pinned link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedLink {
    /// Program name.
    pub program: &'static str,
    /// The pin.
    pub path: PathBuf,
    /// Link id, program id, cgroup id (0: the cgroup is gone).
    pub info: sys::LinkInfo,
}

/// Counters for one port rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleStats {
    /// Dialled port.
    pub port: u16,
    /// Tunnel server port.
    pub target_port: u16,
    /// Connections redirected by this rule since it was created.
    pub redirected: u64,
}

/// A snapshot of the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnatStats {
    /// Tunnel server address (`None` until set).
    pub target: Option<Ipv4Addr>,
    /// Which sockets are redirected.
    pub scope: Scope,
    /// Rules, by dialled port.
    pub rules: Vec<RuleStats>,
    /// Edge node addresses, sorted.
    pub edge_nodes: Vec<Ipv4Addr>,
    /// Edge subnets (pod subnets), sorted.
    pub edge_subnets: Vec<Ipv4Net>,
    /// Connections between the client's SYN and the server's accept.
    pub handshakes_pending: usize,
    /// Redirected connections whose client socket is open (their entries
    /// go when it closes).
    pub connections_open: usize,
    /// Redirected connects that never sent their SYN: `connect()` failed
    /// after the redirect (no source port, no route). Left to the map's LRU.
    pub dialled_unsent: usize,
    /// Accepted sockets that learned their original destination.
    pub accepted_with_origin: u64,
    /// Matches not redirected because their record could not be written.
    pub no_storage: u64,
    /// Handshake entries that could not be written.
    pub handshake_full: u64,
}

impl DnatStats {
    /// The counters in Prometheus' text format (`netd-cloud dnat show --prometheus`,
    /// for node_exporter's textfile collector, and for any netd process that
    /// serves /metrics next to a tunnel DNAT).
    pub fn render_prometheus(&self) -> String {
        netd_metrics::render(self.clone())
    }
}

/// A snapshot is a collector of itself: register one read at scrape time.
impl netd_metrics::Collector for DnatStats {
    fn encode(&self, encoder: netd_metrics::DescriptorEncoder) -> std::fmt::Result {
        let mut out = netd_metrics::Families::new(encoder);
        let ports: Vec<_> =
            self.rules.iter().map(|rule| (rule.port.to_string(), rule.target_port.to_string())).collect();
        out.counters(
            "netd_dnat_redirected_total",
            "Connections redirected to the tunnel server, by rule.",
            self.rules.iter().zip(&ports).map(|(rule, (port, target_port))| {
                ([("port", port.as_str()), ("target_port", target_port.as_str())], rule.redirected)
            }),
        )?;
        out.gauge("netd_dnat_edge_nodes", "Edge node addresses redirected.", self.edge_nodes.len() as u64)?;
        out.gauge("netd_dnat_edge_subnets", "Edge pod subnets redirected.", self.edge_subnets.len() as u64)?;
        out.gauge(
            "netd_dnat_handshakes_pending",
            "Redirected connections between SYN and accept.",
            self.handshakes_pending as u64,
        )?;
        out.gauge(
            "netd_dnat_connections_open",
            "Redirected connections whose client socket is open.",
            self.connections_open as u64,
        )?;
        out.gauge(
            "netd_dnat_dialled_unsent",
            "Redirected connects whose connect() failed before the SYN.",
            self.dialled_unsent as u64,
        )?;
        out.counter(
            "netd_dnat_accepted_with_origin_total",
            "Accepted tunnel connections that learned their original destination.",
            self.accepted_with_origin,
        )?;
        out.counter(
            "netd_dnat_no_storage_total",
            "Matches left unredirected for want of room for their record.",
            self.no_storage,
        )?;
        out.counter(
            "netd_dnat_handshake_full_total",
            "Handshakes the hand-over map could not take.",
            self.handshake_full,
        )
    }
}

/// What a set operation changed in the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// Entries added.
    pub added: usize,
    /// Entries whose value changed.
    pub updated: usize,
    /// Entries removed.
    pub removed: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    /// The cgroup whose sockets are redirected.
    Redirected,
    /// The tunnel server's cgroup.
    OriginalDst,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    SockAddr,
    SockOps,
    Sockopt,
}

struct ProgramSpec {
    name: &'static str,
    object: &'static [u8],
    kind: Kind,
    attach: AttachType,
    hook: Hook,
}

const PROGRAMS: [ProgramSpec; 6] = [
    ProgramSpec {
        name: "dnat_connect4",
        object: objects::DNAT_CONNECT4,
        kind: Kind::SockAddr,
        attach: AttachType::Connect4,
        hook: Hook::Redirected,
    },
    ProgramSpec {
        name: "dnat_connect6",
        object: objects::DNAT_CONNECT6,
        kind: Kind::SockAddr,
        attach: AttachType::Connect6,
        hook: Hook::Redirected,
    },
    ProgramSpec {
        name: "dnat_getpeername4",
        object: objects::DNAT_GETPEERNAME4,
        kind: Kind::SockAddr,
        attach: AttachType::GetPeerName4,
        hook: Hook::Redirected,
    },
    ProgramSpec {
        name: "dnat_getpeername6",
        object: objects::DNAT_GETPEERNAME6,
        kind: Kind::SockAddr,
        attach: AttachType::GetPeerName6,
        hook: Hook::Redirected,
    },
    // Where the clients are, not only where the tunnel server listens: the
    // client's TCP_CONNECT_CB is the first hook that knows the source port
    // both sockets' key needs (connect4 runs before the port is chosen).
    // The server side only marks the entry taken. The redirected cgroup
    // covers both on a real node (it is the root).
    ProgramSpec {
        name: "dnat_sockops",
        object: objects::DNAT_SOCKOPS,
        kind: Kind::SockOps,
        attach: AttachType::SockOps,
        hook: Hook::Redirected,
    },
    ProgramSpec {
        name: "dnat_getsockopt",
        object: objects::DNAT_GETSOCKOPT,
        kind: Kind::Sockopt,
        attach: AttachType::GetSockopt,
        hook: Hook::OriginalDst,
    },
];

/// The tunnel DNAT's maps, opened from their pins. Dropping it changes
/// nothing in the kernel: the pinned links keep redirecting.
pub struct TunnelDnat {
    pin_dir: PathBuf,
    ports: HashMap<MapData, u16, abi::Rule>,
    target_ports: Array<MapData, u64>,
    edges: HashMap<MapData, u32, u8>,
    edge_nets: LpmTrie<MapData, u32, u8>,
    conf: Array<MapData, abi::Config>,
    hits: PerCpuHashMap<MapData, u16, u64>,
    stat: PerCpuArray<MapData, u64>,
    dialled: HashMap<MapData, u64, abi::Orig>,
    conns: HashMap<MapData, abi::Tuple, abi::Orig>,
    /// What `edges` holds, so a new set costs map writes only for the difference.
    edge_set: HashSet<u32>,
    /// What `edge_nets` holds (prefix length, network-order address).
    edge_net_set: HashSet<(u32, u32)>,
    /// What `ports` holds.
    rules: BTreeMap<u16, u16>,
}

impl std::fmt::Debug for TunnelDnat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelDnat")
            .field("pin_dir", &self.pin_dir)
            .field("edge_nodes", &self.edge_set.len())
            .field("edge_subnets", &self.edge_net_set.len())
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

/// Holds `flock` on the pin directory so two `netd-cloud dnat apply` never
/// interleave their link swaps.
struct PinLock(#[allow(dead_code)] File);

impl PinLock {
    fn take(dir: &Path) -> Result<Self, DnatError> {
        let file = File::open(dir).map_err(DnatError::fs(format!("opening {}", dir.display())))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(DnatError::fs(format!("locking {}", dir.display()))(io::Error::last_os_error()));
        }
        Ok(Self(file))
    }
}

fn check_capabilities() -> Result<(), DnatError> {
    let missing = sys::missing_bpf_capabilities().map_err(DnatError::fs("reading this thread's capabilities"))?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DnatError::MissingCapability { missing })
    }
}

/// The network namespace cookie of the calling thread's namespace, as
/// `bpf_get_netns_cookie` reports it for sockets created there.
fn current_netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which lives across the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Opens a pinned map and checks that its key and value sizes are what this
/// build's programs use (the kernel and aya reuse a pin without looking).
/// `Ok(None)` when nothing is pinned under that name.
fn open_pinned(pin_dir: &Path, name: &'static str, key: usize, value: usize) -> Result<Option<MapData>, DnatError> {
    let path = pin_dir.join(name);
    let data = match MapData::from_pin(&path) {
        Ok(data) => data,
        Err(MapError::SyscallError(err)) if err.io_error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(DnatError::map(name, "opening its pin")(source)),
    };
    let info = data.info().map_err(DnatError::map(name, "reading its info"))?;
    let (key, value) = (key as u32, value as u32);
    if info.key_size() != key || info.value_size() != value {
        return Err(DnatError::MapLayout {
            path,
            key,
            value,
            found_key: info.key_size(),
            found_value: info.value_size(),
        });
    }
    Ok(Some(data))
}

fn open_map(pin_dir: &Path, name: &'static str, key: usize, value: usize) -> Result<Map, DnatError> {
    let data = open_pinned(pin_dir, name, key, value)?
        .ok_or_else(|| DnatError::NotAttached { pin_dir: pin_dir.to_path_buf() })?;
    Map::from_map_data(data).map_err(DnatError::map(name, "typing it"))
}

/// Loads one object (its maps come from, or go to, the pin directory) and
/// loads its program into the verifier. The returned `Ebpf` owns the
/// program's descriptor; links keep the program alive after it is dropped.
fn load_program(spec: &ProgramSpec, pin_dir: &Path) -> Result<aya::Ebpf, DnatError> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(spec.object)
        .map_err(|source| DnatError::Load { object: spec.name, source: Box::new(source) })?;
    let program = ebpf.program_mut(spec.name).ok_or_else(|| DnatError::Program {
        program: spec.name,
        what: "missing from its object".into(),
        source: None,
    })?;
    let wrong_type = || DnatError::Program { program: spec.name, what: "has an unexpected type".into(), source: None };
    let loaded = match spec.kind {
        Kind::SockAddr => <&mut CgroupSockAddr>::try_from(program).map_err(|_| wrong_type())?.load(),
        Kind::SockOps => <&mut SockOps>::try_from(program).map_err(|_| wrong_type())?.load(),
        Kind::Sockopt => <&mut CgroupSockopt>::try_from(program).map_err(|_| wrong_type())?.load(),
    };
    loaded.map_err(|source| DnatError::Program {
        program: spec.name,
        what: "refused by the kernel".into(),
        source: Some(source),
    })?;
    Ok(ebpf)
}

fn program_fd<'a>(ebpf: &'a aya::Ebpf, spec: &ProgramSpec) -> Result<std::os::fd::BorrowedFd<'a>, DnatError> {
    let program = ebpf.program(spec.name).ok_or_else(|| DnatError::Program {
        program: spec.name,
        what: "missing from its object".into(),
        source: None,
    })?;
    let fd = program.fd().map_err(|source| DnatError::Program {
        program: spec.name,
        what: "has no descriptor".into(),
        source: Some(source),
    })?;
    Ok(fd.as_fd())
}

fn link_err(spec: &ProgramSpec, path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> DnatError {
    let (program, path) = (spec.name, path.to_path_buf());
    move |source| DnatError::Link { program, path, action, source }
}

/// Makes the pinned link at `path` run `prog` on `cgroup_dir`, keeping the
/// hook covered throughout: an existing link gets the program swapped in; a
/// stale one (cgroup gone, or another cgroup) is replaced only after its
/// successor is attached.
fn ensure_link(
    spec: &ProgramSpec,
    path: &Path,
    prog: std::os::fd::BorrowedFd<'_>,
    cgroup_dir: &Path,
) -> Result<LinkOutcome, DnatError> {
    let cgroup = File::open(cgroup_dir).map_err(DnatError::fs(format!("opening cgroup {}", cgroup_dir.display())))?;
    let cgroup_id = cgroup.metadata().map_err(DnatError::fs(format!("stat {}", cgroup_dir.display())))?.ino();
    let existing = match sys::obj_get(path) {
        Ok(fd) => Some(fd),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => return Err(link_err(spec, path, "opening its pin")(err)),
    };
    if let Some(link) = &existing {
        let info = sys::link_info(link).map_err(link_err(spec, path, "reading its info"))?;
        if info.link_type == sys::LINK_TYPE_CGROUP
            && info.cgroup_id == cgroup_id
            && info.attach_type == spec.attach as u32
        {
            sys::link_update(link, prog).map_err(link_err(spec, path, "swapping in the new program"))?;
            return Ok(LinkOutcome { program: spec.name, action: LinkAction::Updated, link_id: info.id });
        }
    }
    let link = sys::link_create(prog, &cgroup, spec.attach).map_err(link_err(spec, path, "attaching"))?;
    let action = match existing {
        Some(stale) => {
            // Detach now (it may still be live on another cgroup), then free its pin.
            let _ = sys::link_detach(&stale);
            fs::remove_file(path).map_err(link_err(spec, path, "removing the stale pin"))?;
            LinkAction::Recreated
        }
        None => LinkAction::Created,
    };
    sys::obj_pin(&link, path).map_err(link_err(spec, path, "pinning"))?;
    let id = sys::link_info(&link).map(|info| info.id).unwrap_or(0);
    Ok(LinkOutcome { program: spec.name, action, link_id: id })
}

fn remove_link(spec: &ProgramSpec, path: &Path) -> Result<Option<LinkOutcome>, DnatError> {
    let link: OwnedFd = match sys::obj_get(path) {
        Ok(fd) => fd,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(link_err(spec, path, "opening its pin")(err)),
    };
    // A link whose cgroup is gone is already detached: ENOLINK is fine.
    if let Err(err) = sys::link_detach(&link) {
        if err.raw_os_error() != Some(libc::ENOLINK) {
            return Err(link_err(spec, path, "detaching")(err));
        }
    }
    fs::remove_file(path).map_err(link_err(spec, path, "removing its pin"))?;
    Ok(Some(LinkOutcome { program: spec.name, action: LinkAction::Removed, link_id: 0 }))
}

fn remove_obsolete_maps(pin_dir: &Path) -> Result<(), DnatError> {
    for name in OBSOLETE_MAPS {
        let path = pin_dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(DnatError::fs(format!("removing the obsolete map {}", path.display()))(err)),
        }
    }
    Ok(())
}

/// The socket's own (`peer == false`) or peer address when it is IPv4 or
/// v4-mapped IPv6; `None` for anything else (unconnected, real IPv6).
fn socket_addr_v4(fd: libc::c_int, peer: bool) -> io::Result<Option<SocketAddrV4>> {
    // SAFETY: sockaddr_storage is plain integers; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let addr = (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
    // SAFETY: the kernel writes at most `len` bytes into `storage`, which lives across the call.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, addr, &mut len)
        } else {
            libc::getsockname(fd, addr, &mut len)
        }
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENOTCONN) { Ok(None) } else { Err(err) };
    }
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel said AF_INET, so `storage` holds a sockaddr_in.
            let sin = unsafe { &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Ok(Some(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel said AF_INET6, so `storage` holds a sockaddr_in6.
            let sin6 = unsafe { &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).to_ipv4_mapped();
            Ok(ip.map(|ip| SocketAddrV4::new(ip, u16::from_be(sin6.sin6_port))))
        }
        _ => Ok(None),
    }
}

fn u32_of(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

fn addr_of(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

fn sum(values: &PerCpuValues<u64>) -> u64 {
    values.iter().copied().fold(0u64, u64::wrapping_add)
}

/// An LPM key of `net` as the map holds it: (prefix length, network-order
/// network address).
fn net_key(net: Ipv4Net) -> (u32, u32) {
    (u32::from(net.prefix_len()), u32_of(net.network()))
}

fn net_of((prefix_len, raw): (u32, u32)) -> Option<Ipv4Net> {
    Ipv4Net::new(addr_of(raw), u8::try_from(prefix_len).ok()?).ok()
}

/// A map of edge keys (node addresses, subnets): the one write and one
/// delete the set operations need, whatever the map type.
trait KeySet<K> {
    fn put(&mut self, key: K) -> Result<(), MapError>;
    fn delete(&mut self, key: K) -> Result<(), MapError>;
}

impl KeySet<u32> for HashMap<MapData, u32, u8> {
    fn put(&mut self, key: u32) -> Result<(), MapError> {
        self.insert(key, 1, 0)
    }
    fn delete(&mut self, key: u32) -> Result<(), MapError> {
        self.remove(&key)
    }
}

impl KeySet<(u32, u32)> for LpmTrie<MapData, u32, u8> {
    fn put(&mut self, (prefix_len, raw): (u32, u32)) -> Result<(), MapError> {
        self.insert(&LpmKey::new(prefix_len, raw), 1, 0)
    }
    fn delete(&mut self, (prefix_len, raw): (u32, u32)) -> Result<(), MapError> {
        self.remove(&LpmKey::new(prefix_len, raw))
    }
}

/// Which set a key-set operation works on: for errors.
struct KeyKind {
    map: &'static str,
    max: usize,
    too_many: fn(usize) -> DnatError,
    adding: &'static str,
    removing: &'static str,
}

const NODE_KEYS: KeyKind = KeyKind {
    map: MAP_EDGES,
    max: MAX_EDGE_NODES,
    too_many: |count| DnatError::TooManyEdgeNodes { count },
    adding: "adding a node",
    removing: "removing a node",
};

const SUBNET_KEYS: KeyKind = KeyKind {
    map: MAP_EDGE_NETS,
    max: MAX_EDGE_SUBNETS,
    too_many: |count| DnatError::TooManyEdgeSubnets { count },
    adding: "adding a subnet",
    removing: "removing a subnet",
};

fn delete_key<K>(map: &mut impl KeySet<K>, key: K, kind: &KeyKind) -> Result<(), DnatError> {
    match map.delete(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(DnatError::map(kind.map, kind.removing)(source)),
    }
}

/// Makes `map` hold exactly `wanted`, writing only the difference;
/// `known` mirrors the map.
fn set_exactly<K: Copy + Eq + std::hash::Hash>(
    map: &mut impl KeySet<K>,
    known: &mut HashSet<K>,
    wanted: HashSet<K>,
    kind: &KeyKind,
) -> Result<Changes, DnatError> {
    if wanted.len() > kind.max {
        return Err((kind.too_many)(wanted.len()));
    }
    // Removals first, so a full map has room for the additions.
    let gone: Vec<K> = known.difference(&wanted).copied().collect();
    let removed = remove_keys(map, known, gone, kind)?.removed;
    let added = add_keys(map, known, wanted, kind)?.added;
    Ok(Changes { added, removed, ..Changes::default() })
}

fn add_keys<K: Copy + Eq + std::hash::Hash>(
    map: &mut impl KeySet<K>,
    known: &mut HashSet<K>,
    keys: impl IntoIterator<Item = K>,
    kind: &KeyKind,
) -> Result<Changes, DnatError> {
    let mut changes = Changes::default();
    for key in keys {
        if known.contains(&key) {
            continue;
        }
        if known.len() >= kind.max {
            return Err((kind.too_many)(known.len() + 1));
        }
        map.put(key).map_err(DnatError::map(kind.map, kind.adding))?;
        known.insert(key);
        changes.added += 1;
    }
    Ok(changes)
}

fn remove_keys<K: Copy + Eq + std::hash::Hash>(
    map: &mut impl KeySet<K>,
    known: &mut HashSet<K>,
    keys: impl IntoIterator<Item = K>,
    kind: &KeyKind,
) -> Result<Changes, DnatError> {
    let mut changes = Changes::default();
    for key in keys {
        if !known.contains(&key) {
            continue;
        }
        delete_key(map, key, kind)?;
        known.remove(&key);
        changes.removed += 1;
    }
    Ok(changes)
}

impl TunnelDnat {
    /// Loads the six programs and makes the pinned links run them: attaches
    /// and pins where nothing is pinned, swaps the code atomically into live
    /// links (`BPF_LINK_UPDATE`; an upgrade or restart never leaves a
    /// connect unredirected), re-creates links whose cgroup is gone. Maps
    /// already pinned are reused with their contents. Idempotent.
    ///
    /// Like `bpftool prog loadall … && bpftool cgroup attach … && bpftool link pin …`.
    pub fn load_or_attach(options: &AttachOptions) -> Result<(Self, Vec<LinkOutcome>), DnatError> {
        check_capabilities()?;
        // Best effort: see raise_memlock_rlimit's docs.
        let _ = crate::raise_memlock_rlimit();
        let pin_dir = &options.pin_dir;
        ensure_bpffs(&pin_dir.join(LINK_DIR)).map_err(DnatError::fs(format!("preparing {}", pin_dir.display())))?;
        let _lock = PinLock::take(pin_dir)?;
        // Before any program binds to a reused pin.
        for (name, key, value) in MAPS {
            open_pinned(pin_dir, name, key, value)?;
        }
        let redirected = match &options.cgroup {
            Some(dir) => dir.clone(),
            None => cgroup2_root().map_err(DnatError::fs("finding or mounting the cgroup v2 root"))?,
        };
        // Every program through the verifier first (which also creates the
        // maps a first attach or an upgrade adds), so nothing is swapped in
        // unless all of them load.
        let mut loaded = Vec::with_capacity(PROGRAMS.len());
        for spec in &PROGRAMS {
            let cgroup = match spec.hook {
                Hook::Redirected => Some(&redirected),
                Hook::OriginalDst => options.original_dst_cgroup.as_ref(),
            };
            let ebpf = cgroup.map(|_| load_program(spec, pin_dir)).transpose()?;
            loaded.push((spec, cgroup, ebpf));
        }
        let mut dnat = Self::open(pin_dir)?;
        // Before the programs that read it run: rules pinned by a build
        // without the target-port map have their ports in it.
        dnat.sync_target_ports()?;
        let mut outcomes = Vec::with_capacity(PROGRAMS.len());
        for (spec, cgroup, ebpf) in loaded {
            let path = pin_dir.join(LINK_DIR).join(spec.name);
            match (cgroup, ebpf) {
                (Some(cgroup), Some(ebpf)) => {
                    outcomes.push(ensure_link(spec, &path, program_fd(&ebpf, spec)?, cgroup)?)
                }
                _ => outcomes.extend(remove_link(spec, &path)?),
            }
        }
        // No link runs a program of the old layout any more; sockets that
        // programs of that layout redirected keep their records until they close.
        remove_obsolete_maps(pin_dir)?;
        Ok((dnat, outcomes))
    }

    /// Opens the pinned maps of a tunnel DNAT set up earlier (by this or
    /// another process): for `show`, for a tunnel server reading
    /// [`original_dst`](Self::original_dst), for updates.
    pub fn open(pin_dir: &Path) -> Result<Self, DnatError> {
        check_capabilities()?;
        fn typed<T: TryFrom<Map, Error = MapError>>(pin_dir: &Path, name: &'static str) -> Result<T, DnatError> {
            let (key, value) =
                MAPS.iter().find(|(n, _, _)| *n == name).map(|&(_, key, value)| (key, value)).unwrap_or((0, 0));
            open_map(pin_dir, name, key, value)?.try_into().map_err(DnatError::map(name, "typing it"))
        }
        let ports: HashMap<MapData, u16, abi::Rule> = typed(pin_dir, MAP_PORTS)?;
        let target_ports = typed(pin_dir, MAP_TARGET_PORTS)?;
        let edges: HashMap<MapData, u32, u8> = typed(pin_dir, MAP_EDGES)?;
        let edge_nets: LpmTrie<MapData, u32, u8> = typed(pin_dir, MAP_EDGE_NETS)?;
        let conf = typed(pin_dir, MAP_CONF)?;
        let hits = typed(pin_dir, MAP_HITS)?;
        let stat = typed(pin_dir, MAP_STAT)?;
        let dialled = typed(pin_dir, MAP_DIALLED)?;
        let conns = typed(pin_dir, MAP_CONNS)?;
        let mut edge_set = HashSet::new();
        for key in edges.keys() {
            edge_set.insert(key.map_err(DnatError::map(MAP_EDGES, "listing"))?);
        }
        let mut edge_net_set = HashSet::new();
        for key in edge_nets.keys() {
            let key = key.map_err(DnatError::map(MAP_EDGE_NETS, "listing"))?;
            edge_net_set.insert((key.prefix_len(), key.data()));
        }
        let mut rules = BTreeMap::new();
        for entry in ports.iter() {
            let (port, rule) = entry.map_err(DnatError::map(MAP_PORTS, "listing"))?;
            rules.insert(port, rule.target_port);
        }
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            ports,
            target_ports,
            edges,
            edge_nets,
            conf,
            hits,
            stat,
            dialled,
            conns,
            edge_set,
            edge_net_set,
            rules,
        })
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Sets the tunnel server address and which sockets are redirected, and
    /// turns redirection on. `HostNetwork` means the network namespace of
    /// the calling thread. Applies to the next `connect()`.
    pub fn set_target(&mut self, target: Ipv4Addr, scope: Scope) -> Result<(), DnatError> {
        if target.is_unspecified() {
            return Err(DnatError::UnspecifiedTarget);
        }
        if scope == Scope::AllNamespaces && target.is_loopback() {
            return Err(DnatError::LoopbackTargetForPods { target });
        }
        let host_netns_cookie = match current_netns_cookie() {
            Ok(cookie) => cookie,
            // Only host-network scope compares cookies.
            Err(_) if scope == Scope::AllNamespaces => 0,
            Err(err) if err.raw_os_error() == Some(libc::ENOPROTOOPT) => return Err(DnatError::NetnsCookieUnsupported),
            Err(err) => return Err(DnatError::fs("reading this network namespace's cookie")(err)),
        };
        let mut flags = abi::DNAT_ENABLED;
        if scope == Scope::AllNamespaces {
            flags |= abi::DNAT_POD_NAMESPACES;
        }
        let config = abi::Config { target_ip4: u32_of(target), flags, host_netns_cookie };
        self.conf.set(0, config, 0).map_err(DnatError::map(MAP_CONF, "writing"))
    }

    /// Makes the edge-node set exactly `nodes`: only the difference is
    /// written to the kernel. The next `connect()` sees the new set.
    pub fn set_edge_nodes(&mut self, nodes: impl IntoIterator<Item = Ipv4Addr>) -> Result<Changes, DnatError> {
        let wanted = nodes.into_iter().map(u32_of).collect();
        set_exactly(&mut self.edges, &mut self.edge_set, wanted, &NODE_KEYS)
    }

    /// Adds edge nodes: one map write per node not yet present, whatever
    /// the size of the set (what a watch event calls for).
    pub fn add_edge_nodes(&mut self, nodes: impl IntoIterator<Item = Ipv4Addr>) -> Result<Changes, DnatError> {
        add_keys(&mut self.edges, &mut self.edge_set, nodes.into_iter().map(u32_of), &NODE_KEYS)
    }

    /// Removes edge nodes: one map write per node present.
    pub fn remove_edge_nodes(&mut self, nodes: impl IntoIterator<Item = Ipv4Addr>) -> Result<Changes, DnatError> {
        remove_keys(&mut self.edges, &mut self.edge_set, nodes.into_iter().map(u32_of), &NODE_KEYS)
    }

    /// Makes the edge-subnet set exactly `subnets` (edge pod subnets: a
    /// connect to any address inside one is redirected like one to an edge
    /// node); only the difference is written. Host bits are ignored.
    pub fn set_edge_subnets(&mut self, subnets: impl IntoIterator<Item = Ipv4Net>) -> Result<Changes, DnatError> {
        let wanted = subnets.into_iter().map(net_key).collect();
        set_exactly(&mut self.edge_nets, &mut self.edge_net_set, wanted, &SUBNET_KEYS)
    }

    /// Adds edge subnets: one map write per subnet not yet present.
    pub fn add_edge_subnets(&mut self, subnets: impl IntoIterator<Item = Ipv4Net>) -> Result<Changes, DnatError> {
        add_keys(&mut self.edge_nets, &mut self.edge_net_set, subnets.into_iter().map(net_key), &SUBNET_KEYS)
    }

    /// Removes edge subnets: one map write per subnet present.
    pub fn remove_edge_subnets(&mut self, subnets: impl IntoIterator<Item = Ipv4Net>) -> Result<Changes, DnatError> {
        remove_keys(&mut self.edge_nets, &mut self.edge_net_set, subnets.into_iter().map(net_key), &SUBNET_KEYS)
    }

    /// Makes the rules exactly `rules` (dialled port, tunnel port): only the
    /// difference is written; a rule whose target changes keeps its counter.
    pub fn set_port_rules(&mut self, rules: impl IntoIterator<Item = (u16, u16)>) -> Result<Changes, DnatError> {
        let wanted: BTreeMap<u16, u16> = rules.into_iter().collect();
        if wanted.len() > MAX_PORT_RULES {
            return Err(DnatError::TooManyPortRules { count: wanted.len() });
        }
        if let Some((&port, &target_port)) = wanted.iter().find(|(&port, &target)| port == 0 || target == 0) {
            return Err(DnatError::PortZero { port, target_port });
        }
        let mut changes = Changes::default();
        let gone: Vec<u16> = self.rules.keys().filter(|port| !wanted.contains_key(port)).copied().collect();
        for port in gone {
            match self.ports.remove(&port) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(DnatError::map(MAP_PORTS, "removing a rule")(source)),
            }
            match self.hits.remove(&port) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(DnatError::map(MAP_HITS, "removing a counter")(source)),
            }
            self.rules.remove(&port);
            changes.removed += 1;
        }
        // Before any rule points to it: the programs hand a connection over
        // only to a port in this set.
        let old_targets: Vec<u16> = self.rules.values().copied().collect();
        let both: Vec<u16> = old_targets.iter().chain(wanted.values()).copied().collect();
        self.write_target_ports(&both, Some(&both))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, err)| DnatError::fs("counting possible CPUs")(err))?;
        for (&port, &target_port) in &wanted {
            match self.rules.get(&port) {
                Some(&current) if current == target_port => continue,
                Some(_) => changes.updated += 1,
                None => {
                    // The counter first: the program counts only rules that have one.
                    let zeros = PerCpuValues::try_from(vec![0u64; cpus])
                        .map_err(|err| DnatError::fs("sizing per-CPU counters")(err))?;
                    self.hits.insert(port, zeros, BPF_NOEXIST).or_else(|err| match err {
                        // Left by an earlier rule set: keep counting on.
                        MapError::SyscallError(ref e) if e.io_error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
                        other => Err(DnatError::map(MAP_HITS, "adding a counter")(other)),
                    })?;
                    changes.added += 1;
                }
            }
            let rule = abi::Rule { target_port, reserved: 0 };
            self.ports.insert(port, rule, 0).map_err(DnatError::map(MAP_PORTS, "writing a rule"))?;
            self.rules.insert(port, target_port);
        }
        // Now no more than the rules' own ports.
        let targets: Vec<u16> = self.rules.values().copied().collect();
        self.write_target_ports(&targets, Some(&both))?;
        Ok(changes)
    }

    /// Makes the target-port bitmap hold exactly the rules' target ports,
    /// whatever it held (a map new to this pin directory, or pinned by an
    /// older build): every word is read once.
    fn sync_target_ports(&mut self) -> Result<(), DnatError> {
        let ports: Vec<u16> = self.rules.values().copied().collect();
        self.write_target_ports(&ports, None)
    }

    /// Writes the target-port bitmap that holds `ports`: only the words the
    /// ports of `touch` fall in (the others hold no port either way), or, for
    /// `None`, every word that differs.
    fn write_target_ports(&mut self, ports: &[u16], touch: Option<&[u16]>) -> Result<(), DnatError> {
        let mut words = vec![0u64; TARGET_PORT_WORDS as usize];
        for &port in ports {
            words[usize::from(port >> 6)] |= 1 << (port & 63);
        }
        let mut indexes: Vec<u32> = match touch {
            Some(touch) => touch.iter().map(|&port| u32::from(port >> 6)).collect(),
            None => (0..TARGET_PORT_WORDS).collect(),
        };
        indexes.sort_unstable();
        indexes.dedup();
        for index in indexes {
            let word = words[index as usize];
            if touch.is_none() {
                let current = self.target_ports.get(&index, 0).map_err(DnatError::map(MAP_TARGET_PORTS, "reading"))?;
                if current == word {
                    continue;
                }
            }
            self.target_ports.set(index, word, 0).map_err(DnatError::map(MAP_TARGET_PORTS, "writing"))?;
        }
        Ok(())
    }

    /// The destination a socket dialled before it was redirected: on the
    /// tunnel server's accepted socket, the edge node address and port the
    /// client connected to (on a redirected client socket, what it dialled).
    /// `None` for sockets the DNAT never touched.
    pub fn original_dst(&self, socket: &impl AsRawFd) -> Result<Option<SocketAddrV4>, DnatError> {
        let fd = socket.as_raw_fd();
        let io_err = |what: &str| DnatError::fs(format!("reading a socket's {what} to find its original destination"));
        let local = socket_addr_v4(fd, false).map_err(io_err("address"))?;
        let peer = socket_addr_v4(fd, true).map_err(io_err("peer address"))?;
        let (Some(local), Some(peer)) = (local, peer) else { return Ok(None) };
        // An accepted socket (what the tunnel server asks on every
        // connection): its peer is the client, its own address the server.
        if let Some(orig) = self.connection(*peer.ip(), *local.ip(), peer.port(), local.port())? {
            return Ok(Some(orig));
        }
        // A redirected client socket: getpeername shows it what it dialled;
        // its real peer is the tunnel server at the rule's target port.
        let Some(target_port) = self.lookup_port_rule(peer.port())? else { return Ok(None) };
        let config = self.conf.get(&0, 0).map_err(DnatError::map(MAP_CONF, "reading"))?;
        let target = addr_of(config.target_ip4);
        match self.connection(*local.ip(), target, local.port(), target_port)? {
            Some(orig) if orig == peer => Ok(Some(orig)),
            _ => Ok(None),
        }
    }

    /// The original destination recorded for the connection from `client`
    /// to `server`.
    fn connection(
        &self,
        client: Ipv4Addr,
        server: Ipv4Addr,
        client_port: u16,
        server_port: u16,
    ) -> Result<Option<SocketAddrV4>, DnatError> {
        let tuple = abi::Tuple { client_ip4: u32_of(client), server_ip4: u32_of(server), client_port, server_port };
        match self.conns.get(&tuple, 0) {
            Ok(orig) => Ok(Some(SocketAddrV4::new(addr_of(orig.ip4), orig.port))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DnatError::map(MAP_CONNS, "looking up a connection")(source)),
        }
    }

    /// Whether the kernel's edge-node map holds `node` now: a lookup in the
    /// map itself, not in what this handle wrote, so it sees another
    /// process's writes (how a benchmark or a test watches a controller).
    pub fn lookup_edge_node(&self, node: Ipv4Addr) -> Result<bool, DnatError> {
        match self.edges.get(&u32_of(node), 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(source) => Err(DnatError::map(MAP_EDGES, "looking up a node")(source)),
        }
    }

    /// The tunnel port the kernel's rule map gives dialled port `port` now
    /// (a lookup in the map, like [`lookup_edge_node`](Self::lookup_edge_node)).
    pub fn lookup_port_rule(&self, port: u16) -> Result<Option<u16>, DnatError> {
        match self.ports.get(&port, 0) {
            Ok(rule) => Ok(Some(rule.target_port)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DnatError::map(MAP_PORTS, "looking up a rule")(source)),
        }
    }

    /// Counters and contents.
    pub fn stats(&self) -> Result<DnatStats, DnatError> {
        let config = self.conf.get(&0, 0).map_err(DnatError::map(MAP_CONF, "reading"))?;
        let target = (config.flags & abi::DNAT_ENABLED != 0).then(|| addr_of(config.target_ip4));
        let scope =
            if config.flags & abi::DNAT_POD_NAMESPACES != 0 { Scope::AllNamespaces } else { Scope::HostNetwork };
        let mut rules = Vec::with_capacity(self.rules.len());
        for (&port, &target_port) in &self.rules {
            let redirected = match self.hits.get(&port, 0) {
                Ok(values) => sum(&values),
                Err(MapError::KeyNotFound) => 0,
                Err(source) => return Err(DnatError::map(MAP_HITS, "reading")(source)),
            };
            rules.push(RuleStats { port, target_port, redirected });
        }
        let mut edge_nodes: Vec<Ipv4Addr> = self.edge_set.iter().copied().map(addr_of).collect();
        edge_nodes.sort();
        let mut edge_subnets: Vec<Ipv4Net> = self.edge_net_set.iter().filter_map(|&key| net_of(key)).collect();
        edge_subnets.sort();
        let stat = |index: u32| -> Result<u64, DnatError> {
            self.stat.get(&index, 0).map(|values| sum(&values)).map_err(DnatError::map(MAP_STAT, "reading"))
        };
        let (mut handshakes_pending, mut connections_open) = (0, 0);
        // An entry can go between listing its key and reading it: skip it.
        for (_, orig) in self.conns.iter().flatten() {
            connections_open += 1;
            if orig.side != abi::SIDE_ACCEPTED {
                handshakes_pending += 1;
            }
        }
        let dialled_unsent = self.dialled.keys().filter(Result::is_ok).count();
        Ok(DnatStats {
            target,
            scope,
            rules,
            edge_nodes,
            edge_subnets,
            handshakes_pending,
            connections_open,
            dialled_unsent,
            accepted_with_origin: stat(abi::STAT_ACCEPTED)?,
            no_storage: stat(abi::STAT_NO_STORAGE)?,
            handshake_full: stat(abi::STAT_HANDSHAKE_FULL)?,
        })
    }

    /// The links pinned under this directory (`bpftool link show`, for
    /// ours only). Programs whose link is not pinned are left out.
    pub fn links(&self) -> Result<Vec<PinnedLink>, DnatError> {
        let mut links = Vec::new();
        for spec in &PROGRAMS {
            let path = self.pin_dir.join(LINK_DIR).join(spec.name);
            let fd = match sys::obj_get(&path) {
                Ok(fd) => fd,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(link_err(spec, &path, "opening its pin")(err)),
            };
            let info = sys::link_info(&fd).map_err(link_err(spec, &path, "reading its info"))?;
            links.push(PinnedLink { program: spec.name, path, info });
        }
        Ok(links)
    }

    /// Detaches every link pinned under `pin_dir` and removes the links and
    /// maps: redirection stops for the next `connect()`. Sockets already
    /// redirected are not affected. Nothing pinned is not an error.
    pub fn detach(pin_dir: &Path) -> Result<Vec<LinkOutcome>, DnatError> {
        check_capabilities()?;
        if !pin_dir.exists() {
            return Ok(Vec::new());
        }
        let _lock = PinLock::take(pin_dir)?;
        let mut outcomes = Vec::new();
        for spec in &PROGRAMS {
            outcomes.extend(remove_link(spec, &pin_dir.join(LINK_DIR).join(spec.name))?);
        }
        remove_obsolete_maps(pin_dir)?;
        for (name, _, _) in MAPS {
            match fs::remove_file(pin_dir.join(name)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(DnatError::fs(format!("removing {}", pin_dir.join(name).display()))(err)),
            }
        }
        // Only if empty: other netd pins may share the directory.
        let _ = fs::remove_dir(pin_dir.join(LINK_DIR));
        let _ = fs::remove_dir(pin_dir);
        Ok(outcomes)
    }
}
