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
    fn validate(&self) -> anyhow::Result<()> {
        self.streams.validate()
    }
}

/// What the scheduler needs to enrich and route requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// The private build registry (host[:port]) images are built into and mounted from.
    pub build_registry: String,
    /// Where tenants' images live in the build registry: a tenant's builds push to
    /// `<build_repository>/<tenant>` (or a repository below it) and nowhere else.
    pub build_repository: String,
    /// Repository prefixes of the build registry every tenant may pull from (shared base
    /// images), e.g. `["imagemesh/base"]`. Images in the build registry outside these and the
    /// tenant's own prefix get no credential: such a request is refused (`FORBIDDEN`).
    pub shared_repositories: Vec<String>,
    /// Give runtime requests of images in the tenant's own repositories a second, pull,push
    /// token for that repository, with which the mounter publishes the image's recorded
    /// prefetch list next to it (`docs/mounter.md`, Recorded prefetch). Off: mounts read with
    /// pull-only tokens and publish nothing (unless their credential may push anyway).
    pub prefetch_publish: bool,
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
            shared_repositories: Vec::new(),
            prefetch_publish: true,
            credential_timeout: Duration::from_secs(2),
            heartbeat: Duration::from_secs(2),
            token_reuse: Duration::from_secs(30),
            intake: WorkerOptions::default(),
            registry: RegistrySettings::default(),
        }
    }
}

impl SchedulerConfig {
    /// Refuses repository settings that would open more than they say: an empty build
    /// repository would make every tenant's prefix a top-level repository, an empty shared
    /// prefix would cover nothing (and hide a typo).
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.build_repository.trim_matches('/').is_empty(),
            "scheduler.build_repository is empty"
        );
        for shared in &self.shared_repositories {
            anyhow::ensure!(
                !shared.trim_matches('/').is_empty(),
                "scheduler.shared_repositories holds an empty repository prefix"
            );
            anyhow::ensure!(
                !imagemesh_registry::repository::within(&self.build_repository, shared),
                "scheduler.shared_repositories entry {shared:?} covers build_repository \
                 {:?}: every tenant could pull every other tenant's images",
                self.build_repository
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_repositories_may_not_cover_the_tenants() {
        let mut config = SchedulerConfig::default();
        config.validate().unwrap();
        config.shared_repositories = vec!["imagemesh/base".into()];
        config.validate().unwrap();
        for bad in ["", "/", "imagemesh", "imagemesh/builds"] {
            config.shared_repositories = vec![bad.into()];
            assert!(config.validate().is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod sample_tests {
    /// The sample in deploy/config stays loadable as the configuration changes.
    #[test]
    fn the_deploy_sample_loads() {
        let config =
            imagemesh_runtime::config::load_deploy_sample::<super::Config>("scheduler").unwrap();
        imagemesh_runtime::app::ServiceConfig::validate(&config).unwrap();
    }
}
