//! The inbound HBONE listener: mTLS with the workload certificate (ALPN `h2`), then HTTP/2;
//! each CONNECT stream is one inner connection to a configured inbound listener.
//!
//! Per stream, following ztunnel's inbound (`src/proxy/inbound.rs`):
//! * not CONNECT, or an `:authority` that is not `ip:port` → `400`;
//! * the IP is not an address this connection arrived on (ztunnel: "IPMismatch") → `400`;
//! * no inbound listener serves the port → `503`, never a forward anywhere else;
//! * otherwise `200`, and the stream's bytes go through the same code as a direct mTLS
//!   connection on that listener: the peer identity is the outer handshake's, the listener's
//!   port selects PeerAuthentication's port-level mode and AuthorizationPolicy's `ports`, HTTP
//!   gets RequestAuthentication and L7 rules per request, TCP gets L4 rules.
//!
//! On a `tcp` listener, as in ztunnel, L4 authorization and the backend dial come first: a
//! denied stream is answered `401`, an unreachable backend `503`, and only then `200`. On an
//! `http` or `auto` listener the `200` comes first: which rules apply (L7 per request, or L4)
//! depends on the bytes the caller sends after it; a denied HTTP request gets `403`, a denied
//! TCP connection (auto-detected) is closed (the stream is reset).
//!
//! PeerAuthentication: an HBONE stream is always mutual TLS, so STRICT and PERMISSIVE accept
//! it; as in ambient, DISABLE does not turn HBONE away either (it only allows plaintext on the
//! direct listener).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::accept;
use crate::ctx::Ctx;
use crate::hbone::request::{self, ConnectRequest};
use crate::hbone::{
    ALPN_H2, CONNECTION_WINDOW, FRAME_SIZE, H2Io, MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST,
    MAX_SEND_BUFFER, STREAM_WINDOW,
};
use crate::inbound::{self, StreamKind};
use crate::io::{ByteCounts, Counted};
use crate::limits::{Active, Activity, Permit};
use crate::metrics::{Lv, TcpLabels};
use crate::tcp_fwd;
use crate::workload::InboundConfig;
use crate::workload::Protocol;

/// The listener name in logs and `outrigger_connections_rejected`.
pub(crate) const LISTENER_NAME: &str = "hbone";

/// What every connection of the HBONE listener shares.
struct Shared {
    ctx: Arc<Ctx>,
    /// The inbound listeners a CONNECT may target.
    targets: Vec<Arc<InboundConfig>>,
    door: accept::Listener,
}

pub(crate) async fn serve_listener(listener: TcpListener, ctx: Arc<Ctx>) {
    let shared = Arc::new(Shared {
        targets: ctx.inbound.iter().cloned().map(Arc::new).collect(),
        ctx,
        door: accept::Listener::hbone(LISTENER_NAME, ALPN_H2),
    });
    accept::serve(
        listener,
        &shared.ctx,
        &shared.door,
        |stream, src, permit| {
            let shared = shared.clone();
            tokio::spawn(async move { handle_connection(stream, src, shared, permit).await });
        },
    )
    .await;
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

async fn handle_connection(
    stream: TcpStream,
    src: SocketAddr,
    shared: Arc<Shared>,
    mut permit: Permit,
) {
    let ctx = &shared.ctx;
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let src = SocketAddr::new(canonical(src.ip()), src.port());
    let Some((tls, peer)) = accept::mtls(stream, src, ctx, &shared.door, &mut permit).await else {
        return;
    };

    let mut h2 = match tokio::time::timeout(
        ctx.settings.handshake_timeout,
        h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .handshake::<_, Bytes>(tls),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            ctx.metrics.reject(&shared.door.lv, "http2");
            crate::warn_limited!(listener = LISTENER_NAME, %src, peer = %peer.id, "HBONE HTTP/2 handshake failed: {e}");
            return;
        }
        Err(_) => {
            ctx.metrics.reject(&shared.door.lv, "http2");
            crate::warn_limited!(listener = LISTENER_NAME, %src, peer = %peer.id, "HBONE HTTP/2 handshake timed out");
            return;
        }
    };
    tracing::debug!(listener = LISTENER_NAME, %src, peer = %peer.id, "HBONE connection established");
    let outer = Arc::new(Outer { src, local, peer });
    // The idle timeout: no CONNECT stream open for that long closes the connection (GOAWAY,
    // as Envoy drains an idle HTTP/2 connection). The timer runs from the handshake, so a
    // connection that never opens a stream is closed too.
    let activity = Activity::new();
    let idle = activity.idle(ctx.settings.idle_timeout);
    tokio::pin!(idle);
    let mut idle_over = false;
    // Keepalive, as ztunnel's HBONE server does: a PING every 10 s; no PONG within 20 s means
    // the peer is gone and the connection (with its streams) is closed.
    let mut peer_dead = super::spawn_keepalive(h2.ping_pong());
    let mut keepalive_over = false;
    let mut drain = ctx.drain.clone();
    let mut draining = false;
    loop {
        let next = tokio::select! {
            r = h2.accept() => r,
            r = &mut peer_dead, if !keepalive_over => {
                // A oneshot must not be polled again once it has completed.
                keepalive_over = true;
                if r.is_err() {
                    // No keepalive (or it ended with the connection).
                    continue;
                }
                tracing::info!(
                    listener = LISTENER_NAME, %src, peer = %outer.peer.principal,
                    "HBONE peer did not answer PING in time: closing the connection"
                );
                h2.abrupt_shutdown(h2::Reason::NO_ERROR);
                break;
            }
            _ = drain.wait_for(|d| *d), if !draining => {
                // "graceful_shutdown": GOAWAY, then keep driving the connection until the
                // streams in flight end.
                draining = true;
                h2.graceful_shutdown();
                continue;
            }
            _ = &mut idle, if !idle_over && !draining => {
                idle_over = true;
                ctx.metrics.idle_timeouts.inc();
                tracing::debug!(
                    listener = LISTENER_NAME, %src, peer = %outer.peer.principal,
                    "HBONE connection idle: closing it (connections.idleTimeout)"
                );
                h2.graceful_shutdown();
                continue;
            }
        };
        match next {
            Some(Ok((req, respond))) => {
                let shared = shared.clone();
                let outer = outer.clone();
                let active = activity.start();
                tokio::spawn(serve_connect(req, respond, outer, shared, active));
            }
            Some(Err(e)) => {
                tracing::debug!(listener = LISTENER_NAME, %src, "HBONE connection ended: {e}");
                break;
            }
            None => break,
        }
    }
}

/// What the outer (mTLS) connection gives every stream on it.
struct Outer {
    src: SocketAddr,
    local: SocketAddr,
    peer: accept::Peer,
}

fn reply(respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode) {
    let resp = Response::builder()
        .status(status)
        .body(())
        .expect("a status-only response is valid");
    if let Err(e) = respond.send_response(resp, true) {
        tracing::debug!(error = %e, "could not answer the HBONE CONNECT");
    }
}

/// Answers a CONNECT with `200`: the stream is open.
fn accept_stream(mut respond: h2::server::SendResponse<Bytes>) -> Option<h2::SendStream<Bytes>> {
    let ok = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .expect("a status-only response is valid");
    match respond.send_response(ok, false) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(error = %e, "HBONE stream reset before it was answered");
            None
        }
    }
}

/// Chooses the inbound listener for a CONNECT target: the port is the listener's port, and
/// the IP must be one this connection arrived on (or the listener's own address).
fn route(
    targets: &[Arc<InboundConfig>],
    local: SocketAddr,
    target: SocketAddr,
) -> Result<&Arc<InboundConfig>, StatusCode> {
    let ip = canonical(target.ip());
    let listener = targets
        .iter()
        .find(|l| l.listen.port() == target.port())
        .ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
    let ours = ip == canonical(local.ip())
        || (!listener.listen.ip().is_unspecified() && ip == canonical(listener.listen.ip()));
    if !ours {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok(listener)
}

/// The metric labels of one stream: the outer connection's (`l`) plus the source workload's
/// metadata from `baggage` where the certificate says nothing (ztunnel's "derived source").
/// The namespace stays the verified one from the SPIFFE ID.
fn add_baggage(l: &mut TcpLabels, c: &ConnectRequest) {
    let b = &c.baggage;
    if let Some(w) = &b.workload_name {
        l.source_workload = Lv::new(w);
    }
    if let Some(s) = &b.service_name {
        l.source_canonical_service = Lv::new(s);
        l.source_app = Lv::new(s);
    }
    if let Some(r) = &b.revision {
        l.source_canonical_revision = Lv::new(r);
        l.source_version = Lv::new(r);
    }
    if let Some(c) = &b.cluster {
        l.source_cluster = Lv::new(c);
    }
}

async fn serve_connect(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    outer: Arc<Outer>,
    shared: Arc<Shared>,
    _active: Active,
) {
    // Each stream holds a backend connection of its own, so it counts against the caps like
    // a connection (a refused stream gets 503, as ztunnel answers a stream it cannot serve).
    let _permit = match shared.ctx.conns.try_acquire_for(&outer.peer.id) {
        Ok(p) => p,
        Err(o) => {
            accept::refuse_overflow(
                &shared.ctx,
                &shared.door.lv,
                LISTENER_NAME,
                outer.src,
                Some(&outer.peer.id),
                o,
            );
            reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let (parts, recv) = req.into_parts();
    let connect = match request::parse(&parts.method, &parts.uri, &parts.headers) {
        Ok(c) => c,
        Err(e) => {
            shared.ctx.metrics.reject(&shared.door.lv, "hbone_request");
            tracing::info!(listener = LISTENER_NAME, src = %outer.src, "HBONE request refused: {e}");
            reply(&mut respond, e.status());
            return;
        }
    };
    let listener = match route(&shared.targets, outer.local, connect.target) {
        Ok(l) => l.clone(),
        Err(status) => {
            shared
                .ctx
                .metrics
                .reject(&shared.door.lv, "hbone_destination");
            let why = if status == StatusCode::BAD_REQUEST {
                "the destination IP is not an address of this host"
            } else {
                "no inbound listener serves this destination port"
            };
            tracing::info!(
                listener = LISTENER_NAME, src = %outer.src, target = %connect.target,
                status = status.as_u16(),
                "HBONE CONNECT refused: {why}"
            );
            reply(&mut respond, status);
            return;
        }
    };
    let span = tracing::info_span!(
        "hbone",
        src = %outer.src,
        target = %connect.target,
        listener = %listener.name,
        traceparent = %connect.traceparent.as_deref().unwrap_or("-"),
        forwarded_for = %connect.forwarded_for.as_deref().unwrap_or("-"),
        forwarded_host = %connect.forwarded_host.as_deref().unwrap_or("-"),
    );
    async move {
        let mut conn = outer.peer.conn(listener, outer.src, connect.target, None);
        add_baggage(&mut conn.labels, &connect);
        let conn = Arc::new(conn);
        tracing::debug!(
            source = %outer.peer.principal,
            baggage_workload = %connect.baggage.workload_name.as_deref().unwrap_or("-"),
            "HBONE stream accepted"
        );
        let ctx = shared.ctx.clone();
        if conn.listener.protocol == Protocol::Tcp {
            // Opaque TCP: authorize and dial the backend before answering, as ztunnel does, so
            // the caller learns the outcome from the status (401 denied, 503 unreachable).
            let open = move |r: Result<(), &crate::refusal::Refusal>| match r {
                Ok(()) => accept_stream(respond).map(|send| H2Io::new(recv, send)),
                Err(why) => {
                    reply(&mut respond, why.hbone_status());
                    None
                }
            };
            tcp_fwd::serve_deferred(open, conn, ctx).await;
            return;
        }
        // HTTP or `auto`: the protocol (and so which rules apply) is known only from the
        // stream's first bytes, which the caller sends after the 200.
        let Some(send) = accept_stream(respond) else {
            return;
        };
        let io = H2Io::new(recv, send);
        let Some((io, kind)) = inbound::classify_stream(io, None, &conn, &ctx).await else {
            return;
        };
        match kind {
            // TCP forwarding reports `istio_tcp_*` itself.
            StreamKind::Tcp => inbound::serve_classified(io, kind, conn, ctx).await,
            // ztunnel reports `istio_tcp_*` for every HBONE stream; the inner HTTP requests
            // add `istio_requests_total` on top.
            StreamKind::Http(_) => {
                let labels = conn.labels.clone();
                let counts = Arc::new(ByteCounts::default());
                ctx.metrics.tcp_opened.get_or_create(&labels).inc();
                let io = Counted::new(io, counts.clone());
                inbound::serve_classified(io, kind, conn, ctx.clone()).await;
                ctx.metrics
                    .tcp_received
                    .get_or_create(&labels)
                    .inc_by(counts.received());
                ctx.metrics
                    .tcp_sent
                    .get_or_create(&labels)
                    .inc_by(counts.sent());
                ctx.metrics.tcp_closed.get_or_create(&labels).inc();
            }
        }
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(name: &str, listen: &str) -> Arc<InboundConfig> {
        Arc::new(InboundConfig {
            name: name.into(),
            listen: listen.parse().unwrap(),
            backend: "127.0.0.1:5000".parse().unwrap(),
            protocol: Protocol::Auto,
        })
    }

    #[test]
    fn routes_by_port_and_checks_the_ip() {
        let targets = vec![l("web", "0.0.0.0:8080"), l("db", "10.0.0.7:5432")];
        let local: SocketAddr = "10.0.0.5:15008".parse().unwrap();
        let r = |t: &str| route(&targets, local, t.parse().unwrap()).map(|l| l.name.clone());
        assert_eq!(r("10.0.0.5:8080").unwrap(), "web");
        assert_eq!(r("[::ffff:10.0.0.5]:8080").unwrap(), "web");
        // Another host's address: ztunnel's IPMismatch.
        assert_eq!(r("10.0.0.9:8080"), Err(StatusCode::BAD_REQUEST));
        // A listener bound to a specific address accepts that address too.
        assert_eq!(r("10.0.0.7:5432").unwrap(), "db");
        // No listener on the port: never forwarded anywhere.
        assert_eq!(r("10.0.0.5:22"), Err(StatusCode::SERVICE_UNAVAILABLE));
    }
}
