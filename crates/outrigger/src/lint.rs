//! `outrigger lint`: Istio's security pitfalls in a directory of policy YAML (and, with
//! `--config`, in the agent configuration), found before traffic finds them. Each finding has an
//! id, a severity, the file:line of the resource, why it matters and the fix; output as text,
//! JSON or SARIF 2.1.0 (so CI systems show findings inline).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use outrigger_policy::crd::{AuthorizationPolicySpec, MtlsModeSpec, Rule};
use outrigger_policy::{Action, Resource, ResourceKind};

use crate::config::{AgentConfig, CertificatesConfig};
use crate::policy_files;

pub const AFTER_HELP: &str = "\
Examples:
  outrigger lint policies/
  outrigger lint --config agent.yaml --format sarif > lint.sarif
  outrigger lint k8s/security/ --fail-on error

Without --config, the files given are linted (directories recursively: *.yaml, *.yml, *.json).
With --config, the agent configuration's policy paths (unless paths are given), its listeners,
admin address, default mTLS mode and certificate are checked too, and the findings are for this
workload.

Exit status: 0 no finding at or above --fail-on; 1 findings; 2 usage error; 3 could not lint.";

#[derive(Args)]
pub struct LintArgs {
    /// Policy files or directories (default with --config: the configuration's policy paths).
    #[arg(value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// The agent configuration: adds the workload, its listeners and certificate to the checks.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// The lowest severity that makes the exit status 1.
    #[arg(long, value_enum, default_value_t = Severity::Warning)]
    fail_on: Severity,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
    Sarif,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Note,
    Warning,
    Error,
}

impl Severity {
    fn sarif(self) -> &'static str {
        match self {
            Severity::Note => "note",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// A kind of finding: what it is, why it matters, how to fix it.
pub struct Check {
    pub id: &'static str,
    pub name: &'static str,
    pub severity: Severity,
    pub why: &'static str,
    pub fix: &'static str,
}

macro_rules! rules {
    ($($c:ident = $id:literal, $name:literal, $sev:ident, $why:literal, $fix:literal;)*) => {
        $(pub const $c: Check = Check { id: $id, name: $name, severity: Severity::$sev, why: $why, fix: $fix };)*
        pub const ALL: &[&Check] = &[$(&$c),*];
    };
}

rules! {
    REFUSED = "OR001", "refused-by-istiod", Error,
        "istiod's validation rejects this resource: `kubectl apply` fails, and Outrigger refuses it (with a fail-closed stand-in).",
        "Correct the field named in the message.";
    NEVER_MATCHES = "OR002", "accepted-but-odd", Warning,
        "istiod accepts this, but it does not do what it looks like (a value that never matches, a condition on metadata a sidecar does not have, istiod's own warnings).",
        "Rewrite the value as the message says.";
    EMPTY_DENY = "OR003", "empty-deny-denies-nothing", Error,
        "A DENY policy without rules would match nothing and deny nothing (Istio: rules \"If not set, the match will never occur\"), so istiod rejects it. It is often written as a default-deny, which it is not.",
        "For default-deny, use an ALLOW policy with an empty spec (`spec: {}`): it allows nothing, so every request not allowed by another policy is denied.";
    NO_DEFAULT_DENY = "OR004", "no-default-deny", Warning,
        "No ALLOW policy applies, and Istio allows a request when no ALLOW policy applies to the workload: everything not explicitly denied is allowed.",
        "Add an allow-nothing policy (`spec: {}`) in the namespace (or the root namespace for the mesh), then ALLOW what is needed.";
    NOT_STRICT = "OR005", "mtls-not-strict", Warning,
        "PERMISSIVE accepts plaintext and DISABLE turns mTLS off: a caller without an identity reaches the workload, and no principal-based rule can identify it.",
        "Use `mtls: {mode: STRICT}` once every caller is in the mesh.";
    ANONYMOUS_JWT = "OR006", "jwt-allows-anonymous", Warning,
        "RequestAuthentication only checks tokens that are present: \"A request that does not contain any authentication credentials will be accepted but will not have any authenticated identity.\" No AuthorizationPolicy here requires a request principal.",
        "Add an AuthorizationPolicy requiring `requestPrincipals: [\"*\"]` (ALLOW), or DENY with `notRequestPrincipals: [\"*\"]`.";
    L7_ON_TCP = "OR007", "http-rule-on-tcp-port", Warning,
        "On a TCP port a sidecar cannot see HTTP attributes: an ALLOW rule that needs them never matches (requests it was meant to allow are denied), and a DENY rule is applied without them (it denies more than written).",
        "Restrict the rule with `ports` to HTTP listeners, or write an L4 rule for the TCP port.";
    ADMIN_EXPOSED = "OR008", "admin-off-loopback", Warning,
        "The admin listener serves /config_dump (identities, files, policy) and /metrics without authentication.",
        "Bind `admin.listen` to 127.0.0.1 (the default).";
    CERT_EXPIRY = "OR009", "certificate-expiry", Warning,
        "A workload certificate that expires stops every mTLS connection.",
        "Renew the certificate, or let the certificate source rotate it before it expires.";
    SELECTS_NOTHING = "OR011", "selector-matches-nothing", Warning,
        "The selector matches none of the workloads declared beside it in its namespace: the policy applies to nothing, so what it was meant to deny or require is not (often a label typo, or labels on the Deployment instead of its pod template).",
        "Use the labels of the workload's pods (`kubectl get pods --show-labels`; a Deployment's `spec.template.metadata.labels`, a WorkloadEntry's `spec.labels`).";
    REGEX_DOT = "OR012", "meaning-changed-by-regex-fix", Warning,
        "istiod embedded these values in a regular expression without escaping them until Istio 1.29.2, 1.28.6 and 1.27.9 (`serviceAccounts`, GHSA-9gcg-w975-3rjh / CVE-2026-39350) and 1.29.3 and 1.28.7 (`principals` suffix matches and `namespaces`): `.` matched any character, so under an older istiod an ALLOW admits more identities than written and a DENY misses some. Outrigger and fixed Istio match the value literally, so the same policy means different things across a mixed fleet.",
        "Upgrade istiod to a fixed release before relying on the policy; until then, add DENY rules for the look-alike names or avoid regex metacharacters in these values.";
    DEAD_ALLOW = "OR013", "allow-rule-denied", Warning,
        "A DENY policy that applies to every workload this ALLOW rule applies to matches every request the rule matches, and DENY is evaluated first: the rule can never allow anything.",
        "Remove the ALLOW rule, or narrow the DENY rule if the ALLOW rule is what was meant.";
    ENVOY_FILTER = "OR014", "envoy-filter-not-applied", Warning,
        "An EnvoyFilter patches Envoy's configuration, which Outrigger does not have: only Istio's local rate limit EnvoyFilter is applied; this one is ignored, whole (the agent logs it as not applied).",
        "Express the intent in Istio's security resources or the agent configuration (`rateLimits:`), or keep the EnvoyFilter for the Envoy sidecars only.";
    CUSTOM_UNDECLARED = "OR010", "custom-provider-undeclared", Warning,
        "A CUSTOM policy delegates to an extension provider declared in MeshConfig `extensionProviders` (for Outrigger: the agent configuration's `extensionProviders:`); for a provider it cannot find, Istio denies every request the policy matches, and so does Outrigger.",
        "Declare the provider under `extensionProviders:` (envoyExtAuthzHttp; docs/ext-authz.md), or remove the policy. Without --config, lint cannot see the declared providers and reports every CUSTOM policy.";
}

#[derive(serde::Serialize)]
pub struct Finding {
    pub id: &'static str,
    pub name: &'static str,
    pub severity: Severity,
    pub file: String,
    pub line: u32,
    /// `Kind namespace/name`, or the configuration.
    pub resource: String,
    pub message: String,
    pub why: &'static str,
    pub fix: &'static str,
}

fn finding(rule: &Check, file: &str, line: u32, resource: String, message: String) -> Finding {
    Finding {
        id: rule.id,
        name: rule.name,
        severity: rule.severity,
        file: file.to_string(),
        line,
        resource,
        message,
        why: rule.why,
        fix: rule.fix,
    }
}

fn label(r: &Resource) -> String {
    format!("{} {}/{}", r.kind_name(), r.namespace, r.name)
}

/// HTTP-only attributes a TCP connection does not have (Istio's "Authorization Policy
/// Conditions" table marks which keys are HTTP only).
fn http_fields(rule: &Rule) -> Vec<&'static str> {
    let mut out = Vec::new();
    for s in rule.from.iter().flatten().filter_map(|f| f.source.as_ref()) {
        if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
            out.push("requestPrincipals");
        }
    }
    for o in rule
        .to
        .iter()
        .flatten()
        .filter_map(|t| t.operation.as_ref())
    {
        if !o.methods.is_empty() || !o.not_methods.is_empty() {
            out.push("methods");
        }
        if !o.paths.is_empty() || !o.not_paths.is_empty() {
            out.push("paths");
        }
        if !o.hosts.is_empty() || !o.not_hosts.is_empty() {
            out.push("hosts");
        }
    }
    for c in &rule.when {
        if c.key.starts_with("request.") {
            out.push("request.* conditions");
        }
    }
    out.dedup();
    out
}

fn rule_ports(rule: &Rule) -> Vec<u16> {
    rule.to
        .iter()
        .flatten()
        .filter_map(|t| t.operation.as_ref())
        .flat_map(|o| o.ports.iter().filter_map(|p| p.parse().ok()))
        .collect()
}

/// Whether an AuthorizationPolicy in `ns` with `spec` applies to the linted workload.
fn applies(
    ns: &str,
    spec_selector: Option<&outrigger_policy::crd::WorkloadSelector>,
    cfg: &AgentConfig,
) -> bool {
    (ns == cfg.workload.namespace || ns == cfg.policy.root_namespace)
        && spec_selector.is_none_or(|s| s.matches(&cfg.workload.labels))
}

/// Lints resources (and the agent configuration when given).
pub fn lint(resources: &[Resource], cfg: Option<&AgentConfig>) -> Vec<Finding> {
    let mut out = Vec::new();
    let root = cfg
        .map(|c| c.policy.root_namespace.clone())
        .unwrap_or_else(|| "istio-system".into());
    let authz: Vec<(&Resource, &AuthorizationPolicySpec)> = resources
        .iter()
        .filter_map(|r| match &r.kind {
            ResourceKind::AuthorizationPolicy(s) => Some((r, s)),
            _ => None,
        })
        .collect();

    for r in resources {
        let (file, line) = (r.source.file.as_str(), r.source.line);
        if let Some(refusal) = r.refusal() {
            // istiod rejects a DENY policy without rules; it is the classic "default deny"
            // mistake, so it gets its own finding and fix.
            let empty_deny = refusal.action == Some(Action::Deny)
                && refusal.error.location.field == "spec.rules";
            out.push(finding(
                if empty_deny { &EMPTY_DENY } else { &REFUSED },
                file,
                refusal.error.location.line.max(line),
                label(r),
                refusal.error.to_string(),
            ));
        }
        for w in &r.warnings {
            out.push(finding(
                &NEVER_MATCHES,
                file,
                w.location.line.max(line),
                label(r),
                w.to_string(),
            ));
        }
        match &r.kind {
            ResourceKind::AuthorizationPolicy(spec) => {
                let provider = spec
                    .provider
                    .as_ref()
                    .map(|p| p.name.as_str())
                    .unwrap_or("");
                let declared =
                    cfg.is_some_and(|c| c.extension_providers.iter().any(|p| p.name == provider));
                if spec.action == Action::Custom && !declared {
                    out.push(finding(
                        &CUSTOM_UNDECLARED,
                        file,
                        line,
                        label(r),
                        format!(
                            "provider `{provider}` is not declared: requests it matches are denied"
                        ),
                    ));
                }
                if let Some(cfg) = cfg
                    && applies(&r.namespace, spec.selector.as_ref(), cfg)
                {
                    let action = spec.action;
                    for (i, rule) in spec.rules.iter().enumerate() {
                        let fields = http_fields(rule);
                        if fields.is_empty() {
                            continue;
                        }
                        let ports = rule_ports(rule);
                        for l in cfg.inbound.iter().filter(|l| {
                            l.protocol == outrigger_proxy::Protocol::Tcp
                                && (ports.is_empty() || ports.contains(&l.listen.port()))
                        }) {
                            let effect = match action {
                                Action::Allow => "never matches there",
                                Action::Deny => "is applied there without them (denies more)",
                                _ => "cannot be evaluated there",
                            };
                            out.push(finding(
                                &L7_ON_TCP,
                                file,
                                line,
                                label(r),
                                format!(
                                    "rules[{i}] uses {} and applies to the tcp listener `{}` (port {}): it {effect}",
                                    fields.join(", "),
                                    l.name,
                                    l.listen.port()
                                ),
                            ));
                        }
                    }
                }
            }
            ResourceKind::PeerAuthentication(spec) => {
                let mut modes: Vec<(String, MtlsModeSpec)> = Vec::new();
                if let Some(m) = &spec.mtls {
                    modes.push(("mtls.mode".into(), m.mode));
                }
                for (port, m) in spec.port_level_mtls.iter().flatten() {
                    modes.push((format!("portLevelMtls.{port}.mode"), m.mode));
                }
                for (field, mode) in modes {
                    let name = match mode {
                        MtlsModeSpec::Permissive => "PERMISSIVE",
                        MtlsModeSpec::Disable => "DISABLE",
                        _ => continue,
                    };
                    out.push(finding(
                        &NOT_STRICT,
                        file,
                        line,
                        label(r),
                        format!("{field} is {name}"),
                    ));
                }
            }
            ResourceKind::RequestAuthentication(_) => {
                let ns = &r.namespace;
                let requires = authz.iter().any(|(a, s)| {
                    (a.namespace == *ns || a.namespace == root)
                        && s.rules.iter().any(|rule| {
                            // A token is required by an ALLOW rule naming request principals or
                            // token claims (`request.auth.*`: absent without a valid token), or
                            // by a DENY rule on `notRequestPrincipals`.
                            let claims = s.action == Action::Allow
                                && rule.when.iter().any(|c| {
                                    c.key.starts_with("request.auth.") && !c.values.is_empty()
                                });
                            claims
                                || rule
                                    .from
                                    .iter()
                                    .flatten()
                                    .filter_map(|f| f.source.as_ref())
                                    .any(|src| match s.action {
                                        Action::Allow => !src.request_principals.is_empty(),
                                        Action::Deny => !src.not_request_principals.is_empty(),
                                        _ => false,
                                    })
                        })
                });
                if !requires {
                    out.push(finding(
                        &ANONYMOUS_JWT,
                        file,
                        line,
                        label(r),
                        format!(
                            "no AuthorizationPolicy in `{ns}` or `{root}` requires a request principal"
                        ),
                    ));
                }
            }
            _ => {}
        }
    }

    for r in resources {
        if let Some(why) = crate::envoy_filter::not_applied(r) {
            out.push(finding(
                &ENVOY_FILTER,
                &r.source.file,
                r.source.line,
                label(r),
                why,
            ));
        }
    }
    selectors_matching_nothing(resources, cfg, &root, &mut out);
    regex_fix_values(&authz, &mut out);
    dead_allow_rules(&authz, &root, &mut out);

    // Default deny: for the workload with --config, else for each namespace seen.
    let is_allow = |s: &AuthorizationPolicySpec| s.action == Action::Allow;
    match cfg {
        Some(cfg) => {
            let any = authz
                .iter()
                .any(|(r, s)| is_allow(s) && applies(&r.namespace, s.selector.as_ref(), cfg));
            if !any {
                out.push(finding(
                    &NO_DEFAULT_DENY,
                    &cfg.file.display().to_string(),
                    0,
                    format!("workload {}", cfg.identity),
                    format!(
                        "no ALLOW AuthorizationPolicy applies to this workload (namespace `{}`, root `{}`)",
                        cfg.workload.namespace, cfg.policy.root_namespace
                    ),
                ));
            }
        }
        None => {
            let mut namespaces: Vec<&str> = resources
                .iter()
                .filter(|r| r.policy_kind().is_some())
                .map(|r| r.namespace.as_str())
                .filter(|ns| *ns != root)
                .collect();
            namespaces.sort();
            namespaces.dedup();
            let mesh_wide = authz
                .iter()
                .any(|(r, s)| r.namespace == root && s.selector.is_none() && is_allow(s));
            for ns in namespaces {
                let covered = mesh_wide
                    || authz
                        .iter()
                        .any(|(r, s)| r.namespace == ns && s.selector.is_none() && is_allow(s));
                if !covered {
                    let first = resources.iter().find(|r| r.namespace == ns);
                    out.push(finding(
                        &NO_DEFAULT_DENY,
                        first.map(|r| r.source.file.as_str()).unwrap_or(""),
                        first.map(|r| r.source.line).unwrap_or(0),
                        format!("namespace {ns}"),
                        format!(
                            "no namespace-wide ALLOW policy in `{ns}` nor mesh-wide in `{root}`: workloads without a policy of their own allow everything"
                        ),
                    ));
                }
            }
        }
    }

    if let Some(cfg) = cfg {
        let file = cfg.file.display().to_string();
        match cfg.policy.default_mtls_mode {
            outrigger_policy::MtlsMode::Strict => {}
            mode => out.push(finding(
                &NOT_STRICT,
                &file,
                0,
                "configuration".into(),
                format!(
                    "policy.defaultMtlsMode is {mode} (used when no PeerAuthentication applies)"
                ),
            )),
        }
        if let Some(admin) = cfg.admin
            && !admin.ip().is_loopback()
        {
            out.push(finding(
                &ADMIN_EXPOSED,
                &file,
                0,
                "configuration".into(),
                format!("admin.listen is {admin}"),
            ));
        }
        if let CertificatesConfig::Files {
            cert_chain,
            key,
            root_cert,
            ..
        } = &cfg.certificates
        {
            let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
            if let Ok(c) = outrigger_tls::WorkloadCerts::from_pem(
                &read(cert_chain),
                &read(key),
                &read(root_cert),
            ) {
                let left = c
                    .not_after()
                    .duration_since(std::time::SystemTime::now())
                    .map(|d| d.as_secs() / 3600)
                    .ok();
                let message = match left {
                    None => Some("the workload certificate has expired".to_string()),
                    Some(h) if h < 7 * 24 => {
                        Some(format!("the workload certificate expires in {h} h"))
                    }
                    _ => None,
                };
                if let Some(m) = message {
                    let mut f = finding(
                        &CERT_EXPIRY,
                        &cert_chain.display().to_string(),
                        0,
                        "certificate".into(),
                        m,
                    );
                    if left.is_none() {
                        f.severity = Severity::Error;
                    }
                    out.push(f);
                }
            }
        }
    }
    out.sort_by(|a, b| (&a.file, a.line, a.id).cmp(&(&b.file, b.line, b.id)));
    out
}

/// OR011: a policy whose selector matches none of the workloads declared in the linted files
/// in its scope (its namespace; every namespace for the root namespace). Without any declared
/// workload in scope nothing can be said (the workloads may live elsewhere), so nothing is.
fn selectors_matching_nothing(
    resources: &[Resource],
    cfg: Option<&AgentConfig>,
    root: &str,
    out: &mut Vec<Finding>,
) {
    let declared: Vec<(&str, &str, &std::collections::BTreeMap<String, String>)> = resources
        .iter()
        .filter_map(|r| match &r.kind {
            ResourceKind::Other {
                workload_labels: Some(labels),
                ..
            } => Some((r.namespace.as_str(), r.name.as_str(), labels)),
            _ => None,
        })
        .collect();
    for r in resources {
        let selector = match &r.kind {
            ResourceKind::AuthorizationPolicy(s) => s.selector.as_ref(),
            ResourceKind::PeerAuthentication(s) => s.selector.as_ref(),
            ResourceKind::RequestAuthentication(s) => s.selector.as_ref(),
            _ => None,
        };
        let Some(selector) = selector.filter(|s| !s.match_labels.is_empty()) else {
            continue;
        };
        let in_scope = |ns: &str| r.namespace == root || ns == r.namespace;
        let scope: Vec<_> = declared.iter().filter(|(ns, ..)| in_scope(ns)).collect();
        if scope.is_empty() {
            continue;
        }
        let agent_matches = cfg.is_some_and(|c| {
            in_scope(&c.workload.namespace) && selector.matches(&c.workload.labels)
        });
        if agent_matches || scope.iter().any(|(_, _, l)| selector.matches(l)) {
            continue;
        }
        let labels: Vec<String> = selector
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        out.push(finding(
            &SELECTS_NOTHING,
            &r.source.file,
            r.source.line,
            label(r),
            format!(
                "selector {{{}}} matches none of the {} workload(s) declared in {} ({})",
                labels.join(", "),
                scope.len(),
                if r.namespace == root {
                    "any namespace".to_string()
                } else {
                    format!("`{}`", r.namespace)
                },
                scope
                    .iter()
                    .map(|(ns, name, _)| format!("{ns}/{name}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
}

/// The characters Go's `regexp.QuoteMeta` escapes, other than `*` (Istio's own wildcard):
/// what istiod's unescaped regular expressions misread.
fn regex_meta(v: &str) -> bool {
    v.chars().any(|c| "\\.+?()|[]{}^$".contains(c))
}

/// OR012: values whose meaning changed with istiod's regex escaping fixes.
fn regex_fix_values(authz: &[(&Resource, &AuthorizationPolicySpec)], out: &mut Vec<Finding>) {
    for (r, spec) in authz {
        let mut hits: Vec<String> = Vec::new();
        let mut check = |field: &str, values: &[String], affected: fn(&str) -> bool| {
            for v in values.iter().filter(|v| affected(v)) {
                hits.push(format!("{field} `{v}`"));
            }
        };
        // serviceAccounts: any value; principals: suffix matches (`*...`) only, the only
        // form istiod turned into a regex; namespaces: any value.
        let any: fn(&str) -> bool = regex_meta;
        let suffix: fn(&str) -> bool = |v| v.starts_with('*') && regex_meta(&v[1..]);
        for (i, rule) in spec.rules.iter().enumerate() {
            for src in rule.from.iter().flatten().filter_map(|f| f.source.as_ref()) {
                let at = |f: &str| format!("rules[{i}].from.source.{f}");
                check(&at("serviceAccounts"), &src.service_accounts, any);
                check(&at("notServiceAccounts"), &src.not_service_accounts, any);
                check(&at("principals"), &src.principals, suffix);
                check(&at("notPrincipals"), &src.not_principals, suffix);
                check(&at("namespaces"), &src.namespaces, any);
                check(&at("notNamespaces"), &src.not_namespaces, any);
            }
            for c in &rule.when {
                let affected = match c.key.as_str() {
                    "source.principal" => suffix,
                    "source.namespace" | "source.serviceAccount" => any,
                    _ => continue,
                };
                let at = format!("rules[{i}].when `{}`", c.key);
                check(&format!("{at} values"), &c.values, affected);
                check(&format!("{at} notValues"), &c.not_values, affected);
            }
        }
        if !hits.is_empty() {
            out.push(finding(
                &REGEX_DOT,
                &r.source.file,
                r.source.line,
                label(r),
                format!(
                    "{}: matched literally here; under an istiod before the fix, {}",
                    hits.join(", "),
                    match spec.action {
                        Action::Deny => "this DENY does not deny look-alike names (`.` matched any character)",
                        Action::Allow => "this ALLOW also admits look-alike names (`.` matched any character)",
                        _ => "these values also matched look-alike names (`.` matched any character)",
                    }
                ),
            ));
        }
    }
}

/// Whether the glob `d` (Istio's exact, `prefix*`, `*suffix` or `*`) matches every string the
/// glob `a` matches.
fn glob_covers(d: &str, a: &str) -> bool {
    if d == "*" || d == a {
        return true;
    }
    if a == "*" {
        return false;
    }
    if let Some(prefix) = d.strip_suffix('*') {
        return !a.starts_with('*') && a.starts_with(prefix);
    }
    if let Some(suffix) = d.strip_prefix('*') {
        return !a.ends_with('*') && a.ends_with(suffix);
    }
    false
}

/// Whether the constraint `d` (values of one field; empty: none) holds for every request that
/// satisfies `a`. `globs`: Istio's glob matching, else exact values (IP blocks, ports).
fn values_cover(d: &[String], a: &[String], globs: bool) -> bool {
    d.is_empty()
        || (!a.is_empty()
            && a.iter().all(|av| {
                d.iter()
                    .any(|dv| if globs { glob_covers(dv, av) } else { dv == av })
            }))
}

fn source_covers(d: &outrigger_policy::crd::Source, a: &outrigger_policy::crd::Source) -> bool {
    // Negative fields in the DENY rule: not analysed (no finding rather than a wrong one).
    let negatives = [
        &d.not_principals,
        &d.not_request_principals,
        &d.not_namespaces,
        &d.not_service_accounts,
        &d.not_ip_blocks,
        &d.not_remote_ip_blocks,
        &d.not_trust_domains,
    ];
    negatives.iter().all(|v| v.is_empty())
        && values_cover(&d.principals, &a.principals, true)
        && values_cover(&d.request_principals, &a.request_principals, true)
        && values_cover(&d.namespaces, &a.namespaces, true)
        && values_cover(&d.service_accounts, &a.service_accounts, false)
        && values_cover(&d.ip_blocks, &a.ip_blocks, false)
        && values_cover(&d.remote_ip_blocks, &a.remote_ip_blocks, false)
        && values_cover(&d.trust_domains, &a.trust_domains, true)
}

fn operation_covers(
    d: &outrigger_policy::crd::Operation,
    a: &outrigger_policy::crd::Operation,
) -> bool {
    [&d.not_hosts, &d.not_ports, &d.not_methods, &d.not_paths]
        .iter()
        .all(|v| v.is_empty())
        && values_cover(&d.hosts, &a.hosts, true)
        && values_cover(&d.ports, &a.ports, false)
        && values_cover(&d.methods, &a.methods, false)
        && values_cover(&d.paths, &a.paths, true)
}

/// Whether the DENY rule `d` matches every request the ALLOW rule `a` matches (a sufficient,
/// syntactic test: `from`/`to` entries are alternatives, so each of `a`'s must be covered by
/// one of `d`'s; `when` conditions all hold, so each of `d`'s must be implied by one of `a`'s).
fn rule_covers(d: &Rule, a: &Rule) -> bool {
    let from = match (&d.from, &a.from) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(ds), Some(as_)) => as_.iter().all(|af| {
            ds.iter().any(|df| match (&df.source, &af.source) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(d), Some(a)) => source_covers(d, a),
            })
        }),
    };
    let to = match (&d.to, &a.to) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(ds), Some(as_)) => as_.iter().all(|at| {
            ds.iter().any(|dt| match (&dt.operation, &at.operation) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(d), Some(a)) => operation_covers(d, a),
            })
        }),
    };
    let when = d.when.iter().all(|dc| {
        dc.not_values.is_empty()
            && a.when
                .iter()
                .any(|ac| ac.key == dc.key && values_cover(&dc.values, &ac.values, true))
    });
    from && to && when
}

/// Whether a policy in `d_ns` with selector `d_sel` applies to every workload a policy in
/// `a_ns` with `a_sel` applies to.
fn scope_covers(
    d_ns: &str,
    d_sel: Option<&outrigger_policy::crd::WorkloadSelector>,
    a_ns: &str,
    a_sel: Option<&outrigger_policy::crd::WorkloadSelector>,
    root: &str,
) -> bool {
    let empty = std::collections::BTreeMap::new();
    let labels = |s: Option<&outrigger_policy::crd::WorkloadSelector>| {
        s.map(|s| &s.match_labels).unwrap_or(&empty).clone()
    };
    let (d, a) = (labels(d_sel), labels(a_sel));
    (d_ns == root || d_ns == a_ns) && d.iter().all(|(k, v)| a.get(k) == Some(v))
}

/// OR013: ALLOW rules that a DENY policy always overrides.
fn dead_allow_rules(
    authz: &[(&Resource, &AuthorizationPolicySpec)],
    root: &str,
    out: &mut Vec<Finding>,
) {
    let targeted =
        |s: &AuthorizationPolicySpec| s.target_ref.is_some() || !s.target_refs.is_empty();
    let denies: Vec<_> = authz
        .iter()
        .filter(|(r, s)| s.action == Action::Deny && !r.is_dry_run() && !targeted(s))
        .collect();
    for (r, spec) in authz
        .iter()
        .filter(|(r, s)| s.action == Action::Allow && !r.is_dry_run() && !targeted(s))
    {
        for (i, rule) in spec.rules.iter().enumerate() {
            let by = denies.iter().find_map(|(dr, ds)| {
                if !scope_covers(
                    &dr.namespace,
                    ds.selector.as_ref(),
                    &r.namespace,
                    spec.selector.as_ref(),
                    root,
                ) {
                    return None;
                }
                let j = ds.rules.iter().position(|d| rule_covers(d, rule))?;
                Some(format!("{} rules[{j}]", label(dr)))
            });
            if let Some(by) = by {
                out.push(finding(
                    &DEAD_ALLOW,
                    &r.source.file,
                    r.source.line,
                    label(r),
                    format!("rules[{i}] is always denied first by {by}"),
                ));
            }
        }
    }
}

fn sarif(findings: &[Finding]) -> serde_json::Value {
    let rules: Vec<serde_json::Value> = ALL
        .iter()
        .map(|r| {
            serde_json::json!({
                "id": r.id,
                "name": r.name,
                "shortDescription": {"text": r.why},
                "help": {"text": r.fix},
                "defaultConfiguration": {"level": r.severity.sarif()},
            })
        })
        .collect();
    let results: Vec<serde_json::Value> = findings
        .iter()
        .map(|f| {
            let mut loc =
                serde_json::json!({"physicalLocation": {"artifactLocation": {"uri": f.file}}});
            if f.line > 0 {
                loc["physicalLocation"]["region"] = serde_json::json!({"startLine": f.line});
            }
            serde_json::json!({
                "ruleId": f.id,
                "level": f.severity.sarif(),
                "message": {"text": format!("{}: {}. Fix: {}", f.resource, f.message, f.fix)},
                "locations": [loc],
            })
        })
        .collect();
    serde_json::json!({
        "version": "2.1.0",
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "runs": [{
            "tool": {"driver": {
                "name": "outrigger lint",
                "version": env!("CARGO_PKG_VERSION"),
                "informationUri": "https://github.com/outrigger-mesh/outrigger",
                "rules": rules,
            }},
            "results": results,
        }]
    })
}

/// Runs the command; `Ok(true)` when no finding reaches `--fail-on`.
pub fn run(args: LintArgs) -> anyhow::Result<bool> {
    let cfg = args.config.as_deref().map(AgentConfig::load).transpose()?;
    let paths = match (&cfg, args.paths.is_empty()) {
        (Some(c), true) => c.policy.paths.clone(),
        (None, true) => anyhow::bail!("name policy files or directories, or --config"),
        _ => args.paths.clone(),
    };
    let contents = policy_files::read_contents(&paths).map_err(|e| anyhow::anyhow!(e))?;
    let resources = policy_files::parse_contents(&contents);
    let findings = lint(&resources, cfg.as_ref());
    // A reader that stops early (`| head`) is not an error.
    match print(&args, &findings, &resources) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    Ok(!findings.iter().any(|f| f.severity >= args.fail_on))
}

fn print(args: &LintArgs, findings: &[Finding], resources: &[Resource]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(findings)?)?,
        Format::Sarif => writeln!(out, "{}", serde_json::to_string_pretty(&sarif(findings))?)?,
        Format::Text => {
            for f in findings {
                let at = if f.line > 0 {
                    format!("{}:{}", f.file, f.line)
                } else {
                    f.file.clone()
                };
                writeln!(
                    out,
                    "{at}: {:?}[{} {}] {}: {}\n    why: {}\n    fix: {}",
                    f.severity, f.id, f.name, f.resource, f.message, f.why, f.fix
                )?;
            }
            let n = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
            writeln!(
                out,
                "{} finding(s): {} error(s), {} warning(s), {} note(s) in {} resource(s)",
                findings.len(),
                n(Severity::Error),
                n(Severity::Warning),
                n(Severity::Note),
                resources
                    .iter()
                    .filter(|r| r.policy_kind().is_some() || r.refusal().is_some())
                    .count()
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> Rule {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn glob_coverage_follows_istio_matching() {
        // Istio's string match: exact, `prefix*`, `*suffix`, `*` (AuthorizationPolicy
        // reference, "Value matching").
        assert!(glob_covers("*", "/a"));
        assert!(glob_covers("/admin*", "/admin"));
        assert!(glob_covers("/admin*", "/admin/x*"));
        assert!(!glob_covers("/admin*", "*/admin"));
        assert!(!glob_covers("/admin*", "/adm"));
        assert!(glob_covers("*.example.com", "api.example.com"));
        assert!(glob_covers("*.example.com", "*.api.example.com"));
        assert!(!glob_covers("*.example.com", "api.example.*"));
        assert!(!glob_covers("/a", "*"));
    }

    #[test]
    fn a_deny_rule_covers_an_allow_rule_only_when_every_request_matches() {
        let deny = rule("to: [{operation: {paths: [\"/admin*\"]}}]");
        // Every from/to alternative of the ALLOW rule must be covered.
        assert!(rule_covers(
            &deny,
            &rule(
                "to: [{operation: {paths: [\"/admin\"]}}, {operation: {paths: [\"/admin/x\"], methods: [GET]}}]"
            )
        ));
        assert!(!rule_covers(
            &deny,
            &rule("to: [{operation: {paths: [\"/admin\"]}}, {operation: {paths: [\"/public\"]}}]")
        ));
        // An ALLOW rule without `to` matches any path: not covered.
        assert!(!rule_covers(
            &deny,
            &rule("from: [{source: {namespaces: [ops]}}]")
        ));
        // A DENY rule with no fields matches everything.
        assert!(rule_covers(
            &rule("{}"),
            &rule("to: [{operation: {methods: [GET]}}]")
        ));
        // Negative fields are not analysed: no finding rather than a wrong one.
        assert!(!rule_covers(
            &rule("from: [{source: {notNamespaces: [ops]}}]"),
            &rule("from: [{source: {namespaces: [shop]}}]")
        ));
        // `when`: each DENY condition must be implied by one of the ALLOW rule's.
        let deny = rule("when: [{key: \"request.headers[x-env]\", values: [\"*\"]}]");
        assert!(rule_covers(
            &deny,
            &rule(
                "when: [{key: \"request.headers[x-env]\", values: [prod]}, {key: source.ip, values: [10.0.0.1]}]"
            )
        ));
        assert!(!rule_covers(
            &deny,
            &rule("when: [{key: source.ip, values: [10.0.0.1]}]")
        ));
        // Service accounts and IP blocks are compared exactly.
        assert!(!rule_covers(
            &rule("from: [{source: {ipBlocks: [10.0.0.0/8]}}]"),
            &rule("from: [{source: {ipBlocks: [10.1.0.0/16]}}]")
        ));
    }

    #[test]
    fn scope_of_a_deny_must_include_the_allow_scope() {
        use outrigger_policy::crd::WorkloadSelector;
        let sel = |pairs: &[(&str, &str)]| WorkloadSelector {
            match_labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let cart = sel(&[("app", "cart")]);
        let cart_v1 = sel(&[("app", "cart"), ("version", "v1")]);
        // Namespace-wide and mesh-wide DENY cover any ALLOW in scope.
        assert!(scope_covers(
            "shop",
            None,
            "shop",
            Some(&cart),
            "istio-system"
        ));
        assert!(scope_covers(
            "istio-system",
            None,
            "shop",
            Some(&cart),
            "istio-system"
        ));
        assert!(!scope_covers(
            "other",
            None,
            "shop",
            Some(&cart),
            "istio-system"
        ));
        // A DENY for fewer labels covers an ALLOW for more, not the reverse.
        assert!(scope_covers(
            "shop",
            Some(&cart),
            "shop",
            Some(&cart_v1),
            "istio-system"
        ));
        assert!(!scope_covers(
            "shop",
            Some(&cart_v1),
            "shop",
            Some(&cart),
            "istio-system"
        ));
        assert!(!scope_covers(
            "shop",
            Some(&cart),
            "shop",
            None,
            "istio-system"
        ));
    }

    #[test]
    fn regex_metacharacters_are_those_go_quotes() {
        assert!(regex_meta("cert-manager.io"));
        assert!(regex_meta("a|b"));
        assert!(regex_meta("a[0]"));
        assert!(!regex_meta("cert-manager"));
        assert!(!regex_meta("*"));
    }
}
