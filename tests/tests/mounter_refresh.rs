//! A mount outlives its token: the build registry is a docker-registry with distribution token
//! auth whose token server hands out 6-second tokens, the credential service brokers them, and
//! the mounter refreshes its mount's pull token through `imagemesh.credential.refresh` before
//! it expires. Once the registry refuses the token the mount started with (its expiry plus the
//! registry's 60 s leeway), files never read before still read correctly through the mount.

mod indexer_support;
mod mounter_support;

use std::time::Duration;

use imagemesh_proto::v1::{AuthScheme, IndexRequest, RegistryCredential, Scope, TokenRequest};
use imagemesh_runtime::credentials::CredentialClient;
use imagemesh_testkit::eventually;
use imagemesh_testkit::oci_images::OciLayout;
use imagemesh_tests::{
    Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER, token_registry, token_registry_config,
};
use indexer_support::{images, index};
use mounter_support::{mount_stats, mounted, read_file, run, runtime_request, start_mounter};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// Lifetime of the runtime tokens, in seconds.
const LIFETIME: u64 = 6;

/// Credential service settings under which 6-second tokens are served as they are (the
/// default 60 s minimum lifetime would stretch them).
fn credential_config(registry: &str) -> String {
    let settings = "[credential]\nmin_lifetime = \"2s\"\n\
                    [credential.cache]\nmargin = \"1s\"\nrefresh_ahead = \"2s\"\n";
    format!("{settings}{}", token_registry_config(registry))
}

async fn token(
    credentials: &CredentialClient,
    registry: &str,
    actions: &[&str],
) -> RegistryCredential {
    let request = TokenRequest {
        registry: registry.into(),
        scope: Some(Scope {
            repository: "test/full".into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }),
        request_id: "mounter-refresh-test".into(),
        ..Default::default()
    };
    let response = credentials.mint(&request).await.expect("a token");
    response.credential.expect("a credential")
}

/// Whether the registry still accepts `token` for pulling the image.
async fn accepted(image: &Reference, token: &str) -> bool {
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let auth = RegistryAuth::Bearer(token.to_string());
    client.fetch_manifest_digest(image, &auth).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_keeps_reading_after_its_first_token_expired() {
    let (tokens, registry) = token_registry("imagemesh-test-registry");
    let addr = registry.addr().to_string();
    let options = MeshOptions {
        start: vec!["credential", "scheduler", "indexer"],
        ..Default::default()
    };
    let config = Some(credential_config(&addr));
    let mesh = Mesh::start_with_registry(options, registry, config).await;
    let mesh = start_mounter(mesh, &[("IMAGEMESH_MOUNTER__REFRESH__RETRY", "500ms")]).await;
    let credentials = CredentialClient::new(mesh.client.clone(), Duration::from_secs(5));

    let layout = OciLayout::new();
    images::build_full(&layout, "full");
    let image = format!("{addr}/test/full:v1");
    layout.push("full", &image, REGISTRY_USER, REGISTRY_PASSWORD);
    let push_token = token(&credentials, &addr, &["pull", "push"]).await;
    assert_eq!(push_token.scheme(), AuthScheme::Bearer);
    let indexing = IndexRequest {
        request_id: "index-full".into(),
        image_ref: image.clone(),
        credential: Some(push_token.clone()),
        ..Default::default()
    };
    let events = index(&mesh, &indexing).await;
    assert_eq!(events.last().unwrap().phase, "indexed", "{events:?}");

    // From here on tokens live 6 s; the runtime request gets one through the scheduler.
    tokens.set_expires_in(Some(LIFETIME));
    let events = run(&mesh, &runtime_request("run-r", "ctr-r", &image)).await;
    let first = token(&credentials, &addr, &["pull"]).await;
    let mountpoint = mesh.mount_root().canonicalize().unwrap().join("ctr-r");
    let done = mounted(&events);
    let rootfs = layout.unpack("full", &layout.scratch("unpacked").join("bundle"));
    let small = read_file(mountpoint.join("small/d1/f1.txt")).await;
    assert_eq!(
        small,
        std::fs::read(rootfs.join("small/d1/f1.txt")).unwrap()
    );
    let stats = mount_stats(&mesh, "ctr-r").await;
    assert!(
        stats["credential"]["expires_in_seconds"].as_i64().unwrap() <= LIFETIME as i64,
        "{stats}"
    );

    // The registry refuses the first token once its expiry and leeway have passed.
    let pinned: Reference = format!("{addr}/test/full@{}", done.details["image_digest"])
        .parse()
        .unwrap();
    assert!(
        accepted(&pinned, &first.secret).await,
        "the first token works at first"
    );
    eventually(
        Duration::from_secs(120),
        "the first token to be refused",
        || async {
            // About once a second: the registry's leeway makes this a minute-long wait.
            tokio::time::sleep(Duration::from_secs(1)).await;
            (!accepted(&pinned, &first.secret).await).then_some(())
        },
    )
    .await;

    // Files never read before, in other layers and spans, read fine: a fresh token is in use.
    for path in ["opq/new-c", "big/text.log", "edit/me"] {
        let ours = read_file(mountpoint.join(path)).await;
        assert!(
            ours == std::fs::read(rootfs.join(path)).unwrap(),
            "{path}: bytes differ"
        );
    }
    let stats = mount_stats(&mesh, "ctr-r").await;
    eprintln!("after expiry: {stats}");
    assert!(
        stats["credential"]["refreshes"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    assert_eq!(stats["reads"]["read_errors"], 0, "{stats}");
    let pull_tokens = tokens
        .scopes()
        .iter()
        .filter(|s| *s == "repository:test/full:pull")
        .count();
    assert!(
        pull_tokens >= 2,
        "the token server issued a refreshed pull token: {:?}",
        tokens.scopes()
    );

    let last = token(&credentials, &addr, &["pull"]).await;
    let secrets = [
        REGISTRY_PASSWORD,
        &push_token.secret,
        &first.secret,
        &last.secret,
    ];
    mesh.assert_no_secret_leaked(&["index-full", "run-r"], &secrets)
        .await;
}
