//! Builder configuration.

use imagemesh_registry::RegistrySettings;
use imagemesh_runtime::app::ServiceConfig;
use imagemesh_runtime::nats::NatsConfig;
use imagemesh_runtime::placement::PlacementOptions;
use imagemesh_runtime::streams::StreamOptions;
use imagemesh_runtime::worker::WorkerOptions;
use serde::{Deserialize, Serialize};

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
}

/// How builds run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuilderConfig {
    /// The build work loop; `concurrency` is the number of builds at once.
    pub worker: WorkerOptions,
    /// How this instance advertises itself to schedulers.
    pub placement: PlacementOptions,
    pub registry: RegistrySettings,
}
