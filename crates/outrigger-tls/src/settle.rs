//! When a file that something else writes may be applied: only once a read is stable.
//!
//! Editors, `cat > file`, PowerShell's `Set-Content` and many configuration-management tools
//! rewrite a file in place: truncate, then write. A reader that polls at the wrong moment sees
//! an empty or half-written file. For policy that is dangerous — an empty policy directory
//! means "no AuthorizationPolicy", which Istio defines as allow ("If there are no ALLOW
//! policies for the workload, allow the request", Istio AuthorizationPolicy reference) — and
//! for certificates it means applying (or loudly refusing) a chain and key from two different
//! moments. So both the policy watcher (`outrigger`'s `policy_files::watch`) and
//! [`crate::CertStore`] apply what they read only when it is *stable*: the same content (and
//! the same size and modification time) on every read over at least [`SETTLE`], and at least
//! two reads. A change that removes every policy, or every policy of a file, must be stable for
//! [`REMOVAL_SETTLE`].
//!
//! Every timing number of that rule is here, in one place.

use std::time::{Duration, Instant};

/// How long a changed file set must read the same before it is applied. Writers that truncate
/// and rewrite finish within milliseconds (a policy or PEM file is a few KB); half a second
/// leaves two orders of magnitude of margin, yet a reload still lands well under a second after
/// the change is noticed.
pub const SETTLE: Duration = Duration::from_millis(500);

/// How long a change that removes every policy, or every policy of one file, must read the same
/// before it is applied: such a change is indistinguishable from a truncated file, and applying
/// it by mistake fails open, so it must outlast a slow writer (a network share, a tool that
/// pauses between truncating and writing) by a wide margin. A deliberate removal is applied
/// after this delay, with a warning.
pub const REMOVAL_SETTLE: Duration = Duration::from_secs(3);

/// How often a changed file set is re-read while it settles (the configured poll interval
/// applies when nothing is changing). Short enough to see a rewrite that happens between two
/// reads [`SETTLE`] apart: every read in the window must agree.
pub const SETTLE_POLL: Duration = Duration::from_millis(100);

/// Tracks one candidate content (`F`: whatever identifies a read — the bytes, a hash, sizes and
/// modification times) until it has read the same for long enough.
#[derive(Debug)]
pub struct Settle<F> {
    pending: Option<Pending<F>>,
}

#[derive(Debug)]
struct Pending<F> {
    seen: F,
    since: Instant,
    reads: u32,
}

impl<F> Default for Settle<F> {
    fn default() -> Self {
        Settle { pending: None }
    }
}

impl<F: PartialEq> Settle<F> {
    /// Records a read. Returns how long this content has read the same, once it has been read
    /// at least twice; `None` when it is new (the clock starts now).
    pub fn observe(&mut self, seen: F, now: Instant) -> Option<Duration> {
        match &mut self.pending {
            Some(p) if p.seen == seen => {
                p.reads += 1;
                Some(now.saturating_duration_since(p.since))
            }
            _ => {
                self.pending = Some(Pending {
                    seen,
                    since: now,
                    reads: 1,
                });
                None
            }
        }
    }

    /// Whether the last read has been stable for `window` (and read at least twice).
    pub fn observe_stable(&mut self, seen: F, now: Instant, window: Duration) -> bool {
        self.observe(seen, now).is_some_and(|held| held >= window)
    }

    /// Whether a change is waiting to settle.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The candidate being watched, if any.
    pub fn pending(&self) -> Option<&F> {
        self.pending.as_ref().map(|p| &p.seen)
    }

    /// Forgets the candidate (applied, refused, or back to what is in force).
    pub fn clear(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_only_after_two_equal_reads_over_the_window() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Settle::default();
        // One read is never enough, however long the window.
        assert!(!s.observe_stable("a", t0, Duration::ZERO));
        assert!(s.observe_stable("a", t0 + ms(1), Duration::ZERO));
        s.clear();
        assert!(!s.is_pending());

        assert!(!s.observe_stable("a", t0, SETTLE));
        assert!(!s.observe_stable("a", t0 + ms(100), SETTLE));
        // A different read in between restarts the clock.
        assert!(!s.observe_stable("", t0 + ms(200), SETTLE));
        assert!(!s.observe_stable("a", t0 + ms(300), SETTLE));
        assert!(!s.observe_stable("a", t0 + ms(700), SETTLE));
        assert_eq!(s.pending(), Some(&"a"));
        assert!(s.observe_stable("a", t0 + ms(800), SETTLE));
    }
}
