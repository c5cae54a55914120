//! The status page (`GET /` on the admin listener) rendered by a real headless browser
//! (Debian's `chromium --headless --dump-dom`): the workload identity and certificate expiry,
//! the listeners and their mTLS modes, the policies with their sources, and a denial made a
//! moment earlier with its deciding policy and reason. Markup that comes from the
//! configuration, a policy file's name or a request is escaped (it shows as text and never
//! becomes an element), and no key material is ever on the page.
//!
//! `scripts/test.sh` installs chromium (apt); without it this test says so and passes.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use outrigger_testkit::*;

/// `CHROMIUM` or the first of chromium / chromium-browser / google-chrome on PATH.
fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// The DOM after the page has loaded (and any script has run), as chromium serializes it.
fn dump_dom(browser: &PathBuf, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=2000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish in 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const XSS_LISTENER: &str = "<script>alert(2)</script>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_a_headless_browser_shows_a_fresh_denial_escaped() {
    let Some(browser) = chromium() else {
        eprintln!(
            "SKIPPED: no chromium on PATH (scripts/test.sh installs Debian's `chromium` with apt; \
             set CHROMIUM to a browser binary)"
        );
        return;
    };
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    // A policy file whose name is markup: shown as the policy's source.
    mesh.policy(
        "<script>alert(1)<\\script>.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-secret
  namespace: legacy
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: [\"/secret/*\"]
",
    );
    let echo = start_echo().await;
    let cfg = mesh
        .config(&[("web", echo, "http"), (XSS_LISTENER, echo, "tcp")], "")
        .replace(
            &format!("  - name: {XSS_LISTENER}\n"),
            &format!("  - name: \"{XSS_LISTENER}\"\n"),
        );
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let sleep = mesh.pki.issue("default", "sleep");

    // A denial a moment before the page is loaded; its path carries what a URI may carry of
    // HTML's special characters (`<` is refused by the HTTP codec before authorization).
    let path = "/secret/\"a'b&c";
    let mut c = mesh.connect(agent.addr("web"), &sleep, false).await;
    assert_eq!(c.fetch(get(path, false)).await.unwrap().status, 403);

    // The raw page: escaped, no key material.
    let raw = agent.admin_get("/");
    assert!(raw.contains("text/html"), "{raw}");
    assert!(!raw.contains("PRIVATE KEY"));
    assert!(!raw.contains("<script>"), "{raw}");
    assert!(
        raw.contains("&lt;script&gt;alert(2)&lt;/script&gt;"),
        "{raw}"
    );
    assert!(raw.contains("/secret/&quot;a&#39;b&amp;c"), "{raw}");

    let dom = dump_dom(&browser, &format!("http://{}/", agent.admin));
    assert!(
        dom.contains("<h1>Outrigger</h1>"),
        "the page did not render: {dom}"
    );
    assert!(!dom.contains("PRIVATE KEY"));
    // Markup is text: no script element, the text is there escaped.
    assert!(!dom.to_lowercase().contains("<script"), "{dom}");
    assert!(
        dom.contains("&lt;script&gt;alert(2)&lt;/script&gt;"),
        "{dom}"
    );
    assert!(
        dom.contains("&lt;script&gt;alert(1)&lt;\\script&gt;.yaml"),
        "{dom}"
    );
    // Identity, certificate expiry, the listeners and their mTLS mode, the policies.
    assert!(
        dom.contains("spiffe://cluster.local/ns/legacy/sa/windows-app"),
        "{dom}"
    );
    assert!(dom.contains("certificate expires"), "{dom}");
    assert!(dom.contains("<td>STRICT</td>"), "{dom}");
    assert!(dom.contains("<td>legacy/deny-secret</td>"), "{dom}");
    assert!(dom.contains("requests per second"), "{dom}");
    // The denial, with its deciding policy and reason, in one row.
    let denials = &dom[dom.find("id=\"denials\"").expect("denials table")..];
    let row = denials
        .split("<tr>")
        .find(|r| r.contains("/secret/"))
        .unwrap_or_else(|| panic!("the denial is not on the page: {denials}"));
    assert!(row.contains("/secret/\"a'b&amp;c"), "{row}");
    assert!(row.contains("<td>legacy/deny-secret[0]</td>"), "{row}");
    assert!(row.contains("<td>deny_matched</td>"), "{row}");
    assert!(
        row.contains("<td>spiffe://cluster.local/ns/default/sa/sleep</td>"),
        "{row}"
    );
}
