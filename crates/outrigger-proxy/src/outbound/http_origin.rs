//! HTTP origination: the application's plaintext HTTP/1.1 or h2c on loopback, sent to a mesh
//! destination over mTLS, with retries, timeouts, Istio's `reporter="source"` metrics and an
//! access-log line per request. Also the HTTP-proxy mode, where the request's host picks the
//! destination.
//!
//! Retries (Istio's default `retryOn` is "connect-failure,refused-stream,unavailable,
//! cancelled,retriable-status-codes", with Envoy's `previous_hosts` predicate so that a retry
//! goes to another host):
//! * a connection that cannot be made (refused, timed out, mTLS refused, including a server
//!   with the wrong identity) sends nothing, so any request is retried on another endpoint;
//! * a connection that fails after the request was sent and before the response head is
//!   retried only for an idempotent method (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) without a
//!   body, which can be replayed safely;
//! * a response, whatever its status, is returned as is.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::endpoints::{ActiveGuard, Endpoint, Outcome};
use super::pool::{self, H1Lease, SendError, UpBody};
use super::{Destination, OutboundProtocol};
use crate::access_log::{AccessRecord, now_rfc3339};
use crate::ctx::Ctx;
use crate::http_common::{
    Metered, drive_with, is_websocket_upgrade, retarget, set_websocket_upgrade, strip_hop_by_hop,
    tunnel,
};
use crate::metrics::{Lv, RequestLabels, TcpLabels};
use crate::refusal::Refusal;

/// Where a listener's requests go.
#[derive(Clone)]
pub(crate) enum Route {
    /// A dedicated listener: every request goes to this destination.
    Fixed(Arc<Destination>),
    /// The HTTP proxy listener: the request's host decides.
    Proxy(Arc<ProxyRoutes>),
}

/// The HTTP proxy's table: host names (and their Kubernetes short forms) → destination.
pub(crate) struct ProxyRoutes {
    by_host_port: HashMap<(String, u16), Arc<Destination>>,
    by_host: HashMap<String, Vec<Arc<Destination>>>,
    allow_plain_egress: bool,
    known: String,
    source: TcpLabels,
}

/// The names a Kubernetes service answers to inside the mesh, as a sidecar's route table
/// lists them: `name`, `name.ns`, `name.ns.svc`, `name.ns.svc.<domain>`.
fn host_aliases(fqdn: &str) -> Vec<String> {
    let fqdn = fqdn.to_ascii_lowercase();
    let labels: Vec<&str> = fqdn.split('.').collect();
    if labels.len() >= 3 && labels[2] == "svc" {
        (1..=labels.len())
            .filter(|n| *n <= 3 || *n == labels.len())
            .map(|n| labels[..n].join("."))
            .collect()
    } else {
        vec![fqdn]
    }
}

impl ProxyRoutes {
    pub fn new(dests: &[Arc<Destination>], allow_plain_egress: bool, source: &TcpLabels) -> Self {
        let mut by_host_port = HashMap::new();
        let mut by_host: HashMap<String, Vec<Arc<Destination>>> = HashMap::new();
        let mut known = Vec::new();
        for d in dests {
            if d.cfg.protocol == OutboundProtocol::Tcp {
                continue;
            }
            known.push(format!("{}:{}", d.cfg.host, d.cfg.port));
            for alias in host_aliases(&d.cfg.host) {
                by_host_port
                    .entry((alias.clone(), d.cfg.port))
                    .or_insert_with(|| d.clone());
                by_host.entry(alias).or_default().push(d.clone());
            }
        }
        ProxyRoutes {
            by_host_port,
            by_host,
            allow_plain_egress,
            known: if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            },
            source: source.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_host.values().flatten().count()
    }

    /// `host[:port]` → destination. Without a port, the host alone when it names exactly one
    /// destination, else port 80 (the HTTP default).
    fn lookup(&self, host: &str, port: Option<u16>) -> Option<&Arc<Destination>> {
        let host = host.to_ascii_lowercase();
        match port {
            Some(p) => self.by_host_port.get(&(host, p)),
            None => match self.by_host.get(&host) {
                Some(v) if v.len() == 1 => v.first(),
                _ => self.by_host_port.get(&(host, 80)),
            },
        }
    }
}

pub(crate) async fn serve(stream: TcpStream, src: SocketAddr, route: Route, ctx: Arc<Ctx>) {
    let dst = stream.local_addr().unwrap_or(src);
    let drain = ctx.drain.clone();
    let svc_ctx = ctx.clone();
    let svc = service_fn(move |req| handle(req, src, dst, route.clone(), svc_ctx.clone()));
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    if let Err(e) = drive_with(conn, drain, |c| c.graceful_shutdown()).await {
        tracing::debug!(error = %e, "application HTTP connection ended with an error");
    }
}

/// An authority that only makes sense on this host (`127.0.0.1:9080`, `localhost`): the
/// application addressed the listener, not the service.
fn is_local_authority(a: &Authority) -> bool {
    let host = a.host().trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok()
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

async fn handle(
    req: Request<Incoming>,
    src: SocketAddr,
    dst: SocketAddr,
    route: Route,
    ctx: Arc<Ctx>,
) -> Result<Response<OutBody>, Infallible> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    // The `x-envoy-*` instructions no caller may give, as on the inbound side: an Istio
    // sidecar's outbound listener trusts no address either (http_common).
    crate::http_common::clean_internal_headers(&mut parts.headers);
    // The outbound listener's connection manager gives the request an `x-request-id` as the
    // inbound one does (envoy conn_manager_utility.cc `mutateRequestHeaders`; the listener
    // does not use the remote address, so the request is no edge request and the
    // application's own id is kept).
    if !parts.headers.contains_key("x-request-id")
        && let Some(id) = crate::http_common::new_request_id()
    {
        parts.headers.insert("x-request-id", id);
    }
    // The target: the absolute-form URI (proxy requests), else `Host`.
    let app_authority = crate::http_common::request_authority(&parts);
    match route {
        Route::Fixed(dest) => {
            // The application called the loopback listener: the service's own name goes
            // upstream, unless the application named a host itself.
            let authority = match app_authority {
                Some(a) if !is_local_authority(&a) => a,
                _ => dest.authority.clone(),
            };
            Ok(forward(parts, body, dest, authority, src, dst, ctx, start).await)
        }
        Route::Proxy(routes) => {
            let listener = Lv::new("http-proxy");
            let Some(authority) = app_authority else {
                let rec = Rec::new(
                    &ctx,
                    routes.source.clone(),
                    listener,
                    &parts,
                    src,
                    dst,
                    start,
                );
                return Ok(refuse(Refusal::NoHost, rec));
            };
            if parts.method == Method::CONNECT {
                let rec = Rec::new(
                    &ctx,
                    routes.source.clone(),
                    listener,
                    &parts,
                    src,
                    dst,
                    start,
                );
                let why = Refusal::ConnectMethod {
                    authority: authority.to_string(),
                };
                return Ok(refuse(why, rec));
            }
            match routes.lookup(authority.host(), authority.port_u16()) {
                Some(dest) => {
                    Ok(forward(parts, body, dest.clone(), authority, src, dst, ctx, start).await)
                }
                None if routes.allow_plain_egress => {
                    Ok(egress(parts, body, authority, &routes, src, dst, ctx, start).await)
                }
                None => {
                    // A sidecar's catch-all route under REGISTRY_ONLY, `block_all`: a direct
                    // 502 (istio/istio `pilot/pkg/networking/core/httproute.go`,
                    // `buildCatchAllVirtualHost`), labelled `BlackHoleCluster`.
                    let labels = crate::metrics::catch_all_labels(
                        &routes.source,
                        authority.as_str(),
                        crate::metrics::CatchAll::BlackHole,
                    );
                    let mut rec = Rec::new(&ctx, labels, listener, &parts, src, dst, start);
                    rec.authority = Some(authority.as_str().to_string());
                    crate::warn_limited!(
                        host = %authority,
                        "HTTP proxy: not a configured mesh service and plain egress is off; answering 502"
                    );
                    let why = Refusal::UnknownService {
                        authority: authority.to_string(),
                        known: routes.known.clone(),
                    };
                    Ok(refuse(why, rec))
                }
            }
        }
    }
}

/// Rebuilds a bodiless request for a retry after the connection failed mid-request.
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    fn build(&self) -> Request<UpBody> {
        let mut r = Request::new(Either::Right(Full::new(Bytes::new())));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    mut parts: http::request::Parts,
    body: Incoming,
    dest: Arc<Destination>,
    authority: Authority,
    src: SocketAddr,
    dst: SocketAddr,
    ctx: Arc<Ctx>,
    start: Instant,
) -> Response<OutBody> {
    let mut rec = Rec::new(
        &ctx,
        dest.labels.clone(),
        dest.listener_lv.clone(),
        &parts,
        src,
        dst,
        start,
    );
    let downstream_version = parts.version;
    let websocket = is_websocket_upgrade(&parts);
    strip_hop_by_hop(&mut parts.headers);
    // A WebSocket upgrade always goes upstream as HTTP/1.1, on a connection of its own (an
    // HTTP/2 destination's sidecar accepts HTTP/1.1 too: it matches `istio-http/1.1`).
    let client_upgrade = if websocket {
        set_websocket_upgrade(&mut parts.headers);
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    // The destination port's protocol, as a sidecar's outbound cluster (istio/istio
    // cluster_builder.go `setUpstreamProtocol`): `http2`/`grpc` → HTTP/2, `http` → HTTP/1.1
    // unless `h2UpgradePolicy: UPGRADE` (DestinationRule), whatever the application spoke.
    let h2 = client_upgrade.is_none()
        && (dest.cfg.protocol == OutboundProtocol::Http2 || dest.cfg.pool.h2_upgrade);
    retarget(&mut parts, h2, &authority);
    rec.authority = Some(authority.as_str().to_string());
    // A CLIENT span, and the context the destination sees (crate::trace).
    rec.trace = start_client_trace(&ctx, &dest, &authority, &mut parts, src, rec.protocol);
    // Istio's metadata exchange (crate::peer_metadata): who is calling, on every request to a
    // mesh destination (a sidecar's `upstream_propagation`). An application's own exchange
    // headers are replaced, never passed on.
    ctx.peer_exchange.inject(&mut parts.headers);
    let empty = body.is_end_stream();
    let replay = (empty && idempotent(&parts.method)).then(|| Replay {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
    });
    // A gRPC request's messages (crate::grpc_stats): counted from the first byte sent,
    // published once the answer says who the server is.
    rec.grpc = crate::grpc_stats::GrpcStats::for_request(&parts);
    let up_body: UpBody = if empty {
        Either::Right(Full::new(Bytes::new()))
    } else {
        Either::Left(Metered {
            inner: body,
            counter: rec.received.clone(),
            failed: None,
            grpc: rec.grpc.as_ref().map(|g| g.request_body()),
        })
    };
    let mut req = Some(Request::from_parts(parts, up_body));

    // Configured durations are bounded (docs/config.md), and the additions are checked all the
    // same: an unrepresentable deadline is no deadline, never a panic.
    let deadline = dest.cfg.timeout.and_then(|t| start.checked_add(t));
    let per_try = dest.cfg.retries.per_try_timeout;
    let attempts = 1 + dest.cfg.retries.attempts;
    let mut tried: Vec<SocketAddr> = Vec::with_capacity(2);
    let mut failure = Refusal::NoHealthyUpstream;
    for attempt in 0..attempts {
        let Some(request) = req.take() else { break };
        let Some(ep) = dest.endpoints.pick(&tried) else {
            if attempt == 0 {
                crate::warn_limited!(
                    destination = %dest.authority,
                    "no healthy upstream: every endpoint is ejected or none is known"
                );
            }
            break;
        };
        tried.push(ep.addr);
        rec.upstream = Some(ep.addr);
        let active = ActiveGuard::new(ep.clone());
        let try_deadline = match (deadline, per_try) {
            (Some(d), Some(p)) => Some(Instant::now().checked_add(p).map_or(d, |t| d.min(t))),
            (Some(d), None) => Some(d),
            (None, Some(p)) => Instant::now().checked_add(p),
            (None, None) => None,
        };
        let send = async {
            if client_upgrade.is_some() {
                pool::send_upgrade(&dest, &ep, request).await
            } else {
                pool::send(&dest, &ep, request, h2).await
            }
        };
        let result = match try_deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), send).await {
                Ok(r) => r,
                Err(_) => {
                    dest.endpoints.report(&ep, Outcome::GatewayError);
                    failure = Refusal::UpstreamTimeout;
                    crate::warn_limited!(
                        destination = %dest.authority, endpoint = %ep.addr,
                        "upstream request timed out; answering 504"
                    );
                    break;
                }
            },
            None => send.await,
        };
        match result {
            Ok(sent) => {
                let status = sent.response.status();
                let outcome = match status.as_u16() {
                    502..=504 => Outcome::GatewayError,
                    500..=599 => Outcome::ServerError,
                    _ => Outcome::Success,
                };
                dest.endpoints.report(&ep, outcome);
                rec.peer = sent.peer;
                let mut response = sent.response;
                if status == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(client) = client_upgrade
                {
                    let server = hyper::upgrade::on(&mut response);
                    let (mut rparts, _) = response.into_parts();
                    strip_hop_by_hop(&mut rparts.headers);
                    set_websocket_upgrade(&mut rparts.headers);
                    rec.code = status.as_u16();
                    // Recorded when the tunnel ends, with its bytes and duration.
                    tokio::spawn(async move {
                        let counts = Arc::new(crate::io::ByteCounts::default());
                        let _active = active;
                        tunnel(client, server, counts.clone(), std::future::pending()).await;
                        rec.sent += counts.sent();
                        rec.received.fetch_add(counts.received(), Ordering::Relaxed);
                        rec.finish();
                    });
                    return Response::from_parts(
                        rparts,
                        OutBody {
                            inner: Either::Right(Full::new(Bytes::new())),
                            lease: None,
                            rec: None,
                            _active: None,
                        },
                    );
                }
                let (mut rparts, rbody) = response.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                // The called workload, from its answer (`upstream_discovery`); the headers are
                // the proxies' business, not the application's.
                rec.dest_peer = {
                    let mut last = ep.peer.lock().unwrap_or_else(|e| e.into_inner());
                    ctx.peer_exchange.take(&mut rparts.headers, &mut last).peer
                };
                rparts.version = downstream_version;
                rec.code = status.as_u16();
                if let Some(s) = rparts.headers.get("grpc-status") {
                    rec.grpc_status = crate::grpc_stats::sent_status(s).or(rec.grpc_status.take());
                }
                rec.grpc_response(&rparts);
                let max = dest.cfg.pool.max_requests_per_connection;
                return Response::from_parts(
                    rparts,
                    OutBody {
                        inner: Either::Left(rbody),
                        lease: sent.lease.map(|l| (ep.clone(), l, max)),
                        rec: Some(rec),
                        _active: Some(active),
                    },
                );
            }
            Err(SendError::Connect(e, back)) => {
                dest.endpoints.report(&ep, Outcome::GatewayError);
                if e.identity_mismatch() {
                    crate::warn_limited!(
                        destination = %dest.authority, endpoint = %ep.addr,
                        "server identity refused: {e}"
                    );
                } else {
                    crate::warn_limited!(
                        destination = %dest.authority, endpoint = %ep.addr,
                        retry = attempt + 1 < attempts,
                        "upstream connection failed: {e}"
                    );
                }
                failure = Refusal::UpstreamConnect {
                    transport: e.to_string(),
                };
                req = Some(*back);
            }
            Err(SendError::Sent(e)) => {
                dest.endpoints.report(&ep, Outcome::GatewayError);
                crate::warn_limited!(
                    destination = %dest.authority, endpoint = %ep.addr,
                    retry = replay.is_some() && attempt + 1 < attempts,
                    "upstream connection failed after the request was sent: {e}"
                );
                failure = Refusal::UpstreamReset {
                    reason: e.to_string(),
                };
                req = replay.as_ref().map(Replay::build);
            }
        }
    }
    refuse(failure, rec)
}

/// Plain HTTP to a host outside the mesh (`allowPlainEgress`), one connection per request.
#[allow(clippy::too_many_arguments)]
async fn egress(
    mut parts: http::request::Parts,
    body: Incoming,
    authority: Authority,
    routes: &ProxyRoutes,
    src: SocketAddr,
    dst: SocketAddr,
    ctx: Arc<Ctx>,
    start: Instant,
) -> Response<OutBody> {
    // A sidecar's catch-all route under ALLOW_ANY, `allow_any` to `PassthroughCluster`
    // (`buildCatchAllVirtualHost`), which istio_stats.cc labels by that cluster's name.
    let labels = crate::metrics::catch_all_labels(
        &routes.source,
        authority.as_str(),
        crate::metrics::CatchAll::Passthrough,
    );
    let mut rec = Rec::new(&ctx, labels, Lv::new("http-proxy"), &parts, src, dst, start);
    rec.authority = Some(authority.as_str().to_string());
    rec.security = "none";
    strip_hop_by_hop(&mut parts.headers);
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::from(pq);
    let downstream_version = parts.version;
    parts.version = Version::HTTP_11;
    if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
        parts.headers.insert(header::HOST, v);
    }
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let connect = async {
        let s = TcpStream::connect((host, port)).await?;
        let _ = s.set_nodelay(true);
        std::io::Result::Ok(s)
    };
    let stream = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let transport = format!("{authority}: {e}");
            return refuse(Refusal::UpstreamConnect { transport }, rec);
        }
        Err(_) => {
            let transport = format!("{authority}: connection timed out");
            return refuse(Refusal::UpstreamConnect { transport }, rec);
        }
    };
    rec.upstream = stream.peer_addr().ok();
    rec.grpc = crate::grpc_stats::GrpcStats::for_request(&parts);
    let up_body: UpBody = Either::Left(Metered {
        inner: body,
        counter: rec.received.clone(),
        failed: None,
        grpc: rec.grpc.as_ref().map(|g| g.request_body()),
    });
    let result = async {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        tx.send_request(Request::from_parts(parts, up_body)).await
    }
    .await;
    match result {
        Ok(resp) => {
            let (mut rparts, rbody) = resp.into_parts();
            strip_hop_by_hop(&mut rparts.headers);
            rparts.version = downstream_version;
            rec.code = rparts.status.as_u16();
            rec.grpc_response(&rparts);
            Response::from_parts(
                rparts,
                OutBody {
                    inner: Either::Left(rbody),
                    lease: None,
                    rec: Some(rec),
                    _active: None,
                },
            )
        }
        Err(e) => refuse(
            Refusal::UpstreamReset {
                reason: e.to_string(),
            },
            rec,
        ),
    }
}

/// Answers the application with a refusal (crate::refusal says how) and records it.
fn refuse(why: Refusal, mut rec: Rec) -> Response<OutBody> {
    let status = why.status();
    rec.code = status.as_u16();
    rec.flags = why.flag();
    let mut resp = Response::new(OutBody {
        inner: Either::Right(Full::new(why.body())),
        lease: None,
        rec: Some(rec),
        _active: None,
    });
    *resp.status_mut() = status;
    why.headers(resp.headers_mut(), true);
    resp
}

/// The response body to the application. When it ends it gives its HTTP/1.1 connection back
/// to the pool and records the request (metrics, access log); dropped early (the application
/// went away), the connection is closed instead.
pub(crate) struct OutBody {
    inner: Either<Incoming, Full<Bytes>>,
    lease: Option<(Arc<Endpoint>, H1Lease, u32)>,
    rec: Option<Rec>,
    _active: Option<ActiveGuard>,
}

impl OutBody {
    fn release(&mut self) {
        if let Some((ep, lease, max)) = self.lease.take() {
            lease.release(&ep, max);
        }
    }
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(rec) = &mut this.rec {
                    if let Some(d) = f.data_ref() {
                        rec.sent += d.len() as u64;
                        if let Some(g) = &mut rec.grpc {
                            g.response_data(d);
                        }
                    } else if let Some(t) = f.trailers_ref()
                        && let Some(s) = t.get("grpc-status")
                    {
                        rec.grpc_status =
                            crate::grpc_stats::sent_status(s).or(rec.grpc_status.take());
                    }
                }
            }
            Poll::Ready(None) => {
                this.release();
                if let Some(rec) = this.rec.take() {
                    rec.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.lease = None;
                if let Some(rec) = &mut this.rec {
                    rec.flags = "UR";
                }
            }
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for OutBody {
    fn drop(&mut self) {
        // An empty response is never polled: it ended, and its connection is reusable.
        if self.inner.is_end_stream() {
            self.release();
        }
        if let Some(rec) = self.rec.take() {
            rec.finish();
        }
    }
}

/// What one outbound request reports when it is over.
struct Rec {
    ctx: Arc<Ctx>,
    labels: TcpLabels,
    listener: Lv,
    start: Instant,
    code: u16,
    flags: &'static str,
    sent: u64,
    received: Arc<AtomicU64>,
    grpc_status: Option<Lv>,
    peer: Lv,
    /// The called workload, from Istio's metadata exchange.
    dest_peer: Option<Arc<crate::peer_metadata::PeerMetadata>>,
    upstream: Option<SocketAddr>,
    authority: Option<String>,
    security: &'static str,
    src: SocketAddr,
    dst: SocketAddr,
    protocol: &'static str,
    log: Option<LogFields>,
    trace: crate::trace::ReqTrace,
    /// A gRPC request's message counts (crate::grpc_stats).
    grpc: Option<crate::grpc_stats::GrpcStats>,
}

/// Starts an outbound request's trace: a CLIENT span named as Istio's outbound route
/// decorator, `<host>:<port>/*`, upstream cluster `outbound|<port>||<host>`.
fn start_client_trace(
    ctx: &Ctx,
    dest: &Destination,
    authority: &Authority,
    parts: &mut http::request::Parts,
    src: SocketAddr,
    protocol: &str,
) -> crate::trace::ReqTrace {
    if !ctx.tracer.enabled() {
        return ctx.tracer.start(
            &mut parts.headers,
            &crate::trace::SpanStart::none(&ctx.workload),
        );
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("http://{authority}{path}");
    let name = format!("{}:{}/*", dest.cfg.host, dest.cfg.port);
    let cluster = format!("outbound|{}||{}", dest.cfg.port, dest.cfg.host);
    let node_id = crate::trace::node_id(&ctx.workload, src.ip());
    let method = parts.method.clone();
    ctx.tracer.start(
        &mut parts.headers,
        &crate::trace::SpanStart {
            kind: crate::trace::Kind::Client,
            name: &name,
            method: method.as_str(),
            url: &url,
            protocol,
            peer: src,
            upstream_cluster: &cluster,
            node_id: &node_id,
            workload: &ctx.workload,
        },
    )
}

struct LogFields {
    start_time: String,
    method: String,
    path: String,
    request_id: Option<String>,
}

impl Rec {
    fn new(
        ctx: &Arc<Ctx>,
        labels: TcpLabels,
        listener: Lv,
        parts: &http::request::Parts,
        src: SocketAddr,
        dst: SocketAddr,
        start: Instant,
    ) -> Self {
        let log = ctx.access_log.enabled().then(|| LogFields {
            start_time: now_rfc3339(),
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default(),
            request_id: parts
                .headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        });
        Rec {
            ctx: ctx.clone(),
            labels,
            listener,
            start,
            code: 0,
            flags: "-",
            sent: 0,
            received: Arc::new(AtomicU64::new(0)),
            grpc_status: None,
            peer: Lv::unknown(),
            dest_peer: None,
            upstream: None,
            authority: None,
            security: "mutual_tls",
            src,
            dst,
            protocol: if parts.version == Version::HTTP_2 {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            },
            log,
            trace: Default::default(),
            grpc: None,
        }
    }

    /// The labels of this request's series as far as the server is known: the destination's
    /// (`labels`), with the server's certificate and metadata.
    fn with_server(
        mut labels: TcpLabels,
        principal: &Lv,
        dest_peer: Option<&Arc<crate::peer_metadata::PeerMetadata>>,
    ) -> TcpLabels {
        // The namespace from the server's certificate first (istio_stats.cc: "fallback from
        // using the namespace from SAN if available to using peer metadata").
        crate::metrics::apply_destination_principal(&mut labels, principal);
        if let Some(peer) = dest_peer {
            crate::metrics::apply_destination_peer(&mut labels, peer);
        }
        labels
    }

    /// The server's answer has come, and with it who the server is (istio_stats.cc, client
    /// reporter: `peer_read_` once the metadata exchange has read the response headers): a
    /// gRPC request's messages are published from now on, and a gRPC response's counted.
    fn grpc_response(&mut self, parts: &http::response::Parts) {
        let Some(mut g) = self.grpc.take() else {
            return;
        };
        g.response_headers(parts);
        let labels = Self::with_server(self.labels.clone(), &self.peer, self.dest_peer.as_ref());
        g.peer_known(&self.ctx.metrics, &labels);
        self.grpc = Some(g);
    }

    fn finish(mut self) {
        let elapsed = self.start.elapsed();
        let mut conn = Self::with_server(self.labels, &self.peer, self.dest_peer.as_ref());
        // A request that ended before an answer (istio_stats.cc `reportHelper(true)`: the
        // labels as they are at the end).
        if let Some(g) = &self.grpc {
            g.peer_known(&self.ctx.metrics, &conn);
        }
        let (protocol, grpc) = crate::grpc_stats::protocol_labels(
            self.grpc.is_some(),
            self.grpc_status.as_ref().map(|s| &*s.0),
            self.code,
        );
        conn.request_protocol = protocol;
        conn.response_flags = self.flags;
        let labels = RequestLabels {
            conn,
            response_code: self.code,
            grpc_response_status: Lv::new(grpc.map_or("", crate::grpc_stats::status_label)),
        };
        self.ctx.metrics.request_handles(&labels).record(
            elapsed,
            self.received.load(Ordering::Relaxed),
            self.sent,
        );
        self.trace.finish(
            &self.ctx.tracer,
            &crate::trace::SpanEnd {
                status: self.code,
                flags: self.flags,
                request_size: self.received.load(Ordering::Relaxed),
                response_size: self.sent,
            },
        );
        if let Some(log) = &self.log {
            let trace_id = self.trace.trace_id_hex();
            let security = if self.peer.0.as_ref() == "unknown" {
                "none"
            } else {
                self.security
            };
            self.ctx.access_log.log(&AccessRecord {
                start_time: log.start_time.clone(),
                kind: "http",
                listener: &self.listener.0,
                protocol: self.protocol,
                method: Some(&log.method),
                authority: self.authority.as_deref(),
                path: Some(&log.path),
                response_code: Some(self.code),
                response_flags: self.flags,
                duration_ms: elapsed.as_millis() as u64,
                bytes_received: self.received.load(Ordering::Relaxed),
                bytes_sent: self.sent,
                downstream_remote_address: self.src.to_string(),
                downstream_local_address: self.dst.to_string(),
                upstream_host: self
                    .upstream
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "-".into()),
                source_principal: &labels.conn.source_principal.0,
                destination_principal: &self.peer.0,
                connection_security_policy: security,
                authz_policy: None,
                authz_result: None,
                request_id: log.request_id.as_deref(),
                trace_id: trace_id.as_deref(),
                ..Default::default()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_short_names() {
        assert_eq!(
            host_aliases("ratings.default.svc.cluster.local"),
            vec![
                "ratings",
                "ratings.default",
                "ratings.default.svc",
                "ratings.default.svc.cluster.local"
            ]
        );
        assert_eq!(host_aliases("db.example.com"), vec!["db.example.com"]);
    }

    #[test]
    fn local_authorities() {
        for a in [
            "127.0.0.1:9080",
            "localhost:9080",
            "[::1]:9080",
            "LOCALHOST",
        ] {
            assert!(is_local_authority(&a.parse().unwrap()), "{a}");
        }
        assert!(!is_local_authority(
            &"ratings.default:8080".parse().unwrap()
        ));
    }
}
