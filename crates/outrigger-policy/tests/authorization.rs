//! AuthorizationPolicy decisions: every field, every not-form, every match kind, actions and
//! their order, empty-rule forms, dry-run, TCP, CUSTOM, trust-domain aliases.

use std::collections::BTreeMap;
use std::net::IpAddr;

use outrigger_policy::*;

const PEER: &str = "cluster.local/ns/front/sa/web";

fn opts() -> PolicyOptions {
    PolicyOptions {
        trust_domains: outrigger_identity::TrustDomains::new(
            "cluster.local",
            &["old.local".into()],
        )
        .unwrap(),
        extension_providers: vec!["ext-ok".into()],
        ..PolicyOptions::default()
    }
}

fn workload() -> Workload {
    Workload {
        namespace: "shop".into(),
        labels: BTreeMap::from([("app".to_string(), "api".to_string())]),
    }
}

/// An AuthorizationPolicy in `shop` named `p<i>` with the given spec body (indented 2).
fn ap(name: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n{body}---\n"
    )
}

fn snap(yaml: &str) -> Snapshot {
    let rs = parse_documents("ap.yaml", yaml).unwrap();
    Snapshot::build(&rs, &workload(), &opts()).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Req {
    principal: Option<&'static str>,
    source_ip: &'static str,
    remote_ip: Option<&'static str>,
    dest_ip: &'static str,
    port: u16,
    sni: Option<&'static str>,
    http: Option<(&'static str, &'static str, &'static str)>,
    headers: Vec<(&'static str, &'static str)>,
    jwt: Option<serde_json::Value>,
}

impl Default for Req {
    fn default() -> Self {
        Req {
            principal: Some(PEER),
            source_ip: "10.1.2.3",
            remote_ip: None,
            dest_ip: "10.0.0.9",
            port: 8080,
            sni: None,
            http: Some(("GET", "api.shop.svc", "/data")),
            headers: Vec::new(),
            jwt: None,
        }
    }
}

fn decide(s: &Snapshot, r: &Req) -> (bool, String) {
    let jwt = r.jwt.clone().map(JwtClaims::new);
    let headers = r.headers.clone();
    let request = Request {
        source_principal: r.principal,
        source_ip: ip(r.source_ip),
        remote_ip: r.remote_ip.map(ip),
        destination_ip: ip(r.dest_ip),
        destination_port: r.port,
        sni: r.sni,
        http: r.http.map(|(method, host, path)| HttpAttrs {
            method,
            host,
            path,
            headers: &headers,
        }),
        jwt: jwt.as_ref(),
    };
    let d = s.authorize(&request);
    (d.allowed, format!("{:?}", d.reason))
}

/// A single ALLOW policy with one rule; asserts which requests it allows.
fn allow_rule(rule: &str, cases: &[(&str, Req, bool)]) {
    let s = snap(&ap("p", &format!("  rules:\n  - {rule}\n")));
    for (what, r, want) in cases {
        let (got, reason) = decide(&s, r);
        assert_eq!(got, *want, "rule `{rule}`: {what} ({reason})");
    }
}

fn with_principal(p: Option<&'static str>) -> Req {
    Req {
        principal: p,
        ..Req::default()
    }
}

#[test]
fn empty_forms_per_action() {
    let r = Req::default();
    // No policies at all.
    let (ok, why) = decide(&snap(""), &r);
    assert!(ok);
    assert_eq!(why, "NoPolicies");
    // ALLOW with empty spec: "deny all" (a policy applies, nothing matches).
    let (ok, why) = decide(&snap(&ap("deny-all", "  {}\n")), &r);
    assert!(!ok);
    assert_eq!(why, "NoAllowMatched");
    // ALLOW `rules: []` is the same as no rules.
    assert!(!decide(&snap(&ap("p", "  rules: []\n")), &r).0);
    // ALLOW `rules: [{}]`: allow all.
    let (ok, why) = decide(&snap(&ap("allow-all", "  rules:\n  - {}\n")), &r);
    assert!(ok);
    assert!(
        why.contains("AllowMatched") && why.contains("shop/allow-all"),
        "{why}"
    );
    // DENY `rules: [{}]`: deny all.
    let (ok, why) = decide(&snap(&ap("d", "  action: DENY\n  rules:\n  - {}\n")), &r);
    assert!(!ok);
    assert!(why.contains("DenyMatched"), "{why}");
    // AUDIT without rules never matches; AUDIT never changes the decision.
    let s = snap(&ap("a", "  action: AUDIT\n"));
    let (ok, why) = decide(&s, &r);
    assert!(ok);
    assert_eq!(why, "NoAllowPolicies");
    let s = snap(&ap("a", "  action: AUDIT\n  rules:\n  - {}\n"));
    let d = s.authorize(&Request::tcp(ip("10.1.2.3"), ip("10.0.0.9"), 80));
    assert!(d.allowed);
    assert_eq!(d.audit.len(), 1);
    assert_eq!(d.audit[0].policy, "shop/a");
    assert_eq!(d.audit[0].action, Action::Audit);
}

#[test]
fn evaluation_order_custom_deny_allow() {
    let yaml = ap("allow", "  rules:\n  - {}\n")
        + &ap(
            "deny-admin",
            "  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [/admin*]}\n",
        )
        + &ap(
            "ext",
            "  action: CUSTOM\n  provider: {name: ext-ok}\n  rules:\n  - to:\n    - operation: {paths: [/ext*]}\n",
        );
    let s = snap(&yaml);
    let admin = Req {
        http: Some(("GET", "h", "/admin/x")),
        ..Req::default()
    };
    let (ok, why) = decide(&s, &admin);
    assert!(!ok);
    assert!(why.contains("shop/deny-admin"), "{why}");
    // CUSTOM matched: the proxy must also ask the provider; the native decision is allow.
    let jwt = None;
    let headers: [(&str, &str); 0] = [];
    let req = Request {
        http: Some(HttpAttrs {
            method: "GET",
            host: "h",
            path: "/ext/1",
            headers: &headers,
        }),
        jwt,
        ..Request::tcp(ip("10.1.2.3"), ip("10.0.0.9"), 8080)
    };
    let d = s.authorize(&req);
    assert!(d.allowed);
    let c = d.custom.expect("custom check");
    assert_eq!(c.provider, "ext-ok");
    assert_eq!(c.matched.policy, "shop/ext");
    assert_eq!(d.policy(), Some("shop/allow"));
    // Not matched by CUSTOM: no check.
    let d = s.authorize(&Request {
        http: Some(HttpAttrs {
            path: "/data",
            ..req.http.unwrap()
        }),
        ..req
    });
    assert!(d.custom.is_none());
}

#[test]
fn custom_with_unknown_provider_denies_what_it_matches() {
    let s = snap(&ap(
        "ext",
        "  action: CUSTOM\n  provider: {name: not-configured}\n  rules:\n  - to:\n    - operation: {paths: [/ext*]}\n",
    ));
    let (ok, why) = decide(
        &s,
        &Req {
            http: Some(("GET", "h", "/ext")),
            ..Req::default()
        },
    );
    assert!(!ok);
    assert!(why.contains("CustomProviderUnavailable"), "{why}");
    assert!(decide(&s, &Req::default()).0);
    // Two different providers for one workload: both deny what they match (istiod default).
    let s = snap(
        &(ap(
            "e1",
            "  action: CUSTOM\n  provider: {name: ext-ok}\n  rules:\n  - to:\n    - operation: {paths: [/a]}\n",
        ) + &ap(
            "e2",
            "  action: CUSTOM\n  provider: {name: ext-other}\n  rules:\n  - to:\n    - operation: {paths: [/b]}\n",
        )),
    );
    assert!(
        !decide(
            &s,
            &Req {
                http: Some(("GET", "h", "/a")),
                ..Req::default()
            }
        )
        .0
    );
    assert!(
        decide(
            &s,
            &Req {
                http: Some(("GET", "h", "/c")),
                ..Req::default()
            }
        )
        .0
    );
}

#[test]
fn dry_run_is_logged_not_enforced() {
    let dry = "  annotations: {istio.io/dry-run: \"true\"}\n";
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: dry-deny\n  namespace: shop\n{dry}spec:\n  action: DENY\n  rules:\n  - {{}}\n---\n"
    );
    let s = snap(&yaml);
    let jwt = None;
    let d = s.authorize(&Request {
        jwt,
        ..Request::tcp(ip("10.1.2.3"), ip("10.0.0.9"), 8080)
    });
    assert!(d.allowed);
    assert_eq!(d.reason, Reason::NoPolicies);
    assert_eq!(d.dry_run.len(), 1);
    assert_eq!(d.dry_run[0].policy, "shop/dry-deny");
    assert_eq!(d.dry_run_allowed, Some(false));
    assert!(s.applied()[0].dry_run);
    // A dry-run ALLOW does not make the workload deny-by-default.
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: dry-allow\n  namespace: shop\n{dry}spec:\n  rules:\n  - from:\n    - source: {{namespaces: [nobody]}}\n---\n"
    );
    let s = snap(&yaml);
    let (ok, _) = decide(&s, &Req::default());
    assert!(ok);
    let d = s.authorize(&Request::tcp(ip("10.1.2.3"), ip("10.0.0.9"), 1));
    assert_eq!(d.dry_run_allowed, Some(false));
    // `istio.io/dry-run: "false"` is enforced.
    let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: d\n  namespace: shop\n  annotations: {istio.io/dry-run: \"false\"}\nspec:\n  action: DENY\n  rules:\n  - {}\n";
    assert!(!decide(&snap(yaml), &Req::default()).0);
}

#[test]
fn principals_and_match_kinds() {
    for (pattern, peer, want) in [
        ("cluster.local/ns/front/sa/web", Some(PEER), true),
        (
            "cluster.local/ns/front/sa/web",
            Some("cluster.local/ns/front/sa/web2"),
            false,
        ),
        (
            "cluster.local/ns/front/*",
            Some("cluster.local/ns/front/sa/web2"),
            true,
        ),
        (
            "cluster.local/ns/front/*",
            Some("cluster.local/ns/back/sa/web"),
            false,
        ),
        ("*/sa/web", Some("cluster.local/ns/back/sa/web"), true),
        ("*/sa/web", Some("cluster.local/ns/back/sa/web2"), false),
        ("*", Some(PEER), true),
        ("*", None, false),
        ("cluster.local/ns/front/sa/web", None, false),
        // Trust-domain aliases, both directions.
        ("old.local/ns/front/sa/web", Some(PEER), true),
        (
            "cluster.local/ns/front/sa/web",
            Some("old.local/ns/front/sa/web"),
            true,
        ),
        ("evil.local/ns/front/sa/web", Some(PEER), false),
        // Literal dots.
        (
            "cluster.local/ns/front/sa/w.b",
            Some("cluster.local/ns/front/sa/wXb"),
            false,
        ),
    ] {
        let s = snap(&ap(
            "p",
            &format!("  rules:\n  - from:\n    - source:\n        principals: [\"{pattern}\"]\n"),
        ));
        assert_eq!(
            decide(&s, &with_principal(peer)).0,
            want,
            "principals {pattern} vs {peer:?}"
        );
        // notPrincipals is the negation, plaintext included.
        let s = snap(&ap(
            "p",
            &format!(
                "  rules:\n  - from:\n    - source:\n        notPrincipals: [\"{pattern}\"]\n"
            ),
        ));
        assert_eq!(
            decide(&s, &with_principal(peer)).0,
            !want,
            "notPrincipals {pattern} vs {peer:?}"
        );
    }
}

#[test]
fn cluster_local_principal_means_the_local_domain() {
    let rs = parse_documents(
        "x.yaml",
        &ap(
            "p",
            "  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/a/sa/b]\n",
        ),
    )
    .unwrap();
    let o = PolicyOptions {
        trust_domains: outrigger_identity::TrustDomains::new("prod.example", &[]).unwrap(),
        ..PolicyOptions::default()
    };
    let s = Snapshot::build(&rs, &workload(), &o).unwrap();
    assert!(decide(&s, &with_principal(Some("prod.example/ns/a/sa/b"))).0);
}

#[test]
fn source_fields() {
    let r = Req::default;
    allow_rule(
        "from:\n    - source: {namespaces: [front, \"qa-*\"]}",
        &[
            ("ns front", r(), true),
            (
                "ns qa-1",
                with_principal(Some("cluster.local/ns/qa-1/sa/x")),
                true,
            ),
            (
                "ns back",
                with_principal(Some("cluster.local/ns/back/sa/x")),
                false,
            ),
            ("plaintext", with_principal(None), false),
        ],
    );
    allow_rule(
        "from:\n    - source: {notNamespaces: [front]}",
        &[
            ("ns front", r(), false),
            (
                "ns back",
                with_principal(Some("cluster.local/ns/back/sa/x")),
                true,
            ),
            ("plaintext", with_principal(None), true),
        ],
    );
    allow_rule(
        "from:\n    - source: {serviceAccounts: [front/web, local-sa]}",
        &[
            ("front/web", r(), true),
            (
                "front/web2",
                with_principal(Some("cluster.local/ns/front/sa/web2")),
                false,
            ),
            // `local-sa` without a namespace means the policy's namespace (shop).
            (
                "shop/local-sa",
                with_principal(Some("cluster.local/ns/shop/sa/local-sa")),
                true,
            ),
            (
                "front/local-sa",
                with_principal(Some("cluster.local/ns/front/sa/local-sa")),
                false,
            ),
        ],
    );
    // The Istio 1.25-1.29.1 regex bug: `.` must be literal.
    allow_rule(
        "from:\n    - source: {serviceAccounts: [cert-manager/cert-manager.io]}",
        &[
            (
                "exact",
                with_principal(Some("cluster.local/ns/cert-manager/sa/cert-manager.io")),
                true,
            ),
            (
                "X for dot",
                with_principal(Some("cluster.local/ns/cert-manager/sa/cert-managerXio")),
                false,
            ),
        ],
    );
    allow_rule(
        "from:\n    - source: {notServiceAccounts: [front/web]}",
        &[
            ("front/web", r(), false),
            (
                "other",
                with_principal(Some("cluster.local/ns/a/sa/b")),
                true,
            ),
        ],
    );
    allow_rule(
        "from:\n    - source: {ipBlocks: [10.1.0.0/16, 192.168.0.1]}",
        &[
            ("in cidr", r(), true),
            (
                "single",
                Req {
                    source_ip: "192.168.0.1",
                    ..r()
                },
                true,
            ),
            (
                "out",
                Req {
                    source_ip: "10.2.0.1",
                    ..r()
                },
                false,
            ),
            (
                "v4-mapped v6",
                Req {
                    source_ip: "::ffff:10.1.9.9",
                    ..r()
                },
                true,
            ),
        ],
    );
    allow_rule(
        "from:\n    - source: {notIpBlocks: [10.1.0.0/16]}",
        &[
            ("in", r(), false),
            (
                "out",
                Req {
                    source_ip: "10.2.0.1",
                    ..r()
                },
                true,
            ),
        ],
    );
    allow_rule(
        "from:\n    - source: {remoteIpBlocks: [203.0.113.0/24]}",
        &[
            (
                "remote set",
                Req {
                    remote_ip: Some("203.0.113.7"),
                    ..r()
                },
                true,
            ),
            (
                "remote defaults to source",
                Req {
                    source_ip: "203.0.113.8",
                    ..r()
                },
                true,
            ),
            ("other", r(), false),
        ],
    );
    allow_rule(
        "from:\n    - source: {notRemoteIpBlocks: [203.0.113.0/24]}",
        &[
            (
                "remote in",
                Req {
                    remote_ip: Some("203.0.113.7"),
                    ..r()
                },
                false,
            ),
            ("other", r(), true),
        ],
    );
    allow_rule(
        "from:\n    - source: {trustDomains: [old.local]}",
        &[
            ("alias expands to local", r(), true),
            (
                "foreign",
                with_principal(Some("evil.local/ns/a/sa/b")),
                false,
            ),
        ],
    );
    allow_rule(
        "from:\n    - source: {trustDomains: [\"evil*\"]}",
        &[
            ("prefix", with_principal(Some("evil.local/ns/a/sa/b")), true),
            ("local", r(), false),
        ],
    );
    allow_rule(
        "from:\n    - source: {notTrustDomains: [cluster.local]}",
        &[
            ("local", r(), false),
            (
                "foreign",
                with_principal(Some("evil.local/ns/a/sa/b")),
                true,
            ),
        ],
    );
}

fn jwt(v: serde_json::Value) -> Req {
    Req {
        jwt: Some(v),
        ..Req::default()
    }
}

#[test]
fn request_principals_and_claims() {
    let good = || {
        jwt(
            serde_json::json!({"iss": "https://idp", "sub": "alice", "aud": ["x", "api"], "azp": "cli",
        "groups": ["dev", "ops"], "scope": "read write", "org": {"team": {"name": "blue"}}, "n": 5}),
        )
    };
    allow_rule(
        "from:\n    - source: {requestPrincipals: [\"https://idp/alice\"]}",
        &[
            ("match", good(), true),
            ("no jwt", Req::default(), false),
            (
                "other sub",
                jwt(serde_json::json!({"iss": "https://idp", "sub": "bob"})),
                false,
            ),
        ],
    );
    allow_rule(
        "from:\n    - source: {requestPrincipals: [\"*\"]}",
        &[("any jwt", good(), true), ("no jwt", Req::default(), false)],
    );
    allow_rule(
        "from:\n    - source: {notRequestPrincipals: [\"https://idp/*\"]}",
        &[("idp", good(), false), ("no jwt", Req::default(), true)],
    );
    let when = |key: &str, values: &str| format!("when:\n    - key: {key}\n      values: {values}");
    allow_rule(
        &when("request.auth.principal", "[\"https://idp/alice\"]"),
        &[("p", good(), true), ("none", Req::default(), false)],
    );
    allow_rule(
        &when("request.auth.audiences", "[api]"),
        &[("list aud", good(), true)],
    );
    allow_rule(
        &when("request.auth.audiences", "[nope]"),
        &[("list aud", good(), false)],
    );
    allow_rule(
        &when("request.auth.presenter", "[\"cl*\"]"),
        &[("azp prefix", good(), true)],
    );
    allow_rule(
        &when("\"request.auth.claims[groups]\"", "[ops]"),
        &[("list claim", good(), true)],
    );
    allow_rule(
        &when("\"request.auth.claims[groups]\"", "[qa]"),
        &[("list claim", good(), false)],
    );
    allow_rule(
        &when("\"request.auth.claims[scope]\"", "[write]"),
        &[("space separated scope", good(), true)],
    );
    allow_rule(
        &when("\"request.auth.claims[scope]\"", "[\"read write\"]"),
        &[("scope is split", good(), false)],
    );
    allow_rule(
        &when("\"request.auth.claims[org][team][name]\"", "[blue]"),
        &[("nested", good(), true)],
    );
    allow_rule(
        &when("\"request.auth.claims[org][team]\"", "[\"*\"]"),
        &[("object is not a string", good(), false)],
    );
    allow_rule(
        &when("\"request.auth.claims[n]\"", "[\"5\"]"),
        &[("number never matches", good(), false)],
    );
    allow_rule(
        "when:\n    - key: \"request.auth.claims[groups]\"\n      notValues: [ops]",
        &[
            ("notValues", good(), false),
            (
                "absent claim",
                jwt(serde_json::json!({"iss": "i", "sub": "s"})),
                true,
            ),
        ],
    );
}

#[test]
fn operation_fields() {
    let http = |method: &'static str, host: &'static str, path: &'static str| Req {
        http: Some((method, host, path)),
        ..Req::default()
    };
    allow_rule(
        "to:\n    - operation: {hosts: [\"API.shop.svc\", \"*.example.com\"]}",
        &[
            ("case-insensitive", http("GET", "api.SHOP.svc", "/"), true),
            ("suffix", http("GET", "www.EXAMPLE.com", "/"), true),
            (
                "with port is another value",
                http("GET", "api.shop.svc:8080", "/"),
                false,
            ),
        ],
    );
    allow_rule(
        "to:\n    - operation: {notHosts: [\"*.internal\"]}",
        &[
            ("internal", http("GET", "a.internal", "/"), false),
            ("other", http("GET", "a.com", "/"), true),
        ],
    );
    allow_rule(
        "to:\n    - operation: {methods: [GET, HEAD]}",
        &[
            ("GET", http("GET", "h", "/"), true),
            ("get is case-sensitive", http("get", "h", "/"), false),
            ("POST", http("POST", "h", "/"), false),
        ],
    );
    allow_rule(
        "to:\n    - operation: {notMethods: [DELETE]}",
        &[
            ("DELETE", http("DELETE", "h", "/"), false),
            ("GET", http("GET", "h", "/"), true),
        ],
    );
    allow_rule(
        "to:\n    - operation: {paths: [/api/*, \"*.png\", /exact, /a.b]}",
        &[
            ("prefix", http("GET", "h", "/api/x"), true),
            ("suffix", http("GET", "h", "/img/x.png"), true),
            ("exact", http("GET", "h", "/exact"), true),
            ("exact with query", http("GET", "h", "/exact?x=1"), true),
            ("case-sensitive", http("GET", "h", "/EXACT"), false),
            ("literal dot", http("GET", "h", "/aXb"), false),
            ("dot", http("GET", "h", "/a.b"), true),
            ("other", http("GET", "h", "/other"), false),
        ],
    );
    allow_rule(
        "to:\n    - operation: {paths: [\"/v1/{*}/items/{**}\"]}",
        &[
            ("template", http("GET", "h", "/v1/x/items/a/b"), true),
            ("template miss", http("GET", "h", "/v1/x/y/items"), false),
        ],
    );
    allow_rule(
        "to:\n    - operation: {notPaths: [\"/admin*\"]}",
        &[
            ("admin", http("GET", "h", "/admin/x"), false),
            ("other", http("GET", "h", "/x"), true),
        ],
    );
    allow_rule(
        "to:\n    - operation: {ports: [\"8080\", \"9090\"]}",
        &[
            ("8080", Req::default(), true),
            (
                "9091",
                Req {
                    port: 9091,
                    ..Req::default()
                },
                false,
            ),
        ],
    );
    allow_rule(
        "to:\n    - operation: {notPorts: [\"8080\"]}",
        &[
            ("8080", Req::default(), false),
            (
                "9091",
                Req {
                    port: 9091,
                    ..Req::default()
                },
                true,
            ),
        ],
    );
}

#[test]
fn when_conditions() {
    let r = Req::default;
    let when = |key: &str, field: &str, values: &str| {
        format!("when:\n    - key: \"{key}\"\n      {field}: {values}")
    };
    let h = |headers: Vec<(&'static str, &'static str)>| Req { headers, ..r() };
    allow_rule(
        &when("request.headers[X-Tenant]", "values", "[\"a*\"]"),
        &[
            ("prefix", h(vec![("x-tenant", "abc")]), true),
            ("case-insensitive name", h(vec![("X-TENANT", "abc")]), true),
            ("absent", r(), false),
            ("other", h(vec![("x-tenant", "b")]), false),
            (
                "multiple values are joined with ,",
                h(vec![("x-tenant", "b"), ("x-tenant", "a")]),
                false,
            ),
        ],
    );
    allow_rule(
        &when("request.headers[x-multi]", "values", "[\"a,b\"]"),
        &[("joined", h(vec![("x-multi", "a"), ("x-multi", "b")]), true)],
    );
    allow_rule(
        &when("request.headers[x-present]", "values", "[\"*\"]"),
        &[
            ("present, even empty", h(vec![("x-present", "")]), true),
            ("absent", r(), false),
        ],
    );
    allow_rule(
        &when("request.headers[x-block]", "notValues", "[\"yes\"]"),
        &[
            ("blocked", h(vec![("x-block", "yes")]), false),
            ("absent", r(), true),
        ],
    );
    allow_rule(
        &when("source.ip", "values", "[10.1.2.0/24]"),
        &[
            ("in", r(), true),
            (
                "out",
                Req {
                    source_ip: "10.9.9.9",
                    ..r()
                },
                false,
            ),
        ],
    );
    allow_rule(
        &when("remote.ip", "values", "[1.2.3.4]"),
        &[
            (
                "xff",
                Req {
                    remote_ip: Some("1.2.3.4"),
                    ..r()
                },
                true,
            ),
            ("none", r(), false),
        ],
    );
    allow_rule(
        &when("source.namespace", "values", "[front]"),
        &[("ns", r(), true), ("plain", with_principal(None), false)],
    );
    allow_rule(
        &when(
            "source.principal",
            "values",
            "[\"old.local/ns/front/sa/web\"]",
        ),
        &[("alias", r(), true)],
    );
    allow_rule(
        &when("source.serviceAccount", "values", "[front/web]"),
        &[
            ("sa", r(), true),
            (
                "other",
                with_principal(Some("cluster.local/ns/front/sa/x")),
                false,
            ),
        ],
    );
    allow_rule(
        &when("source.trustDomain", "values", "[cluster.local]"),
        &[("td", r(), true)],
    );
    allow_rule(
        &when("destination.ip", "values", "[10.0.0.0/24]"),
        &[
            ("in", r(), true),
            (
                "out",
                Req {
                    dest_ip: "10.0.1.1",
                    ..r()
                },
                false,
            ),
        ],
    );
    allow_rule(
        &when("destination.port", "values", "[\"8080\"]"),
        &[("8080", r(), true), ("81", Req { port: 81, ..r() }, false)],
    );
    allow_rule(
        &when("destination.port", "notValues", "[\"8080\"]"),
        &[("8080", r(), false), ("81", Req { port: 81, ..r() }, true)],
    );
    allow_rule(
        &when("connection.sni", "values", "[\"*.svc.cluster.local\"]"),
        &[
            (
                "sni",
                Req {
                    sni: Some("api.shop.svc.cluster.local"),
                    ..r()
                },
                true,
            ),
            ("no sni", r(), false),
        ],
    );
    // values and notValues together: both must hold.
    allow_rule(
        "when:\n    - key: source.namespace\n      values: [\"f*\"]\n      notValues: [front]",
        &[("excluded", r(), false)],
    );
}

#[test]
fn fields_and_rules_combine() {
    // Fields in a rule AND, values OR, from entries OR, rules OR.
    let s = snap(&ap(
        "p",
        "  rules:\n  - from:\n    - source: {namespaces: [front]}\n    - source: {namespaces: [other]}\n    to:\n    - operation: {methods: [GET], paths: [/a]}\n  - to:\n    - operation: {paths: [/public]}\n",
    ));
    let req = |p: Option<&'static str>, m: &'static str, path: &'static str| Req {
        principal: p,
        http: Some((m, "h", path)),
        ..Req::default()
    };
    assert!(decide(&s, &req(Some(PEER), "GET", "/a")).0);
    assert!(decide(&s, &req(Some("cluster.local/ns/other/sa/x"), "GET", "/a")).0);
    assert!(!decide(&s, &req(Some(PEER), "POST", "/a")).0);
    assert!(!decide(&s, &req(Some("cluster.local/ns/third/sa/x"), "GET", "/a")).0);
    let (ok, why) = decide(&s, &req(None, "POST", "/public"));
    assert!(ok);
    assert!(why.contains("rule: 1"), "{why}");
}

#[test]
fn tcp_connections_and_http_only_fields() {
    let tcp = |port: u16| Req {
        http: None,
        port,
        ..Req::default()
    };
    // ALLOW with an HTTP-only field cannot match a TCP connection.
    let s = snap(&ap(
        "p",
        "  rules:\n  - to:\n    - operation: {paths: [/a]}\n",
    ));
    assert!(!decide(&s, &tcp(8080)).0);
    // ALLOW with only TCP fields works.
    let s = snap(&ap(
        "p",
        "  rules:\n  - from:\n    - source: {namespaces: [front]}\n    to:\n    - operation: {ports: [\"5432\"]}\n",
    ));
    assert!(decide(&s, &tcp(5432)).0);
    assert!(!decide(&s, &tcp(5433)).0);
    // An ALLOW rule mixing TCP and HTTP fields is dropped entirely for TCP.
    let s = snap(&ap(
        "p",
        "  rules:\n  - from:\n    - source: {namespaces: [front]}\n    when:\n    - key: request.headers[x]\n      values: [\"*\"]\n",
    ));
    assert!(!decide(&s, &tcp(5432)).0);
    // DENY with only HTTP fields denies the whole TCP connection (istiod's conservative
    // translation), on HTTP it denies only what matches.
    let deny = ap("allow", "  rules:\n  - {}\n")
        + &ap(
            "d",
            "  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [/admin], methods: [POST]}\n",
        );
    let s = snap(&deny);
    assert!(!decide(&s, &tcp(5432)).0);
    assert!(decide(&s, &Req::default()).0);
    // ... a `notPaths` is dropped the same way.
    let s = snap(
        &(ap("allow", "  rules:\n  - {}\n")
            + &ap(
                "d",
                "  action: DENY\n  rules:\n  - to:\n    - operation: {notPaths: [/public]}\n",
            )),
    );
    assert!(!decide(&s, &tcp(5432)).0);
    // DENY with HTTP fields and a port only denies TCP on that port.
    let s = snap(
        &(ap("allow", "  rules:\n  - {}\n")
            + &ap(
                "d",
                "  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [/admin], ports: [\"8080\"]}\n",
            )),
    );
    assert!(!decide(&s, &tcp(8080)).0);
    assert!(decide(&s, &tcp(9090)).0);
    // DENY with requestPrincipals (HTTP-only) on TCP: dropped, so the source fields decide.
    let s = snap(&ap(
        "d",
        "  action: DENY\n  rules:\n  - from:\n    - source: {requestPrincipals: [\"*\"], namespaces: [front]}\n",
    ));
    assert!(!decide(&s, &tcp(1)).0);
    assert!(
        decide(
            &s,
            &Req {
                http: None,
                principal: Some("cluster.local/ns/x/sa/y"),
                ..Req::default()
            }
        )
        .0
    );
}

#[test]
fn selection_root_namespace_target_refs() {
    let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: root-deny, namespace: istio-system}\nspec:\n  selector: {matchLabels: {app: api}}\n  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [/root]}\n---\n\
apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: other-ns, namespace: other}\nspec:\n  action: DENY\n  rules: [{}]\n---\n\
apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: mismatch, namespace: shop}\nspec:\n  selector: {matchLabels: {app: db}}\n  action: DENY\n  rules: [{}]\n---\n\
apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: gw, namespace: shop}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n  action: DENY\n  rules: [{}]\n";
    let s = snap(yaml);
    assert!(decide(&s, &Req::default()).0);
    assert!(
        !decide(
            &s,
            &Req {
                http: Some(("GET", "h", "/root")),
                ..Req::default()
            }
        )
        .0
    );
    let reasons: Vec<(String, IgnoreReason)> = s
        .ignored()
        .iter()
        .map(|i| (i.name.clone(), i.reason.clone()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("other-ns".into(), IgnoreReason::OtherNamespace),
            ("mismatch".into(), IgnoreReason::SelectorMismatch),
            ("gw".into(), IgnoreReason::TargetRefs),
        ]
    );
    assert_eq!(s.applied()[0].scope, PolicyScope::Workload);
    assert_eq!(s.applied()[0].action, Some(Action::Deny));
}

#[test]
fn port_index_keeps_unrelated_policies_out() {
    let mut yaml = ap(
        "allow-8080",
        "  rules:\n  - to:\n    - operation: {ports: [\"8080\"]}\n",
    );
    for i in 0..50 {
        yaml += &ap(
            &format!("deny-{i}"),
            &format!(
                "  action: DENY\n  rules:\n  - to:\n    - operation: {{ports: [\"{}\"]}}\n",
                10000 + i
            ),
        );
    }
    let s = snap(&yaml);
    assert!(decide(&s, &Req::default()).0);
    assert!(
        !decide(
            &s,
            &Req {
                port: 10007,
                ..Req::default()
            }
        )
        .0
    );
    let (_, why) = decide(
        &s,
        &Req {
            port: 10007,
            ..Req::default()
        },
    );
    assert!(why.contains("shop/deny-7"), "{why}");
    assert!(
        !decide(
            &s,
            &Req {
                port: 7,
                ..Req::default()
            }
        )
        .0
    );
}

#[test]
fn normalized_paths_against_deny_prefix() {
    let s = snap(
        &(ap("allow", "  rules:\n  - {}\n")
            + &ap(
                "d",
                "  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [\"/admin*\"]}\n",
            )),
    );
    let allowed = |raw: &str, mode: PathNormalization| {
        let p = normalize_path(raw, mode).unwrap();
        let headers: [(&str, &str); 0] = [];
        s.authorize(&Request {
            http: Some(HttpAttrs {
                method: "GET",
                host: "h",
                path: &p.path,
                headers: &headers,
            }),
            ..Request::tcp(ip("10.1.2.3"), ip("10.0.0.9"), 8080)
        })
        .allowed
    };
    use PathNormalization::*;
    for mode in [Base, MergeSlashes, DecodeAndMergeSlashes] {
        assert!(!allowed("/a/../admin", mode), "{mode:?}");
        assert!(!allowed("/%2e%2e/admin", mode), "{mode:?}");
        assert!(!allowed("/x\\..\\admin", mode), "{mode:?}");
        assert!(!allowed("/%61dmin", mode), "{mode:?}");
        assert!(allowed("/Admin", mode), "{mode:?}: case-sensitive");
    }
    // `//admin` only becomes `/admin` when slashes are merged.
    assert!(allowed("//admin", Base));
    assert!(!allowed("//admin", MergeSlashes));
    // `%2F` only becomes `/` with DECODE_AND_MERGE_SLASHES.
    assert!(allowed("/x%2F..%2Fadmin", MergeSlashes));
    assert!(!allowed("/x%2F..%2Fadmin", DecodeAndMergeSlashes));
    // NONE: nothing is resolved.
    assert!(allowed("/a/../admin", None));
}
