//! Recorded prefetch end to end (`docs/mounter.md`, Recorded prefetch): the first mount of an
//! image records which spans its reads need and publishes them as a referrer of the image; a
//! later mount by a fresh mounter with empty caches prefetches exactly those spans, and the same
//! reads then make fewer range requests of their own (counters, not timings). A prefetch list
//! that is not one is ignored with a log and replaced; the mount works. On an issuer build
//! registry the mount reads with a pull-only token and publishes with the scheduler's separate
//! push token.

mod indexer_support;
mod mounter_support;

use imagemesh_lazyimage::prefetch::{PREFETCH_ARTIFACT_TYPE, PREFETCH_MEDIA_TYPE};
use imagemesh_lazyimage::{find_prefetch, push_prefetch};
use imagemesh_registry::{PlatformSpec, RegistryClient, RegistrySettings, ResolvedImage};
use imagemesh_testkit::eventually;
use imagemesh_testkit::oci_images::{OciLayout, have_image_tools};
use imagemesh_tests::{BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, describe, find};
use indexer_support::push_and_index_full;
use mounter_support::{
    WAIT, control, detail, mount_stats, mounted, read_file, run, runtime_request, start_mounter,
    wait_until_serving,
};
use oci_client::manifest::OciManifest;
use serde_json::Value;

/// What the container reads in its first seconds: files of three of the four layers, the
/// 24 MiB random file (several spans) among them.
const WORKLOAD: [&str; 5] = [
    "small/d1/f1.txt",
    "big/text.log",
    "big/random.bin",
    "edit/me",
    "opq/new-c",
];

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
    let env = [("IMAGEMESH_MOUNTER__PREFETCH__RECORD_WINDOW", "8s")];
    let mesh = start_mounter(Mesh::start(options).await, &env).await;
    let layout = OciLayout::new();
    let image = push_and_index_full(&mesh, &layout).await;
    (mesh, image, layout)
}

/// The image as the registry serves it, with the build registry's (push) credential.
async fn resolved(mesh: &Mesh, image: &str) -> (RegistryClient, ResolvedImage) {
    let credential = indexer_support::credential(mesh, REGISTRY_PASSWORD);
    resolved_with(mesh, image, &credential).await
}

/// The image as the registry serves it, read with `credential`.
async fn resolved_with(
    mesh: &Mesh,
    image: &str,
    credential: &imagemesh_proto::v1::RegistryCredential,
) -> (RegistryClient, ResolvedImage) {
    let client = RegistryClient::new(
        mesh.registry.addr(),
        Some(credential),
        &RegistrySettings::default(),
    );
    let resolved = client
        .resolve_image(
            &image.parse().unwrap(),
            &PlatformSpec::parse("linux/amd64").unwrap(),
        )
        .await
        .expect("resolve the image");
    (client, resolved)
}

async fn prefetch_stats(mesh: &Mesh, mount_id: &str) -> Value {
    mount_stats(mesh, mount_id).await["prefetch"].clone()
}

/// Waits for the mount's prefetch to reach `state`.
async fn wait_prefetch(mesh: &Mesh, mount_id: &str, state: &str) -> Value {
    eventually(WAIT, &format!("prefetch {state}"), || async {
        let stats = prefetch_stats(mesh, mount_id).await;
        (stats["state"] == state).then_some(stats)
    })
    .await
}

async fn read_workload(mesh: &Mesh, mount_id: &str) -> Vec<Vec<u8>> {
    let root = mesh.mount_root().canonicalize().unwrap().join(mount_id);
    let mut out = Vec::new();
    for file in WORKLOAD {
        out.push(read_file(root.join(file)).await);
    }
    out
}

/// Every file of the node cache on disk removed (the directory stays).
fn clear_node_cache(dir: &std::path::Path) {
    for shard in std::fs::read_dir(dir).unwrap() {
        let path = shard.unwrap().path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
}

fn n(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_run_of_an_image_prefetches_what_the_first_recorded() {
    let (mut mesh, image, layout) = mesh_with_indexed_image().await;
    let (client, resolved) = resolved(&mesh, &image).await;
    let rootfs = layout.unpack("full", &layout.scratch("unpacked").join("bundle"));
    let expected: Vec<Vec<u8>> = WORKLOAD
        .iter()
        .map(|f| std::fs::read(rootfs.join(f)).unwrap())
        .collect();

    // First run: nothing to prefetch, so the mount records.
    let events = run(&mesh, &runtime_request("pf-1", "ctr-1", &image)).await;
    let done = mounted(&events);
    assert!(
        ["lookup", "recording"].contains(&detail(done, "prefetch")),
        "{:?}",
        done.details
    );
    assert!(
        read_workload(&mesh, "ctr-1").await == expected,
        "bytes differ"
    );
    let first = mount_stats(&mesh, "ctr-1").await;
    let first_requests = n(&first["reads"]["range_requests"]);
    assert!(first_requests > 0, "{first}");
    let published = wait_prefetch(&mesh, "ctr-1", "published").await;
    let recorded = n(&published["spans_recorded"]);
    let artifact = published["artifact"].as_str().unwrap().to_string();
    assert!(recorded > 0, "{published}");
    assert_eq!(n(&published["spans_prefetched"]), 0, "{published}");

    // It is a referrer of the image, as any OCI client sees it (here through the referrers
    // tag, registry 2.8 having no referrers API).
    let referrers = client
        .oci()
        .pull_referrers(
            &resolved
                .reference
                .clone_with_digest(resolved.digest().to_string()),
            Some(PREFETCH_ARTIFACT_TYPE),
        )
        .await
        .unwrap();
    let entry = referrers
        .manifests
        .iter()
        .find(|m| m.digest == artifact)
        .unwrap_or_else(|| panic!("{artifact} not among the referrers: {referrers:?}"));
    assert_eq!(entry.artifact_type.as_deref(), Some(PREFETCH_ARTIFACT_TYPE));
    let (manifest, _) = client
        .oci()
        .pull_manifest(
            &resolved.reference.clone_with_digest(artifact.clone()),
            client.auth(),
        )
        .await
        .unwrap();
    let OciManifest::Image(manifest) = manifest else {
        panic!("not an image manifest");
    };
    assert_eq!(manifest.subject.as_ref().unwrap().digest, resolved.digest());
    assert_eq!(manifest.layers.len(), 1);
    assert_eq!(manifest.layers[0].media_type, PREFETCH_MEDIA_TYPE);
    assert!(manifest.layers[0].size < 64 << 10, "small: {manifest:?}");
    let found = find_prefetch(&client, &resolved, 1 << 20, 1024)
        .await
        .unwrap()
        .expect("found");
    assert_eq!(found.list.spans.len() as u64, recorded);

    let unmount = detail(done, "unmount_subject").to_string();
    let report = control(&mesh, &unmount, "ctr-1").await.expect("unmounted");
    assert_eq!(report["prefetch"]["spans_recorded"], recorded);
    let events = mesh.events("pf-1").await;
    let unmounted = find(&events, "mounter", "unmounted").expect("unmounted event");
    assert_eq!(
        detail(unmounted, "prefetch_spans_recorded"),
        recorded.to_string()
    );

    // A fresh mounter with empty caches, memory and disk: what a new node sees.
    assert!(mesh.service("mounter").terminate(), "clean exit");
    clear_node_cache(mesh.node_cache());
    mesh.service("mounter").restart();
    wait_until_serving(&mesh).await;

    let events = run(&mesh, &runtime_request("pf-2", "ctr-2", &image)).await;
    mounted(&events);
    let prefetched = wait_prefetch(&mesh, "ctr-2", "done").await;
    assert_eq!(prefetched["artifact"], artifact.as_str());
    assert_eq!(n(&prefetched["spans_planned"]), recorded, "{prefetched}");
    assert_eq!(n(&prefetched["spans_prefetched"]), recorded, "{prefetched}");
    assert_eq!(n(&prefetched["errors"]), 0, "{prefetched}");
    assert!(n(&prefetched["bytes_prefetched"]) > 0, "{prefetched}");
    assert!(
        read_workload(&mesh, "ctr-2").await == expected,
        "bytes differ"
    );
    let second = mount_stats(&mesh, "ctr-2").await;
    let second_requests = n(&second["reads"]["range_requests"]);
    let hits = n(&second["prefetch"]["hits"]);
    eprintln!(
        "first run: {first_requests} range requests, {} bytes, {recorded} spans recorded; \
         second run: {second_requests} range requests, {} bytes; prefetched {} spans, {} bytes, {hits} hits",
        first["reads"]["bytes_fetched"],
        second["reads"]["bytes_fetched"],
        second["prefetch"]["spans_prefetched"],
        second["prefetch"]["bytes_prefetched"],
    );
    assert!(
        second_requests < first_requests,
        "first {first_requests}, second {second_requests}: {second}"
    );
    assert!(hits > 0, "{second}");
    // The second run records nothing: the image has its list.
    assert_eq!(n(&second["prefetch"]["spans_recorded"]), 0, "{second}");

    let report = control(&mesh, &unmount, "ctr-2").await.expect("unmounted");
    assert_eq!(report["prefetch"]["hits"], hits);
    assert!(mesh.mounted().is_empty(), "nothing mounted");
    mesh.assert_no_secret_leaked(&["pf-1", "pf-2"], &[REGISTRY_PASSWORD])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_prefetch_list_is_ignored_and_the_mount_works() {
    let (mesh, image, layout) = mesh_with_indexed_image().await;
    let (client, resolved) = resolved(&mesh, &image).await;
    let corrupt = push_prefetch(&client, &resolved, b"\x00not a prefetch list".to_vec())
        .await
        .expect("push the corrupt list");

    let events = run(&mesh, &runtime_request("bad-1", "ctr-1", &image)).await;
    assert!(
        find(&events, "mounter", "mounted").is_some(),
        "{}",
        describe(&events)
    );
    let rootfs = layout.unpack("full", &layout.scratch("unpacked").join("bundle"));
    let expected: Vec<Vec<u8>> = WORKLOAD
        .iter()
        .map(|f| std::fs::read(rootfs.join(f)).unwrap())
        .collect();
    assert!(
        read_workload(&mesh, "ctr-1").await == expected,
        "bytes differ"
    );
    eventually(WAIT, "the ignored list logged", || async {
        mesh.all_logs()
            .contains("prefetch list ignored")
            .then_some(())
    })
    .await;
    // The mount recorded a list of its own in its place.
    let published = wait_prefetch(&mesh, "ctr-1", "published").await;
    assert_ne!(published["artifact"], corrupt.digest.as_str());
    let found = find_prefetch(&client, &resolved, 1 << 20, 1024)
        .await
        .expect("a usable list now")
        .expect("found");
    assert_eq!(found.digest, published["artifact"].as_str().unwrap());
    assert_eq!(
        n(&mount_stats(&mesh, "ctr-1").await["reads"]["read_errors"]),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_only_mount_publishes_with_the_schedulers_prefetch_token() {
    // Token auth, as deployed: every token names its repository and actions.
    let options = MeshOptions {
        start: vec!["credential", "scheduler", "indexer"],
        max_deliver: 3,
        ..Default::default()
    };
    let env = [("IMAGEMESH_MOUNTER__PREFETCH__RECORD_WINDOW", "3s")];
    let mesh = start_mounter(Mesh::start(options).await, &env).await;
    let image = mesh.push_indexed_image("pf").await;

    let events = run(&mesh, &runtime_request("iss-1", "ctr-i1", &image)).await;
    let done = mounted(&events);
    let authenticated = find(&events, "mounter", "authenticated").expect("authenticated");
    assert_eq!(
        detail(authenticated, "actions"),
        "pull",
        "the mount reads pull-only"
    );
    let root = mesh.mount_root().canonicalize().unwrap().join("ctr-i1");
    assert!(read_file(root.join("bin/busybox")).await.len() > 100_000);
    let published = wait_prefetch(&mesh, "ctr-i1", "published").await;
    let recorded = n(&published["spans_recorded"]);
    assert!(recorded > 0, "{published}");

    let repository = "imagemesh/builds/default";
    let credential = mesh.registry_credential(repository, false).await;
    let (client, resolved) = resolved_with(&mesh, &image, &credential).await;
    let found = find_prefetch(&client, &resolved, 1 << 20, 1024)
        .await
        .unwrap()
        .expect("published");
    assert_eq!(found.digest, published["artifact"].as_str().unwrap());
    assert_eq!(found.list.spans.len() as u64, recorded);
    let unmount = detail(done, "unmount_subject").to_string();
    control(&mesh, &unmount, "ctr-i1").await.expect("unmounted");
}
