//! Outbound acceptance tests: the real `outrigger` binary originates Istio mTLS for a plaintext
//! application on loopback.
//!
//! ```text
//!  test app ──plain HTTP/TCP──▶ outrigger (legacy/windows-app) outbound
//!        ──mTLS, ALPN istio-*, SNI outbound_.<port>_._.<fqdn>──▶ mesh server
//! ```
//!
//! Mesh servers are either a second `outrigger` agent (its inbound in front of an echo app) or
//! an in-process mTLS server built on `outrigger_tls::server_config` that answers with what it
//! saw of the connection (ALPN, SNI, client identity, HTTP version, connection number), so that
//! the tests can assert on the wire behaviour. Every socket is on 127.0.0.1, ephemeral ports
//! (outbound listener ports are picked free just before the agent starts), every wait bounded.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::{AgentProc, Mesh, agent_yaml, free_port, metric_value, start_server_agent};
use outrigger_testkit::{Issued, start_echo, start_tcp_echo};

const WAIT: Duration = Duration::from_secs(20);
const RATINGS: &str = "ratings.default.svc.cluster.local";
const REVIEWS: &str = "reviews.default.svc.cluster.local";
const RATINGS_ID: &str = "spiffe://cluster.local/ns/default/sa/ratings";
const REVIEWS_ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/legacy/sa/windows-app";

// ---------------------------------------------------------------------------------------------
// Agents

/// Starts the client agent (legacy/windows-app) with an outbound section.
fn start_client(mesh: &Mesh, outbound: &str) -> AgentProc {
    let dir = mesh.dir().join("client");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = agent_yaml(
        mesh,
        &mesh.agent.dir,
        common::AGENT_NS,
        common::AGENT_SA,
        "  []\n",
        outbound,
    );
    AgentProc::start(&dir, &cfg)
}

// ---------------------------------------------------------------------------------------------
// In-process mesh server: mTLS with a workload certificate, answers with what it saw

struct MeshServer {
    addr: SocketAddr,
    /// TLS connections accepted.
    accepted: Arc<AtomicUsize>,
    /// Requests answered.
    hits: Arc<AtomicUsize>,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl MeshServer {
    async fn start(name: &'static str, certs: &Issued, mesh: &Mesh) -> MeshServer {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(name, certs, mesh, l)
    }

    /// Starts again on a known address (after [`kill`](Self::kill)).
    async fn start_at(
        name: &'static str,
        certs: &Issued,
        mesh: &Mesh,
        addr: SocketAddr,
    ) -> MeshServer {
        let deadline = Instant::now() + WAIT;
        let l = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot rebind {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        Self::serve(name, certs, mesh, l)
    }

    fn serve(name: &'static str, certs: &Issued, mesh: &Mesh, l: TcpListener) -> MeshServer {
        let addr = l.local_addr().unwrap();
        let config = outrigger_tls::server_config(
            &certs.certs,
            &mesh.pki.trust(),
            outrigger_tls::ISTIO_ALPNS,
        )
        .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let hits = Arc::new(AtomicUsize::new(0));
        let tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (acc, h, t) = (accepted.clone(), hits.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let conn_no = acc.fetch_add(1, Ordering::SeqCst) + 1;
                let config = config.clone();
                let hits = h.clone();
                let task = tokio::spawn(async move {
                    let Ok(tls) = tokio_rustls::TlsAcceptor::from(config).accept(s).await else {
                        return;
                    };
                    let (_, session) = tls.get_ref();
                    let alpn = session
                        .alpn_protocol()
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .unwrap_or_default();
                    let sni = session.server_name().unwrap_or_default().to_string();
                    let peer =
                        outrigger_tls::peer_identity(session.peer_certificates().unwrap_or(&[]))
                            .map(|i| i.to_string())
                            .unwrap_or_default();
                    let svc = service_fn(move |req: http::Request<Incoming>| {
                        let (alpn, sni, peer, hits) =
                            (alpn.clone(), sni.clone(), peer.clone(), hits.clone());
                        async move {
                            hits.fetch_add(1, Ordering::SeqCst);
                            let host = req
                                .headers()
                                .get("host")
                                .and_then(|h| h.to_str().ok())
                                .map(str::to_string)
                                .or_else(|| req.uri().authority().map(|a| a.to_string()))
                                .unwrap_or_default();
                            let doc = serde_json::json!({
                                "server": name, "alpn": alpn, "sni": sni, "peer": peer,
                                "version": format!("{:?}", req.version()),
                                "conn": conn_no, "host": host, "path": req.uri().path(),
                            });
                            // Slow enough that concurrent requests overlap on the wire.
                            // `?ms=N` sets how slow (default 200 ms).
                            if req.uri().path() == "/slow" {
                                let ms = req
                                    .uri()
                                    .query()
                                    .and_then(|q| q.strip_prefix("ms="))
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(200);
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(Bytes::from(doc.to_string())),
                            ))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
                t.lock().unwrap().push(task.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        MeshServer {
            addr,
            accepted,
            hits,
            tasks,
        }
    }

    /// The process "dies": the listener closes and every connection is cut.
    fn kill(&self) -> Vec<tokio::task::AbortHandle> {
        let tasks: Vec<_> = self.tasks.lock().unwrap().drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        tasks
    }

    /// [`MeshServer::kill`], returning once every task has stopped (an aborted task stops at
    /// its next await).
    async fn kill_and_wait(&self) {
        let tasks = self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !tasks.iter().all(|t| t.is_finished()) {
            assert!(Instant::now() < deadline, "the server's tasks did not stop");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for MeshServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// The application's HTTP client

/// One plaintext HTTP/1.1 request on a new connection, as a legacy app makes it. `target` is
/// the request-target: a path, or an absolute URI for the HTTP proxy.
async fn app_get(addr: SocketAddr, target: &str) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(WAIT, async {
        let s = TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
        tokio::spawn(conn);
        let host = target
            .strip_prefix("http://")
            .map(|r| r.split('/').next().unwrap_or(r).to_string())
            .unwrap_or_else(|| addr.to_string());
        let req = http::Request::get(target)
            .header("host", host)
            .body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
    .map_err(|_| anyhow::anyhow!("GET {target} via {addr} took longer than {WAIT:?}"))?
}

/// A POST with a body on a new connection.
async fn app_post(addr: SocketAddr, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(WAIT, async {
        let s = TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
        tokio::spawn(conn);
        let req = http::Request::post(path)
            .header("host", addr.to_string())
            .body(http_body_util::Full::new(Bytes::from(body)))?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
    .map_err(|_| anyhow::anyhow!("POST {path} via {addr} took longer than {WAIT:?}"))?
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Istio's metadata exchange between two agents (outrigger_proxy::peer_metadata): the client
/// agent sends its workload with every request and reads the server's from the answer, so
/// both reporters name both workloads — `source_workload` on the server, `destination_workload`
/// on the client — where a certificate alone leaves them `unknown`. Neither application sees
/// an exchange header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_reporters_name_both_workloads() {
    let mesh = Mesh::new();
    let echo = start_echo().await;
    let (server, _) = start_server_agent(&mesh, "ratings", echo, "http");
    let client = start_client(
        &mesh,
        &format!(
            "outbound:
  - name: ratings
    listen: 127.0.0.1:0
    host: {RATINGS}
    port: 8080
    endpoints: [\"{s}\"]
    identity: {{serviceAccount: ratings}}
",
            s = server.addr("web")
        ),
    );
    let addr = client.outbound("ratings");
    for _ in 0..3 {
        let s = TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get("/reviews")
            .header("host", RATINGS)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = tokio::time::timeout(WAIT, send.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", client.stderr());
        assert!(
            !resp.headers().contains_key("x-envoy-peer-metadata"),
            "{resp:?}"
        );
        assert!(
            !resp.headers().contains_key("x-envoy-peer-metadata-id"),
            "{resp:?}"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let seen: outrigger_testkit::Seen = serde_json::from_slice(&body).unwrap();
        assert!(seen.header("x-envoy-peer-metadata").is_none(), "{seen:?}");
        assert!(
            seen.header("x-envoy-peer-metadata-id").is_none(),
            "{seen:?}"
        );
    }

    let on_server = [
        "reporter=\"destination\"",
        "source_workload=\"windows-app\"",
        "source_workload_namespace=\"legacy\"",
        "source_app=\"windows-app\"",
        "source_version=\"v1\"",
        "source_canonical_service=\"windows-app\"",
        "source_canonical_revision=\"v1\"",
        "destination_workload=\"ratings\"",
        "response_code=\"200\"",
    ];
    server.wait_metric("istio_requests_total", &on_server, 3.0);
    let on_client = [
        "reporter=\"source\"",
        "source_workload=\"windows-app\"",
        "destination_workload=\"ratings\"",
        "destination_workload_namespace=\"default\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/ratings\"",
        "destination_app=\"ratings\"",
        "destination_version=\"v1\"",
        "destination_canonical_service=\"ratings\"",
        "destination_canonical_revision=\"v1\"",
        "destination_service=\"ratings.default.svc.cluster.local\"",
        "response_code=\"200\"",
    ];
    client.wait_metric("istio_requests_total", &on_client, 3.0);
}

/// Two agents, two identities: the client agent's outbound reaches the server agent's inbound,
/// which verifies the client's identity; a destination pinned to another identity is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outrigger_outbound_to_outrigger_inbound_and_wrong_identity_refused() {
    let mesh = Mesh::new();
    let echo = start_echo().await;
    let (server, _) = start_server_agent(&mesh, "ratings", echo, "http");
    let client = start_client(
        &mesh,
        &format!(
            "outbound:
  - name: ratings
    listen: 127.0.0.1:0
    host: {RATINGS}
    port: 8080
    endpoints: [\"{s}\"]
    identity: {{serviceAccount: ratings}}
  - name: impostor
    listen: 127.0.0.1:0
    host: {REVIEWS}
    port: 8080
    endpoints: [\"{s}\"]
    identity: {REVIEWS_ID}
",
            s = server.addr("web")
        ),
    );
    let ok = client.outbound("ratings");
    let wrong = client.outbound("impostor");

    let (status, body) = app_get(ok, "/hello?x=1").await.unwrap();
    assert_eq!(status, 200, "{body}\n{}", client.stderr());
    let seen: outrigger_testkit::Seen = serde_json::from_str(&body).unwrap();
    assert_eq!(seen.path, "/hello?x=1");
    // The server agent verified the client's certificate and tells the app who called.
    let xfcc = seen.header("x-forwarded-client-cert").unwrap_or_default();
    assert!(xfcc.contains(&format!("URI={CLIENT_ID}")), "{xfcc}");
    assert!(xfcc.contains(&format!("By={RATINGS_ID}")), "{xfcc}");
    // The app called 127.0.0.1:<port>; the service's own name went upstream.
    assert_eq!(seen.header("host"), Some(&*format!("{RATINGS}:8080")));

    // A keep-alive series works too (pooled upstream connection).
    for i in 0..5 {
        let (status, _) = app_get(ok, &format!("/again/{i}")).await.unwrap();
        assert_eq!(status, 200);
    }

    // A request body streams through (1 MiB upload; the echo app answers with its length).
    let (status, body) = app_post(ok, "/sink", vec![7u8; 1 << 20]).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "1048576"));

    // The wrong identity: the handshake is refused, the app gets 503, the log names both.
    let (status, body) = app_get(wrong, "/steal").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(RATINGS_ID) && body.contains(REVIEWS_ID),
        "{body}"
    );
    let log = client.wait_for_log("server identity refused");
    let line = log
        .lines()
        .find(|l| l.contains("server identity refused"))
        .unwrap();
    assert!(
        line.contains(RATINGS_ID) && line.contains(REVIEWS_ID),
        "{line}"
    );
    assert!(
        !server.stdout().contains("/steal"),
        "a refused request must not reach the server"
    );

    // Telemetry: reporter="source" with Istio's labels, and an access-log line.
    let metrics = client.metrics();
    let n = metric_value(
        &metrics,
        "istio_requests_total",
        &[
            "reporter=\"source\"",
            &format!("source_principal=\"{CLIENT_ID}\""),
            "source_workload=\"windows-app\"",
            "source_workload_namespace=\"legacy\"",
            &format!("destination_service=\"{RATINGS}\""),
            "destination_service_name=\"ratings\"",
            "destination_service_namespace=\"default\"",
            &format!("destination_principal=\"{RATINGS_ID}\""),
            "response_code=\"200\"",
        ],
    );
    assert_eq!(n, Some(7.0), "{metrics}");
    assert_eq!(
        metric_value(
            &metrics,
            "istio_requests_total",
            &[
                &format!("destination_principal=\"{RATINGS_ID}\"") as &str,
                "destination_workload_namespace=\"default\"",
            ],
        ),
        Some(7.0),
        "{metrics}"
    );
    // A request that reached no server: the service's namespace is the configured host's,
    // the workload's is `unknown`, as istio_stats.cc takes it only from the server's
    // certificate or metadata (Kiali's "reached no workload" query).
    let refused = metric_value(
        &metrics,
        "istio_requests_total",
        &[
            "reporter=\"source\"",
            "destination_service_name=\"reviews\"",
            "destination_service_namespace=\"default\"",
            "destination_workload_namespace=\"unknown\"",
            "destination_principal=\"unknown\"",
            "response_code=\"503\"",
            "response_flags=\"UF\"",
        ],
    );
    assert_eq!(refused, Some(1.0), "{metrics}");
    // Request and response sizes: the 1 MiB upload, on both sides.
    let ok_200 = [
        &format!("destination_principal=\"{RATINGS_ID}\"") as &str,
        "response_code=\"200\"",
    ];
    let up = metric_value(&metrics, "istio_request_bytes_sum", &ok_200).unwrap_or(0.0);
    assert!(up >= 1048576.0, "{up}\n{metrics}");
    let down = metric_value(&metrics, "istio_response_bytes_sum", &ok_200).unwrap_or(0.0);
    assert!(down > 0.0, "{metrics}");
    let sm = server.metrics();
    let up = metric_value(
        &sm,
        "istio_request_bytes_sum",
        &["reporter=\"destination\""],
    );
    assert!(up >= Some(1048576.0), "{up:?}\n{sm}");
    let log = client.wait_for_log("\"path\":\"/hello?x=1\"");
    let line = log.lines().find(|l| l.contains("/hello?x=1")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(rec["listener"], "ratings");
    assert_eq!(rec["response_code"], 200);
    assert_eq!(rec["destination_principal"], RATINGS_ID);
    assert_eq!(rec["source_principal"], CLIENT_ID);
    assert_eq!(rec["upstream_host"], server.addr("web").to_string());

    // Shutdown: outbound listeners, pooled connections and DNS tasks do not hold the drain.
    let mut client = client;
    assert!(client.terminate().success());
    let log = client.stderr();
    assert!(log.contains("drained: all connections finished"), "{log}");
}

/// What goes on the wire: Istio's SNI and ALPN, the workload certificate; HTTP/2 upstream
/// multiplexes concurrent requests on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_upstream_multiplexes_on_one_connection() {
    let mesh = Mesh::new();
    let certs = mesh.pki.issue("default", "ratings");
    let server = MeshServer::start("ratings", &certs, &mesh).await;
    let client = start_client(
        &mesh,
        &format!(
            "outbound:
  - name: ratings-h1
    listen: 127.0.0.1:0
    host: {RATINGS}
    port: 8080
    endpoints: [\"{s}\"]
    identity: {RATINGS_ID}
  - name: ratings-h2
    listen: 127.0.0.1:0
    host: {RATINGS}
    port: 8080
    protocol: http2
    endpoints: [\"{s}\"]
    identity: {RATINGS_ID}
",
            s = server.addr
        ),
    );
    let h1 = client.outbound("ratings-h1");
    let h2 = client.outbound("ratings-h2");

    let (status, body) = app_get(h1, "/one").await.unwrap();
    assert_eq!(status, 200, "{body}\n{}", client.stderr());
    let v = json(&body);
    assert_eq!(v["sni"], format!("outbound_.8080_._.{RATINGS}"));
    assert_eq!(v["alpn"], "istio-http/1.1");
    assert_eq!(v["peer"], CLIENT_ID);
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["host"], format!("{RATINGS}:8080"));
    // Keep-alive: sequential requests reuse the pooled HTTP/1.1 connection.
    for i in 0..5 {
        let (status, body) = app_get(h1, &format!("/again/{i}")).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(json(&body)["conn"], 1, "{body}");
    }
    // An application speaking HTTP/2 (h2c) to the `http` destination: the destination port's
    // protocol decides, as a sidecar's outbound cluster does (`setUpstreamProtocol`), so the
    // mesh hop is HTTP/1.1 on the same pooled connection.
    let tcp = tokio::net::TcpStream::connect(h1).await.unwrap();
    let mut app = outrigger_testkit::HttpConn::new(tcp, true).await.unwrap();
    let got = app
        .fetch(outrigger_testkit::get("/from-h2-app", true))
        .await
        .unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    let v = json(&got.text());
    assert_eq!(v["version"], "HTTP/1.1", "{v}");
    assert_eq!(v["alpn"], "istio-http/1.1", "{v}");
    assert_eq!(v["conn"], 1, "{v}");
    let before = server.accepted.load(Ordering::SeqCst);
    assert_eq!(before, 1);

    // 16 concurrent slow requests, each on its own application connection.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..16 {
        set.spawn(app_get(h2, "/slow"));
    }
    let mut conns = std::collections::BTreeSet::new();
    while let Some(r) = set.join_next().await {
        let (status, body) = r.unwrap().unwrap();
        assert_eq!(status, 200, "{body}");
        let v = json(&body);
        assert_eq!(v["version"], "HTTP/2.0", "{v}");
        assert_eq!(v["alpn"], "istio-h2", "{v}");
        assert_eq!(v["host"], format!("{RATINGS}:8080"), "{v}");
        conns.insert(v["conn"].as_u64().unwrap());
    }
    assert_eq!(
        conns.len(),
        1,
        "16 concurrent requests should share one HTTP/2 connection, used {conns:?}"
    );
    assert_eq!(server.accepted.load(Ordering::SeqCst), before + 1);
    assert_eq!(server.hits.load(Ordering::SeqCst), 23);
}

/// One of two endpoints dies mid-run: no idempotent request fails (retries go to the other
/// endpoint), the dead one is ejected, and it returns to service once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_dies_mid_run_then_recovers() {
    let mesh = Mesh::new();
    let certs = mesh.pki.issue("default", "ratings");
    let s1 = MeshServer::start("s1", &certs, &mesh).await;
    let s2 = MeshServer::start("s2", &certs, &mesh).await;
    let client = start_client(
        &mesh,
        &format!(
            "outbound:
  - name: ratings
    listen: 127.0.0.1:0
    host: {RATINGS}
    port: 8080
    endpoints: [\"{a}\", \"{b}\"]
    identity: {RATINGS_ID}
    trafficPolicy:
      loadBalancer: {{simple: ROUND_ROBIN}}
      outlierDetection: {{consecutive5xxErrors: 2, baseEjectionTime: 2s, maxEjectionPercent: 50}}
",
            a = s1.addr,
            b = s2.addr
        ),
    );
    let listener = client.outbound("ratings");

    // Both endpoints take traffic.
    for i in 0..10 {
        let (status, body) = app_get(listener, &format!("/warm/{i}")).await.unwrap();
        assert_eq!(status, 200, "{body}\n{}", client.stderr());
    }
    assert!(s1.hits.load(Ordering::SeqCst) > 0 && s2.hits.load(Ordering::SeqCst) > 0);

    // Four workers; s1 dies while they run.
    let failures = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (failures, done) = (failures.clone(), done.clone());
        set.spawn(async move {
            for i in 0..40 {
                match app_get(listener, &format!("/run/{w}/{i}")).await {
                    Ok((200, _)) => {}
                    Ok((s, b)) => failures.lock().unwrap().push(format!("{s}: {b}")),
                    Err(e) => failures.lock().unwrap().push(format!("{e:#}")),
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let deadline = Instant::now() + WAIT;
    while done.load(Ordering::SeqCst) < 30 {
        assert!(Instant::now() < deadline, "workers stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s1_addr = s1.addr;
    // A request s1 was already reading when it was killed may still be counted: count from
    // once its tasks have stopped.
    s1.kill_and_wait().await;
    let s1_hits_at_kill = s1.hits.load(Ordering::SeqCst);
    while set.join_next().await.is_some() {}
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} idempotent requests failed: {failures:?}\n{}",
        failures.len(),
        client.stderr()
    );
    assert_eq!(s1.hits.load(Ordering::SeqCst), s1_hits_at_kill);
    client.wait_for_log("outlier detection: endpoint ejected");

    // s1 comes back on the same address; after the ejection time it takes traffic again.
    let s1b = MeshServer::start_at("s1-again", &certs, &mesh, s1_addr).await;
    let deadline = Instant::now() + WAIT;
    while s1b.hits.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the recovered endpoint never took traffic again\n{}",
            client.stderr()
        );
        let (status, body) = app_get(listener, "/after").await.unwrap();
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.wait_for_log("endpoint returned to service");
}

/// Opaque TCP: the client agent's `tcp` outbound to the server agent's `tcp` inbound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_outbound_to_outrigger_inbound() {
    let mesh = Mesh::new();
    let echo = start_tcp_echo().await;
    let (server, _) = start_server_agent(&mesh, "ratings", echo, "tcp");
    let client = start_client(
        &mesh,
        &format!(
            "outbound:
  - name: db
    listen: 127.0.0.1:0
    host: {RATINGS}
    port: 5432
    protocol: tcp
    endpoints: [\"{s}\"]
    identity: {RATINGS_ID}
  - name: down
    listen: 127.0.0.1:0
    host: {REVIEWS}
    port: 5432
    protocol: tcp
    endpoints: [\"127.0.0.1:{closed}\"]
    identity: {REVIEWS_ID}
",
            s = server.addr("web"),
            closed = free_port(),
        ),
    );
    let addr = client.outbound("db");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .unwrap_or_else(|_| panic!("no echo in time\n{}", client.stderr()))
        .unwrap();
    assert_eq!(back, payload);
    drop(s);
    // The server agent saw our identity on a TCP connection.
    let deadline = Instant::now() + WAIT;
    loop {
        let m = client.metrics();
        let closed = metric_value(
            &m,
            "istio_tcp_connections_closed_total",
            &[
                "reporter=\"source\"",
                &format!("destination_principal=\"{RATINGS_ID}\""),
                // From the server's certificate (istio_stats.cc `getNamespace(peer_san)`).
                "destination_workload_namespace=\"default\"",
            ],
        );
        let sent = metric_value(
            &m,
            "istio_tcp_received_bytes_total",
            &["reporter=\"source\""],
        );
        if closed == Some(1.0) && sent == Some(100_000.0) {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A connection that reached no server (`UF`): the workload's namespace is `unknown`,
    // the service's the configured host's.
    let mut s = TcpStream::connect(client.outbound("down")).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    client.wait_metric(
        "istio_tcp_connections_closed_total",
        &[
            "reporter=\"source\"",
            "destination_service_name=\"reviews\"",
            "destination_service_namespace=\"default\"",
            "destination_workload_namespace=\"unknown\"",
            "destination_principal=\"unknown\"",
            "response_flags=\"UF\"",
        ],
        1.0,
    );
    let sm = server.metrics();
    assert!(
        metric_value(
            &sm,
            "istio_tcp_connections_opened_total",
            &[&format!("source_principal=\"{CLIENT_ID}\"")]
        )
        .is_some(),
        "{sm}"
    );
}

/// HTTP proxy mode: one listener, the Host picks the mesh service; unknown hosts get a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_mode_routes_two_services_by_host() {
    let mesh = Mesh::new();
    let ratings = MeshServer::start("ratings", &mesh.pki.issue("default", "ratings"), &mesh).await;
    let reviews = MeshServer::start("reviews", &mesh.pki.issue("default", "reviews"), &mesh).await;
    let client = start_client(
        &mesh,
        &format!(
            "outbound:
  - name: ratings
    host: {RATINGS}
    port: 8080
    endpoints: [\"{a}\"]
    identity: {RATINGS_ID}
  - name: reviews
    host: {REVIEWS}
    port: 9080
    endpoints: [\"localhost:{b}\"]
    dnsRefreshRate: 1s
    identity: {{serviceAccount: reviews}}
outboundProxy:
  listen: 127.0.0.1:0
",
            a = ratings.addr,
            // A DNS name: resolved at start and re-resolved every second.
            b = reviews.addr.port()
        ),
    );
    let proxy = client.outbound("http-proxy");
    let mut cases = BTreeMap::new();
    cases.insert("http://ratings.default.svc.cluster.local:8080/r", "ratings");
    cases.insert("http://reviews.default.svc.cluster.local:9080/v", "reviews");
    // Kubernetes short names, as an app inside the namespace writes them.
    cases.insert("http://reviews:9080/short", "reviews");
    cases.insert("http://ratings.default/no-port", "ratings");
    for (url, server) in cases {
        let (status, body) = app_get(proxy, url).await.unwrap();
        assert_eq!(status, 200, "{url}: {body}\n{}", client.stderr());
        let v = json(&body);
        assert_eq!(v["server"], server, "{url}: {v}");
        assert_eq!(v["peer"], CLIENT_ID);
        assert!(
            v["sni"]
                .as_str()
                .unwrap()
                .ends_with(&format!("_.{server}.default.svc.cluster.local")),
            "{v}"
        );
    }
    let (status, body) = app_get(proxy, "http://example.com/").await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("example.com") && body.contains("allowPlainEgress") && body.contains(RATINGS),
        "{body}"
    );
    // A Kubernetes name that is not a configured service is refused the same way.
    let (status, _) = app_get(proxy, "http://details.other.svc.cluster.local:9080/d")
        .await
        .unwrap();
    assert_eq!(status, 502);
    assert_eq!(ratings.hits.load(Ordering::SeqCst), 2);
    assert_eq!(reviews.hits.load(Ordering::SeqCst), 2);
    // A sidecar under REGISTRY_ONLY answers these from its `block_all` route, a direct 502
    // with no response flag, which istio_stats.cc labels `BlackHoleCluster` with the `Host`
    // as `destination_service` and nothing about a server it never reached — not even the
    // namespace in a Kubernetes name (istio/proxy istio_stats.cc `populatePeerInfo`).
    for (host, n) in [
        ("example.com", 1.0),
        ("details.other.svc.cluster.local:9080", 1.0),
    ] {
        client.wait_metric(
            "istio_requests_total",
            &[
                "reporter=\"source\"",
                &format!("destination_service=\"{host}\""),
                "destination_service_name=\"BlackHoleCluster\"",
                "destination_service_namespace=\"unknown\"",
                "destination_workload=\"unknown\"",
                "destination_workload_namespace=\"unknown\"",
                "destination_principal=\"unknown\"",
                "response_code=\"502\"",
                "response_flags=\"-\"",
            ],
            n,
        );
    }
    // The mesh services keep their own names, and the namespace of the certificate.
    client.wait_metric(
        "istio_requests_total",
        &[
            "destination_service_name=\"reviews\"",
            "destination_service_namespace=\"default\"",
            "destination_workload_namespace=\"default\"",
            "response_code=\"200\"",
        ],
        2.0,
    );
}

/// With `allowPlainEgress`, a host outside the mesh is reached in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_plain_egress_when_allowed() {
    let mesh = Mesh::new();
    let outside = start_echo().await;
    let ratings = MeshServer::start("ratings", &mesh.pki.issue("default", "ratings"), &mesh).await;
    let client = start_client(
        &mesh,
        &format!(
            "outbound:
  - name: ratings
    host: {RATINGS}
    port: 8080
    endpoints: [\"{a}\"]
    identity: {RATINGS_ID}
outboundProxy:
  listen: 127.0.0.1:0
  allowPlainEgress: true
",
            a = ratings.addr
        ),
    );
    let proxy = client.outbound("http-proxy");
    let (status, body) = app_get(proxy, &format!("http://{outside}/plain"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}\n{}", client.stderr());
    let seen: outrigger_testkit::Seen = serde_json::from_str(&body).unwrap();
    assert_eq!(seen.path, "/plain");
    assert_eq!(seen.header("host"), Some(&*outside.to_string()));
    let (status, _) = app_get(proxy, "http://ratings:8080/mesh").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(ratings.hits.load(Ordering::SeqCst), 1);
    // A sidecar under ALLOW_ANY sends it by its `allow_any` route to `PassthroughCluster`,
    // which istio_stats.cc names as the service, with the `Host` as `destination_service`
    // and no server identity (plaintext: no certificate, no metadata).
    client.wait_metric(
        "istio_requests_total",
        &[
            "reporter=\"source\"",
            &format!("destination_service=\"{outside}\""),
            "destination_service_name=\"PassthroughCluster\"",
            "destination_service_namespace=\"unknown\"",
            "destination_workload=\"unknown\"",
            "destination_workload_namespace=\"unknown\"",
            "destination_principal=\"unknown\"",
            "response_code=\"200\"",
            "response_flags=\"-\"",
        ],
        1.0,
    );
}

/// The workload's own canonical service and revision as istiod derives them from its labels
/// (istio/istio `pkg/kube/labels/labels.go`, `CanonicalService`): Kubernetes' recommended
/// `app.kubernetes.io/name` and `app.kubernetes.io/version` when there is no
/// `service.istio.io/canonical-*` label, ahead of `app` and `version`; `*_app` and
/// `*_version` stay the `app` and `version` labels (istio_stats.cc `Context`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canonical_service_from_kubernetes_recommended_labels() {
    let mesh = Mesh::new();
    let dir = mesh.dir().join("client");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = agent_yaml(
        &mesh,
        &mesh.agent.dir,
        common::AGENT_NS,
        common::AGENT_SA,
        "  []\n",
        &format!(
            "outbound:
  - name: ratings
    listen: 127.0.0.1:0
    host: {RATINGS}
    port: 8080
    endpoints: [\"127.0.0.1:{closed}\"]
    identity: {RATINGS_ID}
outboundProxy:
  listen: 127.0.0.1:0
",
            closed = free_port()
        ),
    );
    let labels = format!("labels: {{app: {}, version: v1}}", common::AGENT_SA);
    assert!(cfg.contains(&labels), "{cfg}");
    let cfg = cfg.replace(
        &labels,
        "labels: {app.kubernetes.io/name: billing, app.kubernetes.io/version: v2, version: v1}",
    );
    let client = AgentProc::start(&dir, &cfg);
    let (status, _) = app_get(client.outbound("http-proxy"), "http://example.com/")
        .await
        .unwrap();
    assert_eq!(status, 502);
    client.wait_metric(
        "istio_requests_total",
        &[
            "reporter=\"source\"",
            "source_canonical_service=\"billing\"",
            "source_canonical_revision=\"v2\"",
            "source_app=\"unknown\"",
            "source_version=\"v1\"",
            "destination_service_name=\"BlackHoleCluster\"",
        ],
        1.0,
    );
}

/// `connectTimeout` bounds the TCP connect and the mTLS handshake (a server that accepts but
/// never answers is skipped for another endpoint); `timeout` bounds the request (504).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_request_timeouts() {
    let mesh = Mesh::new();
    let good = MeshServer::start("good", &mesh.pki.issue("default", "ratings"), &mesh).await;
    // Accepts TCP connections and never says a word.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    let silent_task = tokio::spawn(async move {
        while let Ok((s, _)) = silent.accept().await {
            h.lock().unwrap().push(s);
        }
    });
    let client = start_client(
        &mesh,
        &format!(
            "outbound:
  - name: mixed
    listen: 127.0.0.1:0
    host: {RATINGS}
    port: 8080
    endpoints: [\"{silent_addr}\", \"{g}\"]
    identity: {RATINGS_ID}
    trafficPolicy:
      loadBalancer: {{simple: ROUND_ROBIN}}
      connectionPool: {{tcp: {{connectTimeout: 300ms}}}}
  - name: only-silent
    listen: 127.0.0.1:0
    host: {RATINGS}
    port: 8080
    endpoints: [\"{silent_addr}\"]
    identity: {RATINGS_ID}
    retries: {{attempts: 0}}
    trafficPolicy:
      connectionPool: {{tcp: {{connectTimeout: 300ms}}}}
  - name: impatient
    listen: 127.0.0.1:0
    host: {RATINGS}
    port: 8080
    endpoints: [\"{g}\"]
    identity: {RATINGS_ID}
    timeout: 1s
",
            g = good.addr
        ),
    );
    for i in 0..4 {
        let started = Instant::now();
        let (status, body) = app_get(client.outbound("mixed"), &format!("/mixed/{i}"))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}\n{}", client.stderr());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    let started = Instant::now();
    let (status, body) = app_get(client.outbound("only-silent"), "/never")
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("timed out"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "connectTimeout 300ms took {:?}",
        started.elapsed()
    );
    // The request timeout is generous (1 s) so that a loaded machine never trips it on the
    // fast request; the slow one takes 3 s.
    let (status, body) = app_get(client.outbound("impatient"), "/slow?ms=3000")
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (504, "upstream request timeout"));
    let (status, _) = app_get(client.outbound("impatient"), "/fast")
        .await
        .unwrap();
    assert_eq!(status, 200);
    silent_task.abort();
}

/// `transport: hbone`: the client agent's outbound listeners reach a server agent through its
/// HBONE listener (HTTP/2 CONNECT streams over one pooled mTLS connection), as an ambient
/// workload reaches another: HTTP/1.1, HTTP/2 and TCP inside; the server applies its policy
/// per stream (L7 for HTTP, L4 for TCP, answered `401`), the server identity is pinned, and
/// both sides report metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_transport_to_an_outrigger_hbone_listener() {
    let mesh = Mesh::new();
    let (db_port, vault_port) = (free_port(), free_port());
    // HTTP paths for `web`, and L4 access to `db` only (`vault` matches no rule: denied).
    // Istio: an ALLOW rule with HTTP fields cannot match TCP, hence the port rule.
    mesh.policy(
        "allow.yaml",
        &format!(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-some, namespace: default}}
spec:
  rules:
  - to: [{{operation: {{paths: [\"/hello\", \"/again/*\", \"/h2\"]}}}}]
  - to: [{{operation: {{ports: [\"{db_port}\"]}}}}]
"
        ),
    );
    let echo = start_echo().await;
    let tcp_echo = start_tcp_echo().await;
    let issued = mesh.pki.issue("default", "ratings");
    let dir = mesh.dir().join("server-ratings");
    std::fs::create_dir_all(&dir).unwrap();
    let inbound = format!(
        "  - {{name: web, listen: \"127.0.0.1:0\", backend: \"{echo}\", protocol: auto}}
  - {{name: db, listen: \"127.0.0.1:{db_port}\", backend: \"{tcp_echo}\", protocol: tcp}}
  - {{name: vault, listen: \"127.0.0.1:{vault_port}\", backend: \"{tcp_echo}\", protocol: tcp}}
"
    );
    let hbone_cfg = "hbone:\n  listen: 127.0.0.1:0\n";
    let server = AgentProc::start(
        &dir,
        &agent_yaml(
            &mesh,
            &issued.dir,
            "default",
            "ratings",
            &inbound,
            hbone_cfg,
        ),
    );
    let peer = server.hbone_addr();
    let dest = |name: &str, proto: &str, endpoint: SocketAddr, id: &str| {
        format!(
            "  - name: {name}
    listen: 127.0.0.1:0
    host: {RATINGS}
    port: 8080
    protocol: {proto}
    endpoints: [\"{endpoint}\"]
    transport: hbone
    hbonePeer: \"{peer}\"
    identity: {id}
"
        )
    };
    let (web, db, vault) = (server.addr("web"), server.addr("db"), server.addr("vault"));
    let outbound = format!(
        "outbound:\n{}{}{}{}{}",
        dest("ratings", "http", web, RATINGS_ID),
        dest("ratings-h2", "http2", web, RATINGS_ID),
        dest("db", "tcp", db, RATINGS_ID),
        dest("vault", "tcp", vault, RATINGS_ID),
        dest("impostor", "http", web, REVIEWS_ID),
    );
    let client = start_client(&mesh, &outbound);
    let names = ["ratings", "ratings-h2", "db", "vault", "impostor"];
    let at = |i: usize| client.outbound(names[i]);

    // HTTP/1.1 inside HBONE: the server agent verified the outer peer and tells the app.
    let (status, body) = app_get(at(0), "/hello").await.unwrap();
    assert_eq!(status, 200, "{body}\n{}", client.stderr());
    let seen: outrigger_testkit::Seen = serde_json::from_str(&body).unwrap();
    assert_eq!(seen.path, "/hello");
    let xfcc = seen.header("x-forwarded-client-cert").unwrap_or_default();
    assert!(xfcc.contains(&format!("URI={CLIENT_ID}")), "{xfcc}");
    assert_eq!(seen.header("host"), Some(&*format!("{RATINGS}:8080")));
    for i in 0..5 {
        let (status, _) = app_get(at(0), &format!("/again/{i}")).await.unwrap();
        assert_eq!(status, 200);
    }
    // L7 policy per request inside the tunnel (no ALLOW rule matches /admin).
    let (status, body) = app_get(at(0), "/admin").await.unwrap();
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));

    // HTTP/2 inside HBONE (prior knowledge on the stream). The server's `web` listener is
    // `auto`: a non-gRPC request reaches its application as HTTP/1.1 (docs/config.md,
    // "Protocols").
    let (status, body) = app_get(at(1), "/h2").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let seen: outrigger_testkit::Seen = serde_json::from_str(&body).unwrap();
    assert_eq!(seen.version, "HTTP/1.1");

    // TCP inside HBONE.
    let mut s = TcpStream::connect(at(2)).await.unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    s.write_all(&payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .unwrap_or_else(|_| panic!("no echo in time\n{}", client.stderr()))
        .unwrap();
    assert!(back == payload, "the TCP echo came back altered");
    drop(s);

    // L4 denial: the server answers the CONNECT 401; the app's connection closes unanswered.
    let mut s = TcpStream::connect(at(3)).await.unwrap();
    let _ = s.write_all(b"secret?").await;
    let mut buf = Vec::new();
    let r = tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("the denied connection was closed");
    assert!(r.is_err() || buf.is_empty(), "{buf:?}");
    client.wait_for_log("answered CONNECT");
    assert!(client.stderr().contains("401"), "{}", client.stderr());

    // The wrong identity: refused at the HBONE handshake, 503 naming both identities.
    let (status, body) = app_get(at(4), "/steal").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(RATINGS_ID) && body.contains(REVIEWS_ID),
        "{body}"
    );
    client.wait_for_log("server identity refused");

    // reporter="source" on the client, the peer's identity as destination_principal, and
    // (as ztunnel reports HBONE) connection_security_policy="mutual_tls".
    let m = client.metrics();
    let ok = metric_value(
        &m,
        "istio_requests_total",
        &[
            "reporter=\"source\"",
            "connection_security_policy=\"mutual_tls\"",
            &format!("destination_principal=\"{RATINGS_ID}\""),
            &format!("destination_service=\"{RATINGS}\""),
            "response_code=\"200\"",
        ],
    );
    assert_eq!(ok, Some(7.0), "{m}");
    let deadline = Instant::now() + WAIT;
    loop {
        let m = client.metrics();
        let closed = metric_value(
            &m,
            "istio_tcp_connections_closed_total",
            &[
                "reporter=\"source\"",
                &format!("destination_principal=\"{RATINGS_ID}\""),
            ],
        );
        if closed >= Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // /config_dump shows each destination's transport, HBONE peer and endpoint state.
    let dump = client.admin_get("/config_dump");
    let dump: serde_json::Value =
        serde_json::from_str(dump.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let db = dump["outbound"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "db")
        .unwrap_or_else(|| panic!("{dump:#}"));
    assert_eq!(db["transport"], "hbone");
    assert_eq!(db["hbone_peer"], peer.to_string());
    assert_eq!(db["protocol"], "tcp");
    assert_eq!(db["expected_identities"][0], RATINGS_ID);
    assert_eq!(db["endpoints"][0]["address"], server.addr("db").to_string());
    assert_eq!(db["endpoints"][0]["ejected"], false);
    assert!(db["sni"].is_null(), "{db:#}");
    let sdump = server.admin_get("/config_dump");
    assert!(
        sdump.contains(&format!("\"listen\": \"{peer}\"")),
        "{sdump}"
    );

    // The server saw every stream as mutual TLS from the client, with its baggage.
    let sm = server.metrics();
    let opened = metric_value(
        &sm,
        "istio_tcp_connections_opened_total",
        &[
            &format!("source_principal=\"{CLIENT_ID}\""),
            "source_workload=\"windows-app\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
    );
    assert!(opened >= Some(3.0), "{opened:?}\n{sm}");
}

// ---------------------------------------------------------------------------------------------
// gRPC message counts

/// The complete messages of a gRPC body.
fn grpc_messages(body: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = body;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        if rest.len() < 5 + len {
            break;
        }
        out.push(rest[5..5 + len].to_vec());
        rest = &rest[5 + len..];
    }
    out
}

/// `stream` cut into chunks of 1, 4, 9, 50, 1, 4, … bytes: messages split across chunks,
/// prefixes cut in two, chunks holding the end of one message and the start of the next.
fn awkward_chunks(stream: &[u8]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut rest = stream;
    for size in [1usize, 4, 9, 50].into_iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let n = size.min(rest.len());
        out.push(Bytes::copy_from_slice(&rest[..n]));
        rest = &rest[n..];
    }
    out
}

/// A gRPC application (h2c): reads a request's body to its end, then answers `x-replies`
/// messages in awkward chunks, with the request's content type, and — to a gRPC request — the
/// trailers `grpc-status: 0` and `x-request-messages: <the messages it read>` (gRPC-Web
/// carries its trailers in the body: none).
async fn start_grpc_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<Incoming>| async move {
                    let replies: usize = req
                        .headers()
                        .get("x-replies")
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                        .unwrap_or(0);
                    let content_type = req.headers().get("content-type").cloned();
                    let body = req.into_body().collect().await?.to_bytes();
                    let read = grpc_messages(&body).len();
                    let stream: Vec<u8> = (0..replies)
                        .flat_map(|i| common::grpc_message(&vec![i as u8; 100 * i]))
                        .collect();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    trailers.insert("x-request-messages", read.to_string().parse().unwrap());
                    let grpc = content_type
                        .as_ref()
                        .is_some_and(|c| c == "application/grpc");
                    let frames = awkward_chunks(&stream)
                        .into_iter()
                        .map(hyper::body::Frame::data)
                        .chain(grpc.then(|| hyper::body::Frame::trailers(trailers)))
                        .map(Ok::<_, std::convert::Infallible>);
                    let mut resp = http::Response::new(http_body_util::StreamBody::new(
                        futures_util::stream::iter(frames),
                    ));
                    if let Some(ct) = content_type {
                        resp.headers_mut().insert("content-type", ct);
                    }
                    Ok::<_, hyper::Error>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// What one call through the client agent's outbound got back: the status, the response's
/// messages and its trailers.
struct Call {
    status: u16,
    messages: Vec<Vec<u8>>,
    trailers: http::HeaderMap,
}

/// One streaming call from the application (h2c) through `outbound`: `messages` sent in
/// awkward chunks, one after the other on the open stream, `replies` asked for.
async fn grpc_call(
    outbound: SocketAddr,
    content_type: &str,
    messages: &[Vec<u8>],
    replies: usize,
) -> Call {
    tokio::time::timeout(WAIT, async {
        let tcp = TcpStream::connect(outbound).await.unwrap();
        let mut app = outrigger_testkit::HttpConn::new(tcp, true).await.unwrap();
        let (tx, body) = outrigger_testkit::channel_body();
        let req = http::Request::post(format!("http://{RATINGS}:8080/pkg.Ratings/Stream"))
            .header("content-type", content_type)
            .header("te", "trailers")
            .header("x-replies", replies.to_string())
            .body(body)
            .unwrap();
        let stream: Vec<u8> = messages
            .iter()
            .flat_map(|m| common::grpc_message(m))
            .collect();
        let send = async move {
            for chunk in awkward_chunks(&stream) {
                tx.send(Ok(hyper::body::Frame::data(chunk))).await.unwrap();
            }
        };
        let (resp, ()) = tokio::join!(app.send(req), send);
        let resp = resp.unwrap();
        let status = resp.status().as_u16();
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        Call {
            status,
            messages: grpc_messages(&collected.to_bytes()),
            trailers,
        }
    })
    .await
    .expect("the call ends")
}

/// The labels of `istio_requests_total` that Istio's message counters do not carry
/// (istio_stats.cc `log` adds them after `reportHelper` has reported the messages).
const NOT_ON_MESSAGES: [&str; 5] = [
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// Istio's gRPC message counters on both reporters of one call (istio_stats.cc
/// `reportHelper`, counting as Envoy's `grpc_stats` filter counts, crate::grpc_stats in
/// outrigger-proxy): an application streams 5 messages (one empty) to a mesh service through
/// its agent's outbound, cut across HTTP/2 DATA frames at awkward places, and the service
/// answers 3; the client agent (`reporter="source"`) and the server's agent
/// (`reporter="destination"`) each write `istio_request_messages_total` 5 and
/// `istio_response_messages_total` 3, labelled as the call's `istio_requests_total` series
/// without `request_protocol`, `response_code`, `grpc_response_status`, `response_flags` and
/// `connection_security_policy` — the label set of istio/proxy
/// `testdata/metric/client_request_messages.yaml.tmpl` and the server's. A plain HTTP request
/// and a gRPC-Web one (framed the same, but not gRPC to Envoy's `hasGrpcContentType`) make no
/// series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_messages_are_counted_on_both_reporters() {
    let mesh = Mesh::new();
    let app = start_grpc_app().await;
    let (server, _) = start_server_agent(&mesh, "ratings", app, "grpc");
    let client = start_client(
        &mesh,
        &format!(
            "outbound:
  - name: ratings
    listen: 127.0.0.1:0
    host: {RATINGS}
    port: 8080
    protocol: grpc
    endpoints: [\"{s}\"]
    identity: {{serviceAccount: ratings}}
",
            s = server.addr("web")
        ),
    );
    let outbound = client.outbound("ratings");
    let sent: Vec<Vec<u8>> = [0usize, 3, 70, 1, 300]
        .iter()
        .map(|&n| vec![b'm'; n])
        .collect();
    let call = grpc_call(outbound, "application/grpc", &sent, 3).await;
    assert_eq!(call.status, 200, "{}", client.stderr());
    assert_eq!(call.trailers["grpc-status"], "0");
    assert_eq!(call.trailers["x-request-messages"], "5");
    assert_eq!(call.messages.len(), 3);

    // Not gRPC: no message series.
    let web = grpc_call(outbound, "application/grpc-web+proto", &sent, 2).await;
    assert_eq!((web.status, web.messages.len()), (200, 2));
    let (status, _) = app_get(outbound, "/plain").await.unwrap();
    assert_eq!(status, 200);

    for (agent, reporter, peer) in [
        (&client, "source", "destination_principal"),
        (&server, "destination", "source_principal"),
    ] {
        let needle = format!("reporter=\"{reporter}\"");
        agent.wait_metric("istio_requests_total", &[&needle], 3.0);
        agent.wait_metric("istio_request_messages_total", &[], 5.0);
        let m = agent.wait_metric("istio_response_messages_total", &[], 3.0);
        let requests = common::metric_series(&m, "istio_requests_total");
        let grpc: Vec<_> = requests
            .iter()
            .filter(|(l, _)| l["request_protocol"] == "grpc")
            .collect();
        assert_eq!(grpc.len(), 1, "{m}");
        let mut expected = grpc[0].0.clone();
        for l in NOT_ON_MESSAGES {
            expected.remove(l);
        }
        assert_eq!(expected["reporter"], reporter);
        assert_eq!(expected["source_workload"], "windows-app", "{m}");
        assert_eq!(expected["destination_workload"], "ratings", "{m}");
        let principal = if reporter == "source" {
            RATINGS_ID
        } else {
            CLIENT_ID
        };
        assert_eq!(expected[peer], principal, "{m}");
        for (name, want) in [
            ("istio_request_messages_total", 5.0),
            ("istio_response_messages_total", 3.0),
        ] {
            assert_eq!(
                common::metric_series(&m, name),
                vec![(expected.clone(), want)],
                "{reporter}: {name}\n{m}"
            );
        }
    }
}
