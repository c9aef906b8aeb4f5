//! `imagemesh submit`: publish a ContainerRequest to the durable intake.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use imagemesh_proto::v1::{BuildOptions, ContainerRequest, RequestKind};
use imagemesh_proto::{
    CONTENT_TYPE_JSON, CONTENT_TYPE_PROTOBUF, RequestKey, codec, validate_request_id,
};
use imagemesh_runtime::{status, subjects};
use prost::Message;

use crate::watch;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Kind {
    Build,
    Runtime,
}

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// A ContainerRequest in the proto3 JSON mapping; the flags below override its fields.
    #[arg(long, short, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Build an image, or run a container from one.
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
    /// Request id (idempotency key within the tenant); generated when absent.
    #[arg(long)]
    pub request_id: Option<String>,
    #[arg(long)]
    pub container_id: Option<String>,
    /// Image id: the tag a build pushes, or the built image a runtime request mounts.
    #[arg(long)]
    pub image_id: Option<String>,
    /// Runtime: the image to mount. Build: the image it starts from.
    #[arg(long)]
    pub image_ref: Option<String>,
    /// Build from this Dockerfile.
    #[arg(long, value_name = "FILE")]
    pub dockerfile: Option<PathBuf>,
    /// Build by copying this image into the build registry.
    #[arg(long)]
    pub source_image: Option<String>,
    /// Repository in the build registry (default: the scheduler's).
    #[arg(long)]
    pub repository: Option<String>,
    /// Object-store key of an uploaded build context.
    #[arg(long)]
    pub context_object: Option<String>,
    /// Publish as proto3 JSON instead of protobuf (what hand-written clients do).
    #[arg(long)]
    pub json: bool,
    /// Follow the request until it succeeds or fails.
    #[arg(long)]
    pub watch: bool,
    /// Give up watching after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub async fn run(
    client: &async_nats::Client,
    tenant: &str,
    args: SubmitArgs,
) -> anyhow::Result<ExitCode> {
    let request = build_request(tenant, &args)?;
    publish(client, &request, args.json).await?;
    match imagemesh_runtime::telemetry::current_trace_id() {
        Some(trace) => println!("submitted request {} (trace {trace})", request.request_id),
        None => println!("submitted request {}", request.request_id),
    }
    if args.watch {
        let key = RequestKey::new(tenant, &request.request_id);
        return watch::follow(client, key, args.timeout).await;
    }
    Ok(ExitCode::SUCCESS)
}

fn build_request(tenant: &str, args: &SubmitArgs) -> anyhow::Result<ContainerRequest> {
    let mut request = match &args.file {
        Some(path) => {
            let text =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            codec::decode::<ContainerRequest>(&text, Some(CONTENT_TYPE_JSON))
                .with_context(|| format!("in {}", path.display()))?
        }
        None => ContainerRequest::default(),
    };
    if let Some(kind) = args.kind {
        request.set_kind(match kind {
            Kind::Build => RequestKind::Build,
            Kind::Runtime => RequestKind::Runtime,
        });
    }
    let set = |field: &mut String, value: &Option<String>| {
        if let Some(value) = value {
            *field = value.clone();
        }
    };
    set(&mut request.request_id, &args.request_id);
    set(&mut request.container_id, &args.container_id);
    set(&mut request.image_id, &args.image_id);
    set(&mut request.image_ref, &args.image_ref);
    let options = request
        .build_options
        .get_or_insert_with(BuildOptions::default);
    if let Some(path) = &args.dockerfile {
        options.dockerfile =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    }
    set(&mut options.source_image, &args.source_image);
    set(&mut options.repository, &args.repository);
    set(&mut options.context_object, &args.context_object);
    if request.build_options == Some(BuildOptions::default()) {
        request.build_options = None;
    }
    if request.request_id.is_empty() {
        request.request_id = uuid::Uuid::now_v7().to_string();
    }
    validate_request_id(&request.request_id)?;
    anyhow::ensure!(
        request.kind() != RequestKind::Unspecified,
        "say --kind build or --kind runtime"
    );
    // The scheduler takes the tenant from the subject and refuses a payload naming another.
    anyhow::ensure!(
        request.tenant.is_empty() || request.tenant == tenant,
        "the request names tenant {:?}, but this is tenant {tenant:?} (--tenant)",
        request.tenant
    );
    request.tenant = tenant.to_string();
    request.submitted_at = Some(status::now());
    Ok(request)
}

/// Publishes to the intake on the request's own subject (its tenant and id). The intake keeps
/// one message per subject, so a second submit of an id (a retry whose first attempt got
/// through, or a mistake) is refused by the server and reported here. No message id: it would keep the id of a request
/// the scheduler refused from being used again within the de-duplication window.
pub async fn publish(
    client: &async_nats::Client,
    request: &ContainerRequest,
    json: bool,
) -> anyhow::Result<()> {
    use async_nats::jetstream::context::PublishErrorKind;
    let js = async_nats::jetstream::new(client.clone());
    let (payload, content_type) = if json {
        (
            serde_json::to_vec(&codec::to_json(request))?,
            CONTENT_TYPE_JSON,
        )
    } else {
        (request.encode_to_vec(), CONTENT_TYPE_PROTOBUF)
    };
    let mut headers = HeaderMap::new();
    headers.insert(subjects::CONTENT_TYPE_HEADER, content_type);
    imagemesh_runtime::telemetry::inject(&mut headers);
    let message = PublishMessage::build()
        .payload(payload.into())
        .headers(headers)
        .expected_last_subject_sequence(0);
    let confirmed = js
        .send_publish(
            subjects::intake(&request.tenant, &request.request_id),
            message,
        )
        .await
        .context("publishing to the intake")?
        .await;
    match confirmed {
        Ok(_) => {}
        Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => eprintln!(
            "request {} was already submitted; not submitted again",
            request.request_id
        ),
        Err(err) => {
            if let Some(refusal) = imagemesh_runtime::streams::intake_refusal(&err) {
                anyhow::bail!("{refusal}: request {} was not accepted", request.request_id);
            }
            return Err(err).context(
                "the intake did not confirm (is the scheduler running? it creates the stream)",
            );
        }
    }
    Ok(())
}
