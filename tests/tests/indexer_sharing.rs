//! The indexer across images: a base layer shared by two images is indexed once (the second
//! image takes it from the layer cache), the builder's image record is extended rather than
//! replaced, and a multi-platform image is indexed for the platform a request names.

mod indexer_support;

use imagemesh_proto::v1::{ErrorCode, ImageRecord};
use imagemesh_runtime::streams;
use imagemesh_testkit::oci_images::{OciLayout, have_image_tools};
use imagemesh_tests::{
    BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER, assert_failed,
    assert_succeeded, describe, find,
};
use indexer_support::compare::parse_show;
use indexer_support::{cli, detail, image_record, images, index, request};
use prost::Message;

async fn indexer_mesh() -> Mesh {
    assert!(
        have_image_tools(),
        "umoci and skopeo are needed (make deps installs them)"
    );
    let options = MeshOptions {
        build_registry_auth: BuildRegistryAuth::Basic,
        start: vec!["indexer"],
        ..Default::default()
    };
    Mesh::start(options).await
}

fn layer_digests(layout: &OciLayout, tag: &str) -> Vec<String> {
    let manifest = layout.json_blob(&layout.digest(tag));
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// What the builder writes before it asks for an index.
async fn builder_record(mesh: &Mesh, image_id: &str, image_ref: &str, digest: &str) {
    let js = async_nats::jetstream::new(mesh.client.clone());
    let store = js.get_key_value(streams::IMAGE_REFS_BUCKET).await.unwrap();
    let record = ImageRecord {
        image_id: image_id.into(),
        image_ref: image_ref.into(),
        manifest_digest: digest.into(),
        pushed_at: Some(imagemesh_runtime::status::now()),
        ..Default::default()
    };
    let key = streams::image_key(imagemesh_proto::DEFAULT_TENANT, image_id);
    store.put(key, record.encode_to_vec().into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_layer_shared_by_two_images_is_indexed_once() {
    let mesh = indexer_mesh().await;
    let registry = mesh.registry.addr().to_string();
    let layout = OciLayout::new();
    layout.new_image("base");
    images::small_layer(&layout, "base", "base");
    layout.tag("base", "a");
    layout.tag("base", "b");
    images::small_layer(&layout, "a", "only-a");
    images::small_layer(&layout, "b", "only-b");
    for tag in ["a", "b"] {
        let dest = format!("{registry}/shared/{tag}:v1");
        layout.push(tag, &dest, REGISTRY_USER, REGISTRY_PASSWORD);
    }
    let (a_layers, b_layers) = (layer_digests(&layout, "a"), layer_digests(&layout, "b"));
    assert_eq!(
        a_layers[0], b_layers[0],
        "the images share their base layer"
    );

    let a = index(&mesh, &request(&mesh, "shared-a", "shared/a:v1")).await;
    assert_eq!(detail(assert_succeeded(&a), "layers_from_cache"), "0");

    let b_ref = format!("{registry}/shared/b:v1");
    builder_record(&mesh, "img-shared-b", &b_ref, &layout.digest("b")).await;
    let b = index(&mesh, &request(&mesh, "shared-b", "shared/b:v1")).await;
    let done = assert_succeeded(&b);
    assert_eq!(detail(done, "layers_from_cache"), "1", "{}", describe(&b));
    let top_size = std::fs::metadata(layout.blob_path(&b_layers[1]))
        .unwrap()
        .len();
    assert_eq!(detail(done, "compressed_bytes_read"), top_size.to_string());
    let base = b
        .iter()
        .find(|e| e.phase == "layer-indexed" && e.details["digest"] == b_layers[0])
        .expect("base layer event");
    assert_eq!(detail(base, "from_cache"), "true");
    assert_eq!(detail(base, "compressed_bytes_read"), "0");

    let record = image_record(&mesh, "img-shared-b").await.unwrap();
    assert_eq!(record.image_ref, b_ref, "the builder's fields are kept");
    assert!(record.pushed_at.is_some(), "the builder's fields are kept");
    assert_eq!(record.index_digest, detail(done, "index_digest"));

    let show = cli(&["index", "show", &b_ref]);
    assert!(show.success, "{}", show.stderr);
    let show = parse_show(&show.stdout);
    assert!(show.contains_key("/base/file0") && show.contains_key("/only-b/file4"));
    assert!(!show.contains_key("/only-a"));
    let cat = cli(&["index", "cat", &b_ref, "/base/file3"]);
    let src = layout.scratch("src-base").join("base/file3");
    assert!(
        cat.success && cat.stdout == std::fs::read(src).unwrap(),
        "{}",
        cat.stderr
    );
    mesh.assert_no_secret_leaked(&["shared-a", "shared-b"], &[REGISTRY_PASSWORD])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_platform_image_is_indexed_for_the_requested_platform() {
    let mesh = indexer_mesh().await;
    let registry = mesh.registry.addr().to_string();
    let layout = OciLayout::new();
    for (tag, arch) in [("amd", "amd64"), ("arm", "arm64")] {
        layout.new_image(tag);
        images::small_layer(&layout, tag, &format!("only-{arch}"));
        layout.set_platform(tag, "linux", arch);
    }
    layout.add_platform_index(
        "multi",
        &[("amd", "linux", "amd64"), ("arm", "linux", "arm64")],
    );
    let image = format!("{registry}/multi/app:v1");
    layout.push("multi", &image, REGISTRY_USER, REGISTRY_PASSWORD);

    for (id, platform, tag) in [("mp-default", "", "amd"), ("mp-arm", "linux/arm64", "arm")] {
        let mut req = request(&mesh, id, "multi/app:v1");
        req.platform = platform.into();
        let events = index(&mesh, &req).await;
        let done = assert_succeeded(&events);
        assert_eq!(detail(done, "manifest_digest"), layout.digest(tag));
        let resolved = find(&events, "indexer", "resolved").unwrap();
        let expected = if platform.is_empty() {
            "linux/amd64"
        } else {
            platform
        };
        assert_eq!(detail(resolved, "platform"), expected);
        let record = image_record(&mesh, &req.image_id).await.unwrap();
        assert_eq!(
            record.manifest_digest,
            layout.digest("multi"),
            "the pushed index"
        );
    }
    let arm = cli(&["index", "show", "--platform", "linux/arm64", &image]);
    let arm = parse_show(&arm.stdout);
    assert!(arm.contains_key("/only-arm64/file0") && !arm.contains_key("/only-amd64"));
    let amd = parse_show(&cli(&["index", "show", &image]).stdout);
    assert!(amd.contains_key("/only-amd64/file0") && !amd.contains_key("/only-arm64"));

    let mut s390x = request(&mesh, "mp-s390x", "multi/app:v1");
    s390x.platform = "linux/s390x".into();
    let events = index(&mesh, &s390x).await;
    let failed = assert_failed(&events, "indexer", ErrorCode::InvalidImage);
    assert!(
        failed.message.contains("no linux/s390x image"),
        "{}",
        failed.message
    );
}
