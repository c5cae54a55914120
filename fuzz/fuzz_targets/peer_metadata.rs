//! Untrusted input: an `x-envoy-peer-metadata` header value from any caller or server
//! (outrigger_proxy::peer_metadata). Never panics; whatever decodes re-encodes and decodes to
//! the same workload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrigger_proxy::peer_metadata::PeerMetadata;

fuzz_target!(|data: &[u8]| {
    if let Some(m) = PeerMetadata::decode(data) {
        assert_eq!(PeerMetadata::decode(m.encode().as_bytes()), Some(m));
    }
});
