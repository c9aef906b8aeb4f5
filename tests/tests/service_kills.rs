//! kill -9 of a service in the middle of a stream of requests, then a restart: every request
//! ends (completed, or failed with a reason), none is lost, and no effect happens twice
//! (counted at the effect: `pushed` and `mounted` events, and terminal events, per request).
//! The scheduler's own kill test is in `scheduler.rs`.

mod mounter_support;

use imagemesh_testkit::eventually;
use imagemesh_tests::{Mesh, MeshOptions, build_request};
use mounter_support::{WAIT, runtime_request, start_mounter};

/// Waits until any of `ids` reports `phase` from `service`: the moment to kill it.
async fn until_working(mesh: &Mesh, ids: &[String], service: &str, phase: &str) {
    eventually(
        WAIT,
        &format!("the {service} at work ({phase})"),
        || async {
            for id in ids {
                if mesh
                    .events(id)
                    .await
                    .iter()
                    .any(|e| e.service == service && e.phase == phase)
                {
                    return Some(());
                }
            }
            None
        },
    )
    .await;
}

fn builds(prefix: &str, n: usize) -> Vec<(String, imagemesh_proto::v1::ContainerRequest)> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            let dockerfile = format!("FROM scratch\nENV N={i}\n");
            (id.clone(), build_request(&id, &dockerfile, ""))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_killed_mid_build() {
    let mut mesh = Mesh::start(MeshOptions {
        start: vec!["credential", "scheduler", "builder", "indexer"],
        max_deliver: 10,
        ..Default::default()
    })
    .await;
    let requests = builds("kb", 6);
    let sent: Vec<String> = requests.iter().map(|(id, _)| id.clone()).collect();
    for (_, request) in &requests {
        mesh.submit(request).await;
    }
    until_working(&mesh, &sent, "builder", "building").await;
    mesh.service("builder").kill();
    mesh.service("builder").restart();
    mesh.tally(&sent, "pushed")
        .await
        .report("builder killed mid-build");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_service_killed_mid_mint() {
    let mut mesh = Mesh::start(MeshOptions {
        start: vec!["credential", "scheduler", "builder", "indexer"],
        max_deliver: 10,
        // The scheduler retries minting while the credential service is away.
        intake_max_deliver: Some(50),
        ..Default::default()
    })
    .await;
    let requests = builds("kc", 6);
    let sent: Vec<String> = requests.iter().map(|(id, _)| id.clone()).collect();
    for (_, request) in &requests[..3] {
        mesh.submit(request).await;
    }
    mesh.service("credential").kill();
    for (_, request) in &requests[3..] {
        mesh.submit(request).await;
    }
    // The scheduler retries while the credential service is away.
    until_working(&mesh, &sent[3..], "scheduler", "retrying").await;
    mesh.service("credential").restart();
    mesh.tally(&sent, "pushed")
        .await
        .report("credential killed mid-mint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounter_killed_mid_mount() {
    let options = MeshOptions {
        start: vec!["credential", "scheduler", "indexer"],
        max_deliver: 10,
        ..Default::default()
    };
    let mut mesh = start_mounter(Mesh::start(options).await, &[]).await;
    let image = mesh.push_indexed_image("killed").await;
    let sent: Vec<String> = (0..6).map(|i| format!("km-{i}")).collect();
    for (i, id) in sent.iter().enumerate() {
        mesh.submit(&runtime_request(id, &format!("ctr-km-{i}"), &image))
            .await;
    }
    until_working(&mesh, &sent, "mounter", "authenticated").await;
    mesh.service("mounter").kill();
    // A killed mounter's FUSE mounts are dead; the next one detaches them before serving.
    mesh.service("mounter").restart();
    mesh.tally(&sent, "mounted")
        .await
        .report("mounter killed mid-mount");
    // Mounts the killed process had made went with it (its FUSE sessions): only those made by
    // the restarted one remain. Surviving a restart is the mounter-as-node-infrastructure work.
    let remaining = mesh.mounted().len();
    eprintln!(
        "  {remaining} of {} mounts remain after the kill",
        sent.len()
    );
    assert!(remaining > 0, "the restarted mounter mounted nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexer_killed_mid_layer() {
    let mut mesh = Mesh::start(MeshOptions {
        start: vec!["credential", "scheduler", "indexer"],
        max_deliver: 10,
        ..Default::default()
    })
    .await;
    let registry = mesh.registry.addr().to_string();
    let repository = "imagemesh/builds/default";
    let mut sent = Vec::new();
    for i in 0..4 {
        let (user, password) = mesh.registry_login(repository, true).await;
        let (at, tag) = (registry.clone(), format!("{repository}:ki-{i}"));
        tokio::task::spawn_blocking(move || {
            imagemesh_testkit::images::push_busybox(&at, &tag, &user, &password)
        })
        .await
        .unwrap();
        let request = imagemesh_proto::v1::IndexRequest {
            request_id: format!("ki-{i}"),
            tenant: imagemesh_proto::DEFAULT_TENANT.into(),
            image_ref: format!("{registry}/{repository}:ki-{i}"),
            credential: Some(mesh.registry_credential(repository, true).await),
            ..Default::default()
        };
        mesh.publish_work(imagemesh_runtime::subjects::INDEX, &request)
            .await;
        sent.push(request.request_id);
    }
    until_working(&mesh, &sent, "indexer", "resolved").await;
    mesh.service("indexer").kill();
    mesh.service("indexer").restart();
    mesh.tally(&sent, "stored")
        .await
        .report("indexer killed mid-layer");
}
