//! A mounted image against `umoci unpack` of the same image, through the kernel: `lstat`,
//! `readlink` and `read` on both trees.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use imagemesh_tests::tree::{lstat_tree, type_name};

/// Asserts the mount equals the unpacked rootfs: paths, types, modes, owners, file sizes and
/// mtimes, symlink targets, and which paths share an inode (hardlinks). Returns the regular
/// files with their sizes.
pub fn assert_same_tree(mount: &Path, rootfs: &Path) -> Vec<(String, u64)> {
    let ours = lstat_tree(mount);
    let theirs = lstat_tree(rootfs);
    let our_paths: Vec<&String> = ours.keys().collect();
    let their_paths: Vec<&String> = theirs.keys().collect();
    assert_eq!(our_paths, their_paths, "paths differ from umoci unpack");
    let mut files = Vec::new();
    for (path, (meta, on_disk)) in &theirs {
        let (mine, in_mount) = &ours[path];
        assert_eq!(type_name(mine), type_name(meta), "{path}: type");
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
