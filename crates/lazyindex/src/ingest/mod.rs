//! One-pass layer ingest: [`index_layer`] inflates (or passes through) a layer blob while walking
//! its tar stream, so the file table, checkpoints, span digests, layer digest and diff-id all come
//! out of a single read of the blob.

mod gzip;
mod plain;
mod tar;
mod tar_entry;

use std::io::{self, Read};

use crate::checkpoint::Checkpoint;
use crate::model::{Compression, LayerIndex};
use crate::{Error, Result};

/// How to index a layer. `Default` gives the documented defaults.
#[derive(Clone, Debug)]
pub struct IndexOptions {
    /// Uncompressed bytes between checkpoints (default 4 MiB; at least 32 KiB).
    pub span_size: u64,
    /// Blobs smaller than this (compressed) keep no checkpoints: a read fetches the whole blob
    /// (default 10 MiB).
    pub checkpoint_threshold: u64,
    /// The blob's compression; `None` detects it from the gzip magic bytes.
    pub compression: Option<Compression>,
    /// Keep character/block device entries (default true); when false they are dropped with a
    /// warning.
    pub allow_devices: bool,
    pub limits: Limits,
}

/// Bounds that keep a hostile layer from exhausting memory.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest PAX or GNU long-name/long-link record accepted (default 1 MiB); larger is an error.
    pub max_metadata_size: u64,
    /// Longest path or link target kept (default 4096, PATH_MAX); longer entries are dropped.
    pub max_path_len: usize,
    /// Largest single xattr value kept (default 64 KiB, XATTR_SIZE_MAX); larger ones are dropped.
    pub max_xattr_value: usize,
    /// Most entries per layer (default 4 Mi); more is an error.
    pub max_entries: usize,
    /// Most bytes of paths, link targets and xattrs kept per layer (default 256 MiB); more is an
    /// error. Bounds index memory where `max_entries × max_path_len` alone would not.
    pub max_metadata_total: u64,
    /// Most bytes of PAX / GNU long-name / long-link records pending for one entry, summed over
    /// the consecutive records before it (default 4 MiB); more is an error.
    pub max_pending_metadata: u64,
    /// Most consecutive extension records (PAX, PAX global, GNU long name / long link) before a
    /// real entry (default 64); more is an error.
    pub max_extension_records: u32,
    /// Most uncompressed bytes a layer may inflate to (default 64 GiB); decoding stops as soon
    /// as it is crossed and the layer is an error. Also bounds any one entry's declared size.
    pub max_uncompressed_size: u64,
    /// Most uncompressed bytes per compressed byte (default 250), checked as the layer inflates
    /// once its output passes [`RATIO_CHECK_FLOOR`]; a gzip bomb stops there. 0 disables it.
    pub max_compression_ratio: u64,
}

/// Uncompressed bytes after which [`Limits::max_compression_ratio`] is enforced: a small layer
/// of zeros is harmless whatever its ratio.
pub const RATIO_CHECK_FLOOR: u64 = 64 << 20;

/// Smallest span accepted; smaller ones would make the window dominate the index.
pub const MIN_SPAN_SIZE: u64 = 32 * 1024;

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            span_size: 1 << 20,
            checkpoint_threshold: 10 << 20,
            compression: None,
            allow_devices: true,
            limits: Limits::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_metadata_size: 1 << 20,
            max_path_len: 4096,
            max_xattr_value: 64 << 10,
            max_entries: 4 << 20,
            max_metadata_total: 256 << 20,
            max_pending_metadata: 4 << 20,
            max_extension_records: 64,
            max_uncompressed_size: 64 << 30,
            max_compression_ratio: 250,
        }
    }
}

/// Indexes one layer blob read from `blob` (gzip or plain tar) in a single streaming pass.
///
/// The whole blob is consumed, including anything after the tar end-of-archive marker, so the
/// digest and diff-id cover every byte. Unsafe entries are dropped with a `tracing` warning;
/// corrupt input is an [`Error`], never a panic.
pub fn index_layer(blob: impl Read, options: &IndexOptions) -> Result<LayerIndex> {
    let span = options.span_size.max(MIN_SPAN_SIZE);
    let (compression, blob) = match options.compression {
        Some(c) => (c, Prefixed::new(Vec::new(), blob)),
        None => detect(blob)?,
    };
    let mut stream: Box<dyn Chunks + '_> = match compression {
        Compression::Gzip => Box::new(gzip::GzipStream::new(blob, span, &options.limits)?),
        Compression::None => Box::new(plain::PlainStream::new(
            blob,
            span,
            options.limits.max_uncompressed_size,
        )),
    };
    let entries = tar::walk(&mut *stream, options)?;
    let mut summary = stream.finish()?;
    if summary.compressed_size < options.checkpoint_threshold {
        // Small blob: one span, the whole blob, whose digest is the blob digest.
        summary.checkpoints.truncate(1);
        summary.checkpoints[0].span_digest = summary.digest;
    }
    Ok(LayerIndex {
        digest: crate::digest_string(&summary.digest),
        diff_id: crate::digest_string(&summary.diff_id),
        compression,
        compressed_size: summary.compressed_size,
        uncompressed_size: summary.uncompressed_size,
        checkpoints: summary.checkpoints,
        entries,
    })
}

/// A source of uncompressed tar bytes (like `BufRead`, but with the crate's typed errors).
pub(crate) trait Chunks {
    /// The next buffered bytes; empty at the end of the stream.
    fn fill(&mut self) -> Result<&[u8]>;
    fn consume(&mut self, n: usize);
    /// Drains the rest of the blob and returns what the pass measured.
    fn finish(self: Box<Self>) -> Result<Summary>;
}

pub(crate) struct Summary {
    pub digest: [u8; 32],
    pub diff_id: [u8; 32],
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub checkpoints: Vec<Checkpoint>,
}

/// Reads at least one byte unless at end of input, retrying interrupted reads.
pub(crate) fn read_some(src: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    loop {
        match src.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Io(e)),
        }
    }
}

/// Peeks at the first two bytes: `1f 8b` is gzip, anything else is treated as plain tar.
fn detect<R: Read>(mut blob: R) -> Result<(Compression, Prefixed<R>)> {
    let mut head = Vec::with_capacity(2);
    (&mut blob).take(2).read_to_end(&mut head)?;
    let compression = if head == [0x1f, 0x8b] {
        Compression::Gzip
    } else {
        Compression::None
    };
    Ok((compression, Prefixed::new(head, blob)))
}

/// A reader that yields `head` and then `rest`, without `Chain`'s double indirection per read.
struct Prefixed<R> {
    head: Vec<u8>,
    at: usize,
    rest: R,
}

impl<R> Prefixed<R> {
    fn new(head: Vec<u8>, rest: R) -> Self {
        Prefixed { head, at: 0, rest }
    }
}

impl<R: Read> Read for Prefixed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at < self.head.len() {
            let n = self.head.len().saturating_sub(self.at).min(buf.len());
            buf[..n].copy_from_slice(&self.head[self.at..self.at + n]);
            self.at += n;
            return Ok(n);
        }
        self.rest.read(buf)
    }
}
