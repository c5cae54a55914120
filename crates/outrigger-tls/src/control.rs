//! TLS to and from the control plane: the Istio CA API (`istio.v1.auth.IstioCertificateService`
//! on istiod's port 15012, or `outrigger ca serve`).
//!
//! This is not mesh mTLS. istiod's serving certificate carries DNS names
//! (`istiod.istio-system.svc`), not a SPIFFE ID, so the client verifies the server the way
//! istio-agent and ztunnel do: webpki chain to the mesh root plus the server name
//! (`ALT_CA_HOSTNAME`, or the host of `CA_ADDRESS`; ztunnel `src/tls/control.rs`). The client
//! presents its workload certificate once it has one: istiod's `ClientCertAuthenticator`
//! authenticates renewals by it, so the bootstrap token is needed only for the first request.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ca::IssuedCert;
use crate::certs::{parse_certs, parse_key, root_store};
use crate::verify::config_err;
use crate::{PROTOCOL_VERSIONS, TlsError, WorkloadCerts, crypto_provider};

/// gRPC runs over HTTP/2 only.
const H2: &[u8] = b"h2";

/// Client side of the CA API: the server's chain must verify to `roots_pem` (the mesh root)
/// and name the server name the caller connects with; `client` (the current workload
/// credentials) is presented for mTLS when given.
pub fn control_plane_client_config(
    roots_pem: &[u8],
    client: Option<&WorkloadCerts>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = parse_certs(
        "CA root certificate (certificates.istioCa.rootCert)",
        roots_pem,
    )?;
    let store = root_store(&roots, "CA root certificate")?;
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(config_err)?
        .with_root_certificates(store);
    let mut config = match client {
        Some(certs) => builder
            .with_client_auth_cert(certs.chain.clone(), certs.key.clone_key())
            .map_err(config_err)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(Arc::new(config))
}

/// Client side of HTTPS to the web PKI: JWKS and OpenID discovery fetches from token issuers
/// (`RequestAuthentication` `jwksUri`, `issuer`). Issuers are verified the way Envoy's
/// `jwks_uri` cluster verifies them, by the system's trust store plus `extra_roots`
/// (`jwt.caBundle`) and the host name; no client certificate. Built once per agent: the roots
/// do not change while it runs.
pub fn web_client_config(extra_roots: &[CertificateDer<'static>]) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    // A certificate the system store holds but webpki cannot parse is skipped, as curl and
    // Envoy skip it: one bad entry must not leave the agent without roots.
    let _ = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let _ = roots.add_parsable_certificates(extra_roots.iter().cloned());
    let config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .expect("the provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// The CA API server's own credentials: a certificate for the DNS names clients connect to
/// (istiod's is for `istiod.istio-system.svc`), not a workload identity.
pub struct ServingCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
}

impl ServingCert {
    /// From an issued set (see [`crate::ca::BuiltinCa::issue_with`] with DNS SANs).
    pub fn from_issued(issued: &IssuedCert) -> Result<Self, TlsError> {
        Ok(ServingCert {
            chain: parse_certs("CA serving certificate", issued.cert_chain_pem.as_bytes())?,
            key: parse_key("CA serving key", issued.key_pem.as_bytes())?,
            roots: parse_certs("CA root certificate", issued.root_cert_pem.as_bytes())?,
        })
    }
}

/// Server side of the CA API (`outrigger ca serve`): presents `server`, asks for a client
/// certificate but does not require one (a first request authenticates with a token instead,
/// as istiod's does), and verifies a presented one to the CA's roots. The caller reads the
/// client's SPIFFE identity with [`crate::peer_identity`] and checks its trust domain.
pub fn ca_server_config(server: &ServingCert) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let store = Arc::new(root_store(&server.roots, "CA root certificate")?);
    let verifier = WebPkiClientVerifier::builder_with_provider(store, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(config_err)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(server.chain.clone(), server.key.clone_key())
        .map_err(config_err)?;
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(Arc::new(config))
}
