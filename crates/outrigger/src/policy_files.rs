//! Istio policy from files and directories: load, validate, build a snapshot, and reload it
//! when the files change. In Istio each resource stands alone: a resource istiod would reject
//! (or a file that cannot be read) is refused alone, logged with file:line and reason, listed
//! in `/config_dump` and `outrigger check`, and replaced by its fail-closed stand-in
//! (docs/policy.md, "Refused resources"); every valid resource loads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outrigger_policy::{PolicyOptions, Resource, Snapshot, Workload};
use outrigger_proxy::{Metrics, PolicyHandle, PolicyState};

use crate::config::AgentConfig;

/// The policy inputs fixed by the agent configuration.
#[derive(Clone)]
pub struct PolicyInputs {
    pub paths: Vec<PathBuf>,
    pub workload: Workload,
    pub options: PolicyOptions,
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
                // No external authorizer client exists yet: every CUSTOM policy's provider is
                // unknown, so what it matches is denied (Istio's rule for an undefined
                // provider) instead of being allowed unchecked.
                extension_providers: Vec::new(),
            },
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

/// Reads every policy file. Only a policy path that cannot be listed is an error; a document
/// that cannot be loaded, or a file that cannot be read, becomes a refused resource.
pub fn read_resources(paths: &[PathBuf]) -> Result<LoadedResources, String> {
    let files = collect_files(paths)?;
    let mut resources = Vec::new();
    for f in &files {
        let name = f.display().to_string();
        match std::fs::read_to_string(f) {
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
                    reason: format!("cannot read: {e}"),
                },
            )),
        }
    }
    Ok(LoadedResources { files, resources })
}

/// Reads, validates and compiles the policy.
pub fn load(inputs: &PolicyInputs, version: u64) -> Result<PolicyState, String> {
    let loaded = read_resources(&inputs.paths)?;
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
    Ok(PolicyState {
        snapshot,
        sources: loaded
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect(),
        version,
        loaded_at: SystemTime::now(),
    })
}

/// Polls the policy files and publishes a new snapshot when they change. Polling (not inotify)
/// works the same on Linux, Windows and network shares, and catches ConfigMap symlink swaps.
pub async fn watch(
    handle: Arc<PolicyHandle>,
    inputs: PolicyInputs,
    interval: Duration,
    metrics: Arc<Metrics>,
) {
    let mut seen = fingerprint(&inputs.paths);
    let mut version = handle.load().version;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = fingerprint(&inputs.paths);
        if now == seen {
            continue;
        }
        seen = now;
        let inputs2 = inputs.clone();
        let next = version + 1;
        // Parsing and compiling happen off the async workers.
        let result = tokio::task::spawn_blocking(move || load(&inputs2, next)).await;
        match result {
            Ok(Ok(state)) => {
                version = next;
                handle.publish(state);
                metrics
                    .reloads
                    .get_or_create(&outrigger_proxy::metrics::ReloadLabels {
                        source: "policy",
                        result: "success",
                    })
                    .inc();
                tracing::info!(version, "policy reloaded");
            }
            Ok(Err(e)) => {
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
            Err(e) => tracing::error!("policy reload task failed: {e}"),
        }
    }
}
