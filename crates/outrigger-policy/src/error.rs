//! Load errors: what was wrong and where (file, line, column, field).

use std::fmt;

/// Where a load error was found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorLocation {
    /// The source name given to [`crate::parse_documents`] (usually a file path).
    pub file: String,
    /// 1-based line; 0 when unknown.
    pub line: u32,
    /// 1-based column; 0 when unknown.
    pub column: u32,
    /// The field path inside the resource, e.g. `spec.portLevelMtls.8080.mode` or
    /// `spec.rules[0].from[1].source.ipBlocks[0]`; empty for document-level errors.
    pub field: String,
}

impl fmt::Display for ErrorLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
            if self.column > 0 {
                write!(f, ":{}", self.column)?;
            }
        }
        f.write_str(": ")?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        Ok(())
    }
}

/// A policy file that cannot be loaded: YAML syntax, schema (unknown field, bad enum value,
/// wrong type) or validation (what istiod's admission webhook would reject).
///
/// Displays as `file:line:column: field.path: reason`, e.g.
/// ``policies/pa.yaml:7:9: spec.mtls.mode: unknown variant `STRCT`, expected one of `UNSET`, `DISABLE`, `PERMISSIVE`, `STRICT` ``.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}{reason}")]
pub struct LoadError {
    pub location: ErrorLocation,
    /// The resource the error is in (`Kind namespace/name`), when known.
    pub resource: Option<String>,
    pub reason: String,
}

impl LoadError {
    pub(crate) fn new(file: &str, line: u32, column: u32, field: String, reason: String) -> Self {
        LoadError {
            location: ErrorLocation {
                file: file.to_string(),
                line,
                column,
                field,
            },
            resource: None,
            reason,
        }
    }

    pub(crate) fn with_resource(mut self, resource: String) -> Self {
        self.resource = Some(resource);
        self
    }
}

/// A request path that cannot be normalized; the proxy answers `400 Bad Request`, as Envoy does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is empty or does not start with `/`")]
    NotAbsolute,
    #[error("an escaped NUL (%00) at byte {0}")]
    BadPercentEncoding(usize),
    #[error("the path contains a forbidden character (byte {0:#04x})")]
    ForbiddenCharacter(u8),
}
