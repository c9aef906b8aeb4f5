//! The baseline: raw JetStream consume→publish with the scheduler's concurrency, between two
//! streams defined like the intake and the mount queue (only names and subjects differ), so the
//! difference is what the scheduler does, not how its streams store. On the secured bus the relay
//! and its load generator have identities of their own ([`RELAY`], [`LOAD`]) whose grants are
//! what they do, as the scheduler's and the client's are.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::stream::Config;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use imagemesh_access::grants::Grants;
use imagemesh_bench::Party;
use imagemesh_runtime::Shutdown;
use imagemesh_runtime::nats::NatsConfig;
use imagemesh_runtime::streams::{self, StreamOptions};
use imagemesh_testkit::Registry;
use prost::Message;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Prefix of the input subjects: one per message, like the intake's one per request id.
pub const IN_PREFIX: &str = "bench.relay.in";
pub const OUT_SUBJECT: &str = "bench.relay.out";
const IN_STREAM: &str = "BENCH_RELAY_IN";
pub const OUT_STREAM: &str = "BENCH_RELAY_OUT";
/// The relay's durable consumer.
const DURABLE: &str = "relay";

/// The relay: consumes its input stream (as the scheduler consumes the intake, with a filter
/// of one message per subject) and publishes into its output stream.
pub const RELAY: Party = Party {
    name: "bench-relay",
    grants: relay_grants,
    responds: false,
};

/// The relay's load generator: publishes into its input stream (as a client submits).
pub const LOAD: Party = Party {
    name: "bench-relay-load",
    grants: load_grants,
    responds: false,
};

fn in_filter() -> String {
    format!("{IN_PREFIX}.*")
}

fn relay_grants(grants: &mut Grants) {
    grants
        .work_consumer(IN_STREAM, DURABLE, &in_filter())
        .stream_publish(OUT_SUBJECT);
}

fn load_grants(grants: &mut Grants) {
    grants.stream_publish(in_filter());
}

pub async fn ensure_streams(js: &jetstream::Context) -> anyhow::Result<()> {
    let options = StreamOptions::default();
    let input = Config {
        name: IN_STREAM.into(),
        subjects: vec![in_filter()],
        ..streams::definition(streams::INTAKE, &options)
    };
    let output = Config {
        name: OUT_STREAM.into(),
        subjects: vec![OUT_SUBJECT.into()],
        ..streams::definition(streams::MOUNT, &options)
    };
    for config in [input, output] {
        js.create_or_update_stream(config).await?;
    }
    Ok(())
}

pub async fn publish(
    js: &jetstream::Context,
    registry: &Registry,
    prefix: &str,
    count: usize,
) -> anyhow::Result<usize> {
    let mut acks = Vec::with_capacity(count);
    for n in 0..count {
        let id = format!("{prefix}-{n}");
        let payload = crate::container_request(registry, id.clone()).encode_to_vec();
        let message = jetstream::message::PublishMessage::build().payload(payload.into());
        acks.push(
            js.send_publish(format!("{IN_PREFIX}.{id}"), message)
                .await?,
        );
        // The context caps acknowledgements in flight; settle them in chunks.
        if acks.len() == 1000 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    Ok(count)
}

/// Relays until `shutdown`: pull (bounded by `concurrency`), publish with PubAck, ack. Connects
/// with `nats` (as [`RELAY`]).
pub async fn run(nats: NatsConfig, concurrency: usize, shutdown: Shutdown) -> anyhow::Result<()> {
    let client = nats.connect("relay").await?;
    let js = jetstream::new(client);
    let stream = js.get_stream(IN_STREAM).await?;
    let consumer = stream
        .get_or_create_consumer(
            DURABLE,
            pull::Config {
                durable_name: Some(DURABLE.into()),
                // Like the scheduler's intake consumer: filtered, so the create request names
                // the filter and a permission can hold it to exactly that.
                filter_subject: in_filter(),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(concurrency)
        .messages()
        .await?;
    let permits = Arc::new(Semaphore::new(concurrency));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            permit = permits.clone().acquire_owned() => permit?,
        };
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = messages.next() => match next {
                Some(Ok(message)) => message,
                _ => continue,
            },
        };
        let js = js.clone();
        tokio::spawn(async move {
            let id = message
                .info()
                .map(|i| i.stream_sequence)
                .unwrap_or_default()
                .to_string();
            let publish = jetstream::message::PublishMessage::build()
                .payload(message.payload.clone())
                .message_id(id);
            if let Ok(ack) = js.send_publish(OUT_SUBJECT, publish).await
                && ack.await.is_ok()
            {
                let _ = message.double_ack_with(AckKind::Ack).await;
            }
            drop(permit);
        });
    }
}

pub async fn wait_out_count(js: &jetstream::Context, expected: u64) -> anyhow::Result<()> {
    loop {
        let mut stream = js.get_stream(OUT_STREAM).await?;
        if stream.info().await?.state.messages >= expected {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn purge(js: &jetstream::Context) -> anyhow::Result<()> {
    js.get_stream(OUT_STREAM).await?.purge().await?;
    Ok(())
}

pub async fn delete(js: &jetstream::Context) -> anyhow::Result<()> {
    js.delete_stream(IN_STREAM).await?;
    js.delete_stream(OUT_STREAM).await?;
    Ok(())
}
