//! Dockerfile builds into a build registry with distribution token auth: the credential service
//! brokers a scoped bearer token, buildah (which only takes user:secret) writes the image to an
//! OCI layout, and the builder pushes it with the token; the indexer indexes it with the same
//! token. A base image whose registry needs a bearer token is refused with a clear reason.

use std::time::Duration;

use imagemesh_proto::v1::{AuthScheme, ErrorCode, RequestState, Scope, TokenRequest};
use imagemesh_runtime::credentials::CredentialClient;
use imagemesh_testkit::Registry;
use imagemesh_testkit::images::{PulledImage, push_busybox};
use imagemesh_testkit::token_server::TokenServer;
use imagemesh_tests::{
    Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER, build_request, describe, find,
    token_registry_config,
};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dockerfile_build_is_pushed_to_a_token_auth_registry_with_the_bearer_token() {
    let tokens = TokenServer::start(
        "imagemesh-test-registry",
        &[(REGISTRY_USER, REGISTRY_PASSWORD)],
    );
    let registry = Registry::start(tokens.registry_auth());
    let addr = registry.addr().to_string();
    let options = MeshOptions {
        start: vec!["credential", "scheduler", "indexer"],
        ..Default::default()
    };
    let mut mesh =
        Mesh::start_with_registry(options, registry, Some(token_registry_config(&addr))).await;
    let storage = tempfile::tempdir().unwrap();
    let dir = storage.path().to_str().unwrap().to_string();
    mesh.start_instance(
        "builder",
        "builder",
        &[("IMAGEMESH_BUILDER__STORAGE_DIR", dir.as_str())],
    )
    .await;

    // FROM scratch: the build registry's token is the only credential the build needs.
    let hello: &[u8] = b"built with a bearer token\n";
    mesh.upload_context("ctx-tok", &[("hello.txt", hello)])
        .await;
    let dockerfile = "FROM scratch\nENV ORIGIN=token-auth\nCOPY hello.txt /hello.txt\n";
    mesh.submit(&build_request("tok", dockerfile, "ctx-tok"))
        .await;
    let events = mesh.wait_terminal("tok", WAIT).await;
    assert_eq!(
        events.last().unwrap().state(),
        RequestState::Succeeded,
        "{}",
        describe(&events)
    );
    let authenticated = find(&events, "builder", "authenticated").expect("authenticated");
    assert_eq!(authenticated.details["actions"], "pull,push");
    let pushed = find(&events, "builder", "pushed").expect("pushed");
    let digest = pushed.details["digest"].clone();
    assert!(digest.starts_with("sha256:"), "{}", describe(&events));
    let indexed = find(&events, "indexer", "indexed").expect("indexed");
    assert_eq!(indexed.state(), RequestState::Succeeded);

    // Pulled back (skopeo, which runs the token flow with the long-term account): the config
    // and the one gzip layer are what the Dockerfile says, under the digest the builder reported.
    let image = PulledImage::pull(
        &addr,
        "imagemesh/builds:img-tok",
        REGISTRY_USER,
        REGISTRY_PASSWORD,
    );
    let env = image.config["config"]["Env"].to_string();
    assert!(env.contains("ORIGIN=token-auth"), "{env}");
    let layers = image.manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{:?}", image.manifest);
    assert!(
        layers[0]["mediaType"].as_str().unwrap().ends_with("gzip"),
        "{:?}",
        image.manifest
    );
    assert_eq!(
        std::fs::read_to_string(image.rootfs().join("hello.txt")).unwrap(),
        "built with a bearer token\n"
    );
    // The scheduler asked for exactly this scope; nothing broader was issued.
    assert!(
        tokens
            .scopes()
            .iter()
            .any(|s| s == "repository:imagemesh/builds:pull,push"),
        "{:?}",
        tokens.scopes()
    );

    // A base image in a registry that needs a bearer token cannot be pulled by buildah.
    push_busybox(&addr, "base/busybox:1", REGISTRY_USER, REGISTRY_PASSWORD);
    mesh.upload_context("ctx-base", &[("hello.txt", b"x")])
        .await;
    let dockerfile = format!("FROM {addr}/base/busybox:1\nCOPY hello.txt /hello.txt\n");
    mesh.submit(&build_request("tok-base", &dockerfile, "ctx-base"))
        .await;
    let events = mesh.wait_terminal("tok-base", WAIT).await;
    let last = events.last().unwrap();
    assert_eq!(last.state(), RequestState::Failed, "{}", describe(&events));
    assert_eq!(
        last.error_code(),
        ErrorCode::NoCredentials,
        "{}",
        describe(&events)
    );
    assert!(
        last.message.contains("base image registry") && last.message.contains("bearer"),
        "{}",
        describe(&events)
    );

    // The bearer token the builder pushed with (the credential service's cached one for the
    // same scope) and the long-term password appear in no log, event or dead letter.
    let credentials = CredentialClient::new(mesh.client.clone(), Duration::from_secs(5));
    let request = TokenRequest {
        registry: addr.clone(),
        scope: Some(Scope {
            repository: "imagemesh/builds".into(),
            actions: vec!["pull".into(), "push".into()],
        }),
        request_id: "builder-token-test".into(),
        ..Default::default()
    };
    let token = credentials
        .mint(&request)
        .await
        .unwrap()
        .credential
        .unwrap();
    assert_eq!(token.scheme(), AuthScheme::Bearer);
    // The registry serves the manifest under the digest the builder reported.
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let reference: Reference = format!("{addr}/imagemesh/builds:img-tok").parse().unwrap();
    let served = client
        .fetch_manifest_digest(&reference, &RegistryAuth::Bearer(token.secret.clone()))
        .await
        .unwrap();
    assert_eq!(served, digest);
    mesh.assert_no_secret_leaked(&["tok", "tok-base"], &[REGISTRY_PASSWORD, &token.secret])
        .await;
    let left: Vec<_> = std::fs::read_dir(storage.path())
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "build directories left: {left:?}");
}
