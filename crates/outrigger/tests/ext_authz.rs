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

/// What the authorizer saw: method, path, and headers.
type Log = Arc<Mutex<Vec<(String, String, http::HeaderMap)>>>;

/// An authorizer that decides by path: `/allow*` → 200 with `x-user: alice` and
/// `x-allow-note: yes`; `/slow*` → no answer for 5 s; `/boom*` → 500; anything else → 401
/// with `www-authenticate`, `x-deny-reason` and a body.
async fn start_authorizer() -> (SocketAddr, Log) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let log: Log = Arc::default();
    let log2 = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let log = log2.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let path = req.uri().to_string();
                        log.lock().unwrap().push((
                            req.method().to_string(),
                            path.clone(),
                            req.headers().clone(),
                        ));
                        let p = path.trim_start_matches("/check");
                        let b = http::Response::builder();
                        let r = if p.starts_with("/allow") {
                            b.status(200)
                                .header("x-user", "alice")
                                .header("x-allow-note", "yes")
                                .body(Full::new(Bytes::new()))
                        } else if p.starts_with("/slow") {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            b.status(200).body(Full::new(Bytes::new()))
                        } else if p.starts_with("/boom") {
                            b.status(500).body(Full::new(Bytes::from("oops")))
                        } else {
                            b.status(401)
                                .header("www-authenticate", "Bearer realm=\"x\"")
                                .header("x-deny-reason", "no-ticket")
                                .body(Full::new(Bytes::from("denied by ext")))
                        };
                        Ok::<_, std::convert::Infallible>(r.unwrap())
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, log)
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
        let (method, path, h) = l.last().unwrap();
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
    assert!(got.headers.get("www-authenticate").is_none());

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
