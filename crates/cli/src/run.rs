//! `imagemesh run IMAGE [-- ARGS...]`: a container from an image, started lazily on this node.
//!
//! Submits a runtime request (the scheduler attaches the credentials, a mounter mounts the image
//! lazily and prepares an OCI bundle over it), follows it until `mounted`, then starts the bundle
//! with an OCI runtime (`runc` or `crun`) on this machine: the container's output streams
//! through and its exit code is ours. Afterwards the mount and the bundle are removed through
//! the mounter's unmount subject (unless `--keep`), which only the operator identity may use.
//! The mounter that serves the request must run on this node: the bundle is a local path.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use imagemesh_proto::v1::{ContainerRequest, RequestKind, RequestState};
use imagemesh_proto::{RequestKey, validate_request_id};
use imagemesh_runtime::{Rejection, status};

use crate::{submit, watch};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The image: registry/repository:tag (or @sha256:...).
    pub image: String,
    /// The container's arguments; they replace the image's Cmd (its Entrypoint stays).
    #[arg(last = true)]
    pub args: Vec<String>,
    /// Extra environment over the image's (repeatable): NAME=value, or NAME alone to pass this
    /// command's own value of NAME (keeps a secret off the command line, as `docker run -e`).
    #[arg(long = "env", short = 'e', value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,
    /// Container id, which also names the mount and the bundle (default: generated).
    #[arg(long)]
    pub container_id: Option<String>,
    /// The OCI runtime that starts the bundle.
    #[arg(long, default_value = "runc")]
    pub runtime: String,
    /// Leave the mount and the bundle in place after the container exits.
    #[arg(long)]
    pub keep: bool,
    /// Give up waiting for the mount after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub async fn run(
    client: &async_nats::Client,
    tenant: &str,
    args: RunArgs,
) -> anyhow::Result<ExitCode> {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let container_id = args
        .container_id
        .clone()
        .unwrap_or_else(|| format!("run-{}", &id[id.len() - 12..]));
    validate_request_id(&container_id).context("--container-id")?;
    let request = ContainerRequest {
        request_id: format!("run-{id}"),
        container_id: container_id.clone(),
        kind: RequestKind::Runtime as i32,
        image_ref: args.image.clone(),
        args: args.args.clone(),
        env: args.env.iter().map(|entry| with_own_value(entry)).collect(),
        tenant: tenant.to_string(),
        submitted_at: Some(status::now()),
        ..Default::default()
    };
    submit::publish(client, &request, false).await?;
    let key = RequestKey::new(tenant, &request.request_id);
    let Some(done) = watch::follow_to_end(client, key, args.timeout).await? else {
        return Ok(ExitCode::from(3));
    };
    if done.state() != RequestState::Succeeded {
        return Ok(ExitCode::FAILURE);
    }
    let detail = |name: &str| done.details.get(name).cloned().unwrap_or_default();
    let bundle = detail("bundle");
    if bundle.is_empty() {
        bail!("the mounter made no bundle (a mounter without bundle support?)");
    }
    let status = tokio::process::Command::new(&args.runtime)
        .args(["run", "--bundle", &bundle, &container_id])
        .status()
        .await
        .with_context(|| format!("starting {} (is it installed?)", args.runtime))?;
    if !args.keep {
        unmount(client, &detail("unmount_subject"), &container_id).await;
    }
    // The container's own exit code; a signal death as the shell reports it.
    let code = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    });
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)))
}

/// `NAME=value` as given; `NAME` alone takes this process's value of NAME (none: empty).
fn with_own_value(entry: &str) -> String {
    if entry.contains('=') {
        return entry.to_string();
    }
    let value = std::env::var(entry).unwrap_or_default();
    format!("{entry}={value}")
}

/// Asks the mounter to unmount the container's mount and bundle; a refusal is reported, not
/// fatal (the container already ran).
async fn unmount(client: &async_nats::Client, subject: &str, container_id: &str) {
    if subject.is_empty() {
        eprintln!(
            "imagemesh: the mounted event named no unmount subject; {container_id} stays mounted"
        );
        return;
    }
    let asked = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(subject.to_string(), container_id.to_string().into()),
    )
    .await;
    match asked {
        Ok(Ok(reply)) => {
            if let Some(refusal) = Rejection::from_headers(reply.headers.as_ref()) {
                eprintln!("imagemesh: unmounting {container_id} was refused ({refusal})");
            }
        }
        Ok(Err(err)) => eprintln!("imagemesh: unmounting {container_id} failed: {err}"),
        Err(_) => eprintln!("imagemesh: unmounting {container_id} timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_alone_takes_this_process_value() {
        assert_eq!(with_own_value("A=1"), "A=1");
        assert_eq!(with_own_value("A="), "A=");
        // PATH is set in every test process.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(with_own_value("PATH"), format!("PATH={path}"));
        assert_eq!(
            with_own_value("IMAGEMESH_SURELY_UNSET_VARIABLE"),
            "IMAGEMESH_SURELY_UNSET_VARIABLE="
        );
    }
}
