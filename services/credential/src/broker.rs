//! Matching a token request to a provider and shaping the answer.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use imagemesh_proto::v1::{RegistryCredential, Scope, TokenRequest, TokenResponse};
use imagemesh_registry::host;
use imagemesh_runtime::{ErrorCode, Rejection};
use secrecy::ExposeSecret;

use crate::config::{CredentialConfig, RegistryConfig};
use crate::providers::{self, Minted, Provider, ProviderError, StaticBasic};

/// Which scopes an endpoint may grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopePolicy {
    /// Pull and push (the scheduler's mint endpoint).
    PullPush,
    /// Pull only (the mounter's refresh endpoint).
    PullOnly,
}

const KNOWN_ACTIONS: &[&str] = &["pull", "push"];

/// Holds the providers, keyed by normalised registry host.
#[derive(Debug)]
pub struct Broker {
    providers: HashMap<String, Provider>,
    min_lifetime: Duration,
}

impl Broker {
    /// Builds every provider; fails on a secret that cannot be read (naming it, not its value).
    pub fn from_config(config: &CredentialConfig) -> anyhow::Result<Self> {
        let mut providers = HashMap::new();
        // Docker configs first, so explicit entries override them.
        for path in &config.docker_config {
            for (registry, credential) in providers::load_docker_config(path)? {
                providers.insert(registry, Provider::Static(credential));
            }
        }
        for entry in &config.registries {
            let registry = host::normalize(entry.host());
            anyhow::ensure!(!registry.is_empty(), "a registry entry has an empty host");
            providers.insert(registry, build_provider(entry)?);
        }
        tracing::info!(registries = ?providers.keys().collect::<Vec<_>>(), "credential providers ready");
        Ok(Self {
            providers,
            min_lifetime: config.min_lifetime,
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
        let provider = self.providers.get(&registry).ok_or_else(|| {
            Rejection::new(
                ErrorCode::NoCredentials,
                format!("no credentials configured for registry {registry}"),
            )
        })?;
        let minted = provider
            .mint(&registry, &scope)
            .await
            .map_err(|err| provider_rejection(&registry, err))?;
        tracing::debug!(
            registry,
            provider = provider.kind(),
            repository = scope.repository,
            "credential minted"
        );
        Ok(TokenResponse {
            credential: Some(self.credential(registry, scope, minted)),
            cached: false,
        })
    }

    fn credential(&self, registry: String, scope: Scope, minted: Minted) -> RegistryCredential {
        // An upstream expiry in the past or too near is reported as at least min_lifetime away,
        // so clients do not refresh in a loop (documented in docs/credentials.md).
        let floor = SystemTime::now() + self.min_lifetime;
        let expires_at = minted.expires_at.map(|t| t.max(floor));
        RegistryCredential {
            registry,
            scheme: minted.scheme as i32,
            username: minted.username,
            secret: minted.secret.expose_secret().to_string(),
            expires_at: expires_at.map(prost_types::Timestamp::from),
            scope: Some(scope),
        }
    }
}

fn build_provider(entry: &RegistryConfig) -> anyhow::Result<Provider> {
    Ok(match entry {
        RegistryConfig::Basic {
            host,
            username,
            password,
        } => Provider::Static(StaticBasic::new(
            username.clone(),
            password.resolve(&format!("registry {host}"))?,
        )),
    })
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
    };
    Rejection::new(code, format!("registry {registry}: {err}"))
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;
    use crate::config::SecretRef;

    fn broker() -> Broker {
        let config = CredentialConfig {
            registries: vec![RegistryConfig::Basic {
                host: "registry.example.com".into(),
                username: "svc".into(),
                password: SecretRef {
                    value: Some(SecretString::from("pw-123")),
                    ..Default::default()
                },
            }],
            ..Default::default()
        };
        Broker::from_config(&config).unwrap()
    }

    fn request(registry: &str, actions: &[&str]) -> TokenRequest {
        TokenRequest {
            registry: registry.into(),
            scope: Some(Scope {
                repository: "team/app".into(),
                actions: actions.iter().map(|a| a.to_string()).collect(),
            }),
            request_id: "r1".into(),
        }
    }

    #[tokio::test]
    async fn exact_host_matching_only() {
        let broker = broker();
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
        let broker = broker();
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
