//! What the proxy fronts: the workload's identity and labels, and its mesh-facing listeners
//! with the protocol each speaks. Plain data, shared by every module (a leaf).

use std::net::SocketAddr;

use outrigger_identity::Identity;

/// How an inbound listener treats the bytes inside the (m)TLS session, and which protocol the
/// application speaks: Istio's service-port protocols. As an Istio sidecar does, Outrigger talks
/// to the application in the port's protocol, whatever the caller negotiated (istio/istio
/// `pilot/pkg/networking/core/cluster_builder.go`, `setUpstreamProtocol`): `http` → HTTP/1.1,
/// `http2`/`grpc`/`grpc-web` → HTTP/2 cleartext (h2c).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP from callers (HTTP/1.1 or HTTP/2, by ALPN or preface); HTTP/1.1 to the application.
    Http,
    /// HTTP from callers; HTTP/2 cleartext to the application.
    Http2,
    /// gRPC: as `Http2`.
    Grpc,
    /// gRPC-Web: as `Http2` (Istio's `IsHTTP2()` includes it).
    GrpcWeb,
    /// Opaque bytes: L4 authorization only (also Istio's `tls`, `https`, `mongo`, `mysql`,
    /// `redis`, which a sidecar proxies as TCP by default).
    Tcp,
    /// HTTP when the first bytes are HTTP, opaque TCP otherwise (Istio's protocol sniffing).
    Auto,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::GrpcWeb => "grpc-web",
            Protocol::Tcp => "tcp",
            Protocol::Auto => "auto",
        }
    }

    /// Declared HTTP of some kind (non-HTTP bytes are answered with HTTP's 400, not tunnelled).
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb
        )
    }

    /// The application speaks HTTP/2 cleartext (Istio's `Protocol.IsHTTP2()`).
    pub fn app_speaks_h2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb)
    }

    /// Istio's protocol names, case-insensitive as Istio's `protocol.Parse` reads them; `None`
    /// for a name Istio does not know (or `udp`, which Outrigger cannot carry).
    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s.to_ascii_lowercase().as_str() {
            "http" => Protocol::Http,
            "http2" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "grpc-web" => Protocol::GrpcWeb,
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" => Protocol::Tcp,
            "auto" => Protocol::Auto,
            _ => return None,
        })
    }

    /// Istio's port-naming convention, `<protocol>[-<suffix>]` (e.g. `http-web`, `grpc-api`):
    /// the protocol a port name selects when no protocol is given
    /// (https://istio.io/latest/docs/ops/configuration/traffic-management/protocol-selection/).
    /// `grpc-web` is matched whole before the prefix rule would read it as `grpc`.
    pub fn from_port_name(name: &str) -> Option<Protocol> {
        let lower = name.to_ascii_lowercase();
        if lower == "grpc-web" || lower.starts_with("grpc-web-") {
            return Some(Protocol::GrpcWeb);
        }
        let prefix = lower.split('-').next().unwrap_or("");
        Protocol::parse(prefix).filter(|p| *p != Protocol::Auto)
    }
}

/// One mesh-facing listener and the application port behind it.
#[derive(Debug, Clone)]
pub struct InboundConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub backend: SocketAddr,
    pub protocol: Protocol,
}

/// What the proxy knows of the workload it fronts; used for metric labels and headers.
#[derive(Debug, Clone)]
pub struct WorkloadInfo {
    pub identity: Identity,
    pub namespace: String,
    /// The workload name (Istio: the Deployment; here: `workload.name`, default the service
    /// account).
    pub name: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    /// The mesh hostname of the service this workload backs, if configured.
    pub service_host: Option<String>,
    pub cluster: String,
}

#[cfg(test)]
impl WorkloadInfo {
    /// The workload the unit tests label their metrics with (`legacy/billing`, v1).
    pub(crate) fn test_billing(service_host: Option<&str>) -> WorkloadInfo {
        WorkloadInfo {
            identity: "spiffe://cluster.local/ns/legacy/sa/billing"
                .parse()
                .unwrap(),
            namespace: "legacy".into(),
            name: "billing".into(),
            app: "billing".into(),
            version: "v1".into(),
            canonical_service: "billing".into(),
            canonical_revision: "v1".into(),
            service_host: service_host.map(str::to_string),
            cluster: "Kubernetes".into(),
        }
    }
}
