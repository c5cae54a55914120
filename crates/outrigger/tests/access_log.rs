//! The access log through the real binary: the deciding policy and rule, the reason, the JWT
//! principal and the AUDIT mark in both formats (JSON, and Istio's default text format —
//! `EnvoyTextLogFormat` in istio/istio `pilot/pkg/model/telemetry_logging.go`), and size-based
//! rotation under a burst of requests: every line present exactly once across the files.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use common::*;
use outrigger_testkit::*;

const ISS: &str = "https://issuer.example";

/// A RequestAuthentication with an inline JWKS, and a token for `sub` signed with its key.
fn jwt_setup() -> (String, impl Fn(&str) -> String) {
    let key = Ed25519KeyPair::generate().unwrap();
    let jwks = serde_json::json!({"keys": [{"kty": "OKP", "kid": "k", "crv": "Ed25519", "x": b64(key.public_key().as_ref())}]}).to_string();
    let ra = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: jwt\n  namespace: legacy\nspec:\n  jwtRules:\n  - issuer: \"{ISS}\"\n    jwks: '{jwks}'\n"
    );
    let token = move |sub: &str| {
        let header = serde_json::json!({"alg": "EdDSA", "kid": "k", "typ": "JWT"});
        let claims =
            serde_json::json!({"iss": ISS, "sub": sub, "exp": now() + 600, "nbf": now() - 10});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        format!("{input}.{}", b64(key.sign(input.as_bytes()).as_ref()))
    };
    (ra, token)
}

const POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-sleep
  namespace: legacy
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/default/sa/sleep]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: legacy
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: [/never]
  - to:
    - operation:
        paths: [/admin]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: audit-it
  namespace: legacy
spec:
  action: AUDIT
  rules:
  - to:
    - operation:
        paths: [/audited]
";

async fn call(
    mesh: &Mesh,
    agent: &AgentProc,
    who: &Issued,
    path: &str,
    bearer: Option<&str>,
) -> u16 {
    let mut c = mesh.connect(agent.addr("web"), who, false).await;
    let mut req = get(path, false);
    req.headers_mut()
        .insert("user-agent", "outrigger-test/1".parse().unwrap());
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    c.fetch(req).await.unwrap().status
}

/// Polls `path` until it holds `n` lines.
fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} lines: {text}",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Splits a text line: Istio's 22 fields (`[..]`, `"..."` with `\` escapes, or bare), then
/// Outrigger's `key="value"` fields.
fn parse_text(line: &str) -> (Vec<String>, BTreeMap<String, String>) {
    let mut fields = Vec::new();
    let mut extra = BTreeMap::new();
    let mut chars = line.chars().peekable();
    let quoted = |chars: &mut std::iter::Peekable<std::str::Chars>| {
        let mut v = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => v.push(chars.next().unwrap()),
                '"' => break,
                c => v.push(c),
            }
        }
        v
    };
    while let Some(&c) = chars.peek() {
        match c {
            ' ' => {
                chars.next();
            }
            '[' => {
                let v: String = chars.by_ref().take_while(|c| *c != ']').collect();
                fields.push(v[1..].to_string());
            }
            '"' => {
                chars.next();
                fields.push(quoted(&mut chars));
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ' ' {
                        break;
                    }
                    chars.next();
                    if c == '=' && chars.peek() == Some(&'"') {
                        chars.next();
                        extra.insert(word.clone(), quoted(&mut chars));
                        word.clear();
                        break;
                    }
                    word.push(c);
                }
                if !word.is_empty() {
                    assert!(extra.is_empty(), "a bare field after key=value: {line}");
                    fields.push(word);
                }
            }
        }
    }
    (fields, extra)
}

/// One request's line as a map of Outrigger's field names, from either format.
fn fields(format: &str, line: &str) -> BTreeMap<String, String> {
    if format == "json" {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect()
    } else {
        let (f, mut extra) = parse_text(line);
        assert_eq!(f.len(), 22, "Istio's text format has 22 fields: {line}");
        let req: Vec<&str> = f[1].split(' ').collect();
        extra.insert("start_time".into(), f[0].clone());
        extra.insert("method".into(), req[0].into());
        extra.insert("path".into(), req[1].into());
        extra.insert("protocol".into(), req[2].into());
        extra.insert("response_code".into(), f[2].clone());
        extra.insert("response_flags".into(), f[3].clone());
        extra.insert("user_agent".into(), f[12].clone());
        extra.insert("request_id".into(), f[13].clone());
        extra.insert("downstream_local_address".into(), f[18].clone());
        extra.insert("downstream_remote_address".into(), f[19].clone());
        extra
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_name_policy_rule_reason_jwt_principal_and_audit_in_both_formats() {
    for format in ["json", "text"] {
        let mesh = Mesh::new();
        let (ra, token) = jwt_setup();
        mesh.policy("pa.yaml", MESH_STRICT);
        mesh.policy("ra.yaml", &ra);
        mesh.policy("authz.yaml", POLICIES);
        let log = mesh.dir().join("access.log");
        let cfg = mesh.config(
            &[("web", start_echo().await, "http")],
            &format!(
                "accessLog:\n  format: {format}\n  output: file\n  file: {}\n",
                log.display()
            ),
        );
        let agent = AgentProc::start(mesh.dir(), &cfg);
        let sleep = mesh.pki.issue("default", "sleep");
        let intruder = mesh.pki.issue("default", "intruder");
        let alice = token("alice");
        assert_eq!(call(&mesh, &agent, &sleep, "/ok", Some(&alice)).await, 200);
        assert_eq!(call(&mesh, &agent, &sleep, "/admin", None).await, 403);
        assert_eq!(call(&mesh, &agent, &sleep, "/audited", None).await, 200);
        assert_eq!(call(&mesh, &agent, &intruder, "/ok", None).await, 403);

        let lines = wait_lines(&log, 4);
        assert_eq!(lines.len(), 4, "{lines:#?}");
        let by_path: BTreeMap<String, BTreeMap<String, String>> = lines
            .iter()
            .map(|l| fields(format, l))
            .map(|f| {
                let key = format!(
                    "{} {}",
                    f["path"],
                    f["source_principal"].rsplit('/').next().unwrap()
                );
                (key, f)
            })
            .collect();
        let ok = &by_path["/ok sleep"];
        assert_eq!(ok["response_code"], "200", "{format}: {ok:?}");
        assert_eq!(
            ok["authz_policy"], "legacy/allow-sleep[0]",
            "{format}: {ok:?}"
        );
        assert_eq!(ok["authz_result"], "allow_matched");
        assert_eq!(ok["jwt_principal"], format!("{ISS}/alice"));
        assert_eq!(ok["user_agent"], "outrigger-test/1");
        assert_eq!(ok["method"], "GET");
        assert_eq!(ok["protocol"], "HTTP/1.1");
        assert!(!ok.contains_key("audit"), "{format}: {ok:?}");
        assert!(!ok.contains_key("trace_id"), "{format}: {ok:?}");
        assert_eq!(
            ok["source_principal"],
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(ok["connection_security_policy"], "mutual_tls");
        assert_eq!(ok["request_id"].len(), 36, "{ok:?}");

        let admin = &by_path["/admin sleep"];
        assert_eq!(admin["response_code"], "403");
        assert_eq!(admin["response_flags"], "RBAC");
        assert_eq!(admin["authz_policy"], "legacy/deny-admin[1]");
        assert_eq!(admin["authz_result"], "deny_matched");
        assert!(!admin.contains_key("jwt_principal"));

        let audited = &by_path["/audited sleep"];
        assert_eq!(audited["response_code"], "200");
        assert_eq!(
            audited["audit"], "legacy/audit-it[0]",
            "{format}: {audited:?}"
        );

        let intr = &by_path["/ok intruder"];
        assert_eq!(intr["response_code"], "403");
        assert_eq!(intr["authz_result"], "no_allow_matched");
        assert!(!intr.contains_key("authz_policy"), "{intr:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_a_burst_keeps_every_line_exactly_once() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let log = mesh.dir().join("logs").join("access.log");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    let cfg = mesh.config(
        &[("web", start_echo().await, "http")],
        &format!(
            "accessLog:\n  output: both\n  file: {}\n  rotation:\n    maxSizeMiB: 0.01\n    maxFiles: 40\n",
            log.display()
        ),
    );
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let sleep = mesh.pki.issue("default", "sleep");
    const N: usize = 400;
    // Four connections in parallel, each sending its share on one keep-alive connection.
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;
        tasks.push(tokio::spawn(async move {
            for i in (t..N).step_by(4) {
                let got = c.fetch(get(&format!("/r/{i}"), false)).await.unwrap();
                assert_eq!(got.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    let (files, lines) = loop {
        let mut files: Vec<_> = std::fs::read_dir(log.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let mut lines = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(
                text.is_empty() || text.ends_with('\n'),
                "{f:?} ends mid-line"
            );
            lines.extend(text.lines().map(str::to_string));
        }
        if lines.len() >= N {
            break (files, lines);
        }
        assert!(Instant::now() < deadline, "{} of {N} lines", lines.len());
        std::thread::sleep(Duration::from_millis(50));
    };
    // Rotated (each file under the size), and no more files than maxFiles + the live one.
    assert!(files.len() > 2, "{files:?}");
    assert!(files.len() <= 41, "{files:?}");
    for f in &files {
        let size = std::fs::metadata(f).unwrap().len();
        assert!(size <= (0.01 * 1024.0 * 1024.0) as u64, "{f:?}: {size}");
    }
    // Every line whole (valid JSON) and every request exactly once.
    let mut seen = BTreeMap::new();
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        *seen
            .entry(v["path"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), N);
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    // `both`: stdout has them too.
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent
        .stdout()
        .lines()
        .filter(|l| l.contains("\"/r/"))
        .count()
        < N
    {
        assert!(Instant::now() < deadline, "stdout is missing lines");
        std::thread::sleep(Duration::from_millis(50));
    }
}
