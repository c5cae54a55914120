//! The admin API through the real binary: the log filter changed at run time
//! (`POST /logging?level=`, as Envoy's admin), `/stats`, and metrics on a listener of their own
//! (`admin.metricsListen`) that serves nothing else.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use outrigger_testkit::*;

/// One plain HTTP/1.0 request to `addr`, the whole answer.
fn http(addr: SocketAddr, method: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.0\r\nhost: admin\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_stats_and_a_metrics_only_listener() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let cfg = mesh
        .config(&[("web", start_echo().await, "http")], "")
        .replace(
            "admin:\n  listen: 127.0.0.1:0\n",
            "admin:\n  listen: 127.0.0.1:0\n  metricsListen: 127.0.0.1:0\n",
        );
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let sleep = mesh.pki.issue("default", "sleep");
    assert_eq!(
        mtls_status(&mesh, agent.addr("web"), &sleep).await.unwrap(),
        200
    );

    // The log filter: shown, refused when invalid (the old one stays), changed.
    let admin = agent.admin;
    let shown = http(admin, "GET", "/logging");
    assert!(shown.contains("active log filter: info"), "{shown}");
    let bad = http(admin, "POST", "/logging?level=loud");
    assert!(
        bad.starts_with("HTTP/1.0 400") || bad.starts_with("HTTP/1.1 400"),
        "{bad}"
    );
    assert!(bad.contains("`loud` is not a log level"), "{bad}");
    let missing = http(admin, "POST", "/logging");
    assert!(missing.contains("usage: POST /logging?level="), "{missing}");
    let set = http(
        admin,
        "POST",
        "/logging?level=info%2Coutrigger_proxy%3Ddebug",
    );
    assert!(
        set.contains("active log filter: info,outrigger_proxy=debug"),
        "{set}"
    );
    agent.wait_for_log("log filter changed through the admin API");
    // Debug lines of the proxy now appear: a denial is logged at debug.
    assert!(!agent.stderr().contains("denied by authorization policy"));
    mesh.policy(
        "deny.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-intruder\n  namespace: legacy\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/default/sa/intruder]\n",
    );
    let intruder = mesh.pki.issue("default", "intruder");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while mtls_status(&mesh, agent.addr("web"), &intruder)
        .await
        .unwrap()
        != 403
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the DENY policy never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.wait_for_log("denied by authorization policy");
    // Any other method is refused, and GET never changes it.
    assert!(http(admin, "PUT", "/logging?level=debug").contains("405"));
    assert!(http(admin, "GET", "/logging?level=error").contains("info,outrigger_proxy=debug"));

    // /stats: one total per metric family.
    let stats = http(admin, "GET", "/stats");
    let requests = stats
        .lines()
        .find_map(|l| l.strip_prefix("istio_requests_total: "))
        .unwrap_or_else(|| panic!("no istio_requests_total in /stats:\n{stats}"));
    assert!(requests.parse::<f64>().unwrap() >= 2.0, "{stats}");

    // The metrics listener: metrics, and nothing else of the admin API.
    let ready: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(mesh.dir().join("ready.json")).unwrap())
            .unwrap();
    let metrics: SocketAddr = ready["metrics"].as_str().unwrap().parse().unwrap();
    assert_ne!(metrics, admin);
    let m = http(metrics, "GET", "/metrics");
    assert!(m.contains("istio_requests_total"), "{m}");
    assert!(http(metrics, "GET", "/stats/prometheus").contains("istio_requests_total"));
    for hidden in ["/config_dump", "/logging", "/stats", "/healthz/ready"] {
        let r = http(metrics, "GET", hidden);
        assert!(
            r.contains("404") && r.contains("serves /metrics only"),
            "{hidden}: {r}"
        );
    }
    assert!(http(metrics, "POST", "/logging?level=off").contains("404"));
}

/// `deploy/grafana/outrigger-host.json` queries only what the agent exports: every metric a
/// panel names is registered (metrics.rs, the one place families are named; a family without
/// samples yet is not in `/metrics` at all), and every label a panel groups by is on that
/// metric's samples in a running agent's `/metrics` once there is traffic — so a renamed
/// metric or label fails here, not on an operator's empty panel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_names_what_the_agent_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../deploy/grafana/outrigger-host.json")).unwrap();
    let mesh = Mesh::new();
    mesh.policy(
        "deny.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: legacy}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: [/admin]}}]}]
",
    );
    let agent = mesh.start(&[("web", start_echo().await, "http")]);
    let sleep = mesh.pki.issue("default", "sleep");
    let mut conn = mesh.connect(agent.addr("web"), &sleep, false).await;
    assert_eq!(conn.fetch(get("/", false)).await.unwrap().status, 200);
    assert_eq!(conn.fetch(get("/admin", false)).await.unwrap().status, 403);
    let metrics = agent.wait_metric(
        "outrigger_authorization_decisions_total",
        &["action=\"deny\""],
        1.0,
    );

    const REGISTERED: &str = include_str!("../../outrigger-proxy/src/metrics.rs");
    assert!(
        metrics.contains("# TYPE outrigger_authorization_decisions counter")
            && REGISTERED
                .contains("registry.register(\n            \"outrigger_authorization_decisions\",")
    );
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 12, "{exprs:?}");
    let mut checked = 0;
    for expr in &exprs {
        let words: Vec<&str> = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("istio_") || w.starts_with("outrigger_"))
            .collect();
        assert!(!words.is_empty(), "no metric in {expr}");
        for name in words {
            let family = name
                .strip_suffix("_bucket")
                .or_else(|| name.strip_suffix("_total"))
                .unwrap_or(name);
            assert!(
                REGISTERED.contains(&format!("registry.register(\n            \"{family}\",")),
                "{expr}: the agent registers no {family}"
            );
            checked += 1;
            // Labels grouped by must be on the metric's samples (when it has any yet).
            let samples: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with(&format!("{name}{{")))
                .collect();
            if let Some(by) = expr.split("by (").nth(1).and_then(|r| r.split(')').next())
                && !samples.is_empty()
            {
                for label in by.split(',').map(str::trim).filter(|l| *l != "le") {
                    assert!(
                        samples.iter().all(|s| s.contains(&format!("{label}=\""))),
                        "{expr}: {name} has no label {label}: {samples:?}"
                    );
                }
            }
        }
    }
    assert!(checked >= 14);
}
