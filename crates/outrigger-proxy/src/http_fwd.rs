//! HTTP forwarding: one hyper server connection per downstream connection; each request goes
//! to the application over a connection from the backend's pool (crate::backend, shared by
//! every downstream connection), bodies streamed both ways (so a 1 GiB upload holds only a few
//! buffers), trailers (gRPC) passed through.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::{http1 as server1, http2 as server2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;

use crate::access_log::{AccessRecord, now_rfc3339};
use crate::authz;
use crate::backend::{Lease, Pool};
use crate::conn::ConnInfo;
use crate::ctx::Ctx;
use crate::h1_guard;
use crate::http_common::{
    Metered, Prefixed, TunnelEnd, drive_until, is_websocket_upgrade, retarget,
    set_websocket_upgrade, strip_hop_by_hop, tunnel,
};
use crate::io::BoxStream;
use crate::limits::{Active, Activity};
use crate::metrics::{Lv, RequestHandles, RequestLabels};
use crate::peer_metadata::PeerMetadata;
use crate::refusal::Refusal;
use crate::workload::Protocol;

static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
static XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The largest request head accepted, request line included: Envoy's
/// `max_request_headers_kb` default of 60 KiB, which Istio's sidecar keeps (larger heads are
/// answered `431`).
const MAX_REQUEST_HEADERS_BYTES: usize = 60 * 1024;

/// After an idle timeout, how long a connection may go on with no request in progress before
/// it is closed (Envoy's HCM `drain_timeout` default).
const IDLE_DRAIN: Duration = Duration::from_millis(5000);

/// The future of one request, boxed: hyper keeps room for a request's future in every
/// connection for the connection's life (HTTP/1's dispatcher holds `Box<Option<S::Future>>`),
/// so an unboxed one — several KiB, and written in full when a request starts — stayed
/// resident in every idle keep-alive connection. Boxed, an idle connection keeps a pointer; the
/// request's state is allocated when it starts and freed when its response is done.
type RequestFuture =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static>>;

pub(crate) async fn serve(io: BoxStream, h2: bool, conn: Arc<ConnInfo>, ctx: Arc<Ctx>) {
    let conn_src = conn.src;
    let backend = ctx.backends.pool(conn.listener.backend);
    let mut drain = ctx.drain.clone();
    let svc_ctx = ctx.clone();
    let handles = Arc::new(MetricHandles::default());
    let (codec_conn, codec_handles) = (conn.clone(), handles.clone());
    // Requests in progress, for the idle timeout: a request is active from its headers until
    // its response body has been sent (or dropped).
    let activity = Activity::new();
    let svc_activity = activity.clone();
    // HTTP/1: what Envoy's codec decides from the raw head (crate::h1_guard), one verdict per
    // request, in order.
    let verdicts = (!h2).then(|| Arc::new(h1_guard::Verdicts::default()));
    let svc_verdicts = verdicts.clone();
    let svc = service_fn(move |req| {
        let active = svc_activity.start();
        let verdict = svc_verdicts.as_ref().and_then(|v| v.next());
        let resp = handle(
            req,
            verdict,
            conn.clone(),
            svc_ctx.clone(),
            backend.clone(),
            handles.clone(),
        );
        let fut: RequestFuture = Box::pin(async move {
            let resp = resp.await?;
            Ok::<_, Infallible>(resp.map(|b| b.holding(active)))
        });
        fut
    });
    // Envoy's connection idle timeout (`crate::limits::Activity`): when no request has been
    // in progress for `idle_timeout` (from the connection's start, so a connection that never
    // sends a request is closed too), HTTP/2 gets GOAWAY and HTTP/1.1 is closed.
    let idle_timeout = ctx.settings.idle_timeout;
    let metrics = ctx.metrics.clone();
    let src = conn_src;
    // `stop` yields the grace period as a future of its own (see `drive_until`), on purpose.
    #[allow(clippy::async_yields_async)]
    let stop = async move {
        tokio::select! {
            // A drain lets requests finish (up to the drain timeout, enforced by the caller).
            _ = drain.wait_for(|d| *d) => future::Either::Left(future::pending()),
            _ = activity.idle(idle_timeout) => {
                metrics.idle_timeouts.inc();
                tracing::debug!(%src, "HTTP connection idle: closing it (connections.idleTimeout)");
                // After the GOAWAY, a request that raced in may finish; the connection is
                // closed once none has been in progress for Envoy's HCM `drain_timeout`
                // (default 5000 ms, "the time that Envoy will wait between sending an HTTP/2
                // shutdown notification ... and a final GOAWAY frame"). This also closes a
                // connection whose HTTP/2 preface never came, which a graceful shutdown alone
                // would wait on forever.
                activity.touch();
                future::Either::Right(async move { activity.idle(Some(IDLE_DRAIN)).await })
            }
        }
    };
    let result = if let Some(verdicts) = verdicts {
        let io = TokioIo::new(h1_guard::H1Guard::new(io, verdicts));
        let c = server1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            // A larger request head is answered 431 by hyper.
            .max_header_size(MAX_REQUEST_HEADERS_BYTES)
            .serve_connection(io, svc)
            .with_upgrades();
        // Boxed, as is the HTTP/2 connection below: the connection's task then holds one
        // pointer instead of room for both protocols' connection state.
        Box::pin(drive_until(c, stop, |c| c.graceful_shutdown())).await
    } else {
        // A malformed request closes the connection, as in Envoy (crate::h2_close).
        let io = TokioIo::new(crate::h2_close::H2Close::new(io));
        let c = server2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .max_header_list_size(MAX_REQUEST_HEADERS_BYTES as u32)
            .serve_connection(io, svc);
        Box::pin(drive_until(c, stop, |c| c.graceful_shutdown())).await
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "downstream HTTP connection ended with an error");
        if let Some(status) = codec_refusal(&e) {
            record_codec_refusal(&ctx, &codec_conn, codec_handles, status, &e);
        }
    }
}

/// The answer hyper's HTTP/1 server sent by itself for a request head it could not parse
/// (hyper proto/h1/role.rs `on_error`: `400` for a bad method, target, version or header —
/// including conflicting or malformed framing headers —, `414` for a target too long, `431`
/// for a head too large), before any service ran; `None` for other connection errors.
fn codec_refusal(e: &hyper::Error) -> Option<StatusCode> {
    if !e.is_parse() || e.is_parse_version_h2() {
        return None;
    }
    Some(if e.is_parse_too_large() {
        // hyper's two "too large" kinds differ only in their description.
        if e.to_string().contains("URI too long") {
            StatusCode::URI_TOO_LONG
        } else {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        }
    } else {
        StatusCode::BAD_REQUEST
    })
}

/// Records a request the codec refused as Envoy records it: a request in the metrics and the
/// access log with its status and the `DPE` (downstream protocol error) flag, method and path
/// unknown (`-`).
fn record_codec_refusal(
    ctx: &Arc<Ctx>,
    conn: &Arc<ConnInfo>,
    handles: Arc<MetricHandles>,
    status: StatusCode,
    e: &hyper::Error,
) {
    crate::warn_limited!(
        listener = %conn.listener.name, src = %conn.src,
        "request refused by the HTTP codec: {e}; answered {status}"
    );
    // On the status page too, with the response code details Envoy's HTTP/1 codec gives a
    // head it cannot parse (envoyproxy/envoy source/common/http/http1/codec_impl.cc
    // `Http1ResponseCodeDetailValues`): `http1.headers_too_large` for a head over the limit
    // (Envoy counts the request target in the header size, so a target too long is one too),
    // `http1.codec_error` otherwise. The path is unknown.
    let details = if status == StatusCode::BAD_REQUEST {
        "http1.codec_error"
    } else {
        "http1.headers_too_large"
    };
    ctx.denials.refused(conn, "-", None, details);
    let parts = Request::new(()).into_parts().0;
    let mut rec = Recorder::new(ctx, conn, &parts, "HTTP/1.1", Instant::now(), handles);
    if let Some(log) = &mut rec.log {
        log.method = "-".into();
        log.path = "-".into();
        log.authority = "-".into();
    }
    rec.code = status.as_u16();
    rec.flags = "DPE";
    rec.finish();
}

/// The protocol Outrigger speaks to the application for one request: the listener's, as an
/// Istio sidecar does (istio/istio `pilot/pkg/networking/core/cluster_builder.go`,
/// `setUpstreamProtocol`: an `http2`/`grpc`/`grpc-web` port gets HTTP/2 options, an `http`
/// port the default HTTP/1.1), never the caller's. For `auto` Istio uses the caller's protocol
/// (`use_downstream_protocol`), which makes an HTTP/2 caller fail against an HTTP/1.1-only
/// application (IIS, Tomcat, a .NET Framework service: Outrigger's usual backend). Outrigger's
/// `auto` sends HTTP/2 only for gRPC (`content-type: application/grpc…`, which cannot travel
/// over HTTP/1.1) and HTTP/1.1 otherwise; docs/config.md says so.
fn upstream_is_h2(protocol: Protocol, parts: &http::request::Parts) -> bool {
    if protocol.app_speaks_h2() {
        return true;
    }
    protocol == Protocol::Auto
        && parts.version == http::Version::HTTP_2
        && parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// One request, in the order an Istio sidecar's inbound HTTP chain handles it: what the codec
/// refuses, then local rate limiting (the filter Istio's rate-limiting task inserts first),
/// then authentication, authorization and forwarding ([`authorize_and_forward`]).
async fn handle(
    req: Request<Incoming>,
    codec_verdict: Option<crate::codec_checks::Refusal>,
    conn: Arc<ConnInfo>,
    ctx: Arc<Ctx>,
    backend: Arc<Pool>,
    handles: Arc<MetricHandles>,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let protocol = if parts.version == http::Version::HTTP_2 {
        "HTTP/2"
    } else {
        "HTTP/1.1"
    };

    // What Envoy's codec refuses before any filter runs: decided from the raw HTTP/1 head
    // (crate::h1_guard) or from the parsed head (crate::codec_checks).
    if let Some(r) = codec_verdict.or_else(|| crate::codec_checks::check(&parts)) {
        crate::warn_limited!(
            listener = %conn.listener.name, src = %conn.src,
            method = %parts.method, details = r.details,
            "request refused by the HTTP codec rules: {}", r.status
        );
        // On the status page's list of recent denials, with Envoy's response code details
        // as the reason.
        ctx.denials
            .refused(&conn, parts.uri.path(), None, r.details);
        let rec = Recorder::new(&ctx, &conn, &parts, protocol, start, handles);
        let why = Refusal::Codec {
            status: r.status,
            flag: r.flag,
        };
        return Ok(refuse(why, rec, parts.version));
    }

    // Istio's inbound HTTP chain starts with the metadata exchange filter (crate::peer_metadata):
    // the caller's workload is known to every later step's metrics, the application never sees
    // the exchange headers, and every answer from here on — local replies included, as Envoy
    // encodes them through the same filter — carries ours when the caller sent its own.
    let exchange = {
        let mut last = handles.peer.lock().unwrap_or_else(|e| e.into_inner());
        ctx.peer_exchange.take(&mut parts.headers, &mut last)
    };
    if let Some(peer) = &exchange.peer {
        parts.extensions.insert(peer.clone());
    }
    let mut resp = filter_chain(
        parts,
        body,
        protocol,
        start,
        conn,
        ctx.clone(),
        backend,
        handles,
    )
    .await?;
    ctx.peer_exchange.respond(&exchange, resp.headers_mut());
    Ok(resp)
}

/// The inbound HTTP filters after the metadata exchange, in Istio's order: request id, local
/// rate limit, then authentication, authorization and the router.
#[allow(clippy::too_many_arguments)]
async fn filter_chain(
    mut parts: http::request::Parts,
    body: Incoming,
    protocol: &'static str,
    start: Instant,
    conn: Arc<ConnInfo>,
    ctx: Arc<Ctx>,
    backend: Arc<Pool>,
    handles: Arc<MetricHandles>,
) -> Result<Response<ProxyBody>, Infallible> {
    // The `x-envoy-*` instructions no caller may give (`x-envoy-force-trace` among them).
    crate::http_common::clean_internal_headers(&mut parts.headers);
    // Envoy's connection manager gives every request an `x-request-id` before any filter
    // (conn_manager_utility.cc `mutateRequestHeaders`): one a mesh peer sent is kept (the
    // inbound listener does not use the remote address, so the request is internal), a
    // missing one is generated. The application, the access log and tracing see the same id.
    if !parts.headers.contains_key(&X_REQUEST_ID)
        && let Some(id) = crate::http_common::new_request_id()
    {
        parts.headers.insert(X_REQUEST_ID.clone(), id);
    }
    // The request's trace (crate::trace): the sampling decision, a SERVER span, and the
    // context headers the application sees. Ended in `Recorder::finish`.
    let trace = start_trace(&ctx, &conn, &mut parts, protocol);

    // One policy snapshot for the whole request: rate limits (EnvoyFilters), authentication
    // and authorization agree.
    let policy = ctx.policy.load();

    // Local rate limiting (crate::ratelimit), rebuilt once per policy version.
    let mut ratelimit = ctx.ratelimit.load_full();
    if ratelimit.version() != policy.version {
        let mut rules = ctx.settings.rate_limits.clone();
        rules.extend(policy.rate_limits.iter().cloned());
        ratelimit = Arc::new(ratelimit.rebuilt(&rules, policy.version));
        ctx.ratelimit.store(ratelimit.clone());
    }
    let mut rl_headers = Vec::new();
    if !ratelimit.is_empty() {
        let v = ratelimit.check(
            &crate::ratelimit::Request {
                listener: &conn.listener.name,
                method: &parts.method,
                path: parts.uri.path(),
                principal: conn.source_principal_str(),
            },
            std::time::Instant::now(),
        );
        rl_headers = v.headers;
        if let Some(rule) = v.limited_by {
            ctx.metrics.rate_limited(&rule);
            // On the status page's list of recent denials, as policy refusals are.
            ctx.denials
                .refused(&conn, parts.uri.path(), Some(rule.clone()), "rate_limited");
            let mut rec = Recorder::new(&ctx, &conn, &parts, protocol, start, handles);
            rec.trace = trace;
            let mut resp = refuse(Refusal::RateLimited, rec, parts.version);
            for (k, v) in rl_headers {
                resp.headers_mut().append(k, v);
            }
            return Ok(resp);
        }
    }

    let mut resp = authorize_and_forward(
        parts, body, protocol, start, policy, conn, ctx, backend, handles, trace,
    )
    .await?;
    for (k, v) in rl_headers {
        resp.headers_mut().append(k, v);
    }
    Ok(resp)
}

/// Starts the request's trace (one call; with tracing and the access log off, nothing is
/// done). The span's name is Istio's inbound route decorator, `<service host>:<port>/*`, and
/// its upstream cluster Istio's inbound cluster, `inbound|<port>||`.
fn start_trace(
    ctx: &Ctx,
    conn: &ConnInfo,
    parts: &mut http::request::Parts,
    protocol: &str,
) -> crate::trace::ReqTrace {
    if !ctx.tracer.enabled() {
        return ctx.tracer.start(
            &mut parts.headers,
            &crate::trace::SpanStart::none(&ctx.workload),
        );
    }
    let w = &ctx.workload;
    let port = conn.dst.port();
    let host = w
        .service_host
        .clone()
        .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", w.canonical_service, w.namespace));
    let authority = crate::http_common::authority_str(parts);
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("http://{authority}{path}");
    let name = format!("{host}:{port}/*");
    let cluster = format!("inbound|{port}||");
    let node_id = crate::trace::node_id(w, conn.dst.ip());
    let method = parts.method.clone();
    ctx.tracer.start(
        &mut parts.headers,
        &crate::trace::SpanStart {
            kind: crate::trace::Kind::Server,
            name: &name,
            method: method.as_str(),
            url: &url,
            protocol,
            peer: conn.src,
            upstream_cluster: &cluster,
            node_id: &node_id,
            workload: w,
        },
    )
}

/// Authentication, authorization and forwarding of a request the codec and the rate limits
/// let through.
#[allow(clippy::too_many_arguments)]
async fn authorize_and_forward(
    mut parts: http::request::Parts,
    body: Incoming,
    protocol: &'static str,
    start: Instant,
    policy: Arc<crate::policy_state::PolicyState>,
    conn: Arc<ConnInfo>,
    ctx: Arc<Ctx>,
    backend: Arc<Pool>,
    handles: Arc<MetricHandles>,
    trace: crate::trace::ReqTrace,
) -> Result<Response<ProxyBody>, Infallible> {
    let websocket = is_websocket_upgrade(&parts);
    let mut rec = Recorder::new(&ctx, &conn, &parts, protocol, start, handles);
    rec.trace = trace;
    // What Envoy's connection manager sets before any filter runs, so that JWT, RBAC, the
    // external authorizer and the application all see it: never a client's own claim about
    // its certificate, only ours (`forward_client_cert_details: APPEND_FORWARD` with the peer's
    // URI, as istiod configures the inbound listener), and the scheme of the mTLS connection.
    parts.headers.remove(&XFCC);
    if let Some(xfcc) = &conn.xfcc {
        parts.headers.insert(XFCC.clone(), xfcc.clone());
        parts
            .headers
            .insert(XFP.clone(), HeaderValue::from_static("https"));
    }

    // Compiled with the snapshot (outrigger_policy::request_authn): nothing parsed here.
    let jwt_rules = policy.snapshot.jwt_rules();
    // Without rules nothing is awaited: the verifying future (JWKS fetches included) is boxed
    // so that its size is not copied into every request's future.
    let authenticated = if jwt_rules.is_empty() {
        crate::jwt_authn::strip_claim_headers(&ctx.jwks, jwt_rules, &mut parts);
        Ok(None)
    } else {
        Box::pin(crate::jwt_authn::authenticate(
            &ctx.jwks, jwt_rules, &mut parts,
        ))
        .await
    };
    let jwt = match authenticated {
        Ok(claims) => {
            if !jwt_rules.is_empty() {
                ctx.metrics
                    .jwt_authn
                    .get_or_create(&crate::metrics::DecisionLabels {
                        action: "allow",
                        result: if claims.is_some() {
                            "verified"
                        } else {
                            "no_token"
                        },
                    })
                    .inc();
            }
            claims
        }
        Err(e) => {
            ctx.metrics
                .jwt_authn
                .get_or_create(&crate::metrics::DecisionLabels {
                    action: "deny",
                    result: "invalid",
                })
                .inc();
            let status =
                StatusCode::from_u16(e.status.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
            tracing::info!(
                listener = %conn.listener.name, src = %conn.src,
                source = conn.source_principal_str(),
                "JWT refused: {}; answering {} {}", e.reason, status.as_u16(), e.status.message()
            );
            rec.authz_result = Some("jwt_invalid");
            ctx.denials
                .refused(&conn, parts.uri.path(), None, "jwt_invalid");
            let challenge =
                crate::jwt_authn::www_authenticate(&parts, conn.security_policy() == "mutual_tls");
            let why = Refusal::Jwt {
                status,
                message: e.status.message(),
                challenge,
            };
            return Ok(refuse(why, rec, parts.version));
        }
    };
    let (mut verdict, inflight) =
        authz::check_http(&ctx, &conn, &mut parts, &policy.snapshot, jwt.as_ref());
    drop(policy);
    if rec.log.is_some() {
        rec.jwt_principal = jwt.as_ref().and_then(|c| c.principal());
    }
    // CUSTOM first (crate::ext_authz): the authorizer's denial or error answers; after its
    // allow, the DENY and ALLOW decision applies.
    let mut on_allow_downstream = Vec::new();
    let mut body = Prefixed::new(body);
    let custom_refusal = match verdict.custom.take() {
        Some(custom) => {
            // `includeRequestBodyInCheck`: the start of the body goes with the check (Envoy's
            // ext_authz buffers it, unless the request has none or is an upgrade).
            let check_body = match custom.provider.body {
                Some(settings) if !websocket && !body.rest.is_end_stream() => {
                    match Box::pin(read_for_check(&mut body, settings)).await {
                        Ok(b) => Some(b),
                        Err(why) => {
                            rec.authz_result = Some("body_refused");
                            return Ok(refuse(why, rec, parts.version));
                        }
                    }
                }
                _ => None,
            };
            Box::pin(ask_custom(
                &ctx,
                &conn,
                &mut parts,
                &mut verdict,
                &custom,
                check_body,
            ))
            .await
            .map(|headers| on_allow_downstream = headers)
            .err()
        }
        None => None,
    };
    rec.authz_policy = verdict.policy.clone();
    rec.authz_result = Some(verdict.result);
    rec.audit = verdict.audit.clone();
    if let Some(why) = custom_refusal {
        return Ok(refuse(why, rec, parts.version));
    }
    // Every answer from here on (the application's, a DENY or ALLOW refusal, a local error)
    // carries the authorizer's `headersToDownstreamOnAllow` headers: Envoy's ext_authz filter
    // adds them to whatever response passes back through it.
    let answer: Result<Response<ProxyBody>, Infallible> = async move {
        if let Some(why) = verdict.deny {
            return Ok(refuse(why, rec, parts.version));
        }

        strip_hop_by_hop(&mut parts.headers);
        let received = Arc::new(AtomicU64::new(0));
        rec.received = Some(received.clone());
        let client_upgrade = if websocket {
            set_websocket_upgrade(&mut parts.headers);
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        // A WebSocket upgrade is HTTP/1.1 by definition (RFC 6455); everything else goes in the
        // application's protocol.
        let to_h2 = client_upgrade.is_none() && upstream_is_h2(conn.listener.protocol, &parts);
        let downstream_version = parts.version;
        // The caller's authority (`:authority`, or `Host`), else the application's address.
        let authority = crate::http_common::request_authority(&parts)
            .or_else(|| conn.listener.backend.to_string().parse().ok());
        if let Some(a) = &authority {
            retarget(&mut parts, to_h2, a);
        }
        let body_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A gRPC request's messages (crate::grpc_stats), published as counted: the caller is
        // known already (istio_stats.cc, server reporter: the metadata exchange ran on the
        // request's headers).
        rec.grpc = crate::grpc_stats::GrpcStats::for_request(&parts);
        if let Some(g) = &rec.grpc {
            g.peer_known(&ctx.metrics, &rec.peer_labels());
        }
        let req = Request::from_parts(
            parts,
            Metered {
                inner: body,
                counter: received,
                failed: Some(body_failed.clone()),
                grpc: rec.grpc.as_ref().map(|g| g.request_body()),
            },
        );
        let sent = match client_upgrade {
            Some(_) => Box::pin(backend.upgrade(req)).await.map(|r| (r, None)),
            None => backend.send(req, to_h2).await.map(|(r, l)| (r, Some(l))),
        };
        let sent = match (client_upgrade, sent) {
            (Some(client), Ok((resp, _))) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                return Ok(websocket_tunnel(client, resp, rec, inflight, &ctx));
            }
            (_, sent) => sent,
        };
        match sent {
            Ok((resp, lease)) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.version = downstream_version;
                rec.code = parts.status.as_u16();
                if let Some(s) = parts.headers.get(&GRPC_STATUS) {
                    rec.grpc_status = crate::grpc_stats::sent_status(s).or(rec.grpc_status.take());
                }
                if let Some(g) = &mut rec.grpc {
                    g.response_headers(&parts);
                }
                Ok(Response::from_parts(
                    parts,
                    ProxyBody {
                        inner: Either::Left(body),
                        reauth: inflight.map(|f| Reauth {
                            inflight: f,
                            watch: Watch::Idle(ctx.policy.subscribe()),
                            raced: false,
                        }),
                        rec: Some(rec),
                        active: None,
                        lease,
                    },
                ))
            }
            // The request body was malformed (a bad chunk, a body shorter than its
            // content-length): the downstream's fault, answered as Envoy's codec answers it —
            // `400` with `DPE` — not as an upstream failure.
            Err(e) if body_failed.load(std::sync::atomic::Ordering::Relaxed) => {
                crate::warn_limited!(
                    listener = %conn.listener.name, src = %conn.src,
                    "request body malformed: {e}; answering 400"
                );
                Ok(refuse(Refusal::MalformedBody, rec, downstream_version))
            }
            Err(e) => {
                crate::warn_limited!(
                    listener = %conn.listener.name,
                    backend = %conn.listener.backend,
                    "request failed: {e}; answering 503"
                );
                Ok(refuse(e.refusal(), rec, downstream_version))
            }
        }
    }
    .await;
    let Ok(mut resp) = answer;
    crate::ext_authz::apply(resp.headers_mut(), on_allow_downstream);
    Ok(resp)
}

/// The backend accepted a WebSocket upgrade: answers the client `101` with the backend's
/// headers and joins the two upgraded connections in a task. The request is recorded (code
/// 101, with the tunnel's bytes and duration) when the tunnel ends, as Envoy logs an upgraded
/// stream. A policy change that denies the request now closes the tunnel.
fn websocket_tunnel(
    client: hyper::upgrade::OnUpgrade,
    mut resp: Response<Incoming>,
    mut rec: Recorder,
    inflight: Option<authz::InFlight>,
    ctx: &Arc<Ctx>,
) -> Response<ProxyBody> {
    let server = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    set_websocket_upgrade(&mut parts.headers);
    rec.code = StatusCode::SWITCHING_PROTOCOLS.as_u16();
    let mut policy_rx = ctx.policy.subscribe();
    let ctx = ctx.clone();
    // The task holds the context (and so its drain receiver): a drain waits for an open
    // WebSocket up to the drain timeout, as for a TCP connection.
    tokio::spawn(async move {
        let counts = Arc::new(crate::io::ByteCounts::default());
        let mut revoked = None;
        let stop = async {
            let Some(inflight) = &inflight else {
                return future::pending().await;
            };
            while policy_rx.changed().await.is_ok() {
                let v = authz::recheck(&ctx, &rec.conn, inflight);
                if v.deny.is_some() {
                    revoked = Some(v);
                    return;
                }
            }
            future::pending().await
        };
        if let TunnelEnd::Stopped = tunnel(client, server, counts.clone(), stop).await
            && let Some(v) = revoked
        {
            rec.revoked(&v, "closing a WebSocket connection");
        }
        rec.sent += counts.sent();
        if let Some(r) = &rec.received {
            r.fetch_add(counts.received(), Ordering::Relaxed);
        }
        rec.finish();
    });
    Response::from_parts(
        parts,
        ProxyBody {
            inner: Either::Right(Full::new(Bytes::new())),
            reauth: None,
            rec: None,
            active: None,
            lease: None,
        },
    )
}

/// Reads the start of the request body for an external authorizer's check, keeping what it
/// reads for the application: until `maxRequestBytes` are read (with `allowPartialMessage`) or
/// the body ends. `Err`: a body longer than `maxRequestBytes` without `allowPartialMessage`
/// (Envoy's ext_authz sets that as the stream's buffer limit, whose overflow is `413`), or a
/// malformed one.
async fn read_for_check(
    body: &mut Prefixed<Incoming>,
    s: crate::ext_authz::BodySettings,
) -> Result<crate::ext_authz::CheckBody, Refusal> {
    use http_body_util::BodyExt;
    let max = s.max_bytes as usize;
    let mut read = bytes::BytesMut::new();
    while !(s.allow_partial && read.len() >= max) {
        match body.rest.frame().await {
            None => break,
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    read.extend_from_slice(d);
                }
                body.head.push_back(f);
                if !s.allow_partial && read.len() > max {
                    return Err(Refusal::BodyTooLarge);
                }
            }
            Some(Err(_)) => return Err(Refusal::MalformedBody),
        }
    }
    let total = read.len();
    read.truncate(max);
    Ok(crate::ext_authz::CheckBody {
        data: read.freeze(),
        partial: total > max,
        read: total,
    })
}

/// Istio's CUSTOM action for one request: asks the provider ([`crate::ext_authz`]) and settles
/// the verdict. `Ok`: allowed by the authorizer (or its failure, with `failOpen`), the
/// request's headers updated; the headers to apply to the response the client gets. `Err`:
/// what to answer instead.
async fn ask_custom(
    ctx: &Ctx,
    conn: &ConnInfo,
    parts: &mut http::request::Parts,
    verdict: &mut authz::Verdict,
    custom: &authz::Custom,
    body: Option<crate::ext_authz::CheckBody>,
) -> Result<Vec<crate::ext_authz::Mutation>, Refusal> {
    use crate::ext_authz::{CheckInput, Outcome};
    let provider = &custom.provider;
    let input = CheckInput {
        method: &parts.method,
        host: crate::http_common::authority_str(parts),
        path_and_query: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        headers: &parts.headers,
        protocol: match parts.version {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        scheme: if conn.security_policy() == "mutual_tls" {
            "https"
        } else {
            "http"
        },
        peers: authz::peers(ctx, conn),
        body,
    };
    let via = crate::ext_authz::route(provider, &ctx.outbound);
    let outcome = crate::ext_authz::check(provider, &input, via).await;
    let path = parts.uri.path().to_string();
    let answer = authz::CustomAnswer::of(&outcome);
    let result = match outcome {
        Outcome::Allow {
            upstream,
            remove,
            downstream,
        } => {
            for n in remove {
                parts.headers.remove(n);
            }
            crate::ext_authz::apply(&mut parts.headers, upstream);
            Ok(downstream)
        }
        Outcome::FailedOpen => Ok(Vec::new()),
        Outcome::Deny {
            status,
            headers,
            body,
        } => {
            tracing::debug!(
                listener = %conn.listener.name, source = conn.source_principal_str(),
                provider = provider.name, status = status.as_u16(),
                "denied by the external authorizer"
            );
            Err(Refusal::External {
                status,
                headers,
                body,
            })
        }
        Outcome::Error { status } => Err(Refusal::External {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }),
    };
    authz::settle_custom(ctx, conn, &path, verdict, custom, answer);
    result
}

/// Answers a request that does not reach the application (crate::refusal says how), and
/// records it with the refusal's status and response flag.
fn refuse(why: Refusal, mut rec: Recorder, version: http::Version) -> Response<ProxyBody> {
    let status = why.status();
    rec.code = status.as_u16();
    rec.flags = why.flag();
    let mut resp = Response::new(ProxyBody {
        inner: Either::Right(Full::new(why.body())),
        reauth: None,
        rec: Some(rec),
        active: None,
        lease: None,
    });
    *resp.status_mut() = status;
    why.headers(resp.headers_mut(), version != http::Version::HTTP_2);
    resp
}

/// The response body: the application's, streamed, or a local reply. It records the request's
/// metrics and access log line once, when it ends or is dropped (client gone).
pub(crate) struct ProxyBody {
    inner: Either<Incoming, Full<Bytes>>,
    /// Keeps the request counted as in progress (for the idle timeout) until the body ends.
    active: Option<Active>,
    /// Present while an allowed response streams: a policy change re-authorizes it.
    reauth: Option<Reauth>,
    rec: Option<Recorder>,
    /// The application's connection (or HTTP/2 stream) this response came on, given back to
    /// the pool when the body has been read to its end (crate::backend).
    lease: Option<Lease>,
}

impl ProxyBody {
    /// The response has been read to its end: record it and give its connection back.
    fn ended(&mut self) {
        if let Some(rec) = self.rec.take() {
            rec.finish();
        }
        if let Some(lease) = self.lease.take() {
            lease.finish();
        }
    }

    fn holding(mut self, active: Active) -> Self {
        self.active = Some(active);
        self
    }
}

type Changed = Pin<Box<dyn Future<Output = Option<watch::Receiver<u64>>> + Send>>;

/// Watching for policy changes costs nothing until the response body has to wait: only then
/// is a waker registered on the policy channel (one allocation, for long responses only).
enum Watch {
    Idle(watch::Receiver<u64>),
    Waiting(Changed),
    Done,
}

struct Reauth {
    inflight: authz::InFlight,
    watch: Watch,
    /// A change seen while arming, not yet acted on.
    raced: bool,
}

impl Reauth {
    /// True when the policy changed since the last look.
    fn policy_changed(&mut self, cx: &mut Context<'_>) -> bool {
        if std::mem::take(&mut self.raced) {
            return true;
        }
        match &mut self.watch {
            Watch::Idle(rx) => {
                if rx.has_changed().unwrap_or(false) {
                    rx.borrow_and_update();
                    true
                } else {
                    false
                }
            }
            Watch::Waiting(f) => match f.as_mut().poll(cx) {
                Poll::Ready(Some(mut rx)) => {
                    rx.borrow_and_update();
                    self.watch = Watch::Idle(rx);
                    true
                }
                Poll::Ready(None) => {
                    self.watch = Watch::Done;
                    false
                }
                Poll::Pending => false,
            },
            Watch::Done => false,
        }
    }

    /// The body is about to wait: be woken by a policy change too.
    fn arm(&mut self, cx: &mut Context<'_>) {
        match std::mem::replace(&mut self.watch, Watch::Done) {
            Watch::Idle(mut rx) => {
                let mut f: Changed = Box::pin(async move { rx.changed().await.ok().map(|_| rx) });
                // Register the waker now. A change that raced in is reported at the next poll.
                match f.as_mut().poll(cx) {
                    Poll::Ready(Some(rx)) => {
                        self.watch = Watch::Idle(rx);
                        self.raced = true;
                        cx.waker().wake_by_ref();
                    }
                    Poll::Ready(None) => self.watch = Watch::Done,
                    Poll::Pending => self.watch = Watch::Waiting(f),
                }
            }
            other => self.watch = other,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let (Some(r), Some(rec)) = (&mut this.reauth, &mut this.rec)
            && r.policy_changed(cx)
        {
            let v = authz::recheck(&rec.ctx, &rec.conn, &r.inflight);
            if v.deny.is_some() {
                rec.revoked(&v, "ending a streaming response");
                this.reauth = None;
                return Poll::Ready(Some(Err("authorization revoked by a policy change".into())));
            }
        }
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        if res.is_pending()
            && let Some(r) = &mut this.reauth
        {
            r.arm(cx);
        }
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(rec) = &mut this.rec {
                    if let Some(d) = f.data_ref() {
                        rec.sent += d.len() as u64;
                        if let Some(g) = &mut rec.grpc {
                            g.response_data(d);
                        }
                    } else if let Some(t) = f.trailers_ref()
                        && let Some(s) = t.get(&GRPC_STATUS)
                    {
                        rec.grpc_status =
                            crate::grpc_stats::sent_status(s).or(rec.grpc_status.take());
                    }
                }
                // hyper stops polling a body that says it has ended, so this may be the last
                // look: record now, before the client can see the response end.
                if this.inner.is_end_stream() {
                    this.ended();
                }
            }
            Poll::Ready(None) => this.ended(),
            Poll::Ready(Some(Err(_))) => {
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

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // A body hyper never polled because it was empty (HEAD, 204, 304) has ended too; one
        // dropped half-way takes its HTTP/1.1 connection with it (the rest of the response is
        // still on the wire).
        if self.inner.is_end_stream() {
            self.ended();
        } else {
            self.lease = None;
            if let Some(rec) = self.rec.take() {
                rec.finish();
            }
        }
    }
}

/// What one request reports when it is over.
pub(crate) struct Recorder {
    ctx: Arc<Ctx>,
    conn: Arc<ConnInfo>,
    /// The calling workload, from Istio's metadata exchange (crate::peer_metadata).
    peer: Option<Arc<PeerMetadata>>,
    start: Instant,
    code: u16,
    flags: &'static str,
    sent: u64,
    received: Option<Arc<AtomicU64>>,
    grpc_status: Option<Lv>,
    authz_policy: Option<String>,
    authz_result: Option<&'static str>,
    /// AUDIT policies that matched (`ns/name[rule],…`).
    audit: Option<String>,
    /// The verified JWT's `iss/sub`.
    jwt_principal: Option<String>,
    protocol: &'static str,
    /// Only captured when the access log is on.
    log: Option<LogFields>,
    handles: Arc<MetricHandles>,
    trace: crate::trace::ReqTrace,
    /// A gRPC request's message counts (crate::grpc_stats).
    grpc: Option<crate::grpc_stats::GrpcStats>,
}

/// The request series (count, duration, sizes) of each label set seen on one connection, so
/// that a request does not hash two dozen labels four times to find them (most connections see
/// one or two label sets: 200, maybe 404).
#[derive(Default)]
pub(crate) struct MetricHandles {
    series: std::sync::Mutex<Vec<(HandleKey, RequestHandles)>>,
    /// The peer's last `x-envoy-peer-metadata`, decoded (crate::peer_metadata::take).
    peer: std::sync::Mutex<Option<(HeaderValue, Arc<PeerMetadata>)>>,
}

#[derive(PartialEq)]
struct HandleKey {
    code: u16,
    flags: &'static str,
    protocol: &'static str,
    grpc: Option<Lv>,
    peer: Option<Arc<PeerMetadata>>,
}

struct LogFields {
    start_time: String,
    method: String,
    authority: String,
    path: String,
    request_id: Option<String>,
    user_agent: Option<String>,
    x_forwarded_for: Option<String>,
}

impl Recorder {
    /// A policy change denied this request while its response (or WebSocket) was still open.
    fn revoked(&mut self, v: &authz::Verdict, action: &str) {
        tracing::info!(
            src = %self.conn.src,
            source = self.conn.source_principal_str(),
            policy = v.policy.as_deref().unwrap_or("-"),
            "policy changed: {action} that is now denied"
        );
        self.flags = "RBAC";
        self.authz_result = Some(v.result);
    }

    fn new(
        ctx: &Arc<Ctx>,
        conn: &Arc<ConnInfo>,
        parts: &http::request::Parts,
        protocol: &'static str,
        start: Instant,
        handles: Arc<MetricHandles>,
    ) -> Self {
        let log = ctx.access_log.enabled().then(|| LogFields {
            start_time: now_rfc3339(),
            method: parts.method.to_string(),
            authority: crate::http_common::authority_str(parts).to_string(),
            path: parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string(),
            request_id: parts
                .headers
                .get(&X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            user_agent: parts
                .headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            x_forwarded_for: parts
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        });
        Recorder {
            ctx: ctx.clone(),
            conn: conn.clone(),
            peer: parts.extensions.get::<Arc<PeerMetadata>>().cloned(),
            start,
            code: 0,
            flags: "-",
            sent: 0,
            received: None,
            grpc_status: None,
            authz_policy: None,
            authz_result: None,
            audit: None,
            jwt_principal: None,
            protocol,
            log,
            handles,
            trace: Default::default(),
            grpc: None,
        }
    }

    /// The labels of this request's series before the response is known: the connection's,
    /// with the caller's metadata.
    fn peer_labels(&self) -> crate::metrics::TcpLabels {
        let mut l = self.conn.labels.clone();
        if let Some(peer) = &self.peer {
            crate::metrics::apply_source_peer(&mut l, peer);
        }
        l
    }

    fn finish(mut self) {
        let elapsed = self.start.elapsed();
        self.ctx
            .status_rates
            .requests
            .fetch_add(1, Ordering::Relaxed);
        let (protocol, grpc) = crate::grpc_stats::protocol_labels(
            self.grpc.is_some(),
            self.grpc_status.as_ref().map(|s| &*s.0),
            self.code,
        );
        let key = HandleKey {
            code: self.code,
            flags: self.flags,
            protocol,
            grpc: grpc.map(|n| Lv::new(crate::grpc_stats::status_label(n))),
            peer: self.peer.clone(),
        };
        let handles = {
            let mut cache = self
                .handles
                .series
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match cache.iter().find(|(k, _)| *k == key) {
                Some((_, h)) => h.clone(),
                None => {
                    let mut conn_labels = self.peer_labels();
                    conn_labels.request_protocol = key.protocol;
                    conn_labels.response_flags = key.flags;
                    let labels = RequestLabels {
                        conn: conn_labels,
                        response_code: key.code,
                        grpc_response_status: key.grpc.clone().unwrap_or_else(|| Lv::new("")),
                    };
                    let h = self.ctx.metrics.request_handles(&labels);
                    cache.push((key, h.clone()));
                    h
                }
            }
        };
        let received = self
            .received
            .as_ref()
            .map(|r| r.load(Ordering::Relaxed))
            .unwrap_or(0);
        handles.record(elapsed, received, self.sent);
        self.trace.finish(
            &self.ctx.tracer,
            &crate::trace::SpanEnd {
                status: self.code,
                flags: self.flags,
                request_size: received,
                response_size: self.sent,
            },
        );
        if let Some(log) = &self.log {
            let trace_id = self.trace.trace_id_hex();
            self.ctx.access_log.log(&AccessRecord {
                start_time: log.start_time.clone(),
                kind: "http",
                listener: &self.conn.listener.name,
                protocol: self.protocol,
                method: Some(&log.method),
                authority: Some(&log.authority),
                path: Some(&log.path),
                response_code: Some(self.code),
                response_flags: self.flags,
                duration_ms: elapsed.as_millis() as u64,
                bytes_received: received,
                bytes_sent: self.sent,
                downstream_remote_address: self.conn.src.to_string(),
                downstream_local_address: self.conn.dst.to_string(),
                upstream_host: self.conn.listener.backend.to_string(),
                source_principal: self.conn.source_principal_str(),
                destination_principal: &self.conn.labels.destination_principal.0,
                connection_security_policy: self.conn.security_policy(),
                authz_policy: self.authz_policy.as_deref(),
                authz_result: self.authz_result,
                request_id: log.request_id.as_deref(),
                audit: self.audit.as_deref(),
                jwt_principal: self.jwt_principal.as_deref(),
                user_agent: log.user_agent.as_deref(),
                x_forwarded_for: log.x_forwarded_for.as_deref(),
                requested_server_name: self.conn.sni.as_deref(),
                trace_id: trace_id.as_deref(),
            });
        }
    }
}
