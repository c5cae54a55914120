//! Decision time with 1, 100 and 10,000 AuthorizationPolicies applying to the workload.
//!
//! Each policy set has, per policy, an ALLOW rule on its own port and a DENY rule on
//! another port with principal/path conditions, so most policies are unrelated to the request
//! (indexed away by port); one port-agnostic ALLOW rule and one DENY rule always apply.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use outrigger_policy::*;

fn policies(n: usize) -> String {
    let mut y = String::new();
    // Always evaluated: a namespace-wide DENY and ALLOW with HTTP conditions.
    if n >= 2 {
        y += "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [\"/admin*\"]}\n---\n";
    }
    y += "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-front, namespace: shop}\nspec:\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/front/sa/*\"]}\n    to:\n    - operation: {methods: [GET, POST], paths: [\"/api/*\"]}\n    when:\n    - key: request.headers[x-tenant]\n      values: [\"acme\"]\n---\n";
    for i in 0..n.saturating_sub(2) {
        let port = 10000 + (i % 50000);
        y += &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: shop}}\nspec:\n  action: {}\n  rules:\n  - from:\n    - source: {{principals: [\"cluster.local/ns/n{i}/sa/s{i}\"]}}\n    to:\n    - operation: {{ports: [\"{port}\"], paths: [\"/p{i}/*\"]}}\n---\n",
            if i % 2 == 0 { "ALLOW" } else { "DENY" }
        );
    }
    y
}

fn bench(c: &mut Criterion) {
    let workload = Workload {
        namespace: "shop".into(),
        labels: BTreeMap::new(),
    };
    let opts = PolicyOptions::default();
    let headers = [("x-tenant", "acme"), ("user-agent", "bench")];
    let src: IpAddr = "10.1.2.3".parse().unwrap();
    let dst: IpAddr = "10.0.0.9".parse().unwrap();
    for n in [1usize, 100, 10_000] {
        let resources = parse_documents("bench.yaml", &policies(n)).unwrap();
        let snap = Snapshot::build(&resources, &workload, &opts).unwrap();
        let req = Request {
            source_principal: Some("cluster.local/ns/front/sa/web"),
            http: Some(HttpAttrs {
                method: "GET",
                host: "api.shop.svc",
                path: "/api/items",
                headers: &headers,
            }),
            ..Request::tcp(src, dst, 8080)
        };
        assert!(snap.authorize(&req).allowed);
        c.bench_function(&format!("authorize_http_{n}_policies"), |b| {
            b.iter(|| black_box(snap.authorize(black_box(&req))).allowed)
        });
        let tcp = Request::tcp(src, dst, 5432).with_principal("cluster.local/ns/front/sa/web");
        c.bench_function(&format!("authorize_tcp_{n}_policies"), |b| {
            b.iter(|| black_box(snap.authorize(black_box(&tcp))).allowed)
        });
    }
    c.bench_function("normalize_path_base", |b| {
        b.iter(|| {
            normalize_path(
                black_box("/api/./v1/../items/%7Euser?x=1"),
                PathNormalization::Base,
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
