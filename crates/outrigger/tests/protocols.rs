//! The application is spoken to in its port's protocol, not the caller's, as an Istio sidecar
//! does (istio/istio `pilot/pkg/networking/core/cluster_builder.go`, `setUpstreamProtocol`:
//! `http2`/`grpc`/`grpc-web` ports get HTTP/2, `http` ports HTTP/1.1).

mod common;

use common::*;
use outrigger_testkit::*;

/// A config whose first listener has no `protocol:` line (Istio then reads the port name).
fn without_protocol(cfg: &str, proto: &str) -> String {
    cfg.replacen(&format!("    protocol: {proto}\n"), "", 1)
}

fn grpc_get(path: &str) -> http::Request<TestBody> {
    let mut r = get(path, true);
    r.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    r.headers_mut().insert("te", "trailers".parse().unwrap());
    r
}

/// The typical Windows backend (IIS, Tomcat, a .NET Framework service) speaks HTTP/1.1 only.
/// An HTTP/2 caller (curl's default, a gateway, a gRPC-capable client) used to get
/// `503 … http2 error`; now the request is translated: `:authority` becomes `Host`, the body
/// streams, and the caller gets its answer over HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_caller_reaches_an_http1_only_application() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let app = start_echo_http1_only().await;
    // `web` has no protocol: Istio's port naming gives none, so it is `auto`, which sends
    // HTTP/1.1 to the application for anything but gRPC. `api` is declared `http`.
    let cfg = without_protocol(
        &mesh.config(&[("web", app, "auto"), ("api", app, "http")], ""),
        "auto",
    );
    assert!(!cfg.contains("protocol: auto"), "{cfg}");
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let sleep = mesh.pki.issue("default", "sleep");
    for listener in ["web", "api"] {
        let mut c = mesh.connect(agent.addr(listener), &sleep, true).await;
        assert!(c.is_h2());
        let got = c.fetch(get("/orders?id=7", true)).await.unwrap();
        assert_eq!(got.status, 200, "{listener}: {}", got.text());
        let seen = got.seen();
        assert_eq!(seen.version, "HTTP/1.1", "{listener}");
        assert_eq!(seen.path, "/orders?id=7");
        assert!(
            seen.header("host").is_some_and(|h| !h.is_empty()),
            "HTTP/1.1 needs a Host: {seen:?}"
        );
        // A streamed body both ways.
        let mut req = http::Request::post("/echo")
            .body(body(vec![b'x'; 256 * 1024]))
            .unwrap();
        *req.uri_mut() = format!("https://{}/echo", agent.addr(listener))
            .parse()
            .unwrap();
        let got = c.fetch(req).await.unwrap();
        assert_eq!(got.status, 200, "{listener}");
        assert_eq!(got.body.len(), 256 * 1024);
    }
    let m = agent.metrics();
    assert!(
        metric_value(&m, "istio_requests_total", &["response_code=\"503\""]).is_none(),
        "{m}"
    );
}

/// An `http2` (or `grpc`) port: an HTTP/1.1 caller reaches an h2c application over HTTP/2,
/// `Host` becoming `:authority`. A port named by Istio's convention (`http2-api`) with no
/// `protocol:` selects the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_caller_reaches_an_h2c_application_on_an_http2_port() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let app = start_echo().await;
    let cfg = without_protocol(
        &mesh.config(&[("http2-api", app, "auto"), ("h2", app, "http2")], ""),
        "auto",
    );
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let sleep = mesh.pki.issue("default", "sleep");
    for listener in ["http2-api", "h2"] {
        let mut c = mesh.connect(agent.addr(listener), &sleep, false).await;
        assert!(!c.is_h2());
        let got = c.fetch(get("/ping", false)).await.unwrap();
        assert_eq!(got.status, 200, "{listener}: {}", got.text());
        let seen = got.seen();
        assert_eq!(seen.version, "HTTP/2.0", "{listener}");
        assert_eq!(seen.path, "/ping");
        assert!(
            seen.header("host").is_none(),
            "moved to :authority: {seen:?}"
        );
    }
}

/// gRPC still works end to end on an `auto` port: a gRPC request (HTTP/2 with
/// `content-type: application/grpc`) cannot travel over HTTP/1.1, so it goes to the
/// application as HTTP/2, trailers included; a plain HTTP/2 request on the same connection
/// goes as HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_on_an_auto_port_goes_as_http2_and_other_requests_as_http1() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let app = start_echo().await;
    let agent = mesh.start(&[("web", app, "auto")]);
    let sleep = mesh.pki.issue("default", "sleep");
    let mut c = mesh.connect(agent.addr("web"), &sleep, true).await;

    let got = c.fetch(grpc_get("/pkg.Svc/Method")).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.seen().version, "HTTP/2.0");

    let mut req = grpc_get("/echo");
    req.headers_mut()
        .insert("x-want-trailers", "1".parse().unwrap());
    *req.body_mut() = body(&b"hello"[..]);
    let got = c.fetch(req).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(&got.body[..], b"hello");
    let trailers = got.trailers.expect("gRPC trailers reach the caller");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");

    let got = c.fetch(get("/plain", true)).await.unwrap();
    assert_eq!(got.seen().version, "HTTP/1.1");
}

/// Istio's protocol names are accepted (case-insensitive), the non-HTTP ones carried as TCP;
/// anything else is refused with file:line:field.
#[test]
fn protocol_names_are_istios() {
    let mesh = Mesh::new();
    let path = mesh.dir().join("p.yaml");
    for ok in [
        "HTTP", "http2", "GRPC", "grpc-web", "tcp", "tls", "mysql", "auto",
    ] {
        let cfg = mesh.config(&[("web", "127.0.0.1:5000".parse().unwrap(), ok)], "");
        std::fs::write(&path, &cfg).unwrap();
        let out = std::process::Command::new(BIN)
            .args(["run", "--check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{ok}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cfg = mesh.config(&[("web", "127.0.0.1:5000".parse().unwrap(), "udp")], "");
    std::fs::write(&path, &cfg).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = cfg.lines().position(|l| l.contains("udp")).unwrap() + 1;
    assert!(
        err.contains(&format!("p.yaml:{line}:")) && err.contains("inbound[0].protocol"),
        "{err}"
    );
}

/// The same HTTP/2 caller, the same HTTP/1.1-only application, behind the real Envoy configured
/// as an Istio sidecar's inbound for an `http` port (tests/common/envoy.rs: the cluster has no
/// HTTP/2 options, as `setUpstreamProtocol` leaves an `http` port) and behind Outrigger: the same
/// status, and the application hears HTTP/1.1 from both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_caller_gets_the_same_answer_from_envoy_and_outrigger() {
    let Some(bin) = common::envoy::envoy_or_skip(
        "an_http2_caller_gets_the_same_answer_from_envoy_and_outrigger",
    ) else {
        return;
    };
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let app = start_echo_http1_only().await;
    let tcp = start_tcp_echo().await;
    let envoy = common::envoy::start_sidecar_inbound(&bin, mesh.dir(), &mesh.agent, app, tcp).await;
    let agent = mesh.start(&[("web", app, "http")]);
    let sleep = mesh.pki.issue("default", "sleep");
    for (who, addr) in [("envoy", envoy.listener), ("outrigger", agent.addr("web"))] {
        let mut c = mesh.connect(addr, &sleep, true).await;
        assert!(c.is_h2(), "{who}");
        let got = c.fetch(get("/same", true)).await.unwrap();
        assert_eq!(got.status, 200, "{who}: {}", got.text());
        assert_eq!(got.seen().version, "HTTP/1.1", "{who}");
        assert_eq!(got.seen().path, "/same", "{who}");
    }
}
