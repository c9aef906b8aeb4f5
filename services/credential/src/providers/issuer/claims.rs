//! The token itself: distribution token spec claims for one repository, and its ES256 signature.

use std::time::{Duration, SystemTime};

use aws_lc_rs::error::Unspecified;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::EcdsaKeyPair;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use imagemesh_proto::v1::Scope;
use serde::Serialize;

/// Seconds `nbf` lies before `iat`, so a registry whose clock is a little behind ours accepts a
/// token the moment it is minted.
const CLOCK_SKEW: u64 = 10;

/// What every token of one issuer shares.
#[derive(Debug)]
pub struct Template {
    pub issuer: String,
    /// The registry's service name.
    pub audience: String,
    pub subject: String,
    pub lifetime: Duration,
}

/// The claims of one token.
#[derive(Debug, Serialize)]
pub struct Claims<'a> {
    pub iss: &'a str,
    pub sub: &'a str,
    /// A string: docker-registry 2.8 does not read a list.
    pub aud: &'a str,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: String,
    pub access: [Access<'a>; 1],
}

/// One access entry: a repository and the actions granted on it.
#[derive(Debug, Serialize)]
pub struct Access<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub name: &'a str,
    pub actions: &'a [String],
}

impl Template {
    /// The claims of a token for exactly `scope`, issued at `now`, with `nonce` as its id.
    pub fn claims<'a>(&'a self, scope: &'a Scope, now: SystemTime, nonce: &[u8]) -> Claims<'a> {
        let iat = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        Claims {
            iss: &self.issuer,
            sub: &self.subject,
            aud: &self.audience,
            exp: iat + self.lifetime.as_secs(),
            nbf: iat.saturating_sub(CLOCK_SKEW),
            iat,
            jti: URL_SAFE_NO_PAD.encode(nonce),
            access: [Access {
                kind: "repository",
                name: &scope.repository,
                actions: &scope.actions,
            }],
        }
    }
}

/// The compact JWS: header (with the certificate as `x5c`), claims, ES256 signature.
pub fn sign(
    claims: &Claims<'_>,
    certificate: &[u8],
    key: &EcdsaKeyPair,
    rng: &SystemRandom,
) -> Result<String, Unspecified> {
    let header =
        serde_json::json!({"alg": "ES256", "typ": "JWT", "x5c": [STANDARD.encode(certificate)]});
    let claims = serde_json::to_vec(claims).map_err(|_| Unspecified)?;
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = key.sign(rng, signing_input.as_bytes())?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    ))
}

#[cfg(test)]
pub(super) mod tests {
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, KeyPair, UnparsedPublicKey,
    };

    use super::*;

    /// Part `index` (0 header, 1 claims) of a compact JWS, as JSON.
    pub fn decode_part(token: &str, index: usize) -> serde_json::Value {
        let part = token.split('.').nth(index).expect("three parts");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    /// True when the signature of `token` verifies with this uncompressed P-256 point.
    pub fn verifies(token: &str, public_key: &[u8]) -> bool {
        let (signing_input, signature) = token.rsplit_once('.').unwrap();
        let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_key)
            .verify(signing_input.as_bytes(), &signature)
            .is_ok()
    }

    fn template() -> Template {
        Template {
            issuer: "imagemesh-credential".into(),
            audience: "build-registry".into(),
            subject: "imagemesh".into(),
            lifetime: Duration::from_secs(300),
        }
    }

    fn scope(actions: &[&str]) -> Scope {
        Scope {
            repository: "team/app".into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn claims_name_the_audience_exactly_one_repository_and_the_asked_actions() {
        let template = template();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let push = scope(&["pull", "push"]);
        let claims = serde_json::to_value(template.claims(&push, now, &[7; 16])).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({
                "iss": "imagemesh-credential",
                "sub": "imagemesh",
                "aud": "build-registry",
                "iat": 1_800_000_000u64,
                "nbf": 1_800_000_000u64 - CLOCK_SKEW,
                "exp": 1_800_000_300u64,
                "jti": URL_SAFE_NO_PAD.encode([7; 16]),
                "access": [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}],
            })
        );
        let pull = scope(&["pull"]);
        let claims = template.claims(&pull, now, &[7; 16]);
        assert_eq!(claims.access.len(), 1);
        assert_eq!(claims.access[0].actions, ["pull"]);
    }

    #[test]
    fn every_token_has_its_own_id_and_expires_lifetime_after_issue() {
        let template = template();
        let pull = scope(&["pull"]);
        let now = SystemTime::now();
        let first = template.claims(&pull, now, &[1; 16]);
        let second = template.claims(&pull, now, &[2; 16]);
        assert_ne!(first.jti, second.jti);
        assert_eq!(first.exp - first.iat, 300);
    }

    #[test]
    fn the_signature_verifies_with_the_key_and_not_with_another() {
        let rng = SystemRandom::new();
        let key = new_key(&rng);
        let other = new_key(&rng);
        let template = template();
        let pull = scope(&["pull"]);
        let token = sign(
            &template.claims(&pull, SystemTime::now(), &[3; 16]),
            b"cert",
            &key,
            &rng,
        )
        .unwrap();
        assert!(verifies(&token, key.public_key().as_ref()));
        assert!(!verifies(&token, other.public_key().as_ref()));
        assert_eq!(decode_part(&token, 0)["x5c"][0], STANDARD.encode(b"cert"));
        assert_eq!(decode_part(&token, 1)["aud"], "build-registry");
    }

    fn new_key(rng: &SystemRandom) -> EcdsaKeyPair {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, rng).unwrap();
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap()
    }
}
