//! A built-in CA shaped like Istio's self-signed CA (`outrigger ca init`), for standalone
//! meshes of Outrigger agents, demos and tests.
//!
//! Certificates follow Istio's `security/pkg/pki/util/generate_cert.go`:
//! * root: self-signed, `CA:TRUE`, `O=<trust domain>` ("Organization for this certificate" is
//!   the trust domain in istiod's self-signed CA), key usage `keyCertSign`/`cRLSign`;
//! * workload: no subject (the identity lives in the URI SAN, which is then marked critical as
//!   RFC 5280 §4.2.1.6 requires for an empty subject), `CA:FALSE`, "the private key is allowed
//!   for digital signature and key encipherment", and "we do not differentiate non-CA certs to
//!   be used on client auth or server auth" (EKU `serverAuth` + `clientAuth`); 128-bit random
//!   serial; `NotBefore` back-dated by Istio's `ClockSkewGracePeriod` ("the period of time a
//!   certificate will be valid before its creation ... to handle cases where we have clock skew
//!   between the CA and workloads", 2 minutes).
//!
//! Keys are ECDSA P-256 (Istio's `ECC_SIGNATURE_ALGORITHM=ECDSA` default curve), stored as
//! PKCS#8 PEM.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use outrigger_identity::{Identity, validate_trust_domain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;

use crate::certs::{parse_certs, parse_key};
use crate::fsutil::{self, Mode};
use crate::{TlsError, crypto_provider};

/// File name of the CA certificate (also Istio's name for the trust bundle).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// File name of the CA private key.
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// Istio's file name for the workload certificate chain.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// Istio's file name for the workload private key.
pub const KEY_FILE: &str = "key.pem";

/// Istio's `ClockSkewGracePeriod`: workload certificates are valid from 2 minutes before issue.
pub const CLOCK_SKEW_GRACE: Duration = Duration::from_secs(120);

/// Validity of the root created by [`BuiltinCa::init`] (Istio's self-signed root default is
/// also 10 years, `CITADEL_SELF_SIGNED_CA_CERT_TTL`).
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A CA: its root certificate and private key.
pub struct BuiltinCa {
    trust_domain: String,
    root_pem: String,
    root_der: CertificateDer<'static>,
    key: KeyPair,
}

impl fmt::Debug for BuiltinCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuiltinCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// What to put in a certificate issued by [`BuiltinCa::issue_with`]. No checks beyond what
/// X.509 can encode: tests use it to make certificates with no, several or non-SPIFFE URI SANs,
/// foreign trust domains and any validity window.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// URI SANs, in order (a SPIFFE ID, or anything).
    pub uri_sans: Vec<String>,
    /// DNS SANs.
    pub dns_sans: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl IssueOptions {
    /// What [`BuiltinCa::issue`] uses: the SPIFFE ID as the only URI SAN, valid from
    /// [`CLOCK_SKEW_GRACE`] ago until `ttl` from now.
    pub fn workload(id: &Identity, ttl: Duration) -> Self {
        let now = SystemTime::now();
        IssueOptions {
            uri_sans: vec![id.to_string()],
            dns_sans: Vec::new(),
            not_before: now - CLOCK_SKEW_GRACE,
            not_after: now + ttl,
        }
    }
}

/// A freshly issued workload credential set, PEM-encoded.
#[derive(Clone)]
pub struct IssuedCert {
    /// Leaf, then intermediates (none for the built-in CA).
    pub cert_chain_pem: String,
    /// PKCS#8 `PRIVATE KEY`.
    pub key_pem: String,
    /// The CA root (trust bundle).
    pub root_cert_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_chain_pem", &self.cert_chain_pem)
            .field("root_cert_pem", &self.root_cert_pem)
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// Writes Istio's file names into `dir` (created if missing): `cert-chain.pem`, `key.pem`
    /// (`0600` on Unix) and `root-cert.pem`. Each file is replaced atomically (temporary file +
    /// rename), key first and chain last, so a poller never reads a truncated file.
    pub fn write_to(&self, dir: &Path) -> Result<(), TlsError> {
        fsutil::create_dir_all(dir)?;
        fsutil::write_atomic(&dir.join(KEY_FILE), self.key_pem.as_bytes(), Mode::Secret)?;
        fsutil::write_atomic(
            &dir.join(ROOT_CERT_FILE),
            self.root_cert_pem.as_bytes(),
            Mode::Public,
        )?;
        fsutil::write_atomic(
            &dir.join(CERT_CHAIN_FILE),
            self.cert_chain_pem.as_bytes(),
            Mode::Public,
        )
    }

    /// The three paths [`write_to`](Self::write_to) produces in `dir`: (chain, key, roots).
    pub fn paths_in(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        (
            dir.join(CERT_CHAIN_FILE),
            dir.join(KEY_FILE),
            dir.join(ROOT_CERT_FILE),
        )
    }
}

fn gen_err(e: rcgen::Error) -> TlsError {
    TlsError::Issue(e.to_string())
}

/// 128 random bits, as Istio's `genSerialNum` ("serialNumLimit := 1 << 128"), kept positive.
fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    crypto_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| TlsError::Issue("the system random generator failed".into()))?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

impl BuiltinCa {
    /// `outrigger ca init`: creates an ECDSA P-256 self-signed root for `trust_domain`
    /// (`CA:TRUE`, `keyCertSign`/`cRLSign`, `O=<trust domain>`, 10 years) and writes
    /// `root-cert.pem` and `root-key.pem` (`0600` on Unix) into `dir`, created if missing.
    /// Refuses to overwrite an existing CA: replacing a root silently would cut every workload
    /// off the mesh.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<Self, TlsError> {
        validate_trust_domain(trust_domain)
            .map_err(|why| TlsError::invalid(format!("trust domain `{trust_domain}`"), why))?;
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        for existing in [&cert_path, &key_path] {
            if existing.exists() {
                return Err(TlsError::CaExists {
                    dir: dir.to_path_buf(),
                    file: existing.clone(),
                });
            }
        }
        let ca = Self::generate(trust_domain)?;
        fsutil::create_dir_all(dir)?;
        // `create_new` on both files: a concurrent `init` cannot overwrite what we write.
        let created = |e: TlsError, path: &Path| match e {
            TlsError::Write { source, .. }
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                TlsError::CaExists {
                    dir: dir.to_path_buf(),
                    file: path.to_path_buf(),
                }
            }
            other => other,
        };
        fsutil::write_new(&key_path, ca.key.serialize_pem().as_bytes(), Mode::Secret)
            .map_err(|e| created(e, &key_path))?;
        fsutil::write_new(&cert_path, ca.root_pem.as_bytes(), Mode::Public)
            .map_err(|e| created(e, &cert_path))?;
        Ok(ca)
    }

    /// A new CA in memory only (tests, demos).
    pub fn generate(trust_domain: &str) -> Result<Self, TlsError> {
        validate_trust_domain(trust_domain)
            .map_err(|why| TlsError::invalid(format!("trust domain `{trust_domain}`"), why))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial()?);
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW_GRACE).into();
        params.not_after = (now + ROOT_VALIDITY).into();
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(BuiltinCa {
            trust_domain: trust_domain.to_string(),
            root_pem: cert.pem(),
            root_der: cert.der().clone(),
            key,
        })
    }

    /// Loads a CA written by [`init`](Self::init). The trust domain is read back from the
    /// root's `O=` attribute. Errors name the file and the reason.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let cert_subject = format!("CA certificate file `{}`", cert_path.display());
        let key_subject = format!("CA private key file `{}`", key_path.display());
        let cert_bytes = fsutil::read("CA certificate file", &cert_path)?;
        let key_bytes = fsutil::read("CA private key file", &key_path)?;

        let mut certs = parse_certs(&cert_subject, &cert_bytes)?;
        if certs.len() != 1 {
            return Err(TlsError::invalid(
                &cert_subject,
                format!(
                    "holds {} certificates; expected exactly one root",
                    certs.len()
                ),
            ));
        }
        let root_der = certs.remove(0);
        let key_der = parse_key(&key_subject, &key_bytes)?;
        let key = KeyPair::try_from(&key_der).map_err(|e| {
            TlsError::invalid(&key_subject, format!("unsupported or corrupt key: {e}"))
        })?;

        let (_, x509) = x509_parser::parse_x509_certificate(&root_der)
            .map_err(|e| TlsError::invalid(&cert_subject, format!("not valid X.509: {e}")))?;
        if *x509.public_key().subject_public_key.data != *key.der_bytes() {
            return Err(TlsError::invalid(
                &key_subject,
                format!("does not match the certificate in {cert_subject}"),
            ));
        }
        if !x509.is_ca() {
            return Err(TlsError::invalid(
                &cert_subject,
                "is not a CA certificate (basicConstraints CA:TRUE missing)",
            ));
        }
        let trust_domain = x509
            .subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .map(str::to_string)
            .ok_or_else(|| {
                TlsError::invalid(
                    &cert_subject,
                    "has no O= (organization) attribute naming the trust domain",
                )
            })?;
        validate_trust_domain(&trust_domain).map_err(|why| {
            TlsError::invalid(
                &cert_subject,
                format!("O=`{trust_domain}` is not a valid trust domain: {why}"),
            )
        })?;
        let root_pem = String::from_utf8_lossy(&cert_bytes).into_owned();
        Ok(BuiltinCa {
            trust_domain,
            root_pem,
            root_der,
            key,
        })
    }

    /// The trust domain this CA signs.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// A workload certificate for `id`, valid from 2 minutes ago (Istio's clock-skew grace)
    /// for `ttl`. Refuses an identity of another trust domain.
    pub fn issue(&self, id: &Identity, ttl: Duration) -> Result<IssuedCert, TlsError> {
        if id.trust_domain() != self.trust_domain {
            return Err(TlsError::ForeignIdentity {
                identity: id.to_string(),
                ca_trust_domain: self.trust_domain.clone(),
            });
        }
        self.issue_with(&IssueOptions::workload(id, ttl))
    }

    /// A workload certificate with full control over SANs and validity (see [`IssueOptions`]).
    pub fn issue_with(&self, opts: &IssueOptions) -> Result<IssuedCert, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        Ok(IssuedCert {
            cert_chain_pem: self.sign(opts, &key)?,
            key_pem: key.serialize_pem(),
            root_cert_pem: self.root_pem.clone(),
        })
    }

    /// Signs the public key of a PEM certificate signing request (its signature checked first)
    /// with the SANs and validity of `opts`, and returns the certificate, PEM. As istiod's
    /// `CreateCertificate` does, the subject and SANs the request asks for are ignored: "the
    /// SAN is the identity of the caller in authentication result" and "the subject public key
    /// is the public key in the CSR" (istio/istio `security/pkg/server/ca/server.go`); the
    /// caller decides the identity with [`csr_uri_sans`] and its own authentication.
    pub fn sign_csr(&self, csr_pem: &str, opts: &IssueOptions) -> Result<String, TlsError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| TlsError::invalid("certificate signing request", csr_error(e)))?;
        self.sign(opts, &csr.public_key)
    }

    /// The certificate shape of a workload certificate (see the module documentation), for
    /// `public_key`, signed by this CA.
    fn sign(
        &self,
        opts: &IssueOptions,
        public_key: &impl PublicKeyData,
    ) -> Result<String, TlsError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        for uri in &opts.uri_sans {
            let uri = rcgen::string::Ia5String::try_from(uri.as_str())
                .map_err(|e| TlsError::Issue(format!("URI SAN `{uri}`: {e}")))?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        for dns in &opts.dns_sans {
            let dns = rcgen::string::Ia5String::try_from(dns.as_str())
                .map_err(|e| TlsError::Issue(format!("DNS SAN `{dns}`: {e}")))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = opts.not_before.into();
        params.not_after = opts.not_after.into();

        let issuer = Issuer::from_ca_cert_der(&self.root_der, &self.key).map_err(gen_err)?;
        let cert = params.signed_by(public_key, &issuer).map_err(gen_err)?;
        Ok(cert.pem())
    }
}

impl BuiltinCa {
    /// A CRL signed by this CA (version 2, CRL number `number`, valid from now for `validity`)
    /// revoking the certificates `revoked` (PEM or DER leaf certificates; their serials are
    /// read from them), as `openssl ca -gencrl` makes one. PEM.
    pub fn crl(
        &self,
        revoked: &[CertificateDer<'_>],
        number: u64,
        validity: Duration,
    ) -> Result<String, TlsError> {
        let now = SystemTime::now();
        self.crl_between(revoked, number, now - CLOCK_SKEW_GRACE, now + validity)
    }

    /// [`crl`](Self::crl) with explicit `thisUpdate` and `nextUpdate` (tests make expired ones).
    pub fn crl_between(
        &self,
        revoked: &[CertificateDer<'_>],
        number: u64,
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> Result<String, TlsError> {
        let mut revoked_certs = Vec::with_capacity(revoked.len());
        for cert in revoked {
            let (_, x509) = x509_parser::parse_x509_certificate(cert)
                .map_err(|e| TlsError::Issue(format!("revoked certificate: {e}")))?;
            revoked_certs.push(rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(x509.raw_serial()),
                revocation_time: this_update.into(),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update: this_update.into(),
            next_update: next_update.into(),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let issuer = Issuer::from_ca_cert_der(&self.root_der, &self.key).map_err(gen_err)?;
        let crl = params.signed_by(&issuer).map_err(gen_err)?;
        crl.pem().map_err(gen_err)
    }
}

/// Why a certificate signing request was refused, in words.
fn csr_error(e: rcgen::Error) -> String {
    match e {
        rcgen::Error::InvalidCertificationRequestSignature => {
            "its signature does not verify with its own public key".into()
        }
        rcgen::Error::CouldNotParseCertificationRequest => {
            "not a PEM `CERTIFICATE REQUEST` (PKCS#10)".into()
        }
        other => other.to_string(),
    }
}

/// The URI SANs a PEM certificate signing request asks for (its signature checked first).
pub fn csr_uri_sans(csr_pem: &str) -> Result<Vec<String>, TlsError> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| TlsError::invalid("certificate signing request", csr_error(e)))?;
    Ok(csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str().to_string()),
            _ => None,
        })
        .collect())
}

/// A new key and a certificate signing request for `id`, as Istio's agents make them: an ECDSA
/// P-256 key (istio-agent's `ECC_SIGNATURE_ALGORITHM=ECDSA`, P-256 by default), no subject, the
/// SPIFFE ID as the only SAN (ztunnel `src/tls/csr.rs`, istio `security/pkg/pki/util`
/// `GenCSR` with `Host: <spiffe id>`). Returns (CSR PEM, PKCS#8 key PEM).
pub fn workload_csr(id: &Identity) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(id.to_string())
        .map_err(|e| TlsError::Issue(format!("URI SAN `{id}`: {e}")))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(&key).map_err(gen_err)?;
    Ok((csr.pem().map_err(gen_err)?, key.serialize_pem()))
}
