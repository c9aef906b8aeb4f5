//! The encoded index round-trips exactly, stays small, and the caching `ImageReader` over it
//! serves file reads with one range request each, fetching only the spans it needs.

// The index builders of the format crate's own tests.
#[path = "../../lazyindex/tests/common/mod.rs"]
mod common;

use std::sync::Arc;

use common::{Rng, TarBuilder, gzip, index, index_plain};
use imagemesh_lazyimage::{ImageReader, ReadError, Shared};
use imagemesh_lazyindex::{
    BlobSource, Error, ImageIndex, MAGIC, MemorySource, MergedTree, decode_image, decode_layer,
    encode_image, encode_layer,
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
    let mut future = bytes.clone();
    future[8] = 2;
    assert!(matches!(decode_image(&future), Err(Error::InvalidIndex(_))));
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
