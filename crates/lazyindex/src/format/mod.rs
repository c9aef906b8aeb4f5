//! The binary index format (`docs/index-format.md` is the specification).
//!
//! ```text
//! header   32 bytes: magic "IMLZIDX\n", version u16le, kind u8 (1 layer, 2 image), flags u8 (0),
//!          reserved u32 (0), meta_zlen u64le, meta_len u64le
//! meta     zlib-compressed metadata: layers, checkpoints, entries (varints, front-coded paths)
//! windows  the raw-deflate checkpoint windows back to back, lengths and digests given in meta
//! ```
//!
//! Windows are compressed one by one at index time (bounding ingest memory) and kept out of the
//! zlib section, which would only spend time failing to shrink them further. Header and
//! metadata together are the *head*: a reader can fetch and decode the head alone
//! ([`decode_image_head`]) and fetch each window when a read needs it, checked against its
//! digest in the metadata.

mod layer;
mod layer_check;
mod wire;

use std::io::{Read, Write};

use crate::model::{ImageIndex, LayerIndex, RemoteWindows};
use crate::{Error, Result};
use layer::Windows;
use wire::{Reader, Writer};

/// First eight bytes of every encoded index.
pub const MAGIC: &[u8; 8] = b"IMLZIDX\n";
/// The format version this crate writes and the only one it reads. Version 2 added a digest
/// per window, so windows can be fetched one by one.
pub const FORMAT_VERSION: u16 = 2;

/// Length of the fixed header.
pub const HEADER_LEN: usize = 32;
const KIND_LAYER: u8 = 1;
const KIND_IMAGE: u8 = 2;

/// Bounds applied while decoding untrusted bytes.
#[derive(Clone, Debug)]
pub struct DecodeLimits {
    /// Largest uncompressed metadata section (default 256 MiB).
    pub max_meta_len: u64,
    /// Most layers in an image index (default 1024).
    pub max_layers: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_meta_len: 256 << 20,
            max_layers: 1024,
        }
    }
}

/// Encodes one layer's index (cacheable by the layer digest).
pub fn encode_layer(layer: &LayerIndex) -> Vec<u8> {
    encode(KIND_LAYER, |meta, windows| {
        layer::write(meta, windows, layer)
    })
}

/// Encodes an image index: the manifest digest and every layer, bottom first.
pub fn encode_image(image: &ImageIndex) -> Vec<u8> {
    encode(KIND_IMAGE, |meta, windows| {
        match &image.manifest_digest {
            Some(d) => {
                meta.u8(1);
                meta.str(d);
            }
            None => meta.u8(0),
        }
        meta.varint(image.layers.len() as u64);
        for l in &image.layers {
            layer::write(meta, windows, l);
        }
    })
}

/// Decodes a layer index with default limits.
pub fn decode_layer(bytes: &[u8]) -> Result<LayerIndex> {
    decode_layer_with(bytes, &DecodeLimits::default())
}

/// Decodes a layer index, validating every field.
pub fn decode_layer_with(bytes: &[u8], limits: &DecodeLimits) -> Result<LayerIndex> {
    let (meta, windows) = split(bytes, KIND_LAYER, limits, true)?;
    let mut windows = Windows::Section(Reader::new(windows));
    let layer = decode_meta(&meta, |meta| layer::read(meta, &mut windows))?;
    finish_windows(&windows)?;
    Ok(layer)
}

/// Decodes an image index with default limits.
pub fn decode_image(bytes: &[u8]) -> Result<ImageIndex> {
    decode_image_with(bytes, &DecodeLimits::default())
}

/// Decodes an image index, validating every field.
pub fn decode_image_with(bytes: &[u8], limits: &DecodeLimits) -> Result<ImageIndex> {
    let (meta, windows) = split(bytes, KIND_IMAGE, limits, true)?;
    let mut windows = Windows::Section(Reader::new(windows));
    let image = decode_image_meta(&meta, &mut windows, limits)?;
    finish_windows(&windows)?;
    Ok(image)
}

/// Decodes an image index from its head (header and metadata: the first [`head_len`] bytes)
/// without its windows. Every checkpoint window is left remote: `remote_windows` says where it
/// lies in the encoded index (its `blob` is for the caller to fill in), and a read fetches it
/// and checks it against the window digest the metadata carries. Extra bytes after the head
/// are ignored.
pub fn decode_image_head(head: &[u8], limits: &DecodeLimits) -> Result<ImageIndex> {
    let (meta, _) = split(head, KIND_IMAGE, limits, false)?;
    let mut windows = Windows::Remote {
        at: head_len(head)? as u64,
        ranges: Vec::new(),
    };
    let mut image = decode_image_meta(&meta, &mut windows, limits)?;
    if let Windows::Remote { ranges, .. } = windows {
        image.remote_windows = Some(RemoteWindows {
            blob: String::new(),
            ranges,
        });
    }
    Ok(image)
}

/// The length of an encoded index's head (header and metadata), read from its header.
pub fn head_len(bytes: &[u8]) -> Result<usize> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(Error::invalid("not an imagemesh index (bad magic)"));
    }
    let zlen = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    usize::try_from(zlen)
        .ok()
        .and_then(|z| z.checked_add(HEADER_LEN))
        .ok_or_else(|| Error::invalid("metadata section too large"))
}

fn decode_image_meta(
    meta: &[u8],
    windows: &mut Windows,
    limits: &DecodeLimits,
) -> Result<ImageIndex> {
    decode_meta(meta, |meta| {
        let manifest_digest = match meta.u8()? {
            0 => None,
            1 => Some(meta.str()?.to_string()),
            _ => return Err(Error::invalid("bad manifest digest flag")),
        };
        let n = meta.count(1)?;
        if n > limits.max_layers {
            return Err(Error::invalid("too many layers"));
        }
        let layers = (0..n)
            .map(|_| layer::read(meta, windows))
            .collect::<Result<_>>()?;
        Ok(ImageIndex {
            manifest_digest,
            layers,
            remote_windows: None,
        })
    })
}

fn encode(kind: u8, body: impl FnOnce(&mut Writer, &mut Writer)) -> Vec<u8> {
    let (mut meta, mut windows) = (Writer::default(), Writer::default());
    body(&mut meta, &mut windows);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&meta.buf).expect("in-memory zlib");
    let zmeta = z.finish().expect("in-memory zlib");
    let mut out = Writer::default();
    out.raw(MAGIC);
    out.raw(&FORMAT_VERSION.to_le_bytes());
    out.u8(kind);
    out.u8(0);
    out.raw(&0u32.to_le_bytes());
    out.raw(&(zmeta.len() as u64).to_le_bytes());
    out.raw(&(meta.buf.len() as u64).to_le_bytes());
    out.raw(&zmeta);
    out.raw(&windows.buf);
    out.buf
}

/// Checks the header and inflates the metadata; returns it with the bytes after it (the
/// windows section). `whole`: the bytes must hold the whole metadata section.
fn split<'b>(
    bytes: &'b [u8],
    kind: u8,
    limits: &DecodeLimits,
    whole: bool,
) -> Result<(Vec<u8>, &'b [u8])> {
    let (zlen, len) = header(bytes, kind, limits)?;
    let rest = &bytes[HEADER_LEN..];
    if zlen > rest.len() as u64 {
        let what = if whole {
            "runs past the end"
        } else {
            "is not all in the head"
        };
        return Err(Error::invalid(format!("metadata section {what}")));
    }
    let (zmeta, window_bytes) = rest.split_at(zlen as usize);
    let mut meta_buf = Vec::with_capacity(len.min(1 << 20) as usize);
    flate2::read::ZlibDecoder::new(zmeta)
        .take(len + 1)
        .read_to_end(&mut meta_buf)
        .map_err(|e| Error::invalid(format!("metadata does not inflate: {e}")))?;
    if meta_buf.len() as u64 != len {
        return Err(Error::invalid("metadata length mismatch"));
    }
    Ok((meta_buf, window_bytes))
}

/// Runs `body` over the metadata, which it must consume exactly.
fn decode_meta<T>(meta: &[u8], body: impl FnOnce(&mut Reader) -> Result<T>) -> Result<T> {
    let mut meta = Reader::new(meta);
    let value = body(&mut meta)?;
    meta.finish("metadata")?;
    Ok(value)
}

fn finish_windows(windows: &Windows) -> Result<()> {
    match windows {
        Windows::Section(section) => section.finish("windows"),
        Windows::Remote { .. } => Ok(()),
    }
}

/// Validates the fixed header and returns (meta_zlen, meta_len).
fn header(bytes: &[u8], kind: u8, limits: &DecodeLimits) -> Result<(u64, u64)> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(Error::invalid("not an imagemesh index (bad magic)"));
    }
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return Err(Error::invalid(format!(
            "unsupported format version {version}"
        )));
    }
    if bytes[10] != kind {
        return Err(Error::invalid(format!(
            "index kind {} where {kind} expected",
            bytes[10]
        )));
    }
    if bytes[11] != 0 || bytes[12..16] != [0; 4] {
        return Err(Error::invalid("unknown flags or reserved bytes set"));
    }
    let (zlen, len) = (u64_at(16), u64_at(24));
    if len > limits.max_meta_len {
        return Err(Error::LimitExceeded {
            what: "index metadata",
            limit: limits.max_meta_len,
        });
    }
    Ok((zlen, len))
}
