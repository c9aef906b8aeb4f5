//! `imagemesh watch ID`: follow a request's status events until it succeeds or fails.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::push::OrderedConfig;
use futures::StreamExt;
use imagemesh_proto::v1::{RequestState, StatusEvent};
use imagemesh_proto::{RequestKey, validate_request_id};
use imagemesh_runtime::error::code_name;
use imagemesh_runtime::{streams, subjects};
use indicatif::{ProgressBar, ProgressStyle};
use prost::Message;

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// The request id `submit` printed.
    pub request_id: String,
    /// Give up after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub async fn run(
    client: &async_nats::Client,
    tenant: &str,
    args: WatchArgs,
) -> anyhow::Result<ExitCode> {
    follow(
        client,
        RequestKey::new(tenant, &args.request_id),
        args.timeout,
    )
    .await
}

/// Every status event of `request`, stored and to come: an ordered consumer that pushes into
/// this client's private inbox. It is named, so its filter (the request's status subject) is
/// part of the subject that creates it and the server checks it against the tenant the
/// client's identity may read; no other client can pull from it.
pub async fn status_events(
    client: &async_nats::Client,
    request: RequestKey<'_>,
) -> anyhow::Result<async_nats::jetstream::consumer::push::Ordered> {
    let js = async_nats::jetstream::new(client.clone());
    let stream = js
        .get_stream(streams::STATUS)
        .await
        .context("no status stream (is the mesh running?)")?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            name: Some(format!("watch-{}", uuid::Uuid::new_v4().simple())),
            deliver_subject: client.new_inbox(),
            filter_subject: subjects::status(request),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    Ok(consumer.messages().await?)
}

/// Replays the request's status events from the start and follows new ones. Exit code: 0 when
/// it succeeded, 1 when it failed, 3 when `timeout` passed first.
pub async fn follow(
    client: &async_nats::Client,
    request: RequestKey<'_>,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    Ok(match follow_to_end(client, request, timeout).await? {
        Some(event) if event.state() == RequestState::Succeeded => ExitCode::SUCCESS,
        Some(_) => ExitCode::FAILURE,
        None => ExitCode::from(3),
    })
}

/// Like [`follow`], returning the event that ended the request (`None`: `timeout` passed).
pub async fn follow_to_end(
    client: &async_nats::Client,
    request: RequestKey<'_>,
    timeout: Duration,
) -> anyhow::Result<Option<StatusEvent>> {
    let request_id = request.id;
    validate_request_id(request_id)?;
    let mut events = status_events(client, request).await?;
    let progress = Progress::new(request_id);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, events.next()).await;
        let message = match next {
            Err(_) => {
                progress.finish(&format!(
                    "gave up waiting for request {request_id} after {timeout:?}"
                ));
                return Ok(None);
            }
            Ok(None) => anyhow::bail!("status stream closed"),
            Ok(Some(message)) => message?,
        };
        let Ok(event) = StatusEvent::decode(message.payload.clone()) else {
            continue;
        };
        progress.event(&event, started.elapsed());
        match event.state() {
            RequestState::Succeeded => {
                progress.finish(&format!(
                    "✔ request {request_id} succeeded: {}",
                    event.message
                ));
                return Ok(Some(event));
            }
            RequestState::Failed => {
                let code = code_name(event.error_code());
                progress.finish(&format!(
                    "✘ request {request_id} failed ({code}): {}",
                    event.message
                ));
                return Ok(Some(event));
            }
            _ => {}
        }
    }
}

/// A spinner on a terminal; plain lines otherwise.
struct Progress(ProgressBar);

impl Progress {
    fn new(request_id: &str) -> Self {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("valid template"),
        );
        bar.set_message(format!("waiting for request {request_id}"));
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(bar)
    }

    fn line(&self, text: &str) {
        if self.0.is_hidden() {
            println!("{text}");
        } else {
            self.0.println(text);
        }
    }

    fn event(&self, event: &StatusEvent, elapsed: Duration) {
        let state = event
            .state()
            .as_str_name()
            .trim_start_matches("REQUEST_STATE_");
        self.line(&format!(
            "[{:>7.2}s] {:<9} {:<9} {}: {}",
            elapsed.as_secs_f64(),
            event.service,
            state,
            event.phase,
            event.message
        ));
        self.0
            .set_message(format!("{} {}", event.service, event.phase));
    }

    fn finish(&self, text: &str) {
        self.0.finish_and_clear();
        println!("{text}");
    }
}
