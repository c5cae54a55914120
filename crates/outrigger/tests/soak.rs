//! The soak (issue "Reliability"): traffic at a fixed rate from a peer the policy allows and
//! from one it denies, while the workload certificate rotates every 10 s and the policy file is
//! rewritten every 2 s — alternately in place (truncate, pause, write: what editors and
//! configuration tools do) and by atomic rename. Every answer is checked: the allowed peer must
//! get 200 every time, the denied peer 403 every time; the agent's RSS is sampled.
//!
//! CI runs it for `OUTRIGGER_SOAK_SECS` (default 20 s); `scripts/soak.sh` runs it for 10
//! minutes and writes the summary that RELIABILITY.md quotes. Loopback only; every loop stops
//! at the deadline.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use outrigger_testkit::*;

const ALLOWED_RATE_PER_SEC: u64 = 100;
const DENIED_RATE_PER_SEC: u64 = 25;
const POLICY_EVERY: Duration = Duration::from_secs(2);
const CERT_EVERY: Duration = Duration::from_secs(10);
/// A new connection every this many requests, so handshakes (and rotated certificates) are
/// part of the load, not only keep-alive requests.
const REQUESTS_PER_CONNECTION: u64 = 50;

fn policy(version: u64) -> String {
    format!(
        "# version {version}
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-sleep, namespace: legacy}}
spec:
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [\"cluster.local/ns/default/sa/sleep\"]}}}}]
"
    )
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    wrong: AtomicU64,
}

/// Sends requests as `who` at `rate` per second until `deadline`, expecting `want`.
async fn drive(
    mesh: Arc<Mesh>,
    addr: std::net::SocketAddr,
    who: Issued,
    rate: u64,
    want: u16,
    deadline: Instant,
    counts: Arc<Counts>,
) {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<HttpConn> = None;
    let mut sent = 0u64;
    while Instant::now() < deadline {
        tick.tick().await;
        if sent.is_multiple_of(REQUESTS_PER_CONNECTION) {
            conn = None;
        }
        sent += 1;
        let c = match &mut conn {
            Some(c) => c,
            None => conn.insert(mesh.connect(addr, &who, false).await),
        };
        match tokio::time::timeout(Duration::from_secs(5), c.fetch(get("/soak", false))).await {
            Ok(Ok(got)) if got.status == want => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(got)) => {
                eprintln!("unexpected {} (wanted {want}): {}", got.status, got.text());
                if got.status == 200 || want == 200 && got.status == 403 {
                    counts.wrong.fetch_add(1, Ordering::Relaxed);
                } else {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Err(e)) => {
                eprintln!("request failed: {e:#}");
                counts.failed.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
            Err(_) => {
                eprintln!("request timed out");
                counts.failed.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_rotation_and_policy_rewrites() {
    let secs: u64 = std::env::var("OUTRIGGER_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
        .clamp(5, 3600);
    let mesh = Arc::new(Mesh::new());
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy("authz.yaml", &policy(0));
    let backend = start_echo().await;
    let cfg = mesh.config(&[("web", backend, "http")], "");
    let root = format!("    rootCert: {}/root-cert.pem\n", mesh.agent.dir.display());
    let cfg = cfg.replace(&root, &format!("{root}    pollInterval: 200ms\n"));
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let pid = agent.child.id();
    let addr = agent.addr("web");
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);

    let allowed = Arc::new(Counts::default());
    let denied = Arc::new(Counts::default());
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(drive(
        mesh.clone(),
        addr,
        mesh.pki.issue("default", "sleep"),
        ALLOWED_RATE_PER_SEC,
        200,
        deadline,
        allowed.clone(),
    ));
    tasks.spawn(drive(
        mesh.clone(),
        addr,
        mesh.pki.issue("default", "evil"),
        DENIED_RATE_PER_SEC,
        403,
        deadline,
        denied.clone(),
    ));

    // Policy rewrites (in place and atomic, alternately) and certificate rotations, on a
    // blocking thread: file I/O with deliberate pauses.
    let writer_mesh = mesh.clone();
    let writes = tokio::task::spawn_blocking(move || {
        let path = writer_mesh.policies.join("authz.yaml");
        let (mut version, mut rotations) = (0u64, 0u64);
        let mut next_policy = Instant::now() + POLICY_EVERY;
        let mut next_cert = Instant::now() + CERT_EVERY;
        while Instant::now() < deadline {
            let now = Instant::now();
            if now >= next_policy {
                version += 1;
                let text = policy(version);
                if version % 2 == 0 {
                    // In place: truncate, leave it empty for a moment, then write.
                    std::fs::write(&path, "").unwrap();
                    std::thread::sleep(Duration::from_millis(150));
                    std::fs::write(&path, &text).unwrap();
                } else {
                    let tmp = writer_mesh.policies.join(".authz.yaml.tmp");
                    std::fs::write(&tmp, &text).unwrap();
                    std::fs::rename(&tmp, &path).unwrap();
                }
                next_policy += POLICY_EVERY;
            }
            if now >= next_cert {
                let id = writer_mesh.agent_id();
                let fresh = writer_mesh
                    .pki
                    .ca
                    .issue_with(&outrigger_tls::ca::IssueOptions::workload(
                        &id,
                        Duration::from_secs(86400),
                    ))
                    .unwrap();
                fresh.write_to(&writer_mesh.agent.dir).unwrap();
                rotations += 1;
                next_cert += CERT_EVERY;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (version, rotations)
    });

    let mut rss = Vec::new();
    while Instant::now() < deadline {
        if let Some(r) = rss_kib(pid) {
            rss.push(r);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let (policy_writes, rotations) = writes.await.unwrap();
    let m = agent.metrics();
    let rotated = metric_value(
        &m,
        "outrigger_config_reloads_total",
        &["source=\"certificate\"", "result=\"success\""],
    )
    .unwrap_or(0.0);

    let half = rss.len() / 2;
    let first_max = rss[..half.max(1)].iter().copied().max().unwrap_or(0);
    let second_max = rss[half..].iter().copied().max().unwrap_or(0);
    let summary = serde_json::json!({
        "seconds": secs,
        "allowed": {"ok": allowed.ok.load(Ordering::Relaxed), "failed": allowed.failed.load(Ordering::Relaxed), "wrong": allowed.wrong.load(Ordering::Relaxed)},
        "denied": {"ok": denied.ok.load(Ordering::Relaxed), "failed": denied.failed.load(Ordering::Relaxed), "wrong": denied.wrong.load(Ordering::Relaxed)},
        "policy_writes": policy_writes,
        "certificate_writes": rotations,
        "certificate_rotations_applied": rotated,
        "rss_kib": {"first_half_max": first_max, "second_half_max": second_max, "last": rss.last()},
    });
    println!("soak summary: {summary}");
    if let Ok(out) = std::env::var("OUTRIGGER_SOAK_REPORT") {
        std::fs::write(out, serde_json::to_string_pretty(&summary).unwrap()).unwrap();
    }

    assert_eq!(denied.wrong.load(Ordering::Relaxed), 0, "{summary}");
    assert_eq!(allowed.wrong.load(Ordering::Relaxed), 0, "{summary}");
    assert_eq!(allowed.failed.load(Ordering::Relaxed), 0, "{summary}");
    assert_eq!(denied.failed.load(Ordering::Relaxed), 0, "{summary}");
    assert!(
        allowed.ok.load(Ordering::Relaxed) > secs * ALLOWED_RATE_PER_SEC / 2,
        "{summary}"
    );
    assert!(policy_writes >= secs / 2 - 1, "{summary}");
    if rotations > 0 {
        assert!(rotated >= 1.0, "certificate rotations applied: {summary}");
    }
    // RSS flat: the second half may not grow past the first half's peak by more than a
    // quarter (allocator noise on a small heap).
    assert!(second_max <= first_max + first_max / 4, "{summary}");
}
