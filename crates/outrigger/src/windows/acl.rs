//! File ACLs for the service: the certificate key readable only by the service account (plus
//! SYSTEM and Administrators), the log directory writable by it.
//!
//! Done with `icacls.exe` (present on every Windows Server) rather than the Win32 security API:
//! the exact commands are printed, so an administrator can read, repeat or undo them, and no
//! `unsafe` security-descriptor code is needed. SYSTEM and Administrators are named by SID
//! (`*S-1-5-18`, `*S-1-5-32-544`) because their names are localized ("Administratoren").

use std::ffi::OsString;
use std::path::Path;

/// `NT AUTHORITY\SYSTEM`.
pub const SYSTEM_SID: &str = "*S-1-5-18";
/// `BUILTIN\Administrators`.
pub const ADMINISTRATORS_SID: &str = "*S-1-5-32-544";

/// One `icacls` invocation (arguments after `icacls.exe`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Icacls(pub Vec<OsString>);

impl Icacls {
    fn new(target: &Path, args: &[String]) -> Icacls {
        let mut v = vec![target.as_os_str().to_owned()];
        v.extend(args.iter().map(OsString::from));
        Icacls(v)
    }

    /// The command as an administrator would type it (quoted where needed).
    pub fn display(&self) -> String {
        let mut s = String::from("icacls");
        for a in &self.0 {
            let a = a.to_string_lossy();
            if a.contains(' ') || a.is_empty() {
                s += &format!(" \"{a}\"");
            } else {
                s += &format!(" {a}");
            }
        }
        s
    }
}

/// Replaces `path`'s ACL (no inherited entries) with: SYSTEM and Administrators full control,
/// `account` read (`R`, or `RX` on a directory). `inherit` makes the entries apply to files
/// created in a directory later, which is what keeps a renewed key written by another tool
/// (write then rename) as private as the first one.
pub fn restrict(path: &Path, account: &str, dir: bool) -> Icacls {
    let (inh, read) = if dir { ("(OI)(CI)", "RX") } else { ("", "R") };
    Icacls::new(
        path,
        &[
            "/inheritance:r".into(),
            "/grant:r".into(),
            format!("{SYSTEM_SID}:{inh}F"),
            format!("{ADMINISTRATORS_SID}:{inh}F"),
            format!("{account}:{inh}{read}"),
        ],
    )
}

/// Like [`restrict`] on a directory, but `account` may also write (`M`): the `istioCa` state
/// directory, where the service itself writes each renewed key and chain.
pub fn restrict_writable(dir: &Path, account: &str) -> Icacls {
    Icacls::new(
        dir,
        &[
            "/inheritance:r".into(),
            "/grant:r".into(),
            format!("{SYSTEM_SID}:(OI)(CI)F"),
            format!("{ADMINISTRATORS_SID}:(OI)(CI)F"),
            format!("{account}:(OI)(CI)M"),
        ],
    )
}

/// Lets `account` write logs in `dir` (and files in it), keeping what the directory inherits.
pub fn grant_modify(dir: &Path, account: &str) -> Icacls {
    Icacls::new(dir, &["/grant".into(), format!("{account}:(OI)(CI)M")])
}

/// The ACL changes `service install` makes for one configuration: the private key file (or the
/// built-in CA directory, which holds the CA key), the key's directory when it is a directory
/// of its own (not the one holding the configuration, which other tools may need to read), and
/// the log directory.
pub fn install_plan(
    account: &str,
    config_file: &Path,
    key: Option<&Path>,
    ca_dir: Option<&Path>,
    state_dir: Option<&Path>,
    logs: &Path,
) -> Vec<Icacls> {
    let mut plan = Vec::new();
    let config_dir = config_file.parent();
    if let Some(key) = key {
        if let Some(dir) = key.parent().filter(|d| Some(*d) != config_dir) {
            plan.push(restrict(dir, account, true));
        }
        plan.push(restrict(key, account, false));
    }
    if let Some(ca) = ca_dir {
        plan.push(restrict(ca, account, true));
    }
    if let Some(state) = state_dir {
        plan.push(restrict_writable(state, account));
    }
    plan.push(grant_modify(logs, account));
    plan
}

/// Runs the plan, stopping at the first failure (which names the command and its output).
#[cfg(windows)]
pub fn apply(plan: &[Icacls]) -> anyhow::Result<()> {
    for cmd in plan {
        let out = std::process::Command::new("icacls.exe")
            .args(&cmd.0)
            .output()
            .map_err(|e| anyhow::anyhow!("running `{}`: {e}", cmd.display()))?;
        if !out.status.success() {
            anyhow::bail!(
                "`{}` failed ({}): {}{}",
                cmd.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        println!("  {}", cmd.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const ACCOUNT: &str = r"NT SERVICE\Outrigger";

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn a_key_in_its_own_directory_restricts_directory_and_file() {
        let plan = install_plan(
            ACCOUNT,
            &p("C:/ProgramData/Outrigger/agent.yaml"),
            Some(&p("C:/ProgramData/Outrigger/certs/key.pem")),
            None,
            None,
            &p("C:/ProgramData/Outrigger/logs"),
        );
        let shown: Vec<String> = plan.iter().map(Icacls::display).collect();
        assert_eq!(
            shown,
            [
                r#"icacls C:/ProgramData/Outrigger/certs /inheritance:r /grant:r *S-1-5-18:(OI)(CI)F *S-1-5-32-544:(OI)(CI)F "NT SERVICE\Outrigger:(OI)(CI)RX""#,
                r#"icacls C:/ProgramData/Outrigger/certs/key.pem /inheritance:r /grant:r *S-1-5-18:F *S-1-5-32-544:F "NT SERVICE\Outrigger:R""#,
                r#"icacls C:/ProgramData/Outrigger/logs /grant "NT SERVICE\Outrigger:(OI)(CI)M""#,
            ]
        );
    }

    #[test]
    fn a_key_beside_the_configuration_restricts_only_the_key() {
        let plan = install_plan(
            ACCOUNT,
            &p("D:/outrigger/agent.yaml"),
            Some(&p("D:/outrigger/key.pem")),
            None,
            None,
            &p("D:/logs"),
        );
        assert_eq!(plan.len(), 2);
        assert_eq!(
            plan[0],
            restrict(&p("D:/outrigger/key.pem"), ACCOUNT, false)
        );
        assert_eq!(plan[1], grant_modify(&p("D:/logs"), ACCOUNT));
    }

    #[test]
    fn the_builtin_ca_directory_is_restricted_with_inheritance() {
        let plan = install_plan(
            "CONTOSO\\svc-outrigger$",
            &p("C:/o/agent.yaml"),
            None,
            Some(&p("C:/o/ca")),
            None,
            &p("C:/o/logs"),
        );
        assert_eq!(
            plan[0].display(),
            r"icacls C:/o/ca /inheritance:r /grant:r *S-1-5-18:(OI)(CI)F *S-1-5-32-544:(OI)(CI)F CONTOSO\svc-outrigger$:(OI)(CI)RX"
        );
    }

    #[test]
    fn the_istio_ca_state_directory_is_private_but_writable_by_the_service() {
        let plan = install_plan(
            ACCOUNT,
            &p("C:/o/agent.yaml"),
            None,
            None,
            Some(&p("C:/o/identity")),
            &p("C:/o/logs"),
        );
        assert_eq!(
            plan[0].display(),
            r#"icacls C:/o/identity /inheritance:r /grant:r *S-1-5-18:(OI)(CI)F *S-1-5-32-544:(OI)(CI)F "NT SERVICE\Outrigger:(OI)(CI)M""#
        );
    }
}
