//! The indexer refuses what it cannot index, clearly and once: corrupt layers (stored under
//! their correct digest) fail with INVALID_IMAGE and a dead letter without the secret; a wrong
//! credential and a missing image fail with their own codes; an unreachable registry is retried
//! and then given up on. A gzip bomb is stopped by the indexer's size limits, and the indexer
//! goes on indexing.

mod indexer_support;

use std::io::Write;

use imagemesh_proto::v1::{ErrorCode, IndexRequest};
use imagemesh_tests::{
    BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER, assert_failed,
    assert_gave_up,
};
use indexer_support::{credential, index, request};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use prost::Message;
use sha2::{Digest, Sha256};

async fn indexer_mesh() -> Mesh {
    let options = MeshOptions {
        build_registry_auth: BuildRegistryAuth::Basic,
        start: vec!["indexer"],
        max_deliver: 3,
        ..Default::default()
    };
    Mesh::start(options).await
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Pushes a one-layer image whose layer is `layer` (labelled tar+gzip), with a config whose
/// diff-id is the layer's own digest (nothing checks it before the layer is read).
async fn push_image(registry: &str, repo: &str, layer: Vec<u8>) -> String {
    let diff_id = sha256(&layer);
    push_image_with(registry, repo, layer, &diff_id).await
}

/// Pushes a one-layer image (tar+gzip) whose config names `diff_id`.
async fn push_image_with(registry: &str, repo: &str, layer: Vec<u8>, diff_id: &str) -> String {
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let auth = RegistryAuth::Basic(REGISTRY_USER.into(), REGISTRY_PASSWORD.into());
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let config = Config::oci_v1(serde_json::to_vec(&config).unwrap(), None);
    let layers = [ImageLayer::new(
        layer,
        IMAGE_LAYER_GZIP_MEDIA_TYPE.into(),
        None,
    )];
    let reference: Reference = format!("{registry}/{repo}:v1").parse().unwrap();
    client
        .push(&reference, &layers, config, &auth, None)
        .await
        .expect("push the test image");
    client
        .fetch_manifest_digest(&reference, &auth)
        .await
        .unwrap()
}

/// The request's dead letter: from the indexer, with the code, delivered `deliveries` times,
/// keeping the credential's user but not its secret.
async fn assert_dead_letter(mesh: &Mesh, id: &str, code: ErrorCode, deliveries: u64) {
    let letters = mesh.dead_letters().await;
    let letter = letters
        .iter()
        .find(|l| l.request_id == id)
        .unwrap_or_else(|| panic!("no dead letter for {id}: {letters:?}"));
    assert_eq!(letter.service, "indexer");
    assert_eq!(letter.error_code(), code);
    assert_eq!(letter.deliveries, deliveries, "{id}");
    let kept = IndexRequest::decode(letter.payload.as_slice()).unwrap();
    let cred = kept.credential.expect("credential kept without its secret");
    assert_eq!(cred.username, REGISTRY_USER);
    assert!(cred.secret.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_layers_are_rejected_as_invalid_images_with_a_dead_letter() {
    let mesh = indexer_mesh().await;
    let registry = mesh.registry.addr().to_string();
    let not_gzip = b"this is not a gzip stream, whatever the media type says\n".repeat(1000);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&b"valid gzip around bytes that are no tar archive at all\n".repeat(500))
        .unwrap();
    let not_tar = gz.finish().unwrap();
    let cases = [
        ("not-gzip", not_gzip, "corrupt gzip"),
        ("not-tar", not_tar, "corrupt tar"),
    ];
    for (repo, layer, reason) in cases {
        let layer_digest = sha256(&layer);
        push_image(&registry, repo, layer).await;
        let events = index(&mesh, &request(&mesh, repo, &format!("{repo}:v1"))).await;
        let last = assert_failed(&events, "indexer", ErrorCode::InvalidImage);
        assert!(last.message.contains(&layer_digest), "{}", last.message);
        assert!(
            last.message.contains("not a valid layer"),
            "{}",
            last.message
        );
        assert!(last.message.contains(reason), "{}", last.message);
        assert_dead_letter(&mesh, repo, ErrorCode::InvalidImage, 1).await;
    }
    mesh.assert_no_secret_leaked(&["not-gzip", "not-tar"], &[REGISTRY_PASSWORD])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_credential_a_missing_image_and_a_dead_registry_each_fail_clearly() {
    let mut mesh = indexer_mesh().await;
    let registry = mesh.registry.addr().to_string();
    push_image(&registry, "present", b"irrelevant".to_vec()).await;

    let wrong = "wrong-Pw-9Xk2";
    let mut bad = request(&mesh, "bad-cred", "present:v1");
    bad.credential = Some(credential(&mesh, wrong));
    let events = index(&mesh, &bad).await;
    let last = assert_failed(&events, "indexer", ErrorCode::RegistryAuthRejected);
    assert!(last.message.contains(&registry), "{}", last.message);
    assert_dead_letter(&mesh, "bad-cred", ErrorCode::RegistryAuthRejected, 1).await;

    let events = index(&mesh, &request(&mesh, "missing", "absent:v1")).await;
    assert_failed(&events, "indexer", ErrorCode::NotFound);

    let mut no_cred = request(&mesh, "no-cred", "present:v1");
    no_cred.credential = None;
    let events = index(&mesh, &no_cred).await;
    assert_failed(&events, "indexer", ErrorCode::NoCredentials);

    mesh.registry.stop();
    let events = index(&mesh, &request(&mesh, "down", "present:v1")).await;
    assert_gave_up(&events, "indexer", ErrorCode::RegistryUnavailable, 3);

    let ids = ["bad-cred", "missing", "no-cred", "down"];
    mesh.assert_no_secret_leaked(&ids, &[REGISTRY_PASSWORD, wrong])
        .await;
}

/// A tar of one `size`-byte file of zeros, gzipped by streaming the zeros through flate2: about
/// 1 MB of gzip per GiB.
fn gzip_bomb(size: u64) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut header = tar::Header::new_gnu();
    header.set_path("zeros").unwrap();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(size);
    header.set_cksum();
    gz.write_all(header.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        gz.write_all(&zeros).unwrap();
    }
    gz.write_all(&[0u8; 1024]).unwrap();
    gz.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_is_an_invalid_image_and_the_indexer_goes_on() {
    let mesh = indexer_mesh().await;
    let registry = mesh.registry.addr().to_string();
    // 1 GiB of zeros in ~1 MB: with the default limits the ratio check stops it at 64 MiB.
    let bomb = gzip_bomb(1 << 30);
    let bomb_digest = sha256(&bomb);
    let compressed = bomb.len();
    push_image(&registry, "bomb", bomb).await;
    let started = std::time::Instant::now();
    let events = index(&mesh, &request(&mesh, "bomb", "bomb:v1")).await;
    let took = started.elapsed();
    let last = assert_failed(&events, "indexer", ErrorCode::InvalidImage);
    eprintln!(
        "gzip bomb of {compressed} bytes (1 GiB inflated) refused in {took:?}: {}",
        last.message
    );
    assert!(last.message.contains(&bomb_digest), "{}", last.message);
    assert!(
        last.message.contains("compression ratio"),
        "{}",
        last.message
    );
    assert!(took < std::time::Duration::from_secs(30), "{took:?}");
    assert_dead_letter(&mesh, "bomb", ErrorCode::InvalidImage, 1).await;

    // The same indexer then indexes a well-formed image.
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(6);
    tar.append_data(&mut header, "hello", &b"hello\n"[..])
        .unwrap();
    let tar = tar.into_inner().unwrap();
    let diff_id = sha256(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    push_image_with(&registry, "after-bomb", gz.finish().unwrap(), &diff_id).await;
    let events = index(&mesh, &request(&mesh, "after-bomb", "after-bomb:v1")).await;
    imagemesh_tests::assert_succeeded(&events);
    mesh.assert_no_secret_leaked(&["bomb", "after-bomb"], &[REGISTRY_PASSWORD])
        .await;
}
