//! Credential service configuration: which registries, where their long-term credentials come
//! from, and how minted tokens are cached. Secrets are referenced (`{ env = "VAR" }` or
//! `{ file = "path" }`) rather than written into the file; an inline `{ value = "..." }` is
//! accepted for local development. `docs/credentials.md` has an example of every provider.

mod named;
mod registry;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use imagemesh_runtime::app::ServiceConfig;
use imagemesh_runtime::nats::NatsConfig;
pub use named::{ANY_TENANT, NamedCredential};
pub use registry::{EcrConfig, IssuerConfig, RegistryConfig, TokenAuthConfig};
use serde::{Deserialize, Serialize};

pub use crate::secret::{SecretError, SecretRef};

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
    /// Registries with an explicitly configured provider. They win over docker config entries.
    pub registries: Vec<RegistryConfig>,
    /// Named credentials, used only when a token request names them (`credential_ref`): the
    /// per-image runtime secrets the scheduler resolves from the `imagemesh-image-secrets`
    /// bucket. Each is for its own `host` only, for the `tenants` it lists, and, with a
    /// `repository_prefix`, for the repositories under it.
    pub secrets: BTreeMap<String, NamedCredential>,
    /// Docker `config.json` files: `auths` entries, `credHelpers` and `credsStore` serve the
    /// registries they name (exact host match).
    pub docker_config: Vec<PathBuf>,
    /// Hand out the long-term credentials of `docker_config` entries (`auths`, helpers). Off by
    /// default, like `share_long_term_secret` of a registry entry.
    pub docker_config_share_long_term_secret: bool,
    /// The HTTP token endpoint for registries whose issuer this service is (`provider =
    /// "issuer"`): where tools that do the registry's challenge themselves (skopeo, buildah)
    /// exchange a one-time login for a token. Unset: not served.
    pub token_endpoint: Option<TokenEndpointConfig>,
    /// A minted token is never reported or cached as living shorter than this, so an upstream
    /// that hands out already-expired tokens (moto's ECR does) cannot cause a refresh storm.
    /// Must exceed `cache.margin`.
    #[serde(with = "humantime_serde")]
    pub min_lifetime: Duration,
    /// How long one upstream call (ECR, a token endpoint) may take.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// How long a `docker-credential-<name>` helper may take to answer.
    #[serde(with = "humantime_serde")]
    pub helper_timeout: Duration,
    pub cache: CacheConfig,
}

impl Default for CredentialConfig {
    fn default() -> Self {
        Self {
            registries: Vec::new(),
            secrets: BTreeMap::new(),
            docker_config: Vec::new(),
            docker_config_share_long_term_secret: false,
            token_endpoint: None,
            min_lifetime: Duration::from_secs(60),
            upstream_timeout: Duration::from_secs(10),
            helper_timeout: Duration::from_secs(10),
            cache: CacheConfig::default(),
        }
    }
}

/// The HTTP token endpoint: the `realm` of the registries this service issues tokens for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEndpointConfig {
    /// Address to listen on, e.g. `0.0.0.0:5001`. Plain HTTP: put TLS in front of it (an ingress
    /// or a sidecar) where the network between tools and this service is not trusted.
    pub listen: std::net::SocketAddr,
}

/// The token cache. Keys are (registry, repository, actions, credential identity).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// A cached token is handed out only while it has more than this left, so its holder has
    /// time to use it.
    #[serde(with = "humantime_serde")]
    pub margin: Duration,
    /// A request that finds a token within this of its margin gets it and starts one background
    /// refresh (never earlier than half-way through the token's usable life).
    #[serde(with = "humantime_serde")]
    pub refresh_ahead: Duration,
    /// How long a credential without an expiry of its own (from a credential helper) is reused
    /// before the helper is asked again.
    #[serde(with = "humantime_serde")]
    pub no_expiry_ttl: Duration,
    /// Past this many keys, expired entries are swept on insert.
    pub max_entries: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            margin: Duration::from_secs(10),
            refresh_ahead: Duration::from_secs(60),
            no_expiry_ttl: Duration::from_secs(300),
            max_entries: 10_000,
        }
    }
}

impl CredentialConfig {
    /// Rejects settings under which a fresh token would already be stale (a refresh loop).
    pub fn validate(&self) -> anyhow::Result<()> {
        let margin = self.cache.margin;
        anyhow::ensure!(
            self.min_lifetime > margin,
            "credential.min_lifetime ({:?}) must exceed credential.cache.margin ({margin:?})",
            self.min_lifetime
        );
        anyhow::ensure!(
            self.cache.no_expiry_ttl > margin,
            "credential.cache.no_expiry_ttl ({:?}) must exceed credential.cache.margin ({margin:?})",
            self.cache.no_expiry_ttl
        );
        for (name, secret) in &self.secrets {
            secret.validate(name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_provider_parses_from_toml() {
        let text = r#"
            [credential]
            min_lifetime = "90s"
            docker_config = ["/etc/imagemesh/docker.json"]
            [credential.cache]
            margin = "5s"
            [[credential.registries]]
            provider = "basic"
            host = "registry.example.com"
            username = "svc"
            password = { env = "PW" }
            [[credential.registries]]
            provider = "ecr"
            host = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
            [[credential.registries]]
            provider = "token"
            host = "registry.example.org"
            username = "svc"
            password = { file = "/run/secrets/pw" }
            [[credential.registries]]
            provider = "ghcr"
            username = "octocat"
            token = { env = "GHCR_TOKEN" }
            [[credential.registries]]
            provider = "docker_hub"
            username = "me"
            token = { env = "HUB_TOKEN" }
            [[credential.registries]]
            provider = "ngc"
            api_key = { env = "NGC_API_KEY" }
            [[credential.registries]]
            provider = "gar"
            host = "europe-west1-docker.pkg.dev"
            json_key = { file = "/run/secrets/gar.json" }
            [[credential.registries]]
            provider = "helper"
            host = "registry.example.net"
            helper = "pass"
            [[credential.registries]]
            provider = "issuer"
            host = "build.registry.internal:5000"
            service = "build-registry"
            issuer = "imagemesh-credential"
            signing_key = { file = "/run/secrets/issuer/key.pem" }
            certificate = "/run/secrets/issuer/cert.pem"
            previous = ["/run/secrets/issuer/old-cert.pem"]
            lifetime = "10m"
            [credential.secrets.team-hub]
            tenants = ["team-a"]
            repository_prefix = "team/app"
            provider = "basic"
            host = "registry.team.example"
            username = "team-user"
            password = { env = "TEAM_PW" }
            [credential.secrets.shared]
            tenants = ["*"]
            provider = "helper"
            host = "registry.example.net"
            helper = "pass"
        "#;
        let config: Config = imagemesh_runtime::config::load_from(
            Some(&write_temp(text)),
            [(
                "IMAGEMESH_CREDENTIAL__UPSTREAM_TIMEOUT".to_string(),
                "3s".to_string(),
            )],
        )
        .unwrap();
        let c = config.credential;
        assert_eq!(c.min_lifetime, Duration::from_secs(90));
        assert_eq!(c.upstream_timeout, Duration::from_secs(3));
        assert_eq!(c.cache.margin, Duration::from_secs(5));
        let hosts: Vec<_> = c.registries.iter().map(|r| r.host()).collect();
        assert_eq!(
            hosts,
            [
                "registry.example.com",
                "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
                "registry.example.org",
                "ghcr.io",
                "docker.io",
                "nvcr.io",
                "europe-west1-docker.pkg.dev",
                "registry.example.net",
                "build.registry.internal:5000"
            ]
        );
        let RegistryConfig::Issuer(issuer) = &c.registries[8] else {
            panic!("an issuer entry");
        };
        assert_eq!(issuer.lifetime, Duration::from_secs(600));
        assert_eq!(issuer.subject, "imagemesh");
        let hub = &c.secrets["team-hub"];
        assert_eq!(hub.tenants, ["team-a"]);
        assert_eq!(hub.repository_prefix.as_deref(), Some("team/app"));
        assert_eq!(hub.registry.host(), "registry.team.example");
        assert_eq!(c.secrets["shared"].tenants, [ANY_TENANT]);
        c.validate().unwrap();
    }

    #[test]
    fn a_named_credential_must_say_which_tenants_may_use_it() {
        let load = |binding: &str| {
            let text = format!(
                "[credential.secrets.hub]\n{binding}provider = \"helper\"\nhost = \"r.example\"\nhelper = \"pass\"\n"
            );
            imagemesh_runtime::config::load_from::<Config, _>(Some(&write_temp(&text)), Vec::new())
                .map_err(|e| e.to_string())
                .and_then(|c| c.credential.validate().map_err(|e| e.to_string()))
        };
        let missing = load("").unwrap_err();
        assert!(missing.contains("tenants"), "{missing}");
        let empty = load("tenants = []\n").unwrap_err();
        assert!(empty.contains("tenants is empty"), "{empty}");
        let typo = load("tenants = [\"a\"]\nrepository_prefx = \"x\"\n").unwrap_err();
        assert!(typo.contains("repository_prefx"), "{typo}");
        load("tenants = [\"a\"]\n").unwrap();
    }

    #[test]
    fn a_margin_longer_than_the_minimum_lifetime_is_refused() {
        let config = CredentialConfig {
            min_lifetime: Duration::from_secs(5),
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("min_lifetime"), "{err}");
    }

    fn write_temp(text: &str) -> PathBuf {
        let dir = tempfile::tempdir().unwrap().keep();
        let path = dir.join("credential.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

#[cfg(test)]
mod sample_tests {
    /// The sample in deploy/config stays loadable as the configuration changes.
    #[test]
    fn the_deploy_sample_loads() {
        imagemesh_runtime::config::load_deploy_sample::<super::Config>("credential").unwrap();
    }
}
