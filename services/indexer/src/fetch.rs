//! What the indexer reads before the layers: the platform's image manifest and its config.

use imagemesh_registry::{PlatformSpec, Reference, RegistryClient, RegistryError, ResolvedImage};
use serde::Deserialize;

use crate::failure::Failure;

/// Largest image config read (real ones are a few KiB).
const MAX_CONFIG_SIZE: i64 = 16 << 20;
/// Most layers indexed per image (the index format's default decode limit).
const MAX_LAYERS: usize = 1024;

/// An image ready to index: its manifest and the diff-ids its config promises.
pub struct Image {
    pub resolved: ResolvedImage,
    /// `rootfs.diff_ids` of the config, bottom layer first.
    pub diff_ids: Vec<String>,
}

impl Image {
    pub fn compressed_size(&self) -> u64 {
        self.resolved
            .manifest
            .layers
            .iter()
            .map(|l| u64::try_from(l.size).unwrap_or(0))
            .fold(0u64, u64::saturating_add)
    }
}

#[derive(Deserialize)]
struct ImageConfig {
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Resolves `reference` to the `platform` image and reads its config.
#[tracing::instrument(name = "resolve image", skip_all, fields(registry = client.registry(), repository = reference.repository()))]
pub async fn fetch(
    client: &RegistryClient,
    reference: &Reference,
    platform: &PlatformSpec,
) -> Result<Image, Failure> {
    let resolved = client.resolve_image(reference, platform).await?;
    let layers = resolved.manifest.layers.len();
    if layers > MAX_LAYERS {
        return Err(Failure::invalid(format!(
            "the image has {layers} layers; at most {MAX_LAYERS} are indexed"
        )));
    }
    let diff_ids = read_diff_ids(client, &resolved).await?;
    if diff_ids.len() != layers {
        return Err(Failure::invalid(format!(
            "the image config lists {} diff-ids for {layers} layers",
            diff_ids.len()
        )));
    }
    Ok(Image { resolved, diff_ids })
}

async fn read_diff_ids(
    client: &RegistryClient,
    image: &ResolvedImage,
) -> Result<Vec<String>, Failure> {
    let config = &image.manifest.config;
    if !(0..=MAX_CONFIG_SIZE).contains(&config.size) {
        return Err(Failure::invalid(format!(
            "image config of {} bytes",
            config.size
        )));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(config.size).unwrap_or(0));
    client
        .oci()
        .pull_blob(&image.reference, config, &mut bytes)
        .await
        .map_err(|e| {
            RegistryError::from_oci(client.registry(), image.reference.repository(), &e)
        })?;
    let parsed: ImageConfig = serde_json::from_slice(&bytes)
        .map_err(|e| Failure::invalid(format!("unparsable image config: {e}")))?;
    let rootfs = parsed.rootfs.ok_or_else(|| {
        Failure::invalid("the manifest's config has no rootfs: not a container image")
    })?;
    Ok(rootfs.diff_ids)
}
