//! normalize_path on arbitrary input: never panics, and is idempotent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrigger_policy::{PathNormalization, normalize_path};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for mode in [
        PathNormalization::None,
        PathNormalization::Base,
        PathNormalization::MergeSlashes,
        PathNormalization::DecodeAndMergeSlashes,
    ] {
        if let Ok(once) = normalize_path(text, mode) {
            let twice = normalize_path(&once.path, mode).expect("normalized path re-normalizes");
            assert_eq!(once.path, twice.path, "not idempotent for {mode:?}");
        }
    }
});
