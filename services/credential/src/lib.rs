//! The credential service: the only holder of long-term registry credentials.
//!
//! It answers two NATS micro-service endpoints with a [`TokenResponse`]:
//! - `imagemesh.credential.mint` (the scheduler's): any scope the configuration allows;
//! - `imagemesh.credential.refresh` (the mounter's): pull-only scopes, so NATS permissions can
//!   keep mounters from ever obtaining push rights.
//!
//! Map of the crate:
//! - [`config`]: registries and their providers, cache settings; [`secret`]: where a long-term
//!   secret is read from (environment or file, never a request).
//! - [`broker`]: exact host matching, the scope policy of each endpoint, the answer.
//! - [`cache`]: per-(registry, repository, actions, identity) tokens, single-flight upstream
//!   calls, refresh ahead of expiry, the minimum lifetime.
//! - [`providers`]: static (basic, GHCR, Docker Hub, NGC, GAR), docker `config.json`, credential
//!   helpers, AWS ECR, distribution token auth, and the issuer (this service signs the tokens).
//! - `token_endpoint`: the HTTP realm of issuer registries, where skopeo and buildah exchange a
//!   one-time login (minted over NATS) for one token.
//!
//! Secrets are held in `secrecy::SecretString` (redacting `Debug`) until the moment they are put
//! on the wire; errors and logs name registries, endpoints and variables, never values.
//!
//! [`TokenResponse`]: imagemesh_proto::v1::TokenResponse
#![forbid(unsafe_code)]

pub mod broker;
pub mod cache;
pub mod config;
mod endpoints;
pub mod providers;
pub mod secret;
mod token_endpoint;

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
    let broker = Arc::new(broker::Broker::from_config(&config.credential).await?);
    if let Some(endpoint) = &config.credential.token_endpoint {
        let listener = tokio::net::TcpListener::bind(endpoint.listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!("token endpoint: cannot listen on {}: {e}", endpoint.listen)
            })?;
        tracing::info!(listen = %listener.local_addr()?, "HTTP token endpoint serving /token");
        let serving = token_endpoint::TokenEndpoint::new(broker.clone());
        tokio::spawn(serving.serve(listener, shutdown.clone()));
    }
    let service = service::register(&client, IDENTITY).await?;
    endpoints::serve(&service, broker, shutdown).await?;
    service.stop().await.map_err(|e| anyhow::anyhow!(e))?;
    Ok(())
}
