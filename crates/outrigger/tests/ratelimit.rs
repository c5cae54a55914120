//! Local rate limiting through the real binary, compared with the real Envoy running the
//! `envoy.filters.http.local_ratelimit` filter from Istio's rate-limiting task
//! (istio.io/latest/docs/tasks/policy-enforcement/rate-limit/, "Local rate limit"): the same
//! burst gets the same answers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use outrigger_testkit::*;

/// The answer to one request: status, body when refused, and the rate limit headers.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    body: Option<String>,
    limit: Option<String>,
    remaining: Option<String>,
    flag_header: Option<String>,
    /// `x-ratelimit-reset`, compared within a second (the two clocks started apart).
    reset: Option<u64>,
}

async fn ask(mesh: &Mesh, addr: std::net::SocketAddr, who: &Issued, path: &str) -> Answer {
    let mut c = mesh.connect(addr, who, false).await;
    let got = c.fetch(get(path, false)).await.unwrap();
    let h = |n: &str| got.headers.get(n).map(|v| v.to_str().unwrap().to_string());
    Answer {
        status: got.status,
        body: (got.status != 200).then(|| got.text()),
        limit: h("x-ratelimit-limit"),
        remaining: h("x-ratelimit-remaining"),
        flag_header: h("x-local-rate-limit"),
        reset: h("x-ratelimit-reset").and_then(|v| v.parse().ok()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_gets_envoys_local_rate_limit_answers() {
    let Some(bin) = common::envoy::envoy_or_skip("a_burst_gets_envoys_local_rate_limit_answers")
    else {
        return;
    };
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let app = start_echo().await;
    let tcp = start_tcp_echo().await;
    // The filter of Istio's task, with Envoy's rate limit headers on.
    let filter = serde_json::json!({
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "http_local_rate_limiter",
            "token_bucket": {"max_tokens": 4, "tokens_per_fill": 4, "fill_interval": "60s"},
            "filter_enabled": {"runtime_key": "local_rate_limit_enabled",
                "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "filter_enforced": {"runtime_key": "local_rate_limit_enforced",
                "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "response_headers_to_add": [{"append_action": "APPEND_IF_EXISTS_OR_ADD",
                "header": {"key": "x-local-rate-limit", "value": "true"}}],
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03"
        }
    });
    let envoy = common::envoy::start_sidecar_inbound_with(
        &bin,
        mesh.dir(),
        &mesh.agent,
        app,
        tcp,
        vec![filter],
    )
    .await;
    let cfg = mesh.config(
        &[("web", app, "http")],
        "rateLimits:
- name: task
  tokenBucket: {maxTokens: 4, tokensPerFill: 4, fillInterval: 60s}
  rateLimitHeaders: true
  responseHeaders: {x-local-rate-limit: 'true'}
",
    );
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let sleep = mesh.pki.issue("default", "sleep");
    for i in 0..6 {
        let path = format!("/r{i}");
        let e = ask(&mesh, envoy.listener, &sleep, &path).await;
        let o = ask(&mesh, agent.addr("web"), &sleep, &path).await;
        let within = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => a.abs_diff(b) <= 1,
            (a, b) => a == b,
        };
        assert!(within(e.reset, o.reset), "request {i}: {e:?} / {o:?}");
        assert_eq!(
            Answer { reset: None, ..e },
            Answer { reset: None, ..o },
            "request {i}\n{}",
            envoy.tail()
        );
    }
    // Counted as Envoy counts it: a request with response code 429 and flag RL.
    agent.wait_metric(
        "istio_requests_total",
        &["response_code=\"429\"", "response_flags=\"RL\""],
        2.0,
    );
    agent.wait_metric("outrigger_rate_limited_total", &["rule=\"task\""], 2.0);
}

/// Per-principal buckets are independent; a bucket refills after its interval; requests the
/// rule does not match are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_principal_buckets_refill_and_match() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let app = start_echo().await;
    let cfg = mesh.config(
        &[("web", app, "http")],
        "rateLimits:
- name: api-per-caller
  match: {pathPrefix: /api, methods: [GET]}
  perPrincipal: true
  tokenBucket: {maxTokens: 2, tokensPerFill: 1, fillInterval: 2s}
",
    );
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let (a, b) = (
        mesh.pki.issue("default", "a"),
        mesh.pki.issue("default", "b"),
    );
    let web = agent.addr("web");
    // `a` spends its two tokens; the third is limited.
    let start = Instant::now();
    assert_eq!(ask(&mesh, web, &a, "/api/1").await.status, 200);
    assert_eq!(ask(&mesh, web, &a, "/api/2").await.status, 200);
    let third = ask(&mesh, web, &a, "/api/3").await.status;
    // One token every 2 s: unless this machine took over 1.5 s for three requests, the
    // bucket is still empty.
    if start.elapsed() < Duration::from_millis(1500) {
        assert_eq!(third, 429);
        // The status page lists it with the other recent denials: the rule, the reason.
        let page = agent.admin_get("/");
        assert!(
            page.contains("rate_limited") && page.contains("api-per-caller"),
            "{page}"
        );
        // `b` has its own bucket, and paths the rule does not match are not limited.
        assert_eq!(ask(&mesh, web, &b, "/api/1").await.status, 200);
        assert_eq!(ask(&mesh, web, &a, "/other").await.status, 200);
    }
    // After the interval, `a` has tokens again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if ask(&mesh, web, &a, "/api/4").await.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the bucket never refilled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
}

/// Bad rate limit settings are refused at load with file:line and field.
#[test]
fn bad_rate_limits_are_refused_with_their_field() {
    let mesh = Mesh::new();
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = echo.local_addr().unwrap();
    for (extra, field, reason) in [
        (
            "rateLimits:\n- name: x\n  tokenBucket: {maxTokens: 0, fillInterval: 1s}\n",
            "rateLimits[0].tokenBucket.maxTokens",
            "at least 1",
        ),
        (
            "rateLimits:\n- name: x\n  tokenBucket: {maxTokens: 1, fillInterval: 10ms}\n",
            "rateLimits[0].tokenBucket.fillInterval",
            "50ms to 24h",
        ),
        (
            "rateLimits:\n- name: x\n  listeners: [nope]\n  tokenBucket: {maxTokens: 1, fillInterval: 1s}\n",
            "rateLimits[0].listeners",
            "no inbound listener is named `nope`",
        ),
        (
            "rateLimits:\n- name: x\n  match: {pathPrefix: api}\n  tokenBucket: {maxTokens: 1, fillInterval: 1s}\n",
            "rateLimits[0].match.pathPrefix",
            "must start with `/`",
        ),
    ] {
        let cfg = mesh.config(&[("web", addr, "http")], extra);
        let path = mesh.dir().join("bad.yaml");
        std::fs::write(&path, &cfg).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_outrigger"))
            .args(["run", "--check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra}");
        assert!(
            err.contains(field) && err.contains(reason) && err.contains("bad.yaml:"),
            "{extra}: {err}"
        );
    }
}

/// Istio's rate-limiting task EnvoyFilter ("Local rate limit"), as published except for the
/// workload selector (this workload's `app`), dropped into the policy directory: applied as
/// the same token bucket; a reload that changes something else does not refill it; an
/// EnvoyFilter Outrigger does not implement is logged as not applied, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_local_rate_limit_envoy_filter_is_applied_as_published() {
    let task = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata/istio-ratelimit/local-rate-limit.yaml"),
    )
    .unwrap()
    .replace("app: productpage", "app: windows-app");
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("ratelimit.yaml", &task);
    mesh.policy(
        "lua.yaml",
        &task.replace("filter-local-ratelimit-svc", "lua").replace(
            "name: envoy.filters.http.local_ratelimit",
            "name: envoy.filters.http.lua",
        ),
    );
    let app = start_echo().await;
    let agent = mesh.start(&[("web", app, "http")]);
    agent.wait_for_log(
        "in force: local rate limit EnvoyFilter/istio-system/filter-local-ratelimit-svc",
    );
    agent.wait_for_log("not applied: EnvoyFilter istio-system/lua");
    let sleep = mesh.pki.issue("default", "sleep");
    let web = agent.addr("web");
    for i in 0..4 {
        assert_eq!(ask(&mesh, web, &sleep, &format!("/{i}")).await.status, 200);
    }
    let limited = ask(&mesh, web, &sleep, "/5").await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.body.as_deref(), Some("local_rate_limited"));
    assert_eq!(limited.flag_header.as_deref(), Some("true"));
    // A reload that leaves the EnvoyFilter as it was keeps its bucket empty.
    mesh.policy("other.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-all, namespace: legacy}\nspec:\n  rules: [{}]\n");
    agent.wait_for_log("in force: AuthorizationPolicy legacy/allow-all");
    assert_eq!(ask(&mesh, web, &sleep, "/6").await.status, 429);
}
