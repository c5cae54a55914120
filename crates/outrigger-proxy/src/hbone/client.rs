//! The outbound side of HBONE: CONNECT streams to a ztunnel, a waypoint or another Outrigger.
//!
//! Istio: "application connections over the HBONE protocol to the same destination identity
//! will be multiplexed across the same shared, encrypted and secured underlying HTTP/2
//! connection". The pool therefore keys connections by (peer address, expected identity) and
//! opens another connection only when every pooled one carries [`MAX_STREAMS_PER_CONN`]
//! streams (ztunnel's `POOL_MAX_STREAMS_PER_CONNECTION` default is 100) or has closed.
//!
//! A pooled connection is PINGed every 10 s (no PONG within 20 s closes it, with its streams)
//! and released once it has carried no stream for the idle timeout (ztunnel's
//! `POOL_UNUSED_RELEASE_TIMEOUT`, 5 minutes by default).
//!
//! Each stream is an [`HboneStream`]: bytes both ways under HTTP/2 flow control (a slow
//! reader on either side stops the writer through the stream window), a half-close as
//! END_STREAM, an abort as RST_STREAM that leaves the other streams of the connection alone.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use outrigger_identity::Identity;
use outrigger_tls::CertStore;
use outrigger_tls::rustls_pki_types::ServerName;

use crate::hbone::request::{BAGGAGE, Baggage, FORWARDED, TRACEPARENT};
use crate::hbone::{
    ALPN_H2, CONNECTION_WINDOW, FRAME_SIZE, H2Io, MAX_HEADER_LIST, MAX_SEND_BUFFER, STREAM_WINDOW,
};

/// Streams one pooled connection carries before the pool opens another.
pub const MAX_STREAMS_PER_CONN: usize = 100;

/// How long a pooled connection may carry no stream before it is closed (ztunnel's
/// `DEFAULT_POOL_UNUSED_RELEASE_TIMEOUT`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Who is calling: sent to the peer as `baggage`, as ztunnel does for its workloads.
#[derive(Debug, Clone, Default)]
pub struct SourceInfo {
    pub baggage: Baggage,
    /// The workload kind in the baggage key (`k8s.<kind>.name`); `workloadentry` for a VM.
    pub kind: String,
}

/// Why a CONNECT stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("cannot connect to HBONE peer {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("connecting to HBONE peer {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("mTLS with HBONE peer {0} failed: {1}")]
    Tls(SocketAddr, String),
    /// The peer is a valid mesh workload, but not one of the expected identities.
    #[error("mTLS with HBONE peer {0} failed: {1}")]
    UnexpectedIdentity(SocketAddr, String),
    #[error("HTTP/2 with HBONE peer {0} failed: {1}")]
    Http2(SocketAddr, h2::Error),
    #[error("HBONE peer {peer} answered CONNECT {target} with {status}")]
    Status {
        peer: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
    },
    #[error("HBONE peer {0} did not answer CONNECT in time")]
    ResponseTimeout(SocketAddr),
}

impl HboneError {
    /// The error as the application's socket would see it.
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            HboneError::Connect(_, e) => e.kind(),
            HboneError::ConnectTimeout(_) | HboneError::ResponseTimeout(_) => {
                io::ErrorKind::TimedOut
            }
            HboneError::Status { status, .. } if *status == StatusCode::SERVICE_UNAVAILABLE => {
                io::ErrorKind::ConnectionRefused
            }
            HboneError::Status { .. }
            | HboneError::Tls(..)
            | HboneError::UnexpectedIdentity(..) => io::ErrorKind::PermissionDenied,
            HboneError::Http2(..) => io::ErrorKind::ConnectionReset,
        };
        io::Error::new(kind, self)
    }
}

/// The peer and the identities it may present (any one of them).
type Key = (SocketAddr, Vec<Identity>);

struct Pooled {
    send: h2::client::SendRequest<Bytes>,
    /// The identity the peer presented (one of the expected ones).
    peer: Identity,
    active: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
}

impl Pooled {
    /// Takes a stream slot if this connection is open and has one.
    fn try_reserve(&self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_STREAMS_PER_CONN).then_some(n + 1)
            })
            .is_ok()
    }
}

#[derive(Default)]
struct PeerPool {
    conns: Mutex<Vec<Pooled>>,
    /// One dial at a time per key: concurrent callers wait for it and share the connection.
    dialing: tokio::sync::Mutex<()>,
}

impl PeerPool {
    fn pick(&self) -> Option<Picked> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| !c.closed.load(Ordering::Acquire));
        conns.iter().find(|c| c.try_reserve()).map(Picked::of)
    }

    /// Takes the connection whose `closed` flag is `closed` out of the pool: it gets no new
    /// streams, and its `SendRequest` is dropped so that the connection ends once its last
    /// stream does.
    fn remove(&self, closed: &Arc<AtomicBool>) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|c| !Arc::ptr_eq(&c.closed, closed));
    }
}

/// A reserved stream slot on a pooled connection.
struct Picked {
    send: h2::client::SendRequest<Bytes>,
    peer: Identity,
    slot: Slot,
}

impl Picked {
    /// Call only after the slot was reserved (`try_reserve`, or a fresh connection's count).
    fn of(c: &Pooled) -> Self {
        Picked {
            send: c.send.clone(),
            peer: c.peer.clone(),
            slot: Slot {
                active: c.active.clone(),
            },
        }
    }
}

/// A stream slot on a pooled connection, given back on drop.
struct Slot {
    active: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Inner {
    certs: CertStore,
    baggage: Option<http::HeaderValue>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    pools: Mutex<HashMap<Key, Arc<PeerPool>>>,
    dials: AtomicU64,
    /// Connections whose driving task is still running.
    live: Arc<AtomicUsize>,
}

/// A pool of HBONE connections. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct HboneClient {
    inner: Arc<Inner>,
}

impl HboneClient {
    /// A client presenting the workload certificate from `certs` (read at each dial, so a
    /// rotated certificate is used by the next connection).
    pub fn new(certs: CertStore, source: &SourceInfo, connect_timeout: Duration) -> Self {
        Self::with_idle_timeout(certs, source, connect_timeout, DEFAULT_IDLE_TIMEOUT)
    }

    /// [`new`](Self::new) with a connection released after `idle_timeout` without streams.
    pub fn with_idle_timeout(
        certs: CertStore,
        source: &SourceInfo,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let kind = if source.kind.is_empty() {
            "workloadentry"
        } else {
            &source.kind
        };
        let baggage = http::HeaderValue::from_str(&source.baggage.to_header(kind))
            .ok()
            .filter(|v| !v.is_empty());
        HboneClient {
            inner: Arc::new(Inner {
                certs,
                baggage,
                connect_timeout,
                idle_timeout,
                pools: Mutex::new(HashMap::new()),
                dials: AtomicU64::new(0),
                live: Arc::new(AtomicUsize::new(0)),
            }),
        }
    }

    /// Opens a CONNECT stream to `target` through the HBONE peer at `peer_addr`, which must
    /// present `expected_identity`.
    pub async fn connect(
        &self,
        peer_addr: SocketAddr,
        expected_identity: &Identity,
        target: SocketAddr,
    ) -> Result<HboneStream, HboneError> {
        self.connect_from(
            peer_addr,
            std::slice::from_ref(expected_identity),
            target,
            None,
            None,
        )
        .await
    }

    /// [`connect`](Self::connect) to a peer that may present any of `expected` (a service
    /// run by several service accounts), with the original client address and the intended
    /// service host, sent in `forwarded` (`for="<client>";host=<service>`) as ztunnel does.
    pub async fn connect_from(
        &self,
        peer_addr: SocketAddr,
        expected: &[Identity],
        target: SocketAddr,
        client: Option<SocketAddr>,
        service_host: Option<&str>,
    ) -> Result<HboneStream, HboneError> {
        let pool = {
            let mut pools = self.inner.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools
                .entry((peer_addr, expected.to_vec()))
                .or_default()
                .clone()
        };
        let picked = match pool.pick() {
            Some(p) => p,
            None => {
                let _dial = pool.dialing.lock().await;
                match pool.pick() {
                    Some(p) => p,
                    None => {
                        let c = self.dial(peer_addr, expected, &pool).await?;
                        c.active.fetch_add(1, Ordering::AcqRel);
                        let picked = Picked::of(&c);
                        pool.conns.lock().unwrap_or_else(|e| e.into_inner()).push(c);
                        picked
                    }
                }
            }
        };
        let Picked { send, peer, slot } = picked;
        let req = self.request(target, client, service_host);
        let mut send = send
            .ready()
            .await
            .map_err(|e| HboneError::Http2(peer_addr, e))?;
        let (resp, stream) = send
            .send_request(req, false)
            .map_err(|e| HboneError::Http2(peer_addr, e))?;
        let resp = tokio::time::timeout(self.inner.connect_timeout, resp)
            .await
            .map_err(|_| HboneError::ResponseTimeout(peer_addr))?
            .map_err(|e| HboneError::Http2(peer_addr, e))?;
        if resp.status() != StatusCode::OK {
            return Err(HboneError::Status {
                peer: peer_addr,
                target,
                status: resp.status(),
            });
        }
        Ok(HboneStream {
            io: H2Io::new(resp.into_body(), stream),
            peer,
            _slot: slot,
        })
    }

    /// How many connections were dialled so far (pooling makes this much smaller than the
    /// number of streams).
    pub fn dials(&self) -> u64 {
        self.inner.dials.load(Ordering::Relaxed)
    }

    /// How many HBONE connections are open (pooled, or released and finishing their streams).
    pub fn open_connections(&self) -> usize {
        self.inner.live.load(Ordering::Acquire)
    }

    fn request(
        &self,
        target: SocketAddr,
        client: Option<SocketAddr>,
        service_host: Option<&str>,
    ) -> Request<()> {
        let mut b = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri(target.to_string())
            .header(TRACEPARENT, new_traceparent());
        if let Some(v) = &self.inner.baggage {
            b = b.header(BAGGAGE, v.clone());
        }
        if let Some(c) = client {
            let fwd = match service_host {
                Some(h) => format!("for=\"{c}\";host={h}"),
                None => format!("for=\"{c}\""),
            };
            if let Ok(v) = http::HeaderValue::from_str(&fwd) {
                b = b.header(FORWARDED, v);
            }
        }
        b.body(()).expect("a CONNECT to a socket address is valid")
    }

    async fn dial(
        &self,
        peer: SocketAddr,
        expected: &[Identity],
        pool: &Arc<PeerPool>,
    ) -> Result<Pooled, HboneError> {
        self.inner.dials.fetch_add(1, Ordering::Relaxed);
        let timeout = self.inner.connect_timeout;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(peer))
            .await
            .map_err(|_| HboneError::ConnectTimeout(peer))?
            .map_err(|e| HboneError::Connect(peer, e))?;
        let _ = tcp.set_nodelay(true);
        let cfg = self
            .inner
            .certs
            .client_config(expected, &[ALPN_H2])
            .map_err(|e| HboneError::Tls(peer, e.to_string()))?;
        // The peer is verified by SPIFFE identity, not by name; an IP sends no SNI.
        let name = ServerName::IpAddress(peer.ip().into());
        let tls = tokio::time::timeout(
            timeout,
            tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
        )
        .await
        .map_err(|_| HboneError::ConnectTimeout(peer))?
        .map_err(|e| {
            let why = outrigger_tls::describe_handshake_error(&e);
            if outrigger_tls::is_unexpected_identity(&e) {
                HboneError::UnexpectedIdentity(peer, why)
            } else {
                HboneError::Tls(peer, why)
            }
        })?;
        // The verifier checked the chain and the pin; this reads back which identity it was.
        let presented =
            outrigger_tls::peer_identity(tls.get_ref().1.peer_certificates().unwrap_or(&[]))
                .map_err(|e| HboneError::Tls(peer, e.to_string()))?;
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| HboneError::Http2(peer, e))?;
        let closed = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let watch = ConnWatch {
            peer,
            closed: closed.clone(),
            active: active.clone(),
            pool: pool.clone(),
            idle_timeout: self.inner.idle_timeout,
            live: self.inner.live.clone(),
        };
        watch.live.fetch_add(1, Ordering::AcqRel);
        let peer_dead = super::spawn_keepalive(conn.ping_pong());
        tokio::spawn(async move { watch.drive(&mut conn, peer_dead).await });
        tracing::debug!(%peer, identity = %presented, "HBONE connection established");
        Ok(Pooled {
            send,
            peer: presented,
            active,
            closed,
        })
    }
}

/// What the task driving one pooled connection needs to release it.
struct ConnWatch {
    peer: SocketAddr,
    closed: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    pool: Arc<PeerPool>,
    idle_timeout: Duration,
    live: Arc<AtomicUsize>,
}

impl ConnWatch {
    /// Drives the connection until it ends; takes it out of the pool when the peer stops
    /// answering PINGs (the connection is dropped, its streams fail) or when it has carried
    /// no stream for the idle timeout (it then ends gracefully, its last stream finished).
    async fn drive<T>(
        self,
        conn: &mut h2::client::Connection<T, Bytes>,
        mut peer_dead: tokio::sync::oneshot::Receiver<()>,
    ) where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let peer = self.peer;
        let mut keepalive_over = false;
        let check_every =
            (self.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(30));
        let mut tick = tokio::time::interval(check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut idle_since: Option<Instant> = None;
        let mut released = false;
        loop {
            tokio::select! {
                r = &mut *conn => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "HBONE connection ended");
                    }
                    break;
                }
                r = &mut peer_dead, if !keepalive_over => {
                    keepalive_over = true;
                    if r.is_ok() {
                        tracing::info!(%peer, "HBONE peer did not answer PING in time: closing the connection");
                        break;
                    }
                }
                _ = tick.tick(), if !released => {
                    if self.active.load(Ordering::Acquire) > 0 {
                        idle_since = None;
                    } else if idle_since.get_or_insert_with(Instant::now).elapsed() >= self.idle_timeout {
                        tracing::debug!(%peer, "releasing an idle HBONE connection");
                        self.closed.store(true, Ordering::Release);
                        self.pool.remove(&self.closed);
                        released = true;
                    }
                }
            }
        }
        self.closed.store(true, Ordering::Release);
        self.pool.remove(&self.closed);
        self.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A W3C `traceparent` with fresh random ids (sampled flag off: Outrigger does not trace).
fn new_traceparent() -> String {
    let r = |salt: u64| {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(salt);
        h.finish() | 1
    };
    format!("00-{:016x}{:016x}-{:016x}-00", r(1), r(2), r(3))
}

/// One CONNECT stream to a destination through an HBONE peer.
pub struct HboneStream {
    io: H2Io,
    peer: Identity,
    _slot: Slot,
}

impl HboneStream {
    /// The SPIFFE identity the HBONE peer presented (verified, one of the expected ones).
    pub fn peer_identity(&self) -> &Identity {
        &self.peer
    }

    /// Aborts this stream (`RST_STREAM(CANCEL)`); the connection's other streams go on.
    pub fn reset(&mut self) {
        self.io.reset(h2::Reason::CANCEL);
    }
}

impl crate::copy::Side for HboneStream {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        self.io.poll_chunk(cx)
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_valid_and_fresh() {
        let a = new_traceparent();
        let b = new_traceparent();
        assert_ne!(a, b);
        assert_eq!(
            crate::hbone::request::parse_traceparent(a.as_bytes()).as_deref(),
            Some(a.as_str())
        );
    }

    #[test]
    fn errors_map_to_socket_errors() {
        let p: SocketAddr = "127.0.0.1:15008".parse().unwrap();
        let e = HboneError::Status {
            peer: p,
            target: p,
            status: StatusCode::SERVICE_UNAVAILABLE,
        };
        assert_eq!(e.into_io().kind(), io::ErrorKind::ConnectionRefused);
        let e = HboneError::Status {
            peer: p,
            target: p,
            status: StatusCode::UNAUTHORIZED,
        };
        assert_eq!(e.into_io().kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(
            HboneError::ConnectTimeout(p).into_io().kind(),
            io::ErrorKind::TimedOut
        );
    }
}
