//! Tenants end to end: a request's tenant is the one its intake subject names, and everything it
//! reaches is that tenant's. Two tenants, `team-a` and `team-b`, share one mesh: B can neither
//! push outside its repository prefix, nor overwrite or mount A's image of the same id, nor use
//! a named credential bound to A, nor read A's build contexts; the same request id in both is two
//! requests; and A's requests go on as if B were not there.

mod mounter_support;

use std::time::Duration;

use async_nats::jetstream;
use imagemesh_proto::v1::{
    BuildOptions, ContainerRequest, ErrorCode, ImageRecord, RequestKind, RequestState, StatusEvent,
};
use imagemesh_runtime::streams;
use imagemesh_testkit::{ServiceProcess, bin_path, wait_for_service};
use imagemesh_tests::probe::Probe;
use imagemesh_tests::{
    Mesh, MeshOptions, REGISTRY_PASSWORD, assert_failed, assert_succeeded, build_request, describe,
    find, is_terminal,
};
use mounter_support::{mounted, read_file};
use prost::Message;

const A: &str = "team-a";
const B: &str = "team-b";
const WAIT: Duration = Duration::from_secs(120);

/// A build of `image_id` from `FROM scratch` with one file, `hello.txt`, saying `text`; the
/// context is uploaded to `tenant`'s bucket.
async fn build_hello(mesh: &Mesh, tenant: &str, id: &str, image_id: &str, text: &str) {
    let context = format!("ctx-{id}");
    mesh.upload_context_as(tenant, &context, &[("hello.txt", text.as_bytes())])
        .await;
    let mut request = build_request(id, "FROM scratch\nCOPY hello.txt /hello.txt\n", &context);
    request.image_id = image_id.into();
    mesh.submit_as(tenant, &request).await;
}

/// A runtime request for `tenant`'s image id, mounted under `container_id` (empty: the mounter
/// names the mount after the tenant and request).
fn runtime(id: &str, container_id: &str, image_id: &str) -> ContainerRequest {
    ContainerRequest {
        request_id: id.into(),
        container_id: container_id.into(),
        kind: RequestKind::Runtime as i32,
        image_id: image_id.into(),
        ..Default::default()
    }
}

/// The image-refs record of `tenant`'s `image_id`, as stored.
async fn record(mesh: &Mesh, tenant: &str, image_id: &str) -> Option<ImageRecord> {
    let js = jetstream::new(mesh.client.clone());
    let store = js.get_key_value(streams::IMAGE_REFS_BUCKET).await.ok()?;
    let value = store
        .get(streams::image_key(tenant, image_id))
        .await
        .unwrap()?;
    Some(ImageRecord::decode(value).unwrap())
}

/// Every event of the request belongs to `tenant`.
fn assert_all_of(tenant: &str, events: &[StatusEvent]) {
    assert!(
        events.iter().all(|e| e.tenant == tenant),
        "events of another tenant: {events:?}"
    );
}

/// The terminal event of a request a worker refused, which must be a failure by `service` with
/// `code`. Found by state, not position: a quick refusal may be stored before the scheduler's
/// `dispatched`, which is published without waiting for the stream.
fn refused_by<'a>(events: &'a [StatusEvent], service: &str, code: ErrorCode) -> &'a StatusEvent {
    let terminal: Vec<_> = events.iter().filter(|e| is_terminal(e)).collect();
    assert_eq!(terminal.len(), 1, "{}", describe(events));
    let failed = terminal[0];
    assert_eq!(failed.state(), RequestState::Failed, "{}", describe(events));
    assert_eq!(failed.service, service, "{}", describe(events));
    assert_eq!(failed.error_code(), code, "{}", describe(events));
    failed
}

/// `hello.txt` as the mount of the request whose events these are shows it.
async fn mounted_hello(events: &[StatusEvent]) -> String {
    let mountpoint = mounted(events).details["mountpoint"].clone();
    let bytes = read_file(std::path::Path::new(&mountpoint).join("hello.txt")).await;
    String::from_utf8(bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_per_tenant_and_a_tenant_pushes_only_under_its_prefix() {
    let mesh = Mesh::start(two_tenants(MeshOptions::default())).await;
    let registry = mesh.registry.addr().to_string();

    // A builds `app`; B builds an image of the same id with other content.
    build_hello(&mesh, A, "build-app", "app", "tenant a\n").await;
    let a_built = mesh.wait_terminal_of(A, "build-app", WAIT).await;
    assert_succeeded(&a_built);
    assert_all_of(A, &a_built);
    let a_ref = format!("{registry}/imagemesh/builds/{A}:app");
    assert_eq!(
        find(&a_built, "builder", "pushed").unwrap().details["image_ref"],
        a_ref
    );
    let a_record = record(&mesh, A, "app").await.expect("A's record");
    assert_eq!(a_record.image_ref, a_ref);
    assert!(!a_record.index_digest.is_empty(), "indexed: {a_record:?}");

    build_hello(&mesh, B, "build-app", "app", "tenant b\n").await;
    let b_built = mesh.wait_terminal_of(B, "build-app", WAIT).await;
    assert_succeeded(&b_built);
    assert_all_of(B, &b_built);
    // Not de-duplicated against A's request of the same id: B's was built, and as B's image.
    assert!(
        find(&b_built, "builder", "already-built").is_none(),
        "{}",
        describe(&b_built)
    );
    let b_ref = format!("{registry}/imagemesh/builds/{B}:app");
    let b_record = record(&mesh, B, "app").await.expect("B's record");
    assert_eq!(b_record.image_ref, b_ref);
    assert_ne!(b_record.manifest_digest, a_record.manifest_digest);
    assert_eq!(
        record(&mesh, A, "app").await,
        Some(a_record.clone()),
        "B's build of the same image id left A's record alone"
    );

    // B may not push anywhere outside imagemesh/builds/team-b: not into A's repository, not
    // above its own, not elsewhere in the registry.
    for (id, repository) in [
        ("push-into-a", format!("imagemesh/builds/{A}")),
        ("push-below-a", format!("imagemesh/builds/{A}/app")),
        ("push-above", "imagemesh/builds".to_string()),
        ("push-shared", "base/busybox".to_string()),
        ("push-lookalike", format!("imagemesh/builds/{B}x")),
    ] {
        let mut request = build_request(id, "FROM scratch\n", "");
        request.image_id = "app".into();
        request.build_options.as_mut().unwrap().repository = repository.clone();
        mesh.submit_as(B, &request).await;
        let events = mesh.wait_terminal_of(B, id, WAIT).await;
        let failed = assert_failed(&events, "scheduler", ErrorCode::Forbidden);
        assert!(
            failed.message.contains(&format!("imagemesh/builds/{B}/")),
            "{id}: {}",
            failed.message
        );
        assert!(mesh.events_of(A, id).await.is_empty(), "{id}");
    }
    // Below its own prefix is B's.
    let mut own = build_request("push-own-sub", "FROM scratch\n", "");
    own.build_options.as_mut().unwrap().repository = format!("imagemesh/builds/{B}/tools");
    mesh.submit_as(B, &own).await;
    let events = mesh.wait_terminal_of(B, "push-own-sub", WAIT).await;
    assert_succeeded(&events);
    let dispatched = find(&events, "scheduler", "dispatched").unwrap();
    assert_eq!(
        dispatched.details["build_image_ref"],
        format!("{registry}/imagemesh/builds/{B}/tools:img-push-own-sub")
    );

    // B cannot read A's build context either: the request names an object of its own bucket.
    mesh.upload_context_as(A, "ctx-only-a", &[("a.txt", b"a")])
        .await;
    let borrowed = build_request("borrow-context", "FROM scratch\nCOPY . /\n", "ctx-only-a");
    mesh.submit_as(B, &borrowed).await;
    let events = mesh.wait_terminal_of(B, "borrow-context", WAIT).await;
    let failed = refused_by(&events, "builder", ErrorCode::NotFound);
    assert!(
        failed
            .message
            .contains(&format!("is not in the imagemesh-contexts-{B} bucket")),
        "{}",
        failed.message
    );

    // Runtime: each tenant's `app` is its own image; B cannot name A's by id or by reference.
    mesh.push_indexed_image_as(A, "only-a").await;
    let b_missing = runtime("run-only-a", "", "only-a");
    mesh.submit_as(B, &b_missing).await;
    let events = mesh.wait_terminal_of(B, "run-only-a", WAIT).await;
    assert_failed(&events, "scheduler", ErrorCode::NotFound);
    let mut by_ref = runtime("run-a-ref", "", "");
    by_ref.image_ref = a_ref.clone();
    mesh.submit_as(B, &by_ref).await;
    let events = mesh.wait_terminal_of(B, "run-a-ref", WAIT).await;
    let failed = assert_failed(&events, "scheduler", ErrorCode::Forbidden);
    assert!(failed.message.contains(&a_ref), "{}", failed.message);

    // The same request id in both tenants: two requests, each mounting its own tenant's image.
    mesh.submit_as(A, &runtime("run-app", "", "app")).await;
    mesh.submit_as(B, &runtime("run-app", "", "app")).await;
    let a_run = mesh.wait_terminal_of(A, "run-app", WAIT).await;
    let b_run = mesh.wait_terminal_of(B, "run-app", WAIT).await;
    assert_all_of(A, &a_run);
    assert_all_of(B, &b_run);
    assert_eq!(mounted_hello(&a_run).await, "tenant a\n");
    assert_eq!(mounted_hello(&b_run).await, "tenant b\n");
    assert_eq!(mounted(&a_run).details["mount_id"], format!("{A}_run-app"));
    assert_eq!(mounted(&b_run).details["mount_id"], format!("{B}_run-app"));

    // A container id B does not hold is not B's to take over, even for B's own image.
    mesh.submit_as(A, &runtime("run-ctr", "ctr-a", "app")).await;
    let a_ctr = mesh.wait_terminal_of(A, "run-ctr", WAIT).await;
    assert_eq!(mounted_hello(&a_ctr).await, "tenant a\n");
    mesh.submit_as(B, &runtime("run-ctr", "ctr-a", "app")).await;
    let b_ctr = mesh.wait_terminal_of(B, "run-ctr", WAIT).await;
    let failed = refused_by(&b_ctr, "mounter", ErrorCode::Forbidden);
    assert!(!failed.message.contains(&a_ref), "{}", failed.message);

    // A throughout: its record as built, its image as built, its other image mountable.
    assert_eq!(record(&mesh, A, "app").await, Some(a_record));
    assert_eq!(mounted_hello(&a_ctr).await, "tenant a\n");
    let a_only = runtime("run-only-a", "", "only-a");
    mesh.submit_as(A, &a_only).await;
    let events = mesh.wait_terminal_of(A, "run-only-a", WAIT).await;
    mounted(&events);
    assert_all_of(A, &events);

    let letters = mesh.dead_letters().await;
    let forbidden = letters
        .iter()
        .find(|l| l.request_id == "push-into-a")
        .expect("dead letter of the refused push");
    assert_eq!(forbidden.tenant, B);
    mesh.assert_no_secret_leaked(&[], &[REGISTRY_PASSWORD])
        .await;
}

/// A mesh of the scheduler and a credential service holding `secrets` besides the build
/// registry's account, with a probe standing in for builders and mounters.
async fn scheduler_mesh(secrets: &str) -> (Mesh, ServiceProcess, Probe) {
    let mut mesh = Mesh::start(two_tenants(MeshOptions {
        start: vec!["scheduler"],
        ..Default::default()
    }))
    .await;
    let config = format!("{}{secrets}", mesh.config("credential"));
    let credential = mesh.spawn_with_config("credential", &config, &[]).await;
    wait_for_service(&mesh.client, "credential", WAIT).await;
    let probe = Probe::start(&mesh.client).await;
    (mesh, credential, probe)
}

/// Runs the CLI as `tenant`, with that tenant's client identity.
fn cli(mesh: &Mesh, tenant: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin_path("imagemesh"))
        .args(args)
        .envs(mesh.cli_env_as(&format!("client-{tenant}")))
        .env("IMAGEMESH_TENANT", tenant)
        .output()
        .unwrap()
}

/// `options` with the client identities of both tenants, so the server knows them (and each
/// tenant's context bucket is provisioned) from the start.
fn two_tenants(mut options: MeshOptions) -> MeshOptions {
    for tenant in [A, B] {
        let role = imagemesh_access::Role::Client {
            tenant: tenant.into(),
        };
        options.identities.push((format!("client-{tenant}"), role));
    }
    options
}

#[tokio::test]
async fn a_named_credential_serves_only_the_tenants_it_is_bound_to() {
    let team_secret = "team-Pw-51tq";
    let secrets = format!(
        "[credential.secrets.team-hub]\ntenants = [\"{A}\"]\nrepository_prefix = \"team/app\"\n\
         provider = \"basic\"\nhost = \"registry.team.example\"\nusername = \"team-user\"\n\
         password = {{ value = \"{team_secret}\" }}\nshare_long_term_secret = true\n"
    );
    let (mesh, credential, probe) = scheduler_mesh(&secrets).await;

    // Both tenants record the same image id as pulled with team-hub; B's mapping is B's own.
    for tenant in [A, B] {
        let out = cli(&mesh, tenant, &["image-secret", "set", "app-1", "team-hub"]);
        assert!(out.status.success(), "{out:?}");
    }
    let out = cli(&mesh, A, &["image-secret", "set", "app-2", "team-hub"]);
    assert!(out.status.success(), "{out:?}");
    let out = cli(&mesh, B, &["image-secret", "get", "app-2"]);
    assert!(!out.status.success(), "A's mapping is not B's: {out:?}");

    let runtime = |id: &str, image_id: &str, image_ref: &str| ContainerRequest {
        request_id: id.into(),
        kind: RequestKind::Runtime as i32,
        image_id: image_id.into(),
        image_ref: image_ref.into(),
        ..Default::default()
    };
    let team_image = "registry.team.example/team/app:1";
    mesh.submit_as(A, &runtime("pull-1", "app-1", team_image))
        .await;
    mesh.submit_as(B, &runtime("pull-1", "app-1", team_image))
        .await;
    mesh.submit_as(
        A,
        &runtime("pull-2", "app-2", "registry.team.example/other/app:2"),
    )
    .await;

    // A gets the credential, for pulling its image...
    probe.wait_for(1, WAIT).await;
    let dispatched = probe.get_of(A, "pull-1").expect("A's request dispatched");
    assert_eq!(dispatched.tenant, A);
    let credential_of_a = dispatched.image_credentials.expect("the image's secret");
    assert_eq!(credential_of_a.username, "team-user");
    assert_eq!(credential_of_a.scope.unwrap().actions, vec!["pull"]);

    // ...B never does, though it names the same credential for the same image,
    let events = mesh.wait_terminal_of(B, "pull-1", WAIT).await;
    let failed = assert_failed(&events, "scheduler", ErrorCode::Forbidden);
    assert!(
        failed.message.contains("is not for tenant \"team-b\""),
        "{}",
        failed.message
    );
    assert!(probe.get_of(B, "pull-1").is_none());
    // ...and A only for repositories under the credential's prefix.
    let events = mesh.wait_terminal_of(A, "pull-2", WAIT).await;
    let failed = assert_failed(&events, "scheduler", ErrorCode::Forbidden);
    assert!(
        failed.message.contains("not for repository \"other/app\""),
        "{}",
        failed.message
    );

    let mut logs = credential.logs();
    logs.push_str(&mesh.all_logs());
    assert!(
        !logs.contains(team_secret),
        "the team secret leaked into a log"
    );
}

#[tokio::test]
async fn the_intake_subject_decides_the_tenant_and_request_ids_are_per_tenant() {
    let (mesh, _credential, probe) = scheduler_mesh("").await;
    let registry = mesh.registry.addr().to_string();
    let build = |id: &str, dockerfile: &str| ContainerRequest {
        request_id: id.into(),
        image_id: format!("img-{id}"),
        kind: RequestKind::Build as i32,
        build_options: Some(BuildOptions {
            dockerfile: dockerfile.into(),
            ..Default::default()
        }),
        ..Default::default()
    };

    // One id, two tenants: two requests, dispatched and reported apart.
    mesh.submit_as(A, &build("same", "FROM scratch\n")).await;
    mesh.submit_as(B, &build("same", "FROM scratch\n")).await;
    probe.wait_for(2, WAIT).await;
    for tenant in [A, B] {
        let request = probe.get_of(tenant, "same").expect("dispatched");
        assert_eq!(request.tenant, tenant);
        let scope = request.build_registry_creds.unwrap().scope.unwrap();
        assert_eq!(scope.repository, format!("imagemesh/builds/{tenant}"));
        let events = mesh.events_of(tenant, "same").await;
        assert_eq!(
            events.iter().filter(|e| e.phase == "dispatched").count(),
            1,
            "{}",
            describe(&events)
        );
        assert_all_of(tenant, &events);
    }

    // A payload naming another tenant than its subject is refused, on the subject's tenant.
    let mut claims_a = build("claims-a", "FROM scratch\n");
    claims_a.tenant = A.into();
    mesh.submit_as(B, &claims_a).await;
    let events = mesh.wait_terminal_of(B, "claims-a", WAIT).await;
    let failed = assert_failed(&events, "scheduler", ErrorCode::MalformedRequest);
    assert!(
        failed.message.contains("is not the one its subject names"),
        "{}",
        failed.message
    );
    assert!(mesh.events_of(A, "claims-a").await.is_empty());

    // Base images in the build registry: shared repositories for everyone, another tenant's
    // repository for nobody else.
    let shared_base = format!("FROM {registry}/base/busybox:1\n");
    mesh.submit_as(B, &build("shared-base", &shared_base)).await;
    let a_base = format!("FROM {registry}/imagemesh/builds/{A}:app\n");
    mesh.submit_as(B, &build("a-base", &a_base)).await;
    mesh.submit_as(A, &build("own-base", &a_base)).await;
    probe.wait_for(4, WAIT).await;
    let shared = probe.get_of(B, "shared-base").expect("dispatched");
    assert_eq!(shared.base_image_credentials.len(), 1);
    let own = probe.get_of(A, "own-base").expect("dispatched");
    assert_eq!(
        own.base_image_credentials[0]
            .scope
            .as_ref()
            .unwrap()
            .repository,
        format!("imagemesh/builds/{A}")
    );
    let events = mesh.wait_terminal_of(B, "a-base", WAIT).await;
    assert_failed(&events, "scheduler", ErrorCode::Forbidden);
    assert!(probe.get_of(B, "a-base").is_none());

    // The CLI acts as its tenant and says FORBIDDEN when the scheduler does.
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = dir.path().join("Dockerfile");
    std::fs::write(&dockerfile, "FROM scratch\n").unwrap();
    let out = cli(
        &mesh,
        B,
        &[
            "submit",
            "--kind",
            "build",
            "--request-id",
            "cli-outside",
            "--image-id",
            "x",
            "--repository",
            &format!("imagemesh/builds/{A}"),
            "--dockerfile",
            dockerfile.to_str().unwrap(),
            "--watch",
            "--timeout",
            "1m",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("request cli-outside failed (FORBIDDEN)"),
        "{stdout}"
    );
    let out = cli(&mesh, "Not_A_Tenant", &["watch", "x"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a valid name"),
        "{out:?}"
    );
}
