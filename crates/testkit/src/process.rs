//! imagemesh service binaries run as real processes.
//!
//! Tests run the same binaries a deployment runs, each with its own TOML config and a log file,
//! so they can kill -9 a service, restart it, and read everything it logged (to check, for
//! example, that no secret ever appears).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

/// Where the workspace binaries are: `IMAGEMESH_BIN_DIR`, else the cargo target directory this
/// test binary was built into (`target/<profile>/deps/..`). `make test` builds them first.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("IMAGEMESH_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("current exe");
            let deps = exe.parent().expect("exe dir");
            deps.parent().expect("target profile dir").to_path_buf()
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    path
}

/// A running service binary.
pub struct ServiceProcess {
    binary: String,
    child: Option<Child>,
    dir: TempDir,
    env: Vec<(String, String)>,
    starts: u32,
}

impl ServiceProcess {
    /// Starts `binary` (e.g. `imagemesh-scheduler`) with `config` as its TOML file and the given
    /// extra environment. Logs at debug level go to a file in a temp dir.
    pub fn spawn(binary: &str, config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{binary}-"))
            .tempdir()
            .expect("temp dir");
        std::fs::write(dir.path().join("config.toml"), config).expect("write config");
        let mut process = Self {
            binary: binary.to_string(),
            child: None,
            dir,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            starts: 0,
        };
        process.start();
        process
    }

    fn start(&mut self) {
        self.starts += 1;
        let log_path = self.dir.path().join(format!("log.{}", self.starts));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut command = Command::new(bin_path(&self.binary));
        command
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .env("RUST_LOG", "debug,async_nats=info,h2=info,hyper=info,hyper_util=info,rustls=info,reqwest=info,tower=info,opentelemetry_sdk=info,opentelemetry_otlp=info,opentelemetry_http=info")
            .env_remove("IMAGEMESH_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        self.child = Some(
            command
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", self.binary)),
        );
    }

    /// Sets `key` in the environment of the next start (see [`ServiceProcess::restart`]).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Everything the process logged, over all its starts.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                std::fs::read_to_string(self.dir.path().join(format!("log.{n}")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("")
    }

    /// The directory holding the config and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for it to exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// SIGSTOP: the process stays alive but does nothing (no heartbeats, no work).
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// SIGCONT after [`ServiceProcess::pause`].
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
    }

    fn signal(&self, signal: Signal) {
        if let Some(child) = &self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts it again (after kill or terminate) with the same config.
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        // A stopped process cannot act on SIGKILL until continued on some kernels' accounting;
        // continue it first so it dies at once.
        self.resume();
        // Ask first (a mounter unmounts its FUSE mounts on SIGTERM), then insist.
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
            while std::time::Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.binary, self.logs());
        }
    }
}
