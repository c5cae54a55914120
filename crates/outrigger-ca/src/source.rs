//! The agent's `istioCa` certificate source: identity from the Istio CA API, kept across
//! restarts, renewed before it expires.
//!
//! * **Persisted.** Every certificate obtained is written into the state directory with Istio's
//!   file names (`cert-chain.pem`, `key.pem` owner-only, `root-cert.pem`; each replaced
//!   atomically, key first, chain last). The agent's [`CertStore`] serves the chain and key from
//!   there, so a restart or reboot resumes with them and needs no token: the bootstrap token
//!   (istioctl's, valid one hour by default) matters only for the very first request — the
//!   failure behind istio/istio issues 49202, 33203, 27691, 22176 and 46923.
//! * **Renewed at a fraction of the lifetime**, as istio-agent's secret cache does
//!   (`security/pkg/nodeagent/cache/secretcache.go` `rotateTime`): at
//!   `notAfter − (gracePeriodRatio ± jitter) × lifetime`, `SECRET_GRACE_PERIOD_RATIO` 0.5 and
//!   `SECRET_GRACE_PERIOD_RATIO_JITTER` 0.01 by default. Renewals authenticate with the current
//!   certificate over mTLS; the token is used again only if the certificate has expired or is
//!   refused and a token file is there.
//! * **Retried with backoff** (1 s doubling to 5 min, never sleeping past the expiry) while the
//!   old certificate keeps serving; each failure is logged, at error level once less than a
//!   quarter of the lifetime remains. Once the certificate has expired peers refuse it: the
//!   agent says so (the store's expiry log line, `/healthz/ready` answers 503) and keeps
//!   retrying, so it recovers by itself when the CA is back.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use outrigger_identity::Identity;
use outrigger_tls::ca::{CERT_CHAIN_FILE, CLOCK_SKEW_GRACE, IssuedCert, KEY_FILE};
use outrigger_tls::{CertStore, WorkloadCerts};

use crate::client::{Auth, CaClient, CaError};

/// Istio's `SECRET_GRACE_PERIOD_RATIO` default.
pub const DEFAULT_GRACE_PERIOD_RATIO: f64 = 0.5;
/// Istio's `SECRET_GRACE_PERIOD_RATIO_JITTER` default.
pub const DEFAULT_GRACE_PERIOD_RATIO_JITTER: f64 = 0.01;

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The `istioCa` source: a CA client, the identity to obtain and where to keep it.
#[derive(Debug, Clone)]
pub struct IstioCaSource {
    pub client: CaClient,
    pub identity: Identity,
    pub state_dir: PathBuf,
    pub grace_period_ratio: f64,
    pub jitter: f64,
}

/// How start-up obtained the credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// A persisted, still valid certificate from an earlier run.
    Persisted,
    /// A new certificate from the CA, authenticated by the bootstrap token.
    Bootstrapped,
}

impl IstioCaSource {
    /// The persisted chain and key (the agent's [`CertStore`] reads them; the trust bundle is
    /// the configured mesh root).
    pub fn chain_path(&self) -> PathBuf {
        self.state_dir.join(CERT_CHAIN_FILE)
    }

    pub fn key_path(&self) -> PathBuf {
        self.state_dir.join(KEY_FILE)
    }

    /// The persisted set, if it is there, verifies to the mesh root, has not expired and is
    /// for this workload.
    pub fn persisted(&self) -> Result<WorkloadCerts, String> {
        let certs = WorkloadCerts::load_files(
            &self.chain_path(),
            &self.key_path(),
            &self.client.config().root_cert_file,
        )
        .map_err(|e| e.to_string())?;
        if certs.identity() != &self.identity {
            return Err(format!(
                "the persisted certificate is for {}, not {}",
                certs.identity(),
                self.identity
            ));
        }
        Ok(certs)
    }

    /// Start-up: resumes with the persisted certificate when it is valid; otherwise obtains
    /// one with the bootstrap token, retrying with backoff for at most `retry_for` (each
    /// failure logged), and persists it.
    pub async fn ensure(&self, retry_for: Duration) -> Result<Startup, CaError> {
        match self.persisted() {
            Ok(_) => return Ok(Startup::Persisted),
            Err(why) if self.chain_path().exists() => tracing::warn!(
                state_dir = %self.state_dir.display(),
                reason = %why,
                "the persisted workload certificate cannot be used; requesting a new one with the bootstrap token"
            ),
            Err(_) => tracing::info!(
                state_dir = %self.state_dir.display(),
                ca = %self.client.config().address,
                "no persisted workload certificate; requesting one with the bootstrap token"
            ),
        }
        let deadline = tokio::time::Instant::now() + retry_for;
        let mut backoff = BACKOFF_FIRST;
        loop {
            match self.obtain(Auth::Token).await {
                Ok(()) => return Ok(Startup::Bootstrapped),
                Err(e) => {
                    let now = tokio::time::Instant::now();
                    // A refused token does not get better by asking again.
                    let hopeless = matches!(e, CaError::Token { .. } | CaError::NoToken)
                        || matches!(&e, CaError::Refused { code, .. } if *code == tonic::Code::Unauthenticated);
                    if hopeless || now + backoff > deadline {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "bootstrap certificate request failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// One request, and the answer persisted.
    async fn obtain(&self, auth: Auth<'_>) -> Result<(), CaError> {
        let issued = self.client.create_certificate(&self.identity, auth).await?;
        self.persist(&issued)?;
        Ok(())
    }

    fn persist(&self, issued: &IssuedCert) -> Result<(), CaError> {
        issued.write_to(&self.state_dir)?;
        Ok(())
    }

    /// When the credentials in `certs` are due for renewal, with `jitter_sample` in [-1, 1]
    /// scaling the configured jitter.
    pub fn renew_at(&self, certs: &WorkloadCerts, jitter_sample: f64) -> SystemTime {
        renew_at(
            certs.not_before(),
            certs.not_after(),
            self.grace_period_ratio,
            self.jitter * jitter_sample.clamp(-1.0, 1.0),
        )
    }

    /// Starts the renewal task: sleeps until the current certificate is due, renews (mTLS,
    /// falling back to the token as described in the module documentation), persists, and has
    /// `store` load the new set — open connections keep theirs, new handshakes use the new
    /// one. Ends when the handle is aborted.
    pub fn spawn_renewal(self, store: CertStore) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move { self.renewal_loop(store).await })
    }

    async fn renewal_loop(self, store: CertStore) {
        let mut backoff = BACKOFF_FIRST;
        let mut retrying = false;
        loop {
            let certs = store.certs();
            let now = SystemTime::now();
            let wait = if retrying {
                // Never sleep past the expiry while it is still ahead.
                match certs.not_after().duration_since(now) {
                    Ok(left) if left > Duration::ZERO => backoff.min(left),
                    _ => backoff,
                }
            } else {
                self.renew_at(&certs, jitter_sample())
                    .duration_since(now)
                    .unwrap_or_default()
            };
            tokio::time::sleep(wait).await;
            match self.renew(&store).await {
                Ok(()) => {
                    retrying = false;
                    backoff = BACKOFF_FIRST;
                }
                Err(e) => {
                    let certs = store.certs();
                    let life = certs
                        .not_after()
                        .duration_since(certs.not_before())
                        .unwrap_or_default();
                    let left = certs
                        .not_after()
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    if left < life / 4 {
                        tracing::error!(
                            error = %e,
                            expires_in = ?left,
                            retry_in = ?backoff,
                            "workload certificate renewal failing and the certificate expires soon; after that peers refuse this workload"
                        );
                    } else {
                        tracing::warn!(error = %e, expires_in = ?left, retry_in = ?backoff, "workload certificate renewal failed; the current certificate stays in service");
                    }
                    if retrying {
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                    retrying = true;
                }
            }
        }
    }

    /// One renewal: with the current certificate if it is still valid, else (or if that is
    /// refused as unauthenticated) with the token when a token file exists.
    async fn renew(&self, store: &CertStore) -> Result<(), CaError> {
        let certs = store.certs();
        let valid = SystemTime::now() < certs.not_after();
        let has_token = self
            .client
            .config()
            .token_file
            .as_deref()
            .is_some_and(Path::exists);
        let result = if valid {
            match self.obtain(Auth::Certificate(&certs)).await {
                Err(CaError::Refused { code, .. })
                    if code == tonic::Code::Unauthenticated && has_token =>
                {
                    self.obtain(Auth::Token).await
                }
                other => other,
            }
        } else {
            self.obtain(Auth::Token).await
        };
        result?;
        store.reload()?;
        Ok(())
    }
}

/// `notAfter − (ratio + jitter) × lifetime`, lifetime measured from when the certificate was
/// created (its `notBefore` plus the CA's clock-skew back-dating, which istiod and Outrigger's
/// CA both apply). Istio's `rotateTime`. Never before `notBefore`.
pub fn renew_at(
    not_before: SystemTime,
    not_after: SystemTime,
    ratio: f64,
    jitter: f64,
) -> SystemTime {
    let created = (not_before + CLOCK_SKEW_GRACE).min(not_after);
    let life = not_after.duration_since(created).unwrap_or_default();
    let grace = (ratio + jitter).clamp(0.0, 1.0);
    not_after - life.mul_f64(grace)
}

/// A uniform sample in [-1, 1] for the jitter. Not for cryptography: it only spreads renewals
/// of agents started together.
fn jitter_sample() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    let bits = RandomState::new().hash_one(SystemTime::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renews_half_way_through_the_life_after_the_back_dating() {
        // Issued at 1000 (notBefore back-dated 120 s), 24 h lifetime.
        let nb = t(1000 - 120);
        let na = t(1000 + 86_400);
        assert_eq!(renew_at(nb, na, 0.5, 0.0), t(1000 + 43_200));
        // Istio's example: "at 0.10 and 1 hour TTL, we would refresh 6 minutes before expiration".
        assert_eq!(
            renew_at(t(0), t(120 + 3600), 0.10, 0.0),
            t(120 + 3600 - 360)
        );
        // ±0.01 jitter on 24 h is ±864 s ("+/- approximately 15 minutes").
        assert_eq!(renew_at(nb, na, 0.5, 0.01), t(1000 + 43_200 - 864));
        assert_eq!(renew_at(nb, na, 0.5, -0.01), t(1000 + 43_200 + 864));
    }

    #[test]
    fn out_of_range_ratios_are_clamped() {
        let (nb, na) = (t(0), t(120 + 1000));
        assert_eq!(renew_at(nb, na, 2.0, 0.0), t(120));
        assert_eq!(renew_at(nb, na, -1.0, 0.0), na);
        // A certificate younger than the back-dating: due at once, not before notBefore.
        assert_eq!(renew_at(t(0), t(60), 0.5, 0.0), t(60));
    }

    #[test]
    fn jitter_samples_stay_in_range() {
        for _ in 0..1000 {
            let s = jitter_sample();
            assert!((-1.0..=1.0).contains(&s), "{s}");
        }
    }
}
