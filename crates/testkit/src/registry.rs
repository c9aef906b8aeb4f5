//! A real OCI registry: Debian's `docker-registry` (distribution 2.8).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::wait::free_port;

/// How the registry authenticates clients.
#[derive(Debug, Clone)]
pub enum RegistryAuth {
    /// Anyone may pull and push.
    Open,
    /// HTTP Basic against an htpasswd file of these (user, password) pairs.
    Htpasswd(Vec<(String, String)>),
    /// Distribution token auth: clients must present a JWT from `realm`, signed by the key whose
    /// certificate is in `root_cert_bundle`.
    Token {
        realm: String,
        service: String,
        issuer: String,
        root_cert_bundle: PathBuf,
    },
}

/// A docker-registry on 127.0.0.1 storing into a temporary directory.
pub struct Registry {
    child: Option<Child>,
    addr: String,
    dir: TempDir,
    log: PathBuf,
}

impl Registry {
    /// Starts a registry and waits until it answers `/v2/`.
    pub fn start(auth: RegistryAuth) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("imagemesh-registry-")
            .tempdir()
            .expect("temp dir");
        let log = dir.path().join("registry.log");
        // The registry cannot report an ephemeral port, so pick a free one and retry on a clash.
        for _ in 0..5 {
            let addr = format!("127.0.0.1:{}", free_port());
            let config = write_config(dir.path(), &addr, &auth);
            let mut child = spawn(&config, &log);
            if wait_ready(&mut child, &addr) {
                return Self {
                    child: Some(child),
                    addr,
                    dir,
                    log,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "docker-registry did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// `host:port` of the registry.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Where the registry stores blobs and manifests.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// What the registry logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the registry answers `method` on `/v2/<path>` with this bearer token (200, 401,
    /// 404 for an empty repository one may read, 202 for a blob upload one may start).
    pub async fn answer_with_token(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
    ) -> reqwest::StatusCode {
        reqwest::Client::new()
            .request(method, format!("http://{}/v2/{path}", self.addr))
            .bearer_auth(token)
            .send()
            .await
            .expect("registry answers")
            .status()
    }

    /// Stops the registry (for tests of an unreachable registry).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_ready(child: &mut Child, addr: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if probe(addr) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// True once the registry answers HTTP on `/v2/` (200 when open, 401 with auth).
fn probe(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let request = format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut head = [0u8; 12];
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_exact(&mut head).is_ok()
        && (head.ends_with(b" 200") || head.ends_with(b" 401"))
}

fn write_config(dir: &Path, addr: &str, auth: &RegistryAuth) -> PathBuf {
    let mut yaml = format!(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
        dir.join("data").display()
    );
    match auth {
        RegistryAuth::Open => {}
        RegistryAuth::Htpasswd(users) => {
            let path = dir.join("htpasswd");
            std::fs::write(&path, htpasswd(users)).expect("write htpasswd");
            write!(
                yaml,
                "auth:\n  htpasswd:\n    realm: imagemesh\n    path: {}\n",
                path.display()
            )
            .unwrap();
        }
        RegistryAuth::Token {
            realm,
            service,
            issuer,
            root_cert_bundle,
        } => {
            write!(
                yaml,
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                root_cert_bundle.display()
            )
            .unwrap();
        }
    }
    let path = dir.join("config.yml");
    std::fs::write(&path, yaml).expect("write registry config");
    path
}

/// bcrypt entries, the only kind distribution accepts, made by `htpasswd -Bbn`.
fn htpasswd(users: &[(String, String)]) -> String {
    users
        .iter()
        .map(|(user, password)| {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("run htpasswd (apache2-utils)");
            assert!(out.status.success(), "htpasswd failed");
            String::from_utf8(out.stdout)
                .expect("htpasswd output")
                .trim()
                .to_string()
                + "\n"
        })
        .collect()
}

fn spawn(config: &Path, log: &Path) -> Child {
    let log_file = std::fs::File::create(log).expect("registry log");
    Command::new("docker-registry")
        .arg("serve")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn docker-registry (make deps installs it)")
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
