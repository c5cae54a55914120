//! What keeps the agent serving when clients open connections and leave them open: a cap on
//! downstream connections (global, and per source identity) below the file-descriptor limit,
//! and the HTTP connection idle timeout.
//!
//! Envoy has the same two tools. The global cap is the overload manager's
//! `envoy.resource_monitors.global_downstream_max_connections` (Istio's bootstrap always
//! configures it, `max_active_downstream_connections: 2147483647` unless
//! `ProxyConfig.connectionSettings.globalDownstreamConnectionLimit` or
//! `ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS` says otherwise — istio/istio
//! pkg/bootstrap/config.go); a connection over it is closed as soon as it is accepted and
//! counted in `listener.<addr>.downstream_global_cx_overflow` (envoy
//! source/common/listener_manager/active_tcp_listener.cc, `onReject(GlobalCxLimit)`; the
//! per-listener `connection_limit` counts `downstream_cx_overflow`). Envoy's FAQ "How does
//! Envoy prevent file descriptor exhaustion?" (docs/root/faq/configuration/resource_limits.rst)
//! recommends keeping the connection limits "less than half of the system's file descriptor
//! limit to account for upstream connections, files, and other usage of file descriptors";
//! the defaults here do exactly that, after a reserve for the agent's own files.
//!
//! Envoy has no per-identity limit; Outrigger adds one so that one mesh identity (one
//! compromised or broken workload) cannot take every connection: it is checked right after the
//! mTLS handshake, when the identity is known.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;

/// File descriptors kept out of the connection budget for the agent itself: its listeners
/// (inbound, HBONE, outbound, admin), the admin connections of probes and scrapers, the policy,
/// certificate and JWKS reloads (one file or connection at a time each), the access log, the
/// runtime's epoll and wake-up descriptors, standard streams, and the application's own
/// outbound calls through the agent. In practice the agent needs a few dozen of these; 256
/// leaves room for bursts of admin and outbound connections.
pub const FD_RESERVE: u64 = 256;

/// Each counted connection holds at most two descriptors in the steady state: the downstream
/// socket and its backend connection (an HBONE stream holds one backend socket, its outer
/// connection is counted once more). A WebSocket holds a third while it is open.
pub const FDS_PER_CONNECTION: u64 = 2;

/// The default cap is never more than this many connections, however high the descriptor
/// limit: at tens of kilobytes per idle mTLS connection, a million is already gigabytes.
pub const MAX_DEFAULT_CONNECTIONS: u64 = 1_000_000;

/// The downstream connection caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Mesh-facing connections (direct inbound, HBONE connections and HBONE streams) open at
    /// once, all listeners together.
    pub max: usize,
    /// The same, for one source identity (SPIFFE ID).
    pub max_per_identity: usize,
}

impl ConnectionLimits {
    /// The defaults for a soft descriptor limit of `fds`: `(fds - FD_RESERVE) / 2`
    /// connections, and half of that per identity (so that no single identity can take every
    /// connection). At the common soft limit of 1024 (once raised to the hard limit, usually far
    /// more): 384, and 192 per identity.
    pub fn from_fd_limit(fds: u64) -> Self {
        let max =
            (fds.saturating_sub(FD_RESERVE) / FDS_PER_CONNECTION).clamp(1, MAX_DEFAULT_CONNECTIONS);
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        ConnectionLimits {
            max,
            max_per_identity: (max / 2).max(1),
        }
    }

    /// The descriptors these caps can use, with the reserve.
    pub fn fds_needed(&self) -> u64 {
        (self.max as u64)
            .saturating_mul(FDS_PER_CONNECTION)
            .saturating_add(FD_RESERVE)
    }
}

impl Default for ConnectionLimits {
    /// As for a soft limit of 1024: what a process has when nothing raised it.
    fn default() -> Self {
        Self::from_fd_limit(1024)
    }
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overflow {
    /// The global cap (Envoy: `downstream_global_cx_overflow`).
    Global,
    /// The cap of one source identity.
    Identity,
}

impl Overflow {
    /// The `reason` label of `outrigger_connections_rejected`.
    pub fn reason(self) -> &'static str {
        match self {
            Overflow::Global => "cx_overflow",
            Overflow::Identity => "identity_cx_overflow",
        }
    }
}

/// Counts the open downstream connections against the caps.
pub(crate) struct ConnTracker {
    limits: ConnectionLimits,
    active: AtomicUsize,
    by_identity: Mutex<HashMap<Arc<str>, usize>>,
    /// `outrigger_downstream_connections` (Envoy: `downstream_cx_active`).
    gauge: Gauge,
    /// Its high-water mark (`Metrics::downstream_connections_peak`).
    peak: Arc<AtomicI64>,
}

/// One counted connection; dropping it frees its place.
pub(crate) struct Permit {
    tracker: Arc<ConnTracker>,
    identity: Option<Arc<str>>,
}

impl ConnTracker {
    pub fn new(limits: ConnectionLimits, gauge: Gauge, peak: Arc<AtomicI64>) -> Arc<Self> {
        Arc::new(ConnTracker {
            limits,
            active: AtomicUsize::new(0),
            by_identity: Mutex::new(HashMap::new()),
            gauge,
            peak,
        })
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// Takes a place under the global cap, before anything is known of the peer (Envoy
    /// checks its global limit at accept, too).
    pub fn try_acquire(self: &Arc<Self>) -> Result<Permit, Overflow> {
        let mut cur = self.active.load(Ordering::Relaxed);
        loop {
            if cur >= self.limits.max {
                return Err(Overflow::Global);
            }
            match self.active.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        let open = self.gauge.inc() + 1;
        self.peak.fetch_max(open, Ordering::Relaxed);
        Ok(Permit {
            tracker: self.clone(),
            identity: None,
        })
    }

    /// Takes a place under both caps at once (an HBONE stream, whose identity is its outer
    /// connection's).
    pub fn try_acquire_for(self: &Arc<Self>, identity: &str) -> Result<Permit, Overflow> {
        let mut p = self.try_acquire()?;
        p.charge_identity(identity)?;
        Ok(p)
    }
}

impl Permit {
    /// Charges this connection to `identity` once it is known; refused when the identity
    /// already has its share.
    pub fn charge_identity(&mut self, identity: &str) -> Result<(), Overflow> {
        let t = &self.tracker;
        let mut map = t.by_identity.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(identity) {
            Some(n) if *n >= t.limits.max_per_identity => return Err(Overflow::Identity),
            Some(n) => *n += 1,
            None => {
                map.insert(Arc::from(identity), 1);
            }
        }
        self.identity = Some(Arc::from(identity));
        Ok(())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let t = &self.tracker;
        if let Some(id) = self.identity.take() {
            let mut map = t.by_identity.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&*id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&*id);
                }
            }
        }
        t.active.fetch_sub(1, Ordering::AcqRel);
        t.gauge.dec();
    }
}

/// The requests in progress on one downstream connection, and when it has had none for the
/// idle timeout.
///
/// Envoy's `common_http_protocol_options.idle_timeout` (envoy api/envoy/config/core/v3/
/// protocol.proto, `HttpProtocolOptions.idle_timeout`): "The idle timeout is defined as the
/// period in which there are no active requests. When the idle timeout is reached the
/// connection will be closed. If the connection is an HTTP/2 downstream connection a drain
/// sequence will occur prior to closing the connection ... If not specified, this defaults to
/// 1 hour." The HTTP connection manager arms the timer when the connection is created, so a
/// connection that never sends a request is closed after the same timeout.
///
/// Counting costs two atomic operations per request and wakes nothing: the idle future sleeps
/// until the earliest moment the connection could be idle and looks again.
#[derive(Clone)]
pub(crate) struct Activity(Arc<ActivityState>);

struct ActivityState {
    /// Requests in progress.
    active: AtomicUsize,
    /// When the last request ended (or the connection started), in ms since `base`.
    last_end_ms: AtomicU64,
    base: tokio::time::Instant,
}

/// One request in progress; dropping it ends it.
pub(crate) struct Active(Arc<ActivityState>);

impl ActivityState {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl Activity {
    pub fn new() -> Self {
        Activity(Arc::new(ActivityState {
            active: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
            base: tokio::time::Instant::now(),
        }))
    }

    pub fn start(&self) -> Active {
        self.0.active.fetch_add(1, Ordering::AcqRel);
        Active(self.0.clone())
    }

    /// Restarts the idle clock now, as if a request had just ended.
    pub fn touch(&self) {
        self.0
            .last_end_ms
            .fetch_max(self.0.now_ms(), Ordering::AcqRel);
    }

    /// Resolves once the connection has had no request in progress for `timeout`; never
    /// when `timeout` is `None` (disabled).
    pub async fn idle(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else {
            return std::future::pending().await;
        };
        let s = &self.0;
        loop {
            let deadline = if s.active.load(Ordering::Acquire) > 0 {
                // Busy: it cannot be idle before a full timeout from now.
                tokio::time::Instant::now() + timeout
            } else {
                s.base + Duration::from_millis(s.last_end_ms.load(Ordering::Acquire)) + timeout
            };
            if deadline <= tokio::time::Instant::now() && s.active.load(Ordering::Acquire) == 0 {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        // The end time first, so that the idle check never sees "none active" with the time of
        // an older end.
        self.0
            .last_end_ms
            .fetch_max(self.0.now_ms(), Ordering::AcqRel);
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn defaults_stay_under_half_the_descriptors_after_the_reserve() {
        // Envoy's FAQ: connection limits under half the descriptor limit.
        let l = ConnectionLimits::from_fd_limit(1024);
        assert_eq!(
            l,
            ConnectionLimits {
                max: 384,
                max_per_identity: 192
            }
        );
        assert!(l.fds_needed() <= 1024);
        let l = ConnectionLimits::from_fd_limit(524_288);
        assert_eq!(l.max, 262_016);
        assert!(l.fds_needed() <= 524_288);
        // A tiny or unlimited limit still gives a usable, bounded cap.
        assert_eq!(ConnectionLimits::from_fd_limit(100).max, 1);
        assert_eq!(
            ConnectionLimits::from_fd_limit(u64::MAX).max as u64,
            MAX_DEFAULT_CONNECTIONS
        );
    }

    #[test]
    fn caps_global_and_per_identity_and_frees_on_drop() {
        let gauge = Gauge::default();
        let peak = Arc::new(AtomicI64::new(0));
        let t = ConnTracker::new(
            ConnectionLimits {
                max: 3,
                max_per_identity: 2,
            },
            gauge.clone(),
            peak.clone(),
        );
        let mut a1 = t.try_acquire().unwrap();
        a1.charge_identity("a").unwrap();
        let a2 = t.try_acquire_for("a").unwrap();
        // "a" has its share; the refused attempt gives its global place back.
        assert_eq!(t.try_acquire_for("a").err(), Some(Overflow::Identity));
        assert_eq!(gauge.get(), 2);
        let b = t.try_acquire_for("b").unwrap();
        assert_eq!(t.try_acquire().err(), Some(Overflow::Global));
        drop(a2);
        let a3 = t.try_acquire_for("a").unwrap();
        drop((a1, a3, b));
        assert_eq!(gauge.get(), 0);
        assert!(t.by_identity.lock().unwrap().is_empty());
        // The high-water mark survives the connections (src/memtrim.rs in the binary).
        assert_eq!(peak.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn idle_fires_only_after_the_last_request_ends() {
        let a = Activity::new();
        let t = Duration::from_millis(100);
        // No request at all: idle after the timeout.
        let start = Instant::now();
        a.idle(Some(t)).await;
        assert!(start.elapsed() >= t);
        // A request in progress keeps it open however long it takes.
        let req = a.start();
        let idle = a.idle(Some(t));
        tokio::pin!(idle);
        assert!(
            tokio::time::timeout(Duration::from_millis(400), &mut idle)
                .await
                .is_err()
        );
        drop(req);
        let ended = Instant::now();
        idle.await;
        assert!(ended.elapsed() >= t);
        // Disabled: never.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), a.idle(None))
                .await
                .is_err()
        );
    }
}
