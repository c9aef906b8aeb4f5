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
//! The bus is secured by default (`imagemesh_bench::bus`): TLS, JetStream encrypted at rest,
//! and every party on its own identity with only its permissions, the baseline's too. The
//! operator provisions the streams and does the bench's bookkeeping; the scheduler and the
//! credential service run as `scheduler-1` and `credential-1`; the scheduler's requests come
//! from `client-default`. The relay, its load generator and the probe that watches arrivals
//! downstream are bench identities whose grants cover exactly what they do (`relay::RELAY`,
//! `relay::LOAD`, [`PROBE`]). `IMAGEMESH_BENCH_SECURED=0` runs both on the open server instead.
//!
//! Environment: `BENCH_ROUNDS` (3), `BENCH_REQUESTS` (10000), `BENCH_LATENCY_SAMPLES` (300),
//! `BENCH_CONCURRENCY` (64: requests in flight, the same for the scheduler and the relay),
//! `IMAGEMESH_BENCH_SECURED` (1).
#![forbid(unsafe_code)]

mod relay;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use imagemesh_access::Role;
use imagemesh_access::grants::Grants;
use imagemesh_bench::{Bus, OPERATOR, Party, env_number, percentile, secured_from_env};
use imagemesh_proto::DEFAULT_TENANT;
use imagemesh_proto::v1::{ContainerRequest, RequestKind};
use imagemesh_runtime::{Shutdown, streams, subjects};
use imagemesh_testkit::{Registry, RegistryAuth};
use prost::Message;

const USER: &str = "bench";
const PASSWORD: &str = "bench-Pw-2";

const CREDENTIAL: &str = "credential-1";
const SCHEDULER: &str = "scheduler-1";
/// Submits the scheduler's requests, as a client of the default tenant does.
const CLIENT: &str = "client-default";

/// Watches arrivals downstream for the latency samples: the mount queue's subject (where the
/// scheduler dispatches with no mounter advertising) and the relay's output subject.
const PROBE: Party = Party {
    name: "bench-probe",
    grants: probe_grants,
    responds: false,
};

fn probe_grants(grants: &mut Grants) {
    grants
        .subscribe(subjects::MOUNT)
        .subscribe(relay::OUT_SUBJECT);
}

/// Timings of one round.
struct Round {
    scheduler_rate: f64,
    relay_rate: f64,
    scheduler_latency: Vec<Duration>,
    relay_latency: Vec<Duration>,
}

/// The bench's own connections, each on its identity.
struct Parties {
    /// The operator: provisions, purges, counts, makes and removes the relay's streams, and
    /// waits for the credential service.
    admin: async_nats::Client,
    admin_js: jetstream::Context,
    /// Submits to the intake (`client-default`).
    client: jetstream::Context,
    /// Feeds the relay's input stream.
    relay_load: jetstream::Context,
    /// Watches the downstream subjects.
    probe: async_nats::Client,
}

impl Parties {
    async fn connect(bus: &Bus) -> anyhow::Result<Parties> {
        let admin = bus.connect(OPERATOR).await?;
        Ok(Parties {
            admin_js: jetstream::new(admin.clone()),
            admin,
            client: jetstream::new(bus.connect(CLIENT).await?),
            relay_load: jetstream::new(bus.connect(relay::LOAD.name).await?),
            probe: bus.connect(PROBE.name).await?,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let rounds = env_number("BENCH_ROUNDS", 3);
    let requests = env_number("BENCH_REQUESTS", 10000);
    let samples = env_number("BENCH_LATENCY_SAMPLES", 300);
    let concurrency = env_number("BENCH_CONCURRENCY", 64);
    let bus = Bus::start(
        secured_from_env(),
        &[
            (CREDENTIAL, Role::Credential),
            (SCHEDULER, Role::Scheduler),
            (
                CLIENT,
                Role::Client {
                    tenant: DEFAULT_TENANT.into(),
                },
            ),
        ],
        &[relay::RELAY, relay::LOAD, PROBE],
    )?;
    eprintln!("bench-scheduler: {} bus", bus.mode());
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
    let parties = load.block_on(Parties::connect(&bus))?;
    // As on a mesh: the operator provisions every stream and bucket, the services look them up.
    load.block_on(streams::provision_all(
        &parties.admin_js,
        &Default::default(),
        &[DEFAULT_TENANT.to_string()],
        imagemesh_scheduler::config::SchedulerConfig::default().heartbeat,
    ))?;
    let mut results = Vec::new();
    for round in 0..rounds {
        let result = load.block_on(run_round(
            &services,
            &bus,
            &parties,
            &registry,
            round,
            requests,
            samples,
            concurrency,
        ));
        let result = match result {
            Ok(result) => result,
            Err(err) => {
                refusals(&bus);
                return Err(err);
            }
        };
        eprintln!(
            "round {round}: scheduler {:.0}/s, relay {:.0}/s",
            result.scheduler_rate, result.relay_rate
        );
        results.push(result);
    }
    report(&bus, &results, requests, samples, concurrency);
    anyhow::ensure!(
        refusals(&bus) == 0,
        "nats-server refused something a party did; the numbers may not be what they seem"
    );
    Ok(())
}

/// Prints what the server refused (nothing, when every party's permissions fit what it does);
/// returns how many.
fn refusals(bus: &Bus) -> usize {
    let violations = bus.violations();
    for line in &violations {
        eprintln!("nats-server refused: {line}");
    }
    violations.len()
}

#[allow(clippy::too_many_arguments)]
async fn run_round(
    services: &tokio::runtime::Runtime,
    bus: &Bus,
    parties: &Parties,
    registry: &Registry,
    round: usize,
    requests: usize,
    samples: usize,
    concurrency: usize,
) -> anyhow::Result<Round> {
    let js = &parties.admin_js;
    let shutdown = Shutdown::new();
    // Each service connects on the services' runtime, as its own process would on its own.
    let credential = {
        let config = credential_config(bus, registry);
        let shutdown = shutdown.clone();
        services.spawn(async move {
            let client = config.nats.connect("credential").await?;
            imagemesh_credential::run(config, client, shutdown).await
        })
    };
    imagemesh_testkit::wait_for_service(&parties.admin, "credential", Duration::from_secs(20))
        .await;

    // Scheduler throughput: fill the intake while no scheduler runs, then start one.
    purge_work(js).await?;
    let ids = publish_requests(&parties.client, registry, &format!("t{round}"), requests).await?;
    let scheduler = start_scheduler(services, bus, registry, concurrency, shutdown.clone());
    wait_work_count(js, ids.len() as u64).await?;
    let scheduler_rate = arrival_rate(js, streams::MOUNT).await?;
    // Warm path latency, one request at a time.
    purge_work(js).await?;
    let scheduler_latency = latencies(
        &parties.probe,
        &parties.client,
        registry,
        &format!("l{round}"),
        samples,
        subjects::MOUNT,
        &format!("{}.{DEFAULT_TENANT}", subjects::INTAKE_PREFIX),
    )
    .await?;
    shutdown.trigger();
    stopped("scheduler", scheduler.await)?;
    stopped("credential service", credential.await)?;

    // The relay, on the same data shape.
    let relay_shutdown = Shutdown::new();
    relay::ensure_streams(js).await?;
    let ids = relay::publish(
        &parties.relay_load,
        registry,
        &format!("rt{round}"),
        requests,
    )
    .await?;
    let relay = services.spawn(relay::run(
        bus.nats_config(relay::RELAY.name),
        concurrency,
        relay_shutdown.clone(),
    ));
    relay::wait_out_count(js, ids as u64).await?;
    let relay_rate = arrival_rate(js, relay::OUT_STREAM).await?;
    relay::purge(js).await?;
    let relay_latency = latencies(
        &parties.probe,
        &parties.relay_load,
        registry,
        &format!("rl{round}"),
        samples,
        relay::OUT_SUBJECT,
        relay::IN_PREFIX,
    )
    .await?;
    relay_shutdown.trigger();
    stopped("relay", relay.await)?;
    relay::delete(js).await?;
    Ok(Round {
        scheduler_rate,
        relay_rate,
        scheduler_latency,
        relay_latency,
    })
}

/// A party that stopped with an error fails the run (on the secured bus, most likely a
/// permission the bench did not give).
fn stopped(
    what: &str,
    joined: Result<anyhow::Result<()>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err.context(format!("the {what} failed"))),
        Err(err) => Err(anyhow::anyhow!("the {what} panicked: {err}")),
    }
}

fn credential_config(bus: &Bus, registry: &Registry) -> imagemesh_credential::Config {
    let mut config = imagemesh_credential::Config {
        nats: bus.nats_config(CREDENTIAL),
        ..Default::default()
    };
    config.credential.registries = vec![imagemesh_credential::config::RegistryConfig::Basic {
        host: registry.addr().to_string(),
        username: USER.into(),
        password: imagemesh_credential::config::SecretRef {
            value: Some(PASSWORD.to_string().into()),
            ..Default::default()
        },
        // The bench measures dispatch: the loopback registry's own password is what it hands out.
        share_long_term_secret: true,
    }];
    config
}

fn start_scheduler(
    services: &tokio::runtime::Runtime,
    bus: &Bus,
    registry: &Registry,
    concurrency: usize,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let mut config = imagemesh_scheduler::Config {
        nats: bus.nats_config(SCHEDULER),
        streams: bus.stream_options(),
        ..Default::default()
    };
    config.scheduler.build_registry = registry.addr().to_string();
    config.scheduler.intake.concurrency = concurrency;
    // Runtime requests of the tenant's own images also get a push token for the prefetch list
    // (docs/mounter.md); `BENCH_PREFETCH_PUBLISH=0` measures without it.
    config.scheduler.prefetch_publish =
        std::env::var("BENCH_PREFETCH_PUBLISH").map_or(true, |v| v != "0");
    services.spawn(async move {
        let client = config.nats.connect("scheduler").await?;
        imagemesh_scheduler::run(config, client, shutdown).await
    })
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

/// Sends `samples` requests one at a time through `js`, each on `<into>.<its id>`, and times
/// their arrival on `watch` (subscribed by `probe`).
async fn latencies(
    probe: &async_nats::Client,
    js: &jetstream::Context,
    registry: &Registry,
    prefix: &str,
    samples: usize,
    watch: &str,
    into: &str,
) -> anyhow::Result<Vec<Duration>> {
    let mut arrivals = probe.subscribe(watch.to_string()).await?;
    probe.flush().await?;
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

fn report(bus: &Bus, results: &[Round], requests: usize, samples: usize, concurrency: usize) {
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
    println!("  bus: {}", bus.mode());
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
