//! Untrusted input: the body of a gRPC request or response, counted message by message as it
//! streams (outrigger_proxy::grpc_frames). Never panics, and counts the same whatever the way
//! the body is cut into chunks; the count never exceeds one message per 5 bytes, plus one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrigger_proxy::grpc_frames::FrameCounter;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size and the side, the rest is the body.
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let new = || {
        if pick & 0x80 == 0 {
            FrameCounter::request()
        } else {
            FrameCounter::response()
        }
    };
    let mut whole = new();
    let n = whole.inspect(body);
    assert_eq!(n, whole.count());
    assert!(n <= body.len().div_ceil(5) as u64, "{n} messages in {} bytes", body.len());
    let size = usize::from(pick & 0x7f) + 1;
    let mut cut = new();
    let sum: u64 = body.chunks(size).map(|c| cut.inspect(c)).sum();
    assert_eq!((sum, cut.count()), (n, n), "depends on how the body is cut");
    let mut bytewise = new();
    let sum: u64 = body.chunks(1).map(|c| bytewise.inspect(c)).sum();
    assert_eq!(sum, n, "depends on how the body is cut");
});
