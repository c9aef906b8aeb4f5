//! Registry faults end to end: an image on a registry behind a fault proxy is indexed, then
//! mounted for a stream of runtime requests while the proxy answers 503, closes connections
//! without answering and stalls, and then recovers. Every request ends (mounted, or failed with
//! a reason), none is lost, none is mounted twice, and every mount reads the right bytes.

mod mounter_support;

use std::time::Duration;

use imagemesh_proto::v1::{AuthScheme, IndexRequest, RegistryCredential, RequestState};
use imagemesh_runtime::subjects;
use imagemesh_testkit::fault_proxy::{Fault, FaultProxy};
use imagemesh_testkit::{Registry, RegistryAuth};
use imagemesh_tests::{Mesh, MeshOptions, describe};
use mounter_support::{WAIT, read_file, runtime_request, start_mounter};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_requests_through_registry_faults_all_end_and_none_is_lost_or_doubled() {
    let upstream = Registry::start(RegistryAuth::Open);
    let proxy = FaultProxy::start(upstream.addr());
    let options = MeshOptions {
        start: vec!["credential", "scheduler", "indexer"],
        // Room for retries through a fault phase (backoff 100 ms .. 400 ms).
        max_deliver: 20,
        ..Default::default()
    };
    // A stalled registry costs a read 1 s, not the default 30 s.
    let fast = [
        ("IMAGEMESH_MOUNTER__REGISTRY__READ_TIMEOUT", "1s"),
        ("IMAGEMESH_MOUNTER__REGISTRY__CONNECT_TIMEOUT", "1s"),
    ];
    let mesh = start_mounter(Mesh::start(options).await, &fast).await;
    let addr = upstream.addr().to_string();
    tokio::task::spawn_blocking(move || {
        imagemesh_testkit::images::push_busybox(&addr, "test/app:1", "anyone", "unused")
    })
    .await
    .unwrap();
    // Indexed through the proxy (the index is stored next to the image, there too).
    let image_ref = format!("{}/test/app:1", proxy.addr());
    let index = IndexRequest {
        request_id: "index-app".into(),
        tenant: imagemesh_proto::DEFAULT_TENANT.into(),
        image_ref: image_ref.clone(),
        // The registry is open; the indexer still wants a credential to store with.
        credential: Some(RegistryCredential {
            registry: proxy.addr().to_string(),
            scheme: AuthScheme::Basic as i32,
            username: "anyone".into(),
            secret: "unused".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    mesh.publish_work(subjects::INDEX, &index).await;
    let events = mesh.wait_terminal("index-app", WAIT).await;
    assert_eq!(
        events.last().unwrap().state(),
        RequestState::Succeeded,
        "{}",
        describe(&events)
    );

    // Three requests in each phase; the fault holds while they are tried, then the next.
    let phases = [
        Fault::None,
        Fault::ServerError,
        Fault::Close,
        Fault::Stall,
        Fault::None,
    ];
    let mut sent = Vec::new();
    for (phase, fault) in phases.iter().enumerate() {
        proxy.set(*fault);
        for n in 0..3 {
            let id = format!("run-{phase}-{n}");
            let request = runtime_request(&id, &format!("ctr-{phase}-{n}"), &image_ref);
            mesh.submit(&request).await;
            sent.push(id);
        }
        // Not an assertion: how long the fault lasts while requests retry.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    proxy.set(Fault::None);

    let tally = mesh.tally(&sent, "mounted").await;
    tally.report("registry faults");
    assert!(
        tally.retries > 0,
        "no request met a fault: the proxy injected nothing"
    );
    // The requests sent while the registry was healthy, and after it recovered, all mounted.
    for id in [
        "run-0-0", "run-0-1", "run-0-2", "run-4-0", "run-4-1", "run-4-2",
    ] {
        assert!(!tally.has_failed(id), "{id} failed: {:?}", tally.failed);
    }

    // Every mount reads the right bytes now that the registry is back.
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let root = mesh.mount_root().canonicalize().unwrap();
    for id in &sent {
        if tally.has_failed(id) {
            continue;
        }
        let container = id.replacen("run-", "ctr-", 1);
        let read = read_file(root.join(container).join("bin/busybox")).await;
        assert!(read == busybox, "{id}: wrong bytes through the mount");
    }
}
