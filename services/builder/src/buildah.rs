//! Running buildah: one build's commands, their output streamed line by line to the build log,
//! a deadline that kills the whole process group, and storage confined to the build directory.
//!
//! Every command runs with `--root`/`--runroot` in the build's [`WorkDir`] and the vfs storage
//! driver (plain directories, no mounts left behind by a killed build), `TMPDIR` in the build
//! directory, registry auth from an `--authfile` and insecure registries from a private
//! registries.conf (`CONTAINERS_REGISTRIES_CONF`). No secret is ever an argument.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::config::BuilderConfig;
use crate::log::BuildLog;
use crate::workdir::WorkDir;

/// Why a buildah command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum BuildahError {
    #[error("cannot run buildah: {0}")]
    Spawn(std::io::Error),
    #[error("did not finish before its deadline")]
    TimedOut,
    #[error("{error_line}")]
    Failed {
        status: ExitStatus,
        error_line: String,
    },
}

/// How often `bud` runs when its sandbox fails to start.
const BUD_ATTEMPTS: usize = 3;

/// Failures of buildah's chroot sandbox that say nothing about the Dockerfile: sealing the
/// in-memory copy of the binary it re-executes for a `RUN` step fails now and then with EBUSY.
const SANDBOX_ERRORS: &[&str] = &["sealing memfd copy"];

/// Whether the last lines of a failed build show a sandbox failure rather than a build error.
fn sandbox_failed(tail: &[String]) -> bool {
    tail.iter()
        .rev()
        .take(3)
        .any(|line| SANDBOX_ERRORS.iter().any(|e| line.contains(e)))
}

/// What a Dockerfile build needs besides the build directory.
pub struct BudSpec<'a> {
    pub dockerfile: &'a Path,
    pub context: &'a Path,
    /// Local name of the result, e.g. `localhost/imagemesh-build:<image id>`.
    pub tag: &'a str,
    pub build_args: Vec<(String, String)>,
}

/// buildah bound to one build directory.
pub struct Buildah<'a> {
    program: &'a Path,
    skopeo: &'a Path,
    dir: &'a WorkDir,
    auth_file: PathBuf,
    registries_conf: PathBuf,
}

impl<'a> Buildah<'a> {
    /// The programs come from `settings` (`buildah`, `skopeo`).
    pub fn new(
        settings: &'a BuilderConfig,
        dir: &'a WorkDir,
        auth_file: PathBuf,
        conf: PathBuf,
    ) -> Self {
        Self {
            program: &settings.buildah,
            skopeo: &settings.skopeo,
            dir,
            auth_file,
            registries_conf: conf,
        }
    }

    /// `buildah bud --layers --isolation chroot`: chroot isolation is what lets `RUN` work
    /// without a container runtime or user namespaces.
    #[tracing::instrument(name = "buildah bud", skip_all, fields(tag = spec.tag))]
    pub async fn bud(
        &self,
        spec: &BudSpec<'_>,
        log: &BuildLog,
        deadline: Instant,
    ) -> Result<(), BuildahError> {
        let mut attempt = 1;
        loop {
            match run(self.bud_command(spec), log, deadline).await {
                Err(BuildahError::Failed { .. })
                    if attempt < BUD_ATTEMPTS && sandbox_failed(&log.tail()) =>
                {
                    attempt += 1;
                    tracing::warn!(attempt, "build sandbox failed to start; building again");
                    log.line("the build sandbox failed to start (a transient buildah error); building again, finished steps are cached")
                        .await;
                }
                result => return result,
            }
        }
    }

    fn bud_command(&self, spec: &BudSpec<'_>) -> Command {
        let mut command = self.command();
        command
            .args(["bud", "--layers", "--isolation", "chroot", "--pull=missing"])
            .arg("--authfile")
            .arg(&self.auth_file)
            .arg("-f")
            .arg(spec.dockerfile)
            .arg("-t")
            .arg(spec.tag);
        for (key, value) in &spec.build_args {
            command.arg("--build-arg").arg(format!("{key}={value}"));
        }
        command.arg(spec.context);
        command
    }

    /// `buildah push` to `destination` (a containers-transport name such as
    /// `docker://host/repo:tag` or `oci:/dir:tag`); returns the pushed manifest digest.
    #[tracing::instrument(name = "buildah push", skip_all, fields(destination))]
    pub async fn push(
        &self,
        image: &str,
        destination: &str,
        log: &BuildLog,
        deadline: Instant,
    ) -> Result<String, BuildahError> {
        tracing::Span::current().record("destination", destination);
        let digest_file = self.dir.path().join("digest");
        let mut command = self.command();
        command
            .args(["push", "--retry", "0", "--authfile"])
            .arg(&self.auth_file)
            .arg("--digestfile")
            .arg(&digest_file)
            .arg(image)
            .arg(destination);
        run(command, log, deadline).await?;
        let digest = std::fs::read_to_string(&digest_file).map_err(BuildahError::Spawn)?;
        Ok(digest.trim().to_string())
    }

    /// Copies the image in the OCI layout `layout` into this build's storage as `name`
    /// (`skopeo copy oci:... containers-storage:[vfs@root+runroot]name`), checking its digests.
    #[tracing::instrument(name = "store base image", skip_all, fields(name))]
    pub async fn store_layout(
        &self,
        layout: &Path,
        tag: &str,
        name: &str,
        log: &BuildLog,
        deadline: Instant,
    ) -> Result<(), BuildahError> {
        let storage = format!(
            "containers-storage:[vfs@{}+{}]{name}",
            self.dir.root().display(),
            self.dir.runroot().display()
        );
        let mut command = self.sandboxed(self.skopeo);
        command
            .args(["copy", "--quiet"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(storage);
        run(command, log, deadline).await
    }

    /// buildah on this build's storage.
    fn command(&self) -> Command {
        let mut command = self.sandboxed(self.program);
        command
            .arg("--root")
            .arg(self.dir.root())
            .arg("--runroot")
            .arg(self.dir.runroot())
            .args(["--storage-driver", "vfs"]);
        command
    }

    /// `program` with this build's temp dir and registries.conf, no ambient auth file, piped
    /// output, and its own process group, so a timeout kills it and everything it started.
    fn sandboxed(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .env("TMPDIR", self.dir.tmp())
            .env("CONTAINERS_REGISTRIES_CONF", &self.registries_conf)
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("BUILDAH_ISOLATION")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        command
    }
}

/// Runs `command` to completion or `deadline`, streaming its output to `log`.
async fn run(mut command: Command, log: &BuildLog, deadline: Instant) -> Result<(), BuildahError> {
    let mut child = command.spawn().map_err(BuildahError::Spawn)?;
    let group = ProcessGroup(child.id().map(|pid| Pid::from_raw(pid as i32)));
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let finished = async {
        tokio::join!(forward(stdout, log), forward(stderr, log));
        child.wait().await
    };
    let status = match tokio::time::timeout_at(deadline, finished).await {
        Err(_) => {
            drop(group); // kills the group
            reap(&mut child).await;
            return Err(BuildahError::TimedOut);
        }
        Ok(status) => status.map_err(BuildahError::Spawn)?,
    };
    if status.success() {
        group.disarm();
        return Ok(());
    }
    // Whatever it left running (a RUN step's children) goes with it.
    drop(group);
    let error_line = log
        .error_line()
        .unwrap_or_else(|| format!("buildah exited with {status}"));
    Err(BuildahError::Failed { status, error_line })
}

async fn forward(stream: impl AsyncRead + Unpin, log: &BuildLog) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        log.line(&line).await;
    }
}

async fn reap(child: &mut Child) {
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
}

/// Kills a process group when dropped: on timeout, on failure, and when the build future is
/// dropped (the worker's shutdown grace ran out), so no buildah outlives its build.
struct ProcessGroup(Option<Pid>);

impl ProcessGroup {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sandbox_failures_at_the_end_of_the_log_are_retried() {
        let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(sandbox_failed(&lines(&[
            "STEP 4/5: RUN mkdir -p /srv/data",
            "Close_Fd sealing memfd copy: Device or resource busy",
            "Error: building at STEP \"RUN mkdir -p /srv/data\": exit status 1",
        ])));
        assert!(!sandbox_failed(&lines(&[
            "STEP 2/2: RUN false",
            "Error: building at STEP \"RUN false\": exit status 1",
        ])));
        // An old sandbox failure followed by a real build error is the build's own failure.
        assert!(!sandbox_failed(&lines(&[
            "Close_Fd sealing memfd copy: Device or resource busy",
            "STEP 3/3: RUN exit 3",
            "sh: exit 3",
            "Error: building at STEP \"RUN exit 3\": exit status 3",
        ])));
    }
}
