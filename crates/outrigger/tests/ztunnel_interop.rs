//! Interop with the real ztunnel (github.com/istio/ztunnel), built from its public source
//! outside this repository (see docs/ambient.md for how).
//!
//! Skipped, saying so on stderr, unless `ZTUNNEL_BIN` (the ztunnel binary, built with its
//! `testing` feature for the fake CA) and `ZTUNNEL_TLS_DIR` (ztunnel's `src/tls` directory,
//! which holds its published test root `root-cert.pem` and key `ca-key.pem`) are set. Needs
//! root: ztunnel binds 15001/15006/15008/15020/15021 on the wildcard address, so it runs in a
//! network namespace of its own, joined to this one by a veth pair on a private /30.
//!
//! * ztunnel → Outrigger: `curl` inside ztunnel's namespace goes through ztunnel's SOCKS5
//!   outbound; ztunnel finds Outrigger's workload (protocol HBONE) in its local config and
//!   opens HBONE to Outrigger's :15008. Outrigger verifies ztunnel's identity
//!   (`default/sleep`, from ztunnel's fake CA) and authorizes it; ztunnel verifies
//!   Outrigger's (`legacy/windows-app`, signed by the same test root).
//! * Outrigger → ztunnel: Outrigger's HBONE client opens CONNECT streams to ztunnel's :15008,
//!   pinning ztunnel's identity; ztunnel's own metrics then name Outrigger's principal. Then
//!   as an application sees it: plain TCP and HTTP to the agent's loopback outbound listeners
//!   (`transport: hbone`) reach a workload behind ztunnel and ztunnel's own :15020.
//! * With `ZTUNNEL_BENCH_MIB` set: the same bulk upload through each HBONE server, with wall
//!   time, the server process's CPU time and (where `perf` and the syscall tracepoints work) its
//!   system calls per MiB; `ZTUNNEL_BENCH_RUNS=N` repeats it N times, alternating which server
//!   goes first (run with `--release`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;
use outrigger_proxy::hbone::{HboneClient, HboneError, SourceInfo};
use outrigger_tls::{CertSource, CertStore};

/// The identity ztunnel's fake CA gives its workload (`PROXY_WORKLOAD_INFO`).
const ZT_NS: &str = "default";
const ZT_SA: &str = "sleep";
/// Port of the TCP sink/echo helper started inside ztunnel's namespace.
const HELPER_PORT: u16 = 19090;
/// Outrigger's inbound listener port (on the veth address).
const WEB_PORT: u16 = 18080;
const SINK_PORT: u16 = 18081;

struct Env {
    bin: PathBuf,
    tls_dir: PathBuf,
}

fn env_or_skip(test: &str) -> Option<Env> {
    let bin = ztunnel_bin_or_skip(test)?;
    let Some(tls_dir) = std::env::var_os("ZTUNNEL_TLS_DIR").map(PathBuf::from) else {
        skip(test, "ZTUNNEL_TLS_DIR (ztunnel's src/tls)");
        return None;
    };
    for f in ["root-cert.pem", "ca-key.pem"] {
        assert!(
            tls_dir.join(f).is_file(),
            "ZTUNNEL_TLS_DIR={} has no {f} (point it at ztunnel's src/tls)",
            tls_dir.display()
        );
    }
    Some(Env { bin, tls_dir })
}

/// `ZTUNNEL_BIN`, or `None` after saying on stderr that `test` is skipped.
fn ztunnel_bin_or_skip(test: &str) -> Option<PathBuf> {
    let Some(bin) = std::env::var_os("ZTUNNEL_BIN").map(PathBuf::from) else {
        skip(test, "ZTUNNEL_BIN (ztunnel built with --features testing)");
        return None;
    };
    assert!(bin.is_file(), "ZTUNNEL_BIN={} is not a file", bin.display());
    Some(bin)
}

fn skip(test: &str, what: &str) {
    // Written to the real stderr, past libtest's output capture, so that a skip is visible in
    // every run.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: set {what} to run the ztunnel interop test; see docs/ambient.md"
    );
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to this one by a veth pair: `host` here, `peer` inside.
/// Deleted on drop (after the processes in it, which are declared later and dropped first).
struct Netns {
    name: String,
    link: String,
    host: std::net::Ipv4Addr,
    peer: std::net::Ipv4Addr,
}

impl Netns {
    fn new() -> Netns {
        let id = std::process::id() % 200;
        let name = format!("ozt-{}", std::process::id());
        let link = format!("ozt{id}h");
        let (host, peer) = (
            std::net::Ipv4Addr::new(10, 248, id as u8 + 20, 1),
            std::net::Ipv4Addr::new(10, 248, id as u8 + 20, 2),
        );
        let _ = Command::new("ip").args(["link", "del", &link]).output();
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns {
            name,
            link,
            host,
            peer,
        };
        let inner = format!("ozt{id}n");
        sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        sh(&[
            "ip", "link", "add", &ns.link, "type", "veth", "peer", "name", &inner,
        ]);
        sh(&["ip", "link", "set", &inner, "netns", &ns.name]);
        sh(&["ip", "addr", "add", &format!("{host}/30"), "dev", &ns.link]);
        sh(&["ip", "link", "set", &ns.link, "up"]);
        sh(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{peer}/30"),
            "dev",
            &inner,
        ]);
        sh(&["ip", "-n", &ns.name, "link", "set", &inner, "up"]);
        ns
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A child process killed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user + system) used so far by process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    ticks / hz
}

/// Waits until `addr` accepts TCP connections (bounded).
fn wait_listening(addr: SocketAddr, what: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while StdStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {addr} in 60s:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts this test binary's helper (see [`netns_tcp_helper`]) on `addr`, in `netns` if given.
fn start_helper(netns: Option<&Netns>, addr: SocketAddr, dir: &Path, name: &str) -> Proc {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = match netns {
        Some(ns) => ns.command(&exe),
        None => Command::new(&exe),
    };
    let log = dir.join(format!("{name}.log"));
    cmd.args([
        "--ignored",
        "--exact",
        "netns_tcp_helper",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("OUTRIGGER_TCP_HELPER", addr.to_string())
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(&log).unwrap())
    .stderr(Stdio::null());
    Proc {
        child: cmd.spawn().unwrap(),
        log,
    }
}

/// Not a test: the TCP helper run (by [`start_helper`]) inside ztunnel's namespace, where the
/// test process cannot listen. For each connection it reads until EOF, counting bytes, and
/// answers `count\n` (a sink) — or, if the first byte is `E`, echoes everything back.
#[test]
#[ignore = "helper process for ztunnel_interop; started by the interop test itself"]
fn netns_tcp_helper() {
    let addr = std::env::var("OUTRIGGER_TCP_HELPER")
        .expect("run only by the interop test, with OUTRIGGER_TCP_HELPER=<ip:port>");
    let l = StdListener::bind(&addr).unwrap();
    println!("listening on {addr}");
    // Serves until killed by the test (a bounded number of connections).
    for conn in l.incoming().take(10_000) {
        let Ok(mut s) = conn else { continue };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            let mut echo = None;
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if echo.is_none() {
                            echo = Some(buf[0] == b'E');
                        }
                        total += n as u64;
                        if echo == Some(true) && s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            if echo != Some(true) {
                let _ = writeln!(s, "{total}");
            }
        });
    }
}

/// Outrigger's certificate, signed by ztunnel's published test root so that each side trusts
/// the other: the CA directory is ztunnel's `root-cert.pem` plus its `ca-key.pem`.
fn issue_from_ztunnel_root(env: &Env, dir: &Path, ns: &str, sa: &str) -> PathBuf {
    let ca = dir.join("ztunnel-ca");
    std::fs::create_dir_all(&ca).unwrap();
    std::fs::copy(env.tls_dir.join("root-cert.pem"), ca.join("root-cert.pem")).unwrap();
    std::fs::copy(env.tls_dir.join("ca-key.pem"), ca.join("root-key.pem")).unwrap();
    let ca = outrigger_tls::ca::BuiltinCa::load(&ca).expect("ztunnel's test CA loads");
    let id = outrigger_identity::Identity::istio("cluster.local", ns, sa).unwrap();
    let out = dir.join(format!("{ns}-{sa}"));
    ca.issue(&id, Duration::from_secs(3600))
        .unwrap()
        .write_to(&out)
        .unwrap();
    out
}

fn ztunnel_config(ns: &Netns) -> String {
    format!(
        r#"workloads:
- uid: cluster1//v1/Pod/{ZT_NS}/{ZT_SA}
  name: {ZT_SA}
  namespace: {ZT_NS}
  serviceAccount: {ZT_SA}
  workloadIps: ["{peer}"]
  protocol: HBONE
  node: local
  network: ""
  services: {{}}
  trustDomain: cluster.local
- uid: cluster1/networking.istio.io/WorkloadEntry/{AGENT_NS}/{AGENT_SA}
  name: {AGENT_SA}
  namespace: {AGENT_NS}
  serviceAccount: {AGENT_SA}
  workloadIps: ["{host}"]
  protocol: HBONE
  node: vm
  network: ""
  services: {{}}
  trustDomain: cluster.local
policies: []
services: []
"#,
        peer = ns.peer,
        host = ns.host,
    )
}

/// Where ztunnel gets its certificates: its fake CA (signed by its published test root), or a
/// real CA API server (`outrigger ca serve`) at `address`, verified with `root` under istiod's
/// name, authenticated with the token in `token`.
enum ZtunnelCa<'a> {
    Fake,
    Server {
        address: SocketAddr,
        root: &'a Path,
        token: &'a Path,
    },
}

fn start_ztunnel(bin: &Path, ns: &Netns, dir: &Path, ca: ZtunnelCa<'_>) -> Proc {
    let cfg = dir.join("ztunnel-local.yaml");
    std::fs::write(&cfg, ztunnel_config(ns)).unwrap();
    let log = dir.join("ztunnel.log");
    let mut cmd = ns.command(bin);
    match ca {
        ZtunnelCa::Fake => {
            cmd.env("FAKE_CA", "true");
        }
        // ztunnel's own settings for istiod's CA (src/config.rs: CA_ADDRESS, ALT_CA_HOSTNAME,
        // CA_ROOT_CA, AUTH_TOKEN).
        ZtunnelCa::Server {
            address,
            root,
            token,
        } => {
            cmd.env("CA_ADDRESS", format!("https://{address}"))
                .env("ALT_CA_HOSTNAME", "istiod.istio-system.svc")
                .env("CA_ROOT_CA", root)
                .env("AUTH_TOKEN", token);
        }
    }
    cmd.env("XDS_ADDRESS", "")
        .env("LOCAL_XDS_PATH", &cfg)
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", format!("{ZT_NS}/{ZT_SA}/{ZT_SA}"))
        .env("UNSTABLE_ENABLE_SOCKS5", "true")
        // Inbound connections to the workload come from ztunnel's own address: spoofing the
        // HBONE client's address needs TPROXY routing that this namespace does not have.
        .env("ENABLE_ORIG_SRC", "false")
        .env("ZTUNNEL_WORKER_THREADS", "2")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("ztunnel.err")).unwrap());
    let p = Proc {
        child: cmd.spawn().expect("start ztunnel"),
        log,
    };
    let readiness = SocketAddr::new(ns.peer.into(), 15021);
    wait_listening(readiness, "ztunnel", || {
        p.log() + &std::fs::read_to_string(dir.join("ztunnel.err")).unwrap_or_default()
    });
    // Ready means certificates and config are loaded.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut s = StdStream::connect(readiness).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = write!(s, "GET /healthz/ready HTTP/1.0\r\n\r\n");
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        if r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ztunnel never ready:\n{r}\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    p
}

fn hbone_client(certs: &Path) -> HboneClient {
    let store = CertStore::new(
        CertSource::Files {
            chain: certs.join("cert-chain.pem"),
            key: certs.join("key.pem"),
            roots: certs.join("root-cert.pem"),
        },
        outrigger_identity::TrustDomains::new("cluster.local", &[]).unwrap(),
        vec![b"h2".to_vec()],
    )
    .unwrap();
    HboneClient::new(store, &SourceInfo::default(), Duration::from_secs(10))
}

/// The agent: inbound `web` and `sink` behind its HBONE listener, and two outbound listeners
/// with `transport: hbone` to workloads behind ztunnel (the default HBONE peer
/// `<endpoint ip>:15008` is ztunnel's), pinning ztunnel's identity: `zt-echo` (TCP, the helper
/// in ztunnel's namespace) and `zt-metrics` (HTTP, ztunnel's own :15020).
fn agent_config(
    certificates: &str,
    ns: &Netns,
    echo: SocketAddr,
    sink: SocketAddr,
    outbound: (u16, u16),
) -> String {
    format!(
        "trustDomain: cluster.local
workload:
  namespace: {AGENT_NS}
  serviceAccount: {AGENT_SA}
  labels:
    app: windows-app
certificates:
{certificates}policy:
  paths: [policies]
admin:
  listen: 127.0.0.1:0
accessLog: off
runtime:
  workerThreads: 2
inbound:
  - name: web
    listen: {host}:{WEB_PORT}
    backend: {echo}
    protocol: http
  - name: sink
    listen: {host}:{SINK_PORT}
    backend: {sink}
    protocol: tcp
hbone:
  listen: {host}:15008
outbound:
  - name: zt-echo
    listen: 127.0.0.1:{echo_port}
    host: echo.default.svc.cluster.local
    port: {HELPER_PORT}
    protocol: tcp
    endpoints: [\"{peer}:{HELPER_PORT}\"]
    transport: hbone
    identity: spiffe://cluster.local/ns/{ZT_NS}/sa/{ZT_SA}
  - name: zt-metrics
    listen: 127.0.0.1:{metrics_port}
    host: ztunnel.default.svc.cluster.local
    port: 15020
    endpoints: [\"{peer}:15020\"]
    transport: hbone
    identity: spiffe://cluster.local/ns/{ZT_NS}/sa/{ZT_SA}
",
        host = ns.host,
        peer = ns.peer,
        echo_port = outbound.0,
        metrics_port = outbound.1,
    )
}

/// The `certificates:` block for Istio-style files in `dir`.
fn files_certificates(dir: &Path) -> String {
    format!(
        "  files:\n    certChain: {d}/cert-chain.pem\n    key: {d}/key.pem\n    rootCert: {d}/root-cert.pem\n",
        d = dir.display()
    )
}

/// `curl` in ztunnel's namespace through ztunnel's SOCKS5 outbound to Outrigger's `web`
/// listener: ztunnel carries it over HBONE to Outrigger's :15008. Returns what the echo
/// backend saw.
fn curl_through_ztunnel(
    ns: &Netns,
    path: &str,
    ztunnel: &Proc,
    agent: &AgentProc,
) -> outrigger_testkit::Seen {
    let url = format!("http://{}:{WEB_PORT}{path}", ns.host);
    let out = ns
        .command(Path::new("curl"))
        .args([
            "-sS",
            "--max-time",
            "20",
            "--socks5",
            "127.0.0.1:15080",
            &url,
        ])
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "curl through ztunnel failed: {}\nztunnel:\n{}\noutrigger:\n{}",
        String::from_utf8_lossy(&out.stderr),
        ztunnel.log(),
        agent.stderr()
    );
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("not the echo's answer ({e}): {body}"))
}

const ALLOW_ZTUNNEL_ONLY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-sleep
  namespace: legacy
spec:
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/default/sa/sleep\"]
";

/// Uploads `bytes` through one HBONE stream to a sink; returns (seconds, server CPU seconds).
/// The system calls the benchmark counts in the HBONE server during an upload (Linux
/// tracepoints through `perf stat`), to see where the CPU per byte goes: how many reads and
/// writes a MiB takes (so how large they are), and how often the server waits.
const SYSCALL_EVENTS: &[&str] = &[
    "raw_syscalls:sys_enter",
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_enter_read",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_writev",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_futex",
];

/// `perf stat` attached to a process, started disabled and enabled through its control FIFO
/// (acknowledged), so the count covers exactly the measured upload. `None` when perf or the
/// tracepoints are not available: the benchmark then reports CPU time only.
struct SyscallCount {
    child: Child,
    ctl: std::fs::File,
    ack: std::io::BufReader<std::fs::File>,
}

impl SyscallCount {
    fn start(pid: u32, dir: &Path) -> Option<Self> {
        let (ctl, ack) = (
            dir.join(format!("perf-ctl-{pid}")),
            dir.join(format!("perf-ack-{pid}")),
        );
        for f in [&ctl, &ack] {
            let _ = std::fs::remove_file(f);
            let ok = Command::new("mkfifo").arg(f).status().ok()?.success();
            if !ok {
                return None;
            }
        }
        let child = Command::new("perf")
            .args(["stat", "-x,", "-D", "-1", "-e", &SYSCALL_EVENTS.join(",")])
            .arg("--control")
            .arg(format!("fifo:{},{}", ctl.display(), ack.display()))
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        // Opening a FIFO blocks until the other end opens it: perf opens both at start.
        let ctl = std::fs::OpenOptions::new().write(true).open(&ctl).ok()?;
        let ack = std::io::BufReader::new(std::fs::File::open(&ack).ok()?);
        let mut c = SyscallCount { child, ctl, ack };
        c.command("enable")?;
        Some(c)
    }

    fn command(&mut self, cmd: &str) -> Option<()> {
        use std::io::BufRead;
        writeln!(self.ctl, "{cmd}").ok()?;
        let mut line = String::new();
        self.ack.read_line(&mut line).ok()?;
        line.starts_with("ack").then_some(())
    }

    /// Stops counting; the counts by event.
    fn finish(mut self) -> Vec<(String, u64)> {
        let _ = self.command("disable");
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = self.child.wait();
        // CSV: count,unit,event,...
        err.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                Some((f.get(2)?.to_string(), f.first()?.parse().ok()?))
            })
            .collect()
    }
}

async fn upload(
    client: &HboneClient,
    peer: SocketAddr,
    id: &outrigger_identity::Identity,
    target: SocketAddr,
    bytes: u64,
    server_pid: u32,
) -> (f64, f64) {
    let (secs, cpu, _) = upload_counted(client, peer, id, target, bytes, server_pid, None).await;
    (secs, cpu)
}

/// An upload of `bytes` through `peer`; wall seconds, the server's CPU seconds, and its
/// system calls when `count_in` (a scratch directory) is given and perf works.
async fn upload_counted(
    client: &HboneClient,
    peer: SocketAddr,
    id: &outrigger_identity::Identity,
    target: SocketAddr,
    bytes: u64,
    server_pid: u32,
    count_in: Option<&Path>,
) -> (f64, f64, Vec<(String, u64)>) {
    let counter = count_in.and_then(|d| SyscallCount::start(server_pid, d));
    let cpu0 = cpu_seconds(server_pid);
    let t0 = Instant::now();
    let mut s = client.connect(peer, id, target).await.unwrap();
    let chunk = vec![b'S'; 256 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        s.write_all(&chunk[..n]).await.unwrap();
        sent += n as u64;
    }
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(600), s.read_to_string(&mut answer))
        .await
        .expect("sink answered in time")
        .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(server_pid) - cpu0;
    let syscalls = counter.map(SyscallCount::finish).unwrap_or_default();
    assert_eq!(answer.trim(), bytes.to_string(), "the sink got every byte");
    (secs, cpu, syscalls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_and_outrigger_speak_hbone_both_ways() {
    let Some(env) = env_or_skip("ztunnel_and_outrigger_speak_hbone_both_ways") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ns = Netns::new();
    let certs = issue_from_ztunnel_root(&env, dir, AGENT_NS, AGENT_SA);
    let ztunnel = start_ztunnel(&env.bin, &ns, dir, ZtunnelCa::Fake);
    let helper_addr = SocketAddr::new(ns.peer.into(), HELPER_PORT);
    let helper = start_helper(Some(&ns), helper_addr, dir, "netns-helper");
    wait_listening(helper_addr, "netns helper", || helper.log());
    let local_sink_addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let local_sink_addr = {
        let l = StdListener::bind(local_sink_addr).unwrap();
        l.local_addr().unwrap()
    };
    let local_sink = start_helper(None, local_sink_addr, dir, "local-sink");
    wait_listening(local_sink_addr, "local sink", || local_sink.log());

    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("pa.yaml"), MESH_STRICT).unwrap();
    std::fs::write(policies.join("authz.yaml"), ALLOW_ZTUNNEL_ONLY).unwrap();
    let echo = outrigger_testkit::start_echo().await;
    let outbound_ports = (free_port(), free_port());
    let agent = AgentProc::start(
        dir,
        &agent_config(
            &files_certificates(&certs),
            &ns,
            echo,
            local_sink_addr,
            outbound_ports,
        ),
    );

    // ztunnel → Outrigger: curl in ztunnel's namespace, through ztunnel's SOCKS5 outbound,
    // to Outrigger's workload address; ztunnel carries it over HBONE to Outrigger's :15008.
    let seen = curl_through_ztunnel(&ns, "/via-ztunnel", &ztunnel, &agent);
    assert_eq!(seen.path, "/via-ztunnel");
    let xfcc = seen.header("x-forwarded-client-cert").unwrap_or_default();
    assert!(
        xfcc.ends_with(";URI=spiffe://cluster.local/ns/default/sa/sleep"),
        "Outrigger did not see ztunnel's identity: {xfcc}"
    );
    let m = agent.metrics();
    let n = metric_value(
        &m,
        "istio_requests_total",
        &[
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
            "connection_security_policy=\"mutual_tls\"",
            "response_code=\"200\"",
        ],
    );
    assert_eq!(n, Some(1.0), "{m}");
    // ztunnel's access log: the outbound HBONE connection to Outrigger completed without
    // error, with Outrigger's identity verified (a wrong SAN fails the handshake there).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let zlog = ztunnel.log();
        let ok = zlog.lines().any(|l| {
            l.contains("connection complete")
                && l.contains("direction=\"outbound\"")
                && l.contains("dst.identity=\"spiffe://cluster.local/ns/legacy/sa/windows-app\"")
                && l.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/sleep\"")
                && !l.contains("error=")
        });
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ztunnel logged no clean HBONE connection to Outrigger's identity:\n{zlog}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Outrigger → ztunnel: Outrigger's HBONE client, pinning ztunnel's identity.
    let client = hbone_client(&certs);
    let zt_hbone = SocketAddr::new(ns.peer.into(), 15008);
    let zt_id = outrigger_identity::Identity::istio("cluster.local", ZT_NS, ZT_SA).unwrap();
    let mut s = client.connect(zt_hbone, &zt_id, helper_addr).await.unwrap();
    let data: Vec<u8> = std::iter::once(b'E')
        .chain((0..1_000_000u32).map(|i| i as u8))
        .collect();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert!(back == data, "echo through ztunnel corrupted the data");
    // ztunnel's own metrics (its :15020, reached through the tunnel) name our principal.
    let s = client
        .connect(zt_hbone, &zt_id, SocketAddr::new(ns.peer.into(), 15020))
        .await
        .unwrap();
    let mut http = outrigger_testkit::HttpConn::new(s, false).await.unwrap();
    let got = http
        .fetch(outrigger_testkit::get("/metrics", false))
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    let zm = got.text();
    assert!(
        zm.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains(
                    "source_principal=\"spiffe://cluster.local/ns/legacy/sa/windows-app\""
                )),
        "ztunnel's metrics do not name Outrigger's identity:\n{zm}"
    );
    // A wrong pin is refused by our client.
    let wrong = outrigger_identity::Identity::istio("cluster.local", "default", "other").unwrap();
    match hbone_client(&certs)
        .connect(zt_hbone, &wrong, helper_addr)
        .await
    {
        Err(HboneError::UnexpectedIdentity(_, msg)) => assert!(msg.contains("sleep"), "{msg}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("connected to ztunnel while expecting another identity"),
    }

    // Outrigger → ztunnel as an application sees it: plain TCP and HTTP to the agent's
    // loopback outbound listeners (`transport: hbone`), carried to ztunnel's :15008.
    let zt_echo: SocketAddr = format!("127.0.0.1:{}", outbound_ports.0).parse().unwrap();
    let mut s = tokio::net::TcpStream::connect(zt_echo).await.unwrap();
    let data: Vec<u8> = std::iter::once(b'E')
        .chain((0..300_000u32).map(|i| (i * 7) as u8))
        .collect();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut back))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no echo through the outbound listener
{}",
                agent.stderr()
            )
        })
        .unwrap();
    assert!(
        back == data,
        "echo through the outbound listener and ztunnel corrupted the data"
    );
    let zt_metrics: SocketAddr = format!("127.0.0.1:{}", outbound_ports.1).parse().unwrap();
    let tcp = tokio::net::TcpStream::connect(zt_metrics).await.unwrap();
    let mut http = outrigger_testkit::HttpConn::new(tcp, false).await.unwrap();
    let got = http
        .fetch(outrigger_testkit::get("/metrics", false))
        .await
        .unwrap();
    assert_eq!(
        got.status,
        200,
        "{}
{}",
        got.text(),
        agent.stderr()
    );
    assert!(got.text().contains("istio_tcp_connections_opened_total"));
    // The agent's reporter="source" metrics name ztunnel's verified identity.
    let m = agent.metrics();
    let zt_principal = "destination_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"";
    let reqs = metric_value(
        &m,
        "istio_requests_total",
        &["reporter=\"source\"", zt_principal, "response_code=\"200\""],
    );
    assert_eq!(reqs, Some(1.0), "{m}");
    let tcp_opened = metric_value(
        &m,
        "istio_tcp_connections_opened_total",
        &["reporter=\"source\"", zt_principal],
    );
    assert_eq!(tcp_opened, Some(1.0), "{m}");

    // Benchmark: the same upload through each HBONE server, same client, same sink.
    if let Some(mib) = std::env::var("ZTUNNEL_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        if cfg!(debug_assertions) {
            eprintln!("WARNING: debug build; run with --release for meaningful numbers");
        }
        let bytes = mib * 1024 * 1024;
        let me = outrigger_identity::Identity::istio("cluster.local", AGENT_NS, AGENT_SA).unwrap();
        let our_hbone = SocketAddr::new(ns.host.into(), 15008);
        let our_sink = SocketAddr::new(ns.host.into(), SINK_PORT);
        // Outrigger only accepts ztunnel's identity here: the benchmark client presents it
        // too (a certificate for default/sleep from the same root).
        let sleep_certs = issue_from_ztunnel_root(&env, dir, ZT_NS, ZT_SA);
        let bench_client = hbone_client(&sleep_certs);
        // Warm both paths (connection setup, pools), then measure.
        let _ = upload(
            &bench_client,
            zt_hbone,
            &zt_id,
            helper_addr,
            1 << 20,
            ztunnel.child.id(),
        )
        .await;
        let _ = upload(
            &bench_client,
            our_hbone,
            &me,
            our_sink,
            1 << 20,
            agent.child.id(),
        )
        .await;
        // `ZTUNNEL_BENCH_RUNS` rounds (default 1), the order of the two servers alternating
        // from one round to the next so that neither always runs on a warmer machine.
        let runs: usize = std::env::var("ZTUNNEL_BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let gib = bytes as f64 / (1u64 << 30) as f64;
        let servers = [
            ("ztunnel", zt_hbone, &zt_id, helper_addr, ztunnel.child.id()),
            ("outrigger", our_hbone, &me, our_sink, agent.child.id()),
        ];
        for run in 0..runs {
            let order: Vec<_> = if run % 2 == 0 {
                servers.iter().collect()
            } else {
                servers.iter().rev().collect()
            };
            for (name, peer, id, target, pid) in order {
                let (s, cpu, calls) =
                    upload_counted(&bench_client, *peer, id, *target, bytes, *pid, Some(dir)).await;
                let per_mib: Vec<String> = calls
                    .iter()
                    .map(|(event, n)| {
                        let short = event.rsplit(':').next().unwrap_or(event);
                        format!("{short}_per_MiB={:.1}", *n as f64 / mib as f64)
                    })
                    .collect();
                eprintln!(
                    "BENCH hbone-upload run={run} server={name} bytes={bytes} seconds={s:.2} MiB/s={:.0} server_cpu_s={cpu:.2} cpu_s_per_GiB={:.2} MiB_per_cpu_s={:.0} {}",
                    mib as f64 / s,
                    cpu / gib,
                    mib as f64 / cpu.max(0.001),
                    per_mib.join(" "),
                );
            }
        }
    }
}

/// Issue 11 item 5: one CA for both, reached through Istio's CA API. `outrigger ca serve` (the
/// built-in CA) serves istiod's `CreateCertificate`; ztunnel obtains its workload certificate
/// from it with its own CA client (token authentication, istiod's name verified), and the
/// agent obtains its own through `certificates.istioCa`. Then the two speak HBONE both ways,
/// each verifying the other's identity from that CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_and_outrigger_take_their_identities_from_outrigger_ca_serve() {
    let test = "ztunnel_and_outrigger_take_their_identities_from_outrigger_ca_serve";
    let Some(bin) = ztunnel_bin_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ns = Netns::new();
    let ca_dir = dir.join("ca");
    outrigger_tls::ca::BuiltinCa::init(&ca_dir, "cluster.local").unwrap();
    let token = dir.join("istio-token");
    // No trailing newline: ztunnel sends the file as it is, and a newline is not allowed in a
    // header (Kubernetes token files have none).
    std::fs::write(&token, "lab-token").unwrap();

    // The CA on the host side of the veth, so that ztunnel (in its namespace) reaches it.
    let ca_log = dir.join("ca-serve.log");
    let (ca, ca_addr) = ca_serve(&ca_dir, &format!("{}:0", ns.host), &token, &ca_log);
    let _ca = Proc {
        child: ca,
        log: ca_log,
    };

    let ztunnel = start_ztunnel(
        &bin,
        &ns,
        dir,
        ZtunnelCa::Server {
            address: ca_addr,
            root: &ca_dir.join("root-cert.pem"),
            token: &token,
        },
    );
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("pa.yaml"), MESH_STRICT).unwrap();
    std::fs::write(policies.join("authz.yaml"), ALLOW_ZTUNNEL_ONLY).unwrap();
    let echo = outrigger_testkit::start_echo().await;
    let outbound_ports = (free_port(), free_port());
    let certificates = format!(
        "  istioCa:\n    address: {ca_addr}\n    serverName: istiod.istio-system.svc\n    \
         rootCert: {root}\n    tokenFile: {token}\n    stateDir: {state}\n",
        root = ca_dir.join("root-cert.pem").display(),
        token = token.display(),
        state = dir.join("identity").display(),
    );
    let unused_sink: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let agent = AgentProc::start(
        dir,
        &agent_config(&certificates, &ns, echo, unused_sink, outbound_ports),
    );
    // ztunnel → Outrigger over HBONE (curl through ztunnel's SOCKS5 outbound).
    let seen = curl_through_ztunnel(&ns, "/ca-served", &ztunnel, &agent);
    assert_eq!(seen.path, "/ca-served");
    let xfcc = seen.header("x-forwarded-client-cert").unwrap_or_default();
    assert!(
        xfcc.ends_with(";URI=spiffe://cluster.local/ns/default/sa/sleep"),
        "Outrigger did not see ztunnel's identity: {xfcc}"
    );

    // Both certificates came from the CA API (ztunnel asks when it first needs one): both
    // requests are in the CA's log.
    let issued = std::fs::read_to_string(dir.join("ca-serve.log")).unwrap_or_default();
    for id in [
        "spiffe://cluster.local/ns/default/sa/sleep",
        "spiffe://cluster.local/ns/legacy/sa/windows-app",
    ] {
        assert!(
            issued
                .lines()
                .any(|l| l.contains("issued a workload certificate") && l.contains(id)),
            "the CA issued nothing for {id}:\n{issued}"
        );
    }

    // Outrigger → ztunnel over HBONE: the agent's outbound listener to ztunnel's :15020,
    // pinning ztunnel's identity.
    let zt_metrics: SocketAddr = format!("127.0.0.1:{}", outbound_ports.1).parse().unwrap();
    let tcp = tokio::net::TcpStream::connect(zt_metrics).await.unwrap();
    let mut http = outrigger_testkit::HttpConn::new(tcp, false).await.unwrap();
    let got = http
        .fetch(outrigger_testkit::get("/metrics", false))
        .await
        .unwrap();
    assert_eq!(got.status, 200, "{}\n{}", got.text(), agent.stderr());
    assert!(
        got.text()
            .lines()
            .any(|l| l.starts_with("istio_requests_total")
                || l.starts_with("istio_tcp_connections_opened_total")),
        "not ztunnel's metrics:\n{}",
        got.text()
    );
}
