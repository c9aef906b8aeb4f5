//! A real `nats-server` with JetStream.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A nats-server on 127.0.0.1 with JetStream in a temporary store directory.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    /// The configuration file, when the server runs with one (authorization, TLS).
    config: Option<PathBuf>,
}

impl NatsServer {
    /// Starts a server on an ephemeral port and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_inner(None)
    }

    /// Starts a server with the configuration `render` makes for a JetStream store directory
    /// (its listen address is overridden: 127.0.0.1, an ephemeral port).
    pub fn start_configured(render: impl FnOnce(&Path) -> String) -> Self {
        Self::start_inner(Some(Box::new(render)))
    }

    #[allow(clippy::type_complexity)]
    fn start_inner(render: Option<Box<dyn FnOnce(&Path) -> String + '_>>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("imagemesh-nats-")
            .tempdir()
            .expect("temp dir");
        let config = render.map(|render| {
            let path = dir.path().join("nats-server.conf");
            std::fs::write(&path, render(&dir.path().join("store"))).expect("write config");
            path
        });
        let child = spawn(dir.path(), None, config.as_deref());
        let port = read_port(dir.path(), child.id());
        let server = Self {
            child: Some(child),
            port,
            dir,
            config,
        };
        server.wait_ready();
        server
    }

    /// What the server logged so far (permission violations among it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default()
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Replaces the configuration, has the running server reload it (SIGHUP), and waits until
    /// the reload finished: the server logs that last, after it moved existing connections
    /// and their subscriptions over to the new configuration (a subscription made before then
    /// can be lost).
    pub fn reconfigure(&self, config: &str) {
        let path = self
            .config
            .as_ref()
            .expect("server started with a configuration");
        let reloads = || self.log().matches("Reloaded server configuration").count();
        let before = reloads();
        std::fs::write(path, config).expect("write config");
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while reloads() == before {
            assert!(Instant::now() < deadline, "nats-server did not reload");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connects a client.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to test nats-server")
    }

    /// Stops the server hard (SIGKILL), keeping its store.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn(
            self.dir.path(),
            Some(self.port),
            self.config.as_deref(),
        ));
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start listening"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn spawn(dir: &Path, port: Option<u16>, config: Option<&Path>) -> Child {
    let port = port.map_or("-1".to_string(), |p| p.to_string());
    let mut command = Command::new("nats-server");
    match config {
        // The configuration holds JetStream (store, encryption), TLS and authorization.
        Some(config) => command.arg("-c").arg(config),
        None => command.arg("-js").arg("-sd").arg(dir.join("store")),
    };
    command
        .args(["-a", "127.0.0.1", "-p", &port])
        .arg("-l")
        .arg(dir.join("nats-server.log"))
        .arg("--ports_file_dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nats-server (make deps installs it)")
}

/// nats-server writes `<name>_<pid>.ports` with the addresses it bound when given `-p -1`.
fn read_port(dir: &Path, pid: u32) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(port) = ports_file(dir, pid).and_then(|p| parse_ports(&p)) {
            return port;
        }
        assert!(Instant::now() < deadline, "nats-server wrote no ports file");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ports_file(dir: &Path, pid: u32) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&format!("_{pid}.ports")))
        })
}

fn parse_ports(path: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = json["nats"][0].as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
