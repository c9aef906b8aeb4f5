//! One index request: read the pushed image with the token that pushed it, index its layers in
//! one pass each, store the index next to the image and record it with the image id.
//!
//! Status phases, in order: `authenticated`, `resolved`, then either `indexed` with
//! `reused=true` (an index of this manifest is already in the registry) or one `layer-indexed`
//! per layer, `stored`, and `indexed`.

use std::time::Instant;

use async_nats::jetstream::kv;
use imagemesh_lazyimage::{IndexArtifact, find_index_artifact, push_index};
use imagemesh_lazyindex::{FORMAT_VERSION, ImageIndex, IndexOptions, encode_image};
use imagemesh_proto::v1::IndexRequest;
use imagemesh_proto::{RequestKey, TenantRequest};
use imagemesh_registry::{PlatformSpec, Reference, RegistryClient, RegistrySettings};
use imagemesh_runtime::status::{StatusReporter, Step};
use imagemesh_runtime::worker::{Delivery, Handler, Outcome};
use imagemesh_runtime::{ErrorCode, Rejection};
use oci_client::RegistryOperation;

use crate::cache::LayerCache;
use crate::failure::Failure;
use crate::fetch::{self, Image};
use crate::layers::{Layer, LayerJob};
use crate::record::{self, Indexed, Recorded};

/// The indexer's work handler.
pub struct Indexer {
    pub status: StatusReporter,
    pub registry: RegistrySettings,
    pub options: IndexOptions,
    pub layer_concurrency: usize,
    pub records: kv::Store,
    pub cache: Option<LayerCache>,
    /// `indexer.index_deadline`.
    pub deadline: std::time::Duration,
}

impl Handler for Indexer {
    type Request = IndexRequest;

    fn without_secrets(request: &IndexRequest) -> IndexRequest {
        request.without_secrets()
    }

    async fn handle(&self, request: IndexRequest, _delivery: &Delivery) -> Outcome {
        match tokio::time::timeout(self.deadline, self.index(&request)).await {
            Ok(Ok(())) => Outcome::Done,
            Ok(Err(failure)) => failure.into_outcome(),
            Err(_) => Outcome::Retry(Rejection::new(
                ErrorCode::RegistryUnavailable,
                format!(
                    "indexing {} took longer than {:?}",
                    request.image_ref, self.deadline
                ),
            )),
        }
    }
}

fn refused(code: ErrorCode, message: impl Into<String>) -> Failure {
    Failure::Refused(Rejection::new(code, message))
}

/// The manifest to index: the digest the builder pushed when it says, else the reference.
fn target(client: &RegistryClient, request: &IndexRequest) -> Result<Reference, Failure> {
    let reference = client.reference(&request.image_ref)?;
    let digest = request.manifest_digest.as_str();
    if digest.is_empty() {
        return Ok(reference);
    }
    let hex = digest.strip_prefix("sha256:").unwrap_or_default();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(refused(
            ErrorCode::MalformedRequest,
            format!("manifest digest {digest:?} is not sha256:<64 hex>"),
        ));
    }
    Ok(reference.clone_with_digest(digest.to_string()))
}

impl Indexer {
    async fn index(&self, request: &IndexRequest) -> Result<(), Failure> {
        let started = Instant::now();
        let id = request.key();
        let credential = request.credential.as_ref().ok_or_else(|| {
            refused(
                ErrorCode::NoCredentials,
                "index request carries no credential",
            )
        })?;
        let platform = PlatformSpec::parse(&request.platform)
            .map_err(|e| refused(ErrorCode::MalformedRequest, e))?;
        let client = RegistryClient::new(&credential.registry, Some(credential), &self.registry);
        let reference = target(&client, request)?;
        client
            .check_access(&reference, RegistryOperation::Pull)
            .await?;
        let step = Step::running(
            "authenticated",
            format!("registry {} accepted the token", client.registry()),
        )
        .detail("registry", client.registry());
        self.status.report(id, step).await;

        let image = fetch::fetch(&client, &reference, &platform).await?;
        self.report_resolved(id, &image).await;
        let resolved = &image.resolved;
        if let Some(existing) = find_index_artifact(
            &client,
            &resolved.reference,
            resolved.digest(),
            FORMAT_VERSION,
        )
        .await?
        {
            return self.reuse(request, &image, existing).await;
        }

        let layers = LayerJob {
            client: &client,
            image: &image,
            options: &self.options,
            cache: self.cache.as_ref(),
            status: &self.status,
            request: id,
            concurrency: self.layer_concurrency,
        }
        .run()
        .await?;
        let summary = Summary::new(&layers);
        let index = ImageIndex {
            manifest_digest: Some(resolved.digest().to_string()),
            layers: layers.into_iter().map(|l| l.index).collect(),
            remote_windows: None,
        };
        let encoded = encode_image(&index);
        let index_bytes = encoded.len();
        let stored = push_index(&client, resolved, encoded).await?;
        let step = Step::running("stored", "index stored next to the image")
            .detail("index_digest", &stored.digest)
            .detail("referrers_tag", &stored.tag)
            .detail("index_bytes", index_bytes);
        self.status.report(id, step).await;

        let recorded = self.record(request, &image, &stored.digest).await?;
        let step = summary
            .step(index_bytes)
            .detail("index_digest", &stored.digest)
            .detail("manifest_digest", resolved.digest())
            .detail("referrers_tag", &stored.tag)
            .detail("record", recorded.as_str())
            .detail("seconds", format!("{:.3}", started.elapsed().as_secs_f64()));
        self.status.report(id, step).await;
        Ok(())
    }

    async fn report_resolved(&self, id: RequestKey<'_>, image: &Image) {
        let resolved = &image.resolved;
        let platform = resolved.platform.as_ref().map(|p| p.to_string());
        let step = Step::running(
            "resolved",
            format!(
                "image manifest {} with {} layers",
                resolved.digest(),
                resolved.manifest.layers.len()
            ),
        )
        .detail("manifest_digest", resolved.digest())
        .detail(
            "platform",
            platform.unwrap_or_else(|| "single-platform".into()),
        )
        .detail("layers", resolved.manifest.layers.len())
        .detail("compressed_bytes", image.compressed_size());
        self.status.report(id, step).await;
    }

    /// An index of this manifest is already in the registry: record it and succeed.
    async fn reuse(
        &self,
        request: &IndexRequest,
        image: &Image,
        existing: IndexArtifact,
    ) -> Result<(), Failure> {
        let recorded = self.record(request, image, &existing.digest).await?;
        let step = Step::succeeded(
            "indexed",
            "an index of this manifest is already in the registry; reused it",
        )
        .detail("reused", true)
        .detail("index_digest", &existing.digest)
        .detail("manifest_digest", image.resolved.digest())
        .detail("compressed_bytes_read", 0)
        .detail("record", recorded.as_str());
        self.status.report(request.key(), step).await;
        Ok(())
    }

    async fn record(
        &self,
        request: &IndexRequest,
        image: &Image,
        index_digest: &str,
    ) -> Result<Recorded, Failure> {
        if request.image_id.is_empty() {
            // Hand-published requests may name no image id: nothing to record under.
            return Ok(Recorded::Unchanged);
        }
        let indexed = Indexed {
            tenant: &request.tenant,
            image_id: &request.image_id,
            image_ref: &request.image_ref,
            top_digest: &image.resolved.top_digest,
            manifest_digest: image.resolved.digest(),
            index_digest,
        };
        let recorded = record::record(&self.records, &indexed).await?;
        if let Recorded::OtherManifest(other) = &recorded {
            tracing::warn!(tenant = %request.tenant, image_id = %request.image_id, record = %other, "image record names another manifest; left unchanged");
        }
        Ok(recorded)
    }
}

/// Byte counts over the layers of one image, for the final status event.
struct Summary {
    layers: usize,
    from_cache: usize,
    compressed_read: u64,
    uncompressed: u64,
}

impl Summary {
    fn new(layers: &[Layer]) -> Self {
        let read = layers.iter().filter(|l| !l.from_cache);
        Self {
            layers: layers.len(),
            from_cache: layers.iter().filter(|l| l.from_cache).count(),
            compressed_read: read.map(|l| l.index.compressed_size).sum(),
            uncompressed: layers.iter().map(|l| l.index.uncompressed_size).sum(),
        }
    }

    fn step(&self, index_bytes: usize) -> Step {
        let ratio = 100.0 * index_bytes as f64 / self.uncompressed.max(1) as f64;
        Step::succeeded(
            "indexed",
            format!(
                "indexed {} layers ({} from the layer cache); index is {ratio:.3}% of the image",
                self.layers, self.from_cache
            ),
        )
        .detail("reused", false)
        .detail("layers", self.layers)
        .detail("layers_from_cache", self.from_cache)
        .detail("compressed_bytes_read", self.compressed_read)
        .detail("uncompressed_bytes", self.uncompressed)
        .detail("index_bytes", index_bytes)
        .detail("index_ratio_percent", format!("{ratio:.3}"))
    }
}
