//! Opaque TCP origination: the application's bytes inside mTLS (ALPN `istio-peer-exchange` or
//! `istio`, as a sidecar offers them; with the first, Istio's TCP metadata exchange names the
//! server's workload, crate::tcp_mx) or inside an HBONE CONNECT stream, with Istio's
//! `istio_tcp_*` metrics (reporter="source") and one access-log line per connection.
//!
//! A connection that cannot be made is tried on another endpoint (nothing was sent yet); once
//! established, the bytes flow until either side closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::Destination;
use super::endpoints::{ActiveGuard, Outcome};
use super::pool::{self, Alpn};
use crate::access_log::{AccessRecord, Workloads, now_rfc3339};
use crate::ctx::Ctx;
use crate::io::{ByteCounts, Counted, MxRead};
use crate::metrics::{Lv, TcpLabels};
use crate::peer_metadata::PeerMetadata;
use crate::refusal::Refusal;
use crate::tcp_mx;

/// How often byte counters of long-lived connections are published to the metrics.
const METRICS_FLUSH: Duration = Duration::from_secs(5);

pub(crate) async fn serve(
    stream: TcpStream,
    src: SocketAddr,
    dest: Arc<Destination>,
    ctx: Arc<Ctx>,
) {
    let start = Instant::now();
    let start_time = ctx.access_log.enabled().then(now_rfc3339);
    let dst = stream.local_addr().unwrap_or(src);
    let counts = Arc::new(ByteCounts::default());
    let mut labels = dest.labels.clone();
    labels.request_protocol = "tcp";
    let attempts = 1 + dest.cfg.retries.attempts;
    let mut tried = Vec::new();
    // Why the application's connection was not carried, until one is made.
    let mut refused = Some(Refusal::NoHealthyUpstream);
    let mut upstream = None;
    let mut peer = Lv::unknown();
    for attempt in 0..attempts {
        let Some(ep) = dest.endpoints.pick(&tried) else {
            break;
        };
        tried.push(ep.addr);
        upstream = Some(ep.addr);
        match connect(&dest, ep.addr, &ctx).await {
            Ok((up, p, named)) => {
                dest.endpoints.report(&ep, Outcome::Success);
                peer = p;
                // The server's certificate names it: principal and namespace, as
                // istio_stats.cc's client reporter takes them (`getNamespace(peer_san)`), and
                // as the HTTP origin does. A connection never made keeps them `unknown`.
                crate::metrics::apply_destination_principal(&mut labels, &peer);
                // Its TCP metadata exchange names its workload (istio_stats.cc,
                // `Reporter::ClientSidecar`: the `upstream_peer` the filter set).
                if let Some(w) = &named {
                    crate::metrics::apply_destination_peer(&mut labels, w);
                }
                refused = None;
                let _active = ActiveGuard::new(ep.clone());
                ctx.metrics.tcp_opened.get_or_create(&labels).inc();
                pump(stream, up, &ctx, &counts, &labels).await;
                break;
            }
            Err(e) => {
                dest.endpoints.report(&ep, Outcome::GatewayError);
                refused = Some(Refusal::UpstreamConnect {
                    transport: e.to_string(),
                });
                if e.identity_mismatch() {
                    crate::warn_limited!(destination = %dest.authority, endpoint = %ep.addr, "server identity refused: {e}");
                } else {
                    crate::warn_limited!(
                        destination = %dest.authority, endpoint = %ep.addr,
                        retry = attempt + 1 < attempts,
                        "upstream connection failed: {e}"
                    );
                }
            }
        }
    }
    let flags = refused.as_ref().map_or("-", Refusal::flag);
    if flags != "-" {
        // Never connected: the application's connection is closed without a byte.
        labels.response_flags = flags;
        ctx.metrics.tcp_opened.get_or_create(&labels).inc();
    }
    ctx.metrics.tcp_closed.get_or_create(&labels).inc();
    if let Some(start_time) = start_time {
        let record = AccessRecord {
            start_time,
            kind: "tcp",
            listener: &dest.cfg.name,
            protocol: "tcp",
            method: None,
            authority: Some(dest.authority.as_str()),
            path: None,
            response_code: None,
            response_flags: flags,
            duration_ms: start.elapsed().as_millis() as u64,
            bytes_received: counts.received(),
            bytes_sent: counts.sent(),
            downstream_remote_address: src.to_string(),
            downstream_local_address: dst.to_string(),
            upstream_host: upstream
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            source_principal: &labels.source_principal.0,
            destination_principal: &peer.0,
            connection_security_policy: if flags == "-" { "mutual_tls" } else { "none" },
            authz_policy: None,
            authz_result: None,
            ..Default::default()
        };
        ctx.access_log.log_with(
            &record,
            &Workloads {
                source: None,
                destination: crate::tcp_fwd::named(&labels.destination_workload),
            },
        );
    }
}

/// One upstream connection for TCP, with Istio's TCP metadata exchange when the server
/// selected `istio-peer-exchange` (crate::tcp_mx; Envoy's `metadata_exchange` upstream filter,
/// which istiod puts on every outbound cluster: istio/istio `pilot/pkg/networking/core/
/// cluster_builder.go`, `applyMetadataExchange`). Returns the stream (the server's exchange
/// read off it), the server's SPIFFE ID and the workload its exchange named. An exchange that
/// fails is a connection that failed: nothing of the application's was sent, and another
/// endpoint may be tried.
async fn connect(
    dest: &Destination,
    addr: SocketAddr,
    ctx: &Ctx,
) -> Result<(MxRead<pool::Upstream>, Lv, Option<Arc<PeerMetadata>>), Failed> {
    let (up, peer) = pool::connect(dest, addr, Alpn::Tcp)
        .await
        .map_err(Failed::Connect)?;
    if up.alpn() != Some(tcp_mx::ALPN) {
        return Ok((MxRead::through(up), peer, None));
    }
    let mut up = MxRead::new(up);
    let named = crate::tcp_fwd::exchange(&mut up, ctx, &dest.cfg.name, addr)
        .await
        .map_err(|e| Failed::Exchange(addr, e))?;
    Ok((up, peer, named))
}

/// Why an upstream connection for TCP could not be used.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error("{0}")]
    Connect(pool::ConnectError),
    #[error("istio-peer-exchange with {0} failed: {1}")]
    Exchange(SocketAddr, std::io::Error),
}

impl Failed {
    fn identity_mismatch(&self) -> bool {
        matches!(self, Failed::Connect(e) if e.identity_mismatch())
    }
}

/// Copies both ways until either side closes; publishes byte counts every few seconds. On
/// drain a TCP connection has no request boundary to wait for: it runs until the drain
/// timeout closes it.
async fn pump(
    app: TcpStream,
    upstream: MxRead<pool::Upstream>,
    ctx: &Arc<Ctx>,
    counts: &Arc<ByteCounts>,
    labels: &TcpLabels,
) {
    // `received`: bytes read from the application (Istio: "bytes received during request");
    // `sent`: bytes written to it ("bytes sent during response").
    let mut down = Counted::new(app, counts.clone());
    let mut up = upstream;
    let copy = crate::copy::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    let mut published = (0u64, 0u64);
    let mut tick = tokio::time::interval(METRICS_FLUSH);
    tick.tick().await;
    // Istio's outbound tcp_proxy has the same idle timeout as the inbound one (istio/istio
    // pilot/pkg/networking/core/listener_builder.go: `IdleTimeout:
    // parseDuration(node.Metadata.IdleTimeout)`; unset: Envoy's 1 hour).
    let idle = counts.idle(ctx.settings.idle_timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "outbound TCP connection ended with an error");
                }
                break;
            }
            _ = &mut idle => {
                ctx.metrics.idle_timeouts.inc();
                tracing::debug!("outbound TCP connection idle: closing it (connections.idleTimeout)");
                break;
            }
            _ = tick.tick() => ctx.metrics.publish_tcp_bytes(labels, counts, &mut published),
        }
    }
    ctx.metrics
        .publish_tcp_bytes(labels, counts, &mut published);
}
