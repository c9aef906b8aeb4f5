//! The JetStream streams and key-value buckets of the mesh, defined once.
//!
//! By default every service ensures the streams it reads and writes at startup (create, or
//! update to this definition), so services can start in any order and each can be deployed
//! alone. On a mesh with permissions (`docs/security.md`) only the operator may create or
//! change a stream — one that could would be able to capture other identities' subjects — so
//! services run with `streams.provision = false` and look their streams up, waiting for the
//! operator's `imagemesh provision` ([`provision_all`]).

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, Context, kv};
use serde::{Deserialize, Serialize};

use crate::subjects;
use crate::worker::WorkerOptions;

/// Stream of client requests, read by schedulers. One message per tenant and request id (its
/// subject), kept `intake_max_age`: a request id is taken once per tenant, and a second
/// submission is refused by the server.
pub const INTAKE: &str = "IMAGEMESH_INTAKE";
/// Stream of enriched build requests, read by builders.
pub const BUILD: &str = "IMAGEMESH_BUILD";
/// Stream of enriched runtime requests, read by mounters.
pub const MOUNT: &str = "IMAGEMESH_MOUNT";
/// Stream of index requests, read by indexers.
pub const INDEX: &str = "IMAGEMESH_INDEX";
/// Stream of status events, kept for `imagemesh watch` to replay.
pub const STATUS: &str = "IMAGEMESH_STATUS";
/// Stream of dead letters, kept for operators.
pub const DEAD_LETTER: &str = "IMAGEMESH_DEADLETTER";
/// KV bucket: `<tenant>.<image id>` ([`image_key`]) -> ImageRecord (pushed reference, manifest
/// and index digests).
pub const IMAGE_REFS_BUCKET: &str = "imagemesh-image-refs";
/// Prefix of the object-store buckets of build contexts, one per tenant
/// ([`contexts_bucket`]): tars uploaded by clients, named by `BuildOptions.context_object`.
pub const CONTEXTS_BUCKET_PREFIX: &str = "imagemesh-contexts-";
/// How long an uploaded build context is kept: long enough for a queued build and its retries.
pub const CONTEXTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Object-store bucket: layer blob digest -> encoded layer index (`imagemesh-lazyindex`), so a
/// base layer shared by many images is indexed once.
pub const LAYER_INDEX_BUCKET: &str = "imagemesh-layer-indexes";
/// How long a cached layer index is kept after it was written (re-indexing is cheap).
pub const LAYER_INDEX_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// KV bucket: `<tenant>.<image id>` ([`image_key`]) -> name of the credential (held by the
/// credential service) that pulls it at runtime. Written by whoever owns the image (`imagemesh
/// image-secret set`).
pub const IMAGE_SECRETS_BUCKET: &str = "imagemesh-image-secrets";

/// The key of an image in the image-refs and image-secrets buckets: image ids are per tenant,
/// so one tenant's build can neither overwrite nor be mounted as another's. The tenant holds no
/// `.`, so the first `.` splits the key; NATS permissions can grant a tenant its own keys
/// (`$KV.<bucket>.<tenant>.>`).
pub fn image_key(tenant: &str, image_id: &str) -> String {
    format!("{tenant}.{image_id}")
}

/// The build-context bucket of `tenant`: `imagemesh-contexts-<tenant>`. One bucket per tenant,
/// so NATS permissions can give each tenant's clients theirs alone.
pub fn contexts_bucket(tenant: &str) -> String {
    format!("{CONTEXTS_BUCKET_PREFIX}{tenant}")
}

/// The grace a registry gives a token past its expiry (clock skew; the distribution token
/// servers' leeway): how much longer than the token lifetime a work message may be kept.
pub const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(60);

/// The smallest `max_msg_size` the object stores work with: they store objects in 128 KiB
/// chunks plus headers.
pub const MIN_OBJECT_MSG_SIZE: i32 = 256 * 1024;

const KIB: i64 = 1024;
const MIB: i64 = 1024 * KIB;
const GIB: i64 = 1024 * MIB;

/// Stream settings that differ between deployments, and the bounds of everything the mesh
/// stores (docs/architecture.md, "Bounded storage"): every stream, KV bucket and object store
/// has a `max_age`, a `max_bytes` and a `max_msg_size`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamOptions {
    /// Replicas of every stream and bucket (1 on a single server, 3 on a cluster).
    pub replicas: usize,
    /// How long a request id is remembered for de-duplication on publish.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Largest message (payload and headers, bytes) of every stream, KV bucket and object store
    /// but the intake. At least 256 KiB (object stores write 128 KiB chunks).
    pub max_msg_size: i32,
    /// How long a submitted request is kept at the intake, and its id refused to another
    /// submission.
    #[serde(with = "humantime_serde")]
    pub intake_max_age: Duration,
    /// Bytes the intake holds; a submission past it (or past `intake_max_msgs`) is refused to
    /// the client (discard new), never dropped.
    pub intake_max_bytes: i64,
    /// Requests the intake holds.
    pub intake_max_msgs: i64,
    /// Largest request (payload and headers, bytes) the intake takes.
    pub intake_max_msg_size: i32,
    /// How long a message of the work streams (build, mount, index) is kept. It carries
    /// registry tokens: at most `work_token_lifetime` + 1 min, and at least the retry window
    /// (`max_deliver` × max(`ack_wait`, `retry_max`)) of the workers that read it.
    #[serde(with = "humantime_serde")]
    pub work_max_age: Duration,
    /// The lifetime of the registry tokens work messages carry (the credential service's
    /// issuer signs 5-minute tokens by default): bounds `work_max_age`.
    #[serde(with = "humantime_serde")]
    pub work_token_lifetime: Duration,
    /// Bytes each work stream holds; a dispatch past it is refused to the scheduler, which
    /// retries the request.
    pub work_max_bytes: i64,
    /// How long status events are kept.
    #[serde(with = "humantime_serde")]
    pub status_max_age: Duration,
    /// Bytes of status events kept (oldest dropped first).
    pub status_max_bytes: i64,
    /// How long dead letters are kept.
    #[serde(with = "humantime_serde")]
    pub dead_letter_max_age: Duration,
    /// Bytes of dead letters kept (oldest dropped first).
    pub dead_letter_max_bytes: i64,
    /// How long an entry of the image-refs and image-secrets buckets is kept after it was
    /// last written.
    #[serde(with = "humantime_serde")]
    pub records_max_age: Duration,
    /// Bytes of each KV bucket (image refs, image secrets, live workers).
    pub records_max_bytes: i64,
    /// How long an uploaded build context is kept: long enough for a queued build and its
    /// retries.
    #[serde(with = "humantime_serde")]
    pub contexts_max_age: Duration,
    /// Bytes of each tenant's build-context bucket.
    pub contexts_max_bytes: i64,
    /// How long a cached layer index is kept after it was written (re-indexing is cheap).
    #[serde(with = "humantime_serde")]
    pub layer_index_max_age: Duration,
    /// Bytes of the layer-index cache.
    pub layer_index_max_bytes: i64,
    /// Create or update streams and buckets at startup. Off on a mesh with permissions: the
    /// operator provisions them and services only look them up.
    pub provision: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            replicas: 1,
            duplicate_window: Duration::from_secs(10 * 60),
            max_msg_size: MIB as i32,
            intake_max_age: Duration::from_secs(7 * 24 * 3600),
            intake_max_bytes: GIB,
            intake_max_msgs: 5_000_000,
            intake_max_msg_size: MIB as i32,
            work_max_age: Duration::from_secs(5 * 60),
            work_token_lifetime: Duration::from_secs(5 * 60),
            work_max_bytes: 256 * MIB,
            status_max_age: Duration::from_secs(24 * 3600),
            status_max_bytes: 512 * MIB,
            dead_letter_max_age: Duration::from_secs(7 * 24 * 3600),
            dead_letter_max_bytes: 256 * MIB,
            // One year as humantime counts it (365.25 days), so it prints as "1year".
            records_max_age: Duration::from_secs(31_557_600),
            records_max_bytes: 64 * MIB,
            contexts_max_age: CONTEXTS_MAX_AGE,
            contexts_max_bytes: GIB,
            layer_index_max_age: LAYER_INDEX_MAX_AGE,
            layer_index_max_bytes: 2 * GIB,
            provision: true,
        }
    }
}

impl StreamOptions {
    /// Refuses limits that leave something unbounded or make a work message outlive the
    /// tokens it carries. Every service checks at load, `imagemesh provision` before it
    /// provisions.
    pub fn validate(&self) -> anyhow::Result<()> {
        let ages = [
            ("intake_max_age", self.intake_max_age),
            ("work_max_age", self.work_max_age),
            ("work_token_lifetime", self.work_token_lifetime),
            ("status_max_age", self.status_max_age),
            ("dead_letter_max_age", self.dead_letter_max_age),
            ("records_max_age", self.records_max_age),
            ("contexts_max_age", self.contexts_max_age),
            ("layer_index_max_age", self.layer_index_max_age),
        ];
        for (name, age) in ages {
            anyhow::ensure!(
                !age.is_zero(),
                "streams.{name} is 0: everything the mesh stores must expire"
            );
        }
        let sizes = [
            ("max_msg_size", i64::from(self.max_msg_size)),
            ("intake_max_bytes", self.intake_max_bytes),
            ("intake_max_msgs", self.intake_max_msgs),
            ("intake_max_msg_size", i64::from(self.intake_max_msg_size)),
            ("work_max_bytes", self.work_max_bytes),
            ("status_max_bytes", self.status_max_bytes),
            ("dead_letter_max_bytes", self.dead_letter_max_bytes),
            ("records_max_bytes", self.records_max_bytes),
            ("contexts_max_bytes", self.contexts_max_bytes),
            ("layer_index_max_bytes", self.layer_index_max_bytes),
        ];
        for (name, size) in sizes {
            anyhow::ensure!(
                size > 0,
                "streams.{name} is {size}: every stream and bucket must be bounded (> 0)"
            );
        }
        anyhow::ensure!(
            self.max_msg_size >= MIN_OBJECT_MSG_SIZE,
            "streams.max_msg_size ({} bytes) is below {MIN_OBJECT_MSG_SIZE} bytes: object \
             stores write 128 KiB chunks",
            self.max_msg_size
        );
        let ceiling = self.work_max_age_ceiling();
        anyhow::ensure!(
            self.work_max_age <= ceiling,
            "streams.work_max_age ({}) exceeds streams.work_token_lifetime ({}) plus {}: a work \
             message would outlive the registry tokens it carries",
            human(self.work_max_age),
            human(self.work_token_lifetime),
            human(TOKEN_EXPIRY_MARGIN),
        );
        Ok(())
    }

    /// The longest `work_max_age` allowed: the token lifetime plus the registries' leeway.
    pub fn work_max_age_ceiling(&self) -> Duration {
        self.work_token_lifetime + TOKEN_EXPIRY_MARGIN
    }

    /// Refuses a work stream that would expire a message while the workers reading it
    /// (`section`, e.g. `builder.worker`) may still retry it.
    pub fn validate_workers(&self, section: &str, worker: &WorkerOptions) -> anyhow::Result<()> {
        let window = worker.retry_window();
        anyhow::ensure!(
            self.work_max_age >= window,
            "streams.work_max_age ({}) is shorter than the retry window of {section} ({}: \
             max_deliver {} x max(ack_wait {}, retry_max {})): a request could expire from its \
             work stream while it is still being retried",
            human(self.work_max_age),
            human(window),
            worker.max_deliver,
            human(worker.ack_wait),
            human(worker.retry_max),
        );
        Ok(())
    }
}

fn human(duration: Duration) -> String {
    humantime_serde::re::humantime::format_duration(duration).to_string()
}

/// A work-queue stream: each message is removed once a consumer acks it.
fn work_queue(name: &str, subject: &str, options: &StreamOptions) -> Config {
    Config {
        name: name.into(),
        // The bare subject is the shared queue; `<subject>.<worker>` addresses one worker.
        subjects: vec![subject.into(), format!("{subject}.>")],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        // Full: the scheduler's dispatch is refused (and retried), nothing queued is dropped.
        discard: DiscardPolicy::New,
        max_age: options.work_max_age,
        max_bytes: options.work_max_bytes,
        max_message_size: options.max_msg_size,
        num_replicas: options.replicas,
        duplicate_window: options.duplicate_window.min(options.work_max_age),
        ..Default::default()
    }
}

fn history(
    name: &str,
    subject: String,
    max_age: Duration,
    max_bytes: i64,
    options: &StreamOptions,
) -> Config {
    Config {
        name: name.into(),
        subjects: vec![subject],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        discard: DiscardPolicy::Old,
        max_age,
        max_bytes,
        max_message_size: options.max_msg_size,
        num_replicas: options.replicas,
        duplicate_window: options.duplicate_window.min(max_age),
        ..Default::default()
    }
}

/// Definition of a stream by name.
pub fn definition(name: &str, options: &StreamOptions) -> Config {
    match name {
        // The tenant and request id are the last subject tokens and each subject holds one
        // message, so the server itself refuses a second submission of an id within a tenant,
        // durably and atomically, for as long as the first is kept. A request that was not
        // dispatched is deleted, which frees its id (see `ConsumerSpec::forget_terminated`).
        INTAKE => Config {
            subjects: vec![subjects::INTAKE_ALL.into()],
            max_messages_per_subject: 1,
            discard: DiscardPolicy::New,
            discard_new_per_subject: true,
            // The subject already makes a submission unique; a message id would only keep the
            // id of a refused request from being used again within the window, so the window
            // is the shortest the server takes.
            duplicate_window: Duration::from_secs(1),
            // Full (bytes or requests) or too large: the server refuses the client's publish,
            // which the client reports; nothing accepted is ever dropped to make room.
            max_messages: options.intake_max_msgs,
            max_message_size: options.intake_max_msg_size,
            ..history(
                INTAKE,
                subjects::INTAKE_ALL.into(),
                options.intake_max_age,
                options.intake_max_bytes,
                options,
            )
        },
        BUILD => work_queue(BUILD, subjects::BUILD, options),
        MOUNT => work_queue(MOUNT, subjects::MOUNT, options),
        INDEX => work_queue(INDEX, subjects::INDEX, options),
        STATUS => Config {
            // The scheduler reads a request's last event before dispatching a redelivery
            // (`Nats-Msg-Id` is not enough after a server lost its acks): a direct get, which
            // the server answers from the stream itself rather than through its API queue.
            allow_direct: true,
            ..history(
                STATUS,
                format!("{}.>", subjects::STATUS_PREFIX),
                options.status_max_age,
                options.status_max_bytes,
                options,
            )
        },
        DEAD_LETTER => history(
            DEAD_LETTER,
            format!("{}.>", subjects::DEAD_LETTER_PREFIX),
            options.dead_letter_max_age,
            options.dead_letter_max_bytes,
            options,
        ),
        other => panic!("unknown stream {other}"),
    }
}

/// Every stream of the mesh.
pub const ALL: [&str; 6] = [INTAKE, BUILD, MOUNT, INDEX, STATUS, DEAD_LETTER];

/// How long a service that may not provision waits for the operator to have done it.
const PROVISION_WAIT: Duration = Duration::from_secs(30);

/// Creates each named stream, or updates it to the current definition; without
/// `options.provision`, waits until each exists instead.
pub async fn ensure(js: &Context, names: &[&str], options: &StreamOptions) -> anyhow::Result<()> {
    for name in names {
        if options.provision {
            js.create_or_update_stream(definition(name, options))
                .await?;
        } else {
            provisioned(name, || js.get_stream_no_info(*name)).await?;
        }
    }
    Ok(())
}

/// Waits until `lookup` finds what the operator provisions, naming it when it never appears.
async fn provisioned<T, E, F>(what: &str, lookup: impl Fn() -> F) -> anyhow::Result<T>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let deadline = tokio::time::Instant::now() + PROVISION_WAIT;
    loop {
        match lookup().await {
            Ok(found) => return Ok(found),
            Err(err) if tokio::time::Instant::now() >= deadline => {
                anyhow::bail!(
                    "{what} does not exist or cannot be read ({err}); the operator provisions it \
                     (`imagemesh provision`)"
                )
            }
            Err(err) => {
                tracing::info!(what, error = %err, "waiting for the operator to provision");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Opens a KV bucket: created or updated to `config` when this service provisions, else looked
/// up.
async fn key_value(
    js: &Context,
    config: kv::Config,
    options: &StreamOptions,
) -> anyhow::Result<kv::Store> {
    if options.provision {
        return Ok(js.create_or_update_key_value(config).await?);
    }
    open_key_value(js, &config.bucket).await
}

/// Looks up a KV bucket the operator provisioned.
pub async fn open_key_value(js: &Context, bucket: &str) -> anyhow::Result<kv::Store> {
    provisioned(bucket, || js.get_key_value(bucket)).await
}

/// Opens an object store: created when missing and this service provisions, else looked up.
async fn object_store(
    js: &Context,
    config: jetstream::object_store::Config,
    options: &StreamOptions,
) -> anyhow::Result<jetstream::object_store::ObjectStore> {
    // Get first: creating an existing bucket with other settings fails, and every instance
    // must be able to open it whoever made it.
    // An existing one keeps its limits here (a client opening it must not reset them); the
    // operator's `provision_all` updates them.
    if let Ok(store) = js.get_object_store(&config.bucket).await {
        return Ok(store);
    }
    if options.provision {
        let limits = Limits::of_object_store(&config, options);
        let store = js.create_object_store(config.clone()).await?;
        // The object-store config has no message size: set it on the stream underneath.
        apply_limits(js, &format!("OBJ_{}", config.bucket), limits).await?;
        return Ok(store);
    }
    provisioned(&config.bucket, || {
        js.get_object_store(config.bucket.as_str())
    })
    .await
}

/// The bounds of one stream (a KV bucket or object store is a stream underneath).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_age: Duration,
    pub max_bytes: i64,
    pub max_msg_size: i32,
}

impl Limits {
    fn of_object_store(config: &jetstream::object_store::Config, options: &StreamOptions) -> Self {
        Self {
            max_age: config.max_age,
            max_bytes: config.max_bytes,
            max_msg_size: options.max_msg_size,
        }
    }
}

/// Updates the limits of an existing stream (the stream of a KV bucket or object store, whose
/// create calls do not update or do not take every limit), leaving the rest of its definition.
pub async fn apply_limits(js: &Context, stream: &str, limits: Limits) -> anyhow::Result<()> {
    let mut found = js.get_stream(stream).await?;
    let current = found.info().await?.config.clone();
    let mut config = current.clone();
    config.max_age = limits.max_age;
    config.max_bytes = limits.max_bytes;
    config.max_message_size = limits.max_msg_size;
    if config.max_age != current.max_age
        || config.max_bytes != current.max_bytes
        || config.max_message_size != current.max_message_size
    {
        js.update_stream(config).await?;
    }
    Ok(())
}

/// Every stream underneath what the mesh stores for `tenants`: the streams, the KV buckets'
/// (`KV_<bucket>`) and the object stores' (`OBJ_<bucket>`).
pub fn all_stream_names(tenants: &[String]) -> Vec<String> {
    let mut names: Vec<String> = ALL.iter().map(|s| s.to_string()).collect();
    for bucket in [
        IMAGE_REFS_BUCKET,
        IMAGE_SECRETS_BUCKET,
        crate::placement::WORKERS_BUCKET,
    ] {
        names.push(format!("KV_{bucket}"));
    }
    names.push(format!("OBJ_{LAYER_INDEX_BUCKET}"));
    for tenant in tenants {
        names.push(format!("OBJ_{}", contexts_bucket(tenant)));
    }
    names
}

/// What the intake's limits refused, said plainly: JetStream stores nothing past them (the
/// intake discards new messages, never old ones), so the client must know its request is not
/// queued.
pub fn intake_refusal(err: &async_nats::jetstream::context::PublishError) -> Option<String> {
    use async_nats::jetstream::context::PublishErrorKind;
    use async_nats::jetstream::{Error as JetStreamError, ErrorCode};
    if err.kind() == PublishErrorKind::MaxPayloadExceeded {
        return Some(format!(
            "the request is too large for the NATS server ({err})"
        ));
    }
    let source = std::error::Error::source(err)?.downcast_ref::<JetStreamError>()?;
    let said = source.to_string();
    if source.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM {
        return Some(format!(
            "the request is larger than the intake's max_msg_size ({said})"
        ));
    }
    if said.contains("maximum bytes exceeded") {
        return Some(format!("the intake is full (max_bytes reached: {said})"));
    }
    if said.contains("maximum messages exceeded") {
        return Some(format!("the intake is full (max_msgs reached: {said})"));
    }
    if said.contains("resource limits exceeded") || said.contains("storage resources") {
        return Some(format!("the intake is full ({said})"));
    }
    None
}

/// Everything the mesh stores, for the operator: every stream, bucket and object store, and
/// the build-context bucket of each tenant, created or updated to `options` (limits included:
/// docs/architecture.md, "Bounded storage"), which are validated first. Idempotent.
pub async fn provision_all(
    js: &Context,
    options: &StreamOptions,
    tenants: &[String],
    worker_heartbeat: Duration,
) -> anyhow::Result<()> {
    options.validate()?;
    let options = StreamOptions {
        provision: true,
        ..options.clone()
    };
    ensure(js, &ALL, &options).await?;
    image_refs(js, &options).await?;
    image_secrets(js, &options).await?;
    layer_indexes(js, &options).await?;
    apply_limits(
        js,
        &format!("OBJ_{LAYER_INDEX_BUCKET}"),
        Limits {
            max_age: options.layer_index_max_age,
            max_bytes: options.layer_index_max_bytes,
            max_msg_size: options.max_msg_size,
        },
    )
    .await?;
    crate::placement::workers_bucket(js, worker_heartbeat, &options).await?;
    // An existing workers bucket is left to its heartbeat-derived age; its size is bounded.
    apply_limits(
        js,
        &format!("KV_{}", crate::placement::WORKERS_BUCKET),
        Limits {
            max_age: crate::placement::workers_max_age(worker_heartbeat),
            max_bytes: options.records_max_bytes,
            max_msg_size: options.max_msg_size,
        },
    )
    .await?;
    for tenant in tenants {
        contexts(js, tenant, &options).await?;
        apply_limits(
            js,
            &format!("OBJ_{}", contexts_bucket(tenant)),
            Limits {
                max_age: options.contexts_max_age,
                max_bytes: options.contexts_max_bytes,
                max_msg_size: options.max_msg_size,
            },
        )
        .await?;
    }
    Ok(())
}

/// Opens (creating if needed) the image-refs bucket.
pub async fn image_refs(js: &Context, options: &StreamOptions) -> anyhow::Result<kv::Store> {
    let config = kv::Config {
        bucket: IMAGE_REFS_BUCKET.into(),
        description: "<tenant>.<image id> -> pushed reference, manifest digest, index digest"
            .into(),
        history: 5,
        max_age: options.records_max_age,
        max_bytes: options.records_max_bytes,
        max_value_size: options.max_msg_size,
        num_replicas: options.replicas,
        storage: StorageType::File,
        ..Default::default()
    };
    key_value(js, config, options).await
}

/// Opens (creating if needed) the build-context object store of `tenant`, which must be valid
/// ([`imagemesh_proto::validate_tenant`]).
pub async fn contexts(
    js: &Context,
    tenant: &str,
    options: &StreamOptions,
) -> anyhow::Result<jetstream::object_store::ObjectStore> {
    let config = jetstream::object_store::Config {
        bucket: contexts_bucket(tenant),
        description: Some(format!(
            "build contexts uploaded by clients of tenant {tenant}"
        )),
        max_age: options.contexts_max_age,
        max_bytes: options.contexts_max_bytes,
        num_replicas: options.replicas,
        storage: StorageType::File,
        ..Default::default()
    };
    object_store(js, config, options).await
}

/// Opens (creating if needed) the layer-index cache of the indexers.
pub async fn layer_indexes(
    js: &Context,
    options: &StreamOptions,
) -> anyhow::Result<jetstream::object_store::ObjectStore> {
    let config = jetstream::object_store::Config {
        bucket: LAYER_INDEX_BUCKET.into(),
        description: Some("layer digest -> encoded lazy-mount layer index".into()),
        max_age: options.layer_index_max_age,
        max_bytes: options.layer_index_max_bytes,
        num_replicas: options.replicas,
        storage: StorageType::File,
        ..Default::default()
    };
    object_store(js, config, options).await
}

/// Opens (creating if needed) the image-secrets bucket.
pub async fn image_secrets(js: &Context, options: &StreamOptions) -> anyhow::Result<kv::Store> {
    let config = kv::Config {
        bucket: IMAGE_SECRETS_BUCKET.into(),
        description: "<tenant>.<image id> -> name of the credential that pulls it".into(),
        history: 5,
        max_age: options.records_max_age,
        max_bytes: options.records_max_bytes,
        max_value_size: options.max_msg_size,
        num_replicas: options.replicas,
        storage: StorageType::File,
        ..Default::default()
    };
    key_value(js, config, options).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_bound_everything_and_fit_the_default_workers() {
        let options = StreamOptions::default();
        options.validate().unwrap();
        options
            .validate_workers("builder.worker", &WorkerOptions::default())
            .unwrap();
        for name in ALL {
            let config = definition(name, &options);
            assert!(!config.max_age.is_zero(), "{name}");
            assert!(config.max_bytes > 0, "{name}");
            assert!(config.max_message_size > 0, "{name}");
        }
        // A full intake or work stream refuses new messages instead of dropping old ones.
        for name in [INTAKE, BUILD, MOUNT, INDEX] {
            assert_eq!(
                definition(name, &options).discard,
                DiscardPolicy::New,
                "{name}"
            );
        }
        let intake = definition(INTAKE, &options);
        assert_eq!(intake.max_messages, options.intake_max_msgs);
        assert_eq!(intake.max_message_size, options.intake_max_msg_size);
    }

    #[test]
    fn work_messages_never_outlive_their_tokens() {
        let options = StreamOptions {
            work_max_age: Duration::from_secs(7 * 60),
            work_token_lifetime: Duration::from_secs(5 * 60),
            ..Default::default()
        };
        let err = options.validate().unwrap_err().to_string();
        // Both values are named.
        assert!(err.contains("work_max_age (7m)"), "{err}");
        assert!(err.contains("work_token_lifetime (5m)"), "{err}");
        // Up to the lifetime plus the margin is allowed; a longer lifetime (ECR's 12 h) allows
        // longer.
        let options = StreamOptions {
            work_max_age: Duration::from_secs(6 * 60),
            ..options
        };
        options.validate().unwrap();
        let options = StreamOptions {
            work_max_age: Duration::from_secs(12 * 3600),
            work_token_lifetime: Duration::from_secs(12 * 3600),
            ..options
        };
        options.validate().unwrap();
    }

    #[test]
    fn work_messages_outlive_the_retry_window() {
        let options = StreamOptions::default();
        let worker = WorkerOptions {
            max_deliver: 20,
            ack_wait: Duration::from_secs(30),
            retry_max: Duration::from_secs(10),
            ..Default::default()
        };
        assert_eq!(worker.retry_window(), Duration::from_secs(600));
        let err = options
            .validate_workers("mounter.worker", &worker)
            .unwrap_err()
            .to_string();
        assert!(err.contains("work_max_age (5m)"), "{err}");
        assert!(err.contains("mounter.worker (10m"), "{err}");
        // The backoff counts when it is the longer wait.
        let worker = WorkerOptions {
            max_deliver: 5,
            ack_wait: Duration::from_secs(10),
            retry_max: Duration::from_secs(2 * 60),
            ..Default::default()
        };
        assert_eq!(worker.retry_window(), Duration::from_secs(600));
        assert!(options.validate_workers("indexer.worker", &worker).is_err());
    }

    #[test]
    fn unbounded_limits_are_refused() {
        for options in [
            StreamOptions {
                intake_max_bytes: 0,
                ..Default::default()
            },
            StreamOptions {
                intake_max_msgs: -1,
                ..Default::default()
            },
            StreamOptions {
                status_max_age: Duration::ZERO,
                ..Default::default()
            },
            StreamOptions {
                max_msg_size: 64 * 1024,
                ..Default::default()
            },
        ] {
            let err = options.validate().unwrap_err().to_string();
            assert!(err.starts_with("streams."), "{err}");
        }
    }

    #[test]
    fn tenants_get_their_own_keys_and_buckets() {
        assert_eq!(image_key("a", "app-1"), "a.app-1");
        assert_ne!(image_key("a", "x"), image_key("b", "x"));
        // Image ids may hold dots; the tenant never does, so the first dot splits the key.
        assert_eq!(image_key("a", "v1.2").split_once('.'), Some(("a", "v1.2")));
        assert_eq!(contexts_bucket("team-a"), "imagemesh-contexts-team-a");
        // Object-store bucket names allow only A-Z, a-z, 0-9, '-' and '_'.
        let bucket = contexts_bucket(imagemesh_proto::DEFAULT_TENANT);
        assert!(
            bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }
}
