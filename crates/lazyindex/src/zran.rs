//! The one module with `unsafe`: a safe wrapper around zlib-rs's C API (`libz-rs-sys`).
//!
//! Random access into a gzip stream needs three things the safe Rust inflaters do not expose:
//! stopping at every deflate block boundary (`Z_BLOCK`) and reading the bit position from
//! `data_type`, reading the 32 KiB window (`inflateGetDictionary`), and resuming mid-byte from a
//! saved window (`inflatePrime` + `inflateSetDictionary`). This is the technique of zlib's
//! `examples/zran.c`.
//!
//! Soundness: the `z_stream` is boxed so its address never changes after `inflateInit2_` (zlib
//! keeps a back pointer to it and rejects a moved stream), `next_in`/`next_out` are set from live
//! slices immediately before each `inflate` call and cleared after it, so no dangling pointer
//! outlives a borrow, and `Drop` calls `inflateEnd` exactly once.
#![allow(unsafe_code)]

use std::ffi::c_int;

use libz_rs_sys as z;

/// Size of the deflate history window a checkpoint must carry.
pub(crate) const WINDOW_SIZE: usize = 32 * 1024;

/// Which framing the inflater expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wrap {
    /// A gzip member: header, deflate data, CRC-32 + ISIZE trailer.
    Gzip,
    /// Bare deflate data, used when resuming at a checkpoint.
    Raw,
}

impl Wrap {
    fn window_bits(self) -> c_int {
        match self {
            Wrap::Gzip => 15 + 16,
            Wrap::Raw => -15,
        }
    }
}

/// What stopped one [`Inflater::inflate`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Input exhausted or output full; call again.
    More,
    /// Stopped right after a deflate block that is not the last of its stream. `unused_bits` is
    /// how many bits of the input consumed so far zlib holds but has not used yet.
    Block { unused_bits: u32 },
    /// The gzip member (or raw deflate stream) ended.
    End,
}

/// Result of one [`Inflater::inflate`] call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Step {
    pub consumed: usize,
    pub produced: usize,
    pub stop: Stop,
}

/// A zlib error code with zlib's message, if any.
#[derive(Debug, Clone, thiserror::Error)]
#[error("zlib error {code}: {message}")]
pub(crate) struct ZError {
    pub code: i32,
    pub message: String,
}

/// An inflate stream. Not `Send`-hostile: the raw pointers inside are only ever set during a
/// call, so moving the box between threads is fine.
pub(crate) struct Inflater {
    strm: Box<z::z_stream>,
}

// SAFETY: the z_stream owns its state exclusively; the pointers to caller buffers are only set
// for the duration of a `&mut self` call.
unsafe impl Send for Inflater {}

impl Inflater {
    pub(crate) fn new(wrap: Wrap) -> Result<Self, ZError> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: `strm` is a valid, default-initialised z_stream (null allocators select the
        // library's own), the version string comes from the library itself.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *strm,
                wrap.window_bits(),
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        let inflater = Inflater { strm };
        if rc != z::Z_OK {
            // inflateEnd on a failed init is harmless (it sees a null state).
            return Err(inflater.error(rc));
        }
        Ok(inflater)
    }

    /// Starts over with a new framing, keeping the allocated state.
    pub(crate) fn reset(&mut self, wrap: Wrap) -> Result<(), ZError> {
        // SAFETY: the stream was initialised in `new` and has not moved (boxed).
        let rc = unsafe { z::inflateReset2(&mut *self.strm, wrap.window_bits()) };
        self.check(rc)
    }

    /// Inserts the `bits` (≤ 16) low bits of `value` ahead of the next input. Raw mode only.
    pub(crate) fn prime(&mut self, bits: u32, value: u32) -> Result<(), ZError> {
        debug_assert!(bits <= 16);
        // SAFETY: initialised stream; arguments are plain integers.
        let rc = unsafe { z::inflatePrime(&mut *self.strm, bits as c_int, value as c_int) };
        self.check(rc)
    }

    /// Presets the history window (≤ 32 KiB). Raw mode only.
    pub(crate) fn set_dictionary(&mut self, window: &[u8]) -> Result<(), ZError> {
        let len = window.len().min(WINDOW_SIZE);
        // SAFETY: `window` is a live slice of at least `len` bytes; zlib copies it.
        let rc = unsafe { z::inflateSetDictionary(&mut *self.strm, window.as_ptr(), len as _) };
        self.check(rc)
    }

    /// Copies the current history window (the last ≤ 32 KiB of output) into `out`.
    pub(crate) fn window(&self, out: &mut Vec<u8>) {
        out.clear();
        out.resize(WINDOW_SIZE, 0);
        let mut len: std::ffi::c_uint = 0;
        // SAFETY: `out` is writable for WINDOW_SIZE bytes, which is the most zlib writes.
        unsafe { z::inflateGetDictionary(&*self.strm, out.as_mut_ptr(), &mut len) };
        out.truncate((len as usize).min(WINDOW_SIZE));
    }

    /// Inflates from `input` into `output`, returning at the end of every deflate block when
    /// `at_blocks` is set (`Z_BLOCK`), else only when input or output runs out (`Z_NO_FLUSH`).
    pub(crate) fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        at_blocks: bool,
    ) -> Result<Step, ZError> {
        // zlib counts in c_uint; a longer slice is simply fed in several calls.
        let avail_in = input.len().min(u32::MAX as usize);
        let avail_out = output.len().min(u32::MAX as usize);
        let flush = if at_blocks { z::Z_BLOCK } else { z::Z_NO_FLUSH };
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in as _;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out as _;
        // SAFETY: next_in/next_out point into live slices of the stated lengths for the whole
        // call; they are cleared right after so nothing dangles.
        let rc = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = avail_in - self.strm.avail_in as usize;
        let produced = avail_out - self.strm.avail_out as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        let stop = match rc {
            z::Z_STREAM_END => Stop::End,
            z::Z_OK | z::Z_BUF_ERROR => self.block_stop(),
            // A preset dictionary (zlib FDICT) cannot occur in gzip; treat it as corruption.
            _ => return Err(self.error(rc)),
        };
        Ok(Step {
            consumed,
            produced,
            stop,
        })
    }

    /// Decodes `data_type` after a `Z_BLOCK` return: bit 7 = at a block boundary, bit 6 = the
    /// block just finished was the last one, low 6 bits = unused bits in the bit buffer.
    fn block_stop(&self) -> Stop {
        let data_type = self.strm.data_type;
        if data_type & 128 != 0 && data_type & 64 == 0 {
            Stop::Block {
                unused_bits: (data_type & 63) as u32,
            }
        } else {
            Stop::More
        }
    }

    fn check(&self, rc: c_int) -> Result<(), ZError> {
        if rc == z::Z_OK {
            Ok(())
        } else {
            Err(self.error(rc))
        }
    }

    fn error(&self, code: c_int) -> ZError {
        let message = if self.strm.msg.is_null() {
            "no message".to_string()
        } else {
            // SAFETY: zlib sets `msg` to a static NUL-terminated string or leaves it null.
            unsafe { std::ffi::CStr::from_ptr(self.strm.msg) }
                .to_string_lossy()
                .into_owned()
        };
        ZError { code, message }
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised (or its state is null, which inflateEnd rejects
        // harmlessly) and is ended exactly once here.
        unsafe { z::inflateEnd(&mut *self.strm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn inflates_a_gzip_member_and_reports_blocks() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let gz = gzip(&data);
        let mut inf = Inflater::new(Wrap::Gzip).unwrap();
        let (mut out, mut buf, mut pos, mut blocks) = (Vec::new(), vec![0u8; 8192], 0, 0);
        loop {
            let step = inf.inflate(&gz[pos..], &mut buf, true).unwrap();
            pos += step.consumed;
            out.extend_from_slice(&buf[..step.produced]);
            match step.stop {
                Stop::End => break,
                Stop::Block { .. } => blocks += 1,
                Stop::More => {}
            }
        }
        assert_eq!(out, data);
        assert!(blocks > 0);
    }

    #[test]
    fn corrupt_input_is_an_error() {
        let mut gz = gzip(b"hello hello hello hello");
        gz[3] = 0xff; // reserved flag bits set
        let mut inf = Inflater::new(Wrap::Gzip).unwrap();
        let err = inf.inflate(&gz, &mut [0u8; 64], false).unwrap_err();
        assert_eq!(err.code, z::Z_DATA_ERROR);
    }
}
