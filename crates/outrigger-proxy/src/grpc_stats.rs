//! Istio's gRPC message counters, `istio_request_messages_total` and
//! `istio_response_messages_total`, counted and written as a sidecar does, on both reporters.
//!
//! In a sidecar two filters share the work. Envoy's `grpc_stats` filter, which istiod puts on
//! every HTTP connection manager with `emit_filter_state: true` (istio/istio
//! `pilot/pkg/xds/filters/filters.go`, `GrpcStats`; added in
//! `pilot/pkg/networking/core/listener_builder.go`, `buildHTTPConnectionManager`, after the
//! authentication and authorization filters), counts the messages of a gRPC request's body
//! and of its response's body (envoyproxy/envoy
//! `source/extensions/filters/http/grpc_stats/grpc_stats_filter.cc`: `decodeData` and
//! `encodeData`, with crate::grpc_frames's counting) and, from the first message counted,
//! keeps the two totals in the stream's filter state (`maybeWriteFilterState`). Istio's stats
//! filter (envoyproxy/envoy `contrib/istio/filters/http/istio_stats/source/istio_stats.cc`,
//! formerly istio/proxy `source/extensions/filters/http/istio_stats/istio_stats.cc`) reads them
//! in `reportHelper`: for a gRPC request (`is_grpc_`), once the peer is known, periodically and
//! at the end of the stream, it adds what was counted since its last report to the two
//! counters, labelled with the reporter and the peer labels only
//! ([`crate::metrics::MessageLabels`]).
//!
//! Here the body wrappers count (request: [`RequestCount`] inside
//! `crate::http_common::Metered`; response: [`GrpcStats::response_data`] where the response
//! body already counts its bytes), and each count is published as soon as the peer labels are
//! known — the sidecar's periodic report with no period, so a scrape never lags a sidecar's
//! and the totals at the end are the same. When a request counts nothing, there is no filter
//! state and no series, as in a sidecar; once anything is counted both series exist (a
//! sidecar adds both deltas, zero or not).
//!
//! Which requests and responses: Envoy's `Grpc::Common::isGrpcRequestHeaders` (a `:path` and a
//! gRPC content type) for the request, which both filters test (`grpc_request_`, `is_grpc_`),
//! and `isGrpcResponseHeaders` for the response (status 200 and a gRPC content type); a gRPC
//! content type is `application/grpc` or `application/grpc+…`, not `application/grpc-web`
//! (`source/common/grpc/common.cc`, `hasGrpcContentType`). Any other request pays for one
//! header comparison and an empty `Option`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::metrics::counter::Counter;

use crate::grpc_frames::FrameCounter;
use crate::metrics::{MessageLabels, Metrics, TcpLabels};

/// Envoy `Grpc::Common::hasGrpcContentType`: "Content type is gRPC if it is exactly
/// "application/grpc" or starts with "application/grpc+". Specifically, something like
/// application/grpc-web is not gRPC."
fn has_grpc_content_type(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().strip_prefix(b"application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.first() == Some(&b'+'))
}

/// Istio's `request_protocol` and `grpc_response_status` labels of a request's series, as
/// istio_stats.cc `log` sets them: `grpc` and a gRPC status only for a request the stats
/// filter saw as gRPC (`is_grpc_`, from the request's headers in `decodeHeaders`; a request
/// refused by an earlier filter never reaches it, so `is_grpc` is whether this request got a
/// [`GrpcStats`]), else `http` and an empty status. The status is Envoy's
/// `Grpc::Common::getGrpcStatus(trailers, headers, info)` (`source/common/grpc/common.cc`):
/// the `grpc-status` of the trailers, else of the headers (`last_grpc_status`: the last
/// non-empty one seen), else the HTTP status mapped by `httpToGrpcStatus`, else (no answer,
/// `response_code` 0) empty.
pub(crate) fn protocol_labels(
    is_grpc: bool,
    last_grpc_status: Option<&str>,
    response_code: u16,
) -> (&'static str, Option<i64>) {
    if !is_grpc {
        return ("http", None);
    }
    let status = match last_grpc_status {
        Some(s) => Some(parse_grpc_status(s)),
        None if response_code != 0 => Some(http_to_grpc_status(response_code)),
        None => None,
    };
    ("grpc", status)
}

/// A status of [`protocol_labels`] as its label value (only -1 to 16 occur), without
/// formatting it per request.
pub(crate) fn status_label(status: i64) -> &'static str {
    const LABELS: [&str; 18] = [
        "-1", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
        "16",
    ];
    usize::try_from(status + 1)
        .ok()
        .and_then(|i| LABELS.get(i))
        .copied()
        .unwrap_or("-1")
}

/// A `grpc-status` header or trailer as sent, for [`protocol_labels`]: `None` when empty (Envoy
/// reads an empty value as absent); a value that is not text is kept as one that does not parse.
pub(crate) fn sent_status(v: &http::HeaderValue) -> Option<crate::metrics::Lv> {
    (!v.is_empty()).then(|| crate::metrics::Lv::new(v.to_str().unwrap_or("?")))
}

/// Envoy `Grpc::Common::getGrpcStatus(const ResponseHeaderOrTrailerMap&, false)` for a non-empty
/// value: `absl::SimpleAtoi` into a `uint64_t` (surrounding ASCII whitespace and a `+` sign
/// allowed), and `InvalidCode` (-1) for anything else or above `MaximumKnown` (16,
/// `Unauthenticated`).
fn parse_grpc_status(v: &str) -> i64 {
    let t = v.trim_ascii();
    let t = t.strip_prefix('+').unwrap_or(t);
    match t.parse::<u64>() {
        Ok(n) if n <= 16 && t.bytes().all(|b| b.is_ascii_digit()) => n as i64,
        _ => -1,
    }
}

/// Envoy `Grpc::Utility::httpToGrpcStatus` (`source/common/grpc/status.cc`, after gRPC's
/// `doc/http-grpc-status-mapping.md`).
fn http_to_grpc_status(code: u16) -> i64 {
    match code {
        400 => 13,                   // Internal
        401 => 16,                   // Unauthenticated
        403 => 7,                    // PermissionDenied
        404 => 12,                   // Unimplemented
        429 | 502 | 503 | 504 => 14, // Unavailable
        _ => 2,                      // Unknown
    }
}

/// The index of the request's count in [`Tally`]'s arrays, and of the response's.
const REQUEST: usize = 0;
const RESPONSE: usize = 1;

/// One gRPC request's counts, shared by its request body (on its way to the server) and the
/// response's side (on its way to the client): the `GrpcStatsObject` Envoy's filter state
/// holds, and what istio_stats.cc has reported of it (`request_message_count_`,
/// `response_message_count_`).
struct Tally {
    /// Messages counted: [`REQUEST`], [`RESPONSE`].
    counted: [AtomicU64; 2],
    /// Of which added to the counters already.
    published: [AtomicU64; 2],
    /// Set once, when the peer labels are known (istio_stats.cc `peer_read_`, or the end of
    /// the stream): the labels are those of that moment (`populatePeerInfo` runs once).
    series: OnceLock<Series>,
}

struct Series {
    metrics: Arc<Metrics>,
    labels: MessageLabels,
    /// Created at the first report with something counted.
    counters: OnceLock<[Counter; 2]>,
}

impl Tally {
    fn add(&self, direction: usize, n: u64) {
        if let Some(c) = self.counted.get(direction) {
            c.fetch_add(n, Ordering::Relaxed);
        }
        // Paired with the fence in `GrpcStats::peer_known`: a count added while the labels
        // are being set is seen by this report or by that one (with the two fences, the two
        // threads cannot each miss the other's write).
        std::sync::atomic::fence(Ordering::SeqCst);
        self.report();
    }

    /// istio_stats.cc `reportHelper`: the counts since the last report, once the labels are
    /// known and the filter state exists (something was counted). The request and the
    /// response sides may report at once: `fetch_max` hands each message to one of them.
    fn report(&self) {
        let Some(series) = self.series.get() else {
            return;
        };
        let counted = [REQUEST, RESPONSE].map(|i| self.counted[i].load(Ordering::Relaxed));
        if counted == [0, 0] {
            return;
        }
        // In the order of `counted`: [`REQUEST`], [`RESPONSE`].
        let counters = series.counters.get_or_init(|| {
            [
                series
                    .metrics
                    .request_messages
                    .get_or_create(&series.labels)
                    .clone(),
                series
                    .metrics
                    .response_messages
                    .get_or_create(&series.labels)
                    .clone(),
            ]
        });
        for ((now, published), counter) in counted.iter().zip(&self.published).zip(counters) {
            let before = published.fetch_max(*now, Ordering::Relaxed);
            if *now > before {
                counter.inc_by(*now - before);
            }
        }
    }
}

/// A gRPC request's message counting, held by the request's recorder.
pub(crate) struct GrpcStats {
    tally: Arc<Tally>,
    /// The response's body counter, once the response is known to be gRPC.
    response: Option<FrameCounter>,
}

impl GrpcStats {
    /// Counting for a request whose headers say gRPC (Envoy `isGrpcRequestHeaders`); `None`
    /// for any other.
    pub(crate) fn for_request(parts: &http::request::Parts) -> Option<Self> {
        // Envoy: `if (!headers.Path()) return false;` — an HTTP/2 CONNECT has no `:path`.
        if parts.method == http::Method::CONNECT || !has_grpc_content_type(&parts.headers) {
            return None;
        }
        Some(GrpcStats {
            tally: Arc::new(Tally {
                counted: Default::default(),
                published: Default::default(),
                series: OnceLock::new(),
            }),
            response: None,
        })
    }

    /// The counter for the request body, given to `crate::http_common::Metered`.
    pub(crate) fn request_body(&self) -> RequestCount {
        RequestCount {
            frames: FrameCounter::request(),
            tally: self.tally.clone(),
        }
    }

    /// The response's headers have come: its body is counted when it is gRPC (Envoy
    /// `isGrpcResponseHeaders`: status 200 and a gRPC content type; a trailers-only answer
    /// has no body to count).
    pub(crate) fn response_headers(&mut self, parts: &http::response::Parts) {
        if parts.status == http::StatusCode::OK && has_grpc_content_type(&parts.headers) {
            self.response = Some(FrameCounter::response());
        }
    }

    /// A chunk of the response body on its way to the client.
    pub(crate) fn response_data(&mut self, chunk: &[u8]) {
        if let Some(frames) = &mut self.response {
            let n = frames.inspect(chunk);
            if n > 0 {
                self.tally.add(RESPONSE, n);
            }
        }
    }

    /// The peer is known (istio_stats.cc `peer_read_`: the metadata exchange has run, or the
    /// stream ended): from now on what is counted is published with these labels, the peer
    /// labels of the request's `istio_requests_total` series. The first call sets them;
    /// later calls only publish.
    pub(crate) fn peer_known(&self, metrics: &Arc<Metrics>, labels: &TcpLabels) {
        if self.tally.series.get().is_none() {
            let _ = self.tally.series.set(Series {
                metrics: metrics.clone(),
                labels: MessageLabels::from(labels),
                counters: OnceLock::new(),
            });
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        self.tally.report();
    }
}

/// Counts the messages of a gRPC request body (Envoy `grpc_stats` `decodeData`).
pub(crate) struct RequestCount {
    frames: FrameCounter,
    tally: Arc<Tally>,
}

impl RequestCount {
    pub(crate) fn data(&mut self, chunk: &[u8]) {
        let n = self.frames.inspect(chunk);
        if n > 0 {
            self.tally.add(REQUEST, n);
        }
    }
}

#[cfg(test)]
mod status_tests {
    use super::*;

    /// istio_stats.cc `log` with Envoy's `getGrpcStatus` and `httpToGrpcStatus`.
    #[test]
    fn protocol_and_grpc_status_labels_are_istios() {
        // Not gRPC: `http` and an empty status, whatever the answer carried.
        assert_eq!(protocol_labels(false, Some("0"), 200), ("http", None));
        // gRPC: the status sent.
        assert_eq!(protocol_labels(true, Some("0"), 200), ("grpc", Some(0)));
        assert_eq!(protocol_labels(true, Some("14"), 200), ("grpc", Some(14)));
        assert_eq!(protocol_labels(true, Some(" +5 "), 200), ("grpc", Some(5)));
        // Not a number, or above Unauthenticated (16): InvalidCode.
        for bad in ["17", "x", "-1", "1 2", "99999999999999999999999"] {
            assert_eq!(
                protocol_labels(true, Some(bad), 200),
                ("grpc", Some(-1)),
                "{bad}"
            );
        }
        assert_eq!(protocol_labels(true, Some("16"), 200), ("grpc", Some(16)));
        // No grpc-status: the HTTP status, mapped.
        for (code, want) in [
            (200, 2),
            (400, 13),
            (401, 16),
            (403, 7),
            (404, 12),
            (429, 14),
            (500, 2),
            (502, 14),
            (503, 14),
            (504, 14),
        ] {
            assert_eq!(
                protocol_labels(true, None, code),
                ("grpc", Some(want)),
                "{code}"
            );
        }
        // No answer at all: empty.
        assert_eq!(protocol_labels(true, None, 0), ("grpc", None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(content_type: Option<&str>, method: http::Method) -> http::request::Parts {
        let mut b = http::Request::builder()
            .method(method)
            .uri("/pkg.Svc/Method");
        if let Some(ct) = content_type {
            b = b.header("content-type", ct);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn response(status: u16, content_type: &str) -> http::response::Parts {
        http::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn labels() -> TcpLabels {
        crate::metrics::source_labels(&crate::workload::WorkloadInfo::test_billing(None))
    }

    fn message(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    /// The two counters' values in the exposition (`None`: no series).
    fn values(m: &Metrics) -> (Option<u64>, Option<u64>) {
        let text = m.encode();
        let get = |name: &str| {
            let series: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("{name}{{")))
                .collect();
            assert!(series.len() <= 1, "{text}");
            series
                .first()
                .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        };
        (
            get("istio_request_messages_total"),
            get("istio_response_messages_total"),
        )
    }

    /// The label names, in order, of istio/proxy
    /// `testdata/metric/client_request_messages.yaml.tmpl` (and the server's).
    #[test]
    fn labels_are_the_sidecars() {
        let metrics = Arc::new(Metrics::new());
        let g =
            GrpcStats::for_request(&request(Some("application/grpc"), http::Method::POST)).unwrap();
        g.request_body().data(&message(b""));
        g.peer_known(&metrics, &labels());
        let text = metrics.encode();
        for name in [
            "istio_request_messages_total",
            "istio_response_messages_total",
        ] {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{name}{{")))
                .unwrap();
            let inside = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
            let names: Vec<&str> = inside
                .split("\",")
                .map(|kv| kv.split('=').next().unwrap())
                .collect();
            assert_eq!(
                names,
                [
                    "reporter",
                    "source_workload",
                    "source_canonical_service",
                    "source_canonical_revision",
                    "source_workload_namespace",
                    "source_principal",
                    "source_app",
                    "source_version",
                    "source_cluster",
                    "destination_workload",
                    "destination_workload_namespace",
                    "destination_principal",
                    "destination_app",
                    "destination_version",
                    "destination_service",
                    "destination_canonical_service",
                    "destination_canonical_revision",
                    "destination_service_name",
                    "destination_service_namespace",
                    "destination_cluster",
                ],
                "{line}"
            );
        }
    }

    /// Envoy `hasGrpcContentType`, and no `:path` for CONNECT.
    #[test]
    fn which_requests_and_responses_are_grpc() {
        for (ct, grpc) in [
            (Some("application/grpc"), true),
            (Some("application/grpc+proto"), true),
            (Some("application/grpc+json"), true),
            (Some("application/grpc-web"), false),
            (Some("application/grpc-web+proto"), false),
            (Some("application/grpcx"), false),
            (Some("application/json"), false),
            (Some("Application/grpc"), false),
            (None, false),
        ] {
            assert_eq!(
                GrpcStats::for_request(&request(ct, http::Method::POST)).is_some(),
                grpc,
                "{ct:?}"
            );
        }
        assert!(
            GrpcStats::for_request(&request(Some("application/grpc"), http::Method::CONNECT))
                .is_none()
        );
        let mut g =
            GrpcStats::for_request(&request(Some("application/grpc"), http::Method::POST)).unwrap();
        g.response_headers(&response(503, "application/grpc"));
        assert!(g.response.is_none());
        g.response_headers(&response(200, "text/plain"));
        assert!(g.response.is_none());
        g.response_headers(&response(200, "application/grpc+proto"));
        assert!(g.response.is_some());
    }

    /// Counted before the peer is known (an outbound request streams before the answer
    /// says who the server is), published when it is, then as it comes; no series while
    /// nothing is counted; both series once anything is.
    #[test]
    fn published_once_the_peer_is_known() {
        let metrics = Arc::new(Metrics::new());
        let mut g =
            GrpcStats::for_request(&request(Some("application/grpc"), http::Method::POST)).unwrap();
        let mut body = g.request_body();
        g.peer_known(&metrics, &labels());
        assert_eq!(values(&metrics), (None, None), "nothing counted: no series");

        let metrics2 = Arc::new(Metrics::new());
        let g2 =
            GrpcStats::for_request(&request(Some("application/grpc"), http::Method::POST)).unwrap();
        let mut body2 = g2.request_body();
        let three: Vec<u8> = (0..3).flat_map(|_| message(b"abc")).collect();
        body2.data(&three[..7]);
        body2.data(&three[7..]);
        assert_eq!(values(&metrics2), (None, None), "peer not known yet");
        g2.peer_known(&metrics2, &labels());
        assert_eq!(values(&metrics2), (Some(3), Some(0)));
        body2.data(&message(b""));
        assert_eq!(values(&metrics2), (Some(4), Some(0)));
        g2.peer_known(&metrics2, &labels());
        assert_eq!(
            values(&metrics2),
            (Some(4), Some(0)),
            "nothing counted twice"
        );

        body.data(&message(b"x"));
        g.response_headers(&response(200, "application/grpc"));
        let two: Vec<u8> = (0..2).flat_map(|_| message(b"yz")).collect();
        for b in &two {
            g.response_data(std::slice::from_ref(b));
        }
        assert_eq!(values(&metrics), (Some(1), Some(2)));
    }
}
