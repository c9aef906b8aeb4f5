//! Status events and dead letters.
//!
//! Every step of a request is a [`StatusEvent`] on `imagemesh.status.<tenant>.<request_id>` (a
//! JetStream stream, so `imagemesh watch` can replay what happened before it started; the tenant
//! in the subject lets NATS permissions show each tenant its own requests only). Work a service
//! gives up on goes, without its secrets, to `imagemesh.deadletter.<service>`.

use std::collections::HashMap;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use imagemesh_proto::RequestKey;
use imagemesh_proto::v1::{DeadLetter, ErrorCode, RequestState, StatusEvent};
use prost::Message;

use crate::{Rejection, subjects, telemetry};

/// The current time as a protobuf timestamp.
pub fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}

/// Publishes the status events and dead letters of one service.
#[derive(Clone)]
pub struct StatusReporter {
    js: jetstream::Context,
    service: &'static str,
    /// The instance (worker id) that reports, when it has one.
    instance: Option<String>,
}

/// One step to report. Build with [`Step::running`], [`Step::succeeded`], ...
#[derive(Debug, Clone)]
pub struct Step {
    pub state: RequestState,
    pub phase: &'static str,
    pub message: String,
    pub error_code: ErrorCode,
    pub details: HashMap<String, String>,
}

impl Step {
    fn new(state: RequestState, phase: &'static str, message: impl Into<String>) -> Self {
        Self {
            state,
            phase,
            message: message.into(),
            error_code: ErrorCode::Unspecified,
            details: HashMap::new(),
        }
    }

    pub fn pending(phase: &'static str, message: impl Into<String>) -> Self {
        Self::new(RequestState::Pending, phase, message)
    }

    pub fn running(phase: &'static str, message: impl Into<String>) -> Self {
        Self::new(RequestState::Running, phase, message)
    }

    pub fn succeeded(phase: &'static str, message: impl Into<String>) -> Self {
        Self::new(RequestState::Succeeded, phase, message)
    }

    pub fn failed(rejection: &Rejection) -> Self {
        Self {
            error_code: rejection.code,
            ..Self::new(RequestState::Failed, "failed", rejection.message.clone())
        }
    }

    pub fn detail(mut self, key: &str, value: impl ToString) -> Self {
        self.details.insert(key.to_string(), value.to_string());
        self
    }
}

/// What a dead letter records besides the payload.
#[derive(Debug, Clone)]
pub struct DeadLetterInfo<'a> {
    pub subject: &'a str,
    /// The request's tenant and id; either may be empty when nothing valid names them.
    pub request: RequestKey<'a>,
    pub deliveries: u64,
    pub content_type: &'a str,
}

impl StatusReporter {
    pub fn new(js: jetstream::Context, service: &'static str) -> Self {
        Self {
            js,
            service,
            instance: None,
        }
    }

    /// Adds `details["worker"] = instance` to every event this reporter publishes.
    pub fn with_instance(mut self, instance: &str) -> Self {
        self.instance = Some(instance.to_string());
        self
    }

    pub fn service(&self) -> &'static str {
        self.service
    }

    /// Publishes one status event for `request`, on its tenant's status subject.
    pub async fn report(&self, request: RequestKey<'_>, step: Step) {
        let state = step.state;
        let subject = subjects::status(request);
        let payload = self.event(request, step).encode_to_vec().into();
        let published = match state {
            RequestState::Succeeded | RequestState::Failed => self.publish(subject, payload).await,
            _ => self.publish_progress(subject, payload).await,
        };
        if let Err(err) = published {
            // A lost status event must not fail the work itself; say so loudly instead.
            tracing::error!(%request, error = %err, "could not publish status event");
        }
    }

    /// Publishes a status event with message id `once` and waits until the stream stored it:
    /// whoever publishes the same event under the same id within the stream's duplicate window
    /// stores it once.
    pub async fn report_once(
        &self,
        request: RequestKey<'_>,
        step: Step,
        once: &str,
    ) -> Result<(), async_nats::Error> {
        let subject = subjects::status(request);
        let payload = self.event(request, step).encode_to_vec().into();
        self.publish_confirmed(subject, payload, Some(once)).await
    }

    /// Publishes a status event and waits until the stream stored it: for an event others
    /// decide by (the scheduler's `dispatched`), which must outlive a crash of whoever sent it.
    pub async fn report_confirmed(
        &self,
        request: RequestKey<'_>,
        step: Step,
    ) -> Result<(), async_nats::Error> {
        let subject = subjects::status(request);
        let payload = self.event(request, step).encode_to_vec().into();
        self.publish_confirmed(subject, payload, None).await
    }

    fn event(&self, request: RequestKey<'_>, mut step: Step) -> StatusEvent {
        if let Some(instance) = &self.instance {
            step.details.insert("worker".into(), instance.clone());
        }
        StatusEvent {
            request_id: request.id.to_string(),
            tenant: request.tenant.to_string(),
            service: self.service.to_string(),
            state: step.state as i32,
            phase: step.phase.to_string(),
            message: step.message,
            error_code: step.error_code as i32,
            at: Some(now()),
            details: step.details,
        }
    }

    /// Publishes a dead letter. `payload` must already be free of secrets.
    pub async fn dead_letter(
        &self,
        info: DeadLetterInfo<'_>,
        rejection: &Rejection,
        payload: Bytes,
    ) {
        let request = info.request;
        let letter = self.letter(info, rejection, payload);
        let subject = subjects::dead_letter(self.service);
        if let Err(err) = self.publish(subject, letter.encode_to_vec().into()).await {
            tracing::error!(%request, error = %err, "could not publish dead letter");
        }
    }

    /// Like [`StatusReporter::dead_letter`], with message id `once`, waiting until the stream
    /// stored it (see [`StatusReporter::report_once`]).
    pub async fn dead_letter_once(
        &self,
        info: DeadLetterInfo<'_>,
        rejection: &Rejection,
        payload: Bytes,
        once: &str,
    ) -> Result<(), async_nats::Error> {
        let letter = self.letter(info, rejection, payload);
        let subject = subjects::dead_letter(self.service);
        self.publish_confirmed(subject, letter.encode_to_vec().into(), Some(once))
            .await
    }

    fn letter(
        &self,
        info: DeadLetterInfo<'_>,
        rejection: &Rejection,
        payload: Bytes,
    ) -> DeadLetter {
        DeadLetter {
            service: self.service.to_string(),
            subject: info.subject.to_string(),
            request_id: info.request.id.to_string(),
            tenant: info.request.tenant.to_string(),
            reason: rejection.message.clone(),
            error_code: rejection.code as i32,
            deliveries: info.deliveries,
            at: Some(now()),
            payload: payload.to_vec(),
            content_type: info.content_type.to_string(),
        }
    }

    /// Publishes a progress event without waiting for JetStream's acknowledgement (the stream
    /// stores it all the same; events of one request keep their order on one connection).
    async fn publish_progress(
        &self,
        subject: String,
        payload: Bytes,
    ) -> Result<(), async_nats::Error> {
        let mut headers = HeaderMap::new();
        telemetry::inject(&mut headers);
        self.js
            .client()
            .publish_with_headers(subject, headers, payload)
            .await?;
        Ok(())
    }

    /// Publishes an event that must not be lost (a final state, a dead letter) and confirms the
    /// store in the background, so the work path does not wait a round trip.
    async fn publish(&self, subject: String, payload: Bytes) -> Result<(), async_nats::Error> {
        let ack = self.send(subject.clone(), payload, None).await?;
        tokio::spawn(async move {
            if let Err(err) = ack.await {
                tracing::error!(subject, error = %err, "status event not stored");
            }
        });
        Ok(())
    }

    /// Publishes (with message id `once`, if given) and waits for the stream's acknowledgement.
    async fn publish_confirmed(
        &self,
        subject: String,
        payload: Bytes,
        once: Option<&str>,
    ) -> Result<(), async_nats::Error> {
        self.send(subject, payload, once).await?.await?;
        Ok(())
    }

    async fn send(
        &self,
        subject: String,
        payload: Bytes,
        once: Option<&str>,
    ) -> Result<jetstream::context::PublishAckFuture, async_nats::Error> {
        let mut headers = HeaderMap::new();
        telemetry::inject(&mut headers);
        let mut publish = PublishMessage::build().payload(payload).headers(headers);
        if let Some(id) = once {
            publish = publish.message_id(id);
        }
        Ok(self.js.send_publish(subject, publish).await?)
    }
}
