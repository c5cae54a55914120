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
//! The provider is reached with plain HTTP/1.1 at `service:port`.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// istiod's `HttpUri.timeout` when the provider sets none (extauthz.go: "Use a large value as
/// a placeholder").
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The largest authorizer response body kept for a denial.
const MAX_DENY_BODY: usize = 64 * 1024;

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

/// One `envoyExtAuthzHttp` provider.
#[derive(Debug, Clone)]
pub struct HttpProvider {
    pub name: String,
    pub service: String,
    pub port: u16,
    pub timeout: Duration,
    pub path_prefix: String,
    pub include_request_headers: Vec<NameMatch>,
    pub additional_headers: Vec<(HeaderName, HeaderValue)>,
    pub headers_to_upstream_on_allow: Vec<NameMatch>,
    pub headers_to_downstream_on_deny: Vec<NameMatch>,
    pub headers_to_downstream_on_allow: Vec<NameMatch>,
    pub fail_open: bool,
    pub status_on_error: StatusCode,
}

/// What the authorizer decided.
#[derive(Debug)]
pub(crate) enum Outcome {
    Allow {
        /// Set on the request to the application (replacing the same names).
        upstream: Vec<(HeaderName, HeaderValue)>,
        /// Added to the application's response.
        downstream: Vec<(HeaderName, HeaderValue)>,
    },
    Deny {
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    },
    /// The check could not be made (and the provider does not fail open).
    Error { status: StatusCode, why: String },
    /// The check could not be made, and `failOpen` let the request through.
    FailedOpen { why: String },
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

/// Calls the provider for one request.
pub(crate) async fn check(
    p: &HttpProvider,
    method: &Method,
    host: &str,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Outcome {
    match tokio::time::timeout(p.timeout, call(p, method, host, path_and_query, headers)).await {
        Ok(Ok(o)) => o,
        Ok(Err(why)) => error(p, why),
        Err(_) => error(p, format!("no answer within {:?}", p.timeout)),
    }
}

fn error(p: &HttpProvider, why: String) -> Outcome {
    if p.fail_open {
        Outcome::FailedOpen { why }
    } else {
        Outcome::Error {
            status: p.status_on_error,
            why,
        }
    }
}

async fn call(
    p: &HttpProvider,
    method: &Method,
    host: &str,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Result<Outcome, String> {
    let mut b = http::Request::builder()
        .method(method.clone())
        .uri(format!("{}{}", p.path_prefix, path_and_query));
    let h = b.headers_mut().ok_or("invalid check request")?;
    for (name, value) in headers {
        if is_framing(name) || name == http::header::HOST {
            continue;
        }
        if name == ALWAYS_SENT || any(&p.include_request_headers, name.as_str()) {
            h.append(name.clone(), value.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(host) {
        h.insert(http::header::HOST, v);
    }
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    for (n, v) in &p.additional_headers {
        h.insert(n.clone(), v.clone());
    }
    let req = b
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("invalid check request: {e}"))?;

    let tcp = TcpStream::connect((p.service.as_str(), p.port))
        .await
        .map_err(|e| format!("connect to {}:{}: {e}", p.service, p.port))?;
    let _ = tcp.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = send.send_request(req).await;
    let out = match resp {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_DENY_BODY)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .map_err(|e| format!("response body: {e}"))?;
            Ok(decide(p, parts.status, &parts.headers, body))
        }
        Err(e) => Err(format!("request: {e}")),
    };
    driver.abort();
    out?
}

fn decide(
    p: &HttpProvider,
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Outcome, String> {
    // ext_authz_http_impl.cc: a 5xx from the authorization server is an error, not a denial.
    if status.is_server_error() {
        return Err(format!("authorizer answered {}", status.as_u16()));
    }
    let pick = |keep: &dyn Fn(&str) -> bool| -> Vec<(HeaderName, HeaderValue)> {
        headers
            .iter()
            .filter(|(n, _)| !is_framing(n) && keep(n.as_str()))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    };
    if status == StatusCode::OK {
        Ok(Outcome::Allow {
            upstream: pick(&|n| any(&p.headers_to_upstream_on_allow, n)),
            downstream: pick(&|n| any(&p.headers_to_downstream_on_allow, n)),
        })
    } else {
        let deny = &p.headers_to_downstream_on_deny;
        Ok(Outcome::Deny {
            status,
            headers: pick(&|n| {
                if deny.is_empty() {
                    n != "host"
                } else {
                    ALWAYS_ON_DENY.contains(&n) || any(deny, n)
                }
            }),
            body,
        })
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
}
