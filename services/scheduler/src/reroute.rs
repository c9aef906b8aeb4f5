//! Moving work away from workers that stopped heartbeating.
//!
//! Work addressed to one worker (`imagemesh.work.build.<worker id>`) waits in the stream until
//! that worker pulls and acks it. When the worker's heartbeat expires first, every scheduler
//! periodically: deletes the worker's consumer (which also releases what it had pulled but not
//! acknowledged), drains the subject through a shared durable consumer, re-publishes each
//! request to a live worker (or the shared queue) under a new message id, reports it, and acks
//! the original. Several schedulers may do this at once: they share the draining consumer, so
//! each message moves once.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind, message::PublishMessage};
use futures::StreamExt;
use imagemesh_proto::RequestKey;
use imagemesh_runtime::Shutdown;
use imagemesh_runtime::placement::{self, Directory, WorkKind};
use imagemesh_runtime::status::{StatusReporter, Step};

/// Runs the re-routing sweep every `every` until `shutdown`.
pub async fn run(
    js: jetstream::Context,
    directory: Directory,
    status: StatusReporter,
    every: Duration,
    shutdown: Shutdown,
) {
    // Let the directory hear a full round of heartbeats before judging anyone gone.
    let warmup = every * placement::MISSED_HEARTBEATS;
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep(warmup) => {}
    }
    let mut ticks = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        for kind in [placement::BUILD, placement::MOUNT] {
            if let Err(err) = sweep(&js, kind, &directory, &status).await {
                tracing::warn!(kind = kind.kind, error = %err, "re-routing sweep failed");
            }
        }
    }
}

/// Re-routes the queued work of every worker of `kind` that is not live.
async fn sweep(
    js: &jetstream::Context,
    kind: WorkKind,
    directory: &Directory,
    status: &StatusReporter,
) -> anyhow::Result<()> {
    let stream = js.get_stream(kind.stream).await?;
    let mut subjects = stream
        .info_with_subjects(format!("{}.*", kind.subject))
        .await?;
    let mut orphaned = Vec::new();
    while let Some(entry) = subjects.next().await {
        let (subject, count) = entry?;
        if let Some(worker) = kind.worker_of_subject(&subject)
            && count > 0
            && !directory.is_live(kind.kind, worker)
        {
            orphaned.push(worker.to_string());
        }
    }
    for worker in orphaned {
        let moved = drain(js, kind, &worker, directory, status).await?;
        tracing::warn!(
            worker,
            moved,
            kind = kind.kind,
            "re-routed the work of a worker that stopped heartbeating"
        );
    }
    Ok(())
}

async fn drain(
    js: &jetstream::Context,
    kind: WorkKind,
    worker: &str,
    directory: &Directory,
    status: &StatusReporter,
) -> anyhow::Result<usize> {
    let stream = js.get_stream(kind.stream).await?;
    // Only one consumer may read a subject of a work-queue stream: remove the worker's own.
    let _ = stream.delete_consumer(&kind.worker_durable(worker)).await;
    let name = format!("reroute-{}", kind.worker_durable(worker));
    let consumer: PullConsumer = stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: kind.worker_subject(worker),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            },
        )
        .await?;
    let mut moved = 0;
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(64)
            .expires(Duration::from_millis(500))
            .messages()
            .await?;
        let mut fetched = 0;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!(e))?;
            fetched += 1;
            move_one(js, kind, worker, &message, directory, status).await?;
            moved += 1;
        }
        if fetched == 0 {
            break;
        }
    }
    let _ = stream.delete_consumer(&name).await;
    Ok(moved)
}

async fn move_one(
    js: &jetstream::Context,
    kind: WorkKind,
    worker: &str,
    message: &jetstream::Message,
    directory: &Directory,
    status: &StatusReporter,
) -> anyhow::Result<()> {
    let target = match directory.choose(kind.kind) {
        Some(worker_id) => kind.worker_subject(&worker_id),
        None => kind.subject.to_string(),
    };
    let original_id = message
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    let mut headers = HeaderMap::new();
    for (name, values) in message.headers.iter().flat_map(|h| h.iter()) {
        if AsRef::<str>::as_ref(name) != "Nats-Msg-Id" {
            for value in values {
                headers.append(name.clone(), value.clone());
            }
        }
    }
    // The original id is still within the de-duplication window: a new one is needed.
    let sequence = message
        .info()
        .map(|i| i.stream_sequence)
        .unwrap_or_default();
    let republish = PublishMessage::build()
        .payload(message.payload.clone())
        .headers(headers)
        .message_id(format!("{original_id}~rerouted-{sequence}"));
    js.send_publish(target.clone(), republish).await?.await?;
    message
        .double_ack_with(AckKind::Ack)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    // Work messages are published with `<tenant>.<request id>` as message id.
    if let Some(request) = RequestKey::from_message_id(&original_id) {
        let step = Step::pending(
            "rerouted",
            format!("worker {worker} stopped heartbeating; re-routed to {target}"),
        )
        .detail("from_worker", worker)
        .detail("subject", &target);
        status.report(request, step).await;
    }
    Ok(())
}
