//! Reading YAML files into [`Resource`]s.

use std::collections::BTreeMap;
use std::fmt;

use crate::crd::{
    AuthorizationPolicySpec, Manifest, PeerAuthenticationSpec, RequestAuthenticationSpec,
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
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SourceRef {
    pub file: String,
    pub line: u32,
}

impl fmt::Display for SourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
    },
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
}

impl Resource {
    /// The policy kind, or `None` for [`ResourceKind::Other`].
    pub fn policy_kind(&self) -> Option<PolicyKind> {
        match self.kind {
            ResourceKind::PeerAuthentication(_) => Some(PolicyKind::PeerAuthentication),
            ResourceKind::AuthorizationPolicy(_) => Some(PolicyKind::AuthorizationPolicy),
            ResourceKind::RequestAuthentication(_) => Some(PolicyKind::RequestAuthentication),
            ResourceKind::Other { .. } => None,
        }
    }

    /// The kind as written in the manifest.
    pub fn kind_name(&self) -> &str {
        match &self.kind {
            ResourceKind::Other { kind, .. } => kind,
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
/// validated like istiod's admission webhook; the first problem is returned as a [`LoadError`]
/// naming `source`, line, column and field. Other kinds are returned as
/// [`ResourceKind::Other`].
pub fn parse_documents(source: &str, text: &str) -> Result<Vec<Resource>, LoadError> {
    let docs = yaml::parse_stream(text).map_err(|e| {
        LoadError::new(
            source,
            e.pos.line,
            e.pos.column,
            String::new(),
            format!("invalid YAML: {}", e.message),
        )
    })?;
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
                        out.push(parse_one(source, item).map_err(|mut e| {
                            e.location.field =
                                prefix_field(&format!("items[{i}]"), &e.location.field);
                            e
                        })?);
                    }
                }
                Some(Value::Null) | None => {}
                Some(_) => {
                    let n = doc.get("items").map(|n| n.pos).unwrap_or(doc.pos);
                    return Err(LoadError::new(
                        source,
                        n.line,
                        n.column,
                        "items".into(),
                        "a List's `items` must be a sequence".into(),
                    ));
                }
            }
        } else {
            out.push(parse_one(source, doc)?);
        }
    }
    Ok(out)
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
    let (kind, meta) = match (ours, kind_name.as_str()) {
        (true, "PeerAuthentication") => {
            let m = typed::<PeerAuthenticationSpec>(source, doc)?;
            let spec = m.spec.unwrap_or_default();
            check(source, doc, validate::peer_authentication(&spec))?;
            (ResourceKind::PeerAuthentication(spec), m.metadata)
        }
        (true, "AuthorizationPolicy") => {
            let m = typed::<AuthorizationPolicySpec>(source, doc)?;
            let spec = m.spec.unwrap_or_default();
            check(source, doc, validate::authorization_policy(&spec))?;
            (ResourceKind::AuthorizationPolicy(spec), m.metadata)
        }
        (true, "RequestAuthentication") => {
            let m = typed::<RequestAuthenticationSpec>(source, doc)?;
            let spec = m.spec.unwrap_or_default();
            check(source, doc, validate::request_authentication(&spec))?;
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
                    api_version,
                    kind: kind_name,
                },
                namespace: get("namespace").unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
                name: get("name").unwrap_or_default(),
                annotations: BTreeMap::new(),
                labels: BTreeMap::new(),
                creation_timestamp: None,
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
        namespace,
        name: meta.name,
        annotations: meta.annotations,
        labels: meta.labels,
        creation_timestamp: meta.creation_timestamp,
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

/// Turns the first validation issue into a located error.
fn check(source: &str, doc: &Node, issues: Vec<Issue>) -> Result<(), LoadError> {
    let Some(issue) = issues.into_iter().next() else {
        return Ok(());
    };
    let mut path = vec![PathSeg::Key("spec".into())];
    path.extend(issue.path);
    let pos = doc.pos_of(&path);
    Err(LoadError::new(
        source,
        pos.line,
        pos.column,
        yaml::format_path(&path),
        issue.reason,
    ))
}
