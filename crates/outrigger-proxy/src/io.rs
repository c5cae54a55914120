//! Stream adapters: replay of bytes read during protocol detection, and byte counting.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A downstream stream with its type erased, as the inbound path serves it once the
/// connection is accepted (a TCP stream, a TLS stream, an HBONE stream): the HTTP and TCP
/// forwarding code is compiled once instead of once per stream type (each copy held its own
/// hyper HTTP/1 and HTTP/2 server), and a connection's task holds a pointer instead of the
/// stream. One indirect call per read or write.
pub(crate) trait AnyStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + ?Sized> AnyStream for T {}

/// See [`AnyStream`].
pub(crate) type BoxStream = Box<dyn AnyStream>;

/// A stream that first yields `prefix` (bytes already read while detecting the protocol) and
/// then reads from the inner stream. Writes go straight through.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Bytes moved over one downstream connection, shared with whoever reports them, and when
/// the last of them moved (for the TCP idle timeout).
#[derive(Debug)]
pub struct ByteCounts {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    /// When bytes last moved either way, in ms since `base` (0: none yet).
    last_moved_ms: AtomicU64,
    base: tokio::time::Instant,
}

impl Default for ByteCounts {
    fn default() -> Self {
        ByteCounts {
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            last_moved_ms: AtomicU64::new(0),
            base: tokio::time::Instant::now(),
        }
    }
}

impl ByteCounts {
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn moved(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_moved_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved either way for `timeout` (counted from the later of
    /// the last byte and the creation of the counts); never when `timeout` is `None`.
    ///
    /// Envoy's tcp_proxy `idle_timeout` (envoy api/envoy/extensions/filters/network/
    /// tcp_proxy/v3/tcp_proxy.proto): "The idle timeout is defined as the period in which
    /// there are no bytes sent or received on either the upstream or the downstream
    /// connection. If not set, the default idle timeout is 1 hour. If set to 0s, the timeout
    /// will be disabled." (tcp_proxy.cc resets the timer on every read and every write.)
    /// Every byte from or to the upstream passes through the counted downstream stream, so
    /// counting one side sees both. The future sleeps until the earliest moment the
    /// connection could be idle and looks again: nothing wakes per byte.
    pub async fn idle(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else {
            return std::future::pending().await;
        };
        loop {
            let last = Duration::from_millis(self.last_moved_ms.load(Ordering::Relaxed));
            let deadline = self.base + last + timeout;
            if deadline <= tokio::time::Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Counts the bytes read from (received) and written to (sent) the wrapped stream.
pub struct Counted<T> {
    inner: T,
    counts: Arc<ByteCounts>,
}

impl<T> Counted<T> {
    pub fn new(inner: T, counts: Arc<ByteCounts>) -> Self {
        Counted { inner, counts }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.counts.received.fetch_add(n, Ordering::Relaxed);
            self.counts.moved();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res
            && n > 0
        {
            self.counts.sent.fetch_add(n as u64, Ordering::Relaxed);
            self.counts.moved();
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res
            && n > 0
        {
            self.counts.sent.fetch_add(n as u64, Ordering::Relaxed);
            self.counts.moved();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn rewind_replays_prefix_then_inner() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut r = Rewind::new(Bytes::from_static(b"hello"), b);
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }

    #[tokio::test]
    async fn idle_waits_for_a_timeout_after_the_last_byte() {
        let (a, mut b) = tokio::io::duplex(64);
        let counts = Arc::new(ByteCounts::default());
        let mut c = Counted::new(a, counts.clone());
        let timeout = Duration::from_millis(200);
        // Disabled: never resolves.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), counts.idle(None))
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        b.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await.unwrap();
        let moved = std::time::Instant::now();
        counts.idle(Some(timeout)).await;
        assert!(
            moved.elapsed() >= Duration::from_millis(190),
            "{:?}",
            moved.elapsed()
        );
    }

    #[tokio::test]
    async fn counted_counts_both_directions() {
        let (a, mut b) = tokio::io::duplex(64);
        let counts = Arc::new(ByteCounts::default());
        let mut c = Counted::new(a, counts.clone());
        c.write_all(b"abc").await.unwrap();
        b.write_all(b"12345").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!((counts.received(), counts.sent()), (5, 3));
    }
}
