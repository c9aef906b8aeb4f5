//! Least privilege at the registry, end to end on the secured mesh: the build registry trusts
//! only tokens the credential service signs, every request carries a token for exactly its
//! repository and actions, and a Basic registry's long-term password, configured but not
//! shared, appears in no message, stream, log or span: requests that would need it are refused
//! with a reason that says how to opt in.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::StreamExt;
use imagemesh_proto::v1::{ContainerRequest, ErrorCode, RegistryCredential, RequestKind};
use imagemesh_testkit::otlp::OtlpReceiver;
use imagemesh_testkit::{Registry, RegistryAuth, eventually};
use imagemesh_tests::{
    Mesh, MeshOptions, PASSWORD_ENV, REGISTRY_ISSUER, REGISTRY_SERVICE, assert_failed,
    assert_succeeded, build_request, describe, find,
};
use prost::Message;

const WAIT: Duration = Duration::from_secs(120);
/// The Basic registry's password: distinctive, so a leak is found by a substring search.
const PRIVATE_PASSWORD: &str = "lt-Pw-9fQ2vX7kLm";
const PRIVATE_USER: &str = "team";

fn runtime(id: &str, image_ref: String) -> ContainerRequest {
    ContainerRequest {
        request_id: id.into(),
        container_id: format!("ctr-{id}"),
        kind: RequestKind::Runtime as i32,
        image_ref,
        ..Default::default()
    }
}

/// The claims of a JWT, unverified (the registry verifies; the test reads).
fn claims(token: &str) -> serde_json::Value {
    let part = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

#[tokio::test]
async fn requests_carry_tokens_for_their_repository_only_and_a_long_term_password_goes_nowhere() {
    let receiver = OtlpReceiver::start();
    let private = Registry::start(RegistryAuth::Htpasswd(vec![(
        PRIVATE_USER.into(),
        PRIVATE_PASSWORD.into(),
    )]));
    let options = MeshOptions {
        env: vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                receiver.http_endpoint(),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ],
        credential_password: PRIVATE_PASSWORD.into(),
        // A registry that only speaks Basic, configured without share_long_term_secret.
        credential_extra: format!(
            "[[credential.registries]]\nprovider = \"basic\"\nhost = \"{}\"\nusername = \"{PRIVATE_USER}\"\npassword = {{ env = \"{PASSWORD_ENV}\" }}\n",
            private.addr()
        ),
        ..Default::default()
    };
    let mesh = Mesh::start(options).await;
    let registry = mesh.registry.addr().to_string();
    let private_base = format!("{}/team/base:1", private.addr());
    let base = private_base.clone();
    tokio::task::spawn_blocking(move || {
        let (registry, repository) = base.split_once('/').unwrap();
        imagemesh_testkit::images::push_busybox(
            registry,
            repository,
            PRIVATE_USER,
            PRIVATE_PASSWORD,
        )
    })
    .await
    .unwrap();

    // Every work message, as it goes by (the operator may listen to everything).
    let mut work = mesh.client.subscribe("imagemesh.work.>").await.unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let collector = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(message) = work.next().await {
                seen.lock().unwrap().push(message.payload.to_vec());
            }
        })
    };

    mesh.submit(&build_request("b1", "FROM scratch\n", ""))
        .await;
    assert_succeeded(&mesh.wait_terminal("b1", WAIT).await);
    let own = format!("{registry}/imagemesh/builds/default:img-b1");
    mesh.submit(&runtime("r1", own)).await;
    let events = mesh.wait_terminal("r1", WAIT).await;
    assert_succeeded(&events);
    let mounter = find(&events, "mounter", "authenticated").unwrap();
    assert_eq!(mounter.details["scheme"], "bearer", "{}", describe(&events));

    // The long-term password is not handed out: both requests that need it are refused, saying
    // how an operator would opt in.
    mesh.submit(&runtime("r2", private_base.clone())).await;
    mesh.submit(&build_request("b2", &format!("FROM {private_base}\n"), ""))
        .await;
    for id in ["r2", "b2"] {
        let events = mesh.wait_terminal(id, WAIT).await;
        let failed = assert_failed(&events, "scheduler", ErrorCode::Forbidden);
        assert!(
            failed.message.contains("share_long_term_secret"),
            "{}",
            failed.message
        );
        assert!(
            failed.message.contains(private.addr()),
            "{}",
            failed.message
        );
    }

    // The tokens the work messages carried: exactly their repository and actions.
    let requests: Vec<ContainerRequest> = eventually(WAIT, "the work messages", || async {
        let decoded: Vec<ContainerRequest> = seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|payload| ContainerRequest::decode(payload.as_slice()).ok())
            .collect();
        (decoded.len() >= 2).then_some(decoded)
    })
    .await;
    let token_of = |id: &str| -> RegistryCredential {
        let request = requests.iter().find(|r| r.request_id == id).unwrap();
        request
            .build_registry_creds
            .clone()
            .expect("a build-registry token")
    };
    let pull = token_of("r1");
    let push = token_of("b1");
    for (credential, actions) in [(&pull, vec!["pull"]), (&push, vec!["pull", "push"])] {
        assert!(!credential.long_term);
        let claims = claims(&credential.secret);
        assert_eq!(claims["aud"], REGISTRY_SERVICE);
        assert_eq!(claims["iss"], REGISTRY_ISSUER);
        assert_eq!(claims["access"].as_array().unwrap().len(), 1, "{claims}");
        assert_eq!(claims["access"][0]["name"], "imagemesh/builds/default");
        assert_eq!(claims["access"][0]["actions"], serde_json::json!(actions));
        let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
        assert_eq!(lifetime, 300, "the issuer's default lifetime");
        assert!(!claims["jti"].as_str().unwrap().is_empty());
    }
    assert_ne!(claims(&pull.secret)["jti"], claims(&push.secret)["jti"]);
    let registry = &mesh.registry;
    let (get, post) = (reqwest::Method::GET, reqwest::Method::POST);
    let own_tags = "imagemesh/builds/default/tags/list";
    let other_tags = "imagemesh/builds/other/tags/list";
    let upload = "imagemesh/builds/default/blobs/uploads/";
    assert_eq!(
        registry
            .answer_with_token(get.clone(), own_tags, &pull.secret)
            .await,
        200
    );
    assert_eq!(
        registry
            .answer_with_token(get.clone(), other_tags, &pull.secret)
            .await,
        401
    );
    assert_eq!(
        registry
            .answer_with_token(post.clone(), upload, &pull.secret)
            .await,
        401
    );
    assert_eq!(
        registry
            .answer_with_token(get, other_tags, &push.secret)
            .await,
        401
    );
    assert_eq!(
        registry.answer_with_token(post, upload, &push.secret).await,
        202
    );

    // Nowhere: work messages in flight, every stream and bucket, logs, status, dead letters,
    // spans.
    collector.abort();
    let mut stored = mesh.everything_stored().await;
    stored.extend(seen.lock().unwrap().iter().cloned());
    assert!(stored.len() > 10, "only {} messages stored", stored.len());
    for payload in &stored {
        assert!(
            !String::from_utf8_lossy(payload).contains(PRIVATE_PASSWORD),
            "the long-term password is in a message"
        );
    }
    let spans = eventually(WAIT, "spans of the credential service", || async {
        let spans = receiver.spans();
        spans
            .iter()
            .any(|s| s.service == "credential")
            .then_some(spans)
    })
    .await;
    for span in &spans {
        assert!(
            !format!("{span:?}").contains(PRIVATE_PASSWORD),
            "the long-term password is in span {}",
            span.name
        );
    }
    mesh.assert_no_secret_leaked(&["b1", "r1", "r2", "b2"], &[PRIVATE_PASSWORD])
        .await;
}
