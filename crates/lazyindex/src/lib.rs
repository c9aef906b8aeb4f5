//! Lazy-mount index for OCI images whose layers are plain gzip (or uncompressed) tar blobs.
//!
//! The pieces, bottom up:
//!
//! - [`zran`](crate) (private): the one `unsafe` module, a safe wrapper around zlib-rs that
//!   stops at deflate block boundaries, reads the 32 KiB window and resumes mid-byte.
//! - [`index_layer`]: one streaming pass over a layer blob from any `Read` produces a
//!   [`LayerIndex`]: every tar entry (path, type, mode, owner, size, mtime, link target, xattrs,
//!   data offset), zran [`Checkpoint`]s every `span_size` bytes of output, a sha256 per span of
//!   compressed bytes, the blob digest and the diff-id.
//! - [`MergedTree`]: layers merged the way containerd applies them (whiteouts, opaque
//!   directories, hardlinks, replacements, implicit parents); each path maps to the layer and
//!   offset its bytes come from.
//! - [`encode_layer`] / [`encode_image`] and their `decode_*` twins: the versioned, compact binary
//!   format described in `docs/index-format.md`, validated strictly on decode.
//! - [`LayerIndex::plan_read`] + [`LayerIndex::decode_read`]: the synchronous core of a lazy read
//!   (which compressed range to fetch, then verify and inflate it), and the [`BlobSource`] trait
//!   the compressed bytes come from.
//!
//! Nothing here knows about NATS or registries: the indexer service feeds [`index_layer`] from a
//! registry blob stream; `imagemesh-lazyimage` stores the index next to its image and reads
//! files through it (one caching reader over any [`BlobSource`]).
//!
//! Fuzz targets for [`decode_layer`]/[`decode_image`] and [`index_layer`] live in `fuzz/`
//! (cargo-fuzz, nightly); `tests/fuzz_seeds.rs` runs their seed corpus on stable. The
//! `index_blob` example measures indexing speed and index size on real blobs.
#![deny(unsafe_code)]

mod checkpoint;
mod error;
mod format;
mod ingest;
mod merge;
mod model;
mod path;
mod read;
mod source;
mod zran;

pub use checkpoint::{Checkpoint, CheckpointKind};
pub use error::{Error, Result, SourceError};
pub use format::{
    DecodeLimits, FORMAT_VERSION, HEADER_LEN, MAGIC, decode_image, decode_image_head,
    decode_image_with, decode_layer, decode_layer_with, encode_image, encode_layer, head_len,
};
pub use ingest::{IndexOptions, Limits, MIN_SPAN_SIZE, RATIO_CHECK_FLOOR, index_layer};
pub use merge::{DataRef, MergedEntry, MergedTree};
pub use model::{Compression, Entry, EntryKind, ImageIndex, LayerIndex, RemoteWindows, Window};
pub use read::ReadPlan;
pub use source::{BlobSource, MemorySource, OciLayoutSource};

/// Formats a sha256 as an OCI digest string, `sha256:<64 hex>`.
pub(crate) fn digest_string(d: &[u8; 32]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in d {
        let _ = write!(s, "{b:02x}");
    }
    s
}
