//! Opaque TCP forwarding with L4 authorization, Istio's TCP metrics and a connection log line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::access_log::{AccessRecord, now_rfc3339};
use crate::authz;
use crate::conn::ConnInfo;
use crate::copy::Side;
use crate::ctx::Ctx;
use crate::io::{ByteCounts, Counted};
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
        ctx.access_log.log(&AccessRecord {
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
        });
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
