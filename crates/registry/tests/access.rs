//! Access checks against a real htpasswd-protected docker-registry.

use imagemesh_proto::v1::{AuthScheme, RegistryCredential};
use imagemesh_registry::{Access, RegistryClient, RegistryErrorKind, RegistrySettings};
use imagemesh_testkit::{Registry, RegistryAuth};
use oci_client::RegistryOperation;

fn basic(registry: &str, user: &str, secret: &str) -> RegistryCredential {
    RegistryCredential {
        registry: registry.into(),
        scheme: AuthScheme::Basic as i32,
        username: user.into(),
        secret: secret.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_registry_accepts_the_right_credential_and_rejects_a_wrong_one() {
    let registry = Registry::start(RegistryAuth::Htpasswd(vec![(
        "builder".into(),
        "s3cret-pw".into(),
    )]));
    let addr = registry.addr();
    let settings = RegistrySettings::default();

    let good = RegistryClient::new(addr, Some(&basic(addr, "builder", "s3cret-pw")), &settings);
    let reference = good.reference(&format!("{addr}/team/app:v1")).unwrap();
    let access = good
        .check_access(&reference, RegistryOperation::Pull)
        .await
        .unwrap();
    assert_eq!(access, Access::NoManifest);

    let bad = RegistryClient::new(addr, Some(&basic(addr, "builder", "wrong-pw")), &settings);
    let err = bad
        .check_access(&reference, RegistryOperation::Pull)
        .await
        .unwrap_err();
    assert_eq!(err.kind, RegistryErrorKind::AuthRejected);
    let message = err.to_string();
    assert!(
        message.contains(addr) && message.contains("team/app"),
        "{message}"
    );
    assert!(!message.contains("wrong-pw"), "{message}");

    let anonymous = RegistryClient::new(addr, None, &settings);
    let err = anonymous
        .check_access(&reference, RegistryOperation::Pull)
        .await
        .unwrap_err();
    assert_eq!(err.kind, RegistryErrorKind::AuthRejected);
}

#[tokio::test]
async fn a_stopped_registry_is_unavailable_and_retryable() {
    let mut registry = Registry::start(RegistryAuth::Open);
    let addr = registry.addr().to_string();
    registry.stop();
    let client = RegistryClient::new(&addr, None, &RegistrySettings::default());
    let reference = client.reference(&format!("{addr}/team/app:v1")).unwrap();
    let err = client
        .check_access(&reference, RegistryOperation::Pull)
        .await
        .unwrap_err();
    assert_eq!(err.kind, RegistryErrorKind::Unavailable, "{err}");
    assert!(err.is_retryable());
}

#[test]
fn references_must_name_the_clients_registry() {
    let client = RegistryClient::new("r.example:5000", None, &RegistrySettings::default());
    assert!(client.reference("r.example:5000/a/b:1").is_ok());
    let err = client.reference("other.example/a/b:1").unwrap_err();
    assert_eq!(err.kind, RegistryErrorKind::Invalid);
}

/// Pushes `data` as `digest`, as every writer of blobs does: a refused upload is fine when the
/// blob is there anyway.
async fn push(
    client: &RegistryClient,
    repo: &oci_client::Reference,
    data: &[u8],
    digest: &str,
) -> Result<(), oci_client::errors::OciDistributionError> {
    // In chunks, as the builder streams layers.
    let chunks: Vec<Result<bytes::Bytes, oci_client::errors::OciDistributionError>> = data
        .chunks(1 << 20)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let stream = futures::stream::iter(chunks);
    let size = Some(data.len() as u64);
    match client
        .oci()
        .push_blob_stream(repo, stream, digest, size)
        .await
    {
        Ok(_) => Ok(()),
        Err(err) if client.pushed_concurrently(repo, digest, &err).await => Ok(()),
        Err(err) => Err(err),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_blob_upload_stands_only_when_the_blob_is_there() {
    use sha2::{Digest, Sha256};
    let registry = Registry::start(RegistryAuth::Open);
    let addr = registry.addr();
    let client = RegistryClient::new(addr, None, &RegistrySettings::default());
    let repo = client.reference(&format!("{addr}/team/copies:v1")).unwrap();
    let data: Vec<u8> = (0..(8 << 20))
        .map(|i: u32| (i * 7 + i / 4096) as u8)
        .collect();
    let digest = format!("sha256:{:x}", Sha256::digest(&data));

    // Wrong content under a digest the repository does not have: refused, not excused.
    let err = push(&client, &repo, b"not those bytes", &digest)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");

    let pushes: Vec<_> = (0..12)
        .map(|_| push(&client, &repo, &data, &digest))
        .collect();
    for pushed in futures::future::join_all(pushes).await {
        pushed.unwrap();
    }
    assert!(client.oci().blob_exists(&repo, &digest).await.unwrap());

    // A writer whose upload the registry refuses while the blob is there (the race's loser;
    // made certain here by uploading other bytes): the push stands, the registry keeps the
    // blob's own bytes.
    push(&client, &repo, b"not those bytes", &digest)
        .await
        .unwrap();
    let mut pulled = Vec::new();
    client
        .oci()
        .pull_blob(&repo, digest.as_str(), &mut pulled)
        .await
        .unwrap();
    assert!(pulled == data, "the registry's blob changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_refused_as_digest_invalid_is_pushed_again_and_other_refusals_are_not() {
    use sha2::{Digest, Sha256};
    let registry = Registry::start(RegistryAuth::Open);
    let addr = registry.addr();
    let client = RegistryClient::new(addr, None, &RegistrySettings::default());
    let repo = client.reference(&format!("{addr}/team/copies:v1")).unwrap();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = format!("sha256:{:x}", Sha256::digest(config));
    push(&client, &repo, config, &config_digest).await.unwrap();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[]}}"#,
        config.len()
    );
    let media_type: reqwest::header::HeaderValue = "application/vnd.oci.image.manifest.v1+json"
        .parse()
        .unwrap();
    let refused = |kind: &str| {
        registry
            .log()
            .lines()
            .filter(|l| l.contains("method=PUT") && l.contains(&format!("err.code=\"{kind}\"")))
            .count()
    };

    // Pushed by a digest it does not have: the registry's DIGEST_INVALID, as in the race.
    let wrong = repo.clone_with_digest(format!("sha256:{}", "0".repeat(64)));
    let err = client
        .push_manifest(&wrong, manifest.clone().into(), media_type.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("DIGEST_INVALID"), "{err}");
    assert_eq!(
        refused("digest invalid"),
        4,
        "pushed four times, then given up"
    );

    // Not a manifest: refused once, not retried.
    client
        .push_manifest(&repo, "not json".into(), media_type.clone())
        .await
        .unwrap_err();
    assert_eq!(refused("manifest invalid"), 1);

    // A good manifest lands at the first push.
    client
        .push_manifest(&repo, manifest.into(), media_type)
        .await
        .unwrap();
}
