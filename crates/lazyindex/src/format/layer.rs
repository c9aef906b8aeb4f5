//! Encoding of one [`LayerIndex`] inside the metadata section, and its strict decoding.
//!
//! Offsets are delta-encoded (checkpoints against the previous checkpoint, file data against the
//! end of the previous file's data) and paths are front-coded against the previous path, which
//! keeps the varints short before zlib even starts.

use bytes::Bytes;

use super::wire::{Reader, Writer};
use crate::checkpoint::sha256;
use crate::checkpoint::{Checkpoint, CheckpointKind};
use crate::model::{Compression, Entry, EntryKind, LayerIndex, Window};
use crate::zran::WINDOW_SIZE;
use crate::{Error, Result};

const HAS_LINK: u8 = 1;
const HAS_DEVICE: u8 = 2;
const HAS_DATA: u8 = 4;
/// Smallest encodings, used to refuse impossible counts before allocating.
const MIN_CHECKPOINT: usize = 1 + 1 + 1 + 1 + 32;
const MIN_ENTRY: usize = 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1;

pub(super) fn write(meta: &mut Writer, windows: &mut Writer, l: &LayerIndex) {
    meta.str(&l.digest);
    meta.str(&l.diff_id);
    meta.u8(match l.compression {
        Compression::None => 0,
        Compression::Gzip => 1,
    });
    meta.varint(l.compressed_size);
    meta.varint(l.uncompressed_size);
    meta.varint(l.checkpoints.len() as u64);
    let (mut c, mut u) = (0, 0);
    for cp in &l.checkpoints {
        write_checkpoint(meta, windows, cp, c, u);
        (c, u) = (cp.compressed_offset, cp.uncompressed_offset);
    }
    meta.varint(l.entries.len() as u64);
    let (mut prev_path, mut prev_end): (&str, u64) = ("", 0);
    for e in &l.entries {
        write_entry(meta, e, prev_path, prev_end);
        prev_path = &e.path;
        if let Some(off) = e.offset {
            prev_end = off + e.size;
        }
    }
}

fn write_checkpoint(meta: &mut Writer, windows: &mut Writer, cp: &Checkpoint, c: u64, u: u64) {
    assert!(
        !cp.window.is_remote(),
        "an index decoded from its head alone cannot be encoded again"
    );
    meta.u8(match cp.kind {
        CheckpointKind::Plain => 0,
        CheckpointKind::Member => 1,
        CheckpointKind::Block => 2,
    });
    meta.varint(cp.compressed_offset - c);
    meta.u8(cp.bit_offset);
    meta.varint(cp.uncompressed_offset - u);
    meta.raw(&cp.span_digest);
    meta.varint(u64::from(cp.window.len));
    meta.varint(cp.window.compressed.len() as u64);
    if !cp.window.compressed.is_empty() {
        meta.raw(&cp.window.digest);
    }
    windows.raw(&cp.window.compressed);
}

/// Where a decode takes the windows from: the windows section itself, or nowhere (a decode of
/// the head alone), noting where each window lies so it can be fetched later.
pub(super) enum Windows<'a> {
    Section(Reader<'a>),
    Remote {
        /// Offset of the next window in the encoded index.
        at: u64,
        /// Per layer, per checkpoint: the window's range in the encoded index.
        ranges: Vec<Vec<std::ops::Range<u64>>>,
    },
}

fn write_entry(meta: &mut Writer, e: &Entry, prev_path: &str, prev_end: u64) {
    let shared = common_prefix(prev_path, &e.path);
    meta.varint(shared as u64);
    meta.str(&e.path[shared..]);
    meta.u8(EntryKind::ALL
        .iter()
        .position(|k| *k == e.kind)
        .expect("known kind") as u8);
    meta.varint(u64::from(e.mode));
    meta.varint(e.uid);
    meta.varint(e.gid);
    meta.zigzag(e.mtime);
    meta.varint(u64::from(e.mtime_nsec));
    let flags = (e.link_target.is_some() as u8 * HAS_LINK)
        | (e.device.is_some() as u8 * HAS_DEVICE)
        | (e.offset.is_some() as u8 * HAS_DATA);
    meta.u8(flags);
    if let Some(t) = &e.link_target {
        meta.str(t);
    }
    if let Some((major, minor)) = e.device {
        meta.varint(u64::from(major));
        meta.varint(u64::from(minor));
    }
    if let Some(off) = e.offset {
        meta.zigzag(off as i64 - prev_end as i64);
        meta.varint(e.size);
    }
    meta.varint(e.xattrs.len() as u64);
    for (k, v) in &e.xattrs {
        meta.str(k);
        meta.bytes(v);
    }
}

/// Longest common prefix that ends on a char boundary of both strings.
fn common_prefix(a: &str, b: &str) -> usize {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    (0..=n).rev().find(|&i| b.is_char_boundary(i)).unwrap_or(0)
}

pub(super) fn read(meta: &mut Reader, windows: &mut Windows) -> Result<LayerIndex> {
    let digest = read_digest(meta)?;
    let diff_id = read_digest(meta)?;
    let compression = match meta.u8()? {
        0 => Compression::None,
        1 => Compression::Gzip,
        _ => return Err(Error::invalid("unknown compression")),
    };
    let compressed_size = meta.varint()?;
    let uncompressed_size = meta.varint()?;
    let n = meta.count(MIN_CHECKPOINT)?;
    if let Windows::Remote { ranges, .. } = windows {
        ranges.push(Vec::with_capacity(n));
    }
    let mut checkpoints = Vec::with_capacity(n);
    for _ in 0..n {
        let prev = checkpoints.last();
        checkpoints.push(read_checkpoint(meta, windows, prev)?);
    }
    let mut layer = LayerIndex {
        digest,
        diff_id,
        compression,
        compressed_size,
        uncompressed_size,
        checkpoints,
        entries: Vec::new(),
    };
    super::layer_check::checkpoints(&layer)?;
    let n = meta.count(MIN_ENTRY)?;
    layer.entries.reserve_exact(n);
    let (mut prev_path, mut prev_end) = (String::new(), 0u64);
    for _ in 0..n {
        let e = read_entry(meta, &prev_path, prev_end, uncompressed_size)?;
        if let Some(off) = e.offset {
            prev_end = off + e.size;
        }
        prev_path.clone_from(&e.path);
        layer.entries.push(e);
    }
    Ok(layer)
}

fn read_digest(meta: &mut Reader) -> Result<String> {
    let s = meta.str()?;
    let hex = s.strip_prefix("sha256:").unwrap_or("");
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(Error::invalid("digest is not sha256:<64 lowercase hex>"));
    }
    Ok(s.to_string())
}

fn read_checkpoint(
    meta: &mut Reader,
    windows: &mut Windows,
    prev: Option<&Checkpoint>,
) -> Result<Checkpoint> {
    let kind = match meta.u8()? {
        0 => CheckpointKind::Plain,
        1 => CheckpointKind::Member,
        2 => CheckpointKind::Block,
        _ => return Err(Error::invalid("unknown checkpoint kind")),
    };
    let (c, u) = prev.map_or((0, 0), |p| (p.compressed_offset, p.uncompressed_offset));
    let overflow = || Error::invalid("checkpoint offset overflows");
    let compressed_offset = c.checked_add(meta.varint()?).ok_or_else(overflow)?;
    let bit_offset = meta.u8()?;
    let uncompressed_offset = u.checked_add(meta.varint()?).ok_or_else(overflow)?;
    let span_digest = meta.array32()?;
    let window_len = meta.u32()?;
    let zlen = meta.varint()?;
    // A deflated 32 KiB window is never much larger than 32 KiB (stored blocks add 5 bytes
    // per 64 KiB); anything bigger is refused before it is read or fetched.
    if window_len as usize > WINDOW_SIZE || zlen > (WINDOW_SIZE + 1024) as u64 {
        return Err(Error::invalid("window too large"));
    }
    let digest = if zlen > 0 { meta.array32()? } else { [0; 32] };
    let compressed = match windows {
        Windows::Section(section) => {
            if zlen > section.remaining() as u64 {
                return Err(Error::invalid("window missing"));
            }
            let bytes = Bytes::copy_from_slice(section.raw(zlen as usize)?);
            if sha256(&bytes) != digest && zlen > 0 {
                return Err(Error::invalid("window does not match its digest"));
            }
            bytes
        }
        Windows::Remote { at, ranges } => {
            let range = *at..*at + zlen;
            *at += zlen;
            ranges.last_mut().expect("pushed per layer").push(range);
            Bytes::new()
        }
    };
    Ok(Checkpoint {
        kind,
        compressed_offset,
        bit_offset,
        uncompressed_offset,
        window: Window {
            len: window_len,
            compressed,
            digest,
        },
        span_digest,
    })
}

fn read_entry(meta: &mut Reader, prev_path: &str, prev_end: u64, size_limit: u64) -> Result<Entry> {
    let shared = meta.varint()?;
    let suffix = meta.str()?;
    let prefix = prev_path
        .get(..usize::try_from(shared).unwrap_or(usize::MAX))
        .ok_or_else(|| Error::invalid("bad path prefix length"))?;
    let path = format!("{prefix}{suffix}");
    let kind = *EntryKind::ALL
        .get(meta.u8()? as usize)
        .ok_or_else(|| Error::invalid("unknown entry kind"))?;
    let mut e = Entry::new(path, kind);
    e.mode = meta.u32()?;
    e.uid = meta.varint()?;
    e.gid = meta.varint()?;
    e.mtime = meta.zigzag()?;
    e.mtime_nsec = meta.u32()?;
    let flags = meta.u8()?;
    if flags & !(HAS_LINK | HAS_DEVICE | HAS_DATA) != 0 {
        return Err(Error::invalid("unknown entry flags"));
    }
    if flags & HAS_LINK != 0 {
        e.link_target = Some(meta.str()?.to_string());
    }
    if flags & HAS_DEVICE != 0 {
        e.device = Some((meta.u32()?, meta.u32()?));
    }
    if flags & HAS_DATA != 0 {
        let offset = (prev_end as i64).checked_add(meta.zigzag()?);
        e.offset = Some(
            offset
                .and_then(|o| u64::try_from(o).ok())
                .unwrap_or(u64::MAX),
        );
        e.size = meta.varint()?;
    }
    let n = meta.count(2)?;
    e.xattrs.reserve_exact(n);
    for _ in 0..n {
        let k = meta.str()?.to_string();
        e.xattrs.push((k, meta.bytes()?.to_vec()));
    }
    super::layer_check::entry(&e, size_limit)?;
    Ok(e)
}
