//! The CA client against `outrigger ca serve`'s server, over real gRPC and TLS on 127.0.0.1:
//! bootstrap with a token, renewal over mTLS without it, istiod's refusals (istio/istio
//! `security/pkg/server/ca/server.go` `CreateCertificate`, `security/pkg/pki/ca/ca.go` `Sign`).

use std::path::Path;
use std::time::Duration;

use outrigger_ca::client::{Auth, CaClient, CaClientConfig, CaError};
use outrigger_ca::server::{ServeOptions, TokenCheck, serve};
use outrigger_identity::Identity;
use outrigger_tls::WorkloadCerts;
use outrigger_tls::ca::BuiltinCa;

const TOKEN: &str = "lab-token-123";
const SERVER_NAME: &str = "istiod.istio-system.svc";

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

struct Lab {
    dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
    root_pem: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(tokens: TokenCheck, max_ttl: Option<Duration>) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let ca = BuiltinCa::init(&dir.path().join("ca"), "cluster.local").unwrap();
    let root_pem = ca.root_pem().to_string();
    std::fs::write(dir.path().join("root-cert.pem"), &root_pem).unwrap();
    std::fs::write(dir.path().join("istio-token"), format!("{TOKEN}\n")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut opts = ServeOptions::new(tokens, vec![SERVER_NAME.into()]);
    if let Some(m) = max_ttl {
        opts.max_ttl = m;
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        serve(listener, ca, opts, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Lab {
        dir,
        addr,
        root_pem,
        _stop: tx,
    }
}

impl Lab {
    fn client(&self, ttl: Duration) -> CaClient {
        CaClient::new(CaClientConfig {
            address: self.addr.to_string(),
            server_name: SERVER_NAME.into(),
            root_cert_pem: self.root_pem.clone().into_bytes(),
            root_cert_file: self.dir.path().join("root-cert.pem"),
            token_file: Some(self.dir.path().join("istio-token")),
            cluster_id: "Kubernetes".into(),
            ttl,
            timeout: Duration::from_secs(5),
        })
    }
    fn token_path(&self) -> &Path {
        self.dir.path()
    }
}

fn load(issued: &outrigger_tls::ca::IssuedCert) -> WorkloadCerts {
    WorkloadCerts::from_pem_checked(
        &issued.cert_chain_pem,
        &issued.key_pem,
        &issued.root_cert_pem,
    )
    .unwrap()
}

#[tokio::test]
async fn bootstrap_with_the_token_then_renew_over_mtls_without_it() {
    let lab = start(TokenCheck::Static(TOKEN.into()), None).await;
    let me = id("spiffe://cluster.local/ns/legacy/sa/windows-app");
    let client = lab.client(Duration::from_secs(3600));
    let first = client.create_certificate(&me, Auth::Token).await.unwrap();
    let certs = load(&first);
    assert_eq!(certs.identity(), &me);
    // The requested lifetime is granted, from 2 minutes back (istiod's clock-skew grace).
    let life = certs
        .not_after()
        .duration_since(certs.not_before())
        .unwrap();
    assert_eq!(life, Duration::from_secs(3600 + 120));

    // The token is gone (it expired): the renewal authenticates with the certificate.
    std::fs::remove_file(lab.token_path().join("istio-token")).unwrap();
    let second = client
        .create_certificate(&me, Auth::Certificate(&certs))
        .await
        .unwrap();
    let renewed = load(&second);
    assert_eq!(renewed.identity(), &me);
    assert_ne!(renewed.leaf(), certs.leaf());
    assert_ne!(second.key_pem, first.key_pem, "each request has a new key");
    // Without the certificate and without the token there is nothing to authenticate with.
    let err = client
        .create_certificate(&me, Auth::Token)
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::Token { .. }), "{err}");
}

#[tokio::test]
async fn a_wrong_token_is_unauthenticated_with_istiods_message() {
    let lab = start(TokenCheck::Static("another-token".into()), None).await;
    let me = id("spiffe://cluster.local/ns/legacy/sa/app");
    let err = lab
        .client(Duration::from_secs(3600))
        .create_certificate(&me, Auth::Token)
        .await
        .unwrap_err();
    let CaError::Refused { code, message, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(*code, tonic::Code::Unauthenticated);
    assert_eq!(message, "request authenticate failure");
    assert!(
        err.to_string().contains("bootstrap token was not accepted"),
        "{err}"
    );
}

#[tokio::test]
async fn a_certificate_caller_gets_its_own_identity_only() {
    let lab = start(TokenCheck::Static(TOKEN.into()), None).await;
    let me = id("spiffe://cluster.local/ns/legacy/sa/app");
    let client = lab.client(Duration::from_secs(3600));
    let certs = load(&client.create_certificate(&me, Auth::Token).await.unwrap());
    // Asking with mTLS for another identity: the CSR names `other`, the CA issues for the
    // caller ("the SAN is the identity of the caller"), and the client refuses the answer.
    let other = id("spiffe://cluster.local/ns/legacy/sa/other");
    let err = client
        .create_certificate(&other, Auth::Certificate(&certs))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CaError::BadResponse { reason, .. } if reason.contains("is for spiffe://cluster.local/ns/legacy/sa/app")),
        "{err}"
    );
}

#[tokio::test]
async fn lifetimes_follow_istiods_default_and_maximum() {
    let lab = start(TokenCheck::None, Some(Duration::from_secs(2 * 3600))).await;
    let me = id("spiffe://cluster.local/ns/a/sa/b");
    // 3h against a 2h maximum: refused with istiod's wording, InvalidArgument (TTLError).
    let err = lab
        .client(Duration::from_secs(3 * 3600))
        .create_certificate(&me, Auth::Token)
        .await
        .unwrap_err();
    let CaError::Refused { code, message, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(*code, tonic::Code::InvalidArgument);
    assert!(
        message.contains("requested TTL 10800s is greater than the max allowed TTL 7200s"),
        "{message}"
    );
    // 0: the default lifetime (24h).
    let certs = load(
        &lab.client(Duration::ZERO)
            .create_certificate(&me, Auth::Token)
            .await
            .unwrap(),
    );
    let life = certs
        .not_after()
        .duration_since(certs.not_before())
        .unwrap();
    assert_eq!(life, Duration::from_secs(24 * 3600 + 120));
}

#[tokio::test]
async fn foreign_trust_domains_are_refused() {
    let lab = start(TokenCheck::None, None).await;
    let err = lab
        .client(Duration::from_secs(600))
        .create_certificate(&id("spiffe://evil.local/ns/a/sa/b"), Auth::Token)
        .await
        .unwrap_err();
    let CaError::Refused { code, message, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(*code, tonic::Code::InvalidArgument);
    assert!(
        message.contains("not in this CA's trust domain `cluster.local`"),
        "{message}"
    );
}

#[tokio::test]
async fn an_unreachable_ca_and_a_wrong_server_name_say_so() {
    let lab = start(TokenCheck::None, None).await;
    let me = id("spiffe://cluster.local/ns/a/sa/b");
    // Nothing listens on a port that was just closed.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = lab.client(Duration::from_secs(600)).config().clone();
    cfg.address = closed.to_string();
    let err = CaClient::new(cfg.clone())
        .create_certificate(&me, Auth::Token)
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&closed.to_string()), "{err}");

    // The CA's certificate does not carry this name: TLS fails and the message says why.
    cfg.address = lab.addr.to_string();
    cfg.server_name = "wrong.example".into();
    let err = CaClient::new(cfg)
        .create_certificate(&me, Auth::Token)
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("TLS"), "{err}");
}
