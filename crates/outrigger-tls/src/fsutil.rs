//! Small file helpers: reads whose errors name the file, and atomic writes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::TlsError;

pub(crate) fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn create_dir_all(dir: &Path) -> Result<(), TlsError> {
    fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Whether a file is secret: private keys are created `0600` on Unix (owner read/write only).
/// On Windows the file inherits the directory's ACL; protect the directory.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Public,
    Secret,
}

fn open_options(mode: Mode) -> fs::OpenOptions {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if mode == Mode::Secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = mode;
    opts
}

/// Creates `path`, failing if it exists (used for the CA so that a race cannot overwrite it).
pub(crate) fn write_new(path: &Path, contents: &[u8], mode: Mode) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = open_options(mode).open(path).map_err(err)?;
    f.write_all(contents).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Replaces `path` atomically: writes a temporary file in the same directory, then renames it
/// over the target. A reader (such as [`crate::CertStore`]'s file poller) sees either the old or
/// the new content of each file, never a truncated one.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: Mode) -> Result<(), TlsError> {
    let tmp = temp_path(path);
    let _ = fs::remove_file(&tmp);
    let result = write_new(&tmp, contents, mode).and_then(|()| {
        fs::rename(&tmp, path).map_err(|source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        })
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_new_refuses_existing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.pem");
        write_atomic(&p, b"one", Mode::Public).unwrap();
        write_atomic(&p, b"two", Mode::Secret).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert!(write_new(&p, b"three", Mode::Public).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"two");
        // No temporary file left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn read_error_names_the_file() {
        let err = read("private key file", Path::new("/nonexistent/key.pem")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/key.pem"), "{msg}");
        assert!(msg.contains("private key file"), "{msg}");
    }
}
