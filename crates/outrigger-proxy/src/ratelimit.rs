//! Local rate limiting on inbound HTTP: token buckets per rule — shared by a listener's requests
//! or one per source principal — answered as Envoy's `envoy.filters.http.local_ratelimit`
//! answers (source/extensions/filters/http/local_ratelimit/local_ratelimit.cc): `429` with the
//! body `local_rate_limited` and the response flag `RL`, and with
//! `enable_x_ratelimit_headers: DRAFT_VERSION_03` the `x-ratelimit-limit`,
//! `x-ratelimit-remaining` and `x-ratelimit-reset` headers on every response the rule counts.
//!
//! The bucket is Envoy's `AtomicTokenBucketImpl` (source/common/common/token_bucket_impl.cc),
//! which the local rate limit filter uses: it starts full with `max_tokens` and refills
//! continuously at `tokens_per_fill / fill_interval` tokens a second, up to `max_tokens`; a
//! request takes one whole token or is limited. `x-ratelimit-remaining` is the whole tokens
//! left, `x-ratelimit-reset` the seconds until the next whole token (0 while one is there) —
//! what Envoy 1.40 sends (compared in tests/ratelimit.rs). Nothing runs between requests: the
//! bucket is one number, the time at which it was empty.
//!
//! Like the filter Istio's rate-limiting task inserts first in the inbound HTTP chain
//! (`INSERT_BEFORE` the connection manager's filters), limiting runs before authentication and
//! authorization: a limited request is answered 429 whatever policy would say, and a denied
//! request still takes a token.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue, Method};

/// Per-principal buckets kept at most per rule. Past it, full buckets (which a new bucket
/// would equal) are forgotten; if every bucket is in use, principals without one share one
/// overflow bucket, so memory stays bounded whatever the peers do.
const MAX_BUCKETS_PER_RULE: usize = 10_000;

/// Envoy's minimum `fill_interval` ("fill_interval must be >= 50ms").
pub const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);

/// Envoy's `token_bucket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
}

/// One rate limit rule, as configured (`rateLimits[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitRule {
    /// Names the rule in metrics and logs.
    pub name: String,
    /// The inbound listeners it applies to; empty: every HTTP listener.
    pub listeners: Vec<String>,
    /// Requests whose path starts with this (after normalization is not applied: the raw
    /// path, as Envoy's route match sees it before filters); `None`: every path.
    pub path_prefix: Option<String>,
    /// Requests with one of these methods; empty: every method.
    pub methods: Vec<Method>,
    /// One bucket per source principal (plaintext callers share the bucket of `""`).
    pub per_principal: bool,
    pub bucket: TokenBucket,
    /// Envoy's `enable_x_ratelimit_headers: DRAFT_VERSION_03`.
    pub rate_limit_headers: bool,
    /// Envoy's `response_headers_to_add`: added to limited responses.
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
}

/// Envoy's `AtomicTokenBucketImpl`: the whole state is `time`, the moment (in seconds since
/// the limiter started) at which the bucket would have been empty; tokens now are
/// `min(max_tokens, (now - time) * fill_rate)`.
#[derive(Debug)]
struct Bucket {
    time: f64,
}

impl TokenBucket {
    /// Tokens a second.
    fn fill_rate(&self) -> f64 {
        f64::from(self.tokens_per_fill) / self.fill_interval.max(MIN_FILL_INTERVAL).as_secs_f64()
    }
}

impl Bucket {
    /// A full bucket (Envoy's `init_fill`).
    fn full(cfg: &TokenBucket, now: f64) -> Bucket {
        Bucket {
            time: now - f64::from(cfg.max_tokens) / cfg.fill_rate(),
        }
    }

    fn tokens(&self, cfg: &TokenBucket, now: f64) -> f64 {
        ((now - self.time) * cfg.fill_rate()).min(f64::from(cfg.max_tokens))
    }

    /// Takes one token if there is one (`consume`).
    fn take(&mut self, cfg: &TokenBucket, now: f64) -> bool {
        let tokens = self.tokens(cfg, now);
        if tokens < 1.0 {
            return false;
        }
        self.time = now - (tokens - 1.0) / cfg.fill_rate();
        true
    }

    /// How long until a whole token is there (`nextTokenAvailable`): zero while one is.
    fn next_token(&self, cfg: &TokenBucket, now: f64) -> Duration {
        let tokens = self.tokens(cfg, now);
        if tokens >= 1.0 {
            return Duration::ZERO;
        }
        Duration::from_millis(((1.0 - tokens) / cfg.fill_rate() * 1000.0).ceil() as u64)
    }
}

enum Buckets {
    Shared(Mutex<Bucket>),
    PerPrincipal {
        map: Mutex<HashMap<Arc<str>, Bucket>>,
        overflow: Mutex<Bucket>,
    },
}

struct Rule {
    cfg: RateLimitRule,
    buckets: Buckets,
}

impl Rule {
    fn new(cfg: &RateLimitRule, now: f64) -> Rule {
        Rule {
            buckets: if cfg.per_principal {
                Buckets::PerPrincipal {
                    map: Mutex::new(HashMap::new()),
                    overflow: Mutex::new(Bucket::full(&cfg.bucket, now)),
                }
            } else {
                Buckets::Shared(Mutex::new(Bucket::full(&cfg.bucket, now)))
            },
            cfg: cfg.clone(),
        }
    }
}

/// What a request is, for the rules.
pub struct Request<'a> {
    pub listener: &'a str,
    pub method: &'a Method,
    pub path: &'a str,
    pub principal: &'a str,
}

/// The outcome for one request: limited (by which rule), and the `x-ratelimit-*` headers to
/// add.
#[derive(Debug, Default)]
pub struct Verdict {
    /// The first rule whose bucket was empty.
    pub limited_by: Option<String>,
    /// Headers for the response: `x-ratelimit-*` (when enabled) and, when limited, the
    /// rule's `response_headers`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// The rules in force.
pub struct RateLimiter {
    rules: Vec<Arc<Rule>>,
    /// Bucket times are seconds since this.
    base: Instant,
    /// The policy version the rules were built for.
    version: u64,
}

static LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

impl RateLimiter {
    pub fn new(rules: &[RateLimitRule], version: u64) -> RateLimiter {
        RateLimiter {
            rules: rules.iter().map(|c| Arc::new(Rule::new(c, 0.0))).collect(),
            base: Instant::now(),
            version,
        }
    }

    /// The policy version these rules were built for.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The limiter for a new rule set: a rule that is unchanged keeps its buckets (a policy
    /// reload must not refill them), a new or changed one starts full.
    pub fn rebuilt(&self, rules: &[RateLimitRule], version: u64) -> RateLimiter {
        let now = Instant::now()
            .saturating_duration_since(self.base)
            .as_secs_f64();
        RateLimiter {
            rules: rules
                .iter()
                .map(|c| {
                    self.rules
                        .iter()
                        .find(|r| r.cfg == *c)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(Rule::new(c, now)))
                })
                .collect(),
            base: self.base,
            version,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Takes a token from the bucket of every rule the request matches. Limited when one of
    /// them had none (the others keep the token they gave, as separate Envoy filters would).
    pub fn check(&self, req: &Request<'_>, now: Instant) -> Verdict {
        let now = now.saturating_duration_since(self.base).as_secs_f64();
        let mut v = Verdict::default();
        for rule in &self.rules {
            let c = &rule.cfg;
            if !(c.listeners.is_empty() || c.listeners.iter().any(|l| l == req.listener))
                || !c
                    .path_prefix
                    .as_deref()
                    .is_none_or(|p| req.path.starts_with(p))
                || !(c.methods.is_empty() || c.methods.contains(req.method))
            {
                continue;
            }
            let take = |b: &mut Bucket| {
                let allowed = b.take(&c.bucket, now);
                // Whole tokens left: Envoy's `remainingTokens()` as an integer.
                let remaining = b.tokens(&c.bucket, now).max(0.0) as u32;
                (allowed, remaining, b.next_token(&c.bucket, now))
            };
            let (allowed, remaining, reset) = match &rule.buckets {
                Buckets::Shared(b) => take(&mut lock(b)),
                Buckets::PerPrincipal { map, overflow } => {
                    let mut map = lock(map);
                    if let Some(b) = map.get_mut(req.principal) {
                        take(b)
                    } else {
                        if map.len() >= MAX_BUCKETS_PER_RULE {
                            let max = f64::from(c.bucket.max_tokens);
                            map.retain(|_, b| b.tokens(&c.bucket, now) < max);
                        }
                        if map.len() >= MAX_BUCKETS_PER_RULE {
                            take(&mut lock(overflow))
                        } else {
                            let b = map
                                .entry(Arc::from(req.principal))
                                .or_insert_with(|| Bucket::full(&c.bucket, now));
                            take(b)
                        }
                    }
                }
            };
            if c.rate_limit_headers {
                // DRAFT_VERSION_03: the limit, what is left, and seconds to the next token.
                let secs = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
                v.headers.push((LIMIT.clone(), c.bucket.max_tokens.into()));
                v.headers.push((REMAINING.clone(), remaining.into()));
                v.headers.push((RESET.clone(), secs.into()));
            }
            if !allowed && v.limited_by.is_none() {
                v.limited_by = Some(c.name.clone());
                v.headers.extend(c.response_headers.iter().cloned());
            }
        }
        v
    }
}

/// A poisoned lock only means another request panicked while counting tokens; the count is
/// still a count.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(per_principal: bool) -> RateLimitRule {
        RateLimitRule {
            name: "r".into(),
            listeners: Vec::new(),
            path_prefix: Some("/api".into()),
            methods: vec![Method::GET],
            per_principal,
            bucket: TokenBucket {
                max_tokens: 3,
                tokens_per_fill: 2,
                fill_interval: Duration::from_secs(10),
            },
            rate_limit_headers: true,
            response_headers: Vec::new(),
        }
    }

    fn req<'a>(path: &'a str, principal: &'a str) -> Request<'a> {
        Request {
            listener: "web",
            method: &Method::GET,
            path,
            principal,
        }
    }

    #[test]
    fn a_bucket_starts_full_refills_continuously_and_caps() {
        // 2 tokens per 10 s: one every 5 s.
        let rl = RateLimiter::new(&[rule(false)], 0);
        let t0 = rl.base;
        let limited = |t: Instant| rl.check(&req("/api/x", "a"), t).limited_by.is_some();
        assert!(!limited(t0) && !limited(t0) && !limited(t0));
        assert!(limited(t0));
        // 4.9 s: not a whole token yet.
        assert!(limited(t0 + Duration::from_millis(4_900)));
        // 5 s: one.
        let t1 = t0 + Duration::from_millis(5_000);
        assert!(!limited(t1));
        assert!(limited(t1));
        // A long pause fills to the maximum, not beyond.
        let t2 = t0 + Duration::from_secs(1000);
        assert!(!limited(t2) && !limited(t2) && !limited(t2));
        assert!(limited(t2));
    }

    #[test]
    fn only_matching_requests_count_and_principals_have_their_own_buckets() {
        let rl = RateLimiter::new(&[rule(true)], 0);
        let t = rl.base;
        for _ in 0..3 {
            assert!(rl.check(&req("/api/x", "a"), t).limited_by.is_none());
        }
        assert_eq!(
            rl.check(&req("/api/x", "a"), t).limited_by.as_deref(),
            Some("r")
        );
        assert!(rl.check(&req("/api/x", "b"), t).limited_by.is_none());
        assert!(rl.check(&req("/other", "a"), t).limited_by.is_none());
        // `b` took one of three at t; 2.5 s later it has 2.5 tokens, takes one: 1 left (a
        // whole one), so a token is there now.
        let v = rl.check(&req("/api/x", "b"), t + Duration::from_millis(2_500));
        let h: Vec<String> = v
            .headers
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_str().unwrap()))
            .collect();
        assert_eq!(
            h,
            [
                "x-ratelimit-limit=3",
                "x-ratelimit-remaining=1",
                "x-ratelimit-reset=0"
            ]
        );
    }

    #[test]
    fn per_principal_buckets_stay_bounded() {
        let rl = RateLimiter::new(&[rule(true)], 0);
        let t = Instant::now();
        for i in 0..(MAX_BUCKETS_PER_RULE + 50) {
            rl.check(&req("/api", &format!("p{i}")), t);
        }
        let Buckets::PerPrincipal { map, .. } = &rl.rules[0].buckets else {
            unreachable!()
        };
        assert!(lock(map).len() <= MAX_BUCKETS_PER_RULE);
    }
}
