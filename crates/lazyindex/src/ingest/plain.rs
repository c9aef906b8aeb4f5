//! Uncompressed tar layers: blob offsets are uncompressed offsets, so a checkpoint is just a span
//! boundary every `span_size` bytes with the digest of that span.

use std::io::Read;

use sha2::{Digest, Sha256};

use super::{Chunks, Summary, read_some};
use crate::checkpoint::{Checkpoint, CheckpointKind};
use crate::{Error, Result};

const BUF: usize = 256 * 1024;

pub(crate) struct PlainStream<R> {
    src: R,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    total: u64,
    eof: bool,
    blob_hash: Sha256,
    span_hash: Sha256,
    span_size: u64,
    next_due: u64,
    checkpoints: Vec<Checkpoint>,
    /// [`super::Limits::max_uncompressed_size`].
    max_size: u64,
}

impl<R: Read> PlainStream<R> {
    pub(crate) fn new(src: R, span_size: u64, max_size: u64) -> Self {
        PlainStream {
            src,
            buf: vec![0; BUF],
            pos: 0,
            len: 0,
            total: 0,
            eof: false,
            blob_hash: Sha256::new(),
            span_hash: Sha256::new(),
            span_size,
            next_due: span_size,
            checkpoints: vec![Checkpoint::aligned(CheckpointKind::Plain, 0, 0)],
            max_size,
        }
    }

    /// Hashes freshly read bytes, opening a new span at each `span_size` boundary. A span is
    /// opened lazily (when its first byte arrives) so the blob never ends in an empty span.
    fn absorb(&mut self, n: usize) {
        let mut at = 0;
        while at < n {
            if self.total == self.next_due {
                self.close_span();
                let cp = Checkpoint::aligned(CheckpointKind::Plain, self.total, self.total);
                self.checkpoints.push(cp);
                self.next_due += self.span_size;
            }
            let take = ((self.next_due - self.total) as usize).min(n - at);
            self.span_hash.update(&self.buf[at..at + take]);
            at += take;
            self.total += take as u64;
        }
        self.blob_hash.update(&self.buf[..n]);
    }

    fn close_span(&mut self) {
        let last = self.checkpoints.last_mut().expect("checkpoint 0 exists");
        last.span_digest = self.span_hash.finalize_reset().into();
    }
}

impl<R: Read> Chunks for PlainStream<R> {
    fn fill(&mut self) -> Result<&[u8]> {
        if self.pos == self.len && !self.eof {
            let n = read_some(&mut self.src, &mut self.buf)?;
            if self.total.saturating_add(n as u64) > self.max_size {
                return Err(Error::LimitExceeded {
                    what: "uncompressed layer size",
                    limit: self.max_size,
                });
            }
            self.eof = n == 0;
            self.absorb(n);
            self.pos = 0;
            self.len = n;
        }
        Ok(&self.buf[self.pos..self.len])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.len);
    }

    fn finish(mut self: Box<Self>) -> Result<Summary> {
        while !self.fill()?.is_empty() {
            self.pos = self.len;
        }
        self.close_span();
        let digest: [u8; 32] = self.blob_hash.finalize().into();
        Ok(Summary {
            digest,
            diff_id: digest,
            compressed_size: self.total,
            uncompressed_size: self.total,
            checkpoints: std::mem::take(&mut self.checkpoints),
        })
    }
}
