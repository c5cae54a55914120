//! `outrigger ca serve`: the Istio CA API in front of the built-in CA.
//!
//! It answers as istiod's `CreateCertificate` does (istio/istio
//! `security/pkg/server/ca/server.go`), with a lab-grade authenticator in place of Kubernetes'
//! TokenReview:
//!
//! * a caller that presents a certificate of this CA over mTLS is that identity, and gets a
//!   certificate for it and nothing else ("the SAN is the identity of the caller in
//!   authentication result"); asking to impersonate another identity is refused, as istiod
//!   refuses it without a node authorizer ("request impersonation authentication failure");
//! * a caller with the static token (`--token-file`), or any caller when the server runs with
//!   `--insecure-no-token`, may ask for any SPIFFE ID of the CA's trust domain: the
//!   `ImpersonatedIdentity` metadata when set (ztunnel asking for a workload), otherwise the
//!   CSR's one URI SAN. This is the lab/dev mode the docs describe; production meshes use
//!   istiod;
//! * anything else: `Unauthenticated`, "request authenticate failure".
//!
//! Lifetimes follow istiod's `IstioCA.Sign`: no or a non-positive `validity_duration` gets the
//! default (24h), more than the maximum (90 days) is refused with istiod's message. The answer
//! is the leaf, then the root ("the root cert is the last element"), each PEM ending in a
//! newline as istiod writes them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use outrigger_identity::Identity;
use outrigger_tls::ca::{BuiltinCa, IssueOptions, csr_uri_sans};
use outrigger_tls::control::{ServingCert, ca_server_config};
use outrigger_tls::peer_identity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::pb::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::pb::{IstioCertificateRequest, IstioCertificateResponse};
use crate::{DEFAULT_WORKLOAD_CERT_TTL, IMPERSONATED_IDENTITY, MAX_WORKLOAD_CERT_TTL};

/// How callers without a certificate are authenticated.
#[derive(Clone)]
pub enum TokenCheck {
    /// `authorization: Bearer <token>` must carry this token.
    Static(String),
    /// Lab mode: no token needed (`--insecure-no-token`).
    None,
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenCheck::Static(_) => f.write_str("Static(<redacted>)"),
            TokenCheck::None => f.write_str("None"),
        }
    }
}

/// What `serve` needs.
pub struct ServeOptions {
    pub tokens: TokenCheck,
    /// Lifetime for requests without one (istiod: `DEFAULT_WORKLOAD_CERT_TTL`).
    pub default_ttl: Duration,
    /// Longest lifetime granted (istiod: `MAX_WORKLOAD_CERT_TTL`).
    pub max_ttl: Duration,
    /// DNS names of the serving certificate (istiod: `istiod.istio-system.svc`).
    pub server_names: Vec<String>,
    /// Bound on a client's TLS handshake.
    pub handshake_timeout: Duration,
}

impl ServeOptions {
    pub fn new(tokens: TokenCheck, server_names: Vec<String>) -> Self {
        ServeOptions {
            tokens,
            default_ttl: DEFAULT_WORKLOAD_CERT_TTL,
            max_ttl: MAX_WORKLOAD_CERT_TTL,
            server_names,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The connection's verified client identity, if it presented a certificate.
#[derive(Clone, Debug)]
struct Peer {
    identity: Option<Identity>,
    addr: SocketAddr,
}

/// A TLS connection handed to tonic with what the handshake established.
struct TlsIo {
    inner: TlsStream<TcpStream>,
    peer: Peer,
}

impl Connected for TlsIo {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The service: signs with `ca`.
struct CaService {
    ca: Arc<BuiltinCa>,
    tokens: TokenCheck,
    default_ttl: Duration,
    max_ttl: Duration,
}

/// Who the caller is, after authentication.
enum Caller {
    /// Presented a certificate of this CA.
    Workload(Identity),
    /// Held the static token, or the server needs none.
    Trusted,
}

impl CaService {
    fn authenticate<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        if let Some(Peer {
            identity: Some(id), ..
        }) = req.extensions().get::<Peer>()
        {
            return Ok(Caller::Workload(id.clone()));
        }
        let bearer = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match (&self.tokens, bearer) {
            (TokenCheck::None, _) => Ok(Caller::Trusted),
            (TokenCheck::Static(want), Some(got)) if constant_time_eq(want, got) => {
                Ok(Caller::Trusted)
            }
            _ => Err(Status::unauthenticated("request authenticate failure")),
        }
    }

    fn sign(&self, req: Request<IstioCertificateRequest>) -> Result<Vec<String>, Status> {
        let caller = self.authenticate(&req)?;
        let addr = req.extensions().get::<Peer>().map(|p| p.addr);
        let body = req.into_inner();
        let impersonated = body
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                _ => None,
            });
        let identity = match (caller, impersonated) {
            (Caller::Workload(_), Some(_)) => {
                return Err(Status::unauthenticated(
                    "request impersonation authentication failure",
                ));
            }
            (Caller::Workload(id), None) => id,
            (Caller::Trusted, Some(id)) => self.parse_identity(&id)?,
            (Caller::Trusted, None) => {
                let sans = csr_uri_sans(&body.csr)
                    .map_err(|e| Status::invalid_argument(format!("CSR signing error ({e})")))?;
                match sans.as_slice() {
                    [one] => self.parse_identity(one)?,
                    _ => {
                        return Err(Status::invalid_argument(format!(
                            "CSR signing error (the request must name exactly one SPIFFE ID \
                             as a URI SAN; it names {})",
                            sans.len()
                        )));
                    }
                }
            }
        };
        let requested = body.validity_duration;
        let ttl = if requested <= 0 {
            self.default_ttl
        } else {
            Duration::from_secs(requested.unsigned_abs())
        };
        if requested > 0 && ttl > self.max_ttl {
            return Err(Status::invalid_argument(format!(
                "CSR signing error (requested TTL {}s is greater than the max allowed TTL {}s)",
                ttl.as_secs(),
                self.max_ttl.as_secs()
            )));
        }
        let leaf = self
            .ca
            .sign_csr(&body.csr, &IssueOptions::workload(&identity, ttl))
            .map_err(|e| Status::invalid_argument(format!("CSR signing error ({e})")))?;
        tracing::info!(
            identity = %identity,
            ttl_seconds = ttl.as_secs(),
            client = ?addr,
            "issued a workload certificate"
        );
        Ok(vec![
            format!("{}\n", leaf.trim_end()),
            format!("{}\n", self.ca.root_pem().trim_end()),
        ])
    }

    /// A SPIFFE ID the caller may be given: well-formed and of this CA's trust domain.
    fn parse_identity(&self, s: &str) -> Result<Identity, Status> {
        let id: Identity = s.parse().map_err(|e| {
            Status::invalid_argument(format!("CSR signing error (`{s}` is not a SPIFFE ID: {e})"))
        })?;
        if id.trust_domain() != self.ca.trust_domain() {
            return Err(Status::invalid_argument(format!(
                "CSR signing error ({id} is not in this CA's trust domain `{}`)",
                self.ca.trust_domain()
            )));
        }
        Ok(id)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        match self.sign(req) {
            Ok(cert_chain) => Ok(Response::new(IstioCertificateResponse { cert_chain })),
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "certificate request refused");
                Err(status)
            }
        }
    }
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the CA API on `listener` until `shutdown` completes. The serving certificate is
/// issued by `ca` itself for `opts.server_names` (valid one year; it is re-issued at each
/// start). Handshakes run concurrently, each bounded by `opts.handshake_timeout`.
pub async fn serve(
    listener: TcpListener,
    ca: BuiltinCa,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let now = std::time::SystemTime::now();
    let serving = ca.issue_with(&IssueOptions {
        uri_sans: Vec::new(),
        dns_sans: opts.server_names.clone(),
        not_before: now - outrigger_tls::ca::CLOCK_SKEW_GRACE,
        not_after: now + Duration::from_secs(365 * 24 * 3600),
    })?;
    let acceptor = TlsAcceptor::from(ca_server_config(&ServingCert::from_issued(&serving)?)?);
    let service = CaService {
        ca: Arc::new(ca),
        tokens: opts.tokens,
        default_ttl: opts.default_ttl,
        max_ttl: opts.max_ttl,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<TlsIo, io::Error>>(64);
    let handshake_timeout = opts.handshake_timeout;
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "CA listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let identity = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| peer_identity(chain).ok());
                        let peer = Peer { identity, addr };
                        let _ = tx.send(Ok(TlsIo { inner: tls, peer })).await;
                    }
                    Ok(Err(e)) => tracing::info!(
                        client = %addr,
                        error = %outrigger_tls::describe_handshake_error(&e),
                        "CA listener: TLS handshake failed"
                    ),
                    Err(_) => {
                        tracing::info!(client = %addr, "CA listener: TLS handshake timed out")
                    }
                }
            });
        }
    });
    let result = tonic::transport::Server::builder()
        .add_service(IstioCertificateServiceServer::new(service))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), shutdown)
        .await;
    accept.abort();
    result.map_err(|e| ServeError::Serve(e.to_string()))
}

/// Why `serve` stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Tls(#[from] outrigger_tls::TlsError),
    #[error("the CA server failed: {0}")]
    Serve(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_needs_equal_length_and_bytes() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
        assert!(!constant_time_eq("", "a"));
    }
}
