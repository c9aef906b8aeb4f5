//! The token cache: one upstream call per key at a time, tokens reused until shortly before they
//! expire, refreshed ahead of expiry, failures never kept.
//!
//! Keys are (registry, repository, actions, credential identity). A lookup
//! - finds a *fresh* token (more than `margin` of life left): serves it (`cached = true`); when
//!   the token is also past its refresh point, starts one background refresh;
//! - otherwise joins the upstream call in flight for the key, or starts one. Every waiter gets
//!   that call's result; only a success is stored.
//!
//! An upstream call runs as its own task, so a caller that goes away does not cancel it for the
//! others, and its result is stored once by the task itself.
//!
//! Lifetimes: a token is kept as living at least `min_lifetime` (see [`settle`]), which is what
//! stops an upstream that hands out already-expired tokens from causing a refresh loop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use imagemesh_proto::v1::Scope;
use tokio::time::Instant;

use crate::config::CacheConfig;
use crate::providers::{Minted, ProviderError};

/// After a failed background refresh, wait this long before the next one, so a broken upstream
/// is not asked on every request while the cached token is still good.
const REFRESH_RETRY: Duration = Duration::from_secs(5);

/// What a cached token is for and whose credential minted it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub registry: String,
    pub repository: String,
    /// Sorted and deduplicated.
    pub actions: Vec<String>,
    /// The provider's identity (never a secret).
    pub identity: String,
}

impl CacheKey {
    pub fn new(registry: &str, scope: &Scope, identity: String) -> Self {
        let mut actions = scope.actions.clone();
        actions.sort();
        actions.dedup();
        Self {
            registry: registry.to_string(),
            repository: scope.repository.clone(),
            actions,
            identity,
        }
    }
}

/// Cache settings plus the lifetime floor.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    pub cache: CacheConfig,
    pub min_lifetime: Duration,
}

/// Calls the upstream once for a key.
pub type Fetch = Box<dyn FnOnce() -> BoxFuture<'static, Result<Minted, ProviderError>> + Send>;

type Flight = Shared<BoxFuture<'static, Result<Minted, ProviderError>>>;

#[derive(Clone)]
struct Entry {
    minted: Minted,
    fresh_until: Instant,
    refresh_from: Instant,
}

#[derive(Default)]
struct Slot {
    entry: Option<Entry>,
    flight: Option<Flight>,
}

/// Minted tokens by key. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct TokenCache {
    slots: Arc<Mutex<HashMap<CacheKey, Slot>>>,
    settings: CacheSettings,
}

/// What a lookup found.
enum Found {
    Fresh(Minted),
    Wait(Flight),
}

impl TokenCache {
    pub fn new(settings: CacheSettings) -> Self {
        Self {
            slots: Arc::default(),
            settings,
        }
    }

    /// The token for `key`: from the cache (`true`) or from an upstream call (`false`), which
    /// `fetch` makes unless one is already in flight.
    pub async fn get(&self, key: CacheKey, fetch: Fetch) -> Result<(Minted, bool), ProviderError> {
        match self.lookup(key, fetch) {
            Found::Fresh(minted) => Ok((minted, true)),
            Found::Wait(flight) => flight.await.map(|minted| (minted, false)),
        }
    }

    /// Number of keys held (fresh, stale or in flight).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, key: CacheKey, fetch: Fetch) -> Found {
        let now = Instant::now();
        let mut slots = self.lock();
        if slots.len() >= self.settings.cache.max_entries && !slots.contains_key(&key) {
            sweep(&mut slots, now);
        }
        let slot = slots.entry(key.clone()).or_default();
        if let Some(entry) = &slot.entry {
            if now < entry.fresh_until {
                let minted = entry.minted.clone();
                if now >= entry.refresh_from && slot.flight.is_none() {
                    tracing::debug!(
                        registry = key.registry,
                        repository = key.repository,
                        "refreshing a token ahead of expiry"
                    );
                    slot.flight = Some(self.start(key, fetch, true));
                }
                return Found::Fresh(minted);
            }
            slot.entry = None;
        }
        let flight = match &slot.flight {
            Some(flight) => flight.clone(),
            None => {
                let flight = self.start(key, fetch, false);
                slot.flight = Some(flight.clone());
                flight
            }
        };
        Found::Wait(flight)
    }

    /// Spawns the upstream call; the task stores its result before any waiter sees it.
    fn start(&self, key: CacheKey, fetch: Fetch, background: bool) -> Flight {
        let cache = self.clone();
        let task = tokio::spawn(async move {
            let result = fetch().await.map(|minted| settle(minted, cache.settings));
            cache.finish(&key, &result, background);
            result.map(|entry| entry.minted)
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(ProviderError::Unavailable(format!(
                    "token request task failed: {e}"
                )))
            })
        }
        .boxed()
        .shared()
    }

    fn finish(&self, key: &CacheKey, result: &Result<Entry, ProviderError>, background: bool) {
        let mut slots = self.lock();
        let slot = slots.entry(key.clone()).or_default();
        slot.flight = None;
        match result {
            Ok(entry) => slot.entry = Some(entry.clone()),
            Err(err) => {
                if background {
                    tracing::warn!(registry = key.registry, repository = key.repository, error = %err, "background token refresh failed; the cached token is still served");
                    if let Some(entry) = &mut slot.entry {
                        entry.refresh_from = Instant::now() + REFRESH_RETRY;
                    }
                }
                // Failures are not cached: the next request asks upstream again.
                if slot.entry.is_none() {
                    slots.remove(key);
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Slot>> {
        // Held only for map operations, never across an await; a panic there leaves a
        // consistent map, so a poisoned lock is still usable.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Drops entries that can no longer be served and have no call in flight.
fn sweep(slots: &mut HashMap<CacheKey, Slot>, now: Instant) {
    slots.retain(|_, slot| {
        slot.flight.is_some() || slot.entry.as_ref().is_some_and(|e| now < e.fresh_until)
    });
}

/// Applies the lifetime rules to a freshly minted token: the reported expiry is at least
/// `min_lifetime` away; a token without expiry is reused for `no_expiry_ttl`.
fn settle(mut minted: Minted, settings: CacheSettings) -> Entry {
    let now = SystemTime::now();
    let lifetime = match minted.expires_at {
        Some(expires_at) => {
            let upstream = expires_at.duration_since(now).unwrap_or_default();
            if upstream < settings.min_lifetime {
                tracing::info!(
                    upstream_lifetime = ?upstream,
                    min_lifetime = ?settings.min_lifetime,
                    "upstream token expires too soon (or already has); it is reported and cached as living min_lifetime"
                );
            }
            let lifetime = upstream.max(settings.min_lifetime);
            minted.expires_at = Some(now + lifetime);
            lifetime
        }
        None => settings.cache.no_expiry_ttl,
    };
    let start = Instant::now();
    // Config validation keeps lifetime > margin; saturate anyway rather than panic.
    let usable = lifetime.saturating_sub(settings.cache.margin);
    let refresh_after = (usable / 2).max(usable.saturating_sub(settings.cache.refresh_ahead));
    Entry {
        minted,
        fresh_until: start + usable,
        refresh_from: start + refresh_after,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use imagemesh_proto::v1::AuthScheme;
    use secrecy::{ExposeSecret, SecretString};

    use super::*;

    const MIN_LIFETIME: Duration = Duration::from_secs(60);

    fn cache() -> TokenCache {
        TokenCache::new(CacheSettings {
            cache: CacheConfig::default(),
            min_lifetime: MIN_LIFETIME,
        })
    }

    fn key(actions: &[&str], identity: &str) -> CacheKey {
        let scope = Scope {
            repository: "team/app".into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        };
        CacheKey::new("r.example", &scope, identity.into())
    }

    /// An upstream that counts its calls, answers `token-<n>` living `lifetime` (or fails),
    /// after yielding so concurrent callers really overlap.
    #[derive(Clone, Default)]
    struct Upstream {
        calls: Arc<AtomicUsize>,
        failing: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Upstream {
        fn fetch(&self, expires_at: Option<SystemTime>) -> Fetch {
            let calls = self.calls.clone();
            let failing = self.failing.load(Ordering::SeqCst);
            Box::new(move || {
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    if failing {
                        return Err(ProviderError::Unavailable("upstream down".into()));
                    }
                    Ok(Minted {
                        scheme: AuthScheme::Bearer,
                        username: "svc".into(),
                        secret: SecretString::from(format!("token-{n}")),
                        expires_at,
                    })
                }
                .boxed()
            })
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    fn in_secs(secs: u64) -> Option<SystemTime> {
        Some(SystemTime::now() + Duration::from_secs(secs))
    }

    fn secret(result: &(Minted, bool)) -> String {
        result.0.secret.expose_secret().to_string()
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_for_one_key_make_one_upstream_call() {
        let cache = cache();
        let upstream = Upstream::default();
        let requests =
            (0..100).map(|_| cache.get(key(&["pull"], "a"), upstream.fetch(in_secs(600))));
        let results = futures::future::join_all(requests).await;
        assert_eq!(upstream.calls(), 1);
        for result in &results {
            let result = result.as_ref().unwrap();
            assert_eq!(secret(result), "token-1");
            assert!(
                !result.1,
                "waiters of an upstream call are not served from the cache"
            );
        }
        let again = cache
            .get(key(&["pull"], "a"), upstream.fetch(in_secs(600)))
            .await
            .unwrap();
        assert_eq!((secret(&again), again.1), ("token-1".into(), true));
        assert_eq!(upstream.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn scope_and_identity_are_part_of_the_key() {
        let cache = cache();
        let upstream = Upstream::default();
        for k in [
            key(&["pull"], "a"),
            key(&["push", "pull"], "a"),
            key(&["pull"], "b"),
        ] {
            cache.get(k, upstream.fetch(in_secs(600))).await.unwrap();
        }
        assert_eq!(upstream.calls(), 3);
        let same = cache
            .get(
                key(&["pull", "push", "pull"], "a"),
                upstream.fetch(in_secs(600)),
            )
            .await
            .unwrap();
        assert!(same.1, "actions are compared as a set");
        assert_eq!(upstream.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_not_cached() {
        let cache = cache();
        let upstream = Upstream::default();
        upstream.failing.store(true, Ordering::SeqCst);
        let both = futures::future::join(
            cache.get(key(&["pull"], "a"), upstream.fetch(in_secs(600))),
            cache.get(key(&["pull"], "a"), upstream.fetch(in_secs(600))),
        )
        .await;
        assert!(both.0.is_err() && both.1.is_err());
        assert_eq!(upstream.calls(), 1, "concurrent failures collapse too");
        assert!(cache.is_empty(), "nothing is kept for a failure");
        upstream.failing.store(false, Ordering::SeqCst);
        let ok = cache
            .get(key(&["pull"], "a"), upstream.fetch(in_secs(600)))
            .await
            .unwrap();
        assert_eq!((secret(&ok), ok.1), ("token-2".into(), false));
    }

    #[tokio::test(start_paused = true)]
    async fn an_already_expired_upstream_token_lives_min_lifetime_and_causes_no_loop() {
        let cache = cache();
        let upstream = Upstream::default();
        // moto's ECR answers expiresAt = 2015-01-01.
        let expired = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_420_070_400));
        let before = SystemTime::now();
        let first = cache
            .get(key(&["pull"], "a"), upstream.fetch(expired))
            .await
            .unwrap();
        let reported = first.0.expires_at.unwrap();
        assert!(
            reported >= before + MIN_LIFETIME,
            "reported expiry is floored"
        );
        for _ in 0..50 {
            let again = cache
                .get(key(&["pull"], "a"), upstream.fetch(expired))
                .await
                .unwrap();
            assert!(again.1);
            assert_eq!(
                again.0.expires_at,
                Some(reported),
                "the same expiry every time"
            );
        }
        assert_eq!(upstream.calls(), 1);
        // Past its usable life (min_lifetime - margin) it is minted again, once.
        tokio::time::advance(MIN_LIFETIME).await;
        cache
            .get(key(&["pull"], "a"), upstream.fetch(expired))
            .await
            .unwrap();
        cache
            .get(key(&["pull"], "a"), upstream.fetch(expired))
            .await
            .unwrap();
        assert_eq!(upstream.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_refreshed_ahead_of_expiry_while_the_old_one_is_served() {
        let cache = cache();
        let upstream = Upstream::default();
        // 120 s lifetime, 10 s margin: usable for 110 s; refresh-ahead (60 s) would start at 50 s,
        // but never before half the usable life, 55 s.
        cache
            .get(key(&["pull"], "a"), upstream.fetch(in_secs(120)))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(40)).await;
        let early = cache
            .get(key(&["pull"], "a"), upstream.fetch(in_secs(120)))
            .await
            .unwrap();
        assert_eq!((secret(&early), early.1), ("token-1".into(), true));
        assert_eq!(upstream.calls(), 1, "no refresh before the refresh point");

        tokio::time::advance(Duration::from_secs(20)).await;
        let served = cache
            .get(key(&["pull"], "a"), upstream.fetch(in_secs(120)))
            .await
            .unwrap();
        assert_eq!((secret(&served), served.1), ("token-1".into(), true));
        for _ in 0..10 {
            // More requests while the refresh is in flight start no second one.
            cache
                .get(key(&["pull"], "a"), upstream.fetch(in_secs(120)))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(upstream.calls(), 2);
        let fresh = cache
            .get(key(&["pull"], "a"), upstream.fetch(in_secs(120)))
            .await
            .unwrap();
        assert_eq!((secret(&fresh), fresh.1), ("token-2".into(), true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_background_refresh_keeps_serving_the_good_token() {
        let cache = cache();
        let upstream = Upstream::default();
        cache
            .get(key(&["pull"], "a"), upstream.fetch(in_secs(120)))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        upstream.failing.store(true, Ordering::SeqCst);
        cache
            .get(key(&["pull"], "a"), upstream.fetch(in_secs(120)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(upstream.calls(), 2);
        let still = cache
            .get(key(&["pull"], "a"), upstream.fetch(in_secs(120)))
            .await
            .unwrap();
        assert_eq!((secret(&still), still.1), ("token-1".into(), true));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            upstream.calls(),
            2,
            "the next background try waits REFRESH_RETRY"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn credentials_without_expiry_are_reused_for_no_expiry_ttl() {
        let cache = cache();
        let upstream = Upstream::default();
        let first = cache
            .get(key(&["pull"], "a"), upstream.fetch(None))
            .await
            .unwrap();
        assert_eq!(first.0.expires_at, None, "no invented expiry is reported");
        tokio::time::advance(CacheConfig::default().no_expiry_ttl).await;
        cache
            .get(key(&["pull"], "a"), upstream.fetch(None))
            .await
            .unwrap();
        assert_eq!(upstream.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_keys_are_swept_past_max_entries() {
        let cache = TokenCache::new(CacheSettings {
            cache: CacheConfig {
                max_entries: 4,
                ..Default::default()
            },
            min_lifetime: MIN_LIFETIME,
        });
        let upstream = Upstream::default();
        for identity in ["a", "b", "c", "d"] {
            cache
                .get(key(&["pull"], identity), upstream.fetch(in_secs(120)))
                .await
                .unwrap();
        }
        tokio::time::advance(Duration::from_secs(200)).await;
        cache
            .get(key(&["pull"], "e"), upstream.fetch(in_secs(120)))
            .await
            .unwrap();
        assert_eq!(cache.len(), 1);
    }
}
