//! The mounter: for a runtime request, mounts the image lazily with the request's credentials
//! (the build-registry token when the image lives in the build registry), refreshing them
//! before they expire.
#![forbid(unsafe_code)]

pub mod config;
mod handler;

use async_nats::Client;
pub use config::Config;
use imagemesh_runtime::placement;
use imagemesh_runtime::service::Identity;
use imagemesh_runtime::status::StatusReporter;
use imagemesh_runtime::worker::{self, Work};
use imagemesh_runtime::{Shutdown, streams};

use crate::handler::Mounter;

/// How the mounter presents itself to `$SRV.INFO`.
pub const IDENTITY: Identity = Identity {
    name: "mounter",
    description: "Mounts images lazily with the request's credentials",
};

/// Mounts until `shutdown`.
pub async fn run(config: Config, client: Client, shutdown: Shutdown) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    let used = [streams::MOUNT, streams::STATUS, streams::DEAD_LETTER];
    streams::ensure(&js, &used, &config.streams).await?;
    let mut settings = config.mounter;
    settings.placement = settings.placement.resolved();
    let handler = Mounter {
        status: StatusReporter::new(js, IDENTITY.name).with_instance(&settings.placement.worker_id),
        registry: settings.registry.clone(),
    };
    let work = Work::Placed {
        kind: placement::MOUNT,
        placement: settings.placement.clone(),
        replicas: config.streams.replicas,
    };
    worker::serve(&client, IDENTITY, work, settings.worker, handler, shutdown).await
}
