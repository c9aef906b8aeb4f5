//! One index request: read the pushed image with the token that pushed it.

use imagemesh_proto::v1::IndexRequest;
use imagemesh_registry::{RegistryClient, RegistryError, RegistrySettings};
use imagemesh_runtime::status::{StatusReporter, Step};
use imagemesh_runtime::worker::{Delivery, Handler, Outcome};
use imagemesh_runtime::{ErrorCode, Rejection};
use oci_client::RegistryOperation;

/// The indexer's work handler.
pub struct Indexer {
    pub status: StatusReporter,
    pub registry: RegistrySettings,
}

impl Handler for Indexer {
    type Request = IndexRequest;

    fn request_id(request: &IndexRequest) -> &str {
        &request.request_id
    }

    fn without_secrets(request: &IndexRequest) -> IndexRequest {
        request.without_secrets()
    }

    async fn handle(&self, request: IndexRequest, _delivery: &Delivery) -> Outcome {
        match self.index(&request).await {
            Ok(()) => Outcome::Done,
            Err(outcome) => outcome,
        }
    }
}

fn registry_failure(err: RegistryError) -> Outcome {
    let retryable = err.is_retryable();
    Outcome::failed(Rejection::new(err.error_code(), err.to_string()), retryable)
}

impl Indexer {
    async fn index(&self, request: &IndexRequest) -> Result<(), Outcome> {
        let credential = request.credential.as_ref().ok_or_else(|| {
            Outcome::Reject(Rejection::new(
                ErrorCode::NoCredentials,
                "index request carries no credential",
            ))
        })?;
        let client = RegistryClient::new(&credential.registry, Some(credential), &self.registry);
        let image = client
            .reference(&request.image_ref)
            .map_err(registry_failure)?;
        client
            .check_access(&image, RegistryOperation::Pull)
            .await
            .map_err(registry_failure)?;
        let step = Step::running(
            "authenticated",
            format!("registry {} accepted the token", client.registry()),
        );
        self.status.report(&request.request_id, step).await;
        let step =
            Step::succeeded("indexed", "image indexed").detail("image_ref", &request.image_ref);
        self.status.report(&request.request_id, step).await;
        Ok(())
    }
}
