//! Loader: multi-document files, Lists, other kinds, and located errors.

use outrigger_policy::*;

fn err(yaml: &str) -> String {
    parse_documents("policies/p.yaml", yaml)
        .expect_err("should fail")
        .to_string()
}

#[test]
fn multi_document_and_other_kinds() {
    let yaml = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec: {replicas: 2, whatever: [1, 2]}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: shop
spec:
  mtls:
    mode: STRICT
---
# empty document is skipped
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-all
spec:
  rules:
  - {}
"#;
    let rs = parse_documents("f.yaml", yaml).unwrap();
    assert_eq!(rs.len(), 3);
    assert!(matches!(&rs[0].kind, ResourceKind::Other { kind, .. } if kind == "Deployment"));
    assert_eq!(rs[0].source.line, 2);
    assert_eq!(rs[1].kind_name(), "PeerAuthentication");
    assert_eq!(rs[1].key(), "shop/strict");
    assert_eq!(rs[1].source.to_string(), "f.yaml:7");
    // No namespace: `default`, as kubectl would apply it.
    assert_eq!(rs[2].namespace, "default");
    assert_eq!(rs[2].api_version, "security.istio.io/v1");
    let ResourceKind::AuthorizationPolicy(spec) = &rs[2].kind else {
        panic!("not an AuthorizationPolicy")
    };
    assert_eq!(spec.rules.len(), 1);
    assert_eq!(spec.action, Action::Allow);
}

#[test]
fn kubectl_list_output_with_server_fields() {
    let yaml = r#"apiVersion: v1
items:
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"security.istio.io/v1"}
    creationTimestamp: "2024-05-01T10:00:00Z"
    generation: 1
    managedFields:
    - apiVersion: security.istio.io/v1
      fieldsType: FieldsV1
      fieldsV1: {"f:spec": {}}
      manager: kubectl
      operation: Update
    name: default
    namespace: istio-system
    resourceVersion: "1234"
    uid: 0a4c8b4e-0000-0000-0000-000000000000
  spec:
    mtls:
      mode: PERMISSIVE
  status: {}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: x, namespace: other}
  data: {a: b}
kind: List
metadata:
  resourceVersion: ""
"#;
    let rs = parse_documents("list.yaml", yaml).unwrap();
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[0].key(), "istio-system/default");
    assert_eq!(rs[0].source.line, 3);
    assert_eq!(
        rs[0].creation_timestamp.as_deref(),
        Some("2024-05-01T10:00:00Z")
    );
    assert!(matches!(&rs[1].kind, ResourceKind::Other { kind, .. } if kind == "ConfigMap"));
    assert_eq!(rs[1].key(), "other/x");
}

#[test]
fn unsupported_version_is_other() {
    let yaml = "apiVersion: security.istio.io/v1alpha1\nkind: Policy\nmetadata: {name: p}\nspec: {peers: []}\n";
    let rs = parse_documents("f.yaml", yaml).unwrap();
    assert!(matches!(&rs[0].kind, ResourceKind::Other { .. }));
}

const PA_HEAD: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: pa\n  namespace: shop\nspec:\n";

#[test]
fn bad_enum_value_is_located() {
    // Line 7 is `  mtls:`, line 8 the mode.
    let e = err(&format!("{PA_HEAD}  mtls:\n    mode: STRCT\n"));
    assert!(
        e.starts_with(
            "policies/p.yaml:8:11: spec.mtls.mode: unknown variant `STRCT`, expected one of"
        ),
        "{e}"
    );
    assert!(e.contains("STRICT"), "{e}");
}

#[test]
fn port_level_enum_value_is_located() {
    let e = err(&format!(
        "{PA_HEAD}  selector:\n    matchLabels: {{app: web}}\n  portLevelMtls:\n    8080:\n      mode: strict\n"
    ));
    assert!(
        e.starts_with(
            "policies/p.yaml:11:13: spec.portLevelMtls.8080.mode: unknown variant `strict`"
        ),
        "{e}"
    );
}

#[test]
fn unknown_field_is_located() {
    let e = err(&format!(
        "{PA_HEAD}  mtls:\n    mode: STRICT\n  mtlsMode: STRICT\n"
    ));
    assert!(
        e.starts_with("policies/p.yaml:9:3: spec.mtlsMode: unknown field `mtlsMode`"),
        "{e}"
    );
    let e = err(&format!("{PA_HEAD}  mtls:\n    mod: STRICT\n"));
    assert!(
        e.starts_with("policies/p.yaml:8:5: spec.mtls.mod: unknown field"),
        "{e}"
    );
}

#[test]
fn wrong_type_is_located() {
    let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  rules:\n  - to:\n    - operation:\n        ports: [8080]\n";
    let e = err(yaml);
    assert!(
        e.starts_with("policies/p.yaml:8:17: spec.rules[0].to[0].operation.ports[0]: invalid type: integer `8080`, expected a string"),
        "{e}"
    );
    let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  rules: {from: []}\n";
    let e = err(yaml);
    assert!(
        e.starts_with("policies/p.yaml:5:10: spec.rules: invalid type: map"),
        "{e}"
    );
}

#[test]
fn bad_selector_is_located() {
    let e = err(&format!(
        "{PA_HEAD}  selector:\n    matchLabels:\n      app: '*'\n"
    ));
    assert!(
        e.starts_with("policies/p.yaml:9:12: spec.selector.matchLabels.app: wildcard is not supported in selector"),
        "{e}"
    );
    let e = err(&format!("{PA_HEAD}  selector:\n    labels: {{app: web}}\n"));
    assert!(
        e.starts_with("policies/p.yaml:8:5: spec.selector.labels: unknown field `labels`, expected `matchLabels`"),
        "{e}"
    );
}

const AP_HEAD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: ap\n  namespace: shop\nspec:\n";

#[test]
fn invalid_principal_ip_block_and_port_are_located() {
    // istiod accepts a principal written with `spiffe://` (CheckEmptyValues only) and
    // generates `spiffe://spiffe://...`, which never matches: loaded, with a located warning.
    let rs = parse_documents(
        "policies/p.yaml",
        &format!(
            "{AP_HEAD}  rules:\n  - from:\n    - source:\n        principals:\n        - cluster.local/ns/a/sa/b\n        - spiffe://cluster.local/ns/a/sa/c\n"
        ),
    )
    .unwrap();
    let w = rs[0].warnings[0].to_string();
    assert!(
        w.starts_with(
            "policies/p.yaml:12:11: spec.rules[0].from[0].source.principals[1]: `spiffe://"
        ),
        "{w}"
    );
    let e = err(&format!(
        "{AP_HEAD}  rules:\n  - from:\n    - source:\n        ipBlocks: [10.0.0.0/8, 10.1.2.300]\n"
    ));
    assert!(
        e.starts_with("policies/p.yaml:10:32: spec.rules[0].from[0].source.ipBlocks[1]: bad IP address `10.1.2.300`"),
        "{e}"
    );
    let e = err(&format!(
        "{AP_HEAD}  rules:\n  - from:\n    - source:\n        notRemoteIpBlocks: [10.0.0.0/33]\n"
    ));
    assert!(
        e.contains("spec.rules[0].from[0].source.notRemoteIpBlocks[0]: bad CIDR range"),
        "{e}"
    );
    let e = err(&format!(
        "{AP_HEAD}  rules:\n  - to:\n    - operation:\n        ports: [\"70000\"]\n"
    ));
    assert!(
        e.starts_with(
            "policies/p.yaml:10:17: spec.rules[0].to[0].operation.ports[0]: bad port `70000`"
        ),
        "{e}"
    );
}

#[test]
fn validation_rules_like_istiod() {
    let cases: &[(&str, &str)] = &[
        // portLevelMtls requires a selector.
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: shop}\nspec:\n  portLevelMtls:\n    8080: {mode: DISABLE}\n",
            "spec.portLevelMtls: mesh/namespace peer authentication cannot have port level mTLS",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: shop}\nspec:\n  selector: {matchLabels: {app: a}}\n  portLevelMtls:\n    0: {mode: DISABLE}\n",
            "spec.portLevelMtls.0: port must be in range 1..65535",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: shop}\nspec:\n  selector: {matchLabels: {app: a}}\n  portLevelMtls:\n    65536: {mode: DISABLE}\n",
            "spec.portLevelMtls.65536: port must be in range 1..65535",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: shop}\nspec:\n  selector: {matchLabels: {app: a}}\n  portLevelMtls: {}\n",
            "spec.portLevelMtls: port level mTLS, if defined, must have at least one element",
        ),
        (
            &format!("{AP_HEAD}  action: DENY\n"),
            "spec.rules: DENY action without `rules` is meaningless",
        ),
        (
            &format!("{AP_HEAD}  action: CUSTOM\n  provider: {{name: opa}}\n"),
            "spec.rules: CUSTOM action without `rules` is meaningless",
        ),
        (
            &format!("{AP_HEAD}  action: CUSTOM\n  rules: [{{}}]\n"),
            "spec.provider.name: `provider.name` must not be empty",
        ),
        (
            &format!("{AP_HEAD}  action: DENY\n  provider: {{name: opa}}\n  rules: [{{}}]\n"),
            "spec.provider: `provider` must not be with non CUSTOM action, found DENY",
        ),
        (
            &format!(
                "{AP_HEAD}  action: CUSTOM\n  provider: {{name: opa}}\n  rules:\n  - from:\n    - source: {{principals: [a]}}\n"
            ),
            "spec.rules[0].from[0].source.principals: principals is currently not supported with CUSTOM action",
        ),
        (
            &format!("{AP_HEAD}  rules:\n  - to:\n    - operation:\n        methods: [GET, '']\n"),
            "spec.rules[0].to[0].operation.methods[1]: empty value not allowed",
        ),
        // istiod's CheckValidPathTemplate: `{`/`}` outside `{*}`/`{**}`.
        (
            &format!("{AP_HEAD}  rules:\n  - to:\n    - operation:\n        paths: ['/a/{{b}}']\n"),
            "spec.rules[0].to[0].operation.paths[0]: invalid or unsupported path /a/{b}: contains '{' or '}'",
        ),
        // istiod's CheckTrustDomainValues (CheckWildcardValues).
        (
            &format!(
                "{AP_HEAD}  rules:\n  - from:\n    - source:\n        trustDomains: ['*a*']\n"
            ),
            "spec.rules[0].from[0].source.trustDomains[0]: `*a*`: at most one wildcard",
        ),
        (
            &format!("{AP_HEAD}  rules:\n  - from:\n    - source: {{}}\n"),
            "spec.rules[0].from[0].source: `from.source` must not be empty",
        ),
        (
            &format!("{AP_HEAD}  rules:\n  - from: []\n"),
            "spec.rules[0].from: `from` must not be empty",
        ),
        (
            &format!("{AP_HEAD}  rules:\n  - to:\n    - {{}}\n"),
            "spec.rules[0].to[0].operation: `to.operation` must not be nil",
        ),
        (
            &format!(
                "{AP_HEAD}  rules:\n  - from:\n    - source: {{serviceAccounts: [a/b], namespaces: [a]}}\n"
            ),
            "spec.rules[0].from[0].source.serviceAccounts: cannot set serviceAccounts with namespaces or principals",
        ),
        (
            &format!("{AP_HEAD}  rules:\n  - from:\n    - source: {{serviceAccounts: [a/b/c]}}\n"),
            "spec.rules[0].from[0].source.serviceAccounts[0]: expected format",
        ),
        (
            &format!(
                "{AP_HEAD}  rules:\n  - when:\n    - key: destination.labels[app]\n      values: [a]\n"
            ),
            "spec.rules[0].when[0].key: attribute destination.labels[app] is replaced by the workload selector",
        ),
        (
            &format!(
                "{AP_HEAD}  rules:\n  - when:\n    - key: request.headers\n      values: [a]\n"
            ),
            "spec.rules[0].when[0].key: bad key (request.headers): should have format a[b]",
        ),
        (
            &format!("{AP_HEAD}  rules:\n  - when:\n    - key: source.ip\n"),
            "spec.rules[0].when[0]: at least one of `values` or `notValues` must be set for key source.ip",
        ),
        (
            &format!(
                "{AP_HEAD}  rules:\n  - when:\n    - key: source.ip\n      values: [not-an-ip]\n"
            ),
            "spec.rules[0].when[0].values[0]: invalid value for key source.ip: bad IP address",
        ),
        (
            &format!(
                "{AP_HEAD}  rules:\n  - when:\n    - key: destination.port\n      notValues: ['x']\n"
            ),
            "spec.rules[0].when[0].notValues[0]: invalid value for key destination.port: bad port",
        ),
        (
            &format!(
                "{AP_HEAD}  selector: {{matchLabels: {{app: a}}}}\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: gw}}]\n"
            ),
            "spec.targetRefs: only one of targetRefs or workloadSelector can be set",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec:\n  jwtRules:\n  - issuer: https://issuer\n    jwksUri: ftp://keys\n",
            // istiod's `security.ParseJwksURI` (pkg/config/security/security.go).
            "spec.jwtRules[0].jwksUri: `ftp://keys`: URI scheme \"ftp\" is not supported",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec:\n  jwtRules:\n  - issuer: https://issuer\n    jwksUri: https://keys:https/jwks\n",
            "spec.jwtRules[0].jwksUri: `https://keys:https/jwks`: url.Parse: invalid port",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec:\n  jwtRules:\n  - jwks: '{}'\n",
            "spec.jwtRules[0].issuer: issuer or jwksUri must be non-empty string",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec:\n  jwtRules:\n  - issuer: i\n    outputClaimToHeaders: [{header: 'x y', claim: sub}]\n",
            "spec.jwtRules[0].outputClaimToHeaders[0].header: `x y` is not a valid header name",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\nspec:\n  jwtRules:\n  - issuer: i\n    timeout: 5\n",
            "spec.jwtRules[0].timeout: invalid type: integer `5`, expected a string",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {namespace: shop}\nspec: {}\n",
            "metadata.name: `metadata.name` must be set",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a, creationTimestamp: yesterday}\nspec: {}\n",
            "metadata.creationTimestamp: `yesterday` is not an RFC 3339 timestamp",
        ),
        (
            "kind: PeerAuthentication\n",
            "apiVersion: `apiVersion` must be set",
        ),
        ("- a\n- b\n", "a Kubernetes resource must be a mapping"),
    ];
    for (yaml, want) in cases {
        let e = err(yaml);
        assert!(e.contains(want), "\nyaml:\n{yaml}\nwant: {want}\ngot:  {e}");
        assert!(e.starts_with("policies/p.yaml:"), "{e}");
    }
}

#[test]
fn valid_policies_pass_validation() {
    let yaml = format!(
        r#"{AP_HEAD}  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/a/sa/b", "*"]
        notNamespaces: ["kube-*"]
        ipBlocks: ["10.0.0.1/24", "2001:db8::/32", "192.168.1.1"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/admin*", "*.php", "/api/{{*}}/items/{{**}}"]
        ports: ["8080"]
    when:
    - key: request.auth.claims[groups]
      values: ["admins"]
    - key: request.headers[X-Tenant]
      notValues: ["evil"]
    - key: source.serviceAccount
      values: ["a/b"]
"#
    );
    let rs = parse_documents("ok.yaml", &yaml).unwrap();
    assert_eq!(rs.len(), 1);
}

#[test]
fn yaml_syntax_error_is_located() {
    let e = err("apiVersion: v1\nkind: [\n");
    assert!(e.starts_with("policies/p.yaml:"), "{e}");
    assert!(e.contains("invalid YAML"), "{e}");
    let e = err("a: 1\na: 2\n");
    assert!(e.contains("invalid YAML"), "{e}");
}

#[test]
fn list_item_errors_name_the_item() {
    let yaml = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: security.istio.io/v1\n  kind: PeerAuthentication\n  metadata: {name: a}\n  spec: {mtls: {mode: NOPE}}\n";
    let e = err(yaml);
    assert!(
        e.starts_with("policies/p.yaml:7:23: items[0].spec.mtls.mode: unknown variant"),
        "{e}"
    );
}

/// RequestAuthentication `timeout` is a `google.protobuf.Duration`, which istiod reads with
/// golang/protobuf's jsonpb (istio/istio pkg/util/protomarshal), whose Duration case is Go's
/// `time.ParseDuration` (golang/protobuf jsonpb/decode.go); istiod's validation then requires
/// `agent.ValidateDuration`: "duration must be greater than 1ms", "only durations to ms
/// precision are supported" (istio/istio pkg/config/validation/agent/validation.go).
#[test]
fn jwt_timeout_is_parsed_once_at_load_as_istiod_does() {
    let ra = |t: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: shop}}\nspec:\n  jwtRules:\n  - issuer: i\n    timeout: {t}\n"
        )
    };
    // Go duration syntax loads, typed: the proxy never parses it again.
    for (t, ns) in [
        ("5s", 5_000_000_000i64),
        ("1.5s", 1_500_000_000),
        ("1m30s", 90_000_000_000),
        ("500ms", 500_000_000),
        ("\"2562047h\"", 2_562_047 * 3_600_000_000_000),
    ] {
        let r = parse_documents("policies/p.yaml", &ra(t)).unwrap_or_else(|e| panic!("{t}: {e}"));
        let ResourceKind::RequestAuthentication(spec) = &r[0].kind else {
            panic!("{t}: {:?}", r[0].kind)
        };
        assert_eq!(
            spec.jwt_rules[0].timeout.map(|d| d.as_nanos()),
            Some(ns),
            "{t}"
        );
    }
    // What jsonpb cannot unmarshal or istiod's validation refuses: located errors at load.
    for (t, want) in [
        (
            "99999999999999999999s",
            "policies/p.yaml:7:14: spec.jwtRules[0].timeout: `99999999999999999999s` is out of range",
        ),
        (
            "2562048h",
            "policies/p.yaml:7:14: spec.jwtRules[0].timeout: `2562048h` is out of range",
        ),
        (
            "5",
            "policies/p.yaml:7:14: spec.jwtRules[0].timeout: invalid type: integer `5`",
        ),
        (
            "\"5\"",
            "policies/p.yaml:7:14: spec.jwtRules[0].timeout: `5` needs a unit",
        ),
        (
            "5d",
            "policies/p.yaml:7:14: spec.jwtRules[0].timeout: `5d`: unknown unit `d`",
        ),
        (
            "0s",
            "policies/p.yaml:7:14: spec.jwtRules[0].timeout: `0s`: duration must be greater than 1ms",
        ),
        (
            "-1s",
            "policies/p.yaml:7:14: spec.jwtRules[0].timeout: `-1s`: duration must be greater than 1ms",
        ),
        (
            "1.0005s",
            "policies/p.yaml:7:14: spec.jwtRules[0].timeout: `1.0005s`: only durations to ms precision are supported",
        ),
    ] {
        let e = err(&ra(t));
        assert!(
            e.starts_with(want),
            "\ntimeout: {t}\nwant: {want}\ngot:  {e}"
        );
    }
}

/// The labels selectors match, read from each kind that runs workloads (for `outrigger lint`'s
/// "selector matches nothing"); none for other kinds.
#[test]
fn workload_labels_are_read_from_each_workload_kind() {
    let yaml = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop, labels: {owner: team-a}}
spec:
  template:
    metadata:
      labels: {app: web, version: v1}
---
apiVersion: v1
kind: Pod
metadata: {name: p, labels: {app: pod}}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: c}
spec: {jobTemplate: {spec: {template: {metadata: {labels: {app: cron}}}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm}
spec: {address: 10.0.0.1, labels: {app: legacy}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: g}
spec: {metadata: {labels: {app: group}}, template: {serviceAccount: sa}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: s}
spec: {}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cm, labels: {app: web}}
"#;
    let rs = parse_documents("f.yaml", yaml).unwrap();
    let labels: Vec<Option<Vec<(String, String)>>> = rs
        .iter()
        .map(|r| match &r.kind {
            ResourceKind::Other {
                workload_labels, ..
            } => workload_labels
                .as_ref()
                .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            _ => panic!("not Other: {}", r.kind_name()),
        })
        .collect();
    let kv = |pairs: &[(&str, &str)]| {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        labels,
        vec![
            kv(&[("app", "web"), ("version", "v1")]),
            kv(&[("app", "pod")]),
            kv(&[("app", "cron")]),
            kv(&[("app", "legacy")]),
            kv(&[("app", "group")]),
            kv(&[]),
            None,
        ]
    );
}

/// What istiod accepts in a JwtRule loads, with a warning where it cannot work (istio/istio
/// pkg/config/validation/validation.go `validateJwtRule`: `jwksUri` through
/// `security.ParseJwksURI`, which checks the scheme and the port, not the host;
/// `outputPayloadToHeader` not validated at all).
#[test]
fn jwt_rule_forms_istiod_accepts_load() {
    let rule = |extra: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: shop}}\nspec:\n  jwtRules:\n  - issuer: https://issuer\n{extra}"
        )
    };
    for (extra, warning) in [
        ("    jwksUri: https://\n", Some("has no host")),
        ("    jwksUri: HTTPS://keys.example/jwks\n", None),
        ("    jwksUri: http://[::1]:8443/jwks\n", None),
        ("    jwksUri: https://keys.example:/jwks\n", None),
        (
            "    outputPayloadToHeader: 'x payload'\n",
            Some("is not an HTTP header name"),
        ),
        ("    outputPayloadToHeader: x-jwt-payload\n", None),
    ] {
        let rs = parse_documents("f.yaml", &rule(extra))
            .unwrap_or_else(|e| panic!("istiod accepts {extra:?}: {e}"));
        let warnings: Vec<String> = rs[0].warnings.iter().map(|w| w.to_string()).collect();
        match warning {
            Some(w) => assert!(
                warnings.iter().any(|x| x.contains(w)),
                "{extra:?}: {warnings:?}"
            ),
            None => assert!(warnings.is_empty(), "{extra:?}: {warnings:?}"),
        }
    }
}
