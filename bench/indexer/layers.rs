//! The benchmark image: one gzip layer per source directory, built from files on the machine.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A built layer blob.
pub struct Layer {
    /// The directory it was made from.
    pub source: String,
    pub path: PathBuf,
}

/// Where layers are built: `BENCH_DIR` (kept, and reused by later runs) or a temp dir.
pub enum WorkDir {
    Kept(PathBuf),
    Temp(tempfile::TempDir),
}

impl WorkDir {
    pub fn path(&self) -> &Path {
        match self {
            WorkDir::Kept(path) => path,
            WorkDir::Temp(dir) => dir.path(),
        }
    }
}

pub fn work_dir() -> anyhow::Result<WorkDir> {
    match std::env::var_os("BENCH_DIR") {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            Ok(WorkDir::Kept(dir.into()))
        }
        None => Ok(WorkDir::Temp(
            tempfile::Builder::new()
                .prefix("bench-indexer-")
                .tempdir()?,
        )),
    }
}

fn sources() -> Vec<String> {
    std::env::var("BENCH_SOURCES")
        .unwrap_or_else(|_| "/usr/share:/usr/bin:/usr/lib".into())
        .split(':')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Apparent size of a directory tree (what its tar roughly holds).
fn apparent_size(dir: &str) -> anyhow::Result<u64> {
    let out = Command::new("du").args(["-sb", dir]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let size = text.split_whitespace().next().unwrap_or("0").parse()?;
    Ok(size)
}

/// Builds layers until their uncompressed size reaches `min_bytes`.
pub fn build(dir: &Path, min_bytes: u64) -> anyhow::Result<Vec<Layer>> {
    let mut layers = Vec::new();
    let mut total = 0;
    for source in sources() {
        if total >= min_bytes {
            break;
        }
        let name = source.trim_matches('/').replace('/', "-");
        let path = dir.join(format!("{name}.tar.gz"));
        if !path.exists() {
            eprintln!("building a layer from {source} (tar | gzip -6) ...");
            let tmp = dir.join(format!("{name}.tar.gz.partial"));
            let rel = source.trim_start_matches('/');
            // tar warns (and exits 1) about files that change while read; the layer is still a
            // valid archive of what it read, which is all the benchmark needs.
            let script = format!(
                "tar -cf - -C / '{rel}' 2>/dev/null | gzip -6 > '{}'",
                tmp.display()
            );
            let status = Command::new("sh").args(["-c", &script]).status()?;
            anyhow::ensure!(status.success(), "building the layer from {source} failed");
            std::fs::rename(&tmp, &path)?;
        }
        total += apparent_size(&source)?;
        layers.push(Layer { source, path });
    }
    anyhow::ensure!(
        total >= min_bytes,
        "the sources hold only {} MB; set BENCH_SOURCES",
        total >> 20
    );
    Ok(layers)
}
