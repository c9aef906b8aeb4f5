//! The scheduler under stress: crashes, company, absent workers, duplicates and public images.
//! Requests are counted where they arrive (a probe consuming the builder and mounter queues).

use std::time::Duration;

use async_nats::jetstream;
mod mounter_support;

use imagemesh_proto::DEFAULT_TENANT;
use imagemesh_proto::v1::{ContainerRequest, ErrorCode, RequestKind, StatusEvent};
use imagemesh_runtime::subjects;
use imagemesh_testkit::eventually;
use imagemesh_tests::mixed_request as request;
use imagemesh_tests::probe::Probe;
use imagemesh_tests::{Mesh, MeshOptions, assert_gave_up, assert_succeeded, describe, find};
use mounter_support::{control, run, runtime_request};

const WAIT: Duration = Duration::from_secs(120);

async fn submit_many(mesh: &Mesh, count: usize) {
    let registry = mesh.registry.addr().to_string();
    for index in 0..count {
        mesh.submit(&request(index, &registry)).await;
    }
}

fn assert_every_request_once(probe: &Probe, count: usize) {
    assert_eq!(
        probe.duplicates(),
        Vec::<(String, usize)>::new(),
        "requests dispatched twice"
    );
    assert_eq!(probe.distinct(), count);
    for index in 0..count {
        let request = probe
            .get(&format!("req-{index:04}"))
            .expect("request arrived");
        let creds = request
            .build_registry_creds
            .expect("build_registry_creds attached");
        let expected = if index % 2 == 0 {
            vec!["pull", "push"]
        } else {
            vec!["pull"]
        };
        assert_eq!(creds.scope.unwrap().actions, expected);
    }
}

fn scheduler_only() -> MeshOptions {
    MeshOptions {
        start: vec!["credential", "scheduler"],
        ack_wait: Duration::from_secs(2),
        max_deliver: 50,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_scheduler_killed_mid_stream_loses_nothing_and_dispatches_nothing_twice() {
    let mut mesh = Mesh::start(scheduler_only()).await;
    let probe = Probe::start(&mesh.client).await;
    submit_many(&mesh, 1000).await;

    eventually(WAIT, "some requests to be dispatched", || async {
        (probe.distinct() >= 150).then_some(())
    })
    .await;
    mesh.service("scheduler").kill();
    let at_kill = probe.distinct();
    assert!(
        at_kill < 1000,
        "the scheduler finished before it could be killed"
    );
    mesh.service("scheduler").restart();

    probe.wait_for(1000, WAIT).await;
    mesh.wait_intake_drained().await;
    assert_every_request_once(&probe, 1000);
    assert!(mesh.service("scheduler").logs().contains("scheduling"));
}

#[tokio::test]
async fn two_schedulers_share_the_intake_without_duplicates() {
    let mut mesh = Mesh::start(scheduler_only()).await;
    mesh.start_instance("scheduler", "scheduler-2", &[]).await;
    let probe = Probe::start(&mesh.client).await;
    submit_many(&mesh, 1000).await;

    probe.wait_for(1000, WAIT).await;
    mesh.wait_intake_drained().await;
    assert_every_request_once(&probe, 1000);
    for instance in ["scheduler", "scheduler-2"] {
        let dispatched = mesh.service(instance).logs().matches("dispatched").count();
        assert!(dispatched > 0, "{instance} dispatched nothing");
    }
}

/// A mesh for placement tests (heartbeats every 200 ms, no mounter yet) and an indexed image.
async fn placement_mesh(tag: &str) -> (Mesh, String) {
    let options = MeshOptions {
        start: vec!["credential", "scheduler", "indexer"],
        heartbeat: Duration::from_millis(200),
        ..Default::default()
    };
    let mesh = Mesh::start(options).await;
    let image = mesh.push_indexed_image(tag).await;
    (mesh, image)
}

/// Starts a mounter advertising as `worker_id`.
async fn start_placed_mounter(
    mesh: &mut Mesh,
    worker_id: &'static str,
    extra_env: &[(&str, &str)],
) {
    let mut env = vec![("IMAGEMESH_MOUNTER__PLACEMENT__WORKER_ID", worker_id)];
    env.extend_from_slice(extra_env);
    mesh.start_instance("mounter", worker_id, &env).await;
}

/// The worker the scheduler addressed a request to (empty: the shared queue).
fn placed_on(events: &[StatusEvent]) -> &str {
    let dispatched = find(events, "scheduler", "dispatched")
        .unwrap_or_else(|| panic!("not dispatched:\n{}", describe(events)));
    &dispatched.details["worker"]
}

#[tokio::test]
async fn a_worker_that_stops_heartbeating_loses_its_queued_work_to_a_live_one() {
    let (mut mesh, image) = placement_mesh("frozen").await;
    start_placed_mounter(&mut mesh, "mounter-a", &[]).await;
    start_placed_mounter(&mut mesh, "mounter-b", &[]).await;
    // Both advertised: the scheduler will route to both.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // mounter-a freezes: it neither heartbeats nor works, but the scheduler does not know yet.
    mesh.service("mounter-a").pause();
    let ids: Vec<String> = (0..20).map(|i| format!("rt-{i}")).collect();
    for id in &ids {
        mesh.submit(&runtime_request(id, id, &image)).await;
    }

    let mut sent_to_a = 0;
    for id in &ids {
        let events = mesh.wait_terminal(id, WAIT).await;
        let done = assert_succeeded(&events);
        assert_eq!(
            done.details["worker"],
            "mounter-b",
            "{id}: {}",
            describe(&events)
        );
        if placed_on(&events) == "mounter-a" {
            sent_to_a += 1;
            let rerouted = find(&events, "scheduler", "rerouted").expect("re-routed");
            assert_eq!(rerouted.details["from_worker"], "mounter-a");
        }
    }
    assert!(
        sent_to_a > 0,
        "nothing was placed on the frozen worker; the test proved nothing"
    );
    mesh.service("mounter-a").resume();
}

#[tokio::test]
async fn placement_counts_the_mounts_a_mounter_holds_not_the_requests_it_works_on() {
    let (mut mesh, image) = placement_mesh("held").await;
    let limit = [("IMAGEMESH_MOUNTER__MAX_MOUNTS", "2")];
    let heartbeats = Duration::from_millis(700);
    let mount = |request_id: &str| runtime_request(request_id, request_id, &image);

    // mounter-a alone takes two mounts: its limit. Its work loop is idle again, but it holds
    // them.
    start_placed_mounter(&mut mesh, "mounter-a", &limit).await;
    tokio::time::sleep(heartbeats).await;
    let mut unmount_subject = String::new();
    for request_id in ["held-a-0", "held-a-1"] {
        let events = run(&mesh, &mount(request_id)).await;
        let done = assert_succeeded(&events);
        assert_eq!(done.details["worker"], "mounter-a");
        unmount_subject = done.details["unmount_subject"].clone();
    }

    // A second mounter with room: every request goes to it, none to the full one, although
    // both have the same work-loop concurrency and neither is working on anything.
    start_placed_mounter(&mut mesh, "mounter-b", &limit).await;
    tokio::time::sleep(heartbeats).await;
    for request_id in ["held-b-0", "held-b-1"] {
        let events = run(&mesh, &mount(request_id)).await;
        assert_eq!(assert_succeeded(&events).details["worker"], "mounter-b");
        assert_eq!(placed_on(&events), "mounter-b", "{}", describe(&events));
    }

    // Both full: the request goes to the shared queue, each mounter hands it back, and it
    // fails with the reason once its deliveries are used up.
    tokio::time::sleep(heartbeats).await;
    let events = run(&mesh, &mount("held-over")).await;
    let attempts = mesh.options.max_deliver;
    let failed = assert_gave_up(&events, "mounter", ErrorCode::AtCapacity, attempts);
    assert!(
        failed.message.contains("holds its limit of 2 mounts"),
        "{}",
        failed.message
    );
    assert_eq!(placed_on(&events), "", "no mounter advertised room");

    // An unmount gives mounter-a room again, and the next request goes there.
    control(&mesh, &unmount_subject, "held-a-1")
        .await
        .expect("unmounted");
    tokio::time::sleep(heartbeats).await;
    let events = run(&mesh, &mount("held-a-2")).await;
    assert_succeeded(&events);
    assert_eq!(placed_on(&events), "mounter-a", "{}", describe(&events));
}

#[tokio::test]
async fn public_images_get_no_image_credentials_and_a_resubmitted_request_is_not_dispatched_again()
{
    let mesh = Mesh::start(scheduler_only()).await;
    let probe = Probe::start(&mesh.client).await;
    let public = ContainerRequest {
        request_id: "public-1".into(),
        kind: RequestKind::Runtime as i32,
        image_ref: "docker.io/library/busybox:1.36".into(),
        ..Default::default()
    };
    mesh.submit(&public).await;
    probe.wait_for(1, WAIT).await;
    let dispatched = probe.get("public-1").unwrap();
    assert!(
        dispatched.image_credentials.is_none(),
        "no credentials exist for docker.io"
    );
    let build = dispatched
        .build_registry_creds
        .expect("still gets a build-registry token");
    assert_eq!(build.registry, mesh.registry.addr());

    // Sent again, without a message id (so de-duplication cannot be what stops it): the intake
    // holds one message per request id and refuses the second.
    let js = jetstream::new(mesh.client.clone());
    let again = js
        .send_publish(
            subjects::intake(DEFAULT_TENANT, "public-1"),
            jetstream::message::PublishMessage::build()
                .payload(prost::Message::encode_to_vec(&public).into()),
        )
        .await
        .unwrap()
        .await;
    let refusal = again.expect_err("a second submission of an id is refused");
    assert!(
        refusal
            .to_string()
            .contains("maximum messages per subject exceeded"),
        "{refusal}"
    );
    // `imagemesh submit` says so, and the request is not sent.
    let submit = std::process::Command::new(imagemesh_testkit::bin_path("imagemesh"))
        .args(["submit", "--kind", "runtime", "--request-id", "public-1"])
        .args(["--image-ref", &public.image_ref])
        .envs(mesh.cli_env())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&submit.stderr);
    assert!(submit.status.success(), "{stderr}");
    assert!(
        stderr.contains("request public-1 was already submitted; not submitted again"),
        "{stderr}"
    );
    mesh.wait_intake_drained().await;
    assert_eq!(probe.duplicates(), Vec::<(String, usize)>::new());
    let events = mesh.events("public-1").await;
    assert_eq!(
        events.iter().filter(|e| e.phase == "dispatched").count(),
        1,
        "{}",
        describe(&events)
    );
}

#[tokio::test]
async fn runtime_secrets_are_resolved_per_image_and_held_by_the_credential_service() {
    let mut mesh = Mesh::start(MeshOptions {
        start: vec!["scheduler"],
        ..Default::default()
    })
    .await;
    // A named credential for a team registry, and nothing else for that registry.
    let team_secret = "team-Pw-93kd";
    let config = format!(
        "{}[credential.secrets.team-hub]\ntenants = [\"default\"]\nprovider = \"basic\"\nhost = \"registry.team.example\"\nusername = \"team-user\"\npassword = {{ value = \"{team_secret}\" }}\nshare_long_term_secret = true\n",
        mesh.config("credential")
    );
    let credential = mesh.spawn_with_config("credential", &config, &[]).await;
    imagemesh_testkit::wait_for_service(&mesh.client, "credential", WAIT).await;
    let probe = Probe::start(&mesh.client).await;

    // The owner of the images records which credential pulls them, with the CLI.
    for (image_id, name) in [
        ("app-1", "team-hub"),
        ("app-3", "no-such-credential"),
        ("app-4", "team-hub"),
    ] {
        let status = std::process::Command::new(imagemesh_testkit::bin_path("imagemesh"))
            .args(["image-secret", "set", image_id, name])
            .envs(mesh.cli_env())
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
    }
    let runtime = |id: &str, image_id: &str, image_ref: &str| ContainerRequest {
        request_id: id.into(),
        kind: RequestKind::Runtime as i32,
        image_id: image_id.into(),
        image_ref: image_ref.into(),
        ..Default::default()
    };
    mesh.submit(&runtime(
        "with-secret",
        "app-1",
        "registry.team.example/team/app:1",
    ))
    .await;
    mesh.submit(&runtime(
        "without-secret",
        "app-2",
        "registry.team.example/team/app:2",
    ))
    .await;
    mesh.submit(&runtime(
        "missing-secret",
        "app-3",
        "registry.team.example/team/app:3",
    ))
    .await;
    mesh.submit(&runtime(
        "wrong-registry",
        "app-4",
        "other.example/team/app:4",
    ))
    .await;

    probe.wait_for(2, WAIT).await;
    let with = probe
        .get("with-secret")
        .unwrap()
        .image_credentials
        .expect("the image's secret");
    assert_eq!(with.username, "team-user");
    assert_eq!(with.registry, "registry.team.example");
    assert_eq!(with.scope.unwrap().actions, vec!["pull"]);
    assert!(
        probe
            .get("without-secret")
            .unwrap()
            .image_credentials
            .is_none(),
        "no default for that registry"
    );

    let missing = mesh.wait_terminal("missing-secret", WAIT).await;
    let failed = missing.last().unwrap();
    assert_eq!(
        failed.error_code(),
        imagemesh_proto::v1::ErrorCode::NoCredentials
    );
    assert!(
        failed.message.contains("no-such-credential"),
        "{}",
        failed.message
    );
    let wrong = mesh.wait_terminal("wrong-registry", WAIT).await;
    let failed = wrong.last().unwrap();
    assert_eq!(
        failed.error_code(),
        imagemesh_proto::v1::ErrorCode::Forbidden,
        "{}",
        describe(&wrong)
    );
    assert!(
        failed.message.contains("not for registry other.example"),
        "{}",
        failed.message
    );

    let mut logs = credential.logs();
    logs.push_str(&mesh.all_logs());
    assert!(
        !logs.contains(team_secret),
        "the team secret leaked into a log"
    );
    mesh.assert_no_secret_leaked(
        &["with-secret", "missing-secret", "wrong-registry"],
        &[team_secret],
    )
    .await;
}
