//! `CertStore`: loading, rotation from files and from the built-in CA, with real handshakes
//! showing that new connections get the new certificate and open ones keep working.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use outrigger_tls::ca::{BuiltinCa, IssuedCert};
use outrigger_tls::{CertSource, CertStore, ISTIO_ALPNS, RotationEvent, TlsError, client_config};

const TICK: Duration = Duration::from_millis(50);

fn alpn() -> Vec<Vec<u8>> {
    ISTIO_ALPNS.iter().map(|p| p.to_vec()).collect()
}

fn files_source(dir: &Path) -> CertSource {
    let (chain, key, roots) = IssuedCert::paths_in(dir);
    CertSource::Files { chain, key, roots }
}

async fn wait_generation(store: &CertStore, generation: u64) {
    let mut rx = store.subscribe();
    tokio::time::timeout(TIMEOUT, rx.wait_for(|g| *g >= generation))
        .await
        .expect("no rotation in time")
        .unwrap();
}

/// A few poll intervals during which nothing may change.
async fn let_ticks_pass() {
    tokio::time::sleep(TICK * 6).await;
}

#[tokio::test]
async fn file_rotation_serves_new_cert_and_keeps_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let first = ca
        .issue(&id("a", "srv"), Duration::from_secs(3600))
        .unwrap();
    first.write_to(dir.path()).unwrap();

    let store = CertStore::new(files_source(dir.path()), trust(), alpn()).unwrap();
    assert_eq!(store.generation(), 0);
    assert_eq!(store.certs().identity(), &id("a", "srv"));
    let refresh = store.spawn_refresh(TICK);

    let serving = store.clone();
    let (addr, mut outcomes) = echo_server(move || serving.server_config()).await;
    let client = client_config(
        &workload(&ca, "a", "cli"),
        &trust(),
        &[id("a", "srv")],
        &[b"istio"],
    )
    .unwrap();

    let mut old_conn = connect(client.clone(), addr, "srv").await.unwrap();
    next_outcome(&mut outcomes).await.unwrap();
    let first_leaf = server_leaf(&old_conn);
    assert_eq!(first_leaf, *store.certs().leaf());

    // Nothing changes while the files do not.
    let_ticks_pass().await;
    assert_eq!(store.generation(), 0);

    // Rotate: same identity, new key and certificate.
    let second = ca
        .issue(&id("a", "srv"), Duration::from_secs(7200))
        .unwrap();
    second.write_to(dir.path()).unwrap();
    wait_generation(&store, 1).await;
    let second_leaf = store.certs().leaf().clone();
    assert_ne!(second_leaf, first_leaf);

    let mut new_conn = connect(client.clone(), addr, "srv").await.unwrap();
    next_outcome(&mut outcomes).await.unwrap();
    assert_eq!(server_leaf(&new_conn), second_leaf);

    // The connection opened before the rotation still works, on its original session.
    ping(&mut old_conn).await.unwrap();
    assert_eq!(server_leaf(&old_conn), first_leaf);
    ping(&mut new_conn).await.unwrap();

    // The TCP listeners' config (`istio-peer-exchange` first) follows the rotation too.
    let mx_store = store.clone();
    let (mx_addr, mut mx_outcomes) =
        echo_server(move || mx_store.server_config_peer_exchange()).await;
    let tcp_client = client_config(
        &workload(&ca, "a", "cli"),
        &trust(),
        &[id("a", "srv")],
        &[b"istio-peer-exchange", b"istio"],
    )
    .unwrap();
    let mx_conn = connect(tcp_client.clone(), mx_addr, "srv").await.unwrap();
    next_outcome(&mut mx_outcomes).await.unwrap();
    assert_eq!(server_leaf(&mx_conn), second_leaf);
    assert_eq!(
        mx_conn.get_ref().1.alpn_protocol(),
        Some(&b"istio-peer-exchange"[..])
    );
    // The plain config still answers the same offer with `istio`.
    let plain = connect(tcp_client, addr, "srv").await.unwrap();
    next_outcome(&mut outcomes).await.unwrap();
    assert_eq!(plain.get_ref().1.alpn_protocol(), Some(&b"istio"[..]));

    refresh.abort();
}

#[tokio::test]
async fn invalid_or_half_written_files_keep_the_old_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let first = ca
        .issue(&id("a", "srv"), Duration::from_secs(3600))
        .unwrap();
    first.write_to(dir.path()).unwrap();
    let (chain, key, _) = IssuedCert::paths_in(dir.path());

    let store = CertStore::new(files_source(dir.path()), trust(), alpn()).unwrap();
    let refresh = store.spawn_refresh(TICK);
    let serving = store.clone();
    let (addr, mut outcomes) = echo_server(move || serving.server_config()).await;
    let client = client_config(&workload(&ca, "a", "cli"), &trust(), &[], &[]).unwrap();
    let first_leaf = store.certs().leaf().clone();

    // Half a rotation: the new key is there, the chain is still the old one.
    let second = ca
        .issue(&id("a", "srv"), Duration::from_secs(3600))
        .unwrap();
    std::fs::write(&key, &second.key_pem).unwrap();
    let_ticks_pass().await;
    assert_eq!(store.generation(), 0);
    let err = store.reload().unwrap_err().to_string();
    assert!(err.contains("does not match"), "{err}");
    let conn = connect(client.clone(), addr, "srv").await.unwrap();
    next_outcome(&mut outcomes).await.unwrap();
    assert_eq!(
        server_leaf(&conn),
        first_leaf,
        "old credentials still served"
    );

    // Garbage chain.
    std::fs::write(&chain, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    let_ticks_pass().await;
    assert_eq!(store.generation(), 0);
    assert!(matches!(store.reload(), Err(TlsError::Invalid { .. })));

    // The file vanishes (a deploy tool deleting before writing).
    std::fs::remove_file(&chain).unwrap();
    let_ticks_pass().await;
    assert_eq!(store.generation(), 0);
    let err = store.reload().unwrap_err().to_string();
    assert!(
        err.contains("cannot read") && err.contains("cert-chain.pem"),
        "{err}"
    );
    let conn = connect(client.clone(), addr, "srv").await.unwrap();
    next_outcome(&mut outcomes).await.unwrap();
    assert_eq!(server_leaf(&conn), first_leaf);

    // The rest of the rotation lands: picked up on the next tick.
    std::fs::write(&chain, &second.cert_chain_pem).unwrap();
    wait_generation(&store, 1).await;
    let conn = connect(client, addr, "srv").await.unwrap();
    next_outcome(&mut outcomes).await.unwrap();
    assert_ne!(server_leaf(&conn), first_leaf);
    assert_eq!(server_leaf(&conn), *store.certs().leaf());

    refresh.abort();
}

#[tokio::test]
async fn reload_reports_whether_anything_changed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    ca.issue(&id("a", "srv"), Duration::from_secs(3600))
        .unwrap()
        .write_to(dir.path())
        .unwrap();
    let store = CertStore::new(files_source(dir.path()), trust(), alpn()).unwrap();
    assert!(!store.reload().unwrap());
    let mut rx = store.subscribe();
    ca.issue(&id("a", "srv"), Duration::from_secs(3600))
        .unwrap()
        .write_to(dir.path())
        .unwrap();
    assert!(store.reload().unwrap());
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 1);
    assert!(!store.reload().unwrap());
    assert_eq!(store.generation(), 1);
}

#[test]
fn new_refuses_to_start_with_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = CertStore::new(files_source(dir.path()), trust(), alpn()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("cert-chain.pem") && msg.contains("cannot read"),
        "{msg}"
    );

    // A certificate of a trust domain we do not trust is still loaded (it is ours; peers decide),
    // but the identity must be SPIFFE.
    issue_raw(&ca(), &[], -60, 3600)
        .write_to(dir.path())
        .unwrap();
    let msg = CertStore::new(files_source(dir.path()), trust(), alpn())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no SPIFFE URI SAN"), "{msg}");
}

#[tokio::test]
async fn builtin_source_reissues_at_half_life() {
    let dir = tempfile::tempdir().unwrap();
    BuiltinCa::init(dir.path(), "cluster.local").unwrap();
    let source = CertSource::Builtin {
        ca_dir: dir.path().to_path_buf(),
        identity: id("a", "srv"),
        ttl: Duration::from_secs(3),
    };
    let store = CertStore::new(source, trust(), alpn()).unwrap();
    let first = store.certs();
    assert_eq!(first.identity(), &id("a", "srv"));
    let refresh = store.spawn_refresh(Duration::from_millis(100));

    // Half of a 3 s lifetime: not after 0.5 s, but within a few seconds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(store.generation(), 0);
    wait_generation(&store, 1).await;
    let second = store.certs();
    assert_ne!(second.leaf(), first.leaf());
    assert!(second.not_after() > first.not_after());

    // New handshakes present the re-issued certificate.
    let serving = store.clone();
    let (addr, mut outcomes) = echo_server(move || serving.server_config()).await;
    let ca = BuiltinCa::load(dir.path()).unwrap();
    let client =
        client_config(&workload(&ca, "a", "cli"), &trust(), &[id("a", "srv")], &[]).unwrap();
    let conn = connect(client, addr, "srv").await.unwrap();
    next_outcome(&mut outcomes).await.unwrap();
    let served = server_leaf(&conn);
    assert!(served == *second.leaf() || store.generation() > 1);

    refresh.abort();
}

#[test]
fn builtin_source_refuses_foreign_identity_and_missing_ca() {
    let dir = tempfile::tempdir().unwrap();
    let missing = CertStore::new(
        CertSource::Builtin {
            ca_dir: dir.path().join("nope"),
            identity: id("a", "srv"),
            ttl: Duration::from_secs(3600),
        },
        trust(),
        alpn(),
    )
    .unwrap_err()
    .to_string();
    assert!(missing.contains("root-cert.pem"), "{missing}");

    BuiltinCa::init(dir.path(), "cluster.local").unwrap();
    let err = CertStore::new(
        CertSource::Builtin {
            ca_dir: dir.path().to_path_buf(),
            identity: "spiffe://evil.local/ns/a/sa/b".parse().unwrap(),
            ttl: Duration::from_secs(3600),
        },
        trust(),
        alpn(),
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::ForeignIdentity { .. }), "{err}");
}

/// The refresh task ends on its own once the last store clone is gone.
#[tokio::test]
async fn refresh_task_stops_when_store_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    ca().issue(&id("a", "srv"), Duration::from_secs(3600))
        .unwrap()
        .write_to(dir.path())
        .unwrap();
    let store = CertStore::new(files_source(dir.path()), trust(), alpn()).unwrap();
    let handle = store.spawn_refresh(TICK);
    let_ticks_pass().await;
    assert!(!handle.is_finished());
    drop(store);
    tokio::time::timeout(TIMEOUT, handle)
        .await
        .expect("refresh task still running after the store was dropped")
        .unwrap();
}

/// Polls `cond` until it holds (fails after [`TIMEOUT`]).
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Issue 13: replacing the files with a certificate for another SPIFFE ID was accepted
/// silently at rotation while start-up refused the same files. Rotation now runs the start-up
/// checks (one function): identity, key match, chain to the trust bundle, validity. Each
/// failing set is refused with its reason, counted once, and the old certificate stays in
/// service, as a real TLS client sees; a good rotation still applies.
#[tokio::test]
async fn rotation_refuses_every_set_that_start_up_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let first = ca
        .issue(&id("a", "srv"), Duration::from_secs(3600))
        .unwrap();
    first.write_to(dir.path()).unwrap();

    // No expected identity given: the identity loaded at start is the one rotations must keep.
    let store = CertStore::new(files_source(dir.path()), trust(), alpn()).unwrap();
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = events.clone();
    store.set_observer(move |e| {
        seen.lock().unwrap().push(match e {
            RotationEvent::Rotated { identity } => format!("rotated {identity}"),
            RotationEvent::Refused { reason, .. } => format!("refused {reason}"),
        })
    });
    let refresh = store.spawn_refresh(TICK);
    let serving = store.clone();
    let (addr, mut outcomes) = echo_server(move || serving.server_config()).await;
    // The client pins nothing, so that it sees whatever identity the server presents.
    let client = client_config(&workload(&ca, "a", "cli"), &trust(), &[], &[]).unwrap();
    let first_leaf = store.certs().leaf().clone();

    let uri = "spiffe://cluster.local/ns/a/sa/srv";
    let other = ca
        .issue(&id("a", "other"), Duration::from_secs(3600))
        .unwrap();
    let mismatched_key = {
        let a = ca
            .issue(&id("a", "srv"), Duration::from_secs(3600))
            .unwrap();
        let b = ca
            .issue(&id("a", "srv"), Duration::from_secs(3600))
            .unwrap();
        IssuedCert {
            key_pem: b.key_pem,
            ..a
        }
    };
    let expired = issue_raw(&ca, &[uri], -7200, -60);
    let future = issue_raw(&ca, &[uri], 86_400, 172_800);
    let rogue = {
        let mut r = BuiltinCa::generate(TD)
            .unwrap()
            .issue(&id("a", "srv"), Duration::from_secs(3600))
            .unwrap();
        // Keep our trust bundle: the chain does not verify to it.
        r.root_cert_pem = first.root_cert_pem.clone();
        r
    };
    let cases = [
        (&other, "identity_mismatch", "ns/a/sa/other"),
        (&mismatched_key, "key_mismatch", "does not match"),
        (&expired, "expired", "expired"),
        (&future, "not_yet_valid", "not valid until"),
        (&rogue, "untrusted_chain", "does not verify"),
    ];
    for (n, (bad, reason, says)) in cases.into_iter().enumerate() {
        bad.write_to(dir.path()).unwrap();
        let want = n as u64 + 1;
        wait_until(reason, || store.status().refusals == want).await;
        let st = store.status();
        let refusal = st.last_refusal.expect("a refusal is recorded");
        assert_eq!(refusal.reason, reason, "{}", refusal.error);
        assert!(refusal.error.contains(says), "{reason}: {}", refusal.error);
        assert_eq!(store.generation(), 0, "{reason}");

        // The old certificate is still what peers get.
        let conn = connect(client.clone(), addr, "srv").await.unwrap();
        next_outcome(&mut outcomes).await.unwrap();
        assert_eq!(server_leaf(&conn), first_leaf, "{reason}");
        assert_eq!(
            outrigger_tls::peer_identity(&[server_leaf(&conn)]).unwrap(),
            id("a", "srv")
        );

        // Start-up refuses the same files for the same reason.
        let at_start =
            CertStore::with_identity(files_source(dir.path()), trust(), alpn(), id("a", "srv"))
                .unwrap_err();
        assert_eq!(at_start.refusal_reason(), reason, "{at_start}");

        // Refused once, not on every poll.
        let_ticks_pass().await;
        assert_eq!(store.status().refusals, want, "{reason}");
    }
    assert_eq!(
        *events.lock().unwrap(),
        [
            "refused identity_mismatch",
            "refused key_mismatch",
            "refused expired",
            "refused not_yet_valid",
            "refused untrusted_chain"
        ]
    );

    // A good set still rotates.
    let second = ca
        .issue(&id("a", "srv"), Duration::from_secs(7200))
        .unwrap();
    second.write_to(dir.path()).unwrap();
    wait_generation(&store, 1).await;
    let conn = connect(client, addr, "srv").await.unwrap();
    next_outcome(&mut outcomes).await.unwrap();
    assert_ne!(server_leaf(&conn), first_leaf);
    assert_eq!(server_leaf(&conn), *store.certs().leaf());
    let st = store.status();
    assert!(st.last_refusal.is_none(), "{st:?}");
    assert_eq!(
        events.lock().unwrap().last().unwrap(),
        "rotated spiffe://cluster.local/ns/a/sa/srv"
    );
    refresh.abort();
}

/// A chain and key rewritten in place (truncate, then write; the key before the chain) are
/// read mid-write on several polls: nothing is applied or refused until the set reads the same
/// for `settle::SETTLE`, then the complete set is applied once.
#[tokio::test]
async fn a_chain_and_key_caught_mid_write_are_neither_applied_nor_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    ca.issue(&id("a", "srv"), Duration::from_secs(3600))
        .unwrap()
        .write_to(dir.path())
        .unwrap();
    let (chain, key, _) = IssuedCert::paths_in(dir.path());
    let store = CertStore::new(files_source(dir.path()), trust(), alpn()).unwrap();
    let refresh = store.spawn_refresh(TICK);
    let second = ca
        .issue(&id("a", "srv"), Duration::from_secs(7200))
        .unwrap();

    // Each step holds for less than the settle window (the writer's pace, not an ordering
    // wait); the poller reads every intermediate state at least once (TICK is 50 ms).
    let step = outrigger_tls::settle::SETTLE / 5;
    let half = &second.cert_chain_pem[..second.cert_chain_pem.len() / 2];
    let steps: [(&Path, &str); 4] = [
        (&key, &second.key_pem),
        (&chain, ""),
        (&chain, half),
        (&chain, &second.cert_chain_pem),
    ];
    let started = std::time::Instant::now();
    for (path, text) in steps {
        std::fs::write(path, text).unwrap();
        tokio::time::sleep(step).await;
        assert!(
            store.status().pending_since.is_some(),
            "the change is seen as pending"
        );
        assert_eq!(store.generation(), 0);
    }
    wait_generation(&store, 1).await;
    // The write pattern must really have been faster than the settle window per step, or the
    // test proves nothing.
    assert!(started.elapsed() < outrigger_tls::settle::SETTLE * 4);
    assert_eq!(store.certs().leaf(), &certs_of(&second).chain[0]);
    let st = store.status();
    assert_eq!(st.refusals, 0, "{st:?}");
    assert!(st.pending_since.is_none());
    let_ticks_pass().await;
    assert_eq!(store.generation(), 1);
    refresh.abort();
}

/// `CertStore::client_config` is built once per (pinned identities, ALPN) and credential set,
/// so a second dial to the same peer resumes its TLS session (the HBONE client used to build a
/// config per dial, and so always paid a full handshake), the server still sees the client's
/// identity on the resumed session, a different pin never shares a session cache, and a
/// rotation starts afresh.
#[tokio::test]
async fn client_configs_are_shared_so_a_second_dial_resumes() {
    use rustls::HandshakeKind;
    let ca = ca();
    let server_dir = tempfile::tempdir().unwrap();
    ca.issue(&id("a", "srv"), Duration::from_secs(3600))
        .unwrap()
        .write_to(server_dir.path())
        .unwrap();
    let server = CertStore::new(files_source(server_dir.path()), trust(), alpn()).unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    ca.issue(&id("a", "cli"), Duration::from_secs(3600))
        .unwrap()
        .write_to(client_dir.path())
        .unwrap();
    let client = CertStore::new(files_source(client_dir.path()), trust(), alpn()).unwrap();
    let (addr, mut outcomes) = echo_server(move || server.server_config()).await;
    let kind = |tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        tls.get_ref().1.handshake_kind().unwrap()
    };

    let pin = [id("a", "srv")];
    let first = client.client_config(&pin, &[b"istio"]).unwrap();
    let tls = connect(first.clone(), addr, "srv").await.unwrap();
    assert_eq!(kind(&tls), HandshakeKind::Full);
    assert_eq!(
        next_outcome(&mut outcomes).await.unwrap().peer,
        id("a", "cli")
    );

    let again = client.client_config(&pin, &[b"istio"]).unwrap();
    assert!(Arc::ptr_eq(&first, &again), "one config per pin and ALPN");
    let tls = connect(again, addr, "srv").await.unwrap();
    assert_eq!(kind(&tls), HandshakeKind::Resumed);
    assert_eq!(
        next_outcome(&mut outcomes).await.unwrap().peer,
        id("a", "cli"),
        "the resumed session keeps the client's identity"
    );

    // Another pin set (or ALPN) is another config, with its own session cache.
    let other = client
        .client_config(&[id("a", "srv"), id("b", "x")], &[b"istio"])
        .unwrap();
    assert!(!Arc::ptr_eq(&first, &other));
    assert_eq!(
        kind(&connect(other, addr, "srv").await.unwrap()),
        HandshakeKind::Full
    );
    next_outcome(&mut outcomes).await.unwrap();
    let h2 = client.client_config(&pin, &[b"h2"]).unwrap();
    assert!(!Arc::ptr_eq(&first, &h2));

    // A rotation: the next call builds from the new credentials.
    ca.issue(&id("a", "cli"), Duration::from_secs(3600))
        .unwrap()
        .write_to(client_dir.path())
        .unwrap();
    assert!(client.reload().unwrap());
    let rotated = client.client_config(&pin, &[b"istio"]).unwrap();
    assert!(!Arc::ptr_eq(&first, &rotated));
    let tls = connect(rotated, addr, "srv").await.unwrap();
    assert_eq!(kind(&tls), HandshakeKind::Full);
    assert_eq!(
        next_outcome(&mut outcomes).await.unwrap().peer_leaf,
        client.certs().chain[0],
        "the new certificate is presented"
    );
}
