//! WebSocket (HTTP/1.1 `Upgrade: websocket`) through Outrigger, with a real WebSocket client
//! and server (tokio-tungstenite): inbound, an mTLS mesh client reaches a plaintext WebSocket
//! application; outbound, a plaintext application reaches a WebSocket service behind another
//! agent's inbound. Istio's sidecars forward WebSocket upgrades by default; Outrigger does the
//! same, authorizes the upgrade request like any request, and closes an open WebSocket when a
//! policy change denies it.

mod common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use common::ws::start_ws_echo;
use common::{AgentProc, Mesh, metric_value};
use outrigger_testkit::tls_connect;

const WAIT: Duration = Duration::from_secs(20);

const ALLOW_CHAT: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-chat, namespace: legacy}
spec:
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    to: [{operation: {paths: ["/chat"]}}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_websocket_is_authorized_tunnelled_and_revoked_by_policy() {
    let mesh = Mesh::new();
    mesh.policy("allow.yaml", ALLOW_CHAT);
    let (app, seen) = start_ws_echo().await;
    let agent = AgentProc::start(
        mesh.dir(),
        &mesh.config(&[("web", app, "http")], "accessLog: stdout\n"),
    );
    let sleep = mesh.pki.issue("default", "sleep");
    let cfg = outrigger_tls::client_config(
        &sleep.certs,
        &mesh.pki.trust(),
        &[mesh.agent_id()],
        &[b"istio-http/1.1"],
    )
    .unwrap();
    let connect = |path: &'static str| {
        let cfg = cfg.clone();
        let addr = agent.addr("web");
        async move {
            let tls = tls_connect(addr, cfg).await.unwrap();
            tokio::time::timeout(
                WAIT,
                tokio_tungstenite::client_async(format!("ws://web.legacy{path}"), tls),
            )
            .await
            .expect("handshake in time")
        }
    };

    // Allowed: the upgrade reaches the app with the caller's identity; messages flow both ways.
    let (mut ws, resp) = connect("/chat").await.expect("the upgrade is accepted");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    let got = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::text("hello"));
    let big = vec![7u8; 1 << 20];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let got = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.into_data().len(), big.len());
    {
        let seen = seen.lock().unwrap();
        let (path, xfcc) = &seen[0];
        assert_eq!(path, "/chat");
        assert!(
            xfcc.as_deref()
                .is_some_and(|x| x.ends_with(";URI=spiffe://cluster.local/ns/default/sa/sleep")),
            "{xfcc:?}"
        );
    }

    // Denied: the upgrade request is answered 403 like any request; the app never sees it.
    match connect("/admin").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("expected a 403, got {other:?}"),
    }
    assert_eq!(seen.lock().unwrap().len(), 1);

    // A policy change that denies the open WebSocket closes it.
    mesh.policy(
        "allow.yaml",
        &ALLOW_CHAT.replace("sa/sleep", "sa/someone-else"),
    );
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            // Keep talking until the tunnel is cut.
            if ws.send(Message::text("still there?")).await.is_err() {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                Ok(None) | Ok(Some(Err(_))) => return,
                Ok(Some(Ok(Message::Close(_)))) => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the WebSocket stayed open after the policy change"
    );
    agent.wait_for_log("closing a WebSocket connection that is now denied");

    // Recorded when the tunnel ended: code 101, flags RBAC (revoked), and the bytes.
    let m = agent.wait_metric(
        "istio_requests_total",
        &["response_code=\"101\"", "response_flags=\"RBAC\""],
        1.0,
    );
    assert_eq!(
        metric_value(&m, "istio_requests_total", &["response_code=\"403\""]),
        Some(1.0),
        "{m}"
    );
    let log = agent.wait_for_log("\"response_code\":101");
    let line = log
        .lines()
        .find(|l| l.contains("\"response_code\":101"))
        .unwrap();
    let rec: serde_json::Value = serde_json::from_str(line).unwrap();
    assert!(rec["bytes_received"].as_u64().unwrap() > 1 << 20, "{line}");
    assert!(rec["bytes_sent"].as_u64().unwrap() > 1 << 20, "{line}");
}

/// Outbound: a plaintext WebSocket client calls the agent's outbound listener; the agent
/// originates mTLS to the server agent's inbound (identity pinned), which forwards to the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_websocket_reaches_a_mesh_service() {
    let mesh = Mesh::new();
    let (app, seen) = start_ws_echo().await;
    let server = AgentProc::start(mesh.dir(), &mesh.config(&[("web", app, "http")], ""));
    let sleep = mesh.pki.issue("default", "sleep");
    let dir = mesh.dir().join("client");
    std::fs::create_dir_all(&dir).unwrap();
    let port = common::free_port();
    let cfg = format!(
        "trustDomain: cluster.local
workload: {{namespace: default, serviceAccount: sleep}}
certificates:
  files:
    certChain: {d}/cert-chain.pem
    key: {d}/key.pem
    rootCert: {d}/root-cert.pem
admin: {{listen: 127.0.0.1:0}}
accessLog: stdout
outbound:
  - name: chat
    listen: 127.0.0.1:{port}
    host: chat.legacy.svc.cluster.local
    port: 8080
    endpoints: [\"{s}\"]
    identity: {id}
",
        d = sleep.dir.display(),
        s = server.addr("web"),
        id = mesh.agent_id(),
    );
    let client = AgentProc::start(&dir, &cfg);

    let url = format!("ws://127.0.0.1:{port}/chat?room=1");
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tcp))
        .await
        .expect("handshake in time")
        .unwrap_or_else(|e| panic!("upgrade refused: {e}\n{}", client.stderr()));
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        let m = Message::text(format!("message {i}"));
        ws.send(m.clone()).await.unwrap();
        let got = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, m);
    }
    ws.close(None).await.unwrap();
    // The close handshake, then the client hangs up (as WebSocket clients do).
    let end = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(matches!(end, Some(Ok(Message::Close(_))) | None), "{end:?}");
    drop(ws);
    {
        let seen = seen.lock().unwrap();
        let (path, xfcc) = &seen[0];
        assert_eq!(path, "/chat?room=1");
        // The server agent verified the client agent's certificate.
        assert!(
            xfcc.as_deref()
                .is_some_and(|x| x.ends_with(";URI=spiffe://cluster.local/ns/default/sa/sleep")),
            "{xfcc:?}"
        );
    }
    // reporter="source": a 101 to the pinned identity, recorded when the tunnel ended.
    let m = client.wait_metric(
        "istio_requests_total",
        &[
            "reporter=\"source\"",
            "response_code=\"101\"",
            "destination_principal=\"spiffe://cluster.local/ns/legacy/sa/windows-app\"",
        ],
        1.0,
    );
    assert!(m.contains("istio_requests_total"));
    // The server side saw the same 101.
    server.wait_metric(
        "istio_requests_total",
        &["reporter=\"destination\"", "response_code=\"101\""],
        1.0,
    );
}

/// Shutdown: an open WebSocket keeps working while the agent drains (as an open TCP
/// connection does), and the agent exits as soon as it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_is_drained_not_cut() {
    let mesh = Mesh::new();
    let (app, _) = start_ws_echo().await;
    let mut agent = AgentProc::start(mesh.dir(), &mesh.config(&[("web", app, "http")], ""));
    let sleep = mesh.pki.issue("default", "sleep");
    let cfg = outrigger_tls::client_config(
        &sleep.certs,
        &mesh.pki.trust(),
        &[mesh.agent_id()],
        &[b"istio-http/1.1"],
    )
    .unwrap();
    let tls = tls_connect(agent.addr("web"), cfg).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://web.legacy/chat", tls)
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // SIGTERM, then wait until the agent is draining.
    let pid = agent.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    agent.wait_for_log("draining in-flight requests");
    // Still open and working during the drain.
    ws.send(Message::text("during the drain")).await.unwrap();
    let got = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::text("during the drain"));
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited under an open WebSocket"
    );
    // Closing it lets the drain finish well before its 10 s timeout.
    ws.close(None).await.unwrap();
    let _ = tokio::time::timeout(WAIT, ws.next()).await;
    drop(ws);
    let status = tokio::task::spawn_blocking(move || {
        let s = agent.terminate();
        (s, agent.stderr())
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{}", status.1);
    assert!(
        status.1.contains("drained: all connections finished"),
        "{}",
        status.1
    );
}
