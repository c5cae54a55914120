//! Validation as istiod's admission webhook does it (`pkg/config/validation/validation.go` and
//! `pkg/config/security/security.go` in istio/istio) and the CRD schema: an error is what
//! istiod rejects (the resource is refused). Where istiod accepts a form that can never do
//! what its author meant (a `spiffe://` principal, a literal `*`), the issue is a warning and
//! the resource loads, behaving as the sidecar does.
//!
//! Each check returns [`Issue`]s with the field path relative to `spec`.

use crate::crd::{
    Action, AuthorizationPolicySpec, MtlsModeSpec, Operation, PeerAuthenticationSpec,
    PolicyTargetReference, RequestAuthenticationSpec, Source, WorkloadSelector,
};
use crate::yaml::PathSeg;

/// One validation problem, at a path relative to `spec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Issue {
    pub path: Vec<PathSeg>,
    pub reason: String,
    /// A warning: istiod accepts the resource (it may warn too); Outrigger loads it and
    /// reports what it does with the construct. Otherwise the resource is refused.
    pub warning: bool,
}

#[derive(Default)]
struct Issues {
    out: Vec<Issue>,
}

impl Issues {
    fn push(&mut self, path: &[PathSeg], reason: impl Into<String>) {
        self.out.push(Issue {
            path: path.to_vec(),
            reason: reason.into(),
            warning: false,
        });
    }

    fn warn(&mut self, path: &[PathSeg], reason: impl Into<String>) {
        self.out.push(Issue {
            path: path.to_vec(),
            reason: reason.into(),
            warning: true,
        });
    }
}

fn k(s: &str) -> PathSeg {
    PathSeg::Key(s.to_string())
}

fn join(base: &[PathSeg], more: &[PathSeg]) -> Vec<PathSeg> {
    let mut v = base.to_vec();
    v.extend_from_slice(more);
    v
}

// ---------------------------------------------------------------------------------------------
// Shared value checks (also used when compiling policies).

/// Parses an `ipBlocks` entry: "Single IP (e.g. `203.0.113.4`) and CIDR (e.g. `203.0.113.0/24`)
/// are supported." Host bits under the mask are allowed (as Go's `netip.ParsePrefix`) and
/// ignored.
pub(crate) fn parse_ip_block(s: &str) -> Result<ipnet::IpNet, String> {
    if s.contains('/') {
        s.parse::<ipnet::IpNet>()
            .map(|n| n.trunc())
            .map_err(|_| format!("bad CIDR range `{s}`"))
    } else {
        s.parse::<std::net::IpAddr>()
            .map(ipnet::IpNet::from)
            .map_err(|_| format!("bad IP address `{s}`"))
    }
}

/// Parses a port value as Istio's `ValidatePorts`: a decimal number up to 65535.
pub(crate) fn parse_port(s: &str) -> Result<u16, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad port `{s}`: not a decimal number"));
    }
    s.parse::<u16>()
        .map_err(|_| format!("bad port `{s}`: must be at most 65535"))
}

/// Checks the position of `*` in a string match value.
///
/// Istio: "Any string field in the rule supports Exact, Prefix, Suffix and Presence match:
/// Exact match: `abc` will match on value `abc`. Prefix match: `abc*` will match on value `abc`
/// and `abcd`. Suffix match: `*abc` will match on value `abc` and `xabc`. Presence match: `*`
/// will match when value is not empty."
///
/// This is istiod's `CheckWildcardValues`, which it applies to trust domains only; in other
/// fields istiod accepts a `*` elsewhere (`a*b`) and matches it literally (a warning here).
pub(crate) fn check_wildcard(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("empty value not allowed".into());
    }
    let count = value.matches('*').count();
    if count == 0 || value == "*" {
        return Ok(());
    }
    if count > 1 {
        return Err(format!(
            "`{value}`: at most one wildcard `*` is allowed, at the start or the end"
        ));
    }
    if value.starts_with('*') || value.ends_with('*') {
        Ok(())
    } else {
        Err(format!(
            "`{value}`: a wildcard `*` is only allowed at the start (suffix match) or the end (prefix match)"
        ))
    }
}

/// Parses an RFC 3339 timestamp into a sortable UTC tuple (seconds precision, fraction kept).
pub(crate) fn parse_timestamp(s: &str) -> Option<(i64, u32)> {
    // YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(r) = rest.strip_prefix('.') {
        let digits = r.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        let frac = &r[..digits];
        nanos = frac.parse::<u32>().ok()? * 10u32.pow(9 - digits as u32);
        rest = &r[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(rest.as_bytes()[0], b'+' | b'-') => {
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            if rest.as_bytes()[3] != b':' {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if rest.starts_with('-') { -o } else { o }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let (yy, mm) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + se - offset, nanos))
}

// ---------------------------------------------------------------------------------------------
// Selectors and target references

fn selector(sel: &Option<WorkloadSelector>, issues: &mut Issues) {
    let Some(sel) = sel else { return };
    for (key, value) in &sel.match_labels {
        let path = [k("selector"), k("matchLabels"), k(key)];
        if key.is_empty() {
            issues.push(&path, "empty key is not supported in selector");
        }
        if key.contains('*') || value.contains('*') {
            issues.push(
                &path,
                format!("wildcard is not supported in selector: `{key}={value}`"),
            );
        }
        if value.len() > 63 {
            issues.push(&path, "a label value must be at most 63 characters");
        }
    }
    if sel.match_labels.is_empty() {
        // istiod's validateWorkloadSelector: a warning, and the selector then selects every
        // workload in the namespace.
        issues.warn(
            &[k("selector")],
            "workload selector specified without labels: it selects every workload",
        );
    }
}

fn one_of_selector(
    sel: &Option<WorkloadSelector>,
    target_ref: &Option<PolicyTargetReference>,
    target_refs: &[PolicyTargetReference],
    issues: &mut Issues,
) {
    let set = usize::from(sel.is_some())
        + usize::from(target_ref.is_some())
        + usize::from(!target_refs.is_empty());
    if set > 1 {
        issues.push(
            &[k("targetRefs")],
            "only one of targetRefs or workloadSelector can be set",
        );
    }
    if let Some(r) = target_ref {
        target_reference(r, &[k("targetRef")], issues);
    }
    if target_refs.len() > 16 {
        issues.push(&[k("targetRefs")], "at most 16 targetRefs are allowed");
    }
    for (i, r) in target_refs.iter().enumerate() {
        target_reference(r, &[k("targetRefs"), PathSeg::Index(i)], issues);
    }
}

fn target_reference(r: &PolicyTargetReference, path: &[PathSeg], issues: &mut Issues) {
    if r.name.is_empty() {
        issues.push(&join(path, &[k("name")]), "targetRef name must be set");
    }
    if !r.namespace.is_empty() {
        issues.push(
            &join(path, &[k("namespace")]),
            "targetRef namespace must not be set; cross namespace referencing is not supported",
        );
    }
    let group = if r.group.is_empty() {
        "core"
    } else {
        r.group.as_str()
    };
    let allowed = matches!(
        (group, r.kind.as_str()),
        ("core", "Service")
            | ("networking.istio.io", "ServiceEntry")
            | ("gateway.networking.k8s.io", "Gateway")
            | ("gateway.networking.k8s.io", "GatewayClass")
    );
    if !allowed {
        issues.push(
            &join(path, &[k("kind")]),
            format!(
                "targetRef must be to a core/Service, networking.istio.io/ServiceEntry, \
                 gateway.networking.k8s.io/Gateway or gateway.networking.k8s.io/GatewayClass, \
                 but was {}/{}",
                r.group, r.kind
            ),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// PeerAuthentication

pub(crate) fn peer_authentication(spec: &PeerAuthenticationSpec) -> Vec<Issue> {
    let mut issues = Issues::default();
    selector(&spec.selector, &mut issues);
    let empty_selector = spec
        .selector
        .as_ref()
        .is_none_or(|s| s.match_labels.is_empty());
    if let Some(ports) = &spec.port_level_mtls {
        if ports.is_empty() {
            issues.push(
                &[k("portLevelMtls")],
                "port level mTLS, if defined, must have at least one element",
            );
        } else if empty_selector {
            // "Port specific mutual TLS settings. These only apply when a workload selector is
            // specified."
            issues.push(
                &[k("portLevelMtls")],
                "mesh/namespace peer authentication cannot have port level mTLS \
                 (portLevelMtls requires a selector with matchLabels)",
            );
        }
        for port in ports.keys() {
            let ok = port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
            if !ok {
                issues.push(
                    &[k("portLevelMtls"), k(port)],
                    format!("port must be in range 1..65535, found `{port}`"),
                );
            }
        }
    }
    issues.out
}

/// Converts the spec enum (`UNSET` → `None`).
pub(crate) fn mode_of(m: MtlsModeSpec) -> Option<crate::MtlsMode> {
    match m {
        MtlsModeSpec::Unset => None,
        MtlsModeSpec::Disable => Some(crate::MtlsMode::Disable),
        MtlsModeSpec::Permissive => Some(crate::MtlsMode::Permissive),
        MtlsModeSpec::Strict => Some(crate::MtlsMode::Strict),
    }
}

// ---------------------------------------------------------------------------------------------
// AuthorizationPolicy

/// The `when` keys Istio documents (https://istio.io/latest/docs/reference/config/security/conditions/),
/// classified as istiod's model builder does (`pilot/pkg/security/authz/model/model.go`, `New`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConditionKey {
    RequestHeader(String),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourceServiceAccount,
    SourcePrincipal,
    SourceTrustDomain,
    RequestAuthPrincipal,
    RequestAuthAudiences,
    RequestAuthPresenter,
    /// The claim path: `request.auth.claims[a][b]` → `["a", "b"]`.
    RequestAuthClaims(Vec<String>),
    DestinationIp,
    DestinationPort,
    ConnectionSni,
    /// `experimental.envoy.filters.<filter>[<key>]`: Envoy dynamic metadata written by a named
    /// Envoy filter. Outrigger runs no Envoy filters, so the metadata is always absent and, as
    /// Envoy's metadata matcher does for absent metadata, `values` never match (and
    /// `notValues` always do).
    EnvoyFilterMetadata,
    /// A key istiod's validation accepts but its model builder cannot translate (e.g.
    /// `request.headersX[a]`: `extractNameInBrackets` fails). istiod then skips the whole
    /// rule in an ALLOW policy and drops the condition in DENY/AUDIT/CUSTOM policies
    /// (`model.go`, `checkError`); so does Outrigger.
    Untranslatable(String),
}

/// istiod's `validateMapKey`: `a[b]` with a non-empty `a` and `b`.
fn valid_map_key(key: &str) -> bool {
    match key.find('[') {
        Some(open) => key.ends_with(']') && open > 0 && open + 2 < key.len(),
        None => false,
    }
}

/// istiod's `extractNameInBrackets` (`pilot/pkg/security/authz/model/util.go`).
fn name_in_brackets(s: &str) -> Result<String, String> {
    match s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        Some(name) => Ok(name.to_string()),
        None => Err(format!("expecting format [<NAME>], but found {s}")),
    }
}

/// istiod's `extractNameInNestedBrackets` (`util.go`), including its fallback to
/// `extractNameInBrackets` for the whole string when a segment is not `[...]`.
fn names_in_nested_brackets(s: &str) -> Result<Vec<String>, String> {
    let b = s.as_bytes();
    let find_end = |begin: usize| -> Option<usize> {
        if b.get(begin) != Some(&b'[') {
            return None;
        }
        for (i, c) in b.iter().enumerate().skip(begin + 1) {
            match c {
                b'[' => return None,
                b']' => return Some(i),
                _ => {}
            }
        }
        None
    };
    let mut claims = Vec::new();
    let mut begin = 0;
    while begin < b.len() {
        match find_end(begin) {
            None => return name_in_brackets(s).map(|n| vec![n]),
            Some(end) => {
                claims.push(s[begin + 1..end].to_string());
                begin = end + 1;
            }
        }
    }
    Ok(claims)
}

/// Parses a `when` key as istiod's `security.ValidateAttribute` validates it (an `Err` is
/// what istiod rejects) and its model builder translates it.
pub(crate) fn parse_condition_key(key: &str) -> Result<ConditionKey, String> {
    let map_key = |prefix: &str| -> Result<&str, String> {
        if valid_map_key(key) {
            Ok(&key[prefix.len()..])
        } else {
            Err(format!("bad key ({key}): should have format a[b]"))
        }
    };
    if key.starts_with("request.headers") {
        let rest = map_key("request.headers")?;
        return Ok(match name_in_brackets(rest) {
            // Envoy's header matcher compares lower-cased names.
            Ok(h) => ConditionKey::RequestHeader(h.to_ascii_lowercase()),
            Err(e) => ConditionKey::Untranslatable(e),
        });
    }
    if key.starts_with("request.auth.claims") {
        let rest = map_key("request.auth.claims")?;
        return Ok(match names_in_nested_brackets(rest) {
            Ok(path) => ConditionKey::RequestAuthClaims(path),
            Err(e) => ConditionKey::Untranslatable(e),
        });
    }
    if key.starts_with("experimental.envoy.filters.") {
        map_key("experimental.envoy.filters.")?;
        return Ok(ConditionKey::EnvoyFilterMetadata);
    }
    Ok(match key {
        "source.ip" => ConditionKey::SourceIp,
        "remote.ip" => ConditionKey::RemoteIp,
        "source.namespace" => ConditionKey::SourceNamespace,
        "source.serviceAccount" => ConditionKey::SourceServiceAccount,
        "source.principal" => ConditionKey::SourcePrincipal,
        "source.trustDomain" => ConditionKey::SourceTrustDomain,
        "request.auth.principal" => ConditionKey::RequestAuthPrincipal,
        "request.auth.audiences" => ConditionKey::RequestAuthAudiences,
        "request.auth.presenter" => ConditionKey::RequestAuthPresenter,
        "destination.ip" => ConditionKey::DestinationIp,
        "destination.port" => ConditionKey::DestinationPort,
        "connection.sni" => ConditionKey::ConnectionSni,
        "destination.namespace" => {
            return Err(format!(
                "attribute {key} is replaced by the metadata.namespace"
            ));
        }
        "destination.name" | "destination.user" => {
            return Err(format!(
                "deprecated attribute {key}: only supported in v1alpha1"
            ));
        }
        _ if key.starts_with("destination.labels") => {
            return Err(format!(
                "attribute {key} is replaced by the workload selector"
            ));
        }
        _ => return Err(format!("unknown attribute: {key}")),
    })
}

/// A `*` elsewhere than at the start or the end: istiod accepts it and Envoy then matches it
/// literally (`matcher.StringMatcher`: exact unless the value starts or ends with `*`).
fn literal_star(v: &str) -> bool {
    if v == "*" {
        return false;
    }
    let rest = v
        .strip_prefix('*')
        .or_else(|| v.strip_suffix('*'))
        .unwrap_or(v);
    rest.contains('*')
}

/// istiod's `CheckEmptyValues`, plus a warning for values Envoy matches literally.
fn string_values(values: &[String], path: &[PathSeg], field: &str, issues: &mut Issues) {
    for (i, v) in values.iter().enumerate() {
        let p = join(path, &[k(field), PathSeg::Index(i)]);
        if v.is_empty() {
            issues.push(&p, format!("empty value not allowed, found in {field}"));
        } else if literal_star(v) {
            issues.warn(
                &p,
                format!(
                    "`{v}`: a `*` that is not the first or last character is matched literally \
                     (only exact, `prefix*`, `*suffix` and `*` are wildcards)"
                ),
            );
        }
    }
}

/// `principals`/`notPrincipals`: istiod checks only that values are not empty
/// (`CheckEmptyValues`) and generates `spiffe://` + the value (`StringMatcherWithPrefix`),
/// so a value written with `spiffe://` is loaded and never matches.
fn principal_values(values: &[String], path: &[PathSeg], field: &str, issues: &mut Issues) {
    string_values(values, path, field, issues);
    for (i, v) in values.iter().enumerate() {
        if v.starts_with("spiffe://") {
            issues.warn(
                &join(path, &[k(field), PathSeg::Index(i)]),
                format!(
                    "`{v}`: principals are written without `spiffe://` (e.g. \
                     `cluster.local/ns/default/sa/sleep`); istiod prefixes `spiffe://` itself, \
                     so this value never matches"
                ),
            );
        }
    }
}

/// `namespaces`: istiod checks only that values are not empty; every `*` is a wildcard
/// (`srcNamespaceGenerator`: regex `.*/ns/<glob>/.*`).
fn namespace_values(values: &[String], path: &[PathSeg], field: &str, issues: &mut Issues) {
    for (i, v) in values.iter().enumerate() {
        if v.is_empty() {
            issues.push(
                &join(path, &[k(field), PathSeg::Index(i)]),
                format!("empty value not allowed, found in {field}"),
            );
        }
    }
}

/// istiod's `ValidateIPs` (with `CheckEmptyValues`).
fn ip_values(values: &[String], path: &[PathSeg], field: &str, issues: &mut Issues) {
    for (i, v) in values.iter().enumerate() {
        let p = join(path, &[k(field), PathSeg::Index(i)]);
        if v.is_empty() {
            issues.push(&p, format!("empty value not allowed, found in {field}"));
        } else if let Err(e) = parse_ip_block(v) {
            issues.push(&p, e);
        }
    }
}

/// istiod's `ValidatePorts`.
fn port_values(values: &[String], path: &[PathSeg], field: &str, issues: &mut Issues) {
    for (i, v) in values.iter().enumerate() {
        if let Err(e) = parse_port(v) {
            issues.push(&join(path, &[k(field), PathSeg::Index(i)]), e);
        }
    }
}

/// istiod's `CheckServiceAccount`.
pub(crate) fn check_service_account(v: &str) -> Result<(), String> {
    let fmt_err =
        || format!("expected format 'serviceAccount' or 'namespace/serviceAccount', found `{v}`");
    if v.is_empty() {
        return Err("empty value not allowed".into());
    }
    if v.contains('*') {
        return Err("wildcard not allowed".into());
    }
    if v.matches('/').count() > 1 {
        return Err(fmt_err());
    }
    if v.len() > 320 {
        return Err("value cannot exceed 320 characters".into());
    }
    match v.split_once('/') {
        Some((ns, sa)) if ns.is_empty() || sa.is_empty() => Err(fmt_err()),
        _ => Ok(()),
    }
}

fn service_account_values(values: &[String], path: &[PathSeg], field: &str, issues: &mut Issues) {
    if values.len() > 16 {
        issues.push(&join(path, &[k(field)]), "may not have more than 16 values");
    }
    for (i, v) in values.iter().enumerate() {
        if let Err(e) = check_service_account(v) {
            issues.push(
                &join(path, &[k(field), PathSeg::Index(i)]),
                format!("{e}, found in {field}"),
            );
        }
    }
}

/// istiod's `CheckTrustDomainValues`.
fn trust_domain_values(values: &[String], path: &[PathSeg], field: &str, issues: &mut Issues) {
    for (i, v) in values.iter().enumerate() {
        let p = join(path, &[k(field), PathSeg::Index(i)]);
        if let Err(e) = check_wildcard(v) {
            issues.push(&p, format!("{e}, found in {field}"));
        } else if v.contains('/') {
            issues.push(
                &p,
                format!("trust domain must not contain '/', found in {field}: `{v}`"),
            );
        }
    }
}

/// Validates a `paths`/`notPaths` value as istiod's `CheckValidPathTemplate`
/// (`pkg/config/security/security.go`) does, and a template as Envoy's URI template parser
/// (`parsePathPatternSyntax` in `uri_template_internal.cc`) would after istiod's
/// `sanitizePathTemplate` (`{*}` → `*`, `{**}` → `**`). A template istiod accepts and Envoy
/// rejects makes the sidecar refuse (NACK) the listener; Outrigger refuses the resource.
pub(crate) fn check_path_value(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty value not allowed".into());
    }
    let is_template = path.contains("{*}") || path.contains("{**}");
    let mut seen_any = false;
    for glob in path.trim_matches('/').split('/') {
        match glob {
            "{*}" if !seen_any => continue,
            "{**}" if !seen_any => {
                seen_any = true;
                continue;
            }
            "{*}" | "{**}" => {
                return Err(format!(
                    "invalid or unsupported path {path}: {{**}} is not the last operator"
                ));
            }
            _ => {}
        }
        if glob.contains(['{', '}']) {
            return Err(format!(
                "invalid or unsupported path {path}: contains '{{' or '}}' beyond a supported \
                 path template"
            ));
        }
        // istiod's `validLiteral`: `^[a-zA-Z0-9-._~%!$&'()+,;:@=]+$`.
        let valid_literal = !glob.is_empty()
            && glob
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b));
        if is_template && !valid_literal {
            return Err(format!(
                "invalid or unsupported path {path}: contains segment `{glob}` with invalid \
                 string literal"
            ));
        }
    }
    if is_template {
        // Envoy: the template must match `^/[[:graph:]]*$` and must not hold `//`
        // ("Double slashes (/) detected in uri_template, this is not allowed.").
        if !path.starts_with('/') {
            return Err(format!(
                "path template {path} does not start with `/`: istiod accepts it but Envoy's \
                 URI template parser rejects it (the sidecar would refuse the configuration)"
            ));
        }
        if path.contains("//") {
            return Err(format!(
                "path template {path} contains `//`: istiod accepts it but Envoy's URI \
                 template parser rejects it (the sidecar would refuse the configuration)"
            ));
        }
    }
    Ok(())
}

fn path_values(values: &[String], path: &[PathSeg], field: &str, issues: &mut Issues) {
    for (i, v) in values.iter().enumerate() {
        let p = join(path, &[k(field), PathSeg::Index(i)]);
        if let Err(e) = check_path_value(v) {
            issues.push(&p, format!("{e}, found in {field}"));
        } else if !v.contains("{*}") && !v.contains("{**}") && literal_star(v) {
            issues.warn(
                &p,
                format!(
                    "`{v}`: a `*` that is not the first or last character is matched literally \
                     (use `{{*}}`/`{{**}}` path templates for segments)"
                ),
            );
        }
    }
}

/// Whether a `from.source` sets an attribute a TCP connection has (istiod's
/// `tcpRulesInFrom`).
fn source_has_tcp_fields(src: &Source) -> bool {
    !(src.principals.is_empty()
        && src.not_principals.is_empty()
        && src.ip_blocks.is_empty()
        && src.not_ip_blocks.is_empty()
        && src.namespaces.is_empty()
        && src.not_namespaces.is_empty()
        && src.remote_ip_blocks.is_empty()
        && src.not_remote_ip_blocks.is_empty()
        && src.service_accounts.is_empty()
        && src.not_service_accounts.is_empty())
}

fn source(src: &Source, path: &[PathSeg], action: Action, issues: &mut Issues) {
    let identity_fields = src.principals.len()
        + src.not_principals.len()
        + src.namespaces.len()
        + src.not_namespaces.len();
    if identity_fields > 0 && src.service_accounts.len() + src.not_service_accounts.len() > 0 {
        issues.push(
            &join(path, &[k("serviceAccounts")]),
            "cannot set serviceAccounts with namespaces or principals",
        );
    }
    let total = identity_fields
        + src.request_principals.len()
        + src.not_request_principals.len()
        + src.ip_blocks.len()
        + src.not_ip_blocks.len()
        + src.remote_ip_blocks.len()
        + src.not_remote_ip_blocks.len()
        + src.service_accounts.len()
        + src.not_service_accounts.len()
        + src.trust_domains.len()
        + src.not_trust_domains.len();
    if total == 0 {
        issues.push(path, "`from.source` must not be empty");
    }
    principal_values(&src.principals, path, "principals", issues);
    principal_values(&src.not_principals, path, "notPrincipals", issues);
    string_values(&src.request_principals, path, "requestPrincipals", issues);
    string_values(
        &src.not_request_principals,
        path,
        "notRequestPrincipals",
        issues,
    );
    namespace_values(&src.namespaces, path, "namespaces", issues);
    namespace_values(&src.not_namespaces, path, "notNamespaces", issues);
    service_account_values(&src.service_accounts, path, "serviceAccounts", issues);
    service_account_values(
        &src.not_service_accounts,
        path,
        "notServiceAccounts",
        issues,
    );
    ip_values(&src.ip_blocks, path, "ipBlocks", issues);
    ip_values(&src.not_ip_blocks, path, "notIpBlocks", issues);
    ip_values(&src.remote_ip_blocks, path, "remoteIpBlocks", issues);
    ip_values(&src.not_remote_ip_blocks, path, "notRemoteIpBlocks", issues);
    trust_domain_values(&src.trust_domains, path, "trustDomains", issues);
    trust_domain_values(&src.not_trust_domains, path, "notTrustDomains", issues);
    if action == Action::Custom {
        for (field, n) in [
            ("namespaces", src.namespaces.len()),
            ("notNamespaces", src.not_namespaces.len()),
            ("serviceAccounts", src.service_accounts.len()),
            ("notServiceAccounts", src.not_service_accounts.len()),
            ("trustDomains", src.trust_domains.len()),
            ("notTrustDomains", src.not_trust_domains.len()),
            ("principals", src.principals.len()),
            ("notPrincipals", src.not_principals.len()),
            ("requestPrincipals", src.request_principals.len()),
            ("notRequestPrincipals", src.not_request_principals.len()),
        ] {
            if n > 0 {
                issues.push(
                    &join(path, &[k(field)]),
                    format!("{field} is currently not supported with CUSTOM action"),
                );
            }
        }
    }
}

fn operation(op: &Operation, path: &[PathSeg], issues: &mut Issues) {
    let total = op.hosts.len()
        + op.not_hosts.len()
        + op.ports.len()
        + op.not_ports.len()
        + op.methods.len()
        + op.not_methods.len()
        + op.paths.len()
        + op.not_paths.len();
    if total == 0 {
        issues.push(path, "`to.operation` must not be empty");
    }
    string_values(&op.hosts, path, "hosts", issues);
    string_values(&op.not_hosts, path, "notHosts", issues);
    port_values(&op.ports, path, "ports", issues);
    port_values(&op.not_ports, path, "notPorts", issues);
    string_values(&op.methods, path, "methods", issues);
    string_values(&op.not_methods, path, "notMethods", issues);
    path_values(&op.paths, path, "paths", issues);
    path_values(&op.not_paths, path, "notPaths", issues);
}

/// Validates one `when` value for its key, as istiod's `ValidateAttribute`.
pub(crate) fn check_condition_value(key: &ConditionKey, v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Err("empty value not allowed".into());
    }
    match key {
        ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => {
            parse_ip_block(v).map(|_| ())
        }
        ConditionKey::DestinationPort => parse_port(v).map(|_| ()),
        ConditionKey::SourceServiceAccount => check_service_account(v),
        // `CheckWildcardValues` (the `/` check is only for `source.trustDomains`).
        ConditionKey::SourceTrustDomain => check_wildcard(v),
        _ => Ok(()),
    }
}

pub(crate) fn authorization_policy(spec: &AuthorizationPolicySpec) -> Vec<Issue> {
    let mut issues = Issues::default();
    one_of_selector(
        &spec.selector,
        &spec.target_ref,
        &spec.target_refs,
        &mut issues,
    );
    selector(&spec.selector, &mut issues);

    match spec.action {
        Action::Custom => {
            if spec.rules.is_empty() {
                issues.push(
                    &[k("rules")],
                    "CUSTOM action without `rules` is meaningless as it will never be triggered, \
                     add an empty rule `{}` if you want it be triggered for every request",
                );
            } else if spec.provider.as_ref().is_none_or(|p| p.name.is_empty()) {
                issues.push(
                    &[k("provider"), k("name")],
                    "`provider.name` must not be empty",
                );
            }
        }
        action => {
            if spec.provider.is_some() {
                issues.push(
                    &[k("provider")],
                    format!("`provider` must not be with non CUSTOM action, found {action}"),
                );
            }
        }
    }
    if spec.action == Action::Deny && spec.rules.is_empty() {
        issues.push(
            &[k("rules")],
            "DENY action without `rules` is meaningless as it will never be triggered, \
             add an empty rule `{}` if you want it be triggered for every request",
        );
    }
    if spec.rules.len() > 512 {
        issues.push(&[k("rules")], "at most 512 rules are allowed");
    }

    for (i, rule) in spec.rules.iter().enumerate() {
        let rp = [k("rules"), PathSeg::Index(i)];
        if let Some(from) = &rule.from {
            if from.is_empty() {
                issues.push(&join(&rp, &[k("from")]), "`from` must not be empty");
            }
            for (j, f) in from.iter().enumerate() {
                let fp = join(&rp, &[k("from"), PathSeg::Index(j), k("source")]);
                match &f.source {
                    None => issues.push(&fp, "`from.source` must not be nil"),
                    Some(src) => source(src, &fp, spec.action, &mut issues),
                }
            }
        }
        if let Some(to) = &rule.to {
            if to.is_empty() {
                issues.push(&join(&rp, &[k("to")]), "`to` must not be empty");
            }
            for (j, t) in to.iter().enumerate() {
                let tp = join(&rp, &[k("to"), PathSeg::Index(j), k("operation")]);
                match &t.operation {
                    None => issues.push(&tp, "`to.operation` must not be nil"),
                    Some(op) => operation(op, &tp, &mut issues),
                }
            }
        }
        for (j, cond) in rule.when.iter().enumerate() {
            let cp = join(&rp, &[k("when"), PathSeg::Index(j)]);
            if cond.key.is_empty() {
                issues.push(&join(&cp, &[k("key")]), "`key` must not be empty");
                continue;
            }
            let key = match parse_condition_key(&cond.key) {
                Ok(key) => key,
                Err(e) => {
                    issues.push(&join(&cp, &[k("key")]), e);
                    continue;
                }
            };
            match &key {
                ConditionKey::EnvoyFilterMetadata => issues.warn(
                    &join(&cp, &[k("key")]),
                    format!(
                        "{}: Envoy filter metadata does not exist in Outrigger (no Envoy filter \
                         chain); as in Envoy when the metadata is absent, `values` never match \
                         and `notValues` always match",
                        cond.key
                    ),
                ),
                ConditionKey::Untranslatable(e) => issues.warn(
                    &join(&cp, &[k("key")]),
                    format!(
                        "{}: istiod accepts this key but cannot translate it ({e}); as istiod \
                         does, the rule never matches in an ALLOW policy and the condition is \
                         ignored in a {} policy",
                        cond.key, spec.action
                    ),
                ),
                _ => {}
            }
            if cond.values.is_empty() && cond.not_values.is_empty() {
                issues.push(
                    &cp,
                    format!(
                        "at least one of `values` or `notValues` must be set for key {}",
                        cond.key
                    ),
                );
            }
            if spec.action == Action::Custom
                && matches!(
                    key,
                    ConditionKey::SourceNamespace
                        | ConditionKey::SourceServiceAccount
                        | ConditionKey::SourceTrustDomain
                        | ConditionKey::SourcePrincipal
                        | ConditionKey::RequestAuthPrincipal
                        | ConditionKey::RequestAuthAudiences
                        | ConditionKey::RequestAuthPresenter
                        | ConditionKey::RequestAuthClaims(_)
                )
            {
                issues.push(
                    &join(&cp, &[k("key")]),
                    format!("{} is currently not supported with CUSTOM action", cond.key),
                );
            }
            for (field, values) in [("values", &cond.values), ("notValues", &cond.not_values)] {
                for (n, v) in values.iter().enumerate() {
                    if let Err(e) = check_condition_value(&key, v) {
                        issues.push(
                            &join(&cp, &[k(field), PathSeg::Index(n)]),
                            format!("invalid value for key {}: {e}", cond.key),
                        );
                    } else if key == ConditionKey::SourcePrincipal && v.starts_with("spiffe://") {
                        issues.warn(
                            &join(&cp, &[k(field), PathSeg::Index(n)]),
                            format!(
                                "`{v}`: principals are written without `spiffe://`; istiod \
                                 prefixes `spiffe://` itself, so this value never matches"
                            ),
                        );
                    }
                }
            }
        }
        // istiod's warning for a DENY rule that only uses HTTP attributes.
        let sources: Vec<&Source> = rule
            .from
            .iter()
            .flatten()
            .filter_map(|f| f.source.as_ref())
            .collect();
        let ops: Vec<&Operation> = rule
            .to
            .iter()
            .flatten()
            .filter_map(|t| t.operation.as_ref())
            .collect();
        let tcp_in_from = sources.iter().any(|s| source_has_tcp_fields(s));
        let tcp_in_to = ops
            .iter()
            .any(|o| !o.ports.is_empty() || !o.not_ports.is_empty());
        if spec.action == Action::Deny
            && ((!sources.is_empty() && ops.is_empty() && !tcp_in_from)
                || (!ops.is_empty() && !tcp_in_to))
        {
            issues.warn(
                &rp,
                "configured AuthorizationPolicy will deny all traffic to TCP ports under its \
                 scope due to the use of only HTTP attributes in a DENY rule; it is recommended \
                 to explicitly specify the port",
            );
        }
    }
    issues.out
}

// ---------------------------------------------------------------------------------------------
// RequestAuthentication

fn valid_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `name` if it is an HTTP field name (RFC 9110 `token`).
fn http_token(name: &str) -> Option<&str> {
    (!name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)))
    .then_some(name)
}

/// The host of a `jwksUri` as istiod's `security.ParseJwksURI` accepts it (istio/istio
/// pkg/config/security/security.go): Go's `url.Parse` must succeed, the scheme (which Go
/// lowercases) must be `http` or `https`, and a port, when written, must be a number. The host
/// itself is not checked (it may be empty).
fn jwks_uri_host(uri: &str) -> Result<&str, String> {
    if uri.bytes().any(|b| b < 0x20 || b == 0x7f || b == b' ') {
        return Err("url.Parse: invalid character in URL".into());
    }
    let Some((scheme, rest)) = uri.split_once(':') else {
        return Err("URI scheme \"\" is not supported".into());
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(format!(
            "URI scheme {:?} is not supported",
            scheme.to_ascii_lowercase()
        ));
    }
    let Some(rest) = rest.strip_prefix("//") else {
        // `https:foo` parses (an opaque URL) with no host.
        return Ok("");
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match hostport.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, after)) => (h, after.strip_prefix(':')),
            None => return Err("url.Parse: missing ']' in host".into()),
        },
        None => match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        },
    };
    if let Some(p) = port
        && !p.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!(
            "url.Parse: invalid port {:?} after host",
            format!(":{p}")
        ));
    }
    if port.is_some_and(|p| !p.is_empty() && p.parse::<u64>().is_err()) {
        return Err("strconv.Atoi: value out of range".into());
    }
    Ok(host)
}

pub(crate) fn request_authentication(spec: &RequestAuthenticationSpec) -> Vec<Issue> {
    let mut issues = Issues::default();
    one_of_selector(
        &spec.selector,
        &spec.target_ref,
        &spec.target_refs,
        &mut issues,
    );
    selector(&spec.selector, &mut issues);
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        let rp = [k("jwtRules"), PathSeg::Index(i)];
        for (j, a) in rule.audiences.iter().enumerate() {
            if a.is_empty() {
                issues.push(
                    &join(&rp, &[k("audiences"), PathSeg::Index(j)]),
                    "audience must be non-empty string",
                );
            }
        }
        if rule.issuer.is_empty() && rule.jwks_uri.is_empty() {
            issues.push(
                &join(&rp, &[k("issuer")]),
                "issuer or jwksUri must be non-empty string",
            );
        }
        if !rule.jwks_uri.is_empty() {
            let at = join(&rp, &[k("jwksUri")]);
            match jwks_uri_host(&rule.jwks_uri) {
                Err(reason) => issues.push(&at, format!("`{}`: {reason}", rule.jwks_uri)),
                // istiod accepts it (Go's url.Parse gives an empty host, nothing checks it);
                // no key set can be fetched from it, so its tokens are refused.
                Ok("") => issues.warn(
                    &at,
                    format!(
                        "`{}` has no host: its key set can never be fetched, so every token of this issuer is refused (Jwks remote fetch is failed)",
                        rule.jwks_uri
                    ),
                ),
                Ok(_) => {}
            }
        }
        if !rule.jwks.is_empty() {
            if !rule.jwks_uri.is_empty() {
                issues.push(
                    &join(&rp, &[k("jwks")]),
                    "only one of jwks or jwksUri can be set",
                );
            }
            match serde_json::from_str::<serde_json::Value>(&rule.jwks) {
                Ok(serde_json::Value::Object(m))
                    if m.get("keys").is_some_and(serde_json::Value::is_array)
                        || m.contains_key("kty") => {}
                Ok(_) => issues.push(
                    &join(&rp, &[k("jwks")]),
                    "jwks parse error: expected a JSON Web Key Set object with `keys` (or one JWK)",
                ),
                Err(e) => issues.push(&join(&rp, &[k("jwks")]), format!("jwks parse error: {e}")),
            }
        }
        for (j, h) in rule.from_headers.iter().enumerate() {
            if h.name.is_empty() {
                issues.push(
                    &join(&rp, &[k("fromHeaders"), PathSeg::Index(j), k("name")]),
                    "location header name must be non-empty string",
                );
            }
        }
        for (j, p) in rule.from_params.iter().enumerate() {
            if p.is_empty() {
                issues.push(
                    &join(&rp, &[k("fromParams"), PathSeg::Index(j)]),
                    "location query must be non-empty string",
                );
            }
        }
        for (j, c) in rule.from_cookies.iter().enumerate() {
            if c.is_empty() {
                issues.push(
                    &join(&rp, &[k("fromCookies"), PathSeg::Index(j)]),
                    "cookie name must be non-empty string",
                );
            }
        }
        for (j, c) in rule.output_claim_to_headers.iter().enumerate() {
            let p = join(&rp, &[k("outputClaimToHeaders"), PathSeg::Index(j)]);
            if c.claim.is_empty() || c.header.is_empty() {
                issues.push(
                    &p,
                    "outputClaimToHeaders header and claim value must be non-empty string",
                );
            } else if !valid_header_name(&c.header) {
                issues.push(
                    &join(&p, &[k("header")]),
                    format!("`{}` is not a valid header name ([-_A-Za-z0-9]+)", c.header),
                );
            }
        }
        // istiod does not validate `outputPayloadToHeader` at all; a name that is not an HTTP
        // header name cannot be written, so it is accepted with a warning.
        if !rule.output_payload_to_header.is_empty()
            && http_token(&rule.output_payload_to_header).is_none()
        {
            issues.warn(
                &join(&rp, &[k("outputPayloadToHeader")]),
                format!(
                    "`{}` is not an HTTP header name: the payload is not forwarded",
                    rule.output_payload_to_header
                ),
            );
        }
        // The value was parsed at load (Go's time.ParseDuration, as istiod's jsonpb does);
        // istiod then validates it with `agent.ValidateDuration` (istio/istio
        // pkg/config/validation/agent: "duration must be greater than 1ms", "only durations to
        // ms precision are supported").
        if let Some(t) = rule.timeout {
            let ns = t.as_nanos();
            if ns < 1_000_000 {
                issues.push(
                    &join(&rp, &[k("timeout")]),
                    format!("`{t}`: duration must be greater than 1ms"),
                );
            } else if ns % 1_000_000 != 0 {
                issues.push(
                    &join(&rp, &[k("timeout")]),
                    format!("`{t}`: only durations to ms precision are supported"),
                );
            }
        }
        for (j, c) in rule.space_delimited_claims.iter().enumerate() {
            if c.is_empty() {
                issues.push(
                    &join(&rp, &[k("spaceDelimitedClaims"), PathSeg::Index(j)]),
                    "claim name must be non-empty string",
                );
            }
        }
    }
    issues.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        for ok in ["*", "abc*", "*abc", "a.b", "/a/b"] {
            assert!(check_wildcard(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a*b", "**", "*a*", "a**"] {
            assert!(check_wildcard(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps_sort() {
        let a = parse_timestamp("2024-05-01T10:00:00Z").unwrap();
        let b = parse_timestamp("2024-05-01T12:00:00+01:00").unwrap();
        let c = parse_timestamp("2024-05-01T10:00:00.5Z").unwrap();
        assert!(a < b && a < c && c < b);
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert!(parse_timestamp("yesterday").is_none());
        assert!(parse_timestamp("2024-13-01T10:00:00Z").is_none());
    }

    /// `when` keys as istiod's `ValidateAttribute` (pkg/config/security/security.go) accepts
    /// them and its model builder (`model.go`, `util.go`) translates them.
    #[test]
    fn condition_keys() {
        assert_eq!(
            parse_condition_key("request.headers[X-Foo]"),
            Ok(ConditionKey::RequestHeader("x-foo".into()))
        );
        assert_eq!(
            parse_condition_key("request.auth.claims[a][b]"),
            Ok(ConditionKey::RequestAuthClaims(vec![
                "a".into(),
                "b".into()
            ]))
        );
        // `extractNameInNestedBrackets` falls back to the whole `[...]`.
        assert_eq!(
            parse_condition_key("request.auth.claims[a]b]"),
            Ok(ConditionKey::RequestAuthClaims(vec!["a]b".into()]))
        );
        // Accepted by istiod's validation (`validateMapKey`), untranslatable by its builder.
        assert!(matches!(
            parse_condition_key("request.headersX[a]"),
            Ok(ConditionKey::Untranslatable(_))
        ));
        assert_eq!(
            parse_condition_key("experimental.envoy.filters.network.mysql_proxy[db.table]"),
            Ok(ConditionKey::EnvoyFilterMetadata)
        );
        // Rejected by istiod.
        for bad in [
            "request.headers",
            "request.headers[]",
            "request.auth.claims[]",
            "destination.labels[app]",
            "destination.namespace",
            "destination.user",
            "source.nope",
            "experimental.envoy.filters.x",
        ] {
            assert!(parse_condition_key(bad).is_err(), "{bad}");
        }
    }

    /// istiod's own `CheckValidPathTemplate` vectors (pkg/config/security/security_test.go,
    /// `TestCheckValidPathTemplate`), plus templates istiod accepts and Envoy's parser
    /// rejects (no leading `/`, `//`: `parsePathPatternSyntax`), which Outrigger refuses.
    #[test]
    fn path_templates() {
        for ok in [
            "/{*}/foo",
            "/{*}/foo/",
            "/foo/{**}/bar",
            "/foo/bar/{**}",
            "/foo/{*}/bar/{**}",
            "/{**}",
            // Not templates: ordinary string matches.
            "/a*",
            "*/x",
            "/a*b",
            "/foo=bar/{*}",
        ] {
            assert!(check_path_value(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/foo/{**}buzz/bar",
            "/{*}/foo/{}/bar",
            "/foo/{*}/bar/*",
            "/foo/{*}/bar/**/buzz",
            "/foo/{buzz}/bar",
            "/{buzz}",
            "/foo/{buzz}/bar/{**}",
            "/foo/{buzz=*}/bar/{**}",
            "/{*}/foo/{buzz=**}/bar",
            "/{*}/foo/{**}bar",
            "/{*}/foo/{*}.txt",
            "/{*}/foo/{temp",
            "/{*}/foo/temp}/bar",
            "/{*}/foo/temp}/*",
            "/{**}/foo/temp/{*}/bar",
            "/{**}/{**}",
            "/{**}/foo/temp/{**}/bar",
            "/{*}/foo/?abc",
            // Envoy rejects what istiod lets through.
            "foo/{*}",
            "/foo/{*}//",
            "//foo/{*}",
            "",
        ] {
            assert!(check_path_value(bad).is_err(), "{bad}");
        }
    }
}
