//! `imagemesh provision`: the operator creates (or updates to their definitions) every stream,
//! bucket and object store of the mesh, including each tenant's build-context bucket. On a mesh
//! with permissions no service may, since whoever can change a stream's subjects can make it
//! capture other identities' messages.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use imagemesh_runtime::streams::{self, StreamOptions};

#[derive(Debug, clap::Args)]
pub struct ProvisionArgs {
    /// Tenants whose build-context buckets to create (comma-separated or repeated); with
    /// --bundle, also its tenants.
    #[arg(long, value_delimiter = ',')]
    pub tenants: Vec<String>,
    /// A bundle made by `imagemesh nats-config generate`, for its tenants.
    #[arg(long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// Replicas of every stream and bucket (3 on a cluster).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// The workers' heartbeat period (the advertisement bucket expires silent workers after a
    /// few of them).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub worker_heartbeat: Duration,
}

pub async fn run(client: &async_nats::Client, args: ProvisionArgs) -> anyhow::Result<ExitCode> {
    let mut tenants = args.tenants;
    if let Some(dir) = &args.bundle {
        tenants.extend(imagemesh_access::Bundle::load(dir)?.spec().tenants.clone());
    }
    if tenants.is_empty() {
        tenants.push("default".into());
    }
    tenants.sort();
    tenants.dedup();
    let options = StreamOptions {
        replicas: args.replicas,
        ..Default::default()
    };
    let js = async_nats::jetstream::new(client.clone());
    streams::provision_all(&js, &options, &tenants, args.worker_heartbeat).await?;
    eprintln!(
        "provisioned {} streams, the mesh's buckets and the context buckets of {}",
        streams::ALL.len(),
        tenants.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}
