//! Merging layers into the final tree, the way containerd's applier does it.
//!
//! Entries are applied in tar order, layer by layer: a whiteout `.wh.<name>` removes whatever
//! is at that path (and its subtree); an opaque marker `.wh..wh..opq` removes every child of its
//! directory not written by the same layer; a directory over a directory keeps the children,
//! anything else over a directory replaces the subtree; missing parents are created as
//! directories; a hardlink takes the data (layer + offset) and metadata of its target as it is
//! at that moment. Parent components that are symlinks are followed inside the root (like
//! containerd's `fs.RootPath` and umoci's `securejoin`), so `lib/x` lands in `usr/lib/x` when
//! `lib -> usr/lib`.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;

use tracing::warn;

use crate::model::{Entry, EntryKind, LayerIndex};
use crate::path;

mod resolve;

/// Where a regular file's bytes live: layer number (bottom = 0) and uncompressed data offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRef {
    pub layer: usize,
    pub offset: u64,
}

/// One path of the merged tree. `kind` is never `Whiteout`, `Opaque` or `Hardlink`: a hardlink
/// is shown as what it links to, with `hardlink_to` naming the target path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergedEntry {
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Symlink target, verbatim.
    pub link_target: Option<String>,
    /// For paths created by a hardlink: the path it was linked to.
    pub hardlink_to: Option<String>,
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub device: Option<(u32, u32)>,
    /// Regular files: where the bytes are.
    pub data: Option<DataRef>,
    /// The layer that last wrote this path.
    pub layer: usize,
    /// Created only because a descendant needed a parent (no tar entry of its own).
    pub implicit: bool,
}

impl MergedEntry {
    fn from_entry(layer: usize, e: &Entry) -> Self {
        MergedEntry {
            kind: e.kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            mtime: e.mtime,
            mtime_nsec: e.mtime_nsec,
            link_target: e.link_target.clone(),
            hardlink_to: None,
            xattrs: e.xattrs.clone(),
            device: e.device,
            data: e.offset.map(|offset| DataRef { layer, offset }),
            layer,
            implicit: false,
        }
    }

    fn implicit_dir(layer: usize) -> Self {
        let mut e = MergedEntry::from_entry(layer, &Entry::new("", EntryKind::Dir));
        e.mode = 0o755;
        e.implicit = true;
        e
    }
}

/// The merged file tree of an image: normalised path → entry, sorted by path; the root is `""`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergedTree {
    entries: BTreeMap<String, MergedEntry>,
}

impl Default for MergedTree {
    fn default() -> Self {
        let mut entries = BTreeMap::new();
        entries.insert(String::new(), MergedEntry::implicit_dir(0));
        MergedTree { entries }
    }
}

impl MergedTree {
    /// Merges `layers`, bottom first.
    pub fn from_layers<'a>(layers: impl IntoIterator<Item = &'a LayerIndex>) -> Self {
        let mut tree = MergedTree::default();
        for (i, layer) in layers.into_iter().enumerate() {
            tree.apply(i, layer);
        }
        tree
    }

    /// Applies one more layer on top.
    pub fn apply(&mut self, layer: usize, index: &LayerIndex) {
        let mut written = HashSet::new();
        for e in &index.entries {
            let path = self.resolve_parents(&e.path);
            match e.kind {
                EntryKind::Whiteout => self.remove_tree(&path),
                EntryKind::Opaque => {
                    self.ensure_parents(layer, &path);
                    self.hide_lower(&path, &written);
                }
                _ => self.put(layer, e, path, &mut written),
            }
        }
    }

    /// Looks a path up without following a final symlink (leading/trailing `/` are ignored).
    pub fn get(&self, path: &str) -> Option<&MergedEntry> {
        self.entries.get(path.trim_matches('/'))
    }

    /// All entries in path order, the root (`""`) first, taken out of the tree (for a table
    /// built from it that should not copy every entry).
    pub fn into_entries(self) -> impl Iterator<Item = (String, MergedEntry)> {
        self.entries.into_iter()
    }

    /// All entries in path order, the root (`""`) first.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &MergedEntry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The direct children of directory `dir`, as (name, entry), in name order.
    pub fn children<'a>(&'a self, dir: &str) -> impl Iterator<Item = (&'a str, &'a MergedEntry)> {
        resolve::Children::new(&self.entries, dir.trim_matches('/'))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn put(&mut self, layer: usize, e: &Entry, path: String, written: &mut HashSet<String>) {
        if path.is_empty() && e.kind != EntryKind::Dir {
            warn!(kind = %e.kind, "entry for the root that is not a directory ignored");
            return;
        }
        let new = match e.kind {
            EntryKind::Hardlink => match self.link_source(layer, e) {
                Some(entry) => entry,
                None => return,
            },
            _ => MergedEntry::from_entry(layer, e),
        };
        self.ensure_parents(layer, &path);
        if let Some(old) = self.entries.get(&path)
            && old.kind == EntryKind::Dir
            && new.kind != EntryKind::Dir
        {
            self.remove_tree(&path);
        }
        self.entries.insert(path.clone(), new);
        written.insert(path);
    }

    /// What a hardlink entry becomes: a copy of its target as it is now.
    fn link_source(&self, layer: usize, e: &Entry) -> Option<MergedEntry> {
        let target = self.resolve_parents(e.link_target.as_deref().unwrap_or_default());
        let Some(src) = self.entries.get(&target) else {
            warn!(path = e.path, target, "hardlink to a missing path ignored");
            return None;
        };
        if src.kind == EntryKind::Dir {
            warn!(path = e.path, target, "hardlink to a directory ignored");
            return None;
        }
        let mut linked = src.clone();
        linked.hardlink_to = Some(target);
        linked.layer = layer;
        linked.implicit = false;
        Some(linked)
    }

    /// Creates missing parents of `path` as directories; a non-directory in the way is replaced.
    fn ensure_parents(&mut self, layer: usize, path: &str) {
        for (i, _) in path.match_indices('/') {
            let parent = &path[..i];
            match self.entries.get(parent) {
                Some(p) if p.kind == EntryKind::Dir => {}
                existing => {
                    if existing.is_some() {
                        warn!(
                            parent,
                            "non-directory replaced by a directory to hold a child"
                        );
                    }
                    self.entries
                        .insert(parent.to_string(), MergedEntry::implicit_dir(layer));
                }
            }
        }
    }

    /// Removes `path` and everything under it.
    fn remove_tree(&mut self, path: &str) {
        if path.is_empty() {
            return;
        }
        self.entries.remove(path);
        let prefix = format!("{path}/");
        let doomed: Vec<String> = self
            .range_from(&prefix)
            .take_while(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        for k in doomed {
            self.entries.remove(&k);
        }
    }

    /// Opaque directory: drop every child (with its subtree) this layer did not write.
    fn hide_lower(&mut self, dir: &str, written: &HashSet<String>) {
        let names: Vec<String> = self.children(dir).map(|(n, _)| n.to_string()).collect();
        for name in names {
            let child = path::join(dir, &name);
            if !written.contains(&child) {
                self.remove_tree(&child);
            }
        }
    }

    fn range_from<'a>(&'a self, from: &str) -> impl Iterator<Item = &'a String> {
        self.entries
            .range::<str, _>((Bound::Included(from), Bound::Unbounded))
            .map(|(k, _)| k)
    }
}
