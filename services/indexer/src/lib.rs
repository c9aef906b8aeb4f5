//! The indexer: reads a pushed image from the registry with the credential that pushed it and
//! stores a lazy-mount index next to it, so mounters can read single files lazily.
#![forbid(unsafe_code)]

pub mod config;
mod handler;

use async_nats::Client;
pub use config::Config;
use imagemesh_runtime::service::Identity;
use imagemesh_runtime::status::StatusReporter;
use imagemesh_runtime::worker::{self, ConsumerSpec, Work};
use imagemesh_runtime::{Shutdown, streams, subjects};

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
    let settings = config.indexer;
    let handler = Indexer {
        status: StatusReporter::new(js, IDENTITY.name),
        registry: settings.registry.clone(),
    };
    let spec = ConsumerSpec {
        stream: streams::INDEX,
        durable: "indexer".into(),
        filter_subject: subjects::INDEX.into(),
        inactive_threshold: None,
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
