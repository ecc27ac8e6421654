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

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-stream receive window. A stream moves at most one window per round
/// trip: 8 MiB keeps one stream at ~1.3 Gbit/s over 50 ms (frp's fixed
/// 256 KiB caps it near 40 Mbit/s). It is also the most a stalled stream
/// can hold in memory.
pub const STREAM_WINDOW: u32 = 8 << 20;
/// Connection receive window: effectively unlimited, so streams that stop
/// reading (each holding at most its own window) never use up the credit
/// of the others. Memory stays bounded by the per-stream windows.
pub const CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// Largest frame either side sends (fewer frames per byte on bulk streams).
pub const MAX_FRAME: u32 = 1 << 20;
/// How much a stream buffers for sending before its writer waits.
pub const SEND_BUFFER: usize = 1 << 20;
/// Most concurrent tunnelled connections one agent serves.
pub const MAX_STREAMS: u32 = 10_000;
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
        .max_concurrent_streams(MAX_STREAMS);
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
        .max_concurrent_reset_streams(1024);
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
/// halves behind `AsyncRead` + `AsyncWrite`, for `copy_bidirectional`.
pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet handed to the reader.
    pending: Bytes,
    recv_done: bool,
}

impl TunnelStream {
    /// Wraps the halves of an accepted or opened stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self { send, recv, pending: Bytes::new(), recv_done: false }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                // Credit goes back only as the reader takes bytes: a reader
                // that stops reading holds one window, and its stream alone waits.
                if let Err(err) = self.recv.flow_control().release_capacity(n) {
                    return Poll::Ready(Err(h2_io(err)));
                }
                return Poll::Ready(Ok(()));
            }
            if self.recv_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                Some(Err(err)) => return Poll::Ready(Err(h2_io(err))),
                None => self.recv_done = true,
            }
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(capacity)) => {
                    let n = capacity.min(buf.len());
                    let chunk = Bytes::copy_from_slice(&buf[..n]);
                    return Poll::Ready(self.send.send_data(chunk, false).map(|()| n).map_err(h2_io));
                }
                Some(Err(err)) => return Poll::Ready(Err(h2_io(err))),
                None => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed"))),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 sends buffered data as the connection is polled.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
