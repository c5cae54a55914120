//! The `tracing:` section of the agent configuration (documented in `docs/config.md` and
//! `docs/tracing.md`): the sampling rate (MeshConfig `defaultConfig.tracing.sampling`, Istio's
//! default 1%), the OTLP collector in the shape of MeshConfig
//! `extensionProviders[].opentelemetry` (istio/api `mesh/v1alpha1/config.proto`,
//! `OpenTelemetryTracingProvider`: `service`, `port`, `http: {path, timeout, headers}`,
//! `grpc: {timeout, initialMetadata}`), the exported resource, the propagation formats, and
//! custom tags in the shape of the Telemetry API's `tracing[].customTags` (istio/api
//! `telemetry/v1alpha1/telemetry.proto`, `Tracing.CustomTag`: `literal: {value}`,
//! `environment: {name, defaultValue}`, `header: {name, defaultValue}`; MeshConfig
//! `defaultConfig.tracing.custom_tags` has the same three). A child module of `config`, so
//! that it shares the validator and its file:line:field errors.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_saphyr::Spanned;

use outrigger_proxy::trace::{
    CustomTag, OtlpHttp, OtlpProvider, OtlpTls, Propagation, TracingConfig,
};

use super::{ConfigError, Range, Validator};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawTracing {
    #[serde(default)]
    sampling: Option<Spanned<f64>>,
    #[serde(default)]
    service_name: Option<Spanned<String>>,
    #[serde(default)]
    resource_attributes: BTreeMap<String, String>,
    #[serde(default)]
    mesh_id: Option<String>,
    #[serde(default)]
    propagation: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    opentelemetry: Option<Spanned<RawOtel>>,
    #[serde(default)]
    custom_tags: BTreeMap<String, Spanned<RawCustomTag>>,
}

/// One of `customTags`: exactly one of its fields (a protobuf `oneof` in Istio's API).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCustomTag {
    #[serde(default)]
    literal: Option<RawLiteral>,
    #[serde(default)]
    environment: Option<RawTagSource>,
    #[serde(default)]
    header: Option<RawTagSource>,
    /// Istio 1.29's `formatter` (Envoy command operators): read to name it in the error.
    #[serde(default)]
    formatter: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLiteral {
    #[serde(default)]
    value: String,
}

/// `environment` and `header` alike: a name and the value when it is absent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTagSource {
    name: Spanned<String>,
    #[serde(default)]
    default_value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOtel {
    service: Spanned<String>,
    port: Spanned<u32>,
    #[serde(default)]
    http: Option<Spanned<RawHttp>>,
    #[serde(default)]
    grpc: Option<RawGrpc>,
    #[serde(default)]
    tls: Option<Spanned<RawTls>>,
}

/// `tls:` of the provider, in the shape of istio/api `ClientTLSSettings` (what a
/// DestinationRule for the collector's service would say).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTls {
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    ca_certificates: Option<Spanned<String>>,
    #[serde(default)]
    sni: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHttp {
    #[serde(default)]
    path: Option<Spanned<String>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    headers: Vec<RawHeader>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawGrpc {
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    initial_metadata: Vec<RawHeader>,
}

/// istio/api `HttpHeader` (`name`, `value`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHeader {
    name: Spanned<String>,
    value: Spanned<String>,
}

/// The export timeout: Istio's `HttpService.timeout`/`GrpcService.timeout` (Envoy's default
/// for the OpenTelemetry HTTP exporter is 250 ms; Outrigger's is 5 s, the OTLP exporter
/// specification's `OTEL_EXPORTER_OTLP_TIMEOUT` default, as the export never holds a request).
const EXPORT_TIMEOUT: Range = Range {
    min: Duration::from_millis(1),
    max: Duration::from_secs(300),
    text: "1ms to 5m",
};
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

impl Validator<'_> {
    pub(super) fn tracing(
        &self,
        raw: Option<&RawTracing>,
        trust_domain: &str,
    ) -> Result<Option<TracingConfig>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        let mut cfg = TracingConfig {
            mesh_id: raw
                .mesh_id
                .clone()
                .unwrap_or_else(|| trust_domain.to_string()),
            resource_attributes: raw
                .resource_attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..TracingConfig::default()
        };
        if let Some(s) = &raw.sampling {
            if !(0.0..=100.0).contains(&s.value) {
                return Err(self.err(
                    s,
                    "tracing.sampling",
                    format!("{} is not a percentage from 0 to 100", s.value),
                ));
            }
            cfg.sampling = s.value;
        }
        if let Some(n) = &raw.service_name {
            if n.value.is_empty() {
                return Err(self.err(n, "tracing.serviceName", "must not be empty"));
            }
            cfg.service_name = Some(n.value.clone());
        }
        if let Some(list) = &raw.propagation {
            let mut p = Propagation {
                w3c: false,
                b3: false,
            };
            for f in &list.value {
                match f.value.as_str() {
                    "w3c" => p.w3c = true,
                    "b3" => p.b3 = true,
                    other => {
                        return Err(self.err(
                            f,
                            "tracing.propagation",
                            format!("`{other}` is not a propagation format (w3c, b3)"),
                        ));
                    }
                }
            }
            if !p.w3c && !p.b3 {
                return Err(self.err(list, "tracing.propagation", "names no format (w3c, b3)"));
            }
            cfg.propagation = p;
        }
        if let Some(o) = &raw.opentelemetry {
            cfg.provider = Some(self.otel(&o.value, o)?);
        }
        for (tag, t) in &raw.custom_tags {
            cfg.custom_tags
                .push((tag.clone(), self.custom_tag(tag, t)?));
        }
        Ok(Some(cfg))
    }

    fn custom_tag(&self, tag: &str, t: &Spanned<RawCustomTag>) -> Result<CustomTag, ConfigError> {
        let f = format!("tracing.customTags.{tag}");
        if tag.is_empty() {
            return Err(self.err(t, "tracing.customTags", "a tag name must not be empty"));
        }
        let raw = &t.value;
        if raw.formatter.is_some() {
            return Err(self.err(
                t,
                &format!("{f}.formatter"),
                "is not supported (Envoy command operators); use literal, environment or header",
            ));
        }
        match (&raw.literal, &raw.environment, &raw.header) {
            (Some(l), None, None) => Ok(CustomTag::Literal(l.value.clone())),
            (None, Some(e), None) => {
                let n = &e.name;
                if n.value.is_empty() || n.value.contains(['=', '\0']) {
                    return Err(self.err(
                        n,
                        &format!("{f}.environment.name"),
                        format!("`{}` is not an environment variable name", n.value),
                    ));
                }
                Ok(CustomTag::Environment {
                    name: n.value.clone(),
                    default: e.default_value.clone(),
                })
            }
            (None, None, Some(h)) => {
                let name = HeaderName::from_bytes(h.name.value.as_bytes()).map_err(|_| {
                    self.err(
                        &h.name,
                        &format!("{f}.header.name"),
                        format!("`{}` is not a header name", h.name.value),
                    )
                })?;
                Ok(CustomTag::Header {
                    name,
                    default: h.default_value.clone(),
                })
            }
            (None, None, None) => Err(self.err(
                t,
                &f,
                "names no value: one of literal, environment or header",
            )),
            _ => Err(self.err(
                t,
                &f,
                "sets more than one of literal, environment and header",
            )),
        }
    }

    fn otel(&self, o: &RawOtel, at: &Spanned<RawOtel>) -> Result<OtlpProvider, ConfigError> {
        const F: &str = "tracing.opentelemetry";
        if o.service.value.is_empty() || o.service.value.contains(['/', ' ']) {
            return Err(self.err(
                &o.service,
                &format!("{F}.service"),
                format!("`{}` is not a host name or address", o.service.value),
            ));
        }
        let port = match u16::try_from(o.port.value) {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(self.err(
                    &o.port,
                    &format!("{F}.port"),
                    format!("{} is not a port (1-65535)", o.port.value),
                ));
            }
        };
        if o.http.is_some() && o.grpc.is_some() {
            return Err(self.err(
                at,
                F,
                "`http` and `grpc` are exclusive: `http` exports OTLP/HTTP, otherwise OTLP/gRPC",
            ));
        }
        let (timeout, raw_headers, http, hf) = match (&o.http, &o.grpc) {
            (Some(h), _) => {
                let path = match &h.value.path {
                    None => "/v1/traces".to_string(),
                    Some(p)
                        if p.value.starts_with('/')
                            && p.value.parse::<http::uri::PathAndQuery>().is_ok() =>
                    {
                        p.value.clone()
                    }
                    Some(p) => {
                        return Err(self.err(
                            p,
                            &format!("{F}.http.path"),
                            format!("`{}` is not an absolute request path", p.value),
                        ));
                    }
                };
                (
                    self.duration(
                        &h.value.timeout,
                        &format!("{F}.http.timeout"),
                        DEFAULT_EXPORT_TIMEOUT,
                        EXPORT_TIMEOUT,
                    )?,
                    &h.value.headers,
                    Some(OtlpHttp { path }),
                    "http.headers",
                )
            }
            (None, Some(g)) => (
                self.duration(
                    &g.timeout,
                    &format!("{F}.grpc.timeout"),
                    DEFAULT_EXPORT_TIMEOUT,
                    EXPORT_TIMEOUT,
                )?,
                &g.initial_metadata,
                None,
                "grpc.initialMetadata",
            ),
            (None, None) => (DEFAULT_EXPORT_TIMEOUT, &Vec::new(), None, ""),
        };
        let mut headers = Vec::new();
        for h in raw_headers {
            let name = HeaderName::from_bytes(h.name.value.as_bytes()).map_err(|_| {
                self.err(
                    &h.name,
                    &format!("{F}.{hf}.name"),
                    format!("`{}` is not a header name", h.name.value),
                )
            })?;
            let value = HeaderValue::from_str(&h.value.value).map_err(|_| {
                self.err(
                    &h.value,
                    &format!("{F}.{hf}.value"),
                    "is not a valid header value",
                )
            })?;
            headers.push((name, value));
        }
        let tls = match &o.tls {
            Some(t) => self.otel_tls(&t.value, &o.service)?,
            None => None,
        };
        Ok(OtlpProvider {
            service: o.service.value.clone(),
            port,
            http,
            timeout,
            headers,
            tls,
        })
    }

    /// `tls: {mode, caCertificates, sni}`: `mode` SIMPLE (the default) or DISABLE; the CA file
    /// is read and parsed here, so that a missing or bad one is an error at its line.
    fn otel_tls(
        &self,
        t: &RawTls,
        service: &Spanned<String>,
    ) -> Result<Option<OtlpTls>, ConfigError> {
        const F: &str = "tracing.opentelemetry.tls";
        if let Some(m) = &t.mode {
            match m.value.as_str() {
                "SIMPLE" => {}
                "DISABLE" => return Ok(None),
                other => {
                    return Err(self.err(
                        m,
                        &format!("{F}.mode"),
                        format!(
                            "`{other}` is not supported: SIMPLE (verify the collector) or DISABLE                              (plaintext); the collector gets no client certificate"
                        ),
                    ));
                }
            }
        }
        let (name, at, field) = match &t.sni {
            Some(sni) => (&sni.value, sni, format!("{F}.sni")),
            None => (
                &service.value,
                service,
                "tracing.opentelemetry.service".to_string(),
            ),
        };
        if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
            return Err(self.err(
                at,
                &field,
                format!("`{name}` is not a DNS name or an IP address to verify the collector by"),
            ));
        }
        let mut roots = Vec::new();
        if let Some(ca) = &t.ca_certificates {
            use rustls_pki_types::pem::PemObject;
            let field = format!("{F}.caCertificates");
            let path = self.path(&ca.value);
            let pem = std::fs::read(&path).map_err(|e| {
                self.err(ca, &field, format!("cannot read {}: {e}", path.display()))
            })?;
            for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                roots.push(c.map_err(|e| {
                    self.err(ca, &field, format!("{}: bad PEM: {e}", path.display()))
                })?);
            }
            if roots.is_empty() {
                return Err(self.err(
                    ca,
                    &field,
                    format!("{}: no CERTIFICATE in the file", path.display()),
                ));
            }
        }
        Ok(Some(OtlpTls {
            roots,
            server_name: name.clone(),
        }))
    }
}
