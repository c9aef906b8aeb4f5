//! Node footprint over a soak: the whole mesh on loopback (real nats-server, docker-registry and
//! the five service binaries of this build), run once per allocator in the same session —
//! glibc's malloc (`IMAGEMESH_MALLOC=system`) and the services' jemalloc — each through:
//!
//! 1. idle: the services started and nothing asked of them (`BENCH_IDLE_S`, 10 s);
//! 2. `BENCH_CYCLES` mount → read → unmount cycles of a small image (busybox, 2 MB), then as
//!    many of a large one (`BENCH_LARGE_MB` of incompressible files, 4 MiB each), `BENCH_AT_ONCE`
//!    (8) at a time, each a runtime request through the scheduler, a read of files through the
//!    FUSE mount and an unmount on the mounter's unmount subject;
//! 3. `BENCH_COPIES` build requests copying an image into the build registry, each indexed;
//! 4. `BENCH_SETTLE_S` (30 s) of nothing.
//!
//! Every `BENCH_SAMPLE_MS` (500) it reads every service's RSS, open descriptors and threads from
//! `/proc/<pid>`. It prints a markdown table (idle RSS, peak, RSS after settling, descriptors and
//! threads over the first and the last hundred cycles) and writes it with an SVG plot of RSS
//! over time to `BENCH_OUT` (default `soak/` next to this binary). Other settings:
//! `BENCH_ALLOCATORS` (`system,jemalloc`), `IMAGEMESH_BIN_DIR` (the service binaries; default
//! this binary's directory, so `cargo build --release --workspace --bins` first).

mod plot;
mod report;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use imagemesh_bench::env_number;
use imagemesh_proto::v1::{BuildOptions, ContainerRequest, RequestKind, RequestState};
use imagemesh_runtime::Rejection;
use imagemesh_runtime::telemetry::process::Footprint;
use imagemesh_testkit::oci_images::OciLayout;
use imagemesh_tests::{
    BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER, SERVICES, describe,
};

const WAIT: Duration = Duration::from_secs(300);

/// What the bench is asked to do.
#[derive(Clone)]
pub struct Settings {
    pub cycles: usize,
    pub at_once: usize,
    pub large_mb: usize,
    pub copies: usize,
    pub idle: Duration,
    pub settle: Duration,
    pub sample: Duration,
}

/// One reading of one service.
#[derive(Clone, Copy)]
pub struct Sample {
    /// Seconds since the mesh started.
    pub t: f64,
    /// Index into [`SERVICES`].
    pub service: usize,
    pub footprint: Footprint,
    /// Mount cycles finished when it was taken.
    pub cycles_done: usize,
}

/// One allocator's run.
pub struct Run {
    pub allocator: String,
    pub samples: Vec<Sample>,
    /// (seconds, what began then).
    pub marks: Vec<(f64, String)>,
    /// The mounter's memory caches once settled (compressed + decoded), bytes.
    pub cache_bytes: u64,
    pub cycles: usize,
    /// (phase, seconds) of the cycle and copy phases.
    pub durations: Vec<(String, f64)>,
}

fn main() -> anyhow::Result<()> {
    if std::env::var_os("IMAGEMESH_BIN_DIR").is_none() {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().expect("binary directory").to_path_buf();
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("IMAGEMESH_BIN_DIR", &dir) };
    }
    let out = std::env::var_os("BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("IMAGEMESH_BIN_DIR").unwrap()).join("soak")
        });
    let settings = Settings {
        cycles: env_number("BENCH_CYCLES", 1000),
        at_once: env_number("BENCH_AT_ONCE", 8usize).max(1),
        large_mb: env_number("BENCH_LARGE_MB", 300),
        copies: env_number("BENCH_COPIES", 50),
        idle: Duration::from_secs(env_number("BENCH_IDLE_S", 10)),
        settle: Duration::from_secs(env_number("BENCH_SETTLE_S", 30)),
        sample: Duration::from_millis(env_number("BENCH_SAMPLE_MS", 500)),
    };
    let allocators = std::env::var("BENCH_ALLOCATORS").unwrap_or_else(|_| "system,jemalloc".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    for allocator in allocators
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        eprintln!("== soak with {allocator}");
        runs.push(runtime.block_on(soak(allocator, &settings))?);
    }
    std::fs::create_dir_all(&out)?;
    let table = report::markdown(&runs, &settings);
    std::fs::write(out.join("soak.md"), &table)?;
    std::fs::write(out.join("soak.svg"), plot::svg(&runs))?;
    println!("{table}");
    eprintln!("wrote {} and soak.svg", out.join("soak.md").display());
    Ok(())
}

async fn soak(allocator: &str, settings: &Settings) -> anyhow::Result<Run> {
    let options = MeshOptions {
        build_registry_auth: BuildRegistryAuth::Basic,
        env: vec![
            ("IMAGEMESH_MALLOC".into(), allocator.into()),
            ("RUST_LOG".into(), "info".into()),
        ],
        ..Default::default()
    };
    let mut mesh = Mesh::start(options).await;
    let started = Instant::now();
    let pids: Vec<u32> = SERVICES
        .iter()
        .map(|s| mesh.service(s).pid().expect("service runs"))
        .collect();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let cycles_done = Arc::new(AtomicUsize::new(0));
    let sampler = tokio::spawn(sample(
        pids,
        started,
        settings.sample,
        samples.clone(),
        cycles_done.clone(),
    ));
    let mut marks = vec![(0.0, "start".to_string())];
    let mark = |marks: &mut Vec<(f64, String)>, what: &str| {
        eprintln!("{:7.1} s  {what}", started.elapsed().as_secs_f64());
        marks.push((started.elapsed().as_secs_f64(), what.to_string()));
    };
    tokio::time::sleep(settings.idle).await;

    mark(&mut marks, "images");
    let registry = mesh.registry.addr().to_string();
    let base = format!("{registry}/base/busybox:1");
    let pushed = "base/busybox:1".to_string();
    tokio::task::spawn_blocking(move || {
        imagemesh_testkit::images::push_busybox(
            &registry,
            &pushed,
            REGISTRY_USER,
            REGISTRY_PASSWORD,
        )
    })
    .await?;
    let small = mesh.push_indexed_image("small").await;
    let large = push_large(&mesh, settings.large_mb).await?;

    let mut durations = Vec::new();
    let mut stats_subject = String::new();
    for (phase, image, read) in [
        ("small", &small, Read::Small),
        ("large", &large, Read::Large),
    ] {
        mark(&mut marks, &format!("{phase} cycles"));
        let begun = Instant::now();
        futures::stream::iter(0..settings.cycles)
            .map(|i| {
                let mesh = &mesh;
                let done = cycles_done.clone();
                async move {
                    let stats = cycle(mesh, image, &format!("{phase}-{i}"), read, i).await;
                    done.fetch_add(1, Ordering::Relaxed);
                    stats
                }
            })
            .buffer_unordered(settings.at_once)
            .collect::<Vec<String>>()
            .await
            .into_iter()
            .for_each(|subject| stats_subject = subject);
        durations.push((format!("{phase} cycles"), begun.elapsed().as_secs_f64()));
    }

    mark(&mut marks, "copies");
    let begun = Instant::now();
    futures::stream::iter(0..settings.copies)
        .map(|i| copy(&mesh, &base, i))
        .buffer_unordered(settings.at_once)
        .collect::<Vec<()>>()
        .await;
    durations.push(("copies".into(), begun.elapsed().as_secs_f64()));

    mark(&mut marks, "settle");
    tokio::time::sleep(settings.settle).await;
    let listing = control(&mesh, &stats_subject, "").await;
    let cache_bytes = listing["compressed_cache"]["bytes"].as_u64().unwrap_or(0)
        + listing["decoded_cache"]["bytes"].as_u64().unwrap_or(0);
    anyhow::ensure!(
        listing["mounts"].as_array().is_some_and(Vec::is_empty),
        "mounts left after the soak: {listing}"
    );
    mark(&mut marks, "end");
    sampler.abort();
    let samples = samples.lock().unwrap().clone();
    drop(mesh);
    Ok(Run {
        allocator: allocator.to_string(),
        samples,
        marks,
        cache_bytes,
        cycles: 2 * settings.cycles,
        durations,
    })
}

async fn sample(
    pids: Vec<u32>,
    started: Instant,
    every: Duration,
    samples: Arc<Mutex<Vec<Sample>>>,
    cycles_done: Arc<AtomicUsize>,
) {
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        let t = started.elapsed().as_secs_f64();
        let done = cycles_done.load(Ordering::Relaxed);
        let mut taken = Vec::new();
        for (service, pid) in pids.iter().enumerate() {
            if let Some(footprint) = Footprint::of_pid(*pid) {
                taken.push(Sample {
                    t,
                    service,
                    footprint,
                    cycles_done: done,
                });
            }
        }
        samples.lock().unwrap().extend(taken);
    }
}

/// The large image: `mb` MiB of incompressible files, 4 MiB each, in one layer, pushed to the
/// default tenant's repository and indexed.
async fn push_large(mesh: &Mesh, mb: usize) -> anyhow::Result<String> {
    let image = format!("{}/imagemesh/builds/default:large", mesh.registry.addr());
    let dest = image.clone();
    tokio::task::spawn_blocking(move || {
        let layout = OciLayout::new();
        let files = layout.scratch("files").join("data");
        std::fs::create_dir_all(&files).expect("files dir");
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for n in 0..mb.div_ceil(4).max(1) {
            let mut bytes = vec![0u8; 4 << 20];
            for chunk in bytes.chunks_mut(8) {
                // xorshift64: fast and incompressible enough for gzip.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
            std::fs::write(files.join(format!("{n:04}.bin")), bytes).expect("write file");
        }
        layout.new_image("large");
        layout.insert("large", &files, "/data");
        layout.push("large", &dest, REGISTRY_USER, REGISTRY_PASSWORD);
    })
    .await?;
    mesh.index_image_as("default", "large", &image).await;
    Ok(image)
}

#[derive(Clone, Copy)]
enum Read {
    /// `/bin/busybox`, whole.
    Small,
    /// Two of the 4 MiB files, whole, picked by the cycle's number.
    Large,
}

/// One mount → read → unmount through the mesh; returns the mounter's stats subject.
async fn cycle(mesh: &Mesh, image: &str, id: &str, read: Read, n: usize) -> String {
    let request = ContainerRequest {
        request_id: id.into(),
        container_id: id.into(),
        kind: RequestKind::Runtime as i32,
        image_ref: image.into(),
        ..Default::default()
    };
    mesh.submit(&request).await;
    let events = mesh.wait_terminal(id, WAIT).await;
    let mounted = events
        .iter()
        .find(|e| e.service == "mounter" && e.phase == "mounted")
        .unwrap_or_else(|| panic!("{id} not mounted:\n{}", describe(&events)));
    let root = PathBuf::from(&mounted.details["mountpoint"]);
    let unmount = mounted.details["unmount_subject"].clone();
    let bytes = tokio::task::spawn_blocking(move || {
        let paths: Vec<PathBuf> = match read {
            Read::Small => vec![root.join("bin/busybox")],
            Read::Large => {
                let mut names: Vec<_> = std::fs::read_dir(root.join("data"))
                    .expect("read /data")
                    .map(|e| e.expect("entry").path())
                    .collect();
                names.sort();
                let count = names.len();
                vec![names[n % count].clone(), names[(n * 7 + 3) % count].clone()]
            }
        };
        paths
            .iter()
            .map(|p| {
                std::fs::read(p)
                    .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
                    .len()
            })
            .sum::<usize>()
    })
    .await
    .expect("read task");
    assert!(bytes > 0);
    control(mesh, &unmount, id).await;
    mounted.details["stats_subject"].clone()
}

/// A build request copying `source` into the build registry; waits until it is indexed.
async fn copy(mesh: &Mesh, source: &str, n: usize) {
    let id = format!("copy-{n}");
    let request = ContainerRequest {
        request_id: id.clone(),
        image_id: format!("copy-{n}"),
        kind: RequestKind::Build as i32,
        build_options: Some(BuildOptions {
            source_image: source.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    mesh.submit(&request).await;
    let events = mesh.wait_terminal(&id, WAIT).await;
    let last = events.last().expect("events");
    if last.state() != RequestState::Succeeded {
        // What the registry said about it, to tell a registry fault from ours.
        for line in mesh.registry.log().lines() {
            if line.contains("level=error") || line.contains("level=warn") {
                eprintln!("registry: {line}");
            }
        }
    }
    assert_eq!(
        last.state(),
        RequestState::Succeeded,
        "{}",
        describe(&events)
    );
}

/// A request to a mounter control subject; panics on a service error.
async fn control(mesh: &Mesh, subject: &str, payload: &str) -> serde_json::Value {
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        mesh.client
            .request(subject.to_string(), payload.to_string().into()),
    )
    .await
    .expect("the mounter answers in time")
    .expect("control request");
    if let Some(rejection) = Rejection::from_headers(reply.headers.as_ref()) {
        panic!("{subject} {payload}: {rejection:?}");
    }
    serde_json::from_slice(&reply.payload).expect("JSON reply")
}
