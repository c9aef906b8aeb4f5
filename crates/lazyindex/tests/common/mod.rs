//! Shared helpers for the integration tests: deterministic data, tar and gzip builders.
#![allow(dead_code)]

use std::io::Write;

use imagemesh_lazyindex::{Compression, IndexOptions, LayerIndex, index_layer};

/// xorshift64*: deterministic, dependency-free pseudo-random numbers.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }

    /// Compressible text made of words, so deflate uses back references across blocks.
    pub fn text(&mut self, n: usize) -> Vec<u8> {
        const WORDS: &[&str] = &[
            "layer",
            "index",
            "checkpoint",
            "window",
            "inflate",
            "deflate",
            "tar",
            "gzip",
            "registry",
            "mount",
            "lazy",
            "image",
            "the",
            "of",
            "and",
            "\n",
        ];
        let mut v = Vec::with_capacity(n + 16);
        while v.len() < n {
            v.extend_from_slice(WORDS[self.below(WORDS.len() as u64) as usize].as_bytes());
            v.push(b' ');
        }
        v.truncate(n);
        v
    }
}

/// Builds a tar in memory with the tar crate.
pub struct TarBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl Default for TarBuilder {
    fn default() -> Self {
        TarBuilder {
            b: tar::Builder::new(Vec::new()),
        }
    }
}

impl TarBuilder {
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h
    }

    pub fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Char, 0o600, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// Emits a PAX extended header that applies to the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.b
            .append_pax_extensions(records.iter().copied())
            .unwrap();
        self
    }

    /// Writes a raw header block + data, bypassing the builder's path checks (for hostile input).
    pub fn raw(
        &mut self,
        kind: tar::EntryType,
        name: &[u8],
        link: &[u8],
        data: &[u8],
    ) -> &mut Self {
        let mut h = Self::header(kind, 0o644, data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Concatenated gzip members, one per chunk (what `cat a.gz b.gz` or some pigz modes give).
pub fn gzip_members(data: &[u8], chunk: usize) -> Vec<u8> {
    data.chunks(chunk).flat_map(gzip).collect()
}

pub fn options(span: u64) -> IndexOptions {
    IndexOptions {
        span_size: span,
        checkpoint_threshold: 0,
        ..IndexOptions::default()
    }
}

pub fn index(blob: &[u8], span: u64) -> LayerIndex {
    index_layer(blob, &options(span)).unwrap()
}

pub fn index_plain(blob: &[u8], span: u64) -> LayerIndex {
    let mut opts = options(span);
    opts.compression = Some(Compression::None);
    index_layer(blob, &opts).unwrap()
}

/// Reads an uncompressed range of a layer through its checkpoints, as a lazy reader would.
pub fn read_range(layer: &LayerIndex, blob: &[u8], range: std::ops::Range<u64>) -> Vec<u8> {
    let plan = layer.plan_read(range).unwrap();
    let fetched = &blob[plan.fetch.start as usize..plan.fetch.end as usize];
    layer.decode_read(&plan, fetched).unwrap()
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(data);
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}
