//! SPIFFE identities as Istio uses them.
//!
//! Istio names every workload with a SPIFFE ID of the form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` carried as the URI SAN of its
//! certificate. AuthorizationPolicy writes the same identity as a *principal*, without the
//! `spiffe://` scheme: `cluster.local/ns/default/sa/sleep`.
//!
//! This crate is pure: it parses strings and DER, and never touches the network, files or clock.
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

/// The URI scheme of a SPIFFE ID.
pub const SPIFFE_SCHEME: &str = "spiffe://";

/// Why a string or certificate does not carry an identity we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("`{0}` is not a SPIFFE ID: it must start with `spiffe://`")]
    NotSpiffe(String),
    #[error("`{0}` has an invalid trust domain: {1}")]
    BadTrustDomain(String, &'static str),
    #[error("`{0}` has an invalid path: {1}")]
    BadPath(String, &'static str),
    #[error("the certificate could not be parsed: {0}")]
    BadCertificate(String),
    #[error("the certificate has no SPIFFE URI SAN")]
    NoSpiffeSan,
    #[error("the certificate has {0} SPIFFE URI SANs; exactly one is allowed")]
    ManySpiffeSans(usize),
    #[error("trust domain `{found}` is not trusted (trusted: {trusted})")]
    UntrustedDomain { found: String, trusted: String },
}

/// A SPIFFE ID: a trust domain and a path.
///
/// Istio identities have the path `/ns/<namespace>/sa/<service-account>`; other SPIFFE issuers
/// (SPIRE, for example) may use any path, so the path is kept whole and the Istio parts are
/// offered as accessors.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    /// Always starts with `/`.
    path: String,
}

impl Identity {
    /// The Istio identity of a Kubernetes service account.
    pub fn istio(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        format!("{SPIFFE_SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// Parses an identity written as an Istio principal (`cluster.local/ns/x/sa/y`, no scheme).
    pub fn from_principal(principal: &str) -> Result<Self, IdentityError> {
        format!("{SPIFFE_SCHEME}{principal}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The Istio principal: the SPIFFE ID without `spiffe://`, as AuthorizationPolicy writes it.
    pub fn principal(&self) -> String {
        format!("{}{}", self.trust_domain, self.path)
    }

    /// The namespace, for an Istio-shaped path `/ns/<ns>/sa/<sa>`.
    pub fn namespace(&self) -> Option<&str> {
        self.istio_parts().map(|(ns, _)| ns)
    }

    /// The service account, for an Istio-shaped path `/ns/<ns>/sa/<sa>`.
    pub fn service_account(&self) -> Option<&str> {
        self.istio_parts().map(|(_, sa)| sa)
    }

    fn istio_parts(&self) -> Option<(&str, &str)> {
        let rest = self.path.strip_prefix("/ns/")?;
        let (ns, rest) = rest.split_once('/')?;
        let sa = rest.strip_prefix("sa/")?;
        if ns.is_empty() || sa.is_empty() || sa.contains('/') {
            return None;
        }
        Some((ns, sa))
    }

    /// The same identity under another trust domain (used to match trust-domain aliases).
    pub fn with_trust_domain(&self, trust_domain: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_string(),
            path: self.path.clone(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SPIFFE_SCHEME}{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    /// Parses `spiffe://<trust-domain><path>` following the SPIFFE ID specification: the trust
    /// domain is lowercase letters, digits, `.`, `-` and `_`; the path is non-empty segments of
    /// letters, digits, `.`, `-` and `_`, with no `.`/`..` segments and no trailing `/`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SPIFFE_SCHEME)
            .ok_or_else(|| IdentityError::NotSpiffe(s.to_string()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td).map_err(|why| IdentityError::BadTrustDomain(s.into(), why))?;
        if path.is_empty() {
            return Err(IdentityError::BadPath(
                s.into(),
                "a workload identity needs a path",
            ));
        }
        for seg in path[1..].split('/') {
            if seg.is_empty() {
                return Err(IdentityError::BadPath(
                    s.into(),
                    "empty segment or trailing `/`",
                ));
            }
            if seg == "." || seg == ".." {
                return Err(IdentityError::BadPath(
                    s.into(),
                    "`.` and `..` segments are not allowed",
                ));
            }
            if !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                return Err(IdentityError::BadPath(
                    s.into(),
                    "only letters, digits, `.`, `-` and `_` are allowed in segments",
                ));
            }
        }
        Ok(Identity {
            trust_domain: td.to_string(),
            path: path.to_string(),
        })
    }
}

/// Checks a trust domain name as the SPIFFE specification defines it.
pub fn validate_trust_domain(td: &str) -> Result<(), &'static str> {
    if td.is_empty() {
        return Err("it is empty");
    }
    if td.len() > 255 {
        return Err("it is longer than 255 characters");
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("only lowercase letters, digits, `.`, `-` and `_` are allowed");
    }
    Ok(())
}

/// The trust domains this workload accepts peers from: its own plus configured aliases.
///
/// Istio's `meshConfig.trustDomainAliases`: "The trust domain aliases represent the aliases of
/// `trustDomain`. ... the policies with the aliases will also be accepted" — a principal written
/// with any of these domains names the same workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustDomains {
    local: String,
    aliases: Vec<String>,
}

impl TrustDomains {
    pub fn new(local: &str, aliases: &[String]) -> Result<Self, IdentityError> {
        validate_trust_domain(local)
            .map_err(|why| IdentityError::BadTrustDomain(local.to_string(), why))?;
        for a in aliases {
            validate_trust_domain(a)
                .map_err(|why| IdentityError::BadTrustDomain(a.to_string(), why))?;
        }
        let mut aliases: Vec<String> = aliases.iter().filter(|a| *a != local).cloned().collect();
        aliases.sort();
        aliases.dedup();
        Ok(TrustDomains {
            local: local.to_string(),
            aliases,
        })
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn aliases(&self) -> &[String] {
        &self.aliases
    }

    /// Every accepted trust domain, the local one first.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.local.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    pub fn contains(&self, td: &str) -> bool {
        self.all().any(|t| t == td)
    }

    /// Rejects an identity whose trust domain is neither ours nor an alias.
    pub fn check(&self, id: &Identity) -> Result<(), IdentityError> {
        if self.contains(id.trust_domain()) {
            Ok(())
        } else {
            Err(IdentityError::UntrustedDomain {
                found: id.trust_domain().to_string(),
                trusted: self.all().collect::<Vec<_>>().join(", "),
            })
        }
    }
}

/// The SPIFFE URI SANs of a DER certificate, in order.
pub fn spiffe_uris_from_der(der: &[u8]) -> Result<Vec<String>, IdentityError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let mut out = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && uri.starts_with(SPIFFE_SCHEME)
            {
                out.push((*uri).to_string());
            }
        }
    }
    Ok(out)
}

/// The one SPIFFE identity of a DER certificate. The SPIFFE X.509-SVID specification allows
/// exactly one URI SAN; a certificate with none or several is refused.
pub fn identity_from_der(der: &[u8]) -> Result<Identity, IdentityError> {
    let uris = spiffe_uris_from_der(der)?;
    match uris.len() {
        0 => Err(IdentityError::NoSpiffeSan),
        1 => uris[0].parse(),
        n => Err(IdentityError::ManySpiffeSans(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_identity() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.service_account(), Some("sleep"));
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(
            Identity::from_principal("cluster.local/ns/default/sa/sleep").unwrap(),
            id
        );
        assert_eq!(
            Identity::istio("cluster.local", "default", "sleep").unwrap(),
            id
        );
    }

    #[test]
    fn non_istio_paths_have_no_namespace() {
        let id: Identity = "spiffe://example.org/host/web-1".parse().unwrap();
        assert_eq!(id.namespace(), None);
        assert_eq!(id.service_account(), None);
        let id: Identity = "spiffe://example.org/ns/a/sa/b/c".parse().unwrap();
        assert_eq!(id.service_account(), None);
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://",
            "spiffe://cluster.local",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a b/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://cluster.local:8080/ns/a/sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn trust_domains_and_aliases() {
        let tds = TrustDomains::new("cluster.local", &["old.local".into()]).unwrap();
        assert!(tds.contains("cluster.local"));
        assert!(tds.contains("old.local"));
        assert!(!tds.contains("evil.local"));
        let foreign: Identity = "spiffe://evil.local/ns/a/sa/b".parse().unwrap();
        let err = tds.check(&foreign).unwrap_err();
        assert!(err.to_string().contains("evil.local"), "{err}");
        assert!(TrustDomains::new("Bad Domain", &[]).is_err());
    }

    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        for u in uris {
            params.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(*u).unwrap(),
            ));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identity_from_certificate() {
        let der = cert_with_uris(&["spiffe://cluster.local/ns/a/sa/b"]);
        assert_eq!(
            identity_from_der(&der).unwrap().principal(),
            "cluster.local/ns/a/sa/b"
        );
        assert_eq!(
            identity_from_der(&cert_with_uris(&[])),
            Err(IdentityError::NoSpiffeSan)
        );
        assert_eq!(
            identity_from_der(&cert_with_uris(&["https://example.com/x"])),
            Err(IdentityError::NoSpiffeSan)
        );
        assert_eq!(
            identity_from_der(&cert_with_uris(&[
                "spiffe://cluster.local/ns/a/sa/b",
                "spiffe://cluster.local/ns/a/sa/c"
            ])),
            Err(IdentityError::ManySpiffeSans(2))
        );
        assert!(matches!(
            identity_from_der(b"not a certificate"),
            Err(IdentityError::BadCertificate(_))
        ));
    }
}
