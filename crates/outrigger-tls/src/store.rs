//! Live credentials, swapped atomically on rotation.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use outrigger_identity::{Identity, TrustDomains};
use rustls::{ClientConfig, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::ca::{BuiltinCa, IssuedCert};
use crate::certs::fmt_time;
use crate::crl::{Revocation, SharedRevocation};
use crate::error::InvalidKind;
use crate::settle::{SETTLE, SETTLE_POLL, Settle};
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
    /// `server` with `istio-peer-exchange` selected first ([`crate::with_peer_exchange`]), for
    /// listeners that may carry TCP. A clone of `server`: it shares its session cache and
    /// ticketer, so a session resumes on either.
    server_peer_exchange: Arc<ServerConfig>,
    /// SHA-256 over the three files' contents (Files source).
    fingerprint: Option<[u8; 32]>,
    /// When we obtained these credentials: rotation is due at half the time from here to
    /// `notAfter`, as istio-agent does (`SECRET_GRACE_PERIOD_RATIO` = 0.5 of the lifetime
    /// measured from when the secret was created, not from the back-dated `NotBefore`).
    obtained_at: SystemTime,
    /// Client configs built from these credentials, by (expected peer identities, ALPN). A
    /// config is built once per destination kind and credential set, not per dial: building one
    /// costs a root-store parse, and a config carries rustls' session cache, so reusing it is
    /// what lets the next handshake to the same peer resume. A rotation swaps `Current` and so
    /// starts an empty cache. Bounded by [`CLIENT_CONFIGS_MAX`].
    clients: Mutex<HashMap<ClientKey, Arc<ClientConfig>>>,
}

type ClientKey = (Vec<Identity>, Vec<Vec<u8>>);

/// The most client configs kept per credential set. The keys come from the configuration
/// (outbound services, HBONE peers' pinned identities), so a real agent has a handful; past the
/// bound the cache is emptied and refilled rather than grown.
const CLIENT_CONFIGS_MAX: usize = 256;

impl Current {
    fn new(
        certs: WorkloadCerts,
        server: Arc<ServerConfig>,
        fingerprint: Option<[u8; 32]>,
        obtained_at: SystemTime,
    ) -> Current {
        let mut mx = (*server).clone();
        mx.alpn_protocols = crate::with_peer_exchange(&server.alpn_protocols);
        Current {
            certs: Arc::new(certs),
            server_peer_exchange: Arc::new(mx),
            server,
            fingerprint,
            obtained_at,
            clients: Mutex::new(HashMap::new()),
        }
    }
}

struct Inner {
    source: CertSource,
    trust: TrustDomains,
    alpn: Vec<Vec<u8>>,
    /// The workload's identity: every credential set, at start-up and at each rotation, must
    /// be for it.
    expected: Identity,
    current: ArcSwap<Current>,
    generation: watch::Sender<u64>,
    /// A changed file set waiting to read the same for [`SETTLE`] (background refresh only).
    settle: Mutex<Settle<Observed>>,
    status: Mutex<Status>,
    observer: OnceLock<Observer>,
    /// `certificates.crl` (file, only the leaf), set once by [`CertStore::set_crl`].
    crl: OnceLock<(PathBuf, bool)>,
    /// A changed CRL file waiting to read the same for [`SETTLE`].
    crl_settle: Mutex<Settle<[u8; 32]>>,
    /// The last refused CRL content (or read error): refused once, not every poll.
    crl_refused: Mutex<Option<Observed>>,
}

type Observer = Box<dyn Fn(&RotationEvent<'_>) + Send + Sync>;

/// What one read of the source looked like: the content's SHA-256, or why it could not be
/// read. Equal observations mean nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Observed {
    Content([u8; 32]),
    Unreadable(String),
}

#[derive(Default)]
struct Status {
    pending_since: Option<SystemTime>,
    last_refusal: Option<Refusal>,
    refusals: u64,
    last_rotation: Option<SystemTime>,
    /// The last refused observation: refused once (logged, counted), not again every poll.
    refused: Option<Observed>,
}

/// A credential set refused at rotation.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub at: SystemTime,
    /// [`TlsError::refusal_reason`]: `identity_mismatch`, `key_mismatch`, `expired` ...
    pub reason: &'static str,
    pub error: String,
}

/// The rotation state, for `/config_dump` and `/healthz/ready`.
#[derive(Debug, Clone)]
pub struct CertStatus {
    /// 0 at start, +1 per applied rotation.
    pub generation: u64,
    /// The identity every set must carry.
    pub expected_identity: Identity,
    /// Since when a changed set has been waiting to read the same (a write may be under way).
    pub pending_since: Option<SystemTime>,
    /// The last refused set, until a rotation succeeds.
    pub last_refusal: Option<Refusal>,
    /// Refused sets since start (each distinct content counted once).
    pub refusals: u64,
    pub last_rotation: Option<SystemTime>,
}

/// Reported to the observer set with [`CertStore::set_observer`].
#[derive(Debug)]
pub enum RotationEvent<'a> {
    /// New credentials are in service.
    Rotated { identity: &'a Identity },
    /// A new set failed a check; the current credentials stay in service.
    Refused {
        reason: &'static str,
        error: &'a str,
    },
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
    /// config with `alpn` (usually [`crate::ISTIO_ALPNS`]). The identity of the certificate
    /// loaded now becomes the one every rotation must keep; use
    /// [`with_identity`](Self::with_identity) to require a given identity from the start.
    pub fn new(
        source: CertSource,
        trust: TrustDomains,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Self, TlsError> {
        Self::build(source, trust, alpn, None)
    }

    /// [`new`](Self::new), refusing credentials for any identity but `expected`, at start-up
    /// and at every rotation.
    pub fn with_identity(
        source: CertSource,
        trust: TrustDomains,
        alpn: Vec<Vec<u8>>,
        expected: Identity,
    ) -> Result<Self, TlsError> {
        Self::build(source, trust, alpn, Some(expected))
    }

    fn build(
        source: CertSource,
        trust: TrustDomains,
        alpn: Vec<Vec<u8>>,
        expected: Option<Identity>,
    ) -> Result<Self, TlsError> {
        let raw = Raw::read(&source)?;
        let fingerprint = raw.fingerprint();
        let expected = match (expected, &source) {
            (Some(e), _) => Some(e),
            (None, CertSource::Builtin { identity, .. }) => Some(identity.clone()),
            (None, CertSource::Files { .. }) => None,
        };
        let (certs, server) = validate(&raw, expected.as_ref(), &trust, &alpn, None)?;
        drop(raw);
        let expected = certs.identity().clone();
        let current = Current::new(certs, server, fingerprint, SystemTime::now());
        let (generation, _) = watch::channel(0);
        Ok(CertStore {
            inner: Arc::new(Inner {
                source,
                trust,
                alpn,
                expected,
                current: ArcSwap::from_pointee(current),
                generation,
                settle: Mutex::new(Settle::default()),
                status: Mutex::new(Status::default()),
                observer: OnceLock::new(),
                crl: OnceLock::new(),
                crl_settle: Mutex::new(Settle::default()),
                crl_refused: Mutex::new(None),
            }),
        })
    }

    /// Called on every applied rotation and every refused set (once per distinct content):
    /// the agent counts them in its metrics. Only the first observer set is kept.
    pub fn set_observer(&self, f: impl Fn(&RotationEvent<'_>) + Send + Sync + 'static) {
        let _ = self.inner.observer.set(Box::new(f));
    }

    /// The rotation state: pending change, last refusal, counts.
    pub fn status(&self) -> CertStatus {
        let st = self.inner.status();
        CertStatus {
            generation: self.generation(),
            expected_identity: self.inner.expected.clone(),
            pending_since: st.pending_since,
            last_refusal: st.last_refusal.clone(),
            refusals: st.refusals,
            last_rotation: st.last_rotation,
        }
    }

    /// The current inbound config. Lock-free (an `arc-swap` load and an `Arc` clone): call it
    /// once per accepted connection.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.inner.current.load().server.clone()
    }

    /// [`server_config`](Self::server_config) with `istio-peer-exchange` the first choice
    /// (see [`crate::with_peer_exchange`]): for a listener whose connections may be TCP, where
    /// a sidecar's offer of Istio's TCP metadata exchange is accepted. Lock-free, as
    /// `server_config`.
    pub fn server_config_peer_exchange(&self) -> Arc<ServerConfig> {
        self.inner.current.load().server_peer_exchange.clone()
    }

    /// The current credentials.
    pub fn certs(&self) -> Arc<WorkloadCerts> {
        self.inner.current.load().certs.clone()
    }

    /// The trust domains peers are checked against.
    pub fn trust(&self) -> &TrustDomains {
        &self.inner.trust
    }

    /// The outbound config for peers pinned to `expected`, offering `alpn` (see
    /// [`crate::client_config`]), from the current credentials. Every client of the mesh
    /// identity (outbound origination, the HBONE client) takes its config here: built once per
    /// (identities, ALPN) and credential set, so repeated dials share one config and its
    /// session cache (TLS resumption), and a rotation is picked up by the next call.
    pub fn client_config(
        &self,
        expected: &[Identity],
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let cur = self.inner.current.load();
        let key: ClientKey = (expected.to_vec(), alpn.iter().map(|p| p.to_vec()).collect());
        let mut clients = cur.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cfg) = clients.get(&key) {
            return Ok(cfg.clone());
        }
        let cfg = client_config(&cur.certs, &self.inner.trust, expected, alpn)?;
        if clients.len() >= CLIENT_CONFIGS_MAX {
            clients.clear();
        }
        clients.insert(key, cfg.clone());
        Ok(cfg)
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

    /// Checks the source once, now, without waiting for the files to settle: Files → reload
    /// if any file's content changed; Builtin → re-issue. Returns whether new credentials were
    /// published. On error the current credentials stay in place (the refusal is logged and
    /// counted once per distinct content, like the background refresh's).
    pub fn reload(&self) -> Result<bool, TlsError> {
        let certs = self.inner.check(true)?;
        let crl = self.inner.check_crl(true)?;
        Ok(certs || crl)
    }

    /// Checks every peer against the CRLs in `file` from now on (`certificates.crl`; see
    /// [`crate::crl`]), re-read with the certificates by the refresh task and by
    /// [`reload`](Self::reload). Call once, before serving; an unreadable or invalid file is
    /// an error here (refuse to start), later only a logged refusal that keeps the CRL in
    /// force.
    pub fn set_crl(&self, file: PathBuf, only_leaf: bool) -> Result<(), TlsError> {
        let revocation = Revocation::load(&file, only_leaf)?;
        let _ = self.inner.crl.set((file, only_leaf));
        self.inner.install_revocation(Arc::new(revocation))
    }

    /// Starts the background refresh task (needs a tokio runtime):
    ///
    /// * Files: every `interval`, reads the three files and compares a SHA-256 of their
    ///   contents with the one in use. Content, not mtime, decides: mtimes can be coarse
    ///   (FAT: 2 s, some SMB shares) or preserved by copy tools, and Kubernetes secret mounts
    ///   swap a symlink. The files are a few KB, so reading them each tick is cheap, and it
    ///   works the same on Windows (no inotify). A changed set is applied only once it reads
    ///   the same for [`SETTLE`] (re-read every [`SETTLE_POLL`] meanwhile), so a chain and key
    ///   caught mid-write are neither applied nor reported. A settled set then runs every
    ///   start-up check (see [`validate`]); a set that fails keeps the old credentials and is
    ///   logged as an error naming the reason and counted, once per distinct content.
    /// * Builtin: re-issues at half the remaining lifetime of the current certificate (checked
    ///   at least every `interval`); a failure is logged and retried after `interval`.
    ///
    /// The task ends by itself when every clone of this store has been dropped, or when the
    /// returned handle is aborted (dropping a tokio `JoinHandle` alone does not stop it).
    pub fn spawn_refresh(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let interval = interval.max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut warned_expired = false;
            let mut warned_soon = false;
            let mut failing = false;
            loop {
                let delay = match weak.upgrade() {
                    Some(inner) => inner.next_delay(interval, failing),
                    None => return,
                };
                tokio::time::sleep(delay).await;
                let Some(inner) = weak.upgrade() else { return };
                // Logged and counted where refused; the CRL in force stays.
                let _ = inner.check_crl(false);
                match inner.check(false) {
                    Ok(changed) => {
                        if changed {
                            warned_expired = false;
                            warned_soon = false;
                        }
                        failing = false;
                    }
                    // Logged and counted where it was refused.
                    Err(_) => failing = true,
                }
                let certs = inner.current.load().certs.clone();
                let now = SystemTime::now();
                if !warned_soon && expires_soon(certs.not_before(), certs.not_after(), now) {
                    tracing::warn!(
                        identity = %certs.identity(),
                        not_after = %fmt_time(certs.not_after()),
                        "the workload certificate is in the last tenth of its lifetime and has not been replaced; check what renews it"
                    );
                    warned_soon = true;
                }
                if !warned_expired && now > certs.not_after() {
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

/// Less than a tenth of the certificate's lifetime is left. Renewers replace certificates well
/// before that (istio-agent and `istioCa` with half the lifetime left, `builtin` at half-life),
/// so a certificate this old was not renewed in time.
fn expires_soon(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_after.duration_since(now).unwrap_or_default() < life / 10
}

/// Every check a credential set must pass, at start-up and at each rotation alike (one
/// function, so that rotation can never skip a start-up check): each PEM parses; the key
/// matches the leaf; the leaf carries exactly one SPIFFE identity, and it is the workload's
/// (`expected`, when known); the chain verifies to the trust bundle now (not expired, not
/// valid only in the future beyond [`crate::NOT_YET_VALID_TOLERANCE`]); rustls accepts the set
/// as a server configuration.
fn validate(
    raw: &Raw<'_>,
    expected: Option<&Identity>,
    trust: &TrustDomains,
    alpn: &[Vec<u8>],
    revocation: SharedRevocation,
) -> Result<(WorkloadCerts, Arc<ServerConfig>), TlsError> {
    let certs = raw.validate()?.with_revocation(revocation);
    if let Some(expected) = expected
        && certs.identity() != expected
    {
        return Err(TlsError::invalid_as(
            InvalidKind::IdentityMismatch,
            raw.chain_subject(),
            format!(
                "the certificate is for {}, but this workload is {expected}: a certificate \
                 must keep the workload's identity",
                certs.identity()
            ),
        ));
    }
    let alpn_refs: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
    let server = server_config(&certs, trust, &alpn_refs)?;
    Ok((certs, server))
}

impl Inner {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        // A panic while holding this lock cannot leave the status inconsistent in a way that
        // matters (plain fields): keep using it.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_delay(&self, interval: Duration, retrying: bool) -> Duration {
        match &self.source {
            CertSource::Files { .. } => {
                let settling = self.settle.lock().map(|s| s.is_pending()).unwrap_or(false);
                if settling {
                    interval.min(SETTLE_POLL)
                } else {
                    interval
                }
            }
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
    /// `force`: re-issue a Builtin certificate even if not due yet, and take a changed file
    /// set as it reads now, without waiting for it to settle.
    fn check(&self, force: bool) -> Result<bool, TlsError> {
        if let CertSource::Builtin { .. } = self.source
            && !force
            && SystemTime::now() < self.builtin_due_at()
        {
            return Ok(false);
        }
        let read = Raw::read(&self.source);
        let observed = match &read {
            Ok(raw) => raw.fingerprint().map(Observed::Content),
            Err(e) => Some(Observed::Unreadable(e.to_string())),
        };
        if let Some(obs) = &observed {
            let in_use = self.current.load().fingerprint.map(Observed::Content);
            let known_bad = self.status().refused.as_ref() == Some(obs);
            if in_use.as_ref() == Some(obs) || (known_bad && !force) {
                // Back to what is in force, or a set already refused: nothing to do.
                self.settle_lock().clear();
                self.status().pending_since = None;
                return Ok(false);
            }
            if !force {
                let mut settle = self.settle_lock();
                if !settle.observe_stable(obs.clone(), Instant::now(), SETTLE) {
                    let mut st = self.status();
                    if st.pending_since.is_none() {
                        st.pending_since = Some(SystemTime::now());
                        tracing::debug!(
                            "workload certificate files changed; waiting for them to settle"
                        );
                    }
                    return Ok(false);
                }
                settle.clear();
            }
            self.status().pending_since = None;
        }
        let revocation = self.current.load().certs.revocation().cloned();
        let checked = read.and_then(|raw| {
            validate(
                &raw,
                Some(&self.expected),
                &self.trust,
                &self.alpn,
                revocation,
            )
            .map(|(certs, server)| (certs, server, raw.fingerprint()))
        });
        let (certs, server, fingerprint) = match checked {
            Ok(v) => v,
            Err(e) => return Err(self.refuse(observed, e)),
        };
        let identity = certs.identity().clone();
        let not_after = certs.not_after();
        self.current.store(Arc::new(Current::new(
            certs,
            server,
            fingerprint,
            SystemTime::now(),
        )));
        self.generation.send_modify(|g| *g += 1);
        {
            let mut st = self.status();
            st.last_rotation = Some(SystemTime::now());
            st.last_refusal = None;
            st.refused = None;
        }
        tracing::info!(
            identity = %identity,
            not_after = %fmt_time(not_after),
            generation = *self.generation.borrow(),
            "workload certificate rotated"
        );
        if let Some(f) = self.observer.get() {
            f(&RotationEvent::Rotated {
                identity: &identity,
            });
        }
        Ok(true)
    }

    /// Re-reads the CRL file (when one is configured); a changed one that reads the same for
    /// [`SETTLE`] (at once with `force`) and parses is applied to new handshakes. Returns
    /// whether it was applied.
    fn check_crl(&self, force: bool) -> Result<bool, TlsError> {
        let Some((file, only_leaf)) = self.crl.get() else {
            return Ok(false);
        };
        let bytes = match fsutil::read("certificate revocation list file", file) {
            Ok(b) => b,
            Err(e) => return Err(self.refuse_crl(Observed::Unreadable(e.to_string()), e)),
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        let in_use = self
            .current
            .load()
            .certs
            .revocation()
            .map(|r| r.fingerprint());
        let refused = lock(&self.crl_refused).clone();
        if in_use == Some(hash) || (!force && refused == Some(Observed::Content(hash))) {
            lock(&self.crl_settle).clear();
            return Ok(false);
        }
        if !force && !lock(&self.crl_settle).observe_stable(hash, Instant::now(), SETTLE) {
            return Ok(false);
        }
        lock(&self.crl_settle).clear();
        match Revocation::from_bytes(file, &bytes, *only_leaf) {
            Ok(r) => {
                self.install_revocation(Arc::new(r))?;
                *lock(&self.crl_refused) = None;
                Ok(true)
            }
            Err(e) => Err(self.refuse_crl(Observed::Content(hash), e)),
        }
    }

    /// Puts `revocation` in force with the current credentials (new server config, new
    /// generation so that outbound configs are rebuilt).
    fn install_revocation(&self, revocation: Arc<Revocation>) -> Result<(), TlsError> {
        let cur = self.current.load();
        let certs = (*cur.certs)
            .clone()
            .with_revocation(Some(revocation.clone()));
        let alpn: Vec<&[u8]> = self.alpn.iter().map(Vec::as_slice).collect();
        let server = server_config(&certs, &self.trust, &alpn)?;
        self.current.store(Arc::new(Current::new(
            certs,
            server,
            cur.fingerprint,
            cur.obtained_at,
        )));
        self.generation.send_modify(|g| *g += 1);
        let (crls, revoked) = revocation.counts();
        tracing::info!(
            file = %revocation.file().display(),
            crls,
            revoked,
            next_update = %revocation.next_update().map(fmt_time).unwrap_or_default(),
            "certificate revocation list in force"
        );
        if revocation
            .next_update()
            .is_some_and(|n| n < SystemTime::now())
        {
            tracing::error!(
                file = %revocation.file().display(),
                "the certificate revocation list has expired (nextUpdate passed): every peer \
                 verification fails until a new CRL is published, as in Envoy"
            );
        }
        Ok(())
    }

    /// Logs a refused CRL file once per distinct content; the CRL in force stays.
    fn refuse_crl(&self, key: Observed, e: TlsError) -> TlsError {
        let mut refused = lock(&self.crl_refused);
        if refused.as_ref() != Some(&key) {
            tracing::error!(
                error = %e,
                "new certificate revocation list refused; the one in force stays"
            );
            *refused = Some(key);
        }
        e
    }

    fn settle_lock(&self) -> std::sync::MutexGuard<'_, Settle<Observed>> {
        self.settle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a refused set: logged as an error naming the reason, counted and shown in the
    /// status once per distinct content (a Builtin failure, which has no content, once per
    /// distinct message); the current credentials stay in service.
    fn refuse(&self, observed: Option<Observed>, e: TlsError) -> TlsError {
        let key = observed.unwrap_or_else(|| Observed::Unreadable(e.to_string()));
        let reason = e.refusal_reason();
        let error = e.to_string();
        let first = {
            let mut st = self.status();
            let first = st.refused.as_ref() != Some(&key);
            if first {
                st.refused = Some(key);
                st.refusals += 1;
                st.last_refusal = Some(Refusal {
                    at: SystemTime::now(),
                    reason,
                    error: error.clone(),
                });
            }
            first
        };
        if first {
            let current = self.current.load().certs.identity().clone();
            tracing::error!(
                reason,
                error = %error,
                in_service = %current,
                "new workload credentials refused; the current certificate stays in service"
            );
            if let Some(f) = self.observer.get() {
                f(&RotationEvent::Refused {
                    reason,
                    error: &error,
                });
            }
        } else {
            tracing::debug!(reason, error = %error, "new workload credentials still refused");
        }
        e
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

    /// Names the chain in error messages.
    fn chain_subject(&self) -> String {
        match self {
            Raw::Files { paths, .. } => {
                format!("certificate chain file `{}`", paths.0.display())
            }
            Raw::Issued(_) => "issued certificate".into(),
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

/// A lock whose poisoning (a panic while holding it) leaves nothing inconsistent here.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_warning_starts_in_the_last_tenth_of_the_lifetime() {
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        // 1000 s lifetime from t(0): warn once fewer than 100 s are left.
        assert!(!expires_soon(t(0), t(1000), t(500)));
        assert!(!expires_soon(t(0), t(1000), t(900)));
        assert!(expires_soon(t(0), t(1000), t(901)));
        assert!(expires_soon(t(0), t(1000), t(2000)), "expired counts too");
    }
}
