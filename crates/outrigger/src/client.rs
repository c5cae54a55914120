//! A small real HTTP client for the demo (and `outrigger` self-checks): HTTP/1.1 over mTLS
//! with a workload certificate, pinning the server's SPIFFE ID, or over plaintext.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use outrigger_identity::{Identity, TrustDomains};
use outrigger_tls::WorkloadCerts;

const TIMEOUT: Duration = Duration::from_secs(10);

/// The outcome of one call.
pub struct Reply {
    pub status: u16,
    pub body: String,
}

async fn get_over<T>(io: T, host: &str, path: &str) -> anyhow::Result<Reply>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let conn = tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())?;
    let resp = match tx.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            // The connection's own error says why (a TLS alert from the server, a reset);
            // the request's error only says that the request could not be sent.
            if let Ok(Ok(Err(cause))) = tokio::time::timeout(Duration::from_secs(1), conn).await {
                return Err(cause.into());
            }
            return Err(e.into());
        }
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// GET over mTLS, presenting `client` and requiring the server to be `server_id`.
pub async fn mtls_get(
    addr: SocketAddr,
    client: &WorkloadCerts,
    trust: &TrustDomains,
    server_id: &Identity,
    path: &str,
) -> anyhow::Result<Reply> {
    let cfg = outrigger_tls::client_config(
        client,
        trust,
        std::slice::from_ref(server_id),
        &[b"http/1.1"],
    )?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&cfg));
    tokio::time::timeout(TIMEOUT, async {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let name = rustls_pki_types::ServerName::try_from("localhost")?.to_owned();
        let tls = connector.connect(name, tcp).await?;
        get_over(tls, "localhost", path).await
    })
    .await
    .context("timed out")?
}

/// GET over plaintext TCP.
pub async fn plain_get(addr: SocketAddr, path: &str) -> anyhow::Result<Reply> {
    tokio::time::timeout(TIMEOUT, async {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        get_over(tcp, "localhost", path).await
    })
    .await
    .context("timed out")?
}
