//! The few bpf(2) commands aya 0.14 does not expose: creating, pinning,
//! inspecting, updating and detaching cgroup `bpf_link`s by file descriptor.
//!
//! aya can attach cgroup programs, but it cannot pin a cgroup-sockopt link,
//! and it has no `BPF_LINK_UPDATE` (atomic program replacement in a live
//! link). Doing every link operation here keeps one model for all of them.
//! Each call fills only the leading part of `union bpf_attr` its command
//! reads; the kernel accepts a shorter attr when the rest would be zero.

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

// Commands (enum bpf_cmd in linux/bpf.h).
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `BPF_LINK_TYPE_CGROUP` (enum bpf_link_type).
pub const LINK_TYPE_CGROUP: u32 = 3;

/// Cgroup attach points netd uses (enum bpf_attach_type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    /// `BPF_CGROUP_SOCK_OPS`
    SockOps = 3,
    /// `BPF_CGROUP_INET4_CONNECT`
    Connect4 = 10,
    /// `BPF_CGROUP_INET6_CONNECT`
    Connect6 = 11,
    /// `BPF_CGROUP_GETSOCKOPT`
    GetSockopt = 21,
    /// `BPF_CGROUP_INET4_GETPEERNAME`
    GetPeerName4 = 29,
    /// `BPF_CGROUP_INET6_GETPEERNAME`
    GetPeerName6 = 30,
}

#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to its cgroup member (the kernel fills as much
/// as `info_len` allows and reports what it has).
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
    _rest: [u64; 2],
}

// The offsets linux/bpf.h gives: cgroup.cgroup_id at 16, attach_type at 24.
const _: () = assert!(size_of::<RawLinkInfo>() == 48);
const _: () = assert!(size_of::<ObjAttr>() == 16);
const _: () = assert!(size_of::<LinkCreateAttr>() == 16);
const _: () = assert!(size_of::<LinkUpdateAttr>() == 16);
const _: () = assert!(size_of::<InfoAttr>() == 16);

/// What the kernel says about a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    /// `BPF_LINK_TYPE_*`.
    pub link_type: u32,
    /// The link's id (`bpftool link show`).
    pub id: u32,
    /// The program it runs now.
    pub prog_id: u32,
    /// The cgroup it is attached to; 0 once that cgroup is gone.
    pub cgroup_id: u64,
    /// `BPF_CGROUP_*`.
    pub attach_type: u32,
}

fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised #[repr(C)] prefix of union
    // bpf_attr for this command, and its size is passed with it; the kernel
    // reads (and for GET_INFO writes through the pointer inside) no more.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, command, attr as *mut T, size_of::<T>() as libc::c_uint) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned_fd(rc: libc::c_long) -> io::Result<OwnedFd> {
    let fd = libc::c_int::try_from(rc).map_err(|_| io::Error::other("bpf(2) returned an out-of-range fd"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fd_u32(fd: impl AsFd) -> u32 {
    // A valid descriptor is never negative.
    fd.as_fd().as_raw_fd() as u32
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Attaches `prog` to the cgroup open as `cgroup` (`BPF_LINK_CREATE`); the
/// link lives while the returned descriptor or a pin of it does.
/// Like `bpftool cgroup attach <cgroup> <type> <prog>`, but as a link.
pub fn link_create(prog: impl AsFd, cgroup: impl AsFd, attach: AttachType) -> io::Result<OwnedFd> {
    let mut attr =
        LinkCreateAttr { prog_fd: fd_u32(prog), target_fd: fd_u32(cgroup), attach_type: attach as u32, flags: 0 };
    owned_fd(bpf(BPF_LINK_CREATE, &mut attr)?)
}

/// Swaps the program a link runs, atomically: every hook invocation sees
/// either the old or the new program (`BPF_LINK_UPDATE`).
pub fn link_update(link: impl AsFd, new_prog: impl AsFd) -> io::Result<()> {
    let mut attr = LinkUpdateAttr { link_fd: fd_u32(link), new_prog_fd: fd_u32(new_prog), ..Default::default() };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches a link from its hook now, whoever else holds it
/// (`BPF_LINK_DETACH`; `bpftool link detach id N`).
pub fn link_detach(link: impl AsFd) -> io::Result<()> {
    let mut attr = LinkDetachAttr { link_fd: fd_u32(link) };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// Pins a link, map or program at `path` in bpffs (`BPF_OBJ_PIN`; `bpftool link pin`).
pub fn obj_pin(fd: impl AsFd, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = ObjAttr { pathname: path.as_ptr() as u64, bpf_fd: fd_u32(fd), file_flags: 0 };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens a pinned object (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = ObjAttr { pathname: path.as_ptr() as u64, ..Default::default() };
    owned_fd(bpf(BPF_OBJ_GET, &mut attr)?)
}

/// What a link is attached to and runs (`BPF_OBJ_GET_INFO_BY_FD`; `bpftool link show`).
pub fn link_info(link: impl AsFd) -> io::Result<LinkInfo> {
    let mut info = RawLinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd_u32(link),
        info_len: size_of::<RawLinkInfo>() as u32,
        info: &mut info as *mut RawLinkInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo {
        link_type: info.link_type,
        id: info.id,
        prog_id: info.prog_id,
        cgroup_id: info.cgroup_id,
        attach_type: info.attach_type,
    })
}

/// The capabilities loading and attaching cgroup programs needs, or the
/// names of those this thread lacks. Credentials are per thread, so this
/// reads `/proc/thread-self/status`, not the process's.
pub fn missing_bpf_capabilities() -> io::Result<Vec<&'static str>> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/thread-self/status")?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/thread-self/status"))?;
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Ok(Vec::new());
    }
    let mut missing = Vec::new();
    if !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    Ok(missing)
}
