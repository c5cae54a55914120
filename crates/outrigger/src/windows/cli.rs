//! Command-line types of `outrigger service` and `outrigger doctor` (parsed on every platform,
//! so `--help` reads the same everywhere).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::paths;

/// The service name used when `--name` is not given.
pub const DEFAULT_SERVICE_NAME: &str = "Outrigger";

#[derive(Subcommand, Debug)]
pub enum ServiceCommand {
    /// Install Outrigger as a Windows service (run from an elevated prompt).
    #[command(after_help = "\
Example (elevated PowerShell):
  outrigger service install --config C:\\ProgramData\\Outrigger\\agent.yaml
  outrigger service start

The service runs `outrigger service run --config FILE --name NAME` from this executable's
path, starts automatically at boot, restarts on failure, and runs as the virtual account
`NT SERVICE\\<NAME>` unless --account says otherwise. Install also restricts the certificate
key (and its directory) to that account, SYSTEM and Administrators with icacls, registers the
Event Log source, and creates the log directory. See docs/windows.md.")]
    Install {
        /// The agent configuration file (checked before installing).
        #[arg(long, short = 'c', value_name = "FILE", default_value_os_t = paths::default_config())]
        config: PathBuf,
        /// The service name (several agents on one host need different names).
        #[arg(long, default_value = DEFAULT_SERVICE_NAME)]
        name: String,
        /// The account to run as (default `NT SERVICE\<NAME>`, a virtual account that needs no
        /// password). A group managed service account is written `DOMAIN\name$`.
        #[arg(long, value_name = "ACCOUNT")]
        account: Option<String>,
        /// Start only when asked (`outrigger service start`), not at boot.
        #[arg(long)]
        manual: bool,
        /// Do not change the ACLs of the key and log directories.
        #[arg(long)]
        no_acl: bool,
        /// Where the service writes agent.log (rotated at 10 MiB, 10 kept) and, when the
        /// configuration says `accessLog: stdout`, access.log.
        #[arg(long, value_name = "DIR", default_value_os_t = paths::logs_dir())]
        log_dir: PathBuf,
    },
    /// Stop (if running) and remove the service. Files and logs are left in place.
    #[command(after_help = "Example:\n  outrigger service uninstall")]
    Uninstall {
        #[arg(long, default_value = DEFAULT_SERVICE_NAME)]
        name: String,
    },
    /// Start the service and wait until it is running.
    #[command(after_help = "Example:\n  outrigger service start")]
    Start {
        #[arg(long, default_value = DEFAULT_SERVICE_NAME)]
        name: String,
    },
    /// Stop the service: it stops accepting, lets in-flight requests finish (timeouts.drain),
    /// then exits. Waits until it has stopped.
    #[command(after_help = "Example:\n  outrigger service stop")]
    Stop {
        #[arg(long, default_value = DEFAULT_SERVICE_NAME)]
        name: String,
    },
    /// Print the service's state, process id, account and command line.
    #[command(after_help = "Example:\n  outrigger service status")]
    Status {
        #[arg(long, default_value = DEFAULT_SERVICE_NAME)]
        name: String,
    },
    /// The service's entry point, started by the service control manager (not by hand).
    #[command(hide = true)]
    Run {
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        #[arg(long, default_value = DEFAULT_SERVICE_NAME)]
        name: String,
        /// Where the rotating log file goes (default C:\ProgramData\Outrigger\logs).
        #[arg(long, value_name = "DIR")]
        log_dir: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// The agent configuration file whose listeners and backends are checked.
    #[arg(long, short = 'c', value_name = "FILE", default_value_os_t = paths::default_config())]
    pub config: PathBuf,
    /// Also probe the application ports on this address (repeatable). By default every
    /// non-loopback address of this host that can be found is probed.
    #[arg(long = "address", value_name = "IP")]
    pub addresses: Vec<std::net::IpAddr>,
    /// The service name whose firewall rules and account are checked (Windows).
    #[arg(long, default_value = DEFAULT_SERVICE_NAME)]
    pub name: String,
}
