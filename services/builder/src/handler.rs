//! One build request: authenticate to the build registry with the request's token, skip work
//! already done, build (Dockerfile) or copy (source image) and push, record the image, and hand
//! it to the indexer with the same token.

use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use imagemesh_proto::v1::{ContainerRequest, IndexRequest, RegistryCredential};
use imagemesh_proto::{CONTENT_TYPE_PROTOBUF, TenantRequest};
use imagemesh_registry::{Access, RegistryClient, credential_for};
use imagemesh_runtime::status::{StatusReporter, Step};
use imagemesh_runtime::worker::{Delivery, Handler, Outcome};
use imagemesh_runtime::{ErrorCode, subjects, telemetry};
use oci_client::RegistryOperation;
use prost::Message;

use crate::config::BuilderConfig;
use crate::context;
use crate::copy::ImageCopy;
use crate::dockerfile::DockerfileBuild;
use crate::failure::Failure;
use crate::log::BuildLog;
use crate::records::{self, Records};
use crate::sandbox::Sandbox;

/// The builder's work handler.
pub struct Builder {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub status: StatusReporter,
    pub settings: BuilderConfig,
    pub records: Records,
    pub sandbox: Arc<Sandbox>,
}

impl Handler for Builder {
    type Request = ContainerRequest;

    fn without_secrets(request: &ContainerRequest) -> ContainerRequest {
        request.without_secrets()
    }

    async fn handle(&self, request: ContainerRequest, _delivery: &Delivery) -> Outcome {
        match self.build(&request).await {
            Ok(()) => Outcome::Done,
            Err(failure) => failure.into(),
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

fn secrets(request: &ContainerRequest) -> Vec<String> {
    request.credentials().map(|c| c.secret.clone()).collect()
}

impl Builder {
    async fn build(&self, request: &ContainerRequest) -> Result<(), Failure> {
        let id = request.key();
        let credential = request.build_registry_creds.as_ref().ok_or_else(|| {
            Failure::reject(
                ErrorCode::NoCredentials,
                "request carries no build_registry_creds (the scheduler attaches them)",
            )
        })?;
        let client = RegistryClient::new(
            &credential.registry,
            Some(credential),
            &self.settings.registry,
        );
        let target = client.reference(&request.build_image_ref)?;
        let access = client
            .check_access(&target, RegistryOperation::Push)
            .await?;
        let step = Step::running(
            "authenticated",
            format!("build registry {} accepted the token", client.registry()),
        )
        .detail("registry", &credential.registry)
        .detail("username", &credential.username)
        .detail("scheme", credential.scheme_name())
        .detail("actions", scope_actions(credential));
        self.status.report(id, step).await;

        let existing = match &access {
            Access::Manifest(digest) => Some(digest.as_str()),
            Access::NoManifest => None,
        };
        let build_key = self.build_key(request).await?;
        let digest = match self.records.get(&request.tenant, &request.image_id).await? {
            Some(record)
                if records::already_pushed(
                    &record,
                    &request.build_image_ref,
                    &build_key,
                    existing,
                ) =>
            {
                let step = Step::running(
                    "already-built",
                    "image already pushed from the same content; not rebuilt",
                )
                .detail("image_ref", &record.image_ref)
                .detail("digest", &record.manifest_digest)
                .detail("build_key", &build_key);
                self.status.report(id, step).await;
                record.manifest_digest
            }
            _ => {
                self.build_and_push(request, &client, &target, &build_key)
                    .await?
            }
        };
        self.request_index(request, digest).await?;
        let step = Step::running("index-requested", "image handed to the indexer")
            .detail("image_ref", &request.build_image_ref);
        self.status.report(id, step).await;
        Ok(())
    }

    /// What the request builds from ([`records::build_key`]), with its context's content digest.
    async fn build_key(&self, request: &ContainerRequest) -> Result<String, Failure> {
        let options = request.build_options.clone().unwrap_or_default();
        let context = if options.dockerfile.is_empty() || options.context_object.is_empty() {
            None
        } else {
            context::digest(&self.js, &request.tenant, &options.context_object).await?
        };
        Ok(records::build_key(request, context.as_deref()))
    }

    /// Builds or copies, pushes, and records the tenant's image id -> reference + digest +
    /// build key.
    async fn build_and_push(
        &self,
        request: &ContainerRequest,
        client: &RegistryClient,
        target: &imagemesh_registry::Reference,
        build_key: &str,
    ) -> Result<String, Failure> {
        let options = request.build_options.clone().unwrap_or_default();
        let log = BuildLog::new(self.client.clone(), request.key(), secrets(request));
        let digest = if !options.dockerfile.is_empty() {
            let build = DockerfileBuild {
                settings: &self.settings,
                sandbox: &self.sandbox,
                js: &self.js,
                status: &self.status,
                log: &log,
                request,
                target_client: client,
                target,
            };
            build.run().await?
        } else if !options.source_image.is_empty() {
            // A copy is bounded like a build: a stalled source registry hands the request back.
            let limit = self.settings.timeout(options.timeout_seconds);
            let copying = self.copy_source(request, &options.source_image, client, target, &log);
            tokio::time::timeout(limit, copying).await.map_err(|_| {
                Failure::retry(
                    ErrorCode::RegistryUnavailable,
                    format!(
                        "copying {} took longer than {limit:?}",
                        options.source_image
                    ),
                )
            })??
        } else {
            return Err(Failure::reject(
                ErrorCode::MalformedRequest,
                "a build needs build_options.dockerfile or build_options.source_image",
            ));
        };
        let step = Step::running("pushed", format!("pushed {}", request.build_image_ref))
            .detail("image_ref", &request.build_image_ref)
            .detail("digest", &digest);
        self.status.report(request.key(), step).await;
        self.records
            .put(
                &request.tenant,
                &request.image_id,
                &request.build_image_ref,
                &digest,
                build_key,
            )
            .await?;
        let step = Step::running("recorded", format!("image {} recorded", request.image_id))
            .detail("build_key", build_key);
        self.status.report(request.key(), step).await;
        Ok(digest)
    }

    async fn copy_source(
        &self,
        request: &ContainerRequest,
        source_image: &str,
        target_client: &RegistryClient,
        target: &imagemesh_registry::Reference,
        log: &BuildLog,
    ) -> Result<String, Failure> {
        let source = imagemesh_registry::parse_reference(source_image).map_err(|e| {
            Failure::reject(
                ErrorCode::MalformedRequest,
                format!("invalid source_image {source_image:?}: {e}"),
            )
        })?;
        let registry = source.registry().to_string();
        let source_client = RegistryClient::new(
            &registry,
            credential_for(request, &registry),
            &self.settings.registry,
        );
        let step = Step::running("copying", format!("copying {source_image}"));
        self.status.report(request.key(), step).await;
        let copy = ImageCopy {
            source: &source_client,
            target: target_client,
            log,
        };
        let copied = copy.copy(&source, target).await?;
        log.line(&format!(
            "copied {source_image}: {} blobs mounted, {} streamed, {} already present",
            copied.mounted, copied.streamed, copied.present
        ))
        .await;
        Ok(copied.digest)
    }

    /// Asks the indexer to index the pushed image, with the token that pushed it.
    async fn request_index(
        &self,
        request: &ContainerRequest,
        manifest_digest: String,
    ) -> Result<(), Failure> {
        let index = IndexRequest {
            request_id: request.request_id.clone(),
            image_id: request.image_id.clone(),
            image_ref: request.build_image_ref.clone(),
            manifest_digest,
            credential: request.build_registry_creds.clone(),
            platform: String::new(),
            tenant: request.tenant.clone(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(subjects::CONTENT_TYPE_HEADER, CONTENT_TYPE_PROTOBUF);
        telemetry::inject(&mut headers);
        // `<tenant>.<request id>` is the message id: a redelivered build hands off once, and
        // another tenant's request of the same id is handed off too.
        let message = PublishMessage::build()
            .payload(index.encode_to_vec().into())
            .headers(headers)
            .message_id(request.key().message_id());
        let published = async {
            self.js
                .send_publish(subjects::INDEX, message)
                .await?
                .await?;
            Ok::<_, async_nats::Error>(())
        };
        published
            .await
            .map_err(|err| Failure::internal(format!("could not publish the index request: {err}")))
    }
}
