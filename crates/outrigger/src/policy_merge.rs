//! Policy from two sources, merged into one snapshot: the policy files (`policy_files.rs`) and
//! the cluster (`kube_policy.rs`, `policy.kubernetes`). Each source has its own watcher; every
//! change of either is built together with the other source's resources in force, under one
//! lock, so that neither watcher can publish over the other's latest change.
//!
//! Istio identifies a resource by kind, namespace and name: a name present in both sources is
//! one resource, and the file's copy wins (the host's own file is the operator's deliberate,
//! local override, and it does not depend on the network); the cluster's copy is left out and
//! named in a warning.
#![cfg_attr(not(feature = "kubernetes"), allow(dead_code))]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use outrigger_policy::Resource;
use outrigger_proxy::{PolicyHandle, PolicyState};

use crate::policy_files::{FileContents, PolicyInputs};

/// How the names of cluster resources start (`cluster:<namespace>/<kind>/<name>`).
pub const CLUSTER_PREFIX: &str = "cluster:";

/// The cluster's resources in force, parsed (refused ones included, as from files).
#[derive(Debug, Default)]
pub struct ClusterResources {
    pub resources: Vec<Resource>,
    /// What `/config_dump` lists under `policy.files` for the cluster: one line per watched
    /// namespace.
    pub sources: Vec<String>,
}

/// The two sources' inputs in force.
#[derive(Default)]
pub struct Merge {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    cluster: Arc<ClusterResources>,
    /// The policy files' contents in force (`None` until the first load).
    files: Option<FileContents>,
}

/// A resource's identity in Istio: kind, namespace, name (`None` when unknown: a refused
/// document whose kind or name could not be read is never merged away).
fn identity(r: &Resource) -> Option<(String, String, String)> {
    if r.name.is_empty() || r.kind_name() == "unknown kind" {
        return None;
    }
    Some((
        r.kind_name().to_string(),
        r.namespace.clone(),
        r.name.clone(),
    ))
}

/// The file resources followed by the cluster resources that no file resource shadows.
pub fn merge(files: Vec<Resource>, cluster: &[Resource]) -> Vec<Resource> {
    let in_files: BTreeSet<_> = files.iter().filter_map(identity).collect();
    let mut out = files;
    for r in cluster {
        match identity(r) {
            Some(id) if in_files.contains(&id) => {
                let file = out
                    .iter()
                    .find(|f| identity(f).as_ref() == Some(&id))
                    .map(|f| f.source.to_string())
                    .unwrap_or_default();
                tracing::warn!(
                    "{} is not applied: the policy file {file} holds a {} of the same namespace \
                     and name, and the file's wins",
                    r.source,
                    id.0
                );
            }
            _ => out.push(r.clone()),
        }
    }
    out
}

impl Merge {
    pub fn new() -> Arc<Merge> {
        Arc::new(Merge::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the two Arcs half-written.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cluster resources in force.
    pub fn cluster(&self) -> Arc<ClusterResources> {
        self.lock().cluster.clone()
    }

    /// Sets the cluster resources in force before anything is published (start-up).
    pub fn set_cluster(&self, cluster: ClusterResources) {
        self.lock().cluster = Arc::new(cluster);
    }

    /// Records the policy files in force (start-up).
    pub fn set_files(&self, files: FileContents) {
        self.lock().files = Some(files);
    }

    /// Publishes the policy files' new contents with the cluster resources in force
    /// (blocking: parses and compiles). Returns whether no resource was refused.
    pub fn publish_files(
        &self,
        handle: &PolicyHandle,
        inputs: &PolicyInputs,
        files: &FileContents,
    ) -> Result<bool, String> {
        let mut inner = self.lock();
        let version = handle.load().version + 1;
        let state = crate::policy_files::build(inputs, files, &inner.cluster, version)?;
        inner.files = Some(files.clone());
        Ok(publish(handle, state))
    }

    /// Publishes a new set of cluster resources with the policy files in force (blocking).
    /// On error (the snapshot cannot be built) nothing changes.
    pub fn publish_cluster(
        &self,
        handle: &PolicyHandle,
        inputs: &PolicyInputs,
        cluster: ClusterResources,
    ) -> Result<PublishedCluster, String> {
        let mut inner = self.lock();
        let version = handle.load().version + 1;
        let files = inner.files.clone().unwrap_or_default();
        let state = crate::policy_files::build(inputs, &files, &cluster, version)?;
        inner.cluster = Arc::new(cluster);
        let clean = publish(handle, state);
        Ok(PublishedCluster { version, clean })
    }
}

/// What [`Merge::publish_cluster`] published.
#[derive(Debug, Clone, Copy)]
pub struct PublishedCluster {
    pub version: u64,
    /// No resource was refused.
    pub clean: bool,
}

fn publish(handle: &PolicyHandle, state: PolicyState) -> bool {
    let clean = state.snapshot.refused().is_empty();
    handle.publish(state);
    clean
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny(source: &str, name: &str) -> Vec<Resource> {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: legacy}}\nspec: {{action: DENY, rules: [{{}}]}}\n"
        );
        outrigger_policy::parse_documents(source, &text).unwrap()
    }

    /// Istio identifies a resource by kind, namespace and name: the file's copy wins.
    #[test]
    fn the_file_wins_over_the_cluster_for_the_same_name() {
        let files = deny("deny.yaml", "a");
        let mut cluster = deny(
            "cluster:legacy/AuthorizationPolicy/a (resourceVersion 1)",
            "a",
        );
        cluster.extend(deny(
            "cluster:legacy/AuthorizationPolicy/b (resourceVersion 2)",
            "b",
        ));
        let merged = merge(files, &cluster);
        let names: Vec<String> = merged
            .iter()
            .map(|r| format!("{} {}", r.name, r.source.file))
            .collect();
        assert_eq!(
            names,
            [
                "a deny.yaml",
                "b cluster:legacy/AuthorizationPolicy/b (resourceVersion 2)"
            ]
        );
    }
}
