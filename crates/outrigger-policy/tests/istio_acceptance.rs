//! Every resource istiod accepts loads and behaves as the sidecar does; a resource istiod
//! rejects is refused alone, and fails closed for the workloads it may select.
//!
//! Sources: istiod's validation (`pkg/config/validation/validation.go`,
//! `ValidateAuthorizationPolicy`; `pkg/config/security/security.go`, `ValidateAttribute`) and
//! its translation (`pilot/pkg/security/authz/model/model.go` and `generator.go`,
//! `pilot/pkg/security/authz/builder/builder.go`).

use std::collections::BTreeMap;

use outrigger_policy::*;

const PEER: &str = "cluster.local/ns/front/sa/web";

fn workload() -> Workload {
    Workload {
        namespace: "shop".into(),
        labels: BTreeMap::from([("app".to_string(), "api".to_string())]),
    }
}

fn ap(name: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n{body}---\n"
    )
}

fn build(yaml: &str) -> Snapshot {
    let rs = parse_documents_lenient("p.yaml", yaml);
    Snapshot::build(&rs, &workload(), &PolicyOptions::default()).unwrap()
}

/// An HTTP request from PEER with one header; `None` path means a TCP connection.
fn allowed(s: &Snapshot, path: Option<&str>, header: (&str, &str)) -> bool {
    let headers = [header];
    let mut req = Request::tcp(
        "10.0.0.1".parse().unwrap(),
        "10.0.0.2".parse().unwrap(),
        8080,
    )
    .with_principal(PEER);
    if let Some(p) = path {
        req = req.with_http(HttpAttrs {
            method: "GET",
            host: "api",
            path: p,
            headers: &headers,
        });
    }
    s.authorize(&req).allowed
}

/// istiod accepts `spiffe://` principals (`CheckEmptyValues` only) and generates
/// `spiffe://` + value (`StringMatcherWithPrefix`): the value never matches.
#[test]
fn spiffe_principal_loads_with_a_warning_and_never_matches() {
    let s = build(&ap(
        "a",
        "  rules:\n  - from:\n    - source: {principals: [\"spiffe://cluster.local/ns/front/sa/web\"]}\n",
    ));
    assert!(s.refused().is_empty());
    assert_eq!(s.warnings().len(), 1, "{:?}", s.warnings());
    assert!(s.warnings()[0].reason.contains("never matches"));
    assert!(!allowed(&s, Some("/"), ("x", "y")));
    // Written without the scheme, it matches.
    let s = build(&ap(
        "a",
        "  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/front/sa/web\"]}\n",
    ));
    assert!(allowed(&s, Some("/"), ("x", "y")));
}

/// `experimental.envoy.filters.*` keys pass `validateMapKey`; the generator builds an Envoy
/// metadata matcher, and absent metadata never matches: `values` never, `notValues` always.
#[test]
fn envoy_filter_metadata_keys_load_and_never_match() {
    let key = "experimental.envoy.filters.network.mysql_proxy[db.table]";
    let s = build(&ap(
        "a",
        &format!("  rules:\n  - when:\n    - key: {key}\n      values: [\"[update]\"]\n"),
    ));
    assert!(s.refused().is_empty());
    assert!(s.warnings()[0].reason.contains("Envoy filter metadata"));
    assert!(!allowed(&s, Some("/"), ("x", "y")));
    // DENY with `values`: never matches, nothing denied.
    let s = build(&ap(
        "d",
        &format!("  action: DENY\n  rules:\n  - when:\n    - key: {key}\n      values: [x]\n"),
    ));
    assert!(allowed(&s, Some("/"), ("x", "y")));
    // DENY with `notValues`: always matches.
    let s = build(&ap(
        "d",
        &format!("  action: DENY\n  rules:\n  - when:\n    - key: {key}\n      notValues: [x]\n"),
    ));
    assert!(!allowed(&s, Some("/"), ("x", "y")));
}

/// A key istiod's validation accepts and its builder cannot translate (`request.headersX[a]`:
/// `extractNameInBrackets` fails): `checkError` skips the rule in an ALLOW policy and drops
/// the condition in a DENY policy ("a wider deny").
#[test]
fn untranslatable_keys_follow_istiod_check_error() {
    let s = build(&ap(
        "a",
        "  rules:\n  - when:\n    - key: request.headersX[a]\n      values: [b]\n  - to:\n    - operation: {paths: [/open]}\n",
    ));
    assert!(s.refused().is_empty());
    assert!(!allowed(&s, Some("/"), ("a", "b")));
    assert!(allowed(&s, Some("/open"), ("a", "b")));
    let s = build(&ap(
        "d",
        "  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [/admin]}\n    when:\n    - key: request.headersX[a]\n      values: [b]\n",
    ));
    assert!(!allowed(&s, Some("/admin"), ("c", "d")));
    assert!(allowed(&s, Some("/other"), ("c", "d")));
}

/// Forms istiod accepts that Outrigger used to refuse: a bare service account in
/// `source.serviceAccount` (`CheckServiceAccount`), `*` inside a namespace (every `*` is
/// `.*`), a `*` inside a host (matched literally, with a warning), a `/` in a
/// `source.trustDomain` value (only `source.trustDomains` forbids it).
#[test]
fn forms_istiod_accepts_load() {
    let s = build(&ap(
        "a",
        "  rules:\n  - when:\n    - key: source.serviceAccount\n      values: [web]\n",
    ));
    assert!(s.refused().is_empty(), "{:?}", s.refused());
    // The bare name is in the policy's namespace (shop), the peer is in front.
    assert!(!allowed(&s, Some("/"), ("x", "y")));
    let s = build(&ap(
        "a",
        "  rules:\n  - from:\n    - source: {namespaces: [\"f*t\"]}\n",
    ));
    assert!(s.refused().is_empty());
    assert!(allowed(&s, Some("/"), ("x", "y")));
    let s = build(&ap(
        "a",
        "  rules:\n  - to:\n    - operation: {hosts: [\"a*i\"]}\n",
    ));
    assert!(s.refused().is_empty());
    assert_eq!(s.warnings().len(), 1);
    assert!(
        !allowed(&s, Some("/"), ("x", "y")),
        "host `api` vs literal `a*i`"
    );
    let s = build(&ap(
        "a",
        "  rules:\n  - when:\n    - key: source.trustDomain\n      values: [cluster.local/ns]\n",
    ));
    assert!(s.refused().is_empty());
    assert!(allowed(&s, Some("/"), ("x", "y")));
}

/// One refused resource never blocks the others: the valid ones of the same file load.
#[test]
fn a_refused_resource_does_not_block_the_others() {
    let yaml = format!(
        "{}{}",
        ap(
            "broken",
            "  action: AUDIT\n  rules:\n  - when:\n    - key: custom.time_of_day\n      values: [x]\n"
        ),
        ap(
            "good",
            "  rules:\n  - to:\n    - operation: {paths: [/ok]}\n"
        )
    );
    let s = build(&yaml);
    assert_eq!(s.refused().len(), 1);
    let r = &s.refused()[0];
    assert_eq!(r.name, "shop/broken");
    assert_eq!(
        r.error.to_string(),
        "p.yaml:10:12: spec.rules[0].when[0].key: unknown attribute: custom.time_of_day"
    );
    assert_eq!(r.effect, RefusalEffect::NoDecisionChange);
    assert!(allowed(&s, Some("/ok"), ("x", "y")));
    assert!(!allowed(&s, Some("/no"), ("x", "y")));
    // The strict entry point still reports the first refusal.
    assert!(parse_documents("p.yaml", &yaml).is_err());
}

/// A refused ALLOW policy keeps the workload "deny unless allowed" (as istiod's builder
/// keeps the ALLOW filter when a rule cannot be translated) and allows nothing itself.
#[test]
fn a_refused_allow_policy_allows_nothing_but_keeps_deny_by_default() {
    let bad_allow = ap(
        "bad-allow",
        "  rules:\n  - to:\n    - operation: {paths: [/x]}\n    when:\n    - key: request.url_path\n      values: [/x]\n",
    );
    let s = build(&bad_allow);
    assert_eq!(s.refused()[0].effect, RefusalEffect::AllowsNothing);
    assert!(!allowed(&s, Some("/x"), ("x", "y")));
    assert!(!allowed(&s, None, ("x", "y")));
    let s = build(&format!(
        "{bad_allow}{}",
        ap(
            "good",
            "  rules:\n  - to:\n    - operation: {paths: [/ok]}\n"
        )
    ));
    assert!(allowed(&s, Some("/ok"), ("x", "y")));
    assert!(!allowed(&s, Some("/x"), ("x", "y")));
}

/// A refused DENY (or CUSTOM, or unreadable action) policy denies every request and
/// connection to the workloads it may select; it has no effect on other workloads.
#[test]
fn a_refused_deny_policy_fails_closed_for_what_it_selects() {
    let s = build(&ap(
        "bad-deny",
        "  action: DENY\n  rules:\n  - when:\n    - key: source.ip\n      values: [\"*\"]\n",
    ));
    assert_eq!(s.refused()[0].effect, RefusalEffect::DenyAll);
    assert!(!allowed(&s, Some("/"), ("x", "y")));
    assert!(!allowed(&s, None, ("x", "y")));
    // Another workload's selector: no effect here.
    let s = build(&ap(
        "bad-deny",
        "  action: DENY\n  selector: {matchLabels: {app: other}}\n  rules:\n  - when:\n    - key: source.ip\n      values: [\"*\"]\n",
    ));
    assert_eq!(
        s.refused()[0].effect,
        RefusalEffect::NotApplicable(IgnoreReason::SelectorMismatch)
    );
    assert!(allowed(&s, Some("/"), ("x", "y")));
    // Another namespace: no effect here; an unreadable metadata counts as this namespace.
    let s = build(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: elsewhere}\nspec:\n  action: DENY\n",
    );
    assert_eq!(
        s.refused()[0].effect,
        RefusalEffect::NotApplicable(IgnoreReason::OtherNamespace)
    );
    let s = build(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: 5\nspec:\n  action: DENY\n  rules: [{}]\n",
    );
    assert_eq!(s.refused()[0].effect, RefusalEffect::DenyAll);
    assert_eq!(s.refused()[0].name, "p.yaml:1");
    // An action that cannot be read is treated as DENY.
    let s = build(&ap("typo", "  action: DENNY\n  rules:\n  - {}\n"));
    assert_eq!(s.refused()[0].effect, RefusalEffect::DenyAll);
    assert!(!allowed(&s, Some("/"), ("x", "y")));
    // Dry-run: never enforced, so no effect.
    let s = build(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: d\n  namespace: shop\n  annotations: {istio.io/dry-run: \"true\"}\nspec:\n  action: DENY\n",
    );
    assert_eq!(s.refused()[0].effect, RefusalEffect::NoDecisionChange);
    assert!(allowed(&s, Some("/"), ("x", "y")));
}

/// A refused PeerAuthentication makes mTLS STRICT on every port; text that is not YAML (kind
/// unknown) denies everything and makes mTLS STRICT.
#[test]
fn refused_peer_authentication_and_unknown_documents_fail_closed() {
    let s = build(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: shop}\nspec:\n  mtls: {mode: PERMISIVE}\n",
    );
    assert_eq!(s.refused()[0].effect, RefusalEffect::StrictMtls);
    assert_eq!(s.mtls_mode(8080).mode, MtlsMode::Strict);
    let s = build("a: [unclosed\n");
    assert_eq!(s.refused()[0].effect, RefusalEffect::DenyAllAndStrictMtls);
    assert_eq!(s.refused()[0].kind, "unknown kind");
    assert_eq!(s.mtls_mode(1).mode, MtlsMode::Strict);
    assert!(!allowed(&s, Some("/"), ("x", "y")));
}

/// Published resources (tests/fixtures/published-policies, see its README.md): each loads,
/// or is refused with istiod's reason.
#[test]
fn published_policies_load_or_are_refused_with_istiods_reason() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/published-policies"
    );
    // istiod's ValidateAttribute rejects keys that are not Istio attributes.
    let refused = BTreeMap::from([
        (
            "06-authorizationpolicy-fintech-core-payment-processor-access.yaml",
            "spec.rules[2].when[1].key: unknown attribute: custom.time_of_day",
        ),
        (
            "07-authorizationpolicy-trading-platform-trading-platform-controls.yaml",
            "spec.rules[0].when[0].key: unknown attribute: custom.time_of_day",
        ),
        (
            "08-authorizationpolicy-production-security-baseline-deny.yaml",
            "spec.rules[2].when[0].key: unknown attribute: request.url_path",
        ),
    ]);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 15);
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let rs = parse_documents_lenient(&name, &text);
        assert_eq!(rs.len(), 1, "{name}");
        match (rs[0].refusal(), refused.get(name.as_str())) {
            (None, None) => assert!(rs[0].policy_kind().is_some(), "{name}"),
            (Some(r), Some(want)) => {
                assert!(r.error.to_string().contains(want), "{name}: {}", r.error)
            }
            (got, want) => panic!("{name}: refusal {got:?}, expected {want:?}"),
        }
    }
}
