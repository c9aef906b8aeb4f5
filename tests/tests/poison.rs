//! Poison messages end: a work message whose handler crashes (or hangs) on every delivery until
//! JetStream gives up on it (`max_deliver`) fails its request, leaves a dead letter without its
//! secrets and is deleted from its work stream, instead of staying there, tokens and all, with
//! no one told (`imagemesh_runtime::poison`, run by the scheduler).

use std::time::Duration;

use imagemesh_proto::DEFAULT_TENANT;
use imagemesh_proto::v1::{
    BuildOptions, ContainerRequest, ErrorCode, IndexRequest, RegistryCredential, RequestKind,
    RequestState,
};
use imagemesh_runtime::poison::{self, MaxDeliveries, PoisonQueue};
use imagemesh_runtime::status::StatusReporter;
use imagemesh_runtime::{streams, subjects};
use imagemesh_testkit::eventually;
use imagemesh_testkit::fault_proxy::FaultProxy;
use imagemesh_tests::{Mesh, MeshOptions, assert_failed, describe};
use prost::Message;

const WAIT: Duration = Duration::from_secs(30);

/// Distinctive secrets, one per place a work message carries them.
const BUILD_TOKEN: &str = "poison-build-Hk2wQ";
const IMAGE_TOKEN: &str = "poison-image-Vq7tZ";
const BASE_TOKEN: &str = "poison-base-Lm4pX";
const BUILD_ARG: &str = "poison-arg-Rx9cJ";
const SECRETS: [&str; 4] = [BUILD_TOKEN, IMAGE_TOKEN, BASE_TOKEN, BUILD_ARG];

fn credential(registry: &str, secret: &str) -> Option<RegistryCredential> {
    Some(RegistryCredential {
        registry: registry.into(),
        username: "someone".into(),
        secret: secret.into(),
        ..Default::default()
    })
}

/// A build request as the scheduler dispatches it, with a secret in every place one goes, for
/// a build registry that never answers.
fn poisoned_build(id: &str, registry: &str) -> ContainerRequest {
    ContainerRequest {
        request_id: id.into(),
        tenant: DEFAULT_TENANT.into(),
        image_id: format!("img-{id}"),
        kind: RequestKind::Build as i32,
        build_image_ref: format!("{registry}/imagemesh/builds/default:img-{id}"),
        build_registry_creds: credential(registry, BUILD_TOKEN),
        image_credentials: credential("docker.io", IMAGE_TOKEN),
        base_image_credentials: vec![credential(registry, BASE_TOKEN).unwrap()],
        build_options: Some(BuildOptions {
            dockerfile: "ARG TOKEN\nFROM scratch\n".into(),
            build_args: [("TOKEN".to_string(), BUILD_ARG.to_string())].into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Messages the build stream still holds.
async fn build_queue_length(mesh: &Mesh) -> u64 {
    let js = async_nats::jetstream::new(mesh.client.clone());
    let mut stream = js.get_stream(streams::BUILD).await.expect("build stream");
    stream.info().await.expect("stream info").state.messages
}

#[tokio::test]
async fn a_build_whose_builder_crashes_every_time_fails_is_dead_lettered_and_leaves_the_queue() {
    let max_deliver = 3;
    let mut mesh = Mesh::start(MeshOptions {
        start: vec!["scheduler", "builder"],
        max_deliver,
        ack_wait: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    // Two schedulers hear the advisories; the request still ends once.
    mesh.start_instance("scheduler", "scheduler-2", &[]).await;
    // Counts the connections, so the test knows when a delivery is being handled.
    let hole = FaultProxy::black_hole();
    let request = poisoned_build("poisoned", hole.addr());
    mesh.publish_work(subjects::BUILD, &request).await;

    // Each delivery: the builder takes the request, hangs on the registry, and is killed (-9)
    // mid-handling; restarted, it gets the request again once `ack_wait` has run out.
    let mut seen = 0;
    for delivery in 1..=max_deliver {
        eventually(
            WAIT,
            &format!("the builder to be handling delivery {delivery}"),
            || async { (hole.connections() > seen).then_some(()) },
        )
        .await;
        mesh.service("builder").kill();
        // Counted once the process is dead: nothing more comes from this delivery.
        seen = hole.connections();
        // A builder is running again, as in a deployment that restarts what crashes; it never
        // gets the request a fourth time.
        mesh.service("builder").restart();
    }

    // JetStream gives up and says so; a scheduler fails the request...
    let events = mesh.wait_terminal("poisoned", WAIT).await;
    let failed = assert_failed(&events, "scheduler", ErrorCode::Internal);
    let reason = format!(
        "gave up after {max_deliver} deliveries: the builder's handler crashed or timed out each time"
    );
    assert_eq!(failed.message, reason, "{}", describe(&events));
    assert_eq!(failed.tenant, DEFAULT_TENANT);
    assert_eq!(failed.details["stream"], streams::BUILD);
    assert_eq!(failed.details["consumer"], "builder");

    // ... and deletes it from the build queue (after reporting and dead-lettering it).
    eventually(
        WAIT,
        "the poison message to leave the build queue",
        || async { (build_queue_length(&mesh).await == 0).then_some(()) },
    )
    .await;

    // One dead letter, with the request minus its secrets.
    let letters: Vec<_> = mesh
        .dead_letters()
        .await
        .into_iter()
        .filter(|l| l.request_id == "poisoned")
        .collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.service, "scheduler");
    assert_eq!(letter.tenant, DEFAULT_TENANT);
    assert_eq!(letter.subject, subjects::BUILD);
    assert_eq!(letter.deliveries, max_deliver as u64);
    assert_eq!(letter.reason, reason);
    assert_eq!(letter.error_code(), ErrorCode::Internal);
    let kept = ContainerRequest::decode(letter.payload.as_slice()).expect("the request");
    assert_eq!(kept, request.without_secrets());
    assert_eq!(kept.build_registry_creds.unwrap().registry, hole.addr());
    assert_eq!(kept.build_options.unwrap().build_args["TOKEN"], "");

    // One terminal event, however many schedulers heard the advisory.
    let events = mesh.events("poisoned").await;
    let terminal = events
        .iter()
        .filter(|e| e.state() == RequestState::Failed)
        .count();
    assert_eq!(terminal, 1, "{}", describe(&events));

    // No secret anywhere: logs, status, dead letters, and whatever the mesh still stores.
    mesh.assert_no_secret_leaked(&["poisoned"], &SECRETS).await;
    for stored in mesh.everything_stored().await {
        let text = String::from_utf8_lossy(&stored);
        for secret in SECRETS {
            assert!(!text.contains(secret), "{secret} is still stored");
        }
    }
    // The restarted builder never saw it again once JetStream gave up.
    assert_eq!(hole.connections(), seen);
}

/// Two schedulers handling the same advisory at once (or one advisory heard twice) fail the
/// request once, dead-letter it once and delete it; a third, after the fact, finds nothing to do.
#[tokio::test]
async fn the_same_advisory_handled_twice_ends_its_request_once() {
    let mesh = Mesh::start(MeshOptions {
        start: Vec::new(),
        ..Default::default()
    })
    .await;
    let request = IndexRequest {
        request_id: "twice".into(),
        tenant: "team-a".into(),
        image_id: "img".into(),
        image_ref: "127.0.0.1:1/imagemesh/builds/team-a:img".into(),
        credential: credential("127.0.0.1:1", BUILD_TOKEN),
        ..Default::default()
    };
    mesh.publish_work(subjects::INDEX, &request).await;
    let js = async_nats::jetstream::new(mesh.client.clone());
    let mut stream = js.get_stream(streams::INDEX).await.unwrap();
    let sequence = stream.info().await.unwrap().state.last_sequence;
    let advisory = MaxDeliveries {
        stream: streams::INDEX.into(),
        consumer: "indexer".into(),
        stream_seq: sequence,
        deliveries: 5,
    };
    let queue = PoisonQueue::of(
        streams::INDEX,
        "indexer",
        "indexer",
        IndexRequest::without_secrets,
    );
    let status = StatusReporter::new(js.clone(), "scheduler");
    let (first, second) = tokio::join!(
        poison::settle(&js, &status, &queue, &advisory),
        poison::settle(&js, &status, &queue, &advisory),
    );
    first.expect("first");
    second.expect("second");
    poison::settle(&js, &status, &queue, &advisory)
        .await
        .expect("after the fact");

    let events = mesh.events_of("team-a", "twice").await;
    assert_eq!(events.len(), 1, "{}", describe(&events));
    assert_failed(&events, "scheduler", ErrorCode::Internal);
    assert!(events[0].message.contains("the indexer's handler"));
    let letters: Vec<_> = mesh
        .dead_letters()
        .await
        .into_iter()
        .filter(|l| l.request_id == "twice")
        .collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].tenant, "team-a");
    let kept = IndexRequest::decode(letters[0].payload.as_slice()).unwrap();
    assert_eq!(kept, request.without_secrets());
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
    assert!(
        !mesh
            .everything_stored()
            .await
            .iter()
            .any(|m| String::from_utf8_lossy(m).contains(BUILD_TOKEN)),
        "the token is still stored"
    );
}
