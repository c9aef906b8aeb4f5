//! Registry faults end to end: an image on a registry behind a fault proxy is indexed, then
//! mounted for a stream of runtime requests while the proxy answers 503, closes connections
//! without answering and stalls, and then recovers. Every request ends (mounted, or failed with
//! a reason), none is lost, none is mounted twice, and every mount reads the right bytes.
//! A registry that stops answering fails reads on a live mount with EIO and new mounts with
//! REGISTRY_UNAVAILABLE, each at its deadline; the mount stays and reads again once it answers.

mod indexer_support;
mod mounter_support;

use std::time::Duration;

use imagemesh_proto::v1::ErrorCode;
use imagemesh_proto::v1::{AuthScheme, IndexRequest, RegistryCredential, RequestState};
use imagemesh_runtime::subjects;
use imagemesh_testkit::fault_proxy::{Fault, FaultProxy};
use imagemesh_testkit::oci_images::OciLayout;
use imagemesh_testkit::{Registry, RegistryAuth};
use imagemesh_tests::{Mesh, MeshOptions, assert_gave_up, describe};
use mounter_support::{WAIT, mounted, read_file, run, runtime_request, start_mounter};

/// An index request for `image_ref` on the open registry behind the proxy.
fn index_request(id: &str, proxy: &FaultProxy, image_ref: &str) -> IndexRequest {
    IndexRequest {
        request_id: id.into(),
        tenant: imagemesh_proto::DEFAULT_TENANT.into(),
        image_ref: image_ref.into(),
        // The registry is open; the indexer still wants a credential to store with.
        credential: Some(RegistryCredential {
            registry: proxy.addr().to_string(),
            scheme: AuthScheme::Basic as i32,
            username: "anyone".into(),
            secret: "unused".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

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
    let index = index_request("index-app", &proxy, &image_ref);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_stops_answering_fails_reads_and_mounts_at_their_deadlines() {
    let upstream = Registry::start(RegistryAuth::Open);
    let proxy = FaultProxy::start(upstream.addr());
    let options = MeshOptions {
        start: vec!["credential", "scheduler", "indexer"],
        max_deliver: 2,
        ..Default::default()
    };
    // Each registry request may wait 20 s; the deadlines cut a stall much sooner.
    let deadlines = [
        ("IMAGEMESH_MOUNTER__REGISTRY__READ_TIMEOUT", "20s"),
        ("IMAGEMESH_MOUNTER__READS__DEADLINE", "2s"),
        ("IMAGEMESH_MOUNTER__READS__RETRY_INITIAL", "100ms"),
        ("IMAGEMESH_MOUNTER__PREPARE_DEADLINE", "2s"),
    ];
    let mut mesh = start_mounter(Mesh::start(options).await, &deadlines).await;
    let layout = OciLayout::new();
    indexer_support::images::build_full(&layout, "full");
    layout.push(
        "full",
        &format!("{}/test/full:v1", upstream.addr()),
        "anyone",
        "unused",
    );
    let image_ref = format!("{}/test/full:v1", proxy.addr());
    let index = index_request("index-full", &proxy, &image_ref);
    mesh.publish_work(subjects::INDEX, &index).await;
    let events = mesh.wait_terminal("index-full", WAIT).await;
    assert_eq!(
        events.last().unwrap().state(),
        RequestState::Succeeded,
        "{}",
        describe(&events)
    );
    mounted(&run(&mesh, &runtime_request("live", "ctr-live", &image_ref)).await);
    let rootfs = layout.unpack("full", &layout.scratch("unpacked").join("bundle"));
    let mount = mesh.mount_root().canonicalize().unwrap().join("ctr-live");
    let small = "small/d1/f1.txt";
    assert_eq!(
        read_file(mount.join(small)).await,
        std::fs::read(rootfs.join(small)).unwrap()
    );

    // The registry accepts connections and never answers. A read of data not fetched yet fails
    // with EIO (reads.deadline), not hanging; the guard below only catches a hang.
    let mounter_pid = mesh.service("mounter").pid().expect("the mounter runs");
    let threads_before = threads(mounter_pid);
    proxy.set(Fault::Stall);
    let big = mount.join("big/random.bin");
    let path = big.clone();
    let stalled = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || std::fs::read(path)),
    )
    .await
    .expect("a read during a stall ends")
    .unwrap();
    let err = stalled.expect_err("a read with no registry fails");
    assert_eq!(err.raw_os_error(), Some(5), "EIO: {err}");
    let logs = mesh.service("mounter").logs();
    assert!(
        logs.contains("read failed") && logs.contains("ctr-live") && logs.contains("longer than"),
        "the failed read is logged with its mount and the deadline"
    );

    // A new mount during the stall is handed back at prepare_deadline and given up.
    let events = run(
        &mesh,
        &runtime_request("stalled", "ctr-stalled", &image_ref),
    )
    .await;
    let last = assert_gave_up(&events, "mounter", ErrorCode::RegistryUnavailable, 2);
    assert!(
        last.message.contains("took longer than"),
        "{}",
        last.message
    );

    // The registry answers again: the same mount reads the file, byte for byte.
    proxy.set(Fault::None);
    assert!(
        read_file(big).await == std::fs::read(rootfs.join("big/random.bin")).unwrap(),
        "the mount reads again after the registry recovers"
    );
    assert_eq!(
        mesh.mounted(),
        vec![mount],
        "the live mount stayed, the stalled one never came"
    );
    // Nothing the stall started is left hanging: the mounter's threads come back to what they
    // were before it (the async runtime's idle blocking threads retire after 10 s).
    imagemesh_testkit::eventually(WAIT, "the mounter's threads to settle", || async {
        (threads(mounter_pid) <= threads_before).then_some(())
    })
    .await;
}

/// Threads of process `pid` now.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| tasks.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_pass_against_a_silent_registry_ends_at_its_deadline() {
    let upstream = Registry::start(RegistryAuth::Open);
    let proxy = FaultProxy::start(upstream.addr());
    let options = MeshOptions {
        start: vec!["credential", "scheduler"],
        max_deliver: 2,
        ..Default::default()
    };
    let mut mesh = Mesh::start(options).await;
    // Each registry request may wait 20 s; the index pass as a whole gets 2 s.
    let deadline = [
        ("IMAGEMESH_INDEXER__REGISTRY__READ_TIMEOUT", "20s"),
        ("IMAGEMESH_INDEXER__INDEX_DEADLINE", "2s"),
    ];
    mesh.start_instance("indexer", "indexer", &deadline).await;
    let addr = upstream.addr().to_string();
    tokio::task::spawn_blocking(move || {
        imagemesh_testkit::images::push_busybox(&addr, "test/app:1", "anyone", "unused")
    })
    .await
    .unwrap();
    proxy.set(Fault::Stall);
    let image_ref = format!("{}/test/app:1", proxy.addr());
    let index = index_request("index-stalled", &proxy, &image_ref);
    mesh.publish_work(subjects::INDEX, &index).await;
    let events = mesh.wait_terminal("index-stalled", WAIT).await;
    let last = assert_gave_up(&events, "indexer", ErrorCode::RegistryUnavailable, 2);
    assert!(
        last.message.contains("took longer than"),
        "{}",
        last.message
    );

    // Answering again, the same image indexes.
    proxy.set(Fault::None);
    let index = index_request("index-recovered", &proxy, &image_ref);
    mesh.publish_work(subjects::INDEX, &index).await;
    let events = mesh.wait_terminal("index-recovered", WAIT).await;
    assert_eq!(
        events.last().unwrap().state(),
        RequestState::Succeeded,
        "{}",
        describe(&events)
    );
}
