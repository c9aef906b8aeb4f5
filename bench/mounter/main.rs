//! Time from a runtime request to the container's exit over imagemesh's lazy mount, against a
//! full pull of the same image, in one run.
//!
//! Images, built for the bench from real content with buildah (cached between runs in
//! `BENCH_CACHE`, default `mounter-bench/cache/` next to the binaries; the table goes to
//! `mounter-bench/results.md`):
//! - `numpy`: Debian bookworm (minbase) with `python3-numpy`, made by `mmdebstrap` from the
//!   Debian mirror, one layer;
//! - `data`: `numpy` plus a layer of `BENCH_DATA_MB` (300) MiB of incompressible data files
//!   and one small text file.
//!
//! Workloads, each run by the OCI runtime (`BENCH_RUNTIME`, `runc`):
//! - (a) `python3 -c 'import numpy'` on `numpy`;
//! - (b) `cat /data/small.txt` on `data` (also timed to the first byte of that file);
//! - (c) `find /usr -type f | wc -l` on `numpy`.
//!
//! Baseline: `skopeo copy` of the image to an OCI layout, `umoci unpack`, the same runtime on the
//! unpacked bundle (its args replaced by the workload's). imagemesh: a runtime request through
//! the scheduler with the workload as its args, the `mounted` event, the runtime on the bundle
//! the mounter prepared; with a cold node cache (emptied, mounter restarted), a warm one
//! (mounter restarted, disk cache kept), both with recorded prefetch off, and with a cold node
//! cache and recorded prefetch (the image's first run recorded the list). Every image is read through a proxy in front of the
//! registry that counts the bytes it sends and, for `BENCH_LINKS` other than `loopback`, paces
//! them to that many Mbit/s (default `loopback,1000,100`). Each figure is the median of
//! `BENCH_RUNS` (3) runs; rounds alternate baseline and imagemesh so machine noise hits both.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use imagemesh_bench::env_number;
use imagemesh_proto::v1::{
    AuthScheme, ContainerRequest, IndexRequest, RegistryCredential, RequestKind, RequestState,
    StatusEvent,
};
use imagemesh_runtime::subjects;
use imagemesh_testkit::fault_proxy::FaultProxy;
use imagemesh_testkit::{Registry, RegistryAuth};
use imagemesh_tests::{Mesh, MeshOptions, describe};

const WAIT: Duration = Duration::from_secs(600);
const WORKER_ID: &str = "mounter-bench-1";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    Numpy,
    SmallFile,
    Walk,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::Numpy, Workload::SmallFile, Workload::Walk];

    fn name(self) -> &'static str {
        match self {
            Workload::Numpy => "(a) import numpy",
            Workload::SmallFile => "(b) cat a small file",
            Workload::Walk => "(c) find /usr -type f",
        }
    }

    /// Each workload has an image of its own (the same layers for (a) and (c)): a prefetch
    /// list is recorded per image, by the first workload that runs it.
    fn image(self) -> &'static str {
        match self {
            Workload::Numpy => "bench/numpy:a",
            Workload::SmallFile => "bench/data:b",
            Workload::Walk => "bench/numpy:c",
        }
    }

    fn args(self) -> Vec<String> {
        let args: &[&str] = match self {
            Workload::Numpy => &[
                "/usr/bin/python3",
                "-c",
                "import numpy; print(numpy.__version__)",
            ],
            Workload::SmallFile => &["/bin/cat", SMALL_FILE],
            Workload::Walk => &["/bin/sh", "-c", "find /usr -type f | wc -l"],
        };
        args.iter().map(|a| a.to_string()).collect()
    }
}

const SMALL_FILE: &str = "/data/small.txt";
const SMALL_TEXT: &str = "a small file among large ones\n";

/// One measured run.
#[derive(Clone, Copy, Default)]
struct Sample {
    /// Request (or pull) to the container's exit.
    to_exit: Duration,
    /// Request (or pull) to the first byte of the small file, read from the root filesystem
    /// before the container runs (workload (b) only).
    to_first_byte: Option<Duration>,
    /// Bytes the registry sent through the proxy.
    fetched: u64,
}

struct Row {
    link: String,
    workload: Workload,
    mode: &'static str,
    samples: Vec<Sample>,
}

fn main() -> anyhow::Result<()> {
    if std::env::var_os("IMAGEMESH_BIN_DIR").is_none() {
        let exe = std::env::current_exe()?;
        // SAFETY: set once at start, before any thread exists.
        unsafe { std::env::set_var("IMAGEMESH_BIN_DIR", exe.parent().unwrap()) };
    }
    let bin_dir = PathBuf::from(std::env::var_os("IMAGEMESH_BIN_DIR").unwrap());
    let cache = std::env::var_os("BENCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir.join("mounter-bench").join("cache"));
    std::fs::create_dir_all(&cache)?;
    let runs: usize = env_number("BENCH_RUNS", 3usize).max(1);
    let data_mb: u64 = env_number("BENCH_DATA_MB", 300);
    let links: Vec<String> = std::env::var("BENCH_LINKS")
        .unwrap_or_else(|_| "loopback,1000,100".into())
        .split(',')
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let runtime_bin = std::env::var("BENCH_RUNTIME").unwrap_or_else(|_| "runc".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let table = runtime.block_on(bench(&cache, runs, data_mb, &links, &runtime_bin))?;
    // Printed first: a table that cannot be written is still seen.
    println!("{table}");
    let out = bin_dir.join("mounter-bench").join("results.md");
    std::fs::create_dir_all(out.parent().expect("a file in a directory"))?;
    std::fs::write(&out, &table)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

async fn bench(
    cache: &Path,
    runs: usize,
    data_mb: u64,
    links: &[String],
    runtime_bin: &str,
) -> anyhow::Result<String> {
    let upstream = Registry::start(RegistryAuth::Open);
    let rootfs = debian_numpy_rootfs(cache)?;
    let data = data_files(cache, data_mb)?;
    let sizes = push_images(upstream.addr(), &rootfs, &data)?;
    eprintln!(
        "images pushed: numpy {:.1} MiB, data {:.1} MiB compressed",
        mib(sizes.0),
        mib(sizes.1)
    );

    let options = MeshOptions {
        start: vec!["credential", "scheduler", "indexer"],
        max_deliver: 5,
        // The tests' debug logging would be part of what is timed.
        env: vec![("RUST_LOG".into(), "info".into())],
        ..Default::default()
    };
    let mut mesh = Mesh::start(options).await;
    mesh.start_instance(
        "mounter",
        "mounter",
        &[("IMAGEMESH_MOUNTER__PLACEMENT__WORKER_ID", WORKER_ID)],
    )
    .await;
    for workload in Workload::ALL {
        index(&mesh, upstream.addr(), workload.image()).await;
    }

    let mut rows = Vec::new();
    let mut serial = 0usize;
    let mut recorded: Vec<&str> = Vec::new();
    for link in links {
        let rate = match link.as_str() {
            "loopback" => None,
            mbit => Some(mbit.parse::<u64>()? * 1_000_000),
        };
        let proxy = FaultProxy::start_limited(upstream.addr(), rate);
        for workload in Workload::ALL {
            let image = format!("{}/{}", proxy.addr(), workload.image());
            let mut baseline = Vec::new();
            let mut cold = Vec::new();
            let mut warm = Vec::new();
            prefetching(&mut mesh, false);
            for run in 0..runs {
                eprintln!("{link} {} run {}", workload.name(), run + 1);
                serial += 1;
                baseline.push(full_pull(&proxy, &image, workload, runtime_bin, serial).await?);
                serial += 1;
                empty_node_cache(&mut mesh).await;
                cold.push(lazy(&mesh, &proxy, &image, workload, runtime_bin, serial, None).await?);
                serial += 1;
                restart_mounter(&mut mesh).await;
                warm.push(lazy(&mesh, &proxy, &image, workload, runtime_bin, serial, None).await?);
            }
            // Recorded prefetch: the image's first run (once, on the first link) records what
            // it reads and publishes the list; every later run, on a cold node, prefetches it.
            prefetching(&mut mesh, true);
            if !recorded.contains(&workload.image()) {
                serial += 1;
                empty_node_cache(&mut mesh).await;
                eprintln!("{link} {} recording its prefetch list", workload.name());
                lazy(
                    &mesh,
                    &proxy,
                    &image,
                    workload,
                    runtime_bin,
                    serial,
                    Some(RECORD_WINDOW),
                )
                .await?;
                recorded.push(workload.image());
            }
            let mut prefetched = Vec::new();
            for run in 0..runs {
                eprintln!("{link} {} with prefetch, run {}", workload.name(), run + 1);
                serial += 1;
                empty_node_cache(&mut mesh).await;
                prefetched
                    .push(lazy(&mesh, &proxy, &image, workload, runtime_bin, serial, None).await?);
            }
            for (mode, samples) in [
                ("full pull + unpack", baseline),
                ("imagemesh, cold node cache", cold),
                ("imagemesh, warm node cache", warm),
                ("imagemesh, cold node cache, recorded prefetch", prefetched),
            ] {
                rows.push(Row {
                    link: link.clone(),
                    workload,
                    mode,
                    samples,
                });
            }
        }
    }
    Ok(report(&rows, runs, sizes, data_mb, runtime_bin))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// A Debian bookworm root filesystem with python3-numpy, as a tar, made once.
fn debian_numpy_rootfs(cache: &Path) -> anyhow::Result<PathBuf> {
    let tar = cache.join("debian-numpy-rootfs.tar");
    if tar.exists() {
        return Ok(tar);
    }
    eprintln!("building the Debian + python3-numpy root filesystem (mmdebstrap)");
    let partial = cache.join("debian-numpy-rootfs.tar.partial");
    run(Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            "--include=python3-numpy",
            "--format=tar",
            "bookworm",
        ])
        .arg(&partial))?;
    std::fs::rename(&partial, &tar)?;
    Ok(tar)
}

/// `data_mb` MiB of incompressible files (4 MiB each) and the small file, made once.
fn data_files(cache: &Path, data_mb: u64) -> anyhow::Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let dir = cache.join(format!("data-{data_mb}"));
    if dir.join("small.txt").exists() {
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // A hash chain: incompressible, and the same bytes every time.
    let mut block = Sha256::digest(b"imagemesh bench data").to_vec();
    for file in 0..data_mb.div_ceil(4) {
        let mut bytes = Vec::with_capacity(4 << 20);
        while bytes.len() < 4 << 20 {
            block = Sha256::digest(&block).to_vec();
            bytes.extend_from_slice(&block);
        }
        std::fs::write(dir.join(format!("blob-{file:04}.bin")), &bytes)?;
    }
    std::fs::write(dir.join("small.txt"), SMALL_TEXT)?;
    Ok(dir)
}

/// Builds both images with buildah and pushes them to `registry`; returns their compressed
/// sizes (the bytes a full pull fetches).
fn push_images(registry: &str, rootfs: &Path, data: &Path) -> anyhow::Result<(u64, u64)> {
    let numpy = "localhost/imagemesh-bench/numpy:1";
    let with_data = "localhost/imagemesh-bench/data:1";
    let ctr = output(Command::new("buildah").args(["from", "scratch"]))?;
    run(Command::new("buildah")
        .args(["add", &ctr])
        .arg(rootfs)
        .arg("/"))?;
    run(Command::new("buildah").args([
        "config",
        "--env",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--cmd",
        "/usr/bin/python3",
        &ctr,
    ]))?;
    run(Command::new("buildah").args(["commit", "--rm", &ctr, numpy]))?;
    let ctr = output(Command::new("buildah").args(["from", numpy]))?;
    run(Command::new("buildah")
        .args(["copy", &ctr])
        .arg(data)
        .arg("/data"))?;
    run(Command::new("buildah").args(["commit", "--rm", &ctr, with_data]))?;
    // (a) and (c) get images of their own (a label apart, the same layers), so each records
    // its own prefetch list.
    let mut sizes = Vec::new();
    for (base, remote) in [
        (numpy, Workload::Numpy.image()),
        (with_data, Workload::SmallFile.image()),
        (numpy, Workload::Walk.image()),
    ] {
        let local = format!("{base}-{}", remote.rsplit(':').next().unwrap_or("x"));
        let ctr = output(Command::new("buildah").args(["from", base]))?;
        run(Command::new("buildah").args([
            "config",
            "--label",
            &format!("imagemesh.bench.image={remote}"),
            &ctr,
        ]))?;
        run(Command::new("buildah").args(["commit", "--rm", &ctr, &local]))?;
        let local = local.as_str();
        run(Command::new("buildah").args([
            "push",
            "--tls-verify=false",
            "--compression-format",
            "gzip",
            local,
            &format!("docker://{registry}/{remote}"),
        ]))?;
        let manifest = output(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{registry}/{remote}"),
        ]))?;
        let manifest: serde_json::Value = serde_json::from_str(&manifest)?;
        let layers: u64 = manifest["layers"]
            .as_array()
            .map(|l| l.iter().filter_map(|l| l["size"].as_u64()).sum())
            .unwrap_or(0);
        sizes.push(layers);
    }
    Ok((sizes[0], sizes[1]))
}

/// Has the indexer index `image` on the open registry.
async fn index(mesh: &Mesh, registry: &str, image: &str) {
    let id = format!("index-{}", image.replace(['/', ':'], "-"));
    let request = IndexRequest {
        request_id: id.clone(),
        tenant: imagemesh_proto::DEFAULT_TENANT.into(),
        image_ref: format!("{registry}/{image}"),
        // The registry is open; the indexer still wants a credential to store with.
        credential: Some(RegistryCredential {
            registry: registry.to_string(),
            scheme: AuthScheme::Basic as i32,
            username: "anyone".into(),
            secret: "unused".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    mesh.publish_work(subjects::INDEX, &request).await;
    let events = mesh.wait_terminal(&id, WAIT).await;
    assert_eq!(
        events.last().map(StatusEvent::state),
        Some(RequestState::Succeeded),
        "indexing {image}: {}",
        describe(&events)
    );
}

/// The baseline: skopeo copy, umoci unpack, the runtime on the unpacked bundle.
async fn full_pull(
    proxy: &FaultProxy,
    image: &str,
    workload: Workload,
    runtime_bin: &str,
    serial: usize,
) -> anyhow::Result<Sample> {
    let dir = tempfile::Builder::new()
        .prefix("imagemesh-bench-pull-")
        .tempdir()?;
    let layout = format!("{}:img", dir.path().join("oci").display());
    let bundle = dir.path().join("bundle");
    let before = proxy.bytes_downstream();
    let started = Instant::now();
    let (image, runtime_bin) = (image.to_string(), runtime_bin.to_string());
    let bundle_dir = bundle.clone();
    let (to_first_byte, to_exit) = tokio::task::spawn_blocking(move || {
        run(Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{image}"),
            &format!("oci:{layout}"),
        ]))?;
        run(Command::new("umoci")
            .args(["unpack", "--image", &layout])
            .arg(&bundle_dir))?;
        let first = (workload == Workload::SmallFile).then(|| {
            read_small_file(&bundle_dir.join("rootfs"));
            started.elapsed()
        });
        let config = bundle_dir.join("config.json");
        let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&config)?)?;
        spec["process"]["args"] = serde_json::json!(workload.args());
        spec["process"]["terminal"] = serde_json::json!(false);
        std::fs::write(&config, serde_json::to_vec(&spec)?)?;
        run_container(
            &runtime_bin,
            &bundle_dir,
            &format!("bench-pull-{serial}"),
            workload,
        )?;
        anyhow::Ok((first, started.elapsed()))
    })
    .await??;
    Ok(Sample {
        to_exit,
        to_first_byte,
        fetched: proxy.bytes_downstream() - before,
    })
}

/// imagemesh: a runtime request with the workload as args, `mounted`, the runtime on the
/// mounter's bundle; then unmounted.
async fn lazy(
    mesh: &Mesh,
    proxy: &FaultProxy,
    image: &str,
    workload: Workload,
    runtime_bin: &str,
    serial: usize,
    linger: Option<Duration>,
) -> anyhow::Result<Sample> {
    let id = format!("bench-{serial}");
    let request = ContainerRequest {
        request_id: id.clone(),
        container_id: id.clone(),
        kind: RequestKind::Runtime as i32,
        image_ref: image.into(),
        args: workload.args(),
        ..Default::default()
    };
    let before = proxy.bytes_downstream();
    let started = Instant::now();
    mesh.submit(&request).await;
    let events = mesh.wait_terminal(&id, WAIT).await;
    let mounted = events
        .iter()
        .find(|e| e.service == "mounter" && e.phase == "mounted")
        .unwrap_or_else(|| panic!("{id} not mounted:\n{}", describe(&events)));
    let bundle = PathBuf::from(&mounted.details["bundle"]);
    let unmount = mounted.details["unmount_subject"].clone();
    let runtime_bin = runtime_bin.to_string();
    let (to_first_byte, to_exit) = tokio::task::spawn_blocking(move || {
        let first = (workload == Workload::SmallFile).then(|| {
            read_small_file(&bundle.join("rootfs"));
            started.elapsed()
        });
        run_container(&runtime_bin, &bundle, &id, workload)?;
        anyhow::Ok((first, started.elapsed()))
    })
    .await??;
    let fetched = proxy.bytes_downstream() - before;
    if let Some(linger) = linger {
        // A recording mount publishes its list when its window closes.
        tokio::time::sleep(linger).await;
    }
    let reply = mesh
        .client
        .request(unmount, request.container_id.clone().into())
        .await?;
    anyhow::ensure!(
        imagemesh_runtime::Rejection::from_headers(reply.headers.as_ref()).is_none(),
        "unmounting {}: {:?}",
        request.container_id,
        reply.headers
    );
    Ok(Sample {
        to_exit,
        to_first_byte,
        fetched,
    })
}

fn read_small_file(rootfs: &Path) {
    let path = rootfs.join(SMALL_FILE.trim_start_matches('/'));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(text, SMALL_TEXT);
}

/// Runs the bundle and checks what the workload printed.
fn run_container(
    runtime_bin: &str,
    bundle: &Path,
    id: &str,
    workload: Workload,
) -> anyhow::Result<()> {
    let out = Command::new(runtime_bin)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "{runtime_bin} run {id}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = match workload {
        Workload::Numpy => stdout.trim().starts_with('1'),
        Workload::SmallFile => stdout == SMALL_TEXT,
        Workload::Walk => stdout.trim().parse::<u64>().is_ok_and(|files| files > 1000),
    };
    anyhow::ensure!(expected, "{id} printed {stdout:?}");
    Ok(())
}

/// How long a recording mount records (`mounter.prefetch.record_window`), plus a second to
/// publish the list.
const RECORD_WINDOW: Duration = Duration::from_secs(6);

/// Turns the mounter's recorded prefetch on or off (recording too), from its next start.
fn prefetching(mesh: &mut Mesh, on: bool) {
    let on = if on { "true" } else { "false" };
    let mounter = mesh.service("mounter");
    mounter.set_env("IMAGEMESH_MOUNTER__PREFETCH__ENABLED", on);
    mounter.set_env("IMAGEMESH_MOUNTER__PREFETCH__RECORD", on);
}

/// A cold node: the mounter stopped, its disk cache emptied, started again.
async fn empty_node_cache(mesh: &mut Mesh) {
    mesh.service("mounter").kill();
    let cache = mesh.node_cache().to_path_buf();
    for entry in std::fs::read_dir(&cache).expect("node cache").flatten() {
        let path = entry.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
    restart_mounter(mesh).await;
}

/// Restarts the mounter (its memory caches go, the disk cache stays) and waits until it serves.
async fn restart_mounter(mesh: &mut Mesh) {
    mesh.service("mounter").restart();
    mesh.wait_mounter_serving(WORKER_ID, WAIT).await;
    // Serving its endpoint is not yet pulling work: wait for its advertisement too.
    tokio::time::sleep(Duration::from_secs(1)).await;
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let out = command.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn output(command: &mut Command) -> anyhow::Result<String> {
    let out = command.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn median_bytes(mut values: Vec<u64>) -> u64 {
    values.sort();
    values[values.len() / 2]
}

fn report(rows: &[Row], runs: usize, sizes: (u64, u64), data_mb: u64, runtime_bin: &str) -> String {
    let mut table = format!(
        "Request to container exit, median of {runs} runs, {runtime_bin}; images: numpy {:.1} MiB, \
         data {:.1} MiB compressed ({data_mb} MiB of data files). Ratios are the full pull's time \
         over this row's, on the same link in the same run.\n\n\
         | link | workload | how | to exit | ×  | first byte of the small file | × | fetched from the registry | of the image |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|\n",
        mib(sizes.0),
        mib(sizes.1)
    );
    let mut baseline = (Duration::ZERO, None);
    for row in rows {
        let exit = median(row.samples.iter().map(|s| s.to_exit).collect());
        let first = row
            .samples
            .iter()
            .map(|s| s.to_first_byte)
            .collect::<Option<Vec<_>>>()
            .map(median);
        if row.mode.starts_with("full pull") {
            baseline = (exit, first);
        }
        let fetched = median_bytes(row.samples.iter().map(|s| s.fetched).collect());
        let image = if row.workload == Workload::SmallFile {
            sizes.1
        } else {
            sizes.0
        };
        let ratio = |ours: Duration, theirs: Duration| theirs.as_secs_f64() / ours.as_secs_f64();
        table.push_str(&format!(
            "| {} | {} | {} | {:.2} s | {:.1} | {} | {} | {:.1} MiB | {:.2} % |\n",
            if row.link == "loopback" {
                "loopback".to_string()
            } else {
                format!("{} Mbit/s", row.link)
            },
            row.workload.name(),
            row.mode,
            exit.as_secs_f64(),
            ratio(exit, baseline.0),
            first.map_or("".into(), |f| format!("{:.3} s", f.as_secs_f64())),
            match (first, baseline.1) {
                (Some(ours), Some(theirs)) => format!("{:.1}", ratio(ours, theirs)),
                _ => String::new(),
            },
            mib(fetched),
            100.0 * fetched as f64 / image as f64,
        ));
    }
    table
}
