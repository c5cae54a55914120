//! RequestAuthentication end to end: tokens minted here (RSA, EC, Ed25519), key sets served by
//! a real HTTPS server on loopback, Istio's own sample tokens, and AuthorizationPolicy on the
//! verified claims.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use common::*;
use outrigger_testkit::*;

/// An issuer with three keys and a JWKS that can be rotated or taken offline.
struct Issuer {
    rsa: RsaKeyPair,
    ec: EcdsaKeyPair,
    ed: Ed25519KeyPair,
    next: Ed25519KeyPair,
    jwks: Mutex<String>,
    down: AtomicBool,
    hits: AtomicUsize,
    url: Mutex<String>,
}

impl Issuer {
    fn new() -> Arc<Self> {
        let i = Issuer {
            rsa: RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap(),
            ec: EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap(),
            ed: Ed25519KeyPair::generate().unwrap(),
            next: Ed25519KeyPair::generate().unwrap(),
            jwks: Mutex::new(String::new()),
            down: AtomicBool::new(false),
            hits: AtomicUsize::new(0),
            url: Mutex::new(String::new()),
        };
        *i.jwks.lock().unwrap() = i.key_set(false);
        Arc::new(i)
    }

    fn key_set(&self, rotated: bool) -> String {
        let comps: signature::RsaPublicKeyComponents<Vec<u8>> = self.rsa.public_key().into();
        let ec = self.ec.public_key().as_ref();
        let mut keys = vec![
            serde_json::json!({"kty": "RSA", "kid": "rsa", "n": b64(&comps.n), "e": b64(&comps.e)}),
            serde_json::json!({"kty": "EC", "kid": "ec", "crv": "P-256", "x": b64(&ec[1..33]), "y": b64(&ec[33..])}),
            serde_json::json!({"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": b64(self.ed.public_key().as_ref())}),
        ];
        if rotated {
            keys.push(serde_json::json!({"kty": "OKP", "kid": "ed-2", "crv": "Ed25519", "x": b64(self.next.public_key().as_ref())}));
        }
        serde_json::json!({ "keys": keys }).to_string()
    }

    fn iss(&self) -> String {
        self.url.lock().unwrap().clone()
    }

    /// A token signed with `alg` ("RS256", "PS256", "ES256", "EdDSA", "EdDSA-next").
    fn token(&self, alg: &str, claims: serde_json::Value) -> String {
        let (alg_name, kid) = match alg {
            "RS256" | "PS256" => (alg, "rsa"),
            "ES256" => (alg, "ec"),
            "EdDSA" => (alg, "ed"),
            "EdDSA-next" => ("EdDSA", "ed-2"),
            _ => unreachable!(),
        };
        let header = serde_json::json!({"alg": alg_name, "kid": kid, "typ": "JWT"});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let sig = match alg {
            "RS256" | "PS256" => {
                let mut s = vec![0; self.rsa.public_modulus_len()];
                let enc: &dyn signature::RsaEncoding = if alg == "RS256" {
                    &signature::RSA_PKCS1_SHA256
                } else {
                    &signature::RSA_PSS_SHA256
                };
                self.rsa.sign(enc, &rng, input.as_bytes(), &mut s).unwrap();
                s
            }
            "ES256" => self
                .ec
                .sign(&rng, input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            "EdDSA" => self.ed.sign(input.as_bytes()).as_ref().to_vec(),
            _ => self.next.sign(input.as_bytes()).as_ref().to_vec(),
        };
        format!("{input}.{}", b64(&sig))
    }

    fn claims(&self, sub: &str) -> serde_json::Value {
        serde_json::json!({
            "iss": self.iss(), "sub": sub, "aud": "api", "exp": now() + 600, "nbf": now() - 10,
            "upn": format!("{sub}@corp.example"), "groups": ["readers", "admins"],
            "scope": "orders.read orders.write", "org": {"dept": "finance"}
        })
    }
}

/// Serves the issuer's OpenID configuration and JWKS over HTTPS on 127.0.0.1 (certificate
/// for `localhost` from the test CA).
async fn serve_issuer(pki: &TestPki, issuer: Arc<Issuer>) -> SocketAddr {
    serve_issuer_as(pki, issuer, "localhost").await
}

/// The same, with the issuer URL and certificate naming `host` (which the test's proxy maps to
/// 127.0.0.1; nothing else resolves it).
async fn serve_issuer_as(pki: &TestPki, issuer: Arc<Issuer>, host: &str) -> SocketAddr {
    let mut o = outrigger_tls::ca::IssueOptions::workload(
        &pki.id("idp", "idp"),
        std::time::Duration::from_secs(3600),
    );
    o.dns_sans = vec![host.into()];
    let cert = pki.ca.issue_with(&o).unwrap();
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<_> =
        rustls_pki_types::CertificateDer::pem_slice_iter(cert.cert_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(outrigger_tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    *issuer.url.lock().unwrap() = format!("https://{host}:{}", addr.port());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let issuer = issuer.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let issuer = issuer.clone();
                    async move {
                        issuer.hits.fetch_add(1, Ordering::SeqCst);
                        let (status, body) = if issuer.down.load(Ordering::SeqCst) {
                            (503, "down".to_string())
                        } else if req.uri().path() == "/.well-known/openid-configuration" {
                            (200, serde_json::json!({"issuer": issuer.iss(), "jwks_uri": format!("{}/keys", issuer.iss())}).to_string())
                        } else if req.uri().path() == "/keys" {
                            (200, issuer.jwks.lock().unwrap().clone())
                        } else {
                            (404, String::new())
                        };
                        let mut r = http::Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

async fn call(
    mesh: &Mesh,
    agent: &AgentProc,
    who: &Issued,
    path: &str,
    headers: &[(&str, &str)],
) -> Got {
    let mut c = mesh.connect(agent.addr("web"), who, false).await;
    let mut req = get(path, false);
    for (k, v) in headers {
        req.headers_mut().append(
            http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    c.fetch(req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_authentication_with_a_real_oidc_issuer() {
    let mesh = Mesh::new();
    let issuer = Issuer::new();
    serve_issuer(&mesh.pki, issuer.clone()).await;
    let iss = issuer.iss();
    mesh.policy("pa.yaml", MESH_STRICT);
    mesh.policy(
        "jwt.yaml",
        &format!(
            r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: corp, namespace: legacy}}
spec:
  jwtRules:
  - issuer: "{iss}"
    audiences: [api]
    outputClaimToHeaders:
    - header: x-jwt-sub
      claim: sub
  - issuer: "{iss}"
    audiences: [api]
    fromHeaders: [{{name: x-token, prefix: "Token "}}]
    fromParams: [tok]
    forwardOriginalToken: true
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: legacy}}
spec:
  rules:
  - to: [{{operation: {{paths: ["/public"]}}}}]
  - from: [{{source: {{requestPrincipals: ["{iss}/alice"]}}}}]
    to: [{{operation: {{paths: ["/secure"]}}}}]
  - to: [{{operation: {{paths: ["/admin"]}}}}]
    when:
    - key: request.auth.claims[groups]
      values: ["admins"]
    - key: request.auth.claims[org][dept]
      values: ["finance"]
    - key: request.auth.claims[scope]
      values: ["orders.write"]
"#
        ),
    );
    let cfg = mesh.config(
        &[("web", start_echo().await, "http")],
        &format!(
            "jwt:\n  caBundle: {}\n  identityHeaders:\n    x-user-upn: upn\n    x-user-groups: groups\n",
            mesh.pki.path().join("ca/root-cert.pem").display()
        ),
    );
    let agent = AgentProc::start(mesh.dir(), &cfg);
    let sleep = mesh.pki.issue("default", "sleep");

    // No token: authentication passes; only a policy that needs a principal refuses (403).
    assert_eq!(
        call(&mesh, &agent, &sleep, "/public", &[]).await.status,
        200
    );
    assert_eq!(
        call(&mesh, &agent, &sleep, "/secure", &[]).await.status,
        403
    );

    // Valid tokens of every key type.
    for alg in ["RS256", "PS256", "ES256", "EdDSA"] {
        let t = issuer.token(alg, issuer.claims("alice"));
        let got = call(
            &mesh,
            &agent,
            &sleep,
            "/secure",
            &[
                ("authorization", &format!("Bearer {t}")),
                ("x-user-upn", "forged@evil"),
            ],
        )
        .await;
        assert_eq!(got.status, 200, "{alg}: {}", got.text());
        let seen = got.seen();
        assert_eq!(
            seen.header("x-user-upn"),
            Some("alice@corp.example"),
            "forged identity header replaced"
        );
        assert_eq!(seen.header("x-user-groups"), Some("readers,admins"));
        assert_eq!(seen.header("x-jwt-sub"), Some("alice"));
        assert_eq!(
            seen.header("authorization"),
            None,
            "forwardOriginalToken: false removes it"
        );
    }
    // The principal is iss/sub: bob is authenticated but not allowed on /secure.
    let bob = issuer.token("RS256", issuer.claims("bob"));
    assert_eq!(
        call(
            &mesh,
            &agent,
            &sleep,
            "/secure",
            &[("authorization", &format!("Bearer {bob}"))]
        )
        .await
        .status,
        403
    );
    // Claims in `when`: list (groups), nested (org.dept), space-delimited (scope).
    assert_eq!(
        call(
            &mesh,
            &agent,
            &sleep,
            "/admin",
            &[("authorization", &format!("Bearer {bob}"))]
        )
        .await
        .status,
        200
    );
    let mut c = issuer.claims("bob");
    c["scope"] = "orders.read".into();
    let t = issuer.token("RS256", c);
    assert_eq!(
        call(
            &mesh,
            &agent,
            &sleep,
            "/admin",
            &[("authorization", &format!("Bearer {t}"))]
        )
        .await
        .status,
        403
    );

    // Custom header with prefix, and a query parameter; forwardOriginalToken: true keeps it.
    let t = issuer.token("ES256", issuer.claims("alice"));
    let got = call(
        &mesh,
        &agent,
        &sleep,
        "/secure",
        &[("x-token", &format!("Token {t}"))],
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(got.seen().header("x-token").is_some());
    assert_eq!(
        call(&mesh, &agent, &sleep, &format!("/secure?tok={t}"), &[])
            .await
            .status,
        200
    );
    // Two tokens, both valid: fine. One of them invalid: 401.
    let t2 = issuer.token("EdDSA", issuer.claims("alice"));
    assert_eq!(
        call(
            &mesh,
            &agent,
            &sleep,
            "/secure",
            &[
                ("authorization", &format!("Bearer {t2}")),
                ("x-token", &format!("Token {t}"))
            ]
        )
        .await
        .status,
        200
    );

    // Every kind of bad token: 401 with a challenge.
    let mut expired = issuer.claims("alice");
    expired["exp"] = (now() - 3600).into();
    let mut early = issuer.claims("alice");
    early["nbf"] = (now() + 3600).into();
    let mut wrong_iss = issuer.claims("alice");
    wrong_iss["iss"] = "https://evil.example".into();
    let mut wrong_aud = issuer.claims("alice");
    wrong_aud["aud"] = "other".into();
    let good = issuer.token("RS256", issuer.claims("alice"));
    let (h, p, s) = {
        let mut it = good.split('.');
        (
            it.next().unwrap().to_string(),
            it.next().unwrap().to_string(),
            it.next().unwrap().to_string(),
        )
    };
    let tampered = format!(
        "{h}.{}.{s}",
        b64(issuer.claims("mallory").to_string().as_bytes())
    );
    let none = format!("{}.{p}.", b64(br#"{"alg":"none"}"#));
    let comps: signature::RsaPublicKeyComponents<Vec<u8>> = issuer.rsa.public_key().into();
    let hkey = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &comps.n);
    let hs_input = format!("{}.{p}", b64(br#"{"alg":"HS256","kid":"rsa"}"#));
    let hs = format!(
        "{hs_input}.{}",
        b64(aws_lc_rs::hmac::sign(&hkey, hs_input.as_bytes()).as_ref())
    );
    // Envoy's answer for each failure (jwt_authn filter.cc `onComplete`, status.cc; compared
    // with the real Envoy in tests/jwt_envoy.rs).
    for (what, token, status, body) in [
        (
            "expired",
            issuer.token("RS256", expired),
            401,
            "Jwt is expired",
        ),
        (
            "not yet valid",
            issuer.token("RS256", early),
            401,
            "Jwt not yet valid",
        ),
        (
            "wrong issuer",
            issuer.token("RS256", wrong_iss),
            401,
            "Jwt issuer is not configured",
        ),
        (
            "wrong audience",
            issuer.token("RS256", wrong_aud),
            403,
            "Audiences in Jwt are not allowed",
        ),
        ("bad signature", tampered, 401, "Jwt verification fails"),
        ("alg none", none, 401, "Jwt header [alg] is not supported"),
        (
            // No `kid`, keys without `alg`: every key is tried, as Envoy tries them, and
            // none verifies HMAC (Outrigger never does).
            "HS256 with the public key",
            hs,
            401,
            "Jwt verification fails",
        ),
        (
            "garbage",
            "not.a.jwt".to_string(),
            401,
            "Jwt header is an invalid Base64url encoded",
        ),
    ] {
        let got = call(
            &mesh,
            &agent,
            &sleep,
            "/public",
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
        assert_eq!(got.status, status, "{what}: {}", got.text());
        assert_eq!(got.text(), body, "{what}");
        let challenge = got.headers["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.starts_with("Bearer realm=") && challenge.contains("invalid_token"),
            "{challenge}"
        );
        // Two tokens, one invalid: refused.
        let got = call(
            &mesh,
            &agent,
            &sleep,
            "/public",
            &[
                ("authorization", &format!("Bearer {token}")),
                ("x-token", &format!("Token {t}")),
            ],
        )
        .await;
        assert_eq!(got.status, status, "{what} beside a valid token");
    }

    // Azure AD group overage: no `groups`, `_claim_names.groups` instead. The group rule
    // cannot match (403), and the log says why.
    let mut overage = issuer.claims("bob");
    overage.as_object_mut().unwrap().remove("groups");
    overage["_claim_names"] = serde_json::json!({"groups": "src1"});
    overage["_claim_sources"] = serde_json::json!({"src1": {"endpoint": "https://graph.microsoft.com/v1.0/users/x/getMemberObjects"}});
    let t = issuer.token("RS256", overage);
    assert_eq!(
        call(
            &mesh,
            &agent,
            &sleep,
            "/admin",
            &[("authorization", &format!("Bearer {t}"))]
        )
        .await
        .status,
        403
    );
    agent.wait_for_log("group overage");

    // Key rotation: a token with a kid the cached set lacks makes Outrigger refetch.
    *issuer.jwks.lock().unwrap() = issuer.key_set(true);
    let rotated = issuer.token("EdDSA-next", issuer.claims("alice"));
    let got = call(
        &mesh,
        &agent,
        &sleep,
        "/secure",
        &[("authorization", &format!("Bearer {rotated}"))],
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());

    // The issuer goes down: cached keys keep working.
    issuer.down.store(true, Ordering::SeqCst);
    let t = issuer.token("RS256", issuer.claims("alice"));
    assert_eq!(
        call(
            &mesh,
            &agent,
            &sleep,
            "/secure",
            &[("authorization", &format!("Bearer {t}"))]
        )
        .await
        .status,
        200
    );

    let m = agent.metrics();
    assert!(
        metric_value(&m, "outrigger_jwks_fetches_total", &["result=\"success\""]).unwrap_or(0.0)
            >= 2.0,
        "{m}"
    );
    assert!(
        metric_value(
            &m,
            "outrigger_jwt_authentications_total",
            &["result=\"invalid\""]
        )
        .unwrap_or(0.0)
            >= 16.0,
        "{m}"
    );
    agent.wait_for_log("JWT refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_sample_tokens_with_inline_jwks() {
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/istio-jwt");
    let read = |f: &str| {
        std::fs::read_to_string(fixtures.join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .trim()
            .to_string()
    };
    let jwks = read("istio-demo-jwks.json");
    let mesh = Mesh::new();
    mesh.policy(
        "jwt.yaml",
        &format!(
            r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: istio-demo, namespace: istio-system}}
spec:
  jwtRules:
  - issuer: testing@secure.istio.io
    jwks: '{jwks}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: groups, namespace: legacy}}
spec:
  rules:
  - from: [{{source: {{requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]}}}}]
    when:
    - key: request.auth.claims[groups]
      values: ["group1"]
"#
        ),
    );
    let agent = mesh.start(&[("web", start_echo().await, "http")]);
    let sleep = mesh.pki.issue("default", "sleep");
    let with_groups = read("groups-scope.jwt");
    let demo = read("demo.jwt");
    assert_eq!(
        call(
            &mesh,
            &agent,
            &sleep,
            "/",
            &[("authorization", &format!("Bearer {with_groups}"))]
        )
        .await
        .status,
        200
    );
    // Valid, but without the group: authenticated, then denied.
    assert_eq!(
        call(
            &mesh,
            &agent,
            &sleep,
            "/",
            &[("authorization", &format!("Bearer {demo}"))]
        )
        .await
        .status,
        403
    );
    // A token from Istio's other sample issuer is not one this workload accepts.
    let other = read("token-issuer1.jwt");
    assert_eq!(
        call(
            &mesh,
            &agent,
            &sleep,
            "/",
            &[("authorization", &format!("Bearer {other}"))]
        )
        .await
        .status,
        401
    );
}

#[test]
fn check_evaluates_a_token() {
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/istio-jwt");
    let jwks = std::fs::read_to_string(fixtures.join("istio-demo-jwks.json")).unwrap();
    let mesh = Mesh::new();
    mesh.policy(
        "jwt.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: demo, namespace: legacy}}\nspec:\n  jwtRules:\n  - issuer: testing@secure.istio.io\n    jwks: '{}'\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: need-jwt, namespace: legacy}}\nspec:\n  rules:\n  - from: [{{source: {{requestPrincipals: [\"*\"]}}}}]\n",
            jwks.trim()
        ),
    );
    let cfg = mesh.dir().join("agent.yaml");
    std::fs::write(
        &cfg,
        mesh.config(&[("web", "127.0.0.1:5000".parse().unwrap(), "http")], ""),
    )
    .unwrap();
    let run = |token: &str| {
        let out = std::process::Command::new(BIN)
            .args([
                "check",
                "--from",
                "cluster.local/ns/default/sa/sleep",
                "--config",
            ])
            .arg(&cfg)
            .arg("--jwt")
            .arg(fixtures.join(token))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run("demo.jwt");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("request principal testing@secure.istio.io/testing@secure.istio.io"),
        "{out}"
    );
    let (code, out) = run("token-issuer1.jwt");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("401 Jwt verification fails"), "{out}");
}

/// A forward proxy on loopback that answers `CONNECT`, as a corporate proxy does: it resolves
/// `idp.corp.test` (which nothing else resolves) to 127.0.0.1 and records each target.
async fn start_connect_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if s.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                log.lock().unwrap().push(line.clone());
                let target = line.split_whitespace().nth(1).unwrap_or_default();
                let Some(port) = target.strip_prefix("idp.corp.test:") else {
                    let _ = s.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").await;
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}")).await
                else {
                    let _ = s.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = s
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
            });
        }
    });
    (addr, seen)
}

/// Corporate Windows networks reach Azure AD only through a forward proxy: OpenID discovery
/// and the JWKS are fetched through `HTTPS_PROXY` (a CONNECT tunnel, TLS end to end with the
/// issuer), and `NO_PROXY` sends them direct, as Go's `http.ProxyFromEnvironment` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_fetches_honour_https_proxy_and_no_proxy() {
    let (proxy, seen) = start_connect_proxy().await;
    for no_proxy in ["", "localhost,.corp.test"] {
        let mesh = Mesh::new();
        let issuer = Issuer::new();
        serve_issuer_as(&mesh.pki, issuer.clone(), "idp.corp.test").await;
        let iss = issuer.iss();
        mesh.policy("pa.yaml", MESH_STRICT);
        mesh.policy(
            "jwt.yaml",
            &format!(
                "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: corp, namespace: legacy}}\nspec:\n  jwtRules:\n  - issuer: \"{iss}\"\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: need-jwt, namespace: legacy}}\nspec:\n  rules:\n  - from: [{{source: {{requestPrincipals: [\"*\"]}}}}]\n"
            ),
        );
        let cfg = mesh.config(
            &[("web", start_echo().await, "http")],
            &format!(
                "jwt:\n  caBundle: {}\n",
                mesh.pki.path().join("ca/root-cert.pem").display()
            ),
        );
        let agent = AgentProc::start_with(
            mesh.dir(),
            &cfg,
            &[
                ("HTTPS_PROXY", &format!("http://{proxy}")),
                ("NO_PROXY", no_proxy),
            ],
        );
        let sleep = mesh.pki.issue("default", "sleep");
        let t = issuer.token("ES256", issuer.claims("alice"));
        let got = call(
            &mesh,
            &agent,
            &sleep,
            "/",
            &[("authorization", &format!("Bearer {t}"))],
        )
        .await;
        let through: Vec<String> = seen.lock().unwrap().drain(..).collect();
        if no_proxy.is_empty() {
            assert_eq!(got.status, 200, "{}", got.text());
            assert!(
                through
                    .iter()
                    .all(|l| l.starts_with("CONNECT idp.corp.test:"))
                    && through.len() >= 2,
                "discovery and JWKS through the proxy: {through:?}"
            );
        } else {
            // Direct: idp.corp.test does not resolve, so no keys and the token is refused.
            assert_eq!(got.status, 401, "{}", got.text());
            assert!(
                through.is_empty(),
                "NO_PROXY must bypass the proxy: {through:?}"
            );
            agent.wait_for_log("idp.corp.test");
        }
    }
}
