//! Finding what to mount: the image manifest of the configured platform and its lazy-mount
//! index, read from the registry with the request's credential.

use std::sync::Arc;

use imagemesh_lazyindex::{FORMAT_VERSION, ImageIndex, decode_image};
use imagemesh_registry::{PlatformSpec, Reference, RegistryClient, RegistryError, ResolvedImage};
use imagemesh_runtime::worker::Outcome;
use imagemesh_runtime::{ErrorCode, Rejection};

/// An image ready to mount.
pub struct OpenedImage {
    pub resolved: ResolvedImage,
    pub index: Arc<ImageIndex>,
    pub index_digest: String,
    pub index_bytes: u64,
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

/// Resolves `image` to `platform`'s manifest: the first request the credential must pass.
pub async fn resolve(
    client: &RegistryClient,
    image: &Reference,
    platform: &PlatformSpec,
) -> Result<ResolvedImage, OpenError> {
    Ok(client.resolve_image(image, platform).await?)
}

/// Loads the index that describes `resolved` and checks it is that image's.
pub async fn load_index(
    client: &RegistryClient,
    image: &Reference,
    resolved: ResolvedImage,
) -> Result<OpenedImage, OpenError> {
    let digest = resolved.digest().to_string();
    let artifact = client
        .find_index_artifact(&resolved.reference, &digest, FORMAT_VERSION)
        .await?
        .ok_or_else(|| {
            OpenError::NotIndexed(format!(
                "image is not indexed: {} ({digest}) has no imagemesh index (format {FORMAT_VERSION}) in the registry",
                image.whole()
            ))
        })?;
    let blob = client
        .pull_index_blob(&resolved.reference, &artifact)
        .await?;
    let index_bytes = blob.len() as u64;
    // Decoding validates every count and offset; it is CPU work proportional to the index.
    let index = tokio::task::spawn_blocking(move || decode_image(&blob))
        .await
        .map_err(|e| OpenError::BadIndex(format!("decoding the index failed: {e}")))?
        .map_err(|e| OpenError::BadIndex(format!("index {}: {e}", artifact.digest)))?;
    if index.manifest_digest.as_deref() != Some(digest.as_str()) {
        return Err(OpenError::BadIndex(format!(
            "index {} describes manifest {}, not {digest}",
            artifact.digest,
            index.manifest_digest.as_deref().unwrap_or("(none)")
        )));
    }
    check_layers(&resolved, &index, &artifact.digest)?;
    Ok(OpenedImage {
        resolved,
        index: Arc::new(index),
        index_digest: artifact.digest,
        index_bytes,
    })
}

/// The index's layers must be the manifest's, blob for blob: reads fetch by these digests.
fn check_layers(
    resolved: &ResolvedImage,
    index: &ImageIndex,
    index_digest: &str,
) -> Result<(), OpenError> {
    let manifest: Vec<(&str, u64)> = resolved
        .manifest
        .layers
        .iter()
        .map(|l| (l.digest.as_str(), l.size.max(0) as u64))
        .collect();
    let indexed: Vec<(&str, u64)> = index
        .layers
        .iter()
        .map(|l| (l.digest.as_str(), l.compressed_size))
        .collect();
    if manifest != indexed {
        return Err(OpenError::BadIndex(format!(
            "index {index_digest} lists other layers than the image manifest"
        )));
    }
    Ok(())
}
