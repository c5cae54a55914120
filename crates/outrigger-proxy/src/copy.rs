//! Copying a TCP connection both ways with buffers that grow with the traffic, as ztunnel
//! copies (istio/ztunnel `src/copy.rs`: 1 KiB to start, 16 KiB − 64 after 128 KiB, 256 KiB −
//! 64 after 10 MiB in one direction). tokio's `copy_bidirectional` uses 8 KiB each way for the
//! whole connection: an idle connection holds 16 KiB of buffers, and a bulk transfer makes one
//! write per 8 KiB — on the HBONE path a 1 GiB upload took 131,072 writes to the application
//! where ztunnel makes about 4,100, the largest part of the CPU per byte Outrigger spent above
//! ztunnel's (BENCHMARKS.md, "HBONE").
//!
//! The copy itself is tokio's (`tokio/src/io/util/copy.rs` and `copy_bidirectional.rs`, MIT;
//! the same read, write, flush-before-waiting and half-close semantics), with the buffer
//! replaced by a larger one once it is empty and a threshold is passed, and filled by as many
//! reads as are ready before it is written (ztunnel writes an HBONE stream's frames with one
//! `writev`; measured on a 32 MiB upload before this: Outrigger 33–42 writes per MiB to the
//! application, ztunnel 9–15). tokio's cooperative
//! budget is internal to tokio; the sockets under the copy still consume it.
//!
//! A side that already holds what it received as chunks of its own — an HBONE stream's
//! HTTP/2 DATA frames ([`Side::poll_chunk`]) — hands each chunk over as it is, and the copy
//! writes it without copying it into a buffer first, as ztunnel writes an HTTP/2 stream's
//! `Bytes` to the application (istio/ztunnel `src/proxy/h2.rs`, `ResizeBufRead::poll_bytes`
//! for `H2StreamReadHalf`, and `src/copy.rs` `CopyBuf`: one write per DATA frame). On the
//! HBONE upload benchmark that copy was the CPU per byte Outrigger spent above ztunnel's
//! (BENCHMARKS.md, "Issue 14 targets").

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One side of a copy: a byte stream that may hold its received bytes as chunks of its own.
pub(crate) trait Side: AsyncRead + AsyncWrite + Unpin {
    /// The next chunk this side received, handed over without a copy: `Some(Ready(Ok(b)))`
    /// with `b` empty at the end of the stream; `None` when this side has no chunks of its own
    /// (a socket), so the copy reads it into its buffer. Asked again before every read.
    fn poll_chunk(&mut self, _cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        None
    }
}

impl Side for tokio::net::TcpStream {}
impl<T: AsyncRead + AsyncWrite + Unpin> Side for tokio_rustls::server::TlsStream<T> {}
impl<T: AsyncRead + AsyncWrite + Unpin> Side for tokio_rustls::client::TlsStream<T> {}
impl Side for tokio::io::DuplexStream {}
impl<T: hyper::rt::Read + hyper::rt::Write + Unpin> Side for hyper_util::rt::TokioIo<T> {}

/// ztunnel's buffer sizes and the bytes after which each is used (a direction's total).
const INITIAL: usize = 1024;
const LARGE: usize = 16_384 - 64;
const JUMBO: usize = 16 * 16_384 - 64;
const LARGE_AFTER: u64 = 128 * 1024;
const JUMBO_AFTER: u64 = 10 * 1024 * 1024;

/// The size a direction's buffer should have once `amt` bytes went through it.
fn size_for(amt: u64) -> usize {
    if amt >= JUMBO_AFTER {
        JUMBO
    } else if amt >= LARGE_AFTER {
        LARGE
    } else {
        INITIAL
    }
}

struct CopyBuffer {
    read_done: bool,
    need_flush: bool,
    pos: usize,
    cap: usize,
    amt: u64,
    /// Allocated at the first read into it: a reader that hands over chunks never needs it.
    buf: Box<[u8]>,
    /// The unwritten rest of a chunk the reader handed over (taken only while `buf` is empty,
    /// so the bytes stay in order).
    chunk: Bytes,
}

impl CopyBuffer {
    fn new() -> Self {
        CopyBuffer {
            read_done: false,
            need_flush: false,
            pos: 0,
            cap: 0,
            amt: 0,
            buf: Box::default(),
            chunk: Bytes::new(),
        }
    }

    /// Writes the held chunk to its end.
    fn poll_write_chunk<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        while !self.chunk.is_empty() {
            let n = match writer.as_mut().poll_write(cx, &self.chunk) {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                res => ready!(res)?,
            };
            if n == 0 {
                return Poll::Ready(Err(write_zero()));
            }
            self.chunk.advance(n);
            self.amt += n as u64;
            self.need_flush = true;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_fill_buf<R: AsyncRead + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
    ) -> Poll<io::Result<()>> {
        let mut buf = ReadBuf::new(&mut self.buf);
        buf.set_filled(self.cap);
        let res = loop {
            match reader.as_mut().poll_read(cx, &mut buf) {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                res => break res,
            }
        };
        if let Poll::Ready(Ok(())) = res {
            let filled = buf.filled().len();
            self.read_done = self.cap == filled;
            self.cap = filled;
        }
        res
    }

    fn poll_write_buf<R: AsyncRead + ?Sized, W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match writer
                .as_mut()
                .poll_write(cx, &self.buf[self.pos..self.cap])
            {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Poll::Pending => {
                    // While the writer is full, read ahead into the rest of the buffer.
                    if !self.read_done && self.cap < self.buf.len() {
                        ready!(self.poll_fill_buf(cx, reader.as_mut()))?;
                    }
                    return Poll::Pending;
                }
                res => return res,
            }
        }
    }

    fn poll_copy<R: Side + ?Sized, W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>> {
        loop {
            ready!(self.poll_write_chunk(cx, writer.as_mut()))?;
            if self.pos == self.cap && !self.read_done {
                match reader.as_mut().get_mut().poll_chunk(cx) {
                    Some(Poll::Ready(Ok(chunk))) => {
                        self.read_done = chunk.is_empty();
                        self.chunk = chunk;
                        continue;
                    }
                    Some(Poll::Ready(Err(e))) => return Poll::Ready(Err(e)),
                    Some(Poll::Pending) => {
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    None => {
                        // Empty: the moment to (re)size without moving unwritten bytes.
                        let want = size_for(self.amt);
                        if want > self.buf.len() {
                            self.buf = vec![0; want].into_boxed_slice();
                        }
                    }
                }
            }
            if self.cap < self.buf.len() && !self.read_done {
                match self.poll_fill_buf(cx, reader.as_mut()) {
                    Poll::Ready(Ok(())) => {
                        // Unlike tokio's copy, keep reading while more is ready and there is
                        // room, so that a stream of small reads (an HBONE stream's DATA
                        // frames) goes out in few large writes. A socket that had less than
                        // asked for answers the next read from tokio's readiness state, without
                        // a system call.
                        while !self.read_done && self.cap > self.pos && self.cap < self.buf.len() {
                            match self.poll_fill_buf(cx, reader.as_mut()) {
                                Poll::Ready(Ok(())) => {}
                                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                                Poll::Pending => break,
                            }
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing to write and nothing to read: flush before waiting.
                        if self.pos == self.cap {
                            if self.need_flush {
                                ready!(writer.as_mut().poll_flush(cx))?;
                                self.need_flush = false;
                            }
                            return Poll::Pending;
                        }
                    }
                }
            }
            while self.pos < self.cap {
                let n = ready!(self.poll_write_buf(cx, reader.as_mut(), writer.as_mut()))?;
                if n == 0 {
                    return Poll::Ready(Err(write_zero()));
                }
                self.pos += n;
                self.amt += n as u64;
                self.need_flush = true;
            }
            self.pos = 0;
            self.cap = 0;
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                return Poll::Ready(Ok(self.amt));
            }
        }
    }
}

fn write_zero() -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, "write zero byte into writer")
}

enum TransferState {
    Running(CopyBuffer),
    ShuttingDown(u64),
    Done(u64),
}

fn transfer_one_direction<A, B>(
    cx: &mut Context<'_>,
    state: &mut TransferState,
    r: &mut A,
    w: &mut B,
) -> Poll<io::Result<u64>>
where
    A: Side + ?Sized,
    B: Side + ?Sized,
{
    let mut r = Pin::new(r);
    let mut w = Pin::new(w);
    loop {
        match state {
            TransferState::Running(buf) => {
                let count = ready!(buf.poll_copy(cx, r.as_mut(), w.as_mut()))?;
                *state = TransferState::ShuttingDown(count);
            }
            TransferState::ShuttingDown(count) => {
                ready!(w.as_mut().poll_shutdown(cx))?;
                *state = TransferState::Done(*count);
            }
            TransferState::Done(count) => return Poll::Ready(Ok(*count)),
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both have ended, shutting down each writer after
/// its reader's end (a half-close goes through); the bytes each way. As
/// `tokio::io::copy_bidirectional`, with growing buffers.
pub(crate) async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: Side + ?Sized,
    B: Side + ?Sized,
{
    let mut a_to_b = TransferState::Running(CopyBuffer::new());
    let mut b_to_a = TransferState::Running(CopyBuffer::new());
    poll_fn(|cx| {
        let a_to_b = transfer_one_direction(cx, &mut a_to_b, a, b)?;
        let b_to_a = transfer_one_direction(cx, &mut b_to_a, b, a)?;
        let a_to_b = ready!(a_to_b);
        let b_to_a = ready!(b_to_a);
        Poll::Ready(Ok((a_to_b, b_to_a)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn buffers_grow_at_ztunnels_thresholds() {
        assert_eq!(size_for(0), 1024);
        assert_eq!(size_for(128 * 1024 - 1), 1024);
        assert_eq!(size_for(128 * 1024), 16_320);
        assert_eq!(size_for(10 * 1024 * 1024), 262_080);
    }

    /// Counts the writes it is given and their sizes.
    struct Counting {
        inner: tokio::io::DuplexStream,
        writes: usize,
        largest: usize,
    }

    impl AsyncRead for Counting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let res = Pin::new(&mut self.inner).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = res {
                self.writes += 1;
                self.largest = self.largest.max(n);
            }
            res
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    impl Side for Counting {}

    /// A side whose received bytes are chunks of its own, as an HBONE stream's DATA frames;
    /// it answers `Pending` (and wakes itself) before every other chunk, as a stream whose
    /// next frame has not arrived yet.
    struct Chunks {
        chunks: std::collections::VecDeque<Bytes>,
        pending_next: bool,
    }

    impl Side for Chunks {
        fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
            self.pending_next = !self.pending_next;
            if self.pending_next {
                cx.waker().wake_by_ref();
                return Some(Poll::Pending);
            }
            Some(Poll::Ready(Ok(self.chunks.pop_front().unwrap_or_default())))
        }
    }

    impl AsyncRead for Chunks {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            panic!("a side with chunks of its own is never read into the copy's buffer")
        }
    }

    impl AsyncWrite for Chunks {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Each chunk is written as it came, whole and in order, one write per chunk (ztunnel's
    /// `CopyBuf`), and the copy never allocates a buffer of its own for that direction.
    #[tokio::test]
    async fn chunks_are_written_as_they_came_without_a_buffer() {
        let sizes = [1usize, 16_384, 70_000, 3, 262_144, 5];
        let mut next = 0u8;
        let chunks: std::collections::VecDeque<Bytes> = sizes
            .iter()
            .map(|n| {
                Bytes::from_iter((0..*n).map(|_| {
                    next = next.wrapping_add(1);
                    next
                }))
            })
            .collect();
        let want: Vec<u8> = chunks.iter().flatten().copied().collect();
        let mut reader = Chunks {
            chunks,
            pending_next: false,
        };
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut writer = Counting {
            inner: near,
            writes: 0,
            largest: 0,
        };
        let mut buf = CopyBuffer::new();
        let copied = poll_fn(|cx| buf.poll_copy(cx, Pin::new(&mut reader), Pin::new(&mut writer)))
            .await
            .unwrap();
        assert_eq!(copied as usize, want.len());
        assert_eq!(writer.writes, sizes.len());
        assert_eq!(writer.largest, 262_144);
        assert!(buf.buf.is_empty(), "no buffer was allocated");
        drop(writer);
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert!(got == want, "every byte in order");
    }

    /// Real sockets on 127.0.0.1: 16 MiB one way and an answer the other way after the
    /// half-close, every byte in order; the writes grow to ztunnel's largest buffer.
    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_growing_writes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let total = 16 * 1024 * 1024usize;
        let client = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
            s.write_all(&data).await.unwrap();
            s.shutdown().await.unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).await.unwrap();
            answer
        });
        let (mut down, _) = l.accept().await.unwrap();
        // The far side: a sink that checks every byte and answers with the count.
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let sink = tokio::spawn(async move {
            let mut got = vec![0u8; 64 * 1024];
            let mut n = 0usize;
            loop {
                let k = far.read(&mut got).await.unwrap();
                if k == 0 {
                    break;
                }
                for (j, b) in got[..k].iter().enumerate() {
                    assert_eq!(*b, ((n + j) % 251) as u8, "byte {}", n + j);
                }
                n += k;
            }
            far.write_all(n.to_string().as_bytes()).await.unwrap();
            far.shutdown().await.unwrap();
        });
        let mut up = Counting {
            inner: near,
            writes: 0,
            largest: 0,
        };
        let (sent, answered) = copy_bidirectional(&mut down, &mut up).await.unwrap();
        sink.await.unwrap();
        assert_eq!(client.await.unwrap(), total.to_string());
        assert_eq!(sent as usize, total);
        assert_eq!(answered as usize, total.to_string().len());
        assert!(
            up.largest > LARGE,
            "the buffer grew past 16 KiB: {}",
            up.largest
        );
        // With tokio's 8 KiB buffers this takes at least 2,048 writes.
        assert!(up.writes < 2048, "{} writes", up.writes);
    }
}
