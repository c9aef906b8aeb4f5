//! One build's private directory under `builder.storage_dir`.
//!
//! Everything a build writes lives here: the unpacked context, the Dockerfile, the registry auth
//! file, buildah's `--root` and `--runroot` and its `TMPDIR`. Separate storage per build is what
//! isolates concurrent builds from each other, and removing the directory removes all buildah
//! state (the vfs driver keeps no mounts). The directory is removed when the build ends, on every
//! path; a builder that was killed leaves its directories behind, and the next builder start
//! removes those whose owning process is gone.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tempfile::TempDir;

/// Prefix of build directories: `b-<builder pid>-<request id>-<random>`.
const PREFIX: &str = "b-";

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
            .tempdir_in(storage)?;
        for sub in ["context", "root", "runroot", "tmp"] {
            std::fs::create_dir(dir.path().join(sub))?;
        }
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
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

/// Removes build directories left by builder processes that no longer run.
pub fn sweep_stale(storage: &Path) {
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

    #[test]
    fn directories_of_dead_builders_are_swept_and_live_ones_kept() {
        let storage = tempfile::tempdir().unwrap();
        let mine = WorkDir::create(storage.path(), "req-1").unwrap();
        // pid_max is at most 2^22 on Linux, so this pid cannot be running.
        let dead = storage.path().join("b-99999999-req-2-x");
        std::fs::create_dir_all(dead.join("root/deep")).unwrap();
        let unrelated = storage.path().join("notes");
        std::fs::create_dir(&unrelated).unwrap();
        sweep_stale(storage.path());
        assert!(!dead.exists());
        assert!(mine.path().exists() && unrelated.exists());
        let path = mine.path().to_path_buf();
        drop(mine);
        assert!(!path.exists(), "dropping removes the directory");
    }
}
