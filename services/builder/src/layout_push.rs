//! Pushing a built image: buildah writes it to an OCI layout in the build directory, and this
//! module streams the layout's blobs to the build registry with oci-client, with whatever the
//! build token is (Basic or bearer).
//!
//! buildah takes registry credentials only as `user:secret` (see `auth.rs`), but the credential
//! service answers for token-auth and issuer registries with a scoped bearer token; and the
//! history must lose the build arguments' values before the push (`history.rs`). The manifest
//! is pushed byte for byte, so its digest is the one the layout holds; blobs the
//! registry already has are skipped, the others are streamed from their files, never held in
//! memory.

use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use imagemesh_registry::{Reference, RegistryClient, RegistryError};
use imagemesh_runtime::ErrorCode;
use oci_client::RegistryOperation;
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageIndex, OciImageManifest};
use sha2::{Digest, Sha256};

use crate::failure::Failure;
use crate::log::BuildLog;

/// Read size for streamed blobs.
const CHUNK: usize = 1 << 20;

/// Pushes the image in the OCI layout at `layout` to `to`; returns the manifest digest.
#[tracing::instrument(name = "push layout", skip_all, fields(to = %to))]
pub async fn push_layout(
    layout: &Path,
    target: &RegistryClient,
    to: &Reference,
    log: &BuildLog,
) -> Result<String, Failure> {
    let fail = |e: &OciDistributionError| -> Failure {
        RegistryError::from_oci(target.registry(), to.repository(), e).into()
    };
    let index: OciImageIndex = read_json(&layout.join("index.json"))?;
    let descriptor = index
        .manifests
        .first()
        .ok_or_else(|| Failure::internal("buildah wrote an OCI layout without a manifest"))?;
    let raw = std::fs::read(blob_path(layout, &descriptor.digest)?)
        .map_err(|e| Failure::internal(format!("cannot read the built manifest: {e}")))?;
    let digest = format!("sha256:{:x}", Sha256::digest(&raw));
    if digest != descriptor.digest {
        return Err(Failure::internal(format!(
            "the built manifest does not match its digest {}",
            descriptor.digest
        )));
    }
    let manifest: OciImageManifest = serde_json::from_slice(&raw)
        .map_err(|e| Failure::internal(format!("unreadable built manifest: {e}")))?;

    target
        .oci()
        .auth(to, target.auth(), RegistryOperation::Push)
        .await
        .map_err(|e| fail(&e))?;
    for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
        push_blob(layout, target, to, blob, log)
            .await
            .map_err(|e| fail(&e))?;
    }
    let media_type = manifest
        .media_type
        .as_deref()
        .unwrap_or(OCI_IMAGE_MEDIA_TYPE)
        .parse()
        .map_err(|_| Failure::internal("the built manifest has a bad media type"))?;
    target
        .push_manifest(to, bytes::Bytes::from(raw), media_type)
        .await
        .map_err(|e| fail(&e))?;
    Ok(digest)
}

async fn push_blob(
    layout: &Path,
    target: &RegistryClient,
    to: &Reference,
    blob: &OciDescriptor,
    log: &BuildLog,
) -> Result<(), OciDistributionError> {
    if target.oci().blob_exists(to, &blob.digest).await? {
        return Ok(());
    }
    let path = blob_path(layout, &blob.digest).map_err(|f| {
        OciDistributionError::GenericError(Some(format!(
            "bad blob digest: {}",
            f.rejection.message
        )))
    })?;
    let file = tokio::fs::File::open(&path).await?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file, CHUNK)
        .map_err(OciDistributionError::from);
    let pushed = target
        .oci()
        .push_blob_stream(to, stream, &blob.digest, Some(blob.size as u64))
        .await;
    if let Err(err) = pushed
        && !target.pushed_concurrently(to, &blob.digest, &err).await
    {
        return Err(err);
    }
    log.line(&format!(
        "pushed blob {} ({} bytes)",
        blob.digest, blob.size
    ))
    .await;
    Ok(())
}

/// `blobs/sha256/<hex>` of a digest, refusing anything that is not a sha256 digest (the
/// digest comes from a file on disk; it must not name a path outside the layout).
pub(crate) fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, Failure> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            Failure::reject(
                ErrorCode::InvalidImage,
                format!("not a sha256 digest: {digest:?}"),
            )
        })?;
    Ok(layout.join("blobs").join("sha256").join(hex))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Failure> {
    let bytes = std::fs::read(path)
        .map_err(|e| Failure::internal(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Failure::internal(format!("unreadable {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_paths_stay_inside_the_layout() {
        let layout = Path::new("/layout");
        let hex = "a".repeat(64);
        assert_eq!(
            blob_path(layout, &format!("sha256:{hex}")).unwrap(),
            layout.join("blobs/sha256").join(&hex)
        );
        for bad in ["sha256:../../etc/passwd", "sha512:abc", "", "sha256:"] {
            assert!(blob_path(layout, bad).is_err(), "{bad}");
        }
    }
}
