//! The Windows build end to end: `outrigger.exe` (cross-built for x86_64-pc-windows-gnu) runs
//! under Wine in front of a Linux echo backend on 127.0.0.1; Linux mTLS clients are authorized
//! and served, a plaintext client is refused, and `outrigger.exe doctor` tells a loopback-only
//! application from one exposed on the network. Outbound: an application's plain HTTP call to
//! outrigger.exe's loopback listener reaches a STRICT-mTLS service behind a real Envoy sidecar
//! (the test needs Envoy, found and skipped like the other Envoy tests: tests/common/envoy.rs).
//! Ambient: outrigger.exe's HBONE listener serves a Linux HBONE client under L4 and L7 policy,
//! and its `transport: hbone` outbound listener reaches a Linux Outrigger's HBONE listener.
//!
//! `scripts/windows-test.sh` builds the .exe, prepares the Wine prefix and sets
//! `OUTRIGGER_WINDOWS_EXE` (the .exe) and `OUTRIGGER_REQUIRE_WINDOWS=1`. Without
//! `OUTRIGGER_WINDOWS_EXE` the tests say loudly that they were skipped, and pass only if
//! `OUTRIGGER_REQUIRE_WINDOWS` is unset (a plain `cargo test` on a machine without Wine).
//! `OUTRIGGER_WINE` names the Wine loader (default: `wine64` on PATH, else
//! /usr/lib/wine/wine64, where Debian's wine64 package puts it).

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::envoy::{envoy_or_skip, plain_get, start_sidecar_inbound};
use common::{AgentProc, free_port};
use hyper::body::Frame;
use outrigger_proxy::hbone::{Baggage, HboneClient, HboneError, SourceInfo};
use outrigger_testkit::{
    HttpConn, Issued, TestPki, channel_body, get, plaintext_request, start_echo, start_tcp_echo,
    tls_connect,
};
use outrigger_tls::{CertSource, CertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long Wine may take to start the agent (the first start in a fresh prefix is slow).
const START_LIMIT: Duration = Duration::from_secs(120);

/// The .exe and the Wine loader, or `None` when this run is not meant to test Windows.
fn windows_exe() -> Option<(PathBuf, PathBuf)> {
    let Some(exe) = std::env::var_os("OUTRIGGER_WINDOWS_EXE").filter(|v| !v.is_empty()) else {
        // Straight to the stderr handle, past libtest's output capture, so it is seen.
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: the Windows end-to-end test needs OUTRIGGER_WINDOWS_EXE (an \
             outrigger.exe) and Wine; scripts/windows-test.sh sets them up ***\n"
        );
        assert!(
            std::env::var_os("OUTRIGGER_REQUIRE_WINDOWS").is_none(),
            "OUTRIGGER_REQUIRE_WINDOWS is set but OUTRIGGER_WINDOWS_EXE is not"
        );
        return None;
    };
    let exe = PathBuf::from(exe);
    assert!(
        exe.is_file(),
        "OUTRIGGER_WINDOWS_EXE={} is not a file",
        exe.display()
    );
    let wine = std::env::var_os("OUTRIGGER_WINE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("wine64"))
                    .find(|w| w.is_file())
            })
        })
        .unwrap_or_else(|| PathBuf::from("/usr/lib/wine/wine64"));
    Some((exe, wine))
}

/// A Linux path as a Windows program under Wine sees it (drive Z: is the Unix root).
fn win_path(p: &Path) -> String {
    format!("Z:{}", p.display()).replace('/', "\\")
}

fn wine_command(wine: &Path, exe: &Path) -> Command {
    let mut c = Command::new(wine);
    c.arg(exe).stdin(Stdio::null());
    // Keep Wine quiet and away from a display; the prefix comes from the environment
    // (scripts/windows-test.sh sets WINEPREFIX and installs the ProcessPrng shim there).
    c.env("WINEDEBUG", "-all").env_remove("DISPLAY");
    c
}

/// `outrigger.exe run` under Wine. Killed on drop.
struct WinAgent {
    child: Child,
    dir: PathBuf,
    /// The bound listeners by name, from the ready file.
    inbound: BTreeMap<String, SocketAddr>,
    outbound: BTreeMap<String, SocketAddr>,
    /// The HBONE listener, when the configuration has `hbone:`.
    hbone: Option<SocketAddr>,
}

/// A `{name: address}` object of the ready file.
fn addrs(v: &serde_json::Value) -> BTreeMap<String, SocketAddr> {
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(k, a)| (k.clone(), a.as_str().unwrap().parse().unwrap()))
        .collect()
}

impl WinAgent {
    fn start(wine: &Path, exe: &Path, dir: &Path, config: &str) -> WinAgent {
        let cfg = dir.join("agent.yaml");
        std::fs::write(&cfg, config).unwrap();
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let child = wine_command(wine, exe)
            .arg("run")
            .arg("--config")
            .arg(win_path(&cfg))
            .arg("--ready-file")
            .arg(win_path(&ready))
            .stdout(std::fs::File::create(dir.join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .expect("start wine");
        let mut agent = WinAgent {
            child,
            dir: dir.to_path_buf(),
            inbound: BTreeMap::new(),
            outbound: BTreeMap::new(),
            hbone: None,
        };
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                agent.inbound = addrs(&v["inbound"]);
                agent.outbound = addrs(&v["outbound"]);
                agent.hbone = v["hbone"].as_str().map(|a| a.parse().unwrap());
                return agent;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "outrigger.exe exited ({status}) before listening:\n{}",
                    agent.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "outrigger.exe did not listen within {START_LIMIT:?}:\n{}",
                agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The inbound listener `web`.
    fn web(&self) -> SocketAddr {
        self.inbound["web"]
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let all = self.stderr()
                + &std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default();
            if all.contains(needle) {
                return all;
            }
            assert!(
                Instant::now() < deadline,
                "the log never contained {needle:?}:\n{all}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for WinAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's configuration (workload legacy/windows-app) with the given inbound listeners
/// (none: `inbound: []`); append an `outbound:` section to it for outbound listeners.
fn config(pki: &TestPki, agent_certs: &Path, inbound: &[(&str, SocketAddr)]) -> String {
    let d = |f: &str| win_path(&agent_certs.join(f));
    let mut s = format!(
        "trustDomain: cluster.local
workload:
  namespace: legacy
  serviceAccount: windows-app
  labels: {{app: windows-app}}
certificates:
  files:
    certChain: '{}'
    key: '{}'
    rootCert: '{}'
policy:
  paths: ['{}']
admin:
  listen: 127.0.0.1:0
timeouts:
  detect: 500ms
  drain: 5s
inbound:{}
",
        d("cert-chain.pem"),
        d("key.pem"),
        d("root-cert.pem"),
        win_path(&pki.path().join("policies")),
        if inbound.is_empty() { " []" } else { "" },
    );
    for (name, backend) in inbound {
        s += &format!(
            "  - {{name: {name}, listen: '127.0.0.1:0', backend: '{backend}', protocol: http}}\n"
        );
    }
    s
}

const MESH_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_exe_under_wine_serves_mtls_and_refuses_plaintext() {
    let Some((exe, wine)) = windows_exe() else {
        return;
    };
    let pki = TestPki::new();
    let agent_certs = pki.issue("legacy", "windows-app");
    std::fs::create_dir_all(pki.path().join("policies")).unwrap();
    std::fs::write(pki.path().join("policies").join("pa.yaml"), MESH_STRICT).unwrap();
    let echo = start_echo().await;
    let dir = pki.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let agent = WinAgent::start(
        &wine,
        &exe,
        &dir,
        &config(&pki, &agent_certs.dir, &[("web", echo)]),
    );

    // A mesh client (Linux, rustls) over mTLS with Istio's ALPN, HTTP/1.1 and HTTP/2.
    let sleep = pki.issue("default", "sleep");
    let agent_id = pki.id("legacy", "windows-app");
    for h2 in [false, true] {
        let alpn: &[&[u8]] = if h2 {
            &[b"istio-h2"]
        } else {
            &[b"istio-http/1.1"]
        };
        let cfg = outrigger_tls::client_config(
            &sleep.certs,
            &pki.trust(),
            std::slice::from_ref(&agent_id),
            alpn,
        )
        .unwrap();
        let tls = tls_connect(agent.web(), Arc::clone(&cfg)).await.unwrap();
        let mut c = HttpConn::new(tls, h2).await.unwrap();
        let got = c.fetch(get("/from-linux", h2)).await.unwrap();
        assert_eq!(
            got.status,
            200,
            "h2={h2}: {}\n{}",
            got.text(),
            agent.stderr()
        );
        let seen = got.seen();
        assert_eq!(seen.path, "/from-linux");
        // The `web` port is `http`: the application hears HTTP/1.1 whatever the caller spoke
        // (Istio's cluster_builder.go `setUpstreamProtocol`; docs/config.md "Protocols").
        assert_eq!(seen.version, "HTTP/1.1", "h2={h2}");
        let xfcc = seen.header("x-forwarded-client-cert").unwrap_or_default();
        assert!(
            xfcc.starts_with("By=spiffe://cluster.local/ns/legacy/sa/windows-app;")
                && xfcc.ends_with(";URI=spiffe://cluster.local/ns/default/sa/sleep"),
            "{xfcc}"
        );
    }

    // Plaintext: closed without a byte of answer (STRICT).
    let answer = plaintext_request(agent.web()).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    agent.wait_for_log("plaintext connection refused");

    // A client with a certificate from another CA: no service either.
    let rogue = TestPki::new();
    let stranger = rogue.issue("default", "sleep");
    let cfg = outrigger_tls::client_config(
        &stranger.certs,
        &pki.trust(),
        std::slice::from_ref(&agent_id),
        &[b"istio-http/1.1"],
    )
    .unwrap();
    let refused = match tls_connect(agent.web(), cfg).await {
        Err(_) => true,
        // TLS 1.3: the server's rejection of the client certificate arrives after the client
        // considers the handshake done, so it shows on the first request.
        Ok(tls) => match HttpConn::new(tls, false).await {
            Err(_) => true,
            Ok(mut c) => c.fetch(get("/", false)).await.is_err(),
        },
    };
    assert!(refused, "a certificate from a foreign CA was served");

    // Wine turns SIGINT into the console's Ctrl-C event: the agent drains and exits cleanly
    // (agent::shutdown_signal).
    let mut agent = agent;
    let _ = Command::new("kill")
        .arg("-INT")
        .arg(agent.child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "outrigger.exe did not stop on Ctrl-C:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}:\n{}", agent.stderr());
    agent.wait_for_log("drained");
}

const RATINGS: &str = "ratings.default.svc.cluster.local";
const RATINGS_ID: &str = "spiffe://cluster.local/ns/default/sa/ratings";
const OTHER_ID: &str = "spiffe://cluster.local/ns/default/sa/not-ratings";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/legacy/sa/windows-app";

/// Issue 6's "done when" on Windows: an application calls `http://127.0.0.1:<port>/` and
/// reaches a STRICT-mTLS Linux service behind an Envoy sidecar, the server's identity verified.
///
/// ```text
///  app ──plain HTTP──▶ outrigger.exe under Wine: outbound `ratings` on 127.0.0.1 (legacy/windows-app)
///     ──mTLS, ALPN istio-http/1.1, SNI outbound_.8080_._.ratings...──▶
///  Envoy as ratings' sidecar inbound (common::envoy::start_sidecar_inbound, STRICT) ──▶ echo app
/// ```
///
/// Everything runs on one Linux host's loopback. The mTLS origination, the server-identity
/// check and the 503 are outrigger.exe's, running under Wine; Envoy and the echo app are Linux
/// processes. The calling "Windows app" is this (Linux) test client connecting to the loopback
/// listener that outrigger.exe bound through Wine's Winsock: that is the same host loopback a
/// Windows application would call, but no Windows program makes the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_exe_under_wine_outbound_reaches_envoy_sidecar() {
    let Some((exe, wine)) = windows_exe() else {
        return;
    };
    let Some(envoy_bin) = envoy_or_skip("windows_exe_under_wine_outbound_reaches_envoy_sidecar")
    else {
        return;
    };
    let pki = TestPki::new();
    let agent_certs = pki.issue("legacy", "windows-app");
    let server_certs = pki.issue("default", "ratings");
    std::fs::create_dir_all(pki.path().join("policies")).unwrap();
    let http_app = start_echo().await;
    let tcp_app = start_tcp_echo().await;
    let envoy =
        start_sidecar_inbound(&envoy_bin, pki.path(), &server_certs, http_app, tcp_app).await;

    let (ok_port, wrong_port) = (free_port(), free_port());
    let e = envoy.listener;
    let outbound = format!(
        "outbound:
  - {{name: ratings, listen: '127.0.0.1:{ok_port}', host: {RATINGS}, port: 8080, protocol: http, endpoints: ['{e}'], identity: {RATINGS_ID}}}
  - {{name: impostor, listen: '127.0.0.1:{wrong_port}', host: {RATINGS}, port: 8080, protocol: http, endpoints: ['{e}'], identity: {OTHER_ID}}}
"
    );
    let dir = pki.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let agent = WinAgent::start(
        &wine,
        &exe,
        &dir,
        &(config(&pki, &agent_certs.dir, &[]) + &outbound),
    );
    let ok = SocketAddr::from(([127, 0, 0, 1], ok_port));
    let wrong = SocketAddr::from(([127, 0, 0, 1], wrong_port));
    assert_eq!(
        agent.outbound.get("ratings"),
        Some(&ok),
        "{:?}",
        agent.outbound
    );
    assert_eq!(agent.outbound.get("impostor"), Some(&wrong));
    let logs = || format!("{}\n{}", agent.stderr(), envoy.tail());

    // 1. The plain call reaches the app; Envoy verified outrigger.exe's SPIFFE ID (XFCC).
    let (status, body) = plain_get(ok, "/hello?from=windows").await.unwrap();
    assert_eq!(status, 200, "{body}\n{}", logs());
    let seen: outrigger_testkit::Seen = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", "/hello?from=windows")
    );
    let xfcc = seen.header("x-forwarded-client-cert").unwrap_or_default();
    assert!(
        xfcc.contains(&format!("URI={CLIENT_ID}")),
        "Envoy should have verified outrigger.exe's SPIFFE ID and put it in XFCC: {xfcc}"
    );
    // The app called 127.0.0.1:<port>; the service's own name went upstream.
    assert_eq!(seen.header("host"), Some(&*format!("{RATINGS}:8080")));
    assert!(
        envoy
            .stat("http.inbound_0.0.0.0_8080.downstream_rq_http1_total")
            .await
            >= 1,
        "Envoy's HTTP chain (ALPN istio-http/1.1) should have served it\n{}",
        logs()
    );

    // 2. The wrong expected identity: outrigger.exe refuses Envoy's certificate, the app gets
    //    a 503 naming both identities, and so does the log.
    let (status, body) = plain_get(wrong, "/steal").await.unwrap();
    assert_eq!(status, 503, "{body}\n{}", logs());
    assert!(
        body.contains(RATINGS_ID) && body.contains(OTHER_ID),
        "{body}"
    );
    let log = agent.wait_for_log("server identity refused");
    let line = log
        .lines()
        .find(|l| l.contains("server identity refused"))
        .unwrap();
    assert!(
        line.contains(RATINGS_ID) && line.contains(OTHER_ID),
        "{line}"
    );
    assert_eq!(
        envoy
            .stat("http.inbound_0.0.0.0_8080.downstream_rq_completed")
            .await,
        envoy
            .stat("http.inbound_0.0.0.0_8080.downstream_rq_2xx")
            .await,
        "nothing but successful requests reached Envoy's HTTP chain\n{}",
        logs()
    );
}

/// The .exe's mesh policy for issue 7's test: `sleep` may GET /api/* (an HTTP-only rule, so it
/// cannot match TCP) and open TCP streams to `db_port` only.
fn hbone_policy(db_port: u16) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-sleep, namespace: legacy}}
spec:
  rules:
  - from: [{{source: {{principals: [\"cluster.local/ns/default/sa/sleep\"]}}}}]
    to: [{{operation: {{methods: [\"GET\"], paths: [\"/api/*\"]}}}}]
  - from: [{{source: {{principals: [\"cluster.local/ns/default/sa/sleep\"]}}}}]
    to: [{{operation: {{ports: [\"{db_port}\"]}}}}]
"
    )
}

/// An ambient workload's HBONE client (as tests/hbone.rs's `client()`), presenting `who`.
fn hbone_client(pki: &TestPki, who: &Issued, workload: &str) -> HboneClient {
    let store = CertStore::new(
        CertSource::Files {
            chain: who.dir.join("cert-chain.pem"),
            key: who.dir.join("key.pem"),
            roots: who.dir.join("root-cert.pem"),
        },
        pki.trust(),
        vec![b"h2".to_vec()],
    )
    .unwrap();
    let source = SourceInfo {
        baggage: Baggage {
            cluster: Some("Kubernetes".into()),
            namespace: Some("default".into()),
            workload_name: Some(workload.into()),
            service_name: Some(workload.into()),
            ..Baggage::default()
        },
        kind: "deployment".into(),
    };
    HboneClient::new(store, &source, Duration::from_secs(30))
}

/// Bounds a step of a test that talks to Wine.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out"))
}

/// Issue 7's "done when" on Windows: an ambient mesh reaches the Windows app through
/// outrigger.exe's HBONE listener with L4 and L7 policy enforced, and the app reaches an
/// ambient service through HBONE.
///
/// ```text
///  inbound:  HboneClient (default/sleep, Linux) ──HBONE (mTLS h2, CONNECT)──▶
///            outrigger.exe under Wine `hbone:` (legacy/windows-app) ──▶ web (http) / db, vault (tcp)
///            ──▶ Linux echo apps
///  outbound: app ──plain HTTP──▶ outrigger.exe outbound `ratings` (transport: hbone)
///            ──HBONE──▶ Linux outrigger `hbone:` (default/ratings) ──▶ Linux echo app
/// ```
///
/// As in the Envoy test above, the "Windows app" is this Linux test on the same loopback;
/// the HBONE server and client under test are outrigger.exe's, running under Wine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_exe_under_wine_is_an_hbone_peer_both_ways() {
    let Some((exe, wine)) = windows_exe() else {
        return;
    };
    let pki = TestPki::new();
    let agent_certs = pki.issue("legacy", "windows-app");
    let (db_port, vault_port, out_port) = (free_port(), free_port(), free_port());
    let policies = pki.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("pa.yaml"), MESH_STRICT).unwrap();
    std::fs::write(policies.join("allow.yaml"), hbone_policy(db_port)).unwrap();
    let web_app = start_echo().await;
    let tcp_app = start_tcp_echo().await;

    // The ambient service: a Linux Outrigger (default/ratings) terminating HBONE in front of
    // an echo app; its policy lets only outrigger.exe's identity in.
    let ratings_certs = pki.issue("default", "ratings");
    let ratings_app = start_echo().await;
    let linux_dir = pki.path().join("linux-ratings");
    std::fs::create_dir_all(linux_dir.join("policies")).unwrap();
    std::fs::write(
        linux_dir.join("policies").join("allow.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-windows-app, namespace: default}
spec:
  rules:
  - from: [{source: {principals: [\"cluster.local/ns/legacy/sa/windows-app\"]}}]
    to: [{operation: {paths: [\"/ratings/*\"]}}]
",
    )
    .unwrap();
    let linux = AgentProc::start(
        &linux_dir,
        &format!(
            "trustDomain: cluster.local
workload:
  namespace: default
  serviceAccount: ratings
  labels: {{app: ratings}}
certificates:
  files:
    certChain: {c}/cert-chain.pem
    key: {c}/key.pem
    rootCert: {c}/root-cert.pem
policy:
  paths: [{p}]
admin:
  listen: 127.0.0.1:0
timeouts:
  detect: 300ms
  drain: 2s
inbound:
  - {{name: web, listen: '127.0.0.1:0', backend: '{ratings_app}', protocol: http}}
hbone:
  listen: 127.0.0.1:0
",
            c = ratings_certs.dir.display(),
            p = linux_dir.join("policies").display(),
        ),
    );
    let linux_hbone: SocketAddr = {
        let text = std::fs::read_to_string(linux.dir.join("ready.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["hbone"].as_str().unwrap().parse().unwrap()
    };
    let linux_web = linux.addr("web");

    // outrigger.exe: HBONE in, with `web` (http), `db` and `vault` (tcp); HBONE out to ratings.
    let cfg = config(&pki, &agent_certs.dir, &[("web", web_app)])
        + &format!(
            "  - {{name: db, listen: '127.0.0.1:{db_port}', backend: '{tcp_app}', protocol: tcp}}
  - {{name: vault, listen: '127.0.0.1:{vault_port}', backend: '{tcp_app}', protocol: tcp}}
hbone:
  listen: 127.0.0.1:0
outbound:
  - {{name: ratings, listen: '127.0.0.1:{out_port}', host: {RATINGS}, port: 8080, protocol: http, endpoints: ['{linux_web}'], transport: hbone, hbonePeer: '{linux_hbone}', identity: {RATINGS_ID}}}
"
        );
    let dir = pki.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let agent = WinAgent::start(&wine, &exe, &dir, &cfg);
    let hbone = agent
        .hbone
        .expect("the ready file names outrigger.exe's HBONE listener");
    let (web, db, vault) = (agent.web(), agent.inbound["db"], agent.inbound["vault"]);
    assert_eq!((db.port(), vault.port()), (db_port, vault_port));
    let logs = || {
        format!(
            "{}\n--- linux agent ---\n{}",
            agent.stderr(),
            linux.stderr()
        )
    };

    // 1. Inbound. The ambient client pins outrigger.exe's identity.
    let me = pki.id("legacy", "windows-app");
    let sleep = hbone_client(&pki, &pki.issue("default", "sleep"), "sleep-vm");
    // HTTP inside the tunnel: L7 policy per request, XFCC with the outer peer's identity.
    let s = within("CONNECT web", sleep.connect(hbone, &me, web))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let mut http = within("HTTP/1.1 in the stream", HttpConn::new(s, false))
        .await
        .unwrap();
    let got = within("GET /api/items", http.fetch(get("/api/items", false)))
        .await
        .unwrap();
    assert_eq!(got.status, 200, "{}\n{}", got.text(), logs());
    let seen = got.seen();
    assert_eq!(seen.path, "/api/items");
    let xfcc = seen.header("x-forwarded-client-cert").unwrap_or_default();
    assert!(
        xfcc.starts_with("By=spiffe://cluster.local/ns/legacy/sa/windows-app;")
            && xfcc.ends_with(";URI=spiffe://cluster.local/ns/default/sa/sleep"),
        "{xfcc}"
    );
    let got = within("GET /admin", http.fetch(get("/admin", false)))
        .await
        .unwrap();
    assert_eq!(
        (got.status, got.text().as_str()),
        (403, "RBAC: access denied")
    );
    // TCP inside the tunnel to the port the L4 rule allows: echoed.
    let mut s = within("CONNECT db", sleep.connect(hbone, &me, db))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; payload.len()];
    within("TCP echo through HBONE", async {
        let (mut r, mut w) = tokio::io::split(&mut s);
        let (wrote, read) = tokio::join!(w.write_all(&payload), r.read_exact(&mut back));
        wrote.and(read.map(|_| ()))
    })
    .await
    .unwrap();
    assert!(back == payload, "the TCP echo came back altered");
    drop(s);
    // TCP to a listener no L4 rule allows: CONNECT answered 401, nothing reaches the backend.
    match within("CONNECT vault", sleep.connect(hbone, &me, vault)).await {
        Err(HboneError::Status { status, .. }) => assert_eq!(status, 401),
        Err(e) => panic!("unexpected error {e}\n{}", logs()),
        Ok(_) => panic!("a TCP stream no rule allows was accepted"),
    }
    assert_eq!(sleep.dials(), 1, "every stream shares one HBONE connection");

    // 2. Outbound: the app's plain call goes out of outrigger.exe as an HBONE stream to the
    //    Linux agent, which verified outrigger.exe's identity (its policy and XFCC).
    let out = SocketAddr::from(([127, 0, 0, 1], out_port));
    assert_eq!(agent.outbound.get("ratings"), Some(&out));
    let (status, body) = plain_get(out, "/ratings/7").await.unwrap();
    assert_eq!(status, 200, "{body}\n{}", logs());
    let seen: outrigger_testkit::Seen = serde_json::from_str(&body).unwrap();
    assert_eq!(seen.path, "/ratings/7");
    let xfcc = seen.header("x-forwarded-client-cert").unwrap_or_default();
    assert!(
        xfcc.starts_with(&format!("By={RATINGS_ID};"))
            && xfcc.contains(&format!("URI={CLIENT_ID}")),
        "the Linux agent should have verified outrigger.exe's SPIFFE ID: {xfcc}"
    );
    assert_eq!(seen.header("host"), Some(&*format!("{RATINGS}:8080")));
    // The Linux agent's L7 policy applies to the stream too.
    let (status, body) = plain_get(out, "/admin").await.unwrap();
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    // The Linux agent counted the streams as mutual TLS from outrigger.exe.
    let m = linux.metrics();
    let opened = common::metric_value(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            &format!("source_principal=\"{CLIENT_ID}\""),
            "connection_security_policy=\"mutual_tls\"",
        ],
    );
    assert!(opened >= Some(1.0), "{opened:?}\n{m}");
}

#[test]
fn windows_doctor_under_wine_finds_an_exposed_app_port() {
    let Some((exe, wine)) = windows_exe() else {
        return;
    };
    // Two "applications": one on loopback only, one on every address (the mistake).
    let private = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let exposed = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let private_port = private.local_addr().unwrap().port();
    let exposed_port = exposed.local_addr().unwrap().port();
    let pki = TestPki::new();
    let certs = pki.issue("legacy", "windows-app");
    std::fs::create_dir_all(pki.path().join("policies")).unwrap();
    let cfg = config(
        &pki,
        &certs.dir,
        &[
            ("web", format!("127.0.0.1:{private_port}").parse().unwrap()),
            (
                "legacy",
                format!("127.0.0.1:{exposed_port}").parse().unwrap(),
            ),
        ],
    );
    let cfg_path = pki.path().join("agent.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();

    let mut child = wine_command(&wine, &exe)
        .arg("doctor")
        .arg("--config")
        .arg(win_path(&cfg_path))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wine");
    // Bounded: the doctor's probes each wait at most a second, netsh/netstat at most 30s.
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("outrigger.exe doctor did not finish in 180s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    // Wine's netstat lists no listening sockets, so under Wine the doctor judges from the
    // outside: it connects to each application port on this host's network address.
    let Some(host) = host_address() else {
        eprintln!(
            "\n*** SKIPPED (part): this host has no non-loopback address for the doctor to \
             probe ***\n"
        );
        assert!(text.contains("found no non-loopback address"), "{text}");
        return;
    };
    assert!(
        !out.status.success(),
        "an exposed port must fail the doctor:\n{text}"
    );
    assert!(
        text.contains(&format!(
            "[FAIL] listener legacy: the application answers on {}",
            std::net::SocketAddr::new(host, exposed_port)
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "[ OK ] listener web: the application port {private_port} does not answer on"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "fix: netsh advfirewall firewall add rule name=\"Outrigger: block direct access to app port {exposed_port}\" dir=in action=block protocol=TCP localport={exposed_port}"
        )),
        "{text}"
    );
    drop((private, exposed));
}

/// This host's address on its default route (a UDP "connect" sends nothing).
fn host_address() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("203.0.113.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Runs `outrigger.exe <args>` under Wine to completion (bounded) and returns its output.
fn wine_run(wine: &Path, exe: &Path, args: &[&str]) -> (bool, String) {
    let mut child = wine_command(wine, exe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wine");
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("outrigger.exe {args:?} did not finish in 180s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    println!("$ outrigger.exe {}\n{text}", args.join(" "));
    (out.status.success(), text)
}

/// The Windows service lifecycle through Wine's service control manager: install, start
/// (the agent serves mTLS as the service), stop (a graceful drain, logged to the rotating
/// file), uninstall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_service_under_wine_installs_serves_drains_and_uninstalls() {
    let Some((exe, wine)) = windows_exe() else {
        return;
    };
    let pki = TestPki::new();
    let agent_certs = pki.issue("legacy", "windows-app");
    std::fs::create_dir_all(pki.path().join("policies")).unwrap();
    // The application answers every request with the number of body bytes it read, and says
    // when the first of them arrived (so the test knows the upload is in flight, without a sleep).
    let (echo, upload_arrived) = outrigger_testkit::start_signalling_sink().await;
    // The service writes no ready file: give it a port up front.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = config(&pki, &agent_certs.dir, &[("web", echo)]).replace(
        "listen: '127.0.0.1:0'",
        &format!("listen: '127.0.0.1:{port}'"),
    );
    let cfg_path = pki.path().join("agent.yaml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let logs = pki.path().join("logs");
    // Wine tears its services down with its server, which exits soon after the last ordinary
    // Wine process ends; between our `service` commands the service would die. Keep one
    // running (an agent of its own, port 0) for the whole test.
    let keeper_dir = pki.path().join("keeper");
    std::fs::create_dir_all(&keeper_dir).unwrap();
    let _keeper = WinAgent::start(
        &wine,
        &exe,
        &keeper_dir,
        &config(&pki, &agent_certs.dir, &[("web", echo)]),
    );
    // A name of its own, so that a leftover from an earlier run cannot interfere.
    let name = format!("OutriggerE2E{}", std::process::id());

    struct Uninstall<'a>(&'a Path, &'a Path, String);
    impl Drop for Uninstall<'_> {
        fn drop(&mut self) {
            let _ = wine_run(self.0, self.1, &["service", "uninstall", "--name", &self.2]);
        }
    }
    let (ok, text) = wine_run(
        &wine,
        &exe,
        &[
            "service",
            "install",
            "--config",
            &win_path(&cfg_path),
            "--name",
            &name,
            "--manual",
            "--log-dir",
            &win_path(&logs),
        ],
    );
    assert!(ok, "{text}");
    let _cleanup = Uninstall(&wine, &exe, name.clone());
    assert!(
        text.contains(&format!(r"account: NT SERVICE\{name}")),
        "{text}"
    );
    assert!(text.contains("icacls"), "{text}");

    let (ok, text) = wine_run(&wine, &exe, &["service", "start", "--name", &name]);
    assert!(ok, "{text}");
    assert!(text.contains("is running"), "{text}");
    let (ok, text) = wine_run(&wine, &exe, &["service", "status", "--name", &name]);
    assert!(ok && text.contains("state:   Running"), "{text}");
    // The doctor sees the service, its account, and no bypass (the echo backend is loopback).
    let (ok, text) = wine_run(
        &wine,
        &exe,
        &["doctor", "--config", &win_path(&cfg_path), "--name", &name],
    );
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!(
            r"[ OK ] Windows service {name} runs as NT SERVICE\{name}"
        )),
        "{text}"
    );

    // The service serves a mesh client.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let sleep = pki.issue("default", "sleep");
    let cfg = outrigger_tls::client_config(
        &sleep.certs,
        &pki.trust(),
        &[pki.id("legacy", "windows-app")],
        &[b"istio-http/1.1"],
    )
    .unwrap();
    let tls = tls_connect(addr, cfg).await.unwrap();
    let mut c = HttpConn::new(tls, false).await.unwrap();
    let got = c.fetch(get("/via-service", false)).await.unwrap();
    assert_eq!(got.status, 200, "{}", got.text());

    // Stop drains: an upload in flight when SCM stops the service still completes.
    let (body_tx, req_body) = channel_body();
    body_tx
        .send(Ok(Frame::data(Bytes::from_static(b"first "))))
        .await
        .unwrap();
    let req = http::Request::post("/sink")
        .header("host", "outrigger.test")
        .body(req_body)
        .unwrap();
    let in_flight = tokio::spawn(async move { c.fetch(req).await });
    // Wait until the upload reached the application: an idle connection would simply be
    // closed by the drain.
    tokio::time::timeout(Duration::from_secs(30), upload_arrived)
        .await
        .expect("the upload reached the application")
        .unwrap();
    let stopper = {
        let (wine, exe, name) = (wine.clone(), exe.clone(), name.clone());
        std::thread::spawn(move || wine_run(&wine, &exe, &["service", "stop", "--name", &name]))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(logs.join("agent.log"))
        .unwrap_or_default()
        .contains("stop requested by the service control manager")
    {
        assert!(
            Instant::now() < deadline,
            "the service never began to drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    body_tx
        .send(Ok(Frame::data(Bytes::from_static(b"second"))))
        .await
        .unwrap();
    drop(body_tx);
    let got = tokio::time::timeout(Duration::from_secs(30), in_flight)
        .await
        .expect("the in-flight upload finished")
        .unwrap()
        .unwrap();
    assert_eq!((got.status, got.text()), (200, "12".to_string()));
    let (ok, text) = stopper.join().unwrap();
    assert!(ok && text.contains("stopped"), "{text}");
    let log = std::fs::read_to_string(logs.join("agent.log")).unwrap_or_default();
    for needle in [
        "starting as a Windows service",
        "stop requested by the service control manager: draining",
        "drained",
    ] {
        assert!(log.contains(needle), "agent.log lacks {needle:?}:\n{log}");
    }
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening after stop"
    );

    let (ok, text) = wine_run(&wine, &exe, &["service", "uninstall", "--name", &name]);
    assert!(ok, "{text}");
    let (ok, text) = wine_run(&wine, &exe, &["service", "status", "--name", &name]);
    assert!(!ok && text.contains("is it installed?"), "{text}");
}
