//! Scheduler throughput and added latency against raw JetStream consume→publish, in one run.
//!
//! A real nats-server and docker-registry; the credential service and the scheduler run
//! in-process on their own runtime. The baseline is a relay on the same runtime that does what
//! a scheduler minimally must: pull from a work-queue stream with the same concurrency, publish
//! each message to another stream, wait for the PubAck, ack. Both get the same requests.
//!
//! Throughput: N requests are stored first, then the consumer (scheduler or relay) starts; the
//! rate is taken from the server timestamps of the first and last message stored downstream, so
//! neither side's startup counts. Latency: requests are sent one at a time
//! and timed from publish to arrival on the downstream subject (a core subscription). Rounds
//! alternate so machine noise hits both alike; medians are reported with the ratios.
//!
//! Environment: `BENCH_ROUNDS` (3), `BENCH_REQUESTS` (10000), `BENCH_LATENCY_SAMPLES` (300),
//! `BENCH_CONCURRENCY` (64: requests in flight, the same for the scheduler and the relay).
#![forbid(unsafe_code)]

mod relay;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use imagemesh_bench::{env_number, percentile};
use imagemesh_proto::DEFAULT_TENANT;
use imagemesh_proto::v1::{ContainerRequest, RequestKind};
use imagemesh_runtime::{Shutdown, streams, subjects};
use imagemesh_testkit::{NatsServer, Registry, RegistryAuth};
use prost::Message;

const USER: &str = "bench";
const PASSWORD: &str = "bench-Pw-2";

/// Timings of one round.
struct Round {
    scheduler_rate: f64,
    relay_rate: f64,
    scheduler_latency: Vec<Duration>,
    relay_latency: Vec<Duration>,
}

fn main() -> anyhow::Result<()> {
    let rounds = env_number("BENCH_ROUNDS", 3);
    let requests = env_number("BENCH_REQUESTS", 10000);
    let samples = env_number("BENCH_LATENCY_SAMPLES", 300);
    let concurrency = env_number("BENCH_CONCURRENCY", 64);
    let nats = NatsServer::start();
    let registry = Registry::start(RegistryAuth::Htpasswd(vec![(USER.into(), PASSWORD.into())]));
    let services = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Spans are recorded as in a deployed scheduler (each service installs this), so their cost
    // is part of the measurement; nothing is exported without an OTLP endpoint.
    let _telemetry =
        services.block_on(async { imagemesh_runtime::telemetry::init("bench-scheduler") });
    let load = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut results = Vec::new();
    for round in 0..rounds {
        let result = load.block_on(run_round(
            &services,
            &nats,
            &registry,
            round,
            requests,
            samples,
            concurrency,
        ))?;
        eprintln!(
            "round {round}: scheduler {:.0}/s, relay {:.0}/s",
            result.scheduler_rate, result.relay_rate
        );
        results.push(result);
    }
    report(&results, requests, samples, concurrency);
    Ok(())
}

async fn run_round(
    services: &tokio::runtime::Runtime,
    nats: &NatsServer,
    registry: &Registry,
    round: usize,
    requests: usize,
    samples: usize,
    concurrency: usize,
) -> anyhow::Result<Round> {
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    let shutdown = Shutdown::new();
    let credential = services.spawn(imagemesh_credential::run(
        credential_config(nats, registry),
        async_nats::connect(nats.url()).await?,
        shutdown.clone(),
    ));
    imagemesh_testkit::wait_for_service(&client, "credential", Duration::from_secs(20)).await;

    // Scheduler throughput: fill the intake while no scheduler runs, then start one.
    purge_work(&js).await?;
    let ids = publish_requests(&js, registry, &format!("t{round}"), requests).await?;
    let scheduler =
        start_scheduler(services, nats, registry, concurrency, shutdown.clone()).await?;
    wait_work_count(&js, ids.len() as u64).await?;
    let scheduler_rate = arrival_rate(&js, streams::MOUNT).await?;
    // Warm path latency, one request at a time.
    purge_work(&js).await?;
    let scheduler_latency = latencies(
        &client,
        &js,
        registry,
        &format!("l{round}"),
        samples,
        "imagemesh.work.>",
        &format!("{}.{DEFAULT_TENANT}", subjects::INTAKE_PREFIX),
    )
    .await?;
    shutdown.trigger();
    let _ = scheduler.await;
    let _ = credential.await;

    // The relay, on the same data shape.
    let relay_shutdown = Shutdown::new();
    relay::ensure_streams(&js).await?;
    let ids = relay::publish(&js, registry, &format!("rt{round}"), requests).await?;
    let relay = services.spawn(relay::run(nats.url(), concurrency, relay_shutdown.clone()));
    relay::wait_out_count(&js, ids as u64).await?;
    let relay_rate = arrival_rate(&js, relay::OUT_STREAM).await?;
    relay::purge(&js).await?;
    let relay_latency = latencies(
        &client,
        &js,
        registry,
        &format!("rl{round}"),
        samples,
        relay::OUT_SUBJECT,
        relay::IN_PREFIX,
    )
    .await?;
    relay_shutdown.trigger();
    let _ = relay.await;
    relay::delete(&js).await?;
    Ok(Round {
        scheduler_rate,
        relay_rate,
        scheduler_latency,
        relay_latency,
    })
}

fn credential_config(nats: &NatsServer, registry: &Registry) -> imagemesh_credential::Config {
    let mut config = imagemesh_credential::Config::default();
    config.nats.url = nats.url();
    config.credential.registries = vec![imagemesh_credential::config::RegistryConfig::Basic {
        host: registry.addr().to_string(),
        username: USER.into(),
        password: imagemesh_credential::config::SecretRef {
            value: Some(PASSWORD.to_string().into()),
            ..Default::default()
        },
    }];
    config
}

async fn start_scheduler(
    services: &tokio::runtime::Runtime,
    nats: &NatsServer,
    registry: &Registry,
    concurrency: usize,
    shutdown: Shutdown,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let mut config = imagemesh_scheduler::Config::default();
    config.nats.url = nats.url();
    config.scheduler.build_registry = registry.addr().to_string();
    config.scheduler.intake.concurrency = concurrency;
    let client = async_nats::connect(nats.url()).await?;
    Ok(services.spawn(imagemesh_scheduler::run(config, client, shutdown)))
}

/// A runtime request for an image in the build registry (the common case: a container start).
pub fn container_request(registry: &Registry, id: String) -> ContainerRequest {
    ContainerRequest {
        request_id: id,
        kind: RequestKind::Runtime as i32,
        image_ref: format!(
            "{}/imagemesh/builds/{DEFAULT_TENANT}:bench",
            registry.addr()
        ),
        ..Default::default()
    }
}

async fn publish_requests(
    js: &jetstream::Context,
    registry: &Registry,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    // The intake exists once a scheduler ran; make sure of it for the first round.
    streams::ensure(
        js,
        &[
            streams::INTAKE,
            streams::BUILD,
            streams::MOUNT,
            streams::STATUS,
            streams::DEAD_LETTER,
        ],
        &Default::default(),
    )
    .await?;
    let mut acks = Vec::with_capacity(count);
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let id = format!("{prefix}-{n}");
        let payload = container_request(registry, id.clone()).encode_to_vec();
        let message = jetstream::message::PublishMessage::build().payload(payload.into());
        let subject = subjects::intake(DEFAULT_TENANT, &id);
        acks.push(js.send_publish(subject, message).await?);
        ids.push(id);
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
    Ok(ids)
}

/// Messages per second stored in `stream`, between its first and last message (server
/// timestamps, so neither side's startup counts).
async fn arrival_rate(js: &jetstream::Context, stream: &str) -> anyhow::Result<f64> {
    let mut stream = js.get_stream(stream).await?;
    let state = stream.info().await?.state.clone();
    let span = (state.last_timestamp - state.first_timestamp).as_seconds_f64();
    anyhow::ensure!(span > 0.0 && state.messages > 1, "too few messages to time");
    Ok((state.messages - 1) as f64 / span)
}

async fn purge_work(js: &jetstream::Context) -> anyhow::Result<()> {
    for name in [streams::BUILD, streams::MOUNT] {
        if let Ok(stream) = js.get_stream(name).await {
            stream.purge().await?;
        }
    }
    Ok(())
}

async fn wait_work_count(js: &jetstream::Context, expected: u64) -> anyhow::Result<()> {
    loop {
        let mut total = 0;
        for name in [streams::BUILD, streams::MOUNT] {
            let mut stream = js.get_stream(name).await?;
            total += stream.info().await?.state.messages;
        }
        if total >= expected {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends `samples` requests one at a time, each on `<into>.<its id>`, and times their arrival on
/// `watch`.
async fn latencies(
    client: &async_nats::Client,
    js: &jetstream::Context,
    registry: &Registry,
    prefix: &str,
    samples: usize,
    watch: &str,
    into: &str,
) -> anyhow::Result<Vec<Duration>> {
    let mut arrivals = client.subscribe(watch.to_string()).await?;
    client.flush().await?;
    let mut out = Vec::with_capacity(samples);
    for n in 0..samples {
        let id = format!("{prefix}-{n}");
        let payload = container_request(registry, id.clone()).encode_to_vec();
        let message = jetstream::message::PublishMessage::build().payload(payload.into());
        let sent = Instant::now();
        js.send_publish(format!("{into}.{id}"), message)
            .await?
            .await?;
        tokio::time::timeout(Duration::from_secs(10), arrivals.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
        out.push(sent.elapsed());
    }
    Ok(out)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn report(results: &[Round], requests: usize, samples: usize, concurrency: usize) {
    let scheduler_rate = median(results.iter().map(|r| r.scheduler_rate).collect());
    let relay_rate = median(results.iter().map(|r| r.relay_rate).collect());
    let mut scheduler: Vec<_> = results
        .iter()
        .flat_map(|r| r.scheduler_latency.clone())
        .collect();
    let mut relay: Vec<_> = results
        .iter()
        .flat_map(|r| r.relay_latency.clone())
        .collect();
    scheduler.sort();
    relay.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "bench-scheduler: {} rounds, {requests} requests per throughput run, {samples} latency samples per round, {concurrency} in flight",
        results.len()
    );
    println!(
        "  throughput  scheduler {scheduler_rate:>8.0} req/s   raw consume->publish {relay_rate:>8.0} msg/s   ratio {:.2} (goal >= 0.50)",
        scheduler_rate / relay_rate
    );
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let s = percentile(&scheduler, p);
        let r = percentile(&relay, p);
        println!(
            "  latency {name} scheduler {:>7.2} ms   raw {:>7.2} ms   added {:>7.2} ms",
            ms(s),
            ms(r),
            ms(s) - ms(r)
        );
    }
}
