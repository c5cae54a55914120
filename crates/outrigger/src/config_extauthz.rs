//! The `extensionProviders:` section of the agent configuration (documented in
//! `docs/ext-authz.md` and `docs/config.md`): the providers of Istio's CUSTOM authorization
//! action, in MeshConfig's own shape (istio/api `mesh/v1alpha1/config.proto`,
//! `MeshConfig.ExtensionProvider`), validated as istiod validates them
//! (istio/istio `pilot/pkg/security/authz/builder/extauthz.go`: port 1–65535, `pathPrefix`
//! beginning with `/`, `statusOnError` an HTTP status code). A child module of `config`, so
//! that it shares the validator and its file:line:field errors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_saphyr::Spanned;

use outrigger_proxy::ext_authz::{
    Api, BodySettings, DEFAULT_TIMEOUT, HttpApi, NameMatch, Provider,
};

use super::{ConfigError, Range, Validator};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawProvider {
    name: Spanned<String>,
    #[serde(default)]
    envoy_ext_authz_http: Option<Spanned<RawHttp>>,
    #[serde(default)]
    envoy_ext_authz_grpc: Option<Spanned<RawGrpc>>,
}

/// MeshConfig's `EnvoyExternalAuthorizationRequestBody`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBody {
    #[serde(default)]
    max_request_bytes: Option<Spanned<u64>>,
    #[serde(default)]
    allow_partial_message: bool,
    #[serde(default)]
    pack_as_bytes: bool,
}

/// MeshConfig's `EnvoyExternalAuthorizationGrpcProvider`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawGrpc {
    service: Spanned<String>,
    port: Spanned<u64>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    fail_open: bool,
    #[serde(default)]
    status_on_error: Option<Spanned<String>>,
    #[serde(default)]
    include_request_body_in_check: Option<Spanned<RawBody>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHttp {
    service: Spanned<String>,
    port: Spanned<u64>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    path_prefix: Option<Spanned<String>>,
    #[serde(default)]
    fail_open: bool,
    #[serde(default)]
    status_on_error: Option<Spanned<String>>,
    #[serde(default)]
    include_request_headers_in_check: Vec<Spanned<String>>,
    /// Deprecated MeshConfig name of `includeRequestHeadersInCheck`.
    #[serde(default)]
    include_headers_in_check: Vec<Spanned<String>>,
    #[serde(default)]
    include_additional_headers_in_check: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    include_request_body_in_check: Option<Spanned<RawBody>>,
    #[serde(default)]
    headers_to_upstream_on_allow: Vec<Spanned<String>>,
    #[serde(default)]
    headers_to_downstream_on_deny: Vec<Spanned<String>>,
    #[serde(default)]
    headers_to_downstream_on_allow: Vec<Spanned<String>>,
}

/// `timeout`: more than zero, at most istiod's 600 s placeholder's order (a day).
const TIMEOUT: Range = Range {
    min: Duration::from_millis(1),
    max: Duration::from_secs(86_400),
    text: "1ms to 24h",
};

impl Validator<'_> {
    pub(super) fn extension_providers(
        &self,
        raw: &[RawProvider],
    ) -> Result<Vec<Arc<Provider>>, ConfigError> {
        let mut out: Vec<Arc<Provider>> = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            let at = |f: &str| format!("extensionProviders[{i}].{f}");
            // extauthz.go: "extension provider name must not be empty", "... must be unique".
            let taken = out.iter().map(|o| o.name.as_str());
            self.entry_name(&r.name, &at("name"), taken, "providers")?;
            let h = match (&r.envoy_ext_authz_http, &r.envoy_ext_authz_grpc) {
                (Some(h), None) => &h.value,
                (None, Some(g)) => {
                    let f = |x: &str| at(&format!("envoyExtAuthzGrpc.{x}"));
                    let g = &g.value;
                    let common = self.provider_common(
                        &g.service,
                        &g.port,
                        &g.timeout,
                        &g.status_on_error,
                        &g.include_request_body_in_check,
                        &f,
                    )?;
                    out.push(Arc::new(Provider {
                        name: r.name.value.clone(),
                        fail_open: g.fail_open,
                        api: Api::Grpc,
                        ..common
                    }));
                    continue;
                }
                _ => {
                    return Err(self.err(
                        &r.name,
                        &at("envoyExtAuthzHttp"),
                        "a provider needs exactly one of envoyExtAuthzHttp and envoyExtAuthzGrpc \
                         (the kinds supported)",
                    ));
                }
            };
            let f = |x: &str| at(&format!("envoyExtAuthzHttp.{x}"));
            let common = self.provider_common(
                &h.service,
                &h.port,
                &h.timeout,
                &h.status_on_error,
                &h.include_request_body_in_check,
                &f,
            )?;
            let path_prefix = match &h.path_prefix {
                None => String::new(),
                Some(p) if p.value.starts_with('/') && p.value.parse::<http::Uri>().is_ok() => {
                    p.value.clone()
                }
                Some(p) => {
                    return Err(self.err(
                        p,
                        &f("pathPrefix"),
                        format!("pathPrefix must begin with `/`, found: {:?}", p.value),
                    ));
                }
            };
            let mut additional = Vec::new();
            for (k, v) in &h.include_additional_headers_in_check {
                let (Ok(n), Ok(val)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(&v.value),
                ) else {
                    return Err(self.err(
                        v,
                        &f(&format!("includeAdditionalHeadersInCheck.{k}")),
                        "not a valid header name and value",
                    ));
                };
                additional.push((n, val));
            }
            // extauthz.go: "a single wildcard (\"*\") is not supported, change it to either
            // prefix or suffix match".
            for (field, list) in [
                (
                    "includeRequestHeadersInCheck",
                    &h.include_request_headers_in_check,
                ),
                ("includeHeadersInCheck", &h.include_headers_in_check),
                ("headersToUpstreamOnAllow", &h.headers_to_upstream_on_allow),
                (
                    "headersToDownstreamOnDeny",
                    &h.headers_to_downstream_on_deny,
                ),
                (
                    "headersToDownstreamOnAllow",
                    &h.headers_to_downstream_on_allow,
                ),
            ] {
                if let Some(star) = list.iter().find(|s| s.value == "*") {
                    return Err(self.err(
                        star,
                        &f(field),
                        "a single wildcard (\"*\") is not supported, change it to either \
                         prefix or suffix match",
                    ));
                }
            }
            let names = |l: &[Spanned<String>]| {
                l.iter()
                    .map(|s| NameMatch::parse(&s.value))
                    .collect::<Vec<_>>()
            };
            // The deprecated `includeHeadersInCheck` counts only when
            // `includeRequestHeadersInCheck` is not set (extauthz.go).
            let include = if h.include_request_headers_in_check.is_empty() {
                names(&h.include_headers_in_check)
            } else {
                names(&h.include_request_headers_in_check)
            };
            out.push(Arc::new(Provider {
                name: r.name.value.clone(),
                fail_open: h.fail_open,
                api: Api::Http(HttpApi {
                    path_prefix,
                    include_request_headers: include,
                    additional_headers: additional,
                    headers_to_upstream_on_allow: names(&h.headers_to_upstream_on_allow),
                    headers_to_downstream_on_deny: names(&h.headers_to_downstream_on_deny),
                    headers_to_downstream_on_allow: names(&h.headers_to_downstream_on_allow),
                }),
                ..common
            }));
        }
        Ok(out)
    }

    /// What both kinds of provider share, validated as extauthz.go does (`parsePort`,
    /// `parseStatusOnError`): service, port, timeout, statusOnError, includeRequestBodyInCheck.
    /// `name`, `fail_open` and `api` are the caller's.
    fn provider_common(
        &self,
        service: &Spanned<String>,
        port: &Spanned<u64>,
        timeout: &Option<Spanned<String>>,
        status_on_error: &Option<Spanned<String>>,
        body: &Option<Spanned<RawBody>>,
        f: &dyn Fn(&str) -> String,
    ) -> Result<Provider, ConfigError> {
        if service.value.is_empty() {
            return Err(self.err(service, &f("service"), "must not be empty"));
        }
        // istiod takes `namespace/host` or a host; the agent dials the host.
        let host = match service.value.split_once('/') {
            Some((_, host)) => host,
            None => service.value.as_str(),
        }
        .trim_end_matches('.')
        .to_ascii_lowercase();
        let port = match u16::try_from(port.value) {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(self.err(
                    port,
                    &f("port"),
                    format!("must be in the range [1, 65535], found: {}", port.value),
                ));
            }
        };
        let timeout = self.duration(timeout, &f("timeout"), DEFAULT_TIMEOUT, TIMEOUT)?;
        let status_on_error = match status_on_error {
            None => StatusCode::FORBIDDEN,
            Some(s) => match s.value.parse::<u16>().ok().and_then(|c| {
                StatusCode::from_u16(c)
                    .ok()
                    .filter(|c| c.canonical_reason().is_some())
            }) {
                Some(c) => c,
                None => {
                    return Err(self.err(
                        s,
                        &f("statusOnError"),
                        format!("`{}` is not an HTTP status code", s.value),
                    ));
                }
            },
        };
        // Envoy's BufferSettings: `max_request_bytes` must be above 0 (`gt: 0`), so a
        // provider without it cannot be loaded by a sidecar either.
        let body = match body {
            None => None,
            Some(b) => {
                let max_bytes = match &b.value.max_request_bytes {
                    Some(m) if m.value > 0 && m.value <= u64::from(u32::MAX) => m.value as u32,
                    Some(m) => {
                        return Err(self.err(
                            m,
                            &f("includeRequestBodyInCheck.maxRequestBytes"),
                            format!("must be 1 to {}, found: {}", u32::MAX, m.value),
                        ));
                    }
                    None => {
                        return Err(self.err(
                            b,
                            &f("includeRequestBodyInCheck.maxRequestBytes"),
                            "set how many bytes of the body to send (Envoy requires more than 0)",
                        ));
                    }
                };
                Some(BodySettings {
                    max_bytes,
                    allow_partial: b.value.allow_partial_message,
                    pack_as_bytes: b.value.pack_as_bytes,
                })
            }
        };
        Ok(Provider {
            name: String::new(),
            service: host,
            port,
            timeout,
            fail_open: false,
            status_on_error,
            body,
            api: Api::Grpc,
        })
    }
}
