//! Registration with the NATS micro Services API.
//!
//! Every imagemesh service registers, so `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` find and
//! measure all of them with standard NATS tooling (`nats micro ls`, nats-py's `nats.micro`).
//! JetStream-driven services also answer `imagemesh.<service>.status` with their work counters,
//! and put the same counters in that endpoint's `data` in `$SRV.STATS`, so the stats of a
//! worker say how much work it did, not only how often it was asked.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::Client;
use async_nats::service::{Service, ServiceExt};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::Shutdown;

/// Who a service is, as `$SRV.INFO` reports it.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    /// Service name: credential, scheduler, builder, indexer, mounter.
    pub name: &'static str,
    pub description: &'static str,
}

fn metadata() -> HashMap<String, String> {
    HashMap::from([("project".to_string(), "imagemesh".to_string())])
}

/// Registers the service. Add endpoints with [`Service::group`] / [`Service::endpoint`].
pub async fn register(client: &Client, identity: Identity) -> anyhow::Result<Service> {
    client
        .service_builder()
        .description(identity.description)
        .metadata(metadata())
        .start(identity.name, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot register service {}: {e}", identity.name))
}

/// Work counters of one worker instance.
#[derive(Debug)]
pub struct WorkCounters {
    pub done: AtomicU64,
    pub retried: AtomicU64,
    pub rejected: AtomicU64,
    permits: Arc<Semaphore>,
    capacity: usize,
}

#[derive(Serialize)]
struct WorkSnapshot {
    done: u64,
    retried: u64,
    rejected: u64,
    in_flight: usize,
    capacity: usize,
}

impl WorkCounters {
    pub fn new(permits: Arc<Semaphore>, capacity: usize) -> Self {
        Self {
            done: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            permits,
            capacity,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let snapshot = WorkSnapshot {
            done: self.done.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            in_flight: self
                .capacity
                .saturating_sub(self.permits.available_permits()),
            capacity: self.capacity,
        };
        serde_json::to_value(snapshot).expect("counters serialize")
    }
}

/// Registers a worker service with a `status` endpoint reporting `counters`, and serves that
/// endpoint until `shutdown`.
pub async fn register_worker(
    client: &Client,
    identity: Identity,
    counters: Arc<WorkCounters>,
    shutdown: Shutdown,
) -> anyhow::Result<Service> {
    let in_stats = counters.clone();
    let service = client
        .service_builder()
        .description(identity.description)
        .metadata(metadata())
        .stats_handler(move |_endpoint, _stats| in_stats.to_json())
        .start(identity.name, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot register service {}: {e}", identity.name))?;
    let subject = format!("imagemesh.{}.status", identity.name);
    let mut endpoint = service
        .endpoint_builder()
        .name("status")
        .add(subject)
        .await
        .map_err(|e| anyhow::anyhow!("cannot add the status endpoint: {e}"))?;
    tokio::spawn(async move {
        loop {
            let request = tokio::select! {
                _ = shutdown.cancelled() => return,
                request = endpoint.next() => match request {
                    Some(request) => request,
                    None => return,
                },
            };
            let body = serde_json::to_vec(&counters.to_json()).expect("json");
            let _ = request.respond(Ok(body.into())).await;
        }
    });
    Ok(service)
}
