//! The encoded index round-trips exactly, stays small, and the caching `ImageReader` over it
//! serves file reads with one range request each, fetching only the spans it needs.

// The index builders of the format crate's own tests.
#[path = "../../lazyindex/tests/common/mod.rs"]
mod common;

use std::sync::Arc;

use common::{Rng, TarBuilder, gzip, index, index_plain};
use imagemesh_lazyimage::{ImageReader, MAX_READ_AHEAD, ReadError, Shared};
use imagemesh_lazyindex::{
    BlobSource, DecodeLimits, Error, ImageIndex, MAGIC, MemorySource, MergedTree, decode_image,
    decode_image_head, decode_layer, encode_image, encode_layer, head_len,
};

fn image() -> (ImageIndex, MemorySource, Vec<Vec<u8>>) {
    let mut rng = Rng::new(9);
    let mut base = TarBuilder::default();
    base.dir("usr/").file("usr/big.txt", &rng.text(5_000_000));
    base.file("usr/random.bin", &rng.bytes(3_000_000))
        .symlink("usr/link", "big.txt");
    let mut top = TarBuilder::default();
    top.file("etc/conf", b"top layer")
        .hardlink("etc/big", "usr/big.txt");
    let (base, top) = (base.finish(), top.finish());
    let (gz, plain) = (gzip(&base), top.clone());
    let layers = vec![index(&gz, 256 << 10), index_plain(&plain, 256 << 10)];
    let mut source = MemorySource::default();
    source.insert(layers[0].digest.clone(), gz);
    source.insert(layers[1].digest.clone(), plain);
    let image = ImageIndex {
        manifest_digest: Some(format!("sha256:{}", "ab".repeat(32))),
        layers,
        remote_windows: None,
    };
    (image, source, vec![base, top])
}

#[test]
fn layer_and_image_indexes_round_trip() {
    let (image, _, _) = image();
    for layer in &image.layers {
        let bytes = encode_layer(layer);
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(&decode_layer(&bytes).unwrap(), layer);
        assert!(decode_image(&bytes).is_err(), "kind is checked");
    }
    let bytes = encode_image(&image);
    assert_eq!(decode_image(&bytes).unwrap(), image);
    for version in [1u8, 3] {
        let mut other = bytes.clone();
        other[8] = version;
        assert!(matches!(decode_image(&other), Err(Error::InvalidIndex(_))));
    }
}

/// The image index encoded, its head decoded alone, and a source that also holds the encoded
/// index (where a reader fetches the windows).
fn image_with_remote_windows() -> (ImageIndex, ImageIndex, MemorySource, Vec<Vec<u8>>, Vec<u8>) {
    let (whole, mut source, raws) = image();
    let encoded = encode_image(&whole);
    let head = head_len(&encoded).unwrap();
    let mut remote = decode_image_head(&encoded[..head], &DecodeLimits::default()).unwrap();
    let blob = format!("sha256:{}", "cd".repeat(32));
    remote.remote_windows.as_mut().unwrap().blob = blob.clone();
    source.insert(blob, encoded.clone());
    (whole, remote, source, raws, encoded)
}

#[test]
fn the_head_alone_decodes_to_the_index_without_its_windows() {
    let (whole, remote, _, _, encoded) = image_with_remote_windows();
    let windows = remote.remote_windows.clone().unwrap();
    assert_eq!(remote.manifest_digest, whole.manifest_digest);
    let mut with_windows = remote.clone();
    with_windows.remote_windows = None;
    for (l, layer) in with_windows.layers.iter_mut().enumerate() {
        for (i, cp) in layer.checkpoints.iter_mut().enumerate() {
            let want = &whole.layers[l].checkpoints[i].window;
            // The range names exactly the window's bytes in the encoded index.
            let range = windows.ranges[l][i].clone();
            assert_eq!(
                &encoded[range.start as usize..range.end as usize],
                &want.compressed[..]
            );
            assert_eq!(cp.window.is_remote(), want.len > 0);
            assert_eq!(cp.identity(), whole.layers[l].checkpoints[i].identity());
            cp.window.compressed = want.compressed.clone();
        }
    }
    assert_eq!(with_windows, whole);
    assert!(
        whole.layers[0].checkpoints.iter().any(|c| c.window.len > 0),
        "the test image has windows"
    );
    // A head cut short is refused, not misread.
    let head = head_len(&encoded).unwrap();
    assert!(decode_image_head(&encoded[..head - 1], &DecodeLimits::default()).is_err());
}

#[tokio::test]
async fn a_reader_fetches_each_window_it_needs_once_and_checks_it() {
    let (_, remote, source, raws, encoded) = image_with_remote_windows();
    let tree = MergedTree::from_layers(&remote.layers);
    let big = tree.get("usr/big.txt").unwrap().clone();
    let off = big.data.unwrap().offset as usize;
    let lazy = reader(remote.clone(), source);
    let got = lazy
        .read_path(&tree, "usr/big.txt", 3_000_000, 100)
        .await
        .unwrap();
    assert_eq!(&got[..], &raws[0][off + 3_000_000..off + 3_000_100]);
    // One range request for the span, one for its checkpoint's window.
    assert_eq!(lazy.stats().range_requests, 2, "{:?}", lazy.stats());
    let again = lazy
        .read_path(&tree, "usr/big.txt", 3_000_050, 10)
        .await
        .unwrap();
    assert_eq!(&again[..], &raws[0][off + 3_000_050..off + 3_000_060]);
    assert_eq!(lazy.stats().range_requests, 2);

    // A window altered in the registry is refused, never inflated from.
    let (_, _, mut altered, _, _) = image_with_remote_windows();
    let windows = remote.remote_windows.clone().unwrap();
    let first = windows.ranges[0].iter().find(|r| !r.is_empty()).unwrap();
    let mut bad = encoded.clone();
    bad[first.start as usize] ^= 0x40;
    altered.insert(windows.blob.clone(), bad);
    let checked = reader(remote, altered);
    let (mut served, mut refused) = (0, 0);
    for at in (0..5_000_000).step_by(128 << 10) {
        match checked.read_path(&tree, "usr/big.txt", at, 10).await {
            Ok(bytes) => {
                let at = off + at as usize;
                assert_eq!(&bytes[..], &raws[0][at..at + 10]);
                served += 1;
            }
            Err(ReadError::Index(Error::WindowMismatch { checkpoint, .. })) => {
                assert_eq!(windows.ranges[0][checkpoint], *first);
                refused += 1;
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert!(
        refused > 0 && served > refused,
        "{served} served, {refused} refused"
    );
}

#[test]
fn index_is_a_small_fraction_of_the_image() {
    let (image, _, raws) = image();
    let size = encode_image(&image).len();
    let uncompressed: usize = raws.iter().map(Vec::len).sum();
    let windows = image.layers.iter().flat_map(|l| &l.checkpoints);
    let window_bytes: usize = windows.clone().map(|c| c.window.compressed.len()).sum();
    // Windows are at most 32 KiB (+ deflate's few bytes of overhead) each, text ones far less.
    assert!(
        windows
            .clone()
            .all(|c| c.window.compressed.len() <= 32 * 1024 + 64)
    );
    assert!(
        window_bytes < windows.count() * 20 * 1024,
        "text windows compress"
    );
    // Everything else (file table, checkpoints, digests) is well under 1% of the image; the
    // window share depends on span size (32 KiB per span) and is measured in bench/indexer.
    let rest = size - window_bytes;
    assert!(
        rest * 100 < uncompressed,
        "index without windows: {rest} bytes for {uncompressed}"
    );
}

fn reader<S: BlobSource>(image: ImageIndex, source: S) -> ImageReader<S> {
    ImageReader::new(
        Arc::new(image),
        source,
        Arc::new(Shared::in_memory(64 << 20)),
    )
}

#[tokio::test]
async fn lazy_reads_fetch_one_range_and_only_nearby_spans() {
    let (image, source, raws) = image();
    let tree = MergedTree::from_layers(&image.layers);
    let reader = reader(image, source);
    let big = tree.get("usr/big.txt").unwrap().clone();
    let off = big.data.unwrap().offset as usize;
    let want = &raws[0][off + 3_000_000..off + 3_000_100];
    let got = reader
        .read_path(&tree, "/usr/big.txt", 3_000_000, 100)
        .await
        .unwrap();
    assert_eq!(&got[..], want);
    let stats = reader.stats();
    assert_eq!(stats.range_requests, 1);
    assert!(stats.bytes_fetched < 600 << 10, "{stats:?}");

    // The hardlink in the plain top layer reads the base layer's bytes.
    let via_link = reader.read_path(&tree, "etc/big", 0, 10).await.unwrap();
    assert_eq!(&via_link[..], &raws[0][off..off + 10]);
    let conf = reader
        .read_path(&tree, "etc/conf", 0, 1 << 20)
        .await
        .unwrap();
    assert_eq!(&conf[..], b"top layer");
    let past_end = reader.read_path(&tree, "etc/conf", 100, 10).await.unwrap();
    assert!(past_end.is_empty());
    assert!(matches!(
        reader.read_path(&tree, "usr", 0, 1).await,
        Err(ReadError::Index(Error::NotAFile(_)))
    ));
    assert!(matches!(
        reader.read_path(&tree, "nope", 0, 1).await,
        Err(ReadError::Index(Error::NotFound(_)))
    ));
    // Read again: served from the caches.
    let fetches = reader.stats().range_requests;
    let again = reader
        .read_path(&tree, "/usr/big.txt", 3_000_000, 100)
        .await
        .unwrap();
    assert_eq!(&again[..], want);
    assert_eq!(reader.stats().range_requests, fetches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_are_read_ahead_and_a_single_read_is_not() {
    let (image, source, raws) = image();
    let tree = MergedTree::from_layers(&image.layers);
    let big = tree.get("usr/big.txt").unwrap().clone();
    let off = big.data.unwrap().offset as usize;
    // The spans the file's bytes lie in.
    let cps = &image.layers[0].checkpoints;
    let (start, end) = (off as u64, off as u64 + big.size);
    let file_spans = cps.iter().filter(|c| c.uncompressed_offset < end).count() as u64
        - cps
            .iter()
            .filter(|c| c.uncompressed_offset <= start)
            .count() as u64
        + 1;
    assert!(file_spans > 8, "the file lies in {file_spans} spans");

    let single = ImageReader::new_shared(
        Arc::new(image.clone()),
        source.clone(),
        Arc::new(Shared::in_memory(64 << 20)),
    );
    single
        .read_path(&tree, "usr/big.txt", 2_000_000, 100)
        .await
        .unwrap();
    let stats = single.stats();
    assert_eq!(
        (stats.range_requests, stats.read_ahead_spans),
        (1, 0),
        "{stats:?}"
    );

    // The kernel reads a file 128 KiB at a time. Read up to the end of the file's second span:
    // two fetches in a row, the second sequential, so the reader starts on the third.
    let sequential = ImageReader::new_shared(
        Arc::new(image.clone()),
        source,
        Arc::new(Shared::in_memory(64 << 20)),
    );
    let cps = &image.layers[0].checkpoints;
    let first = cps.partition_point(|c| c.uncompressed_offset <= start) - 1;
    let third = cps[first + 2].uncompressed_offset;
    let read = |at: u64, len: u64| read_checked(&sequential, &tree, &raws[0], off, at, len);
    let mut at = 0;
    while start + at < third {
        at += read(at, (128 << 10).min(third - start - at)).await;
    }
    // Wait (not a timing assertion: bounded, and what is checked is what was fetched) for
    // the read-ahead of the third span to land.
    for _ in 0..1000 {
        if sequential.stats().read_ahead_spans > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let before = sequential.stats();
    assert!(before.read_ahead_spans > 0, "{before:?}");
    assert!(before.read_ahead_bytes > 0, "{before:?}");
    at += read(at, 128 << 10).await;
    assert_eq!(
        sequential.stats().range_requests,
        before.range_requests,
        "the third span was read ahead"
    );
    while at < big.size {
        at += read(at, 128 << 10).await;
    }
    // Every span of the file was fetched once, by the foreground or ahead of it (read-ahead
    // may also have fetched a few spans past the file).
    let stats = sequential.stats();
    let fetched = stats.range_requests + stats.read_ahead_spans;
    assert!(
        fetched >= file_spans && fetched <= file_spans + MAX_READ_AHEAD as u64,
        "{file_spans} spans, {stats:?}"
    );
}

/// Reads `len` bytes of `usr/big.txt` from `at` and checks them against the raw layer (the
/// file's data starts at `off`); returns how many were read.
async fn read_checked(
    reader: &ImageReader<MemorySource>,
    tree: &MergedTree,
    raw: &[u8],
    off: usize,
    at: u64,
    len: u64,
) -> u64 {
    let chunk = reader
        .read_path(tree, "usr/big.txt", at, len)
        .await
        .unwrap();
    let from = off + at as usize;
    assert_eq!(&chunk[..], &raw[from..from + chunk.len()]);
    chunk.len() as u64
}

/// The mounter spawns reads on a multi-threaded runtime: the futures must be `Send`.
#[tokio::test]
async fn read_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let (image, source, _) = image();
    let tree = MergedTree::from_layers(&image.layers);
    let reader = reader(image, Arc::new(source));
    let read = reader.read_path(&tree, "etc/conf", 0, 4);
    assert_send(&read);
    assert_eq!(&read.await.unwrap()[..], b"top ");
}
