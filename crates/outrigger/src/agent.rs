//! Wiring: from a validated [`AgentConfig`] to a running proxy with its background tasks.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use outrigger_proxy::{
    AccessLog, Metrics, PolicyHandle, Proxy, ProxyOptions, Settings, WorkloadInfo,
};
use outrigger_tls::{CertSource, CertStore};

use outrigger_ca::client::{CaClient, CaClientConfig};
use outrigger_ca::source::IstioCaSource;

use crate::config::{AgentConfig, CertificatesConfig, IstioCaConfig};
use crate::policy_files::{self, PolicyInputs};

/// Everything the agent loads and checks before it binds a socket: credentials, policy, JWT
/// settings. `run --check-config` stops here, so it works beside a running agent.
pub struct Loaded {
    /// `None` only for `run --check-config` with an `istioCa` source that has no certificate
    /// yet (checking a configuration never asks the CA for one).
    certs: Option<CertStore>,
    /// The `istioCa` source, whose renewal task starts with the listeners.
    istio_ca: Option<IstioCaSource>,
    refresh: std::time::Duration,
    inputs: PolicyInputs,
    /// What the policy in force was built from: the watcher compares later reads with it.
    observed: policy_files::Observation,
    pub policy: Arc<PolicyHandle>,
    jwt: outrigger_proxy::jwt_authn::JwtSettings,
    /// `policy.kubernetes`: the cluster watch, listed (or its persisted set loaded).
    #[cfg(feature = "kubernetes")]
    cluster: Option<crate::kube_policy::Started>,
}

/// A bound (listening) agent, not yet serving.
pub struct Agent {
    pub proxy: Proxy,
    pub policy: Arc<PolicyHandle>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Agent {
    /// Loads credentials and policy (refusing to start on any error) and binds the listeners.
    pub async fn start(cfg: &AgentConfig) -> anyhow::Result<Agent> {
        Loaded::load(cfg, Obtain::Yes).await?.bind(cfg).await
    }
}

/// Whether loading may ask the Istio CA for a first certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Obtain {
    Yes,
    /// `run --check-config`: use a persisted certificate if there is one, never call the CA.
    No,
}

impl Loaded {
    /// Loads and checks the credentials, the policy and the JWT settings; binds nothing.
    pub async fn load(cfg: &AgentConfig, obtain: Obtain) -> anyhow::Result<Loaded> {
        // A missing certificate file is reported at the configuration line that names it.
        cfg.check_inputs()?;
        let mut istio_ca = None;
        let (source, refresh) = match &cfg.certificates {
            CertificatesConfig::Files {
                cert_chain,
                key,
                root_cert,
                poll_interval,
            } => (
                CertSource::Files {
                    chain: cert_chain.clone(),
                    key: key.clone(),
                    roots: root_cert.clone(),
                },
                *poll_interval,
            ),
            CertificatesConfig::Builtin { ca_dir, ttl } => (
                CertSource::Builtin {
                    ca_dir: ca_dir.clone(),
                    identity: cfg.identity.clone(),
                    ttl: *ttl,
                },
                std::time::Duration::from_secs(30),
            ),
            CertificatesConfig::IstioCa(c) => {
                let source = istio_ca_source(cfg, c)?;
                let files = CertSource::Files {
                    chain: source.chain_path(),
                    key: source.key_path(),
                    roots: c.root_cert.clone(),
                };
                let have = match obtain {
                    Obtain::Yes => {
                        let how = source.ensure(c.bootstrap_timeout).await.with_context(|| {
                            format!(
                                "{}: certificates.istioCa: obtaining the workload certificate for {} \
                                 from {}",
                                cfg.file.display(),
                                cfg.identity,
                                c.address
                            )
                        })?;
                        tracing::info!(
                            state_dir = %c.state_dir.display(),
                            startup = ?how,
                            "workload certificate from the Istio CA"
                        );
                        true
                    }
                    Obtain::No => source.persisted().is_ok(),
                };
                istio_ca = Some(source);
                if !have {
                    // Only `--check-config` gets here: say what `run` would do.
                    let c = c.clone();
                    return Self::load_rest(cfg, None, std::time::Duration::ZERO, istio_ca)
                        .await
                        .inspect(|_| {
                            println!(
                                "certificate: none persisted in {} yet; `run` requests one from {} \
                                 (server name {}) with the token in {}",
                                c.state_dir.display(),
                                c.address,
                                c.server_name,
                                c.token_file
                                    .as_ref()
                                    .map(|t| t.display().to_string())
                                    .unwrap_or_else(|| "(no tokenFile set)".into())
                            )
                        });
                }
                (files, std::time::Duration::from_secs(10))
            }
        };
        let alpn = outrigger_tls::ISTIO_ALPNS
            .iter()
            .map(|a| a.to_vec())
            .collect();
        // The same checks run here and at every rotation (CertStore's one validation
        // function), including that the certificate is for this workload's identity.
        let certs = CertStore::with_identity(
            source,
            cfg.trust_domains.clone(),
            alpn,
            cfg.identity.clone(),
        )
        .with_context(|| {
            format!(
                "{}: loading the workload certificate for {} (workload.namespace / \
                 workload.serviceAccount)",
                cfg.file.display(),
                cfg.identity
            )
        })?;
        if let Some((file, only_leaf)) = &cfg.crl {
            certs
                .set_crl(file.clone(), *only_leaf)
                .with_context(|| format!("{}: certificates.crl", cfg.file.display()))?;
        }
        Self::load_rest(cfg, Some(certs), refresh, istio_ca).await
    }

    /// Policy and JWT settings, after the credentials.
    async fn load_rest(
        cfg: &AgentConfig,
        certs: Option<CertStore>,
        refresh: std::time::Duration,
        istio_ca: Option<IstioCaSource>,
    ) -> anyhow::Result<Loaded> {
        let inputs = PolicyInputs::from_config(cfg);
        // The cluster's policy first (listed, or the persisted set), so that the first
        // snapshot holds both sources; refuses to start with neither.
        #[cfg(feature = "kubernetes")]
        let cluster = match (&cfg.policy.kubernetes, &inputs.cluster) {
            (Some(k), Some(merge)) => Some(crate::kube_policy::start(cfg, k, merge).await?),
            _ => None,
        };
        // The watcher compares later reads with exactly what this policy was built from.
        let (state, observed) = {
            let inputs = inputs.clone();
            tokio::task::spawn_blocking(move || {
                let observed = policy_files::Observation::read(&inputs.paths);
                let state = match observed.contents() {
                    Ok(c) => policy_files::load_contents(&inputs, c, 1),
                    Err(e) => Err(e.to_string()),
                };
                state.map(|s| (s, observed))
            })
            .await?
            .map_err(|e| anyhow::anyhow!("invalid policy; refusing to start:\n{e}"))?
        };
        if let (Some(merge), Ok(files)) = (&inputs.cluster, observed.contents()) {
            merge.set_files(files.clone());
        }
        let policy = PolicyHandle::new(state);
        let jwt = jwt_settings(&cfg.jwt)?;
        Ok(Loaded {
            certs,
            istio_ca,
            refresh,
            inputs,
            observed,
            policy,
            jwt,
            #[cfg(feature = "kubernetes")]
            cluster,
        })
    }

    /// Binds the listeners and starts the background tasks (certificate refresh, policy watch).
    pub async fn bind(self, cfg: &AgentConfig) -> anyhow::Result<Agent> {
        let Loaded {
            certs,
            istio_ca,
            refresh,
            inputs,
            observed,
            policy,
            jwt,
            #[cfg(feature = "kubernetes")]
            cluster,
        } = self;
        let certs = certs.ok_or_else(|| {
            anyhow::anyhow!("no workload certificate: it was loaded for --check-config only")
        })?;
        let metrics = Arc::new(Metrics::new());
        {
            let metrics = metrics.clone();
            certs.set_observer(move |event| metrics.certificate_rotation(event));
        }
        let access_log = AccessLog::start(cfg.access_log.clone(), metrics.clone())?;
        let labels = &cfg.workload.labels;
        let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
        // The first of these labels present, as istiod gives a workload its canonical
        // service and revision (istio/istio `pkg/kube/labels/labels.go`, `CanonicalService`:
        // `nameLabels`, `revisionLabels`), else the workload's name and `latest`.
        let first = |keys: [&str; 3]| keys.iter().find_map(|k| labels.get(*k).cloned());
        let workload = WorkloadInfo {
            identity: cfg.identity.clone(),
            namespace: cfg.workload.namespace.clone(),
            name: cfg.workload.name.clone(),
            canonical_service: first([
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or_else(|| cfg.workload.name.clone()),
            canonical_revision: first([
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".into()),
            // A sidecar's own `app` and `version` labels on its metrics are its `app` and
            // `version` labels only (istio/proxy istio_stats.cc, `Context`:
            // `extractMapString(node.metadata(), "LABELS", "app")`); the
            // `app.kubernetes.io/*` fallback is for the peer's (metadata_object.cc).
            app: label("app"),
            version: label("version"),
            service_host: cfg.workload.service.clone(),
            cluster: cfg.workload.cluster.clone(),
        };
        let settings = Settings {
            detect_timeout: cfg.detect_timeout,
            handshake_timeout: cfg.handshake_timeout,
            connect_timeout: cfg.connect_timeout,
            drain_timeout: cfg.drain_timeout,
            path_normalization: cfg.policy.path_normalization,
            idle_timeout: cfg.connections.idle_timeout,
            limits: connection_limits(cfg),
            rate_limits: cfg.rate_limits.clone(),
            extension_providers: cfg.extension_providers.clone(),
            tracing: cfg.tracing.clone(),
        };
        let proxy = Proxy::bind(
            ProxyOptions {
                jwt,
                inbound: cfg.inbound.clone(),
                admin: cfg.admin,
                metrics_listen: cfg.metrics_listen,
                log_control: Some(Arc::new(crate::logging::AdminLogControl)),
                workload,
                settings,
                access_log,
                metrics: metrics.clone(),
                outbound: cfg.outbound.clone(),
                outbound_proxy: cfg.outbound_proxy.clone(),
                hbone: cfg.hbone.clone(),
            },
            certs.clone(),
            policy.clone(),
        )
        .await?;
        let mut tasks = vec![certs.spawn_refresh(refresh)];
        #[cfg(feature = "kubernetes")]
        if let Some(cluster) = cluster {
            tasks.push(cluster.spawn(policy.clone(), inputs.clone(), metrics.clone()));
        }
        tasks.push(tokio::spawn(policy_files::watch(
            policy.clone(),
            inputs,
            cfg.policy.reload_interval,
            metrics.clone(),
            observed,
        )));
        if let Some(source) = istio_ca {
            tasks.push(source.spawn_renewal(certs.clone()));
        }
        let m = metrics.clone();
        tasks.extend(crate::memtrim::spawn(move || m.take_downstream_peak()));
        Ok(Agent {
            proxy,
            policy,
            tasks,
        })
    }
}

impl Agent {
    pub fn inbound_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.proxy.inbound_addrs()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.proxy.admin_addr()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.proxy.metrics_addr()
    }

    /// The bound HBONE listener, if enabled.
    pub fn hbone_addr(&self) -> Option<SocketAddr> {
        self.proxy.hbone_addr()
    }

    /// Outbound listeners by name (the HTTP proxy is `http-proxy`).
    pub fn outbound_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.proxy.outbound_addrs()
    }

    /// Serves until `shutdown`, then drains.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        self.proxy.run(shutdown).await;
        for t in self.tasks {
            t.abort();
        }
    }
}

/// The connection caps for the open-file limit in force (raised at start, see `fdlimit`),
/// logged; a configured cap the limit cannot hold is a warning, not an error (the operator may
/// raise the hard limit later, and the agent still serves what it can).
fn connection_limits(cfg: &AgentConfig) -> outrigger_proxy::limits::ConnectionLimits {
    let fds = crate::fdlimit::current().budget();
    let limits = cfg.connections.limits(fds);
    tracing::info!(
        max = limits.max,
        max_per_identity = limits.max_per_identity,
        idle_timeout = ?cfg.connections.idle_timeout,
        "downstream connection caps (connections.max, connections.maxPerIdentity)"
    );
    if limits.fds_needed() > fds {
        tracing::warn!(
            max = limits.max,
            open_file_limit = fds,
            "connections.max {} can use about {} file descriptors (2 per connection and {} for the agent), \
             more than the open-file limit {fds}: raise the hard limit (LimitNOFILE=) or lower connections.max",
            limits.max,
            limits.fds_needed(),
            outrigger_proxy::limits::FD_RESERVE
        );
    }
    limits
}

pub(crate) fn jwt_settings(
    cfg: &crate::config::JwtConfig,
) -> anyhow::Result<outrigger_proxy::jwt_authn::JwtSettings> {
    use rustls_pki_types::pem::PemObject;
    let mut extra_roots = Vec::new();
    if let Some(path) = &cfg.ca_bundle {
        let pem = std::fs::read(path)
            .with_context(|| format!("jwt.caBundle: cannot read {}", path.display()))?;
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
            extra_roots
                .push(c.with_context(|| format!("jwt.caBundle {}: bad PEM", path.display()))?);
        }
        if extra_roots.is_empty() {
            anyhow::bail!(
                "jwt.caBundle {}: no CERTIFICATE in the file",
                path.display()
            );
        }
    }
    let egress_proxy =
        outrigger_proxy::egress_proxy::EgressProxy::from_env(|k| std::env::var(k).ok()).map_err(
            |e| anyhow::anyhow!("{e} (the proxy for JWKS and OpenID discovery fetches)"),
        )?;
    if let Some(p) = &egress_proxy.https {
        tracing::info!(proxy = %format!("{}:{}", p.host, p.port), "JWKS and OpenID discovery over HTTPS go through HTTPS_PROXY (NO_PROXY honoured)");
    }
    Ok(outrigger_proxy::jwt_authn::JwtSettings {
        egress_proxy,
        extra_roots,
        refresh_interval: cfg.refresh_interval,
        identity_headers: cfg
            .identity_headers
            .iter()
            .map(|(h, c)| {
                (
                    http::header::HeaderName::from_bytes(h.as_bytes()).expect("validated"),
                    c.clone(),
                )
            })
            .collect(),
    })
}

/// Resolves on Ctrl-C, on SIGTERM where there is one (systemd, Kubernetes), and on Windows on
/// Ctrl-Break, console close and system shutdown.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(windows)]
    {
        // A console agent stops on Ctrl-C, Ctrl-Break (what process supervisors send with
        // GenerateConsoleCtrlEvent), the console window closing, and system shutdown. Windows
        // gives a closing console only a few seconds, so the drain may be cut short there; the
        // service (crate::windows) is the way to run unattended.
        use tokio::signal::windows::{ctrl_break, ctrl_close, ctrl_shutdown};
        let (Ok(mut brk), Ok(mut close), Ok(mut shut)) =
            (ctrl_break(), ctrl_close(), ctrl_shutdown())
        else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = brk.recv() => {}
            _ = close.recv() => {}
            _ = shut.recv() => {}
        }
    }
    #[cfg(not(any(unix, windows)))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The `istioCa` source for this workload: its CA client (the mesh root read now) and where the
/// credentials are kept. The `clusterid` header is `workload.cluster`, as istio-agent sends
/// `ISTIO_META_CLUSTER_ID`.
fn istio_ca_source(cfg: &AgentConfig, c: &IstioCaConfig) -> anyhow::Result<IstioCaSource> {
    let root_cert_pem = std::fs::read(&c.root_cert).with_context(|| {
        format!(
            "{}: certificates.istioCa.rootCert: reading {}",
            cfg.file.display(),
            c.root_cert.display()
        )
    })?;
    Ok(IstioCaSource {
        client: CaClient::new(CaClientConfig {
            address: c.address.clone(),
            server_name: c.server_name.clone(),
            root_cert_pem,
            root_cert_file: c.root_cert.clone(),
            token_file: c.token_file.clone(),
            cluster_id: cfg.workload.cluster.clone(),
            ttl: c.ttl,
            timeout: cfg.connect_timeout.max(std::time::Duration::from_secs(10)),
        }),
        identity: cfg.identity.clone(),
        state_dir: c.state_dir.clone(),
        grace_period_ratio: c.grace_period_ratio,
        jitter: c.grace_period_ratio_jitter,
    })
}
