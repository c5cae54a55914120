//! Interop with OpenSSL (`/usr/bin/openssl`): a non-rustls TLS stack on both sides, with the
//! same Istio-shaped certificates written to disk in Istio's file layout.

mod common;

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use outrigger_identity::Identity;
use outrigger_tls::ca::IssuedCert;
use outrigger_tls::rustls::ProtocolVersion;
use outrigger_tls::{ISTIO_ALPNS, client_config, server_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OPENSSL: &str = "/usr/bin/openssl";

fn write_certs(issued: &IssuedCert, dir: &Path) -> (String, String, String) {
    issued.write_to(dir).unwrap();
    let (c, k, r) = IssuedCert::paths_in(dir);
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    (s(c), s(k), s(r))
}

/// `openssl s_client` with a workload certificate against our server: TLS 1.2 and 1.3, ALPN,
/// and OpenSSL verifies our server certificate against the root (`Verify return code: 0`).
#[tokio::test]
async fn openssl_s_client_against_our_server() {
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    let server_cfg = server_config(&workload(&ca, "a", "srv"), &trust(), ISTIO_ALPNS).unwrap();
    let (addr, mut outcomes) = echo_server(move || server_cfg.clone()).await;
    let client = ca
        .issue(&id("legacy", "openssl"), Duration::from_secs(600))
        .unwrap();
    let (chain, key, roots) = write_certs(&client, dir.path());

    for (flag, version) in [
        ("-tls1_2", ProtocolVersion::TLSv1_2),
        ("-tls1_3", ProtocolVersion::TLSv1_3),
    ] {
        let connect = addr.to_string();
        let args = [
            "s_client",
            "-connect",
            &connect,
            flag,
            "-cert",
            &chain,
            "-key",
            &key,
            "-CAfile",
            &roots,
            "-alpn",
            "istio-http/1.1",
            "-verify_return_error",
        ];
        let mut child = tokio::process::Command::new(OPENSSL)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let accepted = next_outcome(&mut outcomes).await.unwrap();
        assert_eq!(accepted.peer, id("legacy", "openssl"));
        assert_eq!(accepted.version, version);
        assert_eq!(accepted.alpn.as_deref(), Some(&b"istio-http/1.1"[..]));

        // Send a line, wait for the echo, then close stdin so that s_client exits.
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hello-from-openssl\n").await.unwrap();
        stdin.flush().await.unwrap();
        let mut stdout_pipe = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        tokio::time::timeout(TIMEOUT, async {
            while !String::from_utf8_lossy(&seen).contains("\nhello-from-openssl") {
                let n = stdout_pipe.read(&mut buf).await.unwrap();
                assert!(n > 0, "s_client ended: {}", String::from_utf8_lossy(&seen));
                seen.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no echo: {}", String::from_utf8_lossy(&seen)));
        drop(stdin);
        stdout_pipe.read_to_end(&mut seen).await.unwrap();
        let status = tokio::time::timeout(TIMEOUT, child.wait())
            .await
            .expect("s_client did not exit")
            .unwrap();
        assert!(status.success(), "{}", String::from_utf8_lossy(&seen));
        let stdout = String::from_utf8_lossy(&seen);
        assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
        assert!(stdout.contains("ALPN protocol: istio-http/1.1"), "{stdout}");
    }
}

/// `openssl s_client` without a client certificate is refused by our server with a clear
/// reason (STRICT mTLS).
#[tokio::test]
async fn openssl_s_client_without_certificate_is_refused() {
    let ca = ca();
    let server_cfg = server_config(&workload(&ca, "a", "srv"), &trust(), ISTIO_ALPNS).unwrap();
    let (addr, mut outcomes) = echo_server(move || server_cfg.clone()).await;
    let connect = addr.to_string();
    let mut child = tokio::process::Command::new(OPENSSL)
        .args(["s_client", "-connect", &connect, "-tls1_2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let reason = next_outcome(&mut outcomes).await.unwrap_err();
    assert!(reason.contains("presented no certificate"), "{reason}");
    drop(child.stdin.take());
    let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `openssl s_server` requiring a client certificate (`-Verify`), waits until it listens.
async fn s_server(chain: &str, key: &str, roots: &str, alpn: &str) -> (KillOnDrop, u16) {
    for _ in 0..5 {
        let port = free_port();
        let child = Command::new(OPENSSL)
            .args([
                "s_server",
                "-accept",
                &port.to_string(),
                "-cert",
                chain,
                "-key",
                key,
                "-CAfile",
                roots,
                "-Verify",
                "2",
                "-verify_return_error",
                "-alpn",
                alpn,
                "-rev",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut guard = KillOnDrop(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return (guard, port);
            }
            if guard.0.try_wait().unwrap().is_some() {
                break; // port taken in between: try another
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("openssl s_server did not start");
}

/// Our client (origination) against `openssl s_server` requiring a client certificate: the
/// server identity is pinned and OpenSSL accepts our client certificate.
#[tokio::test]
async fn our_client_against_openssl_s_server() {
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    let server = ca
        .issue(&id("mesh", "svc"), Duration::from_secs(600))
        .unwrap();
    let (chain, key, roots) = write_certs(&server, dir.path());
    let (_server, port) = s_server(&chain, &key, &roots, "istio,h2").await;
    let addr = ([127, 0, 0, 1], port).into();

    let client_certs = workload(&ca, "legacy", "app");
    let cfg = client_config(&client_certs, &trust(), &[id("mesh", "svc")], &[b"istio"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect("svc.mesh.svc.cluster.local".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"istio"[..]));
    // `-rev` echoes each line reversed once the handshake (incl. our certificate) passed.
    tls.write_all(b"outrigger\n").await.unwrap();
    tls.flush().await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(b"\n") {
        let n = tokio::time::timeout(TIMEOUT, tls.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "s_server closed: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(String::from_utf8_lossy(&got).trim(), "reggirtuo");
    // s_server serves one connection at a time.
    tls.shutdown().await.unwrap();
    drop(tls);

    // The same server is refused when another identity is pinned.
    let wrong: Identity = id("mesh", "other");
    let cfg = client_config(&client_certs, &trust(), &[wrong], &[b"istio"]).unwrap();
    let err = connect(cfg, addr, "svc").await.unwrap_err();
    assert!(
        err.contains("spiffe://cluster.local/ns/mesh/sa/svc")
            && err.contains("spiffe://cluster.local/ns/mesh/sa/other"),
        "{err}"
    );
}
