//! `imagemesh provision`: the operator creates (or updates to their definitions) every stream,
//! bucket and object store of the mesh, including each tenant's build-context bucket. On a mesh
//! with permissions no service may, since whoever can change a stream's subjects can make it
//! capture other identities' messages.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use imagemesh_runtime::streams::{self, StreamOptions};
use imagemesh_runtime::worker::WorkerOptions;
use serde::{Deserialize, Serialize};

#[derive(Debug, clap::Args)]
pub struct ProvisionArgs {
    /// Tenants whose build-context buckets to create (comma-separated or repeated); with
    /// --bundle, also its tenants.
    #[arg(long, value_delimiter = ',')]
    pub tenants: Vec<String>,
    /// A bundle made by `imagemesh nats-config generate`, for its tenants.
    #[arg(long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// A configuration file whose `[streams]` section (limits and ages, see
    /// docs/architecture.md "Bounded storage") to provision with: any service's, or one holding
    /// only that section. Its `[builder.worker]`, `[mounter.worker]` and `[indexer.worker]`
    /// sections, when present, are checked against the work streams' max_age.
    /// `IMAGEMESH_STREAMS__<KEY>` variables override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Replicas of every stream and bucket (3 on a cluster); overrides the file's.
    #[arg(long)]
    pub replicas: Option<usize>,
    /// The workers' heartbeat period (the advertisement bucket expires silent workers after a
    /// few of them).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub worker_heartbeat: Duration,
}

/// The stream options to provision with: the `[streams]` section of `--config` (defaults
/// without one) and `--replicas`, checked before anything connects.
pub fn options(args: &ProvisionArgs) -> anyhow::Result<StreamOptions> {
    let config: ProvisionConfig = imagemesh_runtime::config::load(args.config.as_deref())?;
    let mut options = config.streams.clone();
    if let Some(replicas) = args.replicas {
        options.replicas = replicas;
    }
    config.validate(&options)?;
    Ok(options)
}

pub async fn run(
    client: &async_nats::Client,
    args: ProvisionArgs,
    options: StreamOptions,
) -> anyhow::Result<ExitCode> {
    let mut tenants = args.tenants;
    if let Some(dir) = &args.bundle {
        tenants.extend(imagemesh_access::Bundle::load(dir)?.spec().tenants.clone());
    }
    if tenants.is_empty() {
        tenants.push("default".into());
    }
    tenants.sort();
    tenants.dedup();
    let js = async_nats::jetstream::new(client.clone());
    streams::provision_all(&js, &options, &tenants, args.worker_heartbeat).await?;
    eprintln!(
        "provisioned {} streams, the mesh's buckets and the context buckets of {}",
        streams::ALL.len(),
        tenants.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// What `imagemesh provision` reads of a configuration file: the `[streams]` section, and the
/// worker sections of the services reading the work streams (to check the work-stream rule).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct ProvisionConfig {
    streams: StreamOptions,
    builder: Option<WorkerSection>,
    mounter: Option<WorkerSection>,
    indexer: Option<WorkerSection>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct WorkerSection {
    worker: Option<WorkerOptions>,
}

impl ProvisionConfig {
    fn validate(&self, options: &StreamOptions) -> anyhow::Result<()> {
        options.validate()?;
        let sections = [
            ("builder.worker", &self.builder),
            ("mounter.worker", &self.mounter),
            ("indexer.worker", &self.indexer),
        ];
        for (name, section) in sections {
            if let Some(worker) = section.as_ref().and_then(|s| s.worker.as_ref()) {
                options.validate_workers(name, worker)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provision_reads_the_samples_and_checks_the_work_stream_rule() {
        let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config");
        for service in ["scheduler", "builder", "mounter", "indexer"] {
            let file = samples.join(format!("{service}.toml"));
            let config: ProvisionConfig =
                imagemesh_runtime::config::load_from(Some(&file), []).unwrap();
            config.validate(&config.streams).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[streams]\nwork_max_age = \"5m\"\n[mounter.worker]\nmax_deliver = 20\nack_wait = \"30s\"\n",
        )
        .unwrap();
        let config: ProvisionConfig =
            imagemesh_runtime::config::load_from(Some(&file), []).unwrap();
        let err = config.validate(&config.streams).unwrap_err().to_string();
        assert!(err.contains("work_max_age (5m)"), "{err}");
        assert!(err.contains("mounter.worker (10m"), "{err}");
        // An environment override is read like the services read it.
        let env = [(
            "IMAGEMESH_STREAMS__WORK_MAX_AGE".to_string(),
            "1h".to_string(),
        )];
        let config: ProvisionConfig = imagemesh_runtime::config::load_from(None, env).unwrap();
        assert!(config.validate(&config.streams).is_err());
    }
}
