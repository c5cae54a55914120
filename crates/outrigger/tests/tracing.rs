//! Distributed tracing through the real binary (docs/tracing.md): the trace context and
//! `x-request-id` the application receives, as an Istio sidecar's Envoy sends them, and the
//! spans an OTLP collector written here receives over OTLP/gRPC and OTLP/HTTP (protobuf).

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrigger_proxy::otlp;
use prost::Message;
use tokio::net::TcpListener;

use common::*;
use outrigger_testkit::*;

/// One export request the collector received.
#[derive(Debug, Clone)]
struct Export {
    path: String,
    content_type: String,
    req: otlp::ExportTraceServiceRequest,
}

/// An OTLP collector on 127.0.0.1: OTLP/HTTP (`POST /v1/traces`, protobuf) over HTTP/1.1 and
/// OTLP/gRPC (`TraceService/Export`) over h2c, both decoded with the OTLP messages and kept.
/// `delay`: how long it waits before answering (a slow collector).
async fn start_collector(delay: Duration) -> (SocketAddr, Arc<Mutex<Vec<Export>>>) {
    start_collector_with(delay, None).await
}

/// The same collector, over TLS when `tls` is given (it serves what the client's ALPN
/// negotiated: `h2` or HTTP/1.1).
async fn start_collector_with(
    delay: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (SocketAddr, Arc<Mutex<Vec<Export>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let store = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let store = store.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let content_type = req
                                .headers()
                                .get("content-type")
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_default();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let grpc = content_type.starts_with("application/grpc");
                            let msg = if grpc {
                                assert_eq!(body[0], 0, "uncompressed gRPC frame");
                                let len =
                                    u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
                                assert_eq!(len, body.len() - 5);
                                body.slice(5..)
                            } else {
                                body
                            };
                            let decoded = otlp::ExportTraceServiceRequest::decode(msg).unwrap();
                            tokio::time::sleep(delay).await;
                            store.lock().unwrap().push(Export {
                                path,
                                content_type: content_type.clone(),
                                req: decoded,
                            });
                            let answer =
                                otlp::ExportTraceServiceResponse::default().encode_to_vec();
                            let mut frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
                                Vec::new();
                            let mut resp = hyper::Response::builder();
                            if grpc {
                                let mut framed = vec![0u8];
                                framed.extend_from_slice(&(answer.len() as u32).to_be_bytes());
                                framed.extend_from_slice(&answer);
                                frames.push(Ok(Frame::data(Bytes::from(framed))));
                                let mut t = http::HeaderMap::new();
                                t.insert("grpc-status", "0".parse().unwrap());
                                frames.push(Ok(Frame::trailers(t)));
                                resp = resp.header("content-type", "application/grpc");
                            } else {
                                frames.push(Ok(Frame::data(Bytes::from(answer))));
                                resp = resp.header("content-type", "application/x-protobuf");
                            }
                            let body =
                                http_body_util::StreamBody::new(futures_util::stream::iter(frames));
                            Ok::<_, std::convert::Infallible>(resp.body(body).unwrap())
                        }
                    },
                );
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    Some(acceptor) => {
                        let Ok(t) = acceptor.accept(s).await else {
                            return;
                        };
                        let _ = builder.serve_connection(TokioIo::new(t), svc).await;
                    }
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                    }
                }
            });
        }
    });
    (addr, got)
}

/// Every span the collector has, with the resource's `service.name`.
fn spans(got: &Arc<Mutex<Vec<Export>>>) -> Vec<(String, otlp::Span)> {
    let mut out = Vec::new();
    for e in got.lock().unwrap().iter() {
        for rs in &e.req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.as_str())
                .unwrap_or_default()
                .to_string();
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    out.push((service.clone(), s.clone()));
                }
            }
        }
    }
    out
}

async fn wait_for_span(got: &Arc<Mutex<Vec<Export>>>, trace_id: &str) -> (String, otlp::Span) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = spans(got)
            .into_iter()
            .find(|(_, s)| hex::encode(&s.trace_id) == trace_id)
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no span of trace {trace_id} reached the collector"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn attr<'a>(s: &'a otlp::Span, key: &str) -> Option<&'a str> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.as_str())
}

/// `00-<trace>-<span>-<flags>` split into its fields.
fn traceparent(v: &str) -> (String, String, String) {
    let f: Vec<&str> = v.split('-').collect();
    assert_eq!(f.len(), 4, "{v}");
    assert_eq!(f[0], "00");
    assert_eq!((f[1].len(), f[2].len(), f[3].len()), (32, 16, 2), "{v}");
    (f[1].to_string(), f[2].to_string(), f[3].to_string())
}

const TP_IN: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// OTLP/gRPC, sampling 100%: a request without a context starts a trace; one with a
/// `traceparent` continues it. The application sees what Envoy's OpenTelemetry tracer sends
/// (`traceparent` with our span as the parent, `tracestate` kept) plus B3, and the request id
/// marked traced (`'9'` at position 14, as Envoy's UUID request id extension marks it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_grpc_collector_and_the_context_reaches_the_app() {
    let (collector, got) = start_collector(Duration::ZERO).await;
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let backend = start_echo().await;
    let extra = format!(
        "tracing:
  sampling: 100
  resourceAttributes:
    deployment.environment: test
  opentelemetry:
    service: 127.0.0.1
    port: {}
    grpc:
      timeout: 5s
",
        collector.port()
    );
    let agent = AgentProc::start(
        mesh.dir(),
        &mesh.config(&[("web", backend, "http")], &extra),
    );
    let sleep = mesh.pki.issue("default", "sleep");
    let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;

    // No context: a new trace.
    let seen = c.fetch(get("/new?x=1", false)).await.unwrap().seen();
    let (trace, span_id, flags) = traceparent(seen.header("traceparent").unwrap());
    assert_eq!(flags, "01");
    assert_eq!(seen.header("x-b3-traceid"), Some(trace.as_str()));
    assert_eq!(seen.header("x-b3-spanid"), Some(span_id.as_str()));
    assert_eq!(seen.header("x-b3-sampled"), Some("1"));
    assert_eq!(seen.header("x-b3-parentspanid"), None);
    let rid = seen.header("x-request-id").unwrap().to_string();
    assert_eq!(rid.as_bytes()[14], b'9', "request id marked sampled: {rid}");

    let (service, span) = wait_for_span(&got, &trace).await;
    assert_eq!(service, "windows-app.legacy");
    assert_eq!(hex::encode(&span.span_id), span_id);
    assert!(span.parent_span_id.is_empty());
    assert_eq!(span.kind, otlp::span_kind::SERVER);
    let port = agent.addr("web").port();
    assert_eq!(
        span.name,
        format!("windows-app.legacy.svc.cluster.local:{port}/*")
    );
    assert_eq!(attr(&span, "http.method"), Some("GET"));
    assert_eq!(
        attr(&span, "http.url"),
        Some("http://outrigger.test/new?x=1")
    );
    assert_eq!(attr(&span, "http.status_code"), Some("200"));
    assert_eq!(attr(&span, "http.protocol"), Some("HTTP/1.1"));
    assert_eq!(attr(&span, "guid:x-request-id"), Some(rid.as_str()));
    assert_eq!(attr(&span, "component"), Some("proxy"));
    assert_eq!(attr(&span, "response_flags"), Some("-"));
    assert_eq!(
        attr(&span, "upstream_cluster"),
        Some(format!("inbound|{port}||").as_str())
    );
    assert_eq!(attr(&span, "istio.namespace"), Some("legacy"));
    assert_eq!(attr(&span, "istio.canonical_service"), Some("windows-app"));
    assert_eq!(attr(&span, "istio.mesh_id"), Some("cluster.local"));
    assert!(
        attr(&span, "node_id")
            .unwrap()
            .starts_with("sidecar~127.0.0.1~")
    );
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
    assert!(span.start_time_unix_nano > 0);
    {
        let g = got.lock().unwrap();
        assert_eq!(g[0].path, otlp::GRPC_EXPORT_PATH);
        assert!(g[0].content_type.starts_with("application/grpc"));
        let res = g[0].req.resource_spans[0].resource.as_ref().unwrap();
        assert!(
            res.attributes
                .iter()
                .any(|a| a.key == "deployment.environment" && a.as_str() == Some("test"))
        );
    }
    // The access log line carries the trace id.
    agent.wait_for_log(&format!("\"trace_id\":\"{trace}\""));

    // A caller's context: the trace goes on, its span is the parent, tracestate is kept.
    let mut req = get("/continued", false);
    req.headers_mut()
        .insert("traceparent", TP_IN.parse().unwrap());
    req.headers_mut()
        .insert("tracestate", "vendor=abc".parse().unwrap());
    let seen = c.fetch(req).await.unwrap().seen();
    let (t2, s2, f2) = traceparent(seen.header("traceparent").unwrap());
    assert_eq!(t2, "0af7651916cd43dd8448eb211c80319c");
    assert_ne!(s2, "b7ad6b7169203331");
    assert_eq!(f2, "01");
    assert_eq!(seen.header("tracestate"), Some("vendor=abc"));
    assert_eq!(seen.header("x-b3-parentspanid"), Some("b7ad6b7169203331"));
    let (_, span) = wait_for_span(&got, &t2).await;
    assert_eq!(hex::encode(&span.parent_span_id), "b7ad6b7169203331");
    assert_eq!(hex::encode(&span.span_id), s2);
    assert_eq!(span.trace_state, "vendor=abc");

    // A B3-only caller: its trace goes on as well.
    let mut req = get("/b3", false);
    req.headers_mut().insert(
        "x-b3-traceid",
        "80f198ee56343ba864fe8b2a57d3eff7".parse().unwrap(),
    );
    req.headers_mut()
        .insert("x-b3-spanid", "e457b5a2e4d86bd1".parse().unwrap());
    req.headers_mut()
        .insert("x-b3-sampled", "1".parse().unwrap());
    let seen = c.fetch(req).await.unwrap().seen();
    let (t3, _, _) = traceparent(seen.header("traceparent").unwrap());
    assert_eq!(t3, "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(seen.header("x-b3-parentspanid"), Some("e457b5a2e4d86bd1"));
    wait_for_span(&got, &t3).await;

    let m = agent.metrics();
    assert!(
        metric_value(&m, "outrigger_tracing_spans_exported_total", &[]).unwrap() >= 1.0,
        "{m}"
    );
}

/// OTLP/HTTP (protobuf to `/v1/traces`), sampling 0%: a request the caller sampled is traced
/// (Envoy's tracer respects the caller's flag), one without a context is not: the application
/// still gets a `traceparent` (flags `00`) and nothing is exported for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_http_collector_and_unsampled_requests_export_nothing() {
    let (collector, got) = start_collector(Duration::ZERO).await;
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let backend = start_echo().await;
    let extra = format!(
        "tracing:
  sampling: 0
  serviceName: my-service
  opentelemetry:
    service: 127.0.0.1
    port: {}
    http:
      path: /v1/traces
      timeout: 5s
      headers:
        - name: x-tenant
          value: t1
",
        collector.port()
    );
    let agent = AgentProc::start(
        mesh.dir(),
        &mesh.config(&[("web", backend, "http")], &extra),
    );
    let sleep = mesh.pki.issue("default", "sleep");
    let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;

    let seen = c.fetch(get("/unsampled", false)).await.unwrap().seen();
    let (unsampled, _, flags) = traceparent(seen.header("traceparent").unwrap());
    assert_eq!(flags, "00");
    assert_eq!(seen.header("x-b3-sampled"), Some("0"));
    let rid = seen.header("x-request-id").unwrap();
    assert_eq!(rid.as_bytes()[14], b'4', "not marked: {rid}");

    let mut req = get("/sampled", false);
    req.headers_mut()
        .insert("traceparent", TP_IN.parse().unwrap());
    let seen = c.fetch(req).await.unwrap().seen();
    let (t, s, f) = traceparent(seen.header("traceparent").unwrap());
    assert_eq!(
        (t.as_str(), f.as_str()),
        ("0af7651916cd43dd8448eb211c80319c", "01")
    );
    let (service, span) = wait_for_span(&got, &t).await;
    assert_eq!(service, "my-service");
    assert_eq!(hex::encode(&span.span_id), s);
    assert_eq!(
        attr(&span, "http.url"),
        Some("http://outrigger.test/sampled")
    );
    {
        let g = got.lock().unwrap();
        assert_eq!(g[0].path, "/v1/traces");
        assert_eq!(g[0].content_type, "application/x-protobuf");
    }
    // The unsampled request's trace was never exported; its id is in the access log.
    agent.wait_for_log(&format!("\"trace_id\":\"{unsampled}\""));
    assert!(
        spans(&got)
            .iter()
            .all(|(_, s)| hex::encode(&s.trace_id) != unsampled)
    );
}

/// A collector slower than the export timeout: spans are dropped and counted, requests are
/// not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_collector_drops_spans_and_never_delays_requests() {
    let (collector, _got) = start_collector(Duration::from_secs(30)).await;
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let backend = start_echo().await;
    let extra = format!(
        "tracing:
  sampling: 100
  opentelemetry:
    service: 127.0.0.1
    port: {}
    http:
      timeout: 200ms
",
        collector.port()
    );
    let agent = AgentProc::start(
        mesh.dir(),
        &mesh.config(&[("web", backend, "http")], &extra),
    );
    let sleep = mesh.pki.issue("default", "sleep");
    let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;
    let t0 = Instant::now();
    for i in 0..20 {
        let got = c.fetch(get(&format!("/r{i}"), false)).await.unwrap();
        assert_eq!(got.status, 200);
    }
    assert!(t0.elapsed() < Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = agent.metrics();
        if metric_value(&m, "outrigger_tracing_spans_dropped_total", &[]).unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no span counted as dropped:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Tracing off: no context is added, but the caller's trace id is in the access log and the
/// request still gets an `x-request-id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tracing_off_the_callers_trace_id_is_logged() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let agent = mesh.start(&[("web", start_echo().await, "http")]);
    let sleep = mesh.pki.issue("default", "sleep");
    let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;
    let seen = c.fetch(get("/plain", false)).await.unwrap().seen();
    assert_eq!(seen.header("traceparent"), None);
    assert!(seen.header("x-request-id").is_some());
    let mut req = get("/traced", false);
    req.headers_mut()
        .insert("traceparent", TP_IN.parse().unwrap());
    let seen = c.fetch(req).await.unwrap().seen();
    assert_eq!(
        seen.header("traceparent"),
        Some(TP_IN),
        "passed through unchanged"
    );
    agent.wait_for_log("\"trace_id\":\"0af7651916cd43dd8448eb211c80319c\"");
}

/// Outbound: the application calls a mesh service through Outrigger's outbound listener, and
/// that service's own Outrigger serves it. The client agent records a CLIENT span, the server
/// agent a SERVER span whose parent it is, and the application behind the server sees the
/// server span as its parent; one `x-request-id` (generated by the outbound listener) all the
/// way, as between two Istio sidecars.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_client_span_is_the_parent_of_the_inbound_server_span() {
    let (collector, got) = start_collector(Duration::ZERO).await;
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let tracing = format!(
        "tracing:
  sampling: 100
  opentelemetry: {{service: 127.0.0.1, port: {}}}
",
        collector.port()
    );
    let echo = start_echo().await;
    let ratings = mesh.pki.issue("default", "ratings");
    let sdir = mesh.dir().join("server");
    std::fs::create_dir_all(&sdir).unwrap();
    let inbound = format!(
        "  - {{name: web, listen: \"127.0.0.1:0\", backend: \"{echo}\", protocol: http}}\n"
    );
    let server = AgentProc::start(
        &sdir,
        &agent_yaml(
            &mesh,
            &ratings.dir,
            "default",
            "ratings",
            &inbound,
            &tracing,
        ),
    );
    let port = free_port();
    let outbound = format!(
        "outbound:
  - name: ratings
    listen: 127.0.0.1:{port}
    host: ratings.default.svc.cluster.local
    port: 8080
    endpoints: [\"{s}\"]
    identity: {{serviceAccount: ratings, namespace: default}}
{tracing}",
        s = server.addr("web")
    );
    let cdir = mesh.dir().join("client");
    std::fs::create_dir_all(&cdir).unwrap();
    let client = AgentProc::start(
        &cdir,
        &agent_yaml(
            &mesh,
            &mesh.agent.dir,
            common::AGENT_NS,
            common::AGENT_SA,
            "  []\n",
            &outbound,
        ),
    );

    let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/ratings/1")
        .header("host", format!("127.0.0.1:{port}"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", client.stderr());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen: Seen = serde_json::from_slice(&body).unwrap();
    let (trace, server_span, flags) = traceparent(seen.header("traceparent").unwrap());
    assert_eq!(flags, "01");
    let rid = seen.header("x-request-id").unwrap().to_string();
    assert_eq!(rid.as_bytes()[14], b'9', "{rid}");

    let deadline = Instant::now() + Duration::from_secs(10);
    let (client_span, server_span_rec) = loop {
        let all = spans(&got);
        let c = all
            .iter()
            .find(|(_, s)| hex::encode(&s.trace_id) == trace && s.kind == otlp::span_kind::CLIENT)
            .cloned();
        let sv = all
            .iter()
            .find(|(_, s)| hex::encode(&s.trace_id) == trace && s.kind == otlp::span_kind::SERVER)
            .cloned();
        if let (Some(c), Some(sv)) = (c, sv) {
            break (c, sv);
        }
        assert!(Instant::now() < deadline, "spans: {all:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (client_service, client_span) = client_span;
    let (server_service, server_span_rec) = server_span_rec;
    assert_eq!(client_service, "windows-app.legacy");
    assert_eq!(server_service, "ratings.default");
    assert_eq!(hex::encode(&server_span_rec.span_id), server_span);
    assert_eq!(server_span_rec.parent_span_id, client_span.span_id);
    assert!(client_span.parent_span_id.is_empty());
    assert_eq!(client_span.name, "ratings.default.svc.cluster.local:8080/*");
    assert_eq!(
        attr(&client_span, "upstream_cluster"),
        Some("outbound|8080||ratings.default.svc.cluster.local")
    );
    assert_eq!(attr(&client_span, "http.status_code"), Some("200"));
    assert_eq!(
        attr(&client_span, "http.url"),
        Some("http://ratings.default.svc.cluster.local:8080/ratings/1")
    );
    assert_eq!(attr(&client_span, "guid:x-request-id"), Some(rid.as_str()));
    assert_eq!(
        attr(&server_span_rec, "guid:x-request-id"),
        Some(rid.as_str())
    );
    client.wait_for_log(&format!("\"trace_id\":\"{trace}\""));
    server.wait_for_log(&format!("\"trace_id\":\"{trace}\""));
}

/// One plaintext GET with extra headers on a new connection; the echo backend's view of it.
async fn get_seen(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Seen {
    get_seen_and_response(addr, path, headers).await.1
}

/// The real Envoy's bootstrap as an inbound sidecar listener (`traffic_direction: INBOUND`)
/// with its OpenTelemetry tracer (envoy.tracers.opentelemetry, OTLP/gRPC to `collector`) and
/// the tracing settings istiod gives it (pilot/pkg/networking/core/tracing.go: the UUID
/// request id with `use_request_id_for_trace_sampling`, `client_sampling` and
/// `overall_sampling` 100%, `random_sampling` the configured percentage; no
/// `internal_address_config`, no `use_remote_address`), forwarding to `app`.
fn otel_inbound_bootstrap(
    collector: SocketAddr,
    app: SocketAddr,
    sampling: f64,
) -> serde_json::Value {
    let mut otel = common::envoy::static_cluster("otel", collector);
    otel["typed_extension_protocol_options"] = serde_json::json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}
        }
    });
    serde_json::json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "virtualInbound",
                "traffic_direction": "INBOUND",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "inbound_0.0.0.0_8080",
                        "request_id_extension": {"typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                            "use_request_id_for_trace_sampling": true
                        }},
                        "tracing": {
                            "client_sampling": {"value": 100},
                            "random_sampling": {"value": sampling},
                            "overall_sampling": {"value": 100},
                            "provider": {
                                "name": "envoy.tracers.opentelemetry",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                                    "grpc_service": {"envoy_grpc": {"cluster_name": "otel"}, "timeout": "5s"},
                                    "service_name": "envoy-web"
                                }
                            }
                        },
                        "route_config": {"name": "inbound", "virtual_hosts": [{
                            "name": "inbound", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"},
                                        "decorator": {"operation": "web.test:8080/*"},
                                        // Istio's inbound route has no timeout (route.go
                                        // `BuildDefaultHTTPInboundRoute`: `Notimeout`), so
                                        // the router adds no x-envoy-expected-rq-timeout-ms.
                                        "route": {"cluster": "inbound|8080||", "timeout": "0s"}}]
                        }]},
                        "http_filters": [{"name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
                    }
                }]}]
            }],
            "clusters": [common::envoy::static_cluster("inbound|8080||", app), otel]
        }
    })
}

/// The real Envoy with its OpenTelemetry tracer (envoy.tracers.opentelemetry, OTLP/gRPC to the
/// same in-test collector), as an inbound listener (`traffic_direction: INBOUND`) with Istio's
/// request id settings (`use_request_id_for_trace_sampling`) and 100% sampling, against
/// Outrigger configured alike (`propagation: [w3c]`, Envoy's header set): the application sees
/// the same headers, and the spans have the same shape (kind, ids, parent, tracestate, and
/// every tag Envoy sets is set by Outrigger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagation_and_span_shape_match_envoys_opentelemetry_tracer() {
    let Some(bin) = common::envoy::envoy_or_skip(
        "propagation_and_span_shape_match_envoys_opentelemetry_tracer",
    ) else {
        return;
    };
    let (collector, got) = start_collector(Duration::ZERO).await;
    let echo = start_echo().await;
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let bootstrap = otel_inbound_bootstrap(collector, echo, 100.0);
    let envoy = common::envoy::launch_envoy(&bin, mesh.dir(), "tracing", &bootstrap).await;
    let extra = format!(
        "tracing:
  sampling: 100
  propagation: [w3c]
  opentelemetry: {{service: 127.0.0.1, port: {}}}
",
        collector.port()
    );
    // A plaintext inbound listener (PERMISSIVE) so that both take the same plain request.
    mesh.policy(
        "pa.yaml",
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: PERMISSIVE
",
    );
    let agent = AgentProc::start(mesh.dir(), &mesh.config(&[("web", echo, "http")], &extra));

    for (who, addr) in [("envoy", envoy.listener), ("outrigger", agent.addr("web"))] {
        // A new trace.
        let seen = get_seen(addr, "/new", &[]).await;
        let (trace, span, flags) = traceparent(seen.header("traceparent").unwrap());
        assert_eq!(flags, "01", "{who}");
        // Envoy sends an empty `tracestate` on a new trace; so does Outrigger.
        assert_eq!(seen.header("tracestate"), Some(""), "{who}");
        assert_eq!(seen.header("x-b3-traceid"), None, "{who}");
        let rid = seen.header("x-request-id").unwrap().to_string();
        assert_eq!(rid.len(), 36, "{who}: {rid}");
        assert_eq!(
            rid.as_bytes()[14],
            b'9',
            "{who}: request id marked sampled: {rid}"
        );
        // A caller's context, sampled, with tracestate.
        let seen2 = get_seen(
            addr,
            "/continued",
            &[("traceparent", TP_IN), ("tracestate", "vendor=abc")],
        )
        .await;
        let (t2, s2, f2) = traceparent(seen2.header("traceparent").unwrap());
        assert_eq!(
            (t2.as_str(), f2.as_str()),
            ("0af7651916cd43dd8448eb211c80319c", "01"),
            "{who}"
        );
        assert_eq!(seen2.header("tracestate"), Some("vendor=abc"), "{who}");
        // A caller's context, not sampled: the caller's flag wins over 100% sampling.
        let seen3 = get_seen(
            addr,
            "/unsampled",
            &[(
                "traceparent",
                "00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            )],
        )
        .await;
        let (t3, _, f3) = traceparent(seen3.header("traceparent").unwrap());
        assert_eq!(
            (t3.as_str(), f3.as_str()),
            ("1af7651916cd43dd8448eb211c80319c", "00"),
            "{who}"
        );

        let deadline = Instant::now() + Duration::from_secs(20);
        let (new_span, cont_span) = loop {
            let all = spans(&got);
            let find = |span: &str| {
                all.iter()
                    .find(|(_, s)| hex::encode(&s.span_id) == span)
                    .cloned()
            };
            if let (Some(a), Some(b)) = (find(&span), find(&s2)) {
                break (a.1, b.1);
            }
            assert!(
                Instant::now() < deadline,
                "{who}: spans never arrived: {all:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(hex::encode(&new_span.span_id), span, "{who}");
        assert_eq!(hex::encode(&new_span.trace_id), trace, "{who}");
        assert_eq!(new_span.kind, otlp::span_kind::SERVER, "{who}");
        assert!(new_span.parent_span_id.is_empty(), "{who}");
        assert_eq!(
            hex::encode(&cont_span.parent_span_id),
            "b7ad6b7169203331",
            "{who}"
        );
        assert_eq!(cont_span.trace_state, "vendor=abc", "{who}");
        assert_eq!(hex::encode(&cont_span.trace_id), t2, "{who}");
        // SpanFlags: sampled, and whether the parent is remote, as Envoy 1.40 sets them.
        assert_eq!((new_span.flags, cont_span.flags), (0x101, 0x301), "{who}");
        assert_eq!(
            attr(&new_span, "guid:x-request-id"),
            Some(rid.as_str()),
            "{who}"
        );
        assert_eq!(attr(&new_span, "http.status_code"), Some("200"), "{who}");
        assert_eq!(attr(&new_span, "http.method"), Some("GET"), "{who}");
        assert_eq!(attr(&new_span, "component"), Some("proxy"), "{who}");
        assert_eq!(
            attr(&new_span, "http.url"),
            Some("http://outrigger.test/new"),
            "{who}"
        );
        if who == "envoy" {
            let envoy_keys: Vec<String> =
                new_span.attributes.iter().map(|a| a.key.clone()).collect();
            eprintln!("envoy span: {} {envoy_keys:?}", new_span.name);
            std::fs::write(mesh.dir().join("envoy-keys"), envoy_keys.join("\n")).unwrap();
        } else {
            let envoy_keys = std::fs::read_to_string(mesh.dir().join("envoy-keys")).unwrap();
            for k in envoy_keys.lines() {
                assert!(
                    new_span.attributes.iter().any(|a| a.key == k),
                    "Envoy's span has tag {k}, Outrigger's does not: {:?}",
                    new_span.attributes
                );
            }
        }
        // The unsampled request exported nothing.
        assert!(
            spans(&got)
                .iter()
                .all(|(_, s)| hex::encode(&s.trace_id) != t3),
            "{who}"
        );
    }
    drop(envoy);
}

/// One plaintext GET with extra headers: the response's headers and the echo backend's view.
async fn get_seen_and_response(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (http::HeaderMap, Seen) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = http::Request::get(path).header("host", "outrigger.test");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(http_body_util::Empty::<Bytes>::new()).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.headers, serde_json::from_slice(&body).unwrap())
}

/// The internal `x-envoy-*` headers Envoy removes from a request that is not internal
/// (conn_manager_utility.cc `cleanInternalHeaders`, and `x-envoy-internal`).
const ENVOY_INTERNAL: [&str; 15] = [
    "x-envoy-internal",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace",
    "x-envoy-ip-tags",
    "x-envoy-original-url",
    "x-envoy-hedge-on-per-try-timeout",
];

/// Forcing a trace, side by side with the real Envoy configured as istiod configures an
/// inbound sidecar, at 0% random sampling:
/// - `x-client-trace-id` forces the trace (request id marked `'b'`, "client"; sampled
///   `traceparent`), the application still sees the header, and the span carries it as
///   `guid:x-client-trace-id`; a caller's unsampled `traceparent` still wins (the request id
///   is marked, the context stays unsampled);
/// - `x-envoy-force-trace` is removed and forces nothing — even with a private single
///   `x-forwarded-for` address, since no address is internal to an Istio sidecar — and no
///   `x-request-id` comes back on the response; the other internal `x-envoy-*` headers are
///   removed with it, an unknown `x-envoy-*` header is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forcing_a_trace_matches_envoy() {
    let Some(bin) = common::envoy::envoy_or_skip("forcing_a_trace_matches_envoy") else {
        return;
    };
    let (collector, got) = start_collector(Duration::ZERO).await;
    let echo = start_echo().await;
    let mesh = Mesh::new();
    mesh.policy(
        "pa.yaml",
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: PERMISSIVE
",
    );
    let bootstrap = otel_inbound_bootstrap(collector, echo, 0.0);
    let envoy = common::envoy::launch_envoy(&bin, mesh.dir(), "tracing", &bootstrap).await;
    let extra = format!(
        "tracing:
  sampling: 0
  propagation: [w3c]
  opentelemetry: {{service: 127.0.0.1, port: {}}}
",
        collector.port()
    );
    let agent = AgentProc::start(mesh.dir(), &mesh.config(&[("web", echo, "http")], &extra));

    for (who, addr) in [("envoy", envoy.listener), ("outrigger", agent.addr("web"))] {
        let client_id = format!("case-4711-{who}");
        // x-client-trace-id at 0%: traced, for the reason "client".
        let (_, seen) =
            get_seen_and_response(addr, "/client", &[("x-client-trace-id", &client_id)]).await;
        let (trace, span, flags) = traceparent(seen.header("traceparent").unwrap());
        assert_eq!(flags, "01", "{who}");
        let rid = seen.header("x-request-id").unwrap().to_string();
        assert_eq!(rid.as_bytes()[14], b'b', "{who}: {rid}");
        assert_eq!(
            seen.header("x-client-trace-id"),
            Some(client_id.as_str()),
            "{who}"
        );
        let (_, s) = wait_for_span(&got, &trace).await;
        assert_eq!(hex::encode(&s.span_id), span, "{who}");
        assert_eq!(
            attr(&s, "guid:x-client-trace-id"),
            Some(client_id.as_str()),
            "{who}"
        );
        assert_eq!(attr(&s, "guid:x-request-id"), Some(rid.as_str()), "{who}");

        // A caller's unsampled context wins over x-client-trace-id; the id is still marked.
        let (_, seen) = get_seen_and_response(
            addr,
            "/client-unsampled",
            &[
                ("x-client-trace-id", "case-4712"),
                (
                    "traceparent",
                    "00-2af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
                ),
            ],
        )
        .await;
        let (t, _, f) = traceparent(seen.header("traceparent").unwrap());
        assert_eq!(
            (t.as_str(), f.as_str()),
            ("2af7651916cd43dd8448eb211c80319c", "00"),
            "{who}"
        );
        assert_eq!(
            seen.header("x-request-id").unwrap().as_bytes()[14],
            b'b',
            "{who}"
        );

        // x-envoy-force-trace from a caller that is not internal: removed, forces nothing.
        let mut headers: Vec<(&str, &str)> = ENVOY_INTERNAL.iter().map(|h| (*h, "1")).collect();
        headers.push(("x-envoy-force-trace", "true"));
        headers.push(("x-forwarded-for", "10.1.2.3"));
        headers.push(("x-envoy-something-else", "kept"));
        let (resp, seen) = get_seen_and_response(addr, "/forced", &headers).await;
        let (_, _, flags) = traceparent(seen.header("traceparent").unwrap());
        assert_eq!(flags, "00", "{who}");
        let rid = seen.header("x-request-id").unwrap();
        assert_eq!(rid.as_bytes()[14], b'4', "{who}: {rid}");
        for h in ENVOY_INTERNAL {
            assert_eq!(seen.header(h), None, "{who}: {h} reached the application");
        }
        assert_eq!(seen.header("x-envoy-something-else"), Some("kept"), "{who}");
        assert!(
            resp.get("x-request-id").is_none(),
            "{who}: x-request-id on the response: {resp:?}"
        );
    }
    drop(envoy);
}

/// `tracing.customTags` (the Telemetry API's `customTags`) on the exported spans: a literal,
/// an environment variable of the agent (set, and unset with its default), a request header
/// (sent, and absent with its default), and a tag whose value is empty, which Envoy does not
/// set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_tags_reach_the_collector() {
    let (collector, got) = start_collector(Duration::ZERO).await;
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let backend = start_echo().await;
    let extra = format!(
        "tracing:
  sampling: 100
  opentelemetry: {{service: 127.0.0.1, port: {}}}
  customTags:
    team: {{literal: {{value: payments}}}}
    region: {{environment: {{name: OUTRIGGER_TEST_REGION, defaultValue: nowhere}}}}
    rack: {{environment: {{name: OUTRIGGER_TEST_UNSET_RACK, defaultValue: r0}}}}
    user: {{header: {{name: x-user, defaultValue: anonymous}}}}
    empty: {{header: {{name: x-absent}}}}
",
        collector.port()
    );
    let agent = AgentProc::start_with(
        mesh.dir(),
        &mesh.config(&[("web", backend, "http")], &extra),
        &[("OUTRIGGER_TEST_REGION", "eu-west")],
    );
    let sleep = mesh.pki.issue("default", "sleep");
    let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;

    let mut req = get("/with-user", false);
    req.headers_mut().insert("x-user", "alice".parse().unwrap());
    let seen = c.fetch(req).await.unwrap().seen();
    let (with_user, _, _) = traceparent(seen.header("traceparent").unwrap());
    let seen = c.fetch(get("/anonymous", false)).await.unwrap().seen();
    let (anonymous, _, _) = traceparent(seen.header("traceparent").unwrap());

    for (trace, user) in [(with_user, "alice"), (anonymous, "anonymous")] {
        let (_, span) = wait_for_span(&got, &trace).await;
        assert_eq!(attr(&span, "team"), Some("payments"));
        assert_eq!(attr(&span, "region"), Some("eu-west"));
        assert_eq!(attr(&span, "rack"), Some("r0"));
        assert_eq!(attr(&span, "user"), Some(user));
        assert_eq!(attr(&span, "empty"), None);
        // Istio's own tags are still there, each key once.
        assert_eq!(attr(&span, "istio.namespace"), Some("legacy"));
        let mut keys: Vec<&str> = span.attributes.iter().map(|a| a.key.as_str()).collect();
        keys.sort();
        let n = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), n, "duplicate attribute keys: {keys:?}");
    }
}

/// A TLS acceptor for a collector whose certificate (from the test CA) names `otel.test`,
/// offering `h2` and `http/1.1`.
fn collector_tls(pki: &TestPki) -> tokio_rustls::TlsAcceptor {
    let mut o = outrigger_tls::ca::IssueOptions::workload(
        &pki.id("observability", "otel"),
        Duration::from_secs(3600),
    );
    o.dns_sans = vec!["otel.test".into()];
    let cert = pki.ca.issue_with(&o).unwrap();
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<_> =
        rustls_pki_types::CertificateDer::pem_slice_iter(cert.cert_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(outrigger_tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(tls))
}

/// OTLP over TLS to a real TLS collector on 127.0.0.1, verified by `caCertificates` and the
/// `sni` name: gRPC (ALPN h2) and OTLP/HTTP (https). A collector whose certificate the
/// configured CA did not sign gets nothing: the spans are dropped and counted, never sent
/// another way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_a_tls_collector_verified_by_its_ca() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let backend = start_echo().await;
    std::fs::write(mesh.dir().join("otel-ca.pem"), mesh.pki.ca.root_pem()).unwrap();
    let sleep = mesh.pki.issue("default", "sleep");
    for http in [false, true] {
        let (collector, got) =
            start_collector_with(Duration::ZERO, Some(collector_tls(&mesh.pki))).await;
        let extra = format!(
            "tracing:
  sampling: 100
  opentelemetry:
    service: 127.0.0.1
    port: {}
    tls: {{mode: SIMPLE, caCertificates: otel-ca.pem, sni: otel.test}}
{}",
            collector.port(),
            if http {
                "    http: {path: /v1/traces}\n"
            } else {
                ""
            }
        );
        let agent = AgentProc::start(
            mesh.dir(),
            &mesh.config(&[("web", backend, "http")], &extra),
        );
        let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;
        for i in 0..2 {
            let seen = c
                .fetch(get(&format!("/tls/{i}"), false))
                .await
                .unwrap()
                .seen();
            let (trace, span, _) = traceparent(seen.header("traceparent").unwrap());
            let (_, s) = wait_for_span(&got, &trace).await;
            assert_eq!(hex::encode(&s.span_id), span);
        }
        let e = got.lock().unwrap()[0].clone();
        if http {
            assert_eq!(
                (e.path.as_str(), e.content_type.as_str()),
                ("/v1/traces", "application/x-protobuf")
            );
        } else {
            assert_eq!(
                e.path,
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
            );
            assert!(e.content_type.starts_with("application/grpc"));
        }
    }

    // A collector with a certificate from another CA: nothing is exported.
    let other = TestPki::new();
    let (collector, got) = start_collector_with(Duration::ZERO, Some(collector_tls(&other))).await;
    let extra = format!(
        "tracing:
  sampling: 100
  opentelemetry:
    service: 127.0.0.1
    port: {}
    tls: {{caCertificates: otel-ca.pem, sni: otel.test}}
",
        collector.port()
    );
    let agent = AgentProc::start(
        mesh.dir(),
        &mesh.config(&[("web", backend, "http")], &extra),
    );
    let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;
    let _ = c.fetch(get("/untrusted", false)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_value(
        &agent.metrics(),
        "outrigger_tracing_spans_dropped_total",
        &[],
    )
    .unwrap_or(0.0)
        < 1.0
    {
        assert!(Instant::now() < deadline, "{}", agent.metrics());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(got.lock().unwrap().is_empty());
}
