use std::path::PathBuf;

use outrigger_identity::IdentityError;

/// Errors of this crate. The messages are read by operators: each says which file or input was
/// wrong, what was wrong with it and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read (missing, permissions, ...).
    #[error("cannot read {what} `{path}`: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file or directory could not be written.
    #[error("cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Credentials that were read but are unusable. `subject` names the input, e.g.
    /// ``certificate chain file `/etc/certs/cert-chain.pem` `` or `certificate chain PEM`.
    #[error("{subject}: {reason}")]
    Invalid {
        subject: String,
        reason: String,
        /// Which check refused it (the `reason` label of the rotation-failure metric).
        kind: InvalidKind,
    },
    /// `ca init` found an existing CA.
    #[error(
        "a CA already exists in `{}`: `{}` is present; refusing to overwrite it \
         (use `ca load`, or remove the files to start over)",
        dir.display(), file.display()
    )]
    CaExists { dir: PathBuf, file: PathBuf },
    /// The built-in CA was asked to sign an identity of another trust domain.
    #[error(
        "refusing to issue a certificate for `{identity}`: this CA signs trust domain \
         `{ca_trust_domain}` only"
    )]
    ForeignIdentity {
        identity: String,
        ca_trust_domain: String,
    },
    /// Certificate issuance parameters that cannot be encoded.
    #[error("cannot issue certificate: {0}")]
    Issue(String),
    /// rustls refused to build a configuration.
    #[error("cannot build TLS configuration: {0}")]
    Config(String),
    /// A connection had no peer certificate where one was required.
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// A peer certificate carries no usable SPIFFE identity.
    #[error("peer certificate: {0}")]
    Identity(#[from] IdentityError),
}

/// Which of the credential checks a set failed. Start-up and rotation run the same checks
/// (see [`crate::CertStore`]); this names the failed one for metrics and `/config_dump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidKind {
    /// Not parseable: empty, no PEM block, bad PEM or X.509, unsupported key.
    Malformed,
    /// The leaf carries no (or more than one) SPIFFE URI SAN.
    NoSpiffeIdentity,
    /// The leaf is for another SPIFFE identity than the workload's.
    IdentityMismatch,
    /// The private key does not belong to the leaf certificate.
    KeyMismatch,
    /// The chain does not verify to the trust bundle.
    UntrustedChain,
    /// The leaf (or a CA in the chain) has expired.
    Expired,
    /// The leaf only becomes valid further in the future than clock skew explains.
    NotYetValid,
}

impl InvalidKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidKind::Malformed => "malformed",
            InvalidKind::NoSpiffeIdentity => "no_spiffe_identity",
            InvalidKind::IdentityMismatch => "identity_mismatch",
            InvalidKind::KeyMismatch => "key_mismatch",
            InvalidKind::UntrustedChain => "untrusted_chain",
            InvalidKind::Expired => "expired",
            InvalidKind::NotYetValid => "not_yet_valid",
        }
    }
}

impl TlsError {
    pub(crate) fn invalid(subject: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::invalid_as(InvalidKind::Malformed, subject, reason)
    }

    pub(crate) fn invalid_as(
        kind: InvalidKind,
        subject: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        TlsError::Invalid {
            subject: subject.into(),
            reason: reason.into(),
            kind,
        }
    }

    /// A short, stable name for why a credential set was refused: an [`InvalidKind`], or
    /// `unreadable` (a file could not be read) or `config` (rustls refused the set).
    pub fn refusal_reason(&self) -> &'static str {
        match self {
            TlsError::Invalid { kind, .. } => kind.as_str(),
            TlsError::Read { .. } => "unreadable",
            TlsError::Config(_) => "config",
            _ => "other",
        }
    }
}
