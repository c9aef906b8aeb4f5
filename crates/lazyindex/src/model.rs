//! The index data model: one [`LayerIndex`] per layer blob (cacheable by its digest, so a shared
//! base layer is indexed once), and an [`ImageIndex`] listing them bottom to top.

use std::fmt;

use bytes::Bytes;

use crate::checkpoint::Checkpoint;

/// What a tar entry is. `Whiteout` and `Opaque` are OCI markers, kept as entries so merging can
/// replay them in tar order; they never appear in a merged tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
    /// `.wh.<name>`: the entry's `path` is the path it removes.
    Whiteout,
    /// `.wh..wh..opq`: the entry's `path` is the directory whose lower contents it hides.
    Opaque,
}

impl EntryKind {
    /// Stable lowercase name, used by the index format and for printing.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Hardlink => "hardlink",
            EntryKind::CharDevice => "char",
            EntryKind::BlockDevice => "block",
            EntryKind::Fifo => "fifo",
            EntryKind::Whiteout => "whiteout",
            EntryKind::Opaque => "opaque",
        }
    }

    pub(crate) const ALL: [EntryKind; 9] = [
        EntryKind::File,
        EntryKind::Dir,
        EntryKind::Symlink,
        EntryKind::Hardlink,
        EntryKind::CharDevice,
        EntryKind::BlockDevice,
        EntryKind::Fifo,
        EntryKind::Whiteout,
        EntryKind::Opaque,
    ];
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One tar entry of one layer, with its path already normalised (relative, no `.`/`..`, no
/// trailing slash; `""` is the root directory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Data size for regular files, 0 otherwise.
    pub size: u64,
    /// Modification time, seconds since the epoch (may be negative) and nanoseconds.
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Symlink target (verbatim) or hardlink target (a normalised path in the image).
    pub link_target: Option<String>,
    /// Extended attributes from PAX `SCHILY.xattr.*` records, in tar order.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// `(major, minor)` for character and block devices.
    pub device: Option<(u32, u32)>,
    /// For regular files: offset of the first data byte in the uncompressed layer stream.
    pub offset: Option<u64>,
}

impl Entry {
    /// A bare entry of `kind` at `path` with zeroed metadata; fill in the rest as needed.
    pub fn new(path: impl Into<String>, kind: EntryKind) -> Self {
        Entry {
            path: path.into(),
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            mtime_nsec: 0,
            link_target: None,
            xattrs: Vec::new(),
            device: None,
            offset: None,
        }
    }
}

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar stream: uncompressed offsets are blob offsets.
    None,
    /// One or more concatenated gzip members.
    Gzip,
}

impl Compression {
    /// Maps an OCI/Docker layer media type; `Err` for compressions we cannot index (zstd).
    pub fn from_media_type(media_type: &str) -> crate::Result<Self> {
        let gzip = media_type.ends_with("+gzip") || media_type.ends_with(".tar.gzip");
        let docker_gzip = media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip";
        if gzip || docker_gzip {
            Ok(Compression::Gzip)
        } else if media_type.ends_with(".tar") || media_type.ends_with(".diff.tar") {
            Ok(Compression::None)
        } else {
            Err(crate::Error::Unsupported(format!(
                "layer media type {media_type}"
            )))
        }
    }
}

/// Everything needed to list and lazily read one layer blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerIndex {
    /// `sha256:<hex>` of the blob as stored (the cache key and the registry blob name).
    pub digest: String,
    /// `sha256:<hex>` of the uncompressed tar stream (the OCI diff-id).
    pub diff_id: String,
    pub compression: Compression,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// Resume points, sorted by offset; the first is always at offset 0. Each carries the digest
    /// of its span of compressed bytes (see [`LayerIndex::span_range`]).
    pub checkpoints: Vec<Checkpoint>,
    /// Entries in tar order (order matters for whiteouts and replacements).
    pub entries: Vec<Entry>,
}

impl LayerIndex {
    /// Compressed byte range whose digest checkpoint `i` records: from its byte to the byte
    /// holding the next checkpoint's first bit (inclusive when that byte is shared), or to the end
    /// of the blob. Adjacent spans therefore overlap by one byte when a checkpoint is mid-byte.
    pub fn span_range(&self, i: usize) -> std::ops::Range<u64> {
        let start = self.checkpoints[i].compressed_offset;
        let end = match self.checkpoints.get(i + 1) {
            Some(next) => next.compressed_offset + u64::from(next.bit_offset > 0),
            None => self.compressed_size,
        };
        start..end
    }
}

/// The index of a whole image: its layers, bottom first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageIndex {
    /// Digest of the image manifest this index describes, if known.
    pub manifest_digest: Option<String>,
    pub layers: Vec<LayerIndex>,
    /// Set when the index was decoded without its windows ([`crate::decode_image_head`]):
    /// where each window lies in the encoded index, to be fetched when a read needs it.
    pub remote_windows: Option<RemoteWindows>,
}

/// Where the windows of an index decoded from its head alone lie in the encoded index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteWindows {
    /// Digest of the encoded index blob (set by the loader, which knows it).
    pub blob: String,
    /// Per layer, per checkpoint: the byte range of its compressed window in the encoded
    /// index (empty for checkpoints without one).
    pub ranges: Vec<Vec<std::ops::Range<u64>>>,
}

/// A 32 KiB deflate history window, stored raw-deflate compressed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// Uncompressed length (≤ 32 KiB; 0 for checkpoints that need no history).
    pub len: u32,
    /// Raw deflate of the window bytes; empty when the index was decoded from its head alone
    /// (the bytes are then fetched by [`RemoteWindows`] and checked against `digest`).
    pub compressed: Bytes,
    /// sha256 of the compressed bytes (zero when there is no window).
    pub digest: [u8; 32],
}

impl Window {
    /// True when the window's bytes are not in memory (and it has some).
    pub fn is_remote(&self) -> bool {
        self.len > 0 && self.compressed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::Compression;

    #[test]
    fn media_types_map_to_compression() {
        let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
        assert_eq!(Compression::from_media_type(gz).unwrap(), Compression::Gzip);
        let docker = "application/vnd.docker.image.rootfs.diff.tar.gzip";
        assert_eq!(
            Compression::from_media_type(docker).unwrap(),
            Compression::Gzip
        );
        let tar = "application/vnd.oci.image.layer.v1.tar";
        assert_eq!(
            Compression::from_media_type(tar).unwrap(),
            Compression::None
        );
        assert!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd").is_err()
        );
    }
}
