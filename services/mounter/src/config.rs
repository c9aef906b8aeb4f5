//! Mounter configuration.

use std::path::PathBuf;
use std::time::Duration;

pub use imagemesh_lazyimage::CacheConfig;
use imagemesh_registry::RegistrySettings;
use imagemesh_runtime::app::ServiceConfig;
use imagemesh_runtime::nats::NatsConfig;
use imagemesh_runtime::placement::PlacementOptions;
use imagemesh_runtime::streams::StreamOptions;
use imagemesh_runtime::worker::WorkerOptions;
use serde::{Deserialize, Serialize};

/// The whole configuration file of the mounter.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub streams: StreamOptions,
    pub mounter: MounterConfig,
}

impl ServiceConfig for Config {
    fn nats(&self) -> &NatsConfig {
        &self.nats
    }
    fn validate(&self) -> anyhow::Result<()> {
        self.streams.validate()?;
        self.streams
            .validate_workers("mounter.worker", &self.mounter.worker)
    }
}

/// How mounts are made.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MounterConfig {
    /// The runtime-request work loop; `concurrency` is the number of mounts prepared at once.
    pub worker: WorkerOptions,
    /// Mounts this instance holds at once (live and being prepared). It is the capacity the
    /// instance advertises, so schedulers place requests on instances with room; a request
    /// beyond it is handed back (`AT_CAPACITY`, retried) for another instance to take.
    pub max_mounts: usize,
    /// Bytes the loaded indexes and file tables of all mounts may hold together; a mount that
    /// would exceed it is refused with AT_CAPACITY (another instance may take it) instead of
    /// growing the mounter towards an OOM that would take every mount with it.
    pub index_memory_bytes: u64,
    /// How this instance advertises itself to schedulers.
    pub placement: PlacementOptions,
    pub registry: RegistrySettings,
    /// Directory holding one mount point per container: `<mount_root>/<container id>` (or the
    /// request id when the request names no container). Created when missing.
    pub mount_root: PathBuf,
    /// Directory holding one OCI runtime bundle per container: `<bundle_root>/<container id>`
    /// with `config.json` and an overlay `rootfs` over the lazy mount (`bundle.rs`).
    pub bundle_root: PathBuf,
    /// Platform picked from multi-platform images (`os/arch[/variant]`).
    pub platform: String,
    /// Threads reading FUSE requests per mount. Reads are answered from the async runtime, so
    /// these threads never wait for the registry.
    pub fuse_threads: usize,
    /// Let every user (containers run as any uid) use the mounts; the kernel still checks file
    /// modes (`default_permissions`).
    pub allow_other: bool,
    /// Caches shared by every mount of this instance: two in memory, and the node cache on
    /// disk (keyed by layer digest, byte range and the checkpoints that verified the bytes, so
    /// images whose indexes agree on a base layer share its cached bytes).
    pub cache: CacheConfig,
    pub refresh: RefreshConfig,
    pub reads: ReadConfig,
    /// Recorded prefetch: the first mount of an image records which spans its reads need in
    /// its first seconds and publishes them next to the image; later mounts fetch those spans
    /// in the background.
    pub prefetch: PrefetchConfig,
    /// How long preparing a mount may take (manifest, index, image config: all registry work
    /// before the kernel mount). Past it the request is handed back `REGISTRY_UNAVAILABLE`
    /// and retried like any registry outage, instead of holding a worker slot.
    #[serde(with = "humantime_serde")]
    pub prepare_deadline: Duration,
    /// The mount keeper's socket (`imagemesh-mount-keeper --socket`). Set: every mount's FUSE
    /// descriptor is handed to the keeper, stopping the mounter (SIGTERM) leaves the mounts
    /// mounted, and the next mounter takes them over, as after a crash. Unset: mounts end with
    /// the process that made them.
    pub keeper_socket: Option<PathBuf>,
}

impl Default for MounterConfig {
    fn default() -> Self {
        Self {
            worker: WorkerOptions::default(),
            max_mounts: 256,
            index_memory_bytes: 1 << 30,
            placement: PlacementOptions::default(),
            registry: RegistrySettings::default(),
            mount_root: PathBuf::from("/run/imagemesh/mounts"),
            bundle_root: PathBuf::from("/run/imagemesh/bundles"),
            platform: imagemesh_registry::manifest::DEFAULT_PLATFORM.to_string(),
            fuse_threads: 2,
            allow_other: true,
            cache: CacheConfig::default(),
            refresh: RefreshConfig::default(),
            reads: ReadConfig::default(),
            prefetch: PrefetchConfig::default(),
            prepare_deadline: Duration::from_secs(120),
            keeper_socket: None,
        }
    }
}

/// Range requests behind file reads. Each attempt is bounded by `registry.read_timeout`; a
/// failed one (unavailable, timed out, reset) is retried with backoff, and the read fails with
/// `EIO` once `retries` are spent or `deadline` has passed. The mount stays either way.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReadConfig {
    pub retries: u32,
    /// First wait between attempts; doubled after each.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest one range read may take, attempts and waits included.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

impl Default for ReadConfig {
    fn default() -> Self {
        Self {
            retries: 3,
            retry_initial: Duration::from_millis(250),
            deadline: Duration::from_secs(60),
        }
    }
}

/// Recording which spans an image's first run reads, and prefetching them at later mounts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefetchConfig {
    /// Look for the image's prefetch list at every mount and prefetch its spans.
    pub enabled: bool,
    /// Record and publish a list when the image has none (needs a credential that may push
    /// to the image's repository; without one the publish is refused and logged).
    pub record: bool,
    /// How long after the mount foreground reads are recorded.
    #[serde(with = "humantime_serde")]
    pub record_window: Duration,
    /// Most spans recorded, and most spans of a list a later mount accepts.
    pub max_spans: usize,
    /// Most compressed bytes the recorded spans may add up to.
    pub max_bytes: u64,
    /// Largest prefetch list (JSON) a mount downloads; a bigger one is ignored.
    pub max_list_bytes: u64,
    /// Spans fetched at once by one mount's prefetch. Foreground reads never wait for these
    /// slots.
    pub concurrency: usize,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            record: true,
            record_window: Duration::from_secs(5),
            max_spans: 1024,
            max_bytes: 256 << 20,
            max_list_bytes: 1 << 20,
            concurrency: 2,
        }
    }
}

/// Refreshing a mount's credential before it expires.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RefreshConfig {
    /// Refresh this long before `expires_at` — or at half the remaining life, when that comes
    /// first (short-lived tokens).
    #[serde(with = "humantime_serde")]
    pub margin: Duration,
    /// Wait before asking again after a failed refresh (or one that returned the same token).
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
    /// How long one refresh request to the credential service may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self {
            margin: Duration::from_secs(60),
            retry: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod sample_tests {
    /// The sample in deploy/config stays loadable as the configuration changes.
    #[test]
    fn the_deploy_sample_loads() {
        let config =
            imagemesh_runtime::config::load_deploy_sample::<super::Config>("mounter").unwrap();
        imagemesh_runtime::app::ServiceConfig::validate(&config).unwrap();
    }
}
