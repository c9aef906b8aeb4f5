//! Scheduler configuration.

use std::time::Duration;

use imagemesh_registry::RegistrySettings;
use imagemesh_runtime::app::ServiceConfig;
use imagemesh_runtime::nats::NatsConfig;
use imagemesh_runtime::streams::StreamOptions;
use imagemesh_runtime::worker::WorkerOptions;
use serde::{Deserialize, Serialize};

/// The whole configuration file of the scheduler.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub streams: StreamOptions,
    pub scheduler: SchedulerConfig,
}

impl ServiceConfig for Config {
    fn nats(&self) -> &NatsConfig {
        &self.nats
    }
}

/// What the scheduler needs to enrich and route requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// The private build registry (host[:port]) images are built into and mounted from.
    pub build_registry: String,
    /// Repository in the build registry for builds that name none.
    pub build_repository: String,
    /// How long to wait for the credential service per attempt.
    #[serde(with = "humantime_serde")]
    pub credential_timeout: Duration,
    /// How long a token from the credential service is reused for further requests with the
    /// same registry, repository and actions (never past half its lifetime); 0 = never.
    #[serde(with = "humantime_serde")]
    pub token_reuse: Duration,
    /// How often workers are expected to heartbeat, and how often queued work of workers that
    /// stopped is re-routed.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// The intake work loop. `max_deliver` and the retry delays bound how long a request waits
    /// for credentials before it fails.
    pub intake: WorkerOptions,
    pub registry: RegistrySettings,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            build_registry: "127.0.0.1:5000".into(),
            build_repository: "imagemesh/builds".into(),
            credential_timeout: Duration::from_secs(2),
            heartbeat: Duration::from_secs(2),
            token_reuse: Duration::from_secs(30),
            intake: WorkerOptions::default(),
            registry: RegistrySettings::default(),
        }
    }
}

#[cfg(test)]
mod sample_tests {
    /// The sample in deploy/config stays loadable as the configuration changes.
    #[test]
    fn the_deploy_sample_loads() {
        imagemesh_runtime::config::load_deploy_sample::<super::Config>("scheduler").unwrap();
    }
}
