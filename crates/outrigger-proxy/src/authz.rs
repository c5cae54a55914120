//! Authorization of requests and connections against the policy in force, and the mapping of
//! a decision to what the client sees — in one place.
//!
//! HTTP: a denial is `403 RBAC: access denied`, Envoy's RBAC filter's answer; a path that
//! cannot be normalized is `400`. TCP: a denied connection is closed.

use http::StatusCode;
use http::header::HeaderMap;

use outrigger_policy::{Decision, HttpAttrs, Reason, Request, normalize_path};

use crate::Ctx;
use crate::inbound::ConnInfo;
use crate::metrics::{AuthzDecisionLabels, Lv};

/// Envoy's RBAC filter body for a denied request.
pub(crate) const RBAC_DENIED: &str = "RBAC: access denied";

/// The outcome of an authorization check.
pub(crate) struct Verdict {
    /// `Some` when the request must not reach the application: the status and body to answer.
    pub deny: Option<(StatusCode, &'static str)>,
    /// The deciding policy and rule (`ns/name[rule]`), for the access log.
    pub policy: Option<String>,
    /// Why: `allow_matched`, `deny_matched`, `no_allow_matched`, `no_policies`, ...
    pub result: &'static str,
    /// A CUSTOM policy matched and its provider is configured: the request is allowed by the
    /// local policies only if this external authorizer allows it too (Istio evaluates CUSTOM
    /// first, then DENY, then ALLOW; a request DENY or ALLOW refuses is refused without
    /// asking it — `deny` is then set and this is `None`).
    pub custom: Option<std::sync::Arc<crate::ext_authz::HttpProvider>>,
    /// AUDIT policies whose rules matched, `ns/name[rule]` joined by `,` (the access log marks
    /// the line with them).
    pub audit: Option<String>,
}

/// Request headers for policy `request.headers[...]` conditions.
struct HeaderView<'a>(&'a HeaderMap);

impl outrigger_policy::Headers for HeaderView<'_> {
    fn values<'s>(&'s self, lower_case_name: &str, f: &mut dyn FnMut(&'s str)) {
        for v in self.0.get_all(lower_case_name) {
            if let Ok(s) = v.to_str() {
                f(s);
            }
        }
    }
}

fn reason_name(r: &Reason<'_>) -> &'static str {
    match r {
        Reason::NoPolicies => "no_policies",
        Reason::NoAllowPolicies => "no_allow_policies",
        Reason::AllowMatched(_) => "allow_matched",
        Reason::DenyMatched(_) => "deny_matched",
        Reason::CustomProviderUnavailable(_) => "custom_provider_unavailable",
        Reason::NoAllowMatched => "no_allow_matched",
    }
}

/// Records the decision (metrics, AUDIT and dry-run log lines) and turns it into a verdict.
fn conclude(ctx: &Ctx, conn: &ConnInfo, d: &Decision<'_>, what: &str) -> Verdict {
    let result = reason_name(&d.reason);
    let deciding = match d.reason {
        Reason::AllowMatched(m) | Reason::DenyMatched(m) | Reason::CustomProviderUnavailable(m) => {
            Some(m)
        }
        _ => None,
    };
    let matched = deciding.map(|m| format!("{}[{}]", m.policy, m.rule));
    for a in &d.audit {
        tracing::info!(
            target: "outrigger::audit",
            policy = a.policy, rule = a.rule,
            source = conn.source_principal_str(), src = %conn.src, request = what,
            allowed = d.allowed,
            "AUDIT policy matched"
        );
    }
    if let Some(would) = d.dry_run_allowed {
        for m in &d.dry_run {
            tracing::info!(
                target: "outrigger::audit",
                policy = m.policy, rule = m.rule, action = ?m.action,
                source = conn.source_principal_str(), request = what,
                "dry-run policy matched"
            );
        }
        if would != d.allowed {
            tracing::info!(
                target: "outrigger::audit",
                source = conn.source_principal_str(), request = what,
                enforced = d.allowed, dry_run_would_allow = would,
                "dry-run policies would decide differently"
            );
        }
    }
    // CUSTOM with a configured provider: the local decision stands only if the external
    // authorizer allows too (the call is made by the caller, which is async). A provider
    // unknown here (cannot happen: the policy options list the same names) denies.
    let mut custom = None;
    if let Some(c) = &d.custom {
        custom = ctx
            .settings
            .extension_providers
            .iter()
            .find(|p| p.name == c.provider)
            .cloned();
        if custom.is_none() {
            crate::warn_limited!(
                provider = c.provider,
                policy = c.matched.policy,
                "CUSTOM authorization provider is not configured; denying"
            );
        }
    }
    let allowed = d.allowed && (d.custom.is_none() || custom.is_some());
    let audit = (!d.audit.is_empty()).then(|| {
        d.audit
            .iter()
            .map(|a| format!("{}[{}]", a.policy, a.rule))
            .collect::<Vec<_>>()
            .join(",")
    });
    let custom = if allowed { custom } else { None };
    if custom.is_some() {
        // Counted when the authorizer has answered (`record_custom`).
        return Verdict {
            deny: None,
            policy: matched,
            result,
            custom,
            audit,
        };
    }
    ctx.metrics
        .decisions
        .get_or_create(&AuthzDecisionLabels {
            action: if allowed { "allow" } else { "deny" },
            result,
            // `namespace/name` of the deciding policy: bounded by the policies in force
            // (never a path, a principal or an address).
            policy: deciding.map_or_else(|| Lv::new("-"), |m| Lv::new(m.policy)),
        })
        .inc();
    if !allowed {
        tracing::debug!(
            listener = %conn.listener.name, source = conn.source_principal_str(),
            request = what, reason = result, policy = matched.as_deref().unwrap_or("-"),
            "denied by authorization policy"
        );
    }
    if !allowed {
        ctx.denials.record(crate::status::Denial {
            at: std::time::SystemTime::now(),
            listener: conn.listener.name.clone(),
            source: conn.source_principal_str().to_string(),
            request: what.to_string(),
            policy: matched.clone(),
            reason: result,
        });
    }
    Verdict {
        deny: (!allowed).then_some((StatusCode::FORBIDDEN, RBAC_DENIED)),
        policy: matched,
        result,
        custom: None,
        audit,
    }
}

/// Counts a CUSTOM check's outcome with the other decisions: `custom_allowed`,
/// `custom_denied`, `custom_error` (or `custom_failed_open`).
pub(crate) fn record_custom(
    ctx: &Ctx,
    conn: &ConnInfo,
    v: &Verdict,
    what: &str,
    allowed: bool,
    result: &'static str,
) {
    // The label is the policy's `namespace/name` (the verdict's `ns/name[rule]` less the rule).
    let policy = v
        .policy
        .as_deref()
        .map(|p| p.split_once('[').map_or(p, |(n, _)| n))
        .unwrap_or("-");
    ctx.metrics
        .decisions
        .get_or_create(&AuthzDecisionLabels {
            action: if allowed { "allow" } else { "deny" },
            result,
            policy: Lv::new(policy),
        })
        .inc();
    if !allowed {
        ctx.denials.record(crate::status::Denial {
            at: std::time::SystemTime::now(),
            listener: conn.listener.name.clone(),
            source: conn.source_principal_str().to_string(),
            request: what.to_string(),
            policy: v.policy.clone(),
            reason: result,
        });
    }
}

fn base_request<'a>(conn: &'a ConnInfo) -> Request<'a> {
    let mut r = Request::tcp(conn.src.ip(), conn.dst.ip(), conn.listener.listen.port());
    r.source_principal = conn.peer_principal.as_deref();
    r.sni = conn.sni.as_deref();
    r
}

/// What an allowed request keeps to be authorized again if policy changes while its response
/// is still streaming (a long gRPC stream, a download).
pub(crate) struct InFlight {
    method: http::Method,
    host: String,
    path: String,
    headers: HeaderMap,
    jwt: Option<outrigger_policy::JwtClaims>,
}

/// Re-authorizes an in-flight request against the policy in force now.
pub(crate) fn recheck(ctx: &Ctx, conn: &ConnInfo, f: &InFlight) -> Verdict {
    let policy = ctx.policy.load();
    let headers = HeaderView(&f.headers);
    let mut req = base_request(conn).with_http(HttpAttrs {
        method: f.method.as_str(),
        host: &f.host,
        path: &f.path,
        headers: &headers,
    });
    req.jwt = f.jwt.as_ref();
    let d = policy.snapshot.authorize(&req);
    conclude(ctx, conn, &d, &f.path)
}

/// Authorizes one HTTP request. Normalizes its path first (and forwards the normalized path,
/// as Envoy does, so the application sees what was authorized).
pub(crate) fn check_http(
    ctx: &Ctx,
    conn: &ConnInfo,
    parts: &mut http::request::Parts,
    snapshot: &outrigger_policy::Snapshot,
    jwt: Option<&outrigger_policy::JwtClaims>,
) -> (Verdict, Option<InFlight>) {
    let raw = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let normalized = match normalize_path(raw, ctx.settings.path_normalization) {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(src = %conn.src, path = raw, "path cannot be normalized: {e}");
            return (bad_path(), None);
        }
    };
    let target = normalized.to_string();
    if target != raw {
        let mut p = parts.uri.clone().into_parts();
        match target.parse() {
            Ok(pq) => p.path_and_query = Some(pq),
            Err(_) => return (bad_path(), None),
        }
        if let Ok(u) = http::Uri::from_parts(p) {
            parts.uri = u;
        }
    }
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    let headers = HeaderView(&parts.headers);
    let mut req = base_request(conn).with_http(HttpAttrs {
        method: parts.method.as_str(),
        host,
        path: &normalized.path,
        headers: &headers,
    });
    req.jwt = jwt;
    let d = snapshot.authorize(&req);
    let verdict = conclude(ctx, conn, &d, &normalized.path);
    let inflight = verdict.deny.is_none().then(|| InFlight {
        method: parts.method.clone(),
        host: host.to_string(),
        headers: parts.headers.clone(),
        jwt: jwt.cloned(),
        path: normalized.path,
    });
    (verdict, inflight)
}

fn bad_path() -> Verdict {
    Verdict {
        deny: Some((StatusCode::BAD_REQUEST, "Bad Request")),
        policy: None,
        result: "bad_path",
        custom: None,
        audit: None,
    }
}

/// Authorizes a TCP connection (L4 attributes only).
pub(crate) fn check_tcp(ctx: &Ctx, conn: &ConnInfo) -> Verdict {
    let policy = ctx.policy.load();
    let d = policy.snapshot.authorize(&base_request(conn));
    let mut v = conclude(ctx, conn, &d, "tcp");
    // CUSTOM on a TCP connection: an envoyExtAuthzHttp provider has no TCP check (istiod
    // builds the network ext_authz filter for gRPC providers only: extauthz.go
    // `generateGRPCConfig`), and gRPC providers are not implemented yet: fail closed.
    if v.custom.take().is_some() {
        record_custom(ctx, conn, &v, "tcp", false, "custom_tcp_unsupported");
        v.deny = Some((StatusCode::FORBIDDEN, RBAC_DENIED));
        v.result = "custom_tcp_unsupported";
    }
    v
}
