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
