//! Timeouts and limits of the data plane, with Envoy's defaults. Plain data (a leaf).

use std::sync::Arc;
use std::time::Duration;

use crate::{ext_authz, limits, ratelimit, trace};

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
