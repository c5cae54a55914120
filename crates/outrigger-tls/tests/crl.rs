//! Certificate revocation lists (`certificates.crl`) on real mTLS handshakes over 127.0.0.1:
//! a revoked client refused by the server, a revoked server refused by the client, Envoy's
//! rules for a chain without a CRL and for an expired CRL
//! (`CertificateValidationContext.crl`: "if a CRL is provided for any certificate authority in
//! a trust chain, a CRL must be provided for all certificate authorities in that chain"), and a
//! changed CRL file applied by the certificate store without a restart.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use outrigger_tls::ca::{BuiltinCa, IssuedCert};
use outrigger_tls::crl::Revocation;
use outrigger_tls::{CertSource, CertStore, ISTIO_ALPNS, client_config, server_config};

const DAY: Duration = Duration::from_secs(86_400);

fn revocation(dir: &std::path::Path, name: &str, pem: &str) -> Option<Arc<Revocation>> {
    let file = dir.join(name);
    std::fs::write(&file, pem).unwrap();
    Some(Arc::new(Revocation::load(&file, false).unwrap()))
}

#[tokio::test]
async fn a_revoked_client_is_refused_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let revoked = workload(&ca, "prod", "stolen");
    let good = workload(&ca, "prod", "client");
    let crl = ca.crl(&[revoked.leaf().clone()], 1, DAY).unwrap();
    let server =
        workload(&ca, "prod", "server").with_revocation(revocation(dir.path(), "ca-crl.pem", &crl));
    let cfg = server_config(&server, &trust(), ISTIO_ALPNS).unwrap();
    let (addr, mut outcomes) = echo_server(move || cfg.clone()).await;

    let pin = [id("prod", "server")];
    let ok = client_config(&good, &trust(), &pin, &[b"istio"]).unwrap();
    connect(ok, addr, "s").await.unwrap();
    assert_eq!(
        next_outcome(&mut outcomes).await.unwrap().peer,
        id("prod", "client")
    );

    let bad = client_config(&revoked, &trust(), &pin, &[b"istio"]).unwrap();
    assert!(connect(bad, addr, "s").await.is_err());
    let refused = next_outcome(&mut outcomes).await.unwrap_err();
    assert!(
        refused.contains("certificate is revoked (listed in a CRL of certificates.crl)"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_revoked_server_is_refused_by_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let server = workload(&ca, "prod", "server");
    let crl = ca.crl(&[server.leaf().clone()], 1, DAY).unwrap();
    let cfg = server_config(&server, &trust(), ISTIO_ALPNS).unwrap();
    let (addr, _outcomes) = echo_server(move || cfg.clone()).await;

    let client =
        workload(&ca, "prod", "client").with_revocation(revocation(dir.path(), "crl.pem", &crl));
    let cc = client_config(&client, &trust(), &[id("prod", "server")], &[b"istio"]).unwrap();
    let err = connect(cc, addr, "s").await.unwrap_err();
    assert!(err.contains("certificate is revoked"), "{err}");

    // The same client without the CRL connects: the refusal was the CRL's.
    let plain = workload(&ca, "prod", "client");
    let cc = client_config(&plain, &trust(), &[id("prod", "server")], &[b"istio"]).unwrap();
    connect(cc, addr, "s").await.unwrap();
}

/// Envoy's rule: with a CRL configured, a certificate whose issuer has no CRL in the file
/// fails, revoked or not; `onlyVerifyLeafCertCrl` does not change that for the leaf.
#[tokio::test]
async fn a_chain_without_a_crl_from_its_issuer_fails_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    // Another CA (another name: a CRL whose issuer name matches is taken as the issuer's and
    // must then verify with its key).
    let other = BuiltinCa::generate("other.local").unwrap();
    let foreign_crl = other.crl(&[], 1, DAY).unwrap();
    let rev = revocation(dir.path(), "other.pem", &foreign_crl);

    let server = workload(&ca, "prod", "server").with_revocation(rev.clone());
    let cfg = server_config(&server, &trust(), ISTIO_ALPNS).unwrap();
    let (addr, mut outcomes) = echo_server(move || cfg.clone()).await;
    let client = workload(&ca, "prod", "client");
    let cc = client_config(&client, &trust(), &[id("prod", "server")], &[b"istio"]).unwrap();
    assert!(connect(cc, addr, "s").await.is_err());
    let refused = next_outcome(&mut outcomes).await.unwrap_err();
    assert!(
        refused.contains("no CRL from the certificate's issuer"),
        "{refused}"
    );

    let plain_server = workload(&ca, "prod", "server");
    let cfg = server_config(&plain_server, &trust(), ISTIO_ALPNS).unwrap();
    let (addr, _o) = echo_server(move || cfg.clone()).await;
    let client = workload(&ca, "prod", "client").with_revocation(rev);
    let cc = client_config(&client, &trust(), &[id("prod", "server")], &[b"istio"]).unwrap();
    let err = connect(cc, addr, "s").await.unwrap_err();
    assert!(
        err.contains("no CRL from the certificate's issuer"),
        "{err}"
    );
}

/// A CRL past its nextUpdate fails every verification (OpenSSL's CRL_HAS_EXPIRED in Envoy).
#[tokio::test]
async fn an_expired_crl_fails_verification_and_says_when_it_expired() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let now = SystemTime::now();
    let expired = ca.crl_between(&[], 1, now - 2 * DAY, now - DAY).unwrap();
    let server = workload(&ca, "prod", "server").with_revocation(revocation(
        dir.path(),
        "old.pem",
        &expired,
    ));
    let cfg = server_config(&server, &trust(), ISTIO_ALPNS).unwrap();
    let (addr, mut outcomes) = echo_server(move || cfg.clone()).await;
    let client = workload(&ca, "prod", "client");
    let cc = client_config(&client, &trust(), &[id("prod", "server")], &[b"istio"]).unwrap();
    assert!(connect(cc, addr, "s").await.is_err());
    let refused = next_outcome(&mut outcomes).await.unwrap_err();
    assert!(
        refused.contains("CRL of certificates.crl expired at"),
        "{refused}"
    );
}

#[test]
fn bad_crl_files_are_refused_with_the_file_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let cases: [(&str, &[u8], &str); 3] = [
        ("empty.pem", b"", "contains no `-----BEGIN X509 CRL-----`"),
        (
            "cert.pem",
            ca.root_pem().as_bytes(),
            "contains no `-----BEGIN X509 CRL-----`",
        ),
        (
            "garbage.pem",
            b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
            "CRL #1 is not a usable CRL",
        ),
    ];
    for (name, bytes, why) in cases {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        let e = Revocation::load(&file, false).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(why), "{name}: {e}");
    }
    let e = Revocation::load(&dir.path().join("missing.pem"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.pem"), "{e}");
}

/// The store re-reads the CRL file: a certificate revoked after start is refused on new
/// handshakes without a restart; a broken rewrite is refused and the CRL in force stays.
#[tokio::test]
async fn the_store_applies_a_changed_crl_and_keeps_the_old_one_over_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = BuiltinCa::init(&ca_dir, TD).unwrap();
    let server_dir = dir.path().join("server");
    ca.issue(&id("prod", "server"), DAY)
        .unwrap()
        .write_to(&server_dir)
        .unwrap();
    let (chain, key, roots) = IssuedCert::paths_in(&server_dir);
    let store = CertStore::new(
        CertSource::Files { chain, key, roots },
        trust(),
        ISTIO_ALPNS.iter().map(|a| a.to_vec()).collect(),
    )
    .unwrap();
    let crl_file = dir.path().join("ca-crl.pem");
    std::fs::write(&crl_file, ca.crl(&[], 1, DAY).unwrap()).unwrap();
    store.set_crl(crl_file.clone(), false).unwrap();
    let s = store.clone();
    let (addr, mut outcomes) = echo_server(move || s.server_config()).await;

    let client = workload(&ca, "prod", "client");
    let pin = [id("prod", "server")];
    let cc = client_config(&client, &trust(), &pin, &[b"istio"]).unwrap();
    let mut open = connect(cc.clone(), addr, "s").await.unwrap();
    next_outcome(&mut outcomes).await.unwrap();

    // Revoked now: applied by reload (the refresh task does the same after the settle time).
    std::fs::write(&crl_file, ca.crl(&[client.leaf().clone()], 2, DAY).unwrap()).unwrap();
    assert!(store.reload().unwrap());
    assert!(connect(cc.clone(), addr, "s").await.is_err());
    assert!(
        next_outcome(&mut outcomes)
            .await
            .unwrap_err()
            .contains("revoked")
    );
    // The connection opened before keeps working.
    ping(&mut open).await.unwrap();

    // A broken rewrite is refused; the revocation stays in force.
    std::fs::write(&crl_file, b"-----BEGIN X509 CRL-----\ntruncated").unwrap();
    let e = store.reload().unwrap_err().to_string();
    assert!(e.contains("ca-crl.pem"), "{e}");
    assert!(connect(cc.clone(), addr, "s").await.is_err());
    assert!(
        next_outcome(&mut outcomes)
            .await
            .unwrap_err()
            .contains("revoked")
    );

    // Un-revoked: served again.
    std::fs::write(&crl_file, ca.crl(&[], 3, DAY).unwrap()).unwrap();
    assert!(store.reload().unwrap());
    connect(cc, addr, "s").await.unwrap();
}

/// Our CRLs are standard: openssl verifies one against the CA's root, and the same CRL in DER
/// (what `openssl crl -outform DER` writes) loads and revokes the same certificate.
#[tokio::test]
async fn openssl_verifies_our_crl_and_its_der_form_loads() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        panic!("openssl is needed (scripts/test.sh installs it)");
    }
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = BuiltinCa::init(&ca_dir, TD).unwrap();
    let revoked = workload(&ca, "prod", "stolen");
    let pem = dir.path().join("crl.pem");
    std::fs::write(&pem, ca.crl(&[revoked.leaf().clone()], 7, DAY).unwrap()).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["crl", "-noout", "-text", "-in"])
        .arg(&pem)
        .arg("-CAfile")
        .arg(ca_dir.join("root-cert.pem"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("verify OK"), "{text}");
    assert!(text.contains("Key Compromise"), "{text}");
    let der = dir.path().join("crl.der");
    let st = std::process::Command::new("openssl")
        .args(["crl", "-outform", "DER", "-in"])
        .arg(&pem)
        .arg("-out")
        .arg(&der)
        .status()
        .unwrap();
    assert!(st.success());
    let r = Revocation::load(&der, false).unwrap();
    assert_eq!(r.counts(), (1, 1));
    let server = workload(&ca, "prod", "server").with_revocation(Some(Arc::new(r)));
    let cfg = server_config(&server, &trust(), ISTIO_ALPNS).unwrap();
    let (addr, mut outcomes) = echo_server(move || cfg.clone()).await;
    let cc = client_config(&revoked, &trust(), &[id("prod", "server")], &[b"istio"]).unwrap();
    assert!(connect(cc, addr, "s").await.is_err());
    assert!(
        next_outcome(&mut outcomes)
            .await
            .unwrap_err()
            .contains("revoked")
    );
}
