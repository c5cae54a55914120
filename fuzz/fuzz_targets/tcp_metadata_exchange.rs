//! Untrusted input: the first bytes of a TCP stream whose mTLS handshake selected
//! `istio-peer-exchange` (outrigger_proxy::tcp_mx), from any mesh peer. Never panics, never
//! looks past the declared length; what names a peer re-encodes to an exchange that names the
//! same peer; the bytes said to follow the exchange are a suffix of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrigger_proxy::tcp_mx::{self, Parsed};

fuzz_target!(|data: &[u8]| {
    for eof in [false, true] {
        match tcp_mx::parse(data, eof) {
            Parsed::Exchanged { consumed, peer } => {
                assert!(consumed <= data.len());
                assert!(consumed <= tcp_mx::HEADER_LEN + tcp_mx::MAX_METADATA);
                if let Some(peer) = peer {
                    let again = tcp_mx::encode(&peer, "id");
                    match tcp_mx::parse(&again, true) {
                        Parsed::Exchanged { consumed, peer: p } => {
                            assert_eq!(consumed, again.len());
                            assert_eq!(p, Some(peer));
                        }
                        other => panic!("{other:?}"),
                    }
                }
            }
            Parsed::NotExchanged { from, .. } => assert!(from <= data.len()),
            Parsed::NeedMore => assert!(!eof),
            Parsed::TooLarge(n) => assert!(n as usize > tcp_mx::MAX_METADATA),
            Parsed::Truncated => assert!(eof),
        }
    }
});
