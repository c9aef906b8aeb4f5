//! Indexer configuration.

use imagemesh_lazyindex::{IndexOptions, Limits};
use imagemesh_registry::RegistrySettings;
use imagemesh_runtime::app::ServiceConfig;
use imagemesh_runtime::nats::NatsConfig;
use imagemesh_runtime::streams::StreamOptions;
use imagemesh_runtime::worker::WorkerOptions;
use serde::{Deserialize, Serialize};

/// The whole configuration file of the indexer.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub streams: StreamOptions,
    pub indexer: IndexerConfig,
}

impl ServiceConfig for Config {
    fn nats(&self) -> &NatsConfig {
        &self.nats
    }
    fn validate(&self) -> anyhow::Result<()> {
        self.streams.validate()?;
        self.streams
            .validate_workers("indexer.worker", &self.indexer.worker)
    }
}

/// How indexing runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexerConfig {
    /// The work loop; `concurrency` is the number of images indexed at once.
    pub worker: WorkerOptions,
    pub registry: RegistrySettings,
    /// Layers of one image indexed at once (each is one streaming pass on one core).
    pub layer_concurrency: usize,
    /// Uncompressed bytes between checkpoints: a lazy read inflates at most this much extra.
    pub span_size: u64,
    /// Layers smaller than this (compressed) get no checkpoints; a read fetches them whole.
    pub checkpoint_threshold: u64,
    /// Keep encoded layer indexes in the `imagemesh-layer-indexes` object store, so a layer
    /// shared by many images is indexed once.
    pub layer_cache: bool,
    /// Most bytes a layer may inflate to; a layer (or one tar entry) past it is `INVALID_IMAGE`,
    /// and inflating stops as soon as it is crossed.
    pub max_layer_uncompressed_bytes: u64,
    /// Most uncompressed bytes per compressed byte of a layer, enforced once a layer has
    /// inflated past 64 MiB (a gzip bomb stops there as `INVALID_IMAGE`); 0 disables it.
    pub max_compression_ratio: u64,
    /// Longest one image's index pass may take (manifest, every layer, storing). Past it the
    /// request is handed back `REGISTRY_UNAVAILABLE` and retried, instead of a stalled
    /// registry holding a worker slot for good.
    #[serde(with = "humantime_serde")]
    pub index_deadline: std::time::Duration,
}

impl Default for IndexerConfig {
    fn default() -> Self {
        let index = IndexOptions::default();
        Self {
            worker: WorkerOptions::default(),
            registry: RegistrySettings::default(),
            layer_concurrency: 2,
            span_size: index.span_size,
            checkpoint_threshold: index.checkpoint_threshold,
            layer_cache: true,
            max_layer_uncompressed_bytes: index.limits.max_uncompressed_size,
            max_compression_ratio: index.limits.max_compression_ratio,
            index_deadline: std::time::Duration::from_secs(3600),
        }
    }
}

impl IndexerConfig {
    /// The ingest options these settings give.
    pub fn index_options(&self) -> IndexOptions {
        let defaults = IndexOptions::default();
        IndexOptions {
            span_size: self.span_size,
            checkpoint_threshold: self.checkpoint_threshold,
            limits: Limits {
                max_uncompressed_size: self.max_layer_uncompressed_bytes,
                max_compression_ratio: self.max_compression_ratio,
                ..defaults.limits
            },
            ..defaults
        }
    }
}

#[cfg(test)]
mod sample_tests {
    /// The sample in deploy/config stays loadable as the configuration changes.
    #[test]
    fn the_deploy_sample_loads() {
        let config =
            imagemesh_runtime::config::load_deploy_sample::<super::Config>("indexer").unwrap();
        imagemesh_runtime::app::ServiceConfig::validate(&config).unwrap();
    }
}
