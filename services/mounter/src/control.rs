//! Request-reply control of one mounter instance: unmount a container's image, list mounts.
//!
//! A mount lives in exactly one instance, so the endpoints are addressed to it: the `mounted`
//! status event names `unmount_subject` (`imagemesh.mounter.<worker id>.unmount`) and
//! `stats_subject` (`imagemesh.mounter.<worker id>.mounts`). They belong to the micro service
//! `mounter-control` (one per instance; `$SRV.INFO.mounter-control` lists every instance's
//! subjects), kept apart from the `mounter` service the work loop registers so that
//! `$SRV.PING.mounter` still counts instances.
//!
//! `unmount` takes the mount id (the container id, or the request id when the request had no
//! container id) as plain text or as `{"mount_id": "..."}` and answers the mount's final
//! numbers as JSON; an unknown id is a `NOT_FOUND` service error. `mounts` answers every live
//! mount with its read, cache and credential-refresh counters.

use std::sync::Arc;

use async_nats::Client;
use async_nats::service::{Request, Service};
use futures::StreamExt;
use imagemesh_runtime::service::{self, Identity};
use imagemesh_runtime::status::{StatusReporter, Step};
use imagemesh_runtime::{ErrorCode, Rejection, Shutdown};
use serde::Serialize;

use crate::cache::CacheStats;
use crate::mounts::{Mount, MountTable};
use crate::reader::{ReadStats, Shared};
use crate::refresh::RefreshStats;

/// The control service's identity.
pub const IDENTITY: Identity = Identity {
    name: "mounter-control",
    description: "Unmounts and lists the image mounts of one mounter instance",
};

pub fn unmount_subject(worker_id: &str) -> String {
    format!("imagemesh.mounter.{worker_id}.unmount")
}

pub fn stats_subject(worker_id: &str) -> String {
    format!("imagemesh.mounter.{worker_id}.mounts")
}

/// One mount as the endpoints describe it.
#[derive(Debug, Serialize)]
pub struct MountReport {
    pub mount_id: String,
    pub request_id: String,
    pub mountpoint: String,
    pub image_ref: String,
    pub image_digest: String,
    pub index_digest: String,
    pub entries: usize,
    pub files: usize,
    pub mounted_for_seconds: u64,
    pub reads: ReadStats,
    pub credential: RefreshStats,
}

impl MountReport {
    pub fn of(mount: &Mount) -> Self {
        let info = &mount.info;
        Self {
            mount_id: info.id.clone(),
            request_id: info.request_id.clone(),
            mountpoint: info.mountpoint.display().to_string(),
            image_ref: info.image_ref.clone(),
            image_digest: info.image_digest.clone(),
            index_digest: info.index_digest.clone(),
            entries: info.entries,
            files: info.files,
            mounted_for_seconds: info.mounted_at.elapsed().map_or(0, |d| d.as_secs()),
            reads: mount.reader.stats(),
            credential: mount.refresh.stats(),
        }
    }
}

#[derive(Serialize)]
struct Listing {
    worker_id: String,
    mounts: Vec<MountReport>,
    compressed_cache: CacheStats,
    decoded_cache: CacheStats,
}

/// What the endpoints need.
#[derive(Clone)]
pub struct Control {
    pub worker_id: String,
    pub mounts: Arc<MountTable>,
    pub shared: Arc<Shared>,
    pub status: StatusReporter,
}

/// Registers the control service and serves it until `shutdown`.
pub async fn serve(
    client: &Client,
    control: Control,
    shutdown: Shutdown,
) -> anyhow::Result<Service> {
    let service = service::register(client, IDENTITY).await?;
    let add =
        |name: &'static str, subject: String| service.endpoint_builder().name(name).add(subject);
    let mut unmount = add("unmount", unmount_subject(&control.worker_id))
        .await
        .map_err(|e| anyhow::anyhow!("cannot add the unmount endpoint: {e}"))?;
    let mut mounts = add("mounts", stats_subject(&control.worker_id))
        .await
        .map_err(|e| anyhow::anyhow!("cannot add the mounts endpoint: {e}"))?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(request) = unmount.next() => {
                    let control = control.clone();
                    tokio::spawn(async move { control.unmount(request).await });
                }
                Some(request) = mounts.next() => control.list(request).await,
                else => return,
            }
        }
    });
    Ok(service)
}

impl Control {
    async fn unmount(&self, request: Request) {
        let id = mount_id_of(&request.message.payload);
        let reply = match self.mounts.unmount(&id).await {
            Some(mount) => {
                let report = MountReport::of(&mount);
                tracing::info!(
                    mount_id = id,
                    bytes_fetched = report.reads.bytes_fetched,
                    "unmounted"
                );
                self.report_unmounted(&mount, &report).await;
                Ok(serde_json::to_vec(&report)
                    .expect("report serialises")
                    .into())
            }
            None => Err(Rejection::new(
                ErrorCode::NotFound,
                format!("no mount {id:?} on mounter {}", self.worker_id),
            )
            .to_service_error()),
        };
        if let Err(err) = request.respond(reply).await {
            tracing::warn!(error = %err, "could not answer an unmount request");
        }
    }

    /// Tells the request's watchers the container's image is gone, with its final numbers.
    pub async fn report_unmounted(&self, mount: &Mount, report: &MountReport) {
        let step = Step::succeeded("unmounted", format!("{} unmounted", report.mountpoint))
            .detail("mount_id", &report.mount_id)
            .detail("bytes_fetched", report.reads.bytes_fetched)
            .detail("range_requests", report.reads.range_requests)
            .detail("bytes_returned", report.reads.bytes_returned)
            .detail("credential_refreshes", report.credential.refreshes);
        self.status.report(&mount.info.request_id, step).await;
    }

    async fn list(&self, request: Request) {
        let listing = Listing {
            worker_id: self.worker_id.clone(),
            mounts: self
                .mounts
                .all()
                .iter()
                .map(|m| MountReport::of(m))
                .collect(),
            compressed_cache: self.shared.caches.compressed.stats(),
            decoded_cache: self.shared.caches.decoded.stats(),
        };
        let body = serde_json::to_vec(&listing).expect("listing serialises");
        if let Err(err) = request.respond(Ok(body.into())).await {
            tracing::warn!(error = %err, "could not answer a mounts request");
        }
    }
}

/// The id from `{"mount_id": "..."}` or the whole payload as text.
fn mount_id_of(payload: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ById {
        mount_id: String,
    }
    match serde_json::from_slice::<ById>(payload) {
        Ok(by_id) => by_id.mount_id,
        Err(_) => String::from_utf8_lossy(payload).trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::mount_id_of;

    #[test]
    fn the_mount_id_comes_as_text_or_json() {
        assert_eq!(mount_id_of(b"ctr-1\n"), "ctr-1");
        assert_eq!(mount_id_of(br#"{"mount_id":"ctr-2"}"#), "ctr-2");
    }
}
