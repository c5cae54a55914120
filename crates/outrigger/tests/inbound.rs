//! The inbound path end to end: the real `outrigger` binary, real certificates, real clients.

mod common;

use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;
use outrigger_testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mtls_forwards_http1_with_verified_identity_and_refuses_plaintext() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let echo = start_echo().await;
    let agent = mesh.start(&[("web", echo, "http")]);
    let sleep = mesh.pki.issue("default", "sleep");

    let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;
    let mut req = get("/hello?x=1", false);
    // A client's own XFCC is a forgery attempt: it must be replaced, not appended to.
    req.headers_mut().insert(
        "x-forwarded-client-cert",
        "URI=spiffe://cluster.local/ns/kube-system/sa/admin"
            .parse()
            .unwrap(),
    );
    let got = c.fetch(req).await.unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    let seen = got.seen();
    assert_eq!(seen.path, "/hello?x=1");
    assert_eq!(seen.version, "HTTP/1.1");
    let xfcc = &seen.headers["x-forwarded-client-cert"];
    assert_eq!(xfcc.len(), 1, "{xfcc:?}");
    assert_eq!(
        xfcc[0],
        format!(
            "By=spiffe://cluster.local/ns/legacy/sa/windows-app;Hash={};Subject=\"\";URI=spiffe://cluster.local/ns/default/sa/sleep",
            outrigger_tls::cert_sha256_hex(sleep.certs.leaf())
        )
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));

    // Plaintext: the connection is closed without a byte of answer.
    let answer = plaintext_request(agent.addr("web")).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    agent.wait_for_log("plaintext connection refused");

    let m = agent.metrics();
    assert_eq!(
        metric_value(
            &m,
            "istio_requests_total",
            &[
                "reporter=\"destination\"",
                "response_code=\"200\"",
                "connection_security_policy=\"mutual_tls\"",
                "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
                "destination_principal=\"spiffe://cluster.local/ns/legacy/sa/windows-app\"",
                "source_workload_namespace=\"default\"",
            ]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "outrigger_connections_rejected_total",
            &["reason=\"plaintext\""]
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        m.contains("istio_request_duration_milliseconds_bucket{"),
        "{m}"
    );

    // The access log: one JSON line for the request.
    let log = agent.wait_for_log("\"kind\":\"http\"");
    let line = log
        .lines()
        .find(|l| l.contains("\"kind\":\"http\""))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["response_code"], 200);
    assert_eq!(v["path"], "/hello?x=1");
    assert_eq!(
        v["source_principal"],
        "spiffe://cluster.local/ns/default/sa/sleep"
    );
    assert_eq!(v["connection_security_policy"], "mutual_tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_accepts_mtls_and_plaintext_and_labels_them() {
    let mesh = Mesh::new();
    mesh.policy(
        "pa.yaml",
        &peer_authentication("default", "istio-system", "  mtls:\n    mode: PERMISSIVE\n"),
    );
    let echo = start_echo().await;
    // One worker thread: the agent then runs Tokio's current-thread scheduler.
    let agent = AgentProc::start(
        mesh.dir(),
        &mesh.config(&[("web", echo, "http")], "runtime:\n  workerThreads: 1\n"),
    );
    let sleep = mesh.pki.issue("default", "sleep");

    let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;
    assert_eq!(c.fetch(get("/", false)).await.unwrap().status, 200);

    let tcp = tokio::net::TcpStream::connect(agent.addr("web"))
        .await
        .unwrap();
    let mut plain = HttpConn::new(tcp, false).await.unwrap();
    let mut req = get("/", false);
    req.headers_mut().insert(
        "x-forwarded-client-cert",
        "URI=spiffe://cluster.local/ns/default/sa/forged"
            .parse()
            .unwrap(),
    );
    let got = plain.fetch(req).await.unwrap();
    assert_eq!(got.status, 200);
    // A plaintext caller has no verified identity: no XFCC at all, the forged one removed.
    assert_eq!(got.seen().header("x-forwarded-client-cert"), None);

    let m = agent.metrics();
    for policy in ["mutual_tls", "none"] {
        assert_eq!(
            metric_value(
                &m,
                "istio_requests_total",
                &[&format!("connection_security_policy=\"{policy}\"")]
            ),
            Some(1.0),
            "{policy}: {m}"
        );
    }
}

/// Mesh STRICT, namespace PERMISSIVE, workload STRICT with a port-level DISABLE: the workload
/// policy beats the namespace one, which beats the mesh one, and the port exception applies
/// to its port only. Then, changing the workload policy to UNSET falls back to the namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_beats_namespace_beats_mesh_and_port_level_disable() {
    let mesh = Mesh::new();
    let open_port = free_port();
    mesh.policy("mesh.yaml", MESH_STRICT);
    mesh.policy(
        "ns.yaml",
        &peer_authentication("default", "legacy", "  mtls:\n    mode: PERMISSIVE\n"),
    );
    let workload = |mode: &str| {
        peer_authentication(
            "windows-app",
            "legacy",
            &format!(
                "  selector:\n    matchLabels:\n      app: windows-app\n  mtls:\n    mode: {mode}\n  portLevelMtls:\n    {open_port}:\n      mode: DISABLE\n"
            ),
        )
    };
    mesh.policy("workload.yaml", &workload("STRICT"));
    let echo = start_echo().await;
    let cfg = mesh
        .config(&[("closed", echo, "http")], "")
        .replace("inbound:\n", &format!(
            "inbound:\n  - name: open\n    listen: 127.0.0.1:{open_port}\n    backend: {echo}\n    protocol: http\n"
        ));
    let agent = AgentProc::start(mesh.dir(), &cfg);

    let plain_status = |addr| async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = HttpConn::new(tcp, false).await.unwrap();
        c.fetch(get("/", false)).await.map(|g| g.status).ok()
    };
    assert_eq!(
        plain_status(agent.addr("open")).await,
        Some(200),
        "DISABLE port"
    );
    assert_eq!(
        plain_status(agent.addr("closed")).await,
        None,
        "STRICT workload"
    );

    // The workload policy now inherits (UNSET): the namespace's PERMISSIVE applies.
    mesh.policy("workload.yaml", &workload("UNSET"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if plain_status(agent.addr("closed")).await == Some(200) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "reload never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And DISABLE still applies on its port.
    assert_eq!(plain_status(agent.addr("open")).await, Some(200));
    let dump = agent.admin_get("/config_dump");
    assert!(dump.contains("\"mtls_mode\": \"PERMISSIVE\""), "{dump}");
    assert!(dump.contains("\"mtls_mode\": \"DISABLE\""), "{dump}");
}

/// Every way a client certificate can be wrong is refused during the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_certificates_are_refused() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let echo = start_echo().await;
    let cfg = mesh.config(
        &[("web", echo, "http")],
        "trustDomainAliases: [old.local]\n",
    );
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let addr = agent.addr("web");
    let other_ca = TestPki::new();

    let cases: Vec<(&str, std::sync::Arc<rustls::ClientConfig>)> = vec![
        (
            "untrusted CA",
            raw_client_config(&other_ca.issue("default", "sleep").pem, &[b"http/1.1"]),
        ),
        (
            "expired",
            raw_client_config(&mesh.pki.expired("default", "sleep"), &[b"http/1.1"]),
        ),
        (
            "no client certificate",
            no_cert_client_config(&[b"http/1.1"]),
        ),
        (
            "no SPIFFE SAN",
            raw_client_config(&mesh.pki.with_uris(&[]), &[b"http/1.1"]),
        ),
        (
            "non-SPIFFE URI SAN",
            raw_client_config(
                &mesh.pki.with_uris(&["https://example.com/sleep"]),
                &[b"http/1.1"],
            ),
        ),
        (
            "foreign trust domain",
            raw_client_config(
                &mesh
                    .pki
                    .with_uris(&["spiffe://evil.local/ns/default/sa/sleep"]),
                &[b"http/1.1"],
            ),
        ),
    ];
    for (what, cfg) in &cases {
        let result = async {
            let tls = tls_connect(addr, cfg.clone()).await?;
            let mut c = HttpConn::new(tls, false).await?;
            c.fetch(get("/", false)).await
        }
        .await;
        assert!(
            result.is_err(),
            "{what}: was served: {:?}",
            result.map(|g| g.status)
        );
    }
    // The proxy counts a refusal just after the client has seen the alert.
    let m = agent.wait_metric(
        "outrigger_connections_rejected_total",
        &["reason=\"tls_handshake\""],
        cases.len() as f64,
    );
    assert_eq!(
        metric_value(
            &m,
            "outrigger_connections_rejected_total",
            &["reason=\"tls_handshake\""]
        ),
        Some(cases.len() as f64),
        "{m}"
    );
    let log = agent.wait_for_log("mTLS handshake refused");
    for reason in ["expired", "evil.local"] {
        assert!(
            log.contains(reason),
            "log should say why ({reason}):\n{log}"
        );
    }
    // No request reached the application.
    assert_eq!(metric_value(&m, "istio_requests_total", &[]), None, "{m}");

    // A trust-domain alias is accepted.
    let aliased = mesh
        .pki
        .with_uris(&["spiffe://old.local/ns/default/sa/sleep"]);
    let tls = tls_connect(addr, raw_client_config(&aliased, &[b"http/1.1"]))
        .await
        .unwrap();
    let mut c = HttpConn::new(tls, false).await.unwrap();
    let got = c.fetch(get("/", false)).await.unwrap();
    assert_eq!(got.status, 200);
    assert!(
        got.seen()
            .header("x-forwarded-client-cert")
            .unwrap()
            .ends_with("URI=spiffe://old.local/ns/default/sa/sleep")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_multiplexes_and_streams_both_ways_with_trailers() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let echo = start_echo().await;
    // A `grpc` port: the application is spoken to in HTTP/2 (Istio's `IsHTTP2()` ports).
    let agent = mesh.start(&[("grpc", echo, "grpc")]);
    let sleep = mesh.pki.issue("default", "sleep");
    let mut c = mesh.connect(agent.addr("grpc"), &sleep, true).await;
    assert!(c.is_h2());

    // Many concurrent streams on the one connection.
    let HttpConn::H2(tx) = &c else { unreachable!() };
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut tx = tx.clone();
        set.spawn(async move {
            let resp = tx
                .send_request(get(&format!("/s/{i}"), true))
                .await
                .unwrap();
            let got = read_all(resp).await.unwrap();
            (i, got.status, got.seen())
        });
    }
    while let Some(r) = set.join_next().await {
        let (i, status, seen) = r.unwrap();
        assert_eq!(status, 200);
        assert_eq!(seen.path, format!("/s/{i}"));
        assert_eq!(seen.version, "HTTP/2.0");
    }
    // Not gRPC: no gRPC message series (istio_stats.cc counts messages only when `is_grpc_`).
    let m = agent.wait_metric("istio_requests_total", &[], 20.0);
    for name in [
        "istio_request_messages_total",
        "istio_response_messages_total",
    ] {
        assert_eq!(common::metric_series(&m, name), vec![], "{m}");
    }

    // gRPC bidirectional stream: each message is echoed before the next is sent, and the
    // response ends with trailers.
    let (body_tx, req_body) = channel_body();
    let req = http::Request::post("https://outrigger.test/echo")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-want-trailers", "1")
        .body(req_body)
        .unwrap();
    let resp = c.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut total = 0usize;
    for i in 0..10u8 {
        let msg = Bytes::from(grpc_message(&vec![i; 1000 + i as usize]));
        body_tx.send(Ok(Frame::data(msg.clone()))).await.unwrap();
        let mut got = Vec::new();
        while got.len() < msg.len() {
            let f = tokio::time::timeout(
                Duration::from_secs(10),
                http_body_util::BodyExt::frame(&mut body),
            )
            .await
            .expect("echo arrives while the request is still open")
            .unwrap()
            .unwrap();
            got.extend_from_slice(&f.into_data().unwrap());
        }
        assert_eq!(&got[..], &msg[..]);
        total += msg.len();
    }
    drop(body_tx);
    let mut trailers = None;
    while let Some(f) = http_body_util::BodyExt::frame(&mut body).await {
        if let Ok(t) = f.unwrap().into_trailers() {
            trailers = Some(t);
        }
    }
    let trailers = trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-echo-bytes"], total.to_string().as_str());

    let m = agent.metrics();
    assert_eq!(
        metric_value(
            &m,
            "istio_requests_total",
            &["request_protocol=\"grpc\"", "grpc_response_status=\"0\""]
        ),
        Some(1.0),
        "{m}"
    );
    // Istio's gRPC message counters (istio_stats.cc `reportHelper`, with Envoy's `grpc_stats`
    // counting): the 10 messages each way, labelled as the call's `istio_requests_total`
    // series without the five labels a sidecar adds after reporting them (istio/proxy
    // `testdata/metric/server_request_messages.yaml.tmpl`).
    let m = agent.wait_metric("istio_response_messages_total", &[], 10.0);
    let grpc: Vec<_> = common::metric_series(&m, "istio_requests_total")
        .into_iter()
        .filter(|(l, _)| l["request_protocol"] == "grpc")
        .collect();
    assert_eq!(grpc.len(), 1, "{m}");
    let mut labels = grpc[0].0.clone();
    for l in [
        "request_protocol",
        "response_code",
        "grpc_response_status",
        "response_flags",
        "connection_security_policy",
    ] {
        labels.remove(l).unwrap();
    }
    assert_eq!(labels.len(), 20, "{labels:?}");
    assert_eq!(labels["reporter"], "destination");
    assert_eq!(
        labels["source_principal"],
        "spiffe://cluster.local/ns/default/sa/sleep"
    );
    for name in [
        "istio_request_messages_total",
        "istio_response_messages_total",
    ] {
        assert_eq!(
            common::metric_series(&m, name),
            vec![(labels.clone(), 10.0)],
            "{name}\n{m}"
        );
    }
}

/// The application's connections are pooled across callers, as Envoy's inbound cluster pools
/// them (crate::backend in outrigger-proxy): a second mTLS connection, from another workload,
/// reuses the backend connection the first one left idle — each request still carrying its own
/// caller's XFCC — and two streams of one HTTP/2 caller to an HTTP/1.1 application do not wait
/// for each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connections_are_shared_by_callers_and_streams() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let echo = start_echo_http1_only().await;
    let agent = mesh.start(&[("web", echo, "http")]);
    let sleep = mesh.pki.issue("default", "sleep");
    let other = mesh.pki.issue("ops", "backup");

    let mut a = mesh.connect(agent.addr("web"), &sleep, false).await;
    let first = a.fetch(get("/a", false)).await.unwrap().seen();
    drop(a);
    let mut b = mesh.connect(agent.addr("web"), &other, false).await;
    let second = b.fetch(get("/b", false)).await.unwrap().seen();
    assert_eq!(
        second.conn, first.conn,
        "the idle backend connection is reused"
    );
    let xfcc = |s: &Seen| {
        s.header("x-forwarded-client-cert")
            .unwrap_or("")
            .to_string()
    };
    assert!(
        xfcc(&first).ends_with("URI=spiffe://cluster.local/ns/default/sa/sleep"),
        "{}",
        xfcc(&first)
    );
    assert!(
        xfcc(&second).ends_with("URI=spiffe://cluster.local/ns/ops/sa/backup"),
        "{}",
        xfcc(&second)
    );

    // An HTTP/2 caller: a streaming request holds one backend connection open while another
    // stream is answered on a second one.
    let mut c = mesh.connect(agent.addr("web"), &sleep, true).await;
    let (body_tx, req_body) = channel_body();
    let req = http::Request::post("https://outrigger.test/echo")
        .body(req_body)
        .unwrap();
    let resp = c.send(req).await.unwrap();
    let mut body = resp.into_body();
    body_tx
        .send(Ok(Frame::data(Bytes::from_static(b"held"))))
        .await
        .unwrap();
    let f = tokio::time::timeout(
        Duration::from_secs(10),
        http_body_util::BodyExt::frame(&mut body),
    )
    .await
    .expect("the echo answers while the request is open")
    .unwrap()
    .unwrap();
    assert_eq!(f.into_data().unwrap(), "held");
    let got = tokio::time::timeout(Duration::from_secs(10), c.fetch(get("/c", true)))
        .await
        .expect("a second stream is not queued behind the open one")
        .unwrap();
    assert_eq!(got.status, 200);
    assert_ne!(got.seen().conn, "", "{}", got.text());
    drop(body_tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_is_forwarded_and_counted() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let tcp_echo = start_tcp_echo().await;
    let agent = mesh.start(&[("db", tcp_echo, "tcp"), ("sniffed", tcp_echo, "auto")]);
    let sleep = mesh.pki.issue("default", "sleep");
    for listener in ["db", "sniffed"] {
        let cfg = outrigger_tls::client_config(
            &sleep.certs,
            &mesh.pki.trust(),
            &[mesh.agent_id()],
            &[b"istio"],
        )
        .unwrap();
        let mut tls = tls_connect(agent.addr(listener), cfg).await.unwrap();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        // Binary first bytes: `auto` must see opaque TCP, not HTTP.
        tls.write_all(&payload).await.unwrap();
        let mut back = vec![0u8; payload.len()];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(back, payload, "{listener}");
        tls.shutdown().await.unwrap();
        let _ = read_until_close(&mut tls).await;
    }
    // Metrics are published when the connections close.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = agent.metrics();
        let closed = metric_value(
            &m,
            "istio_tcp_connections_closed_total",
            &["connection_security_policy=\"mutual_tls\""],
        );
        if closed == Some(2.0) {
            assert_eq!(
                metric_value(&m, "istio_tcp_connections_opened_total", &[]),
                Some(2.0)
            );
            assert_eq!(
                metric_value(&m, "istio_tcp_received_bytes_total", &[]),
                Some(200_000.0),
                "{m}"
            );
            assert_eq!(
                metric_value(&m, "istio_tcp_sent_bytes_total", &[]),
                Some(200_000.0),
                "{m}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_gives_503_and_a_log_line() {
    let mesh = Mesh::new();
    let dead = dead_addr().await;
    let agent = mesh.start(&[("web", dead, "http")]);
    let sleep = mesh.pki.issue("default", "sleep");
    let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;
    let got = c.fetch(get("/", false)).await.unwrap();
    assert_eq!(got.status, 503);
    assert!(
        got.text().contains("upstream connect error"),
        "{}",
        got.text()
    );
    let log = agent.wait_for_log("answering 503");
    assert!(log.contains(&dead.to_string()), "{log}");
    let m = agent.metrics();
    assert_eq!(
        metric_value(
            &m,
            "istio_requests_total",
            &["response_code=\"503\"", "response_flags=\"UF\""]
        ),
        Some(1.0),
        "{m}"
    );
}

/// A 1 GiB upload streams through: the proxy's memory does not grow with the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_upload_streams_in_bounded_memory() {
    const TOTAL: u64 = 1 << 30;
    const CHUNK: usize = 256 * 1024;
    let mesh = Mesh::new();
    let echo = start_echo().await;
    let cfg = mesh.config(&[("web", echo, "http")], "accessLog: off\n");
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let sleep = mesh.pki.issue("default", "sleep");
    let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;
    let (tx, req_body) = channel_body();
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![7u8; CHUNK]);
        let mut sent = 0u64;
        while sent < TOTAL {
            if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() {
                return;
            }
            sent += CHUNK as u64;
        }
    });
    let req = http::Request::post("/sink")
        .header("host", "outrigger.test")
        .body(req_body)
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(300), c.fetch(req))
        .await
        .expect("1 GiB within 5 minutes")
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), TOTAL.to_string());
    let peak = peak_rss_kib(agent.child.id()).expect("VmHWM");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB ≥ 64 MiB");
    eprintln!("outrigger peak RSS after a 1 GiB upload: {peak} KiB");
}

#[test]
fn config_errors_name_file_line_and_field() {
    let mesh = Mesh::new();
    let cfg = mesh.config(&[("web", "10.0.0.7:5000".parse().unwrap(), "http")], "");
    let path = mesh.dir().join("bad.yaml");
    std::fs::write(&path, &cfg).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = cfg.lines().position(|l| l.contains("10.0.0.7")).unwrap() + 1;
    assert!(
        err.contains(&format!("bad.yaml:{line}:"))
            && err.contains("inbound[0].backend")
            && err.contains("loopback"),
        "{err}"
    );

    // An unknown key.
    let cfg2 = mesh.config(
        &[("web", "127.0.0.1:5000".parse().unwrap(), "http")],
        "adminn:\n  listen: x\n",
    );
    std::fs::write(&path, &cfg2).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = cfg2.lines().position(|l| l.starts_with("adminn")).unwrap() + 1;
    assert!(
        err.contains(&format!("bad.yaml:{line}:")) && err.contains("adminn"),
        "{err}"
    );

    // A policy resource istiod would reject is refused alone, not the whole agent: it starts,
    // names the file, line and field, and fails closed (a refused PeerAuthentication means
    // STRICT on every port; docs/policy.md, "Refused resources").
    mesh.policy(
        "pa.yaml",
        &peer_authentication("default", "istio-system", "  mtls:\n    mode: STRCT\n"),
    );
    std::fs::write(
        &path,
        mesh.config(&[("web", "127.0.0.1:5000".parse().unwrap(), "http")], ""),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("policy refused: PeerAuthentication istio-system/default")
            && err.contains("pa.yaml:")
            && err.contains("STRCT")
            && err.contains("mTLS STRICT on every port"),
        "{err}"
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let mesh = Mesh::new();
    // The SIGTERM is sent once the request is known to have reached the application.
    let (echo, arrived) = start_signalling_sink().await;
    let mut agent = mesh.start(&[("web", echo, "http")]);
    let sleep = mesh.pki.issue("default", "sleep");
    let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;
    let (tx, req_body) = channel_body();
    let req = http::Request::post("/sink")
        .header("host", "outrigger.test")
        .body(req_body)
        .unwrap();
    let in_flight = tokio::spawn(async move { c.fetch(req).await });
    tx.send(Ok(Frame::data(Bytes::from_static(b"before "))))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), arrived)
        .await
        .expect("the request reaches the application")
        .unwrap();
    let pid = agent.child.id();
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    // New connections are refused once the drain has started...
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(agent.addr("web"))
        .await
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the listener still accepts 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...but the request in flight finishes.
    tx.send(Ok(Frame::data(Bytes::from_static(b"after"))))
        .await
        .unwrap();
    drop(tx);
    let got = in_flight.await.unwrap().unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "12");
    let status = agent.terminate();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let echo = start_echo().await;
    let agent = mesh.start(&[("web", echo, "http")]);
    assert!(
        agent
            .admin_get("/healthz/ready")
            .starts_with("HTTP/1.0 200")
    );
    let dump = agent.admin_get("/config_dump");
    let body = dump.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        v["workload"]["identity"],
        "spiffe://cluster.local/ns/legacy/sa/windows-app"
    );
    assert_eq!(v["inbound"][0]["mtls_mode"], "STRICT");
    assert_eq!(v["inbound"][0]["mtls_mode_from"], "istio-system/default");
    assert!(
        v["policy"]["files"][0]
            .as_str()
            .unwrap()
            .ends_with("pa.yaml")
    );
}

/// Envoy's connection manager gives every request an `x-request-id` before its filters
/// (conn_manager_utility.cc `mutateRequestHeaders`): a peer's is kept, a missing one is a new
/// version 4 UUID; the application and the access log see the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_carries_an_x_request_id() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let agent = mesh.start(&[("web", start_echo().await, "http")]);
    let sleep = mesh.pki.issue("default", "sleep");
    let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;
    let got = c.fetch(get("/new", false)).await.unwrap();
    let id = got.seen().header("x-request-id").unwrap().to_string();
    let parts: Vec<&str> = id.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [8, 4, 4, 4, 12],
        "{id}"
    );
    assert!(parts[2].starts_with('4'), "version 4: {id}");
    assert!("89ab".contains(&parts[3][..1]), "RFC 4122 variant: {id}");
    assert!(
        id.bytes()
            .all(|b| b == b'-' || b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    let mut req = get("/kept", false);
    req.headers_mut()
        .insert("x-request-id", "caller-chosen-id".parse().unwrap());
    let got = c.fetch(req).await.unwrap();
    assert_eq!(got.seen().header("x-request-id"), Some("caller-chosen-id"));
    // The same ids in the access log (JSON lines on stdout).
    agent.wait_for_log("\"request_id\":\"caller-chosen-id\"");
    agent.wait_for_log(&format!("\"request_id\":\"{id}\""));
}

/// The certificate in service's expiry is a metric, so that an alert can fire before it stops
/// every mTLS connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_expiry_is_a_metric() {
    let mesh = Mesh::new();
    let agent = mesh.start(&[("web", start_echo().await, "http")]);
    let m = agent.metrics();
    let got = metric_value(&m, "outrigger_certificate_expiry_timestamp_seconds", &[]).unwrap();
    let want = mesh
        .agent
        .certs
        .not_after()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert_eq!(got, want, "{m}");
}
