//! Distribution token authentication.
//!
//! The registry answers `GET /v2/` with `401` and `WWW-Authenticate: Bearer realm=..,service=..`.
//! We send the long-term credential (HTTP Basic) to the realm with `service` and
//! `scope=repository:<name>:<actions>` and get back `{token | access_token, expires_in}`: a
//! bearer token for exactly that scope, living `expires_in` seconds (60 when absent, per the
//! distribution token spec). The challenge is discovered once and again after a failure.

mod challenge;

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

pub use challenge::Challenge;
use imagemesh_proto::v1::{AuthScheme, Scope};
use imagemesh_registry::host;
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{Minted, ProviderError, ProviderSettings};
use crate::config::TokenAuthConfig;

/// The lifetime of a token whose answer has no `expires_in` (distribution token spec).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// Exchanges one long-term credential for scoped bearer tokens.
#[derive(Debug)]
pub struct TokenAuth {
    registry: String,
    username: String,
    password: SecretString,
    /// `http(s)://<host>`: where `/v2/` is asked for the challenge.
    base: Url,
    /// Configured `insecure`: plain HTTP to the registry and to any realm.
    insecure: bool,
    pinned: Option<Challenge>,
    discovered: Mutex<Option<Challenge>>,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct TokenAnswer {
    token: Option<SecretString>,
    access_token: Option<SecretString>,
    expires_in: Option<u64>,
}

impl TokenAuth {
    pub fn new(config: &TokenAuthConfig, settings: ProviderSettings) -> anyhow::Result<Self> {
        let registry = host::normalize(&config.host);
        let owner = format!("registry {registry}");
        let plain_http = config.insecure || host::is_loopback(&registry);
        let scheme = if plain_http { "http" } else { "https" };
        let base = Url::parse(&format!("{scheme}://{registry}"))
            .map_err(|e| anyhow::anyhow!("{owner}: not a usable host: {e}"))?;
        let pinned = match (&config.realm, &config.service) {
            (Some(realm), service) => Some(Challenge {
                realm: Url::parse(realm)
                    .map_err(|e| anyhow::anyhow!("{owner}: realm is not a URL: {e}"))?,
                service: service.clone(),
            }),
            (None, Some(_)) => anyhow::bail!("{owner}: service is set without realm"),
            (None, None) => None,
        };
        let http = reqwest::Client::builder()
            .timeout(settings.upstream_timeout)
            // The long-term credential goes to the realm and nowhere else.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let auth = Self {
            password: config.password.resolve(&owner)?,
            username: config.username.clone(),
            registry,
            base,
            insecure: config.insecure,
            pinned,
            discovered: Mutex::new(None),
            http,
        };
        if let Some(challenge) = &auth.pinned {
            auth.check_realm(challenge)
                .map_err(|e| anyhow::anyhow!("{owner}: {e}"))?;
        }
        Ok(auth)
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    /// A bearer token for `scope`.
    pub async fn mint(&self, scope: &Scope) -> Result<Minted, ProviderError> {
        let (challenge, discovered) = self.challenge().await?;
        let result = self.fetch_token(&challenge, scope).await;
        if result.is_err() && discovered {
            // The registry may have moved its token endpoint: look again next time.
            *self.discovered.lock().expect("challenge lock") = None;
        }
        result
    }

    /// The pinned challenge, or the registry's (discovered now or earlier).
    async fn challenge(&self) -> Result<(Challenge, bool), ProviderError> {
        if let Some(pinned) = &self.pinned {
            return Ok((pinned.clone(), false));
        }
        if let Some(known) = self.discovered.lock().expect("challenge lock").clone() {
            return Ok((known, true));
        }
        let challenge = self.discover().await?;
        self.check_realm(&challenge)?;
        *self.discovered.lock().expect("challenge lock") = Some(challenge.clone());
        Ok((challenge, true))
    }

    async fn discover(&self) -> Result<Challenge, ProviderError> {
        let url = self.base.join("/v2/").expect("static path");
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| unavailable(&self.registry, e))?;
        let status = response.status();
        let header = response
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if status != StatusCode::UNAUTHORIZED {
            return Err(ProviderError::Unavailable(format!(
                "registry {} answered GET /v2/ with {status}, not a token challenge",
                self.registry
            )));
        }
        Challenge::parse(header).ok_or_else(|| {
            ProviderError::Unavailable(format!(
                "registry {} does not use token authentication (its challenge is not Bearer with \
                 a realm); configure it with provider = \"basic\"",
                self.registry
            ))
        })
    }

    /// Refuses to send the long-term credential over plain HTTP, except to a loopback realm or
    /// for a registry configured `insecure`: a challenge must not be able to lure it off-host
    /// in clear text.
    fn check_realm(&self, challenge: &Challenge) -> Result<(), ProviderError> {
        let realm = &challenge.realm;
        let secure = realm.scheme() == "https";
        let loopback = realm.host_str().is_some_and(host::is_loopback);
        let plain_ok = realm.scheme() == "http" && (self.insecure || loopback);
        if secure || plain_ok {
            Ok(())
        } else {
            Err(ProviderError::Unavailable(format!(
                "refusing to send the credential for {} to realm {realm}: not https",
                self.registry
            )))
        }
    }

    async fn fetch_token(
        &self,
        challenge: &Challenge,
        scope: &Scope,
    ) -> Result<Minted, ProviderError> {
        let url = challenge.token_url(scope);
        let realm = challenge.realm_for_messages();
        let response = self
            .http
            .get(url)
            .basic_auth(&self.username, Some(self.password.expose_secret()))
            .send()
            .await
            .map_err(|e| unavailable(&realm, e))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(ProviderError::Rejected(format!(
                "token endpoint {realm} answered {status} for {}",
                scope_text(scope)
            )));
        }
        if !status.is_success() {
            return Err(ProviderError::Unavailable(format!(
                "token endpoint {realm} answered {status}"
            )));
        }
        let received = SystemTime::now();
        // The body holds the token: never quote it, not even in a parse error.
        let answer: TokenAnswer = response.json().await.map_err(|_| {
            ProviderError::Unavailable(format!("token endpoint {realm} sent an unreadable answer"))
        })?;
        let token = answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.expose_secret().is_empty())
            .ok_or_else(|| {
                ProviderError::Unavailable(format!("token endpoint {realm} sent no token"))
            })?;
        let lifetime = answer
            .expires_in
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        Ok(Minted {
            scheme: AuthScheme::Bearer,
            username: self.username.clone(),
            secret: token,
            // Measured from receipt, not the server's issued_at: no trust in its clock needed.
            expires_at: Some(received + lifetime),
        })
    }
}

fn scope_text(scope: &Scope) -> String {
    format!("{}:{}", scope.repository, scope.actions.join(","))
}

fn unavailable(target: &str, err: reqwest::Error) -> ProviderError {
    // reqwest errors name the URL; ours carry no credential in it (Basic auth is a header).
    let reason = if err.is_timeout() {
        "timed out".to_string()
    } else if err.is_connect() {
        "connection failed".to_string()
    } else {
        err.without_url().to_string()
    };
    ProviderError::Unavailable(format!("{target}: {reason}"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::SecretRef;

    fn pinned(host: &str, realm: &str, insecure: bool) -> anyhow::Result<TokenAuth> {
        let config = TokenAuthConfig {
            host: host.into(),
            username: "u".into(),
            password: SecretRef::value("pw-never-shown"),
            realm: Some(realm.into()),
            service: Some("s".into()),
            insecure,
        };
        let settings = ProviderSettings {
            upstream_timeout: Duration::from_secs(1),
            helper_timeout: Duration::from_secs(1),
            min_lifetime: Duration::from_secs(60),
        };
        TokenAuth::new(&config, settings)
    }

    #[test]
    fn the_credential_goes_over_plain_http_only_to_loopback_or_insecure_realms() {
        assert!(pinned("registry.example.com", "https://auth.example.com/t", false).is_ok());
        assert!(pinned("127.0.0.1:5000", "http://127.0.0.1:5001/token", false).is_ok());
        assert!(pinned("registry.lan", "http://auth.lan/token", true).is_ok());
        for (host, realm) in [
            ("registry.example.com", "http://auth.example.com/t"),
            // A loopback registry must not lure the credential off-host in clear text.
            ("127.0.0.1:5000", "http://auth.example.com/token"),
        ] {
            let err = pinned(host, realm, false).expect_err("refused").to_string();
            assert!(err.contains("not https"), "{err}");
            assert!(!err.contains("pw-never-shown"), "{err}");
        }
        assert!(pinned("r.example", "ftp://r.example/t", true).is_err());
    }
}
