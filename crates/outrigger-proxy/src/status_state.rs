//! What the status page shows that the data path records: the recent denials and the
//! request and connection rates. A leaf module, so that the shared context (`ctx`) can hold
//! them without importing the page (`status`), which reads the context.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// How many recent denials the page keeps.
pub const DENIALS_KEPT: usize = 100;

/// One refused request or connection.
#[derive(Debug, Clone)]
pub struct Denial {
    pub at: SystemTime,
    pub listener: String,
    pub source: String,
    /// The path (HTTP) or `tcp`.
    pub request: String,
    /// The deciding policy and rule, `ns/name[rule]`.
    pub policy: Option<String>,
    pub reason: &'static str,
}

/// The last [`DENIALS_KEPT`] denials, newest last.
#[derive(Default)]
pub struct Denials(Mutex<VecDeque<Denial>>);

impl Denials {
    /// Lists a refusal of `request` (a path, or `tcp`) on `conn`, now.
    pub(crate) fn refused(
        &self,
        conn: &crate::conn::ConnInfo,
        request: &str,
        policy: Option<String>,
        reason: &'static str,
    ) {
        self.record(Denial {
            at: SystemTime::now(),
            listener: conn.listener.name.clone(),
            source: conn.source_principal_str().to_string(),
            request: request.to_string(),
            policy,
            reason,
        });
    }

    pub fn record(&self, d: Denial) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == DENIALS_KEPT {
            q.pop_front();
        }
        // A path is bounded by the HTTP limits already; bound it again so that the ring
        // buffer's memory is bounded whatever the codec allows.
        let mut d = d;
        truncate(&mut d.request, 512);
        q.push_back(d);
    }

    pub fn recent(&self) -> Vec<Denial> {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().rev().cloned().collect()
    }
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
}

/// Request and connection counters, sampled once a second for the rates.
#[derive(Default)]
pub struct Rates {
    pub requests: AtomicU64,
    pub connections: AtomicU64,
    samples: Mutex<VecDeque<(Instant, u64, u64)>>,
}

/// The window the rates are averaged over.
const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Rates {
    /// Takes a sample (called every second by the admin listener, and on each page view).
    pub fn sample(&self) {
        let now = Instant::now();
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        s.push_back((
            now,
            self.requests.load(Ordering::Relaxed),
            self.connections.load(Ordering::Relaxed),
        ));
        while s.len() > 2
            && s.front()
                .is_some_and(|(t, ..)| now.duration_since(*t) > RATE_WINDOW)
        {
            s.pop_front();
        }
        while s.len() > 64 {
            s.pop_front();
        }
    }

    /// Requests and connections per second over the last [`RATE_WINDOW`].
    pub fn per_second(&self) -> (f64, f64) {
        self.sample();
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        match (s.front(), s.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                let dt = b.0.duration_since(a.0).as_secs_f64();
                (
                    b.1.saturating_sub(a.1) as f64 / dt,
                    b.2.saturating_sub(a.2) as f64 / dt,
                )
            }
            _ => (0.0, 0.0),
        }
    }
}
