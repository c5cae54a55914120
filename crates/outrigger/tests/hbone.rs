//! HBONE (Istio ambient) end to end: the real `outrigger` binary terminating HBONE, reached by
//! Outrigger's own HBONE client (`outrigger_proxy::hbone::HboneClient`), with real
//! certificates, real sockets, real HTTP.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use common::*;
use outrigger_proxy::hbone::{Baggage, HboneClient, HboneError, SourceInfo};
use outrigger_testkit::*;
use outrigger_tls::{CertSource, CertStore};

/// `sleep` may GET /api/* (an HTTP-only rule, so its TCP connections match no ALLOW rule);
/// `etl` may do anything.
const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-sleep-api
  namespace: legacy
spec:
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
  name: allow-etl
  namespace: legacy
spec:
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/etl"]
"#;

const HBONE: &str = "hbone:\n  listen: 127.0.0.1:0\n";

fn client(mesh: &Mesh, who: &Issued, workload: &str) -> HboneClient {
    client_with_idle(
        mesh,
        who,
        workload,
        outrigger_proxy::hbone::client::DEFAULT_IDLE_TIMEOUT,
    )
}

fn client_with_idle(mesh: &Mesh, who: &Issued, workload: &str, idle: Duration) -> HboneClient {
    let store = CertStore::new(
        CertSource::Files {
            chain: who.dir.join("cert-chain.pem"),
            key: who.dir.join("key.pem"),
            roots: who.dir.join("root-cert.pem"),
        },
        mesh.pki.trust(),
        vec![b"h2".to_vec()],
    )
    .unwrap();
    let source = SourceInfo {
        baggage: Baggage {
            cluster: Some("Kubernetes".into()),
            namespace: Some("default".into()),
            workload_name: Some(workload.into()),
            service_name: Some(workload.into()),
            revision: Some("v7".into()),
            ..Baggage::default()
        },
        kind: "deployment".into(),
    };
    HboneClient::with_idle_timeout(store, &source, Duration::from_secs(10), idle)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes `len` bytes (then half-closes) while reading the echo back concurrently; returns
/// what came back.
async fn echo<S>(stream: S, len: usize, seed: u8) -> std::io::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let data = pattern(len, seed);
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(64 * 1024) {
            w.write_all(chunk).await?;
        }
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut back = Vec::with_capacity(len);
    r.read_to_end(&mut back).await?;
    writer.await.unwrap()?;
    Ok(back)
}

/// The agent's log without terminal colours, once it contains `needle` (bounded wait).
fn wait_for_plain_log(agent: &AgentProc, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut plain = String::new();
        let raw = agent.stderr() + &agent.stdout();
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI: ESC [ parameters final-byte
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                plain.push(c);
            }
        }
        if plain.contains(needle) {
            return plain;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "log never contained {needle:?}:\n{plain}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_streams_get_the_direct_paths_policy_identity_and_metrics() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("authz.yaml", POLICIES);
    let echo_http = start_echo().await;
    let echo_tcp = start_tcp_echo().await;
    let dead_backend = dead_addr().await;
    let agent = AgentProc::start_with(
        mesh.dir(),
        &mesh.config(
            &[
                ("web", echo_http, "http"),
                ("db", echo_tcp, "tcp"),
                ("down", dead_backend, "tcp"),
            ],
            HBONE,
        ),
        &[("RUST_LOG", "info,outrigger_proxy::hbone=debug")],
    );
    let hbone = agent.hbone_addr();
    let web = agent.addr("web");
    let db = agent.addr("db");
    let me = mesh.agent_id();
    let sleep = client(&mesh, &mesh.pki.issue("default", "sleep"), "sleep-vm");

    // HTTP inside the tunnel: per-request L7 authorization with the outer peer's identity,
    // and the same XFCC a direct mTLS connection gets.
    let s = within(
        "connect web",
        sleep.connect_from(
            hbone,
            std::slice::from_ref(&me),
            web,
            Some("10.9.8.7:4321".parse().unwrap()),
            Some("web.legacy.svc.cluster.local"),
        ),
    )
    .await
    .unwrap();
    let mut http = HttpConn::new(s, false).await.unwrap();
    let got = http.fetch(get("/api/items", false)).await.unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    let xfcc = got
        .seen()
        .header("x-forwarded-client-cert")
        .unwrap()
        .to_string();
    assert!(
        xfcc.ends_with(";URI=spiffe://cluster.local/ns/default/sa/sleep"),
        "{xfcc}"
    );
    let got = http.fetch(get("/admin", false)).await.unwrap();
    assert_eq!(got.status, 403, "{}", got.text());
    assert_eq!(got.text(), "RBAC: access denied");

    // HTTP/2 inside the tunnel, on another stream of the same connection.
    let s = sleep.connect(hbone, &me, web).await.unwrap();
    let mut h2 = HttpConn::new(s, true).await.unwrap();
    let got = h2.fetch(get("/api/h2", true)).await.unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    // `web` is an `http` port: the application hears HTTP/1.1 whatever the caller spoke, as
    // from an Istio sidecar (cluster_builder.go `setUpstreamProtocol`).
    assert_eq!(got.seen().version, "HTTP/1.1");

    // TCP inside the tunnel: `sleep` matches no L4 rule, so the CONNECT is answered 401 (as
    // ztunnel answers an RBAC denial) and nothing reaches the backend.
    match sleep.connect(hbone, &me, db).await {
        Err(HboneError::Status { status, .. }) => assert_eq!(status, 401),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a denied TCP stream was accepted"),
    }
    // A TCP listener whose backend is down: 503, as ztunnel answers an unreachable destination.
    let etl = client(&mesh, &mesh.pki.issue("default", "etl"), "etl-vm");
    match etl.connect(hbone, &me, agent.addr("down")).await {
        Err(HboneError::Status { status, .. }) => assert_eq!(status, 503),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a stream to a dead backend was accepted"),
    }
    assert_eq!(sleep.dials(), 1, "every stream shares one HBONE connection");

    // Destinations: unknown port → 503, another host's IP → 400; nothing is forwarded.
    let dead = dead_addr().await;
    match sleep.connect(hbone, &me, dead).await {
        Err(HboneError::Status { status, .. }) => assert_eq!(status, 503),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("an unknown destination was accepted"),
    }
    let other_ip: SocketAddr = format!("127.0.0.2:{}", web.port()).parse().unwrap();
    match sleep.connect(hbone, &me, other_ip).await {
        Err(HboneError::Status { status, .. }) => assert_eq!(status, 400),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a destination on another IP was accepted"),
    }

    // The client pins the server identity: a wrong expectation fails the handshake.
    let wrong = mesh.pki.id("legacy", "someone-else");
    match client(&mesh, &mesh.pki.issue("default", "sleep"), "x")
        .connect(hbone, &wrong, web)
        .await
    {
        Err(HboneError::UnexpectedIdentity(_, msg)) => {
            assert!(msg.contains("someone-else"), "{msg}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("connected to an unexpected identity"),
    }

    // ztunnel's headers are read: forwarded and traceparent in the stream's log span.
    let log = wait_for_plain_log(&agent, "forwarded_for=10.9.8.7:4321");
    assert!(
        log.contains("forwarded_host=web.legacy.svc.cluster.local"),
        "{log}"
    );
    assert!(log.contains("traceparent=00-"), "{log}");

    // Metrics as ztunnel reports them for HBONE: istio_tcp_* for every stream with mutual_tls
    // and the baggage's source labels, plus istio_requests_total for the HTTP inside.
    let m = agent.metrics();
    let sleep_id = "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"";
    let tcp_opened = metric_value(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            sleep_id,
            "connection_security_policy=\"mutual_tls\"",
            "source_workload=\"sleep-vm\"",
            "source_canonical_revision=\"v7\"",
            "source_workload_namespace=\"default\"",
        ],
    );
    assert!(tcp_opened >= Some(3.0), "{tcp_opened:?}\n{m}");
    for code in ["200", "403"] {
        let n = metric_value(
            &m,
            "istio_requests_total",
            &[
                sleep_id,
                &format!("response_code=\"{code}\""),
                "source_workload=\"sleep-vm\"",
                "connection_security_policy=\"mutual_tls\"",
            ],
        );
        assert!(n >= Some(1.0), "{code}: {n:?}\n{m}");
    }
    let refused = metric_value(
        &m,
        "outrigger_connections_rejected_total",
        &["listener=\"hbone\"", "reason=\"hbone_destination\""],
    );
    assert_eq!(refused, Some(2.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_on_one_connection_large_transfers_and_a_reset_that_hurts_no_other() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("authz.yaml", POLICIES);
    let echo_tcp = start_tcp_echo().await;
    let agent = AgentProc::start(mesh.dir(), &mesh.config(&[("db", echo_tcp, "tcp")], HBONE));
    let hbone = agent.hbone_addr();
    let db = agent.addr("db");
    let me = mesh.agent_id();
    let etl = client(&mesh, &mesh.pki.issue("default", "etl"), "etl-vm");

    // 48 concurrent streams of 256 KiB each, echoed, on one connection.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..48u8 {
        let etl = etl.clone();
        let me = me.clone();
        set.spawn(async move {
            let s = etl.connect(hbone, &me, db).await.unwrap();
            let back = echo(s, 256 * 1024, i).await.unwrap();
            assert!(back == pattern(256 * 1024, i), "stream {i} corrupted");
        });
    }
    within("48 streams", async {
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    })
    .await;
    assert_eq!(etl.dials(), 1, "48 streams must share one HBONE connection");

    // A large transfer both ways, while another stream is reset mid-flight and a third one
    // opens after the reset.
    const BIG: usize = 24 * 1024 * 1024;
    let big = {
        let etl = etl.clone();
        let me = me.clone();
        tokio::spawn(async move {
            let s = etl.connect(hbone, &me, db).await.unwrap();
            echo(s, BIG, 7).await
        })
    };
    let mut victim = etl.connect(hbone, &me, db).await.unwrap();
    victim.write_all(b"half a message").await.unwrap();
    let mut first = [0u8; 4];
    within("victim echo", victim.read_exact(&mut first))
        .await
        .unwrap();
    assert_eq!(&first, b"half");
    victim.reset();
    // The reset stream is dead for its user...
    let after = within("victim after reset", victim.write_all(b"more")).await;
    let mut rest = Vec::new();
    let read = within("victim read after reset", victim.read_to_end(&mut rest)).await;
    assert!(
        after.is_err() || read.is_err(),
        "a reset stream kept working"
    );
    drop(victim);
    // ...and nobody else's.
    let s = etl.connect(hbone, &me, db).await.unwrap();
    let back = within("stream after reset", echo(s, 100_000, 3))
        .await
        .unwrap();
    assert!(back == pattern(100_000, 3));
    let back = within("big transfer", big).await.unwrap().unwrap();
    assert_eq!(back.len(), BIG);
    assert!(back == pattern(BIG, 7), "the large transfer was corrupted");
    assert_eq!(etl.dials(), 1, "the reset must not close the connection");

    // Byte counters: at least the big transfer in each direction.
    let m = agent.metrics();
    let id = "source_principal=\"spiffe://cluster.local/ns/default/sa/etl\"";
    let received = metric_value(&m, "istio_tcp_received_bytes_total", &[id]).unwrap_or(0.0);
    let sent = metric_value(&m, "istio_tcp_sent_bytes_total", &[id]).unwrap_or(0.0);
    assert!(received >= BIG as f64, "received {received}\n{m}");
    assert!(sent >= BIG as f64, "sent {sent}\n{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_refuses_peers_outside_the_mesh() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let echo_tcp = start_tcp_echo().await;
    let agent = AgentProc::start(mesh.dir(), &mesh.config(&[("db", echo_tcp, "tcp")], HBONE));
    let hbone = agent.hbone_addr();

    // Another CA's certificate: the outer handshake fails before any stream. (The client
    // skips server verification, so only the server side can refuse.)
    let other = TestPki::new();
    let stranger = other.issue("default", "sleep");
    let cfg = raw_client_config(&stranger.pem, &[b"h2"]);
    // Bounded: under TLS 1.3 the client finishes its side of the handshake before the server
    // checks its certificate, so the refusal arrives as a later read error; a connection that
    // neither answers nor closes in 10 s served nothing either.
    let attempt = async {
        match tls_connect(hbone, cfg).await {
            Err(_) => true,
            Ok(tls) => match HttpConn::new(tls, true).await {
                Err(_) => true,
                Ok(mut c) => c.fetch(get("/", true)).await.is_err(),
            },
        }
    };
    let refused = tokio::time::timeout(std::time::Duration::from_secs(10), attempt)
        .await
        .unwrap_or(true);
    assert!(refused, "a peer from another CA was served");
    agent.wait_for_log("HBONE mTLS handshake refused");
    let m = agent.metrics();
    let n = metric_value(
        &m,
        "outrigger_connections_rejected_total",
        &["listener=\"hbone\"", "reason=\"tls_handshake\""],
    );
    assert_eq!(n, Some(1.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_hbone_connections_are_released_and_busy_ones_kept() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("authz.yaml", POLICIES);
    let echo_tcp = start_tcp_echo().await;
    let agent = AgentProc::start(mesh.dir(), &mesh.config(&[("db", echo_tcp, "tcp")], HBONE));
    let hbone = agent.hbone_addr();
    let db = agent.addr("db");
    let me = mesh.agent_id();
    let idle = Duration::from_millis(300);
    let etl = client_with_idle(&mesh, &mesh.pki.issue("default", "etl"), "etl-vm", idle);

    // A stream open for longer than the idle timeout keeps its connection.
    let mut s = etl.connect(hbone, &me, db).await.unwrap();
    assert_eq!(s.peer_identity(), &me, "the stream names the verified peer");
    assert_eq!(etl.open_connections(), 1);
    tokio::time::sleep(idle * 4).await;
    s.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    within("busy stream", s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"still here");
    drop(s);
    // Reused right after its stream ended...
    let s = etl.connect(hbone, &me, db).await.unwrap();
    assert_eq!(etl.dials(), 1);
    drop(s);
    // ...released once idle for the timeout: the connection closes (its task ends)...
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while etl.open_connections() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and the next stream dials again.
    let s = etl.connect(hbone, &me, db).await.unwrap();
    let back = within("after release", echo(s, 1000, 9)).await.unwrap();
    assert!(back == pattern(1000, 9));
    assert_eq!(
        etl.dials(),
        2,
        "the idle connection was released and a new one dialled"
    );
}
