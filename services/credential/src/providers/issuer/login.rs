//! One-time logins for the HTTP token endpoint.
//!
//! skopeo and buildah insist on doing a registry's challenge themselves: they take the realm from
//! the registry's `WWW-Authenticate`, and authenticate there with HTTP Basic. A login is that
//! Basic password: a short, self-contained grant the issuer signed (registry, repository,
//! actions, expiry, id), so any replica holding the signing key can check it without shared
//! state, and a stolen login is worth at most one token for one repository for a few minutes.
//! Which ids were redeemed is remembered by the endpoint (`token_endpoint.rs`).

use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SecureRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use super::Issuer;

/// The username of every login: what a registry's logs and a tool's auth file show.
pub const LOGIN_USERNAME: &str = "imagemesh-login";

/// Put before the signed payload, so a login signature can never pass as a token signature
/// (or the other way round): both are made with the same key.
const DOMAIN: &[u8] = b"imagemesh-login-v1\n";

/// What a login grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The normalised registry host.
    #[serde(rename = "reg")]
    pub registry: String,
    #[serde(rename = "repo")]
    pub repository: String,
    #[serde(rename = "act")]
    pub actions: Vec<String>,
    /// Seconds since the Unix epoch.
    pub exp: u64,
    /// Random; redeemed once.
    pub jti: String,
}

/// Why a login was not accepted. Never holds the login.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("not a login of this service")]
    Malformed,
    #[error("the login's signature does not verify")]
    BadSignature,
    #[error("the login has expired")]
    Expired,
}

impl Issuer {
    /// A login for `scope` on `registry`, living `login_lifetime`.
    pub fn login(
        &self,
        registry: &str,
        repository: &str,
        actions: &[String],
    ) -> Result<(String, SystemTime), aws_lc_rs::error::Unspecified> {
        let mut nonce = [0u8; 16];
        self.rng.fill(&mut nonce)?;
        let expires = SystemTime::now() + self.login_lifetime;
        let grant = Grant {
            registry: registry.to_string(),
            repository: repository.to_string(),
            actions: actions.to_vec(),
            exp: unix_seconds(expires),
            jti: URL_SAFE_NO_PAD.encode(nonce),
        };
        let payload = serde_json::to_vec(&grant).map_err(|_| aws_lc_rs::error::Unspecified)?;
        let signature = self.key.sign(&self.rng, &signed_input(&payload))?;
        let login = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        );
        Ok((login, expires))
    }

    /// The grant of a login this issuer signed, if it has not expired at `now`.
    pub fn verify_login(&self, login: &str, now: SystemTime) -> Result<Grant, LoginError> {
        let (payload, signature) = split(login)?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, self.key.public_key().as_ref())
            .verify(&signed_input(&payload), &signature)
            .map_err(|_| LoginError::BadSignature)?;
        let grant: Grant = serde_json::from_slice(&payload).map_err(|_| LoginError::Malformed)?;
        if grant.exp <= unix_seconds(now) {
            return Err(LoginError::Expired);
        }
        Ok(grant)
    }

    /// The registry's service name, which a token request's `service` must name.
    pub fn audience(&self) -> &str {
        &self.template.audience
    }
}

/// The grant a login claims, before its signature is checked: only to find the issuer that
/// must check it.
pub fn unverified_grant(login: &str) -> Result<Grant, LoginError> {
    let (payload, _) = split(login)?;
    serde_json::from_slice(&payload).map_err(|_| LoginError::Malformed)
}

/// The decoded payload and signature of a login.
fn split(login: &str) -> Result<(Vec<u8>, Vec<u8>), LoginError> {
    let (payload, signature) = login.split_once('.').ok_or(LoginError::Malformed)?;
    let decode = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| LoginError::Malformed)
    };
    Ok((decode(payload)?, decode(signature)?))
}

fn signed_input(payload: &[u8]) -> Vec<u8> {
    [DOMAIN, payload].concat()
}

pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

#[cfg(test)]
mod tests {
    use imagemesh_testkit::issuer_keys::SigningKey;

    use super::*;
    use crate::providers::issuer::tests::{config, settings};

    #[test]
    fn a_login_verifies_with_its_issuer_only_until_it_expires_and_resists_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate(dir.path(), "current");
        let other = SigningKey::generate(dir.path(), "other");
        let issuer = Issuer::new(&config(&key, &key.certificate, 300), settings()).unwrap();
        let stranger = Issuer::new(&config(&other, &other.certificate, 300), settings()).unwrap();
        let push = vec!["pull".to_string(), "push".to_string()];
        let (login, expires) = issuer.login("127.0.0.1:5000", "team/app", &push).unwrap();
        let now = SystemTime::now();
        let grant = issuer.verify_login(&login, now).unwrap();
        assert_eq!(grant.repository, "team/app");
        assert_eq!(grant.actions, push);
        assert_eq!(grant.exp, unix_seconds(expires));
        assert_eq!(
            stranger.verify_login(&login, now),
            Err(LoginError::BadSignature)
        );
        assert_eq!(
            issuer.verify_login(&login, expires + Duration::from_secs(1)),
            Err(LoginError::Expired)
        );
        // A login widened to another repository no longer verifies.
        let (_, signature) = login.split_once('.').unwrap();
        let widened = Grant {
            repository: "other/app".into(),
            ..grant
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&widened).unwrap());
        let forged = format!("{payload}.{signature}");
        assert_eq!(
            issuer.verify_login(&forged, now),
            Err(LoginError::BadSignature)
        );
        assert_eq!(
            issuer.verify_login("not-a-login", now),
            Err(LoginError::Malformed)
        );
        // A token the issuer signed is not a login.
        let token = issuer
            .mint(&imagemesh_proto::v1::Scope {
                repository: "team/app".into(),
                actions: push,
            })
            .unwrap();
        use secrecy::ExposeSecret;
        assert!(
            issuer
                .verify_login(token.secret.expose_secret(), now)
                .is_err()
        );
    }
}
