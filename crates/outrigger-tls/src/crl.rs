//! Certificate revocation lists: `certificates.crl`, honoured on every peer verification
//! (inbound mTLS, outbound mTLS, HBONE both ways).
//!
//! Istio hands a sidecar the plugged-in CA's CRL as Envoy's `validation_context.crl` beside the
//! root (istio/istio `security/pkg/nodeagent/sds/sdsservice.go`: `Crl` set to
//! `/var/run/secrets/istio/crl/ca-crl.pem`, the `ca-crl.pem` of the `istio-ca-crl` ConfigMap),
//! without `only_verify_leaf_cert_crl`. Envoy's rules for that field
//! (`envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext.crl`), followed
//! here:
//!
//! * "if a CRL is provided for any certificate authority in a trust chain, a CRL must be
//!   provided for all certificate authorities in that chain. Failure to do so will result in
//!   verification failure for both revoked and unrevoked certificates from that chain" — every
//!   certificate of the peer's chain below the trust anchor is checked, and a certificate whose
//!   issuer has no CRL in the file fails (`onlyVerifyLeafCertCrl: true` checks the leaf only,
//!   Envoy's `only_verify_leaf_cert_crl`);
//! * "if this file contains multiple CRLs, all of them will be used";
//! * a CRL past its `nextUpdate` fails verification (OpenSSL's `X509_V_ERR_CRL_HAS_EXPIRED`,
//!   which Envoy does not ignore), as does one whose signature does not verify.
//!
//! The file is re-read with the certificates (see [`crate::CertStore`]) and a changed file is
//! applied to new handshakes without dropping connections.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use sha2::{Digest, Sha256};
use webpki::{
    CertRevocationList, ExpirationPolicy, OwnedCertRevocationList, RevocationCheckDepth,
    RevocationOptionsBuilder, UnknownStatusPolicy,
};

use crate::TlsError;

/// The CRLs of one file, parsed once.
pub struct Revocation {
    file: PathBuf,
    ders: Vec<CertificateRevocationListDer<'static>>,
    parsed: Vec<CertRevocationList<'static>>,
    only_leaf: bool,
    fingerprint: [u8; 32],
    revoked: usize,
    next_update: Option<SystemTime>,
}

impl fmt::Debug for Revocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Revocation")
            .field("file", &self.file)
            .field("crls", &self.ders.len())
            .field("revoked", &self.revoked)
            .field("only_leaf", &self.only_leaf)
            .finish()
    }
}

impl Revocation {
    /// Reads `file`: one or more PEM `X509 CRL` blocks (a DER file holds one CRL). Errors name
    /// the file, the CRL's position and the reason.
    pub fn load(file: &Path, only_leaf: bool) -> Result<Self, TlsError> {
        let bytes = crate::fsutil::read("certificate revocation list file", file)?;
        Self::from_bytes(file, &bytes, only_leaf)
    }

    /// [`load`](Self::load) with the contents already read.
    pub fn from_bytes(file: &Path, bytes: &[u8], only_leaf: bool) -> Result<Self, TlsError> {
        let subject = format!("certificate revocation list file `{}`", file.display());
        let ders: Vec<CertificateRevocationListDer<'static>> = if bytes.first() == Some(&0x30) {
            vec![CertificateRevocationListDer::from(bytes.to_vec())]
        } else {
            CertificateRevocationListDer::pem_slice_iter(bytes)
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::invalid(&subject, format!("malformed PEM: {e}")))?
        };
        if ders.is_empty() {
            return Err(TlsError::invalid(
                &subject,
                "contains no `-----BEGIN X509 CRL-----` PEM block (was it completely written?)",
            ));
        }
        let mut parsed = Vec::with_capacity(ders.len());
        let mut revoked = 0;
        let mut next_update: Option<SystemTime> = None;
        for (i, der) in ders.iter().enumerate() {
            let crl = OwnedCertRevocationList::from_der(der).map_err(|e| {
                TlsError::invalid(
                    &subject,
                    format!("CRL #{} is not a usable CRL: {e:?}", i + 1),
                )
            })?;
            let (entries, next) = crl_summary(der);
            revoked += entries;
            if let Some(next) = next {
                next_update = Some(next_update.map_or(next, |n: SystemTime| n.min(next)));
            }
            parsed.push(CertRevocationList::from(crl));
        }
        Ok(Revocation {
            file: file.to_path_buf(),
            ders,
            parsed,
            only_leaf,
            fingerprint: Sha256::digest(bytes).into(),
            revoked,
            next_update,
        })
    }

    /// The file the CRLs came from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// SHA-256 of the file's contents: equal means unchanged.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Number of CRLs and of revoked serials in them.
    pub fn counts(&self) -> (usize, usize) {
        (self.ders.len(), self.revoked)
    }

    /// The earliest `nextUpdate` of the CRLs: past it, every check fails.
    pub fn next_update(&self) -> Option<SystemTime> {
        self.next_update
    }

    pub fn only_leaf(&self) -> bool {
        self.only_leaf
    }

    /// The CRLs in DER, for rustls' client-certificate verifier.
    pub(crate) fn ders(&self) -> &[CertificateRevocationListDer<'static>] {
        &self.ders
    }

    /// Checks the revocation status of a chain that has already been verified to `roots`
    /// (the outbound side; rustls' server-certificate path has no CRL hook without a DNS name
    /// check). `usage` is the peer's role.
    pub(crate) fn check_server(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        roots: &RootCertStore,
        now: UnixTime,
        algs: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm],
    ) -> Result<(), rustls::Error> {
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let refs: Vec<&CertRevocationList<'_>> = self.parsed.iter().collect();
        let options = RevocationOptionsBuilder::new(&refs)
            .map_err(|_| rustls::Error::General("no CRLs loaded".into()))?
            .with_depth(if self.only_leaf {
                RevocationCheckDepth::EndEntity
            } else {
                RevocationCheckDepth::Chain
            })
            .with_status_policy(UnknownStatusPolicy::Deny)
            .with_expiration_policy(ExpirationPolicy::Enforce)
            .build();
        ee.verify_for_usage(
            algs,
            &roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            Some(options),
            None,
        )
        .map(|_| ())
        .map_err(|e| self.error(end_entity, e))
    }

    /// A webpki revocation failure as the rustls error Envoy's would correspond to, logged
    /// with the serial and the file.
    fn error(&self, end_entity: &CertificateDer<'_>, e: webpki::Error) -> rustls::Error {
        let err: rustls::Error = match e {
            webpki::Error::CertRevoked => CertificateError::Revoked.into(),
            webpki::Error::UnknownRevocationStatus => {
                CertificateError::UnknownRevocationStatus.into()
            }
            webpki::Error::CrlExpired { time, next_update } => {
                CertificateError::ExpiredRevocationListContext { time, next_update }.into()
            }
            other => rustls::Error::General(format!("CRL check failed: {other:?}")),
        };
        self.log_refusal(end_entity, &err);
        err
    }

    /// Logs a revocation refusal with the certificate's serial and the CRL file (the TLS
    /// alert itself carries no reason).
    pub(crate) fn log_refusal(&self, end_entity: &CertificateDer<'_>, err: &rustls::Error) {
        let serial = x509_parser::parse_x509_certificate(end_entity)
            .map(|(_, c)| c.raw_serial_as_string())
            .unwrap_or_else(|_| "?".into());
        tracing::warn!(
            serial = %serial,
            crl = %self.file.display(),
            reason = %crate::describe_tls_error(err),
            "peer certificate refused by the certificate revocation list"
        );
    }
}

/// Number of revoked entries and `nextUpdate` of a DER CRL, for logs and `/config_dump`
/// (webpki, which decides, does not expose them).
fn crl_summary(der: &[u8]) -> (usize, Option<SystemTime>) {
    use x509_parser::prelude::FromDer;
    match x509_parser::revocation_list::CertificateRevocationList::from_der(der) {
        Ok((_, crl)) => {
            let next = crl
                .next_update()
                .and_then(|t| u64::try_from(t.timestamp()).ok())
                .map(|s| UNIX_EPOCH + Duration::from_secs(s));
            (crl.iter_revoked_certificates().count(), next)
        }
        Err(_) => (0, None),
    }
}

/// A revocation set shared by the configs built from one credential set.
pub type SharedRevocation = Option<Arc<Revocation>>;
