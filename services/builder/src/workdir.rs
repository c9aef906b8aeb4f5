//! One build's private directory under `builder.storage_dir`.
//!
//! Everything a build writes lives here: the unpacked context, the Dockerfile, the registry auth
//! file, buildah's `--root` and `--runroot` and its `TMPDIR`. Separate storage per build is what
//! isolates concurrent builds from each other, and removing the directory removes all buildah
//! state (the vfs driver keeps no mounts). The directory is removed when the build ends, on every
//! path; a builder that was killed leaves its directories behind, and the next builder start
//! removes those whose owning process is gone.
//!
//! Modes: a `RUN` step's root filesystem is prepared by the OCI runtime as the step's mapped,
//! unprivileged root, which must reach `tmp/` (where buildah puts it) by path. So the build
//! directory and `tmp/` are `0711` (searchable, not listable), and everything else is root's
//! alone: `private/` (auth file, configuration, Dockerfile) and the context and storage
//! directories are `0700`, their files `0600`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tempfile::TempDir;

/// Prefix of build directories: `b-<builder pid>-<request id>-<random>`.
const PREFIX: &str = "b-";

/// What a build directory holds, and the modes (see the module documentation).
const SUBDIRS: &[(&str, u32)] = &[
    ("private", 0o700),
    ("context", 0o700),
    ("root", 0o700),
    ("runroot", 0o700),
    ("runtime", 0o700),
    ("tmp", 0o711),
];

/// Creates `storage` when missing and makes it searchable but not listable (`0711`), so `RUN`
/// steps' mapped users can reach their root filesystems and nobody else can find builds.
pub fn prepare_storage(storage: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(storage)?;
    std::fs::set_permissions(storage, std::fs::Permissions::from_mode(0o711))
}

/// A build's directory, removed on drop.
pub struct WorkDir {
    dir: TempDir,
}

impl WorkDir {
    /// Creates a fresh directory for `request_id` under `storage`.
    pub fn create(storage: &Path, request_id: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(storage)?;
        let prefix = format!("{PREFIX}{}-{request_id}-", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .permissions(std::fs::Permissions::from_mode(0o711))
            .tempdir_in(storage)?;
        for (sub, mode) in SUBDIRS {
            let path = dir.path().join(sub);
            std::fs::create_dir(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))?;
        }
        Ok(Self { dir })
    }

    /// The build directory itself.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Root's own files: the registry auth file, buildah's configuration, the Dockerfile, the
    /// context archive, layouts of base images and of the built image.
    pub fn private(&self) -> PathBuf {
        self.path().join("private")
    }

    /// The OCI runtime's state (`runc --root`): the build's containers.
    pub fn runtime_state(&self) -> PathBuf {
        self.path().join("runtime")
    }

    /// Where the build context is unpacked.
    pub fn context(&self) -> PathBuf {
        self.path().join("context")
    }

    /// buildah `--root`: images and layers.
    pub fn root(&self) -> PathBuf {
        self.path().join("root")
    }

    /// buildah `--runroot`: locks and run state.
    pub fn runroot(&self) -> PathBuf {
        self.path().join("runroot")
    }

    /// `TMPDIR` of buildah, so its temporary files go away with the build too.
    pub fn tmp(&self) -> PathBuf {
        self.path().join("tmp")
    }

    /// Removes the directory off the async threads (buildah storage can be large).
    pub async fn remove(self) {
        let path = self.path().to_path_buf();
        let removed = tokio::task::spawn_blocking(move || self.dir.close()).await;
        if !matches!(removed, Ok(Ok(()))) {
            tracing::warn!(dir = %path.display(), "could not remove build directory");
        }
    }
}

/// Removes build directories left by builder processes that no longer run, calling
/// `before_removal` with each one's runtime state first (to remove the containers in it).
pub fn sweep_stale(storage: &Path, before_removal: impl Fn(&Path)) {
    let Ok(entries) = std::fs::read_dir(storage) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = owner_pid(&name.to_string_lossy()) else {
            continue;
        };
        if pid != std::process::id() as i32 && !is_alive(pid) {
            tracing::info!(dir = %entry.path().display(), "removing build directory of a dead builder");
            before_removal(&entry.path().join("runtime"));
            if let Err(err) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(error = %err, "could not remove stale build directory");
            }
        }
    }
}

fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn is_alive(pid: i32) -> bool {
    // Signal 0 checks existence only; EPERM still means the process exists.
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn only_the_way_to_tmp_is_open_to_other_users() {
        let storage = tempfile::tempdir().unwrap();
        let storage = storage.path().join("builds");
        prepare_storage(&storage).unwrap();
        assert_eq!(mode(&storage), 0o711);
        let dir = WorkDir::create(&storage, "req-1").unwrap();
        assert_eq!(mode(dir.path()), 0o711);
        assert_eq!(mode(&dir.tmp()), 0o711);
        for closed in [dir.private(), dir.context(), dir.root(), dir.runroot()] {
            assert_eq!(mode(&closed), 0o700, "{}", closed.display());
        }
        assert_eq!(mode(&dir.runtime_state()), 0o700);
    }

    #[test]
    fn directories_of_dead_builders_are_swept_and_live_ones_kept() {
        let storage = tempfile::tempdir().unwrap();
        let mine = WorkDir::create(storage.path(), "req-1").unwrap();
        // pid_max is at most 2^22 on Linux, so this pid cannot be running.
        let dead = storage.path().join("b-99999999-req-2-x");
        std::fs::create_dir_all(dead.join("root/deep")).unwrap();
        let unrelated = storage.path().join("notes");
        std::fs::create_dir(&unrelated).unwrap();
        let seen = std::sync::Mutex::new(Vec::new());
        sweep_stale(storage.path(), |state| {
            seen.lock().unwrap().push(state.to_owned())
        });
        assert!(!dead.exists());
        assert_eq!(*seen.lock().unwrap(), [dead.join("runtime")]);
        assert!(mine.path().exists() && unrelated.exists());
        let path = mine.path().to_path_buf();
        drop(mine);
        assert!(!path.exists(), "dropping removes the directory");
    }
}
