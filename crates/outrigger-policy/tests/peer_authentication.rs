//! PeerAuthentication resolution: levels, inheritance, port-level settings, oldest wins.

use std::collections::BTreeMap;

use outrigger_policy::*;

fn pa(ns: &str, name: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{body}---\n"
    )
}

fn pa_ts(ns: &str, name: &str, ts: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\n  creationTimestamp: \"{ts}\"\nspec:\n{body}---\n"
    )
}

fn workload() -> Workload {
    Workload {
        namespace: "shop".into(),
        labels: BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            ("version".to_string(), "v1".to_string()),
        ]),
    }
}

fn snapshot_with(yaml: &str, default: MtlsMode) -> Snapshot {
    let rs = parse_documents("pa.yaml", yaml).unwrap();
    let opts = PolicyOptions {
        default_mtls_mode: default,
        ..PolicyOptions::default()
    };
    Snapshot::build(&rs, &workload(), &opts).unwrap()
}

fn snapshot(yaml: &str) -> Snapshot {
    snapshot_with(yaml, MtlsMode::Permissive)
}

const STRICT: &str = "  mtls: {mode: STRICT}\n";
const PERMISSIVE: &str = "  mtls: {mode: PERMISSIVE}\n";
const DISABLE: &str = "  mtls: {mode: DISABLE}\n";
const UNSET: &str = "  mtls: {mode: UNSET}\n";
const EMPTY: &str = "  {}\n";
const SEL: &str = "  selector: {matchLabels: {app: web}}\n";
const SEL_OTHER: &str = "  selector: {matchLabels: {app: db}}\n";

type Case = (
    &'static str,
    String,
    MtlsMode,
    u16,
    MtlsMode,
    Option<&'static str>,
);

#[test]
fn levels_and_inheritance_table() {
    use MtlsMode::*;
    // (description, yaml, default, port, expected mode, expected source)
    let table: Vec<Case> = vec![
        (
            "no policy: default",
            String::new(),
            Strict,
            80,
            Strict,
            None,
        ),
        (
            "no policy: default permissive",
            String::new(),
            Permissive,
            80,
            Permissive,
            None,
        ),
        (
            "mesh",
            pa("istio-system", "m", STRICT),
            Permissive,
            80,
            Strict,
            Some("istio-system/m"),
        ),
        (
            "mesh UNSET: default",
            pa("istio-system", "m", UNSET),
            Strict,
            80,
            Strict,
            None,
        ),
        (
            "mesh empty spec: default",
            pa("istio-system", "m", EMPTY),
            Disable,
            80,
            Disable,
            None,
        ),
        (
            "namespace overrides mesh",
            pa("istio-system", "m", STRICT) + &pa("shop", "nsp", PERMISSIVE),
            Strict,
            80,
            Permissive,
            Some("shop/nsp"),
        ),
        (
            "namespace UNSET inherits mesh",
            pa("istio-system", "m", DISABLE) + &pa("shop", "nsp", UNSET),
            Strict,
            80,
            Disable,
            Some("istio-system/m"),
        ),
        (
            "other namespace is ignored",
            pa("istio-system", "m", PERMISSIVE) + &pa("other", "nsp", DISABLE),
            Strict,
            80,
            Permissive,
            Some("istio-system/m"),
        ),
        (
            "workload overrides namespace",
            pa("shop", "nsp", PERMISSIVE) + &pa("shop", "w", &format!("{SEL}{STRICT}")),
            Permissive,
            80,
            Strict,
            Some("shop/w"),
        ),
        (
            "workload UNSET inherits namespace",
            pa("istio-system", "m", STRICT) + &pa("shop", "nsp", DISABLE) + &pa("shop", "w", SEL),
            Strict,
            80,
            Disable,
            Some("shop/nsp"),
        ),
        (
            "workload UNSET, namespace UNSET: mesh",
            pa("istio-system", "m", PERMISSIVE)
                + &pa("shop", "nsp", UNSET)
                + &pa("shop", "w", &format!("{SEL}{UNSET}")),
            Strict,
            80,
            Permissive,
            Some("istio-system/m"),
        ),
        (
            "selector mismatch ignored",
            pa("shop", "nsp", PERMISSIVE) + &pa("shop", "w", &format!("{SEL_OTHER}{DISABLE}")),
            Strict,
            80,
            Permissive,
            Some("shop/nsp"),
        ),
        (
            "selector in root namespace ignored (sidecar behaviour)",
            pa("istio-system", "w", &format!("{SEL}{DISABLE}")),
            Strict,
            80,
            Strict,
            None,
        ),
        (
            "port-level override",
            pa(
                "shop",
                "w",
                &format!("{SEL}{STRICT}  portLevelMtls:\n    8080: {{mode: DISABLE}}\n"),
            ),
            Permissive,
            8080,
            Disable,
            Some("shop/w"),
        ),
        (
            "port-level does not touch other ports",
            pa(
                "shop",
                "w",
                &format!("{SEL}{STRICT}  portLevelMtls:\n    8080: {{mode: DISABLE}}\n"),
            ),
            Permissive,
            8081,
            Strict,
            Some("shop/w"),
        ),
        (
            "port-level UNSET inherits the workload policy's mode",
            pa(
                "shop",
                "w",
                &format!("{SEL}{DISABLE}  portLevelMtls:\n    8080: {{mode: UNSET}}\n"),
            ),
            Strict,
            8080,
            Disable,
            Some("shop/w"),
        ),
        (
            "port-level UNSET inherits through the chain (workload UNSET -> namespace)",
            pa("shop", "nsp", PERMISSIVE)
                + &pa(
                    "shop",
                    "w",
                    &format!(
                        "{SEL}  portLevelMtls:\n    8080: {{mode: UNSET}}\n    9090: {{mode: STRICT}}\n"
                    ),
                ),
            Disable,
            8080,
            Permissive,
            Some("shop/nsp"),
        ),
        (
            "port-level with workload mode unset: other port falls back to namespace",
            pa("shop", "nsp", PERMISSIVE)
                + &pa(
                    "shop",
                    "w",
                    &format!("{SEL}  portLevelMtls:\n    9090: {{mode: STRICT}}\n"),
                ),
            Disable,
            8080,
            Permissive,
            Some("shop/nsp"),
        ),
        (
            "port-level STRICT with nothing else",
            pa(
                "shop",
                "w",
                &format!("{SEL}  portLevelMtls:\n    9090: {{mode: STRICT}}\n"),
            ),
            Disable,
            9090,
            Strict,
            Some("shop/w"),
        ),
    ];
    for (what, yaml, default, port, mode, source) in table {
        let snap = snapshot_with(&yaml, default);
        let eff = snap.mtls_mode(port);
        assert_eq!(eff.mode, mode, "{what}");
        assert_eq!(eff.source.as_deref(), source, "{what}");
    }
}

#[test]
fn workload_in_root_namespace_uses_mesh_policy() {
    let yaml = pa("istio-system", "m", STRICT);
    let rs = parse_documents("pa.yaml", &yaml).unwrap();
    let w = Workload {
        namespace: "istio-system".into(),
        labels: BTreeMap::new(),
    };
    let snap = Snapshot::build(&rs, &w, &PolicyOptions::default()).unwrap();
    assert_eq!(snap.mtls_mode(1).mode, MtlsMode::Strict);
    assert_eq!(snap.applied()[0].scope, PolicyScope::Mesh);
}

#[test]
fn custom_root_namespace() {
    let yaml = pa("istio-config", "m", DISABLE) + &pa("istio-system", "x", STRICT);
    let rs = parse_documents("pa.yaml", &yaml).unwrap();
    let opts = PolicyOptions {
        root_namespace: "istio-config".into(),
        ..PolicyOptions::default()
    };
    let snap = Snapshot::build(&rs, &workload(), &opts).unwrap();
    assert_eq!(snap.mtls_mode(1).mode, MtlsMode::Disable);
    assert_eq!(snap.ignored()[0].reason, IgnoreReason::OtherNamespace);
}

#[test]
fn oldest_wins_by_timestamp_then_name() {
    // By timestamp: b is older although it comes later in the file.
    let yaml = pa_ts("shop", "a", "2024-05-02T00:00:00Z", STRICT)
        + &pa_ts("shop", "b", "2024-05-01T00:00:00Z", DISABLE);
    let snap = snapshot(&yaml);
    assert_eq!(snap.mtls_mode(1).source.as_deref(), Some("shop/b"));
    assert_eq!(
        snap.ignored()[0].reason,
        IgnoreReason::ShadowedBy("shop/b".into())
    );
    assert_eq!(snap.ignored()[0].name, "a");

    // Same timestamp (Istio stores seconds): by name, like istiod.
    let yaml = pa_ts("shop", "zz", "2024-05-01T00:00:00Z", STRICT)
        + &pa_ts("shop", "aa", "2024-05-01T00:00:00Z", DISABLE);
    assert_eq!(
        snapshot(&yaml).mtls_mode(1).source.as_deref(),
        Some("shop/aa")
    );

    // No timestamps: by name, whatever the file order.
    for yaml in [
        pa("shop", "beta", STRICT) + &pa("shop", "alpha", DISABLE),
        pa("shop", "alpha", DISABLE) + &pa("shop", "beta", STRICT),
    ] {
        assert_eq!(snapshot(&yaml).mtls_mode(1).mode, MtlsMode::Disable);
    }

    // Workload level: oldest of the matching ones.
    let yaml = pa_ts(
        "shop",
        "w1",
        "2024-05-03T00:00:00Z",
        &format!("{SEL}{STRICT}"),
    ) + &pa_ts(
        "shop",
        "w2",
        "2024-05-02T00:00:00Z",
        &format!("{SEL}{DISABLE}"),
    );
    assert_eq!(snapshot(&yaml).mtls_mode(1).mode, MtlsMode::Disable);

    // Mesh level.
    let yaml = pa_ts("istio-system", "m1", "2024-05-03T00:00:00Z", STRICT)
        + &pa_ts("istio-system", "m2", "2023-05-02T00:00:00+02:00", DISABLE);
    assert_eq!(snapshot(&yaml).mtls_mode(1).mode, MtlsMode::Disable);
}

#[test]
fn applied_and_ignored_report() {
    let yaml = pa("istio-system", "mesh", STRICT)
        + &pa("shop", "ns", PERMISSIVE)
        + &pa("shop", "web", &format!("{SEL}{STRICT}"))
        + &pa("shop", "db", &format!("{SEL_OTHER}{STRICT}"))
        + &pa("other", "x", STRICT)
        + "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n";
    let snap = snapshot(&yaml);
    let applied: Vec<(String, PolicyScope)> =
        snap.applied().iter().map(|a| (a.key(), a.scope)).collect();
    assert_eq!(
        applied,
        vec![
            ("istio-system/mesh".into(), PolicyScope::Mesh),
            ("shop/ns".into(), PolicyScope::Namespace),
            ("shop/web".into(), PolicyScope::Workload),
        ]
    );
    assert!(
        snap.applied()
            .iter()
            .all(|a| a.kind == PolicyKind::PeerAuthentication)
    );
    assert_eq!(snap.applied()[2].source.to_string(), "pa.yaml:17");
    let ignored: Vec<(String, IgnoreReason)> = snap
        .ignored()
        .iter()
        .map(|i| {
            (
                format!("{} {}/{}", i.kind, i.namespace, i.name),
                i.reason.clone(),
            )
        })
        .collect();
    assert_eq!(
        ignored,
        vec![
            (
                "PeerAuthentication shop/db".into(),
                IgnoreReason::SelectorMismatch
            ),
            (
                "PeerAuthentication other/x".into(),
                IgnoreReason::OtherNamespace
            ),
            (
                "Service shop/web".into(),
                IgnoreReason::UnsupportedKind {
                    api_version: "v1".into(),
                    kind: "Service".into()
                }
            ),
        ]
    );
    assert!(snap.ignored()[0].reason.to_string().contains("selector"));
}

#[test]
fn mode_display() {
    assert_eq!(MtlsMode::Strict.to_string(), "STRICT");
    assert_eq!(MtlsMode::Permissive.to_string(), "PERMISSIVE");
    assert_eq!(MtlsMode::Disable.to_string(), "DISABLE");
}

#[test]
fn snapshot_is_send_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Snapshot>();
}
