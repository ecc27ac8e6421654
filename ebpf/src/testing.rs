//! Programs that exist only to test the build/embed/load/attach pipeline.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::HashMap;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};

use crate::{objects, Error};

const OBJECT: &str = "connect_counter";
const PROGRAM: &str = "count_connect4";
const MAP: &str = "CONNECT_COUNTS";

/// `connect_counter.bpf.c` loaded into the kernel: counts IPv4 `connect()`
/// calls per destination port made by processes of the cgroup it is attached
/// to. Detached and unloaded on drop.
pub struct ConnectCounter {
    ebpf: Ebpf,
}

impl ConnectCounter {
    /// Loads the program. With `only` set, only connects to that address count.
    pub fn load(only: Option<Ipv4Addr>) -> Result<Self, Error> {
        // Best effort: see raise_memlock_rlimit's docs.
        let _ = crate::raise_memlock_rlimit();
        // The program compares against `user_ip4`, which is in network byte order.
        let only_addr4 = only.map_or(0u32, |addr| u32::from_ne_bytes(addr.octets()));
        let ebpf = EbpfLoader::new()
            .override_global("count_only_addr4", &only_addr4, true)
            .load(objects::CONNECT_COUNTER)
            .map_err(|source| Error::Load { object: OBJECT, source })?;
        Ok(Self { ebpf })
    }

    /// Attaches to a cgroup v2 directory (`bpf_link`, exclusive in that cgroup).
    pub fn attach(&mut self, cgroup_dir: &Path) -> Result<(), Error> {
        let cgroup =
            File::open(cgroup_dir).map_err(|source| Error::Cgroup { path: cgroup_dir.to_path_buf(), source })?;
        let program: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or(Error::MissingProgram { object: OBJECT, program: PROGRAM })?;
        program.load().map_err(|source| Error::Program { program: PROGRAM, action: "load", source })?;
        program.attach(&cgroup, CgroupAttachMode::Single).map_err(|source| Error::Program {
            program: PROGRAM,
            action: "attach",
            source,
        })?;
        Ok(())
    }

    /// How many counted `connect()` calls went to `port`.
    pub fn count(&self, port: u16) -> Result<u64, Error> {
        let map = self.ebpf.map(MAP).ok_or(Error::MissingMap { object: OBJECT, map: MAP })?;
        let counts: HashMap<_, u16, u64> =
            HashMap::try_from(map).map_err(|source| Error::Map { map: MAP, action: "open", source })?;
        match counts.get(&port, 0) {
            Ok(count) => Ok(count),
            Err(aya::maps::MapError::KeyNotFound) => Ok(0),
            Err(source) => Err(Error::Map { map: MAP, action: "lookup", source }),
        }
    }
}
