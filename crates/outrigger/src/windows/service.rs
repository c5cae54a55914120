//! The Windows service: install / uninstall / start / stop / status through the service
//! control manager (SCM), and the service's own entry point (`outrigger service run`).
//!
//! The service runs the same agent as `outrigger run`. SCM's Stop (and system Shutdown) is
//! mapped to the agent's graceful drain: no new connections, in-flight requests get
//! `timeouts.drain`, then the process exits. Logs go to a size-rotated file under
//! `C:\ProgramData\Outrigger\logs\` and warnings, errors and start/stop to the Event Log.

// `define_windows_service!` expands to an `extern "system"` entry point that parses the raw
// argument vector with `unsafe`; the crate documents it as sound for SCM-provided arguments.
#![allow(unsafe_code)]

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tracing_subscriber::layer::SubscriberExt;
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceDependency, ServiceErrorControl, ServiceExitCode, ServiceFailureActions,
    ServiceFailureResetPeriod, ServiceInfo, ServiceSidType, ServiceStartType, ServiceState,
    ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

use super::cli::ServiceCommand;
use super::eventlog::{self, EventLog, EventLogLayer, Kind};
use super::rotate::RotatingFile;
use super::{acl, paths};
use crate::config::{AgentConfig, CertificatesConfig};

/// Rotate `agent.log` at 10 MiB, keep 10 old files: at most ~110 MiB of logs.
const LOG_MAX_BYTES: u64 = 10 << 20;
const LOG_KEEP: usize = 10;

pub fn main(cmd: ServiceCommand) -> anyhow::Result<()> {
    match cmd {
        ServiceCommand::Install {
            config,
            name,
            account,
            manual,
            no_acl,
            log_dir,
        } => install(&config, &name, account, manual, no_acl, &log_dir),
        ServiceCommand::Uninstall { name } => uninstall(&name),
        ServiceCommand::Start { name } => start(&name),
        ServiceCommand::Stop { name } => stop(&name),
        ServiceCommand::Status { name } => status(&name),
        ServiceCommand::Run {
            config,
            name,
            log_dir,
        } => dispatch(config, name, log_dir.unwrap_or_else(paths::logs_dir)),
    }
}

fn manager(access: ServiceManagerAccess) -> anyhow::Result<ServiceManager> {
    ServiceManager::local_computer(None::<&str>, access).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the service control manager ({}); run from an elevated (Administrator) \
             prompt",
            winerr(e)
        )
    })
}

/// windows-service's errors hide the OS error in `source()`; show it.
fn winerr(e: windows_service::Error) -> String {
    match e {
        windows_service::Error::Winapi(io) => io.to_string(),
        e => e.to_string(),
    }
}

fn open(name: &str, access: ServiceAccess) -> anyhow::Result<windows_service::service::Service> {
    manager(ServiceManagerAccess::CONNECT)?
        .open_service(name, access)
        .map_err(|e| anyhow::anyhow!("service {name}: {} (is it installed?)", winerr(e)))
}

fn install(
    config: &Path,
    name: &str,
    account: Option<String>,
    manual: bool,
    no_acl: bool,
    log_dir: &Path,
) -> anyhow::Result<()> {
    if name.is_empty() || name.contains(['/', '\\', ' ', '"']) {
        anyhow::bail!("--name {name:?}: a service name has no spaces, slashes or quotes");
    }
    let config =
        std::path::absolute(config).with_context(|| format!("--config {}", config.display()))?;
    // Refuse to install a service that could not start.
    let cfg = AgentConfig::load(&config)?;
    let exe = std::env::current_exe().context("finding outrigger.exe")?;
    let account = account.unwrap_or_else(|| format!(r"NT SERVICE\{name}"));
    let logs =
        std::path::absolute(log_dir).with_context(|| format!("--log-dir {}", log_dir.display()))?;
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;

    let info = ServiceInfo {
        name: name.into(),
        display_name: if name == super::cli::DEFAULT_SERVICE_NAME {
            "Outrigger mesh agent".into()
        } else {
            format!("Outrigger mesh agent ({name})").into()
        },
        service_type: ServiceType::OWN_PROCESS,
        start_type: if manual {
            ServiceStartType::OnDemand
        } else {
            ServiceStartType::AutoStart
        },
        error_control: ServiceErrorControl::Normal,
        executable_path: exe.clone(),
        launch_arguments: service_arguments(&config, name, &logs),
        // The TCP/IP stack must be up before listeners can bind.
        dependencies: vec![ServiceDependency::Service("Tcpip".into())],
        account_name: Some(account.clone().into()),
        // Virtual accounts and gMSAs have no password.
        account_password: None,
    };
    let mgr = manager(ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE)?;
    let svc = mgr
        .create_service(
            &info,
            ServiceAccess::CHANGE_CONFIG | ServiceAccess::QUERY_CONFIG,
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "creating service {name}: {} (to replace an installed one: `outrigger service \
                 uninstall --name {name}` first; to upgrade the binary see docs/windows.md)",
                winerr(e)
            )
        })?;
    println!("installed service {name}");
    println!(
        "  command: \"{}\" {}",
        exe.display(),
        display_args(&info.launch_arguments)
    );
    println!("  account: {account}");

    // Optional polish: a failure here leaves a working service, so warn and go on.
    let warn = |what: &str, r: windows_service::Result<()>| {
        if let Err(e) = r {
            eprintln!("warning: {what}: {}", winerr(e));
        }
    };
    warn(
        "setting the description",
        svc.set_description(
            "Terminates Istio mesh mTLS in front of a local application, enforces Istio \
             policy and forwards to it on loopback.",
        ),
    );
    // A per-service SID is what makes `NT SERVICE\<name>` usable in ACLs.
    warn(
        "enabling the service SID",
        svc.set_config_service_sid_info(ServiceSidType::Unrestricted),
    );
    // Restart after 5s, then 10s, then every 60s; forget failures after a quiet day.
    let restart = |s| ServiceAction {
        action_type: ServiceActionType::Restart,
        delay: Duration::from_secs(s),
    };
    warn(
        "setting the recovery actions",
        svc.update_failure_actions(ServiceFailureActions {
            reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(86400)),
            reboot_msg: None,
            command: None,
            actions: Some(vec![restart(5), restart(10), restart(60)]),
        }),
    );
    // Also restart when the agent exits with an error (not only when it crashes).
    warn(
        "enabling recovery on error exits",
        svc.set_failure_actions_on_non_crash_failures(true),
    );
    println!("  recovery: restart after 5s, 10s, then every 60s");

    match register_event_source(name) {
        Ok(()) => println!("  event log: source {name} in the Application log"),
        Err(e) => eprintln!("warning: registering the Event Log source: {e:#}"),
    }

    let (key, ca_dir, state_dir) = match &cfg.certificates {
        CertificatesConfig::Files { key, .. } => (Some(key.as_path()), None, None),
        CertificatesConfig::Builtin { ca_dir, .. } => (None, Some(ca_dir.as_path()), None),
        // The state directory holds the persisted key, which the service itself rewrites.
        CertificatesConfig::IstioCa(i) => (None, None, Some(i.state_dir.as_path())),
    };
    if let Some(dir) = state_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the state directory {}", dir.display()))?;
    }
    let plan = acl::install_plan(&account, &config, key, ca_dir, state_dir, &logs);
    if no_acl {
        println!("  ACLs: left unchanged (--no-acl); the commands it would run:");
        for c in &plan {
            println!("    {}", c.display());
        }
    } else {
        println!("  ACLs (icacls):");
        acl::apply(&plan).context(
            "restricting the key files (the service is installed; fix the cause and re-run the \
             icacls commands, or uninstall)",
        )?;
    }
    println!("  logs: {}", logs.display());
    println!();
    println!("Next:");
    println!("  outrigger service start --name {name}");
    println!(
        "  outrigger doctor --config \"{}\" --name {name}",
        config.display()
    );
    Ok(())
}

/// What SCM runs: `outrigger.exe service run --config <abs path> --name <name> --log-dir
/// <abs dir>`. The log directory is resolved at install time: a service's environment may
/// differ from the installing administrator's (Wine, for one, gives services another
/// %ProgramData%).
fn service_arguments(config: &Path, name: &str, logs: &Path) -> Vec<OsString> {
    vec![
        "service".into(),
        "run".into(),
        "--config".into(),
        config.as_os_str().to_owned(),
        "--name".into(),
        name.into(),
        "--log-dir".into(),
        logs.as_os_str().to_owned(),
    ]
}

fn display_args(args: &[OsString]) -> String {
    args.iter()
        .map(|a| {
            let a = a.to_string_lossy();
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn reg(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("reg.exe")
        .args(args)
        .output()
        .context("running reg.exe")?;
    if !out.status.success() {
        anyhow::bail!(
            "reg.exe {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn register_event_source(name: &str) -> anyhow::Result<()> {
    let key = eventlog::source_key(name);
    reg(&[
        "add",
        &key,
        "/v",
        "EventMessageFile",
        "/t",
        "REG_EXPAND_SZ",
        "/d",
        eventlog::MESSAGE_FILE,
        "/f",
    ])?;
    // Error | Warning | Information.
    reg(&[
        "add",
        &key,
        "/v",
        "TypesSupported",
        "/t",
        "REG_DWORD",
        "/d",
        "7",
        "/f",
    ])
}

fn uninstall(name: &str) -> anyhow::Result<()> {
    let svc = open(
        name,
        ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
    )?;
    if svc
        .query_status()
        .map_err(|e| anyhow::anyhow!(winerr(e)))?
        .current_state
        != ServiceState::Stopped
    {
        println!("stopping {name} (in-flight requests may finish first)");
        let _ = svc.stop();
        wait_for(&svc, ServiceState::Stopped, Duration::from_secs(300))?;
    }
    svc.delete()
        .map_err(|e| anyhow::anyhow!("deleting service {name}: {}", winerr(e)))?;
    drop(svc);
    if let Err(e) = reg(&["delete", &eventlog::source_key(name), "/f"]) {
        eprintln!("warning: removing the Event Log source: {e:#}");
    }
    println!(
        "removed service {name}. Configuration, certificates and logs ({}) were left in place.",
        paths::logs_dir().display()
    );
    Ok(())
}

fn start(name: &str) -> anyhow::Result<()> {
    let svc = open(name, ServiceAccess::START | ServiceAccess::QUERY_STATUS)?;
    match svc.start::<&OsStr>(&[]) {
        Ok(()) => {}
        // ERROR_SERVICE_ALREADY_RUNNING: the goal is reached.
        Err(windows_service::Error::Winapi(e)) if e.raw_os_error() == Some(1056) => {}
        Err(e) => anyhow::bail!("starting {name}: {}", winerr(e)),
    }
    let st = wait_for(&svc, ServiceState::Running, Duration::from_secs(120))?;
    println!(
        "{name} is running (pid {})",
        st.process_id.map_or("?".into(), |p| p.to_string())
    );
    Ok(())
}

fn stop(name: &str) -> anyhow::Result<()> {
    let svc = open(name, ServiceAccess::STOP | ServiceAccess::QUERY_STATUS)?;
    let st = svc.query_status().map_err(|e| anyhow::anyhow!(winerr(e)))?;
    if st.current_state == ServiceState::Stopped {
        println!("{name} is not running");
        return Ok(());
    }
    svc.stop()
        .map_err(|e| anyhow::anyhow!("stopping {name}: {}", winerr(e)))?;
    println!("stopping {name}: draining in-flight requests");
    wait_for(&svc, ServiceState::Stopped, Duration::from_secs(300))?;
    println!("{name} stopped");
    Ok(())
}

fn status(name: &str) -> anyhow::Result<()> {
    let svc = open(
        name,
        ServiceAccess::QUERY_STATUS | ServiceAccess::QUERY_CONFIG,
    )?;
    let st = svc.query_status().map_err(|e| anyhow::anyhow!(winerr(e)))?;
    println!("service: {name}");
    println!("state:   {:?}", st.current_state);
    if let Some(pid) = st.process_id.filter(|p| *p != 0) {
        println!("pid:     {pid}");
    }
    if st.current_state == ServiceState::Stopped && st.exit_code != ServiceExitCode::NO_ERROR {
        println!(
            "last exit: {:?} (see the Event Log and {})",
            st.exit_code,
            paths::logs_dir().display()
        );
    }
    if let Ok(c) = svc.query_config() {
        println!("start:   {:?}", c.start_type);
        if let Some(a) = c.account_name {
            println!("account: {}", a.to_string_lossy());
        }
        println!("command: {}", c.executable_path.display());
    }
    Ok(())
}

/// The state and account of an installed service, for `outrigger doctor`.
pub fn facts(name: &str) -> anyhow::Result<super::doctor::ServiceFacts> {
    let svc = open(
        name,
        ServiceAccess::QUERY_STATUS | ServiceAccess::QUERY_CONFIG,
    )?;
    let st = svc.query_status().map_err(|e| anyhow::anyhow!(winerr(e)))?;
    let config = svc.query_config().map_err(|e| anyhow::anyhow!(winerr(e)))?;
    Ok(super::doctor::ServiceFacts {
        state: format!("{:?}", st.current_state),
        account: config
            .account_name
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_default(),
    })
}

/// Polls until the service reaches `want`, fails if it lands in another steady state.
fn wait_for(
    svc: &windows_service::service::Service,
    want: ServiceState,
    limit: Duration,
) -> anyhow::Result<ServiceStatus> {
    let deadline = Instant::now() + limit;
    loop {
        let st = svc.query_status().map_err(|e| anyhow::anyhow!(winerr(e)))?;
        if st.current_state == want {
            return Ok(st);
        }
        if st.current_state == ServiceState::Stopped && want == ServiceState::Running {
            anyhow::bail!(
                "the service stopped ({:?}); see the Application event log and {}",
                st.exit_code,
                paths::logs_dir().join("agent.log").display()
            );
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "still {:?} after {}s (wanted {want:?})",
                st.current_state,
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

// ---------------------------------------------------------------------------------------------
// Running as the service

struct Params {
    config: PathBuf,
    name: String,
    log_dir: PathBuf,
}

/// SCM calls `service_main` on a thread of its own; this is how it finds its arguments.
static PARAMS: OnceLock<Params> = OnceLock::new();

define_windows_service!(ffi_service_main, service_main);

fn dispatch(config: PathBuf, name: String, log_dir: PathBuf) -> anyhow::Result<()> {
    let name2 = name.clone();
    let _ = PARAMS.set(Params {
        config,
        name,
        log_dir,
    });
    service_dispatcher::start(&name2, ffi_service_main).map_err(|e| match e {
        // ERROR_FAILED_SERVICE_CONTROLLER_CONNECT: started from a console, not by SCM.
        windows_service::Error::Winapi(io) if io.raw_os_error() == Some(1063) => anyhow::anyhow!(
            "`outrigger service run` is started by the service control manager; use \
             `outrigger service start --name {name2}`, or `outrigger run --config FILE` in a \
             console"
        ),
        e => anyhow::anyhow!("starting the service dispatcher: {}", winerr(e)),
    })
}

fn service_main(_args: Vec<OsString>) {
    let Some(p) = PARAMS.get() else { return };
    let log = EventLog::open(&p.name).ok().map(Arc::new);
    if let Err(e) = run_service(p, log.clone()) {
        let text = format!("Outrigger service {} failed: {e:#}", p.name);
        tracing::error!("{text}");
        if let Some(l) = &log {
            l.report(Kind::Error, &text);
        }
    }
}

fn run_service(p: &Params, log: Option<Arc<EventLog>>) -> anyhow::Result<()> {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let handler = move |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
            let _ = stop_tx.send(true);
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let handle = service_control_handler::register(&p.name, handler)
        .map_err(|e| anyhow::anyhow!("registering the control handler: {}", winerr(e)))?;
    let report = move |state, accept, exit, wait: Duration| {
        let _ = handle.set_service_status(ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: accept,
            exit_code: exit,
            checkpoint: 0,
            wait_hint: wait,
            process_id: None,
        });
    };
    report(
        ServiceState::StartPending,
        ServiceControlAccept::empty(),
        ServiceExitCode::NO_ERROR,
        Duration::from_secs(60),
    );
    let result = serve(p, log.clone(), &mut stop_rx, &report);
    let exit = match &result {
        Ok(()) => ServiceExitCode::NO_ERROR,
        // A non-zero service-specific code makes SCM apply the recovery actions.
        Err(_) => ServiceExitCode::ServiceSpecific(1),
    };
    if result.is_ok()
        && let Some(l) = &log
    {
        l.report(Kind::Info, &format!("Outrigger service {} stopped", p.name));
    }
    report(
        ServiceState::Stopped,
        ServiceControlAccept::empty(),
        exit,
        Duration::ZERO,
    );
    result
}

fn serve(
    p: &Params,
    log: Option<Arc<EventLog>>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    report: &(impl Fn(ServiceState, ServiceControlAccept, ServiceExitCode, Duration) + Sync),
) -> anyhow::Result<()> {
    let mut cfg = AgentConfig::load(&p.config)?;
    // A service has no console: the access log would vanish on stdout.
    // Lines meant for stdout go to `access.log` in the log directory instead (rotated as
    // configured, or with the default size and count).
    if cfg.access_log.stdout {
        cfg.access_log.stdout = false;
        if cfg.access_log.file.is_none() {
            let format = cfg.access_log.format;
            cfg.access_log = outrigger_proxy::AccessLogConfig {
                format,
                ..outrigger_proxy::AccessLogConfig::file(p.log_dir.join("access.log"))
            };
        }
    }
    init_logging(&cfg, &p.log_dir, log.clone())?;
    // A service has no stderr: record panics where an administrator looks.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(
            "panic: {info}\n{}",
            std::backtrace::Backtrace::force_capture()
        );
    }));
    tracing::info!(service = %p.name, config = %p.config.display(), "starting as a Windows service");
    let rt = crate::runtime(cfg.worker_threads)?;
    rt.block_on(async {
        let agent = crate::agent::Agent::start(&cfg).await?;
        let listening: Vec<String> = agent
            .inbound_addrs()
            .into_iter()
            .map(|(n, a)| format!("{n}={a}"))
            .collect();
        tracing::info!(listeners = %listening.join(" "), "listening");
        if let Some(l) = &log {
            l.report(
                Kind::Info,
                &format!(
                    "Outrigger service {} started as {}: {}",
                    p.name,
                    cfg.identity,
                    listening.join(", ")
                ),
            );
        }
        report(
            ServiceState::Running,
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN,
            ServiceExitCode::NO_ERROR,
            Duration::ZERO,
        );
        let drain = cfg.drain_timeout;
        agent
            .run(async move {
                let _ = stop.wait_for(|s| *s).await;
                tracing::info!("stop requested by the service control manager: draining");
                // SCM waits this long before it considers the stop hung.
                report(
                    ServiceState::StopPending,
                    ServiceControlAccept::empty(),
                    ServiceExitCode::NO_ERROR,
                    drain + Duration::from_secs(10),
                );
            })
            .await;
        Ok::<_, anyhow::Error>(())
    })
}

/// The service's logging: the size-rotated `agent.log` at the configured level, plus warnings
/// and errors to the Event Log.
fn init_logging(cfg: &AgentConfig, dir: &Path, log: Option<Arc<EventLog>>) -> anyhow::Result<()> {
    let file = RotatingFile::open(&dir.join("agent.log"), LOG_MAX_BYTES, LOG_KEEP)
        .with_context(|| format!("opening {}", dir.join("agent.log").display()))?;
    let filter = tracing_subscriber::EnvFilter::new(&cfg.log_level);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(file);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(log.map(|log| EventLogLayer { log }));
    let result = match cfg.log_format {
        crate::config::LogFormat::Json => {
            tracing::subscriber::set_global_default(registry.with(fmt.json()))
        }
        crate::config::LogFormat::Text => {
            tracing::subscriber::set_global_default(registry.with(fmt))
        }
    };
    result.context("installing the logger")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scm_runs_the_service_entry_point_with_an_absolute_config() {
        let args = service_arguments(
            Path::new(r"C:\ProgramData\Outrigger\agent.yaml"),
            "Edge",
            Path::new(r"D:\Outrigger logs"),
        );
        assert_eq!(
            display_args(&args),
            r#"service run --config C:\ProgramData\Outrigger\agent.yaml --name Edge --log-dir "D:\Outrigger logs""#
        );
    }

    /// Outside SCM, StartServiceCtrlDispatcher fails (on Windows at once with error 1063; Wine
    /// 8 first waits about 10 s for its services.exe): the entry point must say how to run
    /// instead, not hang or pretend to be a service.
    #[test]
    fn the_service_entry_point_refuses_a_console_start() {
        let err = dispatch(
            PathBuf::from("agent.yaml"),
            "OutriggerUnitTest".into(),
            std::env::temp_dir(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("started by the service control manager")
                || err.contains("service dispatcher"),
            "{err}"
        );
    }
}
