//! The static credential conventions of well-known registries.
//!
//! These registries accept a long-lived token as the HTTP Basic password and do the bearer
//! exchange with the client themselves; what differs is the username:
//! - GHCR and Docker Hub: the account name, with a personal access token;
//! - NGC: the literal `$oauthtoken`, with an API key;
//! - GAR: `_json_key` with a service-account key JSON, or `oauth2accesstoken` with an access token.

use super::StaticBasic;
use crate::config::RegistryConfig;

/// NGC's fixed username for API-key logins.
pub const NGC_USERNAME: &str = "$oauthtoken";
/// GAR's username for a service-account key JSON.
pub const GAR_JSON_KEY_USERNAME: &str = "_json_key";
/// GAR's username for an OAuth access token.
pub const GAR_ACCESS_TOKEN_USERNAME: &str = "oauth2accesstoken";

/// The static credential of a basic/GHCR/Docker Hub/NGC/GAR entry.
pub fn static_credential(entry: &RegistryConfig) -> anyhow::Result<StaticBasic> {
    let owner = format!("registry {}", entry.host());
    let credential = match entry {
        RegistryConfig::Basic {
            username, password, ..
        } => StaticBasic::new(username.clone(), password.resolve(&owner)?),
        RegistryConfig::Ghcr {
            username, token, ..
        }
        | RegistryConfig::DockerHub {
            username, token, ..
        } => StaticBasic::new(username.clone(), token.resolve(&owner)?),
        RegistryConfig::Ngc { api_key, .. } => {
            StaticBasic::new(NGC_USERNAME, api_key.resolve(&owner)?)
        }
        RegistryConfig::Gar {
            json_key,
            access_token,
            ..
        } => match (json_key, access_token) {
            (Some(key), None) => StaticBasic::new(GAR_JSON_KEY_USERNAME, key.resolve(&owner)?),
            (None, Some(token)) => {
                StaticBasic::new(GAR_ACCESS_TOKEN_USERNAME, token.resolve(&owner)?)
            }
            _ => anyhow::bail!("{owner}: a gar entry needs exactly one of json_key, access_token"),
        },
        RegistryConfig::Ecr(_)
        | RegistryConfig::Token(_)
        | RegistryConfig::Issuer(_)
        | RegistryConfig::Helper { .. } => {
            anyhow::bail!("{owner}: not a static provider")
        }
    };
    Ok(credential)
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;
    use crate::config::SecretRef;

    fn parse(toml_entry: &str) -> RegistryConfig {
        #[derive(serde::Deserialize)]
        struct One {
            registries: Vec<RegistryConfig>,
        }
        use figment::providers::Format;
        let one: One = figment::Figment::from(figment::providers::Toml::string(toml_entry))
            .extract()
            .unwrap();
        one.registries.into_iter().next().unwrap()
    }

    #[test]
    fn usernames_follow_each_registry_convention() {
        let cases = [
            (
                "provider = \"ngc\"\napi_key = { value = \"nvapi-k\" }",
                "nvcr.io",
                "$oauthtoken",
            ),
            (
                "provider = \"gar\"\nhost = \"us-docker.pkg.dev\"\njson_key = { value = \"{}\" }",
                "us-docker.pkg.dev",
                "_json_key",
            ),
            (
                "provider = \"gar\"\nhost = \"us-docker.pkg.dev\"\naccess_token = { value = \"ya29\" }",
                "us-docker.pkg.dev",
                "oauth2accesstoken",
            ),
            (
                "provider = \"ghcr\"\nusername = \"octocat\"\ntoken = { value = \"ghp_x\" }",
                "ghcr.io",
                "octocat",
            ),
            (
                "provider = \"docker_hub\"\nusername = \"me\"\ntoken = { value = \"dckr_pat_x\" }",
                "docker.io",
                "me",
            ),
        ];
        for (toml, host, username) in cases {
            let entry = parse(&format!("[[registries]]\n{toml}\n"));
            assert_eq!(entry.host(), host);
            let minted = static_credential(&entry).unwrap().mint();
            assert_eq!(minted.username, username, "{toml}");
            assert!(!minted.secret.expose_secret().is_empty());
        }
    }

    #[test]
    fn gar_needs_exactly_one_key() {
        let entry = RegistryConfig::Gar {
            host: "us-docker.pkg.dev".into(),
            json_key: Some(SecretRef::value("k")),
            access_token: Some(SecretRef::value("t")),
            share_long_term_secret: false,
        };
        let err = static_credential(&entry).unwrap_err().to_string();
        assert!(err.contains("exactly one"), "{err}");
    }
}
