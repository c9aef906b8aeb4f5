//! Runs the fuzz targets' entry points over the committed seed corpus (`fuzz/corpus/*`), so the
//! seeds stay valid and the fuzzed code paths run in every `cargo test`, nightly or not.
//! `cargo test -p imagemesh-lazyindex --test fuzz_seeds -- --ignored` regenerates the seeds.

mod common;

use std::path::{Path, PathBuf};

use common::{Rng, TarBuilder, gzip, gzip_members, index, index_plain};
use imagemesh_lazyindex::{
    ImageIndex, IndexOptions, MIN_SPAN_SIZE, MergedTree, decode_image, decode_layer, encode_image,
    encode_layer, index_layer,
};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(corpus(target))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_str().unwrap().starts_with('.'))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

#[test]
fn index_layer_seeds() {
    let options = IndexOptions {
        span_size: MIN_SPAN_SIZE,
        checkpoint_threshold: 0,
        ..IndexOptions::default()
    };
    let seeds = seeds("index_layer");
    assert!(seeds.len() >= 4);
    for seed in seeds {
        let layer = index_layer(&seed[..], &options).expect("seeds are valid layers");
        let _ = MergedTree::from_layers([&layer]);
        assert_eq!(decode_layer(&encode_layer(&layer)).unwrap(), layer);
    }
}

#[test]
fn decode_index_seeds() {
    let seeds = seeds("decode_index");
    assert!(seeds.len() >= 3);
    for seed in seeds {
        let ok = decode_layer(&seed).is_ok() || decode_image(&seed).is_ok();
        assert!(ok, "seeds are valid indexes");
    }
}

fn seed_layers() -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = Rng::new(77);
    let mut t = TarBuilder::default();
    t.dir("etc/")
        .file("etc/os-release", b"ID=test\n")
        .symlink("etc/link", "os-release");
    t.hardlink("etc/hard", "etc/os-release")
        .char_device("dev/null", 1, 3);
    t.file("a/.wh.b", b"").file("o/.wh..wh..opq", b"");
    let basic = t.finish();
    let mut t = TarBuilder::default();
    t.pax(&[
        ("path", "p".repeat(150).as_bytes()),
        ("SCHILY.xattr.user.x", b"1"),
    ]);
    t.file("short", b"pax")
        .file(&"g".repeat(130), b"gnu long name");
    let names = t.finish();
    let mut t = TarBuilder::default();
    t.file("text", &rng.text(200_000));
    let text = t.finish();
    vec![
        ("basic.tar.gz", gzip(&basic)),
        ("basic.tar", basic),
        ("long-names.tar.gz", gzip(&names)),
        ("multi-member.tar.gz", gzip_members(&text, 70_000)),
    ]
}

#[test]
#[ignore = "writes the seed corpus into fuzz/corpus"]
fn regenerate_seeds() {
    let layers = seed_layers();
    for (name, blob) in &layers {
        std::fs::write(corpus("index_layer").join(name), blob).unwrap();
    }
    let indexed: Vec<_> = layers
        .iter()
        .map(|(name, blob)| match name.ends_with(".tar") {
            true => index_plain(blob, MIN_SPAN_SIZE),
            false => index(blob, MIN_SPAN_SIZE),
        })
        .collect();
    let dir = corpus("decode_index");
    std::fs::write(dir.join("layer-gzip.idx"), encode_layer(&indexed[0])).unwrap();
    std::fs::write(dir.join("layer-plain.idx"), encode_layer(&indexed[1])).unwrap();
    std::fs::write(dir.join("layer-multi.idx"), encode_layer(&indexed[3])).unwrap();
    let image = ImageIndex {
        manifest_digest: Some(format!("sha256:{}", "0".repeat(64))),
        layers: indexed,
        remote_windows: None,
    };
    std::fs::write(dir.join("image.idx"), encode_image(&image)).unwrap();
}
