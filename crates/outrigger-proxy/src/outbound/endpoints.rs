//! The endpoints of one destination: static addresses and DNS names (re-resolved), the
//! load-balancing pick, and outlier detection (passive health: ejection of an endpoint that
//! keeps failing, and its return after the ejection time).
//!
//! Envoy detects consecutive errors as they happen (not at the sweep interval), so ejection
//! here is immediate too; a host's ejection ends when its ejection time has passed (checked at
//! each pick, which is equivalent to Envoy's sweep for a host that receives traffic).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::idle::EndpointPool;
use super::{Destination, EndpointAddr, LbPolicy, OutlierDetection};

/// Envoy's `max_ejection_time` default: the ejection time stops growing at 300 s (or the base
/// ejection time if larger).
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// What one attempt on an endpoint came to, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500 (or a TCP connection established).
    Success,
    /// 502, 503, 504, or a locally detected connect / handshake / reset failure: a "gateway
    /// error", which is also a 5xx error.
    GatewayError,
    /// Any other 5xx response.
    ServerError,
}

#[derive(Debug, Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
    /// When the host last returned to service (for decreasing `times_ejected`).
    returned_at: Option<Instant>,
}

/// One upstream address with its health and its connections.
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Requests (or TCP connections) in flight: the least-request balancer's input.
    pub active: AtomicUsize,
    health: Mutex<Health>,
    pub(crate) pool: EndpointPool,
    /// The workload behind this endpoint, from its last metadata-exchange answer, decoded
    /// (crate::peer_metadata::take): one endpoint is one workload, which answers with the
    /// same value every time.
    pub(crate) peer: Mutex<Option<(http::HeaderValue, Arc<crate::peer_metadata::PeerMetadata>)>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Endpoint {
    fn new(addr: SocketAddr) -> Self {
        Endpoint {
            addr,
            active: AtomicUsize::new(0),
            health: Mutex::new(Health::default()),
            pool: EndpointPool::default(),
            peer: Mutex::new(None),
        }
    }

    /// True while ejected; an ejection that has expired ends here (the host returns).
    fn is_ejected(&self, now: Instant) -> bool {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match h.ejected_until {
            Some(until) if until > now => true,
            Some(_) => {
                h.ejected_until = None;
                h.returned_at = Some(now);
                tracing::info!(endpoint = %self.addr, "outlier detection: endpoint returned to service");
                false
            }
            None => false,
        }
    }

    pub fn is_ejected_now(&self) -> bool {
        self.is_ejected(Instant::now())
    }
}

/// Keeps an endpoint's in-flight count while a request or connection uses it.
pub struct ActiveGuard(Arc<Endpoint>);

impl ActiveGuard {
    pub fn new(ep: Arc<Endpoint>) -> Self {
        ep.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(ep)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct EndpointSet {
    configured: Vec<EndpointAddr>,
    current: ArcSwap<Vec<Arc<Endpoint>>>,
    lb: LbPolicy,
    outlier: OutlierDetection,
    counter: AtomicU64,
}

impl EndpointSet {
    pub fn new(configured: &[EndpointAddr], lb: LbPolicy, outlier: OutlierDetection) -> Self {
        let statics = configured
            .iter()
            .filter_map(|e| match e {
                EndpointAddr::Static(a) => Some(Arc::new(Endpoint::new(*a))),
                EndpointAddr::Dns { .. } => None,
            })
            .collect();
        EndpointSet {
            configured: configured.to_vec(),
            current: ArcSwap::from_pointee(statics),
            lb,
            outlier,
            counter: AtomicU64::new(0),
        }
    }

    pub fn has_dns(&self) -> bool {
        self.configured
            .iter()
            .any(|e| matches!(e, EndpointAddr::Dns { .. }))
    }

    pub fn snapshot(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.current.load_full()
    }

    /// Resolves every DNS endpoint (each bounded by `timeout`) and publishes the new set. An
    /// endpoint whose address persists keeps its health and its pooled connections. A name
    /// that fails to resolve keeps its previous addresses (as Envoy's STRICT_DNS does).
    pub async fn resolve_once(&self, timeout: Duration) {
        if !self.has_dns() {
            return;
        }
        let old = self.current.load_full();
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for e in &self.configured {
            match e {
                EndpointAddr::Static(a) => addrs.push(*a),
                EndpointAddr::Dns { host, port } => {
                    match tokio::time::timeout(
                        timeout,
                        tokio::net::lookup_host((host.as_str(), *port)),
                    )
                    .await
                    {
                        Ok(Ok(it)) => {
                            let before = addrs.len();
                            addrs.extend(it);
                            if addrs.len() == before {
                                crate::warn_limited!(%host, "DNS: the name resolved to no address");
                            }
                        }
                        Ok(Err(e)) => {
                            crate::warn_limited!(%host, error = %e, "DNS resolution failed; keeping the previous addresses");
                            keep_previous(&old, &self.configured, host, *port, &mut addrs);
                        }
                        Err(_) => {
                            crate::warn_limited!(%host, "DNS resolution timed out; keeping the previous addresses");
                            keep_previous(&old, &self.configured, host, *port, &mut addrs);
                        }
                    }
                }
            }
        }
        addrs.sort();
        addrs.dedup();
        let changed =
            addrs.len() != old.len() || addrs.iter().zip(old.iter()).any(|(a, e)| *a != e.addr);
        if !changed {
            return;
        }
        let next: Vec<Arc<Endpoint>> = addrs
            .iter()
            .map(|a| {
                old.iter()
                    .find(|e| e.addr == *a)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(*a)))
            })
            .collect();
        tracing::info!(
            endpoints = ?addrs,
            "endpoint set updated"
        );
        self.current.store(Arc::new(next));
    }

    /// Picks an endpoint that is not ejected and not in `tried` (Envoy's `previous_hosts`
    /// retry predicate: a retry goes to another host when there is one). When every untried
    /// host is ejected, a tried healthy one; `None` when every host is ejected or there is
    /// none ("no healthy upstream": Istio's `minHealthPercent` defaults to 0, so ejected hosts
    /// are not used in panic).
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        let eps = self.current.load();
        if eps.is_empty() {
            return None;
        }
        let now = Instant::now();
        let healthy: Vec<&Arc<Endpoint>> = eps.iter().filter(|e| !e.is_ejected(now)).collect();
        let fresh: Vec<&Arc<Endpoint>> = healthy
            .iter()
            .copied()
            .filter(|e| !tried.contains(&e.addr))
            .collect();
        let from = if fresh.is_empty() { healthy } else { fresh };
        match from.len() {
            0 => None,
            1 => Some(from[0].clone()),
            n => {
                let r = self.next_random();
                let chosen = match self.lb {
                    LbPolicy::RoundRobin => from[(r % n as u64) as usize],
                    LbPolicy::LeastRequest => {
                        // Power of two choices: two distinct random hosts, the less busy wins.
                        let a = (r % n as u64) as usize;
                        let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
                        let (ea, eb) = (from[a], from[b]);
                        if eb.active.load(Ordering::Relaxed) < ea.active.load(Ordering::Relaxed) {
                            eb
                        } else {
                            ea
                        }
                    }
                };
                Some(chosen.clone())
            }
        }
    }

    fn next_random(&self) -> u64 {
        match self.lb {
            // Round robin: a plain counter.
            LbPolicy::RoundRobin => self.counter.fetch_add(1, Ordering::Relaxed),
            // splitmix64 of a counter: cheap, uniform enough for load balancing.
            LbPolicy::LeastRequest => {
                let mut z = self
                    .counter
                    .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
                    .wrapping_add(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^ (z >> 31)
            }
        }
    }

    /// Records the outcome of one attempt; ejects the endpoint when it crosses a threshold and
    /// the ejection cap allows.
    pub fn report(&self, ep: &Endpoint, outcome: Outcome) {
        let o = &self.outlier;
        if o.consecutive_5xx_errors == 0 && o.consecutive_gateway_errors == 0 {
            return;
        }
        let now = Instant::now();
        let eject = {
            let mut h = ep.health.lock().unwrap_or_else(|e| e.into_inner());
            match outcome {
                Outcome::Success => {
                    h.consecutive_5xx = 0;
                    h.consecutive_gateway = 0;
                    if let Some(t) = h.returned_at
                        && now.duration_since(t) >= o.interval
                    {
                        h.times_ejected = h.times_ejected.saturating_sub(1);
                        h.returned_at = if h.times_ejected > 0 { Some(now) } else { None };
                    }
                    return;
                }
                Outcome::GatewayError => {
                    h.consecutive_5xx += 1;
                    h.consecutive_gateway += 1;
                }
                Outcome::ServerError => {
                    h.consecutive_5xx += 1;
                    h.consecutive_gateway = 0;
                }
            }
            h.ejected_until.is_none()
                && ((o.consecutive_5xx_errors > 0 && h.consecutive_5xx >= o.consecutive_5xx_errors)
                    || (o.consecutive_gateway_errors > 0
                        && h.consecutive_gateway >= o.consecutive_gateway_errors))
        };
        if !eject {
            return;
        }
        let eps = self.current.load();
        let ejected = eps.iter().filter(|e| e.is_ejected(now)).count();
        // "will eject at least one host regardless of the value" (Envoy's max_ejection_percent).
        let cap = ((eps.len() as u64 * o.max_ejection_percent as u64) / 100).max(1) as usize;
        let mut h = ep.health.lock().unwrap_or_else(|e| e.into_inner());
        if ejected >= cap {
            tracing::debug!(endpoint = %ep.addr, ejected, cap, "outlier detection: ejection cap reached; endpoint stays in the pool");
            return;
        }
        h.times_ejected = h.times_ejected.saturating_add(1);
        let duration = o
            .base_ejection_time
            .saturating_mul(h.times_ejected)
            .min(MAX_EJECTION_TIME.max(o.base_ejection_time));
        h.ejected_until = now.checked_add(duration).or(Some(now));
        h.consecutive_5xx = 0;
        h.consecutive_gateway = 0;
        drop(h);
        // Its pooled connections are useless now.
        ep.pool.clear();
        crate::warn_limited!(
            endpoint = %ep.addr,
            ejection_s = duration.as_secs_f64(),
            "outlier detection: endpoint ejected after consecutive errors"
        );
    }
}

fn keep_previous(
    old: &[Arc<Endpoint>],
    configured: &[EndpointAddr],
    _host: &str,
    port: u16,
    addrs: &mut Vec<SocketAddr>,
) {
    // Previous addresses for this name: those in the old set that are not static endpoints
    // and use the name's port.
    for e in old {
        let is_static = configured
            .iter()
            .any(|c| matches!(c, EndpointAddr::Static(a) if *a == e.addr));
        if !is_static && e.addr.port() == port {
            addrs.push(e.addr);
        }
    }
}

/// Re-resolves DNS endpoints every `dns_refresh_rate` until the proxy drains.
pub(crate) async fn refresh_loop(
    dest: Arc<Destination>,
    mut drain: tokio::sync::watch::Receiver<bool>,
) {
    let every = dest.cfg.dns_refresh_rate.max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = drain.wait_for(|d| *d) => return,
        }
        dest.endpoints
            .resolve_once(every.min(Duration::from_secs(5)))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: u16, lb: LbPolicy, outlier: OutlierDetection) -> EndpointSet {
        let eps: Vec<EndpointAddr> = (0..n)
            .map(|i| EndpointAddr::Static(SocketAddr::from(([127, 0, 0, 1], 1000 + i))))
            .collect();
        EndpointSet::new(&eps, lb, outlier)
    }

    #[test]
    fn round_robin_visits_every_endpoint() {
        let s = set(3, LbPolicy::RoundRobin, OutlierDetection::default());
        let mut seen: Vec<u16> = (0..6).map(|_| s.pick(&[]).unwrap().addr.port()).collect();
        seen.sort();
        assert_eq!(seen, vec![1000, 1000, 1001, 1001, 1002, 1002]);
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let s = set(2, LbPolicy::LeastRequest, OutlierDetection::default());
        let busy = s.snapshot()[0].clone();
        busy.active.store(10, Ordering::Relaxed);
        for _ in 0..20 {
            assert_eq!(s.pick(&[]).unwrap().addr.port(), 1001);
        }
    }

    #[test]
    fn retry_avoids_tried_hosts() {
        let s = set(2, LbPolicy::RoundRobin, OutlierDetection::default());
        for _ in 0..10 {
            let first = s.pick(&[]).unwrap().addr;
            let second = s.pick(&[first]).unwrap().addr;
            assert_ne!(first, second);
        }
    }

    #[test]
    fn consecutive_errors_eject_then_the_host_returns() {
        let o = OutlierDetection {
            consecutive_5xx_errors: 3,
            base_ejection_time: Duration::from_millis(50),
            ..OutlierDetection::default()
        };
        let s = set(2, LbPolicy::RoundRobin, o);
        let bad = s.snapshot()[0].clone();
        s.report(&bad, Outcome::GatewayError);
        s.report(&bad, Outcome::ServerError);
        assert!(!bad.is_ejected_now(), "two errors are below the threshold");
        s.report(&bad, Outcome::GatewayError);
        assert!(bad.is_ejected_now());
        for _ in 0..10 {
            assert_eq!(s.pick(&[]).unwrap().addr.port(), 1001);
        }
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            !bad.is_ejected_now(),
            "ejection time passed: back in service"
        );
        // A second ejection lasts twice the base time.
        for _ in 0..3 {
            s.report(&bad, Outcome::GatewayError);
        }
        std::thread::sleep(Duration::from_millis(60));
        assert!(bad.is_ejected_now(), "second ejection is 2 × base");
    }

    #[test]
    fn a_success_resets_the_count() {
        let o = OutlierDetection {
            consecutive_5xx_errors: 2,
            ..OutlierDetection::default()
        };
        let s = set(2, LbPolicy::RoundRobin, o);
        let ep = s.snapshot()[0].clone();
        s.report(&ep, Outcome::GatewayError);
        s.report(&ep, Outcome::Success);
        s.report(&ep, Outcome::GatewayError);
        assert!(!ep.is_ejected_now());
    }

    #[test]
    fn ejection_cap_keeps_at_least_one_host_but_allows_one_ejection() {
        let o = OutlierDetection {
            consecutive_5xx_errors: 1,
            max_ejection_percent: 10,
            ..OutlierDetection::default()
        };
        let s = set(2, LbPolicy::RoundRobin, o);
        let (a, b) = (s.snapshot()[0].clone(), s.snapshot()[1].clone());
        s.report(&a, Outcome::GatewayError);
        s.report(&b, Outcome::GatewayError);
        assert!(a.is_ejected_now(), "10% of 2 hosts still ejects one");
        assert!(!b.is_ejected_now(), "but not a second one");
        assert_eq!(s.pick(&[]).unwrap().addr, b.addr);
    }

    #[test]
    fn gateway_threshold_ignores_plain_5xx() {
        let o = OutlierDetection {
            consecutive_5xx_errors: 0,
            consecutive_gateway_errors: 2,
            ..OutlierDetection::default()
        };
        let s = set(2, LbPolicy::RoundRobin, o);
        let ep = s.snapshot()[0].clone();
        s.report(&ep, Outcome::ServerError);
        s.report(&ep, Outcome::ServerError);
        assert!(!ep.is_ejected_now());
        s.report(&ep, Outcome::GatewayError);
        s.report(&ep, Outcome::GatewayError);
        assert!(ep.is_ejected_now());
    }

    #[tokio::test]
    async fn dns_names_resolve_and_keep_state() {
        let eps = vec![
            EndpointAddr::Dns {
                host: "localhost".into(),
                port: 4242,
            },
            EndpointAddr::Static("127.0.0.9:1".parse().unwrap()),
        ];
        let s = EndpointSet::new(&eps, LbPolicy::RoundRobin, OutlierDetection::default());
        assert_eq!(
            s.snapshot().len(),
            1,
            "only the static one before resolution"
        );
        s.resolve_once(Duration::from_secs(5)).await;
        let first = s.snapshot();
        assert!(
            first
                .iter()
                .any(|e| e.addr.port() == 4242 && e.addr.ip().is_loopback()),
            "{first:?}"
        );
        s.resolve_once(Duration::from_secs(5)).await;
        let second = s.snapshot();
        assert!(
            Arc::ptr_eq(&first, &second),
            "unchanged set is not republished"
        );
    }
}
