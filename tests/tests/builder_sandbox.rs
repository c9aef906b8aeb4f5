//! The build sandbox end to end (`docs/builder.md`, The sandbox): through the real mesh, `RUN`
//! steps of the default policy cannot reach a server on loopback, read the builder's registry
//! auth file, write outside their root filesystem or signal the builder, and each such build
//! fails with the reason in its message; an ordinary `RUN` still builds, as a mapped host user,
//! into an image owned by root; build args reach the step through buildah's environment, never a
//! command line, are blanked in dead letters, and are refused when buildah would read them for
//! itself; a tenant the configuration opts in gets a network. A step whose builder was killed
//! or stopped does not outlive it (for long).

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use imagemesh_access::Role;
use imagemesh_proto::DEFAULT_TENANT;
use imagemesh_proto::v1::{ContainerRequest, ErrorCode};
use imagemesh_testkit::images::{PulledImage, push_busybox};
use imagemesh_testkit::{ServiceProcess, eventually, wait_for_service};
use imagemesh_tests::{
    BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER, assert_failed,
    assert_succeeded, build_request, describe,
};
use prost::Message;
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(180);
const BASE: &str = "base/busybox:1";
/// A tenant whose `RUN` steps the builder's configuration gives a network.
const ONLINE: &str = "online";
/// A build arg value that must never be on a command line, in a log or in a dead letter.
const ARG_VALUE: &str = "arg-Vq7Lm2Xc9";

/// A loopback TCP server that counts the connections it accepts, closing each at once.
struct Listener {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Listener {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Self { addr, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A mesh with a builder on the default sandbox policy, except that tenant [`ONLINE`] gets the
/// builder's network.
struct SandboxMesh {
    mesh: Mesh,
    builder: ServiceProcess,
    storage: TempDir,
}

impl SandboxMesh {
    async fn start() -> Self {
        let mut options = MeshOptions {
            build_registry_auth: BuildRegistryAuth::Basic,
            start: vec!["credential", "scheduler", "indexer"],
            ..Default::default()
        };
        let role = Role::Client {
            tenant: ONLINE.into(),
        };
        options.identities.push((format!("client-{ONLINE}"), role));
        let mut mesh = Mesh::start(options).await;
        let storage = tempfile::tempdir().unwrap();
        let dir = storage.path().to_str().unwrap().to_string();
        let env = [("IMAGEMESH_BUILDER__STORAGE_DIR", dir.as_str())];
        let config = format!(
            "{}[builder.sandbox]\nnetwork_tenants = [\"{ONLINE}\"]\ntenant_network = \"host\"\n",
            mesh.config("builder")
        );
        let builder = mesh.spawn_with_config("builder", &config, &env).await;
        wait_for_service(&mesh.client, "builder", Duration::from_secs(20)).await;
        push_busybox(mesh.registry.addr(), BASE, REGISTRY_USER, REGISTRY_PASSWORD);
        Self {
            mesh,
            builder,
            storage,
        }
    }

    fn dockerfile(&self, steps: &str) -> String {
        format!("FROM {}/{BASE}\n{steps}", self.mesh.registry.addr())
    }

    fn storage(&self) -> String {
        self.storage.path().display().to_string()
    }

    /// The build failed in the builder with `BUILD_FAILED`; its message.
    async fn failed(&self, id: &str) -> String {
        let events = self.mesh.wait_terminal(id, WAIT).await;
        let last = assert_failed(&events, "builder", ErrorCode::BuildFailed);
        last.message.clone()
    }
}

/// Whether any process's command line holds `needle`.
fn running_cmdline(needle: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(needle))
            .unwrap_or(false)
    })
}

/// The auth files of the builds running now.
fn auth_files(storage: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(storage)
        .unwrap()
        .flatten()
        .map(|build| build.path().join("private/auth.json"))
        .filter(|path| path.exists())
        .collect()
}

fn with_arg(mut request: ContainerRequest, name: &str, value: &str) -> ContainerRequest {
    let options = request.build_options.as_mut().unwrap();
    options.build_args.insert(name.into(), value.into());
    request
}

#[tokio::test]
async fn run_steps_are_sandboxed_and_ordinary_builds_still_work() {
    let m = SandboxMesh::start().await;
    let local = Listener::start().await;
    let online = Listener::start().await;
    let storage = m.storage();
    let outside = tempfile::tempdir().unwrap();
    let outside_path = outside.path().display().to_string();
    let builder_pid = m.builder.pid().unwrap();
    let port = local.addr.port();

    let requests = [
        with_arg(
            build_request(
                "sbx-net",
                &m.dockerfile(&format!(
                    "ARG SECRET_ARG\nRUN nc -w 3 127.0.0.1 {port} </dev/null\n"
                )),
                "",
            ),
            "SECRET_ARG",
            ARG_VALUE,
        ),
        build_request(
            "sbx-auth",
            &m.dockerfile(&format!(
                "RUN cat {storage}/b-*/private/auth.json || cat {storage}/b-*/auth.json || \
                 cat /proc/1/root{storage}/b-*/private/auth.json\n"
            )),
            "",
        ),
        build_request(
            "sbx-write",
            &m.dockerfile(&format!(
                "RUN echo escaped > {outside_path}/escaped || \
                 echo escaped > /proc/1/root{outside_path}/escaped || \
                 echo escaped > {storage}/escaped\n"
            )),
            "",
        ),
        build_request(
            "sbx-signal",
            &m.dockerfile(&format!("RUN kill -0 {builder_pid}\n")),
            "",
        ),
        with_arg(
            build_request(
                "sbx-ok",
                &m.dockerfile(
                    "ARG TOKEN\nRUN echo ok > /ok && cat /proc/self/uid_map > /uid_map && \
                     echo \"$TOKEN\" > /token && sleep 9\n",
                ),
                "",
            ),
            "TOKEN",
            ARG_VALUE,
        ),
        // A build arg buildah itself would read from its environment is refused.
        with_arg(
            build_request("sbx-ld", &m.dockerfile("RUN true\n"), ""),
            "LD_PRELOAD",
            "/tmp/evil.so",
        ),
    ];
    for request in &requests {
        m.mesh.submit(request).await;
    }
    let reach_online = build_request(
        "sbx-online",
        &m.dockerfile(&format!(
            "RUN nc -w 3 127.0.0.1 {} </dev/null\n",
            online.addr.port()
        )),
        "",
    );
    m.mesh.submit_as(ONLINE, &reach_online).await;

    // While the ordinary build's RUN step sleeps: its build arg is on no command line, and its
    // auth file is root's alone, in a directory only root may enter.
    eventually(WAIT, "the ordinary build's RUN step to run", || async {
        running_cmdline("sleep\u{0}9\u{0}").then_some(())
    })
    .await;
    assert!(
        !running_cmdline(ARG_VALUE),
        "a build arg's value is on a command line"
    );
    let auth = auth_files(m.storage.path());
    assert!(!auth.is_empty(), "no build's auth file found");
    for file in &auth {
        let meta = std::fs::metadata(file).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.uid()), (0o600, 0), "{file:?}");
        let private = std::fs::metadata(file.parent().unwrap()).unwrap();
        assert_eq!(private.mode() & 0o777, 0o700, "{file:?}");
    }

    // No network: the server on loopback saw nothing, and the failure says why.
    let message = m.failed("sbx-net").await;
    assert!(message.contains("Connection refused"), "{message}");
    assert!(message.contains("no network"), "{message}");
    assert_eq!(
        local.accepted(),
        0,
        "a RUN step reached the loopback server"
    );

    // The auth file is nowhere in the step's view.
    let message = m.failed("sbx-auth").await;
    assert!(message.contains("can't open"), "{message}");
    assert!(message.contains("exit status 1"), "{message}");

    // Nothing written outside the step's root filesystem.
    let message = m.failed("sbx-write").await;
    assert!(message.contains("can't create"), "{message}");
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "a RUN step wrote to the host"
    );
    assert!(!m.storage.path().join("escaped").exists());

    // The builder is not among the processes the step sees.
    let message = m.failed("sbx-signal").await;
    assert!(message.contains("No such process"), "{message}");

    // An ordinary RUN step builds, as a host user far from root, into an image owned by root.
    let events = m.mesh.wait_terminal("sbx-ok", WAIT).await;
    assert_succeeded(&events);
    let image = PulledImage::pull(
        m.mesh.registry.addr(),
        &format!("imagemesh/builds/{DEFAULT_TENANT}:img-sbx-ok"),
        REGISTRY_USER,
        REGISTRY_PASSWORD,
    );
    let root = image.rootfs();
    assert_eq!(std::fs::read_to_string(root.join("ok")).unwrap(), "ok\n");
    assert_eq!(std::fs::metadata(root.join("ok")).unwrap().uid(), 0);
    let uid_map = std::fs::read_to_string(root.join("uid_map")).unwrap();
    let fields: Vec<u64> = uid_map
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    assert_eq!(fields.len(), 3, "one mapping: {uid_map}");
    assert_eq!(fields[0], 0, "{uid_map}");
    assert!(
        fields[1] >= 2_147_483_647,
        "mapped to a high host id: {uid_map}"
    );
    assert_eq!(fields[2], 65_536, "{uid_map}");
    let token = std::fs::read_to_string(root.join("token")).unwrap();
    assert_eq!(
        token,
        format!("{ARG_VALUE}\n"),
        "the build arg reached the step"
    );
    // ...but not the image's history, which anyone who may pull the image reads.
    let history = image.config["history"].to_string();
    assert!(!history.contains(ARG_VALUE), "{history}");
    assert!(history.contains("TOKEN=<redacted>"), "{history}");

    let events = m.mesh.wait_terminal("sbx-ld", WAIT).await;
    let refused = assert_failed(&events, "builder", ErrorCode::MalformedRequest);
    assert!(
        refused.message.contains("LD_PRELOAD is reserved"),
        "{}",
        refused.message
    );
    assert!(
        !events.iter().any(|e| e.phase == "building"),
        "{}",
        describe(&events)
    );

    // The opted-in tenant's step reached its server.
    let events = m.mesh.wait_terminal_of(ONLINE, "sbx-online", WAIT).await;
    assert_succeeded(&events);
    assert!(online.accepted() >= 1, "{}", describe(&events));

    assert_build_args_scrubbed(&m).await;
    eventually(
        Duration::from_secs(10),
        "build directories to be removed",
        || async {
            let left = std::fs::read_dir(m.storage.path()).unwrap().count();
            (left == 0).then_some(())
        },
    )
    .await;
    let auth = base64::engine::general_purpose::STANDARD
        .encode(format!("{REGISTRY_USER}:{REGISTRY_PASSWORD}"));
    let ids = [
        "sbx-net",
        "sbx-auth",
        "sbx-write",
        "sbx-signal",
        "sbx-ok",
        "sbx-ld",
    ];
    m.mesh
        .assert_no_secret_leaked(&ids, &[REGISTRY_PASSWORD, &auth, ARG_VALUE])
        .await;
    assert!(
        !m.builder.logs().contains(ARG_VALUE),
        "build arg in the log"
    );
}

/// The failed build's dead letter keeps the build arg's name and loses its value.
async fn assert_build_args_scrubbed(m: &SandboxMesh) {
    let letters = m.mesh.dead_letters().await;
    let letter = letters
        .iter()
        .find(|l| l.request_id == "sbx-net" && l.service == "builder")
        .expect("sbx-net's dead letter");
    let request = ContainerRequest::decode(letter.payload.as_slice()).unwrap();
    let args = &request.build_options.unwrap().build_args;
    assert_eq!(args.get("SECRET_ARG").map(String::as_str), Some(""));
    for letter in &letters {
        let bytes = letter.encode_to_vec();
        assert!(!String::from_utf8_lossy(&bytes).contains(ARG_VALUE));
    }
}

/// Pids of the processes whose command line holds `needle`.
fn pids_running(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(needle)
                .then_some(pid)
        })
        .collect()
}

#[tokio::test]
async fn run_steps_of_a_killed_builder_are_removed_when_it_starts_again() {
    let mut m = SandboxMesh::start().await;
    let sleep = "sleep\u{0}977\u{0}";
    m.mesh
        .submit(&build_request(
            "sbx-orphan",
            &m.dockerfile("RUN sleep 977\n"),
            "",
        ))
        .await;
    let first = eventually(WAIT, "the RUN step to run", || async {
        Some(pids_running(sleep)).filter(|p| !p.is_empty())
    })
    .await;
    // Killed outright, the builder cannot remove the step: its processes outlive it.
    m.builder.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pids_running(sleep),
        first,
        "the step runs on without its builder"
    );

    // The new builder removes the dead one's directory and, first, the containers in it.
    m.builder.restart();
    wait_for_service(&m.mesh.client, "builder", Duration::from_secs(20)).await;
    eventually(
        Duration::from_secs(20),
        "the dead builder's RUN step to be gone",
        || async { (!pids_running(sleep).iter().any(|p| first.contains(p))).then_some(()) },
    )
    .await;

    // The redelivered build runs its step again; a builder stopped at shutdown removes it too.
    eventually(WAIT, "the redelivered build's RUN step to run", || async {
        (!pids_running(sleep).is_empty()).then_some(())
    })
    .await;
    let _ = m.builder.terminate();
    eventually(
        Duration::from_secs(20),
        "the RUN step of a builder stopped at shutdown to be gone",
        || async { pids_running(sleep).is_empty().then_some(()) },
    )
    .await;
}
