//! The admin listener: readiness, Prometheus metrics, and a dump of the configuration in force.
//! Bind it to loopback (the default): `/config_dump` names files and identities.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::ctx::Ctx;

pub use crate::log_control::LogControl;

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoints {
    /// The admin listener: everything.
    All,
    /// `admin.metricsListen`: `/metrics` and `/stats/prometheus` only, so that Prometheus on
    /// another host can scrape without reaching `/config_dump` or `/logging`.
    MetricsOnly,
}

pub(crate) async fn serve(listener: TcpListener, ctx: Arc<Ctx>, endpoints: Endpoints) {
    let mut drain = ctx.drain.clone();
    if endpoints == Endpoints::All {
        // The status page's rates: one sample a second.
        let ctx = ctx.clone();
        let mut drain = ctx.drain.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => ctx.status_rates.sample(),
                    _ = drain.wait_for(|d| *d) => break,
                }
            }
        });
    }
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = drain.wait_for(|d| *d) => break,
        };
        let Ok((stream, _)) = accepted else { continue };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(route(req, &ctx, endpoints)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn route(req: Request<Incoming>, ctx: &Ctx, endpoints: Endpoints) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if endpoints == Endpoints::MetricsOnly && !matches!(path, "/metrics" | "/stats/prometheus") {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found (this listener serves /metrics only)\n".into(),
        );
    }
    // As Envoy's admin: what changes state needs POST, everything else is GET.
    if path == "/logging" {
        return logging(&req, ctx);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz/ready" => {
            // The status code is the readiness (the agent serves with the policy and
            // certificate in force whatever is pending); the body says what is in force and
            // what is waiting, for operators.
            // An expired workload certificate fails closed: every peer refuses it, so the
            // agent is not ready until a renewal succeeds, and says why.
            let expired = std::time::SystemTime::now() >= ctx.certs.certs().not_after();
            let (status, first) = if expired {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: the workload certificate has expired (peers refuse it); waiting for a renewal",
                )
            } else if ctx.ready.load(Ordering::SeqCst) {
                (StatusCode::OK, "ready")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready")
            };
            reply(
                status,
                "text/plain",
                format!("{first}\n{}", reload_summary(ctx)),
            )
        }
        "/metrics" | "/stats/prometheus" => {
            // The certificate in service now (rotation may have replaced it since the last
            // scrape).
            let expiry = ctx
                .certs
                .certs()
                .not_after()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            ctx.metrics.certificate_expiry.set(expiry);
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ctx.metrics.encode(),
            )
        }
        "/config_dump" => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&config_dump(ctx)).unwrap_or_default() + "\n",
        ),
        "/stats" => reply(StatusCode::OK, "text/plain", stats_summary(ctx)),
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::status::page(ctx),
        ),
        "/help" => reply(
            StatusCode::OK,
            "text/plain",
            "outrigger admin\n  /               the status page (HTML)\n  /healthz/ready  readiness\n  /metrics        Prometheus metrics (Istio names)\n  /stats          each metric's total, one per line\n  /config_dump    listeners, outbound destinations, certificate and policy in force\n  /logging        the log filter (POST /logging?level=debug changes it)\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// `GET /logging`: the log filter in force. `POST /logging?level=<filter>`: replaces it, with
/// the same values as `log.level` (`debug`, `info,outrigger_proxy=debug`, …) — Envoy's admin
/// `POST /logging?level=<level>` for the agent's own log.
fn logging(req: &Request<Incoming>, ctx: &Ctx) -> Response<Full<Bytes>> {
    let Some(control) = &ctx.log_control else {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "the log level cannot be changed in this process\n".into(),
        );
    };
    match *req.method() {
        Method::GET | Method::HEAD => reply(
            StatusCode::OK,
            "text/plain",
            format!("active log filter: {}\n", control.current()),
        ),
        Method::POST => {
            let level = req.uri().query().and_then(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == "level")
                    .map(|(_, v)| percent_decode(v))
            });
            let Some(level) = level else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "usage: POST /logging?level=<trace|debug|info|warn|error|off, or directives such as info,outrigger_proxy=debug>\n".into(),
                );
            };
            match control.set(&level) {
                Ok(now) => {
                    tracing::warn!(filter = %now, "log filter changed through the admin API");
                    reply(
                        StatusCode::OK,
                        "text/plain",
                        format!("active log filter: {now}\n"),
                    )
                }
                Err(why) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{why}\n")),
            }
        }
        _ => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET shows the log filter, POST /logging?level=... changes it\n".into(),
        ),
    }
}

/// `%XX` escapes and `+` of a query value (`info%2Coutrigger_proxy%3Ddebug`).
fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1).copied(),
            bytes.get(i + 2).copied(),
        ) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
                continue;
            }
            (b'+', ..) => out.push(b' '),
            (b, ..) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET /stats`: each metric family's total over all its series, `name: value`, sorted — a
/// summary for a person (Envoy's `/stats` lists counters the same way); the series with their
/// labels are in `/metrics`.
fn stats_summary(ctx: &Ctx) -> String {
    let text = ctx.metrics.encode();
    let mut totals: std::collections::BTreeMap<&str, f64> = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = match line.rsplit_once(' ') {
            Some(p) => p,
            None => continue,
        };
        let name = series.split('{').next().unwrap_or(series);
        if name.ends_with("_bucket") || name.ends_with("_created") {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            *totals.entry(name).or_default() += v;
        }
    }
    let mut out = String::new();
    for (name, total) in totals {
        out.push_str(&format!("{name}: {total}\n"));
    }
    out
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One line for the policy and one for the certificate: version in force, change pending,
/// last error.
fn reload_summary(ctx: &Ctx) -> String {
    let now = SystemTime::now();
    let ago = |t: SystemTime| now.duration_since(t).unwrap_or_default().as_secs_f64();
    let policy = ctx.policy.load();
    let mut p = format!("policy: version {} in force", policy.version);
    if let Some(pending) = ctx.policy.pending() {
        p += &format!(
            "; change pending for {:.1} s{}",
            ago(pending.since),
            if pending.removal {
                " (removes policies)"
            } else {
                ""
            }
        );
    }
    if let Some(f) = ctx.policy.last_failure() {
        p += &format!("; last reload failed {:.0} s ago", ago(f.at));
    }
    let cert = ctx.certs.status();
    let mut c = format!(
        "certificate: generation {} in force ({})",
        cert.generation,
        ctx.certs.certs().identity()
    );
    if let Some(since) = cert.pending_since {
        c += &format!("; change pending for {:.1} s", ago(since));
    }
    if let Some(r) = &cert.last_refusal {
        c += &format!(
            "; last rotation refused {:.0} s ago ({})",
            ago(r.at),
            r.reason
        );
    }
    format!("{p}\n{c}\n")
}

fn config_dump(ctx: &Ctx) -> serde_json::Value {
    let certs = ctx.certs.certs();
    let policy = ctx.policy.load();
    let listeners: Vec<_> = ctx
        .inbound
        .iter()
        .map(|l| {
            let mtls = policy.snapshot.mtls_mode(l.listen.port());
            serde_json::json!({
                "name": l.name,
                "listen": l.listen.to_string(),
                "backend": l.backend.to_string(),
                "protocol": l.protocol.as_str(),
                "mtls_mode": mtls.mode.to_string(),
                "mtls_mode_from": mtls.source,
            })
        })
        .collect();
    let failure = ctx
        .policy
        .last_failure()
        .map(|f| serde_json::json!({ "at_unix": unix(f.at), "error": f.error }));
    let pending = ctx.policy.pending().map(|p| {
        serde_json::json!({
            "since_unix": unix(p.since),
            "removes_policies": p.removal,
            "detail": p.detail,
        })
    });
    let cert_status = ctx.certs.status();
    serde_json::json!({
        "workload": {
            "identity": ctx.workload.identity.to_string(),
            "namespace": ctx.workload.namespace,
            "name": ctx.workload.name,
        },
        "certificate": {
            "identity": certs.identity().to_string(),
            "not_after_unix": unix(certs.not_after()),
            "generation": cert_status.generation,
            "expected_identity": cert_status.expected_identity.to_string(),
            "last_rotation_unix": cert_status.last_rotation.map(unix),
            "pending_change_since_unix": cert_status.pending_since.map(unix),
            "rotation_refusals": cert_status.refusals,
            "last_rotation_error": cert_status.last_refusal.map(|r| serde_json::json!({
                "at_unix": unix(r.at),
                "reason": r.reason,
                "error": r.error,
            })),
            "crl": certs.revocation().map(|r| {
                let (crls, revoked) = r.counts();
                serde_json::json!({
                    "file": r.file().display().to_string(),
                    "crls": crls,
                    "revoked_serials": revoked,
                    "next_update_unix": r.next_update().map(unix),
                    "only_verify_leaf_cert_crl": r.only_leaf(),
                })
            }),
        },
        "inbound": listeners,
        "hbone": ctx.hbone.map(|a| serde_json::json!({ "listen": a.to_string() })),
        "outbound": ctx.outbound.iter().map(|d| d.dump()).collect::<Vec<_>>(),
        "policy": {
            "version": policy.version,
            "loaded_at_unix": unix(policy.loaded_at),
            "files": policy.sources,
            "applied": policy.snapshot.applied().iter().map(|a| serde_json::json!({
                "kind": a.kind.to_string(),
                "name": a.key(),
                "scope": a.scope.to_string(),
                "action": a.action.map(|x| format!("{x:?}").to_uppercase()),
                "dry_run": a.dry_run,
                "source": a.source.to_string(),
            })).collect::<Vec<_>>(),
            "ignored": policy.snapshot.ignored().iter().map(|i| serde_json::json!({
                "kind": i.kind,
                "name": format!("{}/{}", i.namespace, i.name),
                "reason": i.reason.to_string(),
                "source": i.source.to_string(),
            })).collect::<Vec<_>>(),
            // Refused resources and their fail-closed effect (docs/policy.md).
            "refused": policy.snapshot.refused().iter().map(|r| serde_json::json!({
                "kind": r.kind,
                "name": r.name,
                "source": r.source.to_string(),
                "error": r.error.to_string(),
                "effect": r.effect.to_string(),
            })).collect::<Vec<_>>(),
            "warnings": policy.snapshot.warnings().iter().map(|w| w.to_string()).collect::<Vec<_>>(),
            "last_reload_error": failure,
            "pending_change": pending,
            // `policy.kubernetes`: the API server, whether it answers, and whether the policy
            // in force came from it or from the persisted state file.
            "cluster": ctx.policy.cluster_status(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded_without_panicking() {
        assert_eq!(
            percent_decode("info%2Coutrigger_proxy%3Ddebug"),
            "info,outrigger_proxy=debug"
        );
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%é%"), "%é%");
    }
}
