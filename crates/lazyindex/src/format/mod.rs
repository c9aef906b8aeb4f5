//! The binary index format (`docs/index-format.md` is the specification).
//!
//! ```text
//! header   32 bytes: magic "IMLZIDX\n", version u16le, kind u8 (1 layer, 2 image), flags u8 (0),
//!          reserved u32 (0), meta_zlen u64le, meta_len u64le
//! meta     zlib-compressed metadata: layers, checkpoints, entries (varints, front-coded paths)
//! windows  the raw-deflate checkpoint windows back to back, lengths given in meta
//! ```
//!
//! Windows are compressed one by one at index time (bounding ingest memory) and kept out of the
//! zlib section, which would only spend time failing to shrink them further.

mod layer;
mod layer_check;
mod wire;

use std::io::{Read, Write};

use crate::model::{ImageIndex, LayerIndex};
use crate::{Error, Result};
use wire::{Reader, Writer};

/// First eight bytes of every encoded index.
pub const MAGIC: &[u8; 8] = b"IMLZIDX\n";
/// The format version this crate writes and the only one it reads.
pub const FORMAT_VERSION: u16 = 1;

const HEADER_LEN: usize = 32;
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
    decode(bytes, KIND_LAYER, limits, |meta, windows| {
        layer::read(meta, windows)
    })
}

/// Decodes an image index with default limits.
pub fn decode_image(bytes: &[u8]) -> Result<ImageIndex> {
    decode_image_with(bytes, &DecodeLimits::default())
}

/// Decodes an image index, validating every field.
pub fn decode_image_with(bytes: &[u8], limits: &DecodeLimits) -> Result<ImageIndex> {
    decode(bytes, KIND_IMAGE, limits, |meta, windows| {
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

fn decode<T>(
    bytes: &[u8],
    kind: u8,
    limits: &DecodeLimits,
    body: impl FnOnce(&mut Reader, &mut Reader) -> Result<T>,
) -> Result<T> {
    let (zlen, len) = header(bytes, kind, limits)?;
    let rest = &bytes[HEADER_LEN..];
    if zlen > rest.len() as u64 {
        return Err(Error::invalid("metadata section runs past the end"));
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
    let (mut meta, mut windows) = (Reader::new(&meta_buf), Reader::new(window_bytes));
    let value = body(&mut meta, &mut windows)?;
    meta.finish("metadata")?;
    windows.finish("windows")?;
    Ok(value)
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
