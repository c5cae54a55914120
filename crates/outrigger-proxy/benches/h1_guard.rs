//! Cost of the raw HTTP/1 head check (`outrigger_proxy::h1_guard`) per request: a typical
//! request head from a mesh caller, and the same head with a 4 KiB `content-length` body, each
//! read through 16 KiB buffers as hyper reads them. `scan` also copies the output, so the
//! figures are an upper bound of what the guard adds to a request.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use outrigger_proxy::h1_guard::scan;

const HEAD: &str = "GET /api/v1/orders?limit=20 HTTP/1.1\r\nhost: orders.shop.svc.cluster.local\r\n\
user-agent: curl/8.5.0\r\naccept: application/json\r\nx-request-id: 6c8d6a0e-3a7b-4a3e-9e83-8f0c1d2e3f40\r\n\
x-forwarded-proto: https\r\nx-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7\r\nx-b3-spanid: e457b5a2e4d86bd1\r\n\
x-b3-sampled: 1\r\nauthorization: Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl\r\n\r\n";

fn bench(c: &mut Criterion) {
    let head = HEAD.as_bytes();
    let post = [
        HEAD.replace("GET", "POST")
            .replace("\r\n\r\n", "\r\ncontent-length: 4096\r\n\r\n")
            .as_bytes(),
        &[b'x'; 4096][..],
    ]
    .concat();
    let mut g = c.benchmark_group("h1_guard");
    g.bench_function("GET head (378 B)", |b| {
        b.iter(|| scan(black_box(&[head]), 16 * 1024))
    });
    g.bench_function("POST head + 4 KiB body", |b| {
        b.iter(|| scan(black_box(&[&post]), 16 * 1024))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
