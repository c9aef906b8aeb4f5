//! Shared by the indexer end-to-end tests: publishing index requests, running the `imagemesh`
//! CLI, reading the image-refs KV, and comparing an index with `umoci unpack`.
#![allow(dead_code)]

pub mod artifact;
pub mod compare;
pub mod images;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use imagemesh_proto::v1::{AuthScheme, ImageRecord, IndexRequest, RegistryCredential, StatusEvent};
use imagemesh_runtime::{streams, subjects};
use imagemesh_testkit::bin_path;
use imagemesh_testkit::oci_images::OciLayout;
use imagemesh_tests::{Mesh, REGISTRY_PASSWORD, REGISTRY_USER};
use prost::Message;

pub const WAIT: Duration = Duration::from_secs(120);

/// The build registry's credential, as the builder would pass it.
pub fn credential(mesh: &Mesh, password: &str) -> RegistryCredential {
    RegistryCredential {
        registry: mesh.registry.addr().to_string(),
        scheme: AuthScheme::Basic as i32,
        username: REGISTRY_USER.into(),
        secret: password.into(),
        ..Default::default()
    }
}

/// An index request for `repo:tag` in the mesh's registry.
pub fn request(mesh: &Mesh, id: &str, image: &str) -> IndexRequest {
    IndexRequest {
        request_id: id.into(),
        image_id: format!("img-{id}"),
        image_ref: format!("{}/{image}", mesh.registry.addr()),
        manifest_digest: String::new(),
        credential: Some(credential(mesh, REGISTRY_PASSWORD)),
        platform: String::new(),
        tenant: imagemesh_proto::DEFAULT_TENANT.into(),
    }
}

/// Publishes and waits for the request's last event.
pub async fn index(mesh: &Mesh, request: &IndexRequest) -> Vec<StatusEvent> {
    // As the builder publishes it: protobuf, `<tenant>.<request id>` as message id.
    mesh.publish_work(subjects::INDEX, request).await;
    mesh.wait_terminal(&request.request_id, WAIT).await
}

/// The `full` test image ([`images::build_full`]) pushed to the mesh's registry as
/// `test/full:v1` and indexed; returns its reference. The mounter tests start from it.
pub async fn push_and_index_full(mesh: &Mesh, layout: &OciLayout) -> String {
    images::build_full(layout, "full");
    let image = format!("{}/test/full:v1", mesh.registry.addr());
    layout.push("full", &image, REGISTRY_USER, REGISTRY_PASSWORD);
    let events = index(mesh, &request(mesh, "index-full", "test/full:v1")).await;
    assert!(
        imagemesh_tests::find(&events, "indexer", "indexed").is_some(),
        "{}",
        imagemesh_tests::describe(&events)
    );
    image
}

/// The image-refs KV record of the default tenant's `image_id`.
pub async fn image_record(mesh: &Mesh, image_id: &str) -> Option<ImageRecord> {
    let js = async_nats::jetstream::new(mesh.client.clone());
    let store = js.get_key_value(streams::IMAGE_REFS_BUCKET).await.ok()?;
    let key = streams::image_key(imagemesh_proto::DEFAULT_TENANT, image_id);
    let value = store.get(key).await.expect("kv get")?;
    Some(ImageRecord::decode(value).expect("record decodes"))
}

/// What one `imagemesh` run produced.
pub struct CliOutput {
    pub success: bool,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Runs `imagemesh <args>` with the registry password on stdin.
pub fn cli(args: &[&str]) -> CliOutput {
    let mut child = Command::new(bin_path("imagemesh"))
        .args(args)
        .args(["--username", REGISTRY_USER, "--password-stdin"])
        .env_remove("IMAGEMESH_REGISTRY_PASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run imagemesh");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{REGISTRY_PASSWORD}").expect("write password");
    drop(stdin);
    let out = child.wait_with_output().expect("imagemesh exits");
    CliOutput {
        success: out.status.success(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A detail of an event, or a panic naming what is missing.
pub fn detail<'a>(event: &'a StatusEvent, key: &str) -> &'a str {
    event.details.get(key).unwrap_or_else(|| {
        panic!(
            "event {} has no detail {key}: {:?}",
            event.phase, event.details
        )
    })
}
