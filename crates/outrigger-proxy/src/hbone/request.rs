//! The HBONE CONNECT request: what ztunnel sends and how Outrigger reads it.
//!
//! ztunnel's outbound builds the request as `CONNECT` with `:authority` = the destination
//! `ip:port` and three headers: `baggage` (the source workload's metadata, OpenTelemetry
//! style), `forwarded` (RFC 7239, `for="<client ip:port>"` and, for service traffic,
//! `;host=<service hostname>`) and `traceparent` (W3C Trace Context). Its inbound answers a
//! non-CONNECT method or an unparsable authority with `400 Bad Request`.
//!
//! Everything here is pure and bounded, and fuzzed (`fuzz/fuzz_targets/hbone_connect.rs`).

use std::net::SocketAddr;

use http::{HeaderMap, Method, StatusCode, Uri};

pub const BAGGAGE: &str = "baggage";
pub const TRACEPARENT: &str = "traceparent";
pub const FORWARDED: &str = "forwarded";

/// The parts of a CONNECT request Outrigger uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The inner connection's destination (`:authority`).
    pub target: SocketAddr,
    /// Source metadata from `baggage` (unverified: used for metric labels only, as ztunnel
    /// does; the verified identity comes from the mTLS handshake).
    pub baggage: Baggage,
    /// `for=` of the first `forwarded` element: the original client address.
    pub forwarded_for: Option<String>,
    /// `host=` of the first `forwarded` element: the service the client meant.
    pub forwarded_host: Option<String>,
    /// A well-formed W3C `traceparent`, if the client sent one.
    pub traceparent: Option<String>,
}

/// Why a CONNECT request was refused, and the status to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("HBONE expects CONNECT, got {0}")]
    NotConnect(String),
    #[error("CONNECT :authority `{0}` is not an ip:port")]
    BadAuthority(String),
}

impl RequestError {
    /// ztunnel answers both with 400.
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}

/// Source workload metadata as ztunnel puts it in `baggage` (keys from OpenTelemetry's
/// semantic conventions: `k8s.cluster.name`, `k8s.namespace.name`, `k8s.<kind>.name`,
/// `service.name`, `service.version`, `cloud.region`, `cloud.availability_zone`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    pub workload_name: Option<String>,
    pub service_name: Option<String>,
    pub revision: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
}

/// The longest baggage value kept (labels are not a place for kilobytes).
const MAX_BAGGAGE_VALUE: usize = 253;

impl Baggage {
    /// Parses every `baggage` header value: comma-separated `key=value` members; properties
    /// after `;` are ignored, unknown keys are ignored, empty values are unset.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Baggage {
        let mut b = Baggage::default();
        for v in values {
            let Ok(v) = std::str::from_utf8(v) else {
                continue;
            };
            for member in v.split(',') {
                let member = member.split(';').next().unwrap_or("");
                let Some((k, val)) = member.split_once('=') else {
                    continue;
                };
                let val = val.trim();
                let val = (!val.is_empty()
                    && val.len() <= MAX_BAGGAGE_VALUE
                    && val.bytes().all(|c| c.is_ascii_graphic()))
                .then(|| val.to_string());
                let slot = match k.trim() {
                    "k8s.cluster.name" => &mut b.cluster,
                    "k8s.namespace.name" => &mut b.namespace,
                    "k8s.deployment.name"
                    | "k8s.cronjob.name"
                    | "k8s.pod.name"
                    | "k8s.job.name"
                    | "k8s.daemonset.name"
                    | "k8s.statefulset.name"
                    | "k8s.replicaset.name"
                    | "k8s.workloadentry.name" => &mut b.workload_name,
                    "service.name" => &mut b.service_name,
                    "service.version" => &mut b.revision,
                    "cloud.region" => &mut b.region,
                    "cloud.availability_zone" => &mut b.zone,
                    _ => continue,
                };
                *slot = val;
            }
        }
        b
    }

    /// The header value, in ztunnel's member order. `kind` is the workload kind
    /// (`deployment`, `workloadentry`, ...).
    pub fn to_header(&self, kind: &str) -> String {
        let mut parts = Vec::with_capacity(7);
        let mut push = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{k}={v}"));
            }
        };
        push("k8s.cluster.name", &self.cluster);
        push("k8s.namespace.name", &self.namespace);
        push(&format!("k8s.{kind}.name"), &self.workload_name);
        push("service.name", &self.service_name);
        push("service.version", &self.revision);
        push("cloud.region", &self.region);
        push("cloud.availability_zone", &self.zone);
        parts.join(",")
    }
}

/// Parses the destination of a CONNECT: an IP literal and a port (`10.0.0.5:8080`,
/// `[fd00::5]:8080`). Host names are refused: the destination must be an address this host
/// serves.
pub fn parse_authority(authority: &str) -> Result<SocketAddr, RequestError> {
    authority
        .parse::<SocketAddr>()
        .map_err(|_| RequestError::BadAuthority(truncate(authority)))
}

fn truncate(s: &str) -> String {
    s.chars().take(128).collect()
}

/// Reads the `for` and `host` parameters of the first element of an RFC 7239 `Forwarded`
/// value (`for="10.0.0.1:34567";host=reviews.default.svc.cluster.local`).
pub fn parse_forwarded(value: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(v) = std::str::from_utf8(value) else {
        return (None, None);
    };
    let first = v.split(',').next().unwrap_or("");
    let (mut for_, mut host) = (None, None);
    for pair in first.split(';') {
        let Some((k, val)) = pair.split_once('=') else {
            continue;
        };
        let val = val.trim();
        let val = val
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .unwrap_or(val);
        if val.is_empty() || val.len() > MAX_BAGGAGE_VALUE {
            continue;
        }
        match k.trim().to_ascii_lowercase().as_str() {
            "for" => for_ = Some(val.to_string()),
            "host" => host = Some(val.to_string()),
            _ => {}
        }
    }
    (for_, host)
}

/// A W3C `traceparent` (`version-traceid-parentid-flags`, lowercase hex, 2-32-16-2 digits,
/// ids not all zero, version `ff` invalid), or `None`.
pub fn parse_traceparent(value: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let parts: Vec<&str> = s.split('-').collect();
    if parts.len() < 4 {
        return None;
    }
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    };
    let (ver, trace, parent, flags) = (parts[0], parts[1], parts[2], parts[3]);
    // Version 00 has exactly four fields; later versions may append more.
    if !hex(ver, 2) || ver == "ff" || (ver == "00" && parts.len() != 4) {
        return None;
    }
    if !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2) {
        return None;
    }
    if trace.bytes().all(|c| c == b'0') || parent.bytes().all(|c| c == b'0') {
        return None;
    }
    Some(s.to_string())
}

/// Parses a CONNECT request.
pub fn parse(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<ConnectRequest, RequestError> {
    if method != Method::CONNECT {
        return Err(RequestError::NotConnect(truncate(method.as_str())));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
    // CONNECT carries only an authority (RFC 9113 §8.5); a scheme or path is ignored.
    let target = parse_authority(authority)?;
    let baggage = Baggage::parse(headers.get_all(BAGGAGE).iter().map(|v| v.as_bytes()));
    let (forwarded_for, forwarded_host) = headers
        .get(FORWARDED)
        .map(|v| parse_forwarded(v.as_bytes()))
        .unwrap_or((None, None));
    let traceparent = headers
        .get(TRACEPARENT)
        .and_then(|v| parse_traceparent(v.as_bytes()));
    Ok(ConnectRequest {
        target,
        baggage,
        forwarded_for,
        forwarded_host,
        traceparent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(
        method: Method,
        authority: &str,
        headers: &[(&str, &str)],
    ) -> Result<ConnectRequest, RequestError> {
        let uri: Uri = authority
            .parse()
            .map_err(|_| RequestError::BadAuthority(authority.into()))?;
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        parse(&method, &uri, &h)
    }

    #[test]
    fn reads_what_ztunnel_sends() {
        let r = req(
            Method::CONNECT,
            "10.0.0.5:8080",
            &[
                (
                    "baggage",
                    "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v1",
                ),
                ("forwarded", "for=\"10.0.0.9:43210\";host=web.legacy.svc.cluster.local"),
                ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ],
        )
        .unwrap();
        assert_eq!(r.target, "10.0.0.5:8080".parse().unwrap());
        assert_eq!(r.baggage.namespace.as_deref(), Some("default"));
        assert_eq!(r.baggage.workload_name.as_deref(), Some("sleep"));
        assert_eq!(r.baggage.service_name.as_deref(), Some("sleep"));
        assert_eq!(r.baggage.revision.as_deref(), Some("v1"));
        assert_eq!(r.baggage.cluster.as_deref(), Some("Kubernetes"));
        assert_eq!(r.forwarded_for.as_deref(), Some("10.0.0.9:43210"));
        assert_eq!(
            r.forwarded_host.as_deref(),
            Some("web.legacy.svc.cluster.local")
        );
        assert_eq!(
            r.traceparent.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
    }

    #[test]
    fn ipv6_authority() {
        let r = req(Method::CONNECT, "[fd00::5]:15000", &[]).unwrap();
        assert_eq!(r.target, "[fd00::5]:15000".parse().unwrap());
    }

    #[test]
    fn refuses_what_ztunnel_refuses() {
        assert!(matches!(
            req(Method::GET, "10.0.0.5:8080", &[]),
            Err(RequestError::NotConnect(_))
        ));
        for bad in ["web.legacy:8080", "10.0.0.5", "10.0.0.5:99999"] {
            let e = req(Method::CONNECT, bad, &[]).unwrap_err();
            assert!(matches!(e, RequestError::BadAuthority(_)), "{bad}: {e:?}");
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn baggage_round_trips_and_ignores_junk() {
        let b = Baggage {
            cluster: Some("c1".into()),
            namespace: Some("legacy".into()),
            workload_name: Some("vm-1".into()),
            service_name: Some("app".into()),
            revision: Some("v2".into()),
            region: None,
            zone: None,
        };
        let h = b.to_header("workloadentry");
        assert_eq!(
            h,
            "k8s.cluster.name=c1,k8s.namespace.name=legacy,k8s.workloadentry.name=vm-1,service.name=app,service.version=v2"
        );
        assert_eq!(Baggage::parse([h.as_bytes()]), b);
        let junk = Baggage::parse([&b"=,,;x=1,service.name=,k8s.pod.name=a b,foo"[..]]);
        assert_eq!(junk, Baggage::default());
    }

    #[test]
    fn traceparent_is_validated() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(parse_traceparent(ok.as_bytes()).as_deref(), Some(ok));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn forwarded_first_element_only() {
        let (f, h) = parse_forwarded(b"for=192.0.2.60;proto=http;by=203.0.113.43, for=1.1.1.1");
        assert_eq!(f.as_deref(), Some("192.0.2.60"));
        assert_eq!(h, None);
        assert_eq!(parse_forwarded(b"\xff"), (None, None));
    }
}
