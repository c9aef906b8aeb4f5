//! The builder end to end, against real buildah, skopeo, registry and NATS: Dockerfile builds
//! from a busybox base in the build registry, pushed with the request's token and pulled back;
//! source-image copies; idempotent rebuilds (by content: the same image id from another
//! Dockerfile, context or build args is built again); failures of every kind with the builder's error
//! text; cleanup of every build directory; the `imagemesh build` CLI.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use imagemesh_proto::v1::{ErrorCode, ImageRecord, RequestState, StatusEvent};
use imagemesh_proto::{DEFAULT_TENANT, RequestKey};
use imagemesh_runtime::streams::{self, StreamOptions, image_key};
use imagemesh_runtime::subjects;
use imagemesh_testkit::images::{PulledImage, push_busybox};
use imagemesh_testkit::{ServiceProcess, eventually, wait_for_service};
use imagemesh_tests::{
    BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER, assert_succeeded,
    build_request, describe, find,
};
use prost::Message;
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(120);
const BASE: &str = "base/busybox:1";

/// A mesh whose builder runs with its own storage directory and settings.
struct BuildMesh {
    mesh: Mesh,
    builder: ServiceProcess,
    storage: TempDir,
}

impl BuildMesh {
    async fn start(env: &[(&str, &str)]) -> Self {
        let options = MeshOptions {
            build_registry_auth: BuildRegistryAuth::Basic,
            start: vec!["credential", "scheduler", "indexer"],
            ..Default::default()
        };
        let mut mesh = Mesh::start(options).await;
        let storage = tempfile::tempdir().unwrap();
        let dir = storage.path().to_str().unwrap().to_string();
        let mut all_env = vec![("IMAGEMESH_BUILDER__STORAGE_DIR", dir.as_str())];
        all_env.extend_from_slice(env);
        let config = mesh.config("builder");
        let builder = mesh.spawn_with_config("builder", &config, &all_env).await;
        wait_for_service(&mesh.client, "builder", Duration::from_secs(20)).await;
        push_busybox(mesh.registry.addr(), BASE, REGISTRY_USER, REGISTRY_PASSWORD);
        Self {
            mesh,
            builder,
            storage,
        }
    }

    fn base(&self) -> String {
        format!("{}/{BASE}", self.mesh.registry.addr())
    }

    /// Uploads a context holding `files` as object `name`.
    async fn upload(&self, name: &str, files: &[(&str, &[u8])]) {
        self.mesh.upload_context(name, files).await;
    }

    /// Waits until the builder handed the request on or it failed.
    async fn wait_builder(&self, id: &str) -> Vec<StatusEvent> {
        eventually(WAIT, &format!("builder to finish {id}"), || async {
            let events = self.mesh.events(id).await;
            let done = events.iter().any(|e| {
                (e.service == "builder" && e.phase == "index-requested")
                    || e.state() == RequestState::Failed
            });
            done.then_some(events)
        })
        .await
    }

    fn pull(&self, image_id: &str) -> PulledImage {
        let reference = format!("imagemesh/builds/{DEFAULT_TENANT}:{image_id}");
        PulledImage::pull(
            self.mesh.registry.addr(),
            &reference,
            REGISTRY_USER,
            REGISTRY_PASSWORD,
        )
    }

    /// Every build directory is gone.
    async fn assert_cleaned_up(&self) {
        eventually(
            Duration::from_secs(10),
            "build directories to be removed",
            || async {
                let left: Vec<_> = std::fs::read_dir(self.storage.path())
                    .unwrap()
                    .flatten()
                    .collect();
                left.is_empty().then_some(())
            },
        )
        .await;
    }

    async fn assert_no_secret_leaked(&self, ids: &[&str]) {
        self.mesh
            .assert_no_secret_leaked(ids, &[REGISTRY_PASSWORD])
            .await;
        assert!(
            !self.builder.logs().contains(REGISTRY_PASSWORD),
            "password in builder log"
        );
    }
}

fn failed(events: &[StatusEvent]) -> &StatusEvent {
    let last = imagemesh_tests::terminal(events);
    assert_eq!(last.state(), RequestState::Failed, "{}", describe(events));
    assert_eq!(last.service, "builder", "{}", describe(events));
    last
}

fn env_of(config: &serde_json::Value) -> Vec<String> {
    config["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn read(root: &Path, path: &str) -> String {
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test]
async fn dockerfile_builds_run_at_once_are_pushed_with_the_token_recorded_and_indexed() {
    let m = BuildMesh::start(&[]).await;
    let base = m.base();
    let mut log = m
        .mesh
        .client
        .subscribe(subjects::build_log(RequestKey::new(DEFAULT_TENANT, "df-a")))
        .await
        .unwrap();
    let ids = ["df-a", "df-b", "df-c"];
    let mut requests = Vec::new();
    for id in ids {
        m.upload(
            &format!("ctx-{id}"),
            &[("greeting.txt", format!("hello from {id}\n").as_bytes())],
        )
        .await;
        let dockerfile = format!(
            "FROM {base}\nARG FLAVOUR\nENV GREETING=hi-{id} FLAVOUR=$FLAVOUR\nCOPY greeting.txt /app/greeting.txt\n\
             RUN echo \"built $FLAVOUR\" > /app/built.txt && cat /app/greeting.txt\n\
             ENTRYPOINT [\"/bin/sh\", \"-c\", \"cat /app/greeting.txt\"]\n"
        );
        let mut request = build_request(id, &dockerfile, &format!("ctx-{id}"));
        let options = request.build_options.as_mut().unwrap();
        options
            .build_args
            .insert("FLAVOUR".into(), format!("flavour-{id}"));
        m.mesh.submit(&request).await;
        requests.push(request);
    }
    let mut digests = Vec::new();
    for id in ids {
        let events = m.mesh.wait_terminal(id, WAIT).await;
        assert_succeeded(&events);
        for phase in [
            "authenticated",
            "context-fetched",
            "building",
            "built",
            "pushed",
            "recorded",
            "index-requested",
        ] {
            assert!(
                find(&events, "builder", phase).is_some(),
                "{id} {phase}: {}",
                describe(&events)
            );
        }
        assert!(
            find(&events, "indexer", "authenticated").is_some(),
            "{}",
            describe(&events)
        );
        let pushed = find(&events, "builder", "pushed").unwrap();
        let image_ref = format!(
            "{}/imagemesh/builds/{DEFAULT_TENANT}:img-{id}",
            m.mesh.registry.addr()
        );
        assert_eq!(pushed.details["image_ref"], image_ref);
        let digest = pushed.details["digest"].clone();

        let image = m.pull(&format!("img-{id}"));
        let env = env_of(&image.config);
        assert!(env.contains(&format!("GREETING=hi-{id}")), "{env:?}");
        assert_eq!(
            image.config["config"]["Entrypoint"],
            serde_json::json!(["/bin/sh", "-c", "cat /app/greeting.txt"])
        );
        // The base layer plus the COPY and RUN layers, all gzip.
        let layers = image.manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 3, "{:?}", image.manifest);
        assert!(
            layers
                .iter()
                .all(|l| l["mediaType"].as_str().unwrap().ends_with("gzip"))
        );
        let root = image.rootfs();
        assert_eq!(
            read(&root, "app/greeting.txt"),
            format!("hello from {id}\n")
        );
        assert_eq!(
            read(&root, "app/built.txt"),
            format!("built flavour-{id}\n")
        );
        assert!(root.join("bin/busybox").exists());

        let js = async_nats::jetstream::new(m.mesh.client.clone());
        let kv = streams::image_refs(&js, &StreamOptions::default())
            .await
            .unwrap();
        let record = ImageRecord::decode(
            kv.get(image_key(DEFAULT_TENANT, &format!("img-{id}")))
                .await
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(record.image_ref, image_ref);
        assert_eq!(record.manifest_digest, digest);
        digests.push(digest);
    }
    digests.dedup();
    assert_eq!(digests.len(), 3, "each build made its own image");

    // The build log of df-a arrived line by line, RUN output included.
    let mut lines = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(500), log.next()).await
    {
        lines.push(String::from_utf8_lossy(&message.payload).into_owned());
    }
    assert!(lines.iter().any(|l| l.starts_with("STEP 1/")), "{lines:?}");
    assert!(lines.iter().any(|l| l == "hello from df-a"), "{lines:?}");

    // The same build of the same image id again: recorded from the same content with the digest
    // the registry serves, so not rebuilt.
    let mut again = requests[0].clone();
    again.request_id = "df-a-again".into();
    m.mesh.submit(&again).await;
    let events = m.wait_builder("df-a-again").await;
    let skipped = find(&events, "builder", "already-built")
        .unwrap_or_else(|| panic!("{}", describe(&events)));
    assert_eq!(skipped.details["digest"], digests[0]);
    assert!(
        find(&events, "builder", "building").is_none(),
        "{}",
        describe(&events)
    );

    m.assert_cleaned_up().await;
    m.assert_no_secret_leaked(&["df-a", "df-b", "df-c", "df-a-again"])
        .await;
}

#[tokio::test]
async fn bad_builds_fail_with_the_builders_error_and_leave_nothing_behind() {
    let m = BuildMesh::start(&[("IMAGEMESH_BUILDER__MAX_CONTEXT_BYTES", "8192")]).await;
    let base = m.base();
    m.upload("small", &[("f.txt", b"x")]).await;
    m.upload("big", &[("big.bin", &[7u8; 20_000])]).await;
    let mut timeout = build_request("slow", &format!("FROM {base}\nRUN sleep 987\n"), "");
    timeout.build_options.as_mut().unwrap().timeout_seconds = 8;
    let requests = [
        build_request(
            "run-fails",
            &format!("FROM {base}\nRUN echo about to fail && exit 3\n"),
            "small",
        ),
        build_request("syntax", "FROMM nothing\nRUN\n", ""),
        build_request(
            "no-base",
            &format!("FROM {}/base/missing:1\n", m.mesh.registry.addr()),
            "",
        ),
        build_request("no-context", &format!("FROM {base}\n"), "never-uploaded"),
        build_request(
            "big-context",
            &format!("FROM {base}\nCOPY big.bin /\n"),
            "big",
        ),
        timeout,
    ];
    for request in &requests {
        m.mesh.submit(request).await;
    }
    // While a build runs (its RUN step is sleeping), no process shows the password: buildah
    // gets it from an auth file, never from its command line.
    eventually(WAIT, "the slow build's RUN step to start", || async {
        running_cmdline("sleep\u{0}987").then_some(())
    })
    .await;
    assert!(
        !running_cmdline(REGISTRY_PASSWORD),
        "the registry password is on a command line"
    );
    let expect = [
        (
            "run-fails",
            ErrorCode::BuildFailed,
            "RUN echo about to fail && exit 3\": exit status 3",
        ),
        ("syntax", ErrorCode::BuildFailed, "no FROM statement found"),
        ("no-base", ErrorCode::BuildFailed, "manifest unknown"),
        (
            "no-context",
            ErrorCode::NotFound,
            "\"never-uploaded\" is not in the imagemesh-contexts-default bucket",
        ),
        (
            "big-context",
            ErrorCode::BuildFailed,
            "larger than the limit of 8192 bytes",
        ),
        (
            "slow",
            ErrorCode::BuildFailed,
            "exceeded its time limit of 8s",
        ),
    ];
    for (id, code, text) in expect {
        let events = m.wait_builder(id).await;
        let last = failed(&events);
        assert_eq!(last.error_code(), code, "{id}: {}", describe(&events));
        assert!(last.message.contains(text), "{id}: {}", last.message);
        assert!(find(&events, "builder", "pushed").is_none());
    }
    let run_fails = m.mesh.events("run-fails").await;
    assert!(
        failed(&run_fails).message.contains("about to fail"),
        "the log tail is in the message"
    );
    let letters = m.mesh.dead_letters().await;
    for (id, ..) in expect {
        assert!(
            letters
                .iter()
                .any(|l| l.request_id == id && l.service == "builder"),
            "{id}"
        );
    }
    // The timed-out build's process group was killed, its RUN step with it.
    assert!(
        !running_cmdline("sleep\u{0}987"),
        "the timed-out RUN step is still running"
    );
    m.assert_cleaned_up().await;
    let ids: Vec<&str> = expect.iter().map(|(id, ..)| *id).collect();
    m.assert_no_secret_leaked(&ids).await;
}

fn running_cmdline(needle: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(needle))
            .unwrap_or(false)
    })
}

#[tokio::test]
async fn a_source_image_is_copied_into_the_build_registry_by_cross_repository_mount() {
    let m = BuildMesh::start(&[]).await;
    let mut request = build_request("copy-1", "", "");
    request.build_options.as_mut().unwrap().source_image = m.base();
    m.mesh.submit(&request).await;
    let events = m.wait_builder("copy-1").await;
    let pushed =
        find(&events, "builder", "pushed").unwrap_or_else(|| panic!("{}", describe(&events)));
    let source = PulledImage::pull(
        m.mesh.registry.addr(),
        BASE,
        REGISTRY_USER,
        REGISTRY_PASSWORD,
    );
    let copy = m.pull("img-copy-1");
    assert_eq!(
        copy.manifest, source.manifest,
        "manifest copied byte for byte"
    );
    assert!(pushed.details["digest"].starts_with("sha256:"));
    assert!(copy.rootfs().join("bin/busybox").exists());
    assert!(
        m.builder.logs().contains("mounted blob"),
        "blobs were mounted, not re-uploaded"
    );
    m.assert_no_secret_leaked(&["copy-1"]).await;
}

#[tokio::test]
async fn the_cli_builds_a_context_shows_the_log_and_prints_the_image_id() {
    let m = BuildMesh::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(context.join("note.txt"), "from the cli\n").unwrap();
    let good = dir.path().join("Dockerfile");
    std::fs::write(
        &good,
        format!(
            "FROM {}\nCOPY note.txt /note.txt\nRUN cat /note.txt\n",
            m.base()
        ),
    )
    .unwrap();
    let bad = dir.path().join("Dockerfile.bad");
    std::fs::write(
        &bad,
        format!("FROM {}\nRUN echo cli-broken && false\n", m.base()),
    )
    .unwrap();

    let cli = |dockerfile: &Path, image_id: &str| {
        let mut command = tokio::process::Command::new(imagemesh_testkit::bin_path("imagemesh"));
        command
            .envs(m.mesh.cli_env())
            .args(["build", "--image-id", image_id, "-f"])
            .arg(dockerfile)
            .arg(&context)
            .args(["--timeout", "2m"]);
        command.output()
    };
    let out = cli(&good, "cli-good").await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cli-good");
    assert!(
        stderr.contains("  | from the cli"),
        "live log shown: {stderr}"
    );
    assert_eq!(
        read(&m.pull("cli-good").rootfs(), "note.txt"),
        "from the cli\n"
    );

    let out = cli(&bad, "cli-bad").await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: build"), "{stderr}");
    assert!(stderr.contains("RUN echo cli-broken && false"), "{stderr}");
    m.assert_cleaned_up().await;
}

/// Build output is bytes: a RUN step printing invalid UTF-8 and a 1 MB line without a newline
/// neither stops the log (which would leave buildah blocked on a full pipe) nor fails the build.
#[tokio::test]
async fn build_output_with_invalid_utf8_and_a_megabyte_line_does_not_break_the_build() {
    let m = BuildMesh::start(&[]).await;
    let id = "noisy";
    let mut log = m
        .mesh
        .client
        .subscribe(subjects::build_log(RequestKey::new(DEFAULT_TENANT, id)))
        .await
        .unwrap();
    let dockerfile = format!(
        "FROM {}\nRUN printf '\\377\\376 bad\\n' && head -c 1000000 /dev/zero | tr '\\0' a && \
         echo && echo after-the-long-line\n",
        m.base()
    );
    let mut request = build_request(id, &dockerfile, "");
    request.build_options.as_mut().unwrap().timeout_seconds = 90;
    m.mesh.submit(&request).await;
    let events = m.mesh.wait_terminal(id, WAIT).await;
    assert_succeeded(&events);
    assert!(
        find(&events, "builder", "pushed").is_some(),
        "{}",
        describe(&events)
    );

    let mut lines = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(500), log.next()).await
    {
        lines.push(String::from_utf8_lossy(&message.payload).into_owned());
    }
    assert!(
        lines.iter().any(|l| l == "\u{fffd}\u{fffd} bad"),
        "invalid UTF-8 replaced: {:?}",
        lines
            .iter()
            .map(|l| &l[..l.len().min(80)])
            .collect::<Vec<_>>()
    );
    let long: Vec<_> = lines
        .iter()
        .filter(|l| !l.is_empty() && l.bytes().all(|b| b == b'a'))
        .collect();
    let total: usize = long.iter().map(|l| l.len()).sum();
    assert_eq!(total, 1_000_000, "the long line arrived whole, in pieces");
    assert!(
        long.iter().all(|l| l.len() <= 16 * 1024),
        "pieces are bounded"
    );
    assert!(lines.iter().any(|l| l == "after-the-long-line"));
    m.assert_cleaned_up().await;
}

/// Idempotency is by content: the same image id from another context, Dockerfile or build arg
/// is built again (and the record replaced); the identical request is not.
#[tokio::test]
async fn a_rebuild_of_an_image_id_from_other_content_builds_again_and_the_same_does_not() {
    let m = BuildMesh::start(&[]).await;
    let dockerfile = |word: &str| {
        format!(
            "FROM {}\nARG FLAVOUR\nCOPY note.txt /note.txt\nRUN echo {word}-$FLAVOUR > /word.txt\n",
            m.base()
        )
    };
    let request = |id: &str, dockerfile: &str, flavour: &str| {
        let mut request = build_request(id, dockerfile, "ctx-rebuild");
        request.image_id = "img-rebuild".into();
        let options = request.build_options.as_mut().unwrap();
        options.build_args.insert("FLAVOUR".into(), flavour.into());
        request
    };
    // (request, note.txt uploaded before it, built again?, /word.txt, /note.txt)
    let steps = [
        (
            request("rb-1", &dockerfile("one"), "x"),
            "note 1\n",
            true,
            "one-x\n",
        ),
        (
            request("rb-same", &dockerfile("one"), "x"),
            "note 1\n",
            false,
            "one-x\n",
        ),
        // The context object replaced with other content under the same name.
        (
            request("rb-ctx", &dockerfile("one"), "x"),
            "note 2\n",
            true,
            "one-x\n",
        ),
        (
            request("rb-df", &dockerfile("two"), "x"),
            "note 2\n",
            true,
            "two-x\n",
        ),
        (
            request("rb-arg", &dockerfile("two"), "y"),
            "note 2\n",
            true,
            "two-y\n",
        ),
        (
            request("rb-same-2", &dockerfile("two"), "y"),
            "note 2\n",
            false,
            "two-y\n",
        ),
    ];
    let mut digests = Vec::new();
    for (request, note, rebuilt, word) in &steps {
        let id = request.request_id.as_str();
        m.upload("ctx-rebuild", &[("note.txt", note.as_bytes())])
            .await;
        m.mesh.submit(request).await;
        let events = m.mesh.wait_terminal(id, WAIT).await;
        assert_succeeded(&events);
        let built = find(&events, "builder", "building").is_some();
        let skipped = find(&events, "builder", "already-built");
        assert_eq!(built, *rebuilt, "{id}: {}", describe(&events));
        assert_eq!(skipped.is_some(), !rebuilt, "{id}: {}", describe(&events));
        let digest = match skipped {
            Some(skipped) => skipped.details["digest"].clone(),
            None => find(&events, "builder", "pushed").unwrap().details["digest"].clone(),
        };
        let image = m.pull("img-rebuild");
        let root = image.rootfs();
        assert_eq!(read(&root, "word.txt"), *word, "{id}");
        assert_eq!(read(&root, "note.txt"), *note, "{id}");
        digests.push(digest);
    }
    assert_eq!(
        digests[0], digests[1],
        "the identical request is the same image"
    );
    assert_eq!(digests[4], digests[5]);
    let mut built: Vec<_> = [0, 2, 3, 4].iter().map(|&i| digests[i].clone()).collect();
    built.sort();
    built.dedup();
    assert_eq!(built.len(), 4, "each change made a new image: {digests:?}");
    m.assert_cleaned_up().await;
}
