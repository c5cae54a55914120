//! The immutable per-workload policy snapshot.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use crate::crd::WorkloadSelector;
use crate::error::LoadError;
use crate::load::{PolicyKind, Refusal, Resource, ResourceKind, SelectorGuess, SourceRef};
use crate::validate;
use crate::{MtlsMode, PolicyOptions, Workload};

/// The PeerAuthentication mode in force on a port, and which policy decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveMtls {
    pub mode: MtlsMode,
    /// `namespace/name` of the deciding PeerAuthentication, or `None` when no policy sets a
    /// mode and [`PolicyOptions::default_mtls_mode`] applies.
    pub source: Option<String>,
}

/// How widely a policy applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyScope {
    /// Root namespace, no selector.
    Mesh,
    /// The workload's namespace, no selector.
    Namespace,
    /// A selector that matches the workload's labels.
    Workload,
}

impl fmt::Display for PolicyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyScope::Mesh => "mesh-wide",
            PolicyScope::Namespace => "namespace-wide",
            PolicyScope::Workload => "workload",
        })
    }
}

/// A resource that applies to this workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedPolicy {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
    pub source: SourceRef,
    pub scope: PolicyScope,
    /// The action, for an AuthorizationPolicy.
    pub action: Option<crate::Action>,
    /// `istio.io/dry-run: "true"`: evaluated and logged, never enforced.
    pub dry_run: bool,
}

impl AppliedPolicy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Why a resource does not apply to this workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IgnoreReason {
    /// Neither the workload's namespace nor the root namespace.
    OtherNamespace,
    /// The selector's labels are not all on the workload.
    SelectorMismatch,
    /// `targetRef`/`targetRefs` attach a policy to gateways, waypoints and services; "if
    /// targetRef is specified", a sidecar ignores the policy altogether, and so do we.
    TargetRefs,
    /// A PeerAuthentication with a selector in the root namespace: Istio's sidecar config
    /// (`ComposePeerAuthentication`) only takes workload-level PeerAuthentications from
    /// namespaces other than the root namespace.
    RootNamespaceSelector,
    /// Another PeerAuthentication at the same level is older and wins (`namespace/name`).
    ShadowedBy(String),
    /// Not a kind/apiVersion we enforce.
    UnsupportedKind { api_version: String, kind: String },
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IgnoreReason::OtherNamespace => {
                f.write_str("in another namespace than the workload's or the root namespace")
            }
            IgnoreReason::SelectorMismatch => {
                f.write_str("its selector does not match the workload's labels")
            }
            IgnoreReason::TargetRefs => f.write_str(
                "it uses targetRef(s), which attach to gateways/waypoints; sidecars ignore it",
            ),
            IgnoreReason::RootNamespaceSelector => f.write_str(
                "a PeerAuthentication with a selector in the root namespace is not applied by \
                 Istio sidecars",
            ),
            IgnoreReason::ShadowedBy(winner) => write!(
                f,
                "another PeerAuthentication at the same level ({winner}) is older and wins"
            ),
            IgnoreReason::UnsupportedKind { api_version, kind } => {
                write!(f, "{api_version} {kind} is not a policy Outrigger enforces")
            }
        }
    }
}

/// A resource that does not apply to this workload, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredPolicy {
    /// The kind as written (`PeerAuthentication`, `Deployment`, ...).
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub source: SourceRef,
    pub reason: IgnoreReason,
}

/// What a refused resource does to this workload: Outrigger's fail-closed rule.
///
/// istiod never sees a resource its validation rejects (the API server refuses it and the
/// previous version, if any, stays in force). A file has no previous version to fall back
/// to, so a refused resource that may select this workload is replaced by the most
/// restrictive thing it could have been (docs/policy.md, "Refused resources").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalEffect {
    /// It does not select this workload: nothing.
    NotApplicable(IgnoreReason),
    /// A dry-run or AUDIT AuthorizationPolicy: it never changes a decision.
    NoDecisionChange,
    /// An ALLOW AuthorizationPolicy: the workload has ALLOW policies (so what the others do
    /// not allow is denied) and this one allows nothing — what istiod generates for an ALLOW
    /// policy whose rules cannot be translated (`builder.go`: the rules are skipped, the
    /// policy's RBAC ALLOW filter stays).
    AllowsNothing,
    /// A DENY or CUSTOM AuthorizationPolicy (or one whose action cannot be read), or a
    /// RequestAuthentication: every request and connection to the workload is denied.
    DenyAll,
    /// A PeerAuthentication: mTLS STRICT on every port.
    StrictMtls,
    /// A document of unknown kind (not YAML, unreadable file): both of the above.
    DenyAllAndStrictMtls,
}

impl fmt::Display for RefusalEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefusalEffect::NotApplicable(why) => {
                write!(f, "no effect on this workload ({why})")
            }
            RefusalEffect::NoDecisionChange => {
                f.write_str("no effect on decisions (dry-run or AUDIT policy)")
            }
            RefusalEffect::AllowsNothing => f.write_str(
                "fail closed: counts as an ALLOW policy that allows nothing (requests no other \
                 ALLOW policy allows are denied)",
            ),
            RefusalEffect::DenyAll => {
                f.write_str("fail closed: every request to this workload is denied")
            }
            RefusalEffect::StrictMtls => f.write_str("fail closed: mTLS STRICT on every port"),
            RefusalEffect::DenyAllAndStrictMtls => f.write_str(
                "fail closed (unknown kind): every request is denied and mTLS is STRICT on \
                 every port",
            ),
        }
    }
}

/// A resource that was refused (istiod would reject it, or it cannot be read), and what
/// Outrigger does instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedPolicy {
    /// The kind as far as known (`unknown kind` otherwise).
    pub kind: String,
    /// `namespace/name`, or `file:line` when the name cannot be read.
    pub name: String,
    pub source: SourceRef,
    pub error: LoadError,
    pub effect: RefusalEffect,
}

/// A PeerAuthentication chosen at one level.
#[derive(Debug, Clone)]
struct PeerLevel {
    key: String,
    mode: Option<MtlsMode>,
    ports: BTreeMap<u16, Option<MtlsMode>>,
}

/// Everything that applies to one workload, validated and indexed. Immutable, `Send + Sync`;
/// share it through an `Arc` and swap it whole when the configuration changes.
#[derive(Debug, Clone)]
pub struct Snapshot {
    base_mtls: EffectiveMtls,
    port_mtls: BTreeMap<u16, EffectiveMtls>,
    applied: Vec<AppliedPolicy>,
    ignored: Vec<IgnoredPolicy>,
    refused: Vec<RefusedPolicy>,
    warnings: Vec<LoadError>,
    pub(crate) authz: crate::authz::AuthzIndex,
    pub(crate) request_authn: Vec<(String, crate::crd::RequestAuthenticationSpec)>,
    /// `request_authn`'s rules compiled for the request path (crate::request_authn).
    jwt_rules: Vec<crate::request_authn::JwtRuleModel>,
}

/// Istio's PeerAuthentication order: "oldest wins", by `creationTimestamp`, then name, then
/// namespace (`configCompareByCreationTime`). A resource without a timestamp counts as created
/// at the zero time, as an unset Go `time.Time` does, so it sorts before timestamped ones.
fn age_order(a: &Resource, b: &Resource) -> Ordering {
    let ts = |r: &Resource| {
        r.creation_timestamp
            .as_deref()
            .and_then(validate::parse_timestamp)
    };
    ts(a)
        .cmp(&ts(b))
        .then_with(|| a.name.cmp(&b.name))
        .then_with(|| a.namespace.cmp(&b.namespace))
}

fn selector_labels(sel: &Option<WorkloadSelector>) -> Option<&WorkloadSelector> {
    sel.as_ref().filter(|s| !s.match_labels.is_empty())
}

impl Snapshot {
    /// Selects, validates and indexes the resources that apply to `workload`.
    ///
    /// Resources are validated again (they may have been built in code rather than parsed).
    /// A refused resource ([`ResourceKind::Refused`], or one that fails validation here) never
    /// blocks the others: it is listed in [`Snapshot::refused`] with the fail-closed
    /// [`RefusalEffect`] applied to this workload. Never fails today; the `Result` is kept
    /// for callers.
    pub fn build(
        resources: &[Resource],
        workload: &Workload,
        opts: &PolicyOptions,
    ) -> Result<Snapshot, LoadError> {
        let root = opts.root_namespace.as_str();
        let mut applied = Vec::new();
        let mut ignored = Vec::new();
        let ignore = |r: &Resource, reason: IgnoreReason, ignored: &mut Vec<IgnoredPolicy>| {
            ignored.push(IgnoredPolicy {
                kind: r.kind_name().to_string(),
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                source: r.source.clone(),
                reason,
            })
        };
        let revalidate = |r: &Resource, issues: Vec<validate::Issue>| -> Result<(), LoadError> {
            match issues.into_iter().find(|i| !i.warning) {
                None => Ok(()),
                Some(issue) => {
                    let mut path = vec![crate::yaml::PathSeg::Key("spec".into())];
                    path.extend(issue.path);
                    Err(LoadError::new(
                        &r.source.file,
                        r.source.line,
                        0,
                        crate::yaml::format_path(&path),
                        issue.reason,
                    )
                    .with_resource(format!("{} {}", r.kind_name(), r.key())))
                }
            }
        };
        let in_scope = |r: &Resource| r.namespace == workload.namespace || r.namespace == root;

        // PeerAuthentication candidates per level.
        let mut mesh: Vec<&Resource> = Vec::new();
        let mut namespace: Vec<&Resource> = Vec::new();
        let mut workload_level: Vec<&Resource> = Vec::new();
        let mut authz = Vec::new();
        let mut request_authn = Vec::new();
        let mut refused: Vec<RefusedPolicy> = Vec::new();
        let mut warnings: Vec<LoadError> = Vec::new();
        let mut deny_all: Vec<String> = Vec::new();
        let mut allow_nothing: Vec<String> = Vec::new();
        let mut strict: Option<String> = None;
        // A resource built in code that fails validation is refused like a parsed one.
        let mut refuse = |r: &Resource, refusal: &Refusal| {
            let name = if r.name.is_empty() {
                r.source.to_string()
            } else {
                format!(
                    "{}/{}",
                    if r.namespace.is_empty() {
                        "?"
                    } else {
                        &r.namespace
                    },
                    r.name
                )
            };
            let effect = refusal_effect(r, refusal, workload, root);
            match effect {
                RefusalEffect::AllowsNothing => allow_nothing.push(name.clone()),
                RefusalEffect::DenyAll => deny_all.push(name.clone()),
                RefusalEffect::StrictMtls => {
                    strict.get_or_insert_with(|| name.clone());
                }
                RefusalEffect::DenyAllAndStrictMtls => {
                    deny_all.push(name.clone());
                    strict.get_or_insert_with(|| name.clone());
                }
                RefusalEffect::NotApplicable(_) | RefusalEffect::NoDecisionChange => {}
            }
            refused.push(RefusedPolicy {
                kind: r.kind_name().to_string(),
                name,
                source: r.source.clone(),
                error: refusal.error.clone(),
                effect,
            });
        };
        let typed_refusal = |r: &Resource, error: LoadError| -> Refusal {
            let (kind, action, sel, target_refs) = match &r.kind {
                ResourceKind::PeerAuthentication(s) => (
                    Some(PolicyKind::PeerAuthentication),
                    None,
                    &s.selector,
                    false,
                ),
                ResourceKind::AuthorizationPolicy(s) => (
                    Some(PolicyKind::AuthorizationPolicy),
                    Some(s.action),
                    &s.selector,
                    s.target_ref.is_some() || !s.target_refs.is_empty(),
                ),
                ResourceKind::RequestAuthentication(s) => (
                    Some(PolicyKind::RequestAuthentication),
                    None,
                    &s.selector,
                    s.target_ref.is_some() || !s.target_refs.is_empty(),
                ),
                _ => (None, None, &None, false),
            };
            Refusal {
                error,
                kind,
                action,
                selector: match selector_labels(sel) {
                    None => SelectorGuess::None,
                    Some(s) => SelectorGuess::Labels(s.match_labels.clone()),
                },
                target_refs,
            }
        };

        for r in resources {
            warnings.extend(r.warnings.iter().cloned());
            let recheck = match &r.kind {
                ResourceKind::PeerAuthentication(spec) => {
                    revalidate(r, validate::peer_authentication(spec))
                }
                ResourceKind::AuthorizationPolicy(spec) => {
                    revalidate(r, validate::authorization_policy(spec))
                }
                ResourceKind::RequestAuthentication(spec) => {
                    revalidate(r, validate::request_authentication(spec))
                }
                _ => Ok(()),
            };
            if let Err(e) = recheck {
                refuse(r, &typed_refusal(r, e));
                continue;
            }
            match &r.kind {
                ResourceKind::Refused(refusal) => refuse(r, refusal),
                // An Istio EnvoyFilter is the agent's to apply or report (its local rate limit).
                ResourceKind::Other {
                    envoy_filter: Some(_),
                    ..
                } => {}
                ResourceKind::Other {
                    api_version, kind, ..
                } => {
                    let reason = IgnoreReason::UnsupportedKind {
                        api_version: api_version.clone(),
                        kind: kind.clone(),
                    };
                    ignore(r, reason, &mut ignored);
                }
                ResourceKind::PeerAuthentication(spec) => {
                    if !in_scope(r) {
                        ignore(r, IgnoreReason::OtherNamespace, &mut ignored);
                        continue;
                    }
                    match selector_labels(&spec.selector) {
                        None if r.namespace == root => mesh.push(r),
                        None => namespace.push(r),
                        Some(_) if r.namespace == root => {
                            ignore(r, IgnoreReason::RootNamespaceSelector, &mut ignored)
                        }
                        Some(sel) if sel.matches(&workload.labels) => workload_level.push(r),
                        Some(_) => ignore(r, IgnoreReason::SelectorMismatch, &mut ignored),
                    }
                }
                ResourceKind::AuthorizationPolicy(spec) => {
                    match select(
                        r,
                        &spec.selector,
                        spec.target_ref.is_some() || !spec.target_refs.is_empty(),
                        workload,
                        root,
                    ) {
                        Err(reason) => ignore(r, reason, &mut ignored),
                        Ok(scope) => {
                            let dry_run = crate::authz::is_dry_run(r);
                            applied.push(AppliedPolicy {
                                kind: PolicyKind::AuthorizationPolicy,
                                namespace: r.namespace.clone(),
                                name: r.name.clone(),
                                source: r.source.clone(),
                                scope,
                                action: Some(spec.action),
                                dry_run,
                            });
                            authz.push((r, spec));
                        }
                    }
                }
                ResourceKind::RequestAuthentication(spec) => {
                    match select(
                        r,
                        &spec.selector,
                        spec.target_ref.is_some() || !spec.target_refs.is_empty(),
                        workload,
                        root,
                    ) {
                        Err(reason) => ignore(r, reason, &mut ignored),
                        Ok(scope) => {
                            applied.push(AppliedPolicy {
                                kind: PolicyKind::RequestAuthentication,
                                namespace: r.namespace.clone(),
                                name: r.name.clone(),
                                source: r.source.clone(),
                                scope,
                                action: None,
                                dry_run: false,
                            });
                            request_authn.push((r.key(), spec.clone()));
                        }
                    }
                }
            }
        }

        // "Most specific wins": pick the oldest at each level, then resolve UNSET upwards.
        let mut pick = |mut cands: Vec<&Resource>, scope: PolicyScope| -> Option<PeerLevel> {
            cands.sort_by(|a, b| age_order(a, b));
            let (winner, losers) = cands.split_first()?;
            for l in losers {
                ignore(l, IgnoreReason::ShadowedBy(winner.key()), &mut ignored);
            }
            let ResourceKind::PeerAuthentication(spec) = &winner.kind else {
                return None;
            };
            applied.push(AppliedPolicy {
                kind: PolicyKind::PeerAuthentication,
                namespace: winner.namespace.clone(),
                name: winner.name.clone(),
                source: winner.source.clone(),
                scope,
                action: None,
                dry_run: false,
            });
            let mode = spec.mtls.as_ref().and_then(|m| validate::mode_of(m.mode));
            let ports = spec
                .port_level_mtls
                .iter()
                .flatten()
                .filter_map(|(p, m)| Some((p.parse::<u16>().ok()?, validate::mode_of(m.mode))))
                .collect();
            Some(PeerLevel {
                key: winner.key(),
                mode,
                ports,
            })
        };
        let levels = [
            pick(mesh, PolicyScope::Mesh),
            pick(namespace, PolicyScope::Namespace),
            pick(workload_level, PolicyScope::Workload),
        ];

        // "UNSET: Inherit from parent, if has one." With no parent setting a mode, the caller's
        // default applies (Istio's own default is PERMISSIVE).
        let mut base = EffectiveMtls {
            mode: opts.default_mtls_mode,
            source: None,
        };
        for level in levels.iter().flatten() {
            if let Some(mode) = level.mode {
                base = EffectiveMtls {
                    mode,
                    source: Some(level.key.clone()),
                };
            }
        }
        // Port-level settings come only from the workload-level policy; a port-level UNSET
        // inherits the workload's resolved mode.
        let mut port_mtls = BTreeMap::new();
        if let Some(w) = &levels[2] {
            for (port, mode) in &w.ports {
                let eff = match mode {
                    Some(mode) => EffectiveMtls {
                        mode: *mode,
                        source: Some(w.key.clone()),
                    },
                    None => base.clone(),
                };
                port_mtls.insert(*port, eff);
            }
        }

        // Fail closed for a refused PeerAuthentication: STRICT everywhere.
        if let Some(key) = strict {
            let eff = EffectiveMtls {
                mode: MtlsMode::Strict,
                source: Some(format!("{key} (refused: fail closed)")),
            };
            base = eff.clone();
            for v in port_mtls.values_mut() {
                *v = eff.clone();
            }
        }
        let authz = crate::authz::AuthzIndex::build(&authz, &allow_nothing, &deny_all, opts)?;
        Ok(Snapshot {
            base_mtls: base,
            port_mtls,
            applied,
            ignored,
            refused,
            warnings,
            authz,
            jwt_rules: crate::request_authn::compile(&request_authn),
            request_authn,
        })
    }

    /// The effective PeerAuthentication mode for a workload port (the port the workload
    /// listens on, "not the port of the Kubernetes service").
    pub fn mtls_mode(&self, port: u16) -> EffectiveMtls {
        self.port_mtls
            .get(&port)
            .cloned()
            .unwrap_or_else(|| self.base_mtls.clone())
    }

    /// The resources that apply to this workload, in load order per kind (PeerAuthentications:
    /// only the winner of each level).
    pub fn applied(&self) -> &[AppliedPolicy] {
        &self.applied
    }

    /// The resources that do not apply, and why.
    pub fn ignored(&self) -> &[IgnoredPolicy] {
        &self.ignored
    }

    /// The refused resources (istiod would reject them, or they cannot be read) and the
    /// fail-closed effect each has on this workload.
    pub fn refused(&self) -> &[RefusedPolicy] {
        &self.refused
    }

    /// Warnings about loaded resources (every file, whichever workload they select).
    pub fn warnings(&self) -> &[LoadError] {
        &self.warnings
    }

    /// Every JWT rule of the RequestAuthentications that apply, compiled when the snapshot was
    /// built: what the request path reads.
    pub fn jwt_rules(&self) -> &[crate::request_authn::JwtRuleModel] {
        &self.jwt_rules
    }

    /// The RequestAuthentication specs that apply (`namespace/name`, spec), as loaded.
    pub fn request_authentications(
        &self,
    ) -> impl Iterator<Item = (&str, &crate::crd::RequestAuthenticationSpec)> {
        self.request_authn.iter().map(|(k, s)| (k.as_str(), s))
    }
}

/// Selection for AuthorizationPolicy and RequestAuthentication: "The selector will match with
/// workloads in the same namespace as the authorization policy. If the authorization policy is
/// in the root namespace, the selector will additionally match with workloads in all
/// namespaces. If the selector and the targetRef are not set, the selector will match all
/// workloads."
fn select(
    r: &Resource,
    sel: &Option<WorkloadSelector>,
    has_target_refs: bool,
    workload: &Workload,
    root: &str,
) -> Result<PolicyScope, IgnoreReason> {
    if r.namespace != workload.namespace && r.namespace != root {
        return Err(IgnoreReason::OtherNamespace);
    }
    if has_target_refs {
        return Err(IgnoreReason::TargetRefs);
    }
    match selector_labels(sel) {
        None if r.namespace == root => Ok(PolicyScope::Mesh),
        None => Ok(PolicyScope::Namespace),
        Some(s) if s.matches(&workload.labels) => Ok(PolicyScope::Workload),
        Some(_) => Err(IgnoreReason::SelectorMismatch),
    }
}

/// Which fail-closed effect a refused resource has on `workload`.
fn refusal_effect(
    r: &Resource,
    refusal: &Refusal,
    workload: &Workload,
    root: &str,
) -> RefusalEffect {
    // An unreadable namespace (empty) may be this workload's.
    if !r.namespace.is_empty() && r.namespace != workload.namespace && r.namespace != root {
        return RefusalEffect::NotApplicable(IgnoreReason::OtherNamespace);
    }
    let Some(kind) = refusal.kind else {
        return RefusalEffect::DenyAllAndStrictMtls;
    };
    if refusal.target_refs && kind != PolicyKind::PeerAuthentication {
        return RefusalEffect::NotApplicable(IgnoreReason::TargetRefs);
    }
    match &refusal.selector {
        SelectorGuess::Labels(_)
            if kind == PolicyKind::PeerAuthentication && r.namespace == root =>
        {
            return RefusalEffect::NotApplicable(IgnoreReason::RootNamespaceSelector);
        }
        SelectorGuess::Labels(labels)
            if !labels
                .iter()
                .all(|(k, v)| workload.labels.get(k) == Some(v)) =>
        {
            return RefusalEffect::NotApplicable(IgnoreReason::SelectorMismatch);
        }
        _ => {}
    }
    match kind {
        PolicyKind::PeerAuthentication => RefusalEffect::StrictMtls,
        PolicyKind::RequestAuthentication => RefusalEffect::DenyAll,
        PolicyKind::AuthorizationPolicy => {
            if crate::authz::is_dry_run(r) {
                return RefusalEffect::NoDecisionChange;
            }
            match refusal.action {
                Some(crate::Action::Allow) => RefusalEffect::AllowsNothing,
                Some(crate::Action::Audit) => RefusalEffect::NoDecisionChange,
                Some(crate::Action::Deny) | Some(crate::Action::Custom) | None => {
                    RefusalEffect::DenyAll
                }
            }
        }
    }
}
