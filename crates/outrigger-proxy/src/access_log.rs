//! One structured (JSON) line per HTTP request or TCP connection.
//!
//! Lines are formatted on the connection's task and handed to a writer task through a bounded
//! channel, so a slow disk or terminal never stalls traffic. When the channel is full the line
//! is dropped and `outrigger_access_log_dropped_total` counts it: the loss is visible, never
//! silent.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Off,
    Stdout,
    File(PathBuf),
}

/// One access log record. Field names follow Envoy's access log operators in snake case so
/// that existing log pipelines find familiar names.
#[derive(Debug, Serialize)]
pub struct AccessRecord<'a> {
    pub start_time: String,
    pub kind: &'static str,
    pub listener: &'a str,
    pub protocol: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_code: Option<u16>,
    pub response_flags: &'a str,
    pub duration_ms: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub downstream_remote_address: String,
    pub downstream_local_address: String,
    pub upstream_host: String,
    pub source_principal: &'a str,
    pub destination_principal: &'a str,
    pub connection_security_policy: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authz_policy: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authz_result: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<&'a str>,
    /// The request's trace id (W3C, 32 lowercase hex digits): the span's when tracing is on,
    /// else the caller's `traceparent`/B3 trace id when it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<&'a str>,
}

/// A cheap handle to the access log writer.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<String>>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// Starts the writer task (must be called inside a Tokio runtime unless `target` is Off).
    pub fn start(target: AccessLogTarget, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let mut sink: Box<dyn Write + Send> = match target {
            AccessLogTarget::Off => return Ok(AccessLog { tx: None, metrics }),
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("cannot open access log {}: {e}", path.display()),
                        )
                    })?,
            ),
        };
        let (tx, mut rx) = mpsc::channel::<String>(8192);
        // A blocking thread owns the sink: writes to a file or terminal may block.
        std::thread::Builder::new()
            .name("outrigger-access-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(&mut sink);
                while let Some(line) = rx.blocking_recv() {
                    let _ = out.write_all(line.as_bytes());
                    // Flush when nothing else is waiting, so lines appear promptly.
                    if rx.is_empty() {
                        let _ = out.flush();
                    }
                }
                let _ = out.flush();
            })?;
        Ok(AccessLog {
            tx: Some(tx),
            metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, record: &AccessRecord<'_>) {
        let Some(tx) = &self.tx else { return };
        let mut line = match serde_json::to_string(record) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push('\n');
        if tx.try_send(line).is_err() {
            self.metrics.access_log_dropped.inc();
        }
    }
}

/// The current time in RFC 3339 with milliseconds, UTC.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    now.format(&fmt).unwrap_or_default()
}
