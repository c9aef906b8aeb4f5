//! One trace per ContainerRequest across the mesh, exported over OTLP.
//!
//! Every service and the CLI export to an OTLP receiver the test runs (in-process, over
//! OTLP/HTTP protobuf or OTLP/gRPC) or to an independent one (PyPI `oteltap`). A build request
//! and a runtime request submitted with the CLI must each be one trace: the CLI's span is the
//! root, and every other span's parent is a span of the same trace, across every service the
//! request passes. No attribute may hold a secret.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use imagemesh_testkit::otlp::{OtlpReceiver, ReceivedSpan};
use imagemesh_testkit::{bin_path, eventually};
use imagemesh_tests::{BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER};

const WAIT: Duration = Duration::from_secs(120);

fn otel_env(endpoint: &str, protocol: &str) -> Vec<(String, String)> {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        // Export within a fraction of a second rather than the 5 s default.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Runs the CLI with the mesh's NATS and the given environment; returns its stdout.
async fn cli(mesh: &Mesh, env: &[(String, String)], args: &[&str]) -> String {
    let mut command = Command::new(bin_path("imagemesh"));
    command
        .args(args)
        .envs(mesh.cli_env())
        .envs(env.iter().cloned());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("run imagemesh");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "imagemesh {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The trace id the CLI printed: "submitted request <id> (trace <trace id>)".
fn trace_id(stdout: &str) -> String {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("submitted request"))
        .expect("submit line");
    let start = line.find("(trace ").expect("the CLI prints the trace id") + 7;
    line[start..start + 32].to_string()
}

fn write_dockerfile(dir: &std::path::Path, registry: &str) -> String {
    let path = dir.join("Dockerfile");
    let text = format!(
        "FROM {registry}/base/busybox:1\nENV STAGE=traced\nRUN echo traced > /traced.txt\n"
    );
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// Waits until the trace has spans from every one of `services` and no span waits for its
/// parent (a parent is exported when it ends, after its children), then returns them.
async fn spans_of(receiver: &OtlpReceiver, trace: &str, services: &[&str]) -> Vec<ReceivedSpan> {
    let want: BTreeSet<&str> = services.iter().copied().collect();
    eventually(
        WAIT,
        &format!("a complete trace {trace} with spans of {want:?}"),
        || async {
            let spans: Vec<_> = receiver
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace)
                .collect();
            let seen: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
            let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
            let complete = spans
                .iter()
                .all(|s| s.parent_span_id.is_empty() || ids.contains(s.parent_span_id.as_str()));
            (want.is_subset(&seen) && complete).then_some(spans)
        },
    )
    .await
}

/// One root (the CLI's), every other span's parent in the same trace.
fn assert_one_connected_trace(spans: &[ReceivedSpan]) {
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<_> = spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root span: {roots:#?}");
    assert_eq!(roots[0].service, "imagemesh-cli");
    for span in spans {
        if !span.parent_span_id.is_empty() {
            assert!(
                ids.contains(span.parent_span_id.as_str()),
                "parent of {span:#?} is not in the trace"
            );
        }
    }
}

/// The service of the span that is `span`'s parent.
fn parent_service<'a>(spans: &'a [ReceivedSpan], span: &ReceivedSpan) -> &'a str {
    let by_id: HashMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    by_id[span.parent_span_id.as_str()].service.as_str()
}

fn first<'a>(spans: &'a [ReceivedSpan], service: &str, name_part: &str) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.service == service && s.name.contains(name_part))
        .unwrap_or_else(|| {
            panic!(
                "no {service} span named like {name_part:?} in {:#?}",
                names(spans)
            )
        })
}

fn names(spans: &[ReceivedSpan]) -> Vec<String> {
    spans
        .iter()
        .map(|s| format!("{}: {}", s.service, s.name))
        .collect()
}

fn assert_no_secret_attribute(spans: &[ReceivedSpan]) {
    for span in spans {
        for (key, value) in &span.attributes {
            assert!(
                !value.contains(REGISTRY_PASSWORD),
                "span {} attribute {key} holds the password",
                span.name
            );
        }
    }
}

#[tokio::test]
async fn a_build_and_a_runtime_request_are_each_one_trace_across_the_mesh() {
    let receiver = OtlpReceiver::start();
    let env = otel_env(&receiver.http_endpoint(), "http/protobuf");
    let options = MeshOptions {
        build_registry_auth: BuildRegistryAuth::Basic,
        env: env.clone(),
        ..Default::default()
    };
    let mesh = Mesh::start(options).await;
    let registry = mesh.registry.addr().to_string();
    imagemesh_testkit::images::push_busybox(
        &registry,
        "base/busybox:1",
        REGISTRY_USER,
        REGISTRY_PASSWORD,
    );
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = write_dockerfile(dir.path(), &registry);

    let out = cli(
        &mesh,
        &env,
        &[
            "submit",
            "--kind",
            "build",
            "--image-id",
            "traced",
            "--dockerfile",
            &dockerfile,
            "--watch",
        ],
    )
    .await;
    let build_trace = trace_id(&out);
    let build = spans_of(
        &receiver,
        &build_trace,
        &[
            "imagemesh-cli",
            "scheduler",
            "credential",
            "builder",
            "indexer",
        ],
    )
    .await;
    assert_one_connected_trace(&build);
    // Each hop is a child of the one before it.
    assert_eq!(
        parent_service(
            &build,
            first(&build, "scheduler", "imagemesh.intake.*.* process")
        ),
        "imagemesh-cli"
    );
    let mint = first(&build, "credential", "credential mint");
    assert_eq!(parent_service(&build, mint), "scheduler");
    assert_eq!(
        parent_service(&build, first(&build, "builder", "process")),
        "scheduler"
    );
    assert_eq!(
        parent_service(
            &build,
            first(&build, "indexer", "imagemesh.work.index process")
        ),
        "builder"
    );
    first(&build, "builder", "buildah bud");
    first(&build, "builder", "buildah push");
    let layer = first(&build, "indexer", "index layer");
    assert!(
        layer.attribute("compressed_bytes").is_some() && layer.attribute("cache_hit").is_some()
    );
    assert_eq!(
        first(&build, "scheduler", "process")
            .attribute("request_id")
            .map(str::len),
        Some(36)
    );
    assert_eq!(mint.attribute("registry"), Some(registry.as_str()));
    assert_no_secret_attribute(&build);

    let out = cli(
        &mesh,
        &env,
        &[
            "submit",
            "--kind",
            "runtime",
            "--image-id",
            "traced",
            "--watch",
        ],
    )
    .await;
    let runtime_trace = trace_id(&out);
    assert_ne!(runtime_trace, build_trace);
    let runtime = spans_of(
        &receiver,
        &runtime_trace,
        &["imagemesh-cli", "scheduler", "mounter"],
    )
    .await;
    assert_one_connected_trace(&runtime);
    assert_eq!(
        parent_service(&runtime, first(&runtime, "mounter", "process")),
        "scheduler"
    );
    assert_no_secret_attribute(&runtime);

    // The container's first read from the registry continues the request's trace, next to
    // the steps of the mount: one trace answers "why was this start slow".
    let root = mesh.mount_root().canonicalize().unwrap();
    // The container's mount point (the image's shared lazy mount is under `.images`).
    let mount = std::fs::read_dir(&root)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| !path.ends_with(".images"))
        .expect("the request's mount");
    let read = tokio::task::spawn_blocking(move || std::fs::read(mount.join("bin/busybox")))
        .await
        .unwrap()
        .expect("a file of the mount");
    assert!(!read.is_empty());
    let runtime = eventually(WAIT, "the first registry read in the trace", || async {
        let spans: Vec<_> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == runtime_trace)
            .collect();
        spans
            .iter()
            .any(|s| s.name == "first registry read")
            .then_some(spans)
    })
    .await;
    assert_one_connected_trace(&runtime);
    let first_read = first(&runtime, "mounter", "first registry read");
    assert_eq!(parent_service(&runtime, first_read), "mounter");
    for step in [
        "resolve image",
        "load index",
        "image config",
        "file table",
        "mount",
    ] {
        first(&runtime, "mounter", step);
    }

    // Metrics arrive too.
    eventually(WAIT, "work metrics", || async {
        receiver
            .metric_names()
            .iter()
            .any(|n| n == "imagemesh.requests")
            .then_some(())
    })
    .await;
    // Every service exports its footprint as gauges, and the mounter its caches and indexes.
    let process_gauges = [
        "process.memory.usage",
        "process.open_file_descriptor.count",
        "process.thread.count",
    ];
    let mut wanted: Vec<(&str, &str)> =
        ["credential", "scheduler", "builder", "indexer", "mounter"]
            .iter()
            .flat_map(|service| process_gauges.iter().map(move |gauge| (*service, *gauge)))
            .collect();
    wanted.extend([
        ("mounter", "imagemesh.mounter.cache.compressed"),
        ("mounter", "imagemesh.mounter.cache.decoded"),
        ("mounter", "imagemesh.mounter.index_memory"),
        ("mounter", "imagemesh.mounter.mounts"),
    ]);
    let gauges = eventually(WAIT, "footprint gauges of every service", || async {
        let gauges = receiver.gauges();
        wanted
            .iter()
            .all(|(service, name)| {
                gauges
                    .iter()
                    .any(|g| g.service == *service && g.name == *name)
            })
            .then_some(gauges)
    })
    .await;
    let last = |service: &str, name: &str| {
        gauges
            .iter()
            .rev()
            .find(|g| g.service == service && g.name == name)
            .map(|g| g.value)
            .unwrap()
    };
    for service in ["credential", "scheduler", "builder", "indexer", "mounter"] {
        let rss = last(service, "process.memory.usage");
        assert!(rss > 1e6 && rss < 1e9, "{service} RSS {rss}");
        assert!(last(service, "process.open_file_descriptor.count") >= 3.0);
        assert!(last(service, "process.thread.count") >= 2.0);
    }
    // The runtime request above left its mount: its index is counted.
    eventually(WAIT, "the mount's index in the mounter's gauge", || async {
        receiver
            .gauges()
            .iter()
            .rev()
            .find(|g| g.service == "mounter" && g.name == "imagemesh.mounter.index_memory")
            .is_some_and(|g| g.value > 0.0)
            .then_some(())
    })
    .await;
    mesh.assert_no_secret_leaked(&[], &[REGISTRY_PASSWORD])
        .await;
}

/// A mesh of the credential service and the scheduler exporting as `env` says, and the trace id
/// of a runtime request submitted to it with the CLI (which exports as `env` says too).
async fn submit_traced(env: Vec<(String, String)>) -> (Mesh, String) {
    let options = MeshOptions {
        start: vec!["credential", "scheduler"],
        env: env.clone(),
        ..Default::default()
    };
    let mesh = Mesh::start(options).await;
    let image = format!("{}/imagemesh/builds/default:anything", mesh.registry.addr());
    let out = cli(
        &mesh,
        &env,
        &["submit", "--kind", "runtime", "--image-ref", &image],
    )
    .await;
    let trace = trace_id(&out);
    (mesh, trace)
}

#[tokio::test]
async fn spans_also_travel_over_otlp_grpc() {
    let receiver = OtlpReceiver::start();
    let (_mesh, trace) = submit_traced(otel_env(&receiver.grpc_endpoint(), "grpc")).await;
    let spans = spans_of(
        &receiver,
        &trace,
        &["imagemesh-cli", "scheduler", "credential"],
    )
    .await;
    assert!(spans.iter().all(|s| s.transport == "grpc"));
    assert_one_connected_trace(&spans);
}

#[tokio::test]
async fn an_independent_receiver_gets_the_trace() {
    // oteltap (PyPI) listens for OTLP/HTTP protobuf and prints what it receives as NDJSON.
    let port = imagemesh_testkit::free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    struct Oteltap(std::process::Child);
    impl Drop for Oteltap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _oteltap = Oteltap(
        Command::new("oteltap")
            .args(["--port", &port.to_string()])
            .stdout(log.reopen().unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("oteltap (make deps installs it)"),
    );
    eventually(Duration::from_secs(20), "oteltap to listen", || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    })
    .await;

    let env = otel_env(&format!("http://127.0.0.1:{port}"), "http/protobuf");
    let (_mesh, trace) = submit_traced(env).await;
    // oteltap prints one span per line (without its resource): look for the spans by name.
    eventually(WAIT, "oteltap to print the spans of the trace", || async {
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(&trace)).collect();
        let names = [
            "\"imagemesh submit\"",
            "\"imagemesh.intake.*.* process\"",
            "\"credential mint\"",
        ];
        names
            .iter()
            .all(|n| lines.iter().any(|l| l.contains(n)))
            .then_some(())
    })
    .await;
}
