//! Untrusted input: the bytes an HTTP/1 client sends, examined before hyper parses them
//! (outrigger_proxy::h1_guard). Never panics, never loses or adds a byte, and decides the same
//! whatever the way the stream is cut into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrigger_proxy::h1_guard::scan;

fuzz_target!(|data: &[u8]| {
    // The first byte picks where the stream is cut, the rest is the stream.
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let whole = scan(&[stream], 64 * 1024);
    assert_eq!(whole.0.len(), stream.len(), "bytes lost or added");
    let size = usize::from(cut % 31) + 1;
    let pieces: Vec<&[u8]> = stream.chunks(size).collect();
    assert_eq!(scan(&pieces, size.max(2) - 1), whole, "depends on how reads are cut");
});
