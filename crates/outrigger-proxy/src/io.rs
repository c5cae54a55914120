//! Stream adapters: replay of bytes read during protocol detection, byte counting, and the
//! reading side of Istio's TCP metadata exchange.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::copy::Side;
use crate::peer_metadata::PeerMetadata;
use crate::tcp_mx::{self, Parsed};

/// `AsyncWrite` for a wrapper that changes only what is read: every write goes straight to its
/// `inner` stream (vectored writes too).
macro_rules! writes_go_to_inner {
    ($ty:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<T> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use writes_go_to_inner;

/// A downstream stream with its type erased, as the inbound path serves it once the
/// connection is accepted (a TCP stream, a TLS stream, an HBONE stream): the HTTP and TCP
/// forwarding code is compiled once instead of once per stream type (each copy held its own
/// hyper HTTP/1 and HTTP/2 server), and a connection's task holds a pointer instead of the
/// stream. One indirect call per read or write. It stays a [`Side`], so an HBONE stream's
/// DATA frames still reach the copy without a copy of their own.
pub(crate) type BoxStream = Box<dyn Side + Send>;

impl<T: Side + Send + ?Sized> Side for Box<T> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        (**self).poll_chunk(cx)
    }
}

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

/// The replayed bytes are a chunk already held: handed to a copy as they are.
impl<T: Side> Side for Rewind<T> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        if !self.prefix.is_empty() {
            return Some(Poll::Ready(Ok(std::mem::take(&mut self.prefix))));
        }
        self.inner.poll_chunk(cx)
    }
}

writes_go_to_inner!(Rewind);

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

impl<T: Side> Side for Counted<T> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        let res = self.inner.poll_chunk(cx);
        if let Some(Poll::Ready(Ok(chunk))) = &res
            && !chunk.is_empty()
        {
            self.counts
                .received
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
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

/// The reading side of Istio's TCP metadata exchange (crate::tcp_mx) on a stream: the peer's
/// header and metadata are read off the start of what arrives and never reach the reader; the
/// bytes after them (or every byte, when the stream does not start with an exchange) do, as
/// Envoy's filter drains the exchange and passes the rest on (`onData`). Writes go straight
/// through: the caller writes its own exchange first, on the inner stream.
///
/// [`exchange`](Self::exchange) reads the peer's exchange before anything is forwarded; a
/// stream whose exchange has not arrived by then (the caller bounds the wait) is still read
/// the same way when its bytes come. Holds at most [`tcp_mx::HEADER_LEN`] +
/// [`tcp_mx::MAX_METADATA`] bytes plus one read while the exchange is incomplete.
pub struct MxRead<T> {
    inner: T,
    state: MxState,
}

enum MxState {
    /// The exchange is being read: every byte read so far.
    Reading(Vec<u8>),
    /// The exchange is over: application bytes that arrived with it, then the stream (or its
    /// end, when it ended with them).
    Replay { rest: Bytes, eof: bool },
    /// No exchange on this stream, or the replay is done: reads go straight through.
    Through,
    /// The stream ended inside the metadata (Envoy keeps those bytes back), or the exchange
    /// was refused: end of stream.
    Ended,
}

/// The outcome of a peer's exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxOutcome {
    /// The exchange was read; the peer's workload if it sent one.
    Exchanged(Option<Box<PeerMetadata>>),
    /// The stream does not start with an exchange: its bytes are the application's.
    NotExchanged(tcp_mx::NotExchanged),
    /// The stream ended inside the exchange's metadata.
    Truncated,
}

/// Read chunk while the exchange is incomplete (a sidecar's is a few hundred bytes).
const MX_CHUNK: usize = 4096;

impl<T> MxRead<T> {
    /// A stream that starts with the peer's exchange.
    pub fn new(inner: T) -> Self {
        MxRead {
            inner,
            state: MxState::Reading(Vec::new()),
        }
    }

    /// A stream without an exchange (the ALPN did not select it): reads go straight through.
    pub fn through(inner: T) -> Self {
        MxRead {
            inner,
            state: MxState::Through,
        }
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> MxRead<T> {
    /// Reads the peer's exchange, if it is still to be read: `Ok(None)` when it was already
    /// read (or there is none). A metadata length above [`tcp_mx::MAX_METADATA`] is an
    /// `InvalidData` error, and the stream reads as ended afterwards. Cancel-safe: what was
    /// read stays in `self`.
    pub async fn exchange(&mut self) -> io::Result<Option<MxOutcome>> {
        std::future::poll_fn(|cx| self.poll_exchange(cx)).await
    }

    fn poll_exchange(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<MxOutcome>>> {
        loop {
            let MxState::Reading(acc) = &mut self.state else {
                return Poll::Ready(Ok(None));
            };
            let mut chunk = [0u8; MX_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let eof = rb.filled().is_empty();
            acc.extend_from_slice(rb.filled());
            let (next, outcome) = match tcp_mx::parse(acc, eof) {
                Parsed::NeedMore => continue,
                Parsed::Exchanged { consumed, peer } => (
                    replay(acc, consumed, eof),
                    MxOutcome::Exchanged(peer.map(Box::new)),
                ),
                Parsed::NotExchanged { from, why } => {
                    (replay(acc, from, eof), MxOutcome::NotExchanged(why))
                }
                Parsed::Truncated => (MxState::Ended, MxOutcome::Truncated),
                Parsed::TooLarge(n) => {
                    self.state = MxState::Ended;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the peer's istio-peer-exchange metadata is {n} bytes, more than \
                             the {} accepted",
                            tcp_mx::MAX_METADATA
                        ),
                    )));
                }
            };
            self.state = next;
            return Poll::Ready(Ok(Some(outcome)));
        }
    }
}

fn replay(acc: &[u8], from: usize, eof: bool) -> MxState {
    MxState::Replay {
        rest: Bytes::copy_from_slice(acc.get(from..).unwrap_or_default()),
        eof,
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MxRead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                MxState::Reading(_) => {
                    // An exchange arriving after the caller stopped waiting for it: still
                    // read off the stream, as Envoy reads it whenever it comes.
                    if let Some(outcome) = std::task::ready!(this.poll_exchange(cx))? {
                        tracing::debug!(
                            ?outcome,
                            "istio-peer-exchange read after forwarding began"
                        );
                    }
                }
                MxState::Replay { rest, eof } => {
                    if !rest.is_empty() {
                        let n = rest.len().min(buf.remaining());
                        buf.put_slice(&rest[..n]);
                        rest.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    this.state = if *eof {
                        MxState::Ended
                    } else {
                        MxState::Through
                    };
                }
                MxState::Through => return Pin::new(&mut this.inner).poll_read(cx, buf),
                MxState::Ended => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Once the exchange is read, the bytes that came with it are a chunk already held, and the
/// stream's own chunks follow; while it is being read, the copy reads (`poll_read` finishes it).
impl<T: Side> Side for MxRead<T> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        match &mut self.state {
            MxState::Reading(_) => None,
            MxState::Replay { rest, eof } => {
                let chunk = std::mem::take(rest);
                self.state = if *eof {
                    MxState::Ended
                } else {
                    MxState::Through
                };
                if chunk.is_empty() {
                    return self.poll_chunk(cx);
                }
                Some(Poll::Ready(Ok(chunk)))
            }
            MxState::Through => self.inner.poll_chunk(cx),
            MxState::Ended => Some(Poll::Ready(Ok(Bytes::new()))),
        }
    }
}

writes_go_to_inner!(MxRead);

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

    fn sidecar() -> (PeerMetadata, Vec<u8>) {
        let me = PeerMetadata {
            namespace: "default".into(),
            workload: "productpage-v1".into(),
            ..Default::default()
        };
        let bytes = tcp_mx::encode(&me, "sidecar~1.2.3.4~p.default~default.svc.cluster.local");
        (me, bytes)
    }

    /// The exchange arriving a few bytes at a time, with the application's first bytes in its
    /// last segment: the exchange is read off, the rest is what the reader gets.
    #[tokio::test]
    async fn mx_read_strips_the_exchange_however_it_arrives() {
        let (me, exchange) = sidecar();
        let mut stream = exchange.clone();
        stream.extend_from_slice(b"hello world");
        for split in [1, 3, 7, 8, 9, exchange.len(), exchange.len() + 2] {
            let (mut a, b) = tokio::io::duplex(64);
            let chunks: Vec<Vec<u8>> = stream.chunks(split).map(<[u8]>::to_vec).collect();
            let writer = tokio::spawn(async move {
                for c in chunks {
                    a.write_all(&c).await.unwrap();
                    tokio::task::yield_now().await;
                }
            });
            let mut r = MxRead::new(b);
            assert_eq!(
                r.exchange().await.unwrap(),
                Some(MxOutcome::Exchanged(Some(Box::new(me.clone())))),
                "{split}"
            );
            assert_eq!(r.exchange().await.unwrap(), None, "read once");
            let mut s = String::new();
            r.read_to_string(&mut s).await.unwrap();
            assert_eq!(s, "hello world", "{split}");
            writer.await.unwrap();
        }
    }

    /// Read without waiting for the exchange first (it came after the caller stopped
    /// waiting): the reader still never sees it.
    #[tokio::test]
    async fn mx_read_strips_a_late_exchange_on_read() {
        let (_, exchange) = sidecar();
        let (mut a, b) = tokio::io::duplex(4096);
        a.write_all(&exchange).await.unwrap();
        a.write_all(b"data").await.unwrap();
        drop(a);
        let mut s = Vec::new();
        MxRead::new(b).read_to_end(&mut s).await.unwrap();
        assert_eq!(s, b"data");
    }

    /// Envoy's `Invalid` cases pass the bytes on (a wrong magic: all of them; a bad `Any`:
    /// those after the header; a short stream: what there was); a stream that ends inside the
    /// metadata passes none on; an oversized declaration is an error, then the end.
    #[tokio::test]
    async fn mx_read_passes_on_what_envoy_passes_on() {
        async fn run(input: &[u8]) -> (io::Result<Option<MxOutcome>>, Vec<u8>) {
            let (mut a, b) = tokio::io::duplex(4096);
            a.write_all(input).await.unwrap();
            drop(a);
            let mut r = MxRead::new(b);
            let outcome = r.exchange().await;
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await.unwrap();
            (outcome, rest)
        }
        let (o, rest) = run(b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(
            o.unwrap(),
            Some(MxOutcome::NotExchanged(tcp_mx::NotExchanged::BadMagic))
        );
        assert_eq!(rest, b"GET / HTTP/1.1\r\n\r\n");
        let mut bad = tcp_mx::MAGIC.to_be_bytes().to_vec();
        bad.extend_from_slice(&[0, 0, 0, 2, 0xff, 0xff, b'x']);
        let (o, rest) = run(&bad).await;
        assert_eq!(
            o.unwrap(),
            Some(MxOutcome::NotExchanged(tcp_mx::NotExchanged::BadMetadata))
        );
        assert_eq!(rest, [0xff, 0xff, b'x']);
        let (o, rest) = run(b"abc").await;
        assert_eq!(
            o.unwrap(),
            Some(MxOutcome::NotExchanged(tcp_mx::NotExchanged::Short))
        );
        assert_eq!(rest, b"abc");
        let mut cut = tcp_mx::MAGIC.to_be_bytes().to_vec();
        cut.extend_from_slice(&[0, 0, 0, 100, 1, 2, 3]);
        let (o, rest) = run(&cut).await;
        assert_eq!(o.unwrap(), Some(MxOutcome::Truncated));
        assert!(rest.is_empty());
        let mut huge = tcp_mx::MAGIC.to_be_bytes().to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        let (o, rest) = run(&huge).await;
        assert_eq!(o.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert!(rest.is_empty());
        // Without an exchange, reads go straight through.
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&tcp_mx::MAGIC.to_be_bytes()).await.unwrap();
        drop(a);
        let mut through = MxRead::through(b);
        assert_eq!(through.exchange().await.unwrap(), None);
        let mut all = Vec::new();
        through.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, tcp_mx::MAGIC.to_be_bytes());
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
