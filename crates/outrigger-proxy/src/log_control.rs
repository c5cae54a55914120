//! What `POST /logging` changes: the agent's log filter, owned by the binary. A leaf module,
//! so that the shared context (`ctx`) can hold it without importing the admin listener that
//! reads the context.

/// The agent's log filter, as the admin API sees it (the binary owns the logger).
pub trait LogControl: Send + Sync {
    /// The filter in force (`info`, `info,outrigger_proxy=debug` …).
    fn current(&self) -> String;
    /// Replaces it; `Err` says why the value was refused (the filter in force stays).
    fn set(&self, filter: &str) -> Result<String, String>;
}
