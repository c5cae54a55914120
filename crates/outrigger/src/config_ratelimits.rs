//! The `rateLimits:` section of the agent configuration (documented in `docs/config.md`):
//! local rate limits on inbound HTTP, in the terms of Envoy's `local_ratelimit` filter
//! (`token_bucket`, `enable_x_ratelimit_headers`, `response_headers_to_add`). A child module of
//! `config`, so that it shares the validator and its file:line:field errors.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;
use serde_saphyr::Spanned;

use outrigger_proxy::ratelimit::{MIN_FILL_INTERVAL, RateLimitRule, TokenBucket};
use outrigger_proxy::{InboundConfig, Protocol};

use super::{ConfigError, Range, Validator};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawRateLimit {
    name: Spanned<String>,
    #[serde(default)]
    listeners: Vec<Spanned<String>>,
    #[serde(default, rename = "match")]
    matches: RawMatch,
    #[serde(default)]
    per_principal: bool,
    token_bucket: Spanned<RawTokenBucket>,
    #[serde(default)]
    rate_limit_headers: bool,
    #[serde(default)]
    response_headers: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMatch {
    #[serde(default)]
    path_prefix: Option<Spanned<String>>,
    #[serde(default)]
    methods: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTokenBucket {
    max_tokens: Spanned<u64>,
    #[serde(default)]
    tokens_per_fill: Option<Spanned<u64>>,
    fill_interval: Spanned<String>,
}

/// `tokenBucket.fillInterval`: Envoy's minimum of 50 ms ("fill_interval must be >= 50ms"), at
/// most a day.
const FILL: Range = Range {
    min: MIN_FILL_INTERVAL,
    max: Duration::from_secs(86_400),
    text: "50ms to 24h",
};

impl Validator<'_> {
    pub(super) fn rate_limits(
        &self,
        raw: &[RawRateLimit],
        inbound: &[InboundConfig],
    ) -> Result<Vec<RateLimitRule>, ConfigError> {
        let mut out: Vec<RateLimitRule> = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            let at = |f: &str| format!("rateLimits[{i}].{f}");
            let taken = out.iter().map(|o| o.name.as_str());
            self.entry_name(&r.name, &at("name"), taken, "rules")?;
            for l in &r.listeners {
                match inbound.iter().find(|i| i.name == l.value) {
                    None => {
                        return Err(self.err(
                            l,
                            &at("listeners"),
                            format!("no inbound listener is named `{}`", l.value),
                        ));
                    }
                    Some(i) if i.protocol == Protocol::Tcp => {
                        return Err(self.err(
                            l,
                            &at("listeners"),
                            format!(
                                "`{}` is a tcp listener: rate limits apply to HTTP requests",
                                l.value
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
            if let Some(p) = &r.matches.path_prefix
                && !p.value.starts_with('/')
            {
                return Err(self.err(p, &at("match.pathPrefix"), "must start with `/`"));
            }
            let mut methods = Vec::new();
            for m in &r.matches.methods {
                let method = Method::from_bytes(m.value.as_bytes())
                    .map_err(|_| self.err(m, &at("match.methods"), "not an HTTP method token"))?;
                methods.push(method);
            }
            let tb = &r.token_bucket.value;
            let count = |v: &Spanned<u64>, field: &str| -> Result<u32, ConfigError> {
                if v.value == 0 {
                    return Err(self.err(v, &at(field), "must be at least 1"));
                }
                u32::try_from(v.value)
                    .map_err(|_| self.err(v, &at(field), "must be at most 4294967295"))
            };
            let max_tokens = count(&tb.max_tokens, "tokenBucket.maxTokens")?;
            // Envoy's default `tokens_per_fill` is 1.
            let tokens_per_fill = match &tb.tokens_per_fill {
                Some(v) => count(v, "tokenBucket.tokensPerFill")?,
                None => 1,
            };
            let fill_interval = self.duration(
                &Some(tb.fill_interval.clone()),
                &at("tokenBucket.fillInterval"),
                Duration::ZERO,
                FILL,
            )?;
            let mut response_headers = Vec::new();
            for (k, v) in &r.response_headers {
                let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                    self.err(
                        v,
                        &at(&format!("responseHeaders.{k}")),
                        "not an HTTP header name",
                    )
                })?;
                let value = HeaderValue::from_str(&v.value).map_err(|_| {
                    self.err(
                        v,
                        &at(&format!("responseHeaders.{k}")),
                        "not a valid header value",
                    )
                })?;
                response_headers.push((name, value));
            }
            out.push(RateLimitRule {
                name: r.name.value.clone(),
                listeners: r.listeners.iter().map(|l| l.value.clone()).collect(),
                path_prefix: r.matches.path_prefix.as_ref().map(|p| p.value.clone()),
                methods,
                per_principal: r.per_principal,
                bucket: TokenBucket {
                    max_tokens,
                    tokens_per_fill,
                    fill_interval,
                },
                rate_limit_headers: r.rate_limit_headers,
                response_headers,
            });
        }
        Ok(out)
    }
}
