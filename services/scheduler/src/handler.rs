//! One intake request: enrich it, dispatch it, report it.

use imagemesh_proto::v1::{ContainerRequest, RequestKind};
use imagemesh_proto::{RequestKey, TenantRequest};
use imagemesh_runtime::status::{StatusReporter, Step};
use imagemesh_runtime::worker::{Delivery, Handler, Outcome};
use imagemesh_runtime::{ErrorCode, Rejection, placement};

use imagemesh_runtime::subjects;

use crate::dispatch::{DISPATCHED, Dispatcher};
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

    // The intake subject names the tenant (the NATS server decides who may publish there): the
    // work loop binds the request to it before `handle` runs.
    fn key_of_subject(subject: &str) -> Option<RequestKey<'_>> {
        subjects::parse_intake(subject)
    }

    fn without_secrets(request: &ContainerRequest) -> ContainerRequest {
        request.without_secrets()
    }

    // A request reaches this handler once: the intake holds one message per tenant and id (a
    // client's second submission is refused by the server). A redelivery after a crash
    // publishes with the same message id (`<tenant>.<request id>`), which the work stream
    // stores once while it holds the first; one the server handed over again after losing
    // its acks is caught by the request's `dispatched` event (see `dispatch`).
    async fn handle(&self, mut request: ContainerRequest, delivery: &Delivery) -> Outcome {
        if let Some(stored) = delivery
            .published
            .filter(|stored| delivery.attempt > 1 || self.dispatcher.connection.predates(*stored))
        {
            match self
                .dispatcher
                .already_dispatched(request.key(), stored)
                .await
            {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!(
                        request = %request.key(),
                        "dispatched before this delivery; not dispatched again"
                    );
                    return Outcome::Done;
                }
                Err(rejection) => return Outcome::Retry(rejection),
            }
        }
        match self.enricher.enrich(&mut request).await {
            Ok(()) => {}
            Err(EnrichError::Transient(rejection)) => return Outcome::Retry(rejection),
            // Refused for good; the worker deletes the intake message, so a corrected request
            // may use the id again.
            Err(EnrichError::Permanent(rejection)) => return Outcome::Reject(rejection),
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
        let mut message = format!(
            "credentials attached for build registry {registry}; dispatched to {}",
            dispatched.subject
        );
        let long_term = long_term_registries(&request);
        if !long_term.is_empty() {
            message.push_str(&format!(
                "; carries the long-term secret of {} (share_long_term_secret)",
                long_term.join(", ")
            ));
        }
        let step = Step::running(DISPATCHED, message)
            .detail("long_term_secrets", long_term.join(","))
            .detail("subject", &dispatched.subject)
            .detail("worker", &dispatched.worker)
            .detail("build_image_ref", &request.build_image_ref)
            .detail("image_credentials", request.image_credentials.is_some())
            .detail(
                "base_image_credentials",
                request.base_image_credentials.len(),
            );
        // Confirmed before the intake message is acked: a later delivery of it decides by
        // this event. Should it not be stored, the request is retried and the work stream's
        // de-duplication keeps the copy out while the worker has not taken the first.
        if let Err(err) = self.status.report_confirmed(request.key(), step).await {
            return Outcome::Retry(Rejection::new(
                ErrorCode::Internal,
                format!("dispatched, but the dispatched event was not stored: {err}"),
            ));
        }
        Outcome::Done
    }
}

/// Registries whose long-term secret (rather than a minted token) the request carries: each
/// handed out only because its entry at the credential service opted in.
fn long_term_registries(request: &ContainerRequest) -> Vec<String> {
    let mut registries: Vec<String> = request
        .build_registry_creds
        .iter()
        .chain(&request.image_credentials)
        .chain(&request.base_image_credentials)
        .filter(|credential| credential.long_term)
        .map(|credential| credential.registry.clone())
        .collect();
    registries.sort();
    registries.dedup();
    registries
}
