//! Recorded prefetch: which spans an image's first run read, stored next to the image as a
//! small OCI artifact, so later mounts (on any node) fetch them ahead of the container.
//!
//! The artifact is an image manifest with `artifactType` [`PREFETCH_ARTIFACT_TYPE`], the empty
//! config, one layer (a [`PrefetchList`] as JSON, [`PREFETCH_MEDIA_TYPE`]) and `subject` = the
//! image manifest: a referrer of the image like the index artifact, listed the same ways
//! (referrers API, else the referrers tag). `docs/index-format.md` describes it.
//!
//! A span is named by its layer blob digest and its compressed byte range: exactly what a read
//! fetches with one range request, and what the reader verifies against the index's span
//! digests. A list is only a hint: spans the index does not have are skipped, and every byte
//! prefetched is verified like any other before it is cached.

use serde::{Deserialize, Serialize};

use imagemesh_lazyindex::ImageIndex;
use imagemesh_registry::{RegistryClient, RegistryError, ResolvedImage};
use oci_client::manifest::OciManifest;

use crate::artifact::{EMPTY_CONFIG_MEDIA_TYPE, newest_referrer};
use crate::store::{ArtifactKind, Stored, store_artifact};

/// `artifactType` of the prefetch artifact manifest.
pub const PREFETCH_ARTIFACT_TYPE: &str = "application/vnd.imagemesh.prefetch.v1";
/// Media type of its one layer: a [`PrefetchList`] as JSON.
pub const PREFETCH_MEDIA_TYPE: &str = "application/vnd.imagemesh.prefetch.v1+json";
/// Annotation carrying the list's format version.
pub const PREFETCH_VERSION_ANNOTATION: &str = "dev.imagemesh.prefetch.format-version";
/// The one format version readers accept.
pub const PREFETCH_VERSION: u16 = 1;

const PREFETCH_ARTIFACT: ArtifactKind = ArtifactKind {
    artifact_type: PREFETCH_ARTIFACT_TYPE,
    media_type: PREFETCH_MEDIA_TYPE,
    version_annotation: PREFETCH_VERSION_ANNOTATION,
    version: PREFETCH_VERSION,
};

/// The recorded spans of one image, in the order its first run needed them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchList {
    /// [`PREFETCH_VERSION`].
    pub version: u16,
    /// The image manifest the spans were recorded for.
    pub image_digest: String,
    /// How long after the mount reads were recorded, in milliseconds.
    pub window_ms: u64,
    pub spans: Vec<RecordedSpan>,
}

/// One compressed span of a layer blob.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedSpan {
    /// The layer blob's digest.
    pub layer: String,
    /// First compressed byte of the span.
    pub offset: u64,
    /// Compressed length.
    pub length: u64,
}

/// Why a prefetch list cannot be used (it is ignored; the mount goes on without it).
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("unusable prefetch list: {0}")]
    Invalid(String),
}

/// A prefetch artifact found for an image.
#[derive(Debug, Clone)]
pub struct FoundPrefetch {
    /// Digest of the artifact manifest.
    pub digest: String,
    pub list: PrefetchList,
}

impl PrefetchList {
    /// Encodes the list (what is pushed).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("prefetch lists serialise")
    }

    /// Decodes and checks a list of at most `max_bytes`, for `image_digest`, with at most
    /// `max_spans` spans.
    pub fn decode(
        bytes: &[u8],
        image_digest: &str,
        max_bytes: u64,
        max_spans: usize,
    ) -> Result<Self, PrefetchError> {
        let invalid = |why: String| PrefetchError::Invalid(why);
        if bytes.len() as u64 > max_bytes {
            return Err(invalid(format!(
                "{} bytes, more than {max_bytes}",
                bytes.len()
            )));
        }
        let list: PrefetchList =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("not a list: {e}")))?;
        if list.version != PREFETCH_VERSION {
            return Err(invalid(format!("format version {}", list.version)));
        }
        if list.image_digest != image_digest {
            return Err(invalid(format!(
                "recorded for {}, not {image_digest}",
                list.image_digest
            )));
        }
        if list.spans.len() > max_spans {
            return Err(invalid(format!(
                "{} spans, more than {max_spans}",
                list.spans.len()
            )));
        }
        Ok(list)
    }

    /// The spans as (layer, checkpoint) of `index`, in order, each once; spans the index does
    /// not have (another index of the image, a doctored list) are left out.
    pub fn resolve(&self, index: &ImageIndex) -> Vec<(usize, usize)> {
        let mut seen = std::collections::HashSet::new();
        self.spans
            .iter()
            .filter_map(|span| {
                let layer = index.layers.iter().position(|l| l.digest == span.layer)?;
                let cps = &index.layers[layer].checkpoints;
                let i = cps.partition_point(|c| c.compressed_offset < span.offset);
                if cps.get(i)?.compressed_offset != span.offset {
                    return None;
                }
                let range = index.layers[layer].span_range(i);
                (range.end - range.start == span.length).then_some((layer, i))
            })
            .filter(|at| seen.insert(*at))
            .collect()
    }
}

/// Finds the prefetch list of `image` (format [`PREFETCH_VERSION`]): `Ok(None)` when there is
/// none; an error when one is listed but cannot be used (`max_bytes`, `max_spans`: the most a
/// reader accepts).
pub async fn find_prefetch(
    client: &RegistryClient,
    image: &ResolvedImage,
    max_bytes: u64,
    max_spans: usize,
) -> Result<Option<FoundPrefetch>, PrefetchError> {
    let subject_digest = image.digest();
    let version = PREFETCH_VERSION.to_string();
    let newest = newest_referrer(
        client,
        &image.reference,
        subject_digest,
        PREFETCH_ARTIFACT_TYPE,
        |e| {
            e.artifact_type.as_deref() == Some(PREFETCH_ARTIFACT_TYPE)
                && e.annotations
                    .as_ref()
                    .and_then(|a| a.get(PREFETCH_VERSION_ANNOTATION))
                    == Some(&version)
        },
    )
    .await?;
    let Some((manifest, digest)) = newest else {
        return Ok(None);
    };
    let OciManifest::Image(manifest) = manifest else {
        return Err(PrefetchError::Invalid("not an image manifest".into()));
    };
    if manifest.artifact_type.as_deref() != Some(PREFETCH_ARTIFACT_TYPE)
        || manifest.subject.as_ref().map(|s| s.digest.as_str()) != Some(subject_digest)
        || manifest.config.media_type != EMPTY_CONFIG_MEDIA_TYPE
    {
        return Err(PrefetchError::Invalid(format!(
            "{digest} is not a prefetch artifact of {subject_digest}"
        )));
    }
    let blob = match manifest.layers.as_slice() {
        [blob] if blob.media_type == PREFETCH_MEDIA_TYPE => blob,
        _ => {
            return Err(PrefetchError::Invalid(format!(
                "{digest} does not hold one prefetch list"
            )));
        }
    };
    if !(0..=max_bytes as i64).contains(&blob.size) {
        return Err(PrefetchError::Invalid(format!(
            "{digest}: a list of {} bytes, more than {max_bytes}",
            blob.size
        )));
    }
    let mut bytes = Vec::with_capacity(blob.size as usize);
    // oci-client checks the digest of what it pulled.
    client
        .oci()
        .pull_blob(&image.reference, blob, &mut bytes)
        .await
        .map_err(|e| {
            RegistryError::from_oci(client.registry(), image.reference.repository(), &e)
        })?;
    let list = PrefetchList::decode(&bytes, subject_digest, max_bytes, max_spans)?;
    Ok(Some(FoundPrefetch { digest, list }))
}

/// Pushes `encoded` (normally [`PrefetchList::encode`]) as the prefetch artifact of `image`
/// and lists it under the referrers tag, replacing an earlier prefetch list of this version.
pub async fn push_prefetch(
    client: &RegistryClient,
    image: &ResolvedImage,
    encoded: Vec<u8>,
) -> Result<Stored, RegistryError> {
    // A client made for publishing has not talked to the registry yet: authenticate for push
    // (a token-auth registry hands out the scope here).
    client
        .oci()
        .auth(
            &image.reference,
            client.auth(),
            oci_client::RegistryOperation::Push,
        )
        .await
        .map_err(|e| {
            RegistryError::from_oci(client.registry(), image.reference.repository(), &e)
        })?;
    store_artifact(client, image, PREFETCH_ARTIFACT, encoded, None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(spans: Vec<RecordedSpan>) -> PrefetchList {
        PrefetchList {
            version: PREFETCH_VERSION,
            image_digest: "sha256:aa".into(),
            window_ms: 5000,
            spans,
        }
    }

    #[test]
    fn a_list_round_trips_and_bad_ones_are_refused() {
        let good = list(vec![RecordedSpan {
            layer: "sha256:bb".into(),
            offset: 0,
            length: 10,
        }]);
        let bytes = good.encode();
        assert_eq!(
            PrefetchList::decode(&bytes, "sha256:aa", 1 << 20, 10).unwrap(),
            good
        );
        assert!(PrefetchList::decode(&bytes, "sha256:cc", 1 << 20, 10).is_err());
        assert!(PrefetchList::decode(&bytes, "sha256:aa", 10, 10).is_err());
        assert!(PrefetchList::decode(&bytes, "sha256:aa", 1 << 20, 0).is_err());
        assert!(PrefetchList::decode(b"\x00garbage", "sha256:aa", 1 << 20, 10).is_err());
        let mut newer = good.clone();
        newer.version = 2;
        assert!(PrefetchList::decode(&newer.encode(), "sha256:aa", 1 << 20, 10).is_err());
    }
}
