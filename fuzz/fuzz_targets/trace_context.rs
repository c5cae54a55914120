//! Untrusted input: a caller's `traceparent`, `tracestate` and B3 headers
//! (outrigger_proxy::trace). Parsing never panics; an accepted `traceparent` or `b3` has a
//! non-zero trace id, and a `traceparent` we would send from it parses back to the same ids.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrigger_proxy::trace::{extract, parse_b3_single, parse_traceparent};

fuzz_target!(|data: &[u8]| {
    if let Some((t, p, s)) = parse_traceparent(data) {
        assert_ne!(t, [0; 16]);
        assert_ne!(p, [0; 8]);
        let again = format!(
            "00-{}-{}-{}",
            hex_lower(&t),
            hex_lower(&p),
            if s { "01" } else { "00" }
        );
        assert_eq!(parse_traceparent(again.as_bytes()), Some((t, p, s)));
    }
    if let Some(c) = parse_b3_single(data) {
        assert_ne!(c.trace_id, [0; 16]);
    }
    // The same bytes as each header of a request (split in three on the first two NULs).
    let mut parts = data.splitn(3, |&b| b == 0);
    let mut h = http::HeaderMap::new();
    for name in ["traceparent", "b3", "x-b3-traceid"] {
        if let Some(v) = parts.next()
            && let Ok(v) = http::HeaderValue::from_bytes(v)
        {
            h.insert(name, v.clone());
            h.insert("x-b3-spanid", v.clone());
            h.insert("x-b3-sampled", v.clone());
            h.insert("tracestate", v);
        }
    }
    let _ = extract(&h);
});

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
