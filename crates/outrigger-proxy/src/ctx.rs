//! The shared context: what every listener and connection task reads (credentials, policy,
//! metrics, settings, the caps and the drain signal). A leaf of the data path: it imports only
//! the modules that define its fields' types, and none of those imports it back, so every module
//! that serves traffic can take an `Arc<Ctx>` without importing the crate root.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::sync::watch;

use outrigger_tls::CertStore;

use crate::access_log::AccessLog;
use crate::log_control::LogControl;
use crate::metrics::{self, Metrics};
use crate::outbound::Destination;
use crate::policy_state::PolicyHandle;
use crate::settings::Settings;
use crate::status_state::{Denials, Rates};
use crate::workload::{InboundConfig, WorkloadInfo};
use crate::{backend, jwt_authn, limits, peer_metadata, ratelimit, trace};

/// State shared by every connection.
pub(crate) struct Ctx {
    /// `POST /logging`: the agent's log filter, changed at run time.
    pub log_control: Option<Arc<dyn LogControl>>,
    pub certs: CertStore,
    pub policy: Arc<PolicyHandle>,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    pub tracer: trace::Tracer,
    pub workload: WorkloadInfo,
    pub settings: Settings,
    /// The connections to the application, pooled per backend address.
    pub backends: backend::Backends,
    pub dest_labels: metrics::TcpLabels,
    /// This workload's side of Istio's HTTP metadata exchange.
    pub peer_exchange: peer_metadata::Local,
    /// This workload's side of Istio's TCP metadata exchange (crate::tcp_mx), header included:
    /// written first on every stream whose ALPN is `istio-peer-exchange`.
    pub tcp_exchange: Vec<u8>,
    pub ready: AtomicBool,
    pub inbound: Vec<InboundConfig>,
    /// The outbound destinations (for `/config_dump`).
    pub(crate) outbound: Vec<Arc<Destination>>,
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
    pub denials: Denials,
    /// Request and connection counts, for the status page's rates.
    pub status_rates: Rates,
}
