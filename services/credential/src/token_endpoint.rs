//! The HTTP token endpoint (distribution token spec) of the registries this service issues
//! tokens for: `GET /token?service=<aud>&scope=repository:<name>:<actions>`, authenticated with
//! HTTP Basic whose password is a one-time login minted on the NATS mint endpoint
//! (`TokenRequest.login`). It is the `realm` a registry in token mode sends skopeo and buildah
//! to; imagemesh's own services never come here, they get tokens over NATS.
//!
//! What a login buys: one token, for its own repository and at most its own actions, signed
//! like every other token of the issuer. Everything else is refused with a reason and logged,
//! never with the login in it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use imagemesh_proto::v1::Scope;
use imagemesh_runtime::{Shutdown, telemetry};
use secrecy::ExposeSecret;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::broker::Broker;
use crate::providers::issuer::login::{self, Grant, LoginError};

/// Redeemed login ids kept before the expired ones are swept.
const SWEEP_AT: usize = 1024;

/// The endpoint's state: the broker (for the issuers) and the logins already redeemed.
pub struct TokenEndpoint {
    broker: Arc<Broker>,
    /// Login id -> its expiry (Unix seconds): a login is redeemed once. Per replica: with
    /// several credential replicas behind one realm, a login could be redeemed once per replica
    /// within its lifetime (`docs/credentials.md`).
    redeemed: Mutex<HashMap<String, u64>>,
}

/// A refusal: status, registry error code, and a reason that names no secret.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    reason: String,
}

impl Refusal {
    fn unauthorized(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "UNAUTHORIZED",
            reason: reason.into(),
        }
    }

    fn denied(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code: "DENIED",
            reason: reason.into(),
        }
    }
}

impl From<LoginError> for Refusal {
    fn from(err: LoginError) -> Self {
        Refusal::unauthorized(err.to_string())
    }
}

impl TokenEndpoint {
    pub fn new(broker: Arc<Broker>) -> Arc<Self> {
        Arc::new(Self {
            broker,
            redeemed: Mutex::new(HashMap::new()),
        })
    }

    /// Serves `listener` until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: Shutdown) {
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        tracing::warn!(error = %err, "token endpoint: accept failed");
                        continue;
                    }
                },
            };
            let endpoint = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let endpoint = endpoint.clone();
                    async move { Ok::<_, Infallible>(endpoint.answer(&request).await) }
                });
                // A client that goes away mid-request is its own business.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.uri().path() != "/token" {
            return reply(
                StatusCode::NOT_FOUND,
                json!({"errors": [{"code": "NOT_FOUND"}]}),
            );
        }
        if request.method() != Method::GET {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"errors": [{"code": "UNSUPPORTED", "message": "GET only"}]}),
            );
        }
        let span = tracing::info_span!(
            "credential token exchange",
            registry = tracing::field::Empty,
            repository = tracing::field::Empty,
        );
        let result = async { self.exchange(request, SystemTime::now()) }
            .instrument(span)
            .await;
        let metrics = telemetry::metrics::get();
        let outcome = if result.is_ok() { "issued" } else { "refused" };
        metrics.token_requests.add(
            1,
            &[
                telemetry::metrics::attr("endpoint", "http"),
                telemetry::metrics::attr("outcome", outcome),
            ],
        );
        match result {
            Ok(body) => reply(StatusCode::OK, body),
            Err(refusal) => {
                tracing::info!(status = %refusal.status, reason = %refusal.reason, "token exchange refused");
                let mut response = reply(
                    refusal.status,
                    json!({"errors": [{"code": refusal.code, "message": refusal.reason}]}),
                );
                if refusal.status == StatusCode::UNAUTHORIZED {
                    response.headers_mut().insert(
                        WWW_AUTHENTICATE,
                        hyper::header::HeaderValue::from_static("Basic realm=\"imagemesh\""),
                    );
                }
                response
            }
        }
    }

    /// Checks the login and the scopes asked, redeems the login, and signs the token.
    fn exchange(
        &self,
        request: &Request<Incoming>,
        now: SystemTime,
    ) -> Result<serde_json::Value, Refusal> {
        let query = request.uri().query().unwrap_or_default();
        let mut service = None;
        let mut asked = Vec::new();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            match name.as_ref() {
                "service" => service = Some(value.into_owned()),
                // One parameter may hold several scopes, separated by spaces.
                "scope" => asked.extend(value.split(' ').map(str::to_string)),
                _ => {}
            }
        }
        let login = basic_password(request)
            .ok_or_else(|| Refusal::unauthorized("HTTP Basic with a one-time login is required"))?;
        let claimed = login::unverified_grant(&login)?;
        let issuer = self
            .broker
            .login_issuer(&claimed.registry)
            .ok_or(LoginError::Malformed)?;
        let grant = issuer.verify_login(&login, now)?;
        let span = tracing::Span::current();
        span.record("registry", grant.registry.as_str());
        span.record("repository", grant.repository.as_str());
        if service.as_deref() != Some(issuer.audience()) {
            return Err(Refusal::denied(format!(
                "the login is for service {:?}",
                issuer.audience()
            )));
        }
        let actions = granted_actions(&grant, &asked);
        if actions.is_empty() {
            return Err(Refusal::denied(format!(
                "the login covers repository:{}:{}, not {}",
                grant.repository,
                grant.actions.join(","),
                asked.join(" ")
            )));
        }
        self.redeem(&grant, now)?;
        let scope = Scope {
            repository: grant.repository.clone(),
            actions,
        };
        let minted = issuer.mint(&scope).map_err(|err| Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "UNAVAILABLE",
            reason: err.to_string(),
        })?;
        let expires_at = minted
            .expires_at
            .map(login::unix_seconds)
            .unwrap_or_default();
        let issued_at = login::unix_seconds(now);
        tracing::info!(actions = ?scope.actions, "token exchanged for a one-time login");
        let token = minted.secret.expose_secret();
        Ok(json!({
            "token": token,
            "access_token": token,
            "expires_in": expires_at.saturating_sub(issued_at),
            "issued_at": humantime::format_rfc3339_seconds(now).to_string(),
        }))
    }

    /// Marks the login used; refuses one used before.
    fn redeem(&self, grant: &Grant, now: SystemTime) -> Result<(), Refusal> {
        let mut redeemed = self.redeemed.lock().expect("lock");
        if redeemed.len() >= SWEEP_AT {
            let now = login::unix_seconds(now);
            redeemed.retain(|_, expires| *expires > now);
        }
        if redeemed.insert(grant.jti.clone(), grant.exp).is_some() {
            return Err(Refusal::unauthorized("the login was already used"));
        }
        Ok(())
    }
}

/// The actions of the login's repository among the scopes asked (`repository:<name>:<actions>`),
/// limited to what the login grants; sorted.
fn granted_actions(grant: &Grant, asked: &[String]) -> Vec<String> {
    let mut actions: Vec<String> = asked
        .iter()
        .filter_map(|scope| {
            let rest = scope.strip_prefix("repository:")?;
            let (name, actions) = rest.rsplit_once(':')?;
            (name == grant.repository).then_some(actions)
        })
        .flat_map(|actions| actions.split(','))
        .filter(|action| grant.actions.iter().any(|granted| granted == action))
        .map(str::to_string)
        .collect();
    actions.sort();
    actions.dedup();
    actions
}

/// The password of an HTTP Basic `Authorization` header.
fn basic_password(request: &Request<Incoming>) -> Option<String> {
    let header = request.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (_, password) = decoded.split_once(':')?;
    Some(password.to_string())
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_logins_repository_and_actions_are_granted() {
        let grant = Grant {
            registry: "127.0.0.1:5000".into(),
            repository: "team/app".into(),
            actions: vec!["pull".into()],
            exp: 0,
            jti: "x".into(),
        };
        let asked = |scopes: &[&str]| {
            let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
            granted_actions(&grant, &scopes)
        };
        assert_eq!(asked(&["repository:team/app:pull,push"]), vec!["pull"]);
        assert!(asked(&["repository:team/app:push"]).is_empty());
        assert!(asked(&["repository:other/app:pull"]).is_empty());
        assert!(asked(&["repository:team/app/sub:pull"]).is_empty());
        assert!(asked(&["registry:catalog:*"]).is_empty());
        assert_eq!(
            asked(&["repository:other/app:pull", "repository:team/app:pull"]),
            vec!["pull"]
        );
    }
}
