//! Finding what to mount: the image manifest of the configured platform and its lazy-mount
//! index, read from the registry with the request's credential.

use std::sync::Arc;

use imagemesh_lazyimage::IndexLoadError;
use imagemesh_lazyindex::ImageIndex;
use imagemesh_registry::{PlatformSpec, Reference, RegistryClient, RegistryError, ResolvedImage};
use imagemesh_runtime::worker::Outcome;
use imagemesh_runtime::{ErrorCode, Rejection};

/// An image ready to mount.
pub struct OpenedImage {
    pub resolved: ResolvedImage,
    pub index: Arc<ImageIndex>,
    pub index_digest: String,
    pub index_bytes: u64,
    /// The index is a live mount's, shared (`load_index`'s `live`).
    pub index_shared: bool,
}

/// Why an image cannot be mounted, classified for the work loop.
#[derive(Debug)]
pub enum OpenError {
    Registry(RegistryError),
    NotIndexed(String),
    BadIndex(String),
}

impl OpenError {
    /// Registry outages are retried; everything else is final.
    pub fn into_outcome(self) -> Outcome {
        match self {
            OpenError::Registry(err) => {
                let retryable = err.is_retryable();
                Outcome::failed(Rejection::new(err.error_code(), err.to_string()), retryable)
            }
            OpenError::NotIndexed(message) => {
                Outcome::Reject(Rejection::new(ErrorCode::NotFound, message))
            }
            OpenError::BadIndex(message) => {
                Outcome::Reject(Rejection::new(ErrorCode::InvalidImage, message))
            }
        }
    }
}

impl From<RegistryError> for OpenError {
    fn from(err: RegistryError) -> Self {
        OpenError::Registry(err)
    }
}

impl From<IndexLoadError> for OpenError {
    fn from(err: IndexLoadError) -> Self {
        match err {
            IndexLoadError::Registry(err) => OpenError::Registry(err),
            IndexLoadError::NotIndexed(message) => OpenError::NotIndexed(message),
            IndexLoadError::Invalid(message) => OpenError::BadIndex(message),
        }
    }
}

/// Resolves `image` to `platform`'s manifest: the first request the credential must pass.
pub async fn resolve(
    client: &RegistryClient,
    image: &Reference,
    platform: &PlatformSpec,
) -> Result<ResolvedImage, OpenError> {
    Ok(client.resolve_image(image, platform).await?)
}

/// Loads the index that describes `resolved` and checks it is that image's; shares the index
/// `live(index digest)` holds instead, when it holds it (a live mount of the same image).
pub async fn load_index(
    client: &RegistryClient,
    resolved: ResolvedImage,
    live: impl FnOnce(&str) -> Option<Arc<ImageIndex>>,
) -> Result<OpenedImage, OpenError> {
    let loaded = imagemesh_lazyimage::load_index_sharing(client, &resolved, live).await?;
    Ok(OpenedImage {
        resolved,
        index: loaded.index,
        index_digest: loaded.digest,
        index_bytes: loaded.bytes,
        index_shared: loaded.shared,
    })
}
