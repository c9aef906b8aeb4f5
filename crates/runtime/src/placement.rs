//! Worker placement: builders and mounters advertise themselves, the scheduler routes to them.
//!
//! Each builder/mounter instance puts a [`WorkerAdvertisement`] (id, capacity, in-flight,
//! labels, its own subject) into the `imagemesh-workers` KV bucket every heartbeat and consumes
//! two subjects: the shared queue (`imagemesh.work.build`) and its own
//! (`imagemesh.work.build.<worker id>`). The scheduler keeps a [`Directory`] of live workers
//! from a KV watch and sends each request to the live worker with the most free capacity, or to
//! the shared queue when none has any. Work queued for a worker whose heartbeat stopped is moved
//! back by [`crate::reroute`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use imagemesh_proto::v1::WorkerAdvertisement;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::{Shutdown, status, streams, subjects};

/// A kind of placed work: which stream, shared subject and durable consumer it uses.
#[derive(Debug, Clone, Copy)]
pub struct WorkKind {
    /// "build" or "mount"; the advertisement key prefix.
    pub kind: &'static str,
    pub stream: &'static str,
    /// The shared queue every instance consumes.
    pub subject: &'static str,
    /// The shared durable consumer; per-worker consumers are `<durable>-<worker id>`.
    pub durable: &'static str,
}

/// Builds, taken by builders.
pub const BUILD: WorkKind = WorkKind {
    kind: "build",
    stream: streams::BUILD,
    subject: subjects::BUILD,
    durable: "builder",
};

/// Runtime requests, taken by mounters.
pub const MOUNT: WorkKind = WorkKind {
    kind: "mount",
    stream: streams::MOUNT,
    subject: subjects::MOUNT,
    durable: "mounter",
};

impl WorkKind {
    /// The subject that addresses one worker.
    pub fn worker_subject(&self, worker_id: &str) -> String {
        format!("{}.{worker_id}", self.subject)
    }

    /// The durable consumer of one worker's subject.
    pub fn worker_durable(&self, worker_id: &str) -> String {
        format!("{}-{worker_id}", self.durable)
    }

    /// The worker a per-worker subject addresses, if it is one.
    pub fn worker_of_subject<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject.strip_prefix(self.subject)?.strip_prefix('.')
    }
}

/// KV bucket of worker advertisements.
pub const WORKERS_BUCKET: &str = "imagemesh-workers";

/// How an instance advertises itself. Part of the builder's and mounter's worker options.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementOptions {
    /// Advertise and take work addressed to this instance (off: shared queue only).
    pub enabled: bool,
    /// Stable id of this instance; generated (host name + random suffix) when empty.
    pub worker_id: String,
    /// How often the advertisement is refreshed.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Free-form labels the scheduler can see (zone, arch, ...).
    pub labels: HashMap<String, String>,
}

impl Default for PlacementOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            worker_id: String::new(),
            heartbeat: Duration::from_secs(2),
            labels: HashMap::new(),
        }
    }
}

impl PlacementOptions {
    /// These options with a worker id: the configured one, else a generated one. Call once at
    /// startup and use the result everywhere, so status events and the advertisement agree.
    pub fn resolved(&self) -> Self {
        let mut resolved = self.clone();
        if resolved.worker_id.is_empty() {
            resolved.worker_id = generate_worker_id();
        }
        resolved
    }
}

/// A worker is considered gone once it missed this many heartbeats.
pub const MISSED_HEARTBEATS: u32 = 3;

/// How long a worker's advertisement is kept: a few missed heartbeats.
pub fn workers_max_age(heartbeat: Duration) -> Duration {
    heartbeat * (MISSED_HEARTBEATS + 2)
}

/// Opens (creating if needed) the workers bucket; entries expire after a few missed heartbeats.
pub async fn workers_bucket(
    js: &jetstream::Context,
    heartbeat: Duration,
    options: &streams::StreamOptions,
) -> anyhow::Result<kv::Store> {
    let config = kv::Config {
        bucket: WORKERS_BUCKET.into(),
        description: "live builder and mounter instances".into(),
        history: 1,
        max_age: workers_max_age(heartbeat),
        max_bytes: options.records_max_bytes,
        max_value_size: options.max_msg_size,
        num_replicas: options.replicas,
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    };
    if !options.provision {
        return streams::open_key_value(js, WORKERS_BUCKET).await;
    }
    match js.create_key_value(config.clone()).await {
        Ok(store) => Ok(store),
        // Exists (maybe made by another service with another heartbeat): use it as it is.
        Err(_) => Ok(js.get_key_value(WORKERS_BUCKET).await?),
    }
}

/// The id an instance uses when none is configured: host name plus a random suffix, so a
/// restarted instance never inherits the queue of the one before.
pub fn generate_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}

/// Key of an advertisement: `<kind>.<worker id>`.
pub fn key(kind: &str, worker_id: &str) -> String {
    format!("{kind}.{worker_id}")
}

/// The kind and worker id an advertisement key names.
fn split_key(key: &str) -> Option<(&str, &str)> {
    let (kind, worker_id) = key.split_once('.')?;
    (!worker_id.is_empty() && !worker_id.contains('.')).then_some((kind, worker_id))
}

/// How busy a placed worker is, against the capacity it advertises.
#[derive(Clone)]
pub enum Load {
    /// Requests worked on at once: the work loop's permits in use.
    Permits(Arc<Semaphore>),
    /// What the worker keeps after a request is done (a mounter's mounts), counted by the
    /// worker.
    Held(Arc<dyn Fn() -> u32 + Send + Sync>),
}

impl Load {
    fn in_flight(&self, capacity: u32) -> u32 {
        match self {
            Load::Permits(permits) => capacity.saturating_sub(permits.available_permits() as u32),
            Load::Held(count) => count(),
        }
    }
}

impl std::fmt::Debug for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Permits(_) => f.write_str("Load::Permits"),
            Load::Held(_) => f.write_str("Load::Held"),
        }
    }
}

/// Keeps an advertisement fresh until `shutdown`, then removes it.
pub fn spawn_advertiser(
    store: kv::Store,
    template: WorkerAdvertisement,
    load: Load,
    every: Duration,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let key = key(&template.kind, &template.worker_id);
        let mut ticks = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticks.tick() => {}
            }
            let ad = WorkerAdvertisement {
                in_flight: load.in_flight(template.capacity),
                heartbeat_at: Some(status::now()),
                heartbeat_millis: every.as_millis() as u32,
                ..template.clone()
            };
            if let Err(err) = store.put(&key, ad.encode_to_vec().into()).await {
                tracing::warn!(error = %err, "could not refresh worker advertisement");
            }
        }
        // Leaving on purpose: tell schedulers at once instead of letting the entry expire.
        let _ = store.delete(&key).await;
    })
}

/// A live worker as the scheduler sees it.
#[derive(Debug, Clone)]
struct Known {
    /// Kind and worker id come from the advertisement's key, which only that worker may write
    /// (`docs/security.md`), never from what the advertisement says about itself.
    kind: String,
    worker_id: String,
    ad: WorkerAdvertisement,
    seen: Instant,
    /// Requests sent to it since its last heartbeat (not yet reflected in `ad.in_flight`).
    assigned: u32,
}

impl Known {
    /// Heartbeats are local receive times, so clock skew between hosts does not matter.
    fn is_live(&self) -> bool {
        let every = Duration::from_millis(self.ad.heartbeat_millis.max(100) as u64);
        self.seen.elapsed() < every * MISSED_HEARTBEATS
    }
}

/// The scheduler's view of live workers, kept current by a KV watch.
#[derive(Clone)]
pub struct Directory {
    workers: Arc<Mutex<HashMap<String, Known>>>,
}

impl Directory {
    /// Starts watching the bucket; the directory fills as advertisements arrive.
    pub async fn watch(store: &kv::Store, shutdown: Shutdown) -> anyhow::Result<Self> {
        let directory = Directory {
            workers: Arc::default(),
        };
        let mut watch = store.watch_all().await?;
        let view = directory.clone();
        tokio::spawn(async move {
            loop {
                let entry = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    entry = watch.next() => entry,
                };
                match entry {
                    Some(Ok(entry)) => view.apply(entry),
                    Some(Err(err)) => tracing::warn!(error = %err, "worker watch hiccup"),
                    None => break,
                }
            }
        });
        Ok(directory)
    }

    fn apply(&self, entry: kv::Entry) {
        let mut workers = self.workers.lock().expect("directory lock");
        match entry.operation {
            kv::Operation::Put => match (
                split_key(&entry.key),
                WorkerAdvertisement::decode(entry.value),
            ) {
                (Some((kind, worker_id)), Ok(ad)) => {
                    let known = Known {
                        kind: kind.to_string(),
                        worker_id: worker_id.to_string(),
                        ad,
                        seen: Instant::now(),
                        assigned: 0,
                    };
                    workers.insert(entry.key, known);
                }
                (None, _) => {
                    tracing::warn!(key = entry.key, "worker advertisement under a bad key")
                }
                (_, Err(err)) => {
                    tracing::warn!(key = entry.key, error = %err, "unreadable worker advertisement")
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                workers.remove(&entry.key);
            }
        }
    }

    /// Picks the live worker of `kind` with the most free capacity, counts the assignment and
    /// returns its worker id (from its key); `None` when no live worker has room (use the
    /// shared queue).
    pub fn choose(&self, kind: &str) -> Option<String> {
        let mut workers = self.workers.lock().expect("directory lock");
        let best = workers
            .values_mut()
            .filter(|w| w.kind == kind && w.is_live())
            .map(|w| {
                let used = w.ad.in_flight + w.assigned;
                (w.ad.capacity.saturating_sub(used), w)
            })
            .filter(|(free, _)| *free > 0)
            .max_by_key(|(free, w)| (*free, std::cmp::Reverse(w.worker_id.clone())))?;
        let (_, worker) = best;
        worker.assigned += 1;
        Some(worker.worker_id.clone())
    }

    /// Whether `worker_id` of `kind` has heartbeated recently.
    pub fn is_live(&self, kind: &str, worker_id: &str) -> bool {
        let workers = self.workers.lock().expect("directory lock");
        workers
            .get(&key(kind, worker_id))
            .is_some_and(Known::is_live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(directory: &Directory, key: &str, ad: WorkerAdvertisement) {
        directory.apply(kv::Entry {
            bucket: WORKERS_BUCKET.into(),
            key: key.into(),
            value: ad.encode_to_vec().into(),
            revision: 1,
            delta: 0,
            created: async_nats::datetime::now(),
            operation: kv::Operation::Put,
            seen_current: true,
        });
    }

    /// A worker may only write its own key; what its advertisement claims about itself must
    /// not route another worker's requests to it.
    #[test]
    fn routing_follows_the_key_not_what_the_advertisement_claims() {
        let directory = Directory {
            workers: Arc::default(),
        };
        let impostor = WorkerAdvertisement {
            worker_id: "victim".into(),
            kind: "mount".into(),
            subject: "imagemesh.work.mount.victim".into(),
            capacity: 4,
            heartbeat_millis: 60_000,
            ..Default::default()
        };
        put(&directory, "mount.w1", impostor.clone());
        assert_eq!(directory.choose("mount").as_deref(), Some("w1"));
        // Advertised under the build kind, it is not a mounter, whatever it says.
        let directory = Directory {
            workers: Arc::default(),
        };
        put(&directory, "build.w1", impostor);
        assert_eq!(directory.choose("mount"), None);
        assert_eq!(directory.choose("build").as_deref(), Some("w1"));
    }

    #[test]
    fn keys_name_a_kind_and_one_worker_id() {
        assert_eq!(split_key("mount.w1"), Some(("mount", "w1")));
        assert_eq!(split_key("mount.a.b"), None);
        assert_eq!(split_key("mount."), None);
        assert_eq!(split_key("mount"), None);
    }
}
