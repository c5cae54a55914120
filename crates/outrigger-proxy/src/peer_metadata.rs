//! Istio's HTTP metadata exchange: how two mesh proxies learn each other's workload (name,
//! namespace, canonical service and revision, app, version, cluster) so that both fill the
//! `source_*` and `destination_*` labels of Istio's standard metrics. A SPIFFE certificate says
//! only the namespace and service account; Kiali draws an edge per workload, so without this
//! exchange a call to or from this host is an `unknown` node.
//!
//! The protocol, as Istio's `peer_metadata` HTTP filter speaks it (istio/proxy
//! `source/extensions/filters/http/peer_metadata/filter.cc`, now in envoyproxy/envoy; the
//! struct's fields from `extensions/common/metadata_object.{h,cc}`):
//!
//! - two request headers, `x-envoy-peer-metadata-id` (the sender's node id, a cache key) and
//!   `x-envoy-peer-metadata` (base64 of a deterministically serialized
//!   `google.protobuf.Struct`: `NAME`, `NAMESPACE`, `WORKLOAD_NAME`, `CLUSTER_ID`, `OWNER` and
//!   `LABELS` with `service.istio.io/canonical-name`, `service.istio.io/canonical-revision`,
//!   `app`, `version`, or the recommended `app.kubernetes.io/name` and `/version`, which win),
//!   decoded with `Base64::decodeWithoutPadding` (padding optional);
//! - the server (`downstream_discovery` + `downstream_propagation`) reads and removes both from
//!   the request — the application never sees them — and answers with its own id when the
//!   request carried an id, and its own metadata when the request carried metadata
//!   (`MXPropagationMethod::inject`: `ctx.request_peer_id_received_`,
//!   `ctx.request_peer_received_`); istio/proxy's e2e test `TestHTTPExchange` checks exactly
//!   these three cases;
//! - the client (`upstream_propagation` + `upstream_discovery`) sends both on every request to a
//!   mesh destination and reads and removes them from the response.
//!
//! Like Envoy, the values are taken as sent: they only ever label metrics and logs. Policy never
//! reads them; identity comes from the certificate.

use std::sync::Arc;

use base64::Engine;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use prost::Message;
use prost_types::value::Kind;
use prost_types::{Struct, Value};

use crate::workload::WorkloadInfo;

pub static HEADER: HeaderName = HeaderName::from_static("x-envoy-peer-metadata");
pub static HEADER_ID: HeaderName = HeaderName::from_static("x-envoy-peer-metadata-id");

/// The most distinct peer workloads whose labels the metrics carry. The values come from the
/// peers, so without a bound a caller sending a new value per request would grow the agent's
/// metric series (and memory) without end; past it, a new peer is counted as `unknown` and
/// the agent says so in its log.
pub const MAX_PEERS: usize = 1024;

/// A header value larger than this is not decoded (Envoy's own header limit is 60 KiB; a
/// real peer's metadata is a few hundred bytes).
const MAX_ENCODED: usize = 16 * 1024;

// Field and label names (metadata_object.h).
const NAME: &str = "NAME";
const NAMESPACE: &str = "NAMESPACE";
const CLUSTER_ID: &str = "CLUSTER_ID";
const WORKLOAD_NAME: &str = "WORKLOAD_NAME";
const LABELS: &str = "LABELS";
const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";
const APP: &str = "app";
const VERSION: &str = "version";
const APP_QUALIFIED: &str = "app.kubernetes.io/name";
const VERSION_QUALIFIED: &str = "app.kubernetes.io/version";

/// A peer's workload, as its proxy described it (`WorkloadMetadataObject`). Empty = not sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PeerMetadata {
    pub instance: String,
    pub namespace: String,
    pub workload: String,
    pub cluster: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub app: String,
    pub version: String,
}

impl PeerMetadata {
    /// Decodes an `x-envoy-peer-metadata` value; `None` when it is not base64 of a protobuf
    /// `Struct` (Envoy then treats the peer as unknown: `lookup` returns nothing).
    pub fn decode(value: &[u8]) -> Option<PeerMetadata> {
        if value.len() > MAX_ENCODED {
            return None;
        }
        // Envoy's `Base64::decodeWithoutPadding`: the standard alphabet, padding optional.
        let trimmed = value
            .strip_suffix(b"==")
            .or_else(|| value.strip_suffix(b"="))
            .unwrap_or(value);
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(trimmed)
            .ok()?;
        let s = Struct::decode(bytes.as_slice()).ok()?;
        Some(Self::from_struct(&s))
    }

    /// `convertStructToWorkloadMetadata`: the known fields; anything else is ignored, and a
    /// field of another type reads as empty (protobuf's `string_value()` of a non-string).
    /// The app and version are the Kubernetes recommended labels `app.kubernetes.io/name` and
    /// `app.kubernetes.io/version` when the peer has them, else `app` and `version`
    /// (metadata_object.cc: `AppNameQualifiedLabel` wins over `AppNameLabel`, which is taken
    /// only "`&& app_name.empty()`"), so a pod labelled only the recommended way is still
    /// `source_app` / `destination_app` on Istio's metrics.
    pub(crate) fn from_struct(s: &Struct) -> PeerMetadata {
        fn text(v: &Value) -> String {
            match &v.kind {
                Some(Kind::StringValue(s)) => s.clone(),
                _ => String::new(),
            }
        }
        let mut m = PeerMetadata::default();
        let (mut app_qualified, mut version_qualified) = (String::new(), String::new());
        for (k, v) in &s.fields {
            match k.as_str() {
                NAME => m.instance = text(v),
                NAMESPACE => m.namespace = text(v),
                WORKLOAD_NAME => m.workload = text(v),
                CLUSTER_ID => m.cluster = text(v),
                LABELS => {
                    if let Some(Kind::StructValue(labels)) = &v.kind {
                        for (l, v) in &labels.fields {
                            match l.as_str() {
                                CANONICAL_NAME => m.canonical_service = text(v),
                                CANONICAL_REVISION => m.canonical_revision = text(v),
                                APP => m.app = text(v),
                                VERSION => m.version = text(v),
                                APP_QUALIFIED => app_qualified = text(v),
                                VERSION_QUALIFIED => version_qualified = text(v),
                                _ => {}
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if !app_qualified.is_empty() {
            m.app = app_qualified;
        }
        if !version_qualified.is_empty() {
            m.version = version_qualified;
        }
        m
    }

    /// `convertWorkloadMetadataToStruct`: empty fields left out; `LABELS` always present.
    /// `OWNER` is not sent: it names a Kubernetes controller (`kubernetes://apis/apps/v1/...`),
    /// which a host outside the cluster does not have.
    pub(crate) fn to_struct(&self) -> Struct {
        fn put(fields: &mut std::collections::BTreeMap<String, Value>, k: &str, v: &str) {
            if !v.is_empty() {
                fields.insert(
                    k.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(v.to_string())),
                    },
                );
            }
        }
        let mut fields = Default::default();
        put(&mut fields, NAME, &self.instance);
        put(&mut fields, NAMESPACE, &self.namespace);
        put(&mut fields, WORKLOAD_NAME, &self.workload);
        put(&mut fields, CLUSTER_ID, &self.cluster);
        let mut labels = Default::default();
        put(&mut labels, CANONICAL_NAME, &self.canonical_service);
        put(&mut labels, CANONICAL_REVISION, &self.canonical_revision);
        put(&mut labels, APP, &self.app);
        put(&mut labels, VERSION, &self.version);
        fields.insert(
            LABELS.to_string(),
            Value {
                kind: Some(Kind::StructValue(Struct { fields: labels })),
            },
        );
        Struct { fields }
    }

    /// The header value: base64 (with padding, as Envoy's `Base64::encode`) of the struct.
    /// prost writes a `Struct`'s map in key order (a `BTreeMap`), which is protobuf's
    /// deterministic serialization (`serializeToStringDeterministic`).
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.to_struct().encode_to_vec())
    }
}

/// This workload's side of the exchange, built once, and the peers it has met.
#[derive(Debug)]
pub struct Local {
    /// This workload as peers see it (also the TCP exchange's, crate::tcp_mx).
    me: PeerMetadata,
    id: HeaderValue,
    value: HeaderValue,
    /// Every distinct peer seen, shared (one `Arc` per workload), at most [`MAX_PEERS`].
    known: std::sync::Mutex<std::collections::HashSet<Arc<PeerMetadata>>>,
}

impl Local {
    pub fn new(w: &WorkloadInfo) -> Local {
        let me = PeerMetadata {
            instance: w.name.clone(),
            namespace: w.namespace.clone(),
            workload: w.name.clone(),
            cluster: w.cluster.clone(),
            canonical_service: w.canonical_service.clone(),
            canonical_revision: w.canonical_revision.clone(),
            app: w.app.clone(),
            version: w.version.clone(),
        };
        let value = me.encode();
        // A sidecar's node id is `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>`.
        // Peers cache metadata by id (istio/proxy `MXMethod::lookup`, 500 entries per worker),
        // so the id must change when the metadata does: the instance part carries a hash of
        // the value, and a relabelled host is not shown with its old labels.
        let id = format!(
            "sidecar~0.0.0.0~{}-{:08x}.{}~{}.svc.cluster.local",
            w.name,
            fnv1a(value.as_bytes()) as u32,
            w.namespace,
            w.namespace
        );
        Local {
            me,
            // Base64 and the configured names (validated as DNS labels) are valid header
            // text; an unexpected byte drops the exchange rather than the agent.
            id: HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("")),
            value: HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("")),
            known: Default::default(),
        }
    }

    /// This workload's metadata, as sent to peers.
    pub fn workload(&self) -> &PeerMetadata {
        &self.me
    }

    /// This workload's node id (`x-envoy-peer-metadata-id`; the TCP exchange's
    /// `x-envoy-peer-metadata-id` field too).
    pub fn node_id(&self) -> &str {
        self.id.to_str().unwrap_or_default()
    }

    /// Reads and removes the exchange headers from a request (inbound) or a response
    /// (outbound). `last` is the connection's (or endpoint's) previous value: a peer sends the
    /// same one every time, so it is decoded once, not per request.
    pub fn take(
        &self,
        headers: &mut HeaderMap,
        last: &mut Option<(HeaderValue, Arc<PeerMetadata>)>,
    ) -> Received {
        let id = headers.remove(&HEADER_ID).is_some();
        let mut r = Received {
            id,
            ..Received::default()
        };
        // Only the first value counts (Envoy reads `peer_info_header[0]`).
        let Some(value) = headers.get(&HEADER).cloned() else {
            return r;
        };
        while headers.remove(&HEADER).is_some() {}
        r.metadata = true;
        if let Some((v, peer)) = last
            && *v == value
        {
            r.peer = Some(peer.clone());
            return r;
        }
        if let Some(peer) = PeerMetadata::decode(value.as_bytes())
            && let Some(peer) = self.admit(peer)
        {
            *last = Some((value, peer.clone()));
            r.peer = Some(peer);
        }
        r
    }

    /// The shared `Arc` of a peer, or `None` past [`MAX_PEERS`] distinct ones.
    pub(crate) fn admit(&self, peer: PeerMetadata) -> Option<Arc<PeerMetadata>> {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = known.get(&peer) {
            return Some(p.clone());
        }
        if known.len() >= MAX_PEERS {
            crate::warn_limited!(
                workload = %peer.workload, namespace = %peer.namespace,
                "more than {MAX_PEERS} distinct peer workloads sent metadata: this one is counted as unknown in the metrics"
            );
            return None;
        }
        let p = Arc::new(peer);
        known.insert(p.clone());
        Some(p)
    }

    /// Outbound: both headers on a request to a mesh destination.
    pub fn inject(&self, headers: &mut HeaderMap) {
        headers.insert(HEADER_ID.clone(), self.id.clone());
        headers.insert(HEADER.clone(), self.value.clone());
    }

    /// Inbound: the answer to what the request carried.
    pub fn respond(&self, received: &Received, headers: &mut HeaderMap) {
        if received.id {
            headers.insert(HEADER_ID.clone(), self.id.clone());
        }
        if received.metadata {
            headers.insert(HEADER.clone(), self.value.clone());
        }
    }
}

/// What a message carried, its exchange headers removed.
#[derive(Debug, Clone, Default)]
pub struct Received {
    pub id: bool,
    pub metadata: bool,
    pub peer: Option<Arc<PeerMetadata>>,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> WorkloadInfo {
        WorkloadInfo {
            identity: "spiffe://cluster.local/ns/legacy/sa/windows-app"
                .parse()
                .unwrap(),
            namespace: "legacy".into(),
            name: "billing".into(),
            app: "billing".into(),
            version: "v2".into(),
            canonical_service: "billing".into(),
            canonical_revision: "v2".into(),
            service_host: None,
            cluster: "Kubernetes".into(),
        }
    }

    /// The bytes istio/proxy's own test encodes for a client (test/envoye2e
    /// http_metadata_exchange `EncodeMetadata`: `proto.Marshal` of the Struct, then
    /// `base64.RawStdEncoding`): written here by hand from the protobuf wire format, so the
    /// encoder and decoder are checked against the format, not against each other.
    #[test]
    fn wire_format_is_protobuf_struct_in_base64() {
        // Struct{fields: {"NAMESPACE": "ns", "LABELS": {"app": "a"}}} in key order:
        // field 1 (map entry) { key(1)="LABELS", value(2)=Value{struct_value(5)=Struct{
        //   field 1 {key="app", value=Value{string_value(3)="a"}}}} }
        // field 1 { key="NAMESPACE", value=Value{string_value(3)="ns"} }
        let app_entry = [&[0x0a, 3][..], b"app", &[0x12, 3, 0x1a, 1], b"a"].concat();
        let labels_struct = [&[0x0a, app_entry.len() as u8][..], &app_entry].concat();
        let labels_value = [&[0x2a, labels_struct.len() as u8][..], &labels_struct].concat();
        let labels_entry = [
            &[0x0a, 6][..],
            b"LABELS",
            &[0x12, labels_value.len() as u8],
            &labels_value,
        ]
        .concat();
        let ns_entry = [&[0x0a, 9][..], b"NAMESPACE", &[0x12, 4, 0x1a, 2], b"ns"].concat();
        let wire = [
            &[0x0a, labels_entry.len() as u8][..],
            &labels_entry,
            &[0x0a, ns_entry.len() as u8],
            &ns_entry,
        ]
        .concat();

        let m = PeerMetadata {
            namespace: "ns".into(),
            app: "a".into(),
            ..Default::default()
        };
        let encoded = m.encode();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&encoded)
                .unwrap(),
            wire,
            "deterministic: map entries in key order, empty fields left out"
        );
        // Decoded with and without padding (Go's RawStdEncoding sends none).
        let raw = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&wire);
        assert_eq!(PeerMetadata::decode(raw.as_bytes()), Some(m.clone()));
        assert_eq!(PeerMetadata::decode(encoded.as_bytes()), Some(m));
    }

    /// A peer labelled the Kubernetes recommended way: metadata_object.cc takes
    /// `app.kubernetes.io/name` / `app.kubernetes.io/version` over `app` / `version`, in
    /// whatever order the map holds them, and `app` / `version` alone when those are absent.
    #[test]
    fn recommended_app_labels_win_over_app_and_version() {
        fn string(v: &str) -> Value {
            Value {
                kind: Some(Kind::StringValue(v.into())),
            }
        }
        fn peer(labels: &[(&str, &str)]) -> PeerMetadata {
            let labels = Struct {
                fields: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), string(v)))
                    .collect(),
            };
            let s = Struct {
                fields: [(
                    LABELS.to_string(),
                    Value {
                        kind: Some(Kind::StructValue(labels)),
                    },
                )]
                .into_iter()
                .collect(),
            };
            let b64 = base64::engine::general_purpose::STANDARD.encode(s.encode_to_vec());
            PeerMetadata::decode(b64.as_bytes()).unwrap()
        }
        let both = peer(&[
            ("app", "legacy-name"),
            ("app.kubernetes.io/name", "reviews"),
            ("app.kubernetes.io/version", "v3"),
            ("version", "old"),
        ]);
        assert_eq!((&*both.app, &*both.version), ("reviews", "v3"));
        let plain = peer(&[("app", "ratings"), ("version", "v1")]);
        assert_eq!((&*plain.app, &*plain.version), ("ratings", "v1"));
        // An empty recommended label leaves the plain one in place (in Envoy the outcome then
        // depends on the map's iteration order; the non-empty value is the useful one).
        let empty = peer(&[("app", "ratings"), ("app.kubernetes.io/name", "")]);
        assert_eq!(&*empty.app, "ratings");
    }

    #[test]
    fn local_metadata_round_trips_and_the_id_follows_the_labels() {
        let w = workload();
        let local = Local::new(&w);
        let mut h = HeaderMap::new();
        local.inject(&mut h);
        let mut cache = None;
        let r = local.take(&mut h, &mut cache);
        assert!(r.id && r.metadata);
        assert!(h.is_empty(), "both headers removed");
        let peer = r.peer.unwrap();
        assert_eq!(
            *peer,
            PeerMetadata {
                instance: "billing".into(),
                namespace: "legacy".into(),
                workload: "billing".into(),
                cluster: "Kubernetes".into(),
                canonical_service: "billing".into(),
                canonical_revision: "v2".into(),
                app: "billing".into(),
                version: "v2".into(),
            }
        );
        let id = local.id.to_str().unwrap();
        assert!(id.starts_with("sidecar~0.0.0.0~billing-"), "{id}");
        assert!(id.ends_with(".legacy~legacy.svc.cluster.local"), "{id}");
        let mut relabelled = w.clone();
        relabelled.version = "v3".into();
        assert_ne!(Local::new(&relabelled).id, local.id);
        assert_eq!(Local::new(&w).id, local.id, "stable across restarts");
    }

    /// `TestHTTPExchange`: no headers → none back; an id alone → our id back, no metadata;
    /// both → both back.
    #[test]
    fn the_answer_mirrors_what_the_request_carried() {
        let local = Local::new(&workload());
        let mut cache = None;
        for (req_id, req_md) in [(false, false), (true, false), (true, true), (false, true)] {
            let mut req = HeaderMap::new();
            if req_id {
                req.insert(HEADER_ID.clone(), HeaderValue::from_static("client"));
            }
            if req_md {
                req.insert(HEADER.clone(), HeaderValue::from_static("CgA"));
            }
            let r = local.take(&mut req, &mut cache);
            let mut resp = HeaderMap::new();
            local.respond(&r, &mut resp);
            assert_eq!(resp.contains_key(&HEADER_ID), req_id);
            assert_eq!(resp.contains_key(&HEADER), req_md);
        }
    }

    #[test]
    fn garbage_is_an_unknown_peer_and_never_a_panic() {
        for bad in [&b"%%%"[..], b"", b"AAAA", b"////", &[0xff; 40]] {
            let _ = PeerMetadata::decode(bad);
        }
        assert_eq!(PeerMetadata::decode(b"%%%"), None);
        assert_eq!(PeerMetadata::decode(&vec![b'A'; MAX_ENCODED + 4]), None);
        // A string where a struct belongs, a number where a string belongs: read as empty.
        let s = Struct {
            fields: [
                (
                    LABELS.to_string(),
                    Value {
                        kind: Some(Kind::StringValue("x".into())),
                    },
                ),
                (
                    NAMESPACE.to_string(),
                    Value {
                        kind: Some(Kind::NumberValue(1.0)),
                    },
                ),
            ]
            .into_iter()
            .collect(),
        };
        let v = base64::engine::general_purpose::STANDARD.encode(s.encode_to_vec());
        assert_eq!(
            PeerMetadata::decode(v.as_bytes()),
            Some(PeerMetadata::default())
        );
    }

    /// A caller sending a new workload per request cannot grow the metrics without end:
    /// past MAX_PEERS distinct peers a new one is unknown; known ones still count, and the
    /// same workload from two connections is one shared value.
    #[test]
    fn distinct_peers_are_bounded() {
        let local = Local::new(&workload());
        let header = |n: usize| {
            let m = PeerMetadata {
                workload: format!("w{n}"),
                ..Default::default()
            };
            let mut h = HeaderMap::new();
            h.insert(HEADER.clone(), HeaderValue::from_str(&m.encode()).unwrap());
            h
        };
        for n in 0..MAX_PEERS {
            assert!(local.take(&mut header(n), &mut None).peer.is_some(), "{n}");
        }
        let over = local.take(&mut header(MAX_PEERS), &mut None);
        assert!(
            over.metadata && over.peer.is_none(),
            "the new one is unknown"
        );
        let a = local.take(&mut header(7), &mut None).peer.unwrap();
        let b = local.take(&mut header(7), &mut None).peer.unwrap();
        assert!(Arc::ptr_eq(&a, &b), "one shared value per workload");
    }

    #[test]
    fn a_connection_decodes_a_repeated_value_once() {
        let local = Local::new(&workload());
        let mut cache = None;
        let mut h = HeaderMap::new();
        local.inject(&mut h);
        let first = local.take(&mut h.clone(), &mut cache).peer.unwrap();
        let second = local.take(&mut h, &mut cache).peer.unwrap();
        assert!(Arc::ptr_eq(&first, &second));
    }
}
