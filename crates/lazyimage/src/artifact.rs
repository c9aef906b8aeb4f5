//! The lazy-mount index of an image, stored next to it as an OCI artifact.
//!
//! The artifact is an image manifest with `artifactType` [`INDEX_ARTIFACT_TYPE`], an empty
//! config, one layer (the encoded index, [`INDEX_MEDIA_TYPE`]) and `subject` = the image
//! manifest. Registries with the referrers API list it under the image; for those without it
//! (distribution 2.8) the indexer also maintains the referrers tag schema: an image index tagged
//! `sha256-<hex>` (the subject digest) listing every referrer. [`find_index_artifact`] tries
//! the API and falls back to the tag, so readers work with either.

use std::sync::Arc;

use imagemesh_lazyindex::{
    DecodeLimits, FORMAT_VERSION, ImageIndex, decode_image, decode_image_head,
};
use imagemesh_registry::{RegistryClient, RegistryError, RegistryErrorKind, ResolvedImage};
use oci_client::Reference;
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest, OciManifest};

/// `artifactType` of the index artifact manifest.
pub const INDEX_ARTIFACT_TYPE: &str = "application/vnd.imagemesh.index.v1";
/// Media type of the artifact's one layer: the encoded index (`docs/index-format.md`).
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.imagemesh.index.v1.imlzidx";
/// Annotation carrying the index format version, so readers skip versions they cannot decode
/// and the indexer re-indexes after a format change.
pub const FORMAT_VERSION_ANNOTATION: &str = "dev.imagemesh.index.format-version";
/// Annotation of the index blob's descriptor: the length of the index's head (header and
/// metadata, everything but the windows), so a reader can fetch it alone.
pub const HEAD_SIZE_ANNOTATION: &str = "dev.imagemesh.index.head-size";
/// Annotation of the index blob's descriptor: `sha256:<hex>` of the head, which a reader that
/// fetched the head alone checks it against (the windows carry their own digests).
pub const HEAD_DIGEST_ANNOTATION: &str = "dev.imagemesh.index.head-digest";
/// Media type of the empty config the OCI 1.1 artifact guidance prescribes.
pub const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// Largest index blob a reader accepts (an index is 1–3 % of its image; a mount downloads
/// only its head).
pub const MAX_INDEX_SIZE: i64 = 1 << 30;

/// The referrers-tag-schema tag of a subject: `sha256:abc…` → `sha256-abc…`.
pub fn referrers_tag(subject_digest: &str) -> String {
    subject_digest.replace(':', "-")
}

/// An index artifact found for an image manifest.
#[derive(Debug, Clone)]
pub struct IndexArtifact {
    /// Digest of the artifact manifest (what the image-refs KV records).
    pub digest: String,
    pub manifest: OciImageManifest,
}

impl IndexArtifact {
    /// The descriptor of the encoded index blob.
    pub fn blob(&self) -> Option<&OciDescriptor> {
        self.manifest
            .layers
            .iter()
            .find(|l| l.media_type == INDEX_MEDIA_TYPE)
    }
}

/// An image's decoded lazy-mount index, checked to describe exactly that image.
#[derive(Debug)]
pub struct LoadedIndex {
    /// The index; when it was loaded from its head alone its windows are remote
    /// (`index.remote_windows`), fetched from the index blob as reads need them.
    pub index: Arc<ImageIndex>,
    /// Digest of the index artifact manifest.
    pub digest: String,
    /// Bytes of the encoded index downloaded: its head, or all of it (none when shared).
    pub bytes: u64,
    /// Taken from a live mount of the same image and index ([`load_index_sharing`]): nothing
    /// was downloaded or decoded.
    pub shared: bool,
}

/// Why an image's index cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IndexLoadError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The image has no index of this format (yet).
    #[error("{0}")]
    NotIndexed(String),
    /// The index is unreadable or describes another image.
    #[error("{0}")]
    Invalid(String),
}

/// The manifest (and its digest) of the newest referrer of image manifest `subject_digest` in
/// `image`'s repository listed under `artifact_type` that `accept` takes; `None` when there is
/// none. The index and the prefetch list are found this way.
pub(crate) async fn newest_referrer(
    client: &RegistryClient,
    image: &Reference,
    subject_digest: &str,
    artifact_type: &str,
    accept: impl Fn(&ImageIndexEntry) -> bool,
) -> Result<Option<(OciManifest, String)>, RegistryError> {
    let fail = |e: &oci_client::errors::OciDistributionError| {
        RegistryError::from_oci(client.registry(), image.repository(), e)
    };
    let subject = image.clone_with_digest(subject_digest.to_string());
    client
        .oci()
        .store_auth_if_needed(subject.resolve_registry(), client.auth())
        .await;
    let referrers = client
        .oci()
        .pull_referrers(&subject, Some(artifact_type))
        .await
        .map_err(|e| fail(&e))?;
    // Newest last: writers append; a registry's API lists in its own order, any will do.
    let Some(entry) = referrers.manifests.iter().rev().find(|e| accept(e)) else {
        return Ok(None);
    };
    let reference = image.clone_with_digest(entry.digest.clone());
    let pulled = client
        .oci()
        .pull_manifest(&reference, client.auth())
        .await
        .map_err(|e| fail(&e))?;
    Ok(Some(pulled))
}

/// Finds the index artifact of the image manifest `subject_digest` in `image`'s repository
/// whose format version is `format_version`; `None` when the image is not indexed (yet).
pub async fn find_index_artifact(
    client: &RegistryClient,
    image: &Reference,
    subject_digest: &str,
    format_version: u16,
) -> Result<Option<IndexArtifact>, RegistryError> {
    let version = format_version.to_string();
    let newest = newest_referrer(client, image, subject_digest, INDEX_ARTIFACT_TYPE, |e| {
        e.annotations
            .as_ref()
            .and_then(|a| a.get(FORMAT_VERSION_ANNOTATION))
            == Some(&version)
    })
    .await?;
    let Some((manifest, digest)) = newest else {
        return Ok(None);
    };
    match manifest {
        OciManifest::Image(manifest) if is_index_of(&manifest, subject_digest) => {
            Ok(Some(IndexArtifact { digest, manifest }))
        }
        _ => Err(unusable(
            client,
            image,
            "a listed index artifact is not one",
        )),
    }
}

/// Downloads the encoded index of `artifact` (digest-verified by oci-client).
pub async fn pull_index_blob(
    client: &RegistryClient,
    image: &Reference,
    artifact: &IndexArtifact,
) -> Result<Vec<u8>, RegistryError> {
    let blob = artifact
        .blob()
        .ok_or_else(|| unusable(client, image, "the index artifact has no index layer"))?;
    if !(0..=MAX_INDEX_SIZE).contains(&blob.size) {
        return Err(unusable(
            client,
            image,
            format!("index blob of {} bytes", blob.size),
        ));
    }
    let mut out = Vec::with_capacity(blob.size as usize);
    client
        .oci()
        .pull_blob(image, blob, &mut out)
        .await
        .map_err(|e| RegistryError::from_oci(client.registry(), image.repository(), &e))?;
    Ok(out)
}

/// Finds, downloads and decodes the index of `resolved` (format [`FORMAT_VERSION`]) and
/// checks that it describes that manifest and its layers, blob for blob: reads fetch by the
/// index's layer digests.
pub async fn load_index(
    client: &RegistryClient,
    resolved: &ResolvedImage,
) -> Result<LoadedIndex, IndexLoadError> {
    load_index_sharing(client, resolved, |_| None).await
}

/// [`load_index`], unless `live(index artifact digest)` already holds that index (a mount of
/// the same image through the same index artifact, in this process): then it is shared, not
/// downloaded and decoded again, so containers starting together on one image prepare one
/// index, not one each. The artifact is still found with this client's credential (the
/// referrers of the manifest it resolved), so sharing proves the same access as loading.
pub async fn load_index_sharing(
    client: &RegistryClient,
    resolved: &ResolvedImage,
    live: impl FnOnce(&str) -> Option<Arc<ImageIndex>>,
) -> Result<LoadedIndex, IndexLoadError> {
    let digest = resolved.digest();
    let artifact = find_index_artifact(client, &resolved.reference, digest, FORMAT_VERSION)
        .await?
        .ok_or_else(|| {
            IndexLoadError::NotIndexed(format!(
                "image is not indexed: {} has no imagemesh index (format {FORMAT_VERSION}) in the registry",
                resolved.reference.whole()
            ))
        })?;
    let (index, bytes, shared) = match live(&artifact.digest) {
        Some(index) => (index, 0, true),
        None => {
            let (index, bytes) = load_encoded(client, resolved, &artifact).await?;
            (Arc::new(index), bytes, false)
        }
    };
    if index.manifest_digest.as_deref() != Some(digest) {
        return Err(IndexLoadError::Invalid(format!(
            "index {} describes manifest {}, not {digest}",
            artifact.digest,
            index.manifest_digest.as_deref().unwrap_or("(none)")
        )));
    }
    let manifest_layers: Vec<(&str, u64)> = resolved
        .manifest
        .layers
        .iter()
        .map(|l| (l.digest.as_str(), l.size.max(0) as u64))
        .collect();
    let indexed_layers: Vec<(&str, u64)> = index
        .layers
        .iter()
        .map(|l| (l.digest.as_str(), l.compressed_size))
        .collect();
    if manifest_layers != indexed_layers {
        return Err(IndexLoadError::Invalid(format!(
            "index {} lists other layers than the image manifest",
            artifact.digest
        )));
    }
    Ok(LoadedIndex {
        index,
        digest: artifact.digest,
        bytes,
        shared,
    })
}

/// The index `artifact` holds, from its head when its descriptor announces one, else whole;
/// with the bytes downloaded.
async fn load_encoded(
    client: &RegistryClient,
    resolved: &ResolvedImage,
    artifact: &IndexArtifact,
) -> Result<(ImageIndex, u64), IndexLoadError> {
    if let Some(head) = head_of(artifact) {
        return load_head(client, resolved, artifact, head).await;
    }
    let blob = pull_index_blob(client, &resolved.reference, artifact).await?;
    let bytes = blob.len() as u64;
    // Decoding validates every count and offset: CPU work proportional to the index.
    let index = crate::blocking::run(move || decode_image(&blob))
        .await
        .map_err(|e| IndexLoadError::Invalid(format!("decoding the index failed: {e}")))?
        .map_err(|e| IndexLoadError::Invalid(format!("index {}: {e}", artifact.digest)))?;
    Ok((index, bytes))
}

/// The head an index blob's descriptor announces: (blob descriptor, head size, head digest).
fn head_of(artifact: &IndexArtifact) -> Option<(&OciDescriptor, u64, &str)> {
    let blob = artifact.blob()?;
    let annotations = blob.annotations.as_ref()?;
    let size = annotations.get(HEAD_SIZE_ANNOTATION)?.parse().ok()?;
    let digest = annotations.get(HEAD_DIGEST_ANNOTATION)?;
    Some((blob, size, digest))
}

/// Fetches the head of the index blob with one range request, checks it against the digest
/// the artifact manifest names, and decodes it; the windows stay in the registry.
async fn load_head(
    client: &RegistryClient,
    resolved: &ResolvedImage,
    artifact: &IndexArtifact,
    (blob, size, digest): (&OciDescriptor, u64, &str),
) -> Result<(ImageIndex, u64), IndexLoadError> {
    let invalid =
        |detail: String| IndexLoadError::Invalid(format!("index {}: {detail}", artifact.digest));
    let blob_size = u64::try_from(blob.size).unwrap_or(0);
    if size > blob_size || blob_size > MAX_INDEX_SIZE as u64 {
        return Err(invalid(format!(
            "a head of {size} bytes in a blob of {blob_size}"
        )));
    }
    client
        .oci()
        .store_auth_if_needed(resolved.reference.resolve_registry(), client.auth())
        .await;
    let head =
        crate::registry_source::fetch_range(client, &resolved.reference, &blob.digest, 0..size)
            .await?;
    let expected = digest.to_string();
    let blob_digest = blob.digest.clone();
    let index = crate::blocking::run(move || {
        use sha2::{Digest, Sha256};
        if format!("sha256:{:x}", Sha256::digest(&head)) != expected {
            return Err("its head does not match the digest its manifest names".to_string());
        }
        let mut index =
            decode_image_head(&head, &DecodeLimits::default()).map_err(|e| e.to_string())?;
        let windows = index
            .remote_windows
            .as_mut()
            .expect("decoded from the head");
        let end = windows
            .ranges
            .iter()
            .flatten()
            .map(|r| r.end)
            .max()
            .unwrap_or(0);
        if end > blob_size {
            return Err(format!(
                "windows run to byte {end} of a {blob_size}-byte blob"
            ));
        }
        windows.blob = blob_digest;
        Ok(index)
    })
    .await
    .map_err(|e| IndexLoadError::Invalid(format!("decoding the index failed: {e}")))?
    .map_err(invalid)?;
    Ok((index, size))
}

fn unusable(
    client: &RegistryClient,
    image: &Reference,
    detail: impl Into<String>,
) -> RegistryError {
    RegistryError::new(
        RegistryErrorKind::Invalid,
        client.registry(),
        image.repository(),
        detail,
    )
}

/// True when `manifest` is an imagemesh index artifact whose subject is `subject_digest`.
pub fn is_index_of(manifest: &OciImageManifest, subject_digest: &str) -> bool {
    manifest.artifact_type.as_deref() == Some(INDEX_ARTIFACT_TYPE)
        && manifest
            .subject
            .as_ref()
            .is_some_and(|s| s.digest == subject_digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_tag_follows_the_referrers_tag_schema() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            referrers_tag(&digest),
            format!("sha256-{}", "ab".repeat(32))
        );
    }
}
