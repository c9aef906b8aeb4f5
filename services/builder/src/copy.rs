//! Source-image builds: copy an image into the build registry with oci-client.
//!
//! The manifest is copied byte for byte (so the digest stays the same); each blob is skipped
//! when the target already has it, mounted across repositories when source and target are the
//! same registry (no bytes move), and otherwise streamed from source to target without being
//! held in memory. An image index is copied with every manifest it lists.

use futures::TryStreamExt;
use imagemesh_registry::{MANIFEST_MEDIA_TYPES, Reference, RegistryClient, RegistryError};
use imagemesh_runtime::ErrorCode;
use oci_client::RegistryOperation;
use oci_client::manifest::{
    IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
    OciDescriptor,
};

use crate::failure::Failure;
use crate::log::BuildLog;

/// What a copy moved.
#[derive(Debug, Default)]
pub struct Copied {
    pub digest: String,
    pub mounted: usize,
    pub streamed: usize,
    pub present: usize,
}

/// One source-to-target copy.
pub struct ImageCopy<'a> {
    pub source: &'a RegistryClient,
    pub target: &'a RegistryClient,
    pub log: &'a BuildLog,
}

impl ImageCopy<'_> {
    /// Copies `from` to `to` (tag or index and all its manifests).
    #[tracing::instrument(name = "copy image", skip_all, fields(from = %from, to = %to))]
    pub async fn copy(&self, from: &Reference, to: &Reference) -> Result<Copied, Failure> {
        self.source
            .oci()
            .auth(from, self.source.auth(), RegistryOperation::Pull)
            .await
            .map_err(|e| src_error(self.source, from, &e))?;
        self.target
            .oci()
            .auth(to, self.target.auth(), RegistryOperation::Push)
            .await
            .map_err(|e| src_error(self.target, to, &e))?;
        let mut copied = Copied::default();
        let (raw, digest) = self.pull_manifest(from).await?;
        let manifest: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| {
            Failure::reject(
                ErrorCode::InvalidImage,
                format!("{from}: unreadable manifest: {e}"),
            )
        })?;
        let media_type = media_type(&manifest);
        if let Some(children) = manifest["manifests"].as_array() {
            for child in children {
                let child_digest = child["digest"].as_str().unwrap_or_default();
                let child_from = from.clone_with_digest(child_digest.to_string());
                let child_to = to.clone_with_digest(child_digest.to_string());
                let (child_raw, _) = self.pull_manifest(&child_from).await?;
                let child_manifest: serde_json::Value = serde_json::from_slice(&child_raw)
                    .map_err(|e| {
                        Failure::reject(ErrorCode::InvalidImage, format!("{child_from}: {e}"))
                    })?;
                self.copy_blobs(&child_from, &child_to, &child_manifest, &mut copied)
                    .await?;
                self.push_manifest(&child_to, child_raw, &media_type_or(&child_manifest, child))
                    .await?;
            }
        } else {
            self.copy_blobs(from, to, &manifest, &mut copied).await?;
        }
        self.push_manifest(to, raw, &media_type).await?;
        copied.digest = digest;
        Ok(copied)
    }

    async fn pull_manifest(&self, from: &Reference) -> Result<(bytes::Bytes, String), Failure> {
        self.source
            .oci()
            .pull_manifest_raw(from, self.source.auth(), MANIFEST_MEDIA_TYPES)
            .await
            .map_err(|e| src_error(self.source, from, &e))
    }

    async fn push_manifest(
        &self,
        to: &Reference,
        raw: bytes::Bytes,
        media_type: &str,
    ) -> Result<(), Failure> {
        let content_type = media_type.parse().map_err(|_| {
            Failure::reject(
                ErrorCode::InvalidImage,
                format!("bad media type {media_type:?}"),
            )
        })?;
        self.target
            .push_manifest(to, raw, content_type)
            .await
            .map_err(|e| src_error(self.target, to, &e))?;
        Ok(())
    }

    async fn copy_blobs(
        &self,
        from: &Reference,
        to: &Reference,
        manifest: &serde_json::Value,
        copied: &mut Copied,
    ) -> Result<(), Failure> {
        let config = std::iter::once(&manifest["config"]);
        let layers = manifest["layers"].as_array().into_iter().flatten();
        for blob in config.chain(layers) {
            let descriptor = descriptor(blob).ok_or_else(|| {
                Failure::reject(
                    ErrorCode::InvalidImage,
                    format!("{from}: manifest lists a blob without digest"),
                )
            })?;
            self.copy_blob(from, to, &descriptor, copied).await?;
        }
        Ok(())
    }

    async fn copy_blob(
        &self,
        from: &Reference,
        to: &Reference,
        blob: &OciDescriptor,
        copied: &mut Copied,
    ) -> Result<(), Failure> {
        let target = self.target.oci();
        if target.blob_exists(to, &blob.digest).await.unwrap_or(false) {
            copied.present += 1;
            return Ok(());
        }
        let same_registry = self.source.registry() == self.target.registry();
        if same_registry && target.mount_blob(to, from, &blob.digest).await.is_ok() {
            self.log
                .line(&format!(
                    "mounted blob {} from {}",
                    blob.digest,
                    from.repository()
                ))
                .await;
            copied.mounted += 1;
            return Ok(());
        }
        let stream = self
            .source
            .oci()
            .pull_blob_stream(from, blob)
            .await
            .map_err(|e| src_error(self.source, from, &e))?;
        let bytes = stream
            .stream
            .map_err(oci_client::errors::OciDistributionError::from);
        let pushed = target
            .push_blob_stream(to, bytes, &blob.digest, Some(blob.size as u64))
            .await;
        if let Err(err) = pushed
            && !self
                .target
                .pushed_concurrently(to, &blob.digest, &err)
                .await
        {
            return Err(src_error(self.target, to, &err));
        }
        self.log
            .line(&format!(
                "copied blob {} ({} bytes)",
                blob.digest, blob.size
            ))
            .await;
        copied.streamed += 1;
        Ok(())
    }
}

fn src_error(
    client: &RegistryClient,
    reference: &Reference,
    err: &oci_client::errors::OciDistributionError,
) -> Failure {
    RegistryError::from_oci(client.registry(), reference.repository(), err).into()
}

fn descriptor(value: &serde_json::Value) -> Option<OciDescriptor> {
    Some(OciDescriptor {
        digest: value["digest"].as_str()?.to_string(),
        size: value["size"].as_i64().unwrap_or_default(),
        media_type: value["mediaType"]
            .as_str()
            .unwrap_or(IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE)
            .to_string(),
        ..Default::default()
    })
}

fn media_type(manifest: &serde_json::Value) -> String {
    match manifest["mediaType"].as_str() {
        Some(media_type) => media_type.to_string(),
        // OCI manifests may omit mediaType; an index is recognised by its `manifests`.
        None if manifest.get("manifests").is_some() => OCI_IMAGE_INDEX_MEDIA_TYPE.to_string(),
        None => OCI_IMAGE_MEDIA_TYPE.to_string(),
    }
}

fn media_type_or(manifest: &serde_json::Value, descriptor: &serde_json::Value) -> String {
    manifest["mediaType"]
        .as_str()
        .or(descriptor["mediaType"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| media_type(manifest))
}
