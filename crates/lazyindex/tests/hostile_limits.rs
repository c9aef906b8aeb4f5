//! Hostile layers against the ingest limits (issue #15): floods of PAX / GNU extension records,
//! gzip bombs and absurd size fields end in a typed `LimitExceeded` (the indexer's
//! `INVALID_IMAGE`), quickly and without a panic, instead of memory or hours of inflating.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{TarBuilder, gzip, options};
use imagemesh_lazyindex::{Compression, Error, IndexOptions, Limits, index_layer};

fn limits(f: impl FnOnce(&mut Limits)) -> IndexOptions {
    let mut opts = options(1 << 20);
    f(&mut opts.limits);
    opts
}

fn limit_hit(result: Result<impl std::fmt::Debug, Error>, what: &str) {
    match result {
        Err(Error::LimitExceeded { what: w, .. }) if w.contains(what) => {}
        other => panic!("expected the {what:?} limit, got {other:?}"),
    }
}

/// A raw header block for an extension record of `kind` carrying `data`.
fn extension(tar: &mut Vec<u8>, kind: tar::EntryType, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_path("././@LongLink").unwrap();
    h.set_size(data.len() as u64);
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    tar.extend_from_slice(data);
    tar.resize(tar.len().next_multiple_of(512), 0);
}

fn file_then_end(tar: &mut Vec<u8>) {
    let mut t = TarBuilder::default();
    t.file("f", b"data");
    tar.extend(t.finish());
}

#[test]
fn a_flood_of_pax_records_is_refused() {
    // 100 small PAX headers in a row, each with its own xattr key: no single record is large.
    let mut t = TarBuilder::default();
    for i in 0..100 {
        t.pax(&[(&format!("SCHILY.xattr.user.k{i}"), b"v")]);
    }
    t.file("f", b"x");
    limit_hit(
        index_layer(&gzip(&t.finish())[..], &options(1 << 20)),
        "consecutive PAX/GNU extension records",
    );

    // A handful of records is fine: the same layer with 10 of them indexes.
    let mut t = TarBuilder::default();
    for i in 0..10 {
        t.pax(&[(&format!("SCHILY.xattr.user.k{i}"), b"v")]);
    }
    t.file("f", b"x");
    let layer = index_layer(&gzip(&t.finish())[..], &options(1 << 20)).unwrap();
    assert_eq!(layer.entries[0].xattrs.len(), 10);
}

#[test]
fn a_flood_of_gnu_long_names_and_global_headers_is_refused() {
    let mut tar = Vec::new();
    for _ in 0..200 {
        extension(&mut tar, tar::EntryType::GNULongName, b"name\0");
        extension(&mut tar, tar::EntryType::XGlobalHeader, b"9 a=bcd\n");
    }
    file_then_end(&mut tar);
    limit_hit(
        index_layer(&tar[..], &options(1 << 20)),
        "consecutive PAX/GNU extension records",
    );
}

#[test]
fn pending_extension_data_is_bounded_across_records() {
    // Each record is under the per-record limit (1 MiB); together they pass the pending one.
    let mut tar = Vec::new();
    let name = vec![b'n'; 900 << 10];
    for _ in 0..6 {
        extension(&mut tar, tar::EntryType::GNULongName, &name);
    }
    file_then_end(&mut tar);
    limit_hit(
        index_layer(&gzip(&tar)[..], &options(1 << 20)),
        "pending PAX/GNU extension data",
    );
    // Under a lower configured bound two records are already too many.
    let opts = limits(|l| l.max_pending_metadata = 1 << 20);
    limit_hit(
        index_layer(&tar[..], &opts),
        "pending PAX/GNU extension data",
    );
}

/// Counts the compressed bytes the ingest pulled.
struct Counting<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// A tar of one 1 GiB file of zeros, gzipped by streaming the zeros through flate2.
fn gzip_bomb() -> Vec<u8> {
    const SIZE: u64 = 1 << 30;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut h = tar::Header::new_gnu();
    h.set_path("zeros").unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(SIZE);
    h.set_cksum();
    enc.write_all(h.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..SIZE >> 20 {
        enc.write_all(&zeros).unwrap();
    }
    enc.write_all(&[0u8; 1024]).unwrap();
    enc.finish().unwrap()
}

#[test]
fn a_gzip_bomb_stops_at_the_ratio_and_size_limits() {
    let started = Instant::now();
    let bomb = gzip_bomb();
    let built = started.elapsed();
    let ratio = (1u64 << 30) / bomb.len() as u64;
    eprintln!(
        "gzip bomb: 1 GiB of zeros in {} compressed bytes (ratio {ratio}), built in {built:?}",
        bomb.len()
    );

    // Default limits: the ratio check fires once 64 MiB are out, long before the end.
    let started = Instant::now();
    let mut src = Counting {
        inner: &bomb[..],
        read: 0,
    };
    limit_hit(
        index_layer(&mut src, &options(1 << 20)),
        "compression ratio",
    );
    let took = started.elapsed();
    eprintln!(
        "ratio limit: refused after {} of {} compressed bytes in {took:?}",
        src.read,
        bomb.len()
    );
    // The ingest reads 256 KiB of input at a time: the first read already inflates past 64 MiB.
    assert!(src.read <= 512 << 10, "decoding did not stop early");
    assert!(took < Duration::from_secs(20), "{took:?}");

    // No ratio limit but a 128 MiB size limit: stops just past 128 MiB of output.
    let opts = limits(|l| {
        l.max_compression_ratio = 0;
        l.max_uncompressed_size = 128 << 20;
    });
    let started = Instant::now();
    let mut src = Counting {
        inner: &bomb[..],
        read: 0,
    };
    limit_hit(index_layer(&mut src, &opts), "tar entry size");
    eprintln!(
        "size limit (entry header): refused after {} compressed bytes in {:?}",
        src.read,
        started.elapsed()
    );

    // 1 GiB of zeros with no tar header saying so (a bomb after end-of-archive), as four
    // gzip members of 256 MiB: the inflater's own output bound stops it.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..256 {
        enc.write_all(&zeros).unwrap();
    }
    let trailing = enc.finish().unwrap().repeat(4);
    let started = Instant::now();
    let mut src = Counting {
        inner: &trailing[..],
        read: 0,
    };
    limit_hit(index_layer(&mut src, &opts), "uncompressed layer size");
    eprintln!(
        "size limit (inflater): refused after {} of {} compressed bytes in {:?}",
        src.read,
        trailing.len(),
        started.elapsed()
    );
    assert!(src.read < trailing.len() as u64);
}

#[test]
fn a_plain_layer_over_the_size_limit_is_refused() {
    let mut t = TarBuilder::default();
    t.file("big", &vec![7u8; 2 << 20]);
    let mut opts = limits(|l| l.max_uncompressed_size = 1 << 20);
    opts.compression = Some(Compression::None);
    let tar = t.finish();
    limit_hit(index_layer(&tar[..], &opts), "tar entry size");
    let mut opts = limits(|l| l.max_uncompressed_size = 3 << 20);
    opts.compression = Some(Compression::None);
    let mut padded = tar.clone();
    padded.resize(4 << 20, 0);
    limit_hit(index_layer(&padded[..], &opts), "uncompressed layer size");
}

#[test]
fn absurd_size_fields_are_errors_not_panics() {
    // A header whose (base-256) size is u64::MAX: refused before anything is skipped.
    let mut h = tar::Header::new_gnu();
    h.set_path("huge").unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(u64::MAX);
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[0u8; 1024]);
    limit_hit(index_layer(&tar[..], &options(1 << 20)), "tar entry size");
    // Even with no size limit at all, rounding it up to blocks is checked.
    let unlimited = limits(|l| l.max_uncompressed_size = u64::MAX);
    assert!(index_layer(&tar[..], &unlimited).is_err());

    // The same size from a PAX record, and an extension record claiming u64::MAX bytes.
    let mut t = TarBuilder::default();
    t.pax(&[("size", b"18446744073709551615")]).file("f", b"");
    limit_hit(
        index_layer(&t.finish()[..], &options(1 << 20)),
        "tar entry size",
    );
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_path("pax").unwrap();
    h.set_size(u64::MAX);
    h.set_cksum();
    assert!(index_layer(&h.as_bytes()[..], &unlimited).is_err());

    // An mtime past i64 and a PAX mtime at i64::MIN with a fraction: errors, not wraps.
    let mut h = tar::Header::new_gnu();
    h.set_path("old").unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_mtime(u64::MAX);
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[0u8; 1024]);
    assert!(matches!(
        index_layer(&tar[..], &options(1 << 20)),
        Err(Error::CorruptTar { .. })
    ));
    let mut t = TarBuilder::default();
    t.pax(&[("mtime", b"-9223372036854775808.5")])
        .file("f", b"");
    assert!(matches!(
        index_layer(&t.finish()[..], &options(1 << 20)),
        Err(Error::CorruptTar { .. })
    ));
}
