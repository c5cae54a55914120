//! The open-file limit (`RLIMIT_NOFILE`): raised from the soft to the hard limit at start.
//!
//! Many systems still start services with a soft limit of 1024 (the kernel default, kept for
//! programs that use `select(2)`), far below the hard limit (systemd: 524288). An agent that
//! holds two descriptors per connection runs out at ~500 connections and then cannot even
//! reread its policy or certificates (issue 13). Outrigger uses epoll, not `select(2)`, so it
//! does what systemd.exec(5) (`LimitNOFILE=`) asks of such programs: "Typically applications
//! should increase their soft limit to the hard limit on their own, if they are OK with working
//! with file descriptors above 1023, i.e. do not use select(2)."
//!
//! Windows has no per-process soft limit on sockets or files: a process may hold up to
//! 2^24 handles, and sockets count against memory rather than a configured budget. Nothing is
//! changed there; the connection caps are derived from that budget.

/// The open-file limit before and after the start-up raise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit found at start (`None`: unlimited).
    pub old: Option<u64>,
    /// The soft limit in force now.
    pub soft: Option<u64>,
    /// The hard limit.
    pub hard: Option<u64>,
    /// Why the raise failed, if it did (the old limit stays).
    pub error: Option<String>,
}

/// Windows' per-process handle limit (2^24): what the connection caps are derived from there.
#[cfg_attr(unix, allow(dead_code))]
pub const WINDOWS_HANDLE_BUDGET: u64 = 1 << 24;

impl FdLimit {
    /// The soft limit as a number of descriptors (unlimited as `u64::MAX`), for deriving the
    /// connection caps.
    pub fn budget(&self) -> u64 {
        self.soft.unwrap_or(u64::MAX)
    }

    /// Logs what was done, once logging is set up.
    pub fn log(&self) {
        let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
        match &self.error {
            Some(e) => tracing::warn!(
                soft = %show(self.old), hard = %show(self.hard),
                "open-file limit (RLIMIT_NOFILE) could not be raised to the hard limit: {e}"
            ),
            None if self.old != self.soft => tracing::info!(
                old = %show(self.old), new = %show(self.soft),
                "open-file limit (RLIMIT_NOFILE) raised to the hard limit: {} -> {}",
                show(self.old), show(self.soft)
            ),
            None => tracing::info!(
                soft = %show(self.soft),
                "open-file limit (RLIMIT_NOFILE) is already the hard limit"
            ),
        }
    }
}

/// Raises the soft open-file limit to the hard limit.
#[cfg(unix)]
pub fn raise() -> FdLimit {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let mut out = current();
    if out.soft == out.hard {
        return out;
    }
    let want = Rlimit {
        current: out.hard,
        maximum: out.hard,
    };
    match setrlimit(Resource::Nofile, want) {
        Ok(()) => out.soft = getrlimit(Resource::Nofile).current,
        Err(e) => out.error = Some(e.to_string()),
    }
    out
}

/// The limit in force, unchanged.
#[cfg(unix)]
pub fn current() -> FdLimit {
    let cur = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    FdLimit {
        old: cur.current,
        soft: cur.current,
        hard: cur.maximum,
        error: None,
    }
}

/// Windows: nothing to raise (see the module comment).
#[cfg(not(unix))]
pub fn raise() -> FdLimit {
    current()
}

#[cfg(not(unix))]
pub fn current() -> FdLimit {
    FdLimit {
        old: Some(WINDOWS_HANDLE_BUDGET),
        soft: Some(WINDOWS_HANDLE_BUDGET),
        hard: Some(WINDOWS_HANDLE_BUDGET),
        error: None,
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn raises_the_soft_limit_to_the_hard_limit() {
        // Raising within the hard limit needs no privilege; the test process keeps the raised
        // limit, which harms nothing.
        let l = raise();
        assert_eq!(l.error, None);
        assert_eq!(l.soft, l.hard);
        let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(now.current, now.maximum);
    }
}
