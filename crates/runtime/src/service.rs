//! Registration with the NATS micro Services API.
//!
//! Every imagemesh service registers, so `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` find and
//! measure all of them with standard NATS tooling (`nats micro ls`, nats-py's `nats.micro`).

use std::collections::HashMap;

use async_nats::Client;
use async_nats::service::{Service, ServiceExt};

/// Who a service is, as `$SRV.INFO` reports it.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    /// Service name: credential, scheduler, builder, indexer, mounter.
    pub name: &'static str,
    pub description: &'static str,
}

/// Registers the service. Add endpoints with [`Service::group`] / [`Service::endpoint`].
pub async fn register(client: &Client, identity: Identity) -> anyhow::Result<Service> {
    let metadata = HashMap::from([("project".to_string(), "imagemesh".to_string())]);
    client
        .service_builder()
        .description(identity.description)
        .metadata(metadata)
        .start(identity.name, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot register service {}: {e}", identity.name))
}
