//! Base images behind a bearer token: fetched in-process into an OCI layout, then copied into
//! the build's own storage under their own name, so `buildah bud --pull=missing` finds them
//! there and never has to authenticate (it cannot be given a bearer token; see `auth.rs`).
//!
//! The manifest is kept byte for byte as served (for an image index, the linux/amd64 image's);
//! blobs are streamed to files, never held in memory; `buildah pull` checks every digest when it
//! stores the layout.

use std::path::Path;

use futures::StreamExt;
use imagemesh_registry::{PlatformSpec, Reference, RegistryClient, RegistryError};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use tokio::io::AsyncWriteExt;

use crate::failure::Failure;
use crate::layout_push::blob_path;
use crate::log::BuildLog;

/// The tag the image gets inside the layout.
pub const LAYOUT_TAG: &str = "latest";

/// Fetches `image` (its linux/amd64 image) into a new OCI layout at `layout`; returns the digest
/// of its config, which is its image id in buildah's storage.
#[tracing::instrument(name = "fetch base image", skip_all, fields(image = %image))]
pub async fn fetch_to_layout(
    client: &RegistryClient,
    image: &Reference,
    layout: &Path,
    log: &BuildLog,
) -> Result<String, Failure> {
    let fail = |e: &OciDistributionError| -> Failure {
        RegistryError::from_oci(client.registry(), image.repository(), e).into()
    };
    let platform = PlatformSpec::parse("").map_err(Failure::internal)?;
    let resolved = client.resolve_image(image, &platform).await?;
    let raw = &resolved.manifest_bytes;
    let digest = resolved.digest();
    let io = |e: std::io::Error| Failure::internal(format!("cannot write the base image: {e}"));
    tokio::fs::create_dir_all(layout.join("blobs").join("sha256"))
        .await
        .map_err(io)?;
    tokio::fs::write(blob_path(layout, digest)?, raw)
        .await
        .map_err(io)?;
    let blobs = std::iter::once(&resolved.manifest.config).chain(&resolved.manifest.layers);
    for blob in blobs {
        fetch_blob(client, &resolved.reference, blob, layout)
            .await
            .map_err(|e| fail(&e))?;
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": resolved.descriptor.media_type,
            "digest": digest,
            "size": raw.len(),
            "annotations": { "org.opencontainers.image.ref.name": LAYOUT_TAG },
        }],
    });
    tokio::fs::write(layout.join("index.json"), index.to_string())
        .await
        .map_err(io)?;
    tokio::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .await
    .map_err(io)?;
    log.line(&format!(
        "fetched base image {image} ({digest}, {} layers) with its bearer token",
        resolved.manifest.layers.len()
    ))
    .await;
    Ok(resolved.manifest.config.digest.clone())
}

async fn fetch_blob(
    client: &RegistryClient,
    image: &Reference,
    blob: &OciDescriptor,
    layout: &Path,
) -> Result<(), OciDistributionError> {
    let path = blob_path(layout, &blob.digest).map_err(|f| {
        OciDistributionError::GenericError(Some(format!(
            "bad blob digest: {}",
            f.rejection.message
        )))
    })?;
    let mut stream = client.oci().pull_blob_stream(image, blob).await?.stream;
    let mut file = tokio::fs::File::create(&path).await?;
    while let Some(chunk) = stream.next().await {
        file.write_all(&chunk?).await?;
    }
    file.flush().await?;
    Ok(())
}
