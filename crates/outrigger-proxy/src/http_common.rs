//! HTTP pieces shared by the inbound and outbound paths.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};

/// Runs a server connection; on drain, `shutdown` starts its graceful shutdown (in-flight
/// requests finish) and it runs until it closes.
pub(crate) async fn drive_with<C, E>(
    conn: C,
    mut drain: tokio::sync::watch::Receiver<bool>,
    shutdown: impl FnOnce(Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    // `stop` yields the grace period as a future of its own, on purpose.
    #[allow(clippy::async_yields_async)]
    let drained = async move {
        let _ = drain.wait_for(|d| *d).await;
        std::future::pending::<()>()
    };
    drive_until(conn, drained, shutdown).await
}

/// Runs a server connection until it ends. If `stop` resolves first (a drain, an idle
/// timeout), `shutdown` starts its graceful shutdown and it runs until the requests in flight
/// end, or until the future `stop` gave resolves (then it is dropped: closed).
pub(crate) async fn drive_until<C, E, G>(
    conn: C,
    stop: impl Future<Output = G>,
    shutdown: impl FnOnce(Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
    G: Future<Output = ()>,
{
    tokio::pin!(conn);
    let grace = tokio::select! {
        r = conn.as_mut() => return r,
        g = stop => g,
    };
    shutdown(conn.as_mut());
    tokio::select! {
        r = conn => r,
        _ = grace => Ok(()),
    }
}

/// A WebSocket opening handshake (RFC 6455 §4.1): HTTP/1.1 with `Connection: upgrade` and
/// `Upgrade: websocket`. Istio's sidecars forward this upgrade (and only this one) by default
/// (`upgrade_configs: [{upgrade_type: websocket}]`); any other `Upgrade` stays hop-by-hop and is
/// removed, so an `h2c` upgrade is never honoured.
pub(crate) fn is_websocket_upgrade(parts: &http::request::Parts) -> bool {
    let h = &parts.headers;
    parts.version == http::Version::HTTP_11
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
        && h.get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// Puts back the two headers that make a request (or a `101` response) a WebSocket upgrade,
/// after [`strip_hop_by_hop`] removed them with the other hop-by-hop headers.
pub(crate) fn set_websocket_upgrade(h: &mut HeaderMap) {
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// Why a WebSocket tunnel ended early.
pub(crate) enum TunnelEnd {
    /// Either side closed, or the connection broke.
    Closed,
    /// `stop` resolved (a policy change denied it).
    Stopped,
}

/// After a `101`: copies bytes both ways between the client's and the server's upgraded
/// connections until either side closes or `stop` resolves, counting in `counts` the bytes
/// read from the client (`received`) and written to it (`sent`). Like an opaque TCP
/// connection it has no request boundary to drain at: it runs until the drain timeout.
pub(crate) async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    server: hyper::upgrade::OnUpgrade,
    counts: Arc<crate::io::ByteCounts>,
    stop: impl Future<Output = ()>,
) -> TunnelEnd {
    let (client, server) = match tokio::try_join!(client, server) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(error = %e, "WebSocket upgrade did not complete");
            return TunnelEnd::Closed;
        }
    };
    let mut client = crate::io::Counted::new(hyper_util::rt::TokioIo::new(client), counts);
    let mut server = hyper_util::rt::TokioIo::new(server);
    let copy = crate::copy::copy_bidirectional(&mut client, &mut server);
    tokio::pin!(copy);
    tokio::pin!(stop);
    tokio::select! {
        r = &mut copy => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "WebSocket tunnel ended with an error");
            }
            TunnelEnd::Closed
        }
        _ = &mut stop => TunnelEnd::Stopped,
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) are for one connection and are not forwarded.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    if let Some(conn) = h.get(header::CONNECTION).cloned()
        && let Ok(list) = conn.to_str()
    {
        for name in list.split(',') {
            let name = name.trim();
            if !name.is_empty() && !name.eq_ignore_ascii_case("te") {
                h.remove(name);
            }
        }
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        h.remove(name);
    }
    // `te: trailers` must reach gRPC servers; any other TE value is hop-by-hop.
    if let Some(te) = h.get(header::TE)
        && !te.as_bytes().eq_ignore_ascii_case(b"trailers")
    {
        h.remove(header::TE);
    }
}

/// A request body that counts the bytes it yields, and a gRPC request's messages.
pub(crate) struct Metered<B> {
    pub(crate) inner: B,
    pub(crate) counter: Arc<AtomicU64>,
    /// Set when the body itself fails (a downstream protocol error such as a malformed chunk),
    /// so that a failed upstream request can be told apart from a failed upstream.
    pub(crate) failed: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Only for a gRPC request (crate::grpc_stats).
    pub(crate) grpc: Option<crate::grpc_stats::RequestCount>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Metered<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.counter.fetch_add(d.len() as u64, Ordering::Relaxed);
                    if let Some(g) = &mut self.grpc {
                        g.data(d);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(failed) = &self.failed {
                    failed.store(true, Ordering::Relaxed);
                }
            }
            _ => {}
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

/// A request body whose first frames were read already (an external authorizer's check is
/// sent the start of the body: `includeRequestBodyInCheck`), followed by the rest. With nothing
/// read, it is the body itself.
pub(crate) struct Prefixed<B> {
    pub(crate) head: std::collections::VecDeque<Frame<Bytes>>,
    pub(crate) rest: B,
}

impl<B> Prefixed<B> {
    pub(crate) fn new(rest: B) -> Self {
        Prefixed {
            head: std::collections::VecDeque::new(),
            rest,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(f) = self.head.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self
            .head
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let rest = self.rest.size_hint();
        let mut h = SizeHint::new();
        h.set_lower(rest.lower() + read);
        if let Some(u) = rest.upper() {
            h.set_upper(u + read);
        }
        h
    }
}

/// Sets a request's version and target for the protocol it is sent upstream in, with
/// `authority` as the target host. HTTP/2 carries the authority in `:authority` (from an
/// absolute URI, scheme `http`: cleartext to the next hop) and RFC 9113 §8.3.1 forbids a `Host`
/// that differs, so `Host` goes; HTTP/1.1 carries it in `Host` and the target in origin form.
/// Connection-specific headers must already be gone ([`strip_hop_by_hop`]).
pub(crate) fn retarget(
    parts: &mut http::request::Parts,
    to_h2: bool,
    authority: &http::uri::Authority,
) {
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    if to_h2 {
        parts.uri = http::Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query(pq)
            .build()
            .unwrap_or_default();
        parts.version = http::Version::HTTP_2;
        parts.headers.remove(header::HOST);
    } else {
        parts.uri = http::Uri::from(pq);
        parts.version = http::Version::HTTP_11;
        if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
    }
}

/// The `x-envoy-*` request headers Envoy's connection manager removes from a request it does
/// not consider internal (envoyproxy/envoy source/common/http/conn_manager_utility.cc
/// `cleanInternalHeaders`, the part for every such request; the part for edge requests needs
/// `use_remote_address`, which an Istio sidecar leaves off), and `x-envoy-internal`, which
/// `mutateRequestHeaders` removes from every request ("Clean proxy headers").
///
/// No request reaching an Istio sidecar is internal: internal means a single trusted address
/// in `x-forwarded-for` that `internal_address_config` lists; istiod sets that config only
/// with `useRemoteAddress` or `PILOT_ENABLE_HCM_INTERNAL_NETWORKS` and `meshNetworks` CIDRs
/// (istio/istio pilot/pkg/networking/core/listener_builder.go), and since Envoy 1.36 an unset
/// one trusts no address (the `explicit_internal_address_config` guard was removed). So a
/// caller — the mesh peer inbound, the application outbound — can neither force a trace with
/// `x-envoy-force-trace` nor hand retry or timeout instructions to the next proxy.
const ENVOY_INTERNAL_HEADERS: [&str; 15] = [
    "x-envoy-internal",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace",
    "x-envoy-ip-tags",
    "x-envoy-original-url",
    "x-envoy-hedge-on-per-try-timeout",
];

/// Removes what a caller may not tell the mesh ([`ENVOY_INTERNAL_HEADERS`]), before the
/// request id and the trace decision, as Envoy does.
pub(crate) fn clean_internal_headers(h: &mut HeaderMap) {
    // Almost no request carries an `x-envoy-` header: one pass over the names, without the
    // parse and hash each of fifteen lookups by name costs (2 % of a keep-alive request's CPU
    // in the profile).
    if !h.keys().any(|k| k.as_str().starts_with("x-envoy-")) {
        return;
    }
    for name in ENVOY_INTERNAL_HEADERS {
        h.remove(name);
    }
}

/// A new `x-request-id`: a random (version 4) UUID in its usual lowercase form, as Envoy's
/// `UUIDRequestIdExtension` makes one (`Random::RandomGeneratorImpl::uuid`). `None` only if the
/// system random generator fails, in which case the request simply goes without one.
pub(crate) fn new_request_id() -> Option<http::HeaderValue> {
    let mut b = [0u8; 16];
    outrigger_tls::crypto_provider()
        .secure_random
        .fill(&mut b)
        .ok()?;
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    // 8-4-4-4-12 hex digits, written in place: one allocation per request, the header's.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 36];
    let mut j = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            id[j] = b'-';
            j += 1;
        }
        id[j] = HEX[usize::from(byte >> 4)];
        id[j + 1] = HEX[usize::from(byte & 0x0f)];
        j += 2;
    }
    http::HeaderValue::from_bytes(&id).ok()
}

/// The request's authority as written (`:authority` or the absolute URI's, else `Host`; empty
/// without either), as policy `hosts`, the external authorizer, Envoy's `WWW-Authenticate`
/// and the access log see it.
pub(crate) fn authority_str(parts: &http::request::Parts) -> &str {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}

/// [`authority_str`], parsed: `None` without one or when it is not a valid authority.
pub(crate) fn request_authority(parts: &http::request::Parts) -> Option<http::uri::Authority> {
    match parts.uri.authority() {
        Some(a) => Some(a.clone()),
        None => authority_str(parts).parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_version_4_uuids_in_lowercase() {
        let a = new_request_id().unwrap();
        let a = a.to_str().unwrap();
        assert_eq!(a.len(), 36, "{a}");
        let groups: Vec<&str> = a.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{a}"
        );
        assert!(
            a.bytes()
                .all(|c| c == b'-' || c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
        assert_eq!(&a[14..15], "4", "version: {a}");
        assert!("89ab".contains(&a[19..20]), "variant: {a}");
        assert_ne!(new_request_id().unwrap(), a, "random");
    }

    fn parts(version: http::Version, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::get("/chat").version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn only_http11_websocket_upgrades_are_honoured() {
        use http::Version;
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ];
        assert!(is_websocket_upgrade(&parts(Version::HTTP_11, &ws)));
        // h2c and other protocols: the Upgrade header is dropped as hop-by-hop.
        let h2c = [
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ];
        assert!(!is_websocket_upgrade(&parts(Version::HTTP_11, &h2c)));
        // Upgrade without `Connection: upgrade` is not an upgrade request.
        assert!(!is_websocket_upgrade(&parts(
            Version::HTTP_11,
            &[("upgrade", "websocket")]
        )));
        // HTTP/1.0 has no Upgrade; HTTP/2 uses extended CONNECT instead (not supported).
        assert!(!is_websocket_upgrade(&parts(Version::HTTP_10, &ws)));
        assert!(!is_websocket_upgrade(&parts(Version::HTTP_2, &ws)));

        let mut h = parts(Version::HTTP_11, &ws).headers;
        strip_hop_by_hop(&mut h);
        assert!(h.get(header::UPGRADE).is_none());
        set_websocket_upgrade(&mut h);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }
}
