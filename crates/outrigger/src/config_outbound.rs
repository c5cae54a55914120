//! The `outbound:` and `outboundProxy:` sections of the agent configuration (documented in
//! `docs/config.md` and `docs/outbound.md`). A child module of `config`, so that it shares the
//! validator and its file:line:field errors.
//!
//! Field names follow Istio's where one exists: `trafficPolicy.loadBalancer`,
//! `trafficPolicy.connectionPool`, `trafficPolicy.outlierDetection` (DestinationRule),
//! `retries` and `timeout` (VirtualService), `dnsRefreshRate` (meshConfig).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use outrigger_identity::{Identity, TrustDomains};
use outrigger_proxy::outbound::{
    ConnectionPool, EndpointAddr, LbPolicy, OutboundConfig, OutboundProtocol, OutboundProxyConfig,
    OutlierDetection, RetryPolicy, Transport,
};

use super::{ConfigError, Validator};

/// Istio's east-west gateway port for AUTO_PASSTHROUGH mTLS ("tls" port 15443).
pub const EAST_WEST_GATEWAY_PORT: u16 = 15443;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawOutbound {
    name: Spanned<String>,
    #[serde(default)]
    listen: Option<Spanned<String>>,
    host: Spanned<String>,
    port: Spanned<u16>,
    #[serde(default)]
    protocol: Option<Spanned<String>>,
    #[serde(default)]
    endpoints: Vec<Spanned<String>>,
    #[serde(default)]
    east_west_gateway: Option<Spanned<RawGateway>>,
    #[serde(default)]
    transport: Option<Spanned<String>>,
    #[serde(default)]
    hbone_peer: Option<Spanned<String>>,
    #[serde(default)]
    identity: Option<Spanned<OneOrMany<RawIdentity>>>,
    #[serde(default)]
    traffic_policy: RawTrafficPolicy,
    #[serde(default)]
    retries: RawRetries,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    dns_refresh_rate: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawIdentity {
    Spiffe(String),
    ServiceAccount(RawServiceAccount),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawServiceAccount {
    #[serde(default)]
    namespace: Option<String>,
    service_account: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawGateway {
    address: String,
    #[serde(default)]
    port: Option<u16>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTrafficPolicy {
    #[serde(default)]
    load_balancer: Option<RawLoadBalancer>,
    #[serde(default)]
    connection_pool: RawConnectionPool,
    #[serde(default)]
    outlier_detection: RawOutlier,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLoadBalancer {
    simple: Spanned<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConnectionPool {
    #[serde(default)]
    tcp: RawTcpPool,
    #[serde(default)]
    http: RawHttpPool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTcpPool {
    #[serde(default)]
    connect_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHttpPool {
    #[serde(default)]
    idle_timeout: Option<Spanned<String>>,
    #[serde(default)]
    max_requests_per_connection: Option<Spanned<u32>>,
    #[serde(default)]
    h2_upgrade_policy: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOutlier {
    #[serde(default, rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<u32>,
    #[serde(default)]
    consecutive_gateway_errors: Option<u32>,
    #[serde(default)]
    interval: Option<Spanned<String>>,
    #[serde(default)]
    base_ejection_time: Option<Spanned<String>>,
    #[serde(default)]
    max_ejection_percent: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRetries {
    #[serde(default)]
    attempts: Option<Spanned<u32>>,
    #[serde(default)]
    per_try_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawOutboundProxy {
    listen: Spanned<String>,
    #[serde(default)]
    allow_plain_egress: bool,
}

/// `name.ns.svc[.domain]` → `ns`.
fn kube_namespace(host: &str) -> Option<&str> {
    let labels: Vec<&str> = host.split('.').collect();
    match labels.as_slice() {
        [_, ns, "svc", ..] => Some(*ns),
        _ => None,
    }
}

impl Validator<'_> {
    fn loopback_listen(&self, v: &Spanned<String>, field: &str) -> Result<SocketAddr, ConfigError> {
        let a = self.addr(v, field)?;
        // Whoever can connect to an outbound listener speaks with this workload's identity.
        if !a.ip().is_loopback() {
            return Err(self.err(
                v,
                field,
                format!(
                    "{a} is not a loopback address: anyone who can connect to an outbound listener calls the mesh as this workload, so it must listen on 127.0.0.1 or ::1"
                ),
            ));
        }
        Ok(a)
    }

    fn endpoint(
        &self,
        v: &Spanned<String>,
        field: &str,
        default_port: u16,
    ) -> Result<EndpointAddr, ConfigError> {
        let s = v.value.trim();
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(EndpointAddr::Static(a));
        }
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Ok(EndpointAddr::Static(SocketAddr::new(ip, default_port)));
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>().map_err(|_| {
                    self.err(v, field, format!("`{s}`: `{p}` is not a port number"))
                })?,
            ),
            None => (s, default_port),
        };
        let valid = !host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid || port == 0 {
            return Err(self.err(
                v,
                field,
                format!("`{s}` is neither an address:port nor a DNS name[:port] (e.g. `10.0.0.7:8080`, `ratings.internal:8080`)"),
            ));
        }
        Ok(EndpointAddr::Dns {
            host: host.to_string(),
            port,
        })
    }

    pub(super) fn outbound(
        &self,
        raw: &[RawOutbound],
        proxy: Option<&RawOutboundProxy>,
        trust: &TrustDomains,
        authorizers: &[std::sync::Arc<outrigger_proxy::ext_authz::Provider>],
    ) -> Result<(Vec<OutboundConfig>, Option<OutboundProxyConfig>), ConfigError> {
        let mut out = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        let mut listens = std::collections::BTreeMap::new();
        for (i, o) in raw.iter().enumerate() {
            let field = |f: &str| format!("outbound[{i}].{f}");
            if o.name.value.is_empty() || !names.insert(o.name.value.clone()) {
                return Err(self.err(
                    &o.name,
                    &field("name"),
                    format!("`{}`: names must be non-empty and unique", o.name.value),
                ));
            }
            let host = o
                .host
                .value
                .trim()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            if o.port.value == 0 {
                return Err(self.err(&o.port, &field("port"), "the service port cannot be 0"));
            }
            let sni = outrigger_proxy::outbound::istio_sni(&host, o.port.value);
            if host.is_empty()
                || host.contains(':')
                || rustls_pki_types::ServerName::try_from(sni.as_str()).is_err()
            {
                return Err(self.err(
                    &o.host,
                    &field("host"),
                    format!("`{}` is not a service host name (e.g. `ratings.default.svc.cluster.local`)", o.host.value),
                ));
            }
            let listen = match &o.listen {
                Some(l) => {
                    let a = self.loopback_listen(l, &field("listen"))?;
                    if a.port() != 0
                        && let Some(other) = listens.insert(a, o.name.value.clone())
                    {
                        return Err(self.err(
                            l,
                            &field("listen"),
                            format!("{a} is already the listener of `{other}`"),
                        ));
                    }
                    Some(a)
                }
                None => None,
            };
            let protocol = match o.protocol.as_ref().map(|p| (p, p.value.as_str())) {
                None | Some((_, "http")) => OutboundProtocol::Http,
                Some((_, "http2" | "grpc")) => OutboundProtocol::Http2,
                Some((_, "tcp")) => OutboundProtocol::Tcp,
                Some((p, other)) => {
                    return Err(self.err(
                        p,
                        &field("protocol"),
                        format!("`{other}`: use http, http2, grpc or tcp"),
                    ));
                }
            };
            // An external authorizer's service (`extensionProviders`, same host and port) is
            // reached by the agent itself: it needs no listener for the application.
            let authorizer = authorizers
                .iter()
                .any(|a| a.service == host && a.port == o.port.value);
            if listen.is_none()
                && !authorizer
                && (protocol == OutboundProtocol::Tcp || proxy.is_none())
            {
                return Err(self.err(
                    &o.name,
                    &field("listen"),
                    if protocol == OutboundProtocol::Tcp {
                        "a tcp destination needs its own `listen` address (the HTTP proxy carries HTTP only)"
                    } else {
                        "set `listen` (e.g. 127.0.0.1:9080), or configure `outboundProxy` to reach this destination through it"
                    },
                ));
            }
            let (endpoints, via_gateway) = match (&o.east_west_gateway, o.endpoints.is_empty()) {
                (Some(_), false) => {
                    return Err(self.err(
                        &o.name,
                        &field("eastWestGateway"),
                        "set either `endpoints` or `eastWestGateway`, not both",
                    ));
                }
                (None, true) => {
                    return Err(self.err(
                        &o.name,
                        &field("endpoints"),
                        "no endpoints: list the service's addresses (`10.0.0.7:8080`, `ratings.internal:8080`) or set `eastWestGateway`",
                    ));
                }
                (Some(g), true) => {
                    let port = g.value.port.unwrap_or(EAST_WEST_GATEWAY_PORT);
                    if port == 0 {
                        return Err(self.err(
                            g,
                            &field("eastWestGateway.port"),
                            "the gateway port cannot be 0 (Istio's is 15443)",
                        ));
                    }
                    let spanned = Spanned {
                        value: g.value.address.clone(),
                        referenced: g.referenced,
                        defined: g.defined,
                    };
                    (
                        vec![self.endpoint(&spanned, &field("eastWestGateway.address"), port)?],
                        true,
                    )
                }
                (None, false) => {
                    let mut v = Vec::new();
                    for (j, e) in o.endpoints.iter().enumerate() {
                        v.push(self.endpoint(
                            e,
                            &field(&format!("endpoints[{j}]")),
                            o.port.value,
                        )?);
                    }
                    (v, false)
                }
            };
            let transport = self.transport(o, &field)?;
            let Some(ids) = &o.identity else {
                return Err(self.err(
                    &o.name,
                    &field("identity"),
                    "set the server identity to pin: a SPIFFE ID (`spiffe://cluster.local/ns/default/sa/ratings`) or `{serviceAccount: ratings, namespace: default}`; a list is allowed",
                ));
            };
            let list: Vec<&RawIdentity> = match &ids.value {
                OneOrMany::One(x) => vec![x],
                OneOrMany::Many(v) => v.iter().collect(),
            };
            if list.is_empty() {
                return Err(self.err(
                    ids,
                    &field("identity"),
                    "the list is empty: name at least one identity",
                ));
            }
            let mut expected = Vec::new();
            for ri in list {
                let id = match ri {
                    RawIdentity::Spiffe(s) => s.parse::<Identity>().map_err(|e| {
                        self.err(
                            ids,
                            &field("identity"),
                            format!("`{s}` is not a SPIFFE ID: {e}"),
                        )
                    })?,
                    RawIdentity::ServiceAccount(sa) => {
                        let ns = sa.namespace.as_deref().or_else(|| kube_namespace(&host)).ok_or_else(|| {
                            self.err(ids, &field("identity"), format!(
                                "serviceAccount `{}` needs a `namespace` (the host `{host}` is not `name.namespace.svc...`)",
                                sa.service_account
                            ))
                        })?;
                        Identity::istio(trust.local(), ns, &sa.service_account).map_err(|e| {
                            self.err(
                                ids,
                                &field("identity"),
                                format!(
                                    "namespace and serviceAccount do not make a SPIFFE ID: {e}"
                                ),
                            )
                        })?
                    }
                };
                if !trust.contains(id.trust_domain()) {
                    return Err(self.err(
                        ids,
                        &field("identity"),
                        format!(
                            "`{id}` is in trust domain `{}`, which this agent does not trust (trustDomain / trustDomainAliases)",
                            id.trust_domain()
                        ),
                    ));
                }
                expected.push(id);
            }

            let tp = &o.traffic_policy;
            let lb = match tp
                .load_balancer
                .as_ref()
                .map(|l| (&l.simple, l.simple.value.as_str()))
            {
                None | Some((_, "LEAST_REQUEST" | "UNSPECIFIED")) => LbPolicy::LeastRequest,
                Some((_, "ROUND_ROBIN")) => LbPolicy::RoundRobin,
                Some((s, other)) => {
                    return Err(self.err(
                        s,
                        &field("trafficPolicy.loadBalancer.simple"),
                        format!("`{other}`: use LEAST_REQUEST (default) or ROUND_ROBIN"),
                    ));
                }
            };
            let defaults = ConnectionPool::default();
            let cp = &tp.connection_pool;
            let h2_upgrade = match cp
                .http
                .h2_upgrade_policy
                .as_ref()
                .map(|p| (p, p.value.as_str()))
            {
                None | Some((_, "DEFAULT" | "DO_NOT_UPGRADE")) => false,
                Some((_, "UPGRADE")) => true,
                Some((p, other)) => {
                    return Err(self.err(
                        p,
                        &field("trafficPolicy.connectionPool.http.h2UpgradePolicy"),
                        format!("`{other}`: use DEFAULT, DO_NOT_UPGRADE or UPGRADE"),
                    ));
                }
            };
            let pool = ConnectionPool {
                connect_timeout: self.positive(
                    &cp.tcp.connect_timeout,
                    &field("trafficPolicy.connectionPool.tcp.connectTimeout"),
                    defaults.connect_timeout,
                )?,
                idle_timeout: self.positive(
                    &cp.http.idle_timeout,
                    &field("trafficPolicy.connectionPool.http.idleTimeout"),
                    defaults.idle_timeout,
                )?,
                // Istio: "Maximum number of requests per connection to a backend" (int32);
                // 0 means unlimited.
                max_requests_per_connection: self
                    .int32(
                        &cp.http.max_requests_per_connection,
                        &field("trafficPolicy.connectionPool.http.maxRequestsPerConnection"),
                    )?
                    .unwrap_or(0),
                h2_upgrade,
            };
            let od = &tp.outlier_detection;
            let d = OutlierDetection::default();
            if let Some(p) = &od.max_ejection_percent
                && p.value > 100
            {
                return Err(self.err(
                    p,
                    &field("trafficPolicy.outlierDetection.maxEjectionPercent"),
                    "a percentage: 0 to 100",
                ));
            }
            let outlier = OutlierDetection {
                consecutive_5xx_errors: od
                    .consecutive_5xx_errors
                    .unwrap_or(d.consecutive_5xx_errors),
                consecutive_gateway_errors: od
                    .consecutive_gateway_errors
                    .unwrap_or(d.consecutive_gateway_errors),
                interval: self.positive(
                    &od.interval,
                    &field("trafficPolicy.outlierDetection.interval"),
                    d.interval,
                )?,
                base_ejection_time: self.positive(
                    &od.base_ejection_time,
                    &field("trafficPolicy.outlierDetection.baseEjectionTime"),
                    d.base_ejection_time,
                )?,
                max_ejection_percent: od
                    .max_ejection_percent
                    .as_ref()
                    .map(|p| p.value)
                    .unwrap_or(d.max_ejection_percent),
            };
            let retries = RetryPolicy {
                // Istio's HTTPRetry.attempts is an int32.
                attempts: self
                    .int32(&o.retries.attempts, &field("retries.attempts"))?
                    .unwrap_or(RetryPolicy::default().attempts),
                per_try_timeout: match &o.retries.per_try_timeout {
                    Some(_) => Some(self.positive(
                        &o.retries.per_try_timeout,
                        &field("retries.perTryTimeout"),
                        Duration::ZERO,
                    )?),
                    None => None,
                },
            };
            let timeout = match &o.timeout {
                Some(_) => Some(self.positive(&o.timeout, &field("timeout"), Duration::ZERO)?),
                None => None,
            };
            out.push(OutboundConfig {
                name: o.name.value.clone(),
                listen,
                host,
                port: o.port.value,
                protocol,
                endpoints,
                via_gateway,
                transport,
                expected_identities: expected,
                lb,
                pool,
                outlier,
                retries,
                timeout,
                dns_refresh_rate: self.positive(
                    &o.dns_refresh_rate,
                    &field("dnsRefreshRate"),
                    Duration::from_secs(60),
                )?,
            });
        }
        let proxy = match proxy {
            Some(p) => {
                let listen = self.loopback_listen(&p.listen, "outboundProxy.listen")?;
                if let Some(other) = listens.get(&listen) {
                    return Err(self.err(
                        &p.listen,
                        "outboundProxy.listen",
                        format!("{listen} is already the listener of `{other}`"),
                    ));
                }
                Some(OutboundProxyConfig {
                    listen,
                    allow_plain_egress: p.allow_plain_egress,
                })
            }
            None => None,
        };
        Ok((out, proxy))
    }

    /// `transport` (`mtls`, the default, or `hbone`) and `hbonePeer`.
    fn transport(
        &self,
        o: &RawOutbound,
        field: &dyn Fn(&str) -> String,
    ) -> Result<Transport, ConfigError> {
        let hbone = match &o.transport {
            None => false,
            Some(t) => match t.value.as_str() {
                "mtls" => false,
                "hbone" => true,
                other => {
                    return Err(self.err(
                        t,
                        &field("transport"),
                        format!("`{other}`: use mtls (default: mTLS to each endpoint, as a sidecar) or hbone (HTTP/2 CONNECT on port 15008, as ztunnel)"),
                    ));
                }
            },
        };
        if !hbone {
            if let Some(p) = &o.hbone_peer {
                return Err(self.err(p, &field("hbonePeer"), "only for `transport: hbone`"));
            }
            return Ok(Transport::Mtls);
        }
        if let Some(g) = &o.east_west_gateway {
            return Err(self.err(
                g,
                &field("eastWestGateway"),
                "`transport: hbone` through an east-west gateway (Istio's double HBONE) is not supported; list the endpoints, or set `hbonePeer` to a waypoint or ztunnel",
            ));
        }
        let peer = match &o.hbone_peer {
            None => None,
            Some(p) => {
                let s = p.value.trim();
                let addr = s.parse::<SocketAddr>().ok().or_else(|| {
                    s.parse::<std::net::IpAddr>()
                        .ok()
                        .map(|ip| SocketAddr::new(ip, outrigger_proxy::hbone::DEFAULT_PORT))
                });
                match addr {
                    Some(a) if a.port() != 0 && !a.ip().is_unspecified() => Some(a),
                    _ => {
                        return Err(self.err(
                            p,
                            &field("hbonePeer"),
                            format!("`{s}` is not an address of an HBONE peer (e.g. `10.0.0.3:15008`, or `10.0.0.3` for port 15008)"),
                        ));
                    }
                }
            }
        };
        Ok(Transport::Hbone { peer })
    }

    /// An Istio-named duration: at least 1ms (Istio: "MUST BE >=1ms"), at most a year.
    fn positive(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        self.duration(v, field, default, super::ISTIO)
    }

    /// An Istio `int32` field (`maxRequestsPerConnection`, `retries.attempts`): Kubernetes'
    /// schema refuses a value beyond `int32`, and so do we, before it reaches any arithmetic.
    fn int32(&self, v: &Option<Spanned<u32>>, field: &str) -> Result<Option<u32>, ConfigError> {
        match v {
            Some(n) if n.value > i32::MAX as u32 => Err(self.err(
                n,
                field,
                format!("{}: at most {} (an Istio int32)", n.value, i32::MAX),
            )),
            Some(n) => Ok(Some(n.value)),
            None => Ok(None),
        }
    }
}
