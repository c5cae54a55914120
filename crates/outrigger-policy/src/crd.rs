//! serde types of Istio's `security.istio.io` CRDs (`v1` and `v1beta1` share one schema),
//! with Istio's exact camelCase field names.
//!
//! Every `spec` struct denies unknown fields: a misspelt field is an error, never silently
//! ignored (a sidecar would reject such a resource at admission). `null` is accepted wherever
//! Kubernetes accepts it and means "not set".

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// `null` → default (Kubernetes treats an explicit null as "not set").
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `istio.type.v1beta1.WorkloadSelector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// "One or more labels that indicate a specific set of pods/VMs on which a policy should be
    /// applied."
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Whether every label of the selector is on the workload (an empty selector matches all).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|w| w == v))
    }
}

/// `istio.type.v1beta1.PolicyTargetReference`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyTargetReference {
    #[serde(default, deserialize_with = "nullable")]
    pub group: String,
    #[serde(default, deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub namespace: String,
}

// ---------------------------------------------------------------------------------------------
// PeerAuthentication

/// `PeerAuthentication.MutualTLS.Mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum MtlsModeSpec {
    /// "Inherit from parent, if has one. Otherwise treated as `PERMISSIVE`."
    #[default]
    #[serde(rename = "UNSET")]
    Unset,
    /// "Connection is not tunneled."
    #[serde(rename = "DISABLE")]
    Disable,
    /// "Connection can be either plaintext or mTLS tunnel."
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    /// "Connection is an mTLS tunnel (TLS with client cert must be presented)."
    #[serde(rename = "STRICT")]
    Strict,
}

/// `PeerAuthentication.MutualTLS`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MutualTls {
    /// "Defines the mTLS mode used for peer authentication."
    #[serde(default, deserialize_with = "nullable")]
    pub mode: MtlsModeSpec,
}

/// The `spec` of a `PeerAuthentication`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// "The selector determines the workloads to apply the PeerAuthentication on."
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// "Mutual TLS settings for workload. If not defined, inherit from parent."
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// "Port specific mutual TLS settings. These only apply when a workload selector is
    /// specified." Keys are port numbers (YAML `8080:`), kept as written and checked by
    /// validation (1..=65535).
    #[serde(default)]
    pub port_level_mtls: Option<BTreeMap<String, MutualTls>>,
}

// ---------------------------------------------------------------------------------------------
// AuthorizationPolicy

/// `AuthorizationPolicy.Action`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub enum Action {
    /// "Allow a request only if it matches the rules. This is the default type."
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    /// "Deny a request if it matches any of the rules."
    #[serde(rename = "DENY")]
    Deny,
    /// "Audit a request if it matches any of the rules."
    #[serde(rename = "AUDIT")]
    Audit,
    /// "The CUSTOM action allows an extension to handle the user request if the matching rules
    /// evaluate to true."
    #[serde(rename = "CUSTOM")]
    Custom,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        })
    }
}

/// `AuthorizationPolicy.ExtensionProvider`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExtensionProvider {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
}

/// The `spec` of an `AuthorizationPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Hidden from Istio's docs; accepted and validated like `targetRefs`.
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default, deserialize_with = "nullable")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// "A list of rules to match the request. A match occurs when at least one rule matches the
    /// request. If not set, the match will never occur."
    #[serde(default, deserialize_with = "nullable")]
    pub rules: Vec<Rule>,
    /// "The action to take if the request is matched with the rules. Default is ALLOW if not
    /// specified."
    #[serde(default, deserialize_with = "nullable")]
    pub action: Action,
    /// "Specifies detailed configuration of the CUSTOM action. Must be used only with CUSTOM
    /// action."
    #[serde(default)]
    pub provider: Option<ExtensionProvider>,
}

/// `Rule`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    /// "If not set, any source is allowed." (`from: []` is rejected by validation.)
    #[serde(default)]
    pub from: Option<Vec<RuleFrom>>,
    /// "If not set, any operation is allowed." (`to: []` is rejected by validation.)
    #[serde(default)]
    pub to: Option<Vec<RuleTo>>,
    /// "If not set, any condition is allowed."
    #[serde(default, deserialize_with = "nullable")]
    pub when: Vec<Condition>,
}

/// `Rule.From`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Option<Source>,
}

/// `Rule.To`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Option<Operation>,
}

/// `Source`: who sends the request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    #[serde(default, deserialize_with = "nullable")]
    pub principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub request_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_request_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub namespaces: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_namespaces: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_remote_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub trust_domains: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_trust_domains: Vec<String>,
}

/// `Operation`: what the request does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    #[serde(default, deserialize_with = "nullable")]
    pub hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_ports: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub paths: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_paths: Vec<String>,
}

/// `Condition` (`when`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    #[serde(default, deserialize_with = "nullable")]
    pub key: String,
    #[serde(default, deserialize_with = "nullable")]
    pub values: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_values: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// RequestAuthentication

/// The `spec` of a `RequestAuthentication`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default, deserialize_with = "nullable")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// "Define the list of JWTs that can be validated at the selected workloads' proxy."
    #[serde(default, deserialize_with = "nullable")]
    pub jwt_rules: Vec<JwtRule>,
}

/// `JWTRule`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtRule {
    #[serde(default, deserialize_with = "nullable")]
    pub issuer: String,
    #[serde(default, deserialize_with = "nullable")]
    pub audiences: Vec<String>,
    /// Also accepted as `jwks_uri` (the CRD's `altName`).
    #[serde(default, deserialize_with = "nullable", alias = "jwks_uri")]
    pub jwks_uri: String,
    #[serde(default, deserialize_with = "nullable")]
    pub jwks: String,
    #[serde(default, deserialize_with = "nullable")]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default, deserialize_with = "nullable")]
    pub from_params: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub from_cookies: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub output_payload_to_header: String,
    #[serde(default, deserialize_with = "nullable")]
    pub forward_original_token: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// `google.protobuf.Duration`, which istiod reads with Go's `time.ParseDuration` (`"5s"`,
    /// `"1.5s"`, `"1m30s"`): parsed here, at load, so that a value istiod would refuse is a
    /// located load error and a request never parses it (see [`crate::duration`]).
    #[serde(default)]
    pub timeout: Option<crate::duration::GoDuration>,
    #[serde(default, deserialize_with = "nullable")]
    pub space_delimited_claims: Vec<String>,
}

/// `JWTHeader`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtHeader {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub prefix: String,
}

/// `ClaimToHeader`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClaimToHeader {
    #[serde(default, deserialize_with = "nullable")]
    pub header: String,
    #[serde(default, deserialize_with = "nullable")]
    pub claim: String,
}

// ---------------------------------------------------------------------------------------------
// Envelope

/// The Kubernetes metadata we read. Other fields (`uid`, `resourceVersion`, `managedFields`,
/// `generation`, ...) are accepted and ignored, since `kubectl get -o yaml` prints them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    /// RFC 3339, e.g. `2024-05-01T10:00:00Z`; used to order policies like Istio does.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

/// A whole manifest of one of our kinds. `status` is accepted and ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    bound(deserialize = "S: Deserialize<'de>")
)]
pub(crate) struct Manifest<S> {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<S>,
    #[serde(default)]
    #[allow(dead_code)]
    pub status: serde::de::IgnoredAny,
}
