//! The image as shipped (`deploy/Dockerfile`, `make image`, `docs/deploy.md`): built by
//! `deploy/image.sh` from the binaries this workspace built, each of the five services started
//! from it with podman (`--network host`) against the test's NATS server and registry, as the
//! user and with the capabilities its Kubernetes manifest gives it. `$SRV.INFO` lists all five,
//! and a Dockerfile build with a `RUN` step goes through the mesh to the builder in its
//! container, which has only the capabilities `deploy/k8s/base/builder.yaml` adds; the indexer
//! in its container indexes the result and the mounter in its container mounts it.
//!
//! Built only with feature `image-test` (`make image-test`, the last step of `make test`), so
//! it does not run among the other tests.
//! Containers are removed when the test ends, also when it fails.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use imagemesh_proto::DEFAULT_TENANT;
use imagemesh_proto::v1::{ContainerRequest, RequestKind};
use imagemesh_testkit::images::{PulledImage, push_busybox};
use imagemesh_testkit::{bin_path, eventually};
use imagemesh_tests::{
    BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER, SERVICES,
    assert_succeeded, build_request, count_instances, describe, find,
};
use tempfile::TempDir;

/// The image the test builds (in its own image store).
const IMAGE: &str = "localhost/imagemesh:test";
/// The services' user in the image (`deploy/Dockerfile`).
const SERVICE_UID: u32 = 65532;
/// Where a container finds its configuration and the files it references.
const STAGE: &str = "/etc/imagemesh";
/// Every container of this test carries this label.
const LABEL: &str = "org.imagemesh.test=image";
const WAIT: Duration = Duration::from_secs(180);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The test's own image store (`IMAGEMESH_IMAGE_STORE`, else `.stack/image-test`), so it
/// neither needs nor touches the host's, with a `storage.conf` and a `containers.conf` for
/// podman: runc (crun refuses hosts with hybrid cgroups) and resource limits within the host's
/// (podman's defaults for root are above them, and raising a hard limit takes
/// `CAP_SYS_RESOURCE`, which a host that is itself a container may not have).
struct Store {
    dir: PathBuf,
}

impl Store {
    fn open() -> Self {
        let dir = std::env::var_os("IMAGEMESH_IMAGE_STORE")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join(".stack/image-test"));
        std::fs::create_dir_all(&dir).unwrap();
        // overlay cannot sit on overlayfs (a CI job in a container): vfs there.
        let fs = Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(&dir)
            .output()
            .unwrap();
        let driver = if String::from_utf8_lossy(&fs.stdout).trim() == "overlayfs" {
            "vfs"
        } else {
            "overlay"
        };
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"{driver}\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                dir.join("root").display(),
                dir.join("run").display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=16384:16384\", \"nproc=8192:8192\"]\n\
             [engine]\nruntime = \"runc\"\n",
        )
        .unwrap();
        Self { dir }
    }

    /// A command with this store's configuration.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        command
    }

    fn podman(&self) -> Command {
        self.command("podman")
    }
}

/// Runs `deploy/image.sh` (what `make image` runs) on the binaries the tests use.
fn build_image(store: &Store) {
    let bin_dir = bin_path("imagemesh-builder")
        .parent()
        .unwrap()
        .to_path_buf();
    let started = std::time::Instant::now();
    let status = store
        .command(workspace().join("deploy/image.sh").to_str().unwrap())
        .env("IMAGE", IMAGE)
        .env("BIN_DIR", &bin_dir)
        .status()
        .expect("deploy/image.sh runs");
    assert!(status.success(), "deploy/image.sh failed");
    eprintln!("image built in {:?}", started.elapsed());
}

/// Removes the containers an earlier run of this test left (killed before it cleaned up).
fn remove_leftovers(store: &Store) {
    let out = store
        .podman()
        .args(["ps", "-aq", "--filter", &format!("label={LABEL}")])
        .output()
        .expect("podman ps");
    for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let _ = store.podman().args(["rm", "-f", id]).output();
    }
}

/// The capabilities the builder's manifest adds (`capabilities: { drop: [ALL], add: [..] }`).
fn manifest_builder_capabilities() -> Vec<String> {
    let manifest =
        std::fs::read_to_string(workspace().join("deploy/k8s/base/builder.yaml")).unwrap();
    let line = manifest
        .lines()
        .find(|l| l.contains("capabilities:") && l.contains("add:"))
        .expect("builder.yaml adds capabilities");
    let list = line
        .split("add: [")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    let caps: Vec<String> = list.split(',').map(|c| c.trim().to_string()).collect();
    assert!(line.contains("drop: [ALL]"), "{line}");
    assert!(!caps.is_empty() && caps.iter().all(|c| !c.is_empty()));
    caps
}

/// How each service runs: as in its manifest (`deploy/k8s/base`).
fn security_args(service: &str) -> Vec<String> {
    let args: Vec<String> = match service {
        // Neither root nor any capability, nothing written anywhere (no /tmp either).
        "credential" | "scheduler" | "indexer" => vec![
            format!("--user={SERVICE_UID}:{SERVICE_UID}"),
            "--cap-drop=all".into(),
            "--security-opt=no-new-privileges".into(),
            "--read-only".into(),
            "--read-only-tmpfs=false".into(),
        ],
        // Root with exactly the manifest's capabilities; /proc and /sys unmasked (runc mounts
        // a fresh proc and sysfs for each RUN step in its user namespace, which the kernel
        // refuses while parts of them are covered); the runtime's default seccomp profile.
        "builder" => {
            let mut args = vec![
                "--user=0:0".into(),
                "--cap-drop=all".into(),
                "--security-opt=unmask=ALL".into(),
            ];
            args.extend(
                manifest_builder_capabilities()
                    .iter()
                    .map(|c| format!("--cap-add={c}")),
            );
            args
        }
        // FUSE: root with /dev/fuse, SYS_ADMIN (FUSE and overlay mounts) and DAC_OVERRIDE
        // (without it the runtime bundle's overlay over the FUSE mount is refused, EACCES).
        // Its manifest is privileged for the Bidirectional mount propagation Kubernetes allows
        // only to privileged containers; here the mounts stay in the container.
        "mounter" => vec![
            "--user=0:0".into(),
            "--cap-drop=all".into(),
            "--cap-add=SYS_ADMIN".into(),
            "--cap-add=DAC_OVERRIDE".into(),
            "--device=/dev/fuse".into(),
        ],
        other => panic!("unknown service {other}"),
    };
    args
}

/// One service in a container: `podman run` in the foreground, its output in a log file.
struct Container {
    name: String,
    store: Store,
    child: Option<Child>,
    log: PathBuf,
    _stage: TempDir,
}

impl Container {
    /// Starts `service` from the image with `config` and `env`. Files they name (the nkey, the
    /// CA, the issuer's key) are copied into a directory of their own, owned by the service's
    /// user and mounted read-only at [`STAGE`], as a Secret would be; directories they name
    /// (the mounter's) are mounted where they are. Values go to podman through its environment
    /// (`-e NAME`), never its command line.
    fn start(store: &Store, service: &str, config: &str, env: &[(String, String)]) -> Self {
        let stage = tempfile::Builder::new()
            .prefix("imagemesh-image-stage-")
            .tempdir()
            .unwrap();
        let mut copied = 0;
        let mut relocate = |value: &str| -> Option<String> {
            let path = Path::new(value);
            if !path.is_absolute() || !path.is_file() {
                return None;
            }
            copied += 1;
            let name = format!("{copied}-{}", path.file_name()?.to_string_lossy());
            std::fs::copy(path, stage.path().join(&name)).unwrap();
            Some(format!("{STAGE}/{name}"))
        };
        let mut dirs = BTreeSet::new();
        // Quoted values of the config that are paths of files or directories.
        let mut staged_config = String::new();
        for (i, piece) in config.split('"').enumerate() {
            if i % 2 == 1 {
                if let Some(moved) = relocate(piece) {
                    staged_config.push_str(&moved);
                } else {
                    if piece.starts_with('/') && Path::new(piece).is_dir() {
                        dirs.insert(piece.to_string());
                    }
                    staged_config.push_str(piece);
                }
            } else {
                staged_config.push_str(piece);
            }
            staged_config.push('"');
        }
        staged_config.pop();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.clone(), relocate(v).unwrap_or_else(|| v.clone())))
            .collect();
        std::fs::write(stage.path().join("config.toml"), staged_config).unwrap();
        let owner = if matches!(service, "builder" | "mounter") {
            0
        } else {
            SERVICE_UID
        };
        for entry in std::fs::read_dir(stage.path()).unwrap().flatten() {
            std::os::unix::fs::chown(entry.path(), Some(owner), Some(owner)).unwrap();
            let mode = std::os::unix::fs::PermissionsExt::from_mode(0o400);
            std::fs::set_permissions(entry.path(), mode).unwrap();
        }
        std::os::unix::fs::chown(stage.path(), Some(owner), Some(owner)).unwrap();
        std::fs::set_permissions(
            stage.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o500),
        )
        .unwrap();

        let name = format!("imagemesh-test-{}-{service}", std::process::id());
        let log = stage.path().with_extension("log");
        let file = std::fs::File::create(&log).unwrap();
        let mut command = store.podman();
        command
            .args(["run", "--rm", "--pull=never", "--network=host"])
            .arg(format!("--name={name}"))
            .arg(format!("--label={LABEL}"))
            .args(security_args(service))
            .arg(format!("--volume={}:{STAGE}:ro", stage.path().display()))
            .args(dirs.iter().map(|d| format!("--volume={d}:{d}")))
            .arg("--env=RUST_LOG")
            .env("RUST_LOG", "debug,async_nats=info,h2=info,hyper=info,hyper_util=info,rustls=info,reqwest=info,tower=info");
        for (key, value) in &env {
            command.arg(format!("--env={key}")).env(key, value);
        }
        command
            .arg(IMAGE)
            .arg(format!("/usr/local/bin/imagemesh-{service}"))
            .arg("--config")
            .arg(format!("{STAGE}/config.toml"))
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = command.spawn().expect("podman run");
        Self {
            name,
            store: Store {
                dir: store.dir.clone(),
            },
            child: Some(child),
            log,
            _stage: stage,
        }
    }

    /// Panics with the container's output when it is no longer running.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("{} exited ({status}):\n{}", self.name, self.logs());
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The container's user and capabilities, as podman reports them.
    fn inspect(&self, format: &str) -> String {
        let out = self
            .store
            .podman()
            .args(["inspect", "--format", format, &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self
            .store
            .podman()
            .args(["rm", "-f", "-t", "5", &self.name])
            .output();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- container {} ----\n{}", self.name, self.logs());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The capabilities in `[CAP_A CAP_B]` or `CAP_A CAP_B`.
fn cap_set(caps: &str) -> BTreeSet<String> {
    caps.trim_matches(|c| c == '[' || c == ']')
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Sends `subject` and gathers every reply within `wait`.
async fn gather(client: &async_nats::Client, subject: &str, wait: Duration) -> Vec<String> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subject.to_string(), inbox, "".into())
        .await
        .unwrap();
    let mut names = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, replies.next()).await {
        let info: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        names.push(info["name"].as_str().unwrap().to_string());
    }
    names.sort();
    names
}

#[tokio::test]
async fn the_image_runs_every_service_and_builds_without_privileges() {
    let store = Store::open();
    remove_leftovers(&store);
    build_image(&store);

    // Basic auth on the build registry: the base image for the build is pushed with it.
    let options = MeshOptions {
        build_registry_auth: BuildRegistryAuth::Basic,
        start: Vec::new(),
        ..Default::default()
    };
    let mut mesh = Mesh::start(options).await;
    let mut containers = Vec::new();
    for service in SERVICES {
        let env = mesh.instance_env(service, service, &[]).await;
        let config = mesh.config(service);
        let before = count_instances(&mesh.client, service).await;
        containers.push(Container::start(&store, service, &config, &env));
        let container = containers.last_mut().unwrap();
        let what = format!("{service} in its container to answer $SRV.PING");
        let client = mesh.client.clone();
        let container = std::sync::Mutex::new(container);
        eventually(Duration::from_secs(60), &what, || async {
            container.lock().unwrap().assert_running();
            (count_instances(&client, service).await > before).then_some(())
        })
        .await;
    }

    let mut expected: Vec<String> = SERVICES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(
        gather(&mesh.client, "$SRV.INFO", Duration::from_secs(1)).await,
        expected
    );

    // Each ran as its manifest says: the user, and no capability beyond the listed ones.
    for (service, container) in SERVICES.iter().zip(&containers) {
        let user = container.inspect("{{.Config.User}}");
        let caps = container.inspect("{{.EffectiveCaps}}");
        match *service {
            "credential" | "scheduler" | "indexer" => {
                assert_eq!(user, format!("{SERVICE_UID}:{SERVICE_UID}"), "{service}");
                assert_eq!(caps, "[]", "{service}");
            }
            "builder" => {
                assert_eq!(user, "0:0");
                let want: Vec<String> = manifest_builder_capabilities()
                    .iter()
                    .map(|c| format!("CAP_{c}"))
                    .collect();
                assert_eq!(cap_set(&caps), cap_set(&want.join(" ")), "the builder's");
            }
            _ => {
                assert_eq!(user, "0:0");
                let want = "CAP_SYS_ADMIN CAP_DAC_OVERRIDE";
                assert_eq!(cap_set(&caps), cap_set(want), "the mounter's");
            }
        }
    }

    // A Dockerfile build with a RUN step, through the mesh, by the builder in its container.
    let base = "base/busybox:1";
    push_busybox(mesh.registry.addr(), base, REGISTRY_USER, REGISTRY_PASSWORD);
    let dockerfile = format!(
        "FROM {}/{base}\nRUN echo built > /built && cat /proc/self/uid_map > /uid_map\n",
        mesh.registry.addr()
    );
    mesh.submit(&build_request("img-build", &dockerfile, ""))
        .await;
    let events = mesh.wait_terminal("img-build", WAIT).await;
    assert_succeeded(&events);
    let image = PulledImage::pull(
        mesh.registry.addr(),
        &format!("imagemesh/builds/{DEFAULT_TENANT}:img-img-build"),
        REGISTRY_USER,
        REGISTRY_PASSWORD,
    );
    let root = image.rootfs();
    assert_eq!(
        std::fs::read_to_string(root.join("built")).unwrap(),
        "built\n"
    );
    assert_eq!(std::fs::metadata(root.join("built")).unwrap().uid(), 0);
    // The step ran in the sandbox's user namespace, as a high host id.
    let uid_map = std::fs::read_to_string(root.join("uid_map")).unwrap();
    let fields: Vec<u64> = uid_map
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    assert_eq!(fields.len(), 3, "{uid_map}");
    assert_eq!(fields[0], 0, "{uid_map}");
    assert!(fields[1] >= 2_147_483_647, "{uid_map}");

    // The indexer in its container indexed it; the mounter in its container mounts it (FUSE,
    // in the container's mount namespace) and serves the file the RUN step wrote.
    assert!(
        find(&events, "indexer", "indexed").is_some(),
        "{}",
        describe(&events)
    );
    let image_ref = find(&events, "builder", "pushed").unwrap().details["image_ref"].clone();
    let request = ContainerRequest {
        request_id: "img-run".into(),
        container_id: "ctr-img".into(),
        kind: RequestKind::Runtime as i32,
        image_ref,
        ..Default::default()
    };
    mesh.submit(&request).await;
    let events = mesh.wait_terminal("img-run", WAIT).await;
    let mounted = assert_succeeded(&events);
    assert_eq!(mounted.phase, "mounted", "{}", describe(&events));
    let mountpoint = mounted.details["mountpoint"].clone();
    let mounter = containers
        .iter()
        .find(|c| c.name.ends_with("-mounter"))
        .unwrap();
    let out = store
        .podman()
        .args(["exec", &mounter.name, "cat", &format!("{mountpoint}/built")])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "built\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No secret in any container's log.
    for container in &containers {
        assert!(
            !container.logs().contains(REGISTRY_PASSWORD),
            "the registry password is in {}'s log",
            container.name
        );
    }
    drop(containers);
    let out = store
        .podman()
        .args(["ps", "-aq", "--filter", &format!("label={LABEL}")])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "every container was removed"
    );
}
