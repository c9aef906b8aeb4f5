//! The credential service's NATS contract inside a mesh: separate mint and refresh endpoints
//! discoverable with `$SRV.INFO`, refusals as standard NATS service error headers with a clear
//! code, exact host matching, requests by hand in JSON, and no secret in any log.

use std::time::Duration;

use async_nats::HeaderMap;
use imagemesh_proto::v1::{Scope, TokenRequest, TokenResponse};
use imagemesh_runtime::credentials::CredentialClient;
use imagemesh_runtime::{ErrorCode, Rejection, subjects};
use imagemesh_tests::{BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER};
use prost::Message;

async fn credential_only() -> Mesh {
    Mesh::start(MeshOptions {
        build_registry_auth: BuildRegistryAuth::Basic,
        start: vec!["credential"],
        ..Default::default()
    })
    .await
}

fn request(registry: &str, actions: &[&str]) -> TokenRequest {
    TokenRequest {
        registry: registry.into(),
        scope: Some(Scope {
            repository: "imagemesh/builds".into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }),
        request_id: "cred-test".into(),
        credential_ref: String::new(),
        tenant: imagemesh_proto::DEFAULT_TENANT.into(),
        login: false,
    }
}

#[tokio::test]
async fn mint_and_refresh_are_separate_endpoints_any_nats_tool_finds() {
    let mesh = credential_only().await;
    let reply = mesh
        .client
        .request("$SRV.INFO.credential", "".into())
        .await
        .expect("$SRV.INFO answers");
    let info: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    let subjects: Vec<&str> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    assert!(subjects.contains(&subjects::CREDENTIAL_MINT), "{info}");
    assert!(subjects.contains(&subjects::CREDENTIAL_REFRESH), "{info}");
}

#[tokio::test]
async fn refusals_travel_as_service_error_headers_with_a_clear_code() {
    let mesh = credential_only().await;
    let registry = mesh.registry.addr().to_string();
    let port = registry.rsplit(':').next().unwrap().to_string();
    let client = CredentialClient::new(mesh.client.clone(), Duration::from_secs(10));

    let look_alikes = [
        format!("{registry}.attacker.net"),
        format!("127.0.0.1:{port}0"),
        "127.0.0.1".to_string(),
        "evil-amazonaws.com.example".to_string(),
        "registry.example.com.attacker.net".to_string(),
    ];
    for host in &look_alikes {
        let err = client.mint(&request(host, &["pull"])).await.unwrap_err();
        let rejection = err.to_rejection();
        assert_eq!(
            rejection.code,
            ErrorCode::NoCredentials,
            "{host}: {rejection}"
        );
        assert!(rejection.message.contains(host.as_str()), "{rejection}");
    }

    // The same refusal, read raw as any NATS client sees it.
    let payload = request("registry.example.com.attacker.net", &["pull"]).encode_to_vec();
    let reply = mesh
        .client
        .request(subjects::CREDENTIAL_MINT, payload.into())
        .await
        .unwrap();
    let headers = reply.headers.as_ref().expect("service error headers");
    assert_eq!(
        headers
            .get(async_nats::service::NATS_SERVICE_ERROR_CODE)
            .unwrap()
            .as_str(),
        "404"
    );
    assert!(
        headers
            .get(async_nats::service::NATS_SERVICE_ERROR)
            .unwrap()
            .as_str()
            .starts_with("NO_CREDENTIALS: ")
    );

    let push_on_refresh = client
        .refresh(&request(&registry, &["pull", "push"]))
        .await
        .unwrap_err()
        .to_rejection();
    assert_eq!(push_on_refresh.code, ErrorCode::Forbidden);
    let unknown_action = client
        .mint(&request(&registry, &["delete"]))
        .await
        .unwrap_err()
        .to_rejection();
    assert_eq!(unknown_action.code, ErrorCode::MalformedRequest);

    let granted = client
        .mint(&request(&registry, &["push", "pull"]))
        .await
        .unwrap();
    let credential = granted.credential.unwrap();
    assert_eq!(credential.username, REGISTRY_USER);
    assert_eq!(credential.scope.unwrap().actions, vec!["pull", "push"]);
    assert!(
        !granted.cached,
        "a static credential is handed out, not cached"
    );
    mesh.assert_no_secret_leaked(&[], &[REGISTRY_PASSWORD])
        .await;
}

#[tokio::test]
async fn a_token_request_written_by_hand_in_json_is_answered() {
    let mesh = credential_only().await;
    let registry = mesh.registry.addr().to_string();
    let mut headers = HeaderMap::new();
    headers.insert(subjects::CONTENT_TYPE_HEADER, "application/json");
    let body = format!(
        r#"{{"registry": "http://{registry}", "scope": {{"repository": "imagemesh/builds", "actions": ["pull"]}}}}"#
    );
    let reply = mesh
        .client
        .request_with_headers(subjects::CREDENTIAL_REFRESH, headers, body.into())
        .await
        .unwrap();
    assert_eq!(Rejection::from_headers(reply.headers.as_ref()), None);
    let response = TokenResponse::decode(reply.payload).unwrap();
    let credential = response.credential.unwrap();
    assert_eq!(credential.registry, registry, "normalised");
    assert_eq!(credential.secret, REGISTRY_PASSWORD);
    // The log never holds it, though the reply must.
    mesh.assert_no_secret_leaked(&[], &[REGISTRY_PASSWORD])
        .await;
}
