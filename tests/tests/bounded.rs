//! Bounded storage against the real nats-server: every stream, KV bucket and object store of a
//! provisioned mesh has a max_age, a max_bytes and a max_msg_size; the operator's provisioning
//! updates the limits of existing streams; a full intake and a request over its max_msg_size are
//! refused to the client with a clear message, and nothing already accepted is lost.

use std::process::Command;
use std::time::Duration;

use imagemesh_proto::v1::ContainerRequest;
use imagemesh_runtime::streams::{self, StreamOptions};
use imagemesh_testkit::{bin_path, eventually};
use imagemesh_tests::{Mesh, MeshOptions, assert_succeeded};

const WAIT: Duration = Duration::from_secs(45);

/// Runs `imagemesh` as the default tenant's client; returns (success, stdout + stderr).
async fn cli(mesh: &Mesh, args: &[&str]) -> (bool, String) {
    let mut command = Command::new(bin_path("imagemesh"));
    command.args(args).envs(mesh.cli_env());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("run imagemesh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

async fn submit_build(mesh: &Mesh, id: &str, dockerfile: &std::path::Path) -> (bool, String) {
    let image = format!("img-{id}");
    let dockerfile = dockerfile.to_str().unwrap();
    let args = [
        "submit",
        "--kind",
        "build",
        "--request-id",
        id,
        "--image-id",
        &image,
        "--dockerfile",
        dockerfile,
    ];
    cli(mesh, &args).await
}

fn build_request(id: &str) -> ContainerRequest {
    imagemesh_tests::build_request(id, "FROM scratch\n", "")
}

#[tokio::test]
async fn everything_a_provisioned_mesh_stores_is_bounded() {
    let mesh = Mesh::start(MeshOptions {
        start: vec![],
        ..Default::default()
    })
    .await;
    let tenants = mesh.bundle().expect("secured mesh").spec().tenants.clone();
    let js = async_nats::jetstream::new(mesh.client.clone());
    let names = streams::all_stream_names(&tenants);
    // Six streams, three KV buckets, the layer-index cache and a context bucket per tenant.
    assert_eq!(names.len(), 10 + tenants.len());
    for name in names {
        // `$JS.API.STREAM.INFO.<name>` as the operator.
        let info = js
            .get_stream(&name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .info()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .config
            .clone();
        assert!(!info.max_age.is_zero(), "{name} has no max_age");
        assert!(info.max_bytes > 0, "{name} has no max_bytes");
        assert!(info.max_message_size > 0, "{name} has no max_msg_size");
    }
}

#[tokio::test]
async fn a_full_intake_refuses_clearly_and_loses_nothing() {
    // No scheduler: nothing drains the intake.
    let mut mesh = Mesh::start(MeshOptions {
        start: vec!["credential", "builder"],
        ..Default::default()
    })
    .await;
    // One index at a time: indexers pushing identical index blobs of identical images to one
    // repository at once can lose the race at the registry (HTTP 400), which is not what this
    // test is about.
    mesh.start_instance(
        "indexer",
        "indexer",
        &[("IMAGEMESH_INDEXER__WORKER__CONCURRENCY", "1")],
    )
    .await;
    let tenants = mesh.bundle().unwrap().spec().tenants.clone();
    let js = async_nats::jetstream::new(mesh.client.clone());

    // The operator provisions the existing mesh again with a tiny intake: the update applies.
    let tiny = StreamOptions {
        intake_max_msgs: 3,
        intake_max_msg_size: 4096,
        // Buckets and object stores are updated too.
        records_max_bytes: 32 << 20,
        contexts_max_bytes: 512 << 20,
        layer_index_max_age: Duration::from_secs(24 * 3600),
        ..Default::default()
    };
    streams::provision_all(&js, &tiny, &tenants, mesh.options.heartbeat)
        .await
        .expect("the operator provisions again");
    let intake = js
        .get_stream(streams::INTAKE)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(intake.max_messages, 3);
    assert_eq!(intake.max_message_size, 4096);
    let config_of = |name: String| {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream(&name).await.unwrap();
            stream.info().await.unwrap().config.clone()
        }
    };
    for bucket in [
        "imagemesh-image-refs",
        "imagemesh-image-secrets",
        "imagemesh-workers",
    ] {
        let config = config_of(format!("KV_{bucket}")).await;
        assert_eq!(config.max_bytes, 32 << 20, "{bucket}");
    }
    for tenant in &tenants {
        let bucket = streams::contexts_bucket(tenant);
        let config = config_of(format!("OBJ_{bucket}")).await;
        assert_eq!(config.max_bytes, 512 << 20, "{bucket}");
    }
    let layers = config_of(format!("OBJ_{}", streams::LAYER_INDEX_BUCKET)).await;
    assert_eq!(layers.max_age, Duration::from_secs(24 * 3600));

    let dir = tempfile::tempdir().unwrap();
    let dockerfile = dir.path().join("Dockerfile");
    std::fs::write(&dockerfile, "FROM scratch\n").unwrap();
    let huge = dir.path().join("Dockerfile.huge");
    std::fs::write(&huge, format!("FROM scratch\n#{}\n", "x".repeat(8192))).unwrap();

    // A request over max_msg_size is refused, saying why.
    let (ok, said) = submit_build(&mesh, "oversize", &huge).await;
    assert!(!ok, "an oversize request was accepted:\n{said}");
    assert!(
        said.contains("the request is larger than the intake's max_msg_size"),
        "{said}"
    );
    assert!(said.contains("was not accepted"), "{said}");

    // Three fit (two through the CLI, one the way the harness submits).
    let mut accepted = Vec::new();
    for id in ["full-1", "full-2"] {
        let (ok, said) = submit_build(&mesh, id, &dockerfile).await;
        assert!(ok, "{id} refused:\n{said}");
        accepted.push(id);
    }
    mesh.try_submit(&build_request("full-3")).await.unwrap();
    accepted.push("full-3");

    // The fourth is refused, through the CLI and through the harness: never silently dropped.
    let (ok, said) = submit_build(&mesh, "full-4", &dockerfile).await;
    assert!(!ok, "a request past a full intake was accepted:\n{said}");
    assert!(said.contains("the intake is full"), "{said}");
    assert!(said.contains("request full-4 was not accepted"), "{said}");
    let refused = mesh.try_submit(&build_request("full-5")).await.unwrap_err();
    assert!(refused.contains("the intake is full"), "{refused}");

    // The same when it is max_bytes that is reached: room for the requests held, not another.
    let held = js
        .get_stream(streams::INTAKE)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .bytes;
    let by_bytes = StreamOptions {
        intake_max_bytes: i64::try_from(held).unwrap() + 64,
        ..tiny.clone()
    };
    let by_bytes = StreamOptions {
        intake_max_msgs: 1000,
        ..by_bytes
    };
    streams::provision_all(&js, &by_bytes, &tenants, mesh.options.heartbeat)
        .await
        .unwrap();
    let (ok, said) = submit_build(&mesh, "full-6", &dockerfile).await;
    assert!(!ok, "a request past a full intake was accepted:\n{said}");
    assert!(said.contains("the intake is full (max_bytes"), "{said}");

    // Nothing accepted was lost: once a scheduler runs, every accepted request completes.
    let stored = eventually(WAIT, "the intake holds the accepted requests", || {
        let js = js.clone();
        async move {
            let info = js
                .get_stream(streams::INTAKE)
                .await
                .ok()?
                .info()
                .await
                .ok()?
                .state
                .messages;
            (info == 3).then_some(info)
        }
    })
    .await;
    assert_eq!(stored, 3);
    mesh.start_service("scheduler").await;
    for id in accepted {
        let events = mesh.wait_terminal(id, WAIT).await;
        assert_succeeded(&events);
    }
    // The refused ids were never queued.
    for id in ["oversize", "full-4", "full-5", "full-6"] {
        assert!(mesh.events(id).await.is_empty(), "{id} was queued");
    }
}
