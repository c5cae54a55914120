//! Istio's TCP metadata exchange (ALPN `istio-peer-exchange`; `outrigger_proxy::tcp_mx`): the
//! calling and the called workload named on the `istio_tcp_*` metrics of both reporters and in
//! the access log, the exchange's bytes never reaching an application nor counted as its bytes.
//!
//! No Envoy with Istio's `metadata_exchange` filter runs here (the PyPI Envoy is upstream
//! Envoy, without Istio's contrib extensions), so the sidecar's side is played by a raw rustls
//! client writing the exchange byte by byte as Envoy's own test builds it
//! (envoyproxy/envoy `contrib/istio/filters/network/metadata_exchange/test/
//! metadata_exchange_test.cc`, `constructProxyHeaderData`), the workload struct being what a
//! sidecar sends (serialized by Google's protobuf library, as in tests/peer_metadata.rs), and
//! by a second Outrigger agent. Every socket is on 127.0.0.1, every wait bounded.

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;
use outrigger_proxy::tcp_mx::{self, Parsed};
use outrigger_testkit::*;

const WAIT: Duration = Duration::from_secs(20);

/// What a `productpage-v1` sidecar puts under `x-envoy-peer-metadata`: its workload struct
/// (the same bytes as tests/peer_metadata.rs `SIDECAR_METADATA`, Python's
/// `Struct.SerializeToString(deterministic=True)` of NAME, NAMESPACE, CLUSTER_ID,
/// WORKLOAD_NAME, OWNER and LABELS), base64 here for the source's sake.
const SIDECAR_WORKLOAD: &str = "ChoKCkNMVVNURVJfSUQSDBoKS3ViZXJuZXRlcwq3AQoGTEFCRUxTEqwBKqkBChQKA2FwcBINGgtwcm9kdWN0cGFnZQohChFwb2QtdGVtcGxhdGUtaGFzaBIMGgo4NDk3NWJjNzc4CjAKH3NlcnZpY2UuaXN0aW8uaW8vY2Fub25pY2FsLW5hbWUSDRoLcHJvZHVjdHBhZ2UKKwojc2VydmljZS5pc3Rpby5pby9jYW5vbmljYWwtcmV2aXNpb24SBBoCdjEKDwoHdmVyc2lvbhIEGgJ2MQoWCglOQU1FU1BBQ0USCRoHZGVmYXVsdAopCgROQU1FEiEaH3Byb2R1Y3RwYWdlLXYxLTg0OTc1YmM3NzgtcHh6MncKUgoFT1dORVISSRpHa3ViZXJuZXRlczovL2FwaXMvYXBwcy92MS9uYW1lc3BhY2VzL2RlZmF1bHQvZGVwbG95bWVudHMvcHJvZHVjdHBhZ2UtdjEKIQoNV09SS0xPQURfTkFNRRIQGg5wcm9kdWN0cGFnZS12MQ==";
const SIDECAR_ID: &str =
    "sidecar~10.244.0.12~productpage-v1-84975bc778-pxz2w.default~default.svc.cluster.local";

/// A protobuf length-delimited field, by hand.
fn field(tag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let mut n = bytes.len();
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(bytes);
    out
}

/// A `Struct` map entry.
fn entry(key: &str, value: &[u8]) -> Vec<u8> {
    field(
        0x0a,
        &[field(0x0a, key.as_bytes()), field(0x12, value)].concat(),
    )
}

/// The sidecar's exchange as `writeNodeMetadata` builds it and `constructProxyHeaderData`
/// frames it: `Any{type_url: type.googleapis.com/google.protobuf.Struct, value: Struct{
/// "x-envoy-peer-metadata": <workload struct>, "x-envoy-peer-metadata-id": <node id>}}`,
/// after the magic `0x3D230467` and the length, both big-endian.
fn sidecar_exchange() -> Vec<u8> {
    use base64::Engine;
    let workload = base64::engine::general_purpose::STANDARD
        .decode(SIDECAR_WORKLOAD)
        .unwrap();
    let outer = [
        entry("x-envoy-peer-metadata", &field(0x2a, &workload)),
        entry(
            "x-envoy-peer-metadata-id",
            &field(0x1a, SIDECAR_ID.as_bytes()),
        ),
    ]
    .concat();
    let any = [
        field(0x0a, b"type.googleapis.com/google.protobuf.Struct"),
        field(0x12, &outer),
    ]
    .concat();
    let mut out = vec![0x3d, 0x23, 0x04, 0x67];
    out.extend_from_slice(&(any.len() as u32).to_be_bytes());
    out.extend_from_slice(&any);
    out
}

/// Reads the agent's exchange off the start of the stream (header, then the declared length)
/// and decodes it.
async fn read_agents_exchange<T: AsyncRead + Unpin>(io: &mut T) -> tcp_mx::Parsed {
    let mut header = [0u8; 8];
    tokio::time::timeout(WAIT, io.read_exact(&mut header))
        .await
        .expect("the agent's exchange in time")
        .unwrap();
    assert_eq!(&header[..4], &[0x3d, 0x23, 0x04, 0x67], "the magic first");
    let len = u32::from_be_bytes(header[4..].try_into().unwrap()) as usize;
    assert!(len < 4096, "{len}");
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await.unwrap();
    tcp_mx::parse(&[&header[..], &body].concat(), false)
}

/// A raw mTLS connection as `default/bookinfo-productpage`, offering `alpn`.
async fn sidecar_connect(
    mesh: &Mesh,
    addr: std::net::SocketAddr,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let client = mesh.pki.issue("default", "bookinfo-productpage");
    let cfg =
        outrigger_tls::client_config(&client.certs, &mesh.pki.trust(), &[mesh.agent_id()], alpn)
            .unwrap();
    tls_connect(addr, cfg).await.unwrap()
}

const SIDECAR_ALPN: &[&[u8]] = &[b"istio-peer-exchange", b"istio"];

/// Polls the metrics until `check` holds, for at most `WAIT`.
fn wait_metrics(agent: &AgentProc, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = agent.metrics();
        if check(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{m}\n{}", agent.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A sidecar calls a `tcp` listener: the agent selects `istio-peer-exchange` (a sidecar's TCP
/// chain does: `ALPNDownstreamWithMxc`), writes its own exchange before any byte of the
/// caller's — so a server-first protocol is never waited on — reads the sidecar's, and
/// forwards only what follows it. The destination reporter names the caller on every
/// `istio_tcp_*` series; the bytes counted are the application's alone (Envoy's tcp_proxy
/// counts what reaches it, after the filter); the access log names the caller too. The same
/// offer to an `auto` listener is TCP at once; to an `http` listener it gets `istio` and no
/// exchange (a sidecar's HTTP chain never selects `istio-peer-exchange`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_is_named_and_answered_over_tcp() {
    let echo = start_tcp_echo().await;
    let web = start_echo().await;
    let mesh = Mesh::new();
    let agent = AgentProc::start(
        mesh.dir(),
        &(mesh.config(
            &[
                ("db", echo, "tcp"),
                ("any", echo, "auto"),
                ("web", web, "http"),
            ],
            "",
        ) + "accessLog: stdout\n"),
    );

    for listener in ["db", "any"] {
        let mut tls = sidecar_connect(&mesh, agent.addr(listener), SIDECAR_ALPN).await;
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"istio-peer-exchange"[..]),
            "{listener}"
        );
        // The agent's exchange comes before the caller has sent anything.
        match read_agents_exchange(&mut tls).await {
            Parsed::Exchanged {
                peer: Some(ours), ..
            } => {
                assert_eq!(ours.namespace, AGENT_NS);
                assert_eq!(ours.workload, AGENT_SA);
                assert_eq!(ours.app, "windows-app");
                assert_eq!(ours.canonical_service, "windows-app");
            }
            other => panic!("{other:?}"),
        }
        // The sidecar's exchange and its first bytes in one write, as Envoy injects its
        // exchange ahead of the application's data.
        let mut first = sidecar_exchange();
        first.extend_from_slice(b"hello");
        tls.write_all(&first).await.unwrap();
        let mut back = [0u8; 5];
        tokio::time::timeout(WAIT, tls.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            &back, b"hello",
            "only the bytes after the exchange reach the app"
        );
        tls.write_all(b" world").await.unwrap();
        let mut back = [0u8; 6];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b" world");
        tls.shutdown().await.unwrap();
        let (rest, _) = read_until_close(&mut tls).await;
        assert!(rest.is_empty(), "{rest:?}");
    }

    let named = [
        "reporter=\"destination\"",
        "source_workload=\"productpage-v1\"",
        "source_workload_namespace=\"default\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\"",
        "source_app=\"productpage\"",
        "source_version=\"v1\"",
        "source_canonical_service=\"productpage\"",
        "source_canonical_revision=\"v1\"",
        "source_cluster=\"Kubernetes\"",
        "destination_workload=\"windows-app\"",
        "request_protocol=\"tcp\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    let m = wait_metrics(&agent, |m| {
        metric_value(m, "istio_tcp_connections_closed_total", &named) == Some(2.0)
    });
    assert_eq!(
        metric_value(&m, "istio_tcp_connections_opened_total", &named),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "istio_tcp_received_bytes_total", &named),
        Some(22.0),
        "the application's 11 bytes per connection, not the exchange: {m}"
    );
    assert_eq!(
        metric_value(&m, "istio_tcp_sent_bytes_total", &named),
        Some(22.0),
        "{m}"
    );
    // No series of these connections without the caller's workload.
    assert_eq!(
        metric_value(
            &m,
            "istio_tcp_connections_opened_total",
            &["source_workload=\"unknown\""]
        ),
        None,
        "{m}"
    );
    let log = agent.wait_for_log("\"source_workload\":\"productpage-v1\"");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"kind\":\"tcp\"")
                && l.contains("\"source_workload\":\"productpage-v1\"")
                && l.contains("\"bytes_received\":11"))
            .count(),
        2,
        "{log}"
    );

    // An `http` listener: `istio`, no exchange; plain HTTP is served.
    let tls = sidecar_connect(&mesh, agent.addr("web"), SIDECAR_ALPN).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"istio"[..]));
    let mut conn = HttpConn::new(tls, false).await.unwrap();
    assert_eq!(conn.fetch(get("/", false)).await.unwrap().status, 200);
    // And a caller offering only `istio` (`PILOT_DISABLE_MX_ALPN`) to the `tcp` listener: no
    // exchange either way; its first bytes are the application's.
    let mut tls = sidecar_connect(&mesh, agent.addr("db"), &[b"istio"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"istio"[..]));
    tls.write_all(b"plain").await.unwrap();
    let mut back = [0u8; 5];
    tokio::time::timeout(WAIT, tls.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"plain");
}

/// A caller that selects `istio-peer-exchange` and then does not speak it, handled as Envoy's
/// filter handles it (metadata_exchange.cc `tryReadInitialProxyHeader`, `tryReadProxyData`):
/// bytes without the magic are forwarded whole and the caller is unknown
/// (`initial_header_not_found`); a bad `Any` after a good header is forwarded from after the
/// header (`header_not_found`); a stream that ends inside the metadata forwards none of it.
/// A declared length beyond any real metadata is refused: the connection is closed (Envoy
/// would stop reading at its buffer limit and stall). The agent's own exchange is written
/// first in every case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_does_not_speak_the_exchange() {
    let echo = start_tcp_echo().await;
    let mesh = Mesh::new();
    let agent = AgentProc::start(mesh.dir(), &mesh.config(&[("db", echo, "tcp")], ""));
    let addr = agent.addr("db");

    // Not the magic: everything is the application's.
    let garbage = b"not an exchange, just bytes".to_vec();
    let mut tls = sidecar_connect(&mesh, addr, SIDECAR_ALPN).await;
    assert!(matches!(
        read_agents_exchange(&mut tls).await,
        Parsed::Exchanged { peer: Some(_), .. }
    ));
    tls.write_all(&garbage).await.unwrap();
    let mut back = vec![0u8; garbage.len()];
    tokio::time::timeout(WAIT, tls.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, garbage);
    tls.shutdown().await.unwrap();
    let _ = read_until_close(&mut tls).await;

    // The magic, then 10 bytes that are not a protobuf `Any`: the bytes after the header are
    // the application's.
    let mut bad_any = vec![0x3d, 0x23, 0x04, 0x67, 0, 0, 0, 10];
    bad_any.extend_from_slice(&[0xff; 10]);
    bad_any.extend_from_slice(b"tail");
    let mut tls = sidecar_connect(&mesh, addr, SIDECAR_ALPN).await;
    read_agents_exchange(&mut tls).await;
    tls.write_all(&bad_any).await.unwrap();
    let mut back = [0u8; 14];
    tokio::time::timeout(WAIT, tls.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back[..10], &[0xff; 10]);
    assert_eq!(&back[10..], b"tail");
    tls.shutdown().await.unwrap();
    let _ = read_until_close(&mut tls).await;

    // The magic and a length of 100, then 10 bytes and the end: none of it is forwarded.
    let mut cut = vec![0x3d, 0x23, 0x04, 0x67, 0, 0, 0, 100];
    cut.extend_from_slice(&[7; 10]);
    let mut tls = sidecar_connect(&mesh, addr, SIDECAR_ALPN).await;
    read_agents_exchange(&mut tls).await;
    tls.write_all(&cut).await.unwrap();
    tls.shutdown().await.unwrap();
    let (rest, _) = read_until_close(&mut tls).await;
    assert!(rest.is_empty(), "{rest:?}");

    // A declared length of 16 MiB: closed, nothing forwarded.
    let mut tls = sidecar_connect(&mesh, addr, SIDECAR_ALPN).await;
    read_agents_exchange(&mut tls).await;
    tls.write_all(&[0x3d, 0x23, 0x04, 0x67, 1, 0, 0, 0])
        .await
        .unwrap();
    tls.write_all(b"never forwarded").await.unwrap();
    let (rest, _) = read_until_close(&mut tls).await;
    assert!(rest.is_empty(), "{rest:?}");
    agent.wait_for_log("istio-peer-exchange metadata is 16777216 bytes");

    // The three forwarded connections: the caller unknown but for its certificate, only the
    // bytes that reached the application counted (27 + 14 + 0 each way).
    let unknown = [
        "reporter=\"destination\"",
        "source_workload=\"unknown\"",
        "source_workload_namespace=\"default\"",
        "source_canonical_revision=\"latest\"",
    ];
    let m = wait_metrics(&agent, |m| {
        metric_value(m, "istio_tcp_connections_closed_total", &unknown) == Some(3.0)
    });
    assert_eq!(
        metric_value(&m, "istio_tcp_received_bytes_total", &unknown),
        Some(41.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "istio_tcp_sent_bytes_total", &unknown),
        Some(41.0),
        "{m}"
    );
    agent.wait_for_log("does not start with the exchange's magic");
    agent.wait_for_log("the exchange's metadata is not a protobuf Any");
}

/// Two agents over real mTLS: the client agent's `tcp` outbound offers `istio-peer-exchange`
/// then `istio`, as a sidecar's TCP cluster does (`ALPNInMeshWithMxc`); the server agent's
/// `tcp` listener selects the first; each writes its exchange and reads the other's, so both
/// reporters name both workloads on every `istio_tcp_*` series — exactly the labels the HTTP
/// exchange gives — and the application's bytes arrive unchanged and are the only ones
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_name_each_other_over_tcp() {
    let mesh = Mesh::new();
    let echo = start_tcp_echo().await;
    let (server, _) = start_server_agent(&mesh, "ratings", echo, "tcp");
    let dir = mesh.dir().join("client");
    std::fs::create_dir_all(&dir).unwrap();
    let outbound = format!(
        "outbound:
  - name: db
    listen: 127.0.0.1:0
    host: ratings.default.svc.cluster.local
    port: 5432
    protocol: tcp
    endpoints: [\"{s}\"]
    identity: {{serviceAccount: ratings}}
",
        s = server.addr("web")
    );
    let client = AgentProc::start(
        &dir,
        &agent_yaml(
            &mesh,
            &mesh.agent.dir,
            AGENT_NS,
            AGENT_SA,
            "  []\n",
            &outbound,
        ),
    );

    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    for _ in 0..2 {
        let mut s = TcpStream::connect(client.outbound("db")).await.unwrap();
        s.write_all(&payload).await.unwrap();
        let mut back = vec![0u8; payload.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("no echo in time\n{}", client.stderr()))
            .unwrap();
        assert_eq!(
            back, payload,
            "the exchange never reaches either application"
        );
        s.shutdown().await.unwrap();
        let (rest, _) = read_until_close(&mut s).await;
        assert!(rest.is_empty());
    }

    let on_server = [
        "reporter=\"destination\"",
        "source_workload=\"windows-app\"",
        "source_workload_namespace=\"legacy\"",
        "source_principal=\"spiffe://cluster.local/ns/legacy/sa/windows-app\"",
        "source_app=\"windows-app\"",
        "source_version=\"v1\"",
        "source_canonical_service=\"windows-app\"",
        "source_canonical_revision=\"v1\"",
        "destination_workload=\"ratings\"",
        "destination_workload_namespace=\"default\"",
        "request_protocol=\"tcp\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    let on_client = [
        "reporter=\"source\"",
        "source_workload=\"windows-app\"",
        "source_workload_namespace=\"legacy\"",
        "destination_workload=\"ratings\"",
        "destination_workload_namespace=\"default\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/ratings\"",
        "destination_app=\"ratings\"",
        "destination_version=\"v1\"",
        "destination_canonical_service=\"ratings\"",
        "destination_canonical_revision=\"v1\"",
        "destination_service=\"ratings.default.svc.cluster.local\"",
        "destination_service_name=\"ratings\"",
        "request_protocol=\"tcp\"",
    ];
    let total = 2.0 * payload.len() as f64;
    for (agent, labels) in [(&server, &on_server[..]), (&client, &on_client[..])] {
        let m = wait_metrics(agent, |m| {
            metric_value(m, "istio_tcp_connections_closed_total", labels) == Some(2.0)
        });
        for (name, want) in [
            ("istio_tcp_connections_opened_total", 2.0),
            ("istio_tcp_received_bytes_total", total),
            ("istio_tcp_sent_bytes_total", total),
        ] {
            assert_eq!(metric_value(&m, name, labels), Some(want), "{name}\n{m}");
            // Every series of the metric carries the peer: none without it.
            assert_eq!(metric_value(&m, name, &[]), Some(want), "{name}\n{m}");
        }
    }
    server.wait_for_log("\"source_workload\":\"windows-app\"");
    client.wait_for_log("\"destination_workload\":\"ratings\"");
}

/// The exchange comes before authorization, as Istio orders a sidecar's inbound TCP chain
/// (istio/istio `pilot/pkg/networking/core/networkfilter.go`: "Metadata exchange goes first,
/// so RBAC failures, etc can access the state"): a connection an AuthorizationPolicy refuses
/// is still named by its caller's workload, on its metrics and its access log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_named_too() {
    let echo = start_tcp_echo().await;
    let mesh = Mesh::new();
    mesh.policy(
        "deny.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-productpage, namespace: legacy}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}}]}]
",
    );
    let agent = AgentProc::start(
        mesh.dir(),
        &(mesh.config(&[("db", echo, "tcp")], "") + "accessLog: stdout\n"),
    );
    let mut tls = sidecar_connect(&mesh, agent.addr("db"), SIDECAR_ALPN).await;
    assert!(matches!(
        read_agents_exchange(&mut tls).await,
        Parsed::Exchanged { peer: Some(_), .. }
    ));
    let mut first = sidecar_exchange();
    first.extend_from_slice(b"hello");
    tls.write_all(&first).await.unwrap();
    let (rest, _) = read_until_close(&mut tls).await;
    assert!(rest.is_empty(), "refused: nothing reaches the application");
    agent.wait_metric(
        "istio_tcp_connections_closed_total",
        &[
            "reporter=\"destination\"",
            "source_workload=\"productpage-v1\"",
            "source_canonical_service=\"productpage\"",
        ],
        1.0,
    );
    let log = agent.wait_for_log("\"authz_result\":\"deny_matched\"");
    assert!(
        log.lines()
            .any(|l| l.contains("\"authz_result\":\"deny_matched\"")
                && l.contains("\"source_workload\":\"productpage-v1\"")),
        "{log}"
    );
}
