//! The builder: builds an image for a build request and pushes it to the build registry with
//! the request's `build_registry_creds` (attached by the scheduler), records
//! `<tenant>.<image id>` -> pushed reference, and asks the indexer to index it with the same
//! credential.
//!
//! - [`handler`]: one request, start to hand-off; thin, it only sequences the steps below.
//! - [`dockerfile`]: a Dockerfile build in a private directory ([`workdir`]): the context from
//!   the tenant's object store ([`context`]), credentials in an auth file ([`auth`]), buildah
//!   ([`buildah`]) with its output streamed to `imagemesh.buildlog.<tenant>.<request id>`
//!   ([`log`]), build args in its environment ([`build_args`]), `RUN` steps in the sandbox
//!   ([`sandbox`]: no network, a user namespace, only the image's files).
//! - [`copy`]: a source-image build, copied registry to registry with oci-client.
//! - [`records`]: `<tenant>.<image id>` -> pushed reference and digest (KV
//!   `imagemesh-image-refs`).
//!
//! Everything a request names is its tenant's: the scheduler bound it to the intake subject's
//! tenant and chose a target under that tenant's repository prefix.
#![forbid(unsafe_code)]

mod auth;
mod base_pull;
mod build_args;
mod buildah;
pub mod config;
mod context;
mod copy;
mod dockerfile;
mod failure;
mod handler;
mod history;
mod layout_push;
mod log;
mod records;
pub mod sandbox;
mod workdir;

use std::sync::Arc;

use anyhow::Context as _;
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
    let sandbox = start_sandbox(&settings)?;
    workdir::sweep_stale(&settings.storage_dir, |state| {
        sandbox.remove_containers(state)
    });
    let handler = Builder {
        sandbox: Arc::new(sandbox),
        client: client.clone(),
        records: records::Records::new(streams::image_refs(&js, &config.streams).await?),
        js: js.clone(),
        status: StatusReporter::new(js, IDENTITY.name).with_instance(&settings.placement.worker_id),
        settings: settings.clone(),
    };
    let work = Work::Placed {
        kind: placement::BUILD,
        placement: settings.placement.clone(),
        streams: Box::new(config.streams.clone()),
        holds: None,
    };
    worker::serve(&client, IDENTITY, work, settings.worker, handler, shutdown).await
}

/// The sandbox of this builder's `RUN` steps, and a build storage its users can reach.
fn start_sandbox(settings: &config::BuilderConfig) -> anyhow::Result<sandbox::Sandbox> {
    let storage = &settings.storage_dir;
    let sandbox = sandbox::Sandbox::new(settings.sandbox.clone()).map_err(anyhow::Error::msg)?;
    workdir::prepare_storage(storage)
        .with_context(|| format!("builder.storage_dir {}", storage.display()))?;
    match sandbox.isolation() {
        sandbox::Isolation::Oci => {
            sandbox::check_searchable(storage).map_err(anyhow::Error::msg)?;
        }
        sandbox::Isolation::Chroot => tracing::warn!(
            "builder.sandbox.isolation = \"chroot\": RUN steps run as root with this host's \
             network and processes in view; unsafe for Dockerfiles you do not trust"
        ),
    }
    Ok(sandbox)
}
