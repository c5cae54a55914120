//! Shared helpers for the integration tests: a real TLS echo server on 127.0.0.1, a real
//! client, and "raw" rustls configs that present arbitrary (bad) certificates.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outrigger_identity::{Identity, TrustDomains};
use outrigger_tls::ca::{BuiltinCa, IssueOptions, IssuedCert};
use outrigger_tls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use outrigger_tls::rustls::crypto::{verify_tls12_signature, verify_tls13_signature};
use outrigger_tls::rustls::pki_types::pem::PemObject;
use outrigger_tls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use outrigger_tls::rustls::{
    self, ClientConfig, DigitallySignedStruct, ProtocolVersion, ServerConfig, SignatureScheme,
    SupportedProtocolVersion,
};
use outrigger_tls::{WorkloadCerts, crypto_provider, describe_handshake_error, peer_identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector, client};

pub const TD: &str = "cluster.local";
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub fn trust() -> TrustDomains {
    TrustDomains::new(TD, &[]).unwrap()
}

pub fn id(ns: &str, sa: &str) -> Identity {
    Identity::istio(TD, ns, sa).unwrap()
}

pub fn ca() -> BuiltinCa {
    BuiltinCa::generate(TD).unwrap()
}

pub fn workload(ca: &BuiltinCa, ns: &str, sa: &str) -> WorkloadCerts {
    let issued = ca.issue(&id(ns, sa), Duration::from_secs(3600)).unwrap();
    certs_of(&issued)
}

pub fn certs_of(issued: &IssuedCert) -> WorkloadCerts {
    WorkloadCerts::from_pem(
        &issued.cert_chain_pem,
        &issued.key_pem,
        &issued.root_cert_pem,
    )
    .unwrap()
}

/// A certificate with arbitrary URI SANs and a validity window relative to now (seconds).
pub fn issue_raw(ca: &BuiltinCa, uris: &[&str], from_secs: i64, to_secs: i64) -> IssuedCert {
    let at = |s: i64| {
        if s >= 0 {
            SystemTime::now() + Duration::from_secs(s as u64)
        } else {
            SystemTime::now() - Duration::from_secs(s.unsigned_abs())
        }
    };
    ca.issue_with(&IssueOptions {
        uri_sans: uris.iter().map(|u| u.to_string()).collect(),
        dns_sans: Vec::new(),
        not_before: at(from_secs),
        not_after: at(to_secs),
    })
    .unwrap()
}

static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
static TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

pub fn tls13() -> &'static [&'static SupportedProtocolVersion] {
    TLS13_ONLY
}

pub fn tls12() -> &'static [&'static SupportedProtocolVersion] {
    TLS12_ONLY
}

/// Reported when the TLS handshake itself succeeded but no identity could be read: the
/// verifier should have refused such a peer, so refusal tests reject this outcome.
pub const ACCEPTED_WITHOUT_IDENTITY: &str = "HANDSHAKE ACCEPTED but the peer has no identity";

/// What the server learned from one accepted connection.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub peer: Identity,
    pub peer_leaf: CertificateDer<'static>,
    pub alpn: Option<Vec<u8>>,
    pub version: ProtocolVersion,
    pub sni: Option<String>,
}

/// A TLS echo server on an ephemeral 127.0.0.1 port. `config` is called once per accepted
/// connection (as the proxy does with `CertStore::server_config`). Each handshake outcome is
/// reported on the channel: the peer's identity, or the readable reason it was refused.
pub async fn echo_server(
    config: impl Fn() -> Arc<ServerConfig> + Send + Sync + 'static,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Result<Accepted, String>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = TlsAcceptor::from(config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        let _ = tx.send(Err(describe_handshake_error(&e)));
                        return;
                    }
                };
                let (_, conn) = tls.get_ref();
                let chain = conn.peer_certificates().unwrap_or_default();
                let outcome = peer_identity(chain)
                    .map(|peer| Accepted {
                        peer,
                        peer_leaf: chain[0].clone().into_owned(),
                        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                        version: conn.protocol_version().unwrap(),
                        sni: conn.server_name().map(str::to_string),
                    })
                    .map_err(|e| format!("{ACCEPTED_WITHOUT_IDENTITY}: {e}"));
                let ok = outcome.is_ok();
                let _ = tx.send(outcome);
                if !ok {
                    return;
                }
                let mut buf = [0u8; 1024];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if tls.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                            let _ = tls.flush().await;
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Next handshake outcome reported by [`echo_server`].
pub async fn next_outcome(
    rx: &mut mpsc::UnboundedReceiver<Result<Accepted, String>>,
) -> Result<Accepted, String> {
    tokio::time::timeout(TIMEOUT, rx.recv())
        .await
        .expect("server reported no outcome in time")
        .expect("server task ended")
}

/// Connects, completes the handshake and round-trips one message. Under TLS 1.3 the server
/// verifies the client certificate after the client considers the handshake done, so a
/// rejection of the client shows up at the first read; this helper covers both.
pub async fn connect(
    config: Arc<ClientConfig>,
    addr: SocketAddr,
    sni: &str,
) -> Result<client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let mut tls = tokio::time::timeout(TIMEOUT, TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| describe_handshake_error(&e))?;
    ping(&mut tls).await?;
    Ok(tls)
}

pub async fn ping(tls: &mut client::TlsStream<TcpStream>) -> Result<(), String> {
    let fut = async {
        tls.write_all(b"ping\n").await?;
        tls.flush().await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    match tokio::time::timeout(TIMEOUT, fut).await {
        Err(_) => Err("echo timed out".into()),
        Ok(Err(e)) => Err(describe_handshake_error(&e)),
        Ok(Ok(buf)) if &buf == b"ping\n" => Ok(()),
        Ok(Ok(buf)) => Err(format!("unexpected echo {buf:?}")),
    }
}

/// The leaf certificate the server presented on a client connection.
pub fn server_leaf(tls: &client::TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

fn chain_and_key(issued: &IssuedCert) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_slice_iter(issued.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    (chain, key)
}

/// A client that presents `cert` (or none) whatever it contains, and accepts any server
/// certificate (signatures are still checked). Used to test what *our server* refuses.
pub fn raw_client(
    cert: Option<&IssuedCert>,
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = match cert {
        Some(issued) => {
            let (chain, key) = chain_and_key(issued);
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A server that presents `cert` whatever it contains and asks for no client certificate.
/// Used to test what *our client* refuses.
pub fn raw_server(
    cert: &IssuedCert,
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ServerConfig> {
    let (chain, key) = chain_and_key(cert);
    Arc::new(
        ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    )
}

/// A plain TLS server (no client auth) that echoes; returns the address. For client-side tests.
pub async fn plain_echo_server(config: Arc<ServerConfig>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = TlsAcceptor::from(config.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    let _ = tls.flush().await;
                }
            });
        }
    });
    addr
}

#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
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
        verify_tls12_signature(
            message,
            cert,
            dss,
            &crypto_provider().signature_verification_algorithms,
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
            &crypto_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
