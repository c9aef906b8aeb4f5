//! Layer indexing against `tar -tzf` and `gzip -dc > /dev/null` on the same layers, in the
//! same run, alternating round by round so machine noise hits all alike.
//!
//! The image is built from files already on the machine: one gzip layer per source directory
//! (default `/usr/share`, `/usr/bin`, then `/usr/lib`) until the uncompressed size reaches
//! `BENCH_MIN_MB`. Each round times, over all layers:
//!
//! - `tar -tzf LAYER > /dev/null`: listing, the baseline the issue sets (goal: index ≤ 1.0×);
//! - `gzip -dc LAYER > /dev/null`: inflating only, the floor for any one-pass indexer;
//! - `index_layer` from the file: inflate + tar walk + checkpoints + three sha256s;
//! - `index_layer` through a real registry: the indexer service's path (HTTP body stream →
//!   `SyncIoBridge` → `index_layer` on the blocking pool).
//!
//! Prints medians, ratios and index size / image size. Environment: `BENCH_ROUNDS` (3),
//! `BENCH_MIN_MB` (800), `BENCH_DIR` (a temp dir; layers built there are reused when it is
//! given and already holds them), `BENCH_SOURCES` (colon-separated directories).
#![forbid(unsafe_code)]

mod layers;
mod registry;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use imagemesh_bench::env_number;
use imagemesh_lazyindex::{ImageIndex, IndexOptions, LayerIndex, encode_image, index_layer};

/// One measured tool: how long each round took over all layers.
struct Series {
    name: &'static str,
    rounds: Vec<Duration>,
}

impl Series {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            rounds: Vec::new(),
        }
    }

    fn median(&self) -> f64 {
        let mut secs: Vec<f64> = self.rounds.iter().map(Duration::as_secs_f64).collect();
        secs.sort_by(f64::total_cmp);
        secs[secs.len() / 2]
    }
}

/// Runs `sh -c script` with stdout to /dev/null and fails on a non-zero exit.
fn shell(script: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let status = Command::new("sh")
        .args(["-c", script])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "`{script}` failed: {status}");
    Ok(start.elapsed())
}

fn time_all(
    layers: &[std::path::PathBuf],
    mut one: impl FnMut(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for layer in layers {
        one(layer)?;
    }
    Ok(start.elapsed())
}

fn index_file(path: &Path) -> anyhow::Result<LayerIndex> {
    Ok(index_layer(
        std::fs::File::open(path)?,
        &IndexOptions::default(),
    )?)
}

fn main() -> anyhow::Result<()> {
    let rounds = env_number::<u64>("BENCH_ROUNDS", 3).max(1);
    let min_bytes = env_number::<u64>("BENCH_MIN_MB", 800) << 20;
    let work = layers::work_dir()?;
    let built = layers::build(work.path(), min_bytes)?;
    let paths: Vec<_> = built.iter().map(|l| l.path.clone()).collect();
    let served = registry::Served::start(&paths)?;

    let mut tar = Series::new("tar -tzf");
    let mut gzip = Series::new("gzip -dc");
    let mut index = Series::new("index_layer (file)");
    let mut remote = Series::new("index_layer (registry)");
    let mut indexes = Vec::new();
    for round in 1..=rounds {
        let q = |p: &Path| format!("'{}'", p.display());
        tar.rounds.push(time_all(&paths, |p| {
            shell(&format!("tar -tzf {} >/dev/null", q(p))).map(drop)
        })?);
        gzip.rounds.push(time_all(&paths, |p| {
            shell(&format!("gzip -dc {} >/dev/null", q(p))).map(drop)
        })?);
        indexes.clear();
        index.rounds.push(time_all(&paths, |p| {
            indexes.push(index_file(p)?);
            Ok(())
        })?);
        remote.rounds.push(served.index_all()?);
        eprintln!("round {round}/{rounds} done");
    }
    report(&built, &indexes, &[&tar, &gzip, &index, &remote]);
    Ok(())
}

fn report(built: &[layers::Layer], indexes: &[LayerIndex], series: &[&Series]) {
    let compressed: u64 = indexes.iter().map(|l| l.compressed_size).sum();
    let uncompressed: u64 = indexes.iter().map(|l| l.uncompressed_size).sum();
    let entries: usize = indexes.iter().map(|l| l.entries.len()).sum();
    let image = ImageIndex {
        manifest_digest: None,
        layers: indexes.to_vec(),
        remote_windows: None,
    };
    let index_bytes = encode_image(&image).len();
    println!(
        "image: {} layers from {}",
        built.len(),
        built
            .iter()
            .map(|l| l.source.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "       {:.1} MB uncompressed, {:.1} MB gzip, {entries} entries, {} checkpoints",
        uncompressed as f64 / 1e6,
        compressed as f64 / 1e6,
        indexes.iter().map(|l| l.checkpoints.len()).sum::<usize>()
    );
    let tar = series[0].median();
    let gzip = series[1].median();
    println!(
        "\n{:<24} {:>10} {:>12} {:>12} {:>10}",
        "median of rounds", "seconds", "vs tar -tzf", "vs gzip -dc", "MB/s out"
    );
    for s in series {
        let m = s.median();
        println!(
            "{:<24} {m:>10.2} {:>11.2}x {:>11.2}x {:>10.0}",
            s.name,
            m / tar,
            m / gzip,
            uncompressed as f64 / 1e6 / m
        );
    }
    println!(
        "\nindex size: {index_bytes} B = {:.3}% of the uncompressed image ({:.3}% of the gzip layers)",
        100.0 * index_bytes as f64 / uncompressed as f64,
        100.0 * index_bytes as f64 / compressed as f64
    );
    let json = serde_json::json!({
        "uncompressed_bytes": uncompressed,
        "compressed_bytes": compressed,
        "index_bytes": index_bytes,
        "index_ratio": index_bytes as f64 / uncompressed as f64,
        "median_seconds": series.iter().map(|s| (s.name, s.median())).collect::<std::collections::BTreeMap<_, _>>(),
        "index_vs_tar": series[2].median() / tar,
        "index_vs_gzip": series[2].median() / gzip,
        "registry_index_vs_tar": series[3].median() / tar,
    });
    println!("{json}");
}
