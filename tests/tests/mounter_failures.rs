//! The mounter refuses what it cannot mount, clearly and once: an image without an index and a
//! missing image are NOT_FOUND, an index that describes another manifest is INVALID_IMAGE, a
//! credential the registry refuses is REGISTRY_AUTH_REJECTED — each after one delivery, with a
//! dead letter holding no secret and nothing mounted; an unreachable registry is retried, then
//! given up on.

mod indexer_support;
mod mounter_support;

use imagemesh_proto::v1::{ContainerRequest, ErrorCode};
use imagemesh_runtime::subjects;
use imagemesh_testkit::oci_images::OciLayout;
use imagemesh_tests::{
    BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER, assert_failed,
    assert_gave_up,
};
use indexer_support::{credential, images, index, request};
use mounter_support::{WAIT, run, runtime_request, start_mounter};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use prost::Message;
use serde_json::Value;

async fn failing_mesh() -> Mesh {
    let options = MeshOptions {
        build_registry_auth: BuildRegistryAuth::Basic,
        start: vec!["credential", "scheduler", "indexer"],
        max_deliver: 3,
        ..Default::default()
    };
    start_mounter(Mesh::start(options).await, &[]).await
}

/// The mounter's dead letter for `id`: the code, `deliveries`, and the request without secrets.
async fn assert_dead_letter(mesh: &Mesh, id: &str, code: ErrorCode, deliveries: u64) {
    let letters = mesh.dead_letters().await;
    let letter = letters
        .iter()
        .find(|l| l.request_id == id && l.service == "mounter")
        .unwrap_or_else(|| panic!("no mounter dead letter for {id}: {letters:?}"));
    assert_eq!(letter.error_code(), code);
    assert_eq!(letter.deliveries, deliveries, "{id}");
    let kept = ContainerRequest::decode(letter.payload.as_slice()).unwrap();
    let cred = kept
        .build_registry_creds
        .expect("credential kept without its secret");
    assert!(cred.secret.is_empty());
}

/// A small two-tag image: `a` and `b` share their layer and differ in their config, so they
/// are two manifests. Returns their digests.
fn push_pair(layout: &OciLayout, registry: &str) -> (String, String) {
    layout.new_image("a");
    images::small_layer(layout, "a", "pair");
    layout.tag("a", "b");
    layout.set_platform("b", "linux", "arm64");
    for tag in ["a", "b"] {
        let dest = format!("{registry}/test/pair:{tag}");
        layout.push(tag, &dest, REGISTRY_USER, REGISTRY_PASSWORD);
    }
    (layout.digest("a"), layout.digest("b"))
}

/// Lists, as an index artifact of `b`, a copy of `a`'s artifact re-pointed at `b`: a registry
/// now offers `b` an index that describes `a`.
async fn forge_index(registry: &str, index_of_a: &str, a: &str, b: &str) {
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let auth = RegistryAuth::Basic(REGISTRY_USER.into(), REGISTRY_PASSWORD.into());
    let repo = |reference: &str| -> Reference {
        format!("{registry}/test/pair{reference}").parse().unwrap()
    };
    client
        .auth(&repo(":a"), &auth, RegistryOperation::Push)
        .await
        .unwrap();
    let raw = |reference: Reference, accept: &'static str| {
        let (client, auth) = (&client, &auth);
        async move {
            client
                .pull_manifest_raw(&reference, auth, &[accept])
                .await
                .unwrap()
                .0
        }
    };
    let b_body = raw(repo(&format!("@{b}")), OCI_IMAGE_MEDIA_TYPE).await;
    let mut artifact: Value =
        serde_json::from_slice(&raw(repo(&format!("@{index_of_a}")), OCI_IMAGE_MEDIA_TYPE).await)
            .unwrap();
    artifact["subject"] =
        serde_json::json!({"mediaType": OCI_IMAGE_MEDIA_TYPE, "digest": b, "size": b_body.len()});
    let forged: OciManifest = serde_json::from_value(artifact).unwrap();
    client
        .push_manifest(&repo(":forged"), &forged)
        .await
        .unwrap();
    let forged_digest = client
        .fetch_manifest_digest(&repo(":forged"), &auth)
        .await
        .unwrap();
    let forged_size = raw(repo(":forged"), OCI_IMAGE_MEDIA_TYPE).await.len();
    let a_tag = format!(":{}", a.replace(':', "-"));
    let mut referrers: Value =
        serde_json::from_slice(&raw(repo(&a_tag), OCI_IMAGE_INDEX_MEDIA_TYPE).await).unwrap();
    referrers["manifests"][0]["digest"] = forged_digest.into();
    referrers["manifests"][0]["size"] = forged_size.into();
    let referrers: OciManifest = serde_json::from_value(referrers).unwrap();
    let b_tag = format!(":{}", b.replace(':', "-"));
    client
        .push_manifest(&repo(&b_tag), &referrers)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unindexed_missing_and_mismatched_images_are_refused_once_with_a_dead_letter() {
    let mesh = &failing_mesh().await;
    let registry = mesh.registry.addr().to_string();
    let layout = OciLayout::new();
    let (a, b) = push_pair(&layout, &registry);

    let events = run(
        mesh,
        &runtime_request("not-indexed", "", &format!("{registry}/test/pair:a")),
    )
    .await;
    let last = assert_failed(&events, "mounter", ErrorCode::NotFound);
    assert!(
        last.message.contains("image is not indexed"),
        "{}",
        last.message
    );
    assert_dead_letter(mesh, "not-indexed", ErrorCode::NotFound, 1).await;

    let events = run(
        mesh,
        &runtime_request("missing", "", &format!("{registry}/test/absent:v1")),
    )
    .await;
    assert_failed(&events, "mounter", ErrorCode::NotFound);

    let indexed = index(mesh, &request(mesh, "index-a", "test/pair:a")).await;
    let index_of_a = indexed.last().unwrap().details["index_digest"].clone();
    forge_index(&registry, &index_of_a, &a, &b).await;
    let events = run(
        mesh,
        &runtime_request("mismatch", "", &format!("{registry}/test/pair:b")),
    )
    .await;
    let last = assert_failed(&events, "mounter", ErrorCode::InvalidImage);
    assert!(
        last.message.contains(&format!("describes manifest {a}")),
        "{}",
        last.message
    );
    assert_dead_letter(mesh, "mismatch", ErrorCode::InvalidImage, 1).await;

    // The same image with its own index mounts: the failures above were about the index.
    let ok = run(
        mesh,
        &runtime_request("good", "", &format!("{registry}/test/pair:a")),
    )
    .await;
    mounter_support::mounted(&ok);
    assert_eq!(mesh.mounted().len(), 1, "only the good request mounted");

    let ids = ["not-indexed", "missing", "mismatch", "good"];
    mesh.assert_no_secret_leaked(&ids, &[REGISTRY_PASSWORD])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credential_is_final_and_an_unreachable_registry_is_retried_then_given_up() {
    let mut mesh = failing_mesh().await;
    let registry = mesh.registry.addr().to_string();
    let layout = OciLayout::new();
    push_pair(&layout, &registry);
    index(&mesh, &request(&mesh, "index-a", "test/pair:a")).await;

    let wrong = "wrong-Pw-5Hq7";
    let mut bad = runtime_request("bad-cred", "", &format!("{registry}/test/pair:a"));
    bad.build_registry_creds = Some(credential(&mesh, wrong));
    // Straight to the mounters' queue, as the scheduler would publish it.
    mesh.publish_work(subjects::MOUNT, &bad).await;
    let events = mesh.wait_terminal("bad-cred", WAIT).await;
    let last = assert_failed(&events, "mounter", ErrorCode::RegistryAuthRejected);
    assert!(last.message.contains(&registry), "{}", last.message);
    assert_dead_letter(&mesh, "bad-cred", ErrorCode::RegistryAuthRejected, 1).await;

    mesh.registry.stop();
    let events = run(
        &mesh,
        &runtime_request("down", "", &format!("{registry}/test/pair:a")),
    )
    .await;
    assert_gave_up(&events, "mounter", ErrorCode::RegistryUnavailable, 3);
    assert!(mesh.mounted().is_empty());

    mesh.assert_no_secret_leaked(&["bad-cred", "down"], &[REGISTRY_PASSWORD, wrong])
        .await;
}
