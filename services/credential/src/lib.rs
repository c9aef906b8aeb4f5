//! The credential service: the only holder of long-term registry credentials.
//!
//! It answers two NATS micro-service endpoints with a [`TokenResponse`]:
//! - `imagemesh.credential.mint` (the scheduler's): any scope the configuration allows;
//! - `imagemesh.credential.refresh` (the mounter's): pull-only scopes, so NATS permissions can
//!   keep mounters from ever obtaining push rights.
//!
//! [`broker::Broker`] matches the registry host exactly, asks the configured
//! [`providers::Provider`], and returns a structured credential. Secrets are held in
//! `secrecy::SecretString` until the moment they are put on the wire.
//!
//! [`TokenResponse`]: imagemesh_proto::v1::TokenResponse
#![forbid(unsafe_code)]

pub mod broker;
pub mod config;
mod endpoints;
pub mod providers;

use std::sync::Arc;

use async_nats::Client;
pub use config::Config;
use imagemesh_runtime::Shutdown;
use imagemesh_runtime::service::{self, Identity};

/// How the credential service presents itself to `$SRV.INFO`.
pub const IDENTITY: Identity = Identity {
    name: "credential",
    description: "Mints short-lived, scoped registry credentials from long-term ones",
};

/// Serves token requests until `shutdown`.
pub async fn run(config: Config, client: Client, shutdown: Shutdown) -> anyhow::Result<()> {
    let broker = Arc::new(broker::Broker::from_config(&config.credential)?);
    let service = service::register(&client, IDENTITY).await?;
    endpoints::serve(&service, broker, shutdown).await?;
    service.stop().await.map_err(|e| anyhow::anyhow!(e))?;
    Ok(())
}
