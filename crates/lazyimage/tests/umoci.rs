//! End-to-end correctness against a real OCI tool: build a multi-layer image with umoci
//! (insert, whiteout, opaque, unpack+repack), index its layers, merge them, and compare the
//! merged tree — paths, types, modes, owners, link targets, hardlinks, and every regular file's
//! bytes read back lazily through checkpoints — with `umoci unpack` of the same image.

#[path = "../../lazyindex/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Rng;
use imagemesh_lazyimage::{ImageReader, Shared};
use imagemesh_lazyindex::{
    EntryKind, ImageIndex, IndexOptions, MergedEntry, MergedTree, OciLayoutSource, index_layer,
};

fn umoci(args: &[&str]) {
    let out = Command::new("umoci")
        .args(args)
        .output()
        .expect("umoci runs");
    assert!(
        out.status.success(),
        "umoci {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn have_umoci() -> bool {
    Command::new("umoci")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn write(path: &Path, data: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Layer 1: many small files, one large random file, links, odd modes and owners, long names.
fn base_tree(dir: &Path, rng: &mut Rng) {
    for i in 0..400 {
        let len = rng.below(6000) as usize;
        let text = rng.text(len);
        write(
            &dir.join(format!("small/d{}/f{i}.txt", i % 17)),
            &text,
            0o644,
        );
    }
    write(&dir.join("big/random.bin"), &rng.bytes(12 << 20), 0o600);
    write(&dir.join("big/text.log"), &rng.text(9 << 20), 0o640);
    write(&dir.join("bin/tool"), b"#!/bin/sh\necho tool\n", 0o4755);
    std::os::unix::fs::symlink("tool", dir.join("bin/tool-link")).unwrap();
    std::os::unix::fs::symlink("/etc/missing", dir.join("bin/dangling")).unwrap();
    fs::hard_link(dir.join("bin/tool"), dir.join("bin/tool-hard")).unwrap();
    let long = dir
        .join("long")
        .join("n".repeat(120))
        .join(format!("{}.txt", "x".repeat(180)));
    write(&long, b"long name", 0o644);
    write(&dir.join("owned/file"), b"owned", 0o640);
    std::os::unix::fs::chown(dir.join("owned/file"), Some(1234), Some(5678)).unwrap();
    write(&dir.join("gone/file"), b"to be whited out", 0o644);
    write(&dir.join("opq/old-a"), b"old", 0o644);
    write(&dir.join("opq/sub/old-b"), b"old", 0o644);
    write(&dir.join("replace/dir-becomes-file/x"), b"x", 0o644);
    write(&dir.join("edit/me"), b"version 1", 0o644);
}

struct Image {
    _tmp: tempfile::TempDir,
    layout: PathBuf,
    rootfs: PathBuf,
}

fn build_image() -> Image {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let image = format!("{}:t", layout.display());
    let mut rng = Rng::new(42);
    umoci(&["init", "--layout", layout.to_str().unwrap()]);
    umoci(&["new", "--image", &image]);

    let src = tmp.path().join("src1");
    base_tree(&src, &mut rng);
    umoci(&["insert", "--image", &image, src.to_str().unwrap(), "/"]);

    // Layer 2 by unpack + edit + repack: umoci writes whiteouts for what we delete.
    let bundle = tmp.path().join("bundle");
    umoci(&["unpack", "--image", &image, bundle.to_str().unwrap()]);
    let root = bundle.join("rootfs");
    fs::remove_file(root.join("small/d3/f3.txt")).unwrap();
    fs::remove_dir_all(root.join("small/d5")).unwrap();
    fs::remove_dir_all(root.join("replace/dir-becomes-file")).unwrap();
    write(&root.join("replace/dir-becomes-file"), b"now a file", 0o644);
    write(&root.join("edit/me"), b"version 2, longer", 0o600);
    fs::hard_link(root.join("big/text.log"), root.join("edit/log-link")).unwrap();
    umoci(&["repack", "--image", &image, bundle.to_str().unwrap()]);

    // Layer 3 and 4: an opaque directory replacement and an explicit whiteout.
    let src3 = tmp.path().join("src3");
    write(&src3.join("new-c"), b"new", 0o644);
    umoci(&[
        "insert",
        "--image",
        &image,
        "--opaque",
        src3.to_str().unwrap(),
        "/opq",
    ]);
    umoci(&["insert", "--image", &image, "--whiteout", "/gone"]);

    let out = tmp.path().join("out");
    umoci(&["unpack", "--image", &image, out.to_str().unwrap()]);
    Image {
        rootfs: out.join("rootfs"),
        layout,
        _tmp: tmp,
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// Indexes every layer of the layout's only manifest, bottom first.
fn index_image(layout: &Path) -> ImageIndex {
    let source = OciLayoutSource::new(layout);
    let index = read_json(&layout.join("index.json"));
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest = read_json(&source.blob_path(manifest_digest).unwrap());
    let options = IndexOptions {
        span_size: 1 << 20,
        checkpoint_threshold: 0,
        ..IndexOptions::default()
    };
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().unwrap();
            let blob = fs::File::open(source.blob_path(digest).unwrap()).unwrap();
            let layer = index_layer(std::io::BufReader::new(blob), &options).unwrap();
            assert_eq!(layer.digest, digest);
            layer
        })
        .collect();
    ImageIndex {
        manifest_digest: Some(manifest_digest.to_string()),
        layers,
        remote_windows: None,
    }
}

/// What `lstat` says about every path under `root`, keyed like the merged tree.
fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (fs::Metadata, PathBuf)>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        let key = path
            .strip_prefix(root)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        if meta.is_dir() {
            walk(root, &path, out);
        }
        out.insert(key, (meta, path));
    }
}

fn kind_of(meta: &fs::Metadata) -> EntryKind {
    let ft = meta.file_type();
    match () {
        _ if ft.is_dir() => EntryKind::Dir,
        _ if ft.is_symlink() => EntryKind::Symlink,
        _ => EntryKind::File,
    }
}

fn compare(path: &str, ours: &MergedEntry, meta: &fs::Metadata, disk: &Path) {
    assert_eq!(ours.kind, kind_of(meta), "{path}: type");
    assert_eq!(ours.mode, meta.mode() & 0o7777, "{path}: mode");
    assert_eq!(
        (ours.uid, ours.gid),
        (u64::from(meta.uid()), u64::from(meta.gid())),
        "{path}"
    );
    if ours.kind == EntryKind::Symlink {
        let target = fs::read_link(disk).unwrap();
        assert_eq!(
            ours.link_target.as_deref(),
            target.to_str(),
            "{path}: link target"
        );
    }
    if ours.kind == EntryKind::File {
        assert_eq!(ours.size, meta.len(), "{path}: size");
        assert_eq!(ours.mtime, meta.mtime(), "{path}: mtime");
    }
}

#[tokio::test]
async fn merged_tree_matches_umoci_unpack() {
    if !have_umoci() {
        eprintln!("SKIP: umoci is not installed (apt-get install umoci)");
        return;
    }
    let image = build_image();
    let index = index_image(&image.layout);
    assert_eq!(index.layers.len(), 4);
    let tree = MergedTree::from_layers(&index.layers);
    let reader = ImageReader::new(
        std::sync::Arc::new(index),
        OciLayoutSource::new(&image.layout),
        std::sync::Arc::new(Shared::in_memory(64 << 20)),
    );

    let mut disk = BTreeMap::new();
    walk(&image.rootfs, &image.rootfs, &mut disk);
    let ours: Vec<&str> = tree
        .iter()
        .map(|(p, _)| p)
        .filter(|p| !p.is_empty())
        .collect();
    let theirs: Vec<&str> = disk.keys().map(String::as_str).collect();
    assert_eq!(ours, theirs, "merged paths differ from umoci unpack");

    for (path, (meta, on_disk)) in &disk {
        let entry = tree.get(path).unwrap();
        compare(path, entry, meta, on_disk);
        if let Some(target) = &entry.hardlink_to {
            let target_meta = &disk[target].0;
            assert_eq!(
                meta.ino(),
                target_meta.ino(),
                "{path}: hardlink to {target}"
            );
        }
        if entry.kind == EntryKind::File {
            let got = reader.read_path(&tree, path, 0, entry.size).await.unwrap();
            assert!(
                got[..] == fs::read(on_disk).unwrap()[..],
                "{path}: bytes differ"
            );
        }
    }
    assert!(tree.get("gone").is_none() && tree.get("opq/old-a").is_none());
    let stats = reader.stats();
    eprintln!("read {} files: {stats:?}", disk.len());
}
