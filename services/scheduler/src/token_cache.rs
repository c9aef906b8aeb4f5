//! A short-lived memory of tokens the credential service handed the scheduler.
//!
//! Thousands of requests a second for the same build repository would otherwise each cost a
//! round trip to the credential service. Answers are remembered per tenant (the credential
//! service decides per tenant). A token is reused for at most `ttl` and never past half of its
//! remaining lifetime when it was minted, so every request still leaves with a token that lives
//! long enough, and a credential revoked at the credential service stops being handed out
//! within `ttl`. "No credentials for this registry" (a public image) is remembered
//! the same way. `ttl = 0` turns the cache off.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use imagemesh_proto::v1::RegistryCredential;

/// Entries kept before expired ones are swept out.
const MAX_ENTRIES: usize = 10_000;

/// (tenant, registry, repository, actions, credential name).
type Key = (String, String, String, Vec<String>, String);

struct Entry {
    /// `None`: the credential service has nothing for this registry.
    credential: Option<RegistryCredential>,
    fresh_until: Instant,
}

/// What a token is for.
pub struct TokenKey<'a> {
    /// The tenant asking: the credential service decides per tenant (named credentials are bound
    /// to tenants), so one tenant's answer is never served to another.
    pub tenant: &'a str,
    pub registry: &'a str,
    pub repository: &'a str,
    pub actions: &'a [String],
    /// The named credential asked for; empty = the registry's default.
    pub credential_ref: &'a str,
}

impl TokenKey<'_> {
    fn owned(&self) -> Key {
        (
            self.tenant.to_string(),
            self.registry.to_string(),
            self.repository.to_string(),
            self.actions.to_vec(),
            self.credential_ref.to_string(),
        )
    }
}

pub struct TokenCache {
    ttl: Duration,
    entries: Mutex<HashMap<Key, Entry>>,
}

impl TokenCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::default(),
        }
    }

    /// A remembered answer: `Some(Some(cred))`, `Some(None)` (known public), or `None` (ask).
    pub fn get(&self, key: &TokenKey<'_>) -> Option<Option<RegistryCredential>> {
        let entries = self.entries.lock().expect("token cache lock");
        entries
            .get(&key.owned())
            .filter(|entry| entry.fresh_until > Instant::now())
            .map(|entry| entry.credential.clone())
    }

    /// Remembers what the credential service answered.
    pub fn put(&self, key: &TokenKey<'_>, credential: Option<RegistryCredential>) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let lifetime = credential
            .as_ref()
            .and_then(|c| c.expires_at)
            .and_then(|t| SystemTime::try_from(t).ok())
            .map(|expiry| expiry.duration_since(SystemTime::now()).unwrap_or_default() / 2)
            .unwrap_or(self.ttl);
        let entry = Entry {
            credential,
            fresh_until: now + lifetime.min(self.ttl),
        };
        let mut entries = self.entries.lock().expect("token cache lock");
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| e.fresh_until > now);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key.owned(), entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential(expires_in: Option<Duration>) -> RegistryCredential {
        RegistryCredential {
            registry: "r".into(),
            secret: "s".into(),
            expires_at: expires_in.map(|d| prost_types::Timestamp::from(SystemTime::now() + d)),
            ..Default::default()
        }
    }

    fn key<'a>(
        repository: &'a str,
        actions: &'a [String],
        credential_ref: &'a str,
    ) -> TokenKey<'a> {
        TokenKey {
            tenant: "a",
            registry: "r",
            repository,
            actions,
            credential_ref,
        }
    }

    #[test]
    fn reuses_within_ttl_and_half_the_lifetime_only() {
        let pull = vec!["pull".to_string()];
        let push = vec!["pull".to_string(), "push".to_string()];
        let cache = TokenCache::new(Duration::from_secs(30));
        cache.put(&key("a", &pull, ""), Some(credential(None)));
        assert!(cache.get(&key("a", &pull, "")).unwrap().is_some());
        assert!(
            cache.get(&key("b", &pull, "")).is_none(),
            "other repository"
        );
        assert!(cache.get(&key("a", &push, "")).is_none(), "other actions");
        assert!(
            cache.get(&key("a", &pull, "named")).is_none(),
            "other credential"
        );
        let other_tenant = TokenKey {
            tenant: "b",
            ..key("a", &pull, "")
        };
        assert!(cache.get(&other_tenant).is_none(), "other tenant");

        // A token with 1 s left is reused for at most 0.5 s.
        let short = Some(credential(Some(Duration::from_secs(1))));
        cache.put(&key("short", &pull, ""), short);
        assert!(cache.get(&key("short", &pull, "")).is_some());
        std::thread::sleep(Duration::from_millis(600));
        assert!(cache.get(&key("short", &pull, "")).is_none());

        cache.put(&key("public", &pull, ""), None);
        assert_eq!(cache.get(&key("public", &pull, "")), Some(None));
    }

    #[test]
    fn zero_ttl_disables() {
        let cache = TokenCache::new(Duration::ZERO);
        cache.put(&key("a", &[], ""), Some(credential(None)));
        assert!(cache.get(&key("a", &[], "")).is_none());
    }
}
