//! Builder configuration.

use std::path::PathBuf;
use std::time::Duration;

use imagemesh_registry::RegistrySettings;
use imagemesh_runtime::app::ServiceConfig;
use imagemesh_runtime::nats::NatsConfig;
use imagemesh_runtime::placement::PlacementOptions;
use imagemesh_runtime::streams::StreamOptions;
use imagemesh_runtime::worker::WorkerOptions;
use serde::{Deserialize, Serialize};

use crate::sandbox::SandboxConfig;

/// The whole configuration file of the builder.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub streams: StreamOptions,
    pub builder: BuilderConfig,
}

impl ServiceConfig for Config {
    fn nats(&self) -> &NatsConfig {
        &self.nats
    }
    fn validate(&self) -> anyhow::Result<()> {
        self.streams.validate()?;
        self.streams
            .validate_workers("builder.worker", &self.builder.worker)
    }
}

/// How builds run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuilderConfig {
    /// The build work loop; `concurrency` is the number of builds at once.
    pub worker: WorkerOptions,
    /// How this instance advertises itself to schedulers.
    pub placement: PlacementOptions,
    pub registry: RegistrySettings,
    /// Where each build gets its own work directory (context, auth file, buildah `--root` and
    /// `--runroot`); removed when the build ends, and leftovers of dead builders at start.
    pub storage_dir: PathBuf,
    /// The buildah program.
    pub buildah: PathBuf,
    /// No longer used (base images fetched with a bearer token are stored with `buildah pull`);
    /// accepted so that older configuration files still load.
    #[serde(skip_serializing)]
    pub skopeo: Option<PathBuf>,
    /// Where and how `RUN` steps run: isolation, network per tenant, host ids.
    pub sandbox: SandboxConfig,
    /// Time limit of a build that sets none (`BuildOptions.timeout_seconds = 0`); a
    /// source-image copy has the same limit (then `REGISTRY_UNAVAILABLE`, retried).
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// Longest time limit a request may ask for.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// Largest build context accepted, in bytes, both as uploaded and once unpacked.
    pub max_context_bytes: u64,
}

impl Default for BuilderConfig {
    fn default() -> Self {
        Self {
            worker: WorkerOptions::default(),
            placement: PlacementOptions::default(),
            registry: RegistrySettings::default(),
            storage_dir: std::env::temp_dir().join("imagemesh-builder"),
            buildah: "buildah".into(),
            skopeo: None,
            sandbox: SandboxConfig::default(),
            default_timeout: Duration::from_secs(30 * 60),
            max_timeout: Duration::from_secs(2 * 3600),
            max_context_bytes: 512 * 1024 * 1024,
        }
    }
}

impl BuilderConfig {
    /// The time limit of a build that asked for `seconds` (0 = the default).
    pub fn timeout(&self, seconds: u32) -> Duration {
        match seconds {
            0 => self.default_timeout,
            s => Duration::from_secs(s.into()).min(self.max_timeout),
        }
    }
}

#[cfg(test)]
mod sample_tests {
    /// The sample in deploy/config stays loadable as the configuration changes.
    #[test]
    fn the_deploy_sample_loads() {
        let config =
            imagemesh_runtime::config::load_deploy_sample::<super::Config>("builder").unwrap();
        imagemesh_runtime::app::ServiceConfig::validate(&config).unwrap();
    }
}
