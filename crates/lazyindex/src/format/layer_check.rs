//! Semantic validation of a decoded layer: a malicious index must not be able to make the reader
//! slice out of bounds, inflate from nonsense positions, or hand out escaping paths.

use crate::checkpoint::{Checkpoint, CheckpointKind};
use crate::model::{Compression, Entry, EntryKind, LayerIndex};
use crate::{Error, Result, path};

/// Longest path accepted from an index (Linux PATH_MAX).
const MAX_PATH: usize = 4096;

pub(super) fn checkpoints(l: &LayerIndex) -> Result<()> {
    let first = l
        .checkpoints
        .first()
        .ok_or_else(|| Error::invalid("no checkpoints"))?;
    let start_kind = match l.compression {
        Compression::None => CheckpointKind::Plain,
        Compression::Gzip => CheckpointKind::Member,
    };
    if first.kind != start_kind || first.compressed_offset != 0 || first.uncompressed_offset != 0 {
        return Err(Error::invalid(
            "first checkpoint is not the start of the blob",
        ));
    }
    if l.compression == Compression::None && l.compressed_size != l.uncompressed_size {
        return Err(Error::invalid("plain layer with differing sizes"));
    }
    for pair in l.checkpoints.windows(2) {
        if pair[1].compressed_offset <= pair[0].compressed_offset
            || pair[1].uncompressed_offset <= pair[0].uncompressed_offset
        {
            return Err(Error::invalid("checkpoints out of order"));
        }
    }
    l.checkpoints.iter().try_for_each(|cp| checkpoint(l, cp))
}

fn checkpoint(l: &LayerIndex, cp: &Checkpoint) -> Result<()> {
    let kind_ok = match cp.kind {
        CheckpointKind::Plain => {
            l.compression == Compression::None && cp.compressed_offset == cp.uncompressed_offset
        }
        CheckpointKind::Member | CheckpointKind::Block => l.compression == Compression::Gzip,
    };
    let has_window =
        cp.window.len > 0 || !cp.window.compressed.is_empty() || cp.window.digest != [0; 32];
    let block = cp.kind == CheckpointKind::Block;
    if !kind_ok || cp.bit_offset > 7 || (!block && (cp.bit_offset > 0 || has_window)) {
        return Err(Error::invalid("inconsistent checkpoint"));
    }
    // Every span is non-empty, except the single span of an empty (zero-byte) tar layer.
    let beyond = cp.compressed_offset >= l.compressed_size && cp.compressed_offset > 0;
    if beyond || cp.uncompressed_offset > l.uncompressed_size {
        return Err(Error::invalid("checkpoint beyond the blob"));
    }
    Ok(())
}

pub(super) fn entry(e: &Entry, uncompressed_size: u64) -> Result<()> {
    if path::normalize(&e.path, MAX_PATH).as_deref() != Ok(e.path.as_str()) {
        return Err(Error::invalid("entry path is not normalised"));
    }
    let linked = matches!(e.kind, EntryKind::Symlink | EntryKind::Hardlink);
    let device = matches!(e.kind, EntryKind::CharDevice | EntryKind::BlockDevice);
    let file = e.kind == EntryKind::File;
    let shape_ok = e.link_target.is_some() == linked
        && e.device.is_some() == device
        && e.offset.is_some() == file
        && (file || e.size == 0)
        && e.mode <= 0o7777
        && e.mtime_nsec < 1_000_000_000;
    if !shape_ok {
        return Err(Error::invalid(format!("inconsistent {} entry", e.kind)));
    }
    if e.path.is_empty() && e.kind != EntryKind::Dir && e.kind != EntryKind::Opaque {
        return Err(Error::invalid("root entry that is not a directory"));
    }
    if let (EntryKind::Hardlink, Some(t)) = (e.kind, &e.link_target)
        && (t.is_empty() || path::normalize(t, MAX_PATH).as_deref() != Ok(t.as_str()))
    {
        return Err(Error::invalid("hardlink target is not a normalised path"));
    }
    if let Some(off) = e.offset
        && off
            .checked_add(e.size)
            .is_none_or(|end| end > uncompressed_size)
    {
        return Err(Error::invalid("file data beyond the layer"));
    }
    if e.xattrs.iter().any(|(k, _)| k.is_empty()) {
        return Err(Error::invalid("empty xattr name"));
    }
    Ok(())
}
