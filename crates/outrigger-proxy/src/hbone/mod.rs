//! HBONE: Istio ambient's tunnel. Mesh traffic travels as HTTP/2 CONNECT streams inside one
//! mTLS connection to port 15008; each stream is one inner connection whose destination is
//! the stream's `:authority`.
//!
//! Istio's docs (ambient architecture, HBONE): "HTTP CONNECT is used to establish a tunnel
//! connection, mTLS is used to secure and encrypt that connection, and HTTP/2 is used to
//! multiplex application connection streams over that single secured and encrypted tunnel, and
//! convey additional stream-level metadata." "By Istio convention, ztunnel and other proxies
//! that understand the HBONE protocol expose listeners on TCP port 15008." "Application
//! connections over the HBONE protocol to the same destination identity will be multiplexed
//! across the same shared, encrypted and secured underlying HTTP/2 connection."
//!
//! * [`server`] — the inbound listener (default `0.0.0.0:15008`): each accepted CONNECT stream
//!   becomes an inner connection served by exactly the same code as a direct mTLS connection
//!   (PeerAuthentication, RequestAuthentication, AuthorizationPolicy, HTTP or TCP forwarding),
//!   with the peer identity of the outer handshake.
//! * [`client`] — the outbound side: pooled HTTP/2 connections per (peer, identity) carrying
//!   many CONNECT streams.
//! * [`request`] — parsing of the CONNECT request (authority and the headers ztunnel sends);
//!   pure, fuzzed by `fuzz/fuzz_targets/hbone_connect.rs`.
//! * [`H2Io`] — one CONNECT stream as `AsyncRead + AsyncWrite`, with HTTP/2 flow control as
//!   the back-pressure.

pub mod client;
pub mod request;
pub(crate) mod server;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use client::{HboneClient, HboneError, HboneStream, SourceInfo};
pub use request::{Baggage, ConnectRequest, RequestError};

/// The HBONE port: ztunnel's `inbound_addr` is `[::]:15008`.
pub const DEFAULT_PORT: u16 = 15008;

/// ALPN of the HBONE mTLS connection: plain HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// HTTP/2 settings, ztunnel's defaults (`src/config.rs`): stream window 4 MiB
/// (`HTTP2_STREAM_WINDOW_SIZE`), connection window 16 MiB (`HTTP2_CONNECTION_WINDOW_SIZE`,
/// "Setting this to the same value as window_size can introduce deadlocks in some
/// applications"), frame size 1 MiB (`HTTP2_FRAME_SIZE`).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const FRAME_SIZE: u32 = 1024 * 1024;
/// ztunnel: "64KB max; default is 16MB driven from Golang's defaults. Since we know we are
/// going to receive a bounded set of headers, more is overkill."
pub const MAX_HEADER_LIST: u32 = 64 * 1024;
/// ztunnel: "400kb, default from hyper".
pub const MAX_SEND_BUFFER: usize = 400 * 1024;
/// Concurrent CONNECT streams a server accepts on one connection (hyper's and ztunnel's
/// default).
pub const MAX_CONCURRENT_STREAMS: u32 = 200;

const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Keepalive, both directions, as ztunnel does: a PING every 10 s; no PONG within 20 s means
/// the peer is gone.
///
/// Pings the peer every [`PING_INTERVAL`]; resolves `Ok(())` when a PING goes unanswered for
/// [`PING_TIMEOUT`]. The task ends with the connection (its ping then fails).
pub(crate) fn spawn_keepalive(ping: Option<h2::PingPong>) -> tokio::sync::oneshot::Receiver<()> {
    let (dead, rx) = tokio::sync::oneshot::channel();
    if let Some(mut ping) = ping {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PING_INTERVAL).await;
                match tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    // The connection ended: nothing to report.
                    Ok(Err(_)) => return,
                    Err(_) => {
                        let _ = dead.send(());
                        return;
                    }
                }
            }
        });
    }
    rx
}

/// The inbound HBONE listener's settings.
#[derive(Debug, Clone)]
pub struct HboneConfig {
    /// Where to listen (default `0.0.0.0:15008`).
    pub listen: SocketAddr,
}

/// One HTTP/2 CONNECT stream as a byte stream.
///
/// Reading hands out DATA frames and releases their flow-control capacity only as the reader
/// consumes them, so a slow reader stops the peer (back-pressure through the stream window).
/// Writing reserves send capacity and waits for the peer's window. Shutdown sends an empty
/// DATA frame with END_STREAM (a half-close, like TCP's FIN). Dropping the stream before
/// shutdown makes the h2 crate reset it (`RST_STREAM(CANCEL)`), which the peer sees as an
/// aborted connection.
pub struct H2Io {
    recv: h2::RecvStream,
    send: h2::SendStream<Bytes>,
    /// The unread rest of the last DATA frame.
    buf: Bytes,
    write_closed: bool,
}

impl H2Io {
    pub(crate) fn new(recv: h2::RecvStream, send: h2::SendStream<Bytes>) -> Self {
        H2Io {
            recv,
            send,
            buf: Bytes::new(),
            write_closed: false,
        }
    }

    /// Aborts the stream now with `RST_STREAM(reason)`; the other streams of the connection
    /// are not affected.
    pub fn reset(&mut self, reason: h2::Reason) {
        self.send.send_reset(reason);
    }
}

/// An h2 error as an I/O error, keeping the meaning: a reset with `NO_ERROR` after the peer
/// finished is an orderly end; other resets are aborts; anything else a broken connection.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = match e.reason() {
        Some(h2::Reason::CANCEL) | Some(h2::Reason::STREAM_CLOSED) => {
            io::ErrorKind::ConnectionReset
        }
        Some(h2::Reason::REFUSED_STREAM) => io::ErrorKind::ConnectionRefused,
        Some(_) if e.is_remote() => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::BrokenPipe,
    };
    io::Error::new(kind, e)
}

impl H2Io {
    /// Waits until `buf` holds the rest of a DATA frame; `Ok(false)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.buf = data,
                Some(Err(e)) => {
                    // The peer reset with NO_ERROR after sending everything: an orderly end.
                    if e.reason() == Some(h2::Reason::NO_ERROR) {
                        return Poll::Ready(Ok(false));
                    }
                    return Poll::Ready(Err(h2_to_io(e)));
                }
                None => return Poll::Ready(Ok(false)),
            }
        }
        Poll::Ready(Ok(true))
    }
}

/// A copy takes each DATA frame as it came (no copy into its buffer). The window is given back
/// when the frame is handed over: the copy holds at most one frame until it is written, so
/// the back-pressure is the same as a reader's.
impl crate::copy::Side for H2Io {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        Some(self.poll_fill(cx).map_ok(|_| {
            let chunk = std::mem::take(&mut self.buf);
            let _ = self.recv.flow_control().release_capacity(chunk.len());
            chunk
        }))
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !ready!(this.poll_fill(cx))? {
            return Poll::Ready(Ok(()));
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        // Give the window back only for what the reader took: that is the back-pressure.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.send.reserve_capacity(buf.len());
        loop {
            let cap = this.send.capacity();
            if cap > 0 {
                let n = cap.min(buf.len());
                this.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_to_io)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Sent data is queued in the connection, which writes it as the window allows.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.write_closed {
            this.write_closed = true;
            // Releases any unused reservation and ends our half of the stream.
            this.send.reserve_capacity(0);
            if let Err(e) = this.send.send_data(Bytes::new(), true) {
                // Already reset by the peer: nothing left to close.
                tracing::trace!(error = %e, "HBONE stream was already closed at shutdown");
            }
        }
        Poll::Ready(Ok(()))
    }
}
