//! A registry client for one credential.

use std::time::Duration;

use imagemesh_proto::v1::{AuthScheme, RegistryCredential};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde::{Deserialize, Serialize};

use crate::error::{RegistryError, RegistryErrorKind};
use crate::host;

/// How to reach registries. Part of each service's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySettings {
    /// Registries spoken to over plain HTTP, besides loopback ones (which always are).
    pub insecure: Vec<String>,
    /// How long connecting to a registry may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a registry may stay silent while answering (before its headers or between two
    /// reads of a body) before the call fails as unavailable. Without it, a registry that
    /// accepts connections and never answers hangs a lazy read, and the container reading,
    /// forever.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
        }
    }
}

impl RegistrySettings {
    /// True when `registry` is spoken to over plain HTTP (loopback, or listed as insecure).
    pub fn is_insecure(&self, registry: &str) -> bool {
        self.uses_http(registry)
    }

    fn uses_http(&self, registry: &str) -> bool {
        host::is_loopback(registry)
            || self
                .insecure
                .iter()
                .any(|h| host::same_registry(h, registry))
    }

    fn protocol_for(&self, registry: &str) -> ClientProtocol {
        if self.uses_http(registry) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        }
    }
}

/// What an access check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Authenticated; the manifest exists with this digest.
    Manifest(String),
    /// Authenticated; the manifest does not exist (yet).
    NoManifest,
}

/// An oci-client client bound to one registry and one credential.
pub struct RegistryClient {
    client: Client,
    auth: RegistryAuth,
    registry: String,
}

impl RegistryClient {
    /// A client for `registry` presenting `credential` (anonymous when `None`).
    pub fn new(
        registry: &str,
        credential: Option<&RegistryCredential>,
        settings: &RegistrySettings,
    ) -> Self {
        let config = ClientConfig {
            protocol: settings.protocol_for(registry),
            connect_timeout: Some(settings.connect_timeout),
            read_timeout: Some(settings.read_timeout),
            ..Default::default()
        };
        Self {
            client: Client::new(config),
            auth: registry_auth(credential),
            registry: registry.to_string(),
        }
    }

    pub fn oci(&self) -> &Client {
        &self.client
    }

    pub fn auth(&self) -> &RegistryAuth {
        &self.auth
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Parses `reference` and checks that it points into this client's registry.
    pub fn reference(&self, reference: &str) -> Result<Reference, RegistryError> {
        let parsed = crate::parse_reference(reference).map_err(|e| {
            RegistryError::new(
                RegistryErrorKind::Invalid,
                &self.registry,
                reference,
                format!("invalid image reference: {e}"),
            )
        })?;
        if !host::same_registry(parsed.registry(), &self.registry) {
            return Err(RegistryError::new(
                RegistryErrorKind::Invalid,
                &self.registry,
                parsed.repository(),
                format!("reference names another registry ({})", parsed.registry()),
            ));
        }
        Ok(parsed)
    }

    /// Pushes a manifest (`to` names the tag or digest), retrying the one refusal that is the
    /// registry's race, not the manifest's fault: distribution stores a manifest as a blob, and
    /// of several pushes of identical manifests at once (copies of one image under several
    /// tags) it has answered one with 400 DIGEST_INVALID, "provided digest did not match
    /// uploaded content", for bytes whose digest it computed itself. Anything else is returned
    /// at once.
    pub async fn push_manifest(
        &self,
        to: &Reference,
        body: bytes::Bytes,
        content_type: reqwest::header::HeaderValue,
    ) -> Result<String, oci_client::errors::OciDistributionError> {
        const ATTEMPTS: u32 = 4;
        let mut attempt = 1;
        loop {
            let pushed = self
                .client
                .push_manifest_raw(to, body.clone(), content_type.clone())
                .await;
            match pushed {
                Err(error) if attempt < ATTEMPTS && is_digest_race(&error) => {
                    tracing::debug!(%error, attempt, "manifest push refused as DIGEST_INVALID; retrying");
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Whether a blob upload that failed with `error` landed anyway: writers of images that
    /// share layers push the same blob into one repository at once, and a registry may refuse
    /// the loser's upload (distribution has answered 400 "digest did not match uploaded
    /// content" and 500). The blob being there, under its digest, is all a push needs.
    pub async fn pushed_concurrently(
        &self,
        repository: &Reference,
        digest: &str,
        error: &oci_client::errors::OciDistributionError,
    ) -> bool {
        let there = self
            .client
            .blob_exists(repository, digest)
            .await
            .unwrap_or(false);
        if there {
            tracing::debug!(digest, %error, "blob upload refused, but another writer pushed it");
        }
        there
    }

    /// Authenticates for `operation` on the reference's repository and checks the manifest with
    /// a HEAD request: proves the registry accepts the credential for this repository.
    pub async fn check_access(
        &self,
        reference: &Reference,
        operation: RegistryOperation,
    ) -> Result<Access, RegistryError> {
        let fail = |e: &oci_client::errors::OciDistributionError| {
            RegistryError::from_oci(&self.registry, reference.repository(), e)
        };
        self.client
            .auth(reference, &self.auth, operation)
            .await
            .map_err(|e| fail(&e))?;
        match self
            .client
            .fetch_manifest_digest(reference, &self.auth)
            .await
        {
            Ok(digest) => Ok(Access::Manifest(digest)),
            Err(e) => {
                let err = fail(&e);
                if err.kind == RegistryErrorKind::NotFound {
                    Ok(Access::NoManifest)
                } else {
                    Err(err)
                }
            }
        }
    }
}

/// A 400 DIGEST_INVALID answer (see [`RegistryClient::push_manifest`]).
fn is_digest_race(error: &oci_client::errors::OciDistributionError) -> bool {
    use oci_client::errors::{OciDistributionError, OciErrorCode};
    match error {
        OciDistributionError::ServerError { code, message, .. } => {
            *code == 400 && message.contains("DIGEST_INVALID")
        }
        OciDistributionError::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|e| e.code == OciErrorCode::DigestInvalid),
        _ => false,
    }
}

/// The oci-client form of a credential. The secret is copied at the last moment, here.
pub fn registry_auth(credential: Option<&RegistryCredential>) -> RegistryAuth {
    match credential {
        Some(c) if c.is_usable() => match c.scheme() {
            AuthScheme::Bearer => RegistryAuth::Bearer(c.secret.clone()),
            _ => RegistryAuth::Basic(c.username.clone(), c.secret.clone()),
        },
        _ => RegistryAuth::Anonymous,
    }
}
