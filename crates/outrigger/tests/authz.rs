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
        // A path that cannot be normalized is refused with 400 before any policy.
        let bad = c.fetch(get("/api/%zz", h2)).await.unwrap();
        assert_eq!(bad.status, 400);
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
            &["result=\"deny_matched\""]
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

/// A policy file with an error never half-applies: the last good policy stays in force, the
/// failure is counted and shown in /config_dump, and fixing the file applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_keeps_the_last_good_policy() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let allow = |who: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-one\n  namespace: legacy\nspec:\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/{who}\"]\n"
        )
    };
    mesh.policy("authz.yaml", &allow("sleep"));
    let agent = mesh.start(&[("web", start_echo().await, "http")]);
    let sleep = mesh.pki.issue("default", "sleep");
    async fn status(mesh: &Mesh, agent: &AgentProc, who: &Issued) -> u16 {
        let mut c = mesh.connect(agent.addr("web"), who, false).await;
        c.fetch(get("/", false)).await.unwrap().status
    }
    assert_eq!(status(&mesh, &agent, &sleep).await, 200);

    // A typo in a new version of the file, plus a second, valid change in another file that
    // would deny sleep: neither applies, because the set as a whole is invalid.
    mesh.policy(
        "authz.yaml",
        &allow("sleep").replace("principals", "principalz"),
    );
    mesh.policy("deny.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-all\n  namespace: legacy\nspec:\n  action: DENY\n  rules: [{}]\n");
    agent.wait_metric(
        "outrigger_config_reloads_total",
        &["source=\"policy\"", "result=\"error\""],
        1.0,
    );
    assert_eq!(
        status(&mesh, &agent, &sleep).await,
        200,
        "the last good policy stays in force"
    );
    let dump = agent.admin_get("/config_dump");
    assert!(
        dump.contains("principalz"),
        "config_dump shows the reload error: {dump}"
    );
    let log = agent.wait_for_log("policy reload failed; the previous policy stays in force");
    assert!(log.contains("authz.yaml:"), "{log}");

    // Fixed: the whole new set applies (deny-all now denies sleep).
    mesh.policy("authz.yaml", &allow("sleep"));
    agent.wait_metric(
        "outrigger_config_reloads_total",
        &["source=\"policy\"", "result=\"success\""],
        1.0,
    );
    assert_eq!(status(&mesh, &agent, &sleep).await, 403);
    let dump = agent.admin_get("/config_dump");
    assert!(
        dump.contains("deny.yaml") && !dump.contains("principalz"),
        "{dump}"
    );
}
