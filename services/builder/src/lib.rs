//! The builder: builds an image for a build request and pushes it to the build registry with
//! the request's `build_registry_creds` (attached by the scheduler), records
//! `<tenant>.<image id>` -> pushed reference, and asks the indexer to index it with the same
//! credential.
//!
//! - [`handler`]: one request, start to hand-off; thin, it only sequences the steps below.
//! - [`dockerfile`]: a Dockerfile build in a private directory ([`workdir`]): the context from
//!   the tenant's object store ([`context`]), credentials in an auth file ([`auth`]), buildah
//!   ([`buildah`]) with its output streamed to `imagemesh.buildlog.<tenant>.<request id>`
//!   ([`log`]).
//! - [`copy`]: a source-image build, copied registry to registry with oci-client.
//! - [`records`]: `<tenant>.<image id>` -> pushed reference and digest (KV
//!   `imagemesh-image-refs`).
//!
//! Everything a request names is its tenant's: the scheduler bound it to the intake subject's
//! tenant and chose a target under that tenant's repository prefix.
#![forbid(unsafe_code)]

mod auth;
mod base_pull;
mod buildah;
pub mod config;
mod context;
mod copy;
mod dockerfile;
mod failure;
mod handler;
mod layout_push;
mod log;
mod records;
mod workdir;

use async_nats::Client;
pub use config::Config;
use imagemesh_runtime::placement;
use imagemesh_runtime::service::Identity;
use imagemesh_runtime::status::StatusReporter;
use imagemesh_runtime::worker::{self, Work};
use imagemesh_runtime::{Shutdown, streams};

use crate::handler::Builder;

/// How the builder presents itself to `$SRV.INFO`.
pub const IDENTITY: Identity = Identity {
    name: "builder",
    description: "Builds images and pushes them with the request's build-registry token",
};

/// Builds until `shutdown`.
pub async fn run(config: Config, client: Client, shutdown: Shutdown) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    let used = [
        streams::BUILD,
        streams::INDEX,
        streams::STATUS,
        streams::DEAD_LETTER,
    ];
    streams::ensure(&js, &used, &config.streams).await?;
    let mut settings = config.builder;
    settings.placement = settings.placement.resolved();
    workdir::sweep_stale(&settings.storage_dir);
    let handler = Builder {
        client: client.clone(),
        records: records::Records::new(streams::image_refs(&js, &config.streams).await?),
        js: js.clone(),
        status: StatusReporter::new(js, IDENTITY.name).with_instance(&settings.placement.worker_id),
        settings: settings.clone(),
    };
    let work = Work::Placed {
        kind: placement::BUILD,
        placement: settings.placement.clone(),
        streams: config.streams.clone(),
        holds: None,
    };
    worker::serve(&client, IDENTITY, work, settings.worker, handler, shutdown).await
}
