//! Cached-token round trip over NATS against a raw NATS request/reply echo, in the same run.
//!
//! A real nats-server, a token server, and the credential service in-process (its own runtime)
//! configured for a token-auth registry. After one upstream mint, every request for the same
//! (registry, repository, actions) is a cache hit. The baseline is a plain NATS subscriber on the
//! service's runtime that answers each request with a pre-encoded TokenResponse of the same
//! size; the client sends both the same payload with the same headers, in alternating blocks so
//! machine noise hits both alike. Prints p50/p99 of each and the ratios.
//!
//! The bus is secured by default (`imagemesh_bench::bus`): TLS, and every party on its own
//! identity with only its permissions. The service runs as `credential-1`; the echo, which
//! answers requests as the service does, as `bench-echo` (it subscribes to its subject and may
//! reply to what it receives, which the server tracks per request for both); the client as
//! `bench-client`, which may send to the mint endpoint (as a scheduler does) and to the echo,
//! so both kinds still go over one connection. `IMAGEMESH_BENCH_SECURED=0` runs both on the
//! open server instead.
//!
//! Environment: `BENCH_ROUNDS` (10) blocks of `BENCH_PER_ROUND` (2000) requests per kind,
//! `IMAGEMESH_BENCH_SECURED` (1).
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use imagemesh_access::Role;
use imagemesh_access::grants::Grants;
use imagemesh_bench::{Bus, OPERATOR, Party, env_number, percentile, secured_from_env};
use imagemesh_credential::config::{Config, RegistryConfig, SecretRef, TokenAuthConfig};
use imagemesh_proto::v1::{Scope, TokenRequest, TokenResponse};
use imagemesh_runtime::{Rejection, Shutdown, subjects};
use imagemesh_testkit::token_server::TokenServer;
use prost::Message;

const ECHO_SUBJECT: &str = "bench.echo";
const REGISTRY: &str = "bench-registry.example";
const USER: &str = "bench";
const PASSWORD: &str = "bench-Pw-1";

const CREDENTIAL: &str = "credential-1";

/// The baseline responder: its subject, and replies to what it receives.
const ECHO: Party = Party {
    name: "bench-echo",
    grants: echo_grants,
    responds: true,
};

/// The client: the mint endpoint (the scheduler's grant) and the echo.
const CLIENT: Party = Party {
    name: "bench-client",
    grants: client_grants,
    responds: false,
};

fn echo_grants(grants: &mut Grants) {
    grants.subscribe(ECHO_SUBJECT);
}

fn client_grants(grants: &mut Grants) {
    grants
        .publish(subjects::CREDENTIAL_MINT)
        .publish(ECHO_SUBJECT);
}

fn main() -> anyhow::Result<()> {
    let rounds = env_number("BENCH_ROUNDS", 10);
    let per_round = env_number("BENCH_PER_ROUND", 2000);
    // The service side: the credential service and the echo, on their own runtime.
    let server = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Logs and tracing as the service binary has them (info unless RUST_LOG says otherwise), so
    // the measured path pays for its spans what production pays.
    let _telemetry = server.block_on(async { imagemesh_runtime::telemetry::init("credential") });
    let bus = Bus::start(
        secured_from_env(),
        &[(CREDENTIAL, Role::Credential)],
        &[ECHO, CLIENT],
    )?;
    eprintln!("bench-credential: {} bus", bus.mode());
    let tokens = TokenServer::start("bench", &[(USER, PASSWORD)]);
    let shutdown = Shutdown::new();
    let config = config(&bus, &tokens);
    let service_client = server.block_on(config.nats.connect("credential"))?;
    let echo_client = server.block_on(bus.connect(ECHO.name))?;
    let service = server.spawn(imagemesh_credential::run(
        config,
        service_client,
        shutdown.clone(),
    ));

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let result = client_rt.block_on(async {
        // The operator sees the service answer discovery; the client may only call it.
        let operator = bus.connect(OPERATOR).await?;
        imagemesh_testkit::wait_for_service(&operator, "credential", Duration::from_secs(20)).await;
        let client = bus.connect(CLIENT.name).await?;
        let (payload, headers) = request();
        let first = call(&client, subjects::CREDENTIAL_MINT, &payload, &headers).await?;
        let reply_bytes = Bytes::from(first.encode_to_vec());
        server.spawn(echo(echo_client, reply_bytes));
        client.flush().await?;
        measure(&client, &payload, &headers, rounds, per_round).await
    });
    shutdown.trigger();
    let _ = server.block_on(service);
    let violations = bus.violations();
    for line in &violations {
        eprintln!("nats-server refused: {line}");
    }
    let (cached, echo) = result?;
    report(&bus, &cached, &echo, tokens.requests(), rounds * per_round);
    anyhow::ensure!(
        violations.is_empty(),
        "nats-server refused something a party did; the numbers may not be what they seem"
    );
    Ok(())
}

fn config(bus: &Bus, tokens: &TokenServer) -> Config {
    let mut config = Config {
        nats: bus.nats_config(CREDENTIAL),
        ..Default::default()
    };
    config.credential.registries = vec![RegistryConfig::Token(TokenAuthConfig {
        host: REGISTRY.into(),
        username: USER.into(),
        password: SecretRef::value(PASSWORD),
        // Pinned: no registry needed, the bench measures the cache path only.
        realm: Some(tokens.realm()),
        service: Some(tokens.service().into()),
        insecure: true,
    })];
    config
}

fn request() -> (Bytes, HeaderMap) {
    let request = TokenRequest {
        registry: REGISTRY.into(),
        scope: Some(Scope {
            repository: "bench/app".into(),
            actions: vec!["pull".into(), "push".into()],
        }),
        request_id: "bench".into(),
        credential_ref: String::new(),
        tenant: imagemesh_proto::DEFAULT_TENANT.into(),
        login: false,
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        subjects::CONTENT_TYPE_HEADER,
        imagemesh_proto::CONTENT_TYPE_PROTOBUF,
    );
    (request.encode_to_vec().into(), headers)
}

async fn call(
    client: &async_nats::Client,
    subject: &'static str,
    payload: &Bytes,
    headers: &HeaderMap,
) -> anyhow::Result<TokenResponse> {
    let reply = client
        .request_with_headers(subject, headers.clone(), payload.clone())
        .await?;
    if let Some(rejection) = Rejection::from_headers(reply.headers.as_ref()) {
        anyhow::bail!("token request refused: {rejection}");
    }
    Ok(TokenResponse::decode(reply.payload)?)
}

/// A raw NATS responder: answers every request with `reply`.
async fn echo(client: async_nats::Client, reply: Bytes) {
    let Ok(mut requests) = client.subscribe(ECHO_SUBJECT).await else {
        return;
    };
    while let Some(message) = requests.next().await {
        if let Some(inbox) = message.reply {
            let _ = client.publish(inbox, reply.clone()).await;
        }
    }
}

async fn measure(
    client: &async_nats::Client,
    payload: &Bytes,
    headers: &HeaderMap,
    rounds: usize,
    per_round: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    // Warm both paths (connections, allocator, caches) before measuring.
    for _ in 0..per_round.min(1000) {
        call(client, subjects::CREDENTIAL_MINT, payload, headers).await?;
        client
            .request_with_headers(ECHO_SUBJECT, headers.clone(), payload.clone())
            .await?;
    }
    let mut cached = Vec::with_capacity(rounds * per_round);
    let mut echo = Vec::with_capacity(rounds * per_round);
    for _ in 0..rounds {
        for _ in 0..per_round {
            let start = Instant::now();
            let response = call(client, subjects::CREDENTIAL_MINT, payload, headers).await?;
            cached.push(start.elapsed());
            anyhow::ensure!(response.cached, "a measured request missed the cache");
        }
        for _ in 0..per_round {
            let start = Instant::now();
            client
                .request_with_headers(ECHO_SUBJECT, headers.clone(), payload.clone())
                .await?;
            echo.push(start.elapsed());
        }
    }
    Ok((cached, echo))
}

fn report(
    bus: &Bus,
    cached: &[Duration],
    echo: &[Duration],
    upstream_calls: usize,
    per_kind: usize,
) {
    let mut cached = cached.to_vec();
    let mut echo = echo.to_vec();
    cached.sort();
    echo.sort();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    let row = |name: &str, s: &[Duration]| {
        println!(
            "{name:<22} {:>9.1} {:>9.1} {:>9.1}",
            micros(percentile(s, 0.5)),
            micros(percentile(s, 0.99)),
            micros(percentile(s, 0.999))
        )
    };
    println!("credential: cached-token round trip vs raw NATS request/reply echo");
    println!("bus: {}", bus.mode());
    println!(
        "{per_kind} requests each, alternating blocks; upstream token calls: {upstream_calls}"
    );
    println!("{:<22} {:>9} {:>9} {:>9}", "µs", "p50", "p99", "p99.9");
    row("cached token (mint)", &cached);
    row("raw NATS echo", &echo);
    let p50 = micros(percentile(&cached, 0.5)) / micros(percentile(&echo, 0.5));
    let p99 = micros(percentile(&cached, 0.99)) / micros(percentile(&echo, 0.99));
    println!("ratio cached/echo      p50 {p50:.2}x   p99 {p99:.2}x");
    let verdict = if p99 <= 2.0 { "met" } else { "NOT met" };
    println!("goal cached p99 <= 2x echo p99: {verdict}");
}
