//! `outrigger bootstrap --from DIR`, through the real binary, on samples of the files that
//! `istioctl x workload entry configure` writes, written here from istioctl's source
//! (istio/istio `istioctl/pkg/workload/workload.go`):
//!
//! * `cluster.env` — `createClusterEnv` merges the ProxyConfig's `proxyMetadata` (filled by
//!   `createMeshConfig`: CANONICAL_*, POD_NAMESPACE, SERVICE_ACCOUNT, TRUST_DOMAIN,
//!   ISTIO_META_*, ISTIO_METAJSON_LABELS) with its own keys, and `mapToString` writes sorted
//!   `KEY=<shellescape.Quote(value)>` lines ([`map_to_string`], [`quote`] below);
//! * `mesh.yaml` — `yaml.Marshal({"defaultConfig": <ProxyConfig as a JSON map>})`;
//! * `hosts` — `"<ingress IP> istiod[-<rev>].<ns>.svc\n"`, empty when no IP was found;
//! * `root-cert.pem`, `istio-token`.
//!
//! The samples follow istioctl's golden files (testdata/vmconfig/ipv4/*.golden) in shape.
//! Then the written agent.yaml is checked by `outrigger run --check-config`, and, end to end,
//! an agent started from it obtains its certificate from `outrigger ca serve` standing in for
//! istiod and answers an mTLS call.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use common::*;
use outrigger_testkit::*;

/// `shellescape.Quote` (istio/istio `pkg/util/shellescape/quote.go`): `''` for empty, the
/// value alone when it has no character outside `[\w@%+=:,./-]`, else single-quoted with `'`
/// written `'"'"'`.
fn quote(s: &str) -> String {
    if s.is_empty() {
        return "''".into();
    }
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if s.chars().all(safe) {
        s.into()
    } else {
        format!("'{}'", s.replace('\'', "'\"'\"'"))
    }
}

/// `mapToString`: one `KEY=quoted` line per entry, sorted, newline-terminated.
fn map_to_string(m: &BTreeMap<&str, String>) -> String {
    let mut lines: Vec<String> = m.iter().map(|(k, v)| format!("{k}={}", quote(v))).collect();
    lines.sort();
    lines.join("\n") + "\n"
}

/// A Kubernetes service-account token's shape (RS256 JWS; the signature is not checked by
/// anyone here: `ca serve --token-file` compares the whole token).
fn token(ns: &str, sa: &str, exp_in: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k1"}"#);
    let p = URL_SAFE_NO_PAD.encode(
        serde_json::json!({
            "aud": ["istio-ca"],
            "exp": now + exp_in,
            "iat": now,
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
        })
        .to_string(),
    );
    format!(
        "{h}.{p}.{}",
        URL_SAFE_NO_PAD.encode(b"not-a-real-signature")
    )
}

/// One istioctl output directory.
struct Sample {
    env: BTreeMap<&'static str, String>,
    mesh_yaml: String,
    hosts: String,
    token: String,
}

impl Sample {
    fn write(&self, dir: &Path, root_cert: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("cluster.env"), map_to_string(&self.env)).unwrap();
        std::fs::write(dir.join("mesh.yaml"), &self.mesh_yaml).unwrap();
        std::fs::write(dir.join("hosts"), &self.hosts).unwrap();
        std::fs::copy(root_cert, dir.join("root-cert.pem")).unwrap();
        std::fs::write(dir.join("istio-token"), &self.token).unwrap();
    }
}

/// A WorkloadGroup `billing` in `legacy` with ports `http-web` and `grpc-api`, labels, a
/// network, cluster `cluster1`, trust domain `example.org`, istioctl run with
/// `--autoregister` and its default `--capture-dns`.
fn named_ports(http: u16, grpc: u16) -> Sample {
    let labels = r#"{"app":"billing","service.istio.io/canonical-name":"billing","service.istio.io/canonical-revision":"v1","version":"v1"}"#;
    let pod_ports = format!(
        r#"[{{"name":"grpc-api","containerPort":{grpc},"protocol":""}},{{"name":"http-web","containerPort":{http},"protocol":""}}]"#
    );
    let metadata: Vec<(&'static str, String)> = vec![
        ("CANONICAL_REVISION", "v1".into()),
        ("CANONICAL_SERVICE", "billing".into()),
        ("ISTIO_METAJSON_LABELS", labels.into()),
        ("ISTIO_META_AUTO_REGISTER_GROUP", "billing".into()),
        ("ISTIO_META_CLUSTER_ID", "cluster1".into()),
        ("ISTIO_META_DNS_CAPTURE", "true".into()),
        ("ISTIO_META_MESH_ID", "mesh1".into()),
        ("ISTIO_META_NETWORK", "vm-network".into()),
        ("ISTIO_META_POD_PORTS", pod_ports),
        ("ISTIO_META_WORKLOAD_NAME", "billing".into()),
        ("POD_NAMESPACE", "legacy".into()),
        ("SERVICE_ACCOUNT", "billing-sa".into()),
        ("TRUST_DOMAIN", "example.org".into()),
    ];
    let mut env: BTreeMap<&'static str, String> = metadata.iter().cloned().collect();
    // ISTIO_INBOUND_PORTS joins the ports of a Go map: any order.
    env.insert("ISTIO_INBOUND_PORTS", format!("{grpc},{http}"));
    env.insert("ISTIO_NAMESPACE", "legacy".into());
    env.insert("ISTIO_SERVICE", "billing.legacy".into());
    env.insert("ISTIO_SERVICE_CIDR", "*".into());
    env.insert("ISTIO_LOCAL_EXCLUDE_PORTS", "22,15090,15021,15020".into());
    env.insert("ISTIO_SVC_IP", "10.0.0.7".into());
    let mut mesh_yaml = "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n  meshId: mesh1\n  proxyMetadata:\n".to_string();
    for (k, v) in &metadata {
        // sigs.k8s.io/yaml quotes what YAML would misread; single quotes suffice here.
        mesh_yaml += &format!("    {k}: '{v}'\n");
    }
    mesh_yaml += "  readinessProbe:\n    httpGet:\n      port: 8080\n";
    Sample {
        env,
        mesh_yaml,
        hosts: "10.0.0.5 istiod.istio-system.svc\n".into(),
        token: token("legacy", "billing-sa", 3600),
    }
}

/// A WorkloadGroup without ports (`ISTIO_INBOUND_PORTS='*'`), a revisioned istiod (`CA_ADDR`),
/// no trust domain, no network, no discoveryAddress, an empty `hosts` (istioctl found no
/// gateway IP), every value quoted as older istioctl releases did (golden
/// testdata/vmconfig/ipv4/cluster.env.golden).
fn star_ports() -> (String, String) {
    let env = "CANONICAL_REVISION='latest'
CANONICAL_SERVICE='foo'
CA_ADDR='istiod-rev-1.istio-system.svc:15012'
ISTIO_INBOUND_PORTS='*'
ISTIO_LOCAL_EXCLUDE_PORTS='22,15090,15021,15020'
ISTIO_METAJSON_LABELS='{\"service.istio.io/canonical-name\":\"foo\",\"service.istio.io/canonical-revision\":\"latest\"}'
ISTIO_META_CLUSTER_ID='Kubernetes'
ISTIO_META_DNS_CAPTURE='true'
ISTIO_META_MESH_ID=''
ISTIO_META_NETWORK=''
ISTIO_META_WORKLOAD_NAME='foo'
ISTIO_NAMESPACE='bar'
ISTIO_SERVICE='foo.bar'
ISTIO_SERVICE_CIDR='*'
ISTIO_SVC_IP='10.10.10.10'
POD_NAMESPACE='bar'
SERVICE_ACCOUNT='vm-serviceaccount'
TRUST_DOMAIN=''
";
    let mesh = "defaultConfig:
  proxyMetadata:
    CANONICAL_REVISION: latest
    CANONICAL_SERVICE: foo
    ISTIO_META_CLUSTER_ID: Kubernetes
    ISTIO_META_DNS_CAPTURE: \"true\"
    ISTIO_META_MESH_ID: \"\"
    ISTIO_META_NETWORK: \"\"
    ISTIO_META_WORKLOAD_NAME: foo
    ISTIO_METAJSON_LABELS: '{\"service.istio.io/canonical-name\":\"foo\",\"service.istio.io/canonical-revision\":\"latest\"}'
    POD_NAMESPACE: bar
    SERVICE_ACCOUNT: vm-serviceaccount
    TRUST_DOMAIN: \"\"
  readinessProbe:
    httpGet:
      port: 8080
";
    (env.into(), mesh.into())
}

/// Runs the binary; returns (exit code, stdout, stderr).
fn outrigger(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn bootstrap(from: &Path, out: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "bootstrap",
        "--from",
        from.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    outrigger(&args)
}

/// A CA made by `outrigger ca init` (the mesh root istioctl would copy).
fn ca(dir: &Path, td: &str) -> PathBuf {
    let ca = dir.join("ca");
    let (code, out, err) = outrigger(&[
        "ca",
        "init",
        "--trust-domain",
        td,
        "--dir",
        ca.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    ca
}

/// agent.yaml without its trailing comments (`value  # comment`).
fn read_yaml(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match l.find("  # ") {
            Some(i) if !l[..i].trim().is_empty() => l[..i].trim_end(),
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn check_config(config: &Path) -> String {
    let (code, out, err) = outrigger(&[
        "run",
        "--check-config",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "check-config failed:\n{out}{err}");
    out
}

#[test]
fn named_ports_labels_network_and_hosts() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ca(tmp.path(), "example.org");
    let from = tmp.path().join("vm-files");
    named_ports(8080, 9090).write(&from, &ca.join("root-cert.pem"));
    let out = tmp.path().join("agent");
    let (code, stdout, stderr) = bootstrap(
        &from,
        &out,
        &[
            "--backend",
            "8080=18080",
            "--backend",
            "grpc-api=127.0.0.1:19090",
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let yaml = read_yaml(&out.join("agent.yaml"));
    for needle in [
        "trustDomain: \"example.org\"",
        "  namespace: \"legacy\"",
        "  serviceAccount: \"billing-sa\"",
        "  name: \"billing\"",
        "  service: \"billing.legacy.svc.cluster.local\"",
        "  cluster: \"cluster1\"",
        "    \"service.istio.io/canonical-name\": \"billing\"",
        "    \"version\": \"v1\"",
        "    address: \"10.0.0.5:15012\"",
        "    serverName: \"istiod.istio-system.svc\"",
        "    rootCert: \"root-cert.pem\"",
        "    tokenFile: \"identity/istio-token\"",
        "    stateDir: \"identity\"",
        "  - name: \"grpc-api\"\n    listen: \"0.0.0.0:9090\"\n    backend: \"127.0.0.1:19090\"",
        "    protocol: grpc",
        "  - name: \"http-web\"\n    listen: \"0.0.0.0:8080\"\n    backend: \"127.0.0.1:18080\"",
        "    protocol: http\n",
        "  paths: [\"policies\"]",
        "  listen: \"127.0.0.1:15000\"",
        "hbone:\n  enabled: false\n  network: \"vm-network\"",
    ] {
        assert!(yaml.contains(needle), "missing {needle:?} in\n{yaml}");
    }
    // The files next to it: the root as istioctl wrote it, the token owner-only.
    assert_eq!(
        std::fs::read(out.join("root-cert.pem")).unwrap(),
        std::fs::read(ca.join("root-cert.pem")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(out.join("identity/istio-token")).unwrap(),
        std::fs::read_to_string(from.join("istio-token")).unwrap()
    );
    assert!(out.join("policies").is_dir());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out.join("identity/istio-token")), 0o600);
        assert_eq!(mode(&out.join("identity")), 0o700);
    }
    // What is not used is listed with the reason; the next steps are printed.
    for needle in [
        "wrote ",
        "for spiffe://example.org/ns/legacy/sa/billing-sa",
        "istiod: 10.0.0.5:15012 (server name istiod.istio-system.svc), from hosts (10.0.0.5 istiod.istio-system.svc) and the port of mesh.yaml defaultConfig.discoveryAddress",
        "inbound http-web: 0.0.0.0:8080 -> 127.0.0.1:18080 (http)",
        "inbound grpc-api: 0.0.0.0:9090 -> 127.0.0.1:19090 (grpc)",
        "  cluster.env ISTIO_SERVICE_CIDR: the outbound ranges istio-agent's iptables rules capture",
        "  cluster.env ISTIO_LOCAL_EXCLUDE_PORTS: ",
        "  cluster.env ISTIO_META_DNS_CAPTURE: istio-agent's DNS proxy",
        "  cluster.env ISTIO_META_AUTO_REGISTER_GROUP: auto-registration",
        "  cluster.env ISTIO_META_MESH_ID: ",
        "  mesh.yaml defaultConfig.readinessProbe: ",
        "  mesh.yaml defaultConfig.meshId: ",
        "outrigger run --check-config --config ",
        "--address 10.0.0.7 | kubectl apply -f -",
        "before the token expires (in ",
        "outrigger service install --config ",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in\n{stdout}");
    }
    // Every key of cluster.env is either used or listed.
    for key in ["CANONICAL_SERVICE", "CANONICAL_REVISION"] {
        assert!(stdout.contains(&format!("cluster.env {key}: ")), "{stdout}");
    }

    // The agent accepts it, and will ask istiod for a first certificate.
    let checked = check_config(&out.join("agent.yaml"));
    assert!(
        checked.contains(
            "configuration OK: spiffe://example.org/ns/legacy/sa/billing-sa (2 inbound listener(s)"
        ),
        "{checked}"
    );
    assert!(
        checked.contains("certificate: none persisted in ")
            && checked.contains(
                "yet; `run` requests one from 10.0.0.5:15012 (server name istiod.istio-system.svc)"
            ),
        "{checked}"
    );
    // `mesh register` reads it: network, ports, labels.
    let (code, reg, err) = outrigger(&[
        "mesh",
        "register",
        "--config",
        out.join("agent.yaml").to_str().unwrap(),
        "--address",
        "10.0.0.7",
    ]);
    assert_eq!(code, 0, "{reg}{err}");
    for needle in [
        "  network: \"vm-network\"",
        "    \"http-web\": 8080",
        "    \"grpc-api\": 9090",
        "  serviceAccount: \"billing-sa\"",
    ] {
        assert!(reg.contains(needle), "missing {needle:?} in\n{reg}");
    }

    // An existing agent.yaml is not overwritten without --force.
    let again = ["--backend", "8080=18080", "--backend", "9090=19090"];
    let (code, _, err) = bootstrap(&from, &out, &again);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!(
            "error: {} exists: pass --force to overwrite it (and root-cert.pem, identity/istio-token); the persisted identity in identity/ is kept",
            out.join("agent.yaml").display()
        )
    );
    let mut forced = again.to_vec();
    forced.push("--force");
    let (code, o, e) = bootstrap(&from, &out, &forced);
    assert_eq!(code, 0, "{o}{e}");
}

#[test]
fn star_ports_and_an_empty_hosts_file() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ca(tmp.path(), "cluster.local");
    let from = tmp.path().join("vm-files");
    std::fs::create_dir_all(&from).unwrap();
    let (env, mesh) = star_ports();
    std::fs::write(from.join("cluster.env"), env).unwrap();
    std::fs::write(from.join("mesh.yaml"), mesh).unwrap();
    std::fs::write(from.join("hosts"), "").unwrap();
    std::fs::copy(ca.join("root-cert.pem"), from.join("root-cert.pem")).unwrap();
    std::fs::write(
        from.join("istio-token"),
        token("bar", "vm-serviceaccount", 3600),
    )
    .unwrap();
    let out = tmp.path().join("agent");

    // '*': Outrigger needs to be told the ports.
    let (code, _, err) = bootstrap(&from, &out, &[]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!(
            "error: {}:4: ISTIO_INBOUND_PORTS: is `*`: the WorkloadGroup declares no ports, and istio-agent would capture every port. Outrigger listens only on the ports it is given: pass --backend <mesh port>=<app port> for each port the mesh calls (e.g. --backend 8080=18080), and add the ports to the WorkloadGroup",
            from.join("cluster.env").display()
        )
    );
    assert!(!out.join("agent.yaml").exists());

    let (code, stdout, stderr) = bootstrap(&from, &out, &["--backend", "8080=18080"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let yaml = read_yaml(&out.join("agent.yaml"));
    for needle in [
        "trustDomain: \"cluster.local\"",
        "  namespace: \"bar\"",
        "  serviceAccount: \"vm-serviceaccount\"",
        "  name: \"foo\"",
        "  cluster: \"Kubernetes\"",
        // No IP in hosts: the revisioned istiod's name, resolved by DNS.
        "    address: \"istiod-rev-1.istio-system.svc:15012\"",
        "    serverName: \"istiod-rev-1.istio-system.svc\"",
        "  - name: \"port-8080\"\n    listen: \"0.0.0.0:8080\"\n    backend: \"127.0.0.1:18080\"\n    protocol: auto",
    ] {
        assert!(yaml.contains(needle), "missing {needle:?} in\n{yaml}");
    }
    assert!(!yaml.contains("hbone:"), "{yaml}");
    for needle in [
        "note: cluster.env TRUST_DOMAIN is empty or absent",
        "has no address for istiod-rev-1.istio-system.svc (istioctl could not find the east-west gateway's IP): the agent resolves istiod-rev-1.istio-system.svc by DNS",
        "re-run bootstrap with --ca-address <gateway IP>:15012",
        "--address 10.10.10.10 |",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in\n{stdout}");
    }
    let checked = check_config(&out.join("agent.yaml"));
    assert!(
        checked.contains("certificate: none persisted in "),
        "{checked}"
    );
}

#[test]
fn quoting_edge_cases() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ca(tmp.path(), "cluster.local");
    let from = tmp.path().join("vm-files");
    let mut s = named_ports(8080, 9090);
    s.env.insert("TRUST_DOMAIN", "cluster.local".into());
    // ProxyConfig metadata a user set (proxy.istio.io/config on the WorkloadGroup): quoted
    // with `'"'"'`, spaces, `$`, a newline, `=`.
    s.env.insert(
        "PROXY_CONFIG_ANNOT_VALUE",
        "it's \"quoted\" $HOME\nsecond line".into(),
    );
    s.env.insert("ISTIO_META_SOME_FLAG", "a=b c".into());
    s.env.insert("IDLE_TIMEOUT", "30m".into());
    // A port whose name names no protocol.
    s.env.insert(
        "ISTIO_META_POD_PORTS",
        r#"[{"name":"grpc-api","containerPort":9090,"protocol":""},{"name":"web","containerPort":8080,"protocol":""}]"#.into(),
    );
    s.hosts = "# written by istioctl\n10.0.0.5   istiod.istio-system.svc  # gateway\n192.0.2.1 unrelated.example\n".into();
    s.write(&from, &ca.join("root-cert.pem"));
    let written = std::fs::read_to_string(from.join("cluster.env")).unwrap();
    assert!(
        written.contains("PROXY_CONFIG_ANNOT_VALUE='it'\"'\"'s \"quoted\" $HOME\nsecond line'\n"),
        "{written}"
    );
    assert!(
        written.contains("ISTIO_INBOUND_PORTS=9090,8080\n"),
        "{written}"
    );
    let out = tmp.path().join("agent");
    let (code, stdout, stderr) = bootstrap(
        &from,
        &out,
        &["--backend", "8080=18080", "--backend", "9090=19090"],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let yaml = read_yaml(&out.join("agent.yaml"));
    for needle in [
        "  - name: \"web\"\n    listen: \"0.0.0.0:8080\"\n    backend: \"127.0.0.1:18080\"\n    protocol: auto",
        "  idleTimeout: \"30m\"",
        "    address: \"10.0.0.5:15012\"",
    ] {
        assert!(yaml.contains(needle), "missing {needle:?} in\n{yaml}");
    }
    for needle in [
        "  cluster.env PROXY_CONFIG_ANNOT_VALUE: an istio-agent or Envoy setting with no Outrigger equivalent",
        "  cluster.env ISTIO_META_SOME_FLAG: ",
        "  hosts line 3: unrelated.example is not istiod's name (istiod.istio-system.svc)",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in\n{stdout}");
    }
    check_config(&out.join("agent.yaml"));
}

/// The samples' errors: each names the file, the key (and line) and the reason.
#[test]
fn errors_name_the_file_key_and_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ca(tmp.path(), "example.org");
    let root = ca.join("root-cert.pem");
    let backends = ["--backend", "8080=18080", "--backend", "9090=19090"];
    let case = |name: &str, edit: &dyn Fn(&mut Sample), files: &dyn Fn(&Path), args: &[&str]| {
        let from = tmp.path().join(name);
        let mut s = named_ports(8080, 9090);
        edit(&mut s);
        s.write(&from, &root);
        files(&from);
        let out = tmp.path().join(format!("{name}-out"));
        let (code, stdout, stderr) = bootstrap(&from, &out, args);
        assert_eq!(code, 1, "{name}: {stdout}{stderr}");
        assert!(!out.join("agent.yaml").exists(), "{name}: wrote a config");
        (from.join("cluster.env"), stderr.trim().to_string())
    };
    let none = |_: &mut Sample| {};
    let keep = |_: &Path| {};

    // Missing cluster.env.
    let (env, err) = case(
        "no-env",
        &none,
        &|d| std::fs::remove_file(d.join("cluster.env")).unwrap(),
        &backends,
    );
    assert_eq!(
        err,
        format!(
            "error: {}: missing (it holds the workload's identity, ports and labels); istioctl x workload entry configure writes cluster.env, mesh.yaml, hosts, root-cert.pem and istio-token: copy the whole directory",
            env.display()
        )
    );

    // Missing SERVICE_ACCOUNT.
    let (env, err) = case(
        "no-sa",
        &|s| {
            s.env.remove("SERVICE_ACCOUNT");
        },
        &keep,
        &backends,
    );
    assert_eq!(
        err,
        format!(
            "error: {}: SERVICE_ACCOUNT: missing: istioctl writes the WorkloadGroup's template.serviceAccount here (default `default`); without it there is no workload identity",
            env.display()
        )
    );

    // ISTIO_META_POD_PORTS that is not the JSON istioctl writes (line 11 of the sorted file).
    let (env, err) = case(
        "bad-ports",
        &|s| {
            s.env.insert(
                "ISTIO_META_POD_PORTS",
                r#"[{"name":"http-web","containerPort":"8080"}]"#.into(),
            );
        },
        &keep,
        &backends,
    );
    assert_eq!(
        err,
        format!(
            "error: {}:11: ISTIO_META_POD_PORTS: not a JSON list of ports: invalid type: string \"8080\", expected i64 at line 1 column 42 (istioctl writes e.g. [{{\"name\":\"http\",\"containerPort\":8080}}])",
            env.display()
        )
    );

    // A port without a backend: the error says exactly what to pass.
    let (env, err) = case("unmapped", &none, &keep, &["--backend", "8080=18080"]);
    assert_eq!(
        err,
        format!(
            "error: {}:11: ISTIO_META_POD_PORTS: no backend for port 9090 (grpc-api): the application must listen on loopback on another port than the mesh's; pass --backend 9090=<app port>",
            env.display()
        )
    );

    // The mesh port itself as the backend.
    let (_, err) = case(
        "same-port",
        &none,
        &keep,
        &["--backend", "8080=8080", "--backend", "9090=19090"],
    );
    assert!(
        err.starts_with(
            "error: --backend 8080=8080: the application cannot use the mesh port 8080 itself"
        ),
        "{err}"
    );

    // A shell construct istioctl never writes.
    let (env, err) = case(
        "expansion",
        &none,
        &|d| {
            let p = d.join("cluster.env");
            let t = std::fs::read_to_string(&p).unwrap() + "EXTRA=$HOME\n";
            std::fs::write(p, t).unwrap();
        },
        &backends,
    );
    assert_eq!(
        err,
        format!(
            "error: {}:20: the value of EXTRA has an unquoted `$`: shell expansion is not supported; put the value in single quotes",
            env.display()
        )
    );

    // A token for another service account.
    let (_, err) = case(
        "other-token",
        &|s| s.token = token("legacy", "someone-else", 3600),
        &keep,
        &backends,
    );
    assert!(
        err.ends_with("the token is for `system:serviceaccount:legacy:someone-else`, but cluster.env names system:serviceaccount:legacy:billing-sa: istiod would refuse the certificate request; the token and cluster.env come from different istioctl runs"),
        "{err}"
    );

    // A root certificate that is not one.
    let (_, err) = case(
        "bad-root",
        &none,
        &|d| std::fs::write(d.join("root-cert.pem"), "hello\n").unwrap(),
        &backends,
    );
    assert!(err.ends_with("root-cert.pem: no PEM certificate in it (istioctl copies the `istio-ca-root-cert` ConfigMap's root-cert.pem here; is the ConfigMap in the namespace?)"), "{err}");

    // mesh.yaml without defaultConfig.
    let (_, err) = case(
        "bad-mesh",
        &|s| s.mesh_yaml = "trustDomain: x\n".into(),
        &keep,
        &backends,
    );
    assert!(err.ends_with("mesh.yaml: defaultConfig: missing: istioctl writes the mesh's ProxyConfig under `defaultConfig:`"), "{err}");
}

/// `outrigger ca serve` standing in for istiod, killed on drop.
fn start_ca(ca_dir: &Path, token: &Path) -> (KillOnDrop, SocketAddr) {
    let log = ca_dir.with_file_name("ca-serve.log");
    let (child, addr) = ca_serve(ca_dir, "127.0.0.1:0", token, &log);
    (KillOnDrop(child), addr)
}

/// The whole flow on one machine: istioctl's files, `bootstrap` pointed at `outrigger ca
/// serve` (standing in for istiod) with --ca-address, then `outrigger run` obtains its
/// certificate with the token and answers a first mTLS call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrapped_agent_obtains_its_certificate_and_answers_mtls() {
    let pki = TestPki::with_trust_domain("example.org");
    let ca_dir = pki.path().join("ca");
    let (http, grpc) = (free_port(), free_port());
    let from = pki.path().join("vm-files");
    let s = named_ports(http, grpc);
    s.write(&from, &ca_dir.join("root-cert.pem"));
    let (_ca, ca_addr) = start_ca(&ca_dir, &from.join("istio-token"));
    let backend = start_echo().await;
    let out = pki.path().join("agent");
    let ca_address = ca_addr.to_string();
    let http_backend = format!("{http}={backend}");
    let grpc_backend = format!("{grpc}={}", backend.port());
    let (code, stdout, stderr) = bootstrap(
        &from,
        &out,
        &[
            "--backend",
            &http_backend,
            "--backend",
            &grpc_backend,
            "--ca-address",
            &ca_address,
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "istiod: {ca_addr} (server name istiod.istio-system.svc), from --ca-address"
        )),
        "{stdout}"
    );
    // As written, except the admin port (tests run in parallel).
    let cfg = std::fs::read_to_string(out.join("agent.yaml"))
        .unwrap()
        .replace("127.0.0.1:15000", "127.0.0.1:0");
    let agent = AgentProc::start(&out, &cfg);
    agent.wait_for_log("Bootstrapped");
    assert!(out.join("identity/cert-chain.pem").is_file());

    let caller = pki.issue("default", "sleep");
    let server: outrigger_identity::Identity = "spiffe://example.org/ns/legacy/sa/billing-sa"
        .parse()
        .unwrap();
    let tls =
        outrigger_tls::client_config(&caller.certs, &pki.trust(), &[server], &[b"istio-http/1.1"])
            .unwrap();
    let conn = tls_connect(SocketAddr::from(([127, 0, 0, 1], http)), tls)
        .await
        .unwrap();
    let mut conn = HttpConn::new(conn, false).await.unwrap();
    let got = conn.fetch(get("/hello", false)).await.unwrap();
    assert_eq!(got.status, 200, "{}", agent.stderr());
    // The application saw the caller's identity.
    let xfcc = got
        .seen()
        .header("x-forwarded-client-cert")
        .unwrap_or_default()
        .to_string();
    assert!(
        xfcc.contains("URI=spiffe://example.org/ns/default/sa/sleep"),
        "{xfcc}"
    );
}
