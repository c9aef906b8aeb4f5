//! Matching a token request to a provider, through the token cache, and shaping the answer.

use std::collections::HashMap;
use std::sync::Arc;

use futures::FutureExt;
use imagemesh_proto::v1::{RegistryCredential, Scope, TokenRequest, TokenResponse};
use imagemesh_registry::host;
use imagemesh_runtime::{ErrorCode, Rejection};
use secrecy::ExposeSecret;

use crate::cache::{CacheKey, CacheSettings, TokenCache};
use crate::config::CredentialConfig;
use crate::providers::{self, Minted, Provider, ProviderError, ProviderSettings};

/// Which scopes an endpoint may grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopePolicy {
    /// Pull and push (the scheduler's mint endpoint).
    PullPush,
    /// Pull only (the mounter's refresh endpoint).
    PullOnly,
}

const KNOWN_ACTIONS: &[&str] = &["pull", "push"];

/// Holds the providers, keyed by normalised registry host, and the token cache.
pub struct Broker {
    providers: HashMap<String, Arc<Provider>>,
    /// Named credentials: name -> (normalised registry, provider).
    named: HashMap<String, (String, Arc<Provider>)>,
    cache: TokenCache,
}

impl Broker {
    /// Builds every provider; fails on a secret that cannot be read (naming it, not its value).
    pub async fn from_config(config: &CredentialConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let settings = ProviderSettings::from(config);
        let mut providers = HashMap::new();
        // Docker configs first, so explicit entries override them.
        for path in &config.docker_config {
            let loaded = providers::load_docker_config(path, settings.helper_timeout).await?;
            for (registry, provider) in loaded {
                providers.insert(registry, Arc::new(provider));
            }
        }
        for entry in &config.registries {
            let registry = host::normalize(entry.host());
            anyhow::ensure!(!registry.is_empty(), "a registry entry has an empty host");
            let provider = Provider::from_config(entry, settings).await?;
            providers.insert(registry, Arc::new(provider));
        }
        let mut named = HashMap::new();
        for (name, entry) in &config.secrets {
            let registry = host::normalize(entry.host());
            anyhow::ensure!(!registry.is_empty(), "credential {name} has an empty host");
            let provider = Provider::from_config(entry, settings).await?;
            named.insert(name.clone(), (registry, Arc::new(provider)));
        }
        let kinds: Vec<String> = providers
            .iter()
            .map(|(registry, p)| format!("{registry} ({})", p.kind()))
            .collect();
        tracing::info!(registries = ?kinds, "credential providers ready");
        let cache = TokenCache::new(CacheSettings {
            cache: config.cache,
            min_lifetime: config.min_lifetime,
        });
        Ok(Self {
            providers,
            named,
            cache,
        })
    }

    /// Answers a token request under `policy`.
    pub async fn mint(
        &self,
        request: &TokenRequest,
        policy: ScopePolicy,
    ) -> Result<TokenResponse, Rejection> {
        let registry = host::normalize(&request.registry);
        if registry.is_empty() {
            return Err(Rejection::new(
                ErrorCode::MalformedRequest,
                "registry is empty",
            ));
        }
        let scope = checked_scope(request.scope.clone().unwrap_or_default(), policy)?;
        let provider = self.provider_for(&registry, &request.credential_ref)?;
        let (minted, cached) = if provider.is_static() {
            // Nothing upstream to save: hand out what is held.
            (provider.mint(&registry, &scope).await, false)
        } else {
            let key = CacheKey::new(&registry, &scope, provider.identity());
            let fetch = upstream_call(provider.clone(), registry.clone(), scope.clone());
            match self.cache.get(key, fetch).await {
                Ok((minted, cached)) => (Ok(minted), cached),
                Err(err) => (Err(err), false),
            }
        };
        let minted = minted.map_err(|err| provider_rejection(&registry, err))?;
        tracing::debug!(
            registry,
            provider = provider.kind(),
            repository = scope.repository,
            actions = ?scope.actions,
            cached,
            "credential handed out"
        );
        Ok(TokenResponse {
            credential: Some(credential(registry, scope, minted)),
            cached,
        })
    }
}

impl Broker {
    /// The registry's default provider, or the named credential when the request names one
    /// (which must be for this exact registry: a name never unlocks another registry).
    fn provider_for(&self, registry: &str, name: &str) -> Result<Arc<Provider>, Rejection> {
        if name.is_empty() {
            return self.providers.get(registry).cloned().ok_or_else(|| {
                Rejection::new(
                    ErrorCode::NoCredentials,
                    format!("no credentials configured for registry {registry}"),
                )
            });
        }
        let (for_registry, provider) = self.named.get(name).ok_or_else(|| {
            Rejection::new(
                ErrorCode::NoCredentials,
                format!("no credential named {name:?}"),
            )
        })?;
        if for_registry != registry {
            return Err(Rejection::new(
                ErrorCode::Forbidden,
                format!("credential {name:?} is not for registry {registry}"),
            ));
        }
        Ok(provider.clone())
    }
}

/// The upstream call for one cache key, run by the cache at most once at a time.
fn upstream_call(provider: Arc<Provider>, registry: String, scope: Scope) -> crate::cache::Fetch {
    Box::new(move || {
        async move {
            let result = provider.mint(&registry, &scope).await;
            match &result {
                Ok(minted) => {
                    let metrics = imagemesh_runtime::telemetry::metrics::get();
                    let attribute = imagemesh_runtime::telemetry::metrics::attr("registry", registry.clone());
                    metrics.tokens_minted.add(1, &[attribute]);
                    tracing::debug!(
                    registry,
                    provider = provider.kind(),
                    repository = scope.repository,
                    expires_at = ?minted.expires_at,
                    "minted upstream"
                    )
                }
                Err(err) => tracing::info!(registry, provider = provider.kind(), error = %err, "upstream mint failed"),
            }
            result
        }
        .boxed()
    })
}

/// The wire form. The secret leaves its `SecretString` here, for the reply only.
fn credential(registry: String, scope: Scope, minted: Minted) -> RegistryCredential {
    RegistryCredential {
        registry,
        scheme: minted.scheme as i32,
        username: minted.username,
        secret: minted.secret.expose_secret().to_string(),
        expires_at: minted.expires_at.map(prost_types::Timestamp::from),
        scope: Some(scope),
    }
}

/// Validates the actions and applies the endpoint's policy. Empty actions mean pull.
fn checked_scope(mut scope: Scope, policy: ScopePolicy) -> Result<Scope, Rejection> {
    if scope.actions.is_empty() {
        scope.actions.push("pull".into());
    }
    for action in &scope.actions {
        if !KNOWN_ACTIONS.contains(&action.as_str()) {
            return Err(Rejection::new(
                ErrorCode::MalformedRequest,
                format!("unknown action {action:?} (allowed: pull, push)"),
            ));
        }
        if policy == ScopePolicy::PullOnly && action != "pull" {
            return Err(Rejection::new(
                ErrorCode::Forbidden,
                format!("action {action:?} is not allowed on the refresh endpoint (pull only)"),
            ));
        }
    }
    scope.actions.sort();
    scope.actions.dedup();
    Ok(scope)
}

fn provider_rejection(registry: &str, err: ProviderError) -> Rejection {
    let code = match err {
        ProviderError::Rejected(_) => ErrorCode::CredentialRejected,
        ProviderError::Unavailable(_) => ErrorCode::CredentialUnavailable,
        ProviderError::NotFound(_) => ErrorCode::NoCredentials,
    };
    Rejection::new(code, format!("registry {registry}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RegistryConfig, SecretRef};

    async fn broker() -> Broker {
        let config = CredentialConfig {
            registries: vec![RegistryConfig::Basic {
                host: "registry.example.com".into(),
                username: "svc".into(),
                password: SecretRef::value("pw-123"),
            }],
            ..Default::default()
        };
        Broker::from_config(&config).await.unwrap()
    }

    fn request(registry: &str, actions: &[&str]) -> TokenRequest {
        TokenRequest {
            registry: registry.into(),
            scope: Some(Scope {
                repository: "team/app".into(),
                actions: actions.iter().map(|a| a.to_string()).collect(),
            }),
            request_id: "r1".into(),
            credential_ref: String::new(),
        }
    }

    #[tokio::test]
    async fn exact_host_matching_only() {
        let broker = broker().await;
        let ok = broker
            .mint(
                &request("https://Registry.Example.com", &["pull"]),
                ScopePolicy::PullPush,
            )
            .await;
        assert_eq!(ok.unwrap().credential.unwrap().secret, "pw-123");
        for other in [
            "registry.example.com.attacker.net",
            "evil-registry.example.com",
            "example.com",
        ] {
            let err = broker
                .mint(&request(other, &["pull"]), ScopePolicy::PullPush)
                .await
                .unwrap_err();
            assert_eq!(err.code, ErrorCode::NoCredentials, "{other}");
            assert!(err.message.contains(other), "{err}");
        }
    }

    #[tokio::test]
    async fn refresh_is_pull_only_and_actions_are_checked() {
        let broker = broker().await;
        let push = request("registry.example.com", &["pull", "push"]);
        let err = broker.mint(&push, ScopePolicy::PullOnly).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Forbidden);
        assert!(broker.mint(&push, ScopePolicy::PullPush).await.is_ok());
        let odd = request("registry.example.com", &["delete"]);
        let err = broker.mint(&odd, ScopePolicy::PullPush).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::MalformedRequest);
        let none = request("registry.example.com", &[]);
        let scope = broker
            .mint(&none, ScopePolicy::PullOnly)
            .await
            .unwrap()
            .credential
            .unwrap()
            .scope
            .unwrap();
        assert_eq!(scope.actions, vec!["pull"]);
    }
}
