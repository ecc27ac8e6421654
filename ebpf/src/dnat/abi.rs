//! Rust mirrors of the records in `include/netd_dnat.h`. The C side has a
//! `_Static_assert` per struct and this side a `const` assert, so a layout
//! drifting on one side fails that side's build.

use std::mem::size_of;

/// `dnat_conf_v1[0].flags`: redirection on.
pub const DNAT_ENABLED: u32 = 1;
/// `dnat_conf_v1[0].flags`: also sockets in other network namespaces (pods).
pub const DNAT_POD_NAMESPACES: u32 = 2;
/// `dnat_orig.side`: a connection no tunnel server has taken yet (and
/// every record of what a client dialled).
pub const SIDE_CLIENT: u8 = 1;
/// `dnat_orig.side`: a connection the tunnel server's listener took.
pub const SIDE_ACCEPTED: u8 = 2;

/// Indexes of `dnat_stat_v1`.
pub const STAT_NO_STORAGE: u32 = 0;
/// A connection entry could not be written.
pub const STAT_HANDSHAKE_FULL: u32 = 1;
/// Accepted sockets that learned their original destination.
pub const STAT_ACCEPTED: u32 = 2;

/// `struct dnat_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Config {
    /// Tunnel server address, network order.
    pub target_ip4: u32,
    /// `DNAT_*` flags.
    pub flags: u32,
    /// Network namespace cookie of host-network sockets.
    pub host_netns_cookie: u64,
}

/// `struct dnat_rule`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rule {
    /// Tunnel server port, host order.
    pub target_port: u16,
    /// Zero.
    pub reserved: u16,
}

/// `struct dnat_orig`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Orig {
    /// Dialled address, network order.
    pub ip4: u32,
    /// Dialled port, host order.
    pub port: u16,
    /// `SIDE_*`.
    pub side: u8,
    /// Zero.
    pub reserved: u8,
}

/// `struct dnat_tuple`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tuple {
    /// Network order.
    pub client_ip4: u32,
    /// Network order.
    pub server_ip4: u32,
    /// Host order.
    pub client_port: u16,
    /// Host order.
    pub server_port: u16,
}

/// `struct dnat_net_key`: aya's `lpm_trie::Key<u32>` (prefix length, then
/// the network-order address), the same 8 bytes.
pub const NET_KEY_SIZE: usize = size_of::<aya::maps::lpm_trie::Key<u32>>();

const _: () = assert!(size_of::<Config>() == 16);
const _: () = assert!(NET_KEY_SIZE == 8);
const _: () = assert!(size_of::<Rule>() == 4);
const _: () = assert!(size_of::<Orig>() == 8);
const _: () = assert!(size_of::<Tuple>() == 12);

// SAFETY: plain #[repr(C)] integers with no padding (the asserts above pin
// the sizes), so every bit pattern is a valid value.
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
unsafe impl aya::Pod for Rule {}
// SAFETY: as above.
unsafe impl aya::Pod for Orig {}
// SAFETY: as above.
unsafe impl aya::Pod for Tuple {}
