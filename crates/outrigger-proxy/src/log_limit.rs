//! Rate-limited warnings for what a peer can trigger at will (refused connections, failed
//! handshakes, failed backend requests): one line per refusal would let anyone who can open a
//! connection fill the host's disk (20,000 plaintext connects wrote 5.6 MB in a second).
//!
//! Each call site of [`warn_limited!`](crate::warn_limited) has its own budget: [`BURST`] lines
//! per [`WINDOW`]; past it lines are counted, not written, and the next line written carries
//! `suppressed=<n>`, the number left out since the previous one. Metrics still count every
//! refusal; only the log is thinned.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lines a call site may write per window before it is thinned.
pub const BURST: u64 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(1);

fn since_start() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The budget of one call site. Lock-free: a race at a window boundary can let one extra line
/// through, never lose a count.
pub struct Limiter {
    /// The window's start, in milliseconds since the first use of any limiter.
    window: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
}

impl Limiter {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Limiter {
        Limiter {
            window: AtomicU64::new(0),
            used: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: write the line, noting `n` lines suppressed before it; `None`: suppress it.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(since_start())
    }

    fn allow_at(&self, now_ms: u64) -> Option<u64> {
        let window_ms = WINDOW.as_millis() as u64;
        let start = self.window.load(Ordering::Relaxed);
        if now_ms.saturating_sub(start) >= window_ms
            && self
                .window
                .compare_exchange(start, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `tracing::warn!` with a per-call-site budget (see the module docs). Same arguments.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::Limiter = $crate::log_limit::Limiter::new();
        match LIMIT.allow() {
            Some(0) => ::tracing::warn!($($arg)+),
            Some(suppressed) => ::tracing::warn!(suppressed, $($arg)+),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_counted_silence_then_the_count() {
        let l = Limiter::new();
        for _ in 0..BURST {
            assert_eq!(l.allow_at(5), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.allow_at(500), None);
        }
        // The next window: the first line carries what was left out.
        assert_eq!(l.allow_at(1005), Some(1000));
        assert_eq!(l.allow_at(1006), Some(0));
    }

    #[test]
    fn call_sites_have_their_own_budget() {
        let (a, b) = (Limiter::new(), Limiter::new());
        for _ in 0..BURST {
            a.allow_at(0);
        }
        assert_eq!(a.allow_at(1), None);
        assert_eq!(b.allow_at(1), Some(0));
    }
}
