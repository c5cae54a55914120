//! The `istioCa` certificate source through the real binaries: an agent obtains its identity
//! from `outrigger ca serve` (Istio's CA API over gRPC and TLS), keeps it across a restart
//! without the bootstrap token, rotates under load without a failed request, and fails closed
//! (and says so) once the CA stays unreachable past the certificate's expiry.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use outrigger_testkit::*;

/// `outrigger ca serve` on 127.0.0.1, any port, with a token; killed on drop.
fn start_ca(mesh: &Mesh, token: &Path) -> (KillOnDrop, SocketAddr) {
    let (child, addr) = ca_serve(
        &mesh.dir().join("ca"),
        "127.0.0.1:0",
        token,
        &mesh.dir().join("ca-serve.log"),
    );
    (KillOnDrop(child), addr)
}

fn config(mesh: &Mesh, ca: SocketAddr, backend: SocketAddr, extra_ca: &str) -> String {
    let d = mesh.dir().display();
    format!(
        "trustDomain: cluster.local
workload:
  namespace: {AGENT_NS}
  serviceAccount: {AGENT_SA}
certificates:
  istioCa:
    address: {ca}
    serverName: istiod.istio-system.svc
    rootCert: {d}/ca/root-cert.pem
    tokenFile: {d}/istio-token
    stateDir: {d}/identity
{extra_ca}policy:
  paths: [policies]
admin:
  listen: 127.0.0.1:0
inbound:
  - name: web
    listen: 127.0.0.1:0
    backend: {backend}
    protocol: http
"
    )
}

/// One request over a new mTLS connection (a new handshake each time, so every certificate
/// the agent rotates to is presented to a peer).
async fn one_request(mesh: &Mesh, agent: &AgentProc, client: &Issued) -> anyhow::Result<u16> {
    mtls_status(mesh, agent.addr("web"), client).await
}

fn generation(agent: &AgentProc) -> u64 {
    let dump = agent.admin_get("/config_dump");
    let body = dump.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["certificate"]["generation"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_from_the_ca_survives_restarts_rotates_under_load_and_fails_closed() {
    let mesh = Mesh::new();
    let token = mesh.dir().join("istio-token");
    std::fs::write(&token, "bootstrap-token\n").unwrap();
    let (ca, ca_addr) = start_ca(&mesh, &token);
    let backend = start_echo().await;
    let caller = mesh.pki.issue("default", "sleep");

    // 1. Bootstrap with the token; the key and chain are persisted, the key owner-only.
    let short = "    ttl: 1m\n    gracePeriodRatio: 0.8\n";
    let cfg = config(&mesh, ca_addr, backend, short);
    let mut agent = AgentProc::start(mesh.dir(), &cfg);
    agent.wait_for_log("Bootstrapped");
    let state = mesh.dir().join("identity");
    for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
        assert!(state.join(f).is_file(), "{f} not persisted");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key.pem mode {mode:o}");
    }
    assert_eq!(one_request(&mesh, &agent, &caller).await.unwrap(), 200);

    // 2. Rotation under load: a 1-minute certificate renewed at 20 % of its life (every ~12 s)
    // while a client makes a new mTLS connection per request. Bounded by count and time.
    let start_gen = generation(&agent);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut ok, mut failed) = (0u32, Vec::new());
    while generation(&agent) < start_gen + 2 && ok < 200_000 {
        assert!(
            Instant::now() < deadline,
            "two rotations did not happen within 60 s"
        );
        match one_request(&mesh, &agent, &caller).await {
            Ok(200) => ok += 1,
            other => failed.push(format!("{other:?}")),
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed requests: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok >= 20, "too few requests to prove anything: {ok}");

    // 3. Restart without the token (it expired): the persisted certificate is used, and a
    // renewal over mTLS works without it.
    agent.terminate();
    std::fs::remove_file(&token).unwrap();
    let mut agent = AgentProc::start(mesh.dir(), &cfg);
    agent.wait_for_log("Persisted");
    assert_eq!(one_request(&mesh, &agent, &caller).await.unwrap(), 200);
    let g = generation(&agent);
    let deadline = Instant::now() + Duration::from_secs(30);
    while generation(&agent) == g {
        assert!(
            Instant::now() < deadline,
            "no renewal over mTLS within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(one_request(&mesh, &agent, &caller).await.unwrap(), 200);

    // 4. The CA goes away: the current certificate keeps serving; renewals fail and are
    // logged; once it expires the agent is not ready and says why, and peers refuse it.
    drop(ca);
    assert_eq!(one_request(&mesh, &agent, &caller).await.unwrap(), 200);
    // The next renewal is due within ~12 s of the last one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agent
        .stderr()
        .contains("workload certificate renewal failed")
    {
        assert!(
            Instant::now() < deadline,
            "no failed renewal logged:\n{}",
            agent.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(75);
    loop {
        let ready = agent.admin_get("/healthz/ready");
        if ready.starts_with("HTTP/1.1 503") || ready.starts_with("HTTP/1.0 503") {
            assert!(
                ready.contains("the workload certificate has expired"),
                "{ready}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never became not-ready:\n{ready}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // webpki counts the notAfter second itself as valid: step past it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = one_request(&mesh, &agent, &caller).await;
    assert!(
        err.is_err(),
        "a peer accepted an expired certificate: {err:?}"
    );
    agent.wait_for_log("the workload certificate has expired");
    agent.terminate();
}

/// A token the CA refuses stops start-up at once, with the reason and what to do.
#[tokio::test]
async fn a_refused_bootstrap_token_stops_start_up_with_the_reason() {
    let mesh = Mesh::new();
    let token = mesh.dir().join("ca-token");
    std::fs::write(&token, "the-real-token").unwrap();
    let (_ca, ca_addr) = start_ca(&mesh, &token);
    std::fs::write(mesh.dir().join("istio-token"), "an-old-token").unwrap();
    let cfg_path = mesh.dir().join("agent.yaml");
    std::fs::write(
        &cfg_path,
        config(&mesh, ca_addr, "127.0.0.1:9".parse().unwrap(), ""),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificates.istioCa"), "{err}");
    assert!(err.contains("Unauthenticated"), "{err}");
    assert!(err.contains("bootstrap token was not accepted"), "{err}");
    // `--check-config` never asks the CA: it says what `run` would do.
    let out = Command::new(BIN)
        .args(["run", "--check-config", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("none persisted"), "{text}");
}
