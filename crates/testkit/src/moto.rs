//! A real AWS API for tests: `moto_server` (PyPI `moto[server]`), with its request recorder on,
//! so tests count the calls that reached it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::wait::free_port;

/// A moto_server on 127.0.0.1 recording every request it serves.
pub struct Moto {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl Moto {
    /// Starts moto_server and waits until it answers HTTP.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("imagemesh-moto-")
            .tempdir()
            .expect("temp dir");
        // moto cannot report an ephemeral port, so pick a free one and retry on a clash.
        for _ in 0..5 {
            let port = free_port();
            let mut child = spawn(&dir, port);
            if wait_ready(&mut child, port, &dir.path().join("moto.log")) {
                return Self {
                    child: Some(child),
                    port,
                    dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "moto_server did not start: {}",
            std::fs::read_to_string(dir.path().join("moto.log")).unwrap_or_default()
        );
    }

    /// The endpoint URL to point an AWS SDK at.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many recorded requests called `operation` (the `X-Amz-Target` suffix, e.g.
    /// `GetAuthorizationToken`).
    pub fn calls(&self, operation: &str) -> usize {
        self.recorded(operation).len()
    }

    /// For each recorded call of `operation`: the access key id and region it was signed with
    /// (from the SigV4 `Authorization` credential scope).
    pub fn signers(&self, operation: &str) -> Vec<(String, String)> {
        self.recorded(operation)
            .iter()
            .filter_map(|entry| {
                let auth = header(entry, "authorization")?;
                let scope = auth.split("Credential=").nth(1)?.split(',').next()?;
                let mut parts = scope.split('/');
                let key_id = parts.next()?.to_string();
                let region = parts.nth(1)?.to_string();
                Some((key_id, region))
            })
            .collect()
    }

    fn recorded(&self, operation: &str) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.recording()).unwrap_or_default();
        let suffix = format!(".{operation}");
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|entry| header(entry, "x-amz-target").is_some_and(|t| t.ends_with(&suffix)))
            .collect()
    }

    /// What moto printed (its access log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }

    fn recording(&self) -> PathBuf {
        self.dir.path().join("recording.jsonl")
    }
}

fn header<'a>(entry: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    entry["headers"]
        .as_object()?
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))?
        .1
        .as_str()
}

fn spawn(dir: &TempDir, port: u16) -> Child {
    let log = std::fs::File::create(dir.path().join("moto.log")).expect("moto log");
    Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        // moto's recorder appends every request it serves to this file, one JSON line each.
        .env("MOTO_ENABLE_RECORDING", "True")
        .env("MOTO_RECORDER_FILEPATH", dir.path().join("recording.jsonl"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("moto log"))
        .stderr(log)
        .spawn()
        .expect("spawn moto_server (make deps installs moto[server])")
}

/// Ready when this moto says it listens on `port` and the port answers. The port answering is
/// not enough: another test's moto may have taken the same free port first, and this one would
/// then die on its bind while the other is mistaken for it.
fn wait_ready(child: &mut Child, port: u16, log: &std::path::Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    let listening = format!("Running on http://127.0.0.1:{port}");
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        let ours = std::fs::read_to_string(log).is_ok_and(|text| text.contains(&listening));
        if ours && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
