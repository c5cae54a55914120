//! The policy in force, published atomically and watched by long-lived connections, with the
//! last reload failure and a change waiting to be applied.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use outrigger_policy::Snapshot;

use crate::ratelimit;

/// The policy in force and where it came from.
pub struct PolicyState {
    pub snapshot: Snapshot,
    /// Local rate limits from Istio `EnvoyFilter`s in the policy files (added to the
    /// configuration's `rateLimits`).
    pub rate_limits: Vec<ratelimit::RateLimitRule>,
    /// The files the snapshot was built from.
    pub sources: Vec<String>,
    /// Increases with every successful (re)load.
    pub version: u64,
    pub loaded_at: SystemTime,
}

/// The last failed reload, kept for `/config_dump` until a reload succeeds.
#[derive(Debug, Clone)]
pub struct ReloadFailure {
    pub at: SystemTime,
    pub error: String,
}

/// A change to the policy files that has been seen but not applied yet: it must read the same
/// for a while first (see `outrigger_tls::settle`), so that a file caught mid-write is never
/// applied.
#[derive(Debug, Clone)]
pub struct PendingChange {
    /// When the change was first seen.
    pub since: SystemTime,
    /// Whether it removes every policy, or every policy of a file (it then waits longer and is
    /// logged as a warning when applied).
    pub removal: bool,
    /// What the change is waiting for, for operators.
    pub detail: String,
}

/// The published policy: swapped atomically, watched by long-lived connections.
pub struct PolicyHandle {
    current: ArcSwap<PolicyState>,
    last_failure: ArcSwap<Option<ReloadFailure>>,
    pending: ArcSwap<Option<PendingChange>>,
    /// The cluster policy source's state (`policy.kubernetes`), for `/config_dump`.
    cluster: ArcSwap<Option<serde_json::Value>>,
    changed: watch::Sender<u64>,
}

impl PolicyHandle {
    pub fn new(state: PolicyState) -> Arc<Self> {
        let (changed, _) = watch::channel(state.version);
        Arc::new(PolicyHandle {
            current: ArcSwap::from_pointee(state),
            last_failure: ArcSwap::from_pointee(None),
            pending: ArcSwap::from_pointee(None),
            cluster: ArcSwap::from_pointee(None),
            changed,
        })
    }

    /// The policy in force (lock-free).
    pub fn load(&self) -> Arc<PolicyState> {
        self.current.load_full()
    }

    /// Swaps in a new policy; every later decision uses it.
    pub fn publish(&self, state: PolicyState) {
        let v = state.version;
        self.current.store(Arc::new(state));
        self.last_failure.store(Arc::new(None));
        self.changed.send_replace(v);
    }

    /// Records a failed reload: the previous policy stays in force.
    pub fn record_failure(&self, error: String) {
        self.last_failure.store(Arc::new(Some(ReloadFailure {
            at: SystemTime::now(),
            error,
        })));
    }

    pub fn last_failure(&self) -> Option<ReloadFailure> {
        (**self.last_failure.load()).clone()
    }

    /// Records the change waiting to settle (`None`: nothing pending).
    pub fn set_pending(&self, pending: Option<PendingChange>) {
        self.pending.store(Arc::new(pending));
    }

    pub fn pending(&self) -> Option<PendingChange> {
        (**self.pending.load()).clone()
    }

    /// Records the cluster policy source's state (shown as `policy.cluster` in `/config_dump`).
    pub fn set_cluster_status(&self, status: Option<serde_json::Value>) {
        self.cluster.store(Arc::new(status));
    }

    pub fn cluster_status(&self) -> Option<serde_json::Value> {
        (**self.cluster.load()).clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
