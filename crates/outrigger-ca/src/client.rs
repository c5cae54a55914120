//! A client of the Istio CA API, as istio-agent and ztunnel call it.
//!
//! The request: a PEM CSR for the workload's SPIFFE ID (ECDSA P-256, see
//! [`outrigger_tls::ca::workload_csr`]), the wanted lifetime in seconds, no metadata. The
//! headers: `authorization: Bearer <token>` when the bootstrap token authenticates the call,
//! and `clusterid: <cluster>` (ztunnel `src/identity/auth.rs`: `AUTHORIZATION`, `CLUSTER`).
//! The response: the chain, leaf first and root last (istiod `CreateCertificate`: "the root
//! cert is the last element"); every certificate but the last is kept as `cert-chain.pem`, and
//! the set must verify to the configured mesh root and carry the requested identity before it
//! is used.

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use outrigger_identity::Identity;
use outrigger_tls::ca::{IssuedCert, workload_csr};
use outrigger_tls::control::control_plane_client_config;
use outrigger_tls::rustls::ClientConfig;
use outrigger_tls::rustls_pki_types::ServerName;
use outrigger_tls::{TlsError, WorkloadCerts};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::metadata::MetadataValue;

use crate::pb::IstioCertificateRequest;
use crate::pb::istio_certificate_service_client::IstioCertificateServiceClient;

/// Where the CA is and how to talk to it.
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// `host:port` to connect to (istiod's `:15012`, or the east-west gateway in front of it).
    pub address: String,
    /// The DNS name the CA's certificate must carry (istiod: `istiod.istio-system.svc`); also
    /// sent as SNI. ztunnel's `ALT_CA_HOSTNAME`.
    pub server_name: String,
    /// The mesh root (PEM): verifies the CA's certificate and the issued chain.
    pub root_cert_pem: Vec<u8>,
    /// Where the root came from, for messages.
    pub root_cert_file: PathBuf,
    /// The bootstrap token (istioctl's `istio-token`), read at each token-authenticated call.
    pub token_file: Option<PathBuf>,
    /// Sent as the `clusterid` header (istio-agent's `ISTIO_META_CLUSTER_ID`).
    pub cluster_id: String,
    /// Requested lifetime (`validity_duration`).
    pub ttl: Duration,
    /// Bound on one call: connect, TLS and the response.
    pub timeout: Duration,
}

/// How a call authenticates.
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    /// The bootstrap token (first request, or the certificate has expired).
    Token,
    /// The current workload certificate, over mTLS (renewals).
    Certificate(&'a WorkloadCerts),
}

impl Auth<'_> {
    fn describe(&self) -> &'static str {
        match self {
            Auth::Token => "the bootstrap token",
            Auth::Certificate(_) => "the current certificate (mTLS)",
        }
    }
}

/// Why a call failed. Every message names the CA's address and what to check.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read the bootstrap token `{}`: {reason}", path.display())]
    Token { path: PathBuf, reason: String },
    #[error(
        "no bootstrap token configured (certificates.istioCa.tokenFile) and no valid \
         certificate to renew with"
    )]
    NoToken,
    #[error("cannot reach the CA at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("the CA at {address} refused the request ({auth}): {code:?}: {message}{hint}")]
    Refused {
        address: String,
        auth: &'static str,
        code: tonic::Code,
        message: String,
        hint: &'static str,
    },
    #[error("the CA at {address} answered with an unusable certificate: {reason}")]
    BadResponse { address: String, reason: String },
    #[error("{0}")]
    Tls(#[from] TlsError),
}

impl CaError {
    /// A short stable word for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CaError::Token { .. } | CaError::NoToken => "token",
            CaError::Unreachable { .. } => "unreachable",
            CaError::Refused { .. } => "refused",
            CaError::BadResponse { .. } => "bad_response",
            CaError::Tls(_) => "tls",
        }
    }
}

/// A client of one CA.
#[derive(Debug, Clone)]
pub struct CaClient {
    cfg: Arc<CaClientConfig>,
}

impl CaClient {
    pub fn new(cfg: CaClientConfig) -> Self {
        CaClient { cfg: Arc::new(cfg) }
    }

    pub fn config(&self) -> &CaClientConfig {
        &self.cfg
    }

    /// Asks the CA for a certificate for `identity`: makes a new key and CSR, calls
    /// `CreateCertificate` authenticated by `auth`, checks the answer (chain verifies to the
    /// mesh root, key matches, identity is `identity`) and returns the new set.
    pub async fn create_certificate(
        &self,
        identity: &Identity,
        auth: Auth<'_>,
    ) -> Result<IssuedCert, CaError> {
        let cfg = &self.cfg;
        let token = match auth {
            Auth::Token => Some(self.read_token()?),
            Auth::Certificate(_) => None,
        };
        let client_certs = match auth {
            Auth::Certificate(c) => Some(c),
            Auth::Token => None,
        };
        let tls = control_plane_client_config(&cfg.root_cert_pem, client_certs)?;
        let (csr, key_pem) = workload_csr(identity)?;
        let call = async {
            let channel = self.channel(tls).await?;
            let mut request = tonic::Request::new(IstioCertificateRequest {
                csr,
                validity_duration: i64::try_from(cfg.ttl.as_secs()).unwrap_or(i64::MAX),
                metadata: None,
            });
            if let Some(token) = &token {
                let value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    CaError::Token {
                        path: cfg.token_file.clone().unwrap_or_default(),
                        reason: "holds characters not allowed in an HTTP header".into(),
                    }
                })?;
                request.metadata_mut().insert("authorization", value);
            }
            if let Ok(v) = MetadataValue::try_from(cfg.cluster_id.as_str()) {
                request.metadata_mut().insert("clusterid", v);
            }
            IstioCertificateServiceClient::new(channel)
                .create_certificate(request)
                .await
                .map_err(|status| self.refused(auth, status))
        };
        let response = tokio::time::timeout(cfg.timeout, call)
            .await
            .map_err(|_| CaError::Unreachable {
                address: cfg.address.clone(),
                reason: format!("no answer within {:?}", cfg.timeout),
            })??
            .into_inner();
        self.check_response(identity, response.cert_chain, key_pem)
    }

    fn read_token(&self) -> Result<String, CaError> {
        let path = self.cfg.token_file.as_ref().ok_or(CaError::NoToken)?;
        let raw = std::fs::read_to_string(path).map_err(|e| CaError::Token {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let token = raw.trim();
        if token.is_empty() {
            return Err(CaError::Token {
                path: path.clone(),
                reason: "the file is empty".into(),
            });
        }
        Ok(token.to_string())
    }

    async fn channel(&self, tls: Arc<ClientConfig>) -> Result<tonic::transport::Channel, CaError> {
        let cfg = &self.cfg;
        let unreachable = |reason: String| CaError::Unreachable {
            address: cfg.address.clone(),
            reason,
        };
        let server_name = ServerName::try_from(cfg.server_name.clone())
            .map_err(|e| unreachable(format!("server name `{}`: {e}", cfg.server_name)))?;
        // The URI only names the :authority; the connector below dials `address` itself.
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{}", cfg.server_name))
                .map_err(|e| unreachable(format!("server name `{}`: {e}", cfg.server_name)))?
                .connect_timeout(cfg.timeout)
                .timeout(cfg.timeout);
        endpoint
            .connect_with_connector(Connector {
                address: cfg.address.clone(),
                server_name,
                tls: TlsConnector::from(tls),
            })
            .await
            .map_err(|e| unreachable(error_chain(&e)))
    }

    fn refused(&self, auth: Auth<'_>, status: tonic::Status) -> CaError {
        let code = status.code();
        // A transport failure surfaces as a status too: name it as unreachable.
        let transport = code == tonic::Code::Unavailable
            || (code == tonic::Code::Unknown && status.message().contains("transport"));
        if transport {
            return CaError::Unreachable {
                address: self.cfg.address.clone(),
                reason: format!("{}: {}", status.message(), error_chain(&status)),
            };
        }
        let hint = match (code, auth) {
            (tonic::Code::Unauthenticated, Auth::Token) => {
                " — the bootstrap token was not accepted (expired? istioctl's token lasts one \
                 hour by default: create a new one with `istioctl x workload entry configure`)"
            }
            (tonic::Code::Unauthenticated, Auth::Certificate(_)) => {
                " — the current certificate was not accepted; a new bootstrap token is needed"
            }
            _ => "",
        };
        CaError::Refused {
            address: self.cfg.address.clone(),
            auth: auth.describe(),
            code,
            message: status.message().to_string(),
            hint,
        }
    }

    /// Turns the response chain into the three Istio files and checks them as the agent will.
    fn check_response(
        &self,
        identity: &Identity,
        mut chain: Vec<String>,
        key_pem: String,
    ) -> Result<IssuedCert, CaError> {
        let bad = |reason: String| CaError::BadResponse {
            address: self.cfg.address.clone(),
            reason,
        };
        if chain.is_empty() {
            return Err(bad("the certificate chain is empty".into()));
        }
        // "The leaf cert is the first element, and the root cert is the last element": keep the
        // leaf and any intermediates. A one-element answer is the leaf alone.
        if chain.len() > 1 {
            chain.pop();
        }
        let mut cert_chain_pem = String::new();
        for pem in &chain {
            cert_chain_pem.push_str(pem.trim_end());
            cert_chain_pem.push('\n');
        }
        let root_cert_pem = String::from_utf8_lossy(&self.cfg.root_cert_pem).into_owned();
        let certs = WorkloadCerts::from_pem_checked(&cert_chain_pem, &key_pem, &root_cert_pem)
            .map_err(|e| {
                bad(format!(
                    "{e} (checked against the mesh root in {})",
                    self.cfg.root_cert_file.display()
                ))
            })?;
        if certs.identity() != identity {
            return Err(bad(format!(
                "the certificate is for {}, not {identity}",
                certs.identity()
            )));
        }
        Ok(IssuedCert {
            cert_chain_pem,
            key_pem,
            root_cert_pem,
        })
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Dials the CA's address (not the URI's host: `serverName` may not resolve, as with a VM that
/// reaches istiod through the east-west gateway's IP) and runs TLS with the control-plane
/// config.
#[derive(Clone)]
struct Connector {
    address: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&this.address).await?;
            let _ = tcp.set_nodelay(true);
            let tls = this.tls.connect(this.server_name, tcp).await.map_err(|e| {
                std::io::Error::other(format!(
                    "TLS: {}",
                    outrigger_tls::describe_handshake_error(&e)
                ))
            })?;
            Ok(TokioIo::new(tls))
        })
    }
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}
