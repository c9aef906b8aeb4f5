//! Sending enriched requests downstream, once.
//!
//! A request goes to the live worker with the most free capacity (its own subject) or, when no
//! worker advertises room, to the shared queue. It is published with the request id as
//! JetStream message id (a redelivered intake message within the de-duplication window is
//! stored once) and recorded in the `imagemesh-dispatched` bucket after the PubAck (a request
//! seen again later, e.g. a client retry, is recognised and not dispatched again).

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, message::PublishMessage};
use imagemesh_proto::CONTENT_TYPE_PROTOBUF;
use imagemesh_proto::v1::{ContainerRequest, DispatchRecord};
use imagemesh_runtime::placement::{Directory, WorkKind};
use imagemesh_runtime::{ErrorCode, Rejection, status, subjects, telemetry};
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
    pub records: kv::Store,
    pub directory: Directory,
}

fn transient(message: String) -> Rejection {
    Rejection::new(ErrorCode::Internal, message)
}

impl Dispatcher {
    /// The record of an earlier dispatch of this request id, if any.
    pub async fn earlier(&self, request_id: &str) -> Result<Option<DispatchRecord>, Rejection> {
        let entry = self
            .records
            .get(request_id)
            .await
            .map_err(|e| transient(format!("dispatch record lookup failed: {e}")))?;
        Ok(entry.and_then(|bytes| DispatchRecord::decode(bytes).ok()))
    }

    /// Publishes `request` for `kind` and records it. Errors are transient (NATS trouble).
    pub async fn dispatch(
        &self,
        kind: WorkKind,
        request: &ContainerRequest,
    ) -> Result<Dispatched, Rejection> {
        let (subject, worker) = match self.directory.choose(kind.kind) {
            Some(ad) => (ad.subject, ad.worker_id),
            None => (kind.subject.to_string(), String::new()),
        };
        let mut headers = HeaderMap::new();
        headers.insert(subjects::CONTENT_TYPE_HEADER, CONTENT_TYPE_PROTOBUF);
        telemetry::inject(&mut headers);
        let message = PublishMessage::build()
            .payload(request.encode_to_vec().into())
            .headers(headers)
            .message_id(&request.request_id);
        let publish = async { self.js.send_publish(subject.clone(), message).await?.await };
        let ack = publish
            .await
            .map_err(|e| transient(format!("could not dispatch to {subject}: {e}")))?;
        if ack.duplicate {
            tracing::info!(
                request_id = request.request_id,
                "already in the work stream; not dispatched again"
            );
        }
        let record = DispatchRecord {
            request_id: request.request_id.clone(),
            subject: subject.clone(),
            stream_sequence: ack.sequence,
            dispatched_at: Some(status::now()),
        };
        self.records
            .put(&request.request_id, record.encode_to_vec().into())
            .await
            .map_err(|e| transient(format!("could not record the dispatch: {e}")))?;
        tracing::debug!(
            request_id = request.request_id,
            subject,
            sequence = ack.sequence,
            "dispatched"
        );
        Ok(Dispatched { subject, worker })
    }
}
