//! The AuthorizationPolicy engine: compiled rules, an index by action and port, and
//! [`Snapshot::authorize`](crate::Snapshot::authorize).
//!
//! Semantics follow Istio's sidecar (istiod's `pilot/pkg/security/authz/model` and `builder`
//! generating Envoy RBAC), quoted from the API reference where implemented:
//!
//! - "The CUSTOM, DENY and ALLOW actions" are evaluated in that order: "If there are any CUSTOM
//!   policies that match the request, evaluate and deny the request if the evaluation result is
//!   deny. If there are any DENY policies that match the request, deny the request. If there are
//!   no ALLOW policies for the workload, allow the request. If any of the ALLOW policies match
//!   the request, allow the request. Deny the request."
//! - "AUDIT: Audit a request if it matches any of the rules" — it never changes the decision.
//! - A rule matches when any `from` entry, any `to` entry and all `when` conditions match;
//!   inside an entry every set field must match; a field matches when any of its values
//!   matches; `not*` fields and `notValues` match when none of their values match.
//! - "Any string field in the rule supports Exact, Prefix, Suffix and Presence match" — and
//!   nothing else: `.` and every other character is literal.
//! - A TCP connection (no HTTP attributes): for ALLOW, a rule that uses any HTTP-only field
//!   (hosts, methods, paths, requestPrincipals, `request.*` conditions, and their `not`
//!   forms) cannot match; for DENY, AUDIT and CUSTOM the HTTP-only fields are dropped from the
//!   rule, which therefore matches more (a DENY rule with only HTTP fields denies the whole TCP
//!   connection). This is istiod's conservative translation and what a sidecar enforces.

use std::net::IpAddr;

use crate::PolicyOptions;
use crate::crd::{Action, AuthorizationPolicySpec, Operation, Rule, Source};
use crate::error::LoadError;
use crate::load::Resource;
use crate::validate::{self, ConditionKey};

/// The annotation that turns a policy into a dry run: "evaluated and logged, not enforced".
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// `istio.io/dry-run` parsed as Go's `strconv.ParseBool`, as istiod does (an invalid value
/// means not dry-run).
pub(crate) fn is_dry_run(r: &Resource) -> bool {
    matches!(
        r.annotations.get(DRY_RUN_ANNOTATION).map(String::as_str),
        Some("1" | "t" | "T" | "TRUE" | "true" | "True")
    )
}

// ---------------------------------------------------------------------------------------------
// Request attributes

/// Request headers, as the proxy has them. Implemented by the proxy over `http::HeaderMap`;
/// implemented here for `Vec`s and arrays of `(name, value)` pairs (names compared case-insensitively).
pub trait Headers {
    /// Calls `f` with every value of the header `lower_case_name`, in order.
    fn values<'s>(&'s self, lower_case_name: &str, f: &mut dyn FnMut(&'s str));
}

fn pairs_values<'s, N: AsRef<str>, V: AsRef<str>>(
    pairs: &'s [(N, V)],
    name: &str,
    f: &mut dyn FnMut(&'s str),
) {
    for (n, v) in pairs {
        if n.as_ref().eq_ignore_ascii_case(name) {
            f(v.as_ref());
        }
    }
}

impl<N: AsRef<str>, V: AsRef<str>> Headers for Vec<(N, V)> {
    fn values<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str)) {
        pairs_values(self, name, f)
    }
}

impl<N: AsRef<str>, V: AsRef<str>, const K: usize> Headers for [(N, V); K] {
    fn values<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str)) {
        pairs_values(self, name, f)
    }
}

/// HTTP attributes of a request.
#[derive(Clone, Copy)]
pub struct HttpAttrs<'a> {
    /// `:method` / request method, as sent (case-sensitive).
    pub method: &'a str,
    /// `:authority` / `Host`, as sent (host matching is case-insensitive; a port, if present,
    /// is part of the value as in Envoy).
    pub host: &'a str,
    /// The request path ALREADY normalized with [`crate::normalize_path`]; a query or fragment
    /// is ignored for matching.
    pub path: &'a str,
    pub headers: &'a dyn Headers,
}

impl std::fmt::Debug for HttpAttrs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAttrs")
            .field("method", &self.method)
            .field("host", &self.host)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The verified payload of a request's JWT (from RequestAuthentication).
#[derive(Debug, Clone, PartialEq)]
pub struct JwtClaims {
    payload: serde_json::Value,
    space_delimited: Vec<String>,
}

impl JwtClaims {
    /// Claims whose string value is split on spaces when matched, always: "The default claims
    /// 'scope' and 'permission' are always treated as space-delimited".
    pub const DEFAULT_SPACE_DELIMITED: [&'static str; 2] = ["scope", "permission"];

    /// Wraps a verified JWT payload (a JSON object).
    pub fn new(payload: serde_json::Value) -> Self {
        JwtClaims {
            payload,
            space_delimited: Self::DEFAULT_SPACE_DELIMITED
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }

    /// Adds `spaceDelimitedClaims` of the JWT rule that verified the token (nested claims
    /// written with `.`, e.g. `provider.login.scope`).
    pub fn with_space_delimited_claims(mut self, claims: &[String]) -> Self {
        for c in claims {
            if !self.space_delimited.contains(c) {
                self.space_delimited.push(c.clone());
            }
        }
        self
    }

    pub fn payload(&self) -> &serde_json::Value {
        &self.payload
    }

    /// `iss` when it is a string.
    pub fn issuer(&self) -> Option<&str> {
        self.payload.get("iss").and_then(serde_json::Value::as_str)
    }

    /// `sub` when it is a string.
    pub fn subject(&self) -> Option<&str> {
        self.payload.get("sub").and_then(serde_json::Value::as_str)
    }

    /// The request principal, `iss/sub` ("request.auth.principal").
    pub fn principal(&self) -> Option<String> {
        Some(format!("{}/{}", self.issuer()?, self.subject()?))
    }

    /// Calls `f` with each string value of a claim (nested path), splitting space-delimited
    /// claims and flattening lists; stops early when `f` returns true. Non-string values never
    /// match, as with Envoy's string matchers on JWT metadata.
    fn any_value(&self, path: &[String], f: &mut dyn FnMut(&str) -> bool) -> bool {
        let mut v = &self.payload;
        for p in path {
            match v.get(p.as_str()) {
                Some(next) => v = next,
                None => return false,
            }
        }
        let split = self.is_space_delimited(path);
        let mut check = |s: &str| {
            if split {
                s.split_whitespace().any(&mut *f)
            } else {
                f(s)
            }
        };
        match v {
            serde_json::Value::String(s) => check(s),
            serde_json::Value::Array(items) => items
                .iter()
                .filter_map(serde_json::Value::as_str)
                .any(check),
            _ => false,
        }
    }

    fn is_space_delimited(&self, path: &[String]) -> bool {
        self.space_delimited.iter().any(|c| {
            let mut parts = c.split('.');
            path.iter().all(|p| parts.next() == Some(p.as_str())) && parts.next().is_none()
        })
    }
}

/// One request (or TCP connection) to authorize.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The peer's verified principal without `spiffe://` (`cluster.local/ns/a/sa/b`); `None`
    /// for plaintext.
    pub source_principal: Option<&'a str>,
    /// The connection's peer address ("source.ip", Envoy's direct remote address).
    pub source_ip: IpAddr,
    /// The original client address ("remote.ip", from `X-Forwarded-For` or PROXY protocol);
    /// `None` means the same as `source_ip`.
    pub remote_ip: Option<IpAddr>,
    /// The local address the connection arrived on ("destination.ip").
    pub destination_ip: IpAddr,
    /// The workload port ("destination.port").
    pub destination_port: u16,
    /// The TLS SNI of the connection ("connection.sni").
    pub sni: Option<&'a str>,
    /// `None` for a TCP connection.
    pub http: Option<HttpAttrs<'a>>,
    /// The verified JWT, if RequestAuthentication accepted one.
    pub jwt: Option<&'a JwtClaims>,
}

impl<'a> Request<'a> {
    /// A TCP request with only addresses set.
    pub fn tcp(source_ip: IpAddr, destination_ip: IpAddr, destination_port: u16) -> Self {
        Request {
            source_principal: None,
            source_ip,
            remote_ip: None,
            destination_ip,
            destination_port,
            sni: None,
            http: None,
            jwt: None,
        }
    }

    pub fn with_principal(mut self, principal: &'a str) -> Self {
        self.source_principal = Some(principal);
        self
    }

    pub fn with_http(mut self, http: HttpAttrs<'a>) -> Self {
        self.http = Some(http);
        self
    }

    pub fn with_jwt(mut self, jwt: &'a JwtClaims) -> Self {
        self.jwt = Some(jwt);
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Decisions

/// A policy rule that matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyMatch<'s> {
    /// `namespace/name` of the AuthorizationPolicy.
    pub policy: &'s str,
    pub action: Action,
    /// The index of the matching rule in `spec.rules` (0 for a policy without rules).
    pub rule: usize,
}

/// Why a request was allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason<'s> {
    /// No enforced AuthorizationPolicy applies to the workload at all.
    NoPolicies,
    /// Policies apply but none has action ALLOW: "If there are no ALLOW policies for the
    /// workload, allow the request."
    NoAllowPolicies,
    /// "If any of the ALLOW policies match the request, allow the request."
    AllowMatched(PolicyMatch<'s>),
    /// "If there are any DENY policies that match the request, deny the request."
    DenyMatched(PolicyMatch<'s>),
    /// A CUSTOM policy matched but its provider cannot be used (not among
    /// [`PolicyOptions::extension_providers`], or several providers for one workload): istiod
    /// then generates a deny for what the policy matches.
    CustomProviderUnavailable(PolicyMatch<'s>),
    /// ALLOW policies apply and none matched: "Deny the request."
    NoAllowMatched,
}

/// An external authorization check the proxy must make (CUSTOM action).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CustomCheck<'s> {
    /// The extension provider's name.
    pub provider: &'s str,
    pub matched: PolicyMatch<'s>,
}

/// The outcome of [`Snapshot::authorize`](crate::Snapshot::authorize).
///
/// The request is allowed iff `allowed` is true and, when `custom` is `Some`, the named
/// external authorizer also allows it ("A request is allowed if and only if all the actions
/// return allow"). Envoy asks the CUSTOM provider first; a proxy may skip the call when
/// `allowed` is already false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'s> {
    pub allowed: bool,
    pub reason: Reason<'s>,
    pub custom: Option<CustomCheck<'s>>,
    /// AUDIT rules that matched (log them; they never change the decision).
    pub audit: Vec<PolicyMatch<'s>>,
    /// Dry-run (`istio.io/dry-run: "true"`) rules that matched, any action.
    pub dry_run: Vec<PolicyMatch<'s>>,
    /// What the dry-run policies alone would have decided (as Envoy's shadow rules: denied if a
    /// dry-run DENY matched, or dry-run ALLOW policies exist and none matched); `None` without
    /// dry-run policies.
    pub dry_run_allowed: Option<bool>,
}

impl Decision<'_> {
    /// The policy that decided, if one did.
    pub fn policy(&self) -> Option<&str> {
        match self.reason {
            Reason::AllowMatched(m)
            | Reason::DenyMatched(m)
            | Reason::CustomProviderUnavailable(m) => Some(m.policy),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Compiled matchers

/// Exact, prefix (`abc*`), suffix (`*abc`) or presence (`*`, "will match when value is not
/// empty"). No other wildcard: every other character is literal.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Presence,
}

impl StrMatch {
    fn new(v: &str) -> StrMatch {
        if v == "*" {
            StrMatch::Presence
        } else if let Some(s) = v.strip_prefix('*') {
            StrMatch::Suffix(s.into())
        } else if let Some(p) = v.strip_suffix('*') {
            StrMatch::Prefix(p.into())
        } else {
            StrMatch::Exact(v.into())
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == &**e,
            StrMatch::Prefix(p) => v.starts_with(&**p),
            StrMatch::Suffix(s) => v.ends_with(&**s),
            StrMatch::Presence => !v.is_empty(),
        }
    }

    fn matches_ignore_case(&self, v: &str) -> bool {
        let vb = v.as_bytes();
        match self {
            StrMatch::Exact(e) => v.eq_ignore_ascii_case(e),
            StrMatch::Prefix(p) => {
                vb.len() >= p.len() && vb[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            StrMatch::Suffix(s) => {
                vb.len() >= s.len() && vb[vb.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
            StrMatch::Presence => !v.is_empty(),
        }
    }
}

/// A path value: a string match, or an Envoy URI template (`{*}`, `{**}`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum PathMatch {
    Str(StrMatch),
    Template(UriTemplate),
}

/// One `/`-separated segment of a URI template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplateSeg {
    /// A literal segment (empty only as the last one, from a trailing `/`).
    Literal(Box<str>),
    /// `{*}` (Envoy `*`): one or more literal characters, no `/`.
    One,
}

/// An AuthorizationPolicy path template as istiod hands it to Envoy and as Envoy matches it.
///
/// istiod (`pilot/pkg/security/authz/matcher/template.go`, `sanitizePathTemplate`) replaces
/// `{*}` with `*` and `{**}` with `**` and sends an `envoy.path.match.uri_template` matcher.
/// Envoy (`source/extensions/path/uri_template_lib/uri_template_internal.cc`) turns the
/// template into an RE2 regex, `"/" + segments joined with "/"`, where `*` is
/// `[a-zA-Z0-9-._~%!$&'()+,;:@=]+` and `**` is `[a-zA-Z0-9-._~%!$&'()+,;:@=/]*`, and
/// `UriTemplateMatcher::match` requires a full match of the path with its query and fragment
/// removed. Consequences, all tested below with Envoy's own vectors:
/// - `{*}` is exactly one non-empty segment; characters outside that set (`*`, `"`, `<`,
///   non-ASCII bytes as sent, ...) never match an operator.
/// - `{**}` may match zero characters but the `/` before it is literal: `/a/{**}` matches
///   `/a/` and `/a/b/c` but **not** `/a`.
/// - Literals after `{**}` are a fixed suffix: `/a/{**}/b` matches `/a//b` and `/a/x/b`, not
///   `/a/b`.
///
/// The regex is never built: since `*` and literals cannot contain `/`, the segments before
/// `{**}` line up one-to-one with the path's, and what follows `{**}` is a fixed string.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UriTemplate {
    /// Segments before `{**}` (all of them when there is none).
    head: Vec<TemplateSeg>,
    /// `Some(suffix)` when the template has `{**}`: the text after it (`"/b"` for `/a/{**}/b`).
    rest: Option<String>,
}

/// Envoy's `kLiteral` character set (uri_template_internal.cc: unreserved, `%`, the
/// sub-delims but `*`, `:`, `@`, and `=` — "user included \"=\" allowed").
pub(crate) fn envoy_template_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b)
}

impl UriTemplate {
    /// Compiles a template istiod's `CheckValidPathTemplate` and Envoy's parser accepted
    /// (see `validate::check_path_value`).
    fn new(v: &str) -> UriTemplate {
        let body = v.strip_prefix('/').unwrap_or(v);
        let mut head = Vec::new();
        let mut rest = None;
        let mut parts = body.split('/');
        for seg in parts.by_ref() {
            match seg {
                "{*}" => head.push(TemplateSeg::One),
                "{**}" => {
                    rest = Some(String::new());
                    break;
                }
                lit => head.push(TemplateSeg::Literal(lit.into())),
            }
        }
        if let Some(suffix) = &mut rest {
            for seg in parts {
                suffix.push('/');
                suffix.push_str(seg);
            }
        }
        UriTemplate { head, rest }
    }

    fn matches(&self, path: &str) -> bool {
        let Some(mut p) = path.strip_prefix('/') else {
            return false;
        };
        let seg_ok = |seg: &TemplateSeg, part: &str| match seg {
            TemplateSeg::Literal(l) => part == &**l,
            TemplateSeg::One => !part.is_empty() && part.bytes().all(envoy_template_char),
        };
        match &self.rest {
            None => {
                let mut parts = p.split('/');
                self.head
                    .iter()
                    .all(|seg| parts.next().is_some_and(|part| seg_ok(seg, part)))
                    && parts.next().is_none()
            }
            Some(suffix) => {
                // Every segment before `{**}` is followed by a literal `/`.
                for seg in &self.head {
                    match p.split_once('/') {
                        Some((part, tail)) if seg_ok(seg, part) => p = tail,
                        _ => return false,
                    }
                }
                p.len() >= suffix.len()
                    && p.ends_with(suffix.as_str())
                    && p.as_bytes()[..p.len() - suffix.len()]
                        .iter()
                        .all(|b| *b == b'/' || envoy_template_char(*b))
            }
        }
    }
}

impl PathMatch {
    fn new(v: &str) -> PathMatch {
        // istiod's `security.ContainsPathTemplate`.
        if v.contains("{*}") || v.contains("{**}") {
            PathMatch::Template(UriTemplate::new(v))
        } else {
            PathMatch::Str(StrMatch::new(v))
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Str(m) => m.matches(path),
            PathMatch::Template(t) => t.matches(path),
        }
    }
}

/// `requestPrincipals` / `request.auth.principal` values: `iss/sub` split at the last `/`,
/// each side matched as istiod generates it (`*` = any non-empty).
#[derive(Debug, Clone, PartialEq, Eq)]
struct IssSub {
    iss: StrMatch,
    sub: StrMatch,
}

impl IssSub {
    fn new(value: &str) -> IssSub {
        let any = StrMatch::Presence;
        let (iss, sub, found) = match value.rfind('/') {
            Some(i) => (&value[..i], &value[i + 1..], true),
            None => (value, "", false),
        };
        let (iss, sub) = if value == "*" {
            (any.clone(), any)
        } else if value.starts_with('*') {
            if found {
                let iss = if iss == "*" {
                    any
                } else {
                    StrMatch::Suffix(iss.trim_start_matches('*').into())
                };
                (iss, StrMatch::Exact(sub.into()))
            } else {
                (any, StrMatch::Suffix(value.trim_start_matches('*').into()))
            }
        } else if value.ends_with('*') {
            if found {
                let sub = if sub == "*" {
                    any
                } else {
                    StrMatch::Prefix(sub.trim_end_matches('*').into())
                };
                (StrMatch::Exact(iss.into()), sub)
            } else {
                (StrMatch::Prefix(value.trim_end_matches('*').into()), any)
            }
        } else {
            (StrMatch::Exact(iss.into()), StrMatch::Exact(sub.into()))
        };
        IssSub { iss, sub }
    }

    fn matches(&self, jwt: &JwtClaims) -> bool {
        match (jwt.issuer(), jwt.subject()) {
            (Some(i), Some(s)) => self.iss.matches(i) && self.sub.matches(s),
            _ => false,
        }
    }
}

/// One attribute test with its values (OR).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Test {
    Principal(Vec<StrMatch>),
    /// `namespaces` globs: istiod's regex `.*/ns/<glob>/.*` on the peer's URI SAN, every `*`
    /// of the value being `.*`.
    Namespace(Vec<Box<str>>),
    /// (namespace, service account)
    ServiceAccount(Vec<(Box<str>, Box<str>)>),
    /// Trust domains after alias expansion, matched as istiod's `srcTrustDomainGenerator`.
    TrustDomain(Vec<Box<str>>),
    SourceIp(Vec<ipnet::IpNet>),
    RemoteIp(Vec<ipnet::IpNet>),
    DestinationIp(Vec<ipnet::IpNet>),
    DestinationPort(Vec<u16>),
    Sni(Vec<StrMatch>),
    RequestPrincipal(Vec<IssSub>),
    Claim(Vec<String>, Vec<StrMatch>),
    /// Header name (lower case), values (`None` = presence).
    Header(Box<str>, Vec<Option<StrMatch>>),
    Host(Vec<StrMatch>),
    Method(Vec<StrMatch>),
    Path(Vec<PathMatch>),
    /// Envoy filter metadata (`experimental.envoy.filters.*`): absent in Outrigger, so the
    /// metadata matcher never matches.
    Never,
}

impl Test {
    fn http_only(&self) -> bool {
        matches!(
            self,
            Test::RequestPrincipal(_)
                | Test::Claim(..)
                | Test::Header(..)
                | Test::Host(_)
                | Test::Method(_)
                | Test::Path(_)
        )
    }

    fn eval(&self, req: &Request<'_>) -> bool {
        match self {
            Test::Principal(ms) => req
                .source_principal
                .is_some_and(|p| ms.iter().any(|m| m.matches(p))),
            Test::Namespace(ms) => req
                .source_principal
                .is_some_and(|p| ms.iter().any(|m| namespace_matches(p, m))),
            Test::Never => false,
            Test::ServiceAccount(sas) => req.source_principal.is_some_and(|p| {
                sas.iter()
                    .any(|(ns, sa)| service_account_matches(p, ns, sa))
            }),
            Test::TrustDomain(ms) => req
                .source_principal
                .is_some_and(|p| ms.iter().any(|m| trust_domain_matches(p, m))),
            Test::SourceIp(nets) => ip_in(req.source_ip, nets),
            Test::RemoteIp(nets) => ip_in(req.remote_ip.unwrap_or(req.source_ip), nets),
            Test::DestinationIp(nets) => ip_in(req.destination_ip, nets),
            Test::DestinationPort(ports) => ports.contains(&req.destination_port),
            Test::Sni(ms) => req.sni.is_some_and(|s| ms.iter().any(|m| m.matches(s))),
            Test::RequestPrincipal(ps) => req.jwt.is_some_and(|j| ps.iter().any(|p| p.matches(j))),
            Test::Claim(path, ms) => req
                .jwt
                .is_some_and(|j| j.any_value(path, &mut |v| ms.iter().any(|m| m.matches(v)))),
            Test::Header(name, ms) => req
                .http
                .is_some_and(|h| header_matches(h.headers, name, ms)),
            Test::Host(ms) => req
                .http
                .is_some_and(|h| ms.iter().any(|m| m.matches_ignore_case(h.host))),
            Test::Method(ms) => req
                .http
                .is_some_and(|h| ms.iter().any(|m| m.matches(h.method))),
            Test::Path(ms) => req.http.is_some_and(|h| {
                let path = strip_query(h.path);
                ms.iter().any(|m| m.matches(path))
            }),
        }
    }
}

fn strip_query(path: &str) -> &str {
    match path.find(['?', '#']) {
        Some(i) => &path[..i],
        None => path,
    }
}

fn ip_in(ip: IpAddr, nets: &[ipnet::IpNet]) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

/// Full match of `text` against `pattern` where every `*` matches any sequence (`/`
/// included) and everything else is literal: a regex made of `.*` and quoted literals, as
/// istiod builds them. Iterative with backtracking to the last `*`: O(len(pattern) ×
/// len(text)) at worst, no recursion.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

/// istiod's `srcNamespaceGenerator`: regex `.*/ns/<ns>/.*` (every `*` in the value is `.*`)
/// on the peer's URI SAN `spiffe://<principal>`.
fn namespace_matches(principal: &str, ns: &str) -> bool {
    let pattern = format!("*/ns/{ns}/*");
    let uri = format!("spiffe://{principal}");
    glob_match(pattern.as_bytes(), uri.as_bytes())
}

/// istiod's `srcTrustDomainGenerator` on the URI SAN `spiffe://<principal>`: `*` is the
/// prefix `spiffe://` (any authenticated peer); a value without `*` is the prefix
/// `spiffe://<value>/`; otherwise the regex `spiffe://<a>[^/]*<b>/.*` with the value split at
/// its first `*` into `a` and `b`.
fn trust_domain_matches(principal: &str, value: &str) -> bool {
    if value == "*" {
        return true;
    }
    match value.split_once('*') {
        None => principal
            .strip_prefix(value)
            .is_some_and(|r| r.starts_with('/')),
        Some((a, b)) => {
            let Some(r) = principal.strip_prefix(a) else {
                return false;
            };
            // `[^/]*`: up to the first `/` of what follows `a`.
            let limit = r.find('/').unwrap_or(r.len());
            (0..=limit).any(|k| {
                r.get(k..)
                    .and_then(|x| x.strip_prefix(b))
                    .is_some_and(|x| x.starts_with('/'))
            })
        }
    }
}

/// istiod: regex `spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?`.
fn service_account_matches(principal: &str, ns: &str, sa: &str) -> bool {
    let mut search = principal;
    let mut offset = 0;
    while let Some(i) = search.find("/ns/") {
        let start = offset + i;
        let after = &principal[start + 4..];
        if start > 0
            && let Some(rest) = after.strip_prefix(ns).and_then(|r| r.strip_prefix('/'))
        {
            // rest = "(.+/|)sa/<sa>(/.+)?"
            let ends_ok = |tail: &str| tail.is_empty() || (tail.len() > 1 && tail.starts_with('/'));
            let mut candidates =
                std::iter::once(0).chain(rest.match_indices("/sa/").map(|(j, _)| j + 1));
            if candidates.any(|j| {
                rest[j..]
                    .strip_prefix("sa/")
                    .and_then(|r| r.strip_prefix(sa))
                    .is_some_and(ends_ok)
            }) {
                return true;
            }
        }
        offset = start + 4;
        search = &principal[offset..];
    }
    false
}

fn header_matches(headers: &dyn Headers, name: &str, ms: &[Option<StrMatch>]) -> bool {
    // Envoy matches a header with several values against the values joined with `,`.
    let mut first: Option<&str> = None;
    let mut joined: Option<String> = None;
    headers.values(name, &mut |v| match first {
        None => first = Some(v),
        Some(f) => {
            let j = joined.get_or_insert_with(|| f.to_string());
            j.push(',');
            j.push_str(v);
        }
    });
    let Some(first) = first else { return false };
    let value = joined.as_deref().unwrap_or(first);
    ms.iter().any(|m| match m {
        // Presence: the header is present.
        None => true,
        Some(m) => m.matches(value),
    })
}

/// A test, possibly negated (`not*` fields, `notValues`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cond {
    test: Test,
    negate: bool,
}

impl Cond {
    fn eval(&self, req: &Request<'_>, tcp_lenient: bool) -> bool {
        if tcp_lenient && req.http.is_none() && self.test.http_only() {
            // istiod drops HTTP-only fields of DENY/AUDIT/CUSTOM rules on TCP.
            return true;
        }
        self.test.eval(req) != self.negate
    }
}

#[derive(Debug, Clone)]
struct CompiledRule {
    /// Index of the policy in `AuthzIndex::policies`.
    policy: u32,
    /// Index in `spec.rules`.
    index: u32,
    /// OR of ANDs; empty = any source.
    from: Vec<Vec<Cond>>,
    /// OR of ANDs; empty = any operation.
    to: Vec<Vec<Cond>>,
    when: Vec<Cond>,
    /// Whether any condition is HTTP-only.
    http_only: bool,
    /// The destination ports this rule can match (`None` = any); for the port index.
    ports: Option<Vec<u16>>,
    /// A policy without rules ("the match will never occur").
    never: bool,
    /// A condition istiod cannot translate: in an ALLOW policy the rule is skipped (never
    /// matches); in DENY/AUDIT/CUSTOM the condition is dropped (`model.go`, `checkError`).
    untranslatable: bool,
}

impl CompiledRule {
    fn matches(&self, req: &Request<'_>, action: Action) -> bool {
        if self.never || (self.untranslatable && action == Action::Allow) {
            return false;
        }
        let tcp_lenient = action != Action::Allow;
        if req.http.is_none() && self.http_only && !tcp_lenient {
            // istiod skips an ALLOW rule that needs HTTP attributes on a TCP filter chain.
            return false;
        }
        let all = |conds: &Vec<Cond>| conds.iter().all(|c| c.eval(req, tcp_lenient));
        (self.from.is_empty() || self.from.iter().any(all))
            && (self.to.is_empty() || self.to.iter().any(all))
            && all(&self.when)
    }
}

#[derive(Debug, Clone)]
struct PolicyInfo {
    key: String,
    action: Action,
    provider: Option<String>,
}

/// Rule ids indexed by destination port.
#[derive(Debug, Clone, Default)]
struct Bucket {
    /// Sorted by port; ids ascending.
    by_port: Vec<(u16, Vec<u32>)>,
    /// Rules for any port; ids ascending.
    any_port: Vec<u32>,
    /// Number of policies in this bucket.
    policies: usize,
}

impl Bucket {
    fn build(rules: &[CompiledRule], ids: impl Iterator<Item = u32>, policies: usize) -> Bucket {
        let mut by_port: std::collections::BTreeMap<u16, Vec<u32>> = Default::default();
        let mut any_port = Vec::new();
        for id in ids {
            match &rules[id as usize].ports {
                None => any_port.push(id),
                Some(ports) => {
                    for p in ports {
                        let v = by_port.entry(*p).or_default();
                        if v.last() != Some(&id) {
                            v.push(id);
                        }
                    }
                }
            }
        }
        Bucket {
            by_port: by_port.into_iter().collect(),
            any_port,
            policies,
        }
    }

    fn port_list(&self, port: u16) -> &[u32] {
        match self.by_port.binary_search_by_key(&port, |(p, _)| *p) {
            Ok(i) => &self.by_port[i].1,
            Err(_) => &[],
        }
    }

    /// The first matching rule id (in policy order), if any.
    fn first_match(
        &self,
        rules: &[CompiledRule],
        req: &Request<'_>,
        action: Action,
    ) -> Option<u32> {
        let a = self
            .port_list(req.destination_port)
            .iter()
            .copied()
            .find(|id| rules[*id as usize].matches(req, action));
        let b = self
            .any_port
            .iter()
            .copied()
            .take_while(|id| a.is_none_or(|a| *id < a))
            .find(|id| rules[*id as usize].matches(req, action));
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Every matching rule id.
    fn for_each_match(
        &self,
        rules: &[CompiledRule],
        req: &Request<'_>,
        action: Action,
        f: &mut dyn FnMut(u32),
    ) {
        for id in self
            .port_list(req.destination_port)
            .iter()
            .chain(self.any_port.iter())
        {
            if rules[*id as usize].matches(req, action) {
                f(*id);
            }
        }
    }
}

/// The compiled, indexed AuthorizationPolicies of one workload.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuthzIndex {
    policies: Vec<PolicyInfo>,
    rules: Vec<CompiledRule>,
    /// CUSTOM policies with a usable provider.
    custom: Bucket,
    /// CUSTOM policies whose provider is unusable: deny what they match.
    bad_custom: Bucket,
    deny: Bucket,
    allow: Bucket,
    audit: Bucket,
    dry_deny: Bucket,
    dry_allow: Bucket,
    /// Dry-run AUDIT and CUSTOM policies (logged only).
    dry_other: Bucket,
    /// Whether any enforced policy applies (for [`Reason::NoPolicies`]).
    any_enforced: bool,
}

/// Expands a principal over the trust domain and its aliases as istiod's
/// `ReplaceTrustDomainAliases` does: a `<td>/ns/<ns>/sa/<sa>` principal whose trust domain is
/// the local one, an alias, or `cluster.local` is matched under every trusted domain.
fn expand_principal(value: &str, opts: &PolicyOptions) -> Vec<String> {
    let parts: Vec<&str> = value.split('/').collect();
    if parts.len() != 5 || parts[0] == "*" {
        return vec![value.to_string()];
    }
    let td = parts[0];
    if !(opts.trust_domains.contains(td) || td == "cluster.local") {
        return vec![value.to_string()];
    }
    let mut out: Vec<String> = Vec::new();
    for t in opts.trust_domains.all() {
        let p = format!("{t}/{}", parts[1..].join("/"));
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// `ExpandTrustDomainAliases`: a trusted domain stands for all of them.
fn expand_trust_domains(values: &[String], opts: &PolicyOptions) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in values {
        if opts.trust_domains.contains(v) {
            for t in opts.trust_domains.all() {
                if !out.iter().any(|o| o == t) {
                    out.push(t.to_string());
                }
            }
        } else if !out.contains(v) {
            out.push(v.clone());
        }
    }
    out
}

struct Compiler<'a> {
    opts: &'a PolicyOptions,
    policy_namespace: &'a str,
}

impl Compiler<'_> {
    fn push(
        out: &mut Vec<Cond>,
        values: &[String],
        negated: &[String],
        mk: impl Fn(&[String]) -> Test,
    ) {
        if !values.is_empty() {
            out.push(Cond {
                test: mk(values),
                negate: false,
            });
        }
        if !negated.is_empty() {
            out.push(Cond {
                test: mk(negated),
                negate: true,
            });
        }
    }

    fn boxed(values: &[String]) -> Vec<Box<str>> {
        values.iter().map(|v| v.as_str().into()).collect()
    }

    fn strs(values: &[String]) -> Vec<StrMatch> {
        values.iter().map(|v| StrMatch::new(v)).collect()
    }

    fn ips(values: &[String]) -> Vec<ipnet::IpNet> {
        values
            .iter()
            .filter_map(|v| validate::parse_ip_block(v).ok())
            .collect()
    }

    fn principals(&self, values: &[String]) -> Vec<StrMatch> {
        values
            .iter()
            .flat_map(|v| expand_principal(v, self.opts))
            .map(|v| StrMatch::new(&v))
            .collect()
    }

    fn service_accounts(&self, values: &[String]) -> Vec<(Box<str>, Box<str>)> {
        values
            .iter()
            .map(|v| match v.split_once('/') {
                Some((ns, sa)) => (ns.into(), sa.into()),
                // "`<serviceaccount>` may also be used to use the same namespace as the
                // `AuthorizationPolicy`."
                None => (self.policy_namespace.into(), v.as_str().into()),
            })
            .collect()
    }

    fn source(&self, s: &Source) -> Vec<Cond> {
        let mut c = Vec::new();
        Self::push(&mut c, &s.principals, &s.not_principals, |v| {
            Test::Principal(self.principals(v))
        });
        Self::push(
            &mut c,
            &s.request_principals,
            &s.not_request_principals,
            |v| Test::RequestPrincipal(v.iter().map(|x| IssSub::new(x)).collect()),
        );
        Self::push(&mut c, &s.namespaces, &s.not_namespaces, |v| {
            Test::Namespace(Self::boxed(v))
        });
        Self::push(&mut c, &s.service_accounts, &s.not_service_accounts, |v| {
            Test::ServiceAccount(self.service_accounts(v))
        });
        Self::push(&mut c, &s.trust_domains, &s.not_trust_domains, |v| {
            Test::TrustDomain(Self::boxed(&expand_trust_domains(v, self.opts)))
        });
        Self::push(&mut c, &s.ip_blocks, &s.not_ip_blocks, |v| {
            Test::SourceIp(Self::ips(v))
        });
        Self::push(&mut c, &s.remote_ip_blocks, &s.not_remote_ip_blocks, |v| {
            Test::RemoteIp(Self::ips(v))
        });
        c
    }

    fn operation(&self, o: &Operation) -> Vec<Cond> {
        let mut c = Vec::new();
        Self::push(&mut c, &o.ports, &o.not_ports, |v| {
            Test::DestinationPort(
                v.iter()
                    .filter_map(|p| validate::parse_port(p).ok())
                    .collect(),
            )
        });
        Self::push(&mut c, &o.hosts, &o.not_hosts, |v| {
            Test::Host(Self::strs(v))
        });
        Self::push(&mut c, &o.methods, &o.not_methods, |v| {
            Test::Method(Self::strs(v))
        });
        Self::push(&mut c, &o.paths, &o.not_paths, |v| {
            Test::Path(v.iter().map(|p| PathMatch::new(p)).collect())
        });
        c
    }

    fn condition(&self, key: &ConditionKey, v: &[String]) -> Test {
        match key {
            ConditionKey::RequestHeader(h) => Test::Header(
                h.as_str().into(),
                v.iter()
                    .map(|x| (x != "*").then(|| StrMatch::new(x)))
                    .collect(),
            ),
            ConditionKey::SourceIp => Test::SourceIp(Self::ips(v)),
            ConditionKey::RemoteIp => Test::RemoteIp(Self::ips(v)),
            ConditionKey::SourceNamespace => Test::Namespace(Self::boxed(v)),
            ConditionKey::SourceServiceAccount => Test::ServiceAccount(self.service_accounts(v)),
            ConditionKey::SourcePrincipal => Test::Principal(self.principals(v)),
            ConditionKey::SourceTrustDomain => {
                Test::TrustDomain(Self::boxed(&expand_trust_domains(v, self.opts)))
            }
            ConditionKey::RequestAuthPrincipal => {
                Test::RequestPrincipal(v.iter().map(|x| IssSub::new(x)).collect())
            }
            ConditionKey::RequestAuthAudiences => Test::Claim(vec!["aud".into()], Self::strs(v)),
            ConditionKey::RequestAuthPresenter => Test::Claim(vec!["azp".into()], Self::strs(v)),
            ConditionKey::RequestAuthClaims(path) => Test::Claim(path.clone(), Self::strs(v)),
            ConditionKey::DestinationIp => Test::DestinationIp(Self::ips(v)),
            ConditionKey::DestinationPort => Test::DestinationPort(
                v.iter()
                    .filter_map(|p| validate::parse_port(p).ok())
                    .collect(),
            ),
            ConditionKey::ConnectionSni => Test::Sni(Self::strs(v)),
            ConditionKey::EnvoyFilterMetadata => Test::Never,
            // Never compiled: `rule` marks the rule untranslatable instead.
            ConditionKey::Untranslatable(_) => Test::Never,
        }
    }

    fn rule(&self, policy: u32, index: u32, rule: &Rule) -> CompiledRule {
        let from: Vec<Vec<Cond>> = rule
            .from
            .iter()
            .flatten()
            .map(|f| {
                f.source
                    .as_ref()
                    .map(|s| self.source(s))
                    .unwrap_or_default()
            })
            .collect();
        let to: Vec<Vec<Cond>> = rule
            .to
            .iter()
            .flatten()
            .map(|t| {
                t.operation
                    .as_ref()
                    .map(|o| self.operation(o))
                    .unwrap_or_default()
            })
            .collect();
        let mut when = Vec::new();
        let mut untranslatable = false;
        for c in &rule.when {
            // Validation guarantees the key parses.
            match validate::parse_condition_key(&c.key) {
                Ok(ConditionKey::Untranslatable(_)) | Err(_) => untranslatable = true,
                Ok(key) => Self::push(&mut when, &c.values, &c.not_values, |v| {
                    self.condition(&key, v)
                }),
            }
        }
        let http_only = from
            .iter()
            .chain(to.iter())
            .flatten()
            .chain(when.iter())
            .any(|c| c.test.http_only());
        // Ports this rule can match: every `to` entry restricts ports, and/or a positive
        // `destination.port` condition does.
        let port_set = |conds: &Vec<Cond>| -> Option<Vec<u16>> {
            conds.iter().find_map(|c| match (&c.test, c.negate) {
                (Test::DestinationPort(p), false) => Some(p.clone()),
                _ => None,
            })
        };
        let mut ports: Option<Vec<u16>> =
            if !to.is_empty() && to.iter().all(|t| port_set(t).is_some()) {
                Some(to.iter().filter_map(port_set).flatten().collect())
            } else {
                None
            };
        if let Some(when_ports) = port_set(&when) {
            ports = Some(match ports {
                None => when_ports,
                Some(p) => p.into_iter().filter(|x| when_ports.contains(x)).collect(),
            });
        }
        if let Some(p) = &mut ports {
            p.sort_unstable();
            p.dedup();
        }
        CompiledRule {
            policy,
            index,
            from,
            to,
            when,
            http_only,
            ports,
            never: false,
            untranslatable,
        }
    }
}

impl AuthzIndex {
    /// `allow_nothing` and `deny_all` name refused resources and their fail-closed stand-ins
    /// (see [`crate::RefusalEffect`]): an ALLOW policy that never matches, a DENY policy
    /// that matches every request and connection.
    pub(crate) fn build(
        policies: &[(&Resource, &AuthorizationPolicySpec)],
        allow_nothing: &[String],
        deny_all: &[String],
        opts: &PolicyOptions,
    ) -> Result<AuthzIndex, LoadError> {
        // Deterministic policy order: namespace, then name.
        let mut sorted: Vec<&(&Resource, &AuthorizationPolicySpec)> = policies.iter().collect();
        sorted.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));

        // "Note, currently at most 1 extension provider is allowed per workload."
        let mut providers: Vec<&str> = sorted
            .iter()
            .filter(|(r, s)| s.action == Action::Custom && !is_dry_run(r))
            .filter_map(|(_, s)| s.provider.as_ref().map(|p| p.name.as_str()))
            .collect();
        providers.sort_unstable();
        providers.dedup();
        let several_providers = providers.len() > 1;

        let mut idx = AuthzIndex::default();
        #[derive(Clone, Copy, PartialEq, Eq)]
        enum Slot {
            Custom,
            BadCustom,
            Deny,
            Allow,
            Audit,
            DryDeny,
            DryAllow,
            DryOther,
        }
        let mut slots: Vec<Slot> = Vec::new();
        for (r, spec) in sorted {
            let policy = idx.policies.len() as u32;
            let dry = is_dry_run(r);
            let provider = spec.provider.as_ref().map(|p| p.name.clone());
            let slot = match (spec.action, dry) {
                (Action::Custom, false) => {
                    let known = provider
                        .as_ref()
                        .is_some_and(|p| opts.extension_providers.contains(p));
                    if known && !several_providers {
                        Slot::Custom
                    } else {
                        Slot::BadCustom
                    }
                }
                (Action::Deny, false) => Slot::Deny,
                (Action::Allow, false) => Slot::Allow,
                (Action::Audit, false) => Slot::Audit,
                (Action::Deny, true) => Slot::DryDeny,
                (Action::Allow, true) => Slot::DryAllow,
                (_, true) => Slot::DryOther,
            };
            if !dry {
                idx.any_enforced = true;
            }
            idx.policies.push(PolicyInfo {
                key: r.key(),
                action: spec.action,
                provider,
            });
            let c = Compiler {
                opts,
                policy_namespace: &r.namespace,
            };
            if spec.rules.is_empty() {
                // "If not set, the match will never occur."
                idx.rules.push(CompiledRule {
                    policy,
                    index: 0,
                    from: Vec::new(),
                    to: Vec::new(),
                    when: Vec::new(),
                    http_only: false,
                    ports: Some(Vec::new()),
                    never: true,
                    untranslatable: false,
                });
                slots.push(slot);
            }
            for (i, rule) in spec.rules.iter().enumerate() {
                idx.rules.push(c.rule(policy, i as u32, rule));
                slots.push(slot);
            }
        }
        let stand_ins = allow_nothing
            .iter()
            .map(|k| (k, Action::Allow, Slot::Allow, true))
            .chain(
                deny_all
                    .iter()
                    .map(|k| (k, Action::Deny, Slot::Deny, false)),
            );
        for (key, action, slot, never) in stand_ins {
            let policy = idx.policies.len() as u32;
            idx.any_enforced = true;
            idx.policies.push(PolicyInfo {
                key: key.clone(),
                action,
                provider: None,
            });
            idx.rules.push(CompiledRule {
                policy,
                index: 0,
                from: Vec::new(),
                to: Vec::new(),
                when: Vec::new(),
                http_only: false,
                ports: if never { Some(Vec::new()) } else { None },
                never,
                untranslatable: false,
            });
            slots.push(slot);
        }
        let count = |s: Slot| {
            let mut seen: Vec<u32> = idx
                .rules
                .iter()
                .zip(&slots)
                .filter(|(_, x)| **x == s)
                .map(|(r, _)| r.policy)
                .collect();
            seen.dedup();
            seen.len()
        };
        let bucket = |s: Slot| {
            Bucket::build(
                &idx.rules,
                (0..idx.rules.len() as u32).filter(|i| slots[*i as usize] == s),
                count(s),
            )
        };
        idx.custom = bucket(Slot::Custom);
        idx.bad_custom = bucket(Slot::BadCustom);
        idx.deny = bucket(Slot::Deny);
        idx.allow = bucket(Slot::Allow);
        idx.audit = bucket(Slot::Audit);
        idx.dry_deny = bucket(Slot::DryDeny);
        idx.dry_allow = bucket(Slot::DryAllow);
        idx.dry_other = bucket(Slot::DryOther);
        Ok(idx)
    }

    fn matched(&self, id: u32) -> PolicyMatch<'_> {
        let r = &self.rules[id as usize];
        let p = &self.policies[r.policy as usize];
        PolicyMatch {
            policy: &p.key,
            action: p.action,
            rule: r.index as usize,
        }
    }

    pub(crate) fn authorize<'s>(&'s self, req: &Request<'_>) -> Decision<'s> {
        let mut d = Decision {
            allowed: true,
            reason: Reason::NoPolicies,
            custom: None,
            audit: Vec::new(),
            dry_run: Vec::new(),
            dry_run_allowed: None,
        };

        // AUDIT and dry-run: evaluated and reported, never enforced.
        if self.audit.policies > 0 {
            self.audit
                .for_each_match(&self.rules, req, Action::Audit, &mut |id| {
                    d.audit.push(self.matched(id))
                });
        }
        if self.dry_deny.policies + self.dry_allow.policies + self.dry_other.policies > 0 {
            let mut denied = false;
            let mut allow_matched = false;
            self.dry_deny
                .for_each_match(&self.rules, req, Action::Deny, &mut |id| {
                    denied = true;
                    d.dry_run.push(self.matched(id))
                });
            self.dry_allow
                .for_each_match(&self.rules, req, Action::Allow, &mut |id| {
                    allow_matched = true;
                    d.dry_run.push(self.matched(id))
                });
            self.dry_other
                .for_each_match(&self.rules, req, Action::Custom, &mut |id| {
                    d.dry_run.push(self.matched(id))
                });
            if self.dry_deny.policies + self.dry_allow.policies > 0 {
                d.dry_run_allowed =
                    Some(!denied && (self.dry_allow.policies == 0 || allow_matched));
            }
        }

        if !self.any_enforced {
            return d;
        }

        // CUSTOM first.
        if let Some(id) = self
            .bad_custom
            .first_match(&self.rules, req, Action::Custom)
        {
            d.allowed = false;
            d.reason = Reason::CustomProviderUnavailable(self.matched(id));
            return d;
        }
        if let Some(id) = self.custom.first_match(&self.rules, req, Action::Custom) {
            let m = self.matched(id);
            let provider = self.policies[self.rules[id as usize].policy as usize]
                .provider
                .as_deref()
                .unwrap_or_default();
            d.custom = Some(CustomCheck {
                provider,
                matched: m,
            });
        }
        // Then DENY.
        if let Some(id) = self.deny.first_match(&self.rules, req, Action::Deny) {
            d.allowed = false;
            d.reason = Reason::DenyMatched(self.matched(id));
            return d;
        }
        // Then ALLOW.
        if self.allow.policies == 0 {
            d.reason = Reason::NoAllowPolicies;
            return d;
        }
        match self.allow.first_match(&self.rules, req, Action::Allow) {
            Some(id) => d.reason = Reason::AllowMatched(self.matched(id)),
            None => {
                d.allowed = false;
                d.reason = Reason::NoAllowMatched;
            }
        }
        d
    }
}

impl crate::Snapshot {
    /// Decides a request (or a TCP connection) against the AuthorizationPolicies that apply to
    /// this workload. Does not allocate unless AUDIT or dry-run rules match or a header used by
    /// a rule has several values.
    pub fn authorize(&self, req: &Request<'_>) -> Decision<'_> {
        self.authz.authorize(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn str_match_kinds() {
        assert!(StrMatch::new("abc").matches("abc"));
        assert!(!StrMatch::new("abc").matches("abcd"));
        assert!(StrMatch::new("abc*").matches("abc"));
        assert!(StrMatch::new("abc*").matches("abcd"));
        assert!(!StrMatch::new("abc*").matches("xabc"));
        assert!(StrMatch::new("*abc").matches("xabc"));
        assert!(StrMatch::new("*abc").matches("abc"));
        assert!(StrMatch::new("*").matches("x"));
        assert!(!StrMatch::new("*").matches(""));
        assert!(!StrMatch::new("cert-manager.io").matches("cert-managerXio"));
        assert!(StrMatch::new("Example.COM").matches_ignore_case("example.com"));
        assert!(StrMatch::new("*.Example.com").matches_ignore_case("a.example.COM"));
        assert!(StrMatch::new("API.*").matches_ignore_case("api.x"));
    }

    /// Envoy's own vectors (test/extensions/path/uri_template_lib/uri_template_internal_test.cc,
    /// `GenPatternRegexWithMatch` / `GenPatternRegexWithoutMatch`, `PathGlobRegex`,
    /// `TextGlobRegex`), written in Istio's syntax: Envoy `*`/`{var}`/`{var=*}` is `{*}`,
    /// `**`/`{var=**}` is `{**}`. Cases with a suffix after an operator (`/**.m3u8`) are left
    /// out: istiod rejects them (`CheckValidPathTemplate`).
    #[test]
    fn templates_envoy_vectors() {
        let t = |tpl: &str, path: &str| PathMatch::new(tpl).matches(path);
        for (path, tpl) in [
            ("/media/eff456/ll-sd-out.js", "/media/{*}/{**}"),
            ("/api/v1/1234/broadcasts/get", "/api/{*}/{*}/{**}"),
            ("/api/v1/1234", "/api/{*}/{*}"),
            ("/api/v1/1234/", "/api/{*}/{*}/"),
            ("/v1/broadcasts/12345/live", "/v1/{**}"),
            (
                "/media/us/en/12334/subtitle_enUS_00101.vtt",
                "/media/{*}/{*}/{**}",
            ),
            ("/foo/bar/fo/fum/123", "/{*}/{*}/{*}/{*}/{*}"),
            ("/media/1234/hls/1001011.m3u8", "/media/{*}/{**}"),
            ("/media/1234/hls/1001011.m3u8", "/media/{**}"),
            (
                "/api/v1/projects/my-project/locations/global/edgeCacheOrigins/foo",
                "/api/{*}/projects/{*}/locations/{*}/{*}/{*}",
            ),
            ("/api/v1/foo/bar/baz/", "/api/{*}/{**}"),
            ("/api/v1/v2/v3", "/api/{*}/{*}/{*}"),
        ] {
            assert!(t(tpl, path), "{tpl} should match {path}");
        }
        for (path, tpl) in [
            ("/media/eff456/ll-sd-out.js", "/media/{*}"),
            ("/api/v1/1234/", "/api/{*}/v1/{*}"),
            ("/api/v1/1234/broadcasts/get", "/api/{*}/{*}/{*}"),
            ("/api/v1/1234/", "/api/{*}/v1/{**}"),
            // `*` is not in the operator's character set.
            ("/api/*/1234/", "/api/{*}/1234/"),
        ] {
            assert!(!t(tpl, path), "{tpl} should not match {path}");
        }
        // PathGlobRegex: not empty, no `/`, no `*`.
        assert!(t("/{*}", "/abc.123"));
        assert!(!t("/{*}", "/"));
        assert!(!t("/{*}", "/abc/123"));
        assert!(!t("/{*}", "/abc*123"));
        // TextGlobRegex: empty allowed, `/` allowed, no `*`.
        assert!(t("/{**}", "/"));
        assert!(t("/{**}", "/abc/123"));
        assert!(!t("/{**}", "/abc*123"));
        // `=` is in Envoy's set ("user included \"=\" allowed").
        assert!(t("/{*}", "/a=b"));
    }

    /// The `/` before `{**}` is literal, so the zero-segment case keeps it; text after `{**}`
    /// is a fixed suffix. A query or fragment never reaches the matcher (Envoy:
    /// `UriTemplateMatcher::match` matches `removeQueryAndFragment(path)`).
    #[test]
    fn templates_zero_segments_and_suffix() {
        let t = |tpl: &str, path: &str| PathMatch::new(tpl).matches(path);
        assert!(!t("/allow/admin/{**}", "/allow/admin"));
        assert!(t("/allow/admin/{**}", "/allow/admin/"));
        assert!(t("/allow/admin/{**}", "/allow/admin/x/y"));
        assert!(!t("/allow/admin/{**}", "/allow/adminx"));
        assert!(t("/a/{**}/b", "/a//b"));
        assert!(t("/a/{**}/b", "/a/x/y/b"));
        assert!(!t("/a/{**}/b", "/a/b"));
        assert!(!t("/a/{**}/b", "/a/x/bb"));
        assert!(t("/foo/{*}/bar/{**}", "/foo/buzz/bar/"));
        assert!(t("/foo/{*}/bar/{**}", "/foo/buzz/bar/baz/qux"));
        assert!(!t("/foo/{*}/bar/{**}", "/foo/buzz/bar"));
        assert!(!t("/foo/{*}", "/foo/"));
        assert!(t("/foo/{*}/", "/foo/x/"));
        assert!(!t("/foo/{*}/", "/foo/x"));
        assert!(!t("/foo/{*}", "foo/x"));
    }

    #[test]
    fn iss_sub() {
        let j = JwtClaims::new(serde_json::json!({"iss": "https://a.example", "sub": "user-1"}));
        for (v, want) in [
            ("*", true),
            ("https://a.example/user-1", true),
            ("https://a.example/*", true),
            ("*/user-1", true),
            ("*example/user-1", true),
            ("https://a.example/user*", true),
            // Split at the last `/`: issuer `https:/` exactly, any subject (istiod does this).
            ("https://*", false),
            ("*-1", true),
            ("https://a.example/user-2", false),
            ("https://b.example/*", false),
            ("*/user-2", false),
        ] {
            assert_eq!(IssSub::new(v).matches(&j), want, "{v}");
        }
    }

    #[test]
    fn principal_parts() {
        assert!(namespace_matches("td/ns/foo/sa/bar", "foo"));
        assert!(!namespace_matches("td/ns/foo/sa/bar", "fo"));
        assert!(namespace_matches("td/ns/foo/sa/bar", "f*"));
        // istiod turns every `*` into `.*` (`srcNamespaceGenerator`), which crosses `/`.
        assert!(namespace_matches("td/ns/foo/sa/bar", "*o"));
        assert!(namespace_matches("td/ns/foo/sa/bar", "f*o"));
        assert!(namespace_matches("td/ns/foo/sa/bar", "foo/sa*"));
        assert!(!namespace_matches("td/ns/foo/sa/bar", "bar"));
        // srcTrustDomainGenerator: prefix `spiffe://<td>/` or `spiffe://<a>[^/]*<b>/.*`.
        assert!(trust_domain_matches("td.example/ns/a/sa/b", "td.example"));
        assert!(!trust_domain_matches("td.example/ns/a/sa/b", "td"));
        assert!(trust_domain_matches("td.example/ns/a/sa/b", "*.example"));
        assert!(trust_domain_matches("td.example/ns/a/sa/b", "td.*"));
        assert!(!trust_domain_matches("td.example/ns/a/sa/b", "*.other"));
        assert!(trust_domain_matches("td.example/ns/a/sa/b", "*"));
        // A `when` value may hold `/` (istiod checks `/` only in `source.trustDomains`).
        assert!(trust_domain_matches(
            "td.example/ns/a/sa/b",
            "td.example/ns"
        ));
        assert!(service_account_matches("td/ns/foo/sa/bar", "foo", "bar"));
        assert!(!service_account_matches("td/ns/foo/sa/bar", "foo", "ba"));
        assert!(!service_account_matches("td/ns/foo/sa/barx", "foo", "bar"));
        assert!(service_account_matches(
            "td/ns/foo/x/sa/bar/y",
            "foo",
            "bar"
        ));
        assert!(!service_account_matches("td/ns/fooX/sa/bar", "foo", "bar"));
    }
}

/// Differential test against Envoy's own construction: the template becomes the regex
/// `"/" + segments joined with "/"`, `*` → `[a-zA-Z0-9-._~%!$&'()+,;:@=]+`, `**` →
/// `[a-zA-Z0-9-._~%!$&'()+,;:@=/]*`, literals quoted, full match
/// (source/extensions/path/uri_template_lib/uri_template_internal.cc, `toRegexPattern`).
#[cfg(test)]
mod template_vs_envoy_regex {
    use super::PathMatch;
    use proptest::prelude::*;

    const ONE: &str = r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]+";
    const ANY: &str = r"[a-zA-Z0-9\-._~%!$&'()+,;:@=/]*";

    fn templates() -> impl Strategy<Value = String> {
        let seg = prop_oneof![
            Just("a".to_string()),
            Just("b=c".to_string()),
            Just("%41".to_string()),
            Just("{*}".to_string()),
        ];
        (
            proptest::collection::vec(seg.clone(), 0..4),
            proptest::option::of(proptest::collection::vec(
                prop_oneof![Just("a".to_string()), Just("b".to_string())],
                0..3,
            )),
            any::<bool>(),
        )
            .prop_filter_map("a template", |(head, rest, slash)| {
                let mut segs = head;
                if let Some(tail) = rest {
                    segs.push("{**}".into());
                    segs.extend(tail);
                }
                if !segs.iter().any(|s| s.starts_with('{')) {
                    return None;
                }
                let mut t = format!("/{}", segs.join("/"));
                if slash {
                    t.push('/');
                }
                Some(t)
            })
    }

    fn paths() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just("a"),
                Just("b"),
                Just("b=c"),
                Just("/"),
                Just("*"),
                Just("%41"),
                Just("\""),
            ],
            0..8,
        )
        .prop_map(|p| format!("/{}", p.concat()))
    }

    fn envoy_regex(template: &str) -> regex::Regex {
        let body: Vec<String> = template[1..]
            .split('/')
            .map(|s| match s {
                "{*}" => ONE.to_string(),
                "{**}" => ANY.to_string(),
                lit => regex::escape(lit),
            })
            .collect();
        regex::Regex::new(&format!("^/{}$", body.join("/"))).unwrap()
    }

    proptest! {
        #[test]
        fn same_answer_as_envoys_regex(t in templates(), p in paths()) {
            prop_assert_eq!(
                PathMatch::new(&t).matches(&p),
                envoy_regex(&t).is_match(&p),
                "template {} path {}", t, p
            );
        }
    }
}
