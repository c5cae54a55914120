//! The per-connection context: who is on the other end of an accepted downstream connection,
//! on which listener. A leaf module: `accept` builds it (one per HBONE stream, with the stream's
//! destination, and `hbone::server` adds the stream's baggage to the labels), the forwarding
//! and authorization modules read it.

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;

use crate::metrics::TcpLabels;
use crate::workload::InboundConfig;

/// What one downstream connection carries to every request on it.
#[derive(Clone)]
pub(crate) struct ConnInfo {
    pub listener: Arc<InboundConfig>,
    /// The peer principal as policies write it (`td/ns/x/sa/y`).
    pub peer_principal: Option<String>,
    /// Envoy-format `x-forwarded-client-cert` for this peer.
    pub xfcc: Option<HeaderValue>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub sni: Option<String>,
    pub labels: TcpLabels,
}

impl ConnInfo {
    pub fn security_policy(&self) -> &'static str {
        self.labels.connection_security_policy
    }
    pub fn source_principal_str(&self) -> &str {
        &self.labels.source_principal.0
    }
}
