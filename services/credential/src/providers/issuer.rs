//! The credential service as a registry's token issuer.
//!
//! Registries with distribution token auth (`auth.token`; Harbor and zot likewise) accept bearer
//! tokens signed by an issuer whose certificate they trust. With this provider that issuer is
//! the credential service itself: it signs, per the distribution token spec, an ES256 JWT for
//! exactly the repository and actions asked, living `lifetime`, with a random `jti` and `aud` =
//! the registry's service name. No upstream is called and no long-term registry password exists.
//!
//! The certificate travels in the token's `x5c` header; docker-registry 2.8 accepts a token whose
//! `x5c` leaf is (or chains to) a certificate of its `rootcertbundle`. Rotation happens at the
//! registry: its bundle lists the old and the new certificate while tokens of both are alive.

mod claims;
pub mod login;
mod pem;

use std::path::Path;
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use imagemesh_proto::v1::{AuthScheme, Scope};
use imagemesh_registry::host;
use secrecy::{ExposeSecret, SecretString};

use super::{Minted, ProviderError, ProviderSettings};
use crate::config::IssuerConfig;
use claims::Template;

/// Signs repository-scoped bearer tokens for one registry.
pub struct Issuer {
    template: Template,
    key: EcdsaKeyPair,
    /// DER of the certificate of `key`, sent as the `x5c` header.
    certificate: Vec<u8>,
    rng: SystemRandom,
    /// How long a one-time login for the token endpoint stays redeemable.
    login_lifetime: Duration,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// Reads the signing key and the certificates, and checks that they belong together.
    pub fn new(config: &IssuerConfig, settings: ProviderSettings) -> anyhow::Result<Self> {
        let owner = format!("registry {}", host::normalize(&config.host));
        // The cache reports a token as living at least min_lifetime: a shorter token would be
        // handed out after the registry stopped accepting it.
        anyhow::ensure!(
            config.lifetime > settings.min_lifetime,
            "{owner}: issuer lifetime ({:?}) must exceed credential.min_lifetime ({:?})",
            config.lifetime,
            settings.min_lifetime
        );
        let key = signing_key(
            &config
                .signing_key
                .resolve(&format!("{owner} signing_key"))?,
        )
        .map_err(|e| anyhow::anyhow!("{owner}: signing_key {e}"))?;
        let certificate = read_certificate(&config.certificate, &owner)?;
        anyhow::ensure!(
            certifies(&certificate, &key),
            "{owner}: {} is not the certificate of signing_key",
            config.certificate.display()
        );
        for previous in &config.previous {
            read_certificate(previous, &owner)?;
        }
        Ok(Self {
            template: Template {
                issuer: config.issuer.clone(),
                audience: config.service.clone(),
                subject: config.subject.clone(),
                lifetime: config.lifetime,
            },
            key,
            certificate,
            rng: SystemRandom::new(),
            login_lifetime: config.login_lifetime,
        })
    }

    /// What the cache key names: tokens of one issuer and audience are interchangeable.
    pub fn identity(&self) -> String {
        format!("{}@{}", self.template.issuer, self.template.audience)
    }

    /// A bearer token for exactly `scope` (already validated by the broker).
    pub fn mint(&self, scope: &Scope) -> Result<Minted, ProviderError> {
        let mut nonce = [0u8; 16];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| ProviderError::Unavailable("no randomness for the token id".into()))?;
        let claims = self.template.claims(scope, SystemTime::now(), &nonce);
        let token = claims::sign(&claims, &self.certificate, &self.key, &self.rng)
            .map_err(|_| ProviderError::Unavailable("signing the token failed".into()))?;
        Ok(Minted {
            scheme: AuthScheme::Bearer,
            username: self.template.subject.clone(),
            secret: SecretString::from(token),
            // The claim itself, so the reported expiry is never later than the registry's.
            expires_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(claims.exp)),
        })
    }
}

/// The P-256 key of a PKCS#8 PEM. Errors never hold the key.
fn signing_key(pem_text: &SecretString) -> Result<EcdsaKeyPair, &'static str> {
    let der = pem::blocks(pem_text.expose_secret(), "PRIVATE KEY")
        .and_then(|mut blocks| blocks.pop())
        .ok_or("is not a PKCS#8 PEM (-----BEGIN PRIVATE KEY-----)")?;
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
        .map_err(|_| "is not a P-256 (ES256) PKCS#8 key")
}

/// The DER of the first certificate in a PEM file.
fn read_certificate(path: &Path, owner: &str) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{owner}: cannot read {}: {e}", path.display()))?;
    pem::blocks(&text, "CERTIFICATE")
        .and_then(|blocks| blocks.into_iter().next())
        .ok_or_else(|| anyhow::anyhow!("{owner}: {} holds no PEM certificate", path.display()))
}

/// True when the certificate holds the key's public point (its subject public key). A byte
/// search rather than an X.509 parser: a 65-byte uncompressed P-256 point does not occur in a
/// certificate by accident.
fn certifies(certificate: &[u8], key: &EcdsaKeyPair) -> bool {
    let point = key.public_key().as_ref();
    certificate.windows(point.len()).any(|w| w == point)
}

#[cfg(test)]
pub(super) mod tests {
    use imagemesh_testkit::issuer_keys::SigningKey;

    use super::*;
    use crate::secret::SecretRef;

    pub fn config(key: &SigningKey, certificate: &Path, lifetime: u64) -> IssuerConfig {
        IssuerConfig {
            host: "127.0.0.1:5000".into(),
            service: "build-registry".into(),
            issuer: "imagemesh-credential".into(),
            signing_key: SecretRef {
                file: Some(key.key.clone()),
                ..Default::default()
            },
            certificate: certificate.to_path_buf(),
            previous: Vec::new(),
            lifetime: Duration::from_secs(lifetime),
            subject: "imagemesh".into(),
            login_lifetime: Duration::from_secs(120),
        }
    }

    pub fn settings() -> ProviderSettings {
        ProviderSettings {
            upstream_timeout: Duration::from_secs(1),
            helper_timeout: Duration::from_secs(1),
            min_lifetime: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_key_with_another_keys_certificate_or_a_too_short_lifetime_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate(dir.path(), "current");
        let other = SigningKey::generate(dir.path(), "other");
        Issuer::new(&config(&key, &key.certificate, 300), settings()).unwrap();
        let err = Issuer::new(&config(&key, &other.certificate, 300), settings()).unwrap_err();
        assert!(err.to_string().contains("not the certificate"), "{err}");
        let err = Issuer::new(&config(&key, &key.certificate, 60), settings()).unwrap_err();
        assert!(err.to_string().contains("min_lifetime"), "{err}");
        let not_a_key = config(&key, &key.certificate, 300);
        let not_a_key = IssuerConfig {
            signing_key: SecretRef {
                file: Some(key.certificate.clone()),
                ..Default::default()
            },
            ..not_a_key
        };
        let err = Issuer::new(&not_a_key, settings()).unwrap_err();
        assert!(err.to_string().contains("PKCS#8"), "{err}");
        let missing_previous = IssuerConfig {
            previous: vec![dir.path().join("gone.crt.pem")],
            ..config(&key, &key.certificate, 300)
        };
        let err = Issuer::new(&missing_previous, settings()).unwrap_err();
        assert!(err.to_string().contains("gone.crt.pem"), "{err}");
        // An inline key (development only) shows in no error and no Debug output.
        let key_pem = key.key_pem();
        let inline = |certificate: &Path| IssuerConfig {
            signing_key: SecretRef::value(key_pem.clone()),
            ..config(&key, certificate, 300)
        };
        let issuer = Issuer::new(&inline(&key.certificate), settings()).unwrap();
        let err = Issuer::new(&inline(&other.certificate), settings()).unwrap_err();
        let shown = format!("{err} {err:?} {issuer:?} {:?}", inline(&key.certificate));
        let body = key_pem.lines().nth(1).unwrap();
        assert!(!shown.contains(body), "{shown}");
    }

    #[test]
    fn minted_tokens_are_bearer_tokens_signed_by_the_key_with_its_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate(dir.path(), "current");
        let issuer = Issuer::new(&config(&key, &key.certificate, 300), settings()).unwrap();
        let scope = Scope {
            repository: "team/app".into(),
            actions: vec!["pull".into()],
        };
        let minted = issuer.mint(&scope).unwrap();
        assert_eq!(minted.scheme, AuthScheme::Bearer);
        let token = minted.secret.expose_secret();
        let header = claims::tests::decode_part(token, 0);
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["typ"], "JWT");
        let x5c = header["x5c"][0].as_str().unwrap();
        assert_eq!(
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, x5c).unwrap(),
            issuer.certificate
        );
        assert!(claims::tests::verifies(
            token,
            issuer.key.public_key().as_ref()
        ));
        let left = minted
            .expires_at
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(left <= Duration::from_secs(300) && left > Duration::from_secs(295));
    }
}
