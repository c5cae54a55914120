//! Outrigger's TLS: the only crate that touches rustls.
//!
//! * [`server_config`] terminates Istio mTLS: client certificate required, chain verified with
//!   webpki against the mesh trust bundle, then the SPIFFE identity checked against the trusted
//!   trust domains (see [`verify`] for the rules and where they come from).
//! * [`client_config`] originates mTLS and pins the server's SPIFFE identity.
//! * [`WorkloadCerts`] is a validated workload credential set (Istio's `cert-chain.pem`,
//!   `key.pem`, `root-cert.pem`).
//! * [`CertStore`] holds the live credentials and swaps them atomically on rotation.
//! * [`ca::BuiltinCa`] is a small self-signed CA shaped like Istio's, for `outrigger ca init`,
//!   demos and tests.
//!
//! Every config is built with an explicit aws-lc-rs [`rustls::crypto::CryptoProvider`]
//! (`builder_with_provider`), so nothing depends on rustls' process-wide default provider.
#![forbid(unsafe_code)]

pub mod ca;
mod certs;
pub mod control;
pub mod crl;
mod error;
mod fsutil;
pub mod settle;
mod store;
pub mod verify;

use std::sync::{Arc, OnceLock};

use outrigger_identity::{Identity, identity_from_der};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

pub use certs::{NOT_YET_VALID_TOLERANCE, WorkloadCerts};
pub use error::{InvalidKind, TlsError};
pub use store::{CertSource, CertStatus, CertStore, RotationEvent};
pub use verify::{
    PeerVerifyError, client_config, describe_handshake_error, describe_tls_error,
    is_unexpected_identity, server_config,
};

/// Re-exported so users of this crate name the same types without depending on rustls directly.
pub use rustls;
pub use rustls_pki_types;

/// ALPN protocols accepted by the inbound (server) side, in the server's order of preference
/// (rustls picks the first entry of this list that the client also offered).
///
/// Istio sidecars offer `istio-http/1.0`, `istio-http/1.1` or `istio-h2` for HTTP and
/// `istio-peer-exchange` plus `istio` for TCP; plain `h2`/`http/1.1` come from non-Istio
/// clients, ztunnel and waypoints. The protocol-specific values come first so that a client
/// offering several tells us the protocol it speaks.
///
/// `istio-peer-exchange` is not in this list: a listener that may carry TCP selects it with
/// [`CertStore::server_config_peer_exchange`] (the list with [`PEER_EXCHANGE_ALPN`] first), as
/// an Istio sidecar's TCP filter chain does (istio/istio `pilot/pkg/security/authn/utils/
/// utils.go`, `BuildInboundTLS`: `ALPNDownstreamWithMxc` for `ListenerProtocolTCP`), while its
/// HTTP chains offer only `h2`/`http/1.1` and never select it.
pub const ISTIO_ALPNS: &[&[u8]] = &[
    b"istio-h2",
    b"h2",
    b"istio-http/1.1",
    b"istio-http/1.0",
    b"http/1.1",
    b"istio",
];

/// The ALPN value of Istio's TCP metadata exchange (istio/istio `pilot/pkg/networking/util/
/// util.go`: `ALPNInMeshWithMxc = {"istio-peer-exchange", "istio"}` for a sidecar's TCP
/// clusters, `ALPNDownstreamWithMxc = {"istio-peer-exchange", "h2", "http/1.1"}` for its TCP
/// filter chains). Selecting it obliges both ends to exchange their workload metadata at the
/// start of the stream (outrigger-proxy's `tcp_mx`).
pub const PEER_EXCHANGE_ALPN: &[u8] = b"istio-peer-exchange";

/// `alpn` with [`PEER_EXCHANGE_ALPN`] first: a client that offers it (a sidecar's TCP
/// connection) gets it, as Istio's inbound filter chain match sends any connection offering
/// `istio-peer-exchange` to the TCP chain (`mtlsTCPWithMxcALPNs`, istio/istio
/// `pilot/pkg/networking/core/filterchain_options.go`), whose TLS context then selects it.
pub fn with_peer_exchange(alpn: &[Vec<u8>]) -> Vec<Vec<u8>> {
    std::iter::once(PEER_EXCHANGE_ALPN.to_vec())
        .chain(alpn.iter().filter(|p| *p != PEER_EXCHANGE_ALPN).cloned())
        .collect()
}

/// The crypto provider every config of this crate is built with: aws-lc-rs, created once and
/// shared. It is passed explicitly to each builder; rustls' process-global default is never
/// installed or consulted.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// The protocol versions Outrigger speaks: TLS 1.3 and TLS 1.2 (Istio's default minimum for
/// workloads is TLS 1.2; `meshConfig.meshMTLS.minProtocolVersion` can raise it to 1.3).
pub(crate) static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Identity of a verified peer from its presented chain (leaf first).
///
/// This only reads the identity; the verifiers installed by [`server_config`] and
/// [`client_config`] have already checked the chain and the trust domain during the handshake.
pub fn peer_identity(peer_chain: &[CertificateDer<'_>]) -> Result<Identity, TlsError> {
    let leaf = peer_chain.first().ok_or(TlsError::NoPeerCertificate)?;
    Ok(identity_from_der(leaf)?)
}

/// Lowercase hex SHA-256 of a DER certificate: the `Hash=` field of Envoy's
/// `x-forwarded-client-cert` ("The SHA 256 digest of the current client certificate").
pub fn cert_sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_is_lowercase_and_known() {
        // SHA-256 of the empty string.
        assert_eq!(
            cert_sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn peer_identity_needs_a_certificate() {
        let err = peer_identity(&[]).unwrap_err();
        assert!(matches!(err, TlsError::NoPeerCertificate), "{err}");
    }

    #[test]
    fn provider_is_aws_lc_and_shared() {
        let a = crypto_provider();
        let b = crypto_provider();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!a.cipher_suites.is_empty());
    }
}
