//! A stand-in for builders and mounters that records what reaches their subjects.
//!
//! Scheduler tests count requests where they arrive, without doing the builds: the probe is
//! the durable consumer of the shared build and mount queues (what a builder/mounter would be)
//! and acks everything it receives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use imagemesh_proto::v1::ContainerRequest;
use imagemesh_proto::{DEFAULT_TENANT, RequestKey, TenantRequest};
use imagemesh_runtime::placement;
use prost::Message;

/// Requests received, by `<tenant>.<request id>` (request ids are unique per tenant only), in
/// arrival order per request.
#[derive(Clone, Default)]
pub struct Probe {
    received: Arc<Mutex<HashMap<String, Vec<ContainerRequest>>>>,
}

impl Probe {
    /// Consumes the shared build and mount queues until the test ends.
    pub async fn start(client: &async_nats::Client) -> Probe {
        let probe = Probe::default();
        let js = jetstream::new(client.clone());
        for kind in [placement::BUILD, placement::MOUNT] {
            let stream = js
                .get_stream(kind.stream)
                .await
                .expect("work stream exists");
            let consumer = stream
                .get_or_create_consumer(
                    kind.durable,
                    pull::Config {
                        durable_name: Some(kind.durable.into()),
                        filter_subject: kind.subject.into(),
                        ack_policy: AckPolicy::Explicit,
                        ..Default::default()
                    },
                )
                .await
                .expect("probe consumer");
            let mut messages = consumer.messages().await.expect("probe messages");
            let probe = probe.clone();
            tokio::spawn(async move {
                while let Some(Ok(message)) = messages.next().await {
                    let request = ContainerRequest::decode(message.payload.clone())
                        .expect("dispatched requests decode");
                    probe
                        .received
                        .lock()
                        .unwrap()
                        .entry(request.key().message_id())
                        .or_default()
                        .push(request);
                    let _ = message.double_ack_with(AckKind::Ack).await;
                }
            });
        }
        probe
    }

    /// How many distinct requests (tenant and id) arrived.
    pub fn distinct(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Requests (`<tenant>.<request id>`) that arrived more than once, with their counts.
    pub fn duplicates(&self) -> Vec<(String, usize)> {
        let received = self.received.lock().unwrap();
        let mut dups: Vec<_> = received
            .iter()
            .filter(|(_, copies)| copies.len() > 1)
            .map(|(id, copies)| (id.clone(), copies.len()))
            .collect();
        dups.sort();
        dups
    }

    /// The first copy of a request of the default tenant that arrived.
    pub fn get(&self, request_id: &str) -> Option<ContainerRequest> {
        self.get_of(DEFAULT_TENANT, request_id)
    }

    /// The first copy of `tenant`'s request that arrived.
    pub fn get_of(&self, tenant: &str, request_id: &str) -> Option<ContainerRequest> {
        let key = RequestKey::new(tenant, request_id).message_id();
        self.received
            .lock()
            .unwrap()
            .get(&key)
            .and_then(|c| c.first().cloned())
    }

    /// Waits until `expected` distinct requests arrived, then a little longer so late
    /// duplicates would show.
    pub async fn wait_for(&self, expected: usize, timeout: Duration) {
        imagemesh_testkit::eventually(
            timeout,
            &format!("{expected} requests to reach the probe"),
            || async { (self.distinct() >= expected).then_some(()) },
        )
        .await;
    }
}
