//! Returning freed heap memory to the system after a burst of connections (issue 13: RSS rose
//! with a burst of idle connections and stayed there after they closed).
//!
//! Measured with `scripts/idle-burst-rss.sh` (RELIABILITY.md): after 500 idle HTTP/2
//! connections closed, glibc's allocator kept about 31 MB of freed memory mapped — free chunks
//! in the middle of its heaps, which its automatic trimming (only the top of the main heap)
//! never returns. `malloc_trim(0)` returns them (glibc >= 2.8 releases free pages in every
//! arena with `madvise(MADV_DONTNEED)`), and so did jemalloc with background purging; calling
//! glibc's own function keeps the allocator (and no C build step) unchanged.
//!
//! When: a burst is over when the open downstream connections have fallen well below their
//! peak. Checking a gauge every few seconds costs nothing; trimming walks the heaps, so it runs
//! only then — never on the request path and never on steady churn. This is the same idea as
//! Envoy's periodic release of free memory to the system (`memory_allocator_manager`,
//! tcmalloc's `ReleaseMemoryToSystem`), triggered by a burst ending instead of a fixed rate.
//!
//! Only glibc has this problem and this function: musl returns freed memory itself, and
//! Windows' heap decommits free pages on its own.

use std::time::Duration;

/// How often the open-connection count is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// A fall in open connections that counts as a burst ending: at least this many connections
/// ...
const MIN_FALL: i64 = 64;
/// ... and at least this fraction (1/4) of the peak.
const FALL_DIVISOR: i64 = 4;

/// Whether connections falling from `peak` to `now` is a burst ending worth a trim.
fn burst_ended(peak: i64, now: i64) -> bool {
    let fall = peak.saturating_sub(now);
    fall >= MIN_FALL && fall >= peak / FALL_DIVISOR
}

/// Watches the downstream connections (`take_peak`: open now, and the most open since the
/// last call, so that a burst between two looks is seen) and returns freed heap memory to the
/// system whenever a burst of connections has ended. `None` where the allocator returns memory
/// by itself.
pub fn spawn(
    take_peak: impl Fn() -> (i64, i64) + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    if !trim::AVAILABLE {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut peak = 0i64;
        loop {
            tick.tick().await;
            let (now, recent_peak) = take_peak();
            peak = peak.max(recent_peak);
            if burst_ended(peak, now) {
                // Off the runtime's worker threads: trimming large heaps takes milliseconds.
                let released = tokio::task::spawn_blocking(trim::release).await;
                tracing::debug!(
                    peak,
                    open = now,
                    released = ?released.ok(),
                    "connection burst over: returned free heap memory to the system"
                );
                peak = now;
            }
        }
    }))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod trim {
    pub const AVAILABLE: bool = true;

    /// Returns free heap memory to the system; whether any was.
    pub fn release() -> bool {
        // SAFETY: malloc_trim(3) takes a size and touches only the allocator's own state under
        // its own locks; it is documented as safe to call at any time from any thread.
        unsafe { libc::malloc_trim(0) == 1 }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod trim {
    pub const AVAILABLE: bool = false;

    pub fn release() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_real_fall_from_the_peak_is_a_burst_ending() {
        // Steady churn around a level: no trim.
        assert!(!burst_ended(10, 9));
        assert!(!burst_ended(1000, 990));
        // A burst of 500 closing: trim.
        assert!(burst_ended(501, 1));
        // Large fleets: a quarter of the peak.
        assert!(!burst_ended(10_000, 9_000));
        assert!(burst_ended(10_000, 7_400));
        // Small numbers never trim.
        assert!(!burst_ended(63, 0));
        assert!(burst_ended(64, 0));
    }

    #[test]
    fn release_can_be_called_from_any_thread() {
        let h = std::thread::spawn(trim::release);
        let _ = h.join().unwrap();
    }
}
