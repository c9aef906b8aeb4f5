//! The synchronous core of a lazy read: [`LayerIndex::plan_read`] says which single compressed
//! range to fetch for an uncompressed range, [`LayerIndex::decode_read`] verifies the fetched
//! spans against their digests and inflates from the checkpoint to the wanted bytes.
//!
//! Split this way so async callers fetch with their own client and FUSE threads can run the
//! CPU-bound decode on a blocking pool.

use std::ops::Range;

use sha2::{Digest, Sha256};

use crate::checkpoint::{Checkpoint, CheckpointKind};
use crate::model::LayerIndex;
use crate::zran::{Inflater, Stop, Wrap};
use crate::{Error, Result};

/// Inflate scratch size; a read inflates at most one span plus the wanted bytes.
const SCRATCH: usize = 256 * 1024;
/// gzip member trailer: CRC-32 and ISIZE.
const TRAILER: usize = 8;

/// One read of a layer: the compressed range to fetch and what to make of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPlan {
    /// Blob byte range to fetch with one range request.
    pub fetch: Range<u64>,
    /// The uncompressed range this plan yields.
    pub want: Range<u64>,
    /// Checkpoint to start from.
    checkpoint: usize,
    /// Checkpoints whose spans `fetch` covers (and that get verified).
    spans: Range<usize>,
}

impl ReadPlan {
    /// The checkpoints whose spans the fetched bytes cover, all verified by `decode_read`.
    pub fn spans(&self) -> Range<usize> {
        self.spans.clone()
    }

    /// The checkpoint the read inflates from (whose window it needs).
    pub fn checkpoint(&self) -> usize {
        self.checkpoint
    }
}

impl LayerIndex {
    /// Plans a read of the uncompressed range `want`: from the last checkpoint at or before its
    /// start to the first checkpoint at or after its end (or the end of the blob).
    pub fn plan_read(&self, want: Range<u64>) -> Result<ReadPlan> {
        if want.start > want.end || want.end > self.uncompressed_size {
            return Err(Error::NotFound(format!(
                "range {want:?} of layer {} ({} bytes)",
                self.digest, self.uncompressed_size
            )));
        }
        let cps = &self.checkpoints;
        let first = cps
            .partition_point(|c| c.uncompressed_offset <= want.start)
            .saturating_sub(1);
        let last = cps.partition_point(|c| c.uncompressed_offset < want.end);
        let last = last.max(first + 1);
        let end = match cps.get(last) {
            Some(next) => next.compressed_offset + u64::from(next.bit_offset > 0),
            None => self.compressed_size,
        };
        Ok(ReadPlan {
            fetch: cps[first].compressed_offset..end,
            want,
            checkpoint: first,
            spans: first..last,
        })
    }

    /// Verifies `fetched` (the bytes of `plan.fetch`) span by span, then decodes `plan.want`.
    /// The checkpoint's window must be in memory (an index decoded whole).
    pub fn decode_read(&self, plan: &ReadPlan, fetched: &[u8]) -> Result<Vec<u8>> {
        self.verify_read(plan, fetched)?;
        self.inflate_verified(plan, fetched, None)
    }

    /// Checks that `fetched` is exactly the bytes of `plan.fetch`: its length, and every span it
    /// covers against the span's digest.
    pub fn verify_read(&self, plan: &ReadPlan, fetched: &[u8]) -> Result<()> {
        let expected = plan.fetch.end - plan.fetch.start;
        if fetched.len() as u64 != expected {
            return Err(Error::Source(
                format!("fetched {} bytes, planned {expected}", fetched.len()).into(),
            ));
        }
        self.verify_spans(plan, fetched)
    }

    /// Decodes `plan.want` from `fetched`, which [`Self::verify_read`] accepted. `window` is the
    /// checkpoint's compressed window when the index holds it remotely ([`crate::RemoteWindows`]);
    /// it is checked against the window digest before use.
    pub fn inflate_verified(
        &self,
        plan: &ReadPlan,
        fetched: &[u8],
        window: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        let cp = &self.checkpoints[plan.checkpoint];
        let skip = plan.want.start - cp.uncompressed_offset;
        let len = (plan.want.end - plan.want.start) as usize;
        match cp.kind {
            CheckpointKind::Plain => {
                let at = skip as usize;
                Ok(fetched[at..at + len].to_vec())
            }
            _ => {
                let window = self.window_of(plan.checkpoint, window)?;
                inflate_from(cp, &window, fetched, skip, len, plan.fetch.start)
            }
        }
    }

    /// The inflated window of checkpoint `i`: from memory, or `remote` checked against its
    /// digest.
    fn window_of(&self, i: usize, remote: Option<&[u8]>) -> Result<Vec<u8>> {
        let window = &self.checkpoints[i].window;
        if !window.is_remote() {
            return window.decompress();
        }
        let bytes =
            remote.ok_or_else(|| Error::invalid("the window of this read is not loaded"))?;
        if crate::checkpoint::sha256(bytes) != window.digest {
            return Err(Error::WindowMismatch {
                layer: self.digest.clone(),
                checkpoint: i,
            });
        }
        crate::checkpoint::inflate_window(window.len, bytes)
    }

    fn verify_spans(&self, plan: &ReadPlan, fetched: &[u8]) -> Result<()> {
        for i in plan.spans.clone() {
            let span = self.span_range(i);
            let bytes = &fetched[(span.start - plan.fetch.start) as usize..]
                [..(span.end - span.start) as usize];
            if Sha256::digest(bytes)[..] != self.checkpoints[i].span_digest {
                return Err(Error::DigestMismatch {
                    layer: self.digest.clone(),
                    span: i,
                });
            }
        }
        Ok(())
    }
}

/// Inflates from checkpoint `cp`, whose byte is `data[0]`, dropping `skip` bytes of output and
/// returning the next `len`. Crosses gzip member boundaries (multi-member blobs).
fn inflate_from(
    cp: &Checkpoint,
    window: &[u8],
    data: &[u8],
    skip: u64,
    len: usize,
    base: u64,
) -> Result<Vec<u8>> {
    let (mut inf, mut input) = start(cp, window, data)?;
    let mut raw = cp.kind == CheckpointKind::Block;
    let (mut out, mut skip) = (Vec::with_capacity(len), skip);
    let mut scratch = vec![0u8; SCRATCH.min(len + skip as usize).max(4096)];
    while out.len() < len {
        let at = base + (data.len() - input.len()) as u64;
        let step = inf
            .inflate(input, &mut scratch, false)
            .map_err(|e| corrupt(at, e))?;
        input = &input[step.consumed..];
        let produced = &scratch[..step.produced];
        let dropped = produced.len().min(skip as usize);
        skip -= dropped as u64;
        let rest = &produced[dropped..];
        out.extend_from_slice(&rest[..rest.len().min(len - out.len())]);
        match step.stop {
            _ if out.len() == len => break,
            Stop::End => {
                // A raw resume ends at the member's deflate end; its trailer follows.
                if raw {
                    input = input
                        .get(TRAILER..)
                        .ok_or(Error::Truncated("gzip trailer"))?;
                    raw = false;
                }
                if input.is_empty() {
                    return Err(Error::Truncated("layer ends before the requested bytes"));
                }
                inf.reset(Wrap::Gzip).map_err(|e| corrupt(at, e))?;
            }
            _ if step.consumed == 0 && step.produced == 0 => {
                return Err(Error::Truncated(
                    "fetched range ends before the requested bytes",
                ));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Sets an inflater up at a checkpoint: gzip framing at a member start; at a block boundary,
/// raw inflate primed with the unused high bits of the shared byte and preset with the window.
fn start<'d>(cp: &Checkpoint, window: &[u8], data: &'d [u8]) -> Result<(Inflater, &'d [u8])> {
    let base = cp.compressed_offset;
    if cp.kind == CheckpointKind::Member {
        return Ok((
            Inflater::new(Wrap::Gzip).map_err(|e| corrupt(base, e))?,
            data,
        ));
    }
    let mut inf = Inflater::new(Wrap::Raw).map_err(|e| corrupt(base, e))?;
    let mut input = data;
    if cp.bit_offset > 0 {
        let (&byte, rest) = data
            .split_first()
            .ok_or(Error::Truncated("checkpoint byte"))?;
        let bits = 8 - u32::from(cp.bit_offset);
        inf.prime(bits, u32::from(byte) >> cp.bit_offset)
            .map_err(|e| corrupt(base, e))?;
        input = rest;
    }
    if !window.is_empty() {
        inf.set_dictionary(window).map_err(|e| corrupt(base, e))?;
    }
    Ok((inf, input))
}

fn corrupt(offset: u64, e: impl std::fmt::Display) -> Error {
    Error::CorruptGzip {
        offset,
        reason: e.to_string(),
    }
}
