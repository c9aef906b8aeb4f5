//! Where the compressed bytes of lazy reads come from: the [`BlobSource`] trait, and two
//! sources for tests and tools (blobs in memory, a local OCI layout). The registry source and
//! the caching reader over any source are `imagemesh-lazyimage`'s.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use crate::SourceError;

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
