//! Sending enriched requests downstream, once.
//!
//! A request goes to the live worker with the most free capacity (its own subject) or, when no
//! worker advertises room, to the shared queue. It is published with `<tenant>.<request id>` as
//! JetStream message id, so an intake message redelivered after a crash between publishing and
//! acking (within the de-duplication window) is stored once, and the same request id in two
//! tenants is two requests. A client's second submission of an id never gets this far: the
//! intake refuses it.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use imagemesh_proto::v1::ContainerRequest;
use imagemesh_proto::{CONTENT_TYPE_PROTOBUF, TenantRequest};
use imagemesh_runtime::placement::{Directory, WorkKind};
use imagemesh_runtime::{ErrorCode, Rejection, subjects, telemetry};
use prost::Message;

/// Where a request went.
#[derive(Debug, Clone)]
pub struct Dispatched {
    pub subject: String,
    /// The worker it was addressed to; empty for the shared queue.
    pub worker: String,
}

pub struct Dispatcher {
    pub js: jetstream::Context,
    pub directory: Directory,
}

fn transient(message: String) -> Rejection {
    Rejection::new(ErrorCode::Internal, message)
}

impl Dispatcher {
    /// Publishes `request` for `kind` and records it. Errors are transient (NATS trouble).
    pub async fn dispatch(
        &self,
        kind: WorkKind,
        request: &ContainerRequest,
    ) -> Result<Dispatched, Rejection> {
        let (subject, worker) = match self.directory.choose(kind.kind) {
            Some(worker_id) => (kind.worker_subject(&worker_id), worker_id),
            None => (kind.subject.to_string(), String::new()),
        };
        let mut headers = HeaderMap::new();
        headers.insert(subjects::CONTENT_TYPE_HEADER, CONTENT_TYPE_PROTOBUF);
        telemetry::inject(&mut headers);
        let message = PublishMessage::build()
            .payload(request.encode_to_vec().into())
            .headers(headers)
            .message_id(request.key().message_id());
        let publish = async { self.js.send_publish(subject.clone(), message).await?.await };
        let ack = publish
            .await
            .map_err(|e| transient(format!("could not dispatch to {subject}: {e}")))?;
        if ack.duplicate {
            tracing::info!(
                request = %request.key(),
                "already in the work stream; not dispatched again"
            );
        }
        tracing::debug!(
            request = %request.key(),
            subject,
            sequence = ack.sequence,
            "dispatched"
        );
        Ok(Dispatched { subject, worker })
    }
}
