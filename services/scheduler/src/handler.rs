//! One intake request: enrich it, dispatch it, report it.

use imagemesh_proto::v1::{ContainerRequest, RequestKind};
use imagemesh_runtime::placement;
use imagemesh_runtime::status::{StatusReporter, Step};
use imagemesh_runtime::worker::{Delivery, Handler, Outcome};

use crate::dispatch::{Claim, Dispatcher};
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
        // Claiming the id and asking for credentials are independent round trips.
        let (claim, enriched) = tokio::join!(
            self.dispatcher.claim(&id, delivery.attempt),
            self.enricher.enrich(&mut request)
        );
        match claim {
            Ok(Claim::New) => {}
            Ok(Claim::Repeat) => {
                // A client retry of a request that went out already.
                tracing::info!(
                    request_id = id,
                    "request id seen before; not dispatched again"
                );
                return Outcome::Done;
            }
            Err(rejection) => return Outcome::Retry(rejection),
        }
        match enriched {
            Ok(()) => {}
            Err(EnrichError::Transient(rejection)) => return Outcome::Retry(rejection),
            Err(EnrichError::Permanent(rejection)) => {
                // Refused for good: free the id so a corrected request may use it again.
                self.dispatcher.release(&id).await;
                return Outcome::Reject(rejection);
            }
        }
        let kind = match request.kind() {
            RequestKind::Build => placement::BUILD,
            _ => placement::MOUNT,
        };
        let dispatched = match self.dispatcher.dispatch(kind, &request).await {
            Ok(dispatched) => dispatched,
            Err(rejection) => return Outcome::Retry(rejection),
        };
        // One event on the happy path; waits and retries report their own.
        let registry = &self.enricher.build_registry;
        let message = format!(
            "credentials attached for build registry {registry}; dispatched to {}",
            dispatched.subject
        );
        let step = Step::running("dispatched", message)
            .detail("subject", &dispatched.subject)
            .detail("worker", &dispatched.worker)
            .detail("build_image_ref", &request.build_image_ref)
            .detail("image_credentials", request.image_credentials.is_some())
            .detail(
                "base_image_credentials",
                request.base_image_credentials.len(),
            );
        self.status.report(&id, step).await;
        Outcome::Done
    }
}
