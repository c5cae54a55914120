//! Windows Server support: the Windows service (`outrigger service ...`), its logs (a rotating
//! file and the Windows Event Log), key-file ACLs, and `outrigger doctor`.
//!
//! Every platform difference of the binary lives here. The parts that can be built and tested
//! anywhere — command-line types, path defaults, log rotation, `icacls`/`netsh` command lines and
//! output parsers, the doctor's probes — are plain Rust compiled on every platform, so Linux CI
//! and the Windows test run under Wine both exercise them. Only the calls into the service
//! control manager and the Event Log are `cfg(windows)`. User documentation: docs/windows.md.

// Much of this module is only called from the Windows-only parts; on other platforms it is still
// compiled (and unit-tested) so that a Linux build catches mistakes early.
#![cfg_attr(not(windows), allow(dead_code))]

pub mod acl;
pub mod cli;
pub mod doctor;
pub mod paths;
pub mod rotate;

#[cfg(windows)]
mod eventlog;
#[cfg(windows)]
mod service;

pub use cli::{DoctorArgs, ServiceCommand};

/// `outrigger service ...`.
pub fn service(cmd: ServiceCommand) -> anyhow::Result<()> {
    #[cfg(windows)]
    {
        service::main(cmd)
    }
    #[cfg(not(windows))]
    {
        let _ = cmd;
        anyhow::bail!(
            "`outrigger service` manages a Windows service and works only on Windows; on Linux \
             run `outrigger run --config FILE` under systemd (see docs/windows.md for Windows)"
        )
    }
}

/// `outrigger doctor ...`.
pub fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    doctor::main(args)
}
