//! One TLS connection per agent, many tunnelled TCP connections over it.
//!
//! HTTP/2 with the roles reversed: the agent dials out and then *serves*
//! HTTP/2; the server is the HTTP/2 client and opens one stream per
//! tunnelled connection with `CONNECT <ip>:<port>` (RFC 9113 §8.5). The
//! `h2` crate does framing and flow control; nothing here counts windows.
//! What this module adds: windows sized for long fat links, a stream that
//! releases receive capacity only once the bytes are taken by the local end
//! (so a reader that stops reading stalls its own stream and nothing else),
//! and pings that find a dead link.

use std::hash::{BuildHasher as _, Hasher as _};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-stream receive window. h2 returns credit (WINDOW_UPDATE) only once
/// the bytes taken but not yet announced reach half of what the peer still
/// sees open, that is after a third of the window, and the update takes
/// half a round trip to arrive: a stream moves at most two thirds of its
/// window per round trip. 8 MiB capped one stream at ~0.89 Gbit/s over
/// 50 ms, what direct TCP reaches on the bench's emulated 1 Gbit/s WAN, so
/// any queueing on the way made the window the limit; 16 MiB allows
/// ~1.8 Gbit/s (frp's fixed 256 KiB caps it near 40 Mbit/s). It is also
/// the most a stalled stream can hold in memory.
pub const STREAM_WINDOW: u32 = 16 << 20;
/// Connection receive window: effectively unlimited, so streams that stop
/// reading (each holding at most its own window) never use up the credit
/// of the others. Memory stays bounded by the per-stream windows.
pub const CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// Largest frame either side sends (fewer frames per byte on bulk streams).
pub const MAX_FRAME: u32 = 1 << 20;
/// How much a stream buffers for sending before its writer waits.
pub const SEND_BUFFER: usize = 1 << 20;
/// Writes gather up to this much before they go to h2 as one DATA frame
/// (sooner on flush, which [`splice`] calls whenever its reader has nothing
/// more, so interactive bytes never wait). Every hand-over to h2 takes the
/// connection's lock and wakes its task: with 8 KiB writes, that per-write
/// cost, not the bytes, bounded a bulk stream.
pub const WRITE_CHUNK: usize = 128 << 10;
/// Received bytes are credited back to the sender in batches of this much,
/// for the same reason: a release takes the connection's lock, and per
/// small message that was one more h2 call on every request's path. A
/// stream holds back at most this much of its 16 MiB window, and h2 gives
/// what a closed stream held back to the connection.
const RELEASE_BATCH: usize = 64 << 10;
/// Send capacity is reserved this far ahead of what is gathered, so that
/// most small messages go to h2 without a reservation of their own (two
/// calls instead of three). A stream holds at most this much of the
/// connection's send window unused ([`CONNECTION_WINDOW`] on both sides:
/// 10 000 streams hold 640 MiB of 2 GiB).
const RESERVE_AHEAD: usize = 64 << 10;
/// Most concurrent tunnelled connections one agent serves.
pub const MAX_STREAMS: u32 = 10_000;
/// Largest header block either side accepts: a CONNECT request or its
/// answer (with a refusal reason) is far smaller.
pub const MAX_HEADER_LIST: u32 = 16 << 10;
/// Ping interval; a link is dead after [`PING_TIMEOUT`] without a pong
/// (at most 5 + 10 = 15 s from the cut to the verdict).
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// See [`PING_INTERVAL`].
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's HTTP/2 server settings.
pub fn agent_builder() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(MAX_STREAMS)
        // A CONNECT head is a few dozen bytes; nothing bigger is ours.
        .max_header_list_size(MAX_HEADER_LIST);
    builder
}

/// The server's HTTP/2 client settings.
pub fn server_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        // The agent's own limit applies; this only bounds what we keep.
        .max_concurrent_reset_streams(1024)
        // The agent answers streams the server opens and opens none: a
        // PUSH_PROMISE from it is a protocol error that ends its link.
        .enable_push(false)
        .max_header_list_size(MAX_HEADER_LIST);
    builder
}

fn h2_io(err: h2::Error) -> io::Error {
    if err.is_io() {
        err.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, err)
    }
}

/// One tunnelled TCP connection as a byte stream: an HTTP/2 stream's two
/// halves behind `AsyncRead` + `AsyncWrite`, for [`splice`].
/// Writes are buffered (up to [`WRITE_CHUNK`]) like a `BufWriter`'s: they
/// leave on `flush` or `shutdown`, which [`splice`] calls.
pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet handed to the reader.
    pending: Bytes,
    /// Bytes the reader took whose credit is not yet released.
    unreleased: usize,
    recv_done: bool,
    /// Written bytes not yet handed to h2 (at most [`WRITE_CHUNK`]).
    outgoing: BytesMut,
    /// The stream's place under its link's stream cap, given back on drop.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl TunnelStream {
    /// Wraps the halves of an accepted or opened stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            unreleased: 0,
            recv_done: false,
            outgoing: BytesMut::new(),
            _permit: None,
        }
    }

    /// Holds `permit` (a place under a stream cap) for the stream's life.
    pub fn holding(mut self, permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        self._permit = Some(permit);
        self
    }

    /// Hands every gathered byte to h2 as stream capacity allows.
    fn poll_send_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let mut capacity = self.send.capacity();
            if capacity < self.outgoing.len() {
                // Counted on top of what h2 already buffers for this stream.
                self.send.reserve_capacity(self.outgoing.len().max(RESERVE_AHEAD));
                // poll_capacity answers only when capacity grew since it
                // last did: capacity already assigned is read directly.
                capacity = match self.send.capacity() {
                    0 => match ready!(self.send.poll_capacity(cx)) {
                        Some(Ok(capacity)) => capacity,
                        Some(Err(err)) => return Poll::Ready(Err(h2_io(err))),
                        None => {
                            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed")))
                        }
                    },
                    capacity => capacity,
                };
            }
            let chunk = self.outgoing.split_to(capacity.min(self.outgoing.len())).freeze();
            self.send.send_data(chunk, false).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl TunnelStream {
    /// `n` bytes of `pending` were taken by the local end. Credit goes back
    /// only as bytes are taken: a reader that stops reading holds one
    /// window, and its stream alone waits.
    fn consume(&mut self, n: usize) -> io::Result<()> {
        self.pending.advance(n);
        self.unreleased += n;
        if self.unreleased >= RELEASE_BATCH {
            let released = std::mem::take(&mut self.unreleased);
            self.recv.flow_control().release_capacity(released).map_err(h2_io)?;
        }
        Ok(())
    }

    /// Ready with `true` once `pending` holds received bytes, `false` at
    /// the end of the stream.
    fn poll_fill_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while self.pending.is_empty() {
            if self.recv_done {
                return Poll::Ready(Ok(false));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                Some(Err(err)) => return Poll::Ready(Err(h2_io(err))),
                None => self.recv_done = true,
            }
        }
        Poll::Ready(Ok(true))
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !ready!(self.poll_fill_pending(cx))? {
            return Poll::Ready(Ok(()));
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        Poll::Ready(self.consume(n))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.outgoing.len() >= WRITE_CHUNK {
            ready!(self.poll_send_outgoing(cx))?;
        }
        let n = buf.len().min(WRITE_CHUNK - self.outgoing.len());
        if self.outgoing.capacity() - self.outgoing.len() < n {
            // In whole chunks: one allocation per DATA frame, not per write.
            self.outgoing.reserve(WRITE_CHUNK);
        }
        self.outgoing.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Handed to h2, which sends buffered data as the connection is polled.
        self.poll_send_outgoing(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_outgoing(cx))?;
        // A TCP half-close becomes END_STREAM; the other direction goes on.
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            // Already ended or reset: nothing left to close.
            Err(err) if err.is_reset() || err.is_go_away() => Poll::Ready(Ok(())),
            Err(err) => Poll::Ready(Err(h2_io(err))),
        }
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        // A connection torn down without a clean close: tell the peer at once.
        if !self.recv_done || !self.pending.is_empty() {
            self.send.send_reset(h2::Reason::CANCEL);
        }
    }
}

/// Reads from `from` into `spare`, the uninitialised capacity at the end of
/// a buffer: ready with how many bytes at its start the reader filled (0 at
/// the end of the stream). The caller may then extend the buffer's length
/// by that much.
pub(crate) fn poll_read_spare<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    from: &mut R,
    spare: &mut [std::mem::MaybeUninit<u8>],
) -> Poll<io::Result<usize>> {
    let spare_at = spare.as_ptr().cast::<u8>();
    let mut buf = ReadBuf::uninit(spare);
    ready!(Pin::new(from).poll_read(cx, &mut buf))?;
    let filled = buf.filled();
    // A `ReadBuf`'s filled part is initialised; callers rely on it being
    // the start of `spare`, which a reader that swapped the buffer breaks.
    if !filled.is_empty() && filled.as_ptr() != spare_at {
        return Poll::Ready(Err(io::Error::other("the reader replaced the buffer it was given")));
    }
    Poll::Ready(Ok(filled.len()))
}

/// Ready once both directions of a copy are: `poll` polls each and returns
/// both states (an error from either ends the copy).
async fn until_both_done(mut poll: impl FnMut(&mut Context<'_>) -> io::Result<(Poll<()>, Poll<()>)>) -> io::Result<()> {
    std::future::poll_fn(|cx| match poll(cx)? {
        (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
        _ => Poll::Pending,
    })
    .await
}

/// Bytes one direction of [`splice`] moves per read, into a buffer that
/// lives for one poll: nothing is held between polls unless the writer
/// pushed back. 64 KiB, not tokio's 8: a bulk flow costs one read and one
/// write per 64 KiB instead of eight of each (the buffer is not
/// initialised, so a short read costs no more).
const SPLICE_CHUNK: usize = 64 << 10;

/// One direction of a [`splice`]: bytes the writer did not take yet, and
/// whether the reader ended.
#[derive(Default)]
struct Direction {
    /// Read, not yet written (only while the writer pushes back).
    leftover: Vec<u8>,
    written: usize,
    /// The reader returned end of stream; the writer is being shut down.
    read_done: bool,
    /// The writer was shut down.
    done: bool,
    /// Bytes written since the last flush.
    unflushed: bool,
}

impl Direction {
    /// Moves what `from` has to `to` until `from` has nothing now (then
    /// flushes `to`), `to` pushes back, or `from` ends (then shuts `to`
    /// down). Ready once this direction is finished.
    fn poll_move<R, W>(&mut self, cx: &mut Context<'_>, from: &mut R, to: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // Read into, and written from at once: allocated (not initialised)
        // at this poll's first read and freed when the poll returns, so an
        // idle stream holds none.
        let mut chunk: Vec<u8> = Vec::new();
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            // What the writer refused last time goes first.
            while self.written < self.leftover.len() {
                match Pin::new(&mut *to).poll_write(cx, &self.leftover[self.written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.written += n;
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !self.leftover.is_empty() {
                // Written out: the heap copy goes, so an idle stream holds none.
                self.leftover = Vec::new();
                self.written = 0;
            }
            if self.read_done {
                ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            if chunk.capacity() < SPLICE_CHUNK {
                chunk.reserve_exact(SPLICE_CHUNK);
            }
            match poll_read_spare(cx, from, &mut chunk.spare_capacity_mut()[..SPLICE_CHUNK]) {
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(filled)) => {
                    // SAFETY: `chunk` is empty, and the reader initialised
                    // the first `filled` bytes of its spare capacity
                    // (`poll_read_spare`).
                    unsafe { chunk.set_len(filled) };
                    let mut at = 0;
                    while at < chunk.len() {
                        match Pin::new(&mut *to).poll_write(cx, &chunk[at..]) {
                            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                            Poll::Ready(Ok(n)) => {
                                at += n;
                                self.unflushed = true;
                            }
                            Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                            Poll::Pending => {
                                // The chunk itself waits for the writer: no copy.
                                self.leftover = std::mem::take(&mut chunk);
                                self.written = at;
                                return Poll::Pending;
                            }
                        }
                    }
                    chunk.clear();
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    // Nothing more for now: what was written leaves (a
                    // gathering writer sends its chunk, interactive bytes
                    // never wait).
                    if self.unflushed {
                        ready!(Pin::new(&mut *to).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copies between `a` and `b` both ways until both directions end (each
/// end of stream shuts the other side's writer down), like tokio's
/// `copy_bidirectional` but with no buffer kept between polls: a chunk is
/// read into a buffer that lives for one poll and written at once, so an
/// idle connection holds no copy buffer (`copy_bidirectional` keeps 8 KiB
/// per direction for the connection's whole life). Only a chunk a writer
/// pushed back is kept until taken.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_to_b, mut b_to_a) = (Direction::default(), Direction::default());
    until_both_done(|cx| Ok((a_to_b.poll_move(cx, a, b)?, b_to_a.poll_move(cx, b, a)?))).await
}

/// The first read of a burst towards a tunnel stream asks for this much;
/// each read that fills what it asked for doubles the next, up to
/// [`WRITE_CHUNK`]. A request of a few hundred bytes gets a small buffer, a
/// bulk flow reaches 128 KiB reads within a few, and an idle stream holds
/// none (see [`splice_tunnel`]).
const FIRST_READ: usize = 16 << 10;
/// The least room a gathering chunk must have left to take another read;
/// with less it goes to h2 and the next read gets a new buffer.
const MIN_READ: usize = 4 << 10;

/// Local end → tunnel: bytes are read straight into the stream's outgoing
/// DATA chunk.
struct ToTunnel {
    /// What the next read asks for (grows with the flow, see [`FIRST_READ`]).
    read_size: usize,
    /// The local end returned end of stream; the tunnel stream is being ended.
    read_done: bool,
    /// END_STREAM was sent.
    done: bool,
}

impl ToTunnel {
    fn poll_move<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        tunnel: &mut TunnelStream,
    ) -> Poll<io::Result<()>> {
        // Whether this poll read anything: a poll that did not is a wake-up
        // for the other direction, or the end of a burst.
        let mut moved = false;
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.read_done {
                // What is gathered goes first, then END_STREAM.
                ready!(Pin::new(&mut *tunnel).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let mut want = self.read_size.min(WRITE_CHUNK - tunnel.outgoing.len());
            let spare = tunnel.outgoing.capacity() - tunnel.outgoing.len();
            if !tunnel.outgoing.is_empty() && (want == 0 || spare < want) {
                if want == 0 || spare < MIN_READ {
                    // A full chunk, or one whose buffer has no useful room
                    // left: it goes as it is (growing it would copy it).
                    ready!(tunnel.poll_send_outgoing(cx))?;
                    want = self.read_size;
                } else {
                    // The rest of the buffer takes the next read, gathered
                    // into the same chunk.
                    want = spare;
                }
            }
            let start = tunnel.outgoing.len();
            let read = if start == 0 && tunnel.outgoing.capacity() < want && self.read_size == FIRST_READ {
                // The start of a burst, or a wake-up for the other
                // direction that finds nothing to read: nothing is
                // allocated before bytes arrive.
                poll_read_first(cx, from, &mut tunnel.outgoing)
            } else {
                // After a chunk went to h2 the rest of its allocation is
                // still free to read into; otherwise a new one, sized for
                // this read (`outgoing` is empty then: nothing is copied).
                tunnel.outgoing.reserve(want);
                poll_read_spare(cx, from, &mut tunnel.outgoing.spare_capacity_mut()[..want]).map_ok(|filled| {
                    // SAFETY: the reader initialised the first `filled`
                    // bytes of the spare capacity it was handed
                    // (`poll_read_spare`), which follows the `start` bytes
                    // already in `outgoing`.
                    unsafe { tunnel.outgoing.set_len(start + filled) };
                    filled
                })
            };
            match read {
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(filled)) => {
                    moved = true;
                    if filled == want {
                        self.read_size = (self.read_size * 2).min(WRITE_CHUNK);
                    }
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    // Nothing more for now: what was gathered leaves at once
                    // (interactive bytes never wait), and the stream keeps no
                    // buffer while it is idle.
                    ready!(tunnel.poll_send_outgoing(cx))?;
                    tunnel.outgoing = BytesMut::new();
                    if !moved {
                        // Nothing to read on a wake-up: the next burst starts small.
                        self.read_size = FIRST_READ;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// The first read of a burst, into a buffer on the stack: what arrived is
/// copied into `outgoing` (empty), in an allocation of its own size when
/// the read did not fill the buffer (a message: the local end has nothing
/// more now) or of a whole [`WRITE_CHUNK`] when it did (a bulk flow, whose
/// next reads land in the rest of it). A wake-up that finds nothing to read
/// allocates nothing, and a request of a few hundred bytes costs a small
/// allocation, not a [`FIRST_READ`] one.
fn poll_read_first<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    from: &mut R,
    outgoing: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let mut first = [std::mem::MaybeUninit::<u8>::uninit(); FIRST_READ];
    let mut buf = ReadBuf::uninit(&mut first);
    ready!(Pin::new(from).poll_read(cx, &mut buf))?;
    let filled = buf.filled();
    if !filled.is_empty() {
        outgoing.reserve(if filled.len() < FIRST_READ { filled.len() } else { WRITE_CHUNK });
        outgoing.extend_from_slice(filled);
    }
    Poll::Ready(Ok(filled.len()))
}

/// Tunnel → local end: each received DATA frame is written from the frame
/// itself.
#[derive(Default)]
struct FromTunnel {
    /// The tunnel stream ended; the local end's writer was shut down.
    done: bool,
    /// Bytes written since the last flush.
    unflushed: bool,
}

impl FromTunnel {
    fn poll_move<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        tunnel: &mut TunnelStream,
        to: &mut W,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            match tunnel.poll_fill_pending(cx) {
                Poll::Ready(Ok(true)) => match Pin::new(&mut *to).poll_write(cx, &tunnel.pending) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.unflushed = true;
                        tunnel.consume(n)?;
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    // The frame waits where it is, credit unreleased.
                    Poll::Pending => return Poll::Pending,
                },
                Poll::Ready(Ok(false)) => {
                    ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                    self.done = true;
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    if self.unflushed {
                        ready!(Pin::new(&mut *to).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// [`splice`] between a local byte stream and a tunnel stream, without a
/// copy of its own: bytes read from `end` land in the DATA chunk handed to
/// h2, and each received DATA frame is written to `end` from the frame.
/// Through the generic [`splice`] every byte is copied once more in user
/// space each way (into its chunk, then into the stream's gathering buffer;
/// out of the received frame into the chunk), the largest user-space cost
/// of a bulk stream after TLS (`perf`, see the book's tunnel benchmarks).
pub async fn splice_tunnel<S>(end: &mut S, tunnel: &mut TunnelStream) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = ToTunnel { read_size: FIRST_READ, read_done: false, done: false };
    let mut back = FromTunnel::default();
    until_both_done(|cx| Ok((out.poll_move(cx, end, tunnel)?, back.poll_move(cx, tunnel, end)?))).await
}

/// A byte stream that counts what passes as it passes, so a long-lived or
/// broken connection shows in the byte counters too, not only one that
/// ends cleanly.
pub struct Counted<'a, S> {
    inner: S,
    read: &'a std::sync::atomic::AtomicU64,
    written: &'a std::sync::atomic::AtomicU64,
}

impl<'a, S> Counted<'a, S> {
    /// Counts bytes read from `inner` into `read`, bytes written to it into `written`.
    pub fn new(inner: S, read: &'a std::sync::atomic::AtomicU64, written: &'a std::sync::atomic::AtomicU64) -> Self {
        Self { inner, read, written }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.read.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.written.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Backoff between reconnects: full jitter over `min(CAP, BASE * 2^attempt)`.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// See [`BACKOFF_BASE`].
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Header carrying why the agent refused a stream (for the server's logs).
pub const REFUSAL_HEADER: &str = "x-netd-refused";

/// Full-jitter backoff for attempt `n` (0-based).
pub fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16)).min(BACKOFF_CAP);
    // RandomState is seeded per instance by the OS: a dependency-free random draw.
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    ceiling.mul_f64((random >> 11) as f64 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Two connections joined by [`splice`], through pipes far smaller than
    /// what crosses them (the writers push back all the time): every byte
    /// arrives, in order, each way, and each end of stream reaches the far
    /// side while the other direction goes on.
    #[tokio::test]
    async fn splice_moves_everything_both_ways_and_passes_each_end_on() {
        let (left, mut left_inner) = tokio::io::duplex(1024);
        let (mut right_inner, right) = tokio::io::duplex(3000);
        let joined = tokio::spawn(async move { splice(&mut left_inner, &mut right_inner).await });
        let forward: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let backward: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let (sent_forward, sent_backward) = (forward.clone(), backward.clone());
        let (mut left_read, mut left_write) = tokio::io::split(left);
        let (mut right_read, mut right_write) = tokio::io::split(right);
        let to_right = tokio::spawn(async move {
            left_write.write_all(&sent_forward).await.unwrap();
            left_write.shutdown().await.unwrap();
        });
        let at_right = tokio::spawn(async move {
            let mut got = Vec::new();
            right_read.read_to_end(&mut got).await.unwrap();
            got
        });
        // The left side ends first; the right keeps sending after that.
        assert_eq!(at_right.await.unwrap(), forward);
        to_right.await.unwrap();
        let to_left = tokio::spawn(async move {
            right_write.write_all(&sent_backward).await.unwrap();
            right_write.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        left_read.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, backward);
        to_left.await.unwrap();
        joined.await.unwrap().unwrap();
    }

    /// One stream over a real HTTP/2 link on an in-memory pipe of
    /// `pipe` bytes, both connections driven by tasks of their own: the
    /// server's end and the agent's end.
    async fn linked_stream(pipe: usize) -> (TunnelStream, TunnelStream) {
        let (server_io, agent_io) = tokio::io::duplex(pipe);
        let agent = tokio::spawn(async move {
            let mut connection = agent_builder().handshake::<_, Bytes>(agent_io).await.unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            let send = respond.send_response(http::Response::new(()), false).unwrap();
            // Keep the connection polled while the stream lives.
            tokio::spawn(async move { while let Some(Ok(_)) = connection.accept().await {} });
            TunnelStream::new(send, request.into_body())
        });
        let (mut link, connection) = server_builder().handshake::<_, Bytes>(server_io).await.unwrap();
        tokio::spawn(connection);
        let request = http::Request::builder().method("CONNECT").uri("10.0.0.1:80").body(()).unwrap();
        let (response, send) = link.send_request(request, false).unwrap();
        let response = response.await.unwrap();
        (TunnelStream::new(send, response.into_body()), agent.await.unwrap())
    }

    /// A server end and an agent end joined by a real HTTP/2 link over an
    /// in-memory pipe, each spliced with [`splice_tunnel`] to a local pipe
    /// far smaller than what crosses it (so both writers push back, and
    /// both stream windows fill): every byte arrives in order each way,
    /// half-closes pass on, and small requests after a bulk burst still
    /// arrive at once (nothing waits for a chunk to fill).
    #[tokio::test]
    async fn splice_tunnel_moves_everything_over_a_real_link() {
        let (mut up, mut down) = linked_stream(64 << 10).await;
        // The agent's local service: a pipe whose far end the test drives.
        let (mut local, service) = tokio::io::duplex(2000);
        let agent_splice = tokio::spawn(async move { splice_tunnel(&mut local, &mut down).await });
        let (mut front, client) = tokio::io::duplex(3000);
        let server_splice = tokio::spawn(async move { splice_tunnel(&mut front, &mut up).await });

        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut service_read, mut service_write) = tokio::io::split(service);
        // A small request first: it must arrive without a flush of the client's.
        client_write.write_all(b"ping").await.unwrap();
        let mut ping = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), service_read.read_exact(&mut ping)).await.unwrap().unwrap();
        assert_eq!(&ping, b"ping");
        let forward: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let backward: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
        let (sent_forward, sent_backward) = (forward.clone(), backward.clone());
        let to_edge = tokio::spawn(async move {
            client_write.write_all(&sent_forward).await.unwrap();
            client_write.shutdown().await.unwrap();
        });
        let from_edge = tokio::spawn(async move {
            service_write.write_all(&sent_backward).await.unwrap();
            // The edge keeps its side open until the client's end arrived.
            let mut got = Vec::new();
            service_read.read_to_end(&mut got).await.unwrap();
            service_write.write_all(b"bye").await.unwrap();
            service_write.shutdown().await.unwrap();
            got
        });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), client_read.read_to_end(&mut got)).await.unwrap().unwrap();
        let mut expected = backward;
        expected.extend_from_slice(b"bye");
        assert!(got == expected, "backward: {} bytes arrived, {} sent", got.len(), expected.len());
        assert!(from_edge.await.unwrap() == forward, "forward bytes differ");
        to_edge.await.unwrap();
        server_splice.await.unwrap().unwrap();
        agent_splice.await.unwrap().unwrap();
    }

    /// Messages towards the tunnel, one poll at a time as `splice_tunnel`
    /// makes them: each leaves at once, a wake-up with nothing to read
    /// leaves no buffer behind, and after each message the stream holds
    /// none either (1 000 idle streams must cost no copy buffers), while a
    /// burst bigger than the first read still arrives whole and in order.
    #[tokio::test]
    async fn a_quiet_stream_holds_no_send_buffer_between_messages() {
        let (mut tunnel, mut received) = linked_stream(1 << 20).await;
        let (mut client, mut local) = tokio::io::duplex(1 << 20);
        let mut out = ToTunnel { read_size: FIRST_READ, read_done: false, done: false };
        let mut poll_once = |local: &mut tokio::io::DuplexStream, tunnel: &mut TunnelStream| {
            let waker = std::task::Waker::noop();
            out.poll_move(&mut Context::from_waker(waker), local, tunnel)
        };

        assert!(poll_once(&mut local, &mut tunnel).is_pending());
        assert_eq!(tunnel.outgoing.capacity(), 0, "a wake-up with nothing to read kept a buffer");
        let burst: Vec<u8> = (0..3 * FIRST_READ as u32 + 17).map(|i| (i % 253) as u8).collect();
        for message in [&b"GET / HTTP/1.1\r\n\r\n"[..], &burst, b"ping"] {
            client.write_all(message).await.unwrap();
            assert!(poll_once(&mut local, &mut tunnel).is_pending());
            assert_eq!(
                tunnel.outgoing.capacity(),
                0,
                "a stream kept its buffer after a {}-byte message",
                message.len()
            );
            let mut got = vec![0; message.len()];
            tokio::time::timeout(Duration::from_secs(5), received.read_exact(&mut got)).await.unwrap().unwrap();
            assert!(got == message, "a {}-byte message arrived as {} different bytes", message.len(), got.len());
        }
    }

    /// A reader that fills a buffer of its own instead of the one it was
    /// handed (the splice then trusts the length it reports): an error, not
    /// bytes read from uninitialised memory.
    #[tokio::test]
    async fn splice_refuses_a_reader_that_swaps_its_buffer() {
        struct Swapper;
        impl AsyncRead for Swapper {
            fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                let own: &'static mut [u8] = Box::leak(vec![7u8; 16].into_boxed_slice());
                *buf = ReadBuf::new(own);
                buf.set_filled(16);
                Poll::Ready(Ok(()))
            }
        }
        impl AsyncWrite for Swapper {
            fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                Poll::Ready(Ok(buf.len()))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let (_far, mut near) = tokio::io::duplex(1024);
        let err = splice(&mut Swapper, &mut near).await.unwrap_err();
        assert!(err.to_string().contains("replaced the buffer"), "{err}");
    }

    /// What a hostile or broken peer sends instead of HTTP/2; the agent side
    /// must fail the link with an error, never hang or panic.
    async fn agent_fed(bytes: Vec<u8>) -> Result<(), String> {
        let (mut peer, ours) = tokio::io::duplex(1 << 16);
        let feed = tokio::spawn(async move {
            let _ = peer.write_all(&bytes).await;
            let _ = peer.shutdown().await;
            // Keep the pipe's other end alive while the agent reads.
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let outcome: Result<(), String> = tokio::time::timeout(Duration::from_secs(5), async move {
            let mut connection = agent_builder().handshake::<_, Bytes>(ours).await.map_err(|e| e.to_string())?;
            match connection.accept().await {
                Some(Ok(_)) => Err("a stream was accepted from garbage".to_string()),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("closed".to_string()),
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the agent hung on a hostile peer"));
        feed.abort();
        outcome.map(drop)
    }

    /// The same for the server side: a hostile "agent" answering with garbage.
    async fn server_fed(bytes: Vec<u8>) -> Result<(), String> {
        let (mut peer, ours) = tokio::io::duplex(1 << 16);
        let feed = tokio::spawn(async move {
            let _ = peer.write_all(&bytes).await;
            let _ = peer.shutdown().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let outcome: Result<(), String> = tokio::time::timeout(Duration::from_secs(5), async move {
            let (_link, connection) = server_builder().handshake::<_, Bytes>(ours).await.map_err(|e| e.to_string())?;
            connection.await.map_err(|e| e.to_string())?;
            Err("the link ended cleanly on garbage".to_string())
        })
        .await
        .unwrap_or_else(|_| panic!("the server hung on a hostile agent"));
        feed.abort();
        outcome
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    #[tokio::test]
    async fn garbage_cut_and_corrupted_frames_fail_the_link_cleanly() {
        let mut cases: Vec<(String, Vec<u8>)> = vec![
            ("empty".into(), Vec::new()),
            ("HTTP/1.1".into(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            ("preface cut".into(), PREFACE[..10].to_vec()),
            ("preface only".into(), PREFACE.to_vec()),
        ];
        // A SETTINGS frame with a length that is not a multiple of 6.
        let mut bad_settings = PREFACE.to_vec();
        bad_settings.extend_from_slice(&[0, 0, 5, 4, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5]);
        cases.push(("bad SETTINGS".into(), bad_settings));
        // A frame header promising 16 MiB, then nothing.
        let mut huge = PREFACE.to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1]);
        cases.push(("oversized frame".into(), huge));
        // Random bytes after a valid preface, many seeds.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for seed in 0..64 {
            let mut bytes = PREFACE.to_vec();
            for _ in 0..(64 + seed * 13) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state as u8);
            }
            cases.push((format!("random {seed}"), bytes));
        }
        for (name, bytes) in cases {
            assert!(agent_fed(bytes.clone()).await.is_err(), "{name}: accepted by the agent");
            // The server expects no preface from an agent: the bytes after it are the test.
            let reply = bytes.strip_prefix(PREFACE).map(<[u8]>::to_vec).unwrap_or(bytes);
            assert!(server_fed(reply).await.is_err(), "{name}: accepted by the server");
        }
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_ceiling_capped_at_30s() {
        for attempt in 0..40 {
            let ceiling = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16)).min(BACKOFF_CAP);
            for _ in 0..50 {
                let wait = backoff(attempt);
                assert!(wait <= ceiling, "attempt {attempt}: {wait:?} > {ceiling:?}");
            }
        }
        // Jitter: not the same value every time.
        let draws: std::collections::HashSet<Duration> = (0..20).map(|_| backoff(10)).collect();
        assert!(draws.len() > 10, "{draws:?}");
        assert!((0..200).map(|_| backoff(30)).all(|w| w <= BACKOFF_CAP));
    }
}
