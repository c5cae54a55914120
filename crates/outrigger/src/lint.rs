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
    CUSTOM_UNDECLARED = "OR010", "custom-provider-undeclared", Warning,
        "A CUSTOM policy delegates to an extension provider declared in MeshConfig `extensionProviders`; Outrigger declares none yet, so, as Istio does for a provider it cannot find, every request the policy matches is denied.",
        "Remove the policy, or express the decision as ALLOW/DENY rules until external authorization is available.";
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
                if spec.action == Action::Custom {
                    let provider = spec
                        .provider
                        .as_ref()
                        .map(|p| p.name.as_str())
                        .unwrap_or("");
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
