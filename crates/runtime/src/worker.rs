//! The durable work loop every JetStream-driven service runs.
//!
//! A service supplies a [`Handler`]; [`Worker::run`] pulls from its durable consumer, decodes
//! each message (protobuf or proto3 JSON by `Content-Type`), continues the trace the message
//! carries, calls the handler, and turns its [`Outcome`] into exactly one of: ack, nak with a
//! delay (retry), or terminate + failed status + dead letter. A retry on the last allowed delivery
//! becomes a termination, so nothing is redelivered forever. Long handlers keep their message
//! with progress acks. On shutdown the loop stops pulling, lets in-flight work finish within a
//! grace period, and naks what is left so another instance picks it up at once. A delivery
//! whose handler never returns (the process crashed or hung) is settled by no one; once
//! JetStream has given up on it after `max_deliver`, the schedulers end it ([`crate::poison`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use imagemesh_proto::{CONTENT_TYPE_PROTOBUF, RequestKey, TenantRequest, codec, validate_tenant};
use prost::{Message, Name};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::service::WorkCounters;
use crate::status::{DeadLetterInfo, StatusReporter, Step};
use crate::{ErrorCode, Rejection, Shutdown, subjects, telemetry};

/// Tuning of one work loop. Part of each service's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerOptions {
    /// Requests handled at once by this instance.
    pub concurrency: usize,
    /// Deliveries before a request that keeps failing is terminated and dead-lettered.
    pub max_deliver: i64,
    /// How long JetStream waits for an ack before redelivering (progress acks extend it).
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// How long in-flight work may run on after shutdown before it is nak'ed.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// First retry delay of a request that cannot be served yet; doubles per attempt.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_deliver: 10,
            ack_wait: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(20),
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
        }
    }
}

impl WorkerOptions {
    /// How long a request may keep being delivered before it is given up: `max_deliver`
    /// deliveries, each waiting at most the longer of `ack_wait` (a silent handler) and
    /// `retry_max` (the backoff before a retry). Its work stream keeps it at least this long
    /// ([`crate::streams::StreamOptions::validate_workers`]).
    pub fn retry_window(&self) -> Duration {
        let deliveries = u32::try_from(self.max_deliver.max(1)).unwrap_or(u32::MAX);
        self.ack_wait.max(self.retry_max).saturating_mul(deliveries)
    }

    /// Delay before delivery `attempt + 1`: exponential from `retry_initial`, capped.
    pub fn retry_delay(&self, attempt: u64) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16) as u32);
        self.retry_initial
            .saturating_mul(factor)
            .min(self.retry_max)
    }
}

/// What became of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: ack it.
    Done,
    /// Not now: redeliver after the backoff delay. The rejection is the failure reported if
    /// this was the last allowed delivery.
    Retry(Rejection),
    /// Never: terminate, report failure, dead-letter.
    Reject(Rejection),
}

impl Outcome {
    /// Retry when the failure is transient, reject otherwise.
    pub fn failed(rejection: Rejection, retryable: bool) -> Self {
        if retryable {
            Outcome::Retry(rejection)
        } else {
            Outcome::Reject(rejection)
        }
    }
}

/// Facts about the delivery a handler may need.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub subject: String,
    /// 1 on the first delivery.
    pub attempt: u64,
    pub max_attempts: u64,
    pub headers: Option<HeaderMap>,
    /// When this instance received it (for the duration metric).
    pub received: std::time::Instant,
    /// When the stream stored the message (the server's clock).
    pub published: Option<time::OffsetDateTime>,
}

impl Delivery {
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }
}

/// A service's per-request logic.
pub trait Handler: Send + Sync + 'static {
    /// The message, which names its request's tenant and id ([`TenantRequest::key`]).
    type Request: Message + Name + Default + TenantRequest + Send + 'static;

    /// The request as kept in a dead letter: every secret removed.
    fn without_secrets(request: &Self::Request) -> Self::Request;

    /// Whether an undecodable payload may be kept verbatim in a dead letter. Only true where
    /// producers never put secrets in the payload (the client intake).
    const KEEP_UNDECODABLE_PAYLOAD: bool = false;

    /// The tenant and request id a subject names, where subjects carry them (the intake). The
    /// subject is what the NATS server let its publisher use, so it decides: the request is
    /// bound to the subject's tenant, a payload naming another tenant or id is refused, and
    /// failures are reported on the subject's tenant and id even when the payload cannot be
    /// read.
    fn key_of_subject(_subject: &str) -> Option<RequestKey<'_>> {
        None
    }

    fn handle(
        &self,
        request: Self::Request,
        delivery: &Delivery,
    ) -> impl Future<Output = Outcome> + Send;
}

/// Which stream and durable consumer a worker reads.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: &'static str,
    pub durable: String,
    pub filter_subject: String,
    /// Delete the consumer after this long without pulls (per-worker consumers of instances
    /// that are gone); `None` keeps it forever.
    pub inactive_threshold: Option<Duration>,
    /// Delete a terminated message from the stream. The intake keeps one message per request
    /// id, so this gives the id of a request that was never dispatched back to its client.
    pub forget_terminated: bool,
}

/// What a job needs to know about the consumer its message came from.
struct Source {
    /// `<filter subject> process`: the span name (subjects carry ids; filters do not).
    span_name: String,
    /// The stream to delete terminated messages from, when the consumer asks for it.
    forget_in: Option<jetstream::stream::Stream>,
}

/// A running work loop over one or more consumers (a placed worker reads the shared queue and
/// its own subject) with one concurrency limit.
pub struct Worker<H: Handler> {
    js: jetstream::Context,
    consumers: Vec<ConsumerSpec>,
    options: WorkerOptions,
    handler: Arc<H>,
    status: StatusReporter,
    permits: Arc<Semaphore>,
    counters: Arc<WorkCounters>,
}

/// Runs `attempt` until it succeeds or `shutdown`: a NATS outage or a JetStream failover while
/// reopening the work consumers must not end the work loop (a mounter would take its mounts
/// down with it). `None` when shut down first.
async fn until_done<T, F, Fut>(shutdown: &Shutdown, what: &str, mut attempt: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut wait = Duration::from_millis(250);
    loop {
        match attempt().await {
            Ok(done) => return Some(done),
            Err(err) => {
                tracing::warn!(error = format!("{err:#}"), retry_in = ?wait, "{what} failed; retrying")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// Creates the durable consumer on `stream` (the one `spec` names), or updates it to `options`.
pub async fn ensure_consumer(
    stream: &jetstream::stream::Stream,
    spec: &ConsumerSpec,
    options: &WorkerOptions,
) -> anyhow::Result<PullConsumer> {
    let config = pull::Config {
        durable_name: Some(spec.durable.clone()),
        filter_subject: spec.filter_subject.clone(),
        ack_policy: AckPolicy::Explicit,
        ack_wait: options.ack_wait,
        max_deliver: options.max_deliver,
        ..Default::default()
    };
    match stream.create_consumer(config.clone()).await {
        Ok(consumer) => Ok(consumer),
        // Exists with other settings: bring it to ours.
        Err(_) => Ok(stream.update_consumer(config).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot create consumer {} on {}: {e}",
                spec.durable,
                spec.stream
            )
        })?),
    }
}

impl<H: Handler> Worker<H> {
    pub fn new(
        js: jetstream::Context,
        consumers: Vec<ConsumerSpec>,
        options: WorkerOptions,
        handler: Arc<H>,
        status: StatusReporter,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
        let counters = Arc::new(WorkCounters::new(
            permits.clone(),
            options.concurrency.max(1),
        ));
        Self {
            counters,
            js,
            consumers,
            options,
            handler,
            status,
            permits,
        }
    }

    /// What this worker has done so far (reported on `$SRV.STATS`).
    pub fn counters(&self) -> Arc<WorkCounters> {
        self.counters.clone()
    }

    /// The concurrency permits: free permits = free capacity (advertised to schedulers).
    pub fn load(&self) -> Arc<Semaphore> {
        self.permits.clone()
    }

    /// Runs until `shutdown`, then drains in-flight work.
    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let permits = self.permits.clone();
        let abort = Shutdown::new();
        let mut tasks = JoinSet::new();
        let (mut messages, mut sources) = self.open_stream().await?;
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = permits.clone().acquire_owned() => permit.expect("semaphore never closes"),
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = messages.next() => next,
            };
            match next {
                Some((source, Ok(message))) => {
                    let job = Job {
                        handler: self.handler.clone(),
                        status: self.status.clone(),
                        options: self.options.clone(),
                        abort: abort.clone(),
                        counters: self.counters.clone(),
                        source: sources[source].clone(),
                    };
                    tasks.spawn(async move {
                        job.process(message).await;
                        drop(permit);
                    });
                }
                Some((_, Err(err))) if err.kind() == pull::MessagesErrorKind::ConsumerDeleted => {
                    // A scheduler re-routed our queue while we were unreachable; make the
                    // consumer anew so work addressed to us flows again.
                    tracing::warn!("a consumer was deleted; recreating");
                    match until_done(&shutdown, "recreating the consumer", || self.open_stream())
                        .await
                    {
                        Some(opened) => (messages, sources) = opened,
                        None => break,
                    }
                }
                Some((_, Err(err))) => tracing::warn!(error = %err, "pull consumer hiccup"),
                None => {
                    tracing::warn!("pull consumer streams ended; reopening");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    match until_done(&shutdown, "reopening the consumers", || self.open_stream())
                        .await
                    {
                        Some(opened) => (messages, sources) = opened,
                        None => break,
                    }
                }
            }
            while tasks.try_join_next().is_some() {}
        }
        self.drain(tasks, abort).await;
        Ok(())
    }

    /// The messages of every consumer, each tagged with the index of its [`Source`].
    async fn open_stream(
        &self,
    ) -> anyhow::Result<(
        impl futures::Stream<Item = TaggedMessage> + Unpin + Send + use<H>,
        Vec<Arc<Source>>,
    )> {
        let mut streams = Vec::with_capacity(self.consumers.len());
        let mut sources = Vec::with_capacity(self.consumers.len());
        for (index, spec) in self.consumers.iter().enumerate() {
            let stored = self.js.get_stream(spec.stream).await?;
            let consumer = ensure_consumer(&stored, spec, &self.options).await?;
            let forget_in = spec.forget_terminated.then_some(stored);
            sources.push(Arc::new(Source {
                span_name: format!("{} process", spec.filter_subject),
                forget_in,
            }));
            // Pull no more than we can work on, so a stopping instance holds nothing unstarted.
            let stream = consumer
                .stream()
                .max_messages_per_batch(self.options.concurrency.max(1))
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await?
                .map(move |message| (index, message));
            streams.push(stream);
        }
        Ok((futures::stream::select_all(streams), sources))
    }

    async fn drain(&self, mut tasks: JoinSet<()>, abort: Shutdown) {
        if tasks.is_empty() {
            return;
        }
        tracing::info!(in_flight = tasks.len(), "waiting for in-flight work");
        let grace = tokio::time::sleep(self.options.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { return },
                _ = &mut grace => break,
            }
        }
        tracing::warn!(
            in_flight = tasks.len(),
            "grace period over; handing work back"
        );
        abort.trigger();
        while tasks.join_next().await.is_some() {}
    }
}

/// Records one settled work item in the metrics.
fn record_metric(service: &'static str, outcome: &'static str, delivery: &Delivery) {
    use crate::telemetry::metrics::{self, attr};
    let attributes = [attr("service", service), attr("outcome", outcome)];
    let metrics = metrics::get();
    metrics.requests.add(1, &attributes);
    metrics
        .duration
        .record(delivery.received.elapsed().as_secs_f64(), &attributes);
}

/// A message with the index of the consumer it came from.
type TaggedMessage = (usize, Result<jetstream::Message, pull::MessagesError>);

/// What one spawned task needs to process one message.
struct Job<H: Handler> {
    handler: Arc<H>,
    status: StatusReporter,
    options: WorkerOptions,
    abort: Shutdown,
    counters: Arc<WorkCounters>,
    source: Arc<Source>,
}

impl<H: Handler> Job<H> {
    fn record(&self, outcome: &'static str, delivery: &Delivery) {
        use std::sync::atomic::Ordering::Relaxed;
        let counter = match outcome {
            "done" => &self.counters.done,
            "retry" => &self.counters.retried,
            _ => &self.counters.rejected,
        };
        counter.fetch_add(1, Relaxed);
        record_metric(self.status.service(), outcome, delivery);
    }

    async fn process(self, message: jetstream::Message) {
        let attempt = message
            .info()
            .map(|i| i.delivered.max(1) as u64)
            .unwrap_or(1);
        let delivery = Delivery {
            subject: message.subject.to_string(),
            attempt,
            max_attempts: self.options.max_deliver.max(1) as u64,
            headers: message.headers.clone(),
            received: std::time::Instant::now(),
            published: message.info().ok().map(|i| i.published),
        };
        let span = tracing::info_span!(
            "process",
            otel.name = %self.source.span_name,
            messaging.destination = %delivery.subject,
            service = self.status.service(),
            tenant = tracing::field::Empty,
            request_id = tracing::field::Empty,
            attempt,
        );
        telemetry::continue_trace(&span, delivery.headers.as_ref());
        self.process_in_span(message, delivery)
            .instrument(span)
            .await
    }

    async fn process_in_span(self, message: jetstream::Message, delivery: Delivery) {
        let content_type = header(&delivery.headers, subjects::CONTENT_TYPE_HEADER);
        let subject_key = H::key_of_subject(&delivery.subject);
        let mut request =
            match codec::decode::<H::Request>(&message.payload, content_type.as_deref()) {
                Ok(request) => request,
                Err(err) => {
                    // Reported where the subject (intake) or the message id (work streams) says.
                    let message_id = header(&delivery.headers, "Nats-Msg-Id");
                    let key = subject_key
                        .or_else(|| RequestKey::from_message_id(message_id.as_deref()?))
                        .filter(RequestKey::is_valid)
                        .unwrap_or(NO_KEY);
                    let payload = if H::KEEP_UNDECODABLE_PAYLOAD {
                        message.payload.clone()
                    } else {
                        Bytes::new()
                    };
                    let rejection = Rejection::new(ErrorCode::MalformedRequest, err.to_string());
                    let content_type = content_type.unwrap_or_else(|| CONTENT_TYPE_PROTOBUF.into());
                    self.terminate(&message, &delivery, key, &rejection, payload, &content_type)
                        .await;
                    return;
                }
            };
        if let Some(reason) = bind_to_subject(&mut request, subject_key) {
            // Reported on the subject's tenant and id, which its client watches; never on the
            // payload's, which may belong to someone else.
            let reported = subject_key.filter(RequestKey::is_valid).unwrap_or(NO_KEY);
            let rejection = Rejection::new(ErrorCode::MalformedRequest, reason);
            let scrubbed = H::without_secrets(&request).encode_to_vec().into();
            self.terminate(
                &message,
                &delivery,
                reported,
                &rejection,
                scrubbed,
                CONTENT_TYPE_PROTOBUF,
            )
            .await;
            return;
        }
        // Owned: the handler consumes the request, and its outcome is reported on this key.
        let (tenant, request_id) = {
            let key = request.key();
            (key.tenant.to_string(), key.id.to_string())
        };
        let span = tracing::Span::current();
        span.record("tenant", tenant.as_str());
        span.record("request_id", request_id.as_str());
        let Some(outcome) = self
            .handle_with_progress(&message, request, &delivery)
            .await
        else {
            // Shutdown grace ran out: hand the message back for another instance.
            ack(&message, AckKind::Nak(None)).await;
            return;
        };
        let key = RequestKey::new(&tenant, &request_id);
        self.settle(&message, &delivery, key, outcome).await;
    }

    /// The request as a dead letter keeps it: decoded again (the handler consumed it; failures
    /// are rare, a copy on every request is not) and stripped of its secrets.
    fn scrubbed_payload(message: &jetstream::Message, delivery: &Delivery) -> Bytes {
        let content_type = header(&delivery.headers, subjects::CONTENT_TYPE_HEADER);
        match codec::decode::<H::Request>(&message.payload, content_type.as_deref()) {
            Ok(request) => H::without_secrets(&request).encode_to_vec().into(),
            Err(_) => Bytes::new(),
        }
    }

    /// Runs the handler, sending progress acks so long work keeps its message.
    async fn handle_with_progress(
        &self,
        message: &jetstream::Message,
        request: H::Request,
        delivery: &Delivery,
    ) -> Option<Outcome> {
        let work = self.handler.handle(request, delivery);
        tokio::pin!(work);
        // Start the first tick a period from now: an immediate first tick would cost a
        // timer-wheel round (about a millisecond) on every message.
        let every = self.options.ack_wait / 3;
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                outcome = &mut work => return Some(outcome),
                _ = progress.tick() => ack(message, AckKind::Progress).await,
                _ = self.abort.cancelled() => return None,
            }
        }
    }

    async fn settle(
        &self,
        message: &jetstream::Message,
        delivery: &Delivery,
        request: RequestKey<'_>,
        outcome: Outcome,
    ) {
        match outcome {
            Outcome::Done => {
                self.record("done", delivery);
                ack(message, AckKind::Ack).await
            }
            Outcome::Retry(rejection) if delivery.is_last_attempt() => {
                let rejection = Rejection::new(
                    rejection.code,
                    format!(
                        "gave up after {} attempts: {}",
                        delivery.attempt, rejection.message
                    ),
                );
                let payload = Self::scrubbed_payload(message, delivery);
                self.terminate(
                    message,
                    delivery,
                    request,
                    &rejection,
                    payload,
                    CONTENT_TYPE_PROTOBUF,
                )
                .await;
            }
            Outcome::Retry(rejection) => {
                let after = self.options.retry_delay(delivery.attempt);
                tracing::info!(reason = %rejection, retry_in = ?after, "will retry");
                let step = Step::pending(
                    "retrying",
                    format!(
                        "{}; attempt {} of {}, next in {:.1}s",
                        rejection.message,
                        delivery.attempt,
                        delivery.max_attempts,
                        after.as_secs_f64()
                    ),
                );
                self.status.report(request, step).await;
                self.record("retry", delivery);
                ack(message, AckKind::Nak(Some(after))).await;
            }
            Outcome::Reject(rejection) => {
                let payload = Self::scrubbed_payload(message, delivery);
                self.terminate(
                    message,
                    delivery,
                    request,
                    &rejection,
                    payload,
                    CONTENT_TYPE_PROTOBUF,
                )
                .await;
            }
        }
    }

    /// Terminates redelivery, reports the failure and dead-letters the (secret-free) payload.
    async fn terminate(
        &self,
        message: &jetstream::Message,
        delivery: &Delivery,
        request: RequestKey<'_>,
        rejection: &Rejection,
        payload: Bytes,
        content_type: &str,
    ) {
        self.record("rejected", delivery);
        tracing::warn!(%request, code = ?rejection.code, reason = %rejection.message, "request rejected");
        if request.is_valid() {
            self.status.report(request, Step::failed(rejection)).await;
        }
        let info = DeadLetterInfo {
            subject: &delivery.subject,
            request,
            deliveries: delivery.attempt,
            content_type,
        };
        self.status.dead_letter(info, rejection, payload).await;
        ack(message, AckKind::Term).await;
        if let Some(stream) = &self.source.forget_in
            && let Ok(info) = message.info()
        {
            let sequence = info.stream_sequence;
            if let Err(err) = stream.delete_message(sequence).await {
                tracing::warn!(%request, sequence, error = %err, "could not delete a refused message; its id stays taken until it ages out");
            }
        }
    }
}

/// The key of a message nothing valid names: no status event, a dead letter without tenant.
const NO_KEY: RequestKey<'static> = RequestKey { tenant: "", id: "" };

/// Checks the request's id and binds it to the tenant and id its subject names, when it names
/// them: an empty tenant becomes the subject's, a different one (or a different id) is refused.
/// The tenant must then be valid. `Some(reason)` when the request is refused.
fn bind_to_subject<R: TenantRequest>(
    request: &mut R,
    subject: Option<RequestKey<'_>>,
) -> Option<String> {
    let key = request.key();
    if let Err(err) = imagemesh_proto::validate_request_id(key.id) {
        return Some(err.to_string());
    }
    if let Some(named) = subject {
        if key.id != named.id {
            return Some(format!(
                "the request id {:?} is not the one its subject names ({:?})",
                key.id, named.id
            ));
        }
        if !key.tenant.is_empty() && key.tenant != named.tenant {
            return Some(format!(
                "the tenant {:?} is not the one its subject names ({:?})",
                key.tenant, named.tenant
            ));
        }
        request.set_tenant(named.tenant);
    }
    validate_tenant(request.key().tenant)
        .err()
        .map(|err| err.to_string())
}

fn header(headers: &Option<HeaderMap>, name: &str) -> Option<String> {
    headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_string())
}

async fn ack(message: &jetstream::Message, kind: AckKind) {
    // Final acks wait for the server's confirmation so a crash right after cannot redeliver work
    // we believe is settled; naks and progress are advisory.
    let result = match kind {
        AckKind::Ack | AckKind::Term => message.double_ack_with(kind).await,
        _ => message.ack_with(kind).await,
    };
    if let Err(err) = result {
        tracing::warn!(error = %err, ack = ?kind, "could not acknowledge message");
    }
}

/// What a worker service consumes.
#[derive(Debug, Clone)]
pub enum Work {
    /// One durable consumer (scheduler intake, indexer).
    Queue(ConsumerSpec),
    /// The shared queue of `kind` plus this instance's own subject, advertised to schedulers.
    Placed {
        kind: crate::placement::WorkKind,
        placement: crate::placement::PlacementOptions,
        /// Where the advertisement bucket comes from (replicas, provisioned or not).
        streams: Box<crate::streams::StreamOptions>,
        /// What it advertises when that is not its work loop's concurrency: the capacity and
        /// a count of what it holds (a mounter's mounts outlive the requests that made them).
        holds: Option<(u32, crate::placement::Load)>,
    },
}

/// Runs a JetStream-driven service: registers it with the micro Services API (so `$SRV.*`
/// finds it), creates its durable consumer(s), advertises it when placed, and works until
/// `shutdown`. The streams it uses must already exist ([`crate::streams::ensure`]).
pub async fn serve<H: Handler>(
    client: &async_nats::Client,
    identity: crate::service::Identity,
    work: Work,
    options: WorkerOptions,
    handler: H,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    use crate::placement;
    let js = jetstream::new(client.clone());
    let mut status = StatusReporter::new(js.clone(), identity.name);
    let (specs, advertised) = match work {
        Work::Queue(spec) => (vec![spec], None),
        Work::Placed {
            kind,
            placement,
            streams,
            holds,
        } => {
            let mut placement = placement;
            if placement.worker_id.is_empty() {
                placement.worker_id = placement::generate_worker_id();
            }
            let shared = ConsumerSpec {
                stream: kind.stream,
                durable: kind.durable.into(),
                filter_subject: kind.subject.into(),
                inactive_threshold: None,
                forget_terminated: false,
            };
            if !placement.enabled {
                (vec![shared], None)
            } else {
                status = status.with_instance(&placement.worker_id);
                let own = ConsumerSpec {
                    stream: kind.stream,
                    durable: kind.worker_durable(&placement.worker_id),
                    filter_subject: kind.worker_subject(&placement.worker_id),
                    inactive_threshold: Some(placement.heartbeat * 30),
                    forget_terminated: false,
                };
                (vec![shared, own], Some((kind, placement, streams, holds)))
            }
        }
    };
    let concurrency = options.concurrency.max(1) as u32;
    let worker = Worker::new(
        js.clone(),
        specs.clone(),
        options,
        Arc::new(handler),
        status,
    );
    let counters = worker.counters();
    let service =
        crate::service::register_worker(client, identity, counters, shutdown.clone()).await?;
    let advertiser = match advertised {
        Some((kind, placement, streams, holds)) => {
            let store = placement::workers_bucket(&js, placement.heartbeat, &streams).await?;
            let (capacity, load) =
                holds.unwrap_or((concurrency, placement::Load::Permits(worker.load())));
            let ad = imagemesh_proto::v1::WorkerAdvertisement {
                worker_id: placement.worker_id.clone(),
                kind: kind.kind.into(),
                capacity,
                labels: placement.labels.clone(),
                subject: kind.worker_subject(&placement.worker_id),
                ..Default::default()
            };
            tracing::info!(worker_id = %placement.worker_id, subject = %ad.subject, "advertising");
            // Stops advertising as soon as shutdown starts, so schedulers route elsewhere.
            Some(placement::spawn_advertiser(
                store,
                ad,
                load,
                placement.heartbeat,
                shutdown.clone(),
            ))
        }
        None => None,
    };
    tracing::info!(consumers = ?specs.iter().map(|s| &s.durable).collect::<Vec<_>>(), "{} ready", identity.name);
    worker.run(shutdown).await?;
    if let Some(advertiser) = advertiser {
        let _ = advertiser.await;
    }
    service
        .stop()
        .await
        .map_err(|e| anyhow::anyhow!("stopping service {}: {e}", identity.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_caps() {
        let options = WorkerOptions::default();
        assert_eq!(options.retry_delay(1), Duration::from_millis(500));
        assert_eq!(options.retry_delay(2), Duration::from_secs(1));
        assert_eq!(options.retry_delay(4), Duration::from_secs(4));
        assert_eq!(options.retry_delay(100), Duration::from_secs(30));
    }

    fn request(tenant: &str, id: &str) -> imagemesh_proto::v1::ContainerRequest {
        imagemesh_proto::v1::ContainerRequest {
            request_id: id.into(),
            tenant: tenant.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_intake_subject_decides_the_tenant() {
        let subject = Some(RequestKey::new("team-a", "r1"));
        // A client that says nothing about its tenant gets the subject's.
        let mut unnamed = request("", "r1");
        assert_eq!(bind_to_subject(&mut unnamed, subject), None);
        assert_eq!(unnamed.tenant, "team-a");
        let mut same = request("team-a", "r1");
        assert_eq!(bind_to_subject(&mut same, subject), None);

        // Naming another tenant or id than the subject is refused, whatever the payload says.
        let mut other_tenant = request("team-b", "r1");
        let reason = bind_to_subject(&mut other_tenant, subject).unwrap();
        assert!(reason.contains("tenant \"team-b\""), "{reason}");
        let mut other_id = request("team-a", "r2");
        let reason = bind_to_subject(&mut other_id, subject).unwrap();
        assert!(reason.contains("not the one its subject names"), "{reason}");

        // A subject with a tenant that cannot be one is refused too.
        let mut bad = request("", "r1");
        assert!(bind_to_subject(&mut bad, Some(RequestKey::new("Team_A", "r1"))).is_some());
    }

    #[test]
    fn work_messages_must_carry_a_valid_tenant() {
        assert_eq!(bind_to_subject(&mut request("team-a", "r1"), None), None);
        assert!(bind_to_subject(&mut request("", "r1"), None).is_some());
        assert!(bind_to_subject(&mut request("a", "a.b"), None).is_some());
    }
}
