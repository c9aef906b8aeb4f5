//! Walks a tar stream header by header, recording entries and the offset of each file's data.
//!
//! Headers and PAX records are decoded by the `tar` crate (`Header`, `PaxExtensions`); the walk
//! itself is ours rather than `tar::Archive` because `Archive` reads PAX and GNU long-name
//! records of any declared size into memory (a gzip bomb could make that gigabytes) and we need
//! to bound them. Semantics follow Go's `archive/tar` (what containerd and umoci use): PAX
//! global headers are ignored, header-only types (links, dirs, devices, fifos) carry no data
//! whatever their size field says, and the first all-zero block ends the archive.

use std::collections::HashMap;

use tar::{EntryType, Header};
use tracing::{debug, warn};

use super::{Chunks, IndexOptions, tar_entry};
use crate::model::{Entry, EntryKind};
use crate::{Error, Result};

const BLOCK: u64 = 512;

/// Extension records that apply to the next real entry.
#[derive(Default)]
pub(super) struct Pending {
    pub pax: HashMap<String, Vec<u8>>,
    pub long_name: Option<Vec<u8>>,
    pub long_link: Option<Vec<u8>>,
    /// Extension records read since the last real entry, and their summed data size.
    pub records: u32,
    pub bytes: u64,
}

struct Walker<'a> {
    src: &'a mut dyn Chunks,
    pos: u64,
    opts: &'a IndexOptions,
    entries: Vec<Entry>,
    /// Bytes of paths, link targets and xattrs kept so far.
    metadata: u64,
}

/// Reads entries until the end-of-archive block (or a clean end of stream).
pub(crate) fn walk(src: &mut dyn Chunks, opts: &IndexOptions) -> Result<Vec<Entry>> {
    let mut w = Walker {
        src,
        pos: 0,
        opts,
        entries: Vec::new(),
        metadata: 0,
    };
    let mut pending = Pending::default();
    let mut block = [0u8; BLOCK as usize];
    while w.read_header(&mut block)? {
        let header = Header::from_byte_slice(&block);
        w.one(header, &mut pending)?;
    }
    Ok(w.entries)
}

impl Walker<'_> {
    /// Reads the next header block; `false` at a clean end (EOF or a zero block).
    fn read_header(&mut self, block: &mut [u8; BLOCK as usize]) -> Result<bool> {
        let got = self.read_into(block)?;
        if got == 0 {
            return Ok(false);
        }
        if got < block.len() {
            return Err(Error::Truncated("tar header"));
        }
        if block.iter().all(|&b| b == 0) {
            return Ok(false);
        }
        verify_checksum(block).map_err(|r| Error::tar(self.pos.saturating_sub(BLOCK), r))?;
        Ok(true)
    }

    fn one(&mut self, header: &Header, pending: &mut Pending) -> Result<()> {
        let at = self.pos.saturating_sub(BLOCK);
        let ty = header.entry_type();
        let mut size = header.entry_size().map_err(|e| Error::tar(at, e))?;
        if is_extension(ty) {
            self.check_size(size)?;
            return self.extension(ty, size, pending);
        }
        let pending = std::mem::take(pending);
        if let Some(v) = pending.pax.get("size") {
            size = parse_num(v).ok_or_else(|| Error::tar(at, "bad PAX size"))?;
        }
        if header_only(ty) {
            size = 0;
        }
        self.check_size(size)?;
        let data_at = self.pos;
        if let Some(entry) = tar_entry::build(header, &pending, data_at, size, self.opts, at)? {
            self.push(entry)?;
        }
        self.skip(size)?;
        self.skip_padding(padding(size))
    }

    /// A declared size (header or PAX) no layer within the limits can hold is refused before
    /// anything is skipped or allocated for it.
    fn check_size(&self, size: u64) -> Result<()> {
        let limit = self.opts.limits.max_uncompressed_size;
        if size > limit {
            return Err(Error::LimitExceeded {
                what: "tar entry size",
                limit,
            });
        }
        Ok(())
    }

    /// Skips the padding after entry data. A stream that ends right after the last entry's data
    /// (no padding, no end-of-archive blocks; umoci 0.4.7 writes such layers) is accepted as Go's
    /// archive/tar accepts it: the next header read then sees a clean end.
    fn skip_padding(&mut self, n: u64) -> Result<()> {
        match self.skip(n) {
            Err(Error::Truncated(_)) if self.src.fill()?.is_empty() => {
                debug!(
                    offset = self.pos,
                    "tar stream ends without padding or end-of-archive"
                );
                Ok(())
            }
            other => other,
        }
    }

    fn push(&mut self, entry: Entry) -> Result<()> {
        let limits = &self.opts.limits;
        if self.entries.len() >= limits.max_entries {
            return Err(Error::LimitExceeded {
                what: "entries per layer",
                limit: limits.max_entries as u64,
            });
        }
        let link = entry.link_target.as_ref().map_or(0, String::len);
        let xattrs = entry.xattrs.iter().fold(0u64, |sum, (k, v)| {
            sum.saturating_add(len64(k.len()).saturating_add(len64(v.len())))
        });
        self.metadata = self
            .metadata
            .saturating_add(len64(entry.path.len()))
            .saturating_add(len64(link))
            .saturating_add(xattrs);
        if self.metadata > limits.max_metadata_total {
            return Err(Error::LimitExceeded {
                what: "entry metadata per layer",
                limit: limits.max_metadata_total,
            });
        }
        self.entries.push(entry);
        Ok(())
    }

    fn extension(&mut self, ty: EntryType, size: u64, pending: &mut Pending) -> Result<()> {
        let at = self.pos.saturating_sub(BLOCK);
        let limits = &self.opts.limits;
        pending.records = pending.records.saturating_add(1);
        if pending.records > limits.max_extension_records {
            return Err(Error::LimitExceeded {
                what: "consecutive PAX/GNU extension records",
                limit: u64::from(limits.max_extension_records),
            });
        }
        if ty == EntryType::XGlobalHeader {
            // Go's reader hands these out as separate headers and containerd ignores them.
            return self.skip(padded(size)?);
        }
        pending.bytes = pending.bytes.saturating_add(size);
        if pending.bytes > limits.max_pending_metadata {
            return Err(Error::LimitExceeded {
                what: "pending PAX/GNU extension data for one entry",
                limit: limits.max_pending_metadata,
            });
        }
        let data = self.read_meta(size)?;
        self.skip_padding(padding(size))?;
        match ty {
            EntryType::XHeader => {
                for ext in tar::PaxExtensions::new(&data) {
                    let ext = ext.map_err(|e| Error::tar(at, format!("bad PAX record: {e}")))?;
                    let key = String::from_utf8_lossy(ext.key_bytes()).into_owned();
                    pending.pax.insert(key, ext.value_bytes().to_vec());
                }
            }
            EntryType::GNULongName => pending.long_name = Some(trim_nul(data)),
            _ => pending.long_link = Some(trim_nul(data)),
        }
        Ok(())
    }

    /// Reads an extension record whole, refusing anything above the metadata limit.
    fn read_meta(&mut self, size: u64) -> Result<Vec<u8>> {
        let limit = self.opts.limits.max_metadata_size;
        if size > limit {
            return Err(Error::LimitExceeded {
                what: "PAX/GNU extension record",
                limit,
            });
        }
        let len = usize::try_from(size).map_err(|_| Error::LimitExceeded {
            what: "PAX/GNU extension record",
            limit,
        })?;
        let mut data = vec![0; len];
        if self.read_into(&mut data)? < data.len() {
            return Err(Error::Truncated("tar extension record"));
        }
        Ok(data)
    }

    fn read_into(&mut self, out: &mut [u8]) -> Result<usize> {
        let mut got = 0;
        while got < out.len() {
            let chunk = self.src.fill()?;
            if chunk.is_empty() {
                break;
            }
            let n = chunk.len().min(out.len() - got);
            out[got..got + n].copy_from_slice(&chunk[..n]);
            self.src.consume(n);
            got += n;
        }
        self.advance(got)?;
        Ok(got)
    }

    /// Skips data without copying it; the bytes still pass through the hashes and inflater.
    fn skip(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            let avail = self.src.fill()?.len();
            if avail == 0 {
                return Err(Error::Truncated("tar entry data"));
            }
            // `step` is at most `avail`, a buffer length, so it fits a usize.
            let step = usize::try_from(n).map_or(avail, |n| n.min(avail));
            self.src.consume(step);
            self.advance(step)?;
            n -= len64(step);
        }
        Ok(())
    }

    /// Moves the uncompressed position on by `n` bytes read.
    fn advance(&mut self, n: usize) -> Result<()> {
        self.pos = self
            .pos
            .checked_add(len64(n))
            .ok_or_else(|| Error::tar(self.pos, "offset overflows"))?;
        Ok(())
    }
}

fn is_extension(ty: EntryType) -> bool {
    matches!(
        ty,
        EntryType::XHeader
            | EntryType::XGlobalHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink
    )
}

/// Types whose data size Go's archive/tar treats as zero regardless of the header.
fn header_only(ty: EntryType) -> bool {
    matches!(
        ty,
        EntryType::Link
            | EntryType::Symlink
            | EntryType::Char
            | EntryType::Block
            | EntryType::Directory
            | EntryType::Fifo
    )
}

/// `size` rounded up to whole blocks; an error where that overflows (a hostile size field).
fn padded(size: u64) -> Result<u64> {
    size.checked_next_multiple_of(BLOCK)
        .ok_or(Error::LimitExceeded {
            what: "tar entry size",
            limit: u64::MAX - BLOCK,
        })
}

/// The padding after `size` bytes of data (never overflows: at most 511).
fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// A buffer length as a u64 (lossless on every supported target).
fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    if let Some(end) = v.iter().position(|&b| b == 0) {
        v.truncate(end);
    }
    v
}

/// Parses a decimal PAX number.
pub(super) fn parse_num(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// The header checksum: the byte sum with the checksum field counted as spaces. Both the
/// unsigned and the historic signed sum are accepted, as Go does.
fn verify_checksum(block: &[u8; BLOCK as usize]) -> std::result::Result<(), String> {
    let header = Header::from_byte_slice(block);
    let want = header
        .cksum()
        .map_err(|e| format!("bad checksum field: {e}"))?;
    let rest = block[..148].iter().chain(&block[156..]);
    let unsigned: u32 = rest.clone().map(|&b| u32::from(b)).sum::<u32>() + 8 * 32;
    let signed: i64 = rest.map(|&b| i64::from(b as i8)).sum::<i64>() + 8 * 32;
    if want == unsigned || i64::from(want) == signed {
        Ok(())
    } else {
        Err("header checksum mismatch".into())
    }
}

pub(super) fn warn_skip(path: &[u8], reason: &str) {
    warn!(path = %String::from_utf8_lossy(path), reason, "tar entry dropped");
}

pub(super) fn kind_of(ty: EntryType) -> Option<EntryKind> {
    Some(match ty {
        EntryType::Regular | EntryType::Continuous => EntryKind::File,
        EntryType::Link => EntryKind::Hardlink,
        EntryType::Symlink => EntryKind::Symlink,
        EntryType::Char => EntryKind::CharDevice,
        EntryType::Block => EntryKind::BlockDevice,
        EntryType::Directory => EntryKind::Dir,
        EntryType::Fifo => EntryKind::Fifo,
        _ => return None,
    })
}
