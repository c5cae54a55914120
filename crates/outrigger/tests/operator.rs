//! What an operator runs by hand: `run --check-config`, the log level, and how the agent's
//! own log looks.

mod common;

use std::process::Command;

use common::*;
use outrigger_testkit::*;

fn check_config(path: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(["run", "--check-config", "--config"])
        .arg(path)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// `--check-config` binds nothing: it succeeds beside the running agent whose ports it names
/// (before, it tried to listen on them and failed with "address in use").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_runs_beside_the_running_agent() {
    let backend = start_echo().await;
    let mesh = Mesh::new();
    let agent = mesh.start(&[("web", backend, "http")]);
    let bound = agent.addr("web");
    let cfg = mesh
        .config(&[("web", backend, "http")], "")
        .replace(
            "listen: 127.0.0.1:0\n    backend",
            &format!("listen: {bound}\n    backend"),
        )
        .replace(
            "admin:\n  listen: 127.0.0.1:0",
            &format!("admin:\n  listen: {}", agent.admin),
        );
    assert!(cfg.contains(&bound.to_string()), "{cfg}");
    let path = mesh.dir().join("same-ports.yaml");
    std::fs::write(&path, &cfg).unwrap();
    let out = check_config(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(
        stdout.contains(&format!("inbound web: {bound} -> {backend}")),
        "{stdout}"
    );
    // And the agent it ran beside still serves.
    let client = mesh.pki.issue("web", "frontend");
    let mut conn = mesh.connect(bound, &client, false).await;
    let got = conn.fetch(get("/", false)).await.unwrap();
    assert_eq!(got.status, 200);
}

/// `log.level: warning` used to be taken by `tracing` as a module name (no line ever matched,
/// so the agent logged nothing). Envoy's level names are accepted; anything else is refused
/// with file:line and field.
#[test]
fn log_level_is_checked() {
    let mesh = Mesh::new();
    let base = mesh.config(&[("web", "127.0.0.1:5000".parse().unwrap(), "http")], "");
    let path = mesh.dir().join("log.yaml");

    std::fs::write(&path, format!("{base}log:\n  level: warning\n")).unwrap();
    let out = check_config(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let cfg = format!("{base}log:\n  level: warnings\n");
    std::fs::write(&path, &cfg).unwrap();
    let out = check_config(&path);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = cfg.lines().position(|l| l.contains("warnings")).unwrap() + 1;
    assert!(
        err.contains(&format!("log.yaml:{line}:"))
            && err.contains("log.level")
            && err.contains("`warnings` is not a log level"),
        "{err}"
    );

    // RUST_LOG replaces log.level and is checked the same way.
    std::fs::write(&path, &base).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--check-config", "--config"])
        .arg(&path)
        .env("RUST_LOG", "verbose")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("RUST_LOG: `verbose` is not a log level"),
        "{err}"
    );
}

/// The agent's log goes to a file here (not a terminal): no ANSI colour codes in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_colour_codes_in_a_log_file() {
    let backend = start_echo().await;
    let mesh = Mesh::new();
    let agent = mesh.start(&[("web", backend, "http")]);
    let log = agent.wait_for_log("inbound listener");
    assert!(!log.contains('\u{1b}'), "{log}");
}

/// A flood of refused connections does not flood the log: at most 10 lines a second per kind,
/// the next line says how many were left out, and the metric counts every one. A connection
/// that sends nothing is reported as such, not as a plaintext client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_warnings_are_rate_limited_and_say_what_happened() {
    let backend = start_echo().await;
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let agent = mesh.start(&[("web", backend, "http")]);
    let addr = agent.addr("web");
    const FLOOD: usize = 200;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..FLOOD {
        set.spawn(plaintext_request(addr));
    }
    while set.join_next().await.is_some() {}
    agent.wait_metric(
        "outrigger_connections_rejected_total",
        &["reason=\"plaintext\""],
        FLOOD as f64,
    );
    let lines = |log: &str| log.matches("plaintext connection refused").count();
    let written = lines(&agent.stderr());
    assert!(
        (1..=40).contains(&written),
        "{written} lines for {FLOOD} refusals"
    );
    // The next window: one more refusal, and its line carries the count left out.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    plaintext_request(addr).await;
    let log = agent.wait_for_log("suppressed=");
    assert!(lines(&log) > written, "{log}");

    // Connected, then silent until `timeouts.detect` (300 ms here).
    let idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    agent.wait_metric(
        "outrigger_connections_rejected_total",
        &["reason=\"no_client_hello\""],
        1.0,
    );
    agent.wait_for_log("no TLS ClientHello within timeouts.detect");
    drop(idle);
}

fn outrigger(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_outrigger"))
        .args(args)
        .output()
        .unwrap()
}

/// Completions and manual pages are generated from the command definitions (docs/cli.md).
#[test]
fn completions_and_manual_pages_are_generated() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef outrigger"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let out = outrigger(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(marker) && text.contains("lint"),
            "{shell}: {text}"
        );
    }
    let out = outrigger(&["man"]);
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.contains(".TH outrigger 1") && page.contains("run"),
        "{page}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = outrigger(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "outrigger.1",
        "outrigger-run.1",
        "outrigger-lint.1",
        "outrigger-ca-issue.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
    }
}

/// The exit codes of docs/cli.md: a usage error is clap's 2, and nothing else uses 2.
#[test]
fn exit_codes_are_the_documented_ones() {
    assert_eq!(outrigger(&["no-such-command"]).status.code(), Some(2));
    assert_eq!(outrigger(&["run"]).status.code(), Some(2));
    let out = outrigger(&["version"]);
    assert_eq!(out.status.code(), Some(0));
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(v.contains("commit:") && v.contains("target:"), "{v}");
    // A configuration that does not exist: an error, 1.
    assert_eq!(
        outrigger(&[
            "run",
            "--check-config",
            "--config",
            "/nonexistent/agent.yaml"
        ])
        .status
        .code(),
        Some(1)
    );
    // `lint` and `check` that cannot run: 3.
    assert_eq!(
        outrigger(&["lint", "/nonexistent/dir"]).status.code(),
        Some(3)
    );
}

/// systemd's `Type=notify` (sd_notify(3)): `READY=1` once the listeners are bound — the ready
/// file, written just before, names them and they accept — and `STOPPING=1` when SIGTERM starts
/// the drain. Both socket forms systemd uses: a path, and `@name` in the abstract namespace.
#[cfg(target_os = "linux")]
#[test]
fn systemd_is_told_ready_then_stopping() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    use std::time::Duration;

    let mesh = Mesh::new();
    let backend: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let path_sock = mesh.dir().join("notify.sock");
    let abstract_name = format!("outrigger-test-notify-{}", std::process::id());
    for (env, sock) in [
        (
            path_sock.to_str().unwrap().to_string(),
            UnixDatagram::bind(&path_sock).unwrap(),
        ),
        (
            format!("@{abstract_name}"),
            UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(&abstract_name).unwrap())
                .unwrap(),
        ),
    ] {
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut agent = common::AgentProc::start_with(
            mesh.dir(),
            &mesh.config(&[("web", backend, "tcp")], ""),
            &[("NOTIFY_SOCKET", &env)],
        );
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving", "{env}");
        std::net::TcpStream::connect(agent.addr("web")).expect("bound when READY=1 was sent");
        assert!(agent.terminate().success());
        let n = sock.recv(&mut buf).expect("STOPPING=1 within 30 s");
        assert_eq!(&buf[..n], b"STOPPING=1\nSTATUS=draining", "{env}");
    }
}
