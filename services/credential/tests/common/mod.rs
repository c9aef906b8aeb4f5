//! The credential service as a real process on a real NATS server, and what its tests share.
#![allow(dead_code)]

use std::time::{Duration, SystemTime};

use imagemesh_proto::v1::{Scope, TokenRequest, TokenResponse};
use imagemesh_runtime::credentials::{CredentialClient, CredentialError};
use imagemesh_runtime::{ErrorCode, Rejection};
use imagemesh_testkit::{NatsServer, ServiceProcess, wait_for_endpoints, wait_for_service};

pub const STARTUP: Duration = Duration::from_secs(30);

/// A credential service process and the NATS server it serves on.
pub struct CredentialService {
    pub process: ServiceProcess,
    pub client: async_nats::Client,
    credentials: CredentialClient,
    pub nats: NatsServer,
}

impl CredentialService {
    /// Starts `imagemesh-credential` with `body` after its `[nats]` section and `env` added to
    /// its environment, and waits until it answers `$SRV.PING`.
    pub async fn start(body: &str, env: &[(&str, &str)]) -> Self {
        let nats = NatsServer::start();
        let config = format!("[nats]\nurl = \"{}\"\n{body}", nats.url());
        let process = ServiceProcess::spawn("imagemesh-credential", &config, env);
        let client = nats.client().await;
        wait_for_service(&client, "credential", STARTUP).await;
        wait_for_endpoints(&client, "credential", &["mint", "refresh"], STARTUP).await;
        let credentials = CredentialClient::new(client.clone(), Duration::from_secs(20));
        Self {
            process,
            client,
            credentials,
            nats,
        }
    }

    /// A client of the mint and refresh endpoints.
    pub fn credentials(&self) -> CredentialClient {
        self.credentials.clone()
    }

    /// Asks the mint endpoint.
    pub async fn mint(
        &self,
        registry: &str,
        repository: &str,
        actions: &[&str],
    ) -> Result<TokenResponse, Rejection> {
        let request = token_request(registry, repository, actions);
        self.credentials.mint(&request).await.map_err(refused)
    }

    /// Asks the refresh endpoint.
    pub async fn refresh(
        &self,
        registry: &str,
        repository: &str,
        actions: &[&str],
    ) -> Result<TokenResponse, Rejection> {
        let request = token_request(registry, repository, actions);
        self.credentials.refresh(&request).await.map_err(refused)
    }

    /// Panics if the service logged any of `secrets`.
    pub fn assert_no_secret_in_logs(&self, secrets: &[&str]) {
        let logs = self.process.logs();
        assert!(
            !logs.is_empty(),
            "the service logged nothing: is logging captured?"
        );
        for secret in secrets {
            assert!(!secret.is_empty());
            assert!(
                !logs.contains(secret),
                "secret {secret:?} leaked into the credential service log"
            );
        }
    }
}

pub fn token_request(registry: &str, repository: &str, actions: &[&str]) -> TokenRequest {
    TokenRequest {
        registry: registry.into(),
        scope: Some(Scope {
            repository: repository.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }),
        request_id: "test-request".into(),
        credential_ref: String::new(),
        tenant: imagemesh_proto::DEFAULT_TENANT.into(),
        login: false,
    }
}

fn refused(err: CredentialError) -> Rejection {
    match err {
        CredentialError::Refused(rejection) => rejection,
        CredentialError::Unavailable(reason) => panic!("credential service unavailable: {reason}"),
    }
}

/// Asserts a refusal's code and that its message names `registry`.
pub fn assert_refused(result: Result<TokenResponse, Rejection>, code: ErrorCode, registry: &str) {
    let rejection = result.expect_err("expected a refusal");
    assert_eq!(rejection.code, code, "{rejection}");
    assert!(rejection.message.contains(registry), "{rejection}");
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Seconds from now until the response's credential expires (negative if in the past).
pub fn seconds_left(response: &TokenResponse) -> i64 {
    let expires = response
        .credential
        .as_ref()
        .and_then(|c| c.expires_at_unix())
        .expect("credential with an expiry");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    expires - now
}

/// The secret of a successful response.
pub fn secret(response: &TokenResponse) -> &str {
    &response.credential.as_ref().expect("credential").secret
}

/// Whether `token` may pull `repository` at `registry`.
pub async fn can_pull(
    registry: &imagemesh_testkit::Registry,
    repository: &str,
    token: &str,
) -> bool {
    let path = format!("{repository}/tags/list");
    // 404 NAME_UNKNOWN: authorized, the repository is empty. 401: not authorized.
    let answer = registry.answer_with_token(reqwest::Method::GET, &path, token);
    answer.await == reqwest::StatusCode::NOT_FOUND
}

/// Whether `token` may push to `repository` at `registry` (starts a blob upload).
pub async fn can_push(
    registry: &imagemesh_testkit::Registry,
    repository: &str,
    token: &str,
) -> bool {
    let path = format!("{repository}/blobs/uploads/");
    let answer = registry.answer_with_token(reqwest::Method::POST, &path, token);
    answer.await == reqwest::StatusCode::ACCEPTED
}
