//! `outrigger`: a zero-trust Istio mesh agent for workloads that cannot run a sidecar.

mod agent;
mod bootstrap;
mod check;
mod client;
mod config;
mod demo;
mod envoy_filter;
mod fdlimit;
mod lint;
mod logging;
mod memtrim;
mod policy_files;
mod policy_merge;
// Policy from the cluster (`policy.kubernetes`), behind the default `kubernetes` feature.
#[cfg(feature = "kubernetes")]
mod kube_policy;
mod register;
mod sd_notify;
mod windows;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::AgentConfig;

const ABOUT: &str = "Outrigger joins a workload that cannot run an Envoy sidecar (a Windows \
service, a legacy VM, an appliance) to an Istio mesh under STRICT mTLS. It terminates the \
mesh's mTLS in front of the application, verifies the caller's SPIFFE identity, enforces \
Istio's PeerAuthentication and AuthorizationPolicy, and forwards to the application on \
loopback.";

const AFTER_HELP: &str = "\
Getting started:
  outrigger demo                 a real mesh on loopback: allowed, denied and plaintext calls
  outrigger ca init --trust-domain cluster.local --dir ./ca
  outrigger ca issue --dir ./ca --spiffe spiffe://cluster.local/ns/legacy/sa/app --out ./certs
  outrigger run --config agent.yaml

The configuration file is documented in docs/config.md.";

#[derive(Parser)]
#[command(name = "outrigger", version, about = ABOUT, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: serve the inbound listeners of a configuration file.
    #[command(after_help = "\
Example:
  outrigger run --config /etc/outrigger/agent.yaml

The agent refuses to start when the configuration or a certificate has an error, and says
which file, line and field. A policy resource istiod would reject is refused alone, logged the
same way, and fails closed (docs/policy.md). It stops on Ctrl-C or SIGTERM after letting
in-flight requests finish (timeouts.drain, default 30s).")]
    Run(RunArgs),
    /// Build a local mesh on loopback and show Outrigger at work (no setup needed).
    #[command(after_help = "\
The demo makes a CA, an application bound to 127.0.0.1, and Outrigger in front of it under
STRICT mTLS with a default-deny AuthorizationPolicy, then makes real calls: an allowed mTLS
call, a call from a mesh identity the policy denies, a plaintext call and a call with a
certificate from an untrusted CA. It prints how to repeat each call with curl.

Examples:
  outrigger demo
  outrigger demo --keep     (leave it running and call it yourself)")]
    Demo(DemoArgs),
    /// Would this request be allowed, and by which policy? (No traffic: same engine, same files.)
    #[command(after_help = check::AFTER_HELP)]
    Check(check::CheckArgs),
    /// Find Istio's security pitfalls in policy YAML (and an agent configuration) before
    /// traffic does: default-deny that is not, PERMISSIVE left on, anonymous JWT access, HTTP
    /// rules on TCP ports... Text, JSON or SARIF.
    #[command(after_help = lint::AFTER_HELP)]
    Lint(lint::LintArgs),
    /// Manage Outrigger's built-in certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Install, start, stop or remove Outrigger as a Windows service (see docs/windows.md).
    #[command(subcommand)]
    Service(windows::ServiceCommand),
    /// Check this host for ways around Outrigger: application ports reachable from the
    /// network, Outrigger's listeners, Windows Firewall rules. Prints the commands that fix
    /// what it finds.
    #[command(after_help = "\
Example:
  outrigger doctor --config agent.yaml --address 10.0.0.5")]
    Doctor(windows::DoctorArgs),
    /// Mesh registration: the Istio resources that make this host a mesh workload.
    #[command(subcommand)]
    Mesh(MeshCommand),
    /// Write an agent configuration from the files of `istioctl x workload entry configure`
    /// (cluster.env, mesh.yaml, hosts, root-cert.pem, istio-token): identity from istiod.
    #[command(after_help = bootstrap::AFTER_HELP)]
    Bootstrap(bootstrap::BootstrapArgs),
    /// Print the version, git commit, build date, target and crypto provider.
    #[command(after_help = "\
Example:
  outrigger version")]
    Version,
    /// Print a shell completion script (bash, zsh, powershell, fish, elvish).
    #[command(after_help = "\
Examples:
  outrigger completions bash > /etc/bash_completion.d/outrigger
  outrigger completions zsh > \"${fpath[1]}/_outrigger\"
  outrigger completions powershell >> $PROFILE")]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one page per command into a directory.
    #[command(after_help = "\
Examples:
  outrigger man | man -l -
  outrigger man --dir /usr/share/man/man1")]
    Man {
        /// Write outrigger.1 and one page per command (outrigger-run.1, ...) here instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// The cryptography under every TLS connection, for `outrigger version`.
const CRYPTO_PROVIDER: &str = "rustls with aws-lc-rs";

/// `outrigger version`: what an operator checks against a release's SHA256SUMS and SBOM.
fn version_text() -> String {
    format!(
        "outrigger {}\ncommit:  {}\nbuilt:   {} ({} build)\ntarget:  {}\ncrypto:  {}\n",
        env!("CARGO_PKG_VERSION"),
        env!("OUTRIGGER_COMMIT"),
        env!("OUTRIGGER_BUILD_DATE"),
        env!("OUTRIGGER_PROFILE"),
        env!("OUTRIGGER_TARGET"),
        CRYPTO_PROVIDER,
    )
}

/// `outrigger man`: the top page to stdout, or every page into `dir`.
fn man(dir: Option<PathBuf>) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    match dir {
        None => {
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout().lock())?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("cannot write manual pages into {}", dir.display()))?;
            println!("manual pages written into {}", dir.display());
        }
    }
    Ok(())
}

#[derive(Args)]
struct RunArgs {
    /// The agent configuration file (YAML; see docs/config.md).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// Tokio worker threads, 1 to 1024, or 0 for one per core (default: runtime.workerThreads,
    /// else one per core).
    #[arg(long, value_name = "N", value_parser = config::parse_worker_threads)]
    worker_threads: Option<usize>,
    /// Check the configuration, certificates and policy, print a summary, and exit. Binds no
    /// listener, so it can run beside the agent it checks.
    #[arg(long)]
    check_config: bool,
    /// Once listening, write the bound addresses here as JSON
    /// ({"inbound":{"<name>":"ip:port"},"admin":"ip:port","hbone":"ip:port"}); useful with port 0.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
}

#[derive(Args)]
struct DemoArgs {
    /// Leave the demo mesh running (until Ctrl-C) so you can call it yourself.
    #[arg(long)]
    keep: bool,
}

#[derive(Subcommand)]
enum MeshCommand {
    /// Print the WorkloadEntry (and ServiceEntry / WorkloadGroup where needed) for this host.
    #[command(after_help = "\
Example:
  outrigger mesh register --config agent.yaml --address 10.0.0.5 | kubectl apply -f -

The WorkloadEntry carries the address, the service account, the network (hbone.network), the
listener ports and labels including security.istio.io/tlsMode: istio; with HBONE enabled, also
the ambient markers so that ztunnel and waypoints reach this host over HBONE on port 15008.
See docs/ambient.md.")]
    Register(register::RegisterArgs),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a root CA (ECDSA P-256) for a trust domain.
    #[command(after_help = "\
Example:
  outrigger ca init --trust-domain cluster.local --dir ./ca

Writes root-cert.pem and root-key.pem (readable only by you). Keep root-key.pem secret;
distribute root-cert.pem as the mesh trust bundle.")]
    Init {
        /// The SPIFFE trust domain, e.g. cluster.local.
        #[arg(long, value_name = "DOMAIN")]
        trust_domain: String,
        /// Where to write the CA (created if missing; an existing CA is never overwritten).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Issue a workload certificate with a SPIFFE ID.
    #[command(after_help = "\
Example:
  outrigger ca issue --dir ./ca --spiffe spiffe://cluster.local/ns/legacy/sa/app --out ./certs

Writes cert-chain.pem, key.pem and root-cert.pem (Istio's file names) into --out, ready for
`certificates.files` in the agent configuration.")]
    Issue {
        /// The CA directory made by `outrigger ca init`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The workload's SPIFFE ID: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
        #[arg(long, value_name = "URI")]
        spiffe: String,
        /// Where to write the certificate files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Lifetime, e.g. 24h, 90m, 30d (1m to 3650d).
        #[arg(long, default_value = "24h", value_parser = config::parse_ttl)]
        ttl: Duration,
    },
    /// Write a certificate revocation list signed by a built-in CA, for `certificates.crl`.
    #[command(after_help = "\
Example:
  outrigger ca crl --dir ./ca --revoke ./stolen/cert-chain.pem --out ./ca-crl.pem

Revokes the leaf certificate of each --revoke file (none: an empty CRL, which agents with
`certificates.crl` need so that certificates of this CA are not refused for lack of a CRL).
The CRL number is the current Unix time, so a newer CRL always has a higher number. Agents
re-read the file and apply it to new handshakes; publish a new one before --validity ends.")]
    Crl {
        /// The CA directory made by `outrigger ca init`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A PEM certificate (or chain: its first certificate) to revoke; repeatable.
        #[arg(long, value_name = "FILE")]
        revoke: Vec<PathBuf>,
        /// Until the CRL's nextUpdate, e.g. 7d (1m to 3650d).
        #[arg(long, default_value = "7d", value_parser = config::parse_ttl)]
        validity: Duration,
        /// Where to write the CRL (PEM).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Serve Istio's CA API (istiod's CreateCertificate) from a built-in CA: a lab/dev CA.
    #[command(after_help = "\
Example:
  outrigger ca serve --dir ./ca --listen 127.0.0.1:15012 --token-file ./ca-token

Answers istio.v1.auth.IstioCertificateService/CreateCertificate over TLS with a serving
certificate for --server-name (istiod.istio-system.svc by default), so Outrigger agents
(`certificates.istioCa`), ztunnel and istio-agent can obtain workload certificates from it.

Authentication (a lab/dev mode, not istiod's Kubernetes TokenReview):
  * a caller presenting a certificate of this CA gets a certificate for its own identity only;
  * a caller with the token in --token-file (`authorization: Bearer <token>`) may ask for any
    SPIFFE ID of the CA's trust domain: the CSR's URI SAN, or the ImpersonatedIdentity
    metadata that ztunnel sends;
  * --insecure-no-token gives every caller that right: for a lab on one machine only.
Lifetimes as istiod's: the requested one, 24h when none, refused above --max-ttl (90d).")]
    Serve {
        /// The CA directory made by `outrigger ca init`.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Address to listen on (istiod's CA port is 15012).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15012")]
        listen: std::net::SocketAddr,
        /// DNS name(s) of the serving certificate; clients verify the one they dial with.
        #[arg(
            long = "server-name",
            value_name = "NAME",
            default_value = "istiod.istio-system.svc"
        )]
        server_names: Vec<String>,
        /// File holding the token callers without a certificate must present.
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "insecure_no_token"
        )]
        token_file: Option<PathBuf>,
        /// Issue to any caller without a token (lab on one machine only).
        #[arg(long, conflicts_with = "token_file")]
        insecure_no_token: bool,
        /// Longest lifetime granted (istiod's MAX_WORKLOAD_CERT_TTL).
        #[arg(long, default_value = "90d", value_parser = config::parse_ttl)]
        max_ttl: Duration,
    },
}

fn runtime(worker_threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    // One worker: Tokio's current-thread scheduler does the same work without the
    // work-stealing machinery (cross-thread wakeups, atomics) that one thread cannot use.
    let mut b = if worker_threads == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    b.enable_all().thread_name("outrigger-worker");
    if let Some(n) = worker_threads.filter(|n| *n > 1) {
        b.worker_threads(n);
    }
    Ok(b.build()?)
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = AgentConfig::load(&args.config)?;
    logging::init(cfg.log_format, &cfg.log_level)?;
    // `--worker-threads` wins over the file; 0 there means one per core, as in the file.
    let threads = match args.worker_threads {
        Some(0) => None,
        Some(n) => Some(n),
        None => cfg.worker_threads,
    };
    // Before any socket or file is opened, so that every later open gets the raised limit.
    if !args.check_config {
        fdlimit::raise().log();
    }
    let rt = runtime(threads)?;
    rt.block_on(async {
        let obtain = if args.check_config {
            agent::Obtain::No
        } else {
            agent::Obtain::Yes
        };
        let loaded = agent::Loaded::load(&cfg, obtain).await?;
        if args.check_config {
            // Binds nothing, so it also checks a configuration beside the running agent.
            let policy = loaded.policy.load();
            println!(
                "configuration OK: {} ({} inbound listener(s), {} policy resource(s) in force)",
                cfg.identity,
                cfg.inbound.len(),
                policy.snapshot.applied().len()
            );
            for l in &cfg.inbound {
                let mtls = policy.snapshot.mtls_mode(l.listen.port());
                println!(
                    "  inbound {}: {} -> {} ({}, mTLS {})",
                    l.name,
                    l.listen,
                    l.backend,
                    l.protocol.as_str(),
                    mtls.mode
                );
            }
            return Ok(());
        }
        let agent = loaded.bind(&cfg).await?;
        for (name, addr) in agent.inbound_addrs() {
            let l = cfg.inbound.iter().find(|l| l.name == name);
            let (backend, proto) = l
                .map(|l| (l.backend.to_string(), l.protocol.as_str()))
                .unwrap_or_default();
            let mtls = agent.policy.load().snapshot.mtls_mode(addr.port());
            tracing::info!(
                listener = %name, %addr, %backend, protocol = proto, mtls = %mtls.mode,
                "inbound listener"
            );
        }
        if let Some(a) = agent.admin_addr() {
            tracing::info!(
                admin = %a,
                "admin endpoints: /healthz/ready /metrics /stats /config_dump /logging"
            );
        }
        if let Some(a) = agent.metrics_addr() {
            tracing::info!(metrics = %a, "metrics listener (admin.metricsListen): /metrics");
        }
        if let Some(a) = agent.hbone_addr() {
            tracing::info!(
                hbone = %a,
                network = %cfg.network,
                "HBONE listener (Istio ambient): CONNECT streams are routed to the inbound listeners by port"
            );
        }
        if let Some(path) = &args.ready_file {
            write_ready_file(path, &agent)?;
        }
        sd_notify::ready();
        agent
            .run(async {
                agent::shutdown_signal().await;
                sd_notify::stopping();
            })
            .await;
        Ok::<_, anyhow::Error>(())
    })
}

/// Writes the bound addresses atomically (temp file + rename) so a reader never sees half.
fn write_ready_file(path: &std::path::Path, agent: &agent::Agent) -> anyhow::Result<()> {
    let inbound: serde_json::Map<String, serde_json::Value> = agent
        .inbound_addrs()
        .into_iter()
        .map(|(n, a)| (n, a.to_string().into()))
        .collect();
    let outbound: serde_json::Map<String, serde_json::Value> = agent
        .outbound_addrs()
        .into_iter()
        .map(|(n, a)| (n, a.to_string().into()))
        .collect();
    let doc = serde_json::json!({
        "inbound": inbound,
        "outbound": outbound,
        "admin": agent.admin_addr().map(|a| a.to_string()),
        "metrics": agent.metrics_addr().map(|a| a.to_string()),
        "hbone": agent.hbone_addr().map(|a| a.to_string()),
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, doc.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn ca(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init { trust_domain, dir } => {
            let ca = outrigger_tls::ca::BuiltinCa::init(&dir, &trust_domain)?;
            println!(
                "created a root CA for trust domain {} in {}\n  root-cert.pem  the trust bundle: give it to every mesh peer\n  root-key.pem   the CA key: keep it secret",
                ca.trust_domain(),
                dir.display()
            );
        }
        CaCommand::Issue {
            dir,
            spiffe,
            out,
            ttl,
        } => {
            let ca = outrigger_tls::ca::BuiltinCa::load(&dir)?;
            let id: outrigger_identity::Identity = spiffe
                .parse()
                .with_context(|| format!("--spiffe {spiffe}"))?;
            let cert = ca.issue(&id, ttl)?;
            cert.write_to(&out)?;
            println!(
                "issued {id} (valid for {}) into {}\n  cert-chain.pem, key.pem, root-cert.pem",
                humanize(ttl),
                out.display()
            );
        }
        CaCommand::Crl {
            dir,
            revoke,
            validity,
            out,
        } => {
            let ca = outrigger_tls::ca::BuiltinCa::load(&dir)?;
            let mut leaves = Vec::new();
            for f in &revoke {
                let pem = std::fs::read(f).with_context(|| format!("--revoke {}", f.display()))?;
                use outrigger_tls::rustls_pki_types::pem::PemObject;
                let cert = outrigger_tls::rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                    .next()
                    .ok_or_else(|| {
                        anyhow::anyhow!("--revoke {}: no PEM certificate in the file", f.display())
                    })?
                    .with_context(|| format!("--revoke {}", f.display()))?;
                leaves.push(cert);
            }
            let number = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs());
            let crl = ca.crl(&leaves, number, validity)?;
            std::fs::write(&out, crl).with_context(|| format!("--out {}", out.display()))?;
            println!(
                "wrote a CRL of trust domain {} revoking {} certificate(s), valid for {}, to {}",
                ca.trust_domain(),
                leaves.len(),
                humanize(validity),
                out.display()
            );
        }
        CaCommand::Serve {
            dir,
            listen,
            server_names,
            token_file,
            insecure_no_token,
            max_ttl,
        } => ca_serve(
            dir,
            listen,
            server_names,
            token_file,
            insecure_no_token,
            max_ttl,
        )?,
    }
    Ok(())
}

/// `outrigger ca serve`: runs until Ctrl-C / SIGTERM.
fn ca_serve(
    dir: PathBuf,
    listen: std::net::SocketAddr,
    server_names: Vec<String>,
    token_file: Option<PathBuf>,
    insecure_no_token: bool,
    max_ttl: Duration,
) -> anyhow::Result<()> {
    use outrigger_ca::server::{ServeOptions, TokenCheck};
    logging::init(config::LogFormat::Text, "info")?;
    let ca = outrigger_tls::ca::BuiltinCa::load(&dir)?;
    let tokens = match (token_file, insecure_no_token) {
        (Some(f), _) => {
            let t = std::fs::read_to_string(&f)
                .with_context(|| format!("--token-file {}", f.display()))?;
            let t = t.trim();
            anyhow::ensure!(
                !t.is_empty(),
                "--token-file {}: the file is empty",
                f.display()
            );
            TokenCheck::Static(t.to_string())
        }
        (None, _) => TokenCheck::None,
    };
    let mut opts = ServeOptions::new(tokens.clone(), server_names.clone());
    opts.max_ttl = max_ttl;
    let rt = runtime(None)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("--listen {listen}"))?;
        let addr = listener.local_addr()?;
        println!(
            "serving the Istio CA API for trust domain {} on {addr} (server name {}; {})",
            ca.trust_domain(),
            server_names.join(", "),
            match tokens {
                TokenCheck::Static(_) => "callers need the token or a certificate of this CA",
                TokenCheck::None => "INSECURE: any caller may obtain any identity",
            }
        );
        outrigger_ca::server::serve(listener, ca, opts, agent::shutdown_signal()).await?;
        Ok(())
    })
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 86400 == 0 && s > 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Demo(a) => demo::main(a.keep),
        Command::Ca(c) => ca(c),
        Command::Service(c) => windows::service(c),
        Command::Doctor(a) => windows::doctor(a),
        Command::Mesh(MeshCommand::Register(a)) => register::run(a),
        Command::Bootstrap(a) => bootstrap::run(a),
        // Exit statuses as grep's and diff's, kept apart from clap's usage error (2):
        // 0 allowed, 1 denied, 3 the check could not be made.
        Command::Check(a) => match check::run(a) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(3);
            }
        },
        // As `check`: 0 clean, 1 findings, 3 could not lint (clap's usage error is 2).
        Command::Lint(a) => match lint::run(a) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(3);
            }
        },
        Command::Version => {
            print!("{}", version_text());
            Ok(())
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "outrigger",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { dir } => man(dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod cli_tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command a user can see says how to use it with an example, and clap's own
    /// checks of the definitions pass.
    #[test]
    fn every_visible_command_has_an_example() {
        Cli::command().debug_assert();
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_subcommands().next().is_some() {
                    walk(sub, &name, missing);
                } else if !sub
                    .get_after_help()
                    .is_some_and(|h| h.to_string().contains("Example"))
                {
                    missing.push(name);
                }
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "outrigger", &mut missing);
        assert!(missing.is_empty(), "no example in --help: {missing:?}");
    }

    #[test]
    fn version_names_commit_date_target_and_crypto() {
        let v = version_text();
        for field in [
            "outrigger ",
            "commit:",
            "built:",
            "target:",
            "crypto:  rustls",
        ] {
            assert!(v.contains(field), "{v}");
        }
        assert!(v.contains(env!("CARGO_PKG_VERSION")));
    }
}
