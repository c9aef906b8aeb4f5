//! A mounted image against `umoci unpack` of the same image, through the kernel: `lstat`,
//! `readlink` and `read` on both trees.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `lstat` of every path under `root`, keyed "/a/b".
pub fn walk(root: &Path) -> BTreeMap<String, (fs::Metadata, PathBuf)> {
    let mut out = BTreeMap::new();
    walk_into(root, root, &mut out);
    out
}

fn walk_into(root: &Path, dir: &Path, out: &mut BTreeMap<String, (fs::Metadata, PathBuf)>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("read dir {}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        let meta = fs::symlink_metadata(&path).expect("lstat");
        let key = format!(
            "/{}",
            path.strip_prefix(root).unwrap().to_str().expect("utf-8")
        );
        if meta.is_dir() {
            walk_into(root, &path, out);
        }
        out.insert(key, (meta, path));
    }
}

fn kind(meta: &fs::Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    }
}

/// Asserts the mount equals the unpacked rootfs: paths, types, modes, owners, file sizes and
/// mtimes, symlink targets, and which paths share an inode (hardlinks). Returns the regular
/// files with their sizes.
pub fn assert_same_tree(mount: &Path, rootfs: &Path) -> Vec<(String, u64)> {
    let ours = walk(mount);
    let theirs = walk(rootfs);
    let our_paths: Vec<&String> = ours.keys().collect();
    let their_paths: Vec<&String> = theirs.keys().collect();
    assert_eq!(our_paths, their_paths, "paths differ from umoci unpack");
    let mut files = Vec::new();
    for (path, (meta, on_disk)) in &theirs {
        let (mine, in_mount) = &ours[path];
        assert_eq!(kind(mine), kind(meta), "{path}: type");
        assert_eq!(mine.mode() & 0o7777, meta.mode() & 0o7777, "{path}: mode");
        assert_eq!(
            (mine.uid(), mine.gid()),
            (meta.uid(), meta.gid()),
            "{path}: owner"
        );
        if meta.is_file() {
            assert_eq!(mine.len(), meta.len(), "{path}: size");
            assert_eq!(mine.mtime(), meta.mtime(), "{path}: mtime");
            files.push((path.clone(), meta.len()));
        }
        if meta.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(in_mount).expect("readlink in the mount"),
                fs::read_link(on_disk).expect("readlink"),
                "{path}: link target"
            );
        }
    }
    assert_eq!(
        inode_groups(&ours),
        inode_groups(&theirs),
        "hardlinks differ"
    );
    files
}

/// Paths that share an inode with another path, grouped.
fn inode_groups(tree: &BTreeMap<String, (fs::Metadata, PathBuf)>) -> Vec<Vec<String>> {
    let mut by_inode: HashMap<u64, Vec<String>> = HashMap::new();
    for (path, (meta, _)) in tree.iter().filter(|(_, (m, _))| m.is_file()) {
        by_inode.entry(meta.ino()).or_default().push(path.clone());
    }
    let mut groups: Vec<Vec<String>> = by_inode.into_values().filter(|g| g.len() > 1).collect();
    groups.sort();
    groups
}
