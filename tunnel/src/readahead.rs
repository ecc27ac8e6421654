//! A read-ahead buffer between a socket and rustls.
//!
//! rustls takes at most 4 KiB from its transport per `read_tls` (its
//! deframer grows by that much per read), so under `tokio-rustls` a bulk
//! stream costs one `recvmsg` per 4 KiB on the receiving side of a link.
//! [`ReadAhead`] reads the socket in [`READ_AHEAD`] chunks and hands rustls
//! its 4 KiB from memory: one system call per 64 KiB, and a copy, which is
//! far cheaper. The buffer lives only while bytes are flowing: a read that
//! finds the socket empty frees it, so an idle link holds none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::transport::poll_read_spare;

/// Bytes asked of the socket per read once a caller wants less than this.
pub const READ_AHEAD: usize = 64 << 10;

/// A byte stream whose reads go through a read-ahead buffer (writes pass
/// straight through).
pub struct ReadAhead<S> {
    inner: S,
    /// Read from `inner`, not yet handed on: `buf[taken..]`.
    buf: Vec<u8>,
    taken: usize,
}

impl<S> ReadAhead<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner, buf: Vec::new(), taken: 0 }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.taken == this.buf.len() {
            // Nothing buffered. A caller that asks for a read-ahead's worth
            // or more gains nothing from a copy.
            if out.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buf.clear();
            this.taken = 0;
            if this.buf.capacity() < READ_AHEAD {
                this.buf.reserve_exact(READ_AHEAD);
            }
            match poll_read_spare(cx, &mut this.inner, &mut this.buf.spare_capacity_mut()[..READ_AHEAD]) {
                Poll::Ready(Ok(filled)) => {
                    // SAFETY: `buf` is empty, and the reader initialised the
                    // first `filled` bytes of its spare capacity
                    // (`poll_read_spare`).
                    unsafe { this.buf.set_len(filled) };
                    if filled == 0 {
                        // End of stream.
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    // Idle: the buffer goes until bytes flow again.
                    this.buf = Vec::new();
                    return Poll::Pending;
                }
            }
        }
        let n = out.remaining().min(this.buf.len() - this.taken);
        out.put_slice(&this.buf[this.taken..this.taken + n]);
        this.taken += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the reads that reach the wrapped stream.
    struct Counting<S> {
        inner: S,
        reads: usize,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let result = Pin::new(&mut self.inner).poll_read(cx, buf);
            if result.is_ready() {
                self.reads += 1;
            }
            result
        }
    }

    /// 4 KiB reads, as rustls makes them, of a stream that has 1 MiB
    /// waiting: every byte in order, the end of stream passed on, and one
    /// read of the socket per 64 KiB instead of one per 4 KiB.
    #[tokio::test]
    async fn small_reads_come_from_memory_and_every_byte_arrives() {
        let (mut far, near) = tokio::io::duplex(2 << 20);
        let sent: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        far.write_all(&sent).await.unwrap();
        far.shutdown().await.unwrap();
        let mut stream = ReadAhead::new(Counting { inner: near, reads: 0 });
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got == sent, "{} bytes arrived of {}", got.len(), sent.len());
        let reads = stream.get_ref().reads;
        // 16 reads of 64 KiB, and the one that saw the end.
        assert!(reads <= sent.len().div_ceil(READ_AHEAD) + 1, "{reads} reads of the wrapped stream");
        // Drained: the buffer is not kept past the end.
        assert_eq!(stream.taken, stream.buf.len());
    }

    /// A read that finds nothing waiting frees the buffer: an idle link
    /// holds no read-ahead.
    #[tokio::test]
    async fn an_idle_stream_holds_no_buffer() {
        let (mut far, near) = tokio::io::duplex(1 << 16);
        let mut stream = ReadAhead::new(near);
        far.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut small = [0u8; 16];
        let mut buf = ReadBuf::new(&mut small);
        assert!(Pin::new(&mut stream).poll_read(&mut cx, &mut buf).is_pending());
        assert_eq!(stream.buf.capacity(), 0);
    }
}
