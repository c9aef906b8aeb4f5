//! The indexer: reads a pushed image from the registry with the credential that pushed it and
//! stores a lazy-mount index next to it, so mounters can read single files lazily.
//!
//! - [`handler`](crate): one index request, phase by phase, with status events.
//! - `fetch`: the platform's image manifest and config; `ingest`: one streaming pass per layer
//!   (registry body stream → `SyncIoBridge` → `index_layer` on the blocking pool);
//!   `layers`: every layer of an image, from the layer cache when it has it.
//! - `cache`: encoded layer indexes in a JetStream object store, keyed by layer digest.
//! - storing: `imagemesh_lazyimage::push_index` pushes the OCI artifact (`subject` = the image)
//!   plus the referrers-tag-schema index; `record`: the index digest in the image-refs KV.
//! - `failure`: which failures are rejected (bad image, bad request) and which retried.
//!
//! `docs/indexer.md` describes the service; `docs/index-format.md` the index and its storage.
#![forbid(unsafe_code)]

mod cache;
pub mod config;
mod failure;
mod fetch;
mod handler;
mod ingest;
mod layers;
mod record;

use async_nats::Client;
pub use config::Config;
use imagemesh_runtime::service::Identity;
use imagemesh_runtime::status::StatusReporter;
use imagemesh_runtime::worker::{self, ConsumerSpec, Work};
use imagemesh_runtime::{Shutdown, streams, subjects};

use crate::cache::LayerCache;
use crate::handler::Indexer;

/// How the indexer presents itself to `$SRV.INFO`.
pub const IDENTITY: Identity = Identity {
    name: "indexer",
    description: "Indexes pushed images for per-file lazy reads",
};

/// Indexes until `shutdown`.
pub async fn run(config: Config, client: Client, shutdown: Shutdown) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    let used = [streams::INDEX, streams::STATUS, streams::DEAD_LETTER];
    streams::ensure(&js, &used, &config.streams).await?;
    let records = streams::image_refs(&js, &config.streams).await?;
    let settings = config.indexer;
    let options = settings.index_options();
    let cache = if settings.layer_cache {
        let store = streams::layer_indexes(&js, &config.streams).await?;
        Some(LayerCache::new(store, &options))
    } else {
        None
    };
    let handler = Indexer {
        status: StatusReporter::new(js, IDENTITY.name),
        registry: settings.registry.clone(),
        options,
        layer_concurrency: settings.layer_concurrency,
        records,
        cache,
        deadline: settings.index_deadline,
    };
    let spec = ConsumerSpec {
        stream: streams::INDEX,
        durable: "indexer".into(),
        filter_subject: subjects::INDEX.into(),
        inactive_threshold: None,
        forget_terminated: false,
    };
    worker::serve(
        &client,
        IDENTITY,
        Work::Queue(spec),
        settings.worker,
        handler,
        shutdown,
    )
    .await
}
