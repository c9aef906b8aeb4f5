//! Poison messages: work that exhausted its consumer's `max_deliver` without ever being settled.
//!
//! The work loop ([`crate::worker`]) settles every outcome its handler returns, and turns a retry
//! on the last allowed delivery into a termination. What it cannot settle is a delivery whose
//! handler never returned: the process crashed (killed, out of memory, a panic that aborts) or
//! hung until `ack_wait` ran out. JetStream then stops redelivering the message after
//! `max_deliver` deliveries and says so once, in a core-NATS advisory
//! (`$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`) — but the message stays in
//! its work stream, tokens and all, and its request never ends.
//!
//! [`watch`] ends them: for each advisory it reads the message by its stream sequence, reports a
//! terminal `failed` status on the tenant and request the message carries, dead-letters it
//! without its secrets (the request type's own `without_secrets`), and deletes it from the
//! stream. Schedulers run it (see `docs/architecture.md`, Reliability, for why not the workers).
//! It is idempotent: schedulers share a queue group, a message already deleted is skipped, and
//! the status event and dead letter carry a message id of the stream and sequence, so a second
//! scheduler that handles the same advisory at the same time is de-duplicated by the server.

use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::RawMessageErrorKind};
use bytes::Bytes;
use futures::StreamExt;
use imagemesh_proto::{CONTENT_TYPE_PROTOBUF, RequestKey, TenantRequest, codec};
use prost::{Message, Name};
use serde::Deserialize;

use crate::status::{DeadLetterInfo, StatusReporter, Step};
use crate::{ErrorCode, Rejection, Shutdown, subjects};

/// Prefix of JetStream's max-deliveries advisories: `<prefix>.<stream>.<consumer>`.
pub const MAX_DELIVERIES_ADVISORY_PREFIX: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES";

/// The advisory subject of `consumer` (a durable name, or `*` for all) on `stream`.
pub fn advisory_subject(stream: &str, consumer: &str) -> String {
    format!("{MAX_DELIVERIES_ADVISORY_PREFIX}.{stream}.{consumer}")
}

/// What the server says when a consumer gives up on a message
/// (`io.nats.jetstream.advisory.v1.max_deliver`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct MaxDeliveries {
    pub stream: String,
    pub consumer: String,
    pub stream_seq: u64,
    pub deliveries: u64,
}

/// A poison message as a dead letter keeps it: whose it is, and its payload without secrets.
struct Scrubbed {
    /// `(tenant, request id)`, when something valid names them.
    key: Option<(String, String)>,
    payload: Bytes,
    content_type: String,
}

/// Decodes a payload: the request's tenant and id (when valid) and the request re-encoded
/// without its secrets; `None` when the payload is not a request.
type Scrub =
    dyn Fn(&Bytes, Option<&str>) -> Option<(Option<(String, String)>, Bytes)> + Send + Sync;

/// One work stream whose poison messages [`watch`] ends, and how to read its messages.
#[derive(Clone)]
pub struct PoisonQueue {
    pub stream: &'static str,
    /// The consumers whose advisories are heard: a durable name, or `*` for every consumer of
    /// the stream (the shared queue and each worker's own).
    pub consumers: String,
    /// The service that consumes the stream, named in the reason.
    pub consumed_by: &'static str,
    /// Whether an undecodable payload may be kept verbatim (the client intake only, as
    /// [`crate::worker::Handler::KEEP_UNDECODABLE_PAYLOAD`]).
    pub keep_undecodable: bool,
    scrub: Arc<Scrub>,
}

impl PoisonQueue {
    /// A stream of `R`, whose dead letters keep `without_secrets(request)`.
    pub fn of<R>(
        stream: &'static str,
        consumers: impl Into<String>,
        consumed_by: &'static str,
        without_secrets: fn(&R) -> R,
    ) -> Self
    where
        R: Message + Name + Default + TenantRequest + 'static,
    {
        let scrub = move |payload: &Bytes, content_type: Option<&str>| match codec::decode::<R>(
            payload,
            content_type,
        ) {
            Ok(request) => {
                let key = request.key();
                let key = key
                    .is_valid()
                    .then(|| (key.tenant.to_string(), key.id.to_string()));
                Some((key, without_secrets(&request).encode_to_vec().into()))
            }
            Err(_) => None,
        };
        Self {
            stream,
            consumers: consumers.into(),
            consumed_by,
            keep_undecodable: false,
            scrub: Arc::new(scrub),
        }
    }

    /// Keeps undecodable payloads verbatim (only where producers never put secrets in them).
    pub fn keeping_undecodable(mut self) -> Self {
        self.keep_undecodable = true;
        self
    }

    /// The request a stored message belongs to and its payload without secrets. The tenant and
    /// id come from the intake subject when the message has one (the subject is what the server
    /// let its client use), else from the payload, else from the `Nats-Msg-Id`.
    fn scrubbed(&self, subject: &str, payload: &Bytes, headers: &HeaderMap) -> Scrubbed {
        let content_type = headers
            .get(subjects::CONTENT_TYPE_HEADER)
            .map(|v| v.as_str().to_string());
        let decoded = (self.scrub)(payload, content_type.as_deref());
        let (from_payload, scrubbed) = match decoded.clone() {
            Some(decoded) => decoded,
            None if self.keep_undecodable => (None, payload.clone()),
            None => (None, Bytes::new()),
        };
        let decoded = decoded.is_some();
        let owned = |key: RequestKey<'_>| (key.tenant.to_string(), key.id.to_string());
        let message_id = headers.get("Nats-Msg-Id").map(|v| v.as_str().to_string());
        let key = subjects::parse_intake(subject)
            .filter(RequestKey::is_valid)
            .map(owned)
            .or(from_payload)
            .or_else(|| RequestKey::from_message_id(message_id.as_deref()?).map(owned));
        let content_type = match (decoded, content_type) {
            // A decoded request is kept re-encoded as protobuf.
            (true, _) | (false, None) => CONTENT_TYPE_PROTOBUF.to_string(),
            (false, Some(content_type)) => content_type,
        };
        Scrubbed {
            key,
            payload: scrubbed,
            content_type,
        }
    }
}

/// The reason reported for a message given up after `deliveries` deliveries.
pub fn reason(consumed_by: &str, deliveries: u64) -> String {
    format!(
        "gave up after {deliveries} deliveries: the {consumed_by}'s handler crashed or timed out \
         each time"
    )
}

/// Ends the poison messages of `queues` until `shutdown`: one queue-group subscription per
/// queue, shared by every instance of `status`'s service.
pub async fn watch(
    js: jetstream::Context,
    status: StatusReporter,
    queues: Vec<PoisonQueue>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let client = js.client();
    let group = format!("{}-poison", status.service());
    let mut subscriptions = Vec::with_capacity(queues.len());
    for (index, queue) in queues.iter().enumerate() {
        let subject = advisory_subject(queue.stream, &queue.consumers);
        let subscription = client
            .queue_subscribe(subject.clone(), group.clone())
            .await
            .map_err(|e| anyhow::anyhow!("subscribing to {subject}: {e}"))?;
        subscriptions.push(subscription.map(move |message| (index, message)));
    }
    let mut advisories = futures::stream::select_all(subscriptions);
    loop {
        let (index, message) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = advisories.next() => match next {
                Some(next) => next,
                None => return Ok(()),
            },
        };
        let queue = &queues[index];
        let advisory = match serde_json::from_slice::<MaxDeliveries>(&message.payload) {
            Ok(advisory) if advisory.stream == queue.stream => advisory,
            Ok(other) => {
                tracing::warn!(stream = %other.stream, "max-deliveries advisory for another stream");
                continue;
            }
            Err(err) => {
                tracing::warn!(subject = %message.subject, error = %err, "unreadable max-deliveries advisory");
                continue;
            }
        };
        if let Err(err) = settle(&js, &status, queue, &advisory).await {
            tracing::error!(
                stream = %advisory.stream,
                sequence = advisory.stream_seq,
                error = %err,
                "could not end a poison message"
            );
        }
    }
}

/// Fails, dead-letters and deletes the message of one advisory. A message already gone (another
/// scheduler ended it, or it was settled after all) is left alone.
pub async fn settle(
    js: &jetstream::Context,
    status: &StatusReporter,
    queue: &PoisonQueue,
    advisory: &MaxDeliveries,
) -> anyhow::Result<()> {
    let stream = js.get_stream_no_info(queue.stream).await?;
    let sequence = advisory.stream_seq;
    let message = match stream.get_raw_message(sequence).await {
        Ok(message) => message,
        Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => {
            tracing::debug!(
                stream = queue.stream,
                sequence,
                "poison message already gone"
            );
            return Ok(());
        }
        Err(err) => anyhow::bail!("reading message {sequence} of {}: {err}", queue.stream),
    };
    let subject = message.subject.to_string();
    let scrubbed = queue.scrubbed(&subject, &message.payload, &message.headers);
    let (tenant, id) = scrubbed.key.clone().unwrap_or_default();
    let request = RequestKey::new(&tenant, &id);
    let rejection = Rejection::new(
        ErrorCode::Internal,
        reason(queue.consumed_by, advisory.deliveries),
    );
    tracing::warn!(
        %request,
        stream = queue.stream,
        consumer = %advisory.consumer,
        sequence,
        deliveries = advisory.deliveries,
        "poison message: failing and dead-lettering it"
    );
    // The same id for the same message, whichever scheduler reports it.
    let once = format!("max-deliveries.{}.{sequence}", queue.stream);
    if scrubbed.key.is_some() {
        let step = Step::failed(&rejection)
            .detail("stream", queue.stream)
            .detail("consumer", &advisory.consumer)
            .detail("deliveries", advisory.deliveries);
        status
            .report_once(request, step, &once)
            .await
            .map_err(|e| anyhow::anyhow!("reporting {request} failed: {e}"))?;
    }
    let info = DeadLetterInfo {
        subject: &subject,
        request,
        deliveries: advisory.deliveries,
        content_type: &scrubbed.content_type,
    };
    status
        .dead_letter_once(info, &rejection, scrubbed.payload, &once)
        .await
        .map_err(|e| anyhow::anyhow!("dead-lettering {request}: {e}"))?;
    match stream.delete_message(sequence).await {
        Ok(_) => Ok(()),
        // Deleted in the meantime (another scheduler): what we wanted.
        Err(_)
            if matches!(
                stream.get_raw_message(sequence).await,
                Err(ref e) if e.kind() == RawMessageErrorKind::NoMessageFound
            ) =>
        {
            Ok(())
        }
        Err(err) => anyhow::bail!("deleting message {sequence} of {}: {err}", queue.stream),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imagemesh_proto::v1::{BuildOptions, ContainerRequest, RegistryCredential};

    #[test]
    fn advisories_parse() {
        let payload = br#"{"type":"io.nats.jetstream.advisory.v1.max_deliver","id":"x",
            "timestamp":"2024-01-01T00:00:00Z","stream":"IMAGEMESH_BUILD","consumer":"builder",
            "stream_seq":7,"deliveries":3}"#;
        let advisory: MaxDeliveries = serde_json::from_slice(payload).unwrap();
        assert_eq!(
            advisory,
            MaxDeliveries {
                stream: "IMAGEMESH_BUILD".into(),
                consumer: "builder".into(),
                stream_seq: 7,
                deliveries: 3,
            }
        );
        assert_eq!(
            advisory_subject("IMAGEMESH_BUILD", "*"),
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.IMAGEMESH_BUILD.*"
        );
    }

    fn credential(secret: &str) -> Option<RegistryCredential> {
        Some(RegistryCredential {
            secret: secret.into(),
            ..Default::default()
        })
    }

    #[test]
    fn poison_messages_are_kept_without_secrets_under_their_request() {
        let queue = PoisonQueue::of(
            "IMAGEMESH_BUILD",
            "*",
            "builder",
            ContainerRequest::without_secrets,
        );
        let request = ContainerRequest {
            request_id: "r1".into(),
            tenant: "team-a".into(),
            build_registry_creds: credential("s-build"),
            image_credentials: credential("s-image"),
            base_image_credentials: vec![credential("s-base").unwrap()],
            build_options: Some(BuildOptions {
                build_args: [("TOKEN".to_string(), "s-arg".to_string())].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let payload: Bytes = request.encode_to_vec().into();
        let scrubbed = queue.scrubbed("imagemesh.work.build", &payload, &HeaderMap::new());
        assert_eq!(scrubbed.key, Some(("team-a".into(), "r1".into())));
        let kept = ContainerRequest::decode(scrubbed.payload.as_ref()).unwrap();
        assert_eq!(kept, request.without_secrets());
        let text = String::from_utf8_lossy(&scrubbed.payload);
        for secret in ["s-build", "s-image", "s-base", "s-arg"] {
            assert!(!text.contains(secret), "{secret} kept");
        }

        // Undecodable work is dropped, and found by its message id.
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "team-b.r2");
        let garbage = Bytes::from_static(b"\xff\xff\xff secret");
        let scrubbed = queue.scrubbed("imagemesh.work.build", &garbage, &headers);
        assert_eq!(scrubbed.key, Some(("team-b".into(), "r2".into())));
        assert!(scrubbed.payload.is_empty());

        // The intake's subject names the request, whatever the payload says.
        let intake = queue.clone().keeping_undecodable();
        let scrubbed = intake.scrubbed("imagemesh.intake.team-c.r3", &garbage, &HeaderMap::new());
        assert_eq!(scrubbed.key, Some(("team-c".into(), "r3".into())));
        assert_eq!(scrubbed.payload, garbage);
    }
}
