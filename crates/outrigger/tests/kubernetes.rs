//! Policy from the cluster (`policy.kubernetes`, issue 11 item 6), end to end through the real
//! binary and real mTLS requests. No API server can run on the test machines: the agent
//! watches `outrigger_testkit::kube_api::FakeKubeApi`, a small HTTP server in the test that
//! lists and watches the way the API server does (resourceVersion, bookmarks, an ERROR event
//! with a 410 Status for an expired resourceVersion, dropped watch connections).
#![cfg(feature = "kubernetes")]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use outrigger_testkit::kube_api::FakeKubeApi;
use outrigger_testkit::*;
use serde_json::{Value, json};

const TOKEN: &str = "test-sa-token";

fn deny(name: &str, who: &str) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": AGENT_NS},
        "spec": {
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": [format!("cluster.local/ns/default/sa/{who}")]}}]}],
        },
    })
}

fn mesh_strict() -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system"},
        "spec": {"mtls": {"mode": "STRICT"}},
    })
}

/// The `policy.kubernetes` section for a token-file client of `api`.
fn kube_section(mesh: &Mesh, server: &str) -> String {
    std::fs::write(mesh.dir().join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::create_dir_all(mesh.dir().join("state")).unwrap();
    format!(
        "  kubernetes:\n    server: {server}\n    tokenFile: token\n    stateFile: state/cluster-policy.json\n    syncTimeout: 2s\n    maxBackoff: 300ms\n"
    )
}

fn config_with(mesh: &Mesh, backend: std::net::SocketAddr, section: &str) -> String {
    mesh.config(&[("web", backend, "http")], "").replace(
        "  reloadInterval: 100ms\n",
        &format!("  reloadInterval: 100ms\n{section}"),
    )
}

async fn status(mesh: &Mesh, agent: &AgentProc, who: &Issued) -> u16 {
    let mut c = mesh.connect(agent.addr("web"), who, false).await;
    c.fetch(get("/", false)).await.unwrap().status
}

/// Polls until `who` gets `want` (the watch applies changes asynchronously). Fails after 10 s.
async fn wait_status(mesh: &Mesh, agent: &AgentProc, who: &Issued, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = status(mesh, agent, who).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{who:?} got {got}, never {want}:\n{}",
            agent.stderr() + &agent.stdout(),
            who = who.dir
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config_dump(agent: &AgentProc) -> Value {
    let raw = agent.admin_get("/config_dump");
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {raw}"))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A DENY added in the cluster takes effect, its change too, its deletion too; each policy is
/// named `cluster:<ns>/<kind>/<name> (resourceVersion N)` in `/config_dump`; the watch asks for
/// bookmarks and resumes from the bookmark's resourceVersion after a dropped connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_policy_in_the_cluster_is_added_changed_and_deleted() {
    let api = FakeKubeApi::start(Some(TOKEN)).await;
    api.apply(mesh_strict());
    let mesh = Mesh::new();
    let section = kube_section(&mesh, &api.url());
    let agent = AgentProc::start(
        mesh.dir(),
        &config_with(&mesh, start_echo().await, &section),
    );
    let intruder = mesh.pki.issue("default", "intruder");
    let sleep = mesh.pki.issue("default", "sleep");
    assert_eq!(status(&mesh, &agent, &intruder).await, 200);

    let rv = api.apply(deny("deny-cluster", "intruder"));
    wait_status(&mesh, &agent, &intruder, 403).await;
    assert_eq!(status(&mesh, &agent, &sleep).await, 200);
    let dump = config_dump(&agent);
    let applied = dump["policy"]["applied"].as_array().unwrap();
    let want = format!("cluster:legacy/AuthorizationPolicy/deny-cluster (resourceVersion {rv})");
    assert!(
        applied.iter().any(|a| a["source"] == want.as_str()),
        "{dump:#}"
    );
    assert!(
        applied.iter().any(|a| a["source"]
            .as_str()
            .unwrap()
            .starts_with("cluster:istio-system/PeerAuthentication/default (resourceVersion ")),
        "{dump:#}"
    );
    let cluster = &dump["policy"]["cluster"];
    assert_eq!(cluster["connected"], true, "{dump:#}");
    assert_eq!(cluster["in_force_from"], "api-server", "{dump:#}");
    assert_eq!(cluster["server"], api.url().as_str(), "{dump:#}");

    // Modified: now it denies `sleep`, not `intruder`.
    api.apply(deny("deny-cluster", "sleep"));
    wait_status(&mesh, &agent, &sleep, 403).await;
    assert_eq!(status(&mesh, &agent, &intruder).await, 200);

    // A bookmark, then a dropped watch: the watch resumes from the bookmark, no relist.
    let lists = api.list_count();
    // No wait is needed between these: each watch stream carries the bookmark, the change and
    // its end in the order they were made (one broadcast, read in order by each stream's task,
    // and a body's end comes after its queued events), so the agent reads them in that order.
    let bookmark_rv = api.bookmark();
    // A change after the bookmark: its own stream resumes from it, the others from the bookmark.
    api.apply(deny("other", "nobody"));
    api.drop_watches();
    let marker = format!("resourceVersion={bookmark_rv}");
    wait_until(
        "a watch resumed from the bookmark's resourceVersion",
        || {
            api.requests()
                .iter()
                .any(|r| r.contains("watch=true") && r.contains(&marker))
        },
    );
    let reqs = api.requests();
    assert!(
        reqs.iter()
            .filter(|r| r.contains("watch=true"))
            .all(|r| r.contains("allowWatchBookmarks=true")),
        "{reqs:#?}"
    );

    // Deleted: nobody is denied.
    api.delete(AGENT_NS, "AuthorizationPolicy", "deny-cluster");
    wait_status(&mesh, &agent, &sleep, 200).await;
    assert_eq!(status(&mesh, &agent, &intruder).await, 200);
    assert_eq!(api.list_count(), lists, "no relist: {:#?}", api.requests());
    let m = agent.metrics();
    assert!(
        metric_value(
            &m,
            "outrigger_config_reloads_total",
            &["source=\"kubernetes\"", "result=\"success\""]
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{m}"
    );
}

/// `410 Gone` on the watch: the agent lists again and the policy in force is never lost; a
/// change made while the watch was expired is picked up by the relist; dropped connections
/// reconnect and resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_relists_and_a_dropped_watch_resumes_without_losing_policy() {
    let api = FakeKubeApi::start(Some(TOKEN)).await;
    api.apply(mesh_strict());
    api.apply(deny("deny-intruder", "intruder"));
    let mesh = Mesh::new();
    let section = kube_section(&mesh, &api.url());
    // A token file as the kubelet projects it: no trailing newline.
    std::fs::write(mesh.dir().join("token"), TOKEN).unwrap();
    let agent = AgentProc::start(
        mesh.dir(),
        &config_with(&mesh, start_echo().await, &section),
    );
    let intruder = mesh.pki.issue("default", "intruder");
    let sleep = mesh.pki.issue("default", "sleep");
    assert_eq!(status(&mesh, &agent, &intruder).await, 403);
    let lists = api.list_count();
    assert!(
        !agent.stderr().contains("ends with a newline"),
        "a token file without a newline is re-read as it rotates"
    );

    api.expire_watches();
    // Changed while the watch is expired: only the relist can tell.
    api.apply(deny("deny-sleep", "sleep"));
    for _ in 0..10 {
        assert_eq!(status(&mesh, &agent, &intruder).await, 403);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    wait_status(&mesh, &agent, &sleep, 403).await;
    assert_eq!(status(&mesh, &agent, &intruder).await, 403);
    assert!(api.list_count() > lists, "no relist after 410");
    agent.wait_for_log("relisting legacy authorizationpolicies");
    let dump = config_dump(&agent);
    assert!(
        dump["policy"]["cluster"]["relists"].as_u64().unwrap() >= 1,
        "{dump:#}"
    );

    // Dropped watch connections: they reconnect and resume (no relist), and still follow.
    let lists = api.list_count();
    let watches = api.watch_count();
    api.drop_watches();
    wait_until("the watches reconnect", || api.watch_count() >= watches + 6);
    api.delete(AGENT_NS, "AuthorizationPolicy", "deny-sleep");
    wait_status(&mesh, &agent, &sleep, 200).await;
    assert_eq!(status(&mesh, &agent, &intruder).await, 403);
    assert_eq!(api.list_count(), lists, "{:#?}", api.requests());
}

/// The API server goes away: the last good set stays in force. The agent restarts while it is
/// still away: the persisted set is enforced (and said loudly), so the denied caller stays
/// denied. The API server comes back: the agent follows it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_api_server_the_last_set_stays_and_survives_a_restart() {
    let api = FakeKubeApi::start(Some(TOKEN)).await;
    api.apply(mesh_strict());
    api.apply(deny("deny-intruder", "intruder"));
    let mesh = Mesh::new();
    let section = kube_section(&mesh, &api.url());
    let backend = start_echo().await;
    let config = config_with(&mesh, backend, &section);
    let mut agent = AgentProc::start(mesh.dir(), &config);
    let intruder = mesh.pki.issue("default", "intruder");
    let sleep = mesh.pki.issue("default", "sleep");
    assert_eq!(status(&mesh, &agent, &intruder).await, 403);
    let state = mesh.dir().join("state/cluster-policy.json");
    let persisted = std::fs::read_to_string(&state).unwrap();
    assert!(persisted.contains("deny-intruder"), "{persisted}");

    api.stop();
    wait_until("the agent notices the API server is gone", || {
        config_dump(&agent)["policy"]["cluster"]["connected"] == false
    });
    for _ in 0..20 {
        assert_eq!(status(&mesh, &agent, &intruder).await, 403);
        assert_eq!(status(&mesh, &agent, &sleep).await, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Restart without the API server.
    agent.terminate();
    drop(agent);
    let agent = AgentProc::start(mesh.dir(), &config);
    assert_eq!(status(&mesh, &agent, &intruder).await, 403);
    assert_eq!(status(&mesh, &agent, &sleep).await, 200);
    agent.wait_for_log("ENFORCING THE PERSISTED CLUSTER POLICY");
    let dump = config_dump(&agent);
    assert_eq!(
        dump["policy"]["cluster"]["in_force_from"], "state-file",
        "{dump:#}"
    );
    assert!(
        dump["policy"]["applied"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["source"]
                .as_str()
                .unwrap()
                .starts_with("cluster:legacy/AuthorizationPolicy/deny-intruder")),
        "{dump:#}"
    );

    // The API server is back, with a change: followed again.
    api.apply(deny("deny-sleep", "sleep"));
    api.restart().await;
    wait_status(&mesh, &agent, &sleep, 403).await;
    assert_eq!(status(&mesh, &agent, &intruder).await, 403);
    wait_until("in force from the API server again", || {
        config_dump(&agent)["policy"]["cluster"]["in_force_from"] == "api-server"
    });
    // Persisted just after it is applied.
    wait_until("the new set is persisted", || {
        std::fs::read_to_string(&state)
            .unwrap()
            .contains("deny-sleep")
    });
}

/// With no API server and nothing persisted, the agent refuses to start (it would start
/// without the cluster's policy) and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_api_server_and_nothing_persisted_refuses_to_start() {
    let mesh = Mesh::new();
    let dead = dead_addr().await;
    let section = kube_section(&mesh, &format!("http://{dead}"));
    let cfg = mesh.dir().join("agent.yaml");
    std::fs::write(&cfg, config_with(&mesh, start_echo().await, &section)).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("refusing to start"), "{stderr}");
    assert!(
        stderr.contains("no persisted cluster policy in"),
        "{stderr}"
    );
}

/// One invalid resource in the cluster is refused alone (as from a file): the valid ones are
/// enforced, the refused one is listed with its `cluster:` name and field path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_cluster_resource_is_refused_alone() {
    let api = FakeKubeApi::start(Some(TOKEN)).await;
    api.apply(mesh_strict());
    api.apply(deny("deny-intruder", "intruder"));
    // Refused (an unknown field); its fail-closed stand-in applies to what it selects, another
    // workload, so nothing of it touches this one.
    let mut bad = deny("bad", "sleep");
    bad["spec"]["rules"][0]["to"] = json!([{"operation": {"methods": ["GET"], "bogus": true}}]);
    bad["spec"]["selector"] = json!({"matchLabels": {"app": "another-app"}});
    let bad_rv = api.apply(bad);
    let mesh = Mesh::new();
    let section = kube_section(&mesh, &api.url());
    let agent = AgentProc::start(
        mesh.dir(),
        &config_with(&mesh, start_echo().await, &section),
    );
    let intruder = mesh.pki.issue("default", "intruder");
    let other = mesh.pki.issue("default", "other");
    assert_eq!(status(&mesh, &agent, &intruder).await, 403);
    assert_eq!(status(&mesh, &agent, &other).await, 200);
    let dump = config_dump(&agent);
    let refused = dump["policy"]["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{dump:#}");
    let want = format!("cluster:legacy/AuthorizationPolicy/bad (resourceVersion {bad_rv})");
    assert_eq!(refused[0]["source"], want.as_str(), "{dump:#}");
    let err = refused[0]["error"].as_str().unwrap();
    assert!(
        err.starts_with(&format!("{want}: spec.rules[0].to[0].operation")),
        "{err}"
    );
    assert!(refused[0]["effect"].as_str().is_some(), "{dump:#}");
    agent.wait_for_log("policy refused: AuthorizationPolicy");
    let m = agent.metrics();
    assert_eq!(
        metric_value(
            &m,
            "outrigger_config_reloads_total",
            &["source=\"kubernetes\""]
        ),
        None,
        "{m}"
    );
}

fn kubeconfig(server: &str, ca_pem: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: {server}
    certificate-authority-data: {ca}
    tls-server-name: localhost
users:
- name: outrigger-policy-reader
  user:
    token: {TOKEN}
contexts:
- name: outrigger
  context:
    cluster: lab
    user: outrigger-policy-reader
    namespace: legacy
current-context: outrigger
"
    )
}

/// The kubeconfig form: a real kubeconfig with a token and the CA of an API server that
/// speaks TLS; a policy file and a cluster policy of the same namespace/name: the file's wins;
/// `outrigger check` reads the persisted cluster policy and names its source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubeconfig_with_token_and_ca_over_tls_and_check_names_the_cluster_source() {
    let mesh = Mesh::new();
    let server_cert = mesh
        .pki
        .ca
        .issue_with(&outrigger_tls::ca::IssueOptions {
            uri_sans: Vec::new(),
            dns_sans: vec!["localhost".into()],
            not_before: std::time::SystemTime::now() - Duration::from_secs(60),
            not_after: std::time::SystemTime::now() + Duration::from_secs(3600),
        })
        .unwrap();
    let api = FakeKubeApi::start_tls(
        Some(TOKEN),
        &server_cert.cert_chain_pem,
        &server_cert.key_pem,
    )
    .await;
    api.apply(mesh_strict());
    api.apply(deny("deny-intruder", "intruder"));
    api.apply(deny("shadowed", "sleep"));
    // The file's `shadowed` denies nobody known: it wins over the cluster's.
    mesh.policy(
        "shadowed.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: shadowed\n  namespace: legacy\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/nobody\"]\n",
    );
    let kc = mesh.dir().join("kubeconfig");
    std::fs::write(&kc, kubeconfig(&api.url(), mesh.pki.ca.root_pem())).unwrap();
    std::fs::create_dir_all(mesh.dir().join("state")).unwrap();
    let section = "  kubernetes:\n    kubeconfig: kubeconfig\n    stateFile: state/cluster-policy.json\n    syncTimeout: 5s\n";
    let config = config_with(&mesh, start_echo().await, section);
    let agent = AgentProc::start(mesh.dir(), &config);
    let intruder = mesh.pki.issue("default", "intruder");
    let sleep = mesh.pki.issue("default", "sleep");
    assert_eq!(status(&mesh, &agent, &intruder).await, 403);
    assert_eq!(status(&mesh, &agent, &sleep).await, 200);
    agent.wait_for_log("the policy file");
    assert!(
        api.requests()
            .iter()
            .all(|r| r.starts_with("GET /apis/security.istio.io/v1/namespaces/"))
    );

    // `outrigger check` reads the persisted set: denied, by the cluster's policy.
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(mesh.dir().join("agent.yaml"))
        .args(["--from", "cluster.local/ns/default/sa/intruder", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["policy"], "legacy/deny-intruder", "{v:#}");
    assert!(
        v["policies"].as_array().unwrap().iter().any(|p| p["source"]
            .as_str()
            .unwrap()
            .starts_with("cluster:legacy/AuthorizationPolicy/deny-intruder (resourceVersion ")),
        "{v:#}"
    );
    assert!(
        v["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "legacy/shadowed"
                && p["source"].as_str().unwrap().ends_with("shadowed.yaml:1")),
        "{v:#}"
    );
    assert_eq!(v["cluster_policy"]["server"], api.url().as_str(), "{v:#}");
    check_stands_without_state(mesh.dir());
}

/// `check` without a persisted set refuses to answer (exit 3) instead of answering without the
/// cluster's policy.
fn check_stands_without_state(dir: &Path) {
    std::fs::remove_file(dir.join("state/cluster-policy.json")).unwrap();
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(dir.join("agent.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no cluster policy persisted"), "{err}");
}

/// A change that removes every cluster policy is held for `REMOVAL_SETTLE` (as for files): the
/// policy in force stays meanwhile and `/config_dump` shows the pending removal; if the cluster
/// still holds none then, it applies, with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_every_cluster_policy_waits_and_then_applies_with_a_warning() {
    use outrigger_tls::settle::REMOVAL_SETTLE;
    let api = FakeKubeApi::start(Some(TOKEN)).await;
    api.apply(deny("deny-intruder", "intruder"));
    let mesh = Mesh::new();
    let section = kube_section(&mesh, &api.url());
    let agent = AgentProc::start(
        mesh.dir(),
        &config_with(&mesh, start_echo().await, &section),
    );
    let intruder = mesh.pki.issue("default", "intruder");
    assert_eq!(status(&mesh, &agent, &intruder).await, 403);

    let removed = Instant::now();
    api.delete(AGENT_NS, "AuthorizationPolicy", "deny-intruder");
    wait_until("the removal shows as pending", || {
        config_dump(&agent)["policy"]["pending_change"]["removes_policies"] == true
    });
    while removed.elapsed() < REMOVAL_SETTLE - Duration::from_millis(500) {
        assert_eq!(status(&mesh, &agent, &intruder).await, 403);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_status(&mesh, &agent, &intruder, 200).await;
    assert!(removed.elapsed() >= REMOVAL_SETTLE);
    agent.wait_for_log("every cluster policy removed");
    assert_eq!(config_dump(&agent)["policy"]["pending_change"], Value::Null);
    // Persisted just after it is applied.
    wait_until("the empty set is persisted", || {
        !std::fs::read_to_string(mesh.dir().join("state/cluster-policy.json"))
            .unwrap()
            .contains("deny-intruder")
    });
}
