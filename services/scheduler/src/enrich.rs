//! Attaching credentials to a ContainerRequest: the seed's `attachImageCredentials` and
//! `attachBuildRegistryCredentials`, run for EVERY request, build and runtime alike, within what
//! the request's tenant may reach ([`Tenancy`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv;
use imagemesh_proto::v1::{
    ContainerRequest, ImageRecord, RegistryCredential, RequestKind, Scope, TokenRequest,
};
use imagemesh_registry::dockerfile::base_images;
use imagemesh_registry::{Reference, host};
use imagemesh_runtime::credentials::{CredentialClient, CredentialError};
use imagemesh_runtime::streams::image_key;
use imagemesh_runtime::{ErrorCode, Rejection};

use crate::tenancy::Tenancy;
use crate::token_cache::{TokenCache, TokenKey};
use imagemesh_registry::repository::within;
use prost::Message;

/// Why a request could not be enriched.
#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    /// Worth retrying: the credential service or NATS is unavailable for now.
    #[error("{0}")]
    Transient(Rejection),
    /// Never going to work.
    #[error("{0}")]
    Permanent(Rejection),
}

impl From<CredentialError> for EnrichError {
    fn from(err: CredentialError) -> Self {
        let rejection = err.to_rejection();
        match rejection.code {
            ErrorCode::CredentialUnavailable => EnrichError::Transient(rejection),
            _ => EnrichError::Permanent(rejection),
        }
    }
}

/// Most `FROM` images one build may name (each costs a token request).
const MAX_BASE_IMAGES: usize = 8;

fn permanent(code: ErrorCode, message: impl Into<String>) -> EnrichError {
    EnrichError::Permanent(Rejection::new(code, message))
}

/// Resolves where an image lives and which credentials each registry needs.
pub struct Enricher {
    pub credentials: CredentialClient,
    pub tokens: TokenCache,
    /// `<tenant>.<image id>` -> name of the credential that pulls it (runtime secrets).
    pub image_secrets: kv::Store,
    pub build_registry: String,
    /// Tenants' repositories lie below it: `<build_repository>/<tenant>`.
    pub build_repository: String,
    /// Repository prefixes of the build registry every tenant may pull from.
    pub shared_repositories: Vec<String>,
    /// Attach a push token for publishing the recorded prefetch list to runtime requests of
    /// images in the tenant's own repositories.
    pub prefetch_publish: bool,
    /// `<tenant>.<image id>` -> ImageRecord.
    pub image_refs: kv::Store,
    pub references: ReferenceCache,
}

impl Enricher {
    /// What the request's tenant may reach in the build registry.
    fn tenancy<'a>(&'a self, request: &'a ContainerRequest) -> Tenancy<'a> {
        Tenancy {
            build_repository: &self.build_repository,
            shared: &self.shared_repositories,
            tenant: &request.tenant,
        }
    }

    /// Resolves the image reference and attaches both credentials. Credentials (and a build
    /// target) the client put in the request are discarded: only the credential service hands
    /// them out, and only the scheduler decides where an image goes. The request's tenant is the
    /// intake subject's (bound by the work loop before this runs).
    pub async fn enrich(&self, request: &mut ContainerRequest) -> Result<(), EnrichError> {
        request.image_credentials = None;
        request.build_registry_creds = None;
        request.base_image_credentials.clear();
        request.prefetch_credential = None;
        request.build_image_ref.clear();
        let kind = request.kind();
        let build_target = match kind {
            RequestKind::Build => Some(self.resolve_build_target(request)?),
            RequestKind::Runtime => {
                if request.image_ref.is_empty() {
                    request.image_ref = self.recorded_image_ref(request).await?;
                }
                None
            }
            RequestKind::Unspecified => {
                return Err(permanent(
                    ErrorCode::MalformedRequest,
                    "kind must be BUILD or RUNTIME",
                ));
            }
        };
        // Parsed once per request, and remembered: reference parsing is a regex match, the
        // costliest step of the hot path, and most requests name an image seen before.
        let image = match request.image_ref.as_str() {
            "" => None,
            image_ref => Some(self.references.parse(image_ref)?),
        };
        let in_build_registry = image
            .as_ref()
            .is_some_and(|r| host::same_registry(r.registry(), &self.build_registry));
        if let Some(image) = image.as_ref().filter(|_| in_build_registry) {
            // The image to mount, or the source a build copies: read with a build-registry
            // credential, so only from what the tenant may reach.
            self.tenancy(request)
                .check_pull(&request.image_ref, image.repository())
                .map_err(EnrichError::Permanent)?;
        }
        let build_repository = match (build_target, &image) {
            (Some(repository), _) => repository,
            (None, Some(image)) if in_build_registry => {
                request.build_image_ref = request.image_ref.clone();
                image.repository().to_string()
            }
            (None, _) => self.tenancy(request).prefix(),
        };
        let own_image = kind == RequestKind::Runtime
            && in_build_registry
            && within(&build_repository, &self.tenancy(request).prefix());
        if own_image && self.prefetch_publish {
            self.attach_prefetch_credential(request, &build_repository)
                .await;
        }
        self.attach_build_registry_credentials(request, kind, build_repository)
            .await?;
        if kind == RequestKind::Build {
            self.attach_base_image_credentials(request).await?;
        }
        match image {
            Some(image) if !in_build_registry => {
                self.attach_image_credentials(request, &image).await
            }
            _ => Ok(()),
        }
    }

    /// A build gets a pull credential for each image its Dockerfile starts from, scoped to that
    /// image's repository (a bearer token for one repository serves no other). Public images
    /// get none.
    async fn attach_base_image_credentials(
        &self,
        request: &mut ContainerRequest,
    ) -> Result<(), EnrichError> {
        let bases = match &request.build_options {
            Some(options) => base_images(&options.dockerfile, &options.build_args),
            None => Vec::new(),
        };
        if bases.len() > MAX_BASE_IMAGES {
            return Err(permanent(
                ErrorCode::MalformedRequest,
                format!(
                    "the Dockerfile starts from {} images; at most {MAX_BASE_IMAGES} are served",
                    bases.len()
                ),
            ));
        }
        // A base in the build registry is pulled with a build-registry credential: only from
        // what the tenant may reach.
        let tenancy = self.tenancy(request);
        for base in bases
            .iter()
            .filter(|base| host::same_registry(base.registry(), &self.build_registry))
        {
            tenancy
                .check_pull(&base.whole(), base.repository())
                .map_err(EnrichError::Permanent)?;
        }
        // Independent token requests: asked for at once.
        let pull = ["pull".to_string()];
        let (request_id, tenant) = (request.request_id.as_str(), request.tenant.as_str());
        let minted = futures::future::try_join_all(bases.iter().map(|base| {
            let registry = host::normalize(base.registry());
            let pull = &pull;
            async move {
                let key = TokenKey {
                    tenant,
                    registry: &registry,
                    repository: base.repository(),
                    actions: pull,
                    credential_ref: "",
                };
                self.mint(request_id, key).await
            }
        }))
        .await?;
        request.base_image_credentials = minted.into_iter().flatten().collect();
        Ok(())
    }

    /// Build: the image goes to `<build registry>/<repository>:<image id>`, the repository being
    /// the tenant's prefix or one below it.
    fn resolve_build_target(&self, request: &mut ContainerRequest) -> Result<String, EnrichError> {
        imagemesh_proto::validate_image_id(&request.image_id)
            .map_err(|e| permanent(ErrorCode::MalformedRequest, e))?;
        let options = request.build_options.clone().unwrap_or_default();
        if options.dockerfile.is_empty() && options.source_image.is_empty() {
            return Err(permanent(
                ErrorCode::MalformedRequest,
                "a build needs build_options.dockerfile or build_options.source_image",
            ));
        }
        let repository = self
            .tenancy(request)
            .build_repository(&options.repository)
            .map_err(EnrichError::Permanent)?;
        let target = format!(
            "{}/{}:{}",
            self.build_registry, repository, request.image_id
        );
        // The prefix check read the repository as written; the push goes where the reference
        // parses to, so the two must be the same.
        if parse_reference(&target)?.repository() != repository {
            return Err(permanent(
                ErrorCode::MalformedRequest,
                format!("repository {repository:?} is not a plain repository path"),
            ));
        }
        request.build_image_ref = target;
        if request.image_ref.is_empty() {
            request.image_ref = options.source_image;
        }
        Ok(repository)
    }

    /// The reference recorded for the request's image id in its tenant: another tenant's image
    /// of the same id is not found.
    async fn recorded_image_ref(&self, request: &ContainerRequest) -> Result<String, EnrichError> {
        let image_id = request.image_id.as_str();
        if image_id.is_empty() {
            return Err(permanent(
                ErrorCode::MalformedRequest,
                "a runtime request needs image_ref or image_id",
            ));
        }
        imagemesh_proto::validate_image_id(image_id)
            .map_err(|e| permanent(ErrorCode::MalformedRequest, e))?;
        let key = image_key(&request.tenant, image_id);
        let entry = self.image_refs.get(&key).await.map_err(|e| {
            EnrichError::Transient(Rejection::new(
                ErrorCode::Internal,
                format!("image-refs lookup failed: {e}"),
            ))
        })?;
        let record = entry.map(ImageRecord::decode).transpose().map_err(|e| {
            permanent(
                ErrorCode::Internal,
                format!("unreadable image record {image_id}: {e}"),
            )
        })?;
        match record {
            Some(record) if !record.image_ref.is_empty() => Ok(record.image_ref),
            _ => Err(permanent(
                ErrorCode::NotFound,
                format!("no image has been built with image_id {image_id}"),
            )),
        }
    }

    /// A runtime request of an image in the tenant's own repository gets a second, pull,push
    /// token for that repository, with which the mounter publishes the image's recorded prefetch
    /// list (its mount reads with the pull-only one). Best effort: without it the mount works,
    /// only the list is not published.
    async fn attach_prefetch_credential(&self, request: &mut ContainerRequest, repository: &str) {
        let actions = ["pull".to_string(), "push".to_string()];
        let key = TokenKey {
            tenant: &request.tenant,
            registry: &self.build_registry,
            repository,
            actions: &actions,
            credential_ref: "",
        };
        match self.mint(&request.request_id, key).await {
            Ok(credential) => request.prefetch_credential = credential,
            Err(err) => {
                tracing::warn!(request_id = %request.request_id, error = ?err, "no prefetch publishing token; the mount goes without")
            }
        }
    }

    /// Every request gets a build-registry token: push+pull for builds, pull for runtime.
    async fn attach_build_registry_credentials(
        &self,
        request: &mut ContainerRequest,
        kind: RequestKind,
        repository: String,
    ) -> Result<(), EnrichError> {
        let actions = match kind {
            RequestKind::Build => vec!["pull".to_string(), "push".to_string()],
            _ => vec!["pull".to_string()],
        };
        let key = TokenKey {
            tenant: &request.tenant,
            registry: &self.build_registry,
            repository: &repository,
            actions: &actions,
            credential_ref: "",
        };
        let token = self.mint(&request.request_id, key).await;
        // The build registry is private: no credential, no dispatch (fail closed).
        request.build_registry_creds = Some(token?.ok_or_else(|| {
            permanent(
                ErrorCode::NoCredentials,
                format!(
                    "no credentials configured for the build registry {}",
                    self.build_registry
                ),
            )
        })?);
        Ok(())
    }

    /// The user's credential for the registry of `image_ref`, when it is another registry: the
    /// runtime secret recorded for the image id in the tenant (a named credential held by the
    /// credential service, which checks that it is bound to the tenant and covers the
    /// repository), else the registry's default. A registry the credential service has nothing
    /// for is treated as public.
    async fn attach_image_credentials(
        &self,
        request: &mut ContainerRequest,
        image: &Reference,
    ) -> Result<(), EnrichError> {
        let registry = host::normalize(image.registry());
        let credential_ref = self.image_secret(request).await?;
        let key = TokenKey {
            tenant: &request.tenant,
            registry: &registry,
            repository: image.repository(),
            actions: &["pull".to_string()],
            credential_ref: &credential_ref,
        };
        request.image_credentials = self.mint(&request.request_id, key).await?;
        Ok(())
    }

    /// The credential name recorded for a runtime request's image id in its tenant, if any.
    async fn image_secret(&self, request: &ContainerRequest) -> Result<String, EnrichError> {
        if request.kind() != RequestKind::Runtime || request.image_id.is_empty() {
            return Ok(String::new());
        }
        imagemesh_proto::validate_image_id(&request.image_id)
            .map_err(|e| permanent(ErrorCode::MalformedRequest, e))?;
        let entry = self
            .image_secrets
            .get(image_key(&request.tenant, &request.image_id))
            .await
            .map_err(|e| {
                EnrichError::Transient(Rejection::new(
                    ErrorCode::Internal,
                    format!("image-secrets lookup failed: {e}"),
                ))
            })?;
        Ok(entry
            .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
            .unwrap_or_default())
    }

    /// Asks the credential service; `Ok(None)` when it has no credentials for the registry.
    async fn mint(
        &self,
        request_id: &str,
        key: TokenKey<'_>,
    ) -> Result<Option<RegistryCredential>, EnrichError> {
        if let Some(remembered) = self.tokens.get(&key) {
            return Ok(remembered);
        }
        let token_request = TokenRequest {
            registry: key.registry.to_string(),
            scope: Some(Scope {
                repository: key.repository.to_string(),
                actions: key.actions.to_vec(),
            }),
            request_id: request_id.to_string(),
            credential_ref: key.credential_ref.to_string(),
            tenant: key.tenant.to_string(),
            login: false,
        };
        let credential = match self.credentials.mint(&token_request).await {
            Ok(response) => response.credential,
            // Nothing for this registry: a public image. A named credential must exist, though.
            Err(CredentialError::Refused(r))
                if r.code == ErrorCode::NoCredentials && key.credential_ref.is_empty() =>
            {
                None
            }
            Err(err) => return Err(err.into()),
        };
        self.tokens.put(&key, credential.clone());
        Ok(credential)
    }
}

/// Image references parsed before, by their text. Bounded: emptied when full, which costs a
/// re-parse of the images in use, nothing more.
#[derive(Default)]
pub struct ReferenceCache {
    parsed: Mutex<HashMap<String, Arc<Reference>>>,
}

/// References remembered before the cache is emptied.
const MAX_REFERENCES: usize = 4096;

impl ReferenceCache {
    fn parse(&self, reference: &str) -> Result<Arc<Reference>, EnrichError> {
        if let Some(parsed) = self.parsed.lock().expect("lock").get(reference) {
            return Ok(parsed.clone());
        }
        let parsed = Arc::new(parse_reference(reference)?);
        let mut cache = self.parsed.lock().expect("lock");
        if cache.len() >= MAX_REFERENCES {
            cache.clear();
        }
        cache.insert(reference.to_string(), parsed.clone());
        Ok(parsed)
    }
}

fn parse_reference(reference: &str) -> Result<Reference, EnrichError> {
    imagemesh_registry::parse_reference(reference).map_err(|e| {
        permanent(
            ErrorCode::MalformedRequest,
            format!("invalid image reference {reference:?}: {e}"),
        )
    })
}
