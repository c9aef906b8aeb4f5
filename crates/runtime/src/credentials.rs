//! Asking the credential service for a token (the scheduler mints, the mounter refreshes).

use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::{Client, HeaderMap};
use imagemesh_proto::CONTENT_TYPE_PROTOBUF;
use imagemesh_proto::v1::{TokenRequest, TokenResponse};
use prost::Message;

use crate::{ErrorCode, Rejection, subjects, telemetry};

/// Why no token came back.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    /// Nobody answered in time: the credential service is down or overloaded. Retry later.
    #[error("credential service unavailable: {0}")]
    Unavailable(String),
    /// The service answered with a refusal.
    #[error("{0}")]
    Refused(Rejection),
}

impl CredentialError {
    /// The refusal as a request would report it.
    pub fn to_rejection(&self) -> Rejection {
        match self {
            CredentialError::Unavailable(_) => {
                Rejection::new(ErrorCode::CredentialUnavailable, self.to_string())
            }
            CredentialError::Refused(rejection) => rejection.clone(),
        }
    }
}

/// A client of the credential service endpoints.
#[derive(Clone)]
pub struct CredentialClient {
    client: Client,
    timeout: Duration,
}

impl CredentialClient {
    pub fn new(client: Client, timeout: Duration) -> Self {
        Self { client, timeout }
    }

    /// A token for any allowed scope (`imagemesh.credential.mint`).
    pub async fn mint(&self, request: &TokenRequest) -> Result<TokenResponse, CredentialError> {
        self.call(subjects::CREDENTIAL_MINT, request).await
    }

    /// A pull-only token (`imagemesh.credential.refresh`).
    pub async fn refresh(&self, request: &TokenRequest) -> Result<TokenResponse, CredentialError> {
        self.call(subjects::CREDENTIAL_REFRESH, request).await
    }

    #[tracing::instrument(name = "credential request", skip_all, fields(subject, registry = %request.registry))]
    async fn call(
        &self,
        subject: &'static str,
        request: &TokenRequest,
    ) -> Result<TokenResponse, CredentialError> {
        tracing::Span::current().record("subject", subject);
        let mut headers = HeaderMap::new();
        headers.insert(subjects::CONTENT_TYPE_HEADER, CONTENT_TYPE_PROTOBUF);
        telemetry::inject(&mut headers);
        let call =
            self.client
                .request_with_headers(subject, headers, request.encode_to_vec().into());
        let reply = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => {
                return Err(CredentialError::Unavailable(format!(
                    "no reply within {:?}",
                    self.timeout
                )));
            }
            Ok(Err(err)) => {
                let reason = match err.kind() {
                    RequestErrorKind::NoResponders => {
                        "no credential service is running".to_string()
                    }
                    RequestErrorKind::TimedOut => "request timed out".to_string(),
                    _ => err.to_string(),
                };
                return Err(CredentialError::Unavailable(reason));
            }
            Ok(Ok(reply)) => reply,
        };
        if let Some(rejection) = Rejection::from_headers(reply.headers.as_ref()) {
            return Err(CredentialError::Refused(rejection));
        }
        TokenResponse::decode(reply.payload).map_err(|e| {
            CredentialError::Refused(Rejection::new(
                ErrorCode::Internal,
                format!("unreadable reply from the credential service: {e}"),
            ))
        })
    }
}
