//! `imagemesh index show` against `umoci unpack` of the same image.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use imagemesh_tests::tree::{lstat_tree, type_name};

use serde_json::Value;

/// `index show` output keyed by path.
pub fn parse_show(stdout: &[u8]) -> BTreeMap<String, Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).expect("show prints JSON lines");
            let path = value["path"].as_str().expect("path").to_string();
            (path, value)
        })
        .collect()
}

/// Asserts the tree equals the unpacked rootfs: paths, types, modes, owners, sizes, mtimes,
/// symlink targets and hardlinks (same inode on disk).
pub fn assert_tree_matches(show: &BTreeMap<String, Value>, rootfs: &Path) {
    let disk = lstat_tree(rootfs);
    let ours: Vec<&str> = show
        .keys()
        .map(String::as_str)
        .filter(|p| *p != "/")
        .collect();
    let theirs: Vec<&str> = disk.keys().map(String::as_str).collect();
    assert_eq!(ours, theirs, "index show paths differ from umoci unpack");
    for (path, (meta, on_disk)) in &disk {
        let line = &show[path];
        assert_eq!(line["type"], type_name(meta), "{path}: type");
        assert_eq!(line["mode"], meta.mode() & 0o7777, "{path}: mode");
        assert_eq!(line["uid"], meta.uid(), "{path}: uid");
        assert_eq!(line["gid"], meta.gid(), "{path}: gid");
        if meta.is_file() {
            assert_eq!(line["size"], meta.len(), "{path}: size");
            assert_eq!(line["mtime"], meta.mtime(), "{path}: mtime");
        }
        if meta.file_type().is_symlink() {
            let target = fs::read_link(on_disk).expect("readlink");
            assert_eq!(
                line["link_target"].as_str(),
                target.to_str(),
                "{path}: link target"
            );
        }
        if let Some(target) = line["hardlink_to"].as_str() {
            assert_eq!(
                meta.ino(),
                disk[target].0.ino(),
                "{path}: hardlink to {target}"
            );
        }
    }
}

/// Regular files of the tree with their sizes.
pub fn regular_files(show: &BTreeMap<String, Value>) -> Vec<(String, u64)> {
    show.iter()
        .filter(|(_, line)| line["type"] == "file")
        .map(|(path, line)| (path.clone(), line["size"].as_u64().expect("size")))
        .collect()
}
