//! One runtime request: reach the image with the request's credentials.

use imagemesh_proto::v1::ContainerRequest;
use imagemesh_registry::{
    Reference, RegistryClient, RegistryError, RegistrySettings, credential_for,
};
use imagemesh_runtime::status::{StatusReporter, Step};
use imagemesh_runtime::worker::{Delivery, Handler, Outcome};
use imagemesh_runtime::{ErrorCode, Rejection};
use oci_client::RegistryOperation;

/// The mounter's work handler.
pub struct Mounter {
    pub status: StatusReporter,
    pub registry: RegistrySettings,
}

impl Handler for Mounter {
    type Request = ContainerRequest;

    fn request_id(request: &ContainerRequest) -> &str {
        &request.request_id
    }

    fn without_secrets(request: &ContainerRequest) -> ContainerRequest {
        request.without_secrets()
    }

    async fn handle(&self, request: ContainerRequest, _delivery: &Delivery) -> Outcome {
        match self.mount(&request).await {
            Ok(()) => Outcome::Done,
            Err(outcome) => outcome,
        }
    }
}

fn registry_failure(err: RegistryError) -> Outcome {
    let retryable = err.is_retryable();
    Outcome::failed(Rejection::new(err.error_code(), err.to_string()), retryable)
}

impl Mounter {
    async fn mount(&self, request: &ContainerRequest) -> Result<(), Outcome> {
        let image: Reference = request.image_ref.parse().map_err(|e| {
            Outcome::Reject(Rejection::new(
                ErrorCode::MalformedRequest,
                format!("invalid image_ref: {e}"),
            ))
        })?;
        let registry = image.registry().to_string();
        // The build-registry token when the image lives there (the token that pushed it).
        let credential = credential_for(request, &registry);
        let client = RegistryClient::new(&registry, credential, &self.registry);
        client
            .check_access(&image, RegistryOperation::Pull)
            .await
            .map_err(registry_failure)?;
        let how = if credential.is_some() {
            "with the request's credential"
        } else {
            "anonymously"
        };
        let mut step = Step::running(
            "authenticated",
            format!("registry {registry} reachable {how}"),
        );
        if let Some(credential) = credential {
            let actions = credential
                .scope
                .as_ref()
                .map(|s| s.actions.join(","))
                .unwrap_or_default();
            step = step
                .detail("registry", &credential.registry)
                .detail("username", &credential.username)
                .detail("actions", actions);
        }
        self.status.report(&request.request_id, step).await;
        let step = Step::succeeded("ready", "image ready to mount")
            .detail("image_ref", &request.image_ref);
        self.status.report(&request.request_id, step).await;
        Ok(())
    }
}
