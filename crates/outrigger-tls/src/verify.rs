//! SPIFFE peer verification on top of webpki, and the rustls configs that use it.
//!
//! Istio authenticates peers in two steps, and so do we:
//!
//! 1. **Chain**: the peer's chain must verify (signatures, validity window, basic constraints,
//!    key usage / EKU) up to a root of the mesh trust bundle. This is webpki's job: the client
//!    side uses rustls' `WebPkiClientVerifier`, the server side
//!    `verify_server_cert_signed_by_trust_anchor` (without the DNS-name check, below).
//! 2. **Identity**: "An X.509 SVID MUST contain exactly one URI SAN" (SPIFFE X.509-SVID §2), a
//!    `spiffe://<trust-domain>/<path>` ID, and its trust domain must be ours or one of
//!    `meshConfig.trustDomainAliases`.
//!
//! Server names are **not** verified: Istio workload certificates carry no DNS SAN and the SNI
//! an Istio client sends (`outbound_.<port>_._.<fqdn>`) is a routing key, not an identity.
//! Instead, like Envoy's `match_subject_alt_names` that Istio generates for upstream clusters,
//! the client pins the server's SPIFFE ID.
//!
//! Every rejection carries a reason that names what was wrong: webpki's errors (unknown issuer,
//! expired, not yet valid, wrong EKU) pass through unchanged so the TLS alert sent to the peer
//! stays accurate, and SPIFFE failures are [`PeerVerifyError`]s inside
//! [`CertificateError::Other`]. [`describe_tls_error`] turns any of them into one readable line.

use std::fmt;
use std::sync::Arc;

use outrigger_identity::{Identity, IdentityError, TrustDomains, identity_from_der};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::certs::fmt_time;
use crate::crl::SharedRevocation;
use crate::{PROTOCOL_VERSIONS, TlsError, WorkloadCerts, crypto_provider};

/// Why a peer whose chain verified was still refused.
///
/// Carried to rustls as `Error::InvalidCertificate(CertificateError::Other(..))`, so the peer
/// receives a `certificate_unknown` alert; the local side can log the reason with
/// [`describe_tls_error`] or downcast to this type.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerVerifyError {
    /// No, several or a malformed SPIFFE URI SAN, or a trust domain we do not trust.
    #[error("peer certificate rejected: {0}")]
    Identity(#[from] IdentityError),
    /// The server is a valid mesh workload, but not the one we meant to reach.
    #[error(
        "server identity `{presented}` is not the expected {}",
        fmt_expected(expected)
    )]
    UnexpectedIdentity {
        presented: Identity,
        expected: Vec<Identity>,
    },
}

fn fmt_expected(expected: &[Identity]) -> String {
    let names: Vec<String> = expected.iter().map(|i| format!("`{i}`")).collect();
    match names.len() {
        1 => names[0].clone(),
        _ => format!("one of {}", names.join(", ")),
    }
}

/// Debug prints the message: rustls formats `CertificateError::Other` with `{:?}`, and this
/// keeps the text in its `Display` readable.
impl fmt::Debug for PeerVerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<PeerVerifyError> for rustls::Error {
    fn from(e: PeerVerifyError) -> Self {
        CertificateError::Other(OtherError(Arc::new(e))).into()
    }
}

/// One readable line for a rustls error, for logs and for operators: names the certificate
/// problem (untrusted CA, expired with dates, no SPIFFE SAN, foreign trust domain, identity
/// mismatch, no client certificate) instead of rustls' enum names.
pub fn describe_tls_error(err: &rustls::Error) -> String {
    use rustls::Error as E;
    match err {
        E::InvalidCertificate(ce) => describe_certificate_error(ce),
        E::NoCertificatesPresented => {
            "the peer presented no certificate (mutual TLS requires a client certificate)".into()
        }
        E::AlertReceived(alert) => format!(
            "the peer aborted the handshake with TLS alert `{alert:?}` (its logs have the reason)"
        ),
        E::InvalidCertRevocationList(e) => format!(
            "a CRL of certificates.crl cannot be used for this certificate ({e:?}): a CRL whose \
             issuer name matches the certificate's issuer must be signed by that issuer's key"
        ),
        E::NoApplicationProtocol => {
            "no common ALPN protocol between the client's offer and the server's list".into()
        }
        other => other.to_string(),
    }
}

fn describe_certificate_error(ce: &CertificateError) -> String {
    use CertificateError as C;
    let secs = |t: &UnixTime| {
        fmt_time(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs()))
    };
    match ce {
        C::UnknownIssuer => {
            "certificate is not signed by a trusted CA (unknown issuer: its chain does not lead \
             to any root of the trust bundle)"
                .into()
        }
        C::ExpiredContext { time, not_after } => format!(
            "certificate expired at {} (verification time {})",
            secs(not_after),
            secs(time)
        ),
        C::Expired => "certificate has expired".into(),
        C::NotValidYetContext { time, not_before } => format!(
            "certificate is not valid before {} (verification time {}; check clocks)",
            secs(not_before),
            secs(time)
        ),
        C::NotValidYet => "certificate is not valid yet (check clocks)".into(),
        C::BadSignature => "certificate signature does not verify: it was issued by a CA whose \
             name matches a trusted root but whose key differs (another mesh's CA with the same \
             trust domain, or a replaced root?), or it was altered"
            .into(),
        C::Revoked => "certificate is revoked (listed in a CRL of certificates.crl)".into(),
        C::UnknownRevocationStatus => "no CRL from the certificate's issuer in certificates.crl: \
             with a CRL configured every CA of the chain needs one (Envoy's `crl` rule; \
             `onlyVerifyLeafCertCrl: true` checks the leaf only)"
            .into(),
        C::ExpiredRevocationListContext { time, next_update } => format!(
            "the CRL of certificates.crl expired at {} (its nextUpdate; verification time {}): \
             publish a new CRL",
            secs(next_update),
            secs(time)
        ),
        C::ExpiredRevocationList => {
            "the CRL of certificates.crl has expired (nextUpdate passed)".into()
        }
        C::BadEncoding => "certificate is not valid DER/X.509".into(),
        C::Other(OtherError(inner)) => inner.to_string(),
        other => format!("invalid certificate: {other}"),
    }
}

/// One readable line for a failed TLS handshake as tokio-rustls reports it (an `io::Error`
/// wrapping a `rustls::Error`).
pub fn describe_handshake_error(err: &std::io::Error) -> String {
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => describe_tls_error(tls),
        None => err.to_string(),
    }
}

/// Whether a failed client handshake (as tokio-rustls reports it) failed only because the
/// server is a valid mesh workload with another identity than the pinned one(s).
pub fn is_unexpected_identity(err: &std::io::Error) -> bool {
    use rustls::{CertificateError, Error};
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
        .is_some_and(|re| match re {
            Error::InvalidCertificate(CertificateError::Other(o)) => matches!(
                o.0.downcast_ref::<PeerVerifyError>(),
                Some(PeerVerifyError::UnexpectedIdentity { .. })
            ),
            _ => false,
        })
}

/// The metric reason of a refused handshake (tokio-rustls' `io::Error`): `tls_revoked` when
/// `certificates.crl` decided (revoked, no CRL for an issuer, expired CRL), else
/// `tls_handshake`.
pub fn handshake_refusal_reason(err: &std::io::Error) -> &'static str {
    let revoked = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(is_revocation_error);
    if revoked {
        "tls_revoked"
    } else {
        "tls_handshake"
    }
}

/// The SPIFFE identity of a verified leaf, with its trust domain checked.
fn spiffe_identity(
    end_entity: &CertificateDer<'_>,
    trust: &TrustDomains,
) -> Result<Identity, PeerVerifyError> {
    let id = identity_from_der(end_entity)?;
    trust.check(&id)?;
    Ok(id)
}

/// Whether `presented` satisfies `expected`, honouring trust-domain aliases the way Istio's
/// `spiffe.ExpandWithTrustDomains` does for the SANs it pins: "ExpandWithTrustDomains
/// ({"spiffe://td1/ns/def/sa/def"}, {"td1", "td2"}) returns {"spiffe://td1/ns/def/sa/def",
/// "spiffe://td2/ns/def/sa/def"}" — the same path under any trusted domain is the same workload.
fn identity_matches(expected: &Identity, presented: &Identity, trust: &TrustDomains) -> bool {
    expected == presented
        || (expected.path() == presented.path()
            && trust.contains(expected.trust_domain())
            && trust.contains(presented.trust_domain()))
}

/// Inbound: webpki client-certificate verification (chain to the roots, `clientAuth` EKU),
/// then the SPIFFE identity rules. Client authentication is mandatory.
#[derive(Debug)]
struct SpiffeClientCertVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    trust: TrustDomains,
    revocation: SharedRevocation,
}

impl ClientCertVerifier for SpiffeClientCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)
        {
            if let (Some(r), true) = (&self.revocation, is_revocation_error(&e)) {
                r.log_refusal(end_entity, &e);
            }
            return Err(e);
        }
        spiffe_identity(end_entity, &self.trust)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Outbound: chain to the roots with the `serverAuth` EKU (webpki), SPIFFE identity rules, then
/// the pin. The DNS name is ignored (see the module docs).
#[derive(Debug)]
struct SpiffeServerCertVerifier {
    roots: Arc<RootCertStore>,
    trust: TrustDomains,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
    revocation: SharedRevocation,
}

impl ServerCertVerifier for SpiffeServerCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if let Some(r) = &self.revocation {
            r.check_server(
                end_entity,
                intermediates,
                &self.roots,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        let presented = spiffe_identity(end_entity, &self.trust)?;
        if !self.expected.is_empty()
            && !self
                .expected
                .iter()
                .any(|e| identity_matches(e, &presented, &self.trust))
        {
            return Err(PeerVerifyError::UnexpectedIdentity {
                presented,
                expected: self.expected.clone(),
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A failure that a CRL decided (revoked, no CRL for an issuer, expired CRL).
fn is_revocation_error(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::Revoked
                | CertificateError::UnknownRevocationStatus
                | CertificateError::ExpiredRevocationList
                | CertificateError::ExpiredRevocationListContext { .. }
        ) | rustls::Error::InvalidCertRevocationList(_)
    )
}

pub(crate) fn config_err(e: impl fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// Server side of inbound mTLS: TLS 1.2 and 1.3, client certificate **required**, chain
/// verified against `certs.roots`, then exactly one SPIFFE URI SAN whose trust domain is in
/// `trust`. `alpn` is the server's preference order (see [`crate::ISTIO_ALPNS`]).
///
/// The verified peer's identity is then read with [`crate::peer_identity`] from
/// `ServerConnection::peer_certificates()`.
pub fn server_config(
    certs: &WorkloadCerts,
    trust: &TrustDomains,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let roots = Arc::new(certs.root_store()?);
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    if let Some(r) = certs.revocation() {
        // Envoy's `crl`: every CA of the chain needs a CRL (unknown status fails), an expired
        // CRL fails; `only_verify_leaf_cert_crl` checks the leaf only (see crate::crl).
        builder = builder
            .with_crls(r.ders().iter().cloned())
            .enforce_revocation_expiration();
        if r.only_leaf() {
            builder = builder.only_check_end_entity_revocation();
        }
    }
    let webpki = builder.build().map_err(config_err)?;
    let verifier = Arc::new(SpiffeClientCertVerifier {
        webpki,
        trust: trust.clone(),
        revocation: certs.revocation().cloned(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.chain.clone(), certs.key.clone_key())
        .map_err(config_err)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // One TLS 1.3 session ticket per handshake instead of rustls' default two: mesh peers keep
    // pooled connections and resume at most once per reconnect, and each ticket costs an
    // encryption and a cache entry on every full handshake.
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}

/// Client side (outbound origination): presents `certs` as the client certificate, verifies the
/// server chain against `certs.roots` and pins the server's SPIFFE ID. `expected` empty = any
/// identity of a trusted trust domain; otherwise the server must be one of `expected` (an
/// identity under a trust-domain alias counts as the same one). The DNS name / SNI passed to
/// `connect` is sent but not verified. A mismatch fails the handshake with a
/// [`PeerVerifyError::UnexpectedIdentity`] naming both identities.
pub fn client_config(
    certs: &WorkloadCerts,
    trust: &TrustDomains,
    expected: &[Identity],
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(SpiffeServerCertVerifier {
        roots: Arc::new(certs.root_store()?),
        trust: trust.clone(),
        expected: expected.to_vec(),
        provider: provider.clone(),
        revocation: certs.revocation().cloned(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(config_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs.chain.clone(), certs.key.clone_key())
        .map_err(config_err)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    #[test]
    fn alias_identities_match_but_paths_must_be_equal() {
        let trust = TrustDomains::new("cluster.local", &["old.local".into()]).unwrap();
        let want = id("spiffe://cluster.local/ns/a/sa/b");
        assert!(identity_matches(&want, &want, &trust));
        assert!(identity_matches(
            &want,
            &id("spiffe://old.local/ns/a/sa/b"),
            &trust
        ));
        assert!(!identity_matches(
            &want,
            &id("spiffe://old.local/ns/a/sa/c"),
            &trust
        ));
        assert!(!identity_matches(
            &want,
            &id("spiffe://evil.local/ns/a/sa/b"),
            &trust
        ));
    }

    #[test]
    fn mismatch_message_names_both_identities() {
        let e = PeerVerifyError::UnexpectedIdentity {
            presented: id("spiffe://cluster.local/ns/a/sa/x"),
            expected: vec![id("spiffe://cluster.local/ns/a/sa/y")],
        };
        let rustls_err: rustls::Error = e.into();
        let msg = describe_tls_error(&rustls_err);
        assert!(msg.contains("spiffe://cluster.local/ns/a/sa/x"), "{msg}");
        assert!(msg.contains("spiffe://cluster.local/ns/a/sa/y"), "{msg}");
        // rustls' own Display goes through Debug of the inner error; it must stay readable too.
        let raw = rustls_err.to_string();
        assert!(raw.contains("spiffe://cluster.local/ns/a/sa/y"), "{raw}");
    }

    #[test]
    fn describes_webpki_errors_in_words() {
        let msg = describe_tls_error(&CertificateError::UnknownIssuer.into());
        assert!(msg.contains("not signed by a trusted CA"), "{msg}");
        let msg = describe_tls_error(
            &CertificateError::ExpiredContext {
                time: UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_000_000)),
                not_after: UnixTime::since_unix_epoch(std::time::Duration::from_secs(999_000)),
            }
            .into(),
        );
        assert!(msg.contains("expired at 1970-01-12T13:30:00Z"), "{msg}");
        let msg = describe_tls_error(&rustls::Error::NoCertificatesPresented);
        assert!(msg.contains("no certificate"), "{msg}");
    }
}
