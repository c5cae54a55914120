//! A size-rotated log file for the Windows service (which has no stderr anyone reads).
//!
//! `agent.log` grows to `max_bytes`, then becomes `agent.log.1` (the previous `.1` becomes `.2`,
//! and so on; the oldest beyond `keep` is deleted). Size rather than time bounds the disk a
//! busy or looping service can fill, which matters on a server nobody watches. Each
//! [`std::io::Write::write`] is one whole record (tracing's fmt layer writes an event at once),
//! so a record is never split across two files.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct RotatingFile {
    inner: Mutex<Inner>,
}

struct Inner {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    /// None only for the moment of a rotation (Windows cannot rename an open file).
    file: Option<File>,
    written: u64,
}

impl RotatingFile {
    /// Opens (appending) or creates `path`, creating its directory.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> io::Result<RotatingFile> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(RotatingFile {
            inner: Mutex::new(Inner {
                path: path.to_path_buf(),
                max_bytes,
                keep,
                file: Some(file),
                written,
            }),
        })
    }

    /// The numbered name of an old file: `agent.log.3`.
    pub fn old_path(path: &Path, n: usize) -> PathBuf {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }
}

impl Inner {
    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            if let Some(f) = &self.file {
                f.set_len(0)?;
            }
            self.written = 0;
            return Ok(());
        }
        let oldest = RotatingFile::old_path(&self.path, self.keep);
        match std::fs::remove_file(&oldest) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for n in (1..self.keep).rev() {
            let from = RotatingFile::old_path(&self.path, n);
            match std::fs::rename(&from, RotatingFile::old_path(&self.path, n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        // Close before renaming: Windows cannot rename a file that is open without
        // FILE_SHARE_DELETE. Whatever happens, reopen `path` (renamed or not) to go on logging.
        drop(self.file.take());
        let renamed = std::fs::rename(&self.path, RotatingFile::old_path(&self.path, 1));
        self.reopen()?;
        renamed
    }

    fn reopen(&mut self) -> io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.written = file.metadata()?.len();
        self.file = Some(file);
        Ok(())
    }
}

impl Write for &RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.written > 0 && inner.written + buf.len() as u64 > inner.max_bytes {
            // A failed rotation (say, someone holds agent.log.1 open) must not lose the record:
            // keep appending to the current file and try again at the next record.
            let _ = inner.rotate();
        }
        if inner.file.is_none() {
            // A rotation could not reopen the file (say, the disk was full): try again.
            inner.reopen()?;
        }
        if let Some(f) = &mut inner.file {
            f.write_all(buf)?;
        }
        inner.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner.lock().unwrap_or_else(|p| p.into_inner()).file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RotatingFile {
    type Writer = &'a RotatingFile;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    #[test]
    fn rotates_by_size_and_keeps_only_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs").join("agent.log");
        let f = RotatingFile::open(&path, 25, 2).unwrap();
        for i in 0..7 {
            // 10 bytes a record: two fit in 25 bytes, a third starts a new file.
            (&f).write_all(format!("record {i:02}\n").as_bytes())
                .unwrap();
        }
        assert_eq!(read(&path), "record 06\n");
        assert_eq!(
            read(&RotatingFile::old_path(&path, 1)),
            "record 04\nrecord 05\n"
        );
        assert_eq!(
            read(&RotatingFile::old_path(&path, 2)),
            "record 02\nrecord 03\n"
        );
        // records 00 and 01 were in the file that fell off the end.
        assert!(!RotatingFile::old_path(&path, 3).exists());
        assert!(!RotatingFile::old_path(&path, 0).exists());
    }

    #[test]
    fn appends_to_an_existing_log_and_counts_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        std::fs::write(&path, "from before\n").unwrap();
        let f = RotatingFile::open(&path, 20, 1).unwrap();
        (&f).write_all(b"new record\n").unwrap();
        assert_eq!(read(&path), "new record\n");
        assert_eq!(read(&RotatingFile::old_path(&path, 1)), "from before\n");
    }

    #[test]
    fn a_record_larger_than_the_limit_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let f = RotatingFile::open(&path, 4, 0).unwrap();
        (&f).write_all(b"a long record\n").unwrap();
        (&f).write_all(b"next\n").unwrap();
        // keep = 0 truncates instead of keeping old files.
        assert_eq!(read(&path), "next\n");
        assert!(!RotatingFile::old_path(&path, 1).exists());
    }

    #[test]
    fn works_as_a_tracing_writer() {
        use tracing_subscriber::layer::SubscriberExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let f = RotatingFile::open(&path, 1 << 20, 3).unwrap();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(f),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(listener = "web", "backend unreachable");
        });
        let text = read(&path);
        assert!(text.contains("WARN"), "{text}");
        assert!(
            text.contains("backend unreachable listener=\"web\""),
            "{text}"
        );
    }
}
