//! One intake request: enrich it, dispatch it, report it.

use imagemesh_proto::v1::{ContainerRequest, RequestKind};
use imagemesh_runtime::placement;
use imagemesh_runtime::status::{StatusReporter, Step};
use imagemesh_runtime::worker::{Delivery, Handler, Outcome};

use crate::dispatch::Dispatcher;
use crate::enrich::{EnrichError, Enricher};

/// The scheduler's intake handler.
pub struct Scheduler {
    pub enricher: Enricher,
    pub dispatcher: Dispatcher,
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
        match self.dispatcher.earlier(&id).await {
            Ok(Some(record)) => {
                // A client retry or a redelivery after a crash: it went out already.
                tracing::info!(
                    request_id = id,
                    subject = record.subject,
                    "already dispatched"
                );
                return Outcome::Done;
            }
            Ok(None) => {}
            Err(rejection) => return Outcome::Retry(rejection),
        }
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
        let registry = &self.enricher.build_registry;
        let step = Step::running(
            "credentials-attached",
            format!("credentials attached for build registry {registry}"),
        )
        .detail("image_credentials", request.image_credentials.is_some());
        self.status.report(&id, step).await;
        let kind = match request.kind() {
            RequestKind::Build => placement::BUILD,
            _ => placement::MOUNT,
        };
        let dispatched = match self.dispatcher.dispatch(kind, &request).await {
            Ok(dispatched) => dispatched,
            Err(rejection) => return Outcome::Retry(rejection),
        };
        let step = Step::running(
            "dispatched",
            format!("dispatched to {}", dispatched.subject),
        )
        .detail("subject", &dispatched.subject)
        .detail("worker", &dispatched.worker)
        .detail("build_image_ref", &request.build_image_ref);
        self.status.report(&id, step).await;
        Outcome::Done
    }
}
