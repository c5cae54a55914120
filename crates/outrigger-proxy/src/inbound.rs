//! The direct inbound path: apply PeerAuthentication to each accepted connection, terminate
//! mTLS (`accept`: handshake, peer identity, connection context), pick the protocol, hand over
//! to HTTP or TCP forwarding. The HBONE listener (`hbone::server`) joins this path at
//! [`classify_stream`] for each of its CONNECT streams.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use outrigger_policy::MtlsMode;

use crate::accept;
use crate::conn::ConnInfo;
use crate::ctx::Ctx;
use crate::detect::{self, Sniffed};
use crate::io::{BoxStream, Rewind};
use crate::limits::Permit;
use crate::tcp_mx;
use crate::workload::InboundConfig;
use crate::workload::Protocol;

pub(crate) async fn serve_listener(listener: TcpListener, cfg: Arc<InboundConfig>, ctx: Arc<Ctx>) {
    let door = Arc::new(accept::Listener::direct(&cfg.name, !cfg.protocol.is_http()));
    accept::serve(listener, &ctx, &door, |stream, src, permit| {
        ctx.status_rates
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ctx = ctx.clone();
        let cfg = cfg.clone();
        let door = door.clone();
        tokio::spawn(async move {
            handle_connection(stream, src, cfg, door, ctx, permit).await;
        });
    })
    .await;
}

async fn handle_connection(
    stream: TcpStream,
    src: SocketAddr,
    cfg: Arc<InboundConfig>,
    door: Arc<accept::Listener>,
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
            ctx.metrics.reject(&door.lv, "no_client_hello");
            crate::warn_limited!(
                listener = %cfg.name, %src,
                "connection closed: no TLS ClientHello within timeouts.detect ({:?}); mTLS \
                 mode is STRICT on port {}",
                ctx.settings.detect_timeout,
                cfg.listen.port()
            );
        }
        (MtlsMode::Strict, false) => {
            ctx.metrics.reject(&door.lv, "plaintext");
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
            let conn = accept::plaintext(&ctx, cfg, src, dst);
            serve_stream(Box::new(stream), None, Arc::new(conn), ctx).await;
        }
        (MtlsMode::Strict | MtlsMode::Permissive, true) => {
            // The handshake's state (the TLS session mid-handshake, its timeout) lives in an
            // allocation of its own, freed when the handshake ends, so that the connection's
            // task does not keep room for it while the connection sits idle.
            let Some((tls, peer)) =
                Box::pin(accept::mtls(stream, src, &ctx, &door, &mut permit)).await
            else {
                return;
            };
            let (_, session) = tls.get_ref();
            let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
            let sni = session.server_name().map(str::to_string);
            let conn = peer.conn(cfg, src, dst, sni);
            serve_stream(Box::new(tls), alpn.as_deref(), Arc::new(conn), ctx).await;
        }
    }
}

/// The protocol an ALPN value commits the client to. Istio's sidecars offer `istio-http/1.1`
/// or `istio-h2` for HTTP and `istio` / `istio-peer-exchange` for TCP or unknown protocols.
/// `istio-peer-exchange` is TCP: Istio's inbound listener sends a connection offering it to
/// its TCP filter chain (`mtlsTCPWithMxcALPNs`, istio/istio `pilot/pkg/networking/core/
/// filterchain_options.go`), without sniffing; its stream starts with the metadata exchange
/// (crate::tcp_mx), not with the application's bytes.
fn alpn_protocol(alpn: Option<&[u8]>) -> Option<Sniffed> {
    match alpn? {
        b"h2" | b"istio-h2" => Some(Sniffed::Http2),
        b"http/1.1" | b"http/1.0" | b"istio-http/1.1" | b"istio-http/1.0" => Some(Sniffed::Http1),
        a if a == tcp_mx::ALPN => Some(Sniffed::Opaque),
        _ => None,
    }
}

/// Serves an accepted direct connection (mTLS already terminated, or plaintext). The stream
/// is boxed ([`BoxStream`]): the task of an idle connection holds a pointer to it.
async fn serve_stream(io: BoxStream, alpn: Option<&[u8]>, conn: Arc<ConnInfo>, ctx: Arc<Ctx>) {
    if let Some((io, kind)) = classify_stream(io, alpn, &conn, &ctx).await {
        if kind == StreamKind::Tcp && alpn == Some(tcp_mx::ALPN) {
            // Boxed, as the other phases (serve_boxed): the exchange and TCP forwarding
            // would otherwise size every connection's task.
            Box::pin(crate::tcp_fwd::serve_exchange(io, conn, ctx)).await;
        } else {
            serve_classified(io, kind, conn, ctx).await;
        }
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
/// (per-connection authorization). Whatever the stream's type, it is served as a
/// [`BoxStream`], by one copy of the forwarding code.
pub(crate) async fn serve_classified<T>(io: T, kind: StreamKind, conn: Arc<ConnInfo>, ctx: Arc<Ctx>)
where
    T: crate::copy::Side + Send + 'static,
{
    serve_boxed(Box::new(io), kind, conn, ctx).await
}

async fn serve_boxed(io: BoxStream, kind: StreamKind, conn: Arc<ConnInfo>, ctx: Arc<Ctx>) {
    match kind {
        StreamKind::Http(h2) => crate::http_fwd::serve(io, h2, conn, ctx).await,
        // Boxed: the TCP path's state (the external authorizer's check among it) would
        // otherwise size every connection's task, HTTP ones included.
        StreamKind::Tcp => Box::pin(crate::tcp_fwd::serve(io, conn, ctx)).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async function returns, from the function alone.
    fn future_size<A, B, C, D, E, G, F: Future>(_: impl FnOnce(A, B, C, D, E, G) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    fn future_size4<A, B, C, D, F: Future>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every accepted connection's task is allocated at accept with room for the largest state
    /// any connection could reach, and holds it while the connection sits idle. The large
    /// phases (the handshake, HTTP/1 and HTTP/2 connection state, TCP forwarding with its
    /// external authorization call) are boxed when they start, so the task stays small: it was
    /// 26 KiB per connection before (BENCHMARKS.md "Memory: per idle connection").
    #[test]
    fn a_connection_task_keeps_no_room_for_its_large_phases() {
        let task = future_size(handle_connection);
        assert!(task <= 4096, "a connection's task future is {task} bytes");
        let classified = future_size4(serve_boxed);
        assert!(
            classified <= 1024,
            "serving a classified stream takes {classified} bytes in the task"
        );
    }
}
