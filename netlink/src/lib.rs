//! A small, batching rtnetlink client for what netd programs: VXLAN links,
//! addresses, neighbours, FDB entries, nexthop objects and routes.
//!
//! Why not one request and one wait per object: with thousands of peers the
//! round trips dominate. [`Handle::apply`] writes many messages into one
//! `sendmsg` (up to [`CHUNK_BYTES`]), asks for an acknowledgement only on the
//! last one, and matches the error acks the kernel sends for failed messages
//! back to the [`Change`] that caused them by sequence number. The kernel
//! processes the messages of one datagram in order, so the final ack proves
//! that every earlier message was handled.
//!
//! The API follows rtnetlink's shape: a [`Handle`] hands out sub-handles
//! ([`Handle::link`], [`Handle::neighbour`], …) that build requests, and a
//! request is executed on its own or collected into a batch with
//! [`Handle::apply`]. Each operation's rustdoc names its `ip`/`bridge`
//! equivalent.
//!
//! Everything runs in the network namespace of the thread that created the
//! [`Handle`] (the socket is bound to it at creation).
//!
//! ```no_run
//! use std::net::Ipv4Addr;
//! use netd_netlink::{Change, Handle, Neighbour};
//!
//! # fn main() -> Result<(), netd_netlink::NetlinkError> {
//! let mut handle = Handle::new()?;
//! let Some(dev) = handle.link().get("flannel.1")? else { return Ok(()) };
//! let mac = [0x6e, 0x6d, 0x70, 0x09, 0x3e, 0x38];
//! // ip neigh replace 10.244.2.0 lladdr 6e:6d:70:09:3e:38 nud permanent dev flannel.1
//! handle.neighbour().set(Neighbour::permanent(dev.index, Ipv4Addr::new(10, 244, 2, 0), mac)).execute()?;
//! # Ok(()) }
//! ```

mod addr;
mod link;
mod monitor;
mod neigh;
mod route;
pub(crate) mod wire;

use std::fmt;
use std::io;

use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

pub use addr::{Address, AddressHandle};
pub use link::{Link, LinkHandle, LinkUpdate, VxlanAttrs, VxlanLink};
pub use monitor::{Event, Monitor};
pub use neigh::{FdbEntry, FdbHandle, Neighbour, NeighbourHandle};
pub use route::{Nexthop, NexthopHandle, Route, RouteHandle, RouteVia};

use wire::{Message, Messages, Writer};

/// Most bytes written into one `sendmsg`. Kept well under the default socket
/// buffers so that even a chunk in which every message fails cannot overflow
/// the receive queue with error acks.
pub const CHUNK_BYTES: usize = 32 * 1024;

/// Errors of the netlink layer.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be created or configured.
    #[error("cannot open a NETLINK_ROUTE socket: {0}")]
    Socket(#[source] io::Error),
    /// `sendmsg` failed.
    #[error("cannot send to the kernel over netlink: {0}")]
    Send(#[source] io::Error),
    /// `recv` failed.
    #[error("cannot receive from the kernel over netlink: {0}")]
    Receive(#[source] io::Error),
    /// The kernel refused one request.
    #[error("kernel refused `{request}`: {}{}", io::Error::from_raw_os_error(*.errno), .detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        /// The request, spelled as its `ip`/`bridge` equivalent.
        request: String,
        /// The positive errno.
        errno: i32,
        /// The kernel's extended-ack message, when it gave one.
        detail: Option<String>,
    },
    /// A message from the kernel did not parse.
    #[error("malformed netlink message from the kernel: {0}")]
    Malformed(String),
    /// A dump kept being interrupted by concurrent changes.
    #[error("dump of {0} was interrupted by concurrent changes five times in a row")]
    DumpInterrupted(&'static str),
}

impl NetlinkError {
    /// The errno of a refused request, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// An Ethernet address as the kernel carries it (`IFLA_ADDRESS`,
/// `NDA_LLADDR`): this layer speaks the kernel's terms and knows nothing of
/// how netd chooses or persists addresses.
pub type EthAddr = [u8; 6];

/// `aa:bb:cc:dd:ee:ff`, as `ip` and `bridge` print it.
struct Lladdr<'a>(&'a EthAddr);

impl fmt::Display for Lladdr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// One change to kernel state; batches are slices of these. `Display` spells
/// the equivalent `ip`/`bridge` command (devices by index, as `dev #N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `ip link add NAME type vxlan …`
    CreateVxlan(VxlanLink),
    /// `ip link set dev #N [address …] [mtu …] [up|down]`
    SetLink(LinkUpdate),
    /// `ip link del dev #N`
    DeleteLink {
        /// Interface index.
        index: u32,
    },
    /// `ip addr replace A/P dev #N`
    AddAddress(Address),
    /// `ip addr del A/P dev #N`
    DeleteAddress(Address),
    /// `ip neigh replace IP lladdr MAC nud permanent dev #N`
    SetNeighbour(Neighbour),
    /// `ip neigh del IP dev #N`
    DeleteNeighbour(Neighbour),
    /// `bridge fdb replace MAC dev #N dst IP self permanent`
    SetFdb(FdbEntry),
    /// `bridge fdb del MAC dev #N dst IP self`
    DeleteFdb(FdbEntry),
    /// `ip nexthop replace id ID via GW dev #N onlink`
    SetNexthop(Nexthop),
    /// `ip nexthop del id ID`
    DeleteNexthop(Nexthop),
    /// `ip route replace DST (nhid ID | via GW dev #N onlink)`
    SetRoute(Route),
    /// `ip route del DST`
    DeleteRoute(Route),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CreateVxlan(v) => write!(
                f,
                "ip link add {} address {} mtu {} type vxlan id {} local {} dev #{} dstport {} {}",
                v.name,
                Lladdr(&v.mac),
                v.mtu,
                v.vni,
                v.local,
                v.link,
                v.port,
                if v.learning { "learning" } else { "nolearning" }
            ),
            Self::SetLink(u) => {
                write!(f, "ip link set dev #{}", u.index)?;
                if let Some(mac) = &u.mac {
                    write!(f, " address {}", Lladdr(mac))?;
                }
                if let Some(mtu) = u.mtu {
                    write!(f, " mtu {mtu}")?;
                }
                match u.up {
                    Some(true) => write!(f, " up"),
                    Some(false) => write!(f, " down"),
                    None => Ok(()),
                }
            }
            Self::DeleteLink { index } => write!(f, "ip link del dev #{index}"),
            Self::AddAddress(a) => write!(f, "ip addr replace {}/{} dev #{}", a.local, a.prefix_len, a.index),
            Self::DeleteAddress(a) => write!(f, "ip addr del {}/{} dev #{}", a.local, a.prefix_len, a.index),
            Self::SetNeighbour(n) => match &n.mac {
                Some(mac) => {
                    write!(f, "ip neigh replace {} lladdr {} nud permanent dev #{}", n.ip, Lladdr(mac), n.ifindex)
                }
                None => write!(f, "ip neigh replace {} nud permanent dev #{}", n.ip, n.ifindex),
            },
            Self::DeleteNeighbour(n) => write!(f, "ip neigh del {} dev #{}", n.ip, n.ifindex),
            Self::SetFdb(e) => {
                write!(f, "bridge fdb replace {} dev #{} dst {} self permanent", Lladdr(&e.mac), e.ifindex, e.dst)
            }
            Self::DeleteFdb(e) => {
                write!(f, "bridge fdb del {} dev #{} dst {} self", Lladdr(&e.mac), e.ifindex, e.dst)
            }
            Self::SetNexthop(n) => write!(
                f,
                "ip nexthop replace id {} via {} dev #{}{}",
                n.id,
                n.gateway,
                n.oif,
                if n.onlink { " onlink" } else { "" }
            ),
            Self::DeleteNexthop(n) => write!(f, "ip nexthop del id {}", n.id),
            Self::SetRoute(r) => write!(f, "ip route replace {r}"),
            Self::DeleteRoute(r) => write!(f, "ip route del {}", r.dst),
        }
    }
}

impl Change {
    fn encode(&self, w: &mut Writer, seq: u32) {
        match self {
            Self::CreateVxlan(v) => v.encode_create(w, seq),
            Self::SetLink(u) => u.encode(w, seq),
            Self::DeleteLink { index } => link::encode_delete(w, seq, *index),
            Self::AddAddress(a) => a.encode(w, seq, true),
            Self::DeleteAddress(a) => a.encode(w, seq, false),
            Self::SetNeighbour(n) => n.encode(w, seq, true),
            Self::DeleteNeighbour(n) => n.encode(w, seq, false),
            Self::SetFdb(e) => e.encode(w, seq, true),
            Self::DeleteFdb(e) => e.encode(w, seq, false),
            Self::SetNexthop(n) => n.encode(w, seq, true),
            Self::DeleteNexthop(n) => n.encode(w, seq, false),
            Self::SetRoute(r) => r.encode(w, seq, true),
            Self::DeleteRoute(r) => r.encode(w, seq, false),
        }
    }
}

/// A request built by a sub-handle, run with [`Request::execute`].
#[must_use = "a request does nothing until executed"]
pub struct Request<'h> {
    handle: &'h mut Handle,
    change: Change,
}

impl Request<'_> {
    /// Sends the request and waits for the kernel's acknowledgement.
    pub fn execute(self) -> Result<(), NetlinkError> {
        let failures = self.handle.apply(std::slice::from_ref(&self.change))?;
        match failures.into_iter().next() {
            Some((_, error)) => Err(error),
            None => Ok(()),
        }
    }

    /// The change, to put in a batch instead.
    pub fn into_change(self) -> Change {
        self.change
    }
}

/// A NETLINK_ROUTE socket bound in the creating thread's network namespace.
pub struct Handle {
    socket: Socket,
    seq: u32,
    tx: Writer,
    rx: Vec<u8>,
}

const RECV_BYTES: usize = 64 * 1024;

impl Handle {
    /// Opens a socket in the calling thread's network namespace.
    pub fn new() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        // Error acks carry only the failed header, plus the kernel's reason.
        socket.set_cap_ack(true).map_err(NetlinkError::Socket)?;
        socket.set_ext_ack(true).map_err(NetlinkError::Socket)?;
        // Large dumps arrive faster than a busy thread reads them.
        socket.set_rx_buf_sz(4 * 1024 * 1024).map_err(NetlinkError::Socket)?;
        Ok(Self { socket, seq: 0, tx: Writer::default(), rx: Vec::with_capacity(RECV_BYTES) })
    }

    /// Links: `ip link`.
    pub fn link(&mut self) -> LinkHandle<'_> {
        LinkHandle(self)
    }

    /// IPv4 addresses: `ip addr`.
    pub fn address(&mut self) -> AddressHandle<'_> {
        AddressHandle(self)
    }

    /// IPv4 neighbours: `ip neigh`.
    pub fn neighbour(&mut self) -> NeighbourHandle<'_> {
        NeighbourHandle(self)
    }

    /// VXLAN forwarding entries: `bridge fdb`.
    pub fn fdb(&mut self) -> FdbHandle<'_> {
        FdbHandle(self)
    }

    /// Nexthop objects: `ip nexthop`.
    pub fn nexthop(&mut self) -> NexthopHandle<'_> {
        NexthopHandle(self)
    }

    /// IPv4 routes of the main table: `ip route`.
    pub fn route(&mut self) -> RouteHandle<'_> {
        RouteHandle(self)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        if self.seq == 0 {
            self.seq = 1;
        }
        self.seq
    }

    /// Applies `changes` in order, batched into few `sendmsg` calls. Returns
    /// the failures as `(index into changes, error)`; the other changes took
    /// effect. An `Err` means the transport failed and the outcome of the
    /// unacknowledged part is unknown.
    pub fn apply(&mut self, changes: &[Change]) -> Result<Vec<(usize, NetlinkError)>, NetlinkError> {
        let mut failures = Vec::new();
        let mut next = 0;
        while next < changes.len() {
            let chunk_start = next;
            self.tx.clear();
            let first_seq = self.seq.wrapping_add(1);
            let mut last_msg = 0;
            while next < changes.len() && (next == chunk_start || self.tx.len() < CHUNK_BYTES) {
                let seq = self.next_seq();
                last_msg = self.tx.len();
                changes[next].encode(&mut self.tx, seq);
                next += 1;
            }
            // Only the last message asks for a success ack; failures are
            // acked regardless, so one ack closes the whole chunk.
            let flags = wire::u16_at(&self.tx.buf, last_msg + 6) | wire::NLM_F_ACK;
            self.tx.buf[last_msg + 6..last_msg + 8].copy_from_slice(&flags.to_ne_bytes());
            let last_seq = self.seq;
            self.socket.send(&self.tx.buf, 0).map_err(NetlinkError::Send)?;
            self.collect_acks(
                first_seq,
                last_seq,
                |seq| {
                    let index = chunk_start + seq.wrapping_sub(first_seq) as usize;
                    changes.get(index).map(|c| (index, c.to_string()))
                },
                &mut failures,
            )?;
        }
        Ok(failures)
    }

    fn collect_acks(
        &mut self,
        first_seq: u32,
        last_seq: u32,
        describe: impl Fn(u32) -> Option<(usize, String)>,
        failures: &mut Vec<(usize, NetlinkError)>,
    ) -> Result<(), NetlinkError> {
        let in_chunk = |seq: u32| seq.wrapping_sub(first_seq) <= last_seq.wrapping_sub(first_seq);
        loop {
            self.recv()?;
            let mut done = false;
            for msg in Messages::new(&self.rx) {
                let msg = msg?;
                if msg.msg_type != wire::NLMSG_ERROR || !in_chunk(msg.seq) {
                    continue;
                }
                let (errno, detail) = parse_error(&msg);
                if errno != 0 {
                    if let Some((index, request)) = describe(msg.seq) {
                        failures.push((index, NetlinkError::Refused { request, errno, detail }));
                    }
                }
                if msg.seq == last_seq {
                    done = true;
                }
            }
            if done {
                return Ok(());
            }
        }
    }

    fn recv(&mut self) -> Result<(), NetlinkError> {
        self.rx.clear();
        if self.rx.capacity() < RECV_BYTES {
            self.rx.reserve(RECV_BYTES);
        }
        loop {
            match self.socket.recv(&mut self.rx, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NetlinkError::Receive(e)),
            }
        }
    }

    /// Sends one request that the kernel answers with a single message (a
    /// `GET` without dump) and hands that message to `parse`. `Ok(None)` when
    /// the kernel answered with an error for which `absent` is true.
    fn get<T>(
        &mut self,
        what: &str,
        encode: impl FnOnce(&mut Writer, u32),
        absent: impl Fn(i32) -> bool,
        parse: impl Fn(&Message<'_>) -> Result<Option<T>, NetlinkError>,
    ) -> Result<Option<T>, NetlinkError> {
        let seq = self.next_seq();
        self.tx.clear();
        encode(&mut self.tx, seq);
        self.socket.send(&self.tx.buf, 0).map_err(NetlinkError::Send)?;
        loop {
            self.recv()?;
            for msg in Messages::new(&self.rx) {
                let msg = msg?;
                if msg.seq != seq {
                    continue;
                }
                if msg.msg_type == wire::NLMSG_ERROR {
                    let (errno, detail) = parse_error(&msg);
                    if absent(errno) {
                        return Ok(None);
                    }
                    return Err(NetlinkError::Refused { request: what.to_string(), errno, detail });
                }
                return parse(&msg);
            }
        }
    }

    /// Runs a dump request and collects what `parse` makes of each answer
    /// message. Starts over when the kernel flags the dump as interrupted, so
    /// the result is one consistent view.
    fn dump<T>(
        &mut self,
        what: &'static str,
        encode: impl Fn(&mut Writer, u32),
        parse: impl Fn(&Message<'_>) -> Result<Option<T>, NetlinkError>,
    ) -> Result<Vec<T>, NetlinkError> {
        let mut found = Vec::new();
        for _attempt in 0..5 {
            found.clear();
            let seq = self.next_seq();
            self.tx.clear();
            encode(&mut self.tx, seq);
            self.socket.send(&self.tx.buf, 0).map_err(NetlinkError::Send)?;
            let mut interrupted = false;
            'recv: loop {
                self.recv()?;
                for msg in Messages::new(&self.rx) {
                    let msg = msg?;
                    if msg.seq != seq {
                        continue;
                    }
                    interrupted |= msg.flags & wire::NLM_F_DUMP_INTR != 0;
                    match msg.msg_type {
                        wire::NLMSG_DONE => break 'recv,
                        wire::NLMSG_ERROR => {
                            let (errno, detail) = parse_error(&msg);
                            return Err(NetlinkError::Refused { request: format!("dump {what}"), errno, detail });
                        }
                        _ => found.extend(parse(&msg)?),
                    }
                }
            }
            if !interrupted {
                return Ok(found);
            }
        }
        Err(NetlinkError::DumpInterrupted(what))
    }
}

/// Splits an `NLMSG_ERROR` payload into the positive errno (0 = success ack)
/// and the extended-ack message, if any.
fn parse_error(msg: &Message<'_>) -> (i32, Option<String>) {
    let errno = -wire::i32_at(msg.payload, 0);
    if msg.flags & wire::NLM_F_ACK_TLVS == 0 {
        return (errno, None);
    }
    let original_len = wire::u32_at(msg.payload, 4) as usize;
    let skip = if msg.flags & wire::NLM_F_CAPPED != 0 { wire::NLMSG_HDRLEN } else { wire::align(original_len) };
    let detail = msg
        .payload
        .get(4 + skip..)
        .and_then(|tlvs| wire::Attrs::new(tlvs).find(|(t, _)| *t == wire::NLMSGERR_ATTR_MSG))
        .map(|(_, text)| wire::string(text));
    (errno, detail)
}
