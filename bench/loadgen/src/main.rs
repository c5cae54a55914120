//! `loadgen`: Outrigger's benchmark load generator and plain HTTP backend.
//!
//! - `loadgen backend`: a loopback HTTP/1.1 + h2c server answering every request with a fixed
//!   13-byte body (`Hello, world!`), the same backend behind every proxy under test.
//! - `loadgen run`: one load scenario against a target (plaintext or mTLS), reporting
//!   requests/s, latency percentiles (HdrHistogram) and errors as one JSON object:
//!   - `keepalive`: N HTTP/1.1 keep-alive connections, one request in flight on each;
//!   - `newconn`: N concurrent workers, each doing TCP connect + full TLS handshake + one
//!     request (`Connection: close`) per iteration — handshakes/s;
//!   - `h2`: C HTTP/2 connections x S concurrent streams each;
//!   - `idleconns`: open N connections (at most `--open-concurrency` handshakes at a time), one
//!     HTTP/1.1 request on each, then hold them all open and idle until a line (or EOF) arrives
//!     on stdin or `--duration` has passed since the start, whichever is first. A first JSON
//!     line (`"event": "open"`) says when they are open, so the caller can measure the target
//!     meanwhile; the result line says how many were still open when the hold ended.
//!
//! When the backend runs with `--version-header`, `loadgen run` counts the HTTP version each
//! response says the request reached the backend with (`backend_versions` in the JSON), so a
//! benchmark can check which protocol a proxy really spoke upstream.
//!
//! Every loop is bounded by a deadline (`--duration`) and a total request budget (`--requests`);
//! every await on the network is bounded by `--timeout`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Outrigger benchmark load generator and backend"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a fixed body over HTTP/1.1 and h2c (prior knowledge) on loopback.
    Backend(BackendArgs),
    /// Run one load scenario and print the result as JSON.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct BackendArgs {
    /// Address to listen on (port 0: ephemeral).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write the bound address here (atomically) once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Response body.
    #[arg(long, default_value = "Hello, world!")]
    body: String,
    /// Runtime worker threads (1: current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Exit after this many seconds (a bound, so a forgotten backend does not live forever).
    #[arg(long, default_value_t = 3600)]
    max_lifetime_secs: u64,
    /// Add `x-backend-http-version: HTTP/1.1|HTTP/2` to every response: the HTTP version the
    /// request reached the backend with (the outbound benchmark uses it to tell which protocol
    /// an origin proxy spoke upstream, which the inbound agent reproduces towards the backend).
    #[arg(long)]
    version_header: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// HTTP/1.1 keep-alive, one request in flight per connection.
    Keepalive,
    /// A new TCP + TLS connection for every request.
    Newconn,
    /// HTTP/2: `--connections` connections x `--streams` concurrent streams.
    H2,
    /// `--connections` HTTP/1.1 connections, one request each, then held open and idle.
    Idleconns,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kx {
    /// X25519 only (what Envoy and most OpenSSL builds prefer).
    X25519,
    /// NIST P-256 only.
    P256,
    /// rustls' default list (X25519MLKEM768 hybrid first).
    Default,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Target address (loopback).
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Speak TLS to the target (otherwise plaintext HTTP).
    #[arg(long)]
    tls: bool,
    /// Connections (keepalive, h2, idleconns) or concurrent workers (newconn).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// idleconns: at most this many connections being opened (handshake + first request) at
    /// a time.
    #[arg(long, default_value_t = 50)]
    open_concurrency: usize,
    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, default_value_t = 10)]
    streams: usize,
    /// How long to run, seconds (idleconns: the longest the connections are held, counted
    /// from the start).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many requests in total (whichever comes first).
    #[arg(long, default_value_t = 50_000_000)]
    requests: u64,
    /// Timeout for one request (including connect and handshake for newconn), seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Client certificate chain (PEM).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Verify the server chain against this CA bundle (PEM); host names are not checked.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Accept any server certificate (handshake signatures are still checked).
    #[arg(long, conflicts_with = "ca")]
    insecure: bool,
    /// TLS SNI (server name) to send.
    #[arg(long, default_value = "localhost")]
    sni: String,
    /// ALPN protocols to offer (repeatable). Default: `http/1.1`, or `h2` for the h2 scenario.
    #[arg(long)]
    alpn: Vec<String>,
    /// Key-exchange groups the client offers.
    #[arg(long, value_enum, default_value = "x25519")]
    kx: Kx,
    /// Allow TLS session resumption (default: every handshake is a full one).
    #[arg(long)]
    resume: bool,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// Host / :authority.
    #[arg(long, default_value = "backend.bench")]
    host: String,
    /// Status that counts as success.
    #[arg(long, default_value_t = 200)]
    expect_status: u16,
    /// Load generator runtime threads (1: current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// A label copied into the JSON output.
    #[arg(long, default_value = "")]
    label: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Backend(a) => runtime(a.threads)?.block_on(backend(a)),
        Cmd::Run(a) => {
            let rt = runtime(a.threads)?;
            let out = rt.block_on(run(a))?;
            println!("{}", serde_json::to_string(&out)?);
            // Do not wait for stragglers (connections still closing) at shutdown.
            rt.shutdown_timeout(Duration::from_millis(200));
            Ok(())
        }
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    Ok(rt)
}

// ---------------------------------------------------------------------------------------------
// Backend

async fn backend(a: BackendArgs) -> Result<()> {
    let l = TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let addr = l.local_addr()?;
    if let Some(p) = &a.ready_file {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())?;
        std::fs::rename(&tmp, p)?;
    }
    println!("{addr}");
    let body = Bytes::from(a.body.into_bytes());
    let serve = async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = s.set_nodelay(true);
            let body = body.clone();
            let version_header = a.version_header;
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let body = body.clone();
                    async move {
                        let mut r = Response::new(Full::new(body));
                        r.headers_mut()
                            .insert("content-type", http::HeaderValue::from_static("text/plain"));
                        if version_header {
                            let v = match req.version() {
                                http::Version::HTTP_2 => "HTTP/2",
                                http::Version::HTTP_10 => "HTTP/1.0",
                                _ => "HTTP/1.1",
                            };
                            r.headers_mut().insert(
                                "x-backend-http-version",
                                http::HeaderValue::from_static(v),
                            );
                        }
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    };
    tokio::select! {
        _ = serve => Ok(()),
        _ = tokio::time::sleep(Duration::from_secs(a.max_lifetime_secs)) => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// TLS client configuration

/// Verifies the chain against the given roots but ignores the host name: mesh certificates
/// carry only a SPIFFE URI SAN.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Accepts any certificate, but still checks the handshake signatures.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config(a: &RunArgs) -> Result<Arc<rustls::ClientConfig>> {
    let mut provider = aws_lc_rs::default_provider();
    match a.kx {
        Kx::X25519 => provider.kx_groups = vec![aws_lc_rs::kx_group::X25519],
        Kx::P256 => provider.kx_groups = vec![aws_lc_rs::kx_group::SECP256R1],
        Kx::Default => {}
    }
    let provider = Arc::new(provider);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let verifier: Arc<dyn ServerCertVerifier> = if let Some(ca) = &a.ca {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading CA bundle {}", ca.display()))?
        {
            roots.add(c?)?;
        }
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()?;
        Arc::new(ChainOnly(v))
    } else if a.insecure {
        Arc::new(AnyCert(provider.clone()))
    } else {
        bail!("--tls needs --ca <root.pem> or --insecure");
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match (&a.cert, &a.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading {}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = if a.alpn.is_empty() {
        match a.scenario {
            Scenario::H2 => vec![b"h2".to_vec()],
            _ => vec![b"http/1.1".to_vec()],
        }
    } else {
        a.alpn.iter().map(|s| s.as_bytes().to_vec()).collect()
    };
    if !a.resume {
        cfg.resumption = Resumption::disabled();
    }
    Ok(Arc::new(cfg))
}

// ---------------------------------------------------------------------------------------------
// Load

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

struct Shared {
    a: RunArgs,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    deadline: Instant,
    req_timeout: Duration,
    claimed: AtomicU64,
    connections: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    /// What the first TLS handshake negotiated (version, suite, group, ALPN).
    negotiated: std::sync::OnceLock<serde_json::Value>,
    /// Responses by the backend's `x-backend-http-version` (HTTP/1.1, HTTP/2, other or none).
    backend_versions: [AtomicU64; 3],
}

impl Shared {
    /// Takes one request from the budget; false once the deadline or the budget is reached.
    fn claim(&self) -> bool {
        Instant::now() < self.deadline
            && self.claimed.fetch_add(1, Ordering::Relaxed) < self.a.requests
    }
    fn error(&self, kind: impl Into<String>) {
        let mut e = self.errors.lock().unwrap();
        *e.entry(kind.into()).or_default() += 1;
    }
    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Reads a whole response; an error unless its status is `--expect-status`.
    async fn read_response(&self, resp: Response<Incoming>) -> std::result::Result<(), String> {
        let status = resp.status().as_u16();
        let seen = match resp
            .headers()
            .get("x-backend-http-version")
            .map(|v| v.as_bytes())
        {
            Some(b"HTTP/1.1") => 0,
            Some(b"HTTP/2") => 1,
            _ => 2,
        };
        self.backend_versions[seen].fetch_add(1, Ordering::Relaxed);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        drop(body);
        if status != self.a.expect_status {
            return Err(format!("status {status}"));
        }
        Ok(())
    }

    fn backend_versions_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (name, n) in ["HTTP/1.1", "HTTP/2", "unknown"]
            .iter()
            .zip(&self.backend_versions)
        {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                m.insert(name.to_string(), n.into());
            }
        }
        m.into()
    }

    async fn connect(&self) -> Result<Box<dyn Io>> {
        let tcp = TcpStream::connect(self.a.target).await.context("connect")?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some((c, name)) => {
                let s = c.connect(name.clone(), tcp).await.context("tls")?;
                if self.negotiated.get().is_none() {
                    let conn = s.get_ref().1;
                    let _ = self.negotiated.set(serde_json::json!({
                        "version": conn.protocol_version().map(|v| format!("{v:?}")),
                        "cipher_suite": conn.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite())),
                        "kx_group": conn.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())),
                        "alpn": conn.alpn_protocol().map(|a| String::from_utf8_lossy(a).into_owned()),
                    }));
                }
                Ok(Box::new(s))
            }
        }
    }

    fn h1_request(&self, close: bool) -> Request<Empty<Bytes>> {
        let mut b = Request::get(self.a.path.as_str()).header("host", self.a.host.as_str());
        if close {
            b = b.header("connection", "close");
        }
        b.body(Empty::new()).unwrap()
    }

    fn h2_request(&self) -> Request<Empty<Bytes>> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Request::get(format!("{scheme}://{}{}", self.a.host, self.a.path))
            .body(Empty::new())
            .unwrap()
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

fn record(h: &mut Histogram<u64>, t0: Instant) {
    let us = t0.elapsed().as_micros().clamp(1, 60_000_000) as u64;
    h.saturating_record(us);
}

async fn keepalive_worker(sh: Arc<Shared>) -> Histogram<u64> {
    let mut h = new_hist();
    'conns: while !sh.remaining().is_zero() {
        let conn = timeout(sh.req_timeout, async {
            let io = sh.connect().await?;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
            anyhow::Ok((send, conn))
        })
        .await;
        let mut send = match conn {
            Ok(Ok((send, conn))) => {
                tokio::spawn(conn);
                sh.connections.fetch_add(1, Ordering::Relaxed);
                send
            }
            Ok(Err(e)) => {
                sh.error(format!("connect: {e:#}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(_) => {
                sh.error("connect: timeout");
                continue;
            }
        };
        loop {
            if !sh.claim() {
                break 'conns;
            }
            let t0 = Instant::now();
            let r = timeout(sh.req_timeout, async {
                send.ready().await.map_err(|e| format!("ready: {e}"))?;
                let resp = send
                    .send_request(sh.h1_request(false))
                    .await
                    .map_err(|e| format!("request: {e}"))?;
                sh.read_response(resp).await
            })
            .await;
            match r {
                Ok(Ok(())) => record(&mut h, t0),
                Ok(Err(e)) => {
                    sh.error(e);
                    if send.is_closed() {
                        continue 'conns;
                    }
                }
                Err(_) => {
                    sh.error("request: timeout");
                    continue 'conns;
                }
            }
        }
    }
    h
}

async fn newconn_worker(sh: Arc<Shared>) -> Histogram<u64> {
    let mut h = new_hist();
    while sh.claim() {
        let t0 = Instant::now();
        let r = timeout(sh.req_timeout, async {
            let io = sh.connect().await.map_err(|e| format!("{e:#}"))?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| format!("http handshake: {e}"))?;
            let driver = tokio::spawn(conn);
            let resp = send
                .send_request(sh.h1_request(true))
                .await
                .map_err(|e| format!("request: {e}"))?;
            sh.read_response(resp).await?;
            drop(send);
            // Let the connection finish closing (bounded by the outer timeout).
            let _ = driver.await;
            Ok::<_, String>(())
        })
        .await;
        match r {
            Ok(Ok(())) => {
                sh.connections.fetch_add(1, Ordering::Relaxed);
                record(&mut h, t0)
            }
            Ok(Err(e)) => {
                sh.error(e);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(_) => sh.error("timeout"),
        }
    }
    h
}

async fn h2_connection(sh: Arc<Shared>) -> Histogram<u64> {
    let mut h = new_hist();
    while !sh.remaining().is_zero() && sh.claimed.load(Ordering::Relaxed) < sh.a.requests {
        let conn = timeout(sh.req_timeout, async {
            let io = sh.connect().await?;
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake(TokioIo::new(io))
                .await?;
            anyhow::Ok((send, conn))
        })
        .await;
        let send = match conn {
            Ok(Ok((send, conn))) => {
                tokio::spawn(conn);
                sh.connections.fetch_add(1, Ordering::Relaxed);
                send
            }
            Ok(Err(e)) => {
                sh.error(format!("connect: {e:#}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(_) => {
                sh.error("connect: timeout");
                continue;
            }
        };
        let mut streams = Vec::with_capacity(sh.a.streams);
        for _ in 0..sh.a.streams {
            let sh = sh.clone();
            let mut send = send.clone();
            streams.push(tokio::spawn(async move {
                let mut h = new_hist();
                while sh.claim() {
                    let t0 = Instant::now();
                    let r = timeout(sh.req_timeout, async {
                        send.ready().await.map_err(|e| format!("ready: {e}"))?;
                        let resp = send
                            .send_request(sh.h2_request())
                            .await
                            .map_err(|e| format!("request: {e}"))?;
                        sh.read_response(resp).await
                    })
                    .await;
                    match r {
                        Ok(Ok(())) => record(&mut h, t0),
                        Ok(Err(e)) => {
                            sh.error(e);
                            if send.is_closed() {
                                break;
                            }
                        }
                        Err(_) => {
                            sh.error("request: timeout");
                            break;
                        }
                    }
                }
                h
            }));
        }
        drop(send);
        for s in streams {
            if let Ok(sh_h) = s.await {
                h.add(sh_h).ok();
            }
        }
    }
    h
}

/// One connection held open by `idleconns`: dropping `send` lets it close; `driver` (hyper's
/// connection task) has finished once the connection is closed, by either side.
struct Held {
    send: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

/// Connect, TLS handshake, HTTP/1.1 handshake and one keep-alive request; the connection is
/// then left idle.
async fn open_idle(sh: &Shared) -> std::result::Result<Held, String> {
    let io = sh.connect().await.map_err(|e| format!("{e:#}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let r = async {
        send.ready().await.map_err(|e| format!("ready: {e}"))?;
        let resp = send
            .send_request(sh.h1_request(false))
            .await
            .map_err(|e| format!("request: {e}"))?;
        sh.read_response(resp).await
    }
    .await;
    match r {
        Ok(()) => Ok(Held { send, driver }),
        Err(e) => {
            driver.abort();
            Err(e)
        }
    }
}

/// The `idleconns` scenario (see the crate docs): returns the fields of the result line.
async fn idleconns(sh: Arc<Shared>, start: Instant) -> serde_json::Value {
    let permits = Arc::new(tokio::sync::Semaphore::new(sh.a.open_concurrency));
    let mut opening = Vec::with_capacity(sh.a.connections);
    for _ in 0..sh.a.connections {
        let sh = sh.clone();
        let permits = permits.clone();
        opening.push(tokio::spawn(async move {
            // The semaphore is never closed, so acquiring only waits for a turn.
            let _turn = permits.acquire_owned().await.ok()?;
            if sh.remaining().is_zero() {
                sh.error("not opened before --duration ran out");
                return None;
            }
            let t0 = Instant::now();
            match timeout(sh.req_timeout, open_idle(&sh)).await {
                Ok(Ok(held)) => {
                    sh.connections.fetch_add(1, Ordering::Relaxed);
                    Some((held, t0.elapsed()))
                }
                Ok(Err(e)) => {
                    sh.error(e);
                    None
                }
                Err(_) => {
                    sh.error("timeout");
                    None
                }
            }
        }));
    }
    // Each task ends by the deadline plus one --timeout.
    let mut held = Vec::with_capacity(sh.a.connections);
    let mut hist = new_hist();
    for t in opening {
        match t.await {
            Ok(Some((h, took))) => {
                hist.saturating_record((took.as_micros() as u64).clamp(1, 60_000_000));
                held.push(h);
            }
            Ok(None) => {}
            Err(e) => sh.error(format!("worker: {e}")),
        }
    }
    let open_s = start.elapsed().as_secs_f64();
    let n_err: u64 = sh.errors.lock().unwrap().values().sum();
    println!(
        "{}",
        serde_json::json!({"event": "open", "opened": held.len(), "errors": n_err, "open_s": open_s})
    );
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    // Hold until the caller says so (a line or EOF on stdin) or the deadline passes. A plain
    // thread reads stdin (tokio's stdin needs a feature the main workspace does not build);
    // it may stay blocked after a deadline, which does not keep the process alive.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = tx.send(());
    });
    let held_from = Instant::now();
    let released_by = tokio::select! {
        _ = rx => "stdin",
        _ = tokio::time::sleep_until(sh.deadline.into()) => "deadline",
    };
    let held_s = held_from.elapsed().as_secs_f64();
    // Still open: neither side has closed it (a close by the target ends hyper's connection
    // task, and marks the sender closed).
    let still_open = held
        .iter()
        .filter(|h| !h.driver.is_finished() && !h.send.is_closed())
        .count();
    for h in held {
        drop(h.send);
        h.driver.abort();
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    serde_json::json!({
        "opened": hist.len(),
        "open_s": open_s,
        "held_s": held_s,
        "released_by": released_by,
        "still_open": still_open,
        "open_concurrency": sh.a.open_concurrency,
        "open_latency_ms": {
            "p50": ms(0.50),
            "p99": ms(0.99),
            "max": hist.max() as f64 / 1000.0,
        },
    })
}

async fn run(a: RunArgs) -> Result<serde_json::Value> {
    if a.connections == 0 || a.streams == 0 || a.open_concurrency == 0 {
        bail!("--connections, --streams and --open-concurrency must be at least 1");
    }
    if a.connections > 100_000 {
        bail!("--connections must be at most 100000");
    }
    if !(a.duration > 0.0 && a.duration <= 3600.0) {
        bail!("--duration must be in (0, 3600] seconds");
    }
    let tls = if a.tls {
        let name = ServerName::try_from(a.sni.clone()).context("--sni")?;
        Some((tokio_rustls::TlsConnector::from(tls_config(&a)?), name))
    } else {
        None
    };
    let duration = Duration::from_secs_f64(a.duration);
    let start = Instant::now();
    let sh = Arc::new(Shared {
        a: a.clone(),
        tls,
        deadline: start + duration,
        req_timeout: Duration::from_secs_f64(a.timeout),
        claimed: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        negotiated: std::sync::OnceLock::new(),
        backend_versions: Default::default(),
    });
    if a.scenario == Scenario::Idleconns {
        let mut out = idleconns(sh.clone(), start).await;
        let errors = sh.errors.lock().unwrap().clone();
        let fields = out.as_object_mut().expect("an object");
        for (k, v) in [
            ("label", serde_json::json!(a.label)),
            ("scenario", "idleconns".into()),
            ("target", a.target.to_string().into()),
            ("tls", a.tls.into()),
            ("connections", a.connections.into()),
            ("requests", sh.connections.load(Ordering::Relaxed).into()),
            ("errors", errors.values().sum::<u64>().into()),
            ("error_kinds", serde_json::json!(errors)),
            ("negotiated", sh.negotiated.get().cloned().into()),
            ("backend_versions", sh.backend_versions_json()),
            ("elapsed_s", start.elapsed().as_secs_f64().into()),
        ] {
            fields.insert(k.to_string(), v);
        }
        return Ok(out);
    }
    let mut tasks = Vec::with_capacity(a.connections);
    for _ in 0..a.connections {
        let sh = sh.clone();
        tasks.push(tokio::spawn(async move {
            match sh.a.scenario {
                Scenario::Keepalive => keepalive_worker(sh).await,
                Scenario::Newconn => newconn_worker(sh).await,
                Scenario::H2 => h2_connection(sh).await,
                // Handled above; never spawned here.
                Scenario::Idleconns => new_hist(),
            }
        }));
    }
    let mut hist = new_hist();
    // Every worker stops at the deadline plus at most one request timeout.
    let hard_stop = start + duration + sh.req_timeout + Duration::from_secs(5);
    for t in tasks {
        let left = hard_stop.saturating_duration_since(Instant::now());
        match timeout(left, t).await {
            Ok(Ok(h)) => {
                hist.add(h).ok();
            }
            Ok(Err(e)) => sh.error(format!("worker: {e}")),
            Err(_) => sh.error("worker: did not stop in time"),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ok = hist.len();
    let errors = sh.errors.lock().unwrap().clone();
    let n_err: u64 = errors.values().sum();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(serde_json::json!({
        "label": a.label,
        "scenario": format!("{:?}", a.scenario).to_lowercase(),
        "target": a.target.to_string(),
        "tls": a.tls,
        "connections": a.connections,
        "streams": if a.scenario == Scenario::H2 { a.streams } else { 1 },
        "elapsed_s": elapsed,
        "requests": ok,
        "errors": n_err,
        "error_kinds": errors,
        "connections_opened": sh.connections.load(Ordering::Relaxed),
        "negotiated": sh.negotiated.get().cloned(),
        "backend_versions": sh.backend_versions_json(),
        "rps": ok as f64 / elapsed,
        "latency_ms": {
            "p50": ms(0.50),
            "p90": ms(0.90),
            "p99": ms(0.99),
            "p999": ms(0.999),
            "max": hist.max() as f64 / 1000.0,
            "mean": hist.mean() / 1000.0,
        },
    }))
}
