//! netd's eBPF programs and their loader.
//!
//! The programs are C (`ebpf/bpf/*.bpf.c`, one file per attach point, shared
//! headers in `ebpf/include/`). `build.rs` compiles them with
//! `clang-19 -O2 -g -target bpf` into `OUT_DIR`; this crate embeds the objects
//! 8-byte aligned (ELF64 headers and BPF instructions require it) and loads them
//! with [aya]. Settings reach programs as `volatile const` globals, patched into
//! `.rodata` before load, or through maps.
//!
//! Loading needs root (or `CAP_BPF` + `CAP_NET_ADMIN`) and a kernel ≥ 5.10.
//!
//! ```no_run
//! # #[cfg(feature = "test-programs")]
//! # fn main() -> Result<(), netd_ebpf::Error> {
//! use netd_ebpf::testing::ConnectCounter;
//! use std::net::Ipv4Addr;
//!
//! let mut counter = ConnectCounter::load(Some(Ipv4Addr::LOCALHOST))?;
//! counter.attach(std::path::Path::new("/sys/fs/cgroup/unified/my-test"))?;
//! println!("connects to :8080 so far: {}", counter.count(8080)?);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "test-programs"))]
//! # fn main() {}
//! ```

use std::io;
use std::path::PathBuf;

pub use aya;

pub mod dnat;
pub mod fs;
pub mod sys;
#[cfg(feature = "test-programs")]
pub mod testing;

/// The compiled BPF objects, embedded 8-byte aligned.
pub mod objects {
    /// `bpf/dnat_connect4.bpf.c` (cgroup/connect4).
    pub static DNAT_CONNECT4: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dnat_connect4.bpf.o"));
    /// `bpf/dnat_connect6.bpf.c` (cgroup/connect6).
    pub static DNAT_CONNECT6: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dnat_connect6.bpf.o"));
    /// `bpf/dnat_getpeername4.bpf.c` (cgroup/getpeername4).
    pub static DNAT_GETPEERNAME4: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dnat_getpeername4.bpf.o"));
    /// `bpf/dnat_getpeername6.bpf.c` (cgroup/getpeername6).
    pub static DNAT_GETPEERNAME6: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dnat_getpeername6.bpf.o"));
    /// `bpf/dnat_sockops.bpf.c` (sockops).
    pub static DNAT_SOCKOPS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dnat_sockops.bpf.o"));
    /// `bpf/dnat_getsockopt.bpf.c` (cgroup/getsockopt).
    pub static DNAT_GETSOCKOPT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dnat_getsockopt.bpf.o"));
    /// `bpf/testing/connect_counter.bpf.c`: counts `connect()` per destination
    /// port (cgroup/connect4). Test-only.
    #[cfg(feature = "test-programs")]
    pub static CONNECT_COUNTER: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/connect_counter.bpf.o"));
}

/// Errors from loading, attaching and reading netd's BPF programs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel refused the object (verifier, permissions, missing features).
    #[error("loading BPF object `{object}` failed (needs root or CAP_BPF, kernel >= 5.10 with BTF maps)")]
    Load {
        /// Object name, e.g. `connect_counter`.
        object: &'static str,
        /// What aya reported.
        #[source]
        source: aya::EbpfError,
    },
    /// The object has no program of that name or of that type.
    #[error("BPF object `{object}` has no program `{program}` of the expected type")]
    MissingProgram {
        /// Object name.
        object: &'static str,
        /// Program (C function) name.
        program: &'static str,
    },
    /// Loading into the verifier or attaching the program failed.
    #[error("BPF program `{program}`: {action} failed")]
    Program {
        /// Program (C function) name.
        program: &'static str,
        /// `load` or `attach`.
        action: &'static str,
        /// What aya reported.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The object has no map of that name.
    #[error("BPF object `{object}` has no map `{map}`")]
    MissingMap {
        /// Object name.
        object: &'static str,
        /// Map name.
        map: &'static str,
    },
    /// A map lookup or conversion failed.
    #[error("BPF map `{map}`: {action} failed")]
    Map {
        /// Map name.
        map: &'static str,
        /// What was attempted.
        action: &'static str,
        /// What aya reported.
        #[source]
        source: aya::maps::MapError,
    },
    /// The cgroup v2 directory could not be opened.
    #[error("opening cgroup v2 directory {path} failed")]
    Cgroup {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Raises `RLIMIT_MEMLOCK` to infinity. Kernels before 5.11 charge BPF maps
/// against it (later ones use memcg accounting and ignore it), and its default
/// of 64 KiB is too small for real maps. Failure is not fatal: the kernel may
/// not need it, and loading reports the real error if it does.
pub fn raise_memlock_rlimit() -> io::Result<()> {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads a fully initialised rlimit struct that outlives the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
