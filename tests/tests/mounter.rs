//! The mounter end to end: a four-layer umoci image pushed to the build registry and indexed by
//! the indexer is mounted for a runtime request that went through the scheduler (which attached
//! the pull-only build-registry token); the mount is read-only FUSE, its tree and bytes equal
//! `umoci unpack`, a small file of a big layer is read with a small fraction of the layer, a
//! second request for the same container mounts nothing new, and unmount leaves nothing behind.

mod indexer_support;
mod mounter_support;

use imagemesh_proto::v1::ErrorCode;
use imagemesh_testkit::oci_images::{OciLayout, have_image_tools};
use imagemesh_tests::{BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, describe, find};
use indexer_support::{images, push_and_index_full};
use mounter_support::tree::assert_same_tree;
use mounter_support::{
    WORKER_ID, control, detail, mount_stats, mounted, read_file, run, runtime_request,
    start_mounter, wait_until_serving,
};

/// A mesh (credential, scheduler, indexer, mounter) with the `full` test image pushed and
/// indexed; returns the image reference and the umoci layout.
async fn mesh_with_indexed_image() -> (Mesh, String, OciLayout) {
    assert!(
        have_image_tools(),
        "umoci and skopeo are needed (make deps installs them)"
    );
    let options = MeshOptions {
        build_registry_auth: BuildRegistryAuth::Basic,
        start: vec!["credential", "scheduler", "indexer"],
        max_deliver: 3,
        ..Default::default()
    };
    let mesh = start_mounter(Mesh::start(options).await, &[]).await;
    let layout = OciLayout::new();
    let image = push_and_index_full(&mesh, &layout).await;
    (mesh, image, layout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_request_mounts_the_image_lazily_and_it_reads_like_umoci_unpacks_it() {
    let (mesh, image, layout) = mesh_with_indexed_image().await;
    let events = run(&mesh, &runtime_request("run-1", "ctr-1", &image)).await;
    let done = mounted(&events);
    let mountpoint = mesh.mount_root().canonicalize().unwrap().join("ctr-1");
    assert_eq!(detail(done, "mountpoint"), mountpoint.to_str().unwrap());
    assert_eq!(detail(done, "image_digest"), layout.digest("full"));
    assert_eq!(detail(done, "existing"), "false");
    assert!(
        detail(done, "files").parse::<usize>().unwrap() > 250,
        "{:?}",
        done.details
    );
    assert_eq!(detail(done, "worker"), WORKER_ID);
    assert!(
        find(&events, "mounter", "resolved").is_some(),
        "{}",
        describe(&events)
    );
    eprintln!("time to mount: {} s", detail(done, "seconds"));
    assert_eq!(
        mesh.mounted(),
        vec![mountpoint.clone()],
        "one FUSE mount in /proc/mounts"
    );
    let line = std::fs::read_to_string("/proc/mounts").unwrap();
    let line = line
        .lines()
        .find(|l| l.contains(mountpoint.to_str().unwrap()))
        .unwrap();
    assert!(line.contains(" fuse") && line.contains("ro,"), "{line}");

    // Before anything else is read: one small file of the 25 MB layer.
    let rootfs = layout.unpack("full", &layout.scratch("unpacked").join("bundle"));
    let small = read_file(mountpoint.join("small/d1/f1.txt")).await;
    assert_eq!(
        small,
        std::fs::read(rootfs.join("small/d1/f1.txt")).unwrap()
    );
    let stats = mount_stats(&mesh, "ctr-1").await;
    let fetched = stats["reads"]["bytes_fetched"].as_u64().unwrap();
    let manifest = layout.json_blob(&layout.digest("full"));
    let layer = manifest["layers"][0]["size"].as_u64().unwrap();
    eprintln!("small read fetched {fetched} bytes of a {layer}-byte layer: {stats}");
    assert!(layer > images::RANDOM_SIZE as u64, "{manifest}");
    assert!(
        fetched > 0 && fetched * 4 < layer,
        "fetched {fetched} of {layer}: {stats}"
    );

    let files = assert_same_tree(&mountpoint, &rootfs);
    assert!(files.len() > 250, "only {} files", files.len());
    let started = std::time::Instant::now();
    for (path, _) in &files {
        let ours = read_file(mountpoint.join(&path[1..])).await;
        assert!(
            ours == std::fs::read(rootfs.join(&path[1..])).unwrap(),
            "{path}: bytes differ"
        );
    }
    let stats = mount_stats(&mesh, "ctr-1").await;
    eprintln!("read every file in {:?}: {stats}", started.elapsed());
    let through_link = read_file(mountpoint.join("bin/big-dir/text.log")).await;
    assert!(through_link == std::fs::read(rootfs.join("big/text.log")).unwrap());
    let write = std::fs::OpenOptions::new()
        .write(true)
        .open(mountpoint.join("edit/me"));
    assert!(write.is_err(), "the mount is read-only");

    // Reading everything again is served from the caches: nothing more is fetched.
    let before = mount_stats(&mesh, "ctr-1").await["reads"]["bytes_fetched"].clone();
    let again = read_file(mountpoint.join("big/random.bin")).await;
    assert_eq!(again.len(), images::RANDOM_SIZE);
    let after = mount_stats(&mesh, "ctr-1").await;
    assert_eq!(after["reads"]["bytes_fetched"], before, "{after}");

    // A second request for the same container reports the mount it has.
    let events = run(&mesh, &runtime_request("run-1-again", "ctr-1", &image)).await;
    assert_eq!(detail(mounted(&events), "existing"), "true");
    assert_eq!(mesh.mounted(), vec![mountpoint.clone()], "still one mount");

    let unmount = detail(done, "unmount_subject").to_string();
    let report = control(&mesh, &unmount, "ctr-1").await.expect("unmounted");
    assert_eq!(report["mount_id"], "ctr-1");
    assert!(mesh.mounted().is_empty(), "nothing mounted after unmount");
    assert!(!mountpoint.exists(), "the mount point is removed");
    let events = mesh.events("run-1").await;
    assert!(
        find(&events, "mounter", "unmounted").is_some(),
        "{}",
        describe(&events)
    );
    let again = control(&mesh, &unmount, r#"{"mount_id":"ctr-1"}"#).await;
    assert_eq!(
        again.expect_err("already unmounted").code,
        ErrorCode::NotFound
    );

    mesh.assert_no_secret_leaked(&["run-1", "run-1-again"], &[REGISTRY_PASSWORD])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_unmounts_every_mount_even_a_busy_one_and_a_restart_detaches_what_a_kill_left() {
    let (mut mesh, image, _layout) = mesh_with_indexed_image().await;
    for (id, container) in [("run-a", "ctr-a"), ("run-b", "ctr-b")] {
        mounted(&run(&mesh, &runtime_request(id, container, &image)).await);
    }
    let root = mesh.mount_root().canonicalize().unwrap();
    assert_eq!(mesh.mounted().len(), 2);
    // A file held open keeps ctr-b busy: a plain unmount fails, so the mounter detaches it.
    let busy = std::fs::File::open(root.join("ctr-b/edit/me")).unwrap();
    assert!(
        mesh.service("mounter").terminate(),
        "the mounter exits cleanly"
    );
    assert!(
        mesh.mounted().is_empty(),
        "left mounted: {:?}",
        mesh.mounted()
    );
    drop(busy);
    for id in ["run-a", "run-b"] {
        let events = mesh.events(id).await;
        assert!(
            find(&events, "mounter", "unmounted").is_some(),
            "{}",
            describe(&events)
        );
    }

    // kill -9 leaves a dead FUSE mount behind; the next instance detaches it before serving.
    mesh.service("mounter").restart();
    wait_until_serving(&mesh).await;
    mounted(&run(&mesh, &runtime_request("run-c", "ctr-c", &image)).await);
    mesh.service("mounter").kill();
    assert_eq!(
        mesh.mounted(),
        vec![root.join("ctr-c")],
        "the killed mount is stale"
    );
    mesh.service("mounter").restart();
    wait_until_serving(&mesh).await;
    assert!(
        mesh.mounted().is_empty() && mesh.images_mounted().is_empty(),
        "stale: {:?} {:?}\n{}",
        mesh.mounted(),
        mesh.images_mounted(),
        mesh.service("mounter").logs()
    );

    mesh.assert_no_secret_leaked(&["run-a", "run-b", "run-c"], &[REGISTRY_PASSWORD])
        .await;
}

/// The node cache as the `mounts` endpoint reports it.
async fn disk_cache(mesh: &Mesh) -> serde_json::Value {
    let listing = control(mesh, &format!("imagemesh.mounter.{WORKER_ID}.mounts"), "")
        .await
        .expect("mounts listing");
    listing["disk_cache"].clone()
}

/// Every file of the node cache directory.
fn cache_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flat_map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap())
        .map(|file| file.unwrap().path())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_cache_on_disk_serves_a_restarted_mounter_and_a_damaged_entry_is_refetched() {
    let (mut mesh, image, layout) = mesh_with_indexed_image().await;
    let root = mesh.mount_root().canonicalize().unwrap();
    let file = "big/random.bin";
    let expected = std::fs::read(
        layout
            .unpack("full", &layout.scratch("cache-test").join("bundle"))
            .join(file),
    )
    .expect("the file in umoci's unpack");

    mounted(&run(&mesh, &runtime_request("cache-1", "ctr-1", &image)).await);
    assert_eq!(read_file(root.join("ctr-1").join(file)).await, expected);
    let first = mount_stats(&mesh, "ctr-1").await["reads"].clone();
    assert!(first["range_requests"].as_u64().unwrap() > 0, "{first}");
    // Written in the background: wait until the spans are on disk.
    let written = imagemesh_testkit::eventually(mounter_support::WAIT, "spans on disk", || async {
        let disk = disk_cache(&mesh).await;
        (disk["entries"].as_u64() > Some(0)).then_some(disk)
    })
    .await;
    assert_eq!(written["write_failures"], 0, "{written}");
    assert_eq!(
        cache_files(mesh.node_cache()).len() as u64,
        written["entries"].as_u64().unwrap()
    );

    // A new mounter process (memory caches empty) reads the same file without the registry.
    assert!(
        mesh.service("mounter").terminate(),
        "the mounter exits cleanly"
    );
    mesh.service("mounter").restart();
    wait_until_serving(&mesh).await;
    let reopened = disk_cache(&mesh).await;
    assert_eq!(reopened["entries"], written["entries"], "{reopened}");
    mounted(&run(&mesh, &runtime_request("cache-2", "ctr-2", &image)).await);
    assert_eq!(read_file(root.join("ctr-2").join(file)).await, expected);
    let warm = mount_stats(&mesh, "ctr-2").await["reads"].clone();
    assert_eq!(
        warm["range_requests"], 0,
        "served from the disk cache: {warm}"
    );
    assert!(disk_cache(&mesh).await["hits"].as_u64().unwrap() > 0);

    // Damage every entry on disk: the next process drops each one it uses, refetches, and
    // still reads the right bytes.
    assert!(
        mesh.service("mounter").terminate(),
        "the mounter exits cleanly"
    );
    for path in cache_files(mesh.node_cache()) {
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    mesh.service("mounter").restart();
    wait_until_serving(&mesh).await;
    mounted(&run(&mesh, &runtime_request("cache-3", "ctr-3", &image)).await);
    assert_eq!(read_file(root.join("ctr-3").join(file)).await, expected);
    // Fetched again, by the read or by the mount's prefetch (when the first mount's recorded
    // list was published in time).
    let cold = mount_stats(&mesh, "ctr-3").await;
    let refetched = cold["reads"]["range_requests"].as_u64().unwrap()
        + cold["prefetch"]["spans_prefetched"].as_u64().unwrap();
    assert!(refetched > 0, "{cold}");
    let disk = disk_cache(&mesh).await;
    assert!(disk["dropped"].as_u64().unwrap() > 0, "{disk}");

    // The operator's view of the same numbers.
    let mut command = std::process::Command::new(imagemesh_testkit::bin_path("imagemesh"));
    command
        .args(["mounts", WORKER_ID])
        .envs(mesh.cli_env_as("operator"));
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("run imagemesh mounts");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains(&format!("mounter {WORKER_ID}: 1 mount(s)")),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("disk (node cache)"))
        .unwrap_or_else(|| panic!("no disk cache line: {text}"));
    assert!(
        line.contains(&format!("dropped {}", disk["dropped"])),
        "{line}"
    );
}

/// The mounter's listing (mounts, caches, index memory).
async fn index_memory(mesh: &Mesh) -> serde_json::Value {
    control(mesh, &format!("imagemesh.mounter.{WORKER_ID}.mounts"), "")
        .await
        .expect("mounts listing")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_beyond_the_index_memory_budget_is_refused_at_capacity() {
    let options = MeshOptions {
        start: vec!["credential", "scheduler", "indexer"],
        max_deliver: 2,
        ..Default::default()
    };
    let mesh = Mesh::start(options).await;
    let image = mesh.push_indexed_image("budget").await;
    // What one mount of the image holds, under the default budget.
    let mut mesh = start_mounter(mesh, &[]).await;
    mounted(&run(&mesh, &runtime_request("budget-0", "ctr-b0", &image)).await);
    let one = index_memory(&mesh).await["index_memory"]["bytes"]
        .as_u64()
        .unwrap();
    assert!(one > 0);
    assert!(
        mesh.service("mounter").terminate(),
        "the mounter exits cleanly"
    );

    // A mounter with room for one such mount and a half.
    let budget = (one + one / 2).to_string();
    let env = [
        ("IMAGEMESH_MOUNTER__PLACEMENT__WORKER_ID", WORKER_ID),
        ("IMAGEMESH_MOUNTER__INDEX_MEMORY_BYTES", budget.as_str()),
    ];
    mesh.start_instance("mounter", "mounter-budget", &env).await;
    let events = run(&mesh, &runtime_request("budget-1", "ctr-b1", &image)).await;
    mounted(&events);
    let resolved = find(&events, "mounter", "resolved").unwrap();
    assert_eq!(detail(resolved, "index_shared"), "false");
    assert!(detail(resolved, "index_bytes").parse::<u64>().unwrap() > 0);
    let held = index_memory(&mesh).await;
    assert_eq!(held["index_memory"]["bytes"], one, "{held}");
    assert_eq!(held["index_memory"]["budget"].to_string(), budget, "{held}");
    assert_eq!(held["mounts"][0]["index_bytes"], one, "{held}");

    // A second container of the image shares its mount, and the mount's index: nothing is
    // downloaded or decoded again, and no more index memory is held.
    let events = run(&mesh, &runtime_request("budget-2", "ctr-b2", &image)).await;
    mounted(&events);
    let resolved = find(&events, "mounter", "resolved").unwrap();
    assert_eq!(detail(resolved, "index_shared"), "true");
    assert_eq!(detail(resolved, "index_bytes"), "0");
    assert_eq!(index_memory(&mesh).await["index_memory"]["bytes"], one);

    // The same image in another repository is another mount: past the budget.
    let other = push_indexed_to(&mesh, "imagemesh/builds/default/other", "budget-other").await;
    let events = run(&mesh, &runtime_request("budget-3", "ctr-b3", &other)).await;
    let resolved = find(&events, "mounter", "resolved").unwrap();
    assert_eq!(
        detail(resolved, "index_shared"),
        "false",
        "another repository's mount"
    );
    let failed = imagemesh_tests::assert_gave_up(&events, "mounter", ErrorCode::AtCapacity, 2);
    assert!(
        failed.message.contains("index memory budget"),
        "{}",
        failed.message
    );
    assert_eq!(mesh.mounted().len(), 2, "the refused mount left nothing");
    assert_eq!(mesh.images_mounted().len(), 1, "one image mount, shared");
    assert_eq!(index_memory(&mesh).await["index_memory"]["bytes"], one);
}

/// The busybox test image pushed to `repository` (below the default tenant's) and indexed.
async fn push_indexed_to(mesh: &Mesh, repository: &str, tag: &str) -> String {
    let registry = mesh.registry.addr().to_string();
    let pushed = format!("{repository}:{tag}");
    let (username, password) = mesh.registry_login(repository, true).await;
    let (r, p) = (registry.clone(), pushed.clone());
    tokio::task::spawn_blocking(move || {
        imagemesh_testkit::images::push_busybox(&r, &p, &username, &password)
    })
    .await
    .expect("push the image");
    let image_ref = format!("{registry}/{pushed}");
    let request = imagemesh_proto::v1::IndexRequest {
        request_id: format!("index-{tag}"),
        tenant: imagemesh_proto::DEFAULT_TENANT.into(),
        image_id: tag.into(),
        image_ref: image_ref.clone(),
        credential: Some(mesh.registry_credential(repository, true).await),
        ..Default::default()
    };
    mesh.publish_work(imagemesh_runtime::subjects::INDEX, &request)
        .await;
    let events = mesh
        .wait_terminal(&request.request_id, mounter_support::WAIT)
        .await;
    assert_eq!(
        events.last().unwrap().state(),
        imagemesh_proto::v1::RequestState::Succeeded,
        "{}",
        describe(&events)
    );
    image_ref
}
