//! Checks of what the indexer stored in the registry, read with a plain oci-client (not the
//! imagemesh registry crate), as any OCI tool would see it.

use imagemesh_tests::{REGISTRY_PASSWORD, REGISTRY_USER};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

/// The documented contract (docs/index-format.md, "Storage in the registry").
pub const ARTIFACT_TYPE: &str = "application/vnd.imagemesh.index.v1";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.imagemesh.index.v1.imlzidx";
pub const HEAD_SIZE_ANNOTATION: &str = "dev.imagemesh.index.head-size";
pub const HEAD_DIGEST_ANNOTATION: &str = "dev.imagemesh.index.head-digest";

fn client() -> (Client, RegistryAuth) {
    let config = ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    };
    let auth = RegistryAuth::Basic(REGISTRY_USER.into(), REGISTRY_PASSWORD.into());
    (Client::new(config), auth)
}

/// Asserts that `index_digest` is an index artifact whose subject is the image manifest
/// `manifest_digest` of `registry/repo`, listed by the referrers API fallback and under the
/// `sha256-<hex>` tag. Returns the encoded index.
pub async fn assert_stored(
    registry: &str,
    repo: &str,
    manifest_digest: &str,
    index_digest: &str,
) -> Vec<u8> {
    let (client, auth) = client();
    let image: Reference = format!("{registry}/{repo}@{manifest_digest}")
        .parse()
        .unwrap();
    let accepted = [OCI_IMAGE_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE];
    let (image_body, _) = client
        .pull_manifest_raw(&image, &auth, &accepted)
        .await
        .unwrap();

    let artifact_ref = image.clone_with_digest(index_digest.to_string());
    let (artifact, digest) = client.pull_manifest(&artifact_ref, &auth).await.unwrap();
    assert_eq!(digest, index_digest);
    let OciManifest::Image(artifact) = artifact else {
        panic!("the index artifact is not an image manifest");
    };
    assert_eq!(artifact.artifact_type.as_deref(), Some(ARTIFACT_TYPE));
    let subject = artifact.subject.as_ref().expect("artifact has a subject");
    assert_eq!(subject.digest, manifest_digest);
    assert_eq!(subject.size, image_body.len() as i64);
    assert_eq!(artifact.layers.len(), 1);
    assert_eq!(artifact.layers[0].media_type, INDEX_MEDIA_TYPE);

    // oci-client's referrers lookup: the native API answers 404 on registry 2.8, so this goes
    // through the referrers tag schema.
    let referrers = client
        .pull_referrers(&image, Some(ARTIFACT_TYPE))
        .await
        .unwrap();
    assert!(
        referrers.manifests.iter().any(|m| m.digest == index_digest),
        "referrers: {referrers:?}"
    );
    let tag = manifest_digest.replace(':', "-");
    let tag_ref = Reference::with_tag(registry.into(), repo.into(), tag);
    let (tagged, _) = client.pull_manifest(&tag_ref, &auth).await.unwrap();
    let OciManifest::ImageIndex(tagged) = tagged else {
        panic!("the fallback tag does not hold an image index");
    };
    let entry = tagged
        .manifests
        .iter()
        .find(|m| m.digest == index_digest)
        .expect("listed");
    assert_eq!(entry.artifact_type.as_deref(), Some(ARTIFACT_TYPE));

    let mut blob = Vec::new();
    client
        .pull_blob(&artifact_ref, &artifact.layers[0], &mut blob)
        .await
        .unwrap();
    // The blob's descriptor names its head, which a mount fetches and checks alone.
    let annotations = artifact.layers[0]
        .annotations
        .as_ref()
        .expect("the index blob's descriptor names its head");
    let head = imagemesh_lazyindex::head_len(&blob).unwrap();
    assert_eq!(annotations[HEAD_SIZE_ANNOTATION], head.to_string());
    assert_eq!(
        annotations[HEAD_DIGEST_ANNOTATION],
        format!("sha256:{:x}", Sha256::digest(&blob[..head]))
    );
    blob
}
