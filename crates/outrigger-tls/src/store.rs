//! Live credentials, swapped atomically on rotation.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use outrigger_identity::{Identity, TrustDomains};
use rustls::{ClientConfig, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::ca::{BuiltinCa, IssuedCert};
use crate::certs::fmt_time;
use crate::{TlsError, WorkloadCerts, client_config, fsutil, server_config};

/// Where the workload credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// Istio-style files written by something else (istio-agent, cert-manager, a Kubernetes
    /// secret mount, a Windows deployment tool). Polled for changes.
    Files {
        chain: PathBuf,
        key: PathBuf,
        roots: PathBuf,
    },
    /// Issued locally by the [`BuiltinCa`] stored in `ca_dir`, re-issued at half lifetime.
    Builtin {
        ca_dir: PathBuf,
        identity: Identity,
        ttl: Duration,
    },
}

/// The credentials in use, and where they came from.
struct Current {
    certs: Arc<WorkloadCerts>,
    server: Arc<ServerConfig>,
    /// SHA-256 over the three files' contents (Files source).
    fingerprint: Option<[u8; 32]>,
    /// When we obtained these credentials: rotation is due at half the time from here to
    /// `notAfter`, as istio-agent does (`SECRET_GRACE_PERIOD_RATIO` = 0.5 of the lifetime
    /// measured from when the secret was created, not from the back-dated `NotBefore`).
    obtained_at: SystemTime,
}

struct Inner {
    source: CertSource,
    trust: TrustDomains,
    alpn: Vec<Vec<u8>>,
    current: ArcSwap<Current>,
    generation: watch::Sender<u64>,
}

/// Live credentials: the current [`WorkloadCerts`] and the inbound [`ServerConfig`] built from
/// them, replaced together on rotation. Cheap to clone.
///
/// Existing connections are untouched by a rotation: each keeps the session it negotiated;
/// handshakes started after the swap use the new configuration.
#[derive(Clone)]
pub struct CertStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("source", &self.inner.source)
            .field("certs", &self.inner.current.load().certs)
            .field("generation", &*self.inner.generation.borrow())
            .finish()
    }
}

/// The three files' contents, read once per poll.
struct FileSet {
    chain: Vec<u8>,
    key: Vec<u8>,
    roots: Vec<u8>,
}

impl FileSet {
    fn read(chain: &Path, key: &Path, roots: &Path) -> Result<Self, TlsError> {
        Ok(FileSet {
            chain: fsutil::read("certificate chain file", chain)?,
            key: fsutil::read("private key file", key)?,
            roots: fsutil::read("root certificates file", roots)?,
        })
    }

    fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [&self.chain, &self.key, &self.roots] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().into()
    }
}

impl CertStore {
    /// Loads the credentials now (an error means: refuse to start) and builds the server
    /// config with `alpn` (usually [`crate::ISTIO_ALPNS`]).
    pub fn new(
        source: CertSource,
        trust: TrustDomains,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Self, TlsError> {
        let raw = Raw::read(&source)?;
        let fingerprint = raw.fingerprint();
        let certs = raw.validate()?;
        drop(raw);
        let alpn_refs: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
        let server = server_config(&certs, &trust, &alpn_refs)?;
        let current = Current {
            certs: Arc::new(certs),
            server,
            fingerprint,
            obtained_at: SystemTime::now(),
        };
        let (generation, _) = watch::channel(0);
        Ok(CertStore {
            inner: Arc::new(Inner {
                source,
                trust,
                alpn,
                current: ArcSwap::from_pointee(current),
                generation,
            }),
        })
    }

    /// The current inbound config. Lock-free (an `arc-swap` load and an `Arc` clone): call it
    /// once per accepted connection.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.inner.current.load().server.clone()
    }

    /// The current credentials.
    pub fn certs(&self) -> Arc<WorkloadCerts> {
        self.inner.current.load().certs.clone()
    }

    /// The trust domains peers are checked against.
    pub fn trust(&self) -> &TrustDomains {
        &self.inner.trust
    }

    /// An outbound config from the current credentials (see [`crate::client_config`]). Build it
    /// once per destination and rebuild when [`subscribe`](Self::subscribe) reports a change.
    pub fn client_config(
        &self,
        expected: &[Identity],
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        client_config(&self.certs(), &self.inner.trust, expected, alpn)
    }

    /// The generation of the current credentials: 0 at start, +1 per rotation.
    pub fn generation(&self) -> u64 {
        *self.inner.generation.borrow()
    }

    /// Notified with the new generation after each rotation (the new config is already in
    /// place when the notification arrives).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    /// Checks the source once, now: Files → reload if any file's content changed; Builtin →
    /// re-issue. Returns whether new credentials were published. On error the current
    /// credentials stay in place.
    pub fn reload(&self) -> Result<bool, TlsError> {
        self.inner.check(true)
    }

    /// Starts the background refresh task (needs a tokio runtime):
    ///
    /// * Files: every `interval`, reads the three files and compares a SHA-256 of their
    ///   contents with the one in use. Content, not mtime, decides: mtimes can be coarse
    ///   (FAT: 2 s, some SMB shares) or preserved by copy tools, and Kubernetes secret mounts
    ///   swap a symlink. The files are a few KB, so reading them each tick is cheap, and it
    ///   works the same on Windows (no inotify). A half-written or inconsistent set (key from
    ///   one issuance, chain from another, unparsable, expired ...) keeps the old credentials
    ///   and logs a warning with the reason, once per distinct content; it is retried next tick.
    /// * Builtin: re-issues at half the remaining lifetime of the current certificate (checked
    ///   at least every `interval`); a failure is logged and retried after `interval`.
    ///
    /// The task ends by itself when every clone of this store has been dropped, or when the
    /// returned handle is aborted (dropping a tokio `JoinHandle` alone does not stop it).
    pub fn spawn_refresh(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let interval = interval.max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut last_error: Option<String> = None;
            let mut warned_expired = false;
            loop {
                let delay = match weak.upgrade() {
                    Some(inner) => inner.next_delay(interval, last_error.is_some()),
                    None => return,
                };
                tokio::time::sleep(delay).await;
                let Some(inner) = weak.upgrade() else { return };
                match inner.check(false) {
                    Ok(changed) => {
                        if changed {
                            warned_expired = false;
                        }
                        last_error = None;
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if last_error.as_deref() != Some(msg.as_str()) {
                            tracing::warn!(
                                error = %msg,
                                "credential refresh failed; keeping the current certificate and retrying"
                            );
                        } else {
                            tracing::debug!(error = %msg, "credential refresh still failing");
                        }
                        last_error = Some(msg);
                    }
                }
                let certs = inner.current.load().certs.clone();
                if !warned_expired && SystemTime::now() > certs.not_after() {
                    tracing::warn!(
                        identity = %certs.identity(),
                        not_after = %fmt_time(certs.not_after()),
                        "the workload certificate has expired and no valid replacement is available; peers will reject it"
                    );
                    warned_expired = true;
                }
            }
        })
    }
}

impl Inner {
    fn next_delay(&self, interval: Duration, retrying: bool) -> Duration {
        match &self.source {
            CertSource::Files { .. } => interval,
            CertSource::Builtin { .. } if retrying => interval,
            CertSource::Builtin { .. } => {
                let due = self.builtin_due_at();
                due.duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .min(interval)
            }
        }
    }

    /// Half-way between when the current certificate was obtained and when it expires.
    fn builtin_due_at(&self) -> SystemTime {
        let cur = self.current.load();
        let life = cur
            .certs
            .not_after()
            .duration_since(cur.obtained_at)
            .unwrap_or_default();
        cur.obtained_at + life / 2
    }

    /// Checks the source; publishes and returns `true` if there are new credentials.
    /// `force`: re-issue a Builtin certificate even if not due yet.
    fn check(&self, force: bool) -> Result<bool, TlsError> {
        if let CertSource::Builtin { .. } = self.source
            && !force
            && SystemTime::now() < self.builtin_due_at()
        {
            return Ok(false);
        }
        let raw = Raw::read(&self.source)?;
        let fingerprint = raw.fingerprint();
        if fingerprint.is_some() && fingerprint == self.current.load().fingerprint {
            return Ok(false);
        }
        let certs = raw.validate()?;
        let alpn_refs: Vec<&[u8]> = self.alpn.iter().map(Vec::as_slice).collect();
        let server = server_config(&certs, &self.trust, &alpn_refs)?;
        let identity = certs.identity().to_string();
        let not_after = certs.not_after();
        self.current.store(Arc::new(Current {
            certs: Arc::new(certs),
            server,
            fingerprint,
            obtained_at: SystemTime::now(),
        }));
        self.generation.send_modify(|g| *g += 1);
        tracing::info!(
            identity = %identity,
            not_after = %fmt_time(not_after),
            generation = *self.generation.borrow(),
            "workload certificate rotated"
        );
        Ok(true)
    }
}

/// What a source yielded, before validation.
enum Raw<'a> {
    Files {
        paths: (&'a Path, &'a Path, &'a Path),
        files: FileSet,
    },
    Issued(IssuedCert),
}

impl<'a> Raw<'a> {
    fn read(source: &'a CertSource) -> Result<Self, TlsError> {
        match source {
            CertSource::Files { chain, key, roots } => Ok(Raw::Files {
                paths: (chain, key, roots),
                files: FileSet::read(chain, key, roots)?,
            }),
            CertSource::Builtin {
                ca_dir,
                identity,
                ttl,
            } => Ok(Raw::Issued(BuiltinCa::load(ca_dir)?.issue(identity, *ttl)?)),
        }
    }

    /// Identifies file contents, to skip parsing when nothing changed.
    fn fingerprint(&self) -> Option<[u8; 32]> {
        match self {
            Raw::Files { files, .. } => Some(files.fingerprint()),
            Raw::Issued(_) => None,
        }
    }

    fn validate(&self) -> Result<WorkloadCerts, TlsError> {
        match self {
            Raw::Files { paths, files } => WorkloadCerts::from_bytes_named(
                (paths.0, &files.chain),
                (paths.1, &files.key),
                (paths.2, &files.roots),
            ),
            Raw::Issued(issued) => WorkloadCerts::from_pem_checked(
                &issued.cert_chain_pem,
                &issued.key_pem,
                &issued.root_cert_pem,
            ),
        }
    }
}
