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
    /// A node of a cluster: its `server_name` and `cluster { ... }` block, appended to every
    /// configuration it is given.
    node: Option<ClusterNode>,
}

/// What makes a server one node of a [`NatsCluster`].
#[derive(Debug, Clone)]
struct ClusterNode {
    /// `server_name` (JetStream reports stream leaders by it).
    name: String,
    /// `server_name`, the `cluster` block with this node's route port and routes to the others.
    block: String,
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
        Self::start_node(render, None)
            .unwrap_or_else(|log| panic!("nats-server did not start:\n{log}"))
    }

    #[allow(clippy::type_complexity)]
    /// Starts a server; when it exits before it listens, returns what it logged.
    fn start_node(
        render: Option<Box<dyn FnOnce(&Path) -> String + '_>>,
        node: Option<ClusterNode>,
    ) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("imagemesh-nats-")
            .tempdir()
            .expect("temp dir");
        let config = render.map(|render| {
            let path = dir.path().join("nats-server.conf");
            let mut config = render(&dir.path().join("store"));
            if let Some(node) = &node {
                config.push_str(&node.block);
            }
            std::fs::write(&path, config).expect("write config");
            path
        });
        let mut child = spawn(dir.path(), None, config.as_deref());
        let Some(port) = read_port(dir.path(), &mut child) else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.path().join("nats-server.log"));
            return Err(log.unwrap_or_default());
        };
        let server = Self {
            child: Some(child),
            port,
            dir,
            config,
            node,
        };
        server.wait_ready();
        Ok(server)
    }

    /// The `server_name` of a cluster node.
    pub fn server_name(&self) -> Option<&str> {
        self.node.as_ref().map(|n| n.name.as_str())
    }

    /// Whether the process is running (not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
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
        let mut config = config.to_string();
        if let Some(node) = &self.node {
            config.push_str(&node.block);
        }
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

    /// Stops the server gracefully (SIGTERM: JetStream writes its state out) and waits until
    /// it exited, keeping its store.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
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

/// nats-server writes `<name>_<pid>.ports` with the addresses it bound when given `-p -1`;
/// `None` when it exited (or wrote none in time).
fn read_port(dir: &Path, child: &mut Child) -> Option<u16> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(port) = ports_file(dir, child.id()).and_then(|p| parse_ports(&p)) {
            return Some(port);
        }
        if Instant::now() >= deadline || !matches!(child.try_wait(), Ok(None)) {
            return None;
        }
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

/// A JetStream cluster of nats-servers on loopback: each node with its own file store in a
/// temp dir, an ephemeral client port, and a route port (picked free at start) with routes to
/// every other node. Routes authenticate with a user and password made for this cluster alone
/// (plain TCP: loopback only). Any node can be killed (SIGKILL) and restarted on the same ports
/// with the same store.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    name: String,
}

impl NatsCluster {
    /// Starts `size` open nodes (JetStream, no authorization).
    pub fn start(size: usize) -> Self {
        Self::start_configured(size, |store| {
            format!("jetstream: {{\n  store_dir: \"{}\"\n}}\n", store.display())
        })
    }

    /// Starts `size` nodes, each with the configuration `render` makes for its JetStream store
    /// directory (authorization, TLS, encryption), plus its `server_name` and `cluster` block.
    /// Returns once every node accepts connections; the JetStream meta group may still be
    /// electing its leader (retry the first JetStream call).
    pub fn start_configured(size: usize, render: impl Fn(&Path) -> String) -> Self {
        // A route port is one picked free: another process may take it before the node binds
        // it. Then the node exits at once, and the whole cluster starts again on other ports.
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start(size, &render) {
                Ok(cluster) => return cluster,
                Err(log) => failures.push(log),
            }
        }
        panic!(
            "nats-server cluster did not start:\n{}",
            failures.join("\n----\n")
        );
    }

    fn try_start(size: usize, render: &impl Fn(&Path) -> String) -> Result<Self, String> {
        let name = format!("imagemesh-test-{}", uuid_like());
        let password = uuid_like();
        let route_ports: Vec<u16> = (0..size).map(|_| route_port()).collect();
        let nodes = (0..size)
            .map(|index| {
                let routes: Vec<String> = route_ports
                    .iter()
                    .enumerate()
                    .filter(|(other, _)| *other != index)
                    .map(|(_, port)| format!("\"nats-route://route:{password}@127.0.0.1:{port}\""))
                    .collect();
                let server_name = format!("n{}", index + 1);
                let block = format!(
                    "\nserver_name: \"{server_name}\"\ncluster {{\n  name: \"{name}\"\n  listen: \"127.0.0.1:{}\"\n  authorization {{\n    user: \"route\"\n    password: \"{password}\"\n  }}\n  routes: [\n    {}\n  ]\n}}\n",
                    route_ports[index],
                    routes.join("\n    ")
                );
                let node = ClusterNode {
                    name: server_name,
                    block,
                };
                NatsServer::start_node(Some(Box::new(|store: &Path| render(store))), Some(node))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { nodes, name })
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every node's client URL, comma-separated (`nats.url` of a service that fails over).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node whose `server_name` is `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.server_name() == Some(name))
    }
}

/// A route port that was free a moment ago, below the kernel's ephemeral range (32768 and up
/// on Linux), so neither outgoing connections nor servers on `-p -1` take it while a killed
/// node is down.
fn route_port() -> u16 {
    loop {
        let seed = u16::from_str_radix(&uuid_like()[..4], 16).unwrap_or_default();
        let port = 20_000 + seed % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A random token for names and the route password.
fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
