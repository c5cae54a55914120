//! The agent configuration file (YAML). Documented for users in `docs/config.md`.
//!
//! Parsing goes schema (serde, camelCase, unknown keys refused) → validated [`AgentConfig`].
//! Every error names the file, the line and column, the field and the reason.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use outrigger_identity::{Identity, TrustDomains};
use outrigger_policy::duration::parse_agent_duration;
use outrigger_policy::{MtlsMode, PathNormalization};
use outrigger_proxy::access_log::{DEFAULT_MAX_FILES, DEFAULT_MAX_SIZE_MIB, FileOutput};
use outrigger_proxy::{AccessLogConfig, AccessLogFormat, InboundConfig, Protocol};

/// A configuration error users can act on.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ConfigError {}

#[path = "config_outbound.rs"]
mod outbound;

#[path = "config_connections.rs"]
mod connections;
pub use connections::ConnectionsConfig;
#[path = "config_extauthz.rs"]
mod extauthz;
#[path = "config_kubernetes.rs"]
mod kubernetes;
#[path = "config_ratelimits.rs"]
mod ratelimits;
#[path = "config_tracing.rs"]
mod tracing_cfg;
#[cfg_attr(not(feature = "kubernetes"), allow(unused_imports))]
pub use kubernetes::{KubeCredentials, KubernetesConfig};

// ---------------------------------------------------------------------------------------------
// Schema

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    trust_domain: Spanned<String>,
    #[serde(default)]
    trust_domain_aliases: Vec<Spanned<String>>,
    workload: RawWorkload,
    certificates: Spanned<RawCertificates>,
    #[serde(default)]
    inbound: Vec<RawInbound>,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    access_log: Option<Spanned<RawAccessLog>>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    jwt: RawJwt,
    #[serde(default)]
    outbound: Vec<outbound::RawOutbound>,
    #[serde(default)]
    outbound_proxy: Option<outbound::RawOutboundProxy>,
    #[serde(default)]
    hbone: Option<Spanned<RawHbone>>,
    #[serde(default)]
    connections: connections::RawConnections,
    #[serde(default)]
    rate_limits: Vec<ratelimits::RawRateLimit>,
    /// MeshConfig's `extensionProviders` (the CUSTOM action's authorizers).
    #[serde(default)]
    extension_providers: Vec<extauthz::RawProvider>,
    #[serde(default)]
    tracing: Option<tracing_cfg::RawTracing>,
}

/// `hbone:` — the Istio ambient (HBONE) listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHbone {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    listen: Option<Spanned<String>>,
    #[serde(default)]
    network: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawJwt {
    #[serde(default)]
    ca_bundle: Option<Spanned<String>>,
    #[serde(default)]
    refresh_interval: Option<Spanned<String>>,
    #[serde(default)]
    identity_headers: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawWorkload {
    namespace: Spanned<String>,
    service_account: Spanned<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    cluster: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCertificates {
    #[serde(default)]
    files: Option<RawFiles>,
    #[serde(default)]
    builtin: Option<RawBuiltin>,
    #[serde(default)]
    istio_ca: Option<RawIstioCa>,
    #[serde(default)]
    crl: Option<Spanned<String>>,
    #[serde(default)]
    only_verify_leaf_cert_crl: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawIstioCa {
    #[serde(default)]
    address: Option<Spanned<String>>,
    #[serde(default)]
    server_name: Option<Spanned<String>>,
    root_cert: Spanned<String>,
    #[serde(default)]
    token_file: Option<Spanned<String>>,
    state_dir: Spanned<String>,
    #[serde(default)]
    ttl: Option<Spanned<String>>,
    #[serde(default)]
    grace_period_ratio: Option<Spanned<f64>>,
    #[serde(default)]
    grace_period_ratio_jitter: Option<Spanned<f64>>,
    #[serde(default)]
    bootstrap_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFiles {
    cert_chain: Spanned<String>,
    key: Spanned<String>,
    root_cert: Spanned<String>,
    #[serde(default)]
    poll_interval: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBuiltin {
    ca_dir: Spanned<String>,
    #[serde(default)]
    ttl: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawInbound {
    name: String,
    listen: Spanned<String>,
    backend: Spanned<String>,
    #[serde(default)]
    protocol: Option<Spanned<String>>,
    #[serde(default)]
    allow_remote_backend: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPolicy {
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    root_namespace: Option<String>,
    #[serde(default)]
    default_mtls_mode: Option<MtlsModeName>,
    #[serde(default)]
    path_normalization: Option<PathNormalizationName>,
    #[serde(default)]
    reload_interval: Option<Spanned<String>>,
    /// Istio policy watched in the cluster (`config_kubernetes.rs`).
    #[serde(default)]
    kubernetes: Option<Spanned<kubernetes::RawKubernetes>>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum MtlsModeName {
    Strict,
    Permissive,
    Disable,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum PathNormalizationName {
    None,
    Base,
    MergeSlashes,
    DecodeAndMergeSlashes,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAdmin {
    #[serde(default)]
    listen: Option<Spanned<String>>,
    #[serde(default)]
    metrics_listen: Option<Spanned<String>>,
}

/// `accessLog:` — a string (`stdout`, `off`, a file path), or a mapping.
#[derive(Debug)]
enum RawAccessLog {
    Short(String),
    Full(Box<RawAccessLogFull>),
}

impl<'de> Deserialize<'de> for RawAccessLog {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawAccessLog;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`stdout`, `off`, a file path, or a mapping with format, output, file, rotation")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawAccessLog, E> {
                Ok(RawAccessLog::Short(v.to_string()))
            }
            // YAML 1.1 reads a bare `off` as false (and `on` as true).
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawAccessLog, E> {
                if v {
                    Err(E::custom(
                        "`true`/`on`: use `stdout`, `off`, a file path, or a mapping",
                    ))
                } else {
                    Ok(RawAccessLog::Short("off".into()))
                }
            }
            // A file named by a number.
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawAccessLog, E> {
                Ok(RawAccessLog::Short(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawAccessLog, E> {
                Ok(RawAccessLog::Short(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<RawAccessLog, A::Error> {
                RawAccessLogFull::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(|f| RawAccessLog::Full(Box::new(f)))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAccessLogFull {
    #[serde(default)]
    format: Option<Spanned<String>>,
    #[serde(default)]
    output: Option<Spanned<String>>,
    #[serde(default)]
    file: Option<Spanned<String>>,
    #[serde(default)]
    rotation: Option<Spanned<RawRotation>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRotation {
    #[serde(default, rename = "maxSizeMiB")]
    max_size_mib: Option<Spanned<f64>>,
    #[serde(default)]
    max_files: Option<Spanned<u64>>,
}

/// `accessLog.rotation.maxSizeMiB`: from about 1 KiB (tests, tiny disks) to 1 TiB.
const MAX_SIZE_MIB: (f64, f64) = (0.001, 1024.0 * 1024.0);
/// `accessLog.rotation.maxFiles`.
const MAX_FILES: u64 = 1000;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLog {
    #[serde(default)]
    format: Option<LogFormat>,
    #[serde(default)]
    level: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTimeouts {
    #[serde(default)]
    detect: Option<Spanned<String>>,
    #[serde(default)]
    handshake: Option<Spanned<String>>,
    #[serde(default)]
    connect: Option<Spanned<String>>,
    #[serde(default)]
    drain: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRuntime {
    #[serde(default)]
    worker_threads: Option<Spanned<u64>>,
}

// ---------------------------------------------------------------------------------------------
// Validated configuration

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub enum CertificatesConfig {
    Files {
        cert_chain: PathBuf,
        key: PathBuf,
        root_cert: PathBuf,
        poll_interval: Duration,
    },
    Builtin {
        ca_dir: PathBuf,
        ttl: Duration,
    },
    /// Obtained from the Istio CA API (istiod) and persisted in `state_dir`.
    IstioCa(IstioCaConfig),
}

/// `certificates.istioCa`.
#[derive(Debug, Clone)]
pub struct IstioCaConfig {
    /// `host:port` dialled (istio-agent's `CA_ADDRESS`).
    pub address: String,
    /// The name istiod's certificate carries (ztunnel's `ALT_CA_HOSTNAME`).
    pub server_name: String,
    pub root_cert: PathBuf,
    pub token_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub ttl: Duration,
    pub grace_period_ratio: f64,
    pub grace_period_ratio_jitter: f64,
    pub bootstrap_timeout: Duration,
}

/// istio-agent's default `CA_ADDRESS`.
pub const DEFAULT_CA_ADDRESS: &str = "istiod.istio-system.svc:15012";

#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub service: Option<String>,
    pub cluster: String,
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub paths: Vec<PathBuf>,
    pub root_namespace: String,
    pub default_mtls_mode: MtlsMode,
    pub path_normalization: PathNormalization,
    pub reload_interval: Duration,
    /// `policy.kubernetes`: Istio policy watched in the cluster, beside the files.
    pub kubernetes: Option<KubernetesConfig>,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub file: PathBuf,
    pub trust_domains: TrustDomains,
    pub identity: Identity,
    pub workload: WorkloadConfig,
    pub certificates: CertificatesConfig,
    /// `certificates.crl`: (file, `onlyVerifyLeafCertCrl`).
    pub crl: Option<(PathBuf, bool)>,
    pub inbound: Vec<InboundConfig>,
    pub policy: PolicyConfig,
    pub admin: Option<SocketAddr>,
    /// `admin.metricsListen`: a listener for `/metrics` only.
    pub metrics_listen: Option<SocketAddr>,
    pub access_log: AccessLogConfig,
    pub log_format: LogFormat,
    pub log_level: String,
    pub detect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// `runtime.workerThreads`, 1 to [`MAX_WORKER_THREADS`]; `None`: one per core.
    pub worker_threads: Option<usize>,
    pub jwt: JwtConfig,
    /// Mesh destinations the application calls (see `config_outbound.rs`).
    pub outbound: Vec<outrigger_proxy::outbound::OutboundConfig>,
    pub outbound_proxy: Option<outrigger_proxy::outbound::OutboundProxyConfig>,
    /// The inbound HBONE listener (`hbone:`), `None` when disabled.
    pub hbone: Option<outrigger_proxy::hbone::HboneConfig>,
    /// The Istio network this workload is on (`hbone.network`; empty: the default network).
    pub network: String,
    /// The files and directories the configuration names as inputs (certificates, CA, JWT CA
    /// bundle), with where each is named, so that a missing one is reported at its line.
    pub inputs: Vec<InputFile>,
    /// `connections:` (idle timeout, connection caps; see `config_connections.rs`).
    pub connections: ConnectionsConfig,
    /// `rateLimits:` (local rate limits on inbound HTTP; see `config_ratelimits.rs`).
    pub rate_limits: Vec<outrigger_proxy::ratelimit::RateLimitRule>,
    /// `extensionProviders:` (Istio's CUSTOM action; see `config_extauthz.rs`).
    pub extension_providers: Vec<std::sync::Arc<outrigger_proxy::ext_authz::Provider>>,
    /// `tracing:` (sampling, OTLP collector; see `config_tracing.rs`); `None`: off.
    pub tracing: Option<outrigger_proxy::trace::TracingConfig>,
}

/// A file or directory the configuration reads, and where the configuration names it.
#[derive(Debug, Clone)]
pub struct InputFile {
    pub path: PathBuf,
    pub field: String,
    pub line: u64,
    pub column: u64,
    pub directory: bool,
}

/// The HBONE port and address ztunnel listens on (`[::]:15008`); ours defaults to IPv4.
pub const DEFAULT_HBONE_LISTEN: &str = "0.0.0.0:15008";

/// RequestAuthentication settings of the agent (the rules themselves are Istio policy).
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// Extra CA certificates (PEM file) trusted for JWKS and OpenID discovery over HTTPS.
    pub ca_bundle: Option<PathBuf>,
    pub refresh_interval: Duration,
    /// Verified claims passed to the application as headers: (header, claim path).
    pub identity_headers: Vec<(String, String)>,
}

/// The admin port a sidecar uses for Envoy's admin; ours is the pilot-agent-like 15000 on
/// loopback.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";

/// The most Tokio worker threads `runtime.workerThreads` (and `--worker-threads`) may ask
/// for. An async proxy can use one worker per core and no more; 1024 covers the largest hosts
/// (Windows Server and Linux top out at a few hundred logical processors) while bounding what
/// a typo costs: every worker reserves a stack and allocates its own queues up front, and
/// `workerThreads: 100000000` reached 5 GB RSS in 8 seconds before this bound.
pub const MAX_WORKER_THREADS: u64 = 1024;

/// The range a duration setting accepts. Zero where zero would mean "spin" or "give up at
/// once", and an upper bound that catches unit typos (`10000h` for `10000ms`) and keeps every
/// deadline computed from a setting far from `Instant` overflow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Range {
    min: Duration,
    max: Duration,
    /// The bounds as written in docs/config.md.
    text: &'static str,
}

const MS: Duration = Duration::from_millis(1);
const DAY: Duration = Duration::from_secs(86_400);

/// `timeouts.detect`, `.handshake`, `.connect`: more than zero, at most a day.
pub(crate) const TIMEOUT: Range = Range {
    min: MS,
    max: DAY,
    text: "1ms to 24h",
};
/// `timeouts.drain`: zero closes connections at once on shutdown.
pub(crate) const DRAIN: Range = Range {
    min: Duration::ZERO,
    max: DAY,
    text: "0s to 24h",
};
/// `connections.idleTimeout`: zero turns it off (Envoy's `idle_timeout: 0s`); at most a year.
pub(crate) const IDLE: Range = Range {
    min: Duration::ZERO,
    max: Duration::from_secs(365 * 86_400),
    text: "0s (off) to 365d",
};
/// File polling (`certificates.files.pollInterval`, `policy.reloadInterval`): below 10ms the
/// agent would do little but re-read files.
pub(crate) const POLL: Range = Range {
    min: Duration::from_millis(10),
    max: DAY,
    text: "10ms to 24h",
};
/// `jwt.refreshInterval`: key sets are fetched over the network.
pub(crate) const JWKS_REFRESH: Range = Range {
    min: Duration::from_secs(1),
    max: DAY,
    text: "1s to 24h",
};
/// A workload certificate's lifetime (`certificates.builtin.ttl`, `ca issue --ttl`): renewed at
/// half its lifetime, so at least a minute; at most ten years.
pub(crate) const TTL: Range = Range {
    min: Duration::from_secs(60),
    max: Duration::from_secs(3650 * 86_400),
    text: "1m to 3650d",
};
/// `certificates.istioCa.bootstrapTimeout`: how long start-up keeps asking the CA.
pub(crate) const BOOTSTRAP: Range = Range {
    min: Duration::from_secs(1),
    max: DAY,
    text: "1s to 24h",
};
/// The Istio-named outbound settings (DestinationRule, VirtualService, meshConfig): Istio's
/// ">= 1ms", and at most a year.
pub(crate) const ISTIO: Range = Range {
    min: MS,
    max: Duration::from_secs(365 * 86_400),
    text: "1ms to 365d",
};

/// Parses a duration setting (Go's syntax, `500ms`, `10s`, `1h30m`, plus `d`; the one parser
/// of the workspace, [`outrigger_policy::duration`]) and checks it against `range`.
pub(crate) fn parse_duration(s: &str, range: Range) -> Result<Duration, String> {
    let d = parse_agent_duration(s).map_err(|e| e.to_string())?;
    if d < range.min || d > range.max {
        return Err(format!("`{s}` is out of range: use {}", range.text));
    }
    Ok(d)
}

/// `ca issue --ttl`.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    parse_duration(s, TTL)
}

/// `--worker-threads`: the same bound as `runtime.workerThreads`; 0 is one per core.
pub fn parse_worker_threads(s: &str) -> Result<usize, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of threads"))?;
    Ok(worker_threads(n)?.unwrap_or(0))
}

/// 0 keeps its documented meaning, one worker per core (as when the setting is absent).
fn worker_threads(n: u64) -> Result<Option<usize>, String> {
    if n > MAX_WORKER_THREADS {
        return Err(format!(
            "{n}: use 1 to {MAX_WORKER_THREADS}, or 0 for one worker per core"
        ));
    }
    let n = usize::try_from(n).map_err(|_| format!("{n}: too many threads"))?;
    Ok((n > 0).then_some(n))
}

impl AgentConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            field: String::new(),
            reason: format!("cannot read the file: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Checks that every file and directory the configuration names as an input can be
    /// opened, and reports one that cannot at the line and field that name it (their contents
    /// are checked where they are loaded, with the file's own name in the error).
    pub fn check_inputs(&self) -> Result<(), ConfigError> {
        for f in &self.inputs {
            let problem = if f.directory {
                match std::fs::read_dir(&f.path) {
                    Ok(_) => None,
                    Err(e) => Some(format!("cannot read directory {}: {e}", f.path.display())),
                }
            } else {
                match std::fs::metadata(&f.path) {
                    Ok(m) if m.is_dir() => {
                        Some(format!("{} is a directory, not a file", f.path.display()))
                    }
                    _ => match std::fs::File::open(&f.path) {
                        Ok(_) => None,
                        Err(e) => Some(format!("cannot read {}: {e}", f.path.display())),
                    },
                }
            };
            if let Some(reason) = problem {
                return Err(ConfigError {
                    file: self.file.clone(),
                    line: f.line,
                    column: f.column,
                    field: f.field.clone(),
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Parses configuration text; `path` names the file in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        // serde-saphyr locates an error but does not name the field; serde_path_to_error
        // tracks the path of the value being deserialized.
        let mut field = String::new();
        let raw: RawConfig = serde_saphyr::with_deserializer_from_str(text, |de| {
            serde_path_to_error::deserialize(de).map_err(|e| {
                field = field_path(e.path());
                e.into_inner()
            })
        })
        .map_err(|e| yaml_error(path, &e, field))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Validator { file: path, base }.validate(raw)
    }
}

/// The field path of a deserialization error, as our errors write it (`inbound[0].listen`).
/// serde-saphyr's `Spanned` wrapper shows up as an inner `value` key, which is not a field.
fn field_path(p: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    let segs: Vec<&Segment> = p.iter().collect();
    for (i, seg) in segs.iter().enumerate() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if key == SPANNED_VALUE && i > 0 {
                    continue;
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// The key under which serde-saphyr's `Spanned<T>` deserializes its `T`.
const SPANNED_VALUE: &str = "value";

/// Turns a serde-saphyr error into ours, keeping its location and naming the field.
fn yaml_error(path: &Path, e: &serde_saphyr::Error, field: String) -> ConfigError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    // serde-saphyr says only "invalid u16" for a scalar of the wrong kind: say what fits.
    if let serde_saphyr::Error::InvalidScalar { ty, .. } = e.without_snippet() {
        let expected = match *ty {
            "u8" => format!("a whole number from 0 to {}", u8::MAX),
            "u16" => format!("a whole number from 0 to {}", u16::MAX),
            "boolean" => "true or false".to_string(),
            // The field's own range is checked after (e.g. runtime.workerThreads: 1 to 1024).
            t if t.starts_with('u') || t.starts_with('i') => "a whole number".to_string(),
            _ => "a number".to_string(),
        };
        return ConfigError {
            file: path.to_path_buf(),
            line,
            column,
            field,
            reason: format!("invalid value: expected {expected}"),
        };
    }
    // The plain message, without serde-saphyr's own location suffix or source snippet.
    let reason = e.without_snippet().to_string();
    let reason = reason
        .split(" at line ")
        .next()
        .unwrap_or(&reason)
        .trim()
        .to_string();
    ConfigError {
        file: path.to_path_buf(),
        line,
        column,
        field,
        reason,
    }
}

struct Validator<'a> {
    file: &'a Path,
    base: PathBuf,
}

impl Validator<'_> {
    fn err<T>(&self, at: &Spanned<T>, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: at.referenced.line(),
            column: at.referenced.column(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    /// The name of one entry of a list (`rateLimits`, `extensionProviders`): not empty, and
    /// not among `taken` (`what`: what the list holds, for the message).
    fn entry_name<'n>(
        &self,
        name: &Spanned<String>,
        field: &str,
        mut taken: impl Iterator<Item = &'n str>,
        what: &str,
    ) -> Result<(), ConfigError> {
        if name.value.is_empty() {
            return Err(self.err(name, field, "must not be empty"));
        }
        if taken.any(|t| t == name.value) {
            return Err(self.err(name, field, format!("`{}` names two {what}", name.value)));
        }
        Ok(())
    }

    fn err_noloc(&self, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: 0,
            column: 0,
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }

    fn duration(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
        range: Range,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => parse_duration(&s.value, range).map_err(|r| self.err(s, field, r)),
        }
    }

    /// `accessLog`: the short form (`stdout`, `off`, a path) or the mapping.
    fn access_log(
        &self,
        a: Option<&Spanned<RawAccessLog>>,
    ) -> Result<AccessLogConfig, ConfigError> {
        let Some(a) = a else {
            return Ok(AccessLogConfig::stdout());
        };
        let f = match &a.value {
            RawAccessLog::Short(s) => {
                return match s.as_str() {
                    "stdout" => Ok(AccessLogConfig::stdout()),
                    "off" => Ok(AccessLogConfig::off()),
                    "" => Err(self.err(
                        a,
                        "accessLog",
                        "use `stdout`, `off`, a file path, or a mapping (format, output, file, rotation)",
                    )),
                    p => Ok(AccessLogConfig::file(self.path(p))),
                };
            }
            RawAccessLog::Full(f) => f,
        };
        let format = match &f.format {
            None => AccessLogFormat::Json,
            Some(v) => match v.value.as_str() {
                "json" => AccessLogFormat::Json,
                "text" => AccessLogFormat::Text,
                other => {
                    return Err(self.err(
                        v,
                        "accessLog.format",
                        format!("`{other}`: use `json` or `text` (Istio's default text format)"),
                    ));
                }
            },
        };
        let (stdout, to_file) = match &f.output {
            None => (f.file.is_none(), f.file.is_some()),
            Some(o) => match o.value.as_str() {
                "stdout" => (true, false),
                "file" => (false, true),
                "both" => (true, true),
                "off" => (false, false),
                other => {
                    return Err(self.err(
                        o,
                        "accessLog.output",
                        format!("`{other}`: use `stdout`, `file`, `both` or `off`"),
                    ));
                }
            },
        };
        let file = match (&f.file, to_file) {
            (Some(p), true) if p.value.is_empty() => {
                return Err(self.err(p, "accessLog.file", "name the file"));
            }
            (Some(p), true) => Some(p),
            (None, true) => {
                return Err(self.err(
                    a,
                    "accessLog.file",
                    "output `file` or `both` needs `file`, the log file's path",
                ));
            }
            (Some(p), false) => {
                return Err(self.err(
                    p,
                    "accessLog.file",
                    "a file is named but `output` does not write to it: use `output: file` or `both`",
                ));
            }
            (None, false) => None,
        };
        let mut max_bytes = (DEFAULT_MAX_SIZE_MIB * 1024.0 * 1024.0) as u64;
        let mut max_files = DEFAULT_MAX_FILES;
        if let Some(r) = &f.rotation {
            if file.is_none() {
                return Err(self.err(
                    r,
                    "accessLog.rotation",
                    "rotation applies to a file: set `file` (and `output: file` or `both`)",
                ));
            }
            if let Some(m) = &r.value.max_size_mib {
                if !(m.value >= MAX_SIZE_MIB.0 && m.value <= MAX_SIZE_MIB.1) {
                    return Err(self.err(
                        m,
                        "accessLog.rotation.maxSizeMiB",
                        format!(
                            "{} is out of range: use 0.001 (1 KiB) to 1048576 (1 TiB)",
                            m.value
                        ),
                    ));
                }
                max_bytes = (m.value * 1024.0 * 1024.0) as u64;
            }
            if let Some(n) = &r.value.max_files {
                if n.value == 0 || n.value > MAX_FILES {
                    return Err(self.err(
                        n,
                        "accessLog.rotation.maxFiles",
                        format!("{}: use 1 to {MAX_FILES} rotated files", n.value),
                    ));
                }
                max_files = n.value as u32;
            }
        }
        Ok(AccessLogConfig {
            format,
            stdout,
            file: file.map(|p| FileOutput {
                path: self.path(&p.value),
                max_bytes,
                max_files,
            }),
        })
    }

    /// `certificates.istioCa`: istio-agent's settings under Outrigger's names.
    fn istio_ca(&self, i: &RawIstioCa) -> Result<IstioCaConfig, ConfigError> {
        const F: &str = "certificates.istioCa";
        let address = match &i.address {
            None => DEFAULT_CA_ADDRESS.to_string(),
            Some(a) => {
                let ok = a.value.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
                });
                if !ok {
                    return Err(self.err(
                        a,
                        &format!("{F}.address"),
                        format!(
                            "`{}` is not host:port (istiod: `{DEFAULT_CA_ADDRESS}`)",
                            a.value
                        ),
                    ));
                }
                a.value.clone()
            }
        };
        let server_name = match &i.server_name {
            Some(n) => {
                if outrigger_tls::rustls_pki_types::ServerName::try_from(n.value.as_str()).is_err()
                {
                    return Err(self.err(
                        n,
                        &format!("{F}.serverName"),
                        format!("`{}` is not a DNS name or IP address", n.value),
                    ));
                }
                n.value.clone()
            }
            None => {
                // The host of `address`, brackets of an IPv6 literal removed.
                let host = address.rsplit_once(':').map(|(h, _)| h).unwrap_or(&address);
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            }
        };
        let ratio = |v: &Option<Spanned<f64>>,
                     field: &str,
                     default: f64,
                     ok: fn(f64) -> bool,
                     text: &str| match v {
            None => Ok(default),
            Some(r) if ok(r.value) => Ok(r.value),
            Some(r) => Err(self.err(
                r,
                &format!("{F}.{field}"),
                format!("{} is out of range: use {text}", r.value),
            )),
        };
        let grace_period_ratio = ratio(
            &i.grace_period_ratio,
            "gracePeriodRatio",
            outrigger_ca::source::DEFAULT_GRACE_PERIOD_RATIO,
            |r| r > 0.0 && r < 1.0,
            "a fraction between 0 and 1, exclusive (Istio's SECRET_GRACE_PERIOD_RATIO; 0.5 renews half-way)",
        )?;
        let grace_period_ratio_jitter = ratio(
            &i.grace_period_ratio_jitter,
            "gracePeriodRatioJitter",
            outrigger_ca::source::DEFAULT_GRACE_PERIOD_RATIO_JITTER,
            |r| (0.0..0.5).contains(&r),
            "0 to below 0.5 (Istio's SECRET_GRACE_PERIOD_RATIO_JITTER)",
        )?;
        if let Some(j) = &i.grace_period_ratio_jitter
            && (grace_period_ratio - grace_period_ratio_jitter <= 0.0
                || grace_period_ratio + grace_period_ratio_jitter >= 1.0)
        {
            return Err(self.err(
                j,
                &format!("{F}.gracePeriodRatioJitter"),
                format!(
                    "gracePeriodRatio {grace_period_ratio} ± {grace_period_ratio_jitter} leaves 0..1: \
                     renewal would be due at issue or at expiry"
                ),
            ));
        }
        Ok(IstioCaConfig {
            address,
            server_name,
            root_cert: self.path(&i.root_cert.value),
            token_file: i.token_file.as_ref().map(|t| self.path(&t.value)),
            state_dir: self.path(&i.state_dir.value),
            ttl: self.duration(
                &i.ttl,
                &format!("{F}.ttl"),
                Duration::from_secs(24 * 3600),
                TTL,
            )?,
            grace_period_ratio,
            grace_period_ratio_jitter,
            bootstrap_timeout: self.duration(
                &i.bootstrap_timeout,
                &format!("{F}.bootstrapTimeout"),
                Duration::from_secs(120),
                BOOTSTRAP,
            )?,
        })
    }

    fn input(&self, v: &Spanned<String>, field: &str, directory: bool) -> InputFile {
        InputFile {
            path: self.path(&v.value),
            field: field.to_string(),
            line: v.referenced.line(),
            column: v.referenced.column(),
            directory,
        }
    }

    fn addr(&self, v: &Spanned<String>, field: &str) -> Result<SocketAddr, ConfigError> {
        v.value.parse::<SocketAddr>().map_err(|_| {
            self.err(
                v,
                field,
                format!(
                    "`{}` is not an address:port (e.g. `0.0.0.0:8080`, `127.0.0.1:5000`, `[::1]:5000`)",
                    v.value
                ),
            )
        })
    }

    fn validate(&self, raw: RawConfig) -> Result<AgentConfig, ConfigError> {
        let aliases: Vec<String> = raw
            .trust_domain_aliases
            .iter()
            .map(|a| a.value.clone())
            .collect();
        for (i, a) in raw.trust_domain_aliases.iter().enumerate() {
            outrigger_identity::validate_trust_domain(&a.value).map_err(|r| {
                self.err(
                    a,
                    &format!("trustDomainAliases[{i}]"),
                    format!("`{}`: {r}", a.value),
                )
            })?;
        }
        outrigger_identity::validate_trust_domain(&raw.trust_domain.value).map_err(|r| {
            self.err(
                &raw.trust_domain,
                "trustDomain",
                format!("`{}`: {r}", raw.trust_domain.value),
            )
        })?;
        let trust_domains = TrustDomains::new(&raw.trust_domain.value, &aliases)
            .map_err(|e| self.err(&raw.trust_domain, "trustDomain", e.to_string()))?;

        let w = &raw.workload;
        let identity = Identity::istio(
            &raw.trust_domain.value,
            &w.namespace.value,
            &w.service_account.value,
        )
        .map_err(|e| {
            self.err(
                &w.service_account,
                "workload",
                format!("namespace and serviceAccount do not make a SPIFFE ID: {e}"),
            )
        })?;
        let workload = WorkloadConfig {
            namespace: w.namespace.value.clone(),
            name: w
                .name
                .clone()
                .unwrap_or_else(|| w.service_account.value.clone()),
            labels: w.labels.clone(),
            service: w.service.clone(),
            cluster: w.cluster.clone().unwrap_or_else(|| "Kubernetes".into()),
        };

        let c = &raw.certificates;
        let mut inputs = Vec::new();
        let certificates = match (&c.value.files, &c.value.builtin, &c.value.istio_ca) {
            (Some(f), None, None) => {
                inputs.push(self.input(&f.cert_chain, "certificates.files.certChain", false));
                inputs.push(self.input(&f.key, "certificates.files.key", false));
                inputs.push(self.input(&f.root_cert, "certificates.files.rootCert", false));
                CertificatesConfig::Files {
                    cert_chain: self.path(&f.cert_chain.value),
                    key: self.path(&f.key.value),
                    root_cert: self.path(&f.root_cert.value),
                    poll_interval: self.duration(
                        &f.poll_interval,
                        "certificates.files.pollInterval",
                        Duration::from_secs(10),
                        POLL,
                    )?,
                }
            }
            (None, Some(b), None) => {
                inputs.push(self.input(&b.ca_dir, "certificates.builtin.caDir", true));
                CertificatesConfig::Builtin {
                    ca_dir: self.path(&b.ca_dir.value),
                    ttl: self.duration(
                        &b.ttl,
                        "certificates.builtin.ttl",
                        Duration::from_secs(24 * 3600),
                        TTL,
                    )?,
                }
            }
            (None, None, Some(i)) => {
                inputs.push(self.input(&i.root_cert, "certificates.istioCa.rootCert", false));
                CertificatesConfig::IstioCa(self.istio_ca(i)?)
            }
            (None, None, None) => {
                return Err(self.err(
                    c,
                    "certificates",
                    "set one of `files` (certChain, key, rootCert), `builtin` (caDir) or \
                     `istioCa` (rootCert, stateDir, tokenFile)",
                ));
            }
            _ => {
                return Err(self.err(
                    c,
                    "certificates",
                    "set exactly one of `files`, `builtin` and `istioCa`",
                ));
            }
        };

        let crl = match (&c.value.crl, c.value.only_verify_leaf_cert_crl) {
            (Some(f), only_leaf) => {
                inputs.push(self.input(f, "certificates.crl", false));
                Some((self.path(&f.value), only_leaf.unwrap_or(false)))
            }
            (None, Some(_)) => {
                return Err(self.err(
                    c,
                    "certificates.onlyVerifyLeafCertCrl",
                    "set only together with `crl` (the CRL file it applies to)",
                ));
            }
            (None, None) => None,
        };

        if raw.inbound.is_empty() && raw.outbound.is_empty() {
            return Err(self.err_noloc(
                "inbound",
                "no listeners: add at least one inbound `{name, listen, backend}` or outbound `{name, listen, host, port, endpoints, identity}`",
            ));
        }
        let mut inbound = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for (i, l) in raw.inbound.iter().enumerate() {
            let field = |f: &str| format!("inbound[{i}].{f}");
            let listen = self.addr(&l.listen, &field("listen"))?;
            let backend = self.addr(&l.backend, &field("backend"))?;
            // Istio's protocol selection: the declared protocol, else the port name's prefix
            // (`http-web`, `grpc-api`), else sniffing (`auto`).
            let protocol = match &l.protocol {
                Some(p) => Protocol::parse(&p.value).ok_or_else(|| {
                    self.err(
                        p,
                        &field("protocol"),
                        format!(
                            "`{}`: use http, http2, grpc, grpc-web, tcp (or tls, https, mongo, \
                             mysql, redis, carried as tcp) or auto",
                            p.value
                        ),
                    )
                })?,
                None => Protocol::from_port_name(&l.name).unwrap_or(Protocol::Auto),
            };
            if !names.insert(l.name.clone()) {
                return Err(self.err(
                    &l.listen,
                    &field("name"),
                    format!("duplicate listener name `{}`", l.name),
                ));
            }
            // The no-bypass rule: the application binds to loopback so that only Outrigger is
            // reachable from the network. A remote backend would travel in plaintext.
            if !backend.ip().is_loopback() && !l.allow_remote_backend {
                return Err(self.err(
                    &l.backend,
                    &field("backend"),
                    format!(
                        "{backend} is not a loopback address: the application must listen on 127.0.0.1 or ::1 so that only Outrigger can reach it; set `allowRemoteBackend: true` on this listener to accept the risk"
                    ),
                ));
            }
            if backend == listen {
                return Err(self.err(
                    &l.backend,
                    &field("backend"),
                    "backend is the listener's own address",
                ));
            }
            inbound.push(InboundConfig {
                name: l.name.clone(),
                listen,
                backend,
                protocol,
            });
        }

        let p = &raw.policy;
        let root_namespace = p
            .root_namespace
            .clone()
            .unwrap_or_else(|| "istio-system".into());
        let kubernetes = match &p.kubernetes {
            Some(k) => {
                Some(self.kubernetes(k, &workload.namespace, &root_namespace, &mut inputs)?)
            }
            None => None,
        };
        let policy = PolicyConfig {
            paths: p.paths.iter().map(|x| self.path(x)).collect(),
            root_namespace,
            default_mtls_mode: match p.default_mtls_mode.unwrap_or(MtlsModeName::Strict) {
                MtlsModeName::Strict => MtlsMode::Strict,
                MtlsModeName::Permissive => MtlsMode::Permissive,
                MtlsModeName::Disable => MtlsMode::Disable,
            },
            path_normalization: match p.path_normalization.unwrap_or(PathNormalizationName::Base) {
                PathNormalizationName::None => PathNormalization::None,
                PathNormalizationName::Base => PathNormalization::Base,
                PathNormalizationName::MergeSlashes => PathNormalization::MergeSlashes,
                PathNormalizationName::DecodeAndMergeSlashes => {
                    PathNormalization::DecodeAndMergeSlashes
                }
            },
            reload_interval: self.duration(
                &p.reload_interval,
                "policy.reloadInterval",
                Duration::from_secs(2),
                POLL,
            )?,
            kubernetes,
        };

        let metrics_listen = match &raw.admin.metrics_listen {
            None => None,
            Some(a) => Some(self.addr(a, "admin.metricsListen")?),
        };
        let admin = match &raw.admin.listen {
            Some(a) if a.value == "off" => None,
            Some(a) => Some(self.addr(a, "admin.listen")?),
            None => Some(DEFAULT_ADMIN.parse().expect("valid default")),
        };
        let access_log = self.access_log(raw.access_log.as_ref())?;
        let j = &raw.jwt;
        let mut identity_headers = Vec::new();
        for (h, claim) in &j.identity_headers {
            let lower = h.to_ascii_lowercase();
            if http::header::HeaderName::from_bytes(lower.as_bytes()).is_err() {
                return Err(self.err(
                    claim,
                    &format!("jwt.identityHeaders.{h}"),
                    "not a valid HTTP header name",
                ));
            }
            // Headers that carry the connection's or the proxy's own meaning cannot be reused.
            if matches!(
                lower.as_str(),
                "host"
                    | "authorization"
                    | "x-forwarded-client-cert"
                    | "content-length"
                    | "transfer-encoding"
                    | "connection"
                    | "te"
            ) {
                return Err(self.err(
                    claim,
                    &format!("jwt.identityHeaders.{h}"),
                    "this header cannot carry claims",
                ));
            }
            if claim.value.is_empty() {
                return Err(self.err(
                    claim,
                    &format!("jwt.identityHeaders.{h}"),
                    "name the claim to copy, e.g. `upn` or `groups`",
                ));
            }
            identity_headers.push((lower, claim.value.clone()));
        }
        if let Some(b) = &j.ca_bundle {
            inputs.push(self.input(b, "jwt.caBundle", false));
        }
        let jwt = JwtConfig {
            ca_bundle: j.ca_bundle.as_ref().map(|p| self.path(&p.value)),
            refresh_interval: self.duration(
                &j.refresh_interval,
                "jwt.refreshInterval",
                Duration::from_secs(20 * 60),
                JWKS_REFRESH,
            )?,
            identity_headers,
        };
        let extension_providers = self.extension_providers(&raw.extension_providers)?;
        let (outbound, outbound_proxy) = self.outbound(
            &raw.outbound,
            raw.outbound_proxy.as_ref(),
            &trust_domains,
            &extension_providers,
        )?;
        let (hbone, network) = self.hbone(raw.hbone.as_ref(), &inbound)?;
        let t = &raw.timeouts;
        let worker_threads = match &raw.runtime.worker_threads {
            None => None,
            Some(n) => {
                worker_threads(n.value).map_err(|r| self.err(n, "runtime.workerThreads", r))?
            }
        };
        let connections = self.connections(&raw.connections)?;
        let rate_limits = self.rate_limits(&raw.rate_limits, &inbound)?;
        let tracing = self.tracing(raw.tracing.as_ref(), &raw.trust_domain.value)?;
        Ok(AgentConfig {
            file: self.file.to_path_buf(),
            trust_domains,
            identity,
            workload,
            certificates,
            crl,
            inbound,
            policy,
            admin,
            metrics_listen,
            access_log,
            log_format: raw.log.format.unwrap_or_default(),
            log_level: match &raw.log.level {
                Some(l) => crate::logging::parse_filter(&l.value)
                    .map_err(|r| self.err(l, "log.level", r))?,
                None => "info".into(),
            },
            detect_timeout: self.duration(
                &t.detect,
                "timeouts.detect",
                Duration::from_secs(1),
                TIMEOUT,
            )?,
            handshake_timeout: self.duration(
                &t.handshake,
                "timeouts.handshake",
                Duration::from_secs(10),
                TIMEOUT,
            )?,
            connect_timeout: self.duration(
                &t.connect,
                "timeouts.connect",
                Duration::from_secs(10),
                TIMEOUT,
            )?,
            drain_timeout: self.duration(
                &t.drain,
                "timeouts.drain",
                Duration::from_secs(30),
                DRAIN,
            )?,
            worker_threads,
            jwt,
            outbound,
            outbound_proxy,
            hbone,
            network,
            inputs,
            connections,
            rate_limits,
            extension_providers,
            tracing,
        })
    }

    /// `hbone:`: present means enabled unless `enabled: false`.
    fn hbone(
        &self,
        raw: Option<&Spanned<RawHbone>>,
        inbound: &[InboundConfig],
    ) -> Result<(Option<outrigger_proxy::hbone::HboneConfig>, String), ConfigError> {
        let Some(h) = raw else {
            return Ok((None, String::new()));
        };
        let network = match &h.value.network {
            None => String::new(),
            Some(n) => {
                let ok = !n.value.is_empty()
                    && n.value.len() <= 63
                    && n.value
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
                if !ok {
                    return Err(self.err(
                        n,
                        "hbone.network",
                        format!(
                            "`{}` is not a network name (letters, digits, `-`, `_`, `.`; at most 63), e.g. `network1`",
                            n.value
                        ),
                    ));
                }
                n.value.clone()
            }
        };
        if h.value.enabled == Some(false) {
            return Ok((None, network));
        }
        let listen = match &h.value.listen {
            Some(l) => self.addr(l, "hbone.listen")?,
            None => DEFAULT_HBONE_LISTEN.parse().expect("valid default"),
        };
        if inbound.is_empty() {
            return Err(self.err(
                h,
                "hbone",
                "HBONE streams are routed to inbound listeners by port, and there are none: add an inbound listener or set `enabled: false`",
            ));
        }
        let at = h.value.listen.as_ref();
        for l in inbound {
            if l.listen.port() == listen.port() && l.listen.port() != 0 {
                let reason = format!(
                    "port {} is also inbound listener `{}`'s port; HBONE needs its own (Istio's is 15008)",
                    listen.port(),
                    l.name
                );
                return Err(match at {
                    Some(a) => self.err(a, "hbone.listen", reason),
                    None => self.err(h, "hbone.listen", reason),
                });
            }
        }
        Ok((
            Some(outrigger_proxy::hbone::HboneConfig { listen }),
            network,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
trustDomain: cluster.local
workload:
  namespace: legacy
  serviceAccount: windows-app
  labels:
    app: windows-app
certificates:
  files:
    certChain: certs/cert-chain.pem
    key: certs/key.pem
    rootCert: certs/root-cert.pem
inbound:
  - name: web
    listen: 0.0.0.0:8080
    backend: 127.0.0.1:5000
    protocol: http
policy:
  paths: [policies]
"#;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(Path::new("/etc/outrigger/agent.yaml"), text)
    }

    #[test]
    fn parses_a_good_config_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            c.identity.to_string(),
            "spiffe://cluster.local/ns/legacy/sa/windows-app"
        );
        assert_eq!(c.inbound[0].listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(
            c.policy.paths,
            vec![PathBuf::from("/etc/outrigger/policies")]
        );
        assert_eq!(c.policy.default_mtls_mode, MtlsMode::Strict);
        assert_eq!(c.admin, Some("127.0.0.1:15000".parse().unwrap()));
        match c.certificates {
            CertificatesConfig::Files { cert_chain, .. } => {
                assert_eq!(
                    cert_chain,
                    PathBuf::from("/etc/outrigger/certs/cert-chain.pem")
                )
            }
            other => panic!("{other:?}"),
        }
    }

    fn istio_ca(body: &str) -> Result<AgentConfig, ConfigError> {
        let files = "  files:\n    certChain: certs/cert-chain.pem\n    key: certs/key.pem\n    rootCert: certs/root-cert.pem\n";
        parse(&GOOD.replace(files, &format!("  istioCa:\n{body}")))
    }

    #[test]
    fn istio_ca_defaults_follow_istio_agent() {
        let c = istio_ca("    rootCert: root-cert.pem\n    stateDir: identity\n").unwrap();
        let CertificatesConfig::IstioCa(i) = c.certificates else {
            panic!("{:?}", c.certificates)
        };
        assert_eq!(i.address, "istiod.istio-system.svc:15012");
        assert_eq!(i.server_name, "istiod.istio-system.svc");
        assert_eq!(i.root_cert, PathBuf::from("/etc/outrigger/root-cert.pem"));
        assert_eq!(i.state_dir, PathBuf::from("/etc/outrigger/identity"));
        assert_eq!(i.token_file, None);
        assert_eq!(i.ttl, Duration::from_secs(24 * 3600));
        assert_eq!(i.grace_period_ratio, 0.5);
        assert_eq!(i.grace_period_ratio_jitter, 0.01);
        // A VM reaching istiod through the east-west gateway's address keeps istiod's name.
        let c =
            istio_ca("    address: \"[fd00::5]:15012\"\n    rootCert: r.pem\n    stateDir: s\n")
                .unwrap();
        let CertificatesConfig::IstioCa(i) = c.certificates else {
            panic!()
        };
        assert_eq!(i.server_name, "fd00::5");
    }

    #[test]
    fn istio_ca_errors_name_the_field() {
        let cases = [
            (
                "    address: istiod\n    rootCert: r\n    stateDir: s\n",
                "certificates.istioCa.address",
                "not host:port",
            ),
            (
                "    rootCert: r\n    stateDir: s\n    gracePeriodRatio: 1.0\n",
                "certificates.istioCa.gracePeriodRatio",
                "out of range",
            ),
            (
                "    rootCert: r\n    stateDir: s\n    gracePeriodRatioJitter: 0.6\n",
                "certificates.istioCa.gracePeriodRatioJitter",
                "out of range",
            ),
            (
                "    rootCert: r\n    stateDir: s\n    gracePeriodRatio: 0.9\n    gracePeriodRatioJitter: 0.2\n",
                "certificates.istioCa.gracePeriodRatioJitter",
                "leaves 0..1",
            ),
            (
                "    rootCert: r\n    stateDir: s\n    ttl: 10s\n",
                "certificates.istioCa.ttl",
                "out of range",
            ),
            (
                "    rootCert: r\n    stateDir: s\n    serverName: \"bad name\"\n",
                "certificates.istioCa.serverName",
                "not a DNS name",
            ),
        ];
        for (body, field, why) in cases {
            let e = istio_ca(body).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e}");
            assert!(e.to_string().contains(why), "{body}: {e}");
            assert!(e.line > 0, "{body}: {e}");
        }
        let e = istio_ca("    stateDir: s\n").unwrap_err();
        assert!(e.to_string().contains("rootCert"), "{e}");
        let both = GOOD.replace(
            "certificates:\n",
            "certificates:\n  istioCa: {rootCert: r, stateDir: s}\n",
        );
        let e = parse(&both).unwrap_err();
        assert!(
            e.to_string()
                .contains("exactly one of `files`, `builtin` and `istioCa`"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_field() {
        let text = GOOD.replace("    protocol: http", "    protocl: http");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.starts_with("/etc/outrigger/agent.yaml:17:"), "{e}");
        assert!(e.contains("protocl"), "{e}");
    }

    #[test]
    fn remote_backend_is_refused_unless_allowed() {
        let text = GOOD.replace("127.0.0.1:5000", "10.1.2.3:5000");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains(":16:"), "{e}");
        assert!(e.contains("inbound[0].backend"), "{e}");
        assert!(e.contains("not a loopback address"), "{e}");
        let ok = text.replace(
            "    protocol: http",
            "    protocol: http\n    allowRemoteBackend: true",
        );
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (
                GOOD.replace("0.0.0.0:8080", "8080"),
                "inbound[0].listen",
                ":15:",
            ),
            (
                GOOD.replace("protocol: http", "protocol: udp"),
                "udp",
                ":17:",
            ),
            (
                GOOD.replace("trustDomain: cluster.local", "trustDomain: Cluster Local"),
                "trustDomain",
                ":2:",
            ),
            (
                GOOD.replace("policy:\n", "policy:\n  reloadInterval: soon\n"),
                "policy.reloadInterval",
                ":19:",
            ),
        ];
        for (text, needle, line) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                e.contains(needle) && e.contains(line),
                "expected {needle} at {line}: {e}"
            );
        }
    }

    const OUTBOUND: &str = r#"outbound:
  - name: ratings
    listen: 127.0.0.1:9080
    host: ratings.default.svc.cluster.local
    port: 8080
    endpoints: [10.0.0.7:8080, ratings.internal:8080, 10.0.0.8]
    identity: spiffe://cluster.local/ns/default/sa/bookinfo-ratings
  - name: reviews
    host: reviews.default.svc.cluster.local
    port: 9080
    protocol: grpc
    eastWestGateway: {address: 34.1.2.3}
    identity:
      - {serviceAccount: bookinfo-reviews}
      - spiffe://cluster.local/ns/default/sa/reviews-v2
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
      connectionPool:
        tcp: {connectTimeout: 2s}
        http: {idleTimeout: 5m, maxRequestsPerConnection: 100, h2UpgradePolicy: UPGRADE}
      outlierDetection: {consecutive5xxErrors: 3, interval: 5s, baseEjectionTime: 1m, maxEjectionPercent: 50}
    retries: {attempts: 4, perTryTimeout: 1s}
    timeout: 10s
  - name: db
    listen: 127.0.0.1:15432
    host: db.example.com
    port: 5432
    protocol: tcp
    endpoints: [db1.example.com]
    identity: {namespace: data, serviceAccount: postgres}
  - name: ambient
    listen: 127.0.0.1:9081
    host: productpage.bookinfo.svc.cluster.local
    port: 9080
    endpoints: [10.244.1.7:9080]
    transport: hbone
    identity: {serviceAccount: bookinfo-productpage}
  - name: via-waypoint
    listen: 127.0.0.1:9082
    host: details.bookinfo.svc.cluster.local
    port: 9080
    endpoints: [10.96.0.20:9080]
    transport: hbone
    hbonePeer: 10.244.2.9
    identity: spiffe://cluster.local/ns/bookinfo/sa/waypoint
outboundProxy:
  listen: 127.0.0.1:15080
  allowPlainEgress: true
"#;

    #[test]
    fn parses_outbound_destinations_with_istio_defaults() {
        use outrigger_proxy::outbound::*;
        let c = parse(&format!("{GOOD}{OUTBOUND}")).unwrap();
        assert_eq!(c.outbound.len(), 5);
        let r = &c.outbound[0];
        assert_eq!(r.listen, Some("127.0.0.1:9080".parse().unwrap()));
        assert_eq!(
            r.sni(),
            "outbound_.8080_._.ratings.default.svc.cluster.local"
        );
        assert_eq!(r.protocol, OutboundProtocol::Http);
        assert_eq!(
            r.endpoints,
            vec![
                EndpointAddr::Static("10.0.0.7:8080".parse().unwrap()),
                EndpointAddr::Dns {
                    host: "ratings.internal".into(),
                    port: 8080
                },
                EndpointAddr::Static("10.0.0.8:8080".parse().unwrap()),
            ]
        );
        assert_eq!(
            r.expected_identities[0].to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
        );
        // Istio's defaults: LEAST_REQUEST, connectTimeout 10s, idleTimeout 1h, 2 retries,
        // consecutive5xxErrors 5, interval 10s, baseEjectionTime 30s, maxEjectionPercent 10.
        assert_eq!(r.lb, LbPolicy::LeastRequest);
        assert_eq!(r.pool, ConnectionPool::default());
        assert_eq!(r.pool.connect_timeout, Duration::from_secs(10));
        assert_eq!(r.pool.idle_timeout, Duration::from_secs(3600));
        assert_eq!(r.retries.attempts, 2);
        assert_eq!(r.outlier.consecutive_5xx_errors, 5);
        assert_eq!(r.outlier.interval, Duration::from_secs(10));
        assert_eq!(r.outlier.base_ejection_time, Duration::from_secs(30));
        assert_eq!(r.outlier.max_ejection_percent, 10);
        assert_eq!(r.timeout, None);

        let g = &c.outbound[1];
        assert!(g.via_gateway);
        assert_eq!(g.listen, None);
        assert_eq!(g.protocol, OutboundProtocol::Http2);
        assert_eq!(
            g.endpoints,
            vec![EndpointAddr::Static("34.1.2.3:15443".parse().unwrap())]
        );
        let ids: Vec<String> = g
            .expected_identities
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(
            ids,
            vec![
                "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
                "spiffe://cluster.local/ns/default/sa/reviews-v2"
            ]
        );
        assert_eq!(g.lb, LbPolicy::RoundRobin);
        assert_eq!(g.pool.connect_timeout, Duration::from_secs(2));
        assert_eq!(g.pool.idle_timeout, Duration::from_secs(300));
        assert_eq!(g.pool.max_requests_per_connection, 100);
        assert!(g.pool.h2_upgrade);
        assert_eq!(g.outlier.consecutive_5xx_errors, 3);
        assert_eq!(g.outlier.max_ejection_percent, 50);
        assert_eq!(g.retries.attempts, 4);
        assert_eq!(g.retries.per_try_timeout, Some(Duration::from_secs(1)));
        assert_eq!(g.timeout, Some(Duration::from_secs(10)));

        assert_eq!(r.transport, Transport::Mtls, "mTLS unless told otherwise");
        assert_eq!(c.outbound[3].transport, Transport::Hbone { peer: None });
        assert_eq!(
            c.outbound[4].transport,
            Transport::Hbone {
                peer: Some("10.244.2.9:15008".parse().unwrap())
            }
        );

        let d = &c.outbound[2];
        assert_eq!(d.protocol, OutboundProtocol::Tcp);
        assert_eq!(
            d.expected_identities[0].to_string(),
            "spiffe://cluster.local/ns/data/sa/postgres"
        );
        let p = c.outbound_proxy.as_ref().unwrap();
        assert_eq!(p.listen, "127.0.0.1:15080".parse().unwrap());
        assert!(p.allow_plain_egress);
    }

    #[test]
    fn outbound_errors_name_file_line_and_field() {
        let base = format!("{GOOD}{OUTBOUND}");
        let cases = [
            (
                base.replace("listen: 127.0.0.1:9080", "listen: 0.0.0.0:9080"),
                "outbound[0].listen",
                ":22:",
                "not a loopback address",
            ),
            (
                base.replace(
                    "    identity: spiffe://cluster.local/ns/default/sa/bookinfo-ratings\n",
                    "",
                ),
                "outbound[0].identity",
                ":21:",
                "server identity to pin",
            ),
            (
                base.replace("protocol: grpc", "protocol: udp"),
                "outbound[1].protocol",
                ":30:",
                "use http, http2, grpc or tcp",
            ),
            (
                base.replace(
                    "spiffe://cluster.local/ns/default/sa/bookinfo-ratings",
                    "spiffe://evil.local/ns/default/sa/bookinfo-ratings",
                ),
                "outbound[0].identity",
                ":26:",
                "does not trust",
            ),
            (
                base.replace(
                    "eastWestGateway: {address: 34.1.2.3}",
                    "eastWestGateway: {address: 34.1.2.3}\n    endpoints: [10.0.0.9:9080]",
                ),
                "outbound[1].eastWestGateway",
                ":27:",
                "not both",
            ),
            (
                base.replace("[db1.example.com]", "[\"db1.example.com:x\"]"),
                "outbound[2].endpoints[0]",
                ":48:",
                "not a port number",
            ),
            (
                base.replace("maxEjectionPercent: 50", "maxEjectionPercent: 150"),
                "maxEjectionPercent",
                ":40:",
                "0 to 100",
            ),
            (
                base.replace("  listen: 127.0.0.1:15080", "  listen: 127.0.0.1:9080"),
                "outboundProxy.listen",
                ":66:",
                "already the listener of `ratings`",
            ),
            (
                base.replace(
                    "transport: hbone\n    hbonePeer",
                    "transport: quic\n    hbonePeer",
                ),
                "outbound[4].transport",
                ":62:",
                "use mtls (default",
            ),
            (
                base.replace("hbonePeer: 10.244.2.9", "hbonePeer: waypoint:x"),
                "outbound[4].hbonePeer",
                ":63:",
                "not an address of an HBONE peer",
            ),
            (
                base.replace(
                    "    listen: 127.0.0.1:15432\n",
                    "    listen: 127.0.0.1:15432\n    hbonePeer: 10.0.0.1\n",
                ),
                "outbound[2].hbonePeer",
                ":45:",
                "only for `transport: hbone`",
            ),
            (
                base.replace(
                    "    eastWestGateway: {address: 34.1.2.3}\n",
                    "    eastWestGateway: {address: 34.1.2.3}\n    transport: hbone\n",
                ),
                "outbound[1].eastWestGateway",
                ":31:",
                "double HBONE",
            ),
            (
                base.replace(
                    "outboundProxy:\n  listen: 127.0.0.1:15080\n  allowPlainEgress: true\n",
                    "",
                ),
                "outbound[1].listen",
                ":27:",
                "configure `outboundProxy`",
            ),
        ];
        for (text, field, line, reason) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                e.starts_with("/etc/outrigger/agent.yaml")
                    && e.contains(field)
                    && e.contains(line)
                    && e.contains(reason),
                "expected {field} at {line} ({reason}): {e}"
            );
        }
    }

    #[test]
    fn the_outbound_doc_example_parses() {
        // The first YAML block of docs/outbound.md is the reference example: keep it valid.
        let doc = include_str!("../../../docs/outbound.md");
        let yaml = doc
            .split("```yaml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a yaml block in docs/outbound.md");
        let c = parse(&format!("{GOOD}{yaml}")).unwrap();
        assert_eq!(c.outbound.len(), 2);
        assert!(c.outbound[1].via_gateway);
        assert!(c.outbound_proxy.is_some());
    }

    #[test]
    fn an_outbound_only_agent_is_valid() {
        let text = GOOD.replace(
            "inbound:\n  - name: web\n    listen: 0.0.0.0:8080\n    backend: 127.0.0.1:5000\n    protocol: http\n",
            "",
        );
        assert!(parse(&text).is_err(), "no listener at all is an error");
        let c = parse(&format!("{text}{OUTBOUND}")).unwrap();
        assert!(c.inbound.is_empty());
        assert_eq!(c.outbound.len(), 5);
    }

    #[test]
    fn hbone_is_off_by_default_and_on_when_present() {
        let c = parse(GOOD).unwrap();
        assert!(c.hbone.is_none());
        assert_eq!(c.network, "");
        let c = parse(&format!("{GOOD}hbone: {{}}\n")).unwrap();
        assert_eq!(
            c.hbone.unwrap().listen,
            DEFAULT_HBONE_LISTEN.parse().unwrap()
        );
        let c = parse(&format!(
            "{GOOD}hbone:\n  listen: 10.0.0.5:15008\n  network: net-1\n"
        ))
        .unwrap();
        assert_eq!(c.hbone.unwrap().listen, "10.0.0.5:15008".parse().unwrap());
        assert_eq!(c.network, "net-1");
        let c = parse(&format!(
            "{GOOD}hbone:\n  enabled: false\n  network: net-1\n"
        ))
        .unwrap();
        assert!(c.hbone.is_none());
        assert_eq!(c.network, "net-1");
    }

    #[test]
    fn hbone_errors_name_file_line_and_field() {
        // GOOD ends with a newline: what is appended starts on the next line.
        let first = GOOD.lines().count() + 1;
        let cases = [
            (
                "hbone:\n  listen: 15008\n",
                "hbone.listen",
                first + 1,
                "not an address",
            ),
            (
                "hbone:\n  network: \"net 1\"\n",
                "hbone.network",
                first + 1,
                "not a network name",
            ),
            (
                "hbone:\n  listen: 0.0.0.0:8080\n",
                "hbone.listen",
                first + 1,
                "inbound listener `web`",
            ),
            // The field path of a schema error comes from serde_path_to_error.
            (
                "hbone:\n  listn: 0.0.0.0:15008\n",
                "hbone.listn",
                first + 1,
                "unknown field `listn`",
            ),
        ];
        for (extra, field, line, reason) in cases {
            let e = parse(&format!("{GOOD}{extra}")).unwrap_err();
            let text = e.to_string();
            assert_eq!(e.field, field, "{text}");
            assert_eq!(e.line as usize, line, "{text}");
            assert!(text.starts_with("/etc/outrigger/agent.yaml:"), "{text}");
            assert!(text.contains(reason), "{text}");
        }
        // HBONE routes to inbound listeners: an outbound-only agent cannot enable it.
        let outbound_only = GOOD.replace(
            "inbound:\n  - name: web\n    listen: 0.0.0.0:8080\n    backend: 127.0.0.1:5000\n    protocol: http\n",
            "",
        );
        let e = parse(&format!(
            "{outbound_only}{OUTBOUND}hbone:\n  enabled: true\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "hbone", "{e}");
        assert!(e.line > 0, "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s", TIMEOUT), Ok(Duration::from_secs(10)));
        assert_eq!(
            parse_duration("500ms", TIMEOUT),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("1h30m", TIMEOUT),
            Ok(Duration::from_secs(5400))
        );
        assert_eq!(
            parse_duration("24h", TIMEOUT),
            Ok(Duration::from_secs(86400))
        );
        // `d` stays accepted (the agent always took it: `ca issue --ttl 30d`).
        assert_eq!(
            parse_duration("30d", TTL),
            Ok(Duration::from_secs(30 * 86400))
        );
        assert_eq!(parse_duration("0s", DRAIN), Ok(Duration::ZERO));
        for bad in ["10", "ten seconds", "5y", "", "-1s", "0s", "25h", "1.5"] {
            assert!(parse_duration(bad, TIMEOUT).is_err(), "{bad}");
        }
        // What used to panic (f64 overflow in Duration::from_secs_f64, and the addition).
        for huge in [
            "99999999999999999999s",
            "18446744073709551615s18446744073709551615s",
            "1e400s",
            "9223372036854775807h",
        ] {
            assert!(parse_duration(huge, TIMEOUT).is_err(), "{huge}");
        }
    }

    /// Every bad value names file:line:column and the field (docs/config.md's promise).
    #[test]
    fn bad_numbers_and_durations_name_file_line_and_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "timeouts:\n  connect: 99999999999999999999s\n",
                "/etc/outrigger/agent.yaml:21:12: timeouts.connect: `99999999999999999999s` is out of range",
                "",
            ),
            (
                "timeouts:\n  connect: 0s\n",
                "/etc/outrigger/agent.yaml:21:12: timeouts.connect: `0s` is out of range: use 1ms to 24h",
                "",
            ),
            (
                "timeouts:\n  drain: 48h\n",
                "/etc/outrigger/agent.yaml:21:10: timeouts.drain: `48h` is out of range: use 0s to 24h",
                "",
            ),
            (
                "timeouts:\n  handshake: -5s\n",
                "/etc/outrigger/agent.yaml:21:14: timeouts.handshake: `-5s` is negative",
                "",
            ),
            (
                "runtime:\n  workerThreads: 100000000\n",
                "/etc/outrigger/agent.yaml:21:18: runtime.workerThreads: 100000000: use 1 to 1024",
                "",
            ),
            (
                "runtime:\n  workerThreads: many\n",
                "/etc/outrigger/agent.yaml:21:18: runtime.workerThreads: invalid",
                "",
            ),
            (
                "runtime:\n  workerThreads: -3\n",
                "/etc/outrigger/agent.yaml:21:18: runtime.workerThreads: ",
                "",
            ),
            (
                "jwt:\n  refreshInterval: 100ms\n",
                "/etc/outrigger/agent.yaml:21:20: jwt.refreshInterval: `100ms` is out of range: use 1s to 24h",
                "",
            ),
            (
                "admin:\n  listen: [1, 2]\n",
                "/etc/outrigger/agent.yaml:21:11: admin.listen: ",
                "",
            ),
            (
                "log:\n  format: 7\n",
                "/etc/outrigger/agent.yaml:21:11: log.format: ",
                "",
            ),
        ];
        for (extra, want, _) in cases {
            let e = parse(&format!("{GOOD}{extra}")).unwrap_err().to_string();
            assert!(e.starts_with(want), "\nwant: {want}\ngot:  {e}");
        }
        let e = parse(&GOOD.replace("reloadInterval", "x").replace(
            "  paths: [policies]\n",
            "  paths: [policies]\n  reloadInterval: 0s\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("/etc/outrigger/agent.yaml:20:19: policy.reloadInterval: `0s` is out of range: use 10ms to 24h"),
            "{e}"
        );
    }

    /// serde-saphyr reports a wrong type with a location but no field; the field path comes
    /// from serde_path_to_error.
    #[test]
    fn wrong_types_name_their_field() {
        let cases = [
            (
                GOOD.replace("protocol: http", "protocol: [http]"),
                "/etc/outrigger/agent.yaml:17:15: inbound[0].protocol: ",
            ),
            (
                GOOD.replace("  serviceAccount: windows-app", "  serviceAccount: {a: b}"),
                "/etc/outrigger/agent.yaml:5:19: workload.serviceAccount: ",
            ),
            (
                GOOD.replace("  paths: [policies]", "  paths: policies"),
                "/etc/outrigger/agent.yaml:19:10: policy.paths: ",
            ),
            (
                format!("{GOOD}{OUTBOUND}")
                    .replace("port: 8080\n    endpoints", "port: 80800\n    endpoints"),
                "/etc/outrigger/agent.yaml:24:11: outbound[0].port: ",
            ),
            (
                format!("{GOOD}{OUTBOUND}").replace("attempts: 4", "attempts: 4294967296"),
                "/etc/outrigger/agent.yaml:41:25: outbound[1].retries.attempts: ",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with(want), "\nwant: {want}\ngot:  {e}");
        }
    }

    #[test]
    fn istio_int32_fields_are_bounded() {
        let base = format!("{GOOD}{OUTBOUND}");
        let e = parse(&base.replace("attempts: 4", "attempts: 2147483648"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("outbound[1].retries.attempts: 2147483648: at most 2147483647"),
            "{e}"
        );
        let c = parse(&base.replace("attempts: 4", "attempts: 2147483647")).unwrap();
        assert_eq!(c.outbound[1].retries.attempts, 2_147_483_647);
        let e = parse(&base.replace(
            "maxRequestsPerConnection: 100",
            "maxRequestsPerConnection: 3000000000",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("outbound[1].trafficPolicy.connectionPool.http.maxRequestsPerConnection"),
            "{e}"
        );
        let e = parse(&base.replace(
            "eastWestGateway: {address: 34.1.2.3}",
            "eastWestGateway: {address: 34.1.2.3, port: 0}",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("outbound[1].eastWestGateway.port"), "{e}");
        let e = parse(&base.replace("timeout: 10s", "timeout: 400d"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":42:") && e.contains("outbound[1].timeout: `400d` is out of range"),
            "{e}"
        );
    }

    #[test]
    fn worker_threads_flag_is_bounded_like_the_setting() {
        assert_eq!(parse_worker_threads("4"), Ok(4));
        assert_eq!(parse_worker_threads("1024"), Ok(1024));
        assert_eq!(parse_worker_threads("0"), Ok(0), "one per core");
        for bad in ["1025", "100000000", "-1", "x", "99999999999999999999999"] {
            assert!(parse_worker_threads(bad).is_err(), "{bad}");
        }
        assert!(parse_ttl("30s").is_err(), "a certificate renewed every 15s");
        assert!(parse_ttl("3651d").is_err());
        assert_eq!(parse_ttl("90d"), Ok(Duration::from_secs(90 * 86400)));
    }

    #[test]
    fn missing_input_files_are_reported_at_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        let c = AgentConfig::parse(&path, GOOD).unwrap();
        let e = c.check_inputs().unwrap_err();
        assert_eq!((e.line, e.column), (10, 16), "{e}");
        assert_eq!(e.field, "certificates.files.certChain", "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "{}:10:16: certificates.files.certChain: cannot read {}",
                path.display(),
                dir.path().join("certs/cert-chain.pem").display()
            )),
            "{text}"
        );
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        for f in ["cert-chain.pem", "key.pem"] {
            std::fs::write(dir.path().join("certs").join(f), "x").unwrap();
        }
        let e = c.check_inputs().unwrap_err();
        assert_eq!(e.field, "certificates.files.rootCert", "{e}");
        assert_eq!(e.line, 12, "{e}");
        std::fs::write(dir.path().join("certs/root-cert.pem"), "x").unwrap();
        c.check_inputs().unwrap();
        let with_bundle =
            AgentConfig::parse(&path, &format!("{GOOD}jwt:\n  caBundle: corp.pem\n")).unwrap();
        let e = with_bundle.check_inputs().unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("jwt.caBundle", 21), "{e}");
    }

    /// `extensionProviders:` (config_extauthz.rs): istiod's validation (extauthz.go) and
    /// its header-list rules, errors at their line and field.
    #[test]
    fn extension_providers_section() {
        use outrigger_proxy::ext_authz::{Api, NameMatch};
        let http = |p: &outrigger_proxy::ext_authz::Provider| match &p.api {
            Api::Http(h) => h.clone(),
            Api::Grpc => panic!("{} is an HTTP provider", p.name),
        };
        let c = parse(&format!(
            "{GOOD}extensionProviders:
- name: a
  envoyExtAuthzHttp:
    service: foo/ext-authz.foo.svc.cluster.local
    port: 8000
    includeHeadersInCheck: [x-old]
- name: b
  envoyExtAuthzHttp:
    service: ext-authz
    port: 9000
    includeRequestHeadersInCheck: [\"*-Id\", x-ticket]
    includeHeadersInCheck: [x-old]
- name: opa
  envoyExtAuthzGrpc: {{service: opa.opa.svc.cluster.local, port: 9191, timeout: 250ms, failOpen: true,
    includeRequestBodyInCheck: {{maxRequestBytes: 4096, allowPartialMessage: true, packAsBytes: true}}}}
"
        ))
        .unwrap();
        let (a, b) = (&c.extension_providers[0], &c.extension_providers[1]);
        let opa = &c.extension_providers[2];
        assert!(matches!(opa.api, Api::Grpc));
        assert_eq!(
            (opa.port, opa.timeout, opa.fail_open),
            (9191, Duration::from_millis(250), true)
        );
        assert_eq!(
            opa.body,
            Some(outrigger_proxy::ext_authz::BodySettings {
                max_bytes: 4096,
                allow_partial: true,
                pack_as_bytes: true
            })
        );
        assert_eq!(a.body, None);
        // `namespace/host`: the host is dialed.
        assert_eq!(a.service, "ext-authz.foo.svc.cluster.local");
        assert_eq!(a.timeout, Duration::from_secs(600));
        assert_eq!(a.status_on_error, http::StatusCode::FORBIDDEN);
        // The deprecated list counts only when the new one is not set.
        assert_eq!(
            http(a).include_request_headers,
            [NameMatch::Exact("x-old".into())]
        );
        assert_eq!(
            http(b).include_request_headers,
            [
                NameMatch::Suffix("-id".into()),
                NameMatch::Exact("x-ticket".into())
            ]
        );

        let line = GOOD.lines().count() + 2;
        for (body, field, reason) in [
            (
                "- name: a\n  envoyExtAuthzHttp: {service: s, port: 0}\n",
                "extensionProviders[0].envoyExtAuthzHttp.port",
                "[1, 65535]",
            ),
            (
                "- name: a\n  envoyExtAuthzHttp: {service: s, port: 1, pathPrefix: check}\n",
                "extensionProviders[0].envoyExtAuthzHttp.pathPrefix",
                "begin with `/`",
            ),
            (
                "- name: a\n  envoyExtAuthzHttp: {service: s, port: 1, statusOnError: \"999\"}\n",
                "extensionProviders[0].envoyExtAuthzHttp.statusOnError",
                "999",
            ),
            (
                "- name: a\n  envoyExtAuthzHttp: {service: s, port: 1, headersToUpstreamOnAllow: [\"*\"]}\n",
                "extensionProviders[0].envoyExtAuthzHttp.headersToUpstreamOnAllow",
                "single wildcard",
            ),
            (
                "- name: a\n  envoyExtAuthzGrpc: {service: s, port: 1, includeRequestBodyInCheck: {}}\n",
                "extensionProviders[0].envoyExtAuthzGrpc.includeRequestBodyInCheck.maxRequestBytes",
                "more than 0",
            ),
            (
                "- name: a\n  envoyExtAuthzHttp: {service: s, port: 1, includeRequestBodyInCheck: {maxRequestBytes: 0}}\n",
                "extensionProviders[0].envoyExtAuthzHttp.includeRequestBodyInCheck.maxRequestBytes",
                "found: 0",
            ),
            (
                "- name: a\n  envoyExtAuthzGrpc: {service: s, port: 1}\n  envoyExtAuthzHttp: {service: s, port: 1}\n",
                "extensionProviders[0].envoyExtAuthzHttp",
                "exactly one",
            ),
        ] {
            let e = parse(&format!("{GOOD}extensionProviders:\n{body}")).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.line >= line as u64, "{e}");
            assert!(e.reason.contains(reason), "{e}");
        }
        let e = parse(&format!(
            "{GOOD}extensionProviders:
- name: a
  envoyExtAuthzHttp: {{service: s, port: 1}}
- name: a
  envoyExtAuthzHttp: {{service: s, port: 2}}
"
        ))
        .unwrap_err();
        assert!(e.reason.contains("names two providers"), "{e}");
    }

    /// `tracing:` (config_tracing.rs): Istio's defaults, the provider in MeshConfig's
    /// `extensionProviders[].opentelemetry` shape, and errors at their line and field.
    #[test]
    fn tracing_section() {
        use outrigger_proxy::trace::*;
        assert!(parse(GOOD).unwrap().tracing.is_none());
        let t = parse(&format!("{GOOD}tracing: {{}}\n"))
            .unwrap()
            .tracing
            .unwrap();
        assert_eq!(t.sampling, 1.0);
        assert_eq!(t.mesh_id, "cluster.local");
        assert_eq!(
            t.propagation,
            Propagation {
                w3c: true,
                b3: true
            }
        );
        assert!(t.provider.is_none());
        let t = parse(&format!(
            "{GOOD}tracing:
  sampling: 2.5
  propagation: [w3c]
  opentelemetry:
    service: otel.observability.svc.cluster.local
    port: 4318
    http:
      path: /otlp/v1/traces
      timeout: 2s
      headers: [{{name: x-tenant, value: a}}]
"
        ))
        .unwrap()
        .tracing
        .unwrap();
        assert_eq!(t.sampling, 2.5);
        assert!(!t.propagation.b3);
        let p = t.provider.unwrap();
        assert_eq!(p.port, 4318);
        assert_eq!(p.http.unwrap().path, "/otlp/v1/traces");
        assert_eq!(p.timeout, Duration::from_secs(2));
        assert_eq!(p.headers[0].0, "x-tenant");
        let grpc = parse(&format!(
            "{GOOD}tracing:\n  opentelemetry: {{service: 127.0.0.1, port: 4317}}\n"
        ))
        .unwrap()
        .tracing
        .unwrap()
        .provider
        .unwrap();
        assert!(grpc.http.is_none());
        assert_eq!(grpc.timeout, Duration::from_secs(5));

        let line = GOOD.lines().count() + 2;
        for (body, field, reason) in [
            ("  sampling: 101\n", "tracing.sampling", "percentage"),
            ("  propagation: [jaeger]\n", "tracing.propagation", "jaeger"),
            (
                "  opentelemetry: {service: otel, port: 70000}\n",
                "tracing.opentelemetry.port",
                "70000",
            ),
            (
                "  opentelemetry: {service: otel, port: 4318, http: {path: traces}}\n",
                "tracing.opentelemetry.http.path",
                "absolute",
            ),
            (
                "  opentelemetry: {service: otel, port: 4318, http: {timeout: 0s}}\n",
                "tracing.opentelemetry.http.timeout",
                "",
            ),
        ] {
            let e = parse(&format!("{GOOD}tracing:\n{body}"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("/etc/outrigger/agent.yaml:{line}:")),
                "{e}"
            );
            assert!(e.contains(field) && e.contains(reason), "{e}");
        }
        let e = parse(&format!("{GOOD}tracing:\n  sampleRate: 3\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sampleRate"), "{e}");
    }

    /// `tracing.opentelemetry.tls`: SIMPLE with the CA file read and parsed at load, DISABLE,
    /// and each mistake at its line and field.
    #[test]
    fn tracing_tls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        let pki =
            outrigger_tls::ca::BuiltinCa::init(&dir.path().join("ca"), "cluster.local").unwrap();
        std::fs::write(dir.path().join("ca.pem"), pki.root_pem()).unwrap();
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        let otel = |tls: &str| {
            format!(
                "{GOOD}tracing:\n  opentelemetry:\n    service: otel.test\n    port: 4317\n    tls: {tls}\n"
            )
        };
        let t = AgentConfig::parse(&path, &otel("{caCertificates: ca.pem}"))
            .unwrap()
            .tracing
            .unwrap()
            .provider
            .unwrap()
            .tls
            .unwrap();
        assert_eq!((t.roots.len(), t.server_name.as_str()), (1, "otel.test"));
        let t = AgentConfig::parse(&path, &otel("{mode: SIMPLE, sni: collector.example}"))
            .unwrap()
            .tracing
            .unwrap()
            .provider
            .unwrap()
            .tls
            .unwrap();
        assert!(t.roots.is_empty());
        assert_eq!(t.server_name, "collector.example");
        let p = AgentConfig::parse(&path, &otel("{mode: DISABLE}"))
            .unwrap()
            .tracing
            .unwrap()
            .provider
            .unwrap();
        assert!(p.tls.is_none());
        let line = GOOD.lines().count() as u64 + 5;
        for (tls, field, reason) in [
            ("{mode: MUTUAL}", "tracing.opentelemetry.tls.mode", "MUTUAL"),
            (
                "{caCertificates: missing.pem}",
                "tracing.opentelemetry.tls.caCertificates",
                "cannot read",
            ),
            (
                "{caCertificates: empty.pem}",
                "tracing.opentelemetry.tls.caCertificates",
                "no CERTIFICATE",
            ),
            (
                "{sni: \"not a name\"}",
                "tracing.opentelemetry.tls.sni",
                "not a DNS name",
            ),
        ] {
            let e = AgentConfig::parse(&path, &otel(tls)).unwrap_err();
            assert_eq!((e.field.as_str(), e.line), (field, line), "{e}");
            assert!(e.reason.contains(reason), "{e}");
        }
    }

    /// `tracing.customTags`: the Telemetry API's three kinds, sorted by tag name as istiod
    /// sorts them, and each mistake refused at its line with its field.
    #[test]
    fn tracing_custom_tags() {
        use outrigger_proxy::trace::CustomTag;
        let t = parse(&format!(
            "{GOOD}tracing:
  customTags:
    team: {{literal: {{value: payments}}}}
    host: {{environment: {{name: COMPUTERNAME, defaultValue: unknown}}}}
    user: {{header: {{name: X-User, defaultValue: anonymous}}}}
"
        ))
        .unwrap()
        .tracing
        .unwrap();
        assert_eq!(
            t.custom_tags,
            vec![
                (
                    "host".to_string(),
                    CustomTag::Environment {
                        name: "COMPUTERNAME".into(),
                        default: "unknown".into()
                    }
                ),
                ("team".to_string(), CustomTag::Literal("payments".into())),
                (
                    "user".to_string(),
                    CustomTag::Header {
                        name: http::HeaderName::from_static("x-user"),
                        default: "anonymous".into()
                    }
                ),
            ]
        );
        let line = GOOD.lines().count() + 3;
        for (tag, field, reason) in [
            ("{}", "tracing.customTags.a", "names no value"),
            (
                "{literal: {value: x}, header: {name: x-a}}",
                "tracing.customTags.a",
                "more than one",
            ),
            (
                "{header: {name: \"bad name\"}}",
                "tracing.customTags.a.header.name",
                "not a header name",
            ),
            (
                "{environment: {name: \"\"}}",
                "tracing.customTags.a.environment.name",
                "not an environment variable",
            ),
            (
                "{formatter: {value: \"%REQ(x)%\"}}",
                "tracing.customTags.a.formatter",
                "not supported",
            ),
        ] {
            let e = parse(&format!("{GOOD}tracing:\n  customTags:\n    a: {tag}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("/etc/outrigger/agent.yaml:{line}:")),
                "{e}"
            );
            assert!(e.contains(field) && e.contains(reason), "{e}");
        }
        let e = parse(&format!(
            "{GOOD}tracing:\n  customTags:\n    a: {{literal: {{valu: x}}}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("valu"), "{e}");
    }
}
