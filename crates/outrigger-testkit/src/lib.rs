//! Test support for Outrigger: a test PKI, echo backends (HTTP/1.1, h2c, TCP) and real mTLS
//! clients. Everything is real: certificates from the built-in CA, sockets on 127.0.0.1 with
//! ephemeral ports, hyper and rustls on the wire.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use outrigger_identity::{Identity, TrustDomains};
use outrigger_tls::WorkloadCerts;
use outrigger_tls::ca::{BuiltinCa, IssueOptions, IssuedCert};

pub mod kube_api;

pub const TRUST_DOMAIN: &str = "cluster.local";

/// A CA in a temporary directory, and helpers to issue good and bad certificates.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca: BuiltinCa,
}

/// Certificates written to disk (Istio's file names) and loaded.
pub struct Issued {
    pub dir: PathBuf,
    pub certs: WorkloadCerts,
    pub pem: IssuedCert,
}

impl TestPki {
    pub fn new() -> Self {
        Self::with_trust_domain(TRUST_DOMAIN)
    }

    pub fn with_trust_domain(td: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = BuiltinCa::init(&dir.path().join("ca"), td).expect("ca init");
        TestPki { dir, ca }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn trust(&self) -> TrustDomains {
        TrustDomains::new(self.ca.trust_domain(), &[]).unwrap()
    }

    pub fn id(&self, ns: &str, sa: &str) -> Identity {
        Identity::istio(self.ca.trust_domain(), ns, sa).unwrap()
    }

    /// A normal workload certificate for `ns/sa`, valid for a day.
    pub fn issue(&self, ns: &str, sa: &str) -> Issued {
        let id = self.id(ns, sa);
        self.issue_opts(
            &format!("{ns}-{sa}"),
            &IssueOptions::workload(&id, Duration::from_secs(86400)),
        )
    }

    /// A valid workload certificate with full control over its SANs, written under `name`.
    pub fn issue_opts(&self, name: &str, opts: &IssueOptions) -> Issued {
        let pem = self.ca.issue_with(opts).expect("issue");
        let dir = self.dir.path().join(name);
        pem.write_to(&dir).expect("write certs");
        let certs = WorkloadCerts::from_pem(&pem.cert_chain_pem, &pem.key_pem, &pem.root_cert_pem)
            .expect("a loadable workload certificate");
        Issued { dir, certs, pem }
    }

    /// An expired certificate for `ns/sa`.
    pub fn expired(&self, ns: &str, sa: &str) -> IssuedCert {
        let id = self.id(ns, sa);
        let mut o = IssueOptions::workload(&id, Duration::from_secs(3600));
        o.not_before = SystemTime::now() - Duration::from_secs(7200);
        o.not_after = SystemTime::now() - Duration::from_secs(3600);
        self.ca.issue_with(&o).expect("issue expired")
    }

    /// A certificate with the given URI SANs (none, non-SPIFFE, foreign trust domain...).
    pub fn with_uris(&self, uris: &[&str]) -> IssuedCert {
        let id = self.id("default", "placeholder");
        let mut o = IssueOptions::workload(&id, Duration::from_secs(3600));
        o.uri_sans = uris.iter().map(|s| s.to_string()).collect();
        self.ca.issue_with(&o).expect("issue with uris")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// A rustls client config that presents an arbitrary certificate (expired, without a SPIFFE
/// SAN, from another CA...) and does not check the server: for tests of what the *server*
/// refuses. Never use outside tests.
pub fn raw_client_config(cert: &IssuedCert, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
        rustls_pki_types::CertificateDer::pem_slice_iter(cert.cert_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

/// A client config with no client certificate at all (the server must refuse it).
pub fn no_cert_client_config(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// Backends

/// What the echo backend saw, returned as JSON by its default route.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub version: String,
    pub headers: BTreeMap<String, Vec<String>>,
    /// The address the request's connection came from (the proxy's end of its backend
    /// connection), to tell which requests shared a connection.
    #[serde(default)]
    pub conn: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

/// A backend that speaks HTTP/1.1 and h2c (prior knowledge) on 127.0.0.1:
/// - `/echo`: streams the request body back; if the request carries `x-want-trailers`, ends
///   with trailers `grpc-status: 0` and `x-echo-bytes: <n>` (gRPC-style).
/// - `/sink`: reads the whole body and answers with its length.
/// - anything else: JSON [`Seen`].
pub async fn start_echo() -> SocketAddr {
    serve_echo(false).await
}

/// The same echo backend speaking HTTP/1.1 only, as IIS, Tomcat or a .NET Framework service
/// does: an HTTP/2 preface is a malformed HTTP/1.1 request to it.
pub async fn start_echo_http1_only() -> SocketAddr {
    serve_echo(true).await
}

async fn serve_echo(http1_only: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let conn = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            tokio::spawn(async move {
                let io = TokioIo::new(s);
                let svc = service_fn(move |req| echo(req, conn.clone()));
                let _ = if http1_only {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await
                        .map_err(|e| e.into())
                } else {
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await
                };
            });
        }
    });
    addr
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

async fn echo(req: Request<Incoming>, conn: String) -> Result<Response<EchoBody>, Infallible> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/echo" => {
            let want_trailers = req.headers().contains_key("x-want-trailers");
            let mut body = req.into_body();
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
            tokio::spawn(async move {
                let mut n = 0u64;
                while let Some(f) = body.frame().await {
                    match f {
                        Ok(f) => {
                            if let Ok(d) = f.into_data() {
                                n += d.len() as u64;
                                if tx.send(Ok(Frame::data(d))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
                if want_trailers {
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", "0".parse().unwrap());
                    t.insert("x-echo-bytes", n.to_string().parse().unwrap());
                    let _ = tx.send(Ok(Frame::trailers(t))).await;
                }
            });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|f| (f, rx))
            });
            let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            if want_trailers {
                resp.headers_mut()
                    .insert("content-type", "application/grpc".parse().unwrap());
            }
            Ok(resp)
        }
        "/sink" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(Ok(f)) = body.frame().await {
                if let Ok(d) = f.into_data() {
                    n += d.len() as u64;
                }
            }
            Ok(Response::new(full(n.to_string())))
        }
        _ => {
            let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (k, v) in req.headers() {
                headers
                    .entry(k.as_str().to_string())
                    .or_default()
                    .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
            }
            let seen = Seen {
                method: req.method().to_string(),
                path: req
                    .uri()
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                version: format!("{:?}", req.version()),
                headers,
                conn,
            };
            Ok(Response::new(full(serde_json::to_string(&seen).unwrap())))
        }
    }
}

fn full(s: String) -> EchoBody {
    BodyExt::boxed(Full::new(Bytes::from(s)).map_err(|e: Infallible| match e {}))
}

/// An HTTP/1.1 application on 127.0.0.1 that reads each request body and answers with its
/// length, and says (once) when the first body bytes have reached it — so a test can act while
/// a request is known to be in flight, instead of sleeping.
pub async fn start_signalling_sink() -> (SocketAddr, tokio::sync::oneshot::Receiver<()>) {
    let (arrived_tx, arrived) = tokio::sync::oneshot::channel::<()>();
    let arrived_tx = Arc::new(std::sync::Mutex::new(Some(arrived_tx)));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let arrived_tx = arrived_tx.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let arrived_tx = arrived_tx.clone();
                async move {
                    let mut body = req.into_body();
                    let mut n = 0usize;
                    while let Some(Ok(f)) = body.frame().await {
                        n += f.data_ref().map_or(0, |d| d.len());
                        if let Some(tx) = arrived_tx.lock().unwrap().take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok::<_, Infallible>(Response::new(full(n.to_string())))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    (addr, arrived)
}

/// A TCP echo server on 127.0.0.1.
pub async fn start_tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A loopback address with nothing listening (bound, then released).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Clients

/// A response, fully read.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn seen(&self) -> Seen {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("not echo JSON: {}", self.text()))
            .unwrap()
    }
}

/// Connects over mTLS with `cfg` (ALPN decides HTTP/1.1 vs h2 unless `h2` forces it).
pub async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("outrigger.test")?.to_owned();
    Ok(tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?)
}

/// An HTTP client over one connection (HTTP/1.1 or HTTP/2).
pub enum HttpConn {
    H1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2(hyper::client::conn::http2::SendRequest<TestBody>),
}

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub fn body(b: impl Into<Bytes>) -> TestBody {
    BodyExt::boxed(Full::new(b.into()).map_err(|e: Infallible| match e {}))
}

pub fn empty() -> TestBody {
    body(Bytes::new())
}

impl HttpConn {
    pub async fn new<T>(io: T, h2: bool) -> anyhow::Result<Self>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        if h2 {
            let (tx, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Ok(HttpConn::H2(tx))
        } else {
            let (tx, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Ok(HttpConn::H1(tx))
        }
    }

    /// Sends a request and returns the response head with its body still streaming.
    pub async fn send(&mut self, req: Request<TestBody>) -> anyhow::Result<Response<Incoming>> {
        Ok(match self {
            HttpConn::H1(tx) => {
                tx.ready().await?;
                tx.send_request(req).await?
            }
            HttpConn::H2(tx) => {
                tx.ready().await?;
                tx.send_request(req).await?
            }
        })
    }

    /// Sends a request and reads the whole response, trailers included.
    pub async fn fetch(&mut self, req: Request<TestBody>) -> anyhow::Result<Got> {
        let resp = self.send(req).await?;
        read_all(resp).await
    }

    pub fn is_h2(&self) -> bool {
        matches!(self, HttpConn::H2(_))
    }
}

pub async fn read_all(resp: Response<Incoming>) -> anyhow::Result<Got> {
    let (parts, mut b) = resp.into_parts();
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(f) = b.frame().await {
        let f = f?;
        match f.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    Ok(Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: Bytes::from(data),
        trailers,
    })
}

/// A request for `uri` (path, e.g. `/hello`) with the given host.
pub fn get(path: &str, h2: bool) -> Request<TestBody> {
    let mut b = Request::get(if h2 {
        format!("https://outrigger.test{path}")
    } else {
        path.to_string()
    });
    if !h2 {
        b = b.header("host", "outrigger.test");
    }
    b.body(empty()).unwrap()
}

/// Reads from a stream until EOF or an error; returns what was read and whether it ended
/// cleanly. Used to see that a server closed a connection without answering.
pub async fn read_until_close<T: AsyncRead + Unpin>(io: &mut T) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), io.read(&mut buf)).await {
            Ok(Ok(0)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => return (out, false),
            Err(_) => panic!("the server neither answered nor closed within 10s"),
        }
    }
}

/// Writes a plaintext HTTP/1.1 request and returns whatever came back before the close.
pub async fn plaintext_request(addr: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s
        .write_all(b"GET / HTTP/1.1\r\nhost: outrigger.test\r\n\r\n")
        .await;
    read_until_close(&mut s).await.0
}

/// Resident set size high-water mark of a process, in KiB (Linux `/proc/<pid>/status`).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A request body fed through a channel: send frames to stream them, drop the sender to end.
pub fn channel_body() -> (
    tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
    TestBody,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    (tx, BodyExt::boxed(StreamBody::new(stream)))
}
