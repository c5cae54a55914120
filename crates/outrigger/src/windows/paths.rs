//! Where Outrigger keeps its files on Windows: `C:\ProgramData\Outrigger\` (or wherever
//! `%ProgramData%` points), the per-machine data folder services use.

use std::path::PathBuf;

/// `%ProgramData%\Outrigger`, `C:\ProgramData\Outrigger` if the variable is unset.
pub fn base_dir() -> PathBuf {
    let program_data = std::env::var_os("ProgramData")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"));
    program_data.join("Outrigger")
}

/// The default agent configuration file: `...\Outrigger\agent.yaml`.
pub fn default_config() -> PathBuf {
    base_dir().join("agent.yaml")
}

/// The service's log directory: `...\Outrigger\logs`.
pub fn logs_dir() -> PathBuf {
    base_dir().join("logs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_live_under_program_data() {
        let base = base_dir();
        assert!(base.ends_with("Outrigger"), "{}", base.display());
        assert_eq!(default_config(), base.join("agent.yaml"));
        assert_eq!(logs_dir(), base.join("logs"));
        #[cfg(windows)]
        {
            // Wine and Windows both set %ProgramData% (C:\ProgramData).
            let pd = std::env::var("ProgramData").expect("%ProgramData% is set on Windows");
            assert_eq!(base, PathBuf::from(pd).join("Outrigger"));
        }
    }
}
