//! The mounts of this instance: one FUSE session per container under `mount_root`.
//!
//! A mount is kept until it is unmounted (control endpoint) or the service stops; dropping a
//! fuser session unmounts it. A mount point still busy (a process has a file open) is detached
//! lazily so it disappears from the namespace at once and the kernel finishes it when the last
//! file closes. Mounts left behind by a killed instance ("transport endpoint is not connected")
//! are detached when the next instance starts.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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

/// One live mount.
pub struct Mount {
    pub info: MountInfo,
    pub reader: Arc<MountReader>,
    pub refresh: Arc<RefreshCounters>,
    /// Stops the credential refresh task.
    pub stop_refresh: Shutdown,
    session: Mutex<Option<BackgroundSession>>,
}

impl Mount {
    /// Taken over from an earlier process: fuser does not own the kernel mount, so unmounting
    /// is ours to do.
    fn resumed(&self) -> bool {
        self.info.resumed_at.is_some()
    }
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

/// Index memory charged to every slot.
fn index_bytes(slots: &HashMap<String, Slot>) -> u64 {
    slots
        .values()
        .map(|slot| match slot {
            Slot::Mounting { index_bytes, .. } => *index_bytes,
            Slot::Mounted(mount) => mount.info.index_bytes,
        })
        .sum()
}

/// Every mount of this instance, by mount id.
pub struct MountTable {
    root: PathBuf,
    bundle_root: PathBuf,
    fuse: FuseOptions,
    slots: Mutex<HashMap<String, Slot>>,
    /// Holds every live mount's FUSE descriptor for the next process; `None`: mounts end with
    /// this process.
    keeper: Option<KeeperClient>,
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
            keeper,
        })
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
        let held = index_bytes(&slots);
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
        (index_bytes(&slots), self.fuse.index_memory_budget)
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

    /// Mounts `fs` at the reserved id's mount point (blocking: run it off the async threads),
    /// makes the OCI runtime bundle over it for `process` (at `info.bundle`), and hands the
    /// keeper, if any, a duplicate of the FUSE descriptor with `kept`.
    pub fn mount_blocking(
        &self,
        fs: ImageFs,
        info: MountInfo,
        refresh: Arc<RefreshCounters>,
        stop_refresh: Shutdown,
        kept: &KeptMount,
        process: Option<&crate::bundle::Process>,
    ) -> Result<Arc<Mount>, MountError> {
        let reader = fs.reader.clone();
        let mountpoint = info.mountpoint.clone();
        if mounts_under(&self.root).contains(&mountpoint) {
            detach(&mountpoint);
        }
        std::fs::create_dir_all(&mountpoint)?;
        let session = Session::new(fs, &mountpoint, &self.fuse_config())?;
        // For the keeper: a duplicate of the connection's descriptor (the session keeps its own).
        let fuse = session.as_fd().try_clone_to_owned()?;
        // The FUSE session must be served for the overlay to mount over it.
        let session = session.spawn()?;
        if let (Some(bundle), Some(process)) = (&info.bundle, process)
            && let Err(err) = crate::bundle::create(bundle, &mountpoint, process, &info.id)
        {
            end_session(Some(session), &mountpoint, false);
            return Err(MountError::Bundle(err));
        }
        if let Some(keeper) = &self.keeper
            && let Err(err) = keeper.keep(kept, fuse.as_fd())
        {
            // The mount works; it just ends with this process, as without a keeper.
            tracing::warn!(mount_id = %info.id, socket = %keeper.socket().display(), error = %err, "the mount keeper did not take the mount; it will not survive a restart");
        }
        Ok(self.insert(info, reader, refresh, stop_refresh, session))
    }

    /// Serves again a mount an earlier process made: `fuse` is its live FUSE connection, from
    /// the keeper. The kernel then resends what the earlier process took and never answered.
    pub fn resume_blocking(
        &self,
        fs: ImageFs,
        info: MountInfo,
        refresh: Arc<RefreshCounters>,
        stop_refresh: Shutdown,
        fuse: OwnedFd,
    ) -> std::io::Result<Arc<Mount>> {
        let reader = fs.reader.clone();
        let resend = fuse.try_clone()?;
        let session = Session::resume(fs, fuse, self.acl(), self.fuse_config()).spawn()?;
        let mount = self.insert(info, reader, refresh, stop_refresh, session);
        crate::handover::resend_unanswered(&resend, &mount.info.id);
        Ok(mount)
    }

    fn insert(
        &self,
        info: MountInfo,
        reader: Arc<MountReader>,
        refresh: Arc<RefreshCounters>,
        stop_refresh: Shutdown,
        session: BackgroundSession,
    ) -> Arc<Mount> {
        let mount = Arc::new(Mount {
            info,
            reader,
            refresh,
            stop_refresh,
            session: Mutex::new(Some(session)),
        });
        let mut slots = self.slots.lock().expect("mount table lock");
        slots.insert(mount.info.id.clone(), Slot::Mounted(mount.clone()));
        mount
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

    /// Takes `id` out of the table and unmounts it; `None` when there is no such mount.
    pub async fn unmount(&self, id: &str) -> Option<Arc<Mount>> {
        let mount = {
            let mut slots = self.slots.lock().expect("mount table lock");
            match slots.get(id) {
                Some(Slot::Mounted(_)) => match slots.remove(id) {
                    Some(Slot::Mounted(m)) => m,
                    _ => unreachable!("checked above"),
                },
                _ => return None,
            }
        };
        mount.stop_refresh.trigger();
        let session = mount.session.lock().expect("session lock").take();
        let mountpoint = mount.info.mountpoint.clone();
        let resumed = mount.resumed();
        let bundle = mount.info.bundle.clone();
        let keeper = self.keeper.clone();
        let mount_id = id.to_string();
        let done = tokio::task::spawn_blocking(move || {
            // The overlay first: it sits on the lazy mount.
            if let Some(bundle) = bundle {
                crate::bundle::remove(&bundle);
            }
            end_session(session, &mountpoint, resumed);
            if let Some(keeper) = keeper
                && let Err(err) = keeper.drop_mount(&mount_id)
            {
                tracing::warn!(mount_id, error = %err, "the mount keeper did not drop the mount");
            }
        })
        .await;
        if let Err(err) = done {
            tracing::error!(mount_id = id, error = %err, "unmount task failed");
        }
        Some(mount)
    }

    /// Unmounts everything (shutdown).
    pub async fn unmount_all(&self) -> Vec<Arc<Mount>> {
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
fn end_session(session: Option<BackgroundSession>, mountpoint: &Path, resumed: bool) {
    if resumed {
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
