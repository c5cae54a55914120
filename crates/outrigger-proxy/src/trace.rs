//! Distributed tracing: the trace context of a request (W3C `traceparent`/`tracestate`, B3),
//! the sampling decision Envoy's connection manager makes, one span per request, and an OTLP
//! exporter (gRPC or HTTP/protobuf, plaintext or TLS) with a bounded queue.
//!
//! The request path calls [`Tracer::start`] once when a request arrives (after its
//! `x-request-id` is set) and [`ReqTrace::finish`] once when it is over. With tracing off
//! (`tracing:` absent from the configuration) `start` only reads the incoming trace id for the
//! access log, and only when the access log is on.
//!
//! What Envoy does, and so what this follows:
//! - The sampling decision (envoy `source/common/http/conn_manager_utility.cc`,
//!   `mutateTracingRequestHeader`): with `use_request_id_for_trace_sampling` (Istio's default,
//!   istio/istio `pilot/pkg/networking/core/tracing.go` sets `UseRequestIDForTraceSampling`
//!   from the Telemetry API, default true), the request id's first 8 hex digits modulo 10000
//!   are compared with the random sampling rate in ten-thousandths; a request id already
//!   marked traced (a peer sampled it) stays traced. The decision is written into the
//!   request id's 15th character (envoy `source/extensions/request_id/uuid/config.cc`,
//!   `UUIDRequestIDExtension::setTraceReason`: `'9'` sampled, `'a'` forced, `'b'` client;
//!   `'4'`, a fresh UUIDv4, not traced), so the next hop sees it.
//! - Forcing a trace (same function): a request with `x-client-trace-id` is traced whatever
//!   the sampling rate (reason "client", `'b'`), as Istio sets `client_sampling` to 100%
//!   (pilot/pkg/networking/core/tracing.go `configureSampling`); the span gets the header's
//!   value as its `guid:x-client-trace-id` tag (tracer_impl.cc `finalizeDownstreamSpan`).
//!   `x-envoy-force-trace` ("forced", `'a'`) is honoured by Envoy only from an internal
//!   request, and no request to an Istio sidecar is internal: Outrigger removes it with the
//!   other internal `x-envoy-*` headers before deciding (`http_common::clean_internal_headers`),
//!   so it neither forces a trace nor puts `x-request-id` on the response.
//! - The span (envoy `source/extensions/tracers/opentelemetry/tracer.cc`, `Tracer::startSpan`):
//!   with a valid incoming `traceparent` the span continues that trace, its parent is the
//!   caller's span, and "Respect the previous span's sampled flag" — the caller's flag, not
//!   the local decision, says whether it is sampled; `tracestate` is kept. Without one, a new
//!   128-bit trace id and the local decision. The context goes on to the application as
//!   `traceparent: 00-<trace>-<span>-<01|00>` (and `tracestate`), whether sampled or not.
//! - B3 (envoy `source/extensions/tracers/zipkin/span_context_extractor.cc`): `x-b3-traceid`
//!   (16 or 32 hex digits), `x-b3-spanid`, `x-b3-parentspanid`, `x-b3-sampled` (`1`/`0`,
//!   `true`/`false`), `x-b3-flags: 1` (debug: sampled), or the single `b3` header
//!   `<trace>-<span>[-<sampled>[-<parent>]]` or `b3: <sampled>`. Outrigger reads W3C first,
//!   then B3, and (with `propagation` including `b3`) sends both, so that an application
//!   instrumented for either continues the trace.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::otlp;

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
static B3: HeaderName = HeaderName::from_static("b3");
static B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
static B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
static B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
static B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
static B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_CLIENT_TRACE_ID: HeaderName = HeaderName::from_static("x-client-trace-id");

/// A trace context read from a request's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub trace_id: [u8; 16],
    /// The caller's span (the parent of ours). B3 allows a context with none.
    pub span_id: Option<[u8; 8]>,
    /// `None`: the caller deferred the decision (B3 without `x-b3-sampled`).
    pub sampled: Option<bool>,
    pub tracestate: Option<String>,
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Lowercase hex digits into `out` (exactly twice its length), as W3C trace context requires
/// ("HEXDIGLC"). Uppercase is accepted for B3 by lowercasing first.
fn hex_into(s: &[u8], out: &mut [u8]) -> bool {
    if s.len() != out.len() * 2 {
        return false;
    }
    for (i, o) in out.iter_mut().enumerate() {
        match (hex_val(s[2 * i]), hex_val(s[2 * i + 1])) {
            (Some(h), Some(l)) => *o = h << 4 | l,
            _ => return false,
        }
    }
    true
}

/// Parses a W3C `traceparent` (https://www.w3.org/TR/trace-context/#traceparent-header):
/// `version-traceid-parentid-flags`, lowercase hex; version `ff` invalid; version `00` exactly
/// 55 characters; a later version may append `-…` fields, which are ignored; all-zero trace or
/// parent ids invalid. Envoy's extractor (tracers/opentelemetry/span_context_extractor.cc)
/// applies the same rules. Returns the trace id, parent id and sampled flag.
pub fn parse_traceparent(v: &[u8]) -> Option<([u8; 16], [u8; 8], bool)> {
    if v.len() < 55 {
        return None;
    }
    let mut version = [0u8; 1];
    if !hex_into(&v[0..2], &mut version) || version[0] == 0xff {
        return None;
    }
    if version[0] == 0 && v.len() != 55 {
        return None;
    }
    if v.len() > 55 && v[55] != b'-' {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let mut trace = [0u8; 16];
    let mut parent = [0u8; 8];
    let mut flags = [0u8; 1];
    if !hex_into(&v[3..35], &mut trace)
        || !hex_into(&v[36..52], &mut parent)
        || !hex_into(&v[53..55], &mut flags)
    {
        return None;
    }
    if trace == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace, parent, flags[0] & 1 == 1))
}

/// A B3 trace id: 16 or 32 hex digits (a 64-bit id is the low half of a 128-bit one).
fn b3_trace_id(s: &[u8]) -> Option<[u8; 16]> {
    let s = s.to_ascii_lowercase();
    let mut t = [0u8; 16];
    let ok = match s.len() {
        32 => hex_into(&s, &mut t),
        16 => hex_into(&s, &mut t[8..]),
        _ => false,
    };
    (ok && t != [0; 16]).then_some(t)
}

fn b3_span_id(s: &[u8]) -> Option<[u8; 8]> {
    let s = s.to_ascii_lowercase();
    let mut t = [0u8; 8];
    (hex_into(&s, &mut t) && t != [0; 8]).then_some(t)
}

fn b3_sampled(s: &[u8]) -> Option<bool> {
    match s {
        b"1" | b"true" | b"d" => Some(true),
        b"0" | b"false" => Some(false),
        _ => None,
    }
}

/// Parses the single `b3` header (https://github.com/openzipkin/b3-propagation#single-header):
/// `{TraceId}-{SpanId}`, `-{SamplingState}`, `-{ParentSpanId}` optional; or the sampling
/// state alone (no trace to continue: `None`).
pub fn parse_b3_single(v: &[u8]) -> Option<Incoming> {
    let mut parts = v.split(|&c| c == b'-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = b3_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        Some(s) => Some(b3_sampled(s)?),
        None => None,
    };
    if let Some(p) = parts.next() {
        b3_span_id(p)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Incoming {
        trace_id,
        span_id: Some(span_id),
        sampled,
        tracestate: None,
    })
}

/// Parses the multi-header B3 form (`x-b3-traceid` and `x-b3-spanid` required).
pub fn parse_b3_multi(h: &HeaderMap) -> Option<Incoming> {
    let trace_id = b3_trace_id(h.get(&B3_TRACE_ID)?.as_bytes())?;
    let span_id = b3_span_id(h.get(&B3_SPAN_ID)?.as_bytes())?;
    let debug = h.get(&B3_FLAGS).is_some_and(|f| f.as_bytes() == b"1");
    let sampled = match h.get(&B3_SAMPLED) {
        _ if debug => Some(true),
        Some(s) => Some(b3_sampled(s.as_bytes())?),
        None => None,
    };
    Some(Incoming {
        trace_id,
        span_id: Some(span_id),
        sampled,
        tracestate: None,
    })
}

/// The incoming context: W3C first, then single `b3`, then multi-header B3.
pub fn extract(h: &HeaderMap) -> Option<Incoming> {
    if let Some(tp) = h.get(&TRACEPARENT)
        && let Some((trace_id, span_id, sampled)) = parse_traceparent(tp.as_bytes())
    {
        let tracestate = h
            .get_all(&TRACESTATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        return Some(Incoming {
            trace_id,
            span_id: Some(span_id),
            sampled: Some(sampled),
            tracestate: (!tracestate.is_empty()).then_some(tracestate),
        });
    }
    if let Some(c) = h.get(&B3).and_then(|v| parse_b3_single(v.as_bytes())) {
        return Some(c);
    }
    parse_b3_multi(h)
}

/// Envoy's trace reasons packed into the request id (see the module documentation).
const TRACE_BYTE_POSITION: usize = 14;
const TRACE_SAMPLED: u8 = b'9';
const TRACE_FORCED: u8 = b'a';
const TRACE_CLIENT: u8 = b'b';
const UUID_LENGTH: usize = 36;

/// Envoy's `mutateTracingRequestHeader` with `use_request_id_for_trace_sampling`: decides
/// from the request id whether the request is traced, and marks the id when it newly is.
/// `sampling` is in ten-thousandths (Envoy's `random_sampling`, a FractionalPercent of
/// TEN_THOUSAND: Istio's `sampling: 1.0` is 100).
fn request_id_decision(h: &mut HeaderMap, sampling: u32) -> bool {
    let Some(id) = h.get(&X_REQUEST_ID) else {
        return false;
    };
    let b = id.as_bytes();
    // `UUIDRequestIDExtension::toInteger`: the first 8 hex digits (a non-UUID id is not
    // traced: "Skip if request-id is corrupted, or non-existent").
    let Some(n) = b
        .get(..8)
        .and_then(|p| std::str::from_utf8(p).ok())
        .and_then(|p| u64::from_str_radix(p, 16).ok())
    else {
        return false;
    };
    // `getTraceReason`: only a 36-character id carries a reason.
    if b.len() == UUID_LENGTH
        && matches!(
            b[TRACE_BYTE_POSITION],
            TRACE_SAMPLED | TRACE_FORCED | TRACE_CLIENT
        )
    {
        return true;
    }
    // A caller's `x-client-trace-id` forces the trace (`featureEnabled("tracing.client_enabled",
    // client_sampling)`, which Istio sets to 100%); otherwise
    // `featureEnabled("tracing.random_sampling", random_sampling, result)`: result % 10000 <
    // numerator. (`x-envoy-force-trace`, checked between the two, never reaches here.)
    let reason = if h.contains_key(&X_CLIENT_TRACE_ID) {
        TRACE_CLIENT
    } else if n % 10_000 < u64::from(sampling) {
        TRACE_SAMPLED
    } else {
        return false;
    };
    // `setTraceReason` marks a 36-character id only; another is traced unmarked.
    if b.len() == UUID_LENGTH {
        let mut marked = b.to_vec();
        marked[TRACE_BYTE_POSITION] = reason;
        if let Ok(v) = HeaderValue::from_bytes(&marked) {
            h.insert(X_REQUEST_ID.clone(), v);
        }
    }
    true
}

/// A span's kind: an inbound request is a SERVER span, an outbound one a CLIENT span (Envoy's
/// `traffic_direction` INBOUND/OUTBOUND, which Istio sets on the sidecar's listeners).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
}

/// Which headers carry the context to the next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Propagation {
    pub w3c: bool,
    pub b3: bool,
}

impl Default for Propagation {
    fn default() -> Self {
        Propagation {
            w3c: true,
            b3: true,
        }
    }
}

/// Where spans go: MeshConfig `extensionProviders[].opentelemetry` (istio/api
/// `mesh/v1alpha1/config.proto`, `OpenTelemetryTracingProvider`).
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpProvider {
    /// `service`: the collector's host name or address.
    pub service: String,
    /// `port`: 4317 for gRPC, 4318 for HTTP by convention.
    pub port: u16,
    /// `http`: OTLP/HTTP (protobuf) instead of gRPC.
    pub http: Option<OtlpHttp>,
    /// How long one export may take before its spans are dropped.
    pub timeout: Duration,
    /// Extra request headers (`http.headers`, or gRPC metadata).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// `None`: plaintext (h2c for gRPC).
    pub tls: Option<OtlpTls>,
}

/// `tls:` of the provider: OTLP over TLS (gRPC with TLS, or HTTPS), as an Istio sidecar's
/// Envoy exports when a DestinationRule for the collector's service says
/// `tls: {mode: SIMPLE, caCertificates, sni}` (istio/api `ClientTLSSettings`): the collector's
/// certificate is verified against the roots and the name; no client certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpTls {
    /// `caCertificates`: the only trust anchors; empty: the system's trust store.
    pub roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// `sni`: the name sent and verified (a DNS name or an IP address); default `service`.
    pub server_name: String,
}

/// `http:` of the provider (istio/api `HttpService`).
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpHttp {
    /// The request path, `/v1/traces` by default (the OTLP/HTTP specification's path).
    pub path: String,
}

/// A custom tag's value: Istio's Telemetry API `tracing[].customTags` and MeshConfig
/// `defaultConfig.tracing.custom_tags` (istio/api `telemetry/v1alpha1/telemetry.proto`,
/// `Tracing.CustomTag`: `literal`, `environment`, `header`), which istiod turns into Envoy's
/// `type.tracing.v3.CustomTag` (pilot/pkg/networking/core/tracing.go
/// `buildCustomTagsFromProvider`). Envoy sets a tag only when its value is not empty
/// (source/common/tracing/custom_tag_impl.cc `CustomTagBase::applySpan`).
#[derive(Debug, Clone, PartialEq)]
pub enum CustomTag {
    Literal(String),
    /// An environment variable of the agent, read once when tracing starts (Envoy reads it
    /// when the configuration is loaded), or `default` when it is not set.
    Environment {
        name: String,
        default: String,
    },
    /// The request header's first value (what the next hop receives), or `default` when the
    /// request has none.
    Header {
        name: HeaderName,
        default: String,
    },
}

/// `tracing:` of the agent configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// Random sampling, percent (MeshConfig `defaultConfig.tracing.sampling`, Istio's default
    /// 1.0; the Telemetry API's `randomSamplingPercentage`).
    pub sampling: f64,
    /// `service.name` of the exported resource; default `<canonical service>.<namespace>`
    /// (Istio's service cluster).
    pub service_name: Option<String>,
    pub resource_attributes: Vec<(String, String)>,
    /// Istio's `istio.mesh_id` tag (MeshConfig `meshId`, default the trust domain).
    pub mesh_id: String,
    /// `customTags`, by tag name, in the order istiod gives them to Envoy (sorted by name).
    pub custom_tags: Vec<(String, CustomTag)>,
    pub propagation: Propagation,
    /// `None`: decisions and headers only, no span is exported.
    pub provider: Option<OtlpProvider>,
    /// The export queue (spans); a full queue drops new spans.
    pub max_queue: usize,
    /// Spans per export request.
    pub max_batch: usize,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            sampling: 1.0,
            service_name: None,
            resource_attributes: Vec::new(),
            mesh_id: "cluster.local".into(),
            custom_tags: Vec::new(),
            propagation: Propagation::default(),
            provider: None,
            max_queue: 2048,
            max_batch: 512,
        }
    }
}

/// Counters of the exporter (registered with the other metrics in `Metrics`).
#[derive(Clone, Default)]
pub struct SpanCounters {
    pub exported: Counter,
    pub dropped: Counter,
}

/// The tracer: the configuration and the exporter's queue. Cheap to hold: one per proxy.
pub(crate) struct Tracer {
    inner: Option<Inner>,
    access_log: bool,
}

struct Inner {
    sampling: u32,
    propagation: Propagation,
    mesh_id: String,
    /// `customTags`, environment variables read: (tag, literal value) or (tag, header,
    /// default).
    custom_tags: Vec<(String, TagValue)>,
    tx: Option<mpsc::Sender<otlp::Span>>,
    counters: SpanCounters,
}

/// A custom tag's value once the environment has been read.
enum TagValue {
    Literal(String),
    Header(HeaderName, String),
}

/// Sets a span attribute, replacing one of the same key: OpenTelemetry attribute keys are
/// unique, and Envoy's OpenTelemetry span overwrites an existing key (so a custom tag named
/// like a built-in one replaces it).
fn set_attr(attrs: &mut Vec<otlp::KeyValue>, key: &str, value: &str) {
    let kv = otlp::KeyValue::string(key, value);
    match attrs.iter_mut().find(|a| a.key == key) {
        Some(a) => *a = kv,
        None => attrs.push(kv),
    }
}

/// What the request path knows of a request's trace.
#[derive(Default)]
pub(crate) struct ReqTrace {
    /// For the access log.
    pub trace_id: Option<[u8; 16]>,
    span: Option<Box<ActiveSpan>>,
}

struct ActiveSpan {
    span: otlp::Span,
    start: std::time::Instant,
}

/// What the request path tells a span at its start (all borrowed; copied only when sampled).
pub(crate) struct SpanStart<'a> {
    pub kind: Kind,
    /// The operation: `<service host>:<port>/*`, as Istio's route decorator names it.
    pub name: &'a str,
    pub method: &'a str,
    pub url: &'a str,
    pub protocol: &'a str,
    pub peer: std::net::SocketAddr,
    pub upstream_cluster: &'a str,
    pub node_id: &'a str,
    pub workload: &'a crate::workload::WorkloadInfo,
}

impl<'a> SpanStart<'a> {
    /// For a tracer that is off: nothing of it is read.
    pub fn none(workload: &'a crate::workload::WorkloadInfo) -> Self {
        SpanStart {
            kind: Kind::Server,
            name: "",
            method: "",
            url: "",
            protocol: "",
            peer: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            upstream_cluster: "",
            node_id: "",
            workload,
        }
    }
}

/// What the request path tells a span at its end.
pub(crate) struct SpanEnd<'a> {
    pub status: u16,
    pub flags: &'a str,
    pub request_size: u64,
    pub response_size: u64,
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // A failing system generator leaves zeros, an invalid id; fall back on the clock.
    if outrigger_tls::crypto_provider()
        .secure_random
        .fill(&mut b)
        .is_err()
        || b == [0; N]
    {
        let t = unix_nanos().to_le_bytes();
        for (i, o) in b.iter_mut().enumerate() {
            *o = t[i % 8] ^ (i as u8).wrapping_add(1);
        }
    }
    b
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn hex16(b: &[u8; 16]) -> String {
    hex::encode(b)
}

impl ReqTrace {
    /// The trace id in lowercase hex, for the access log.
    pub fn trace_id_hex(&self) -> Option<String> {
        self.trace_id.as_ref().map(hex16)
    }

    /// Ends the span (when there is one and it is sampled) and queues it for export.
    pub fn finish(&mut self, tracer: &Tracer, end: &SpanEnd<'_>) {
        let Some(active) = self.span.take() else {
            return;
        };
        let Some(inner) = &tracer.inner else { return };
        let Some(tx) = &inner.tx else { return };
        let mut span = active.span;
        span.end_time_unix_nano = span
            .start_time_unix_nano
            .saturating_add(active.start.elapsed().as_nanos() as u64);
        // Set after the custom tags, as in Envoy, so that these win over one of the same name.
        let attrs = &mut span.attributes;
        set_attr(attrs, "http.status_code", &end.status.to_string());
        set_attr(attrs, "response_flags", end.flags);
        set_attr(attrs, "request_size", &end.request_size.to_string());
        set_attr(attrs, "response_size", &end.response_size.to_string());
        // Envoy's HCM tags `error: true` on a 5xx or a reset (no status), and its
        // OpenTelemetry span turns the `error` tag into status ERROR (tracers/opentelemetry
        // span `setTag`).
        if end.status == 0 || end.status >= 500 {
            set_attr(attrs, "error", "true");
            span.status = Some(otlp::Status {
                message: String::new(),
                code: otlp::status_code::ERROR,
            });
        }
        if tx.try_send(span).is_err() {
            inner.counters.dropped.inc();
        }
    }
}

impl Tracer {
    /// No tracing: `start` only reads the trace id for the access log (when it is on).
    pub fn off(access_log: bool) -> Self {
        Tracer {
            inner: None,
            access_log,
        }
    }

    /// Tracing on; spawns the exporter task when a provider is configured (inside a Tokio
    /// runtime).
    pub fn new(
        cfg: &TracingConfig,
        workload: &crate::workload::WorkloadInfo,
        counters: SpanCounters,
        access_log: bool,
    ) -> Self {
        let tx = cfg.provider.as_ref().map(|p| {
            let (tx, rx) = mpsc::channel(cfg.max_queue.max(1));
            let service_name = cfg.service_name.clone().unwrap_or_else(|| {
                format!("{}.{}", workload.canonical_service, workload.namespace)
            });
            let mut resource = vec![otlp::KeyValue::string("service.name", service_name)];
            for (k, v) in &cfg.resource_attributes {
                resource.push(otlp::KeyValue::string(k, v));
            }
            let exporter = Exporter {
                provider: p.clone(),
                resource: otlp::Resource {
                    attributes: resource,
                    dropped_attributes_count: 0,
                },
                max_batch: cfg.max_batch.max(1),
                counters: counters.clone(),
            };
            tokio::spawn(exporter.run(rx));
            tx
        });
        // `sampling` is a percentage; Envoy's FractionalPercent is in ten-thousandths.
        let sampling = (cfg.sampling.clamp(0.0, 100.0) * 100.0).round() as u32;
        let custom_tags = cfg
            .custom_tags
            .iter()
            .map(|(tag, v)| {
                let v = match v {
                    CustomTag::Literal(l) => TagValue::Literal(l.clone()),
                    CustomTag::Environment { name, default } => {
                        TagValue::Literal(std::env::var(name).unwrap_or_else(|_| default.clone()))
                    }
                    CustomTag::Header { name, default } => {
                        TagValue::Header(name.clone(), default.clone())
                    }
                };
                (tag.clone(), v)
            })
            .collect();
        Tracer {
            inner: Some(Inner {
                sampling,
                propagation: cfg.propagation,
                mesh_id: cfg.mesh_id.clone(),
                custom_tags,
                tx,
                counters,
            }),
            access_log,
        }
    }

    /// Starts a request's trace: decides, starts the span and rewrites the context headers
    /// the next hop sees. `x-request-id` must already be set.
    pub fn start(&self, h: &mut HeaderMap, s: &SpanStart<'_>) -> ReqTrace {
        let Some(inner) = &self.inner else {
            if !self.access_log {
                return ReqTrace::default();
            }
            return ReqTrace {
                trace_id: extract(h).map(|c| c.trace_id),
                span: None,
            };
        };
        let decided = request_id_decision(h, inner.sampling);
        let parent = extract(h);
        let (trace_id, parent_id, sampled, tracestate) = match parent {
            Some(p) => (
                p.trace_id,
                p.span_id,
                p.sampled.unwrap_or(decided),
                p.tracestate,
            ),
            None => (random_bytes::<16>(), None, decided, None),
        };
        let span_id = random_bytes::<8>();
        let flag = if sampled { "01" } else { "00" };
        let trace_hex = hex16(&trace_id);
        let span_hex = hex::encode(span_id);
        if inner.propagation.w3c {
            if let Ok(v) = HeaderValue::from_str(&format!("00-{trace_hex}-{span_hex}-{flag}")) {
                h.insert(TRACEPARENT.clone(), v);
            }
            // Envoy 1.40's OpenTelemetry tracer sends `tracestate` always, empty when the
            // trace has none (seen against the real Envoy in tests/tracing.rs).
            let ts = tracestate
                .as_deref()
                .and_then(|ts| HeaderValue::from_str(ts).ok())
                .unwrap_or_else(|| HeaderValue::from_static(""));
            h.insert(TRACESTATE.clone(), ts);
        }
        if inner.propagation.b3 {
            let set = |h: &mut HeaderMap, k: &HeaderName, v: &str| {
                if let Ok(v) = HeaderValue::from_str(v) {
                    h.insert(k.clone(), v);
                }
            };
            set(h, &B3_TRACE_ID, &trace_hex);
            set(h, &B3_SPAN_ID, &span_hex);
            match parent_id {
                Some(p) => set(h, &B3_PARENT_SPAN_ID, &hex::encode(p)),
                None => {
                    h.remove(&B3_PARENT_SPAN_ID);
                }
            }
            set(h, &B3_SAMPLED, if sampled { "1" } else { "0" });
            h.remove(&B3_FLAGS);
            if h.contains_key(&B3) {
                let mut single = format!("{trace_hex}-{span_hex}-{}", &flag[1..]);
                if let Some(p) = parent_id {
                    single.push('-');
                    single.push_str(&hex::encode(p));
                }
                set(h, &B3, &single);
            }
        }
        let span = (sampled && inner.tx.is_some()).then(|| {
            let request_id = h
                .get(&X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let user_agent = h
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            let w = s.workload;
            let kv = |k: &str, v: &str| otlp::KeyValue::string(k, v);
            // The tags of Envoy's HCM span (source/common/tracing/tracer_impl.cc,
            // `HttpTracerUtility::finalizeDownstreamSpan`/`finalizeUpstreamSpan`) and the
            // custom tags Istio adds (pilot/pkg/networking/core/tracing.go,
            // `buildServiceTags`: istio.canonical_service, istio.canonical_revision,
            // istio.mesh_id, istio.namespace, istio.cluster_id).
            let mut attributes = vec![
                kv("node_id", s.node_id),
                kv("zone", ""),
                kv("guid:x-request-id", request_id),
                kv("http.url", s.url),
                kv("http.method", s.method),
                kv("downstream_cluster", "-"),
                kv("user_agent", user_agent),
                kv("http.protocol", s.protocol),
                kv("peer.address", &s.peer.ip().to_string()),
                kv("upstream_cluster", s.upstream_cluster),
                kv("upstream_cluster.name", s.upstream_cluster),
                kv("component", "proxy"),
                kv("istio.canonical_service", &w.canonical_service),
                kv("istio.canonical_revision", &w.canonical_revision),
                kv("istio.mesh_id", &inner.mesh_id),
                kv("istio.namespace", &w.namespace),
                kv("istio.cluster_id", &w.cluster),
            ];
            if let Some(id) = h.get(&X_CLIENT_TRACE_ID) {
                attributes.push(kv(
                    "guid:x-client-trace-id",
                    &String::from_utf8_lossy(id.as_bytes()),
                ));
            }
            // `customTags`, after the tags above as in Envoy (finalizeDownstreamSpan applies
            // them after the request's tags); an empty value sets nothing.
            for (tag, v) in &inner.custom_tags {
                let value = match v {
                    TagValue::Literal(l) => std::borrow::Cow::Borrowed(l.as_str()),
                    TagValue::Header(name, default) => match h.get(name) {
                        Some(v) => String::from_utf8_lossy(v.as_bytes()),
                        None => std::borrow::Cow::Borrowed(default.as_str()),
                    },
                };
                if !value.is_empty() {
                    set_attr(&mut attributes, tag, &value);
                }
            }
            Box::new(ActiveSpan {
                start: std::time::Instant::now(),
                span: otlp::Span {
                    trace_id: trace_id.to_vec(),
                    span_id: span_id.to_vec(),
                    trace_state: tracestate.clone().unwrap_or_default(),
                    parent_span_id: parent_id.map(|p| p.to_vec()).unwrap_or_default(),
                    name: s.name.to_string(),
                    kind: match s.kind {
                        Kind::Server => otlp::span_kind::SERVER,
                        Kind::Client => otlp::span_kind::CLIENT,
                    },
                    start_time_unix_nano: unix_nanos(),
                    end_time_unix_nano: 0,
                    attributes,
                    status: None,
                    // W3C sampled, and (opentelemetry-proto `SpanFlags`) "has is_remote"
                    // 0x100, "is_remote" 0x200 when the parent came from the caller: what
                    // Envoy 1.40 sends (0x101 for a new trace, 0x301 for a continued one).
                    flags: 0x101 | if parent_id.is_some() { 0x200 } else { 0 },
                },
            })
        });
        ReqTrace {
            trace_id: Some(trace_id),
            span,
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }
}

/// Sends batches of spans to the collector, one request at a time. The queue in front of it
/// is bounded: when the collector is slow or down, spans are dropped and counted
/// (`outrigger_tracing_spans_dropped`), never waited for by a request.
struct Exporter {
    provider: OtlpProvider,
    resource: otlp::Resource,
    max_batch: usize,
    counters: SpanCounters,
}

/// One connection to a collector over TLS, opened on first use and reopened after it closes
/// or fails. The exporter sends one request at a time, so one connection is enough.
struct TlsChannel {
    config: Arc<rustls::ClientConfig>,
    name: rustls_pki_types::ServerName<'static>,
    grpc: bool,
    conn: Option<TlsSender>,
}

enum TlsSender {
    H1(hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>),
}

impl TlsChannel {
    /// `None` (logged) when the name is neither a DNS name nor an address.
    fn new(tls: &OtlpTls, grpc: bool) -> Option<Self> {
        let name = match rustls_pki_types::ServerName::try_from(tls.server_name.clone()) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(
                    "tracing: `{}` is no TLS server name ({e}): no span will be exported",
                    tls.server_name
                );
                return None;
            }
        };
        let mut config = if tls.roots.is_empty() {
            // The system's trust store, as for JWKS fetches.
            (*outrigger_tls::control::web_client_config(&[])).clone()
        } else {
            let mut roots = rustls::RootCertStore::empty();
            let _ = roots.add_parsable_certificates(tls.roots.iter().cloned());
            match rustls::ClientConfig::builder_with_provider(outrigger_tls::crypto_provider())
                .with_safe_default_protocol_versions()
            {
                Ok(b) => b.with_root_certificates(roots).with_no_client_auth(),
                Err(e) => {
                    tracing::error!("tracing: TLS to the collector: {e}: no span will be exported");
                    return None;
                }
            }
        };
        // gRPC needs HTTP/2, negotiated by ALPN over TLS (as Envoy's gRPC client does).
        config.alpn_protocols = vec![if grpc {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        Some(TlsChannel {
            config: Arc::new(config),
            name,
            grpc,
            conn: None,
        })
    }

    async fn connect(&self, host: &str, port: u16) -> Result<TlsSender, String> {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let io = TokioIo::new(tls);
        if self.grpc {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Ok(TlsSender::H2(send))
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Ok(TlsSender::H1(send))
        }
    }

    async fn send(
        &mut self,
        host: &str,
        port: u16,
        req: http::Request<http_body_util::Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let usable = match &self.conn {
            Some(TlsSender::H1(s)) => !s.is_closed(),
            Some(TlsSender::H2(s)) => !s.is_closed(),
            None => false,
        };
        if !usable {
            self.conn = Some(self.connect(host, port).await?);
        }
        let result = match self.conn.as_mut() {
            Some(TlsSender::H1(s)) => match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            },
            Some(TlsSender::H2(s)) => match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            },
            None => return Err("no connection".into()),
        };
        result.map_err(|e| {
            // The next export opens a new connection.
            self.conn = None;
            e.to_string()
        })
    }
}

/// How long spans may wait for a batch to fill (the OpenTelemetry SDK's batch span
/// processor's default `scheduledDelayMillis` is 5000; a proxy's spans are small and many, so
/// a shorter wait keeps the queue short).
const BATCH_DELAY: Duration = Duration::from_millis(1000);

impl Exporter {
    async fn run(self, mut rx: mpsc::Receiver<otlp::Span>) {
        use http_body_util::{BodyExt, Full};
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;
        let grpc = self.provider.http.is_none();
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(grpc)
            .build_http();
        let mut tls = match &self.provider.tls {
            Some(t) => match TlsChannel::new(t, grpc) {
                Some(c) => Some(c),
                // Logged: every span is dropped, none is sent in plaintext instead.
                None => {
                    while let Some(_span) = rx.recv().await {
                        self.counters.dropped.inc();
                    }
                    return;
                }
            },
            None => None,
        };
        let mut batch: VecDeque<otlp::Span> = VecDeque::new();
        loop {
            // Wait for a first span, then up to BATCH_DELAY for the batch to fill.
            if batch.is_empty() {
                match rx.recv().await {
                    Some(s) => batch.push_back(s),
                    None => return,
                }
            }
            let deadline = tokio::time::Instant::now() + BATCH_DELAY;
            let mut closed = false;
            while batch.len() < self.max_batch {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(s)) => batch.push_back(s),
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let spans: Vec<otlp::Span> = batch.drain(..).collect();
            let n = spans.len() as u64;
            let req = otlp::ExportTraceServiceRequest {
                resource_spans: vec![otlp::ResourceSpans {
                    resource: Some(self.resource.clone()),
                    scope_spans: vec![otlp::ScopeSpans {
                        scope: Some(otlp::InstrumentationScope {
                            name: "outrigger".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                        }),
                        spans,
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }],
            };
            let body = encode(&req, grpc);
            let p = &self.provider;
            let path = match &p.http {
                Some(h) => h.path.as_str(),
                None => otlp::GRPC_EXPORT_PATH,
            };
            let host = if p.service.contains(':') && !p.service.starts_with('[') {
                format!("[{}]", p.service)
            } else {
                p.service.clone()
            };
            // Over a TLS connection of its own, an HTTP/1.1 request names its target in
            // origin form with a `host` header; otherwise the absolute URI (the pooled client
            // and HTTP/2 take the authority from it).
            let authority = format!("{host}:{}", p.port);
            let mut b = match &tls {
                Some(_) if !grpc => {
                    http::Request::post(path).header(http::header::HOST, &authority)
                }
                Some(_) => http::Request::post(format!("https://{authority}{path}")),
                None => http::Request::post(format!("http://{authority}{path}")),
            };
            if grpc {
                b = b
                    .header(http::header::CONTENT_TYPE, "application/grpc")
                    .header(http::header::TE, "trailers");
            } else {
                b = b.header(http::header::CONTENT_TYPE, "application/x-protobuf");
            }
            let mut request = match b.body(Full::new(body)) {
                Ok(r) => r,
                Err(e) => {
                    crate::warn_limited!("tracing: cannot build the export request: {e}");
                    self.counters.dropped.inc_by(n);
                    continue;
                }
            };
            for (k, v) in &p.headers {
                request.headers_mut().append(k.clone(), v.clone());
            }
            let send = async {
                let resp = match tls.as_mut() {
                    Some(ch) => ch.send(&p.service, p.port, request).await?,
                    None => client.request(request).await.map_err(|e| e.to_string())?,
                };
                let status = resp.status();
                let collected = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                if !status.is_success() {
                    return Err(format!("collector answered {status}"));
                }
                if grpc {
                    // gRPC: `grpc-status` in the trailers (or headers, for a trailers-only
                    // answer, which hyper gives as trailers of an empty body as well).
                    let code = collected
                        .trailers()
                        .and_then(|t| t.get("grpc-status"))
                        .map(|v| v.as_bytes().to_vec());
                    if let Some(c) = code
                        && c != b"0"
                    {
                        return Err(format!(
                            "collector answered grpc-status {}",
                            String::from_utf8_lossy(&c)
                        ));
                    }
                }
                Ok(())
            };
            match tokio::time::timeout(p.timeout, send).await {
                Ok(Ok(())) => {
                    self.counters.exported.inc_by(n);
                }
                Ok(Err(e)) => {
                    self.counters.dropped.inc_by(n);
                    crate::warn_limited!(
                        collector = %format!("{}:{}", p.service, p.port),
                        "tracing: export of {n} spans failed: {e}"
                    );
                }
                Err(_) => {
                    self.counters.dropped.inc_by(n);
                    crate::warn_limited!(
                        collector = %format!("{}:{}", p.service, p.port),
                        "tracing: export of {n} spans timed out after {:?}", p.timeout
                    );
                }
            }
            if closed {
                return;
            }
        }
    }
}

/// The request body: the protobuf message, in a gRPC frame (uncompressed flag, 4-byte length)
/// for gRPC.
fn encode(req: &otlp::ExportTraceServiceRequest, grpc: bool) -> Bytes {
    use prost::Message;
    let len = req.encoded_len();
    let mut buf = BytesMut::with_capacity(len + 5);
    if grpc {
        buf.put_u8(0);
        buf.put_u32(len as u32);
    }
    // Encoding into a buffer with enough capacity cannot fail.
    let _ = req.encode(&mut buf);
    buf.freeze()
}

/// The `node_id` tag: Istio's proxy node id, `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`
/// (istio/istio `pkg/model/proxy.go`, `ServiceNode`), with the workload name for the pod.
pub(crate) fn node_id(w: &crate::workload::WorkloadInfo, ip: std::net::IpAddr) -> String {
    format!(
        "sidecar~{ip}~{}.{}~{}.svc.cluster.local",
        w.name, w.namespace, w.namespace
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn traceparent_follows_w3c() {
        let (t, p, s) = parse_traceparent(TP.as_bytes()).unwrap();
        assert_eq!(hex::encode(t), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(hex::encode(p), "b7ad6b7169203331");
        assert!(s);
        assert!(
            !parse_traceparent(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
                .unwrap()
                .2
        );
        for bad in [
            // Uppercase, all-zero ids, version ff, wrong separators, wrong lengths.
            "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
            "",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
        // A later version may carry more fields.
        assert!(
            parse_traceparent(b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x")
                .is_some()
        );
    }

    #[test]
    fn b3_single_and_multi() {
        let c = parse_b3_single(
            b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )
        .unwrap();
        assert_eq!(hex::encode(c.trace_id), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(c.sampled, Some(true));
        let c = parse_b3_single(b"64fe8b2a57d3eff7-e457b5a2e4d86bd1").unwrap();
        assert_eq!(hex::encode(c.trace_id), "000000000000000064fe8b2a57d3eff7");
        assert_eq!(c.sampled, None);
        assert!(parse_b3_single(b"0").is_none());
        assert!(parse_b3_single(b"64fe8b2a57d3eff7-e457b5a2e4d86bd1-x").is_none());
        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", "64FE8B2A57D3EFF7".parse().unwrap());
        h.insert("x-b3-spanid", "e457b5a2e4d86bd1".parse().unwrap());
        h.insert("x-b3-sampled", "0".parse().unwrap());
        assert_eq!(parse_b3_multi(&h).unwrap().sampled, Some(false));
        h.insert("x-b3-flags", "1".parse().unwrap());
        assert_eq!(parse_b3_multi(&h).unwrap().sampled, Some(true));
        // W3C wins over B3.
        h.insert("traceparent", TP.parse().unwrap());
        assert_eq!(
            hex::encode(extract(&h).unwrap().trace_id),
            "0af7651916cd43dd8448eb211c80319c"
        );
    }

    #[test]
    fn request_id_decides_and_is_marked_as_envoy_does() {
        let mut h = HeaderMap::new();
        // 0x00000063 = 99 < 100 (1%): sampled, marked '9' at position 14.
        h.insert(
            "x-request-id",
            "00000063-1111-4222-8333-444444444444".parse().unwrap(),
        );
        assert!(request_id_decision(&mut h, 100));
        assert_eq!(h["x-request-id"], "00000063-1111-9222-8333-444444444444");
        // 100 % 10000 = 100, not < 100.
        h.insert(
            "x-request-id",
            "00000064-1111-4222-8333-444444444444".parse().unwrap(),
        );
        assert!(!request_id_decision(&mut h, 100));
        assert_eq!(h["x-request-id"], "00000064-1111-4222-8333-444444444444");
        // Already marked by a peer: traced whatever the rate.
        h.insert(
            "x-request-id",
            "ffffffff-1111-a222-8333-444444444444".parse().unwrap(),
        );
        assert!(request_id_decision(&mut h, 0));
        // Not a UUID: never sampled from the id.
        h.insert("x-request-id", "caller-chosen-id".parse().unwrap());
        assert!(!request_id_decision(&mut h, 10_000));
        // `x-client-trace-id` forces the trace at 0%: marked 'b' (client) ...
        h.insert("x-client-trace-id", "case-4711".parse().unwrap());
        h.insert(
            "x-request-id",
            "00000064-1111-4222-8333-444444444444".parse().unwrap(),
        );
        assert!(request_id_decision(&mut h, 0));
        assert_eq!(h["x-request-id"], "00000064-1111-b222-8333-444444444444");
        // ... an id already marked keeps its reason ...
        h.insert(
            "x-request-id",
            "00000064-1111-9222-8333-444444444444".parse().unwrap(),
        );
        assert!(request_id_decision(&mut h, 0));
        assert_eq!(h["x-request-id"], "00000064-1111-9222-8333-444444444444");
        // ... and an id that is no UUID still decides nothing.
        h.insert("x-request-id", "caller-chosen-id".parse().unwrap());
        assert!(!request_id_decision(&mut h, 10_000));
    }
}
