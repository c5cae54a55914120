//! Istio policy from the cluster (`policy.kubernetes`, docs/kubernetes.md): AuthorizationPolicy,
//! PeerAuthentication and RequestAuthentication in the watched namespaces (by default the
//! workload's and the root namespace), listed and watched with kube-runtime's watcher.
//!
//! - Each object goes through the same parser and validation as a policy file (JSON is
//!   YAML): one invalid object is refused alone, with its fail-closed stand-in. Each is named
//!   `cluster:<namespace>/<kind>/<name> (resourceVersion N)` in logs, `/config_dump` and
//!   `outrigger check`.
//! - A set is published only once every (namespace, kind) has been listed: a partial list never
//!   replaces the policy in force. A relist (after `410 Gone`, or a watch error) replaces a
//!   stream's objects atomically when it completes.
//! - While the API server is unreachable the last good set stays in force; the watcher
//!   reconnects with exponential backoff (with jitter, up to `maxBackoff`).
//! - Every set applied is persisted (a Kubernetes `List` in JSON, written atomically) to
//!   `stateFile`. At start, if the API server does not answer within `syncTimeout`, the
//!   persisted set is enforced (and said loudly); with neither, the agent refuses to start
//!   rather than start without the cluster's policy.
//! - A change that removes every cluster policy waits [`settle::REMOVAL_SETTLE`] and must still
//!   hold then, as for files.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use futures_util::stream::{SelectAll, Stream, StreamExt};
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use outrigger_policy::Resource;
use outrigger_proxy::{Metrics, PendingChange, PolicyHandle};
use outrigger_tls::settle;

use crate::config::{AgentConfig, KubeCredentials, KubernetesConfig};
use crate::policy_files::PolicyInputs;
use crate::policy_merge::{CLUSTER_PREFIX, ClusterResources, Merge};

/// The kinds watched, with their plural (the resource in the URL).
pub const KINDS: [(&str, &str); 3] = [
    ("AuthorizationPolicy", "authorizationpolicies"),
    ("PeerAuthentication", "peerauthentications"),
    ("RequestAuthentication", "requestauthentications"),
];

/// namespace, kind, name.
type Key = (String, String, String);
/// The objects of the cluster, as received (JSON, `managedFields` dropped).
pub type Objects = BTreeMap<Key, serde_json::Value>;

/// The name a cluster object goes by: `cluster:<namespace>/<kind>/<name> (resourceVersion N)`.
pub fn source_name(ns: &str, kind: &str, name: &str, rv: &str) -> String {
    if rv.is_empty() {
        format!("{CLUSTER_PREFIX}{ns}/{kind}/{name}")
    } else {
        format!("{CLUSTER_PREFIX}{ns}/{kind}/{name} (resourceVersion {rv})")
    }
}

fn str_at<'a>(v: &'a serde_json::Value, path: &[&str]) -> &'a str {
    let mut v = v;
    for p in path {
        match v.get(p) {
            Some(x) => v = x,
            None => return "",
        }
    }
    v.as_str().unwrap_or("")
}

/// Parses and validates the objects with the policy files' parser (a JSON object is a YAML
/// document); every resource is named by [`source_name`], without line numbers.
pub fn to_resources(objects: &Objects) -> Vec<Resource> {
    let mut out = Vec::new();
    for ((ns, kind, name), v) in objects {
        let source = source_name(ns, kind, name, str_at(v, &["metadata", "resourceVersion"]));
        let text = serde_json::to_string_pretty(v).unwrap_or_default();
        for mut r in outrigger_policy::parse_documents_lenient(&source, &text) {
            // Lines of a text no one sees would mislead: the field path says where.
            r.source.line = 0;
            for w in &mut r.warnings {
                w.location.line = 0;
                w.location.column = 0;
            }
            if let outrigger_policy::ResourceKind::Refused(refusal) = &mut r.kind {
                refusal.error.location.line = 0;
                refusal.error.location.column = 0;
            }
            out.push(r);
        }
    }
    out
}

/// The `/config_dump` `policy.files` lines for the cluster.
fn source_lines(k: &KubernetesConfig, server: &str) -> Vec<String> {
    k.namespaces
        .iter()
        .map(|ns| format!("{CLUSTER_PREFIX}{ns} ({} from {server})", k.api_version))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The state file

/// The state file: a Kubernetes `List` (`kubectl get -o json`'s shape, so `outrigger lint`
/// and the policy files' parser read it too) with where and when it was taken.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StateFile {
    api_version: String,
    kind: String,
    #[serde(default)]
    outrigger: StateInfo,
    items: Vec<serde_json::Value>,
}

#[derive(serde::Serialize, serde::Deserialize, Default, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct StateInfo {
    #[serde(default)]
    pub server: String,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub saved_at_unix: u64,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes the set atomically (a temporary file in the same directory, synced, renamed over).
pub fn persist(path: &Path, objects: &Objects, info: &StateInfo) -> std::io::Result<()> {
    let file = StateFile {
        api_version: "v1".into(),
        kind: "List".into(),
        outrigger: info.clone(),
        items: objects.values().cloned().collect(),
    };
    let text = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, &text)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Reads a state file: `Ok(None)` when there is none. Only objects of the watched kinds and
/// namespaces are kept.
pub fn read_state(
    path: &Path,
    namespaces: &[String],
) -> anyhow::Result<Option<(Objects, StateInfo)>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let file: StateFile = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a cluster policy state file", path.display()))?;
    if file.kind != "List" {
        anyhow::bail!("{}: not a List", path.display());
    }
    let mut objects = Objects::new();
    for v in file.items {
        let ns = str_at(&v, &["metadata", "namespace"]).to_string();
        let kind = str_at(&v, &["kind"]).to_string();
        let name = str_at(&v, &["metadata", "name"]).to_string();
        if namespaces.contains(&ns) && KINDS.iter().any(|(k, _)| *k == kind) {
            objects.insert((ns, kind, name), v);
        }
    }
    Ok(Some((objects, file.outrigger)))
}

// ---------------------------------------------------------------------------------------------
// Status for /config_dump

/// Where the cluster policy in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InForceFrom {
    ApiServer,
    StateFile,
}

#[derive(Debug, Clone)]
struct Status {
    server: String,
    namespaces: Vec<String>,
    api_version: String,
    state_file: String,
    from: InForceFrom,
    connected: bool,
    resources: usize,
    applied_at: SystemTime,
    state_saved_at: Option<u64>,
    last_error: Option<(SystemTime, String)>,
    last_persist_error: Option<String>,
    relists: u64,
}

impl Status {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "server": self.server,
            "namespaces": self.namespaces,
            "api_version": self.api_version,
            "state_file": self.state_file,
            "in_force_from": match self.from {
                InForceFrom::ApiServer => "api-server",
                InForceFrom::StateFile => "state-file",
            },
            "state_file_saved_at_unix": self.state_saved_at,
            "connected": self.connected,
            "resources": self.resources,
            "applied_at_unix": unix(self.applied_at),
            "relists": self.relists,
            "last_error": self.last_error.as_ref().map(|(at, e)| serde_json::json!({
                "at_unix": unix(*at),
                "error": e,
            })),
            "last_persist_error": self.last_persist_error,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The watch

/// Exponential backoff with jitter: 500 ms doubling up to `max`, each wait between half and
/// all of its step; reset by any successful event.
struct Backoff {
    next: Duration,
    max: Duration,
    seed: u64,
}

impl Backoff {
    fn new(max: Duration, seed: u64) -> Self {
        Backoff {
            next: Duration::from_millis(500).min(max),
            max,
            seed: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }
}

impl Iterator for Backoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        // xorshift: jitter only, not security.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let frac = (self.seed % 1000) as f64 / 1000.0;
        Some(step.mul_f64(0.5 + 0.5 * frac))
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        self.next = Duration::from_millis(500).min(self.max);
    }
}

type EventStream =
    Pin<Box<dyn Stream<Item = (usize, Result<Event<DynamicObject>, watcher::Error>)> + Send>>;

/// One (namespace, kind) watched.
struct Watched {
    namespace: String,
    resource: ApiResource,
    objects: Objects,
    /// During a (re)list: what has been listed so far.
    buffer: Option<Objects>,
    listed: bool,
    /// The error this stream last logged, so that a retry with the same error is not logged
    /// again.
    last_error: Option<String>,
}

/// The watchers of every (namespace, kind), merged.
pub struct ClusterWatch {
    server: String,
    streams: Vec<Watched>,
    events: SelectAll<EventStream>,
    last_returned: Option<Objects>,
    status: Arc<Mutex<Status>>,
}

/// The client for `policy.kubernetes`.
async fn client(k: &KubernetesConfig, default_ns: &str) -> anyhow::Result<(Client, String)> {
    let mut config = match &k.credentials {
        KubeCredentials::Kubeconfig { path, context } => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("policy.kubernetes.kubeconfig {}", path.display()))?;
            let opts = kube::config::KubeConfigOptions {
                context: context.clone(),
                cluster: None,
                user: None,
            };
            kube::Config::from_custom_kubeconfig(kc, &opts)
                .await
                .with_context(|| format!("policy.kubernetes.kubeconfig {}", path.display()))?
        }
        KubeCredentials::Token {
            server,
            token_file,
            ca_cert,
        } => {
            let uri: http::Uri = server
                .parse()
                .with_context(|| format!("policy.kubernetes.server {server}"))?;
            let mut c = kube::Config::new(uri);
            let token = std::fs::read_to_string(token_file).with_context(|| {
                format!(
                    "policy.kubernetes.tokenFile: cannot read {}",
                    token_file.display()
                )
            })?;
            if token.trim().is_empty() {
                anyhow::bail!(
                    "policy.kubernetes.tokenFile {}: empty",
                    token_file.display()
                );
            }
            if token.trim() == token {
                // Re-read as it rotates (a projected ServiceAccount token), as the CA file is.
                c.auth_info.token_file = Some(token_file.to_string_lossy().into_owned());
            } else {
                // The client would send the newline that `kubectl create token > file` leaves
                // and the API server would refuse it: the token is read once, trimmed.
                let mut v = http::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "policy.kubernetes.tokenFile {}: not a bearer token",
                            token_file.display()
                        )
                    })?;
                v.set_sensitive(true);
                c.headers.push((http::header::AUTHORIZATION, v));
                tracing::info!(
                    "policy.kubernetes.tokenFile {} ends with a newline: the token is read once at \
                     start (a file without surrounding whitespace is re-read as it rotates)",
                    token_file.display()
                );
            }
            if let Some(ca) = ca_cert {
                let pem = std::fs::read(ca).with_context(|| {
                    format!("policy.kubernetes.caCert: cannot read {}", ca.display())
                })?;
                let mut ders = Vec::new();
                use rustls_pki_types::pem::PemObject;
                for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                    ders.push(
                        c.with_context(|| {
                            format!("policy.kubernetes.caCert {}: bad PEM", ca.display())
                        })?
                        .to_vec(),
                    );
                }
                if ders.is_empty() {
                    anyhow::bail!(
                        "policy.kubernetes.caCert {}: no CERTIFICATE in the file",
                        ca.display()
                    );
                }
                c.root_cert = Some(ders);
                c.root_cert_file = Some(ca.clone());
            }
            c
        }
    };
    config.default_namespace = default_ns.to_string();
    config.connect_timeout = Some(Duration::from_secs(10));
    let server = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_string();
    let client = Client::try_from(config).context("policy.kubernetes: the API client")?;
    Ok((client, server))
}

impl ClusterWatch {
    /// The client and the watch streams (nothing is requested until the stream is polled).
    pub async fn new(cfg: &AgentConfig, k: &KubernetesConfig) -> anyhow::Result<ClusterWatch> {
        let (client, server) = client(k, &cfg.workload.namespace).await?;
        let (group, version) = k
            .api_version
            .split_once('/')
            .unwrap_or(("security.istio.io", "v1"));
        let mut streams = Vec::new();
        let mut events = SelectAll::new();
        for ns in &k.namespaces {
            for (kind, plural) in KINDS {
                let resource = ApiResource {
                    group: group.to_string(),
                    version: version.to_string(),
                    api_version: k.api_version.clone(),
                    kind: kind.to_string(),
                    plural: plural.to_string(),
                };
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
                let i = streams.len();
                let stream = watcher::watcher(api, watcher::Config::default())
                    .backoff(Backoff::new(
                        k.max_backoff,
                        unix(SystemTime::now()) + i as u64,
                    ))
                    .map(move |e| (i, e));
                events.push(Box::pin(stream) as EventStream);
                streams.push(Watched {
                    namespace: ns.clone(),
                    resource,
                    objects: Objects::new(),
                    buffer: None,
                    listed: false,
                    last_error: None,
                });
            }
        }
        let status = Arc::new(Mutex::new(Status {
            server: server.clone(),
            namespaces: k.namespaces.clone(),
            api_version: k.api_version.clone(),
            state_file: k.state_file.display().to_string(),
            from: InForceFrom::ApiServer,
            connected: false,
            resources: 0,
            applied_at: SystemTime::now(),
            state_saved_at: None,
            last_error: None,
            last_persist_error: None,
            relists: 0,
        }));
        Ok(ClusterWatch {
            server,
            streams,
            events,
            last_returned: None,
            status,
        })
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The object as the policy parser reads it: `apiVersion` and `kind` set (list items may
    /// lack them), `managedFields` dropped.
    fn object(&self, i: usize, obj: DynamicObject) -> Option<(Key, serde_json::Value)> {
        let w = &self.streams[i];
        let mut v = serde_json::to_value(&obj).ok()?;
        let map = v.as_object_mut()?;
        map.insert("apiVersion".into(), w.resource.api_version.clone().into());
        map.insert("kind".into(), w.resource.kind.clone().into());
        if let Some(meta) = map.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.remove("managedFields");
            if !meta.contains_key("namespace") {
                meta.insert("namespace".into(), w.namespace.clone().into());
            }
        }
        let name = obj.metadata.name.clone().unwrap_or_default();
        Some(((w.namespace.clone(), w.resource.kind.clone(), name), v))
    }

    fn handle(&mut self, i: usize, event: Result<Event<DynamicObject>, watcher::Error>) {
        let Some(w) = self.streams.get(i) else { return };
        let what = format!("{} {}", w.namespace, w.resource.plural);
        match event {
            Err(e) => {
                let msg = format!("{what}: {e}");
                let repeated = self.streams[i].last_error.as_ref() == Some(&msg);
                self.streams[i].last_error = Some(msg.clone());
                let mut st = self.status();
                if !repeated {
                    tracing::warn!(
                        "the Kubernetes API server {}: {msg}; retrying with backoff, the \
                         cluster policy in force stays",
                        st.server
                    );
                }
                st.connected = false;
                st.last_error = Some((SystemTime::now(), msg));
            }
            Ok(ev) => {
                self.streams[i].last_error = None;
                {
                    let mut st = self.status();
                    if !st.connected && st.last_error.is_some() {
                        tracing::info!("the Kubernetes API server {} answers again", st.server);
                    }
                    st.connected = true;
                }
                match ev {
                    Event::Init => {
                        if self.streams[i].listed {
                            tracing::info!("relisting {what} (the watch expired or failed)");
                            self.status().relists += 1;
                        }
                        self.streams[i].buffer = Some(Objects::new());
                    }
                    Event::InitApply(obj) => {
                        if let Some((k, v)) = self.object(i, obj) {
                            self.streams[i]
                                .buffer
                                .get_or_insert_with(Objects::new)
                                .insert(k, v);
                        }
                    }
                    Event::InitDone => {
                        let w = &mut self.streams[i];
                        w.objects = w.buffer.take().unwrap_or_default();
                        w.listed = true;
                        tracing::debug!("listed {what}: {} objects", w.objects.len());
                    }
                    Event::Apply(obj) => {
                        if let Some((k, v)) = self.object(i, obj) {
                            tracing::debug!("watch {what}: {} changed", k.2);
                            self.streams[i].objects.insert(k, v);
                        }
                    }
                    Event::Delete(obj) => {
                        if let Some((k, _)) = self.object(i, obj) {
                            tracing::debug!("watch {what}: {} deleted", k.2);
                            self.streams[i].objects.remove(&k);
                        }
                    }
                }
            }
        }
    }

    /// The whole set, once every (namespace, kind) has been listed.
    fn current(&self) -> Option<Objects> {
        if !self.streams.iter().all(|w| w.listed) {
            return None;
        }
        let mut all = Objects::new();
        for w in &self.streams {
            all.extend(w.objects.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        Some(all)
    }

    /// Waits for the next complete set that differs from the last one returned. Cancel-safe:
    /// an event is handled in full once taken from the streams.
    pub async fn next_change(&mut self) -> Objects {
        loop {
            let Some((i, event)) = self.events.next().await else {
                // The watcher streams never end; should they, wait forever with the set in
                // force rather than spin.
                std::future::pending::<()>().await;
                continue;
            };
            self.handle(i, event);
            // Take what else is ready, so that a burst (a relist) is published once.
            while let Some(Some((i, event))) =
                futures_util::FutureExt::now_or_never(self.events.next())
            {
                self.handle(i, event);
            }
            if let Some(set) = self.current()
                && self.last_returned.as_ref() != Some(&set)
            {
                self.last_returned = Some(set.clone());
                return set;
            }
        }
    }

    fn last_error(&self) -> Option<String> {
        self.status().last_error.as_ref().map(|(_, e)| e.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// Start and run

/// The cluster source, started: its set is in the merge; [`Started::spawn`] keeps it current.
pub struct Started {
    watch: ClusterWatch,
    in_force: Objects,
    config: KubernetesConfig,
}

/// Lists the cluster's policy (waiting up to `syncTimeout`), else loads the persisted set;
/// with neither, fails: an agent must not start without the cluster's policy.
pub async fn start(
    cfg: &AgentConfig,
    k: &KubernetesConfig,
    merge: &Merge,
) -> anyhow::Result<Started> {
    let mut watch = ClusterWatch::new(cfg, k).await?;
    let info = |server: &str| StateInfo {
        server: server.to_string(),
        namespaces: k.namespaces.clone(),
        saved_at_unix: unix(SystemTime::now()),
    };
    let in_force = match tokio::time::timeout(k.sync_timeout, watch.next_change()).await {
        Ok(set) => {
            tracing::info!(
                "cluster policy: {} resources listed from {} in {}",
                set.len(),
                watch.server,
                k.namespaces.join(", ")
            );
            let persisted = {
                let (path, set, info) = (k.state_file.clone(), set.clone(), info(&watch.server));
                tokio::task::spawn_blocking(move || persist(&path, &set, &info)).await
            };
            match persisted {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(
                        "cannot persist the cluster policy to {}: {e}; a restart without the API \
                         server would refuse to start",
                        k.state_file.display()
                    );
                    watch.status().last_persist_error = Some(e.to_string());
                }
                Err(e) => tracing::error!("persisting the cluster policy: {e}"),
            }
            set
        }
        Err(_) => {
            let why = watch
                .last_error()
                .unwrap_or_else(|| "no complete answer".to_string());
            let state = {
                let (path, ns) = (k.state_file.clone(), k.namespaces.clone());
                tokio::task::spawn_blocking(move || read_state(&path, &ns)).await?
            };
            match state {
                Ok(Some((set, saved))) => {
                    tracing::error!(
                        "the Kubernetes API server {} did not answer within {:?} ({why}): \
                         ENFORCING THE PERSISTED CLUSTER POLICY from {} ({} resources, saved {} s \
                         ago) until it answers",
                        watch.server,
                        k.sync_timeout,
                        k.state_file.display(),
                        set.len(),
                        unix(SystemTime::now()).saturating_sub(saved.saved_at_unix)
                    );
                    let mut st = watch.status();
                    st.from = InForceFrom::StateFile;
                    st.state_saved_at = Some(saved.saved_at_unix);
                    drop(st);
                    set
                }
                Ok(None) => anyhow::bail!(
                    "refusing to start: the Kubernetes API server {} did not answer within {:?} \
                     ({why}) and there is no persisted cluster policy in {} (policy.kubernetes.\
                     stateFile); starting without the cluster's policy could leave the workload \
                     open. Make the API server reachable (docs/kubernetes.md has the RBAC the \
                     agent needs), or raise policy.kubernetes.syncTimeout",
                    watch.server,
                    k.sync_timeout,
                    k.state_file.display()
                ),
                Err(e) => anyhow::bail!(
                    "refusing to start: the Kubernetes API server {} did not answer within {:?} \
                     ({why}) and the persisted cluster policy cannot be used: {e:#}",
                    watch.server,
                    k.sync_timeout
                ),
            }
        }
    };
    {
        let mut st = watch.status();
        st.resources = in_force.len();
        st.applied_at = SystemTime::now();
    }
    merge.set_cluster(ClusterResources {
        resources: to_resources(&in_force),
        sources: source_lines(k, &watch.server),
    });
    Ok(Started {
        watch,
        in_force,
        config: k.clone(),
    })
}

impl Started {
    /// Publishes the status for `/config_dump` and starts the watch task.
    pub fn spawn(
        self,
        handle: Arc<PolicyHandle>,
        inputs: PolicyInputs,
        metrics: Arc<Metrics>,
    ) -> tokio::task::JoinHandle<()> {
        handle.set_cluster_status(Some(self.watch.status().json()));
        tokio::spawn(run(self, handle, inputs, metrics))
    }
}

async fn run(
    started: Started,
    handle: Arc<PolicyHandle>,
    inputs: PolicyInputs,
    metrics: Arc<Metrics>,
) {
    let Started {
        mut watch,
        mut in_force,
        config: k,
    } = started;
    let Some(merge) = inputs.cluster.clone() else {
        return;
    };
    let shared = Shared {
        server: watch.server.clone(),
        status: watch.status.clone(),
    };
    // A removal of every cluster policy waiting out REMOVAL_SETTLE.
    let mut pending: Option<(Objects, Instant, SystemTime)> = None;
    let mut status_tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let deadline = pending
            .as_ref()
            .map(|(_, at, _)| tokio::time::Instant::from_std(*at + settle::REMOVAL_SETTLE));
        let candidate = tokio::select! {
            set = watch.next_change() => set,
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => match pending.take() {
                Some((set, _, _)) => {
                    handle.set_pending(None);
                    apply(&shared, &k, &merge, &handle, &inputs, &metrics, &mut in_force, set, true).await;
                    continue;
                }
                None => continue,
            },
            _ = status_tick.tick() => {
                handle.set_cluster_status(Some(watch.status().json()));
                continue;
            }
        };
        if candidate == in_force {
            if pending.take().is_some() {
                handle.set_pending(None);
            }
            // Listed again after a start from the state file: now from the API server.
            let fresh = watch.status().from == InForceFrom::StateFile;
            if fresh {
                tracing::info!(
                    "the Kubernetes API server {} answered: its policy is the persisted one",
                    watch.server
                );
                watch.status().from = InForceFrom::ApiServer;
                persist_logged(&shared, &k, &in_force).await;
            }
            continue;
        }
        if candidate.is_empty() && !in_force.is_empty() {
            if pending.is_none() {
                tracing::warn!(
                    "the cluster now holds none of the {} policies in force; applying it only if \
                     it still holds none after {} s",
                    in_force.len(),
                    settle::REMOVAL_SETTLE.as_secs()
                );
                let since = SystemTime::now();
                handle.set_pending(Some(PendingChange {
                    since,
                    removal: true,
                    detail: format!(
                        "the cluster removed every policy ({} resources in force); applied once \
                         it has held none for {} s",
                        in_force.len(),
                        settle::REMOVAL_SETTLE.as_secs()
                    ),
                }));
                pending = Some((candidate, Instant::now(), since));
            }
            continue;
        }
        if pending.take().is_some() {
            handle.set_pending(None);
        }
        apply(
            &shared,
            &k,
            &merge,
            &handle,
            &inputs,
            &metrics,
            &mut in_force,
            candidate,
            false,
        )
        .await;
        handle.set_cluster_status(Some(watch.status().json()));
    }
}

/// What the apply steps share with the watch (the watch itself is not `Sync`).
#[derive(Clone)]
struct Shared {
    server: String,
    status: Arc<Mutex<Status>>,
}

impl Shared {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn persist_logged(watch: &Shared, k: &KubernetesConfig, set: &Objects) {
    let (path, set2) = (k.state_file.clone(), set.clone());
    let info = StateInfo {
        server: watch.server.clone(),
        namespaces: k.namespaces.clone(),
        saved_at_unix: unix(SystemTime::now()),
    };
    let r = tokio::task::spawn_blocking(move || persist(&path, &set2, &info)).await;
    let err = match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(e) => Some(e.to_string()),
    };
    if let Some(e) = &err {
        tracing::error!(
            "cannot persist the cluster policy to {}: {e}; a restart without the API server \
             would use an older set",
            k.state_file.display()
        );
    }
    watch.status().last_persist_error = err;
}

#[allow(clippy::too_many_arguments)]
async fn apply(
    watch: &Shared,
    k: &KubernetesConfig,
    merge: &Arc<Merge>,
    handle: &Arc<PolicyHandle>,
    inputs: &PolicyInputs,
    metrics: &Metrics,
    in_force: &mut Objects,
    set: Objects,
    removal: bool,
) {
    let cluster = ClusterResources {
        resources: to_resources(&set),
        sources: source_lines(k, &watch.server),
    };
    let published = {
        let (merge, handle, inputs) = (merge.clone(), handle.clone(), inputs.clone());
        tokio::task::spawn_blocking(move || merge.publish_cluster(&handle, &inputs, cluster)).await
    };
    let labels = |result| outrigger_proxy::metrics::ReloadLabels {
        source: "kubernetes",
        result,
    };
    match published {
        Ok(Ok(p)) => {
            metrics
                .reloads
                .get_or_create(&labels(if p.clean { "success" } else { "partial" }))
                .inc();
            if removal {
                tracing::warn!(
                    version = p.version,
                    "cluster policy updated: every cluster policy removed (it held for {} s, so it \
                     is taken as deliberate)",
                    settle::REMOVAL_SETTLE.as_secs()
                );
            } else {
                tracing::info!(
                    version = p.version,
                    "cluster policy updated: {} resources",
                    set.len()
                );
            }
            *in_force = set;
            {
                let mut st = watch.status();
                st.from = InForceFrom::ApiServer;
                st.resources = in_force.len();
                st.applied_at = SystemTime::now();
            }
            persist_logged(watch, k, in_force).await;
        }
        Ok(Err(e)) => {
            metrics.reloads.get_or_create(&labels("error")).inc();
            tracing::error!(
                "cluster policy update failed; the previous policy stays in force:\n{e}"
            );
            handle.record_failure(e);
        }
        Err(e) => tracing::error!("cluster policy update task failed: {e}"),
    }
}

/// For `outrigger check`: the persisted cluster policy, the agent's last good set.
pub fn for_check(k: &KubernetesConfig, merge: &Merge) -> anyhow::Result<Option<StateInfo>> {
    let Some((set, info)) = read_state(&k.state_file, &k.namespaces)? else {
        return Ok(None);
    };
    merge.set_cluster(ClusterResources {
        resources: to_resources(&set),
        sources: source_lines(k, &info.server),
    });
    Ok(Some(info))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(kind: &str, name: &str, rv: &str, spec: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": kind,
            "metadata": {
                "name": name, "namespace": "legacy", "resourceVersion": rv,
                "uid": "0f0e", "generation": 1,
                "creationTimestamp": "2024-05-01T10:00:00Z",
            },
            "spec": spec,
        })
    }

    /// Objects go through the files' parser as JSON and are named `cluster:…` without a line;
    /// an invalid one is refused alone with its field path.
    #[test]
    fn objects_parse_as_json_and_are_named_by_the_cluster() {
        let mut set = Objects::new();
        set.insert(
            ("legacy".into(), "AuthorizationPolicy".into(), "deny".into()),
            obj(
                "AuthorizationPolicy",
                "deny",
                "42",
                serde_json::json!({"action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/intruder"]}}]}]}),
            ),
        );
        set.insert(
            ("legacy".into(), "AuthorizationPolicy".into(), "bad".into()),
            obj(
                "AuthorizationPolicy",
                "bad",
                "43",
                serde_json::json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["GET"], "bogus": 1}}]}]}),
            ),
        );
        let rs = to_resources(&set);
        assert_eq!(rs.len(), 2);
        let good = rs.iter().find(|r| r.name == "deny").unwrap();
        assert!(good.refusal().is_none(), "{good:?}");
        assert_eq!(
            good.source.to_string(),
            "cluster:legacy/AuthorizationPolicy/deny (resourceVersion 42)"
        );
        let bad = rs.iter().find(|r| r.name == "bad").unwrap();
        let err = bad.refusal().expect("refused").error.to_string();
        assert!(
            err.starts_with(
                "cluster:legacy/AuthorizationPolicy/bad (resourceVersion 43): spec.rules[0]"
            ),
            "{err}"
        );
    }

    #[test]
    fn the_state_file_round_trips_and_filters_namespaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert!(read_state(&path, &["legacy".into()]).unwrap().is_none());
        let mut set = Objects::new();
        set.insert(
            ("legacy".into(), "PeerAuthentication".into(), "pa".into()),
            obj(
                "PeerAuthentication",
                "pa",
                "7",
                serde_json::json!({"mtls": {"mode": "STRICT"}}),
            ),
        );
        let info = StateInfo {
            server: "https://k8s:6443".into(),
            namespaces: vec!["legacy".into()],
            saved_at_unix: 5,
        };
        persist(&path, &set, &info).unwrap();
        let (back, info2) = read_state(&path, &["legacy".into()]).unwrap().unwrap();
        assert_eq!(back, set);
        assert_eq!(info2.saved_at_unix, 5);
        let (other, _) = read_state(&path, &["elsewhere".into()]).unwrap().unwrap();
        assert!(other.is_empty());
        // The state file is a List the policy files' parser reads as well.
        let text = std::fs::read_to_string(&path).unwrap();
        let rs = outrigger_policy::parse_documents("state.json", &text).unwrap();
        assert_eq!(rs.len(), 1);
        std::fs::write(&path, "{not json").unwrap();
        assert!(read_state(&path, &["legacy".into()]).is_err());
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_maximum() {
        let mut b = Backoff::new(Duration::from_secs(4), 3);
        let waits: Vec<Duration> = (&mut b).take(6).collect();
        assert!(waits[0] >= Duration::from_millis(250) && waits[0] <= Duration::from_millis(500));
        assert!(waits[5] >= Duration::from_secs(2) && waits[5] <= Duration::from_secs(4));
        kube::runtime::utils::Backoff::reset(&mut b);
        assert!(b.next().unwrap() <= Duration::from_millis(500));
    }
}
