//! The built-in CA (`ca init`/`load`/`issue`), the shape of what it issues (checked with
//! x509-parser and with `openssl`), and credential loading errors that name the file.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use outrigger_tls::ca::{BuiltinCa, IssuedCert, ROOT_CERT_FILE, ROOT_KEY_FILE};
use outrigger_tls::{TlsError, WorkloadCerts};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::*;

const OPENSSL: &str = "/usr/bin/openssl";

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new(OPENSSL)
        .args(args)
        .output()
        .expect("run /usr/bin/openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn first_der(pem: &str) -> Vec<u8> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    pem.contents
}

#[test]
fn init_writes_root_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca"); // created by init
    let ca = BuiltinCa::init(&ca_dir, "cluster.local").unwrap();
    assert_eq!(ca.trust_domain(), "cluster.local");
    let on_disk = std::fs::read_to_string(ca_dir.join(ROOT_CERT_FILE)).unwrap();
    assert_eq!(on_disk, ca.root_pem());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ca_dir.join(ROOT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "root-key.pem must be owner-only");
    }

    let err = BuiltinCa::init(&ca_dir, "cluster.local").unwrap_err();
    assert!(matches!(err, TlsError::CaExists { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("refusing to overwrite"), "{msg}");
    assert!(msg.contains(ROOT_CERT_FILE), "{msg}");
    // Untouched.
    assert_eq!(
        std::fs::read_to_string(ca_dir.join(ROOT_CERT_FILE)).unwrap(),
        on_disk
    );

    // Only the key left behind also counts as an existing CA.
    std::fs::remove_file(ca_dir.join(ROOT_CERT_FILE)).unwrap();
    let msg = BuiltinCa::init(&ca_dir, "cluster.local")
        .unwrap_err()
        .to_string();
    assert!(msg.contains(ROOT_KEY_FILE), "{msg}");

    assert!(BuiltinCa::init(&dir.path().join("x"), "Not A Domain").is_err());
}

#[test]
fn load_round_trips_and_issues_trusted_certs() {
    let dir = tempfile::tempdir().unwrap();
    let created = BuiltinCa::init(dir.path(), "corp.example").unwrap();
    let loaded = BuiltinCa::load(dir.path()).unwrap();
    assert_eq!(loaded.trust_domain(), "corp.example");
    assert_eq!(loaded.root_pem(), created.root_pem());

    let id = outrigger_identity::Identity::istio("corp.example", "ns1", "sa1").unwrap();
    let issued = loaded.issue(&id, Duration::from_secs(3600)).unwrap();
    // Signed by the root that `init` wrote: WorkloadCerts verifies the chain against it.
    let certs =
        WorkloadCerts::from_pem(&issued.cert_chain_pem, &issued.key_pem, created.root_pem())
            .unwrap();
    assert_eq!(certs.identity(), &id);
}

#[test]
fn load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = BuiltinCa::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains(ROOT_CERT_FILE) && err.contains("cannot read"),
        "{err}"
    );

    BuiltinCa::init(dir.path(), "cluster.local").unwrap();
    std::fs::write(dir.path().join(ROOT_CERT_FILE), "garbage\n").unwrap();
    let err = BuiltinCa::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains(ROOT_CERT_FILE) && err.contains("no `-----BEGIN CERTIFICATE-----`"),
        "{err}"
    );

    // A root from another CA next to this key.
    let other = BuiltinCa::generate("cluster.local").unwrap();
    std::fs::write(dir.path().join(ROOT_CERT_FILE), other.root_pem()).unwrap();
    let err = BuiltinCa::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains(ROOT_KEY_FILE) && err.contains("does not match"),
        "{err}"
    );
}

#[test]
fn issue_refuses_foreign_trust_domain() {
    let ca = ca();
    let foreign = "spiffe://evil.local/ns/a/sa/b".parse().unwrap();
    let err = ca.issue(&foreign, Duration::from_secs(60)).unwrap_err();
    assert!(matches!(err, TlsError::ForeignIdentity { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("evil.local") && msg.contains("cluster.local"),
        "{msg}"
    );
}

/// The fields Istio puts in its certificates (`generate_cert.go`), read back with x509-parser.
#[test]
fn issued_certificates_look_like_istios() {
    let ca = ca();
    let ttl = Duration::from_secs(24 * 3600);
    let before = SystemTime::now();
    let issued = ca.issue(&id("default", "sleep"), ttl).unwrap();

    let root_der = first_der(&issued.root_cert_pem);
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    assert!(root.is_ca());
    let ku = root.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let org: Vec<_> = root
        .subject()
        .iter_organization()
        .map(|o| o.as_str().unwrap().to_string())
        .collect();
    assert_eq!(org, ["cluster.local"]);
    let root_years = (root.validity().not_after.timestamp()
        - root.validity().not_before.timestamp())
        / (365 * 24 * 3600);
    assert_eq!(root_years, 10);

    let leaf_der = first_der(&issued.cert_chain_pem);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    assert_eq!(leaf.subject().iter().count(), 0, "no subject, as Istio");
    assert!(!leaf.is_ca());
    let bc = leaf.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca, "explicit CA:FALSE");
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(
        san.critical,
        "SAN is critical when the subject is empty (RFC 5280)"
    );
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, ["spiffe://cluster.local/ns/default/sa/sleep"]);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment());
    assert!(!ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(leaf.extensions().iter().any(|e| matches!(
        e.parsed_extension(),
        ParsedExtension::AuthorityKeyIdentifier(_)
    )));
    // 128-bit random serial, positive.
    assert!(leaf.raw_serial().len() <= 17 && leaf.raw_serial().len() >= 15);
    assert_ne!(leaf.raw_serial(), root.raw_serial());
    // P-256 key.
    assert_eq!(
        leaf.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );

    // Validity: back-dated by Istio's 2-minute clock-skew grace, ends ttl from now.
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    assert!((secs(before) - 120 - nb).abs() <= 2, "not_before {nb}");
    assert!(
        (secs(before) + ttl.as_secs() as i64 - na).abs() <= 2,
        "not_after {na}"
    );

    let certs = certs_of(&issued);
    assert_eq!(secs(certs.not_after()), na);
    assert_eq!(secs(certs.not_before()), nb);
}

#[test]
fn openssl_verifies_issued_chain_and_shows_istio_fields() {
    let dir = tempfile::tempdir().unwrap();
    let ca = BuiltinCa::init(&dir.path().join("ca"), "cluster.local").unwrap();
    let issued = ca
        .issue(&id("default", "sleep"), Duration::from_secs(3600))
        .unwrap();
    let certs_dir = dir.path().join("certs");
    issued.write_to(&certs_dir).unwrap();
    let (chain, key, roots) = IssuedCert::paths_in(&certs_dir);
    let s = |p: &Path| p.to_str().unwrap().to_string();

    let (ok, out) = openssl(&["verify", "-CAfile", &s(&roots), &s(&chain)]);
    assert!(ok && out.contains(": OK"), "{out}");
    // And with the client/server purposes that the EKUs grant.
    for purpose in ["sslclient", "sslserver"] {
        let (ok, out) = openssl(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            &s(&roots),
            &s(&chain),
        ]);
        assert!(ok, "{purpose}: {out}");
    }
    // A root of another CA does not verify it.
    let other = dir.path().join("other-root.pem");
    std::fs::write(
        &other,
        BuiltinCa::generate("cluster.local").unwrap().root_pem(),
    )
    .unwrap();
    let (ok, out) = openssl(&["verify", "-CAfile", &s(&other), &s(&chain)]);
    assert!(!ok, "{out}");

    let (ok, text) = openssl(&["x509", "-in", &s(&chain), "-noout", "-text"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/default/sa/sleep"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(
        text.contains("Digital Signature, Key Encipherment"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("prime256v1"), "{text}");

    let (ok, text) = openssl(&["x509", "-in", &s(&roots), "-noout", "-text"]);
    assert!(ok, "{text}");
    assert!(text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");
    assert!(text.contains("O = cluster.local"), "{text}");

    // The key file is a PKCS#8 key that openssl reads, and matches the certificate.
    let (ok, from_key) = openssl(&["pkey", "-in", &s(&key), "-pubout"]);
    assert!(ok, "{from_key}");
    let (ok, from_cert) = openssl(&["x509", "-in", &s(&chain), "-noout", "-pubkey"]);
    assert!(ok, "{from_cert}");
    assert_eq!(from_key, from_cert);

    // The SHA-256 fingerprint matches ours (XFCC `Hash=`).
    let (ok, fp) = openssl(&[
        "x509",
        "-in",
        &s(&chain),
        "-noout",
        "-fingerprint",
        "-sha256",
    ]);
    assert!(ok, "{fp}");
    let fp = fp
        .trim()
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_lowercase();
    assert_eq!(
        fp,
        outrigger_tls::cert_sha256_hex(&first_der(&issued.cert_chain_pem))
    );
}

#[test]
fn write_to_uses_istio_file_names_and_private_key_mode() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("nested/certs");
    let issued = ca()
        .issue(&id("a", "b"), Duration::from_secs(3600))
        .unwrap();
    issued.write_to(&target).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["cert-chain.pem", "key.pem", "root-cert.pem"]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(target.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let (chain, key, roots) = IssuedCert::paths_in(&target);
    let certs = WorkloadCerts::load_files(&chain, &key, &roots).unwrap();
    assert_eq!(certs.identity(), &id("a", "b"));
}

/// Every way a credential set can be wrong gives an error naming the file and the reason.
#[test]
fn load_files_errors_name_file_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let good = ca.issue(&id("a", "b"), Duration::from_secs(3600)).unwrap();
    good.write_to(dir.path()).unwrap();
    let (chain, key, roots) = IssuedCert::paths_in(dir.path());
    let load = || {
        WorkloadCerts::load_files(&chain, &key, &roots)
            .unwrap_err()
            .to_string()
    };
    let restore = || good.write_to(dir.path()).unwrap();
    let chain_name = chain.display().to_string();
    let key_name = key.display().to_string();
    let roots_name = roots.display().to_string();

    std::fs::remove_file(&key).unwrap();
    let err = load();
    assert!(
        err.contains(&key_name) && err.contains("cannot read"),
        "{err}"
    );
    restore();

    std::fs::write(&chain, "").unwrap();
    let err = load();
    assert!(
        err.contains(&chain_name) && err.contains("is empty"),
        "{err}"
    );
    restore();

    std::fs::write(&roots, "not pem at all\n").unwrap();
    let err = load();
    assert!(
        err.contains(&roots_name) && err.contains("no `-----BEGIN CERTIFICATE-----`"),
        "{err}"
    );
    restore();

    std::fs::write(&key, good.cert_chain_pem.as_bytes()).unwrap();
    let err = load();
    assert!(
        err.contains(&key_name) && err.contains("no private key"),
        "{err}"
    );
    restore();

    // Key of another issuance (a half-finished rotation).
    let other = ca.issue(&id("a", "b"), Duration::from_secs(3600)).unwrap();
    std::fs::write(&key, &other.key_pem).unwrap();
    let err = load();
    assert!(
        err.contains(&key_name) && err.contains("does not match") && err.contains(&chain_name),
        "{err}"
    );
    restore();

    // Truncated PEM (a half-written file).
    let half = &good.cert_chain_pem[..good.cert_chain_pem.len() / 2];
    std::fs::write(&chain, half).unwrap();
    let err = load();
    assert!(
        err.contains(&chain_name) && err.contains("malformed PEM"),
        "{err}"
    );
    restore();

    let no_san = issue_raw(&ca, &["https://example.com/x"], -60, 3600);
    no_san.write_to(dir.path()).unwrap();
    let err = load();
    assert!(
        err.contains(&chain_name) && err.contains("no SPIFFE URI SAN"),
        "{err}"
    );
    restore();

    let two = issue_raw(
        &ca,
        &[
            "spiffe://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/c",
        ],
        -60,
        3600,
    );
    two.write_to(dir.path()).unwrap();
    let err = load();
    assert!(err.contains("2 SPIFFE URI SANs"), "{err}");
    restore();

    let expired = issue_raw(&ca, &["spiffe://cluster.local/ns/a/sa/b"], -7200, -3600);
    expired.write_to(dir.path()).unwrap();
    let err = load();
    assert!(
        err.contains(&chain_name) && err.contains("expired at"),
        "{err}"
    );
    restore();

    // Roots of another CA (named differently, so webpki finds no issuer).
    std::fs::write(
        &roots,
        BuiltinCa::generate("other.mesh").unwrap().root_pem(),
    )
    .unwrap();
    let err = load();
    assert!(
        err.contains(&chain_name)
            && err.contains("not signed by any CA in")
            && err.contains(&roots_name),
        "{err}"
    );
    restore();

    WorkloadCerts::load_files(&chain, &key, &roots).unwrap();
}

/// A certificate that is not valid yet (CA clock ahead of ours) is accepted with a warning:
/// refusing it would keep a freshly issued certificate out for no security gain. One that
/// starts further ahead than any clock skew is refused.
#[test]
fn not_yet_valid_own_certificate_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let future = issue_raw(&ca, &["spiffe://cluster.local/ns/a/sa/b"], 300, 3600);
    future.write_to(dir.path()).unwrap();
    let (chain, key, roots) = IssuedCert::paths_in(dir.path());
    let certs = WorkloadCerts::load_files(&chain, &key, &roots).unwrap();
    assert!(certs.not_before() > SystemTime::now());
    certs.check_chain().unwrap();

    // But its signatures are still checked: the same window from another CA is refused.
    let rogue = issue_raw(
        &BuiltinCa::generate("other.mesh").unwrap(),
        &["spiffe://cluster.local/ns/a/sa/b"],
        300,
        3600,
    );
    std::fs::write(&chain, &rogue.cert_chain_pem).unwrap();
    std::fs::write(&key, &rogue.key_pem).unwrap();
    let err = WorkloadCerts::load_files(&chain, &key, &roots)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not signed by a trusted CA"), "{err}");

    // Beyond NOT_YET_VALID_TOLERANCE it is no clock skew: refused (issue 13: start-up and
    // rotation check the validity period).
    let far = outrigger_tls::NOT_YET_VALID_TOLERANCE.as_secs() as i64 + 120;
    issue_raw(&ca, &["spiffe://cluster.local/ns/a/sa/b"], far, far + 3600)
        .write_to(dir.path())
        .unwrap();
    let err = WorkloadCerts::load_files(&chain, &key, &roots).unwrap_err();
    assert_eq!(err.refusal_reason(), "not_yet_valid", "{err}");
    assert!(err.to_string().contains("is not valid until"), "{err}");
}

/// Istio writes EC keys as SEC1 (`EC PRIVATE KEY`) unless PKCS#8 is requested; both load, and
/// a bundle with several roots (root rotation) is accepted.
#[test]
fn sec1_keys_and_multi_root_bundles_load() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let issued = ca.issue(&id("a", "b"), Duration::from_secs(3600)).unwrap();
    issued.write_to(dir.path()).unwrap();
    let (chain, key, roots) = IssuedCert::paths_in(dir.path());
    let sec1 = dir.path().join("sec1.pem");
    let (ok, out) = openssl(&[
        "ec",
        "-in",
        key.to_str().unwrap(),
        "-out",
        sec1.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    assert!(
        std::fs::read_to_string(&sec1)
            .unwrap()
            .contains("BEGIN EC PRIVATE KEY")
    );
    let bundle = format!(
        "{}{}",
        BuiltinCa::generate("cluster.local").unwrap().root_pem(),
        issued.root_cert_pem
    );
    std::fs::write(&roots, bundle).unwrap();
    let certs = WorkloadCerts::load_files(&chain, &sec1, &roots).unwrap();
    assert_eq!(certs.roots.len(), 2);
}
