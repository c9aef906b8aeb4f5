//! Indexing every layer of one image: from the layer cache when it has the layer, else one
//! streaming pass over the blob; a few layers at a time, in manifest order.

use futures::{StreamExt, TryStreamExt};
use imagemesh_lazyindex::{IndexOptions, LayerIndex};
use imagemesh_registry::RegistryClient;
use imagemesh_runtime::status::{StatusReporter, Step};
use oci_client::manifest::OciDescriptor;

use crate::cache::LayerCache;
use crate::failure::Failure;
use crate::fetch::Image;
use crate::ingest;

/// One indexed layer and where its index came from.
pub struct Layer {
    pub index: LayerIndex,
    pub from_cache: bool,
}

/// What indexing the layers of one image needs.
pub struct LayerJob<'a> {
    pub client: &'a RegistryClient,
    pub image: &'a Image,
    pub options: &'a IndexOptions,
    pub cache: Option<&'a LayerCache>,
    pub status: &'a StatusReporter,
    pub request: imagemesh_proto::RequestKey<'a>,
    pub concurrency: usize,
}

impl LayerJob<'_> {
    /// Indexes every layer, bottom first, reporting one status event per layer.
    pub async fn run(&self) -> Result<Vec<Layer>, Failure> {
        let layers = &self.image.resolved.manifest.layers;
        // Futures made up front: a closure inside the stream would trip rustc's higher-ranked
        // lifetime inference for `Send` futures.
        let work: Vec<_> = layers
            .iter()
            .enumerate()
            .map(|(i, descriptor)| self.one(i, descriptor))
            .collect();
        futures::stream::iter(work)
            .buffered(self.concurrency.max(1))
            .try_collect()
            .await
    }

    #[tracing::instrument(
        name = "index layer",
        skip_all,
        fields(layer = i, digest = %descriptor.digest, compressed_bytes = descriptor.size, cache_hit, entries)
    )]
    async fn one(&self, i: usize, descriptor: &OciDescriptor) -> Result<Layer, Failure> {
        let cached = match self.cache {
            Some(cache) => cache.get(&descriptor.digest).await,
            None => None,
        };
        let layer = match cached {
            Some(index) => {
                ingest::check_matches(&index, descriptor)?;
                Layer {
                    index,
                    from_cache: true,
                }
            }
            None => {
                let repo = &self.image.resolved.reference;
                let index = ingest::index_blob(self.client, repo, descriptor, self.options).await?;
                if let Some(cache) = self.cache {
                    cache.put(&index).await;
                }
                Layer {
                    index,
                    from_cache: false,
                }
            }
        };
        let span = tracing::Span::current();
        span.record("cache_hit", layer.from_cache);
        span.record("entries", layer.index.entries.len());
        if !layer.from_cache {
            let metrics = imagemesh_runtime::telemetry::metrics::get();
            let service = imagemesh_runtime::telemetry::metrics::attr("service", "indexer");
            metrics
                .bytes_fetched
                .add(u64::try_from(descriptor.size).unwrap_or(0), &[service]);
        }
        let expected = &self.image.diff_ids[i];
        if &layer.index.diff_id != expected {
            return Err(Failure::invalid(format!(
                "layer {} unpacks to {}, but the image config says {expected}",
                descriptor.digest, layer.index.diff_id
            )));
        }
        self.report(i, &layer).await;
        Ok(layer)
    }

    async fn report(&self, i: usize, layer: &Layer) {
        let total = self.image.resolved.manifest.layers.len();
        let index = &layer.index;
        let how = if layer.from_cache {
            "from the layer cache"
        } else {
            "in one pass"
        };
        let step = Step::running(
            "layer-indexed",
            format!("layer {} of {total} indexed {how}", i + 1),
        )
        .detail("layer", i + 1)
        .detail("digest", &index.digest)
        .detail("from_cache", layer.from_cache)
        .detail("compressed_bytes", index.compressed_size)
        .detail(
            "compressed_bytes_read",
            if layer.from_cache {
                0
            } else {
                index.compressed_size
            },
        )
        .detail("uncompressed_bytes", index.uncompressed_size)
        .detail("entries", index.entries.len())
        .detail("checkpoints", index.checkpoints.len());
        self.status.report(self.request, step).await;
    }
}
