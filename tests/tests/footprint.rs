//! The mounter's footprint over many mounts: 200 mount → read → unmount cycles through the real
//! mesh (runtime requests through the scheduler, 8 at a time) leave no mount behind, and the
//! mounter holds exactly the descriptors and no more threads than it did after a warm-up.
//! Not a timing test: the soak benchmark (`bench/soak`) measures memory over longer runs.

mod mounter_support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use imagemesh_runtime::telemetry::process::Footprint;
use imagemesh_tests::{BuildRegistryAuth, Mesh, MeshOptions};
use mounter_support::{
    WORKER_ID, control, mounted, mountpoint, run, runtime_request, start_mounter,
};

const WARM_UP: usize = 16;
const CYCLES: usize = 200;
const AT_ONCE: usize = 8;

/// Mounts `image` as container `id`, reads a directory and a file through the mount, unmounts.
async fn cycle(mesh: &Mesh, image: &str, id: String) {
    let events = run(mesh, &runtime_request(&id, &id, image)).await;
    mounted(&events);
    let root = mountpoint(mesh, &id);
    let read = tokio::task::spawn_blocking(move || {
        let entries = std::fs::read_dir(root.join("bin"))
            .expect("read /bin")
            .count();
        let busybox = std::fs::read(root.join("bin/busybox")).expect("read /bin/busybox");
        (entries, busybox.len())
    })
    .await
    .expect("read task");
    assert!(read.0 > 100 && read.1 > 100_000, "{read:?}");
    control(mesh, &format!("imagemesh.mounter.{WORKER_ID}.unmount"), &id)
        .await
        .unwrap_or_else(|e| panic!("unmount {id}: {e:?}"));
}

async fn cycles(mesh: &Mesh, image: &str, prefix: &str, count: usize) {
    futures::stream::iter(0..count)
        .map(|i| cycle(mesh, image, format!("{prefix}-{i}")))
        .buffer_unordered(AT_ONCE)
        .collect::<Vec<()>>()
        .await;
}

/// The mounter's footprint once idle: the lowest descriptor and thread counts seen over
/// `quiet` (tokio's blocking threads end after 10 s idle, FUSE threads when a mount ends).
async fn settled(pid: u32, quiet: Duration) -> Footprint {
    let start = Instant::now();
    let mut low = Footprint::of_pid(pid).expect("the mounter runs");
    while start.elapsed() < quiet {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = Footprint::of_pid(pid).expect("the mounter runs");
        low.fds = low.fds.min(now.fds);
        low.threads = low.threads.min(now.threads);
        low.rss_bytes = now.rss_bytes;
    }
    Footprint::of_pid(pid)
        .map(|now| Footprint {
            rss_bytes: now.rss_bytes,
            ..low
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_mounts_leave_no_mount_no_descriptor_and_no_thread_behind() {
    let options = MeshOptions {
        build_registry_auth: BuildRegistryAuth::Basic,
        start: vec!["credential", "scheduler", "indexer"],
        // Plain logs: debug logging of 200 mounts only slows the mesh down.
        env: vec![("RUST_LOG".into(), "info".into())],
        ..Default::default()
    };
    let mut mesh = start_mounter(Mesh::start(options).await, &[]).await;
    let image = mesh.push_indexed_image("soak").await;
    let pid = mesh.service("mounter").pid().expect("mounter pid");

    cycles(&mesh, &image, "warm", WARM_UP).await;
    let before = settled(pid, Duration::from_secs(12)).await;
    eprintln!("after {WARM_UP} warm-up cycles: {before:?}");

    let started = Instant::now();
    cycles(&mesh, &image, "soak", CYCLES).await;
    eprintln!(
        "{CYCLES} cycles, {AT_ONCE} at a time, in {:?}: {:?}",
        started.elapsed(),
        Footprint::of_pid(pid)
    );
    assert!(
        mesh.mounted().is_empty(),
        "mounts left: {:?}",
        mesh.mounted()
    );
    let listing = control(&mesh, &format!("imagemesh.mounter.{WORKER_ID}.mounts"), "")
        .await
        .expect("mounts listing");
    assert_eq!(
        listing["mounts"].as_array().map(Vec::len),
        Some(0),
        "{listing}"
    );
    assert_eq!(listing["index_memory"]["bytes"], 0, "{listing}");
    let left: Vec<_> = std::fs::read_dir(mesh.mount_root())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "mount points left: {left:?}");

    let after = settled(pid, Duration::from_secs(12)).await;
    eprintln!("after {CYCLES} more cycles: {after:?}");
    assert_eq!(
        after.fds, before.fds,
        "descriptors: {before:?} then {after:?}"
    );
    assert!(
        after.threads <= before.threads,
        "threads: {before:?} then {after:?}"
    );
}
