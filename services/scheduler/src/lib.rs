//! The scheduler: the one place credentials are attached to ContainerRequests.
//!
//! For every request on the durable intake (`imagemesh.intake.<tenant>.<request id>`), build or
//! runtime, it binds the request to the subject's tenant, asks the credential service for a
//! build-registry token (push+pull for builds, pull for runtime) and for the image's own
//! registry credential, then publishes the enriched request to the builder
//! (`imagemesh.work.build`) or mounter (`imagemesh.work.mount`) stream. It fails closed: a
//! request is never dispatched without its build-registry credential; while the credential
//! service is unreachable it is retried with backoff, and after `intake.max_deliver` attempts it
//! fails with a clear reason and a dead letter.
//!
//! - `handler`: one intake request: enrich, dispatch, report.
//! - [`enrich`]: which image, which credentials.
//! - `tenancy`: what a tenant may reach in the build registry (its prefix, shared repositories).
//! - `token_cache`: tokens reused for a few seconds, per tenant.
//! - `dispatch`: placement and the one publish downstream; `reroute`: moving the queued work of
//!   workers that stopped heartbeating.
//! - poison messages: work of any stage (intake, build, mount, index) that exhausted
//!   `max_deliver` because its handler crashed or hung is failed, dead-lettered and deleted
//!   ([`imagemesh_runtime::poison`]).
#![forbid(unsafe_code)]

pub mod config;
mod dispatch;
pub mod enrich;
mod handler;
mod reroute;
mod tenancy;
mod token_cache;

use async_nats::Client;
use async_nats::jetstream::Context as JetStream;
pub use config::Config;
use imagemesh_runtime::credentials::CredentialClient;
use imagemesh_runtime::placement::{self, Directory};
use imagemesh_runtime::service::Identity;
use imagemesh_runtime::status::StatusReporter;
use imagemesh_runtime::worker::{self, ConsumerSpec, Work};
use imagemesh_runtime::{Shutdown, streams, subjects};

use crate::dispatch::Dispatcher;
use crate::enrich::Enricher;
use crate::handler::Scheduler;
use crate::token_cache::TokenCache;

/// How the scheduler presents itself to `$SRV.INFO`.
pub const IDENTITY: Identity = Identity {
    name: "scheduler",
    description: "Attaches credentials to every ContainerRequest and dispatches it",
};

/// Schedules requests until `shutdown`.
pub async fn run(config: Config, client: Client, shutdown: Shutdown) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    let used = [
        streams::INTAKE,
        streams::BUILD,
        streams::MOUNT,
        streams::INDEX,
        streams::STATUS,
        streams::DEAD_LETTER,
    ];
    streams::ensure(&js, &used, &config.streams).await?;
    let image_refs = streams::image_refs(&js, &config.streams).await?;
    let image_secrets = streams::image_secrets(&js, &config.streams).await?;
    let settings = config.scheduler;
    settings.validate()?;
    let workers = placement::workers_bucket(&js, settings.heartbeat, &config.streams).await?;

    let directory = Directory::watch(&workers, shutdown.clone()).await?;
    let status = StatusReporter::new(js.clone(), IDENTITY.name);
    tokio::spawn(reroute::run(
        js.clone(),
        directory.clone(),
        status.clone(),
        settings.heartbeat,
        shutdown.clone(),
    ));
    tokio::spawn(end_poison_messages(
        js.clone(),
        status.clone(),
        shutdown.clone(),
    ));
    let handler = Scheduler {
        enricher: Enricher {
            credentials: CredentialClient::new(client.clone(), settings.credential_timeout),
            tokens: TokenCache::new(settings.token_reuse),
            image_secrets,
            build_registry: imagemesh_registry::host::normalize(&settings.build_registry),
            build_repository: settings.build_repository.clone(),
            shared_repositories: settings.shared_repositories.clone(),
            prefetch_publish: settings.prefetch_publish,
            image_refs,
            references: Default::default(),
        },
        dispatcher: Dispatcher {
            connection: dispatch::ConnectionEpoch::new(&client),
            js,
            directory,
        },
        status,
    };
    let spec = ConsumerSpec {
        stream: streams::INTAKE,
        durable: "scheduler".into(),
        filter_subject: subjects::INTAKE_ALL.into(),
        inactive_threshold: None,
        // A request refused or given up on was never dispatched: its id is its client's again.
        forget_terminated: true,
    };
    tracing::info!(build_registry = %settings.build_registry, "scheduling");
    worker::serve(
        &client,
        IDENTITY,
        Work::Queue(spec),
        settings.intake,
        handler,
        shutdown,
    )
    .await
}

/// Ends the poison messages of every stage: the scheduler is the one service that outlives a
/// worker crashing on a message over and over (the crashing process is the least likely to
/// hear the advisory), and it already reads every work stream it dispatches to.
async fn end_poison_messages(js: JetStream, status: StatusReporter, shutdown: Shutdown) {
    use imagemesh_proto::v1::{ContainerRequest, IndexRequest};
    use imagemesh_runtime::poison::{self, PoisonQueue};
    let scrub = ContainerRequest::without_secrets;
    let queues = vec![
        PoisonQueue::of(streams::INTAKE, "scheduler", "scheduler", scrub).keeping_undecodable(),
        // The shared queue and every worker's own consumer.
        PoisonQueue::of(streams::BUILD, "*", "builder", scrub),
        PoisonQueue::of(streams::MOUNT, "*", "mounter", scrub),
        PoisonQueue::of(
            streams::INDEX,
            "indexer",
            "indexer",
            IndexRequest::without_secrets,
        ),
    ];
    if let Err(err) = poison::watch(js, status, queues, shutdown).await {
        tracing::error!(error = %err, "not watching for poison messages");
    }
}
