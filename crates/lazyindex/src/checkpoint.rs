//! Checkpoints: places in a layer blob where inflation can start without reading what came
//! before, and the compressed history window that makes that possible.

use std::io::{Read, Write};

use bytes::Bytes;

use crate::model::Window;
use crate::zran::WINDOW_SIZE;
use crate::{Error, Result};

/// How to start decoding at a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointKind {
    /// Uncompressed tar: the bytes at `compressed_offset` are the output.
    Plain,
    /// The start of a gzip member: parse its header, no history needed.
    Member,
    /// A deflate block boundary inside a member: raw inflate, primed with the leftover bits of
    /// the byte at `compressed_offset` and preset with the window.
    Block,
}

/// A resume point. `bit_offset` counts the low bits of the byte at `compressed_offset` that
/// belong to the previous block (0–7); decoding starts with the remaining `8 - bit_offset` bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub kind: CheckpointKind,
    pub compressed_offset: u64,
    pub bit_offset: u8,
    pub uncompressed_offset: u64,
    /// The 32 KiB of output before this point (`Block` only; empty otherwise).
    pub window: Window,
    /// sha256 of this checkpoint's span of compressed bytes ([`crate::LayerIndex::span_range`]).
    pub span_digest: [u8; 32],
}

impl Checkpoint {
    /// A checkpoint that needs no history: the blob start or a member start.
    pub(crate) fn aligned(kind: CheckpointKind, compressed: u64, uncompressed: u64) -> Self {
        Checkpoint {
            kind,
            compressed_offset: compressed,
            bit_offset: 0,
            uncompressed_offset: uncompressed,
            window: Window::default(),
            span_digest: [0; 32],
        }
    }

    /// sha256 of everything that decides what reading from this checkpoint yields: where it is,
    /// how to start, its window and the digest its span's bytes must have. Bytes verified and
    /// decoded through this checkpoint are what any index with an equal identity would produce,
    /// so a cache may share them under it; an index that names the same layer digest with
    /// another window or span digest gets another identity, and never another's bytes.
    pub fn identity(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let kind = match self.kind {
            CheckpointKind::Plain => 0u8,
            CheckpointKind::Member => 1,
            CheckpointKind::Block => 2,
        };
        let mut hash = Sha256::new();
        hash.update([kind, self.bit_offset]);
        hash.update(self.compressed_offset.to_le_bytes());
        hash.update(self.uncompressed_offset.to_le_bytes());
        // The window by its digest: the same whether its bytes are in memory or fetched later.
        hash.update(self.window.len.to_le_bytes());
        hash.update(self.window.digest);
        hash.update(self.span_digest);
        hash.finalize().into()
    }
}

impl Window {
    /// Compresses a history window. Text windows shrink 3–5×; random data stays ~32 KiB.
    pub(crate) fn compress(raw: &[u8]) -> Self {
        debug_assert!(raw.len() <= WINDOW_SIZE);
        let mut enc = flate2::write::DeflateEncoder::new(
            Vec::with_capacity(raw.len() / 2),
            flate2::Compression::default(),
        );
        // Writing to a Vec cannot fail.
        enc.write_all(raw).expect("in-memory deflate");
        let compressed = enc.finish().expect("in-memory deflate");
        Window {
            len: raw.len() as u32,
            digest: sha256(&compressed),
            compressed: Bytes::from(compressed),
        }
    }

    /// Inflates the window, refusing anything that is not exactly `len` bytes.
    pub(crate) fn decompress(&self) -> Result<Vec<u8>> {
        inflate_window(self.len, &self.compressed)
    }
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).into()
}

/// Inflates a compressed window, refusing anything that is not exactly `len` bytes.
pub(crate) fn inflate_window(len: u32, compressed: &[u8]) -> Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(len as usize);
    let dec = flate2::read::DeflateDecoder::new(compressed);
    // One byte more than allowed so an over-long window is detected, not silently cut.
    dec.take(WINDOW_SIZE as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::invalid(format!("window does not inflate: {e}")))?;
    if out.len() != len as usize {
        return Err(Error::invalid("window length mismatch"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_round_trips_and_rejects_wrong_length() {
        let raw: Vec<u8> = b"the quick brown fox ".repeat(1700)[..WINDOW_SIZE].to_vec();
        let w = Window::compress(&raw);
        assert!(w.compressed.len() < raw.len() / 4);
        assert_eq!(w.decompress().unwrap(), raw);
        let bad = Window {
            len: 10,
            ..w.clone()
        };
        assert!(bad.decompress().is_err());
    }
}
