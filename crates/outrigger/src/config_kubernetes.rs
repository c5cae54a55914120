//! The `policy.kubernetes:` section of the agent configuration (documented in `docs/config.md`
//! and `docs/kubernetes.md`): where the Istio policies of the cluster are watched from. A child
//! module of `config`, so that it shares the validator and its file:line:field errors.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{ConfigError, Range, Validator};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawKubernetes {
    #[serde(default)]
    kubeconfig: Option<Spanned<String>>,
    #[serde(default)]
    context: Option<Spanned<String>>,
    #[serde(default)]
    server: Option<Spanned<String>>,
    #[serde(default)]
    token_file: Option<Spanned<String>>,
    #[serde(default)]
    ca_cert: Option<Spanned<String>>,
    #[serde(default)]
    namespaces: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    api_version: Option<Spanned<String>>,
    #[serde(default)]
    state_file: Option<Spanned<String>>,
    #[serde(default)]
    sync_timeout: Option<Spanned<String>>,
    #[serde(default)]
    max_backoff: Option<Spanned<String>>,
}

/// How the agent authenticates to the Kubernetes API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeCredentials {
    /// A kubeconfig file (`kubectl`'s format), and the context to use (its current context
    /// when `None`).
    Kubeconfig {
        path: PathBuf,
        context: Option<String>,
    },
    /// The API server's URL, a bearer token file (re-read as it rotates) and the CA that
    /// signed the API server's certificate (the system's roots when `None`).
    Token {
        server: String,
        token_file: PathBuf,
        ca_cert: Option<PathBuf>,
    },
}

/// `policy.kubernetes`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    pub credentials: KubeCredentials,
    /// The namespaces watched: by default the workload's and the root namespace.
    pub namespaces: Vec<String>,
    /// `security.istio.io/v1` (Istio 1.22 and later) or `security.istio.io/v1beta1`.
    pub api_version: String,
    /// Where the last good set of cluster policies is persisted (JSON), for a start without
    /// the API server.
    pub state_file: PathBuf,
    /// How long start-up waits for the API server's lists before it falls back to the state
    /// file.
    pub sync_timeout: Duration,
    /// The longest wait between two attempts to reach the API server (the backoff doubles up
    /// to it, with jitter).
    pub max_backoff: Duration,
}

/// `policy.kubernetes.syncTimeout`.
const SYNC: Range = Range {
    min: Duration::from_millis(100),
    max: Duration::from_secs(600),
    text: "100ms to 10m",
};
/// `policy.kubernetes.maxBackoff`.
const BACKOFF: Range = Range {
    min: Duration::from_millis(100),
    max: Duration::from_secs(3600),
    text: "100ms to 1h",
};

/// A Kubernetes namespace name: an RFC 1123 label.
fn is_namespace_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `host` (from a URL, brackets removed) is a loopback address or `localhost`.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Validator<'_> {
    pub(super) fn kubernetes(
        &self,
        raw: &Spanned<RawKubernetes>,
        workload_namespace: &str,
        root_namespace: &str,
        inputs: &mut Vec<super::InputFile>,
    ) -> Result<KubernetesConfig, ConfigError> {
        const F: &str = "policy.kubernetes";
        let k = &raw.value;
        if !cfg!(feature = "kubernetes") {
            return Err(self.err(
                raw,
                F,
                "this outrigger was built without the `kubernetes` feature (cargo build \
                 --no-default-features); use a release build, or policy files alone",
            ));
        }
        let credentials = match (&k.kubeconfig, &k.server) {
            (Some(path), None) => {
                for (v, name) in [(&k.token_file, "tokenFile"), (&k.ca_cert, "caCert")] {
                    if let Some(v) = v {
                        return Err(self.err(
                            v,
                            &format!("{F}.{name}"),
                            "set with `server`, not with `kubeconfig` (the kubeconfig names its \
                             own credentials and CA)",
                        ));
                    }
                }
                inputs.push(self.input(path, &format!("{F}.kubeconfig"), false));
                KubeCredentials::Kubeconfig {
                    path: self.path(&path.value),
                    context: k.context.as_ref().map(|c| c.value.clone()),
                }
            }
            (None, Some(server)) => {
                if let Some(c) = &k.context {
                    return Err(self.err(
                        c,
                        &format!("{F}.context"),
                        "a context is chosen in a kubeconfig: set `kubeconfig`, or drop `context`",
                    ));
                }
                let uri = server.value.parse::<http::Uri>().ok();
                let scheme = uri.as_ref().and_then(|u| u.scheme_str());
                let host = uri.as_ref().and_then(|u| u.host()).unwrap_or("");
                match scheme {
                    Some("https") if !host.is_empty() => {}
                    Some("http") if is_loopback_host(host) => {}
                    Some("http") if !host.is_empty() => {
                        return Err(self.err(
                            server,
                            &format!("{F}.server"),
                            format!(
                                "`{}`: plain http would send the token in the clear; use https \
                                 (http is accepted only on a loopback address, as `kubectl proxy` \
                                 serves it)",
                                server.value
                            ),
                        ));
                    }
                    _ => {
                        return Err(self.err(
                            server,
                            &format!("{F}.server"),
                            format!(
                                "`{}` is not the API server's URL (e.g. `https://10.0.0.1:6443`)",
                                server.value
                            ),
                        ));
                    }
                }
                let Some(token) = &k.token_file else {
                    return Err(self.err(
                        server,
                        &format!("{F}.tokenFile"),
                        "`server` needs `tokenFile`: the ServiceAccount token the agent \
                         presents (docs/kubernetes.md)",
                    ));
                };
                inputs.push(self.input(token, &format!("{F}.tokenFile"), false));
                if let Some(ca) = &k.ca_cert {
                    inputs.push(self.input(ca, &format!("{F}.caCert"), false));
                }
                KubeCredentials::Token {
                    server: server.value.trim_end_matches('/').to_string(),
                    token_file: self.path(&token.value),
                    ca_cert: k.ca_cert.as_ref().map(|c| self.path(&c.value)),
                }
            }
            (Some(_), Some(s)) => {
                return Err(self.err(
                    s,
                    F,
                    "set either `kubeconfig` or `server` (with `tokenFile`), not both",
                ));
            }
            (None, None) => {
                return Err(self.err(
                    raw,
                    F,
                    "set `kubeconfig` (a kubeconfig file), or `server` and `tokenFile` (a \
                     ServiceAccount token)",
                ));
            }
        };
        let namespaces = match &k.namespaces {
            None => {
                let mut v = vec![workload_namespace.to_string()];
                if root_namespace != workload_namespace {
                    v.push(root_namespace.to_string());
                }
                v
            }
            Some(list) => {
                if list.value.is_empty() {
                    return Err(self.err(
                        list,
                        &format!("{F}.namespaces"),
                        "name at least one namespace (leave it out for the workload's and the \
                         root namespace)",
                    ));
                }
                let mut v: Vec<String> = Vec::new();
                for (i, ns) in list.value.iter().enumerate() {
                    if !is_namespace_name(&ns.value) {
                        return Err(self.err(
                            ns,
                            &format!("{F}.namespaces[{i}]"),
                            format!("`{}` is not a namespace name", ns.value),
                        ));
                    }
                    if !v.contains(&ns.value) {
                        v.push(ns.value.clone());
                    }
                }
                v
            }
        };
        let api_version = match &k.api_version {
            None => "security.istio.io/v1".to_string(),
            Some(v) => match v.value.as_str() {
                "security.istio.io/v1" | "v1" => "security.istio.io/v1".to_string(),
                "security.istio.io/v1beta1" | "v1beta1" => "security.istio.io/v1beta1".to_string(),
                _ => {
                    return Err(self.err(
                        v,
                        &format!("{F}.apiVersion"),
                        format!(
                            "`{}`: use security.istio.io/v1 (Istio 1.22 and later) or \
                             security.istio.io/v1beta1",
                            v.value
                        ),
                    ));
                }
            },
        };
        let Some(state) = &k.state_file else {
            return Err(self.err(
                raw,
                &format!("{F}.stateFile"),
                "set the file where the last good cluster policy is kept (e.g. \
                 /var/lib/outrigger/cluster-policy.json): without it a restart while the API \
                 server is unreachable could not enforce the cluster's policy",
            ));
        };
        let state_file = self.path(&state.value);
        match state_file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
                return Err(self.err(
                    state,
                    &format!("{F}.stateFile"),
                    format!("the directory {} does not exist", dir.display()),
                ));
            }
            _ => {}
        }
        if state_file.is_dir() {
            return Err(self.err(
                state,
                &format!("{F}.stateFile"),
                format!("{} is a directory, not a file", state_file.display()),
            ));
        }
        Ok(KubernetesConfig {
            credentials,
            namespaces,
            api_version,
            state_file,
            sync_timeout: self.duration(
                &k.sync_timeout,
                &format!("{F}.syncTimeout"),
                Duration::from_secs(10),
                SYNC,
            )?,
            max_backoff: self.duration(
                &k.max_backoff,
                &format!("{F}.maxBackoff"),
                Duration::from_secs(30),
                BACKOFF,
            )?,
        })
    }
}

#[cfg(all(test, feature = "kubernetes"))]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::AgentConfig;

    /// The configuration lives in a temporary directory, so that `stateFile`'s directory
    /// exists.
    fn config(dir: &Path, section: &str) -> String {
        format!(
            "trustDomain: cluster.local
workload:
  namespace: legacy
  serviceAccount: windows-app
certificates:
  files: {{certChain: c.pem, key: k.pem, rootCert: r.pem}}
inbound:
  - {{name: web, listen: 0.0.0.0:8080, backend: 127.0.0.1:5000}}
policy:
  rootNamespace: mesh-root
  kubernetes:
{section}",
            section = section
                .lines()
                .map(|l| format!("    {l}\n"))
                .collect::<String>()
        )
        .replace("DIR", &dir.display().to_string())
    }

    fn parse(section: &str) -> Result<AgentConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.yaml");
        AgentConfig::parse(&file, &config(dir.path(), section)).map_err(|e| {
            // Windows paths (the unit tests also run under Wine) written as Unix ones.
            e.to_string()
                .replace(&dir.path().display().to_string(), "DIR")
                .replace('\\', "/")
        })
    }

    #[test]
    fn the_token_form_with_defaults() {
        let c = parse("server: https://10.0.0.1:6443/\ntokenFile: token\nstateFile: state.json")
            .unwrap();
        let k = c.policy.kubernetes.clone().unwrap();
        assert_eq!(k.namespaces, ["legacy", "mesh-root"]);
        assert_eq!(k.api_version, "security.istio.io/v1");
        assert_eq!(k.sync_timeout, Duration::from_secs(10));
        assert_eq!(k.max_backoff, Duration::from_secs(30));
        match k.credentials {
            KubeCredentials::Token {
                server,
                token_file,
                ca_cert,
            } => {
                assert_eq!(server, "https://10.0.0.1:6443");
                assert!(token_file.ends_with("token"));
                assert_eq!(ca_cert, None);
            }
            other => panic!("{other:?}"),
        }
        // The token file is an input: a missing one is reported at its line.
        assert!(
            c.inputs
                .iter()
                .any(|i| i.field == "policy.kubernetes.tokenFile" && i.line == 13),
            "{:?}",
            c.inputs
        );
    }

    #[test]
    fn the_kubeconfig_form_with_namespaces_and_v1beta1() {
        let c = parse(
            "kubeconfig: kc.yaml\ncontext: lab\nnamespaces: [legacy, legacy, istio-system]\n\
             apiVersion: v1beta1\nstateFile: state.json\nsyncTimeout: 2s\nmaxBackoff: 5s",
        )
        .unwrap();
        let k = c.policy.kubernetes.unwrap();
        assert_eq!(k.namespaces, ["legacy", "istio-system"]);
        assert_eq!(k.api_version, "security.istio.io/v1beta1");
        assert!(matches!(
            k.credentials,
            KubeCredentials::Kubeconfig { context: Some(ref c), .. } if c == "lab"
        ));
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let cases = [
            (
                "server: http://10.0.0.1:8080\ntokenFile: t\nstateFile: s.json",
                "DIR/agent.yaml:12:13: policy.kubernetes.server: `http://10.0.0.1:8080`: plain http",
            ),
            (
                "server: 10.0.0.1:6443\ntokenFile: t\nstateFile: s.json",
                "DIR/agent.yaml:12:13: policy.kubernetes.server: `10.0.0.1:6443` is not",
            ),
            (
                "server: https://k8s:6443\nstateFile: s.json",
                "DIR/agent.yaml:12:13: policy.kubernetes.tokenFile: `server` needs `tokenFile`",
            ),
            (
                "kubeconfig: kc\nserver: https://k8s:6443\nstateFile: s.json",
                "DIR/agent.yaml:13:13: policy.kubernetes: set either `kubeconfig` or `server`",
            ),
            (
                "kubeconfig: kc\ntokenFile: t\nstateFile: s.json",
                "DIR/agent.yaml:13:16: policy.kubernetes.tokenFile: set with `server`",
            ),
            (
                "kubeconfig: kc",
                "policy.kubernetes.stateFile: set the file",
            ),
            (
                "kubeconfig: kc\nstateFile: nowhere/s.json",
                "DIR/agent.yaml:13:16: policy.kubernetes.stateFile: the directory DIR/nowhere does not exist",
            ),
            (
                "kubeconfig: kc\nstateFile: s.json\nnamespaces: [Legacy]",
                "DIR/agent.yaml:14:18: policy.kubernetes.namespaces[0]: `Legacy` is not a namespace name",
            ),
            (
                "kubeconfig: kc\nstateFile: s.json\nnamespaces: []",
                "policy.kubernetes.namespaces: name at least one",
            ),
            (
                "kubeconfig: kc\nstateFile: s.json\napiVersion: v2",
                "DIR/agent.yaml:14:17: policy.kubernetes.apiVersion: `v2`",
            ),
            (
                "kubeconfig: kc\nstateFile: s.json\nsyncTimeout: 0s",
                "DIR/agent.yaml:14:18: policy.kubernetes.syncTimeout: `0s` is out of range",
            ),
            (
                "kubeconfig: kc\nstateFile: s.json\nwatch: all",
                "DIR/agent.yaml:14:5: policy.kubernetes.watch: unknown field `watch`",
            ),
        ];
        for (section, want) in cases {
            let e = parse(section).unwrap_err();
            assert!(e.contains(want), "{section}\nwant: {want}\ngot:  {e}");
        }
        // http on loopback is `kubectl proxy`.
        parse("server: http://127.0.0.1:8001\ntokenFile: t\nstateFile: s.json").unwrap();
    }
}
