//! Credential providers: where a registry's credential comes from.
//!
//! A provider turns the long-term credential it holds into one a client can present for a scope.
//! Static providers hand out what they hold; token-minting providers exchange it upstream.

mod docker_config;
mod static_basic;

use std::time::SystemTime;

pub use docker_config::load_docker_config;
use imagemesh_proto::v1::{AuthScheme, Scope};
use secrecy::SecretString;
pub use static_basic::StaticBasic;

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
}

/// A configured provider.
#[derive(Debug)]
pub enum Provider {
    Static(StaticBasic),
}

impl Provider {
    /// A credential for `scope` on `registry`.
    pub async fn mint(&self, _registry: &str, _scope: &Scope) -> Result<Minted, ProviderError> {
        match self {
            Provider::Static(provider) => Ok(provider.mint()),
        }
    }

    /// What kind of provider this is, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Provider::Static(_) => "static",
        }
    }
}
