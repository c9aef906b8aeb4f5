//! `imagemesh image-secret`: which named credential pulls an image at runtime.
//!
//! The mapping lives in the `imagemesh-image-secrets` bucket (`<tenant>.<image id>` ->
//! credential name: image ids are per tenant); the credential itself is held by the credential
//! service (`credential.secrets.<name>`), never here, and serves only the tenants it is bound
//! to. The scheduler reads the mapping for every runtime request of that image in the tenant.

use std::process::ExitCode;

use anyhow::Context as _;
use imagemesh_runtime::streams::{self, image_key};

#[derive(Debug, clap::Args)]
pub struct ImageSecretArgs {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Pull IMAGE_ID with the credential named NAME.
    Set { image_id: String, name: String },
    /// Print the credential name recorded for IMAGE_ID.
    Get { image_id: String },
    /// Forget the mapping: IMAGE_ID is pulled with its registry's default credential.
    Unset { image_id: String },
}

pub async fn run(
    client: &async_nats::Client,
    tenant: &str,
    stored: &streams::StreamOptions,

    args: ImageSecretArgs,
) -> anyhow::Result<ExitCode> {
    let js = async_nats::jetstream::new(client.clone());
    let bucket = streams::image_secrets(&js, stored)
        .await
        .context("opening the image-secrets bucket")?;
    let image_id = match &args.action {
        Action::Set { image_id, .. } | Action::Get { image_id } | Action::Unset { image_id } => {
            image_id
        }
    };
    imagemesh_proto::validate_image_id(image_id).map_err(anyhow::Error::msg)?;
    let key = image_key(tenant, image_id);
    match args.action {
        Action::Set { image_id, name } => {
            anyhow::ensure!(!name.trim().is_empty(), "the credential name is empty");
            bucket.put(&key, name.trim().to_string().into()).await?;
            println!("{image_id} is pulled with credential {}", name.trim());
        }
        Action::Get { image_id } => match bucket.get(&key).await? {
            Some(name) => println!("{}", String::from_utf8_lossy(&name)),
            None => {
                eprintln!("no credential recorded for {image_id}");
                return Ok(ExitCode::FAILURE);
            }
        },
        Action::Unset { image_id } => {
            bucket.purge(&key).await?;
            println!("{image_id} is pulled with its registry's default credential");
        }
    }
    Ok(ExitCode::SUCCESS)
}
