//! `outrigger lint` through the real binary: one resource per finding, a clean set with none,
//! the published policies with the findings they deserve, and an agent configuration.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn testdata(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(p)
}

fn lint(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(BIN)
        .arg("lint")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn ids(json: &str) -> Vec<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["id"].as_str().unwrap().to_string(),
                Path::new(f["file"].as_str().unwrap())
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn each_fixture_gives_its_finding_and_the_clean_set_none() {
    let dir = testdata("lint/findings");
    let (code, out) = lint(&[dir.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, 1, "{out}");
    let found = ids(&out);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let want = name[..5].to_ascii_uppercase();
        assert!(
            found.iter().any(|(id, f)| *id == want && *f == name),
            "{name} should give {want}: {found:?}"
        );
    }
    // The namespace has no allow-nothing policy either.
    assert!(found.iter().any(|(id, _)| id == "OR004"), "{found:?}");

    let (code, out) = lint(&[testdata("lint/clean").to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 finding(s)"), "{out}");
}

/// SARIF 2.1.0 as CI systems read it: the tool's rules and one result per finding with a
/// file and line.
#[test]
fn sarif_output() {
    let (code, out) = lint(&[
        testdata("lint/findings").to_str().unwrap(),
        "--format",
        "sarif",
    ]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["version"], "2.1.0");
    let run = &v["runs"][0];
    assert!(run["tool"]["driver"]["rules"].as_array().unwrap().len() >= 10);
    let results = run["results"].as_array().unwrap();
    assert!(results.len() >= 7, "{out}");
    let r = results
        .iter()
        .find(|r| r["ruleId"] == "OR005")
        .expect("the PERMISSIVE finding");
    assert_eq!(r["level"], "warning");
    let loc = &r["locations"][0]["physicalLocation"];
    assert!(
        loc["artifactLocation"]["uri"]
            .as_str()
            .unwrap()
            .ends_with("or005-permissive.yaml")
    );
    assert_eq!(loc["region"]["startLine"], 1);
    // --fail-on error: warnings alone do not fail.
    let (code, _) = lint(&[
        testdata("lint/findings/or005-permissive.yaml")
            .to_str()
            .unwrap(),
        "--fail-on",
        "error",
    ]);
    assert_eq!(code, 0);
}

/// The published example policies, with the findings they deserve: the PERMISSIVE namespace,
/// DISABLE on ports, attributes istiod rejects, a CUSTOM provider that is not declared. The
/// RequestAuthentication in `api` is *not* flagged: the policy beside it requires token claims.
#[test]
fn published_policies_get_the_findings_they_deserve() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../outrigger-policy/tests/fixtures/published-policies");
    let (code, out) = lint(&[dir.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, 1, "{out}");
    let found = ids(&out);
    let has = |id: &str, prefix: &str| found.iter().any(|(i, f)| i == id && f.starts_with(prefix));
    assert!(has("OR005", "03-"), "{found:?}");
    assert!(has("OR005", "04-"), "{found:?}");
    assert!(
        has("OR001", "06-") && has("OR001", "07-") && has("OR001", "08-"),
        "{found:?}"
    );
    assert!(has("OR010", "14-"), "{found:?}");
    assert!(!has("OR006", "12-"), "{found:?}");
}

/// With the agent configuration: an HTTP rule applying to a `tcp` listener, an admin listener
/// off loopback; a path that cannot be read is exit status 3.
#[test]
fn agent_configuration_checks() {
    let mesh = Mesh::new();
    mesh.policy(
        "authz.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-only, namespace: legacy}
spec:
  rules:
  - to: [{operation: {paths: [\"/api/*\"]}}]
",
    );
    mesh.policy("pa.yaml", MESH_STRICT);
    // Two CUSTOM policies: one names the provider the configuration declares, one does not.
    for (name, provider) in [("ext-declared", "ext"), ("ext-missing", "missing")] {
        mesh.policy(
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: legacy}}
spec:
  action: CUSTOM
  provider: {{name: {provider}}}
  rules:
  - to: [{{operation: {{paths: [\"/admin/*\"]}}}}]
"
            ),
        );
    }
    let providers = "extensionProviders:
- name: ext
  envoyExtAuthzHttp: {service: ext-authz.legacy.svc.cluster.local, port: 8000}
";
    let cfg = mesh
        .config(
            &[("db", "127.0.0.1:5432".parse().unwrap(), "tcp")],
            providers,
        )
        .replace(
            "admin:\n  listen: 127.0.0.1:0",
            "admin:\n  listen: 0.0.0.0:15000",
        );
    let path = mesh.dir().join("agent.yaml");
    std::fs::write(&path, cfg).unwrap();
    let (code, out) = lint(&["--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("OR007") && out.contains("tcp listener `db`"),
        "{out}"
    );
    assert!(
        out.contains("OR008") && out.contains("admin.listen is 0.0.0.0:15000"),
        "{out}"
    );
    assert!(!out.contains("OR004"), "an ALLOW policy applies: {out}");
    assert!(
        out.contains("provider `missing` is not declared") && !out.contains("provider `ext`"),
        "only the CUSTOM policy whose provider is not declared is reported: {out}"
    );

    let (code, out) = lint(&["/no/such/dir"]);
    assert_eq!(code, 3, "{out}");
}
