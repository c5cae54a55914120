//! Untrusted input: an HBONE CONNECT request from a mesh peer (`:authority` and the
//! `baggage`, `forwarded` and `traceparent` headers). Parsing never panics; an accepted
//! authority is exactly an `ip:port`; whatever is kept from the headers is bounded and
//! round-trips through Outrigger's own header writer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrigger_proxy::hbone::request::{self, Baggage};

fuzz_target!(|data: &[u8]| {
    // Split the input into the authority and three header values.
    let mut parts = data.splitn(4, |b| *b == b'\n');
    let authority = parts.next().unwrap_or_default();
    let baggage = parts.next().unwrap_or_default();
    let forwarded = parts.next().unwrap_or_default();
    let traceparent = parts.next().unwrap_or_default();

    if let Ok(a) = std::str::from_utf8(authority) {
        if let Ok(addr) = request::parse_authority(a) {
            assert_eq!(addr, a.parse::<std::net::SocketAddr>().unwrap());
        }
        // Through the full request parser, as the h2 server hands it over.
        if let (Ok(uri), Ok(b), Ok(f), Ok(t)) = (
            a.parse::<http::Uri>(),
            http::HeaderValue::from_bytes(baggage),
            http::HeaderValue::from_bytes(forwarded),
            http::HeaderValue::from_bytes(traceparent),
        ) {
            let mut h = http::HeaderMap::new();
            h.insert("baggage", b);
            h.insert("forwarded", f);
            h.insert("traceparent", t);
            let _ = request::parse(&http::Method::CONNECT, &uri, &h);
        }
    }

    let b = Baggage::parse([baggage]);
    for v in [
        &b.cluster,
        &b.namespace,
        &b.workload_name,
        &b.service_name,
        &b.revision,
    ]
    .into_iter()
    .flatten()
    {
        assert!(!v.is_empty() && v.len() <= 253);
    }
    let header = b.to_header("workloadentry");
    assert_eq!(Baggage::parse([header.as_bytes()]), b);

    let (for_, host) = request::parse_forwarded(forwarded);
    for v in [for_, host].into_iter().flatten() {
        assert!(!v.is_empty() && v.len() <= 253);
    }
    if let Some(t) = request::parse_traceparent(traceparent) {
        assert!(t.len() >= 55);
    }
});
