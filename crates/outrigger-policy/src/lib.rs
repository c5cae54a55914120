//! Istio security policy for Outrigger: `PeerAuthentication`, `AuthorizationPolicy` and
//! `RequestAuthentication` (`security.istio.io/v1` and `v1beta1`), from YAML files to an
//! immutable per-workload [`Snapshot`] that answers "which mTLS mode on this port?" and
//! "is this request allowed?" exactly as an Istio sidecar would.
//!
//! This crate is pure: no I/O, no clock, no environment. Inputs (file text, workload labels,
//! options, request attributes) are parameters.
//!
//! ```
//! use outrigger_policy::*;
//! let yaml = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
//!             metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n";
//! let resources = parse_documents("mesh.yaml", yaml).unwrap();
//! let workload = Workload { namespace: "shop".into(), labels: Default::default() };
//! let snap = Snapshot::build(&resources, &workload, &PolicyOptions::default()).unwrap();
//! assert_eq!(snap.mtls_mode(8080).mode, MtlsMode::Strict);
//! assert_eq!(snap.mtls_mode(8080).source.as_deref(), Some("istio-system/default"));
//! ```
//!
//! Authorizing a request (see [`Request`], [`Decision`]):
//!
//! ```
//! use outrigger_policy::*;
//! let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
//!             metadata: {name: front-only, namespace: shop}\n\
//!             spec:\n  rules:\n  - from:\n    - source: {namespaces: [front]}\n";
//! let resources = parse_documents("authz.yaml", yaml).unwrap();
//! let workload = Workload { namespace: "shop".into(), labels: Default::default() };
//! let snap = Snapshot::build(&resources, &workload, &PolicyOptions::default()).unwrap();
//! let path = normalize_path("/a/../items?x=1", PathNormalization::Base).unwrap();
//! let headers = [("user-agent", "curl")];
//! let req = Request::tcp("10.1.2.3".parse().unwrap(), "10.0.0.9".parse().unwrap(), 8080)
//!     .with_principal("cluster.local/ns/front/sa/web")
//!     .with_http(HttpAttrs { method: "GET", host: "api", path: &path.path, headers: &headers });
//! let decision = snap.authorize(&req);
//! assert!(decision.allowed);
//! assert_eq!(decision.policy(), Some("shop/front-only"));
//! ```
//!
//! # Semantics choices
//!
//! Where Istio's behaviour depends on things a file cannot carry, or where Istio's sidecar
//! and documentation differ, we chose as follows:
//!
//! - **Namespace default.** A manifest without `metadata.namespace` is in namespace
//!   [`DEFAULT_NAMESPACE`] (`default`), as `kubectl apply` with the default context would put it.
//! - **Oldest wins.** Among several PeerAuthentications at the same level, Istio uses the
//!   oldest (`creationTimestamp`, then name, then namespace). We do the same; a resource without
//!   `creationTimestamp` (hand-written files) counts as created at the zero time, as an unset Go
//!   `time.Time` does in istiod, so among hand-written files the order is by name then
//!   namespace: deterministic and independent of file order. Losers are reported in
//!   [`Snapshot::ignored`].
//! - **Default mode.** "UNSET: Inherit from parent, if has one. Otherwise treated as
//!   PERMISSIVE." When no level sets a mode, [`PolicyOptions::default_mtls_mode`] applies
//!   (set it to PERMISSIVE for Istio's own default).
//! - **Root-namespace PeerAuthentication with a selector** is ignored, as Istio's sidecar
//!   composition does (it only takes workload-level PeerAuthentications from non-root
//!   namespaces), despite the API text saying the selector "will additionally match with
//!   workloads in all namespace". AuthorizationPolicy and RequestAuthentication in the root
//!   namespace with a selector do apply to matching workloads in every namespace.
//! - **targetRef / targetRefs.** They attach policies to gateways, waypoints and services. "If
//!   targetRef is specified, ignore the policy altogether" is what istiod does for a sidecar,
//!   and so does Outrigger; such policies are listed in [`Snapshot::ignored`].
//! - **Unknown kinds** (a Deployment in the same file) are not errors; they are returned as
//!   [`ResourceKind::Other`] and listed as ignored.
//! - **TCP connections and HTTP-only fields** (hosts, methods, paths, requestPrincipals,
//!   `request.*` conditions and their `not` forms), as istiod translates them for a sidecar's
//!   TCP filter chain: an ALLOW rule using any of them never matches a TCP connection; in a
//!   DENY, AUDIT or CUSTOM rule they are dropped, so the rule matches more — a DENY rule with
//!   only HTTP fields denies every TCP connection to the workload (istiod warns about it:
//!   "it is recommended to explicitly specify the port").
//! - **CUSTOM.** [`Decision::custom`] names the provider the proxy must ask; a CUSTOM policy
//!   whose provider is not in [`PolicyOptions::extension_providers`], or several CUSTOM
//!   providers for one workload, deny what the policies match, as istiod does.
//! - **Dry run.** `istio.io/dry-run` is read as Go's `strconv.ParseBool`; dry-run policies
//!   are evaluated and reported in [`Decision::dry_run`], never enforced (a dry-run ALLOW does
//!   not make the workload deny-by-default).
//! - **Hosts** are matched case-insensitively against the authority as sent (a `:port`
//!   suffix is part of it, as in Envoy); methods, paths and header values are case-sensitive.
//! - **Path templates** (`{*}`, `{**}`) match as Envoy's URI template matcher: `{*}` one
//!   non-empty segment, `{**}` zero or more characters after the literal `/` that precedes it
//!   (`/a/{**}` does not match `/a`).
//! - **Istio's validation is the bar.** Whatever istiod accepts loads and behaves as the
//!   sidecar (a `spiffe://` principal never matches; Envoy filter metadata is absent), with a
//!   warning in [`Resource::warnings`] / [`Snapshot::warnings`]. What istiod rejects is refused
//!   alone ([`parse_documents_lenient`], [`Snapshot::refused`]) and fails closed for the
//!   workloads it may select ([`RefusalEffect`], docs/policy.md).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;

mod authz;
pub mod crd;
pub mod duration;
mod error;
pub mod jwt;
mod load;
mod path;
pub mod request_authn;
mod snapshot;
mod validate;
mod yaml;

pub use authz::{
    CustomCheck, DRY_RUN_ANNOTATION, Decision, Headers, HttpAttrs, JwtClaims, PolicyMatch, Reason,
    Request,
};
pub use crd::Action;
pub use duration::{DurationError, GoDuration};
pub use error::{ErrorLocation, LoadError, PathError};
pub use load::{
    DEFAULT_NAMESPACE, PolicyKind, Refusal, Resource, ResourceKind, SUPPORTED_VERSIONS,
    SelectorGuess, SourceRef, parse_documents, parse_documents_lenient,
};
pub use path::{NormalizedPath, normalize_path};
pub use snapshot::{
    AppliedPolicy, EffectiveMtls, IgnoreReason, IgnoredPolicy, PolicyScope, RefusalEffect,
    RefusedPolicy, Snapshot,
};

/// The workload Outrigger protects: its namespace and its labels (what selectors match).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// A resolved PeerAuthentication mode (never UNSET).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    /// "Connection is an mTLS tunnel (TLS with client cert must be presented)."
    Strict,
    /// "Connection can be either plaintext or mTLS tunnel."
    Permissive,
    /// "Connection is not tunneled."
    Disable,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        })
    }
}

/// Istio's `meshConfig.pathNormalization.normalization`: how request paths are normalized
/// before AuthorizationPolicy matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PathNormalization {
    /// "No normalization, paths are used as is for any incoming request." (`NONE`)
    None,
    /// "Normalize according to RFC 3986 ... (`.`/`..` resolved, `\` to `/`, unreserved
    /// percent-decoding)". Istio's `DEFAULT` is `BASE`.
    #[default]
    Base,
    /// `BASE` plus merging of adjacent slashes (`//` → `/`).
    MergeSlashes,
    /// `MERGE_SLASHES` plus decoding of `%2F`/`%2f` and `%5C`/`%5c` to `/`, then merging again.
    DecodeAndMergeSlashes,
}

/// Mesh-wide settings that shape how policies are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyOptions {
    /// Istio's root namespace (`meshConfig.rootNamespace`), default `istio-system`.
    pub root_namespace: String,
    /// The local trust domain and its aliases (`meshConfig.trustDomainAliases`).
    pub trust_domains: outrigger_identity::TrustDomains,
    /// The mode when no PeerAuthentication sets one (Istio's own default is PERMISSIVE).
    pub default_mtls_mode: MtlsMode,
    /// How the proxy normalizes paths before calling [`Snapshot::authorize`].
    pub path_normalization: PathNormalization,
    /// The CUSTOM (external authorization) providers configured for this agent.
    pub extension_providers: Vec<String>,
}

impl Default for PolicyOptions {
    /// `istio-system`, trust domain `cluster.local` with no aliases, PERMISSIVE (Istio's
    /// default), BASE normalization, no extension providers.
    fn default() -> Self {
        PolicyOptions {
            root_namespace: "istio-system".into(),
            trust_domains: outrigger_identity::TrustDomains::new("cluster.local", &[])
                .expect("`cluster.local` is a valid trust domain"),
            default_mtls_mode: MtlsMode::Permissive,
            path_normalization: PathNormalization::Base,
            extension_providers: Vec::new(),
        }
    }
}
