//! One intake request: enrich it, dispatch it, report it.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use imagemesh_proto::CONTENT_TYPE_PROTOBUF;
use imagemesh_proto::v1::{ContainerRequest, RequestKind};
use imagemesh_runtime::status::{StatusReporter, Step};
use imagemesh_runtime::worker::{Delivery, Handler, Outcome};
use imagemesh_runtime::{ErrorCode, Rejection, subjects, telemetry};
use prost::Message;

use crate::enrich::{EnrichError, Enricher};

/// The scheduler's intake handler.
pub struct Scheduler {
    pub enricher: Enricher,
    pub js: jetstream::Context,
    pub status: StatusReporter,
}

impl Handler for Scheduler {
    type Request = ContainerRequest;

    // Clients never put secrets in intake payloads, so undecodable ones are kept for diagnosis.
    const KEEP_UNDECODABLE_PAYLOAD: bool = true;

    fn request_id(request: &ContainerRequest) -> &str {
        &request.request_id
    }

    fn without_secrets(request: &ContainerRequest) -> ContainerRequest {
        request.without_secrets()
    }

    async fn handle(&self, mut request: ContainerRequest, delivery: &Delivery) -> Outcome {
        let id = request.request_id.clone();
        if delivery.attempt == 1 {
            self.status
                .report(
                    &id,
                    Step::pending("accepted", "request accepted by the scheduler"),
                )
                .await;
        }
        match self.enricher.enrich(&mut request).await {
            Ok(()) => {}
            Err(EnrichError::Transient(rejection)) => return Outcome::Retry(rejection),
            Err(EnrichError::Permanent(rejection)) => return Outcome::Reject(rejection),
        }
        let registry = self.enricher.build_registry.clone();
        self.status
            .report(
                &id,
                Step::running(
                    "credentials-attached",
                    format!("credentials attached for build registry {registry}"),
                ),
            )
            .await;
        let subject = match request.kind() {
            RequestKind::Build => subjects::BUILD,
            _ => subjects::MOUNT,
        };
        if let Err(err) = self.dispatch(subject, &request).await {
            let rejection = Rejection::new(
                ErrorCode::Internal,
                format!("could not dispatch to {subject}: {err}"),
            );
            return Outcome::Retry(rejection);
        }
        let step = Step::running("dispatched", format!("dispatched to {subject}"))
            .detail("subject", subject)
            .detail("build_image_ref", &request.build_image_ref);
        self.status.report(&id, step).await;
        Outcome::Done
    }
}

impl Scheduler {
    /// Publishes the enriched request and waits for JetStream to store it. The request id is the
    /// message id, so a redelivered intake message is dispatched once within the dedupe window.
    async fn dispatch(
        &self,
        subject: &str,
        request: &ContainerRequest,
    ) -> Result<(), async_nats::Error> {
        let mut headers = HeaderMap::new();
        headers.insert(subjects::CONTENT_TYPE_HEADER, CONTENT_TYPE_PROTOBUF);
        telemetry::inject(&mut headers);
        let message = PublishMessage::build()
            .payload(request.encode_to_vec().into())
            .headers(headers)
            .message_id(&request.request_id);
        let ack = self
            .js
            .send_publish(subject.to_string(), message)
            .await?
            .await?;
        if ack.duplicate {
            tracing::info!(
                request_id = request.request_id,
                "already dispatched; not dispatching again"
            );
        }
        Ok(())
    }
}
