//! Configuration values that used to take the agent down (issue 13 defect 4, issue 12 item 6),
//! through the real binary: each is refused with file:line:column and the field, exit status
//! 1, never a panic (exit 134 under `panic = "abort"`). None of these needs a listener: the
//! configuration is refused before anything binds.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use common::*;
use outrigger_testkit::*;

/// Runs the binary with `args`; returns (exit code, stdout + stderr).
fn outrigger(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Writes `config` next to the mesh's certificates and runs `outrigger run --check-config`.
fn check_config(mesh: &Mesh, config: &str) -> (i32, String, String) {
    let path = mesh.dir().join("agent.yaml");
    std::fs::write(&path, config).unwrap();
    let p = path.to_str().unwrap().to_string();
    let (code, out) = outrigger(&["run", "--check-config", "--config", &p]);
    (code, out, p)
}

/// The 1-based line of the first line of `config` that contains `needle`.
fn line_of(config: &str, needle: &str) -> usize {
    config
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle} not in\n{config}"))
        + 1
}

#[test]
fn a_huge_duration_is_refused_with_file_line_and_field() {
    let mesh = Mesh::new();
    // `timeouts.connect: 99999999999999999999s` made the agent exit 134 (f64 overflow in
    // Duration::from_secs_f64).
    let config = mesh
        .config(&[("web", "127.0.0.1:5000".parse().unwrap(), "http")], "")
        .replace(
            "timeouts:\n",
            "timeouts:\n  connect: 99999999999999999999s\n",
        );
    let (code, out, file) = check_config(&mesh, &config);
    let line = line_of(&config, "connect: 9999");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "error: {file}:{line}:12: timeouts.connect: `99999999999999999999s` is out of range"
        )),
        "{out}"
    );
    // Zero and a typo'd unit are refused too, each naming its field.
    for (value, want) in [
        (
            "0s",
            "timeouts.connect: `0s` is out of range: use 1ms to 24h",
        ),
        ("10y", "timeouts.connect: `10y`: unknown unit `y`"),
    ] {
        let config = mesh
            .config(&[("web", "127.0.0.1:5000".parse().unwrap(), "http")], "")
            .replace("timeouts:\n", &format!("timeouts:\n  connect: {value}\n"));
        let (code, out, file) = check_config(&mesh, &config);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains(&format!("error: {file}:{line}:12: {want}")),
            "{out}"
        );
    }
}

#[test]
fn worker_threads_are_bounded() {
    let mesh = Mesh::new();
    // `runtime.workerThreads: 100000000` reached 5 GB RSS in 8 s.
    for n in ["100000000", "1025"] {
        let config = mesh.config(
            &[("web", "127.0.0.1:5000".parse().unwrap(), "http")],
            &format!("runtime:\n  workerThreads: {n}\n"),
        );
        let started = Instant::now();
        let (code, out, file) = check_config(&mesh, &config);
        let line = line_of(&config, "workerThreads");
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains(&format!(
                "error: {file}:{line}:18: runtime.workerThreads: {n}: use 1 to 1024, or 0 for one worker per core"
            )),
            "{out}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "refused before any thread starts"
        );
    }
    // The command-line flag has the same bound (a usage error, clap's exit status 2).
    let (code, out) = outrigger(&[
        "run",
        "--config",
        "agent.yaml",
        "--worker-threads",
        "100000000",
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("--worker-threads") && out.contains("use 1 to 1024"),
        "{out}"
    );
}

#[test]
fn a_wrong_type_names_its_field() {
    let mesh = Mesh::new();
    let config = mesh.config(
        &[("web", "127.0.0.1:5000".parse().unwrap(), "http")],
        "runtime:\n  workerThreads: many\n",
    );
    let (code, out, file) = check_config(&mesh, &config);
    let line = line_of(&config, "workerThreads");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "error: {file}:{line}:18: runtime.workerThreads: invalid value: expected a whole number"
        )),
        "{out}"
    );
    // A list where a string is expected, inside a list item.
    let config = mesh
        .config(&[("web", "127.0.0.1:5000".parse().unwrap(), "http")], "")
        .replace("    protocol: http\n", "    protocol: [http]\n");
    let (code, out, file) = check_config(&mesh, &config);
    let line = line_of(&config, "protocol: [http]");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("error: {file}:{line}:15: inbound[0].protocol: ")),
        "{out}"
    );
}

#[test]
fn a_missing_certificate_file_names_the_config_line() {
    let mesh = Mesh::new();
    let config = mesh.config(&[("web", "127.0.0.1:5000".parse().unwrap(), "http")], "");
    let key = mesh.agent.dir.join("key.pem");
    std::fs::remove_file(&key).unwrap();
    let (code, out, file) = check_config(&mesh, &config);
    let line = line_of(&config, "key: ");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "error: {file}:{line}:10: certificates.files.key: cannot read {}",
            key.display()
        )),
        "{out}"
    );
}

#[test]
fn ca_issue_ttl_is_parsed_by_the_shared_parser() {
    // `--ttl 99999999999999999999s` went through the f64 parser too.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for (ttl, want) in [
        ("99999999999999999999s", "is out of range"),
        ("30s", "is out of range: use 1m to 3650d"),
    ] {
        let (code, out) = outrigger(&[
            "ca",
            "issue",
            "--dir",
            d,
            "--spiffe",
            "spiffe://cluster.local/ns/a/sa/b",
            "--out",
            d,
            "--ttl",
            ttl,
        ]);
        assert_eq!(code, 2, "{out}");
        assert!(out.contains("--ttl") && out.contains(want), "{out}");
    }
}

const BAD_TIMEOUT_RA: &str = "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: huge-timeout
  namespace: legacy
spec:
  jwtRules:
  - issuer: https://issuer.example
    jwksUri: https://127.0.0.1:9/keys
    timeout: 99999999999999999999s
";

/// A RequestAuthentication `timeout` of `99999999999999999999s` passed validation and then
/// panicked (`Duration::from_secs_f64`) on the first request carrying a token for its issuer.
/// istiod reads the field with Go's `time.ParseDuration` (golang/protobuf jsonpb, as
/// istio/istio pkg/util/protomarshal uses it), which refuses a value beyond ~292 years: the
/// resource is refused at load with its file, line and field, and the agent keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_jwt_timeout_is_refused_at_load_and_the_agent_keeps_serving() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let agent = mesh.start(&[("web", start_echo().await, "http")]);
    let sleep = mesh.pki.issue("default", "sleep");

    mesh.policy("ra.yaml", BAD_TIMEOUT_RA);
    let ra = mesh.policies.join("ra.yaml");
    let want = format!(
        "{}:10:14: spec.jwtRules[0].timeout: `99999999999999999999s` is out of range",
        ra.display()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dump = agent.admin_get("/config_dump");
        if dump.contains(&want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "config_dump never showed {want}:\n{dump}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The request that used to abort the agent: a token whose issuer is the refused rule's.
    let token = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"k"}"#),
        URL_SAFE_NO_PAD.encode(br#"{"iss":"https://issuer.example","sub":"a"}"#),
        URL_SAFE_NO_PAD.encode(b"sig")
    );
    let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;
    let mut req = get("/", false);
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let got = c.fetch(req).await.unwrap();
    // The refused resource is replaced by its fail-closed stand-in (docs/policy.md, "Refused
    // resources"): requests to the workload it selects are denied, answered, not crashed on.
    assert_eq!(got.status, 403, "{}", got.text());
    let mut agent = agent;
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent is still running"
    );

    // `outrigger check` reports the same resource at load, with the same location.
    let cfg = agent.dir.join("agent.yaml");
    let (_, out) = outrigger(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(out.contains(&want), "{out}");
}

/// `accessLog` as a mapping: each wrong value is refused at its file, line and field, and the
/// short form and a good mapping are accepted.
#[test]
fn access_log_settings_are_checked_at_their_line_and_field() {
    let mesh = Mesh::new();
    let base = mesh.config(&[("web", "127.0.0.1:5000".parse().unwrap(), "http")], "");
    for (extra, needle, field, reason) in [
        (
            "accessLog:\n  format: xml\n",
            "format: xml",
            "accessLog.format",
            "`xml`: use `json` or `text`",
        ),
        (
            "accessLog:\n  output: syslog\n",
            "output: syslog",
            "accessLog.output",
            "`syslog`: use `stdout`, `file`, `both` or `off`",
        ),
        (
            "accessLog:\n  output: both\n  file: a.log\n  rotation:\n    maxSizeMiB: 0\n",
            "maxSizeMiB: 0",
            "accessLog.rotation.maxSizeMiB",
            "0 is out of range",
        ),
        (
            "accessLog:\n  file: a.log\n  rotation:\n    maxFiles: 0\n",
            "maxFiles: 0",
            "accessLog.rotation.maxFiles",
            "0: use 1 to 1000",
        ),
        (
            "accessLog:\n  output: stdout\n  file: a.log\n",
            "file: a.log",
            "accessLog.file",
            "does not write to it",
        ),
        (
            "accessLog:\n  format: text\n  fmt: json\n",
            "fmt: json",
            "accessLog.fmt",
            "unknown field",
        ),
    ] {
        let config = format!("{base}{extra}");
        let (code, out, file) = check_config(&mesh, &config);
        let line = line_of(&config, needle);
        assert_eq!(code, 1, "{extra}: {out}");
        assert!(
            out.contains(&format!("{file}:{line}:")) && out.contains(field) && out.contains(reason),
            "{extra}: want {file}:{line}: {field}: {reason}, got {out}"
        );
    }
    for ok in [
        "accessLog: off\n",
        "accessLog:\n  output: off\n",
        "accessLog: logs/access.log\n",
        "accessLog:\n  format: text\n",
        "accessLog:\n  format: text\n  output: both\n  file: a.log\n  rotation:\n    maxSizeMiB: 0.5\n    maxFiles: 10\n",
    ] {
        let (code, out, _) = check_config(&mesh, &format!("{base}{ok}"));
        assert_eq!(code, 0, "{ok}: {out}");
    }
}
