//! Walking an unpacked or mounted image tree the way the comparisons need it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// `lstat` of every path under `root`, keyed like `index show` ("/a/b"), with its full path.
pub fn lstat_tree(root: &Path) -> BTreeMap<String, (fs::Metadata, PathBuf)> {
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

/// The entry type as `index show` names it: dir, symlink, file or other.
pub fn type_name(meta: &fs::Metadata) -> &'static str {
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
