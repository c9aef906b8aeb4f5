//! Running buildah: one build's commands, their output streamed line by line to the build log,
//! a deadline that kills the whole process group, and storage confined to the build directory.
//!
//! Every command runs with `--root`/`--runroot` in the build's [`WorkDir`] and the vfs storage
//! driver (plain directories, no mounts left behind by a killed build), `TMPDIR` in the build
//! directory, registry auth from an `--authfile`, insecure registries from a private
//! registries.conf (`CONTAINERS_REGISTRIES_CONF`), the build's own containers.conf
//! (`CONTAINERS_CONF`) and the sandbox's id mapping ([`BuildSandbox`]). Its environment is
//! cleared of everything but what it needs. No secret and no build argument's value is ever an
//! argument: build args are in its environment (`build_args.rs`).

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::config::BuilderConfig;
use crate::log::BuildLog;
use crate::sandbox::BuildSandbox;
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

/// Failures to start a `RUN` step's sandbox that say nothing about the Dockerfile. buildah (for
/// its chroot isolation and for its OCI runtime monitor) and runc both re-execute a sealed
/// in-memory copy of their own binary, and sealing it fails now and then with EBUSY.
const SANDBOX_ERRORS: &[&str] = &[
    "sealing memfd copy",
    "could not ensure we are a cloned binary",
];

/// Variables of the builder's environment buildah keeps: where programs are, and the proxy of
/// its own registry traffic. Everything else (the builder's configuration, its identity's
/// paths, `REGISTRY_AUTH_FILE`, `BUILDAH_*`) is not buildah's business.
const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

/// Whether the last lines of a failed build show a sandbox failure rather than a build error.
fn sandbox_failed(tail: &[String]) -> bool {
    tail.iter()
        .rev()
        .take(3)
        .any(|line| SANDBOX_ERRORS.iter().any(|e| line.contains(e)))
}

/// buildah's message when a `RUN` step's command exits non-zero under OCI isolation; chroot
/// isolation says only the part after it.
const RUNTIME_EXIT: &str = ": while running runtime: exit status ";

/// The reason a build failed, phrased the same whatever the isolation: `building at STEP "RUN
/// x": exit status 3` (the runtime did not fail, the step's command did).
pub fn clarify(error_line: &str) -> String {
    error_line.replacen(RUNTIME_EXIT, ": exit status ", 1)
}

/// What a Dockerfile build needs besides the build directory.
pub struct BudSpec<'a> {
    pub dockerfile: &'a Path,
    pub context: &'a Path,
    /// Local name of the result, e.g. `localhost/imagemesh-build:<image id>`.
    pub tag: &'a str,
    /// Checked by `build_args::check`: names buildah may take from its environment.
    pub build_args: Vec<(String, String)>,
}

/// The files a build's buildah reads its settings from, in the build's private directory.
pub struct BuildahFiles {
    pub auth_file: PathBuf,
    pub registries_conf: PathBuf,
    pub containers_conf: PathBuf,
}

/// buildah bound to one build directory and sandbox.
pub struct Buildah<'a> {
    program: &'a Path,
    dir: &'a WorkDir,
    sandbox: &'a BuildSandbox<'a>,
    files: BuildahFiles,
}

impl<'a> Buildah<'a> {
    /// The program comes from `settings.buildah`.
    pub fn new(
        settings: &'a BuilderConfig,
        dir: &'a WorkDir,
        sandbox: &'a BuildSandbox<'a>,
        files: BuildahFiles,
    ) -> Self {
        Self {
            program: &settings.buildah,
            dir,
            sandbox,
            files,
        }
    }

    /// `buildah bud --layers` with the sandbox's isolation (`sandbox.rs`).
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
            .args(["bud", "--layers", "--pull=missing"])
            .args(self.sandbox.bud_args())
            .arg("--authfile")
            .arg(&self.files.auth_file)
            .arg("-f")
            .arg(spec.dockerfile)
            .arg("-t")
            .arg(spec.tag);
        // `--build-arg NAME` without a value: buildah reads it from its environment.
        for (name, value) in &spec.build_args {
            command.arg("--build-arg").arg(name).env(name, value);
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
        let digest_file = self.dir.private().join("digest");
        let mut command = self.command();
        command
            .args(["push", "--retry", "0", "--authfile"])
            .arg(&self.files.auth_file)
            .arg("--digestfile")
            .arg(&digest_file)
            .arg(image)
            .arg(destination);
        run(command, log, deadline).await?;
        let digest = std::fs::read_to_string(&digest_file).map_err(BuildahError::Spawn)?;
        Ok(digest.trim().to_string())
    }

    /// Stores the image in the OCI layout `layout` (tag `tag`, config digest `image_id`) in this
    /// build's storage as `name`: `buildah pull` checks every digest and unpacks the layers
    /// owned by the sandbox's ids (a copy into storage by another tool would leave them owned
    /// by host root, which the mapped root of a `RUN` step cannot write to).
    #[tracing::instrument(name = "store base image", skip_all, fields(name))]
    pub async fn store_layout(
        &self,
        layout: &Path,
        tag: &str,
        image_id: &str,
        name: &str,
        log: &BuildLog,
        deadline: Instant,
    ) -> Result<(), BuildahError> {
        // buildah names an image pulled from a layout after the layout's path, which must be a
        // valid repository name: relative, from the layout's parent (`localhost/base-0`). That
        // extra name exists only in this build's storage.
        let (Some(parent), Some(file)) = (layout.parent(), layout.file_name()) else {
            return Err(BuildahError::Spawn(std::io::Error::other(
                "not a layout path",
            )));
        };
        let mut pull = self.command();
        pull.current_dir(parent)
            .args(["pull", "--quiet"])
            .arg(format!("oci:{}:{tag}", file.to_string_lossy()));
        run(pull, log, deadline).await?;
        let id = image_id.strip_prefix("sha256:").unwrap_or(image_id);
        let mut name_it = self.command();
        name_it.args(["tag", id, name]);
        run(name_it, log, deadline).await
    }

    /// buildah on this build's storage, with the sandbox's id mapping.
    fn command(&self) -> Command {
        let mut command = self.prepared(self.program);
        command
            .args(self.sandbox.global_args())
            .arg("--root")
            .arg(self.dir.root())
            .arg("--runroot")
            .arg(self.dir.runroot())
            .args(["--storage-driver", "vfs"]);
        command
    }

    /// `program` with only [`INHERITED_ENV`] of the builder's environment, this build's temp
    /// dir and configuration files, piped output, and its own process group, so a timeout kills
    /// it and everything it started (but for `RUN` containers: `BuildSandbox` removes those).
    fn prepared(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command.env_clear();
        for name in INHERITED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command
            .env("TMPDIR", self.dir.tmp())
            .env("CONTAINERS_REGISTRIES_CONF", &self.files.registries_conf)
            .env("CONTAINERS_CONF", &self.files.containers_conf)
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
        .map(|line| clarify(&line))
        .unwrap_or_else(|| format!("buildah exited with {status}"));
    Err(BuildahError::Failed { status, error_line })
}

/// Longest line handed to the build log; a longer one is split into pieces of this size.
const MAX_LINE: usize = 16 * 1024;

/// Streams buildah's output to the log line by line. Output is bytes, not text: a RUN step may
/// print anything (invalid UTF-8 is replaced, lossily) and lines of any length (split at
/// [`MAX_LINE`]), and the pipe is read to its end whatever comes through it, so buildah never
/// blocks on a full pipe.
async fn forward(mut stream: impl AsyncRead + Unpin, log: &BuildLog) {
    let mut lines = LineSplitter::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::debug!(error = %err, "reading buildah output failed");
                break;
            }
        };
        for line in lines.push(&buf[..n]) {
            log.line(&line).await;
        }
    }
    if let Some(line) = lines.finish() {
        log.line(&line).await;
    }
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes, converted lossily to text.
#[derive(Default)]
struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// The complete lines (and full-length pieces of long ones) that `bytes` finishes.
    fn push(&mut self, mut bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let room = MAX_LINE - self.pending.len();
            let window = &bytes[..bytes.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(at) => {
                    self.pending.extend_from_slice(&window[..at]);
                    out.push(self.take());
                    bytes = &bytes[at + 1..];
                }
                None => {
                    self.pending.extend_from_slice(window);
                    bytes = &bytes[window.len()..];
                    if self.pending.len() == MAX_LINE {
                        out.push(self.take());
                    }
                }
            }
        }
        out
    }

    /// The last line, when the stream did not end with a newline.
    fn finish(mut self) -> Option<String> {
        (!self.pending.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let line = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        line
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
    fn output_is_split_into_bounded_lossy_lines() {
        let mut lines = LineSplitter::default();
        assert!(lines.push(b"par").is_empty());
        assert_eq!(
            lines.push(b"tial\n\xff\xfe bad\nnext"),
            ["partial", "\u{fffd}\u{fffd} bad"]
        );
        let long = vec![b'a'; 2 * MAX_LINE + 10];
        let got = lines.push(&long);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].len(), MAX_LINE);
        assert!(got[0].starts_with("next"));
        assert_eq!(got[1], "a".repeat(MAX_LINE));
        assert_eq!(lines.push(b"\n"), ["a".repeat(14)]);
        assert!(lines.push(b"").is_empty());
        assert_eq!(lines.push(b"\n\n"), ["", ""]);
        lines.push(b"tail");
        assert_eq!(lines.finish().as_deref(), Some("tail"));
        assert_eq!(LineSplitter::default().finish(), None);
    }

    #[test]
    fn a_failed_run_step_reads_the_same_under_either_isolation() {
        let oci = "Error: building at STEP \"RUN exit 3\": while running runtime: exit status 3";
        let chroot = "Error: building at STEP \"RUN exit 3\": exit status 3";
        assert_eq!(clarify(oci), chroot);
        assert_eq!(clarify(chroot), chroot);
    }

    #[test]
    fn build_arg_values_are_in_the_environment_never_on_the_command_line() {
        use crate::sandbox::{Sandbox, SandboxConfig};
        let settings = BuilderConfig::default();
        let storage = tempfile::tempdir().unwrap();
        let dir = WorkDir::create(storage.path(), "r1").unwrap();
        let sandbox = Sandbox::new(SandboxConfig::default()).unwrap();
        let build = sandbox.enter("default", dir.runtime_state()).unwrap();
        let files = BuildahFiles {
            auth_file: dir.private().join("auth.json"),
            registries_conf: dir.private().join("registries.conf"),
            containers_conf: dir.private().join("containers.conf"),
        };
        let buildah = Buildah::new(&settings, &dir, &build, files);
        let spec = BudSpec {
            dockerfile: Path::new("/d/Dockerfile"),
            context: Path::new("/d/context"),
            tag: "localhost/imagemesh-build:x",
            build_args: vec![("TOKEN".into(), "value-7Qx2".into())],
        };
        let command = buildah.bud_command(&spec);
        let command = command.as_std();
        let argv: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = argv.join(" ");
        assert!(!line.contains("value-7Qx2"), "{line}");
        assert!(line.contains("--build-arg TOKEN "), "{line}");
        for flag in ["--isolation oci", "--network none", "--userns-uid-map 0:"] {
            assert!(line.contains(flag), "{flag}: {line}");
        }
        let env: Vec<_> = command.get_envs().collect();
        assert!(
            env.contains(&(
                std::ffi::OsStr::new("TOKEN"),
                Some(std::ffi::OsStr::new("value-7Qx2"))
            )),
            "{env:?}"
        );
        // The builder's own environment stays out of buildah's.
        assert!(
            env.iter().all(|(k, _)| INHERITED_ENV.iter().any(|i| k == i)
                || [
                    "TOKEN",
                    "TMPDIR",
                    "CONTAINERS_CONF",
                    "CONTAINERS_REGISTRIES_CONF"
                ]
                .iter()
                .any(|i| k == i)),
            "{env:?}"
        );
    }

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
