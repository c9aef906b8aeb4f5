//! Lazy reads over any blob store: [`LazyReader`] turns `read(path, offset, len)` into one range
//! request for the compressed bytes between the surrounding checkpoints, verifies them and
//! inflates. It counts what it fetched so callers can report `--stats`.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::merge::MergedTree;
use crate::model::ImageIndex;
use crate::{Error, Result, SourceError};

/// Where layer blobs come from (a registry with HTTP range requests, a local OCI layout, ...).
///
/// Returning `impl Future + Send` keeps implementations usable from any async runtime; from
/// blocking code (a FUSE thread, `spawn_blocking`) drive it with the runtime's `block_on`.
pub trait BlobSource: Send + Sync {
    /// Returns exactly the bytes `range` of the blob `digest` (`sha256:<hex>`).
    fn read_range(
        &self,
        digest: &str,
        range: Range<u64>,
    ) -> impl Future<Output = Result<Bytes, SourceError>> + Send;
}

impl<T: BlobSource> BlobSource for Arc<T> {
    fn read_range(
        &self,
        digest: &str,
        range: Range<u64>,
    ) -> impl Future<Output = Result<Bytes, SourceError>> + Send {
        (**self).read_range(digest, range)
    }
}

/// Counters since the reader was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Range requests made (one per read that needed data).
    pub requests: u64,
    /// Compressed bytes fetched from the source.
    pub compressed_bytes_fetched: u64,
    /// Uncompressed bytes handed back to callers.
    pub bytes_returned: u64,
}

/// Serves file reads of one image from its index and a [`BlobSource`].
pub struct LazyReader<S> {
    image: Arc<ImageIndex>,
    tree: MergedTree,
    source: S,
    requests: AtomicU64,
    fetched: AtomicU64,
    returned: AtomicU64,
}

impl<S: BlobSource> LazyReader<S> {
    /// Merges the image's layers and prepares to read through `source`.
    pub fn new(image: impl Into<Arc<ImageIndex>>, source: S) -> Self {
        let image = image.into();
        let tree = MergedTree::from_layers(&image.layers);
        LazyReader {
            image,
            tree,
            source,
            requests: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            returned: AtomicU64::new(0),
        }
    }

    pub fn image(&self) -> &ImageIndex {
        &self.image
    }

    pub fn tree(&self) -> &MergedTree {
        &self.tree
    }

    /// Reads up to `len` bytes of `path` from `offset` (short at end of file, like `pread`).
    pub async fn read(&self, path: &str, offset: u64, len: u64) -> Result<Bytes> {
        let entry = self
            .tree
            .get(path)
            .ok_or_else(|| Error::NotFound(path.to_string()))?;
        let data = entry
            .data
            .ok_or_else(|| Error::NotAFile(path.to_string()))?;
        let start = offset.min(entry.size);
        let end = offset.saturating_add(len).min(entry.size);
        if start == end {
            return Ok(Bytes::new());
        }
        self.read_layer(data.layer, data.offset + start..data.offset + end)
            .await
    }

    /// Reads an uncompressed byte range of layer `layer` (bottom = 0) with one range request.
    pub async fn read_layer(&self, layer: usize, range: Range<u64>) -> Result<Bytes> {
        let index = self
            .image
            .layers
            .get(layer)
            .ok_or_else(|| Error::NotFound(format!("layer {layer}")))?;
        let plan = index.plan_read(range)?;
        let fetched = self
            .source
            .read_range(&index.digest, plan.fetch.clone())
            .await
            .map_err(Error::Source)?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.fetched
            .fetch_add(fetched.len() as u64, Ordering::Relaxed);
        let out = index.decode_read(&plan, &fetched)?;
        self.returned.fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(Bytes::from(out))
    }

    pub fn stats(&self) -> ReadStats {
        ReadStats {
            requests: self.requests.load(Ordering::Relaxed),
            compressed_bytes_fetched: self.fetched.load(Ordering::Relaxed),
            bytes_returned: self.returned.load(Ordering::Relaxed),
        }
    }
}

/// Blobs held in memory, keyed by digest (tests, small tools).
#[derive(Clone, Debug, Default)]
pub struct MemorySource {
    blobs: HashMap<String, Bytes>,
}

impl MemorySource {
    pub fn insert(&mut self, digest: impl Into<String>, blob: impl Into<Bytes>) {
        self.blobs.insert(digest.into(), blob.into());
    }
}

impl BlobSource for MemorySource {
    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Bytes, SourceError> {
        let blob = self.blobs.get(digest).ok_or("no such blob")?;
        let (start, end) = (range.start as usize, range.end as usize);
        if start > end || end > blob.len() {
            return Err("range beyond the blob".into());
        }
        Ok(blob.slice(start..end))
    }
}

/// Blobs of a local OCI image layout (`<root>/blobs/sha256/<hex>`), read with blocking file I/O:
/// meant for tests and CLI use, not for an async server's hot path.
#[derive(Clone, Debug)]
pub struct OciLayoutSource {
    root: PathBuf,
}

impl OciLayoutSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        OciLayoutSource { root: root.into() }
    }

    /// The blob's file, refusing digests that could name anything outside `blobs/`.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, SourceError> {
        let (alg, hex) = digest.split_once(':').ok_or("digest without algorithm")?;
        let clean = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
        if !clean(alg) || !clean(hex) {
            return Err("malformed digest".into());
        }
        Ok(self.root.join("blobs").join(alg).join(hex))
    }
}

impl BlobSource for OciLayoutSource {
    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Bytes, SourceError> {
        let mut file = File::open(self.blob_path(digest)?)?;
        file.seek(SeekFrom::Start(range.start))?;
        let len = range.end.checked_sub(range.start).ok_or("inverted range")?;
        let mut buf = Vec::with_capacity(len.min(64 << 20) as usize);
        file.take(len).read_to_end(&mut buf)?;
        if buf.len() as u64 != len {
            return Err("range beyond the blob".into());
        }
        Ok(Bytes::from(buf))
    }
}
