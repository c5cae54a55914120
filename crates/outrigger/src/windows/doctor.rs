//! `outrigger doctor`: looks for ways around Outrigger on this host and prints the exact
//! commands that close them.
//!
//! Outrigger only protects an application that cannot be reached any other way (the "no
//! bypass" rule, docs/windows.md). The doctor checks that from the outside and the inside:
//!
//! 1. **Probe**: connects to each application (backend) port on every non-loopback address of
//!    the host. An answer means the application listens on the network and a mesh peer could
//!    skip Outrigger's mTLS and policy.
//! 2. **Listening sockets**: reads the host's TCP listener table (`netstat -ano` on Windows,
//!    `/proc/net/tcp*` on Linux) for a backend port bound to a non-loopback address, and checks
//!    that Outrigger's own listeners are up.
//! 3. **Windows Firewall** (Windows only): every profile on, an inbound allow rule for each of
//!    Outrigger's ports, and no allow rule for an application port (`netsh advfirewall`).
//! 4. **The service** (Windows only): installed, running, not as LocalSystem.
//!
//! Gathering (sockets, processes) is kept apart from judging ([`judge`]), so the judging and
//! the parsers are tested on every platform with recorded output.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use super::cli::DoctorArgs;
use crate::config::AgentConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Ok,
    Note,
    Warn,
    Fail,
}

/// One result: what was found, and (for a problem) the commands that fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub message: String,
    pub fix: Vec<String>,
}

impl Finding {
    fn new(severity: Severity, message: String) -> Finding {
        Finding {
            severity,
            message,
            fix: Vec::new(),
        }
    }

    fn with_fix(mut self, fix: Vec<String>) -> Finding {
        self.fix = fix;
        self
    }
}

/// What the doctor knows of one inbound listener from the configuration.
#[derive(Debug, Clone)]
pub struct Port {
    pub name: String,
    pub listen: SocketAddr,
    pub backend: SocketAddr,
}

/// A listening TCP socket on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
}

/// Everything gathered from the host, judged by [`judge`].
#[derive(Debug)]
pub struct Observed {
    /// Non-loopback addresses that were probed.
    pub addresses: Vec<IpAddr>,
    /// `(address, backend port)` pairs where a TCP connection succeeded.
    pub answered: Vec<SocketAddr>,
    /// The listener table, or why it could not be read.
    pub listeners: Result<Vec<Listener>, String>,
    /// Windows Firewall state (None where there is no Windows Firewall).
    pub firewall: Option<Result<Firewall, String>>,
    /// This executable, for firewall rules bound to the program.
    pub exe: String,
    /// The Windows service `--name`, as the service control manager reports it (None where
    /// there are no Windows services).
    pub service: Option<Result<ServiceFacts, String>>,
}

/// What the doctor checks of the installed service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFacts {
    pub state: String,
    pub account: String,
}

pub fn main(args: DoctorArgs) -> anyhow::Result<()> {
    let cfg = AgentConfig::load(&args.config)?;
    let ports: Vec<Port> = cfg
        .inbound
        .iter()
        .map(|l| Port {
            name: l.name.clone(),
            listen: l.listen,
            backend: l.backend,
        })
        .collect();
    let observed = observe(&ports, &args.addresses, &args.name);
    let findings = judge(&ports, &observed, &args.name);
    print!("{}", report(&args.config, &observed, &findings));
    let failed = findings
        .iter()
        .filter(|f| f.severity == Severity::Fail)
        .count();
    if failed > 0 {
        anyhow::bail!("doctor found {failed} problem(s); the fixes are printed above");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Gathering

/// Probes and reads the host. Bounded: each probe waits at most a second.
pub fn observe(ports: &[Port], extra: &[IpAddr], service: &str) -> Observed {
    let mut addresses = host_addresses();
    for a in extra {
        if !addresses.contains(a) {
            addresses.push(*a);
        }
    }
    let mut answered = Vec::new();
    for ip in &addresses {
        for p in ports {
            let target = SocketAddr::new(*ip, p.backend.port());
            if TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok() {
                answered.push(target);
            }
        }
    }
    Observed {
        addresses,
        answered,
        listeners: listeners(),
        firewall: firewall(),
        exe: std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "outrigger.exe".into()),
        service: service_facts(service),
    }
}

#[cfg(windows)]
fn service_facts(name: &str) -> Option<Result<ServiceFacts, String>> {
    Some(super::service::facts(name).map_err(|e| format!("{e:#}")))
}

#[cfg(not(windows))]
fn service_facts(_name: &str) -> Option<Result<ServiceFacts, String>> {
    None
}

/// The host's non-loopback addresses: the source address of the default route (a UDP
/// "connect" sends nothing), and whatever the host name resolves to.
pub fn host_addresses() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    let mut add = |ip: IpAddr| {
        let usable = !ip.is_loopback()
            && !ip.is_unspecified()
            && !ip.is_multicast()
            // fe80::/10 needs a scope id to connect to; the same interface has other addresses.
            && !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        if usable && !out.contains(&ip) {
            out.push(ip);
        }
    };
    // Documentation addresses (TEST-NET-3, 2001:db8::/32): only the route lookup matters.
    let probes: [(IpAddr, IpAddr); 2] = [
        (
            Ipv4Addr::UNSPECIFIED.into(),
            Ipv4Addr::new(203, 0, 113, 1).into(),
        ),
        (
            Ipv6Addr::UNSPECIFIED.into(),
            "2001:db8::1".parse::<Ipv6Addr>().unwrap().into(),
        ),
    ];
    for (local, remote) in probes {
        if let Ok(s) = UdpSocket::bind(SocketAddr::new(local, 0))
            && s.connect(SocketAddr::new(remote, 9)).is_ok()
            && let Ok(a) = s.local_addr()
        {
            add(a.ip());
        }
    }
    if let Some(host) = host_name() {
        use std::net::ToSocketAddrs;
        if let Ok(addrs) = (host.as_str(), 0).to_socket_addrs() {
            for a in addrs {
                add(a.ip());
            }
        }
    }
    out
}

fn host_name() -> Option<String> {
    if cfg!(windows) {
        std::env::var("COMPUTERNAME").ok()
    } else {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_string())
    }
    .filter(|s| !s.is_empty())
}

fn listeners() -> Result<Vec<Listener>, String> {
    if cfg!(windows) {
        let mut all = Vec::new();
        for proto in ["TCP", "TCPv6"] {
            let text = command_output("netstat.exe", &["-ano", "-p", proto])?;
            all.extend(parse_netstat(&text));
        }
        Ok(all)
    } else {
        let mut all = Vec::new();
        let mut read_any = false;
        for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
            if let Ok(text) = std::fs::read_to_string(file) {
                read_any = true;
                all.extend(parse_proc_net_tcp(&text, v6));
            }
        }
        if read_any {
            Ok(all)
        } else {
            Err("cannot read /proc/net/tcp".into())
        }
    }
}

fn firewall() -> Option<Result<Firewall, String>> {
    if !cfg!(windows) {
        return None;
    }
    Some((|| {
        let profiles = command_output(
            "netsh.exe",
            &["advfirewall", "show", "allprofiles", "state"],
        )?;
        let rules = command_output(
            "netsh.exe",
            &[
                "advfirewall",
                "firewall",
                "show",
                "rule",
                "name=all",
                "dir=in",
                "verbose",
            ],
        )?;
        Ok(Firewall {
            profiles: parse_profiles(&profiles),
            rules: parse_rules(&rules),
        })
    })())
}

/// Runs a command (with a bound on how long it may take) and returns its standard output.
fn command_output(program: &str, args: &[&str]) -> Result<String, String> {
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
        buf
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{program} {} did not finish in 30s",
                    args.join(" ")
                ));
            }
        }
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(format!("{program} {} failed ({status})", args.join(" ")));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Parsers

/// `/proc/net/tcp` or `/proc/net/tcp6`: listening sockets (state 0A). Addresses are hex, each
/// 32-bit word in host (little-endian) byte order.
pub fn parse_proc_net_tcp(text: &str, v6: bool) -> Vec<Listener> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 4 || cols[3] != "0A" {
            continue;
        }
        let Some((ip_hex, port_hex)) = cols[1].split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port_hex, 16) else {
            continue;
        };
        let words: Option<Vec<u32>> = (0..ip_hex.len() / 8)
            .map(|i| u32::from_str_radix(&ip_hex[i * 8..i * 8 + 8], 16).ok())
            .collect();
        let ip: IpAddr = match (words, v6) {
            (Some(w), false) if w.len() == 1 => Ipv4Addr::from(w[0].to_le_bytes()).into(),
            (Some(w), true) if w.len() == 4 => {
                let mut b = [0u8; 16];
                for (i, word) in w.iter().enumerate() {
                    b[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
                }
                Ipv6Addr::from(b).into()
            }
            _ => continue,
        };
        out.push(Listener {
            addr: SocketAddr::new(ip, port),
            pid: None,
        });
    }
    out
}

/// `netstat -ano -p TCP` / `-p TCPv6` on Windows. A listener is a row whose foreign address has
/// port 0; that, unlike the state column ("LISTENING", "ABHÖREN", ...), is not localized.
pub fn parse_netstat(text: &str) -> Vec<Listener> {
    let mut out = Vec::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 4 || !cols[0].eq_ignore_ascii_case("TCP") {
            continue;
        }
        let (Ok(local), Ok(foreign)) = (parse_endpoint(cols[1]), parse_endpoint(cols[2])) else {
            continue;
        };
        if foreign.port() != 0 {
            continue;
        }
        out.push(Listener {
            addr: local,
            pid: cols.last().and_then(|p| p.parse().ok()),
        });
    }
    out
}

/// `0.0.0.0:135`, `[::]:445`, `[fe80::1%4]:80`.
fn parse_endpoint(s: &str) -> Result<SocketAddr, ()> {
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, port) = rest.split_once("]:").ok_or(())?;
        let ip = ip.split('%').next().unwrap_or(ip);
        return Ok(SocketAddr::new(
            ip.parse::<Ipv6Addr>().map_err(|_| ())?.into(),
            port.parse().map_err(|_| ())?,
        ));
    }
    s.parse().map_err(|_| ())
}

/// Windows Firewall as `netsh advfirewall` shows it.
#[derive(Debug, Default, Clone)]
pub struct Firewall {
    /// `(profile, on)`, e.g. `("Domain", true)`.
    pub profiles: Vec<(String, bool)>,
    pub rules: Vec<Rule>,
}

/// One inbound rule of `netsh advfirewall firewall show rule name=all dir=in verbose`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub enabled: bool,
    pub allow: bool,
    /// `TCP`, `UDP`, `Any`, ...
    pub protocol: String,
    /// `Any`, `8080`, `80,443`, `5000-5010`, `RPC`, ...
    pub local_port: String,
    /// `Any` or an executable path.
    pub program: String,
}

/// `netsh advfirewall show allprofiles state` (English output: "Domain Profile Settings:" then
/// "State   ON").
pub fn parse_profiles(text: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_suffix("Profile Settings:") {
            current = Some(name.trim().to_string());
        } else if let Some(state) = t.strip_prefix("State")
            && let Some(name) = current.take()
        {
            out.push((name, state.trim().eq_ignore_ascii_case("ON")));
        }
    }
    out
}

/// `netsh advfirewall firewall show rule ... verbose`: blocks of `Key: value` lines, each
/// starting with `Rule Name:`. Keys are English, as netsh prints them on an English system.
pub fn parse_rules(text: &str) -> Vec<Rule> {
    let mut out: Vec<Rule> = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        if key == "Rule Name" {
            out.push(Rule {
                name: value.to_string(),
                protocol: "Any".into(),
                local_port: "Any".into(),
                program: "Any".into(),
                ..Rule::default()
            });
            continue;
        }
        let Some(rule) = out.last_mut() else {
            continue;
        };
        match key {
            "Enabled" => rule.enabled = value.eq_ignore_ascii_case("Yes"),
            "Action" => rule.allow = value.eq_ignore_ascii_case("Allow"),
            "Protocol" => rule.protocol = value.to_string(),
            "LocalPort" => rule.local_port = value.to_string(),
            // "Program: C:\x.exe" — the path's own colon was split off above.
            "Program" => rule.program = line.split_once(':').map_or("", |x| x.1).trim().into(),
            _ => {}
        }
    }
    out
}

impl Rule {
    fn is_tcp(&self) -> bool {
        self.protocol.eq_ignore_ascii_case("TCP") || self.protocol.eq_ignore_ascii_case("Any")
    }

    fn any_port(&self) -> bool {
        self.local_port.eq_ignore_ascii_case("Any")
    }

    /// Whether the rule's LocalPort names `port` explicitly (a number or a range).
    fn names_port(&self, port: u16) -> bool {
        self.local_port.split(',').any(|p| {
            let p = p.trim();
            match p.split_once('-') {
                Some((a, b)) => match (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
                    (Ok(a), Ok(b)) => (a..=b).contains(&port),
                    _ => false,
                },
                None => p.parse::<u16>() == Ok(port),
            }
        })
    }

    fn any_program(&self) -> bool {
        self.program.eq_ignore_ascii_case("Any")
    }

    fn active_tcp_allow(&self) -> bool {
        self.enabled && self.allow && self.is_tcp()
    }
}

// ---------------------------------------------------------------------------------------------
// Judging

fn ps_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "`\""))
}

pub fn judge(ports: &[Port], seen: &Observed, service: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    let listen_ports: Vec<u16> = ports.iter().map(|p| p.listen.port()).collect();

    // 1. From the outside: does an application port answer on a network address?
    if seen.addresses.is_empty() {
        out.push(Finding::new(
            Severity::Warn,
            "found no non-loopback address of this host to probe; give one with --address IP"
                .into(),
        ));
    }
    for p in ports {
        let port = p.backend.port();
        if !p.backend.ip().is_loopback() {
            out.push(Finding::new(
                Severity::Warn,
                format!(
                    "listener {}: the application {} is not on loopback (allowRemoteBackend): \
                     traffic from Outrigger to it is plaintext on the network",
                    p.name, p.backend
                ),
            ));
            continue;
        }
        if listen_ports.contains(&port) {
            out.push(Finding::new(
                Severity::Note,
                format!(
                    "listener {}: the application port {port} is also an Outrigger port; the \
                     probe cannot tell them apart",
                    p.name
                ),
            ));
            continue;
        }
        let open: Vec<&SocketAddr> = seen.answered.iter().filter(|a| a.port() == port).collect();
        if open.is_empty() {
            if !seen.addresses.is_empty() {
                let probed: Vec<String> = seen.addresses.iter().map(|a| a.to_string()).collect();
                out.push(Finding::new(
                    Severity::Ok,
                    format!(
                        "listener {}: the application port {port} does not answer on {}",
                        p.name,
                        probed.join(", ")
                    ),
                ));
            }
        } else {
            let at: Vec<String> = open.iter().map(|a| a.to_string()).collect();
            out.push(
                Finding::new(
                    Severity::Fail,
                    format!(
                        "listener {}: the application answers on {} — mesh peers can reach it \
                         without Outrigger's mTLS and policy. Make it listen on {} only.",
                        p.name,
                        at.join(", "),
                        p.backend
                    ),
                )
                .with_fix(block_app_port(port)),
            );
        }
    }

    // 2. From the inside: the listener table.
    match &seen.listeners {
        Err(e) => out.push(Finding::new(
            Severity::Warn,
            format!("could not list listening sockets: {e}"),
        )),
        // Wine's netstat, for one, lists no listening sockets at all: say so rather than
        // report every port as closed.
        Ok(table) if table.is_empty() => out.push(Finding::new(
            Severity::Warn,
            "the listener table shows no listening sockets at all; the inside view is \
             unavailable here (checked from the outside only)"
                .into(),
        )),
        Ok(table) => {
            for p in ports {
                let port = p.backend.port();
                if !p.backend.ip().is_loopback() || listen_ports.contains(&port) {
                    continue;
                }
                let on_port: Vec<&Listener> =
                    table.iter().filter(|l| l.addr.port() == port).collect();
                let exposed: Vec<&&Listener> = on_port
                    .iter()
                    .filter(|l| !l.addr.ip().is_loopback())
                    .collect();
                if on_port.is_empty() {
                    out.push(Finding::new(
                        Severity::Warn,
                        format!(
                            "listener {}: nothing listens on the application port {port}; is the \
                             application running?",
                            p.name
                        ),
                    ));
                } else if exposed.is_empty() {
                    out.push(Finding::new(
                        Severity::Ok,
                        format!(
                            "listener {}: the application listens on loopback only ({})",
                            p.name,
                            on_port
                                .iter()
                                .map(|l| l.addr.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                } else {
                    let mut fix = Vec::new();
                    for l in &exposed {
                        if let Some(pid) = l.pid {
                            fix.push(format!(
                                "tasklist /FI \"PID eq {pid}\"    (which program listens on {})",
                                l.addr
                            ));
                        }
                    }
                    fix.extend(block_app_port(port));
                    out.push(
                        Finding::new(
                            Severity::Fail,
                            format!(
                                "listener {}: the application port {port} is bound to {} (not \
                                 loopback). Configure the application to listen on {}.",
                                p.name,
                                exposed
                                    .iter()
                                    .map(|l| l.addr.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", "),
                                p.backend
                            ),
                        )
                        .with_fix(fix),
                    );
                }
            }
            for p in ports {
                let up = table.iter().any(|l| {
                    l.addr.port() == p.listen.port()
                        && (l.addr.ip() == p.listen.ip() || l.addr.ip().is_unspecified())
                });
                if up {
                    out.push(Finding::new(
                        Severity::Ok,
                        format!("listener {}: Outrigger listens on {}", p.name, p.listen),
                    ));
                } else if p.listen.port() != 0 {
                    out.push(Finding::new(
                        Severity::Warn,
                        format!(
                            "listener {}: nothing listens on {}; is Outrigger running? \
                             (`outrigger service start --name {service}`)",
                            p.name, p.listen
                        ),
                    ));
                }
            }
        }
    }

    // 3. Windows Firewall.
    match &seen.firewall {
        None => out.push(Finding::new(
            Severity::Note,
            "not Windows: Windows Firewall checks skipped".into(),
        )),
        Some(Err(e)) => out.push(Finding::new(
            Severity::Warn,
            format!("could not read Windows Firewall settings: {e}"),
        )),
        Some(Ok(fw)) => judge_firewall(ports, fw, &seen.exe, &mut out),
    }

    // 4. The service: installed, running, under its own account.
    match &seen.service {
        None => {}
        // The error names the service already ("service X: ... (is it installed?)").
        Some(Err(e)) => out.push(Finding::new(Severity::Note, e.clone())),
        Some(Ok(f)) => {
            let system = ["localsystem", r"nt authority\system", ".\\localsystem", ""]
                .contains(&f.account.to_ascii_lowercase().as_str());
            if system {
                out.push(
                    Finding::new(
                        Severity::Warn,
                        format!(
                            "Windows service {service} runs as LocalSystem, which can do \
                             anything on this host; a virtual account needs no password and \
                             can only what Outrigger needs"
                        ),
                    )
                    .with_fix(vec![
                        format!("sc.exe config {service} obj= \"NT SERVICE\\{service}\""),
                        "then re-run the icacls commands of docs/windows.md (§4) for that \
                         account, and restart the service"
                            .into(),
                    ]),
                );
            } else {
                out.push(Finding::new(
                    Severity::Ok,
                    format!("Windows service {service} runs as {}", f.account),
                ));
            }
            if f.state != "Running" {
                out.push(
                    Finding::new(
                        Severity::Warn,
                        format!("Windows service {service} is {}", f.state),
                    )
                    .with_fix(vec![format!("outrigger service start --name {service}")]),
                );
            }
        }
    }
    out
}

fn judge_firewall(ports: &[Port], fw: &Firewall, exe: &str, out: &mut Vec<Finding>) {
    if fw.profiles.is_empty() {
        out.push(Finding::new(
            Severity::Warn,
            "could not read the firewall profiles from `netsh advfirewall show allprofiles \
             state` (is the output in English?); firewall rules not judged"
                .into(),
        ));
        return;
    }
    let off: Vec<&str> = fw
        .profiles
        .iter()
        .filter(|(_, on)| !on)
        .map(|(n, _)| n.as_str())
        .collect();
    if off.is_empty() && !fw.profiles.is_empty() {
        out.push(Finding::new(
            Severity::Ok,
            "Windows Firewall is on for every profile".into(),
        ));
    } else if !off.is_empty() {
        out.push(
            Finding::new(
                Severity::Fail,
                format!(
                    "Windows Firewall is off for the {} profile(s): every listening port is open",
                    off.join(", ")
                ),
            )
            .with_fix(vec![
                "netsh advfirewall set allprofiles state on".into(),
                "Set-NetFirewallProfile -Profile Domain,Private,Public -Enabled True   (PowerShell)"
                    .into(),
            ]),
        );
    }
    let listen_ports: Vec<u16> = ports.iter().map(|p| p.listen.port()).collect();
    for p in ports {
        let port = p.listen.port();
        if port == 0 {
            continue;
        }
        let allowed = fw.rules.iter().any(|r| {
            r.active_tcp_allow()
                && (r.any_port() || r.names_port(port))
                && (r.any_program() || r.program.eq_ignore_ascii_case(exe))
                // An any-port, any-program rule is a hole, not an allowance for Outrigger.
                && !(r.any_port() && r.any_program())
        });
        if allowed {
            out.push(Finding::new(
                Severity::Ok,
                format!(
                    "listener {}: the firewall lets the mesh reach port {port}",
                    p.name
                ),
            ));
        } else {
            let rule = format!("Outrigger {}", p.name);
            out.push(
                Finding::new(
                    Severity::Fail,
                    format!(
                        "listener {}: no enabled inbound firewall rule allows TCP port {port}; \
                         mesh peers cannot reach Outrigger",
                        p.name
                    ),
                )
                .with_fix(vec![
                    format!(
                        "netsh advfirewall firewall add rule name=\"{rule}\" dir=in action=allow \
                         protocol=TCP localport={port} program=\"{exe}\" enable=yes"
                    ),
                    format!(
                        "New-NetFirewallRule -DisplayName {} -Direction Inbound -Action Allow \
                         -Protocol TCP -LocalPort {port} -Program {}   (PowerShell)",
                        ps_quote(&rule),
                        ps_quote(exe)
                    ),
                ]),
            );
        }
    }
    for p in ports {
        let port = p.backend.port();
        if !p.backend.ip().is_loopback() || listen_ports.contains(&port) {
            continue;
        }
        for r in fw
            .rules
            .iter()
            .filter(|r| r.active_tcp_allow() && r.names_port(port))
        {
            out.push(
                Finding::new(
                    Severity::Fail,
                    format!(
                        "firewall rule \"{}\" allows the application port {port} from the \
                         network (listener {})",
                        r.name, p.name
                    ),
                )
                .with_fix(disable_rule(&r.name)),
            );
        }
    }
    for r in fw
        .rules
        .iter()
        .filter(|r| r.active_tcp_allow() && r.any_port() && r.any_program())
    {
        out.push(
            Finding::new(
                Severity::Fail,
                format!(
                    "firewall rule \"{}\" allows every TCP port to every program, including \
                     the application's",
                    r.name
                ),
            )
            .with_fix(disable_rule(&r.name)),
        );
    }
    let mut others: Vec<String> = fw
        .rules
        .iter()
        .filter(|r| {
            r.active_tcp_allow() && !r.any_port() && !listen_ports.iter().any(|p| r.names_port(*p))
        })
        .map(|r| format!("{} ({})", r.local_port, r.name))
        .collect();
    others.sort();
    others.dedup();
    if !others.is_empty() {
        out.push(Finding::new(
            Severity::Note,
            format!(
                "other inbound TCP ports the firewall allows (remote management and the like; \
                 review them): {}",
                others.join("; ")
            ),
        ));
    }
}

fn block_app_port(port: u16) -> Vec<String> {
    let rule = format!("Outrigger: block direct access to app port {port}");
    vec![
        format!(
            "netsh advfirewall firewall add rule name=\"{rule}\" dir=in action=block \
             protocol=TCP localport={port}"
        ),
        format!(
            "New-NetFirewallRule -DisplayName {} -Direction Inbound -Action Block -Protocol TCP \
             -LocalPort {port}   (PowerShell)",
            ps_quote(&rule)
        ),
        "(a block rule wins over allow rules; it guards the port until the application is \
         rebound to 127.0.0.1)"
            .into(),
    ]
}

fn disable_rule(name: &str) -> Vec<String> {
    vec![
        format!("netsh advfirewall firewall set rule name=\"{name}\" dir=in new enable=no"),
        format!(
            "Disable-NetFirewallRule -DisplayName {}   (PowerShell)",
            ps_quote(name)
        ),
    ]
}

/// The human-readable report.
pub fn report(config: &Path, seen: &Observed, findings: &[Finding]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "outrigger doctor: {}", config.display());
    if !seen.addresses.is_empty() {
        let a: Vec<String> = seen.addresses.iter().map(|a| a.to_string()).collect();
        let _ = writeln!(s, "probed from this host's addresses: {}", a.join(", "));
    }
    for f in findings {
        let tag = match f.severity {
            Severity::Ok => " OK ",
            Severity::Note => "NOTE",
            Severity::Warn => "WARN",
            Severity::Fail => "FAIL",
        };
        let _ = writeln!(s, "[{tag}] {}", f.message);
        for fix in &f.fix {
            let _ = writeln!(s, "       fix: {fix}");
        }
    }
    let n = |sev| findings.iter().filter(|f| f.severity == sev).count();
    let _ = writeln!(
        s,
        "{} problem(s), {} warning(s)",
        n(Severity::Fail),
        n(Severity::Warn)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, listen: &str, backend: &str) -> Port {
        Port {
            name: name.into(),
            listen: listen.parse().unwrap(),
            backend: backend.parse().unwrap(),
        }
    }

    fn fails(f: &[Finding]) -> Vec<&Finding> {
        f.iter().filter(|f| f.severity == Severity::Fail).collect()
    }

    #[test]
    fn parses_proc_net_tcp_listeners() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:1388 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
        assert_eq!(
            parse_proc_net_tcp(v4, false)
                .iter()
                .map(|l| l.addr.to_string())
                .collect::<Vec<_>>(),
            ["127.0.0.1:5000", "0.0.0.0:8080"]
        );
        let v6 =
            "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:1388 00000000000000000000000000000000:0000 0A 0
   1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 0
";
        assert_eq!(
            parse_proc_net_tcp(v6, true)
                .iter()
                .map(|l| l.addr.to_string())
                .collect::<Vec<_>>(),
            ["[::1]:5000", "[::]:80"]
        );
    }

    #[test]
    fn parses_netstat_listeners_in_any_language() {
        let text = "
Active Connections

  Proto  Local Address          Foreign Address        State           PID
  TCP    0.0.0.0:135            0.0.0.0:0              LISTENING       884
  TCP    127.0.0.1:5000         0.0.0.0:0              ABHÖREN         4242
  TCP    10.0.0.5:5000          10.0.0.9:51234         ESTABLISHED     4242
  TCP    [::]:8080              [::]:0                 LISTENING       77
  TCP    [fe80::1%4]:80         [::]:0                 LISTENING       4
";
        let l = parse_netstat(text);
        assert_eq!(
            l.iter()
                .map(|l| (l.addr.to_string(), l.pid))
                .collect::<Vec<_>>(),
            [
                ("0.0.0.0:135".to_string(), Some(884)),
                ("127.0.0.1:5000".to_string(), Some(4242)),
                ("[::]:8080".to_string(), Some(77)),
                ("[fe80::1]:80".to_string(), Some(4)),
            ]
        );
    }

    const PROFILES: &str = "
Domain Profile Settings:
----------------------------------------------------------------------
State                                 ON

Private Profile Settings:
----------------------------------------------------------------------
State                                 OFF

Public Profile Settings:
----------------------------------------------------------------------
State                                 ON
Ok.
";

    const RULES: &str = r"
Rule Name:                            Outrigger web
----------------------------------------------------------------------
Enabled:                              Yes
Direction:                            In
Profiles:                             Domain,Private,Public
Grouping:
LocalIP:                              Any
RemoteIP:                             Any
Protocol:                             TCP
LocalPort:                            8080
RemotePort:                           Any
Edge traversal:                       No
Program:                              C:\Program Files\Outrigger\outrigger.exe
InterfaceTypes:                       Any
Security:                             NotRequired
Rule source:                          Local Setting
Action:                               Allow

Rule Name:                            Legacy app
----------------------------------------------------------------------
Enabled:                              Yes
Direction:                            In
Protocol:                             TCP
LocalPort:                            4000-5010
Program:                              Any
Action:                               Allow

Rule Name:                            Remote Desktop - User Mode (TCP-In)
----------------------------------------------------------------------
Enabled:                              Yes
Direction:                            In
Protocol:                             TCP
LocalPort:                            3389
Program:                              %SystemRoot%\system32\svchost.exe
Action:                               Allow

Rule Name:                            Old disabled hole
----------------------------------------------------------------------
Enabled:                              No
Direction:                            In
Protocol:                             Any
LocalPort:                            Any
Program:                              Any
Action:                               Allow
Ok.
";

    #[test]
    fn parses_netsh_profiles_and_rules() {
        assert_eq!(
            parse_profiles(PROFILES),
            [
                ("Domain".to_string(), true),
                ("Private".to_string(), false),
                ("Public".to_string(), true)
            ]
        );
        let rules = parse_rules(RULES);
        assert_eq!(rules.len(), 4);
        assert_eq!(
            rules[0],
            Rule {
                name: "Outrigger web".into(),
                enabled: true,
                allow: true,
                protocol: "TCP".into(),
                local_port: "8080".into(),
                program: r"C:\Program Files\Outrigger\outrigger.exe".into(),
            }
        );
        assert!(rules[1].names_port(5000) && !rules[1].names_port(5011));
        assert!(!rules[3].enabled && rules[3].any_port());
    }

    fn seen_with(answered: &[&str], listeners: &[&str], firewall: Option<Firewall>) -> Observed {
        Observed {
            addresses: vec!["10.0.0.5".parse().unwrap()],
            answered: answered.iter().map(|a| a.parse().unwrap()).collect(),
            listeners: Ok(listeners
                .iter()
                .map(|a| Listener {
                    addr: a.parse().unwrap(),
                    pid: Some(4242),
                })
                .collect()),
            firewall: firewall.map(Ok),
            exe: r"C:\Program Files\Outrigger\outrigger.exe".into(),
            service: None,
        }
    }

    #[test]
    fn the_service_account_and_state_are_checked() {
        let ports = [port("web", "0.0.0.0:8080", "127.0.0.1:5000")];
        let mut seen = seen_with(&[], &["127.0.0.1:5000", "0.0.0.0:8080"], None);
        seen.service = Some(Ok(ServiceFacts {
            state: "Running".into(),
            account: r"NT SERVICE\Outrigger".into(),
        }));
        let text = report(
            Path::new("a.yaml"),
            &seen,
            &judge(&ports, &seen, "Outrigger"),
        );
        assert!(
            text.contains(r"[ OK ] Windows service Outrigger runs as NT SERVICE\Outrigger"),
            "{text}"
        );
        assert!(!text.contains("[WARN] Windows service"), "{text}");

        seen.service = Some(Ok(ServiceFacts {
            state: "Stopped".into(),
            account: "LocalSystem".into(),
        }));
        let text = report(Path::new("a.yaml"), &seen, &judge(&ports, &seen, "Edge"));
        assert!(
            text.contains("[WARN] Windows service Edge runs as LocalSystem"),
            "{text}"
        );
        assert!(
            text.contains(r#"fix: sc.exe config Edge obj= "NT SERVICE\Edge""#),
            "{text}"
        );
        assert!(
            text.contains("[WARN] Windows service Edge is Stopped"),
            "{text}"
        );
        assert!(
            text.contains("fix: outrigger service start --name Edge"),
            "{text}"
        );
    }

    #[test]
    fn a_loopback_only_app_behind_a_tight_firewall_passes() {
        let ports = [port("web", "0.0.0.0:8080", "127.0.0.1:5000")];
        let fw = Firewall {
            profiles: vec![("Domain".into(), true), ("Public".into(), true)],
            rules: parse_rules(RULES)
                .into_iter()
                .filter(|r| r.name != "Legacy app")
                .collect(),
        };
        let seen = seen_with(&[], &["127.0.0.1:5000", "0.0.0.0:8080"], Some(fw));
        let f = judge(&ports, &seen, "Outrigger");
        assert!(fails(&f).is_empty(), "{f:#?}");
        let text = report(Path::new("agent.yaml"), &seen, &f);
        assert!(
            text.contains(
                "[ OK ] listener web: the application listens on loopback only (127.0.0.1:5000)"
            ),
            "{text}"
        );
        assert!(
            text.contains("[ OK ] listener web: the firewall lets the mesh reach port 8080"),
            "{text}"
        );
        assert!(
            text.contains("3389 (Remote Desktop - User Mode (TCP-In))"),
            "{text}"
        );
        assert!(text.contains("0 problem(s)"), "{text}");
    }

    #[test]
    fn an_exposed_app_and_loose_firewall_are_reported_with_fixes() {
        let ports = [port("web", "0.0.0.0:8080", "127.0.0.1:5000")];
        let fw = Firewall {
            profiles: parse_profiles(PROFILES),
            rules: parse_rules(RULES)
                .into_iter()
                .filter(|r| r.name != "Outrigger web")
                .collect(),
        };
        let seen = seen_with(&["10.0.0.5:5000"], &["0.0.0.0:5000"], Some(fw));
        let f = judge(&ports, &seen, "Outrigger");
        let text = report(Path::new("agent.yaml"), &seen, &f);
        for needle in [
            "[FAIL] listener web: the application answers on 10.0.0.5:5000",
            "[FAIL] listener web: the application port 5000 is bound to 0.0.0.0:5000",
            "fix: tasklist /FI \"PID eq 4242\"",
            "fix: netsh advfirewall firewall add rule name=\"Outrigger: block direct access to app port 5000\" dir=in action=block protocol=TCP localport=5000",
            "[FAIL] Windows Firewall is off for the Private profile(s)",
            "fix: netsh advfirewall set allprofiles state on",
            "[FAIL] listener web: no enabled inbound firewall rule allows TCP port 8080",
            r#"fix: netsh advfirewall firewall add rule name="Outrigger web" dir=in action=allow protocol=TCP localport=8080 program="C:\Program Files\Outrigger\outrigger.exe" enable=yes"#,
            r#"fix: New-NetFirewallRule -DisplayName "Outrigger web" -Direction Inbound -Action Allow -Protocol TCP -LocalPort 8080 -Program "C:\Program Files\Outrigger\outrigger.exe"   (PowerShell)"#,
            "[FAIL] firewall rule \"Legacy app\" allows the application port 5000",
            "fix: netsh advfirewall firewall set rule name=\"Legacy app\" dir=in new enable=no",
            "[WARN] listener web: nothing listens on 0.0.0.0:8080; is Outrigger running?",
            "5 problem(s), 1 warning(s)",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        // The disabled any-port rule is not a hole.
        assert!(!text.contains("Old disabled hole"), "{text}");
    }

    #[test]
    fn an_enabled_any_port_any_program_rule_is_a_hole() {
        let ports = [port("web", "0.0.0.0:8080", "127.0.0.1:5000")];
        let mut rules = parse_rules(RULES);
        rules[3].enabled = true;
        let fw = Firewall {
            profiles: vec![("Public".into(), true)],
            rules,
        };
        let seen = seen_with(&[], &["127.0.0.1:5000"], Some(fw));
        let f = judge(&ports, &seen, "Outrigger");
        assert!(
            fails(&f).iter().any(|f| f
                .message
                .contains("\"Old disabled hole\" allows every TCP port")),
            "{f:#?}"
        );
    }

    /// The real probes against real sockets on this host: an application bound to every
    /// address is found from the listener table (and, where the host has a non-loopback
    /// address, from the outside); one bound to 127.0.0.1 is not.
    #[test]
    fn real_probes_tell_an_exposed_app_from_a_loopback_one() {
        let exposed = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let exposed_port = exposed.local_addr().unwrap().port();
        let private = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let private_port = private.local_addr().unwrap().port();
        let ports = [
            port(
                "exposed",
                "127.0.0.1:1",
                &format!("127.0.0.1:{exposed_port}"),
            ),
            port(
                "private",
                "127.0.0.1:1",
                &format!("127.0.0.1:{private_port}"),
            ),
        ];
        let seen = observe(&ports, &[], "OutriggerDoctorTest");
        let f = judge(&ports, &seen, "Outrigger");
        let text = report(Path::new("agent.yaml"), &seen, &f);
        println!("{text}");
        if cfg!(windows) && seen.listeners.as_ref().is_ok_and(|t| t.is_empty()) {
            // Wine's netstat omits listening sockets; real Windows lists them.
            assert!(
                text.contains("the listener table shows no listening sockets"),
                "{text}"
            );
        } else {
            assert!(
                text.contains(&format!(
                    "[FAIL] listener exposed: the application port {exposed_port} is bound to"
                )),
                "{text}"
            );
            assert!(
            text.contains(&format!(
                "[ OK ] listener private: the application listens on loopback only (127.0.0.1:{private_port})"
            )),
            "{text}"
        );
        }
        if seen.addresses.is_empty() {
            println!(
                "NOTE: this host has no non-loopback address; the outside probe was not exercised"
            );
        } else {
            assert!(
                seen.answered.iter().all(|a| a.port() == exposed_port),
                "{:?}",
                seen.answered
            );
            assert!(
                text.contains("[FAIL] listener exposed: the application answers on"),
                "{text}"
            );
            assert!(
                text.contains(&format!(
                    "[ OK ] listener private: the application port {private_port} does not answer"
                )),
                "{text}"
            );
        }
    }
}
