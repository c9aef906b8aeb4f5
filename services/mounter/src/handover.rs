//! Taking over the mounts an earlier mounter process left with the keeper (`keeper.rs`).
//!
//! At start, before it takes any work, the mounter asks the keeper for every mount it holds.
//! A mount whose mount point is gone (unmounted while no mounter ran) is dropped. Every other
//! one is reserved in the mount table at once (no request can take its id) and resumed in the
//! background: its image is resolved again by digest with the kept credential, the index
//! loaded and checked against the kept digest, the same file table built (inode numbers follow
//! from the index alone, so the kernel's cached inodes stay right), and a fuser session
//! resumed on the kept descriptor. Then the kernel is told to resend the requests the earlier
//! process had read and not answered (`FUSE_NOTIFY_RESEND`, Linux 6.9), so a read in flight
//! during the switch blocks and then completes. Until a mount is resumed its reads wait in the
//! kernel's queue; resuming is retried until it succeeds or the mounter stops.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The sharing key of a kept container's mount.
fn key_of(kept: &KeptMount) -> Result<LazyKey, String> {
    let pinned = imagemesh_registry::parse_reference(&kept.pinned_ref)
        .map_err(|e| format!("kept reference {}: {e}", kept.pinned_ref))?;
    Ok(LazyKey {
        tenant: kept.tenant.clone(),
        repository: format!("{}/{}", pinned.registry(), pinned.repository()),
        image_digest: kept.image_digest.clone(),
        index_digest: kept.index_digest.clone(),
    })
}

use imagemesh_proto::v1::RegistryCredential;
use imagemesh_registry::{Reference, RegistryClient};
use imagemesh_runtime::{Rejection, Shutdown};

use crate::handler::{Mounter, Prepared};
use crate::keeper::{KeeperClient, KeptMount};
use crate::mounts::{LazyKey, MountInfo, Reserved, mounts_under};
use crate::open::{load_index, resolve};
use crate::refresh::{RefreshCounters, expiry, refresh_request};

/// `FUSE_NOTIFY_RESEND` (protocol 7.40): requeue every request sent to a server and not yet
/// answered.
const FUSE_NOTIFY_RESEND: i32 = 7;
/// Waits between attempts to resume a mount (its registry or credential service may be away).
const RETRY: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(15);

/// Asks the kernel to resend what the earlier server took and never answered. Kernels before
/// 6.9 refuse it: those requests then stay unanswered (logged).
pub fn resend_unanswered(fuse: &OwnedFd, mount_id: &str) {
    // A notification is a bare `fuse_out_header`: len, error = the notification code, unique 0.
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    match rustix::io::write(fuse.as_fd(), &header) {
        Ok(_) => tracing::debug!(mount_id, "asked the kernel to resend unanswered requests"),
        Err(err) => {
            tracing::warn!(mount_id, error = %err, "the kernel cannot resend requests an earlier process left unanswered (Linux 6.9 or later can)")
        }
    }
}

impl Mounter {
    /// Takes every mount the keeper holds: reserves them now, resumes them in the background.
    /// Returns the mount points being resumed (not stale: the caller leaves them mounted).
    pub async fn take_over(
        self: &Arc<Self>,
        keeper: &KeeperClient,
        stop: &Shutdown,
    ) -> HashSet<PathBuf> {
        let listing = {
            let keeper = keeper.clone();
            tokio::task::spawn_blocking(move || keeper.list()).await
        };
        let kept = match listing {
            Ok(Ok(kept)) => kept,
            Ok(Err(err)) => {
                tracing::warn!(socket = %keeper.socket().display(), error = %err, "no mounts to take over from the mount keeper");
                return HashSet::new();
            }
            Err(err) => {
                tracing::error!(error = %err, "asking the mount keeper failed");
                return HashSet::new();
            }
        };
        let live: HashSet<PathBuf> = mounts_under(self.mounts.root()).into_iter().collect();
        // The keeper holds one entry per container; containers of one image share its lazy
        // mount, which is resumed once. An entry whose image's shared mount is not mounted is
        // a single mount of an earlier version (its mount point is the FUSE mount itself).
        let mut groups: BTreeMap<PathBuf, Vec<(KeptMount, OwnedFd)>> = BTreeMap::new();
        for (mount, fuse) in kept {
            if !live.contains(&mount.mountpoint) {
                tracing::info!(mount_id = %mount.id, "a kept mount is no longer mounted; dropping it");
                let _ = keeper.drop_mount(&mount.id);
                continue;
            }
            let shared = match key_of(&mount) {
                Ok(key) => self.mounts.lazy_path(&key),
                Err(err) => {
                    tracing::warn!(mount_id = %mount.id, error = %err, "a kept mount cannot be resumed; leaving it");
                    continue;
                }
            };
            let path = if live.contains(&shared) {
                shared
            } else {
                mount.mountpoint.clone()
            };
            groups.entry(path).or_default().push((mount, fuse));
        }
        let mut resuming = HashSet::new();
        for (path, members) in groups {
            let members: Vec<(KeptMount, OwnedFd)> = members
                .into_iter()
                .filter(|(mount, _)| {
                    matches!(
                        self.mounts
                            .reserve(&mount.id, &mount.tenant, &mount.image_ref),
                        Reserved::New
                    )
                })
                .collect();
            if members.is_empty() {
                continue;
            }
            resuming.insert(path.clone());
            for (mount, _) in &members {
                resuming.insert(mount.mountpoint.clone());
                if let Some(bundle) = &mount.bundle {
                    resuming.insert(bundle.join("rootfs"));
                }
            }
            let (mounter, stop) = (self.clone(), stop.clone());
            tokio::spawn(async move { mounter.resume_until_done(path, members, stop).await });
        }
        resuming
    }

    /// Resumes the lazy mount at `path` once, for every container of `members` (their
    /// descriptors are duplicates of one connection).
    async fn resume_until_done(
        &self,
        path: PathBuf,
        members: Vec<(KeptMount, OwnedFd)>,
        stop: Shutdown,
    ) {
        let started = std::time::Instant::now();
        let (kept, fds): (Vec<KeptMount>, Vec<OwnedFd>) = members.into_iter().unzip();
        let mut wait = RETRY;
        loop {
            let attempt = match fds[0].try_clone() {
                Ok(fd) => self.resume(&path, &kept, fd).await,
                Err(err) => Err(err.to_string()),
            };
            match attempt {
                Ok(()) => {
                    let seconds = started.elapsed().as_secs_f64();
                    tracing::info!(lazy_mount = %path.display(), containers = kept.len(), seconds, "lazy mount resumed for its containers");
                    for mount in &kept {
                        tracing::info!(mount_id = %mount.id, mountpoint = %mount.mountpoint.display(), lazy_mount = %path.display(), seconds, "mount taken over from the earlier process");
                    }
                    return;
                }
                Err(err) => {
                    tracing::warn!(lazy_mount = %path.display(), error = %err, "resuming a kept mount failed; its reads wait until it succeeds")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {
                    for mount in &kept {
                        self.mounts.release(&mount.id);
                    }
                    return;
                }
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    /// One attempt; errors are messages without secrets (registry errors name no credential).
    async fn resume(&self, path: &Path, kept: &[KeptMount], fuse: OwnedFd) -> Result<(), String> {
        let first = &kept[0];
        let pinned = imagemesh_registry::parse_reference(&first.pinned_ref)
            .map_err(|e| format!("kept reference {}: {e}", first.pinned_ref))?;
        let credential = self.fresh_credential(first, &pinned).await?;
        let registry = pinned.registry().to_string();
        let client = Arc::new(RegistryClient::new(
            &registry,
            credential.as_ref(),
            &self.registry,
        ));
        let resolved = resolve(&client, &pinned, &self.platform)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let opened = load_index(&client, resolved, |_| None)
            .await
            .map_err(|e| format!("{e:?}"))?;
        if opened.index_digest != first.index_digest {
            // Another index could number the inodes differently from what the kernel holds.
            return Err(format!(
                "the image's index is now {}, the mount was made from {}",
                opened.index_digest, first.index_digest
            ));
        }
        let key = key_of(first)?;
        let _lazy = self.mounts.lazy_lock(&key).await;
        let lazy_id = match path.file_name() {
            Some(name) => name.to_string_lossy().into_owned(),
            None => key.id(),
        };
        let Prepared {
            fs,
            source,
            index_bytes,
        } = self
            .prepare(&lazy_id, &first.id, client, &opened)
            .await
            .map_err(|o| format!("{o:?}"))?;
        let counters = Arc::new(RefreshCounters::new(credential.as_ref()));
        let mounts = self.mounts.clone();
        let (c, p) = (counters, path.to_path_buf());
        let lazy = self
            .mounts
            .blocking(move || {
                mounts.resume_lazy_blocking(fs, key, p, c, Shutdown::new(), index_bytes, fuse)
            })
            .await
            .map_err(|e| format!("resume task failed: {e}"))?
            .map_err(|e| format!("resuming the FUSE session: {e}"))?;
        for mount in kept {
            let info = MountInfo {
                id: mount.id.clone(),
                tenant: mount.tenant.clone(),
                request_id: mount.request_id.clone(),
                image_ref: mount.image_ref.clone(),
                image_digest: mount.image_digest.clone(),
                index_digest: mount.index_digest.clone(),
                mountpoint: mount.mountpoint.clone(),
                bundle: mount.bundle.clone(),
                entries: lazy.entries,
                files: lazy.files,
                index_bytes: lazy.index_bytes,
                mounted_at: mount.mounted_at(),
                resumed_at: lazy.resumed_at,
            };
            // Its bind, bundle and keeper entry are in place: only the table learns of it.
            if let Err(err) = self.mounts.attach_blocking(&lazy, info, None, None) {
                tracing::warn!(mount_id = %mount.id, error = %err, "a taken-over container could not be listed");
            }
        }
        self.start_refresh(&lazy, source, credential, &first.request_id);
        Ok(())
    }

    /// The kept credential, or a new one when it has expired or is about to (the keeper keeps
    /// what the mount was made with; the earlier process may have refreshed it since).
    async fn fresh_credential(
        &self,
        kept: &KeptMount,
        pinned: &Reference,
    ) -> Result<Option<RegistryCredential>, String> {
        let Some(credential) = kept.credential().map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let soon = SystemTime::now() + self.refresh.margin.min(Duration::from_secs(30));
        if expiry(&credential).is_none_or(|at| at > soon) {
            return Ok(Some(credential));
        }
        let request = refresh_request(
            &credential,
            pinned.repository(),
            &kept.request_id,
            &kept.tenant,
        );
        let response = self
            .credentials
            .refresh(&request)
            .await
            .map_err(|e| Rejection::to_string(&e.to_rejection()))?;
        response
            .credential
            .map(Some)
            .ok_or_else(|| "the credential service returned no credential".to_string())
    }
}
