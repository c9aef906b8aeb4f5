//! Keeping a mount's credential fresh.
//!
//! A mount outlives the token it was made with (the scheduler mints minutes-long tokens; a
//! container runs for hours). One task per mount asks the credential service's pull-only
//! `refresh` endpoint for a new token of the image's repository shortly before the current one
//! expires, and swaps it into the mount's blob source. Reads go on with the old token meanwhile;
//! a failed refresh is logged and retried while the old token is still good. Credentials
//! without an expiry (static basic credentials) are never refreshed.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use imagemesh_proto::v1::{RegistryCredential, Scope, TokenRequest};
use imagemesh_runtime::Shutdown;
use imagemesh_runtime::credentials::CredentialClient;
use serde::Serialize;

use crate::config::RefreshConfig;
use crate::source::MountSource;

/// What the refresh task of one mount did.
#[derive(Debug, Default)]
pub struct RefreshCounters {
    pub refreshes: AtomicU64,
    pub failures: AtomicU64,
    expires_at: Mutex<Option<SystemTime>>,
}

/// The counters as the stats endpoint shows them.
#[derive(Debug, Clone, Serialize)]
pub struct RefreshStats {
    pub refreshes: u64,
    pub failures: u64,
    /// Seconds the current credential has left; absent when it does not expire.
    pub expires_in_seconds: Option<i64>,
}

impl RefreshCounters {
    pub fn new(credential: Option<&RegistryCredential>) -> Self {
        let counters = Self::default();
        *counters.expires_at.lock().expect("expiry lock") = credential.and_then(expiry);
        counters
    }

    pub fn stats(&self) -> RefreshStats {
        let expires_at = *self.expires_at.lock().expect("expiry lock");
        RefreshStats {
            refreshes: self.refreshes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            expires_in_seconds: expires_at.map(|at| match at.duration_since(SystemTime::now()) {
                Ok(left) => left.as_secs() as i64,
                Err(past) => -(past.duration().as_secs() as i64),
            }),
        }
    }
}

/// When a credential stops working, if it says.
pub fn expiry(credential: &RegistryCredential) -> Option<SystemTime> {
    SystemTime::try_from(credential.expires_at?).ok()
}

/// The pull-only refresh of `current` for `repository`, on behalf of the request that made the
/// mount. A credential from a named secret is refreshed with that same secret.
pub fn refresh_request(
    current: &RegistryCredential,
    repository: &str,
    request_id: &str,
    tenant: &str,
) -> TokenRequest {
    TokenRequest {
        registry: current.registry.clone(),
        scope: Some(Scope {
            repository: repository.to_string(),
            actions: vec!["pull".to_string()],
        }),
        request_id: request_id.to_string(),
        credential_ref: current.credential_ref.clone(),
        tenant: tenant.to_string(),
        login: false,
    }
}

/// How long to wait before refreshing a credential with `left` to live: `margin` before the
/// end, or at half the remaining life when that is sooner (short-lived tokens).
pub fn refresh_delay(left: Duration, margin: Duration) -> Duration {
    left.saturating_sub(margin.min(left / 2))
}

/// One mount's refresh task.
pub struct Refresh {
    pub credentials: CredentialClient,
    pub config: RefreshConfig,
    pub source: Arc<MountSource>,
    pub counters: Arc<RefreshCounters>,
    pub mount_id: String,
    pub request_id: String,
    pub tenant: String,
}

impl Refresh {
    /// Refreshes `credential` until it no longer expires or `stop` triggers.
    pub async fn run(self, mut credential: RegistryCredential, stop: Shutdown) {
        while let Some(expires_at) = expiry(&credential) {
            let left = expires_at
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            let wait = refresh_delay(left, self.config.margin);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.renew(&credential, expires_at, &stop).await {
                Some(fresh) => credential = fresh,
                None => return,
            }
        }
    }

    /// Asks until a credential newer than the current one comes back; `None` when stopped.
    async fn renew(
        &self,
        current: &RegistryCredential,
        expires_at: SystemTime,
        stop: &Shutdown,
    ) -> Option<RegistryCredential> {
        let request = refresh_request(
            current,
            self.source.image().repository(),
            &self.request_id,
            &self.tenant,
        );
        loop {
            match self.credentials.refresh(&request).await {
                Ok(response) => match response.credential {
                    // A credential service serving its cache may hand back the same token until
                    // its own refresh-ahead replaces it: only a later expiry is news.
                    Some(fresh) if expiry(&fresh).is_none_or(|at| at > expires_at) => {
                        self.source.swap(&fresh).await;
                        self.counters.refreshes.fetch_add(1, Ordering::Relaxed);
                        *self.counters.expires_at.lock().expect("expiry lock") = expiry(&fresh);
                        tracing::info!(mount_id = %self.mount_id, registry = %fresh.registry, expires_at = ?expiry(&fresh), "credential refreshed");
                        return Some(fresh);
                    }
                    Some(_) => {
                        tracing::debug!(mount_id = %self.mount_id, "refresh returned the current token; asking again")
                    }
                    None => {
                        tracing::warn!(mount_id = %self.mount_id, "refresh returned no credential")
                    }
                },
                Err(err) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    // The rejection names the registry and a code, never a secret.
                    tracing::warn!(mount_id = %self.mount_id, error = %err.to_rejection(), "credential refresh failed; retrying");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(self.config.retry) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_comes_a_margin_early_or_at_half_life() {
        let s = Duration::from_secs;
        assert_eq!(refresh_delay(s(3600), s(60)), s(3540));
        assert_eq!(
            refresh_delay(s(10), s(60)),
            s(5),
            "short tokens at half life"
        );
        assert_eq!(refresh_delay(s(0), s(60)), s(0));
    }
}
