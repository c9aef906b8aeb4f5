//! The `main` of every service binary: parse arguments, load configuration, start telemetry,
//! connect to NATS, run the service until SIGTERM/SIGINT, and exit with a clear status.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use async_nats::Client;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::health::Health;
use crate::nats::NatsConfig;
use crate::{Shutdown, config, telemetry};

/// Arguments every service binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// TOML configuration file. Environment variables `IMAGEMESH_<SECTION>__<KEY>` and `NATS_URL`
    /// override its values.
    #[arg(long, short, env = "IMAGEMESH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (defaults, file, environment) as TOML and exit.
    /// Secrets written inline are never printed.
    #[arg(long)]
    pub print_config: bool,
    /// Serve `/livez` and `/readyz` over HTTP on this address (e.g. `0.0.0.0:8080`) for
    /// orchestrators' probes (`health.rs`).
    #[arg(long, env = "IMAGEMESH_HEALTH_LISTEN", value_name = "ADDR")]
    pub health_listen: Option<std::net::SocketAddr>,
}

/// A service configuration: it must say how to reach NATS.
pub trait ServiceConfig: Serialize + DeserializeOwned + Default {
    fn nats(&self) -> &NatsConfig;

    /// Refuses a configuration the service must not run with (checked at load, before
    /// connecting): e.g. unbounded streams, or a work stream that expires requests its workers
    /// still retry.
    fn validate(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Runs `service` as a process: `run(config, client, shutdown)` until a signal arrives.
pub fn main<C, F, Fut>(name: &'static str, args: ServiceArgs, run: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, Client, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    main_on(name, args, tokio::runtime::Builder::new_multi_thread(), run)
}

/// [`main`] on a runtime built from `runtime` (a service that bounds its blocking pool).
pub fn main_on<C, F, Fut>(
    name: &'static str,
    args: ServiceArgs,
    mut runtime: tokio::runtime::Builder,
    run: F,
) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, Client, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{name}: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    if args.print_config {
        return print_config::<C>(name, &args);
    }
    runtime.block_on(async move {
        let _telemetry = telemetry::init(name);
        match serve(name, args, run).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = format!("{err:#}"), "{name} stopped with an error");
                ExitCode::FAILURE
            }
        }
    })
}

async fn serve<C, F, Fut>(name: &'static str, args: ServiceArgs, run: F) -> anyhow::Result<()>
where
    C: ServiceConfig,
    F: FnOnce(C, Client, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config: C = config::load(args.config.as_deref())?;
    config
        .validate()
        .map_err(|err| err.context("invalid configuration"))?;
    let shutdown = Shutdown::new();
    let health = Health::new(shutdown.clone());
    if let Some(addr) = args.health_listen {
        health.clone().serve(addr).await?;
    }
    let client = config.nats().connect(&format!("imagemesh-{name}")).await?;
    tracing::info!(url = %config.nats().url, "connected to NATS");
    shutdown.trigger_on_signals()?;
    health.serving(client.clone());
    run(config, client.clone(), shutdown).await?;
    // Deliver what is still buffered (acks, status events) before exiting. With NATS
    // unreachable a flush waits for a reconnect forever; a SIGTERM must still end the process.
    match tokio::time::timeout(std::time::Duration::from_secs(5), client.flush()).await {
        Ok(flushed) => flushed?,
        Err(_) => tracing::warn!("NATS unreachable; exiting without flushing"),
    }
    tracing::info!("{name} stopped");
    Ok(())
}

fn print_config<C: ServiceConfig>(name: &str, args: &ServiceArgs) -> ExitCode {
    let printed = config::load::<C>(args.config.as_deref())
        .map_err(anyhow::Error::from)
        .and_then(|config| Ok(toml::to_string_pretty(&config)?));
    match printed {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{name}: {err:#}");
            ExitCode::FAILURE
        }
    }
}
