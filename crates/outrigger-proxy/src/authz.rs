//! Authorization of requests and connections against the policy in force: the decision
//! (CUSTOM, then DENY, then ALLOW), and its record — the decision metric, the status page's
//! denials, AUDIT and dry-run log lines. What a refusal looks like on each protocol is
//! crate::refusal's to say.

use http::header::HeaderMap;

use outrigger_policy::{Decision, HttpAttrs, Reason, Request, normalize_path};

use crate::conn::ConnInfo;
use crate::ctx::Ctx;
use crate::metrics::{AuthzDecisionLabels, Lv};
use crate::refusal::Refusal;

/// The outcome of an authorization check.
pub(crate) struct Verdict {
    /// `Some` when the request must not reach the application, and why.
    pub deny: Option<Refusal>,
    /// The deciding policy and rule (`ns/name[rule]`), for the access log.
    pub policy: Option<String>,
    /// Why: `allow_matched`, `deny_matched`, `no_allow_matched`, `no_policies`, ...
    pub result: &'static str,
    /// A CUSTOM policy matched and its provider is configured: the proxy asks that authorizer
    /// first (Istio evaluates CUSTOM, then DENY, then ALLOW: istiod puts the ext_authz filter
    /// before the DENY and ALLOW RBAC filters), and only if it allows does `deny` (the DENY
    /// and ALLOW decision) apply. Nothing is recorded until [`settle_custom`] has its answer.
    pub custom: Option<Custom>,
    /// AUDIT policies whose rules matched, `ns/name[rule]` joined by `,` (the access log marks
    /// the line with them).
    pub audit: Option<String>,
}

/// The CUSTOM check a request needs.
pub(crate) struct Custom {
    pub provider: std::sync::Arc<crate::ext_authz::Provider>,
    /// The CUSTOM policy and rule that matched (`ns/name[rule]`).
    pub policy: String,
}

/// What the external authorizer answered (see [`crate::ext_authz::Outcome`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum CustomAnswer {
    Allowed,
    FailedOpen,
    Denied,
    Error,
}

impl CustomAnswer {
    /// The kind of answer an outcome is.
    pub(crate) fn of(o: &crate::ext_authz::Outcome) -> Self {
        use crate::ext_authz::Outcome;
        match o {
            Outcome::Allow { .. } => CustomAnswer::Allowed,
            Outcome::FailedOpen => CustomAnswer::FailedOpen,
            Outcome::Deny { .. } => CustomAnswer::Denied,
            Outcome::Error { .. } => CustomAnswer::Error,
        }
    }
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
    let audit = (!d.audit.is_empty()).then(|| {
        d.audit
            .iter()
            .map(|a| format!("{}[{}]", a.policy, a.rule))
            .collect::<Vec<_>>()
            .join(",")
    });
    let mut v = Verdict {
        deny: (!d.allowed).then_some(Refusal::Policy),
        policy: matched,
        result,
        custom: None,
        audit,
    };
    if let Some(c) = &d.custom {
        // The policy options list the configured providers' names, so a CUSTOM check the
        // snapshot asks for has its provider here; were it missing, deny (Istio denies what a
        // CUSTOM policy with an unusable provider matches).
        match ctx
            .settings
            .extension_providers
            .iter()
            .find(|p| p.name == c.provider)
        {
            Some(p) => {
                v.custom = Some(Custom {
                    provider: p.clone(),
                    policy: format!("{}[{}]", c.matched.policy, c.matched.rule),
                });
                return v;
            }
            None => {
                v.deny = Some(Refusal::Policy);
                v.result = "custom_provider_unavailable";
                v.policy = Some(format!("{}[{}]", c.matched.policy, c.matched.rule));
            }
        }
    }
    record(ctx, conn, what, &v);
    v
}

/// Counts a decision (`outrigger_authorization_decisions_total`) and lists a denial on the
/// status page.
fn record(ctx: &Ctx, conn: &ConnInfo, what: &str, v: &Verdict) {
    let allowed = v.deny.is_none();
    // `namespace/name` of the deciding policy (the verdict's `ns/name[rule]` less the rule):
    // bounded by the policies in force (never a path, a principal or an address).
    let policy = v
        .policy
        .as_deref()
        .map_or("-", |p| p.split_once('[').map_or(p, |(n, _)| n));
    ctx.metrics
        .decisions
        .get_or_create(&AuthzDecisionLabels {
            action: if allowed { "allow" } else { "deny" },
            result: v.result,
            policy: Lv::new(policy),
        })
        .inc();
    if !allowed {
        tracing::debug!(
            listener = %conn.listener.name, source = conn.source_principal_str(),
            request = what, reason = v.result, policy = v.policy.as_deref().unwrap_or("-"),
            "denied by authorization policy"
        );
        ctx.denials.refused(conn, what, v.policy.clone(), v.result);
    }
}

/// Completes a verdict whose CUSTOM check has been answered, and records it. A denial or an
/// error of the authorizer decides (`custom_denied`, `custom_error`: the caller answers with
/// the authorizer's response or `statusOnError`); after an allow (or a failure with
/// `failOpen`) the DENY and ALLOW decision applies, as the RBAC filters after ext_authz do.
pub(crate) fn settle_custom(
    ctx: &Ctx,
    conn: &ConnInfo,
    what: &str,
    v: &mut Verdict,
    custom: &Custom,
    answer: CustomAnswer,
) {
    let by_authorizer = match answer {
        CustomAnswer::Denied => Some("custom_denied"),
        CustomAnswer::Error => Some("custom_error"),
        CustomAnswer::Allowed if v.deny.is_none() => Some("custom_allowed"),
        CustomAnswer::FailedOpen if v.deny.is_none() => Some("custom_failed_open"),
        // Allowed by the authorizer, refused by DENY or ALLOW: their verdict stands.
        CustomAnswer::Allowed | CustomAnswer::FailedOpen => None,
    };
    if let Some(result) = by_authorizer {
        v.result = result;
        v.policy = Some(custom.policy.clone());
        if matches!(answer, CustomAnswer::Denied | CustomAnswer::Error) {
            // The status, headers and body are the authorizer's (or `statusOnError`): the
            // HTTP caller answers with its own `Refusal::External`; this one marks the
            // refusal for the record and a TCP connection's close.
            v.deny = Some(Refusal::External {
                status: custom.provider.status_on_error,
                headers: Vec::new(),
                body: bytes::Bytes::new(),
            });
        }
    }
    record(ctx, conn, what, v);
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
    let mut v = conclude(ctx, conn, &d, &f.path);
    // The authorizer's first answer stands while the response streams: it is not asked again,
    // and the DENY and ALLOW decision is recorded now.
    if v.custom.take().is_some() {
        record(ctx, conn, &f.path, &v);
    }
    v
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
    let host = crate::http_common::authority_str(parts);
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
        deny: Some(Refusal::BadPath),
        policy: None,
        result: "bad_path",
        custom: None,
        audit: None,
    }
}

/// The two ends of a connection as an external authorizer's check names them.
pub(crate) fn peers(ctx: &Ctx, conn: &ConnInfo) -> crate::ext_authz::Peers {
    let w = &ctx.workload;
    crate::ext_authz::Peers {
        source: conn.src,
        destination: conn.dst,
        source_principal: conn
            .peer_principal
            .as_ref()
            .map(|p| format!("spiffe://{p}")),
        destination_principal: w.identity.to_string(),
        destination_service: format!("{}.{}", w.canonical_service, w.namespace),
    }
}

/// Authorizes a TCP connection (L4 attributes only) when it opens. When a CUSTOM policy with
/// a gRPC provider matches, `custom` is left for the caller, which makes the network check
/// (`crate::ext_authz::check_connection`) and settles the verdict (`settle_custom`).
pub(crate) fn check_tcp(ctx: &Ctx, conn: &ConnInfo) -> Verdict {
    let policy = ctx.policy.load();
    let d = policy.snapshot.authorize(&base_request(conn));
    let mut v = conclude(ctx, conn, &d, "tcp");
    if let Some(c) = v.custom.take() {
        match c.provider.api {
            // An envoyExtAuthzHttp provider has no TCP check: istiod's builder "ignored CUSTOM
            // action with HTTP provider on TCP filter chain" (pilot/pkg/security/authz/builder/
            // builder.go), so a sidecar lets DENY and ALLOW decide.
            crate::ext_authz::Api::Http(_) => {
                crate::warn_limited!(
                    policy = c.policy,
                    provider = c.provider.name,
                    "CUSTOM policy matched a TCP connection; its HTTP provider has no TCP check \
                     and is ignored there, as istiod does (DENY and ALLOW policies still apply)"
                );
                record(ctx, conn, "tcp", &v);
            }
            // A gRPC provider checks the connection (the network ext_authz filter).
            crate::ext_authz::Api::Grpc => v.custom = Some(c),
        }
    }
    v
}

/// Authorizes an open TCP connection again (policy changed). The external authorizer is not
/// asked again (Envoy's network ext_authz checks a connection once): DENY and ALLOW decide.
pub(crate) fn recheck_tcp(ctx: &Ctx, conn: &ConnInfo) -> Verdict {
    let mut v = check_tcp(ctx, conn);
    if v.custom.take().is_some() {
        record(ctx, conn, "tcp", &v);
    }
    v
}
