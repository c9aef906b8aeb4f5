//! Matching a token request to a provider, through the token cache, and shaping the answer.

use std::collections::HashMap;
use std::sync::Arc;

use futures::FutureExt;
use imagemesh_proto::v1::{AuthScheme, RegistryCredential, Scope, TokenRequest, TokenResponse};
use imagemesh_registry::host;
use imagemesh_runtime::{ErrorCode, Rejection};
use secrecy::ExposeSecret;

use crate::cache::{CacheKey, CacheSettings, TokenCache};
use crate::config::{CredentialConfig, NamedCredential};
use crate::providers::issuer::login::LOGIN_USERNAME;
use crate::providers::{self, Issuer, Minted, Provider, ProviderError, ProviderSettings};

/// Which scopes an endpoint may grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopePolicy {
    /// Pull and push (the scheduler's mint endpoint).
    PullPush,
    /// Pull only (the mounter's refresh endpoint).
    PullOnly,
}

const KNOWN_ACTIONS: &[&str] = &["pull", "push"];

/// A named credential, ready to use.
struct Named {
    /// Normalised: the one registry it serves.
    registry: String,
    provider: Arc<Provider>,
    /// Which tenants and repositories may use it.
    binding: NamedCredential,
}

/// A registry's provider and whether its long-term secret may leave this service.
struct Source {
    provider: Arc<Provider>,
    shares_long_term_secret: bool,
}

/// Holds the providers, keyed by normalised registry host, and the token cache.
pub struct Broker {
    providers: HashMap<String, Source>,
    /// Named credentials: name -> (normalised registry, provider).
    named: HashMap<String, Named>,
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
                let source = Source {
                    provider: Arc::new(provider),
                    shares_long_term_secret: config.docker_config_share_long_term_secret,
                };
                providers.insert(registry, source);
            }
        }
        for entry in &config.registries {
            let registry = host::normalize(entry.host());
            anyhow::ensure!(!registry.is_empty(), "a registry entry has an empty host");
            let source = Source {
                provider: Arc::new(Provider::from_config(entry, settings).await?),
                shares_long_term_secret: entry.shares_long_term_secret(),
            };
            providers.insert(registry, source);
        }
        let mut named = HashMap::new();
        for (name, entry) in &config.secrets {
            let registry = host::normalize(entry.registry.host());
            anyhow::ensure!(!registry.is_empty(), "credential {name} has an empty host");
            let provider = Arc::new(Provider::from_config(&entry.registry, settings).await?);
            let binding = entry.clone();
            let named_entry = Named {
                registry,
                provider,
                binding,
            };
            named.insert(name.clone(), named_entry);
        }
        let kinds: Vec<String> = providers
            .iter()
            .map(|(registry, source)| format!("{registry} ({})", source.provider.kind()))
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
        let (provider, shares_long_term_secret) = self.provider_for(&registry, request, &scope)?;
        if request.login {
            // Mounters get pull tokens; a login is for operators' and builders' tools.
            if policy == ScopePolicy::PullOnly {
                return Err(Rejection::new(
                    ErrorCode::Forbidden,
                    "logins are handed out on the mint endpoint only",
                ));
            }
            return login(&registry, &provider, scope);
        }
        let long_term = provider.hands_out_long_term_secret();
        if long_term && !shares_long_term_secret {
            return Err(Rejection::new(
                ErrorCode::Forbidden,
                format!(
                    "registry {registry} is configured with a long-term secret ({} provider), \
                     which is handed out only when its entry sets share_long_term_secret = true; \
                     prefer a provider that mints short-lived tokens",
                    provider.kind()
                ),
            ));
        }
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
        let mut credential = credential(registry, scope, minted);
        credential.long_term = long_term;
        credential.credential_ref = request.credential_ref.clone();
        Ok(TokenResponse {
            credential: Some(credential),
            cached,
        })
    }

    /// The issuer whose signature a login carries, found by the registry the login names.
    pub fn login_issuer(&self, registry: &str) -> Option<&Issuer> {
        self.providers.get(registry)?.provider.issuer()
    }
}

/// A one-time login for the HTTP token endpoint instead of a token.
fn login(registry: &str, provider: &Provider, scope: Scope) -> Result<TokenResponse, Rejection> {
    let issuer = provider.issuer().ok_or_else(|| {
        Rejection::new(
            ErrorCode::MalformedRequest,
            format!(
                "registry {registry} does not take tokens from this service ({} provider): \
                 logins are only for issuer registries",
                provider.kind()
            ),
        )
    })?;
    let (secret, expires) = issuer
        .login(registry, &scope.repository, &scope.actions)
        .map_err(|_| Rejection::new(ErrorCode::CredentialUnavailable, "signing a login failed"))?;
    tracing::info!(
        registry,
        repository = scope.repository,
        actions = ?scope.actions,
        "one-time login handed out"
    );
    let minted = Minted {
        scheme: AuthScheme::Basic,
        username: LOGIN_USERNAME.to_string(),
        secret: secrecy::SecretString::from(secret),
        expires_at: Some(expires),
    };
    Ok(TokenResponse {
        credential: Some(credential(registry.to_string(), scope, minted)),
        cached: false,
    })
}

impl Broker {
    /// The registry's default provider, or the named credential when the request names one
    /// (which must be for this exact registry, bound to the request's tenant and, when it has a
    /// prefix, cover the repository: a name never unlocks another registry, another tenant's
    /// credential or another repository).
    fn provider_for(
        &self,
        registry: &str,
        request: &TokenRequest,
        scope: &Scope,
    ) -> Result<(Arc<Provider>, bool), Rejection> {
        let name = request.credential_ref.as_str();
        if name.is_empty() {
            return self
                .providers
                .get(registry)
                .map(|source| (source.provider.clone(), source.shares_long_term_secret))
                .ok_or_else(|| {
                    Rejection::new(
                        ErrorCode::NoCredentials,
                        format!("no credentials configured for registry {registry}"),
                    )
                });
        }
        // Only the scheduler reaches the mint endpoint, and it takes the tenant from the intake
        // subject; a request without one cannot be matched to a binding.
        imagemesh_proto::validate_tenant(&request.tenant)
            .map_err(|e| Rejection::new(ErrorCode::MalformedRequest, e.to_string()))?;
        let named = self.named.get(name).ok_or_else(|| {
            Rejection::new(
                ErrorCode::NoCredentials,
                format!("no credential named {name:?}"),
            )
        })?;
        if named.registry != registry {
            return Err(Rejection::new(
                ErrorCode::Forbidden,
                format!("credential {name:?} is not for registry {registry}"),
            ));
        }
        named
            .binding
            .check(name, &request.tenant, &scope.repository)?;
        let shares = named.binding.registry.shares_long_term_secret();
        Ok((named.provider.clone(), shares))
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
        long_term: false,
        credential_ref: String::new(),
    }
}

/// Validates the actions and applies the endpoint's policy. Empty actions mean pull.
fn checked_scope(mut scope: Scope, policy: ScopePolicy) -> Result<Scope, Rejection> {
    // The name ends up in a token scope (`repository:<name>:<actions>`): only a valid name, so
    // it can never widen the scope.
    imagemesh_registry::repository::validate_name(&scope.repository)
        .map_err(|e| Rejection::new(ErrorCode::MalformedRequest, e.to_string()))?;
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
        let team_hub = NamedCredential {
            tenants: vec!["team-a".into()],
            repository_prefix: Some("team/app".into()),
            registry: RegistryConfig::Basic {
                host: "registry.team.example".into(),
                username: "team-user".into(),
                password: SecretRef::value("team-pw"),
                share_long_term_secret: true,
            },
        };
        let config = CredentialConfig {
            registries: vec![
                RegistryConfig::Basic {
                    host: "registry.example.com".into(),
                    username: "svc".into(),
                    password: SecretRef::value("pw-123"),
                    share_long_term_secret: true,
                },
                RegistryConfig::Basic {
                    host: "private.example.com".into(),
                    username: "svc".into(),
                    password: SecretRef::value("pw-private"),
                    share_long_term_secret: false,
                },
            ],
            secrets: [("team-hub".to_string(), team_hub)].into(),
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
            tenant: "team-a".into(),
            login: false,
        }
    }

    #[tokio::test]
    async fn a_long_term_secret_is_handed_out_only_where_its_entry_opts_in() {
        let broker = broker().await;
        let shared = broker
            .mint(
                &request("registry.example.com", &["pull"]),
                ScopePolicy::PullOnly,
            )
            .await
            .unwrap()
            .credential
            .unwrap();
        assert!(shared.long_term);
        for policy in [ScopePolicy::PullOnly, ScopePolicy::PullPush] {
            let err = broker
                .mint(&request("private.example.com", &["pull"]), policy)
                .await
                .unwrap_err();
            assert_eq!(err.code, ErrorCode::Forbidden, "{err}");
            assert!(err.message.contains("share_long_term_secret"), "{err}");
            assert!(!err.message.contains("pw-private"), "{err}");
        }
        // A login exists only for registries whose issuer this service is.
        let mut login = request("registry.example.com", &["pull"]);
        login.login = true;
        let err = broker
            .mint(&login, ScopePolicy::PullPush)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::MalformedRequest, "{err}");
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

    #[tokio::test]
    async fn a_named_credential_serves_its_tenants_registry_and_repositories_only() {
        let broker = broker().await;
        let named = |tenant: &str, registry: &str, repository: &str| {
            let mut request = request(registry, &["pull"]);
            request.credential_ref = "team-hub".into();
            request.tenant = tenant.into();
            request.scope.as_mut().unwrap().repository = repository.into();
            request
        };
        let policy = ScopePolicy::PullPush;
        let ok = broker
            .mint(
                &named("team-a", "registry.team.example", "team/app/web"),
                policy,
            )
            .await
            .unwrap();
        let ok = ok.credential.unwrap();
        assert_eq!(ok.username, "team-user");
        assert_eq!(ok.credential_ref, "team-hub", "a refresh can name it again");
        let pull = named("team-a", "registry.team.example", "team/app/web");
        let refreshed = broker.mint(&pull, ScopePolicy::PullOnly).await.unwrap();
        let refreshed = refreshed.credential.unwrap();
        assert_eq!(
            (
                refreshed.username.as_str(),
                refreshed.credential_ref.as_str()
            ),
            ("team-user", "team-hub"),
            "the refresh endpoint serves the same named credential"
        );
        for (request, says) in [
            (
                named("team-b", "registry.team.example", "team/app"),
                "not for tenant",
            ),
            (
                named("team-a", "registry.team.example", "other/app"),
                "not for repository",
            ),
            (
                named("team-a", "registry.example.com", "team/app"),
                "not for registry",
            ),
        ] {
            let err = broker.mint(&request, policy).await.unwrap_err();
            assert_eq!(err.code, ErrorCode::Forbidden, "{err}");
            assert!(err.message.contains(says), "{err}");
        }
        let no_tenant = named("", "registry.team.example", "team/app");
        let err = broker.mint(&no_tenant, policy).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::MalformedRequest);
        // The registry's default credential is not bound to tenants.
        let default = request("registry.example.com", &["pull"]);
        assert!(broker.mint(&default, policy).await.is_ok());
    }
}
