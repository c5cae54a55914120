//! The `connections:` section of the agent configuration (documented in `docs/config.md`): the
//! HTTP connection idle timeout and the caps on downstream connections. A child module of
//! `config`, so that it shares the validator and its file:line:field errors.

use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use outrigger_proxy::limits::ConnectionLimits;

use super::{ConfigError, Validator};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawConnections {
    #[serde(default)]
    idle_timeout: Option<Spanned<String>>,
    #[serde(default)]
    max: Option<Spanned<u64>>,
    #[serde(default)]
    max_per_identity: Option<Spanned<u64>>,
}

/// `connections:`, validated. The caps left out are derived from the open-file limit at start
/// ([`ConnectionsConfig::limits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionsConfig {
    /// `None`: never close an idle connection (`idleTimeout: 0s`, as Envoy's `0`).
    pub idle_timeout: Option<Duration>,
    pub max: Option<usize>,
    pub max_per_identity: Option<usize>,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            idle_timeout: Some(outrigger_proxy::DEFAULT_IDLE_TIMEOUT),
            max: None,
            max_per_identity: None,
        }
    }
}

impl ConnectionsConfig {
    /// The caps in force for an open-file budget of `fds` descriptors: what the file says,
    /// and for what it leaves out the defaults of [`ConnectionLimits::from_fd_limit`] (with
    /// `max` set alone, half of it per identity).
    pub fn limits(&self, fds: u64) -> ConnectionLimits {
        let derived = ConnectionLimits::from_fd_limit(fds);
        let max = self.max.unwrap_or(derived.max);
        let max_per_identity = match (self.max_per_identity, self.max) {
            (Some(n), _) => n.min(max),
            (None, Some(m)) => (m / 2).max(1),
            (None, None) => derived.max_per_identity,
        };
        ConnectionLimits {
            max,
            max_per_identity,
        }
    }
}

impl Validator<'_> {
    pub(super) fn connections(
        &self,
        raw: &RawConnections,
    ) -> Result<ConnectionsConfig, ConfigError> {
        let idle_timeout = self.duration(
            &raw.idle_timeout,
            "connections.idleTimeout",
            outrigger_proxy::DEFAULT_IDLE_TIMEOUT,
            super::IDLE,
        )?;
        let count = |v: &Option<Spanned<u64>>, field: &str| -> Result<Option<usize>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            if v.value == 0 {
                return Err(self.err(
                    v,
                    field,
                    "must be at least 1 (leave it out for the default derived from the open-file limit)",
                ));
            }
            usize::try_from(v.value)
                .map(Some)
                .map_err(|_| self.err(v, field, format!("{} is too large", v.value)))
        };
        let max = count(&raw.max, "connections.max")?;
        let max_per_identity = count(&raw.max_per_identity, "connections.maxPerIdentity")?;
        if let (Some(m), Some(p), Some(at)) = (max, max_per_identity, &raw.max_per_identity)
            && p > m
        {
            return Err(self.err(
                at,
                "connections.maxPerIdentity",
                format!("{p} is above connections.max ({m})"),
            ));
        }
        Ok(ConnectionsConfig {
            idle_timeout: (!idle_timeout.is_zero()).then_some(idle_timeout),
            max,
            max_per_identity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_caps_win_and_the_rest_is_derived() {
        let c = ConnectionsConfig::default();
        assert_eq!(c.limits(1024), ConnectionLimits::from_fd_limit(1024));
        let c = ConnectionsConfig {
            max: Some(10),
            ..Default::default()
        };
        assert_eq!(
            c.limits(1024),
            ConnectionLimits {
                max: 10,
                max_per_identity: 5
            }
        );
        let c = ConnectionsConfig {
            max_per_identity: Some(3),
            ..Default::default()
        };
        assert_eq!(c.limits(1024).max_per_identity, 3);
        assert_eq!(c.limits(1024).max, 384);
        // Never more per identity than in all.
        let c = ConnectionsConfig {
            max_per_identity: Some(500),
            ..Default::default()
        };
        assert_eq!(c.limits(1024).max_per_identity, 384);
    }
}
