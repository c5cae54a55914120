//! `outrigger demo`: a real mesh on loopback, built from nothing, showing what Outrigger does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use outrigger_identity::{Identity, TrustDomains};
use outrigger_tls::WorkloadCerts;
use outrigger_tls::ca::{BuiltinCa, IssueOptions};

use crate::agent::Agent;
use crate::client::{Reply, mtls_get, plain_get};
use crate::config::AgentConfig;

const TRUST_DOMAIN: &str = "cluster.local";

const PEER_AUTHENTICATION: &str = "\
# Mesh-wide STRICT mTLS: plaintext never reaches the application.
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
";

const AUTHORIZATION: &str = "\
# Default deny for the workload: an ALLOW policy that matches nothing.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: legacy
spec: {}
---
# Then allow exactly one caller, for reads.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-sleep-get
  namespace: legacy
spec:
  selector:
    matchLabels:
      app: windows-app
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/default/sa/sleep\"]
    to:
    - operation:
        methods: [\"GET\"]
";

/// The demo's application: answers with what it was told about the caller.
async fn serve_app(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let caller = req
                    .headers()
                    .get("x-forwarded-client-cert")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|x| x.split(';').find_map(|kv| kv.strip_prefix("URI=")))
                    .unwrap_or("nobody (no x-forwarded-client-cert)")
                    .to_string();
                let body = format!(
                    "hello from the app on 127.0.0.1: {} {} called by {caller}\n",
                    req.method(),
                    req.uri().path()
                );
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

struct Paths {
    root: PathBuf,
}

impl Paths {
    fn certs(&self, who: &str) -> PathBuf {
        self.root.join(who)
    }
}

/// Issues a certificate from `ca` into `dir`; the caller trusts `trust_root` (the mesh root,
/// even for a certificate from another CA, so that only the server's refusal is shown).
fn issue(
    ca: &BuiltinCa,
    dir: &Path,
    id: &Identity,
    dns: &[&str],
    trust_root: &str,
) -> anyhow::Result<WorkloadCerts> {
    let mut opts = IssueOptions::workload(id, Duration::from_secs(24 * 3600));
    opts.dns_sans = dns.iter().map(|s| s.to_string()).collect();
    let cert = ca.issue_with(&opts)?;
    cert.write_to(dir)?;
    Ok(WorkloadCerts::from_pem(
        &cert.cert_chain_pem,
        &cert.key_pem,
        trust_root,
    )?)
}

fn curl_mtls(p: &Paths, who: &str, port: u16, method: &str) -> String {
    let d = p.certs(who);
    format!(
        "curl -sS{} --cacert {} --cert {} --key {} https://localhost:{port}/hello",
        if method == "GET" {
            String::new()
        } else {
            format!(" -X {method}")
        },
        p.root.join("ca/root-cert.pem").display(),
        d.join("cert-chain.pem").display(),
        d.join("key.pem").display(),
    )
}

struct Check {
    ok: bool,
}

impl Check {
    fn report(
        &mut self,
        title: &str,
        expect: &str,
        result: anyhow::Result<Reply>,
        pass: impl Fn(&Reply) -> bool,
        curl: &str,
    ) {
        let (ok, what) = match &result {
            Ok(r) => (pass(r), format!("HTTP {} {}", r.status, r.body.trim())),
            Err(e) => (
                !expect.starts_with("HTTP"),
                format!("refused: {}", root_cause(e)),
            ),
        };
        self.ok &= ok;
        println!(
            "{} {title}\n    expected: {expect}\n    got:      {what}\n    try it:   {curl}\n",
            if ok { "[ok]  " } else { "[FAIL]" }
        );
    }
}

fn root_cause(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    parts.dedup();
    parts.join(": ")
}

pub fn main(keep: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(keep))
}

async fn run(keep: bool) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("outrigger-demo-")
        .tempdir()?;
    let p = Paths {
        root: tmp.path().to_path_buf(),
    };
    println!(
        "Outrigger demo: building a mesh on loopback in {}\n",
        p.root.display()
    );
    // Outrigger's own log (rejections are logged with their reason) goes to a file so that
    // the demo's output stays readable.
    let log = std::fs::File::create(p.root.join("outrigger.log"))?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(log))
        .try_init();

    // 1. A CA, and certificates for the agent and two mesh callers; a second, untrusted CA.
    let ca = BuiltinCa::init(&p.root.join("ca"), TRUST_DOMAIN)?;
    let app_id = Identity::istio(TRUST_DOMAIN, "legacy", "windows-app")?;
    let sleep_id = Identity::istio(TRUST_DOMAIN, "default", "sleep")?;
    let intruder_id = Identity::istio(TRUST_DOMAIN, "default", "intruder")?;
    // The agent's certificate also names `localhost` so that curl, which checks host names
    // rather than SPIFFE IDs, can verify it in the commands printed below.
    let root = ca.root_pem().to_string();
    issue(&ca, &p.certs("agent"), &app_id, &["localhost"], &root)?;
    let sleep = issue(&ca, &p.certs("sleep"), &sleep_id, &[], &root)?;
    let intruder = issue(&ca, &p.certs("intruder"), &intruder_id, &[], &root)?;
    let rogue_ca = BuiltinCa::init(&p.root.join("rogue-ca"), TRUST_DOMAIN)?;
    let rogue = issue(&rogue_ca, &p.certs("rogue"), &sleep_id, &[], &root)?;
    println!(
        "  CA (trust domain {TRUST_DOMAIN}) and certificates: {app_id}, {sleep_id}, {intruder_id}, and {sleep_id} from an untrusted CA"
    );

    // 2. The application, bound to loopback only.
    let app_listener = TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = app_listener.local_addr()?;
    tokio::spawn(serve_app(app_listener));
    println!("  application listening on {app_addr} (loopback only)");

    // 3. Istio policy, as users write it.
    let pol = p.root.join("policies");
    std::fs::create_dir_all(&pol)?;
    std::fs::write(pol.join("peer-authentication.yaml"), PEER_AUTHENTICATION)?;
    std::fs::write(pol.join("authorization.yaml"), AUTHORIZATION)?;

    // 4. A second mesh service, `ratings`, with its own identity and its own Outrigger in
    //    front of it: the target of the application's outbound calls.
    let ratings_id = Identity::istio(TRUST_DOMAIN, "default", "ratings")?;
    let reviews_id = Identity::istio(TRUST_DOMAIN, "default", "reviews")?;
    issue(&ca, &p.certs("ratings"), &ratings_id, &[], &root)?;
    let ratings_listener = TcpListener::bind("127.0.0.1:0").await?;
    let ratings_app = ratings_listener.local_addr()?;
    tokio::spawn(serve_app(ratings_listener));
    let ratings_cfg_path = p.root.join("ratings.yaml");
    std::fs::write(
        &ratings_cfg_path,
        format!(
            "\
trustDomain: {TRUST_DOMAIN}
workload: {{namespace: default, serviceAccount: ratings, labels: {{app: ratings}}}}
certificates:
  files: {{certChain: ratings/cert-chain.pem, key: ratings/key.pem, rootCert: ratings/root-cert.pem}}
inbound:
  - {{name: ratings, listen: \"127.0.0.1:0\", backend: \"{ratings_app}\", protocol: http}}
policy:
  paths: [policies]
admin:
  listen: \"off\"
accessLog: ratings-access.log
"
        ),
    )?;
    let ratings_agent = Agent::start(&AgentConfig::load(&ratings_cfg_path)?)
        .await
        .context("starting the ratings service's outrigger")?;
    let ratings_addr: SocketAddr = ratings_agent.inbound_addrs()[0].1;
    let (ratings_stop_tx, ratings_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ratings_served = tokio::spawn(ratings_agent.run(async {
        let _ = ratings_stop_rx.await;
    }));
    println!(
        "  mesh service ratings.default ({ratings_id}) behind its own outrigger on {ratings_addr}"
    );

    // 5. Outrigger in front of the application, and in front of its outbound calls.
    let agent_cfg = format!(
        "\
trustDomain: {TRUST_DOMAIN}
workload:
  namespace: legacy
  serviceAccount: windows-app
  labels:
    app: windows-app
certificates:
  files:
    certChain: agent/cert-chain.pem
    key: agent/key.pem
    rootCert: agent/root-cert.pem
inbound:
  - name: windows-app
    listen: 127.0.0.1:0
    backend: {app_addr}
    protocol: http
policy:
  paths: [policies]
admin:
  listen: 127.0.0.1:0
accessLog: access.log
outbound:
  # The app calls http://127.0.0.1:<port>/ ; Outrigger originates mTLS and pins the identity.
  - name: ratings
    listen: 127.0.0.1:0
    host: ratings.default.svc.cluster.local
    port: 8080
    endpoints: [\"{ratings_addr}\"]
    identity: {ratings_id}
  # The same server, but this destination expects another identity: refused.
  - name: reviews
    listen: 127.0.0.1:0
    host: reviews.default.svc.cluster.local
    port: 8080
    endpoints: [\"{ratings_addr}\"]
    identity: {reviews_id}
"
    );
    let cfg_path = p.root.join("agent.yaml");
    std::fs::write(&cfg_path, &agent_cfg)?;
    let cfg = AgentConfig::load(&cfg_path)?;
    let agent = Agent::start(&cfg).await.context("starting outrigger")?;
    let addr: SocketAddr = agent.inbound_addrs()[0].1;
    let admin = agent.admin_addr();
    let outbound: std::collections::BTreeMap<String, SocketAddr> =
        agent.outbound_addrs().into_iter().collect();
    let (Some(to_ratings), Some(to_reviews)) = (
        outbound.get("ratings").copied(),
        outbound.get("reviews").copied(),
    ) else {
        anyhow::bail!("the demo agent did not bind its outbound listeners");
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(agent.run(async {
        let _ = stop_rx.await;
    }));
    println!(
        "  outrigger listening on {addr} (STRICT mTLS, default deny + allow {sleep_id} GET), config {}\n",
        cfg_path.display()
    );

    println!(
        "  outbound: the app calls ratings at http://{to_ratings}/ and reviews at http://{to_reviews}/ (mTLS added by outrigger)\n"
    );

    // 6. Real calls.
    let trust = TrustDomains::new(TRUST_DOMAIN, &[])?;
    let mut check = Check { ok: true };
    let port = addr.port();
    check.report(
        &format!("mTLS call from {sleep_id}"),
        "HTTP 200, and the app sees the verified caller",
        mtls_get(addr, &sleep, &trust, &app_id, "/hello").await,
        |r| r.status == 200 && r.body.contains(&sleep_id.to_string()),
        &curl_mtls(&p, "sleep", port, "GET"),
    );
    check.report(
        &format!("mTLS call from {intruder_id} (no policy allows it)"),
        "HTTP 403 RBAC: access denied",
        mtls_get(addr, &intruder, &trust, &app_id, "/hello").await,
        |r| r.status == 403,
        &curl_mtls(&p, "intruder", port, "GET"),
    );
    check.report(
        "plaintext call (no certificate)",
        "refused: STRICT mTLS closes the connection",
        plain_get(addr, "/hello").await,
        |_| false,
        &format!("curl -sS http://127.0.0.1:{port}/hello"),
    );
    check.report(
        &format!("mTLS call as {sleep_id} with a certificate from an untrusted CA"),
        "refused during the TLS handshake",
        mtls_get(addr, &rogue, &trust, &app_id, "/hello").await,
        |_| false,
        &curl_mtls(&p, "rogue", port, "GET"),
    );
    check.report(
        "the app calls ratings through outrigger's outbound listener (plain HTTP on loopback)",
        "HTTP 200, and ratings sees the app's verified identity",
        plain_get(to_ratings, "/ratings").await,
        |r| r.status == 200 && r.body.contains(&app_id.to_string()),
        &format!("curl -sS http://{to_ratings}/ratings"),
    );
    check.report(
        &format!("the app calls reviews, but the server presents {ratings_id}"),
        "HTTP 503: outrigger refuses a server that is not the expected identity",
        plain_get(to_reviews, "/reviews").await,
        |r| r.status == 503 && r.body.contains(&reviews_id.to_string()),
        &format!("curl -sS http://{to_reviews}/reviews"),
    );
    if let Some(a) = admin {
        println!("Metrics (Istio names):   curl -s http://{a}/metrics | grep istio_requests_total");
        println!("Config in force:         curl -s http://{a}/config_dump");
    }
    println!(
        "Access log:              {}",
        p.root.join("access.log").display()
    );
    println!(
        "Outrigger's log:         {}",
        p.root.join("outrigger.log").display()
    );

    if keep {
        let kept = tmp.keep();
        println!(
            "\nThe demo mesh keeps running (files in {}). Press Ctrl-C to stop.",
            kept.display()
        );
        crate::agent::shutdown_signal().await;
    }
    let _ = stop_tx.send(());
    let _ = ratings_stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), served).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), ratings_served).await;
    if check.ok {
        println!("\nAll six calls behaved as expected.");
        Ok(())
    } else {
        anyhow::bail!("some calls did not behave as expected (see [FAIL] above)")
    }
}
