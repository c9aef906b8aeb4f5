//! Mounts outlive the mounter: with the mount keeper running, a process reads and verifies
//! every file of a mounted image over and over while the mounter is stopped with SIGTERM three
//! times and killed with SIGKILL three times, each time started again. No read fails, every
//! byte equals `umoci unpack`, reads go on after every restart, and the mount table (the kernel's
//! and the mounter's) is the same afterwards. Two containers of one image, which share its lazy
//! mount, are handed over with it once per restart, and both bundles go on working.

mod indexer_support;
mod mounter_support;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imagemesh_testkit::oci_images::{OciLayout, have_image_tools};
use imagemesh_tests::{BuildRegistryAuth, Mesh, MeshOptions, REGISTRY_PASSWORD, REGISTRY_USER};
use indexer_support::push_and_index_full;
use mounter_support::tree::assert_same_tree;
use mounter_support::{
    WORKER_ID, control, mount_stats, mounted, run, runtime_request, start_mounter,
    wait_until_serving,
};

/// The keeper process of a test, killed when the test ends (passed or not).
struct Keeper {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Keeper {
    fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("imagemesh-keeper-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("run/keeper.sock");
        let log = std::fs::File::create(dir.path().join("keeper.log")).unwrap();
        let child = Command::new(imagemesh_testkit::bin_path("imagemesh-mount-keeper"))
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the mount keeper");
        let keeper = Self {
            child,
            socket,
            _dir: dir,
        };
        for _ in 0..200 {
            if keeper.socket.exists() {
                return keeper;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("the mount keeper did not listen");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("keeper.log")).unwrap_or_default()
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads every file in a loop, dropping each from the page cache after reading it so the next
/// pass goes through FUSE again; counts passes and records every failure.
struct Reader {
    reads: Arc<AtomicU64>,
    /// The longest one file's read took, in microseconds (printed: how long a handover stalls).
    longest_us: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    fn start(mount: PathBuf, expected: BTreeMap<String, Vec<u8>>) -> Self {
        let reads = Arc::new(AtomicU64::new(0));
        let longest_us = Arc::new(AtomicU64::new(0));
        let longest = longest_us.clone();
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, f, s) = (reads.clone(), failures.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (path, bytes) in &expected {
                    if s.load(Ordering::Relaxed) {
                        return;
                    }
                    let started = std::time::Instant::now();
                    let read = read_uncached(&mount.join(&path[1..]));
                    let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    longest.fetch_max(took, Ordering::Relaxed);
                    match read {
                        Ok(ours) if ours == *bytes => {
                            r.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(ours) => f.lock().unwrap().push(format!(
                            "{path}: {} bytes read, {} expected, or other bytes",
                            ours.len(),
                            bytes.len()
                        )),
                        Err(err) => f.lock().unwrap().push(format!("{path}: {err}")),
                    }
                }
            }
        });
        Self {
            reads,
            longest_us,
            failures,
            stop,
            thread: Some(thread),
        }
    }

    fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Waits until `more` reads have succeeded since now.
    async fn wait_for_reads(&self, more: u64) {
        let target = self.reads() + more;
        imagemesh_testkit::eventually(mounter_support::WAIT, "reads to go on", || async {
            (self.reads() >= target || !self.failures.lock().unwrap().is_empty()).then_some(())
        })
        .await;
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the reader thread");
        }
        self.failures.lock().unwrap().clone()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read_uncached(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)?;
    Ok(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_survive_mounter_restarts_and_crashes_without_a_failed_read() {
    assert!(
        have_image_tools(),
        "umoci and skopeo are needed (make deps installs them)"
    );
    let keeper = Keeper::start();
    let options = MeshOptions {
        build_registry_auth: BuildRegistryAuth::Basic,
        start: vec!["credential", "scheduler", "indexer"],
        max_deliver: 3,
        ..Default::default()
    };
    let socket = keeper.socket.display().to_string();
    let mut mesh = start_mounter(
        Mesh::start(options).await,
        &[("IMAGEMESH_MOUNTER__KEEPER_SOCKET", &socket)],
    )
    .await;
    let layout = OciLayout::new();
    let image = push_and_index_full(&mesh, &layout).await;

    mounted(&run(&mesh, &runtime_request("keep-1", "ctr-1", &image)).await);
    let mountpoint = mesh.mount_root().canonicalize().unwrap().join("ctr-1");
    let rootfs = layout.unpack("full", &layout.scratch("unpacked").join("bundle"));
    let files = assert_same_tree(&mountpoint, &rootfs);
    let expected: BTreeMap<String, Vec<u8>> = files
        .iter()
        .map(|(path, _)| {
            (
                path.clone(),
                std::fs::read(rootfs.join(&path[1..])).unwrap(),
            )
        })
        .collect();
    let before = mount_stats(&mesh, "ctr-1").await;
    let file_count = expected.len() as u64;
    let reader = Reader::start(mountpoint.clone(), expected);
    reader.wait_for_reads(file_count).await;

    for round in 0..6 {
        let crash = round >= 3;
        if crash {
            mesh.service("mounter").kill();
        } else {
            assert!(
                mesh.service("mounter").terminate(),
                "a stopped mounter exits cleanly"
            );
        }
        // Reads queue in the kernel meanwhile; the mount stays in the mount table.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(mesh.mounted(), vec![mountpoint.clone()], "round {round}");
        mesh.service("mounter").restart();
        wait_until_serving(&mesh).await;
        // Every file once more through the new process (most of them through FUSE).
        reader.wait_for_reads(file_count).await;
        eprintln!(
            "round {round} ({}): {} reads so far",
            if crash { "SIGKILL" } else { "SIGTERM" },
            reader.reads()
        );
    }
    let reads = reader.reads();
    eprintln!(
        "{reads} reads, the longest {:.3} s",
        reader.longest_us.load(Ordering::Relaxed) as f64 / 1e6
    );
    let failures = reader.finish();
    assert!(
        failures.is_empty(),
        "{} failed reads of {reads}: {failures:#?}",
        failures.len()
    );
    assert!(reads >= 7 * file_count, "{reads} reads");

    // The same mount, served by the last process, taken over six times.
    assert_eq!(mesh.mounted(), vec![mountpoint.clone()]);
    let after = mount_stats(&mesh, "ctr-1").await;
    for field in ["image_digest", "index_digest", "mountpoint", "entries"] {
        assert_eq!(after[field], before[field], "{field}: {after}");
    }
    assert_eq!(after["resumed"], true, "{after}");
    let logs = mesh.service("mounter").logs();
    assert_eq!(
        logs.matches("mount taken over from the earlier process")
            .count(),
        6,
        "one take-over per restart"
    );
    assert!(
        !logs.contains("Reply not sent"),
        "no read was answered with EIO"
    );

    // Unmounting a taken-over mount leaves nothing behind, in the kernel or the keeper.
    let unmount = format!("imagemesh.mounter.{WORKER_ID}.unmount");
    control(&mesh, &unmount, "ctr-1").await.expect("unmount");
    assert!(mesh.mounted().is_empty(), "{:?}", mesh.mounted());
    assert!(!mountpoint.exists());
    imagemesh_testkit::eventually(mounter_support::WAIT, "the keeper to drop it", || async {
        keeper.log().contains("dropped").then_some(())
    })
    .await;
}

/// Runs `bundle` with runc as container `id`; its stdout, on success.
fn runc(bundle: &str, id: &str) -> String {
    let output = Command::new("runc")
        .args(["run", "--bundle", bundle, id])
        .output()
        .expect("runc (make deps installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "runc {id}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_lazy_mount_is_handed_over_once_with_every_containers_bundle() {
    let keeper = Keeper::start();
    let options = MeshOptions {
        build_registry_auth: BuildRegistryAuth::Basic,
        start: vec!["credential", "scheduler", "indexer"],
        max_deliver: 3,
        ..Default::default()
    };
    let socket = keeper.socket.display().to_string();
    let mut mesh = start_mounter(
        Mesh::start(options).await,
        &[("IMAGEMESH_MOUNTER__KEEPER_SOCKET", &socket)],
    )
    .await;
    let registry = mesh.registry.addr().to_string();
    let addr = registry.clone();
    tokio::task::spawn_blocking(move || {
        imagemesh_testkit::images::push_busybox(
            &addr,
            "test/box:1",
            REGISTRY_USER,
            REGISTRY_PASSWORD,
        )
    })
    .await
    .unwrap();
    let image = format!("{registry}/test/box:1");
    let events = indexer_support::index(
        &mesh,
        &indexer_support::request(&mesh, "index-box", "test/box:1"),
    )
    .await;
    assert!(
        events.last().unwrap().state() == imagemesh_proto::v1::RequestState::Succeeded,
        "{}",
        imagemesh_tests::describe(&events)
    );
    let mut bundles = Vec::new();
    for (id, script) in [
        ("ctr-a", "test -e /note || echo a > /note; cat /note"),
        ("ctr-b", "test -e /note && cat /note || echo clean"),
    ] {
        let mut request = runtime_request(&format!("run-{id}"), id, &image);
        request.args = vec!["/bin/sh".into(), "-c".into(), script.into()];
        let done = mounted(&run(&mesh, &request).await).clone();
        bundles.push(mounter_support::detail(&done, "bundle").to_string());
    }
    assert_eq!(runc(&bundles[0], "ctr-a"), "a\n");
    assert_eq!(runc(&bundles[1], "ctr-b"), "clean\n");
    let lazy_of = |listing: &serde_json::Value| listing["lazy_mounts"].clone();
    let stats = format!("imagemesh.mounter.{WORKER_ID}.mounts");
    let before = lazy_of(&control(&mesh, &stats, "").await.unwrap());
    assert_eq!(before.as_array().unwrap().len(), 1, "{before}");
    assert_eq!(
        before[0]["containers"],
        serde_json::json!(["ctr-a", "ctr-b"])
    );

    for round in 0..2 {
        if round == 0 {
            assert!(mesh.service("mounter").terminate(), "clean exit");
        } else {
            mesh.service("mounter").kill();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(mesh.images_mounted().len(), 1, "round {round}");
        assert_eq!(mesh.bundles_mounted().len(), 2, "round {round}");
        mesh.service("mounter").restart();
        wait_until_serving(&mesh).await;
        let after = imagemesh_testkit::eventually(mounter_support::WAIT, "taken over", || async {
            let lazies = lazy_of(&control(&mesh, &stats, "").await.unwrap());
            (lazies.as_array().is_some_and(|l| l.len() == 1)
                && lazies[0]["containers"]
                    .as_array()
                    .is_some_and(|c| c.len() == 2))
            .then_some(lazies)
        })
        .await;
        assert_eq!(after[0]["lazy_mount"], before[0]["lazy_mount"], "{after}");
        assert_eq!(after[0]["resumed"], true, "{after}");
        // Both containers run again from their bundles: A's note is in A's upper only.
        assert_eq!(runc(&bundles[0], "ctr-a"), "a\n", "round {round}");
        assert_eq!(runc(&bundles[1], "ctr-b"), "clean\n", "round {round}");
    }
    let logs = mesh.service("mounter").logs();
    assert_eq!(
        logs.matches("mount taken over from the earlier process")
            .count(),
        4,
        "both containers, each restart"
    );
    assert_eq!(
        logs.matches("lazy mount resumed for its containers")
            .count(),
        2,
        "the shared mount is resumed once per restart"
    );

    let unmount = format!("imagemesh.mounter.{WORKER_ID}.unmount");
    control(&mesh, &unmount, "ctr-a").await.expect("unmount");
    control(&mesh, &unmount, "ctr-b").await.expect("unmount");
    assert!(
        mesh.bundles_mounted().is_empty(),
        "{:?}",
        mesh.bundles_mounted()
    );
    assert!(mesh.mounted().is_empty(), "{:?}", mesh.mounted());
    assert!(
        mesh.images_mounted().is_empty(),
        "{:?}",
        mesh.images_mounted()
    );
    for bundle in &bundles {
        assert!(!Path::new(bundle).exists());
    }
}
