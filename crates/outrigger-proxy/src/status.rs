//! The status page (`GET /` on the admin listener): a small self-contained HTML page — no
//! scripts, styles or images from elsewhere, so it works offline — showing the workload
//! identity and certificate expiry, the listeners and their mTLS modes, the policies in force
//! with their sources, the recent denials, and request and connection rates.
//!
//! Everything shown that comes from a request, a policy or a file is HTML-escaped
//! ([`escape`]). Key material is never shown: the page reads the certificate's identity and
//! expiry only.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::ctx::Ctx;

pub use crate::status_state::{DENIALS_KEPT, Denial, Denials, Rates};

/// HTML-escapes text for an element's content or a quoted attribute value.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

fn row(out: &mut String, cells: &[&str]) {
    out.push_str("<tr>");
    for c in cells {
        let _ = write!(out, "<td>{}</td>", escape(c));
    }
    out.push_str("</tr>\n");
}

fn table(out: &mut String, id: &str, head: &[&str]) {
    let _ = write!(out, "<table id=\"{id}\"><thead><tr>");
    for h in head {
        let _ = write!(out, "<th>{h}</th>");
    }
    out.push_str("</tr></thead><tbody>\n");
}

/// The page. It refreshes itself every 5 seconds with a `<meta http-equiv="refresh">`, not a
/// script.
pub(crate) fn page(ctx: &Ctx) -> String {
    let certs = ctx.certs.certs();
    let policy = ctx.policy.load();
    let now = SystemTime::now();
    let not_after = certs.not_after();
    let left = not_after
        .duration_since(now)
        .map(|d| format!("in {:.1} h", d.as_secs_f64() / 3600.0))
        .unwrap_or_else(|_| "EXPIRED".into());
    let (rps, cps) = ctx.status_rates.per_second();

    let mut o = String::with_capacity(16 * 1024);
    o.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <title>Outrigger status</title><style>\
         body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
         table{border-collapse:collapse;margin-bottom:1.5em}\
         th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.9em}\
         th{background:#f0f0f0}.bad{color:#b00}</style></head><body>\n",
    );
    let _ = write!(
        o,
        "<h1>Outrigger</h1>\n<h2>Workload</h2>\n<table id=\"workload\"><tbody>\n"
    );
    row(&mut o, &["identity", &ctx.workload.identity.to_string()]);
    row(
        &mut o,
        &[
            "workload",
            &format!("{}/{}", ctx.workload.namespace, ctx.workload.name),
        ],
    );
    row(
        &mut o,
        &["certificate identity", &certs.identity().to_string()],
    );
    row(
        &mut o,
        &[
            "certificate expires",
            &format!("{} ({left})", rfc3339(not_after)),
        ],
    );
    row(
        &mut o,
        &[
            "certificate generation",
            &ctx.certs.status().generation.to_string(),
        ],
    );
    o.push_str("</tbody></table>\n<h2>Traffic</h2>\n<table id=\"rates\"><tbody>\n");
    row(&mut o, &["requests per second", &format!("{rps:.2}")]);
    row(&mut o, &["connections per second", &format!("{cps:.2}")]);
    row(
        &mut o,
        &[
            "requests (total)",
            &ctx.status_rates
                .requests
                .load(Ordering::Relaxed)
                .to_string(),
        ],
    );
    row(
        &mut o,
        &[
            "connections (total)",
            &ctx.status_rates
                .connections
                .load(Ordering::Relaxed)
                .to_string(),
        ],
    );
    o.push_str("</tbody></table>\n<h2>Listeners</h2>\n");
    table(
        &mut o,
        "listeners",
        &[
            "name",
            "listen",
            "backend",
            "protocol",
            "mTLS mode",
            "mode from",
        ],
    );
    for l in &ctx.inbound {
        let m = policy.snapshot.mtls_mode(l.listen.port());
        row(
            &mut o,
            &[
                &l.name,
                &l.listen.to_string(),
                &l.backend.to_string(),
                l.protocol.as_str(),
                &m.mode.to_string(),
                m.source
                    .as_deref()
                    .unwrap_or("default (policy.defaultMtlsMode)"),
            ],
        );
    }
    if let Some(h) = ctx.hbone {
        row(
            &mut o,
            &["hbone", &h.to_string(), "-", "HBONE", "STRICT", "-"],
        );
    }
    o.push_str("</tbody></table>\n");
    let _ = writeln!(o, "<h2>Policies in force (version {})</h2>", policy.version);
    table(
        &mut o,
        "policies",
        &["kind", "name", "scope", "action", "dry run", "source"],
    );
    for a in policy.snapshot.applied() {
        row(
            &mut o,
            &[
                &a.kind.to_string(),
                &a.key(),
                &a.scope.to_string(),
                &a.action
                    .map(|x| format!("{x:?}").to_uppercase())
                    .unwrap_or_else(|| "-".into()),
                if a.dry_run { "yes" } else { "no" },
                &a.source.to_string(),
            ],
        );
    }
    o.push_str("</tbody></table>\n");
    let refused = policy.snapshot.refused();
    if !refused.is_empty() {
        o.push_str("<h2 class=\"bad\">Refused policies</h2>\n");
        table(
            &mut o,
            "refused",
            &["kind", "name", "source", "error", "effect"],
        );
        for r in refused {
            row(
                &mut o,
                &[
                    &r.kind.to_string(),
                    &r.name.to_string(),
                    &r.source.to_string(),
                    &r.error.to_string(),
                    &r.effect.to_string(),
                ],
            );
        }
        o.push_str("</tbody></table>\n");
    }
    let _ = writeln!(
        o,
        "<h2>Recent denials (last {DENIALS_KEPT}, newest first)</h2>"
    );
    table(
        &mut o,
        "denials",
        &["time", "listener", "source", "request", "policy", "reason"],
    );
    for d in ctx.denials.recent() {
        row(
            &mut o,
            &[
                &rfc3339(d.at),
                &d.listener,
                &d.source,
                &d.request,
                d.policy.as_deref().unwrap_or("-"),
                d.reason,
            ],
        );
    }
    o.push_str(
        "</tbody></table>\n<p>JSON: <a href=\"/config_dump\">/config_dump</a> · \
         <a href=\"/stats\">/stats</a> · <a href=\"/metrics\">/metrics</a> · \
         <a href=\"/healthz/ready\">/healthz/ready</a></p>\n</body></html>\n",
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
    }

    #[test]
    fn ring_buffer_keeps_the_last_hundred() {
        let d = Denials::default();
        for i in 0..250 {
            d.record(Denial {
                at: SystemTime::now(),
                listener: "web".into(),
                source: "s".into(),
                request: format!("/{i}"),
                policy: None,
                reason: "no_allow_matched",
            });
        }
        let r = d.recent();
        assert_eq!(r.len(), DENIALS_KEPT);
        assert_eq!(r[0].request, "/249");
        assert_eq!(r[99].request, "/150");
    }
}
