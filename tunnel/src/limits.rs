//! Bounds on the tunnel server's doors: how long a client may take to
//! finish its TLS handshake and its request head, how many connections a
//! door holds (in all and per source address), how many streams one agent
//! link carries, and how long the server waits for an agent to answer a
//! stream open.
//!
//! A connection over a cap is closed at once, before any TLS or HTTP work,
//! and counted by door and reason: refusing is cheaper than serving, so a
//! flood from one address costs the others nothing but accept calls.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The server's bounds; [`Limits::default`] are the CLI's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time for a client to complete its TLS handshake (agents door, CONNECT door).
    pub handshake_timeout: Duration,
    /// Time for a client to send a complete request head (CONNECT and HTTP
    /// doors), also between requests of a kept-alive connection.
    pub header_timeout: Duration,
    /// Connections one door holds at once.
    pub max_connections_per_door: usize,
    /// Connections one source address holds on one door at once.
    pub max_connections_per_source: usize,
    /// Tunnelled connections one agent link carries at once.
    pub max_streams_per_agent: usize,
    /// Time for an agent to accept or refuse a stream open (it dials its
    /// node within that time, or says why not).
    pub open_timeout: Duration,
}

/// Default of [`Limits::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`Limits::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`Limits::max_connections_per_door`].
pub const DEFAULT_MAX_CONNECTIONS_PER_DOOR: usize = 16_384;
/// Default of [`Limits::max_connections_per_source`]: one kube-apiserver
/// carries every `kubectl logs -f`, `exec` and port-forward of the cluster
/// through one source address, so this is generous; a stranger's flood is
/// bounded by it all the same.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 4_096;
/// Default of [`Limits::max_streams_per_agent`] (the agent itself accepts
/// up to [`super::transport::MAX_STREAMS`]).
pub const DEFAULT_MAX_STREAMS_PER_AGENT: usize = 2_048;
/// Default of [`Limits::open_timeout`]: longer than the agent's own dial
/// timeout, so an agent that can answer does, with its reason.
pub const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections_per_door: DEFAULT_MAX_CONNECTIONS_PER_DOOR,
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            max_streams_per_agent: DEFAULT_MAX_STREAMS_PER_AGENT,
            open_timeout: DEFAULT_OPEN_TIMEOUT,
        }
    }
}

/// The server's listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Door {
    /// Where agents link in (10262).
    Agents,
    /// HTTP CONNECT on TLS (10265).
    Connect,
    /// DNAT'd byte streams (10263).
    Dnat,
    /// DNAT'd plain HTTP, and plain HTTP by `Host` for named sources (10264).
    Http,
}

impl Door {
    /// Every door, in metrics order.
    pub const ALL: [Door; 4] = [Door::Agents, Door::Connect, Door::Dnat, Door::Http];

    /// The door's name in logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Door::Agents => "agents",
            Door::Connect => "connect",
            Door::Dnat => "dnat",
            Door::Http => "http",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a door turned a connection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The door holds its maximum.
    DoorFull,
    /// The source address holds its maximum on this door.
    SourceFull,
    /// No TLS handshake within the timeout.
    HandshakeTimeout,
    /// The TLS handshake failed (no or a foreign certificate, protocol).
    Handshake,
    /// The client's certificate names no identity this door admits.
    Identity,
    /// Plain HTTP by `Host` from a source not named for it.
    HostRouting,
    /// A DNAT door connection the DNAT did not redirect.
    NotRedirected,
}

impl Refusal {
    /// Every reason, in metrics order.
    pub const ALL: [Refusal; 7] = [
        Refusal::DoorFull,
        Refusal::SourceFull,
        Refusal::HandshakeTimeout,
        Refusal::Handshake,
        Refusal::Identity,
        Refusal::HostRouting,
        Refusal::NotRedirected,
    ];

    /// The reason's name in logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::DoorFull => "door_full",
            Refusal::SourceFull => "source_full",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::Handshake => "handshake",
            Refusal::Identity => "identity",
            Refusal::HostRouting => "host_routing",
            Refusal::NotRedirected => "not_redirected",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Refusals by door and reason, and connections held by door.
#[derive(Debug, Default)]
pub struct DoorMetrics {
    refused: [[AtomicU64; Refusal::ALL.len()]; Door::ALL.len()],
    open: [AtomicU64; Door::ALL.len()],
}

impl DoorMetrics {
    /// Counts one refusal.
    pub fn refuse(&self, door: Door, why: Refusal) {
        self.refused[door.index()][why.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals so far.
    pub fn refused(&self, door: Door, why: Refusal) -> u64 {
        self.refused[door.index()][why.index()].load(Ordering::Relaxed)
    }

    /// Connections the door holds now.
    pub fn open(&self, door: Door) -> u64 {
        self.open[door.index()].load(Ordering::Relaxed)
    }
}

/// One door's admission: the connection caps of [`Limits`].
#[derive(Debug)]
pub struct Gate {
    door: Door,
    max_total: usize,
    max_per_source: usize,
    held: Mutex<Held>,
    metrics: Arc<DoorMetrics>,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// A connection admitted by a [`Gate`]; its place is given back on drop.
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<Gate>,
    source: IpAddr,
}

impl Gate {
    /// The gate of `door` under `limits`, counting into `metrics`.
    pub fn new(door: Door, limits: &Limits, metrics: Arc<DoorMetrics>) -> Arc<Self> {
        Arc::new(Self {
            door,
            max_total: limits.max_connections_per_door,
            max_per_source: limits.max_connections_per_source,
            held: Mutex::default(),
            metrics,
        })
    }

    /// The door this gate guards.
    pub fn door(&self) -> Door {
        self.door
    }

    /// Admits a connection from `source`, or counts and returns why not.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Ticket, Refusal> {
        let source = canonical(source);
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let refusal = if held.total >= self.max_total {
            Some(Refusal::DoorFull)
        } else if held.by_source.get(&source).copied().unwrap_or(0) >= self.max_per_source {
            Some(Refusal::SourceFull)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            drop(held);
            self.metrics.refuse(self.door, refusal);
            return Err(refusal);
        }
        held.total += 1;
        *held.by_source.entry(source).or_default() += 1;
        self.metrics.open[self.door.index()].fetch_add(1, Ordering::Relaxed);
        Ok(Ticket { gate: self.clone(), source })
    }

    /// Counts a refusal at this door after admission (handshake, identity…).
    pub fn refuse(&self, why: Refusal) {
        self.metrics.refuse(self.door, why);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut held = self.gate.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.total = held.total.saturating_sub(1);
        if let Some(count) = held.by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                held.by_source.remove(&self.source);
            }
        }
        self.gate.metrics.open[self.gate.door.index()].fetch_sub(1, Ordering::Relaxed);
    }
}

/// An IPv4-mapped IPv6 source counts as its IPv4 address (a dual-stack
/// listener sees both forms of one client).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Accepts from `listener` (one of `door`'s) forever: `admit` decides on
/// each connection before any work is done for it (a cap, usually
/// [`Gate::admit`]), and an admitted one goes to `serve` on its own task
/// with what `admit` gave (its [`Ticket`], say); a refused one is closed at
/// once. An accept error (no file descriptors left, say) pauses the loop
/// briefly instead of spinning on it.
pub async fn accept_loop<T, A, F, Fut>(listener: tokio::net::TcpListener, door: Door, admit: A, serve: F)
where
    A: Fn(&tokio::net::TcpStream, std::net::SocketAddr) -> Result<T, Refusal>,
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr, T) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut warned = false;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => {
                warned = false;
                accepted
            }
            Err(err) => {
                if !warned {
                    tracing::warn!("{} door: accept failed: {err}; pausing accepts for 100 ms", door.name());
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match admit(&tcp, peer) {
            Ok(admitted) => {
                tokio::spawn(serve(tcp, peer, admitted));
            }
            Err(why) => tracing::debug!("{} door: connection from {peer} refused: {}", door.name(), why.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn gate(total: usize, per_source: usize) -> (Arc<Gate>, Arc<DoorMetrics>) {
        let limits =
            Limits { max_connections_per_door: total, max_connections_per_source: per_source, ..Limits::default() };
        let metrics = Arc::new(DoorMetrics::default());
        (Gate::new(Door::Http, &limits, metrics.clone()), metrics)
    }

    #[test]
    fn caps_per_source_and_per_door_and_places_come_back() {
        let (gate, metrics) = gate(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = gate.admit(a).unwrap();
        let _second = gate.admit("::ffff:10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(gate.admit(a).unwrap_err(), Refusal::SourceFull, "a mapped address is the same source");
        let _third = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).unwrap_err(), Refusal::DoorFull);
        assert_eq!(metrics.open(Door::Http), 3);
        drop(first);
        assert_eq!(metrics.open(Door::Http), 2);
        let _again = gate.admit(a).unwrap();
        assert_eq!(metrics.refused(Door::Http, Refusal::SourceFull), 1);
        assert_eq!(metrics.refused(Door::Http, Refusal::DoorFull), 1);
        assert_eq!(metrics.refused(Door::Agents, Refusal::DoorFull), 0);
    }
}
