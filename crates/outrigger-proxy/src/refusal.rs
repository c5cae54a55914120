//! Every way traffic is refused, protocol-neutral, and how each protocol says it: the HTTP
//! status, body and headers, Envoy's response flag, ztunnel's HBONE status — decided here and
//! nowhere else (issue 14, "one refusal type"). Inbound (a mesh peer calling the application)
//! and outbound (the application calling the mesh). The strings are Envoy's and Istio's, and
//! Outrigger's own where only Outrigger refuses (its HTTP proxy's routing).

use bytes::Bytes;
use http::StatusCode;
use http::header::HeaderValue;

use crate::ext_authz::Mutation;

/// Envoy's RBAC filter body for a denied request.
pub(crate) const RBAC_DENIED: &str = "RBAC: access denied";

/// Envoy's body for a request whose upstream connection failed (`UF`), as a sidecar answers
/// it when the application is not listening.
pub(crate) const UPSTREAM_CONNECT_ERROR: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";

/// Envoy's local-reply bodies for an outbound request with no endpoint left (`UH`) and one
/// that ran out of time (`UT`).
const NO_HEALTHY_UPSTREAM: &str = "no healthy upstream";
const UPSTREAM_TIMEOUT: &str = "upstream request timeout";

/// Why a request or connection does not reach the application.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// AuthorizationPolicy: DENY or ALLOW, or a CUSTOM policy whose provider cannot be used.
    Policy,
    /// A path that cannot be normalized (Envoy's `normalize_path` rejects it).
    BadPath,
    /// RequestAuthentication: an invalid JWT, with jwt_authn's status and message and the
    /// `WWW-Authenticate` challenge.
    Jwt {
        status: StatusCode,
        message: &'static str,
        challenge: HeaderValue,
    },
    /// The external authorizer of a CUSTOM policy denied (its status, the headers it passes,
    /// its body) or could not answer (`statusOnError`, nothing else).
    External {
        status: StatusCode,
        headers: Vec<Mutation>,
        body: Bytes,
    },
    /// A local rate limit.
    RateLimited,
    /// What Envoy's codec refuses before any filter: its status and flag (`DPE` mostly).
    Codec {
        status: StatusCode,
        flag: &'static str,
    },
    /// A request body that is malformed or ends early (a downstream protocol error).
    MalformedBody,
    /// A request body longer than an external authorizer's `maxRequestBytes` allows.
    BodyTooLarge,
    /// The application could not be reached.
    Upstream,
    /// Every connection to the application the descriptor budget allows is open and busy
    /// (crate::backend): Envoy's circuit-breaker overflow.
    UpstreamOverflow,
    // The application calling the mesh (outbound):
    /// Outrigger's HTTP proxy: the request names no host (no absolute URI, no `Host`).
    NoHost,
    /// Outrigger's HTTP proxy: `CONNECT` (it carries plain HTTP; TCP services have their own
    /// listener).
    ConnectMethod { authority: String },
    /// Outrigger's HTTP proxy: the host is not a configured mesh service and plain egress is
    /// off; `known` lists the configured ones.
    UnknownService { authority: String, known: String },
    /// Every endpoint was tried or ejected.
    NoHealthyUpstream,
    /// The destination's `timeout` (or per-try timeout) ran out.
    UpstreamTimeout,
    /// No connection could be made to the destination (`transport`: why, Envoy's "transport
    /// failure reason").
    UpstreamConnect { transport: String },
    /// The connection failed after the request was sent, before the answer's head.
    UpstreamReset { reason: String },
}

impl Refusal {
    /// The HTTP status a client gets.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Refusal::Policy => StatusCode::FORBIDDEN,
            Refusal::BadPath | Refusal::MalformedBody => StatusCode::BAD_REQUEST,
            Refusal::Jwt { status, .. }
            | Refusal::External { status, .. }
            | Refusal::Codec { status, .. } => *status,
            Refusal::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Refusal::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Upstream
            | Refusal::NoHealthyUpstream
            | Refusal::UpstreamConnect { .. }
            | Refusal::UpstreamReset { .. }
            | Refusal::UpstreamOverflow => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::NoHost => StatusCode::BAD_REQUEST,
            Refusal::ConnectMethod { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::UnknownService { .. } => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The body of the HTTP answer.
    pub(crate) fn body(&self) -> Bytes {
        let text = match self {
            Refusal::External { body, .. } => return body.clone(),
            Refusal::Policy => RBAC_DENIED,
            Refusal::BadPath => "Bad Request",
            Refusal::Jwt { message, .. } => message,
            Refusal::RateLimited => "local_rate_limited",
            Refusal::BodyTooLarge => "Payload Too Large",
            Refusal::Codec { .. } | Refusal::MalformedBody => "",
            Refusal::Upstream => UPSTREAM_CONNECT_ERROR,
            // Envoy's router, `onUpstreamReset` with `StreamResetReason::Overflow`
            // (source/common/router/router.cc; `resetReasonToString`: "overflow").
            Refusal::UpstreamOverflow => {
                "upstream connect error or disconnect/reset before headers. reset reason: overflow"
            }
            Refusal::NoHealthyUpstream => NO_HEALTHY_UPSTREAM,
            Refusal::UpstreamTimeout => UPSTREAM_TIMEOUT,
            Refusal::NoHost => {
                "outrigger HTTP proxy: the request names no host (no absolute URI, no Host header)\n"
            }
            Refusal::ConnectMethod { authority } => {
                return Bytes::from(format!(
                    "outrigger HTTP proxy: CONNECT {authority} is not supported; call mesh services over plain HTTP (Outrigger adds mTLS), or give a TCP service its own outbound listener\n"
                ));
            }
            Refusal::UnknownService { authority, known } => {
                return Bytes::from(format!(
                    "outrigger HTTP proxy: `{authority}` is not a mesh service configured on this agent (configured: {known}). Add it under `outbound:` in the agent configuration, or set `outboundProxy.allowPlainEgress: true` to let non-mesh hosts through in plaintext.\n"
                ));
            }
            Refusal::UpstreamConnect { transport } => {
                return Bytes::from(format!(
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: {transport}"
                ));
            }
            Refusal::UpstreamReset { reason } => {
                return Bytes::from(format!(
                    "upstream connect error or disconnect/reset before headers. reset reason: connection termination ({reason})"
                ));
            }
        };
        Bytes::from_static(text.as_bytes())
    }

    /// Envoy's response flag (access log, `response_flags`).
    pub(crate) fn flag(&self) -> &'static str {
        match self {
            Refusal::Policy => "RBAC",
            Refusal::External { .. } => "UAEX",
            Refusal::RateLimited => "RL",
            Refusal::Codec { flag, .. } => flag,
            Refusal::MalformedBody => "DPE",
            Refusal::Upstream | Refusal::UpstreamConnect { .. } => "UF",
            Refusal::BadPath | Refusal::Jwt { .. } | Refusal::BodyTooLarge => "-",
            // A sidecar's `block_all` route answers a host that is not a mesh service with a
            // direct response (istio/istio httproute.go `buildCatchAllVirtualHost`), and
            // Envoy's router sets no flag for one (envoy `source/common/router/router.cc`,
            // `Filter::decodeHeaders`: `NoRouteFound` only when no route matched).
            Refusal::UnknownService { .. } => "-",
            Refusal::NoHost | Refusal::ConnectMethod { .. } => "NR",
            Refusal::NoHealthyUpstream => "UH",
            Refusal::UpstreamTimeout => "UT",
            Refusal::UpstreamReset { .. } => "UR",
            Refusal::UpstreamOverflow => "UO",
        }
    }

    /// Whether an HTTP/1 connection is closed after the answer: Envoy does after a downstream
    /// protocol error.
    pub(crate) fn closes_http1(&self) -> bool {
        self.flag() == "DPE"
    }

    /// The status of an HBONE CONNECT refused this way (ztunnel's `src/proxy/inbound.rs`:
    /// `401` when authorization denies the connection, `503` when the destination cannot be
    /// reached).
    pub(crate) fn hbone_status(&self) -> StatusCode {
        match self {
            Refusal::Upstream | Refusal::UpstreamOverflow => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// Applies the headers that belong to this answer: `Content-Type: text/plain` when it has a
    /// body (Envoy's `sendLocalReply`), the JWT challenge, an external authorizer's headers
    /// (applied after, as Envoy's ext_authz does), `Connection: close` after a protocol error
    /// on HTTP/1.
    pub(crate) fn headers(self, h: &mut http::HeaderMap, http1: bool) {
        if !self.body().is_empty() {
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
        }
        if http1 && self.closes_http1() {
            h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        match self {
            Refusal::Jwt { challenge, .. } => {
                h.insert(http::header::WWW_AUTHENTICATE, challenge);
            }
            Refusal::External { headers, .. } => crate::ext_authz::apply(h, headers),
            // Envoy's router marks a circuit-breaker overflow (`x-envoy-overloaded: true`,
            // router.cc, unless `suppress_envoy_headers`, which Istio's sidecar leaves off).
            Refusal::UpstreamOverflow => {
                h.insert(
                    http::header::HeaderName::from_static("x-envoy-overloaded"),
                    HeaderValue::from_static("true"),
                );
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_says_it_as_envoy_and_ztunnel_do() {
        let r = Refusal::Policy;
        assert_eq!(
            (r.status().as_u16(), &r.body()[..], r.flag()),
            (403, RBAC_DENIED.as_bytes(), "RBAC")
        );
        assert_eq!(r.hbone_status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            Refusal::Upstream.hbone_status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let mut h = http::HeaderMap::new();
        Refusal::MalformedBody.headers(&mut h, true);
        assert_eq!(h.get("connection").unwrap(), "close");
        assert!(h.get("content-type").is_none(), "no body, no content-type");
        let mut h = http::HeaderMap::new();
        Refusal::RateLimited.headers(&mut h, true);
        assert_eq!(h.get("content-type").unwrap(), "text/plain");
        assert!(h.get("connection").is_none());
    }
}
