//! `netd-mux/1`: a lighter link protocol than HTTP/2 for the same job, many
//! tunnelled TCP connections over one TLS connection per agent.
//!
//! Why: counted per small request (`cargo xtask instructions release`,
//! `tunnel-request`), HTTP/2's multiplexing is at least 41 % of what a
//! tunnelled request costs. Every message crosses from the stream's task to
//! the connection's task (h2's lock, a wake-up, a prioritiser pass) and
//! back on the other side. Here a stream's task encodes its frame and
//! writes it to the link itself; only the reading side hands bytes over,
//! from the one task that reads the link to the stream's reader. The link's
//! task writes only what a full socket pushed back.
//!
//! Wire format: every frame is a 12-byte header and a payload.
//!
//! ```text
//! 0        1        2                4                8               12
//! +--------+--------+----------------+----------------+----------------+
//! |  kind  | flags  | reserved (0)   | stream id (BE) | length (BE)    |
//! +--------+--------+----------------+----------------+----------------+
//! ```
//!
//! | kind | stream | payload |
//! | --- | --- | --- |
//! | 0 DATA (flag 0x01 FIN: the sender's half is closed) | ≠ 0 | bytes, ≤ [`MAX_DATA`] |
//! | 1 CREDIT | ≠ 0 | u32: bytes the receiver took since its last credit |
//! | 2 OPEN (opener only, ids 1, 2, 3, … in order) | ≠ 0 | the target, `ip:port`, UTF-8 |
//! | 3 REPLY (acceptor only) | ≠ 0 | u16 status (200: open), then a UTF-8 reason |
//! | 4 RESET | ≠ 0 | u32 reason code |
//! | 5 PING, 6 PONG | 0 | 8 opaque bytes, echoed |
//! | 7 GOAWAY | 0 | u32 reason code: open no more streams |
//!
//! Flow control is per stream only, as with [`crate::transport`]'s HTTP/2
//! settings (whose connection window is unlimited): each direction of a
//! stream starts with [`STREAM_WINDOW`] bytes of credit, and the receiver
//! returns credit only as its local end takes the bytes, so a reader that
//! stops stalls its own stream and nothing else. A peer that sends beyond
//! its credit, or any frame this module cannot parse, ends the link with
//! an error that names the frame.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use crate::transport::STREAM_WINDOW;

/// The protocol's ALPN name.
pub const ALPN: &[u8] = b"netd-mux/1";
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;
/// Largest DATA payload either side sends or accepts.
pub const MAX_DATA: u32 = 1 << 20;
/// Largest OPEN or REPLY payload (a target or a refusal reason).
pub const MAX_CONTROL: u32 = 16 << 10;
/// Reply status of an opened stream.
pub const STATUS_OPEN: u16 = 200;
/// Reply status when the acceptor holds [`Config::max_streams`] already.
pub const STATUS_TOO_MANY: u16 = 503;
/// Received bytes are credited back in batches of this much: one CREDIT
/// frame per 64 KiB taken, none per small message.
const CREDIT_BATCH: u32 = 64 << 10;
/// Encoded frames a full socket may hold back before writers wait.
const OUT_LIMIT: usize = 256 << 10;
/// Bytes waiting to go to the peer beyond which a peer that keeps sending
/// frames that need an answer (PING, OPEN) and does not read loses its
/// link, as HTTP/2 servers bound a ping flood's answers. Writers stop at
/// [`OUT_LIMIT`] (plus the one frame that crossed it), so only owed
/// answers go past it.
const OWED_LIMIT: usize = OUT_LIMIT + MAX_DATA as usize + (1 << 20);
/// A stream holding more received frames than this, unread, has them
/// copied into one buffer: each frame is a slice of one of the link's
/// 64 KiB reads and keeps it alive, so a peer sending tiny frames could
/// otherwise make a stream hold far more memory than its window. A reader
/// that keeps up never gets there.
const MAX_QUEUED_FRAMES: usize = 64;

/// Each read of the link asks for at least this much room.
const READ_CHUNK: usize = 64 << 10;
/// The first read of a burst, into the stack (see `poll_read_first`).
const FIRST_READ: usize = 16 << 10;
/// RESET code of a stream dropped before both halves closed.
pub const RESET_CANCEL: u32 = 8;
/// DATA's only flag.
const FLAG_FIN: u8 = 0x01;

/// A frame's kind (the first header byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Stream bytes.
    Data = 0,
    /// Receive credit returned.
    Credit = 1,
    /// A new stream to a target.
    Open = 2,
    /// The acceptor's answer to an OPEN.
    Reply = 3,
    /// A stream aborted.
    Reset = 4,
    /// Liveness probe.
    Ping = 5,
    /// A probe's echo.
    Pong = 6,
    /// The sender opens or accepts no more streams.
    GoAway = 7,
}

impl Kind {
    fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            0 => Self::Data,
            1 => Self::Credit,
            2 => Self::Open,
            3 => Self::Reply,
            4 => Self::Reset,
            5 => Self::Ping,
            6 => Self::Pong,
            7 => Self::GoAway,
            _ => return None,
        })
    }

    /// PING, PONG and GOAWAY are about the link (stream 0); the rest name a stream.
    fn is_link_frame(self) -> bool {
        matches!(self, Self::Ping | Self::Pong | Self::GoAway)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame is.
    pub kind: Kind,
    /// DATA only: the sender's half of the stream ends with this frame.
    pub fin: bool,
    /// The stream (0 for link frames).
    pub stream: u32,
    /// Payload bytes after the header.
    pub len: u32,
}

impl Header {
    /// Appends the header's 12 bytes to `out`.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u8(self.kind as u8);
        out.put_u8(if self.fin { FLAG_FIN } else { 0 });
        out.put_u16(0);
        out.put_u32(self.stream);
        out.put_u32(self.len);
    }

    /// Parses and checks a header: kind, flags, reserved bits, the stream
    /// a kind needs and the payload length it allows.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, MuxError> {
        let kind = Kind::from_u8(bytes[0]).ok_or(MuxError::UnknownKind(bytes[0]))?;
        let flags = bytes[1];
        if flags & !FLAG_FIN != 0 || (flags != 0 && kind != Kind::Data) {
            return Err(MuxError::BadFlags { kind, flags });
        }
        let reserved = u16::from_be_bytes([bytes[2], bytes[3]]);
        if reserved != 0 {
            return Err(MuxError::Reserved(reserved));
        }
        let stream = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let len = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if kind.is_link_frame() != (stream == 0) {
            let why = if stream == 0 { "a stream frame on stream 0" } else { "a link frame on a stream" };
            return Err(MuxError::BadStream { kind, stream, why });
        }
        let (fits, expected) = match kind {
            Kind::Data => (len <= MAX_DATA, "at most 1 MiB"),
            Kind::Credit | Kind::Reset | Kind::GoAway => (len == 4, "exactly 4"),
            Kind::Ping | Kind::Pong => (len == 8, "exactly 8"),
            Kind::Open => ((1..=MAX_CONTROL).contains(&len), "1 to 16 KiB"),
            Kind::Reply => ((2..=MAX_CONTROL).contains(&len), "2 to 16 KiB"),
        };
        if !fits {
            return Err(MuxError::BadLength { kind, len, expected });
        }
        Ok(Self { kind, fin: flags & FLAG_FIN != 0, stream, len })
    }
}

/// What went wrong on a link or a stream.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// The first header byte names no frame kind.
    #[error("frame kind {0} is not a netd-mux/1 frame")]
    UnknownKind(u8),
    /// Flags other than DATA's FIN.
    #[error("{kind:?} frame with flags {flags:#04x}: only DATA carries a flag (FIN, 0x01)")]
    BadFlags {
        /// The frame's kind.
        kind: Kind,
        /// Its flags byte.
        flags: u8,
    },
    /// The header's reserved bytes were not zero.
    #[error("frame header's reserved bytes are {0:#06x}, not zero")]
    Reserved(u16),
    /// A payload length the kind does not allow.
    #[error("{kind:?} frame of {len} bytes: its payload is {expected}")]
    BadLength {
        /// The frame's kind.
        kind: Kind,
        /// The length it declared.
        len: u32,
        /// What that kind allows.
        expected: &'static str,
    },
    /// A frame on a stream it cannot be on.
    #[error("{kind:?} frame on stream {stream}: {why}")]
    BadStream {
        /// The frame's kind.
        kind: Kind,
        /// The stream it named.
        stream: u32,
        /// Why that is wrong.
        why: &'static str,
    },
    /// DATA beyond the credit the receiver gave.
    #[error("stream {stream} sent {len} bytes with {allowed} bytes of credit left")]
    WindowExceeded {
        /// The stream.
        stream: u32,
        /// The DATA frame's length.
        len: u32,
        /// Credit it had.
        allowed: u32,
    },
    /// CREDIT that takes a stream's window past 2^31 - 1 bytes.
    #[error("stream {stream}: credit of {credit} bytes exceeds 2^31 - 1")]
    CreditOverflow {
        /// The stream.
        stream: u32,
        /// The credit it would have.
        credit: u64,
    },
    /// An OPEN target or REPLY reason that is not UTF-8.
    #[error("{kind:?} frame on stream {stream}: its text is not UTF-8")]
    NotUtf8 {
        /// The frame's kind.
        kind: Kind,
        /// The stream.
        stream: u32,
    },
    /// The link has ended; the text says why.
    #[error("the link is closed: {0}")]
    Closed(String),
    /// The peer sent GOAWAY: no new streams on this link.
    #[error("the peer is going away: no new streams on this link")]
    GoingAway,
    /// Only the opener (the cloud side) opens streams.
    #[error("this side of the link accepts streams; the other side opens them")]
    NotOpener,
    /// Stream ids ran out (2^32 - 1 streams on one link).
    #[error("no stream ids left on this link")]
    IdsExhausted,
    /// The acceptor refused the stream.
    #[error("{target} refused: {status} {reason}")]
    Refused {
        /// What the OPEN asked for.
        target: String,
        /// The REPLY's status.
        status: u16,
        /// The REPLY's reason.
        reason: String,
    },
    /// The peer sends and does not read: what the link owes it passed 2.25 MiB.
    #[error("the peer does not read: {0} bytes of frames owed to it are waiting")]
    PeerNotReading(usize),
    /// The link ended in the middle of a frame.
    #[error("the link ended inside a frame ({0} bytes of it received)")]
    Truncated(usize),
    /// No PONG within the timeout.
    #[error("no answer to a ping within {0:?}: the link is dead")]
    PingTimeout(Duration),
    /// The link's I/O failed.
    #[error("link I/O: {0}")]
    Io(#[from] io::Error),
}

/// Which end of the link this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opens streams (the tunnel server, in the cloud).
    Opener,
    /// Accepts or refuses them (the agent, at the edge).
    Acceptor,
}

/// A link's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Streams the acceptor holds at once; an OPEN beyond is refused with
    /// [`STATUS_TOO_MANY`].
    pub max_streams: usize,
    /// Ping interval (`None`: no pings). A link is dead after
    /// [`Config::ping_timeout`] without a pong.
    pub ping_interval: Option<Duration>,
    /// See [`Config::ping_interval`].
    pub ping_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_streams: crate::transport::MAX_STREAMS as usize,
            ping_interval: Some(crate::transport::PING_INTERVAL),
            ping_timeout: crate::transport::PING_TIMEOUT,
        }
    }
}

/// The byte stream a link runs over (TLS, or any pipe in tests).
trait LinkIo: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> LinkIo for T {}

/// Hashes stream ids with one multiplication. Ids are sequential and
/// checked in order (an OPEN out of order ends the link), so a peer cannot
/// pick colliding keys; SipHash's flooding defence was 4 % of a small
/// request's instructions.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 << 8 | u64::from(*byte)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, id: u32) {
        // Fibonacci hashing: spreads consecutive ids over the high bits,
        // which hashbrown's control bytes use, as well as the low ones.
        self.0 = u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type Streams = HashMap<u32, Slot, std::hash::BuildHasherDefault<IdHasher>>;

/// One stream's state on its link.
struct Slot {
    /// Received bytes not yet taken.
    received: VecDeque<Bytes>,
    /// The peer closed its half.
    received_fin: bool,
    /// Either side reset the stream.
    reset: bool,
    /// What the peer may still send before more credit.
    peer_credit: u32,
    /// Bytes taken since the last CREDIT.
    untold: u32,
    /// What this side may still send.
    credit: u32,
    /// This side closed its half.
    sent_fin: bool,
    /// Opener: the REPLY, once it came (until the open takes it).
    reply: Option<(u16, String)>,
    /// Opener: a REPLY came (a second one is a protocol error).
    replied: bool,
    /// The task waiting to read (or for the reply).
    reader: Option<Waker>,
    /// The task waiting for credit.
    writer: Option<Waker>,
}

impl Slot {
    fn new() -> Self {
        Self {
            received: VecDeque::new(),
            received_fin: false,
            reset: false,
            peer_credit: STREAM_WINDOW,
            untold: 0,
            credit: STREAM_WINDOW,
            sent_fin: false,
            reply: None,
            replied: false,
            reader: None,
            writer: None,
        }
    }

    fn wake(&mut self) {
        wake(&mut self.reader);
        wake(&mut self.writer);
    }
}

fn wake(waker: &mut Option<Waker>) {
    if let Some(waker) = waker.take() {
        waker.wake();
    }
}

fn remember(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// An OPEN the acceptor has not answered yet.
struct Offer {
    id: u32,
    target: String,
}

/// Everything about a link, behind one lock: the I/O, the frames not yet
/// written, and the streams.
struct Inner {
    io: Pin<Box<dyn LinkIo>>,
    role: Role,
    config: Config,
    /// Read from the link, not yet parsed.
    read_buf: BytesMut,
    /// Encoded frames; those before `out_start` are written.
    out: Vec<u8>,
    out_start: usize,
    /// The last write or flush of the link was pushed back: bytes may wait
    /// inside the I/O (rustls takes plaintext before the socket has room).
    unflushed: bool,
    streams: Streams,
    /// Opener: the next stream id. Acceptor: one above the highest opened.
    /// Wider than an id, so that it can pass the last one.
    next_id: u64,
    offers: VecDeque<Offer>,
    acceptor: Option<Waker>,
    /// The link's task.
    driver: Option<Waker>,
    /// Writers waiting for `out` to drain.
    write_waiters: Vec<Waker>,
    /// Why the link ended, once it has.
    closed: Option<String>,
    /// The peer sent GOAWAY.
    peer_going_away: bool,
    /// This side sent GOAWAY.
    going_away: bool,
    /// The last ping sent and not yet answered.
    ping_outstanding: Option<(u64, tokio::time::Instant)>,
    pings_sent: u64,
}

impl Inner {
    fn queue(&mut self, header: Header, payload: &[u8]) {
        self.out.reserve(HEADER_LEN + payload.len());
        header.encode(&mut self.out);
        self.out.extend_from_slice(payload);
    }

    /// Encoded bytes not yet written to the link.
    fn unsent(&self) -> usize {
        self.out.len() - self.out_start
    }

    fn queue_u32(&mut self, kind: Kind, stream: u32, value: u32) {
        self.queue(Header { kind, fin: false, stream, len: 4 }, &value.to_be_bytes());
    }

    /// Writes what is queued and flushes the link.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_start < self.out.len() {
            match self.io.as_mut().poll_write(cx, &self.out[self.out_start..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.out_start += n,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    self.unflushed = true;
                    return Poll::Pending;
                }
            }
        }
        self.out.clear();
        self.out_start = 0;
        let flushed = self.io.as_mut().poll_flush(cx);
        self.unflushed = flushed.is_pending();
        flushed
    }

    /// A stream's task sends what it queued at once; what a full socket
    /// pushes back goes to the link's task, which waits for room (the
    /// stream's task may be gone by then).
    fn send_now(&mut self, cx: &mut Context<'_>) {
        match self.poll_write_out(cx) {
            Poll::Ready(Ok(())) => self.wake_write_waiters(),
            Poll::Ready(Err(err)) => self.fail(format!("writing to the link: {err}")),
            Poll::Pending => wake(&mut self.driver),
        }
    }

    fn wake_write_waiters(&mut self) {
        for waiter in self.write_waiters.drain(..) {
            waiter.wake();
        }
    }

    /// Frees the read and write buffers if nothing is in them: at each
    /// ping tick, so a busy link reuses its buffers (no allocation per
    /// message) and an idle one holds none (5 000 idle links would
    /// otherwise keep 64 KiB each to read into).
    fn release_idle_buffers(&mut self) {
        if self.read_buf.is_empty() {
            self.read_buf = BytesMut::new();
        }
        if self.unsent() == 0 && !self.unflushed {
            self.out = Vec::new();
            self.out_start = 0;
        }
    }

    /// Sends from outside any task (a drop): the link's task writes it.
    fn send_later(&mut self) {
        wake(&mut self.driver);
    }

    fn fail(&mut self, why: String) {
        if self.closed.is_none() {
            self.closed = Some(why);
        }
        for slot in self.streams.values_mut() {
            slot.wake();
        }
        wake(&mut self.acceptor);
        wake(&mut self.driver);
        self.wake_write_waiters();
    }

    fn closed_error(&self) -> Option<MuxError> {
        self.closed.as_ref().map(|why| MuxError::Closed(why.clone()))
    }

    /// Parses and handles every whole frame in `read_buf`.
    fn handle_frames(&mut self) -> Result<(), MuxError> {
        while self.read_buf.len() >= HEADER_LEN {
            let mut raw = [0_u8; HEADER_LEN];
            raw.copy_from_slice(&self.read_buf[..HEADER_LEN]);
            let header = Header::decode(&raw)?;
            // Lengths are checked by decode: at most 1 MiB.
            let len = header.len as usize;
            if self.read_buf.len() < HEADER_LEN + len {
                self.read_buf.reserve(HEADER_LEN + len - self.read_buf.len());
                return Ok(());
            }
            self.read_buf.advance(HEADER_LEN);
            let payload = self.read_buf.split_to(len).freeze();
            self.handle(header, payload)?;
            if self.unsent() > OWED_LIMIT {
                return Err(MuxError::PeerNotReading(self.unsent()));
            }
        }
        Ok(())
    }

    /// A stream frame for an id this side has no slot for: fine for a
    /// stream that existed (frames cross a RESET on the wire), an error for
    /// one that never did.
    fn unknown_stream(&self, header: Header) -> Result<(), MuxError> {
        if u64::from(header.stream) < self.next_id {
            Ok(())
        } else {
            Err(MuxError::BadStream { kind: header.kind, stream: header.stream, why: "no such stream was opened" })
        }
    }

    fn handle(&mut self, header: Header, payload: Bytes) -> Result<(), MuxError> {
        let id = header.stream;
        match header.kind {
            Kind::Data => {
                let Some(slot) = self.streams.get_mut(&id) else { return self.unknown_stream(header) };
                if slot.received_fin {
                    return Err(MuxError::BadStream { kind: Kind::Data, stream: id, why: "DATA after FIN" });
                }
                if header.len > slot.peer_credit {
                    return Err(MuxError::WindowExceeded { stream: id, len: header.len, allowed: slot.peer_credit });
                }
                slot.peer_credit -= header.len;
                if !slot.reset {
                    if !payload.is_empty() {
                        slot.received.push_back(payload);
                    }
                    if slot.received.len() > MAX_QUEUED_FRAMES {
                        let queued: usize = slot.received.iter().map(Bytes::len).sum();
                        let mut whole = BytesMut::with_capacity(queued);
                        for frame in slot.received.drain(..) {
                            whole.extend_from_slice(&frame);
                        }
                        slot.received.push_back(whole.freeze());
                    }
                    slot.received_fin = header.fin;
                    wake(&mut slot.reader);
                }
            }
            Kind::Credit => {
                let Some(slot) = self.streams.get_mut(&id) else { return self.unknown_stream(header) };
                let credit = u64::from(slot.credit) + u64::from(payload.clone().get_u32());
                slot.credit = u32::try_from(credit)
                    .ok()
                    .filter(|credit| *credit <= i32::MAX as u32)
                    .ok_or(MuxError::CreditOverflow { stream: id, credit })?;
                wake(&mut slot.writer);
            }
            Kind::Open => {
                if self.role != Role::Acceptor {
                    return Err(MuxError::BadStream {
                        kind: Kind::Open,
                        stream: id,
                        why: "the acceptor opens no streams",
                    });
                }
                if u64::from(id) != self.next_id {
                    return Err(MuxError::BadStream {
                        kind: Kind::Open,
                        stream: id,
                        why: "stream ids are opened in order",
                    });
                }
                self.next_id += 1;
                let target = String::from_utf8(payload.to_vec())
                    .map_err(|_| MuxError::NotUtf8 { kind: Kind::Open, stream: id })?;
                if self.going_away {
                    self.queue_reply(id, STATUS_TOO_MANY, "this side is going away");
                } else if self.streams.len() >= self.config.max_streams {
                    self.queue_reply(id, STATUS_TOO_MANY, "too many streams on this link");
                } else {
                    self.streams.insert(id, Slot::new());
                    self.offers.push_back(Offer { id, target });
                    wake(&mut self.acceptor);
                }
            }
            Kind::Reply => {
                if self.role != Role::Opener {
                    return Err(MuxError::BadStream {
                        kind: Kind::Reply,
                        stream: id,
                        why: "only the acceptor replies",
                    });
                }
                let Some(slot) = self.streams.get_mut(&id) else { return self.unknown_stream(header) };
                if slot.replied {
                    return Err(MuxError::BadStream { kind: Kind::Reply, stream: id, why: "a second REPLY" });
                }
                slot.replied = true;
                let mut payload = payload;
                let status = payload.get_u16();
                let reason = String::from_utf8(payload.to_vec())
                    .map_err(|_| MuxError::NotUtf8 { kind: Kind::Reply, stream: id })?;
                slot.reply = Some((status, reason));
                wake(&mut slot.reader);
            }
            Kind::Reset => {
                let Some(slot) = self.streams.get_mut(&id) else { return self.unknown_stream(header) };
                slot.reset = true;
                slot.received.clear();
                slot.wake();
            }
            Kind::Ping => {
                let mut echo = [0_u8; 8];
                echo.copy_from_slice(&payload);
                self.queue(Header { kind: Kind::Pong, fin: false, stream: 0, len: 8 }, &echo);
            }
            Kind::Pong => {
                if let Some((sent, _)) = self.ping_outstanding {
                    if payload.clone().get_u64() == sent {
                        self.ping_outstanding = None;
                    }
                }
            }
            Kind::GoAway => {
                self.peer_going_away = true;
                wake(&mut self.acceptor);
            }
        }
        Ok(())
    }

    fn queue_reply(&mut self, id: u32, status: u16, reason: &str) {
        let len = 2 + reason.len().min(MAX_CONTROL as usize - 2);
        let mut payload = Vec::with_capacity(len);
        payload.extend_from_slice(&status.to_be_bytes());
        payload.extend_from_slice(&reason.as_bytes()[..len - 2]);
        // A cut reason may end inside a character; the peer then reports
        // NotUtf8, so cut at a boundary.
        while std::str::from_utf8(&payload[2..]).is_err() {
            payload.pop();
        }
        self.queue(Header { kind: Kind::Reply, fin: false, stream: id, len: payload.len() as u32 }, &payload);
    }

    /// Reads the link and handles what arrived until it has nothing more.
    fn poll_read_link(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), MuxError>> {
        loop {
            self.handle_frames()?;
            let n = if self.read_buf.is_empty() && self.read_buf.capacity() < FIRST_READ {
                match self.poll_read_first(cx) {
                    Poll::Ready(result) => result?,
                    Poll::Pending => return Poll::Pending,
                }
            } else {
                if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 4 {
                    self.read_buf.reserve(READ_CHUNK);
                }
                let spare = self.read_buf.spare_capacity_mut();
                let n = match crate::transport::poll_read_spare(cx, &mut self.io, spare) {
                    Poll::Ready(result) => result?,
                    Poll::Pending => return Poll::Pending,
                };
                // SAFETY: poll_read_spare returns how many bytes at the start
                // of the spare capacity the reader initialised.
                unsafe { self.read_buf.set_len(self.read_buf.len() + n) };
                n
            };
            if n == 0 {
                return match self.read_buf.len() {
                    0 => Poll::Ready(Ok(())),
                    partial => Poll::Ready(Err(MuxError::Truncated(partial))),
                };
            }
        }
    }

    /// The first read after the buffer was freed goes to the stack, and
    /// only what arrived is kept: a ping's answer on an idle link does not
    /// bring back a whole read buffer. A full read starts a bulk one.
    fn poll_read_first(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut first = [std::mem::MaybeUninit::<u8>::uninit(); FIRST_READ];
        let mut buf = ReadBuf::uninit(&mut first);
        std::task::ready!(self.io.as_mut().poll_read(cx, &mut buf))?;
        let filled = buf.filled();
        if filled.len() == FIRST_READ {
            self.read_buf.reserve(READ_CHUNK);
        }
        self.read_buf.extend_from_slice(filled);
        Poll::Ready(Ok(filled.len()))
    }
}

/// The shared half of a link: handles, streams and the driver hold it.
struct Shared {
    inner: Mutex<Inner>,
}

impl Shared {
    /// The lock: a thread that panicked while holding it left no state
    /// half-changed that matters more than losing the link, so poisoning is
    /// ignored.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Starts a link over `io`: the handle opens or accepts streams; the
/// driver reads the link, writes what a full socket pushed back and pings,
/// and must be polled (spawned) for the link's life; with pings on, call it
/// within a Tokio runtime that has its timer enabled. It ends `Ok` when the
/// peer closes the link, with the error that ended it otherwise.
pub fn link<T>(io: T, role: Role, config: Config) -> (Link, Driver)
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let ping = config.ping_interval.map(|every| {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Pinger { interval, deadline: Box::pin(tokio::time::sleep(config.ping_timeout)) }
    });
    let inner = Inner {
        io: Box::pin(io),
        role,
        config,
        read_buf: BytesMut::new(),
        out: Vec::new(),
        out_start: 0,
        unflushed: false,
        streams: Streams::default(),
        next_id: 1,
        offers: VecDeque::new(),
        acceptor: None,
        driver: None,
        write_waiters: Vec::new(),
        closed: None,
        peer_going_away: false,
        going_away: false,
        ping_outstanding: None,
        pings_sent: 0,
    };
    let shared = Arc::new(Shared { inner: Mutex::new(inner) });
    (Link { shared: shared.clone() }, Driver { shared, ping })
}

/// A handle to a link: opens (cloud side) or accepts (edge side) streams.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
}

impl Link {
    /// Opens a stream to `target` (`ip:port`) and waits for the acceptor's
    /// answer: the stream, or why it was refused.
    pub async fn open(&self, target: &str) -> Result<MuxStream, MuxError> {
        let (stream, reply) = self.exchange(target).await?;
        match reply {
            (STATUS_OPEN, _) => Ok(stream),
            (status, reason) => {
                // Refused: the acceptor kept nothing; neither does this side.
                stream.forget();
                Err(MuxError::Refused { target: target.to_owned(), status, reason })
            }
        }
    }

    /// Asks the acceptor something that wants an answer and no stream (a
    /// replica status): an OPEN whose REPLY, whatever its status, ends the
    /// exchange; the acceptor answers it with [`Incoming::answer`].
    pub async fn ask(&self, target: &str) -> Result<(u16, String), MuxError> {
        let (stream, reply) = self.exchange(target).await?;
        stream.forget();
        Ok(reply)
    }

    /// Sends an OPEN for `target` and waits for its REPLY.
    async fn exchange(&self, target: &str) -> Result<(MuxStream, (u16, String)), MuxError> {
        if target.is_empty() || target.len() > MAX_CONTROL as usize {
            return Err(MuxError::BadLength { kind: Kind::Open, len: target.len() as u32, expected: "1 to 16 KiB" });
        }
        let stream = {
            let mut inner = self.shared.lock();
            if let Some(err) = inner.closed_error() {
                return Err(err);
            }
            if inner.role != Role::Opener {
                return Err(MuxError::NotOpener);
            }
            if inner.peer_going_away || inner.going_away {
                return Err(MuxError::GoingAway);
            }
            let id = u32::try_from(inner.next_id).map_err(|_| MuxError::IdsExhausted)?;
            inner.next_id += 1;
            inner.streams.insert(id, Slot::new());
            inner.queue(
                Header { kind: Kind::Open, fin: false, stream: id, len: target.len() as u32 },
                target.as_bytes(),
            );
            MuxStream { shared: self.shared.clone(), id, _permit: None }
        };
        // The OPEN leaves with the first poll (from this task, with no
        // hand-over to the driver).
        let mut sent = false;
        let reply = std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if !sent {
                sent = true;
                inner.send_now(cx);
            }
            if let Some(err) = inner.closed_error() {
                return Poll::Ready(Err(err));
            }
            let Some(slot) = inner.streams.get_mut(&stream.id) else {
                return Poll::Ready(Err(MuxError::Closed("the stream is gone".into())));
            };
            if let Some(reply) = slot.reply.take() {
                return Poll::Ready(Ok(reply));
            }
            if slot.reset {
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionReset).into()));
            }
            remember(&mut slot.reader, cx);
            Poll::Pending
        })
        .await?;
        Ok((stream, reply))
    }

    /// The next stream the opener asked for; `None` once the link is
    /// closed or the peer is going away. One task accepts: a second one
    /// accepting on a clone of the handle at the same time may not be woken.
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<Option<Incoming>> {
        let mut inner = self.shared.lock();
        if let Some(offer) = inner.offers.pop_front() {
            return Poll::Ready(Some(Incoming {
                shared: self.shared.clone(),
                id: offer.id,
                target: offer.target,
                answered: false,
            }));
        }
        if inner.closed.is_some() || inner.peer_going_away {
            return Poll::Ready(None);
        }
        remember(&mut inner.acceptor, cx);
        Poll::Pending
    }

    /// See [`Link::poll_accept`].
    pub async fn accept(&self) -> Option<Incoming> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Tells the peer this side opens and accepts no more streams (a drain);
    /// streams already open go on.
    pub fn go_away(&self, code: u32) {
        let mut inner = self.shared.lock();
        if inner.going_away || inner.closed.is_some() {
            return;
        }
        inner.going_away = true;
        inner.queue_u32(Kind::GoAway, 0, code);
        inner.send_later();
    }

    /// Ready once every frame queued so far has been written and flushed
    /// (the driver must be polled meanwhile): a last answer leaves before
    /// the link is dropped.
    pub async fn flushed(&self) {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if (inner.unsent() == 0 && !inner.unflushed) || inner.closed.is_some() {
                return Poll::Ready(());
            }
            if !inner.write_waiters.iter().any(|waiter| waiter.will_wake(cx.waker())) {
                inner.write_waiters.push(cx.waker().clone());
            }
            wake(&mut inner.driver);
            Poll::Pending
        })
        .await;
    }

    /// Whether the peer sent GOAWAY.
    pub fn peer_going_away(&self) -> bool {
        self.shared.lock().peer_going_away
    }

    /// Why the link ended, once it has.
    pub fn closed(&self) -> Option<String> {
        self.shared.lock().closed.clone()
    }

    /// Streams open on this link (opened or accepted, not yet dropped).
    pub fn open_streams(&self) -> usize {
        self.shared.lock().streams.len()
    }

    /// Bytes of buffer the link itself holds now (read and write buffers'
    /// capacity; not the streams' received bytes). Once the link has been
    /// idle for a ping interval, at most the last ping's frames.
    pub fn buffered_bytes(&self) -> usize {
        let inner = self.shared.lock();
        inner.read_buf.capacity() + inner.out.capacity()
    }
}

/// A stream the opener asked for: accept or refuse it. Dropped unanswered,
/// it is refused (503).
pub struct Incoming {
    shared: Arc<Shared>,
    id: u32,
    target: String,
    answered: bool,
}

impl Incoming {
    /// What the opener asked to reach (`ip:port`).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Opens the stream.
    pub fn accept(mut self) -> MuxStream {
        self.answered = true;
        let mut inner = self.shared.lock();
        inner.queue_reply(self.id, STATUS_OPEN, "");
        inner.send_later();
        MuxStream { shared: self.shared.clone(), id: self.id, _permit: None }
    }

    /// Refuses the stream with an HTTP-like `status` (not 200) and a reason.
    pub fn refuse(self, status: u16, reason: &str) {
        self.answer(status, reason);
    }

    /// Answers an [`Link::ask`] (or refuses a stream): the REPLY carries
    /// `status` and `reason`, and no stream follows.
    pub fn answer(mut self, status: u16, reason: &str) {
        self.answer_refused(status, reason);
    }

    fn answer_refused(&mut self, status: u16, reason: &str) {
        self.answered = true;
        let mut inner = self.shared.lock();
        inner.streams.remove(&self.id);
        if inner.closed.is_none() {
            inner.queue_reply(self.id, status, reason);
            inner.send_later();
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.answered {
            self.answer_refused(STATUS_TOO_MANY, "not answered");
        }
    }
}

/// One tunnelled connection: `AsyncRead` + `AsyncWrite`. Each write is sent
/// as one DATA frame at once (there is nothing to flush); shutdown sends
/// FIN; dropping a stream that is not closed both ways resets it.
pub struct MuxStream {
    shared: Arc<Shared>,
    id: u32,
    /// The stream's place under a stream cap, given back on drop.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl MuxStream {
    /// The stream's id on its link.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Holds `permit` (a place under a stream cap) for the stream's life.
    pub fn holding(mut self, permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        self._permit = Some(permit);
        self
    }

    /// Drops the stream's state without telling the peer (it refused).
    fn forget(self) {
        // With no slot left, drop sends nothing.
        self.shared.lock().streams.remove(&self.id);
    }
}

fn reset_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "tunnel stream reset by its peer")
}

impl AsyncRead for MuxStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut guard = self.shared.lock();
        let inner = &mut *guard;
        let Some(slot) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, "tunnel stream gone")));
        };
        if slot.reset {
            return Poll::Ready(Err(reset_error()));
        }
        let mut taken = 0;
        while buf.remaining() > 0 {
            let Some(front) = slot.received.front_mut() else { break };
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                slot.received.pop_front();
            }
            taken += n;
        }
        if taken == 0 {
            if slot.received_fin {
                return Poll::Ready(Ok(()));
            }
            if let Some(why) = &inner.closed {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, why.clone())));
            }
            remember(&mut slot.reader, cx);
            return Poll::Pending;
        }
        // Taken bytes are at most what the peer had credit for: u32.
        slot.untold += taken as u32;
        if slot.untold >= CREDIT_BATCH && !slot.received_fin {
            let told = std::mem::take(&mut slot.untold);
            slot.peer_credit += told;
            inner.queue_u32(Kind::Credit, self.id, told);
            inner.send_now(cx);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut guard = self.shared.lock();
        let inner = &mut *guard;
        if let Some(why) = &inner.closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, why.clone())));
        }
        if inner.unsent() >= OUT_LIMIT {
            if !inner.write_waiters.iter().any(|waiter| waiter.will_wake(cx.waker())) {
                inner.write_waiters.push(cx.waker().clone());
            }
            wake(&mut inner.driver);
            return Poll::Pending;
        }
        let Some(slot) = inner.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, "tunnel stream gone")));
        };
        if slot.reset {
            return Poll::Ready(Err(reset_error()));
        }
        if slot.sent_fin {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream shut down for writing")));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if slot.credit == 0 {
            remember(&mut slot.writer, cx);
            return Poll::Pending;
        }
        let n = buf.len().min(slot.credit as usize).min(MAX_DATA as usize);
        slot.credit -= n as u32;
        inner.queue(Header { kind: Kind::Data, fin: false, stream: self.id, len: n as u32 }, &buf[..n]);
        inner.send_now(cx);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written frames are on the link or with its task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut guard = self.shared.lock();
        let inner = &mut *guard;
        let Some(slot) = inner.streams.get_mut(&self.id) else { return Poll::Ready(Ok(())) };
        if slot.sent_fin || slot.reset || inner.closed.is_some() {
            return Poll::Ready(Ok(()));
        }
        slot.sent_fin = true;
        inner.queue(Header { kind: Kind::Data, fin: true, stream: self.id, len: 0 }, &[]);
        inner.send_now(cx);
        Poll::Ready(Ok(()))
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        let Some(slot) = inner.streams.remove(&self.id) else { return };
        let clean = slot.sent_fin && slot.received_fin && slot.received.is_empty();
        if !clean && !slot.reset && inner.closed.is_none() {
            inner.queue_u32(Kind::Reset, self.id, RESET_CANCEL);
            inner.send_later();
        }
    }
}

/// The link's task: reads and dispatches frames, writes what a full
/// socket pushed back, pings. Spawn it; it ends with the link.
pub struct Driver {
    shared: Arc<Shared>,
    ping: Option<Pinger>,
}

/// When to ping, and when an unanswered ping means a dead link.
struct Pinger {
    interval: tokio::time::Interval,
    /// The outstanding ping's deadline (armed when it is sent).
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.fail("the link's task ended".into());
        // The link's connection closes now, not when the last handle goes.
        inner.io = Box::pin(Gone);
    }
}

/// What a link's I/O becomes once its task has ended.
struct Gone;

impl AsyncRead for Gone {
    fn poll_read(self: Pin<&mut Self>, _cx: &mut Context<'_>, _buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
    }
}

impl AsyncWrite for Gone {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, _buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Driver {
    /// Sends a ping when one is due; `true` when the interval ticked.
    /// A ping every interval while none is outstanding; a pong missing at
    /// its deadline ends the link (at most interval + timeout after a cut).
    fn poll_ping(&mut self, cx: &mut Context<'_>, inner: &mut Inner) -> Result<bool, MuxError> {
        let Some(pinger) = &mut self.ping else { return Ok(false) };
        let mut ticked = false;
        while pinger.interval.poll_tick(cx).is_ready() {
            ticked = true;
            if inner.ping_outstanding.is_some() {
                continue;
            }
            inner.pings_sent += 1;
            let id = inner.pings_sent;
            let now = tokio::time::Instant::now();
            inner.ping_outstanding = Some((id, now));
            inner.queue(Header { kind: Kind::Ping, fin: false, stream: 0, len: 8 }, &id.to_be_bytes());
            pinger.deadline.as_mut().reset(now + inner.config.ping_timeout);
        }
        if inner.ping_outstanding.is_some() && pinger.deadline.as_mut().poll(cx).is_ready() {
            return Err(MuxError::PingTimeout(inner.config.ping_timeout));
        }
        Ok(ticked)
    }
}

impl Future for Driver {
    type Output = Result<(), MuxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let shared = self.shared.clone();
        let mut inner = shared.lock();
        if let Some(why) = &inner.closed {
            return Poll::Ready(Err(MuxError::Closed(why.clone())));
        }
        remember(&mut inner.driver, cx);
        let read = inner.poll_read_link(cx);
        let pinged = self.poll_ping(cx, &mut inner);
        let outcome = match (read, pinged) {
            (Poll::Ready(Err(err)), _) | (_, Err(err)) => Err(err),
            (Poll::Ready(Ok(())), _) => {
                inner.fail("the peer closed the link".into());
                return Poll::Ready(Ok(()));
            }
            (Poll::Pending, Ok(ticked)) => Ok(ticked),
        };
        let ticked = match outcome {
            Ok(ticked) => ticked,
            Err(err) => {
                inner.fail(err.to_string());
                return Poll::Ready(Err(err));
            }
        };
        if inner.unsent() > 0 || inner.unflushed {
            match inner.poll_write_out(cx) {
                Poll::Ready(Ok(())) => inner.wake_write_waiters(),
                Poll::Ready(Err(err)) => {
                    let err = MuxError::Io(err);
                    inner.fail(err.to_string());
                    return Poll::Ready(Err(err));
                }
                Poll::Pending => {}
            }
        }
        if ticked {
            // After the write: a pong this poll owed has left by now.
            inner.release_idle_buffers();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn quiet() -> Config {
        Config { ping_interval: None, ..Config::default() }
    }

    /// A linked pair over an in-memory pipe, drivers spawned: (opener, acceptor).
    fn pair(config: Config) -> (Link, Link, tokio::task::JoinHandle<Result<(), MuxError>>) {
        let (a, b) = tokio::io::duplex(256 << 10);
        let (opener, opener_driver) = link(a, Role::Opener, config.clone());
        let (acceptor, acceptor_driver) = link(b, Role::Acceptor, config);
        tokio::spawn(opener_driver);
        (opener, acceptor, tokio::spawn(acceptor_driver))
    }

    /// The acceptor's side of a link whose opener is raw bytes the test writes.
    fn raw_peer() -> (DuplexStream, Link, tokio::task::JoinHandle<Result<(), MuxError>>) {
        let (a, b) = tokio::io::duplex(256 << 10);
        let (acceptor, driver) = link(b, Role::Acceptor, quiet());
        (a, acceptor, tokio::spawn(driver))
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![kind, flags, 0, 0];
        bytes.extend_from_slice(&stream.to_be_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn a_header_round_trips_in_its_exact_bytes() {
        let header = Header { kind: Kind::Data, fin: true, stream: 0x0102_0304, len: 0x0000_0506 };
        let mut out = BytesMut::new();
        header.encode(&mut out);
        assert_eq!(&out[..], &[0, 1, 0, 0, 1, 2, 3, 4, 0, 0, 5, 6]);
        let raw: [u8; HEADER_LEN] = out[..].try_into().unwrap();
        assert_eq!(Header::decode(&raw).unwrap(), header);
    }

    #[test]
    fn bad_headers_are_refused_with_what_is_wrong() {
        let decode = |bytes: Vec<u8>| Header::decode(&bytes[..HEADER_LEN].try_into().unwrap()).unwrap_err().to_string();
        assert_eq!(decode(frame(9, 0, 1, &[])), "frame kind 9 is not a netd-mux/1 frame");
        assert!(decode(frame(1, 1, 1, &[0; 4])).contains("only DATA carries a flag"));
        assert!(decode(frame(0, 2, 1, &[])).contains("flags 0x02"));
        let mut reserved = frame(0, 0, 1, &[]);
        reserved[3] = 1;
        assert_eq!(decode(reserved), "frame header's reserved bytes are 0x0001, not zero");
        assert_eq!(decode(frame(0, 0, 0, &[])), "Data frame on stream 0: a stream frame on stream 0");
        assert_eq!(decode(frame(5, 0, 3, &[0; 8])), "Ping frame on stream 3: a link frame on a stream");
        assert_eq!(decode(frame(1, 0, 1, &[0; 3])), "Credit frame of 3 bytes: its payload is exactly 4");
        assert_eq!(decode(frame(2, 0, 1, &[])), "Open frame of 0 bytes: its payload is 1 to 16 KiB");
        let mut huge = frame(0, 0, 1, &[]);
        huge[8..12].copy_from_slice(&(MAX_DATA + 1).to_be_bytes());
        assert_eq!(decode(huge), "Data frame of 1048577 bytes: its payload is at most 1 MiB");
    }

    #[tokio::test]
    async fn streams_carry_bytes_both_ways_and_close_cleanly() {
        let (opener, acceptor, _driver) = pair(quiet());
        let server = tokio::spawn(async move {
            for _ in 0..3 {
                let incoming = acceptor.accept().await.expect("an offer");
                assert_eq!(incoming.target(), "10.0.0.1:10250");
                let mut stream = incoming.accept();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    stream.read_to_end(&mut got).await.unwrap();
                    got.reverse();
                    stream.write_all(&got).await.unwrap();
                    stream.shutdown().await.unwrap();
                });
            }
            acceptor
        });
        for round in 0..3_u8 {
            let mut stream = opener.open("10.0.0.1:10250").await.unwrap();
            let sent: Vec<u8> = (0..200_000_u32).map(|i| (i % 251) as u8 ^ round).collect();
            stream.write_all(&sent).await.unwrap();
            stream.shutdown().await.unwrap();
            let mut back = Vec::new();
            stream.read_to_end(&mut back).await.unwrap();
            back.reverse();
            assert_eq!(back, sent, "round {round}");
        }
        let acceptor = server.await.unwrap();
        // Both sides dropped their streams after closing both halves: no state left.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(opener.open_streams(), 0);
        assert_eq!(acceptor.open_streams(), 0);
    }

    #[tokio::test]
    async fn a_refusal_reaches_the_opener_with_its_status_and_reason() {
        let (opener, acceptor, _driver) = pair(quiet());
        tokio::spawn(async move {
            let incoming = acceptor.accept().await.expect("an offer");
            incoming.refuse(403, "port 22 is not forwarded");
            // Unanswered offers are refused too.
            drop(acceptor.accept().await.expect("a second offer"));
            std::future::pending::<()>().await;
        });
        let err = opener.open("10.0.0.1:22").await.err().unwrap();
        assert_eq!(err.to_string(), "10.0.0.1:22 refused: 403 port 22 is not forwarded");
        let err = opener.open("10.0.0.1:23").await.err().unwrap();
        assert!(matches!(err, MuxError::Refused { status: STATUS_TOO_MANY, .. }), "{err}");
        assert_eq!(opener.open_streams(), 0);
    }

    #[tokio::test]
    async fn a_reader_that_stops_stalls_its_own_stream_only() {
        let (opener, acceptor, _driver) = pair(quiet());
        let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let stalled = acceptor.accept().await.unwrap().accept();
            stalled_tx.send(stalled).ok();
            let mut echo = acceptor.accept().await.unwrap().accept();
            let mut buf = [0_u8; 64];
            loop {
                let n = echo.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                echo.write_all(&buf[..n]).await.unwrap();
            }
        });
        let mut bulk = opener.open("10.0.0.1:1").await.unwrap();
        let mut stalled = stalled_rx.await.unwrap();
        // Nobody reads `stalled`: the writer gets one window through, then waits.
        let total = STREAM_WINDOW as usize + (4 << 20);
        let writer = tokio::spawn(async move {
            let chunk = vec![7_u8; 1 << 20];
            let mut written = 0;
            while written < total {
                written += bulk.write(&chunk[..(total - written).min(chunk.len())]).await.unwrap();
            }
            bulk.shutdown().await.unwrap();
            bulk
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!writer.is_finished(), "the writer went past its window");
        // The other stream still answers at once.
        let mut echo = opener.open("10.0.0.1:2").await.unwrap();
        echo.write_all(b"ping").await.unwrap();
        let mut back = [0_u8; 4];
        echo.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
        // Reading the stalled stream lets the rest through, every byte.
        let mut got = 0;
        let mut buf = vec![0_u8; 256 << 10];
        loop {
            let n = stalled.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            assert!(buf[..n].iter().all(|b| *b == 7));
            got += n;
        }
        assert_eq!(got, total);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn an_ask_gets_its_answer_and_leaves_no_stream_on_either_side() {
        let (opener, acceptor, _driver) = pair(quiet());
        let answering = acceptor.clone();
        tokio::spawn(async move {
            for status in [200, 409] {
                let incoming = answering.accept().await.unwrap();
                assert_eq!(incoming.target(), "/netd/replica?id=a");
                incoming.answer(status, if status == 200 { "" } else { "duplicate" });
            }
        });
        assert_eq!(opener.ask("/netd/replica?id=a").await.unwrap(), (200, String::new()));
        assert_eq!(opener.ask("/netd/replica?id=a").await.unwrap(), (409, "duplicate".to_string()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!((opener.open_streams(), acceptor.open_streams()), (0, 0));
    }

    #[tokio::test]
    async fn a_stream_dropped_open_is_reset_at_the_peer() {
        let (opener, acceptor, _driver) = pair(quiet());
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let stream = acceptor.accept().await.unwrap().accept();
            tx.send(stream).ok();
            std::future::pending::<()>().await;
        });
        let stream = opener.open("10.0.0.1:1").await.unwrap();
        let mut peer = rx.await.unwrap();
        drop(stream);
        let err = peer.read(&mut [0_u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        let err = peer.write(b"late").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn a_dead_link_fails_its_streams_and_new_opens() {
        let (a, b) = tokio::io::duplex(64 << 10);
        let (opener, opener_driver) = link(a, Role::Opener, quiet());
        let (acceptor, acceptor_driver) = link(b, Role::Acceptor, quiet());
        tokio::spawn(opener_driver);
        let acceptor_task = tokio::spawn(acceptor_driver);
        let accepted = tokio::spawn(async move { acceptor.accept().await.unwrap().accept() });
        let mut stream = opener.open("10.0.0.1:1").await.unwrap();
        let _accepted = accepted.await.unwrap();
        // The acceptor's link task ends: its end of the pipe closes.
        acceptor_task.abort();
        let err = stream.read(&mut [0_u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(err.to_string(), "the peer closed the link");
        let err = opener.open("10.0.0.1:1").await.err().unwrap();
        assert_eq!(err.to_string(), "the link is closed: the peer closed the link");
    }

    #[tokio::test]
    async fn more_streams_than_the_cap_are_refused_and_go_away_stops_opens() {
        let (opener, acceptor, _driver) = pair(Config { max_streams: 2, ..quiet() });
        let held = tokio::spawn({
            let acceptor = acceptor.clone();
            async move { [acceptor.accept().await.unwrap().accept(), acceptor.accept().await.unwrap().accept()] }
        });
        let (_one, _two) = (opener.open("10.0.0.1:1").await.unwrap(), opener.open("10.0.0.1:2").await.unwrap());
        let err = opener.open("10.0.0.1:3").await.err().unwrap();
        assert_eq!(err.to_string(), "10.0.0.1:3 refused: 503 too many streams on this link");
        let _held = held.await.unwrap();
        acceptor.go_away(0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(opener.peer_going_away());
        assert!(matches!(opener.open("10.0.0.1:4").await, Err(MuxError::GoingAway)));
        assert_eq!(opener.open_streams(), 2, "open streams go on");
    }

    /// A hostile or broken opener: each bad frame ends the link with an
    /// error that names it, and the acceptor's streams hear why.
    #[tokio::test]
    async fn a_peer_that_breaks_the_protocol_loses_its_link() {
        let open = |id: u32| frame(2, 0, id, b"10.0.0.1:1");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"GET / HTTP/1.1\r\n".to_vec(), "frame kind 71 is not a netd-mux/1 frame"),
            (frame(0, 0, 5, b"data"), "Data frame on stream 5: no such stream was opened"),
            (open(2), "Open frame on stream 2: stream ids are opened in order"),
            ([open(1), frame(0, 1, 1, b""), frame(0, 0, 1, b"x")].concat(), "Data frame on stream 1: DATA after FIN"),
            (
                [open(1), frame(1, 0, 1, &u32::MAX.to_be_bytes())].concat(),
                "stream 1: credit of 4311744511 bytes exceeds 2^31 - 1",
            ),
            (frame(2, 0, 1, &[0xff, 0xfe]), "Open frame on stream 1: its text is not UTF-8"),
            (frame(3, 0, 1, &[0, 200]), "Reply frame on stream 1: only the acceptor replies"),
        ];
        for (bytes, expected) in cases {
            let (mut raw, acceptor, driver) = raw_peer();
            // Stream 1's reader must see the link end, not hang.
            let reader = tokio::spawn(async move {
                match acceptor.accept().await {
                    Some(incoming) => {
                        let mut stream = incoming.accept();
                        let mut sink = Vec::new();
                        stream.read_to_end(&mut sink).await.err().map(|err| err.kind())
                    }
                    None => None,
                }
            });
            raw.write_all(&bytes).await.unwrap();
            let err = driver.await.unwrap().unwrap_err().to_string();
            assert_eq!(err, expected);
            let seen = reader.await.unwrap();
            assert!(matches!(seen, None | Some(io::ErrorKind::ConnectionAborted)), "{seen:?}");
        }
    }

    #[tokio::test]
    async fn data_past_the_window_ends_the_link() {
        let (mut raw, acceptor, driver) = raw_peer();
        let holder = tokio::spawn(async move {
            let _stream = acceptor.accept().await.unwrap().accept();
            std::future::pending::<()>().await;
        });
        raw.write_all(&frame(2, 0, 1, b"10.0.0.1:1")).await.unwrap();
        let writer = tokio::spawn(async move {
            let chunk = frame(0, 0, 1, &vec![0; MAX_DATA as usize]);
            // 17 MiB into a 16 MiB window, never read.
            for _ in 0..17 {
                if raw.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            raw
        });
        let err = driver.await.unwrap().unwrap_err().to_string();
        assert_eq!(err, "stream 1 sent 1048576 bytes with 0 bytes of credit left");
        holder.abort();
        drop(writer.await);
    }

    /// An I/O like rustls': it takes every write into a buffer of its own,
    /// and flushing waits for the test to open its gate.
    struct Gated {
        inner: DuplexStream,
        held: Vec<u8>,
        open: Arc<std::sync::atomic::AtomicBool>,
        waiting: Arc<Mutex<Option<Waker>>>,
    }

    impl AsyncRead for Gated {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Gated {
        fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.held.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            if !self.open.load(std::sync::atomic::Ordering::SeqCst) {
                *self.waiting.lock().unwrap() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            while !self.held.is_empty() {
                let this = &mut *self;
                let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, &this.held))?;
                this.held.drain(..n);
            }
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn bytes_held_by_a_pushed_back_flush_leave_after_their_writer_is_gone() {
        let (a, b) = tokio::io::duplex(64 << 10);
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let waiting = Arc::new(Mutex::new(None::<Waker>));
        let gated = Gated { inner: a, held: Vec::new(), open: open.clone(), waiting: waiting.clone() };
        let (opener, opener_driver) = link(gated, Role::Opener, quiet());
        let (acceptor, acceptor_driver) = link(b, Role::Acceptor, quiet());
        tokio::spawn(opener_driver);
        tokio::spawn(acceptor_driver);
        let accepted = tokio::spawn(async move { acceptor.accept().await.unwrap().accept() });
        let mut stream = opener.open("10.0.0.1:1").await.unwrap();
        let mut peer = accepted.await.unwrap();
        // The flush is pushed back: the bytes wait inside the I/O, `out` is empty.
        open.store(false, std::sync::atomic::Ordering::SeqCst);
        let writer = tokio::spawn(async move {
            stream.write_all(b"last words").await.unwrap();
            stream.shutdown().await.unwrap();
            // The writer's task ends here; the stream is not dropped (that
            // would reset it), so the link's task must flush what it left.
            stream
        });
        let stream = writer.await.unwrap();
        tokio::task::yield_now().await;
        open.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(waker) = waiting.lock().unwrap().take() {
            waker.wake();
        }
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), peer.read_to_end(&mut got)).await.unwrap().unwrap();
        assert_eq!(got, b"last words");
        drop(stream);
    }

    #[tokio::test]
    async fn a_peer_that_floods_pings_and_never_reads_loses_its_link() {
        let (mut raw, _acceptor, driver) = raw_peer();
        let pings: Vec<u8> = (0..200_000_u64).flat_map(|i| frame(5, 0, 0, &i.to_be_bytes())).collect();
        let flood = tokio::spawn(async move {
            let _ = raw.write_all(&pings).await;
            raw
        });
        let err = driver.await.unwrap().unwrap_err();
        assert!(matches!(err, MuxError::PeerNotReading(owed) if owed > OWED_LIMIT), "{err}");
        drop(flood.await);
    }

    #[tokio::test]
    async fn tiny_frames_nobody_reads_are_gathered_not_queued_one_by_one() {
        let (mut raw, acceptor, _driver) = raw_peer();
        let frames: Vec<u8> = [frame(2, 0, 1, b"10.0.0.1:1")]
            .into_iter()
            .chain((0..10_000_u32).map(|i| frame(0, 0, 1, &[(i % 251) as u8])))
            .flatten()
            .collect();
        raw.write_all(&frames).await.unwrap();
        raw.write_all(&frame(0, 1, 1, b"")).await.unwrap();
        let mut stream = acceptor.accept().await.unwrap().accept();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let queued = acceptor.shared.lock().streams.get(&1).map(|slot| slot.received.len()).unwrap();
        assert!(queued <= MAX_QUEUED_FRAMES + 1, "{queued} frames queued");
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, (0..10_000_u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_link_cut_inside_a_frame_is_an_error() {
        let (mut raw, _acceptor, driver) = raw_peer();
        raw.write_all(&frame(2, 0, 1, b"10.0.0.1:1")[..7]).await.unwrap();
        drop(raw);
        assert_eq!(
            driver.await.unwrap().unwrap_err().to_string(),
            "the link ended inside a frame (7 bytes of it received)"
        );
    }

    #[tokio::test]
    async fn a_second_reply_ends_the_link() {
        let (raw_end, opener_end) = tokio::io::duplex(64 << 10);
        let (opener, driver) = link(opener_end, Role::Opener, quiet());
        let driver = tokio::spawn(driver);
        let opening = tokio::spawn(async move { opener.open("10.0.0.1:1").await.map(|_| ()) });
        let mut raw = raw_end;
        let mut open = [0_u8; HEADER_LEN + 10];
        raw.read_exact(&mut open).await.unwrap();
        assert_eq!(&open[..], &frame(2, 0, 1, b"10.0.0.1:1")[..]);
        let reply = frame(3, 0, 1, &STATUS_OPEN.to_be_bytes());
        raw.write_all(&[reply.clone(), reply].concat()).await.unwrap();
        assert_eq!(driver.await.unwrap().unwrap_err().to_string(), "Reply frame on stream 1: a second REPLY");
        drop(opening.await);
    }

    #[tokio::test]
    async fn an_idle_link_holds_no_buffers_after_a_burst() {
        let ticks = Config { ping_interval: Some(Duration::from_millis(50)), ..quiet() };
        let (opener, acceptor, _driver) = pair(ticks);
        let acceptor_handle = acceptor.clone();
        tokio::spawn(async move {
            let mut stream = acceptor.accept().await.unwrap().accept();
            let mut sink = Vec::new();
            stream.read_to_end(&mut sink).await.unwrap();
            stream.write_all(&sink).await.unwrap();
            stream.shutdown().await.unwrap();
            std::future::pending::<()>().await;
        });
        let mut stream = opener.open("10.0.0.1:1").await.unwrap();
        stream.write_all(&vec![1_u8; 4 << 20]).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.len(), 4 << 20);
        // Right after the burst the buffers are still there, for the next one.
        assert!(opener.buffered_bytes() > 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        // At most the last ping's or pong's frame (20 bytes) each way.
        for side in [&opener, &acceptor_handle] {
            assert!(side.buffered_bytes() <= 2 * (HEADER_LEN + 8), "{} bytes held", side.buffered_bytes());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_answering_pings_is_declared_dead() {
        let (raw, _other) = tokio::io::duplex(64 << 10);
        let config =
            Config { ping_interval: Some(Duration::from_secs(5)), ping_timeout: Duration::from_secs(10), ..quiet() };
        let (opener, driver) = link(raw, Role::Opener, config);
        // `_other` never answers: the link is dead within interval + timeout.
        let started = tokio::time::Instant::now();
        let err = driver.await.unwrap_err();
        assert_eq!(err.to_string(), "no answer to a ping within 10s: the link is dead");
        assert!(started.elapsed() <= Duration::from_secs(15), "{:?}", started.elapsed());
        assert!(opener.closed().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_answering_peer_keeps_the_link() {
        let (a, b) = tokio::io::duplex(64 << 10);
        let config =
            Config { ping_interval: Some(Duration::from_secs(5)), ping_timeout: Duration::from_secs(10), ..quiet() };
        let (opener, opener_driver) = link(a, Role::Opener, config.clone());
        let (_acceptor, acceptor_driver) = link(b, Role::Acceptor, config);
        let opener_task = tokio::spawn(opener_driver);
        tokio::spawn(acceptor_driver);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!opener_task.is_finished());
        assert_eq!(opener.closed(), None);
    }
}
