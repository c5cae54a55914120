//! Istio policy from files and directories: load, validate, build a snapshot, and reload it
//! when the files change. In Istio each resource stands alone: a resource istiod would reject
//! (or a file that cannot be read) is refused alone, logged with file:line and reason, listed
//! in `/config_dump` and `outrigger check`, and replaced by its fail-closed stand-in
//! (docs/policy.md, "Refused resources"); every valid resource loads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use outrigger_policy::{PolicyOptions, Resource, Snapshot, Workload};
use outrigger_proxy::{Metrics, PendingChange, PolicyHandle, PolicyState};
use outrigger_tls::settle::{self, Settle};

use crate::config::AgentConfig;

/// The policy inputs fixed by the agent configuration.
#[derive(Clone)]
pub struct PolicyInputs {
    pub paths: Vec<PathBuf>,
    pub workload: Workload,
    pub options: PolicyOptions,
    /// With `policy.kubernetes`: the cluster's resources, merged into every build
    /// (`policy_merge.rs`).
    pub cluster: Option<Arc<crate::policy_merge::Merge>>,
}

impl PolicyInputs {
    pub fn from_config(cfg: &AgentConfig) -> Self {
        PolicyInputs {
            paths: cfg.policy.paths.clone(),
            workload: Workload {
                namespace: cfg.workload.namespace.clone(),
                labels: cfg.workload.labels.clone(),
            },
            options: PolicyOptions {
                root_namespace: cfg.policy.root_namespace.clone(),
                trust_domains: cfg.trust_domains.clone(),
                default_mtls_mode: cfg.policy.default_mtls_mode,
                path_normalization: cfg.policy.path_normalization,
                // The configured `extensionProviders`: a CUSTOM policy naming any other
                // provider denies what it matches (Istio's rule for an undefined provider).
                extension_providers: cfg
                    .extension_providers
                    .iter()
                    .map(|p| p.name.clone())
                    .collect(),
            },
            cluster: cfg
                .policy
                .kubernetes
                .is_some()
                .then(crate::policy_merge::Merge::new),
        }
    }
}

fn is_policy_file(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The policy files under `paths`: files as given, directories' `*.yaml`/`*.yml`/`*.json`
/// (recursively), sorted so load order is stable. A missing path is an error: a typo must not
/// silently mean "no policy".
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
        let rd = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: cannot read directory: {e}", dir.display()))?;
        for entry in rd {
            let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
            let p = entry.path();
            let name = entry.file_name();
            // Editors' and Kubernetes ConfigMap mounts' hidden files (..data, .swp) are not
            // policy.
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            if p.is_dir() {
                walk(&p, out)?;
            } else if is_policy_file(&p) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        let md = std::fs::metadata(p)
            .map_err(|e| format!("{}: policy path cannot be read: {e}", p.display()))?;
        if md.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// A cheap fingerprint of the policy files (names, sizes, modification times) to notice
/// changes without reading every file on every tick.
pub fn fingerprint(paths: &[PathBuf]) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    match collect_files(paths) {
        Ok(files) => files
            .into_iter()
            .map(|f| {
                let md = std::fs::metadata(&f).ok();
                let len = md.as_ref().map(|m| m.len()).unwrap_or(0);
                let mtime = md.and_then(|m| m.modified().ok());
                (f, len, mtime)
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Everything read from the files, before it is compiled for this workload.
pub struct LoadedResources {
    pub files: Vec<PathBuf>,
    pub resources: Vec<Resource>,
}

/// The policy files and their bytes, read once: what the watcher compares to decide that a
/// read is stable is exactly what is then parsed, so a file rewritten between the check and
/// the parse cannot slip in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileContents {
    files: Vec<(PathBuf, Result<Vec<u8>, String>)>,
}

/// Lists the policy files under `paths` and reads each one.
pub fn read_contents(paths: &[PathBuf]) -> Result<FileContents, String> {
    let files = collect_files(paths)?;
    Ok(FileContents {
        files: files
            .into_iter()
            .map(|f| {
                let bytes =
                    std::fs::read(&f).map_err(|e| format!("{}: cannot read: {e}", f.display()));
                (f, bytes)
            })
            .collect(),
    })
}

fn parse_resources(contents: &FileContents) -> Result<LoadedResources, String> {
    let files: Vec<PathBuf> = contents.files.iter().map(|(f, _)| f.clone()).collect();
    let mut resources = Vec::new();
    for (f, bytes) in &contents.files {
        let name = f.display().to_string();
        let text = bytes
            .clone()
            .and_then(|b| String::from_utf8(b).map_err(|e| format!("cannot read: {e}")));
        match text {
            Ok(text) => {
                resources.append(&mut outrigger_policy::parse_documents_lenient(&name, &text))
            }
            Err(e) => resources.push(outrigger_policy::Resource::refused_unknown(
                &name,
                0,
                outrigger_policy::LoadError {
                    location: outrigger_policy::ErrorLocation {
                        file: name.clone(),
                        ..Default::default()
                    },
                    resource: None,
                    reason: e,
                },
            )),
        }
    }
    Ok(LoadedResources { files, resources })
}

/// Every resource in files already read, refused ones included (for `outrigger lint`).
pub fn parse_contents(contents: &FileContents) -> Vec<Resource> {
    parse_resources(contents)
        .map(|l| l.resources)
        .unwrap_or_default()
}

/// Reads, validates and compiles the policy.
pub fn load(inputs: &PolicyInputs, version: u64) -> Result<PolicyState, String> {
    load_contents(inputs, &read_contents(&inputs.paths)?, version)
}

/// Validates and compiles policy files already read (with the cluster's resources in force,
/// when `policy.kubernetes` is set).
pub fn load_contents(
    inputs: &PolicyInputs,
    contents: &FileContents,
    version: u64,
) -> Result<PolicyState, String> {
    let cluster = inputs
        .cluster
        .as_ref()
        .map(|m| m.cluster())
        .unwrap_or_default();
    build(inputs, contents, &cluster, version)
}

/// Validates and compiles policy files already read together with cluster resources.
pub fn build(
    inputs: &PolicyInputs,
    contents: &FileContents,
    cluster: &crate::policy_merge::ClusterResources,
    version: u64,
) -> Result<PolicyState, String> {
    let mut loaded = parse_resources(contents)?;
    if !cluster.resources.is_empty() {
        loaded.resources = crate::policy_merge::merge(loaded.resources, &cluster.resources);
    }
    let snapshot = Snapshot::build(&loaded.resources, &inputs.workload, &inputs.options)
        .map_err(|e| e.to_string())?;
    for i in snapshot.ignored() {
        tracing::debug!(
            "not applied to this workload: {} {}/{} ({}): {}",
            i.kind,
            i.namespace,
            i.name,
            i.source,
            i.reason
        );
    }
    for w in snapshot.warnings() {
        tracing::warn!("policy warning: {w}");
    }
    for r in snapshot.refused() {
        tracing::error!(
            "policy refused: {} {} ({}): {}; {}",
            r.kind,
            r.name,
            r.source,
            r.error,
            r.effect
        );
    }
    for a in snapshot.applied() {
        tracing::info!(
            "in force: {} {} ({}, {})",
            a.kind,
            a.key(),
            a.scope,
            a.source
        );
    }
    // Istio EnvoyFilters: the local rate limit is applied, anything else said out loud.
    let filters = crate::envoy_filter::interpret(
        &loaded.resources,
        &inputs.workload,
        &inputs.options.root_namespace,
    );
    for (what, why) in &filters.ignored {
        tracing::warn!("not applied: {what}: {why}; nothing of it is applied");
    }
    for r in &filters.rate_limits {
        tracing::info!(
            "in force: local rate limit {} ({} tokens, {} per {:?})",
            r.name,
            r.bucket.max_tokens,
            r.bucket.tokens_per_fill,
            r.bucket.fill_interval
        );
    }
    Ok(PolicyState {
        snapshot,
        rate_limits: filters.rate_limits,
        sources: loaded
            .files
            .iter()
            .map(|f| f.display().to_string())
            .chain(cluster.sources.iter().cloned())
            .collect(),
        version,
        loaded_at: SystemTime::now(),
    })
}

/// One read of the policy files: their names, sizes and modification times, and their bytes.
/// Two equal observations mean the files did not change in between (a rewrite of the same
/// bytes still moves the modification time on every file system that records it finely).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    meta: Vec<(PathBuf, u64, Option<SystemTime>)>,
    contents: Result<FileContents, String>,
}

impl Observation {
    /// Reads the files now (blocking file I/O). The metadata is taken first, so that a change
    /// made while the contents are read shows up as a metadata change on the next poll.
    pub fn read(paths: &[PathBuf]) -> Observation {
        let meta = fingerprint(paths);
        Observation {
            meta,
            contents: read_contents(paths),
        }
    }

    pub fn contents(&self) -> Result<&FileContents, &str> {
        self.contents.as_ref().map_err(String::as_str)
    }
}

/// The files that hold at least one resource of a policy state (applied to this workload or
/// not), with how many. Cluster resources are not files: their changes are the cluster
/// watcher's (`kube_policy.rs`).
fn resource_files(state: &PolicyState) -> BTreeMap<&str, usize> {
    let mut files = BTreeMap::new();
    let sources = (state.snapshot.applied().iter().map(|a| &a.source))
        .chain(state.snapshot.ignored().iter().map(|i| &i.source))
        .filter(|s| !s.file.starts_with(crate::policy_merge::CLUSTER_PREFIX));
    for s in sources {
        *files.entry(s.file.as_str()).or_insert(0) += 1;
    }
    files
}

/// Whether `next` removes every policy of `current`, or every policy of one of its files: the
/// shape a truncated file has, so such a change must be stable for longer before it applies.
fn removal(current: &PolicyState, next: &PolicyState) -> Option<String> {
    let before = resource_files(current);
    let after = resource_files(next);
    if before.is_empty() {
        return None;
    }
    if after.is_empty() {
        let n: usize = before.values().sum();
        return Some(format!("removes every policy ({n} resources in force)"));
    }
    let gone: Vec<&str> = before
        .keys()
        .filter(|f| !after.contains_key(*f))
        .copied()
        .collect();
    if gone.is_empty() {
        None
    } else {
        Some(format!("removes every policy of {}", gone.join(", ")))
    }
}

/// Polls the policy files and publishes a new snapshot when they change. Polling (not inotify)
/// works the same on Linux, Windows and network shares, and catches ConfigMap symlink swaps.
///
/// A change is applied only once the files read the same — same bytes, sizes and modification
/// times — on every poll over [`settle::SETTLE`] (re-read every [`settle::SETTLE_POLL`]
/// meanwhile), so a file caught mid-write (truncated, half-written) is never applied. A change
/// that removes every policy, or every policy of a file, must read the same for
/// [`settle::REMOVAL_SETTLE`] and is logged as a warning when applied: an empty policy set
/// allows everything ("If there are no ALLOW policies for the workload, allow the request",
/// Istio AuthorizationPolicy reference), which is exactly what a truncated file looks like.
/// The pending change is shown in `/config_dump` and `/healthz/ready`.
///
/// `initial` is the observation the policy in force was built from.
pub async fn watch(
    handle: Arc<PolicyHandle>,
    inputs: PolicyInputs,
    interval: Duration,
    metrics: Arc<Metrics>,
    initial: Observation,
) {
    // The last observation acted upon: applied, or refused as invalid.
    let mut settled = initial;
    let mut settle: Settle<Observation> = Settle::default();
    let mut pending_since: Option<SystemTime> = None;
    // The compiled candidate for the pending observation, so that it is not rebuilt on every
    // poll while a removal waits out its longer window.
    let mut candidate: Option<(Observation, Result<PolicyState, String>)> = None;
    let mut version = handle.load().version;
    let mut removal_announced = false;
    loop {
        let delay = if settle.is_pending() {
            interval.min(settle::SETTLE_POLL)
        } else {
            interval
        };
        tokio::time::sleep(delay).await;
        let cheap = {
            let paths = inputs.paths.clone();
            tokio::task::spawn_blocking(move || fingerprint(&paths)).await
        };
        let Ok(meta) = cheap else { continue };
        if !settle.is_pending() && meta == settled.meta {
            continue;
        }
        let read = {
            let paths = inputs.paths.clone();
            tokio::task::spawn_blocking(move || Observation::read(&paths)).await
        };
        let Ok(obs) = read else { continue };
        if obs.contents == settled.contents {
            // Touched, or rewritten and back to the bytes in force: nothing to apply.
            settled = obs;
            settle.clear();
            candidate = None;
            pending_since = None;
            removal_announced = false;
            handle.set_pending(None);
            continue;
        }
        let now = Instant::now();
        let Some(held) = settle.observe(obs.clone(), now) else {
            // New content: the clock starts.
            let since = *pending_since.get_or_insert_with(SystemTime::now);
            removal_announced = false;
            handle.set_pending(Some(PendingChange {
                since,
                removal: false,
                detail: format!(
                    "the policy files changed; applied once they read the same for {} ms",
                    settle::SETTLE.as_millis()
                ),
            }));
            continue;
        };
        if held < settle::SETTLE {
            continue;
        }
        if candidate.as_ref().map(|(o, _)| o) != Some(&obs) {
            let inputs2 = inputs.clone();
            let obs2 = obs.clone();
            // The cluster watcher publishes versions too.
            let next = handle.load().version.max(version) + 1;
            // Parsing and compiling happen off the async workers.
            let built = tokio::task::spawn_blocking(move || match obs2.contents() {
                Ok(c) => load_contents(&inputs2, c, next),
                Err(e) => Err(e.to_string()),
            })
            .await;
            match built {
                Ok(r) => candidate = Some((obs.clone(), r)),
                Err(e) => {
                    tracing::error!("policy reload task failed: {e}");
                    continue;
                }
            }
        }
        let Some((_, result)) = candidate.take() else {
            continue;
        };
        match result {
            Ok(state) => {
                let removes = removal(&handle.load(), &state);
                if let Some(what) = &removes
                    && held < settle::REMOVAL_SETTLE
                {
                    if !removal_announced {
                        tracing::warn!(
                            "the policy files changed in a way that {what}; applying it only if \
                             the files still read the same after {} s (a file being rewritten \
                             looks like this)",
                            settle::REMOVAL_SETTLE.as_secs()
                        );
                        removal_announced = true;
                    }
                    handle.set_pending(Some(PendingChange {
                        since: pending_since.unwrap_or_else(SystemTime::now),
                        removal: true,
                        detail: format!(
                            "a change that {what}; applied once the files read the same for \
                             {} s",
                            settle::REMOVAL_SETTLE.as_secs()
                        ),
                    }));
                    candidate = Some((obs, Ok(state)));
                    continue;
                }
                version = state.version;
                let clean = match (&inputs.cluster, obs.contents()) {
                    // Rebuilt under the merge's lock with the cluster's resources in force, so
                    // that a cluster change published meanwhile is not overwritten.
                    (Some(merge), Ok(contents)) => {
                        let (merge, handle2, inputs2) =
                            (merge.clone(), handle.clone(), inputs.clone());
                        let contents = contents.clone();
                        let published = tokio::task::spawn_blocking(move || {
                            merge.publish_files(&handle2, &inputs2, &contents)
                        })
                        .await;
                        match published {
                            Ok(Ok(clean)) => clean,
                            Ok(Err(e)) => {
                                tracing::error!(
                                    "policy reload failed; the previous policy stays in force:\n{e}"
                                );
                                handle.record_failure(e);
                                continue;
                            }
                            Err(e) => {
                                tracing::error!("policy reload task failed: {e}");
                                continue;
                            }
                        }
                    }
                    _ => {
                        let clean = state.snapshot.refused().is_empty();
                        handle.publish(state);
                        clean
                    }
                };
                version = handle.load().version.max(version);
                // A reload that refused some resources applied the rest (each with its
                // fail-closed stand-in): counted apart, so an alert can tell it from a clean one.
                let result = if clean { "success" } else { "partial" };
                metrics
                    .reloads
                    .get_or_create(&outrigger_proxy::metrics::ReloadLabels {
                        source: "policy",
                        result,
                    })
                    .inc();
                match removes {
                    Some(what) => tracing::warn!(
                        version,
                        "policy reloaded: the change {what}; it read the same for {} s, so it \
                         is taken as deliberate",
                        held.as_secs()
                    ),
                    None => tracing::info!(version, "policy reloaded"),
                }
            }
            Err(e) => {
                metrics
                    .reloads
                    .get_or_create(&outrigger_proxy::metrics::ReloadLabels {
                        source: "policy",
                        result: "error",
                    })
                    .inc();
                tracing::error!("policy reload failed; the previous policy stays in force:\n{e}");
                handle.record_failure(e);
            }
        }
        settled = obs;
        settle.clear();
        pending_since = None;
        removal_announced = false;
        handle.set_pending(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DENY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny\n  namespace: legacy\nspec:\n  action: DENY\n  rules: [{}]\n";
    const PA: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n";

    fn state(files: &[(&str, &str)]) -> PolicyState {
        let inputs = PolicyInputs {
            paths: Vec::new(),
            workload: Workload {
                namespace: "legacy".into(),
                labels: Default::default(),
            },
            options: PolicyOptions::default(),
            cluster: None,
        };
        let contents = FileContents {
            files: files
                .iter()
                .map(|(f, t)| (PathBuf::from(f), Ok(t.as_bytes().to_vec())))
                .collect(),
        };
        load_contents(&inputs, &contents, 1).unwrap()
    }

    /// What a truncated file looks like is a removal; adding, keeping or changing policies is
    /// not.
    #[test]
    fn removals_are_recognised() {
        let both = state(&[("a.yaml", PA), ("b.yaml", DENY)]);
        let a_only = state(&[("a.yaml", PA), ("b.yaml", "")]);
        let a_deleted = state(&[("b.yaml", DENY)]);
        let none = state(&[("a.yaml", ""), ("b.yaml", "# nothing\n")]);
        let r = removal(&both, &a_only).unwrap();
        assert!(r.contains("every policy of b.yaml"), "{r}");
        let r = removal(&both, &a_deleted).unwrap();
        assert!(r.contains("every policy of a.yaml"), "{r}");
        let r = removal(&both, &none).unwrap();
        assert!(r.contains("removes every policy (2 resources"), "{r}");
        assert_eq!(removal(&a_only, &both), None);
        assert_eq!(removal(&none, &both), None);
        assert_eq!(removal(&none, &none), None);
        assert_eq!(removal(&both, &both), None);
    }

    /// Equal observations need equal bytes: a read mid-write differs from the finished file.
    #[test]
    fn observations_compare_contents() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.yaml");
        std::fs::write(&f, DENY).unwrap();
        let paths = vec![dir.path().to_path_buf()];
        let full = Observation::read(&paths);
        assert_eq!(full, Observation::read(&paths));
        std::fs::write(&f, &DENY[..10]).unwrap();
        let half = Observation::read(&paths);
        assert_ne!(half.contents, full.contents);
        std::fs::write(&f, DENY).unwrap();
        assert_eq!(Observation::read(&paths).contents, full.contents);
    }
}
