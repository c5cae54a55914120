//! Prometheus metrics with Istio's standard names and labels, so the dashboards that read a
//! sidecar's metrics (Grafana's Istio dashboards, Kiali) read Outrigger's unchanged.
//!
//! Istio's standard metrics (https://istio.io/latest/docs/reference/config/metrics/):
//! "Request Count (istio_requests_total): This is a COUNTER incremented for every request
//! handled by an Istio proxy", "Request Duration (istio_request_duration_milliseconds): This is
//! a DISTRIBUTION which measures the duration of requests", "Request Size
//! (istio_request_bytes): This is a DISTRIBUTION which measures HTTP request body sizes",
//! "Response Size (istio_response_bytes): This is a DISTRIBUTION which measures HTTP response
//! body sizes", "Tcp Byte Sent
//! (istio_tcp_sent_bytes_total)", "Tcp Byte Received (istio_tcp_received_bytes_total)", "Tcp
//! Connections Opened (istio_tcp_connections_opened_total)", "Tcp Connections Closed
//! (istio_tcp_connections_closed_total)", "gRPC Request Message Count
//! (istio_request_messages_total): This is a COUNTER incremented for every gRPC message sent
//! from a client", "gRPC Response Message Count (istio_response_messages_total): This is a
//! COUNTER incremented for every gRPC message sent from a server" (crate::grpc_stats counts
//! them).

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label value shared between connections without copying the string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lv(pub Arc<str>);

impl Lv {
    pub fn new(s: &str) -> Self {
        Lv(Arc::from(s))
    }
    pub fn unknown() -> Self {
        Lv::new("unknown")
    }
}

impl From<&str> for Lv {
    fn from(s: &str) -> Self {
        Lv::new(s)
    }
}

impl EncodeLabelValue for Lv {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

/// The labels Istio's proxies put on `istio_tcp_*` metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: Lv,
    pub source_canonical_service: Lv,
    pub source_canonical_revision: Lv,
    pub source_workload_namespace: Lv,
    pub source_principal: Lv,
    pub source_app: Lv,
    pub source_version: Lv,
    pub source_cluster: Lv,
    pub destination_workload: Lv,
    pub destination_workload_namespace: Lv,
    pub destination_principal: Lv,
    pub destination_app: Lv,
    pub destination_version: Lv,
    pub destination_service: Lv,
    pub destination_canonical_service: Lv,
    pub destination_canonical_revision: Lv,
    pub destination_service_name: Lv,
    pub destination_service_namespace: Lv,
    pub destination_cluster: Lv,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// The labels of `istio_requests_total` and `istio_request_duration_milliseconds`: the TCP
/// labels plus the response.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub conn: TcpLabels,
    pub response_code: u16,
    pub grpc_response_status: Lv,
}

/// The labels of `istio_request_messages_total` and `istio_response_messages_total`: the
/// reporter and the two workloads only. istio_stats.cc (`reportHelper`) adds the message
/// counts with the tags `populatePeerInfo` has pushed by then — before `request_protocol`,
/// `response_code`, `grpc_response_status`, `response_flags` and
/// `connection_security_policy`, which `log` pushes after it — as istio/proxy
/// `testdata/metric/client_request_messages.yaml.tmpl` and `server_response_messages.yaml.tmpl`
/// show. In the order of those templates.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MessageLabels {
    pub reporter: &'static str,
    pub source_workload: Lv,
    pub source_canonical_service: Lv,
    pub source_canonical_revision: Lv,
    pub source_workload_namespace: Lv,
    pub source_principal: Lv,
    pub source_app: Lv,
    pub source_version: Lv,
    pub source_cluster: Lv,
    pub destination_workload: Lv,
    pub destination_workload_namespace: Lv,
    pub destination_principal: Lv,
    pub destination_app: Lv,
    pub destination_version: Lv,
    pub destination_service: Lv,
    pub destination_canonical_service: Lv,
    pub destination_canonical_revision: Lv,
    pub destination_service_name: Lv,
    pub destination_service_namespace: Lv,
    pub destination_cluster: Lv,
}

impl From<&TcpLabels> for MessageLabels {
    fn from(l: &TcpLabels) -> Self {
        MessageLabels {
            reporter: l.reporter,
            source_workload: l.source_workload.clone(),
            source_canonical_service: l.source_canonical_service.clone(),
            source_canonical_revision: l.source_canonical_revision.clone(),
            source_workload_namespace: l.source_workload_namespace.clone(),
            source_principal: l.source_principal.clone(),
            source_app: l.source_app.clone(),
            source_version: l.source_version.clone(),
            source_cluster: l.source_cluster.clone(),
            destination_workload: l.destination_workload.clone(),
            destination_workload_namespace: l.destination_workload_namespace.clone(),
            destination_principal: l.destination_principal.clone(),
            destination_app: l.destination_app.clone(),
            destination_version: l.destination_version.clone(),
            destination_service: l.destination_service.clone(),
            destination_canonical_service: l.destination_canonical_service.clone(),
            destination_canonical_revision: l.destination_canonical_revision.clone(),
            destination_service_name: l.destination_service_name.clone(),
            destination_service_namespace: l.destination_service_namespace.clone(),
            destination_cluster: l.destination_cluster.clone(),
        }
    }
}

/// Why a connection was refused before it reached the application.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RejectLabels {
    pub listener: Lv,
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabels {
    pub source: &'static str,
    pub result: &'static str,
}

/// Why a new certificate set was refused ([`outrigger_tls::TlsError::refusal_reason`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RotationFailureLabels {
    pub reason: &'static str,
}

/// `outrigger_authorization_decisions_total`: the outcome, why, and the deciding policy
/// (`namespace/name`, `-` when no policy decided).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AuthzDecisionLabels {
    pub action: &'static str,
    pub result: &'static str,
    pub policy: Lv,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DecisionLabels {
    pub action: &'static str,
    pub result: &'static str,
}

/// Envoy's default histogram buckets, which Istio's standard histograms use (durations in
/// milliseconds, sizes in bytes) unless `sidecar.istio.io/statsHistogramBuckets` says otherwise.
const DEFAULT_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

fn default_histogram() -> Histogram {
    Histogram::new(DEFAULT_BUCKETS)
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The four per-request series of one label set, looked up once and reused (a lookup hashes
/// two dozen labels).
#[derive(Clone)]
pub struct RequestHandles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestHandles {
    /// One finished request: its duration and its request and response body sizes.
    pub fn record(&self, elapsed: std::time::Duration, request_bytes: u64, response_bytes: u64) {
        self.requests.inc();
        self.duration.observe(elapsed.as_secs_f64() * 1000.0);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

/// Every metric the proxy reports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily<RequestLabels>,
    pub request_bytes: HistogramFamily<RequestLabels>,
    pub response_bytes: HistogramFamily<RequestLabels>,
    /// gRPC messages received from the client and sent by the server (crate::grpc_stats).
    pub request_messages: Family<MessageLabels, Counter>,
    pub response_messages: Family<MessageLabels, Counter>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_received: Family<TcpLabels, Counter>,
    pub tcp_sent: Family<TcpLabels, Counter>,
    pub rejected: Family<RejectLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub rotation_failures: Family<RotationFailureLabels, Counter>,
    pub decisions: Family<AuthzDecisionLabels, Counter>,
    pub jwks_fetches: Family<ReloadLabels, Counter>,
    pub jwt_authn: Family<DecisionLabels, Counter>,
    pub access_log_dropped: Counter,
    /// Spans exported and dropped by the OTLP exporter (crate::trace).
    pub spans: crate::trace::SpanCounters,
    /// Downstream connections open (Envoy: `downstream_cx_active`), as counted against
    /// `connections.max`.
    pub downstream_connections: Gauge,
    /// The most `downstream_connections` has been since the last [`take_peak`]: a burst that
    /// opened and closed between two looks is still seen (not exported).
    ///
    /// [`take_peak`]: Metrics::take_downstream_peak
    pub downstream_connections_peak: Arc<std::sync::atomic::AtomicI64>,
    /// Connections closed by the idle timeout (Envoy: `http.<prefix>.downstream_cx_idle_timeout`
    /// for HTTP, `tcp.<prefix>.idle_timeout` for opaque TCP).
    pub idle_timeouts: Counter,
    /// Requests answered 429 by a local rate limit, by rule (Envoy:
    /// `<stat_prefix>.http_local_rate_limit.rate_limited`).
    pub rate_limited: Family<RuleLabels, Counter>,
    /// When the workload certificate in service expires (Unix seconds), set at each scrape.
    pub certificate_expiry: Gauge,
}

/// The rate limit rule that limited a request (a configured name: bounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The per-request series of `labels` (created on first use).
    pub fn request_handles(&self, labels: &RequestLabels) -> RequestHandles {
        RequestHandles {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.request_duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }

    /// Counts a request limited by the rate limit rule `rule`.
    pub fn rate_limited(&self, rule: &str) {
        self.rate_limited
            .get_or_create(&RuleLabels {
                rule: rule.to_string(),
            })
            .inc();
    }

    /// The open downstream connections now, and the most there have been since the last call.
    pub fn take_downstream_peak(&self) -> (i64, i64) {
        let now = self.downstream_connections.get();
        let peak = self
            .downstream_connections_peak
            .swap(now, std::sync::atomic::Ordering::Relaxed);
        (now, peak.max(now))
    }

    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let histograms =
            || HistogramFamily::<RequestLabels>::new_with_constructor(default_histogram);
        let request_duration = histograms();
        let request_bytes = histograms();
        let response_bytes = histograms();
        let request_messages = Family::<MessageLabels, Counter>::default();
        let response_messages = Family::<MessageLabels, Counter>::default();
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        let tcp_received = Family::<TcpLabels, Counter>::default();
        let tcp_sent = Family::<TcpLabels, Counter>::default();
        let rejected = Family::<RejectLabels, Counter>::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        let rotation_failures = Family::<RotationFailureLabels, Counter>::default();
        let decisions = Family::<AuthzDecisionLabels, Counter>::default();
        let access_log_dropped = Counter::default();
        let spans = crate::trace::SpanCounters::default();
        let jwks_fetches = Family::<ReloadLabels, Counter>::default();
        let jwt_authn = Family::<DecisionLabels, Counter>::default();
        let downstream_connections = Gauge::default();
        let idle_timeouts = Counter::default();
        let rate_limited = Family::<RuleLabels, Counter>::default();
        let certificate_expiry = Gauge::default();
        registry.register(
            "outrigger_certificate_expiry_timestamp_seconds",
            "When the workload certificate in service expires, in Unix seconds (alert on it minus time())",
            certificate_expiry.clone(),
        );
        registry.register(
            "outrigger_rate_limited",
            "Requests answered 429 local_rate_limited, by rateLimits rule",
            rate_limited.clone(),
        );
        registry.register(
            "outrigger_downstream_connections",
            "Mesh-facing downstream connections open (direct, HBONE connections and HBONE streams), as counted against connections.max",
            downstream_connections.clone(),
        );
        registry.register(
            "outrigger_downstream_idle_timeouts",
            "Connections closed by connections.idleTimeout: HTTP with no request in progress, TCP with no byte moved either way",
            idle_timeouts.clone(),
        );
        registry.register(
            "outrigger_jwks_fetches",
            "JWKS and OpenID discovery fetches, by result (errors keep the last good keys)",
            jwks_fetches.clone(),
        );
        registry.register(
            "outrigger_jwt_authentications",
            "RequestAuthentication outcomes: action allow|deny, result no_token|verified|invalid",
            jwt_authn.clone(),
        );
        // prometheus-client appends `_total` to counters.
        registry.register(
            "istio_requests",
            "Requests handled by this proxy",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Duration of requests, from the first byte received to the last byte sent",
            request_duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "HTTP request body sizes in bytes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "HTTP response body sizes in bytes",
            response_bytes.clone(),
        );
        registry.register(
            "istio_request_messages",
            "gRPC messages sent by the client",
            request_messages.clone(),
        );
        registry.register(
            "istio_response_messages",
            "gRPC messages sent by the server",
            response_messages.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the downstream peer on TCP connections",
            tcp_received.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the downstream peer on TCP connections",
            tcp_sent.clone(),
        );
        registry.register(
            "outrigger_connections_rejected",
            "Connections refused before reaching the application, by reason",
            rejected.clone(),
        );
        registry.register(
            "outrigger_config_reloads",
            "Policy and certificate reloads, by result",
            reloads.clone(),
        );
        registry.register(
            "outrigger_certificate_rotation_failures",
            "New workload certificate sets refused (the current one stays in service), by the \
             check that failed",
            rotation_failures.clone(),
        );
        registry.register(
            "outrigger_authorization_decisions",
            "Authorization decisions, by outcome (action), reason (result) and deciding policy (namespace/name, - for none)",
            decisions.clone(),
        );
        registry.register(
            "outrigger_access_log_dropped",
            "Access log lines dropped because the log writer could not keep up",
            access_log_dropped.clone(),
        );
        registry.register(
            "outrigger_tracing_spans_exported",
            "Spans the OTLP collector accepted",
            spans.exported.clone(),
        );
        registry.register(
            "outrigger_tracing_spans_dropped",
            "Spans dropped: the export queue was full, or the collector failed or was too slow",
            spans.dropped.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            request_bytes,
            response_bytes,
            request_messages,
            response_messages,
            tcp_opened,
            tcp_closed,
            tcp_received,
            tcp_sent,
            rejected,
            reloads,
            rotation_failures,
            decisions,
            jwks_fetches,
            jwt_authn,
            access_log_dropped,
            spans,
            downstream_connections,
            downstream_connections_peak: Default::default(),
            idle_timeouts,
            rate_limited,
            certificate_expiry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Adds the bytes counted on a connection since the last call to the TCP byte counters
    /// (called periodically for long-lived connections and once at close).
    pub fn publish_tcp_bytes(
        &self,
        labels: &TcpLabels,
        counts: &crate::io::ByteCounts,
        published: &mut (u64, u64),
    ) {
        let (r, s) = (counts.received(), counts.sent());
        if r > published.0 {
            self.tcp_received
                .get_or_create(labels)
                .inc_by(r - published.0);
        }
        if s > published.1 {
            self.tcp_sent.get_or_create(labels).inc_by(s - published.1);
        }
        *published = (r, s);
    }

    /// Counts a certificate rotation: `outrigger_config_reloads_total{source="certificate"}`
    /// by result, and each refused set by reason.
    pub fn certificate_rotation(&self, event: &outrigger_tls::RotationEvent<'_>) {
        let result = match event {
            outrigger_tls::RotationEvent::Rotated { .. } => "success",
            outrigger_tls::RotationEvent::Refused { reason, .. } => {
                self.rotation_failures
                    .get_or_create(&RotationFailureLabels { reason })
                    .inc();
                "error"
            }
        };
        self.reloads
            .get_or_create(&ReloadLabels {
                source: "certificate",
                result,
            })
            .inc();
    }

    pub fn reject(&self, listener: &Lv, reason: &'static str) {
        self.rejected
            .get_or_create(&RejectLabels {
                listener: listener.clone(),
                reason,
            })
            .inc();
    }
}

/// The destination half of the labels: fixed for the life of the proxy.
pub fn destination_labels(w: &crate::workload::WorkloadInfo) -> TcpLabels {
    let or_unknown = |s: &str| {
        if s.is_empty() {
            Lv::unknown()
        } else {
            Lv::new(s)
        }
    };
    // istio_stats.cc, server reporter: `destination_service` is the service host, else the
    // canonical service name; `destination_service_name` the service's name (see
    // `istio_service_name`), else the canonical service name.
    let (service, service_name) = match &w.service_host {
        Some(h) => (Lv::new(h), Lv::new(istio_service_name(h).0)),
        None => (
            or_unknown(&w.canonical_service),
            or_unknown(&w.canonical_service),
        ),
    };
    TcpLabels {
        reporter: "destination",
        source_workload: Lv::unknown(),
        source_canonical_service: Lv::unknown(),
        // istio_stats.cc (server reporter): the peer's canonical revision, else `latest`.
        source_canonical_revision: Lv::new("latest"),
        source_workload_namespace: Lv::unknown(),
        source_principal: Lv::unknown(),
        source_app: Lv::unknown(),
        source_version: Lv::unknown(),
        source_cluster: Lv::unknown(),
        destination_workload: or_unknown(&w.name),
        destination_workload_namespace: or_unknown(&w.namespace),
        destination_principal: Lv::new(&w.identity.to_string()),
        destination_app: or_unknown(&w.app),
        destination_version: or_unknown(&w.version),
        destination_service: service,
        destination_canonical_service: or_unknown(&w.canonical_service),
        destination_canonical_revision: or_unknown(&w.canonical_revision),
        destination_service_name: service_name,
        destination_service_namespace: or_unknown(&w.namespace),
        destination_cluster: or_unknown(&w.cluster),
        request_protocol: "tcp",
        response_flags: "-",
        connection_security_policy: "none",
    }
}

/// The calling workload's labels from Istio's metadata exchange (crate::peer_metadata), as
/// the server reporter fills them (istio/proxy `istio_stats.cc`, `Reporter::ServerSidecar`):
/// each label from the peer's metadata, `unknown` where it sent none — except the canonical
/// revision, `latest` — and the namespace from the certificate when there is one.
pub fn apply_source_peer(l: &mut TcpLabels, peer: &crate::peer_metadata::PeerMetadata) {
    let or = |s: &str, default: &'static str| {
        if s.is_empty() {
            Lv::new(default)
        } else {
            Lv::new(s)
        }
    };
    l.source_workload = or(&peer.workload, "unknown");
    l.source_canonical_service = or(&peer.canonical_service, "unknown");
    l.source_canonical_revision = or(&peer.canonical_revision, "latest");
    l.source_app = or(&peer.app, "unknown");
    l.source_version = or(&peer.version, "unknown");
    l.source_cluster = or(&peer.cluster, "unknown");
    if l.source_workload_namespace.0.as_ref() == "unknown" && !peer.namespace.is_empty() {
        l.source_workload_namespace = Lv::new(&peer.namespace);
    }
}

/// The called workload's labels from the exchange, as the client reporter fills them
/// (`Reporter::ClientSidecar`): the destination namespace from the server's certificate first
/// (`destination_principal` is set from it before this is called), the canonical revision
/// `latest` when the peer sent none.
pub fn apply_destination_peer(l: &mut TcpLabels, peer: &crate::peer_metadata::PeerMetadata) {
    let or = |s: &str, default: &'static str| {
        if s.is_empty() {
            Lv::new(default)
        } else {
            Lv::new(s)
        }
    };
    l.destination_workload = or(&peer.workload, "unknown");
    l.destination_canonical_service = or(&peer.canonical_service, "unknown");
    l.destination_canonical_revision = or(&peer.canonical_revision, "latest");
    l.destination_app = or(&peer.app, "unknown");
    l.destination_version = or(&peer.version, "unknown");
    l.destination_cluster = or(&peer.cluster, "unknown");
    if l.destination_workload_namespace.0.as_ref() == "unknown" && !peer.namespace.is_empty() {
        l.destination_workload_namespace = Lv::new(&peer.namespace);
    }
    if l.destination_service_namespace.0.as_ref() == "unknown" && !peer.namespace.is_empty() {
        l.destination_service_namespace = Lv::new(&peer.namespace);
    }
}

/// The labels of one downstream connection: the destination labels plus what the peer's
/// certificate says. Istio fills `source_workload` from peer metadata exchange, which a
/// certificate alone does not carry; the namespace comes from the SPIFFE ID.
pub fn connection_labels(
    dest: &TcpLabels,
    peer: Option<&outrigger_identity::Identity>,
) -> TcpLabels {
    let mut l = dest.clone();
    if let Some(id) = peer {
        l.source_principal = Lv::new(&id.to_string());
        if let Some(ns) = id.namespace() {
            l.source_workload_namespace = Lv::new(ns);
        }
        l.connection_security_policy = "mutual_tls";
    }
    l
}

/// The source half of the labels for `reporter="source"` (outbound): this workload is the
/// source. Istio: "reporter: This identifies the reporter of the request. It is set to
/// `destination` if report is from a server Istio proxy and `source` if report is from a client
/// Istio proxy". The destination's workload labels come from Istio's peer metadata exchange,
/// which a certificate alone does not carry: they stay `unknown`. "connection_security_policy
/// [...] is set to `unknown` when report is from source since security policy cannot be
/// properly populated."
pub fn source_labels(w: &crate::workload::WorkloadInfo) -> TcpLabels {
    let or_unknown = |s: &str| {
        if s.is_empty() {
            Lv::unknown()
        } else {
            Lv::new(s)
        }
    };
    TcpLabels {
        reporter: "source",
        source_workload: or_unknown(&w.name),
        source_canonical_service: or_unknown(&w.canonical_service),
        source_canonical_revision: or_unknown(&w.canonical_revision),
        source_workload_namespace: or_unknown(&w.namespace),
        source_principal: Lv::new(&w.identity.to_string()),
        source_app: or_unknown(&w.app),
        source_version: or_unknown(&w.version),
        source_cluster: or_unknown(&w.cluster),
        destination_workload: Lv::unknown(),
        destination_workload_namespace: Lv::unknown(),
        destination_principal: Lv::unknown(),
        destination_app: Lv::unknown(),
        destination_version: Lv::unknown(),
        destination_service: Lv::unknown(),
        destination_canonical_service: Lv::unknown(),
        // istio_stats.cc (client reporter): the peer's canonical revision, else `latest`.
        destination_canonical_revision: Lv::new("latest"),
        destination_service_name: Lv::unknown(),
        destination_service_namespace: Lv::unknown(),
        destination_cluster: Lv::unknown(),
        request_protocol: "http",
        response_flags: "-",
        connection_security_policy: "unknown",
    }
}

/// The name and namespace Istio gives the service `host` in its metrics
/// (`destination_service_name`, `destination_service_namespace`): istio_stats.cc reads them
/// from the `name` and `namespace` of the cluster's `istio.services` metadata, which istiod
/// writes from the service's attributes (istio/istio `pilot/pkg/networking/core/cluster.go`,
/// `buildServiceMetadata`). A Kubernetes Service (`name.ns.svc[.domain]`) is named by its
/// first label, in the namespace of its second; a ServiceEntry host is named by the whole
/// host (`pilot/pkg/serviceregistry/serviceentry/conversion.go`: `Name: ha.host`), in the
/// ServiceEntry's namespace, which a host name does not say. Kiali finds the ServiceEntry of
/// a service node by that whole host (kiali `graph/telemetry/istio/appender/service_entry.go`,
/// `getServiceEntry`), and two external hosts sharing a first label stay two nodes.
pub fn istio_service_name(host: &str) -> (&str, Option<&str>) {
    let mut parts = host.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(name), Some(ns), Some("svc")) if !name.is_empty() && !ns.is_empty() => {
            (name, Some(ns))
        }
        _ => (host, None),
    }
}

/// `source` labels for a call to the service `host`: `destination_service` is the host,
/// `destination_service_name` and, for a Kubernetes Service, `destination_service_namespace`
/// as [`istio_service_name`] says (what istiod writes in the cluster's `istio.services`
/// metadata). `destination_workload_namespace` stays `unknown`: istio_stats.cc
/// (`Reporter::ClientSidecar`) fills it only from what identifies the server once connected —
/// the namespace of its certificate's SPIFFE ID, else its peer metadata, else the endpoint's
/// metadata from istiod — never from the service's name, so a request that reached no server
/// (`UH`, `UF`) reports it `unknown`, which is what Kiali's "reached no workload" query
/// (`destination_workload_namespace="unknown"`) looks for.
pub fn destination_service_labels(source: &TcpLabels, host: &str) -> TcpLabels {
    let mut l = source.clone();
    let (name, namespace) = istio_service_name(host);
    l.destination_service = Lv::new(host);
    l.destination_service_name = Lv::new(name);
    if let Some(ns) = namespace {
        l.destination_service_namespace = Lv::new(ns);
    }
    l
}

/// Istio's catch-all clusters, which name the destination service of traffic to a host that
/// is not a mesh service (istio/istio `pilot/pkg/networking/util/util.go`:
/// `PassthroughCluster`, route `allow_any`; `BlackHoleCluster`, route `block_all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchAll {
    /// Sent on as it is (`outboundTrafficPolicy: ALLOW_ANY`; Outrigger's `allowPlainEgress`).
    Passthrough,
    /// Refused with a 502 (`REGISTRY_ONLY`; Outrigger without `allowPlainEgress`).
    BlackHole,
}

/// `source` labels for a request the catch-all route took: istio_stats.cc
/// (`populatePeerInfo`) sets `destination_service_name` to `PassthroughCluster` or
/// `BlackHoleCluster` when the route is `allow_any` or `block_all`, and
/// `destination_service` to the request's `Host` header as it came (port included), since no
/// cluster metadata names a service; `destination_service_namespace` and the workload labels
/// come from the server's certificate or metadata only, which plain egress and a refusal
/// never have: `unknown`.
pub fn catch_all_labels(source: &TcpLabels, host_header: &str, route: CatchAll) -> TcpLabels {
    let mut l = source.clone();
    l.destination_service = Lv::new(host_header);
    l.destination_service_name = Lv::new(match route {
        CatchAll::Passthrough => "PassthroughCluster",
        CatchAll::BlackHole => "BlackHoleCluster",
    });
    l
}

/// The server's certificate on the source side (istio_stats.cc, `Reporter::ClientSidecar`):
/// `destination_principal` is its URI SAN, and the SPIFFE ID's namespace is
/// `destination_workload_namespace` ("fallback from using the namespace from SAN if available
/// to using peer metadata") and, when the service's own namespace is not known,
/// `destination_service_namespace` (`service_namespace`, else `peer_namespace`).
pub fn apply_destination_principal(l: &mut TcpLabels, principal: &Lv) {
    l.destination_principal = principal.clone();
    if let Some(ns) = spiffe_namespace(&principal.0) {
        l.destination_workload_namespace = Lv::new(ns);
        if l.destination_service_namespace.0.as_ref() == "unknown" {
            l.destination_service_namespace = Lv::new(ns);
        }
    }
}

/// The namespace of a SPIFFE ID `spiffe://<td>/ns/<ns>/sa/<sa>` (istio_stats.cc
/// `getNamespace`).
pub fn spiffe_namespace(principal: &str) -> Option<&str> {
    let rest = principal.strip_prefix("spiffe://")?;
    let (_, path) = rest.split_once('/')?;
    let ns = path.strip_prefix("ns/")?.split('/').next()?;
    (!ns.is_empty()).then_some(ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::WorkloadInfo;

    /// `destination_service_name` / `_namespace` as istiod names the service: a Kubernetes
    /// Service by its first label and namespace, a ServiceEntry host by the whole host (the
    /// name Kiali matches a ServiceEntry by), on both reporters.
    #[test]
    fn service_names_are_istios() {
        let source = source_labels(&WorkloadInfo::test_billing(None));
        for (host, name, ns) in [
            ("ratings.default.svc.cluster.local", "ratings", "default"),
            ("ratings.default.svc", "ratings", "default"),
            ("api.example.com", "api.example.com", "unknown"),
            ("db.corp.internal", "db.corp.internal", "unknown"),
            ("ratings", "ratings", "unknown"),
            ("10.1.2.3", "10.1.2.3", "unknown"),
            (".x.svc", ".x.svc", "unknown"),
        ] {
            let l = destination_service_labels(&source, host);
            assert_eq!(&*l.destination_service.0, host);
            assert_eq!(
                (
                    &*l.destination_service_name.0,
                    &*l.destination_service_namespace.0
                ),
                (name, ns),
                "{host}"
            );
        }
        for (host, name) in [
            ("billing.legacy.svc.cluster.local", "billing"),
            ("billing.corp.example", "billing.corp.example"),
        ] {
            let l = destination_labels(&WorkloadInfo::test_billing(Some(host)));
            assert_eq!(&*l.destination_service.0, host);
            assert_eq!(&*l.destination_service_name.0, name, "{host}");
            // The server reporter's service namespace is its own (istio_stats.cc).
            assert_eq!(&*l.destination_service_namespace.0, "legacy");
        }
        let l = destination_labels(&WorkloadInfo::test_billing(None));
        assert_eq!(
            (&*l.destination_service.0, &*l.destination_service_name.0),
            ("billing", "billing")
        );
    }

    #[test]
    fn names_and_labels_are_istios() {
        let m = Metrics::new();
        let conn = TcpLabels {
            reporter: "destination",
            source_workload: Lv::unknown(),
            source_canonical_service: Lv::unknown(),
            source_canonical_revision: Lv::unknown(),
            source_workload_namespace: Lv::new("default"),
            source_principal: Lv::new("spiffe://cluster.local/ns/default/sa/sleep"),
            source_app: Lv::unknown(),
            source_version: Lv::unknown(),
            source_cluster: Lv::unknown(),
            destination_workload: Lv::new("app"),
            destination_workload_namespace: Lv::new("legacy"),
            destination_principal: Lv::new("spiffe://cluster.local/ns/legacy/sa/app"),
            destination_app: Lv::new("app"),
            destination_version: Lv::unknown(),
            destination_service: Lv::unknown(),
            destination_canonical_service: Lv::new("app"),
            destination_canonical_revision: Lv::new("latest"),
            destination_service_name: Lv::unknown(),
            destination_service_namespace: Lv::new("legacy"),
            destination_cluster: Lv::new("Kubernetes"),
            request_protocol: "http",
            response_flags: "-",
            connection_security_policy: "mutual_tls",
        };
        let labels = RequestLabels {
            conn: conn.clone(),
            response_code: 200,
            grpc_response_status: Lv::new(""),
        };
        m.request_handles(&labels)
            .record(std::time::Duration::from_millis(3), 120, 4096);
        m.tcp_opened.get_or_create(&conn).inc();
        let text = m.encode();
        // Istio's standard HTTP histograms, on Envoy's default buckets.
        for (name, sum) in [
            ("istio_request_duration_milliseconds", "3.0"),
            ("istio_request_bytes", "120.0"),
            ("istio_response_bytes", "4096.0"),
        ] {
            let line = format!("{name}_sum{{reporter=\"destination\"");
            let l = text
                .lines()
                .find(|l| l.starts_with(&line))
                .unwrap_or_else(|| panic!("no {name}_sum:\n{text}"));
            assert!(l.ends_with(&format!(" {sum}")), "{l}");
            assert!(
                text.contains(&format!("{name}_bucket{{")) && text.contains("le=\"3600000.0\""),
                "{text}"
            );
        }
        assert!(
            text.contains("istio_requests_total{reporter=\"destination\""),
            "{text}"
        );
        assert!(text.contains("response_code=\"200\""), "{text}");
        assert!(text.contains("connection_security_policy=\"mutual_tls\""));
        assert!(text.contains("istio_request_duration_milliseconds_bucket{"));
        assert!(text.contains("istio_tcp_connections_opened_total{"));
        assert!(text.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\""));
    }
}
