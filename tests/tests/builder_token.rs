//! Dockerfile builds with registries that use distribution token auth. The credential service
//! brokers scoped bearer tokens: one for the build repository (buildah, which only takes
//! user:secret, writes an OCI layout that the builder pushes with the token; the indexer indexes
//! with the same token) and, from the scheduler, one per `FROM` image for exactly its
//! repository (the builder fetches the base with it and stores it where buildah finds it).

use std::time::Duration;

use imagemesh_proto::v1::{
    AuthScheme, RegistryCredential, RequestState, Scope, StatusEvent, TokenRequest,
};
use imagemesh_runtime::credentials::CredentialClient;
use imagemesh_testkit::images::{PulledImage, push_busybox};
use imagemesh_testkit::{Registry, RegistryAuth};
use imagemesh_tests::{
    Mesh, MeshOptions, PASSWORD_ENV, REGISTRY_PASSWORD, REGISTRY_USER, assert_succeeded,
    build_request, describe, find, token_registry, token_registry_config,
};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::{Client, Reference};
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(120);

/// A mesh on `build_registry` with a builder whose build directories live in the returned dir.
async fn start(build_registry: Registry, credential_config: String) -> (Mesh, TempDir) {
    let options = MeshOptions {
        start: vec!["credential", "scheduler", "indexer"],
        ..Default::default()
    };
    let mut mesh =
        Mesh::start_with_registry(options, build_registry, Some(credential_config)).await;
    let storage = tempfile::tempdir().unwrap();
    let dir = storage.path().to_str().unwrap().to_string();
    mesh.start_instance(
        "builder",
        "builder",
        &[("IMAGEMESH_BUILDER__STORAGE_DIR", dir.as_str())],
    )
    .await;
    (mesh, storage)
}

/// Uploads `hello.txt` as the context, builds `dockerfile`, and returns the events of the
/// request, which must have succeeded.
async fn build(mesh: &Mesh, id: &str, dockerfile: &str, hello: &[u8]) -> Vec<StatusEvent> {
    let context = format!("ctx-{id}");
    mesh.upload_context(&context, &[("hello.txt", hello)]).await;
    mesh.submit(&build_request(id, dockerfile, &context)).await;
    let events = mesh.wait_terminal(id, WAIT).await;
    assert_succeeded(&events);
    events
}

/// The credential service's (cached) token for this scope: the one the services were given.
async fn token(
    mesh: &Mesh,
    registry: &str,
    repository: &str,
    actions: &[&str],
) -> RegistryCredential {
    let credentials = CredentialClient::new(mesh.client.clone(), Duration::from_secs(5));
    let request = TokenRequest {
        registry: registry.into(),
        scope: Some(Scope {
            repository: repository.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
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
    token
}

fn assert_no_build_dirs(storage: &TempDir) {
    let left: Vec<_> = std::fs::read_dir(storage.path())
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "build directories left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dockerfile_build_is_pushed_to_a_token_auth_registry_with_the_bearer_token() {
    let (tokens, registry) = token_registry("imagemesh-test-registry");
    let addr = registry.addr().to_string();
    let (mesh, storage) = start(registry, token_registry_config(&addr)).await;

    // FROM scratch: the build registry's token is the only credential the build needs.
    let dockerfile = "FROM scratch\nENV ORIGIN=token-auth\nCOPY hello.txt /hello.txt\n";
    let events = build(&mesh, "tok", dockerfile, b"built with a bearer token\n").await;
    let authenticated = find(&events, "builder", "authenticated").expect("authenticated");
    assert_eq!(authenticated.details["actions"], "pull,push");
    let pushed = find(&events, "builder", "pushed").expect("pushed");
    let digest = pushed.details["digest"].clone();
    assert!(digest.starts_with("sha256:"), "{}", describe(&events));
    let indexed = find(&events, "indexer", "indexed").expect("indexed");
    assert_eq!(indexed.state(), RequestState::Succeeded);

    // Pulled back (skopeo, which runs the token flow with the long-term account): the config
    // and the one gzip layer are what the Dockerfile says.
    let image = PulledImage::pull(
        &addr,
        "imagemesh/builds/default:img-tok",
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
    assert!(
        tokens
            .scopes()
            .iter()
            .any(|s| s == "repository:imagemesh/builds/default:pull,push"),
        "{:?}",
        tokens.scopes()
    );

    // The registry serves the manifest under the digest the builder reported.
    let push_token = token(&mesh, &addr, "imagemesh/builds/default", &["pull", "push"]).await;
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let reference: Reference = format!("{addr}/imagemesh/builds/default:img-tok")
        .parse()
        .unwrap();
    let bearer = oci_client::secrets::RegistryAuth::Bearer(push_token.secret.clone());
    let served = client
        .fetch_manifest_digest(&reference, &bearer)
        .await
        .unwrap();
    assert_eq!(served, digest);

    // A base image in another repository of the same token-auth registry: the scheduler mints
    // a pull token for exactly that repository, the builder fetches the base with it, and RUN
    // works on it.
    push_busybox(&addr, "base/busybox:1", REGISTRY_USER, REGISTRY_PASSWORD);
    let pushed_scopes = tokens.scopes().len();
    let dockerfile = format!(
        "FROM {addr}/base/busybox:1\nCOPY hello.txt /hello.txt\nRUN cp /hello.txt /copied.txt\n"
    );
    let events = build(&mesh, "tok-base", &dockerfile, b"x").await;
    let dispatched = find(&events, "scheduler", "dispatched").expect("dispatched");
    assert_eq!(dispatched.details["base_image_credentials"], "1");
    let scopes = tokens.scopes();
    assert!(
        scopes[pushed_scopes..].contains(&"repository:base/busybox:pull".to_string()),
        "{scopes:?}"
    );
    let image = PulledImage::pull(
        &addr,
        "imagemesh/builds/default:img-tok-base",
        REGISTRY_USER,
        REGISTRY_PASSWORD,
    );
    assert_eq!(
        std::fs::read_to_string(image.rootfs().join("copied.txt")).unwrap(),
        "x"
    );

    // Neither token nor the long-term password is in any log, event or dead letter.
    let base_token = token(&mesh, &addr, "base/busybox", &["pull"]).await;
    let secrets = [REGISTRY_PASSWORD, &push_token.secret, &base_token.secret];
    mesh.assert_no_secret_leaked(&["tok", "tok-base"], &secrets)
        .await;
    assert_no_build_dirs(&storage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_base_image_in_a_token_auth_registry_is_fetched_with_its_bearer_token() {
    // The build registry is the mesh's htpasswd one; the base image lives in another registry
    // with distribution token auth, as on Docker Hub or Harbor.
    let (tokens, upstream) = token_registry("imagemesh-upstream");
    let upstream_addr = upstream.addr().to_string();
    let build_registry = Registry::start(RegistryAuth::Htpasswd(vec![(
        REGISTRY_USER.into(),
        REGISTRY_PASSWORD.into(),
    )]));
    let build_addr = build_registry.addr().to_string();
    let credential_config = format!(
        "[[credential.registries]]\nprovider = \"basic\"\nhost = \"{build_addr}\"\n\
         username = \"{REGISTRY_USER}\"\npassword = {{ env = \"{PASSWORD_ENV}\" }}\n\
         share_long_term_secret = true\n{}",
        token_registry_config(&upstream_addr)
    );
    let (mesh, storage) = start(build_registry, credential_config).await;
    push_busybox(
        &upstream_addr,
        "private/busybox:1",
        REGISTRY_USER,
        REGISTRY_PASSWORD,
    );
    let pushed_scopes = tokens.scopes().len();

    // The base is named through ARGs declared before FROM, as many Dockerfiles do: both the
    // scheduler (minting) and the builder (fetching) expand them the way buildah will.
    let dockerfile = format!(
        "ARG REGISTRY={upstream_addr}\nARG TAG=1\n\
         FROM ${{REGISTRY}}/private/busybox:${{TAG}}\nCOPY hello.txt /srv/hello.txt\n\
         RUN echo \"ran on $(cat /srv/hello.txt)\" > /srv/ran.txt\n"
    );
    let events = build(&mesh, "up", &dockerfile, b"on a private base\n").await;
    let dispatched = find(&events, "scheduler", "dispatched").expect("dispatched");
    assert_eq!(dispatched.details["base_image_credentials"], "1");
    // The scheduler asked the upstream's token server for pull on the base image only.
    let scopes = tokens.scopes();
    assert_eq!(
        scopes[pushed_scopes..],
        ["repository:private/busybox:pull".to_string()],
        "{scopes:?}"
    );

    // The image holds the base's busybox (RUN worked) and the new files.
    let image = PulledImage::pull(
        &build_addr,
        "imagemesh/builds/default:img-up",
        REGISTRY_USER,
        REGISTRY_PASSWORD,
    );
    let rootfs = image.rootfs();
    assert!(rootfs.join("bin/busybox").exists() || rootfs.join("bin/sh").exists());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("srv/ran.txt")).unwrap(),
        "ran on on a private base\n"
    );
    let layers = image.manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "{:?}", image.manifest);

    let base_token = token(&mesh, &upstream_addr, "private/busybox", &["pull"]).await;
    mesh.assert_no_secret_leaked(&["up"], &[REGISTRY_PASSWORD, &base_token.secret])
        .await;
    assert_no_build_dirs(&storage);
}
