//! Resolving an image reference to the image manifest of one platform.
//!
//! A reference may name a single image manifest or a multi-platform index (OCI image index or
//! Docker manifest list); consumers that read layers (the indexer, `imagemesh index`, the
//! mounter) all need the one image manifest of the platform they run, and its digest.

use oci_client::Reference;
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, ImageIndexEntry,
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest, OciManifest,
};

use crate::client::RegistryClient;
use crate::error::{RegistryError, RegistryErrorKind};

/// The platform chosen when a request names none.
pub const DEFAULT_PLATFORM: &str = "linux/amd64";

/// The manifest media types asked for when pulling: OCI and Docker images and indexes.
pub const MANIFEST_MEDIA_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// A platform as written in requests: `os/arch[/variant]`, e.g. `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
    /// When `None`, any variant of the architecture matches.
    pub variant: Option<String>,
}

impl PlatformSpec {
    /// Parses `os/arch[/variant]`; the empty string is [`DEFAULT_PLATFORM`].
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = if text.trim().is_empty() {
            DEFAULT_PLATFORM
        } else {
            text.trim()
        };
        let parts: Vec<&str> = text.split('/').collect();
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: parts.get(2).map(|v| v.to_string()),
            }),
            _ => Err(format!("platform {text:?} is not os/arch[/variant]")),
        }
    }

    fn matches(&self, entry: &ImageIndexEntry) -> bool {
        // Platform fields are typed enums in oci-client; their JSON form is the GOOS/GOARCH text.
        let Some(platform) = entry
            .platform
            .as_ref()
            .and_then(|p| serde_json::to_value(p).ok())
        else {
            return false;
        };
        let field = |name: &str| platform[name].as_str().unwrap_or_default().to_string();
        field("os") == self.os
            && field("architecture") == self.architecture
            && self.variant.as_ref().is_none_or(|v| field("variant") == *v)
    }
}

impl std::fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

/// One platform's image manifest, found from a reference.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// `registry/repository@digest` of the image manifest.
    pub reference: Reference,
    /// The image manifest as a descriptor (media type, digest, size): an artifact's `subject`.
    pub descriptor: OciDescriptor,
    pub manifest: OciImageManifest,
    /// The image manifest exactly as the registry served it (its digest is `descriptor.digest`).
    pub manifest_bytes: bytes::Bytes,
    /// Digest of what the reference named: the index for a multi-platform image, else the
    /// image manifest itself.
    pub top_digest: String,
    /// The platform picked from an index; `None` when the reference named an image manifest.
    pub platform: Option<PlatformSpec>,
}

impl ResolvedImage {
    pub fn digest(&self) -> &str {
        &self.descriptor.digest
    }
}

/// Largest image config a client reads (configs are a few KiB; history can grow them).
pub const MAX_CONFIG_SIZE: i64 = 4 << 20;

impl RegistryClient {
    /// The image configuration blob of `resolved` (entrypoint, env, user, ...), as JSON bytes,
    /// digest-verified by oci-client.
    pub async fn pull_image_config(
        &self,
        resolved: &ResolvedImage,
    ) -> Result<Vec<u8>, RegistryError> {
        let config = &resolved.manifest.config;
        if !(0..=MAX_CONFIG_SIZE).contains(&config.size) {
            return Err(self.invalid(
                &resolved.reference,
                format!("image config of {} bytes", config.size),
            ));
        }
        self.oci()
            .store_auth_if_needed(resolved.reference.resolve_registry(), self.auth())
            .await;
        let mut out = Vec::with_capacity(config.size as usize);
        self.oci()
            .pull_blob(&resolved.reference, config, &mut out)
            .await
            .map_err(|e| {
                RegistryError::from_oci(self.registry(), resolved.reference.repository(), &e)
            })?;
        Ok(out)
    }

    /// Pulls the manifest `reference` names and, for a multi-platform index, the manifest of
    /// `platform`. Digests are verified by oci-client.
    pub async fn resolve_image(
        &self,
        reference: &Reference,
        platform: &PlatformSpec,
    ) -> Result<ResolvedImage, RegistryError> {
        let (top, top_digest) = self.pull_manifest(reference).await?;
        let (manifest, descriptor, manifest_bytes, chosen) = match top {
            Pulled::Image(manifest, descriptor, raw) => (*manifest, descriptor, raw, None),
            Pulled::Index(entries) => {
                let entry = entries
                    .iter()
                    .find(|e| platform.matches(e))
                    .ok_or_else(|| {
                        self.invalid(
                            reference,
                            format!("the image index has no {platform} image"),
                        )
                    })?;
                let by_digest = reference.clone_with_digest(entry.digest.clone());
                match self.pull_manifest(&by_digest).await? {
                    (Pulled::Image(m, d, raw), _) => (*m, d, raw, Some(platform.clone())),
                    (Pulled::Index(_), _) => {
                        return Err(self.invalid(reference, "nested image indexes"));
                    }
                }
            }
        };
        Ok(ResolvedImage {
            reference: reference.clone_with_digest(descriptor.digest.clone()),
            descriptor,
            manifest,
            manifest_bytes,
            top_digest,
            platform: chosen,
        })
    }

    async fn pull_manifest(
        &self,
        reference: &Reference,
    ) -> Result<(Pulled, String), RegistryError> {
        let (body, digest) = self
            .oci()
            .pull_manifest_raw(reference, self.auth(), MANIFEST_MEDIA_TYPES)
            .await
            .map_err(|e| RegistryError::from_oci(self.registry(), reference.repository(), &e))?;
        let parsed: OciManifest = serde_json::from_slice(&body)
            .map_err(|e| self.invalid(reference, format!("unparsable manifest: {e}")))?;
        let pulled = match parsed {
            OciManifest::Image(manifest) => {
                let descriptor = OciDescriptor {
                    media_type: manifest
                        .media_type
                        .clone()
                        .unwrap_or_else(|| OCI_IMAGE_MEDIA_TYPE.to_string()),
                    digest: digest.clone(),
                    size: body.len() as i64,
                    ..Default::default()
                };
                Pulled::Image(Box::new(manifest), descriptor, body)
            }
            OciManifest::ImageIndex(index) => Pulled::Index(index.manifests),
        };
        Ok((pulled, digest))
    }

    fn invalid(&self, reference: &Reference, detail: impl Into<String>) -> RegistryError {
        RegistryError::new(
            RegistryErrorKind::Invalid,
            self.registry(),
            reference.repository(),
            detail,
        )
    }
}

enum Pulled {
    Image(Box<OciImageManifest>, OciDescriptor, bytes::Bytes),
    Index(Vec<ImageIndexEntry>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_with_a_default() {
        let default = PlatformSpec::parse("").unwrap();
        assert_eq!(default.to_string(), "linux/amd64");
        let arm = PlatformSpec::parse("linux/arm64/v8").unwrap();
        assert_eq!(arm.variant.as_deref(), Some("v8"));
        assert!(PlatformSpec::parse("linux").is_err());
        assert!(PlatformSpec::parse("linux//").is_err());
        assert!(PlatformSpec::parse("a/b/c/d").is_err());
    }

    #[test]
    fn platform_matching_uses_the_json_names() {
        let entry: ImageIndexEntry = serde_json::from_value(serde_json::json!({
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
            "digest": "sha256:00",
            "size": 1,
            "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}
        }))
        .unwrap();
        assert!(PlatformSpec::parse("linux/arm64").unwrap().matches(&entry));
        assert!(
            PlatformSpec::parse("linux/arm64/v8")
                .unwrap()
                .matches(&entry)
        );
        assert!(
            !PlatformSpec::parse("linux/arm64/v7")
                .unwrap()
                .matches(&entry)
        );
        assert!(!PlatformSpec::parse("linux/amd64").unwrap().matches(&entry));
    }
}
