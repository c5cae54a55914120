//! mTLS origination and connection pools.
//!
//! Every upstream connection is TLS with the workload certificate as the client certificate,
//! the Istio SNI of the destination, and Istio's ALPN so that a sidecar's inbound listener
//! terminates it (its filter chains match `istio-http/1.0`, `istio-http/1.1`, `istio-h2` for
//! HTTP and `istio`/`istio-peer-exchange` for TCP) instead of passing it through. The server's
//! chain is verified against the mesh roots and its SPIFFE ID pinned by
//! [`outrigger_tls::client_config`].
//!
//! With `transport: hbone` an upstream connection is instead a CONNECT stream to the endpoint
//! through an HBONE peer (its ztunnel, a waypoint or another Outrigger), carrying the
//! application's protocol as is; the HBONE client pools and multiplexes the mTLS connections.
//!
//! Pools are per endpoint: HTTP/1.1 connections are kept alive and reused one request at a
//! time; an HTTP/2 connection is shared by every concurrent request to the endpoint.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use outrigger_identity::Identity;
use outrigger_tls::CertStore;
use outrigger_tls::rustls::ClientConfig;

use super::endpoints::Endpoint;
pub(crate) use super::idle::UpBody;
use super::idle::{H2Conn, IdleH1};
use super::{DestTransport, Destination};
use crate::hbone::{DEFAULT_PORT as HBONE_PORT, HboneError, HboneStream};
use crate::metrics::Lv;

/// Istio's ALPN overrides for upstream mTLS (istio/istio `alpn` filter): the Istio value first
/// (it selects the sidecar's filter chain), then the generic ones.
pub const ALPN_HTTP1: &[&[u8]] = &[b"istio-http/1.1", b"istio", b"http/1.1"];
pub const ALPN_HTTP2: &[&[u8]] = &[b"istio-h2", b"istio", b"h2"];
/// TCP: `istio-peer-exchange` then `istio`, as a sidecar's TCP cluster offers them (istio/istio
/// `pilot/pkg/networking/core/cluster_tls.go`: `util.ALPNInMeshWithMxc` unless
/// `PILOT_DISABLE_MX_ALPN`). A server that selects `istio-peer-exchange` (a sidecar's or
/// Outrigger's TCP listener) runs Istio's TCP metadata exchange with us at the start of the
/// stream (crate::tcp_mx); one that selects `istio` or nothing does not.
pub const ALPN_TCP: &[&[u8]] = &[outrigger_tls::PEER_EXCHANGE_ALPN, b"istio"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alpn {
    Http1 = 0,
    Http2 = 1,
    Tcp = 2,
}

impl Alpn {
    fn protocols(self) -> &'static [&'static [u8]] {
        match self {
            Alpn::Http1 => ALPN_HTTP1,
            Alpn::Http2 => ALPN_HTTP2,
            Alpn::Tcp => ALPN_TCP,
        }
    }
}

/// Why an upstream connection could not be made. Nothing was sent: any request may be retried
/// on another endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection to {0} failed: {1}")]
    Tcp(SocketAddr, std::io::Error),
    #[error("connection to {0} timed out after {1:?} (connectTimeout)")]
    Timeout(SocketAddr, Duration),
    #[error("mTLS handshake with {addr} failed: {reason}")]
    Handshake {
        addr: SocketAddr,
        reason: String,
        /// The server is a valid mesh workload but not the expected identity.
        identity_mismatch: bool,
    },
    #[error("cannot build the client TLS configuration: {0}")]
    Config(String),
    #[error("HTTP handshake with {0} failed: {1}")]
    Http(SocketAddr, hyper::Error),
    #[error("connection to {0} closed before the request could be sent")]
    Closed(SocketAddr),
    #[error("{0}")]
    Hbone(HboneError),
}

impl ConnectError {
    pub fn identity_mismatch(&self) -> bool {
        matches!(
            self,
            ConnectError::Handshake {
                identity_mismatch: true,
                ..
            } | ConnectError::Hbone(HboneError::UnexpectedIdentity(..))
        )
    }
}

/// Client TLS configs of one destination: its pinned identities. The configs themselves are
/// built and cached by the certificate store (one per ALPN and credential set, rebuilt after a
/// rotation; see [`CertStore::client_config`]).
pub(crate) struct TlsConfigs {
    certs: CertStore,
    expected: Vec<Identity>,
}

impl TlsConfigs {
    pub fn new(certs: CertStore, expected: Vec<Identity>) -> Self {
        TlsConfigs { certs, expected }
    }

    fn get(&self, alpn: Alpn) -> Result<Arc<ClientConfig>, ConnectError> {
        self.certs
            .client_config(&self.expected, alpn.protocols())
            .map_err(|e| ConnectError::Config(e.to_string()))
    }
}

/// One upstream connection: mTLS straight to the endpoint, or a CONNECT stream through an
/// HBONE peer (the outer mTLS belongs to the pooled HTTP/2 connection). Either way the bytes
/// inside are the application's protocol.
pub(crate) enum Upstream {
    Tls(Box<TlsStream<TcpStream>>),
    Hbone(HboneStream),
}

impl Upstream {
    /// The ALPN protocol the server selected (an HBONE stream has none of its own).
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Upstream::Tls(s) => s.get_ref().1.alpn_protocol(),
            Upstream::Hbone(_) => None,
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Upstream::Hbone(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl crate::copy::Side for Upstream {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<std::io::Result<bytes::Bytes>>> {
        match self {
            Upstream::Tls(_) => None,
            Upstream::Hbone(s) => s.poll_chunk(cx),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Upstream::Hbone(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Upstream::Hbone(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Upstream::Tls(s) => s.is_write_vectored(),
            Upstream::Hbone(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Upstream::Hbone(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Upstream::Hbone(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Opens one upstream connection to the endpoint `addr` with the destination's transport,
/// bounded by `connectTimeout`. Returns it with the server's verified SPIFFE ID (for HBONE:
/// the peer's, which is the workload's own when the peer is its ztunnel or Outrigger).
pub(crate) async fn connect(
    dest: &Destination,
    addr: SocketAddr,
    alpn: Alpn,
) -> Result<(Upstream, Lv), ConnectError> {
    match &dest.transport {
        DestTransport::Mtls => {
            let (tls, peer) = connect_tls(dest, addr, alpn).await?;
            Ok((Upstream::Tls(Box::new(tls)), peer))
        }
        DestTransport::Hbone { client, peer } => {
            let peer_addr = peer.unwrap_or_else(|| SocketAddr::new(addr.ip(), HBONE_PORT));
            let timeout = dest.cfg.pool.connect_timeout;
            let stream = tokio::time::timeout(
                timeout,
                client.connect_from(
                    peer_addr,
                    &dest.cfg.expected_identities,
                    addr,
                    None,
                    Some(&dest.cfg.host),
                ),
            )
            .await
            .map_err(|_| ConnectError::Timeout(peer_addr, timeout))?
            .map_err(ConnectError::Hbone)?;
            let peer = Lv::new(&stream.peer_identity().to_string());
            Ok((Upstream::Hbone(stream), peer))
        }
    }
}

/// TCP connect + mTLS handshake, together bounded by `connectTimeout`. Returns the stream and
/// the server's verified SPIFFE ID.
async fn connect_tls(
    dest: &Destination,
    addr: SocketAddr,
    alpn: Alpn,
) -> Result<(TlsStream<TcpStream>, Lv), ConnectError> {
    let config = dest.tls.get(alpn)?;
    let timeout = dest.cfg.pool.connect_timeout;
    let fut = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| ConnectError::Tcp(addr, e))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(dest.server_name.clone(), tcp)
            .await
            .map_err(|e| ConnectError::Handshake {
                addr,
                identity_mismatch: outrigger_tls::is_unexpected_identity(&e),
                reason: outrigger_tls::describe_handshake_error(&e),
            })?;
        let (_, session) = tls.get_ref();
        // The verifier has checked the chain and the pin; this reads the identity back for
        // metrics and the access log.
        let peer = outrigger_tls::peer_identity(session.peer_certificates().unwrap_or(&[]))
            .map(|id| Lv::new(&id.to_string()))
            .unwrap_or_else(|_| Lv::unknown());
        Ok((tls, peer))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ConnectError::Timeout(addr, timeout))?
}

/// An HTTP/1.1 connection lent to one request; given back when the response body has ended.
pub(crate) struct H1Lease {
    tx: client1::SendRequest<UpBody>,
    peer: Lv,
    uses: u32,
}

impl H1Lease {
    /// Returns the connection to its endpoint's pool, unless it reached
    /// `maxRequestsPerConnection` or is no longer usable.
    pub fn release(self, ep: &Endpoint, max_requests: u32) {
        if self.tx.is_closed() || (max_requests > 0 && self.uses >= max_requests) {
            return;
        }
        ep.pool
            .h1
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(IdleH1 {
                tx: self.tx,
                peer: self.peer,
                uses: self.uses,
                idle_since: Instant::now(),
            });
    }
}

/// Why a request failed on one endpoint.
pub(crate) enum SendError {
    /// Nothing was sent; the request comes back.
    Connect(ConnectError, Box<Request<UpBody>>),
    /// The request was (at least partly) sent and the connection failed before the response
    /// head arrived.
    Sent(hyper::Error),
}

impl SendError {
    /// What went wrong, for a log line.
    pub fn describe(&self) -> String {
        match self {
            SendError::Connect(e, _) => e.to_string(),
            SendError::Sent(e) => format!("the connection failed before the answer: {e}"),
        }
    }
}

/// A response and what it holds of its connection.
pub(crate) struct Sent {
    pub response: Response<Incoming>,
    pub lease: Option<H1Lease>,
    pub peer: Lv,
}

/// Sends one request to `ep`, on a pooled connection or a new one. A pooled connection that
/// turns out to be closed (the server timed it out) is replaced transparently.
pub(crate) async fn send(
    dest: &Destination,
    ep: &Endpoint,
    req: Request<UpBody>,
    h2: bool,
) -> Result<Sent, SendError> {
    if h2 {
        send_h2(dest, ep, req).await
    } else {
        send_h1(dest, ep, req).await
    }
}

async fn send_h1(
    dest: &Destination,
    ep: &Endpoint,
    req: Request<UpBody>,
) -> Result<Sent, SendError> {
    let idle_timeout = dest.cfg.pool.idle_timeout;
    let mut req = req;
    // Pooled connections first; each one that fails before sending is discarded.
    loop {
        let idle = {
            let mut idle = ep.pool.h1.lock().unwrap_or_else(|e| e.into_inner());
            let mut found = None;
            // A connection whose previous response has just ended may not be ready yet: it
            // stays pooled. Closed and expired ones are dropped (which closes them).
            let mut busy = Vec::new();
            while let Some(c) = idle.pop() {
                if c.tx.is_closed() || c.idle_since.elapsed() >= idle_timeout {
                    continue;
                }
                if c.tx.is_ready() {
                    found = Some(c);
                    break;
                }
                busy.push(c);
            }
            idle.extend(busy);
            found
        };
        let Some(mut c) = idle else { break };
        c.uses += 1;
        match c.tx.try_send_request(req).await {
            Ok(response) => {
                return Ok(Sent {
                    response,
                    lease: Some(H1Lease {
                        tx: c.tx,
                        peer: c.peer.clone(),
                        uses: c.uses,
                    }),
                    peer: c.peer,
                });
            }
            Err(mut e) => match e.take_message() {
                Some(back) => req = back,
                None => return Err(SendError::Sent(e.into_error())),
            },
        }
    }
    send_on_new_h1(dest, ep, req, true).await
}

/// Sends a WebSocket upgrade request on a new HTTP/1.1 connection of its own: after a `101`
/// the connection belongs to the tunnel.
pub(crate) async fn send_upgrade(
    dest: &Destination,
    ep: &Endpoint,
    req: Request<UpBody>,
) -> Result<Sent, SendError> {
    send_on_new_h1(dest, ep, req, false).await
}

/// Sends `req` on a new HTTP/1.1 connection to `ep`, driven with upgrades enabled (a `101`
/// hands it over to `hyper::upgrade::on`). With `pool`, the connection is lent to the
/// response and given back to the endpoint's pool when it ends.
async fn send_on_new_h1(
    dest: &Destination,
    ep: &Endpoint,
    req: Request<UpBody>,
    pool: bool,
) -> Result<Sent, SendError> {
    let (io, peer) = match connect(dest, ep.addr, Alpn::Http1).await {
        Ok(c) => c,
        Err(e) => return Err(SendError::Connect(e, Box::new(req))),
    };
    let (mut tx, conn) = match client1::handshake(TokioIo::new(io)).await {
        Ok(x) => x,
        Err(e) => {
            return Err(SendError::Connect(
                ConnectError::Http(ep.addr, e),
                Box::new(req),
            ));
        }
    };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
        }
    });
    match tx.try_send_request(req).await {
        Ok(response) => Ok(Sent {
            response,
            lease: pool.then(|| H1Lease {
                tx,
                peer: peer.clone(),
                uses: 1,
            }),
            peer,
        }),
        Err(mut e) => match e.take_message() {
            Some(back) => Err(SendError::Connect(
                ConnectError::Closed(ep.addr),
                Box::new(back),
            )),
            None => Err(SendError::Sent(e.into_error())),
        },
    }
}

async fn h2_conn(dest: &Destination, ep: &Endpoint) -> Result<H2Conn, ConnectError> {
    let max = dest.cfg.pool.max_requests_per_connection;
    let usable =
        |c: &H2Conn| !c.tx.is_closed() && (max == 0 || c.uses.load(Ordering::Relaxed) < max);
    if let Some(c) = ep
        .pool
        .h2
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        && usable(c)
    {
        return Ok(c.clone());
    }
    let _connecting = ep.pool.h2_connecting.lock().await;
    if let Some(c) = ep
        .pool
        .h2
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        && usable(c)
    {
        return Ok(c.clone());
    }
    let (tls, peer) = connect(dest, ep.addr, Alpn::Http2).await?;
    let (tx, conn) = client2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Detect a dead peer on an otherwise idle multiplexed connection.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|e| ConnectError::Http(ep.addr, e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
        }
    });
    let c = H2Conn {
        tx,
        peer,
        uses: Arc::new(AtomicU32::new(0)),
    };
    *ep.pool.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
    Ok(c)
}

async fn send_h2(
    dest: &Destination,
    ep: &Endpoint,
    req: Request<UpBody>,
) -> Result<Sent, SendError> {
    let mut req = req;
    for _ in 0..2 {
        let c = match h2_conn(dest, ep).await {
            Ok(c) => c,
            Err(e) => return Err(SendError::Connect(e, Box::new(req))),
        };
        c.uses.fetch_add(1, Ordering::Relaxed);
        let mut tx = c.tx.clone();
        if tx.ready().await.is_err() {
            forget_h2(ep, &c);
            continue;
        }
        match tx.try_send_request(req).await {
            Ok(response) => {
                return Ok(Sent {
                    response,
                    lease: None,
                    peer: c.peer,
                });
            }
            Err(mut e) => match e.take_message() {
                Some(back) => {
                    forget_h2(ep, &c);
                    req = back;
                }
                None => return Err(SendError::Sent(e.into_error())),
            },
        }
    }
    Err(SendError::Connect(
        ConnectError::Closed(ep.addr),
        Box::new(req),
    ))
}

/// Removes `c` from the pool if it is still the current connection.
fn forget_h2(ep: &Endpoint, c: &H2Conn) {
    let mut slot = ep.pool.h2.lock().unwrap_or_else(|e| e.into_inner());
    if slot
        .as_ref()
        .is_some_and(|cur| Arc::ptr_eq(&cur.uses, &c.uses))
    {
        *slot = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outrigger_testkit::TestPki;
    use outrigger_tls::CertSource;

    #[test]
    fn client_configs_are_cached_and_rebuilt_after_rotation() {
        let pki = TestPki::new();
        let issued = pki.issue("legacy", "windows-app");
        let store = CertStore::new(
            CertSource::Files {
                chain: issued.dir.join("cert-chain.pem"),
                key: issued.dir.join("key.pem"),
                roots: issued.dir.join("root-cert.pem"),
            },
            pki.trust(),
            vec![b"istio".to_vec()],
        )
        .unwrap();
        let tls = TlsConfigs::new(store.clone(), vec![pki.id("default", "ratings")]);
        let a = tls.get(Alpn::Http1).unwrap();
        assert!(Arc::ptr_eq(&a, &tls.get(Alpn::Http1).unwrap()), "cached");
        assert_eq!(
            a.alpn_protocols,
            vec![
                b"istio-http/1.1".to_vec(),
                b"istio".to_vec(),
                b"http/1.1".to_vec()
            ]
        );
        let h2 = tls.get(Alpn::Http2).unwrap();
        assert_eq!(h2.alpn_protocols[0], b"istio-h2".to_vec());
        assert_eq!(
            tls.get(Alpn::Tcp).unwrap().alpn_protocols,
            vec![b"istio-peer-exchange".to_vec(), b"istio".to_vec()],
            "a sidecar's TCP offer (ALPNInMeshWithMxc)"
        );

        // Rotation: a new certificate in the same files.
        pki.issue("legacy", "windows-app");
        assert!(store.reload().unwrap());
        let b = tls.get(Alpn::Http1).unwrap();
        assert!(!Arc::ptr_eq(&a, &b), "rebuilt with the new certificate");
        assert!(Arc::ptr_eq(&b, &tls.get(Alpn::Http1).unwrap()));
    }
}
