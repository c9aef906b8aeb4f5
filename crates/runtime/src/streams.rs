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

/// Stream settings that differ between deployments.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamOptions {
    /// Replicas of every stream and bucket (1 on a single server, 3 on a cluster).
    pub replicas: usize,
    /// How long a request id is remembered for de-duplication on publish.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long status events are kept.
    #[serde(with = "humantime_serde")]
    pub status_max_age: Duration,
    /// How long dead letters are kept.
    #[serde(with = "humantime_serde")]
    pub dead_letter_max_age: Duration,
    /// How long a submitted request is kept at the intake, and its id refused to another
    /// submission.
    #[serde(with = "humantime_serde")]
    pub intake_max_age: Duration,
    /// Create or update streams and buckets at startup. Off on a mesh with permissions: the
    /// operator provisions them and services only look them up.
    pub provision: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            replicas: 1,
            duplicate_window: Duration::from_secs(10 * 60),
            status_max_age: Duration::from_secs(24 * 3600),
            dead_letter_max_age: Duration::from_secs(7 * 24 * 3600),
            intake_max_age: Duration::from_secs(7 * 24 * 3600),
            provision: true,
        }
    }
}

/// A work-queue stream: each message is removed once a consumer acks it.
fn work_queue(name: &str, subject: &str, options: &StreamOptions) -> Config {
    Config {
        name: name.into(),
        // The bare subject is the shared queue; `<subject>.<worker>` addresses one worker.
        subjects: vec![subject.into(), format!("{subject}.>")],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        num_replicas: options.replicas,
        duplicate_window: options.duplicate_window,
        ..Default::default()
    }
}

fn history(name: &str, subject: String, max_age: Duration, options: &StreamOptions) -> Config {
    Config {
        name: name.into(),
        subjects: vec![subject],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        discard: DiscardPolicy::Old,
        max_age,
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
            ..history(
                INTAKE,
                subjects::INTAKE_ALL.into(),
                options.intake_max_age,
                options,
            )
        },
        BUILD => work_queue(BUILD, subjects::BUILD, options),
        MOUNT => work_queue(MOUNT, subjects::MOUNT, options),
        INDEX => work_queue(INDEX, subjects::INDEX, options),
        STATUS => history(
            STATUS,
            format!("{}.>", subjects::STATUS_PREFIX),
            options.status_max_age,
            options,
        ),
        DEAD_LETTER => history(
            DEAD_LETTER,
            format!("{}.>", subjects::DEAD_LETTER_PREFIX),
            options.dead_letter_max_age,
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
    if let Ok(store) = js.get_object_store(&config.bucket).await {
        return Ok(store);
    }
    if options.provision {
        return Ok(js.create_object_store(config).await?);
    }
    provisioned(&config.bucket, || {
        js.get_object_store(config.bucket.as_str())
    })
    .await
}

/// Everything the mesh stores, for the operator: every stream, bucket and object store, and
/// the build-context bucket of each tenant. Idempotent.
pub async fn provision_all(
    js: &Context,
    options: &StreamOptions,
    tenants: &[String],
    worker_heartbeat: Duration,
) -> anyhow::Result<()> {
    let options = StreamOptions {
        provision: true,
        ..options.clone()
    };
    ensure(js, &ALL, &options).await?;
    image_refs(js, &options).await?;
    image_secrets(js, &options).await?;
    layer_indexes(js, &options).await?;
    crate::placement::workers_bucket(js, worker_heartbeat, &options).await?;
    for tenant in tenants {
        contexts(js, tenant, &options).await?;
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
        max_age: CONTEXTS_MAX_AGE,
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
        max_age: LAYER_INDEX_MAX_AGE,
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
