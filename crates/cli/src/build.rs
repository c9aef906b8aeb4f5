//! `imagemesh build -f Dockerfile CONTEXT`: upload the context, submit a build, show its
//! progress and live log, and print the image id.
//!
//! The context directory goes up as a tar to the tenant's `imagemesh-contexts-<tenant>` object
//! store under `<request id>.tar`; the request names it. Progress and the build log go to
//! stderr, the image id alone to stdout, so `id=$(imagemesh build .)` works. Exit code: 0 when
//! the image was built (and indexed), 1 with the build's error when it failed, 3 when
//! `--timeout` passed first.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use imagemesh_proto::TenantRequest;
use imagemesh_proto::v1::{BuildOptions, ContainerRequest, RequestKind, RequestState, StatusEvent};
use imagemesh_runtime::error::code_name;
use imagemesh_runtime::streams::{self, StreamOptions};
use imagemesh_runtime::{status, subjects};
use prost::Message;

use crate::submit;

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The build context directory.
    pub context: PathBuf,
    /// Image id: the tag pushed (default: the request id).
    #[arg(long)]
    pub image_id: Option<String>,
    /// Request id (idempotency key); generated when absent.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Repository in the build registry (default: the scheduler's).
    #[arg(long)]
    pub repository: Option<String>,
    /// A build argument, KEY=VALUE, or KEY to take the value from this environment (keeping it
    /// off the command line); repeatable.
    #[arg(long = "build-arg", value_name = "KEY[=VALUE]")]
    pub build_args: Vec<String>,
    /// Time limit of the build itself (default: the builder's).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub build_timeout: Option<Duration>,
    /// Give up waiting after this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub async fn run(
    client: &async_nats::Client,
    tenant: &str,
    stored: &StreamOptions,
    args: BuildArgs,
) -> anyhow::Result<ExitCode> {
    let request_id = args
        .request_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    imagemesh_proto::validate_request_id(&request_id)?;
    let dockerfile_path = args
        .file
        .clone()
        .unwrap_or_else(|| args.context.join("Dockerfile"));
    let dockerfile = std::fs::read_to_string(&dockerfile_path)
        .with_context(|| format!("reading {}", dockerfile_path.display()))?;
    let context_object = format!("{request_id}.tar");
    let bytes = upload_context(client, tenant, stored, &args.context, &context_object).await?;
    eprintln!(
        "uploaded build context {} ({bytes} bytes)",
        args.context.display()
    );

    let mut request = build_request(&args, request_id, dockerfile, context_object)?;
    request.tenant = tenant.to_string();
    // Subscribe before submitting so no log line is missed.
    let log = client.subscribe(subjects::build_log(request.key())).await?;
    submit::publish(client, &request, false).await?;
    match imagemesh_runtime::telemetry::current_trace_id() {
        Some(trace) => eprintln!("submitted build {} (trace {trace})", request.request_id),
        None => eprintln!("submitted build {}", request.request_id),
    }
    follow(client, &request, log, args.timeout).await
}

fn build_request(
    args: &BuildArgs,
    request_id: String,
    dockerfile: String,
    context_object: String,
) -> anyhow::Result<ContainerRequest> {
    let mut build_args = std::collections::HashMap::new();
    for pair in &args.build_args {
        let (key, value) = match pair.split_once('=') {
            Some((key, value)) => (key.to_string(), value.to_string()),
            None => {
                let value = std::env::var(pair).with_context(|| {
                    format!("--build-arg {pair}: no =VALUE and no such environment variable")
                })?;
                (pair.clone(), value)
            }
        };
        build_args.insert(key, value);
    }
    let image_id = args.image_id.clone().unwrap_or_else(|| request_id.clone());
    imagemesh_proto::validate_image_id(&image_id).map_err(anyhow::Error::msg)?;
    Ok(ContainerRequest {
        request_id,
        image_id,
        kind: RequestKind::Build as i32,
        build_options: Some(BuildOptions {
            dockerfile,
            context_object,
            build_args,
            repository: args.repository.clone().unwrap_or_default(),
            timeout_seconds: args.build_timeout.map_or(0, |t| t.as_secs().max(1) as u32),
            ..Default::default()
        }),
        submitted_at: Some(status::now()),
        ..Default::default()
    })
}

/// Tars `dir` (symlinks kept as symlinks) into a temporary file and uploads it to `tenant`'s
/// context bucket.
async fn upload_context(
    client: &async_nats::Client,
    tenant: &str,
    stored: &StreamOptions,
    dir: &Path,
    name: &str,
) -> anyhow::Result<u64> {
    anyhow::ensure!(
        dir.is_dir(),
        "build context {} is not a directory",
        dir.display()
    );
    let archive = tempfile::NamedTempFile::new()?;
    let (source, file) = (dir.to_path_buf(), archive.reopen()?);
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut builder = tar::Builder::new(file);
        builder.follow_symlinks(false);
        builder.append_dir_all(".", &source)?;
        builder.into_inner()?.sync_all()
    })
    .await?
    .with_context(|| format!("packing {}", dir.display()))?;
    let js = async_nats::jetstream::new(client.clone());
    let store = streams::contexts(&js, tenant, stored)
        .await
        .context("opening the build-context bucket")?;
    let mut file = tokio::fs::File::open(archive.path()).await?;
    let info = store
        .put(name, &mut file)
        .await
        .context("uploading the build context")?;
    Ok(info.size as u64)
}

/// Prints status events and log lines until the request succeeds or fails.
async fn follow(
    client: &async_nats::Client,
    request: &ContainerRequest,
    mut log: async_nats::Subscriber,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let mut events = crate::watch::status_events(client, request.key()).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                eprintln!("gave up waiting for build {} after {timeout:?}", request.request_id);
                return Ok(ExitCode::from(3));
            }
            Some(line) = log.next() => eprintln!("  | {}", String::from_utf8_lossy(&line.payload)),
            message = events.next() => {
                let message = message.context("status stream closed")??;
                let Ok(event) = StatusEvent::decode(message.payload.clone()) else { continue };
                if let Some(code) = show(&event, request) {
                    return Ok(code);
                }
            }
        }
    }
}

/// Prints one event; returns the exit code once the request is finished.
fn show(event: &StatusEvent, request: &ContainerRequest) -> Option<ExitCode> {
    eprintln!("[{}] {}: {}", event.service, event.phase, event.message);
    match event.state() {
        RequestState::Succeeded => {
            println!("{}", request.image_id);
            Some(ExitCode::SUCCESS)
        }
        RequestState::Failed => {
            let code = code_name(event.error_code());
            eprintln!(
                "error: build {} failed ({code}): {}",
                request.request_id, event.message
            );
            Some(ExitCode::FAILURE)
        }
        _ => None,
    }
}
