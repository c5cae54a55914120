//! The Istio CA API, `istio.v1.auth.IstioCertificateService/CreateCertificate`, both sides.
//!
//! * [`client`]: obtains a workload certificate from istiod (or any server of this API) with a
//!   CSR made as Istio's agents make it, authenticated by the bootstrap token the first time
//!   and by the current certificate (mTLS) afterwards, as istio-agent and ztunnel do.
//! * [`source`]: the agent's `istioCa` certificate source: persisted credentials, start-up
//!   bootstrap, renewal at a fraction of the lifetime with jitter and backoff.
//! * [`server`]: `outrigger ca serve`, the same API in front of Outrigger's built-in CA (a lab
//!   and test CA that other mesh proxies, ztunnel included, can use).
//!
//! The messages come from `proto/ca.proto`, written from Istio's API reference and compiled by
//! protox in `build.rs`.

pub mod client;
pub mod server;
pub mod source;

/// The generated messages, client and server of `proto/ca.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("istio.v1.auth");
}

/// The gRPC path of the one method: what istiod serves and what the tests call.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// istiod's default workload certificate lifetime (`DEFAULT_WORKLOAD_CERT_TTL`, 24h): what a
/// request with no or a non-positive `validity_duration` gets.
pub const DEFAULT_WORKLOAD_CERT_TTL: std::time::Duration =
    std::time::Duration::from_secs(24 * 3600);

/// istiod's maximum workload certificate lifetime (`MAX_WORKLOAD_CERT_TTL`, 90 days): a longer
/// request is refused ("requested TTL … is greater than the max allowed TTL …").
pub const MAX_WORKLOAD_CERT_TTL: std::time::Duration =
    std::time::Duration::from_secs(90 * 24 * 3600);

/// The metadata key istiod reads for a node agent (ztunnel) asking on a workload's behalf
/// (`security.ImpersonatedIdentity`).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
