//! The inbound path: accept, apply PeerAuthentication, terminate mTLS, pick the protocol,
//! hand over to HTTP or TCP forwarding.

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use outrigger_policy::MtlsMode;

use crate::conn::ConnInfo;
use crate::ctx::Ctx;
use crate::detect::{self, Sniffed};
use crate::io::Rewind;
use crate::limits::{Overflow, Permit};
use crate::metrics::{Lv, connection_labels};
use crate::workload::InboundConfig;
use crate::workload::Protocol;

pub(crate) async fn serve_listener(listener: TcpListener, cfg: Arc<InboundConfig>, ctx: Arc<Ctx>) {
    let mut drain = ctx.drain.clone();
    let listener_lv = Lv::new(&cfg.name);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = drain.wait_for(|d| *d) => break,
        };
        match accepted {
            Ok((stream, src)) => {
                // The global cap is checked at accept, before any work, as Envoy's global
                // connection limit is: the socket is closed at once.
                let permit = match ctx.conns.try_acquire() {
                    Ok(p) => p,
                    Err(o) => {
                        drop(stream);
                        refuse_overflow(&ctx, &listener_lv, &cfg.name, src, None, o);
                        continue;
                    }
                };
                ctx.status_rates
                    .connections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let ctx = ctx.clone();
                let cfg = cfg.clone();
                let lv = listener_lv.clone();
                tokio::spawn(async move {
                    handle_connection(stream, src, cfg, lv, ctx, permit).await;
                });
            }
            Err(e) => accept_failed(&cfg.name, &e).await,
        }
    }
    tracing::debug!(listener = %cfg.name, "listener stopped accepting");
}

async fn handle_connection(
    stream: TcpStream,
    src: SocketAddr,
    cfg: Arc<InboundConfig>,
    listener_lv: Lv,
    ctx: Arc<Ctx>,
    mut permit: Permit,
) {
    let _ = stream.set_nodelay(true);
    let dst = stream.local_addr().unwrap_or(cfg.listen);
    let policy = ctx.policy.load();
    // "portLevelMtls: Port specific mutual TLS settings" — keyed by the port the workload
    // receives on, which for Outrigger is the mesh-facing listener port.
    let mtls = policy.snapshot.mtls_mode(cfg.listen.port());
    drop(policy);
    // `None`: nothing arrived within `timeouts.detect` (or the client closed first).
    let first = match detect::peek_is_tls(&stream, ctx.settings.detect_timeout).await {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(%src, error = %e, "connection failed before any byte");
            return;
        }
    };
    // Nothing sent in time: under STRICT that can only become a rejection; otherwise the
    // client may be waiting for a server-first protocol, so it is plaintext.
    let is_tls = first.unwrap_or(false);
    let policy_name = mtls.source.as_deref().unwrap_or("<default>");
    match (mtls.mode, is_tls) {
        // A connection that sent nothing is not a plaintext client: say which it was.
        (MtlsMode::Strict, false) if first.is_none() => {
            ctx.metrics.reject(&listener_lv, "no_client_hello");
            crate::warn_limited!(
                listener = %cfg.name, %src,
                "connection closed: no TLS ClientHello within timeouts.detect ({:?}); mTLS \
                 mode is STRICT on port {}",
                ctx.settings.detect_timeout,
                cfg.listen.port()
            );
        }
        (MtlsMode::Strict, false) => {
            ctx.metrics.reject(&listener_lv, "plaintext");
            crate::warn_limited!(
                listener = %cfg.name, %src,
                peer_authentication = policy_name,
                "plaintext connection refused: mTLS mode is STRICT on port {}",
                cfg.listen.port()
            );
        }
        (MtlsMode::Disable, _) | (MtlsMode::Permissive, false) => {
            // DISABLE: "Connection is not tunneled" — bytes pass as they come, TLS included,
            // exactly as a sidecar with mTLS disabled does.
            let conn = ConnInfo {
                listener: cfg,
                peer_principal: None,
                xfcc: None,
                src,
                dst,
                sni: None,
                labels: connection_labels(&ctx.dest_labels, None),
            };
            serve_stream(stream, None, Arc::new(conn), ctx).await;
        }
        (MtlsMode::Strict | MtlsMode::Permissive, true) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(ctx.certs.server_config());
            let tls = match tokio::time::timeout(
                ctx.settings.handshake_timeout,
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    ctx.metrics.reject(
                        &listener_lv,
                        outrigger_tls::verify::handshake_refusal_reason(&e),
                    );
                    crate::warn_limited!(
                        listener = %cfg.name, %src,
                        "mTLS handshake refused: {}",
                        outrigger_tls::verify::describe_handshake_error(&e)
                    );
                    return;
                }
                Err(_) => {
                    ctx.metrics.reject(&listener_lv, "tls_timeout");
                    crate::warn_limited!(listener = %cfg.name, %src, "mTLS handshake timed out");
                    return;
                }
            };
            let (_, session) = tls.get_ref();
            let peer_chain = session.peer_certificates().unwrap_or(&[]);
            // The verifier already required a trusted chain with one SPIFFE ID from a trusted
            // domain; this only reads it back.
            let peer = match outrigger_tls::peer_identity(peer_chain) {
                Ok(id) => id,
                Err(e) => {
                    ctx.metrics.reject(&listener_lv, "identity");
                    crate::warn_limited!(listener = %cfg.name, %src, "peer identity refused: {e}");
                    return;
                }
            };
            let peer_id = peer.to_string();
            if let Err(o) = permit.charge_identity(&peer_id) {
                drop(tls);
                refuse_overflow(&ctx, &listener_lv, &cfg.name, src, Some(&peer_id), o);
                return;
            }
            let xfcc = peer_chain
                .first()
                .and_then(|leaf| xfcc_header(&ctx, leaf.as_ref(), &peer));
            let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
            let sni = session.server_name().map(str::to_string);
            let conn = ConnInfo {
                listener: cfg,
                peer_principal: Some(peer.principal()),
                labels: connection_labels(&ctx.dest_labels, Some(&peer)),
                xfcc,
                src,
                dst,
                sni,
            };
            serve_stream(tls, alpn.as_deref(), Arc::new(conn), ctx).await;
        }
    }
}

/// Counts and logs (rate-limited, `warn_limited!`) a connection refused by a connection cap.
/// The caller has already closed it.
pub(crate) fn refuse_overflow(
    ctx: &Ctx,
    listener_lv: &Lv,
    listener: &str,
    src: SocketAddr,
    peer: Option<&str>,
    why: Overflow,
) {
    ctx.metrics.reject(listener_lv, why.reason());
    let limits = ctx.conns.limits();
    match why {
        Overflow::Global => crate::warn_limited!(
            listener, %src, max = limits.max,
            "connection refused: {} downstream connections are open (connections.max)",
            limits.max
        ),
        Overflow::Identity => crate::warn_limited!(
            listener, %src, peer = peer.unwrap_or("-"), max_per_identity = limits.max_per_identity,
            "connection refused: this identity has {} connections open \
             (connections.maxPerIdentity)",
            limits.max_per_identity
        ),
    }
}

/// `accept` failed (EMFILE and friends, which the connection caps should prevent): log it
/// (rate-limited) and back off briefly instead of spinning.
pub(crate) async fn accept_failed(listener: &str, e: &std::io::Error) {
    crate::warn_limited!(listener, error = %e, "accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// Envoy-format `x-forwarded-client-cert` for a verified peer: `By=` this workload, `Hash=`
/// the peer leaf's SHA-256, `URI=` the peer's SPIFFE ID.
pub(crate) fn xfcc_header(
    ctx: &Ctx,
    leaf_der: &[u8],
    peer: &outrigger_identity::Identity,
) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "By={};Hash={};Subject=\"\";URI={}",
        ctx.workload.identity,
        outrigger_tls::cert_sha256_hex(leaf_der),
        peer
    ))
    .ok()
}

/// The protocol an ALPN value commits the client to. Istio's sidecars offer `istio-http/1.1`
/// or `istio-h2` for HTTP and `istio` / `istio-peer-exchange` for TCP or unknown protocols.
fn alpn_protocol(alpn: Option<&[u8]>) -> Option<Sniffed> {
    match alpn? {
        b"h2" | b"istio-h2" => Some(Sniffed::Http2),
        b"http/1.1" | b"http/1.0" | b"istio-http/1.1" | b"istio-http/1.0" => Some(Sniffed::Http1),
        _ => None,
    }
}

pub(crate) async fn serve_stream<T>(io: T, alpn: Option<&[u8]>, conn: Arc<ConnInfo>, ctx: Arc<Ctx>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if let Some((io, kind)) = classify_stream(io, alpn, &conn, &ctx).await {
        serve_classified(io, kind, conn, ctx).await;
    }
}

/// How a decrypted stream is served once its protocol is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamKind {
    /// HTTP; `true` for HTTP/2.
    Http(bool),
    Tcp,
}

/// Picks the protocol of a stream (configured, ALPN, or sniffed); the sniffed bytes are
/// replayed. `None`: the stream failed during detection.
pub(crate) async fn classify_stream<T>(
    mut io: T,
    alpn: Option<&[u8]>,
    conn: &ConnInfo,
    ctx: &Ctx,
) -> Option<(Rewind<T>, StreamKind)>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let configured = conn.listener.protocol;
    let (proto, replay) = match configured {
        Protocol::Tcp => (Sniffed::Opaque, bytes::Bytes::new()),
        _ => match alpn_protocol(alpn) {
            Some(p) => (p, bytes::Bytes::new()),
            None => match detect::sniff(&mut io, ctx.settings.detect_timeout).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(src = %conn.src, error = %e, "connection failed during detection");
                    return None;
                }
            },
        },
    };
    let kind = match (proto, configured) {
        (Sniffed::Http2, _) => StreamKind::Http(true),
        // A listener declared `http` answers non-HTTP bytes with HTTP's own 400.
        (Sniffed::Http1, _) => StreamKind::Http(false),
        (Sniffed::Opaque, p) if p.is_http() => StreamKind::Http(false),
        (Sniffed::Opaque, _) => StreamKind::Tcp,
    };
    Some((Rewind::new(replay, io), kind))
}

/// Serves a classified stream: HTTP forwarding (per-request authorization) or TCP forwarding
/// (per-connection authorization).
pub(crate) async fn serve_classified<T>(io: T, kind: StreamKind, conn: Arc<ConnInfo>, ctx: Arc<Ctx>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match kind {
        StreamKind::Http(h2) => crate::http_fwd::serve(io, h2, conn, ctx).await,
        StreamKind::Tcp => crate::tcp_fwd::serve(io, conn, ctx).await,
    }
}
