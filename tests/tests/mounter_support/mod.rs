//! Shared by the mounter end-to-end tests: a mesh with a mounter whose mount root is a temp dir
//! that is cleaned of every FUSE mount when the test ends (even when it fails), runtime
//! requests, `/proc/mounts`, the control endpoints, and comparing a mount with `umoci unpack`.
#![allow(dead_code)]

pub mod tree;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use imagemesh_proto::v1::{ContainerRequest, RequestKind, RequestState, StatusEvent};
use imagemesh_runtime::Rejection;
use imagemesh_tests::{Mesh, describe};
use serde_json::Value;
use tempfile::TempDir;

pub const WAIT: Duration = Duration::from_secs(120);
/// The mounter's worker id in these tests (its control subjects follow from it).
pub const WORKER_ID: &str = "mounter-test-1";

/// A mount root that leaves nothing mounted behind.
pub struct MountRoot {
    dir: TempDir,
}

impl MountRoot {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("imagemesh-mounts-")
            .tempdir()
            .expect("temp dir");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Mount points under the root, as `/proc/mounts` lists them now.
    pub fn mounted(&self) -> Vec<PathBuf> {
        mounted_under(self.path())
    }
}

impl Drop for MountRoot {
    fn drop(&mut self) {
        // A stale FUSE mount would break every later test that walks /tmp: detach them all.
        for mountpoint in self.mounted() {
            let _ = Command::new("umount").arg("-l").arg(&mountpoint).status();
        }
    }
}

/// Mount points at or below `root` in `/proc/mounts`.
pub fn mounted_under(root: &Path) -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .map(|field| PathBuf::from(field.replace("\\040", " ")))
        .filter(|path| path.starts_with(root) && path != root)
        .collect()
}

/// A mesh whose mounter mounts under its own temp root. Field order matters: the mesh (and the
/// mounter process) goes first, then the root detaches whatever is left.
pub struct MounterMesh {
    pub mesh: Mesh,
    pub root: MountRoot,
}

/// Starts the mounter of `mesh` with a fresh mount root.
pub async fn start_mounter(mut mesh: Mesh, extra_env: &[(&str, &str)]) -> MounterMesh {
    let root = MountRoot::new();
    let root_path = root.path().to_str().expect("utf-8 temp path").to_string();
    let mut env = vec![
        ("IMAGEMESH_MOUNTER__MOUNT_ROOT", root_path.as_str()),
        ("IMAGEMESH_MOUNTER__PLACEMENT__WORKER_ID", WORKER_ID),
    ];
    env.extend_from_slice(extra_env);
    mesh.start_instance("mounter", "mounter", &env).await;
    MounterMesh { mesh, root }
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
