//! `imagemesh`, the command-line client of the mesh.
//!
//! - `imagemesh submit`: publish a build or runtime ContainerRequest to the intake.
//! - `imagemesh watch ID`: follow a request's status events until it succeeds or fails.
//! - `imagemesh build -f Dockerfile CONTEXT`: upload a context, build, show the live log.
//! - `imagemesh index show|cat IMAGE`: list an image's files or read one from its lazy-mount
//!   index, straight from the registry.
//! - `imagemesh image-secret`: which named credential pulls an image at runtime.
//! - `imagemesh nats-config`: identities, TLS material and the nats-server authorization
//!   config rendered from the permission table (`imagemesh-access`).
//! - `imagemesh provision`: the operator creates every stream and bucket of a secured mesh.
//! - `imagemesh mounts WORKER`: a mounter's mounts and caches (memory and disk), as the operator.
//! - `imagemesh registry login|issuer-key`: one-time logins for tools that talk to an issuer
//!   registry themselves, and the issuer's signing key.
//!
//! Every command that talks to the mesh acts as one tenant (`--tenant`, `IMAGEMESH_TENANT`,
//! `default` when unset): it submits on `imagemesh.intake.<tenant>.<id>`, follows
//! `imagemesh.status.<tenant>.<id>`, uploads to `imagemesh-contexts-<tenant>` and names image
//! secrets under `<tenant>.<image id>`. The flag only says which of the tenant's subjects to use;
//! the NATS server decides whether this client may use them: on a secured mesh, the client's
//! identity (`--nkey-file`) belongs to one tenant.
#![forbid(unsafe_code)]

mod build;
mod image_secret;
mod index;
mod mounts;
mod nats_config;
mod provision;
mod registry;
mod run;
mod submit;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::Instrument;

/// The imagemesh command-line client.
#[derive(Debug, Parser)]
#[command(
    name = "imagemesh",
    version,
    about = "Submit, watch and inspect imagemesh requests"
)]
pub struct Cli {
    /// NATS server URL.
    #[arg(
        long,
        global = true,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// NATS credentials file.
    #[arg(long, global = true, env = "NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// nkey seed of this client's identity (`imagemesh nats-config` makes them).
    #[arg(long, global = true, env = "NATS_NKEY_FILE", value_name = "FILE")]
    pub nkey_file: Option<std::path::PathBuf>,
    /// CA certificate to verify the server with; the connection then requires TLS.
    #[arg(long, global = true, env = "NATS_CA_FILE", value_name = "FILE")]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Client certificate for mutual TLS (with --tls-key-file).
    #[arg(long, global = true, env = "NATS_CERT_FILE", value_name = "FILE")]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// Client certificate's key for mutual TLS.
    #[arg(long, global = true, env = "NATS_KEY_FILE", value_name = "FILE")]
    pub tls_key_file: Option<std::path::PathBuf>,
    /// The tenant to act as (its credentials must allow it): `[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?`.
    #[arg(
        long,
        global = true,
        env = "IMAGEMESH_TENANT",
        default_value = imagemesh_proto::DEFAULT_TENANT,
        value_parser = parse_tenant,
    )]
    pub tenant: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a ContainerRequest (from flags or a proto3 JSON file).
    Submit(submit::SubmitArgs),
    /// Follow a request's status until it succeeds or fails.
    Watch(watch::WatchArgs),
    /// Run a container from an image on this node: a runtime request, then the OCI bundle the
    /// mounter prepared started with runc or crun; its output and exit code are this command's.
    Run(run::RunArgs),
    /// Build an image from a Dockerfile and a context directory; prints the image id.
    Build(build::BuildArgs),
    /// Inspect an image's lazy-mount index in the registry (needs no NATS).
    Index(index::IndexArgs),
    /// Name the credential (held by the credential service) that pulls an image at runtime.
    #[command(subcommand_value_name = "ACTION")]
    ImageSecret(image_secret::ImageSecretArgs),
    /// Generate identities and TLS material, render nats-server's authorization config from
    /// the permission table, or print the permission matrix.
    NatsConfig(nats_config::NatsConfigArgs),
    /// Create every stream, bucket and object store of the mesh (the operator's job on a mesh
    /// with permissions).
    Provision(provision::ProvisionArgs),
    /// What a mounter holds: its mounts and its caches (operator identity).
    Mounts(mounts::MountsArgs),
    /// One-time logins for a registry whose tokens the credential service issues, and the
    /// issuer's signing key.
    Registry(registry::RegistryArgs),
}

/// Runs a command; the exit code says whether it (and a watched request) succeeded.
pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("imagemesh: {err:#}");
            ExitCode::from(2)
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let Cli {
        nats_url,
        nats_creds,
        nkey_file,
        tls_ca_file,
        tls_cert_file,
        tls_key_file,
        tenant,
        command,
    } = cli;
    let config = imagemesh_runtime::nats::NatsConfig {
        url: nats_url,
        credentials_file: nats_creds,
        tls_required: tls_ca_file.is_some(),
        nkey_file,
        tls_ca_file,
        tls_cert_file,
        tls_key_file,
        connect_wait: std::time::Duration::from_secs(3),
        ..Default::default()
    };
    // A client with an identity talks to a mesh its operator provisioned: it looks streams and
    // buckets up and never tries to create them (which it may not).
    let stored = imagemesh_runtime::streams::StreamOptions {
        provision: config.nkey_file.is_none() && config.credentials_file.is_none(),
        ..Default::default()
    };
    let nats = || connect(&config);
    match command {
        Command::Submit(args) => {
            let span = tracing::info_span!("imagemesh submit", tenant);
            submit::run(&nats().await?, &tenant, args)
                .instrument(span)
                .await
        }
        Command::Watch(args) => watch::run(&nats().await?, &tenant, args).await,
        Command::Run(args) => {
            let span = tracing::info_span!("imagemesh run", tenant);
            run::run(&nats().await?, &tenant, args)
                .instrument(span)
                .await
        }
        Command::ImageSecret(args) => {
            image_secret::run(&nats().await?, &tenant, &stored, args).await
        }
        Command::Build(args) => {
            let span = tracing::info_span!("imagemesh build", tenant);
            build::run(&nats().await?, &tenant, &stored, args)
                .instrument(span)
                .await
        }
        // Talks to the registry only.
        Command::Index(args) => index::run(args).await,
        // Writes files only.
        Command::NatsConfig(args) => nats_config::run(args),
        Command::Provision(args) => {
            let options = provision::options(&args)?;
            provision::run(&nats().await?, args, options).await
        }
        Command::Registry(args) => registry::run(args, nats).await,
        Command::Mounts(args) => mounts::run(&nats().await?, args).await,
    }
}

fn parse_tenant(tenant: &str) -> Result<String, String> {
    imagemesh_proto::validate_tenant(tenant).map_err(|e| e.to_string())?;
    Ok(tenant.to_string())
}

async fn connect(
    config: &imagemesh_runtime::nats::NatsConfig,
) -> anyhow::Result<async_nats::Client> {
    Ok(config.connect("imagemesh-cli").await?)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks its own definition only when a command is parsed; check every one here
    /// (a global flag and a subcommand's flag of the same name would otherwise fail at run time).
    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
