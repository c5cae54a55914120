//! Property tests for the parsers of untrusted input in the data plane (each also has a fuzz
//! target under fuzz/): none panics on any input, and each keeps its own invariant.

use outrigger_proxy::detect::classify;
use outrigger_proxy::egress_proxy::EgressProxy;
use outrigger_proxy::hbone::request::parse_authority;
use proptest::prelude::*;

fn http_ish() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        "(GET|POST|PRI|CONNECT|get)[ ]?[ -~]{0,40}".prop_map(|s| s.into_bytes()),
        Just(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
    ]
}

proptest! {
    /// The first bytes a client sends: a decision made on a prefix never changes when more
    /// bytes arrive (the replayed bytes are the same either way).
    #[test]
    fn detection_decides_once(data in http_ish()) {
        let full = classify(&data);
        for n in 0..data.len() {
            if let Some(early) = classify(&data[..n]) {
                prop_assert_eq!(Some(early), full);
                break;
            }
        }
    }

    /// An HBONE CONNECT `:authority` from a peer: accepted only when it is exactly an
    /// `ip:port`.
    #[test]
    fn hbone_authority_is_exactly_a_socket_address(
        a in prop_oneof!["[0-9.:\\[\\]a-f]{0,48}", "\\PC{0,48}", "[0-9]{1,3}(\\.[0-9]{1,3}){3}:[0-9]{1,6}"]
    ) {
        if let Ok(addr) = parse_authority(&a) {
            prop_assert_eq!(Some(addr), a.parse().ok());
        }
    }

    /// `HTTPS_PROXY`, `NO_PROXY` as an operator writes them: any value is parsed or refused
    /// with the variable's name, and matching any host never panics.
    #[test]
    fn proxy_environment_never_panics(
        proxy in "\\PC{0,40}",
        no_proxy in "[a-z0-9.,:/*\\[\\] -]{0,60}",
        host in "[a-zA-Z0-9.:\\[\\]-]{0,40}",
        port in any::<u16>(),
    ) {
        let vars = [("HTTPS_PROXY", proxy.clone()), ("NO_PROXY", no_proxy.clone())];
        match EgressProxy::from_env(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())) {
            Ok(p) => { let _ = p.for_target(true, &host, port); }
            Err(e) => prop_assert!(e.starts_with("HTTPS_PROXY=") || e.starts_with("NO_PROXY="), "{}", e),
        }
    }
}
