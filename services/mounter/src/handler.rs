//! One runtime request: mount its image lazily, read-only, at `<mount_root>/<container id>`.
//!
//! Status phases: `authenticated` (the registry served the manifest with the request's
//! credential), `resolved` (manifest and index found), then `mounted` (succeeded) with the
//! mount point, digests, entry count, bytes fetched so far and where to unmount. A redelivered
//! request for a mount that exists reports it again (`existing=true`) and mounts nothing; a
//! mount is only ever found again by its own tenant.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use imagemesh_lazyindex::{EntryKind, MergedTree};
use imagemesh_proto::TenantRequest;
use imagemesh_proto::v1::{ContainerRequest, RegistryCredential};
use imagemesh_registry::{
    PlatformSpec, Reference, RegistryClient, RegistrySettings, credential_for,
};
use imagemesh_runtime::credentials::CredentialClient;
use imagemesh_runtime::status::{StatusReporter, Step};
use imagemesh_runtime::worker::{Delivery, Handler, Outcome};
use imagemesh_runtime::{ErrorCode, Rejection, Shutdown};
use tokio::runtime::Handle;
use tracing::Instrument as _;

use crate::bundle::Process;
use crate::config::{PrefetchConfig, ReadConfig, RefreshConfig};
use crate::control;
use crate::fs::ImageFs;
use crate::fs::inodes::Inodes;
use crate::keeper::KeptMount;
use crate::mounts::{LazyKey, LazyMount, Mount, MountError, MountInfo, MountTable, Reserved};
use crate::open::{OpenedImage, load_index, resolve};
use crate::refresh::{Refresh, RefreshCounters};
use crate::source::MountSource;
use imagemesh_lazyimage::{ImageReader, Shared};

/// A mount's file system, ready to be served.
pub(crate) struct Prepared {
    pub fs: ImageFs,
    pub source: Arc<MountSource>,
    pub index_bytes: u64,
}

/// The mounter's work handler.
#[derive(Clone)]
pub struct Mounter {
    pub status: StatusReporter,
    pub registry: RegistrySettings,
    pub platform: PlatformSpec,
    pub mounts: Arc<MountTable>,
    pub shared: Arc<Shared>,
    pub credentials: CredentialClient,
    pub refresh: RefreshConfig,
    pub reads: ReadConfig,
    pub prefetch: PrefetchConfig,
    /// Longest the registry work of one mount may take (`mounter.prepare_deadline`).
    pub prepare_deadline: Duration,
    pub runtime: Handle,
    pub worker_id: String,
}

impl Handler for Mounter {
    type Request = ContainerRequest;

    fn without_secrets(request: &ContainerRequest) -> ContainerRequest {
        request.without_secrets()
    }

    async fn handle(&self, request: ContainerRequest, _delivery: &Delivery) -> Outcome {
        match self.mount(&request).await {
            Ok(()) => Outcome::Done,
            Err(outcome) => outcome,
        }
    }
}

fn reject(code: ErrorCode, message: impl Into<String>) -> Outcome {
    Outcome::Reject(Rejection::new(code, message))
}

/// The mount's id: the container's (the platform gives containers ids unique on a node), else
/// `<tenant>_<request id>` (request ids are unique per tenant only; tenants hold no `_`, so two
/// tenants never make the same id). It names a directory, so it must be a plain token.
fn mount_id(request: &ContainerRequest) -> Result<String, Outcome> {
    if request.container_id.is_empty() {
        // The work loop validated both parts: `[a-z0-9-]` and `[A-Za-z0-9_-]`.
        return Ok(format!("{}_{}", request.tenant, request.request_id));
    }
    imagemesh_proto::validate_request_id(&request.container_id)
        .map_err(|e| reject(ErrorCode::MalformedRequest, format!("container_id: {e}")))?;
    Ok(request.container_id.clone())
}

impl Mounter {
    async fn mount(&self, request: &ContainerRequest) -> Result<(), Outcome> {
        let id = &mount_id(request)?;
        let image = imagemesh_registry::parse_reference(&request.image_ref).map_err(|e| {
            reject(
                ErrorCode::MalformedRequest,
                format!("invalid image_ref: {e}"),
            )
        })?;
        match self.mounts.reserve(id, &request.tenant, &request.image_ref) {
            Reserved::New => {}
            Reserved::Existing(mount) => {
                let step = self.mounted_step(&mount, 0.0).detail("existing", true);
                self.status.report(request.key(), step).await;
                return Ok(());
            }
            Reserved::OtherTenant => {
                return Err(reject(
                    ErrorCode::Forbidden,
                    format!("container {id} is mounted for another tenant"),
                ));
            }
            Reserved::Conflict(other) => {
                return Err(reject(
                    ErrorCode::MalformedRequest,
                    format!("container {id} already has another image mounted ({other})"),
                ));
            }
            Reserved::Busy => {
                return Err(Outcome::Retry(Rejection::new(
                    ErrorCode::Internal,
                    format!("container {id} is being mounted by another delivery"),
                )));
            }
            // Handed back: another instance with room may take it (placement stops sending
            // here once the next heartbeat shows the table full).
            Reserved::Full(limit) => {
                return Err(Outcome::Retry(Rejection::new(
                    ErrorCode::AtCapacity,
                    format!(
                        "mounter {} holds its limit of {limit} mounts",
                        self.worker_id
                    ),
                )));
            }
        }
        let result = self.mount_new(id, &image, request).await;
        if result.is_err() {
            self.mounts.release(id);
        }
        result
    }

    async fn mount_new(
        &self,
        id: &str,
        image: &Reference,
        request: &ContainerRequest,
    ) -> Result<(), Outcome> {
        let started = Instant::now();
        let registry = image.registry().to_string();
        // The build-registry token when the image lives there (the token that pushed it).
        let credential = credential_for(request, &registry);
        let client = Arc::new(RegistryClient::new(&registry, credential, &self.registry));
        // The registry work is bounded; the kernel mount after it is local and quick.
        // Spans for each step, so the request's trace answers "why was this start slow".
        let preparing = async {
            let resolved = resolve(&client, image, &self.platform)
                .instrument(tracing::info_span!("resolve image", registry = %registry))
                .await
                .map_err(|e| e.into_outcome())?;
            self.report_authenticated(request, &registry, credential)
                .await;
            // Containers of an image already mounted share its index.
            let image = LazyKey::of(&request.tenant, &resolved, "");
            let live = |index_digest: &str| {
                let key = LazyKey {
                    index_digest: index_digest.to_string(),
                    ..image
                };
                self.mounts
                    .find_lazy(&key)
                    .map(|l| l.reader.image().clone())
            };
            let opened = load_index(&client, resolved, live)
                .instrument(tracing::info_span!("load index"))
                .await
                .map_err(|e| e.into_outcome())?;
            self.report_resolved(request, &opened).await;
            let process = self
                .process(request, &client, &opened)
                .instrument(tracing::info_span!("image config"))
                .await?;
            Ok::<_, Outcome>((opened, process))
        };
        let (opened, process) = tokio::time::timeout(self.prepare_deadline, preparing)
            .await
            .map_err(|_| {
                Outcome::Retry(Rejection::new(
                    ErrorCode::RegistryUnavailable,
                    format!(
                        "preparing the mount of {} took longer than {:?}",
                        request.image_ref, self.prepare_deadline
                    ),
                ))
            })??;
        let key = LazyKey::of(&request.tenant, &opened.resolved, &opened.index_digest);
        // Containers of the image share its lazy mount: found, or made, under the key's lock.
        let _lazy_lock = self.mounts.lazy_lock(&key).await;
        let (lazy, made) = match self.mounts.find_lazy(&key) {
            Some(lazy) => (lazy, false),
            None => {
                let lazy = self.mount_lazy(id, &key, client, &opened, request).await?;
                (lazy, true)
            }
        };
        let info = MountInfo {
            id: id.to_string(),
            tenant: request.tenant.clone(),
            request_id: request.request_id.clone(),
            image_ref: request.image_ref.clone(),
            image_digest: opened.resolved.digest().to_string(),
            index_digest: opened.index_digest.clone(),
            mountpoint: self.mounts.mountpoint(id),
            // Nothing to run (no Cmd, no args): a mount without a bundle.
            bundle: process.runnable().then(|| self.mounts.bundle_dir(id)),
            entries: lazy.entries,
            files: lazy.files,
            index_bytes: lazy.index_bytes,
            mounted_at: SystemTime::now(),
            resumed_at: None,
        };
        // Each container keeps the credential its own request brought.
        let kept = KeptMount::of(&info, &opened.resolved.reference, credential);
        let mounts = self.mounts.clone();
        let mounting =
            tracing::info_span!("mount", mount_id = id, lazy_mount = %lazy.id, shared = !made);
        let attaching = lazy.clone();
        let attached = self
            .mounts
            .blocking(move || {
                let _in = mounting.enter();
                let attached =
                    mounts.attach_blocking(&attaching, info, Some(&kept), Some(&process));
                if attached.is_err() {
                    mounts.end_lazy_if_unused_blocking(&attaching);
                }
                attached
            })
            .await
            .map_err(|e| reject(ErrorCode::Internal, format!("mount task failed: {e}")))?;
        let mount = attached.map_err(|e| match e {
            // A mount point in a bad state or /dev/fuse busy may clear up: retry.
            MountError::Fuse(e) => Outcome::Retry(Rejection::new(
                ErrorCode::Internal,
                format!("mounting {id} failed: {e}"),
            )),
            // The mount is undone; an overlay or a user the image lacks will not change.
            bundle @ MountError::Bundle(_) => reject(ErrorCode::Internal, bundle.to_string()),
        })?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(mount_id = id, mountpoint = %mount.info.mountpoint.display(), lazy_mount = %lazy.id, shared = !made, seconds, "mounted");
        let step = self.mounted_step(&mount, seconds).detail("existing", false);
        self.status.report(request.key(), step).await;
        Ok(())
    }

    /// Mounts the image's lazy FUSE mount for the containers of `key` to share, with its
    /// credential refresh and prefetch. Hold the key's lock.
    async fn mount_lazy(
        &self,
        id: &str,
        key: &LazyKey,
        client: Arc<RegistryClient>,
        opened: &OpenedImage,
        request: &ContainerRequest,
    ) -> Result<Arc<LazyMount>, Outcome> {
        let credential = credential_for(request, opened.resolved.reference.registry());
        let Prepared {
            fs,
            source,
            index_bytes,
        } = self
            .prepare(&key.id(), id, client, opened)
            .instrument(tracing::info_span!("file table"))
            .await?;
        let counters = Arc::new(RefreshCounters::new(credential));
        let stop = Shutdown::new();
        let mounts = self.mounts.clone();
        let (k, c, s) = (key.clone(), counters, stop);
        // The mount's first registry read is traced under this request, when it comes.
        source.trace_first_read(imagemesh_runtime::telemetry::current_context());
        let lazy = self
            .mounts
            .blocking(move || mounts.mount_lazy_blocking(fs, k, c, s, index_bytes))
            .await
            .map_err(|e| reject(ErrorCode::Internal, format!("mount task failed: {e}")))?
            .map_err(|e| {
                // A mount point in a bad state or /dev/fuse busy may clear up: retry.
                Outcome::Retry(Rejection::new(
                    ErrorCode::Internal,
                    format!("mounting the image for {id} failed: {e}"),
                ))
            })?;
        self.start_refresh(
            &lazy,
            source.clone(),
            credential.cloned(),
            &request.request_id,
        );
        // The scheduler's push token for the image's repository, if any: only to publish the
        // recorded prefetch list (the mount reads with the pull-only credential).
        let publisher = request
            .prefetch_credential
            .as_ref()
            .filter(|c| {
                imagemesh_registry::host::same_registry(
                    &c.registry,
                    opened.resolved.reference.registry(),
                )
            })
            .map(|c| {
                Arc::new(RegistryClient::new(
                    opened.resolved.reference.registry(),
                    Some(c),
                    &self.registry,
                ))
            });
        self.start_prefetch(&lazy, source, opened, publisher);
        Ok(lazy)
    }

    /// The file system of an opened image (`lazy_id` names it in logs), its index memory
    /// charged to the reserved `id`.
    pub(crate) async fn prepare(
        &self,
        lazy_id: &str,
        id: &str,
        client: Arc<RegistryClient>,
        opened: &OpenedImage,
    ) -> Result<Prepared, Outcome> {
        let reference = opened.resolved.reference.clone();
        let source = Arc::new(
            MountSource::new(
                client,
                &reference,
                self.registry.clone(),
                self.reads.clone(),
            )
            .await,
        );
        let reader =
            ImageReader::new_shared(opened.index.clone(), source.clone(), self.shared.clone());
        let index = opened.index.clone();
        let inodes = self
            .mounts
            .blocking(move || Arc::new(Inodes::build(MergedTree::from_layers(&index.layers))))
            .await
            .map_err(|e| reject(ErrorCode::Internal, format!("building the file table: {e}")))?;
        let index_bytes = crate::footprint::of_mount(&opened.index, &inodes);
        if let Err((held, budget)) = self.mounts.charge(id, index_bytes) {
            return Err(Outcome::Retry(Rejection::new(
                ErrorCode::AtCapacity,
                format!(
                    "mounter {} cannot hold this image's index ({index_bytes} bytes) within its \
                     index memory budget ({held} of {budget} bytes held)",
                    self.worker_id
                ),
            )));
        }
        let fs = ImageFs {
            inodes,
            reader,
            runtime: self.runtime.clone(),
            mount_id: lazy_id.to_string(),
        };
        Ok(Prepared {
            fs,
            source,
            index_bytes,
        })
    }

    /// What the container runs: the image config (pulled with the mount's client) with the
    /// request's args and env over it.
    async fn process(
        &self,
        request: &ContainerRequest,
        client: &RegistryClient,
        opened: &OpenedImage,
    ) -> Result<Process, Outcome> {
        let config = client
            .pull_image_config(&opened.resolved)
            .await
            .map_err(|e| crate::open::OpenError::Registry(e).into_outcome())?;
        Process::from_image(&config, &request.args, &request.env).map_err(|(image, why)| {
            let code = if image {
                ErrorCode::InvalidImage
            } else {
                ErrorCode::MalformedRequest
            };
            reject(code, why)
        })
    }

    /// Keeps the lazy mount's credential fresh until its last container is unmounted (static
    /// ones need nothing), on behalf of the request `request_id` that made it.
    pub(crate) fn start_refresh(
        &self,
        lazy: &LazyMount,
        source: Arc<MountSource>,
        credential: Option<RegistryCredential>,
        request_id: &str,
    ) {
        let Some(credential) = credential else {
            return;
        };
        let refresh = Refresh {
            credentials: self.credentials.clone(),
            config: self.refresh.clone(),
            source,
            counters: lazy.refresh.clone(),
            mount_id: lazy.id.clone(),
            request_id: request_id.to_string(),
            tenant: lazy.key.tenant.clone(),
        };
        tokio::spawn(refresh.run(credential, lazy.stop.clone()));
    }

    /// Prefetches the image's recorded spans in the background, or records them (first run).
    fn start_prefetch(
        &self,
        lazy: &LazyMount,
        source: Arc<MountSource>,
        opened: &OpenedImage,
        publisher: Option<Arc<RegistryClient>>,
    ) {
        if !self.prefetch.enabled {
            return;
        }
        lazy.reader.set_prefetch_state("lookup", None);
        let prefetch = crate::prefetch::Prefetch {
            config: self.prefetch.clone(),
            reader: lazy.reader.clone(),
            source,
            image: opened.resolved.clone(),
            mount_id: lazy.id.clone(),
            stop: lazy.stop.clone(),
            publisher,
        };
        tokio::spawn(prefetch.run());
    }

    /// The registry accepted the request's credential (it served the manifest).
    async fn report_authenticated(
        &self,
        request: &ContainerRequest,
        registry: &str,
        credential: Option<&RegistryCredential>,
    ) {
        let mut step = Step::running(
            "authenticated",
            format!("registry {registry} accepted the credential"),
        )
        .detail("registry", registry);
        match credential {
            Some(credential) => {
                let actions = credential
                    .scope
                    .as_ref()
                    .map(|s| s.actions.join(","))
                    .unwrap_or_default();
                step = step
                    .detail("username", &credential.username)
                    .detail("scheme", credential.scheme_name())
                    .detail("actions", actions);
            }
            None => step.message = format!("registry {registry} reached anonymously"),
        }
        self.status.report(request.key(), step).await;
    }

    async fn report_resolved(&self, request: &ContainerRequest, opened: &OpenedImage) {
        let layers = &opened.index.layers;
        let compressed: u64 = layers.iter().map(|l| l.compressed_size).sum();
        let files = layers
            .iter()
            .flat_map(|l| &l.entries)
            .filter(|e| e.kind == EntryKind::File)
            .count();
        let step = Step::running("resolved", "image and its index found")
            .detail("image_digest", opened.resolved.digest())
            .detail("index_digest", &opened.index_digest)
            .detail("index_bytes", opened.index_bytes)
            .detail("index_shared", opened.index_shared)
            .detail("layers", layers.len())
            .detail("layer_files", files)
            .detail("compressed_bytes", compressed);
        self.status.report(request.key(), step).await;
    }

    fn mounted_step(&self, mount: &Mount, seconds: f64) -> Step {
        let info = &mount.info;
        let stats = mount.reader.stats();
        Step::succeeded(
            "mounted",
            format!("image mounted read-only at {}", info.mountpoint.display()),
        )
        .detail("mount_id", &info.id)
        .detail("mountpoint", info.mountpoint.display())
        .detail(
            "bundle",
            info.bundle
                .as_ref()
                .map(|b| b.display().to_string())
                .unwrap_or_default(),
        )
        .detail("image_ref", &info.image_ref)
        .detail("image_digest", &info.image_digest)
        .detail("index_digest", &info.index_digest)
        .detail("entries", info.entries)
        .detail("files", info.files)
        .detail("bytes_fetched", stats.bytes_fetched)
        .detail("range_requests", stats.range_requests)
        .detail("prefetch", mount.reader.prefetch_stats().state)
        .detail("lazy_mount", &mount.lazy.id)
        .detail("lazy_mountpoint", mount.lazy.path.display())
        .detail("shared_by", mount.lazy.users().len())
        .detail("seconds", format!("{seconds:.3}"))
        .detail("unmount_subject", control::unmount_subject(&self.worker_id))
        .detail("stats_subject", control::stats_subject(&self.worker_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(tenant: &str, id: &str, container: &str) -> ContainerRequest {
        ContainerRequest {
            tenant: tenant.into(),
            request_id: id.into(),
            container_id: container.into(),
            ..Default::default()
        }
    }

    #[test]
    fn without_a_container_id_the_mount_id_names_tenant_and_request() {
        assert_eq!(mount_id(&request("a", "x", "ctr-1")).unwrap(), "ctr-1");
        let a = mount_id(&request("a", "x", "")).unwrap();
        let b = mount_id(&request("b", "x", "")).unwrap();
        assert_eq!(a, "a_x");
        assert_ne!(a, b, "the same request id in two tenants is two mounts");
        assert!(mount_id(&request("a", "x", "../etc")).is_err());
    }
}
