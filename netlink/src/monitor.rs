//! Kernel change notifications (`ip monitor link neigh route nexthop address`).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use ipnet::Ipv4Net;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

use super::wire::{self, Attrs, Messages};
use super::{EthAddr, NetlinkError};

/// Something changed in the kernel's networking state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A link appeared, changed or vanished (`deleted`).
    Link {
        /// Interface index.
        index: u32,
        /// Interface name, when the message carried it.
        name: Option<String>,
        /// `RTM_DELLINK`.
        deleted: bool,
    },
    /// An address on `index` changed.
    Address {
        /// Interface index.
        index: u32,
    },
    /// An IPv4 neighbour on `ifindex` changed (`ip neigh`).
    Neighbour {
        /// Interface index.
        ifindex: u32,
        /// The neighbour's address, when the message carried it.
        ip: Option<Ipv4Addr>,
    },
    /// A forwarding entry on `ifindex` changed (`bridge fdb`), or a
    /// neighbour of another family.
    Fdb {
        /// Interface index.
        ifindex: u32,
        /// The entry's link-layer address, when the message carried it.
        mac: Option<EthAddr>,
    },
    /// A route changed.
    Route {
        /// Output interface, if the message names one.
        oif: Option<u32>,
        /// Destination (`0.0.0.0/0` for the default route), when the message
        /// is an IPv4 route.
        dst: Option<Ipv4Net>,
    },
    /// A nexthop object changed.
    Nexthop {
        /// Its id, when the message carried it.
        id: Option<u32>,
    },
    /// The kernel dropped notifications (our queue overflowed): state may
    /// have changed in ways no event describes.
    Overflow,
}

/// A socket subscribed to link, address, neighbour, route and nexthop
/// notifications in the creating thread's network namespace.
pub struct Monitor {
    socket: Socket,
    rx: Vec<u8>,
}

impl Monitor {
    /// Subscribes in the calling thread's network namespace.
    pub fn new() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        for group in [
            wire::RTNLGRP_LINK,
            wire::RTNLGRP_NEIGH,
            wire::RTNLGRP_IPV4_IFADDR,
            wire::RTNLGRP_IPV4_ROUTE,
            wire::RTNLGRP_NEXTHOP,
        ] {
            socket.add_membership(group).map_err(NetlinkError::Socket)?;
        }
        socket.set_rx_buf_sz(4 * 1024 * 1024).map_err(NetlinkError::Socket)?;
        socket.set_non_blocking(true).map_err(NetlinkError::Socket)?;
        Ok(Self { socket, rx: Vec::with_capacity(64 * 1024) })
    }

    /// Waits up to `timeout` for notifications and returns every one queued
    /// by then (empty on timeout).
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<Event>, NetlinkError> {
        self.wait_or_wake(timeout, None)
    }

    /// Like [`Monitor::wait`], but also returns (possibly with no events)
    /// as soon as `wake` becomes readable, so a thread can sleep on kernel
    /// events and its command queue at once.
    pub fn wait_or_wake(
        &mut self,
        timeout: Duration,
        wake: Option<BorrowedFd<'_>>,
    ) -> Result<Vec<Event>, NetlinkError> {
        let mut events = Vec::new();
        if !self.poll(timeout, wake)? {
            return Ok(events);
        }
        loop {
            self.rx.clear();
            match self.socket.recv(&mut self.rx, 0) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(events),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    events.push(Event::Overflow);
                    continue;
                }
                Err(e) => return Err(NetlinkError::Receive(e)),
            }
            for msg in Messages::new(&self.rx) {
                let msg = msg?;
                let p = msg.payload;
                let event = match msg.msg_type {
                    wire::RTM_NEWLINK | wire::RTM_DELLINK => Event::Link {
                        index: wire::u32_at(p, 4),
                        name: p
                            .get(16..)
                            .and_then(|a| Attrs::new(a).find(|(t, _)| *t == wire::IFLA_IFNAME))
                            .map(|(_, n)| wire::string(n)),
                        deleted: msg.msg_type == wire::RTM_DELLINK,
                    },
                    wire::RTM_NEWADDR | wire::RTM_DELADDR => Event::Address { index: wire::u32_at(p, 4) },
                    wire::RTM_NEWNEIGH | wire::RTM_DELNEIGH => neighbour_event(p),
                    wire::RTM_NEWROUTE | wire::RTM_DELROUTE => route_event(p),
                    wire::RTM_NEWNEXTHOP | wire::RTM_DELNEXTHOP => Event::Nexthop {
                        id: p
                            .get(8..)
                            .and_then(|a| Attrs::new(a).find(|(t, _)| *t == wire::NHA_ID))
                            .map(|(_, v)| wire::u32_at(v, 0)),
                    },
                    _ => continue,
                };
                events.push(event);
            }
        }
    }

    /// True when the netlink socket is readable.
    fn poll(&self, timeout: Duration, wake: Option<BorrowedFd<'_>>) -> Result<bool, NetlinkError> {
        let mut fds = [
            libc::pollfd { fd: self.socket.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake.map_or(-1, |fd| fd.as_raw_fd()), events: libc::POLLIN, revents: 0 },
        ];
        let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is an array of two initialised pollfds that outlives
        // the call and nfds matches its length; poll ignores a negative fd.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
        match ready {
            n if n > 0 => Ok(fds[0].revents & libc::POLLIN != 0),
            0 => Ok(false),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(NetlinkError::Receive(e))
                }
            }
        }
    }
}

/// `ndmsg` (12 bytes: family, pads, ifindex, state, flags, type), then
/// `NDA_*` attributes.
fn neighbour_event(p: &[u8]) -> Event {
    let ifindex = wire::u32_at(p, 4);
    let attrs = || Attrs::new(p.get(12..).unwrap_or_default());
    if p.first() == Some(&wire::AF_INET) {
        let ip = attrs().find(|(t, _)| *t == wire::NDA_DST).and_then(|(_, v)| wire::ipv4(v));
        Event::Neighbour { ifindex, ip }
    } else {
        let mac = attrs().find(|(t, _)| *t == wire::NDA_LLADDR).and_then(|(_, v)| wire::mac(v));
        Event::Fdb { ifindex, mac }
    }
}

/// `rtmsg` (12 bytes: family, dst_len, …), then `RTA_*` attributes.
fn route_event(p: &[u8]) -> Event {
    let attrs = || Attrs::new(p.get(12..).unwrap_or_default());
    let oif = attrs().find(|(t, _)| *t == wire::RTA_OIF).map(|(_, v)| wire::u32_at(v, 0));
    let dst = match (p.first(), p.get(1)) {
        (Some(&wire::AF_INET), Some(&len)) => {
            let addr = attrs().find(|(t, _)| *t == wire::RTA_DST).and_then(|(_, v)| wire::ipv4(v));
            Ipv4Net::new(addr.unwrap_or(Ipv4Addr::UNSPECIFIED), len).ok()
        }
        _ => None,
    };
    Event::Route { oif, dst }
}
