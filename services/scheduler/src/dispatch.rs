//! Sending enriched requests downstream, once.
//!
//! A request goes to the live worker with the most free capacity (its own subject) or, when no
//! worker advertises room, to the shared queue. It is published with the request id as
//! JetStream message id (a redelivered intake message within the de-duplication window is
//! stored once), and its id is claimed first in the `imagemesh-dispatched` bucket with an atomic
//! create (a request seen again later, e.g. a client retry after the window, finds the claim and
//! is not dispatched again). The two are separate writes: the claim outlives the window, the
//! message id covers the gap between publishing and acking the intake message.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, message::PublishMessage};
use imagemesh_proto::CONTENT_TYPE_PROTOBUF;
use imagemesh_proto::v1::{ContainerRequest, DispatchRecord};
use imagemesh_runtime::placement::{Directory, WorkKind};
use imagemesh_runtime::{ErrorCode, Rejection, status, subjects, telemetry};
use prost::Message;

/// What the dispatch record said about a request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Ours to dispatch.
    New,
    /// Seen before: it went out already (or is going out).
    Repeat,
}

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
    /// Claims the request id in the `imagemesh-dispatched` bucket (an atomic create).
    ///
    /// On a first delivery an existing claim means the request was seen before (a client
    /// retry after the de-duplication window): [`Claim::Repeat`], do nothing. On a redelivery the
    /// claim may be our own from the attempt that did not finish: carry on, the message id
    /// keeps a second publish from being stored twice.
    pub async fn claim(&self, request_id: &str, attempt: u64) -> Result<Claim, Rejection> {
        let record = DispatchRecord {
            request_id: request_id.to_string(),
            dispatched_at: Some(status::now()),
            ..Default::default()
        };
        match self
            .records
            .create(request_id, record.encode_to_vec().into())
            .await
        {
            Ok(_) => Ok(Claim::New),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(if attempt == 1 {
                Claim::Repeat
            } else {
                Claim::New
            }),
            Err(err) => Err(transient(format!("could not claim the request id: {err}"))),
        }
    }

    /// Gives a claim back, so a request that was refused can be submitted again.
    pub async fn release(&self, request_id: &str) {
        if let Err(err) = self.records.purge(request_id).await {
            tracing::warn!(request_id, error = %err, "could not release the request id");
        }
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
        tracing::debug!(
            request_id = request.request_id,
            subject,
            sequence = ack.sequence,
            "dispatched"
        );
        Ok(Dispatched { subject, worker })
    }
}
