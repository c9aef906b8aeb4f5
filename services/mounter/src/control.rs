//! Request-reply control of one mounter instance: unmount a container's image, list mounts.
//!
//! A mount lives in exactly one instance, so the endpoints are addressed to it: the `mounted`
//! status event names `unmount_subject` (`imagemesh.mounter.<worker id>.unmount`) and
//! `stats_subject` (`imagemesh.mounter.<worker id>.mounts`). They are plain NATS request-reply
//! subjects answering refusals with the micro-service error headers (`Nats-Service-Error`,
//! `Nats-Service-Error-Code`), not endpoints of a micro service: the `mounter` micro service is
//! registered by the shared work loop, which takes no extra endpoints, and a second service per
//! instance would change what `$SRV.INFO` lists for the mesh.
//!
//! `unmount` takes the mount id (the container id, or `<tenant>_<request id>` when the request had
//! no container id) as plain text or as `{"mount_id": "..."}` and answers the mount's final
//! numbers as JSON; an unknown id is a `NOT_FOUND` service error. `mounts` answers every live
//! mount with its read, cache and credential-refresh counters.

use std::sync::Arc;

use async_nats::service::{NATS_SERVICE_ERROR, NATS_SERVICE_ERROR_CODE};
use async_nats::{Client, HeaderMap, Message};
use bytes::Bytes;
use futures::StreamExt;
use imagemesh_proto::RequestKey;
use imagemesh_runtime::status::{StatusReporter, Step};
use imagemesh_runtime::{ErrorCode, Rejection, Shutdown, subjects};
use serde::Serialize;

use crate::mounts::{Mount, MountTable};
use crate::refresh::RefreshStats;
use imagemesh_lazyimage::cache::CacheStats;
use imagemesh_lazyimage::{PrefetchStats, ReadStats, Shared};

pub fn unmount_subject(worker_id: &str) -> String {
    format!("{}.unmount", subjects::mounter_control_prefix(worker_id))
}

pub fn stats_subject(worker_id: &str) -> String {
    format!("{}.mounts", subjects::mounter_control_prefix(worker_id))
}

/// One mount as the endpoints describe it.
#[derive(Debug, Serialize)]
pub struct MountReport {
    pub mount_id: String,
    pub tenant: String,
    pub request_id: String,
    pub mountpoint: String,
    pub image_ref: String,
    pub image_digest: String,
    pub index_digest: String,
    pub entries: usize,
    pub files: usize,
    /// What its loaded index and file table hold in memory (estimated).
    pub index_bytes: u64,
    pub mounted_for_seconds: u64,
    /// The image's lazy mount this container's mount point binds (shared by the containers of
    /// the image in the tenant), where it is mounted, and every container using it.
    pub lazy_mount: String,
    pub lazy_mountpoint: String,
    pub shared_by: Vec<String>,
    /// Taken over from an earlier mounter process (through the mount keeper).
    pub resumed: bool,
    /// The lazy mount's reads (every container of it together).
    pub reads: ReadStats,
    /// What the mount recorded (first run of its image) or prefetched (later runs).
    pub prefetch: PrefetchStats,
    pub credential: RefreshStats,
}

impl MountReport {
    pub fn of(mount: &Mount) -> Self {
        let info = &mount.info;
        Self {
            mount_id: info.id.clone(),
            tenant: info.tenant.clone(),
            request_id: info.request_id.clone(),
            mountpoint: info.mountpoint.display().to_string(),
            image_ref: info.image_ref.clone(),
            image_digest: info.image_digest.clone(),
            index_digest: info.index_digest.clone(),
            entries: info.entries,
            files: info.files,
            index_bytes: info.index_bytes,
            mounted_for_seconds: info.mounted_at.elapsed().map_or(0, |d| d.as_secs()),
            lazy_mount: mount.lazy.id.clone(),
            lazy_mountpoint: mount.lazy.path.display().to_string(),
            shared_by: mount.lazy.users(),
            resumed: info.resumed_at.is_some(),
            reads: mount.reader.stats(),
            prefetch: mount.reader.prefetch_stats(),
            credential: mount.refresh.stats(),
        }
    }
}

/// One lazy mount and the containers sharing it.
#[derive(Serialize)]
struct LazyReport {
    lazy_mount: String,
    tenant: String,
    mountpoint: String,
    image_digest: String,
    index_digest: String,
    containers: Vec<String>,
    resumed: bool,
    index_bytes: u64,
    reads: ReadStats,
    prefetch: PrefetchStats,
    credential: RefreshStats,
}

#[derive(Serialize)]
struct Listing {
    worker_id: String,
    mounts: Vec<MountReport>,
    /// The images' lazy mounts, each with the containers that share it.
    lazy_mounts: Vec<LazyReport>,
    compressed_cache: CacheStats,
    decoded_cache: CacheStats,
    /// The node cache on disk; null when not configured or not usable.
    disk_cache: Option<imagemesh_lazyimage::disk_cache::DiskCacheStats>,
    /// Memory the mounts' loaded indexes and file tables hold, against its budget.
    index_memory: IndexMemory,
}

#[derive(Serialize)]
struct IndexMemory {
    bytes: u64,
    budget: u64,
}

/// What the endpoints need.
#[derive(Clone)]
pub struct Control {
    pub client: Client,
    pub worker_id: String,
    pub mounts: Arc<MountTable>,
    pub shared: Arc<Shared>,
    pub status: StatusReporter,
}

/// Subscribes to both subjects and answers them until `shutdown`.
pub async fn serve(control: Control, shutdown: Shutdown) -> anyhow::Result<()> {
    let subscribe = |subject: String| control.client.subscribe(subject);
    let mut unmount = subscribe(unmount_subject(&control.worker_id)).await?;
    let mut mounts = subscribe(stats_subject(&control.worker_id)).await?;
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
    Ok(())
}

impl Control {
    async fn unmount(&self, request: Message) {
        let id = mount_id_of(&request.payload);
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
            )),
        };
        self.respond(&request, reply).await;
    }

    /// Tells the request's watchers the container's image is gone, with its final numbers.
    pub async fn report_unmounted(&self, mount: &Mount, report: &MountReport) {
        let step = Step::succeeded("unmounted", format!("{} unmounted", report.mountpoint))
            .detail("mount_id", &report.mount_id)
            .detail("bytes_fetched", report.reads.bytes_fetched)
            .detail("range_requests", report.reads.range_requests)
            .detail("bytes_returned", report.reads.bytes_returned)
            .detail("prefetch", &report.prefetch.state)
            .detail("prefetch_spans_recorded", report.prefetch.spans_recorded)
            .detail("prefetch_spans", report.prefetch.spans_prefetched)
            .detail("prefetch_bytes", report.prefetch.bytes_prefetched)
            .detail("prefetch_hits", report.prefetch.hits)
            .detail("credential_refreshes", report.credential.refreshes);
        let request = RequestKey::new(&mount.info.tenant, &mount.info.request_id);
        self.status.report(request, step).await;
    }

    async fn list(&self, request: Message) {
        let listing = Listing {
            worker_id: self.worker_id.clone(),
            mounts: self
                .mounts
                .all()
                .iter()
                .map(|m| MountReport::of(m))
                .collect(),
            lazy_mounts: self
                .mounts
                .lazies()
                .iter()
                .map(|l| LazyReport {
                    lazy_mount: l.id.clone(),
                    tenant: l.key.tenant.clone(),
                    mountpoint: l.path.display().to_string(),
                    image_digest: l.key.image_digest.clone(),
                    index_digest: l.key.index_digest.clone(),
                    containers: l.users(),
                    resumed: l.resumed_at.is_some(),
                    index_bytes: l.index_bytes,
                    reads: l.reader.stats(),
                    prefetch: l.reader.prefetch_stats(),
                    credential: l.refresh.stats(),
                })
                .collect(),
            compressed_cache: self.shared.caches.compressed.stats(),
            decoded_cache: self.shared.caches.decoded.stats(),
            disk_cache: self.shared.caches.disk.as_ref().map(|disk| disk.stats()),
            index_memory: {
                let (bytes, budget) = self.mounts.index_memory();
                IndexMemory { bytes, budget }
            },
        };
        let body = serde_json::to_vec(&listing).expect("listing serialises");
        self.respond(&request, Ok(body.into())).await;
    }

    /// Replies like a micro-service endpoint: the body, or the error headers.
    async fn respond(&self, request: &Message, reply: Result<Bytes, Rejection>) {
        let Some(to) = request.reply.clone() else {
            return;
        };
        let mut headers = HeaderMap::new();
        let body = match reply {
            Ok(body) => body,
            Err(rejection) => {
                let error = rejection.to_service_error();
                headers.insert(NATS_SERVICE_ERROR, error.status.as_str());
                headers.insert(NATS_SERVICE_ERROR_CODE, error.code.to_string().as_str());
                Bytes::new()
            }
        };
        if let Err(err) = self.client.publish_with_headers(to, headers, body).await {
            tracing::warn!(error = %err, "could not answer a control request");
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
