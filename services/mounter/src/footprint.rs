//! What a mount's loaded index and file table hold in memory, estimated from their contents
//! (struct sizes plus the heap they point to), so the mounter can keep all its mounts' indexes
//! within `mounter.index_memory_bytes` and refuse a mount that would not fit (`AT_CAPACITY`)
//! rather than grow until the kernel kills it with every container's filesystem.

use std::mem::size_of;

use imagemesh_lazyindex::{Checkpoint, Entry, ImageIndex};

use crate::fs::inodes::{Inodes, Node};

/// Bytes held by `index` (kept by the mount's reader) and `inodes` (its file table).
pub fn of_mount(index: &ImageIndex, inodes: &Inodes) -> u64 {
    let index_bytes: usize = index
        .layers
        .iter()
        .map(|layer| {
            let checkpoints: usize = layer
                .checkpoints
                .iter()
                .map(|c| size_of::<Checkpoint>() + c.window.compressed.len())
                .sum();
            let entries: usize = layer.entries.iter().map(entry_bytes).sum();
            layer.digest.len() + layer.diff_id.len() + checkpoints + entries
        })
        .sum();
    // Where remote windows lie: one range per checkpoint (their bytes live in the caches).
    let remote_windows = index.remote_windows.as_ref().map_or(0, |w| {
        w.ranges
            .iter()
            .map(|r| {
                size_of::<Vec<std::ops::Range<u64>>>() + r.len() * size_of::<std::ops::Range<u64>>()
            })
            .sum::<usize>()
            + w.blob.len()
    });
    (index_bytes + remote_windows + inodes.nodes().iter().map(node_bytes).sum::<usize>()) as u64
}

fn entry_bytes(entry: &Entry) -> usize {
    size_of::<Entry>()
        + entry.path.len()
        + entry.link_target.as_ref().map_or(0, String::len)
        + xattr_bytes(&entry.xattrs)
}

fn node_bytes(node: &Node) -> usize {
    let entry = &node.entry;
    size_of::<Node>()
        + entry.link_target.as_ref().map_or(0, String::len)
        + entry.hardlink_to.as_ref().map_or(0, String::len)
        + xattr_bytes(&entry.xattrs)
        + node
            .children
            .iter()
            .map(|(name, _)| size_of::<(String, u64)>() + name.len())
            .sum::<usize>()
}

fn xattr_bytes(xattrs: &[(String, Vec<u8>)]) -> usize {
    xattrs
        .iter()
        .map(|(name, value)| size_of::<(String, Vec<u8>)>() + name.len() + value.len())
        .sum()
}
