//! Starting the real `outrigger` binary for integration tests.
#![allow(dead_code)]

pub mod envoy;
pub mod ws;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outrigger_identity::Identity;
use outrigger_testkit::{HttpConn, Issued, TestPki, tls_connect};

pub const BIN: &str = env!("CARGO_BIN_EXE_outrigger");

/// The mesh-facing identity of the agent under test.
pub const AGENT_NS: &str = "legacy";
pub const AGENT_SA: &str = "windows-app";

/// A running `outrigger run` process. Killed on drop.
pub struct AgentProc {
    pub child: Child,
    pub inbound: BTreeMap<String, SocketAddr>,
    /// Outbound listeners by name (`http-proxy` for `outboundProxy`), as bound.
    pub outbound: BTreeMap<String, SocketAddr>,
    pub admin: SocketAddr,
    pub dir: PathBuf,
}

impl AgentProc {
    /// Writes `config` to `dir/agent.yaml`, starts the agent and waits until it listens.
    pub fn start(dir: &Path, config: &str) -> AgentProc {
        Self::start_with(dir, config, &[])
    }

    pub fn start_with(dir: &Path, config: &str, env: &[(&str, &str)]) -> AgentProc {
        Self::start_under(dir, config, env, &[])
    }

    /// [`start_with`](Self::start_with), the agent run by `wrapper` (e.g. `prlimit
    /// --nofile=1024:1024 --`) when it is not empty.
    pub fn start_under(
        dir: &Path,
        config: &str,
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> AgentProc {
        let cfg = dir.join("agent.yaml");
        std::fs::write(&cfg, config).unwrap();
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        // `OUTRIGGER_AGENT_BIN`: another build of the agent for the agents these tests start
        // (the ztunnel benchmark runs a release agent from a debug test build).
        let bin = std::env::var("OUTRIGGER_AGENT_BIN").unwrap_or_else(|_| BIN.to_string());
        let mut cmd = match wrapper {
            [] => Command::new(&bin),
            [program, args @ ..] => {
                let mut c = Command::new(program);
                c.args(args).arg(&bin);
                c
            }
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start outrigger");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                let inbound = v["inbound"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, a)| (k.clone(), a.as_str().unwrap().parse().unwrap()))
                    .collect();
                let outbound = v["outbound"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, a)| (k.clone(), a.as_str().unwrap().parse().unwrap()))
                    .collect();
                let admin = v["admin"].as_str().unwrap().parse().unwrap();
                return AgentProc {
                    child,
                    inbound,
                    outbound,
                    admin,
                    dir: dir.to_path_buf(),
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "outrigger exited ({status}) before listening:\n{}",
                    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "outrigger did not start in 30s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The bound address of the outbound listener `name` (configured with port 0).
    pub fn outbound(&self, name: &str) -> SocketAddr {
        *self
            .outbound
            .get(name)
            .unwrap_or_else(|| panic!("no outbound listener {name}: {:?}", self.outbound))
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.inbound[listener]
    }

    /// The HBONE listener's address, from the ready file (the config must enable `hbone:`).
    pub fn hbone_addr(&self) -> SocketAddr {
        let text = std::fs::read_to_string(self.dir.join("ready.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["hbone"]
            .as_str()
            .expect("the ready file names the HBONE listener")
            .parse()
            .unwrap()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default()
    }

    /// A GET on the admin listener (plain HTTP/1.0, read to EOF).
    pub fn admin_get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(self.admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nhost: admin\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    pub fn metrics(&self) -> String {
        self.admin_get("/metrics")
    }

    /// Polls the log until `needle` appears (logs are written asynchronously).
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let all = self.stderr() + &self.stdout();
            if all.contains(needle) {
                return all;
            }
            assert!(
                Instant::now() < deadline,
                "log never contained {needle:?}:\n{all}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM (Unix) and waits for the exit.
    #[cfg(unix)]
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "outrigger did not stop in 30s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test mesh: a CA, the agent's certificate, and a policy directory.
pub struct Mesh {
    pub pki: TestPki,
    pub agent: Issued,
    pub policies: PathBuf,
}

impl Mesh {
    pub fn new() -> Mesh {
        let pki = TestPki::new();
        let agent = pki.issue(AGENT_NS, AGENT_SA);
        let policies = pki.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        Mesh {
            pki,
            agent,
            policies,
        }
    }

    pub fn dir(&self) -> &Path {
        self.pki.path()
    }

    pub fn agent_id(&self) -> Identity {
        self.pki.id(AGENT_NS, AGENT_SA)
    }

    pub fn policy(&self, name: &str, yaml: &str) {
        std::fs::write(self.policies.join(name), yaml).unwrap();
    }

    /// An agent configuration with the given inbound listeners `(name, backend, protocol)`.
    pub fn config(&self, inbound: &[(&str, SocketAddr, &str)], extra: &str) -> String {
        let mut s = format!(
            "trustDomain: cluster.local
workload:
  namespace: {AGENT_NS}
  serviceAccount: {AGENT_SA}
  labels:
    app: windows-app
certificates:
  files:
    certChain: {d}/cert-chain.pem
    key: {d}/key.pem
    rootCert: {d}/root-cert.pem
policy:
  paths: [policies]
  reloadInterval: 100ms
admin:
  listen: 127.0.0.1:0
timeouts:
  detect: 300ms
  drain: 10s
inbound:
",
            d = self.agent.dir.display()
        );
        for (name, backend, proto) in inbound {
            s += &format!(
                "  - name: {name}\n    listen: 127.0.0.1:0\n    backend: {backend}\n    protocol: {proto}\n"
            );
        }
        s + extra
    }

    pub fn start(&self, inbound: &[(&str, SocketAddr, &str)]) -> AgentProc {
        AgentProc::start(self.dir(), &self.config(inbound, ""))
    }

    /// An mTLS HTTP connection to `addr` as `ns/sa`, pinning the agent's identity.
    pub async fn connect(&self, addr: SocketAddr, client: &Issued, h2: bool) -> HttpConn {
        let alpn: &[&[u8]] = if h2 {
            &[b"istio-h2"]
        } else {
            &[b"istio-http/1.1"]
        };
        let cfg = outrigger_tls::client_config(
            &client.certs,
            &self.pki.trust(),
            &[self.agent_id()],
            alpn,
        )
        .unwrap();
        let tls = tls_connect(addr, Arc::clone(&cfg)).await.unwrap();
        HttpConn::new(tls, h2).await.unwrap()
    }
}

/// Finds the value of a metric line that contains every needle.
pub fn metric_value(metrics: &str, name: &str, needles: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .reduce(|a, b| a + b)
}

/// Every series of the metric `name` (exactly that name): its labels and its value.
pub fn metric_series(metrics: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => {
                let end = r.rfind('}').unwrap();
                (&r[..end], &r[end + 1..])
            }
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        let mut map = BTreeMap::new();
        let mut chars = labels.chars().peekable();
        while chars.peek().is_some() {
            let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
            assert_eq!(chars.next(), Some('"'), "{line}");
            let mut v = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => v.push(chars.next().unwrap()),
                    '"' => break,
                    c => v.push(c),
                }
            }
            map.insert(key.trim_start_matches(',').to_string(), v);
            if chars.peek() == Some(&',') {
                chars.next();
            }
        }
        out.push((map, value.trim().parse().unwrap()));
    }
    out
}

/// A gRPC message: flags 0, the payload's length (4 bytes, big-endian), the payload.
pub fn grpc_message(payload: &[u8]) -> Vec<u8> {
    let mut m = vec![0];
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// A loopback port that was free a moment ago (for configs that must name a port up front,
/// such as a `portLevelMtls` policy).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn peer_authentication(name: &str, ns: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{body}"
    )
}

pub const MESH_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
";

impl AgentProc {
    /// Polls `/metrics` until the metric reaches `want` (the proxy records some outcomes just
    /// after the client has seen them); returns the metrics text. Fails after 10 s.
    pub fn wait_metric(&self, name: &str, needles: &[&str], want: f64) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.metrics();
            if metric_value(&m, name, needles) == Some(want) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{needles:?} never reached {want}:\n{m}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `outrigger ca serve` from the CA in `ca_dir` (made by `ca init`), listening on `listen`
/// (port 0: any), callers authenticated by the token in `token`, its log in `log`. Returns
/// the process and the address it announced on its first line of output.
pub fn ca_serve(ca_dir: &Path, listen: &str, token: &Path, log: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(BIN)
        .args(["ca", "serve", "--listen", listen, "--dir"])
        .arg(ca_dir)
        .arg("--token-file")
        .arg(token)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    // "serving the Istio CA API for trust domain cluster.local on 127.0.0.1:PORT (…"
    let addr = line
        .split(" on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line of ca serve: {line:?}"));
    (child, addr)
}

/// Base64url without padding (JWT segments, JWK members).
pub fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Seconds since the Unix epoch (JWT `iat`/`exp`).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET /` as `who` over a new mTLS connection (a new handshake each call) to `addr`,
/// pinning the agent's identity: the status, or why the connection failed.
pub async fn mtls_status(mesh: &Mesh, addr: SocketAddr, who: &Issued) -> anyhow::Result<u16> {
    let cfg = outrigger_tls::client_config(
        &who.certs,
        &mesh.pki.trust(),
        &[mesh.agent_id()],
        &[b"istio-http/1.1"],
    )?;
    let tls = tls_connect(addr, cfg).await?;
    let mut conn = HttpConn::new(tls, false).await?;
    Ok(conn.fetch(outrigger_testkit::get("/", false)).await?.status)
}

/// An agent config for `ns/sa` with certificates in `certs`, and the given inbound / outbound
/// sections (YAML, already indented as list items).
pub fn agent_yaml(
    mesh: &Mesh,
    certs: &Path,
    ns: &str,
    sa: &str,
    inbound: &str,
    extra: &str,
) -> String {
    format!(
        "trustDomain: cluster.local
workload:
  namespace: {ns}
  serviceAccount: {sa}
  labels: {{app: {sa}, version: v1}}
certificates:
  files:
    certChain: {c}/cert-chain.pem
    key: {c}/key.pem
    rootCert: {c}/root-cert.pem
policy:
  paths: [{p}]
admin:
  listen: 127.0.0.1:0
accessLog: stdout
timeouts:
  detect: 300ms
  drain: 2s
runtime:
  workerThreads: 1
inbound:
{inbound}{extra}",
        c = certs.display(),
        p = mesh.policies.display(),
    )
}

/// Starts a server agent `default/<sa>` whose inbound `web` fronts `backend`.
pub fn start_server_agent(
    mesh: &Mesh,
    sa: &str,
    backend: SocketAddr,
    protocol: &str,
) -> (AgentProc, Issued) {
    let issued = mesh.pki.issue("default", sa);
    let dir = mesh.dir().join(format!("server-{sa}"));
    std::fs::create_dir_all(&dir).unwrap();
    let inbound = format!(
        "  - {{name: web, listen: \"127.0.0.1:0\", backend: \"{backend}\", protocol: {protocol}}}\n"
    );
    let cfg = agent_yaml(mesh, &issued.dir, "default", sa, &inbound, "");
    (AgentProc::start(&dir, &cfg), issued)
}
