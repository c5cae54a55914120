//! Reading YAML files into [`Resource`]s.

use std::collections::BTreeMap;
use std::fmt;

use crate::crd::{
    Action, AuthorizationPolicySpec, Manifest, PeerAuthenticationSpec, RequestAuthenticationSpec,
};
use crate::error::LoadError;
use crate::validate::{self, Issue};
use crate::yaml::{self, Node, PathSeg, Value};

/// The API versions we read (they share one schema).
pub const SUPPORTED_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];
/// The namespace of a resource whose manifest has none, as `kubectl apply` would place it
/// (with the default context namespace).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Where a resource was read from: the source name and the line its document starts on.
/// Line 0 means "no line": a resource that is not read from a file (one from the Kubernetes
/// API, named `cluster:<namespace>/<kind>/<name>`) displays as its name alone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SourceRef {
    pub file: String,
    pub line: u32,
}

impl fmt::Display for SourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return f.write_str(&self.file);
        }
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// The kinds of policy we enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    PeerAuthentication,
    AuthorizationPolicy,
    RequestAuthentication,
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::PeerAuthentication => "PeerAuthentication",
            PolicyKind::AuthorizationPolicy => "AuthorizationPolicy",
            PolicyKind::RequestAuthentication => "RequestAuthentication",
        })
    }
}

/// A typed resource body.
#[derive(Debug, Clone, PartialEq)]
pub enum ResourceKind {
    PeerAuthentication(PeerAuthenticationSpec),
    AuthorizationPolicy(AuthorizationPolicySpec),
    RequestAuthentication(RequestAuthenticationSpec),
    /// Any other `apiVersion`/`kind` (a Deployment in the same file, a `v1alpha1` resource):
    /// not an error, the caller may report it at debug level. [`crate::Snapshot::build`] lists
    /// it under [`crate::Snapshot::ignored`].
    Other {
        api_version: String,
        kind: String,
        /// For a resource that runs workloads (Pod, Deployment, StatefulSet, DaemonSet,
        /// ReplicaSet, Job, CronJob, Istio's WorkloadEntry and WorkloadGroup): the labels its
        /// workloads carry, which selectors match (`outrigger lint` uses them).
        workload_labels: Option<BTreeMap<String, String>>,
        /// For an Istio `EnvoyFilter` (`networking.istio.io`): its `spec` as JSON, for the
        /// caller to recognise the patches it supports (the local rate limit of Istio's
        /// rate-limiting task) and report the rest as ignored.
        envoy_filter: Option<serde_json::Value>,
    },
    /// A document that cannot be loaded (what istiod's validation would reject, or text that
    /// is not a Kubernetes resource): refused alone, with what could still be read of it so
    /// that [`crate::Snapshot::build`] can fail closed for the workloads it might select.
    Refused(Box<Refusal>),
}

/// What could be read of a refused document.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// Why it was refused (file, line, column, field, reason).
    pub error: LoadError,
    /// The policy kind, when `apiVersion` and `kind` could be read; `None` when unknown.
    pub kind: Option<PolicyKind>,
    /// An AuthorizationPolicy's `spec.action` (ALLOW when absent); `None` when unreadable.
    pub action: Option<Action>,
    /// The `spec.selector` as far as it could be read.
    pub selector: SelectorGuess,
    /// `spec.targetRef`/`spec.targetRefs` is set: a sidecar ignores the policy altogether.
    pub target_refs: bool,
}

/// A refused resource's workload selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelectorGuess {
    /// No selector (or one without labels): namespace-wide, or mesh-wide in the root namespace.
    None,
    /// `matchLabels` as written.
    Labels(BTreeMap<String, String>),
    /// Unreadable: treated as selecting every workload (fail closed).
    Unknown,
}

/// One Kubernetes resource read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// File and line of the document.
    pub source: SourceRef,
    pub api_version: String,
    pub kind: ResourceKind,
    /// `metadata.namespace`, or [`DEFAULT_NAMESPACE`] when the manifest has none.
    pub namespace: String,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// `metadata.creationTimestamp` as written (RFC 3339), if any.
    pub creation_timestamp: Option<String>,
    /// Constructs istiod accepts that Outrigger loads with a documented behaviour worth
    /// knowing (a value that never matches, Envoy filter metadata, istiod's own warnings).
    pub warnings: Vec<LoadError>,
}

impl Resource {
    /// The policy kind, or `None` for [`ResourceKind::Other`].
    pub fn policy_kind(&self) -> Option<PolicyKind> {
        match self.kind {
            ResourceKind::PeerAuthentication(_) => Some(PolicyKind::PeerAuthentication),
            ResourceKind::AuthorizationPolicy(_) => Some(PolicyKind::AuthorizationPolicy),
            ResourceKind::RequestAuthentication(_) => Some(PolicyKind::RequestAuthentication),
            ResourceKind::Other { .. } | ResourceKind::Refused(_) => None,
        }
    }

    /// Whether `istio.io/dry-run` makes this policy evaluated and logged but not enforced.
    pub fn is_dry_run(&self) -> bool {
        crate::authz::is_dry_run(self)
    }

    /// The refusal, for a document that could not be loaded.
    pub fn refusal(&self) -> Option<&Refusal> {
        match &self.kind {
            ResourceKind::Refused(r) => Some(r),
            _ => None,
        }
    }

    /// The kind as written in the manifest.
    pub fn kind_name(&self) -> &str {
        match &self.kind {
            ResourceKind::Other { kind, .. } => kind,
            ResourceKind::Refused(r) => match r.kind {
                Some(PolicyKind::PeerAuthentication) => "PeerAuthentication",
                Some(PolicyKind::AuthorizationPolicy) => "AuthorizationPolicy",
                Some(PolicyKind::RequestAuthentication) => "RequestAuthentication",
                None => "unknown kind",
            },
            _ => match self.policy_kind() {
                Some(PolicyKind::PeerAuthentication) => "PeerAuthentication",
                Some(PolicyKind::AuthorizationPolicy) => "AuthorizationPolicy",
                _ => "RequestAuthentication",
            },
        }
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Parses one YAML file: several documents separated by `---`, and `kind: List` documents with
/// `items:` as `kubectl get -o yaml` prints them. Empty documents are skipped.
///
/// Every `security.istio.io/v1` and `v1beta1` PeerAuthentication, AuthorizationPolicy and
/// RequestAuthentication is deserialized strictly (unknown `spec` fields are errors) and
/// validated like istiod's admission webhook; the first refused document is returned as a
/// [`LoadError`] naming `source`, line, column and field. Other kinds are returned as
/// [`ResourceKind::Other`]. Use [`parse_documents_lenient`] to load every valid document of a
/// file and get the refused ones alongside.
pub fn parse_documents(source: &str, text: &str) -> Result<Vec<Resource>, LoadError> {
    let resources = parse_documents_lenient(source, text);
    if let Some(r) = resources.iter().find_map(Resource::refusal) {
        return Err(r.error.clone());
    }
    Ok(resources)
}

/// Like [`parse_documents`], but a document that cannot be loaded is returned as a
/// [`ResourceKind::Refused`] resource next to the valid ones: in Istio each resource stands
/// alone. Text that is not YAML at all gives one refused resource of unknown kind.
pub fn parse_documents_lenient(source: &str, text: &str) -> Vec<Resource> {
    let docs = match yaml::parse_stream(text) {
        Ok(docs) => docs,
        Err(e) => {
            let error = LoadError::new(
                source,
                e.pos.line,
                e.pos.column,
                String::new(),
                format!("invalid YAML: {}", e.message),
            );
            return vec![Resource::refused_unknown(source, e.pos.line, error)];
        }
    };
    let mut out = Vec::new();
    for doc in &docs {
        let is_list = doc.get("kind").and_then(Node::as_str) == Some("List")
            && doc
                .get("apiVersion")
                .and_then(Node::as_str)
                .is_none_or(|v| v == "v1");
        if is_list {
            match doc.get("items").map(|n| &n.value) {
                Some(Value::Seq(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        out.push(parse_one(source, item).unwrap_or_else(|mut e| {
                            e.location.field =
                                prefix_field(&format!("items[{i}]"), &e.location.field);
                            salvage(source, item, e)
                        }));
                    }
                }
                Some(Value::Null) | None => {}
                Some(_) => {
                    let n = doc.get("items").map(|n| n.pos).unwrap_or(doc.pos);
                    let error = LoadError::new(
                        source,
                        n.line,
                        n.column,
                        "items".into(),
                        "a List's `items` must be a sequence".into(),
                    );
                    out.push(Resource::refused_unknown(source, doc.pos.line, error));
                }
            }
        } else {
            out.push(parse_one(source, doc).unwrap_or_else(|e| salvage(source, doc, e)));
        }
    }
    out
}

impl Resource {
    /// A refused document of which nothing useful could be read (not YAML, an unreadable
    /// file): unknown kind, namespace and selector.
    pub fn refused_unknown(source: &str, line: u32, error: LoadError) -> Resource {
        Resource {
            source: SourceRef {
                file: source.to_string(),
                line,
            },
            api_version: String::new(),
            kind: ResourceKind::Refused(Box::new(Refusal {
                error,
                kind: None,
                action: None,
                selector: SelectorGuess::Unknown,
                target_refs: false,
            })),
            namespace: String::new(),
            name: String::new(),
            annotations: BTreeMap::new(),
            labels: BTreeMap::new(),
            creation_timestamp: None,
            warnings: Vec::new(),
        }
    }
}

/// Reads leniently what a refused document still tells: kind, namespace, name, dry-run,
/// action, selector, targetRefs. Anything unreadable is "unknown" (see [`Refusal`]).
fn salvage(source: &str, doc: &Node, error: LoadError) -> Resource {
    let text = |n: Option<&Node>| n.and_then(Node::as_str).map(str::to_string);
    let api_version = text(doc.get("apiVersion")).unwrap_or_default();
    let kind_name = text(doc.get("kind")).unwrap_or_default();
    let kind = if SUPPORTED_VERSIONS.contains(&api_version.as_str()) {
        match kind_name.as_str() {
            "PeerAuthentication" => Some(PolicyKind::PeerAuthentication),
            "AuthorizationPolicy" => Some(PolicyKind::AuthorizationPolicy),
            "RequestAuthentication" => Some(PolicyKind::RequestAuthentication),
            _ => None,
        }
    } else {
        None
    };
    let meta = doc.get("metadata");
    let namespace = match meta.map(|m| (&m.value, m.get("namespace").map(|n| &n.value))) {
        // No namespace: `kubectl apply`'s default; unreadable: unknown (empty), which
        // counts as this workload's namespace.
        None | Some((Value::Map(_), None | Some(Value::Null))) => DEFAULT_NAMESPACE.to_string(),
        Some((Value::Map(_), Some(Value::Str(ns)))) if !ns.is_empty() => ns.clone(),
        Some((Value::Map(_), Some(Value::Str(_)))) => DEFAULT_NAMESPACE.to_string(),
        Some(_) => String::new(),
    };
    let name = text(meta.and_then(|m| m.get("name"))).unwrap_or_default();
    let mut annotations = BTreeMap::new();
    if let Some(v) = text(
        meta.and_then(|m| m.get("annotations"))
            .and_then(|a| a.get(crate::authz::DRY_RUN_ANNOTATION)),
    ) {
        annotations.insert(crate::authz::DRY_RUN_ANNOTATION.to_string(), v);
    }
    let spec = doc.get("spec");
    let action = match spec.and_then(|s| s.get("action")).map(|n| &n.value) {
        None | Some(Value::Null) => Some(Action::Allow),
        Some(Value::Str(a)) => match a.as_str() {
            "ALLOW" => Some(Action::Allow),
            "DENY" => Some(Action::Deny),
            "AUDIT" => Some(Action::Audit),
            "CUSTOM" => Some(Action::Custom),
            _ => None,
        },
        Some(_) => None,
    };
    let selector = match spec.and_then(|s| s.get("selector")).map(|n| &n.value) {
        None | Some(Value::Null) => SelectorGuess::None,
        Some(Value::Map(_)) => {
            match spec
                .and_then(|s| s.get("selector"))
                .and_then(|s| s.get("matchLabels"))
                .map(|n| &n.value)
            {
                None | Some(Value::Null) => SelectorGuess::None,
                Some(Value::Map(entries)) => {
                    let labels: Option<BTreeMap<String, String>> = entries
                        .iter()
                        .map(|(k, v)| v.as_str().map(|v| (k.name.clone(), v.to_string())))
                        .collect();
                    match labels {
                        Some(l) if l.is_empty() => SelectorGuess::None,
                        Some(l) => SelectorGuess::Labels(l),
                        None => SelectorGuess::Unknown,
                    }
                }
                Some(_) => SelectorGuess::Unknown,
            }
        }
        Some(_) => SelectorGuess::Unknown,
    };
    let set = |k: &str| {
        spec.and_then(|s| s.get(k))
            .is_some_and(|n| !matches!(&n.value, Value::Null) && n.value != Value::Seq(Vec::new()))
    };
    let target_refs = set("targetRef") || set("targetRefs");
    let error = if error.resource.is_none() && kind.is_some() {
        let label = format!("{kind_name} {}/{}", namespace, name);
        error.with_resource(label)
    } else {
        error
    };
    Resource {
        source: SourceRef {
            file: source.to_string(),
            line: doc.pos.line,
        },
        api_version,
        kind: ResourceKind::Refused(Box::new(Refusal {
            error,
            kind,
            action,
            selector,
            target_refs,
        })),
        namespace,
        name,
        annotations,
        labels: BTreeMap::new(),
        creation_timestamp: None,
        warnings: Vec::new(),
    }
}

fn prefix_field(prefix: &str, field: &str) -> String {
    if field.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

fn parse_one(source: &str, doc: &Node) -> Result<Resource, LoadError> {
    let err_at = |path: &[PathSeg], reason: String| {
        let pos = doc.pos_of(path);
        LoadError::new(
            source,
            pos.line,
            pos.column,
            yaml::format_path(path),
            reason,
        )
    };
    if !matches!(doc.value, Value::Map(_)) {
        return Err(err_at(
            &[],
            "a Kubernetes resource must be a mapping with `apiVersion` and `kind`".into(),
        ));
    }
    let field_str = |name: &str| -> Result<String, LoadError> {
        match doc.get(name) {
            Some(Node {
                value: Value::Str(s),
                ..
            }) if !s.is_empty() => Ok(s.clone()),
            _ => Err(err_at(
                &[PathSeg::Key(name.into())],
                format!("`{name}` must be set to a non-empty string"),
            )),
        }
    };
    let api_version = field_str("apiVersion")?;
    let kind_name = field_str("kind")?;
    let source_ref = SourceRef {
        file: source.to_string(),
        line: doc.pos.line,
    };

    let ours = SUPPORTED_VERSIONS.contains(&api_version.as_str());
    let warnings: Vec<LoadError>;
    let (kind, meta) = match (ours, kind_name.as_str()) {
        (true, "PeerAuthentication") => {
            let m = typed::<PeerAuthenticationSpec>(source, doc)?;
            let spec = m.spec.unwrap_or_default();
            warnings = check(source, doc, validate::peer_authentication(&spec))?;
            (ResourceKind::PeerAuthentication(spec), m.metadata)
        }
        (true, "AuthorizationPolicy") => {
            let m = typed::<AuthorizationPolicySpec>(source, doc)?;
            let spec = m.spec.unwrap_or_default();
            warnings = check(source, doc, validate::authorization_policy(&spec))?;
            (ResourceKind::AuthorizationPolicy(spec), m.metadata)
        }
        (true, "RequestAuthentication") => {
            let m = typed::<RequestAuthenticationSpec>(source, doc)?;
            let spec = m.spec.unwrap_or_default();
            warnings = check(source, doc, validate::request_authentication(&spec))?;
            (ResourceKind::RequestAuthentication(spec), m.metadata)
        }
        _ => {
            // Not ours: read what metadata we can, leniently.
            let meta = doc.get("metadata");
            let get = |k: &str| {
                meta.and_then(|m| m.get(k))
                    .and_then(Node::as_str)
                    .map(str::to_string)
            };
            let r = Resource {
                source: source_ref,
                api_version: api_version.clone(),
                kind: ResourceKind::Other {
                    workload_labels: workload_labels(&kind_name, doc),
                    envoy_filter: (kind_name == "EnvoyFilter"
                        && api_version.starts_with("networking.istio.io/"))
                    .then(|| doc.get("spec").map_or(serde_json::Value::Null, to_json)),
                    api_version,
                    kind: kind_name,
                },
                namespace: get("namespace").unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
                name: get("name").unwrap_or_default(),
                annotations: BTreeMap::new(),
                labels: BTreeMap::new(),
                creation_timestamp: None,
                warnings: Vec::new(),
            };
            return Ok(r);
        }
    };
    let label = |e: LoadError| e.with_resource(format!("{kind_name} {}", meta.name));
    if meta.name.is_empty() {
        return Err(label(err_at(
            &[PathSeg::Key("metadata".into()), PathSeg::Key("name".into())],
            "`metadata.name` must be set".into(),
        )));
    }
    let namespace = match meta.namespace {
        Some(ns) if !ns.is_empty() => ns,
        _ => DEFAULT_NAMESPACE.to_string(),
    };
    if let Some(ts) = &meta.creation_timestamp
        && validate::parse_timestamp(ts).is_none()
    {
        return Err(label(err_at(
            &[
                PathSeg::Key("metadata".into()),
                PathSeg::Key("creationTimestamp".into()),
            ],
            format!("`{ts}` is not an RFC 3339 timestamp such as 2024-05-01T10:00:00Z"),
        )));
    }
    Ok(Resource {
        source: source_ref,
        api_version,
        kind,
        annotations: meta.annotations,
        labels: meta.labels,
        creation_timestamp: meta.creation_timestamp,
        warnings: warnings
            .into_iter()
            .map(|w| w.with_resource(format!("{kind_name} {namespace}/{}", meta.name)))
            .collect(),
        namespace,
        name: meta.name,
    })
}

fn typed<'a, S: serde::Deserialize<'a>>(
    source: &str,
    doc: &'a Node,
) -> Result<Manifest<S>, LoadError> {
    yaml::from_node::<Manifest<S>>(doc).map_err(|e| {
        let pos = e.pos.unwrap_or(doc.pos);
        LoadError::new(
            source,
            pos.line,
            pos.column,
            yaml::format_path(&e.path()),
            e.message.clone(),
        )
    })
}

/// Turns the first validation error into a located error; returns the warnings, located.
fn check(source: &str, doc: &Node, issues: Vec<Issue>) -> Result<Vec<LoadError>, LoadError> {
    let locate = |issue: Issue| {
        let mut path = vec![PathSeg::Key("spec".into())];
        path.extend(issue.path);
        let pos = doc.pos_of(&path);
        LoadError::new(
            source,
            pos.line,
            pos.column,
            yaml::format_path(&path),
            issue.reason,
        )
    };
    let (warnings, errors): (Vec<Issue>, Vec<Issue>) = issues.into_iter().partition(|i| i.warning);
    match errors.into_iter().next() {
        Some(e) => Err(locate(e)),
        None => Ok(warnings.into_iter().map(locate).collect()),
    }
}

/// A YAML node as JSON (mapping keys are strings already).
fn to_json(n: &Node) -> serde_json::Value {
    match &n.value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Int(i) => (*i).into(),
        Value::UInt(u) => (*u).into(),
        Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
        }
        Value::Str(s) => s.clone().into(),
        Value::Seq(items) => items.iter().map(to_json).collect(),
        Value::Map(entries) => entries
            .iter()
            .map(|(k, v)| (k.name.clone(), to_json(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    }
}

/// The labels of the workloads a Kubernetes resource runs, read leniently (`None` for a kind
/// that runs none, or labels that are not a string map): where each kind keeps its pod
/// template's labels, and Istio's WorkloadEntry (`spec.labels`) and WorkloadGroup
/// (`spec.metadata.labels`).
fn workload_labels(kind: &str, doc: &Node) -> Option<BTreeMap<String, String>> {
    let path: &[&str] = match kind {
        "Pod" => &["metadata", "labels"],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            &["spec", "template", "metadata", "labels"]
        }
        "CronJob" => &[
            "spec",
            "jobTemplate",
            "spec",
            "template",
            "metadata",
            "labels",
        ],
        "WorkloadEntry" => &["spec", "labels"],
        "WorkloadGroup" => &["spec", "metadata", "labels"],
        _ => return None,
    };
    let mut node = doc;
    for key in path {
        match node.get(key) {
            Some(n) => node = n,
            // A workload without labels: selectors with labels match none of it.
            None => return Some(BTreeMap::new()),
        }
    }
    match &node.value {
        Value::Map(entries) => Some(
            entries
                .iter()
                .filter_map(|(k, v)| Some((k.name.clone(), v.as_str()?.to_string())))
                .collect(),
        ),
        Value::Null => Some(BTreeMap::new()),
        _ => None,
    }
}
