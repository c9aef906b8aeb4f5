//! Storing an encoded image index next to its image: an OCI artifact whose `subject` is the
//! image manifest, plus the referrers-tag-schema index so registries without the referrers API
//! (distribution 2.8) can list it. `docs/index-format.md` ("Storage in the registry") describes
//! the layout.
//!
//! Everything pushed is deterministic for a given image and index (no timestamps), so two
//! indexers racing on one image push byte-identical manifests.

use std::collections::BTreeMap;

use bytes::Bytes;
use imagemesh_lazyindex::FORMAT_VERSION;
use imagemesh_registry::{
    Reference, RegistryClient, RegistryError, RegistryErrorKind, ResolvedImage,
};
use oci_client::manifest::{
    ImageIndexEntry, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor,
    OciImageIndex, OciImageManifest, OciManifest,
};
use sha2::{Digest, Sha256};

use crate::artifact::{
    EMPTY_CONFIG_MEDIA_TYPE, FORMAT_VERSION_ANNOTATION, HEAD_DIGEST_ANNOTATION,
    HEAD_SIZE_ANNOTATION, INDEX_ARTIFACT_TYPE, INDEX_MEDIA_TYPE, referrers_tag,
};

/// The OCI empty descriptor's content.
const EMPTY_CONFIG: &[u8] = b"{}";

/// Where an index was stored.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Digest of the artifact manifest.
    pub digest: String,
    /// The referrers-tag-schema tag listing it.
    pub tag: String,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Pushes `encoded` as the index artifact of `image` and lists it under the fallback tag.
#[tracing::instrument(name = "store index", skip_all, fields(registry = client.registry(), repository = image.reference.repository(), index_bytes = encoded.len()))]
pub async fn push_index(
    client: &RegistryClient,
    image: &ResolvedImage,
    encoded: Vec<u8>,
) -> Result<Stored, RegistryError> {
    store(client, image, encoded).await.map_err(|mut err| {
        // Everything pushed here is well-formed: a 400 is the registry losing a race between
        // writers of the same repository (identical images indexed at once update one
        // referrers tag and upload the same blobs), which the next delivery wins.
        if err.kind == RegistryErrorKind::Invalid {
            err.kind = RegistryErrorKind::Unavailable;
        }
        err
    })
}

/// What kind of referrer an artifact is: its `artifactType`, the media type of its one layer,
/// and the annotation naming its format version (replaced in the referrers tag by a newer push
/// of the same kind and version, while every other referrer is kept).
#[derive(Debug, Clone, Copy)]
pub struct ArtifactKind {
    pub artifact_type: &'static str,
    pub media_type: &'static str,
    pub version_annotation: &'static str,
    pub version: u16,
}

/// The index artifact (`docs/index-format.md`).
pub const INDEX_ARTIFACT: ArtifactKind = ArtifactKind {
    artifact_type: INDEX_ARTIFACT_TYPE,
    media_type: INDEX_MEDIA_TYPE,
    version_annotation: FORMAT_VERSION_ANNOTATION,
    version: FORMAT_VERSION,
};

async fn store(
    client: &RegistryClient,
    image: &ResolvedImage,
    encoded: Vec<u8>,
) -> Result<Stored, RegistryError> {
    let head = imagemesh_lazyindex::head_len(&encoded).map_err(|e| {
        RegistryError::new(
            RegistryErrorKind::Invalid,
            client.registry(),
            image.reference.repository(),
            format!("not an encoded index: {e}"),
        )
    })?;
    // The head's size and digest, on the blob's descriptor: a reader fetches the head alone
    // with one range request and checks it as the manifest (fetched by digest) says.
    let head_annotations = BTreeMap::from([
        (HEAD_SIZE_ANNOTATION.to_string(), head.to_string()),
        (
            HEAD_DIGEST_ANNOTATION.to_string(),
            sha256(&encoded[..head.min(encoded.len())]),
        ),
    ]);
    store_artifact(
        client,
        image,
        INDEX_ARTIFACT,
        encoded,
        Some(head_annotations),
    )
    .await
}

/// Pushes `blob` as a referrer of `image` of `kind` (blob with `blob_annotations`, empty
/// config, manifest) and lists it under the referrers tag.
pub(crate) async fn store_artifact(
    client: &RegistryClient,
    image: &ResolvedImage,
    kind: ArtifactKind,
    encoded: Vec<u8>,
    blob_annotations: Option<BTreeMap<String, String>>,
) -> Result<Stored, RegistryError> {
    let repo = &image.reference;
    let fail = |e: oci_client::errors::OciDistributionError| {
        RegistryError::from_oci(client.registry(), repo.repository(), &e)
    };
    let blob = OciDescriptor {
        media_type: kind.media_type.into(),
        digest: sha256(&encoded),
        size: encoded.len() as i64,
        annotations: blob_annotations,
        ..Default::default()
    };
    push_blob(client, repo, Bytes::from(encoded), &blob.digest).await?;
    push_blob(
        client,
        repo,
        Bytes::from_static(EMPTY_CONFIG),
        &sha256(EMPTY_CONFIG),
    )
    .await?;
    let manifest = artifact_manifest(image, kind, blob);
    let body = serde_json::to_vec(&manifest).expect("manifests serialise");
    let digest = sha256(&body);
    let entry = ImageIndexEntry {
        media_type: OCI_IMAGE_MEDIA_TYPE.into(),
        digest: digest.clone(),
        size: body.len() as i64,
        platform: None,
        // The referrers API copies the referrer's annotations into its listing; so do we.
        annotations: manifest.annotations.clone(),
        artifact_type: Some(kind.artifact_type.into()),
    };
    client
        .push_manifest(
            &repo.clone_with_digest(digest.clone()),
            body.into(),
            OCI_IMAGE_MEDIA_TYPE.parse().expect("static header value"),
        )
        .await
        .map_err(fail)?;
    let tag = list_referrer(client, image, kind, entry).await?;
    Ok(Stored { digest, tag })
}

/// Uploads a blob unless the repository already has it (re-indexing after a lost ack).
async fn push_blob(
    client: &RegistryClient,
    repo: &Reference,
    data: Bytes,
    digest: &str,
) -> Result<(), RegistryError> {
    let fail = |e: oci_client::errors::OciDistributionError| {
        RegistryError::from_oci(client.registry(), repo.repository(), &e)
    };
    if client.oci().blob_exists(repo, digest).await.map_err(fail)? {
        return Ok(());
    }
    match client.oci().push_blob(repo, data, digest).await {
        Ok(_) => Ok(()),
        // Indexers of several images push the same small blobs (the empty config) at once.
        Err(err) if client.pushed_concurrently(repo, digest, &err).await => Ok(()),
        Err(err) => Err(fail(err)),
    }
}

fn artifact_manifest(
    image: &ResolvedImage,
    kind: ArtifactKind,
    blob: OciDescriptor,
) -> OciImageManifest {
    let annotations = BTreeMap::from([(
        kind.version_annotation.to_string(),
        kind.version.to_string(),
    )]);
    OciImageManifest {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.into()),
        artifact_type: Some(kind.artifact_type.into()),
        config: OciDescriptor {
            media_type: EMPTY_CONFIG_MEDIA_TYPE.into(),
            digest: sha256(EMPTY_CONFIG),
            size: EMPTY_CONFIG.len() as i64,
            ..Default::default()
        },
        layers: vec![blob],
        subject: Some(image.descriptor.clone()),
        annotations: Some(annotations),
    }
}

/// Adds `entry` to the referrers index under the image's fallback tag (read, merge, write),
/// replacing referrers of the same kind and format version and keeping every other referrer.
async fn list_referrer(
    client: &RegistryClient,
    image: &ResolvedImage,
    kind: ArtifactKind,
    entry: ImageIndexEntry,
) -> Result<String, RegistryError> {
    let tag = referrers_tag(image.digest());
    let repo = &image.reference;
    let tag_ref = Reference::with_tag(
        repo.registry().into(),
        repo.repository().into(),
        tag.clone(),
    );
    let fail = |e: &oci_client::errors::OciDistributionError| {
        RegistryError::from_oci(client.registry(), repo.repository(), e)
    };
    let mut index = match client.oci().pull_manifest(&tag_ref, client.auth()).await {
        Ok((OciManifest::ImageIndex(index), _)) => index,
        Ok((OciManifest::Image(_), _)) => {
            tracing::warn!(
                tag,
                "the referrers tag held an image manifest; replacing it"
            );
            empty_index()
        }
        Err(e) if fail(&e).kind == RegistryErrorKind::NotFound => empty_index(),
        Err(e) => return Err(fail(&e)),
    };
    if index.manifests.iter().any(|m| m.digest == entry.digest) {
        return Ok(tag);
    }
    let version = entry
        .annotations
        .as_ref()
        .and_then(|a| a.get(kind.version_annotation))
        .cloned();
    index.manifests.retain(|m| {
        let ours = m.artifact_type.as_deref() == Some(kind.artifact_type);
        let same_version = m
            .annotations
            .as_ref()
            .and_then(|a| a.get(kind.version_annotation))
            .cloned()
            == version;
        !(ours && same_version)
    });
    index.manifests.push(entry);
    let body = serde_json::to_vec(&index).expect("indexes serialise");
    client
        .push_manifest(
            &tag_ref,
            body.into(),
            OCI_IMAGE_INDEX_MEDIA_TYPE
                .parse()
                .expect("static header value"),
        )
        .await
        .map_err(|e| fail(&e))?;
    Ok(tag)
}

fn empty_index() -> OciImageIndex {
    OciImageIndex {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_INDEX_MEDIA_TYPE.into()),
        manifests: Vec::new(),
        artifact_type: None,
        annotations: None,
    }
}
