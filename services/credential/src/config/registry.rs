//! One registry and the provider of its credentials, tagged by `provider`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secret::SecretRef;

/// A registry entry. Hosts are matched exactly after normalisation (scheme and path dropped,
/// lowercased, Docker Hub aliases mapped to `docker.io`; the port is significant).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "snake_case", deny_unknown_fields)]
pub enum RegistryConfig {
    /// A static username and password or token, sent as HTTP Basic (htpasswd registries, and
    /// any registry whose clients do the token exchange themselves).
    Basic {
        host: String,
        username: String,
        password: SecretRef,
        /// Hand this long-term secret out (to builders, mounters, runtime requests). Off by
        /// default: the secret then never leaves the credential service, and requests for this
        /// registry are refused with FORBIDDEN.
        #[serde(default)]
        share_long_term_secret: bool,
    },
    /// GitHub Container Registry: a GitHub username and a personal access token
    /// (`read:packages`, plus `write:packages` to push).
    Ghcr {
        #[serde(default = "ghcr_host")]
        host: String,
        username: String,
        token: SecretRef,
        /// Hand this long-term secret out (to builders, mounters, runtime requests). Off by
        /// default: the secret then never leaves the credential service, and requests for this
        /// registry are refused with FORBIDDEN.
        #[serde(default)]
        share_long_term_secret: bool,
    },
    /// Docker Hub: a Docker ID and a personal access token.
    DockerHub {
        #[serde(default = "docker_hub_host")]
        host: String,
        username: String,
        token: SecretRef,
        /// Hand this long-term secret out (to builders, mounters, runtime requests). Off by
        /// default: the secret then never leaves the credential service, and requests for this
        /// registry are refused with FORBIDDEN.
        #[serde(default)]
        share_long_term_secret: bool,
    },
    /// NVIDIA NGC: an API key; the username is always `$oauthtoken`.
    Ngc {
        #[serde(default = "ngc_host")]
        host: String,
        api_key: SecretRef,
        /// Hand this long-term secret out (to builders, mounters, runtime requests). Off by
        /// default: the secret then never leaves the credential service, and requests for this
        /// registry are refused with FORBIDDEN.
        #[serde(default)]
        share_long_term_secret: bool,
    },
    /// Google Artifact Registry (`<location>-docker.pkg.dev`): a service-account key
    /// (username `_json_key`) or an OAuth access token (username `oauth2accesstoken`).
    Gar {
        host: String,
        /// The service-account key JSON (usually `{ file = ".../key.json" }`).
        #[serde(default)]
        json_key: Option<SecretRef>,
        /// Or: a short-lived OAuth access token, e.g. kept fresh in a file by a sidecar.
        #[serde(default)]
        access_token: Option<SecretRef>,
        /// Hand this long-term secret out (to builders, mounters, runtime requests). Off by
        /// default: the secret then never leaves the credential service, and requests for this
        /// registry are refused with FORBIDDEN.
        #[serde(default)]
        share_long_term_secret: bool,
    },
    /// AWS ECR: `GetAuthorizationToken` with static keys or the default AWS credential chain.
    Ecr(EcrConfig),
    /// Distribution token auth: the long-term credential is exchanged at the registry's token
    /// endpoint for a short-lived bearer token scoped to the repository and actions asked for.
    Token(TokenAuthConfig),
    /// A `docker-credential-<helper>` executable on PATH, asked with the `get` protocol.
    Helper {
        host: String,
        helper: String,
        /// What a helper answers may be a long-term secret: handed out only with this set.
        #[serde(default)]
        share_long_term_secret: bool,
    },
    /// The credential service is the registry's token issuer: it signs bearer tokens for exactly
    /// the repository and actions asked, with a key whose certificate the registry trusts.
    Issuer(IssuerConfig),
}

/// An ECR registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EcrConfig {
    /// `<account>.dkr.ecr.<region>.amazonaws.com` (also `ecr-fips` and `.amazonaws.com.cn`).
    pub host: String,
    /// AWS region; taken from the host when unset.
    #[serde(default)]
    pub region: Option<String>,
    /// Static access key id. With `secret_access_key`; without both the default AWS credential
    /// chain (environment, profile, web identity, ECS, IMDS) is used.
    #[serde(default)]
    pub access_key_id: Option<SecretRef>,
    #[serde(default)]
    pub secret_access_key: Option<SecretRef>,
    /// Session token of temporary static keys.
    #[serde(default)]
    pub session_token: Option<SecretRef>,
    /// ECR API endpoint override (a VPC endpoint; `moto_server` in tests).
    #[serde(default)]
    pub endpoint_url: Option<String>,
}

/// A registry with distribution token authentication.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenAuthConfig {
    pub host: String,
    pub username: String,
    pub password: SecretRef,
    /// Token endpoint. Unset: discovered from the registry's `WWW-Authenticate` challenge on
    /// `GET /v2/`. Setting it pins where the long-term credential may be sent.
    #[serde(default)]
    pub realm: Option<String>,
    /// The `service` parameter; with `realm`, otherwise taken from the challenge.
    #[serde(default)]
    pub service: Option<String>,
    /// Speak plain HTTP to the registry and its realm (loopback registries always do).
    #[serde(default)]
    pub insecure: bool,
}

/// A registry (distribution `auth.token`, Harbor, zot) that trusts tokens this service signs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    pub host: String,
    /// The token audience (`aud`): the registry's `auth.token.service`.
    pub service: String,
    /// The token issuer (`iss`): the registry's `auth.token.issuer`.
    pub issuer: String,
    /// The PKCS#8 PEM P-256 private key that signs tokens (`{ file = ".." }` or `{ env = ".." }`).
    pub signing_key: SecretRef,
    /// The PEM certificate of `signing_key`; the registry's `rootcertbundle` must contain it.
    pub certificate: PathBuf,
    /// Certificates of earlier signing keys the registry still accepts during a rotation. This
    /// service only signs with `signing_key`; these are read and checked at startup, and belong
    /// in the registry's bundle until the last token they signed has expired.
    #[serde(default)]
    pub previous: Vec<PathBuf>,
    /// How long a minted token lives. Must exceed `credential.min_lifetime`.
    #[serde(default = "issuer_lifetime", with = "humantime_serde")]
    pub lifetime: Duration,
    /// The token subject (`sub`): who the registry logs as acting.
    #[serde(default = "issuer_subject")]
    pub subject: String,
    /// How long a one-time login for the HTTP token endpoint (`credential.token_endpoint`)
    /// stays redeemable. It is good for one exchange; this bounds a login never used.
    #[serde(default = "login_lifetime", with = "humantime_serde")]
    pub login_lifetime: Duration,
}

fn issuer_lifetime() -> Duration {
    Duration::from_secs(300)
}

fn login_lifetime() -> Duration {
    Duration::from_secs(120)
}

fn issuer_subject() -> String {
    "imagemesh".into()
}

fn ghcr_host() -> String {
    "ghcr.io".into()
}

fn docker_hub_host() -> String {
    "docker.io".into()
}

fn ngc_host() -> String {
    "nvcr.io".into()
}

impl RegistryConfig {
    /// The registry host this entry serves, as written.
    pub fn host(&self) -> &str {
        match self {
            RegistryConfig::Basic { host, .. }
            | RegistryConfig::Ghcr { host, .. }
            | RegistryConfig::DockerHub { host, .. }
            | RegistryConfig::Ngc { host, .. }
            | RegistryConfig::Gar { host, .. }
            | RegistryConfig::Helper { host, .. } => host,
            RegistryConfig::Ecr(ecr) => &ecr.host,
            RegistryConfig::Token(token) => &token.host,
            RegistryConfig::Issuer(issuer) => &issuer.host,
        }
    }

    /// True when the entry opts in to handing out its long-term secret. Providers that hand
    /// out only short-lived tokens (ECR, token auth, the issuer) never need it.
    pub fn shares_long_term_secret(&self) -> bool {
        match self {
            RegistryConfig::Basic {
                share_long_term_secret,
                ..
            }
            | RegistryConfig::Ghcr {
                share_long_term_secret,
                ..
            }
            | RegistryConfig::DockerHub {
                share_long_term_secret,
                ..
            }
            | RegistryConfig::Ngc {
                share_long_term_secret,
                ..
            }
            | RegistryConfig::Gar {
                share_long_term_secret,
                ..
            }
            | RegistryConfig::Helper {
                share_long_term_secret,
                ..
            } => *share_long_term_secret,
            RegistryConfig::Ecr(_) | RegistryConfig::Token(_) | RegistryConfig::Issuer(_) => false,
        }
    }
}
