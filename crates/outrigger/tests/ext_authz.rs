//! Istio's CUSTOM action with an `envoyExtAuthzHttp` provider, through the real binary, with
//! an HTTP authorizer written here (real sockets on 127.0.0.1). Semantics from Envoy's
//! `source/extensions/filters/common/ext_authz/ext_authz_http_impl.cc` and istiod's
//! `pilot/pkg/security/authz/builder/extauthz.go`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use outrigger_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the authorizer saw: method, path, headers and body.
type Log = Arc<Mutex<Vec<(String, String, http::HeaderMap, Bytes)>>>;

/// Serves `handle` on 127.0.0.1 (port 0): HTTP/1.1, or HTTP/2 with prior knowledge (`h2`).
async fn serve_test_peer<H, F, B>(h2: bool, handle: H) -> SocketAddr
where
    H: Fn(http::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<http::Response<B>, std::convert::Infallible>>
        + Send
        + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let svc = service_fn(handle.clone());
            tokio::spawn(async move {
                let io = TokioIo::new(s);
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await
                } else {
                    http1::Builder::new().serve_connection(io, svc).await
                };
            });
        }
    });
    addr
}

/// An authorizer that decides by path: `/allow*` → 200 with `x-user: alice`,
/// `x-allow-note: yes` and `x-not-listed`; `/slow*` → no answer for 5 s; `/boom*` → 500;
/// anything else → 401 with `www-authenticate`, `location`, `x-deny-reason`, `x-not-listed`
/// and a body.
async fn start_authorizer() -> (SocketAddr, Log) {
    let log: Log = Arc::default();
    let log2 = log.clone();
    let addr = serve_test_peer(false, move |req: http::Request<hyper::body::Incoming>| {
        let log = log2.clone();
        async move {
            use http_body_util::BodyExt;
            let path = req.uri().to_string();
            let (head, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            log.lock().unwrap().push((
                head.method.to_string(),
                path.clone(),
                head.headers.clone(),
                body,
            ));
            let p = path.trim_start_matches("/check");
            let b = http::Response::builder();
            let r = if p.starts_with("/allow") || p.starts_with("/echo") {
                b.status(200)
                    .header("x-user", "alice")
                    .header("x-allow-note", "yes")
                    .header("x-not-listed", "n")
                    .body(Full::new(Bytes::new()))
            } else if p.starts_with("/slow") {
                tokio::time::sleep(Duration::from_secs(5)).await;
                b.status(200).body(Full::new(Bytes::new()))
            } else if p.starts_with("/boom") {
                b.status(500).body(Full::new(Bytes::from("oops")))
            } else {
                b.status(401)
                    .header("www-authenticate", "Bearer realm=\"x\"")
                    .header("location", "/login")
                    .header("x-deny-reason", "no-ticket")
                    .header("x-not-listed", "n")
                    .body(Full::new(Bytes::from("denied by ext")))
            };
            Ok::<_, std::convert::Infallible>(r.unwrap())
        }
    })
    .await;
    (addr, log)
}

/// Records what Envoy and Outrigger did differently for one case.
fn differ<T: PartialEq + std::fmt::Debug>(
    diffs: &mut Vec<String>,
    case: impl std::fmt::Debug,
    envoy: T,
    outrigger: T,
) {
    if envoy != outrigger {
        diffs.push(format!(
            "{case:?}:\n  envoy:     {envoy:?}\n  outrigger: {outrigger:?}"
        ));
    }
}

const CUSTOM: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ext
  namespace: legacy
spec:
  action: CUSTOM
  provider:
    name: PROVIDER
  rules:
  - to:
    - operation:
        notPaths: [\"/public*\"]
";

fn providers(authz: SocketAddr) -> String {
    format!(
        "extensionProviders:
- name: ext
  envoyExtAuthzHttp:
    service: {ip}
    port: {port}
    pathPrefix: /check
    timeout: 500ms
    includeRequestHeadersInCheck: [x-ticket]
    includeAdditionalHeadersInCheck: {{x-from: outrigger}}
    headersToUpstreamOnAllow: [x-user]
    headersToDownstreamOnAllow: [x-allow-note]
    headersToDownstreamOnDeny: [x-deny-reason]
    statusOnError: '503'
- name: open
  envoyExtAuthzHttp:
    service: {ip}
    port: {port}
    timeout: 300ms
    failOpen: true
",
        ip = authz.ip(),
        port = authz.port()
    )
}

async fn ask(mesh: &Mesh, addr: SocketAddr, who: &Issued, path: &str) -> Got {
    let mut c = mesh.connect(addr, who, false).await;
    let mut req = get(path, false);
    req.headers_mut()
        .insert("x-ticket", http::HeaderValue::from_static("t1"));
    req.headers_mut()
        .insert("x-other", http::HeaderValue::from_static("o"));
    c.fetch(req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_provider_allows_denies_and_fails_as_configured() {
    let (authz, log) = start_authorizer().await;
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("ext.yaml", &CUSTOM.replace("PROVIDER", "ext"));
    let app = start_echo().await;
    let cfg = mesh.config(&[("web", app, "http")], &providers(authz));
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let sleep = mesh.pki.issue("default", "sleep");
    let web = agent.addr("web");

    // Allowed: the authorizer's x-user reaches the application, x-allow-note the client.
    let got = ask(&mesh, web, &sleep, "/allow/a?q=1").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.seen().header("x-user"), Some("alice"));
    assert_eq!(got.seen().header("x-allow-note"), None);
    assert_eq!(got.headers.get("x-allow-note").unwrap(), "yes");
    assert!(got.headers.get("x-user").is_none());
    {
        let l = log.lock().unwrap();
        let (method, path, h, _) = l.last().unwrap();
        assert_eq!(method, "GET");
        // pathPrefix + the original path with its query.
        assert_eq!(path, "/check/allow/a?q=1");
        assert_eq!(h.get("x-ticket").unwrap(), "t1");
        // Not named in includeRequestHeadersInCheck: not sent.
        assert!(h.get("x-other").is_none());
        assert_eq!(h.get("x-from").unwrap(), "outrigger");
        assert_eq!(h.get("host").unwrap(), "outrigger.test");
        assert_eq!(h.get("content-length").unwrap(), "0");
    }

    // Denied: the authorizer's status, body and the headers named for the client.
    let got = ask(&mesh, web, &sleep, "/private").await;
    assert_eq!(got.status, 401);
    assert_eq!(got.text(), "denied by ext");
    assert_eq!(got.headers.get("x-deny-reason").unwrap(), "no-ticket");
    // Envoy passes www-authenticate and location whenever headersToDownstreamOnDeny is set.
    assert_eq!(
        got.headers.get("www-authenticate").unwrap(),
        "Bearer realm=\"x\""
    );
    assert_eq!(got.headers.get("location").unwrap(), "/login");
    assert!(got.headers.get("x-not-listed").is_none());

    // Not matched by the CUSTOM policy: the authorizer is not asked.
    let before = log.lock().unwrap().len();
    let got = ask(&mesh, web, &sleep, "/public/x").await;
    assert_eq!(got.status, 200);
    assert_eq!(log.lock().unwrap().len(), before);

    // Timeout and 5xx are errors: statusOnError, flag UAEX.
    let got = ask(&mesh, web, &sleep, "/slow").await;
    assert_eq!(got.status, 503);
    let got = ask(&mesh, web, &sleep, "/boom").await;
    assert_eq!(got.status, 503);
    agent.wait_metric(
        "istio_requests_total",
        &["response_code=\"401\"", "response_flags=\"UAEX\""],
        1.0,
    );
    agent.wait_metric(
        "istio_requests_total",
        &["response_code=\"503\"", "response_flags=\"UAEX\""],
        2.0,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_and_undefined_provider() {
    let (authz, _log) = start_authorizer().await;
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("ext.yaml", &CUSTOM.replace("PROVIDER", "open"));
    let app = start_echo().await;
    let cfg = mesh.config(&[("web", app, "http")], &providers(authz));
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let sleep = mesh.pki.issue("default", "sleep");
    // failOpen: a timeout lets the request through; a denial still denies.
    let got = ask(&mesh, agent.addr("web"), &sleep, "/slow").await;
    assert_eq!(got.status, 200, "{}", got.text());
    let got = ask(&mesh, agent.addr("web"), &sleep, "/nope").await;
    assert_eq!(got.status, 401);
    drop(agent);

    // A provider the configuration does not define: denied (403 RBAC), as Istio does.
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("ext.yaml", &CUSTOM.replace("PROVIDER", "missing"));
    let cfg = mesh.config(&[("web", app, "http")], &providers(authz));
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let sleep = mesh.pki.issue("default", "sleep");
    let got = ask(&mesh, agent.addr("web"), &sleep, "/allow").await;
    assert_eq!(got.status, 403);
    assert_eq!(got.text(), "RBAC: access denied");
}

/// A DENY policy for `/both*` and `/allow/both*`, beside the CUSTOM one.
const DENY_BOTH: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-both
  namespace: legacy
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: [\"/both*\", \"/allow/both*\"]
";

/// Envoy's HTTP filters as istiod builds them for the CUSTOM policy (`ext`, provider `ext` of
/// [`providers`]) and [`DENY_BOTH`] (pilot/pkg/security/authz/builder: builder.go, extauthz.go):
/// an RBAC filter with the CUSTOM rules as shadow rules (stat prefix `istio_ext_authz_`), the
/// ext_authz filter enabled by the shadow effective policy id that those rules set, then the
/// RBAC filter of the DENY policy.
fn istiod_custom_filters(authz_cluster: &str) -> Vec<serde_json::Value> {
    use serde_json::json;
    let path_prefix = |p: &str| json!({"url_path": {"path": {"prefix": p}}});
    vec![
        json!({
            "name": "envoy.filters.http.rbac",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                "shadow_rules": {"action": "DENY", "policies": {
                    "istio-ext-authz-ns[legacy]-policy[ext]-rule[0]": {
                        "permissions": [{"not_rule": path_prefix("/public")}],
                        "principals": [{"any": true}]
                    }
                }},
                "shadow_rules_stat_prefix": "istio_ext_authz_"
            }
        }),
        json!({
            "name": "envoy.filters.http.ext_authz",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                "transport_api_version": "V3",
                "status_on_error": {"code": 503},
                "failure_mode_allow": false,
                "http_service": {
                    "path_prefix": "/check",
                    "server_uri": {"uri": "http://ext-authz", "cluster": authz_cluster, "timeout": "0.5s"},
                    "authorization_request": {
                        "allowed_headers": {"patterns": [{"exact": "x-ticket", "ignore_case": true}]},
                        "headers_to_add": [{"key": "x-from", "value": "outrigger"}]
                    },
                    "authorization_response": {
                        "allowed_upstream_headers": {"patterns": [{"exact": "x-user", "ignore_case": true}]},
                        "allowed_client_headers": {"patterns": [{"exact": "x-deny-reason", "ignore_case": true}]},
                        "allowed_client_headers_on_success": {"patterns": [{"exact": "x-allow-note", "ignore_case": true}]}
                    }
                },
                "filter_enabled_metadata": {
                    "filter": "envoy.filters.http.rbac",
                    "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
                    "value": {"string_match": {"prefix": "istio-ext-authz"}}
                }
            }
        }),
        json!({
            "name": "envoy.filters.http.rbac",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                "rules": {"action": "DENY", "policies": {
                    "ns[legacy]-policy[deny-both]-rule[0]": {
                        "permissions": [{"or_rules": {"rules": [
                            path_prefix("/both"), path_prefix("/allow/both")
                        ]}}],
                        "principals": [{"any": true}]
                    }
                }}
            }
        }),
    ]
}

/// A check request as the authorizer received it: method, path, headers.
type Check = (String, String, Vec<(String, String)>);

/// What one request did, compared between Envoy and Outrigger.
#[derive(Debug, PartialEq)]
struct Seen {
    /// The check request: method, path, and its headers but Envoy's own `x-envoy-*` (sorted).
    check: Option<Check>,
    status: u16,
    /// The body of a refusal.
    body: Option<String>,
    /// Response headers the ext_authz semantics decide.
    headers: Vec<(&'static str, Option<String>)>,
    /// `x-user` as the application saw it (allowed requests).
    app_user: Option<String>,
}

async fn ask_both_ways(mesh: &Mesh, addr: SocketAddr, who: &Issued, path: &str, log: &Log) -> Seen {
    log.lock().unwrap().clear();
    let mut c = mesh.connect(addr, who, false).await;
    let mut req = get(path, false);
    for (k, v) in [
        ("x-ticket", "t1"),
        ("x-other", "o"),
        ("x-user", "mallory"),
        ("authorization", "Basic dTpw"),
    ] {
        req.headers_mut()
            .insert(k, http::HeaderValue::from_static(v));
    }
    let got = c.fetch(req).await.unwrap();
    let check = log.lock().unwrap().first().map(|(m, p, h, _)| {
        let mut hs: Vec<(String, String)> = h
            .iter()
            .filter(|(n, _)| !n.as_str().starts_with("x-envoy-"))
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        hs.sort();
        (m.clone(), p.clone(), hs)
    });
    let header = |n: &str| got.headers.get(n).map(|v| v.to_str().unwrap().to_string());
    let ok = got.status == 200;
    Seen {
        check,
        status: got.status,
        body: (!ok).then(|| got.text()),
        headers: [
            "www-authenticate",
            "location",
            "x-deny-reason",
            "x-not-listed",
            "x-allow-note",
            "x-user",
            "content-type",
        ]
        .into_iter()
        .filter(|n| !ok || *n != "content-type")
        .map(|n| (n, header(n)))
        .collect(),
        app_user: ok
            .then(|| got.seen().header("x-user").map(str::to_string))
            .flatten(),
    }
}

/// The same CUSTOM (and DENY) policies through Envoy 1.40 configured as istiod configures a
/// sidecar, and through Outrigger, against the same authorizer: the check request it receives,
/// and what the client and the application get, are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_answers_as_envoys_ext_authz() {
    let Some(bin) = common::envoy::envoy_or_skip("custom_answers_as_envoys_ext_authz") else {
        return;
    };
    let (authz, log) = start_authorizer().await;
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("ext.yaml", &CUSTOM.replace("PROVIDER", "ext"));
    mesh.policy("deny.yaml", DENY_BOTH);
    let app = start_echo().await;
    let tcp = start_tcp_echo().await;
    let cluster = "outbound|8000||ext-authz.legacy.svc.cluster.local";
    // The authorizer's cluster is a static one here (a sidecar has it from CDS).
    let envoy = common::envoy::start_sidecar_inbound_with_clusters(
        &bin,
        mesh.dir(),
        &mesh.agent,
        app,
        tcp,
        istiod_custom_filters(cluster),
        vec![],
        vec![common::envoy::static_cluster(cluster, authz)],
    )
    .await;
    let cfg = mesh.config(&[("web", app, "http")], &providers(authz));
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let sleep = mesh.pki.issue("default", "sleep");

    let mut diffs = Vec::new();
    for path in [
        "/allow/a?q=1",
        "/private",
        "/public/x",
        // CUSTOM is asked first: its denial answers, though DENY matches too.
        "/both",
        // CUSTOM allows, then DENY refuses.
        "/allow/both",
        "/boom",
        "/slow",
    ] {
        let from_envoy = ask_both_ways(&mesh, envoy.listener, &sleep, path, &log).await;
        let from_outrigger = ask_both_ways(&mesh, agent.addr("web"), &sleep, path, &log).await;
        differ(&mut diffs, path, from_envoy, from_outrigger);
    }
    assert!(diffs.is_empty(), "{}\n{}", diffs.join("\n"), envoy.tail());
}

/// A CUSTOM policy with an HTTP provider does not apply to a TCP connection: istiod's builder
/// "ignored CUSTOM action with HTTP provider on TCP filter chain" (builder.go), so a sidecar
/// lets the connection through unless DENY or ALLOW refuse it, and the authorizer is not asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_provider_is_ignored_on_tcp_as_istiod_does() {
    let (authz, log) = start_authorizer().await;
    let (agent, mesh) = tcp_behind_custom("ext", &providers(authz)).await;
    let etl = mesh.pki.issue("default", "etl");
    let mut s = tcp_client(&mesh, &etl, agent.addr("db")).await;
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    assert!(log.lock().unwrap().is_empty(), "the authorizer was asked");
    agent.wait_for_log("its HTTP provider has no TCP check");
}

/// A CUSTOM policy with a gRPC provider checks TCP connections: Envoy's network ext_authz
/// filter, which istiod configures for gRPC providers (`generateGRPCConfig`: the network filter
/// after an RBAC filter with the CUSTOM rules as shadow rules). Compared with Envoy 1.40: the
/// CheckRequest the authorizer receives, and whether the connection reaches the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_provider_checks_tcp_connections_as_envoy_does() {
    use serde_json::json;
    let Some(bin) =
        common::envoy::envoy_or_skip("grpc_provider_checks_tcp_connections_as_envoy_does")
    else {
        return;
    };
    let (authz, log) = start_grpc_authorizer().await;
    let (agent, mesh) = tcp_behind_custom("opa", &grpc_providers(authz)).await;
    let cluster = "outbound|9191||opa.legacy.svc.cluster.local";
    let mut grpc_cluster = common::envoy::static_cluster(cluster, authz);
    grpc_cluster["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}
        }
    });
    let tcp_filters = vec![
        json!({
            "name": "envoy.filters.network.rbac",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
                "stat_prefix": "tcp.",
                "shadow_rules": {"action": "DENY", "policies": {
                    "istio-ext-authz-ns[legacy]-policy[ext-all]-rule[0]": {
                        "permissions": [{"any": true}],
                        "principals": [{"any": true}]
                    }
                }},
                "shadow_rules_stat_prefix": "istio_ext_authz_"
            }
        }),
        json!({
            "name": "envoy.filters.network.ext_authz",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.ext_authz.v3.ExtAuthz",
                "stat_prefix": "tcp.",
                "failure_mode_allow": false,
                "transport_api_version": "V3",
                "grpc_service": {
                    "envoy_grpc": {"cluster_name": cluster, "authority": cluster.replace('|', "_.")},
                    "timeout": "0.5s"
                },
                "filter_enabled_metadata": {
                    "filter": "envoy.filters.network.rbac",
                    "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
                    "value": {"string_match": {"prefix": "istio-ext-authz"}}
                }
            }
        }),
    ];
    let tcp_echo = start_tcp_echo().await;
    let envoy = common::envoy::start_sidecar_inbound_with_clusters(
        &bin,
        mesh.dir(),
        &mesh.agent,
        start_echo().await,
        tcp_echo,
        vec![],
        tcp_filters,
        vec![grpc_cluster],
    )
    .await;

    let mut diffs = Vec::new();
    for who in ["etl", "intruder"] {
        let peer = mesh.pki.issue("default", who);
        let mut seen = Vec::new();
        for addr in [envoy.listener, agent.addr("db")] {
            log.lock().unwrap().clear();
            let mut s = tcp_client(&mesh, &peer, addr).await;
            let _ = s.write_all(b"ping").await;
            let mut buf = [0u8; 4];
            let echoed = matches!(
                tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await,
                Ok(Ok(_))
            );
            let check = log.lock().unwrap().first().cloned().map(normalized);
            seen.push((echoed, check));
        }
        assert_eq!(seen[1].0, who == "etl", "{who}: {seen:?}");
        let (from_envoy, from_outrigger) = (seen.remove(0), seen.remove(0));
        differ(&mut diffs, who, from_envoy, from_outrigger);
    }
    assert!(diffs.is_empty(), "{}\n{}", diffs.join("\n"), envoy.tail());
    agent.wait_metric(
        "outrigger_authorization_decisions_total",
        &["action=\"deny\"", "result=\"custom_denied\""],
        1.0,
    );
    agent.wait_for_log("\"response_flags\":\"UAEX\"");
}

/// A TCP listener in front of an echo server, with a CUSTOM policy (no rules: it matches every
/// connection) naming `provider`.
async fn tcp_behind_custom(provider: &str, providers: &str) -> (AgentProc, Mesh) {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy(
        "ext.yaml",
        &format!(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ext-all
  namespace: legacy
spec:
  action: CUSTOM
  provider:
    name: {provider}
  rules:
  - {{}}
"
        ),
    );
    let tcp_echo = start_tcp_echo().await;
    let cfg = mesh.config(&[("db", tcp_echo, "tcp")], providers);
    (AgentProc::start(mesh.dir(), &cfg), mesh)
}

/// A TCP connection to `addr` over the mesh's mTLS (ALPN `istio`) as `who`.
async fn tcp_client(
    mesh: &Mesh,
    who: &Issued,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tls = outrigger_tls::client_config(
        &who.certs,
        &mesh.pki.trust(),
        &[mesh.agent_id()],
        &[b"istio"],
    )
    .unwrap();
    tls_connect(addr, tls).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// envoyExtAuthzGrpc: Envoy's `envoy.service.auth.v3.Authorization/Check`

use outrigger_proxy::ext_authz_proto as pb;

/// What a gRPC authorizer received.
type CheckLog = Arc<Mutex<Vec<pb::CheckRequest>>>;

fn header_option(
    key: &str,
    value: &str,
    append: Option<bool>,
    action: i32,
) -> pb::HeaderValueOption {
    pb::HeaderValueOption {
        header: Some(pb::HeaderValue {
            key: key.into(),
            value: value.into(),
            raw_value: Vec::new(),
        }),
        append,
        append_action: action,
    }
}

/// A gRPC `Authorization/Check` server (HTTP/2, prior knowledge) that decides by the request's
/// path as [`start_authorizer`] does: `/allow*` → OK with request header mutations of every
/// kind (`x-user` with `append: false`, `x-added` with neither `append` nor an action,
/// `x-joined` with `append: true`, `x-if-absent` with ADD_IF_ABSENT, `x-only-if-there` with
/// OVERWRITE_IF_EXISTS), `x-remove-me` removed, `x-allow-note` for the client; `/slow*` → no
/// answer for 5 s; `/boom*` → grpc-status 14; anything else → PERMISSION_DENIED with a 401,
/// `x-deny-reason` and a body; `/plain-deny*` → PERMISSION_DENIED with no denied_response.
async fn start_grpc_authorizer() -> (SocketAddr, CheckLog) {
    use prost::Message;
    let log: CheckLog = Arc::default();
    let log2 = log.clone();
    let addr = serve_test_peer(true, move |req: http::Request<hyper::body::Incoming>| {
        let log = log2.clone();
        async move {
            use http_body_util::BodyExt;
            assert_eq!(req.uri().path(), pb::CHECK_PATH);
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let check = pb::CheckRequest::decode(&body[5..]).unwrap();
            let path = check
                .attributes
                .as_ref()
                .and_then(|a| a.request.as_ref())
                .and_then(|r| r.http.as_ref())
                .map(|h| h.path.clone())
                .unwrap_or_default();
            // A TCP connection's check (no request): allowed for `sa/etl` only.
            let tcp_peer = check
                .attributes
                .as_ref()
                .filter(|a| a.request.is_none())
                .and_then(|a| a.source.as_ref())
                .map(|s| s.principal.clone());
            log.lock().unwrap().push(check);
            let status = |code: i32| pb::RpcStatus {
                code,
                message: String::new(),
            };
            let resp = if let Some(peer) = tcp_peer {
                pb::CheckResponse {
                    status: Some(status(if peer.ends_with("/sa/etl") { 0 } else { 7 })),
                    ..Default::default()
                }
            } else if path.starts_with("/allow") || path.starts_with("/echo") {
                pb::CheckResponse {
                    status: Some(status(0)),
                    ok_response: Some(pb::OkHttpResponse {
                        headers: vec![
                            header_option("x-user", "alice", Some(false), 0),
                            header_option("x-added", "a2", None, 0),
                            header_option("x-joined", "j2", Some(true), 0),
                            header_option("x-if-absent", "new", None, 1),
                            header_option("x-only-if-there", "new", None, 3),
                        ],
                        headers_to_remove: vec!["x-remove-me".into()],
                        response_headers_to_add: vec![header_option(
                            "x-allow-note",
                            "yes",
                            None,
                            0,
                        )],
                    }),
                    denied_response: None,
                }
            } else if path.starts_with("/slow") {
                tokio::time::sleep(Duration::from_secs(5)).await;
                pb::CheckResponse::default()
            } else if path.starts_with("/boom") {
                // A trailers-only answer: grpc-status in the headers.
                let r = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "14")
                    .body(Full::new(Bytes::new()).boxed())
                    .unwrap();
                return Ok::<_, std::convert::Infallible>(r);
            } else if path.starts_with("/plain-deny") {
                pb::CheckResponse {
                    status: Some(status(7)),
                    ..Default::default()
                }
            } else {
                pb::CheckResponse {
                    status: Some(status(7)),
                    denied_response: Some(pb::DeniedHttpResponse {
                        status: Some(pb::HttpStatus { code: 401 }),
                        headers: vec![header_option("x-deny-reason", "no-ticket", None, 0)],
                        body: "denied by grpc".into(),
                    }),
                    ok_response: None,
                }
            };
            let msg = resp.encode_to_vec();
            let mut framed = vec![0u8];
            framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            framed.extend_from_slice(&msg);
            // grpc-status in the trailers, after the message.
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let body = http_body_util::StreamBody::new(futures_util::stream::iter([
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(framed))),
                Ok(hyper::body::Frame::trailers(trailers)),
            ]));
            let r = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(body.boxed())
                .unwrap();
            Ok(r)
        }
    })
    .await;
    (addr, log)
}

fn grpc_providers(authz: SocketAddr) -> String {
    format!(
        "extensionProviders:
- name: opa
  envoyExtAuthzGrpc:
    service: {ip}
    port: {port}
    timeout: 500ms
    statusOnError: '503'
    includeRequestBodyInCheck: {{maxRequestBytes: 8, allowPartialMessage: true}}
",
        ip = authz.ip(),
        port = authz.port()
    )
}

/// Envoy's filters for the CUSTOM policy with the gRPC provider, as istiod builds them
/// (extauthz.go `generateGRPCConfig`: `envoy_grpc` with the cluster and an authority made
/// from it, the provider's timeout), between the same RBAC filters as
/// [`istiod_custom_filters`].
fn istiod_grpc_custom_filters(cluster: &str) -> Vec<serde_json::Value> {
    let mut filters = istiod_custom_filters(cluster);
    filters[1] = serde_json::json!({
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "status_on_error": {"code": 503},
            "failure_mode_allow": false,
            "grpc_service": {
                "envoy_grpc": {"cluster_name": cluster, "authority": cluster.replace('|', "_.")},
                "timeout": "0.5s"
            },
            "with_request_body": {"max_request_bytes": 8, "allow_partial_message": true},
            "filter_enabled_metadata": filters[1]["typed_config"]["filter_enabled_metadata"].clone()
        }
    });
    filters
}

/// What one request did through a gRPC provider, compared between Envoy and Outrigger.
#[derive(Debug, PartialEq)]
struct GrpcSeen {
    /// The CheckRequest, less what differs by nature (time, stream id, ports, the
    /// `x-request-id` value, the node's service name).
    check: Option<pb::CheckRequest>,
    status: u16,
    body: Option<String>,
    headers: Vec<(&'static str, Option<String>)>,
    /// The mutated request headers as the application saw them (every value).
    app: Vec<(&'static str, Vec<String>)>,
}

fn normalized(mut c: pb::CheckRequest) -> pb::CheckRequest {
    if let Some(a) = c.attributes.as_mut() {
        for p in [a.source.as_mut(), a.destination.as_mut()]
            .into_iter()
            .flatten()
        {
            if let Some(s) = p.address.as_mut().and_then(|a| a.socket_address.as_mut()) {
                s.port_value = 0;
            }
        }
        if let Some(d) = a.destination.as_mut() {
            d.service = "<node>".into();
        }
        if let Some(r) = a.request.as_mut() {
            r.time = None;
            if let Some(h) = r.http.as_mut() {
                h.id = "<stream>".into();
                if let Some(v) = h.headers.get_mut("x-request-id") {
                    *v = "<id>".into();
                }
            }
        }
    }
    c
}

async fn ask_grpc_both_ways(
    mesh: &Mesh,
    addr: SocketAddr,
    who: &Issued,
    (path, body): (&str, Option<&'static str>),
    log: &CheckLog,
) -> GrpcSeen {
    log.lock().unwrap().clear();
    let mut c = mesh.connect(addr, who, false).await;
    let mut req = match body {
        Some(b) => with_body(path, b),
        None => get(path, false),
    };
    for (k, v) in [
        ("x-ticket", "t1"),
        ("x-user", "mallory"),
        ("x-added", "a1"),
        ("x-joined", "j1"),
        ("x-if-absent", "old"),
        ("x-remove-me", "r"),
        ("authorization", "Basic dTpw"),
    ] {
        req.headers_mut()
            .insert(k, http::HeaderValue::from_static(v));
    }
    let got = c.fetch(req).await.unwrap();
    let check = log.lock().unwrap().first().cloned().map(normalized);
    let header = |n: &str| got.headers.get(n).map(|v| v.to_str().unwrap().to_string());
    let ok = got.status == 200;
    let app_names = [
        "x-user",
        "x-added",
        "x-joined",
        "x-if-absent",
        "x-only-if-there",
        "x-remove-me",
    ];
    GrpcSeen {
        check,
        status: got.status,
        body: (!ok).then(|| got.text()),
        headers: ["x-deny-reason", "x-allow-note", "content-type"]
            .into_iter()
            .filter(|n| !ok || *n != "content-type")
            .map(|n| (n, header(n)))
            .collect(),
        app: if ok {
            let seen = got.seen();
            app_names
                .into_iter()
                .map(|n| (n, seen.headers.get(n).cloned().unwrap_or_default()))
                .collect()
        } else {
            Vec::new()
        },
    }
}

/// The CUSTOM policy with an `envoyExtAuthzGrpc` provider through Envoy 1.40 (as istiod
/// configures a sidecar) and through Outrigger, against the same gRPC authorizer: the
/// CheckRequest it receives, the header mutations the application sees and the client's
/// answers are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_provider_answers_as_envoys_ext_authz() {
    let Some(bin) = common::envoy::envoy_or_skip("grpc_provider_answers_as_envoys_ext_authz")
    else {
        return;
    };
    let (authz, log) = start_grpc_authorizer().await;
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("ext.yaml", &CUSTOM.replace("PROVIDER", "opa"));
    mesh.policy("deny.yaml", DENY_BOTH);
    let app = start_echo().await;
    let tcp = start_tcp_echo().await;
    let cluster = "outbound|9191||opa.legacy.svc.cluster.local";
    let mut grpc_cluster = common::envoy::static_cluster(cluster, authz);
    grpc_cluster["typed_extension_protocol_options"] = serde_json::json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}
        }
    });
    let envoy = common::envoy::start_sidecar_inbound_with_clusters(
        &bin,
        mesh.dir(),
        &mesh.agent,
        app,
        tcp,
        istiod_grpc_custom_filters(cluster),
        vec![],
        vec![grpc_cluster],
    )
    .await;
    let cfg = mesh.config(&[("web", app, "http")], &grpc_providers(authz));
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let sleep = mesh.pki.issue("default", "sleep");

    let mut diffs = Vec::new();
    for case in [
        ("/allow/a?q=1", None),
        ("/private", None),
        ("/plain-deny", None),
        ("/public/x", None),
        ("/both", None),
        ("/allow/both", None),
        ("/boom", None),
        ("/slow", None),
        // includeRequestBodyInCheck (8 bytes, partial allowed): a short body and a cut one.
        ("/allow/body", Some("hello")),
        ("/allow/body", Some("0123456789abcdef")),
        ("/private", Some("caf\u{e9}!")),
    ] {
        let from_envoy = ask_grpc_both_ways(&mesh, envoy.listener, &sleep, case, &log).await;
        let from_outrigger = ask_grpc_both_ways(&mesh, agent.addr("web"), &sleep, case, &log).await;
        differ(&mut diffs, case, from_envoy, from_outrigger);
    }
    assert!(diffs.is_empty(), "{}\n{}", diffs.join("\n"), envoy.tail());
}

/// A provider that is a mesh service: declared under `outbound:` with the same host and port,
/// the check goes through that destination — over mTLS, to the authorizer's sidecar (a real
/// Envoy in STRICT mode), with the authorizer's identity pinned — as a sidecar reaches it
/// through the service's outbound cluster. A wrong pin is an error (`statusOnError`), never a
/// plaintext fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_in_the_mesh_is_reached_over_mtls() {
    let Some(bin) = common::envoy::envoy_or_skip("provider_in_the_mesh_is_reached_over_mtls")
    else {
        return;
    };
    let (authz, log) = start_authorizer().await;
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("ext.yaml", &CUSTOM.replace("PROVIDER", "ext"));
    let authz_certs = mesh.pki.issue("legacy", "ext-authz");
    let unused = start_tcp_echo().await;
    let sidecar =
        common::envoy::start_sidecar_inbound(&bin, mesh.dir(), &authz_certs, authz, unused).await;
    let app = start_echo().await;
    let host = "ext-authz.legacy.svc.cluster.local";
    let cfg = |sa: &str| {
        mesh.config(
            &[("web", app, "http")],
            &format!(
                "outbound:
  - name: ext-authz
    host: {host}
    port: 8000
    endpoints: [\"{s}\"]
    identity: {{serviceAccount: {sa}}}
extensionProviders:
- name: ext
  envoyExtAuthzHttp:
    service: legacy/{host}
    port: 8000
    timeout: 2s
    pathPrefix: /check
    headersToUpstreamOnAllow: [x-user]
    statusOnError: '503'
",
                s = sidecar.listener
            ),
        )
    };
    let agent = AgentProc::start(mesh.dir(), &cfg("ext-authz"));
    let sleep = mesh.pki.issue("default", "sleep");

    let got = ask(&mesh, agent.addr("web"), &sleep, "/allow/x").await;
    assert_eq!(got.status, 200, "{}\n{}", got.text(), sidecar.tail());
    assert_eq!(got.seen().header("x-user"), Some("alice"));
    {
        let l = log.lock().unwrap();
        let (_, path, h, _) = l.last().unwrap();
        assert_eq!(path, "/check/allow/x");
        // The sidecar verified Outrigger's certificate and says so to the authorizer.
        let xfcc = h.get("x-forwarded-client-cert").unwrap().to_str().unwrap();
        assert!(
            xfcc.contains("URI=spiffe://cluster.local/ns/legacy/sa/windows-app"),
            "{xfcc}"
        );
    }
    let got = ask(&mesh, agent.addr("web"), &sleep, "/private").await;
    assert_eq!(got.status, 401);
    drop(agent);

    // The authorizer's sidecar is not who the pin says: the check fails (statusOnError).
    let before = log.lock().unwrap().len();
    let agent = AgentProc::start(mesh.dir(), &cfg("someone-else"));
    let got = ask(&mesh, agent.addr("web"), &sleep, "/allow/x").await;
    assert_eq!(got.status, 503, "{}", got.text());
    assert_eq!(
        log.lock().unwrap().len(),
        before,
        "the authorizer was reached"
    );
}

/// A gRPC provider that is a mesh service, behind its own Outrigger (`default/opa`, a `grpc`
/// inbound listener): the Check call goes through the declared outbound destination, HTTP/2
/// over mTLS with the authorizer's identity pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_provider_in_the_mesh_is_reached_over_mtls() {
    let (authz, log) = start_grpc_authorizer().await;
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("ext.yaml", &CUSTOM.replace("PROVIDER", "opa"));
    let (opa_agent, _) = start_server_agent(&mesh, "opa", authz, "grpc");
    let app = start_echo().await;
    let host = "opa.default.svc.cluster.local";
    let cfg = mesh.config(
        &[("web", app, "http")],
        &format!(
            "outbound:
  - name: opa
    host: {host}
    port: 9191
    protocol: grpc
    endpoints: [\"{s}\"]
    identity: {{serviceAccount: opa}}
extensionProviders:
- name: opa
  envoyExtAuthzGrpc: {{service: {host}, port: 9191, timeout: 2s, statusOnError: '503'}}
",
            s = opa_agent.addr("web")
        ),
    );
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let sleep = mesh.pki.issue("default", "sleep");

    let got = ask(&mesh, agent.addr("web"), &sleep, "/allow/x").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.seen().header("x-user"), Some("alice"));
    {
        let l = log.lock().unwrap();
        let http = l[0].attributes.as_ref().unwrap().request.as_ref().unwrap();
        assert_eq!(http.http.as_ref().unwrap().path, "/allow/x");
    }
    let got = ask(&mesh, agent.addr("web"), &sleep, "/private").await;
    assert_eq!(got.status, 401);
    assert_eq!(got.text(), "denied by grpc");
    // The authorizer's own Outrigger counted the calls as mTLS from this workload.
    opa_agent.wait_metric(
        "istio_requests_total",
        &[
            "source_principal=\"spiffe://cluster.local/ns/legacy/sa/windows-app\"",
            "request_protocol=\"grpc\"",
        ],
        2.0,
    );
}

/// A request with `body`, as the test clients send it.
fn with_body(path: &str, body: &'static str) -> http::Request<TestBody> {
    use http_body_util::BodyExt;
    let mut req = get(path, false);
    *req.method_mut() = http::Method::POST;
    *req.body_mut() = Full::new(Bytes::from_static(body.as_bytes()))
        .map_err(|never| match never {})
        .boxed();
    req
}

/// A check request with its body: path, headers, body.
type BodyCheck = (String, Vec<(String, String)>, Bytes);

/// What a request with a body did, compared between Envoy and Outrigger.
#[derive(Debug, PartialEq)]
struct BodySeen {
    /// The check: path, headers but Envoy's own `x-envoy-*` (the partial-body one kept), body.
    check: Option<BodyCheck>,
    status: u16,
    /// What the client got back (the echo of the whole body when allowed).
    body: String,
}

async fn ask_with_body(
    mesh: &Mesh,
    addr: SocketAddr,
    who: &Issued,
    path: &str,
    body: &'static str,
    log: &Log,
) -> BodySeen {
    log.lock().unwrap().clear();
    let mut c = mesh.connect(addr, who, false).await;
    let got = c.fetch(with_body(path, body)).await.unwrap();
    let check = log.lock().unwrap().first().map(|(_, p, h, b)| {
        let mut hs: Vec<(String, String)> = h
            .iter()
            .filter(|(n, _)| {
                !n.as_str().starts_with("x-envoy-") || n.as_str() == "x-envoy-auth-partial-body"
            })
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        hs.sort();
        (p.clone(), hs, b.clone())
    });
    BodySeen {
        check,
        status: got.status,
        body: got.text(),
    }
}

/// `includeRequestBodyInCheck` through Envoy 1.40 (`with_request_body`, as istiod sets it) and
/// through Outrigger, with and without `allowPartialMessage`: the authorizer receives the same
/// body, `content-length` and `x-envoy-auth-partial-body`; the application still receives the
/// whole body; a body over `maxRequestBytes` without partial messages is answered alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_goes_to_the_authorizer_as_envoy_sends_it() {
    let Some(bin) =
        common::envoy::envoy_or_skip("request_body_goes_to_the_authorizer_as_envoy_sends_it")
    else {
        return;
    };
    let mut diffs = Vec::new();
    for partial in [true, false] {
        let (authz, log) = start_authorizer().await;
        let mesh = Mesh::new();
        mesh.policy("pa.yaml", MESH_STRICT);
        mesh.policy("ext.yaml", &CUSTOM.replace("PROVIDER", "ext"));
        let app = start_echo().await;
        let tcp = start_tcp_echo().await;
        let cluster = "outbound|8000||ext-authz.legacy.svc.cluster.local";
        let mut filters = istiod_custom_filters(cluster);
        // extauthz.go `withBodyRequest`: MaxRequestBytes, AllowPartialMessage, PackAsBytes.
        filters[1]["typed_config"]["with_request_body"] =
            serde_json::json!({"max_request_bytes": 8, "allow_partial_message": partial});
        let envoy = common::envoy::start_sidecar_inbound_with_clusters(
            &bin,
            mesh.dir(),
            &mesh.agent,
            app,
            tcp,
            filters,
            vec![],
            vec![common::envoy::static_cluster(cluster, authz)],
        )
        .await;
        let cfg = mesh.config(
            &[("web", app, "http")],
            &providers(authz).replacen(
                "    statusOnError: '503'\n",
                &format!(
                    "    statusOnError: '503'\n    includeRequestBodyInCheck: {{maxRequestBytes: 8, allowPartialMessage: {partial}}}\n"
                ),
                1,
            ),
        );
        let agent = AgentProc::start(mesh.dir(), &cfg);
        let sleep = mesh.pki.issue("default", "sleep");
        for (path, body) in [
            ("/echo", "hello"),
            ("/echo", "0123456789abcdef"),
            ("/private", "01234567"),
            ("/private", "0123456789"),
        ] {
            let from_envoy = ask_with_body(&mesh, envoy.listener, &sleep, path, body, &log).await;
            let from_outrigger =
                ask_with_body(&mesh, agent.addr("web"), &sleep, path, body, &log).await;
            // What the comparison stands on, spelled out for one case.
            if partial && body.len() == 16 {
                let (_, headers, sent) = from_outrigger.check.clone().unwrap();
                assert_eq!(sent, "01234567");
                assert!(headers.contains(&("x-envoy-auth-partial-body".into(), "true".into())));
                assert_eq!(
                    (from_outrigger.status, from_outrigger.body.as_str()),
                    (200, body)
                );
            }
            differ(
                &mut diffs,
                (partial, path, body),
                from_envoy,
                from_outrigger,
            );
        }
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}
