//! Istio `EnvoyFilter`s found among the policy files. One shape is applied: the local rate
//! limit of Istio's rate-limiting task (istio.io/latest/docs/tasks/policy-enforcement/
//! rate-limit/, "Local rate limit"): an `HTTP_FILTER` patch in `SIDECAR_INBOUND` that inserts
//! `envoy.filters.http.local_ratelimit` with a `token_bucket`. It becomes a rate limit rule
//! exactly as `rateLimits:` would write it (crate::config_ratelimits). Any other EnvoyFilter —
//! or a patch, or a field of the filter, that Outrigger does not implement — is reported as
//! ignored with the reason, and nothing of that EnvoyFilter is applied: never half-applied.

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use outrigger_policy::{Resource, ResourceKind, Workload, duration::GoDuration};
use outrigger_proxy::ratelimit::{MIN_FILL_INTERVAL, RateLimitRule, TokenBucket};
use serde_json::Value;

/// The type of the filter config, as Istio's task writes it (inside a `udpa.type.v1.TypedStruct`
/// or directly).
const LOCAL_RATE_LIMIT: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// What the EnvoyFilters of a policy set mean for this workload.
#[derive(Debug, Default)]
pub struct EnvoyFilters {
    pub rate_limits: Vec<RateLimitRule>,
    /// `EnvoyFilter ns/name (file:line)` and why it is not applied.
    pub ignored: Vec<(String, String)>,
}

/// Reads every EnvoyFilter in `resources` that applies to `workload` (in `root` or in the
/// workload's namespace, with a `workloadSelector` that matches its labels, or none).
pub fn interpret(resources: &[Resource], workload: &Workload, root: &str) -> EnvoyFilters {
    let mut out = EnvoyFilters::default();
    for r in resources {
        let ResourceKind::Other {
            envoy_filter: Some(spec),
            ..
        } = &r.kind
        else {
            continue;
        };
        let label = format!(
            "EnvoyFilter {}/{} ({}:{})",
            r.namespace, r.name, r.source.file, r.source.line
        );
        if r.namespace != root && r.namespace != workload.namespace {
            continue;
        }
        let selected = match spec.get("workloadSelector").and_then(|s| s.get("labels")) {
            None => true,
            Some(Value::Object(labels)) => labels.iter().all(|(k, v)| {
                v.as_str()
                    .is_some_and(|v| workload.labels.get(k).is_some_and(|w| w == v))
            }),
            Some(_) => false,
        };
        if !selected {
            continue;
        }
        match rate_limit(r, spec) {
            Ok(rule) => out.rate_limits.push(rule),
            Err(why) => out.ignored.push((label, why)),
        }
    }
    out
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// For `outrigger lint`: why an EnvoyFilter would not be applied (`None`: it is Istio's local
/// rate limit, which Outrigger applies), whatever workload it selects.
pub fn not_applied(r: &Resource) -> Option<String> {
    match &r.kind {
        ResourceKind::Other {
            envoy_filter: Some(spec),
            ..
        } => rate_limit(r, spec).err(),
        _ => None,
    }
}

/// The one EnvoyFilter shape applied, or why this one is not.
fn rate_limit(r: &Resource, spec: &Value) -> Result<RateLimitRule, String> {
    let known = [
        "workloadSelector",
        "configPatches",
        "priority",
        "targetRefs",
    ];
    if let Some(k) = spec
        .as_object()
        .and_then(|o| o.keys().find(|k| !known.contains(&k.as_str())))
    {
        return Err(format!("`spec.{k}` is not supported"));
    }
    if spec.get("targetRefs").is_some() {
        return Err("`targetRefs` (waypoints and gateways) do not apply to a sidecar".into());
    }
    let patches = spec
        .get("configPatches")
        .and_then(Value::as_array)
        .filter(|p| !p.is_empty())
        .ok_or("no `configPatches`")?;
    if patches.len() != 1 {
        return Err(format!(
            "{} patches: only a single local rate limit patch is applied",
            patches.len()
        ));
    }
    let p = &patches[0];
    if str_at(p, &["applyTo"]) != Some("HTTP_FILTER") {
        return Err(format!(
            "applyTo {}: only HTTP_FILTER (the local rate limit filter) is applied",
            str_at(p, &["applyTo"]).unwrap_or("(none)")
        ));
    }
    match str_at(p, &["match", "context"]) {
        Some("SIDECAR_INBOUND") => {}
        other => {
            return Err(format!(
                "match.context {}: only SIDECAR_INBOUND applies to Outrigger's inbound",
                other.unwrap_or("(ANY)")
            ));
        }
    }
    if let Some(port) = p
        .get("match")
        .and_then(|m| m.get("listener"))
        .and_then(|l| l.get("portNumber"))
    {
        return Err(format!(
            "match.listener.portNumber {port}: per-port patches are not applied"
        ));
    }
    match str_at(p, &["patch", "operation"]) {
        Some("INSERT_BEFORE" | "INSERT_FIRST" | "ADD") => {}
        other => {
            return Err(format!(
                "patch.operation {}: only inserting the filter is applied",
                other.unwrap_or("(none)")
            ));
        }
    }
    let value = p
        .get("patch")
        .and_then(|p| p.get("value"))
        .ok_or("no patch.value")?;
    if str_at(value, &["name"]) != Some("envoy.filters.http.local_ratelimit") {
        return Err(format!(
            "filter {}: only envoy.filters.http.local_ratelimit is applied",
            str_at(value, &["name"]).unwrap_or("(unnamed)")
        ));
    }
    let tc = value.get("typed_config").ok_or("no typed_config")?;
    // Istio's task wraps the config in a TypedStruct.
    let cfg = match str_at(tc, &["@type"]) {
        Some("type.googleapis.com/udpa.type.v1.TypedStruct")
        | Some("type.googleapis.com/xds.type.v3.TypedStruct") => {
            if str_at(tc, &["type_url"]) != Some(LOCAL_RATE_LIMIT) {
                return Err(format!(
                    "type_url {}: expected {LOCAL_RATE_LIMIT}",
                    str_at(tc, &["type_url"]).unwrap_or("(none)")
                ));
            }
            tc.get("value").ok_or("no TypedStruct value")?
        }
        Some(LOCAL_RATE_LIMIT) => tc,
        other => {
            return Err(format!(
                "@type {}: not a LocalRateLimit",
                other.unwrap_or("(none)")
            ));
        }
    };
    local_rate_limit(r, cfg)
}

/// Envoy's `LocalRateLimit` fields that Outrigger implements; any other is a refusal.
fn local_rate_limit(r: &Resource, cfg: &Value) -> Result<RateLimitRule, String> {
    let supported = [
        "@type",
        "stat_prefix",
        "token_bucket",
        "filter_enabled",
        "filter_enforced",
        "response_headers_to_add",
        "enable_x_ratelimit_headers",
    ];
    let obj = cfg
        .as_object()
        .ok_or("the LocalRateLimit is not an object")?;
    if let Some(k) = obj.keys().find(|k| !supported.contains(&k.as_str())) {
        return Err(format!("LocalRateLimit field `{k}` is not supported"));
    }
    // `filter_enabled`/`filter_enforced` must be the task's 100%: a fraction is not
    // implemented.
    for f in ["filter_enabled", "filter_enforced"] {
        if let Some(v) = cfg.get(f) {
            let d = v.get("default_value");
            let n = d
                .and_then(|d| d.get("numerator"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let den = d
                .and_then(|d| d.get("denominator"))
                .and_then(Value::as_str)
                .unwrap_or("HUNDRED");
            if !(n == 100 && den == "HUNDRED") {
                return Err(format!(
                    "{f}: only 100% (numerator 100, HUNDRED) is implemented"
                ));
            }
        }
    }
    let tb = cfg.get("token_bucket").ok_or("no token_bucket")?;
    let count = |k: &str, default: Option<u64>| -> Result<u32, String> {
        let v = match tb.get(k) {
            None => default.ok_or(format!("token_bucket.{k} is required"))?,
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .ok_or(format!("token_bucket.{k} is not a number"))?,
        };
        u32::try_from(v)
            .ok()
            .filter(|v| *v > 0)
            .ok_or(format!("token_bucket.{k} must be 1 to 4294967295"))
    };
    let max_tokens = count("max_tokens", None)?;
    let tokens_per_fill = count("tokens_per_fill", Some(1))?;
    let interval = tb
        .get("fill_interval")
        .and_then(Value::as_str)
        .ok_or("token_bucket.fill_interval is required (a duration such as 60s)")?;
    let fill_interval = GoDuration::parse(interval)
        .ok()
        .and_then(|d| d.to_std())
        .filter(|d| *d >= MIN_FILL_INTERVAL && *d <= Duration::from_secs(86_400))
        .ok_or(format!(
            "token_bucket.fill_interval `{interval}`: use 50ms to 24h"
        ))?;
    let rate_limit_headers = match cfg
        .get("enable_x_ratelimit_headers")
        .and_then(Value::as_str)
    {
        None | Some("OFF") => false,
        Some("DRAFT_VERSION_03") => true,
        Some(other) => {
            return Err(format!(
                "enable_x_ratelimit_headers {other} is not supported"
            ));
        }
    };
    let mut response_headers = Vec::new();
    for h in cfg
        .get("response_headers_to_add")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(k), Some(v)) = (
            str_at(h, &["header", "key"]),
            str_at(h, &["header", "value"]),
        ) else {
            return Err(
                "response_headers_to_add: each entry needs header.key and header.value".into(),
            );
        };
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("response_headers_to_add: `{k}` is not a header name"))?;
        let value = HeaderValue::from_str(v)
            .map_err(|_| format!("response_headers_to_add: `{v}` is not a header value"))?;
        response_headers.push((name, value));
    }
    Ok(RateLimitRule {
        name: format!("EnvoyFilter/{}/{}", r.namespace, r.name),
        listeners: Vec::new(),
        path_prefix: None,
        methods: Vec::new(),
        per_principal: false,
        bucket: TokenBucket {
            max_tokens,
            tokens_per_fill,
            fill_interval,
        },
        rate_limit_headers,
        response_headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Istio's rate-limiting task, "Local rate limit", as published (the sidecar variant with
    /// a workload selector).
    pub const ISTIO_TASK: &str =
        include_str!("../../../testdata/istio-ratelimit/local-rate-limit.yaml");

    fn workload(app: &str) -> Workload {
        Workload {
            namespace: "default".into(),
            labels: [("app".to_string(), app.to_string())].into(),
        }
    }

    #[test]
    fn istios_task_is_applied_as_published() {
        let rs = outrigger_policy::parse_documents("f.yaml", ISTIO_TASK).unwrap();
        let f = interpret(&rs, &workload("productpage"), "istio-system");
        assert!(f.ignored.is_empty(), "{:?}", f.ignored);
        let [rule] = &f.rate_limits[..] else {
            panic!("{:?}", f.rate_limits)
        };
        assert_eq!(
            rule.bucket,
            TokenBucket {
                max_tokens: 4,
                tokens_per_fill: 4,
                fill_interval: Duration::from_secs(60)
            }
        );
        assert_eq!(rule.response_headers.len(), 1);
        // Another workload is not selected.
        let f = interpret(&rs, &workload("reviews"), "istio-system");
        assert!(f.rate_limits.is_empty() && f.ignored.is_empty());
    }

    #[test]
    fn anything_else_is_ignored_whole_with_the_reason() {
        for (from, to, why) in [
            ("fill_interval: 60s", "fill_interval: 10ms", "50ms to 24h"),
            (
                "context: SIDECAR_INBOUND",
                "context: SIDECAR_OUTBOUND",
                "SIDECAR_OUTBOUND",
            ),
            (
                "applyTo: HTTP_FILTER",
                "applyTo: CLUSTER",
                "applyTo CLUSTER",
            ),
            (
                "numerator: 100\n                  denominator: HUNDRED\n              filter_enforced",
                "numerator: 50\n                  denominator: HUNDRED\n              filter_enforced",
                "filter_enabled",
            ),
            (
                "stat_prefix: http_local_rate_limiter",
                "stat_prefix: x\n              descriptors: []",
                "`descriptors` is not supported",
            ),
            (
                "name: envoy.filters.http.local_ratelimit",
                "name: envoy.filters.http.lua",
                "envoy.filters.http.lua",
            ),
        ] {
            let yaml = ISTIO_TASK.replace(from, to);
            assert_ne!(yaml, ISTIO_TASK, "{from}");
            let rs = outrigger_policy::parse_documents("f.yaml", &yaml).unwrap();
            let f = interpret(&rs, &workload("productpage"), "istio-system");
            assert!(f.rate_limits.is_empty(), "{to}");
            assert!(
                f.ignored.len() == 1 && f.ignored[0].1.contains(why),
                "{to}: {:?}",
                f.ignored
            );
        }
    }
}
