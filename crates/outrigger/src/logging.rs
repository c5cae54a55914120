//! The agent's own log (not the access log): which lines are written (`log.level`, or
//! `RUST_LOG` when set), in which format, and whether with colour.

use std::io::IsTerminal;

use crate::config::LogFormat;

/// The levels a filter may name. Envoy's and istio-proxy's names (`warning`, `critical`) are
/// accepted too, because people migrating from a sidecar write them
/// (`istioctl proxy-config log --level warning`); they mean `warn` and `error`.
const LEVELS: &[(&str, &str)] = &[
    ("trace", "trace"),
    ("debug", "debug"),
    ("info", "info"),
    ("warn", "warn"),
    ("warning", "warn"),
    ("error", "error"),
    ("critical", "error"),
    ("off", "off"),
];

fn level(s: &str) -> Option<&'static str> {
    let s = s.trim().to_ascii_lowercase();
    LEVELS.iter().find(|(name, _)| *name == s).map(|(_, l)| *l)
}

/// Checks a log filter — a level (`info`), or comma-separated `level` and `target=level`
/// directives (`info,outrigger_proxy=debug`) — and returns it in the form `tracing` reads.
///
/// `tracing`'s own parser takes any bare word as a *target* enabled at every level, so
/// `warning` would silently mean "only lines from a module named warning", i.e. no log at all.
/// Here a bare word must be a level, and `target=level` must name a level.
pub fn parse_filter(s: &str) -> Result<String, String> {
    let names = || {
        LEVELS
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = Vec::new();
    for d in s.split(',').map(str::trim) {
        if d.is_empty() {
            return Err(format!(
                "`{s}`: empty directive (write e.g. `info` or `info,outrigger_proxy=debug`)"
            ));
        }
        let directive = match d.rsplit_once('=') {
            None => level(d)
                .ok_or_else(|| {
                    format!(
                        "`{d}` is not a log level (one of {}; or `target=level`)",
                        names()
                    )
                })?
                .to_string(),
            Some((target, l)) => {
                let l = level(l).ok_or_else(|| {
                    format!("`{d}`: `{l}` is not a log level (one of {})", names())
                })?;
                if target.trim().is_empty() {
                    return Err(format!("`{d}`: no target before `=`"));
                }
                format!("{}={l}", target.trim())
            }
        };
        out.push(directive);
    }
    let filter = out.join(",");
    // What is left for tracing to refuse: span and field syntax inside a target.
    tracing_subscriber::EnvFilter::builder()
        .parse(&filter)
        .map_err(|e| format!("`{s}`: {e}"))?;
    Ok(filter)
}

/// Colour only for a person at a terminal: never into a file, a pipe or a service's log, and
/// never when `NO_COLOR` is set (https://no-color.org). Windows Server 2016 consoles show ANSI
/// codes raw, so never there.
fn use_colour() -> bool {
    cfg!(not(windows))
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::io::stderr().is_terminal()
}

/// The reload handle of the agent's filter, for the admin API's `POST /logging`.
static FILTER: std::sync::OnceLock<(
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
    std::sync::Mutex<String>,
)> = std::sync::OnceLock::new();

/// Starts the agent's log on stderr. `RUST_LOG`, when set, replaces `log.level` entirely (it
/// is checked the same way; a bad value is an error, not silence). The filter can be changed
/// later with [`AdminLogControl`] (`POST /logging?level=` on the admin listener).
pub fn init(format: LogFormat, level: &str) -> anyhow::Result<()> {
    use tracing_subscriber::prelude::*;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            parse_filter(&v).map_err(|e| anyhow::anyhow!("RUST_LOG: {e}"))?
        }
        _ => level.to_string(),
    };
    let (layer, handle) =
        tracing_subscriber::reload::Layer::new(tracing_subscriber::EnvFilter::new(&filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(use_colour());
    let registry = tracing_subscriber::registry().with(layer);
    let installed = match format {
        LogFormat::Json => registry.with(fmt.json()).try_init(),
        LogFormat::Text => registry.with(fmt).try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set((handle, std::sync::Mutex::new(filter)));
    }
    Ok(())
}

/// The admin API's view of the log filter set up by [`init`].
pub struct AdminLogControl;

impl outrigger_proxy::admin::LogControl for AdminLogControl {
    fn current(&self) -> String {
        FILTER
            .get()
            .map(|(_, f)| f.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    fn set(&self, value: &str) -> Result<String, String> {
        let (handle, current) = FILTER
            .get()
            .ok_or_else(|| "the log was not set up by this process".to_string())?;
        let filter = parse_filter(value)?;
        handle
            .reload(tracing_subscriber::EnvFilter::new(&filter))
            .map_err(|e| format!("the log filter could not be changed: {e}"))?;
        *current.lock().unwrap_or_else(|e| e.into_inner()) = filter.clone();
        Ok(filter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives() {
        assert_eq!(parse_filter("info").unwrap(), "info");
        assert_eq!(parse_filter("WARNING").unwrap(), "warn");
        assert_eq!(parse_filter("critical").unwrap(), "error");
        assert_eq!(
            parse_filter("info, outrigger_proxy=debug").unwrap(),
            "info,outrigger_proxy=debug"
        );
        assert_eq!(
            parse_filter("outrigger_proxy::inbound=warning").unwrap(),
            "outrigger_proxy::inbound=warn"
        );
    }

    #[test]
    fn bare_words_that_are_not_levels_are_refused() {
        let e = parse_filter("warnings").unwrap_err();
        assert!(e.contains("`warnings` is not a log level"), "{e}");
        assert!(parse_filter("info,").is_err());
        assert!(parse_filter("outrigger=loud").is_err());
        assert!(parse_filter("=info").is_err());
        assert!(parse_filter("").is_err());
    }
}
