//! Opaque TCP forwarding with L4 authorization, Istio's TCP metrics and a connection log line;
//! Istio's TCP metadata exchange at the start of a stream that selected it ([`exchange`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::access_log::{AccessRecord, Workloads, now_rfc3339};
use crate::authz;
use crate::conn::ConnInfo;
use crate::copy::Side;
use crate::ctx::Ctx;
use crate::io::{ByteCounts, Counted, MxOutcome, MxRead};
use crate::peer_metadata::PeerMetadata;
use crate::refusal::Refusal;

/// How often byte counters of long-lived connections are published to the metrics.
const METRICS_FLUSH: Duration = Duration::from_secs(5);

/// Serves a connection already accepted (a direct mTLS or plaintext connection): a refusal
/// closes it without a byte.
pub(crate) async fn serve<T>(io: T, conn: Arc<ConnInfo>, ctx: Arc<Ctx>)
where
    T: Side + Send + 'static,
{
    serve_deferred(
        move |r: Result<(), &Refusal>| r.ok().map(|()| io),
        conn,
        ctx,
    )
    .await
}

/// Serves a direct mTLS connection whose ALPN is `istio-peer-exchange`, as a sidecar's inbound
/// TCP chain does with Istio's `metadata_exchange` filter first (istio/istio
/// `pilot/pkg/networking/core/networkfilter.go`: "Metadata exchange goes first, so RBAC
/// failures, etc can access the state"): the exchange ([`exchange`]), then the peer's workload
/// in the `source_*` labels of every `istio_tcp_*` series of the connection and in its access
/// log line, then authorization and forwarding of the bytes after the exchange. The exchange's
/// own bytes are not counted: Envoy's tcp_proxy counts what reaches it
/// (`tcp_proxy.cc`, `Filter::onData`: `addWireBytesReceived(data.length())`), after the filter
/// drained them, and the filter writes its own past it (`injectWriteDataToFilterChain`).
pub(crate) async fn serve_exchange<T>(io: T, conn: Arc<ConnInfo>, ctx: Arc<Ctx>)
where
    T: Side + Send + 'static,
{
    let mut io = MxRead::new(io);
    let peer = match exchange(&mut io, &ctx, &conn.listener.name, conn.src).await {
        Ok(peer) => peer,
        Err(e) => {
            if e.kind() == std::io::ErrorKind::InvalidData {
                crate::warn_limited!(listener = %conn.listener.name, src = %conn.src, "connection closed: {e}");
            } else {
                tracing::debug!(src = %conn.src, error = %e, "connection failed during istio-peer-exchange");
            }
            return;
        }
    };
    let conn = match peer {
        Some(peer) => {
            let mut named = ConnInfo::clone(&conn);
            crate::metrics::apply_source_peer(&mut named.labels, &peer);
            Arc::new(named)
        }
        None => conn,
    };
    serve(io, conn, ctx).await
}

/// Istio's TCP metadata exchange (crate::tcp_mx) at the start of a stream whose mTLS handshake
/// selected `istio-peer-exchange`, on either side: this workload's exchange is written first,
/// then the peer's read off the stream. Envoy's filter writes its own at the first byte either
/// way (`onData` and `onWrite` both reach `writeNodeMetadata`) and reads the peer's whenever it
/// comes; writing at once is what makes a sidecar answer before any application byte (its
/// filter writes its exchange when ours arrives), so the peer is known before anything is
/// forwarded, and a server-first application is never waited on. The peer's exchange is waited
/// for at most `timeouts.detect`; one that comes later is still read off the stream, but the
/// connection's labels are fixed by then (Envoy would still label it).
///
/// `Ok(Some)`: the peer's workload (shared, at most `peer_metadata::MAX_PEERS` distinct ones).
/// `Ok(None)`: no workload named — none in time, a stream that does not start with an exchange
/// (its bytes are then forwarded as they are, as Envoy's filter does when it gives up), or an
/// exchange without `x-envoy-peer-metadata`. `Err`: the stream failed, or its exchange was
/// refused (`InvalidData`: declared longer than `tcp_mx::MAX_METADATA`); close it.
pub(crate) async fn exchange<T>(
    io: &mut MxRead<T>,
    ctx: &Ctx,
    listener: &str,
    peer_addr: std::net::SocketAddr,
) -> std::io::Result<Option<Arc<PeerMetadata>>>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let ours = async {
        io.get_mut().write_all(&ctx.tcp_exchange).await?;
        io.get_mut().flush().await
    };
    tokio::time::timeout(ctx.settings.handshake_timeout, ours)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "writing the istio-peer-exchange timed out",
            )
        })??;
    let outcome = match tokio::time::timeout(ctx.settings.detect_timeout, io.exchange()).await {
        Ok(r) => r?,
        Err(_) => {
            tracing::debug!(
                listener, peer = %peer_addr,
                "no istio-peer-exchange from the peer within timeouts.detect: forwarding, the peer workload unknown"
            );
            return Ok(None);
        }
    };
    Ok(match outcome {
        Some(MxOutcome::Exchanged(Some(peer))) => ctx.peer_exchange.admit(*peer),
        Some(MxOutcome::Exchanged(None)) => {
            tracing::debug!(listener, peer = %peer_addr, "the peer's istio-peer-exchange names no workload");
            None
        }
        // Envoy logs these two at `warn` ("Incorrect istio-peer-exchange ALPN magic. Peer
        // missing TCP MetadataExchange filter."; "Alpn protocol matched. Magic matched.
        // Metadata Not found.") and forwards the bytes.
        Some(MxOutcome::NotExchanged(
            why
            @ (crate::tcp_mx::NotExchanged::BadMagic | crate::tcp_mx::NotExchanged::BadMetadata),
        )) => {
            crate::warn_limited!(
                listener, peer = %peer_addr,
                "istio-peer-exchange negotiated, but {}: forwarding the stream as it is, the peer workload unknown",
                why.as_str()
            );
            None
        }
        Some(MxOutcome::NotExchanged(why)) => {
            tracing::debug!(listener, peer = %peer_addr, "istio-peer-exchange: {}", why.as_str());
            None
        }
        Some(MxOutcome::Truncated) => {
            tracing::debug!(listener, peer = %peer_addr, "the stream ended inside the peer's istio-peer-exchange");
            None
        }
        None => None,
    })
}

/// Authorizes the connection and dials the backend first, then calls `open` with the outcome:
/// `Ok` asks for the downstream stream to forward (`None`: it went away), `Err` lets the
/// caller tell the peer why (an HBONE CONNECT is answered `401` or `503`, as ztunnel does).
pub(crate) async fn serve_deferred<T, F>(open: F, conn: Arc<ConnInfo>, ctx: Arc<Ctx>)
where
    T: Side + Send + 'static,
    F: FnOnce(Result<(), &Refusal>) -> Option<T>,
{
    let start = Instant::now();
    let start_time = ctx.access_log.enabled().then(now_rfc3339);
    let labels = conn.labels.clone();
    ctx.metrics.tcp_opened.get_or_create(&labels).inc();
    let counts = Arc::new(ByteCounts::default());
    let mut verdict = authz::check_tcp(&ctx, &conn);
    // CUSTOM with a gRPC provider: Envoy's network ext_authz check, before the backend is
    // dialed; its denial or error closes the connection (`Refusal::External`, flag `UAEX`).
    if let Some(custom) = verdict.custom.take() {
        let via = crate::ext_authz::route(&custom.provider, &ctx.outbound);
        let peers = authz::peers(&ctx, &conn);
        let outcome = crate::ext_authz::check_connection(&custom.provider, &peers, via).await;
        let answer = authz::CustomAnswer::of(&outcome);
        authz::settle_custom(&ctx, &conn, "tcp", &mut verdict, &custom, answer);
    }
    let mut published = (0u64, 0u64);

    let dialed = if let Some(why) = verdict.deny.take() {
        Err(why)
    } else {
        let backend = conn.listener.backend;
        match tokio::time::timeout(ctx.settings.connect_timeout, TcpStream::connect(backend)).await
        {
            Ok(Ok(upstream)) => Ok(upstream),
            Ok(Err(e)) => {
                crate::warn_limited!(
                    listener = %conn.listener.name, %backend,
                    "cannot connect to backend: {e}; closing the connection"
                );
                Err(Refusal::Upstream)
            }
            Err(_) => {
                crate::warn_limited!(
                    listener = %conn.listener.name, %backend,
                    "connect to backend timed out; closing the connection"
                );
                Err(Refusal::Upstream)
            }
        }
    };
    let flags = match dialed {
        Ok(upstream) => {
            let _ = upstream.set_nodelay(true);
            match open(Ok(())) {
                Some(io) => {
                    let (f, v) =
                        pump(io, upstream, &conn, &ctx, &counts, &labels, &mut published).await;
                    if let Some(v) = v {
                        verdict = v;
                    }
                    f
                }
                // The downstream went away before it was answered.
                None => "DC",
            }
        }
        Err(why) => {
            open(Err(&why));
            why.flag()
        }
    };

    ctx.metrics
        .publish_tcp_bytes(&labels, &counts, &mut published);
    ctx.metrics.tcp_closed.get_or_create(&labels).inc();
    if let Some(start_time) = start_time {
        let record = AccessRecord {
            start_time,
            kind: "tcp",
            listener: &conn.listener.name,
            protocol: "tcp",
            method: None,
            authority: None,
            path: None,
            response_code: None,
            response_flags: flags,
            duration_ms: start.elapsed().as_millis() as u64,
            bytes_received: counts.received(),
            bytes_sent: counts.sent(),
            downstream_remote_address: conn.src.to_string(),
            downstream_local_address: conn.dst.to_string(),
            upstream_host: conn.listener.backend.to_string(),
            source_principal: conn.source_principal_str(),
            destination_principal: &conn.labels.destination_principal.0,
            connection_security_policy: conn.security_policy(),
            authz_policy: verdict.policy.as_deref(),
            authz_result: Some(verdict.result),
            audit: verdict.audit.as_deref(),
            requested_server_name: conn.sni.as_deref(),
            ..Default::default()
        };
        ctx.access_log.log_with(
            &record,
            &Workloads {
                source: named(&conn.labels.source_workload),
                destination: None,
            },
        );
    }
}

/// Copies both ways until either side closes, the proxy drains, or a policy change denies the
/// connection. Returns the response flags and, if policy closed it, the new verdict.
async fn pump<T>(
    io: T,
    upstream: TcpStream,
    conn: &Arc<ConnInfo>,
    ctx: &Arc<Ctx>,
    counts: &Arc<ByteCounts>,
    labels: &crate::metrics::TcpLabels,
    published: &mut (u64, u64),
) -> (&'static str, Option<authz::Verdict>)
where
    T: Side + Send + 'static,
{
    let mut down = Counted::new(io, counts.clone());
    let mut up = upstream;
    let copy = crate::copy::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    let mut policy_rx = ctx.policy.subscribe();
    let mut drain = ctx.drain.clone();
    let mut tick = tokio::time::interval(METRICS_FLUSH);
    tick.tick().await;
    // Istio's inbound tcp_proxy takes its idle timeout from the same `IDLE_TIMEOUT` proxy
    // metadata as the HTTP connection manager (istio/istio pilot/pkg/networking/core/
    // listener_inbound.go `buildInboundNetworkFilters`), so one setting serves both.
    let idle = counts.idle(ctx.settings.idle_timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!(src = %conn.src, error = %e, "TCP connection ended with an error");
                }
                return ("-", None);
            }
            // Envoy's tcp_proxy `onIdleTimeout` counts `idle_timeout` and closes both sides,
            // with no response flag.
            _ = &mut idle => {
                ctx.metrics.idle_timeouts.inc();
                tracing::debug!(src = %conn.src, "TCP connection idle: closing it (connections.idleTimeout)");
                return ("-", None);
            }
            changed = policy_rx.changed() => {
                if changed.is_err() {
                    continue;
                }
                // "Long-lived connections are re-authorized when policy changes."
                let v = authz::recheck_tcp(ctx, conn);
                if v.deny.is_some() {
                    tracing::info!(
                        src = %conn.src,
                        policy = v.policy.as_deref().unwrap_or("-"),
                        "policy changed: closing a TCP connection that is now denied"
                    );
                    return ("RBAC", Some(v));
                }
            }
            _ = tick.tick() => ctx.metrics.publish_tcp_bytes(labels, counts, published),
            // On drain a TCP connection has no request boundary to wait for: it keeps
            // running until the drain timeout closes it.
            _ = drain.wait_for(|d| *d), if !*drain.borrow() => {}
        }
    }
}

/// A workload label for the access log: `None` when it is `unknown` (no peer named).
pub(crate) fn named(l: &crate::metrics::Lv) -> Option<&str> {
    Some(&*l.0).filter(|w| *w != "unknown")
}
