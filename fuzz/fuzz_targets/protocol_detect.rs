//! Untrusted input: the first bytes a client sends. Classification never panics, and a
//! decision made on a prefix never changes when more bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrigger_proxy::detect::classify;

fuzz_target!(|data: &[u8]| {
    let full = classify(data);
    for n in 0..data.len() {
        if let Some(early) = classify(&data[..n]) {
            assert_eq!(Some(early), full, "decided {early:?} on {n} bytes");
            break;
        }
    }
});
