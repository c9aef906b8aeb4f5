//! Credential providers: where a registry's credential comes from.
//!
//! A provider turns the long-term credential it holds into one a client can present for a scope.
//! Static providers hand out what they hold; the others make an upstream call (ECR, a token
//! endpoint, a credential helper process) or sign a token themselves (the issuer), whose results
//! the broker caches.

mod conventions;
mod docker_config;
mod ecr;
mod helper;
pub mod issuer;
mod static_basic;
mod token_auth;

use std::time::{Duration, SystemTime};

pub use docker_config::{DockerConfigError, load_docker_config};
pub use ecr::{EcrProvider, region_from_host};
pub use helper::CredentialHelper;
use imagemesh_proto::v1::{AuthScheme, Scope};
pub use issuer::Issuer;
use secrecy::SecretString;
pub use static_basic::StaticBasic;
pub use token_auth::{Challenge, TokenAuth};

use crate::config::{CredentialConfig, RegistryConfig};

/// A credential ready to hand out.
#[derive(Debug, Clone)]
pub struct Minted {
    pub scheme: AuthScheme,
    pub username: String,
    pub secret: SecretString,
    /// None = does not expire on its own.
    pub expires_at: Option<SystemTime>,
}

/// Why a provider could not produce a credential. Messages never hold a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The upstream refused the long-term credential.
    #[error("upstream rejected the credential: {0}")]
    Rejected(String),
    /// The upstream could not be reached or failed; worth retrying.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// The upstream has no credential for this registry (a credential helper said so).
    #[error("{0}")]
    NotFound(String),
}

/// A configured provider. The big ones are boxed: providers are built once and looked up often.
#[derive(Debug)]
pub enum Provider {
    Static(StaticBasic),
    Helper(CredentialHelper),
    Ecr(Box<EcrProvider>),
    Token(Box<TokenAuth>),
    Issuer(Box<Issuer>),
}

/// Settings every provider may need.
#[derive(Debug, Clone, Copy)]
pub struct ProviderSettings {
    pub upstream_timeout: Duration,
    pub helper_timeout: Duration,
    /// Tokens are reported as living at least this long, so none may be minted shorter.
    pub min_lifetime: Duration,
}

impl From<&CredentialConfig> for ProviderSettings {
    fn from(config: &CredentialConfig) -> Self {
        Self {
            upstream_timeout: config.upstream_timeout,
            helper_timeout: config.helper_timeout,
            min_lifetime: config.min_lifetime,
        }
    }
}

impl Provider {
    /// Builds the provider of one registry entry. Reads its secrets now, so a missing one stops
    /// the service at startup (naming where it was looked for, never its value).
    pub async fn from_config(
        entry: &RegistryConfig,
        settings: ProviderSettings,
    ) -> anyhow::Result<Provider> {
        Ok(match entry {
            RegistryConfig::Ecr(ecr) => {
                Provider::Ecr(Box::new(EcrProvider::new(ecr, settings).await?))
            }
            RegistryConfig::Token(token) => {
                Provider::Token(Box::new(TokenAuth::new(token, settings)?))
            }
            RegistryConfig::Issuer(issuer) => {
                Provider::Issuer(Box::new(Issuer::new(issuer, settings)?))
            }
            RegistryConfig::Helper { helper, host, .. } => Provider::Helper(CredentialHelper::new(
                helper,
                host,
                settings.helper_timeout,
            )?),
            other => Provider::Static(conventions::static_credential(other)?),
        })
    }

    /// A credential for `scope` on `registry`.
    pub async fn mint(&self, _registry: &str, scope: &Scope) -> Result<Minted, ProviderError> {
        match self {
            Provider::Static(provider) => Ok(provider.mint()),
            Provider::Helper(helper) => helper.get().await,
            Provider::Ecr(ecr) => ecr.authorization_token().await,
            Provider::Token(token) => token.mint(scope).await,
            Provider::Issuer(issuer) => issuer.mint(scope),
        }
    }

    /// True when what this provider hands out is the long-term secret it holds (a static
    /// password or access token, or whatever a credential helper answers), rather than a token
    /// minted from it. GAR's `access_token` is short-lived by nature (a sidecar keeps it fresh).
    pub fn hands_out_long_term_secret(&self) -> bool {
        match self {
            Provider::Static(provider) => {
                provider.username() != conventions::GAR_ACCESS_TOKEN_USERNAME
            }
            Provider::Helper(_) => true,
            Provider::Ecr(_) | Provider::Token(_) | Provider::Issuer(_) => false,
        }
    }

    /// The issuer, when the credential service is this registry's token issuer.
    pub fn issuer(&self) -> Option<&Issuer> {
        match self {
            Provider::Issuer(issuer) => Some(issuer),
            _ => None,
        }
    }

    /// True when minting is handing out what the provider holds (no upstream call to save).
    pub fn is_static(&self) -> bool {
        matches!(self, Provider::Static(_))
    }

    /// Which long-term credential this provider presents, without its secret: part of the cache
    /// key, so tokens minted with one credential are never served for another.
    pub fn identity(&self) -> String {
        match self {
            Provider::Static(provider) => format!("static:{}", provider.username()),
            Provider::Helper(helper) => format!("helper:{}", helper.name()),
            Provider::Ecr(ecr) => format!("ecr:{}", ecr.identity()),
            Provider::Token(token) => format!("token:{}", token.username()),
            Provider::Issuer(issuer) => format!("issuer:{}", issuer.identity()),
        }
    }

    /// What kind of provider this is, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Provider::Static(_) => "static",
            Provider::Helper(_) => "helper",
            Provider::Ecr(_) => "ecr",
            Provider::Token(_) => "token",
            Provider::Issuer(_) => "issuer",
        }
    }
}
