//! RequestAuthentication: find the request's JWTs where the rules say, verify them against
//! the issuers' key sets (fetched over HTTPS, cached, refreshed), and hand the verified claims
//! to authorization.
//!
//! Istio: "RequestAuthentication defines what request authentication methods are supported by
//! a workload. It will reject a request if the request contains invalid authentication
//! information ... A request that does not contain any authentication credentials will be
//! accepted but will not have any authenticated identity."
//!
//! Choices (documented in docs/jwt.md):
//! - Every token found is verified; one invalid token rejects the request (401), even when
//!   another is valid. A token whose issuer no rule names is invalid (as Envoy since #15194).
//! - The principal and claims come from the first token verified, in rule order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

use outrigger_policy::JwtClaims;
use outrigger_policy::jwt::{self, ClaimRules, Jwks, JwtError};
use outrigger_policy::request_authn::{JwtRuleModel, KeySource, RemoteKeys, TokenLocations};

use crate::metrics::Metrics;

/// A token naming an unknown `kid` may trigger a refetch at most this often per key set.
const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(30);
/// Key sets and discovery documents larger than this are refused.
const MAX_DOCUMENT: usize = 1 << 20;

/// JWT settings from the agent configuration.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// Extra trust anchors for JWKS/OIDC HTTPS (PEM), on top of the system roots.
    pub extra_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// How long fetched keys are used before they are fetched again.
    pub refresh_interval: Duration,
    /// Verified claims passed to the application: header name → claim (nested with `.`).
    pub identity_headers: Vec<(HeaderName, String)>,
    /// The forward proxy for key fetches (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`).
    pub egress_proxy: crate::egress_proxy::EgressProxy,
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            extra_roots: Vec::new(),
            // istiod refreshes JWKS it resolves every 20 minutes.
            refresh_interval: Duration::from_secs(20 * 60),
            identity_headers: Vec::new(),
            egress_proxy: Default::default(),
        }
    }
}

#[derive(Default)]
struct Entry {
    keys: Option<Arc<Jwks>>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    /// When a token's unknown `kid` last caused a refetch (the rate limit's clock).
    kid_refetch_at: Option<Instant>,
}

/// Key sets by source, shared by all connections.
pub struct JwksCache {
    entries: Mutex<HashMap<RemoteKeys, Entry>>,
    /// One fetch at a time per source; others wait for it and read the result.
    fetch_locks: Mutex<HashMap<RemoteKeys, Arc<tokio::sync::Mutex<()>>>>,
    tls: Arc<rustls::ClientConfig>,
    settings: JwtSettings,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("{0}")]
    Msg(String),
}

fn msg(e: impl std::fmt::Display) -> FetchError {
    FetchError::Msg(e.to_string())
}

impl JwksCache {
    pub fn new(settings: JwtSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        let tls = outrigger_tls::control::web_client_config(&settings.extra_roots);
        Arc::new(JwksCache {
            entries: Mutex::new(HashMap::new()),
            fetch_locks: Mutex::new(HashMap::new()),
            tls,
            settings,
            metrics,
        })
    }

    pub fn settings(&self) -> &JwtSettings {
        &self.settings
    }

    fn cached(&self, src: &RemoteKeys) -> (Option<Arc<Jwks>>, bool, Option<Instant>) {
        let entries = self.entries.lock().expect("jwks cache lock");
        match entries.get(src) {
            Some(e) => {
                let fresh = e
                    .fetched_at
                    .is_some_and(|t| t.elapsed() < self.settings.refresh_interval);
                (e.keys.clone(), fresh, e.last_attempt)
            }
            None => (None, false, None),
        }
    }

    /// The keys for a rule. An inline set was parsed with the policy. Fresh fetched keys return
    /// at once; stale keys return at once while a refresh runs in the background; with no keys
    /// yet, the caller waits for the first fetch (at most `timeout`). An unreachable issuer
    /// keeps the last good keys in use.
    async fn keys(
        self: &Arc<Self>,
        src: &KeySource,
        timeout: Duration,
    ) -> Result<Arc<Jwks>, String> {
        let src = match src {
            KeySource::Inline(parsed) => return parsed.clone(),
            KeySource::Remote(r) => r,
        };
        match self.cached(src) {
            (Some(k), true, _) => Ok(k),
            (Some(k), false, _) => {
                let me = self.clone();
                let src = src.clone();
                tokio::spawn(async move {
                    let _ = me.refresh(&src, timeout, false).await;
                });
                Ok(k)
            }
            (None, _, _) => self.refresh(src, timeout, false).await,
        }
    }

    /// Fetches now (one fetch per source at a time). With `for_unknown_kid`, fetches only if no
    /// unknown kid caused a fetch within [`UNKNOWN_KID_REFETCH`]: a flood of tokens with made-up
    /// kids cannot turn into a flood of requests to the issuer.
    async fn refresh(
        self: &Arc<Self>,
        src: &RemoteKeys,
        timeout: Duration,
        for_unknown_kid: bool,
    ) -> Result<Arc<Jwks>, String> {
        let lock = {
            let mut locks = self.fetch_locks.lock().expect("fetch lock map");
            locks.entry(src.clone()).or_default().clone()
        };
        let started = Instant::now();
        let _guard = lock.lock().await;
        // Someone else fetched while we waited: use theirs.
        if let (Some(k), _, Some(at)) = self.cached(src)
            && at >= started
        {
            return Ok(k);
        }
        if for_unknown_kid {
            let mut entries = self.entries.lock().expect("jwks cache lock");
            let e = entries.entry(src.clone()).or_default();
            if let (Some(k), Some(at)) = (&e.keys, e.kid_refetch_at)
                && at.elapsed() < UNKNOWN_KID_REFETCH
            {
                return Ok(k.clone());
            }
            e.kid_refetch_at = Some(Instant::now());
        }
        let result = tokio::time::timeout(timeout, self.fetch(src))
            .await
            .unwrap_or_else(|_| Err(msg(format!("timed out after {timeout:?}"))));
        let mut entries = self.entries.lock().expect("jwks cache lock");
        let e = entries.entry(src.clone()).or_default();
        e.last_attempt = Some(Instant::now());
        let outcome = match result {
            Ok(jwks) => {
                let k = Arc::new(jwks);
                e.keys = Some(k.clone());
                e.fetched_at = Some(Instant::now());
                e.last_error = None;
                Ok(k)
            }
            Err(err) => {
                let text = format!("fetching keys for {}: {err}", describe(src));
                e.last_error = Some(text.clone());
                match &e.keys {
                    Some(old) => {
                        tracing::warn!("{text}; the previously fetched keys stay in use");
                        Ok(old.clone())
                    }
                    None => {
                        tracing::warn!("{text}");
                        Err(text)
                    }
                }
            }
        };
        self.metrics
            .jwks_fetches
            .get_or_create(&crate::metrics::ReloadLabels {
                source: "jwks",
                result: if e.last_error.is_none() {
                    "success"
                } else {
                    "error"
                },
            })
            .inc();
        outcome
    }

    async fn fetch(&self, src: &RemoteKeys) -> Result<Jwks, FetchError> {
        let uri = match src {
            RemoteKeys::Uri(u) => u.clone(),
            RemoteKeys::Discovery(issuer) => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let doc = self.get(&url).await?;
                let v: serde_json::Value = serde_json::from_slice(&doc)
                    .map_err(|e| msg(format!("{url}: not JSON: {e}")))?;
                v.get("jwks_uri")
                    .and_then(|j| j.as_str())
                    .ok_or_else(|| msg(format!("{url}: no `jwks_uri`")))?
                    .to_string()
            }
        };
        let body = self.get(&uri).await?;
        let text = std::str::from_utf8(&body).map_err(|_| msg(format!("{uri}: not UTF-8")))?;
        Jwks::parse(text).map_err(|e| msg(format!("{uri}: {e}")))
    }

    /// A plain GET over HTTPS (or HTTP), returning the body (at most 1 MiB).
    async fn get(&self, url: &str) -> Result<Bytes, FetchError> {
        let uri: http::Uri = url.parse().map_err(|e| msg(format!("{url}: {e}")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(msg(format!("{url}: only https:// (or http://) URLs"))),
        };
        let host = uri
            .host()
            .ok_or_else(|| msg(format!("{url}: no host")))?
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare_host = host.trim_matches(['[', ']']);
        let proxy = self
            .settings
            .egress_proxy
            .for_target(https, bare_host, port);
        let tcp = match proxy {
            // HTTPS through a proxy: a CONNECT tunnel, then TLS end to end with the server.
            Some(p) if https => crate::egress_proxy::connect_tunnel(p, bare_host, port)
                .await
                .map_err(|e| msg(format!("{url}: {e}")))?,
            // Plain HTTP through a proxy: the request goes to the proxy in absolute form.
            Some(p) => tokio::net::TcpStream::connect((p.host.as_str(), p.port))
                .await
                .map_err(|e| msg(format!("{url}: proxy {}:{}: connect: {e}", p.host, p.port)))?,
            None => tokio::net::TcpStream::connect((bare_host, port))
                .await
                .map_err(|e| msg(format!("{url}: connect: {e}")))?,
        };
        let path = match proxy {
            Some(_) if !https => url,
            _ => uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        };
        let mut req = http::Request::get(path);
        if let Some(auth) = proxy
            .filter(|_| !https)
            .and_then(|p| p.authorization.as_ref())
        {
            req = req.header(http::header::PROXY_AUTHORIZATION, auth.as_str());
        }
        let req = req
            .header(
                http::header::HOST,
                uri.authority().map(|a| a.as_str()).unwrap_or(&host),
            )
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("outrigger/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(msg)?;
        let resp = if https {
            let name = rustls_pki_types::ServerName::try_from(bare_host.to_string())
                .map_err(|e| msg(format!("{url}: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| msg(format!("{url}: TLS: {e}")))?;
            send(TokioIo::new(tls), req).await?
        } else {
            send(TokioIo::new(tcp), req).await?
        };
        if !resp.status().is_success() {
            return Err(msg(format!("{url}: HTTP {}", resp.status())));
        }
        let body = Limited::new(resp.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map_err(|e| msg(format!("{url}: {e}")))?;
        Ok(body.to_bytes())
    }

    /// Refreshes every fetched key set on the schedule (runs until the cache is dropped).
    pub fn spawn_refresh(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let every = self.settings.refresh_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                let sources: Vec<RemoteKeys> = me
                    .entries
                    .lock()
                    .expect("jwks cache lock")
                    .keys()
                    .cloned()
                    .collect();
                for s in sources {
                    let _ = me
                        .refresh(
                            &s,
                            outrigger_policy::request_authn::DEFAULT_FETCH_TIMEOUT,
                            false,
                        )
                        .await;
                }
            }
        })
    }
}

async fn send<T>(
    io: TokioIo<T>,
    req: http::Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, FetchError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(msg)?;
    tokio::spawn(conn);
    tx.send_request(req).await.map_err(msg)
}

fn describe(src: &RemoteKeys) -> String {
    match src {
        RemoteKeys::Uri(u) => u.clone(),
        RemoteKeys::Discovery(i) => format!("issuer {i} (OpenID discovery)"),
    }
}

/// Where a token was found, to remove it when `forwardOriginalToken` is false.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location<'r> {
    /// A lowercased header name.
    Header(&'r str),
    Param(&'r str),
    Cookie(&'r str),
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// The tokens a rule looks for, with where each was found. "If no explicit location is
/// specified the following default locations are tried in order: 1) The Authorization header
/// using the Bearer schema ... 2) `access_token` query parameter."
fn extract<'a, 'r>(
    rule: &'r JwtRuleModel,
    parts: &'a http::request::Parts,
    out: &mut Vec<(&'a str, Location<'r>)>,
) {
    let query = parts.uri.query();
    let mut push = |t: &'a str, loc: Location<'r>| {
        let t = t.trim();
        if !t.is_empty() && !out.iter().any(|(x, l)| *x == t && *l == loc) {
            out.push((t, loc));
        }
    };
    let (headers, params, cookies) = match &rule.locations {
        TokenLocations::Default => {
            for v in parts.headers.get_all(http::header::AUTHORIZATION) {
                if let Ok(v) = v.to_str()
                    && v.len() > 7
                    && v[..7].eq_ignore_ascii_case("bearer ")
                {
                    push(&v[7..], Location::Header("authorization"));
                }
            }
            if let Some(t) = query_param(query, "access_token") {
                push(t, Location::Param("access_token"));
            }
            return;
        }
        TokenLocations::Explicit {
            headers,
            params,
            cookies,
        } => (headers, params, cookies),
    };
    for (name, prefix) in headers {
        // A name that is not a valid header name finds nothing (`get_all` of an invalid name
        // is empty), as no request can carry it.
        for v in parts.headers.get_all(name.as_str()) {
            if let Ok(v) = v.to_str()
                && let Some(t) = v.strip_prefix(prefix.as_str())
            {
                push(t, Location::Header(name));
            }
        }
    }
    for p in params {
        if let Some(t) = query_param(query, p) {
            push(t, Location::Param(p));
        }
    }
    for c in cookies {
        if let Some(t) = cookie(&parts.headers, c) {
            push(t, Location::Cookie(c));
        }
    }
}

/// A request whose token failed: answered as Envoy's jwt_authn filter answers it.
#[derive(Debug)]
pub struct Unauthenticated {
    /// Envoy's verdict: the status code (401, or 403 for an audience that is not allowed) and
    /// the body.
    pub status: jwt::Status,
    /// The detail, for the log.
    pub reason: String,
}

impl Unauthenticated {
    fn new(status: jwt::Status, reason: impl Into<String>) -> Self {
        Unauthenticated {
            status,
            reason: reason.into(),
        }
    }
}

impl From<JwtError> for Unauthenticated {
    fn from(e: JwtError) -> Self {
        Unauthenticated::new(e.status(), e.to_string())
    }
}

/// A CORS preflight, which Istio lets through RequestAuthentication unverified: istiod sets
/// `bypass_cors_preflight: true` (pilot/pkg/security/authn/policy_applier.go), and Envoy's
/// jwt_authn filter.cc `isCorsPreflightRequest` is "method OPTIONS, a non-empty `origin` and a
/// non-empty `access-control-request-method`" ("The CORS preflight doesn't include user
/// credentials, bypass regardless of JWT requirements").
pub fn is_cors_preflight(parts: &http::request::Parts) -> bool {
    let non_empty = |h: http::header::HeaderName| {
        parts
            .headers
            .get(h)
            .is_some_and(|v| !v.as_bytes().is_empty())
    };
    parts.method == http::Method::OPTIONS
        && non_empty(http::header::ORIGIN)
        && non_empty(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A claim's value as Envoy's `claim_to_headers` writes it (jwt_authn authenticator.cc
/// `addJWTClaimToHeader`): a string as is; a number as `convertClaimDoubleToString` prints it
/// (an integer in u64 range without decimals, anything else with C's `%f`: `1.500000`,
/// `-3.000000`); a boolean as `true`/`false`; an object or a list as standard base64 (padded)
/// of its JSON (protobuf's JSON printer: numbers as doubles, so `2.0` is `2`); null: nothing.
fn claim_text(v: &serde_json::Value) -> Option<String> {
    use base64::Engine;
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => {
            let f = n.as_f64()?;
            if (0.0..18_446_744_073_709_551_615.0).contains(&f) && f.fract() == 0.0 {
                Some(format!("{}", n.as_u64().unwrap_or(f as u64)))
            } else {
                Some(format!("{f:.6}"))
            }
        }
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
            let mut json = String::new();
            proto_json(v, &mut json);
            Some(base64::engine::general_purpose::STANDARD.encode(json))
        }
        serde_json::Value::Null => None,
    }
}

/// A claim's value for Outrigger's own `jwt.identityHeaders` (not an Istio field): strings,
/// numbers and booleans as JSON prints them, a list as its scalar items joined with `,`
/// (`readers,admins`: what an IIS or .NET application reads most easily); objects: nothing.
fn identity_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Array(a) => Some(
            a.iter()
                .filter_map(identity_text)
                .collect::<Vec<_>>()
                .join(","),
        ),
        _ => None,
    }
}

/// JSON as protobuf's printer writes a `google.protobuf.Value` (what Envoy's claim values
/// are): compact, numbers as doubles (`%.15g`, or `%.17g` when 15 digits do not round-trip).
/// Object keys are sorted (Envoy's order is its hash map's, so any order is Envoy's order).
fn proto_json(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Number(n) => out.push_str(&proto_double(n.as_f64().unwrap_or(0.0))),
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                proto_json(item, out);
            }
            out.push(']');
        }
        serde_json::Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                proto_json(item, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A double as protobuf's `SimpleDtoa` prints it: the shortest of `%.15g`/`%.17g` that
/// round-trips — fixed notation for decimal exponents from -4 to below the precision,
/// exponent notation (`1e+20`) otherwise.
fn proto_double(f: f64) -> String {
    if f == 0.0 || !f.is_finite() {
        return format!("{}", if f.is_finite() { 0.0 } else { f });
    }
    let sci = format!("{f:e}");
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return sci;
    };
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits = mantissa.chars().filter(char::is_ascii_digit).count();
    let precision = if digits <= 15 { 15 } else { 17 };
    if exp < -4 || exp >= precision {
        format!(
            "{mantissa}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.unsigned_abs()
        )
    } else {
        format!("{f}")
    }
}

fn claim_at<'a>(claims: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(claims, |v, p| v.get(p))
}

fn set_header(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (
        HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()),
        HeaderValue::from_str(value),
    ) {
        headers.insert(n, v);
    }
}

/// Authenticates a request: `Ok(None)` when it carries no token, `Ok(Some(claims))` when every
/// token it carries verified, `Err` (401) otherwise. Rewrites headers: strips every header
/// Outrigger sets from verified claims (so a client cannot forge them), then sets them.
pub async fn authenticate(
    cache: &Arc<JwksCache>,
    rules: &[JwtRuleModel],
    parts: &mut http::request::Parts,
) -> Result<Option<JwtClaims>, Unauthenticated> {
    strip_claim_headers(cache, rules, parts);
    if rules.is_empty() || is_cors_preflight(parts) {
        return Ok(None);
    }
    verify(cache, rules, parts).await
}

/// Removes the headers only verified claims may set (`outputPayloadToHeader`,
/// `outputClaimToHeaders`, the configured identity headers): they are ours alone. Done for
/// every request, with or without rules.
pub fn strip_claim_headers(
    cache: &Arc<JwksCache>,
    rules: &[JwtRuleModel],
    parts: &mut http::request::Parts,
) {
    for rule in rules {
        if let Some(h) = &rule.output_payload_to_header {
            parts.headers.remove(h.as_str());
        }
        for (h, _) in &rule.output_claim_to_headers {
            parts.headers.remove(h.as_str());
        }
    }
    for (h, _) in &cache.settings.identity_headers {
        parts.headers.remove(h);
    }
}

async fn verify(
    cache: &Arc<JwksCache>,
    rules: &[JwtRuleModel],
    parts: &mut http::request::Parts,
) -> Result<Option<JwtClaims>, Unauthenticated> {
    // (token, location, index of the rule that found it)
    let mut found: Vec<(String, Location, usize)> = Vec::new();
    {
        let mut scratch = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            scratch.clear();
            extract(rule, parts, &mut scratch);
            for (t, loc) in scratch.drain(..) {
                found.push((t.to_string(), loc, i));
            }
        }
    }
    if found.is_empty() {
        return Ok(None);
    }

    let now = now_unix();
    let mut verified: Option<(JwtClaims, usize, String)> = None;
    let mut to_remove: Vec<Location> = Vec::new();
    let mut checked: Vec<&str> = Vec::new();
    for (token, _, _) in &found {
        if checked.contains(&token.as_str()) {
            continue;
        }
        checked.push(token);
        // Envoy's order (jwt_authn authenticator.cc `startVerify`): parse, issuer, time,
        // audience, then the key set and the signature — so a token with several faults gets
        // the answer Envoy gives for the first.
        let decoded = jwt::decode(token)?;
        let iss = decoded.issuer().unwrap_or("").to_string();
        // The rules that both looked where this token was and name its issuer.
        let candidates: Vec<usize> = found
            .iter()
            .filter(|(t, _, i)| t == token && rules[*i].issuer == iss)
            .map(|(_, _, i)| *i)
            .collect();
        if candidates.is_empty() {
            return Err(Unauthenticated::new(
                jwt::Status::JwtUnknownIssuer,
                format!("no jwtRule for issuer `{iss}` at the token's location"),
            ));
        }
        let mut last_err = None;
        let mut ok_rule = None;
        for &ri in &candidates {
            let rule = &rules[ri];
            if let Err(e) = decoded.check_claims(&ClaimRules {
                issuer: &rule.issuer,
                audiences: &rule.audiences,
                now,
                clock_skew: jwt::DEFAULT_CLOCK_SKEW_SECS,
            }) {
                last_err = Some(Unauthenticated::from(e));
                continue;
            }
            let timeout = rule.fetch_timeout;
            let keys = match cache.keys(&rule.keys, timeout).await {
                Ok(k) => k,
                Err(e) => {
                    last_err = Some(Unauthenticated::new(jwt::Status::JwksFetchFail, e));
                    continue;
                }
            };
            let mut sig = decoded.verify_signature(&keys);
            if let Err(JwtError::UnknownKid(_)) = &sig
                && let KeySource::Remote(src) = &rule.keys
            {
                // The issuer may have rotated its keys: refetch (rate-limited) and retry.
                if let Ok(k) = cache.refresh(src, timeout, true).await {
                    sig = decoded.verify_signature(&k);
                }
            }
            match sig {
                Ok(()) => {
                    ok_rule = Some(ri);
                    break;
                }
                Err(e) => last_err = Some(Unauthenticated::from(e)),
            }
        }
        let Some(ri) = ok_rule else {
            return Err(last_err.unwrap_or_else(|| {
                Unauthenticated::new(jwt::Status::JwtVerificationFail, "no rule verified it")
            }));
        };
        let rule = &rules[ri];
        if !rule.forward_original_token {
            for (t, loc, _) in &found {
                if t == token {
                    to_remove.push(loc.clone());
                }
            }
        }
        if verified.is_none() {
            let claims = JwtClaims::new(decoded.claims.clone())
                .with_space_delimited_claims(&rule.space_delimited_claims);
            verified = Some((claims, ri, decoded.payload_b64.to_string()));
        }
    }

    let Some((claims, ri, payload_b64)) = verified else {
        return Ok(None);
    };
    let rule = &rules[ri];
    // "forwardOriginalToken: If set to true, the original token will be kept for the
    // upstream request. Default is false."
    for loc in to_remove {
        if let Location::Header(h) = loc {
            parts.headers.remove(h);
        }
    }
    if let Some(h) = &rule.output_payload_to_header {
        set_header(&mut parts.headers, h, &payload_b64);
    }
    for (h, claim) in &rule.output_claim_to_headers {
        if let Some(v) = claim_at(claims.payload(), claim).and_then(claim_text) {
            set_header(&mut parts.headers, h, &v);
        }
    }
    for (h, claim) in &cache.settings.identity_headers {
        if let Some(v) = claim_at(claims.payload(), claim).and_then(identity_text)
            && let Ok(v) = HeaderValue::from_str(&v)
        {
            parts.headers.insert(h.clone(), v);
        }
    }
    warn_on_group_overage(&claims);
    Ok(Some(claims))
}

/// Azure AD: "If a user is a member of more groups than the overage limit (200 for JWTs), ...
/// the groups claim is replaced by `_claim_names`/`_claim_sources`" pointing at Microsoft
/// Graph. A policy on `request.auth.claims[groups]` then sees no groups: say so in the log
/// instead of letting it silently deny (or, for a DENY policy, silently allow).
fn warn_on_group_overage(claims: &JwtClaims) {
    let p = claims.payload();
    if p.get("groups").is_none()
        && p.get("_claim_names")
            .and_then(|n| n.get("groups"))
            .is_some()
    {
        tracing::warn!(
            sub = p.get("sub").and_then(|s| s.as_str()).unwrap_or("-"),
            "token has Azure AD group overage (_claim_names.groups instead of groups): \
             policies on request.auth.claims[groups] see no groups for this user; use app \
             roles (the `roles` claim) or assign fewer groups (see docs/azure-ad.md)"
        );
    }
}

/// Envoy's `www-authenticate` for a request whose JWT failed (jwt_authn filter.cc
/// `onComplete`): `Bearer realm="<original URI>", error="invalid_token"` (RFC 6750 §3), the
/// URI as `Http::Utility::buildOriginalUri` builds it: the forwarded scheme (`https` on an
/// mTLS connection), `://`, the host, and the path with its query cut to 256 bytes
/// (`MaximumUriLength`).
pub(crate) fn www_authenticate(parts: &http::request::Parts, tls: bool) -> HeaderValue {
    const MAXIMUM_URI_LENGTH: usize = 256;
    let host = crate::http_common::authority_str(parts);
    let path = parts.uri.path_and_query().map_or("", |p| p.as_str());
    let mut end = path.len().min(MAXIMUM_URI_LENGTH);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    let scheme = if tls { "https" } else { "http" };
    HeaderValue::from_str(&format!(
        "Bearer realm=\"{scheme}://{host}{}\", error=\"invalid_token\"",
        &path[..end]
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("Bearer error=\"invalid_token\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Envoy's claim_to_headers formatting (authenticator.cc `addJWTClaimToHeader`,
    /// `convertClaimDoubleToString`; protobuf's `SimpleDtoa` inside objects and lists),
    /// values as the real Envoy wrote them in tests/jwt_envoy.rs.
    #[test]
    fn claim_values_are_written_as_envoy_writes_them() {
        let text = |j: &str| claim_text(&serde_json::from_str(j).unwrap());
        assert_eq!(text("42").as_deref(), Some("42"));
        assert_eq!(text("2.0").as_deref(), Some("2"));
        assert_eq!(text("1.5").as_deref(), Some("1.500000"));
        assert_eq!(text("-3").as_deref(), Some("-3.000000"));
        assert_eq!(
            text("1e20").as_deref(),
            Some("100000000000000000000.000000")
        );
        assert_eq!(text("true").as_deref(), Some("true"));
        assert_eq!(text("null"), None);
        assert_eq!(
            text(r#"["readers","admins"]"#).as_deref(),
            Some("WyJyZWFkZXJzIiwiYWRtaW5zIl0=")
        );
        for (f, want) in [
            (2.0, "2"),
            (0.5, "0.5"),
            (1e20, "1e+20"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (-1.25e-7, "-1.25e-07"),
            (1e15, "1e+15"),
            (999999999999999.0, "999999999999999"),
        ] {
            assert_eq!(proto_double(f), want, "{f}");
        }
    }

    #[test]
    fn cors_preflight_needs_options_origin_and_request_method() {
        let parts = |method: &str, headers: &[(&str, &str)]| {
            let mut b = http::Request::builder().method(method).uri("/x");
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap().into_parts().0
        };
        let full = [
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
        ];
        assert!(is_cors_preflight(&parts("OPTIONS", &full)));
        assert!(!is_cors_preflight(&parts("GET", &full)));
        assert!(!is_cors_preflight(&parts("OPTIONS", &full[..1])));
        assert!(!is_cors_preflight(&parts(
            "OPTIONS",
            &[("origin", ""), ("access-control-request-method", "POST")]
        )));
    }

    #[test]
    fn query_and_cookie_extraction() {
        assert_eq!(
            query_param(Some("a=1&access_token=xyz"), "access_token"),
            Some("xyz")
        );
        assert_eq!(query_param(Some("access_tokenx=1"), "access_token"), None);
        let mut h = HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            "a=1; session=\"tok\"; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, "session"), Some("tok"));
        assert_eq!(cookie(&h, "nope"), None);
    }
}
