//! The mint and refresh endpoints.

use std::sync::Arc;

use async_nats::service::{Request, Service};
use futures::StreamExt;
use imagemesh_proto::codec;
use imagemesh_proto::v1::TokenRequest;
use imagemesh_runtime::{ErrorCode, Rejection, Shutdown, subjects, telemetry};
use prost::Message;
use tracing::Instrument;

use crate::broker::{Broker, ScopePolicy};

/// Serves both endpoints until `shutdown`.
pub async fn serve(
    service: &Service,
    broker: Arc<Broker>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let endpoint = |subject: &'static str, name: &'static str| {
        service.endpoint_builder().name(name).add(subject)
    };
    let mut mint = endpoint(subjects::CREDENTIAL_MINT, "mint")
        .await
        .map_err(|e| anyhow::anyhow!("cannot add mint endpoint: {e}"))?;
    let mut refresh = endpoint(subjects::CREDENTIAL_REFRESH, "refresh")
        .await
        .map_err(|e| anyhow::anyhow!("cannot add refresh endpoint: {e}"))?;
    loop {
        let (request, policy) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            Some(request) = mint.next() => (request, ScopePolicy::PullPush),
            Some(request) = refresh.next() => (request, ScopePolicy::PullOnly),
            else => return Ok(()),
        };
        let broker = broker.clone();
        let name = match policy {
            ScopePolicy::PullPush => "credential mint",
            ScopePolicy::PullOnly => "credential refresh",
        };
        let span = tracing::info_span!(
            "credential",
            otel.name = name,
            registry = tracing::field::Empty,
            repository = tracing::field::Empty,
            request_id = tracing::field::Empty,
            cached = tracing::field::Empty,
        );
        telemetry::continue_trace(&span, request.message.headers.as_ref());
        tokio::spawn(answer(broker, request, policy).instrument(span));
    }
}

async fn answer(broker: Arc<Broker>, request: Request, policy: ScopePolicy) {
    let result = match decode(&request) {
        Ok(token_request) => {
            let span = tracing::Span::current();
            span.record("registry", token_request.registry.as_str());
            span.record("request_id", token_request.request_id.as_str());
            if let Some(scope) = &token_request.scope {
                span.record("repository", scope.repository.as_str());
            }
            let result = broker.mint(&token_request, policy).await;
            if let Ok(response) = &result {
                span.record("cached", response.cached);
                let endpoint = match policy {
                    ScopePolicy::PullPush => "mint",
                    ScopePolicy::PullOnly => "refresh",
                };
                let metrics = telemetry::metrics::get();
                let attributes = [
                    telemetry::metrics::attr("endpoint", endpoint),
                    telemetry::metrics::attr("cached", response.cached),
                ];
                metrics.token_requests.add(1, &attributes);
            }
            result
        }
        Err(rejection) => Err(rejection),
    };
    let reply = match result {
        Ok(response) => Ok(response.encode_to_vec().into()),
        Err(rejection) => {
            tracing::info!(code = ?rejection.code, reason = %rejection.message, "token request refused");
            Err(rejection.to_service_error())
        }
    };
    if let Err(err) = request.respond(reply).await {
        tracing::warn!(error = %err, "could not send token reply");
    }
}

fn decode(request: &Request) -> Result<TokenRequest, Rejection> {
    let content_type = request
        .message
        .headers
        .as_ref()
        .and_then(|h| h.get(subjects::CONTENT_TYPE_HEADER))
        .map(|v| v.as_str().to_string());
    codec::decode(&request.message.payload, content_type.as_deref())
        .map_err(|e| Rejection::new(ErrorCode::MalformedRequest, e.to_string()))
}
