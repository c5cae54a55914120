//! Requests an Istio sidecar's HTTP codec refuses before any filter runs, refused the same way.
//!
//! hyper's HTTP/1 parser (httparse) already refuses what both codecs refuse at the byte level —
//! NUL, control and non-ASCII bytes and spaces in the request target, bad bytes in a method or
//! header name, NUL and control bytes in header values, differing or malformed
//! `content-length` values — and HTTP/2 header rules are the h2 crate's. What hyper accepts and
//! Envoy does not is checked here, on the parsed request head, with Envoy's answer. Each rule
//! is compared with the real Envoy in tests/codec.rs.
//!
//! Pure: a function of the request head, no I/O.

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{Method, StatusCode, Version};

/// Why a request was refused, and how Envoy answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: StatusCode,
    /// Envoy's response flag: `DPE` (downstream protocol error) for a codec refusal, `NR` (no
    /// route) for a CONNECT no route accepts.
    pub flag: &'static str,
    /// Envoy's response code details, for the log.
    pub details: &'static str,
}

const fn refuse(status: StatusCode, flag: &'static str, details: &'static str) -> Refusal {
    Refusal {
        status,
        flag,
        details,
    }
}

/// The methods Envoy's HTTP/1 parser accepts (envoyproxy/envoy
/// source/common/http/http1/balsa_parser.cc `isMethodValid`, `kValidMethods`; Istio leaves
/// `allow_custom_methods` off): anything else — an unknown or lowercase method — is
/// `HPE_INVALID_METHOD`, a 400. Sorted, for a binary search as Envoy does.
const HTTP1_METHODS: [&str; 34] = [
    "ACL",
    "BIND",
    "CHECKOUT",
    "CONNECT",
    "COPY",
    "DELETE",
    "GET",
    "HEAD",
    "LINK",
    "LOCK",
    "MERGE",
    "MKACTIVITY",
    "MKCALENDAR",
    "MKCOL",
    "MOVE",
    "MSEARCH",
    "NOTIFY",
    "OPTIONS",
    "PATCH",
    "POST",
    "PROPFIND",
    "PROPPATCH",
    "PURGE",
    "PUT",
    "REBIND",
    "REPORT",
    "SEARCH",
    "SOURCE",
    "SUBSCRIBE",
    "TRACE",
    "UNBIND",
    "UNLINK",
    "UNLOCK",
    "UNSUBSCRIBE",
];

/// Checks a request head hyper parsed; `None`: Envoy's codec would accept it too.
pub(crate) fn check(parts: &http::request::Parts) -> Option<Refusal> {
    let http1 = matches!(parts.version, Version::HTTP_10 | Version::HTTP_11);
    if http1 {
        // `accept_http_10` is off in Istio's sidecar (it is turned on only by the proxy
        // metadata `HTTP10`): Envoy's http1 codec_impl.cc answers HTTP/1.0 with
        // `426 Upgrade Required` (details `low_version`).
        if parts.version == Version::HTTP_10 {
            return Some(refuse(StatusCode::UPGRADE_REQUIRED, "DPE", "low_version"));
        }
        if HTTP1_METHODS.binary_search(&parts.method.as_str()).is_err() {
            return Some(refuse(
                StatusCode::BAD_REQUEST,
                "DPE",
                "http1.codec_error{HPE_INVALID_METHOD}",
            ));
        }
        // balsa_parser.cc `isUrlValid`: path and query bytes are `!`..`~` (and tab, form
        // feed); the test is on a signed `char`, so every byte from 0x80 up is refused.
        if parts
            .uri
            .path_and_query()
            .is_some_and(|p| p.as_str().bytes().any(|b| b >= 0x80))
        {
            return Some(refuse(
                StatusCode::BAD_REQUEST,
                "DPE",
                "http1.codec_error{HPE_INVALID_URL}",
            ));
        }
        // ... and the target starts with `/` or `*`, or is
        // `scheme://...` (absolute-form), or, for CONNECT only, an authority. httparse hands
        // `abc` to `http::Uri` as an authority.
        if parts.method != Method::CONNECT
            && parts.uri.scheme().is_none()
            && parts.uri.authority().is_some()
        {
            return Some(refuse(
                StatusCode::BAD_REQUEST,
                "DPE",
                "http1.codec_error{HPE_INVALID_URL}",
            ));
        }
        // Message framing (RFC 9112 §6.1, §6.3; Envoy http1 codec_impl.cc with
        // `allow_chunked_length` off, Istio's setting): a transfer coding other than exactly
        // `chunked` is `501 Not Implemented` (BalsaFrame UNKNOWN_TRANSFER_ENCODING,
        // "unsupported transfer encoding"); `transfer-encoding` beside `content-length` is a
        // 400 (`http1.content_length_and_chunked_not_allowed`); so is more than one
        // `content-length` field, even with equal values (BalsaFrame
        // MULTIPLE_CONTENT_LENGTH_KEYS).
        let mut te = parts.headers.get_all(TRANSFER_ENCODING).iter();
        if let Some(first) = te.next() {
            let chunked_only = te.next().is_none()
                && first
                    .to_str()
                    .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
            if !chunked_only {
                return Some(refuse(
                    StatusCode::NOT_IMPLEMENTED,
                    "DPE",
                    "http1.invalid_transfer_encoding",
                ));
            }
            if parts.headers.contains_key(CONTENT_LENGTH) {
                return Some(refuse(
                    StatusCode::BAD_REQUEST,
                    "DPE",
                    "http1.content_length_and_chunked_not_allowed",
                ));
            }
        }
        if parts
            .headers
            .get_all(CONTENT_LENGTH)
            .iter()
            .nth(1)
            .is_some()
        {
            return Some(refuse(
                StatusCode::BAD_REQUEST,
                "DPE",
                "http1.codec_error{MULTIPLE_CONTENT_LENGTH_KEYS}",
            ));
        }
    }
    // Envoy requires a host (conn_manager_impl.cc: "missing required header: :authority",
    // details `missing_host_header`); an absolute-form target or `:authority` carries one.
    if parts.uri.authority().is_none() && !parts.headers.contains_key(HOST) {
        return Some(refuse(
            StatusCode::BAD_REQUEST,
            "DPE",
            "missing_host_header",
        ));
    }
    // A CONNECT (HTTP/1 authority-form, or HTTP/2 without `:protocol`) matches no route of an
    // Istio inbound listener: its routes match `prefix: /`, which CONNECT requests never match
    // (they need a `connect_matcher`), so the router answers `404` with `NR`.
    if parts.method == Method::CONNECT && parts.extensions.get::<hyper::ext::Protocol>().is_none() {
        return Some(refuse(StatusCode::NOT_FOUND, "NR", "route_not_found"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> http::request::Parts {
        // Build the head as hyper would hand it over: method, target, version, headers.
        let mut lines = raw.split("\r\n");
        let mut first = lines.next().unwrap().split(' ');
        let method = first.next().unwrap();
        let target = first.next().unwrap();
        let version = match first.next().unwrap() {
            "HTTP/1.0" => Version::HTTP_10,
            "HTTP/2" => Version::HTTP_2,
            _ => Version::HTTP_11,
        };
        let mut b = http::Request::builder()
            .method(method)
            .uri(target)
            .version(version);
        for l in lines.filter(|l| !l.is_empty()) {
            let (k, v) = l.split_once(": ").unwrap();
            b = b.header(k, v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn status(raw: &str) -> Option<u16> {
        check(&head(raw)).map(|r| r.status.as_u16())
    }

    #[test]
    fn the_methods_are_sorted_for_the_binary_search() {
        let mut sorted = HTTP1_METHODS;
        sorted.sort_unstable();
        assert_eq!(sorted, HTTP1_METHODS);
    }

    /// The answers the real Envoy gave in tests/codec.rs.
    #[test]
    fn refusals_match_envoys() {
        let h = "Host: outrigger.test";
        assert_eq!(status(&format!("GET /ok HTTP/1.1\r\n{h}")), None);
        assert_eq!(status(&format!("PROPFIND /dav HTTP/1.1\r\n{h}")), None);
        assert_eq!(status(&format!("get / HTTP/1.1\r\n{h}")), Some(400));
        assert_eq!(status(&format!("FOO / HTTP/1.1\r\n{h}")), Some(400));
        // HTTP/2 has no method list (a custom method is a valid token there).
        assert_eq!(status("FOO https://outrigger.test/ HTTP/2\r\nX: y"), None);
        assert_eq!(status(&format!("GET / HTTP/1.0\r\n{h}")), Some(426));
        assert_eq!(status(&format!("GET abc HTTP/1.1\r\n{h}")), Some(400));
        assert_eq!(
            status("GET http://outrigger.test/abs HTTP/1.1\r\nX: y"),
            None
        );
        assert_eq!(status("GET / HTTP/1.1\r\nX: y"), Some(400));
        assert_eq!(
            status(&format!(
                "POST / HTTP/1.1\r\n{h}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
            )),
            Some(400)
        );
        assert_eq!(
            status(&format!(
                "POST / HTTP/1.1\r\n{h}\r\nContent-Length: 3\r\nContent-Length: 3"
            )),
            Some(400)
        );
        for te in ["gzip, chunked", "identity", "chunked, chunked"] {
            assert_eq!(
                status(&format!(
                    "POST / HTTP/1.1\r\n{h}\r\nTransfer-Encoding: {te}"
                )),
                Some(501),
                "{te}"
            );
        }
        assert_eq!(
            status(&format!(
                "POST / HTTP/1.1\r\n{h}\r\nTransfer-Encoding: Chunked"
            )),
            None
        );
        assert_eq!(
            status(&format!("CONNECT outrigger.test:443 HTTP/1.1\r\n{h}")),
            Some(404)
        );
    }
}
