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
//!
//! Reading order, top-down: this file (the `Proxy`: binding and running the listeners) →
//! `accept` (a connection was accepted and authenticated: the accept loop with its caps and
//! drain, the mTLS handshake, the peer's SPIFFE identity, the reject metrics, the per-connection
//! `ConnInfo` and its XFCC) → `inbound` (PeerAuthentication, protocol) and `hbone::server`
//! (HTTP/2 CONNECT streams, each served like a direct connection) → `http_fwd` / `tcp_fwd`
//! (forwarding; `backend`: the pooled connections to the application) → `authz`, `jwt_authn`,
//! `ext_authz`, `ratelimit` (decisions) → `refusal` (how every refusal is said). Leaves shared
//! by all: `ctx` (the shared context every task holds), `workload`, `settings`, `policy_state`,
//! `conn` (the per-connection context), `status_state`, `log_control`, `metrics`, `access_log`,
//! `grpc_frames` (gRPC message framing) and `grpc_stats` (a gRPC call's message counters,
//! over `metrics`).
//! No module imports another that imports it back, and none imports from this file
//! (`scripts/module-graph.py --check`, run by CI).
#![forbid(unsafe_code)]

mod accept;
pub mod access_log;
pub mod admin;
mod authz;
mod backend;
mod codec_checks;
mod conn;
mod copy;
mod ctx;
pub mod detect;
pub mod egress_proxy;
pub mod ext_authz;
pub mod ext_authz_proto;
pub mod grpc_frames;
mod grpc_stats;
pub mod h1_guard;
mod h2_close;
pub mod hbone;
mod http_common;
mod http_fwd;
pub mod inbound;
pub mod io;
pub mod jwt_authn;
pub mod limits;
mod log_control;
pub mod log_limit;
pub mod metrics;
pub mod otlp;
pub mod outbound;
pub mod peer_metadata;
mod policy_state;
pub mod ratelimit;
mod refusal;
mod settings;
pub mod status;
mod status_state;
mod tcp_fwd;
pub mod tcp_mx;
pub mod trace;
mod workload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tokio::sync::watch;

use outrigger_tls::CertStore;

use ctx::Ctx;

pub use access_log::{AccessLog, AccessLogConfig, AccessLogFormat};
pub use metrics::Metrics;
pub use policy_state::{PendingChange, PolicyHandle, PolicyState, ReloadFailure};
pub use settings::{DEFAULT_IDLE_TIMEOUT, Settings};
pub use workload::{InboundConfig, Protocol, WorkloadInfo};

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
        let peer_exchange = peer_metadata::Local::new(&opts.workload);
        let tcp_exchange = tcp_mx::encode(peer_exchange.workload(), peer_exchange.node_id());
        let ctx = Arc::new(Ctx {
            tracer,
            log_control: opts.log_control,
            certs,
            policy,
            metrics: opts.metrics,
            access_log: opts.access_log,
            dest_labels,
            peer_exchange,
            tcp_exchange,
            workload: opts.workload,
            backends: backend::Backends::new(
                listeners.iter().map(|(c, _)| c.backend),
                opts.settings.connect_timeout,
                opts.settings.limits.max,
            ),
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
