//! Issue 13: what the running binary does while policy and certificate files are being
//! rewritten. A file is applied only once it reads the same for a while
//! (`outrigger_tls::settle`); a change that removes policies waits longer and is logged as a
//! warning; a certificate rotation runs every start-up check.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use outrigger_testkit::*;
use outrigger_tls::ca::IssuedCert;
use outrigger_tls::settle::{REMOVAL_SETTLE, SETTLE};

const DENY_INTRUDER: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-intruder
  namespace: legacy
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/default/sa/intruder\"]
";

/// One request on a fresh mTLS connection as `who`; the status.
async fn status(mesh: &Mesh, agent: &AgentProc, who: &Issued) -> u16 {
    let mut c = mesh.connect(agent.addr("web"), who, false).await;
    c.fetch(get("/", false)).await.unwrap().status
}

/// Rewrites `path` in place the way editors and `cat >` do: truncate (the file is empty for
/// `pause`), then write the bytes.
fn rewrite_in_place(path: &Path, text: &str, pause: Duration) {
    let mut f = std::fs::File::create(path).unwrap();
    f.flush().unwrap();
    std::thread::sleep(pause);
    f.write_all(text.as_bytes()).unwrap();
    f.sync_all().unwrap();
}

/// Issue 13 defect 1: while a policy file that DENIES a peer was rewritten in place, a reload
/// read it empty, applied "no AuthorizationPolicy" (allow everything, in Istio) and the denied
/// peer got 200. Here the file is rewritten in place over and over, with the file left empty
/// for up to 400 ms each time, while the denied peer sends requests over real mTLS: not one
/// gets through, and since every rewrite ends with the same bytes nothing is even reloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_rewrites_of_a_deny_policy_never_let_the_denied_peer_through() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("deny.yaml", DENY_INTRUDER);
    let agent = mesh.start(&[("web", start_echo().await, "http")]);
    let intruder = mesh.pki.issue("default", "intruder");
    let sleep = mesh.pki.issue("default", "sleep");
    assert_eq!(status(&mesh, &agent, &intruder).await, 403);
    assert_eq!(status(&mesh, &agent, &sleep).await, 200);

    // The writer: 40 rewrites, each empty for 0..400 ms (all shorter than the removal window;
    // most longer than the 100 ms poll interval, so the agent reads the empty file many
    // times), then full for 0..100 ms. Bounded: at most ~20 s.
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let path = mesh.policies.join("deny.yaml");
        let done = done.clone();
        std::thread::spawn(move || {
            let pauses = [0u64, 5, 50, 150, 250, 400];
            for i in 0..40usize {
                let pause = Duration::from_millis(pauses[i % pauses.len()]);
                rewrite_in_place(&path, DENY_INTRUDER, pause);
                std::thread::sleep(Duration::from_millis((i as u64 * 37) % 100));
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    assert!(REMOVAL_SETTLE > Duration::from_millis(400));

    // The denied peer, in a loop over real mTLS until the writer is done (bounded by count
    // and time).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut allowed, mut denied) = (0u32, 0u32);
    let mut conn = mesh.connect(agent.addr("web"), &intruder, false).await;
    while !done.load(Ordering::SeqCst) && denied + allowed < 100_000 {
        assert!(Instant::now() < deadline, "the writer did not finish");
        let got = match conn.fetch(get("/", false)).await {
            Ok(g) => g,
            Err(_) => {
                conn = mesh.connect(agent.addr("web"), &intruder, false).await;
                continue;
            }
        };
        match got.status {
            200 => allowed += 1,
            403 => denied += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    writer.join().unwrap();
    assert_eq!(allowed, 0, "the denied peer got 200 on {allowed} requests");
    assert!(denied >= 50, "too few requests to prove anything: {denied}");

    // Still denied once the writer is done; the bytes never changed, so no reload happened.
    assert_eq!(status(&mesh, &agent, &intruder).await, 403);
    assert_eq!(status(&mesh, &agent, &sleep).await, 200);
    let m = agent.metrics();
    assert_eq!(
        metric_value(&m, "outrigger_config_reloads_total", &["source=\"policy\""]),
        None,
        "{m}"
    );
}

/// A deliberate change that removes every policy of a file is applied, but only once the file
/// has read the same for `REMOVAL_SETTLE`; meanwhile the old policy stays in force and
/// `/config_dump` and `/healthz/ready` show the pending removal; when applied it is logged
/// as a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliberate_removal_of_every_policy_applies_once_stable_with_a_warning() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("deny.yaml", DENY_INTRUDER);
    let agent = mesh.start(&[("web", start_echo().await, "http")]);
    let intruder = mesh.pki.issue("default", "intruder");
    assert_eq!(status(&mesh, &agent, &intruder).await, 403);

    let emptied = Instant::now();
    std::fs::write(mesh.policies.join("deny.yaml"), "").unwrap();

    // The removal is seen, and waits.
    let deadline = Instant::now() + Duration::from_secs(10);
    let dump = loop {
        let dump = agent.admin_get("/config_dump");
        if dump.contains("\"removes_policies\": true") {
            break dump;
        }
        assert!(
            Instant::now() < deadline,
            "the removal never showed as pending: {dump}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(dump.contains("removes every policy of"), "{dump}");
    assert!(dump.contains("deny.yaml"), "{dump}");
    let ready = agent.admin_get("/healthz/ready");
    assert!(ready.starts_with("HTTP/1.0 200"), "{ready}");
    assert!(
        ready.contains("policy: version 1 in force; change pending for")
            && ready.contains("(removes policies)"),
        "{ready}"
    );
    // Still denied while pending (the removal has not been stable for long enough yet).
    if emptied.elapsed() < REMOVAL_SETTLE {
        assert_eq!(status(&mesh, &agent, &intruder).await, 403);
    }

    agent.wait_metric(
        "outrigger_config_reloads_total",
        &["source=\"policy\"", "result=\"success\""],
        1.0,
    );
    assert!(
        emptied.elapsed() >= REMOVAL_SETTLE,
        "applied after {:?}",
        emptied.elapsed()
    );
    assert_eq!(status(&mesh, &agent, &intruder).await, 200);
    let log = agent.wait_for_log("policy reloaded: the change removes every policy of");
    assert!(log.contains("WARN"), "{log}");
    let dump = agent.admin_get("/config_dump");
    assert!(dump.contains("\"pending_change\": null"), "{dump}");
    let ready = agent.admin_get("/healthz/ready");
    assert!(ready.contains("policy: version 2 in force\n"), "{ready}");
}

/// An ordinary change (not a removal) applies after `SETTLE`, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_change_applies_once_it_reads_the_same() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let agent = mesh.start(&[("web", start_echo().await, "http")]);
    let intruder = mesh.pki.issue("default", "intruder");
    assert_eq!(status(&mesh, &agent, &intruder).await, 200);
    let written = Instant::now();
    mesh.policy("deny.yaml", DENY_INTRUDER);
    agent.wait_metric(
        "outrigger_config_reloads_total",
        &["source=\"policy\"", "result=\"success\""],
        1.0,
    );
    assert!(written.elapsed() >= SETTLE, "{:?}", written.elapsed());
    assert_eq!(status(&mesh, &agent, &intruder).await, 403);
    let log = agent.wait_for_log("policy reloaded");
    assert!(!log.contains("removes every policy"), "{log}");
}

/// The mesh's agent configuration, with the certificate files polled every 100 ms.
fn fast_cert_poll(mesh: &Mesh) -> String {
    let cfg = mesh.config(&[("web", "127.0.0.1:9".parse().unwrap(), "http")], "");
    let root = format!("    rootCert: {}/root-cert.pem\n", mesh.agent.dir.display());
    assert!(cfg.contains(&root));
    cfg.replace(&root, &format!("{root}    pollInterval: 100ms\n"))
}

/// The identity the agent presents to a client that pins nothing, and the leaf.
async fn presented(mesh: &Mesh, agent: &AgentProc) -> (String, Vec<u8>) {
    let client = mesh.pki.issue("default", "probe");
    let cfg =
        outrigger_tls::client_config(&client.certs, &mesh.pki.trust(), &[], &[b"istio-http/1.1"])
            .unwrap();
    let tls = tls_connect(agent.addr("web"), cfg).await.unwrap();
    let chain = tls.get_ref().1.peer_certificates().unwrap().to_vec();
    (
        outrigger_tls::peer_identity(&chain).unwrap().to_string(),
        chain[0].to_vec(),
    )
}

fn write_set(dir: &Path, set: &IssuedCert) {
    set.write_to(dir).unwrap();
}

/// Issue 13 defect 3: replacing the files with a certificate for another SPIFFE ID was
/// accepted at rotation ("rotated identity=…other") and the agent served as another workload.
/// Now the set is refused (error log naming the reason, metric, `/config_dump`) and a real mTLS
/// client still sees the agent's own identity; a good rotation then still applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_identity_certificate_is_refused_at_rotation() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let agent = AgentProc::start(mesh.dir(), &fast_cert_poll(&mesh));
    let own = mesh.agent_id().to_string();
    let (id0, leaf0) = presented(&mesh, &agent).await;
    assert_eq!(id0, own);

    // Start-up refuses these files (same check): prove it on a second agent first.
    let other = mesh.pki.issue("default", "linux-client");
    let refused_dir = mesh.dir().join("refused-start");
    std::fs::create_dir_all(&refused_dir).unwrap();
    let cfg = mesh
        .config(&[("web", "127.0.0.1:9".parse().unwrap(), "http")], "")
        .replace(
            &mesh.agent.dir.display().to_string(),
            &other.dir.display().to_string(),
        )
        .replace(
            "paths: [policies]",
            &format!("paths: [{}]", mesh.policies.display()),
        );
    std::fs::write(refused_dir.join("agent.yaml"), cfg).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(refused_dir.join("agent.yaml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("ns/default/sa/linux-client"), "{err}");

    // Rotation to the same files is refused.
    write_set(&mesh.agent.dir, &other.pem);
    agent.wait_metric(
        "outrigger_certificate_rotation_failures_total",
        &["reason=\"identity_mismatch\""],
        1.0,
    );
    let log = agent.wait_for_log("new workload credentials refused");
    assert!(log.contains("identity_mismatch"), "{log}");
    assert!(!log.contains("workload certificate rotated"), "{log}");
    let (id1, leaf1) = presented(&mesh, &agent).await;
    assert_eq!(id1, own, "the agent must keep its own identity");
    assert_eq!(leaf1, leaf0);
    // A client pinning the agent's identity still gets through.
    let sleep = mesh.pki.issue("default", "sleep");
    let _ = mesh.connect(agent.addr("web"), &sleep, false).await;
    let dump = agent.admin_get("/config_dump");
    assert!(dump.contains("\"reason\": \"identity_mismatch\""), "{dump}");
    let ready = agent.admin_get("/healthz/ready");
    assert!(
        ready.contains("certificate: generation 0 in force")
            && ready.contains("last rotation refused"),
        "{ready}"
    );

    // Refused once, not on every poll.
    std::thread::sleep(SETTLE * 2);
    let m = agent.metrics();
    assert_eq!(
        metric_value(&m, "outrigger_certificate_rotation_failures_total", &[]),
        Some(1.0),
        "{m}"
    );

    // A good set for the agent's identity still rotates.
    let good = mesh.pki.issue(AGENT_NS, AGENT_SA);
    write_set(&mesh.agent.dir, &good.pem);
    agent.wait_metric(
        "outrigger_config_reloads_total",
        &["source=\"certificate\"", "result=\"success\""],
        1.0,
    );
    let (id2, leaf2) = presented(&mesh, &agent).await;
    assert_eq!(id2, own);
    assert_ne!(leaf2, leaf0);
    assert_eq!(leaf2, good.certs.leaf().to_vec());
}

/// A chain and key rewritten in place (key first, then the chain truncated, half-written and
/// completed) are never applied half-way and produce no refusal: the complete set rotates
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_certificate_is_not_applied() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let agent = AgentProc::start(mesh.dir(), &fast_cert_poll(&mesh));
    let (_, leaf0) = presented(&mesh, &agent).await;
    let next = mesh.pki.issue(AGENT_NS, AGENT_SA);
    let chain = mesh.agent.dir.join("cert-chain.pem");
    let key = mesh.agent.dir.join("key.pem");

    // The writer: new key, then the chain truncated, half-written and completed. Each state
    // holds for SETTLE / 4 (the writer's pace), longer than the 100 ms poll interval.
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (chain, key, done) = (chain.clone(), key.clone(), done.clone());
        let (pem, key_pem) = (next.pem.cert_chain_pem.clone(), next.pem.key_pem.clone());
        std::thread::spawn(move || {
            let step = SETTLE / 4;
            let mut last = Instant::now();
            let mut longest = Duration::ZERO;
            let mut mark = |longest: &mut Duration| {
                *longest = (*longest).max(last.elapsed());
                last = Instant::now();
            };
            rewrite_in_place(&key, &key_pem, Duration::ZERO);
            mark(&mut longest);
            std::thread::sleep(step);
            rewrite_in_place(&chain, &pem[..pem.len() / 2], step);
            mark(&mut longest);
            std::thread::sleep(step);
            rewrite_in_place(&chain, &pem, Duration::ZERO);
            mark(&mut longest);
            done.store(true, Ordering::SeqCst);
            longest
        })
    };
    // Mid-write, peers keep getting the old certificate.
    let mut probes = 0;
    while !done.load(Ordering::SeqCst) {
        assert_eq!(presented(&mesh, &agent).await.1, leaf0);
        probes += 1;
    }
    let longest = writer.join().unwrap();
    assert!(
        longest < SETTLE,
        "the writer held a state for {longest:?}: too slow to test the settle window"
    );
    assert!(probes >= 1);

    agent.wait_metric(
        "outrigger_config_reloads_total",
        &["source=\"certificate\"", "result=\"success\""],
        1.0,
    );
    assert_eq!(presented(&mesh, &agent).await.1, next.certs.leaf().to_vec());
    let m = agent.metrics();
    assert_eq!(
        metric_value(&m, "outrigger_certificate_rotation_failures_total", &[]),
        None,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "outrigger_config_reloads_total",
            &["source=\"certificate\""]
        ),
        Some(1.0),
        "{m}"
    );
    let log = agent.stderr() + &agent.stdout();
    assert!(!log.contains("refused"), "{log}");
}
