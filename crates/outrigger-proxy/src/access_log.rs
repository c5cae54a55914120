//! One access log line per HTTP request or TCP connection, in JSON (the default) or in Istio's
//! default text format, to stdout, to a file rotated by size inside the process, or both.
//!
//! Lines are formatted on the connection's task and handed to a writer thread through a
//! bounded channel, so a slow disk or terminal never stalls traffic. When the channel is full
//! the line is dropped and `outrigger_access_log_dropped_total` counts it: the loss is visible,
//! never silent. The writer thread is the only writer of the file, and it writes whole lines,
//! so lines never interleave; it rotates between two lines only.
//!
//! Rotation (no external logrotate, so that it works the same on Windows): when the next line
//! would take the file past `maxSizeMiB`, the writer flushes and *closes* the file (Windows
//! cannot rename a file that is open), renames `access.log.(N-1)` → `access.log.N` … `access.log`
//! → `access.log.1`, deletes what falls past `maxFiles`, and opens a new `access.log`. If a
//! rename fails (another process holds the file open without sharing delete), the writer
//! reopens the same file and keeps appending: a line is never lost to a failed rotation.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// The line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccessLogFormat {
    /// One JSON object a line ([`AccessRecord`]'s fields).
    #[default]
    Json,
    /// Istio's default text format for sidecars, then Outrigger's own fields as `key="value"`.
    Text,
}

/// Where access log lines go, and how they look (`accessLog:` in the agent configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    pub format: AccessLogFormat,
    pub stdout: bool,
    pub file: Option<FileOutput>,
}

/// A log file and its rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOutput {
    pub path: PathBuf,
    /// Rotated when the next line would take the file past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept beside the live one (`access.log.1` … `access.log.N`).
    pub max_files: u32,
}

/// `maxSizeMiB` when not set.
pub const DEFAULT_MAX_SIZE_MIB: f64 = 100.0;
/// `maxFiles` when not set.
pub const DEFAULT_MAX_FILES: u32 = 5;

impl AccessLogConfig {
    /// No access log.
    pub fn off() -> Self {
        AccessLogConfig {
            format: AccessLogFormat::Json,
            stdout: false,
            file: None,
        }
    }

    /// JSON lines on stdout (the default).
    pub fn stdout() -> Self {
        AccessLogConfig {
            stdout: true,
            ..Self::off()
        }
    }

    /// JSON lines in `path`, rotated with the default size and count.
    pub fn file(path: PathBuf) -> Self {
        AccessLogConfig {
            file: Some(FileOutput {
                path,
                max_bytes: (DEFAULT_MAX_SIZE_MIB * 1024.0 * 1024.0) as u64,
                max_files: DEFAULT_MAX_FILES,
            }),
            ..Self::off()
        }
    }

    pub fn enabled(&self) -> bool {
        self.stdout || self.file.is_some()
    }
}

/// One access log record: the single place a field is added (both formats are written from
/// it). Field names follow Envoy's access log operators in snake case (Istio's JSON format,
/// `EnvoyJSONLogFormatIstio` in istio/istio `pilot/pkg/model/telemetry_logging.go`) so that
/// existing log pipelines find familiar names.
#[derive(Debug, Serialize, Default)]
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
    /// The deciding policy and rule, `namespace/name[rule]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authz_policy: Option<&'a str>,
    /// Why the request was allowed or refused (`allow_matched`, `deny_matched`,
    /// `no_allow_matched`, `jwt_invalid`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authz_result: Option<&'a str>,
    /// AUDIT policies whose rules matched (`namespace/name[rule]`): the line is marked for
    /// audit, as Envoy's RBAC filter marks it with the `access_log_hint` metadata.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<&'a str>,
    /// The verified JWT's principal, `iss/sub` (Istio's `request.auth.principal`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_principal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<&'a str>,
    /// The request's trace id (W3C, 32 lowercase hex digits): the span's when tracing is on,
    /// else the caller's `traceparent`/B3 trace id when it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_forwarded_for: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_server_name: Option<&'a str>,
}

/// The workloads Istio's metadata exchange named for a TCP connection (crate::tcp_mx; an HBONE
/// stream's baggage), as its metrics label them: appended to its access log line as
/// `source_workload` / `destination_workload`, each only when named.
#[derive(Debug, Default, Clone, Copy)]
pub struct Workloads<'a> {
    pub source: Option<&'a str>,
    pub destination: Option<&'a str>,
}

impl<'a> Workloads<'a> {
    fn fields(&self) -> [(&'static str, Option<&'a str>); 2] {
        [
            ("source_workload", self.source),
            ("destination_workload", self.destination),
        ]
    }
}

/// Writes `v` for a text line: `-` when empty (as Envoy writes a missing value), `"` and `\`
/// escaped with a backslash and control characters as `\xNN`, so that a value can never end
/// the line or its quotes early.
fn text_value(out: &mut String, v: Option<&str>) {
    match v {
        None | Some("") => out.push('-'),
        Some(v) => {
            for c in v.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                    c => out.push(c),
                }
            }
        }
    }
}

impl AccessRecord<'_> {
    /// The JSON line (with its newline).
    pub fn to_json_line(&self) -> String {
        self.to_json_line_with(&Workloads::default())
    }

    /// The JSON line with the named workloads after the record's fields.
    pub fn to_json_line_with(&self, extra: &Workloads<'_>) -> String {
        let named: Vec<_> = extra
            .fields()
            .into_iter()
            .filter_map(|(k, v)| v.filter(|v| !v.is_empty()).map(|v| (k, v)))
            .collect();
        let mut line = if named.is_empty() {
            serde_json::to_string(self).unwrap_or_default()
        } else {
            match serde_json::to_value(self) {
                Ok(serde_json::Value::Object(mut o)) => {
                    for (k, v) in named {
                        o.insert(k.to_string(), v.into());
                    }
                    serde_json::Value::Object(o).to_string()
                }
                _ => String::new(),
            }
        };
        line.push('\n');
        line
    }

    /// The text line (with its newline): Istio's default text format for sidecars,
    /// `EnvoyTextLogFormat` in istio/istio `pilot/pkg/model/telemetry_logging.go`:
    ///
    /// ```text
    /// [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
    /// %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS%
    /// "%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
    /// %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
    /// "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW%
    /// %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS%
    /// %REQUESTED_SERVER_NAME% %ROUTE_NAME%
    /// ```
    ///
    /// (one line), then Outrigger's own fields as `key="value"` (principals, the deciding
    /// policy and why, the AUDIT mark, the trace id). What Outrigger does not have is `-`, as
    /// Envoy writes a value it does not have (details, termination details, transport failure,
    /// upstream service time, upstream local address, route name); a TCP connection has no
    /// method, path or protocol (`"- - -"`) and response code `0`, as Envoy's TCP proxy logs.
    /// The upstream cluster is named as a sidecar names it: `inbound|<port>||`.
    pub fn to_text_line(&self) -> String {
        self.to_text_line_with(&Workloads::default())
    }

    /// The text line with the named workloads after Outrigger's own fields.
    pub fn to_text_line_with(&self, extra: &Workloads<'_>) -> String {
        let mut o = String::with_capacity(400);
        let q = |o: &mut String, v: Option<&str>| {
            o.push('"');
            text_value(o, v);
            o.push('"');
        };
        o.push('[');
        o.push_str(&self.start_time);
        o.push_str("] \"");
        let http = self.kind == "http";
        text_value(&mut o, self.method);
        o.push(' ');
        text_value(&mut o, self.path);
        o.push(' ');
        text_value(&mut o, http.then_some(self.protocol));
        o.push_str("\" ");
        o.push_str(&self.response_code.unwrap_or(0).to_string());
        o.push(' ');
        text_value(&mut o, Some(self.response_flags));
        // RESPONSE_CODE_DETAILS CONNECTION_TERMINATION_DETAILS "UPSTREAM_TRANSPORT_FAILURE_REASON"
        o.push_str(" - - \"-\" ");
        o.push_str(&format!(
            "{} {} {} - ",
            self.bytes_received, self.bytes_sent, self.duration_ms
        ));
        q(&mut o, self.x_forwarded_for);
        o.push(' ');
        q(&mut o, self.user_agent);
        o.push(' ');
        q(&mut o, self.request_id);
        o.push(' ');
        q(&mut o, self.authority);
        o.push(' ');
        q(&mut o, Some(&self.upstream_host));
        o.push(' ');
        let port = self
            .downstream_local_address
            .rsplit_once(':')
            .map(|(_, p)| p)
            .unwrap_or("");
        o.push_str(&format!("inbound|{port}||"));
        // UPSTREAM_LOCAL_ADDRESS
        o.push_str(" - ");
        text_value(&mut o, Some(&self.downstream_local_address));
        o.push(' ');
        text_value(&mut o, Some(&self.downstream_remote_address));
        o.push(' ');
        text_value(&mut o, self.requested_server_name);
        // ROUTE_NAME
        o.push_str(" -");
        for (k, v) in [
            ("listener", Some(self.listener)),
            ("source_principal", Some(self.source_principal)),
            ("destination_principal", Some(self.destination_principal)),
            (
                "connection_security_policy",
                Some(self.connection_security_policy),
            ),
            ("jwt_principal", self.jwt_principal),
            ("authz_policy", self.authz_policy),
            ("authz_result", self.authz_result),
            ("audit", self.audit),
            ("trace_id", self.trace_id),
        ]
        .into_iter()
        .chain(extra.fields())
        {
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                o.push(' ');
                o.push_str(k);
                o.push('=');
                q(&mut o, Some(v));
            }
        }
        o.push('\n');
        o
    }
}

/// A cheap handle to the access log writer.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<String>>,
    format: AccessLogFormat,
    metrics: Arc<Metrics>,
}

/// Opens (or creates) a log file for appending, and says how big it already is.
fn open_append(path: &Path) -> std::io::Result<(File, u64)> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot open access log {}: {e}", path.display()),
            )
        })?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((f, size))
}

/// `access.log` → `access.log.3`.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// A log file rotated by size by renaming (see the module documentation).
pub struct RotatingFile {
    cfg: FileOutput,
    out: Option<std::io::BufWriter<File>>,
    size: u64,
    /// A rename failed once: said once in the agent's log, not at every line.
    warned: bool,
}

impl RotatingFile {
    pub fn open(cfg: FileOutput) -> std::io::Result<Self> {
        let (f, size) = open_append(&cfg.path)?;
        Ok(RotatingFile {
            cfg,
            out: Some(std::io::BufWriter::with_capacity(64 * 1024, f)),
            size,
            warned: false,
        })
    }

    /// Writes one whole line, rotating first if it would take the file past the size.
    pub fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.cfg.max_bytes {
            self.rotate();
        }
        let out = match &mut self.out {
            Some(o) => o,
            None => {
                let (f, size) = open_append(&self.cfg.path)?;
                self.size = size;
                self.out
                    .insert(std::io::BufWriter::with_capacity(64 * 1024, f))
            }
        };
        out.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.out {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }

    fn rotate(&mut self) {
        // Close before renaming: Windows refuses to rename a file that is open.
        if let Some(mut o) = self.out.take() {
            let _ = o.flush();
        }
        let path = self.cfg.path.clone();
        let n = self.cfg.max_files.max(1);
        let _ = std::fs::remove_file(numbered(&path, n));
        for i in (1..n).rev() {
            let from = numbered(&path, i);
            if from.exists() {
                let _ = std::fs::rename(&from, numbered(&path, i + 1));
            }
        }
        match std::fs::rename(&path, numbered(&path, 1)) {
            Ok(()) => self.size = 0,
            Err(e) => {
                // Keep appending to the same file (reopened at the next write): nothing lost.
                if !self.warned {
                    self.warned = true;
                    tracing::warn!(
                        file = %path.display(),
                        "cannot rotate the access log ({e}); appending to it past its size"
                    );
                }
            }
        }
    }
}

impl AccessLog {
    /// Starts the writer thread (lines are queued from any thread).
    pub fn start(cfg: AccessLogConfig, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let format = cfg.format;
        if !cfg.enabled() {
            return Ok(AccessLog {
                tx: None,
                format,
                metrics,
            });
        }
        let mut file = match cfg.file {
            Some(f) => Some(RotatingFile::open(f)?),
            None => None,
        };
        let mut stdout = cfg
            .stdout
            .then(|| std::io::BufWriter::new(std::io::stdout()));
        let (tx, mut rx) = mpsc::channel::<String>(8192);
        // A thread of its own owns the outputs: writes to a file or terminal may block.
        std::thread::Builder::new()
            .name("outrigger-access-log".into())
            .spawn(move || {
                while let Some(line) = rx.blocking_recv() {
                    if let Some(f) = &mut file {
                        let _ = f.write_line(line.as_bytes());
                    }
                    if let Some(s) = &mut stdout {
                        let _ = s.write_all(line.as_bytes());
                    }
                    // Flush when nothing else is waiting, so lines appear promptly.
                    if rx.is_empty() {
                        if let Some(f) = &mut file {
                            let _ = f.flush();
                        }
                        if let Some(s) = &mut stdout {
                            let _ = s.flush();
                        }
                    }
                }
                if let Some(f) = &mut file {
                    let _ = f.flush();
                }
                if let Some(s) = &mut stdout {
                    let _ = s.flush();
                }
            })?;
        Ok(AccessLog {
            tx: Some(tx),
            format,
            metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, record: &AccessRecord<'_>) {
        self.log_with(record, &Workloads::default());
    }

    /// [`log`](Self::log) with the workloads the metadata exchange named (TCP connections).
    pub fn log_with(&self, record: &AccessRecord<'_>, named: &Workloads<'_>) {
        let Some(tx) = &self.tx else { return };
        let line = match self.format {
            AccessLogFormat::Json => record.to_json_line_with(named),
            AccessLogFormat::Text => record.to_text_line_with(named),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>() -> AccessRecord<'a> {
        AccessRecord {
            start_time: "2026-01-02T03:04:05.678Z".into(),
            kind: "http",
            listener: "web",
            protocol: "HTTP/1.1",
            method: Some("GET"),
            authority: Some("web.example"),
            path: Some("/a\"b\\c"),
            response_code: Some(403),
            response_flags: "RBAC",
            duration_ms: 3,
            bytes_received: 0,
            bytes_sent: 19,
            downstream_remote_address: "127.0.0.1:5555".into(),
            downstream_local_address: "127.0.0.1:8443".into(),
            upstream_host: "127.0.0.1:8080".into(),
            source_principal: "spiffe://cluster.local/ns/default/sa/sleep",
            destination_principal: "spiffe://cluster.local/ns/legacy/sa/web",
            connection_security_policy: "mutual_tls",
            authz_policy: Some("legacy/deny-x[0]"),
            authz_result: Some("deny_matched"),
            audit: Some("legacy/audit-all[0]"),
            jwt_principal: Some("https://issuer/alice"),
            request_id: Some("abc"),
            user_agent: Some("curl/8\u{1}"),
            ..Default::default()
        }
    }

    /// A TCP connection's line names the workloads the metadata exchange named, after the
    /// record's own fields, in both formats; an unnamed one is left out.
    #[test]
    fn named_workloads_are_appended() {
        let mut r = record();
        r.kind = "tcp";
        let named = Workloads {
            source: Some("productpage-v1"),
            destination: None,
        };
        let json: serde_json::Value = serde_json::from_str(&r.to_json_line_with(&named)).unwrap();
        assert_eq!(json["source_workload"], "productpage-v1");
        assert!(json.get("destination_workload").is_none());
        assert_eq!(json["listener"], "web");
        let text = r.to_text_line_with(&named);
        assert!(
            text.ends_with(" source_workload=\"productpage-v1\"\n"),
            "{text}"
        );
        assert!(!text.contains("destination_workload"));
        assert_eq!(r.to_json_line_with(&Workloads::default()), r.to_json_line());
        assert_eq!(r.to_text_line_with(&Workloads::default()), r.to_text_line());
    }

    #[test]
    fn text_line_is_istios_format_then_outriggers_fields() {
        let line = record().to_text_line();
        assert_eq!(
            line,
            "[2026-01-02T03:04:05.678Z] \"GET /a\\\"b\\\\c HTTP/1.1\" 403 RBAC - - \"-\" 0 19 3 - \"-\" \"curl/8\\x01\" \"abc\" \"web.example\" \"127.0.0.1:8080\" inbound|8443|| - 127.0.0.1:8443 127.0.0.1:5555 - - listener=\"web\" source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\" destination_principal=\"spiffe://cluster.local/ns/legacy/sa/web\" connection_security_policy=\"mutual_tls\" jwt_principal=\"https://issuer/alice\" authz_policy=\"legacy/deny-x[0]\" authz_result=\"deny_matched\" audit=\"legacy/audit-all[0]\"\n"
        );
        let tcp = AccessRecord {
            kind: "tcp",
            protocol: "tcp",
            method: None,
            path: None,
            response_code: None,
            ..record()
        }
        .to_text_line();
        assert!(tcp.contains("] \"- - -\" 0 RBAC "), "{tcp}");
    }

    #[test]
    fn json_line_has_the_new_fields_and_no_trace_id_until_tracing_sets_it() {
        let v: serde_json::Value = serde_json::from_str(&record().to_json_line()).unwrap();
        assert_eq!(v["jwt_principal"], "https://issuer/alice");
        assert_eq!(v["audit"], "legacy/audit-all[0]");
        assert!(v.get("trace_id").is_none());
        let with = AccessRecord {
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            ..record()
        };
        assert!(
            with.to_text_line()
                .contains(" trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"\n")
        );
    }

    /// Rotation keeps every line whole, drops only what falls past `maxFiles`, and bounds the
    /// file count.
    #[test]
    fn rotation_keeps_whole_lines_and_bounds_the_file_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let mut f = RotatingFile::open(FileOutput {
            path: path.clone(),
            max_bytes: 100,
            max_files: 3,
        })
        .unwrap();
        for i in 0..200 {
            f.write_line(format!("line {i:05} ......................\n").as_bytes())
                .unwrap();
        }
        f.flush().unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 4, "{files:?}");
        // Oldest first: .3, .2, .1, live; together the last lines, in order, each once.
        let mut all = Vec::new();
        for p in [
            numbered(&path, 3),
            numbered(&path, 2),
            numbered(&path, 1),
            path.clone(),
        ] {
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(text.len() <= 100, "{p:?} is {} bytes", text.len());
            all.extend(text.lines().map(str::to_string));
        }
        let want: Vec<String> = ((200 - all.len())..200)
            .map(|i| format!("line {i:05} ......................"))
            .collect();
        assert_eq!(all, want);
        assert_eq!(all.len(), 8);
    }
}
