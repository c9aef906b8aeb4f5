//! Hostile and broken input: escaping paths, huge PAX records, corrupt or truncated gzip and
//! tar, and mutation loops over both ingest and index decoding. Errors are fine; panics and
//! unbounded allocation are not.

mod common;

use common::{Rng, TarBuilder, gzip, index, options, read_range};
use imagemesh_lazyindex::{
    EntryKind, Error, IndexOptions, LayerIndex, MergedTree, decode_layer, encode_layer, index_layer,
};

fn try_index(blob: &[u8]) -> Result<LayerIndex, Error> {
    index_layer(blob, &options(64 << 10))
}

#[test]
fn escaping_and_absolute_paths_are_neutralised() {
    let mut t = TarBuilder::default();
    t.raw(
        tar::EntryType::Regular,
        b"../../etc/passwd",
        b"",
        b"root::0:0",
    )
    .raw(tar::EntryType::Regular, b"/etc/shadow", b"", b"abs")
    .raw(tar::EntryType::Regular, b"a/../../escape", b"", b"x")
    .raw(
        tar::EntryType::Link,
        b"ok/link",
        b"../../../etc/passwd",
        b"",
    )
    .raw(tar::EntryType::Regular, b"a/.wh...", b"", b"")
    .raw(tar::EntryType::Symlink, b"sym", b"/etc/passwd", b"")
    .raw(tar::EntryType::Regular, b"fine", b"", b"fine");
    let layer = index(&gzip(&t.finish()), 1 << 20);
    let paths: Vec<_> = layer.entries.iter().map(|e| e.path.as_str()).collect();
    // Absolute is made relative; escapes, escaping hardlinks and bad whiteouts are dropped;
    // symlink targets are data and kept verbatim.
    assert_eq!(paths, ["etc/shadow", "sym", "fine"]);
    assert_eq!(layer.entries[1].link_target.as_deref(), Some("/etc/passwd"));
}

#[test]
fn devices_can_be_disabled() {
    let mut t = TarBuilder::default();
    t.char_device("dev/mem", 1, 1).file("f", b"");
    let opts = IndexOptions {
        allow_devices: false,
        ..options(1 << 20)
    };
    let layer = index_layer(&gzip(&t.finish())[..], &opts).unwrap();
    assert!(
        layer
            .entries
            .iter()
            .all(|e| e.kind != EntryKind::CharDevice)
    );
    assert_eq!(layer.entries.len(), 1);
}

#[test]
fn huge_pax_and_long_names_are_bounded() {
    let mut t = TarBuilder::default();
    let big = vec![b'x'; 2 << 20];
    t.pax(&[("comment", &big[..])]).file("f", b"");
    let err = try_index(&gzip(&t.finish())).unwrap_err();
    assert!(matches!(err, Error::LimitExceeded { .. }), "{err}");

    let mut t = TarBuilder::default();
    let long = format!("{}/f", "d/".repeat(3000));
    t.pax(&[("path", long.as_bytes())])
        .file("short", b"")
        .file("next", b"");
    let layer = index(&gzip(&t.finish()), 1 << 20);
    let paths: Vec<_> = layer.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        ["next"],
        "over-long path dropped, stream still in sync"
    );

    let mut t = TarBuilder::default();
    t.pax(&[("SCHILY.xattr.user.big", &vec![0u8; 100 << 10][..])])
        .file("f", b"");
    let layer = index(&gzip(&t.finish()), 1 << 20);
    assert!(layer.entries[0].xattrs.is_empty());
}

#[test]
fn entry_count_is_bounded() {
    let mut t = TarBuilder::default();
    for i in 0..50 {
        t.file(&format!("f{i}"), b"");
    }
    let opts = IndexOptions {
        limits: imagemesh_lazyindex::Limits {
            max_entries: 10,
            ..Default::default()
        },
        ..options(1 << 20)
    };
    let err = index_layer(&gzip(&t.finish())[..], &opts).unwrap_err();
    assert!(matches!(err, Error::LimitExceeded { .. }));
}

#[test]
fn corrupt_and_truncated_streams_are_typed_errors() {
    let mut t = TarBuilder::default();
    t.file("a", &Rng::new(1).text(200_000)).file("b", b"b");
    let raw = t.finish();
    let gz = gzip(&raw);

    let err = try_index(&gz[..gz.len() / 2]).unwrap_err();
    assert!(matches!(err, Error::Truncated(_)), "{err}");
    let mut bad = gz.clone();
    bad[gz.len() / 3] ^= 0xff;
    bad[gz.len() / 3 + 1] ^= 0x55;
    assert!(try_index(&bad).is_err());
    let mut trailing = gz.clone();
    trailing.extend_from_slice(b"garbage after the member");
    assert!(matches!(
        try_index(&trailing),
        Err(Error::CorruptGzip { .. })
    ));
    assert!(matches!(try_index(&[0x1f, 0x8b]), Err(Error::Truncated(_))));

    let mut broken_tar = raw.clone();
    broken_tar[100] ^= 0x01; // header checksum no longer matches
    assert!(matches!(
        try_index(&gzip(&broken_tar)),
        Err(Error::CorruptTar { .. })
    ));
    assert!(matches!(
        try_index(&gzip(&raw[..700])),
        Err(Error::Truncated(_))
    ));
}

#[test]
fn tampered_blob_fails_span_verification() {
    let raw = {
        let mut t = TarBuilder::default();
        t.file("a", &Rng::new(2).text(600_000));
        t.finish()
    };
    let gz = gzip(&raw);
    let layer = index(&gz, 64 << 10);
    let mut bad = gz.clone();
    let cp = &layer.checkpoints[2];
    bad[cp.compressed_offset as usize + 5] ^= 1;
    let plan = layer
        .plan_read(cp.uncompressed_offset..cp.uncompressed_offset + 10)
        .unwrap();
    let fetched = &bad[plan.fetch.start as usize..plan.fetch.end as usize];
    assert!(matches!(
        layer.decode_read(&plan, fetched),
        Err(Error::DigestMismatch { .. })
    ));
    assert_eq!(read_range(&layer, &gz, 1000..1010), &raw[1000..1010]);
}

/// Random byte flips, insertions and truncations of a valid layer: ingest never panics.
#[test]
fn mutated_layers_never_panic() {
    let mut t = TarBuilder::default();
    let mut rng = Rng::new(3);
    t.pax(&[("path", "p".repeat(200).as_bytes())])
        .file("x", b"pax");
    t.file(&"l".repeat(150), b"gnu")
        .symlink("s", "x")
        .hardlink("h", "x");
    t.file("data", &rng.text(150_000));
    let raw = t.finish();
    for base in [gzip(&raw), raw.clone()] {
        for _ in 0..300 {
            let mut m = base.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(m.len() as u64) as usize;
                match rng.below(3) {
                    0 => m[at] ^= 1 << rng.below(8),
                    1 => m.insert(at, rng.next() as u8),
                    _ => m.truncate(at),
                }
            }
            if let Ok(layer) = try_index(&m) {
                let _ = MergedTree::from_layers([&layer]);
                assert_eq!(decode_layer(&encode_layer(&layer)).unwrap(), layer);
            }
        }
    }
}

/// Random mutations of an encoded index: decoding fails cleanly or yields an index that is safe
/// to merge and to plan reads against.
#[test]
fn mutated_indexes_never_panic() {
    let mut t = TarBuilder::default();
    let mut rng = Rng::new(4);
    t.dir("d/")
        .file("d/a", &rng.text(300_000))
        .symlink("d/s", "a")
        .hardlink("d/h", "d/a");
    let raw = t.finish();
    let gz = gzip(&raw);
    let encoded = encode_layer(&index(&gz, 64 << 10));
    assert!(decode_layer(&encoded).is_ok());
    for _ in 0..2000 {
        let mut m = encoded.clone();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(m.len() as u64) as usize;
            match rng.below(3) {
                0 => m[at] ^= 1 << rng.below(8),
                1 => m[at] = rng.next() as u8,
                _ => m.truncate(at),
            }
        }
        let Ok(layer) = decode_layer(&m) else {
            continue;
        };
        let _ = MergedTree::from_layers([&layer]);
        let want = 0..layer.uncompressed_size.min(1000);
        if let Ok(plan) = layer.plan_read(want)
            && plan.fetch.end <= gz.len() as u64
        {
            let _ = layer.decode_read(
                &plan,
                &gz[plan.fetch.start as usize..plan.fetch.end as usize],
            );
        }
    }
}

/// Splits an encoded index into (header, inflated metadata, windows) per docs/index-format.md.
fn split_index(encoded: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    use std::io::Read;
    let zlen = u64::from_le_bytes(encoded[16..24].try_into().unwrap()) as usize;
    let mut meta = Vec::new();
    flate2::read::ZlibDecoder::new(&encoded[32..32 + zlen])
        .read_to_end(&mut meta)
        .unwrap();
    (encoded[..32].to_vec(), meta, encoded[32 + zlen..].to_vec())
}

fn join_index(header: &[u8], meta: &[u8], windows: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(meta).unwrap();
    let zmeta = z.finish().unwrap();
    let mut out = header[..16].to_vec();
    out.extend((zmeta.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    out.extend(zmeta);
    out.extend(windows);
    out
}

/// Mutations inside the (checksummed) metadata section reach the field parser and validator.
#[test]
fn mutated_index_metadata_never_panics() {
    let mut t = TarBuilder::default();
    let mut rng = Rng::new(5);
    t.dir("d/")
        .file("d/a", &rng.text(300_000))
        .symlink("d/s", "a")
        .hardlink("d/h", "d/a");
    t.char_device("d/c", 4, 5)
        .pax(&[("SCHILY.xattr.user.k", b"v")])
        .file("d/x", b"x");
    let gz = gzip(&t.finish());
    let (header, meta, windows) = split_index(&encode_layer(&index(&gz, 64 << 10)));
    assert!(decode_layer(&join_index(&header, &meta, &windows)).is_ok());
    let mut accepted = 0;
    for _ in 0..3000 {
        let mut m = meta.clone();
        for _ in 0..1 + rng.below(3) {
            if m.is_empty() {
                break;
            }
            let at = rng.below(m.len() as u64) as usize;
            match rng.below(4) {
                0 => m[at] ^= 1 << rng.below(8),
                1 => m[at] = rng.next() as u8,
                2 => m[at] = 0xff,
                _ => m.truncate(at),
            }
        }
        let Ok(layer) = decode_layer(&join_index(&header, &m, &windows)) else {
            continue;
        };
        accepted += 1;
        let _ = MergedTree::from_layers([&layer]);
        for e in layer.entries.iter().filter(|e| e.offset.is_some()) {
            let start = e.offset.unwrap();
            let Ok(plan) = layer.plan_read(start..start + e.size.min(100)) else {
                continue;
            };
            if plan.fetch.end <= gz.len() as u64 {
                let fetched = &gz[plan.fetch.start as usize..plan.fetch.end as usize];
                let _ = layer.decode_read(&plan, fetched);
            }
        }
    }
    assert!(
        accepted > 0,
        "some mutations (e.g. of mode bits) should still decode"
    );
}

/// Found by the `index_layer` fuzz target: a zero-byte blob is an empty plain tar layer, and its
/// index must survive its own decoder.
#[test]
fn empty_blob_is_an_empty_layer() {
    let layer = try_index(&[]).unwrap();
    assert!(layer.entries.is_empty());
    assert_eq!(decode_layer(&encode_layer(&layer)).unwrap(), layer);
    assert_eq!(read_range(&layer, &[], 0..0), b"");
}

#[test]
fn a_doctored_window_passes_span_verification_but_changes_the_checkpoint_identity() {
    // Why caches key decoded bytes by checkpoint identity, not (layer digest, range): an index
    // that copies a layer's offsets and span digests but swaps a window decodes other bytes
    // from the same verified span.
    let mut rng = Rng::new(7);
    let mut t = TarBuilder::default();
    t.file("big.txt", &rng.text(512 << 10));
    let blob = gzip(&t.finish());
    let honest = index(&blob, 64 << 10);
    let k = (1..honest.checkpoints.len())
        .find(|&i| honest.checkpoints[i].window.len > 0)
        .expect("a block checkpoint with a window");
    let mut doctored = honest.clone();
    let other = (1..honest.checkpoints.len())
        .find(|&i| i != k && honest.checkpoints[i].window.len > 0)
        .expect("another window");
    doctored.checkpoints[k].window = honest.checkpoints[other].window.clone();

    let start = honest.checkpoints[k].uncompressed_offset;
    let want = start..start + 4096;
    let plan = honest.plan_read(want.clone()).unwrap();
    let fetched = &blob[plan.fetch.start as usize..plan.fetch.end as usize];
    let good = honest.decode_read(&plan, fetched).unwrap();
    let plan = doctored.plan_read(want).unwrap();
    match doctored.decode_read(&plan, fetched) {
        Ok(bad) => assert_ne!(bad, good, "the doctored window changed nothing"),
        Err(Error::DigestMismatch { .. }) => panic!("span verification does not cover windows"),
        Err(_) => {} // Inflating with the wrong history may also fail outright.
    }

    let identities = |layer: &LayerIndex| -> Vec<[u8; 32]> {
        layer.checkpoints.iter().map(|c| c.identity()).collect()
    };
    let (h, d) = (identities(&honest), identities(&doctored));
    assert_ne!(h[k], d[k]);
    assert_eq!(
        h.iter().zip(&d).filter(|(a, b)| a != b).count(),
        1,
        "only the doctored checkpoint's identity changes"
    );
    // The same index, decoded again (another image sharing the layer), shares every identity.
    let again = decode_layer(&encode_layer(&honest)).unwrap();
    assert_eq!(identities(&again), h);
}
