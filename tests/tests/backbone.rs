//! The backbone end to end: the scheduler attaches credentials from the credential service to
//! every request, build and runtime, and the builder, indexer and mounter authenticate to a real
//! htpasswd-protected registry with them.

use std::time::Duration;

use imagemesh_proto::v1::{BuildOptions, ContainerRequest, ErrorCode, RequestKind, RequestState};
use imagemesh_tests::{
    BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER, assert_failed,
    assert_gave_up, assert_succeeded, describe, find,
};

const WAIT: Duration = Duration::from_secs(30);

fn build_request(id: &str) -> ContainerRequest {
    ContainerRequest {
        request_id: id.into(),
        image_id: format!("img-{id}"),
        kind: RequestKind::Build as i32,
        build_options: Some(BuildOptions {
            dockerfile: "FROM scratch\n".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn runtime_request(id: &str, registry: &str) -> ContainerRequest {
    ContainerRequest {
        request_id: id.into(),
        container_id: format!("ctr-{id}"),
        kind: RequestKind::Runtime as i32,
        image_ref: format!("{registry}/imagemesh/builds/default:img-b1"),
        ..Default::default()
    }
}

#[tokio::test]
async fn build_and_runtime_requests_both_carry_the_build_registry_token() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    let registry = mesh.registry.addr().to_string();
    mesh.submit(&build_request("b1")).await;

    let build = mesh.wait_terminal("b1", WAIT).await;
    // The mounter mounts the image from its index, so the runtime request follows the build.
    mesh.submit(&runtime_request("r1", &registry)).await;
    let last = build.last().unwrap();
    assert_eq!(
        last.state(),
        RequestState::Succeeded,
        "{}",
        describe(&build)
    );
    let builder = find(&build, "builder", "authenticated").expect("builder authenticated");
    // The build registry's issuer is the credential service: a bearer token it signed for
    // pull and push (no registry password exists in this mesh).
    assert_eq!(builder.details["registry"], registry);
    assert_eq!(builder.details["scheme"], "bearer");
    assert_eq!(builder.details["actions"], "pull,push");
    assert!(
        find(&build, "indexer", "authenticated").is_some(),
        "{}",
        describe(&build)
    );
    // Placed on the one live builder, on its own subject.
    let dispatched = find(&build, "scheduler", "dispatched").unwrap();
    let worker = &builder.details["worker"];
    assert_eq!(
        dispatched.details["subject"],
        format!("imagemesh.work.build.{worker}")
    );
    assert_eq!(&dispatched.details["worker"], worker);
    assert_eq!(
        dispatched.details["build_image_ref"],
        format!("{registry}/imagemesh/builds/default:img-b1")
    );

    let runtime = mesh.wait_terminal("r1", WAIT).await;
    assert_succeeded(&runtime);
    let mounter = find(&runtime, "mounter", "authenticated").expect("mounter authenticated");
    assert_eq!(mounter.details["registry"], registry);
    assert_eq!(mounter.details["scheme"], "bearer");
    assert_eq!(mounter.details["actions"], "pull");
    let dispatched = find(&runtime, "scheduler", "dispatched").unwrap();
    assert_eq!(dispatched.details["long_term_secrets"], "");
    assert!(
        !dispatched.message.contains("long-term"),
        "{}",
        dispatched.message
    );
    let subject = format!("imagemesh.work.mount.{}", mounter.details["worker"]);
    assert_eq!(dispatched.details["subject"], subject);

    mesh.assert_no_secret_leaked(&["b1", "r1"], &[REGISTRY_PASSWORD])
        .await;
}

#[tokio::test]
async fn a_credential_the_registry_rejects_fails_naming_the_registry_without_the_secret() {
    let wrong = "wrong-Pw-77cc1";
    let options = MeshOptions {
        build_registry_auth: BuildRegistryAuth::Basic,
        credential_password: wrong.into(),
        ..Default::default()
    };
    let mesh = Mesh::start(options).await;
    let registry = mesh.registry.addr().to_string();
    mesh.submit(&build_request("bad-cred")).await;

    let events = mesh.wait_terminal("bad-cred", WAIT).await;
    let failed = assert_failed(&events, "builder", ErrorCode::RegistryAuthRejected);
    assert!(failed.message.contains(&registry), "{}", failed.message);
    assert!(
        failed.message.contains("rejected the credential"),
        "{}",
        failed.message
    );

    let letters = mesh.dead_letters().await;
    let letter = letters
        .iter()
        .find(|l| l.request_id == "bad-cred")
        .expect("dead letter");
    assert_eq!(letter.service, "builder");
    assert_eq!(letter.error_code(), ErrorCode::RegistryAuthRejected);
    let kept: ContainerRequest = prost::Message::decode(letter.payload.as_slice()).unwrap();
    let kept_cred = kept
        .build_registry_creds
        .expect("credential kept without its secret");
    assert_eq!(kept_cred.username, REGISTRY_USER);
    assert!(kept_cred.secret.is_empty());

    mesh.assert_no_secret_leaked(&["bad-cred"], &[wrong, REGISTRY_PASSWORD])
        .await;
}

#[tokio::test]
async fn without_the_credential_service_nothing_is_dispatched_until_it_returns() {
    let options = MeshOptions {
        start: vec!["scheduler", "builder", "indexer", "mounter"],
        intake_max_deliver: Some(1000),
        ..Default::default()
    };
    let mut mesh = Mesh::start(options).await;
    mesh.submit(&build_request("held")).await;

    // The scheduler retries while the credential service is away...
    imagemesh_testkit::eventually(WAIT, "two credential retries", || async {
        let events = mesh.events("held").await;
        (events.iter().filter(|e| e.phase == "retrying").count() >= 2).then_some(())
    })
    .await;
    // ...and dispatches nothing meanwhile.
    let events = mesh.events("held").await;
    assert!(
        events.iter().all(|e| e.service == "scheduler"),
        "{}",
        describe(&events)
    );
    assert!(find(&events, "scheduler", "dispatched").is_none());
    let retry = find(&events, "scheduler", "retrying").unwrap();
    assert!(
        retry.message.contains("credential service unavailable"),
        "{}",
        retry.message
    );

    mesh.start_service("credential").await;
    let events = mesh.wait_terminal("held", WAIT).await;
    assert_succeeded(&events);
    assert!(find(&events, "builder", "authenticated").is_some());
}

#[tokio::test]
async fn a_request_gives_up_after_the_retry_limit_with_a_dead_letter() {
    let options = MeshOptions {
        start: vec!["scheduler"],
        max_deliver: 3,
        ..Default::default()
    };
    let mesh = Mesh::start(options).await;
    mesh.submit(&build_request("abandoned")).await;
    let events = mesh.wait_terminal("abandoned", WAIT).await;
    assert_gave_up(&events, "scheduler", ErrorCode::CredentialUnavailable, 3);
    let letters = mesh.dead_letters().await;
    assert!(
        letters
            .iter()
            .any(|l| l.request_id == "abandoned" && l.service == "scheduler")
    );
}

#[tokio::test]
async fn malformed_intake_messages_fail_clearly_and_the_next_request_goes_through() {
    let mesh = Mesh::start(MeshOptions::default()).await;
    mesh.publish_raw(vec![0xff, 0xff, 0xff, 0x01], None, "bad-pb")
        .await;
    mesh.publish_raw(
        b"{\"requestId\": \"bad-json\", ".to_vec(),
        Some("application/json"),
        "bad-json",
    )
    .await;
    mesh.publish_raw(
        b"{\"requestId\": \"bad-field\", \"colour\": 1}".to_vec(),
        Some("application/json"),
        "bad-field",
    )
    .await;
    mesh.publish_raw(b"\x00garbage".to_vec(), None, "garbage-1")
        .await;
    // A request published on another request's subject is refused on the subject's id: the
    // payload's id may be someone else's, and nothing is reported there.
    let elsewhere =
        br#"{"requestId": "someone-else", "kind": "REQUEST_KIND_BUILD", "imageId": "img-x",
                        "buildOptions": {"dockerfile": "FROM scratch\n"}}"#;
    mesh.publish_raw(elsewhere.to_vec(), Some("application/json"), "mismatch-1")
        .await;
    let good = br#"{"requestId": "good-json", "kind": "REQUEST_KIND_BUILD", "imageId": "img-good",
                   "buildOptions": {"dockerfile": "FROM scratch\n"}}"#;
    mesh.publish_raw(good.to_vec(), Some("application/json"), "good-json")
        .await;

    for (id, expected) in [
        ("bad-pb", "malformed protobuf ContainerRequest"),
        ("bad-json", "malformed JSON ContainerRequest"),
        ("bad-field", "colour"),
        ("garbage-1", "malformed protobuf ContainerRequest"),
        ("mismatch-1", "not the one its subject names"),
    ] {
        let events = mesh.wait_terminal(id, WAIT).await;
        let failed = events.last().unwrap();
        assert_eq!(
            failed.state(),
            RequestState::Failed,
            "{id}: {}",
            describe(&events)
        );
        assert_eq!(failed.error_code(), ErrorCode::MalformedRequest);
        assert!(
            failed.message.contains(expected),
            "{id}: {}",
            failed.message
        );
    }
    let events = mesh.wait_terminal("good-json", WAIT).await;
    assert_succeeded(&events);
    assert!(mesh.events("someone-else").await.is_empty());

    let letters = mesh.dead_letters().await;
    let malformed: Vec<_> = letters
        .iter()
        .filter(|l| l.error_code() == ErrorCode::MalformedRequest)
        .collect();
    assert_eq!(malformed.len(), 5, "{letters:?}");
    let garbage = malformed
        .iter()
        .find(|l| l.request_id == "garbage-1")
        .expect("letter of the undecodable request");
    assert_eq!(
        garbage.payload, b"\x00garbage",
        "intake payloads are kept for diagnosis"
    );
    assert_eq!(garbage.subject, "imagemesh.intake.default.garbage-1");
    assert_eq!(garbage.tenant, "default");

    // A refused request was never dispatched, so its id is free: the corrected request goes
    // through under the same id.
    let corrected =
        br#"{"requestId": "bad-pb", "kind": "REQUEST_KIND_BUILD", "imageId": "img-fixed",
                        "buildOptions": {"dockerfile": "FROM scratch\n"}}"#;
    mesh.publish_raw(corrected.to_vec(), Some("application/json"), "bad-pb")
        .await;
    imagemesh_testkit::eventually(WAIT, "the corrected request to succeed", || async {
        let events = mesh.events("bad-pb").await;
        (events.last()?.state() == RequestState::Succeeded).then_some(())
    })
    .await;
}
