//! "A connection was accepted and authenticated": the part of the inbound path that the direct
//! mTLS listeners (`inbound`) and the HBONE listener (`hbone::server`) share.
//!
//! * [`serve`]: the accept loop — the global connection cap checked at accept, the drain
//!   signal, back-off when `accept` itself fails;
//! * [`mtls`]: the TLS handshake under `timeouts.handshake`, the ALPN a listener requires, the
//!   peer's SPIFFE identity read back from the verified chain, the per-identity cap, and the
//!   reject metric (`outrigger_connections_rejected{listener,reason}`) with a rate-limited log
//!   line for each way this can fail;
//! * [`Peer`] / [`plaintext`]: the per-connection [`ConnInfo`] (principal, XFCC, metric labels)
//!   every request and TCP stream on the connection is decided and reported with.
//!
//! What happens next differs: a direct connection is classified and forwarded, an HBONE
//! connection speaks HTTP/2 and each CONNECT stream becomes a [`ConnInfo`] of its own.

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::conn::ConnInfo;
use crate::ctx::Ctx;
use crate::limits::{Overflow, Permit};
use crate::metrics::{Lv, TcpLabels, connection_labels};
use crate::workload::InboundConfig;

/// A mesh-facing listener as the accept path names it: in logs, and in the `listener` label of
/// `outrigger_connections_rejected`.
pub(crate) struct Listener {
    pub name: String,
    pub lv: Lv,
    /// Put before the log lines of this path (`HBONE `), so that an operator can tell which
    /// listener kind refused a connection.
    log_prefix: &'static str,
    /// The ALPN protocol a client must have negotiated, if it negotiated one at all.
    alpn: Option<&'static [u8]>,
    /// The listener may carry TCP: `istio-peer-exchange` is selected when offered
    /// (crate::tcp_mx; `outrigger_tls::CertStore::server_config_peer_exchange`).
    peer_exchange: bool,
}

impl Listener {
    /// A direct mTLS (or plaintext) inbound listener. `tcp`: its connections may be TCP (its
    /// protocol is `tcp` or `auto`), so a sidecar's offer of Istio's TCP metadata exchange
    /// (`istio-peer-exchange`) is taken, as by a sidecar's TCP filter chain; a listener
    /// declared HTTP never selects it, as a sidecar's HTTP chain (ALPN `h2`, `http/1.1`) never
    /// does (istio/istio `pilot/pkg/security/authn/utils/utils.go`, `BuildInboundTLS`).
    pub fn direct(name: &str, tcp: bool) -> Listener {
        Listener {
            name: name.to_string(),
            lv: Lv::new(name),
            log_prefix: "",
            alpn: None,
            peer_exchange: tcp,
        }
    }

    /// The HBONE listener: HTTP/2 only, so a client that negotiated another ALPN protocol is
    /// refused (ztunnel's server offers `h2` alone).
    pub fn hbone(name: &str, alpn: &'static [u8]) -> Listener {
        Listener {
            name: name.to_string(),
            lv: Lv::new(name),
            log_prefix: "HBONE ",
            alpn: Some(alpn),
            peer_exchange: false,
        }
    }

    fn alpn_str(&self) -> String {
        String::from_utf8_lossy(self.alpn.unwrap_or_default()).into_owned()
    }
}

/// Accepts connections until the drain starts. Each accepted connection first takes a place
/// under the global cap (checked at accept, before any work, as Envoy's global connection limit
/// is: over it, the socket is closed at once); `on_accept` gets it with its [`Permit`] and is
/// expected to spawn the connection's task.
pub(crate) async fn serve<F>(listener: TcpListener, ctx: &Ctx, door: &Listener, mut on_accept: F)
where
    F: FnMut(TcpStream, SocketAddr, Permit),
{
    until_drained(&listener, ctx, &door.name, |stream, src| {
        match ctx.conns.try_acquire() {
            Ok(permit) => on_accept(stream, src, permit),
            Err(o) => {
                drop(stream);
                refuse_overflow(ctx, &door.lv, &door.name, src, None, o);
            }
        }
    })
    .await;
    tracing::debug!(listener = %door.name, "{}listener stopped accepting", door.log_prefix);
}

/// The accept loop alone (the mesh-facing listeners through [`serve`], and the outbound
/// listeners, which have no caps): hands every accepted connection to `on_accept` until the
/// drain starts. A failed `accept` (EMFILE and friends, which the connection caps should
/// prevent) is logged (rate-limited) and backed off briefly instead of spinning.
pub(crate) async fn until_drained<F>(
    listener: &TcpListener,
    ctx: &Ctx,
    name: &str,
    mut on_accept: F,
) where
    F: FnMut(TcpStream, SocketAddr),
{
    let mut drain = ctx.drain.clone();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = drain.wait_for(|d| *d) => break,
        };
        match accepted {
            Ok((stream, src)) => on_accept(stream, src),
            Err(e) => {
                crate::warn_limited!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Counts and logs (rate-limited, `warn_limited!`) a connection refused by a connection cap.
/// The caller has already closed it (or refuses the HBONE stream it was for).
pub(crate) fn refuse_overflow(
    ctx: &Ctx,
    listener_lv: &Lv,
    listener: &str,
    src: SocketAddr,
    peer: Option<&str>,
    why: Overflow,
) {
    ctx.metrics.reject(listener_lv, why.reason());
    let limits = ctx.conns.limits();
    match why {
        Overflow::Global => crate::warn_limited!(
            listener, %src, max = limits.max,
            "connection refused: {} downstream connections are open (connections.max)",
            limits.max
        ),
        Overflow::Identity => crate::warn_limited!(
            listener, %src, peer = peer.unwrap_or("-"), max_per_identity = limits.max_per_identity,
            "connection refused: this identity has {} connections open \
             (connections.maxPerIdentity)",
            limits.max_per_identity
        ),
    }
}

/// The authenticated peer of an mTLS connection.
pub(crate) struct Peer {
    /// The SPIFFE ID (`spiffe://td/ns/x/sa/y`), as the connection caps count it and the logs
    /// name the peer.
    pub id: String,
    /// The principal as policies write it (`td/ns/x/sa/y`).
    pub principal: String,
    /// Envoy-format `x-forwarded-client-cert` for this peer.
    pub xfcc: Option<HeaderValue>,
    /// The connection's metric labels, the source taken from the certificate.
    pub labels: TcpLabels,
}

impl Peer {
    /// The context of a connection (or an HBONE stream) from this peer to `listener`.
    pub fn conn(
        &self,
        listener: Arc<InboundConfig>,
        src: SocketAddr,
        dst: SocketAddr,
        sni: Option<String>,
    ) -> ConnInfo {
        ConnInfo {
            listener,
            peer_principal: Some(self.principal.clone()),
            xfcc: self.xfcc.clone(),
            src,
            dst,
            sni,
            labels: self.labels.clone(),
        }
    }
}

/// The context of a connection that is not mTLS (PeerAuthentication PERMISSIVE or DISABLE):
/// no peer identity, no XFCC.
pub(crate) fn plaintext(
    ctx: &Ctx,
    listener: Arc<InboundConfig>,
    src: SocketAddr,
    dst: SocketAddr,
) -> ConnInfo {
    ConnInfo {
        listener,
        peer_principal: None,
        xfcc: None,
        src,
        dst,
        sni: None,
        labels: connection_labels(&ctx.dest_labels, None),
    }
}

/// Terminates mTLS on an accepted connection with the current workload certificate and
/// authenticates the peer; charges the peer's identity to `permit` (the per-identity cap). Every
/// failure is counted in `outrigger_connections_rejected` and logged (rate-limited), and gives
/// `None`: the connection is closed.
pub(crate) async fn mtls(
    stream: TcpStream,
    src: SocketAddr,
    ctx: &Ctx,
    door: &Listener,
    permit: &mut Permit,
) -> Option<(TlsStream<TcpStream>, Peer)> {
    let acceptor = tokio_rustls::TlsAcceptor::from(if door.peer_exchange {
        ctx.certs.server_config_peer_exchange()
    } else {
        ctx.certs.server_config()
    });
    let tls = match tokio::time::timeout(ctx.settings.handshake_timeout, acceptor.accept(stream))
        .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            ctx.metrics.reject(
                &door.lv,
                outrigger_tls::verify::handshake_refusal_reason(&e),
            );
            crate::warn_limited!(
                listener = %door.name, %src,
                "{}mTLS handshake refused: {}",
                door.log_prefix,
                outrigger_tls::verify::describe_handshake_error(&e)
            );
            return None;
        }
        Err(_) => {
            ctx.metrics.reject(&door.lv, "tls_timeout");
            crate::warn_limited!(listener = %door.name, %src, "{}mTLS handshake timed out", door.log_prefix);
            return None;
        }
    };
    let (_, session) = tls.get_ref();
    if let (Some(required), Some(alpn)) = (door.alpn, session.alpn_protocol())
        && alpn != required
    {
        ctx.metrics.reject(&door.lv, "alpn");
        crate::warn_limited!(
            listener = %door.name, %src,
            alpn = %String::from_utf8_lossy(alpn),
            "{}connection refused: it negotiated ALPN other than {}",
            door.log_prefix,
            door.alpn_str()
        );
        return None;
    }
    let peer_chain = session.peer_certificates().unwrap_or(&[]);
    // The verifier already required a trusted chain with one SPIFFE ID from a trusted domain;
    // this only reads it back.
    let identity = match outrigger_tls::peer_identity(peer_chain) {
        Ok(id) => id,
        Err(e) => {
            ctx.metrics.reject(&door.lv, "identity");
            crate::warn_limited!(listener = %door.name, %src, "{}peer identity refused: {e}", door.log_prefix);
            return None;
        }
    };
    let id = identity.to_string();
    if let Err(o) = permit.charge_identity(&id) {
        drop(tls);
        refuse_overflow(ctx, &door.lv, &door.name, src, Some(&id), o);
        return None;
    }
    let xfcc = peer_chain
        .first()
        .and_then(|leaf| xfcc_header(ctx, leaf.as_ref(), &identity));
    let peer = Peer {
        principal: identity.principal(),
        labels: connection_labels(&ctx.dest_labels, Some(&identity)),
        xfcc,
        id,
    };
    Some((tls, peer))
}

/// Envoy-format `x-forwarded-client-cert` for a verified peer: `By=` this workload, `Hash=`
/// the peer leaf's SHA-256, `URI=` the peer's SPIFFE ID.
fn xfcc_header(
    ctx: &Ctx,
    leaf_der: &[u8],
    peer: &outrigger_identity::Identity,
) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "By={};Hash={};Subject=\"\";URI={}",
        ctx.workload.identity,
        outrigger_tls::cert_sha256_hex(leaf_der),
        peer
    ))
    .ok()
}

#[cfg(test)]
mod tests {
    //! Real TLS on 127.0.0.1: the server side is this module, the client a rustls client with a
    //! certificate from the test CA (or none), as a sidecar would dial.

    use std::time::{Duration, Instant, SystemTime};

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;
    use tokio_rustls::TlsConnector;

    use outrigger_testkit::{Issued, TestPki};
    use outrigger_tls::ca::{CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE};
    use outrigger_tls::{CertSource, CertStore};

    use super::*;
    use crate::limits::ConnectionLimits;
    use crate::metrics::{Metrics, RejectLabels};
    use crate::policy_state::{PolicyHandle, PolicyState};
    use crate::settings::Settings;
    use crate::workload::WorkloadInfo;
    use crate::{AccessLog, Proxy, ProxyOptions};

    /// A data plane with no listeners of its own, for its context: the server certificate
    /// `app/server`, no policy, the given settings.
    struct Harness {
        pki: TestPki,
        /// Holds the drain sender.
        proxy: Proxy,
        ctx: Arc<Ctx>,
    }

    async fn harness(settings: Settings) -> Harness {
        let pki = TestPki::new();
        let server = pki.issue("app", "server");
        let certs = CertStore::new(
            CertSource::Files {
                chain: server.dir.join(CERT_CHAIN_FILE),
                key: server.dir.join(KEY_FILE),
                roots: server.dir.join(ROOT_CERT_FILE),
            },
            pki.trust(),
            outrigger_tls::ISTIO_ALPNS
                .iter()
                .map(|a| a.to_vec())
                .collect(),
        )
        .unwrap();
        let snapshot = outrigger_policy::Snapshot::build(
            &[],
            &outrigger_policy::Workload {
                namespace: "app".into(),
                labels: Default::default(),
            },
            &outrigger_policy::PolicyOptions::default(),
        )
        .unwrap();
        let policy = PolicyHandle::new(PolicyState {
            snapshot,
            rate_limits: Vec::new(),
            sources: Vec::new(),
            version: 1,
            loaded_at: SystemTime::now(),
        });
        let workload = WorkloadInfo {
            identity: pki.id("app", "server"),
            namespace: "app".into(),
            name: "server".into(),
            app: "server".into(),
            version: "v1".into(),
            canonical_service: "server".into(),
            canonical_revision: "v1".into(),
            service_host: None,
            cluster: "Kubernetes".into(),
        };
        let metrics = Arc::new(Metrics::new());
        let access_log = AccessLog::start(crate::AccessLogConfig::off(), metrics.clone()).unwrap();
        let proxy = Proxy::bind(
            ProxyOptions {
                inbound: Vec::new(),
                admin: None,
                metrics_listen: None,
                log_control: None,
                workload,
                settings,
                access_log,
                metrics,
                jwt: Default::default(),
                outbound: Vec::new(),
                outbound_proxy: None,
                hbone: None,
            },
            certs,
            policy,
        )
        .await
        .unwrap();
        let ctx = proxy.ctx.clone();
        Harness { pki, proxy, ctx }
    }

    fn rejected(ctx: &Ctx, listener: &str, reason: &'static str) -> u64 {
        ctx.metrics
            .rejected
            .get_or_create(&RejectLabels {
                listener: Lv::new(listener),
                reason,
            })
            .get()
    }

    /// A client that presents `client` and pins the server to `app/server`.
    fn connector(h: &Harness, client: &Issued, alpn: &[&[u8]]) -> TlsConnector {
        let cfg = outrigger_tls::client_config(
            &client.certs,
            &h.pki.trust(),
            &[h.pki.id("app", "server")],
            alpn,
        )
        .unwrap();
        TlsConnector::from(cfg)
    }

    /// Dials `addr` and completes the handshake (or not) in a task of its own; the task
    /// writes `ping` and waits for the server to close.
    fn dial(addr: SocketAddr, tls: TlsConnector) -> tokio::task::JoinHandle<bool> {
        tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let sni =
                ServerName::try_from("outbound_.8080_._.server.app.svc.cluster.local").unwrap();
            match tls.connect(sni, tcp).await {
                Ok(mut s) => {
                    let _ = s.write_all(b"ping").await;
                    let _ = s.flush().await;
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                    true
                }
                Err(_) => false,
            }
        })
    }

    /// Settings with the connection caps `max` and `max_per_identity`.
    fn capped(max: usize, max_per_identity: usize) -> Settings {
        Settings {
            limits: ConnectionLimits {
                max,
                max_per_identity,
            },
            ..Settings::default()
        }
    }

    /// The server side of one connection on `l`: a place under the caps, then [`mtls`]. The
    /// permit is returned with the stream so that the connection stays counted.
    async fn handshake(
        l: &TcpListener,
        h: &Harness,
        door: &Listener,
    ) -> Option<(TlsStream<TcpStream>, Peer, Permit)> {
        let (tcp, src) = l.accept().await.unwrap();
        let mut permit = h.ctx.conns.try_acquire().unwrap();
        let (tls, peer) = mtls(tcp, src, &h.ctx, door, &mut permit).await?;
        Some((tls, peer, permit))
    }

    async fn listen() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    #[tokio::test]
    async fn mtls_reads_the_peer_back_and_builds_the_connection_context() {
        let h = harness(Settings::default()).await;
        let client = h.pki.issue("web", "client");
        let (l, addr) = listen().await;
        let door = Listener::direct("web-in", false);
        let dialed = dial(addr, connector(&h, &client, &[b"istio-http/1.1"]));
        let (tcp, src) = l.accept().await.unwrap();
        let dst = tcp.local_addr().unwrap();
        let mut permit = h.ctx.conns.try_acquire().unwrap();
        let (mut tls, peer) = mtls(tcp, src, &h.ctx, &door, &mut permit)
            .await
            .expect("a mesh client is accepted");

        let id = "spiffe://cluster.local/ns/web/sa/client";
        assert_eq!(peer.id, id);
        assert_eq!(peer.principal, "cluster.local/ns/web/sa/client");
        let leaf = CertificateDer::pem_slice_iter(client.pem.cert_chain_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        // Envoy's XFCC for Istio's sidecar: By (this workload), Hash (the peer leaf's
        // SHA-256, hex), Subject (empty for SPIFFE certificates), URI (the peer's SAN).
        assert_eq!(
            peer.xfcc.as_ref().unwrap().to_str().unwrap(),
            format!(
                "By=spiffe://cluster.local/ns/app/sa/server;Hash={};Subject=\"\";URI={id}",
                outrigger_tls::cert_sha256_hex(leaf.as_ref())
            )
        );
        assert_eq!(&*peer.labels.source_principal.0, id);
        assert_eq!(&*peer.labels.source_workload_namespace.0, "web");

        let cfg = Arc::new(InboundConfig {
            name: "web-in".into(),
            listen: addr,
            backend: "127.0.0.1:9".parse().unwrap(),
            protocol: crate::workload::Protocol::Auto,
        });
        let sni = tls.get_ref().1.server_name().map(str::to_string);
        let conn = peer.conn(cfg, src, dst, sni);
        assert_eq!(
            conn.peer_principal.as_deref(),
            Some(peer.principal.as_str())
        );
        assert_eq!(conn.security_policy(), "mutual_tls");
        assert_eq!(conn.source_principal_str(), id);
        assert_eq!(
            conn.sni.as_deref(),
            Some("outbound_.8080_._.server.app.svc.cluster.local")
        );
        assert_eq!((conn.src, conn.dst), (src, dst));
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"istio-http/1.1"[..])
        );

        // The stream handed on is the decrypted one.
        let mut got = [0u8; 4];
        tls.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        drop(tls);
        assert!(dialed.await.unwrap());
        for reason in ["tls_handshake", "tls_timeout", "identity", "alpn"] {
            assert_eq!(rejected(&h.ctx, "web-in", reason), 0);
        }
    }

    #[tokio::test]
    async fn plaintext_has_no_peer() {
        let h = harness(Settings::default()).await;
        let cfg = Arc::new(InboundConfig {
            name: "web-in".into(),
            listen: "127.0.0.1:8080".parse().unwrap(),
            backend: "127.0.0.1:9".parse().unwrap(),
            protocol: crate::workload::Protocol::Auto,
        });
        let src: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let conn = plaintext(&h.ctx, cfg, src, "127.0.0.1:8080".parse().unwrap());
        assert!(conn.peer_principal.is_none() && conn.xfcc.is_none() && conn.sni.is_none());
        assert_eq!(conn.security_policy(), "none");
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused_and_counted() {
        let h = harness(Settings::default()).await;
        let (l, addr) = listen().await;
        let door = Listener::direct("web-in", false);
        let dialed = dial(
            addr,
            TlsConnector::from(outrigger_testkit::no_cert_client_config(&[b"istio"])),
        );
        assert!(handshake(&l, &h, &door).await.is_none());
        assert_eq!(rejected(&h.ctx, "web-in", "tls_handshake"), 1);
        // The client's handshake may complete on its side (TLS 1.3 sends the client
        // certificate last), but it never gets application data.
        let _ = dialed.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_client_is_refused_after_the_handshake_timeout() {
        let h = harness(Settings {
            handshake_timeout: Duration::from_millis(200),
            ..Settings::default()
        })
        .await;
        let (l, addr) = listen().await;
        let door = Listener::direct("web-in", false);
        let silent = TcpStream::connect(addr).await.unwrap();
        let (tcp, src) = l.accept().await.unwrap();
        let mut permit = h.ctx.conns.try_acquire().unwrap();
        let started = Instant::now();
        assert!(mtls(tcp, src, &h.ctx, &door, &mut permit).await.is_none());
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(rejected(&h.ctx, "web-in", "tls_timeout"), 1);
        drop(silent);
    }

    #[tokio::test]
    async fn hbone_refuses_a_client_that_negotiated_another_alpn() {
        let h = harness(Settings::default()).await;
        let client = h.pki.issue("web", "client");
        let (l, addr) = listen().await;
        let door = Listener::hbone("hbone", b"h2");

        let dialed = dial(addr, connector(&h, &client, &[b"http/1.1"]));
        assert!(handshake(&l, &h, &door).await.is_none());
        assert_eq!(rejected(&h.ctx, "hbone", "alpn"), 1);
        dialed.await.unwrap();

        // `h2` is what the HBONE listener wants; so is no ALPN at all.
        for alpn in [&[&b"h2"[..]][..], &[]] {
            let dialed = dial(addr, connector(&h, &client, alpn));
            let (tls, peer, _permit) = handshake(&l, &h, &door).await.expect("accepted");
            assert_eq!(peer.id, "spiffe://cluster.local/ns/web/sa/client");
            drop(tls);
            assert!(dialed.await.unwrap());
        }
        assert_eq!(rejected(&h.ctx, "hbone", "alpn"), 1);
    }

    #[tokio::test]
    async fn the_per_identity_cap_is_charged_once_the_peer_is_known() {
        let h = harness(capped(10, 1)).await;
        let client = h.pki.issue("web", "client");
        let other = h.pki.issue("web", "other");
        let (l, addr) = listen().await;
        let door = Listener::direct("web-in", false);

        let _d1 = dial(addr, connector(&h, &client, &[b"istio"]));
        let first = handshake(&l, &h, &door).await;
        assert!(first.is_some());
        let d2 = dial(addr, connector(&h, &client, &[b"istio"]));
        assert!(
            handshake(&l, &h, &door).await.is_none(),
            "a second connection of the same identity is refused"
        );
        assert_eq!(rejected(&h.ctx, "web-in", "identity_cx_overflow"), 1);
        d2.await.unwrap();
        // Another identity has its own budget.
        let _d3 = dial(addr, connector(&h, &other, &[b"istio"]));
        let third = handshake(&l, &h, &door).await;
        assert!(third.is_some());
    }

    #[tokio::test]
    async fn serve_caps_connections_at_accept_and_stops_on_drain() {
        let h = harness(capped(1, 1)).await;
        let (l, addr) = listen().await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let ctx = h.ctx.clone();
        let server = tokio::spawn(async move {
            let door = Listener::direct("web-in", false);
            serve(l, &ctx, &door, move |stream, src, permit| {
                let _ = tx.send((stream, src, permit));
            })
            .await;
        });

        let first = TcpStream::connect(addr).await.unwrap();
        let (_held, src, _permit) = rx.recv().await.unwrap();
        assert_eq!(src, first.local_addr().unwrap());

        // Over `connections.max`: closed at once, without a handshake.
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(10), second.read(&mut buf))
            .await
            .expect("the server closes a connection over the cap");
        assert!(matches!(closed, Ok(0) | Err(_)));
        assert_eq!(rejected(&h.ctx, "web-in", "cx_overflow"), 1);
        assert!(rx.try_recv().is_err());

        // The drain ends the accept loop.
        h.proxy.drain_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the accept loop ends on drain")
            .unwrap();
    }
}
