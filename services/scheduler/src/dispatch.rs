//! Sending enriched requests downstream, once.
//!
//! A request goes to the live worker with the most free capacity (its own subject) or, when no
//! worker advertises room, to the shared queue. It is published with `<tenant>.<request id>` as
//! JetStream message id, so an intake message redelivered after a crash between publishing and
//! acking (within the de-duplication window) is stored once, and the same request id in two
//! tenants is two requests. A client's second submission of an id never gets this far: the
//! intake refuses it.
//!
//! The message id is not enough on its own. A NATS server killed with SIGKILL can lose the
//! scheduler's last intake acks (it writes consumer state out lazily) and hand the request over
//! again as a first delivery; by then a worker may have consumed the work message, and a work
//! stream only remembers the ids of messages it still holds, so the copy would be stored. So
//! before dispatching, the scheduler reads the request's last status event: the `dispatched`
//! event (stored with confirmation before the intake message is acked) or any worker's event,
//! stored after this intake message was, means it went downstream already. It does so for
//! redeliveries and for messages stored before its connection to NATS came up; the first
//! delivery of a message stored since cannot be such a handover and is not checked.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use async_nats::HeaderMap;
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::{self, message::PublishMessage};
use imagemesh_proto::v1::{ContainerRequest, RequestState, StatusEvent};
use imagemesh_proto::{CONTENT_TYPE_PROTOBUF, RequestKey, TenantRequest};
use imagemesh_runtime::placement::{Directory, WorkKind};
use imagemesh_runtime::{ErrorCode, Rejection, streams, subjects, telemetry};
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
    pub connection: ConnectionEpoch,
}

/// Since when this scheduler's NATS connection has been up, as far as it can tell: the
/// intake messages a server could have handed out before losing its acks are the ones it
/// stored before then (a single server that restarts drops every connection).
pub struct ConnectionEpoch {
    statistics: Arc<async_nats::Statistics>,
    /// (connections counted, when this scheduler first saw that count).
    seen: Mutex<(u64, time::OffsetDateTime)>,
}

/// Allowance for the clocks of the scheduler and the NATS servers disagreeing.
const CLOCK_MARGIN: time::Duration = time::Duration::seconds(5);

impl ConnectionEpoch {
    pub fn new(client: &async_nats::Client) -> Self {
        let statistics = client.statistics();
        let connects = statistics.connects.load(Ordering::Relaxed);
        Self {
            statistics,
            seen: Mutex::new((connects, time::OffsetDateTime::now_utc())),
        }
    }

    /// Whether a message stored at `stored` may have been delivered (and its ack lost) before
    /// the current connection: stored before it, give or take [`CLOCK_MARGIN`]. Those, and
    /// redeliveries, are checked against their status events; first deliveries of newer
    /// messages, nearly all of them, need no check.
    pub fn predates(&self, stored: time::OffsetDateTime) -> bool {
        let connects = self.statistics.connects.load(Ordering::Relaxed);
        let mut seen = self.seen.lock().expect("connection epoch lock");
        if seen.0 != connects {
            *seen = (connects, time::OffsetDateTime::now_utc());
        }
        stored < seen.1 + CLOCK_MARGIN
    }
}

fn transient(message: String) -> Rejection {
    Rejection::new(ErrorCode::Internal, message)
}

/// The phase of the scheduler's event for a request it sent downstream.
pub const DISPATCHED: &str = "dispatched";

/// Whether `event`, stored after the intake message, says the request went downstream: the
/// scheduler's `dispatched` (or a later re-routing, or the end of a poison work message), or
/// anything a worker reported. The scheduler's own retries and refusals of the intake message
/// come before dispatching.
fn shows_dispatched(event: &StatusEvent) -> bool {
    if event.service != "scheduler" {
        return true;
    }
    if event.state == RequestState::Failed as i32 {
        return event
            .details
            .get("stream")
            .is_some_and(|stream| stream != streams::INTAKE);
    }
    event.phase != "retrying"
}

impl Dispatcher {
    /// Whether the request of an intake message stored at `stored` was dispatched already (see
    /// the module's comment). Errors are transient.
    pub async fn already_dispatched(
        &self,
        request: RequestKey<'_>,
        stored: time::OffsetDateTime,
    ) -> Result<bool, Rejection> {
        let status = self
            .js
            .get_stream_no_info(streams::STATUS)
            .await
            .map_err(|e| transient(format!("could not read status events: {e}")))?;
        let last = match status
            .direct_get_last_for_subject(subjects::status(request))
            .await
        {
            Ok(last) => last,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(transient(format!("could not read status events: {e}"))),
        };
        if last.time < stored {
            // An earlier request under the same id (its intake message is gone, the id free).
            return Ok(false);
        }
        let event = StatusEvent::decode(last.payload)
            .map_err(|e| transient(format!("undecodable status event: {e}")))?;
        Ok(shows_dispatched(&event))
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn event(service: &str, state: RequestState, phase: &str, stream: Option<&str>) -> StatusEvent {
        StatusEvent {
            service: service.into(),
            state: state as i32,
            phase: phase.into(),
            details: stream
                .map(|s| [("stream".to_string(), s.to_string())].into())
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    #[test]
    fn what_the_last_event_says_about_dispatching() {
        use RequestState::*;
        // Downstream: the scheduler's own word, a re-routing, a worker, a poison work message.
        assert!(shows_dispatched(&event(
            "scheduler",
            Running,
            DISPATCHED,
            None
        )));
        assert!(shows_dispatched(&event(
            "scheduler",
            Pending,
            "rerouted",
            None
        )));
        assert!(shows_dispatched(&event(
            "builder", Running, "building", None
        )));
        assert!(shows_dispatched(&event("mounter", Failed, "failed", None)));
        assert!(shows_dispatched(&event(
            "scheduler",
            Failed,
            "failed",
            Some(streams::BUILD)
        )));
        // Still at the intake: the scheduler retrying or refusing it.
        assert!(!shows_dispatched(&event(
            "scheduler",
            Pending,
            "retrying",
            None
        )));
        assert!(!shows_dispatched(&event(
            "scheduler",
            Failed,
            "failed",
            None
        )));
        assert!(!shows_dispatched(&event(
            "scheduler",
            Failed,
            "failed",
            Some(streams::INTAKE)
        )));
    }
}
