//! Layer merging: whiteouts, opaque directories, hardlinks, replacements, implicit parents and
//! symlinked parents, checked path by path.

mod common;

use common::{TarBuilder, gzip, index};
use imagemesh_lazyindex::{EntryKind, LayerIndex, MergedTree};

fn layer(build: impl FnOnce(&mut TarBuilder)) -> LayerIndex {
    let mut t = TarBuilder::default();
    build(&mut t);
    index(&gzip(&t.finish()), 1 << 20)
}

fn listing(tree: &MergedTree) -> Vec<String> {
    tree.iter()
        .filter(|(p, _)| !p.is_empty())
        .map(|(p, e)| format!("{p}:{}", e.kind))
        .collect()
}

#[test]
fn whiteouts_and_opaque_dirs_hide_lower_layers() {
    let base = layer(|t| {
        t.dir("a/")
            .file("a/keep", b"1")
            .file("a/gone", b"2")
            .dir("a/sub/")
            .file("a/sub/deep", b"3");
        t.dir("o/")
            .file("o/old", b"4")
            .dir("o/olddir/")
            .file("o/olddir/x", b"5");
    });
    let top = layer(|t| {
        t.file("a/.wh.gone", b"").file("a/.wh.sub", b"");
        t.file("o/new", b"6")
            .file("o/.wh..wh..opq", b"")
            .file("o/newer", b"7");
    });
    let tree = MergedTree::from_layers([&base, &top]);
    assert_eq!(
        listing(&tree),
        [
            "a:dir",
            "a/keep:file",
            "o:dir",
            "o/new:file",
            "o/newer:file"
        ]
    );
    assert_eq!(tree.get("o/new").unwrap().layer, 1);
    assert_eq!(tree.get("/a/keep").unwrap().data.unwrap().layer, 0);
}

#[test]
fn replacements_and_implicit_parents() {
    let base = layer(|t| {
        t.dir("x/")
            .file("x/child", b"c")
            .file("f", b"file")
            .dir("d/")
            .file("d/in", b"i");
    });
    let top = layer(|t| {
        t.file("x", b"now a file")
            .dir("f/")
            .dir("d/")
            .file("deep/er/file", b"z");
    });
    let tree = MergedTree::from_layers([&base, &top]);
    assert_eq!(
        listing(&tree),
        [
            "d:dir",
            "d/in:file",
            "deep:dir",
            "deep/er:dir",
            "deep/er/file:file",
            "f:dir",
            "x:file"
        ]
    );
    assert!(tree.get("deep/er").unwrap().implicit);
    assert!(!tree.get("d").unwrap().implicit);
    let children: Vec<_> = tree.children("").map(|(n, _)| n).collect();
    assert_eq!(children, ["d", "deep", "f", "x"]);
}

#[test]
fn hardlinks_take_their_targets_data_across_layers() {
    let base = layer(|t| {
        t.file("bin/busybox", b"BUSYBOX");
    });
    let top = layer(|t| {
        t.hardlink("bin/sh", "bin/busybox")
            .file("bin/busybox", b"replaced later");
    });
    let tree = MergedTree::from_layers([&base, &top]);
    let sh = tree.get("bin/sh").unwrap();
    assert_eq!(sh.kind, EntryKind::File);
    assert_eq!(sh.hardlink_to.as_deref(), Some("bin/busybox"));
    // The link was made before the target was replaced: it keeps the old inode's bytes.
    assert_eq!(sh.data.unwrap().layer, 0);
    assert_eq!(sh.size, 7);
    assert_eq!(tree.get("bin/busybox").unwrap().data.unwrap().layer, 1);
}

#[test]
fn symlinked_parents_are_followed_inside_the_root() {
    let base = layer(|t| {
        t.dir("usr/lib/")
            .symlink("lib", "usr/lib")
            .symlink("evil", "/../../../tmp");
    });
    let top = layer(|t| {
        t.file("lib/libc.so", b"libc")
            .file("evil/x", b"x")
            .file("lib/.wh.libc.so", b"");
        t.file("lib/libm.so", b"libm");
    });
    let tree = MergedTree::from_layers([&base, &top]);
    assert!(tree.get("lib/libm.so").is_none());
    assert_eq!(tree.get("usr/lib/libm.so").unwrap().kind, EntryKind::File);
    assert!(
        tree.get("usr/lib/libc.so").is_none(),
        "whiteout through the symlink"
    );
    // `..` stops at the root: the absolute target resolves to /tmp inside the image.
    assert_eq!(tree.get("tmp/x").unwrap().kind, EntryKind::File);
}

#[test]
fn children_skip_grandchildren_and_keep_odd_siblings() {
    let l = layer(|t| {
        t.file("a/x/y", b"")
            .file("a-b", b"")
            .file("a.txt", b"")
            .file("a0", b"")
            .file("a/z", b"");
    });
    let tree = MergedTree::from_layers([&l]);
    let root: Vec<_> = tree.children("/").map(|(n, _)| n).collect();
    assert_eq!(root, ["a", "a-b", "a.txt", "a0"]);
    let a: Vec<_> = tree.children("a").map(|(n, _)| n).collect();
    assert_eq!(a, ["x", "z"]);
}
