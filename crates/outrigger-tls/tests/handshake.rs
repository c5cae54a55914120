//! Real mTLS handshakes over TCP on 127.0.0.1 between tokio-rustls peers, with certificates from
//! the built-in CA: what the server accepts and refuses, what the client pins.

mod common;

use common::*;
use outrigger_identity::{Identity, TrustDomains};
use outrigger_tls::rustls::ProtocolVersion;
use outrigger_tls::{
    ISTIO_ALPNS, cert_sha256_hex, client_config, peer_identity, server_config, with_peer_exchange,
};

/// Good mTLS in both directions: each side sees the other's SPIFFE identity.
#[tokio::test]
async fn mutual_tls_both_sides_see_identities() {
    let ca = ca();
    let server_certs = workload(&ca, "prod", "server");
    let client_certs = workload(&ca, "prod", "client");
    let server_cfg = server_config(&server_certs, &trust(), ISTIO_ALPNS).unwrap();
    let (addr, mut outcomes) = echo_server(move || server_cfg.clone()).await;

    let client_cfg = client_config(
        &client_certs,
        &trust(),
        &[id("prod", "server")],
        &[b"istio-http/1.1"],
    )
    .unwrap();
    let tls = connect(client_cfg, addr, "server.prod.svc.cluster.local")
        .await
        .unwrap();

    let accepted = next_outcome(&mut outcomes).await.unwrap();
    assert_eq!(accepted.peer, id("prod", "client"));
    assert_eq!(accepted.peer_leaf, *client_certs.leaf());
    assert_eq!(accepted.alpn.as_deref(), Some(&b"istio-http/1.1"[..]));
    assert_eq!(accepted.version, ProtocolVersion::TLSv1_3);

    let (_, conn) = tls.get_ref();
    assert_eq!(
        peer_identity(conn.peer_certificates().unwrap()).unwrap(),
        id("prod", "server")
    );
    assert_eq!(conn.alpn_protocol(), Some(&b"istio-http/1.1"[..]));
    assert_eq!(server_leaf(&tls), *server_certs.leaf());
}

/// The server picks from its own list in order; `h2` is chosen when that is what the client
/// offers, and Istio's TCP ALPN wins over plain HTTP ones when both are offered. With
/// [`ISTIO_ALPNS`] (a listener that only carries HTTP) a sidecar's TCP offer gets `istio`, as
/// a sidecar's HTTP filter chain (`ALPNHttp`: `h2`, `http/1.1`) never selects
/// `istio-peer-exchange`; with `with_peer_exchange(ISTIO_ALPNS)` (a TCP or `auto` listener) it
/// gets `istio-peer-exchange`, as the TCP chain does (istio/istio `pilot/pkg/security/authn/
/// utils/utils.go`, `BuildInboundTLS`: `ALPNDownstreamWithMxc`), and HTTP offers still get
/// their HTTP value.
#[tokio::test]
async fn alpn_negotiation() {
    let ca = ca();
    let tcp_alpns = with_peer_exchange(&ISTIO_ALPNS.iter().map(|a| a.to_vec()).collect::<Vec<_>>());
    let tcp_alpns: Vec<&[u8]> = tcp_alpns.iter().map(Vec::as_slice).collect();
    for (server_alpns, peer_exchange) in [
        (ISTIO_ALPNS, b"istio" as &[u8]),
        (&tcp_alpns[..], b"istio-peer-exchange"),
    ] {
        let server_cfg = server_config(&workload(&ca, "a", "srv"), &trust(), server_alpns).unwrap();
        let (addr, mut outcomes) = echo_server(move || server_cfg.clone()).await;
        let client_certs = workload(&ca, "a", "cli");

        for (offer, chosen) in [
            (vec![&b"h2"[..], b"http/1.1"], &b"h2"[..]),
            (vec![&b"http/1.1"[..]], b"http/1.1"),
            (vec![&b"istio-h2"[..], b"h2"], b"istio-h2"),
            // The protocol-specific value wins over the generic `istio`.
            (vec![&b"istio"[..], b"istio-http/1.1"], b"istio-http/1.1"),
            (
                vec![&b"istio-http/1.1"[..], b"istio", b"http/1.1"],
                b"istio-http/1.1",
            ),
            // A sidecar's TCP offer (`ALPNInMeshWithMxc`).
            (vec![&b"istio-peer-exchange"[..], b"istio"], peer_exchange),
            // A sidecar with `PILOT_DISABLE_MX_ALPN` (`ALPNInMesh`).
            (vec![&b"istio"[..]], b"istio"),
        ] {
            let cfg = client_config(&client_certs, &trust(), &[], &offer).unwrap();
            let tls = connect(cfg, addr, "srv").await.unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(chosen), "{offer:?}");
            let accepted = next_outcome(&mut outcomes).await.unwrap();
            assert_eq!(accepted.alpn.as_deref(), Some(chosen));
        }

        // No ALPN offered at all is fine (plain TLS clients).
        let cfg = client_config(&client_certs, &trust(), &[], &[]).unwrap();
        connect(cfg, addr, "srv").await.unwrap();
        assert_eq!(next_outcome(&mut outcomes).await.unwrap().alpn, None);
    }
}

/// TLS 1.2 and 1.3 both complete with a verified client certificate on our server, and our
/// client verifies a TLS 1.2 server (exercising the TLS 1.2 signature path of its verifier).
#[tokio::test]
async fn tls12_and_tls13_both_work() {
    let ca = ca();
    let server_cfg = server_config(&workload(&ca, "a", "srv"), &trust(), ISTIO_ALPNS).unwrap();
    let (addr, mut outcomes) = echo_server(move || server_cfg.clone()).await;
    let client_issued = ca
        .issue(&id("a", "cli"), std::time::Duration::from_secs(600))
        .unwrap();

    for (versions, expected) in [
        (tls12(), ProtocolVersion::TLSv1_2),
        (tls13(), ProtocolVersion::TLSv1_3),
    ] {
        let cfg = raw_client(Some(&client_issued), versions, &[b"istio"]);
        let tls = connect(cfg, addr, "srv").await.unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expected));
        let accepted = next_outcome(&mut outcomes).await.unwrap();
        assert_eq!(accepted.version, expected);
        assert_eq!(accepted.peer, id("a", "cli"));
    }

    // Our client against a TLS 1.2-only server.
    let server_issued = ca
        .issue(&id("a", "srv12"), std::time::Duration::from_secs(600))
        .unwrap();
    let addr12 = plain_echo_server(raw_server(&server_issued, tls12())).await;
    let cfg = client_config(
        &certs_of(&client_issued),
        &trust(),
        &[id("a", "srv12")],
        &[],
    )
    .unwrap();
    let tls = connect(cfg, addr12, "srv").await.unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(ProtocolVersion::TLSv1_2)
    );
}

/// Connects with `client` and returns the server's reason for refusing it; also checks that
/// the client could not exchange data.
async fn server_refusal(client: outrigger_tls::rustls::ClientConfig) -> String {
    let ca = ca();
    refusal_by(&ca, &trust(), client).await
}

async fn refusal_by(
    server_ca: &outrigger_tls::ca::BuiltinCa,
    trust: &TrustDomains,
    client: outrigger_tls::rustls::ClientConfig,
) -> String {
    let server_cfg = server_config(&workload(server_ca, "a", "srv"), trust, ISTIO_ALPNS).unwrap();
    let (addr, mut outcomes) = echo_server(move || server_cfg.clone()).await;
    let client_result = connect(std::sync::Arc::new(client), addr, "srv").await;
    assert!(client_result.is_err(), "the client must not get through");
    let reason = next_outcome(&mut outcomes)
        .await
        .expect_err("the server must refuse");
    assert!(
        !reason.contains(ACCEPTED_WITHOUT_IDENTITY),
        "the verifier must refuse during the handshake: {reason}"
    );
    reason
}

fn client_with(
    issued: Option<&outrigger_tls::ca::IssuedCert>,
) -> outrigger_tls::rustls::ClientConfig {
    (*raw_client(issued, tls13(), &[b"istio"])).clone()
}

#[tokio::test]
async fn refuses_client_from_untrusted_ca() {
    // A CA with another name: webpki finds no issuer at all.
    let other_ca = outrigger_tls::ca::BuiltinCa::generate("other.mesh").unwrap();
    let issued = issue_raw(&other_ca, &["spiffe://cluster.local/ns/a/sa/cli"], -60, 600);
    let reason = server_refusal(client_with(Some(&issued))).await;
    assert!(reason.contains("not signed by a trusted CA"), "{reason}");

    // Another mesh's CA with the same name (`O=cluster.local`, Istio's default trust domain)
    // but its own key: the issuer name matches a trusted root, the signature does not.
    let same_name_ca = ca();
    let issued = same_name_ca
        .issue(&id("a", "cli"), std::time::Duration::from_secs(600))
        .unwrap();
    let reason = server_refusal(client_with(Some(&issued))).await;
    assert!(
        reason.contains("signature does not verify") && reason.contains("same"),
        "{reason}"
    );
}

#[tokio::test]
async fn refuses_expired_client_certificate() {
    let ca = ca();
    let issued = issue_raw(&ca, &["spiffe://cluster.local/ns/a/sa/cli"], -7200, -3600);
    let reason = refusal_by(&ca, &trust(), client_with(Some(&issued))).await;
    assert!(reason.contains("certificate expired at"), "{reason}");
}

#[tokio::test]
async fn refuses_not_yet_valid_client_certificate() {
    let ca = ca();
    let issued = issue_raw(&ca, &["spiffe://cluster.local/ns/a/sa/cli"], 3600, 7200);
    let reason = refusal_by(&ca, &trust(), client_with(Some(&issued))).await;
    assert!(reason.contains("not valid before"), "{reason}");
}

#[tokio::test]
async fn refuses_client_without_certificate_tls13_and_tls12() {
    for versions in [tls13(), tls12()] {
        let ca = ca();
        let client = (*raw_client(None, versions, &[b"istio"])).clone();
        let reason = refusal_by(&ca, &trust(), client).await;
        assert!(reason.contains("presented no certificate"), "{reason}");
    }
}

#[tokio::test]
async fn refuses_client_without_spiffe_san() {
    let ca = ca();
    for uris in [&[][..], &["https://example.com/not-spiffe"][..]] {
        let issued = issue_raw(&ca, uris, -60, 3600);
        let reason = refusal_by(&ca, &trust(), client_with(Some(&issued))).await;
        assert!(reason.contains("no SPIFFE URI SAN"), "{reason}");
    }
}

#[tokio::test]
async fn refuses_client_with_two_spiffe_sans() {
    let ca = ca();
    let issued = issue_raw(
        &ca,
        &[
            "spiffe://cluster.local/ns/a/sa/one",
            "spiffe://cluster.local/ns/a/sa/two",
        ],
        -60,
        3600,
    );
    let reason = refusal_by(&ca, &trust(), client_with(Some(&issued))).await;
    assert!(reason.contains("2 SPIFFE URI SANs"), "{reason}");
}

#[tokio::test]
async fn refuses_client_from_foreign_trust_domain() {
    let ca = ca();
    let issued = issue_raw(&ca, &["spiffe://evil.local/ns/a/sa/cli"], -60, 3600);
    let reason = refusal_by(&ca, &trust(), client_with(Some(&issued))).await;
    assert!(
        reason.contains("`evil.local` is not trusted") && reason.contains("cluster.local"),
        "{reason}"
    );
}

/// `meshConfig.trustDomainAliases`: a peer of an alias trust domain is accepted, under its own
/// identity.
#[tokio::test]
async fn accepts_client_from_trust_domain_alias() {
    let ca = ca();
    let trust = TrustDomains::new(TD, &["old.local".into()]).unwrap();
    let server_cfg = server_config(&workload(&ca, "a", "srv"), &trust, ISTIO_ALPNS).unwrap();
    let (addr, mut outcomes) = echo_server(move || server_cfg.clone()).await;
    let issued = issue_raw(&ca, &["spiffe://old.local/ns/a/sa/cli"], -60, 3600);
    connect(raw_client(Some(&issued), tls13(), &[]), addr, "srv")
        .await
        .unwrap();
    let accepted = next_outcome(&mut outcomes).await.unwrap();
    assert_eq!(
        accepted.peer,
        "spiffe://old.local/ns/a/sa/cli"
            .parse::<Identity>()
            .unwrap()
    );
}

/// Our client against servers presenting various certificates; returns the client's error.
async fn client_refusal(
    server_cert: &outrigger_tls::ca::IssuedCert,
    client_ca: &outrigger_tls::ca::BuiltinCa,
    trust: &TrustDomains,
    expected: &[Identity],
) -> Result<(), String> {
    let addr = plain_echo_server(raw_server(server_cert, tls13())).await;
    let cfg = client_config(&workload(client_ca, "a", "cli"), trust, expected, &[]).unwrap();
    connect(cfg, addr, "srv").await.map(|_| ())
}

#[tokio::test]
async fn client_pins_server_identity_and_names_both_on_mismatch() {
    let ca = ca();
    let server = ca
        .issue(&id("a", "impostor"), std::time::Duration::from_secs(600))
        .unwrap();
    let err = client_refusal(&server, &ca, &trust(), &[id("a", "real")])
        .await
        .unwrap_err();
    assert!(
        err.contains("spiffe://cluster.local/ns/a/sa/impostor")
            && err.contains("spiffe://cluster.local/ns/a/sa/real"),
        "{err}"
    );

    // One of several expected identities is enough; none expected = any trusted identity.
    client_refusal(
        &server,
        &ca,
        &trust(),
        &[id("a", "real"), id("a", "impostor")],
    )
    .await
    .unwrap();
    client_refusal(&server, &ca, &trust(), &[]).await.unwrap();
}

#[tokio::test]
async fn client_refuses_untrusted_expired_and_non_spiffe_servers() {
    let ca = ca();
    let other = outrigger_tls::ca::BuiltinCa::generate("other.mesh").unwrap();
    let untrusted = issue_raw(&other, &["spiffe://cluster.local/ns/a/sa/srv"], -60, 600);
    let err = client_refusal(&untrusted, &ca, &trust(), &[])
        .await
        .unwrap_err();
    assert!(err.contains("not signed by a trusted CA"), "{err}");

    let same_name = common::ca()
        .issue(&id("a", "srv"), std::time::Duration::from_secs(600))
        .unwrap();
    let err = client_refusal(&same_name, &ca, &trust(), &[])
        .await
        .unwrap_err();
    assert!(err.contains("signature does not verify"), "{err}");

    let expired = issue_raw(&ca, &["spiffe://cluster.local/ns/a/sa/srv"], -7200, -3600);
    let err = client_refusal(&expired, &ca, &trust(), &[])
        .await
        .unwrap_err();
    assert!(err.contains("expired"), "{err}");

    let no_san = issue_raw(&ca, &[], -60, 3600);
    let err = client_refusal(&no_san, &ca, &trust(), &[])
        .await
        .unwrap_err();
    assert!(err.contains("no SPIFFE URI SAN"), "{err}");

    let foreign = issue_raw(&ca, &["spiffe://evil.local/ns/a/sa/srv"], -60, 3600);
    let err = client_refusal(&foreign, &ca, &trust(), &[])
        .await
        .unwrap_err();
    assert!(err.contains("`evil.local` is not trusted"), "{err}");
}

/// A pinned identity is satisfied by the same workload under a trust-domain alias (Istio's
/// `ExpandWithTrustDomains`), but only when the alias is configured.
#[tokio::test]
async fn client_pin_honours_trust_domain_aliases() {
    let ca = ca();
    let server = issue_raw(&ca, &["spiffe://old.local/ns/a/sa/srv"], -60, 3600);
    let with_alias = TrustDomains::new(TD, &["old.local".into()]).unwrap();
    client_refusal(&server, &ca, &with_alias, &[id("a", "srv")])
        .await
        .unwrap();
    let err = client_refusal(&server, &ca, &trust(), &[id("a", "srv")])
        .await
        .unwrap_err();
    assert!(err.contains("`old.local` is not trusted"), "{err}");
}

/// The SNI Istio clients send (`outbound_.<port>_._.<fqdn>`) is accepted by rustls as a server
/// name, reaches the server, and plays no part in verification (the certificate has no DNS SAN).
#[tokio::test]
async fn istio_sni_is_sent_but_not_verified() {
    let ca = ca();
    let server_cfg = server_config(&workload(&ca, "a", "srv"), &trust(), ISTIO_ALPNS).unwrap();
    let (addr, mut outcomes) = echo_server(move || server_cfg.clone()).await;
    let cfg = client_config(
        &workload(&ca, "a", "cli"),
        &trust(),
        &[id("a", "srv")],
        &[b"istio"],
    )
    .unwrap();
    let sni = "outbound_.8080_._.srv.a.svc.cluster.local";
    connect(cfg, addr, sni).await.unwrap();
    let accepted = next_outcome(&mut outcomes).await.unwrap();
    assert_eq!(accepted.sni.as_deref(), Some(sni));
}

/// `cert_sha256_hex` of the certificate the server saw equals the hash of the client's leaf
/// (what goes into `x-forwarded-client-cert: Hash=`).
#[tokio::test]
async fn peer_certificate_hash() {
    let ca = ca();
    let client_certs = workload(&ca, "a", "cli");
    let server_cfg = server_config(&workload(&ca, "a", "srv"), &trust(), ISTIO_ALPNS).unwrap();
    let (addr, mut outcomes) = echo_server(move || server_cfg.clone()).await;
    let cfg = client_config(&client_certs, &trust(), &[], &[]).unwrap();
    connect(cfg, addr, "srv").await.unwrap();
    let accepted = next_outcome(&mut outcomes).await.unwrap();
    let hash = cert_sha256_hex(&accepted.peer_leaf);
    assert_eq!(hash, cert_sha256_hex(client_certs.leaf()));
    assert_eq!(hash.len(), 64);
    assert!(
        hash.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
}

/// A resumed session (our client keeps a session cache per config) still yields the client's
/// verified identity on the server, under both TLS versions.
#[tokio::test]
async fn resumed_sessions_keep_the_peer_identity() {
    use outrigger_tls::rustls::HandshakeKind;
    let ca = ca();
    let server_cfg = server_config(&workload(&ca, "a", "srv"), &trust(), ISTIO_ALPNS).unwrap();
    let (addr, mut outcomes) = echo_server(move || server_cfg.clone()).await;
    let client_certs = workload(&ca, "a", "cli");
    let cfg = client_config(&client_certs, &trust(), &[id("a", "srv")], &[b"istio"]).unwrap();
    let first = connect(cfg.clone(), addr, "srv").await.unwrap();
    assert_eq!(
        first.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Full)
    );
    assert_eq!(
        next_outcome(&mut outcomes).await.unwrap().peer,
        id("a", "cli")
    );
    let second = connect(cfg, addr, "srv").await.unwrap();
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed)
    );
    let accepted = next_outcome(&mut outcomes).await.unwrap();
    assert_eq!(accepted.peer, id("a", "cli"));
    assert_eq!(accepted.peer_leaf, *client_certs.leaf());
    // And the client still knows the server's identity on the resumed session.
    assert_eq!(
        peer_identity(second.get_ref().1.peer_certificates().unwrap()).unwrap(),
        id("a", "srv")
    );
}
