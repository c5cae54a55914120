//! Istio's HTTP metadata exchange (`x-envoy-peer-metadata`, `x-envoy-peer-metadata-id`; see
//! `outrigger_proxy::peer_metadata`): the calling and the called workload named in the metrics
//! of both reporters, the exchange headers never reaching an application.
//!
//! No Envoy with Istio's `peer_metadata` filter runs here (the PyPI Envoy is upstream Envoy,
//! without Istio's extensions), so the sidecar's side is played by a request carrying the value
//! an Istio sidecar sends, encoded with Google's own protobuf library (`SIDECAR_METADATA`), and
//! by a second Outrigger agent.

mod common;

use common::*;
use outrigger_testkit::*;

/// What a `productpage-v1` sidecar sends as `x-envoy-peer-metadata`: its node metadata
/// (istio/proxy `testdata/client_node_metadata.json.tmpl`'s fields: NAME, NAMESPACE,
/// CLUSTER_ID, WORKLOAD_NAME, OWNER, LABELS with the canonical-service labels and a pod
/// template hash), serialized by Python's `google.protobuf` (`Struct.SerializeToString(
/// deterministic=True)`) and base64-encoded with padding, as Envoy's `Base64::encode` does:
///
/// ```python
/// s = struct_pb2.Struct(); s.update({"NAME": "productpage-v1-84975bc778-pxz2w",
///   "NAMESPACE": "default", "CLUSTER_ID": "Kubernetes", "WORKLOAD_NAME": "productpage-v1",
///   "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/productpage-v1",
///   "LABELS": {"app": "productpage", "version": "v1",
///     "service.istio.io/canonical-name": "productpage",
///     "service.istio.io/canonical-revision": "v1", "pod-template-hash": "84975bc778"}})
/// base64.b64encode(s.SerializeToString(deterministic=True))
/// ```
const SIDECAR_METADATA: &str = "ChoKCkNMVVNURVJfSUQSDBoKS3ViZXJuZXRlcwq3AQoGTEFCRUxTEqwBKqkBChQKA2FwcBINGgtwcm9kdWN0cGFnZQohChFwb2QtdGVtcGxhdGUtaGFzaBIMGgo4NDk3NWJjNzc4CjAKH3NlcnZpY2UuaXN0aW8uaW8vY2Fub25pY2FsLW5hbWUSDRoLcHJvZHVjdHBhZ2UKKwojc2VydmljZS5pc3Rpby5pby9jYW5vbmljYWwtcmV2aXNpb24SBBoCdjEKDwoHdmVyc2lvbhIEGgJ2MQoWCglOQU1FU1BBQ0USCRoHZGVmYXVsdAopCgROQU1FEiEaH3Byb2R1Y3RwYWdlLXYxLTg0OTc1YmM3NzgtcHh6MncKUgoFT1dORVISSRpHa3ViZXJuZXRlczovL2FwaXMvYXBwcy92MS9uYW1lc3BhY2VzL2RlZmF1bHQvZGVwbG95bWVudHMvcHJvZHVjdHBhZ2UtdjEKIQoNV09SS0xPQURfTkFNRRIQGg5wcm9kdWN0cGFnZS12MQ==";
const SIDECAR_ID: &str =
    "sidecar~10.244.0.12~productpage-v1-84975bc778-pxz2w.default~default.svc.cluster.local";

/// A sidecar calls this host: its workload fills the `source_*` labels of the destination
/// reporter, the application sees neither header, and the answer carries this workload's id
/// and metadata (istio/proxy e2e `TestHTTPExchange`: none back without a request id, only the
/// id back for an id alone, both back for both) — which decode to this workload's labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_caller_is_named_and_answered() {
    let backend = start_echo().await;
    let mesh = Mesh::new();
    let agent = mesh.start(&[("web", backend, "http")]);
    let client = mesh.pki.issue("default", "bookinfo-productpage");
    let mut conn = mesh.connect(agent.addr("web"), &client, false).await;

    // No exchange headers: none back, and the caller is only what its certificate says.
    let got = conn.fetch(get("/", false)).await.unwrap();
    assert_eq!(got.status, 200);
    assert!(!got.headers.contains_key("x-envoy-peer-metadata-id"));
    assert!(!got.headers.contains_key("x-envoy-peer-metadata"));

    // An id alone: the id back, no metadata.
    let mut req = get("/", false);
    req.headers_mut()
        .insert("x-envoy-peer-metadata-id", SIDECAR_ID.parse().unwrap());
    let got = conn.fetch(req).await.unwrap();
    assert!(got.headers.contains_key("x-envoy-peer-metadata-id"));
    assert!(!got.headers.contains_key("x-envoy-peer-metadata"));
    assert!(!got.seen().headers.contains_key("x-envoy-peer-metadata-id"));

    // Both: both back; the application sees neither.
    for _ in 0..2 {
        let mut req = get("/", false);
        req.headers_mut()
            .insert("x-envoy-peer-metadata-id", SIDECAR_ID.parse().unwrap());
        req.headers_mut()
            .insert("x-envoy-peer-metadata", SIDECAR_METADATA.parse().unwrap());
        let got = conn.fetch(req).await.unwrap();
        assert_eq!(got.status, 200);
        let seen = got.seen();
        assert!(
            !seen.headers.contains_key("x-envoy-peer-metadata"),
            "{seen:?}"
        );
        assert!(
            !seen.headers.contains_key("x-envoy-peer-metadata-id"),
            "{seen:?}"
        );
        let id = got.headers["x-envoy-peer-metadata-id"].to_str().unwrap();
        assert!(
            id.starts_with("sidecar~") && id.contains(".legacy~legacy.svc.cluster.local"),
            "{id}"
        );
        let ours = outrigger_proxy::peer_metadata::PeerMetadata::decode(
            got.headers["x-envoy-peer-metadata"].as_bytes(),
        )
        .expect("our metadata decodes");
        assert_eq!(ours.namespace, AGENT_NS);
        assert_eq!(
            ours.workload, AGENT_SA,
            "workload.name defaults to the service account"
        );
        assert_eq!(ours.app, "windows-app");
        assert_eq!(ours.canonical_service, "windows-app");
    }

    // A denied request is answered with the exchange too (Envoy encodes local replies through
    // the same filter), and labelled with the caller.
    mesh.policy(
        "deny.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: legacy}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: [/admin]}}]}]
",
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut served_before_the_policy = 0.0;
    loop {
        let mut req = get("/admin", false);
        req.headers_mut()
            .insert("x-envoy-peer-metadata-id", SIDECAR_ID.parse().unwrap());
        req.headers_mut()
            .insert("x-envoy-peer-metadata", SIDECAR_METADATA.parse().unwrap());
        let got = conn.fetch(req).await.unwrap();
        if got.status == 403 {
            assert!(got.headers.contains_key("x-envoy-peer-metadata"));
            break;
        }
        assert_eq!(got.status, 200);
        served_before_the_policy += 1.0;
        assert!(
            std::time::Instant::now() < deadline,
            "the DENY policy never applied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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
        // No `workload.service`: the canonical service name, as istio_stats.cc falls back.
        "destination_service=\"windows-app\"",
        "destination_service_name=\"windows-app\"",
    ];
    let denied = [
        &named[..],
        &["response_code=\"403\"", "response_flags=\"RBAC\""],
    ]
    .concat();
    let m = agent.wait_metric("istio_requests_total", &denied, 1.0);
    let ok = [&named[..], &["response_code=\"200\""]].concat();
    assert_eq!(
        metric_value(&m, "istio_requests_total", &ok),
        Some(2.0 + served_before_the_policy),
        "{m}"
    );
    // Without metadata: unknown workload, the namespace from the certificate, and the
    // canonical revision `latest` (istio_stats.cc).
    let anonymous = [
        "reporter=\"destination\"",
        "source_workload=\"unknown\"",
        "source_workload_namespace=\"default\"",
        "source_canonical_revision=\"latest\"",
        "response_code=\"200\"",
    ];
    assert_eq!(
        metric_value(&m, "istio_requests_total", &anonymous),
        Some(2.0),
        "{m}"
    );
}

/// A value that is not base64 of a protobuf Struct is an unknown peer, never an error: the
/// request is served, the headers are still removed, and the answer still carries ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_metadata_is_an_unknown_caller() {
    let backend = start_echo().await;
    let mesh = Mesh::new();
    let agent = mesh.start(&[("web", backend, "http")]);
    let client = mesh.pki.issue("default", "curl");
    let mut conn = mesh.connect(agent.addr("web"), &client, true).await;
    for bad in ["%%%", "AAAA", "////////", "Cg"] {
        let mut req = get("/", true);
        req.headers_mut()
            .insert("x-envoy-peer-metadata", bad.parse().unwrap());
        let got = conn.fetch(req).await.unwrap();
        assert_eq!(got.status, 200, "{bad}");
        assert!(!got.seen().headers.contains_key("x-envoy-peer-metadata"));
        assert!(got.headers.contains_key("x-envoy-peer-metadata"));
    }
    agent.wait_metric(
        "istio_requests_total",
        &[
            "reporter=\"destination\"",
            "source_workload=\"unknown\"",
            "response_code=\"200\"",
        ],
        4.0,
    );
}
