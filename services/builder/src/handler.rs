//! One build request: authenticate to the build registry with the request's token, build and
//! push, record the image, and hand it to the indexer with the same token.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use imagemesh_proto::CONTENT_TYPE_PROTOBUF;
use imagemesh_proto::v1::{ContainerRequest, IndexRequest, RegistryCredential};
use imagemesh_registry::{RegistryClient, RegistryError, RegistrySettings};
use imagemesh_runtime::status::{StatusReporter, Step};
use imagemesh_runtime::worker::{Delivery, Handler, Outcome};
use imagemesh_runtime::{ErrorCode, Rejection, subjects, telemetry};
use oci_client::RegistryOperation;
use prost::Message;

/// The builder's work handler.
pub struct Builder {
    pub js: jetstream::Context,
    pub status: StatusReporter,
    pub registry: RegistrySettings,
}

impl Handler for Builder {
    type Request = ContainerRequest;

    fn request_id(request: &ContainerRequest) -> &str {
        &request.request_id
    }

    fn without_secrets(request: &ContainerRequest) -> ContainerRequest {
        request.without_secrets()
    }

    async fn handle(&self, request: ContainerRequest, _delivery: &Delivery) -> Outcome {
        match self.build(&request).await {
            Ok(()) => Outcome::Done,
            Err(outcome) => outcome,
        }
    }
}

/// The actions a credential was scoped to, e.g. "pull,push".
fn scope_actions(credential: &RegistryCredential) -> String {
    credential
        .scope
        .as_ref()
        .map(|s| s.actions.join(","))
        .unwrap_or_default()
}

fn registry_failure(err: RegistryError) -> Outcome {
    let retryable = err.is_retryable();
    Outcome::failed(Rejection::new(err.error_code(), err.to_string()), retryable)
}

impl Builder {
    async fn build(&self, request: &ContainerRequest) -> Result<(), Outcome> {
        let id = &request.request_id;
        let credential = request.build_registry_creds.as_ref().ok_or_else(|| {
            Outcome::Reject(Rejection::new(
                ErrorCode::NoCredentials,
                "request carries no build_registry_creds (the scheduler attaches them)",
            ))
        })?;
        let client = RegistryClient::new(&credential.registry, Some(credential), &self.registry);
        let target = client
            .reference(&request.build_image_ref)
            .map_err(registry_failure)?;
        client
            .check_access(&target, RegistryOperation::Push)
            .await
            .map_err(registry_failure)?;
        let step = Step::running(
            "authenticated",
            format!("build registry {} accepted the token", client.registry()),
        )
        .detail("registry", &credential.registry)
        .detail("username", &credential.username)
        .detail("actions", scope_actions(credential));
        self.status.report(id, step).await;

        self.request_index(request, String::new()).await?;
        let step = Step::running("index-requested", "image handed to the indexer")
            .detail("image_ref", &request.build_image_ref);
        self.status.report(id, step).await;
        Ok(())
    }

    /// Asks the indexer to index the pushed image, with the token that pushed it.
    async fn request_index(
        &self,
        request: &ContainerRequest,
        manifest_digest: String,
    ) -> Result<(), Outcome> {
        let index = IndexRequest {
            request_id: request.request_id.clone(),
            image_id: request.image_id.clone(),
            image_ref: request.build_image_ref.clone(),
            manifest_digest,
            credential: request.build_registry_creds.clone(),
            platform: String::new(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(subjects::CONTENT_TYPE_HEADER, CONTENT_TYPE_PROTOBUF);
        telemetry::inject(&mut headers);
        let message = PublishMessage::build()
            .payload(index.encode_to_vec().into())
            .headers(headers)
            .message_id(&request.request_id);
        let published = async {
            self.js
                .send_publish(subjects::INDEX, message)
                .await?
                .await?;
            Ok::<_, async_nats::Error>(())
        };
        published.await.map_err(|err| {
            Outcome::Retry(Rejection::new(
                ErrorCode::Internal,
                format!("could not publish the index request: {err}"),
            ))
        })
    }
}
