//! A workload's credentials: certificate chain, private key and trust bundle, validated together.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outrigger_identity::{Identity, identity_from_der};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, InconsistentKeys, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::crl::{Revocation, SharedRevocation};
use crate::error::InvalidKind;
use crate::{TlsError, crypto_provider, fsutil};

/// A validated credential set, in Istio's three-file shape: `cert-chain.pem` (leaf first, then
/// intermediates), `key.pem` and `root-cert.pem` (the mesh trust bundle: one or more roots).
///
/// Construction checks, so that a bad set is refused at startup or kept out of a rotation:
/// every PEM parses and holds at least one item, the key matches the leaf, and the leaf carries
/// exactly one SPIFFE URI SAN ("An X.509 SVID MUST contain exactly one URI SAN", SPIFFE
/// X.509-SVID §2). [`load_files`](Self::load_files) (and [`crate::CertStore`], for every
/// source) also require the chain to verify against the roots and not to have expired — see
/// [`check_chain`](Self::check_chain). [`from_pem`](Self::from_pem) does not, so that tests
/// and demos can hold a certificate from a rogue CA next to the mesh roots.
///
/// The fields are public for reading; a value can only be made by [`WorkloadCerts::from_pem`]
/// or [`WorkloadCerts::load_files`].
#[derive(Clone)]
pub struct WorkloadCerts {
    /// Leaf first, then intermediates, as presented to peers.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    /// Trust anchors used to verify peers (and checked to sign our own chain).
    pub roots: Vec<CertificateDer<'static>>,
    identity: Identity,
    not_before: SystemTime,
    not_after: SystemTime,
    /// `certificates.crl`: checked on every peer verification with these credentials.
    revocation: SharedRevocation,
}

impl fmt::Debug for WorkloadCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCerts")
            .field("identity", &self.identity.to_string())
            .field("chain_len", &self.chain.len())
            .field("roots_len", &self.roots.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Where each of the three inputs came from, for error messages.
struct Subjects {
    chain: String,
    key: String,
    roots: String,
}

impl Subjects {
    fn pem() -> Self {
        Subjects {
            chain: "certificate chain PEM".into(),
            key: "private key PEM".into(),
            roots: "root certificates PEM".into(),
        }
    }
}

impl WorkloadCerts {
    /// Builds credentials from PEM text (chain: leaf first; roots: one or more CA
    /// certificates). Structural checks only: the chain is *not* verified against the roots
    /// (call [`check_chain`](Self::check_chain) for that).
    pub fn from_pem(chain_pem: &str, key_pem: &str, roots_pem: &str) -> Result<Self, TlsError> {
        Self::build(
            &Subjects::pem(),
            chain_pem.as_bytes(),
            key_pem.as_bytes(),
            roots_pem.as_bytes(),
            None,
        )
    }

    /// [`from_pem`](Self::from_pem) plus [`check_chain`](Self::check_chain): what
    /// [`crate::CertStore`] uses for issued certificates.
    pub fn from_pem_checked(
        chain_pem: &str,
        key_pem: &str,
        roots_pem: &str,
    ) -> Result<Self, TlsError> {
        Self::build(
            &Subjects::pem(),
            chain_pem.as_bytes(),
            key_pem.as_bytes(),
            roots_pem.as_bytes(),
            Some(UnixTime::now()),
        )
    }

    /// Checks that our own chain verifies against our trust bundle, now: peers verify it
    /// against the same mesh roots, so a mismatch means every handshake would fail. An expired
    /// certificate is refused; a not-yet-valid one is accepted with a warning (the CA's clock
    /// may run ahead of ours; Istio back-dates `NotBefore` by 2 minutes for that reason) once
    /// its signatures verify at its start time, unless it starts more than
    /// [`NOT_YET_VALID_TOLERANCE`] from now.
    pub fn check_chain(&self) -> Result<(), TlsError> {
        let subjects = Subjects::pem();
        let store = root_store(&self.roots, &subjects.roots)?;
        verify_own_chain(
            &subjects,
            &self.chain,
            &store,
            UnixTime::now(),
            self.not_before,
        )
    }

    /// Reads Istio-style files (`cert-chain.pem`, `key.pem`, `root-cert.pem`) and checks them
    /// fully, including [`check_chain`](Self::check_chain). Errors name the file and the
    /// reason: missing, empty, no PEM block, key does not match the certificate, no SPIFFE
    /// SAN, not signed by the roots, expired.
    pub fn load_files(chain: &Path, key: &Path, roots: &Path) -> Result<Self, TlsError> {
        let chain_bytes = fsutil::read("certificate chain file", chain)?;
        let key_bytes = fsutil::read("private key file", key)?;
        let roots_bytes = fsutil::read("root certificates file", roots)?;
        Self::from_bytes_named(
            (chain, &chain_bytes),
            (key, &key_bytes),
            (roots, &roots_bytes),
        )
    }

    /// Like [`load_files`](Self::load_files) with contents already read (the rotation poller
    /// reads the files once to hash and parse them).
    pub(crate) fn from_bytes_named(
        chain: (&Path, &[u8]),
        key: (&Path, &[u8]),
        roots: (&Path, &[u8]),
    ) -> Result<Self, TlsError> {
        let subjects = Subjects {
            chain: format!("certificate chain file `{}`", chain.0.display()),
            key: format!("private key file `{}`", key.0.display()),
            roots: format!("root certificates file `{}`", roots.0.display()),
        };
        Self::build(&subjects, chain.1, key.1, roots.1, Some(UnixTime::now()))
    }

    /// The SPIFFE identity of the leaf certificate.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// When the leaf certificate becomes valid.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// When the leaf certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The same credentials, peers checked against `revocation` (or no CRL).
    pub fn with_revocation(mut self, revocation: SharedRevocation) -> Self {
        self.revocation = revocation;
        self
    }

    /// The CRLs peers are checked against, if any.
    pub fn revocation(&self) -> Option<&Arc<Revocation>> {
        self.revocation.as_ref()
    }

    /// The leaf certificate (what peers see).
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The trust bundle as a rustls root store.
    pub(crate) fn root_store(&self) -> Result<RootCertStore, TlsError> {
        root_store(&self.roots, "root certificates")
    }

    fn build(
        subjects: &Subjects,
        chain_pem: &[u8],
        key_pem: &[u8],
        roots_pem: &[u8],
        check_chain_at: Option<UnixTime>,
    ) -> Result<Self, TlsError> {
        let chain = parse_certs(&subjects.chain, chain_pem)?;
        let roots = parse_certs(&subjects.roots, roots_pem)?;
        let key = parse_key(&subjects.key, key_pem)?;

        let provider = crypto_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| {
                TlsError::invalid(&subjects.key, format!("unsupported or corrupt key: {e}"))
            })?;
        match CertifiedKey::new(chain.clone(), signing_key).keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
                return Err(TlsError::invalid_as(
                    InvalidKind::KeyMismatch,
                    &subjects.key,
                    format!(
                        "does not match the leaf certificate in {} (were the files written \
                         by different issuances?)",
                        subjects.chain
                    ),
                ));
            }
            Err(e) => return Err(TlsError::invalid(&subjects.chain, e.to_string())),
        }

        let identity = identity_from_der(&chain[0]).map_err(|e| {
            TlsError::invalid_as(
                InvalidKind::NoSpiffeIdentity,
                &subjects.chain,
                format!("the leaf certificate is not a SPIFFE workload certificate: {e}"),
            )
        })?;
        let (not_before, not_after) =
            validity(&chain[0]).map_err(|reason| TlsError::invalid(&subjects.chain, reason))?;

        let store = root_store(&roots, &subjects.roots)?;
        if let Some(now) = check_chain_at {
            verify_own_chain(subjects, &chain, &store, now, not_before)?;
        }

        Ok(WorkloadCerts {
            chain,
            key: Arc::new(key),
            roots,
            identity,
            not_before,
            not_after,
            revocation: None,
        })
    }
}

/// See [`WorkloadCerts::check_chain`].
fn verify_own_chain(
    subjects: &Subjects,
    chain: &[CertificateDer<'static>],
    store: &RootCertStore,
    now: UnixTime,
    not_before: SystemTime,
) -> Result<(), TlsError> {
    let provider = crypto_provider();
    let algs = provider.signature_verification_algorithms.all;
    let leaf = ParsedCertificate::try_from(&chain[0])
        .map_err(|e| TlsError::invalid(&subjects.chain, format!("unusable leaf: {e}")))?;
    let verify = |at: UnixTime| {
        verify_server_cert_signed_by_trust_anchor(&leaf, store, &chain[1..], at, algs)
    };
    let err = match verify(now) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let (kind, reason) = match &err {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => {
            let now_st = UNIX_EPOCH + Duration::from_secs(now.as_secs());
            if not_before > now_st + NOT_YET_VALID_TOLERANCE {
                return Err(TlsError::invalid_as(
                    InvalidKind::NotYetValid,
                    &subjects.chain,
                    format!(
                        "is not valid until {}, more than {} s from now: not a clock skew \
                         (was it issued for the future, or is this host's clock far behind?)",
                        fmt_time(not_before),
                        NOT_YET_VALID_TOLERANCE.as_secs()
                    ),
                ));
            }
            let start = UnixTime::since_unix_epoch(
                not_before
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .saturating_add(Duration::from_secs(1)),
            );
            match verify(start) {
                Ok(()) => {
                    tracing::warn!(
                        certificate = %subjects.chain,
                        not_before = %fmt_time(not_before),
                        "workload certificate is not valid yet; is this host's clock behind the CA's?"
                    );
                    return Ok(());
                }
                Err(e) => (chain_error_kind(&e), crate::describe_tls_error(&e)),
            }
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => (
            InvalidKind::UntrustedChain,
            format!(
                "is not signed by any CA in {} (unknown issuer)",
                subjects.roots
            ),
        ),
        other => (chain_error_kind(other), crate::describe_tls_error(other)),
    };
    Err(TlsError::invalid_as(kind, &subjects.chain, reason))
}

/// How far in the future a workload certificate's `notBefore` may be and still be accepted
/// (with a warning). A CA whose clock runs a little ahead of ours issues certificates that are
/// "not valid yet" here for a moment; Istio's CA back-dates `NotBefore` for that reason, so a
/// few minutes covers any real skew. A certificate that starts later than this was issued for
/// the future (or this host's clock is badly wrong): peers would refuse it as well, so it is
/// refused at start-up and kept out of a rotation.
pub const NOT_YET_VALID_TOLERANCE: Duration = Duration::from_secs(10 * 60);

/// The check a chain-verification error belongs to.
fn chain_error_kind(e: &rustls::Error) -> InvalidKind {
    match e {
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => InvalidKind::Expired,
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => InvalidKind::NotYetValid,
        _ => InvalidKind::UntrustedChain,
    }
}

pub(crate) fn fmt_time(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

fn is_blank(pem: &[u8]) -> bool {
    pem.iter().all(u8::is_ascii_whitespace)
}

/// All `CERTIFICATE` blocks of a PEM text (other block types are skipped), each checked to be
/// parseable X.509.
pub(crate) fn parse_certs(
    subject: &str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    if is_blank(pem) {
        return Err(TlsError::invalid(
            subject,
            "is empty (was it completely written?)",
        ));
    }
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::invalid(subject, format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::invalid(
            subject,
            "contains no `-----BEGIN CERTIFICATE-----` PEM block",
        ));
    }
    for (i, cert) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(cert).map_err(|e| {
            TlsError::invalid(
                subject,
                format!("certificate #{} is not valid X.509: {e}", i + 1),
            )
        })?;
    }
    Ok(certs)
}

/// The first private key of a PEM text (PKCS#8 `PRIVATE KEY`, SEC1 `EC PRIVATE KEY` or PKCS#1
/// `RSA PRIVATE KEY`).
pub(crate) fn parse_key(subject: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls_pki_types::pem::Error;
    if is_blank(pem) {
        return Err(TlsError::invalid(
            subject,
            "is empty (was it completely written?)",
        ));
    }
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        Error::NoItemsFound => TlsError::invalid(
            subject,
            "contains no private key PEM block (expected `-----BEGIN PRIVATE KEY-----`, \
             `EC PRIVATE KEY` or `RSA PRIVATE KEY`)",
        ),
        other => TlsError::invalid(subject, format!("malformed PEM: {other}")),
    })
}

pub(crate) fn root_store(
    roots: &[CertificateDer<'static>],
    subject: &str,
) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for (i, root) in roots.iter().enumerate() {
        store.add(root.clone()).map_err(|e| {
            TlsError::invalid(
                subject,
                format!("certificate #{} cannot be a trust anchor: {e}", i + 1),
            )
        })?;
    }
    Ok(store)
}

/// `notBefore`/`notAfter` of a DER certificate.
pub(crate) fn validity(der: &[u8]) -> Result<(SystemTime, SystemTime), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("certificate is not valid X.509: {e}"))?;
    let to_system = |t: i64| {
        if t >= 0 {
            UNIX_EPOCH + Duration::from_secs(t as u64)
        } else {
            UNIX_EPOCH - Duration::from_secs(t.unsigned_abs())
        }
    };
    let v = cert.validity();
    Ok((
        to_system(v.not_before.timestamp()),
        to_system(v.not_after.timestamp()),
    ))
}
