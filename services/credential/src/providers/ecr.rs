//! AWS ECR: `GetAuthorizationToken`.
//!
//! The token is base64 `AWS:<password>`, valid for every repository the AWS principal may
//! reach in that registry, for 12 hours. The region comes from the registry host
//! (`<account>.dkr.ecr.<region>.amazonaws.com`) unless configured.

use std::time::SystemTime;

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ecr::Client;
use aws_sdk_ecr::config::{Credentials, Region};
use aws_sdk_ecr::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use base64::Engine;
use imagemesh_proto::v1::AuthScheme;
use secrecy::{ExposeSecret, SecretString};

use super::{Minted, ProviderError, ProviderSettings};
use crate::config::EcrConfig;

/// Error codes with which AWS says the keys themselves are bad, not that it is unavailable.
const REJECTED_CODES: &[&str] = &[
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "AccessDeniedException",
    "ExpiredTokenException",
    "InvalidClientTokenId",
];

/// Mints ECR registry passwords.
#[derive(Debug)]
pub struct EcrProvider {
    client: Client,
    /// "static-keys" or "default-chain": which long-term credential this is.
    identity: &'static str,
}

impl EcrProvider {
    pub async fn new(config: &EcrConfig, settings: ProviderSettings) -> anyhow::Result<Self> {
        let owner = format!("registry {}", config.host);
        let region = match &config.region {
            Some(region) => region.clone(),
            None => region_from_host(&config.host).ok_or_else(|| {
                anyhow::anyhow!(
                    "{owner}: cannot tell the AWS region from the host; set region or use \
                     <account>.dkr.ecr.<region>.amazonaws.com"
                )
            })?,
        };
        let timeouts = TimeoutConfig::builder()
            .operation_timeout(settings.upstream_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region))
            .timeout_config(timeouts);
        let identity = match (&config.access_key_id, &config.secret_access_key) {
            (Some(id), Some(secret)) => {
                let token = match &config.session_token {
                    Some(token) => Some(token.resolve(&owner)?.expose_secret().to_string()),
                    None => None,
                };
                let credentials = Credentials::new(
                    id.resolve(&owner)?.expose_secret(),
                    secret.resolve(&owner)?.expose_secret(),
                    token,
                    None,
                    "imagemesh-credential-config",
                );
                loader = loader.credentials_provider(credentials);
                "static-keys"
            }
            (None, None) => "default-chain",
            _ => anyhow::bail!("{owner}: set both access_key_id and secret_access_key, or neither"),
        };
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let client = Client::new(&loader.load().await);
        Ok(Self { client, identity })
    }

    pub fn identity(&self) -> &'static str {
        self.identity
    }

    /// One `GetAuthorizationToken` call.
    pub async fn authorization_token(&self) -> Result<Minted, ProviderError> {
        let output = self
            .client
            .get_authorization_token()
            .send()
            .await
            .map_err(classify)?;
        let data = output.authorization_data().first().ok_or_else(|| {
            ProviderError::Unavailable("ECR returned no authorization data".into())
        })?;
        let token = SecretString::from(data.authorization_token().unwrap_or_default().to_owned());
        let (username, password) = decode_token(&token)?;
        let expires_at = data
            .expires_at()
            .and_then(|t| SystemTime::try_from(*t).ok());
        Ok(Minted {
            scheme: AuthScheme::Basic,
            username,
            secret: password,
            expires_at,
        })
    }
}

/// `base64("AWS:<password>")` -> ("AWS", password). Errors never include the token.
fn decode_token(token: &SecretString) -> Result<(String, SecretString), ProviderError> {
    let unreadable = || ProviderError::Unavailable("ECR returned an unreadable token".into());
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.expose_secret().trim())
        .map_err(|_| unreadable())?;
    let text = SecretString::from(String::from_utf8(decoded).map_err(|_| unreadable())?);
    let (user, password) = text
        .expose_secret()
        .split_once(':')
        .ok_or_else(unreadable)?;
    Ok((user.to_string(), SecretString::from(password.to_string())))
}

fn classify<E, R>(err: SdkError<E, R>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let rejected = err
        .as_service_error()
        .and_then(|e| e.code())
        .is_some_and(|code| REJECTED_CODES.contains(&code));
    // AWS error messages name the operation and the principal, never the secret key.
    let message = format!("ECR GetAuthorizationToken: {}", DisplayErrorContext(&err));
    if rejected {
        ProviderError::Rejected(message)
    } else {
        ProviderError::Unavailable(message)
    }
}

/// The region of an ECR registry host: `<12 digits>.dkr.ecr[-fips].<region>.amazonaws.com[.cn]`.
pub fn region_from_host(host: &str) -> Option<String> {
    let name = imagemesh_registry::host::hostname(host).to_ascii_lowercase();
    let labels: Vec<&str> = name.split('.').collect();
    let (account, rest) = labels.split_first()?;
    let account_ok = account.len() == 12 && account.chars().all(|c| c.is_ascii_digit());
    match rest {
        ["dkr", "ecr" | "ecr-fips", region, "amazonaws", "com"]
        | ["dkr", "ecr" | "ecr-fips", region, "amazonaws", "com", "cn"]
            if account_ok && !region.is_empty() =>
        {
            Some(region.to_string())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_comes_from_the_host_only_for_real_ecr_hosts() {
        let cases = [
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com",
                Some("us-east-1"),
            ),
            (
                "123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com",
                Some("us-gov-west-1"),
            ),
            (
                "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn",
                Some("cn-north-1"),
            ),
            (
                "123456789012.dkr.ecr.eu-west-1.amazonaws.com:443",
                Some("eu-west-1"),
            ),
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com.attacker.net",
                None,
            ),
            ("evil-amazonaws.com.example", None),
            ("12345.dkr.ecr.us-east-1.amazonaws.com", None),
            ("registry.example.com", None),
        ];
        for (host, region) in cases {
            assert_eq!(region_from_host(host).as_deref(), region, "{host}");
        }
    }

    #[test]
    fn tokens_decode_without_quoting_them_in_errors() {
        let good = base64::engine::general_purpose::STANDARD.encode("AWS:pw-xyz");
        let (user, password) = decode_token(&SecretString::from(good)).unwrap();
        assert_eq!(user, "AWS");
        assert_eq!(password.expose_secret(), "pw-xyz");
        let bad = base64::engine::general_purpose::STANDARD.encode("no-colon-s3cret");
        let err = decode_token(&SecretString::from(bad))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }
}
