//! Outrigger's data plane.
//!
//! One [`Proxy`] owns the mesh-facing inbound listeners and the admin listener. Each accepted
//! connection goes through: PeerAuthentication mode for the port → TLS or plaintext (peeked) →
//! mTLS termination with SPIFFE verification → protocol (configured, ALPN, or sniffed) →
//! authorization → forwarding to the loopback backend → metrics and access log.
//!
//! Policy and credentials are published by the caller (the `outrigger` binary) through
//! [`PolicyHandle`] and [`outrigger_tls::CertStore`]; the proxy loads them once per connection
//! (credentials) or per request (policy, so a policy change applies to the next request on a
//! keep-alive connection without waiting for it to close).
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
mod authz;
mod codec_checks;
mod conn;
pub mod detect;
pub mod egress_proxy;
pub mod ext_authz;
pub mod ext_authz_proto;
pub mod h1_guard;
mod h2_close;
pub mod hbone;
mod http_common;
mod http_fwd;
pub mod inbound;
pub mod io;
pub mod jwt_authn;
pub mod limits;
pub mod log_limit;
pub mod metrics;
pub mod otlp;
pub mod outbound;
pub mod peer_metadata;
pub mod ratelimit;
mod refusal;
pub mod status;
mod tcp_fwd;
pub mod trace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;

use outrigger_identity::Identity;
use outrigger_policy::Snapshot;
use outrigger_tls::CertStore;

pub use access_log::{AccessLog, AccessLogConfig, AccessLogFormat};
pub use metrics::Metrics;

/// How an inbound listener treats the bytes inside the (m)TLS session, and which protocol the
/// application speaks: Istio's service-port protocols. As an Istio sidecar does, Outrigger talks
/// to the application in the port's protocol, whatever the caller negotiated (istio/istio
/// `pilot/pkg/networking/core/cluster_builder.go`, `setUpstreamProtocol`): `http` → HTTP/1.1,
/// `http2`/`grpc`/`grpc-web` → HTTP/2 cleartext (h2c).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP from callers (HTTP/1.1 or HTTP/2, by ALPN or preface); HTTP/1.1 to the application.
    Http,
    /// HTTP from callers; HTTP/2 cleartext to the application.
    Http2,
    /// gRPC: as `Http2`.
    Grpc,
    /// gRPC-Web: as `Http2` (Istio's `IsHTTP2()` includes it).
    GrpcWeb,
    /// Opaque bytes: L4 authorization only (also Istio's `tls`, `https`, `mongo`, `mysql`,
    /// `redis`, which a sidecar proxies as TCP by default).
    Tcp,
    /// HTTP when the first bytes are HTTP, opaque TCP otherwise (Istio's protocol sniffing).
    Auto,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::GrpcWeb => "grpc-web",
            Protocol::Tcp => "tcp",
            Protocol::Auto => "auto",
        }
    }

    /// Declared HTTP of some kind (non-HTTP bytes are answered with HTTP's 400, not tunnelled).
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb
        )
    }

    /// The application speaks HTTP/2 cleartext (Istio's `Protocol.IsHTTP2()`).
    pub fn app_speaks_h2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb)
    }

    /// Istio's protocol names, case-insensitive as Istio's `protocol.Parse` reads them; `None`
    /// for a name Istio does not know (or `udp`, which Outrigger cannot carry).
    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s.to_ascii_lowercase().as_str() {
            "http" => Protocol::Http,
            "http2" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "grpc-web" => Protocol::GrpcWeb,
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" => Protocol::Tcp,
            "auto" => Protocol::Auto,
            _ => return None,
        })
    }

    /// Istio's port-naming convention, `<protocol>[-<suffix>]` (e.g. `http-web`, `grpc-api`):
    /// the protocol a port name selects when no protocol is given
    /// (https://istio.io/latest/docs/ops/configuration/traffic-management/protocol-selection/).
    /// `grpc-web` is matched whole before the prefix rule would read it as `grpc`.
    pub fn from_port_name(name: &str) -> Option<Protocol> {
        let lower = name.to_ascii_lowercase();
        if lower == "grpc-web" || lower.starts_with("grpc-web-") {
            return Some(Protocol::GrpcWeb);
        }
        let prefix = lower.split('-').next().unwrap_or("");
        Protocol::parse(prefix).filter(|p| *p != Protocol::Auto)
    }
}

/// One mesh-facing listener and the application port behind it.
#[derive(Debug, Clone)]
pub struct InboundConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub backend: SocketAddr,
    pub protocol: Protocol,
}

/// What the proxy knows of the workload it fronts; used for metric labels and headers.
#[derive(Debug, Clone)]
pub struct WorkloadInfo {
    pub identity: Identity,
    pub namespace: String,
    /// The workload name (Istio: the Deployment; here: `workload.name`, default the service
    /// account).
    pub name: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    /// The mesh hostname of the service this workload backs, if configured.
    pub service_host: Option<String>,
    pub cluster: String,
}

/// Envoy's default HTTP connection idle timeout (`HttpProtocolOptions.idle_timeout`: "If not
/// specified, this defaults to 1 hour").
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Timeouts and limits. Defaults follow Envoy's where one exists.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long to wait for a client's first bytes (TLS peek, HTTP sniff).
    pub detect_timeout: Duration,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// Connect timeout to the backend (Istio's `connectTimeout` default: 10 s).
    pub connect_timeout: Duration,
    /// After a shutdown signal, how long in-flight requests may finish.
    pub drain_timeout: Duration,
    /// Path normalization before authorization.
    pub path_normalization: outrigger_policy::PathNormalization,
    /// How long an inbound HTTP connection (direct or HBONE) may have no request in progress
    /// before it is closed; `None`: never. Envoy's `common_http_protocol_options.idle_timeout`,
    /// which Istio's sidecar leaves at Envoy's default of 1 hour unless the proxy metadata
    /// `IDLE_TIMEOUT` is set (istio/istio pilot/pkg/networking/core/listener_builder.go).
    pub idle_timeout: Option<Duration>,
    /// The caps on downstream connections (see [`limits`]).
    pub limits: limits::ConnectionLimits,
    /// Local rate limits on inbound HTTP (see [`ratelimit`]).
    pub rate_limits: Vec<ratelimit::RateLimitRule>,
    /// The CUSTOM action's providers (MeshConfig `extensionProviders`; see [`ext_authz`]).
    pub extension_providers: Vec<Arc<ext_authz::Provider>>,
    /// Distributed tracing (see [`trace`]); `None`: off (`x-request-id` is still generated).
    pub tracing: Option<trace::TracingConfig>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            detect_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            path_normalization: outrigger_policy::PathNormalization::default(),
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            limits: limits::ConnectionLimits::default(),
            rate_limits: Vec::new(),
            extension_providers: Vec::new(),
            tracing: None,
        }
    }
}

/// The policy in force and where it came from.
pub struct PolicyState {
    pub snapshot: Snapshot,
    /// Local rate limits from Istio `EnvoyFilter`s in the policy files (added to the
    /// configuration's `rateLimits`).
    pub rate_limits: Vec<ratelimit::RateLimitRule>,
    /// The files the snapshot was built from.
    pub sources: Vec<String>,
    /// Increases with every successful (re)load.
    pub version: u64,
    pub loaded_at: SystemTime,
}

/// The last failed reload, kept for `/config_dump` until a reload succeeds.
#[derive(Debug, Clone)]
pub struct ReloadFailure {
    pub at: SystemTime,
    pub error: String,
}

/// A change to the policy files that has been seen but not applied yet: it must read the same
/// for a while first (see `outrigger_tls::settle`), so that a file caught mid-write is never
/// applied.
#[derive(Debug, Clone)]
pub struct PendingChange {
    /// When the change was first seen.
    pub since: SystemTime,
    /// Whether it removes every policy, or every policy of a file (it then waits longer and is
    /// logged as a warning when applied).
    pub removal: bool,
    /// What the change is waiting for, for operators.
    pub detail: String,
}

/// The published policy: swapped atomically, watched by long-lived connections.
pub struct PolicyHandle {
    current: ArcSwap<PolicyState>,
    last_failure: ArcSwap<Option<ReloadFailure>>,
    pending: ArcSwap<Option<PendingChange>>,
    /// The cluster policy source's state (`policy.kubernetes`), for `/config_dump`.
    cluster: ArcSwap<Option<serde_json::Value>>,
    changed: watch::Sender<u64>,
}

impl PolicyHandle {
    pub fn new(state: PolicyState) -> Arc<Self> {
        let (changed, _) = watch::channel(state.version);
        Arc::new(PolicyHandle {
            current: ArcSwap::from_pointee(state),
            last_failure: ArcSwap::from_pointee(None),
            pending: ArcSwap::from_pointee(None),
            cluster: ArcSwap::from_pointee(None),
            changed,
        })
    }

    /// The policy in force (lock-free).
    pub fn load(&self) -> Arc<PolicyState> {
        self.current.load_full()
    }

    /// Swaps in a new policy; every later decision uses it.
    pub fn publish(&self, state: PolicyState) {
        let v = state.version;
        self.current.store(Arc::new(state));
        self.last_failure.store(Arc::new(None));
        self.changed.send_replace(v);
    }

    /// Records a failed reload: the previous policy stays in force.
    pub fn record_failure(&self, error: String) {
        self.last_failure.store(Arc::new(Some(ReloadFailure {
            at: SystemTime::now(),
            error,
        })));
    }

    pub fn last_failure(&self) -> Option<ReloadFailure> {
        (**self.last_failure.load()).clone()
    }

    /// Records the change waiting to settle (`None`: nothing pending).
    pub fn set_pending(&self, pending: Option<PendingChange>) {
        self.pending.store(Arc::new(pending));
    }

    pub fn pending(&self) -> Option<PendingChange> {
        (**self.pending.load()).clone()
    }

    /// Records the cluster policy source's state (shown as `policy.cluster` in `/config_dump`).
    pub fn set_cluster_status(&self, status: Option<serde_json::Value>) {
        self.cluster.store(Arc::new(status));
    }

    pub fn cluster_status(&self) -> Option<serde_json::Value> {
        (**self.cluster.load()).clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// State shared by every connection.
pub(crate) struct Ctx {
    /// `POST /logging`: the agent's log filter, changed at run time.
    pub log_control: Option<Arc<dyn admin::LogControl>>,
    pub certs: CertStore,
    pub policy: Arc<PolicyHandle>,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    pub tracer: trace::Tracer,
    pub workload: WorkloadInfo,
    pub settings: Settings,
    pub dest_labels: metrics::TcpLabels,
    /// This workload's side of Istio's HTTP metadata exchange.
    pub peer_exchange: peer_metadata::Local,
    pub ready: AtomicBool,
    pub inbound: Vec<InboundConfig>,
    /// The outbound destinations (for `/config_dump`).
    pub(crate) outbound: Vec<Arc<outbound::Destination>>,
    /// The HBONE listener's bound address, if enabled.
    pub hbone: Option<SocketAddr>,
    pub jwks: Arc<jwt_authn::JwksCache>,
    /// The downstream connections open, against their caps.
    pub conns: Arc<limits::ConnTracker>,
    /// The local rate limits' buckets, for the policy version they were built for (the
    /// configuration's rules and the policy files' EnvoyFilters).
    pub ratelimit: arc_swap::ArcSwap<ratelimit::RateLimiter>,
    /// Dropped receivers tell the drain that a connection has finished.
    pub drain: watch::Receiver<bool>,
    /// The last denials, for the status page.
    pub denials: status::Denials,
    /// Request and connection counts, for the status page's rates.
    pub status_rates: status::Rates,
}

/// The running data plane.
pub struct Proxy {
    ctx: Arc<Ctx>,
    listeners: Vec<(Arc<InboundConfig>, TcpListener)>,
    admin: Option<TcpListener>,
    /// `admin.metricsListen`: Prometheus metrics only.
    metrics_listener: Option<TcpListener>,
    hbone: Option<TcpListener>,
    outbound: outbound::Bound,
    drain_tx: watch::Sender<bool>,
}

/// Everything [`Proxy::bind`] needs.
pub struct ProxyOptions {
    pub inbound: Vec<InboundConfig>,
    pub admin: Option<SocketAddr>,
    /// A listener for `/metrics` alone (scraping from another host without exposing the rest
    /// of the admin API).
    pub metrics_listen: Option<SocketAddr>,
    /// What `POST /logging` changes; `None`: the endpoint says it is not available.
    pub log_control: Option<Arc<dyn admin::LogControl>>,
    pub workload: WorkloadInfo,
    pub settings: Settings,
    pub access_log: AccessLog,
    pub metrics: Arc<Metrics>,
    pub jwt: jwt_authn::JwtSettings,
    /// Mesh destinations the application calls through loopback listeners.
    pub outbound: Vec<outbound::OutboundConfig>,
    /// The `HTTP_PROXY` listener, if any.
    pub outbound_proxy: Option<outbound::OutboundProxyConfig>,
    /// The inbound HBONE listener (Istio ambient), if enabled.
    pub hbone: Option<hbone::HboneConfig>,
}

impl Proxy {
    /// Binds every listener now, so that a port in use is a start-up error, not a log line.
    pub async fn bind(
        opts: ProxyOptions,
        certs: CertStore,
        policy: Arc<PolicyHandle>,
    ) -> std::io::Result<Proxy> {
        let mut listeners = Vec::new();
        for cfg in &opts.inbound {
            let l = TcpListener::bind(cfg.listen).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "inbound listener `{}`: cannot listen on {}: {e}",
                        cfg.name, cfg.listen
                    ),
                )
            })?;
            let mut cfg = cfg.clone();
            cfg.listen = l.local_addr()?;
            listeners.push((Arc::new(cfg), l));
        }
        let admin = match opts.admin {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("admin listener: cannot listen on {addr}: {e}"),
                )
            })?),
            None => None,
        };
        let hbone = match &opts.hbone {
            Some(h) => Some(TcpListener::bind(h.listen).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("HBONE listener: cannot listen on {}: {e}", h.listen),
                )
            })?),
            None => None,
        };
        let outbound = outbound::bind(
            &opts.outbound,
            opts.outbound_proxy.as_ref(),
            &opts.workload,
            &certs,
        )
        .await?;
        let (drain_tx, drain_rx) = watch::channel(false);
        let dest_labels = metrics::destination_labels(&opts.workload);
        let jwks = jwt_authn::JwksCache::new(opts.jwt, opts.metrics.clone());
        let conns = limits::ConnTracker::new(
            opts.settings.limits,
            opts.metrics.downstream_connections.clone(),
            opts.metrics.downstream_connections_peak.clone(),
        );
        let ratelimit = {
            let state = policy.load();
            let mut rules = opts.settings.rate_limits.clone();
            rules.extend(state.rate_limits.iter().cloned());
            arc_swap::ArcSwap::from_pointee(ratelimit::RateLimiter::new(&rules, state.version))
        };
        let metrics_listener = match opts.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("metrics listener (admin.metricsListen): cannot listen on {addr}: {e}"),
                )
            })?),
            None => None,
        };
        let tracer = match &opts.settings.tracing {
            Some(c) => trace::Tracer::new(
                c,
                &opts.workload,
                opts.metrics.spans.clone(),
                opts.access_log.enabled(),
            ),
            None => trace::Tracer::off(opts.access_log.enabled()),
        };
        let ctx = Arc::new(Ctx {
            tracer,
            log_control: opts.log_control,
            certs,
            policy,
            metrics: opts.metrics,
            access_log: opts.access_log,
            dest_labels,
            peer_exchange: peer_metadata::Local::new(&opts.workload),
            workload: opts.workload,
            settings: opts.settings,
            ready: AtomicBool::new(false),
            inbound: listeners.iter().map(|(c, _)| (**c).clone()).collect(),
            outbound: outbound.destinations.clone(),
            hbone: hbone.as_ref().and_then(|l| l.local_addr().ok()),
            jwks,
            conns,
            ratelimit,
            drain: drain_rx,
            denials: status::Denials::default(),
            status_rates: status::Rates::default(),
        });
        Ok(Proxy {
            ctx,
            listeners,
            admin,
            metrics_listener,
            hbone,
            outbound,
            drain_tx,
        })
    }

    /// The bound HBONE listener, if enabled.
    pub fn hbone_addr(&self) -> Option<SocketAddr> {
        self.hbone.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound inbound listeners (useful when configured with port 0).
    pub fn inbound_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .map(|(c, _)| (c.name.clone(), c.listen))
            .collect()
    }

    /// The bound outbound listeners by name (the HTTP proxy is `http-proxy`).
    pub fn outbound_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.outbound.addrs()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The metrics-only listener's bound address, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish
    /// (up to `drain_timeout`) and returns.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let Proxy {
            ctx,
            listeners,
            admin,
            metrics_listener,
            hbone,
            outbound,
            drain_tx,
        } = self;
        let mut tasks = tokio::task::JoinSet::new();
        for (cfg, l) in listeners {
            tasks.spawn(inbound::serve_listener(l, cfg, ctx.clone()));
        }
        if let Some(l) = admin {
            tasks.spawn(admin::serve(l, ctx.clone(), admin::Endpoints::All));
        }
        if let Some(l) = metrics_listener {
            tasks.spawn(admin::serve(l, ctx.clone(), admin::Endpoints::MetricsOnly));
        }
        if let Some(l) = hbone {
            tasks.spawn(hbone::server::serve_listener(l, ctx.clone()));
        }
        outbound::spawn(outbound, &ctx, &mut tasks);
        let jwks_refresh = ctx.jwks.spawn_refresh();
        ctx.ready.store(true, Ordering::SeqCst);
        tracing::info!(
            identity = %ctx.workload.identity,
            listeners = ctx.inbound.len(),
            "outrigger is ready"
        );
        shutdown.await;
        ctx.ready.store(false, Ordering::SeqCst);
        tracing::info!("shutting down: no new connections; draining in-flight requests");
        let _ = drain_tx.send(true);
        let drain_timeout = ctx.settings.drain_timeout;
        drop(ctx);
        // Every connection task and listener holds a receiver; `closed` resolves when all are
        // gone.
        match tokio::time::timeout(drain_timeout, drain_tx.closed()).await {
            Ok(()) => tracing::info!("drained: all connections finished"),
            Err(_) => tracing::warn!(
                timeout_s = drain_timeout.as_secs(),
                "drain timeout: closing remaining connections"
            ),
        }
        tasks.abort_all();
        jwks_refresh.abort();
    }
}
