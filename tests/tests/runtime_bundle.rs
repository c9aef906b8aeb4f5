//! A runtime request ends with a container: the mounter prepares an OCI runtime bundle over the
//! lazy mount (overlay root filesystem + config.json from the image config) and runc starts it
//! unchanged. A container writes to its own upper layer only; another container of the same
//! image does not see it, though both share one lazy FUSE mount of the image; `imagemesh run`
//! does it all from the command line; unmounting leaves no overlay, upper directory or mount
//! behind.

mod indexer_support;
mod mounter_support;

use std::path::Path;
use std::process::Command;

use imagemesh_proto::v1::RequestState;
use imagemesh_tests::{
    BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER, describe,
};
use indexer_support::{index, request};
use mounter_support::{WORKER_ID, control, detail, mounted, run, runtime_request, start_mounter};

/// Runs `bundle` with runc as container `id`; returns (success, stdout).
fn runc(bundle: &str, id: &str) -> (bool, String) {
    let output = Command::new("runc")
        .args(["run", "--bundle", bundle, id])
        .output()
        .expect("runc (make deps installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!(
        "runc {id}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), stdout)
}

/// The FUSE mounts below `root` in /proc/self/mountinfo: (mount point, device) of each line.
/// A bind of a FUSE mount is a line of its own with the same device (one connection).
fn fuse_mounts(root: &Path) -> Vec<(String, String)> {
    let root = root.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(dash + 1)?;
            (fstype.starts_with("fuse") && Path::new(fields[4]).starts_with(&root))
                .then(|| (fields[4].to_string(), fields[2].to_string()))
        })
        .collect()
}

async fn unmount(mesh: &Mesh, id: &str) {
    let subject = format!("imagemesh.mounter.{WORKER_ID}.unmount");
    control(mesh, &subject, id).await.expect("unmounted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_request_ends_with_a_bundle_runc_starts_and_each_container_writes_alone() {
    let options = MeshOptions {
        build_registry_auth: BuildRegistryAuth::Basic,
        start: vec!["credential", "scheduler", "indexer"],
        max_deliver: 3,
        ..Default::default()
    };
    let mesh = start_mounter(Mesh::start(options).await, &[]).await;
    let registry = mesh.registry.addr().to_string();
    let addr = registry.clone();
    tokio::task::spawn_blocking(move || {
        imagemesh_testkit::images::push_busybox(
            &addr,
            "test/box:1",
            REGISTRY_USER,
            REGISTRY_PASSWORD,
        )
    })
    .await
    .unwrap();
    let image = format!("{registry}/test/box:1");
    let events = index(&mesh, &request(&mesh, "index-box", "test/box:1")).await;
    assert_eq!(
        events.last().unwrap().state(),
        RequestState::Succeeded,
        "{}",
        describe(&events)
    );

    // Container A writes a file and reads it back; its args replace the image's Cmd.
    let mut writes = runtime_request("run-a", "ctr-a", &image);
    writes.args = vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo \"$GREETING\" > /note && cat /note && hostname".into(),
    ];
    writes.env = vec!["GREETING=written by a".into()];
    let done = mounted(&run(&mesh, &writes).await).clone();
    let bundle_a = detail(&done, "bundle").to_string();
    let bundles = mesh.bundle_root().canonicalize().unwrap();
    assert_eq!(Path::new(&bundle_a), bundles.join("ctr-a"));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(&bundle_a).join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["process"]["args"][2], writes.args[2], "{config}");
    assert_eq!(config["root"]["path"], "rootfs");
    let (ok, out) = runc(&bundle_a, "ctr-a");
    assert!(ok, "runc ran the bundle unchanged");
    assert_eq!(out, "written by a\nctr-a\n");
    let upper = Path::new(&bundle_a).join("upper/note");
    assert_eq!(std::fs::read_to_string(&upper).unwrap(), "written by a\n");
    let lazy = mesh.mount_root().canonicalize().unwrap().join("ctr-a");
    assert!(!lazy.join("note").exists(), "the image stays untouched");

    // Container B of the same image does not see A's file.
    let mut looks = runtime_request("run-b", "ctr-b", &image);
    looks.args = vec![
        "/bin/sh".into(),
        "-c".into(),
        "test -e /note && echo sees-a || echo clean".into(),
    ];
    let done_b = mounted(&run(&mesh, &looks).await).clone();
    let bundle_b = detail(&done_b, "bundle").to_string();
    let (ok, out) = runc(&bundle_b, "ctr-b");
    assert!(ok);
    assert_eq!(out, "clean\n");
    assert_eq!(mesh.bundles_mounted().len(), 2, "one overlay per container");

    // ...while both share one lazy FUSE mount of the image: one connection (device) in
    // /proc/self/mountinfo, the image's mount plus a read-only bind per container.
    assert_eq!(detail(&done_b, "lazy_mount"), detail(&done, "lazy_mount"));
    assert_eq!(detail(&done_b, "shared_by"), "2");
    let fuse = fuse_mounts(mesh.mount_root());
    let devices: std::collections::BTreeSet<&String> = fuse.iter().map(|(_, dev)| dev).collect();
    assert_eq!(devices.len(), 1, "one FUSE connection: {fuse:?}");
    assert_eq!(fuse.len(), 3, "the image's mount and two binds: {fuse:?}");
    assert_eq!(
        mesh.images_mounted().len(),
        1,
        "{:?}",
        mesh.images_mounted()
    );
    let subject = format!("imagemesh.mounter.{WORKER_ID}.mounts");
    let listing = control(&mesh, &subject, "").await.expect("listing");
    let lazies = listing["lazy_mounts"].as_array().unwrap();
    assert_eq!(lazies.len(), 1, "{listing}");
    assert_eq!(
        lazies[0]["containers"],
        serde_json::json!(["ctr-a", "ctr-b"])
    );

    // Unmounting A leaves B's container and the shared mount working.
    unmount(&mesh, "ctr-a").await;
    assert!(
        !Path::new(&bundle_a).exists(),
        "A's bundle and upper are gone"
    );
    assert_eq!(
        mesh.bundles_mounted().len(),
        1,
        "{:?}",
        mesh.bundles_mounted()
    );
    assert_eq!(
        fuse_mounts(mesh.mount_root()).len(),
        2,
        "the image's mount and B's bind"
    );
    let (ok, out) = runc(&bundle_b, "ctr-b");
    assert!(ok);
    assert_eq!(out, "clean\n");

    // Unmounting the last container leaves no overlay, upper directory or mount behind.
    unmount(&mesh, "ctr-b").await;
    assert!(
        mesh.bundles_mounted().is_empty(),
        "{:?}",
        mesh.bundles_mounted()
    );
    assert!(mesh.mounted().is_empty(), "{:?}", mesh.mounted());
    assert!(
        mesh.images_mounted().is_empty(),
        "{:?}",
        mesh.images_mounted()
    );
    assert!(
        fuse_mounts(mesh.mount_root()).is_empty(),
        "{:?}",
        fuse_mounts(mesh.mount_root())
    );
    for bundle in [&bundle_a, &bundle_b] {
        assert!(
            !Path::new(bundle).exists(),
            "the bundle and its upper are gone"
        );
    }

    // The same from the command line: `imagemesh run IMAGE -- ARGS`, the container's exit code
    // and output are the command's.
    let mut command = Command::new(imagemesh_testkit::bin_path("imagemesh"));
    command
        .args(["run", "--keep", "--container-id", "ctr-cli", &image])
        .args(["--", "/bin/sh", "-c", "echo from the cli; exit 7"])
        .envs(mesh.cli_env());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("run imagemesh run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(7),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("from the cli\n"), "{stdout}");
    unmount(&mesh, "ctr-cli").await;
    assert!(mesh.bundles_mounted().is_empty() && mesh.mounted().is_empty());
    assert!(fuse_mounts(mesh.mount_root()).is_empty());
}
