//! `outrigger bootstrap --from DIR --out DIR`: an agent configuration from the files that
//! `istioctl x workload entry configure` writes for a VM, so that a Windows or Linux host joins
//! the mesh from the same files as istio-agent, with its identity from istiod's CA.
//!
//! What istioctl writes (istio/istio `istioctl/pkg/workload/workload.go`):
//!
//! * `cluster.env` (`createClusterEnv`, `mapToString`): sorted `KEY=value` lines quoted by
//!   `shellescape.Quote`; the keys istioctl sets itself (`ISTIO_INBOUND_PORTS`,
//!   `ISTIO_NAMESPACE`, `ISTIO_SERVICE`, `ISTIO_SERVICE_CIDR`, `ISTIO_LOCAL_EXCLUDE_PORTS`,
//!   `SERVICE_ACCOUNT`, `CA_ADDR` for a revisioned istiod, `ISTIO_SVC_IP`) over every
//!   `proxyMetadata` entry of `createMeshConfig` (`CANONICAL_SERVICE`, `CANONICAL_REVISION`,
//!   `POD_NAMESPACE`, `TRUST_DOMAIN`, `ISTIO_META_CLUSTER_ID`, `ISTIO_META_MESH_ID`,
//!   `ISTIO_META_NETWORK`, `ISTIO_META_POD_PORTS`, `ISTIO_META_WORKLOAD_NAME`,
//!   `ISTIO_METAJSON_LABELS`, `ISTIO_META_DNS_CAPTURE`, `ISTIO_META_AUTO_REGISTER_GROUP`, and
//!   whatever the mesh's or the WorkloadGroup's ProxyConfig adds). Parsed by [`cluster_env`].
//! * `mesh.yaml` (`createMeshConfig`): `defaultConfig:`, the ProxyConfig as a JSON map
//!   (`discoveryAddress`, `meshId`, `proxyMetadata`, `readinessProbe`, ...).
//! * `hosts` (`createHosts`): `"<gateway IP> istiod.<ns>.svc\n"`, or nothing when istioctl
//!   could not find the gateway's address.
//! * `root-cert.pem` (`createCertsTokens`): the mesh root from the `istio-ca-root-cert`
//!   ConfigMap; `istio-token`: a service-account token for the audience `istio-ca`, one hour by
//!   default.
//!
//! The OS hosts file is never edited: the address istiod is dialled at comes from `hosts`, and
//! the name its certificate is verified against from `discoveryAddress` (or `CA_ADDR`).
//! Everything else istioctl wrote that the agent does not use is listed with the reason.

pub mod cluster_env;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use outrigger_proxy::Protocol;
use serde::Deserialize;

use crate::config::{AgentConfig, DEFAULT_CA_ADDRESS};
use cluster_env::ClusterEnv;

pub const AFTER_HELP: &str = "\
Reads the directory `istioctl x workload entry configure -f workloadgroup.yaml -o DIR` wrote
(cluster.env, mesh.yaml, hosts, root-cert.pem, istio-token) and writes DIR/agent.yaml for
`outrigger run`, with the certificate obtained from istiod (certificates.istioCa). Copies
root-cert.pem next to agent.yaml and istio-token into its state directory (identity/,
owner-only), and creates an empty policies/ directory.

Each port of the WorkloadGroup becomes a mesh-facing listener on 0.0.0.0:<port>. The
application must then listen on loopback on another port: say which with --backend
<port>=<app port> (127.0.0.1) or <port>=<ip>:<port>, once per port (the key may also be the
port's name). With ports '*' (the WorkloadGroup declares none), --backend names the ports.
The hosts file of the OS is not edited. The whole flow: docs/onboarding.md.

Example:
  istioctl x workload entry configure -f workloadgroup.yaml -o vm-files --clusterID Kubernetes
  outrigger bootstrap --from vm-files --out C:\\ProgramData\\Outrigger --backend 8080=18080";

#[derive(Args)]
pub struct BootstrapArgs {
    /// The directory istioctl wrote (`istioctl x workload entry configure -o DIR`).
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,
    /// Where to write agent.yaml (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The application behind a mesh port: `8080=18080` (127.0.0.1:18080) or
    /// `8080=127.0.0.1:18080`; the key is the port number or its name. Repeat per port.
    #[arg(long = "backend", value_name = "PORT=[IP:]PORT")]
    pub backends: Vec<String>,
    /// Dial istiod here instead of the address from `hosts` (e.g. another gateway IP, or a
    /// lab `outrigger ca serve`); its certificate is still verified for the istiod name.
    #[arg(long, value_name = "HOST:PORT")]
    pub ca_address: Option<String>,
    /// Overwrite an existing agent.yaml (and root-cert.pem, identity/istio-token) in --out.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: BootstrapArgs) -> anyhow::Result<()> {
    let plan = read(&args)?;
    let written = write(&args, &plan)?;
    print!("{}", report(&args, &plan, &written));
    Ok(())
}

/// Everything read from istioctl's files, checked, before anything is written.
#[derive(Debug)]
pub struct Plan {
    trust_domain: String,
    namespace: String,
    service_account: String,
    workload_name: String,
    service: Option<String>,
    cluster: Option<String>,
    network: Option<String>,
    labels: BTreeMap<String, String>,
    listeners: Vec<Listener>,
    ca_address: String,
    ca_address_from: String,
    server_name: String,
    idle_timeout: Option<String>,
    svc_ip: Option<String>,
    token_expiry: Option<u64>,
    root_cert: Vec<u8>,
    token: Vec<u8>,
    /// (file and key, why it is not used).
    not_used: Vec<(String, String)>,
    notes: Vec<String>,
}

#[derive(Debug)]
struct Listener {
    name: String,
    port: u16,
    backend: SocketAddr,
    protocol: Protocol,
    protocol_from: String,
}

/// A port of the WorkloadGroup, from `ISTIO_META_POD_PORTS` (model.PodPort, JSON) or
/// `ISTIO_INBOUND_PORTS`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodPort {
    #[serde(default)]
    name: String,
    container_port: i64,
    #[serde(default)]
    protocol: String,
}

/// The files, by name.
const CLUSTER_ENV: &str = "cluster.env";
const MESH_YAML: &str = "mesh.yaml";
const HOSTS: &str = "hosts";
const ROOT_CERT: &str = "root-cert.pem";
const TOKEN: &str = "istio-token";
/// Where the agent keeps its key and chain, and where the token is copied.
const STATE_DIR: &str = "identity";
const POLICY_DIR: &str = "policies";

/// Why each key istioctl writes is not used by Outrigger (keys read are absent).
fn not_used_reason(key: &str) -> &'static str {
    match key {
        "ISTIO_SERVICE_CIDR" => {
            "the outbound ranges istio-agent's iptables rules capture; Outrigger captures no traffic: the application calls the mesh through `outbound` listeners (docs/outbound.md)"
        }
        "ISTIO_LOCAL_EXCLUDE_PORTS" => {
            "the inbound ports istio-agent's iptables rules leave alone; Outrigger captures no traffic, so every port but its listeners is untouched (`outrigger doctor` finds application ports open to the network)"
        }
        "ISTIO_META_DNS_CAPTURE" => {
            "istio-agent's DNS proxy; Outrigger has none: `outbound` destinations name their endpoints"
        }
        "ISTIO_META_AUTO_REGISTER_GROUP" => {
            "auto-registration happens over istio-agent's XDS connection to istiod, which Outrigger does not make: register with `outrigger mesh register ... | kubectl apply -f -`"
        }
        "ISTIO_META_MESH_ID" => "Outrigger's metrics and identity carry no mesh ID",
        "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION" => {
            "probe rewriting of istio-agent; Outrigger does not probe the application"
        }
        "CANONICAL_SERVICE" | "CANONICAL_REVISION" => {
            "already in ISTIO_METAJSON_LABELS (service.istio.io/canonical-name, -revision), which is used"
        }
        _ => "an istio-agent or Envoy setting with no Outrigger equivalent",
    }
}

/// The error for one key of one file.
fn key_err(
    file: &Path,
    env: &ClusterEnv,
    key: &str,
    reason: impl std::fmt::Display,
) -> anyhow::Error {
    match env.get(key) {
        Some(e) => anyhow::anyhow!("{}:{}: {key}: {reason}", file.display(), e.line),
        None => anyhow::anyhow!("{}: {key}: {reason}", file.display()),
    }
}

fn read_file(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{}: missing (it holds {what}); istioctl x workload entry configure writes cluster.env, mesh.yaml, hosts, root-cert.pem and istio-token: copy the whole directory",
            path.display()
        ),
        Err(e) => bail!("{}: cannot read: {e}", path.display()),
    }
}

fn text(path: &Path, bytes: Vec<u8>) -> anyhow::Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// A Kubernetes label-style name check for namespaces and service accounts (DNS-1123 label,
/// as SPIFFE path segments accept them).
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

/// `host:port` split, the host without IPv6 brackets.
fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (h, p) = s.rsplit_once(':')?;
    let port = p.parse::<u16>().ok().filter(|p| *p > 0)?;
    let host = h.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || (host.contains(':') && !h.starts_with('[')) {
        return None;
    }
    Some((host.to_string(), port))
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Reads and checks istioctl's files; nothing is written.
pub fn read(args: &BootstrapArgs) -> anyhow::Result<Plan> {
    let dir = &args.from;
    if !dir.is_dir() {
        bail!(
            "--from {}: not a directory (the directory `istioctl x workload entry configure -o DIR` wrote)",
            dir.display()
        );
    }
    let env_path = dir.join(CLUSTER_ENV);
    let env_text = text(
        &env_path,
        read_file(&env_path, "the workload's identity, ports and labels")?,
    )?;
    let env = cluster_env::parse(&env_text)
        .map_err(|e| anyhow::anyhow!("{}:{}: {}", env_path.display(), e.line, e.reason))?;
    let mut used: BTreeSet<&str> = BTreeSet::new();
    let mut notes = Vec::new();
    let get = |key: &str| env.get(key).map(|e| e.value.as_str());
    let kerr = |key: &str, reason: String| key_err(&env_path, &env, key, reason);

    // Identity.
    used.insert("SERVICE_ACCOUNT");
    let service_account = match get("SERVICE_ACCOUNT") {
        None => {
            return Err(kerr(
                "SERVICE_ACCOUNT",
                "missing: istioctl writes the WorkloadGroup's template.serviceAccount here (default `default`); without it there is no workload identity".into(),
            ));
        }
        Some("") => {
            return Err(kerr(
                "SERVICE_ACCOUNT",
                "empty: the workload identity needs a service account".into(),
            ));
        }
        Some(sa) if !dns_label(sa) => {
            return Err(kerr(
                "SERVICE_ACCOUNT",
                format!(
                    "`{sa}` is not a Kubernetes service account name (lowercase letters, digits, `-`, `.`)"
                ),
            ));
        }
        Some(sa) => sa.to_string(),
    };
    used.insert("ISTIO_NAMESPACE");
    used.insert("POD_NAMESPACE");
    let namespace = match (get("ISTIO_NAMESPACE"), get("POD_NAMESPACE")) {
        (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() && a != b => {
            return Err(kerr(
                "POD_NAMESPACE",
                format!(
                    "`{b}` differs from ISTIO_NAMESPACE `{a}`: istioctl writes the WorkloadGroup's namespace into both"
                ),
            ));
        }
        (Some(a), _) if !a.is_empty() => a.to_string(),
        (_, Some(b)) if !b.is_empty() => b.to_string(),
        _ => {
            return Err(kerr(
                "ISTIO_NAMESPACE",
                "missing (and no POD_NAMESPACE): istioctl writes the WorkloadGroup's namespace here".into(),
            ));
        }
    };
    let ns_key = if get("ISTIO_NAMESPACE").is_some_and(|v| !v.is_empty()) {
        "ISTIO_NAMESPACE"
    } else {
        "POD_NAMESPACE"
    };
    if !dns_label(&namespace) {
        return Err(kerr(
            ns_key,
            format!(
                "`{namespace}` is not a Kubernetes namespace name (lowercase letters, digits, `-`)"
            ),
        ));
    }
    used.insert("TRUST_DOMAIN");
    let trust_domain = match get("TRUST_DOMAIN") {
        None | Some("") => {
            notes.push(
                "cluster.env TRUST_DOMAIN is empty or absent (the mesh sets no meshConfig.trustDomain): using Istio's default, cluster.local".to_string(),
            );
            "cluster.local".to_string()
        }
        Some(td) => {
            outrigger_identity::validate_trust_domain(td).map_err(|why| {
                kerr(
                    "TRUST_DOMAIN",
                    format!("`{td}` is not a trust domain: {why}"),
                )
            })?;
            td.to_string()
        }
    };

    // Workload metadata.
    used.insert("ISTIO_META_WORKLOAD_NAME");
    used.insert("ISTIO_SERVICE");
    let service_short = get("ISTIO_SERVICE").filter(|s| !s.is_empty());
    let workload_name = match get("ISTIO_META_WORKLOAD_NAME").filter(|s| !s.is_empty()) {
        Some(n) => n.to_string(),
        None => service_short
            .and_then(|s| s.split('.').next())
            .unwrap_or(&service_account)
            .to_string(),
    };
    // ISTIO_SERVICE is `<WorkloadGroup name>.<namespace>`: as a Kubernetes Service name in
    // the default DNS domain.
    let service = service_short.map(|s| {
        if s.contains('.') {
            format!("{s}.svc.cluster.local")
        } else {
            format!("{s}.{namespace}.svc.cluster.local")
        }
    });
    used.insert("ISTIO_META_CLUSTER_ID");
    let cluster = get("ISTIO_META_CLUSTER_ID")
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    if cluster.is_none() {
        notes.push(
            "cluster.env ISTIO_META_CLUSTER_ID is empty: the clusterid header istiod checks the token with is Istio's default, Kubernetes (set --clusterID on istioctl for another cluster)".to_string(),
        );
    }
    used.insert("ISTIO_META_NETWORK");
    let network = match get("ISTIO_META_NETWORK").filter(|s| !s.is_empty()) {
        None => None,
        Some(n) => {
            let ok = n.len() <= 63
                && n.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
            if !ok {
                return Err(kerr(
                    "ISTIO_META_NETWORK",
                    format!(
                        "`{n}` is not a network name (letters, digits, `-`, `_`, `.`; at most 63)"
                    ),
                ));
            }
            Some(n.to_string())
        }
    };
    used.insert("ISTIO_METAJSON_LABELS");
    let labels: BTreeMap<String, String> = match get("ISTIO_METAJSON_LABELS") {
        None | Some("") => BTreeMap::new(),
        Some(j) => serde_json::from_str(j).map_err(|e| {
            kerr(
                "ISTIO_METAJSON_LABELS",
                format!("not a JSON object of string labels: {e} (istioctl writes e.g. {{\"app\":\"foo\",\"service.istio.io/canonical-name\":\"foo\"}})"),
            )
        })?,
    };
    used.insert("ISTIO_SVC_IP");
    let svc_ip = match get("ISTIO_SVC_IP").filter(|s| !s.is_empty()) {
        None => None,
        Some(ip) => {
            ip.parse::<IpAddr>()
                .map_err(|_| kerr("ISTIO_SVC_IP", format!("`{ip}` is not an IP address")))?;
            Some(ip.to_string())
        }
    };
    used.insert("IDLE_TIMEOUT");
    let idle_timeout = get("IDLE_TIMEOUT")
        .filter(|s| !s.is_empty())
        .map(str::to_string);

    // Ports.
    used.insert("ISTIO_META_POD_PORTS");
    used.insert("ISTIO_INBOUND_PORTS");
    let listeners = listeners(args, &env_path, &env)?;

    // istiod: the name from mesh.yaml (or CA_ADDR), the address from hosts.
    let mesh_path = dir.join(MESH_YAML);
    let mesh_text = text(
        &mesh_path,
        read_file(&mesh_path, "the mesh's ProxyConfig (istiod's address)")?,
    )?;
    let mut not_used: Vec<(String, String)> = Vec::new();
    let discovery = mesh_yaml(&mesh_path, &mesh_text, &env, &mut not_used, &mut notes)?;
    used.insert("CA_ADDR");
    let (target, target_from) = match get("CA_ADDR").filter(|s| !s.is_empty()) {
        Some(a) => (a.to_string(), "cluster.env CA_ADDR".to_string()),
        None => match discovery {
            Some(d) => (d, "mesh.yaml defaultConfig.discoveryAddress".to_string()),
            None => (
                DEFAULT_CA_ADDRESS.to_string(),
                "Istio's default (mesh.yaml has no discoveryAddress)".to_string(),
            ),
        },
    };
    let Some((istiod_host, istiod_port)) = split_host_port(&target) else {
        if target_from.starts_with("cluster.env") {
            return Err(kerr("CA_ADDR", format!("`{target}` is not host:port")));
        }
        bail!(
            "{}: defaultConfig.discoveryAddress: `{target}` is not host:port (istioctl writes e.g. istiod.istio-system.svc:15012)",
            mesh_path.display()
        );
    };
    let server_name = istiod_host.clone();
    let hosts_path = dir.join(HOSTS);
    let hosts_ip = match read_file(&hosts_path, "istiod's address for this host") {
        Ok(b) => hosts(
            &hosts_path,
            &text(&hosts_path, b)?,
            &istiod_host,
            &mut not_used,
        )?,
        Err(e) if args.ca_address.is_some() => {
            notes.push(format!("{e:#} (not needed with --ca-address)"));
            None
        }
        Err(e) => return Err(e),
    };
    let (ca_address, ca_address_from) = match (&args.ca_address, hosts_ip) {
        (Some(a), _) => {
            if split_host_port(a).is_none() {
                bail!("--ca-address {a}: not host:port (e.g. 10.0.0.5:15012)");
            }
            (a.clone(), "--ca-address".to_string())
        }
        (None, Some(ip)) => (
            join_host_port(&ip.to_string(), istiod_port),
            format!("{HOSTS} ({ip} {istiod_host}) and the port of {target_from}"),
        ),
        (None, None) => {
            notes.push(format!(
                "{} has no address for {istiod_host} (istioctl could not find the east-west gateway's IP): the agent resolves {istiod_host} by DNS, which works only where this host's DNS knows it; otherwise re-run bootstrap with --ca-address <gateway IP>:{istiod_port}",
                hosts_path.display()
            ));
            (target.clone(), target_from.clone())
        }
    };

    // Root certificate and token.
    let root_path = dir.join(ROOT_CERT);
    let root_cert = read_file(&root_path, "the mesh's root certificate")?;
    {
        use rustls_pki_types::pem::PemObject;
        let certs: Result<Vec<_>, _> =
            rustls_pki_types::CertificateDer::pem_slice_iter(&root_cert).collect();
        match certs {
            Ok(c) if !c.is_empty() => {}
            Ok(_) => bail!(
                "{}: no PEM certificate in it (istioctl copies the `istio-ca-root-cert` ConfigMap's root-cert.pem here; is the ConfigMap in the namespace?)",
                root_path.display()
            ),
            Err(e) => bail!("{}: not a PEM certificate: {e}", root_path.display()),
        }
    }
    let token_path = dir.join(TOKEN);
    let token = read_file(
        &token_path,
        "the bootstrap token istiod accepts for the first certificate",
    )?;
    let token_text = String::from_utf8_lossy(&token).trim().to_string();
    if token_text.is_empty() {
        bail!(
            "{}: empty: istioctl writes a service-account token here",
            token_path.display()
        );
    }
    let token_expiry = check_token(
        &token_path,
        &token_text,
        &namespace,
        &service_account,
        &mut notes,
    )?;

    // What is not used from cluster.env, with the reason.
    for e in &env.entries {
        if !used.contains(e.key.as_str()) {
            not_used.push((
                format!("{CLUSTER_ENV} {}", e.key),
                not_used_reason(&e.key).to_string(),
            ));
        }
    }
    not_used.sort();

    Ok(Plan {
        trust_domain,
        namespace,
        service_account,
        workload_name,
        service,
        cluster,
        network,
        labels,
        listeners,
        ca_address,
        ca_address_from,
        server_name,
        idle_timeout,
        svc_ip,
        token_expiry,
        root_cert,
        token,
        not_used,
        notes,
    })
}

/// The mesh-facing listeners: the WorkloadGroup's ports, each with its `--backend`.
fn listeners(
    args: &BootstrapArgs,
    env_path: &Path,
    env: &ClusterEnv,
) -> anyhow::Result<Vec<Listener>> {
    let kerr = |key: &str, reason: String| key_err(env_path, env, key, reason);
    // (name, port) of the WorkloadGroup.
    let mut ports: Vec<(String, u16)> = Vec::new();
    if let Some(j) = env.get("ISTIO_META_POD_PORTS").map(|e| e.value.as_str()) {
        let list: Vec<PodPort> = serde_json::from_str(j).map_err(|e| {
            kerr(
                "ISTIO_META_POD_PORTS",
                format!(
                    "not a JSON list of ports: {e} (istioctl writes e.g. [{{\"name\":\"http\",\"containerPort\":8080}}])"
                ),
            )
        })?;
        for p in list {
            let port = u16::try_from(p.container_port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    kerr(
                        "ISTIO_META_POD_PORTS",
                        format!(
                            "containerPort {} of `{}` is not a port (1 to 65535)",
                            p.container_port, p.name
                        ),
                    )
                })?;
            if !(p.protocol.is_empty() || p.protocol.eq_ignore_ascii_case("TCP")) {
                return Err(kerr(
                    "ISTIO_META_POD_PORTS",
                    format!("port {port} is {}: Outrigger carries TCP only", p.protocol),
                ));
            }
            let name = if p.name.is_empty() {
                format!("port-{port}")
            } else {
                p.name
            };
            if ports.iter().any(|(n, q)| *n == name || *q == port) {
                return Err(kerr(
                    "ISTIO_META_POD_PORTS",
                    format!("port {port} (`{name}`) is listed twice"),
                ));
            }
            ports.push((name, port));
        }
    }
    let star = match env.get("ISTIO_INBOUND_PORTS").map(|e| e.value.trim()) {
        None | Some("") | Some("*") => true,
        Some(list) => {
            let mut nums = BTreeSet::new();
            for p in list.split(',') {
                let n = p.trim().parse::<u16>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    kerr(
                        "ISTIO_INBOUND_PORTS",
                        format!("`{p}` is not a port: istioctl writes `*` or the WorkloadGroup's ports, e.g. 8080,9090"),
                    )
                })?;
                nums.insert(n);
            }
            if ports.is_empty() {
                ports = nums.iter().map(|n| (format!("port-{n}"), *n)).collect();
            } else {
                let named: BTreeSet<u16> = ports.iter().map(|(_, p)| *p).collect();
                if named != nums {
                    return Err(kerr(
                        "ISTIO_INBOUND_PORTS",
                        format!(
                            "{list} are not the ports of ISTIO_META_POD_PORTS ({}); istioctl writes both from the WorkloadGroup's ports",
                            named
                                .iter()
                                .map(u16::to_string)
                                .collect::<Vec<_>>()
                                .join(",")
                        ),
                    ));
                }
            }
            false
        }
    };
    if star && !ports.is_empty() {
        return Err(kerr(
            "ISTIO_INBOUND_PORTS",
            "is `*` but ISTIO_META_POD_PORTS lists ports; istioctl writes both from the WorkloadGroup's ports".into(),
        ));
    }

    // --backend KEY=[IP:]PORT.
    let mut backends: Vec<(u16, SocketAddr, &str)> = Vec::new();
    for b in &args.backends {
        let Some((key, target)) = b.split_once('=') else {
            bail!(
                "--backend {b}: write <mesh port>=<app port>, e.g. --backend 8080=18080 or 8080=127.0.0.1:18080"
            );
        };
        let port = match key.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => match ports.iter().find(|(n, _)| n == key) {
                Some((_, p)) => *p,
                None => bail!(
                    "--backend {b}: `{key}` is neither a port number nor a port name of the WorkloadGroup{}",
                    if ports.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " ({})",
                            ports
                                .iter()
                                .map(|(n, p)| format!("{n}={p}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                ),
            },
        };
        let backend: SocketAddr = match target.parse::<u16>() {
            Ok(p) if p > 0 => SocketAddr::from(([127, 0, 0, 1], p)),
            _ => target.parse().map_err(|_| {
                anyhow::anyhow!(
                    "--backend {b}: `{target}` is neither a port nor an IP:port (e.g. 18080 or 127.0.0.1:18080)"
                )
            })?,
        };
        if !backend.ip().is_loopback() {
            bail!(
                "--backend {b}: {backend} is not a loopback address: the application must listen on 127.0.0.1 or ::1 so that only Outrigger can reach it"
            );
        }
        if backend.port() == port {
            bail!(
                "--backend {b}: the application cannot use the mesh port {port} itself: Outrigger listens on 0.0.0.0:{port}, and the application's 127.0.0.1:{port} would conflict with it (or, where the OS allows both, take loopback callers around Outrigger). Move the application to another loopback port, e.g. --backend {port}={}",
                port.checked_add(10000).unwrap_or(port - 1)
            );
        }
        if backends.iter().any(|(p, _, _)| *p == port) {
            bail!("--backend {b}: port {port} has a backend already");
        }
        if !star && !ports.iter().any(|(_, p)| *p == port) {
            bail!(
                "--backend {b}: port {port} is not a port of the WorkloadGroup ({}): the mesh does not send traffic to it. Add it to the WorkloadGroup's template.ports and run istioctl again",
                ports
                    .iter()
                    .map(|(n, p)| format!("{n}={p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        backends.push((port, backend, b.as_str()));
    }
    if star {
        if backends.is_empty() {
            return Err(kerr(
                "ISTIO_INBOUND_PORTS",
                "is `*`: the WorkloadGroup declares no ports, and istio-agent would capture every port. Outrigger listens only on the ports it is given: pass --backend <mesh port>=<app port> for each port the mesh calls (e.g. --backend 8080=18080), and add the ports to the WorkloadGroup".into(),
            ));
        }
        return Ok(backends
            .into_iter()
            .map(|(port, backend, _)| Listener {
                name: format!("port-{port}"),
                port,
                backend,
                protocol: Protocol::Auto,
                protocol_from: "no port name (ISTIO_INBOUND_PORTS is `*`): detected per connection"
                    .into(),
            })
            .collect());
    }
    let missing: Vec<&(String, u16)> = ports
        .iter()
        .filter(|(_, p)| !backends.iter().any(|(q, _, _)| q == p))
        .collect();
    if !missing.is_empty() {
        let key = if env.get("ISTIO_META_POD_PORTS").is_some() {
            "ISTIO_META_POD_PORTS"
        } else {
            "ISTIO_INBOUND_PORTS"
        };
        return Err(kerr(
            key,
            format!(
                "no backend for {}: the application must listen on loopback on another port than the mesh's; pass {}",
                missing
                    .iter()
                    .map(|(n, p)| format!("port {p} ({n})"))
                    .collect::<Vec<_>>()
                    .join(", "),
                missing
                    .iter()
                    .map(|(_, p)| format!("--backend {p}=<app port>"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ));
    }
    Ok(ports
        .into_iter()
        .map(|(name, port)| {
            let backend = backends
                .iter()
                .find(|(p, _, _)| *p == port)
                .map(|(_, b, _)| *b)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], port)));
            let (protocol, protocol_from) = match Protocol::from_port_name(&name) {
                Some(p) => (
                    p,
                    format!("the port name `{name}` (Istio's port-naming convention)"),
                ),
                None => (
                    Protocol::Auto,
                    format!("the port name `{name}` names no protocol: detected per connection"),
                ),
            };
            Listener {
                name,
                port,
                backend,
                protocol,
                protocol_from,
            }
        })
        .collect())
}

/// `mesh.yaml`: the discovery address; the rest is listed as not used.
fn mesh_yaml(
    path: &Path,
    text: &str,
    env: &ClusterEnv,
    not_used: &mut Vec<(String, String)>,
    notes: &mut Vec<String>,
) -> anyhow::Result<Option<String>> {
    let doc: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_saphyr::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}: not YAML: {e}", path.display()))?
    };
    let Some(dc) = doc.get("defaultConfig") else {
        bail!(
            "{}: defaultConfig: missing: istioctl writes the mesh's ProxyConfig under `defaultConfig:`",
            path.display()
        );
    };
    let Some(dc) = dc.as_object() else {
        bail!("{}: defaultConfig: not a mapping", path.display());
    };
    if let Some(obj) = doc.as_object() {
        for k in obj.keys().filter(|k| *k != "defaultConfig") {
            not_used.push((
                format!("{MESH_YAML} {k}"),
                "istioctl writes only defaultConfig; Outrigger reads nothing else".into(),
            ));
        }
    }
    let mut discovery = None;
    for (k, v) in dc {
        match k.as_str() {
            "discoveryAddress" => match v.as_str() {
                Some(s) if !s.is_empty() => discovery = Some(s.to_string()),
                Some(_) => {}
                None => bail!(
                    "{}: defaultConfig.discoveryAddress: not a string (istioctl writes e.g. istiod.istio-system.svc:15012)",
                    path.display()
                ),
            },
            "proxyMetadata" => {
                let Some(md) = v.as_object() else {
                    bail!("{}: defaultConfig.proxyMetadata: not a mapping", path.display());
                };
                // istioctl copies every entry into cluster.env, which is what is read.
                for (mk, mv) in md {
                    let mv = match mv {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    match env.get(mk) {
                        Some(e) if e.value == mv => {}
                        Some(e) => notes.push(format!(
                            "mesh.yaml proxyMetadata {mk} is `{mv}` but cluster.env says `{}`: cluster.env is used (istio-agent reads it last too)",
                            e.value
                        )),
                        None => not_used.push((
                            format!("{MESH_YAML} defaultConfig.proxyMetadata.{mk}"),
                            "not in cluster.env, where istioctl copies every proxyMetadata entry; cluster.env is what is read".into(),
                        )),
                    }
                }
            }
            "readinessProbe" => not_used.push((
                format!("{MESH_YAML} defaultConfig.readinessProbe"),
                "istio-agent probes the application and reports its health to istiod over XDS, which Outrigger does not connect to; /healthz/ready reports the agent's own readiness".into(),
            )),
            "meshId" => not_used.push((
                format!("{MESH_YAML} defaultConfig.meshId"),
                not_used_reason("ISTIO_META_MESH_ID").into(),
            )),
            other => not_used.push((
                format!("{MESH_YAML} defaultConfig.{other}"),
                "a ProxyConfig setting for istio-agent or Envoy with no Outrigger equivalent".into(),
            )),
        }
    }
    Ok(discovery)
}

/// `hosts`: the IP for `istiod_host`, if a line names it. Other lines are listed as not used.
fn hosts(
    path: &Path,
    text: &str,
    istiod_host: &str,
    not_used: &mut Vec<(String, String)>,
) -> anyhow::Result<Option<IpAddr>> {
    let mut found = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let Some(ip) = fields.next() else { continue };
        let names: Vec<&str> = fields.collect();
        let ip: IpAddr = ip.parse().map_err(|_| {
            anyhow::anyhow!(
                "{}:{}: `{ip}` is not an IP address (istioctl writes `<gateway IP> {istiod_host}`)",
                path.display(),
                i + 1
            )
        })?;
        if names.is_empty() {
            bail!(
                "{}:{}: {ip} has no host name after it",
                path.display(),
                i + 1
            );
        }
        if names.iter().any(|n| n.eq_ignore_ascii_case(istiod_host)) {
            if let Some(prev) = found
                && prev != ip
            {
                bail!(
                    "{}:{}: {istiod_host} is mapped to both {prev} and {ip}",
                    path.display(),
                    i + 1
                );
            }
            found = Some(ip);
        } else {
            not_used.push((
                format!("{HOSTS} line {}", i + 1),
                format!(
                    "{} is not istiod's name ({istiod_host}); the OS hosts file is never edited",
                    names.join(" ")
                ),
            ));
        }
    }
    Ok(found)
}

/// Reads what a Kubernetes token says about itself: its subject must be this workload's
/// service account (istiod refuses a CSR for another identity); its expiry is reported.
fn check_token(
    path: &Path,
    token: &str,
    namespace: &str,
    service_account: &str,
    notes: &mut Vec<String>,
) -> anyhow::Result<Option<u64>> {
    let Ok(t) = outrigger_policy::jwt::decode(token) else {
        notes.push(format!(
            "{} is not a JWT Outrigger can read (a Kubernetes service-account token is one): it is sent to the CA as it is",
            path.display()
        ));
        return Ok(None);
    };
    let want = format!("system:serviceaccount:{namespace}:{service_account}");
    if let Some(sub) = t.claims.get("sub").and_then(|s| s.as_str())
        && sub != want
    {
        bail!(
            "{}: the token is for `{sub}`, but cluster.env names {want}: istiod would refuse the certificate request; the token and cluster.env come from different istioctl runs",
            path.display()
        );
    }
    let aud_ok = match t.claims.get("aud") {
        None => true,
        Some(serde_json::Value::String(a)) => a == "istio-ca",
        Some(serde_json::Value::Array(a)) => a.iter().any(|x| x == "istio-ca"),
        Some(_) => false,
    };
    if !aud_ok {
        notes.push(format!(
            "{}: the token's audience is not istio-ca (what istioctl requests and istiod checks by default)",
            path.display()
        ));
    }
    let exp = t.claims.get("exp").and_then(|e| e.as_u64());
    if let Some(exp) = exp {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if exp <= now {
            notes.push(format!(
                "{}: the token EXPIRED {} ago: istiod will refuse it. Get a new one (istioctl x workload entry configure again, or `kubectl create token {service_account} -n {namespace} --audience istio-ca`) before the first `outrigger run`",
                path.display(),
                ago(now - exp)
            ));
        }
    }
    Ok(exp)
}

fn ago(secs: u64) -> String {
    match secs {
        s if s >= 86400 => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
        s if s >= 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A YAML scalar: JSON's string syntax is valid YAML and quotes everything that needs it.
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// One YAML line with its comment in a column of its own.
fn c(w: &mut String, line: &str, comment: &str) {
    let _ = writeln!(w, "{line:<40}  # {comment}");
}

/// The agent configuration text.
pub fn render(plan: &Plan, from: &Path) -> String {
    let mut y = String::new();
    let w = &mut y;
    let _ = writeln!(
        w,
        "# Written by `outrigger bootstrap` from the files of `istioctl x workload entry configure`\n# in {}. Reference: docs/config.md; the flow: docs/onboarding.md.",
        from.display()
    );
    let _ = writeln!(
        w,
        "\n# cluster.env TRUST_DOMAIN (Istio's default when empty)."
    );
    let _ = writeln!(w, "trustDomain: {}", q(&plan.trust_domain));
    let _ = writeln!(w, "\nworkload:");
    c(
        w,
        &format!("  namespace: {}", q(&plan.namespace)),
        "cluster.env ISTIO_NAMESPACE",
    );
    c(
        w,
        &format!("  serviceAccount: {}", q(&plan.service_account)),
        "cluster.env SERVICE_ACCOUNT",
    );
    c(
        w,
        &format!("  name: {}", q(&plan.workload_name)),
        "cluster.env ISTIO_META_WORKLOAD_NAME",
    );
    if let Some(s) = &plan.service {
        c(
            w,
            &format!("  service: {}", q(s)),
            "cluster.env ISTIO_SERVICE, in the default DNS domain cluster.local",
        );
    }
    if let Some(cl) = &plan.cluster {
        c(
            w,
            &format!("  cluster: {}", q(cl)),
            "cluster.env ISTIO_META_CLUSTER_ID: the clusterid header sent to istiod",
        );
    }
    if !plan.labels.is_empty() {
        c(w, "  labels:", "cluster.env ISTIO_METAJSON_LABELS");
        for (k, v) in &plan.labels {
            let _ = writeln!(w, "    {}: {}", q(k), q(v));
        }
    }
    let _ = writeln!(
        w,
        "\n# The workload certificate comes from istiod's CA (Istio's CA API, as istio-agent's)."
    );
    let _ = writeln!(w, "certificates:\n  istioCa:");
    c(
        w,
        &format!("    address: {}", q(&plan.ca_address)),
        &format!("from {}", plan.ca_address_from),
    );
    c(
        w,
        &format!("    serverName: {}", q(&plan.server_name)),
        "the name istiod's certificate is verified for",
    );
    c(
        w,
        &format!("    rootCert: {}", q(ROOT_CERT)),
        "istioctl's root-cert.pem, copied",
    );
    c(
        w,
        &format!("    tokenFile: {}", q(&format!("{STATE_DIR}/{TOKEN}"))),
        "istioctl's istio-token, copied owner-only; first request only",
    );
    c(
        w,
        &format!("    stateDir: {}", q(STATE_DIR)),
        "the key and chain, kept across restarts",
    );
    let _ = writeln!(w, "    ttl: 24h");
    let _ = writeln!(
        w,
        "\n# One mesh-facing listener per WorkloadGroup port; the application listens on loopback."
    );
    let _ = writeln!(w, "inbound:");
    for l in &plan.listeners {
        let _ = writeln!(w, "  - name: {}", q(&l.name));
        let _ = writeln!(w, "    listen: {}", q(&format!("0.0.0.0:{}", l.port)));
        c(
            w,
            &format!("    backend: {}", q(&l.backend.to_string())),
            "--backend: the application, on loopback",
        );
        c(
            w,
            &format!("    protocol: {}", l.protocol.as_str()),
            &format!("from {}", l.protocol_from),
        );
    }
    let _ = writeln!(
        w,
        "\n# PeerAuthentication / AuthorizationPolicy YAML as applied to the cluster (docs/policy.md).\n# Empty: STRICT mTLS, every mesh identity allowed (Istio's meaning of no AuthorizationPolicy)."
    );
    let _ = writeln!(
        w,
        "policy:\n  paths: [{}]\n  defaultMtlsMode: STRICT",
        q(POLICY_DIR)
    );
    let _ = writeln!(w, "\nadmin:");
    c(
        w,
        "  listen: \"127.0.0.1:15000\"",
        "/healthz/ready, /metrics, /config_dump",
    );
    if let Some(n) = &plan.network {
        let _ = writeln!(
            w,
            "\n# cluster.env ISTIO_META_NETWORK: the WorkloadEntry's network (`outrigger mesh register`).\nhbone:\n  enabled: false\n  network: {}",
            q(n)
        );
    }
    if let Some(t) = &plan.idle_timeout {
        let _ = writeln!(w, "\nconnections:");
        c(
            w,
            &format!("  idleTimeout: {}", q(t)),
            "cluster.env IDLE_TIMEOUT (proxy metadata)",
        );
    }
    y
}

/// What `write` did, for the report.
pub struct Written {
    config: PathBuf,
    copied_root: bool,
}

/// Writes agent.yaml, root-cert.pem, identity/istio-token and policies/ into `--out`.
pub fn write(args: &BootstrapArgs, plan: &Plan) -> anyhow::Result<Written> {
    let out = &args.out;
    let config = out.join("agent.yaml");
    let text = render(plan, &args.from);
    // What the agent will read: checked before anything is written.
    AgentConfig::parse(&config, &text).map_err(|e| {
        anyhow::anyhow!(
            "bootstrap wrote a configuration the agent refuses (a bug; please report it): {e}"
        )
    })?;
    if config.exists() && !args.force {
        bail!(
            "{} exists: pass --force to overwrite it (and root-cert.pem, {STATE_DIR}/{TOKEN}); the persisted identity in {STATE_DIR}/ is kept",
            config.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y);
    let root_to = out.join(ROOT_CERT);
    let copied_root = !same(&args.from.join(ROOT_CERT), &root_to);
    if copied_root {
        std::fs::write(&root_to, &plan.root_cert)
            .with_context(|| format!("writing {}", root_to.display()))?;
    }
    let state = out.join(STATE_DIR);
    create_private_dir(&state)?;
    let token_to = state.join(TOKEN);
    write_private(&token_to, &plan.token)?;
    std::fs::create_dir_all(out.join(POLICY_DIR))
        .with_context(|| format!("creating {}", out.join(POLICY_DIR).display()))?;
    let tmp = out.join("agent.yaml.tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &config).with_context(|| format!("writing {}", config.display()))?;
    Ok(Written {
        config,
        copied_root,
    })
}

/// A directory only its owner can enter (Unix 0700). On Windows `outrigger service install`
/// restricts it to SYSTEM, Administrators and the service account.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(())
}

/// A file only its owner can read (Unix 0600, set before the secret is written).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// What was written, what is not used and why, and the next steps.
pub fn report(args: &BootstrapArgs, plan: &Plan, written: &Written) -> String {
    let mut s = String::new();
    let w = &mut s;
    let cfg = written.config.display().to_string();
    let out = args.out.display();
    let id = format!(
        "spiffe://{}/ns/{}/sa/{}",
        plan.trust_domain, plan.namespace, plan.service_account
    );
    let _ = writeln!(w, "wrote {cfg} for {id}");
    if written.copied_root {
        let _ = writeln!(w, "  {ROOT_CERT}: copied into {out}");
    }
    let _ = writeln!(
        w,
        "  {TOKEN}: copied into {} (owner-only; on Windows `service install` restricts the directory)",
        args.out.join(STATE_DIR).display()
    );
    let _ = writeln!(
        w,
        "  {POLICY_DIR}/: policy YAML goes here (empty: STRICT mTLS, no AuthorizationPolicy)"
    );
    let _ = writeln!(
        w,
        "  istiod: {} (server name {}), from {}",
        plan.ca_address, plan.server_name, plan.ca_address_from
    );
    for l in &plan.listeners {
        let _ = writeln!(
            w,
            "  inbound {}: 0.0.0.0:{} -> {} ({})",
            l.name,
            l.port,
            l.backend,
            l.protocol.as_str()
        );
    }
    if let Some(n) = &plan.network {
        let _ = writeln!(w, "  network: {n}");
    }
    for n in &plan.notes {
        let _ = writeln!(w, "note: {n}");
    }
    if !plan.not_used.is_empty() {
        let _ = writeln!(w, "\nNot used:");
        for (what, why) in &plan.not_used {
            let _ = writeln!(w, "  {what}: {why}");
        }
    }
    let address = plan.svc_ip.as_deref().unwrap_or("<this host's IP>");
    let _ = writeln!(w, "\nNext steps:");
    let _ = writeln!(
        w,
        "  1. Check it (binds nothing, calls nothing):\n       outrigger run --check-config --config {cfg}"
    );
    let _ = writeln!(
        w,
        "  2. Register this host with the mesh (where kubectl works; --name for a second host):\n       outrigger mesh register --config {cfg} --address {address} | kubectl apply -f -"
    );
    let backends: Vec<String> = plan
        .listeners
        .iter()
        .map(|l| l.backend.to_string())
        .collect();
    let _ = writeln!(
        w,
        "  3. Make the application listen on {} only.",
        backends.join(", ")
    );
    let expiry = match plan.token_expiry {
        Some(exp) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            if exp > now {
                format!(" before the token expires (in {})", ago(exp - now))
            } else {
                " with a fresh token (this one has expired)".to_string()
            }
        }
        None => String::new(),
    };
    let _ = writeln!(
        w,
        "  4. Start the agent{expiry}; it obtains its certificate from istiod and keeps it in {}:\n       Linux:   outrigger run --config {cfg}   (or the systemd unit in docs/onboarding.md)\n       Windows: outrigger service install --config {cfg}; outrigger service start",
        args.out.join(STATE_DIR).display()
    );
    let _ = writeln!(
        w,
        "     Renewals use the certificate itself, so the one-hour token is not needed again."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_splits_names_and_ipv6() {
        assert_eq!(
            split_host_port("istiod.istio-system.svc:15012"),
            Some(("istiod.istio-system.svc".into(), 15012))
        );
        assert_eq!(
            split_host_port("[fd00::1]:15012"),
            Some(("fd00::1".into(), 15012))
        );
        assert_eq!(split_host_port("fd00::1"), None);
        assert_eq!(split_host_port("istiod:0"), None);
        assert_eq!(split_host_port(":15012"), None);
        assert_eq!(join_host_port("fd00::1", 15012), "[fd00::1]:15012");
    }

    #[test]
    fn hosts_lines_and_errors() {
        let mut nu = Vec::new();
        let p = Path::new("d/hosts");
        assert_eq!(
            hosts(
                p,
                "10.0.0.5 istiod.istio-system.svc\n",
                "istiod.istio-system.svc",
                &mut nu
            )
            .unwrap(),
            Some("10.0.0.5".parse().unwrap())
        );
        assert_eq!(
            hosts(p, "", "istiod.istio-system.svc", &mut nu).unwrap(),
            None
        );
        assert!(nu.is_empty());
        assert_eq!(
            hosts(
                p,
                "# c\n1.2.3.4 other\n",
                "istiod.istio-system.svc",
                &mut nu
            )
            .unwrap(),
            None
        );
        assert_eq!(nu.len(), 1);
        let e = hosts(p, "\nnot-an-ip istiod\n", "istiod", &mut nu).unwrap_err();
        assert_eq!(
            e.to_string(),
            "d/hosts:2: `not-an-ip` is not an IP address (istioctl writes `<gateway IP> istiod`)"
        );
    }
}
