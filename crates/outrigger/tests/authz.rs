//! AuthorizationPolicy enforced by the running binary on real mTLS callers, and
//! `outrigger check` answering from the same engine.

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;
use outrigger_testkit::*;

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: legacy
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-sleep
  namespace: legacy
spec:
  selector:
    matchLabels:
      app: windows-app
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/api/*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: legacy
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/api/admin*"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_are_authorized_per_identity_method_and_normalized_path() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("authz.yaml", POLICIES);
    let echo = start_echo().await;
    let agent = mesh.start(&[("web", echo, "http")]);
    let sleep = mesh.pki.issue("default", "sleep");
    let intruder = mesh.pki.issue("default", "intruder");

    for h2 in [false, true] {
        let mut c = mesh.connect(agent.addr("web"), &sleep, h2).await;
        let ok = c
            .fetch(get("/api/./orders/../items?id=7", h2))
            .await
            .unwrap();
        assert_eq!(ok.status, 200, "{}", ok.text());
        // The application sees the normalized path it was authorized for.
        assert_eq!(ok.seen().path, "/api/items?id=7");

        let mut post = get("/api/items", h2);
        *post.method_mut() = http::Method::POST;
        let denied = c.fetch(post).await.unwrap();
        assert_eq!(
            (denied.status, denied.text().as_str()),
            (403, "RBAC: access denied")
        );

        // DENY wins over ALLOW, on the normalized path (`%61` is an unreserved `a`).
        for sneaky in ["/api/admin", "/api/x/../admin/users", "/api/%61dmin"] {
            let got = c.fetch(get(sneaky, h2)).await.unwrap();
            assert_eq!(got.status, 403, "{sneaky}");
        }
        // A path that cannot be normalized (an escaped NUL) is refused with 400 before any
        // policy; a `%` that starts no escape is kept and matched as written (as Envoy does:
        // tests/codec.rs).
        let bad = c.fetch(get("/api/%00", h2)).await.unwrap();
        assert_eq!(bad.status, 400);
        let kept = c.fetch(get("/api/%zz", h2)).await.unwrap();
        assert_eq!(kept.status, 200);
        assert_eq!(kept.seen().path, "/api/%zz");
    }

    let mut c = mesh.connect(agent.addr("web"), &intruder, false).await;
    let got = c.fetch(get("/api/items", false)).await.unwrap();
    assert_eq!(got.status, 403);

    let m = agent.metrics();
    assert_eq!(
        metric_value(
            &m,
            "istio_requests_total",
            &["response_code=\"403\"", "response_flags=\"RBAC\""]
        ),
        Some(9.0),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "outrigger_authorization_decisions_total",
            &["result=\"deny_matched\"", "policy=\"legacy/deny-admin\""]
        ),
        Some(6.0),
        "{m}"
    );
    let log = agent.wait_for_log("\"authz_policy\":\"legacy/deny-admin[0]\"");
    assert!(
        log.contains("\"authz_policy\":\"legacy/allow-sleep[0]\""),
        "{log}"
    );
    assert!(
        log.contains("\"authz_result\":\"no_allow_matched\""),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_are_authorized_and_closed_when_policy_revokes_them() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let allow = |who: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-db\n  namespace: legacy\nspec:\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/{who}\"]\n"
        )
    };
    mesh.policy("authz.yaml", &allow("etl"));
    let tcp_echo = start_tcp_echo().await;
    let agent = mesh.start(&[("db", tcp_echo, "tcp")]);
    let etl = mesh.pki.issue("default", "etl");
    let intruder = mesh.pki.issue("default", "intruder");
    let connect = |who: &Issued| {
        let cfg = outrigger_tls::client_config(
            &who.certs,
            &mesh.pki.trust(),
            &[mesh.agent_id()],
            &[b"istio"],
        )
        .unwrap();
        tls_connect(agent.addr("db"), cfg)
    };

    let mut denied = connect(&intruder).await.unwrap();
    let _ = denied.write_all(b"ping").await;
    let (got, _) = read_until_close(&mut denied).await;
    assert!(
        got.is_empty(),
        "a denied connection must not reach the backend"
    );

    let mut ok = connect(&etl).await.unwrap();
    ok.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    ok.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    // Revoke: the open connection is closed once the new policy is in force.
    mesh.policy("authz.yaml", &allow("someone-else"));
    let start = Instant::now();
    let (_, _) = tokio::time::timeout(Duration::from_secs(15), read_until_close(&mut ok))
        .await
        .expect("the revoked connection is closed");
    assert!(start.elapsed() < Duration::from_secs(15));
    agent.wait_for_log("policy changed: closing a TCP connection that is now denied");
    // Counted just after the close the client saw.
    let m = agent.wait_metric("istio_tcp_connections_closed_total", &[], 2.0);
    assert_eq!(
        metric_value(
            &m,
            "outrigger_authorization_decisions_total",
            &["action=\"deny\""]
        ),
        Some(2.0),
        "{m}"
    );
}

fn check(args: &[&str]) -> (i32, String) {
    let examples =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/agent.yaml");
    let out = std::process::Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&examples)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn check_explains_decisions_from_the_example_policies() {
    let (code, out) = check(&[
        "--from",
        "cluster.local/ns/web/sa/frontend",
        "--method",
        "POST",
        "--path",
        "/api/orders",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("allowed by legacy/allow-frontend rule 0"),
        "{out}"
    );
    assert!(out.contains("Policies in force (4)"), "{out}");

    let (code, out) = check(&[
        "--from",
        "cluster.local/ns/web/sa/frontend",
        "--path",
        "/api/%2e%2e/admin",
        "--json",
    ]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["allowed"], false);
    assert_eq!(v["policy"], "legacy/deny-admin");
    assert_eq!(v["normalized_path"], "/admin");

    let (code, out) = check(&[
        "--from",
        "spiffe://cluster.local/ns/web/sa/other",
        "--path",
        "/api/x",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("none of their rules matched"), "{out}");

    let (code, out) = check(&["--path", "/api/x"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("plaintext connection refused"), "{out}");

    let (code, out) = check(&[
        "--from",
        "cluster.local/ns/reporting/sa/etl",
        "--port",
        "1433",
        "--tcp",
    ]);
    assert_eq!(code, 0, "{out}");

    // Kept apart from "denied" (1): a check that could not be made is 3, clap's usage error 2.
    let (code, out) = check(&["--from", "not a principal"]);
    assert_eq!(code, 3, "{out}");
    let (code, out) = check(&["--no-such-flag"]);
    assert_eq!(code, 2, "{out}");
}

/// An HTTP/2 stream that is allowed when it starts and denied by a policy change ends (the
/// stream is reset); a new request on the same connection is refused; another caller's
/// stream carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_http2_requests_are_reauthorized_when_policy_changes() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let allow = |who: &[&str]| {
        let list = who
            .iter()
            .map(|w| format!("\"cluster.local/ns/default/sa/{w}\""))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-grpc\n  namespace: legacy\nspec:\n  rules:\n  - from:\n    - source:\n        principals: [{list}]\n"
        )
    };
    mesh.policy("authz.yaml", &allow(&["alice", "bob"]));
    let agent = mesh.start(&[("grpc", start_echo().await, "http")]);
    let alice = mesh.pki.issue("default", "alice");
    let bob = mesh.pki.issue("default", "bob");

    async fn open_stream(
        c: &mut HttpConn,
    ) -> (
        tokio::sync::mpsc::Sender<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>,
        hyper::body::Incoming,
    ) {
        let (tx, body) = channel_body();
        let req = http::Request::post("https://outrigger.test/echo")
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap();
        let resp = c.send(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        (tx, resp.into_body())
    }
    async fn echo_once(
        tx: &tokio::sync::mpsc::Sender<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>,
        body: &mut hyper::body::Incoming,
    ) -> Result<(), String> {
        tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
            b"ping",
        ))))
        .await
        .map_err(|e| e.to_string())?;
        let f = tokio::time::timeout(
            Duration::from_secs(10),
            http_body_util::BodyExt::frame(body),
        )
        .await
        .map_err(|_| "timeout".to_string())?;
        match f {
            Some(Ok(f)) if f.is_data() => Ok(()),
            Some(Err(e)) => Err(e.to_string()),
            other => Err(format!("{other:?}")),
        }
    }

    let mut ca = mesh.connect(agent.addr("grpc"), &alice, true).await;
    let mut cb = mesh.connect(agent.addr("grpc"), &bob, true).await;
    let (atx, mut abody) = open_stream(&mut ca).await;
    let (btx, mut bbody) = open_stream(&mut cb).await;
    echo_once(&atx, &mut abody).await.unwrap();
    echo_once(&btx, &mut bbody).await.unwrap();

    // Revoke alice while her stream is idle.
    mesh.policy("authz.yaml", &allow(&["bob"]));
    let deadline = Instant::now() + Duration::from_secs(15);
    let ended = loop {
        match tokio::time::timeout(
            Duration::from_millis(200),
            http_body_util::BodyExt::frame(&mut abody),
        )
        .await
        {
            Ok(Some(Err(e))) => break e.to_string(),
            Ok(None) => break "ended".to_string(),
            Ok(Some(Ok(f))) => panic!("unexpected frame {f:?}"),
            Err(_) => assert!(Instant::now() < deadline, "alice's stream was not ended"),
        }
    };
    eprintln!("alice's stream ended: {ended}");
    agent.wait_for_log("policy changed: ending a streaming response that is now denied");
    // A new request on alice's connection is refused; bob's stream still works.
    let got = ca.fetch(get("/x", true)).await.unwrap();
    assert_eq!(got.status, 403);
    echo_once(&btx, &mut bbody).await.unwrap();
}

/// In Istio each resource stands alone: a resource istiod would reject is refused alone (on
/// reload as at start-up), named in the log and /config_dump, and fails closed — a refused
/// ALLOW policy allows nothing but keeps the workload deny-by-default (istiod's builder keeps
/// an ALLOW filter whose rules could not be translated, `builder.go`) — while every valid
/// resource, here a new file, applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_resource_is_refused_alone_and_fails_closed() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let allow = |name: &str, who: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: legacy\nspec:\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/{who}\"]\n"
        )
    };
    mesh.policy("authz.yaml", &allow("allow-one", "sleep"));
    let agent = mesh.start(&[("web", start_echo().await, "http")]);
    let sleep = mesh.pki.issue("default", "sleep");
    let other = mesh.pki.issue("default", "other");
    async fn status(mesh: &Mesh, agent: &AgentProc, who: &Issued) -> u16 {
        let mut c = mesh.connect(agent.addr("web"), who, false).await;
        c.fetch(get("/", false)).await.unwrap().status
    }
    assert_eq!(status(&mesh, &agent, &sleep).await, 200);
    assert_eq!(status(&mesh, &agent, &other).await, 403);

    // A typo (istiod rejects the unknown field) in one file, a valid new policy in another.
    mesh.policy(
        "authz.yaml",
        &allow("allow-one", "sleep").replace("principals", "principalz"),
    );
    mesh.policy("other.yaml", &allow("allow-other", "other"));
    // Applied with a refusal: counted as `partial`, not `success`.
    agent.wait_metric(
        "outrigger_config_reloads_total",
        &["source=\"policy\"", "result=\"partial\""],
        1.0,
    );
    assert_eq!(
        status(&mesh, &agent, &other).await,
        200,
        "the valid resource applies"
    );
    assert_eq!(
        status(&mesh, &agent, &sleep).await,
        403,
        "the refused ALLOW policy allows nothing"
    );
    let dump = agent.admin_get("/config_dump");
    let v: serde_json::Value =
        serde_json::from_str(dump.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let refused = &v["policy"]["refused"][0];
    assert_eq!(refused["name"], "legacy/allow-one", "{dump}");
    assert!(
        refused["error"].as_str().unwrap().contains("authz.yaml:")
            && refused["error"].as_str().unwrap().contains("principalz"),
        "{dump}"
    );
    assert!(
        refused["effect"]
            .as_str()
            .unwrap()
            .contains("ALLOW policy that allows nothing"),
        "{dump}"
    );
    let log = agent.wait_for_log("policy refused: AuthorizationPolicy legacy/allow-one");
    assert!(log.contains("principalz"), "{log}");

    // Fixed: it applies again.
    mesh.policy("authz.yaml", &allow("allow-one", "sleep"));
    agent.wait_metric(
        "outrigger_config_reloads_total",
        &["source=\"policy\"", "result=\"success\""],
        1.0,
    );
    assert_eq!(status(&mesh, &agent, &sleep).await, 200);
    let dump = agent.admin_get("/config_dump");
    let v: serde_json::Value =
        serde_json::from_str(dump.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(v["policy"]["refused"], serde_json::json!([]), "{dump}");
}

/// Path templates (Istio 1.19+) match as Envoy's URI template matcher: the `/` before `{**}`
/// is literal, so `/allow/admin/{**}` does not allow `/allow/admin`
/// (envoy source/extensions/path/uri_template_lib/uri_template_internal.cc: `**` is
/// `[...]*` after a literal `/`; the query is removed before matching, uri_template_match.cc).
/// The same file holds a principal written with `spiffe://`: istiod accepts it, so the
/// agent starts, and reports it as a warning (it never matches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_templates_match_as_envoy_and_istiod_accepted_forms_load() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy(
        "authz.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: admin-tree\n  namespace: legacy\nspec:\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/sleep\", \"spiffe://cluster.local/ns/default/sa/other\"]\n    to:\n    - operation:\n        paths: [\"/allow/admin/{**}\", \"/one/{*}\"]\n",
    );
    let agent = mesh.start(&[("web", start_echo().await, "http")]);
    let sleep = mesh.pki.issue("default", "sleep");
    let other = mesh.pki.issue("default", "other");
    for h2 in [false, true] {
        let mut c = mesh.connect(agent.addr("web"), &sleep, h2).await;
        for (path, want) in [
            ("/allow/admin", 403),
            ("/allow/admin/", 200),
            ("/allow/admin/x", 200),
            ("/allow/admin/x/y?q=1", 200),
            ("/allow/adminx", 403),
            ("/one/a", 200),
            ("/one/a/b", 403),
            ("/one/", 403),
        ] {
            let got = c.fetch(get(path, h2)).await.unwrap();
            assert_eq!(got.status, want, "{path} (h2: {h2})");
        }
    }
    let mut c = mesh.connect(agent.addr("web"), &other, false).await;
    assert_eq!(
        c.fetch(get("/allow/admin/x", false)).await.unwrap().status,
        403,
        "a `spiffe://` principal never matches"
    );
    let dump = agent.admin_get("/config_dump");
    let v: serde_json::Value =
        serde_json::from_str(dump.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert!(
        v["policy"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("principals[1]: `spiffe://cluster.local/ns/default/sa/other`"),
        "{dump}"
    );
    agent.wait_for_log("policy warning: ");
}

/// `outrigger check` answers with the refused resources in force: a DENY policy istiod would
/// reject (`request.url_path` is not an Istio attribute, from the published fixture
/// 08-authorizationpolicy-production-security-baseline-deny.yaml) fails closed and is named,
/// and a valid ALLOW policy beside it still loads.
#[test]
fn check_names_refused_resources_and_their_fail_closed_effect() {
    let mesh = Mesh::new();
    mesh.policy(
        "deny.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: baseline-deny\n  namespace: legacy\nspec:\n  action: DENY\n  rules:\n  - when:\n    - key: request.url_path\n      values: [\"*wp-admin*\"]\n",
    );
    mesh.policy(
        "allow.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-sleep\n  namespace: legacy\nspec:\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/sleep\"]}\n",
    );
    let cfg = mesh.dir().join("agent.yaml");
    std::fs::write(
        &cfg,
        mesh.config(&[("web", "127.0.0.1:5000".parse().unwrap(), "http")], ""),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "check",
            "--json",
            "--from",
            "cluster.local/ns/default/sa/sleep",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["allowed"], false);
    assert_eq!(v["policy"], "legacy/baseline-deny");
    assert_eq!(v["refused"][0]["name"], "legacy/baseline-deny");
    assert!(
        v["refused"][0]["error"].as_str().unwrap().ends_with(
            "deny.yaml:10:12: spec.rules[0].when[0].key: unknown attribute: request.url_path"
        ),
        "{text}"
    );
    assert_eq!(
        v["refused"][0]["effect"],
        "fail closed: every request to this workload is denied"
    );
    assert_eq!(v["policies"][0]["name"], "legacy/allow-sleep", "{text}");
}
