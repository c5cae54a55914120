//! RequestAuthentication compiled for the request path: each `jwtRules` entry turned, once per
//! policy snapshot, into what the JWT layer needs — where to look for tokens (header names
//! lowercased), where its keys come from (an inline `jwks` parsed here), the fetch timeout as a
//! duration with Istio's default applied, the header names it writes — so that a request reads
//! values and never parses, lowercases or copies a rule.

use std::sync::Arc;
use std::time::Duration;

use crate::crd::{JwtRule, RequestAuthenticationSpec};
use crate::jwt::Jwks;

/// Istio's default `timeout` for fetching a JWKS: "If not set, the default timeout is 5s."
/// (`JWTRule.timeout`, istio/api security/v1beta1/request_authentication.proto).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a rule's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `jwks`: parsed when the snapshot is built. A set that does not parse stays an error,
    /// answered per token as Envoy answers a key set it cannot use (the rest of the policy set
    /// is unaffected: istiod's validation does not parse `jwks`).
    Inline(Result<Arc<Jwks>, String>),
    /// `jwksUri`, or only `issuer` (OpenID discovery): fetched and cached by the proxy.
    Remote(RemoteKeys),
}

/// A key set fetched over the network, and the key of the proxy's cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RemoteKeys {
    Uri(String),
    /// Only `issuer` given: "the public key set is implicitly set from the OpenID Connect
    /// spec" — `<issuer>/.well-known/openid-configuration` names `jwks_uri`.
    Discovery(String),
}

/// Where a rule looks for tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenLocations {
    /// "If no explicit location is specified the following default locations are tried in
    /// order: 1) The Authorization header using the Bearer schema ... 2) `access_token` query
    /// parameter."
    Default,
    Explicit {
        /// (lowercased header name, prefix)
        headers: Vec<(String, String)>,
        params: Vec<String>,
        cookies: Vec<String>,
    },
}

/// One `jwtRules` entry, compiled.
#[derive(Debug, Clone)]
pub struct JwtRuleModel {
    /// `namespace/name` of the RequestAuthentication.
    pub policy: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: KeySource,
    pub locations: TokenLocations,
    pub fetch_timeout: Duration,
    pub forward_original_token: bool,
    /// `outputPayloadToHeader`, lowercased.
    pub output_payload_to_header: Option<String>,
    /// `outputClaimToHeaders`: (lowercased header, claim path).
    pub output_claim_to_headers: Vec<(String, String)>,
    pub space_delimited_claims: Vec<String>,
}

impl JwtRuleModel {
    fn compile(policy: &str, r: &JwtRule) -> JwtRuleModel {
        let keys = if !r.jwks.is_empty() {
            KeySource::Inline(
                Jwks::parse(&r.jwks)
                    .map(Arc::new)
                    .map_err(|e| format!("inline jwks: {e}")),
            )
        } else if !r.jwks_uri.is_empty() {
            KeySource::Remote(RemoteKeys::Uri(r.jwks_uri.clone()))
        } else {
            KeySource::Remote(RemoteKeys::Discovery(r.issuer.clone()))
        };
        let explicit =
            !r.from_headers.is_empty() || !r.from_params.is_empty() || !r.from_cookies.is_empty();
        let locations = if explicit {
            TokenLocations::Explicit {
                headers: r
                    .from_headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), h.prefix.clone()))
                    .collect(),
                params: r.from_params.clone(),
                cookies: r.from_cookies.clone(),
            }
        } else {
            TokenLocations::Default
        };
        JwtRuleModel {
            policy: policy.to_string(),
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            keys,
            locations,
            // Validated at load (>= 1 ms, Go's range), so this never falls back silently.
            fetch_timeout: r
                .timeout
                .and_then(|t| t.to_std())
                .unwrap_or(DEFAULT_FETCH_TIMEOUT),
            forward_original_token: r.forward_original_token,
            output_payload_to_header: (!r.output_payload_to_header.is_empty())
                .then(|| r.output_payload_to_header.to_ascii_lowercase()),
            output_claim_to_headers: r
                .output_claim_to_headers
                .iter()
                .map(|c| (c.header.to_ascii_lowercase(), c.claim.clone()))
                .collect(),
            space_delimited_claims: r.space_delimited_claims.clone(),
        }
    }
}

/// Every rule of the RequestAuthentications that apply, in their order.
pub(crate) fn compile(specs: &[(String, RequestAuthenticationSpec)]) -> Vec<JwtRuleModel> {
    specs
        .iter()
        .flat_map(|(key, spec)| spec.jwt_rules.iter().map(|r| JwtRuleModel::compile(key, r)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> JwtRule {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_and_explicit_locations() {
        let m = JwtRuleModel::compile("ns/a", &rule("issuer: https://idp\n"));
        assert_eq!(m.locations, TokenLocations::Default);
        assert!(
            matches!(&m.keys, KeySource::Remote(RemoteKeys::Discovery(i)) if i == "https://idp")
        );
        assert_eq!(m.fetch_timeout, DEFAULT_FETCH_TIMEOUT);
        assert_eq!(m.output_payload_to_header, None);

        let m = JwtRuleModel::compile(
            "ns/b",
            &rule(
                "issuer: i\njwksUri: https://idp/keys\ntimeout: 1.5s\nfromHeaders: [{name: X-Token, prefix: 'Bearer '}]\nfromCookies: [session]\noutputPayloadToHeader: X-Payload\noutputClaimToHeaders: [{header: X-Sub, claim: sub}]\n",
            ),
        );
        assert_eq!(
            m.locations,
            TokenLocations::Explicit {
                headers: vec![("x-token".into(), "Bearer ".into())],
                params: vec![],
                cookies: vec!["session".into()],
            }
        );
        assert!(
            matches!(&m.keys, KeySource::Remote(RemoteKeys::Uri(u)) if u == "https://idp/keys")
        );
        assert_eq!(m.fetch_timeout, Duration::from_millis(1500));
        assert_eq!(m.output_payload_to_header.as_deref(), Some("x-payload"));
        assert_eq!(
            m.output_claim_to_headers,
            vec![("x-sub".into(), "sub".into())]
        );
        assert_eq!(m.policy, "ns/b");
    }

    #[test]
    fn inline_keys_are_parsed_once_and_a_bad_set_stays_an_error() {
        let good = r#"{"keys":[{"kty":"RSA","kid":"k","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"}]}"#;
        let m = JwtRuleModel::compile("ns/a", &rule(&format!("issuer: i\njwks: '{good}'\n")));
        assert!(matches!(&m.keys, KeySource::Inline(Ok(_))));
        let m = JwtRuleModel::compile("ns/a", &rule("issuer: i\njwks: 'not json'\n"));
        assert!(matches!(&m.keys, KeySource::Inline(Err(e)) if e.starts_with("inline jwks")));
    }
}
