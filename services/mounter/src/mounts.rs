//! The mounts of this instance. Containers of one image share one lazy FUSE mount (a
//! [`LazyMount`] at `<mount_root>/.images/<lazy id>`, one per tenant, repository, image digest
//! and index digest) with a reference count; each container ([`Mount`]) gets a read-only bind
//! of it at `<mount_root>/<container id>`, which its bundle's overlay sits on.
//!
//! A container's mount is kept until it is unmounted (control endpoint) or the service stops;
//! the lazy mount goes with the last container using it (dropping a fuser session unmounts it). A mount point still busy (a process has a file open) is detached
//! lazily so it disappears from the namespace at once and the kernel finishes it when the last
//! file closes. Mounts left behind by a killed instance ("transport endpoint is not connected")
//! are detached when the next instance starts.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use fuser::{BackgroundSession, MountOption, Session, SessionACL};
use imagemesh_runtime::Shutdown;

use crate::fs::{ImageFs, MountReader};
use crate::keeper::{KeeperClient, KeptMount};
use crate::refresh::RefreshCounters;

/// How sessions are mounted.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    pub threads: usize,
    pub allow_other: bool,
    /// Mounts held at once, live or being prepared.
    pub max_mounts: usize,
    /// Bytes all mounts' loaded indexes and file tables may hold together (`footprint.rs`).
    pub index_memory_budget: u64,
}

/// What a mount is, for status events and the stats endpoint.
pub struct MountInfo {
    pub id: String,
    /// The tenant whose request made the mount: only its requests may find it again.
    pub tenant: String,
    pub request_id: String,
    pub image_ref: String,
    pub image_digest: String,
    pub index_digest: String,
    pub mountpoint: PathBuf,
    /// The OCI runtime bundle over this mount (`bundle.rs`), when one was made.
    pub bundle: Option<PathBuf>,
    pub entries: usize,
    pub files: usize,
    /// What its loaded index and file table hold in memory (estimated, `footprint.rs`).
    pub index_bytes: u64,
    pub mounted_at: SystemTime,
    /// When this process took the mount over from an earlier one (`None`: it made it).
    pub resumed_at: Option<SystemTime>,
}

/// What containers may share one lazy mount by: the tenant (tenants never share a mount: see
/// `docs/mounter.md`), the image's repository, the image manifest and the index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LazyKey {
    pub tenant: String,
    /// `registry/repository` the image was read from.
    pub repository: String,
    pub image_digest: String,
    pub index_digest: String,
}

impl LazyKey {
    /// The key of `tenant`'s mount of `image` (its registry, repository and manifest digest)
    /// through index artifact `index_digest`.
    pub fn of(tenant: &str, image: &imagemesh_registry::ResolvedImage, index_digest: &str) -> Self {
        LazyKey {
            tenant: tenant.to_string(),
            repository: format!(
                "{}/{}",
                image.reference.registry(),
                image.reference.repository()
            ),
            image_digest: image.digest().to_string(),
            index_digest: index_digest.to_string(),
        }
    }

    /// The lazy mount's directory name under `<mount_root>/.images`: the tenant and a hash of
    /// the rest (container ids hold no `.`, so it never names a container's mount point).
    pub fn id(&self) -> String {
        use sha2::{Digest, Sha256};
        let hash = Sha256::digest(
            format!(
                "{}\n{}\n{}",
                self.repository, self.image_digest, self.index_digest
            )
            .as_bytes(),
        );
        let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}.{hex}", self.tenant)
    }
}

/// One lazy read-only FUSE mount of an image, shared by the containers of that image (same
/// [`LazyKey`]): one reader and cache, one credential refresh, one prefetch.
pub struct LazyMount {
    pub id: String,
    pub key: LazyKey,
    /// Where the FUSE session is mounted.
    pub path: PathBuf,
    pub reader: Arc<MountReader>,
    pub refresh: Arc<RefreshCounters>,
    /// Stops the refresh and prefetch tasks (the last container went).
    pub stop: Shutdown,
    pub entries: usize,
    pub files: usize,
    /// What its loaded index and file table hold in memory (estimated, `footprint.rs`).
    pub index_bytes: u64,
    /// When this process took the mount over from an earlier one (`None`: it made it).
    pub resumed_at: Option<SystemTime>,
    session: Mutex<Option<BackgroundSession>>,
    /// A duplicate of the connection's descriptor, for the keeper as containers join.
    fuse: OwnedFd,
    /// The containers using it.
    users: Mutex<BTreeSet<String>>,
    /// A container's bind was still busy when it was unmounted (detached): the FUSE
    /// connection lives until its last file closes, so ending the session must not wait.
    busy: std::sync::atomic::AtomicBool,
}

impl LazyMount {
    /// The containers using it, in id order.
    pub fn users(&self) -> Vec<String> {
        self.users
            .lock()
            .expect("users lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// One container's mount: its bind of the image's lazy mount and its bundle.
pub struct Mount {
    pub info: MountInfo,
    pub lazy: Arc<LazyMount>,
    pub reader: Arc<MountReader>,
    pub refresh: Arc<RefreshCounters>,
}

enum Slot {
    /// A request of `tenant` is mounting `image_ref` right now.
    Mounting {
        tenant: String,
        image_ref: String,
        /// Index memory charged to it once its index is loaded.
        index_bytes: u64,
    },
    Mounted(Arc<Mount>),
}

impl Slot {
    fn tenant(&self) -> &str {
        match self {
            Slot::Mounting { tenant, .. } => tenant,
            Slot::Mounted(mount) => &mount.info.tenant,
        }
    }
}

/// Why [`MountTable::mount_blocking`] failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The FUSE mount itself (a mount point in a bad state, /dev/fuse busy): may clear up.
    #[error("{0}")]
    Fuse(#[from] std::io::Error),
    /// The runtime bundle over it (the overlay, the image's user): the mount is undone.
    #[error("preparing the runtime bundle: {0}")]
    Bundle(String),
}

/// What [`MountTable::reserve`] found.
pub enum Reserved {
    /// The id is ours to mount.
    New,
    /// Already mounted with this image (a redelivery): report it.
    Existing(Arc<Mount>),
    /// Mounted, or being mounted, with another image.
    Conflict(String),
    /// Mounted, or being mounted, for another tenant (whose image is not named).
    OtherTenant,
    /// Being mounted by another delivery right now.
    Busy,
    /// This instance holds `max_mounts` already.
    Full(usize),
}

/// Index memory charged to the slots being mounted and held by the lazy mounts.
fn index_bytes(slots: &HashMap<String, Slot>, lazies: &HashMap<LazyKey, Arc<LazyMount>>) -> u64 {
    let mounting: u64 = slots
        .values()
        .map(|slot| match slot {
            Slot::Mounting { index_bytes, .. } => *index_bytes,
            Slot::Mounted(_) => 0,
        })
        .sum();
    mounting + lazies.values().map(|l| l.index_bytes).sum::<u64>()
}

/// How much blocking mount work runs at once. Two: mounting and unmounting wait mostly on
/// the kernel, which serializes mount-table changes, so more would only hold more threads.
pub const MOUNT_WORK_SLOTS: usize = 2;

/// Every mount of this instance, by mount id.
pub struct MountTable {
    root: PathBuf,
    bundle_root: PathBuf,
    fuse: FuseOptions,
    slots: Mutex<HashMap<String, Slot>>,
    /// The lazy mounts containers share. Lock order: `slots`, then `lazies`.
    lazies: Mutex<HashMap<LazyKey, Arc<LazyMount>>>,
    /// One lock per key: finding or making a lazy mount, and letting its last container go,
    /// happen one at a time.
    lazy_locks: Mutex<HashMap<LazyKey, Weak<tokio::sync::Mutex<()>>>>,
    /// Holds every live mount's FUSE descriptor for the next process; `None`: mounts end with
    /// this process.
    keeper: Option<KeeperClient>,
    /// Mount work that blocks (mounting, binding, bundles, building file tables, unmounting)
    /// runs at most [`MOUNT_WORK_SLOTS`] at a time: tokio's blocking pool starts a thread for
    /// every task that finds none idle, so eight containers arriving together held eight.
    work_slots: tokio::sync::Semaphore,
}

impl MountTable {
    /// Creates `root` (an empty table: [`MountTable::detach_stale`] clears what an earlier
    /// instance left).
    pub fn open(
        root: &Path,
        bundle_root: &Path,
        fuse: FuseOptions,
        keeper: Option<KeeperClient>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(bundle_root)?;
        let bundle_root = bundle_root.canonicalize()?;
        Ok(Self {
            root,
            bundle_root,
            fuse,
            slots: Mutex::new(HashMap::new()),
            lazies: Mutex::new(HashMap::new()),
            lazy_locks: Mutex::new(HashMap::new()),
            keeper,
            work_slots: tokio::sync::Semaphore::new(MOUNT_WORK_SLOTS),
        })
    }

    /// Runs blocking mount work on tokio's blocking pool once one of the work slots is free.
    /// The work must not wait for other mount work. It may wait for FUSE requests (the session
    /// threads answer lookups; reads take read slots, never these; `crate::runtime`).
    pub async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let _slot = self.work_slots.acquire().await.expect("never closed");
        tokio::task::spawn_blocking(work).await
    }

    /// Detaches every mount under the root an earlier instance left, except those in `keep`
    /// (handed over through the keeper, being resumed).
    pub fn detach_stale(&self, keep: &HashSet<PathBuf>) {
        // Bundles first: their overlays sit on the lazy mounts.
        let bundles = std::fs::read_dir(&self.bundle_root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path());
        for bundle in bundles {
            if !keep.contains(&bundle.join("rootfs")) {
                tracing::warn!(bundle = %bundle.display(), "removing a bundle left by an earlier instance");
                crate::bundle::remove(&bundle);
            }
        }
        for stale in mounts_under(&self.root) {
            if keep.contains(&stale) {
                continue;
            }
            tracing::warn!(mountpoint = %stale.display(), "detaching a mount left by an earlier instance");
            detach(&stale);
            let _ = std::fs::remove_dir(&stale);
        }
    }

    /// Where the OCI runtime bundle of mount `id` goes.
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.bundle_root.join(id)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn mountpoint(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Where the lazy mount of `key` goes.
    pub fn lazy_path(&self, key: &LazyKey) -> PathBuf {
        self.root.join(".images").join(key.id())
    }

    /// Held while finding or making the lazy mount of `key`, or letting its last user go.
    pub async fn lazy_lock(&self, key: &LazyKey) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.lazy_locks.lock().expect("lazy locks lock");
            locks.retain(|_, lock| lock.strong_count() > 0);
            match locks.get(key).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(key.clone(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }

    /// The live lazy mount of `key`, if any (hold [`Self::lazy_lock`]).
    pub fn find_lazy(&self, key: &LazyKey) -> Option<Arc<LazyMount>> {
        self.lazies.lock().expect("lazies lock").get(key).cloned()
    }

    /// Every lazy mount, in id order.
    pub fn lazies(&self) -> Vec<Arc<LazyMount>> {
        let mut all: Vec<_> = self
            .lazies
            .lock()
            .expect("lazies lock")
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Claims `id` for `tenant` to mount `image_ref`, unless it is mounted or being mounted.
    /// A mount is found again (a redelivery) only by its own tenant.
    pub fn reserve(&self, id: &str, tenant: &str, image_ref: &str) -> Reserved {
        let mut slots = self.slots.lock().expect("mount table lock");
        match slots.get(id) {
            None if slots.len() >= self.fuse.max_mounts => Reserved::Full(self.fuse.max_mounts),
            None => {
                let slot = Slot::Mounting {
                    tenant: tenant.to_string(),
                    image_ref: image_ref.to_string(),
                    index_bytes: 0,
                };
                slots.insert(id.to_string(), slot);
                Reserved::New
            }
            Some(slot) if slot.tenant() != tenant => Reserved::OtherTenant,
            Some(Slot::Mounted(m)) if m.info.image_ref == image_ref => {
                Reserved::Existing(m.clone())
            }
            Some(Slot::Mounted(m)) => Reserved::Conflict(m.info.image_ref.clone()),
            Some(Slot::Mounting {
                image_ref: other, ..
            }) if other != image_ref => Reserved::Conflict(other.clone()),
            Some(Slot::Mounting { .. }) => Reserved::Busy,
        }
    }

    /// Charges `bytes` of index memory to the reserved mount `id`, unless every mount's
    /// together would then exceed the budget: `Err((held, budget))`.
    pub fn charge(&self, id: &str, bytes: u64) -> Result<(), (u64, u64)> {
        let mut slots = self.slots.lock().expect("mount table lock");
        let held = index_bytes(&slots, &self.lazies.lock().expect("lazies lock"));
        let budget = self.fuse.index_memory_budget;
        if held.saturating_add(bytes) > budget {
            return Err((held, budget));
        }
        if let Some(Slot::Mounting { index_bytes, .. }) = slots.get_mut(id) {
            *index_bytes = bytes;
        }
        Ok(())
    }

    /// Index memory held by every mount, live or being prepared, and the budget.
    pub fn index_memory(&self) -> (u64, u64) {
        let slots = self.slots.lock().expect("mount table lock");
        let held = index_bytes(&slots, &self.lazies.lock().expect("lazies lock"));
        (held, self.fuse.index_memory_budget)
    }

    /// Mounts held, live or being prepared (what placement counts against `max_mounts`).
    pub fn held(&self) -> usize {
        self.slots.lock().expect("mount table lock").len()
    }

    /// Gives up a reservation that did not end in a mount.
    pub fn release(&self, id: &str) {
        let mut slots = self.slots.lock().expect("mount table lock");
        if matches!(slots.get(id), Some(Slot::Mounting { .. })) {
            slots.remove(id);
        }
    }

    /// Mounts `fs` as the lazy mount of `key` (blocking: run it off the async threads) and
    /// lists it for containers of the image to share. Hold [`Self::lazy_lock`].
    pub fn mount_lazy_blocking(
        &self,
        fs: ImageFs,
        key: LazyKey,
        refresh: Arc<RefreshCounters>,
        stop: Shutdown,
        index_bytes: u64,
    ) -> std::io::Result<Arc<LazyMount>> {
        let reader = fs.reader.clone();
        let (entries, files) = (fs.inodes.len(), fs.inodes.files());
        let path = self.lazy_path(&key);
        if mounts_under(&self.root).contains(&path) {
            detach(&path);
        }
        std::fs::create_dir_all(&path)?;
        let session = Session::new(fs, &path, &self.fuse_config())?;
        // For the keeper: a duplicate of the connection's descriptor (the session keeps its own).
        let fuse = session.as_fd().try_clone_to_owned()?;
        let session = session.spawn()?;
        let lazy = Arc::new(LazyMount {
            id: key.id(),
            key: key.clone(),
            path,
            reader,
            refresh,
            stop,
            entries,
            files,
            index_bytes,
            resumed_at: None,
            session: Mutex::new(Some(session)),
            fuse,
            users: Mutex::new(BTreeSet::new()),
            busy: Default::default(),
        });
        self.lazies
            .lock()
            .expect("lazies lock")
            .insert(key, lazy.clone());
        Ok(lazy)
    }

    /// Serves again a lazy mount an earlier process made: `fuse` is its live FUSE connection,
    /// from the keeper, mounted at `path`. The kernel then resends what the earlier process
    /// took and never answered.
    #[allow(clippy::too_many_arguments)]
    pub fn resume_lazy_blocking(
        &self,
        fs: ImageFs,
        key: LazyKey,
        path: PathBuf,
        refresh: Arc<RefreshCounters>,
        stop: Shutdown,
        index_bytes: u64,
        fuse: OwnedFd,
    ) -> std::io::Result<Arc<LazyMount>> {
        let reader = fs.reader.clone();
        let (entries, files) = (fs.inodes.len(), fs.inodes.files());
        let resend = fuse.try_clone()?;
        let kept = fuse.try_clone()?;
        let session = Session::resume(fs, fuse, self.acl(), self.fuse_config()).spawn()?;
        // A single mount of an earlier version (no sharing) is mounted at its container's
        // mount point, and named after it.
        let lazy = Arc::new(LazyMount {
            id: path
                .file_name()
                .map_or_else(|| key.id(), |n| n.to_string_lossy().into_owned()),
            key: key.clone(),
            path,
            reader,
            refresh,
            stop,
            entries,
            files,
            index_bytes,
            resumed_at: Some(SystemTime::now()),
            session: Mutex::new(Some(session)),
            fuse: kept,
            users: Mutex::new(BTreeSet::new()),
            busy: Default::default(),
        });
        crate::handover::resend_unanswered(&resend, &lazy.id);
        // A second single mount of one image from an earlier version stays out of the list:
        // it serves its own container only.
        self.lazies
            .lock()
            .expect("lazies lock")
            .entry(key)
            .or_insert_with(|| lazy.clone());
        Ok(lazy)
    }

    /// Gives the reserved container `info.id` its read-only bind of `lazy` at
    /// `info.mountpoint`, makes the OCI runtime bundle over it for `process` (at `info.bundle`),
    /// and hands the keeper, if any, a duplicate of the FUSE descriptor with `kept` (blocking).
    /// `resumed`: taken over, its bind and bundle are in place already.
    pub fn attach_blocking(
        &self,
        lazy: &Arc<LazyMount>,
        info: MountInfo,
        kept: Option<&KeptMount>,
        process: Option<&crate::bundle::Process>,
    ) -> Result<Arc<Mount>, MountError> {
        let mountpoint = info.mountpoint.clone();
        let own_path = mountpoint != lazy.path;
        if kept.is_some() && own_path {
            if mounts_under(&self.root).contains(&mountpoint) {
                detach(&mountpoint);
            }
            std::fs::create_dir_all(&mountpoint)?;
            if let Err(err) = bind_read_only(&lazy.path, &mountpoint) {
                let _ = std::fs::remove_dir(&mountpoint);
                return Err(err.into());
            }
        }
        if kept.is_some()
            && let (Some(bundle), Some(process)) = (&info.bundle, process)
            && let Err(err) = crate::bundle::create(bundle, &mountpoint, process, &info.id)
        {
            if own_path {
                unbind(&mountpoint);
            }
            return Err(MountError::Bundle(err));
        }
        if let (Some(keeper), Some(kept)) = (&self.keeper, kept)
            && let Err(err) = keeper.keep(kept, lazy.fuse.as_fd())
        {
            // The mount works; it just ends with this process, as without a keeper.
            tracing::warn!(mount_id = %info.id, socket = %keeper.socket().display(), error = %err, "the mount keeper did not take the mount; it will not survive a restart");
        }
        lazy.users
            .lock()
            .expect("users lock")
            .insert(info.id.clone());
        let mount = Arc::new(Mount {
            info,
            lazy: lazy.clone(),
            reader: lazy.reader.clone(),
            refresh: lazy.refresh.clone(),
        });
        let mut slots = self.slots.lock().expect("mount table lock");
        slots.insert(mount.info.id.clone(), Slot::Mounted(mount.clone()));
        Ok(mount)
    }

    /// Ends `lazy` if no container uses it (a mount whose first container failed). Hold
    /// [`Self::lazy_lock`].
    pub fn end_lazy_if_unused_blocking(&self, lazy: &Arc<LazyMount>) {
        if !lazy.users.lock().expect("users lock").is_empty() {
            return;
        }
        {
            let mut lazies = self.lazies.lock().expect("lazies lock");
            if lazies.get(&lazy.key).is_some_and(|l| Arc::ptr_eq(l, lazy)) {
                lazies.remove(&lazy.key);
            }
        }
        lazy.stop.trigger();
        let session = lazy.session.lock().expect("session lock").take();
        let busy = lazy.busy.load(std::sync::atomic::Ordering::Relaxed);
        end_session(session, &lazy.path, lazy.resumed_at.is_some() || busy);
        // `.images` goes with its last mount (a later one makes it again).
        if let Some(images) = lazy.path.parent().filter(|p| p.ends_with(".images")) {
            let _ = std::fs::remove_dir(images);
        }
    }

    fn acl(&self) -> SessionACL {
        if self.fuse.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        }
    }

    fn fuse_config(&self) -> fuser::Config {
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::FSName("imagemesh".into()),
            MountOption::Subtype("imagemesh".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoAtime,
            // With allow_other, the kernel checks modes and owners as for any file system.
            MountOption::DefaultPermissions,
        ];
        config.acl = self.acl();
        config.n_threads = Some(self.fuse.threads.max(1));
        config
    }

    /// Every live mount, in id order.
    pub fn all(&self) -> Vec<Arc<Mount>> {
        let slots = self.slots.lock().expect("mount table lock");
        let mut all: Vec<Arc<Mount>> = slots
            .values()
            .filter_map(|s| match s {
                Slot::Mounted(m) => Some(m.clone()),
                Slot::Mounting { .. } => None,
            })
            .collect();
        all.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        all
    }

    /// Takes `id` out of the table and unmounts it: its bundle (overlay and upper), its bind,
    /// and the image's lazy mount when no other container uses it; `None` when there is no
    /// such mount.
    pub async fn unmount(self: &Arc<Self>, id: &str) -> Option<Arc<Mount>> {
        let key = {
            let slots = self.slots.lock().expect("mount table lock");
            match slots.get(id) {
                Some(Slot::Mounted(mount)) => mount.lazy.key.clone(),
                _ => return None,
            }
        };
        let _lazy = self.lazy_lock(&key).await;
        let mount = {
            let mut slots = self.slots.lock().expect("mount table lock");
            match slots.get(id) {
                Some(Slot::Mounted(_)) => match slots.remove(id) {
                    Some(Slot::Mounted(m)) => m,
                    _ => unreachable!("checked above"),
                },
                // Unmounted meanwhile by another request.
                _ => return None,
            }
        };
        let table = self.clone();
        let gone = mount.clone();
        let done = self.blocking(move || table.unmount_blocking(&gone)).await;
        if let Err(err) = done {
            tracing::error!(mount_id = id, error = %err, "unmount task failed");
        }
        Some(mount)
    }

    fn unmount_blocking(&self, mount: &Mount) {
        let lazy = &mount.lazy;
        let mount_id = &mount.info.id;
        // The overlay first: it sits on the container's bind of the lazy mount.
        if let Some(bundle) = &mount.info.bundle {
            crate::bundle::remove(bundle);
        }
        if mount.info.mountpoint != lazy.path && !unbind(&mount.info.mountpoint) {
            lazy.busy.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(keeper) = &self.keeper
            && let Err(err) = keeper.drop_mount(mount_id)
        {
            tracing::warn!(mount_id, error = %err, "the mount keeper did not drop the mount");
        }
        lazy.users.lock().expect("users lock").remove(mount_id);
        self.end_lazy_if_unused_blocking(lazy);
    }

    /// Unmounts everything (shutdown).
    pub async fn unmount_all(self: &Arc<Self>) -> Vec<Arc<Mount>> {
        let ids: Vec<String> = self.all().iter().map(|m| m.info.id.clone()).collect();
        let mut done = Vec::new();
        for id in ids {
            done.extend(self.unmount(&id).await);
        }
        done
    }
}

/// Unmounts and waits for the session's threads; detaches instead when the mount is busy.
/// A resumed session does not own its kernel mount: it is unmounted here, and its threads end
/// on their own once the kernel ends the connection (at once, or when a busy mount is let go).
/// So does a session with a busy container bind detached (`no_wait`).
fn end_session(session: Option<BackgroundSession>, mountpoint: &Path, no_wait: bool) {
    if no_wait {
        if let Err(err) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %err, "unmount failed; detaching");
            detach(mountpoint);
        }
        drop(session);
    } else if let Some(session) = session
        && let Err(err) = session.umount_and_join()
    {
        tracing::warn!(mountpoint = %mountpoint.display(), error = %err, "unmount failed; detaching");
        detach(mountpoint);
    }
    if let Err(err) = std::fs::remove_dir(mountpoint) {
        tracing::debug!(mountpoint = %mountpoint.display(), error = %err, "mount point not removed");
    }
}

/// A read-only, nosuid, nodev bind of `from` at `to`.
fn bind_read_only(from: &Path, to: &Path) -> std::io::Result<()> {
    use nix::mount::{MsFlags, mount};
    mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
    let flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOATIME;
    if let Err(err) = mount(None::<&str>, to, None::<&str>, flags, None::<&str>) {
        detach(to);
        return Err(err.into());
    }
    Ok(())
}

/// Unmounts a container's bind (detached when busy) and removes its mount point; false when
/// it was busy.
fn unbind(mountpoint: &Path) -> bool {
    let unmounted = match nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %err, "unmount failed; detaching");
            detach(mountpoint);
            false
        }
    };
    if let Err(err) = std::fs::remove_dir(mountpoint) {
        tracing::debug!(mountpoint = %mountpoint.display(), error = %err, "mount point not removed");
    }
    unmounted
}

/// Lazy unmount: gone from the namespace now, finished by the kernel when no longer busy.
fn detach(mountpoint: &Path) {
    if let Err(err) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH) {
        tracing::warn!(mountpoint = %mountpoint.display(), error = %err, "detach failed");
    }
}

/// Mount points at or below `root`, from `/proc/self/mountinfo` (octal escapes decoded).
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape(field)))
        .filter(|path| path.starts_with(root) && path != root)
        .collect();
    // Deepest first, so nested mounts are detached before their parents.
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// `\040` and friends, as the kernel escapes spaces, tabs, newlines and backslashes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> (tempfile::TempDir, MountTable) {
        let root = tempfile::tempdir().unwrap();
        let fuse = FuseOptions {
            threads: 1,
            allow_other: false,
            max_mounts: 4,
            index_memory_budget: 100,
        };
        let bundles = root.path().join("bundles");
        let table = MountTable::open(&root.path().join("mounts"), &bundles, fuse, None).unwrap();
        (root, table)
    }

    #[test]
    fn index_memory_is_charged_within_the_budget_and_given_back_with_the_reservation() {
        let (_root, table) = table();
        assert!(matches!(table.reserve("a", "t", "r/x:1"), Reserved::New));
        assert!(matches!(table.reserve("b", "t", "r/x:1"), Reserved::New));
        assert_eq!(table.charge("a", 60), Ok(()));
        assert_eq!(table.charge("b", 60), Err((60, 100)), "160 would pass 100");
        assert_eq!(table.charge("b", 40), Ok(()));
        assert_eq!(table.index_memory(), (100, 100));
        table.release("a");
        assert_eq!(table.index_memory(), (40, 100));
    }

    #[test]
    fn a_mount_id_in_use_is_never_handed_to_another_tenant() {
        let (_root, table) = table();
        assert!(matches!(table.reserve("ctr", "a", "r/x:1"), Reserved::New));
        assert!(matches!(table.reserve("ctr", "a", "r/x:1"), Reserved::Busy));
        assert!(matches!(
            table.reserve("ctr", "a", "r/y:1"),
            Reserved::Conflict(other) if other == "r/x:1"
        ));
        // Another tenant learns neither the image nor that a delivery is in progress.
        for image in ["r/x:1", "r/y:1"] {
            assert!(matches!(
                table.reserve("ctr", "b", image),
                Reserved::OtherTenant
            ));
        }
        table.release("ctr");
        assert!(matches!(table.reserve("ctr", "b", "r/x:1"), Reserved::New));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
