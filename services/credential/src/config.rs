//! Credential service configuration: which registries, and where their long-term credentials
//! come from. Secrets are referenced (`{ env = "VAR" }` or `{ file = "path" }`) rather than
//! written into the file; an inline `{ value = "..." }` is accepted for local development.

use std::path::PathBuf;
use std::time::Duration;

use imagemesh_runtime::app::ServiceConfig;
use imagemesh_runtime::nats::NatsConfig;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// The whole configuration file of the credential service.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub credential: CredentialConfig,
}

impl ServiceConfig for Config {
    fn nats(&self) -> &NatsConfig {
        &self.nats
    }
}

/// What the credential service holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CredentialConfig {
    /// Registries with an explicitly configured provider. Matched first.
    pub registries: Vec<RegistryConfig>,
    /// Docker `config.json` files whose `auths` entries serve registries not listed above.
    pub docker_config: Vec<PathBuf>,
    /// A minted credential is never reported as living shorter than this, so an upstream that
    /// hands out already-expired tokens (moto's ECR does) cannot cause a refresh storm.
    #[serde(with = "humantime_serde")]
    pub min_lifetime: Duration,
}

impl Default for CredentialConfig {
    fn default() -> Self {
        Self {
            registries: Vec::new(),
            docker_config: Vec::new(),
            min_lifetime: Duration::from_secs(60),
        }
    }
}

/// One registry and the provider of its credentials, tagged by `provider`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "snake_case", deny_unknown_fields)]
pub enum RegistryConfig {
    /// A static username and password or token (htpasswd registries, GHCR/Docker Hub/NGC/GAR
    /// access tokens), sent as HTTP Basic.
    Basic {
        host: String,
        username: String,
        password: SecretRef,
    },
}

impl RegistryConfig {
    /// The registry host this entry serves.
    pub fn host(&self) -> &str {
        match self {
            RegistryConfig::Basic { host, .. } => host,
        }
    }
}

/// Where a secret comes from. Exactly one field must be set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretRef {
    /// Name of an environment variable holding the secret.
    pub env: Option<String>,
    /// Path of a file holding the secret (trailing newline ignored).
    pub file: Option<PathBuf>,
    /// The secret itself (development only). Never serialized back out.
    #[serde(skip_serializing)]
    pub value: Option<SecretString>,
}

/// Why a secret could not be read. Names where it was looked for, never its value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret for {0}: set exactly one of env, file, value")]
    Ambiguous(String),
    #[error("secret for {owner}: environment variable {var} is not set")]
    MissingEnv { owner: String, var: String },
    #[error("secret for {owner}: cannot read {path}: {source}")]
    File {
        owner: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SecretRef {
    /// Reads the secret. `owner` names what it is for, in errors.
    pub fn resolve(&self, owner: &str) -> Result<SecretString, SecretError> {
        match (&self.env, &self.file, &self.value) {
            (Some(var), None, None) => {
                std::env::var(var)
                    .map(SecretString::from)
                    .map_err(|_| SecretError::MissingEnv {
                        owner: owner.into(),
                        var: var.clone(),
                    })
            }
            (None, Some(path), None) => std::fs::read_to_string(path)
                .map(|s| SecretString::from(s.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|source| SecretError::File {
                    owner: owner.into(),
                    path: path.clone(),
                    source,
                }),
            (None, None, Some(value)) => Ok(value.clone()),
            _ => Err(SecretError::Ambiguous(owner.into())),
        }
    }
}
