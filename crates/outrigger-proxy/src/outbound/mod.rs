//! The outbound path: the application calls mesh services through loopback, Outrigger
//! originates Istio mTLS with the workload certificate and pins the server's SPIFFE identity.
//!
//! ```text
//!  app ──plain HTTP/TCP──▶ 127.0.0.1:9080 (one listener per destination)
//!  app ──HTTP_PROXY──────▶ 127.0.0.1:15080 (Host picks the destination)
//!        │ endpoint set (static / DNS, re-resolved) → least-request or round-robin pick,
//!        │ outlier ejection, pooled keep-alive (HTTP/1.1) or multiplexed (HTTP/2) connections
//!        ▼
//!  mTLS: client cert = workload cert, ALPN istio-http/1.1 | istio-h2 | istio,
//!        SNI outbound_.<port>_._.<fqdn>, server chain → mesh roots, SPIFFE ID pinned
//!        ▼
//!  Envoy sidecar / Outrigger inbound / east-west gateway :15443 (AUTO_PASSTHROUGH by SNI)
//! ```
//!
//! Module map: [`endpoints`] (endpoint set, DNS, outlier detection), [`pool`] (TLS
//! origination and connection pools), `http_origin` (HTTP origination, retries, HTTP-proxy mode),
//! `tcp_origin` (opaque TCP origination), `listen` (serving the listeners).

pub mod endpoints;
mod http_origin;
mod idle;
mod listen;
pub mod pool;
mod tcp_origin;

pub(crate) use listen::spawn;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use outrigger_identity::Identity;

use crate::metrics::{Lv, TcpLabels};

/// What the application speaks to an outbound listener, and therefore how the upstream
/// connection is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundProtocol {
    /// HTTP/1.1 or HTTP/2 from the application; upstream uses the application's protocol
    /// (Istio's "use downstream protocol"), or HTTP/2 when `h2UpgradePolicy: UPGRADE`.
    Http,
    /// HTTP/2 upstream for every request (gRPC, or any service known to speak HTTP/2).
    Http2,
    /// Opaque bytes over mTLS (ALPN `istio`).
    Tcp,
}

impl OutboundProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundProtocol::Http => "http",
            OutboundProtocol::Http2 => "http2",
            OutboundProtocol::Tcp => "tcp",
        }
    }
}

/// How upstream connections to a destination are made.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Transport {
    /// mTLS straight to the endpoint, as an Istio sidecar originates it (Istio ALPN and SNI).
    #[default]
    Mtls,
    /// HBONE, as ztunnel originates it: each upstream connection is an HTTP/2 CONNECT stream
    /// to `<endpoint ip>:<port>` over a pooled mTLS connection to `peer` (a waypoint, or a
    /// node's ztunnel); `None`: the endpoint's own HBONE port, `<endpoint ip>:15008` (its
    /// ztunnel captures it, or it is another Outrigger).
    Hbone { peer: Option<SocketAddr> },
}

/// One configured endpoint address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddr {
    Static(SocketAddr),
    /// Resolved at start and every `dns_refresh_rate` (Envoy's STRICT_DNS: every address the
    /// name resolves to is an endpoint; a failed resolution keeps the previous addresses).
    Dns {
        host: String,
        port: u16,
    },
}

impl std::fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointAddr::Static(a) => write!(f, "{a}"),
            EndpointAddr::Dns { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Load-balancing policy (DestinationRule `trafficPolicy.loadBalancer.simple`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    /// Envoy's power-of-two-choices least request; Istio's default since 1.14.
    LeastRequest,
}

/// DestinationRule `trafficPolicy.outlierDetection`, with Istio's defaults (quoted from
/// istio/api `networking/v1alpha3/destination_rule.proto`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierDetection {
    /// "Number of 5xx errors before a host is ejected from the connection pool. When the
    /// upstream host is accessed over an opaque TCP connection, connect timeouts, connection
    /// error/failure and request failure events qualify as a 5xx error. This feature defaults
    /// to 5 but can be disabled by setting the value to 0."
    pub consecutive_5xx_errors: u32,
    /// "Number of gateway errors before a host is ejected from the connection pool. When the
    /// upstream host is accessed over HTTP, a 502, 503, or 504 return code qualifies as a
    /// gateway error. [...] This feature is disabled by default or when set to the value 0."
    pub consecutive_gateway_errors: u32,
    /// "Time interval between ejection sweep analysis. [...] Default is 10s." Here: how long a
    /// returned host must stay healthy before its ejection multiplier decreases.
    pub interval: Duration,
    /// "Minimum ejection duration. A host will remain ejected for a period equal to the product
    /// of minimum ejection duration and the number of times the host has been ejected. [...]
    /// Default is 30s."
    pub base_ejection_time: Duration,
    /// "Maximum % of hosts in the load balancing pool for the upstream service that can be
    /// ejected. Defaults to 10%." Like Envoy, at least one host can always be ejected.
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }
}

/// DestinationRule `trafficPolicy.connectionPool` (the fields that apply here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionPool {
    /// `tcp.connectTimeout`: "TCP connection timeout. [...] Default is 10s." Here it bounds
    /// the TCP connect and the mTLS handshake together.
    pub connect_timeout: Duration,
    /// `http.idleTimeout`: "The idle timeout for upstream connection pool connections. [...]
    /// If not set, the default is 1 hour."
    pub idle_timeout: Duration,
    /// `http.maxRequestsPerConnection`: "Maximum number of requests per connection to a
    /// backend. [...] 0 means unlimited."
    pub max_requests_per_connection: u32,
    /// `http.h2UpgradePolicy: UPGRADE`: HTTP/1.1 requests from the application are sent
    /// upstream as HTTP/2 (multiplexed on one connection per endpoint).
    pub h2_upgrade: bool,
}

impl Default for ConnectionPool {
    fn default() -> Self {
        ConnectionPool {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            max_requests_per_connection: 0,
            h2_upgrade: false,
        }
    }
}

/// VirtualService `retries` (HTTPRetry) for this destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// "Number of retries to be allowed for a given request." Istio's mesh default is 2.
    pub attempts: u32,
    /// `perTryTimeout`; `None`: only the request timeout applies.
    pub per_try_timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
        }
    }
}

/// One mesh destination the application may call.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    pub name: String,
    /// The loopback listener for this destination; `None`: reachable only through the HTTP
    /// proxy listener.
    pub listen: Option<SocketAddr>,
    /// The service's mesh hostname (FQDN), e.g. `ratings.default.svc.cluster.local`.
    pub host: String,
    /// The service port (what Istio puts in the SNI and in `destination_service`).
    pub port: u16,
    pub protocol: OutboundProtocol,
    pub endpoints: Vec<EndpointAddr>,
    /// The endpoints are an east-west gateway (AUTO_PASSTHROUGH by SNI), not the workloads.
    pub via_gateway: bool,
    pub transport: Transport,
    /// The server must present one of these SPIFFE IDs (empty: refused at config time).
    pub expected_identities: Vec<Identity>,
    pub lb: LbPolicy,
    pub pool: ConnectionPool,
    pub outlier: OutlierDetection,
    pub retries: RetryPolicy,
    /// VirtualService `timeout`: the whole request, retries included. `None`: disabled, as in
    /// Istio.
    pub timeout: Option<Duration>,
    /// How often DNS endpoints are re-resolved (meshConfig `dnsRefreshRate`, default 60s).
    pub dns_refresh_rate: Duration,
}

impl OutboundConfig {
    /// A destination with Istio's defaults for everything but what identifies it.
    pub fn new(
        name: &str,
        host: &str,
        port: u16,
        endpoints: Vec<EndpointAddr>,
        expected: Vec<Identity>,
    ) -> Self {
        OutboundConfig {
            name: name.to_string(),
            listen: None,
            host: host.to_string(),
            port,
            protocol: OutboundProtocol::Http,
            endpoints,
            via_gateway: false,
            transport: Transport::Mtls,
            expected_identities: expected,
            lb: LbPolicy::LeastRequest,
            pool: ConnectionPool::default(),
            outlier: OutlierDetection::default(),
            retries: RetryPolicy::default(),
            timeout: None,
            dns_refresh_rate: Duration::from_secs(60),
        }
    }

    /// The SNI an Istio sidecar sends for this destination: `outbound_.<port>_._.<fqdn>`
    /// (the cluster name with `|` replaced by `_`). East-west gateways in AUTO_PASSTHROUGH
    /// mode route on it.
    pub fn sni(&self) -> String {
        istio_sni(&self.host, self.port)
    }
}

/// `outbound_.<port>_._.<fqdn>`.
pub fn istio_sni(host: &str, port: u16) -> String {
    format!("outbound_.{port}_._.{host}")
}

/// The HTTP proxy listener (`HTTP_PROXY=http://127.0.0.1:15080`).
#[derive(Debug, Clone)]
pub struct OutboundProxyConfig {
    pub listen: SocketAddr,
    /// Hosts that are not mesh destinations are forwarded in plaintext to the host itself
    /// (Istio's `outboundTrafficPolicy: ALLOW_ANY`); otherwise they get a 502.
    pub allow_plain_egress: bool,
}

/// [`Transport`] at run time.
pub(crate) enum DestTransport {
    Mtls,
    Hbone {
        client: crate::hbone::HboneClient,
        peer: Option<SocketAddr>,
    },
}

/// A destination at run time.
pub(crate) struct Destination {
    pub cfg: OutboundConfig,
    pub transport: DestTransport,
    pub endpoints: endpoints::EndpointSet,
    pub tls: pool::TlsConfigs,
    /// `<host>:<port>`, the authority sent upstream when the application used an IP literal.
    pub authority: http::uri::Authority,
    pub server_name: rustls_pki_types::ServerName<'static>,
    /// Metric labels (reporter="source") without the per-connection destination principal.
    pub labels: TcpLabels,
    pub listener_lv: Lv,
}

impl Destination {
    /// What `/config_dump` shows of this destination: its settings and, per endpoint, the
    /// resolved address, requests in flight and whether outlier detection has ejected it.
    pub(crate) fn dump(&self) -> serde_json::Value {
        let c = &self.cfg;
        let (transport, hbone_peer) = match &self.transport {
            DestTransport::Mtls => ("mtls", None),
            DestTransport::Hbone { peer, .. } => (
                "hbone",
                Some(
                    peer.map(|p| p.to_string())
                        .unwrap_or_else(|| format!("<endpoint ip>:{}", crate::hbone::DEFAULT_PORT)),
                ),
            ),
        };
        let endpoints: Vec<_> = self
            .endpoints
            .snapshot()
            .iter()
            .map(|e| {
                serde_json::json!({
                    "address": e.addr.to_string(),
                    "active": e.active.load(std::sync::atomic::Ordering::Relaxed),
                    "ejected": e.is_ejected_now(),
                })
            })
            .collect();
        serde_json::json!({
            "name": c.name,
            "listen": c.listen.map(|a| a.to_string()),
            "host": c.host,
            "port": c.port,
            "protocol": c.protocol.as_str(),
            "transport": transport,
            "hbone_peer": hbone_peer,
            "sni": (transport == "mtls").then(|| c.sni()),
            "east_west_gateway": c.via_gateway,
            "expected_identities": c.expected_identities.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            "configured_endpoints": c.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            "endpoints": endpoints,
        })
    }
}

/// Outbound listeners bound by `Proxy::bind` (lib.rs), served by `Proxy::run`.
pub(crate) struct Bound {
    pub listeners: Vec<(Arc<Destination>, TcpListener)>,
    pub proxy: Option<(Arc<http_origin::ProxyRoutes>, TcpListener)>,
    pub destinations: Vec<Arc<Destination>>,
}

impl Bound {
    pub fn addrs(&self) -> Vec<(String, SocketAddr)> {
        let mut v: Vec<(String, SocketAddr)> = self
            .listeners
            .iter()
            .filter_map(|(d, l)| Some((d.cfg.name.clone(), l.local_addr().ok()?)))
            .collect();
        if let Some((_, l)) = &self.proxy
            && let Ok(a) = l.local_addr()
        {
            v.push(("http-proxy".into(), a));
        }
        v
    }
}

/// Who this workload is, as ztunnel tells its HBONE peers in `baggage`.
fn hbone_source(w: &crate::workload::WorkloadInfo) -> crate::hbone::SourceInfo {
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    crate::hbone::SourceInfo {
        baggage: crate::hbone::Baggage {
            cluster: some(&w.cluster),
            namespace: some(&w.namespace),
            workload_name: some(&w.name),
            service_name: some(&w.canonical_service),
            revision: some(&w.canonical_revision),
            ..Default::default()
        },
        kind: "workloadentry".into(),
    }
}

fn bind_err(what: &str, addr: SocketAddr, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what}: cannot listen on {addr}: {e}"))
}

/// Binds every outbound listener and resolves DNS endpoints once (bounded; a name that does
/// not resolve yet is retried by the refresh task, it does not stop the agent).
pub(crate) async fn bind(
    configs: &[OutboundConfig],
    proxy: Option<&OutboundProxyConfig>,
    workload: &crate::workload::WorkloadInfo,
    certs: &outrigger_tls::CertStore,
) -> std::io::Result<Bound> {
    let source = crate::metrics::source_labels(workload);
    // One HBONE client for every destination: connections are pooled per (peer, identities),
    // so destinations behind the same ztunnel or waypoint share them.
    let hbone = configs
        .iter()
        .any(|c| matches!(c.transport, Transport::Hbone { .. }))
        .then(|| {
            crate::hbone::HboneClient::new(
                certs.clone(),
                &hbone_source(workload),
                Duration::from_secs(10),
            )
        });
    let mut destinations = Vec::new();
    let mut listeners = Vec::new();
    for cfg in configs {
        let authority: http::uri::Authority =
            format!("{}:{}", cfg.host, cfg.port).parse().map_err(|e| {
                std::io::Error::other(format!(
                    "outbound `{}`: `{}` is not a valid host name: {e}",
                    cfg.name, cfg.host
                ))
            })?;
        let server_name = rustls_pki_types::ServerName::try_from(cfg.sni()).map_err(|e| {
            std::io::Error::other(format!(
                "outbound `{}`: SNI `{}` is not a valid server name: {e}",
                cfg.name,
                cfg.sni()
            ))
        })?;
        let transport = match (&cfg.transport, &hbone) {
            (Transport::Hbone { peer }, Some(client)) => DestTransport::Hbone {
                client: client.clone(),
                peer: *peer,
            },
            _ => DestTransport::Mtls,
        };
        let dest = Arc::new(Destination {
            transport,
            endpoints: endpoints::EndpointSet::new(&cfg.endpoints, cfg.lb, cfg.outlier.clone()),
            tls: pool::TlsConfigs::new(certs.clone(), cfg.expected_identities.clone()),
            authority,
            server_name,
            labels: {
                let mut l = crate::metrics::destination_service_labels(&source, &cfg.host);
                // ztunnel reports its outbound HBONE connections as `mutual_tls` (the source
                // knows the tunnel is mTLS); a sidecar's source reporter says `unknown`.
                if matches!(cfg.transport, Transport::Hbone { .. }) {
                    l.connection_security_policy = "mutual_tls";
                }
                l
            },
            listener_lv: Lv::new(&cfg.name),
            cfg: cfg.clone(),
        });
        dest.endpoints.resolve_once(Duration::from_secs(2)).await;
        if let Some(addr) = cfg.listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| bind_err(&format!("outbound listener `{}`", cfg.name), addr, e))?;
            listeners.push((dest.clone(), l));
        }
        destinations.push(dest);
    }
    let proxy = match proxy {
        Some(p) => {
            let l = TcpListener::bind(p.listen)
                .await
                .map_err(|e| bind_err("outbound HTTP proxy", p.listen, e))?;
            let routes =
                http_origin::ProxyRoutes::new(&destinations, p.allow_plain_egress, &source);
            Some((Arc::new(routes), l))
        }
        None => None,
    };
    Ok(Bound {
        listeners,
        proxy,
        destinations,
    })
}
