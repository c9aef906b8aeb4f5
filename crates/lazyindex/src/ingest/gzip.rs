//! Streaming gzip inflation that records zran checkpoints as it goes.
//!
//! [`GzipStream`] hands uncompressed bytes to the tar walker while, in the same pass, it hashes
//! the compressed blob (the layer digest), the uncompressed stream (the diff-id) and each span of
//! compressed bytes between checkpoints, and stops at deflate block boundaries (`Z_BLOCK`) to
//! record a checkpoint once `span_size` bytes of output have passed since the last one.

use std::io::Read;

use sha2::{Digest, Sha256};

use super::{Chunks, Limits, RATIO_CHECK_FLOOR, Summary, read_some};
use crate::checkpoint::{Checkpoint, CheckpointKind};
use crate::model::Window;
use crate::zran::{Inflater, Stop, Wrap};
use crate::{Error, Result};

/// Input and output buffer sizes: large enough that per-call overhead vanishes.
const IN_BUF: usize = 256 * 1024;
const OUT_BUF: usize = 256 * 1024;
/// Consumed input kept across refills: zlib-rs may hold up to 63 unused bits (8 bytes) that a
/// checkpoint's span must still be able to hash.
const KEEP: usize = 16;

pub(crate) struct GzipStream<R> {
    src: R,
    inf: Inflater,
    /// Input buffer: `buf[..filled]` is blob bytes from `buf_base`; zlib has been fed `..fed`.
    buf: Vec<u8>,
    buf_base: u64,
    fed: usize,
    filled: usize,
    out: Vec<u8>,
    out_pos: usize,
    out_len: usize,
    total_out: u64,
    in_member: bool,
    members: u64,
    done: bool,
    blob_hash: Sha256,
    diff_hash: Sha256,
    span_hash: Sha256,
    /// Blob offset up to which `span_hash` has absorbed bytes.
    span_hashed: u64,
    span_size: u64,
    next_due: u64,
    checkpoints: Vec<Checkpoint>,
    window: Vec<u8>,
    /// [`Limits::max_uncompressed_size`] and [`Limits::max_compression_ratio`].
    max_out: u64,
    max_ratio: u64,
}

impl<R: Read> GzipStream<R> {
    pub(crate) fn new(src: R, span_size: u64, limits: &Limits) -> Result<Self> {
        let inf = Inflater::new(Wrap::Gzip).map_err(|e| corrupt(0, e))?;
        Ok(GzipStream {
            src,
            inf,
            buf: vec![0; IN_BUF],
            buf_base: 0,
            fed: 0,
            filled: 0,
            out: vec![0; OUT_BUF],
            out_pos: 0,
            out_len: 0,
            total_out: 0,
            in_member: false,
            members: 0,
            done: false,
            blob_hash: Sha256::new(),
            diff_hash: Sha256::new(),
            span_hash: Sha256::new(),
            span_hashed: 0,
            span_size,
            next_due: span_size,
            checkpoints: vec![Checkpoint::aligned(CheckpointKind::Member, 0, 0)],
            window: Vec::new(),
            max_out: limits.max_uncompressed_size,
            max_ratio: limits.max_compression_ratio,
        })
    }

    /// Inflates until the output buffer is full or the stream is done.
    fn produce(&mut self) -> Result<()> {
        self.out_pos = 0;
        self.out_len = 0;
        while !self.done && self.out_len < self.out.len() {
            if self.fed == self.filled && !self.refill()? {
                return self.end_of_input();
            }
            if !self.in_member {
                self.start_member()?;
            }
            self.step()?;
        }
        Ok(())
    }

    fn step(&mut self) -> Result<()> {
        let input = &self.buf[self.fed..self.filled];
        let step = self
            .inf
            .inflate(input, &mut self.out[self.out_len..], true)
            .map_err(|e| corrupt(self.buf_base + self.fed as u64, e))?;
        let produced = &self.out[self.out_len..self.out_len + step.produced];
        self.diff_hash.update(produced);
        self.fed += step.consumed;
        self.out_len += step.produced;
        self.total_out =
            self.total_out
                .checked_add(step.produced as u64)
                .ok_or(Error::LimitExceeded {
                    what: "uncompressed layer size",
                    limit: u64::MAX,
                })?;
        self.check_limits()?;
        match step.stop {
            Stop::More if step.consumed == 0 && step.produced == 0 => {
                return Err(corrupt(self.pos(), "inflate made no progress"));
            }
            Stop::More => {}
            Stop::Block { unused_bits } if self.total_out >= self.next_due => {
                self.block_checkpoint(unused_bits);
            }
            Stop::Block { .. } => {}
            Stop::End => self.in_member = false,
        }
        Ok(())
    }

    /// Stops a gzip bomb at the step that crosses a limit (at most one output buffer past it),
    /// before the walker sees the bytes and before the rest of the blob is inflated.
    fn check_limits(&self) -> Result<()> {
        if self.total_out > self.max_out {
            return Err(Error::LimitExceeded {
                what: "uncompressed layer size",
                limit: self.max_out,
            });
        }
        if self.max_ratio > 0 && self.total_out > RATIO_CHECK_FLOOR {
            let compressed = self.pos().max(1);
            if self.total_out / compressed > self.max_ratio {
                return Err(Error::LimitExceeded {
                    what: "compression ratio (uncompressed / compressed bytes)",
                    limit: self.max_ratio,
                });
            }
        }
        Ok(())
    }

    fn end_of_input(&mut self) -> Result<()> {
        if self.in_member {
            return Err(Error::Truncated("gzip member ends early"));
        }
        if self.members == 0 {
            return Err(Error::Truncated("empty gzip stream"));
        }
        self.done = true;
        Ok(())
    }

    /// Begins the next gzip member; a member start is a free checkpoint (no window needed).
    fn start_member(&mut self) -> Result<()> {
        if self.members > 0 {
            self.inf
                .reset(Wrap::Gzip)
                .map_err(|e| corrupt(self.pos(), e))?;
            if self.total_out >= self.next_due {
                let at = self.pos();
                self.close_span(at, at);
                let cp = Checkpoint::aligned(CheckpointKind::Member, at, self.total_out);
                self.push(cp);
            }
        }
        self.members += 1;
        self.in_member = true;
        Ok(())
    }

    fn block_checkpoint(&mut self, unused_bits: u32) {
        let bit_pos = self.pos() * 8 - u64::from(unused_bits);
        let (byte, bit) = (bit_pos / 8, (bit_pos % 8) as u8);
        self.close_span(byte + u64::from(bit > 0), byte);
        self.inf.window(&mut self.window);
        let cp = Checkpoint {
            kind: CheckpointKind::Block,
            compressed_offset: byte,
            bit_offset: bit,
            uncompressed_offset: self.total_out,
            window: Window::compress(&self.window),
            span_digest: [0; 32],
        };
        self.push(cp);
    }

    fn push(&mut self, cp: Checkpoint) {
        self.checkpoints.push(cp);
        self.next_due = self.total_out + self.span_size;
    }

    /// Finishes the current span at blob offset `end` and starts the next one at `next_start`.
    fn close_span(&mut self, end: u64, next_start: u64) {
        let from = (self.span_hashed - self.buf_base) as usize;
        let to = (end - self.buf_base) as usize;
        self.span_hash.update(&self.buf[from..to]);
        let digest = self.span_hash.finalize_reset();
        let last = self.checkpoints.last_mut().expect("checkpoint 0 exists");
        last.span_digest = digest.into();
        self.span_hashed = next_start;
    }

    /// Reads more input, keeping the last few consumed bytes; `false` at end of input.
    fn refill(&mut self) -> Result<bool> {
        let keep_from = self.fed.saturating_sub(KEEP);
        let keep_abs = self.buf_base + keep_from as u64;
        if keep_abs > self.span_hashed {
            let from = (self.span_hashed - self.buf_base) as usize;
            self.span_hash.update(&self.buf[from..keep_from]);
            self.span_hashed = keep_abs;
        }
        self.buf.copy_within(keep_from..self.filled, 0);
        self.filled -= keep_from;
        self.fed -= keep_from;
        self.buf_base = keep_abs;
        let n = read_some(&mut self.src, &mut self.buf[self.filled..])?;
        self.blob_hash
            .update(&self.buf[self.filled..self.filled + n]);
        self.filled += n;
        Ok(n > 0)
    }

    /// Blob offset of the next byte zlib has not been given.
    fn pos(&self) -> u64 {
        self.buf_base + self.fed as u64
    }
}

impl<R: Read> Chunks for GzipStream<R> {
    fn fill(&mut self) -> Result<&[u8]> {
        if self.out_pos == self.out_len && !self.done {
            self.produce()?;
        }
        Ok(&self.out[self.out_pos..self.out_len])
    }

    fn consume(&mut self, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.out_len);
    }

    fn finish(mut self: Box<Self>) -> Result<Summary> {
        while !self.fill()?.is_empty() {
            self.out_pos = self.out_len;
        }
        let end = self.buf_base + self.filled as u64;
        self.close_span(end, end);
        Ok(Summary {
            digest: self.blob_hash.finalize().into(),
            diff_id: self.diff_hash.finalize().into(),
            compressed_size: end,
            uncompressed_size: self.total_out,
            checkpoints: std::mem::take(&mut self.checkpoints),
        })
    }
}

fn corrupt(offset: u64, e: impl std::fmt::Display) -> Error {
    let reason = match e.to_string() {
        s if s.is_empty() => "invalid data".to_string(),
        s => s,
    };
    Error::CorruptGzip { offset, reason }
}
