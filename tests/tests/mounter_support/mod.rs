//! Shared by the mounter end-to-end tests: a mesh with a mounter, runtime requests, the control
//! subjects, and comparing a mount with `umoci unpack`. The mesh mounts under its own temp
//! mount root and detaches every FUSE mount left there when it drops, even when a test fails.
#![allow(dead_code)]

pub mod tree;

use std::path::PathBuf;
use std::time::Duration;

use imagemesh_proto::v1::{ContainerRequest, RequestKind, RequestState, StatusEvent};
use imagemesh_runtime::Rejection;
use imagemesh_tests::{Mesh, describe};
use serde_json::Value;

pub const WAIT: Duration = Duration::from_secs(120);
/// The mounter's worker id in these tests (its control subjects follow from it).
pub const WORKER_ID: &str = "mounter-test-1";

/// Starts the mounter of `mesh` (mounting under the mesh's mount root, which the mesh empties
/// of mounts when it drops, even when the test fails).
pub async fn start_mounter(mut mesh: Mesh, extra_env: &[(&str, &str)]) -> Mesh {
    let mut env = vec![("IMAGEMESH_MOUNTER__PLACEMENT__WORKER_ID", WORKER_ID)];
    env.extend_from_slice(extra_env);
    mesh.start_instance("mounter", "mounter", &env).await;
    mesh
}

/// Where the mounter mounts `mount_id`.
pub fn mountpoint(mesh: &Mesh, mount_id: &str) -> PathBuf {
    mesh.mount_root().canonicalize().unwrap().join(mount_id)
}

/// A runtime request for `image_ref`.
pub fn runtime_request(id: &str, container_id: &str, image_ref: &str) -> ContainerRequest {
    ContainerRequest {
        request_id: id.into(),
        container_id: container_id.into(),
        kind: RequestKind::Runtime as i32,
        image_ref: image_ref.into(),
        ..Default::default()
    }
}

/// Submits through the intake (the scheduler attaches credentials) and waits for the end.
pub async fn run(mesh: &Mesh, request: &ContainerRequest) -> Vec<StatusEvent> {
    mesh.submit(request).await;
    mesh.wait_terminal(&request.request_id, WAIT).await
}

/// The `mounted` event of a request that succeeded.
pub fn mounted(events: &[StatusEvent]) -> &StatusEvent {
    let last = events
        .iter()
        .find(|e| e.service == "mounter" && e.phase == "mounted")
        .unwrap_or_else(|| panic!("not mounted:\n{}", describe(events)));
    assert_eq!(
        last.state(),
        RequestState::Succeeded,
        "{}",
        describe(events)
    );
    last
}

pub fn detail<'a>(event: &'a StatusEvent, key: &str) -> &'a str {
    event
        .details
        .get(key)
        .unwrap_or_else(|| panic!("{} has no detail {key}: {:?}", event.phase, event.details))
}

/// Calls a control endpoint; `Err` is the service error it answered with.
pub async fn control(mesh: &Mesh, subject: &str, payload: &str) -> Result<Value, Rejection> {
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        mesh.client
            .request(subject.to_string(), payload.to_string().into()),
    )
    .await
    .expect("control endpoint answers in time")
    .expect("control request");
    if let Some(rejection) = Rejection::from_headers(reply.headers.as_ref()) {
        return Err(rejection);
    }
    Ok(serde_json::from_slice(&reply.payload).expect("control replies are JSON"))
}

/// The mount `mount_id` as the stats endpoint reports it.
pub async fn mount_stats(mesh: &Mesh, mount_id: &str) -> Value {
    let listing = control(mesh, &format!("imagemesh.mounter.{WORKER_ID}.mounts"), "")
        .await
        .expect("mounts listing");
    listing["mounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["mount_id"] == mount_id)
        .unwrap_or_else(|| panic!("no mount {mount_id} in {listing}"))
        .clone()
}

/// Reads a file through the mount off the async threads (FUSE calls block).
pub async fn read_file(path: PathBuf) -> Vec<u8> {
    tokio::task::spawn_blocking(move || {
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    })
    .await
    .expect("read task")
}

/// Waits until the mounter (restarted) answers its `mounts` endpoint.
pub async fn wait_until_serving(mesh: &Mesh) {
    mesh.wait_mounter_serving(WORKER_ID, WAIT).await;
}
