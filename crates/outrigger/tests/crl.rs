//! `certificates.crl` through the real binary: a revoked caller is refused on the direct mTLS
//! port and on HBONE, a revoked server is refused by the outbound listener, and a changed CRL
//! file applies without a restart. Envoy's `CertificateValidationContext.crl` as Istio
//! configures it for a plugged-in CA (istio/istio `security/pkg/nodeagent/sds/sdsservice.go`).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use outrigger_proxy::hbone::{HboneClient, SourceInfo};
use outrigger_testkit::*;
use outrigger_tls::{CertSource, CertStore};

const DAY: Duration = Duration::from_secs(86_400);

/// `cfg` with `certificates.crl` and a fast certificate poll.
fn with_crl(cfg: &str, crl: &std::path::Path) -> String {
    cfg.replacen(
        "certificates:\n",
        &format!("certificates:\n  crl: {}\n", crl.display()),
        1,
    )
    .replacen("    rootCert:", "    pollInterval: 100ms\n    rootCert:", 1)
}

fn hbone_client(mesh: &Mesh, who: &Issued) -> HboneClient {
    let store = CertStore::new(
        CertSource::Files {
            chain: who.dir.join("cert-chain.pem"),
            key: who.dir.join("key.pem"),
            roots: who.dir.join("root-cert.pem"),
        },
        mesh.pki.trust(),
        vec![b"h2".to_vec()],
    )
    .unwrap();
    HboneClient::new(store, &SourceInfo::default(), Duration::from_secs(5))
}

/// Polls `f` until it returns true (bounded).
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f().await {
        assert!(Instant::now() < deadline, "{what} did not happen in 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_peers_are_refused_inbound_hbone_and_outbound_and_a_new_crl_applies_live() {
    let mesh = Mesh::new();
    mesh.policy("pa.yaml", MESH_STRICT);
    let stolen = mesh.pki.issue("default", "stolen");
    let sleep = mesh.pki.issue("default", "sleep");
    let crl = mesh.dir().join("ca-crl.pem");
    // A server agent (default/ratings) that the agent under test calls through its outbound
    // listener: revoked at first, un-revoked later.
    let ratings = mesh.pki.issue("default", "ratings");
    let first_revoked = [stolen.certs.leaf().clone(), ratings.certs.leaf().clone()];
    std::fs::write(&crl, mesh.pki.ca.crl(&first_revoked, 1, DAY).unwrap()).unwrap();
    let server_dir = mesh.dir().join("ratings");
    std::fs::create_dir_all(&server_dir).unwrap();
    let server_cfg = mesh
        .config(&[("web", start_echo().await, "http")], "")
        .replace(
            &mesh.agent.dir.display().to_string(),
            &ratings.dir.display().to_string(),
        )
        .replace(&format!("namespace: {AGENT_NS}"), "namespace: default")
        .replace(
            &format!("serviceAccount: {AGENT_SA}"),
            "serviceAccount: ratings",
        )
        .replace(
            "paths: [policies]",
            &format!("paths: [{}]", mesh.policies.display()),
        );
    let server = AgentProc::start(&server_dir, &server_cfg);

    let out_port = free_port();
    let outbound = format!(
        "hbone:\n  listen: 127.0.0.1:0\noutbound:\n  - name: ratings\n    listen: 127.0.0.1:{out_port}\n    \
         host: ratings.default.svc.cluster.local\n    port: 9080\n    protocol: http\n    \
         endpoints: [\"{}\"]\n    identity: spiffe://cluster.local/ns/default/sa/ratings\n",
        server.addr("web")
    );
    let cfg = with_crl(
        &mesh.config(&[("web", start_echo().await, "http")], &outbound),
        &crl,
    );
    let agent = AgentProc::start(mesh.dir(), &cfg);

    // Inbound: the revoked caller is refused at the handshake, the log says why and which
    // serial; others are served.
    assert_eq!(
        mtls_status(&mesh, agent.addr("web"), &sleep).await.unwrap(),
        200
    );
    assert!(
        mtls_status(&mesh, agent.addr("web"), &stolen)
            .await
            .is_err()
    );
    let log = agent.wait_for_log("peer certificate refused by the certificate revocation list");
    let serial = x509_parser::parse_x509_certificate(stolen.certs.leaf())
        .unwrap()
        .1
        .raw_serial_as_string();
    assert!(
        log.contains(&serial),
        "the log does not name serial {serial}:\n{log}"
    );
    assert!(log.contains("certificate is revoked"), "{log}");
    agent.wait_metric(
        "outrigger_connections_rejected_total",
        &["listener=\"web\"", "reason=\"tls_revoked\""],
        1.0,
    );

    // HBONE: the same refusal on the tunnel port.
    let me = mesh.agent_id();
    let web = agent.addr("web");
    assert!(
        hbone_client(&mesh, &stolen)
            .connect(agent.hbone_addr(), &me, web)
            .await
            .is_err()
    );
    hbone_client(&mesh, &sleep)
        .connect(agent.hbone_addr(), &me, web)
        .await
        .unwrap();

    // Outbound: the revoked server is refused (503, no upstream connection).
    let call = || async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", out_port))
            .await
            .unwrap();
        let mut c = HttpConn::new(tcp, false).await.unwrap();
        c.fetch(get("/ratings", false)).await.unwrap().status
    };
    let first = call().await;
    assert_eq!(first, 503, "{}", agent.stderr());
    agent.wait_for_log("certificate is revoked");

    // The CRL rewritten while the agent runs: ratings un-revoked, sleep revoked. Both apply
    // to new handshakes without a restart.
    let now_revoked = [stolen.certs.leaf().clone(), sleep.certs.leaf().clone()];
    std::fs::write(&crl, mesh.pki.ca.crl(&now_revoked, 2, DAY).unwrap()).unwrap();
    eventually("the new CRL applied inbound", async || {
        mtls_status(&mesh, agent.addr("web"), &sleep).await.is_err()
    })
    .await;
    eventually("the new CRL applied outbound", async || call().await == 200).await;
    agent.wait_for_log("certificate revocation list in force");
    let dump = agent.admin_get("/config_dump");
    assert!(dump.contains("\"revoked_serials\": 2"), "{dump}");
}

/// A CRL file that cannot be used stops start-up, naming the file.
#[test]
fn a_bad_crl_file_stops_start_up_with_the_file_named() {
    let mesh = Mesh::new();
    let crl = mesh.dir().join("ca-crl.pem");
    std::fs::write(&crl, "not a crl").unwrap();
    let cfg = with_crl(
        &mesh.config(
            &[("web", "127.0.0.1:9".parse::<SocketAddr>().unwrap(), "http")],
            "",
        ),
        &crl,
    );
    let path = mesh.dir().join("agent.yaml");
    std::fs::write(&path, cfg).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("certificates.crl") && err.contains("ca-crl.pem"),
        "{err}"
    );
}

/// `outrigger ca crl` writes a CRL of the built-in CA that revokes the given certificates and
/// that the agent loads; a file without a certificate is an error naming it.
#[test]
fn ca_crl_writes_a_crl_that_revokes_the_given_certificates() {
    let mesh = Mesh::new();
    let stolen = mesh.pki.issue("default", "stolen");
    let out = mesh.dir().join("ca-crl.pem");
    let run = |revoke: &std::path::Path| {
        std::process::Command::new(BIN)
            .args(["ca", "crl", "--dir"])
            .arg(mesh.dir().join("ca"))
            .arg("--revoke")
            .arg(revoke)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let done = run(&stolen.dir.join("cert-chain.pem"));
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let r = outrigger_tls::crl::Revocation::load(&out, false).unwrap();
    assert_eq!(r.counts(), (1, 1));
    let serial = x509_parser::parse_x509_certificate(stolen.certs.leaf())
        .unwrap()
        .1
        .raw_serial_as_string()
        .replace(':', "")
        .to_uppercase();
    let text = std::process::Command::new("openssl")
        .args(["crl", "-noout", "-text", "-in"])
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&serial), "serial {serial} not in:\n{text}");

    let not_a_cert = mesh.dir().join("notes.txt");
    std::fs::write(&not_a_cert, "hello").unwrap();
    let failed = run(&not_a_cert);
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        err.contains("notes.txt") && err.contains("no PEM certificate"),
        "{err}"
    );
}
